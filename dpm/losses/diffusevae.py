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

Training and sampling use the same change of variables: :func:`refiner_denoiser` turns the
refiner (a :class:`~dpm.Denoiser` whose condition holds ``{"image": xhat}``) into a plain
denoiser of ``u``, so every project sampler (DDPM, DDIM, DPM-Solver, ...) and the plain
:func:`~dpm.losses.denoising_loss` run unchanged on ``u``; ``solvers.diffusevae_sample`` adds
the data shift back. :func:`refiner_loss` is the stage-2 objective, :func:`vae_reconstruction`
the conditioning signal of training (``2 Dec(z) - 1`` with ``z ~ q(z | x0)``, no gradient) and
:func:`corrupt` the corruptions of the noise-robustness study.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from dpm.denoiser import Denoiser
from dpm.losses.denoising import denoising_loss

__all__ = [
    "CORRUPTIONS",
    "FORMULATIONS",
    "corrupt",
    "forward_sample",
    "offsets",
    "posterior",
    "predict_x0",
    "refiner_denoiser",
    "refiner_loss",
    "shift",
    "vae_reconstruction",
]

FORMULATIONS = ("form1", "form2_paper", "form2_code")
CORRUPTIONS = ("gaussian", "salt_pepper", "blur")


def _check(formulation: str) -> None:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}")


def offsets(xhat: jax.Array, formulation: str) -> tuple[jax.Array, jax.Array]:
    """``(offset, data_shift)``: ``u_t = x_t - offset`` is a plain DDPM on ``x0 - data_shift``."""
    _check(formulation)
    zero = jnp.zeros_like(xhat)
    return {"form1": (zero, zero), "form2_paper": (xhat, xhat),
            "form2_code": (xhat, zero)}[formulation]


def shift(xhat: jax.Array, alpha_bar: jax.Array, formulation: str) -> jax.Array:
    """The forward mean's shift: ``E[x_t | x0, xhat] - sqrt(abar_t) x0``."""
    offset, data_shift = offsets(xhat, formulation)
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
    offset, data_shift = offsets(xhat, formulation)
    a_t = alpha_bar / alpha_bar_prev  # the product of alpha over (s, t]
    beta = 1.0 - a_t
    c1 = jnp.sqrt(alpha_bar_prev) * beta / (1.0 - alpha_bar)
    c2 = jnp.sqrt(a_t) * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    mean = c1 * (x0 - data_shift) + c2 * (x_t - offset) + offset
    var = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    return mean, jnp.broadcast_to(var, jnp.shape(mean))


# --------------------------------------------------------------------------------------------
# The refiner as a plain denoiser of u = x - offset
# --------------------------------------------------------------------------------------------


def _xhat(cond: Any) -> jax.Array:
    if not isinstance(cond, dict) or "image" not in cond:
        raise ValueError("a DiffuseVAE refiner needs its condition as a dict with 'image' = "
                         f"xhat (B, H, W, C); got {type(cond).__name__}")
    return cond["image"]


def _refiner_fn(formulation, inner, u, t, cond):
    offset, _ = offsets(_xhat(cond), formulation)
    # the network sees x_t = u_t + offset (and xhat, concatenated by the backbone)
    return inner(u + offset.astype(u.dtype), t, cond)


def _refiner_clip_fn(formulation, inner: Denoiser, lo, hi, u, t, cond):
    # x0_hat in [lo, hi]  <=>  u0_hat in [lo - data_shift, hi - data_shift]
    _, data_shift = offsets(_xhat(cond), formulation)
    return jnp.clip(inner.with_cond(cond).x0(u, t), lo - data_shift, hi - data_shift)


# one function object per formulation (a static part of the Denoiser's pytree: no retracing)
_REFINER_FNS = {f: functools.partial(_refiner_fn, f) for f in FORMULATIONS}
_REFINER_CLIP_FNS = {f: functools.partial(_refiner_clip_fn, f) for f in FORMULATIONS}


def refiner_denoiser(
    den: Denoiser, formulation: str, *, clip: tuple[float, float] | None = None
) -> Denoiser:
    """The refiner as a plain denoiser of ``u = x - offset`` (module docstring).

    The network is evaluated at ``x_t = u_t + offset`` with ``xhat`` in its condition; its
    output is read in ``u``'s variables (an eps-network predicts the same ``eps`` in both; an
    x0-network predicts ``u0 = x0 - data_shift``). The forward and reverse processes of the
    formulation are then exactly the plain ones on ``u`` (its posterior is
    :func:`posterior` shifted by ``offset``), so DDPM, DDIM and every other sampler of the
    project apply; ``solvers.diffusevae_sample`` returns ``u_0 + data_shift``.

    Args:
      den: the refiner in ``x``'s variables; ``den.cond`` (or the condition bound later, e.g.
        by :func:`~dpm.losses.denoising_loss`) is a dict with ``"image"``: ``xhat``, shape of
        ``x``, in [-1, 1].
      formulation: one of :data:`FORMULATIONS`.
      clip: ``(lo, hi)`` to clip the predicted ``x0`` to (in ``x``'s variables, e.g.
        ``(-1, 1)`` as the official sampler does), or None.

    Returns:
      A :class:`~dpm.Denoiser` of ``u`` (prediction ``"x0"`` when clipping).
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}")
    u_den = Denoiser(Partial(_REFINER_FNS[formulation], den.fn), den.schedule, den.prediction,
                     den.cond)
    if clip is None:
        return u_den
    lo, hi = (float(c) for c in clip)
    if not lo < hi:
        raise ValueError(f"clip must be (lo, hi) with lo < hi; got {clip!r}")
    return Denoiser(Partial(_REFINER_CLIP_FNS[formulation], u_den, jnp.asarray(lo),
                            jnp.asarray(hi)), den.schedule, "x0", den.cond)


def refiner_loss(
    make_denoiser: Callable[[Any], Denoiser],
    formulation: str,
    **loss_options: Any,
) -> Callable[[Any, dict, jax.Array], jax.Array]:
    """DiffuseVAE's stage-2 objective ``loss(params, batch, key) -> (B,)``.

    The plain :func:`~dpm.losses.denoising_loss` of :func:`refiner_denoiser` on
    ``u_0 = x0 - data_shift``: with eps-prediction and ``weighting="eps"`` this is
    ``E || eps - eps_theta(x_t, xhat, t) ||^2`` with ``x_t`` drawn from the formulation's
    marginal :func:`forward_sample`, the loss of both formulations.

    Args:
      make_denoiser: ``params -> Denoiser`` of the refiner in ``x``'s variables.
      formulation: one of :data:`FORMULATIONS`.
      **loss_options: passed to :func:`~dpm.losses.denoising_loss` (``weighting``,
        ``time_sampler``, ...).

    Returns:
      ``loss(params, batch, key)`` with ``batch = {"x": x0, "xhat": xhat}`` (both
      ``(B, H, W, C)`` in [-1, 1]) and optionally ``"cond"``: a dict of further conditions
      (e.g. ``"label"``) merged with ``{"image": xhat}``.
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}; got {formulation!r}")
    inner = denoising_loss(lambda p: refiner_denoiser(make_denoiser(p), formulation),
                           **loss_options)

    def loss(params, batch, key):
        x0, xhat = batch["x"], batch["xhat"]
        if xhat.shape != x0.shape:
            raise ValueError(f"batch['xhat'] must have the shape of batch['x'] {x0.shape}; "
                             f"got {xhat.shape}")
        _, data_shift = offsets(xhat, formulation)
        cond = {**(batch.get("cond") or {}), "image": xhat}
        return inner(params, {"x": x0 - data_shift, "cond": cond}, key)

    return loss


def vae_reconstruction(
    encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    decode: Callable[[Any, jax.Array], jax.Array],
    vae_params: Any,
    x: jax.Array,
    key: jax.Array | None = None,
    *,
    return_latent: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The refiner's conditioning ``xhat = 2 Dec(z) - 1`` of images ``x`` in [-1, 1], with
    ``z ~ q(z | x)`` (the official training) or ``z = mean`` when ``key`` is None; no gradient
    flows to the VAE (stage 2 trains with it frozen).

    Args:
      encode: ``(vae_params, x01) -> (mean, logvar)`` on images in [0, 1].
      decode: ``(vae_params, z) -> x01``.
      vae_params: the VAE's parameters.
      x: ``(B, H, W, C)`` images in [-1, 1].
      key: PRNG key of the latent sample, or None for the posterior mean.
      return_latent: also return the latent ``z`` (for DiffuseVAE's ``z_cond``).

    Returns:
      ``(B, H, W, C)`` reconstructions in [-1, 1], or ``(xhat, z)``.
    """
    vae_params = jax.lax.stop_gradient(vae_params)
    mean, logvar = encode(vae_params, (x + 1.0) / 2.0)
    z = mean
    if key is not None:
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    xhat = jax.lax.stop_gradient(2.0 * decode(vae_params, z) - 1.0)
    return (xhat, jax.lax.stop_gradient(z)) if return_latent else xhat


def _blur(x: jax.Array, sigma: jax.Array) -> jax.Array:
    # separable 9-tap Gaussian blur (exact to ~1e-3 of the mass for sigma <= 1.3), edges
    # replicated
    r = 4
    k = jnp.exp(-0.5 * jnp.square(jnp.arange(-r, r + 1, dtype=x.dtype) / jnp.maximum(sigma, 1e-6)))
    k = k / jnp.sum(k)
    pad = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    h = sum(k[i] * pad[:, i:i + x.shape[1], :, :] for i in range(2 * r + 1))
    return sum(k[i] * h[:, :, i:i + x.shape[2], :] for i in range(2 * r + 1))


def corrupt(x: jax.Array, kind: str, strength: float | jax.Array, key: jax.Array) -> jax.Array:
    """A corruption of the conditioning image (DiffuseVAE's robustness study, spec 1.8).

    Args:
      x: ``(B, H, W, C)`` images in [-1, 1].
      kind: ``"gaussian"`` (add ``N(0, strength^2)``), ``"salt_pepper"`` (a fraction
        ``strength`` of pixels set to -1 or 1 with equal odds) or ``"blur"`` (Gaussian blur of
        standard deviation ``strength`` pixels, at most ~1.3 for its 9-tap kernel).
      strength: the corruption's size (>= 0; 0 leaves ``x`` unchanged).
      key: PRNG key.

    Returns:
      The corrupted images, shape of ``x`` (not clipped: Gaussian noise may leave [-1, 1]).
    """
    if kind not in CORRUPTIONS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}; got {kind!r}")
    if x.ndim != 4:
        raise ValueError(f"x must be (B, H, W, C) images; got shape {x.shape}")
    if not isinstance(strength, jax.core.Tracer) and not float(strength) >= 0:
        raise ValueError(f"strength must be >= 0; got {strength!r}")
    s = jnp.asarray(strength, x.dtype)
    if kind == "gaussian":
        return x + s * jax.random.normal(key, x.shape, x.dtype)
    if kind == "salt_pepper":
        k_hit, k_val = jax.random.split(key)
        hit = jax.random.bernoulli(k_hit, s, x.shape)
        val = jnp.where(jax.random.bernoulli(k_val, 0.5, x.shape), 1.0, -1.0).astype(x.dtype)
        return jnp.where(hit, val, x)
    return jnp.where(s > 0, _blur(x, s), x)
