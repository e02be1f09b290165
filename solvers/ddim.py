"""DDIM (Song, Meng & Ermon, ICLR 2021): the deterministic / eta-stochastic sampler and DDIM
inversion.

The step ``s -> t`` is written in the cancellation-free increment form of PNDM's transfer
(algebraically the DDIM map ``alpha_t x0_hat + sigma_t eps_hat``):

    x_t = x_s + expm1(log alpha_t - log alpha_s) x_s
              + (alpha_t sigma_s / alpha_s) expm1(lambda_s - lambda_t) eps_hat,

with ``lambda = log(alpha / sigma)``. Both coefficients are accurate for tiny steps and finite at
``t = 0`` (``lambda_t = inf``: the map returns ``x0_hat``); the map is
:func:`solvers._common.transfer`, shared with DDPM and PNDM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from solvers._common import (
    Array,
    check_time_shift,
    finish,
    prepare,
    require_key,
    run_scan,
    shift_target,
    transfer,
    transfer_coeffs,
)
from solvers.time_shift import TimeShift

__all__ = ["ddim", "ddim_invert"]


def _eta_coeffs(schedule, s: Array, t: Array, eta: Array) -> tuple[Array, Array]:
    """``(c_eta, sigma_eta)``: DDIM(eta) adds ``c_eta eps_hat + sigma_eta z`` to the DDIM map.

    ``sigma_eta^2 = eta^2 sigma_t^2 r`` with ``r = 1 - (alpha_s sigma_t / (alpha_t sigma_s))^2``
    (``= (1 - alpha_bar_t) / (1 - alpha_bar_s) (1 - alpha_bar_s / alpha_bar_t) / sigma_t^2`` for
    VP), and the direction coefficient ``sqrt(sigma_t^2 - sigma_eta^2)`` is
    ``sigma_t + c_eta``, ``c_eta = -sigma_t eta^2 r / (1 + sqrt(1 - eta^2 r))``.
    """
    lam_s = schedule.log_alpha(s) - schedule.log_sigma(s)
    lam_t = schedule.log_alpha(t) - schedule.log_sigma(t)
    sigma_t = jnp.exp(schedule.log_sigma(t))
    r = -jnp.expm1(2.0 * (lam_s - lam_t))
    e2r = jnp.square(eta) * r
    c_eta = -sigma_t * e2r / (1.0 + jnp.sqrt(jnp.maximum(1.0 - e2r, 0.0)))
    return c_eta, sigma_t * eta * jnp.sqrt(r)


def _check_eta(eta, key) -> bool:
    """Whether the sampler is stochastic; validates ``eta`` and the key."""
    if isinstance(eta, jax.core.Tracer):
        require_key(key, "ddim with a traced eta (which may be > 0)")
        return True
    e = float(eta)
    if not 0.0 <= e <= 1.0:
        raise ValueError(f"eta must lie in [0, 1]; got {eta!r}")
    if e > 0.0:
        require_key(key, f"ddim with eta={e:g}")
        return True
    return False


# --------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------


def ddim(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    eta: float | Array = 0.0,
    time_shift: TimeShift | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """DDIM sampling (Song, Meng & Ermon, ICLR 2021, eq. 12): deterministic for ``eta = 0``.

    Step ``s -> t``: ``x_t = alpha_t x0_hat + sqrt(sigma_t^2 - sigma_eta^2) eps_hat +
    sigma_eta z`` with ``sigma_eta^2 = eta^2 (sigma_t^2 / sigma_s^2)(1 - alpha_bar_s /
    alpha_bar_t)`` (VP notation); ``eta = 1`` is strided DDPM with ``fixed_small`` variance.
    Noise is added on every step with ``eta > 0`` (it vanishes by itself on a step into
    ``t = 0``). One model evaluation per step, at the step's start.

    ``eta`` may be traced (e.g. ``vmap`` over eta); a key is then required, because eta may be
    > 0. A concrete ``eta == 0`` needs no key (a given key is then unused).

    Time shift (TS-DPM, official ``pnm_solver.py``): with ``time_shift``, from the second step
    on, while the next grid time ``t_{i+1}`` is above the cutoff, the target of step ``i`` is
    ``tau = select_shifted_time(schedule, sample_variance(x_{t_i}), t_{i+1})`` per example; the
    next step still starts from the grid label ``t_{i+1}`` (model time and start alpha). No
    extra network evaluations. ``window = 0`` runs the base sampler unchanged.

    Args:
      denoiser: the model (any prediction type).
      x_T: ``(B, ...)`` initial noise at ``ts[0]``.
      ts: ``(S + 1,)`` strictly decreasing times (``ts[-1] = 0`` returns ``x0_hat``).
      key: PRNG key; required when ``eta`` may be > 0.
      eta: stochasticity in ``[0, 1]``.
      time_shift: :class:`~solvers.time_shift.TimeShift` options, or None.
      return_trajectory: also return the trajectory.

    Returns:
      ``x_0`` of the shape of ``x_T``; with ``return_trajectory`` also a dict with ``"x"``
      ``(S + 1, B, ...)``, ``"x0"`` and ``"eps"`` ``(S, B, ...)`` (model outputs at each step's
      start), ``"nfe"`` (= S) and, with time shift, ``"tau"`` ``(S, B)`` (targets used).
    """
    x, gc, S, dt = prepare(denoiser, x_T, ts, sampler="ddim", return_trajectory=return_trajectory)
    stochastic = _check_eta(eta, key)
    shifted = check_time_shift(time_shift)
    sched = denoiser.schedule
    eta = jnp.asarray(eta, dt)
    s, t = gc.t[:-1], gc.t[1:]
    c_x, c_eps = transfer_coeffs(sched, s, t)
    c_eta, sigma_eta = _eta_coeffs(sched, s, t, eta)
    keys = jax.random.split(key, S) if stochastic else jnp.zeros((S,))
    xs = (jnp.arange(S), s, t, c_x, c_eps, c_eta, sigma_eta, keys)

    def step(x, inp):
        i, s_i, t_i, cx, ce, cn, sn, k = inp
        x0, eps = denoiser.predict(x, s_i)
        tau = t_i
        if shifted:  # time shift: per-example target tau, coefficients recomputed from it
            tau = shift_target(sched, x, s_i, t_i, i, time_shift)
            cx, ce = transfer_coeffs(sched, s_i, tau)
            cn, sn = _eta_coeffs(sched, s_i, tau, eta)
        x_next = transfer(x, eps, cx, ce)  # DDIM map: alpha_t x0_hat + sigma_t eps_hat
        if stochastic:  # eta > 0: less of eps_hat, fresh noise z
            z = jax.random.normal(k, x.shape, x.dtype)
            x_next = x_next + expand_like(cn, x) * eps + expand_like(sn, x) * z
        x_next = x_next.astype(x.dtype)
        out = dict(x=x_next, x0=x0, eps=eps) | (dict(tau=tau) if shifted else {})
        return x_next, out

    x_0, traj = run_scan(step, x, xs, return_trajectory=return_trajectory)
    return finish(x_T, x_0, traj, S, return_trajectory=return_trajectory)


def ddim_invert(
    denoiser: Denoiser, x_0: Array, ts: Array, *, return_trajectory: bool = False
) -> Array | tuple[Array, dict]:
    """DDIM inversion (Song, Meng & Ermon, ICLR 2021, the encoder of their reconstruction
    experiments): the deterministic DDIM map run upward, encoding data into the latent at
    ``ts[0]``.

    ``ts`` is the *sampling* grid (descending); the inversion walks it in reverse, from
    ``ts[-1]`` up to ``ts[0]``, with convention (A) of the DDIM paper and LDM's ``encode``:
    the step ``t_{k+1} -> t_k`` evaluates ``eps_hat`` at the current state and its own time,
    ``(x_{t_{k+1}}, t_{k+1})``, and applies the DDIM map to ``t_k``. Inversion followed by
    :func:`ddim` on the same grid is not the identity: the round trip error is O(h).

    Args:
      denoiser: the model. For an ``x0``-prediction model ``ts[-1]`` must be > 0 (``eps_hat``
        at ``t = 0`` is undefined).
      x_0: ``(B, ...)`` data at ``ts[-1]``.
      ts: ``(S + 1,)`` strictly decreasing times.
      return_trajectory: also return the trajectory.

    Returns:
      ``x_T`` at ``ts[0]``; with ``return_trajectory`` also ``{"x": (S + 1, B, ...)`` states
      from ``x_0`` up to ``x_T``, ``"eps": (S, B, ...)``, ``"nfe"`` (= S)}.
    """
    x, gc, S, dt = prepare(
        denoiser, x_0, ts, sampler="ddim_invert", x_name="x_0", return_trajectory=return_trajectory
    )
    if (
        denoiser.prediction == "x0"
        and not isinstance(ts, jax.core.Tracer)
        and float(jnp.asarray(ts)[-1]) == 0.0
    ):
        raise ValueError("ddim_invert with an x0-prediction model needs ts[-1] > 0")
    up = gc.t[::-1]  # ascending: inversion order
    s, t = up[:-1], up[1:]
    c_x, c_eps = transfer_coeffs(denoiser.schedule, s, t, upward=True)

    def step(x, inp):
        s_k, cx, ce = inp
        eps = denoiser.eps(x, s_k)  # convention (A): at (x_{t_k}, t_k)
        x_next = transfer(x, eps, cx, ce).astype(x.dtype)  # DDIM map upward
        return x_next, dict(x=x_next, eps=eps)

    x_T, traj = run_scan(step, x, (s, c_x, c_eps), return_trajectory=return_trajectory)
    return finish(x_0, x_T, traj, S, return_trajectory=return_trajectory)
