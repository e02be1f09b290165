"""Identity objectives of face models: ArcFace's additive angular margin softmax and the cosine
identity distance of REFace (``L_id = 1 - cos(E_id(x_hat), E_id(src))``).

ArcFace (Deng et al. 2019) trains a face encoder with unit embeddings ``e`` and unit class
weights ``w_j``, ``cos theta_j = e . w_j``, on the logits::

    l_y = s cos(theta_y + m)   for the true class y,      l_j = s cos theta_j   otherwise,

and the per-example softmax cross entropy. ``cos(theta + m)`` stops decreasing in ``theta``
once ``theta + m > pi``; the standard ("easy margin = False") implementation then switches to
the CosFace-like ``cos theta - m sin m`` (``mm = sin(pi - m) m``, first order in ``m``), which
keeps the true-class logit decreasing in ``theta`` (at ``theta = pi - m`` it steps down from
``cos(pi) = -1`` to ``-cos m - m sin m``, as in the reference implementation).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["arcface_loss", "cosine_distance"]

_CLIP_EPS = 1e-6  # cos is clipped to [-1 + eps, 1 - eps] before arccos: finite gradients


def arcface_loss(cos: Array, labels: Array, *, margin: float = 0.5, scale: float = 30.0) -> Array:
    """Per-example additive angular margin softmax loss (ArcFace).

    Args:
      cos: (B, C) cosines between unit embeddings and unit class weights, e.g.
        ``nets.FaceEncoder.cosine_logits``.
      labels: (B,) int true classes in ``[0, C)`` (values checked when concrete).
      margin: the additive angular margin ``m`` in radians, in ``[0, pi/2)`` (static).
      scale: the logit scale ``s`` > 0 (static).

    Returns:
      (B,) float32 (float64 for float64 ``cos``): ``-log softmax(l)_y`` with
      ``l_y = s cos(theta_y + m)`` (``s (cos theta_y - m sin m)`` where ``theta_y + m > pi``),
      ``l_j = s cos theta_j`` for ``j != y`` and ``theta_y = arccos(clip(cos_y))``. With
      ``margin = 0`` it is the softmax cross entropy of ``s * cos``.

    Example:
      >>> cos = encoder.cosine_logits(x)                         # (B, C)
      >>> loss = arcface_loss(cos, labels, margin=0.5, scale=30.0).mean()
    """
    cos = jnp.asarray(cos)
    labels = jnp.asarray(labels)
    if cos.ndim != 2 or not jnp.issubdtype(cos.dtype, jnp.floating):
        raise ValueError(f"cos must be a floating (B, C) array, got {cos.dtype}{cos.shape}")
    b, c = cos.shape
    if labels.shape != (b,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be (B,)=({b},) ints, got {labels.dtype}{labels.shape}")
    if not isinstance(labels, jax.core.Tracer) and b:  # values are checked when known
        values = np.asarray(labels)  # numpy: nothing is staged when called under a trace
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"labels must lie in [0, C={c}), got range [{lo}, {hi}]")
    if not 0.0 <= margin < math.pi / 2:
        raise ValueError(f"margin must be in [0, pi/2), got {margin}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")

    cos = cos.astype(jnp.promote_types(cos.dtype, jnp.float32))
    cos_y = jnp.take_along_axis(cos, labels[:, None], axis=1)[:, 0]
    theta = jnp.arccos(jnp.clip(cos_y, -1.0 + _CLIP_EPS, 1.0 - _CLIP_EPS))
    th, mm = math.cos(math.pi - margin), math.sin(math.pi - margin) * margin
    # cos(theta + m) while theta + m <= pi (cos theta > cos(pi - m)); the linear fallback beyond
    phi = jnp.where(cos_y > th, jnp.cos(theta + margin), cos_y - mm)
    onehot = jax.nn.one_hot(labels, c, dtype=jnp.bool_)
    logits = scale * jnp.where(onehot, phi[:, None], cos)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=1), labels[:, None], axis=1)[:, 0]


def cosine_distance(a: Array, b: Array, *, eps: float = 1e-12) -> Array:
    """``1 - cos(a, b)`` along the last axis (REFace's identity loss on embeddings).

    Args:
      a, b: (..., D) arrays of the same shape (need not be normalised).
      eps: norms are floored at ``eps``, so a zero vector has cosine 0 (distance 1) and a
        finite gradient.

    Returns:
      (...,) in ``[0, 2]``, float32 at least.

    Example:
      >>> l_id = cosine_distance(e_id(x0_hat), e_id(src))  # (B,)
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"a and b must have the same shape (..., D), got {a.shape} and {b.shape}")
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    a, b = a.astype(dtype), b.astype(dtype)

    def unit(x):
        return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps**2))

    return 1.0 - jnp.sum(unit(a) * unit(b), axis=-1)
