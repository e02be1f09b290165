"""Progressive distillation (Salimans & Ho, ICLR 2022): a student whose one deterministic DDIM
step does what two of its teacher's do.

On the student's grid of ``N`` steps, ``t_i = i / N``, a training example draws ``i`` in
``{1, ..., N}`` and ``z_t = alpha_t x + sigma_t eps`` at ``t = t_i``. The teacher takes two DDIM
steps, ``t -> t - 1/(2N) -> t - 1/N = s``, landing on ``z_s``. The student's target is the
``x_til`` that makes *one* DDIM step of the student land on the same point:

    z_s = alpha_s x_til + (sigma_s / sigma_t) (z_t - alpha_t x_til)
    =>  x_til = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

with the denominator written as ``-alpha_s expm1((lambda_t - lambda_s) / 2)`` (``lambda`` the
log-SNR), accurate for the small steps of large ``N``. ``x_til`` is generally not the teacher's
``x0`` guess: it is the ``x0`` that makes the student's step consistent with the teacher's two.
Where ``sigma_s = 0`` it reduces to the teacher's last ``x0`` guess.

The per-example loss is ``w(t) |x0_hat - x_til|^2`` with a weighting of
:func:`dpm.losses.log_weight`: the paper's truncated SNR ``max(SNR, 1)`` (``"truncated_snr"``),
``SNR + 1`` (``"v"``, the v-MSE), ``SNR`` (``"eps"``, the eps-MSE: zero weight where few-step
samplers start) or constant (``"x0"``). The error is computed in the student's own output space
(``x0``, ``eps`` or ``v`` target derived from ``x_til`` at the same ``z_t``) and rescaled
exactly, as in :func:`dpm.losses.denoising_loss`; a ``"both"`` student is compared on ``x0``.

The teacher's parameters are an argument of the loss (and the number of student steps may be
one too), never a closed-over constant: one compiled train step serves every halving round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from dpm.losses.denoising import (
    WEIGHTINGS,
    diffuse,
    log_output_to_x0_scale,
    log_weight,
    output_target,
)
from dpm.schedules import Schedule

Array = jax.Array

__all__ = [
    "ddim_step",
    "distillation_target",
    "progressive_distillation_loss",
    "student_steps_resolver",
    "student_times",
]


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")


def ddim_step(den: Denoiser, z: Array, t: Array, s: Array) -> tuple[Array, Array]:
    """One deterministic DDIM step ``t -> s``: ``(alpha_s x0_hat + sigma_s eps_hat, x0_hat)``.

    ``t`` and ``s`` are scalars or per-example ``(B,)`` times; ``den`` predicts anything.
    """
    sched = den.schedule
    x0, eps = den.predict(z, t)
    z_s = expand_like(sched.alpha(s), z) * x0 + expand_like(sched.sigma(s), z) * eps
    return z_s.astype(z.dtype), x0


def _solve_x(sched: Schedule, z_t: Array, z_s: Array, t: Array, s: Array) -> Array:
    """The ``x`` whose DDIM step ``t -> s`` from ``z_t`` lands on ``z_s``."""
    ratio = jnp.exp(sched.log_sigma(s) - sched.log_sigma(t))  # sigma_s / sigma_t (0 at sigma_s 0)
    # alpha_s - ratio alpha_t = alpha_s (1 - exp((lambda_t - lambda_s) / 2))
    denom = -sched.alpha(s) * jnp.expm1(0.5 * (sched.log_snr(t) - sched.log_snr(s)))
    return (z_s - expand_like(ratio, z_t) * z_t) / expand_like(denom, z_t).astype(z_t.dtype)


def distillation_target(
    teacher: Denoiser, z_t: Array, t: Array, s: Array, *, t_mid: Array | None = None
) -> tuple[Array, Array]:
    """The student's target for the step ``t -> s`` from two teacher DDIM steps.

    Args:
      teacher: the teacher (any prediction; its ``cond`` set).
      z_t: ``(B, ...)`` noisy data at ``t``.
      t, s: times with ``s < t`` (scalars or ``(B,)``).
      t_mid: the teacher's intermediate time (default ``(t + s) / 2``).

    Returns:
      ``(x_til, z_s)``: the x0-target of the student and the teacher's two-step endpoint; one
      DDIM step ``t -> s`` with ``x0_hat = x_til`` lands exactly on ``z_s``.
    """
    t, s = jnp.asarray(t), jnp.asarray(s)
    t_mid = 0.5 * (t + s) if t_mid is None else jnp.asarray(t_mid)
    z_mid, _ = ddim_step(teacher, z_t, t, t_mid)
    z_s, _ = ddim_step(teacher, z_mid, t_mid, s)
    return _solve_x(teacher.schedule, z_t, z_s, t, s), z_s


def student_times(key: Array, n: int, student_steps: Array | int) -> tuple[Array, Array]:
    """``(t, s)``, shape ``(n,)`` each: a uniform index ``i in {1, ..., N}`` of the student's
    ``N``-step grid, ``t = i / N`` and ``s = (i - 1) / N`` (``N`` may be traced)."""
    N = jnp.asarray(student_steps)
    i = jax.random.randint(key, (n,), 1, N + 1)
    Nf = N.astype(jnp.float32)
    return i.astype(jnp.float32) / Nf, (i - 1).astype(jnp.float32) / Nf


def student_steps_resolver(default: int | None, loss_name: str) -> Callable[[Any], Any]:
    """Checks a distillation loss's default ``student_steps`` (an int >= 1 or None) and returns
    ``resolve(given)``: the number of student steps of one call (``given``, which may be
    traced, else the default), refusing a missing or non-positive count."""
    if default is not None and (isinstance(default, bool) or not isinstance(default, int)
                                or default < 1):
        raise ValueError(f"student_steps must be an int >= 1 or None; got {default!r}")

    def resolve(given):
        n = default if given is None else given
        if n is None:
            raise ValueError(f"the number of student steps is unknown: pass student_steps to "
                             f"{loss_name} or to the loss")
        if isinstance(n, int) and n < 1:
            raise ValueError(f"student_steps must be >= 1; got {n!r}")
        return n

    return resolve


def progressive_distillation_loss(
    make_student: Callable[[Any], Denoiser],
    *,
    student_steps: int | None = None,
    weighting: str = "truncated_snr",
    make_teacher: Callable[[Any], Denoiser] | None = None,
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> Callable[..., Array]:
    """The per-example progressive-distillation loss
    ``loss(params, batch, key, teacher_params, student_steps=None) -> (B,)``.

    Args:
      make_student: ``params -> Denoiser`` of the student (any prediction, ``"both"``
        included; the paper uses ``"x0"``, ``"v"`` or ``"both"``: an eps student's ``x0`` is
        ill-conditioned where few-step sampling starts).
      student_steps: the student's number of steps ``N`` (the teacher's is ``2N``); may
        instead be passed to the loss as a traced int, so that one compiled step serves every
        round.
      weighting: one of :data:`dpm.losses.WEIGHTINGS` on the x0-error; the paper's truncated
        SNR by default.
      make_teacher: ``params -> Denoiser`` of the teacher (default ``make_student``: the paper's
        same-architecture teacher). It must use the student's schedule.
      min_snr_gamma, sigma_data: parameters of the ``"min_snr"`` and ``"edm"`` weightings.

    Returns:
      ``loss(params, batch, key, teacher_params, student_steps=None)`` with ``batch = {"x":
      (B, ...), "cond": optional pytree}``; the condition is bound to both networks. No
      gradient flows into the teacher.
    """
    _check_weighting(weighting)
    student_steps_of = student_steps_resolver(student_steps, "progressive_distillation_loss")
    make_teacher = make_student if make_teacher is None else make_teacher

    def loss(params, batch, key, teacher_params, student_steps=None):
        N = student_steps_of(student_steps)
        x0 = batch["x"]
        cond = batch.get("cond")
        student = make_student(params)
        teacher = make_teacher(jax.lax.stop_gradient(teacher_params))
        if cond is not None:
            student, teacher = student.with_cond(cond), teacher.with_cond(cond)
        sched = student.schedule
        if type(teacher.schedule) is not type(sched):
            raise ValueError("the teacher and the student must share one schedule; got "
                             f"{type(teacher.schedule).__name__} and {type(sched).__name__}")
        kt, ke = jax.random.split(key)
        t, s = student_times(kt, x0.shape[0], N)
        eps = jax.random.normal(ke, x0.shape, x0.dtype)
        z_t = diffuse(sched, x0, t, eps).astype(x0.dtype)
        x_til, _ = distillation_target(teacher, z_t, t, s)
        target = jax.lax.stop_gradient(output_target(student.prediction, sched, z_t, t, x_til))
        out = student.x0(z_t, t) if student.prediction == "both" else student.output(z_t, t)
        mse = jnp.mean(jnp.square(out.astype(jnp.float32) - target).reshape(x0.shape[0], -1),
                       axis=1)
        log_w = log_weight(weighting, sched, t, min_snr_gamma=min_snr_gamma,
                           sigma_data=sigma_data)
        return jnp.exp(log_w + log_output_to_x0_scale(student.prediction, sched, t)) * mse

    return loss
