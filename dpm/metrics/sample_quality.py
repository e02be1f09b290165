"""Sample-quality metrics on features: KID, k-NN precision / recall and label adherence.

Host float64 numpy, like ``frechet_distance``: they are evaluated once per run on a few
thousand feature vectors. Features come from a network the caller chooses (in this project a
classifier trained in ``experiments``); nothing here knows of images or networks.
"""

from __future__ import annotations

import numpy as np

__all__ = ["kid", "label_accuracy", "precision_recall"]


def _features(f, name: str, min_n: int = 2) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < min_n or f.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N, D) with N >= {min_n}, D >= 1; got {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError(f"{name} must be finite; got {np.sum(~np.isfinite(f))} non-finite values")
    return f


def _pair(a, b, names: tuple[str, str], min_n: int) -> tuple[np.ndarray, np.ndarray]:
    a = _features(a, names[0], min_n)
    b = _features(b, names[1], min_n)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same D; got {a.shape[1]} and {b.shape[1]}"
        )
    return a, b


def kid(
    f_real: np.ndarray,
    f_fake: np.ndarray,
    *,
    subset_size: int = 1000,
    num_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018) on given features.

    The unbiased MMD^2 estimate with the cubic polynomial kernel
    ``k(x, y) = (x . y / D + 1)^3``, on ``num_subsets`` random subsets of ``m`` real and ``m``
    fake features (each subset drawn without replacement, independently of the others)::

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m - 1)) + sum_{i != j} k(y_i, y_j) / (m (m - 1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2

    Its expectation is the population MMD^2, so it is ~0 (and can be negative) when the two
    distributions agree. The kernel matrices are computed once on the full sets; each subset
    sum is then a quadratic form with a 0/1 indicator.

    Args:
      f_real: (N1, D) features of real data, N1 >= 2.
      f_fake: (N2, D) features of generated samples, N2 >= 2.
      subset_size: ``m``, capped at ``min(N1, N2)``; must be >= 2. At the cap every subset is
        a whole set and ``std`` is 0: choose ``m`` below ``min(N1, N2)`` for a spread.
      num_subsets: number of subsets, >= 2.
      seed: seed of the subset draws (numpy ``default_rng``).

    Returns:
      ``(mean, std)`` of the per-subset MMD^2 estimates (``std`` with ddof=1: the spread of
      one subset's estimate, not the standard error of the mean).
    """
    x, y = _pair(f_real, f_fake, ("f_real", "f_fake"), 2)
    if int(subset_size) != subset_size or subset_size < 2:
        raise ValueError(f"subset_size must be an integer >= 2; got {subset_size!r}")
    if int(num_subsets) != num_subsets or num_subsets < 2:
        raise ValueError(f"num_subsets must be an integer >= 2; got {num_subsets!r}")
    m = min(int(subset_size), x.shape[0], y.shape[0])
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    rng = np.random.default_rng(seed)
    wx = np.zeros((num_subsets, x.shape[0]))
    wy = np.zeros((num_subsets, y.shape[0]))
    for s in range(num_subsets):
        wx[s, rng.choice(x.shape[0], m, replace=False)] = 1.0
        wy[s, rng.choice(y.shape[0], m, replace=False)] = 1.0
    # sum over the subset's block, minus its diagonal
    sxx = np.sum((wx @ kxx) * wx, 1) - wx @ np.diag(kxx)
    syy = np.sum((wy @ kyy) * wy, 1) - wy @ np.diag(kyy)
    sxy = np.sum((wx @ kxy) * wy, 1)
    mmd = (sxx + syy) / (m * (m - 1)) - 2.0 * sxy / m**2
    return float(np.mean(mmd)), float(np.std(mmd, ddof=1))


def _kth_nn_radius(f: np.ndarray, k: int) -> np.ndarray:
    """Distance of each row of ``f`` to its k-th nearest other row."""
    d = _distances(f, f)
    # column 0 of the sorted row is the point itself (distance 0)
    return np.partition(d, k, axis=1)[:, k]


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = np.sum(a**2, 1)[:, None] + np.sum(b**2, 1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2, 0.0))


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) by k-NN manifolds.

    Each set's manifold is the union of balls around its points, each ball's radius the
    distance to that point's k-th nearest neighbour within the same set (the point itself not
    counted). Precision is the fraction of ``fake`` points inside the real manifold (sample
    fidelity); recall the fraction of ``real`` points inside the fake manifold (coverage).
    A point on a ball's boundary counts as inside.

    Args:
      real: (N1, D) real features, N1 > k.
      fake: (N2, D) generated features, N2 > k.
      k: the neighbour defining each ball's radius (3 in the paper).

    Returns:
      ``(precision, recall)``, each in [0, 1].
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1; got {k!r}")
    k = int(k)
    x, y = _pair(real, fake, ("real", "fake"), k + 1)
    r_real = _kth_nn_radius(x, k)
    r_fake = _kth_nn_radius(y, k)
    d = _distances(y, x)  # (N2, N1): fake i to real j
    # small slack against round-off of identical points (distance computed as ~1e-8, not 0)
    tol = 1e-9 * (1.0 + np.max(np.abs(d)))
    precision = np.mean(np.any(d <= r_real[None, :] + tol, axis=1))
    recall = np.mean(np.any(d.T <= r_fake[None, :] + tol, axis=1))
    return float(precision), float(recall)


def label_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Label adherence: the fraction of samples a classifier assigns to their conditioning label.

    Args:
      predicted: (N,) predicted integer labels, or (N, K) class scores (argmax is taken).
      labels: (N,) integer labels the samples were generated with.

    Returns:
      The accuracy, in [0, 1].
    """
    p = np.asarray(predicted)
    t = np.asarray(labels)
    if p.ndim == 2:
        if not np.all(np.isfinite(p)):
            raise ValueError("predicted scores must be finite")
        p = p.argmax(-1)
    if p.ndim != 1 or t.ndim != 1 or p.shape[0] != t.shape[0] or p.shape[0] == 0:
        raise ValueError(
            "predicted must have shape (N,) or (N, K) and labels shape (N,), N >= 1; got "
            f"{np.shape(predicted)} and {np.shape(labels)}"
        )
    if not np.issubdtype(t.dtype, np.integer) or not np.issubdtype(p.dtype, np.integer):
        raise TypeError(
            f"labels and predicted labels must be integers; got {t.dtype} and {p.dtype}"
        )
    return float(np.mean(p == t))
