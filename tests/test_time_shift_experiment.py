"""The TS-DPM experiment: bad configs fail before any work, the exposure-bias reference is the
forward process' closed form, and a smoke run writes a report with every row."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpm.data import load_digits
from experiments import time_shift as T
from solvers import time_shift
from solvers.grids import uniform_time


def _smoke_config(zoo):
    c = T.get_config()
    c.zoo_root = zoo.root
    c.zoo_train_steps = zoo.steps
    c.judge_steps = zoo.steps
    c.fast_compile = True
    c.kid_subsets = 5
    c.datasets.digits8.num_samples = 20
    c.datasets.digits8.steps = (3,)
    # every sampler path but strided DDPM's (which shares DDIM's state-variance path; its
    # program is traced in test_every_sampler_program_traces): two fewer XLA programs
    c.datasets.digits8.samplers = ("ddim", "f_pndm", "dpm_solver")
    c.run = ("digits8",)
    c.tune.steps = 3
    c.tune.num_samples = 20
    c.tune.windows = (40,)
    c.tune.cutoffs = (0.2,)
    c.exposure.steps = (3,)
    return c


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("datasets.digits8.samplers", ("ddim", "heun"), "datasets.digits8.samplers"),
        ("datasets.digits8.steps", (10, 0), "datasets.digits8.steps"),
        ("datasets.digits16.steps", (1001,), "datasets.digits16.steps"),
        ("datasets.digits8.image_size", 32, "datasets.digits8.image_size"),
        ("tune.windows", (4, -2), "tune.windows"),
        ("tune.windows", (1000,), "tune.windows"),
        ("tune.windows", (4, 250), "reaches above the current time"),
        ("tune.cutoffs", (0.3, 1.5), "tune.cutoffs"),
        ("tune.cutoffs", (float("nan"),), "tune.cutoffs"),
        ("tune.seed", 1, "tune.seed"),
        ("tune.dataset", "cifar", "tune.dataset"),
        ("exposure.steps", (10, 1), "exposure.steps"),
        ("exposure.dataset", "digits16", "exposure.dataset"),
        ("datasets.digits8.samplers", ("f_pndm",), "must run 'ddim'"),
        ("seeds", (), "seeds"),
        ("run", ("digits8", "mnist"), "run"),
    ],
)
def test_bad_config_is_named_before_any_work(tmp_path, key, value, match):
    c = T.get_config()
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
        node = node[p]
    node[leaf] = value
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match):
        T.train_and_evaluate(c, str(workdir), progress=False, log=lambda *a: None)
    assert not workdir.exists()  # nothing trained, nothing written


def test_window_fits_the_grid_stride():
    # 50 steps: stride 20 training indices; a half-window of 20 could aim a step at its start
    assert T.window_fits(38, 50) and not T.window_fits(40, 50) and not T.window_fits(60, 50)
    assert T.window_fits(60, 20) and T.window_fits(198, 5) and not T.window_fits(200, 10)


def test_forward_variance_matches_closed_form_and_noised_data():
    from experiments._model import make_schedule
    from experiments._zoo import digits_config

    schedule = make_schedule(digits_config("eps", 8).diffusion)
    # independent truth: DDPM's linear betas, alpha_bar at grid index i sits at t = (i+1)/N
    alpha_bar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    idx = np.array([999, 799, 499, 199, 49, 0])
    ts = (idx + 1) / 1000
    x0 = load_digits(8)["x"][:600]
    v0 = np.mean(np.var(x0.reshape(len(x0), -1), axis=1, ddof=1))
    ref = alpha_bar[idx] * v0 + (1.0 - alpha_bar[idx])
    np.testing.assert_allclose(T.forward_variance(schedule, ts, v0), ref, rtol=2e-4)
    # Monte Carlo: noised digits; sd of the mean from the chi^2 and cross terms
    emp = T.empirical_forward_variance(schedule, x0, ts, seed=3)
    D = x0[0].size
    s2 = 1.0 - alpha_bar[idx]
    sd = np.sqrt((2 * s2**2 + 4 * alpha_bar[idx] * s2 * v0) / ((D - 1) * len(x0)))
    assert np.all(np.abs(emp - ref) < 5 * sd + 1e-9), (emp, ref, sd)
    # the TS rule's reference ignores the data variance: Gamma-matched index >= grid index
    rows = T.exposure_rows(schedule, ts, ref, v0)
    for r in rows:
        assert r["ratio"] == pytest.approx(1.0, rel=1e-4)
        assert abs(r["implied_index_forward"] - r["index"]) < 1.0
        # (or no index at all: at t = 1 the forward variance exceeds every Gamma)
        g = r["implied_index_gamma"]
        assert (np.isnan(g) and r["t"] == 1.0) or g >= r["index"] - 1.0, r
    # a variance no forward time reaches has no matching index (NaN, not the grid's end)
    assert np.isnan(T.implied_index(schedule, np.array([1.2]), v0)).all()
    assert np.isnan(T.implied_index(schedule, np.array([0.5 * v0]), v0)).all()


def test_smoke_report_rows_exposure_and_window_zero(tmp_path, smoke_zoo):
    c = _smoke_config(smoke_zoo)
    workdir = str(tmp_path / "ts")
    report = T.train_and_evaluate(c, workdir, progress=False, log=lambda *a: None)

    # report files with one row per sampler (and the floor)
    with open(os.path.join(workdir, "report.md")) as f:
        md = f.read()
    smoke_samplers = c.datasets.digits8.samplers
    for name in smoke_samplers:
        assert f"| {T.SAMPLERS[name]}, 3 steps |" in md
    assert "real train digits (floor" in md
    assert "in-project prox" in md
    with open(os.path.join(workdir, "report.json")) as f:
        data = json.load(f)["data"]
    rows = data["datasets"]["digits8"]["rows"]
    assert sorted(rows) == sorted(f"{s}/3" for s in smoke_samplers)
    for s in ("exposure_bias.png", "kid_vs_nfe.png"):
        assert os.path.getsize(os.path.join(workdir, s)) > 1000

    r = report["datasets"]["digits8"]
    for key, row in r["rows"].items():
        assert len(row["base"]["kid"]["values"]) == 3 and len(row["dkid"]["values"]) == 3
        assert row["window"] == 40 and row["cutoff"] == 0.2
        # the middle step (t = 2/3 -> 1/3) is above the cutoff: TS moves targets there, within
        # the window; on the state-variance path (DDIM/DDPM/PNDM) towards the noisier edge,
        # since a state's pixel variance exceeds Gamma = 1 - alpha_bar near its label
        sh = row["ts"]["shift"]
        assert sh["frac_shifted"] > 0 and abs(sh["mean_shift"]) <= 20, (key, sh)
        if row["sampler"] != "dpm_solver":
            assert sh["mean_shift"] > 0, (key, sh)
        assert row["base"]["shift"]["frac_shifted"] == 0
        for variant in ("base", "ts"):
            ex = r["exposure"][key][variant]
            assert len(ex) == 4
            ratio = np.array([e["ratio"] for e in ex])
            assert np.all(np.isfinite(ratio)) and np.all(ratio > 0)
            # x_T is standard normal: its pixel variance is the forward one at t = 1
            assert ratio[0] == pytest.approx(1.0, abs=0.1)
    # F-PNDM reports its warm-up evaluations: 3 steps are all pseudo-RK4 (4 NFE each)
    assert rows["f_pndm/3"]["base"]["nfe"] == 12 and rows["ddim/3"]["base"]["nfe"] == 3

    # TS with window 0 is the base sampler exactly, here through the experiment's own programs
    # on the U-Net for DDIM (every sampler's window-0 identity is tested on the analytic
    # mixture in test_time_shift.py and test_dpm_solver.py; the base program is the run's,
    # cached; the window-0 wrapper is compiled here)
    from experiments._zoo import digits_model

    trained = digits_model(T.zoo_config(c, 8), c.zoo_root, progress=False)
    labels = np.arange(20) % 10
    den = trained.denoiser({"label": jnp.asarray(labels)})
    k_x, k_s = jax.random.split(jax.random.key(0))  # as T.sample at seed 0
    x_T = jax.random.normal(k_x, (20, 8, 8, 1))
    ts = uniform_time(3, trained.schedule, t_end=0.0)
    base = T.sample(trained, "ddim", 3, labels, 0, fast=True)["x0"]
    wrapped = time_shift(T.base_sampler("ddim"), window=0, cutoff=0.2)
    ts0 = jax.jit(lambda d, x, t, k: wrapped(d, x, t, key=k),
                  compiler_options={"xla_backend_optimization_level": 0})
    np.testing.assert_array_equal(base, np.asarray(ts0(den, x_T, ts, k_s)))


@pytest.mark.parametrize("name", list(T.SAMPLERS))
@pytest.mark.parametrize("window", [None, 40])
def test_every_sampler_program_traces(name, window):
    """Each of the experiment's programs (base and TS) traces on a U-Net denoiser with the
    output shapes ``sample`` relies on (abstract evaluation: no compile)."""
    import nets
    from experiments._model import build_unet, make_denoiser, make_schedule
    from experiments._zoo import digits_config

    zc = digits_config("eps", 8)
    g, p = build_unet(nets.tiny(image_size=8, channels=1, num_classes=10), 0)
    den = make_denoiser(g, p, make_schedule(zc.diffusion), zc.diffusion,
                        {"label": jnp.zeros((5,), jnp.int32)})
    ts = uniform_time(3, t_end=0.0)
    prog = T._program(name, window, True)
    x0, var, t_next, nfe = jax.eval_shape(prog, den, jnp.zeros((5, 8, 8, 1)), ts,
                                          jax.random.key(0), jnp.float32(0.2))
    assert x0.shape == (5, 8, 8, 1) and var.shape == (4,) and t_next.shape == (3, 5)
    assert nfe.shape == ()
