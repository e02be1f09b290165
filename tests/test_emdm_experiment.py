"""The EMDM experiment: bad configs fail before any work; a smoke run trains both text models,
MDM, EMDM (T = 10 and 4, with lazy R1), noGAN and the a2m pair, generates with every method,
grades, writes the report and resumes for free; the generate command writes a motion."""

import os

import numpy as np
import pytest

from experiments import emdm as E


def _smoke_config():
    c = E.get_config()
    c.fast_compile = True
    c.seeds = (0,)
    c.data.update(n_train=64, n_eval=64, n_test=40, min_frames=12, max_frames=16)
    c.text.update(width=16, depth=1, heads=2, embed_dim=8, motion_width=16, motion_depth=1,
                  steps=2, batch_size=16)
    c.model.update(d_model=16, num_layers=1, num_heads=2, ff_dim=16, latent_dim=4)
    c.disc.update(reduce_channels=2, hidden=(16, 16, 16, 16, 8, 8),
                  norm_groups=(0, 4, 0, 4, 0, 0), time_dim=8)
    c.train.update(steps=3, batch_size=16)
    c.mdm.update(num_steps=20)
    # R1 on every step: one compiled GAN step per model here (both programs of lazy R1 run
    # under fit in test_gan_resume.py)
    c.emdm.update(num_steps=3, alt_steps=2, r1_every=1)
    c.a2m.update(steps=2)
    c.sample.update(num_eval=32, cfg_scale=2.5, mode_samples=4, mm_prompts=2, mm_repeats=2,
                    timing_batch=20, pool=16, figure_frames=3)
    return c


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("data.max_frames", 10, "data.max_frames"),
        ("model.num_heads", 5, "model.num_heads"),
        ("disc.kind", "cnn", "disc.kind"),
        ("emdm.num_steps", 1, "emdm.num_steps"),
        ("sample.num_eval", 4000, "sample.num_eval"),
        ("train.batch_size", 12, "multiple of the 8 devices"),
        ("seeds", (), "seeds"),
    ],
)
def test_bad_config_is_named_before_any_work(tmp_path, key, value, match):
    c = E.get_config()
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        E.train_and_evaluate(c, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_emdm_experiment_smoke_resume_and_generate(tmp_path):
    c = _smoke_config()
    work = str(tmp_path / "run")
    report = E.train_and_evaluate(c, work, progress=False, log=lambda *_: None)
    q = report["quality"]
    assert set(q) == set(E.METHODS)
    for name, row in q.items():
        for metric, cell in row.items():
            if metric.startswith("wave_") or (name in E.SLOW and metric == "multimodality"):
                continue  # a mode share is NaN when no clip waves; the slow baseline skips
            assert np.all(np.isfinite(cell["values"])), (name, metric)
        assert 0.0 <= row["r_top1"]["mean"] <= row["r_top3"]["mean"] <= 1.0
    assert q["MDM@1000"]["nfe"]["mean"] == 2 * 20 and q["EMDM@10"]["nfe"]["mean"] == 2 * 3
    assert report["train_steps"]["steps"]["emdm"] == 3
    assert set(report["a2m"]) == set(E.A2M)
    assert len(report["verdict"]) == 9
    assert os.path.exists(os.path.join(work, "motions.png"))
    with open(os.path.join(work, "report.md")) as f:
        assert "in-project proxies" in f.read()

    # resumes for free: every network restored, every cell cached, the same numbers
    again = E.train_and_evaluate(c, work, progress=False, log=lambda *_: None)
    np.testing.assert_equal(again["quality"], q)  # (NaN mode shares compare equal)

    # the generate command: a motion in the dataset's format, and its picture
    out = str(tmp_path / "walk.npy")
    E.main(["generate", "a person walks forward", "--workdir", work, "--out", out,
            "--frames", "14"])
    x = np.load(out)
    assert x.shape == (14, 12 * E.default_skeleton().parents.__len__() - 1)
    assert np.all(np.isfinite(x)) and os.path.exists(str(tmp_path / "walk.png"))
    with pytest.raises(SystemExit):  # unknown words and bad lengths are one-line usage errors
        E.main(["generate", "a person moonwalks", "--workdir", work, "--out", out])
    with pytest.raises(SystemExit):
        E.main(["generate", "a person walks forward", "--workdir", work, "--out", out,
                "--frames", "99"])
