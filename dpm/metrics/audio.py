"""Mel-spectrogram metrics (jax.numpy, jit-able) for padded batches, and the real-time factor.

Every metric takes a frame mask ``(B, F)`` (non-zero for real frames, zero for padding) and
ignores the padded frames' content entirely (NaN or inf there included).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dpm.metrics.image import gaussian_window

__all__ = ["mel_l1", "mel_sharpness", "mel_ssim", "real_time_factor"]


def _check_mels(pred: jax.Array, target: jax.Array, mask: jax.Array) -> None:
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must share a shape (B, F, n_mels), got {pred.shape}, {target.shape}"
        )
    _check_mask(pred, mask, "pred")


def _check_mask(mel: jax.Array, mask: jax.Array, argument: str) -> None:
    if mel.ndim != 3:
        raise ValueError(f"{argument} must have shape (B, F, n_mels), got {mel.shape}")
    if mask.shape != mel.shape[:2]:
        raise ValueError(f"mask must have shape (B, F) = {mel.shape[:2]}, got {mask.shape}")


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over the last axis of ``values`` where ``valid`` (NaN for a row with none)."""
    total = jnp.sum(jnp.where(valid, values, 0.0), axis=-1)
    return total / jnp.sum(valid, axis=-1).astype(values.dtype)


def mel_l1(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean absolute error per example over the real frames (and all mel bins).

    Args:
      pred: (B, F, n_mels) predicted mel spectrograms.
      target: (B, F, n_mels) reference mel spectrograms.
      mask: (B, F) non-zero for real frames.

    Returns:
      (B,) mean ``|pred - target|`` (NaN for an example without real frames).
    """
    pred, target, mask = jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)
    _check_mels(pred, target, mask)
    dtype = jnp.result_type(pred.dtype, target.dtype, jnp.float32)
    per_frame = jnp.mean(jnp.abs(pred.astype(dtype) - target.astype(dtype)), axis=-1)
    return _masked_mean(per_frame, mask != 0)


def mel_ssim(
    pred: jax.Array,
    target: jax.Array,
    mask: jax.Array,
    *,
    data_range: float,
    win_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> jax.Array:
    """SSIM (Wang et al. 2004) of each mel spectrogram seen as an ``F x n_mels`` image, averaged
    over the windows that lie wholly on real frames.

    The local statistics are those of :func:`dpm.metrics.ssim` (Gaussian window, population
    covariances, no padding), so with every frame real this equals ``ssim(pred[..., None],
    target[..., None], data_range)``. A window touching a padded frame is left out, so padding
    never changes the score.

    Args:
      pred: (B, F, n_mels) predicted mel spectrograms, ``F, n_mels >= win_size``.
      target: (B, F, n_mels) reference mel spectrograms.
      mask: (B, F) non-zero for real frames.
      data_range: max minus min of the value range (e.g. 6.5 for log10 mels in [-5, 1.5]).
      win_size: odd window side (static).
      sigma: Gaussian window standard deviation.
      k1: constant of ``C1 = (k1 * data_range)^2``.
      k2: constant of ``C2 = (k2 * data_range)^2``.

    Returns:
      (B,) mean SSIM (NaN for an example with fewer than ``win_size`` consecutive real frames).
    """
    pred, target, mask = jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask)
    _check_mels(pred, target, mask)
    if min(pred.shape[1:]) < win_size:
        raise ValueError(
            f"mels (F, n_mels) = {pred.shape[1:]} are smaller than win_size={win_size}"
        )
    real = mask != 0
    dtype = jnp.result_type(pred.dtype, target.dtype, jnp.float32)
    x = jnp.where(real[..., None], pred.astype(dtype), 0.0)
    y = jnp.where(real[..., None], target.astype(dtype), 0.0)
    g = gaussian_window(win_size, sigma)
    kernel = jnp.asarray(np.outer(g, g), dtype)[:, :, None, None]
    # mu_x, mu_y, E[x^2], E[y^2], E[xy] in one depthwise convolution
    stacked = jnp.stack([x, y, x * x, y * y, x * y], axis=-1)
    local = jax.lax.conv_general_dilated(
        stacked,
        jnp.tile(kernel, (1, 1, 1, 5)),
        window_strides=(1, 1),
        padding="VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=5,
        precision=jax.lax.Precision.HIGHEST,
    )
    mu_x, mu_y, e_xx, e_yy, e_xy = (local[..., i] for i in range(5))
    var_x = e_xx - mu_x**2
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    # a window (frames i .. i + win_size - 1) counts when all its frames are real
    counts = jnp.cumsum(jnp.pad(real.astype(jnp.int32), ((0, 0), (1, 0))), axis=1)
    whole = (counts[:, win_size:] - counts[:, :-win_size]) == win_size  # (B, F - win_size + 1)
    return _masked_mean(jnp.mean(s, axis=-1), whole)


def mel_sharpness(mel: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    """Mean absolute differences along frequency and time: over-smoothed mels score lower.

    Args:
      mel: (B, F, n_mels) mel spectrograms.
      mask: (B, F) non-zero for real frames.

    Returns:
      ``{"df": (B,), "dt": (B,)}``: ``df`` the mean ``|mel[t, f + 1] - mel[t, f]|`` over real
      frames ``t`` and adjacent bins; ``dt`` the mean ``|mel[t + 1, f] - mel[t, f]|`` over pairs
      of adjacent real frames and all bins.
    """
    mel, mask = jnp.asarray(mel), jnp.asarray(mask)
    _check_mask(mel, mask, "mel")
    mel = mel.astype(jnp.result_type(mel.dtype, jnp.float32))
    real = mask != 0
    df = jnp.mean(jnp.abs(jnp.diff(mel, axis=2)), axis=-1)  # (B, F)
    dt = jnp.mean(jnp.abs(jnp.diff(mel, axis=1)), axis=-1)  # (B, F - 1)
    return {
        "df": _masked_mean(df, real),
        "dt": _masked_mean(dt, real[:, 1:] & real[:, :-1]),
    }


def real_time_factor(seconds: float, num_samples: int, sample_rate: int) -> float:
    """Real-time factor: wall-clock synthesis time over the duration of the audio made.

    Args:
      seconds: wall-clock time spent, >= 0.
      num_samples: number of audio samples produced, > 0.
      sample_rate: samples per second, > 0.

    Returns:
      ``seconds / (num_samples / sample_rate)`` (below 1: faster than real time).
    """
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds must be finite and >= 0, got {seconds!r}")
    if int(num_samples) != num_samples or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if not (math.isfinite(sample_rate) and sample_rate > 0):
        raise ValueError(f"sample_rate must be > 0, got {sample_rate!r}")
    return float(seconds) * float(sample_rate) / float(num_samples)
