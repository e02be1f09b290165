"""DPM-Solver (Lu et al., NeurIPS 2022) and DPM-Solver++ (Lu et al., 2022b): exponential
integrators of the probability-flow ODE in the half log-SNR ``lambda = log(alpha / sigma)``.

With ``h = lambda_t - lambda_s`` the exact solution of the diffusion ODE is, for a noise model
(DPM-Solver) and a data model (DPM-Solver++),

    x_t = (alpha_t / alpha_s) x_s - alpha_t int_{lambda_s}^{lambda_t} e^{-lam} eps(lam) dlam
    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lam}  x0(lam) dlam,

and both solvers Taylor-expand the model output ``M`` (``eps_hat`` or ``x0_hat``) in ``lambda``.
Writing ``z = h`` (noise) or ``z = -h`` (data), ``g = sigma_t`` (noise) or ``g = alpha_t`` (data),
``phi_1 = expm1(z)``, ``phi_2 = phi_1 / z - 1``, ``phi_3 = phi_2 / z - 1/2``, every update of the
family reads

    x_t = ratio * x_s - g phi_1 M_s - g phi_2 D1 - g phi_3 D2,

with ``ratio = alpha_t / alpha_s`` (noise) or ``sigma_t / sigma_s`` (data) and ``D1 ~ h M'``,
``D2 ~ h^2 M''`` estimated from intermediate points (singlestep) or from the history
(multistep). The midpoint (``"dpm_solver"``) variants replace ``g phi_2 D1`` by a
``g phi_1``-weighted difference, as in the papers' Algorithms.

Final step onto ``t = 0`` (``sigma = 0``, ``lambda = +inf``): that step is always first order
(higher orders would need intermediate points or ratios at ``lambda = inf``, the NaN of
diffusers#9007). It returns ``x0_hat`` of the last model evaluation exactly for DPM-Solver++
(``sigma_t / sigma_s = 0``, ``phi_1 = -1``), and for DPM-Solver the coefficient
``sigma_t * expm1(h)`` is evaluated as its finite limit ``alpha_t sigma_s / alpha_s`` (so the
step is ``(x_s - sigma_s eps_hat) / alpha_s = x0_hat``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser, expand_like
from dpm.schedules import Schedule
from solvers._common import (
    GridCoeffs,
    check_denoiser,
    check_grid,
    check_x,
    grid_coeffs,
    run_scan,
)
from solvers.time_shift import TimeShift, sample_variance, select_shifted_time

Array = jax.Array

__all__ = [
    "dpm_solver",
    "dpm_solver_pp",
    "dpm_solver_fast_orders",
    "dpm_solver_orders",
    "LOWER_ORDER_FINAL_STEPS",
]

#: ``lower_order_final`` lowers the last steps' orders only when the grid has fewer steps than
#: this (the threshold of the official docstring, diffusers and the TS-DPM fork).
LOWER_ORDER_FINAL_STEPS = 15

_METHODS = ("singlestep", "multistep", "fast")
_SOLVER_TYPES = ("midpoint", "taylor")
_THIRD_ORDER = ("exact", "reference")


# --------------------------------------------------------------------------------------------
# Option checks and per-step orders (host side, static)
# --------------------------------------------------------------------------------------------


def _check_options(order, method, solver_type, third_order, methods=_METHODS) -> None:
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}; got {method!r}")
    if solver_type not in _SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {_SOLVER_TYPES}; got {solver_type!r}")
    if third_order not in _THIRD_ORDER:
        raise ValueError(f"third_order must be one of {_THIRD_ORDER}; got {third_order!r}")


def dpm_solver_fast_orders(nfe: int, order: int = 3) -> tuple[int, ...]:
    """The per-step orders of DPM-Solver-fast (Lu et al. 2022, Sec. 3.4) for a budget of
    ``nfe`` model evaluations; ``sum(orders) == nfe``.

    order 3: ``K = nfe // 3 + 1`` steps, ``[3] * (K - 2) + [2, 1]`` if ``nfe % 3 == 0``,
    ``[3] * (K - 1) + [1]`` if ``nfe % 3 == 1``, ``[3] * (K - 1) + [2]`` if ``nfe % 3 == 2``;
    order 2: ``[2] * (nfe // 2)`` (``+ [1]`` if odd); order 1: ``[1] * nfe``.

    Example:
      >>> orders = dpm_solver_fast_orders(10)  # (3, 3, 3, 1)
      >>> ts = grids.uniform_log_snr(len(orders), schedule)  # the outer grid, K + 1 points
      >>> x0 = dpm_solver(den, x_T, ts, order=3, method="fast", nfe=10)
    """
    if isinstance(nfe, bool) or not isinstance(nfe, int | np.integer) or nfe < 1:
        raise ValueError(f"nfe must be a positive int; got {nfe!r}")
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3; got {order!r}")
    nfe = int(nfe)
    if order == 3:
        K = nfe // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[nfe % 3]
        return tuple([3] * (K - len(tail)) + tail)
    if order == 2:
        return tuple([2] * (nfe // 2) + [1] * (nfe % 2))
    return (1,) * nfe


def dpm_solver_orders(
    num_steps: int,
    order: int,
    method: str = "multistep",
    *,
    lower_order_final: bool = True,
    nfe: int | None = None,
) -> tuple[int, ...]:
    """The order of every step of :func:`dpm_solver` / :func:`dpm_solver_pp` on a grid of
    ``num_steps`` steps (before the final step onto ``t = 0``, which is always order 1).

    ``"singlestep"``: ``order`` everywhere (``order`` evaluations per step); ``"fast"``:
    :func:`dpm_solver_fast_orders` (``num_steps`` must match it); ``"multistep"`` (one evaluation
    per step): warm-up ``1, 2, ...``, then ``order``, and with ``lower_order_final`` and
    ``num_steps <`` :data:`LOWER_ORDER_FINAL_STEPS`, ``min(order, steps_left)`` at the end.

    Example:
      >>> dpm_solver_orders(5, 3)
      (1, 2, 3, 2, 1)
    """
    _check_options(order, method, "midpoint", "exact")
    if method == "fast":
        if nfe is None:
            raise ValueError("method='fast' needs the evaluation budget nfe=<int>")
        orders = dpm_solver_fast_orders(nfe, order)
        if num_steps != len(orders):
            raise ValueError(
                f"method='fast' with nfe={nfe}, order={order} takes {len(orders)} outer steps "
                f"{orders}: ts must have {len(orders) + 1} points; got {num_steps + 1}"
            )
        return orders
    if nfe is not None:
        raise ValueError(f"nfe is only used with method='fast'; got nfe={nfe!r}, method={method!r}")
    if method == "singlestep":
        return (order,) * num_steps
    i = np.arange(num_steps)
    k = np.minimum(i + 1, order)  # warm-up
    if lower_order_final and num_steps < LOWER_ORDER_FINAL_STEPS:
        k = np.minimum(k, num_steps - i)
    return tuple(int(a) for a in k)


def _static_bool(x) -> bool | None:
    """``bool(x)`` when ``x`` is concrete, None under tracing."""
    try:
        return bool(x)
    except jax.errors.ConcretizationTypeError:
        return None


# --------------------------------------------------------------------------------------------
# Coefficients (vectorised: scalars, per-step (S,) or per-sample (B,) arrays alike)
# --------------------------------------------------------------------------------------------


def _starts(gc: GridCoeffs) -> GridCoeffs:
    return GridCoeffs(*(a[:-1] for a in gc))


def _ends(gc: GridCoeffs) -> GridCoeffs:
    return GridCoeffs(*(a[1:] for a in gc))


class _Expo(NamedTuple):
    """Coefficients of one exponential-integrator step ``s -> t``."""

    ratio: Array  # alpha_t / alpha_s (noise) or sigma_t / sigma_s (data)
    g_phi1: Array  # g phi_1(z)
    g_phi2: Array  # g phi_2(z)
    g_phi3: Array  # g phi_3(z)


def _expo(s: GridCoeffs, t: GridCoeffs, data: bool) -> _Expo:
    """Step ``s -> t`` from the schedule values at both ends (scalars or arrays alike)."""
    a_s, s_s, a_t, s_t = s.alpha, s.sigma, t.alpha, t.sigma
    h = t.lam - s.lam
    finite = jnp.isfinite(h)
    hs = jnp.where(finite, h, 1.0)  # the limit step onto sigma = 0 is first order only
    z = -hs if data else hs
    phi1 = jnp.expm1(z)
    phi2 = phi1 / z - 1.0
    phi3 = phi2 / z - 0.5
    if data:
        ratio, g = s_t / s_s, a_t
        g_phi1 = a_t * jnp.expm1(-h)  # -alpha_t at sigma_t = 0: returns x0_hat
    else:
        ratio, g = a_t / a_s, s_t
        # sigma_t expm1(h) -> alpha_t sigma_s / alpha_s as sigma_t -> 0 (finite at t = 0).
        g_phi1 = jnp.where(finite, s_t * jnp.expm1(hs), a_t * s_s / a_s)
    return _Expo(ratio, g_phi1, g * phi2, g * phi3)


class _Multistep(NamedTuple):
    """Per-step coefficients of the multistep update (orders mixed by value, not by branch)."""

    ratio: Array
    g_phi1: Array
    c1: Array  # coefficient of D1
    c2: Array  # coefficient of D2
    w: Array  # D1 = D1_0 + w (D1_0 - D1_1)
    r0: Array  # h_0 / h
    r1: Array  # h_1 / h


def _multistep_coeffs(
    k, lam_p2, lam_p1, s: GridCoeffs, t: GridCoeffs, *, data, solver_type, third_order
) -> _Multistep:
    """Coefficients for step order ``k`` (1, 2, 3) of the step ``s -> t`` with the previous
    points at ``lam_p1``, ``lam_p2``; unused history (warm-up) gets finite dummies times 0."""
    e = _expo(s, t, data)
    h = jnp.where(k >= 2, t.lam - s.lam, 1.0)
    r0 = jnp.where(k >= 2, (s.lam - lam_p1) / h, 1.0)
    r1 = jnp.where(k >= 3, (lam_p1 - lam_p2) / h, 1.0)
    # 2M: midpoint -1/2 g phi_1 D1 or taylor -g phi_2 D1; 3M: -g phi_2 D1 - c g phi_3 D2.
    c1_2 = -0.5 * e.g_phi1 if solver_type == "midpoint" else -e.g_phi2
    c1 = jnp.where(k == 1, 0.0, jnp.where(k == 2, c1_2, -e.g_phi2))
    # D2 ~ h^2 M'' / 2, so the exponential-integrator term needs twice the reference weight.
    d2_weight = 2.0 if third_order == "exact" else 1.0
    c2 = jnp.where(k == 3, -d2_weight * e.g_phi3, 0.0)
    w = jnp.where(k == 3, r0 / (r0 + r1), 0.0)
    return _Multistep(e.ratio, e.g_phi1, c1, c2, w, r0, r1)


def _multistep_update(x: Array, M: Array, co: _Multistep) -> Array:
    """``x_t = ratio x - g phi_1 M_0 + c1 D1 + c2 D2``; ``M`` is the history, newest first."""
    f = lambda a: expand_like(a, x)
    x_t = f(co.ratio) * x - f(co.g_phi1) * M[0]
    if M.shape[0] >= 2:
        D1_0 = (M[0] - M[1]) / f(co.r0)
        D1 = D1_0
        if M.shape[0] >= 3:
            D1_1 = (M[1] - M[2]) / f(co.r1)
            D1 = D1_0 + f(co.w) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / f(co.r0 + co.r1)
            x_t = x_t + f(co.c2) * D2
        x_t = x_t + f(co.c1) * D1
    return x_t


class _Singlestep(NamedTuple):
    """Per-step coefficients of a singlestep update with intermediate times ``s1, s2``."""

    t_s: Array
    t_s1: Array
    t_s2: Array
    r1: Array
    r2: Array
    to_t: _Expo  # s -> t
    to_s1: _Expo  # s -> s1
    to_s2: _Expo  # s -> s2


def _singlestep_coeffs(schedule: Schedule, gc, k, data: bool) -> _Singlestep:
    s, t = _starts(gc), _ends(gc)
    h = jnp.where(jnp.isfinite(t.lam - s.lam), t.lam - s.lam, 1.0)
    r1 = jnp.where(k == 3, 1.0 / 3.0, 0.5)  # DPM-Solver-2: r1 = 1/2; -3: r1, r2 = 1/3, 2/3
    r2 = jnp.full_like(r1, 2.0 / 3.0)

    def inner(r):  # s_r = t_lambda(lambda_s + r h)
        t_r = schedule.t_of_log_snr(2.0 * (s.lam + r * h)).astype(s.lam.dtype)
        g = grid_coeffs(schedule, t_r)
        return t_r, _expo(s, g, data)

    t_s1, to_s1 = inner(r1)
    t_s2, to_s2 = inner(r2)
    return _Singlestep(s.t, t_s1, t_s2, r1, r2, _expo(s, t, data), to_s1, to_s2)


# --------------------------------------------------------------------------------------------
# The scans
# --------------------------------------------------------------------------------------------


def _model(den: Denoiser, data: bool) -> Callable[[Array, Array], Array]:
    """``M(x, t)``: ``x0_hat`` (DPM-Solver++) or ``eps_hat`` (DPM-Solver), one evaluation."""
    return lambda x, t: den.predict(x, t)[0 if data else 1]


def _singlestep_branch(
    order: int, M: Callable, solver_type: str
) -> Callable[[Array, _Singlestep], tuple[Array, Array]]:
    f = expand_like

    def step(x, c: _Singlestep):
        e = c.to_t
        m_s = M(x, c.t_s)
        x_t = f(e.ratio, x) * x - f(e.g_phi1, x) * m_s
        if order == 1:  # DPM-Solver-1 == DDIM
            return x_t, m_s
        u_1 = f(c.to_s1.ratio, x) * x - f(c.to_s1.g_phi1, x) * m_s
        m_1 = M(u_1, c.t_s1)
        if order == 2:  # DPM-Solver-2 / ++(2S)
            if solver_type == "midpoint":
                return x_t - f(0.5 / c.r1 * e.g_phi1, x) * (m_1 - m_s), m_s
            return x_t - f(e.g_phi2 / c.r1, x) * (m_1 - m_s), m_s
        # DPM-Solver-3 / ++(3S)
        u_2 = (
            f(c.to_s2.ratio, x) * x
            - f(c.to_s2.g_phi1, x) * m_s
            - f(c.r2 / c.r1 * c.to_s2.g_phi2, x) * (m_1 - m_s)
        )
        m_2 = M(u_2, c.t_s2)
        if solver_type == "midpoint":
            return x_t - f(e.g_phi2 / c.r2, x) * (m_2 - m_s), m_s
        D1_0, D1_1 = (m_1 - m_s) / f(c.r1, x), (m_2 - m_s) / f(c.r2, x)
        D1 = (f(c.r2, x) * D1_0 - f(c.r1, x) * D1_1) / f(c.r2 - c.r1, x)
        D2 = 2.0 * (D1_1 - D1_0) / f(c.r2 - c.r1, x)
        return x_t - f(e.g_phi2, x) * D1 - f(e.g_phi3, x) * D2, m_s

    return step


def _run_singlestep(den, x_T, gc, k, orders_present, data, solver_type, return_trajectory):
    co = _singlestep_coeffs(den.schedule, gc, k, data)
    M = _model(den, data)
    branches = [_singlestep_branch(o, M, solver_type) for o in orders_present]
    branch = jnp.searchsorted(jnp.asarray(orders_present), k)

    def step(x, xs):
        c, b = xs
        if len(branches) == 1:
            x_t, m_s = branches[0](x, c)
        else:
            x_t, m_s = jax.lax.switch(b, branches, x, c)
        x_t = x_t.astype(x.dtype)
        return x_t, (x_t, m_s)

    return run_scan(step, x_T, (co, branch), return_trajectory=return_trajectory)


def _run_multistep(den, x_T, gc, k, order, data, solver_type, third_order, return_trajectory):
    S = gc.t.shape[0] - 1
    lam = gc.lam
    # lambdas of the two previous grid points (dummies before the start, masked by k)
    lam_p1 = jnp.concatenate([lam[:1], lam[: S - 1]])
    lam_p2 = jnp.concatenate([lam[:1], lam[:1], lam[: max(S - 2, 0)]])[:S]
    co = _multistep_coeffs(
        k,
        lam_p2,
        lam_p1,
        _starts(gc),
        _ends(gc),
        data=data,
        solver_type=solver_type,
        third_order=third_order,
    )
    M = _model(den, data)

    def step(carry, xs):
        x, hist = carry  # hist: (order, *x.shape) model outputs, newest first
        t_s, c = xs
        m = M(x, t_s).astype(hist.dtype)
        hist = jnp.concatenate([m[None], hist[:-1]])
        x_t = _multistep_update(x, hist, c).astype(x.dtype)
        return (x_t, hist), (x_t, m)

    hist0 = jnp.zeros((order,) + x_T.shape, x_T.dtype)
    (x, _), out = run_scan(step, (x_T, hist0), (gc.t[:-1], co), return_trajectory=return_trajectory)
    return x, out


def _run_multistep_ts(
    den, x_T, gc, k, order, solver_type, third_order, opts: TimeShift, return_trajectory
):
    """Multistep DPM-Solver with the Time-Shift rule: per-sample times and lambda history."""
    schedule, B, S = den.schedule, x_T.shape[0], gc.t.shape[0] - 1
    M = _model(den, data=False)

    def step(carry, xs):
        x, t_s, hist, lam_hist = carry  # t_s (B,), hist (order, *x.shape), lam_hist (order, B)
        i, t_next, k_i = xs
        eps = M(x, t_s).astype(hist.dtype)
        g_s = grid_coeffs(schedule, t_s)
        hist = jnp.concatenate([eps[None], hist[:-1]])
        lam_hist = jnp.concatenate([g_s.lam[None], lam_hist[:-1]])
        # TS: variance of the last model output, window around the next grid time; the shifted
        # tau is the step's target, the next evaluation time and the next lambda-history entry.
        tau = select_shifted_time(schedule, sample_variance(eps).astype(t_s.dtype), t_next, opts)
        t_t = jnp.where(i + 1 >= order, tau, jnp.broadcast_to(t_next, (B,)))
        g_t = grid_coeffs(schedule, t_t)
        lam_p = [lam_hist[min(j, order - 1)] for j in (1, 2)]
        c = _multistep_coeffs(
            k_i,
            lam_p[1],
            lam_p[0],
            g_s,
            g_t,
            data=False,
            solver_type=solver_type,
            third_order=third_order,
        )
        x_t = _multistep_update(x, hist, c).astype(x.dtype)
        return (x_t, t_t, hist, lam_hist), (x_t, eps, t_t)

    t0 = jnp.broadcast_to(gc.t[0], (B,))
    carry0 = (
        x_T,
        t0,
        jnp.zeros((order,) + x_T.shape, x_T.dtype),
        jnp.zeros((order, B), gc.t.dtype),
    )
    xs = (jnp.arange(S), gc.t[1:], k)
    (x, *_), out = run_scan(step, carry0, xs, return_trajectory=return_trajectory)
    return x, out


def _dpm(
    den,
    x_T,
    ts,
    *,
    data,
    order,
    method,
    solver_type,
    lower_order_final,
    denoise_to_zero,
    third_order,
    nfe,
    time_shift,
    return_trajectory,
    name,
):
    """The shared driver of :func:`dpm_solver` and :func:`dpm_solver_pp`."""
    check_denoiser(den)
    check_x(x_T)
    _check_options(order, method, solver_type, third_order)
    if time_shift is not None:
        if not isinstance(time_shift, TimeShift):
            raise TypeError(
                f"time_shift must be a solvers.TimeShift or None; got {type(time_shift).__name__}"
            )
        if method != "multistep":
            raise ValueError(
                f"time_shift integrates only the multistep {name} (as the official TS-DPM code); "
                f"got method={method!r}"
            )
    min_steps = order if method == "multistep" else 1
    check_grid(ts, min_steps=min_steps, method=f"{name} (method={method!r}, order={order})")
    k = np.array(
        dpm_solver_orders(
            jnp.shape(ts)[0] - 1, order, method, lower_order_final=lower_order_final, nfe=nfe
        )
    )

    cdt = jnp.promote_types(x_T.dtype, jnp.float32)
    gc = grid_coeffs(den.schedule, jnp.asarray(ts, dtype=cdt))
    S = gc.t.shape[0] - 1
    ends_at_zero = ~jnp.isfinite(gc.lam[-1])

    # the static per-step orders, then order 1 on a final step onto sigma = 0
    zero = _static_bool(ends_at_zero)
    present = sorted(set(k.tolist()) | ({1} if zero is not False else set()))
    k = jnp.asarray(k).at[-1].set(jnp.where(ends_at_zero, 1, k[-1]))

    if method != "multistep":
        x, out = _run_singlestep(den, x_T, gc, k, present, data, solver_type, return_trajectory)
        n_eval = jnp.sum(k)
    elif time_shift is not None and time_shift.window > 0:
        x, out = _run_multistep_ts(
            den, x_T, gc, k, order, solver_type, third_order, time_shift, return_trajectory
        )
        n_eval = jnp.asarray(S)
    else:
        x, out = _run_multistep(
            den, x_T, gc, k, order, data, solver_type, third_order, return_trajectory
        )
        n_eval = jnp.asarray(S)

    if denoise_to_zero:  # one more evaluation: x0_hat at the last time (Lu et al., App. D)
        x = den.predict(x, gc.t[-1])[0]
        n_eval = n_eval + 1
    if not return_trajectory:
        return x
    xs, ms = out[0], out[1]
    t = out[2] if len(out) == 3 else gc.t[1:]
    traj = {
        "x": jnp.concatenate([x_T[None], xs]),
        "t": jnp.concatenate([jnp.broadcast_to(gc.t[0], t.shape[1:])[None], t]),
        "x0" if data else "eps": ms,
        "order": k,
        "nfe": n_eval,
    }
    return x, traj


# --------------------------------------------------------------------------------------------
# Public samplers
# --------------------------------------------------------------------------------------------


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
):
    """DPM-Solver (Lu et al., NeurIPS 2022): DPM-Solver-1/2/3, singlestep, multistep and -fast,
    on the noise prediction ``eps_hat``.

    Orders (Algorithms 1-2 of the paper): 1 is DDIM; singlestep 2 evaluates at ``lambda_s +
    h/2``, singlestep 3 at ``lambda_s + h/3`` and ``lambda_s + 2h/3`` (``s_i = t_lambda(.)`` from
    ``schedule.t_of_log_snr``), so a step costs ``order`` evaluations. Multistep (one evaluation
    per step) warms up with orders ``1, ..., order - 1`` and, with ``lower_order_final`` and fewer
    than :data:`LOWER_ORDER_FINAL_STEPS` steps, uses ``min(order, steps_left)`` at the end.
    ``method="fast"`` is DPM-Solver-fast: for a budget ``nfe`` the steps take the orders of
    :func:`dpm_solver_fast_orders` and ``ts`` is the outer grid with one point per step plus one
    (``len(ts) == len(dpm_solver_fast_orders(nfe, order)) + 1``; the paper uses a
    lambda-uniform one). A step onto ``t = 0`` is first order and returns ``x0_hat`` (module
    docstring); the model is never evaluated after the last step.

    Time-Shift (Li et al. 2024, ``time_shift=TimeShift(window, cutoff)``, multistep only, as in
    the official TS-DPM ``dpm_solver_utils.py``): for every step whose target index is ``>=
    order`` (never during warm-up) the per-sample variance of the last model output ``eps_hat``
    selects ``tau`` in a window around the next grid time; ``tau`` replaces the whole next time
    point (the step's target, the next evaluation time and the lambda-history entry), so times
    and coefficients become per-sample. ``window = 0`` is the base sampler exactly.

    Every option is a static Python value (it shapes the program); :func:`dpm_solver_orders`
    gives the per-step orders and hence the NFE.

    Args:
      denoiser: any :class:`~dpm.denoiser.Denoiser` (eps/x0/v; guidance composes through it).
      x_T: ``(B, ...)`` start state at ``ts[0]``.
      ts: ``(S + 1,)`` strictly decreasing times, ``ts[-1] = 0`` allowed.
      key: unused (the solver is deterministic); accepted for the common signature.
      order: 1, 2 or 3 (static).
      method: ``"singlestep"`` (order ``order`` on every step), ``"multistep"`` or ``"fast"``.
      solver_type: ``"midpoint"`` (the papers' ``dpm_solver`` type) or ``"taylor"``; unused by
        order 1 and by the multistep order-3 update.
      lower_order_final: multistep only (see above).
      denoise_to_zero: finish with ``x0_hat(x, ts[-1])``, one more evaluation.
      third_order: multistep order 3: ``"exact"`` (default), the exponential-integrator third
        order update, or ``"reference"``, the update of the official code and diffusers, whose
        ``D2`` term is half the needed one, so that it is only second order.
      nfe: the evaluation budget of ``method="fast"`` (static); must be None otherwise.
      time_shift: :class:`~solvers.time_shift.TimeShift` options or None.
      return_trajectory: also return the trajectory dict.

    Returns:
      ``x_0`` of shape ``x_T.shape``, or ``(x_0, traj)`` with ``traj["x"]`` ``(S + 1, B, ...)``
      states, ``traj["t"]`` ``(S + 1,)`` times (``(S + 1, B)`` with Time-Shift), ``traj["eps"]``
      ``(S, B, ...)`` the model output at each step's start, ``traj["order"]`` ``(S,)`` and
      ``traj["nfe"]`` the number of model evaluations.

    Example:
      >>> ts = grids.uniform_log_snr(10, schedule)
      >>> x0 = jax.jit(dpm_solver, static_argnames=("order", "method"))(
      ...     den, x_T, ts, order=2, method="multistep")
    """
    del key
    return _dpm(
        denoiser,
        x_T,
        ts,
        data=False,
        order=order,
        method=method,
        solver_type=solver_type,
        lower_order_final=lower_order_final,
        denoise_to_zero=denoise_to_zero,
        third_order=third_order,
        nfe=nfe,
        time_shift=time_shift,
        return_trajectory=return_trajectory,
        name="dpm_solver",
    )


def dpm_solver_pp(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    order: int = 2,
    method: str = "multistep",
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    third_order: str = "exact",
    nfe: int | None = None,
    return_trajectory: bool = False,
):
    """DPM-Solver++ (Lu et al. 2022b): ++1, ++(2S), ++(2M), ++(3S), ++(3M) on the data
    prediction ``x0_hat``.

    The same orders, methods, warm-up, ``lower_order_final`` and final step as
    :func:`dpm_solver`, with ``x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) x0_hat + ...``.
    ++(2M) with ``solver_type="midpoint"`` is the paper's Algorithm 2 (the recommended guided
    sampler). A step onto ``t = 0`` is first order and returns the last ``x0_hat`` exactly.
    Guidance and thresholding compose through the denoiser
    (``dpm.classifier_free_guidance``, ``dpm.dynamic_thresholding``): the solver has no
    thresholding code of its own.

    Args:
      denoiser: any :class:`~dpm.denoiser.Denoiser`.
      x_T: ``(B, ...)`` start state at ``ts[0]``.
      ts: ``(S + 1,)`` strictly decreasing times, ``ts[-1] = 0`` allowed.
      key: unused (deterministic); accepted for the common signature.
      order: 1, 2 or 3 (static).
      method: ``"multistep"``, ``"singlestep"`` or ``"fast"`` (see :func:`dpm_solver`).
      solver_type: ``"midpoint"`` or ``"taylor"``.
      lower_order_final: multistep only: with fewer than :data:`LOWER_ORDER_FINAL_STEPS` steps,
        the last steps use ``min(order, steps_left)``.
      denoise_to_zero: finish with ``x0_hat(x, ts[-1])`` (one more evaluation).
      third_order: ++(3M): ``"exact"`` (default, third order) or ``"reference"`` (the official
        and diffusers update, second order: its ``D2`` term is half the needed one).
      nfe: the evaluation budget of ``method="fast"``.
      return_trajectory: also return the trajectory dict (as :func:`dpm_solver`, with
        ``traj["x0"]`` the model outputs).

    Returns:
      ``x_0`` of shape ``x_T.shape``, or ``(x_0, traj)``.

    Example:
      >>> guided = dpm.classifier_free_guidance(den, 7.5, null_cond)
      >>> x0 = dpm_solver_pp(dpm.dynamic_thresholding(guided), x_T, ts, order=2)
    """
    del key
    return _dpm(
        denoiser,
        x_T,
        ts,
        data=True,
        order=order,
        method=method,
        solver_type=solver_type,
        lower_order_final=lower_order_final,
        denoise_to_zero=denoise_to_zero,
        third_order=third_order,
        nfe=nfe,
        time_shift=None,
        return_trajectory=return_trajectory,
        name="dpm_solver_pp",
    )
