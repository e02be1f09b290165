"""2-D toy data sets and samples of Gaussian mixtures (the analytic oracle's data)."""

from __future__ import annotations

import numpy as np

__all__ = [
    "TOY_2D_NAMES",
    "gaussian_mixture_samples",
    "toy_2d",
    "toy_2d_mixture",
]

TOY_2D_NAMES = ("ring8", "grid25", "two_moons", "swiss_roll")


def toy_2d_mixture(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parameters of the 2-D Gaussian-mixture toy sets, for the analytic oracle.

    ``"ring8"``: 8 components evenly on a circle of radius 2, std 0.1.
    ``"grid25"``: 25 components on the 5x5 grid ``{-2, -1, 0, 1, 2}^2``, std 0.05.

    Args:
      name: ``"ring8"`` or ``"grid25"``.

    Returns:
      ``(means (K, 2), stds (K,), weights (K,))`` float64, weights uniform.
    """
    if name == "ring8":
        theta = 2 * np.pi * np.arange(8) / 8
        means = 2.0 * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
        stds = np.full(8, 0.1)
    elif name == "grid25":
        g = np.arange(-2.0, 3.0)
        means = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
        stds = np.full(25, 0.05)
    else:
        raise ValueError(f"name must be 'ring8' or 'grid25' (mixtures), got {name!r}")
    return means, stds, np.full(len(means), 1.0 / len(means))


def gaussian_mixture_samples(
    means: np.ndarray,
    stds: np.ndarray | float,
    weights: np.ndarray | None,
    n: int,
    *,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact samples of a Gaussian mixture with diagonal covariances.

    Args:
      means: (K, D) component means.
      stds: component standard deviations, broadcastable to (K, D): a scalar, (K,) isotropic
        per component, or (K, D).
      weights: (K,) non-negative mixture weights (normalised here); None for uniform.
      n: number of samples.
      seed: numpy seed.

    Returns:
      ``(x (n, D) float32, y (n,) int32)``: samples and their component index.
    """
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or len(means) == 0:
        raise ValueError(f"means must have shape (K, D) with K >= 1, got {means.shape}")
    k, d = means.shape
    stds = np.asarray(stds, dtype=np.float64)
    if stds.ndim == 1:
        stds = stds[:, None]
    try:
        stds = np.broadcast_to(stds, (k, d))
    except ValueError:
        raise ValueError(
            f"stds must broadcast to (K, D)=({k}, {d}) (scalar, (K,) or (K, D)), got "
            f"shape {np.shape(stds)}"
        ) from None
    if np.any(stds < 0):
        raise ValueError("stds must be >= 0")
    if weights is None:
        weights = np.full(k, 1.0 / k)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (k,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(
            f"weights must be (K,)=({k},) non-negative with a positive sum, got {weights}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=weights / weights.sum())
    x = means[y] + stds[y] * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.int32)


def toy_2d(name: str, n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """2-D toy data set.

    Args:
      name: ``"ring8"``, ``"grid25"`` (mixtures, see ``toy_2d_mixture``), ``"two_moons"``
        (two interleaved half circles, noise std 0.05) or ``"swiss_roll"`` (a 2-D spiral with
        radius in [0.5, 2], noise std 0.05).
      n: number of points.
      seed: numpy seed.

    Returns:
      ``{"x": (n, 2) float32, "y": (n,) int32}``: points and their component (ring8, grid25),
      moon (two_moons) or 0 (swiss_roll).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if name in ("ring8", "grid25"):
        x, y = gaussian_mixture_samples(*toy_2d_mixture(name), n, seed=seed)
        return {"x": x, "y": y}
    rng = np.random.default_rng(seed)
    if name == "two_moons":
        y = rng.integers(0, 2, size=n)
        phi = np.pi * rng.uniform(size=n)
        upper = np.stack([np.cos(phi), np.sin(phi)], axis=-1)
        lower = np.stack([1.0 - np.cos(phi), 0.5 - np.sin(phi)], axis=-1)
        x = np.where(y[:, None] == 0, upper, lower) - np.array([0.5, 0.25])
        x = x + 0.05 * rng.standard_normal((n, 2))
    elif name == "swiss_roll":
        u = rng.uniform(size=n)
        phi = 1.5 * np.pi * (1.0 + 2.0 * u)
        r = 0.5 + 1.5 * u
        x = r[:, None] * np.stack([np.cos(phi), np.sin(phi)], axis=-1)
        x = x + 0.05 * rng.standard_normal((n, 2))
        y = np.zeros(n)
    else:
        raise ValueError(f"name must be one of {TOY_2D_NAMES}, got {name!r}")
    return {"x": x.astype(np.float32), "y": y.astype(np.int32)}
