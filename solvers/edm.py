"""EDM samplers (Karras et al., NeurIPS 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): Euler, deterministic Heun (Algorithm 1) and stochastic Heun with churn
(Algorithm 2), for any schedule.

EDM integrates the probability-flow ODE in the variables ``x_bar = x / alpha(t)`` and
``sigma_bar = sigma(t) / alpha(t)``, where it reads

    dx_bar / dsigma_bar = d(x_bar; sigma_bar) = (x_bar - D(x_bar; sigma_bar)) / sigma_bar,

with ``D(x_bar; sigma_bar) = x0_hat(alpha(t) x_bar, t)`` and ``t = t_of_sigma_bar(sigma_bar)``.
For a VP or EDM schedule the Denoiser's conversions make ``d`` *exactly* the noise prediction
``eps_hat(x, t)``, so ``d`` is taken from :meth:`Denoiser.predict` (no division by a small
``sigma_bar``). The grid ``ts`` is given in ``t`` like for every sampler; a Karras grid is
``schedule.t_of_sigma_bar`` of the Karras ``sigma_bar`` values. The result is mapped back to
``x = alpha(t_end) x_bar``. The Euler sampler is DDIM (eta = 0) step for step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import Denoiser
from solvers._common import (
    EDM_SOLVERS,
    Array,
    EDMPoint,
    check_choice,
    edm_denoise,
    edm_step,
    finish,
    grid_coeffs,
    prepare,
    require_key,
    run_scan,
)

__all__ = ["edm_euler", "edm_heun", "edm_stochastic"]


def _edm(
    den: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    sampler: str,
    solver: str,
    churn: tuple | None,
    key: Array | None,
    return_trajectory: bool,
):
    """Algorithms 1 and 2 of EDM in ``x_bar``; ``churn = (S_churn, S_tmin, S_tmax, S_noise)``."""
    x, gc, S, cdt = prepare(den, x_T, ts, sampler=sampler, return_trajectory=return_trajectory)
    g = EDMPoint(gc.t, gc.alpha, gc.sigma_bar)
    cur = EDMPoint(*(a[:-1] for a in g))
    nxt = EDMPoint(*(a[1:] for a in g))
    if churn is None:
        hat, noise_scale, keys = cur, jnp.zeros_like(cur.t), jnp.zeros((S,), jnp.uint32)
    else:
        # gamma_i = min(S_churn / S, sqrt(2) - 1) inside [S_tmin, S_tmax]
        S_churn, S_tmin, S_tmax, S_noise = (jnp.asarray(v, cdt) for v in churn)
        sb = cur.sigma_bar
        gamma = jnp.where(
            (S_tmin <= sb) & (sb <= S_tmax), jnp.minimum(S_churn / S, np.sqrt(2.0) - 1.0), 0.0
        )
        churned = gamma > 0
        # sigma_hat mapped to a time t_hat in [t_i, 1]; sigma_hat re-read from t_hat (EDM's
        # round_sigma), so the added noise matches the noise level the model is told.
        t_hat = jnp.clip(den.schedule.t_of_sigma_bar(sb * (1.0 + gamma)), cur.t, 1.0)
        t_hat = jnp.where(churned, t_hat, cur.t)
        sched_hat = grid_coeffs(den.schedule, t_hat)
        hat = EDMPoint(
            t_hat,
            jnp.where(churned, sched_hat.alpha, cur.alpha),
            jnp.where(churned, sched_hat.sigma_bar, sb),
        )
        var = hat.sigma_bar**2 - sb**2
        pos = var > 0
        noise_scale = S_noise * jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
        keys = jax.random.split(key, S)

    def step(x_bar, xs, *, last: bool):
        p_hat, p_nxt, c_noise, k = xs
        if churn is not None:  # x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) S_noise z
            x_bar = x_bar + c_noise * jax.random.normal(k, x_bar.shape, x_bar.dtype)
        x0, d = edm_denoise(den, x_bar, p_hat)  # D(x_hat; sigma_hat) and the slope d
        x_next = edm_step(den, x_bar, d, p_hat, p_nxt, solver, may_end_at_zero=last)
        x_next = x_next.astype(cdt)
        return x_next, (p_nxt.alpha * x_next, x0, d)

    xs = (hat, nxt, noise_scale, keys)
    x_bar, traj = run_scan(
        lambda c, x: step(c, x, last=False),
        x / g.alpha[0],
        jax.tree.map(lambda a: a[:-1], xs),
        return_trajectory=return_trajectory,
    )
    x_bar, last = step(x_bar, jax.tree.map(lambda a: a[-1], xs), last=True)
    x_0 = g.alpha[-1] * x_bar
    if not return_trajectory:
        return x_0.astype(x_T.dtype)
    xs, x0, eps = (jnp.concatenate([a, b[None]]) for a, b in zip(traj, last, strict=True))
    # Heun corrects every step but one onto sigma_bar = 0
    nfe = S + (S - 1 + (g.t[-1] > 0).astype(jnp.int32) if solver == "heun" else 0)
    return finish(x_T, x_0, dict(x=xs, x0=x0, eps=eps), nfe, return_trajectory=True)


def edm_euler(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """Euler sampler of EDM (Karras et al. 2022, Algorithm 1 without the 2nd-order correction).

    ``x_bar_{i+1} = x_bar_i + (sigma_bar_{i+1} - sigma_bar_i) d_i``: DDIM (eta = 0) step for step
    (spec §12.2). NFE = S.

    Args:
      denoiser: the model (any schedule and parameterization).
      x_T: ``(B, ...)`` the state ``x`` at ``ts[0]`` (for VP: ``x ~ N(0, I)`` at ``t = 1``).
      ts: ``(S + 1,)`` descending times; ``ts[-1] = 0`` returns the denoised sample.
      key: unused (deterministic); accepted for the common sampler signature.
      return_trajectory: also return ``{"x": (S + 1, B, ...) states in x, "x0": (S, B, ...),
        "eps": (S, B, ...), "nfe": S}`` (model outputs at each step's start).

    Returns:
      ``x_0`` of shape ``x_T.shape`` (and the trajectory dict if asked).
    """
    del key
    return _edm(
        denoiser, x_T, ts, sampler="edm_euler", solver="euler", churn=None, key=None,
        return_trajectory=return_trajectory,
    )  # fmt: skip


def edm_heun(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """Deterministic Heun sampler of EDM (Karras et al. 2022, Algorithm 1).

    Each step is Heun's 2nd-order method in ``(x_bar, sigma_bar)``; a step onto ``sigma_bar = 0``
    is an Euler step, so NFE = 2S - 1 when ``ts[-1] = 0`` (2S otherwise). Global order 2.

    Args:
      denoiser: the model (any schedule and parameterization).
      x_T: ``(B, ...)`` the state ``x`` at ``ts[0]``.
      ts: ``(S + 1,)`` descending times, e.g. a Karras grid mapped to ``t``; may end at 0.
      key: unused (deterministic).
      return_trajectory: also return ``{"x": (S + 1, B, ...), "x0": (S, B, ...),
        "eps": (S, B, ...), "nfe"}`` (model outputs of the first evaluation of each step).

    Returns:
      ``x_0`` of shape ``x_T.shape`` (and the trajectory dict if asked).
    """
    del key
    return _edm(
        denoiser, x_T, ts, sampler="edm_heun", solver="heun", churn=None, key=None,
        return_trajectory=return_trajectory,
    )  # fmt: skip


def edm_stochastic(
    denoiser: Denoiser,
    x_T: Array,
    ts: Array,
    *,
    key: Array | None = None,
    S_churn: float | Array = 0.0,
    S_tmin: float | Array = 0.0,
    S_tmax: float | Array = float("inf"),
    S_noise: float | Array = 1.0,
    solver: str = "heun",
    return_trajectory: bool = False,
) -> Array | tuple[Array, dict]:
    """Stochastic sampler of EDM (Karras et al. 2022, Algorithm 2): churn, then a Heun step.

    At step i, ``gamma_i = min(S_churn / S, sqrt(2) - 1)`` if ``S_tmin <= sigma_bar_i <= S_tmax``
    else 0; ``sigma_hat = (1 + gamma_i) sigma_bar_i`` is mapped to ``t_hat =
    t_of_sigma_bar(sigma_hat)`` clipped into ``[t_i, 1]`` and re-read as ``sigma_bar(t_hat)``
    (EDM's ``round_sigma``); ``x_hat = x_bar_i + sqrt(sigma_hat^2 - sigma_bar_i^2) S_noise z``;
    then the Heun (or Euler) step from ``sigma_hat`` to ``sigma_bar_{i+1}``. With ``S_churn = 0``
    this is :func:`edm_heun` exactly. NFE as :func:`edm_heun`.

    Args:
      denoiser: the model (any schedule and parameterization).
      x_T: ``(B, ...)`` the state ``x`` at ``ts[0]``.
      ts: ``(S + 1,)`` descending times; may end at 0.
      key: PRNG key (required).
      S_churn: total churn (EDM's ``S_churn``, >= 0); traced values allowed.
      S_tmin, S_tmax: churn only where ``S_tmin <= sigma_bar_i <= S_tmax`` (``sigma_bar`` units).
      S_noise: noise inflation (EDM's ``S_noise``, e.g. 1.003-1.007).
      solver: ``"heun"`` (Algorithm 2) or ``"euler"`` (static).
      return_trajectory: also return ``{"x": (S + 1, B, ...), "x0": (S, B, ...),
        "eps": (S, B, ...), "nfe"}`` (model outputs at ``x_hat``).

    Returns:
      ``x_0`` of shape ``x_T.shape`` (and the trajectory dict if asked).

    Raises:
      ValueError: missing key, negative ``S_churn``/``S_noise``, ``S_tmin > S_tmax``, bad grid.
    """
    check_choice(solver, "solver", EDM_SOLVERS, "edm_stochastic")
    key = require_key(key, "edm_stochastic")
    for name, v in (("S_churn", S_churn), ("S_noise", S_noise)):
        if not isinstance(v, jax.core.Tracer) and np.any(np.asarray(v) < 0):
            raise ValueError(f"{name} must be >= 0; got {v!r}")
    if not any(isinstance(v, jax.core.Tracer) for v in (S_tmin, S_tmax)):
        if np.any(np.asarray(S_tmin) > np.asarray(S_tmax)):
            raise ValueError(f"S_tmin must be <= S_tmax; got S_tmin={S_tmin}, S_tmax={S_tmax}")
    return _edm(
        denoiser,
        x_T,
        ts,
        sampler="edm_stochastic",
        solver=solver,
        churn=(S_churn, S_tmin, S_tmax, S_noise),
        key=key,
        return_trajectory=return_trajectory,
    )
