"""Speech features for mel-spectrogram TTS (FastSpeech 2, ProDiff): STFT, log-mel, energy, YIN
pitch, Griffin-Lim, and 16-bit PCM ``.wav`` files.

Conventions (every frame-wise feature here shares them):

* Frames are centred: the signal is padded by ``n_fft // 2`` on both sides (``cfg.pad_mode``,
  reflect by default) and frame ``i`` is centred on sample ``i * hop_length``, so a clip of ``T``
  samples has ``num_frames(T, cfg) = 1 + T // hop_length`` frames (mel, energy and f0 alike).
* The window is a periodic Hann window of ``win_length`` samples, zero-padded to ``n_fft``
  (centred).
* The log-mel spectrogram is NATSpeech's / ProDiff's: ``log10(max(M |STFT|, log_floor))`` of
  the *magnitude* (not power) through a Slaney-style mel filterbank (librosa's default,
  ``htk=False, norm="slaney"``). It is neither dB nor natural log.

The STFT, log-mel, energy, ISTFT and Griffin-Lim are jax.numpy and jit-able (``MelConfig`` is a
pytree without leaves, so it can be passed to a jitted function as an ordinary argument);
the filterbank, YIN pitch and the ``.wav`` I/O are numpy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import wave

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MelConfig",
    "energy",
    "f0",
    "griffin_lim",
    "griffin_lim_linear",
    "interpolate_f0",
    "istft",
    "linear_magnitude",
    "log_mel",
    "mel_filterbank",
    "mel_to_linear",
    "num_frames",
    "read_wav",
    "stft",
    "write_wav",
]

_PAD_MODES = ("reflect", "constant")


def _static(default):
    return dataclasses.field(default=default, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MelConfig:
    """STFT and mel settings (defaults: LJSpeech at 22.05 kHz as in FastSpeech 2 / ProDiff).

    Attributes:
      sample_rate: samples per second.
      n_fft: FFT size (even); ``n_fft // 2 + 1`` frequency bins.
      win_length: Hann window length, ``<= n_fft`` (zero-padded to ``n_fft``, centred).
      hop_length: samples between frame centres.
      n_mels: number of mel bands.
      fmin: lowest mel band edge in Hz, ``0 <= fmin < fmax``.
      fmax: highest mel band edge in Hz, ``<= sample_rate / 2``.
      log_floor: magnitudes of the mel spectrogram are floored here before ``log10``.
      pad_mode: ``"reflect"`` (librosa < 0.10's default) or ``"constant"`` (zeros, NATSpeech's
        ``librosa.stft(..., pad_mode="constant")``) for the ``n_fft // 2`` centre padding.
    """

    sample_rate: int = _static(22050)
    n_fft: int = _static(1024)
    win_length: int = _static(1024)
    hop_length: int = _static(256)
    n_mels: int = _static(80)
    fmin: float = _static(80.0)
    fmax: float = _static(7600.0)
    log_floor: float = _static(1e-5)
    pad_mode: str = _static("reflect")

    def __post_init__(self):
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.n_fft % 2:
            raise ValueError(
                f"n_fft must be even (centred frames then number 1 + T // hop_length), "
                f"got {self.n_fft}"
            )
        if self.win_length > self.n_fft:
            raise ValueError(
                f"win_length must be <= n_fft={self.n_fft}, got win_length={self.win_length}"
            )
        nyquist = self.sample_rate / 2
        if not 0 <= self.fmin < self.fmax <= nyquist:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate / 2 = {nyquist:g}; "
                f"got fmin={self.fmin!r}, fmax={self.fmax!r}"
            )
        if not self.log_floor > 0:
            raise ValueError(f"log_floor must be > 0, got {self.log_floor!r}")
        if self.pad_mode not in _PAD_MODES:
            raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {self.pad_mode!r}")


def num_frames(num_samples: int, cfg: MelConfig) -> int:
    """Number of centred frames of a clip: ``1 + num_samples // cfg.hop_length``."""
    if int(num_samples) != num_samples or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative integer, got {num_samples!r}")
    return 1 + int(num_samples) // cfg.hop_length


# ------------------------------------------------------------------ mel filterbank

# Slaney's mel scale (Auditory Toolbox; librosa htk=False): linear below 1 kHz, 3 mels per
# 200 Hz, then logarithmic with 27 mels per factor 6.4.
_HZ_PER_MEL = 200.0 / 3.0
_BREAK_HZ = 1000.0
_BREAK_MEL = _BREAK_HZ / _HZ_PER_MEL
_LOG_STEP = math.log(6.4) / 27.0


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, np.float64)
    log_part = _BREAK_MEL + np.log(np.maximum(f, _BREAK_HZ) / _BREAK_HZ) / _LOG_STEP
    return np.where(f >= _BREAK_HZ, log_part, f / _HZ_PER_MEL)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    log_part = _BREAK_HZ * np.exp(_LOG_STEP * (np.maximum(m, _BREAK_MEL) - _BREAK_MEL))
    return np.where(m >= _BREAK_MEL, log_part, m * _HZ_PER_MEL)


def mel_filterbank(cfg: MelConfig) -> np.ndarray:
    """Slaney mel filterbank with Slaney area normalisation (librosa's default, transposed).

    Band ``m`` is a triangle on the Hz axis between the edges ``f_m, f_{m+1}, f_{m+2}`` (``n_mels
    + 2`` points equally spaced on the Slaney mel scale from ``fmin`` to ``fmax``), scaled by
    ``2 / (f_{m+2} - f_m)`` so that its continuous area is one.

    Args:
      cfg: the STFT / mel settings.

    Returns:
      ``(n_fft // 2 + 1, n_mels)`` float32 weights: ``mel = magnitude @ mel_filterbank(cfg)``.
    """
    freqs = np.arange(cfg.n_fft // 2 + 1) * (cfg.sample_rate / cfg.n_fft)
    mels = np.linspace(_hz_to_mel(cfg.fmin), _hz_to_mel(cfg.fmax), cfg.n_mels + 2)
    edges = _mel_to_hz(mels)
    lo, centre, hi = edges[:-2], edges[1:-1], edges[2:]
    rise = (freqs[:, None] - lo) / (centre - lo)
    fall = (hi - freqs[:, None]) / (hi - centre)
    weights = np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (hi - lo))
    return weights.astype(np.float32)


# ------------------------------------------------------------------ STFT and features


def _window(cfg: MelConfig) -> np.ndarray:
    """Periodic Hann window of ``win_length``, zero-padded (centred) to ``n_fft``; float64."""
    n = np.arange(cfg.win_length)
    w = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / cfg.win_length)
    out = np.zeros(cfg.n_fft)
    start = (cfg.n_fft - cfg.win_length) // 2
    out[start : start + cfg.win_length] = w
    return out


def _frame_index(n_frames: int, cfg: MelConfig) -> np.ndarray:
    """(n_frames, n_fft) sample indices of the frames in the padded signal."""
    return np.arange(n_frames)[:, None] * cfg.hop_length + np.arange(cfg.n_fft)[None, :]


def _check_wav(wav: jax.Array, cfg: MelConfig, argument: str = "wav") -> None:
    if wav.ndim < 1:
        raise ValueError(f"{argument} must have shape (T,) or (B, T), got shape {wav.shape}")
    if cfg.pad_mode == "reflect" and wav.shape[-1] <= cfg.n_fft // 2:
        raise ValueError(
            f"{argument} must hold more than n_fft // 2 = {cfg.n_fft // 2} samples for reflect "
            f"padding, got shape {wav.shape}"
        )
    if jnp.iscomplexobj(wav):
        raise ValueError(f"{argument} must be real, got dtype {wav.dtype}")


def stft(wav: jax.Array, cfg: MelConfig) -> jax.Array:
    """Short-time Fourier transform with centred frames (jit-able).

    Args:
      wav: (T,) or (B, T) waveform (any leading dimensions).
      cfg: the STFT settings.

    Returns:
      (..., 1 + T // hop_length, n_fft // 2 + 1) complex spectrum (complex64, or complex128 for
      float64 input under x64); frame ``i`` is centred on sample ``i * hop_length``.
    """
    wav = jnp.asarray(wav)
    _check_wav(wav, cfg)
    x = wav.astype(jnp.result_type(wav.dtype, jnp.float32))
    pad = cfg.n_fft // 2
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode=cfg.pad_mode)
    frames = x[..., _frame_index(num_frames(wav.shape[-1], cfg), cfg)]
    return jnp.fft.rfft(frames * jnp.asarray(_window(cfg), x.dtype), axis=-1)


def linear_magnitude(wav: jax.Array, cfg: MelConfig) -> jax.Array:
    """``|STFT|``: (..., frames, n_fft // 2 + 1) linear magnitude spectrogram (jit-able)."""
    return jnp.abs(stft(wav, cfg))


def _apply_filterbank(magnitude: jax.Array, cfg: MelConfig) -> jax.Array:
    fb = jnp.asarray(mel_filterbank(cfg), magnitude.dtype)
    return jnp.matmul(magnitude, fb, precision=jax.lax.Precision.HIGHEST)


def log_mel(wav: jax.Array, cfg: MelConfig) -> jax.Array:
    """NATSpeech / ProDiff log-mel spectrogram, ``log10(max(|STFT| @ filterbank, log_floor))``.

    The *magnitude* (not the power) spectrum goes through the Slaney filterbank
    (:func:`mel_filterbank`), and the logarithm is base 10: with the default floor ``1e-5`` the
    values lie in ``[-5, ~1.5]`` for waveforms in ``[-1, 1]``.

    Args:
      wav: (T,) or (B, T) waveform.
      cfg: the STFT / mel settings.

    Returns:
      (..., 1 + T // hop_length, n_mels) log-mel spectrogram.

    Example:
      >>> cfg = MelConfig()
      >>> log_mel(jnp.zeros(22050), cfg).shape
      (87, 80)
    """
    mel = _apply_filterbank(linear_magnitude(wav, cfg), cfg)
    return jnp.log10(jnp.maximum(mel, cfg.log_floor))


def energy(wav: jax.Array, cfg: MelConfig) -> jax.Array:
    """FastSpeech 2 frame energy: the L2 norm over frequency of ``|STFT|`` (jit-able).

    Args:
      wav: (T,) or (B, T) waveform.
      cfg: the STFT settings.

    Returns:
      (..., 1 + T // hop_length) energy per frame (linear, not log).
    """
    mag = linear_magnitude(wav, cfg)
    return jnp.sqrt(jnp.sum(mag * mag, axis=-1))


# ------------------------------------------------------------------ pitch (YIN)


def f0(
    wav: np.ndarray,
    cfg: MelConfig,
    *,
    fmin: float = 60.0,
    fmax: float = 600.0,
    threshold: float = 0.15,
    silence: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray]:
    """Fundamental frequency by YIN (de Cheveigné & Kawahara 2002), one value per STFT frame.

    Per frame: (2) the difference function ``d(tau) = sum_j (x_j - x_{j+tau})^2`` over an
    integration window of ``W = max(win_length, ceil(sr / fmin) + 1)`` samples centred on the
    frame centre (computed with FFT cross-correlation; frames centred within ``W / 2`` samples
    of the start, or ``W / 2 + sr / fmin`` of the end, are analysed on the nearest stretch that
    lies inside the clip rather than on padding), (3) the cumulative-mean-normalised
    difference ``d'(tau) = d(tau) tau / sum_{j <= tau} d(j)``, (4) the first lag in
    ``[floor(sr / fmax), ceil(sr / fmin)]`` where ``d'`` dips below ``threshold``, followed
    down to its local minimum, (5) parabolic interpolation of ``d`` around that lag.

    Unvoiced frames (``f0 = 0``): no dip below ``threshold``, or silence, i.e. an integration
    window whose RMS is at most ``silence`` times the loudest window's RMS of the clip (-60 dB
    by default; a clip of digital silence is all unvoiced).

    Args:
      wav: (T,) waveform (numpy; vectorised over frames).
      cfg: the STFT settings (sample rate, hop and window length).
      fmin: lowest pitch searched, Hz.
      fmax: highest pitch searched, Hz.
      threshold: YIN's absolute threshold on ``d'``, in ``(0, 1)``.
      silence: relative RMS below which a frame is silent, in ``[0, 1)``.

    Returns:
      ``(f0_hz, voiced)``: (1 + T // hop_length,) float32 pitch in Hz (0 where unvoiced) and
      bool voicing flags.
    """
    x = np.asarray(wav, np.float64)
    if x.ndim != 1 or x.size < 2:
        raise ValueError(f"wav must have shape (T,) with T >= 2, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"wav must be finite, got {np.sum(~np.isfinite(x))} non-finite values")
    sr = cfg.sample_rate
    if not 0 < fmin < fmax <= sr / 2:
        raise ValueError(
            f"need 0 < fmin < fmax <= sample_rate / 2 = {sr / 2:g}; got fmin={fmin!r}, "
            f"fmax={fmax!r}"
        )
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
    if not 0 <= silence < 1:
        raise ValueError(f"silence must lie in [0, 1), got {silence!r}")

    tau_min = max(1, int(math.floor(sr / fmax)))
    tau_max = int(math.ceil(sr / fmin)) + 1  # one lag past the longest period: its right neighbour
    W = max(cfg.win_length, tau_max)
    L = W + tau_max
    T, hop = x.size, cfg.hop_length
    n_frames = num_frames(T, cfg)
    # frame i: integration window x[c - W//2 : c - W//2 + W] around c = i * hop, then tau_max
    # more samples; near the ends the frame is shifted inwards to lie inside the clip
    if T < L:
        x = np.pad(x, (0, L - T))
    starts = np.clip(np.arange(n_frames) * hop - W // 2, 0, x.size - L)
    frames = np.lib.stride_tricks.sliding_window_view(x, L)[starts]  # (F, L)

    # (2) difference function: d(tau) = e_0 + e_tau - 2 r(tau)
    n = 1 << (L - 1).bit_length()  # >= L: no circular wrap for lags 0..tau_max
    spec = np.fft.rfft(frames, n, axis=1)
    spec_w = np.fft.rfft(frames[:, :W], n, axis=1)
    r = np.fft.irfft(np.conj(spec_w) * spec, n, axis=1)[:, : tau_max + 1]
    cum_sq = np.concatenate([np.zeros((n_frames, 1)), np.cumsum(frames**2, axis=1)], axis=1)
    taus = np.arange(tau_max + 1)
    e_0 = cum_sq[:, W]
    e_tau = cum_sq[:, W + taus] - cum_sq[:, taus]
    d = np.maximum(e_0[:, None] + e_tau - 2.0 * r, 0.0)
    d[:, 0] = 0.0

    # (3) cumulative-mean-normalised difference, d'(0) = 1
    running = np.cumsum(d[:, 1:], axis=1)
    d_norm = np.ones_like(d)
    safe = np.where(running > 0, running, 1.0)
    d_norm[:, 1:] = np.where(running > 0, d[:, 1:] * taus[1:] / safe, 1.0)

    # (4) first lag below the threshold, followed down to its local minimum: the first lag
    # with d'(tau) < threshold and d'(tau) <= d'(tau + 1)
    lags = np.arange(tau_min, tau_max)
    dip = (d_norm[:, lags] < threshold) & (d_norm[:, lags] <= d_norm[:, lags + 1])
    found = dip.any(axis=1)
    tau = lags[np.argmax(dip, axis=1)]

    # (5) parabolic interpolation of d around tau
    rows = np.arange(n_frames)
    a, b, c = d[rows, tau - 1], d[rows, tau], d[rows, tau + 1]
    curvature = a - 2.0 * b + c
    shift = np.where(curvature > 0, 0.5 * (a - c) / np.where(curvature > 0, curvature, 1.0), 0.0)
    period = tau + np.clip(shift, -1.0, 1.0)

    rms = np.sqrt(e_0 / W)
    loud = rms > silence * rms.max()
    voiced = found & loud
    f0_hz = np.where(voiced, sr / period, 0.0)
    return f0_hz.astype(np.float32), voiced


def interpolate_f0(f0_hz: np.ndarray, voiced: np.ndarray) -> np.ndarray:
    """Continuous pitch (FastSpeech 2's target): unvoiced stretches linearly interpolated in Hz
    between the neighbouring voiced frames; leading and trailing stretches hold the nearest
    voiced value.

    Args:
      f0_hz: (F,) pitch in Hz.
      voiced: (F,) bool voicing flags.

    Returns:
      (F,) float pitch (float32 for float32 input); all zeros if no frame is voiced.
    """
    f = np.asarray(f0_hz)
    v = np.asarray(voiced)
    if f.ndim != 1 or v.shape != f.shape:
        raise ValueError(
            f"f0_hz and voiced must share a shape (F,), got {f.shape} and {v.shape}"
        )
    if v.dtype != np.bool_:
        raise ValueError(f"voiced must be a bool array, got dtype {v.dtype}")
    dtype = np.result_type(f.dtype, np.float32)
    if not v.any():
        return np.zeros(f.shape, dtype)
    idx = np.arange(f.size)
    return np.interp(idx, idx[v], f[v].astype(np.float64)).astype(dtype)


# ------------------------------------------------------------------ inversion


def istft(spec: jax.Array, cfg: MelConfig, length: int | None = None) -> jax.Array:
    """Inverse of :func:`stft` by windowed overlap-add and window-sum-square normalisation.

    Args:
      spec: (..., F, n_fft // 2 + 1) complex spectrum.
      cfg: the STFT settings.
      length: output samples (static); default ``(F - 1) * hop_length``.

    Returns:
      (..., length) real waveform; ``istft(stft(x), cfg, len(x)) == x`` up to rounding.
    """
    spec = jnp.asarray(spec)
    n_bins = cfg.n_fft // 2 + 1
    if spec.ndim < 2 or spec.shape[-1] != n_bins:
        raise ValueError(f"spec must have shape (..., F, {n_bins}), got shape {spec.shape}")
    n_frames = spec.shape[-2]
    length = (n_frames - 1) * cfg.hop_length if length is None else int(length)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    window = _window(cfg)
    frames = jnp.fft.irfft(spec, n=cfg.n_fft, axis=-1)
    frames = frames * jnp.asarray(window, frames.dtype)
    index = _frame_index(n_frames, cfg)
    full = cfg.n_fft + (n_frames - 1) * cfg.hop_length
    y = jnp.zeros(spec.shape[:-2] + (full,), frames.dtype).at[..., index].add(frames)
    # window-sum-square (np.bincount: numpy 2.4's np.add.at mishandles broadcast values)
    wss = np.bincount(index.ravel(), np.tile(window**2, n_frames), minlength=full)
    inv = np.where(wss > 1e-10, 1.0 / np.where(wss > 1e-10, wss, 1.0), 0.0)
    y = y * jnp.asarray(inv, y.dtype)
    start = cfg.n_fft // 2
    y = y[..., start : start + length]
    short = length - y.shape[-1]
    if short > 0:
        y = jnp.pad(y, [(0, 0)] * (y.ndim - 1) + [(0, short)])
    return y


def mel_to_linear(log_mel_spec: jax.Array, cfg: MelConfig) -> jax.Array:
    """Linear magnitude from a :func:`log_mel` spectrogram: ``max(10^log_mel @ pinv(M), 0)``.

    ``pinv(M)`` is the Moore-Penrose pseudo-inverse of the filterbank (the minimum-norm
    magnitude whose mel spectrogram matches), clipped at zero. Bins outside ``[fmin, fmax]``
    come back as zero.

    Args:
      log_mel_spec: (..., F, n_mels) log10 mel magnitudes.
      cfg: the STFT / mel settings.

    Returns:
      (..., F, n_fft // 2 + 1) non-negative linear magnitude.
    """
    log_mel_spec = jnp.asarray(log_mel_spec)
    if log_mel_spec.ndim < 2 or log_mel_spec.shape[-1] != cfg.n_mels:
        raise ValueError(
            f"log_mel_spec must have shape (..., F, {cfg.n_mels}), got {log_mel_spec.shape}"
        )
    dtype = jnp.result_type(log_mel_spec.dtype, jnp.float32)
    inverse = jnp.asarray(np.linalg.pinv(mel_filterbank(cfg).astype(np.float64)), dtype)
    mel = jnp.power(10.0, log_mel_spec.astype(dtype))
    return jnp.maximum(jnp.matmul(mel, inverse, precision=jax.lax.Precision.HIGHEST), 0.0)


def griffin_lim_linear(
    magnitude: jax.Array,
    cfg: MelConfig,
    *,
    n_iter: int = 32,
    seed: int = 0,
    momentum: float = 0.99,
    length: int | None = None,
) -> jax.Array:
    """Waveform whose STFT magnitude approaches ``magnitude``: (fast) Griffin-Lim.

    Griffin & Lim (1984) alternate the projection onto the target magnitude,
    ``P_mag(t) = magnitude * t / |t|``, and onto consistent spectrograms,
    ``P_stft(t) = stft(istft(t))``. The fast variant (Perraudin, Balazs & Søndergaard 2013) adds
    momentum: ``c_n = P_stft(P_mag(t_{n-1}))``, ``t_n = c_n + momentum (c_n - c_{n-1})``;
    ``momentum=0`` is the original algorithm. Runs as a ``lax.fori_loop`` (jit-able with
    ``n_iter`` and ``length`` static).

    Args:
      magnitude: (..., F, n_fft // 2 + 1) non-negative linear magnitude.
      cfg: the STFT settings.
      n_iter: number of iterations.
      seed: seed of the uniformly random initial phase.
      momentum: fast Griffin-Lim's ``alpha`` in ``[0, 1)``.
      length: output samples, with ``1 + length // hop_length == F``; default
        ``(F - 1) * hop_length``.

    Returns:
      (..., length) waveform.
    """
    S = jnp.asarray(magnitude)
    n_bins = cfg.n_fft // 2 + 1
    if S.ndim < 2 or S.shape[-1] != n_bins:
        raise ValueError(f"magnitude must have shape (..., F, {n_bins}), got {S.shape}")
    n_frames = S.shape[-2]
    length = (n_frames - 1) * cfg.hop_length if length is None else int(length)
    if num_frames(length, cfg) != n_frames:
        raise ValueError(
            f"length must give {n_frames} frames, i.e. lie in [{(n_frames - 1) * cfg.hop_length}, "
            f"{n_frames * cfg.hop_length - 1}]; got {length}"
        )
    if int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be a non-negative integer, got {n_iter!r}")
    if isinstance(momentum, int | float) and not 0 <= momentum < 1:  # (may be traced)
        raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
    S = S.astype(jnp.result_type(S.dtype, jnp.float32))
    tiny = jnp.finfo(S.dtype).tiny

    def project_magnitude(t):
        return S * t / jnp.maximum(jnp.abs(t), tiny)

    def project_consistent(t):
        return stft(istft(t, cfg, length), cfg)

    phase = jax.random.uniform(jax.random.key(seed), S.shape, S.dtype, 0.0, 2.0 * jnp.pi)
    t_0 = S * jnp.exp(1j * phase)

    def step(_, carry):
        t, c_prev = carry
        c = project_consistent(project_magnitude(t))
        return c + momentum * (c - c_prev), c

    t, _ = jax.lax.fori_loop(0, int(n_iter), step, (t_0, t_0))
    return istft(project_magnitude(t), cfg, length)


def griffin_lim(
    log_mel_spec: jax.Array,
    cfg: MelConfig,
    *,
    n_iter: int = 32,
    seed: int = 0,
    momentum: float = 0.99,
    length: int | None = None,
) -> jax.Array:
    """Waveform from a :func:`log_mel` spectrogram: :func:`mel_to_linear` (pseudo-inverse of the
    filterbank, clipped at 0), then :func:`griffin_lim_linear` (a vocoder-free baseline).

    Args:
      log_mel_spec: (..., F, n_mels) log10 mel magnitudes.
      cfg: the STFT / mel settings.
      n_iter: Griffin-Lim iterations.
      seed: seed of the random initial phase.
      momentum: fast Griffin-Lim's momentum (0: the original algorithm).
      length: output samples; default ``(F - 1) * hop_length``.

    Returns:
      (..., length) waveform.
    """
    return griffin_lim_linear(
        mel_to_linear(log_mel_spec, cfg),
        cfg,
        n_iter=n_iter,
        seed=seed,
        momentum=momentum,
        length=length,
    )


# ------------------------------------------------------------------ .wav files


def read_wav(path: str | os.PathLike, *, sample_rate: int) -> np.ndarray:
    """Reads a mono 16-bit PCM ``.wav`` file (stdlib ``wave``), refusing other formats.

    Args:
      path: the file.
      sample_rate: the rate the file must have (nothing is resampled).

    Returns:
      (T,) float32 samples ``int16 / 32768`` in ``[-1, 1)``.
    """
    path = os.fspath(path)
    try:
        with wave.open(path, "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            data = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as e:
        raise ValueError(f"cannot read path={path!r} as a PCM .wav file: {e}") from e
    if channels != 1:
        raise ValueError(f"path={path!r} has {channels} channels; expected 1 (mono)")
    if width != 2:
        raise ValueError(f"path={path!r} has {8 * width}-bit samples; expected 16-bit PCM")
    if rate != sample_rate:
        raise ValueError(
            f"path={path!r} has a sample rate of {rate} Hz; expected sample_rate={sample_rate} "
            "Hz (resample the file)"
        )
    return np.frombuffer(data, "<i2").astype(np.float32) / np.float32(32768.0)


def write_wav(path: str | os.PathLike, wav: np.ndarray, sample_rate: int) -> None:
    """Writes a mono 16-bit PCM ``.wav`` file: ``wav`` clipped to ``[-1, 1]``, times 32768,
    rounded (and 1.0 saturated to 32767), so that :func:`read_wav` reads back the samples to
    within ``0.5 / 32768``.

    Args:
      path: the file (overwritten).
      wav: (T,) float waveform.
      sample_rate: samples per second.
    """
    x = np.asarray(wav, np.float64)
    if x.ndim != 1:
        raise ValueError(f"wav must have shape (T,), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"wav must be finite, got {np.sum(~np.isfinite(x))} non-finite values")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    pcm = np.clip(np.round(np.clip(x, -1.0, 1.0) * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.tobytes())
