"""Latent consistency distillation (LCD; Luo et al. 2023, "Latent Consistency Models").

A consistency function maps any point of the teacher's probability-flow trajectory to its
start. LCM parameterizes it with a boundary condition on the *integer* training timestep
``tau`` of a discrete DDPM schedule (``alpha_bar_tau = alphas_cumprod[tau]``):

    f(z, tau) = c_skip(tau) z + c_out(tau) x0_hat(z, tau),
    c_skip = sigma_d^2 / ((s tau)^2 + sigma_d^2),   c_out = s tau / sqrt((s tau)^2 + sigma_d^2),

with timestep scaling ``s = 10`` and ``sigma_d = 0.5`` (so ``f(z, 0) = z`` exactly and
``f ~ x0_hat`` for every ``tau >= 1``). This is the convention of LCM's released code and
diffusers' ``LCMScheduler``: ``c_out`` lacks the ``sigma_d`` factor of the consistency-models
paper (diffusers issue #8547); we keep it, so that the LCM scheduler math transfers verbatim.

One training example (one row of the batch):

* ``z0`` a data latent, ``w ~ U[w_min, w_max]`` a guidance strength, an index ``j`` of the
  skipping-step grid ``start = k (j + 1) - 1`` (``k = 20``: 19, 39, ..., 999 for ``N = 1000``),
  ``end = max(start - k, 0)``;
* ``z_start = sqrt(alpha_bar_start) z0 + sqrt(1 - alpha_bar_start) eps``;
* the teacher's guided DDIM step ``start -> end`` on ``x0_w = x0_c + w (x0_c - x0_null)`` and
  the matching ``eps_w`` (LCM's guidance form: classifier-free guidance with scale ``1 + w``),
  inside the same jitted step, the teacher's parameters an argument;
* prediction ``f_theta(z_start, start, w, c)``, target ``f_theta-(z_end, end, w, c)`` of the
  EMA target network (no gradient), distance L2 or pseudo-Huber ``sqrt(d^2 + c^2) - c``.

The student sees ``w`` through its condition (``make_student(params, cond, w)``; LCM embeds it
like a timestep: :func:`guidance_embedding`), so one evaluation per sampling step replaces the
two of guided sampling. Times here are the integer training timesteps of a
:class:`dpm.DiscreteVP`; a Denoiser is evaluated at ``t = (tau + 1) / N``
(:meth:`dpm.DiscreteVP.t_of_index`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser, classifier_free_guidance, expand_like
from dpm.losses.denoising import diffuse
from dpm.losses.progressive import ddim_step
from dpm.schedules import DiscreteVP

Array = jax.Array

__all__ = [
    "DISTANCES",
    "LCDTerms",
    "boundary_coefficients",
    "consistency_function",
    "guidance_embedding",
    "guided_ddim_step",
    "lcd_loss",
    "lcd_terms",
    "pseudo_huber",
    "skipping_timesteps",
]

DISTANCES = ("l2", "huber")


def boundary_coefficients(timestep: Array, *, timestep_scaling: float = 10.0,
                          sigma_data: float = 0.5) -> tuple[Array, Array]:
    """LCM's ``(c_skip, c_out)`` at integer training timesteps ``tau`` (any shape).

    ``c_skip = sigma_d^2 / ((s tau)^2 + sigma_d^2)``, ``c_out = s tau / sqrt((s tau)^2 +
    sigma_d^2)``: ``(1, 0)`` at ``tau = 0``; ``c_skip(1) = 0.0025`` at the defaults.
    """
    tau = timestep_scaling * jnp.asarray(timestep, jnp.float32)
    c_skip = sigma_data**2 / (tau**2 + sigma_data**2)
    c_out = tau / jnp.sqrt(tau**2 + sigma_data**2)
    return c_skip, c_out


def skipping_timesteps(num_train_steps: int = 1000, skip: int = 20) -> np.ndarray:
    """The teacher's DDIM grid of LCD: ``tau_j = skip * j - 1``, ``j = 1 .. N / skip``
    (19, 39, ..., 999 for the defaults), int32, ascending."""
    if isinstance(skip, bool) or not isinstance(skip, int | np.integer) or skip < 1:
        raise ValueError(f"skip must be an int >= 1; got {skip!r}")
    if num_train_steps % skip:
        raise ValueError(f"skip ({skip}) must divide the number of training steps "
                         f"({num_train_steps}): the grid is tau_j = skip * j - 1")
    return (np.arange(1, num_train_steps // skip + 1) * skip - 1).astype(np.int32)


def guidance_embedding(w: Array, dim: int = 256) -> Array:
    """LCM's embedding of the guidance strength: sinusoidal features of ``1000 w``.

    Args:
      w: ``(B,)`` guidance strengths (LCM's ``w``; classifier-free scale ``1 + w``).
      dim: even width >= 4.

    Returns:
      ``(B, dim)`` float32 ``[sin(1000 w f_k), cos(1000 w f_k)]``,
      ``f_k = 10000^(-k / (dim/2 - 1))``.
    """
    if not isinstance(dim, int) or dim < 4 or dim % 2:
        raise ValueError(f"dim must be an even int >= 4; got {dim!r}")
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    arg = 1000.0 * jnp.asarray(w, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def _discrete(schedule) -> DiscreteVP:
    if not isinstance(schedule, DiscreteVP):
        raise TypeError("latent consistency distillation keys everything by integer training "
                        "timesteps: the schedule must be a dpm.DiscreteVP; got "
                        f"{type(schedule).__name__}")
    return schedule


def consistency_function(den: Denoiser, z: Array, timestep: Array, *, boundary: bool = True,
                         timestep_scaling: float = 10.0, sigma_data: float = 0.5) -> Array:
    """``f(z, tau) = c_skip(tau) z + c_out(tau) x0_hat(z, tau)`` (``x0_hat`` alone when
    ``boundary`` is False: the ablation without the boundary parameterization).

    Args:
      den: the network's Denoiser on a :class:`dpm.DiscreteVP` (condition bound).
      z: ``(B, ...)`` noisy latents at ``timestep``.
      timestep: integer training timesteps, scalar or ``(B,)``.

    Returns:
      ``(B, ...)``, the consistency function's estimate of the trajectory's start.
    """
    sched = _discrete(den.schedule)
    x0 = den.x0(z, sched.t_of_index(timestep))
    if not boundary:
        return x0
    c_skip, c_out = boundary_coefficients(timestep, timestep_scaling=timestep_scaling,
                                          sigma_data=sigma_data)
    return (expand_like(c_skip, z) * z + expand_like(c_out, z) * x0).astype(z.dtype)


def guided_ddim_step(teacher: Denoiser, null_cond: Any, z: Array, start: Array, end: Array,
                     w: Array) -> Array:
    """The teacher's guided DDIM step of LCD, ``start -> end`` (integer timesteps):
    ``z_end = sqrt(abar_end) x0_w + sqrt(1 - abar_end) eps_w`` with ``x0_w = x0_c + w (x0_c -
    x0_null)`` and the same combination of ``eps`` (classifier-free guidance at scale
    ``1 + w``; two teacher evaluations). ``end = 0`` lands on ``abar_0``, not on clean data.

    Args:
      teacher: the conditional teacher (its ``cond`` bound).
      null_cond: the unconditional condition, shaped like ``teacher.cond``.
      z: ``(B, ...)`` latents at ``start``; start, end: ``(B,)`` int timesteps; w: ``(B,)``.
    """
    sched = _discrete(teacher.schedule)
    guided = classifier_free_guidance(teacher, 1.0 + jnp.asarray(w), null_cond)
    z_end, _ = ddim_step(guided, z, sched.t_of_index(start), sched.t_of_index(end))
    return z_end


def pseudo_huber(a: Array, b: Array, c: float) -> Array:
    """Per-example mean of ``sqrt((a - b)^2 + c^2) - c`` over all but the leading axis."""
    d = jnp.sqrt(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)) + c * c) - c
    return jnp.mean(d.reshape(d.shape[0], -1), axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LCDTerms:
    """The named per-example terms of one LCD evaluation.

    Attributes:
      distance: ``(B,)`` the consistency loss.
      prediction: ``(B, ...)`` ``f_theta(z_start, start)``: the student's one-step generation
        (RG-LCD rewards it).
      target: ``(B, ...)`` ``f_theta-(z_end, end)`` (no gradient).
      start, end: ``(B,)`` int32 timesteps; w: ``(B,)`` guidance strengths.
    """

    distance: Array
    prediction: Array
    target: Array
    start: Array
    end: Array
    w: Array


def lcd_terms(
    make_student: Callable[[Any, Any, Array], Denoiser],
    make_teacher: Callable[[Any, Any], Denoiser],
    *,
    skip: int = 20,
    w_min: float = 5.0,
    w_max: float = 15.0,
    distance: str = "huber",
    huber_c: float = 0.001,
    boundary: bool = True,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> Callable[..., LCDTerms]:
    """``terms(params, batch, key, teacher_params, target_params) -> LCDTerms``.

    Args:
      make_student: ``(params, cond, w) -> Denoiser`` of the student with ``cond`` and the
        guidance strengths ``w`` (``(B,)``) bound (e.g. ``cond`` plus
        :func:`guidance_embedding` of ``w``); it is also the target network's (with the
        target's parameters). Its schedule must be a :class:`dpm.DiscreteVP`.
      make_teacher: ``(teacher_params, cond) -> Denoiser``, the teacher with ``cond`` bound (same
        schedule).
      skip: ``k``, the skipping step (``N / k``-point teacher grid); any divisor of ``N``.
      w_min, w_max: the range of ``w``, drawn uniformly per example (``w_min = w_max`` fixes it).
      distance: ``"huber"`` (pseudo-Huber with ``huber_c``) or ``"l2"`` (mean squared error).
      boundary: use the boundary parameterization (False: ``f = x0_hat``, an ablation).
      timestep_scaling, sigma_data: of :func:`boundary_coefficients`.

    ``batch = {"x": (B, ...) clean latents, "cond": pytree, "null_cond": pytree}`` (cond and
    null_cond with leading axis B; ``None`` cond for an unconditional teacher, then ``w`` is
    irrelevant and ``null_cond`` unused).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}")
    if not 0.0 <= w_min <= w_max:
        raise ValueError(f"need 0 <= w_min <= w_max; got w_min={w_min!r}, w_max={w_max!r}")
    if not huber_c > 0:
        raise ValueError(f"huber_c must be > 0; got {huber_c!r}")
    f_opts = dict(boundary=boundary, timestep_scaling=timestep_scaling, sigma_data=sigma_data)

    def terms(params, batch, key, teacher_params, target_params) -> LCDTerms:
        z0 = batch["x"]
        cond, null_cond = batch.get("cond"), batch.get("null_cond")
        B = z0.shape[0]
        k_j, k_w, k_e = jax.random.split(key, 3)
        w = jax.random.uniform(k_w, (B,), minval=w_min, maxval=w_max)
        student = make_student(params, cond, w)
        sched = _discrete(student.schedule)
        grid = jnp.asarray(skipping_timesteps(sched.num_steps, skip))
        start = grid[jax.random.randint(k_j, (B,), 0, grid.shape[0])]
        end = jnp.maximum(start - skip, 0)
        eps = jax.random.normal(k_e, z0.shape, z0.dtype)
        z_start = diffuse(sched, z0, sched.t_of_index(start), eps).astype(z0.dtype)

        prediction = consistency_function(student, z_start, start, **f_opts)
        teacher = make_teacher(jax.lax.stop_gradient(teacher_params), cond)
        if cond is None:  # unconditional: a plain DDIM step
            z_end, _ = ddim_step(teacher, z_start, sched.t_of_index(start),
                                 sched.t_of_index(end))
        else:
            z_end = guided_ddim_step(teacher, null_cond, z_start, start, end, w)
        target_net = make_student(jax.lax.stop_gradient(target_params), cond, w)
        target = jax.lax.stop_gradient(
            consistency_function(target_net, jax.lax.stop_gradient(z_end), end, **f_opts))
        if distance == "huber":
            d = pseudo_huber(prediction, target, huber_c)
        else:
            diff = jnp.square(prediction.astype(jnp.float32) - target)
            d = jnp.mean(diff.reshape(B, -1), axis=1)
        return LCDTerms(d, prediction, target, start.astype(jnp.int32),
                        end.astype(jnp.int32), w)

    return terms


def lcd_loss(make_student, make_teacher, **options) -> Callable[..., Array]:
    """The LCD loss ``loss(params, batch, key, teacher_params, *, target_params) -> (B,)``:
    the ``distance`` of :func:`lcd_terms` (same arguments). Build its train step with
    ``make_train_step(loss, opt, ema_decay=mu, target_from_ema=True)``: the EMA of the
    parameters is LCD's target network ``theta-`` (``mu = 0.95`` in LCM; ``mu = 0`` makes the
    target the stop-gradient online network)."""
    terms = lcd_terms(make_student, make_teacher, **options)

    def loss(params, batch, key, teacher_params, *, target_params):
        return terms(params, batch, key, teacher_params, target_params).distance

    return loss
