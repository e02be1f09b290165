"""The Denoiser: a model function with its schedule and parameterization, and the
``Denoiser -> Denoiser`` transformations (guidance, thresholding, clipping).

A model function has the signature ``fn(x, t, cond) -> output`` with continuous time ``t``
(scalar or one value per example), and predicts ``"eps"``, ``"x0"``, ``"v"``
(``v = alpha * eps - sigma * x0``) or ``"both"`` (Salimans & Ho: twice the channels, an x0 and
an eps guess, mixed by the noise level; see :meth:`Denoiser.predict`). The Denoiser answers
``eps``, ``x0`` and ``v`` by exact conversion, so every sampler works with every
parameterization and every schedule: with ``x = alpha x0 + sigma eps``,

* ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``,
* ``eps = (sigma x + alpha v) / (alpha^2 + sigma^2)``,

which reduce to ``alpha x - sigma v`` and ``sigma x + alpha v`` on variance-preserving schedules
(``alpha^2 + sigma^2 = 1``) and stay exact on EDM / VE (``alpha = 1``, ``sigma`` up to 80).

A Denoiser is a pytree. Its ``fn`` is stored as a :class:`jax.tree_util.Partial`, so model
parameters bound with ``Partial(apply, params)`` are traced leaves (``jax.jit(sampler)(den, ...)``
compiles once for all parameter values, and ``jax.grad`` reaches them), while a plain function
is static.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from dpm.schedules import Schedule, check_time

Array = jax.Array

__all__ = [
    "Denoiser",
    "network_denoiser",
    "classifier_free_guidance",
    "dynamic_thresholding",
    "clip_x0",
    "expand_like",
    "PREDICTIONS",
]

PREDICTIONS = ("eps", "x0", "v", "both")


def expand_like(a: Array, x: Array) -> Array:
    """Reshapes a scalar or per-example array ``a`` (shape ``()`` or ``(B,)``) to broadcast
    against ``x`` of shape ``(B, ...)``."""
    a = jnp.asarray(a)
    if a.ndim == 0:
        return a
    if a.ndim > x.ndim or a.shape != x.shape[: a.ndim]:
        raise ValueError(
            f"t must be a scalar or have the leading shape of x; got t.shape={a.shape}, "
            f"x.shape={x.shape}"
        )
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _as_partial(fn) -> Partial:
    if isinstance(fn, Partial):
        return fn
    if not callable(fn):
        raise TypeError(f"fn must be callable as fn(x, t, cond); got {type(fn).__name__}")
    return Partial(fn)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Denoiser:
    """A model function ``fn(x, t, cond)`` with its schedule and what it predicts.

    Attributes:
      fn: the model function; plain callables are wrapped in ``jax.tree_util.Partial``.
      schedule: the :class:`~dpm.schedules.Schedule` the model was trained with.
      prediction: ``"eps"``, ``"x0"``, ``"v"`` or ``"both"`` (static; ``"both"``: the output
        has twice the channels of ``x``, last axis).
      cond: the condition passed to ``fn`` (any pytree, or None).

    Example:
      >>> sched = DiscreteVP.from_name("linear")
      >>> den = Denoiser(lambda x, t, c: jnp.zeros_like(x), sched, "eps")
      >>> den.x0(jnp.ones((2, 3)), 0.5).shape
      (2, 3)
    """

    fn: Callable = dataclasses.field()
    schedule: Schedule = dataclasses.field()
    prediction: str = dataclasses.field(default="eps", metadata=dict(static=True))
    cond: Any = None

    def __post_init__(self):
        object.__setattr__(self, "fn", _as_partial(self.fn))
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}; got {self.prediction!r}")
        if not isinstance(self.schedule, Schedule):
            raise TypeError(
                f"schedule must be a dpm.schedules.Schedule; got {type(self.schedule).__name__}"
            )

    def with_cond(self, cond: Any) -> Denoiser:
        """The same denoiser with another condition."""
        return dataclasses.replace(self, cond=cond)

    def output(self, x: Array, t: Array) -> Array:
        """The raw model output ``fn(x, t, cond)``."""
        return self.fn(x, t, self.cond)

    def _coeffs(self, x: Array, t: Array):
        t = jnp.asarray(t)
        a = expand_like(self.schedule.alpha(t), x).astype(x.dtype)
        s = expand_like(self.schedule.sigma(t), x).astype(x.dtype)
        return a, s

    def predict(self, x: Array, t: Array) -> tuple[Array, Array]:
        """Both ``(x0_hat, eps_hat)`` from one model evaluation.

        At ``t = 0`` (``sigma = 0``) an x0- or v-model's ``eps_hat`` is undefined and returned
        as computed; samplers use ``x0_hat`` there. A ``"both"`` model's output ``(x_til,
        e_til)`` (channels split in half) gives ``x0_hat = (sigma^2 x_til + alpha (x - sigma
        e_til)) / (alpha^2 + sigma^2)``: its x0 guess weighted by ``sigma^2``, the x0 implied by
        its eps guess by ``alpha^2``.
        """
        check_time(t)
        out = self.output(x, t)
        a, s = self._coeffs(x, t)
        if self.prediction == "both":
            want = x.shape[:-1] + (2 * x.shape[-1],)
            if out.shape != want:
                raise ValueError(
                    "a 'both' model's output must have twice the channels of x (x0 and eps "
                    f"guesses, last axis); got {out.shape}, expected {want}"
                )
            x_til, e_til = jnp.split(out, 2, axis=-1)
            # x0 = (s^2 x_til + a^2 (x - s e_til) / a) / (a^2 + s^2): x0-prediction at low SNR,
            # eps-prediction at high SNR; eps = (x - a x0) / s written without dividing by s
            n = (a * a + s * s).astype(x.dtype)
            x0 = (s * s * x_til + a * (x - s * e_til)) / n
            return x0, (s * (x - a * x_til) + a * a * e_til) / n
        if out.shape != x.shape:
            raise ValueError(
                f"the model output must have the shape of x; got {out.shape}, x.shape={x.shape}"
            )
        if self.prediction == "eps":
            return (x - s * out) / a, out
        if self.prediction == "x0":
            return out, (x - a * out) / s
        # v-prediction, any schedule: with x = a x0 + s eps and v = a eps - s x0,
        # a x - s v = (a^2 + s^2) x0 and s x + a v = (a^2 + s^2) eps  (a^2 + s^2 = 1 for VP).
        t = jnp.asarray(t)
        # a^2 + s^2 in the schedule's precision: exactly 1 in bfloat16 / float16 for VP
        n = expand_like(self.schedule.alpha(t) ** 2 + self.schedule.sigma(t) ** 2, x)
        n = n.astype(x.dtype)
        return (a * x - s * out) / n, (s * x + a * out) / n

    def x0(self, x: Array, t: Array) -> Array:
        """Predicted clean data ``x0_hat(x, t)``, shape of ``x``."""
        return self.predict(x, t)[0]

    def eps(self, x: Array, t: Array) -> Array:
        """Predicted noise ``eps_hat(x, t)``, shape of ``x``."""
        return self.predict(x, t)[1]

    def v(self, x: Array, t: Array) -> Array:
        """Predicted velocity ``v = alpha * eps - sigma * x0``, shape of ``x``."""
        x0, eps = self.predict(x, t)
        a, s = self._coeffs(x, t)
        return a * eps - s * x0


# --------------------------------------------------------------------------------------------
# From a network to a model function
# --------------------------------------------------------------------------------------------


def _net_fn(apply, schedule, x, t, cond):
    return apply(x, schedule.c_noise(t), cond)


def _edm_net_fn(apply, schedule, sigma_data, x, t, cond):
    # EDM preconditioning in the variables x_bar = x / alpha, sigma_bar = sigma / alpha.
    t = jnp.asarray(t)
    alpha = expand_like(schedule.alpha(t), x)
    sb = schedule.sigma_bar(t)
    sbe = expand_like(sb, x)
    x_bar = x / alpha
    denom = jnp.sqrt(sbe**2 + sigma_data**2)
    c_skip = sigma_data**2 / denom**2
    c_out = sbe * sigma_data / denom
    c_in = 1.0 / denom
    c_noise = 0.25 * jnp.log(jnp.maximum(sb, 1e-20))
    F = apply((c_in * x_bar).astype(x.dtype), c_noise, cond)
    return (c_skip * x_bar + c_out * F).astype(x.dtype)


def network_denoiser(
    apply: Callable,
    schedule: Schedule,
    prediction: str = "eps",
    *,
    preconditioning: str | None = None,
    sigma_data: float = 0.5,
    cond: Any = None,
) -> Denoiser:
    """Wraps a backbone ``apply(x, noise_level, cond)`` into a Denoiser.

    Args:
      apply: the backbone; bind parameters with ``jax.tree_util.Partial(apply, params)`` so they
        stay traced. Backbones know nothing of schedules: they receive ``schedule.c_noise(t)``.
      schedule: the training schedule.
      prediction: what the backbone predicts (ignored with EDM preconditioning, which predicts x0).
      preconditioning: None, or ``"edm"`` for Karras et al.'s ``c_skip, c_out, c_in, c_noise``
        (applied in ``x / alpha``, so it works for any schedule).
      sigma_data: EDM's data standard deviation.
      cond: the condition passed to the backbone.

    Returns:
      A :class:`Denoiser`.
    """
    apply = _as_partial(apply)
    if preconditioning is None:
        return Denoiser(Partial(_net_fn, apply, schedule), schedule, prediction, cond)
    if preconditioning == "edm":
        return Denoiser(
            Partial(_edm_net_fn, apply, schedule, jnp.asarray(sigma_data)), schedule, "x0", cond
        )
    raise ValueError(f"preconditioning must be None or 'edm'; got {preconditioning!r}")


# --------------------------------------------------------------------------------------------
# Denoiser -> Denoiser transformations
# --------------------------------------------------------------------------------------------


def _concat_trees(a, b):
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def _cfg_fn(inner, scale, null_cond, x, t, cond):
    if cond is None:
        raise ValueError("classifier-free guidance needs a condition: set Denoiser.cond")
    B = x.shape[0]
    t2 = jnp.broadcast_to(jnp.asarray(t), (B,))
    # Both branches in one batched call, like the reference implementations.
    out = inner(
        jnp.concatenate([x, x], axis=0),
        jnp.concatenate([t2, t2], axis=0),
        _concat_trees(cond, null_cond),
    )
    out_c, out_u = out[:B], out[B:]
    return out_u + expand_like(scale, x) * (out_c - out_u)


def classifier_free_guidance(den: Denoiser, scale: Array | float, null_cond: Any) -> Denoiser:
    """Classifier-free guidance (Ho & Salimans): ``out_u + scale * (out_c - out_u)``.

    The combination is made on the raw output; since every conversion is affine in the output,
    this equals guiding ``eps``, ``x0`` or ``v`` alike. Scale 1 is the conditional model.

    Args:
      den: the conditional denoiser (its ``cond`` is the condition).
      scale: guidance scale ``w`` (traced: ``vmap`` over scales works); scalar or ``(B,)``.
      null_cond: the unconditional condition, a pytree shaped like ``den.cond``.

    Returns:
      The guided Denoiser (same schedule, prediction and condition).
    """
    return Denoiser(
        Partial(_cfg_fn, den.fn, jnp.asarray(scale), null_cond),
        den.schedule,
        den.prediction,
        den.cond,
    )


def _quantile_threshold(x0: Array, ratio, max_value) -> Array:
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    # quantile takes q in [0, 1] (other JAX ports passed 0.995 to percentile, a bug).
    s = jnp.quantile(flat.astype(jnp.float32), ratio, axis=1)
    s = jnp.clip(s, 1.0, max_value).astype(x0.dtype)
    s = expand_like(s, x0)
    return jnp.clip(x0, -s, s) / s


def _thresh_fn(inner: Denoiser, ratio, max_value, x, t, cond):
    return _quantile_threshold(inner.with_cond(cond).x0(x, t), ratio, max_value)


def dynamic_thresholding(
    den: Denoiser, ratio: float = 0.995, max_value: float = jnp.inf
) -> Denoiser:
    """Dynamic thresholding of Imagen (Saharia et al. 2022), applied to ``x0_hat``.

    Per example, ``s = clip(quantile(|x0_hat|, ratio), 1, max_value)`` and
    ``x0_hat <- clip(x0_hat, -s, s) / s``; an ``x0_hat`` already in ``[-1, 1]`` is unchanged.

    Args:
      den: the denoiser.
      ratio: the quantile in ``[0, 1]`` (0.995 in Imagen).
      max_value: upper bound on ``s`` (diffusers' ``sample_max_value``); no bound by default.

    Returns:
      A Denoiser that predicts the thresholded ``x0`` (``prediction="x0"``).
    """
    if not (0.0 < float(ratio) <= 1.0):
        raise ValueError(f"ratio must be a quantile in (0, 1]; got {ratio!r}")
    if float(max_value) < 1.0:
        raise ValueError(f"max_value must be >= 1; got {max_value!r}")
    fn = Partial(_thresh_fn, den, jnp.asarray(ratio), jnp.asarray(max_value))
    return Denoiser(fn, den.schedule, "x0", den.cond)


def _clip_fn(inner: Denoiser, lo, hi, x, t, cond):
    return jnp.clip(inner.with_cond(cond).x0(x, t), lo, hi)


def clip_x0(den: Denoiser, lo: float = -1.0, hi: float = 1.0) -> Denoiser:
    """Static clipping of ``x0_hat`` to ``[lo, hi]`` (DDPM's ``clip_sample``)."""
    if not float(lo) < float(hi):
        raise ValueError(f"clip_x0 needs lo < hi; got lo={lo}, hi={hi}")
    fn = Partial(_clip_fn, den, jnp.asarray(lo), jnp.asarray(hi))
    return Denoiser(fn, den.schedule, "x0", den.cond)
