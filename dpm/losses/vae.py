"""Variational autoencoder objectives (DiffuseVAE's stage 1).

The beta-VAE loss of DiffuseVAE's code, per example:

    sum_pixels (x_rec - x)^2 + alpha * KL(N(mean, exp(logvar)) || N(0, I)),

with ``x_rec`` decoded from the reparameterised sample ``z = mean + exp(logvar / 2) eps``.
The official code sums both terms over the batch as well; here they are per-example values (the
train step takes their mean), which only rescales the loss by the batch size (Adam is invariant
to that up to its epsilon). With ``alpha = 1`` the loss is the negative ELBO of a Gaussian
decoder of variance 1/2 minus the constant ``D/2 log(pi)`` (D pixels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["beta_vae_loss", "gaussian_kl"]


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """``KL(N(mean, diag(exp(logvar))) || N(0, I))`` per example: ``(B, ...) -> (B,)``."""
    if mean.shape != logvar.shape:
        raise ValueError(f"mean and logvar must have the same shape; got {mean.shape} and "
                         f"{logvar.shape}")
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl.reshape(kl.shape[0], -1), axis=1)


def beta_vae_loss(
    encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    decode: Callable[[Any, jax.Array], jax.Array],
    *,
    alpha: float = 1.0,
) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """The beta-VAE loss ``loss(params, batch, key) -> (B,)`` of an encoder and a decoder.

    Args:
      encode: ``(params, x) -> (mean, logvar)``.
      decode: ``(params, z) -> x_rec`` (same shape as ``x``).
      alpha: the KL weight (DiffuseVAE's "alpha", the beta of a beta-VAE; default 1).

    Returns:
      ``loss(params, batch, key)`` with ``batch["x"]`` the images (in the VAE's own range).
    """
    if not (isinstance(alpha, (int, float)) and alpha >= 0):
        raise ValueError(f"alpha must be a number >= 0; got {alpha!r}")

    def loss(params, batch, key):
        x = batch["x"]
        mean, logvar = encode(params, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        x_rec = decode(params, z)
        if x_rec.shape != x.shape:
            raise ValueError(f"decode returned shape {x_rec.shape}; expected {x.shape}")
        sse = jnp.sum(jnp.square(x_rec - x).reshape(x.shape[0], -1), axis=1)
        return sse + alpha * gaussian_kl(mean, logvar)

    return loss
