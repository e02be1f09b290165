"""DiffuseVAE's forward processes (Pandey et al., TMLR 2022), in closed form.

A refiner DDPM conditioned on a VAE reconstruction ``xhat`` (images in [-1, 1]). Three
formulations, each "a standard DDPM on a shifted variable" ``u = x - offset`` with data
``u_0 = x0 - data_shift``:

* ``"form1"``: the forward process is the plain DDPM's (offset 0, data shift 0); ``xhat`` only
  reaches the network, concatenated on channels.
* ``"form2_paper"``: ``q(x_t | x_{t-1}, xhat) = N(sqrt(alpha_t) x_{t-1} + (1 - sqrt(alpha_t))
  xhat, beta_t I)``; offset ``xhat``, data shift ``xhat``, so ``q(x_t | x0, xhat) =
  N(sqrt(abar_t) x0 + (1 - sqrt(abar_t)) xhat, (1 - abar_t) I)`` and ``x_T ~ N(xhat, I)``;
  ``x_0`` is the data.
* ``"form2_code"``: the official code's variant, a constant shift: ``x_t = sqrt(abar_t) x0 +
  xhat + sqrt(1 - abar_t) eps`` (offset ``xhat``, data shift 0). Its chain ends at
  ``x0 + xhat``; the sampler subtracts ``xhat`` at the end.

With ``xhat = 0`` all three are the plain DDPM. The posterior of every formulation is the plain
one on ``u`` shifted back: mean ``c1 x0 + c2 x_t + c3 xhat`` with the plain ``c1, c2`` and
``c3 = 1 - c1 - c2`` (paper) or ``1 - c2`` (code), variance ``beta_tilde``.

Schedules enter as ``alpha_bar`` values (floats or arrays broadcastable against the images),
so these functions serve discrete and continuous-time VP schedules alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["FORMULATIONS", "forward_sample", "posterior", "predict_x0", "shift"]

FORMULATIONS = ("form1", "form2_paper", "form2_code")


def _check(formulation: str) -> None:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}")


def _offsets(xhat: jax.Array, formulation: str) -> tuple[jax.Array, jax.Array]:
    """``(offset, data_shift)``: ``u_t = x_t - offset`` is a plain DDPM on ``x0 - data_shift``."""
    _check(formulation)
    zero = jnp.zeros_like(xhat)
    return {"form1": (zero, zero), "form2_paper": (xhat, xhat),
            "form2_code": (xhat, zero)}[formulation]


def shift(xhat: jax.Array, alpha_bar: jax.Array, formulation: str) -> jax.Array:
    """The forward mean's shift: ``E[x_t | x0, xhat] - sqrt(abar_t) x0``."""
    offset, data_shift = _offsets(xhat, formulation)
    return offset - jnp.sqrt(alpha_bar) * data_shift


def forward_sample(x0, xhat, alpha_bar, eps, formulation: str) -> jax.Array:
    """``x_t = sqrt(abar_t) x0 + shift_t + sqrt(1 - abar_t) eps`` (the marginal
    ``q(x_t | x0, xhat)``)."""
    return (jnp.sqrt(alpha_bar) * x0 + shift(xhat, alpha_bar, formulation)
            + jnp.sqrt(1.0 - alpha_bar) * eps)


def predict_x0(x_t, xhat, alpha_bar, eps_hat, formulation: str) -> jax.Array:
    """The data prediction of a noise prediction: the inverse of :func:`forward_sample`."""
    return ((x_t - shift(xhat, alpha_bar, formulation) - jnp.sqrt(1.0 - alpha_bar) * eps_hat)
            / jnp.sqrt(alpha_bar))


def posterior(x0, x_t, xhat, alpha_bar, alpha_bar_prev, formulation: str
              ) -> tuple[jax.Array, jax.Array]:
    """``q(x_s | x_t, x0, xhat)`` for ``s < t`` (``alpha_bar_prev`` = abar_s; ``s = t - 1`` is
    the ancestral step): ``(mean, variance)``."""
    offset, data_shift = _offsets(xhat, formulation)
    a_t = alpha_bar / alpha_bar_prev  # the product of alpha over (s, t]
    beta = 1.0 - a_t
    c1 = jnp.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar)
    c2 = jnp.sqrt(a_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    mean = c1 * (x0 - data_shift) + c2 * (x_t - offset) + offset
    var = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    return mean, jnp.broadcast_to(var, jnp.shape(mean))
