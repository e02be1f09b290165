"""Smoke test of the sampler benchmark (its --quick path) and a check of its reference flow."""

import json

import jax
import jax.numpy as jnp
import numpy as np

import dpm
from experiments import bench_solvers


def test_reference_flow_matches_the_closed_form_flow(x64):
    """The RK4 reference against the exact flow of a single Gaussian (std != 1), float64
    (measured: 1e-8 at 256 steps, 4e-11 at 1024: fourth order)."""
    gm = dpm.GaussianMixture.gaussian(jnp.array([0.5, -1.0]), 0.3)
    sched = dpm.DiscreteVP.from_name("linear")
    x_T = gm.sample_marginal(jax.random.key(0), sched, 1.0, 8)
    ref = bench_solvers.reference_flow(gm, sched, x_T, 1024)
    np.testing.assert_allclose(ref, gm.flow(sched, x_T, 1.0, 0.0), atol=1e-9)


def test_quick_benchmark_smoke(tmp_path, capsys):
    results = bench_solvers.main(["--quick", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    assert (tmp_path / "error_vs_nfe.png").stat().st_size > 10_000
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["problems"][0]["problem"] == "ring2d"
    names = [m.name for m in bench_solvers.METHODS]
    rows = {r["sampler"]: r for r in saved["problems"][0]["rows"]}
    assert sorted(rows) == sorted(names)
    for name in names:
        assert name in table, name
        r = rows[name]
        assert r["finite"] and 0 < r["nfe"] <= r["nfe_target"] == 10
        assert r["us_per_sample"] > 0 and r["compile_s"] > 0
        assert (r["flow_rmse"] is None) == r["stochastic"]
    # the reference's own error is far below every sampler's
    ref_err = saved["problems"][0]["reference"]["rmse_vs_half_steps"]
    assert ref_err < 1e-2 * min(r["flow_rmse"] for r in rows.values() if r["flow_rmse"])
    # DDIM and DPM-Solver-1 are the same method; the 2M/3M multistep solvers beat it at 10 NFE
    assert rows["dpm_solver_3M"]["flow_rmse"] < rows["ddim"]["flow_rmse"]
    assert results["problems"][0]["rows"][0]["sampler"] == names[0]
