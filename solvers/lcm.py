"""The multistep sampler of latent consistency models (Luo et al. 2023; diffusers'
``LCMScheduler`` after PRs #5681 / #5836).

On a grid ``t_0 > t_1 > ... > t_S = 0`` of training timesteps, step ``i`` evaluates the model
once at ``(z_i, t_i)``, forms the consistency function's output

    d_i = c_skip(tau_i) z_i + c_out(tau_i) x0_hat(z_i, t_i),     tau_i = t_i N - 1,

(LCM's boundary coefficients at the integer timestep ``tau_i``,
:func:`dpm.losses.boundary_coefficients`) and re-noises it to the next time with fresh noise,
``z_{i+1} = alpha(t_{i+1}) d_i + sigma(t_{i+1}) xi``; the last step (``t_S = 0``) returns
``d_{S-1}`` with no noise. One step is the consistency function at ``t_0`` alone. The
evaluation timesteps are those of :func:`lcm_timesteps`: the training grid of LCD, reversed,
sampled at ``floor(linspace(0, N / k, S, endpoint=False))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser, expand_like
from dpm.losses.consistency import boundary_coefficients, skipping_timesteps
from dpm.schedules import DiscreteVP
from solvers._common import Array, check_flag, finish, prepare, require_key, run_scan

__all__ = ["lcm", "lcm_grid", "lcm_timesteps"]


def lcm_timesteps(num_inference_steps: int, num_train_steps: int = 1000, skip: int = 20
                  ) -> np.ndarray:
    """The ``S`` integer timesteps of the fixed ``LCMScheduler.set_timesteps``.

    The candidates are LCD's training grid reversed (``999, 979, ..., 19`` for the defaults);
    step ``i`` takes candidate ``floor(i * (N / k) / S)``. E.g. ``S = 4``: ``[999, 759, 499,
    259]``.

    Args:
      num_inference_steps: ``S``, 1 <= S <= N / k.
      num_train_steps: ``N``.
      skip: ``k`` of the training grid (``N / k`` candidates).

    Returns:
      ``(S,)`` int32, decreasing.
    """
    candidates = skipping_timesteps(num_train_steps, skip)[::-1]
    S = num_inference_steps
    if isinstance(S, bool) or not isinstance(S, int | np.integer) or not 1 <= S <= len(
            candidates):
        raise ValueError(f"num_inference_steps must be an int in [1, {len(candidates)}] (the "
                         f"training grid's size); got {num_inference_steps!r}")
    idx = np.floor(np.linspace(0, len(candidates), S, endpoint=False)).astype(np.int64)
    return candidates[idx].astype(np.int32)


def lcm_grid(num_inference_steps: int, schedule: DiscreteVP, skip: int = 20) -> Array:
    """The sampler's time grid: :func:`lcm_timesteps` as times ``(tau + 1) / N``, then 0.
    Shape ``(S + 1,)``."""
    if not isinstance(schedule, DiscreteVP):
        raise TypeError(f"lcm_grid needs a dpm.DiscreteVP schedule; got "
                        f"{type(schedule).__name__}")
    taus = lcm_timesteps(num_inference_steps, schedule.num_steps, skip)
    return jnp.asarray(np.append((taus + 1.0) / schedule.num_steps, 0.0), jnp.float32)


def lcm(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    boundary: bool = True,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """Multistep latent-consistency sampling (LCM, Luo et al. 2023, Algorithm 1 with
    ``LCMScheduler``'s timesteps).

    Args:
      denoiser: the consistency model's Denoiser (any prediction; a :class:`dpm.DiscreteVP`
        schedule), guidance strength already in its condition.
      x_T: ``(B, ...)`` noise at ``ts[0]``.
      ts: ``(S + 1,)`` decreasing times ending at 0 (:func:`lcm_grid`); ``ts[:-1]`` should be
        training timesteps ``(tau + 1) / N`` (``tau`` is rounded to an integer for the
        boundary coefficients).
      key: PRNG key of the re-noising (required for S >= 2).
      boundary: apply ``c_skip, c_out`` (False: ``d = x0_hat``, for a model trained without).
      timestep_scaling, sigma_data: of the boundary coefficients.
      return_trajectory: also return the trajectory.

    Returns:
      ``x_0`` of the shape of ``x_T``; with ``return_trajectory`` also ``{"x": (S + 1, B,
      ...), "x0": (S, B, ...) the denoised d_i, "nfe": S}``.
    """
    x, gc, S, dt = prepare(denoiser, x_T, ts, sampler="lcm", return_trajectory=return_trajectory)
    check_flag(boundary, "boundary", "lcm")
    sched = denoiser.schedule
    if not isinstance(sched, DiscreteVP):
        raise TypeError(f"lcm needs a Denoiser on a dpm.DiscreteVP schedule; got "
                        f"{type(sched).__name__}")
    if not isinstance(ts, jax.core.Tracer) and float(np.asarray(ts)[-1]) != 0.0:
        raise ValueError(f"lcm's grid must end at t = 0 (the last step returns the denoised "
                         f"sample); got ts[-1] = {float(np.asarray(ts)[-1])!r}")
    if S >= 2:
        key = require_key(key, f"lcm with {S} steps (re-noising)")
    keys = jax.random.split(key, S) if key is not None else jnp.zeros((S, 2), jnp.uint32)
    tau = jnp.round(sched.index_of_t(gc.t[:-1]))
    c_skip, c_out = boundary_coefficients(tau, timestep_scaling=timestep_scaling,
                                          sigma_data=sigma_data)
    if not boundary:
        c_skip, c_out = jnp.zeros_like(c_skip), jnp.ones_like(c_out)
    xs = (gc.t[:-1], c_skip.astype(dt), c_out.astype(dt), gc.alpha[1:], gc.sigma[1:], keys)

    def step(z, inp):
        t_i, cs, co, a_next, s_next, k = inp
        d = cs * z + co * denoiser.x0(z, t_i)  # consistency function
        xi = jax.random.normal(k, z.shape, z.dtype) if S >= 2 else jnp.zeros_like(z)
        z_next = (expand_like(a_next, z) * d + expand_like(s_next, z) * xi).astype(z.dtype)
        return z_next, dict(x=z_next, x0=d)

    x_0, traj = run_scan(step, x, xs, return_trajectory=return_trajectory)
    return finish(x_T, x_0, traj, S, return_trajectory=return_trajectory)
