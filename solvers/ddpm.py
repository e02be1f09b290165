"""DDPM ancestral sampling (Ho, Jain & Abbeel, NeurIPS 2020) on any descending grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from solvers._common import check_denoiser, check_grid, check_x, finish, require_key, run_scan
from solvers.ddim import _logs, _shift_target, _uses_shift, _work_dtype
from solvers.time_shift import TimeShift

Array = jax.Array

__all__ = ["ddpm", "VARIANCES"]

VARIANCES = ("fixed_small", "fixed_large")


def _posterior_coeffs(schedule, s: Array, t: Array, variance: str):
    """``(c_x0, c_x, var)`` of the posterior ``q(x_t | x_s, x0) = N(c_x0 x0 + c_x x_s, var)``.

    With ``r = 1 - (alpha_s sigma_t / (alpha_t sigma_s))^2`` (VP: ``r = beta' / (1 - alpha_bar_s)``,
    ``beta' = 1 - alpha_bar_s / alpha_bar_t``): ``c_x0 = alpha_t r``, ``c_x = (alpha_s /
    alpha_t)(sigma_t / sigma_s)^2``, ``fixed_small = sigma_t^2 r`` (beta tilde), ``fixed_large =
    sigma_s^2 r`` (beta'). Valid for any schedule (VDM form); ``t = 0`` gives ``(1, 0, 0)``.
    """
    la_s, ls_s, lam_s = _logs(schedule, s)
    la_t, ls_t, lam_t = _logs(schedule, t)
    r = -jnp.expm1(2.0 * (lam_s - lam_t))
    c_x0 = jnp.exp(la_t) * r
    c_x = jnp.exp(la_s - la_t + 2.0 * (ls_t - ls_s))
    var = jnp.exp(2.0 * (ls_t if variance == "fixed_small" else ls_s)) * r
    return c_x0, c_x, var


def ddpm(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    variance: str = "fixed_small",
    time_shift: TimeShift | None = None,
    return_trajectory: bool = False,
):
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) on any descending grid.

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
    check_denoiser(denoiser)
    check_x(x_T)
    check_grid(ts, min_steps=1, method="ddpm")
    require_key(key, "ddpm")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}; got {variance!r}")
    shifted = _uses_shift(time_shift)
    sched = denoiser.schedule
    dt = _work_dtype(x_T, ts)
    ts = jnp.asarray(ts, dt)
    S = ts.shape[0] - 1
    s, t = ts[:-1], ts[1:]
    c_x0, c_x, var = _posterior_coeffs(sched, s, t, variance)
    noise = jnp.arange(S) < S - 1  # no noise on the last step
    xs = (jnp.arange(S), s, t, c_x0, c_x, var, noise, jax.random.split(key, S))

    def step(x, inp):
        i, s_i, t_i, a0, ax, v, add_noise, k = inp
        x0, eps = denoiser.predict(x, s_i)
        tau = t_i
        if shifted:  # per-example target tau
            tau = _shift_target(sched, x, t_i, i, time_shift)
            a0, ax, v = _posterior_coeffs(sched, s_i, tau, variance)
        mean = expand_like(a0, x) * x0 + expand_like(ax, x) * x
        z = jax.random.normal(k, x.shape, x.dtype)
        std = jnp.where(add_noise, jnp.sqrt(v), 0.0)
        x_next = (mean + expand_like(std, x) * z).astype(x.dtype)
        out = dict(x=x_next, x0=x0, eps=eps) | (dict(tau=tau) if shifted else {})
        return x_next, out

    x_0, traj = run_scan(step, x_T, xs, return_trajectory=return_trajectory)
    return finish(x_T, x_0, traj, S, return_trajectory=return_trajectory)
