"""DDGAN sampling (Xiao, Kreis & Vahdat, ICLR 2022; EMDM, Zhou et al. 2024): a few large
ancestral steps, each drawing a latent ``z``, predicting ``x0`` and sampling the posterior."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser, expand_like
from dpm.schedules import DiscreteVP
from solvers._common import (
    Array,
    check_flag,
    check_grid,
    check_x,
    finish,
    posterior_coeffs,
    require_key,
    run_scan,
    static_option,
    work_dtype,
)

__all__ = ["ddgan", "ddgan_grid"]


def ddgan_grid(schedule: DiscreteVP) -> Array:
    """DDGAN's sampling grid on a ``T``-step :class:`~dpm.schedules.DiscreteVP` (e.g.
    :func:`dpm.schedules.ddgan_schedule`): every grid point, then the clean end,
    ``ts = (T, T - 1, ..., 1, 0) / T``.

    ``ts[i] = (T - i) / T`` is DDGAN's index ``T - i``; the step ``ts[i] -> ts[i + 1]`` is DDGAN's
    ``sample_from_model`` step with integer time ``T - 1 - i`` (the network's ``c_noise``).

    Returns:
      ``ts``, shape ``(T + 1,)``, descending, in the default float dtype.
    """
    if not isinstance(schedule, DiscreteVP):
        raise TypeError(f"ddgan_grid needs a dpm.DiscreteVP; got {type(schedule).__name__}")
    T = schedule.num_steps
    return jnp.asarray(np.arange(T, -1, -1) / T, dtype=jnp.result_type(float))


def _latent_shape(latent_shape) -> tuple[int, ...]:
    static_option(latent_shape, "latent_shape", "ddgan")
    shape = (latent_shape,) if isinstance(latent_shape, int | np.integer) else latent_shape
    ok = isinstance(shape, Sequence) and all(
        isinstance(n, int | np.integer) and not isinstance(n, bool) and n >= 1 for n in shape
    )
    if not ok:
        raise ValueError(
            "latent_shape must be a positive int or a tuple of positive ints (the shape of one "
            f"latent z, without the batch axis); got {latent_shape!r}"
        )
    return tuple(int(n) for n in shape)


def ddgan(
    generator: Callable[[Array], Denoiser],
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    latent_shape: int | tuple[int, ...],
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """DDGAN sampling (Xiao et al. 2022, ``sample_from_model``; EMDM spec 3.9) on a descending grid.

    Step ``s -> t``: draw ``z ~ N(0, I)`` of shape ``(B, *latent_shape)``, predict ``x0_hat =
    generator(z).x0(x_s, s)`` and sample the posterior ``x_t ~ q(x_t | x_s, x0_hat)``
    (``fixed_small`` variance, :func:`~solvers._common.posterior_coeffs`); no noise on the last
    step. One network evaluation per step (a doubled batch with classifier-free guidance). EMDM
    guides with the same ``z`` in both branches: carry ``z`` in the condition, which guidance
    concatenates along with the batch, ``lambda z: classifier_free_guidance(den.with_cond({"y":
    y, "z": z}), scale, {"y": null_y, "z": z})``. With ``ts = ddgan_grid(schedule)`` on
    :func:`dpm.ddgan_schedule` this is DDGAN's sampler exactly (its posterior coefficient
    arrays are the schedule's posterior between neighbouring grid points).

    Args:
      generator: ``z -> Denoiser``, the x0-predicting denoiser for one latent draw ``z`` of
        shape ``(B, *latent_shape)`` (any prediction type works; its schedule gives the
        posterior). Called with traced ``z`` inside the scan.
      x_T: ``(B, ...)`` the start state at ``ts[0]`` (``N(0, I)`` on DDGAN's grid).
      ts: ``(S + 1,)`` strictly decreasing times (:func:`ddgan_grid`).
      key: PRNG key (required: latents and posterior noise).
      latent_shape: shape of one latent, without the batch axis (static), e.g. ``(64,)``.
      return_trajectory: also return the trajectory.

    Returns:
      ``x_0`` of the shape and dtype of ``x_T``; with ``return_trajectory`` also a dict with
      ``"x"`` ``(S + 1, B, ...)``, ``"x0"`` ``(S, B, ...)`` (each step's ``x0_hat``), ``"z"``
      ``(S, B, *latent_shape)`` and ``"nfe"`` (= S).

    Example:
      >>> sched = dpm.ddgan_schedule(4)
      >>> gen = lambda z: Denoiser(lambda x, t, c: 0.5 * x + z, sched, "x0")
      >>> x = ddgan(gen, jnp.zeros((2, 3)), ddgan_grid(sched), key=jax.random.key(0),
      ...           latent_shape=(3,))
    """
    check_x(x_T)
    check_flag(return_trajectory, "return_trajectory", "ddgan")
    check_grid(ts, method="ddgan")
    key = require_key(key, "ddgan")
    latent_shape = _latent_shape(latent_shape)
    dt = work_dtype(x_T, ts)
    B = x_T.shape[0]
    z_shape = (B, *latent_shape)
    den = generator(jnp.zeros(z_shape, dt))  # only its schedule and type: no evaluation
    if not isinstance(den, Denoiser):
        raise TypeError(
            f"generator must map a latent z {z_shape} to a dpm.Denoiser; got {type(den).__name__}"
        )
    ts = jnp.asarray(ts, dt)
    S = ts.shape[0] - 1
    s, t = ts[:-1], ts[1:]
    c_x0, c_x, var = posterior_coeffs(den.schedule, s, t, "fixed_small")
    std = jnp.where(jnp.arange(S) < S - 1, jnp.sqrt(var), 0.0)  # no noise on the last step
    xs = (s, c_x0, c_x, std, jax.random.split(key, S))

    def step(x, inp):
        s_i, a0, ax, sd, k = inp
        k_z, k_n = jax.random.split(k)
        z = jax.random.normal(k_z, z_shape, dt)  # latent z ~ N(0, I)
        x0 = generator(z).x0(x, s_i).astype(dt)  # x0_hat = G(x_s, s, z)
        mean = expand_like(a0, x) * x0 + expand_like(ax, x) * x  # posterior mean
        x_next = mean + expand_like(sd, x) * jax.random.normal(k_n, x.shape, dt)
        return x_next, dict(x=x_next, x0=x0, z=z)

    x_0, traj = run_scan(step, x_T.astype(dt), xs, return_trajectory=return_trajectory)
    return finish(x_T, x_0, traj, S, return_trajectory=return_trajectory)
