"""The speech corpus: espeak-ng rendering and its timing, durations, monotonic alignment search,
the template aligner, the LJSpeech-format loader and the corpus builder."""

import itertools
import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm.data import BatchIterator
from dpm.data import speech as S
from dpm.data.audio import MelConfig, log_mel, num_frames, write_wav
from experiments import speech_corpus

needs_espeak = pytest.mark.skipif(
    not S.espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)"
)

COMMA = "After the storm, the old captain found seven letters."


# ------------------------------------------------------------------ rendering


@needs_espeak
def test_render_tiles_the_wav():
    utt = S.render(COMMA)
    T, P = utt.wav.size, len(utt.phonemes)
    assert utt.sample_rate == 22050 and utt.wav.dtype == np.float32 and T > 22050
    assert utt.boundaries.shape == (P + 1,)
    assert utt.boundaries[0] == 0 and utt.boundaries[-1] == T
    assert np.all(np.diff(utt.boundaries) >= 0)
    assert utt.phonemes[0] == S.PAUSE and utt.phonemes[-1] == S.PAUSE
    assert np.abs(utt.wav).max() <= 1.0
    # pauses are merged: never two in a row
    assert not any(a == b == S.PAUSE for a, b in itertools.pairwise(utt.phonemes))


@needs_espeak
def test_render_is_deterministic():
    a = S.render(COMMA)
    S.render("Is it twenty three?")  # espeak's state would carry over from this one
    b = S.render(COMMA)
    np.testing.assert_array_equal(a.wav, b.wav)
    np.testing.assert_array_equal(a.boundaries, b.boundaries)
    assert a.phonemes == b.phonemes


@needs_espeak
def test_comma_pause_falls_in_the_silence():
    utt = S.render(COMMA)
    inner = [i for i, p in enumerate(utt.phonemes[1:-1], 1) if p == S.PAUSE]
    assert inner, utt.phonemes
    for i in inner:
        a, b = utt.boundaries[i], utt.boundaries[i + 1]
        assert b - a > 0.05 * utt.sample_rate  # a clause pause lasts > 50 ms
        assert np.abs(utt.wav[a:b]).max() < 1e-3  # and is silent
    # the phonemes around it carry the speech
    speech = np.concatenate(
        [utt.wav[utt.boundaries[i] : utt.boundaries[i + 1]] for i in range(1, len(utt.phonemes) - 1)
         if utt.phonemes[i] != S.PAUSE]
    )  # fmt: skip
    assert np.sqrt(np.mean(speech**2)) > 0.02


@needs_espeak
def test_event_sample_agrees_with_audio_position():
    samples, events, sr = S._synthesize(COMMA, "en-us", 175)
    phones = [(s, ms) for t, s, ms, _ in events if t == S._EVENT_PHONEME]
    assert len(phones) > 20
    for sample, ms in phones:
        assert abs(sample - ms * sr / 1000) <= sr / 1000 + 1  # ms are rounded
        assert 0 <= sample <= samples.size


@needs_espeak
def test_phonemize_is_render_tokenization():
    for text in (COMMA, "Did a sailor clean twenty pictures?", "Thomas found 1894 maps."):
        assert S.phonemize(text) == S.render(text).phonemes


@pytest.mark.parametrize("text", ["", "   \n"])
def test_empty_text_is_refused(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        S.phonemize(text)
    with pytest.raises(ValueError, match="text"):
        S.render(text)


# ------------------------------------------------------------------ durations


@needs_espeak
def test_durations_of_rendered_sentences_sum_to_frames():
    for text in (COMMA, "Where did our cat rest?"):
        utt = S.render(text)
        d = S.durations_from_boundaries(utt.boundaries, utt.wav.size, 256)
        assert d.shape == (len(utt.phonemes),) and d.min() >= 0
        assert d.sum() == num_frames(utt.wav.size, MelConfig())


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 20_000),
    st.lists(st.floats(0, 1), min_size=0, max_size=30),
    st.integers(1, 600),
)
def test_durations_from_random_boundaries(T, cuts, hop):
    b = np.concatenate([[0], np.sort(np.floor(np.asarray(cuts) * T)).astype(np.int64), [T]])
    d = S.durations_from_boundaries(b, T, hop)
    assert d.shape == (b.size - 1,) and d.dtype == np.int32
    assert d.min() >= 0 and d.sum() == 1 + T // hop
    # each frame's centre lies in its phoneme's span (the last frame may sit on sample T)
    owner = np.repeat(np.arange(d.size), d)
    centres = np.arange(owner.size) * hop
    inside = (b[owner] <= centres) & ((centres < b[owner + 1]) | (centres == T))
    assert inside.all()


def test_durations_refuse_bad_boundaries():
    with pytest.raises(ValueError, match="num_samples=10"):
        S.durations_from_boundaries(np.array([0, 5, 9]), 10, 4)
    with pytest.raises(ValueError, match="non-decreasing"):
        S.durations_from_boundaries(np.array([0, 6, 5, 10]), 10, 4)


# ------------------------------------------------------------------ alignment


def _path_log_p(durations, rng, noise=0.3):
    P, F = len(durations), int(np.sum(durations))
    log_p = rng.normal(0.0, noise, (P, F)) - 2.0
    owner = np.repeat(np.arange(P), durations)
    log_p[owner, np.arange(F)] += 3.0
    return log_p


def test_mas_recovers_a_known_path():
    rng = np.random.default_rng(0)
    for _ in range(5):
        durations = rng.integers(1, 12, size=60)
        np.testing.assert_array_equal(
            S.monotonic_alignment_search(_path_log_p(durations, rng)), durations
        )


def _all_alignments(P, F):
    # compositions of F into P positive parts
    for cuts in itertools.combinations(range(1, F), P - 1):
        yield np.diff((0, *cuts, F))


def _score(log_p, durations):
    P, F = log_p.shape
    return log_p[np.repeat(np.arange(P), durations), np.arange(F)].sum()


@pytest.mark.parametrize("P,F", [(1, 4), (2, 5), (3, 7), (4, 8), (5, 9)])
def test_mas_finds_the_maximum_by_brute_force(P, F):
    rng = np.random.default_rng(P * 10 + F)
    for _ in range(20):
        log_p = rng.normal(size=(P, F))
        best = max(_score(log_p, d) for d in _all_alignments(P, F))
        d = S.monotonic_alignment_search(log_p)
        assert d.min() >= 1 and d.sum() == F
        assert _score(log_p, d) == pytest.approx(best, abs=1e-12)


def test_mas_is_fast():
    import time

    log_p = np.random.default_rng(0).normal(size=(60, 400))
    S.monotonic_alignment_search(log_p)
    start = time.perf_counter()
    S.monotonic_alignment_search(log_p)
    assert time.perf_counter() - start < 0.05


def test_mas_refuses_more_phonemes_than_frames():
    with pytest.raises(ValueError, match=r"\(5, 4\)"):
        S.monotonic_alignment_search(np.zeros((5, 4)))


def test_align_by_templates_recovers_synthetic_durations():
    rng = np.random.default_rng(0)
    num_symbols, M = 12, 8
    templates = rng.normal(0.0, 2.0, (num_symbols, M))
    ids, mels, truth = [], [], []
    for _ in range(40):
        p = [int(rng.integers(num_symbols))]
        while len(p) < rng.integers(8, 16):
            p.append(int((p[-1] + rng.integers(1, num_symbols)) % num_symbols))  # no repeats
        d = rng.integers(2, 10, size=len(p))
        mels.append(np.repeat(templates[p], d, axis=0) + rng.normal(0.0, 1.5, (d.sum(), M)))
        ids.append(np.asarray(p))
        truth.append(d)
    found = S.align_by_templates(ids, mels, num_symbols, iterations=5)
    err = np.concatenate([np.abs(f - t) for f, t in zip(found, truth, strict=True)])
    assert all(f.sum() == m.shape[0] for f, m in zip(found, mels, strict=True))
    assert np.mean(err <= 1) > 0.95, np.mean(err <= 1)


# ------------------------------------------------------------------ vocabulary


def test_vocab_round_trip_and_unknown_symbols():
    vocab = S.PhonemeVocab.from_corpus([("_", "h", "@", "_"), ("_", "oU", "_")])
    assert vocab.symbols[:2] == (S.PAD, S.PAUSE) and len(vocab) == 5
    ids = vocab.encode(("_", "h", "oU", "_"))
    assert ids.dtype == np.int32 and vocab.decode(np.append(ids, [0, 0])) == ("_", "h", "oU", "_")
    assert S.PhonemeVocab.from_json(vocab.to_json()) == vocab
    with pytest.raises(ValueError, match=r"item 'LJ001-0002'.*\['Z', 'q'\]"):
        vocab.encode(("_", "q", "h", "Z"), item="LJ001-0002")


# ------------------------------------------------------------------ builder and loader


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    if not S.espeak_available():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return speech_corpus.build(tmp_path_factory.mktemp("speech") / "corpus", num_sentences=4)


@pytest.fixture(scope="module")
def corpus(corpus_dir):
    return S.load_ljspeech(corpus_dir)


def test_sentences_are_distinct_and_deterministic():
    a = speech_corpus.sentences(300, seed=0)
    assert a == speech_corpus.sentences(300, seed=0) and len(set(a)) == 300
    assert all(4 <= len(s.split()) <= 14 for s in a)
    assert any("," in s for s in a) and any(s.endswith("?") for s in a)
    assert a != speech_corpus.sentences(300, seed=1)


def test_build_writes_ljspeech_format(corpus_dir):
    with open(os.path.join(corpus_dir, "metadata.csv"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) == 4 and lines[0].startswith("DPM001-0001|")
    assert all(len(line.split("|")) == 3 for line in lines)
    with open(os.path.join(corpus_dir, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert manifest["num_sentences"] == 4 and manifest["espeak_version"]
    # same arguments: kept; other arguments: refused unless overwrite
    mtime = os.path.getmtime(os.path.join(corpus_dir, "manifest.json"))
    assert speech_corpus.build(corpus_dir, num_sentences=4) == corpus_dir
    assert os.path.getmtime(os.path.join(corpus_dir, "manifest.json")) == mtime
    with pytest.raises(ValueError, match="overwrite"):
        speech_corpus.build(corpus_dir, num_sentences=3)


def test_loaded_corpus_shapes_and_durations(corpus, corpus_dir):
    assert len(corpus) == 4 and corpus.ids[0] == "DPM001-0001"
    for k in range(4):
        wav_path = os.path.join(corpus_dir, "wavs", f"{corpus.ids[k]}.wav")
        T = (os.path.getsize(wav_path) - 44) // 2
        F = 1 + T // 256
        assert corpus.mels[k].shape == (F, 80) and corpus.mels[k].dtype == np.float32
        assert corpus.durations[k].sum() == F and corpus.durations[k].min() >= 0
        assert corpus.f0[k].shape == corpus.voiced[k].shape == corpus.energy[k].shape == (F,)
        assert corpus.voiced[k].any()
    assert corpus.texts[0] == speech_corpus.sentences(4, seed=0)[0]


def test_bucketed_features_equal_direct_ones(corpus_dir):
    from dpm.data.audio import read_wav

    wav = read_wav(os.path.join(corpus_dir, "wavs", "DPM001-0002.wav"), sample_rate=22050)
    mel, _ = S._mel_energy(wav, MelConfig())
    np.testing.assert_allclose(mel, np.asarray(log_mel(wav, MelConfig())), atol=1e-4)


def test_padded_masks_and_batches(corpus):
    data = corpus.padded()
    N, P = data["phonemes"].shape
    F = data["mel"].shape[1]
    assert N == 4 and data["mel"].shape == (4, F, 80)
    for k in range(N):
        p, f = len(corpus.phonemes[k]), corpus.mels[k].shape[0]
        assert data["num_phonemes"][k] == p and data["num_frames"][k] == f
        np.testing.assert_array_equal(data["phone_mask"][k], np.arange(P) < p)
        np.testing.assert_array_equal(data["frame_mask"][k], np.arange(F) < f)
        assert data["durations"][k].sum() == f
        for key in ("mel", "log_f0", "uv", "energy"):
            assert not np.any(data[key][k, f:])
        assert not np.any(data["phonemes"][k, p:]) and np.all(data["phonemes"][k, :p] > 0)
        np.testing.assert_array_equal(data["uv"][k, :f], ~corpus.voiced[k])
        assert np.all(np.exp(data["log_f0"][k, :f]) > 50)  # continuous, through unvoiced
    it = BatchIterator(data, 2, seed=0)
    for _ in range(3):
        batch = next(it)
        assert batch["mel"].shape == (2, F, 80) and batch["phonemes"].shape == (2, P)
    big = corpus.padded(max_phonemes=P + 3, max_frames=F + 5)
    assert big["mel"].shape == (4, F + 5, 80) and big["phonemes"].shape == (4, P + 3)
    with pytest.raises(ValueError, match="item 'DPM001-"):
        corpus.padded(max_frames=F - 1)


def test_split_subset_and_npz_cache(corpus, tmp_path):
    train, test = corpus.split(0.25, seed=0)
    assert len(train) == 3 and len(test) == 1 and not set(train.ids) & set(test.ids)
    assert corpus.split(0.25, seed=0)[1].ids == test.ids
    path = tmp_path / "corpus.npz"
    corpus.save_npz(path)
    back = S.SpeechCorpus.load_npz(path)
    assert back.ids == corpus.ids and back.texts == corpus.texts and back.vocab == corpus.vocab
    for name in ("phonemes", "durations", "mels", "f0", "voiced", "energy"):
        for a, b in zip(getattr(back, name), getattr(corpus, name), strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="mel_config"):
        S.SpeechCorpus.load_npz(path, mel_config=MelConfig(n_mels=64))


def test_loader_without_alignments_falls_back_to_mas(corpus, corpus_dir, tmp_path):
    import shutil

    folder = tmp_path / "untimed"
    shutil.copytree(corpus_dir, folder)
    os.remove(folder / "alignments.json")
    untimed = S.load_ljspeech(folder, vocab=corpus.vocab)
    for k in range(len(corpus)):
        np.testing.assert_array_equal(untimed.phonemes[k], corpus.phonemes[k])
        assert untimed.durations[k].sum() == corpus.mels[k].shape[0]
        assert untimed.durations[k].min() >= 1


# ------------------------------------------------------------------ loader errors


def test_loader_errors_name_the_item(corpus, corpus_dir, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="metadata.csv"):
        S.load_ljspeech(tmp_path)

    def copy(name):
        folder = tmp_path / name
        shutil.copytree(corpus_dir, folder)
        return folder

    # a wav at 16 kHz
    folder = copy("rate")
    write_wav(folder / "wavs" / "DPM001-0003.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match=r"item 'DPM001-0003'.*16000 Hz"):
        S.load_ljspeech(folder)
    # a missing wav
    folder = copy("missing")
    os.remove(folder / "wavs" / "DPM001-0002.wav")
    with pytest.raises(FileNotFoundError, match="item 'DPM001-0002'"):
        S.load_ljspeech(folder)
    # empty text, a malformed line
    folder = copy("text")
    with open(folder / "metadata.csv", "a", encoding="utf-8") as f:
        f.write("DPM001-0005| |\n")
    with pytest.raises(ValueError, match="item 'DPM001-0005' has empty text"):
        S.load_ljspeech(folder)
    with open(folder / "metadata.csv", "w", encoding="utf-8") as f:
        f.write("DPM001-0001 no separators\n")
    with pytest.raises(ValueError, match="metadata.csv:1: malformed"):
        S.load_ljspeech(folder)
    # a symbol outside the given vocabulary
    small = S.PhonemeVocab(tuple(s for s in corpus.vocab.symbols if s != "D"))
    with pytest.raises(ValueError, match=r"item 'DPM001-\d+'.*\['D'\]"):
        S.load_ljspeech(corpus_dir, vocab=small)
