"""The RG-LCD experiment: bad configs fail before any work; a smoke run trains every network
(autoencoder, three contrastive models, teacher, every student kind), grades every sampler,
resumes for free, and writes the report."""

import json
import os

import numpy as np
import pytest

from experiments import rg_lcd as R


def _read(path):
    with open(path) as f:
        return f.read()


def _smoke_config(zoo):
    c = R.get_config()
    c.image_size = 8
    c.zoo_root = zoo.root
    c.judge_steps = zoo.steps
    c.fast_compile = True
    c.seeds = (0, 1)
    c.kid_subsets = 5
    c.captions.per_image = 1
    c.captions.num_prompts = 16
    c.autoencoder.update(factor=2, base_channels=8, steps=2, batch_size=8)
    c.text.update(width=16, depth=1, num_heads=2)
    c.clip.update(steps=2, batch_size=16, embed_dim=16, image_width=8)
    c.teacher.update(base_channels=16, channel_mult=(1,), steps=2, batch_size=8)
    c.lcd.update(steps=2, batch_size=8, w_embed_dim=8)
    c.rg.update(betas=(10.0,), rm_batch_size=4)
    c.sample.update(teacher_steps=(1, 2), student_steps=(1, 2), w_sweep=(0.0, 2.0),
                    sweep_steps=2, sweep_teacher_steps=1, figure_prompts=4)
    c.ablations.update(enabled=True, skip=(50,), ema_decay=(), boundary=(), distance=(), steps=2)
    return c


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("image_size", 32, "image_size"),
        ("autoencoder.factor", 8, "autoencoder.factor"),
        ("lcd.skip", 30, "lcd.skip"),
        ("lcd.distance", "l1", "lcd.distance"),
        ("lcd.w_max", -1.0, "lcd.w_max"),
        ("rg.mode", "hinge", "rg.mode"),
        ("rg.rm_batch_size", 64, "rm_batch_size"),
        ("sample.student_steps", (1, 60), "sample.student_steps"),
        ("ablations.skip", (7,), "ablations.skip"),
        ("teacher.batch_size", 12, "multiple of the 8 devices"),
        ("seeds", (), "seeds"),
    ],
)
def test_bad_config_is_named_before_any_work(tmp_path, key, value, match):
    c = R.get_config()
    c.zoo_root = str(tmp_path / "zoo")
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        R.train_and_evaluate(c, str(tmp_path))
    assert not os.listdir(tmp_path)


# The smoke run in two stages (module fixtures, so each test's setup stays small): the
# networks (autoencoder, three contrastive models, teacher), then the full run in the same
# workdir, which restores them and trains every student kind, grades and reports.


@pytest.fixture(scope="module")
def smoke_networks(tmp_path_factory, smoke_zoo):
    c = _smoke_config(smoke_zoo)
    work = str(tmp_path_factory.mktemp("rg_lcd") / "run")
    data = R.load_data(c)
    return c, work, data, R.train_networks(c, data, work, log=lambda *_: None, progress=False)


@pytest.fixture(scope="module")
def smoke_run(smoke_networks):
    c, work, _, _ = smoke_networks
    return R.train_and_evaluate(c, work, progress=False, log=lambda *_: None)


def test_rg_lcd_networks(smoke_networks):
    c, work, data, n = smoke_networks
    z = n.ae.encode(data.test_images["x"][:4])
    assert z.shape == (4, 4, 4, c.autoencoder.latent_channels)
    assert n.ae.decode(z).shape == data.test_images["x"][:4].shape
    assert n.latents.shape[0] == len(data.train_images["x"])
    assert np.isfinite(n.expert_temperature) and n.expert_temperature > 0
    for d in ("teacher", "autoencoder"):
        assert os.path.exists(os.path.join(work, d, "metrics.jsonl")), d


def test_rg_lcd_experiment_smoke(smoke_run, smoke_networks):
    c, work, _, _ = smoke_networks
    report = smoke_run
    q = report["quality"]
    names = list(R.student_specs(c))
    assert names == ["LCM", "RG-LCM direct, beta=10", "RG-LCM with LRM, beta=1"]
    want = {"real train images (floor)", "teacher, guided DDIM, 1 steps",
            "teacher, guided DDIM, 2 steps"} | {f"{n}, {s} steps" for n in names for s in (1, 2)}
    assert set(q) == want
    for row in want - {"real train images (floor)"}:
        assert len(q[row]["kid"]["values"]) == 2
        assert all(np.isfinite(v) for v in q[row]["judge_clip"]["values"])
        assert 0.0 <= q[row]["accuracy"]["mean"] <= 1.0
    assert q["teacher, guided DDIM, 2 steps"]["nfe"]["mean"] == 4  # two evaluations a step
    assert q["LCM, 2 steps"]["nfe"]["mean"] == 2
    assert set(report["ablations"]) == {"LCM (k = 20, mu = 0.95, boundary, huber)", "k = 50"}
    assert set(report["sweep"]) == {"LCM, 2 steps", "teacher, 1 steps"}
    assert set(report["sweep"]["LCM, 2 steps"]) == {"0", "2"}
    md = _read(os.path.join(work, "report.md"))
    for heading in ("Quality on 16 held-out prompts", "Inference w sweep", "LCD ablations",
                    "Verdict", "Judge:", "Sanity"):
        assert heading in md, heading
    data = json.loads(_read(os.path.join(work, "report.json")))["data"]
    assert data["quality"]["LCM, 2 steps"]["kid"]["mean"] == q["LCM, 2 steps"]["kid"]["mean"]
    for f in ("samples.png", "judge_vs_steps.png"):
        assert os.path.getsize(os.path.join(work, f)) > 0
    # every network restores: a rerun trains nothing and reads every cell back
    log = os.path.join(work, "teacher", "metrics.jsonl")
    before = _read(log)
    again = R.train_and_evaluate(c, work, progress=False, log=lambda *_: None)
    assert _read(log) == before
    assert again["quality"]["LCM, 2 steps"] == q["LCM, 2 steps"]
