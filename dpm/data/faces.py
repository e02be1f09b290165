"""Faces that ship inside a pip package: scikit-image's LFW subset."""

from __future__ import annotations

import numpy as np

from dpm.data.transforms import fit_size, to_unit_range

__all__ = [
    "load_lfw_faces",
]


def load_lfw_faces(image_size: int | None = None) -> dict[str, np.ndarray]:
    """The 100 25x25 grayscale faces of ``skimage.data.lfw_subset`` (offline).

    Args:
      image_size: None keeps 25x25; otherwise bilinear resize to this side (e.g. 32).

    Returns:
      ``{"x": (100, S, S, 1) float32 in [-1, 1]}``.
    """
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the other 100 images are not faces
    x = to_unit_range(faces, 0.0, 1.0)[..., None]
    x = np.clip(fit_size(x, image_size, "bilinear", fill=-1.0), -1.0, 1.0)
    return {"x": np.ascontiguousarray(x, np.float32)}
