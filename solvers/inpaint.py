"""Inpainting with any sampler: the clean context channels ride in the condition, the sample is
pasted back into the target outside the mask (REFace's inference, Paint-by-Example's paste)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like

Array = jax.Array

__all__ = ["inpaint", "paste_back"]


def paste_back(x: Array, target: Array, keep: Array) -> Array:
    """``keep * target + (1 - keep) * x``: the target's pixels where ``keep = 1`` (exactly, for
    a binary mask), the generated ones inside the region.

    Args:
      x: ``(B, H, W, C)`` generated images.
      target: ``(B, H, W, C)`` the images they are pasted into.
      keep: ``(B, H, W, 1)`` (or ``(B, H, W, C)``) mask, 1 = kept from the target.
    """
    if x.shape != target.shape:
        raise ValueError(f"x and target must have one shape, got {x.shape} and {target.shape}")
    if keep.ndim != x.ndim or keep.shape[:-1] != x.shape[:-1] or keep.shape[-1] not in (
        1, x.shape[-1]
    ):
        raise ValueError(f"keep must have shape {(*x.shape[:-1], 1)}, got {keep.shape}")
    return jnp.where(keep > 0.5, target, x) if keep.dtype == jnp.bool_ else (
        keep * target + (1.0 - keep) * x
    )


def inpaint(
    sampler: Callable[..., Array],
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    target: Array,
    keep: Array,
    decode: Callable[[Array], Array] | None = None,
    start_from: Array | None = None,
    key: Array | None = None,
    **options: Any,
) -> Array:
    """Sample the masked region and paste it back into the target.

    Args:
      sampler: any sampler of :mod:`solvers` (e.g. ``solvers.ddim``).
      denoiser: the inpainting denoiser with its condition bound (masked target, mask, context;
        wrap it with :func:`dpm.classifier_free_guidance` for guidance).
      x_T: ``(B, ...)`` noise at ``ts[0]``.
      ts: the sampler's descending grid.
      target: ``(B, H, W, C)`` the target images (pixels).
      keep: ``(B, H, W, 1)`` 1 = kept from the target.
      decode: latent -> image for latent models (default: pixel mode).
      start_from: ``(B, ...)`` an image (latent) to start from instead of pure noise: the start
        is ``alpha(ts[0]) start_from + sigma(ts[0]) x_T`` (REFace's ``target_start_noise_t``).
      key: the sampler's key.
      **options: the sampler's options.

    Returns:
      ``(B, H, W, C)`` the pasted images.
    """
    if start_from is not None:
        if start_from.shape != x_T.shape:
            raise ValueError(f"start_from must have the shape of x_T {x_T.shape}, got "
                             f"{start_from.shape}")
        t0 = jnp.asarray(ts)[0]
        sched = denoiser.schedule
        x_T = expand_like(sched.alpha(t0), x_T) * start_from + expand_like(sched.sigma(t0),
                                                                           x_T) * x_T
    z = sampler(denoiser, x_T, ts, key=key, **options)
    x = decode(z) if decode is not None else z
    return paste_back(x, target, keep)
