"""The DPM-Solver++ experiment: bad input refused before any work, the analytic-mixture
comparison converges to its exact reference, and a tiny digits run writes the full report."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpm
from experiments import dpm_solver_pp as exp
from experiments._cli import apply_overrides


def _config(overrides):
    return apply_overrides(exp.get_config(), overrides)


@pytest.mark.parametrize(
    "override, field",
    [
        ("samplers=('dpm++2m', 'unipc')", "samplers"),
        ("nfes=(2, 10)", "nfes"),
        ("nfes=(10, 501)", "nfes"),
        ("scales=(1.0, 0.5)", "scales"),
        ("scales=(1.0, 25.0)", "scales"),
        ("threshold=1.5", "threshold"),
        ("threshold=0.0", "threshold"),
        ("grid='karras'", "grid"),
        ("digits.kid_scales=(30.0,)", "digits.kid_scales"),
        ("digits.kid_nfe=1", "digits.kid_nfe"),
        ("mixture.reference_steps=60", "mixture.reference_steps"),
        ("seeds=(0, 0)", "seeds"),
    ],
)
def test_bad_input_is_refused_before_any_work(tmp_path, override, field):
    config = _config([override])
    with pytest.raises(ValueError, match=f"config.{field}"):
        exp.train_and_evaluate(config, str(tmp_path / "w"), progress=False, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "w")  # nothing ran, nothing was written


def test_class_mixture_denoiser_is_exact(x64):
    """The conditional branch is the component's own Gaussian denoiser and the null label the
    whole mixture's (independent: GaussianMixture's own denoisers)."""
    config = exp.get_config()
    sched = dpm.DiscreteVP.from_name("linear")
    base, means, std = exp.class_mixture(config, sched)
    K, D = means.shape
    x = jax.random.normal(jax.random.key(0), (6, D), jnp.float64)
    t = jnp.full((6,), 0.4)
    labels = jnp.array([0, 3, 9, K, K, 5])
    got = jax.jit(lambda b, x, t, lab: b.with_cond({"label": lab}).eps(x, t))(base, x, t, labels)
    full = dpm.GaussianMixture.create(means, std)
    eps = jax.jit(lambda gm, x, t: gm.denoiser(sched).eps(x, t))
    for i, k in enumerate(np.asarray(labels)):
        gm = full if k == K else dpm.GaussianMixture.create(means[k : k + 1], std)
        want = eps(gm, x[i : i + 1], t[i : i + 1])[0]
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)


def test_batched_thresholding_matches_the_library(x64):
    """Plain and thresholded examples in one batch (one network call) give exactly what
    ``dpm.dynamic_thresholding`` and the plain guided denoiser give apart."""
    config = exp.get_config()
    sched = dpm.DiscreteVP.from_name("linear")
    base, means, _ = exp.class_mixture(config, sched)
    K, D = means.shape
    x = 3.0 * jax.random.normal(jax.random.key(1), (4, D), jnp.float64)
    labels, scales = np.array([1, 2, 1, 2]), np.array([8.0, 8.0, 8.0, 8.0])
    mask = np.array([True, True, False, False])
    # under jit, as the samplers run it
    both = jax.jit(lambda d, x: d.x0(x, 0.5))(exp.guided(base, labels, scales, K, 0.9, mask), x)
    thr = exp.guided(base, labels, scales, K, 0.9).x0(x, 0.5)
    plain = exp.guided(base, labels, scales, K, None).x0(x, 0.5)
    assert float(jnp.max(jnp.abs(plain[:2]))) > 1.5  # thresholding has work to do here
    np.testing.assert_allclose(both[:2], thr[:2], rtol=1e-12)
    np.testing.assert_allclose(both[2:], plain[2:], rtol=1e-12)
    assert float(jnp.max(jnp.abs(both[:2]))) <= 1.0


def test_mixture_run_converges_and_reports(tmp_path):
    workdir = str(tmp_path / "mix")
    config = _config([
        "digits.enabled=False", "seeds=(0, 1)", "samplers=('dpm++2m',)",
        "nfes=(5, 10, 20)", "scales=(1.0, 8.0)", "mixture.samples=4",
        "mixture.reference_steps=200", "mixture.grid_ablation=False",
    ])
    report = exp.train_and_evaluate(config, workdir, progress=False, log=lambda *_: None)
    agg = report["_mixture_agg"]

    def dist(name, nfe, scale, tkey="plain"):
        return agg[("log_snr", name, tkey, nfe, scale)]["distance"]["mean"]

    # DPM-Solver++(2M) converges to the reference at scale 1 and 8 (with and without
    # thresholding), each doubling of NFE cutting the error
    for scale in (1.0, 8.0):
        for tkey in ("plain", "thresholded"):
            e = [dist("dpm++2m", n, scale, tkey) for n in (5, 10, 20)]
            assert e[0] > e[1] > e[2], (scale, tkey, e)
    assert dist("dpm++2m", 20, 1.0) < 0.01
    # at scale 1 the guided model is the conditional Gaussian: the reference is its exact flow
    for seed_check in report["mixture"]["reference_check"]["plain"].values():
        assert seed_check["exact_flow_scale_1"] < 1e-3
        assert seed_check["8"] < 1e-2  # ++(3M) and ++(2M) references agree
    # thresholding keeps the guided outputs in range
    sat = agg[("log_snr", "dpm++2m", "thresholded", 20, 8.0)]["sat_pixels"]["mean"]
    assert sat <= agg[("log_snr", "dpm++2m", "plain", 20, 8.0)]["sat_pixels"]["mean"]
    assert report["verdict"]

    with open(os.path.join(workdir, "report.md")) as f:
        md = f.read()
    assert md.count("| DPM-Solver++(2M) + thresholding |") == 2  # one table per scale
    assert "guidance scale 8" in md and "Headline check" in md
    assert os.path.getsize(os.path.join(workdir, "convergence.png")) > 1000
    with open(os.path.join(workdir, "report.json")) as f:
        data = json.load(f)["data"]
    rows = data["mixture_settings"]
    assert len(rows) == 2 * 3 * 2  # thresholding x NFE x scales
    assert {r["sampler"] for r in rows} == {"dpm++2m"}


def test_digits_tiny_run_writes_the_full_report(tmp_path, smoke_zoo):
    workdir = str(tmp_path / "dig")
    config = _config([
        "mixture.enabled=False", "seeds=(0, 1)", "samplers=('dpm++2m',)", "nfes=(3,)",
        "scales=(1.0, 8.0)", "digits.reference_steps=6", "digits.conv_samples=2",
        "digits.check_samples=1", "digits.kid_samples=10", "digits.kid_nfe=3",
        "digits.kid_scales=(8.0,)", f"digits.zoo_root={smoke_zoo.root}",
        f"digits.train_steps={smoke_zoo.steps}", f"digits.judge_steps={smoke_zoo.steps}",
    ])
    report = exp.train_and_evaluate(config, workdir, progress=False, log=lambda *_: None)
    assert report["digits"]["train_steps"] == 2
    q = report["_quality_agg"]
    assert set(q) == {("dpm++2m", "plain", 8.0), ("dpm++2m", "thresholded", 8.0)}
    for v in q.values():
        assert 0 <= v["accuracy"]["mean"] <= 1 and np.isfinite(v["kid"]["mean"])
        assert 0 <= v["sat_pixels"]["mean"] <= 1 and len(v["kid"]["values"]) == 2
    conv = report["_digits_agg"]
    for key, v in conv.items():
        assert np.isfinite(v["distance"]["mean"]) and 0 <= v["nonfinite"]["mean"] <= 1, key
    with open(os.path.join(workdir, "report.md")) as f:
        md = f.read()
    assert "real train-split digits (floor)" in md and "Judge:" in md
    assert "DPM-Solver++(2M) + thr, scale 8" in md
    for f in ("report.json", "convergence.png", "saturation.png"):
        assert os.path.exists(os.path.join(workdir, f)), f
