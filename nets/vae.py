"""DiffuseVAE's stage-1 VAE (Pandey et al., TMLR 2022): a residual encoder down to a 1x1
latent and a mirrored decoder with a sigmoid output, laid out by a block string.

Images are NHWC in **[0, 1]** (the VAE's own range; DiffuseVAE conditions its refiner on
``2 * decode(z) - 1``). The latent is ``(B, 1, 1, z_dim)`` with ``z_dim`` the width at
resolution 1.

Block strings (comma-separated tokens, resolutions in pixels):

* ``RxN``: N residual blocks at resolution R;
* ``RdK`` (encoder): one residual block at R, then K x K average pooling (resolution R / K);
* ``RuK`` (decoder): nearest-neighbour upsampling by K (resolution R * K);
* ``RtS``: a bias-free 1x1 convolution from the width of R to the width of S (after a ``d``
  or ``u`` token that moved the resolution to S).

A residual block is ``x + c4(gelu(c3(gelu(c2(gelu(c1(gelu(x))))))))`` with 1x1 ``c1, c4``,
``c2, c3`` 3x3 (1x1 at resolution 1), a middle width of half the block's width, and zero
biases at initialisation. The encoder starts with a bias-free 3x3 stem to the width of the
input resolution and ends with two bias-free 1x1 convolutions to the mean and log-variance;
the decoder ends with a 3x3 convolution to the image channels and a sigmoid.

Presets: :func:`vae_cifar10`, :func:`vae_celeba64`, :func:`vae_celebahq128` (the published
configurations) and :func:`vae_digits` (a small one for the 8x8 / 16x16 digits).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import conv

_TOKEN = re.compile(r"^(\d+)([xdut])(\d+)$")


@dataclasses.dataclass(frozen=True)
class Op:
    """One parsed block-string token: ``kind`` in {"res", "down", "up", "map"}."""

    kind: str
    res: int
    arg: int  # res: the block count; down/up: the factor; map: the target resolution


def parse_blocks(spec: str, *, start: int, decoder: bool, name: str = "blocks") -> list[Op]:
    """Parses a block string, checking that every token acts at the resolution reached so far.

    Args:
      spec: e.g. ``"32x7,32d2,32t16,16x4"``.
      start: the resolution the string starts at (the image size for an encoder, 1 for a
        decoder).
      decoder: ``u`` tokens are allowed (decoder) or ``d`` tokens (encoder).
      name: the argument's name for error messages.

    Returns:
      the tokens, in order.

    Raises:
      ValueError: naming the token that is malformed, of the wrong kind, or at the wrong
        resolution.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{name} must be a non-empty block string; got {spec!r}")
    ops, res, width_res = [], start, start
    for tok in (t.strip() for t in spec.split(",")):
        m = _TOKEN.match(tok)
        if not m:
            raise ValueError(f"{name}: token {tok!r} is not of the form RxN, RdK, RuK or RtS "
                             f"(in {spec!r})")
        r, kind, a = int(m.group(1)), m.group(2), int(m.group(3))
        if kind in "du" and (kind == "d") == decoder:
            where = "a decoder" if decoder else "an encoder"
            raise ValueError(f"{name}: token {tok!r}: {kind!r} is not allowed in {where} "
                             f"string (in {spec!r})")
        if kind == "t":
            if r != width_res or a != res:
                raise ValueError(f"{name}: token {tok!r} must map the width of resolution "
                                 f"{width_res} to resolution {res}, where the string is "
                                 f"(in {spec!r})")
            ops.append(Op("map", r, a))
            width_res = a
            continue
        if r != res or width_res != res:
            raise ValueError(f"{name}: token {tok!r} acts at resolution {r}, but the string is "
                             f"at resolution {res}"
                             + ("" if width_res == res else f" with the width of {width_res} "
                                f"(a {width_res}t{res} token is missing)") + f" (in {spec!r})")
        if a < 1 or (kind in "du" and a < 2):
            raise ValueError(f"{name}: token {tok!r} needs a count >= 1 (factor >= 2)")
        if kind == "x":
            ops.append(Op("res", r, a))
        elif kind == "d":
            if res % a:
                raise ValueError(f"{name}: token {tok!r}: resolution {res} is not divisible "
                                 f"by {a}")
            ops.append(Op("down", r, a))
            res //= a
        else:
            ops.append(Op("up", r, a))
            res *= a
    return ops


def parse_channels(spec: str | dict, name: str = "channels") -> dict[int, int]:
    """``"32:64,16:128"`` (or a dict) -> ``{32: 64, 16: 128}``, widths >= 2."""
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        try:
            items = [tuple(int(v) for v in t.split(":")) for t in str(spec).split(",")]
        except ValueError:
            items = [()]
    if not items or any(len(t) != 2 for t in items):
        raise ValueError(f"{name} must be 'res:width' pairs separated by commas; got {spec!r}")
    out = {int(r): int(w) for r, w in items}
    bad = {r: w for r, w in out.items() if w < 2 or r < 1}
    if bad:
        raise ValueError(f"{name}: widths must be >= 2 and resolutions >= 1; got {bad}")
    return out


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """A DiffuseVAE VAE: block and channel strings of the encoder and the decoder."""

    image_size: int
    in_channels: int
    enc_blocks: str
    enc_channels: str
    dec_blocks: str
    dec_channels: str
    dtype: Any = jnp.float32

    def __post_init__(self):
        enc_w = parse_channels(self.enc_channels, "enc_channels")
        dec_w = parse_channels(self.dec_channels, "dec_channels")
        enc = parse_blocks(self.enc_blocks, start=self.image_size, decoder=False,
                           name="enc_blocks")
        dec = parse_blocks(self.dec_blocks, start=1, decoder=True, name="dec_blocks")
        if _end(enc, self.image_size) != (1, 1):
            raise ValueError(f"enc_blocks must end at resolution 1 (the 1x1 latent); "
                             f"{self.enc_blocks!r} ends at {_end(enc, self.image_size)[0]}")
        if _end(dec, 1) != (self.image_size, self.image_size):
            raise ValueError(f"dec_blocks must end at resolution {self.image_size} with its "
                             f"width; {self.dec_blocks!r} ends at {_end(dec, 1)}")
        for name, ops, widths in (("enc", enc, enc_w), ("dec", dec, dec_w)):
            need = {o.res for o in ops} | {o.arg for o in ops if o.kind == "map"}
            missing = sorted(need - set(widths))
            if missing:
                raise ValueError(f"{name}_channels has no width for resolution(s) {missing}")
        if enc_w[1] != dec_w[1]:
            raise ValueError(f"the latent width differs: enc_channels 1:{enc_w[1]}, "
                             f"dec_channels 1:{dec_w[1]}")
        if self.image_size not in enc_w:
            raise ValueError(f"enc_channels has no width for the image size {self.image_size}")

    @property
    def latent_dim(self) -> int:
        return parse_channels(self.enc_channels)[1]


def _end(ops: list[Op], start: int) -> tuple[int, int]:
    """(resolution, width resolution) after ``ops``."""
    res = wres = start
    for o in ops:
        if o.kind == "down":
            res //= o.arg
        elif o.kind == "up":
            res *= o.arg
        elif o.kind == "map":
            wres = o.arg
    return res, wres


class ResBlock(nnx.Module):
    """The bottleneck residual block (see the module docstring)."""

    def __init__(self, width: int, res: int, dtype, *, rngs: nnx.Rngs):
        mid, k = max(1, width // 2), 3 if res > 1 else 1
        self.c1 = conv(width, mid, 1, dtype=dtype, rngs=rngs)
        self.c2 = conv(mid, mid, k, dtype=dtype, rngs=rngs)
        self.c3 = conv(mid, mid, k, dtype=dtype, rngs=rngs)
        self.c4 = conv(mid, width, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.c1(jax.nn.gelu(x, approximate=False))
        h = self.c2(jax.nn.gelu(h, approximate=False))
        h = self.c3(jax.nn.gelu(h, approximate=False))
        return x + self.c4(jax.nn.gelu(h, approximate=False))


def _map(c_in, c_out, dtype, rngs):
    return nnx.Conv(c_in, c_out, (1, 1), use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                    rngs=rngs)


class VAE(nnx.Module):
    """DiffuseVAE's VAE. ``encode(x) -> (mean, logvar)``, ``decode(z) -> x`` in [0, 1]."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.dtype
        enc_w, dec_w = parse_channels(cfg.enc_channels), parse_channels(cfg.dec_channels)
        self.stem = nnx.Conv(cfg.in_channels, enc_w[cfg.image_size], (3, 3), use_bias=False,
                             dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.enc_ops = _build(parse_blocks(cfg.enc_blocks, start=cfg.image_size,
                                           decoder=False), enc_w, dt, rngs)
        z = cfg.latent_dim
        self.to_mean = _map(z, z, dt, rngs)
        self.to_logvar = _map(z, z, dt, rngs)
        self.dec_ops = _build(parse_blocks(cfg.dec_blocks, start=1, decoder=True), dec_w, dt,
                              rngs)
        self.out = conv(dec_w[cfg.image_size], cfg.in_channels, 3, dtype=dt, rngs=rngs)

    def _check(self, x, shape, what):
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"{what} must have shape (B,) + {shape}; got {tuple(x.shape)}")

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(B, H, W, C)`` images in [0, 1] -> ``(mean, logvar)``, each ``(B, 1, 1, z)``
        float32."""
        c = self.cfg
        self._check(x, (c.image_size, c.image_size, c.in_channels), "x")
        h = self.stem(x.astype(c.dtype))
        h = _run(self.enc_ops, h)
        return (self.to_mean(h).astype(jnp.float32), self.to_logvar(h).astype(jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """``(B, 1, 1, z)`` latents -> ``(B, H, W, C)`` float32 images in [0, 1]."""
        self._check(z, (1, 1, self.cfg.latent_dim), "z")
        h = _run(self.dec_ops, z.astype(self.cfg.dtype))
        return jax.nn.sigmoid(self.out(h).astype(jnp.float32))

    def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Reconstruction through a reparameterised sample ``z = mean + exp(logvar / 2) eps``:
        ``(x_rec, mean, logvar)``."""
        mean, logvar = self.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return self.decode(z), mean, logvar


def _build(ops: list[Op], widths: dict[int, int], dtype, rngs) -> nnx.List:
    layers = []
    for o in ops:
        if o.kind == "res":
            layers += [ResBlock(widths[o.res], o.res, dtype, rngs=rngs) for _ in range(o.arg)]
        elif o.kind == "down":
            layers += [ResBlock(widths[o.res], o.res, dtype, rngs=rngs), _Pool(o.arg)]
        elif o.kind == "up":
            layers.append(_Up(o.arg))
        else:
            layers.append(_map(widths[o.res], widths[o.arg], dtype, rngs))
    return nnx.List(layers)


class _Pool(nnx.Module):
    def __init__(self, k: int):
        self.k = k

    def __call__(self, x):
        return nnx.avg_pool(x, (self.k, self.k), strides=(self.k, self.k))


class _Up(nnx.Module):
    def __init__(self, k: int):
        self.k = k

    def __call__(self, x):
        return jnp.repeat(jnp.repeat(x, self.k, axis=1), self.k, axis=2)


def _run(layers, h):
    for layer in layers:
        h = layer(h)
    return h


# ----------------------------------------------------------------------------------------------
# Presets (the official configs; decoders as released)
# ----------------------------------------------------------------------------------------------


def vae_cifar10(**overrides) -> VAEConfig:
    """CIFAR-10, 32x32x3, z = 512."""
    base = dict(
        image_size=32, in_channels=3,
        enc_blocks="32x7,32d2,32t16,16x4,16d2,16t8,8x4,8d2,8t4,4x3,4d4,4t1,1x3",
        enc_channels="32:64,16:128,8:256,4:256,1:512",
        dec_blocks="1x1,1u4,1t4,4x2,4u2,4t8,8x3,8u2,8t16,16x7,16u2,16t32,32x15",
        dec_channels="32:64,16:128,8:256,4:256,1:512")
    return VAEConfig(**{**base, **overrides})


def vae_celeba64(**overrides) -> VAEConfig:
    """CelebA 64x64x3, z = 512."""
    base = dict(
        image_size=64, in_channels=3,
        enc_blocks="64x7,64d2,64t32,32x4,32d2,32t16,16x7,16d2,16t8,8x3,8d2,8t4,4x3,4d4,4t1,1x2",
        enc_channels="64:64,32:128,16:256,8:256,4:256,1:512",
        dec_blocks="1x1,1u4,1t4,4x2,4u2,4t8,8x3,8u2,8t16,16x7,16u2,16t32,32x8,32u2,32t64,64x10",
        dec_channels="64:64,32:128,16:256,8:256,4:256,1:512")
    return VAEConfig(**{**base, **overrides})


def vae_celebahq128(**overrides) -> VAEConfig:
    """CelebA-HQ (and CelebAMask-HQ) 128x128x3, z = 1024."""
    base = dict(
        image_size=128, in_channels=3,
        enc_blocks="128x1,128d2,128t64,64x3,64d2,64t32,32x3,32d2,32t16,16x7,16d2,16t8,8x3,"
                   "8d2,8t4,4x3,4d4,4t1,1x2",
        enc_channels="128:64,64:64,32:128,16:128,8:256,4:512,1:1024",
        dec_blocks="1x1,1u4,1t4,4x2,4u2,4t8,8x2,8u2,8t16,16x6,16u2,16t32,32x2,32u2,32t64,"
                   "64x2,64u2,64t128,128x1",
        dec_channels="128:64,64:64,32:128,16:128,8:256,4:512,1:1024")
    return VAEConfig(**{**base, **overrides})


def vae_digits(image_size: int = 16, channels: int = 1, **overrides) -> VAEConfig:
    """A small VAE for the digits (8x8 or 16x16, one channel), z = 32: the CIFAR-10 layout
    scaled down (fewer blocks, widths 32-64)."""
    if image_size == 16:
        enc = "16x2,16d2,16t8,8x2,8d2,8t4,4x2,4d4,4t1,1x2"
        dec = "1x1,1u4,1t4,4x2,4u2,4t8,8x2,8u2,8t16,16x2"
        widths = "16:32,8:64,4:64,1:32"
    elif image_size == 8:
        enc = "8x2,8d2,8t4,4x2,4d4,4t1,1x2"
        dec = "1x1,1u4,1t4,4x2,4u2,4t8,8x2"
        widths = "8:32,4:64,1:32"
    else:
        raise ValueError(f"image_size must be 8 or 16 for vae_digits; got {image_size!r}")
    base = dict(image_size=image_size, in_channels=channels, enc_blocks=enc,
                enc_channels=widths, dec_blocks=dec, dec_channels=widths)
    return VAEConfig(**{**base, **overrides})
