"""Image array helpers shared by the image sources: resizing and value-range mapping."""

from __future__ import annotations

import numpy as np

__all__ = [
    "fit_size",
    "resize_images",
    "to_unit_range",
]

def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of antialiased linear interpolation (half-pixel centres)."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the triangle when shrinking (antialiasing)
    centre = (np.arange(n_out) + 0.5) * scale
    src = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centre[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of NHWC images, antialiased when shrinking (as Pillow's BILINEAR).

    Args:
      images: (N, H, W, C) float array.
      size: output side, or ``(height, width)``.

    Returns:
      (N, size_h, size_w, C) float32.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
    h_out, w_out = (size, size) if isinstance(size, (int, np.integer)) else size
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"size must be positive, got {size}")
    n, h, w, c = images.shape
    a_h = _resize_matrix(h, h_out).astype(np.float32)
    a_w = _resize_matrix(w, w_out).astype(np.float32)
    rows = np.matmul(a_h, images.astype(np.float32).reshape(n, h, w * c))  # (n, h_out, w*c)
    return np.matmul(a_w, rows.reshape(n, h_out, w, c))  # (n, h_out, w_out, c)


def to_unit_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto ``[-1, 1]``, float32."""
    return (2.0 * (np.asarray(x, np.float64) - lo) / (hi - lo) - 1.0).astype(np.float32)


def fit_size(images: np.ndarray, image_size: int | None, method: str, fill: float) -> np.ndarray:
    """Resize (``"bilinear"``) or centre-pad with ``fill`` (``"pad"``) square NHWC images."""
    if image_size is None or image_size == images.shape[1] == images.shape[2]:
        return images
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    if method == "bilinear":
        return resize_images(images, image_size)
    if method == "pad":
        h, w = images.shape[1:3]
        if image_size < max(h, w):
            raise ValueError(
                f"image_size={image_size} is smaller than the images ({h}x{w}); "
                "method='pad' cannot shrink, use method='bilinear'"
            )
        top, left = (image_size - h) // 2, (image_size - w) // 2
        pad = ((0, 0), (top, image_size - h - top), (left, image_size - w - left), (0, 0))
        return np.pad(images, pad, constant_values=fill)
    raise ValueError(f"method must be 'bilinear' or 'pad', got {method!r}")
