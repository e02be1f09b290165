"""Pseudo numerical methods (Liu et al., ICLR 2022, "Pseudo Numerical Methods for Diffusion
Models on Manifolds"): F-PNDM, S-PNDM and Stable Diffusion's PLMS.

Each step moves ``x`` with the DDIM transfer ``phi(x, e, t -> t')`` (``solvers._common.transfer``)
applied
to a combined noise estimate ``e``; the methods differ in how ``e`` is made:

* ``"f-pndm"``: 3 pseudo-RK4 warm-up steps (4 evaluations each, midpoint ``(t + t') / 2``),
  then pseudo AB4 ``(55 e_0 - 59 e_1 + 37 e_2 - 9 e_3) / 24``. NFE = S + 9.
* ``"s-pndm"``: 1 pseudo improved-Euler step (2 evaluations), then pseudo AB2 ``(3 e_0 - e_1) /
  2``. NFE = S + 1.
* ``"plms"``: diffusers ``PNDMScheduler(skip_prk_steps=True)``: the same pseudo improved-Euler
  first step, then AB2, AB3 ``(23, -16, 5) / 12`` and AB4 from the fourth step. NFE = S + 1.

The history holds only the evaluation at each step's start (``e_1`` of a warm-up step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from solvers._common import (
    Array,
    check_choice,
    check_time_shift,
    finish,
    prepare,
    run_scan,
    shift_target,
    transfer,
    transfer_coeffs,
)
from solvers.time_shift import TimeShift

__all__ = ["pndm", "PNDM_VARIANTS"]

PNDM_VARIANTS = ("f-pndm", "s-pndm", "plms")

_AB = {  # pseudo Adams-Bashforth weights on (e_0, e_1, e_2, e_3), e_0 the newest
    2: (3.0 / 2, -1.0 / 2, 0.0, 0.0),
    3: (23.0 / 12, -16.0 / 12, 5.0 / 12, 0.0),
    4: (55.0 / 24, -59.0 / 24, 37.0 / 24, -9.0 / 24),
}


def _ab_weights(variant: str, i: Array, dtype) -> Array:
    """``(n, K + 1)`` weights for global step indices ``i`` of the multistep phase, built from
    ``i`` in the graph (no step-count-sized constants). PLMS ramps AB2, AB3, then AB4."""
    ab = {k: jnp.asarray(v, dtype) for k, v in _AB.items()}
    if variant == "s-pndm":
        return jnp.broadcast_to(ab[2][:2], (i.shape[0], 2))
    if variant == "f-pndm":
        return jnp.broadcast_to(ab[4], (i.shape[0], 4))
    i = i[:, None]
    return jnp.where(i == 1, ab[2], jnp.where(i == 2, ab[3], ab[4]))


def pndm(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    variant: str = "f-pndm",
    time_shift: TimeShift | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """PNDM sampling (Liu et al., ICLR 2022, pseudo linear multistep on the DDIM transfer):
    F-PNDM, S-PNDM or PLMS (see the module docstring).

    Warm-up: F-PNDM uses ``min(3, S)`` pseudo-RK4 steps (with S <= 3 every step is a pseudo-RK4
    step: NFE ``4 S``); S-PNDM and PLMS one pseudo improved-Euler step. Each phase is one
    ``lax.scan``. No model evaluation is made at ``t = 0``: a warm-up step whose target is
    ``t = 0`` is a plain DDIM step with ``e_1`` (as EDM's Heun and DPM-Solver end with Euler);
    its other evaluations still run (at the midpoint, discarded), so ``"nfe"`` counts them.

    Time shift (TS-DPM, official ``pnm_solver.py``, S-/F-PNDM; PLMS alike): with
    ``time_shift``, from the second step on, while ``t_{i+1}`` is above the cutoff, the target
    of step ``i``'s transfer is the per-example ``tau = select_shifted_time(schedule,
    sample_variance(x_{t_i}), t_{i+1})`` and RK midpoints are ``(t_i + tau) / 2``; the next
    step starts from the grid label ``t_{i+1}`` and the eps history is untouched. No extra
    network evaluations; ``window = 0`` runs the base sampler unchanged.

    Args:
      denoiser: the model (any prediction type).
      x_T: ``(B, ...)`` initial noise at ``ts[0]``.
      ts: ``(S + 1,)`` strictly decreasing times.
      key: unused (deterministic sampler); accepted for the common signature.
      variant: ``"f-pndm"``, ``"s-pndm"`` or ``"plms"`` (static).
      time_shift: :class:`~solvers.time_shift.TimeShift` options, or None.
      return_trajectory: also return the trajectory.

    Returns:
      ``x_0`` of the shape of ``x_T``; with ``return_trajectory`` also a dict with ``"x"``
      ``(S + 1, B, ...)``, ``"eps"`` ``(S, B, ...)`` (evaluation at each step's start),
      ``"nfe"`` (S + 9 for F-PNDM with S >= 3, S + 1 otherwise) and, with time shift, ``"tau"``
      ``(S, B)``.
    """
    del key
    x, gc, S, dt = prepare(denoiser, x_T, ts, sampler="pndm", return_trajectory=return_trajectory)
    check_choice(variant, "variant", PNDM_VARIANTS, "pndm")
    shifted = check_time_shift(time_shift)
    sched = denoiser.schedule
    rk4 = variant == "f-pndm"
    W = min(3, S) if rk4 else 1  # warm-up steps
    K = 1 if variant == "s-pndm" else 3  # history length
    s, t = gc.t[:-1], gc.t[1:]
    m = 0.5 * (s + t)
    c_x, c_eps = transfer_coeffs(sched, s, t)
    cm_x, cm_eps = transfer_coeffs(sched, s, m)
    i_all = jnp.arange(S)

    def target(x, i, s_i, t_i, m_i, cx, ce, cmx, cme):
        if not shifted:
            return t_i, m_i, cx, ce, cmx, cme
        tau = shift_target(sched, x, s_i, t_i, i, time_shift)
        m_tau = 0.5 * (s_i + tau)
        return tau, m_tau, *transfer_coeffs(sched, s_i, tau), *transfer_coeffs(sched, s_i, m_tau)

    def push(hist, e):
        return jnp.concatenate([e[None].astype(hist.dtype), hist[:-1]])

    def warmup(carry, inp):
        x, hist = carry
        i, s_i, *rest = inp
        tau, m_i, cx, ce, cmx, cme = target(x, i, s_i, *rest)
        to_zero = tau <= 0  # no evaluation at t = 0: plain DDIM step
        t_end = jnp.where(to_zero, m_i, tau)
        zero = jnp.zeros_like(cx)
        # stage k: x_k = phi(x, e_{k-1}, t -> t_k), e_k = eps(x_k, t_k); x_1 = x
        if rk4:  # pseudo Runge-Kutta 4: midpoints twice, then the target
            c_stage = [(zero, zero, s_i), (cmx, cme, m_i), (cmx, cme, m_i), (cx, ce, t_end)]
            b = (1.0 / 6, 2.0 / 6, 2.0 / 6, 1.0 / 6)
        else:  # pseudo improved Euler
            c_stage = [(zero, zero, s_i), (cx, ce, t_end)]
            b = (0.5, 0.5)
        c_stage = jax.tree.map(lambda *a: jnp.stack(jnp.broadcast_arrays(*a)), *c_stage)

        def stage(e_prev, c):  # one call site of the network for all stages (compile time)
            e_k = denoiser.eps(transfer(x, e_prev, c[0], c[1]).astype(x.dtype), c[2])
            return e_k.astype(x.dtype), e_k.astype(x.dtype)

        _, e_k = jax.lax.scan(stage, jnp.zeros_like(x), c_stage)
        e1 = e_k[0]
        e = jnp.tensordot(jnp.asarray(b, dt), e_k, axes=1)
        e = jnp.where(expand_like(to_zero, x), e1, e)
        x_next = transfer(x, e, cx, ce).astype(x.dtype)
        out = dict(x=x_next, eps=e1) | (dict(tau=tau) if shifted else {})
        return (x_next, push(hist, e1)), out

    def multistep(carry, inp):
        x, hist = carry
        w, i, s_i, *rest = inp
        tau, _, cx, ce, _, _ = target(x, i, s_i, *rest)
        e_t = denoiser.eps(x, s_i)
        e = w[0] * e_t + jnp.tensordot(w[1:], hist, axes=1)  # pseudo linear multistep (AB)
        x_next = transfer(x, e, cx, ce).astype(x.dtype)
        out = dict(x=x_next, eps=e_t) | (dict(tau=tau) if shifted else {})
        return (x_next, push(hist, e_t)), out

    per_step = (i_all, s, t, m, c_x, c_eps, cm_x, cm_eps)
    hist = jnp.zeros((K,) + x.shape, x.dtype)
    carry, traj = run_scan(
        warmup, (x, hist), [a[:W] for a in per_step], return_trajectory=return_trajectory
    )
    if S > W:
        w = _ab_weights(variant, i_all[W:], dt)
        carry, traj_ms = run_scan(
            multistep,
            carry,
            [w] + [a[W:] for a in per_step],
            return_trajectory=return_trajectory,
        )
        if return_trajectory:
            traj = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), traj, traj_ms)
    nfe = S + (3 if rk4 else 1) * W
    return finish(x_T, carry[0], traj, nfe, return_trajectory=return_trajectory)
