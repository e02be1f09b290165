"""Per-example denoising losses with the usual weightings and time samplers.

All losses in the project share one signature, ``loss(params, batch, key) -> (B,)`` per-example
values; the train step reduces them. A denoising loss is

    w(t) * mean_d (x0_hat(x_t, t) - x0)^2,

written with weights on the x0-error so the choices are comparable:

* ``"eps"``: ``w = SNR`` -- the plain epsilon MSE of Ho et al.;
* ``"x0"``: ``w = 1`` -- the plain x0 MSE (ProDiff);
* ``"v"``: ``w = SNR + 1`` -- the plain v MSE on VP schedules (``alpha^2 + sigma^2 = 1``);
* ``"truncated_snr"``: ``w = max(SNR, 1)`` (Salimans & Ho, progressive distillation);
* ``"min_snr"``: ``w = min(SNR, gamma)`` (Hang et al., min-SNR-gamma, gamma = 5);
* ``"edm"``: ``w = (sigma_bar^2 + sigma_data^2) / (sigma_bar sigma_data)^2`` (Karras et al.).

The squared error is computed in the denoiser's own output space and rescaled by an exact scalar
(``|x0_hat - x0| = (sigma / alpha) |eps_hat - eps| = sigma / (alpha^2 + sigma^2) |v_hat - v|``,
on any schedule), so e.g. an eps-model with ``"eps"`` weighting gets exactly its eps-MSE, with no
cancellation at small noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from dpm.schedules import DiscreteVP, Schedule

Array = jax.Array

__all__ = [
    "WEIGHTINGS",
    "TIME_SAMPLERS",
    "log_output_to_x0_scale",
    "log_weight",
    "output_target",
    "sample_time",
    "denoising_loss",
    "diffuse",
]

WEIGHTINGS = ("eps", "x0", "v", "truncated_snr", "min_snr", "edm")
TIME_SAMPLERS = ("uniform", "discrete", "lognormal")


def log_weight(
    weighting: str,
    schedule: Schedule,
    t: Array,
    *,
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> Array:
    """``log w(t)`` of a weighting on the x0-error (see the module docstring)."""
    lam = schedule.log_snr(t)  # log SNR
    if weighting == "eps":
        return lam
    if weighting == "x0":
        return jnp.zeros_like(lam)
    if weighting == "v":
        return jnp.logaddexp(lam, 0.0)
    if weighting == "truncated_snr":
        return jnp.maximum(lam, 0.0)
    if weighting == "min_snr":
        return jnp.minimum(lam, jnp.log(min_snr_gamma))
    if weighting == "edm":
        # (sb^2 + sd^2) / (sb sd)^2 = 1/sd^2 + 1/sb^2 with sb^2 = exp(-lam)
        return jnp.logaddexp(-2.0 * jnp.log(sigma_data), lam)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")


def log_output_to_x0_scale(prediction: str, schedule: Schedule, t: Array) -> Array:
    """``log c^2`` with ``|x0_hat - x0|^2 = c^2 |out_hat - out|^2`` for a model predicting
    ``prediction`` (0 for ``"x0"`` and ``"both"``, whose error is taken on x0)."""
    lam = schedule.log_snr(t)
    if prediction == "eps":
        return -lam  # (sigma / alpha)^2
    if prediction == "v":
        # x0 = (alpha x - sigma v) / (alpha^2 + sigma^2): c = sigma / (alpha^2 + sigma^2)
        log_a, log_s = schedule.log_alpha(t), schedule.log_sigma(t)
        return 2.0 * log_s - 2.0 * jnp.logaddexp(2.0 * log_a, 2.0 * log_s)
    return jnp.zeros_like(lam)


def output_target(prediction: str, schedule: Schedule, z_t: Array, t: Array,
                  x0_target: Array) -> Array:
    """The target in a model's own output space that a given ``x0`` target implies at the same
    ``z_t``: ``x0`` itself (``"x0"``, ``"both"``), ``eps = (z_t - alpha x0) / sigma``, or ``v =
    alpha eps - sigma x0``. The distillation losses regress on it."""
    if prediction in ("x0", "both"):
        return x0_target
    a, s = expand_like(schedule.alpha(t), z_t), expand_like(schedule.sigma(t), z_t)
    eps = (z_t - a * x0_target) / s
    if prediction == "eps":
        return eps
    return a * eps - s * x0_target  # v


def sample_time(
    key: Array,
    n: int,
    schedule: Schedule,
    sampler: str = "uniform",
    *,
    t_min: float = 1e-5,
    p_mean: float = -1.2,
    p_std: float = 1.2,
) -> Array:
    """Training times, shape ``(n,)``.

    Args:
      key: PRNG key.
      n: number of times.
      schedule: the schedule (discrete sampling needs a :class:`DiscreteVP`).
      sampler: ``"uniform"`` (``t ~ U[t_min, 1]``), ``"discrete"`` (a uniform training index
        ``i``, ``t = (i + 1) / N``) or ``"lognormal"`` (EDM: ``ln sigma_bar ~ N(p_mean, p_std^2)``,
        mapped to ``t`` and clipped to ``[t_min, 1]``).
    """
    if sampler == "uniform":
        return jax.random.uniform(key, (n,), minval=t_min, maxval=1.0)
    if sampler == "discrete":
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(
                "time sampler 'discrete' needs a DiscreteVP schedule; "
                f"got {type(schedule).__name__}"
            )
        i = jax.random.randint(key, (n,), 0, schedule.num_steps)
        return schedule.t_of_index(i.astype(jnp.float32))
    if sampler == "lognormal":
        log_sb = p_mean + p_std * jax.random.normal(key, (n,))
        t = schedule.t_of_log_snr(-2.0 * log_sb)
        return jnp.clip(t, t_min, 1.0)
    raise ValueError(f"time sampler must be one of {TIME_SAMPLERS}; got {sampler!r}")


def diffuse(schedule: Schedule, x0: Array, t: Array, eps: Array) -> Array:
    """The forward process ``x_t = alpha(t) x0 + sigma(t) eps`` (``t`` per example)."""
    return expand_like(schedule.alpha(t), x0) * x0 + expand_like(schedule.sigma(t), x0) * eps


def denoising_loss(
    make_denoiser: Callable[[Any], Denoiser],
    *,
    weighting: str = "eps",
    time_sampler: str = "uniform",
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
    t_min: float = 1e-5,
) -> Callable[[Any, dict, Array], Array]:
    """A per-example denoising loss ``loss(params, batch, key) -> (B,)``.

    Args:
      make_denoiser: ``params -> Denoiser`` (e.g. ``lambda p: network_denoiser(Partial(apply,
        p), schedule, "eps")``); the batch's ``"cond"`` entry, if any, is bound to it.
      weighting: one of :data:`WEIGHTINGS`.
      time_sampler: one of :data:`TIME_SAMPLERS`, or a callable ``(key, n) -> t`` of shape
        ``(n,)`` (or a scalar).
      min_snr_gamma: gamma of ``"min_snr"``.
      sigma_data: sigma_data of ``"edm"``.
      t_min: smallest sampled time for continuous samplers.

    Returns:
      ``loss(params, batch, key)`` where ``batch = {"x": (B, ...), "cond": optional pytree}``.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}; got {weighting!r}")
    if not callable(time_sampler) and time_sampler not in TIME_SAMPLERS:
        raise ValueError(
            f"time_sampler must be one of {TIME_SAMPLERS} or a callable (key, n) -> t; "
            f"got {time_sampler!r}"
        )

    def loss(params, batch, key):
        x0 = batch["x"]
        den = make_denoiser(params)
        if batch.get("cond") is not None:
            den = den.with_cond(batch["cond"])
        sched = den.schedule
        kt, ke = jax.random.split(key)
        if callable(time_sampler):
            t = jnp.broadcast_to(time_sampler(kt, x0.shape[0]), (x0.shape[0],))
        else:
            t = sample_time(kt, x0.shape[0], sched, time_sampler, t_min=t_min)
        eps = jax.random.normal(ke, x0.shape, x0.dtype)
        x_t = diffuse(sched, x0, t, eps)
        if den.prediction == "both":  # two guesses mixed: the error is taken on x0
            out = den.x0(x_t, t)
        else:
            out = den.output(x_t, t)
        if den.prediction == "eps":
            target = eps
        elif den.prediction in ("x0", "both"):
            target = x0
        else:
            target = expand_like(sched.alpha(t), x0) * eps - expand_like(sched.sigma(t), x0) * x0
        mse = jnp.mean(
            jnp.square(out.astype(jnp.float32) - target).reshape(x0.shape[0], -1), axis=1
        )
        log_w = log_weight(
            weighting, sched, t, min_snr_gamma=min_snr_gamma, sigma_data=sigma_data
        ) + log_output_to_x0_scale(den.prediction, sched, t)
        return jnp.exp(log_w) * mse

    return loss
