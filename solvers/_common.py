"""Shared pieces of the samplers: input checks, the preamble every sampler starts with, per-grid
coefficients, and the one-step maps more than one sampler family uses.

Every sampler starts with :func:`prepare` (checks, working dtype, schedule values on the grid),
computes its per-step coefficient arrays once, outside the scan, and runs one ``lax.scan``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser, expand_like
from dpm.schedules import Schedule
from solvers.time_shift import TimeShift, sample_variance, select_shifted_time

Array = jax.Array

__all__ = [
    "Array",
    "check_denoiser",
    "check_x",
    "check_grid",
    "require_key",
    "static_option",
    "check_choice",
    "check_int",
    "check_flag",
    "check_time_shift",
    "work_dtype",
    "GridCoeffs",
    "grid_coeffs",
    "Prepared",
    "prepare",
    "run_scan",
    "finish",
    "posterior_coeffs",
    "ddim_map",
    "transfer_coeffs",
    "transfer",
    "shift_target",
    "EDM_SOLVERS",
    "EDMPoint",
    "edm_point",
    "edm_denoise",
    "edm_step",
    "LOWER_ORDER_FINAL_STEPS",
    "dpm_solver_fast_orders",
    "dpm_solver_orders",
    "ExpoCoeffs",
    "expo_coeffs",
    "SinglestepCoeffs",
    "singlestep_coeffs",
    "MultistepCoeffs",
    "multistep_coeffs",
    "push",
]


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_denoiser(denoiser: Any) -> None:
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a dpm.Denoiser; got {type(denoiser).__name__}")


def check_x(x_T: Array, name: str = "x_T") -> None:
    if not hasattr(x_T, "shape") or jnp.ndim(x_T) < 1:
        raise ValueError(f"{name} must be an array of shape (B, ...); got {x_T!r:.80}")
    if not jnp.issubdtype(jnp.result_type(x_T), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {jnp.result_type(x_T)}")


def _grid_problem(a: np.ndarray, name: str) -> str | None:
    """What is wrong with the grid values ``a`` (``(..., S + 1)``, rows checked alike), or None."""
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        return f"{name} must be finite; got NaN or inf in {np.array2string(a, precision=4)}"
    if a.min() < 0 or a.max() > 1:
        return f"{name} must lie in [0, 1]; got values in [{a.min():.6g}, {a.max():.6g}]"
    d = np.diff(a, axis=-1)
    if np.any(d >= 0):
        row = a.reshape(-1, a.shape[-1])[int(np.argmax(np.any(d.reshape(-1, d.shape[-1]) >= 0, 1)))]
        i = int(np.argmax(np.diff(row) >= 0))
        return (
            f"{name} must be strictly decreasing (ts[0] start, ts[-1] end); "
            f"got {name}[{i}] = {row[i]:.6g} <= {name}[{i + 1}] = {row[i + 1]:.6g}"
        )
    return None


def _raise_grid_problem(a, *, name: str, method: str) -> None:
    """Host side of the run-time grid check (``jax.debug.callback``)."""
    problem = _grid_problem(np.asarray(a), name)
    if problem is not None:
        raise ValueError(f"{method}: {problem}")


def check_grid(ts: Array, *, min_steps: int = 1, method: str = "sampler", name: str = "ts") -> None:
    """Validates a time grid: 1-D, at least ``min_steps + 1`` points, finite, inside ``[0, 1]``,
    strictly decreasing.

    The shape is checked at trace time. Values are checked at once when ``ts`` is concrete. A
    traced ``ts`` (``jax.jit`` / ``vmap`` / ``grad`` over the grid) is checked when the program
    runs: the test is part of the program, and only when it fails is the host called (a
    ``jax.debug.callback`` in the failing branch of a ``lax.cond``), which fails the call with a
    runtime error whose message is this ValueError's (it names ``ts`` and the problem), never
    with silent NaNs. A good grid costs no host round trip (a callback on every call cost ~0.3 ms
    a call on a CPU). The callback's effect still takes the call off JAX's C++ dispatch path
    (~0.1 ms a call; ``experiments.bench_overhead`` measures it). A ``jax.pure_callback`` would
    not, but on a program over several devices it runs on one device only, and its failure
    there leaves the others waiting in a collective (a hang, then an abort), so it is not used.

    Raises:
      ValueError naming ``name``, what it got and what was expected.
    """
    if jnp.ndim(ts) != 1:
        raise ValueError(f"{name} must be a 1-D array of times; got shape {jnp.shape(ts)}")
    n = jnp.shape(ts)[0] - 1
    if n < min_steps:
        raise ValueError(
            f"{method} needs at least {min_steps} step(s), i.e. len({name}) >= {min_steps + 1}; "
            f"got len({name}) = {n + 1}"
        )
    if _traced(ts):
        check = functools.partial(_raise_grid_problem, name=name, method=method)
        a = jax.lax.stop_gradient(ts)
        ok = jnp.all(jnp.isfinite(a)) & jnp.all((a >= 0) & (a <= 1)) & jnp.all(jnp.diff(a) < 0)
        jax.lax.cond(ok, lambda a: None, lambda a: jax.debug.callback(check, a), a)
        return
    problem = _grid_problem(np.asarray(ts), name)
    if problem is not None:
        raise ValueError(problem)


def require_key(key: Array | None, method: str) -> Array:
    if key is None:
        raise ValueError(f"{method} is stochastic and needs a PRNG key: pass key=jax.random.key(0)")
    return key


def static_option(value: Any, name: str, sampler: str) -> None:
    """Refuses a traced static option (one that shapes the program) with the way to pass it."""
    if _traced(value):
        raise TypeError(
            f"{sampler}: {name} is a static option (it shapes the program) but arrived traced, "
            f"as under jax.jit(solvers.{sampler})(..., {name}=...). Pass it outside the trace: "
            f"jax.jit(functools.partial(solvers.{sampler}, {name}=...)) or "
            f"jax.jit(solvers.{sampler}, static_argnames=({name!r},))"
        )


def check_choice(value: Any, name: str, choices: Sequence[str], sampler: str) -> None:
    """A static string option: one of ``choices``."""
    static_option(value, name, sampler)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")


def check_int(value: Any, name: str, choices: Sequence[int], sampler: str) -> int:
    """A static integer option (a Python or numpy int, not a bool or float) in ``choices``."""
    static_option(value, name, sampler)
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not ok or int(value) not in choices:
        kind = "" if ok else f" (an int; got a {type(value).__name__})"
        raise ValueError(f"{name} must be {' or '.join(map(str, choices))}{kind}; got {value!r}")
    return int(value)


def check_flag(value: Any, name: str, sampler: str) -> bool:
    """A static boolean option."""
    static_option(value, name, sampler)
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a bool (static); got {value!r}")
    return bool(value)


def check_time_shift(time_shift: Any) -> bool:
    """Whether a ``time_shift`` option shifts (a TimeShift with ``window > 0``)."""
    if time_shift is not None and not isinstance(time_shift, TimeShift):
        raise TypeError(
            f"time_shift must be a solvers.TimeShift or None; got {type(time_shift).__name__}"
        )
    return time_shift is not None and time_shift.window > 0


# --------------------------------------------------------------------------------------------
# The preamble
# --------------------------------------------------------------------------------------------


def work_dtype(x: Array, ts: Array | None = None) -> jnp.dtype:
    """The dtype samplers integrate in: that of ``x`` and ``ts``, at least float32 (a bfloat16
    or float16 state is integrated in float32; ``alpha`` near 1 would collapse otherwise)."""
    dts = [jnp.result_type(x)] + ([] if ts is None else [jnp.result_type(ts)])
    return jnp.result_type(*dts, jnp.float32)


class GridCoeffs(NamedTuple):
    """Schedule quantities on a grid, each of shape ``ts.shape``.

    ``lam`` is the *half* log-SNR ``log(alpha / sigma)`` of DPM-Solver (``+inf`` at ``t = 0``);
    ``sigma_bar = sigma / alpha`` is EDM's noise level.
    """

    t: Array
    alpha: Array
    sigma: Array
    lam: Array
    sigma_bar: Array


def grid_coeffs(schedule: Schedule, ts: Array) -> GridCoeffs:
    ts = jnp.asarray(ts)
    la, ls = schedule.log_alpha(ts), schedule.log_sigma(ts)
    return GridCoeffs(ts, jnp.exp(la), jnp.exp(ls), la - ls, jnp.exp(ls - la))


class Prepared(NamedTuple):
    """What :func:`prepare` returns: the state and grid in the working dtype."""

    x: Array  # (B, ...) the start state, cast to dtype
    gc: GridCoeffs  # schedule values on ts, each (S + 1,)
    S: int  # number of steps
    dtype: jnp.dtype  # the working dtype


def prepare(
    denoiser: Denoiser,
    x: Array,
    ts: Array,
    *,
    sampler: str,
    min_steps: int = 1,
    x_name: str = "x_T",
    return_trajectory: Any = False,
    label: str | None = None,
) -> Prepared:
    """The preamble of every sampler: checks the denoiser, the state and the grid (at run time
    when traced), the static ``return_trajectory``, and returns the state and the schedule values
    on the grid in the working dtype (:func:`work_dtype`). ``label`` names the sampler in grid
    errors (default ``sampler``)."""
    check_denoiser(denoiser)
    check_x(x, x_name)
    check_flag(return_trajectory, "return_trajectory", sampler)
    check_grid(ts, min_steps=min_steps, method=label or sampler)
    dt = work_dtype(x, ts)
    gc = grid_coeffs(denoiser.schedule, jnp.asarray(ts, dt))
    return Prepared(x.astype(dt), gc, gc.t.shape[0] - 1, dt)


def run_scan(
    step: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any,
    *,
    return_trajectory: bool,
) -> tuple[Any, Any]:
    """``lax.scan(step, carry, xs)``; the per-step outputs are dropped (``None``) unless
    ``return_trajectory`` so no trajectory memory is allocated by default."""
    if return_trajectory:
        return jax.lax.scan(step, carry, xs)

    def no_out(c, x):
        c, _ = step(c, x)
        return c, None

    return jax.lax.scan(no_out, carry, xs)


def finish(x_start: Array, x_end: Array, traj: Any, nfe: Any, *, return_trajectory: bool):
    """A sampler's return value: ``x_end`` in the dtype of ``x_start``, or ``(x_end, traj)`` with
    the start state prepended to ``traj["x"]`` (all ``S + 1`` states) and the number of network
    evaluations."""
    x_end = x_end.astype(x_start.dtype)
    if not return_trajectory:
        return x_end
    traj["x"] = jnp.concatenate([x_start[None], traj["x"].astype(x_start.dtype)])
    traj["nfe"] = jnp.asarray(nfe)
    return x_end, traj


# --------------------------------------------------------------------------------------------
# DDPM's posterior (DDPM, DDGAN), DDIM's map (DDIM, DDPM, PNDM, BDIA-DDIM), the Time-Shift target
# --------------------------------------------------------------------------------------------


def posterior_coeffs(schedule: Schedule, s: Array, t: Array, variance: str = "fixed_small"):
    """``(c_x0, c_x, var)`` of the posterior ``q(x_t | x_s, x0) = N(c_x0 x0 + c_x x_s, var)``
    of a step ``s -> t`` (``t < s``); DDPM's and DDGAN's ancestral step.

    With ``r = 1 - (alpha_s sigma_t / (alpha_t sigma_s))^2`` (VP: ``r = beta' / (1 - alpha_bar_s)``,
    ``beta' = 1 - alpha_bar_s / alpha_bar_t``): ``c_x0 = alpha_t r``, ``c_x = (alpha_s /
    alpha_t)(sigma_t / sigma_s)^2``, ``fixed_small = sigma_t^2 r`` (beta tilde), ``fixed_large =
    sigma_s^2 r`` (beta'). Valid for any schedule (VDM form); ``t = 0`` gives ``(1, 0, 0)``.
    ``s``, ``t`` broadcast; ``variance`` is ``"fixed_small"`` or ``"fixed_large"``.
    """
    la_s, ls_s = schedule.log_alpha(s), schedule.log_sigma(s)
    la_t, ls_t = schedule.log_alpha(t), schedule.log_sigma(t)
    lam_s, lam_t = la_s - ls_s, la_t - ls_t
    r = -jnp.expm1(2.0 * (lam_s - lam_t))
    c_x0 = jnp.exp(la_t) * r
    c_x = jnp.exp(la_s - la_t + 2.0 * (ls_t - ls_s))
    var = jnp.exp(2.0 * (ls_t if variance == "fixed_small" else ls_s)) * r
    return c_x0, c_x, var


def ddim_map(x_s: Array, x0: Array, eps: Array, a_t: Array, s_t: Array) -> Array:
    """The deterministic DDIM map to time ``t``: ``alpha_t x0_hat + sigma_t eps_hat``.

    ``a_t``, ``s_t`` are scalars or per-example ``(B,)``; at ``t = 0`` this returns ``x0_hat``.
    """
    return expand_like(a_t, x_s) * x0 + expand_like(s_t, x_s) * eps


def _logs(schedule: Schedule, t: Array) -> tuple[Array, Array, Array]:
    la, ls = schedule.log_alpha(t), schedule.log_sigma(t)
    return la, ls, la - ls


def transfer_coeffs(schedule: Schedule, s: Array, t: Array, upward: bool = False):
    """``(c_x, c_eps)`` of the DDIM map ``s -> t`` in PNDM's increment form,
    ``x_t = x_s + c_x x_s + c_eps eps_hat`` (cancellation-free for tiny steps).

    ``s``, ``t`` broadcast (per step outside a scan, per example inside one). ``c_x =
    expm1(log alpha_t - log alpha_s)``; ``c_eps = sigma_t - alpha_t sigma_s / alpha_s`` is
    written with a non-positive ``expm1`` argument: finite at ``t = 0`` going down, and at
    ``s = 0`` going up (``upward``, for inversion).
    """
    la_s, ls_s, lam_s = _logs(schedule, s)
    la_t, ls_t, lam_t = _logs(schedule, t)
    c_x = jnp.expm1(la_t - la_s)
    if upward:
        c_eps = -jnp.exp(ls_t) * jnp.expm1(lam_t - lam_s)
    else:
        c_eps = jnp.exp(la_t - la_s + ls_s) * jnp.expm1(lam_s - lam_t)
    return c_x, c_eps


def transfer(x: Array, eps: Array, c_x: Array, c_eps: Array) -> Array:
    """PNDM's transfer ``phi(x, eps, s -> t)`` with coefficients from :func:`transfer_coeffs`."""
    return x + expand_like(c_x, x) * x + expand_like(c_eps, x) * eps


def shift_target(
    schedule: Schedule, x: Array, t_cur: Array, t_next: Array, i: Array, opts: TimeShift
) -> Array:
    """Time-Shift target of step ``i`` (official ``pnm_solver.py`` semantics, for DDPM, DDIM and
    PNDM): ``tau`` chosen from the variance of the current state around the next grid time;
    ``(B,)``. The first step (``i = 0``) is never shifted; the cutoff is applied by
    :func:`~solvers.time_shift.select_shifted_time`. A window wider than the grid's stride can
    pick a ``tau`` at or above the current time ``t_cur`` (a step upward: DDPM's posterior
    variance turns negative and its samples NaN); there the unshifted ``t_next`` is kept."""
    tau = select_shifted_time(schedule, sample_variance(x), t_next, opts)
    return jnp.where((i > 0) & (tau < t_cur), tau, t_next)


# --------------------------------------------------------------------------------------------
# EDM's one-step map (EDM, BDIA-EDM)
# --------------------------------------------------------------------------------------------

EDM_SOLVERS = ("euler", "heun")


class EDMPoint(NamedTuple):
    """A point of the EDM time axis: time, ``alpha`` and ``sigma_bar`` (scalars or ``(S,)``)."""

    t: Array
    alpha: Array
    sigma_bar: Array


def edm_point(g: GridCoeffs | None) -> EDMPoint | None:
    return None if g is None else EDMPoint(g.t, g.alpha, g.sigma_bar)


def edm_denoise(den: Denoiser, x_bar: Array, p: EDMPoint) -> tuple[Array, Array]:
    """One model evaluation at ``(x_bar; sigma_bar(t))``: ``(D, d)`` with ``d = eps_hat``, the
    slope ``(x_bar - D) / sigma_bar`` of EDM's ODE without the division."""
    return den.predict(p.alpha * x_bar, p.t)


def edm_step(
    den: Denoiser,
    x_bar: Array,
    d_cur: Array,
    cur: EDMPoint,
    nxt: EDMPoint,
    solver: str,
    *,
    may_end_at_zero: bool,
) -> Array:
    """EDM's one-step map ``x_bar(sigma_bar_cur) -> x_bar(sigma_bar_nxt)`` (Karras et al. 2022,
    Algorithm 1, lines 5-8) given ``d_cur = d(x_bar; sigma_bar_cur)``; either direction.

    Heun evaluates the model once more at the Euler point; onto ``sigma_bar = 0`` it is an Euler
    step (line 6's ``if``). ``may_end_at_zero`` (static) marks the one step of a grid whose target
    may be ``t = 0``; only there is the ``if`` a ``lax.cond``.
    """
    h = nxt.sigma_bar - cur.sigma_bar
    x_euler = x_bar + h * d_cur  # Euler step
    if solver == "euler":
        return x_euler

    def heun():  # 2nd-order correction
        _, d_nxt = edm_denoise(den, x_euler, nxt)
        return x_bar + h * (0.5 * d_cur + 0.5 * d_nxt)

    if not may_end_at_zero:
        return heun()
    return jax.lax.cond(nxt.t > 0, heun, lambda: x_euler)


# --------------------------------------------------------------------------------------------
# DPM-Solver and DPM-Solver++: per-step orders and exponential-integrator coefficients
# --------------------------------------------------------------------------------------------

#: ``lower_order_final`` lowers the last steps' orders only when the grid has fewer steps than
#: this (the threshold of the official docstring, diffusers and the TS-DPM fork).
LOWER_ORDER_FINAL_STEPS = 15


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
    static_option(nfe, "nfe", "dpm_solver")
    if isinstance(nfe, bool) or not isinstance(nfe, int | np.integer) or nfe < 1:
        raise ValueError(f"nfe must be a positive int; got {nfe!r}")
    order = check_int(order, "order", (1, 2, 3), "dpm_solver")
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
    """The order of every step of ``dpm_solver`` / ``dpm_solver_pp`` on a grid of
    ``num_steps`` steps (before the final step onto ``t = 0``, which is always order 1).

    ``"singlestep"``: ``order`` everywhere (``order`` evaluations per step); ``"fast"``:
    :func:`dpm_solver_fast_orders` (``num_steps`` must match it); ``"multistep"`` (one evaluation
    per step): warm-up ``1, 2, ...``, then ``order``, and with ``lower_order_final`` and
    ``num_steps <`` :data:`LOWER_ORDER_FINAL_STEPS`, ``min(order, steps_left)`` at the end.

    Example:
      >>> dpm_solver_orders(5, 3)
      (1, 2, 3, 2, 1)
    """
    order = check_int(order, "order", (1, 2, 3), "dpm_solver")
    check_choice(method, "method", ("singlestep", "multistep", "fast"), "dpm_solver")
    lower_order_final = check_flag(lower_order_final, "lower_order_final", "dpm_solver")
    static_option(nfe, "nfe", "dpm_solver")
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


def _starts(gc: GridCoeffs) -> GridCoeffs:
    return GridCoeffs(*(a[:-1] for a in gc))


def _ends(gc: GridCoeffs) -> GridCoeffs:
    return GridCoeffs(*(a[1:] for a in gc))


class ExpoCoeffs(NamedTuple):
    """Coefficients of one exponential-integrator step ``s -> t`` (see :mod:`solvers.dpm_solver`):
    ``x_t = ratio x_s - g phi_1 M_s - g phi_2 D1 - g phi_3 D2``."""

    ratio: Array  # alpha_t / alpha_s (noise) or sigma_t / sigma_s (data)
    g_phi1: Array  # g phi_1(z)
    g_phi2: Array  # g phi_2(z)
    g_phi3: Array  # g phi_3(z)


def expo_coeffs(s: GridCoeffs, t: GridCoeffs, data: bool) -> ExpoCoeffs:
    """Step ``s -> t`` from the schedule values at both ends (scalars or arrays alike);
    ``data``: DPM-Solver++ (``M = x0_hat``), else DPM-Solver (``M = eps_hat``)."""
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
    return ExpoCoeffs(ratio, g_phi1, g * phi2, g * phi3)


class SinglestepCoeffs(NamedTuple):
    """Per-step coefficients of a singlestep update with intermediate times ``s1, s2``."""

    t_s: Array
    t_s1: Array
    t_s2: Array
    r1: Array
    r2: Array
    to_t: ExpoCoeffs  # s -> t
    to_s1: ExpoCoeffs  # s -> s1
    to_s2: ExpoCoeffs  # s -> s2


def singlestep_coeffs(schedule: Schedule, gc: GridCoeffs, k: Array, data: bool):
    """Per-step ``(S,)`` coefficients of singlestep steps of orders ``k``: DPM-Solver-2 evaluates
    at ``lambda_s + h/2``, DPM-Solver-3 at ``lambda_s + h/3`` and ``lambda_s + 2h/3``."""
    s, t = _starts(gc), _ends(gc)
    h = jnp.where(jnp.isfinite(t.lam - s.lam), t.lam - s.lam, 1.0)
    r1 = jnp.where(k == 3, 1.0 / 3.0, 0.5)
    r2 = jnp.full_like(r1, 2.0 / 3.0)

    def inner(r):  # s_r = t_lambda(lambda_s + r h)
        t_r = schedule.t_of_log_snr(2.0 * (s.lam + r * h)).astype(s.lam.dtype)
        return t_r, expo_coeffs(s, grid_coeffs(schedule, t_r), data)

    t_s1, to_s1 = inner(r1)
    t_s2, to_s2 = inner(r2)
    return SinglestepCoeffs(s.t, t_s1, t_s2, r1, r2, expo_coeffs(s, t, data), to_s1, to_s2)


class MultistepCoeffs(NamedTuple):
    """Per-step coefficients of the multistep update (orders mixed by value, not by branch):
    ``x_t = ratio x_s - g_phi1 M_0 + c1 D1 + c2 D2``."""

    ratio: Array
    g_phi1: Array
    c1: Array  # coefficient of D1
    c2: Array  # coefficient of D2
    w: Array  # D1 = D1_0 + w (D1_0 - D1_1)
    r0: Array  # h_0 / h
    r1: Array  # h_1 / h


def multistep_coeffs(
    k, lam_p2, lam_p1, s: GridCoeffs, t: GridCoeffs, *, data, solver_type, third_order
) -> MultistepCoeffs:
    """Coefficients for step order ``k`` (1, 2, 3) of the step ``s -> t`` with the previous
    points at ``lam_p1``, ``lam_p2``; unused history (warm-up) gets finite dummies times 0."""
    e = expo_coeffs(s, t, data)
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
    return MultistepCoeffs(e.ratio, e.g_phi1, c1, c2, w, r0, r1)


def grid_multistep_coeffs(gc: GridCoeffs, k: Array, **kw) -> MultistepCoeffs:
    """:func:`multistep_coeffs` of every step of a grid (``(S,)`` each)."""
    S, lam = gc.t.shape[0] - 1, gc.lam
    # lambdas of the two previous grid points (dummies before the start, masked by k)
    lam_p1 = jnp.concatenate([lam[:1], lam[: S - 1]])
    lam_p2 = jnp.concatenate([lam[:1], lam[:1], lam[: max(S - 2, 0)]])[:S]
    return multistep_coeffs(k, lam_p2, lam_p1, _starts(gc), _ends(gc), **kw)


__all__ += ["grid_multistep_coeffs"]


def push(hist: Array, m: Array) -> Array:
    """Prepends ``m`` to a history ``(K, ...)`` (newest first), dropping the oldest entry."""
    return jnp.concatenate([m[None].astype(hist.dtype), hist[:-1]])


# --------------------------------------------------------------------------------------------
# DPM-Solver and DPM-Solver++: the preamble and the two updates
# --------------------------------------------------------------------------------------------

DPM_METHODS = ("singlestep", "multistep", "fast")
DPM_SOLVER_TYPES = ("midpoint", "taylor")
DPM_THIRD_ORDER = ("exact", "reference")


class DPMSetup(NamedTuple):
    """What :func:`dpm_prepare` returns."""

    x: Array  # (B, ...) start state in the working dtype
    gc: GridCoeffs  # schedule values on ts, (S + 1,) each
    S: int  # number of steps
    k: Array  # (S,) the order of every step (1 on a final step onto t = 0)
    present: tuple[int, ...]  # the orders that may occur (static: one branch each)
    order: int


def dpm_prepare(
    denoiser,
    x_T,
    ts,
    *,
    sampler,
    order,
    method,
    solver_type,
    lower_order_final,
    denoise_to_zero,
    third_order,
    nfe,
    return_trajectory,
) -> DPMSetup:
    """The preamble of ``dpm_solver`` and ``dpm_solver_pp``: option checks, :func:`prepare`,
    and the per-step orders (:func:`dpm_solver_orders`, then order 1 onto ``t = 0``)."""
    order = check_int(order, "order", (1, 2, 3), sampler)
    check_choice(method, "method", DPM_METHODS, sampler)
    check_choice(solver_type, "solver_type", DPM_SOLVER_TYPES, sampler)
    check_choice(third_order, "third_order", DPM_THIRD_ORDER, sampler)
    lower_order_final = check_flag(lower_order_final, "lower_order_final", sampler)
    check_flag(denoise_to_zero, "denoise_to_zero", sampler)
    static_option(nfe, "nfe", sampler)
    p = prepare(
        denoiser,
        x_T,
        ts,
        sampler=sampler,
        return_trajectory=return_trajectory,
        min_steps=order if method == "multistep" else 1,
        label=f"{sampler} (method={method!r}, order={order})",
    )
    k = dpm_solver_orders(p.S, order, method, lower_order_final=lower_order_final, nfe=nfe)
    k = np.array(k)
    ends_at_zero = ~jnp.isfinite(p.gc.lam[-1])  # the last step is then first order
    zero = None if _traced(ends_at_zero) else bool(ends_at_zero)
    present = tuple(sorted(set(k.tolist()) | ({1} if zero is not False else set())))
    k = jnp.asarray(k).at[-1].set(jnp.where(ends_at_zero, 1, k[-1]))
    return DPMSetup(p.x, p.gc, p.S, k, present, order)


def singlestep_update(
    order: int, M: Callable[[Array, Array], Array], solver_type: str
) -> Callable[[Array, SinglestepCoeffs], tuple[Array, Array]]:
    """One singlestep step of order ``order`` (static): DPM-Solver-1/2/3 (Lu et al. 2022,
    Algorithms 1-2 and App. B) or DPM-Solver++(1/2S/3S) by the sign of the coefficients.
    Returns ``step(x_s, c) -> (x_t, M_s)``."""
    f = expand_like

    def step(x, c: SinglestepCoeffs):
        e = c.to_t
        m_s = M(x, c.t_s)
        x_t = f(e.ratio, x) * x - f(e.g_phi1, x) * m_s
        if order == 1:  # DPM-Solver-1 == DDIM
            return x_t, m_s
        u_1 = f(c.to_s1.ratio, x) * x - f(c.to_s1.g_phi1, x) * m_s  # u_1 at s_1
        m_1 = M(u_1, c.t_s1)
        if order == 2:  # DPM-Solver-2 / ++(2S)
            if solver_type == "midpoint":
                return x_t - f(0.5 / c.r1 * e.g_phi1, x) * (m_1 - m_s), m_s
            return x_t - f(e.g_phi2 / c.r1, x) * (m_1 - m_s), m_s
        u_2 = (  # DPM-Solver-3 / ++(3S): u_2 at s_2
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

    def cast(x, c):
        x_t, m_s = step(x, c)
        return x_t.astype(x.dtype), m_s

    return cast


def multistep_update(x: Array, hist: Array, co: MultistepCoeffs) -> Array:
    """``x_t = ratio x - g phi_1 M_0 + c1 D1 + c2 D2`` (DPM-Solver++(2M), Algorithm 2, and its
    third-order extension); ``hist`` ``(K, *x.shape)`` is the model-output history, newest
    first; ``D1``, ``D2`` are its divided differences in ``lambda``."""
    f = lambda a: expand_like(a, x)
    x_t = f(co.ratio) * x - f(co.g_phi1) * hist[0]
    if hist.shape[0] >= 2:
        D1_0 = (hist[0] - hist[1]) / f(co.r0)
        D1 = D1_0
        if hist.shape[0] >= 3:
            D1_1 = (hist[1] - hist[2]) / f(co.r1)
            D1 = D1_0 + f(co.w) * (D1_0 - D1_1)
            D2 = (D1_0 - D1_1) / f(co.r0 + co.r1)
            x_t = x_t + f(co.c2) * D2
        x_t = x_t + f(co.c1) * D1
    return x_t.astype(x.dtype)


def dpm_finish(x_T, x, out, gc: GridCoeffs, k, n_eval, *, name: str, return_trajectory: bool):
    """The return value of ``dpm_solver`` / ``dpm_solver_pp``: ``x`` in ``x_T``'s dtype, or
    ``(x, traj)``; ``out = (states, model outputs[, per-sample times])`` from the scan."""
    x = x.astype(x_T.dtype)
    if not return_trajectory:
        return x
    xs, ms = out[0], out[1]
    t = out[2] if len(out) == 3 else gc.t[1:]
    return x, {
        "x": jnp.concatenate([x_T[None], xs.astype(x_T.dtype)]),
        "t": jnp.concatenate([jnp.broadcast_to(gc.t[0], t.shape[1:])[None], t]),
        name: ms,
        "order": k,
        "nfe": n_eval,
    }


__all__ += [
    "DPM_METHODS",
    "DPMSetup",
    "dpm_prepare",
    "singlestep_update",
    "multistep_update",
    "dpm_finish",
]
