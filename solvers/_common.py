"""Shared pieces of the samplers: input checks, per-grid coefficients, the scan driver.

Every sampler computes its per-step coefficient arrays once from the schedule and the grid,
then runs one ``lax.scan``; nothing here runs inside a scan body except :func:`ddim_map`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser, expand_like
from dpm.schedules import Schedule

Array = jax.Array

__all__ = [
    "check_grid",
    "check_denoiser",
    "check_x",
    "require_key",
    "GridCoeffs",
    "grid_coeffs",
    "ddim_map",
    "run_scan",
    "finish",
]


def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_denoiser(denoiser: Any) -> None:
    if not isinstance(denoiser, Denoiser):
        raise TypeError(f"denoiser must be a dpm.Denoiser; got {type(denoiser).__name__}")


def check_x(x_T: Array, name: str = "x_T") -> None:
    if not hasattr(x_T, "shape") or jnp.ndim(x_T) < 1:
        raise ValueError(f"{name} must be an array of shape (B, ...); got {x_T!r:.80}")
    if not jnp.issubdtype(jnp.result_type(x_T), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {jnp.result_type(x_T)}")


def check_grid(ts: Array, *, min_steps: int = 1, method: str = "sampler", name: str = "ts") -> None:
    """Validates a time grid: 1-D, at least ``min_steps + 1`` points, strictly monotone
    decreasing, inside ``[0, 1]`` (values are checked when concrete; shapes always).

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
    if _concrete(ts):
        a = np.asarray(ts, dtype=np.float64)
        if np.any(~np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise ValueError(
                f"{name} must lie in [0, 1]; got values in [{np.nanmin(a):.6g}, {np.nanmax(a):.6g}]"
            )
        d = np.diff(a)
        if np.any(d >= 0):
            i = int(np.argmax(d >= 0))
            raise ValueError(
                f"{name} must be strictly decreasing (ts[0] start, ts[-1] end); "
                f"got {name}[{i}] = {a[i]:.6g} <= {name}[{i + 1}] = {a[i + 1]:.6g}"
            )


def require_key(key: Array | None, method: str) -> Array:
    if key is None:
        raise ValueError(f"{method} is stochastic and needs a PRNG key: pass key=jax.random.key(0)")
    return key


class GridCoeffs(NamedTuple):
    """Schedule quantities on a grid, each of shape ``ts.shape``.

    ``lam`` is the *half* log-SNR ``log(alpha / sigma)`` of DPM-Solver (``+inf`` at ``t = 0``).
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


def ddim_map(x_s: Array, x0: Array, eps: Array, a_t: Array, s_t: Array) -> Array:
    """The deterministic DDIM map to time ``t``: ``alpha_t x0_hat + sigma_t eps_hat``.

    ``a_t``, ``s_t`` are scalars or per-example ``(B,)``; at ``t = 0`` this returns ``x0_hat``.
    """
    return expand_like(a_t, x_s) * x0 + expand_like(s_t, x_s) * eps


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


def finish(x_start: Array, x_end: Array, traj: Any, nfe: int, *, return_trajectory: bool):
    """A sampler's return value: ``x_end``, or ``(x_end, traj)`` with the start state prepended
    to ``traj["x"]`` (all ``S + 1`` states) and the number of network evaluations."""
    if not return_trajectory:
        return x_end
    traj["x"] = jnp.concatenate([x_start[None], traj["x"]])
    traj["nfe"] = jnp.asarray(nfe)
    return x_end, traj
