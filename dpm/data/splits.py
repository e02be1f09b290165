"""Deterministic train / test splits of in-memory data sets."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["train_test_split"]


def train_test_split(
    data: Mapping[str, np.ndarray], test_fraction: float, *, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split a data set (dict of arrays sharing the leading N) into disjoint train and test parts.

    The split is a pure function of ``(N, test_fraction, seed)``: a seeded permutation, its
    first ``round(test_fraction * N)`` indices (kept in ascending order) form the test part.

    Args:
      data: dict of arrays with a shared leading dimension N.
      test_fraction: in ``[0, 1)``; 0 returns all of ``data`` as train and an empty test part.
      seed: numpy seed of the permutation.

    Returns:
      ``(train, test)``: dicts with the same keys, ``N - n_test`` and ``n_test`` rows.
    """
    if not data:
        raise ValueError("data must be a non-empty dict of arrays")
    sizes = {k: len(v) for k, v in data.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"data arrays must share the leading dimension, got sizes {sizes}")
    if not 0.0 <= float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    n_test = int(round(float(test_fraction) * n))
    perm = np.random.default_rng(seed).permutation(n)
    test_idx, train_idx = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    train = {k: np.asarray(v)[train_idx] for k, v in data.items()}
    test = {k: np.asarray(v)[test_idx] for k, v in data.items()}
    return train, test
