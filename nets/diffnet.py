"""DiffNet: the non-causal WaveNet mel-spectrogram denoiser of DiffSinger and ProDiff.

Liu et al. 2022 (DiffSinger, `usr/diff/net.py`), used unchanged as the denoiser of ProDiff
(Huang et al., ACM MM 2022: 20 layers, 256 channels, dilation cycle 1). Sequences are channels
last, `(B, F, C)` for F frames. The network embeds whatever scalar the caller conditions on
(`noise_level`; ProDiff feeds the integer step index) and knows nothing about schedules.

Padding: frames with `mask == 0` are zeroed at the input, before every dilated convolution,
after every residual layer and at the output, so the outputs on real frames are those of the
unpadded sequence: independent of the padding's content and length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import default_init, dense, sinusoidal_embedding, zeros_init

__all__ = ["DiffNetConfig", "DiffNet", "diffnet_prodiff", "diffnet_small"]


@dataclasses.dataclass(frozen=True)
class DiffNetConfig:
    """Static description of a DiffNet (hashable, so it can be a static jit argument).

    Attributes:
      in_dims: mel bins M of the noisy spectrogram x (and of the output).
      residual_channels: width C of the residual stream (the step embedding is sinusoidal(C)).
      residual_layers: number N of gated residual layers.
      cond_dim: width of the frame-level condition `cond["cond"]` (the conditioner's hidden).
      dilation_cycle: layer i dilates its k=3 convolution by 2**(i % dilation_cycle);
        1 = no dilation (ProDiff, DiffSinger).
      dtype: compute dtype (e.g. jnp.bfloat16); parameters and output are always float32.
    """

    in_dims: int = 80
    residual_channels: int = 256
    residual_layers: int = 20
    cond_dim: int = 256
    dilation_cycle: int = 1
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("in_dims", "residual_layers", "cond_dim", "dilation_cycle"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        c = self.residual_channels
        if not isinstance(c, int) or isinstance(c, bool) or c < 4 or c % 2:
            raise ValueError(f"residual_channels must be an even int >= 4, got {c!r}")
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")


def _conv1d(c_in, c_out, kernel=1, *, dilation=1, dtype=jnp.float32, zero=False, rngs) -> nnx.Conv:
    """A (B, L, C) convolution, zero ("SAME") padding, float32 parameters, computing in dtype."""
    return nnx.Conv(
        c_in,
        c_out,
        (kernel,),
        padding="SAME",
        kernel_dilation=(dilation,),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=zeros_init if zero else default_init,
        bias_init=zeros_init,
        rngs=rngs,
    )


class _ResidualLayer(nnx.Module):
    """y = x + W emb; a, b = dilated_conv(y) + conditioner(cond); sigmoid(a) * tanh(b) ->
    1x1 conv -> (residual, skip); returns ((x + residual) / sqrt(2), skip)."""

    def __init__(self, c: int, cond_dim: int, dilation: int, *, dtype, rngs: nnx.Rngs):
        self.diffusion_projection = dense(c, c, dtype=dtype, rngs=rngs)
        self.dilated_conv = _conv1d(c, 2 * c, 3, dilation=dilation, dtype=dtype, rngs=rngs)
        self.conditioner_projection = _conv1d(cond_dim, 2 * c, dtype=dtype, rngs=rngs)
        self.output_projection = _conv1d(c, 2 * c, dtype=dtype, rngs=rngs)

    def __call__(self, x, cond, emb, mask):
        """x: (B, F, C), cond: (B, F, cond_dim), emb: (B, C), mask: (B, F, 1)."""
        y = (x + self.diffusion_projection(emb)[:, None, :]) * mask  # no leak into the conv
        y = self.dilated_conv(y) + self.conditioner_projection(cond)
        gate, filt = jnp.split(y, 2, axis=-1)  # DiffSinger's channel order
        y = self.output_projection(jax.nn.sigmoid(gate) * jnp.tanh(filt))
        residual, skip = jnp.split(y, 2, axis=-1)
        return (x + residual) * mask / math.sqrt(2.0), skip


class DiffNet(nnx.Module):
    """DiffSinger / ProDiff WaveNet denoiser: `(x, noise_level, cond) -> (B, F, in_dims)`.

    Example:
      >>> net = DiffNet(diffnet_small(), rngs=nnx.Rngs(0))
      >>> x = jnp.zeros((2, 50, 80))
      >>> cond = {"cond": jnp.zeros((2, 50, 64)), "mask": jnp.ones((2, 50))}
      >>> net(x, jnp.array([1.0, 3.0]), cond).shape  # zero at init: the output conv is zero
      (2, 50, 80)
    """

    def __init__(self, config: DiffNetConfig, *, rngs: nnx.Rngs):
        self.config = cfg = config
        c, dt = cfg.residual_channels, cfg.dtype
        self.input_projection = _conv1d(cfg.in_dims, c, dtype=dt, rngs=rngs)
        # step embedding: sinusoidal(C) -> Linear(4C) -> Mish -> Linear(C), float32 (tiny)
        self.mlp_0 = dense(c, 4 * c, rngs=rngs)
        self.mlp_1 = dense(4 * c, c, rngs=rngs)
        self.residual_layers = nnx.List([
            _ResidualLayer(c, cfg.cond_dim, 2 ** (i % cfg.dilation_cycle), dtype=dt, rngs=rngs)
            for i in range(cfg.residual_layers)
        ])
        self.skip_projection = _conv1d(c, c, dtype=dt, rngs=rngs)
        self.output_projection = _conv1d(c, cfg.in_dims, zero=True, rngs=rngs)

    def _check_inputs(self, x, noise_level, cond):
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.in_dims:
            raise ValueError(f"x must have shape (B, F, in_dims={cfg.in_dims}), got {x.shape}")
        b, f, _ = x.shape
        if noise_level.ndim > 1 or (noise_level.ndim == 1 and noise_level.shape[0] != b):
            raise ValueError(f"noise_level must have shape () or ({b},), got {noise_level.shape}")
        if not isinstance(cond, dict):
            raise TypeError(
                f"cond must be a dict {{'cond': (B, F, cond_dim), 'mask': (B, F)}}, "
                f"got {type(cond).__name__}"
            )
        unknown = set(cond) - {"cond", "mask"}
        if unknown:
            raise ValueError(f"cond has unknown keys {sorted(unknown)}; expected 'cond', 'mask'")
        if "cond" not in cond:
            raise ValueError("cond['cond'] (B, F, cond_dim) is required")
        c = jnp.asarray(cond["cond"])
        if c.shape != (b, f, cfg.cond_dim):
            raise ValueError(
                f"cond['cond'] must have shape (B, F, cond_dim) = {(b, f, cfg.cond_dim)}, "
                f"got {c.shape}"
            )
        mask = cond.get("mask")
        if mask is None:
            mask = jnp.ones((b, f), jnp.float32)
        mask = jnp.asarray(mask)
        if mask.shape != (b, f):
            raise ValueError(f"cond['mask'] must have shape (B, F) = {(b, f)}, got {mask.shape}")
        return c, mask

    def __call__(self, x: jax.Array, noise_level: jax.Array, cond: dict) -> jax.Array:
        """Denoiser output for a batch of (padded) spectrograms.

        Args:
          x: (B, F, in_dims) noisy mel-spectrogram, channels last.
          noise_level: () or (B,) float (ProDiff: the diffusion step index, as a float).
          cond: {"cond": (B, F, cond_dim) the conditioner's frame-level output,
            "mask": (B, F) 1 = real frame, 0 = padding (optional: all real)}.

        Returns:
          (B, F, in_dims) float32, exactly zero on padded frames.
        """
        cfg = self.config
        x, noise_level = jnp.asarray(x), jnp.asarray(noise_level)
        c, mask = self._check_inputs(x, noise_level, cond)
        b, dt = x.shape[0], cfg.dtype
        m = mask.astype(dt)[..., None]
        c = c.astype(dt)

        emb = sinusoidal_embedding(jnp.broadcast_to(noise_level, (b,)), cfg.residual_channels)
        emb = self.mlp_1(jax.nn.mish(self.mlp_0(emb))).astype(dt)

        h = jax.nn.relu(self.input_projection(x.astype(dt) * m)) * m
        skip = jnp.zeros_like(h)
        for layer in self.residual_layers:
            h, s = layer(h, c, emb, m)
            skip = skip + s
        h = skip / math.sqrt(len(self.residual_layers))
        h = jax.nn.relu(self.skip_projection(h))
        out = self.output_projection(h.astype(jnp.float32))
        return out * mask.astype(jnp.float32)[..., None]


def diffnet_prodiff(cond_dim: int = 256, in_dims: int = 80, **overrides) -> DiffNetConfig:
    """ProDiff's (and DiffSinger's) denoiser: 20 layers, 256 channels, no dilation (15.1M
    parameters for 80 mel bins and a 256-wide condition)."""
    base = dict(in_dims=in_dims, residual_channels=256, residual_layers=20, cond_dim=cond_dim,
                dilation_cycle=1)
    return DiffNetConfig(**{**base, **overrides})


def diffnet_small(cond_dim: int = 64, in_dims: int = 80, **overrides) -> DiffNetConfig:
    """A CPU-fast DiffNet: 6 layers, 64 channels, dilation cycle 1."""
    base = dict(in_dims=in_dims, residual_channels=64, residual_layers=6, cond_dim=cond_dim,
                dilation_cycle=1)
    return DiffNetConfig(**{**base, **overrides})
