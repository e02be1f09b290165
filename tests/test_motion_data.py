"""Procedural skeleton motion (dpm.data.motion): FK, 6-D rotations, the HumanML3D feature
recipe and its inverse, foot contacts, the data set, captions, normalisation, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpm.data import (
    ACTION_PROMPTS,
    ACTIONS,
    CONTACT_THRESHOLD,
    MOTION_CAPTION_MAX_WORDS,
    MOTION_WORDS,
    CaptionVocab,
    FeatureLayout,
    Skeleton,
    action_id,
    axis_angle_to_matrix,
    default_skeleton,
    denormalize,
    foot_contacts,
    forward_kinematics,
    matrix_to_rot6d,
    motion_captions,
    motion_dataset,
    motion_features,
    motion_stats,
    normalize,
    pad_motions,
    recover_joints,
    rot6d_layout_joints,
    rot6d_to_matrix,
    to_rot6d_layout,
    yaw_matrix,
)

SK = default_skeleton()
J = SK.num_joints
LAY = SK.layout


@pytest.fixture(scope="module")
def data():
    """Every action, short clips (shared by the tests that read a generic data set)."""
    return motion_dataset(72, seed=5, min_frames=20, max_frames=40)


@pytest.fixture(scope="module")
def turning():
    """Clips that turn: turns in place, and walks / runs (half of which curve)."""
    return motion_dataset(24, seed=11, min_frames=30, max_frames=40,
                          actions=("turn_left", "turn_right", "walk", "run"))


def _rest_positions(root):
    """Rest pose by summing offsets along each chain (independent of the FK recursion)."""
    off = np.asarray(SK.offsets)
    out = []
    for j in range(J):
        p, k = np.array(root, float), j
        while k > 0:
            p = p + off[k]
            k = SK.parents[k]
        out.append(p)
    return np.stack(out)


def _batch64(ds):
    """Joints (N, F, J, 3), local rotations (N, F, J, 3, 3) and roots (N, F, 3) in float64
    (the rotations read back from the stored rot6d layout), and the valid-frame mask."""
    P = ds["joints"].astype(np.float64)
    r = ds["rot6d"].astype(np.float64)
    rot = np.asarray(rot6d_to_matrix(jnp.asarray(r[:, :, :J])))
    return P, rot, r[:, :, J, :3]


def _pair_mask(ds):
    """(N, F-1): feature frames k whose joint frames k and k+1 are both stored (k < L-1)."""
    return ds["mask"][:, 1:]


# ------------------------------------------------------------------------- skeleton, FK, 6-D


def test_default_skeleton():
    assert J == 16 and SK.feature_dim == 191 == LAY.dim
    assert [SK.names[i] for i in SK.feet] == ["l_ankle", "l_toe", "r_ankle", "r_toe"]
    assert SK.names[SK.left_wrist] == "l_wrist" and SK.names[SK.right_shoulder] == "r_shoulder"
    sizes = [s.stop - s.start for s in LAY.blocks().values()]
    assert sizes == [1, 2, 1, 3 * (J - 1), 6 * (J - 1), 3 * J, 4] and sum(sizes) == 191
    assert FeatureLayout.from_dim(263).num_joints == 22  # HumanML3D
    hash(SK)  # usable as a static jit argument


def test_fk_rest_pose_gives_bone_lengths():
    root = np.array([0.3, 0.9, -1.2])
    rot = np.broadcast_to(np.eye(3), (J, 3, 3))
    P = np.asarray(forward_kinematics(SK, root, rot))
    par = np.array(SK.parents)
    np.testing.assert_allclose(np.linalg.norm(P[1:] - P[par[1:]], axis=-1),
                               np.linalg.norm(np.asarray(SK.offsets)[1:], axis=-1), atol=1e-6)
    np.testing.assert_allclose(P, _rest_positions(root), atol=1e-6)
    assert abs(P[SK.feet[1], 1] - root[1] + 0.92) < 1e-6  # toes 0.92 m below the pelvis


def test_fk_rotating_the_root_rotates_the_body(x64):
    rng = np.random.default_rng(0)
    local = np.asarray(axis_angle_to_matrix(rng.normal(size=(J, 3))))
    Q = np.asarray(axis_angle_to_matrix(np.array([0.3, -1.1, 0.5])))
    root = rng.normal(size=3)
    P = np.asarray(forward_kinematics(SK, root, local))
    local2 = local.copy()
    local2[0] = Q @ local[0]
    P2 = np.asarray(forward_kinematics(SK, root, local2))
    np.testing.assert_allclose(P2 - root, (P - root) @ Q.T, atol=1e-12)


def test_rotations_round_trip(x64):
    rng = np.random.default_rng(1)
    aa = rng.normal(size=(64, 3)) * 1.5
    R = np.asarray(axis_angle_to_matrix(aa))
    # independent checks of Rodrigues: orthonormal, det 1, axis fixed, angle from the trace
    np.testing.assert_allclose(R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.einsum("nij,nj->ni", R, aa), aa, atol=1e-12)
    np.testing.assert_allclose(np.trace(R, axis1=1, axis2=2),
                               1 + 2 * np.cos(np.linalg.norm(aa, axis=-1)), atol=1e-12)
    six = np.asarray(matrix_to_rot6d(R))
    np.testing.assert_allclose(six, np.concatenate([R[:, :, 0], R[:, :, 1]], -1))  # columns
    np.testing.assert_allclose(np.asarray(rot6d_to_matrix(six)), R, atol=1e-12)
    # any (non-orthonormal) 6-vector maps to a rotation whose first column is a1's direction
    x = rng.normal(size=(64, 6))
    M = np.asarray(rot6d_to_matrix(x))
    np.testing.assert_allclose(np.linalg.det(M), 1.0, atol=1e-12)
    np.testing.assert_allclose(M[:, :, 0], x[:, :3] / np.linalg.norm(x[:, :3], axis=-1,
                                                                      keepdims=True), atol=1e-9)
    np.testing.assert_allclose(np.asarray(yaw_matrix(0.7)) @ [0, 0, 1],
                               [np.sin(0.7), 0, np.cos(0.7)], atol=1e-12)


# ------------------------------------------------------------------------- features


def test_joints_features_joints_round_trip(turning, x64):
    P, rot, _ = _batch64(turning)
    m = _pair_mask(turning)
    x = np.asarray(motion_features(SK, P, rot))                        # (N, F-1, D)
    assert x.shape == P.shape[:1] + (P.shape[1] - 1, 191)
    # the stored (float32) features are these, up to float32 rounding
    cont = slice(0, LAY.contacts.start)
    np.testing.assert_allclose(x[m][:, cont], turning["x"][:, :-1][m][:, cont], atol=2e-4)
    back = np.asarray(recover_joints(x, SK))                           # (N, F-1, J, 3)
    np.testing.assert_allclose(back[m], P[:, :-1][m], atol=1e-5)
    assert np.max(np.abs((x[..., 0] * m).sum(1))) > 2.0  # the set really turns (radians)
    # invariant to a yaw and an x-z shift of the whole clip
    Q = np.asarray(yaw_matrix(1.3))
    rot2 = rot.copy()
    rot2[:, :, 0] = Q @ rot[:, :, 0]
    x2 = np.asarray(motion_features(SK, P @ Q.T + np.array([2.0, 0.0, -0.5]), rot2))
    np.testing.assert_allclose(x2[m], x[m], atol=1e-9)


def test_features_joints_features_round_trip(turning, x64):
    x = turning["x"].astype(np.float64)
    m = _pair_mask(turning)
    N, F = m.shape[0], m.shape[1] + 1
    P = np.asarray(recover_joints(x, SK))                              # (N, F, J, 3)
    rot = np.asarray(rot6d_to_matrix(x[..., LAY.rotations].reshape(N, F, J - 1, 6)))
    x2 = np.asarray(motion_features(SK, P, rot))                       # (N, F-1, D)
    cont = slice(0, LAY.contacts.start)
    np.testing.assert_allclose(x2[m][:, cont], x[:, :-1][m][:, cont], atol=1e-5)
    # contacts agree except where the displacement is within rounding of the threshold
    d = P[:, 1:, list(SK.feet)] - P[:, :-1, list(SK.feet)]
    clear = (np.abs(np.sum(d * d, -1) - CONTACT_THRESHOLD) > 1e-6) & m[..., None]
    np.testing.assert_array_equal(x2[..., LAY.contacts][clear], x[:, :-1, LAY.contacts][clear])


def test_foot_contacts_match_their_definition(data, x64):
    P, rot, _ = _batch64(data)
    m = _pair_mask(data)
    c = np.asarray(motion_features(SK, P, rot, contact_threshold=1e-4))[..., LAY.contacts]
    np.testing.assert_array_equal(np.asarray(foot_contacts(SK, P, threshold=1e-4)), c)
    truth = np.zeros(c.shape)
    for i in range(P.shape[0]):
        for k in range(P.shape[1] - 1):
            for n, j in enumerate(SK.feet):
                truth[i, k, n] = float(np.sum((P[i, k + 1, j] - P[i, k, j]) ** 2) < 1e-4)
    np.testing.assert_array_equal(c[m], truth[m])
    # the stored contacts too, where float32 rounding cannot flip them
    d2 = np.sum((P[:, 1:, list(SK.feet)] - P[:, :-1, list(SK.feet)]) ** 2, -1)
    clear = (np.abs(d2 - 1e-4) > 1e-6) & m[..., None]
    np.testing.assert_array_equal(data["x"][:, :-1, LAY.contacts][clear], truth[clear])
    per_clip = (truth * m[..., None]).sum((1, 2)) / (4 * m.sum(1))
    assert per_clip.min() < 0.7 and per_clip.max() == 1.0  # steps lift feet; standing does not


def test_rot6d_layout_fk_equals_joints(data):
    f = jax.jit(jax.vmap(lambda x: rot6d_layout_joints(SK, x)))
    P = np.asarray(f(jnp.asarray(data["rot6d"])))
    m = data["mask"][..., None, None]
    np.testing.assert_allclose(P * m, data["joints"], atol=1e-5)
    # and to_rot6d_layout inverts it
    _, rot, root = _batch64(data)
    np.testing.assert_allclose(np.asarray(to_rot6d_layout(root, rot)) * m, data["rot6d"],
                               atol=1e-6)


def test_jax_maps_jit_and_grad(turning):
    x = jnp.asarray(turning["x"][0, :30])
    eager = recover_joints(x, SK)
    np.testing.assert_allclose(jax.jit(recover_joints, static_argnums=1)(x, SK), eager,
                               atol=1e-5)
    g = jax.jit(jax.grad(lambda x: jnp.sum(recover_joints(x, SK) ** 2)))(x)
    assert np.all(np.isfinite(g)) and np.any(g[:, LAY.root_rot_vel] != 0)
    r = jnp.asarray(turning["rot6d"][0, :30])
    g = jax.jit(jax.grad(lambda r: jnp.sum(rot6d_layout_joints(SK, r)[:, SK.left_wrist])))(r)
    assert np.all(np.isfinite(g)) and np.any(g != 0)


# ------------------------------------------------------------------------- data set


def test_dataset_shapes_masks_and_determinism(data):
    N, F, D = 72, 40, 191
    shapes = {"x": (N, F, D), "mask": (N, F), "length": (N,), "action": (N,), "side": (N,),
              "joints": (N, F, J, 3), "rot6d": (N, F, J + 1, 6), "caption": (N,)}
    for k, s in shapes.items():
        assert data[k].shape == s, k
    assert data["x"].dtype == data["joints"].dtype == data["rot6d"].dtype == np.float32
    assert data["mask"].dtype == bool and data["length"].dtype == np.int32
    assert data["length"].min() >= 20 and data["length"].max() <= 40
    np.testing.assert_array_equal(data["mask"].sum(1), data["length"])
    np.testing.assert_array_equal(data["mask"][:, 0], True)
    pad = ~data["mask"]
    for k in ("x", "joints", "rot6d"):
        assert np.all(data[k][pad] == 0), k
        assert np.all(np.isfinite(data[k]))
    assert set(data["action"]) == set(range(len(ACTIONS)))
    again = motion_dataset(72, seed=5, min_frames=20, max_frames=40)
    other = motion_dataset(72, seed=6, min_frames=20, max_frames=40)
    for k in data:
        np.testing.assert_array_equal(again[k], data[k])
    assert not np.array_equal(other["x"], data["x"])
    # canonical start: root at the x-z origin, facing +z
    np.testing.assert_allclose(data["joints"][:, 0, 0, [0, 2]], 0, atol=1e-6)
    np.testing.assert_allclose(data["x"][:, 0, 4:7], data["joints"][:, 0, 1],
                               atol=1e-5)  # first ric row is the left hip in the facing frame


def test_bone_lengths_constant(data):
    par = np.array(SK.parents)
    P = data["joints"].astype(np.float64)
    lengths = np.linalg.norm(P[:, :, 1:] - P[:, :, par[1:]], axis=-1)   # (N, F, J-1)
    err = np.abs(lengths - SK.bone_lengths()[1:])[data["mask"]]
    assert err.max() < 1e-5


def test_actions_move_as_named(data):
    x, m = data["x"], data["mask"]

    def mean(a, sl):
        sel = data["action"] == ACTIONS.index(a)
        return (x[sel][..., sl] * m[sel][..., None]).sum((0, 1)) / m[sel].sum()

    assert mean("run", LAY.root_lin_vel)[1] * 20 > mean("walk", LAY.root_lin_vel)[1] * 20 > 0.4
    assert mean("turn_left", LAY.root_rot_vel)[0] > 0.02 > -0.02 > mean("turn_right",
                                                                         LAY.root_rot_vel)[0]
    assert abs(mean("jump", LAY.root_lin_vel)[1]) < 1e-3 < mean("hop", LAY.root_lin_vel)[1]
    sel = data["action"] == ACTIONS.index("squat")
    assert (x[sel][..., 3] + 10 * ~m[sel]).min() < 0.75  # the pelvis goes down


def test_wave_sides_and_shared_generic_caption():
    ds = motion_dataset(200, seed=2, min_frames=20, max_frames=30,
                        actions=("wave_left", "wave_right"))
    assert set(ds["side"]) == {1, 2}
    assert set(ds["action"][ds["side"] == 1]) == {ACTIONS.index("wave_left")}
    m = ds["mask"].astype(float)

    def raise_of(wrist, shoulder):  # mean over valid frames of wrist height above shoulder
        h = ds["joints"][:, :, wrist, 1] - ds["joints"][:, :, shoulder, 1]
        return (h * m).sum(1) / m.sum(1)

    lr = raise_of(SK.left_wrist, SK.left_shoulder)
    rr = raise_of(SK.right_wrist, SK.right_shoulder)
    left, right = ds["side"] == 1, ds["side"] == 2
    assert np.all(lr[left] > 0.15) and np.all(rr[left] < -0.4)
    assert np.all(rr[right] > 0.15) and np.all(lr[right] < -0.4)
    caps = ds["caption"]
    generic = ACTION_PROMPTS["wave"]
    assert generic in set(caps[left]) and generic in set(caps[right])
    for side, word, other in ((left, "left", "right"), (right, "right", "left")):
        assert not any(other in c for c in caps[side])
        named = np.mean([word in c for c in caps[side]])
        assert 0.3 < named < 0.7


def test_captions_grammar():
    rng = np.random.default_rng(0)
    n = 3000
    action = rng.integers(len(ACTIONS), size=n)
    direction = rng.integers(0, 3, size=n)
    sidestep = action == action_id("sidestep")
    direction[sidestep] = rng.integers(1, 3, size=sidestep.sum())
    pace = rng.integers(3, size=n)
    caps = motion_captions(action, direction, pace, seed=0)
    vocab = CaptionVocab(words=CaptionVocab.SPECIALS + MOTION_WORDS)
    vocab.encode(list(caps), max_len=MOTION_CAPTION_MAX_WORDS + 2, strict=True)
    assert max(len(c.split()) for c in caps) <= MOTION_CAPTION_MAX_WORDS
    assert set(ACTION_PROMPTS.values()) <= set(caps) | {ACTION_PROMPTS["sidestep"]}
    for name in ("sidestep", "turn_left", "turn_right"):
        sel = action == action_id(name)
        words = {"turn_left": ["left"] * sel.sum(), "turn_right": ["right"] * sel.sum()}.get(
            name, [("left" if d == 1 else "right") for d in direction[sel]])
        assert all(w in c.split() for w, c in zip(words, caps[sel], strict=True))
    # the generic wave captions do not depend on the side: with the same draws, left and
    # right waves get the same text, except the side word of the named ones
    wl = motion_captions(np.full(400, action_id("wave_left")), direction[:400], pace[:400],
                         seed=1)
    wr = motion_captions(np.full(400, action_id("wave_right")), direction[:400], pace[:400],
                         seed=1)
    named = np.array(["left" in c.split() for c in wl])
    assert 0.4 < named.mean() < 0.6
    np.testing.assert_array_equal(wl[~named], wr[~named])
    assert all("left" not in c.split() and "right" not in c.split() for c in wl[~named])
    np.testing.assert_array_equal(np.char.replace(wl[named], "left", "right"), wr[named])
    np.testing.assert_array_equal(motion_captions(action, direction, pace, seed=0), caps)


# ------------------------------------------------------------------------- normalisation


def test_stats_normalize(data):
    x, mask = data["x"], data["mask"]
    stats = motion_stats(x, mask)
    v = x[mask].astype(np.float64)
    np.testing.assert_allclose(stats.mean, v.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, np.maximum(v.std(0), 1e-3), rtol=1e-5, atol=1e-6)
    junk = x.copy()
    junk[~mask] = 1e3  # padded frames do not count
    s2 = motion_stats(junk, mask)
    np.testing.assert_array_equal(s2.mean, stats.mean)
    xn = normalize(x, stats, mask)
    assert np.all(xn[~mask] == 0)
    np.testing.assert_allclose(xn[mask].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(denormalize(xn, stats)[mask], x[mask], atol=1e-4)
    jx = denormalize(jnp.asarray(xn), stats)  # jax in, jax out
    assert isinstance(jx, jax.Array)
    biased = motion_stats(x, mask, feat_bias=5.0)
    ratio = stats.std / biased.std
    np.testing.assert_allclose(ratio[LAY.root], 5.0, rtol=1e-6)
    np.testing.assert_allclose(ratio[LAY.contacts], 5.0, rtol=1e-6)
    np.testing.assert_allclose(ratio[LAY.positions.start : LAY.contacts.start], 1.0)
    # any D works without feat_bias (e.g. the flattened rot6d layout)
    n, f = mask.shape
    assert motion_stats(data["rot6d"].reshape(n, f, -1), mask).mean.shape == ((J + 1) * 6,)


# ------------------------------------------------------------------------- bad input


def test_bad_input_is_a_clear_error():
    x = np.zeros((10, 190), np.float32)
    with pytest.raises(ValueError, match=r"features must have shape .* 191"):
        recover_joints(x, SK)
    bad = np.zeros((10, 191), np.float32)
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="features must be finite"):
        recover_joints(bad, SK)
    with pytest.raises(ValueError, match=r"motions\[1\] has length 50, over the maximum"):
        pad_motions([np.zeros((30, 191)), np.zeros((50, 191))], max_frames=40)
    with pytest.raises(ValueError, match="min_frames must be <= max_frames"):
        motion_dataset(4, seed=0, min_frames=50, max_frames=40)
    with pytest.raises(ValueError, match="action must be one of"):
        motion_dataset(4, seed=0, actions=("moonwalk",))
    with pytest.raises(ValueError, match=r"action id must be in \[0, 12\)"):
        action_id(12)
    with pytest.raises(ValueError, match=r"action must lie in \[0, 12\)"):
        motion_captions(np.array([3, 12]), np.array([1, 1]), np.array([1, 1]), seed=0)
    with pytest.raises(ValueError, match=r"direction\[0\] must be 1 \(left\) or 2"):
        motion_captions(np.array([action_id("sidestep")]), np.array([0]), np.array([1]), seed=0)
    with pytest.raises(ValueError, match="local_rot must have shape"):
        motion_features(SK, np.zeros((5, J, 3)), np.zeros((5, J - 2, 3, 3)))
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., J\+1=17, 6\)"):
        rot6d_layout_joints(SK, np.zeros((5, J, 6)))
    with pytest.raises(ValueError, match="parents must be -1 for the root"):
        Skeleton(names=("a", "b"), parents=(-1, 1), offsets=np.zeros((2, 3)), feet=(0, 1, 0, 1),
                 left_hip=0, right_hip=1, left_shoulder=0, right_shoulder=1, left_wrist=0,
                 right_wrist=1)
    with pytest.raises(ValueError, match="dim must be 12 J - 1"):
        FeatureLayout.from_dim(190)
    with pytest.raises(ValueError, match="x must have the stats' feature dim 191"):
        normalize(np.zeros((3, 190)), motion_stats(np.ones((1, 2, 191)), np.ones((1, 2))))
