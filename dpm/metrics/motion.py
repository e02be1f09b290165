"""Text-to-motion metrics (the Guo et al. 2022 protocol) and physical plausibility checks.

The protocol's metrics act on embeddings from a text encoder and a motion encoder trained
contrastively (in this project by the experiment; real users may pass the Guo et al.
evaluators' outputs): R-precision among a pool of 32, MM-Dist (matching score), diversity
and multimodality. FID and KID in the motion-embedding space are
:func:`dpm.metrics.frechet_distance_from_features` and :func:`dpm.metrics.kid`.

The physics checks act on joint positions (after forward kinematics) with frame masks:
the foot-skate ratio and the bone-length variance. Padded frames change no metric.

Host float64 numpy, like the other metrics evaluated once per run. Random draws use
``numpy.random.default_rng(seed)``, so a result is a pure function of its inputs and seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "bone_length_variance",
    "diversity",
    "foot_skate_ratio",
    "matching_score",
    "mm_dist",
    "multimodality",
    "r_precision",
]


def _finite(x, name: str, ndim: int, shape_doc: str, min_shape: Sequence[int]) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != ndim or any(s < m for s, m in zip(x.shape, min_shape, strict=True)):
        dims = zip(shape_doc.split(", "), min_shape, strict=True)
        limits = ", ".join(f"{d} >= {m}" for d, m in dims)
        raise ValueError(f"{name} must have shape ({shape_doc}) with {limits}; got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite; got {np.sum(~np.isfinite(x))} non-finite values")
    return x


def _matched(text_emb, motion_emb, min_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    t = _finite(text_emb, "text_emb", 2, "N, E", (min_n, 1))
    m = _finite(motion_emb, "motion_emb", 2, "N, E", (min_n, 1))
    if t.shape != m.shape:
        raise ValueError(
            f"text_emb and motion_emb must have the same shape (N, E) (row i of each is the "
            f"same pair); got {t.shape} and {m.shape}"
        )
    return t, m


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# the Guo et al. protocol on embeddings
# --------------------------------------------------------------------------------------------


def r_precision(
    text_emb: np.ndarray,
    motion_emb: np.ndarray,
    *,
    pool: int = 32,
    top_k: Sequence[int] = (1, 2, 3),
    seed: int = 0,
) -> dict[str, float]:
    """R-precision: how often a text's own motion ranks in the top k of a pool by distance.

    As Guo et al.'s evaluation: the N pairs are shuffled and split into groups of ``pool``
    (the last ``N mod pool`` pairs are left out, as their loader's ``drop_last``); within a
    group each text ranks the group's motions by Euclidean distance, and a hit at k means its
    own motion is among the k nearest. Ties count against the text (the rank of the true
    motion counts the other motions at a distance no greater), so a collapsed encoder scores
    0, not 1; chance level is ``k / pool``.

    Args:
      text_emb: (N, E) text embeddings, N >= pool.
      motion_emb: (N, E) motion embeddings; row i belongs to text i.
      pool: group size (32 in the protocol), >= 2.
      top_k: cut-offs, ints in ``[1, pool]``.
      seed: seed of the shuffle.

    Returns:
      ``{"top{k}": fraction of hits at k}`` for each k, as Python floats.
    """
    pool = _count(pool, "pool", 2)
    t, m = _matched(text_emb, motion_emb)
    n = t.shape[0]
    if n < pool:
        raise ValueError(f"r_precision needs N >= pool={pool} pairs; got N={n}")
    ks = tuple(top_k)
    if not ks or any(
        isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= pool for k in ks
    ):
        raise ValueError(f"top_k must hold ints in [1, pool={pool}]; got {ks}")
    groups = np.random.default_rng(seed).permutation(n)[: n // pool * pool].reshape(-1, pool)
    ranks = []
    for g in groups:
        d = np.linalg.norm(t[g][:, None, :] - m[g][None, :, :], axis=-1)  # (pool, pool)
        ranks.append(np.sum(d <= np.diag(d)[:, None], axis=1) - 1)  # other motions as near
    ranks = np.concatenate(ranks)
    return {f"top{int(k)}": float(np.mean(ranks < k)) for k in ks}


def mm_dist(text_emb: np.ndarray, motion_emb: np.ndarray) -> float:
    """MM-Dist (matching score): the mean Euclidean distance between matched embeddings.

    ``mean_i |text_emb[i] - motion_emb[i]|`` over all N pairs (Guo et al.'s code averages over
    the same shuffled groups as :func:`r_precision`, leaving out the last ``N mod 32``).

    Args:
      text_emb: (N, E) text embeddings, N >= 1.
      motion_emb: (N, E) motion embeddings; row i belongs to text i.

    Returns:
      The mean distance, a Python float.
    """
    t, m = _matched(text_emb, motion_emb)
    return float(np.mean(np.linalg.norm(t - m, axis=1)))


matching_score = mm_dist


def diversity(features: np.ndarray, *, num_pairs: int = 300, seed: int = 0) -> float:
    """Diversity: the mean Euclidean distance between random pairs of motion embeddings.

    As Guo et al.: two independent draws of ``num_pairs`` indices, each without replacement,
    paired in order (a sample may meet itself, at distance 0, as in their code).

    Args:
      features: (N, E) motion embeddings, N >= num_pairs.
      num_pairs: number of pairs (300 in the protocol).
      seed: seed of the draws.

    Returns:
      The mean distance, a Python float.
    """
    num_pairs = _count(num_pairs, "num_pairs", 1)
    f = _finite(features, "features", 2, "N, E", (1, 1))
    if f.shape[0] < num_pairs:
        raise ValueError(f"diversity needs N >= num_pairs={num_pairs}; got N={f.shape[0]}")
    rng = np.random.default_rng(seed)
    first = rng.choice(f.shape[0], num_pairs, replace=False)
    second = rng.choice(f.shape[0], num_pairs, replace=False)
    return float(np.mean(np.linalg.norm(f[first] - f[second], axis=1)))


def multimodality(features: np.ndarray, *, num_pairs: int = 10, seed: int = 0) -> float:
    """Multimodality: the mean distance between generations of the same prompt.

    As Guo et al.: two independent draws of ``num_pairs`` replicate indices (each without
    replacement, shared by all prompts), paired in order; the distance is averaged over pairs
    and prompts. The protocol uses R = 30 generations per prompt and 10 pairs.

    Args:
      features: (P, R, E) motion embeddings of R generations for each of P prompts,
        R >= num_pairs.
      num_pairs: number of pairs per prompt.
      seed: seed of the draws.

    Returns:
      The mean distance, a Python float (0 when every prompt's generations coincide).
    """
    num_pairs = _count(num_pairs, "num_pairs", 1)
    f = _finite(features, "features", 3, "P, R, E", (1, 1, 1))
    if f.shape[1] < num_pairs:
        raise ValueError(
            f"multimodality needs R >= num_pairs={num_pairs} generations per prompt; "
            f"got features of shape {f.shape}"
        )
    rng = np.random.default_rng(seed)
    first = rng.choice(f.shape[1], num_pairs, replace=False)
    second = rng.choice(f.shape[1], num_pairs, replace=False)
    return float(np.mean(np.linalg.norm(f[:, first] - f[:, second], axis=-1)))


# --------------------------------------------------------------------------------------------
# physics checks on joint positions
# --------------------------------------------------------------------------------------------


def _joints_and_mask(joints, mask) -> tuple[np.ndarray, np.ndarray]:
    x = _finite(joints, "joints", 4, "N, F, J, 3", (1, 1, 1, 3))
    if x.shape[3] != 3:
        raise ValueError(f"joints must have shape (N, F, J, 3); got {x.shape}")
    mk = np.asarray(mask)
    if mk.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape (N, F)={x.shape[:2]}; got {mk.shape}")
    if mk.dtype != bool:
        if not np.all((mk == 0) | (mk == 1)):
            raise ValueError(f"mask must be boolean (or 0/1); got values of dtype {mk.dtype}")
        mk = mk.astype(bool)
    return x, mk


def foot_skate_ratio(
    joints: np.ndarray,
    mask: np.ndarray,
    feet: Sequence[int],
    *,
    fps: float = 20.0,
    up_axis: int = 1,
    height_threshold: float = 0.05,
    speed_threshold: float = 0.5,
) -> dict[str, float]:
    """Foot skating: how often a foot on the ground slides.

    Definitions, per foot joint and per step between consecutive valid frames ``f, f+1`` (both
    in the mask): the foot is *on the ground* when its height (coordinate ``up_axis``, ground
    at 0) is below ``height_threshold`` in both frames; its *horizontal speed* is the norm of
    its displacement in the two other coordinates times ``fps``; the step *skates* when the
    foot is on the ground and that speed exceeds ``speed_threshold``. The defaults (5 cm,
    0.5 m/s = 2.5 cm per frame at 20 fps) are the usual ones for metre units.

    Args:
      joints: (N, F, J, 3) joint positions.
      mask: (N, F) valid frames (bool or 0/1).
      feet: indices of the foot joints (e.g. ankles and toes), distinct, in ``[0, J)``.
      fps: frame rate.
      up_axis: the vertical coordinate (1 = y-up, as HumanML3D).
      height_threshold: ground-contact height.
      speed_threshold: skating speed (units per second).

    Returns:
      ``{"ratio": skating steps / ground-contact steps, "mean_speed": mean horizontal foot
      speed over the ground-contact steps (0 for planted feet), "num_contacts": the number of
      ground-contact steps}``; ``ratio`` and ``mean_speed`` are NaN when there is none.
    """
    x, mk = _joints_and_mask(joints, mask)
    j = x.shape[2]
    feet = list(feet)
    if (
        not feet
        or any(isinstance(k, bool) or not isinstance(k, int | np.integer) for k in feet)
        or len(set(feet)) != len(feet)
        or not all(0 <= k < j for k in feet)
    ):
        raise ValueError(f"feet must be distinct joint indices in [0, J={j}); got {feet}")
    if up_axis not in (0, 1, 2):
        raise ValueError(f"up_axis must be 0, 1 or 2; got {up_axis!r}")
    for name, v in (("fps", fps), ("speed_threshold", speed_threshold)):
        if not (np.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number; got {v!r}")
    if not np.isfinite(height_threshold):
        raise ValueError(f"height_threshold must be finite; got {height_threshold!r}")
    p = x[:, :, feet]  # (N, F, K, 3)
    step = (mk[:, 1:] & mk[:, :-1])[:, :, None]  # (N, F-1, 1)
    low = p[..., up_axis] < height_threshold
    contact = step & low[:, 1:] & low[:, :-1]  # (N, F-1, K)
    horizontal = [a for a in range(3) if a != up_axis]
    speed = np.linalg.norm(np.diff(p[..., horizontal], axis=1), axis=-1) * fps  # (N, F-1, K)
    num = int(np.sum(contact))
    if num == 0:
        return {"ratio": float("nan"), "mean_speed": float("nan"), "num_contacts": 0}
    return {
        "ratio": float(np.sum(contact & (speed > speed_threshold)) / num),
        "mean_speed": float(np.sum(np.where(contact, speed, 0.0)) / num),
        "num_contacts": num,
    }


def bone_length_variance(joints: np.ndarray, mask: np.ndarray, parents: Sequence[int]) -> float:
    """Bone-length variance: how far the skeleton stretches over time (0 when rigid).

    For every clip and bone ``(parents[j], j)``, the (population) variance of the bone's
    length over the clip's valid frames; the result is the mean over bones and over the clips
    with at least one valid frame.

    Args:
      joints: (N, F, J, 3) joint positions.
      mask: (N, F) valid frames (bool or 0/1); at least one clip must have a valid frame.
      parents: (J,) parent index of each joint, -1 for a root (at least one bone).

    Returns:
      The mean variance (squared length units), a Python float.
    """
    x, mk = _joints_and_mask(joints, mask)
    j = x.shape[2]
    par = np.asarray(parents)
    if (
        par.shape != (j,)
        or not np.issubdtype(par.dtype, np.integer)
        or np.any(par < -1)
        or np.any(par >= j)
        or np.any(par == np.arange(j))
    ):
        raise ValueError(
            f"parents must be ({j},) integers in [-1, J={j}), none its own parent; got {parents}"
        )
    child = np.flatnonzero(par >= 0)
    if child.size == 0:
        raise ValueError(f"parents must define at least one bone (a parent >= 0); got {parents}")
    n_valid = mk.sum(axis=1)  # (N,)
    if not np.any(n_valid):
        raise ValueError("mask has no valid frame")
    length = np.linalg.norm(x[:, :, child] - x[:, :, par[child]], axis=-1)  # (N, F, B)
    w = mk[:, :, None].astype(np.float64)
    keep = n_valid > 0
    mean = np.sum(w * length, axis=1)[keep] / n_valid[keep, None]  # (N', B)
    var = np.sum(w[keep] * (length[keep] - mean[:, None, :]) ** 2, axis=1) / n_valid[keep, None]
    return float(np.mean(var))
