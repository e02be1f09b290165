"""A small conv classifier for feature-Fréchet metrics on digits (8x8, 16x16) and small images.

Two conv3x3 layers per stage with GroupNorm and SiLU, 2x2 average pooling between stages until
the map is 4x4 (or odd), global average pooling, a dense feature layer (the penultimate
features used by Fréchet distances), and a linear head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import ConvNormAct, dense, dropout

__all__ = ["Classifier"]


class Classifier(nnx.Module):
    """Conv classifier `(B, image_size, image_size, in_channels) -> (B, num_classes)` logits.

    Args:
      num_classes: number of classes.
      in_channels: image channels.
      image_size: H = W of the inputs.
      width: channels of the first stage; stage s has `width * 2**s`.
      feature_dim: width F of the penultimate features (default `4 * width`).
      dropout: dropout rate on the features, active only with `train=True`.

    Example:
      >>> clf = Classifier(10, 1, 8, 32, rngs=nnx.Rngs(0))
      >>> logits = clf(jnp.zeros((4, 8, 8, 1)))  # (4, 10)
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: int = 32,
        *,
        feature_dim: int | None = None,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("image_size", image_size),
            ("width", width),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.dropout = dropout
        self.feature_dim = feature_dim if feature_dim is not None else 4 * width

        stages, pools = [], []
        c_in, c, size = in_channels, width, image_size
        while True:
            stages.append(
                nnx.List([ConvNormAct(c_in, c, rngs=rngs), ConvNormAct(c, c, rngs=rngs)])
            )
            pool = size > 4 and size % 2 == 0
            pools.append(pool)
            if not pool:
                break
            c_in, c, size = c, 2 * c, size // 2
        self.stages = nnx.List(stages)
        self.pools = tuple(pools)
        self.fc = dense(c, self.feature_dim, rngs=rngs)
        self.head = dense(self.feature_dim, num_classes, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate features. x: (B, image_size, image_size, in_channels) -> (B, F) float32."""
        x = jnp.asarray(x)
        expected = (self.image_size, self.image_size, self.in_channels)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, expected))}), got {x.shape}"
            )
        h = x.astype(jnp.float32)
        for stage, pool in zip(self.stages, self.pools, strict=True):
            for layer in stage:
                h = layer(h)
            if pool:
                b, hh, ww, c = h.shape
                h = jnp.mean(h.reshape(b, hh // 2, 2, ww // 2, 2, c), axis=(2, 4))
        h = jnp.mean(h, axis=(1, 2))
        return nnx.silu(self.fc(h))

    def __call__(
        self, x: jax.Array, *, train: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """Logits. x: (B, image_size, image_size, in_channels) -> (B, num_classes) float32.

        `key` is required when `train=True` and `dropout > 0`.
        """
        if train and self.dropout > 0 and key is None:
            raise ValueError(f"key is required when train=True and dropout={self.dropout} > 0")
        f = self.features(x)
        if train:
            f = dropout(f, self.dropout, key)
        return self.head(f)
