"""Speech features and mel metrics against independent references: a per-frame numpy STFT with
a filterbank built here from Slaney's formulas, Parseval for the energy, pure tones for YIN,
spectral convergence for Griffin-Lim, scikit-image for SSIM."""

import math
import time
import wave

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from skimage.metrics import structural_similarity

from dpm.data import (
    MelConfig,
    energy,
    f0,
    griffin_lim,
    griffin_lim_linear,
    interpolate_f0,
    istft,
    linear_magnitude,
    log_mel,
    mel_filterbank,
    num_frames,
    read_wav,
    stft,
    write_wav,
)
from dpm.metrics import mel_l1, mel_sharpness, mel_ssim, real_time_factor

CFG = MelConfig()
SR = CFG.sample_rate


def _tone(freq, seconds, amplitude=0.5, sr=SR, phase=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return amplitude * np.sin(2 * np.pi * freq * t + phase)


def _chirp_and_tone(num_samples, sr=SR):
    t = np.arange(num_samples) / sr
    chirp = np.sin(2 * np.pi * (150.0 * t + 2000.0 * t**2))  # 150 Hz rising at 4 kHz / s
    return 0.3 * chirp + 0.2 * np.sin(2 * np.pi * 330.0 * t)


# ------------------------------------------------------------------ references


def _slaney_hz_to_mel(f):
    return 3.0 * f / 200.0 if f < 1000.0 else 15.0 + 27.0 * math.log(f / 1000.0) / math.log(6.4)


def _slaney_mel_to_hz(m):
    return 200.0 * m / 3.0 if m < 15.0 else 1000.0 * 6.4 ** ((m - 15.0) / 27.0)


def _reference_edges(cfg):
    lo, hi = _slaney_hz_to_mel(cfg.fmin), _slaney_hz_to_mel(cfg.fmax)
    step = (hi - lo) / (cfg.n_mels + 1)
    return [_slaney_mel_to_hz(lo + i * step) for i in range(cfg.n_mels + 2)]


def _reference_filterbank(cfg):
    """Triangles between Slaney mel edges, each scaled to unit area, bin by bin."""
    edges = _reference_edges(cfg)
    fb = np.zeros((cfg.n_fft // 2 + 1, cfg.n_mels))
    for m in range(cfg.n_mels):
        left, centre, right = edges[m], edges[m + 1], edges[m + 2]
        height = 2.0 / (right - left)
        for k in range(cfg.n_fft // 2 + 1):
            f = k * cfg.sample_rate / cfg.n_fft
            if left < f <= centre:
                fb[k, m] = height * (f - left) / (centre - left)
            elif centre < f < right:
                fb[k, m] = height * (right - f) / (right - centre)
    return fb


def _reference_log_mel(x, cfg):
    """Per-frame loop: centre padding, periodic Hann window zero-padded to n_fft, rfft."""
    n = np.arange(cfg.win_length)
    hann = 0.5 * (1.0 - np.cos(2.0 * np.pi * n / cfg.win_length))
    window = np.zeros(cfg.n_fft)
    offset = (cfg.n_fft - cfg.win_length) // 2
    window[offset : offset + cfg.win_length] = hann
    padded = np.pad(x, cfg.n_fft // 2, mode=cfg.pad_mode)
    fb = _reference_filterbank(cfg)
    rows = []
    i = 0
    while i * cfg.hop_length + cfg.n_fft <= padded.size:
        frame = padded[i * cfg.hop_length : i * cfg.hop_length + cfg.n_fft]
        magnitude = np.abs(np.fft.rfft(frame * window))
        rows.append(np.log10(np.maximum(magnitude @ fb, cfg.log_floor)))
        i += 1
    return np.array(rows)


def _spectral_convergence(wav, magnitude, cfg):
    got = np.asarray(linear_magnitude(wav, cfg))
    return np.linalg.norm(got - magnitude) / np.linalg.norm(magnitude)


def _dominant_frequency(wav, sr):
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(wav.size), 16 * wav.size))
    return np.argmax(spectrum) * sr / (16 * wav.size)


# ------------------------------------------------------------------ config and filterbank


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(n_fft=0), "n_fft"),
        (dict(n_fft=1023, win_length=1000), "n_fft must be even"),
        (dict(hop_length=2.5), "hop_length"),
        (dict(win_length=2048), "win_length"),
        (dict(fmin=8000.0, fmax=7600.0), "fmin"),
        (dict(fmax=12000.0), "11025"),
        (dict(log_floor=0.0), "log_floor"),
        (dict(pad_mode="edge"), "pad_mode"),
    ],
)
def test_mel_config_refuses_bad_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MelConfig(**kwargs)


def test_filterbank_matches_slaney_formulas_and_band_limits():
    fb = mel_filterbank(CFG)
    assert fb.shape == (CFG.n_fft // 2 + 1, CFG.n_mels) and fb.dtype == np.float32
    np.testing.assert_allclose(fb, _reference_filterbank(CFG), rtol=1e-5, atol=1e-9)
    # the break points of Slaney's scale: 1 kHz is mel 15, 6.4 kHz is mel 42
    assert _slaney_hz_to_mel(1000.0) == pytest.approx(15.0)
    assert _slaney_hz_to_mel(6400.0) == pytest.approx(42.0)
    freqs = np.arange(fb.shape[0]) * SR / CFG.n_fft
    edges = np.array(_reference_edges(CFG))
    width = edges[2:] - edges[:-2]
    # area normalisation: no weight exceeds the triangle's height 2 / (f_{m+2} - f_m), the
    # peak comes within one bin's slope of it, and the sampled area is about one
    height = 2.0 / width
    bin_hz = SR / CFG.n_fft
    assert np.all(fb.max(axis=0) <= height * (1 + 1e-6))
    assert np.all(fb.max(axis=0) >= height * (1 - 2 * bin_hz / (width / 2)))
    wide = width > 8 * bin_hz
    np.testing.assert_allclose(fb.sum(axis=0)[wide] * bin_hz, 1.0, atol=0.01)
    # every non-zero weight lies inside [fmin, fmax]; every band has one
    nonzero = freqs[np.any(fb > 0, axis=1)]
    assert nonzero.min() >= CFG.fmin and nonzero.max() <= CFG.fmax
    assert np.all(fb.max(axis=0) > 0)


# ------------------------------------------------------------------ STFT, log-mel, energy


@pytest.mark.parametrize(
    "cfg",
    [
        CFG,
        MelConfig(sample_rate=16000, n_fft=1024, win_length=800, hop_length=200, n_mels=40,
                  fmin=0.0, fmax=8000.0, pad_mode="constant"),
    ],
)
def test_log_mel_matches_a_per_frame_numpy_reference(cfg, x64):
    x = _chirp_and_tone(6007, cfg.sample_rate)
    x[:700] = 0.0  # exercises the floor
    got = np.asarray(log_mel(jnp.asarray(x), cfg))
    ref = _reference_log_mel(x, cfg)
    assert got.shape == ref.shape == (1 + 6007 // cfg.hop_length, cfg.n_mels)
    assert got.shape[0] == num_frames(6007, cfg)
    assert got.min() == pytest.approx(math.log10(cfg.log_floor))
    # the filterbank is float32 (5e-8 relative), the rest float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_features_share_the_frame_count_and_batch():
    features = jit(lambda wav: (log_mel(wav, CFG), energy(wav, CFG), stft(wav, CFG)))
    for T in (4000, 4351):
        x = _chirp_and_tone(T).astype(np.float32)
        n = 1 + T // CFG.hop_length
        chex.assert_shape(features(x), [(n, CFG.n_mels), (n,), (n, CFG.n_fft // 2 + 1)])
        assert f0(x, CFG)[0].shape == (n,)
    pair = np.stack([_chirp_and_tone(4000), 0.5 * _chirp_and_tone(4000)]).astype(np.float32)
    batch = np.asarray(features(pair)[0])
    assert batch.shape == (2, 1 + 4000 // CFG.hop_length, CFG.n_mels)
    np.testing.assert_allclose(batch[1], np.asarray(features(pair[1])[0]), atol=1e-5)
    with pytest.raises(ValueError, match="wav must hold more than"):
        log_mel(np.zeros(100, np.float32), CFG)


def test_log_mel_jits_once_per_shape():
    @jit
    @chex.assert_max_traces(n=1)
    def features(wav, cfg):
        return log_mel(wav, cfg), energy(wav, cfg)

    a = features(jnp.asarray(_chirp_and_tone(3000), jnp.float32), CFG)
    b = features(jnp.asarray(_tone(440.0, 3000 / SR), jnp.float32), CFG)
    chex.assert_shape([a[0], b[0]], (1 + 3000 // 256, 80))
    assert not np.allclose(a[0], b[0])


def test_energy_of_a_sine_is_parsevals_value(x64):
    # one-sided sum |X_k|^2 = (N / 2) sum_n (x_n w_n)^2 = (N / 2)(A^2 / 2)(3N / 8) for a sine
    # away from DC and Nyquist under a periodic Hann window of N samples
    amplitude, N = 0.3, CFG.n_fft
    for freq in (437.3, 3000.0):
        e = np.asarray(energy(jnp.asarray(_tone(freq, 0.4, amplitude)), CFG))
        np.testing.assert_allclose(e[3:-3], amplitude * N * math.sqrt(3.0 / 32.0), rtol=1e-6)


# ------------------------------------------------------------------ pitch


@pytest.mark.parametrize("freq", [100.0, 220.0, 440.0])
def test_f0_of_pure_tones(freq):
    f0_hz, voiced = f0(_tone(freq, 1.0), CFG)
    middle = voiced[5:-5]
    assert middle.mean() >= 0.9
    np.testing.assert_allclose(f0_hz[voiced], freq, rtol=0.01)
    assert np.all(f0_hz[~voiced] == 0)
    # away from the ends the parabolic interpolation is far finer than a lag (0.2% at 440 Hz)
    np.testing.assert_allclose(f0_hz[5:-5], freq, rtol=1e-4)


def test_f0_of_a_tone_with_harmonics():
    t = np.arange(SR) / SR
    x = sum(a * np.sin(2 * np.pi * k * 150.0 * t + k) for k, a in [(1, 1), (2, .8), (3, .5)])
    f0_hz, voiced = f0(0.3 * x, CFG)
    assert voiced[5:-5].mean() >= 0.9
    np.testing.assert_allclose(f0_hz[voiced], 150.0, rtol=0.01)


def test_f0_silence_and_quiet_frames_are_unvoiced():
    tone = _tone(200.0, 0.5)
    assert not f0(np.zeros(SR), CFG)[1].any()
    assert f0(0.1 * np.random.default_rng(0).standard_normal(SR), CFG)[1].mean() <= 0.1
    # a tone 74 dB below the loud one: periodic (YIN alone calls it voiced) but "silent"
    quiet = 1e-4 * _tone(200.0, 0.5)
    x = np.concatenate([tone, quiet, tone])
    _, voiced = f0(x, CFG)
    # frames whose integration window (c +- 512) lies in the quiet part; with the lags (up to
    # ceil(sr / fmin) + 1 = 369 samples) too, for the check that YIN alone calls them voiced
    first = math.ceil((tone.size + 512) / 256)
    inside = slice(first, (2 * tone.size - 512) // 256 + 1)
    assert not voiced[inside].any()
    assert voiced[5:tone.size // 256 - 3].all() and voiced[-(tone.size // 256) + 5 : -5].all()
    periodic = slice(first, (2 * tone.size - 512 - 369) // 256 + 1)
    assert f0(x, CFG, silence=0.0)[1][periodic].all()


def test_f0_is_fast():
    t = np.arange(5 * SR) / SR
    x = 0.3 * (np.sin(2 * np.pi * 120 * t) + 0.5 * np.sin(2 * np.pi * 240 * t))
    f0(x[:SR], CFG)
    start = time.perf_counter()
    f0(x, CFG)
    assert time.perf_counter() - start < 1.0


def test_interpolate_f0_exact_on_a_toy_case():
    f = np.array([0, 100, 0, 0, 130, 0, 0], np.float32)
    v = f > 0
    np.testing.assert_array_equal(interpolate_f0(f, v), [100, 100, 110, 120, 130, 130, 130])
    np.testing.assert_array_equal(interpolate_f0(f, np.zeros(7, bool)), np.zeros(7))
    with pytest.raises(ValueError, match="share a shape"):
        interpolate_f0(f, v[:3])


@pytest.mark.parametrize(
    "kwargs, needle",
    [(dict(fmin=0.0), "fmin"), (dict(fmax=20000.0), "fmax"), (dict(threshold=1.5), "threshold")],
)
def test_f0_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        f0(_tone(200.0, 0.1), CFG, **kwargs)


# ------------------------------------------------------------------ inversion


@pytest.mark.parametrize(
    "cfg, T",
    [(CFG, 5000), (MelConfig(sample_rate=16000, n_fft=512, win_length=400, hop_length=100,
                             fmax=8000.0), 4321)],
)
def test_istft_inverts_stft(cfg, T, x64):
    x = np.random.default_rng(0).standard_normal((2, T))
    back = np.asarray(istft(stft(jnp.asarray(x), cfg), cfg, T))
    np.testing.assert_allclose(back, x, atol=1e-10)


def test_griffin_lim_converges_from_the_true_magnitude():
    T = SR // 2
    x = _chirp_and_tone(T).astype(np.float32)
    S = np.asarray(linear_magnitude(x, CFG))
    phase = np.exp(2j * np.pi * np.random.default_rng(0).random(S.shape))
    start = _spectral_convergence(istft(S * phase, CFG, T), S, CFG)
    run = jit(lambda momentum: griffin_lim_linear(S, CFG, n_iter=32, momentum=momentum, length=T))
    fast = _spectral_convergence(run(0.99), S, CFG)
    plain = _spectral_convergence(run(0.0), S, CFG)
    assert fast < plain < 0.5 * start
    assert fast < 0.3 * start
    with pytest.raises(ValueError, match="length"):
        griffin_lim_linear(S, CFG, length=T + 300)


def test_griffin_lim_from_log_mel_keeps_the_pitch():
    spec = log_mel(_tone(440.0, 0.5).astype(np.float32), CFG)
    wav = np.asarray(jax.jit(griffin_lim)(spec, CFG))
    assert wav.shape == ((spec.shape[0] - 1) * CFG.hop_length,)
    assert _dominant_frequency(wav, SR) == pytest.approx(440.0, rel=0.01)


# ------------------------------------------------------------------ .wav files


def test_wav_round_trip(tmp_path):
    x = np.random.default_rng(0).uniform(-1.0, 1.0, 3000).astype(np.float32)
    x[:2] = [1.5, -1.5]  # clipped
    path = tmp_path / "a.wav"
    write_wav(path, x, SR)
    back = read_wav(path, sample_rate=SR)
    assert back.dtype == np.float32 and back.shape == x.shape
    np.testing.assert_allclose(back[2:], x[2:], atol=0.5 / 32768 + 1e-7)
    np.testing.assert_allclose(back[:2], [32767 / 32768, -1.0])
    write_wav(path, back, SR)
    np.testing.assert_array_equal(read_wav(str(path), sample_rate=SR), back)


def _write_raw(path, channels, width, rate):
    with wave.open(str(path), "wb") as f:
        f.setnchannels(channels)
        f.setsampwidth(width)
        f.setframerate(rate)
        f.writeframes(bytes(channels * width * 100))


@pytest.mark.parametrize(
    "channels, width, rate, needles",
    [
        (1, 2, 16000, ["16000", "22050"]),
        (2, 2, 22050, ["2 channels", "mono"]),
        (1, 1, 22050, ["8-bit", "16-bit"]),
    ],
)
def test_read_wav_refuses_other_formats(tmp_path, channels, width, rate, needles):
    path = tmp_path / "bad.wav"
    _write_raw(path, channels, width, rate)
    with pytest.raises(ValueError) as info:
        read_wav(path, sample_rate=SR)
    for needle in [str(path), *needles]:
        assert needle in str(info.value)


def test_read_wav_refuses_a_file_that_is_not_wav(tmp_path):
    path = tmp_path / "text.wav"
    path.write_text("not a wav file")
    with pytest.raises(ValueError, match="text.wav"):
        read_wav(path, sample_rate=SR)


# ------------------------------------------------------------------ metrics


def _mels(rng, B=2, F=40, M=24):
    t = np.arange(F)[None, :, None]
    f = np.arange(M)[None, None, :]
    base = np.sin(0.3 * t + 0.5 * f) + 0.2 * rng.standard_normal((B, F, M))
    return base.astype(np.float32), (base + 0.3 * rng.standard_normal((B, F, M))).astype(
        np.float32
    )


def test_mel_metrics_ignore_padded_frames():
    rng = np.random.default_rng(0)
    pred, target = _mels(rng)
    mask = np.ones((2, 40), np.float32)
    mask[0, 30:] = 0
    mask[1, 25:] = 0
    metrics = jit(lambda p, t, m: (
        mel_l1(p, t, m), mel_ssim(p, t, m, data_range=4.0), mel_sharpness(p, m)
    ))
    l1, s, sharp = metrics(pred, target, mask)
    pred2, target2 = pred.copy(), target.copy()
    pred2[mask == 0] = 1e6
    target2[mask == 0] = np.nan
    l1_2, s_2, sharp_2 = metrics(pred2, target2, mask)
    np.testing.assert_allclose(l1_2, l1, rtol=1e-6)
    np.testing.assert_allclose(s_2, s, rtol=1e-6)
    for k, v in sharp_2.items():
        np.testing.assert_allclose(v, sharp[k], rtol=1e-6)
    # the real frames do count: L1 is the mean over them only, SSIM depends on them
    np.testing.assert_allclose(l1[0], np.abs(pred - target)[0, :30].mean(), rtol=1e-5)
    l1_all, s_all, _ = metrics(pred, target, np.ones_like(mask))
    assert not np.allclose(l1_all, l1) and not np.allclose(s_all, s)


def test_mel_l1_closed_form():
    target = np.zeros((1, 12, 5), np.float32)
    mask = np.ones((1, 12))
    np.testing.assert_allclose(mel_l1(target + 0.5, target, mask), [0.5])


def test_mel_ssim_identity_and_scikit_image():
    rng = np.random.default_rng(1)
    pred, target = _mels(rng)
    mask = np.ones((2, 40))
    score = jit(lambda p, t, m: mel_ssim(p, t, m, data_range=4.0))
    np.testing.assert_allclose(score(target, target, mask), 1.0, rtol=1e-6)
    got = np.asarray(score(pred, target, mask))
    for i in range(2):
        ref = structural_similarity(
            pred[i].astype(np.float64), target[i].astype(np.float64), data_range=4.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        )
        np.testing.assert_allclose(got[i], ref, atol=1e-4)
    assert np.all(got < 0.99)
    with pytest.raises(ValueError, match="win_size"):
        mel_ssim(pred[:, :8], target[:, :8], mask[:, :8], data_range=4.0)


def test_mel_sharpness_closed_form_and_blur():
    F, M = 30, 20
    ramp = (0.25 * np.arange(M)[None, :] - 0.1 * np.arange(F)[:, None])[None].astype(np.float32)
    mask = np.ones((1, F), np.float32)
    sharpness = jit(mel_sharpness)
    sharp = sharpness(ramp, mask)
    np.testing.assert_allclose(sharp["df"], [0.25], rtol=1e-5)
    np.testing.assert_allclose(sharp["dt"], [0.1], rtol=1e-5)

    rng = np.random.default_rng(2)
    mel = rng.standard_normal((1, F, M)).astype(np.float32)
    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    blur_t = np.apply_along_axis(lambda v: np.convolve(v, kernel, "same"), 1, mel)
    blur_f = np.apply_along_axis(lambda v: np.convolve(v, kernel, "same"), 2, mel)
    base = sharpness(mel, mask)
    assert sharpness(blur_t, mask)["dt"][0] < 0.7 * base["dt"][0]
    assert sharpness(blur_f, mask)["df"][0] < 0.7 * base["df"][0]


def test_real_time_factor():
    assert real_time_factor(2.0, 44100, 22050) == pytest.approx(1.0)
    assert real_time_factor(0.5, 22050, 22050) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_samples"):
        real_time_factor(1.0, 0, 22050)
    with pytest.raises(ValueError, match="seconds"):
        real_time_factor(-1.0, 100, 22050)
    with pytest.raises(ValueError, match="sample_rate"):
        real_time_factor(1.0, 100, 0)
