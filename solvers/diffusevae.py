"""DiffuseVAE's refiner sampling (Pandey et al., TMLR 2022): any sampler on the shifted
variable ``u = x - offset``, then ``x0 = u_0 + data_shift``.

Formulation 1 is the plain chain with ``xhat`` concatenated; formulation 2 (both the paper's
and the official code's variant) is a plain DDPM on ``u`` (:mod:`dpm.losses.diffusevae`), so
ancestral DDPM, DDIM at any eta and step count, and every other sampler of the project run
unchanged on :func:`~dpm.losses.diffusevae.refiner_denoiser`. The official code's last step
"removes the VAE bias" (subtracts ``xhat``): that is the return to ``x`` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dpm.denoiser import Denoiser
from dpm.losses.diffusevae import FORMULATIONS, offsets
from solvers._common import Array

__all__ = ["diffusevae_sample"]


def diffusevae_sample(
    sampler: Callable[..., Array],
    refiner: Denoiser,
    noise: Array,
    ts: Array,
    formulation: str,
    **options: Any,
) -> Array:
    """DiffuseVAE sampling: ``x_T = offset + noise``, the reverse chain, the final shift.

    Args:
      sampler: a project sampler ``sampler(denoiser, x_T, ts, **options)`` (``ddpm``,
        ``ddim``, ``dpm_solver``, ...).
      refiner: the refiner as a denoiser of ``u``
        (:func:`~dpm.losses.diffusevae.refiner_denoiser`), its ``cond["image"]`` the VAE
        reconstruction ``xhat`` ``(B, H, W, C)`` in [-1, 1].
      noise: ``(B, H, W, C)`` initial noise (``tau * eps``; the official code's temperature
        ``tau`` defaults to 1); share it across samples for the paper's fixed-noise figures.
      ts: the sampler's time grid (from :mod:`solvers.grids`).
      formulation: one of ``FORMULATIONS``, the one ``refiner`` was built and trained with.
      **options: passed to ``sampler`` (``key``, ``eta``, ``order``, ...).

    Returns:
      ``(B, H, W, C)`` samples ``x0``.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}")
    cond = refiner.cond
    if not isinstance(cond, dict) or "image" not in cond:
        raise ValueError("refiner.cond must be a dict with 'image' = xhat; bind it with "
                         "refiner.with_cond({'image': xhat, ...})")
    xhat = cond["image"]
    if xhat.shape != noise.shape:
        raise ValueError(f"refiner.cond['image'] (xhat) must have the shape of noise "
                         f"{noise.shape}; got {xhat.shape}")
    _, data_shift = offsets(xhat, formulation)
    return sampler(refiner, noise, ts, **options) + data_shift.astype(noise.dtype)
