"""The progressive-distillation experiment: config checks, compute accounting, the verdict, a
refused teacher checkpoint and a smoke run (restored on rerun)."""

import json
import os

import numpy as np
import pytest

from experiments import progressive_distillation as pd
from experiments._zoo import digits_config, digits_data


def _config(**changes):
    c = pd.get_config()
    for k, v in changes.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


@pytest.mark.parametrize("key,value,match", [
    ("teacher.prediction", "score", "config.teacher.prediction"),
    ("distill.weighting", "snr", "config.distill.weighting"),
    ("distill.start_steps", 12, "config.distill: start_steps must be a power of two"),
    ("distill.end_steps", 256, "config.distill: end_steps must be < start_steps"),
    ("distill.batch_size", 12, "config.distill.batch_size must be a multiple"),
    ("ablations", ("eps_head", "quartering"), "config.ablations"),
    ("image_size", 32, "config.image_size"),
    ("distill.clip_norm", 0.0, "config.distill.clip_norm"),
])
def test_bad_config_is_refused_naming_the_field(key, value, match):
    with pytest.raises(ValueError, match=match):
        pd.check_config(_config(**{key: value}))


def test_default_config_is_valid_and_the_compute_is_matched():
    c = pd.get_config()
    pd.check_config(c)
    # teacher 2000 steps + 8 rounds x 96 distillation steps x 5/3 x (batch 32 / 64)
    assert pd.scratch_steps(c) == 2000 + round(8 * 96 * 5 / 3 * 32 / 64)
    assert pd._steps(c) == (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _cell(kid, recall=(0.9, 0.91, 0.92), fd_t=(1.0, 1.1, 1.2)):
    def c(v):
        v = np.asarray(v, float)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)), "values": v.tolist()}

    return {"kid": c(kid), "recall": c(recall), "fd_to_teacher": c(fd_t)}


def _quality(student4, teacher4, teacher_ref=(0.010, 0.011, 0.009)):
    far = (5.0, 5.2, 5.1)
    return {pd.TEACHER: {4: _cell(teacher4, fd_t=far), 256: _cell(teacher_ref),
                         2: _cell([0.2] * 3, fd_t=far), 1: _cell([0.5, 0.6, 0.55], fd_t=far)},
            pd.MAIN: {4: _cell(student4), 2: _cell([0.02, 0.021, 0.019]),
                      1: _cell([0.03, 0.031, 0.029])}}


def test_verdict_holds_only_when_the_student_matches_and_the_teacher_falls_behind():
    c = pd.get_config()
    v = pd.verdict(c, _quality([0.0105, 0.0112, 0.0093], [0.05, 0.06, 0.055]))
    assert v[0].startswith("1.") and v[0].endswith(": holds")
    assert v[1].startswith("2.") and v[1].endswith(": holds")  # closer to the teacher at 4, 2, 1
    assert "(student better)" in v[2] and "(student better)" in v[3]
    # the student far from the reference: fails
    assert "does not hold" in pd.verdict(c, _quality([0.03, 0.031, 0.029],
                                                     [0.05, 0.06, 0.055]))[0]
    # the 4-step teacher as good as the reference: nothing to show, fails, and says why
    v = pd.verdict(c, _quality([0.0105, 0.0112, 0.0093], [0.0101, 0.0112, 0.0089]))
    assert "does not hold (the 4-step teacher is not worse" in v[0]


def test_a_teacher_checkpoint_of_another_network_is_refused(tmp_path):
    train, _ = digits_data(digits_config("eps", 8))
    c = _config(**{"teacher.steps": 2, "base_channels": 8, "fast_compile": True})
    pd.train_base(c, "x0", train, str(tmp_path), progress=False)
    c.base_channels = 16
    with pytest.raises(ValueError, match="base_channels: checkpoint has 8, current config has 16"):
        pd.train_base(c, "x0", train, str(tmp_path), progress=False)


def test_smoke_run_writes_the_report_and_restores_on_rerun(tmp_path, smoke_zoo):
    c = _config(**{
        "zoo_root": smoke_zoo.root, "judge_steps": smoke_zoo.steps, "seeds": (0,),
        "fast_compile": True, "kid_subsets": 5, "base_channels": 8,
        "teacher.steps": 2, "teacher.warmup_steps": 1, "distill.start_steps": 2,
        "distill.steps_per_round": 2, "distill.batch_size": 16, "teacher.batch_size": 16,
        # no ablation (each is one more cascade through `distill`, one more ~10 s compile of
        # a step; the default run's report shows them) and no equal-compute model (the
        # teacher's code with more steps; its step count: test_default_config_is_valid_and_...)
        "ablations": (), "scratch": False, "sample.num_samples": 16})
    work = str(tmp_path / "pd")
    report = pd.train_and_evaluate(c, work, progress=False, log=lambda *a: None)
    for f in ("report.md", "report.json", "kid_vs_steps.png", "recall_vs_steps.png",
              "samples.png"):
        assert os.path.getsize(os.path.join(work, f)) > 0, f
    q = report["quality"]
    assert sorted(q[pd.TEACHER]) == [1, 2] and sorted(q[pd.MAIN]) == [1]
    assert pd.SCRATCH not in q and not any(k.startswith("ablation") for k in q)
    assert "fd_to_teacher" in q[pd.MAIN][1] and "fd_to_teacher" in q[pd.TEACHER][2]
    assert len(q[pd.MAIN][1]["kid"]["values"]) == 1
    assert report["compute"]["scratch_train_steps"] == 0
    assert any("4 steps vs" not in v for v in report["verdict"])
    with open(os.path.join(work, "report.json")) as fh:
        assert json.load(fh)["data"]["quality"][pd.MAIN]["1"]["kid"]["values"]
    # every network restores from its checkpoint: building them again trains nothing
    logs = [os.path.join(work, d, "metrics.jsonl") for d in (
        "teacher", "cascade_seed0/round_0_1")]
    before = [_read(f) for f in logs]
    train, _ = digits_data(digits_config("eps", 8))
    teacher = pd.train_base(c, "x0", train, work, progress=False)
    students = pd.distill(c, teacher, "x0", c.distill.weighting, 0, train,
                          os.path.join(work, "cascade_seed0"), progress=False)
    assert [_read(f) for f in logs] == before and sorted(students) == [1]


def _read(path):
    with open(path) as fh:
        return fh.read()
