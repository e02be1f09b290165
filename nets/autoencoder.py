"""The KL-regularised autoencoder of latent diffusion (Rombach et al., CVPR 2022), NHWC, in NNX.

The first stage of LDM and Stable Diffusion: an encoder to a spatial Gaussian posterior
``N(mean, exp(logvar))`` of shape ``(B, H/f, W/f, latent_channels)`` and a mirrored decoder,
``f = 2 ** (len(channel_mult) - 1)``. Images are NHWC in **[-1, 1]**; the decoder has no output
activation (LDM's convention: reconstructions are clipped, if at all, by the caller).

Layout (LDM's ``Encoder`` / ``Decoder`` without a time embedding):

* encoder: ``conv_in`` 3x3 -> per level ``num_res_blocks`` ResNet blocks (width
  ``base_channels * channel_mult[i]``), then a stride-2 3x3 conv except at the last level ->
  middle (ResNet, single-head self-attention, ResNet) -> GroupNorm, SiLU, ``conv_out`` 3x3 to
  ``2 * latent_channels`` -> 1x1 ``quant_conv`` -> ``(mean, logvar)``, logvar clipped to
  ``[-30, 20]``;
* decoder: 1x1 ``post_quant_conv`` -> ``conv_in`` 3x3 -> middle -> per level, from the lowest
  resolution up, ``num_res_blocks + 1`` ResNet blocks, then nearest-neighbour x2 and a 3x3 conv
  except at the full resolution -> GroupNorm, SiLU, ``conv_out`` 3x3 to the image channels.

A ResNet block is ``skip(x) + conv(dropout(SiLU(GN(conv(SiLU(GN(x)))))))`` with 3x3 convs and
``skip`` the identity, or a 1x1 conv when the width changes. GroupNorm has 32 groups
at LDM's widths (fewer for narrow layers, see ``nets._layers.group_count``) and eps = 1e-6. The
stride-2 conv with "SAME" padding pads one pixel at the bottom and right only, which is LDM's
``pad(0, 1, 0, 1)`` before its unpadded stride-2 conv. Parameters are float32; ``dtype`` is the
compute dtype; ``encode`` and ``decode`` return float32.

Also here: the pix2pix / taming ``NLayerDiscriminator`` that LDM trains against
(:class:`PatchDiscriminator`, GroupNorm instead of BatchNorm), and :func:`latent_codec` /
:func:`frozen_encoder_decoder`, the pure ``encode`` / ``decode`` of a trained autoencoder with
the latent scale factor that downstream diffusion works in.

Presets: :func:`kl_f8` (Stable Diffusion's VAE, 83,653,863 parameters), :func:`kl_f4` (LDM's
kl-f4) and :func:`autoencoder_digits` (a small one for the digits, trains in seconds on CPU).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import (
    AttnBlock,
    Downsample,
    GroupNorm,
    Upsample,
    conv,
    dropout,
)

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "PatchDiscriminator",
    "PatchDiscriminatorConfig",
    "autoencoder_digits",
    "decode_with_frozen",
    "frozen_encoder_decoder",
    "kl_f4",
    "kl_f8",
    "latent_codec",
    "split_decoder",
]

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's DiagonalGaussianDistribution clamp


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def _check_dtype(value: Any) -> None:
    try:
        ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"dtype must be a floating dtype (e.g. jnp.float32); got {value!r}")


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Static description of an :class:`AutoencoderKL` (hashable: it keys ``init_params``).

    Attributes:
      in_channels: image channels C.
      base_channels: width of the first level; level i has ``base_channels * channel_mult[i]``.
      channel_mult: width multipliers, one per level; L levels downsample by ``2 ** (L - 1)``.
      num_res_blocks: ResNet blocks per encoder level (the decoder has one more per level).
      latent_channels: channels of the latent (LDM's ``embed_dim`` = ``z_channels``).
      attn_in_middle: a single-head self-attention block between the two middle ResNet blocks
        of the encoder and of the decoder (Stable Diffusion's VAE has them).
      dropout: dropout rate inside the ResNet blocks (active only when a dropout key is given).
      dtype: compute dtype; parameters and outputs are float32.
    """

    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    latent_channels: int = 4
    attn_in_middle: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        if isinstance(self.channel_mult, list):
            object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        _check_int("in_channels", self.in_channels, 1)
        _check_int("base_channels", self.base_channels, 1)
        _check_int("num_res_blocks", self.num_res_blocks, 1)
        _check_int("latent_channels", self.latent_channels, 1)
        mult = self.channel_mult
        if (
            not isinstance(mult, tuple)
            or not mult
            or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult)
        ):
            raise ValueError(f"channel_mult must be a non-empty tuple of ints >= 1; got {mult!r}")
        if not isinstance(self.attn_in_middle, bool):
            raise ValueError(f"attn_in_middle must be a bool; got {self.attn_in_middle!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, int | float)
            or not 0.0 <= self.dropout < 1.0
        ):
            raise ValueError(f"dropout must be a number in [0, 1); got {self.dropout!r}")
        _check_dtype(self.dtype)

    @property
    def factor(self) -> int:
        """The downsampling factor f = 2 ** (L - 1): a latent is (H/f, W/f)."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def widths(self) -> tuple[int, ...]:
        """The width of each level, ``base_channels * channel_mult[i]``."""
        return tuple(self.base_channels * m for m in self.channel_mult)


class _ResnetBlock(nnx.Module):
    """LDM's ``ResnetBlock`` without the time embedding (see the module docstring)."""

    def __init__(self, c_in: int, c_out: int, *, index: int, rate: float, dtype, rngs):
        self.index = index  # folded into the dropout key: every block draws its own mask
        self.rate = rate
        self.norm1 = GroupNorm(c_in, rngs=rngs)
        self.conv1 = conv(c_in, c_out, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(c_out, rngs=rngs)
        self.conv2 = conv(c_out, c_out, dtype=dtype, rngs=rngs)
        self.skip = conv(c_in, c_out, 1, dtype=dtype, rngs=rngs) if c_in != c_out else None

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = nnx.silu(self.norm2(h))
        if key is not None:
            h = dropout(h, self.rate, jax.random.fold_in(key, self.index))
        h = self.conv2(h)
        skip = x if self.skip is None else self.skip(x)
        return skip.astype(h.dtype) + h


class _Middle(nnx.Module):
    """ResNet block, (self-attention), ResNet block at the lowest resolution."""

    def __init__(self, c: int, cfg: AutoencoderConfig, index, rngs):
        kw = dict(rate=cfg.dropout, dtype=cfg.dtype, rngs=rngs)
        self.block_1 = _ResnetBlock(c, c, index=next(index), **kw)
        # one head over all channels: LDM's AttnBlock (q, k, v, proj_out 1x1, scale c**-0.5)
        self.attn_1 = AttnBlock(c, 1, dtype=cfg.dtype, rngs=rngs) if cfg.attn_in_middle else None
        self.block_2 = _ResnetBlock(c, c, index=next(index), **kw)

    def __call__(self, h, key):
        h = self.block_1(h, key)
        if self.attn_1 is not None:
            h = self.attn_1(h)
        return self.block_2(h, key)


class _Level(nnx.Module):
    """The ResNet blocks of one resolution, then an optional resampler."""

    def __init__(self, blocks, resample):
        self.blocks = nnx.List(blocks)
        self.resample = resample

    def __call__(self, h, key):
        for block in self.blocks:
            h = block(h, key)
        return h if self.resample is None else self.resample(h)


class Encoder(nnx.Module):
    """Images ``(B, H, W, C)`` -> pre-quant moments ``(B, H/f, W/f, 2 * latent_channels)``."""

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        dt, index = cfg.dtype, itertools.count()
        widths = cfg.widths
        self.conv_in = conv(cfg.in_channels, cfg.base_channels, dtype=dt, rngs=rngs)
        levels, c = [], cfg.base_channels
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(_ResnetBlock(c, w, index=next(index), rate=cfg.dropout, dtype=dt,
                                           rngs=rngs))
                c = w
            last = i == len(widths) - 1
            down = None if last else Downsample(c, True, padding="SAME", dtype=dt, rngs=rngs)
            levels.append(_Level(blocks, down))
        self.levels = nnx.List(levels)
        self.mid = _Middle(c, cfg, index, rngs)
        self.norm_out = GroupNorm(c, rngs=rngs)
        self.conv_out = conv(c, 2 * cfg.latent_channels, dtype=dt, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h, key)
        h = self.mid(h, key)
        return self.conv_out(nnx.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """Latents ``(B, h, w, latent_channels)`` (after post-quant) -> images ``(B, f h, f w, C)``.

    ``levels[0]`` is the lowest resolution (the order they run in).
    """

    def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
        dt, index = cfg.dtype, itertools.count()
        widths = cfg.widths
        c = widths[-1]
        self.conv_in = conv(cfg.latent_channels, c, dtype=dt, rngs=rngs)
        self.mid = _Middle(c, cfg, index, rngs)
        levels = []
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_ResnetBlock(c, widths[i], index=next(index), rate=cfg.dropout,
                                           dtype=dt, rngs=rngs))
                c = widths[i]
            up = None if i == 0 else Upsample(c, True, padding="SAME", dtype=dt, rngs=rngs)
            levels.append(_Level(blocks, up))
        self.levels = nnx.List(levels)
        self.norm_out = GroupNorm(c, rngs=rngs)
        self.conv_out = conv(c, cfg.in_channels, dtype=dt, rngs=rngs)

    def __call__(self, z: jax.Array, key: jax.Array | None = None) -> jax.Array:
        h = self.conv_in(z)
        h = self.mid(h, key)
        for level in self.levels:
            h = level(h, key)
        return self.conv_out(nnx.silu(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
    """LDM / Stable Diffusion's KL autoencoder: ``encode``, ``decode`` and a reparameterised
    round trip.

    Example:
      >>> graphdef, params = init_params(AutoencoderKL, autoencoder_digits(4))
      >>> ae = nnx.merge(graphdef, params)
      >>> mean, logvar = ae.encode(jnp.zeros((2, 16, 16, 1)))   # each (2, 4, 4, 4)
      >>> x_rec = ae.decode(mean)                                # (2, 16, 16, 1)
    """

    def __init__(self, config: AutoencoderConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, AutoencoderConfig):
            raise TypeError(f"config must be an AutoencoderConfig; got {type(config).__name__}")
        self.config = cfg = config
        z2 = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.quant_conv = conv(z2, z2, 1, dtype=cfg.dtype, rngs=rngs)
        self.post_quant_conv = conv(cfg.latent_channels, cfg.latent_channels, 1, dtype=cfg.dtype,
                                    rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    def encode(
        self, x: jax.Array, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """The posterior's parameters.

        Args:
          x: ``(B, H, W, in_channels)`` images in [-1, 1], H and W multiples of ``factor``.
          dropout_key: enables dropout (with ``config.dropout > 0``); None = deterministic.

        Returns:
          ``(mean, logvar)``, each ``(B, H/f, W/f, latent_channels)`` float32, logvar clipped to
          [-30, 20].

        Raises:
          ValueError: on a wrong rank, channel count, or a size not divisible by ``factor``.
        """
        cfg = self.config
        f = cfg.factor
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, H, W, in_channels={cfg.in_channels}); got "
                             f"{tuple(x.shape)}")
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"x: image size {tuple(x.shape[1:3])} must be divisible by the "
                             f"downsampling factor f = {f}")
        moments = self.quant_conv(self.encoder(x.astype(cfg.dtype), dropout_key))
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Images from latents.

        Args:
          z: ``(B, h, w, latent_channels)`` latents (unscaled: the encoder's own units).
          dropout_key: enables dropout (with ``config.dropout > 0``); None = deterministic.

        Returns:
          ``(B, f h, f w, in_channels)`` float32, no output activation (the data are in [-1, 1]).
        """
        cfg = self.config
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"z must have shape (B, h, w, latent_channels="
                             f"{cfg.latent_channels}); got {tuple(z.shape)}")
        h = self.post_quant_conv(z.astype(cfg.dtype))
        return self.decoder(h, dropout_key).astype(jnp.float32)

    def __call__(
        self, x: jax.Array, key: jax.Array | None, *, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Round trip through ``z = mean + exp(logvar / 2) * eps`` (the mode when ``key`` is None).

        Args:
          x: ``(B, H, W, in_channels)`` images in [-1, 1].
          key: PRNG key of ``eps``, or None to decode the posterior mean.
          dropout_key: enables dropout in both halves; None = deterministic.

        Returns:
          ``(x_rec, mean, logvar)``: ``(B, H, W, in_channels)`` and twice
          ``(B, H/f, W/f, latent_channels)``, float32.
        """
        k_enc = k_dec = None
        if dropout_key is not None:
            k_enc, k_dec = jax.random.split(dropout_key)
        mean, logvar = self.encode(x, dropout_key=k_enc)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z, dropout_key=k_dec), mean, logvar


# ----------------------------------------------------------------------------------------------
# The frozen first stage, as pure functions
# ----------------------------------------------------------------------------------------------


def latent_codec(
    graphdef: nnx.GraphDef, scale_factor: float | jax.Array = 1.0
) -> tuple[Callable[..., jax.Array], Callable[[Any, jax.Array], jax.Array]]:
    """Pure ``encode(params, x, key=None)`` and ``decode(params, z)`` in scaled latent units.

    The latent a diffusion model sees is ``z_scaled = scale_factor * z`` (LDM's
    ``scale_factor``, 0.18215 for Stable Diffusion; see ``dpm.losses.measure_scale_factor``).
    The parameters pass through ``jax.lax.stop_gradient``: gradients reach the images and the
    latents, never the autoencoder. The parameters are an argument, so a jitted step that
    takes them as one does not bake the weights into the program as constants.

    Args:
      graphdef: ``nnx.split(AutoencoderKL(...), nnx.Param)[0]``.
      scale_factor: positive scalar multiplying the latents.

    Returns:
      ``encode(params, x, key=None) -> z_scaled``: ``(B, H, W, C)`` in [-1, 1] to
      ``(B, H/f, W/f, latent_channels)``, the posterior mean (a sample when ``key`` is given);
      ``decode(params, z_scaled) -> x``: the inverse direction, ``(B, H, W, C)`` float32.
    """
    if isinstance(scale_factor, int | float) and not scale_factor > 0:
        raise ValueError(f"scale_factor must be > 0; got {scale_factor!r}")

    def encode(params, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
        mean, logvar = model.encode(x)
        z = mean
        if key is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return scale_factor * z

    def decode(params, z_scaled: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, jax.lax.stop_gradient(params))
        return model.decode(z_scaled / scale_factor)

    return encode, decode


def frozen_encoder_decoder(
    graphdef: nnx.GraphDef, params: Any, scale_factor: float | jax.Array = 1.0
) -> tuple[Callable[..., jax.Array], Callable[[jax.Array], jax.Array]]:
    """:func:`latent_codec` with the parameters bound: ``encode(x, key=None)``, ``decode(z)``.

    Convenient for small autoencoders and evaluation code. Inside ``jax.jit`` the bound
    parameters become constants of the compiled program; for a large autoencoder (kl-f8:
    335 MB) in a train step, prefer :func:`latent_codec` and pass the parameters as an argument.

    Args:
      graphdef: ``nnx.split(AutoencoderKL(...), nnx.Param)[0]``.
      params: its parameters.
      scale_factor: positive scalar multiplying the latents.

    Returns:
      ``encode(x, key=None) -> z_scaled`` and ``decode(z_scaled) -> x``, as in
      :func:`latent_codec`.
    """
    enc, dec = latent_codec(graphdef, scale_factor)

    def encode(x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return enc(params, x, key)

    def decode(z_scaled: jax.Array) -> jax.Array:
        return dec(params, z_scaled)

    return encode, decode


def split_decoder(params: Any) -> tuple[Any, Any]:
    """``(decoder_params, rest)`` of an :class:`AutoencoderKL`'s parameters: the decoder half
    (``post_quant_conv`` and ``decoder``) and everything else (``encoder``, ``quant_conv``);
    ``nnx.State.merge(rest, decoder_params)`` (or :func:`decode_with_frozen`) puts them back."""
    if not isinstance(params, nnx.State):
        if not isinstance(params, dict):
            raise TypeError("params must be the nnx.State (or its pure dict) of an "
                            f"AutoencoderKL's parameters; got {type(params).__name__}")
        params = nnx.State(params)
    dec, rest = params.split(
        nnx.Any(nnx.PathContains("decoder"), nnx.PathContains("post_quant_conv")), ...)
    return dec, rest


def decode_with_frozen(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array, Any], jax.Array]:
    """``decode(decoder_params, z, frozen) -> x``: the autoencoder's decoder with its trainable
    half separate from the frozen rest (:func:`split_decoder`); ``z`` in the encoder's own
    units. Gradients reach ``decoder_params`` (and ``z``), never ``frozen``."""

    def decode(decoder_params, z, frozen):
        params = nnx.State.merge(jax.lax.stop_gradient(frozen), decoder_params)
        return nnx.merge(graphdef, params).decode(z)

    return decode


# ----------------------------------------------------------------------------------------------
# The patch discriminator
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PatchDiscriminatorConfig:
    """pix2pix's ``NLayerDiscriminator`` as LDM / taming use it (defaults: theirs).

    Attributes:
      in_channels: image channels.
      base_channels: width of the first conv (``ndf``); layer n has ``ndf * min(2**n, 8)``.
      n_layers: stride-2 convs after the first one, minus one (the last is stride 1).
      dtype: compute dtype; parameters and logits are float32.
    """

    in_channels: int = 3
    base_channels: int = 64
    n_layers: int = 3
    dtype: Any = jnp.float32

    def __post_init__(self):
        _check_int("in_channels", self.in_channels, 1)
        _check_int("base_channels", self.base_channels, 1)
        _check_int("n_layers", self.n_layers, 1)
        _check_dtype(self.dtype)

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input side ``size`` (4x4 kernels, padding 1)."""
        for _ in range(self.n_layers):  # conv_in and n_layers - 1 stride-2 convs
            size = (size - 2) // 2 + 1
        return size - 2  # two stride-1 convs


def _disc_conv(c_in, c_out, stride, bias, dtype, rngs):
    return nnx.Conv(c_in, c_out, (4, 4), strides=stride, padding=((1, 1), (1, 1)),
                    use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nnx.initializers.normal(0.02),  # taming's weights_init
                    bias_init=nnx.initializers.zeros_init(), rngs=rngs)


class PatchDiscriminator(nnx.Module):
    """Patch logits of "real": 4x4 conv stride 2 + LeakyReLU(0.2); ``n_layers - 1`` x
    [4x4 conv stride 2, GroupNorm, LeakyReLU]; 4x4 conv stride 1, GroupNorm, LeakyReLU; 4x4
    conv stride 1 to one logit. Widths double up to 8 ``base_channels``; the convs before a
    norm have no bias. No mutable state (GroupNorm where pix2pix has BatchNorm).

    Example:
      >>> d = PatchDiscriminator(PatchDiscriminatorConfig(), rngs=nnx.Rngs(0))
      >>> d(jnp.zeros((2, 256, 256, 3))).shape   # (2, 30, 30, 1)
    """

    def __init__(self, config: PatchDiscriminatorConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, PatchDiscriminatorConfig):
            raise TypeError(f"config must be a PatchDiscriminatorConfig; got "
                            f"{type(config).__name__}")
        self.config = cfg = config
        dt, ndf = cfg.dtype, cfg.base_channels
        self.conv_in = _disc_conv(cfg.in_channels, ndf, 2, True, dt, rngs)
        convs, norms, c = [], [], ndf
        for n in range(1, cfg.n_layers + 1):
            w = ndf * min(2**n, 8)
            convs.append(_disc_conv(c, w, 2 if n < cfg.n_layers else 1, False, dt, rngs))
            norms.append(GroupNorm(w, rngs=rngs))
            c = w
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.conv_out = _disc_conv(c, 1, 1, True, dt, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``(B, H, W, in_channels)`` -> ``(B, H', W', 1)`` float32 logits,
        ``H' = output_size(H)`` (30 for 256 with 3 layers)."""
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"x must have shape (B, H, W, in_channels={cfg.in_channels}); got "
                             f"{tuple(x.shape)}")
        if min(cfg.output_size(x.shape[1]), cfg.output_size(x.shape[2])) < 1:
            raise ValueError(f"x: image size {tuple(x.shape[1:3])} is too small for "
                             f"n_layers={cfg.n_layers} (the logit map would be empty); use "
                             f"fewer layers or larger images")
        h = jax.nn.leaky_relu(self.conv_in(x.astype(cfg.dtype)), 0.2)
        for conv_, norm in zip(self.convs, self.norms, strict=True):
            h = jax.nn.leaky_relu(norm(conv_(h)), 0.2)
        return self.conv_out(h).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------


def kl_f8(**overrides) -> AutoencoderConfig:
    """Stable Diffusion's VAE (LDM kl-f8): 3 -> 4 channels, f = 8, widths 128-512, 83.65 M."""
    base = dict(in_channels=3, base_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                latent_channels=4, attn_in_middle=True)
    return AutoencoderConfig(**{**base, **overrides})


def kl_f4(**overrides) -> AutoencoderConfig:
    """LDM's kl-f4: 3 -> 3 channels, f = 4, widths 128-512."""
    base = dict(in_channels=3, base_channels=128, channel_mult=(1, 2, 4), num_res_blocks=2,
                latent_channels=3, attn_in_middle=True)
    return AutoencoderConfig(**{**base, **overrides})


def autoencoder_digits(factor: int = 4, image_channels: int = 1, **overrides
                       ) -> AutoencoderConfig:
    """A small autoencoder for the digits (16x16 or 32x32, one channel): widths 32-64, one
    ResNet block per level, 4 latent channels, f = ``factor`` (a power of two)."""
    if (isinstance(factor, bool) or not isinstance(factor, int) or factor < 1
            or factor & (factor - 1)):
        raise ValueError(f"factor must be a power of two (1, 2, 4, 8, ...); got {factor!r}")
    levels = factor.bit_length()  # log2(factor) + 1
    base = dict(in_channels=image_channels, base_channels=32,
                channel_mult=(1,) + (2,) * (levels - 1), num_res_blocks=1, latent_channels=4,
                attn_in_middle=True)
    return AutoencoderConfig(**{**base, **overrides})
