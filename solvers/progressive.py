"""The stochastic sampler of progressive distillation (Salimans & Ho, ICLR 2022), for distilled
students: each step is a deterministic DDIM step of *twice* the grid spacing, followed by a
stochastic step *back* by one spacing, i.e. a draw from the forward process.

On a grid ``t_0 > t_1 > ... > t_S``, step ``i`` evaluates the model once at ``(z_i, t_i)``,
moves deterministically to ``t_{i+2}`` and re-noises to ``t_{i+1}``:

    z' = alpha_{i+2} x0_hat + sigma_{i+2} eps_hat,
    z_{i+1} = (alpha_{i+1} / alpha_{i+2}) z' + sqrt(sigma_{i+1}^2 - (alpha_{i+1} sigma_{i+2}
              / alpha_{i+2})^2) n,     n ~ N(0, I);

the last step goes deterministically to ``t_S``. One network evaluation per step, as DDIM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from solvers._common import (
    Array,
    finish,
    prepare,
    require_key,
    run_scan,
    transfer,
    transfer_coeffs,
)

__all__ = ["pd_stochastic"]


def pd_stochastic(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """Progressive distillation's stochastic sampler (see the module docstring).

    Args:
      denoiser: the model (any prediction type).
      x_T: ``(B, ...)`` initial noise at ``ts[0]``.
      ts: ``(S + 1,)`` strictly decreasing times (``ts[-1] = 0`` returns ``x0_hat`` of the
        last step).
      key: PRNG key (required).
      return_trajectory: also return the trajectory.

    Returns:
      ``x_0`` of the shape of ``x_T``; with ``return_trajectory`` also ``{"x": (S + 1, B, ...),
      "x0": (S, B, ...), "nfe": S}``.
    """
    key = require_key(key, "pd_stochastic")
    x, gc, S, dt = prepare(denoiser, x_T, ts, sampler="pd_stochastic",
                           return_trajectory=return_trajectory)
    sched = denoiser.schedule
    start = gc.t[:-1]
    far = jnp.concatenate([gc.t[2:], gc.t[-1:]])  # t_{i+2}; the last step's is t_S
    c_x, c_eps = transfer_coeffs(sched, start, far)
    # forward process far -> near (identity on the last step, where near = far)
    la_near, la_far = sched.log_alpha(gc.t[1:]), sched.log_alpha(far)
    lam_near = la_near - sched.log_sigma(gc.t[1:])
    lam_far = la_far - sched.log_sigma(far)
    scale = jnp.exp(la_near - la_far)
    noise_sd = jnp.exp(sched.log_sigma(gc.t[1:])) * jnp.sqrt(
        jnp.maximum(-jnp.expm1(2.0 * (lam_near - lam_far)), 0.0))
    keys = jax.random.split(key, S)

    def step(z, inp):
        t_i, cx, ce, a, sd, k = inp
        x0, eps = denoiser.predict(z, t_i)
        z_far = transfer(z, eps, cx, ce)
        n = jax.random.normal(k, z.shape, z.dtype)
        z_next = (expand_like(a, z) * z_far + expand_like(sd, z) * n).astype(z.dtype)
        return z_next, dict(x=z_next, x0=x0)

    x_0, traj = run_scan(step, x, (start, c_x, c_eps, scale.astype(dt), noise_sd.astype(dt), keys),
                         return_trajectory=return_trajectory)
    return finish(x_T, x_0, traj, S, return_trajectory=return_trajectory)
