"""The REFace experiment: bad configs fail before any work; a smoke run trains the encoders,
the base and every rung of the ladder, swaps and grades face and head swaps, resumes for free,
writes the report; the swap command works on a user's files and refuses bad ones."""

import os

import numpy as np
import pytest
from PIL import Image

from experiments import reface as R


def _smoke_config():
    c = R.get_config()
    c.fast_compile = True
    c.seeds = (0,)
    c.data.update(n_identities=12, test_identities=4, images_per_identity=8, size=16)
    c.encoders.update(steps=2, batch_size=16, width=8, embed_dim=16)
    c.model.update(base_channels=8, channel_mult=(1, 2), width=16, heads=2, mapper_layers=1)
    # the base's optimizer settings equal the rungs': rung A reuses the base's compiled step
    c.finetune.update(steps=2, batch_size=16, unroll_steps=1, unroll_examples=4)
    c.base.update(steps=2, batch_size=16, learning_rate=c.finetune.learning_rate,
                  warmup_steps=c.finetune.warmup_steps, ema_decay=c.finetune.ema_decay)
    c.sample.update(steps=2, num_pairs=8, figure_pairs=4, kid_subsets=5)
    return c


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("data.size", 40, "data.size"),
        ("data.test_identities", 200, "test_identities"),
        ("finetune.head_rate", 1.5, "finetune.head_rate"),
        ("finetune.unroll_steps", 0, "finetune.unroll_steps"),
        ("sample.steps", 2000, "sample.steps"),
        ("sample.start_t", 0.0, "sample.start_t"),
        ("sample.start_t", 0.05, "sample.start_t"),  # below the 15-step grid's first step
        ("model.heads", 3, "model.heads"),
        ("model.channel_mult", (1, 2, 2, 2, 2, 2, 2), "channel_mult"),
        ("encoders.batch_size", 12, "multiple of the 8 devices"),
        ("seeds", (), "seeds"),
    ],
)
def test_bad_config_is_named_before_any_work(tmp_path, key, value, match):
    c = R.get_config()
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match):
        R.train_and_evaluate(c, str(tmp_path))
    assert not os.listdir(tmp_path)


def _save(path, x):
    Image.fromarray(np.round((x + 1) * 127.5).clip(0, 255).astype(np.uint8)).save(path)


# The smoke run in two stages (module fixtures, so each test's setup stays small): the four
# encoders, then the full run in the same workdir, which restores them.


@pytest.fixture(scope="module")
def smoke_encoders(tmp_path_factory):
    c = _smoke_config()
    work = str(tmp_path_factory.mktemp("reface") / "run")
    data = R.load_data(c)
    return c, work, data, R.train_encoders(c, data, work, log=lambda *_: None, progress=False)


@pytest.fixture(scope="module")
def smoke_run(smoke_encoders):
    c, work, _, _ = smoke_encoders
    return c, work, R.train_and_evaluate(c, work, progress=False, log=lambda *_: None)


def test_reface_encoders(smoke_encoders):
    c, work, data, enc = smoke_encoders
    n_unseen = c.data.test_identities
    assert enc.centroids.shape == (n_unseen, c.encoders.embed_dim)
    np.testing.assert_array_equal(enc.unseen, np.arange(data.n_train_ids, data.n_ids))
    # the swap pool holds only identities the diffusion model never saw
    assert set(np.unique(data.pool["identity"])) <= set(enc.unseen.tolist())
    for k, v in enc.sanity.items():
        assert np.isfinite(v), k
    for kind in R.ENCODERS:
        assert os.path.exists(os.path.join(work, f"encoder_{kind}", "metrics.jsonl")), kind


def test_reface_experiment_smoke(smoke_run):
    c, work, report = smoke_run
    q = report["quality"]
    assert len(q) == len(R.VARIANTS) * len(R.MASKS)
    for name, row in q.items():
        for metric, cell in row.items():
            assert len(cell["values"]) == 1 and np.all(np.isfinite(cell["values"])), (name,
                                                                                        metric)
        assert 0.0 <= row["id_top1"]["mean"] <= row["id_top5"]["mean"] <= 1.0
        assert ("hair_err_vs_source" in row) == name.endswith("(head mask)")
    refs = report["references"]
    assert set(refs) == {"target unchanged (face mask)", "target unchanged (head mask)",
                         "source image (ceiling, face)"}
    assert report["finetune"]["steps"] == {v: 2 for v in R.VARIANTS}
    assert len(report["verdict"]) == 5
    assert os.path.exists(os.path.join(work, "swaps.png"))
    with open(os.path.join(work, "report.md")) as f:
        md = f.read()
    assert "REFace in miniature" in md and "in-project proxies" in md


def test_reface_rerun_restores_every_network(smoke_run):
    c, work, report = smoke_run
    # resumes for free: every network restored (no log line added), every cell cached
    dirs = ["base", "encoder_id_train", *(f"rung_{v}_seed0" for v in R.VARIANTS)]
    logs = {}
    for d in dirs:
        with open(os.path.join(work, d, "metrics.jsonl")) as f:
            logs[d] = f.read()
    again = R.train_and_evaluate(c, work, progress=False, log=lambda *_: None)
    assert again["quality"] == report["quality"]
    for d in dirs:
        with open(os.path.join(work, d, "metrics.jsonl")) as f:
            assert f.read() == logs[d], d


def test_reface_swap_command(smoke_run, tmp_path):
    c, work, _ = smoke_run
    # the swap command on a user's files (the finished run's report.json records its config)
    data = R.load_data(c)
    p = data.pool
    files = {}
    for name, i in (("source", 0), ("target", 5)):
        _save(tmp_path / f"{name}.png", p["x"][i])
        Image.fromarray(p["labels"][i]).save(tmp_path / f"{name}_labels.png")
        files[name] = str(tmp_path / f"{name}.png")
        files[name + "_labels"] = str(tmp_path / f"{name}_labels.png")
    args = (work, files["source"], files["source_labels"], files["target"],
            files["target_labels"])
    out = R.swap_files(*args, str(tmp_path / "out.png"), mask="head", steps=4)
    x_t, lab_t = R.read_face(files["target"], files["target_labels"], 16)
    keep = R.region_mask(lab_t[None], "head")[0, ..., 0] > 0.5
    np.testing.assert_array_equal(out[keep], x_t[keep])  # paste-back: exact outside the mask
    assert not np.allclose(out[~keep], x_t[~keep])
    # from the target noised to t = 0.5 (two of the four steps run): another, finite swap
    half = R.swap_files(*args, str(tmp_path / "half.png"), mask="head", steps=4, start_t=0.5)
    np.testing.assert_array_equal(half[keep], x_t[keep])
    assert np.all(np.isfinite(half)) and not np.allclose(half[~keep], out[~keep])
    assert len(R.start_grid(4, 0.5)) == 3 and R.start_grid(4, 1.0)[0] == 1.0
    with pytest.raises(ValueError, match="start_t must leave a step"):
        R.swap_files(*args, str(tmp_path / "o.png"), steps=4, start_t=0.1)
    with pytest.raises(ValueError, match="steps must be an int"):
        R.swap_files(*args, str(tmp_path / "o.png"), steps=0)
    with Image.open(tmp_path / "out.png") as im:
        assert im.size == (16, 16)

    # bad input is one clear error
    blank = tmp_path / "blank_labels.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(blank)
    with pytest.raises(ValueError, match="no face pixel"):
        R.swap_files(work, files["source"], str(blank), files["target"],
                     files["target_labels"], str(tmp_path / "o.png"))
    with pytest.raises(ValueError, match="mask must be one of"):
        R.swap_files(work, files["source"], files["source_labels"], files["target"],
                     files["target_labels"], str(tmp_path / "o.png"), mask="hair")
    with pytest.raises(ValueError, match="no finished reface run"):
        R.swap_files(str(tmp_path / "nothing"), files["source"], files["source_labels"],
                     files["target"], files["target_labels"], str(tmp_path / "o.png"))
    rgb = tmp_path / "rgb_labels.png"
    _save(rgb, p["x"][0])
    with pytest.raises(ValueError, match="single-channel"):
        R.swap_files(work, files["source"], str(rgb), files["target"],
                     files["target_labels"], str(tmp_path / "o.png"))
