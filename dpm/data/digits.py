"""scikit-learn's 8x8 handwritten digits (ship inside the scikit-learn wheel)."""

from __future__ import annotations

import numpy as np

from dpm.data.transforms import fit_size, to_unit_range

__all__ = [
    "load_digits",
]


def load_digits(image_size: int = 8, *, method: str = "bilinear") -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, labels 0-9), offline.

    Args:
      image_size: output side; 8 keeps the originals, larger sizes (16, 32) are made by
        bilinear upsampling or by centre-padding with the background value -1.
      method: ``"bilinear"`` or ``"pad"``.

    Returns:
      ``{"x": (1797, S, S, 1) float32 in [-1, 1], "y": (1797,) int32}``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = to_unit_range(bunch.images, 0.0, 16.0)[..., None]
    x = fit_size(x, image_size, method, fill=-1.0)
    return {"x": np.ascontiguousarray(x, np.float32), "y": bunch.target.astype(np.int32)}
