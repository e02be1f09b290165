"""A residual MLP denoiser backbone for low-dimensional data (2-D toys, feature vectors)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import dense, sinusoidal_embedding


class MLP(nnx.Module):
    """Residual MLP ``(x (B, D), noise_level () or (B,), cond) -> (B, D)``.

    Each block: ``h + W2 silu(W1 silu(LayerNorm(h)) + E emb)``, with a sinusoidal embedding of the
    noise level and optional class embedding (``num_classes`` adds a null class for guidance).

    Args:
      dim: data dimension D.
      width: hidden width.
      depth: number of residual blocks.
      num_classes: None, or the number of classes (labels passed as ``cond["label"]``).
      emb_dim: width of the sinusoidal embedding.
    """

    def __init__(
        self,
        dim: int,
        width: int = 128,
        depth: int = 3,
        *,
        num_classes: int | None = None,
        emb_dim: int = 64,
        rngs: nnx.Rngs,
    ):
        for name, v in (("dim", dim), ("width", width), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.dim, self.emb_dim, self.num_classes = dim, emb_dim, num_classes
        self.inp = dense(dim, width, rngs=rngs)
        self.emb = dense(emb_dim, width, rngs=rngs)
        self.label = (nnx.Embed(num_classes + 1, width, rngs=rngs)
                      if num_classes is not None else None)
        self.norms = nnx.List([nnx.LayerNorm(width, rngs=rngs) for _ in range(depth)])
        self.w1 = nnx.List([dense(width, width, rngs=rngs) for _ in range(depth)])
        self.e = nnx.List([dense(width, width, rngs=rngs) for _ in range(depth)])
        self.w2 = nnx.List([dense(width, width, rngs=rngs) for _ in range(depth)])
        self.out = dense(width, dim, rngs=rngs)
        self.out.kernel[...] = jnp.zeros_like(self.out.kernel[...])

    def __call__(self, x: jax.Array, noise_level: jax.Array, cond=None) -> jax.Array:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}); got {x.shape}")
        b = x.shape[0]
        emb = self.emb(sinusoidal_embedding(jnp.broadcast_to(noise_level, (b,)), self.emb_dim))
        if self.label is not None:
            if cond is None or "label" not in cond:
                raise ValueError("cond['label'] is required when num_classes is set")
            emb = emb + self.label(cond["label"])
        h = self.inp(x.astype(jnp.float32))
        for norm, w1, e, w2 in zip(self.norms, self.w1, self.e, self.w2, strict=True):
            h = h + w2(nnx.silu(w1(nnx.silu(norm(h))) + e(nnx.silu(emb))))
        return self.out(nnx.silu(h))
