"""Super-resolution diffusion and scale distillation (YONOS-SR, Noroozi et al., ECCV 2024).

**The degradation.** A low-resolution input is the high-resolution image ``x`` averaged over
non-overlapping ``s x s`` blocks (area downsampling by the scale factor ``s``) and resized back
to the full size with bicubic interpolation (:func:`degrade`); in latent space it is then
encoded, and the result is concatenated to the noisy latent (the U-Net's extra input channels,
``cond={"image": z_lr}``). Area downsampling composes exactly, ``down_4(x) = down_2(down_2(x))``,
so the x4 input is a deterministic function of the x2 input's low-resolution image: the chain
the analysis below relies on.

**Direct SR training** is :func:`dpm.losses.denoising_loss` with that condition: ``w(lambda_t)
|x_hat(z_t, z_lr, t) - x|^2`` (the paper: v- or x-prediction, truncated-SNR weighting).

**Scale distillation** trains a student at scale ``s`` (e.g. x4) from a teacher at ``s / 2``
(x2, trained first; the student starts as a copy of it). One ``z_t = alpha_t x + sigma_t eps``
is drawn per example and shared by both; the student sees the x4 input, the teacher the x2 input
of the same image, and the student is regressed on the teacher's stop-gradient ``x0`` guess at
the same noise level:

    loss = w(lambda_t) |x_hat_student(z_t, z_lr4, t) - sg[x_hat_teacher(z_t, z_lr2, t)]|^2.

Then the x4 student becomes the teacher of x8, and so on. With a Bayes-optimal teacher the
target is ``E[x | z_t, lr2]``, and because ``lr4`` is a function of ``lr2``, its regression on
``(z_t, lr4)`` is ``E[E[x | z_t, lr2] | z_t, lr4] = E[x | z_t, lr4]`` (the tower property): the
same minimiser as direct training, reached through a target of lower variance (``Var(x | z_t,
lr4) = E Var(x | z_t, lr2) + Var(E[x | z_t, lr2] | z_t, lr4)``, and the distilled target keeps
only the second term). The advantage to expect is faster, more data-efficient convergence, not
a different optimum.

The error is taken in the student's own output space (``x0``, ``eps`` or ``v`` target derived
from the teacher's ``x0`` at the same ``z_t``) and rescaled exactly to the x0-error, as in
:func:`dpm.losses.denoising_loss`, so every weighting of :data:`dpm.losses.WEIGHTINGS` keeps
its meaning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser
from dpm.losses.denoising import (
    TIME_SAMPLERS,
    WEIGHTINGS,
    diffuse,
    log_output_to_x0_scale,
    log_weight,
    output_target,
    sample_time,
)

Array = jax.Array

__all__ = [
    "area_downsample",
    "bicubic_upsample",
    "check_scale",
    "degrade",
    "scale_distillation_loss",
]


def check_scale(scale: Any, size: int | None = None, name: str = "scale") -> int:
    """``scale`` as an int, refusing anything but a power of two >= 1 (and, given ``size``, a
    scale that does not divide it). Returns the scale."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1 or scale & (scale - 1):
        raise ValueError(f"{name} must be a power of two (1, 2, 4, 8, ...); got {scale!r}")
    if size is not None and size % scale:
        raise ValueError(f"{name}={scale} must divide the image size {size}")
    return scale


def area_downsample(x: Array, scale: int) -> Array:
    """``(B, H, W, C) -> (B, H / s, W / s, C)``: the mean of each ``s x s`` block (area
    interpolation at an integer factor). Exact composition: ``area_downsample(x, 4) ==
    area_downsample(area_downsample(x, 2), 2)``."""
    check_scale(scale)
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C) images; got shape {tuple(x.shape)}")
    b, h, w, c = x.shape
    if h % scale or w % scale:
        raise ValueError(f"scale={scale} must divide the image size {(h, w)}")
    if scale == 1:
        return x
    return jnp.mean(x.reshape(b, h // scale, scale, w // scale, scale, c), axis=(2, 4))


def bicubic_upsample(x: Array, scale: int) -> Array:
    """``(B, h, w, C) -> (B, s h, s w, C)``: bicubic interpolation (Keys' kernel, a = -0.5, half-
    pixel centres: ``jax.image.resize(method="cubic")``)."""
    check_scale(scale)
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C) images; got shape {tuple(x.shape)}")
    if scale == 1:
        return x
    b, h, w, c = x.shape
    return jax.image.resize(x, (b, h * scale, w * scale, c), method="cubic")


def degrade(x: Array, scale: int) -> Array:
    """The SR model's input at ``scale``: ``x`` area-downsampled by ``scale`` and bicubic-
    upsampled back to its own size (identity at scale 1)."""
    return bicubic_upsample(area_downsample(x, scale), scale)


def scale_distillation_loss(
    make_student: Callable[[Any], Denoiser],
    *,
    make_teacher: Callable[[Any], Denoiser] | None = None,
    weighting: str = "truncated_snr",
    time_sampler: str | Callable[[Array, int], Array] = "uniform",
    t_min: float = 1e-5,
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> Callable[..., Array]:
    """The per-example scale-distillation loss ``loss(params, batch, key, teacher_params) ->
    (B,)`` (module docstring).

    Args:
      make_student: ``params -> Denoiser`` of the student (any prediction; the paper's are v or
        x). Its condition is ``batch["cond"]`` (e.g. ``{"image": z_lr4}``).
      make_teacher: ``params -> Denoiser`` of the teacher (default ``make_student``: the same
        architecture, the paper's). Its condition is ``batch["teacher_cond"]``; it must share
        the student's schedule.
      weighting: one of :data:`dpm.losses.WEIGHTINGS` on the x0-error (truncated SNR, the
        paper's, by default).
      time_sampler: one of :data:`dpm.losses.TIME_SAMPLERS` or ``(key, n) -> t``.
      t_min: smallest sampled time of the continuous samplers.
      min_snr_gamma, sigma_data: parameters of the ``"min_snr"`` and ``"edm"`` weightings.

    Returns:
      ``loss(params, batch, key, teacher_params)`` with ``batch = {"x": (B, ...) the
      high-resolution data (latents or pixels), "cond": the student's condition,
      "teacher_cond": the teacher's}``. No gradient flows into the teacher.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if not callable(time_sampler) and time_sampler not in TIME_SAMPLERS:
        raise ValueError(f"time_sampler must be one of {TIME_SAMPLERS} or a callable "
                         f"(key, n) -> t; got {time_sampler!r}")
    make_teacher = make_student if make_teacher is None else make_teacher

    def loss(params, batch, key, teacher_params):
        for k in ("x", "cond", "teacher_cond"):
            if k not in batch:
                raise ValueError(f"scale distillation needs batch[{k!r}] (the high-resolution "
                                 "data, the student's and the teacher's conditions); got keys "
                                 f"{sorted(batch)}")
        x0 = batch["x"]
        student = make_student(params).with_cond(batch["cond"])
        teacher = make_teacher(jax.lax.stop_gradient(teacher_params)).with_cond(
            batch["teacher_cond"])
        sched = student.schedule
        if type(teacher.schedule) is not type(sched):
            raise ValueError("the teacher and the student must share one schedule; got "
                             f"{type(teacher.schedule).__name__} and {type(sched).__name__}")
        kt, ke = jax.random.split(key)
        n = x0.shape[0]
        if callable(time_sampler):
            t = jnp.broadcast_to(time_sampler(kt, n), (n,))
        else:
            t = sample_time(kt, n, sched, time_sampler, t_min=t_min)
        eps = jax.random.normal(ke, x0.shape, x0.dtype)
        z_t = diffuse(sched, x0, t, eps).astype(x0.dtype)
        x_til = teacher.x0(z_t, t)
        target = jax.lax.stop_gradient(output_target(student.prediction, sched, z_t, t, x_til))
        out = student.x0(z_t, t) if student.prediction == "both" else student.output(z_t, t)
        mse = jnp.mean(jnp.square(out.astype(jnp.float32) - target).reshape(n, -1), axis=1)
        log_w = log_weight(weighting, sched, t, min_snr_gamma=min_snr_gamma,
                           sigma_data=sigma_data)
        return jnp.exp(log_w + log_output_to_x0_scale(student.prediction, sched, t)) * mse

    return loss
