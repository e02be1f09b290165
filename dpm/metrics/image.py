"""Image fidelity metrics (jax.numpy, jit-able): PSNR and SSIM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gaussian_window", "psnr", "ssim"]


def psnr(x: jax.Array, y: jax.Array, data_range: float) -> jax.Array:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)``.

    Args:
      x: (N, ...) images, e.g. NHWC.
      y: (N, ...) reference images, same shape.
      data_range: max minus min of the value range (2 for images in [-1, 1]).

    Returns:
      (N,) PSNR in dB (``inf`` for identical images).
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"x and y must share a shape (N, ...), got {x.shape}, {y.shape}")
    mse = jnp.mean((x - y) ** 2, axis=tuple(range(1, x.ndim)))
    return 10.0 * jnp.log10(data_range**2 / mse)


def gaussian_window(win_size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian window of length ``win_size`` (odd), float64 numpy."""
    if win_size <= 0 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    r = np.arange(win_size) - (win_size - 1) / 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def ssim(
    x: jax.Array,
    y: jax.Array,
    data_range: float,
    *,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """Structural similarity (Wang et al. 2004) per image, averaged over channels.

    Local statistics use a Gaussian window (population covariances) over the valid region
    only (no padding): the same numbers as ``skimage.metrics.structural_similarity`` with
    ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=-1``.

    Args:
      x: (N, H, W, C) images, H, W >= ``win_size``.
      y: (N, H, W, C) reference images.
      data_range: max minus min of the value range (2 for images in [-1, 1]).
      win_size: odd window side (static).
      sigma: Gaussian window standard deviation.
      k1: constant of ``C1 = (k1 * data_range)^2``.
      k2: constant of ``C2 = (k2 * data_range)^2``.

    Returns:
      (N,) mean SSIM of each image.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"x and y must share an NHWC shape, got {x.shape}, {y.shape}")
    if min(x.shape[1:3]) < win_size:
        raise ValueError(f"images {x.shape[1:3]} are smaller than win_size={win_size}")
    dtype = jnp.result_type(x.dtype, y.dtype, jnp.float32)
    x = x.astype(dtype)
    y = y.astype(dtype)
    c = x.shape[-1]
    g = gaussian_window(win_size, sigma)
    kernel = jnp.asarray(np.outer(g, g), dtype)[:, :, None, None]
    # mu_x, mu_y, E[x^2], E[y^2], E[xy] in one depthwise convolution
    stacked = jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1)
    local = jax.lax.conv_general_dilated(
        stacked,
        jnp.tile(kernel, (1, 1, 1, 5 * c)),
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=5 * c,
        precision=jax.lax.Precision.HIGHEST,
    )
    mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(local, 5, axis=-1)
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return jnp.mean(s, axis=(1, 2, 3))
