"""DPM-Solver (Lu et al., NeurIPS 2022): exponential integrators of the probability-flow ODE in
the half log-SNR ``lambda = log(alpha / sigma)``, on the noise prediction ``eps_hat``.

With ``h = lambda_t - lambda_s`` the exact solution of the diffusion ODE is

    x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lam} eps(lam) dlam,

and DPM-Solver-k Taylor-expands ``eps_hat`` in ``lambda``. With ``phi_1 = expm1(h)``, ``phi_2 =
phi_1 / h - 1``, ``phi_3 = phi_2 / h - 1/2`` every update of the family reads

    x_t = (alpha_t / alpha_s) x_s - sigma_t phi_1 eps_s - sigma_t phi_2 D1 - sigma_t phi_3 D2,

with ``D1 ~ h eps'`` and ``D2 ~ h^2 eps''`` estimated from intermediate points (singlestep:
Algorithm 1 is DPM-Solver-2, Algorithm 2 DPM-Solver-3) or from the history (multistep). The
``"midpoint"`` solver type replaces ``sigma_t phi_2 D1`` by the ``phi_1``-weighted difference of
the Algorithms. DPM-Solver++ (:mod:`solvers.dpm_solver_pp`) is the same family on ``x0_hat``
(``z = -h``, ``g = alpha_t``, ratio ``sigma_t / sigma_s``); the shared coefficient code is in
:mod:`solvers._common`. A step onto ``t = 0`` is first order and returns ``x0_hat`` (see
``solvers/NOTES.md``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser
from solvers._common import (
    LOWER_ORDER_FINAL_STEPS,
    Array,
    check_time_shift,
    dpm_finish,
    dpm_prepare,
    dpm_solver_fast_orders,
    dpm_solver_orders,
    grid_coeffs,
    grid_multistep_coeffs,
    multistep_coeffs,
    multistep_update,
    push,
    run_scan,
    singlestep_coeffs,
    singlestep_update,
)
from solvers.dpm_solver_pp import dpm_solver_pp
from solvers.time_shift import TimeShift, sample_variance, select_shifted_time

__all__ = [
    "dpm_solver",
    "dpm_solver_pp",
    "dpm_solver_fast_orders",
    "dpm_solver_orders",
    "LOWER_ORDER_FINAL_STEPS",
]


def dpm_solver(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    order: int = 3,
    method: str = "singlestep",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    third_order: str = "exact",
    nfe: int | None = None,
    time_shift: TimeShift | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """DPM-Solver (Lu et al., NeurIPS 2022), Algorithms 1-2 (DPM-Solver-2/3), -1 (DDIM),
    multistep and -fast, on the noise prediction ``eps_hat``.

    Singlestep order ``k`` costs ``k`` evaluations a step (at ``lambda_s + h/2``, or ``h/3`` and
    ``2h/3``); multistep costs one (warm-up ``1, ..., order - 1``; with ``lower_order_final`` and
    fewer than :data:`LOWER_ORDER_FINAL_STEPS` steps, ``min(order, steps_left)`` at the end);
    ``method="fast"`` takes the orders of :func:`dpm_solver_fast_orders` for a budget ``nfe`` on
    an outer grid of ``len(orders) + 1`` points. :func:`dpm_solver_orders` gives every step's
    order. Time-Shift (Li et al. 2024, multistep only, as the official TS-DPM code): the
    per-sample variance of the last ``eps_hat`` picks ``tau`` near the next grid time, which
    replaces the whole next time point from step ``order`` on. Options except ``time_shift``'s
    cutoff are static: under ``jax.jit`` pass them with ``functools.partial`` or
    ``static_argnames``.

    Args:
      denoiser: any :class:`~dpm.denoiser.Denoiser` (eps/x0/v; guidance composes through it).
      x_T: ``(B, ...)`` start state at ``ts[0]``, any float dtype (integrated in >= float32).
      ts: ``(S + 1,)`` strictly decreasing times in ``[0, 1]``; ``ts[-1] = 0`` allowed.
      key: unused (the solver is deterministic); accepted for the common signature.
      order: 1, 2 or 3.
      method: ``"singlestep"``, ``"multistep"`` or ``"fast"``.
      solver_type: ``"midpoint"`` (the papers' type) or ``"taylor"``; unused by order 1 and by
        the multistep order-3 update.
      lower_order_final: multistep only (see above).
      denoise_to_zero: finish with ``x0_hat(x, ts[-1])``, one more evaluation.
      third_order: multistep order 3: ``"exact"`` (third order) or ``"reference"`` (the official
        code's and diffusers' update, second order; see ``solvers/NOTES.md``).
      nfe: the evaluation budget of ``method="fast"``; None otherwise.
      time_shift: :class:`~solvers.time_shift.TimeShift` options or None.
      return_trajectory: also return the trajectory dict.

    Returns:
      ``x_0`` ``(B, ...)`` in ``x_T``'s dtype, or ``(x_0, traj)`` with ``traj["x"]``
      ``(S + 1, B, ...)`` states, ``traj["t"]`` ``(S + 1,)`` times (``(S + 1, B)`` with
      Time-Shift), ``traj["eps"]`` ``(S, B, ...)`` the model output at each step's start,
      ``traj["order"]`` ``(S,)`` and ``traj["nfe"]``.

    Example:
      >>> ts = grids.uniform_log_snr(10, schedule)
      >>> x0 = jax.jit(dpm_solver, static_argnames=("order", "method"))(
      ...     den, x_T, ts, order=2, method="multistep")
    """
    del key
    shifted = check_time_shift(time_shift)
    if time_shift is not None and method != "multistep":
        raise ValueError(
            "time_shift integrates only the multistep dpm_solver (as the official TS-DPM code); "
            f"got method={method!r}"
        )
    x, gc, S, k, present, order = dpm_prepare(
        denoiser, x_T, ts, sampler="dpm_solver", order=order, method=method,
        solver_type=solver_type, lower_order_final=lower_order_final,
        denoise_to_zero=denoise_to_zero, third_order=third_order, nfe=nfe,
        return_trajectory=return_trajectory,
    )  # fmt: skip
    sched = denoiser.schedule
    eps_hat = lambda x, t: denoiser.predict(x, t)[1]  # M = eps_hat: DPM-Solver
    kw = dict(data=False, solver_type=solver_type, third_order=third_order)

    if method != "multistep":  # Algorithms 1-2 (and -fast): order k[i] at step i
        co = singlestep_coeffs(sched, gc, k, data=False)
        branches = [singlestep_update(o, eps_hat, solver_type) for o in present]

        def step(x, xs):
            c, b = xs
            x_t, eps_s = jax.lax.switch(b, branches, x, c)  # order k[i]
            return x_t, (x_t, eps_s)

        x, out = run_scan(
            step, x, (co, jnp.searchsorted(jnp.asarray(present), k)),
            return_trajectory=return_trajectory,
        )  # fmt: skip
        n_eval = jnp.sum(k)

    elif not shifted:  # multistep: one evaluation a step, the history in the carry

        def step(carry, xs):
            x, hist = carry  # hist: (order, *x.shape) eps_hat, newest first
            t_s, c = xs
            eps_s = eps_hat(x, t_s)
            hist = push(hist, eps_s)
            x_t = multistep_update(x, hist, c)
            return (x_t, hist), (x_t, eps_s)

        co = grid_multistep_coeffs(gc, k, **kw)
        hist0 = jnp.zeros((order,) + x.shape, x.dtype)
        (x, _), out = run_scan(
            step, (x, hist0), (gc.t[:-1], co), return_trajectory=return_trajectory
        )
        n_eval = jnp.asarray(S)

    else:  # multistep with Time-Shift: per-sample times and lambda history
        B = x.shape[0]

        def step(carry, xs):
            x, t_s, hist, lam_hist = carry  # t_s (B,), hist (order, *x.shape), lam_hist (order, B)
            i, t_next, k_i = xs
            eps_s = eps_hat(x, t_s)
            g_s = grid_coeffs(sched, t_s)
            hist, lam_hist = push(hist, eps_s), push(lam_hist, g_s.lam)
            # time shift: tau from the variance of eps_s, around the next grid time
            v = sample_variance(eps_s).astype(t_s.dtype)
            tau = select_shifted_time(sched, v, t_next, time_shift)
            t_t = jnp.where(i + 1 >= order, tau, jnp.broadcast_to(t_next, (B,)))
            lam_p1, lam_p2 = (lam_hist[min(j, order - 1)] for j in (1, 2))
            c = multistep_coeffs(k_i, lam_p2, lam_p1, g_s, grid_coeffs(sched, t_t), **kw)
            x_t = multistep_update(x, hist, c)
            return (x_t, t_t, hist, lam_hist), (x_t, eps_s, t_t)

        carry0 = (
            x,
            jnp.broadcast_to(gc.t[0], (B,)),
            jnp.zeros((order,) + x.shape, x.dtype),
            jnp.zeros((order, B), gc.t.dtype),
        )
        xs = (jnp.arange(S), gc.t[1:], k)
        (x, *_), out = run_scan(step, carry0, xs, return_trajectory=return_trajectory)
        n_eval = jnp.asarray(S)

    if denoise_to_zero:  # one more evaluation: x0_hat at the last time (Lu et al., App. D)
        x = denoiser.predict(x, gc.t[-1])[0]
        n_eval = n_eval + 1
    return dpm_finish(x_T, x, out, gc, k, n_eval, name="eps", return_trajectory=return_trajectory)
