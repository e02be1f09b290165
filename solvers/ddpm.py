"""DDPM ancestral sampling (Ho, Jain & Abbeel, NeurIPS 2020) on any descending grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from solvers._common import (
    Array,
    check_choice,
    check_time_shift,
    finish,
    posterior_coeffs,
    prepare,
    require_key,
    run_scan,
    shift_target,
)
from solvers.time_shift import TimeShift

__all__ = ["ddpm", "VARIANCES"]

VARIANCES = ("fixed_small", "fixed_large")


def ddpm(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    variance: str = "fixed_small",
    time_shift: TimeShift | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """DDPM ancestral sampling (Ho, Jain & Abbeel 2020, Algorithm 2) on any descending grid.

    Step ``s -> t``: ``x_t = mu_tilde(x_s, x0_hat) + sqrt(var) z`` with the posterior
    ``q(x_t | x_s, x0)``. On a strided grid ``beta'`` is re-derived from the ``alpha_bar``
    ratio of the two grid times, ``beta' = 1 - alpha_bar(s) / alpha_bar(t)`` (ADM
    ``SpacedDiffusion``, diffusers ``previous_timestep``); on continuous schedules
    ``alpha_bar = alpha(t)^2``. No noise on the last step (whatever its target time).
    ``fixed_small`` is ``beta_tilde' = beta' (1 - alpha_bar(t)) / (1 - alpha_bar(s))``,
    ``fixed_large`` is ``beta'``. OpenAI's code substitutes ``beta_tilde_1`` for the variance
    of the final step; that step adds no noise, so sampling is unaffected and nothing is
    substituted here.

    Time shift (TS-DPM, official ``pnm_solver.py``): with ``time_shift``, from the second step
    on, while ``t_{i+1}`` is above the cutoff, the posterior targets the per-example
    ``tau = select_shifted_time(schedule, sample_variance(x_{t_i}), t_{i+1})`` (``beta'`` from
    ``alpha_bar(s) / alpha_bar(tau)``); the next step starts from the grid label ``t_{i+1}``.
    No extra network evaluations; ``window = 0`` runs the base sampler unchanged.

    Args:
      denoiser: the model (any prediction type).
      x_T: ``(B, ...)`` initial noise at ``ts[0]``.
      ts: ``(S + 1,)`` strictly decreasing times.
      key: PRNG key (required).
      variance: ``"fixed_small"`` or ``"fixed_large"``.
      time_shift: :class:`~solvers.time_shift.TimeShift` options, or None.
      return_trajectory: also return the trajectory.

    Returns:
      ``x_0`` of the shape of ``x_T``; with ``return_trajectory`` also a dict with ``"x"``
      ``(S + 1, B, ...)``, ``"x0"`` and ``"eps"`` ``(S, B, ...)``, ``"nfe"`` (= S) and, with time
      shift, ``"tau"`` ``(S, B)``.
    """
    x, gc, S, _ = prepare(denoiser, x_T, ts, sampler="ddpm", return_trajectory=return_trajectory)
    require_key(key, "ddpm")
    check_choice(variance, "variance", VARIANCES, "ddpm")
    shifted = check_time_shift(time_shift)
    sched = denoiser.schedule
    s, t = gc.t[:-1], gc.t[1:]
    c_x0, c_x, var = posterior_coeffs(sched, s, t, variance)
    noise = jnp.arange(S) < S - 1  # no noise on the last step
    xs = (jnp.arange(S), s, t, c_x0, c_x, var, noise, jax.random.split(key, S))

    def step(x, inp):
        i, s_i, t_i, a0, ax, v, add_noise, k = inp
        x0, eps = denoiser.predict(x, s_i)
        tau = t_i
        if shifted:  # time shift: per-example target tau
            tau = shift_target(sched, x, s_i, t_i, i, time_shift)
            a0, ax, v = posterior_coeffs(sched, s_i, tau, variance)
        mean = expand_like(a0, x) * x0 + expand_like(ax, x) * x  # posterior mean mu_tilde
        z = jax.random.normal(k, x.shape, x.dtype)
        std = jnp.where(add_noise, jnp.sqrt(v), 0.0)
        x_next = (mean + expand_like(std, x) * z).astype(x.dtype)
        out = dict(x=x_next, x0=x0, eps=eps) | (dict(tau=tau) if shifted else {})
        return x_next, out

    x_0, traj = run_scan(step, x, xs, return_trajectory=return_trajectory)
    return finish(x_T, x_0, traj, S, return_trajectory=return_trajectory)
