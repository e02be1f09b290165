"""Spectral image statistics: the high-frequency energy ratio (HFER)."""

from __future__ import annotations

import numpy as np

__all__ = ["HFER_CUTOFF", "hfer"]

# Radial frequency cutoff in cycles per pixel: half of the Nyquist frequency 0.5.
HFER_CUTOFF = 0.25


def hfer(images: np.ndarray) -> np.ndarray:
    """High-frequency energy ratio: the fraction of each image's 2-D FFT power above half-Nyquist.

    Per image: subtract each channel's mean (the DC term carries no structure), take the 2-D
    DFT of each channel, sum the power ``|F(f_y, f_x)|^2`` over channels, and return the share
    of the total power at bins whose radial frequency ``sqrt(f_x^2 + f_y^2)`` (in cycles per
    pixel, ``f = numpy.fft.fftfreq(n)``) is strictly greater than ``0.25`` = half of the
    Nyquist frequency 0.5. Over-sharpened or noisy samples score high; smooth ones low. White
    noise scores on average the share of non-DC bins above the cutoff: 51/63 = 0.81 on 8x8,
    207/255 = 0.81 on 16x16, 1 - pi/16 = 0.80 on a fine grid. A constant image has no non-DC
    power and scores 0.

    Args:
      images: (N, H, W, C) images (any value range; the ratio is scale-free), or (N, H, W).

    Returns:
      (N,) float64 ratios in [0, 1].
    """
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[0] < 1 or min(x.shape[1:3]) < 2:
        raise ValueError(
            f"images must have shape (N, H, W, C) or (N, H, W) with H, W >= 2; "
            f"got {np.shape(images)}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"images must be finite; got {np.sum(~np.isfinite(x))} non-finite values")
    # Parseval: the DFT power of the raw image sums to H W sum(x^2); a residue below 1e-20 of
    # that after removing the mean is round-off of a constant image
    scale = x.shape[1] * x.shape[2] * np.sum(x**2, axis=(1, 2, 3))
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = np.sum(np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2, axis=-1)  # (N, H, W)
    fy = np.fft.fftfreq(x.shape[1])[:, None]
    fx = np.fft.fftfreq(x.shape[2])[None, :]
    high = np.sqrt(fx**2 + fy**2) > HFER_CUTOFF
    total = power.sum(axis=(1, 2))
    high_power = np.sum(power * high, axis=(1, 2))
    ok = total > 1e-20 * scale
    return np.where(ok, high_power / np.where(ok, total, 1.0), 0.0)
