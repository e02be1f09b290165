"""The README's main job runs end to end in a smoke configuration, its samplers beat a broken
sampler under an exact (memorising) denoiser, and re-running resumes."""

import json
import os

import jax.numpy as jnp
import numpy as np

import dpm
from experiments import quickstart
from experiments._cli import apply_overrides
from experiments._runner import train_denoiser

SMOKE = [
    "train.steps=4",
    "train.ckpt_every=2",
    "train.log_every=2",
    "train.batch_size=32",
    "train.fast_compile=True",
    "eval.num_samples=60",
    "eval.nfe=3",
    "eval.edm_steps=2",
    "eval.ddpm_steps=6",
    "eval.classifier_steps=40",
    "eval.denoiser=oracle",
]


def _steps_logged(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f]


def test_quickstart_smoke_oracle_and_resume(tmp_path, capsys):
    workdir = str(tmp_path / "qs")
    report = quickstart.main(["--workdir", workdir, *("--config." + s for s in SMOKE)])
    first = capsys.readouterr().out
    assert "judges:" in first and "grading:" in first and "[1/" in first
    res = report["samplers"]
    floor, noise = res["real train digits (floor)"], res["Gaussian noise (broken sampler)"]
    rows = {k: v for k, v in res.items() if v["nfe"] > 0}
    solvers = {k.split(",")[0] for k in rows}
    assert solvers == {"DDIM", "TS-DDIM", "F-PNDM", "DPM-Solver++(2M)", "EDM-Heun", "DDPM"}
    assert {k.split(", ")[1] for k in rows if k.startswith("EDM-Heun")} == {
        "uniform-t", "karras", "log-SNR", "karras from 80"}
    assert report["num_samples"] == 60 and floor["n"] == 60

    # With the exact denoiser of the train split every sampler should produce digit-like
    # images: far closer to the test split than pure noise (the output of a broken sampler),
    # with the data's spectrum (noise puts ~81% of its power above half-Nyquist).
    # (The smoke judge is barely trained, so KID is compared with the noise row's, not with
    # absolute values. At 3 NFE Heun only works on the uniform-t grid, see the module docs.)
    assert noise["hfer"] > floor["hfer"] + 0.3
    assert noise["kid"] > 10 * abs(floor["kid"])
    for name in ("DDIM", "DPM-Solver++(2M), uniform-t", "DPM-Solver++(2M), log-SNR",
                 "EDM-Heun, uniform-t", "DDPM"):
        r = next(v for k, v in rows.items() if k.startswith(name))
        assert r["kid"] < 0.2 * noise["kid"], (name, r["kid"], noise["kid"])
        assert abs(r["hfer"] - floor["hfer"]) < 0.5 * (noise["hfer"] - floor["hfer"]), name
        assert r["frac_nonfinite"] == 0.0
    for r in res.values():
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["precision"] <= 1 and r["fd"] >= 0

    assert report["train"]["steps"] == 4
    with open(os.path.join(workdir, "report.json")) as f:
        saved = json.load(f)
    assert saved["data"]["train"]["steps"] == 4 and "Judge:" in saved["judge"]
    with open(os.path.join(workdir, "report.md")) as f:
        md = f.read()
    assert "real train digits (floor)" in md and "proxies" in md
    pngs = [p for p in os.listdir(os.path.join(workdir, "samples")) if p.endswith(".png")]
    assert len(pngs) == len(rows)
    assert _steps_logged(workdir) == [2, 4]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # the train step's first call (its compile) is timed once, in the first record
    assert records[0]["compile_s"] > 0 and "compile_s" not in records[1]
    assert "train step 0 compiled and ran once in" in first

    # a re-run with nothing changed reads every sampler's row back; a changed setting
    # recomputes only the rows it touches (here TS-DDIM's cutoff)
    n_rows = len(rows)
    again = quickstart.main(["--workdir", workdir, *("--config." + s for s in SMOKE)])
    out = capsys.readouterr().out
    assert out.count("cached") == n_rows, out
    assert again["samplers"].keys() == res.keys()
    for k, v in res.items():
        assert again["samplers"][k] == v, k
    quickstart.main(["--workdir", workdir, *("--config." + s for s in SMOKE),
                     "--config.eval.ts_cutoff=0.5"])
    out = capsys.readouterr().out
    assert out.count("cached") == n_rows - 1 and "t_c=0.5" in out, out

    # re-running with more steps resumes from step 4 (parameters, data position) instead of
    # starting over; a finished run trains nothing
    config = apply_overrides(quickstart.get_config(), [*SMOKE, "train.steps=6"])
    trained = train_denoiser(config, workdir, progress=False)
    assert trained.steps_run == 2 and int(trained.state.step) == 6
    assert _steps_logged(workdir) == [2, 4, 6]
    again = train_denoiser(config, workdir, progress=False)
    assert again.steps_run == 0 and int(again.state.step) == 6


def test_memorizing_denoiser_is_the_exact_posterior_mean(x64):
    # Three images, brute-force posterior over the components of the given label (the null
    # label 10 allows all)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 2, 2, 1))
    labels = np.array([0, 1, 1])
    schedule = dpm.DiscreteVP.from_name("linear")
    x = jnp.asarray(rng.standard_normal((2, 2, 2, 1)))
    t, std = 0.3, 0.1
    den = quickstart.memorizing_denoiser(images, labels, std, schedule,
                                         {"label": jnp.array([1, 10])})
    got = np.asarray(den.x0(x, t))
    a, s = float(schedule.alpha(t)), float(schedule.sigma(t))
    v = a**2 * std**2 + s**2
    for b, allowed in ((0, [1, 2]), (1, [0, 1, 2])):
        xf = np.asarray(x[b]).ravel()
        logw = np.array([-np.sum((xf - a * images[k].ravel()) ** 2) / (2 * v) for k in allowed])
        w = np.exp(logw - logw.max())
        w /= w.sum()
        post = sum(wk * (images[k].ravel() + a * std**2 / v * (xf - a * images[k].ravel()))
                   for wk, k in zip(w, allowed, strict=True))
        np.testing.assert_allclose(got[b].ravel(), post, rtol=1e-10)
    assert np.isfinite(got).all()
