"""Private building blocks shared by the backbones in `nets/` (NHWC layout throughout).

Conventions: parameters are float32; each layer computes in a `dtype` given at construction;
normalisation statistics are always float32. Dropout is functional: it takes an explicit PRNG
key, so the modules run unchanged under `nnx.split` / `nnx.merge` inside `jax.jit`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

# DDPM's initialisers: variance scaling (fan_avg, uniform) and zero for the last layer of
# every residual branch and of the network.
default_init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nnx.initializers.zeros_init()


def group_count(channels: int, max_groups: int = 32, min_group_size: int = 4) -> int:
    """Number of GroupNorm groups for `channels`: 32, fewer when channels are few.

    The largest divisor of `channels` that is at most `min(max_groups, channels //
    min_group_size)` (at least 1), so every group holds the same number of channels and
    narrow layers keep at least `min_group_size` channels per group when they can.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    bound = max(1, min(max_groups, channels // min_group_size))
    return max(g for g in range(1, bound + 1) if channels % g == 0)


class GroupNorm(nnx.Module):
    """Group normalisation over (H, W, channels-in-group) with float32 statistics.

    Returns the input's dtype, so a bfloat16 residual stream stays bfloat16.
    """

    def __init__(self, channels: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        del rngs
        self.channels = channels
        self.groups = group_count(channels)
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, ..., C) -> same shape and dtype."""
        shape = x.shape
        g = self.groups
        h = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
        mean = jnp.mean(h, axis=(1, 3), keepdims=True)
        var = jnp.maximum(jnp.mean(jnp.square(h), axis=(1, 3), keepdims=True) - mean**2, 0.0)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        h = h.reshape(shape) * self.scale[...] + self.bias[...]
        return h.astype(x.dtype)


def conv(
    c_in: int,
    c_out: int,
    kernel: int = 3,
    *,
    stride: int = 1,
    padding: str = "SAME",
    dtype: Dtype = jnp.float32,
    zero: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An NHWC `kernel x kernel` convolution with float32 parameters computing in `dtype`."""
    return nnx.Conv(
        c_in,
        c_out,
        (kernel, kernel),
        strides=stride,
        padding=padding if kernel > 1 else "VALID",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else default_init,
        bias_init=zeros_init,
        rngs=rngs,
    )


def dense(
    d_in: int, d_out: int, *, dtype: Dtype = jnp.float32, zero: bool = False, rngs: nnx.Rngs
) -> nnx.Linear:
    """A dense layer with float32 parameters computing in `dtype`."""
    return nnx.Linear(
        d_in,
        d_out,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else default_init,
        bias_init=zeros_init,
        rngs=rngs,
    )


def sinusoidal_embedding(noise_level: jax.Array, dim: int, max_period: float = 10_000.0):
    """Transformer sinusoidal embedding of a scalar per example (DDPM's `get_timestep_embedding`).

    Args:
      noise_level: (B,) float, whatever time conditioning the caller uses.
      dim: even embedding width, >= 4.

    Returns:
      (B, dim) float32: [sin(n * f_k), cos(n * f_k)], f_k = max_period^(-k / (dim/2 - 1)).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    arg = noise_level.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class ConvNormAct(nnx.Module):
    """conv3x3 -> GroupNorm -> SiLU (the stages of the classifier and the CLIP image tower)."""

    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.conv = conv(c_in, c_out, rngs=rngs)
        self.norm = GroupNorm(c_out, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.silu(self.norm(self.conv(x)))


class ResBlock(nnx.Module):
    """DDPM / ADM residual block with time-embedding conditioning.

    norm -> SiLU -> conv3x3 -> (+ proj(SiLU(emb)) | FiLM in the second norm) -> norm -> SiLU ->
    dropout -> conv3x3 (zero-initialised), plus a 1x1-conv skip when the width changes.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        emb_dim: int,
        *,
        index: int,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        padding: str = "SAME",
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.index = index  # folded into the dropout key, so every block draws its own mask
        self.dropout = dropout
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = GroupNorm(c_in, rngs=rngs)
        self.conv1 = conv(c_in, c_out, padding=padding, dtype=dtype, rngs=rngs)
        emb_out = 2 * c_out if use_scale_shift_norm else c_out
        self.emb_proj = dense(emb_dim, emb_out, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(c_out, rngs=rngs)
        self.conv2 = conv(c_out, c_out, padding=padding, dtype=dtype, zero=True, rngs=rngs)
        self.skip = conv(c_in, c_out, 1, dtype=dtype, rngs=rngs) if c_in != c_out else None

    def __call__(self, x: jax.Array, emb: jax.Array, key: jax.Array | None) -> jax.Array:
        """x: (B, H, W, c_in), emb: (B, emb_dim) -> (B, H, W, c_out); key None = no dropout."""
        h = self.conv1(nnx.silu(self.norm1(x)))
        e = self.emb_proj(nnx.silu(emb)).astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = nnx.silu(h)
        if key is not None:
            h = dropout(h, self.dropout, jax.random.fold_in(key, self.index))
        h = self.conv2(h)
        skip = x if self.skip is None else self.skip(x)
        return skip.astype(h.dtype) + h


class AttnBlock(nnx.Module):
    """Multi-head self-attention over all H*W positions, residual, zero-initialised output.

    One fused qkv projection; `jax.nn.dot_product_attention` (float32 logits and softmax).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        *,
        implementation: str | None = None,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.implementation = implementation
        self.norm = GroupNorm(channels, rngs=rngs)
        self.qkv = dense(channels, 3 * channels, dtype=dtype, rngs=rngs)
        self.proj_out = dense(channels, channels, dtype=dtype, zero=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        b, hh, ww, c = x.shape
        n = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(b, hh * ww, 3, n, c // n)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        h = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        h = self.proj_out(h.reshape(b, hh, ww, c))
        return x.astype(h.dtype) + h


class CrossAttnBlock(nnx.Module):
    """Multi-head cross-attention from the H*W positions to a context sequence (text-token
    features, as in Stable Diffusion's U-Net), residual, zero-initialised output.

    Queries from GroupNorm(x), keys and values from LayerNorm(context) (float32 statistics and
    parameters); `jax.nn.dot_product_attention` (float32 logits and softmax) with a key padding
    mask. With the output projection at zero (as built) the block is the identity.

    Every row of `context_mask` needs at least one valid (True) token: a fully masked row has
    nothing to attend to, and the masked softmax then spreads over the padding tokens (finite,
    but meaningless). `UNet` rejects such a mask when it is concrete; under `jit` it cannot
    check, so the caller must guarantee it.
    """

    def __init__(
        self,
        channels: int,
        context_dim: int,
        num_heads: int,
        *,
        implementation: str | None = None,
        dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        if context_dim < 1:
            raise ValueError(f"context_dim must be >= 1, got {context_dim}")
        self.num_heads = num_heads
        self.implementation = implementation
        self.norm = GroupNorm(channels, rngs=rngs)
        self.context_norm = nnx.LayerNorm(
            context_dim, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs
        )
        self.q = dense(channels, channels, dtype=dtype, rngs=rngs)
        self.kv = dense(context_dim, 2 * channels, dtype=dtype, rngs=rngs)
        self.proj_out = dense(channels, channels, dtype=dtype, zero=True, rngs=rngs)

    def __call__(
        self, x: jax.Array, context: jax.Array, context_mask: jax.Array | None = None
    ) -> jax.Array:
        """x: (B, H, W, C), context: (B, L, context_dim), context_mask: (B, L) bool, True =
        valid token (None = all valid) -> (B, H, W, C)."""
        b, hh, ww, c = x.shape
        n, l = self.num_heads, context.shape[1]
        q = self.q(self.norm(x)).reshape(b, hh * ww, n, c // n)
        kv = self.kv(self.context_norm(context.astype(jnp.float32))).reshape(b, l, 2, n, c // n)
        k, v = kv[:, :, 0], kv[:, :, 1]
        mask = None
        if context_mask is not None:
            if context_mask.dtype != jnp.bool_ or context_mask.shape != (b, l):
                raise ValueError(f"context_mask must be bool of shape {(b, l)}, got "
                                 f"{context_mask.dtype}{context_mask.shape}")
            # (B, 1, T, L): a full query axis, which the cuDNN implementation requires
            mask = jnp.broadcast_to(context_mask[:, None, None, :], (b, 1, hh * ww, l))
        h = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        h = self.proj_out(h.reshape(b, hh, ww, c))
        return x.astype(h.dtype) + h


class Downsample(nnx.Module):
    """Halve H and W: a stride-2 conv3x3, or 2x2 average pooling."""

    def __init__(
        self, channels: int, with_conv: bool, *, padding: str, dtype: Dtype, rngs: nnx.Rngs
    ):
        self.conv = (
            conv(channels, channels, stride=2, padding=padding, dtype=dtype, rngs=rngs)
            if with_conv
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, H/2, W/2, C)."""
        if self.conv is not None:
            return self.conv(x)
        b, h, w, c = x.shape
        return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4)).astype(x.dtype)


class Upsample(nnx.Module):
    """Double H and W: nearest-neighbour, then optionally a conv3x3."""

    def __init__(
        self, channels: int, with_conv: bool, *, padding: str, dtype: Dtype, rngs: nnx.Rngs
    ):
        self.conv = (
            conv(channels, channels, padding=padding, dtype=dtype, rngs=rngs) if with_conv else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (B, H, W, C) -> (B, 2H, 2W, C)."""
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        x = x.reshape(b, 2 * h, 2 * w, c)
        return x if self.conv is None else self.conv(x)


def count_params(module: nnx.Module) -> int:
    """Number of scalar parameters (`nnx.Param`) in `module`; works on `nnx.eval_shape` output."""
    state = nnx.state(module, nnx.Param)
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state))


def layer_norm(d: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm with float32 parameters and statistics (the output follows them)."""
    return nnx.LayerNorm(d, epsilon=1e-5, param_dtype=jnp.float32, rngs=rngs)


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / |x|`` along the last axis (a zero vector stays zero)."""
    return x / jnp.sqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), 1e-24))


class TransformerBlock(nnx.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)) (the text encoder's and
    the face conditioner's mapper)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        d, dt = width, dtype
        self.num_heads = num_heads
        self.norm1 = layer_norm(d, rngs)
        self.qkv = dense(d, 3 * d, dtype=dt, rngs=rngs)
        self.proj = dense(d, d, dtype=dt, rngs=rngs)
        self.norm2 = layer_norm(d, rngs)
        self.fc1 = dense(d, mlp_ratio * d, dtype=dt, rngs=rngs)
        self.fc2 = dense(mlp_ratio * d, d, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: (B, L, D) float32, mask: (B, L) bool (True = real token) -> (B, L, D) float32."""
        b, l, d = x.shape
        n = self.num_heads
        qkv = self.qkv(self.norm1(x)).reshape(b, l, 3, n, d // n)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        # key padding mask (B, 1, 1, L): every query attends to the real tokens only
        h = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :])
        x = x + self.proj(h.reshape(b, l, d)).astype(jnp.float32)
        h = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x))))
        return x + h.astype(jnp.float32)
