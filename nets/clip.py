"""A CLIP-style contrastive image-text model: a conv image tower and a transformer text tower.

One class serves two roles of RG-LCD: the pixel CLIP that judges generated digits (16x16x1
images) and the "LatentCLIP" proxy reward model, which scores autoencoder latents (e.g. 4x4x4)
directly. The image tower follows :class:`nets.Classifier`: stages of two conv3x3 + GroupNorm +
SiLU layers, width doubling and 2x2 average pooling between stages while the map is larger than
4x4 (a 4x4 input is not pooled), global average pooling, and a dense projection. The text tower
is a :class:`nets.TextEncoder` whose pooled (eos) feature is projected. Both embeddings are
L2-normalised; the logits of the contrastive loss are ``logit_scale * img @ txt.T``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import ConvNormAct, dense, l2_normalize
from nets.text import TextEncoder, TextEncoderConfig

__all__ = ["ContrastiveConfig", "ContrastiveModel"]


@dataclasses.dataclass(frozen=True)
class ContrastiveConfig:
    """Static description of a :class:`ContrastiveModel` (hashable).

    Attributes:
      image_size: H = W of the image (or latent) inputs.
      in_channels: their channels C.
      text: the text tower's :class:`TextEncoderConfig`.
      image_width: channels of the first conv stage; stage s has ``image_width * 2**s``.
      embed_dim: width E of the joint embedding space.
      init_logit_scale: initial ``log`` of the logit scale (CLIP: ``log(1 / 0.07)``).
      max_logit_scale: the logit scale is clipped at this value (CLIP: 100).
    """

    image_size: int
    in_channels: int
    text: TextEncoderConfig
    image_width: int = 32
    embed_dim: int = 64
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0

    def __post_init__(self):
        for name in ("image_size", "in_channels", "image_width", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.text, TextEncoderConfig):
            raise TypeError(f"text must be a TextEncoderConfig, got {type(self.text).__name__}")
        if not math.isfinite(self.max_logit_scale) or self.max_logit_scale <= 0:
            raise ValueError(f"max_logit_scale must be finite and > 0, got {self.max_logit_scale}")
        if not (
            math.isfinite(self.init_logit_scale)
            and math.exp(self.init_logit_scale) <= self.max_logit_scale
        ):
            raise ValueError(
                f"init_logit_scale must be finite with exp(init_logit_scale) <= max_logit_scale="
                f"{self.max_logit_scale}, got {self.init_logit_scale}"
            )


class ContrastiveModel(nnx.Module):
    """CLIP in miniature: images (B, S, S, C) and token rows (B, L) into a shared unit sphere.

    Args:
      config: a :class:`ContrastiveConfig`.

    Example:
      >>> cfg = ContrastiveConfig(16, 1, TextEncoderConfig(vocab_size=57, max_len=12))
      >>> model = ContrastiveModel(cfg, rngs=nnx.Rngs(0))
      >>> img, txt, scale = model(images, tokens)  # (B, 64), (B, 64), ()
      >>> reward = model.score(images, tokens)     # (B,) cosine similarity in [-1, 1]
    """

    def __init__(self, config: ContrastiveConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ContrastiveConfig):
            raise TypeError(f"config must be a ContrastiveConfig, got {type(config).__name__}")
        self.config = config
        stages, pools = [], []
        c_in, c, size = config.in_channels, config.image_width, config.image_size
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
        self.image_proj = dense(c, config.embed_dim, rngs=rngs)
        self.text = TextEncoder(config.text, rngs=rngs)
        self.text_proj = dense(config.text.width, config.embed_dim, rngs=rngs)
        self.log_logit_scale = nnx.Param(jnp.asarray(config.init_logit_scale, jnp.float32))

    def embed_image(self, x: jax.Array) -> jax.Array:
        """Image embeddings. x: (B, image_size, image_size, in_channels) -> (B, E), unit norm.

        (A projection that is exactly zero, e.g. of an all-zero input at initialisation, stays
        zero rather than dividing by zero.)
        """
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
        if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != expected:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, expected))}), got {jnp.shape(x)}"
            )
        h = jnp.asarray(x, jnp.float32)
        for stage, pool in zip(self.stages, self.pools, strict=True):
            for layer in stage:
                h = layer(h)
            if pool:
                b, hh, ww, c = h.shape
                h = jnp.mean(h.reshape(b, hh // 2, 2, ww // 2, 2, c), axis=(2, 4))
        return l2_normalize(self.image_proj(jnp.mean(h, axis=(1, 2))))

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        """Text embeddings. tokens: (B, L) int -> (B, E), unit norm (projected eos feature)."""
        _, _, pooled = self.text(tokens)
        return l2_normalize(self.text_proj(pooled))

    def logit_scale(self) -> jax.Array:
        """The contrastive temperature's inverse: ``min(exp(log_scale), max_logit_scale)``, ()."""
        return jnp.minimum(jnp.exp(self.log_logit_scale[...]), self.config.max_logit_scale)

    def score(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        """CLIPScore analogue: cosine similarity of each image with its own caption, (B,).

        In ``[-1, 1]``, unscaled (CLIPScore's ``2.5 * max(cos, 0)`` or a reward's temperature
        is the caller's choice). x: (B, S, S, C), tokens: (B, L).
        """
        img, txt = self.embed_image(x), self.embed_text(tokens)
        if img.shape[0] != txt.shape[0]:
            raise ValueError(
                f"x and tokens must have the same batch size, got {img.shape[0]} and "
                f"{txt.shape[0]}"
            )
        return jnp.sum(img * txt, axis=-1)

    def __call__(self, x: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(img_emb (B, E), txt_emb (B', E), logit_scale ())`` (``dpm.losses.clip_loss``)."""
        return self.embed_image(x), self.embed_text(tokens), self.logit_scale()
