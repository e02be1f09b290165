"""DPM-Solver++ (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"): the DPM-Solver family on the data prediction ``x0_hat``.

With ``h = lambda_t - lambda_s`` (``lambda = log(alpha / sigma)``) the exact solution is

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lam} x0(lam) dlam,

and with ``phi_1 = expm1(-h)``, ``phi_2 = phi_1 / (-h) - 1``, ``phi_3 = phi_2 / (-h) - 1/2``
every update reads ``x_t = (sigma_t / sigma_s) x_s - alpha_t phi_1 x0_s - alpha_t phi_2 D1 -
alpha_t phi_3 D2``. Algorithm 1 is DPM-Solver++(2S) (an intermediate point at ``lambda_s +
h/2``), Algorithm 2 DPM-Solver++(2M) (``D1`` from the previous step's ``x0_hat``). A step onto
``t = 0`` returns the last ``x0_hat`` exactly (``sigma_t / sigma_s = 0``, ``phi_1 = -1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser
from solvers._common import (
    Array,
    dpm_finish,
    dpm_prepare,
    grid_multistep_coeffs,
    multistep_update,
    push,
    run_scan,
    singlestep_coeffs,
    singlestep_update,
)

__all__ = ["dpm_solver_pp"]


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
) -> Array | tuple[Array, dict]:
    """DPM-Solver++ (Lu et al. 2022b), Algorithms 1 (++(2S)) and 2 (++(2M)), with orders 1-3,
    on the data prediction ``x0_hat``.

    The orders, methods, warm-up, ``lower_order_final`` and final step are those of
    :func:`~solvers.dpm_solver.dpm_solver`; ++(2M) with ``solver_type="midpoint"`` (the default)
    is Algorithm 2, the recommended guided sampler. Guidance and thresholding compose through
    the denoiser (``dpm.classifier_free_guidance``, ``dpm.dynamic_thresholding``). Every option
    is static: under ``jax.jit`` pass them with ``functools.partial`` or ``static_argnames``.

    Args:
      denoiser: any :class:`~dpm.denoiser.Denoiser`.
      x_T: ``(B, ...)`` start state at ``ts[0]``, any float dtype (integrated in >= float32).
      ts: ``(S + 1,)`` strictly decreasing times in ``[0, 1]``; ``ts[-1] = 0`` allowed.
      key: unused (deterministic); accepted for the common signature.
      order: 1, 2 or 3.
      method: ``"multistep"``, ``"singlestep"`` or ``"fast"``.
      solver_type: ``"midpoint"`` or ``"taylor"``.
      lower_order_final: multistep only: with fewer than 15 steps, the last steps use
        ``min(order, steps_left)``.
      denoise_to_zero: finish with ``x0_hat(x, ts[-1])`` (one more evaluation).
      third_order: ++(3M): ``"exact"`` (third order) or ``"reference"`` (the official and
        diffusers update, second order).
      nfe: the evaluation budget of ``method="fast"``.
      return_trajectory: also return the trajectory dict.

    Returns:
      ``x_0`` ``(B, ...)`` in ``x_T``'s dtype, or ``(x_0, traj)`` with ``traj["x"]``
      ``(S + 1, B, ...)``, ``traj["t"]`` ``(S + 1,)``, ``traj["x0"]`` ``(S, B, ...)`` the model
      output at each step's start, ``traj["order"]`` ``(S,)`` and ``traj["nfe"]``.

    Example:
      >>> guided = dpm.classifier_free_guidance(den, 7.5, null_cond)
      >>> x0 = dpm_solver_pp(dpm.dynamic_thresholding(guided), x_T, ts, order=2)
    """
    del key
    x, gc, S, k, present, order = dpm_prepare(
        denoiser, x_T, ts, sampler="dpm_solver_pp", order=order, method=method,
        solver_type=solver_type, lower_order_final=lower_order_final,
        denoise_to_zero=denoise_to_zero, third_order=third_order, nfe=nfe,
        return_trajectory=return_trajectory,
    )  # fmt: skip
    x0_hat = lambda x, t: denoiser.predict(x, t)[0]  # M = x0_hat: DPM-Solver++

    if method == "multistep":  # Algorithm 2: one evaluation a step, the history in the carry

        def step(carry, xs):
            x, hist = carry  # hist: (order, *x.shape) x0_hat, newest first
            t_s, c = xs
            x0_s = x0_hat(x, t_s)
            hist = push(hist, x0_s)
            x_t = multistep_update(x, hist, c)  # D1 = (x0_s - x0_prev) / r0
            return (x_t, hist), (x_t, x0_s)

        co = grid_multistep_coeffs(
            gc, k, data=True, solver_type=solver_type, third_order=third_order
        )
        hist0 = jnp.zeros((order,) + x.shape, x.dtype)
        (x, _), out = run_scan(
            step, (x, hist0), (gc.t[:-1], co), return_trajectory=return_trajectory
        )
        n_eval = jnp.asarray(S)
    else:  # Algorithm 1 (2S), 3S and -fast: order k[i] at step i
        co = singlestep_coeffs(denoiser.schedule, gc, k, data=True)
        branches = [singlestep_update(o, x0_hat, solver_type) for o in present]

        def step(x, xs):
            c, b = xs
            x_t, x0_s = jax.lax.switch(b, branches, x, c)  # order k[i]
            return x_t, (x_t, x0_s)

        x, out = run_scan(
            step, x, (co, jnp.searchsorted(jnp.asarray(present), k)),
            return_trajectory=return_trajectory,
        )  # fmt: skip
        n_eval = jnp.sum(k)

    if denoise_to_zero:  # one more evaluation: x0_hat at the last time
        x = x0_hat(x, gc.t[-1])
        n_eval = n_eval + 1
    return dpm_finish(x_T, x, out, gc, k, n_eval, name="x0", return_trajectory=return_trajectory)
