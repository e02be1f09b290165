"""Distribution metrics: Fréchet distance, MMD and sliced Wasserstein.

The Fréchet distance is computed on the host in float64 numpy (it is evaluated once per run
on feature statistics); the others are pure ``jax.numpy`` functions that work under ``jit``.
No feature network lives here: experiments compute features (e.g. with a classifier trained
in the project) and pass them to ``frechet_distance_from_features``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "frechet_distance",
    "frechet_distance_from_features",
    "mmd_rbf",
    "sliced_wasserstein",
]


# --------------------------------------------------------------------------------------------
# Fréchet distance (host, float64)
# --------------------------------------------------------------------------------------------


def _check_stats(mu: np.ndarray, cov: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.asarray(mu, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    if mu.ndim != 1:
        raise ValueError(f"mu{name} must have shape (D,), got {mu.shape}")
    if cov.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"cov{name} must have shape (D, D)=({mu.shape[0]}, {mu.shape[0]}), got {cov.shape}"
        )
    if not np.all(np.isfinite(mu)) or not np.all(np.isfinite(cov)):
        raise ValueError(f"mu{name} and cov{name} must be finite")
    return mu, 0.5 * (cov + cov.T)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    lam, q = np.linalg.eigh(a)
    return (q * np.sqrt(np.clip(lam, 0.0, None))) @ q.T


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between two Gaussians.

    ``d^2 = |mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^{1/2})``, with the trace
    term computed as ``sum(sqrt(eig(S cov2 S)))``, ``S = cov1^{1/2}``: ``S cov2 S`` is
    symmetric PSD and similar to ``cov1 cov2``, so this is stable where a general matrix
    square root (and its imaginary round-off) is not. Float64 numpy.

    Args:
      mu1: (D,) mean of the first Gaussian.
      cov1: (D, D) covariance of the first Gaussian (symmetric PSD).
      mu2: (D,) mean of the second Gaussian.
      cov2: (D, D) covariance of the second Gaussian.

    Returns:
      The distance (a squared quantity, as in FID), clipped at 0 against round-off.
    """
    mu1, cov1 = _check_stats(mu1, cov1, "1")
    mu2, cov2 = _check_stats(mu2, cov2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same shape, got {mu1.shape}, {mu2.shape}")
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_sqrt = np.sum(np.sqrt(np.clip(lam, 0.0, None)))
    d2 = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt
    return float(max(d2, 0.0))


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of features.

    Args:
      f1: (N1, D) features of the first sample, N1 >= 2.
      f2: (N2, D) features of the second sample, N2 >= 2.

    Returns:
      ``frechet_distance`` of the sample means and (unbiased, ddof=1) covariances.
    """
    f1 = np.asarray(f1, dtype=np.float64)
    f2 = np.asarray(f2, dtype=np.float64)
    for name, f in (("f1", f1), ("f2", f2)):
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"{name} must have shape (N, D) with N >= 2, got {f.shape}")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"f1 and f2 must have the same D, got {f1.shape[1]} and {f2.shape[1]}")
    stats = [(f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))) for f in (f1, f2)]
    return frechet_distance(*stats[0], *stats[1])


# --------------------------------------------------------------------------------------------
# Distribution distances on samples (jax.numpy, jit-able)
# --------------------------------------------------------------------------------------------


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """(N, M) squared Euclidean distances."""
    d2 = jnp.sum(a**2, -1)[:, None] + jnp.sum(b**2, -1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d2, 0.0)


def mmd_rbf(x: jax.Array, y: jax.Array, bandwidth: float | jax.Array | None = None) -> jax.Array:
    """Unbiased estimate of MMD^2 with the RBF kernel ``exp(-|a - b|^2 / (2 h^2))``.

    The U-statistic ``mean_{i != j} k(x_i, x_j) + mean_{i != j} k(y_i, y_j)
    - 2 mean_{i, j} k(x_i, y_j)``: its expectation is the population MMD^2, so it can be
    slightly negative when the two distributions agree.

    Args:
      x: (N, D) samples, N >= 2.
      y: (M, D) samples, M >= 2.
      bandwidth: kernel width ``h``; None uses the median heuristic, the median pairwise
        distance within the pooled sample ``[x; y]`` (held constant under ``grad``; its cost
        is a sort of ``(N + M)^2 / 2`` distances).

    Returns:
      Scalar MMD^2 estimate.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have shapes (N, D) and (M, D), got {x.shape}, {y.shape}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"x and y need at least 2 samples each, got N={n}, M={m}")
    dxx, dyy, dxy = _sq_dists(x, x), _sq_dists(y, y), _sq_dists(x, y)
    if bandwidth is None:
        z = jnp.concatenate([x, y])
        iu = np.triu_indices(n + m, k=1)
        h = jnp.median(jnp.sqrt(_sq_dists(z, z)[iu]))
        h = jax.lax.stop_gradient(jnp.where(h > 0, h, 1.0))
    else:
        h = jnp.asarray(bandwidth, dtype=x.dtype)
    gamma = 1.0 / (2.0 * h**2)
    kxx = jnp.exp(-gamma * dxx)
    kyy = jnp.exp(-gamma * dyy)
    kxy = jnp.exp(-gamma * dxy)
    # k(a, a) = 1 on the diagonals
    term_xx = (jnp.sum(kxx) - n) / (n * (n - 1))
    term_yy = (jnp.sum(kyy) - m) / (m * (m - 1))
    return term_xx + term_yy - 2.0 * jnp.mean(kxy)


def sliced_wasserstein(
    x: jax.Array, y: jax.Array, key: jax.Array, num_projections: int = 128, p: int = 2
) -> jax.Array:
    """Monte-Carlo sliced p-Wasserstein distance between two equal-size empirical samples.

    ``SW_p = (mean_theta W_p^p(theta . x, theta . y))^{1/p}`` with ``theta`` uniform on the
    unit sphere; each 1-D ``W_p`` pairs the sorted projections.

    Args:
      x: (N, D) samples.
      y: (N, D) samples.
      key: PRNG key for the projection directions.
      num_projections: number of random directions (static).
      p: order of the Wasserstein distance (static).

    Returns:
      Scalar ``SW_p`` (a distance, not its p-th power).
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 2 or x.shape != y.shape:
        raise ValueError(f"x and y must both have shape (N, D), got {x.shape}, {y.shape}")
    if num_projections <= 0 or p <= 0:
        raise ValueError(f"num_projections and p must be > 0, got {num_projections}, {p}")
    theta = jax.random.normal(key, (num_projections, x.shape[1]), dtype=x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
    px = jnp.sort(x @ theta.T, axis=0)
    py = jnp.sort(y @ theta.T, axis=0)
    return jnp.mean(jnp.abs(px - py) ** p) ** (1.0 / p)
