"""DDPM and DDIM: convergence order, the DDIM(eta=1) == strided DDPM identity, the DDPM posterior
against its closed form, distributional correctness on a mixture oracle, point-mass exactness,
inversion round trips, and the JAX contract (jit, vmap, grad, sharding, one compile)."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from jax.scipy.special import ndtr
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial
from test_grids import every_sampler, mixture_denoiser

import solvers
from dpm.denoiser import Denoiser, classifier_free_guidance
from dpm.oracle import GaussianMixture
from dpm.schedules import DiscreteVP, LinearVP
from solvers import grids
from solvers.ddim import ddim, ddim_invert
from solvers.ddpm import ddpm

LINEAR = DiscreteVP.from_name("linear")
MU = jnp.array([0.5, -1.0])
TRAJ = dict(return_trajectory=True)
# jitted once for the module: tests with equal shapes share compilations
DDIM = jit(ddim, static_argnames="return_trajectory")
DDPM = jit(ddpm, static_argnames=("variance", "return_trajectory"))
INVERT = jit(ddim_invert, static_argnames="return_trajectory")


def randn(*shape, seed=0):
    """Test inputs from numpy (no per-shape compilation of jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


@functools.cache
def ddim_on_grids():
    """``ddim`` vmapped over a stack of grids of equal length, jitted once for the module."""
    return jit(jax.vmap(ddim, in_axes=(None, None, 0)))


def slope(steps, errs):
    return float(np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(errs), 1)[0])


# --------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------


def test_ddim_order_one(x64):
    sched = LinearVP()
    gm = GaussianMixture.gaussian(MU, 0.5)
    den = gm.denoiser(sched)
    x_T = randn(4, 2)
    run = ddim_on_grids()  # lambda- and t-uniform at once
    steps = [10, 20, 40, 80, 160]
    errs = []
    for S in steps:
        ts = jnp.stack([grids.uniform_log_snr(S, sched), grids.uniform_time(S, sched)])
        ref = gm.flow(sched, x_T, ts[0, 0], ts[0, -1])
        errs.append(np.max(np.abs(run(den, x_T, ts) - ref), axis=(1, 2)))
    errs = np.array(errs)
    slopes = [slope(steps, errs[:, j]) for j in range(2)]
    print(f"DDIM(eta=0) order: lambda-uniform {slopes[0]:.3f}, t-uniform {slopes[1]:.3f}")
    np.testing.assert_allclose(slopes, 1.0, atol=0.3)


def test_ddim_step_is_ddim_map_for_every_parameterization(x64):
    gm = GaussianMixture.create(jnp.array([[1.0, 0.0], [-1.0, 0.5]]), jnp.array([0.2, 0.4]))
    x_T = randn(5, 2, seed=1)
    ts = grids.ddim_quadratic(6, LINEAR)  # ends at t = 0
    x_eps, traj = DDIM(gm.denoiser(LINEAR, "eps"), x_T, ts, return_trajectory=True)
    x_x0 = DDIM(gm.denoiser(LINEAR, "x0"), x_T, ts)
    np.testing.assert_allclose(x_x0, x_eps, atol=1e-9)
    assert np.all(np.isfinite(x_x0))
    # step by step: x_{i+1} = alpha_{i+1} x0_hat_i + sigma_{i+1} eps_hat_i, eps_hat at (x_i, t_i)
    a, s = LINEAR.alpha(ts[1:]), LINEAR.sigma(ts[1:])
    want = a[:, None, None] * traj["x0"] + s[:, None, None] * traj["eps"]
    np.testing.assert_allclose(traj["x"][1:], want, atol=1e-12)
    np.testing.assert_allclose(x_eps, traj["x0"][-1], atol=1e-12)  # into t = 0: x0_hat
    assert int(traj["nfe"]) == 6


def test_ddim_eta1_equals_strided_ddpm_fixed_small(x64):
    gm = GaussianMixture.create(jnp.array([[1.0, 0.0], [-1.0, 0.5]]), jnp.array([0.2, 0.4]))
    den = gm.denoiser(LINEAR)
    x_T = randn(6, 2, seed=2)
    ts = grids.ddim_uniform(10, LINEAR)  # strided, ends at t = 0: no noise there in either
    key = jax.random.key(3)
    _, a = DDPM(den, x_T, ts, key=key, variance="fixed_small", return_trajectory=True)
    _, b = DDIM(den, x_T, ts, key=key, eta=1.0, return_trajectory=True)
    np.testing.assert_allclose(a["x"], b["x"], atol=1e-10)
    # with noise from other keys the two differ: the identity is not vacuous
    _, c = DDIM(den, x_T, ts, key=jax.random.key(4), eta=1.0, **TRAJ)
    assert np.max(np.abs(c["x"][-1] - a["x"][-1])) > 1e-3


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_step_is_the_posterior(x64, variance):
    """One strided step 600 -> 300 against spec §2 in numpy: mean and variance."""
    gm = GaussianMixture.create(jnp.array([[1.0, 0.0], [-1.0, 0.5]]), jnp.array([0.2, 0.4]))
    den = gm.denoiser(LINEAR)
    ab = np.asarray(LINEAR.alphas_cumprod)
    s, t = 600, 300
    beta = 1.0 - ab[s] / ab[t]
    var = beta * (1 - ab[t]) / (1 - ab[s]) if variance == "fixed_small" else beta
    x = jnp.array([[0.3, -0.7]])
    x0 = np.asarray(den.x0(x, (s + 1) / 1000))
    mean = np.sqrt(ab[t]) * beta / (1 - ab[s]) * x0 + np.sqrt(1 - beta) * (1 - ab[t]) / (
        1 - ab[s]
    ) * np.asarray(x)
    ts1 = jnp.array([s + 1, t + 1]) / 1000.0
    # last step: no noise, the mean itself
    got = DDPM(den, x, ts1, key=jax.random.key(0), variance=variance)
    np.testing.assert_allclose(got, mean, rtol=1e-10)
    # not last: mean + sqrt(var) z; statistics over n keys
    n = 4096
    ts2 = jnp.array([s + 1, t + 1, 0]) / 1000.0
    keys = jax.random.split(jax.random.key(1), n)
    run = jit(jax.vmap(lambda k: ddpm(den, x, ts2, key=k, variance=variance, **TRAJ)[1]["x"]))
    x1 = np.asarray(run(keys))[:, 1, 0]  # (n, 2)
    z = (x1 - mean) / np.sqrt(var)
    # z ~ N(0, 1) iid (2n values): |mean| < 4.5 / sqrt(2n), |var - 1| < 4.5 sqrt(2 / (2n))
    assert abs(z.mean()) < 4.5 / np.sqrt(2 * n)
    assert abs(z.var() - 1.0) < 4.5 * np.sqrt(1.0 / n)


def _mixture_cdf(x):
    return 0.3 * ndtr((x + 1.0) / 0.3) + 0.7 * ndtr((x - 1.5) / 0.5)


def _ks(samples):
    x = np.sort(np.asarray(samples, np.float64).ravel())
    n = x.shape[0]
    F = np.asarray(_mixture_cdf(jnp.asarray(x)))
    return max(np.max(np.arange(1, n + 1) / n - F), np.max(F - np.arange(n) / n))


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_samples_the_mixture(variance):
    """250 strided DDPM steps on the exact denoiser of a 1-D mixture: Kolmogorov-Smirnov
    statistic against the exact CDF below the 0.1% critical value 1.95 / sqrt(n)."""
    gm = GaussianMixture.create(jnp.array([[-1.0], [1.5]]), jnp.array([0.3, 0.5]), [0.3, 0.7])
    n = 4000
    x_T = randn(n, 1)
    ts = grids.ddim_uniform(250, LINEAR)
    x0 = jit(ddpm, static_argnames="variance")(
        gm.denoiser(LINEAR), x_T, ts, key=jax.random.key(1), variance=variance
    )
    D = _ks(x0)
    print(f"DDPM {variance}, 250 steps: KS = {D:.4f} (critical {1.95 / np.sqrt(n):.4f})")
    assert D < 1.95 / np.sqrt(n)
    assert _ks(x_T) > 0.2  # the test can fail: the prior is far from the data


def test_point_mass_is_recovered_exactly(x64):
    sched = LinearVP()
    den = GaussianMixture.gaussian(MU, 0.0).denoiser(sched)
    x_T = randn(4, 2)
    for S in (10, 20):  # into t = 0, and ending at t_min
        ts = jnp.stack([grids.uniform_log_snr(S, sched), grids.uniform_time(S)])
        x0 = ddim_on_grids()(den, x_T, ts)
        # at t_min: exactly the forward-process point alpha mu + sigma eps_T
        eps_T = (x_T - sched.alpha(ts[0, 0]) * MU) / sched.sigma(ts[0, 0])
        want = sched.alpha(ts[0, -1]) * MU + sched.sigma(ts[0, -1]) * eps_T
        np.testing.assert_allclose(x0[0], want, atol=1e-12)
        np.testing.assert_allclose(x0[1], jnp.broadcast_to(MU, (4, 2)), atol=1e-10)


DDIM_ROUND_TRIP = {}  # steps -> max round-trip error (for comparison with exact inversion)


def test_ddim_inversion_round_trip_error_shrinks(x64):
    sched = LinearVP()
    gm = GaussianMixture.create(jnp.array([[-1.0, 0.5], [1.0, -0.5]]), jnp.array([0.3, 0.5]))
    den = gm.denoiser(sched)
    x_0 = gm.sample(jax.random.key(0), 16)
    round_trip = jit(lambda den, x, ts: ddim(den, ddim_invert(den, x, ts), ts))
    for S in (10, 20, 40, 80):
        ts = grids.uniform_log_snr(S, sched)
        DDIM_ROUND_TRIP[S] = float(np.max(np.abs(round_trip(den, x_0, ts) - x_0)))
    errs = list(DDIM_ROUND_TRIP.values())
    print(
        "DDIM inversion round trip (max abs):", {k: f"{v:.3e}" for k, v in DDIM_ROUND_TRIP.items()}
    )
    assert all(e > 1e-4 for e in errs)  # not an identity
    assert all(b < a for a, b in zip(errs, errs[1:], strict=False))  # shrinks with the step count
    assert 0.7 < slope(list(DDIM_ROUND_TRIP), errs) < 1.3  # O(h)


def test_ddim_inversion_inverts_one_exact_step(x64):
    """On point-mass data eps_hat is constant along exact trajectories: inversion is exact."""
    pm = GaussianMixture.gaussian(MU, 0.0)
    sched = LinearVP()
    ts = grids.uniform_time(5, sched)
    x_T = randn(3, 2)
    x_0 = DDIM(pm.denoiser(sched), x_T, ts)
    x_T2, traj = INVERT(pm.denoiser(sched), x_0, ts, return_trajectory=True)
    np.testing.assert_allclose(x_T2, x_T, rtol=1e-8)
    assert traj["x"].shape == (6, 3, 2) and int(traj["nfe"]) == 5
    np.testing.assert_array_equal(traj["x"][0], x_0)
    np.testing.assert_array_equal(traj["x"][-1], x_T2)
    # from t = 0 (eps model): finite
    x_T0, _ = INVERT(pm.denoiser(sched), x_0, grids.uniform_time(5), return_trajectory=True)
    assert np.all(np.isfinite(x_T0))


# --------------------------------------------------------------------------------------------
# JAX contract
# --------------------------------------------------------------------------------------------


def _gauss():
    gm = GaussianMixture.gaussian(MU, 0.5)
    return gm, gm.denoiser(LINEAR)


def test_jit_does_not_retrace():
    _, den = _gauss()

    @jit
    @chex.assert_max_traces(n=1)
    def run(den, x, ts, key, eta):
        return ddim(den, x, ts, key=key, eta=eta), ddpm(den, x, ts, key=key)

    x = jnp.ones((4, 2))
    for k in range(3):
        out = run(den, x * k, grids.uniform_time(8, t_start=1.0 - 0.1 * k), jax.random.key(k), 0.3)
        chex.assert_shape(out, [(4, 2), (4, 2)])


def test_vmap_over_keys_eta_and_guidance_scale():
    _, den = _gauss()
    x, ts = randn(16, 2), grids.ddim_uniform(6, LINEAR)  # shapes of test_sharded_batch
    keys = jax.random.split(jax.random.key(1), 3)
    batched = jax.vmap(lambda k: DDPM(den, x, ts, key=k))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], DDPM(den, x, ts, key=keys[i]), atol=1e-5)
    # eta traced: a key is required; eta = 0 reproduces the deterministic sampler
    etas = jnp.array([0.0, 0.5, 1.0])
    out = jax.vmap(lambda e: DDIM(den, x, ts, key=keys[0], eta=e))(etas)
    np.testing.assert_allclose(out[0], DDIM(den, x, ts), atol=1e-6)
    assert np.max(np.abs(out[2] - out[0])) > 1e-2
    # guidance scales
    cond = jnp.ones((16, 2))
    cden = Denoiser(lambda x, t, c: 0.5 * x + c, LINEAR, "eps", cond)
    scales = jnp.array([0.0, 1.0, 3.0])
    guided = jax.vmap(lambda w: DDIM(classifier_free_guidance(cden, w, 0 * cond), x, ts))(scales)
    one = DDIM(classifier_free_guidance(cden, scales[2], 0 * cond), x, ts)
    np.testing.assert_allclose(guided[2], one, atol=1e-5)
    assert np.max(np.abs(guided[0] - guided[2])) > 1e-2


def _linear_model(params, x, t, cond):
    return params["w"] * x + params["b"]


def test_grad_wrt_x_T_and_params(x64):
    _, den = _gauss()
    x = randn(3, 2)
    ts = grids.ddim_uniform(8, LINEAR)
    f = lambda x: jnp.sum(ddim(den, x, ts))
    g = jit(jax.grad(f))(x)
    # the Gaussian oracle makes the sampler affine in x_T: finite differences are exact
    e = jnp.zeros_like(x).at[1, 0].set(1e-3)
    f = jit(f)
    np.testing.assert_allclose(g[1, 0], (f(x + e) - f(x)) / 1e-3, rtol=1e-8)
    params = {"w": jnp.asarray(0.3), "b": jnp.asarray(0.1)}

    def loss(p):
        den = Denoiser(Partial(_linear_model, p), LINEAR, "eps")
        return jnp.sum(ddim(den, x, grids.ddim_uniform(5, LINEAR, final="first_index")) ** 2)

    g = jit(jax.grad(loss))(params)
    loss = jit(loss)
    h = 1e-6
    fd = (loss({**params, "w": params["w"] + h}) - loss({**params, "w": params["w"] - h})) / (2 * h)
    np.testing.assert_allclose(g["w"], fd, rtol=1e-6)


def test_sharded_batch():
    _, den = _gauss()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sh = NamedSharding(mesh, P("data"))
    x = randn(16, 2)
    xs = jax.device_put(x, sh)
    ts = grids.ddim_uniform(6, LINEAR)
    for run in (DDIM, functools.partial(DDPM, key=jax.random.key(1))):
        out = run(den, xs, ts)  # the jitted sampler on the sharded batch
        assert out.sharding.is_equivalent_to(sh, out.ndim)
        np.testing.assert_allclose(out, run(den, x, ts), atol=1e-5)


def _program_text(f, S):
    ts = grids.uniform_time(S)
    text = jit(f).lower(jnp.ones((2, 2)), ts).as_text()
    return re.sub(r"\d+", "N", text)  # shapes differ only in their numbers


def test_compile_size_independent_of_step_count():
    _, den = _gauss()
    for f in (
        lambda x, ts: ddim(den, x, ts),
        lambda x, ts: ddim(den, x, ts, key=jax.random.key(0), eta=0.5),
        lambda x, ts: ddpm(den, x, ts, key=jax.random.key(0)),
    ):
        assert _program_text(f, 10) == _program_text(f, 100)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_inputs():
    _, den = _gauss()
    x = jnp.ones((2, 2))
    ts = grids.uniform_time(4)
    key = jax.random.key(0)
    for bad in (jnp.array([0.5, 0.7, 0.0]), jnp.array([1.0, 0.5, 0.5, 0.0]), jnp.array([1.0])):
        with pytest.raises(ValueError, match="ts"):
            ddim(den, x, bad)
        with pytest.raises(ValueError, match="ts"):
            ddpm(den, x, bad, key=key)
    with pytest.raises(ValueError, match="PRNG key"):
        ddpm(den, x, ts)
    with pytest.raises(ValueError, match="PRNG key"):
        ddim(den, x, ts, eta=0.5)
    with pytest.raises(ValueError, match="PRNG key"):
        jit(lambda e: ddim(den, x, ts, eta=e))(0.0)  # traced eta may be > 0
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            ddim(den, x, ts, key=key, eta=eta)
    with pytest.raises(ValueError, match="variance"):
        ddpm(den, x, ts, key=key, variance="learned")
    with pytest.raises(TypeError, match="time_shift"):
        ddim(den, x, ts, time_shift=5)
    with pytest.raises(TypeError, match="floating"):
        ddim(den, jnp.ones((2, 2), jnp.int32), ts)
    with pytest.raises(ValueError, match="x0-prediction"):
        gm = GaussianMixture.gaussian(MU, 0.5)
        ddim_invert(gm.denoiser(LINEAR, "x0"), x, ts)


# --------------------------------------------------------------------------------------------
# Every sampler: low-precision states, static options, integer options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(every_sampler()))
def test_every_sampler_takes_bfloat16_and_checks_a_traced_grid(name):
    """A bfloat16 state is integrated in float32 and returned in bfloat16: the result is the
    float32 run's from the same start, rounded (BDIA's gamma = 1 recurrence amplifies the
    float32 round-off of the two programs, hence the looser bound there). With ``ts`` traced,
    the program holds the run-time grid check (tests/test_grids.py runs it)."""
    f, den = every_sampler()[name], mixture_denoiser()
    x = randn(4, 2).astype(jnp.bfloat16)
    ts = grids.uniform_log_snr(4, LINEAR)
    traced = jit(lambda x, ts: (f(den, x, ts), f(den, x.astype(jnp.float32), ts))).trace(x, ts)
    assert "debug_callback" in str(traced.jaxpr)
    lo, hi = traced.lower().compile()(x, ts)
    assert lo.dtype == jnp.bfloat16 and lo.shape == x.shape and hi.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(hi)))
    tol = 3e-2 if name.startswith("bdia") else 1e-2
    np.testing.assert_allclose(np.asarray(lo, np.float32), hi, rtol=tol, atol=tol)


def test_traced_static_options_are_clear_errors():
    """A static option that arrives traced (``jax.jit(sampler)(..., order=3)``) says how to pass
    it; traced ``ts`` and ``x_T`` stay fine."""
    _, den = _gauss()
    x, ts = jnp.ones((2, 2)), grids.uniform_time(4, LINEAR)
    key = jax.random.key(0)
    cases = [
        (solvers.dpm_solver_pp, dict(order=3), "order"),
        (solvers.dpm_solver, dict(order=2), "order"),
        (solvers.dpm_solver_pp, dict(lower_order_final=False), "lower_order_final"),
        (solvers.dpm_solver_pp, dict(denoise_to_zero=True), "denoise_to_zero"),
        (solvers.dpm_solver_pp, dict(method="fast", nfe=6), "nfe"),
        (solvers.ddim, dict(return_trajectory=True), "return_trajectory"),
        (solvers.ddpm, dict(key=key, return_trajectory=True), "return_trajectory"),
        (solvers.pndm, dict(return_trajectory=True), "return_trajectory"),
        (solvers.edm_heun, dict(return_trajectory=True), "return_trajectory"),
        (solvers.bdia_ddim, dict(return_trajectory=True), "return_trajectory"),
        (solvers.ddim_invert, dict(return_trajectory=True), "return_trajectory"),
    ]
    for f, opts, name in cases:
        static = {k: v for k, v in opts.items() if k == "method"}
        traced = {k: v for k, v in opts.items() if k != "method"}
        g = functools.partial(f, **static)
        with pytest.raises(TypeError, match=rf"{name} is a static option.*functools.partial"):
            jax.jit(g)(den, x, ts, **traced)


def test_integer_options_must_be_ints():
    _, den = _gauss()
    x, ts = jnp.ones((2, 2)), grids.uniform_time(4, LINEAR)
    for f in (solvers.dpm_solver, solvers.dpm_solver_pp):
        for order in (2.0, 2.5, "2", None):
            with pytest.raises(ValueError, match=r"order must be 1 or 2 or 3 \(an int"):
                f(den, x, ts, order=order)
    with pytest.raises(ValueError, match="nfe must be a positive int"):
        solvers.dpm_solver(den, x, ts, method="fast", nfe=6.0)
    with pytest.raises(ValueError, match="window"):
        solvers.TimeShift(window=2.0)
    # numpy integers are ints
    assert solvers.dpm_solver_fast_orders(np.int64(6), np.int64(2)) == (2, 2, 2)


def test_time_shift_names_the_samplers_it_supports():
    for f in (solvers.edm_heun, solvers.bdia_ddim, solvers.dpm_solver_pp, len):
        with pytest.raises(TypeError, match=r"supports .*ddpm, ddim, pndm, dpm_solver"):
            solvers.time_shift(f, window=10, cutoff=0.3)
