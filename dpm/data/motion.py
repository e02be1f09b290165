"""Procedural skeleton motion in the HumanML3D feature recipe (EMDM / MDM in miniature).

A 16-joint humanoid (:func:`default_skeleton`: pelvis, neck, 2 x (shoulder, elbow, wrist),
2 x (hip, knee, ankle, toe); metres, y up, facing +z, the person's left is +x) moves through
twelve action families (:data:`ACTIONS`) with parametric joint-angle curves and root motion
drawn per clip. Legs are posed by two-link inverse kinematics onto footstep targets, so feet
stay planted in stance (the toe through heel-off) and foot contacts mean what they say.
Each clip is put in the canonical frame of HumanML3D: at frame 0 the root is at the x-z origin
and the body faces +z.

Per frame, the features follow HumanML3D's ``motion_representation`` for J joints,
``D = 12 J - 1`` dims (191 for J = 16; :class:`FeatureLayout` names the blocks):

* root yaw velocity (1): ``theta[k+1] - theta[k]`` (radians per frame, wrapped to (-pi, pi]),
  with the facing yaw ``theta`` measured from the hips and shoulders (as HumanML3D);
* root linear velocity (2): the root's x-z displacement ``k -> k+1``, in the facing frame of
  ``k + 1`` (as HumanML3D);
* root height (1): the root's y at ``k``;
* root-relative positions ((J-1) x 3): joints 1.. at ``k`` minus the root's x-z (y stays the
  height above the floor, as HumanML3D's ``ric``), in the facing frame of ``k``;
* local rotations ((J-1) x 6): joints 1.. relative to their parents, continuous 6-D (the first
  two columns of the rotation matrix, Zhou et al. 2019);
* local velocities (J x 3): ``joints[k+1] - joints[k]`` in the facing frame of ``k``;
* foot contacts (4: left ankle, left toe, right ankle, right toe): 1 when the squared
  displacement ``|p[k+1] - p[k]|^2 < contact_threshold``. The default, 1e-4 m^2 per frame
  (1 cm per frame, 0.2 m/s at 20 fps), is MDM's foot-contact threshold ``|dP| <= 0.01``;
  HumanML3D's 0.002 in the same units (metres, 20 fps: 0.9 m/s) would also mark the slow swing
  of the small steps here (turning in place, side steps) as contact. Scale it by
  ``(20 / fps)^2`` at another frame rate.

So feature frame ``k`` uses joint frames ``k`` and ``k + 1``: F + 1 joint frames give F
feature frames. :func:`recover_joints` inverts the map (the ``recover_from_ric`` role): it
integrates the yaw and root velocity from the canonical start and rotates the positions back,
giving the F joint frames ``0 .. F-1``. The action-to-motion layout (HumanAct12 / UESTC, as MDM
uses it) is :func:`to_rot6d_layout`: per frame ``(J + 1, 6)``, the J local rotations (the root's
global) in 6-D and the root position padded to 6; :func:`rot6d_layout_joints` is its FK.

Forward kinematics, the 6-D rotation maps, :func:`motion_features`, :func:`recover_joints` and
:func:`rot6d_layout_joints` are JAX (jit-able, differentiable); data are generated in numpy.

Example:
  >>> ds = motion_dataset(256, seed=0)            # x: (256, 120, 191) raw features
  >>> stats = motion_stats(ds["x"], ds["mask"])
  >>> xn = normalize(ds["x"], stats, ds["mask"])  # zero on padded frames
  >>> joints = recover_joints(ds["x"][0, : ds["length"][0]], default_skeleton())
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ACTIONS",
    "ACTION_PROMPTS",
    "CONTACT_THRESHOLD",
    "MOTION_CAPTION_MAX_WORDS",
    "MOTION_WORDS",
    "FeatureLayout",
    "MotionStats",
    "Skeleton",
    "action_id",
    "axis_angle_to_matrix",
    "check_motion_features",
    "default_skeleton",
    "denormalize",
    "facing_angle",
    "foot_contacts",
    "forward_kinematics",
    "matrix_to_rot6d",
    "motion_captions",
    "motion_dataset",
    "motion_features",
    "motion_stats",
    "normalize",
    "pad_motions",
    "recover_joints",
    "rot6d_layout_joints",
    "rot6d_to_matrix",
    "to_rot6d_layout",
    "yaw_matrix",
]

CONTACT_THRESHOLD = 1e-4  # m^2 per frame: |dp| < 1 cm per frame (0.2 m/s at 20 fps)
_CHUNK = 256  # clips generated together
_G = 9.81

# ----------------------------------------------------------------------------- skeleton


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """A kinematic tree: joint names, parents and rest offsets, with the joints the recipe uses.

    Hashable (tuples only), so it can be a static argument of a jitted function.

    Attributes:
      names: (J,) joint names.
      parents: (J,) parent index of each joint; the root (joint 0) has -1 and every parent comes
        before its children.
      offsets: (J, 3) rest offset of each joint from its parent in metres (the root's is
        ignored), stored as a tuple of 3-tuples (``np.asarray(skeleton.offsets)`` is the array).
        Rest pose = identity local rotations.
      feet: ``(left_ankle, left_toe, right_ankle, right_toe)``: the foot-contact joints.
      left_hip, right_hip, left_shoulder, right_shoulder: the facing direction is measured
        across these (HumanML3D's ``face_joint_indx``).
      left_wrist, right_wrist: the hands.
    """

    names: tuple[str, ...]
    parents: tuple[int, ...]
    offsets: tuple[tuple[float, float, float], ...]
    feet: tuple[int, int, int, int]
    left_hip: int
    right_hip: int
    left_shoulder: int
    right_shoulder: int
    left_wrist: int
    right_wrist: int

    def __post_init__(self):
        names = tuple(self.names)
        if len(names) < 2 or len(set(names)) != len(names) or not all(
            isinstance(n, str) for n in names
        ):
            raise ValueError(f"names must be >= 2 distinct strings, got {self.names!r}")
        J = len(names)
        parents = tuple(self.parents)
        if len(parents) != J or not all(_is_int(p) for p in parents):
            raise ValueError(f"parents must be {J} ints (one per name), got {self.parents!r}")
        parents = tuple(int(p) for p in parents)
        if parents[0] != -1 or any(not 0 <= p < j for j, p in enumerate(parents) if j > 0):
            raise ValueError(
                f"parents must be -1 for the root (joint 0) and in [0, j) for joint j (parents "
                f"before children), got {parents}"
            )
        off = np.asarray(self.offsets, dtype=np.float64)
        if off.shape != (J, 3) or not np.all(np.isfinite(off)):
            raise ValueError(
                f"offsets must be ({J}, 3) finite rest offsets, got shape {off.shape}"
            )
        feet = tuple(self.feet)
        fields = {"left_hip": self.left_hip, "right_hip": self.right_hip,
                  "left_shoulder": self.left_shoulder, "right_shoulder": self.right_shoulder,
                  "left_wrist": self.left_wrist, "right_wrist": self.right_wrist}
        if len(feet) != 4 or not all(_is_int(f) and 0 <= f < J for f in feet):
            raise ValueError(
                f"feet must be 4 joint indices in [0, {J}) (left ankle, left toe, right ankle, "
                f"right toe), got {self.feet!r}"
            )
        for k, v in fields.items():
            if not (_is_int(v) and 0 <= v < J):
                raise ValueError(f"{k} must be a joint index in [0, {J}), got {v!r}")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "offsets", tuple(tuple(float(c) for c in row) for row in off))
        object.__setattr__(self, "feet", tuple(int(f) for f in feet))
        for k, v in fields.items():
            object.__setattr__(self, k, int(v))

    @property
    def num_joints(self) -> int:
        """J."""
        return len(self.names)

    @property
    def feature_dim(self) -> int:
        """D = 12 J - 1, the HumanML3D feature dimension."""
        return 12 * self.num_joints - 1

    @property
    def layout(self) -> FeatureLayout:
        """The :class:`FeatureLayout` of this skeleton's features."""
        return FeatureLayout(self.num_joints)

    def index(self, name: str) -> int:
        """The index of joint ``name``."""
        if name not in self.names:
            raise ValueError(f"name must be one of the joints {self.names}, got {name!r}")
        return self.names.index(name)

    def bone_lengths(self) -> np.ndarray:
        """(J,) rest length of the bone from each joint's parent (0 for the root)."""
        lengths = np.linalg.norm(np.asarray(self.offsets), axis=-1)
        lengths[0] = 0.0
        return lengths


# name, parent, rest offset from the parent (metres; y up, facing +z, the left side is +x)
_DEFAULT_JOINTS = (
    ("pelvis", None, (0.0, 0.0, 0.0)),
    ("l_hip", "pelvis", (0.09, -0.07, 0.0)),
    ("l_knee", "l_hip", (0.0, -0.41, 0.0)),
    ("l_ankle", "l_knee", (0.0, -0.40, 0.0)),
    ("l_toe", "l_ankle", (0.0, -0.04, 0.13)),
    ("r_hip", "pelvis", (-0.09, -0.07, 0.0)),
    ("r_knee", "r_hip", (0.0, -0.41, 0.0)),
    ("r_ankle", "r_knee", (0.0, -0.40, 0.0)),
    ("r_toe", "r_ankle", (0.0, -0.04, 0.13)),
    ("neck", "pelvis", (0.0, 0.52, 0.0)),
    ("l_shoulder", "neck", (0.17, -0.03, 0.0)),
    ("l_elbow", "l_shoulder", (0.0, -0.28, 0.0)),
    ("l_wrist", "l_elbow", (0.0, -0.26, 0.0)),
    ("r_shoulder", "neck", (-0.17, -0.03, 0.0)),
    ("r_elbow", "r_shoulder", (0.0, -0.28, 0.0)),
    ("r_wrist", "r_elbow", (0.0, -0.26, 0.0)),
)


def default_skeleton() -> Skeleton:
    """The 16-joint humanoid of the procedural data (D = 191 features).

    Joints: pelvis (root), l/r hip, knee, ankle, toe, neck (the top of the spine, between the
    shoulders; a renderer draws the head above it), l/r shoulder, elbow, wrist. About 1.7 m
    tall with a head; at rest the toes touch the floor (y = 0) with the ankles 4 cm above it
    and the pelvis at 0.92 m. Limbs hang straight down in the rest pose.
    """
    names = tuple(n for n, _, _ in _DEFAULT_JOINTS)
    parents = tuple(-1 if p is None else names.index(p) for _, p, _ in _DEFAULT_JOINTS)
    i = names.index
    return Skeleton(
        names=names,
        parents=parents,
        offsets=tuple(o for _, _, o in _DEFAULT_JOINTS),
        feet=(i("l_ankle"), i("l_toe"), i("r_ankle"), i("r_toe")),
        left_hip=i("l_hip"),
        right_hip=i("r_hip"),
        left_shoulder=i("l_shoulder"),
        right_shoulder=i("r_shoulder"),
        left_wrist=i("l_wrist"),
        right_wrist=i("r_wrist"),
    )


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """The blocks of the ``12 J - 1`` HumanML3D features of a J-joint skeleton, as slices.

    Example:
      >>> lay = FeatureLayout(16)
      >>> x[..., lay.contacts]  # (..., 4) foot contacts
    """

    num_joints: int

    def __post_init__(self):
        if not _is_int(self.num_joints) or self.num_joints < 2:
            raise ValueError(f"num_joints must be an int >= 2, got {self.num_joints!r}")

    @classmethod
    def from_dim(cls, dim: int) -> FeatureLayout:
        """The layout of ``dim = 12 J - 1`` features."""
        if not _is_int(dim) or (dim + 1) % 12 or dim < 23:
            raise ValueError(
                f"dim must be 12 J - 1 for J >= 2 joints (23, 35, ..., 191 for J=16, 263 for "
                f"J=22), got {dim!r}"
            )
        return cls((dim + 1) // 12)

    @property
    def dim(self) -> int:
        return 12 * self.num_joints - 1

    @property
    def root_rot_vel(self) -> slice:
        return slice(0, 1)

    @property
    def root_lin_vel(self) -> slice:
        return slice(1, 3)

    @property
    def root_height(self) -> slice:
        return slice(3, 4)

    @property
    def root(self) -> slice:
        """The four root dims: yaw velocity, x-z velocity, height."""
        return slice(0, 4)

    @property
    def positions(self) -> slice:
        return slice(4, 4 + 3 * (self.num_joints - 1))

    @property
    def rotations(self) -> slice:
        s = self.positions.stop
        return slice(s, s + 6 * (self.num_joints - 1))

    @property
    def velocities(self) -> slice:
        s = self.rotations.stop
        return slice(s, s + 3 * self.num_joints)

    @property
    def contacts(self) -> slice:
        return slice(self.dim - 4, self.dim)

    def blocks(self) -> dict[str, slice]:
        """Name -> slice of the seven blocks, in order."""
        return {k: getattr(self, k) for k in ("root_rot_vel", "root_lin_vel", "root_height",
                                              "positions", "rotations", "velocities",
                                              "contacts")}


# ----------------------------------------------------------------------------- rotations
# The helpers taking ``xp`` run on numpy (data generation) and jax.numpy (the public API).


def _m2r6(xp, R):
    return xp.concatenate([R[..., :, 0], R[..., :, 1]], axis=-1)


def _r62m(xp, x, eps2=1e-20):
    a1, a2 = x[..., 0:3], x[..., 3:6]
    b1 = a1 / xp.sqrt(xp.maximum(xp.sum(a1 * a1, axis=-1, keepdims=True), eps2))
    b2 = a2 - xp.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = b2 / xp.sqrt(xp.maximum(xp.sum(b2 * b2, axis=-1, keepdims=True), eps2))
    b3 = xp.cross(b1, b2)
    return xp.stack([b1, b2, b3], axis=-1)


def _fk(xp, parents, offsets, root_pos, local_rot):
    off = xp.asarray(np.asarray(offsets), dtype=local_rot.dtype)
    # numpy multiplies strided stacks of 3x3 matrices ~8x slower than contiguous ones
    take = (lambda j: np.ascontiguousarray(local_rot[..., j, :, :])) if xp is np else (
        lambda j: local_rot[..., j, :, :])
    G = [take(0)]
    P = [root_pos]
    for j in range(1, len(parents)):
        p = parents[j]
        P.append(P[p] + G[p] @ off[j])
        G.append(G[p] @ take(j))
    return xp.stack(P, axis=-2)


def rot6d_to_matrix(x: jax.Array) -> jax.Array:
    """Continuous 6-D rotations (Zhou et al. 2019) -> rotation matrices, by Gram-Schmidt.

    Args:
      x: (..., 6): two 3-vectors ``a1, a2`` (need not be orthonormal: network outputs).

    Returns:
      (..., 3, 3) with columns ``b1 = a1/|a1|``, ``b2`` = ``a2`` orthogonalised against ``b1``
      and normalised, ``b3 = b1 x b2``. Differentiable (the norms are floored at 1e-10).
    """
    x = jnp.asarray(x)
    if x.shape[-1:] != (6,):
        raise ValueError(f"x must have shape (..., 6), got {x.shape}")
    return _r62m(jnp, x)


def matrix_to_rot6d(R: jax.Array) -> jax.Array:
    """Rotation matrices (..., 3, 3) -> (..., 6): the first two columns, concatenated."""
    R = jnp.asarray(R)
    if R.shape[-2:] != (3, 3):
        raise ValueError(f"R must have shape (..., 3, 3), got {R.shape}")
    return _m2r6(jnp, R)


def axis_angle_to_matrix(v: jax.Array) -> jax.Array:
    """Axis-angle vectors (..., 3) (direction = axis, norm = angle in radians) -> (..., 3, 3).

    Rodrigues' formula ``I + sinc(t) K + (1 - cos t)/t^2 K^2`` with ``K = [v]_x``; smooth at 0.
    """
    v = jnp.asarray(v)
    if v.shape[-1:] != (3,):
        raise ValueError(f"v must have shape (..., 3), got {v.shape}")
    t2 = jnp.sum(v * v, axis=-1)[..., None, None]
    t = jnp.sqrt(t2 + jnp.finfo(v.dtype).tiny)
    a = jnp.sinc(t / jnp.pi)  # sin t / t
    b = 0.5 * jnp.sinc(t / (2 * jnp.pi)) ** 2  # (1 - cos t) / t^2
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    zero = jnp.zeros_like(x)
    K = jnp.stack([jnp.stack([zero, -z, y], -1), jnp.stack([z, zero, -x], -1),
                   jnp.stack([-y, x, zero], -1)], -2)
    return jnp.eye(3, dtype=v.dtype) + a * K + b * (K @ K)


def yaw_matrix(angle: jax.Array) -> jax.Array:
    """Rotations about +y by ``angle`` (...,) -> (..., 3, 3); ``yaw_matrix(a) @ e_z`` is the
    facing direction ``(sin a, 0, cos a)``."""
    a = jnp.asarray(angle)
    c, s = jnp.cos(a), jnp.sin(a)
    o, z = jnp.ones_like(a), jnp.zeros_like(a)
    return jnp.stack([jnp.stack([c, z, s], -1), jnp.stack([z, o, z], -1),
                      jnp.stack([-s, z, c], -1)], -2)


def _check_skeleton(skeleton) -> Skeleton:
    if not isinstance(skeleton, Skeleton):
        raise TypeError(
            f"skeleton must be a Skeleton (e.g. default_skeleton()), got "
            f"{type(skeleton).__name__}"
        )
    return skeleton


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_finite(x, name: str) -> None:
    if _is_concrete(x):
        a = np.asarray(x)
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(a)))} NaN/inf")


def forward_kinematics(skeleton: Skeleton, root_pos: jax.Array, local_rot: jax.Array) -> jax.Array:
    """Joint positions from the root position and local joint rotations.

    ``G_0 = R_0``, ``p_0 = root_pos``; for j > 0 with parent q: ``p_j = p_q + G_q offset_j``,
    ``G_j = G_q R_j``. Identity rotations give the rest pose.

    Args:
      skeleton: the kinematic tree (static).
      root_pos: (..., 3) root positions.
      local_rot: (..., J, 3, 3) rotations relative to the parent (the root's is global).

    Returns:
      (..., J, 3) joint positions.
    """
    sk = _check_skeleton(skeleton)
    root_pos, local_rot = jnp.asarray(root_pos), jnp.asarray(local_rot)
    J = sk.num_joints
    if local_rot.shape[-3:] != (J, 3, 3):
        raise ValueError(f"local_rot must have shape (..., J={J}, 3, 3), got {local_rot.shape}")
    if root_pos.shape != local_rot.shape[:-3] + (3,):
        raise ValueError(
            f"root_pos must have shape {local_rot.shape[:-3] + (3,)} (local_rot's batch + 3), "
            f"got {root_pos.shape}"
        )
    dt = jnp.result_type(root_pos, local_rot, jnp.float32)
    return _fk(jnp, sk.parents, sk.offsets, root_pos.astype(dt), local_rot.astype(dt))


def to_rot6d_layout(root_pos: jax.Array, local_rot: jax.Array) -> jax.Array:
    """The a2m rot6d layout: (..., J + 1, 6) = J local rotations in 6-D (the root's global),
    then the root position padded with three zeros.

    Args:
      root_pos: (..., 3).
      local_rot: (..., J, 3, 3).
    """
    root_pos, local_rot = jnp.asarray(root_pos), jnp.asarray(local_rot)
    if local_rot.shape[-2:] != (3, 3) or root_pos.shape != local_rot.shape[:-3] + (3,):
        raise ValueError(
            f"root_pos (..., 3) and local_rot (..., J, 3, 3) must share their batch shape, got "
            f"{root_pos.shape} and {local_rot.shape}"
        )
    return _to_layout(jnp, root_pos, local_rot)


def _to_layout(xp, root_pos, local_rot):
    pad = xp.concatenate([root_pos, xp.zeros_like(root_pos)], axis=-1)
    return xp.concatenate([_m2r6(xp, local_rot), pad[..., None, :]], axis=-2)


def rot6d_layout_joints(skeleton: Skeleton, x: jax.Array) -> jax.Array:
    """Joints of the a2m rot6d layout, by FK (differentiable; 6-D parts need not be orthonormal).

    Args:
      skeleton: the kinematic tree (J joints).
      x: (..., J + 1, 6): :func:`to_rot6d_layout`.

    Returns:
      (..., J, 3) joint positions.
    """
    sk = _check_skeleton(skeleton)
    x = jnp.asarray(x)
    J = sk.num_joints
    if x.shape[-2:] != (J + 1, 6):
        raise ValueError(f"x must have shape (..., J+1={J + 1}, 6) (rot6d layout), got {x.shape}")
    _check_finite(x, "x")
    return _fk(jnp, sk.parents, sk.offsets, x[..., J, :3], _r62m(jnp, x[..., :J, :]))


# ----------------------------------------------------------------------------- features


def _facing(xp, sk, P):
    across = (P[..., sk.left_hip, :] - P[..., sk.right_hip, :]
              + P[..., sk.left_shoulder, :] - P[..., sk.right_shoulder, :])
    # forward = across x up = (-a_z, 0, a_x); yaw = atan2(forward_x, forward_z)
    return xp.arctan2(-across[..., 2], across[..., 0])


def _unyaw(xp, v, theta):
    """Ry(-theta) v: world -> facing frame."""
    c, s = xp.cos(theta), xp.sin(theta)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return xp.stack([c * x - s * z, y, s * x + c * z], axis=-1)


def _yaw(xp, v, theta):
    """Ry(theta) v: facing frame -> world."""
    c, s = xp.cos(theta), xp.sin(theta)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return xp.stack([c * x + s * z, y, -s * x + c * z], axis=-1)


def _contacts(xp, sk, P, threshold):
    d = P[..., 1:, list(sk.feet), :] - P[..., :-1, list(sk.feet), :]
    return (xp.sum(d * d, axis=-1) < threshold).astype(P.dtype)


def _features(xp, sk, P, R, threshold):
    J = sk.num_joints
    F = P.shape[-3] - 1
    theta = _facing(xp, sk, P)                                         # (..., F+1)
    dtheta = theta[..., 1:] - theta[..., :-1]
    r_vel = xp.arctan2(xp.sin(dtheta), xp.cos(dtheta))                 # (..., F)
    root = P[..., 0, :]
    v = _unyaw(xp, root[..., 1:, :] - root[..., :-1, :], theta[..., 1:])
    height = root[..., :-1, 1:2]
    flat = xp.asarray(np.array([1.0, 0.0, 1.0]), dtype=P.dtype)
    rel = P[..., :-1, 1:, :] - root[..., :-1, None, :] * flat
    ric = _unyaw(xp, rel, theta[..., :-1, None])                       # (..., F, J-1, 3)
    rot = _m2r6(xp, R[..., :F, R.shape[-3] - (J - 1):, :, :])          # (..., F, J-1, 6)
    vel = _unyaw(xp, P[..., 1:, :, :] - P[..., :-1, :, :], theta[..., :-1, None])
    lead = P.shape[:-3] + (F,)
    return xp.concatenate([
        r_vel[..., None], v[..., 0:1], v[..., 2:3], height,
        xp.reshape(ric, lead + (3 * (J - 1),)),
        xp.reshape(rot, lead + (6 * (J - 1),)),
        xp.reshape(vel, lead + (3 * J,)),
        _contacts(xp, sk, P, threshold),
    ], axis=-1)


def _check_joints(sk, joints, name="joints", min_frames=2):
    J = sk.num_joints
    if joints.ndim < 3 or joints.shape[-2:] != (J, 3) or joints.shape[-3] < min_frames:
        raise ValueError(
            f"{name} must have shape (..., T, J={J}, 3) with T >= {min_frames} frames, got "
            f"{joints.shape}"
        )
    _check_finite(joints, name)


def facing_angle(skeleton: Skeleton, joints: jax.Array) -> jax.Array:
    """The facing yaw of each frame, from the hips and shoulders (HumanML3D's root rotation).

    ``across = (l_hip - r_hip) + (l_shoulder - r_shoulder)``, forward ``= across x up``,
    ``yaw = atan2(forward_x, forward_z)`` (0 = facing +z).

    Args:
      skeleton: the kinematic tree.
      joints: (..., J, 3).

    Returns:
      (...,) yaw in radians, in (-pi, pi].
    """
    sk = _check_skeleton(skeleton)
    joints = jnp.asarray(joints)
    if joints.shape[-2:] != (sk.num_joints, 3):
        raise ValueError(f"joints must have shape (..., J={sk.num_joints}, 3), got {joints.shape}")
    return _facing(jnp, sk, joints)


def foot_contacts(
    skeleton: Skeleton, joints: jax.Array, *, threshold: float = CONTACT_THRESHOLD
) -> jax.Array:
    """Foot contacts: ``|p[k+1] - p[k]|^2 < threshold`` for the four ``skeleton.feet`` joints.

    Args:
      skeleton: the kinematic tree.
      joints: (..., T, J, 3), T >= 2.
      threshold: squared displacement per frame (m^2; default 1e-4 at 20 fps; HumanML3D's
        is 0.002).

    Returns:
      (..., T - 1, 4) in {0, 1} (left ankle, left toe, right ankle, right toe).
    """
    sk = _check_skeleton(skeleton)
    joints = jnp.asarray(joints)
    _check_joints(sk, joints)
    return _contacts(jnp, sk, joints, _check_threshold(threshold))


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) or not (
        threshold > 0 and math.isfinite(threshold)
    ):
        raise ValueError(f"contact_threshold must be a finite number > 0, got {threshold!r}")
    return float(threshold)


def motion_features(
    skeleton: Skeleton,
    joints: jax.Array,
    local_rot: jax.Array,
    *,
    contact_threshold: float = CONTACT_THRESHOLD,
) -> jax.Array:
    """HumanML3D features of a joint sequence (see the module docstring for the blocks).

    Invariant to a rotation about y and an x-z translation of the whole sequence.

    Args:
      skeleton: the kinematic tree (J joints).
      joints: (..., F + 1, J, 3) positions (F + 1 >= 2 frames; frame ``k`` and ``k + 1`` give
        feature frame ``k``).
      local_rot: (..., F + 1 or F, J or J - 1, 3, 3) local rotations; the first F frames of the
        non-root joints are used (pass J - 1 when the root's is unknown, e.g. rotations read
        back from features).
      contact_threshold: squared foot displacement per frame below which a foot is in contact.

    Returns:
      (..., F, 12 J - 1) features.
    """
    sk = _check_skeleton(skeleton)
    joints, local_rot = jnp.asarray(joints), jnp.asarray(local_rot)
    _check_joints(sk, joints)
    J, F = sk.num_joints, joints.shape[-3] - 1
    if (local_rot.shape[-2:] != (3, 3) or local_rot.shape[-3] not in (J, J - 1)
            or local_rot.shape[-4] not in (F, F + 1)
            or local_rot.shape[:-4] != joints.shape[:-3]):
        raise ValueError(
            f"local_rot must have shape {joints.shape[:-3]} + (F+1={F + 1} or F={F}, J={J} or "
            f"J-1={J - 1}, 3, 3) to match joints {joints.shape}, got {local_rot.shape}"
        )
    thr = _check_threshold(contact_threshold)
    dt = jnp.result_type(joints, local_rot, jnp.float32)
    return _features(jnp, sk, joints.astype(dt), local_rot.astype(dt), thr)


def check_motion_features(x, skeleton: Skeleton, *, name: str = "x") -> None:
    """Raises ValueError unless ``x`` is (..., F, 12 J - 1) features of ``skeleton`` with F >= 1
    (and, when its values are known, finite)."""
    sk = _check_skeleton(skeleton)
    shape = np.shape(x)
    if len(shape) < 2 or shape[-1] != sk.feature_dim or shape[-2] < 1:
        raise ValueError(
            f"{name} must have shape (..., F, D) with D = 12 J - 1 = {sk.feature_dim} for the "
            f"{sk.num_joints}-joint skeleton and F >= 1, got {shape}"
        )
    _check_finite(x, name)


def recover_joints(features: jax.Array, skeleton: Skeleton) -> jax.Array:
    """Joint positions from HumanML3D features (``recover_from_ric``), in the canonical frame.

    The yaw starts at 0 and integrates the yaw velocity, ``theta[k] = sum_{i<k} w[i]``; the root
    starts at the x-z origin and integrates the velocities rotated back by the yaw of the later
    frame, ``r[k+1] = r[k] + Ry(theta[k+1]) v[k]``; its height is read; the other joints are
    their root-relative positions rotated by ``Ry(theta[k])`` plus the root's x-z.

    Args:
      features: (..., F, 12 J - 1).
      skeleton: the kinematic tree (J joints).

    Returns:
      (..., F, J, 3): joint frames ``0 .. F-1`` (the last feature frame's velocities are not
      needed). Equals the source joints for clips in the canonical frame (as generated here).
    """
    sk = _check_skeleton(skeleton)
    x = jnp.asarray(features)
    check_motion_features(x, sk, name="features")
    lay = sk.layout
    J = sk.num_joints
    theta = jnp.concatenate(
        [jnp.zeros_like(x[..., :1, 0]), jnp.cumsum(x[..., :-1, 0], axis=-1)], axis=-1)
    zero = jnp.zeros_like(x[..., :-1, 1])
    v = jnp.stack([x[..., :-1, 1], zero, x[..., :-1, 2]], axis=-1)      # (..., F-1, 3)
    step = _yaw(jnp, v, theta[..., 1:])
    root_xz = jnp.concatenate([jnp.zeros_like(x[..., :1, :3]), jnp.cumsum(step, axis=-2)],
                              axis=-2)                                 # (..., F, 3), y = 0
    ric = jnp.reshape(x[..., lay.positions], x.shape[:-1] + (J - 1, 3))
    others = _yaw(jnp, ric, theta[..., None]) + root_xz[..., None, :]
    up = jnp.asarray([0.0, 1.0, 0.0], x.dtype)
    root = root_xz + x[..., 3:4] * up
    return jnp.concatenate([root[..., None, :], others], axis=-2)


# ----------------------------------------------------------------------------- actions

ACTIONS = ("walk", "run", "jump", "hop", "wave_left", "wave_right", "squat", "kick", "punch",
           "sidestep", "turn_left", "turn_right")

ACTION_PROMPTS = {
    "walk": "a person walks forward",
    "run": "a person runs forward",
    "jump": "a person jumps in place",
    "hop": "a person hops forward",
    "wave_left": "a person waves the left hand",
    "wave_right": "a person waves the right hand",
    "wave": "a person waves a hand",  # the multimodal prompt: left or right, 50/50
    "squat": "a person squats down",
    "kick": "a person kicks forward",
    "punch": "a person punches forward",
    "sidestep": "a person sidesteps to the left",
    "turn_left": "a person turns left",
    "turn_right": "a person turns right",
}


def action_id(action: str | int) -> int:
    """The index in :data:`ACTIONS` of an action name (or a checked id)."""
    if _is_int(action):
        if not 0 <= action < len(ACTIONS):
            raise ValueError(f"action id must be in [0, {len(ACTIONS)}), got {action}")
        return int(action)
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS} (or an id), got {action!r}")
    return ACTIONS.index(action)


def _ss(x):
    """Smoothstep on [0, 1], clamped."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _rot(axis: int, a):
    c, s = np.cos(a), np.sin(a)
    R = np.zeros(np.shape(a) + (3, 3))
    i, j = [(1, 2), (2, 0), (0, 1)][axis]
    R[..., axis, axis] = 1.0
    R[..., i, i], R[..., i, j], R[..., j, i], R[..., j, j] = c, -s, s, c
    return R


def _rx(a):
    return _rot(0, a)


def _ry(a):
    return _rot(1, a)


def _rz(a):
    return _rot(2, a)


def _root_xz(t, omega, v_lat, v_fwd):
    """x-z of a root moving at constant local velocity (v_lat to the left, v_fwd ahead) while its
    heading turns at ``omega`` from 0: the closed-form integral (smooth at omega = 0)."""
    half = 0.5 * omega * t
    S = np.sinc(half / np.pi)  # sin(half) / half
    ints, intc = t * np.sin(half) * S, t * np.cos(half) * S  # int sin(w s), int cos(w s)
    return v_lat * intc + v_fwd * ints, -v_lat * ints + v_fwd * intc


@dataclasses.dataclass(frozen=True)
class _Geo:
    """What the pose generator needs of the skeleton."""

    hip: np.ndarray         # (2, 3) left, right hip offsets from the pelvis
    toe: np.ndarray         # (3,) toe offset from the ankle
    l1: float               # thigh
    l2: float               # shin
    h0: float               # rest pelvis height (toes on the floor)
    width: float            # hip half-width

    @classmethod
    def of(cls, sk: Skeleton) -> _Geo:
        off = np.asarray(sk.offsets)
        i = sk.index
        hip = off[[i("l_hip"), i("r_hip")]]
        toe = off[i("l_toe")]
        l1, l2 = -off[i("l_knee"), 1], -off[i("l_ankle"), 1]
        return cls(hip, toe, float(l1), float(l2), float(-(hip[0, 1] - l1 - l2 + toe[1])),
                   float(abs(hip[0, 0])))


def _check_generator_skeleton(sk: Skeleton) -> None:
    ref = default_skeleton()
    if sk.names != ref.names or sk.parents != ref.parents:
        raise ValueError(
            f"skeleton must have the default skeleton's joints {ref.names} and parents (bone "
            f"lengths may differ) for the motion generator, got names {sk.names}"
        )
    off = np.asarray(sk.offsets)
    limbs = [sk.index(n) for n in ("l_knee", "l_ankle", "r_knee", "r_ankle", "l_elbow",
                                   "l_wrist", "r_elbow", "r_wrist")]
    if np.any(np.abs(off[limbs][:, [0, 2]]) > 1e-9) or np.any(off[limbs][:, 1] >= 0):
        raise ValueError("skeleton limbs (knee, ankle, elbow, wrist offsets) must hang straight "
                         "down (0, -length, 0) in the rest pose for the motion generator")
    if not np.allclose(off[sk.index("l_toe")], off[sk.index("r_toe")]):
        raise ValueError("skeleton must have equal left and right toe offsets")


def _plan(n: int, T: int) -> dict:
    z = np.zeros((n, T))
    return {
        "root_x": z.copy(), "root_z": z.copy(), "root_y": z.copy(), "yaw": z.copy(),
        "tilt": z.copy(), "roll": z.copy(),
        "toe": np.zeros((n, T, 2, 3)), "foot_yaw": np.zeros((n, T, 2)),
        "foot_pitch": np.zeros((n, T, 2)),
        "flex": np.zeros((n, T, 2)), "abd": np.full((n, T, 2), 0.1),
        "elbow": np.full((n, T, 2), 0.15), "bend": np.zeros((n, T, 2)),
        "lean": z.copy(), "twist": z.copy(), "side": z.copy(),
    }


def _u(rng, n, lo, hi):
    return rng.uniform(lo, hi, size=(n, 1))


def _pace(rate, lo, hi):
    """0 slow / 1 medium / 2 fast: the tercile of ``rate`` in its range."""
    return np.clip(np.floor(3.0 * (rate[:, 0] - lo) / (hi - lo)), 0, 2).astype(np.int32)


def _stand(p, geo, rng, t, width=None, toe_out=None, stagger=None):
    """Both feet planted at fixed footprints; a gentle idle sway of the pelvis."""
    n = p["root_y"].shape[0]
    width = geo.width * _u(rng, n, 1.0, 1.3) if width is None else width
    toe_out = _u(rng, n, 0.0, 0.15) if toe_out is None else toe_out
    stagger = np.zeros((n, 1)) if stagger is None else stagger
    for k, sgn in enumerate((1.0, -1.0)):
        p["toe"][..., k, 0] = sgn * width + geo.toe[2] * np.sin(sgn * toe_out)
        p["toe"][..., k, 2] = geo.toe[2] * np.cos(sgn * toe_out) + sgn * stagger
        p["foot_yaw"][..., k] = sgn * toe_out
    f, ph, a = _u(rng, n, 0.15, 0.4), _u(rng, n, 0, 1), _u(rng, n, 0.005, 0.02)
    p["root_x"] += a * np.sin(2 * np.pi * (f * t + ph))
    p["root_y"] += geo.h0 - _u(rng, n, 0.005, 0.02)
    p["abd"][:] = _u(rng, n, 0.06, 0.16)[..., None]
    p["elbow"][:] = _u(rng, n, 0.05, 0.3)[..., None]
    p["flex"] += 0.04 * np.sin(2 * np.pi * (f * t + ph))[..., None]


def _gait(p, geo, t, *, freq, duty, phase0, omega, v_lat, v_fwd, width, lift, heel, q=1.0):
    """Footstep planner: each foot is planted (toe fixed) over a fraction ``duty`` of the cycle
    at the footprint placed under its hip at mid-stance, and swings (lifted by ``lift``) to the
    next one; the heel rises (foot pitch up to ``heel``) in late stance, about the toe."""
    x, z = _root_xz(t, omega, v_lat, v_fwd)
    p["root_x"] += x
    p["root_z"] += z
    p["yaw"] += omega * t
    fwd = geo.toe[2]
    for k, (sgn, off) in enumerate(((1.0, 0.0), (-1.0, 0.5))):
        c = freq * t + phase0 + off
        m = np.floor(c)
        u = c - m
        tm0 = (m + 0.5 * duty - phase0 - off) / freq
        prints = []
        for tm in (tm0, tm0 + 1.0 / freq):
            rx, rz = _root_xz(tm, omega, v_lat, v_fwd)
            psi = omega * tm
            prints.append((rx + sgn * width * np.cos(psi) + fwd * np.sin(psi),
                           rz - sgn * width * np.sin(psi) + fwd * np.cos(psi), psi))
        (x0, z0, y0), (x1, z1, y1) = prints
        s = np.clip((u - duty) / (1.0 - duty), 0.0, 1.0)  # 0 through stance
        e = 0.5 - 0.5 * np.cos(np.pi * s)
        p["toe"][..., k, 0] = x0 + (x1 - x0) * e
        p["toe"][..., k, 2] = z0 + (z1 - z0) * e
        p["toe"][..., k, 1] = lift * np.sin(np.pi * s**q)
        p["foot_yaw"][..., k] = y0 + (y1 - y0) * e
        p["foot_pitch"][..., k] = heel * np.where(
            u < duty, _ss((u - 0.5 * duty) / (0.5 * duty)), 1.0 - _ss(s / 0.5))
    return freq * t + phase0  # the left leg's cycle coordinate


def _arm_swing(p, c, amp, elbow, abd, offset=0.0):
    """Arms swing against the legs: the left arm is ahead when the right foot lands."""
    for k, leg in enumerate((0.5, 0.0)):  # left arm follows the right leg
        sw = amp * np.cos(2 * np.pi * (c + leg - 0.05))
        p["flex"][..., k] = offset + sw
        p["elbow"][..., k] = elbow + 0.4 * np.maximum(sw, 0.0)
        p["abd"][..., k] = abd


def _walk_or_run(p, geo, rng, t, run):
    n = p["root_y"].shape[0]
    d = rng.choice(3, size=n, p=[0.5, 0.25, 0.25]).astype(np.int32)
    sign = np.where(d == 1, 1.0, np.where(d == 2, -1.0, 0.0))[:, None]
    if run:
        lo, hi = 2.0, 3.4
        v = _u(rng, n, lo, hi)
        omega = sign * _u(rng, n, 0.2, 0.45)
        duty = _u(rng, n, 0.34, 0.4)
        freq = 1.2 + 0.12 * v
        c = _gait(p, geo, t, freq=freq, duty=duty, phase0=_u(rng, n, 0, 1), omega=omega,
                  v_lat=0.0, v_fwd=v, width=geo.width * _u(rng, n, 0.7, 0.95),
                  lift=_u(rng, n, 0.14, 0.22), heel=_u(rng, n, 0.5, 0.7), q=0.6)
        p["root_y"] += (geo.h0 - _u(rng, n, 0.04, 0.06)
                        + _u(rng, n, 0.03, 0.05) * np.cos(4 * np.pi * (c - 0.25 - 0.5 * duty)))
        _arm_swing(p, c, _u(rng, n, 0.45, 0.75), _u(rng, n, 1.3, 1.7), 0.15, offset=0.15)
        p["lean"] += _u(rng, n, 0.08, 0.2)
        p["tilt"] += _u(rng, n, 0.0, 0.08)
    else:
        lo, hi = 0.6, 1.5
        v = _u(rng, n, lo, hi)
        omega = sign * _u(rng, n, 0.25, 0.6)
        freq = 0.75 + 0.3 * v
        c = _gait(p, geo, t, freq=freq, duty=_u(rng, n, 0.58, 0.64), phase0=_u(rng, n, 0, 1),
                  omega=omega, v_lat=0.0, v_fwd=v, width=geo.width * _u(rng, n, 0.85, 1.15),
                  lift=_u(rng, n, 0.06, 0.1), heel=_u(rng, n, 0.35, 0.55))
        p["root_y"] += geo.h0 - _u(rng, n, 0.0, 0.02)
        _arm_swing(p, c, _u(rng, n, 0.2, 0.45) * v / 1.2, _u(rng, n, 0.15, 0.35), 0.1)
        p["lean"] += _u(rng, n, 0.0, 0.08)
    return d, _pace(v, lo, hi)


def _walk(p, geo, rng, t):
    return _walk_or_run(p, geo, rng, t, run=False)


def _run(p, geo, rng, t):
    return _walk_or_run(p, geo, rng, t, run=True)


def _jump_or_hop(p, geo, rng, t, hop):
    n = p["root_y"].shape[0]
    lo, hi = 0.75, 1.15
    f = _u(rng, n, lo, hi)
    ff = _u(rng, n, 0.28, 0.38)            # flight fraction of a cycle
    g = 1.0 - ff
    c = f * t + _u(rng, n, 0, 1)
    m = np.floor(c)
    u = c - m
    ground = u < g
    s = np.clip((u - g) / ff, 0.0, 1.0)   # flight progress
    H = _G * (ff / f) ** 2 / 8.0          # ballistic apex
    dip = _u(rng, n, 0.1, 0.2) * np.sin(np.pi * np.minimum(u / g, 1.0))
    hs = geo.h0 - 0.01
    y = np.where(ground, hs - dip, hs + 4.0 * H * s * (1.0 - s))
    p["root_y"] += y
    width = geo.width * _u(rng, n, 1.0, 1.3)
    if hop:
        D = _u(rng, n, 0.3, 0.7)
        p["root_z"] += D * (m + s)
        p["lean"] += _u(rng, n, 0.1, 0.25)
    for k, sgn in enumerate((1.0, -1.0)):
        p["toe"][..., k, 0] = p["root_x"] + sgn * width
        p["toe"][..., k, 2] = p["root_z"] + geo.toe[2]
        p["toe"][..., k, 1] = (np.maximum(y - hs, 0.0)
                               + _u(rng, n, 0.04, 0.12) * np.sin(np.pi * s))
        p["foot_pitch"][..., k] = _u(rng, n, 0.3, 0.6) * np.sin(np.pi * s)
    swing = np.where(ground, -_u(rng, n, 0.3, 0.6) * np.sin(np.pi * np.minimum(u / g, 1.0)),
                     _u(rng, n, 0.6, 1.4) * np.sin(np.pi * s))
    p["flex"][:] = swing[..., None]
    p["abd"][:] = 0.15
    p["elbow"][:] = _u(rng, n, 0.2, 0.5)[..., None]
    p["lean"] += 0.3 * dip / 0.2
    p["tilt"] += 0.3 * dip / 0.2
    rate = (D * f, 0.3 * lo, 0.7 * hi) if hop else (f, lo, hi)
    return np.zeros(n, np.int32), _pace(*rate)


def _jump(p, geo, rng, t):
    return _jump_or_hop(p, geo, rng, t, hop=False)


def _hop(p, geo, rng, t):
    return _jump_or_hop(p, geo, rng, t, hop=True)


def _wave(p, geo, rng, t, side):
    n = p["root_y"].shape[0]
    _stand(p, geo, rng, t)
    k, sgn = (0, 1.0) if side == 1 else (1, -1.0)
    up = _ss((t - _u(rng, n, -0.5, -0.1)) / _u(rng, n, 0.2, 0.4))  # raised within 0.3 s
    A = _u(rng, n, 2.2, 2.6)               # shoulder abduction of the raised arm
    lo, hi = 1.2, 3.0
    fw = _u(rng, n, lo, hi)
    osc = _u(rng, n, 0.25, 0.5) * np.sin(2 * np.pi * (fw * t + _u(rng, n, 0, 1)))
    p["abd"][..., k] = p["abd"][..., k] + up * (A - p["abd"][..., k])
    p["flex"][..., k] = up * _u(rng, n, 0.0, 0.35)
    p["bend"][..., k] = up * (np.pi - A + _u(rng, n, -0.2, 0.1) + osc)
    p["elbow"][..., k] = up * _u(rng, n, 0.0, 0.25)
    p["side"] -= sgn * 0.05 * up
    return np.full(n, side, np.int32), _pace(fw, lo, hi)


def _wave_left(p, geo, rng, t):
    return _wave(p, geo, rng, t, 1)


def _wave_right(p, geo, rng, t):
    return _wave(p, geo, rng, t, 2)


def _squat(p, geo, rng, t):
    n = p["root_y"].shape[0]
    _stand(p, geo, rng, t, width=geo.width * _u(rng, n, 1.4, 2.1), toe_out=_u(rng, n, 0.1, 0.35))
    lo, hi = 0.25, 0.55
    f = _u(rng, n, lo, hi)
    depth = _u(rng, n, 0.2, 0.42)
    drop = depth * np.sin(np.pi * (f * t + _u(rng, n, 0, 1))) ** 2
    p["root_y"] -= drop
    p["root_z"] -= _u(rng, n, 0.2, 0.4) * drop
    p["tilt"] += 1.1 * drop
    p["lean"] += _u(rng, n, 0.2, 0.8) * drop
    p["flex"] += (_u(rng, n, 2.0, 3.5) * drop)[..., None]
    p["elbow"] += (_u(rng, n, 0.0, 0.8) * drop)[..., None]
    return np.zeros(n, np.int32), _pace(f, lo, hi)


def _kick(p, geo, rng, t):
    n = p["root_y"].shape[0]
    _stand(p, geo, rng, t)
    d = rng.integers(1, 3, size=n).astype(np.int32)
    lo, hi = 1.1, 1.7
    P = _u(rng, n, lo, hi)
    tau = t - _u(rng, n, 0.05, 0.5)
    s = np.mod(tau, P) / _u(rng, n, 0.55, 0.8)
    b = np.where((tau >= 0) & (s < 1.0), np.sin(np.pi * np.clip(s, 0, 1)), 0.0)
    H, Z = _u(rng, n, 0.3, 0.55), _u(rng, n, 0.35, 0.65)
    for k in (0, 1):
        kick = (d == k + 1)[:, None]
        p["toe"][..., k, 1] = np.where(kick, H * b, 0.0)
        p["toe"][..., k, 2] = p["toe"][..., k, 2] + np.where(kick, Z * b**3, 0.0)
        p["foot_pitch"][..., k] = np.where(kick, 0.7 * b, 0.0)
        p["flex"][..., k] += np.where(kick, -0.2, 0.5) * b   # the other arm counters
        p["abd"][..., k] += 0.3 * b
    p["root_x"] += np.where(d[:, None] == 1, -1.0, 1.0) * 0.04 * b  # over the support foot
    p["root_y"] -= 0.02 * b
    p["tilt"] -= 0.12 * b
    p["lean"] -= 0.1 * b
    return d, _pace(1.0 / P, 1.0 / hi, 1.0 / lo)


def _punch(p, geo, rng, t):
    n = p["root_y"].shape[0]
    stagger = np.where(rng.random((n, 1)) < 0.5, 1.0, -1.0) * _u(rng, n, 0.04, 0.1)
    _stand(p, geo, rng, t, width=geo.width * _u(rng, n, 1.1, 1.6), stagger=stagger)
    p["root_y"] -= _u(rng, n, 0.02, 0.07)
    d = rng.choice(3, size=n).astype(np.int32)  # 0: alternating, 1: left, 2: right
    first = rng.integers(0, 2, size=(n, 1))
    lo, hi = 0.5, 0.9
    P = _u(rng, n, lo, hi)
    tau = t - _u(rng, n, 0.0, 0.3)
    e = np.floor(tau / P)
    s = np.mod(tau, P) / _u(rng, n, 0.25, 0.4)
    b = np.where((tau >= 0) & (s < 1.0), np.sin(np.pi * np.clip(s, 0, 1) ** 0.7) ** 2, 0.0)
    arm = np.where(d[:, None] == 0, (first + e) % 2, (d[:, None] - 1) * np.ones_like(t))
    g_flex, g_abd, g_el = _u(rng, n, 0.4, 0.7), _u(rng, n, 0.15, 0.35), _u(rng, n, 1.8, 2.3)
    for k in (0, 1):
        bk = np.where(arm == k, b, 0.0)
        p["flex"][..., k] = g_flex + bk * (1.5 - g_flex)
        p["abd"][..., k] = g_abd + bk * (0.05 - g_abd)
        p["elbow"][..., k] = g_el + bk * (0.08 - g_el)
        p["twist"] += (0.3 if k == 1 else -0.3) * bk
    return d, _pace(1.0 / P, 1.0 / hi, 1.0 / lo)


def _sidestep(p, geo, rng, t):
    n = p["root_y"].shape[0]
    d = rng.integers(1, 3, size=n).astype(np.int32)
    lo, hi = 0.2, 0.45
    v = _u(rng, n, lo, hi)
    _gait(p, geo, t, freq=_u(rng, n, 1.0, 1.3), duty=0.55, phase0=_u(rng, n, 0, 1), omega=0.0,
          v_lat=np.where(d[:, None] == 1, v, -v), v_fwd=0.0,
          width=geo.width * _u(rng, n, 1.6, 2.0), lift=_u(rng, n, 0.05, 0.09),
          heel=_u(rng, n, 0.05, 0.2))
    p["root_y"] += geo.h0 - _u(rng, n, 0.02, 0.05)
    p["abd"][:] = _u(rng, n, 0.1, 0.3)[..., None]
    p["elbow"][:] = _u(rng, n, 0.1, 0.5)[..., None]
    return d, _pace(v, lo, hi)


def _turn(p, geo, rng, t, side):
    n = p["root_y"].shape[0]
    lo, hi = 0.6, 1.4
    w = _u(rng, n, lo, hi)
    c = _gait(p, geo, t, freq=_u(rng, n, 0.9, 1.2), duty=0.6, phase0=_u(rng, n, 0, 1),
              omega=w if side == 1 else -w, v_lat=0.0, v_fwd=_u(rng, n, 0.0, 0.15),
              width=geo.width * _u(rng, n, 0.9, 1.2), lift=_u(rng, n, 0.05, 0.08),
              heel=_u(rng, n, 0.05, 0.2))
    p["root_y"] += geo.h0 - _u(rng, n, 0.0, 0.02)
    _arm_swing(p, c, _u(rng, n, 0.05, 0.15), _u(rng, n, 0.1, 0.3), 0.12)
    return np.full(n, side, np.int32), _pace(w, lo, hi)


def _turn_left(p, geo, rng, t):
    return _turn(p, geo, rng, t, 1)


def _turn_right(p, geo, rng, t):
    return _turn(p, geo, rng, t, 2)


_ACTION_FNS = (_walk, _run, _jump, _hop, _wave_left, _wave_right, _squat, _kick, _punch,
               _sidestep, _turn_left, _turn_right)


def _softmin(*v, k=0.015):
    v = np.stack(v)
    lo = v.min(0)
    return lo - k * np.log(np.sum(np.exp(-(v - lo) / k), axis=0))


def _pose(sk: Skeleton, geo: _Geo, p: dict):
    """A plan -> (root_pos (n, T, 3), local_rot (n, T, J, 3, 3)): two-link leg IK onto the
    ankle targets (the pelvis lowered where a foot would be out of reach), arms and torso by
    their angles."""
    n, T = p["yaw"].shape
    i = sk.index
    R0 = _ry(p["yaw"]) @ _rx(p["tilt"]) @ _rz(p["roll"])
    foot = _ry(p["foot_yaw"]) @ _rx(p["foot_pitch"])                   # (n, T, 2, 3, 3)
    ankle = p["toe"] - foot @ geo.toe                                    # (n, T, 2, 3)
    hip = np.einsum("ntij,kj->ntki", R0, geo.hip)                       # (n, T, 2, 3)
    root_xz = np.stack([p["root_x"], np.zeros_like(p["root_x"]), p["root_z"]], -1)
    dh2 = np.sum((ankle - hip - root_xz[:, :, None])[..., [0, 2]] ** 2, -1)
    reach = 0.985 * (geo.l1 + geo.l2)
    ymax = ankle[..., 1] - hip[..., 1] + np.sqrt(np.maximum(reach**2 - dh2, (0.3 * reach) ** 2))
    root = root_xz.copy()
    root[..., 1] = _softmin(p["root_y"], ymax[..., 0], ymax[..., 1])

    rot = np.zeros((n, T, sk.num_joints, 3, 3))
    rot[...] = np.eye(3)
    rot[:, :, 0] = R0
    l1, l2 = geo.l1, geo.l2
    for k, pre in enumerate(("l_", "r_")):
        d = np.einsum("ntji,ntj->nti", R0, ankle[:, :, k] - hip[:, :, k] - root)
        r = np.linalg.norm(d, axis=-1, keepdims=True)
        rc = np.clip(r, 0.05, 0.9995 * (l1 + l2))
        d = d * rc / np.maximum(r, 1e-9)
        rc = rc[..., 0]
        knee = np.pi - np.arccos(np.clip((l1 * l1 + l2 * l2 - rc * rc) / (2 * l1 * l2), -1, 1))
        a_y, a_z = -l1 - l2 * np.cos(knee), -l2 * np.sin(knee)   # ankle at hip = I, knee Rx
        rho = np.sqrt(d[..., 0] ** 2 + d[..., 1] ** 2)
        gamma = np.arctan2(d[..., 0], -d[..., 1])
        theta = np.arctan2(d[..., 2], -rho) - np.arctan2(a_z, a_y)
        Rh = _rz(gamma) @ _rx(theta)
        Rk = _rx(knee)
        rot[:, :, i(pre + "hip")] = Rh
        rot[:, :, i(pre + "knee")] = Rk
        rot[:, :, i(pre + "ankle")] = np.swapaxes(R0 @ Rh @ Rk, -1, -2) @ foot[:, :, k]
    rot[:, :, i("neck")] = _ry(p["twist"]) @ _rx(p["lean"]) @ _rz(p["side"])
    for k, (pre, sgn) in enumerate((("l_", 1.0), ("r_", -1.0))):
        rot[:, :, i(pre + "shoulder")] = _rz(sgn * p["abd"][..., k]) @ _rx(-p["flex"][..., k])
        rot[:, :, i(pre + "elbow")] = _rz(sgn * p["bend"][..., k]) @ _rx(-p["elbow"][..., k])
    return root, rot


def _canonical(sk, root, rot, joints):
    """Rotate and shift each clip so that at frame 0 the root is at the x-z origin, facing +z."""
    th = _facing(np, sk, joints[:, 0])[:, None]                         # (n, 1)
    shift = root[:, :1] * np.array([1.0, 0.0, 1.0])
    rot = rot.copy()
    rot[:, :, 0] = _ry(-th) @ rot[:, :, 0]
    root = _unyaw(np, root - shift, th)
    joints = _unyaw(np, joints - shift[:, :, None], th[..., None])
    return root, rot, joints


# ----------------------------------------------------------------------------- captions

_SUBJECTS = ("a person", "someone", "a man", "a woman")
_SUBJECT_P = (0.55, 0.2, 0.125, 0.125)
_ADVERBS = {0: ("slowly", "gently", "calmly"), 2: ("quickly", "rapidly", "fast")}
_TURN_PHRASES = ("and turns {d}", "while turning {d}", "curving to the {d}",
                 "veering to the {d}")
_SIDES = ("left", "right")
# action -> (phrases naming the side {d}, phrases without it); a "*" entry is the generic
# phrase's extra weight
_PHRASES = {
    "walk": ((), ("walks forward", "walks ahead", "strolls forward", "strolls ahead",
                  "walks")),
    "run": ((), ("runs forward", "jogs forward", "runs ahead", "jogs ahead", "runs")),
    "jump": ((), ("jumps in place", "jumps up and down", "jumps on the spot",
                  "jumps up and down in place", "keeps jumping in place")),
    "hop": ((), ("hops forward", "jumps forward", "bounds forward", "leaps forward",
                 "hops ahead")),
    "wave": (("waves the {d} hand", "waves with the {d} hand", "waves the {d} arm",
              "raises the {d} hand and waves", "waves hello with the {d} hand"),
             ("waves a hand", "waves a hand", "waves hello", "raises a hand and waves")),
    "squat": ((), ("squats down", "squats", "does squats", "crouches down and stands up",
                   "bends the knees and squats")),
    "kick": (("kicks with the {d} leg", "kicks with the {d} foot",
              "kicks forward with the {d} leg"),
             ("kicks forward", "kicks", "does a kick", "kicks the air")),
    "punch": (("punches with the {d} hand", "punches forward with the {d} fist",
               "throws a punch with the {d} hand"),
              ("punches forward", "throws punches", "boxes", "punches the air")),
    "punch_both": ((), ("punches forward", "throws punches", "boxes", "punches the air",
                        "punches with both hands")),
    "sidestep": (("sidesteps to the {d}", "steps sideways to the {d}", "shuffles to the {d}",
                  "moves sideways to the {d}"), ()),
    "turn": (("turns {d}", "turns to the {d}", "turns around to the {d}",
              "turns in place to the {d}", "rotates to the {d}"), ()),
}
_FAMILY = {"wave_left": "wave", "wave_right": "wave", "turn_left": "turn", "turn_right": "turn"}
_SIDE_OF = {"wave_left": 1, "wave_right": 2, "turn_left": 1, "turn_right": 2}


def _grammar_words() -> tuple[tuple[str, ...], int]:
    words = set(_SIDES)
    for s in _SUBJECTS:
        words.update(s.split())
    for adv in _ADVERBS.values():
        words.update(adv)
    longest_phrase = 0
    for named, plain in _PHRASES.values():
        for ph in named + plain:
            words.update(ph.replace("{d}", "left").split())
            longest_phrase = max(longest_phrase, len(ph.split()))
    for ph in _TURN_PHRASES:
        words.update(ph.replace("{d}", "left").split())
    longest = (max(len(s.split()) for s in _SUBJECTS) + 1 + longest_phrase
               + max(len(ph.split()) for ph in _TURN_PHRASES))
    return tuple(sorted(words)), longest


MOTION_WORDS, MOTION_CAPTION_MAX_WORDS = _grammar_words()


def _check_ids(a, name: str, hi: int, n: int | None = None) -> np.ndarray:
    x = np.asarray(a)
    if x.ndim != 1 or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
        raise ValueError(f"{name} must be a 1-D int array, got {x.dtype}{x.shape}")
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} must have the length N={n} of action, got {x.shape[0]}")
    if x.size and (x.min() < 0 or x.max() >= hi):
        raise ValueError(f"{name} must lie in [0, {hi}), got range [{x.min()}, {x.max()}]")
    return x.astype(np.int64)


def motion_captions(
    action: np.ndarray,
    direction: np.ndarray,
    pace: np.ndarray,
    *,
    seed: int | np.random.Generator,
    named_fraction: float = 0.5,
) -> np.ndarray:
    """Captions from a small grammar with synonyms: ``subject [adverb] phrase [adverb] [turn]``.

    E.g. "a person walks forward", "someone quickly strolls ahead and turns left", "a woman
    sidesteps to the right slowly". Subjects: "a person" (55%), "someone", "a man", "a woman".
    An adverb of the pace ("slowly" ... / "quickly" ...) is added to half the slow and fast
    clips. Walks and runs that curve get a turn phrase; sidesteps and turns always name their
    direction. Multimodal by design: for waves (and single-sided kicks and punches) a fraction
    ``named_fraction`` of the captions name the side ("waves the left hand"); the rest come
    from one generic pool shared by both sides ("a person waves a hand"), so the same text
    describes left and right waves alike.

    Args:
      action: (N,) ids into :data:`ACTIONS`.
      direction: (N,) 0 none, 1 left, 2 right: the turn of a walk or run, the side of a kick
        or punch (0 = alternating punches), the way of a sidestep (1 or 2). Ignored for
        waves and turns, whose action names the side.
      pace: (N,) 0 slow, 1 medium, 2 fast.
      seed: numpy seed or Generator.
      named_fraction: probability that a wave / kick / punch caption names its side.

    Returns:
      (N,) numpy array of str, each at most :data:`MOTION_CAPTION_MAX_WORDS` words from
      :data:`MOTION_WORDS`.
    """
    a = _check_ids(action, "action", len(ACTIONS))
    d = _check_ids(direction, "direction", 3, a.shape[0])
    pc = _check_ids(pace, "pace", 3, a.shape[0])
    if not 0.0 <= named_fraction <= 1.0:
        raise ValueError(f"named_fraction must be in [0, 1], got {named_fraction!r}")
    for j in np.flatnonzero((d == 0) & (a == ACTIONS.index("sidestep"))):
        raise ValueError(f"direction[{j}] must be 1 (left) or 2 (right) for a sidestep, got 0")
    rng = np.random.default_rng(seed)
    out = []
    for j in range(a.shape[0]):
        name = ACTIONS[a[j]]
        fam = _FAMILY.get(name, name)
        dj = _SIDE_OF.get(name, d[j])
        if fam == "punch" and dj == 0:
            fam = "punch_both"
        named, plain = _PHRASES[fam]
        if named and (not plain or rng.random() < named_fraction):
            phrase = named[rng.integers(len(named))]
        else:
            phrase = plain[rng.integers(len(plain))]
        side = _SIDES[dj - 1] if dj else ""
        words = [_SUBJECTS[rng.choice(len(_SUBJECTS), p=_SUBJECT_P)]]
        tail = []
        if pc[j] != 1 and rng.random() < 0.5:
            adv = _ADVERBS[int(pc[j])][rng.integers(3)]
            (words if adv.endswith("ly") and rng.random() < 0.5 else tail).append(adv)
        words.append(phrase.replace("{d}", side))
        words += tail
        if fam in ("walk", "run") and dj:
            words.append(_TURN_PHRASES[rng.integers(len(_TURN_PHRASES))].replace("{d}", side))
        out.append(" ".join(words))
    return np.array(out, dtype=str)


# ----------------------------------------------------------------------------- data set


def _check_count(v, name: str, lo: int) -> int:
    if not _is_int(v) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


def motion_dataset(
    n: int,
    *,
    seed: int,
    skeleton: Skeleton | None = None,
    min_frames: int = 40,
    max_frames: int = 120,
    fps: float = 20.0,
    actions: Sequence[str | int] | None = None,
    contact_threshold: float = CONTACT_THRESHOLD,
    named_fraction: float = 0.5,
) -> dict[str, np.ndarray]:
    """Procedural skeleton-motion clips with HumanML3D features, rot6d layout and captions.

    Actions are drawn uniformly from ``actions``, lengths uniformly from
    ``[min_frames, max_frames]``, and each clip's parameters (speed, stride, cadence, amplitude,
    turning rate, side, ...) from its family's ranges. Every clip is in the canonical frame.
    A pure function of the arguments.

    Args:
      n: number of clips N >= 1.
      seed: numpy seed.
      skeleton: default :func:`default_skeleton`; another must have its joints and parents
        (bone lengths may differ).
      min_frames, max_frames: the length range (feature frames), 1 <= min <= max.
      fps: frame rate (Hz).
      actions: names or ids of the families to draw from (default all of :data:`ACTIONS`).
      contact_threshold: see :func:`foot_contacts` (default for 20 fps).
      named_fraction: see :func:`motion_captions`.

    Returns:
      Arrays sharing N, padded with zeros after each clip's length L:

      * ``x`` (N, max_frames, 12 J - 1) float32: raw (unnormalised) features;
      * ``mask`` (N, max_frames) bool, ``length`` (N,) int32: L;
      * ``action`` (N,) int32 into :data:`ACTIONS`; ``side`` (N,) int32: 0 not a wave, 1 left,
        2 right wave; ``direction`` (N,) int32 (see :func:`motion_captions`); ``pace`` (N,)
        int32: 0 slow, 1 medium, 2 fast;
      * ``joints`` (N, max_frames, J, 3) float32: joint frames ``0 .. L-1`` (feature frame
        ``L-1`` also used frame L, which is not stored);
      * ``rot6d`` (N, max_frames, J + 1, 6) float32: :func:`to_rot6d_layout` of frames
        ``0 .. L-1`` (its FK gives ``joints``);
      * ``caption`` (N,) str.
    """
    n = _check_count(n, "n", 1)
    sk = default_skeleton() if skeleton is None else _check_skeleton(skeleton)
    _check_generator_skeleton(sk)
    min_frames = _check_count(min_frames, "min_frames", 1)
    max_frames = _check_count(max_frames, "max_frames", 1)
    if min_frames > max_frames:
        raise ValueError(
            f"min_frames must be <= max_frames, got min_frames={min_frames} > "
            f"max_frames={max_frames}"
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps < math.inf:
        raise ValueError(f"fps must be a number > 0, got {fps!r}")
    thr = _check_threshold(contact_threshold)
    if isinstance(actions, np.ndarray):
        actions = actions.tolist()
    if actions is None:
        pool = np.arange(len(ACTIONS))
    else:
        if isinstance(actions, (str, int)) or not isinstance(actions, Sequence) or not actions:
            raise ValueError(f"actions must be a non-empty sequence of names or ids, got "
                             f"{actions!r}")
        pool = np.array([action_id(a) for a in actions])
    rng = np.random.default_rng(seed)
    act = pool[rng.integers(len(pool), size=n)].astype(np.int32)
    length = rng.integers(min_frames, max_frames + 1, size=n).astype(np.int32)
    mask = np.arange(max_frames)[None] < length[:, None]
    geo = _Geo.of(sk)
    t = (np.arange(max_frames + 1) / float(fps))[None]
    J = sk.num_joints
    out = {
        "x": np.zeros((n, max_frames, sk.feature_dim), np.float32),
        "joints": np.zeros((n, max_frames, J, 3), np.float32),
        "rot6d": np.zeros((n, max_frames, J + 1, 6), np.float32),
    }
    direction = np.zeros(n, np.int32)
    pace = np.zeros(n, np.int32)
    for a in np.unique(act):
        sub = np.random.default_rng([int(seed) & 0xFFFFFFFF, 1 + int(a)])
        group = np.flatnonzero(act == a)
        for start in range(0, len(group), _CHUNK):  # bounded memory, cache-sized arrays
            idx = group[start : start + _CHUNK]
            p = _plan(len(idx), t.shape[1])
            direction[idx], pace[idx] = _ACTION_FNS[a](p, geo, sub, t)
            root, rot = _pose(sk, geo, p)
            joints = _fk(np, sk.parents, sk.offsets, root, rot)
            root, rot, joints = _canonical(sk, root, rot, joints)
            m = mask[idx, :, None]
            out["x"][idx] = _features(np, sk, joints, rot, thr) * m
            out["joints"][idx] = joints[:, :max_frames] * m[..., None]
            out["rot6d"][idx] = _to_layout(np, root[:, :max_frames], rot[:, :max_frames]) * m[
                ..., None]
    side = np.where(act == ACTIONS.index("wave_left"), 1,
                    np.where(act == ACTIONS.index("wave_right"), 2, 0)).astype(np.int32)
    captions = motion_captions(act, direction, pace, seed=np.random.default_rng(
        [int(seed) & 0xFFFFFFFF, 0]), named_fraction=named_fraction)
    return {"x": out["x"], "mask": mask, "length": length, "action": act, "side": side,
            "direction": direction, "pace": pace, "joints": out["joints"],
            "rot6d": out["rot6d"], "caption": captions}


def pad_motions(
    motions: Sequence[np.ndarray], max_frames: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Variable-length clips (L_i, ...) -> zero-padded (N, max_frames, ...), mask, lengths.

    Raises:
      ValueError: a clip longer than ``max_frames``, empty, of another trailing shape, or with
        NaN / inf values.
    """
    max_frames = _check_count(max_frames, "max_frames", 1)
    if isinstance(motions, np.ndarray) or not isinstance(motions, Sequence) or not motions:
        raise ValueError("motions must be a non-empty sequence of (L, ...) arrays")
    arrs = [np.asarray(m) for m in motions]
    tail = arrs[0].shape[1:]
    for i, m in enumerate(arrs):
        if m.ndim < 1 or m.shape[1:] != tail or m.shape[0] < 1:
            raise ValueError(
                f"motions[{i}] must have shape (L >= 1,) + {tail} like motions[0], got {m.shape}"
            )
        if m.shape[0] > max_frames:
            raise ValueError(
                f"motions[{i}] has length {m.shape[0]}, over the maximum max_frames={max_frames}"
            )
        _check_finite(m, f"motions[{i}]")
    length = np.array([m.shape[0] for m in arrs], np.int32)
    x = np.zeros((len(arrs), max_frames) + tail, np.result_type(*arrs))
    for i, m in enumerate(arrs):
        x[i, : m.shape[0]] = m
    return x, np.arange(max_frames)[None] < length[:, None], length


# ----------------------------------------------------------------------------- normalisation


@dataclasses.dataclass(frozen=True, eq=False)
class MotionStats:
    """Per-dimension mean and std of motion features (HumanML3D's Mean.npy / Std.npy).

    Attributes:
      mean: (D,) float32.
      std: (D,) float32, > 0.
    """

    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self):
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if mean.ndim != 1 or std.shape != mean.shape:
            raise ValueError(
                f"mean and std must both have shape (D,), got {mean.shape} and {std.shape}"
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ValueError("mean must be finite and std finite and > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)


def motion_stats(
    x: np.ndarray,
    mask: np.ndarray,
    *,
    feat_bias: float = 1.0,
    layout: FeatureLayout | None = None,
    min_std: float = 1e-3,
) -> MotionStats:
    """Masked mean and std over the valid frames of every clip.

    Args:
      x: (N, F, D) features.
      mask: (N, F) valid frames (at least one).
      feat_bias: > 1 divides the std of the root (yaw velocity, x-z velocity, height) and foot
        contact dims by it, the HumanML3D evaluator convention (5 there), so those dims weigh
        more once normalised.
      layout: where the root and contacts are (default ``FeatureLayout.from_dim(D)``; only used
        when ``feat_bias != 1``, so any D works otherwise, e.g. a flattened rot6d layout).
      min_std: floor of the std (constant dims are left unscaled rather than blown up).

    Returns:
      :class:`MotionStats`.
    """
    x = np.asarray(x)
    mk = np.asarray(mask)
    if x.ndim != 3 or mk.shape != x.shape[:2]:
        raise ValueError(
            f"x must be (N, F, D) and mask (N, F) to match, got {x.shape} and {mk.shape}"
        )
    mk = mk.astype(bool)
    if not mk.any():
        raise ValueError("mask must mark at least one valid frame")
    v = x[mk].astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise ValueError(f"x must be finite on valid frames, got {int(np.sum(~np.isfinite(v)))} "
                         "NaN/inf")
    if not (isinstance(min_std, (int, float)) and min_std > 0):
        raise ValueError(f"min_std must be > 0, got {min_std!r}")
    if not (isinstance(feat_bias, (int, float)) and feat_bias > 0):
        raise ValueError(f"feat_bias must be a number > 0, got {feat_bias!r}")
    mean = v.mean(0)
    std = np.maximum(v.std(0), min_std)
    if feat_bias != 1:
        lay = FeatureLayout.from_dim(x.shape[-1]) if layout is None else layout
        if lay.dim != x.shape[-1]:
            raise ValueError(f"layout must have dim {x.shape[-1]} (x's D), got {lay.dim}")
        std[lay.root] /= feat_bias
        std[lay.contacts] /= feat_bias
    return MotionStats(mean, std)


def _check_stats(x, stats):
    if not isinstance(stats, MotionStats):
        raise TypeError(f"stats must be a MotionStats, got {type(stats).__name__}")
    if np.shape(x)[-1:] != stats.mean.shape:
        raise ValueError(
            f"x must have the stats' feature dim {stats.mean.shape[0]} last, got {np.shape(x)}"
        )


def normalize(x, stats: MotionStats, mask=None):
    """``(x - mean) / std``; padded frames (``mask`` False, (..., F)) set to 0. numpy or jax."""
    _check_stats(x, stats)
    y = (x - stats.mean) / stats.std
    return y if mask is None else y * mask[..., None]


def denormalize(x, stats: MotionStats):
    """``x * std + mean``: raw features from normalised ones. numpy or jax."""
    _check_stats(x, stats)
    return x * stats.std + stats.mean
