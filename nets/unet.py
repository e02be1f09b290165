"""The diffusion U-Net of the DDPM / DDPM++ / ADM lineage, NHWC, in Flax NNX.

Ho et al. 2020 (DDPM, `diffusion_tf/models/unet.py`), with the ADM additions of Dhariwal &
Nichol 2021 (multi-head attention, scale-shift norm, class embedding, learned variance), and,
optionally, the cross-attention to a sequence of text-token features of Stable Diffusion's U-Net
(Rombach et al. 2022). The network embeds whatever scalar the caller conditions on
(`noise_level`) and knows nothing about schedules or parameterizations; preconditioning lives in
`dpm`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nets._layers import (
    AttnBlock,
    CrossAttnBlock,
    Downsample,
    GroupNorm,
    ResBlock,
    Upsample,
    conv,
    count_params,
    dense,
    sinusoidal_embedding,
)

__all__ = ["UNetConfig", "UNet", "count_params", "ddpm_cifar10", "tiny", "small"]

_PADDINGS = ("SAME", "CIRCULAR")
_ATTENTION_IMPLS = (None, "xla", "cudnn")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Static description of a U-Net (hashable, so it can be a static jit argument).

    Attributes:
      in_channels: channels C of the noisy input x.
      out_channels: channels of the prediction (doubled when `learned_variance`).
      base_channels: width of the first level; level i has `base_channels * channel_mult[i]`.
      channel_mult: width multipliers, one per resolution level (L = len(channel_mult)).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: spatial sizes (relative to `image_size`) that get self-attention.
      num_heads: attention heads (ignored when `head_channels` is set).
      head_channels: channels per attention head; overrides `num_heads` when not None.
      dropout: dropout rate inside the residual blocks (active only with `train=True`).
      resample_with_conv: stride-2 / post-upsampling conv3x3 (else avg-pool / nearest only).
      num_classes: None = unconditional; else labels in [0, num_classes] where index
        `num_classes` is the null class of classifier-free guidance.
      extra_in_channels: channels of a conditioning image concatenated to x.
      vector_cond_dim: width D of a conditioning vector ``cond["vector"]`` (B, D) mapped by
        Linear -> SiLU -> Linear to the time-embedding width and added to it (DiffuseVAE's
        ``z_cond``); 0 = none.
      learned_variance: output 2 * out_channels (mean and variance interpolation, iDDPM/ADM).
      use_scale_shift_norm: FiLM conditioning in the second norm of each block (ADM), else an
        additive time embedding (DDPM).
      dtype: compute dtype (e.g. jnp.bfloat16); parameters and output are always float32.
      image_size: nominal H = W, for the attention bookkeeping; any H, W divisible by
        2**(L-1) is accepted at call time.
      padding: "SAME" (zero padding) or "CIRCULAR" (periodic images).
      attention_impl: `implementation` of `jax.nn.dot_product_attention` (None, "xla",
        "cudnn").
      context_dim: width Dc of a context sequence ``cond["context"]`` (B, L, Dc), e.g. the
        token features of a text encoder, that the net cross-attends to (Stable Diffusion);
        0 = no cross-attention (no extra parameters). When > 0 the middle block cross-attends
        after its self-attention.
      cross_attn_resolutions: spatial sizes (relative to `image_size`, like
        `attn_resolutions`) where every residual block, down and up, is followed by
        cross-attention to the context (after the self-attention, if any); non-empty requires
        `context_dim > 0`.
    """

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    head_channels: int | None = None
    dropout: float = 0.0
    resample_with_conv: bool = True
    num_classes: int | None = None
    extra_in_channels: int = 0
    vector_cond_dim: int = 0
    learned_variance: bool = False
    use_scale_shift_norm: bool = False
    dtype: Any = jnp.float32
    image_size: int = 32
    padding: str = "SAME"
    attention_impl: str | None = None
    context_dim: int = 0
    cross_attn_resolutions: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        object.__setattr__(self, "cross_attn_resolutions", tuple(self.cross_attn_resolutions))
        for name in ("in_channels", "out_channels", "num_res_blocks", "image_size", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.base_channels, int) or self.base_channels < 4:
            raise ValueError(f"base_channels must be an int >= 4, got {self.base_channels!r}")
        if self.base_channels % 2:
            raise ValueError(f"base_channels must be even, got {self.base_channels}")
        if not self.channel_mult or any(not isinstance(m, int) or m < 1 for m in self.channel_mult):
            raise ValueError(
                f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size ({self.image_size}) must be divisible by 2**(levels-1) = {factor}"
            )
        sizes = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        for r in self.attn_resolutions:
            if r not in sizes:
                raise ValueError(
                    f"attn_resolutions entry {r} is not one of the level sizes {sizes} "
                    f"for image_size={self.image_size}"
                )
        if self.head_channels is not None:
            if not isinstance(self.head_channels, int) or self.head_channels < 1:
                raise ValueError(f"head_channels must be None or >= 1, got {self.head_channels}")
        for r in (*self.attn_resolutions, sizes[-1]):  # the middle block always attends
            c = self.base_channels * self.channel_mult[sizes.index(r)]
            self.heads(c)
        if not isinstance(self.context_dim, int) or self.context_dim < 0:
            raise ValueError(f"context_dim must be an int >= 0, got {self.context_dim!r}")
        for r in self.cross_attn_resolutions:
            if r not in sizes:
                raise ValueError(
                    f"cross_attn_resolutions entry {r!r} is not one of the level sizes {sizes} "
                    f"for image_size={self.image_size}"
                )
        if self.cross_attn_resolutions and not self.context_dim:
            raise ValueError(
                f"cross_attn_resolutions={self.cross_attn_resolutions} requires context_dim > 0, "
                f"got context_dim={self.context_dim}"
            )
        for r in self.cross_attn_resolutions:
            self.heads(self.base_channels * self.channel_mult[sizes.index(r)])
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and (
            not isinstance(self.num_classes, int) or self.num_classes < 1
        ):
            raise ValueError(f"num_classes must be None or a positive int, got {self.num_classes}")
        if not isinstance(self.extra_in_channels, int) or self.extra_in_channels < 0:
            raise ValueError(f"extra_in_channels must be an int >= 0, got {self.extra_in_channels}")
        if not isinstance(self.vector_cond_dim, int) or self.vector_cond_dim < 0:
            raise ValueError(f"vector_cond_dim must be an int >= 0, got {self.vector_cond_dim!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        if self.padding not in _PADDINGS:
            raise ValueError(f"padding must be one of {_PADDINGS}, got {self.padding!r}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            raise ValueError(
                f"attention_impl must be one of {_ATTENTION_IMPLS}, got {self.attention_impl!r}"
            )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def downsampling_factor(self) -> int:
        """Total spatial reduction 2**(L-1); H and W must be multiples of it."""
        return 2 ** (self.num_levels - 1)

    @property
    def null_class(self) -> int:
        """Label index of the unconditional (null) class for classifier-free guidance."""
        if self.num_classes is None:
            raise ValueError("null_class is undefined for an unconditional net (num_classes=None)")
        return self.num_classes

    @property
    def output_channels(self) -> int:
        return self.out_channels * (2 if self.learned_variance else 1)

    def heads(self, channels: int) -> int:
        """Number of attention heads for a layer of width `channels`."""
        if self.head_channels is not None:
            if channels % self.head_channels:
                raise ValueError(
                    f"attention width {channels} is not divisible by head_channels "
                    f"{self.head_channels}"
                )
            return channels // self.head_channels
        if channels % self.num_heads:
            raise ValueError(
                f"attention width {channels} is not divisible by num_heads {self.num_heads}"
            )
        return self.num_heads


class _Level(nnx.Module):
    """The residual blocks (and attention, and cross-attention) of one resolution, then an
    optional resampler. `cross_attns` is None (no parameters) where the level has none."""

    def __init__(self, blocks, attns, resample, cross_attns=()):
        self.blocks = nnx.List(blocks)
        self.attns = nnx.List(attns)
        self.resample = resample
        self.cross_attns = nnx.List(cross_attns) if cross_attns else None


class UNet(nnx.Module):
    """Diffusion U-Net: `(x, noise_level, cond) -> prediction`, NHWC, float32 output.

    Example:
      >>> net = UNet(tiny(), rngs=nnx.Rngs(0))
      >>> out = net(jnp.zeros((2, 8, 8, 1)), jnp.array([10.0, 500.0]))  # (2, 8, 8, 1)
    """

    def __init__(self, config: UNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        dt, pad = cfg.dtype, cfg.padding
        ch = cfg.base_channels
        emb_dim = 4 * ch
        block_index = iter(range(10**6))

        def res(c_in, c_out):
            return ResBlock(
                c_in,
                c_out,
                emb_dim,
                index=next(block_index),
                dropout=cfg.dropout,
                use_scale_shift_norm=cfg.use_scale_shift_norm,
                padding=pad,
                dtype=dt,
                rngs=rngs,
            )

        def attn(c):
            return AttnBlock(
                c, cfg.heads(c), implementation=cfg.attention_impl, dtype=dt, rngs=rngs
            )

        def cross_attn(c):
            return CrossAttnBlock(
                c,
                cfg.context_dim,
                cfg.heads(c),
                implementation=cfg.attention_impl,
                dtype=dt,
                rngs=rngs,
            )

        # time (and class) embedding, float32: it is tiny
        self.emb_0 = dense(ch, emb_dim, rngs=rngs)
        self.emb_1 = dense(emb_dim, emb_dim, rngs=rngs)
        self.label_emb = (
            nnx.Embed(cfg.num_classes + 1, emb_dim, rngs=rngs)
            if cfg.num_classes is not None
            else None
        )
        vd = cfg.vector_cond_dim
        self.vec_emb_0 = dense(vd, emb_dim, rngs=rngs) if vd else None
        self.vec_emb_1 = dense(emb_dim, emb_dim, rngs=rngs) if vd else None
        self.conv_in = conv(
            cfg.in_channels + cfg.extra_in_channels, ch, padding=pad, dtype=dt, rngs=rngs
        )

        # downsampling path; `skips` records the width of every activation pushed for the up path
        skips = [ch]
        c = ch
        size = cfg.image_size
        down = []
        for i, mult in enumerate(cfg.channel_mult):
            blocks, attns, cross_attns = [], [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(res(c, ch * mult))
                c = ch * mult
                if size in cfg.attn_resolutions:
                    attns.append(attn(c))
                if size in cfg.cross_attn_resolutions:
                    cross_attns.append(cross_attn(c))
                skips.append(c)
            resample = None
            if i != cfg.num_levels - 1:
                resample = Downsample(c, cfg.resample_with_conv, padding=pad, dtype=dt, rngs=rngs)
                skips.append(c)
                size //= 2
            down.append(_Level(blocks, attns, resample, cross_attns))
        self.down = nnx.List(down)

        self.mid_res_0 = res(c, c)
        self.mid_attn = attn(c)
        self.mid_cross_attn = cross_attn(c) if cfg.context_dim else None
        self.mid_res_1 = res(c, c)

        up = []
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            blocks, attns, cross_attns = [], [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(res(c + skips.pop(), ch * mult))
                c = ch * mult
                if size in cfg.attn_resolutions:
                    attns.append(attn(c))
                if size in cfg.cross_attn_resolutions:
                    cross_attns.append(cross_attn(c))
            resample = None
            if i != 0:
                resample = Upsample(c, cfg.resample_with_conv, padding=pad, dtype=dt, rngs=rngs)
                size *= 2
            up.append(_Level(blocks, attns, resample, cross_attns))
        self.up = nnx.List(up)

        # output head in float32 (cheap: C -> out_channels)
        self.norm_out = GroupNorm(c, rngs=rngs)
        self.conv_out = conv(c, cfg.output_channels, padding=pad, zero=True, rngs=rngs)

    def _check_inputs(self, x, noise_level, cond):
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, H, W, C), got shape {x.shape}")
        b, h, w, c = x.shape
        if c != cfg.in_channels:
            raise ValueError(f"x has {c} channels, expected in_channels={cfg.in_channels}")
        f = cfg.downsampling_factor
        if h % f or w % f:
            raise ValueError(f"x spatial size {(h, w)} must be divisible by 2**(levels-1) = {f}")
        if noise_level.ndim > 1 or (noise_level.ndim == 1 and noise_level.shape[0] != b):
            raise ValueError(f"noise_level must have shape () or ({b},), got {noise_level.shape}")
        if cond is None:
            cond = {}
        if not isinstance(cond, dict):
            raise TypeError(f"cond must be None or a dict, got {type(cond).__name__}")
        unknown = set(cond) - {"label", "image", "vector", "context", "context_mask"}
        if unknown:
            raise ValueError(f"cond has unknown keys {sorted(unknown)}; allowed: label, image, "
                             "vector, context, context_mask")
        label, image, vector = cond.get("label"), cond.get("image"), cond.get("vector")
        context, context_mask = self._check_context(b, cond)
        if (vector is not None) != (cfg.vector_cond_dim > 0):
            got = "one" if vector is not None else "none"
            raise ValueError(f"cond['vector'] is required iff vector_cond_dim > 0 (it is "
                             f"{cfg.vector_cond_dim}); got {got}")
        if vector is not None and tuple(vector.shape) != (b, cfg.vector_cond_dim):
            raise ValueError(f"cond['vector'] must have shape ({b}, {cfg.vector_cond_dim}), got "
                             f"{tuple(vector.shape)}")
        if cfg.num_classes is None and label is not None:
            raise ValueError("cond['label'] given to an unconditional net (num_classes=None)")
        if cfg.num_classes is not None:
            if label is None:
                raise ValueError(
                    f"cond['label'] is required when num_classes={cfg.num_classes}; pass "
                    f"the null class {cfg.num_classes} for unconditional outputs"
                )
            label = jnp.asarray(label)
            if label.shape != (b,) or not jnp.issubdtype(label.dtype, jnp.integer):
                raise ValueError(
                    f"cond['label'] must be an int array of shape ({b},), got "
                    f"{label.dtype}{label.shape}"
                )
        if cfg.extra_in_channels == 0 and image is not None:
            raise ValueError("cond['image'] given but extra_in_channels=0")
        if cfg.extra_in_channels > 0:
            if image is None:
                raise ValueError(
                    f"cond['image'] is required when extra_in_channels={cfg.extra_in_channels}"
                )
            expected = (b, h, w, cfg.extra_in_channels)
            if image.shape != expected:
                raise ValueError(f"cond['image'] must have shape {expected}, got {image.shape}")
        return label, image, vector, context, context_mask

    def _check_context(self, b, cond):
        """Validated (context, context_mask) of `cond`; (None, None) when context_dim == 0."""
        dc = self.config.context_dim
        context, mask = cond.get("context"), cond.get("context_mask")
        if dc == 0:
            for name in ("context", "context_mask"):
                if cond.get(name) is not None:
                    raise ValueError(f"cond['{name}'] given but context_dim=0 (no cross-attention)")
            return None, None
        if context is None:
            raise ValueError(f"cond['context'] of shape ({b}, L, {dc}) is required when "
                             f"context_dim={dc}")
        context = jnp.asarray(context)
        if (context.ndim != 3 or context.shape[0] != b or context.shape[1] < 1
                or context.shape[2] != dc or not jnp.issubdtype(context.dtype, jnp.floating)):
            raise ValueError(f"cond['context'] must be a float array of shape ({b}, L >= 1, {dc}), "
                             f"got {context.dtype}{tuple(context.shape)}")
        if mask is None:
            return context, None
        mask = jnp.asarray(mask)
        expected = (b, context.shape[1])
        if mask.shape != expected or mask.dtype != jnp.bool_:
            raise ValueError(f"cond['context_mask'] must be a bool array of shape {expected} "
                             f"(True = valid token), got {mask.dtype}{tuple(mask.shape)}")
        # a row with no valid token would attend to padding only; checkable only when concrete
        if not isinstance(mask, jax.core.Tracer) and mask.is_fully_addressable:
            empty = np.flatnonzero(~np.asarray(mask).any(axis=1))
            if empty.size:
                raise ValueError(f"cond['context_mask'] rows {empty.tolist()} have no valid "
                                 f"(True) token; every row needs at least one")
        return context, mask

    def __call__(
        self,
        x: jax.Array,
        noise_level: jax.Array,
        cond: dict[str, jax.Array] | None = None,
        *,
        key: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """Apply the U-Net.

        Args:
          x: (B, H, W, in_channels) float, H and W multiples of 2**(levels-1).
          noise_level: () or (B,) float, the scalar the net is conditioned on.
          cond: None or a dict with "label": (B,) int (required iff num_classes is set;
            `num_classes` is the null class) and "image": (B, H, W, extra_in_channels)
            (required iff extra_in_channels > 0) and "vector": (B, vector_cond_dim) (required
            iff vector_cond_dim > 0) and "context": (B, L, context_dim) float (required iff
            context_dim > 0) with an optional "context_mask": (B, L) bool, True = valid token
            (None = all valid). Every row of the mask needs at least one True: a concrete mask
            is checked (ValueError), a traced one (under `jit`) cannot be.
          key: PRNG key for dropout; required when train=True and dropout > 0.
          train: enables dropout.

        Returns:
          (B, H, W, output_channels) float32.
        """
        cfg = self.config
        x = jnp.asarray(x)
        noise_level = jnp.asarray(noise_level)
        label, image, vector, context, context_mask = self._check_inputs(x, noise_level, cond)
        if train and cfg.dropout > 0 and key is None:
            raise ValueError(f"key is required when train=True and dropout={cfg.dropout} > 0")
        key = key if (train and cfg.dropout > 0) else None
        b = x.shape[0]

        emb = sinusoidal_embedding(jnp.broadcast_to(noise_level, (b,)), cfg.base_channels)
        emb = self.emb_1(nnx.silu(self.emb_0(emb)))
        if self.label_emb is not None:
            emb = emb + self.label_emb(label)
        if vector is not None:
            emb = emb + self.vec_emb_1(nnx.silu(self.vec_emb_0(vector.astype(jnp.float32))))
        emb = emb.astype(cfg.dtype)

        if image is not None:
            x = jnp.concatenate([x, image.astype(x.dtype)], axis=-1)
        h = self.conv_in(x.astype(cfg.dtype))

        hs = [h]
        for level in self.down:
            for j, block in enumerate(level.blocks):
                h = block(h, emb, key)
                if len(level.attns):
                    h = level.attns[j](h)
                if level.cross_attns is not None:
                    h = level.cross_attns[j](h, context, context_mask)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)

        h = self.mid_res_0(h, emb, key)
        h = self.mid_attn(h)
        if self.mid_cross_attn is not None:
            h = self.mid_cross_attn(h, context, context_mask)
        h = self.mid_res_1(h, emb, key)

        for level in self.up:
            for j, block in enumerate(level.blocks):
                h = block(jnp.concatenate([h, hs.pop()], axis=-1), emb, key)
                if len(level.attns):
                    h = level.attns[j](h)
                if level.cross_attns is not None:
                    h = level.cross_attns[j](h, context, context_mask)
            if level.resample is not None:
                h = level.resample(h)

        h = nnx.silu(self.norm_out(h.astype(jnp.float32)))
        return self.conv_out(h).astype(jnp.float32)


def ddpm_cifar10(**overrides) -> UNetConfig:
    """DDPM's CIFAR-10 network (Ho et al. 2020): 35.7M parameters, 32x32x3.

    ch 128, mult (1, 2, 2, 2), 2 res blocks, attention at 16x16, dropout 0.1. Keyword
    arguments override fields (e.g. `dtype=jnp.bfloat16`, `num_classes=10`).
    """
    base = dict(
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        num_heads=1,
        dropout=0.1,
        resample_with_conv=True,
        image_size=32,
    )
    return UNetConfig(**{**base, **overrides})


def tiny(image_size: int = 8, channels: int = 1, **overrides) -> UNetConfig:
    """A CPU-fast U-Net (~0.4M parameters) for 8x8 digits: 2 levels, 24 base channels."""
    base = dict(
        in_channels=channels,
        out_channels=channels,
        base_channels=24,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(image_size // 2,),
        num_heads=2,
        dropout=0.0,
        image_size=image_size,
    )
    return UNetConfig(**{**base, **overrides})


def small(image_size: int = 16, channels: int = 1, **overrides) -> UNetConfig:
    """A small U-Net (~1.1M parameters) for 16x16 images: 3 levels, 32 base channels."""
    base = dict(
        in_channels=channels,
        out_channels=channels,
        base_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(image_size // 2,),
        num_heads=2,
        dropout=0.0,
        image_size=image_size,
    )
    return UNetConfig(**{**base, **overrides})
