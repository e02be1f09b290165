"""experiments.bdia: the whole pipeline in a smoke configuration (on the session's smoke zoo),
its exactness claims on the untrained network, the NFE it reports against the samplers' own
counts, and bad settings refused before any work."""

import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpm import GaussianMixture
from experiments import bdia
from experiments._cli import apply_overrides
from experiments._zoo import digits_config
from solvers import bdia_ddim, bdia_edm, ddim, edm_heun

SMOKE = [
    "seeds=(0,)",
    "fast_compile=True",
    "quality.num_samples=20",
    "quality.steps=(3,)",
    "quality.edm_steps=(3,)",
    "quality.gammas=(1.0,)",
    "quality.edm_gammas=(0.5,)",
    "quality.kid_subsets=2",
    "invert.num_images=8",
    "invert.steps=(3,)",
    "edit.num_images=8",
    "edit.steps=3",
    "edit.t_starts=(1.0,)",
    "edit.grid_rows=2",
]


def _smoke_config(zoo):
    """The smoke settings on ``zoo`` (the ``smoke_zoo`` fixture)."""
    return apply_overrides(bdia.get_config(), [*SMOKE, f"zoo_root={zoo.root}",
                                               f"zoo_train_steps={zoo.steps}",
                                               f"judge_steps={zoo.steps}"])


def _run(tmp_path, zoo, parts):
    workdir = str(tmp_path / "bdia")
    config = apply_overrides(_smoke_config(zoo), [f"parts={parts!r}"])
    report = bdia.train_and_evaluate(config, workdir, progress=False, log=lambda s: None)
    with open(os.path.join(workdir, "report.json")) as f:
        saved = json.load(f)
    assert "in-project" in saved["judge"]
    with open(os.path.join(workdir, "report.md")) as f:
        md = f.read()
    return workdir, report, md


def test_bdia_experiment_smoke_quality(tmp_path, smoke_zoo):
    workdir, report, md = _run(tmp_path, smoke_zoo, ("quality",))
    for f in ("report.md", "report.json", "kid_vs_nfe_eps.png", "kid_vs_nfe_edm.png"):
        assert os.path.getsize(os.path.join(workdir, f)) > 0, f
    assert not os.path.exists(os.path.join(workdir, "edit_grid.png"))
    assert report["inversion"] is None and report["edit"] is None

    q = report["quality"]["rows"]
    assert list(q) == ["DDIM, 3 steps", "BDIA-DDIM g=1, 3 steps", "EDM-Heun, 3 steps",
                       "BDIA-EDM g=0.5, 3 steps"]
    assert [q[r]["nfe"] for r in q] == [3, 3, 5, 5]
    for r in q.values():
        assert 0.0 <= r["accuracy"]["mean"] <= 1.0 and np.isfinite(r["kid"]["mean"])
    assert "dkid" in q["BDIA-DDIM g=1, 3 steps"] and "dkid" not in q["DDIM, 3 steps"]
    assert "BDIA-EDM g=0.5, 3 steps" in md and "Judge" in md and "Exact inversion" not in md


def test_bdia_experiment_smoke_inversion_and_edit(tmp_path, smoke_zoo):
    workdir, report, md = _run(tmp_path, smoke_zoo, ("inversion", "edit"))
    assert os.path.getsize(os.path.join(workdir, "edit_grid.png")) > 0
    assert report["quality"] is None and "Quality at equal NFE" not in md

    # exact inversion on the (barely trained) U-Net: BDIA reproduces the digits to float
    # round-off; DDIM inversion does not, and neither does BDIA sampling with its pair broken
    inv = report["inversion"]["rows"]
    b32, b64 = inv["BDIA g=1, 3 steps, float32"], inv["BDIA g=1, 3 steps, float64"]
    d32 = inv["DDIM inversion, 3 steps, float32"]
    broken = inv["BDIA g=1, x_next dropped, 3 steps, float32"]
    assert b64["state_dtype"] == "float64" and b32["state_dtype"] == "float32"
    assert b32["max_abs"] < 1e-4, b32
    assert b64["max_abs"] < 1e-10, b64
    assert d32["max_abs"] > 1e-2 and d32["max_abs"] > 1e3 * b32["max_abs"]
    assert broken["max_abs"] > 1e-2
    assert b32["psnr"] > 80.0 or b32["n_exact"] == 8
    assert d32["psnr"] < 60.0

    e = report["edit"]["rows"]
    assert set(e) == {"real digit of the target class (reference)",
                      "DDIM-inversion edit, from t=1", "BDIA g=1 edit, from t=1"}
    for r in e.values():
        assert 0.0 <= r["acc_target"] <= 1.0 and np.isfinite(r["psnr_src_keep"])
    assert "Exact inversion" in md and "Editing" in md


@pytest.mark.parametrize(
    "override, name",
    [
        ("quality.samplers=('ddim', 'bdia_dim')", "quality.samplers"),
        ("quality.steps=(10, 0)", "quality.steps"),
        ("quality.edm_steps=(2.5,)", "quality.edm_steps"),
        ("quality.gammas=(0.5, 1.5)", "quality.gammas"),
        ("quality.edm_gammas=(-0.1,)", "quality.edm_gammas"),
        ("quality.edm_backward_solver=rk4", "quality.edm_backward_solver"),
        ("parts=('quality', 'invert')", "parts"),
        ("parts=()", "parts"),
        ("invert.gamma=0.0", "invert.gamma"),
        ("invert.steps=(0,)", "invert.steps"),
        ("edit.gamma=1.2", "edit.gamma"),
        ("edit.t_starts=(0.0,)", "edit.t_starts"),
        ("invert.num_images=100000", "invert.num_images"),
        ("quality.num_samples=1", "quality.num_samples"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, override, name):
    zoo = types.SimpleNamespace(root=str(tmp_path / "zoo"), steps=2)
    config = apply_overrides(_smoke_config(zoo), [override])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        bdia.train_and_evaluate(config, str(tmp_path / "bdia"), progress=False,
                                log=lambda s: None)
    assert not os.path.exists(tmp_path / "zoo") and not os.path.exists(tmp_path / "bdia")


def test_reported_nfe_is_the_samplers_own_count():
    """The NFE column against each sampler's own count (its trajectory's ``nfe``), on an exact
    mixture denoiser with the zoo models' schedules, for both BDIA-EDM backward maps."""
    from experiments._model import make_schedule

    mix = GaussianMixture.create(jnp.array([[1.0, -0.5], [-1.0, 0.5]]), jnp.array([0.3, 0.4]),
                                 [0.5, 0.5])
    x_T = jax.random.normal(jax.random.key(0), (4, 2))
    for bw in ("euler", "heun"):
        config = apply_overrides(bdia.get_config(), [
            "quality.steps=(1, 4)", "quality.edm_steps=(1, 4)", "quality.gammas=(1.0,)",
            "quality.edm_gammas=(1.0,)", f"quality.edm_backward_solver={bw}"])
        scheds = {k: make_schedule(digits_config(k).diffusion) for k in ("eps", "edm")}
        fns = {"ddim": ddim, "bdia_ddim": bdia_ddim, "edm_heun": edm_heun,
               "bdia_edm": functools.partial(bdia_edm, backward_solver=bw)}
        for row in bdia.quality_rows(config):
            den = mix.denoiser(scheds[row["model"]])
            kw = {"gamma": row["gamma"]} if row["sampler"].startswith("bdia") else {}
            _, traj = fns[row["sampler"]](den, x_T, bdia.grid(row, den.schedule),
                                          return_trajectory=True, **kw)
            assert int(traj["nfe"]) == row["nfe"], (bw, row)
