"""FastSpeech 2 without its mel decoder: the phoneme-to-frame conditioner of ProDiff.

Ren et al. 2021 (FastSpeech 2), as used by DiffSinger / ProDiff (Huang et al., ACM MM 2022):
a Transformer phoneme encoder (FFT blocks), a duration predictor and length regulator, and a
frame-level variance adaptor (pitch, then energy). The output `cond` (B, F, hidden) is the
condition of the mel denoiser (`nets.DiffNet`); the mel decoder of FastSpeech 2 is removed.

Layout: channels last, `(B, L, C)`; masks `(B, L)` float, 1 = real, 0 = padding. Padded
positions are zeroed after every block and masked out of attention, so the outputs at real
positions do not depend on the padding's content or length.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nets._layers import default_init, dense, dropout, sinusoidal_embedding, zeros_init

__all__ = [
    "FastSpeech2Config",
    "FastSpeech2",
    "fastspeech2_prodiff",
    "fastspeech2_small",
    "length_regulate",
]


@dataclasses.dataclass(frozen=True)
class FastSpeech2Config:
    """Static description of a FastSpeech 2 conditioner (hashable: a static jit argument).

    Attributes:
      num_symbols: phoneme vocabulary size, including the padding id 0.
      hidden: model width H (and the width of `cond`).
      encoder_layers: FFT blocks of the phoneme encoder.
      heads: attention heads (H must be divisible by it).
      ffn_dim: inner width of the FFT blocks' convolutional feed-forward.
      ffn_kernel: kernel of its first convolution (the second is 1x1).
      dropout: dropout rate of the encoder (embeddings, attention and FFN outputs).
      predictor_channels: width of the variance predictors' convolutions.
      predictor_kernel: their kernel size.
      predictor_layers: their number of conv -> ReLU -> LayerNorm -> dropout layers.
      predictor_dropout: their dropout rate.
      pitch_bins: buckets of the pitch embedding.
      energy_bins: buckets of the energy embedding.
      log_f0_range: (min, max) of the pitch quantisation, in the units of the `log_f0` the
        model is given and predicts (normalised log-F0; the experiment sets it from corpus
        statistics). Values outside fall into the first / last bucket.
      energy_range: (min, max) of the energy quantisation, in the units of `energy`.
      max_positions: longest phoneme sequence accepted.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters and outputs are always float32.
    """

    num_symbols: int
    hidden: int = 256
    encoder_layers: int = 4
    heads: int = 2
    ffn_dim: int = 1024
    ffn_kernel: int = 9
    dropout: float = 0.1
    predictor_channels: int = 256
    predictor_kernel: int = 3
    predictor_layers: int = 2
    predictor_dropout: float = 0.5
    pitch_bins: int = 256
    energy_bins: int = 256
    log_f0_range: tuple[float, float] = (-4.0, 4.0)
    energy_range: tuple[float, float] = (-4.0, 4.0)
    max_positions: int = 2048
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("hidden", "encoder_layers", "heads", "ffn_dim", "ffn_kernel",
                     "predictor_channels", "predictor_kernel", "predictor_layers",
                     "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_symbols", "pitch_bins", "energy_bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 2:
                raise ValueError(f"{name} must be an int >= 2, got {value!r}")
        if self.hidden % 2 or self.hidden < 4:
            raise ValueError(f"hidden must be even and >= 4, got {self.hidden}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        for name in ("dropout", "predictor_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("log_f0_range", "energy_range"):
            value = getattr(self, name)
            try:
                lo, hi = (float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a pair (min, max), got {value!r}") from None
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"{name} must be finite with min < max, got {value!r}")
            object.__setattr__(self, name, (lo, hi))
        if not jnp.issubdtype(jnp.dtype(self.dtype), jnp.floating):
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def _conv1d(c_in, c_out, kernel, *, dtype, rngs) -> nnx.Conv:
    """A (B, L, C) convolution, zero ("SAME") padding, float32 parameters, computing in dtype."""
    return nnx.Conv(c_in, c_out, (kernel,), padding="SAME", dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=default_init, bias_init=zeros_init,
                    rngs=rngs)


def _layer_norm(c, *, dtype, rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(c, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def _embed(n, c, *, dtype, rngs) -> nnx.Embed:
    # DiffSinger / NATSpeech's `Embedding`: N(0, c^-1/2)
    return nnx.Embed(n, c, dtype=dtype, param_dtype=jnp.float32,
                     embedding_init=nnx.initializers.normal(c**-0.5), rngs=rngs)


def _bucketize(v: jax.Array, lo: float, hi: float, bins: int) -> jax.Array:
    """Bucket index in [0, bins): `bins - 1` uniform boundaries over [lo, hi] (FastSpeech 2)."""
    return jnp.digitize(v.astype(jnp.float32), jnp.linspace(lo, hi, bins - 1))


def length_regulate(
    h: jax.Array, durations: jax.Array, max_frames: int
) -> tuple[jax.Array, jax.Array]:
    """FastSpeech's length regulator: repeat phoneme i's vector `durations[i]` times.

    Frame j takes the phoneme whose cumulative-duration interval [D_{i-1}, D_i) contains j
    (phonemes of duration 0 are skipped). Frames from sum(durations) on are zero with mask 0;
    frames beyond `max_frames` are dropped. Jit-able with a static `max_frames`.

    Args:
      h: (B, P, H) phoneme-level vectors.
      durations: (B, P) integer frame counts (negative values count as 0).
      max_frames: F, the static number of output frames.

    Returns:
      frames (B, F, H) in h's dtype and frame_mask (B, F) float32, 1 on the first
      min(sum(durations), F) frames.

    Example:
      >>> h = jnp.arange(3.0)[None, :, None]  # (1, 3, 1): phoneme i's vector is [i]
      >>> frames, mask = length_regulate(h, jnp.array([[2, 0, 3]]), 8)
      >>> frames[0, :, 0], mask[0]  # [0 0 2 2 2 0 0 0], [1 1 1 1 1 0 0 0]
    """
    h = jnp.asarray(h)
    durations = jnp.asarray(durations)
    try:
        f = operator.index(max_frames)
    except TypeError:
        raise TypeError(f"max_frames must be a Python int, got {max_frames!r}") from None
    if f < 1:
        raise ValueError(f"max_frames must be >= 1, got {f}")
    if h.ndim != 3 or h.shape[1] < 1:
        raise ValueError(f"h must have shape (B, P, H) with P >= 1, got {h.shape}")
    if durations.shape != h.shape[:2]:
        raise ValueError(f"durations must have shape (B, P) = {h.shape[:2]}, got "
                         f"{durations.shape}")
    if not jnp.issubdtype(durations.dtype, jnp.integer):
        raise TypeError(f"durations must be integer, got dtype {durations.dtype}")
    ends = jnp.cumsum(jnp.maximum(durations.astype(jnp.int32), 0), axis=1)  # D_i, (B, P)
    j = jnp.arange(f, dtype=jnp.int32)
    # phoneme of frame j = #{i : D_i <= j}
    idx = jax.vmap(lambda e: jnp.searchsorted(e, j, side="right"))(ends)
    idx = jnp.minimum(idx, h.shape[1] - 1)
    frames = jnp.take_along_axis(h, idx[..., None], axis=1)
    mask = j[None, :] < ends[:, -1:]
    return frames * mask[..., None].astype(h.dtype), mask.astype(jnp.float32)


class _MultiHeadAttention(nnx.Module):
    """Multi-head self-attention; padded keys get no weight (float32 logits and softmax)."""

    def __init__(self, c: int, heads: int, *, dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.q = dense(c, c, dtype=dtype, rngs=rngs)
        self.k = dense(c, c, dtype=dtype, rngs=rngs)
        self.v = dense(c, c, dtype=dtype, rngs=rngs)
        self.out = dense(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, key_mask: jax.Array) -> jax.Array:
        """x: (B, P, C), key_mask: (B, P) bool -> (B, P, C)."""
        b, p, c = x.shape
        n = self.heads
        q, k, v = (f(x).reshape(b, p, n, c // n) for f in (self.q, self.k, self.v))
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k).astype(jnp.float32) / math.sqrt(c // n)
        logits = jnp.where(key_mask[:, None, None, :], logits, -1e9)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out(jnp.einsum("bnqk,bknd->bqnd", w, v).reshape(b, p, c))


class _FFTBlock(nnx.Module):
    """FastSpeech's FFT block (post-LN): x = LN(x + MHA(x)); x = LN(x + conv1(ReLU(conv_k(x))))."""

    def __init__(self, cfg: FastSpeech2Config, *, rngs: nnx.Rngs):
        dt, c = cfg.dtype, cfg.hidden
        self.rate = cfg.dropout
        self.attn = _MultiHeadAttention(c, cfg.heads, dtype=dt, rngs=rngs)
        self.norm_attn = _layer_norm(c, dtype=dt, rngs=rngs)
        self.ffn_0 = _conv1d(c, cfg.ffn_dim, cfg.ffn_kernel, dtype=dt, rngs=rngs)
        self.ffn_1 = _conv1d(cfg.ffn_dim, c, 1, dtype=dt, rngs=rngs)
        self.norm_ffn = _layer_norm(c, dtype=dt, rngs=rngs)

    def __call__(self, x, key_mask, m, key):
        """x: (B, P, C) zero on padding, key_mask: (B, P) bool, m: (B, P, 1) float."""
        h = dropout(self.attn(x, key_mask), self.rate, _fold(key, 0))
        x = self.norm_attn(x + h) * m
        h = dropout(self.ffn_1(jax.nn.relu(self.ffn_0(x))), self.rate, _fold(key, 1))
        return self.norm_ffn(x + h) * m


class _VariancePredictor(nnx.Module):
    """[conv_k -> ReLU -> LayerNorm -> dropout] x layers -> Linear(out), padding zeroed."""

    def __init__(self, cfg: FastSpeech2Config, out: int, *, rngs: nnx.Rngs):
        dt, ch = cfg.dtype, cfg.predictor_channels
        widths = [cfg.hidden] + [ch] * cfg.predictor_layers
        self.rate = cfg.predictor_dropout
        self.convs = nnx.List([
            _conv1d(a, b, cfg.predictor_kernel, dtype=dt, rngs=rngs)
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        ])
        self.norms = nnx.List([_layer_norm(ch, dtype=dt, rngs=rngs) for _ in self.convs])
        self.linear = dense(ch, out, rngs=rngs)

    def __call__(self, x, m, key):
        """x: (B, L, H), m: (B, L, 1) -> (B, L, out) float32, zero on padding."""
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            x = norm(jax.nn.relu(conv(x * m)))  # masked input: no leak through the conv
            x = dropout(x, self.rate, _fold(key, i))
        return self.linear(x.astype(jnp.float32)) * m.astype(jnp.float32)


class FastSpeech2(nnx.Module):
    """FastSpeech 2 encoder + variance adaptor: phonemes -> frame-level condition.

    Token embedding: N(0, H^-1/2) initialised and scaled by sqrt(H) (unit variance, as in
    fairseq / NATSpeech), plus the sinusoidal encoding of the 1-based position. Padded ids are
    replaced by 0 (the padding id) before the lookup: `phone_mask` is what marks padding.

    Example:
      >>> fs2 = FastSpeech2(fastspeech2_small(40), rngs=nnx.Rngs(0))
      >>> out = fs2(jnp.array([[5, 7, 9, 0]]), jnp.array([[1.0, 1, 1, 0]]), max_frames=32)
      >>> out["cond"].shape, out["frame_mask"].shape
      ((1, 32, 64), (1, 32))
    """

    def __init__(self, config: FastSpeech2Config, *, rngs: nnx.Rngs):
        self.config = cfg = config
        dt, c = cfg.dtype, cfg.hidden
        self.embed = _embed(cfg.num_symbols, c, dtype=dt, rngs=rngs)
        self.embed.embedding[...] = self.embed.embedding[...].at[0].set(0.0)  # padding row
        self.encoder = nnx.List([_FFTBlock(cfg, rngs=rngs) for _ in range(cfg.encoder_layers)])
        self.duration_predictor = _VariancePredictor(cfg, 1, rngs=rngs)
        self.pitch_predictor = _VariancePredictor(cfg, 2, rngs=rngs)  # log-F0 and uv logit
        self.energy_predictor = _VariancePredictor(cfg, 1, rngs=rngs)
        self.pitch_embed = _embed(cfg.pitch_bins, c, dtype=dt, rngs=rngs)
        self.energy_embed = _embed(cfg.energy_bins, c, dtype=dt, rngs=rngs)

    def _check_inputs(self, phonemes, phone_mask, max_frames, durations, log_f0, energy):
        cfg = self.config
        if phonemes.ndim != 2 or phonemes.shape[1] < 1:
            raise ValueError(f"phonemes must have shape (B, P) with P >= 1, got {phonemes.shape}")
        if not jnp.issubdtype(phonemes.dtype, jnp.integer):
            raise TypeError(f"phonemes must be integer ids, got dtype {phonemes.dtype}")
        b, p = phonemes.shape
        if p > cfg.max_positions:
            raise ValueError(f"phonemes has length {p} > max_positions={cfg.max_positions}")
        if phone_mask.shape != (b, p):
            raise ValueError(f"phone_mask must have shape (B, P) = {(b, p)}, "
                             f"got {phone_mask.shape}")
        try:
            f = operator.index(max_frames)
        except TypeError:
            raise TypeError(f"max_frames must be a Python int, got {max_frames!r}") from None
        if f < 1:
            raise ValueError(f"max_frames must be >= 1, got {f}")
        if durations is not None:
            if durations.shape != (b, p):
                raise ValueError(f"durations must have shape (B, P) = {(b, p)}, "
                                 f"got {durations.shape}")
            if not jnp.issubdtype(durations.dtype, jnp.integer):
                raise TypeError(f"durations must be integer frame counts, "
                                f"got dtype {durations.dtype}")
        for name, v in (("log_f0", log_f0), ("energy", energy)):
            if v is None:
                continue
            if v.shape != (b, f):
                raise ValueError(f"{name} must have shape (B, max_frames) = {(b, f)}, "
                                 f"got {v.shape}")
            if not jnp.issubdtype(v.dtype, jnp.floating):
                raise TypeError(f"{name} must be floating, got dtype {v.dtype}")
        return f

    def __call__(
        self,
        phonemes: jax.Array,
        phone_mask: jax.Array,
        *,
        max_frames: int,
        durations: jax.Array | None = None,
        log_f0: jax.Array | None = None,
        energy: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Encode phonemes, regulate their lengths and add the pitch and energy embeddings.

        Args:
          phonemes: (B, P) integer ids (0 = padding).
          phone_mask: (B, P) 1 = real phoneme, 0 = padding.
          max_frames: F, static number of frames.
          durations: (B, P) integer ground-truth durations (teacher forcing), or None to use
            the predicted ones.
          log_f0: (B, F) float normalised log-F0 for the pitch embedding (teacher forcing), or
            None to embed the prediction.
          energy: (B, F) float energy for the energy embedding, or None to embed the
            prediction.
          key: PRNG key enabling dropout (training); None = no dropout.

        Returns:
          A dict of float32 arrays (durations int32), zero on padding:
          cond (B, F, H): length-regulated encoding + pitch and energy embeddings, the
            denoiser's condition; frame_mask (B, F); log_duration (B, P): predicted
            log(d + 1); durations (B, P): those used (given, else max(round(exp(log_d) - 1), 0)
            clipped to F); log_f0, uv_logit, energy (B, F): predicted.
        """
        cfg = self.config
        phonemes, phone_mask = jnp.asarray(phonemes), jnp.asarray(phone_mask)
        durations = None if durations is None else jnp.asarray(durations)
        log_f0 = None if log_f0 is None else jnp.asarray(log_f0)
        energy = None if energy is None else jnp.asarray(energy)
        f = self._check_inputs(phonemes, phone_mask, max_frames, durations, log_f0, energy)
        dt, c = cfg.dtype, cfg.hidden
        b, p = phonemes.shape
        real = phone_mask > 0.5
        pm = real.astype(dt)[..., None]

        # encoder
        pos = (jnp.cumsum(real, axis=1) * real).astype(jnp.float32)  # 1, 2, ...; 0 on padding
        x = self.embed(jnp.where(real, phonemes, 0)) * math.sqrt(c)
        x = x + sinusoidal_embedding(pos.reshape(-1), c).reshape(b, p, c).astype(dt)
        x = dropout(x, cfg.dropout, _fold(key, 0)) * pm
        for i, block in enumerate(self.encoder):
            x = block(x, real, pm, _fold(key, 1 + i))

        # durations and length regulation
        log_duration = self.duration_predictor(x, pm, _fold(key, 1000))[..., 0]
        if durations is None:
            d = jnp.clip(jnp.round(jnp.exp(log_duration) - 1.0), 0, f).astype(jnp.int32)
        else:
            d = jnp.maximum(durations.astype(jnp.int32), 0)
        d = d * real
        h, frame_mask = length_regulate(x, d, f)
        fm = frame_mask.astype(dt)[..., None]

        # frame-level variance adaptor: pitch, then energy (on the pitch-conditioned frames)
        pitch = self.pitch_predictor(h, fm, _fold(key, 1001))
        pred_log_f0, uv_logit = pitch[..., 0], pitch[..., 1]
        f0 = pred_log_f0 if log_f0 is None else log_f0
        h = h + self.pitch_embed(_bucketize(f0, *cfg.log_f0_range, cfg.pitch_bins)) * fm
        pred_energy = self.energy_predictor(h, fm, _fold(key, 1002))[..., 0]
        e = pred_energy if energy is None else energy
        h = h + self.energy_embed(_bucketize(e, *cfg.energy_range, cfg.energy_bins)) * fm

        return {
            "cond": h.astype(jnp.float32) * frame_mask[..., None],
            "frame_mask": frame_mask,
            "log_duration": log_duration,
            "durations": d,
            "log_f0": pred_log_f0,
            "uv_logit": uv_logit,
            "energy": pred_energy,
        }


def fastspeech2_prodiff(num_symbols: int, **overrides) -> FastSpeech2Config:
    """ProDiff's FastSpeech 2 (without decoder): 4 FFT blocks of width 256, 2 heads, FFN 1024
    with kernel 9, dropout 0.1; 2-layer kernel-3 variance predictors of width 256."""
    base = dict(num_symbols=num_symbols, hidden=256, encoder_layers=4, heads=2, ffn_dim=1024,
                ffn_kernel=9, dropout=0.1, predictor_channels=256, predictor_kernel=3,
                predictor_layers=2, predictor_dropout=0.5)
    return FastSpeech2Config(**{**base, **overrides})


def fastspeech2_small(num_symbols: int, **overrides) -> FastSpeech2Config:
    """A CPU-fast FastSpeech 2: width 64, 2 FFT blocks, 2 heads, FFN 128 with kernel 3,
    2-layer kernel-5 predictors of width 64, 32 pitch and energy buckets."""
    base = dict(num_symbols=num_symbols, hidden=64, encoder_layers=2, heads=2, ffn_dim=128,
                ffn_kernel=3, dropout=0.1, predictor_channels=64, predictor_kernel=5,
                predictor_layers=2, predictor_dropout=0.5, pitch_bins=32, energy_bins=32)
    return FastSpeech2Config(**{**base, **overrides})
