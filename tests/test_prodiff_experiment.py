"""experiments.prodiff: config validation, compute accounting, the verdict's logic, text
encoding errors, and a smoke run (corpus build, training, evaluation, synthesis from text)."""

import json
import os

import numpy as np
import pytest

from dpm.data.speech import espeak_available
from experiments import prodiff

needs_espeak = pytest.mark.skipif(not espeak_available(),
                                  reason="espeak-ng is not installed (apt-get install espeak-ng)")


def _config(**kw):
    c = prodiff.get_config()
    for k, v in kw.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


@pytest.mark.parametrize("key,value,match", [
    ("conditioner", "huge", "config.conditioner must be one of"),
    ("denoiser", "tiny", "config.denoiser must be one of"),
    ("corpus.test_fraction", 1.0, "config.corpus.test_fraction must be in"),
    ("teacher.batch_size", 12, "config.teacher.batch_size must be a multiple of the 8"),
    ("distill.learning_rate", 0.0, "config.distill.learning_rate must be in"),
    ("eval.griffin_lim_iters", 0, "config.eval.griffin_lim_iters"),
    ("denoiser_overrides.layers", 2,
     r"config.denoiser_overrides has unknown fields \['layers'\]"),
])
def test_bad_config_is_refused_naming_the_field(key, value, match):
    with pytest.raises(ValueError, match=match):
        prodiff.check_config(_config(**{key: value}))


def test_default_config_and_the_direct_models_compute():
    c = prodiff.get_config()
    prodiff.check_config(c)
    # teacher steps + distillation steps x 5/3 (equal batch sizes)
    assert prodiff.direct_steps(c) == c.teacher.train_steps + round(
        c.distill.train_steps * 5 / 3)
    # the schedule is ProDiff's table: 4 levels, log-SNR -0.24 .. -12.85
    lam = np.asarray(prodiff.SCHEDULE.log_snr(np.asarray([0.25, 1.0])))
    np.testing.assert_allclose(lam, [-0.24, -12.85], atol=0.02)


def _cell(values):
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)), "values": v.tolist()}


def _row(l1, ssim, sharp, rtf=0.01):
    return {"l1": _cell(l1), "ssim": _cell(ssim), "sharp_f": _cell(sharp),
            "sharp_t": _cell(sharp), "rtf": rtf, "rtf_with_griffin_lim": 10 * rtf,
            "diversity": 0.1}


def test_verdict_reads_the_headline_from_the_numbers():
    q = {prodiff.TEACHER4: _row([0.10, 0.11, 0.10], [0.80, 0.81, 0.80], [0.9, 0.9, 0.91], 0.02),
         prodiff.STUDENT2: _row([0.105, 0.112, 0.101], [0.79, 0.81, 0.80], [0.95, 0.96, 0.94]),
         prodiff.TEACHER2: _row([0.20, 0.21, 0.22], [0.60, 0.61, 0.62], [0.6, 0.61, 0.62]),
         prodiff.EPS4: _row([0.3] * 3, [0.5] * 3, [0.5] * 3),
         prodiff.EPS2: _row([0.5, 0.51, 0.52], [0.3] * 3, [0.5] * 3)}
    v = "\n".join(prodiff.verdict(q))
    assert "Student close to teacher@4: holds" in v
    assert "(sharper)" in v and "eps-head worst at few steps: holds" in v
    q[prodiff.STUDENT2] = _row([0.2, 0.21, 0.2], [0.6, 0.6, 0.61], [0.6, 0.61, 0.62])
    v = "\n".join(prodiff.verdict(q))
    assert "Student close to teacher@4: does not hold" in v and "(not sharper)" in v


@needs_espeak
def test_text_encoding_refuses_empty_text_and_unknown_symbols():
    from dpm.data.speech import PhonemeVocab, phonemize

    vocab = PhonemeVocab.from_corpus([phonemize("A cat sat.")])
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        prodiff.encode_text("   ", vocab, "en-us")
    with pytest.raises(ValueError, match="Zebras quietly"):
        prodiff.encode_text("Zebras quietly jog through fjords.", vocab, "en-us")
    with pytest.raises(ValueError, match="steps must be 2 .* or 4 .*; got 3"):
        prodiff.synthesize_text(prodiff.get_config(), "unused", "A cat sat.", "unused", steps=3)


@needs_espeak
def test_smoke_run_writes_the_report_and_synthesizes_text(tmp_path):
    c = _config(**{
        "corpus.root": str(tmp_path / "corpus"), "corpus.num_sentences": 12,
        "corpus.test_fraction": 0.25, "seeds": (0,), "fast_compile": True,
        "teacher.train_steps": 2, "teacher.warmup_steps": 1, "teacher.batch_size": 8,
        "distill.train_steps": 2, "distill.batch_size": 8, "eps_head": False,
        "eval.griffin_lim_iters": 2,
        # one-block networks: the smoke checks the wiring, and compiles are most of its time
        "conditioner_overrides.encoder_layers": 1, "conditioner_overrides.predictor_layers": 1,
        "denoiser_overrides.residual_layers": 2})
    work = str(tmp_path / "run")
    report = prodiff.train_and_evaluate(c, work, progress=False, log=lambda *a: None)
    for f in ("report.md", "report.json", "mels.png"):
        assert os.path.exists(os.path.join(work, f)), f
    q = report["quality"]
    assert set(q) == {prodiff.TEACHER4, prodiff.STUDENT2, prodiff.TEACHER2, prodiff.DIRECT2}
    for row in q.values():
        assert len(row["l1"]["values"]) == 1 and np.isfinite(row["l1"]["mean"])
        assert row["rtf"] > 0 and row["rtf_with_griffin_lim"] > row["rtf"]
    with open(os.path.join(work, "report.json")) as f:
        assert json.load(f)["data"]["verdict"]
    assert report["compute"]["direct_train_steps"] == 2 + round(2 * 5 / 3)
    # synthesis from text restores the trained networks (nothing retrains) and writes both files
    out = prodiff.synthesize_text(c, work, "Nine red owls sang.", str(tmp_path / "syn"),
                                  progress=False)
    assert os.path.exists(out["mel"]) and os.path.exists(out["wav"]) and out["frames"] > 0
