"""Speech for mel-spectrogram TTS (FastSpeech 2, ProDiff): sentences rendered by espeak-ng with
the synthesizer's own phoneme timing, phoneme vocabularies, per-phoneme frame durations,
monotonic alignment search, and LJSpeech-format corpora with their frame-wise features.

Rendering drives ``libespeak-ng`` through ``ctypes``: the synthesizer reports the sample at
which each phoneme starts (``espeakEVENT_PHONEME``), so the durations of a rendered corpus are
the ones the audio was generated from, exact to a sample. A folder of real speech (LJSpeech)
has no such timing; :func:`load_ljspeech` then aligns its phonemes to the mel frames by
:func:`align_by_templates` (flat-start Viterbi training with Glow-TTS's monotonic alignment
search). That is an estimate: on the 300-sentence rendered corpus it puts 34% of the phoneme
boundaries on espeak's frame, 77% within one frame and 86% within two (mean error 1.2 frames),
forces every phoneme to at least one frame (espeak gives 3% of them none) and confuses
acoustically similar neighbours; so the builder of the rendered corpus stores espeak's timing in
``alignments.json`` and the loader prefers it.

Token conventions: phonemes are espeak's mnemonics (``"h"``, ``"@"``, ``"oU"``, ...); every
stretch of silence (the start, clause pauses at commas and full stops, the end) is the single
pause token ``"_"`` (:data:`PAUSE`), and an utterance always begins and ends with one, so the
phonemes tile the whole waveform. :func:`phonemize` is :func:`render`'s tokenization, so the
phonemes of new text at synthesis time are those the model was trained on.

Example:
  >>> utt = render("Hello there, how are you?")          # needs espeak-ng
  >>> utt.phonemes[:5], utt.boundaries[:3]              # ('_', 'h', '@', 'l', 'oU'), [0 264 1384]
  >>> corpus = load_ljspeech("runs/speech")             # experiments.speech_corpus builds it
  >>> it = BatchIterator(corpus.padded(), 16, seed=0)   # fixed-shape batches
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

import numpy as np

from dpm.data.audio import (
    MelConfig,
    energy,
    f0,
    interpolate_f0,
    log_mel,
    num_frames,
    read_wav,
)

__all__ = [
    "PAD",
    "PAUSE",
    "PhonemeVocab",
    "SpeechCorpus",
    "Utterance",
    "align_by_templates",
    "durations_from_boundaries",
    "espeak_available",
    "espeak_version",
    "load_ljspeech",
    "monotonic_alignment_search",
    "phonemize",
    "render",
]

PAUSE = "_"
PAD = "<pad>"

# ------------------------------------------------------------------ espeak-ng through ctypes

# speak_lib.h (API revision 12, espeak-ng 1.51)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_INITIALIZE_DONT_EXIT = 0x8000  # return an error instead of exit() when the data is missing
_EVENT_LIST_TERMINATED = 0
_EVENT_PHONEME = 7
_CHARS_UTF8 = 1
_POS_CHARACTER = 1
_PARAM_RATE = 1
_RATE_RANGE = (80, 450)  # espeakRATE_MINIMUM, espeakRATE_MAXIMUM (words per minute)

_MISSING = (
    "espeak-ng is not installed (its library libespeak-ng could not be loaded); install it "
    "with `apt-get install espeak-ng` (Debian / Ubuntu) or `brew install espeak-ng` (macOS)"
)


class _EventId(ctypes.Union):
    _fields_ = [
        ("number", ctypes.c_int),  # WORD and SENTENCE events
        ("name", ctypes.c_char_p),  # MARK and PLAY events
        ("string", ctypes.c_char * 8),  # PHONEME events: the mnemonic, NUL-terminated if < 8
    ]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds
        ("sample", ctypes.c_int),  # samples since the start of this espeak_Synth call
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event)
)

# espeak-ng keeps its state in C globals: one synthesis at a time per process
_LOCK = threading.Lock()


@functools.cache
def _library_path() -> str | None:
    """A loadable name of libespeak-ng, or None."""
    candidates = ["libespeak-ng.so.1", "libespeak-ng.so", "libespeak-ng.1.dylib"]
    found = ctypes.util.find_library("espeak-ng")
    if found:
        candidates.append(found)
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        _dlclose(lib)
        return name
    return None


def _dlclose(lib: ctypes.CDLL) -> None:
    import _ctypes

    close = getattr(_ctypes, "dlclose", None) or getattr(_ctypes, "FreeLibrary", None)
    close(lib._handle)


def espeak_available() -> bool:
    """Whether the espeak-ng library can be loaded (``apt-get install espeak-ng``)."""
    return _library_path() is not None


@contextlib.contextmanager
def _fresh_engine() -> Iterator[tuple[ctypes.CDLL, int]]:
    """A freshly loaded and initialized libespeak-ng: ``(library, sample_rate)``.

    espeak-ng keeps synthesis state in C statics that no API call resets (its wave generator's
    pitch-flutter index and phase run on from one utterance into the next), so the same text
    rendered twice in one process would differ by a few samples. Loading the library afresh for
    every utterance (``dlopen`` after ``dlclose`` re-initializes the statics; ~10 ms) makes
    rendering a pure function of its arguments. Callers hold ``_LOCK``.
    """
    path = _library_path()
    if path is None:
        raise RuntimeError(_MISSING)
    lib = ctypes.CDLL(path)
    try:
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        lib.espeak_Info.argtypes = [ctypes.c_void_p]
        lib.espeak_Info.restype = ctypes.c_char_p
        sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, None, _INITIALIZE_PHONEME_EVENTS | _INITIALIZE_DONT_EXIT
        )
        if sample_rate <= 0:
            raise RuntimeError(
                f"espeak-ng could not be initialized (espeak_Initialize returned {sample_rate}): "
                "its data folder espeak-ng-data is missing; reinstall it with "
                "`apt-get install --reinstall espeak-ng-data`"
            )
        try:
            yield lib, int(sample_rate)
        finally:
            lib.espeak_Terminate()
    finally:
        _dlclose(lib)


def espeak_version() -> str:
    """The version of the installed espeak-ng (e.g. ``"1.51"``); RuntimeError if it is missing."""
    with _LOCK, _fresh_engine() as (lib, _):
        return lib.espeak_Info(None).decode("utf-8", "replace").split()[0]


def _synthesize(text: str, voice: str, rate: int) -> tuple[np.ndarray, list[tuple], int]:
    """espeak-ng's int16 samples, its events ``(type, sample, audio_position_ms, name)`` and
    its sample rate."""
    chunks: list[np.ndarray] = []
    events: list[tuple] = []

    def callback(wav, num_samples, event_list):
        if wav and num_samples > 0:
            chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while event_list[i].type != _EVENT_LIST_TERMINATED:
            e = event_list[i]
            name = e.id.string.decode("utf-8", "replace") if e.type == _EVENT_PHONEME else None
            events.append((e.type, e.sample, e.audio_position, name))
            i += 1
        return 0  # continue

    c_callback = _SynthCallback(callback)
    data = text.encode("utf-8") + b"\0"
    with _LOCK, _fresh_engine() as (lib, sample_rate):
        lib.espeak_SetSynthCallback(c_callback)
        if lib.espeak_SetVoiceByName(voice.encode("utf-8")) != 0:
            raise ValueError(
                f"voice={voice!r} is not an espeak-ng voice (list them with `espeak-ng --voices`)"
            )
        lib.espeak_SetParameter(_PARAM_RATE, int(rate), 0)
        err = lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err} on text={text!r:.80}")
        lib.espeak_Synchronize()
    wav = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    return wav, events, sample_rate


def _check_text(text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string with something to speak, got {text!r}")
    return text.strip()


def _segments(
    starts: Sequence[int], names: Sequence[str], num_samples: int
) -> tuple[tuple[str, ...], np.ndarray]:
    """Phonemes tiling ``[0, num_samples)`` from phoneme start samples: pauses merged, a pause
    at both ends, pauses of zero length inside dropped."""
    starts = np.maximum.accumulate(np.clip(np.asarray(starts, np.int64), 0, num_samples))
    names = [PAUSE if n.startswith("_") else n for n in names]
    ends = np.append(starts[1:], num_samples)
    segments = [[PAUSE, 0, int(starts[0]) if len(starts) else num_samples]]
    segments += [[n, int(a), int(b)] for n, a, b in zip(names, starts, ends, strict=True)]
    segments.append([PAUSE, num_samples, num_samples])
    merged: list[list] = []
    for seg in segments:
        if merged and seg[0] == PAUSE and merged[-1][0] == PAUSE:
            merged[-1][2] = seg[2]
        else:
            merged.append(seg)
    kept = [
        s
        for k, s in enumerate(merged)
        if not (s[0] == PAUSE and s[1] == s[2] and 0 < k < len(merged) - 1)
    ]
    phonemes = tuple(s[0] for s in kept)
    boundaries = np.array([s[1] for s in kept] + [num_samples], np.int64)
    return phonemes, boundaries


@dataclasses.dataclass(frozen=True, eq=False)
class Utterance:
    """A rendered sentence and the timing of its phonemes.

    Attributes:
      text: the text spoken.
      wav: (T,) float32 waveform in ``[-1, 1)`` (espeak's int16 samples / 32768).
      sample_rate: samples per second (espeak-ng: 22050).
      phonemes: P phoneme symbols, beginning and ending with :data:`PAUSE`.
      boundaries: (P + 1,) int64 sample positions, non-decreasing, ``boundaries[0] = 0``,
        ``boundaries[-1] = T``: phoneme ``i`` spans samples ``[boundaries[i], boundaries[i+1])``.
    """

    text: str
    wav: np.ndarray
    sample_rate: int
    phonemes: tuple[str, ...]
    boundaries: np.ndarray


def render(text: str, *, voice: str = "en-us", rate: int = 175) -> Utterance:
    """Speaks ``text`` with espeak-ng and returns the audio and espeak's own phoneme timing.

    A phoneme's start is the ``sample`` of its ``espeakEVENT_PHONEME`` event (the synthesizer
    emits the event where it starts generating the phoneme; it agrees with ``audio_position``,
    in ms, to within a millisecond). Silences (before the first phoneme, clause pauses, the end)
    become the pause token ``"_"``. Rendering is deterministic: the same arguments give the same
    samples in any process and in any order of calls.

    Args:
      text: the sentence (UTF-8; not SSML).
      voice: an espeak-ng voice name (``espeak-ng --voices``).
      rate: speaking rate in words per minute, in ``[80, 450]``.

    Returns:
      the :class:`Utterance`.

    Raises:
      ValueError: empty text or text with nothing to speak, an unknown voice, a bad rate.
      RuntimeError: espeak-ng is not installed.
    """
    text = _check_text(text)
    if isinstance(rate, bool) or int(rate) != rate or not _RATE_RANGE[0] <= rate <= _RATE_RANGE[1]:
        raise ValueError(
            f"rate must be an integer in {list(_RATE_RANGE)} (words/minute), got {rate!r}"
        )
    samples, events, sample_rate = _synthesize(text, voice, int(rate))
    phones = [(s, n) for t, s, _, n in events if t == _EVENT_PHONEME]
    phonemes, boundaries = _segments([s for s, _ in phones], [n for _, n in phones], len(samples))
    if all(p == PAUSE for p in phonemes):
        raise ValueError(f"text={text!r} has nothing to speak (espeak-ng gave no phonemes)")
    wav = samples.astype(np.float32) / np.float32(32768.0)
    wav.flags.writeable = False
    boundaries.flags.writeable = False
    return Utterance(text, wav, sample_rate, phonemes, boundaries)


def phonemize(text: str, *, voice: str = "en-us", rate: int = 175) -> tuple[str, ...]:
    """The phonemes :func:`render` gives ``text`` (the same tokenization, pauses included).

    Args:
      text: the sentence.
      voice: the espeak-ng voice the training corpus was rendered with.
      rate: its speaking rate (whether a very short pause inside a sentence becomes a token
        can depend on the timing).

    Returns:
      the P phoneme symbols, beginning and ending with :data:`PAUSE`.

    Raises:
      ValueError: empty text or text with nothing to speak.
      RuntimeError: espeak-ng is not installed.
    """
    return render(text, voice=voice, rate=rate).phonemes


# ------------------------------------------------------------------ vocabulary


@dataclasses.dataclass(frozen=True)
class PhonemeVocab:
    """Phoneme symbols and their integer ids: ``0`` is padding, ``1`` the pause token.

    Attributes:
      symbols: all symbols by id; ``symbols[0] == "<pad>"``, ``symbols[1] == "_"``.
    """

    symbols: tuple[str, ...]
    pad_id: ClassVar[int] = 0
    pause_id: ClassVar[int] = 1

    def __post_init__(self):
        symbols = tuple(self.symbols)
        if symbols[:2] != (PAD, PAUSE):
            raise ValueError(f"symbols must begin with ({PAD!r}, {PAUSE!r}), got {symbols[:2]}")
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"symbols must be distinct, got {symbols}")
        if not all(isinstance(s, str) and s for s in symbols):
            raise ValueError(f"symbols must be non-empty strings, got {symbols}")
        object.__setattr__(self, "symbols", symbols)
        object.__setattr__(self, "_index", {s: i for i, s in enumerate(symbols)})

    def __len__(self) -> int:
        return len(self.symbols)

    @classmethod
    def from_corpus(cls, phoneme_lists: Iterable[Sequence[str]]) -> PhonemeVocab:
        """The vocabulary of the symbols in ``phoneme_lists`` (sorted after pad and pause)."""
        seen: set[str] = set()
        for phonemes in phoneme_lists:
            seen.update(phonemes)
        if PAD in seen:
            raise ValueError(f"phoneme_lists must not contain the padding symbol {PAD!r}")
        return cls((PAD, PAUSE, *sorted(seen - {PAUSE})))

    def encode(self, phonemes: Sequence[str], *, item: str | None = None) -> np.ndarray:
        """(P,) int32 ids of ``phonemes``; ValueError naming the unknown symbols (and ``item``)."""
        ids = [self._index.get(p, -1) for p in phonemes]
        if -1 in ids or self.pad_id in ids:
            unknown = sorted({p for p, i in zip(phonemes, ids, strict=True) if i <= 0})
            where = f"item {item!r}: " if item is not None else ""
            raise ValueError(
                f"{where}phoneme symbol(s) {unknown} are not in the vocabulary "
                f"({len(self)} symbols: {list(self.symbols[1:])})"
            )
        return np.asarray(ids, np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> tuple[str, ...]:
        """The symbols of ``ids``, padding (id 0) left out."""
        ids = np.asarray(ids).reshape(-1)
        bad = ids[(ids < 0) | (ids >= len(self))]
        if bad.size:
            raise ValueError(f"ids must lie in [0, {len(self)}), got {bad[:5].tolist()}")
        return tuple(self.symbols[i] for i in ids.tolist() if i != self.pad_id)

    def to_json(self) -> str:
        """The vocabulary as a JSON string (:meth:`from_json` reads it back)."""
        return json.dumps({"symbols": list(self.symbols)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> PhonemeVocab:
        """The vocabulary written by :meth:`to_json`."""
        return cls(tuple(json.loads(text)["symbols"]))


# ------------------------------------------------------------------ durations and alignment


def durations_from_boundaries(
    boundaries: Sequence[int] | np.ndarray, num_samples: int, hop_length: int
) -> np.ndarray:
    """Frames per phoneme for centred frames (frame ``j`` centred on sample ``j * hop_length``).

    Frame ``j`` belongs to the phoneme whose span ``[b_i, b_{i+1})`` holds its centre
    ``j * hop_length``; the last frame, centred on sample ``T`` when ``hop_length`` divides
    ``T``, belongs to the last phoneme. So phoneme ``i`` starts at frame ``ceil(b_i / hop)``,
    and the durations are ``>= 0`` and sum to exactly ``1 + T // hop_length``.

    Args:
      boundaries: (P + 1,) non-decreasing sample positions, first 0, last ``num_samples``.
      num_samples: ``T``, the length of the waveform.
      hop_length: samples between frame centres.

    Returns:
      (P,) int32 frame counts.
    """
    b = np.asarray(boundaries)
    if b.ndim != 1 or b.size < 2 or not np.issubdtype(b.dtype, np.integer):
        raise ValueError(f"boundaries must be a (P + 1,) integer array, P >= 1; got {b!r:.80}")
    if b[0] != 0 or b[-1] != num_samples or np.any(np.diff(b) < 0):
        raise ValueError(
            f"boundaries must be non-decreasing from 0 to num_samples={num_samples}, got "
            f"first {b[0]}, last {b[-1]}, {int(np.sum(np.diff(b) < 0))} decreasing steps"
        )
    if int(hop_length) != hop_length or hop_length <= 0:
        raise ValueError(f"hop_length must be a positive integer, got {hop_length!r}")
    starts = -(-b[:-1].astype(np.int64) // int(hop_length))  # ceil(b_i / hop)
    frame_bounds = np.append(starts, 1 + int(num_samples) // int(hop_length))
    return np.diff(frame_bounds).astype(np.int32)


def monotonic_alignment_search(log_p: np.ndarray) -> np.ndarray:
    """Glow-TTS's monotonic alignment search (Kim et al. 2020, Algorithm 1).

    The most likely monotone, surjective alignment of P phonemes to F frames: phoneme 0 holds
    frame 0, phoneme P-1 frame F-1, and each next frame holds the same phoneme or the next one.
    Dynamic programming ``Q[i, j] = log_p[i, j] + max(Q[i, j-1], Q[i-1, j-1])`` (vectorised
    over phonemes, one step per frame), then backtracking from ``(P-1, F-1)``.

    Args:
      log_p: (P, F) finite log-likelihoods of frame ``j`` under phoneme ``i``, ``P <= F``.

    Returns:
      (P,) int32 durations, each ``>= 1``, summing to F.
    """
    log_p = np.asarray(log_p, np.float64)
    if log_p.ndim != 2 or log_p.shape[0] < 1 or log_p.shape[0] > log_p.shape[1]:
        raise ValueError(f"log_p must have shape (P, F) with 1 <= P <= F, got {log_p.shape}")
    if not np.all(np.isfinite(log_p)):
        raise ValueError(f"log_p must be finite, got {int(np.sum(~np.isfinite(log_p)))} others")
    P, F = log_p.shape
    Q = np.full((P, F), -np.inf)
    Q[0, 0] = log_p[0, 0]
    for j in range(1, F):
        prev = Q[:, j - 1]
        best = prev.copy()
        np.maximum(prev[1:], prev[:-1], out=best[1:])
        Q[:, j] = best + log_p[:, j]
    durations = np.zeros(P, np.int32)
    i = P - 1
    for j in range(F - 1, -1, -1):
        durations[i] += 1
        # step to the previous phoneme when forced (i == j) or when it scores at least as well
        if i > 0 and (i == j or Q[i - 1, j - 1] >= Q[i, j - 1]):
            i -= 1
    return durations


def _uniform_durations(P: int, F: int) -> np.ndarray:
    return np.diff(np.round(np.linspace(0, F, P + 1)).astype(np.int64)).astype(np.int32)


def align_by_templates(
    phoneme_ids: Sequence[np.ndarray],
    mels: Sequence[np.ndarray],
    num_symbols: int,
    *,
    iterations: int = 5,
    min_variance: float = 1e-4,
) -> list[np.ndarray]:
    """Phoneme durations of untimed speech by flat-start Viterbi training.

    Start from uniform durations, then ``iterations`` times: fit one diagonal Gaussian per
    symbol to the mel frames it holds (a symbol holding none takes the mean and variance of all
    frames), and re-align every utterance by :func:`monotonic_alignment_search` under those
    templates. Good to a frame or two at most boundaries; timing from the synthesizer
    (:func:`render`) is exact and is preferred where there is any.

    Args:
      phoneme_ids: per utterance, (P_i,) integer symbol ids in ``[0, num_symbols)``.
      mels: per utterance, (F_i, M) frames (log-mel), ``F_i >= P_i``.
      num_symbols: size of the vocabulary.
      iterations: re-estimation rounds (>= 1).
      min_variance: floor of the template variances.

    Returns:
      per utterance, (P_i,) int32 durations, each ``>= 1``, summing to ``F_i``.
    """
    if len(phoneme_ids) != len(mels) or not mels:
        raise ValueError(
            f"phoneme_ids and mels must be non-empty lists of the same length, got "
            f"{len(phoneme_ids)} and {len(mels)}"
        )
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    ids = [np.asarray(p) for p in phoneme_ids]
    xs = [np.asarray(m, np.float64) for m in mels]
    M = xs[0].shape[-1]
    for k, (p, x) in enumerate(zip(ids, xs, strict=True)):
        if p.ndim != 1 or not np.issubdtype(p.dtype, np.integer) or p.size < 1:
            raise ValueError(
                f"phoneme_ids[{k}] must be a non-empty 1-D integer array, got {p!r:.60}"
            )
        if p.min() < 0 or p.max() >= num_symbols:
            raise ValueError(f"phoneme_ids[{k}] must lie in [0, num_symbols={num_symbols})")
        if x.ndim != 2 or x.shape[1] != M or x.shape[0] < p.size:
            raise ValueError(
                f"mels[{k}] must have shape (F, {M}) with F >= {p.size} phonemes, got {x.shape}"
            )
    frames = np.concatenate(xs)
    global_mean, global_var = frames.mean(0), np.maximum(frames.var(0), min_variance)
    durations = [_uniform_durations(p.size, x.shape[0]) for p, x in zip(ids, xs, strict=True)]
    for _ in range(int(iterations)):
        # M-step: one diagonal Gaussian per symbol
        labels = np.concatenate([np.repeat(p, d) for p, d in zip(ids, durations, strict=True)])
        counts = np.bincount(labels, minlength=num_symbols)
        has = counts > 0
        grouped = frames[np.argsort(labels, kind="stable")]
        starts = (np.cumsum(counts) - counts)[has]
        sums = np.zeros((num_symbols, M))
        squares = np.zeros((num_symbols, M))
        sums[has] = np.add.reduceat(grouped, starts, axis=0)
        squares[has] = np.add.reduceat(grouped * grouped, starts, axis=0)
        mean = np.where(has[:, None], sums / np.maximum(counts, 1)[:, None], global_mean)
        var = np.where(has[:, None], squares / np.maximum(counts, 1)[:, None] - mean**2, global_var)
        var = np.maximum(var, min_variance)
        # E-step (hard): re-align each utterance
        precision = 1.0 / var
        const = np.sum(mean * mean * precision + np.log(2 * np.pi * var), axis=1)
        durations = []
        for p, x in zip(ids, xs, strict=True):
            # -0.5 sum_m (x - mu)^2 / var + log(2 pi var), for the utterance's symbols
            quad = (x * x) @ precision[p].T - 2.0 * x @ (mean[p] * precision[p]).T
            durations.append(monotonic_alignment_search(-0.5 * (quad + const[p]).T))
    return durations


# ------------------------------------------------------------------ corpora


@functools.cache
def _features_fn():
    import jax

    return jax.jit(lambda wav, cfg: (log_mel(wav, cfg), energy(wav, cfg)))


_BUCKET = 16384  # waveforms are zero-padded to a multiple of this: few compiled shapes


def _mel_energy(wav: np.ndarray, cfg: MelConfig) -> tuple[np.ndarray, np.ndarray]:
    """``log_mel`` and ``energy`` of ``wav`` (the first ``1 + T // hop`` frames computed on the
    waveform extended by its own centre padding and zeros to a bucketed length: the same
    numbers, a handful of compiled shapes)."""
    T, half = wav.size, cfg.n_fft // 2
    ext = np.pad(wav, (0, half), mode=cfg.pad_mode)
    ext = np.pad(ext, (0, -ext.size % _BUCKET))
    mel, en = _features_fn()(ext, cfg)
    n = num_frames(T, cfg)
    # slice on the host: a jax slice would compile once per length
    return np.asarray(mel, np.float32)[:n].copy(), np.asarray(en, np.float32)[:n].copy()


@dataclasses.dataclass(eq=False)
class SpeechCorpus:
    """Utterances with phonemes, durations and frame-wise features (ragged, one entry each).

    Attributes:
      ids: utterance ids (``"LJ001-0001"``).
      texts: the texts spoken.
      phonemes: (P_i,) int32 phoneme ids (of ``vocab``).
      durations: (P_i,) int32 frames per phoneme, summing to ``F_i``.
      mels: (F_i, n_mels) float32 log10-mel spectrograms (:func:`dpm.data.audio.log_mel`).
      f0: (F_i,) float32 pitch in Hz, 0 where unvoiced.
      voiced: (F_i,) bool voicing flags.
      energy: (F_i,) float32 frame energy (:func:`dpm.data.audio.energy`).
      vocab: the phoneme vocabulary.
      mel_config: the STFT / mel settings of the features.
    """

    ids: list[str]
    texts: list[str]
    phonemes: list[np.ndarray]
    durations: list[np.ndarray]
    mels: list[np.ndarray]
    f0: list[np.ndarray]
    voiced: list[np.ndarray]
    energy: list[np.ndarray]
    vocab: PhonemeVocab
    mel_config: MelConfig

    def __post_init__(self):
        n = len(self.ids)
        lists = ("texts", "phonemes", "durations", "mels", "f0", "voiced", "energy")
        lengths = {k: len(getattr(self, k)) for k in lists}
        if any(v != n for v in lengths.values()):
            raise ValueError(f"all per-utterance lists must have len(ids)={n}, got {lengths}")
        for k in range(n):
            F = self.mels[k].shape[0]
            if self.mels[k].shape != (F, self.mel_config.n_mels):
                raise ValueError(f"item {self.ids[k]!r}: mel shape {self.mels[k].shape}")
            if self.durations[k].shape != self.phonemes[k].shape:
                raise ValueError(f"item {self.ids[k]!r}: durations and phonemes differ in length")
            if int(self.durations[k].sum()) != F:
                raise ValueError(
                    f"item {self.ids[k]!r}: durations sum to {int(self.durations[k].sum())}, "
                    f"not to its {F} frames"
                )
            for name in ("f0", "voiced", "energy"):
                if getattr(self, name)[k].shape != (F,):
                    raise ValueError(f"item {self.ids[k]!r}: {name} does not have shape ({F},)")

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int] | np.ndarray) -> SpeechCorpus:
        """The utterances at ``indices`` (in that order)."""
        idx = [int(i) for i in np.asarray(indices, np.int64).reshape(-1)]
        pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
        return SpeechCorpus(
            pick(self.ids),
            pick(self.texts),
            pick(self.phonemes),
            pick(self.durations),
            pick(self.mels),
            pick(self.f0),
            pick(self.voiced),
            pick(self.energy),
            self.vocab,
            self.mel_config,
        )

    def split(self, test_fraction: float, seed: int = 0) -> tuple[SpeechCorpus, SpeechCorpus]:
        """Deterministic train / test parts: the test part is the first
        ``round(test_fraction * N)`` indices of a permutation seeded by ``seed``, in ascending
        order (as :func:`dpm.data.train_test_split`)."""
        if not 0.0 <= float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
        n_test = int(round(float(test_fraction) * len(self)))
        perm = np.random.default_rng(seed).permutation(len(self))
        return self.subset(np.sort(perm[n_test:])), self.subset(np.sort(perm[:n_test]))

    def padded(
        self, max_phonemes: int | None = None, max_frames: int | None = None
    ) -> dict[str, np.ndarray]:
        """The corpus as fixed-shape arrays (for :class:`dpm.data.BatchIterator`).

        Padding is 0 everywhere (phoneme id 0 is padding); the masks are 1 on real phonemes /
        frames and 0 exactly on the padding.

        Args:
          max_phonemes: P, default the longest utterance's phoneme count.
          max_frames: F, default the longest utterance's frame count.

        Returns:
          ``phonemes (N, P) int32, phone_mask (N, P) float32, durations (N, P) int32,
          num_phonemes (N,) int32, mel (N, F, n_mels) float32, frame_mask (N, F) float32,
          log_f0 (N, F) float32`` (log of the pitch interpolated through unvoiced frames; 0 for
          an utterance without voiced frames), ``uv (N, F) float32`` (1 = unvoiced),
          ``energy (N, F) float32, num_frames (N,) int32``.
        """
        if not len(self):
            raise ValueError("the corpus is empty")
        lens_p = [len(p) for p in self.phonemes]
        lens_f = [m.shape[0] for m in self.mels]
        P = max(lens_p) if max_phonemes is None else int(max_phonemes)
        F = max(lens_f) if max_frames is None else int(max_frames)
        for k, (p, f) in enumerate(zip(lens_p, lens_f, strict=True)):
            if p > P:
                raise ValueError(
                    f"item {self.ids[k]!r} has {p} phonemes, more than max_phonemes={P}"
                )
            if f > F:
                raise ValueError(f"item {self.ids[k]!r} has {f} frames, more than max_frames={F}")
        N, n_mels = len(self), self.mel_config.n_mels
        out = {
            "phonemes": np.zeros((N, P), np.int32),
            "phone_mask": np.zeros((N, P), np.float32),
            "durations": np.zeros((N, P), np.int32),
            "num_phonemes": np.asarray(lens_p, np.int32),
            "mel": np.zeros((N, F, n_mels), np.float32),
            "frame_mask": np.zeros((N, F), np.float32),
            "log_f0": np.zeros((N, F), np.float32),
            "uv": np.zeros((N, F), np.float32),
            "energy": np.zeros((N, F), np.float32),
            "num_frames": np.asarray(lens_f, np.int32),
        }
        for k, (p, f) in enumerate(zip(lens_p, lens_f, strict=True)):
            out["phonemes"][k, :p] = self.phonemes[k]
            out["phone_mask"][k, :p] = 1.0
            out["durations"][k, :p] = self.durations[k]
            out["mel"][k, :f] = self.mels[k]
            out["frame_mask"][k, :f] = 1.0
            pitch = interpolate_f0(self.f0[k], self.voiced[k])
            out["log_f0"][k, :f] = np.log(np.where(pitch > 0, pitch, 1.0))
            out["uv"][k, :f] = ~self.voiced[k]
            out["energy"][k, :f] = self.energy[k]
        return out

    def save_npz(self, path: str | os.PathLike) -> None:
        """Writes the corpus to one ``.npz`` (ragged lists concatenated, with their lengths)."""
        meta = {
            "format": "dpm-speech-corpus",
            "version": 1,
            "ids": self.ids,
            "texts": self.texts,
            "symbols": list(self.vocab.symbols),
            "mel_config": dataclasses.asdict(self.mel_config),
        }
        cat = lambda xs, dtype: np.concatenate(xs).astype(dtype) if xs else np.zeros(0, dtype)  # noqa: E731
        arrays = {
            "meta": np.array(json.dumps(meta, ensure_ascii=False)),
            "num_phonemes": np.asarray([len(p) for p in self.phonemes], np.int64),
            "num_frames": np.asarray([m.shape[0] for m in self.mels], np.int64),
            "phonemes": cat(self.phonemes, np.int32),
            "durations": cat(self.durations, np.int32),
            "mels": (
                np.concatenate(self.mels).astype(np.float32)
                if self.mels
                else np.zeros((0, self.mel_config.n_mels), np.float32)
            ),
            "f0": cat(self.f0, np.float32),
            "voiced": cat(self.voiced, bool),
            "energy": cat(self.energy, np.float32),
        }
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)

    @classmethod
    def load_npz(
        cls, path: str | os.PathLike, *, mel_config: MelConfig | None = None
    ) -> SpeechCorpus:
        """Reads a corpus written by :meth:`save_npz`.

        Args:
          path: the ``.npz`` file.
          mel_config: the settings the features must have been computed with (default
            ``MelConfig()``); a cache made with other settings is refused.
        """
        mel_config = MelConfig() if mel_config is None else mel_config
        path = os.fspath(path)
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != "dpm-speech-corpus":
            raise ValueError(f"path={path!r} is not a speech corpus written by save_npz")
        stored = MelConfig(**meta["mel_config"])
        if stored != mel_config:
            raise ValueError(
                f"path={path!r} holds features computed with {stored}, but mel_config="
                f"{mel_config}; delete the cache or load with the settings it was made with"
            )
        split = lambda x, lengths: np.split(x, np.cumsum(lengths)[:-1])  # noqa: E731
        n_p, n_f = data["num_phonemes"], data["num_frames"]
        return cls(
            list(meta["ids"]),
            list(meta["texts"]),
            split(data["phonemes"], n_p),
            split(data["durations"], n_p),
            split(data["mels"], n_f),
            split(data["f0"], n_f),
            split(data["voiced"], n_f),
            split(data["energy"], n_f),
            PhonemeVocab(tuple(meta["symbols"])),
            stored,
        )


def _read_metadata(folder: str) -> list[tuple[str, str]]:
    meta = os.path.join(folder, "metadata.csv")
    if not os.path.isfile(meta):
        raise ValueError(
            f"folder={folder!r} has no metadata.csv; an LJSpeech-format folder holds "
            "metadata.csv (lines id|text|normalized_text) and wavs/<id>.wav"
        )
    entries, seen = [], set()
    with open(meta, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("|")
            if len(parts) not in (2, 3) or not parts[0].strip():
                raise ValueError(
                    f"{meta}:{lineno}: malformed line {line!r:.100}; expected "
                    "id|text|normalized_text (or id|text)"
                )
            item = parts[0].strip()
            text = parts[2] if len(parts) == 3 and parts[2].strip() else parts[1]
            if not text.strip():
                raise ValueError(f"{meta}:{lineno}: item {item!r} has empty text")
            if item in seen:
                raise ValueError(f"{meta}:{lineno}: item {item!r} appears twice")
            seen.add(item)
            entries.append((item, text.strip()))
    if not entries:
        raise ValueError(f"{meta} lists no utterances")
    return entries


def _read_alignments(path: str, sample_rate: int) -> dict:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != "dpm-speech-alignments" or "utterances" not in data:
        raise ValueError(f"{path} is not an alignments file written by experiments.speech_corpus")
    if data.get("sample_rate") != sample_rate:
        raise ValueError(
            f"{path} holds boundaries at {data.get('sample_rate')} Hz, but the mel config's "
            f"sample_rate is {sample_rate} Hz"
        )
    return data["utterances"]


def load_ljspeech(
    folder: str | os.PathLike,
    *,
    mel_config: MelConfig | None = None,
    vocab: PhonemeVocab | None = None,
    voice: str = "en-us",
    limit: int | None = None,
) -> SpeechCorpus:
    """An LJSpeech-format folder as a :class:`SpeechCorpus` (features computed here).

    The folder holds ``metadata.csv`` (lines ``id|text|normalized_text``; the normalized text
    is used where present) and ``wavs/<id>.wav`` (mono 16-bit PCM at ``mel_config.sample_rate``).
    Phonemes and durations come from ``alignments.json`` when the folder has one (written by
    ``experiments.speech_corpus``: espeak's own timing, exact); otherwise the texts are
    phonemized with espeak-ng (``voice``) and aligned to the mel frames by
    :func:`align_by_templates` (an estimate, good to a frame or two).

    Args:
      folder: the corpus folder.
      mel_config: STFT / mel settings (default ``MelConfig()``: 22.05 kHz, hop 256, 80 mels).
      vocab: phoneme vocabulary to encode with (e.g. the training corpus's for a test corpus);
        default: built from this corpus.
      voice: espeak-ng voice for phonemizing (only without ``alignments.json``).
      limit: read only the first ``limit`` utterances of ``metadata.csv``.

    Returns:
      the corpus.

    Raises:
      FileNotFoundError: the folder or an utterance's wav does not exist.
      ValueError: no ``metadata.csv``, a malformed line, empty text, a wav of another format or
        sample rate, alignments that do not fit the wav, or (with ``vocab``) unknown symbols;
        each message names the item.
    """
    mel_config = MelConfig() if mel_config is None else mel_config
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder={folder!r} does not exist or is not a folder")
    entries = _read_metadata(folder)
    if limit is not None:
        if int(limit) != limit or limit <= 0:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        entries = entries[: int(limit)]
    align_path = os.path.join(folder, "alignments.json")
    alignments = (
        _read_alignments(align_path, mel_config.sample_rate) if os.path.isfile(align_path) else None
    )

    texts, symbols, durations, mels, f0s, voiceds, energies = [], [], [], [], [], [], []
    for item, text in entries:
        wav_path = os.path.join(folder, "wavs", f"{item}.wav")
        if not os.path.isfile(wav_path):
            raise FileNotFoundError(f"item {item!r}: its wav {wav_path!r} does not exist")
        try:
            wav = read_wav(wav_path, sample_rate=mel_config.sample_rate)
        except ValueError as e:
            raise ValueError(f"item {item!r}: {e}") from e
        n_frames = num_frames(wav.size, mel_config)
        if alignments is not None:
            if item not in alignments:
                raise ValueError(f"item {item!r} is missing from {align_path}")
            phonemes = tuple(alignments[item]["phonemes"])
            bounds = np.asarray(alignments[item]["boundaries"], np.int64)
            if bounds.shape != (len(phonemes) + 1,):
                raise ValueError(
                    f"item {item!r}: {len(phonemes)} phonemes need {len(phonemes) + 1} "
                    f"boundaries in {align_path}, got {bounds.size}"
                )
            try:
                durations.append(durations_from_boundaries(bounds, wav.size, mel_config.hop_length))
            except ValueError as e:
                raise ValueError(f"item {item!r} ({wav.size} samples): {e}") from e
        else:
            try:
                phonemes = phonemize(text, voice=voice)
            except ValueError as e:
                raise ValueError(f"item {item!r}: {e}") from e
            if len(phonemes) > n_frames:
                raise ValueError(
                    f"item {item!r}: {len(phonemes)} phonemes cannot be aligned to its "
                    f"{n_frames} frames"
                )
        mel, en = _mel_energy(wav, mel_config)
        pitch, voiced = f0(wav, mel_config)
        texts.append(text)
        symbols.append(phonemes)
        mels.append(mel)
        energies.append(en)
        f0s.append(np.asarray(pitch, np.float32))
        voiceds.append(np.asarray(voiced, bool))

    ids = [item for item, _ in entries]
    vocab = PhonemeVocab.from_corpus(symbols) if vocab is None else vocab
    phoneme_ids = [vocab.encode(s, item=item) for s, item in zip(symbols, ids, strict=True)]
    if alignments is None:
        durations = align_by_templates(phoneme_ids, mels, len(vocab))
    return SpeechCorpus(
        ids, texts, phoneme_ids, durations, mels, f0s, voiceds, energies, vocab, mel_config
    )
