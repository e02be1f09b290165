"""A small transformer text encoder: the frozen CLIP text tower of text-to-image models.

Token and learned positional embeddings, ``depth`` pre-LayerNorm blocks (multi-head
self-attention that ignores padding, then a GELU MLP), a final LayerNorm. The token ids follow
``dpm.data.CaptionVocab``: ``PAD_ID = 0`` pads a row after ``EOS_ID = 2`` ends the caption
(``[bos, words..., eos, pad...]``). Attention is bidirectional over the non-pad tokens, so the
features of a caption do not depend on how much padding follows it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import TransformerBlock, layer_norm

__all__ = ["EOS_ID", "PAD_ID", "TextEncoder", "TextEncoderConfig"]

PAD_ID = 0  # dpm.data.CaptionVocab.pad_id
EOS_ID = 2  # dpm.data.CaptionVocab.eos_id

_embed_init = nnx.initializers.normal(0.02)  # CLIP / GPT-2 token and position embeddings


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """Static description of a :class:`TextEncoder` (hashable).

    Attributes:
      vocab_size: number of token ids V (ids in ``[0, V)``).
      max_len: longest token row L_max (learned positions); shorter rows are accepted.
      width: model width D.
      depth: number of transformer blocks.
      num_heads: attention heads; must divide ``width``.
      mlp_ratio: hidden width of the MLP is ``mlp_ratio * width``.
      dtype: compute dtype of the dense layers; parameters, normalisation and outputs are
        float32.
    """

    vocab_size: int
    max_len: int
    width: int = 64
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("vocab_size", "max_len", "width", "depth", "num_heads", "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.vocab_size <= EOS_ID:
            raise ValueError(
                f"vocab_size must exceed the eos id {EOS_ID} (pad=0, bos=1, eos=2), got "
                f"{self.vocab_size}"
            )
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (bos and eos), got {self.max_len}")
        if self.width % self.num_heads:
            raise ValueError(
                f"width ({self.width}) must be divisible by num_heads ({self.num_heads})"
            )
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")


class TextEncoder(nnx.Module):
    """Transformer text encoder ``tokens (B, L) -> (features, mask, pooled)``.

    Args:
      config: a :class:`TextEncoderConfig`.

    Example:
      >>> enc = TextEncoder(TextEncoderConfig(vocab_size=57, max_len=12), rngs=nnx.Rngs(0))
      >>> features, mask, pooled = enc(tokens)  # (B, 12, 64), (B, 12), (B, 64)
    """

    def __init__(self, config: TextEncoderConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TextEncoderConfig):
            raise TypeError(f"config must be a TextEncoderConfig, got {type(config).__name__}")
        self.config = config
        d = config.width
        self.token_embed = nnx.Param(_embed_init(rngs.params(), (config.vocab_size, d)))
        self.pos_embed = nnx.Param(_embed_init(rngs.params(), (config.max_len, d)))
        self.blocks = nnx.List([
            TransformerBlock(d, config.num_heads, config.mlp_ratio, dtype=config.dtype, rngs=rngs)
            for _ in range(config.depth)
        ])
        self.norm = layer_norm(d, rngs)

    def _check_tokens(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        shape, dtype = jnp.shape(tokens), jnp.result_type(tokens)
        if len(shape) != 2 or not 2 <= shape[1] <= cfg.max_len:
            raise ValueError(
                f"tokens must have shape (B, L) with 2 <= L <= max_len={cfg.max_len}, got {shape}"
            )
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(f"tokens must be integer ids, got dtype {dtype}")
        if not isinstance(tokens, jax.core.Tracer):  # values are checked when they are known
            lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(
                    f"tokens must lie in [0, vocab_size={cfg.vocab_size}), got range [{lo}, {hi}]"
                )
            if not bool(jnp.all(jnp.any(tokens == EOS_ID, axis=1))):
                raise ValueError(
                    f"every token row must contain the eos id {EOS_ID} (rows are [bos, words..., "
                    "eos, pad...]); some rows have none"
                )
        return jnp.asarray(tokens)

    def __call__(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Encode token rows.

        Args:
          tokens: (B, L) int ids, ``L <= max_len``; ``0`` is padding, each row holds an eos
            (``2``). Under ``jit`` the values are not checked.

        Returns:
          ``features`` (B, L, D) float32 (after the final LayerNorm; pad positions hold
          features too, which callers should mask), ``mask`` (B, L) bool (``tokens != 0``),
          ``pooled`` (B, D) float32: the features at each row's first eos token, as in CLIP
          (with bidirectional attention the eos feature sees the whole caption).
        """
        tokens = self._check_tokens(tokens)
        l = tokens.shape[1]
        mask = tokens != PAD_ID
        x = jnp.take(self.token_embed[...], tokens, axis=0) + self.pos_embed[...][:l]
        for block in self.blocks:
            x = block(x, mask)
        features = self.norm(x).astype(jnp.float32)
        eos = jnp.argmax(tokens == EOS_ID, axis=1)
        pooled = jnp.take_along_axis(features, eos[:, None, None], axis=1)[:, 0]
        return features, mask, pooled
