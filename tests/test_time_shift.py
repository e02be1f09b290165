"""Time-Shift Sampler: the selection rule on constructed variances, window truncation, the strict
cutoff, and its integration into DDPM, DDIM and PNDM (official ``pnm_solver.py`` semantics:
variance of the current state, centre = next grid time, tau is the target of the current
transfer only, first step never shifted, no extra network evaluations)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpm.denoiser import Denoiser
from dpm.oracle import GaussianMixture
from dpm.schedules import DiscreteVP
from solvers import grids
from solvers.ddim import ddim
from solvers.ddpm import ddpm
from solvers.dpm_solver import dpm_solver
from solvers.pndm import pndm
from solvers.time_shift import TimeShift, sample_variance, select_shifted_time, time_shift

LINEAR = DiscreteVP.from_name("linear")
N = 1000
VARIANTS = ("f-pndm", "s-pndm", "plms")


def gamma(tau):
    """Gamma(tau) = 1 - alpha_bar_tau from the beta table (numpy, independent of the code)."""
    return 1.0 - np.cumprod(1.0 - np.asarray(LINEAR.betas))[np.asarray(tau)]


def states_with_variance(v, D=64, seed=0):
    """``(B, D)`` states whose unbiased per-row variance is exactly ``v``."""
    z = np.random.default_rng(seed).standard_normal((len(v), D))
    z = (z - z.mean(1, keepdims=True)) / z.std(1, ddof=1, keepdims=True)
    return jnp.asarray(z * np.sqrt(np.asarray(v))[:, None])


def index(t):
    return np.round(np.asarray(t, np.float64) * N - 1).astype(int)


# --------------------------------------------------------------------------------------------
# The selection rule
# --------------------------------------------------------------------------------------------


def test_select_recovers_constructed_times(x64):
    c, opts = 500, TimeShift(window=20, cutoff=0.3)  # candidates 490..510
    tau_star = np.array([495, 500, 510, 490, 503, 450, 560])
    x = states_with_variance(gamma(tau_star))
    np.testing.assert_allclose(sample_variance(x), gamma(tau_star), rtol=1e-12)
    tau = select_shifted_time(LINEAR, sample_variance(x), (c + 1) / N, opts)
    # inside the window: tau*; outside: the nearest edge (Gamma is increasing)
    np.testing.assert_array_equal(index(tau), [495, 500, 510, 490, 503, 490, 510])


def test_select_truncates_the_window_at_the_grid_ends(x64):
    opts = TimeShift(window=20, cutoff=0.0)
    v = jnp.array([0.0, 2.0])
    np.testing.assert_array_equal(index(select_shifted_time(LINEAR, v, 4 / N, opts)), [0, 13])
    np.testing.assert_array_equal(index(select_shifted_time(LINEAR, v, 997 / N, opts)), [986, 999])


@pytest.mark.parametrize("c", [126, 250, 300, 501, 505])  # float32 rounds c + 1 / N badly here
def test_select_cutoff_is_strict(c):
    v = jnp.array([2.0])  # far above: the upper window edge when shifting
    t_c = jnp.asarray((c + 1) / N)
    at = select_shifted_time(LINEAR, v, t_c, TimeShift(window=10, cutoff=(c + 1) / N))
    below = select_shifted_time(LINEAR, v, t_c, TimeShift(window=10, cutoff=c / N))
    assert index(at)[0] == c and index(below)[0] == c + 5
    assert select_shifted_time(LINEAR, v, t_c, TimeShift(window=0, cutoff=0.0))[0] == t_c


def test_time_shift_options_validation():
    with pytest.raises(ValueError, match="window"):
        TimeShift(window=-2)
    for bad in (-0.5, 1.5, float("nan"), np.float32(2.0), jnp.asarray(-1.0)):
        with pytest.raises(ValueError, match=r"cutoff must be a time in \[0, 1\]; got"):
            time_shift(ddim, window=4, cutoff=bad)
    TimeShift(window=4, cutoff=1.0)  # the ends are times
    # a traced cutoff passes through (one compiled program for every cutoff)
    jax.jit(lambda c: TimeShift(window=4, cutoff=c).cutoff)(0.25)
    wrapped = time_shift(ddim, window=4, cutoff=0.5)
    den = GaussianMixture.gaussian(jnp.zeros(2), 1.0).denoiser(LINEAR)
    with pytest.raises(ValueError, match="already set"):
        wrapped(den, jnp.ones((1, 2)), grids.ddim_uniform(3, LINEAR), time_shift=TimeShift())


# --------------------------------------------------------------------------------------------
# Integration into the samplers
# --------------------------------------------------------------------------------------------

SAMPLERS = {
    "ddim": ddim,
    "ddpm": functools.partial(ddpm, key=jax.random.key(7)),
    **{v: functools.partial(pndm, variant=v) for v in VARIANTS},
}


@functools.cache
def _jitted(name):
    def run(den, x, ts, opts):
        return SAMPLERS[name](den, x, ts, time_shift=opts, return_trajectory=True)

    return jit(run)  # window is static (in the treedef), the cutoff a traced leaf


def _run(name, den, x, ts, opts):
    return _jitted(name)(den, x, ts, opts)


@pytest.mark.parametrize("name", ["ddim", *VARIANTS])
def test_pinned_upper_edge_first_step_and_cutoff(x64, name):
    """Spec §12.10 [analysis]: on an in-distribution state (variance = Gamma of its own time),
    the window around the next, lower, time is below it, so the argmin is pinned to the upper
    edge ``c + w // 2``. Point-mass data at 0 keeps every state's variance exact."""
    den = GaussianMixture.create(jnp.zeros((2, 8)), jnp.zeros(2)).denoiser(LINEAR)
    ts = grids.ddim_uniform(10, LINEAR)  # indices 900, 800, ..., 0, then t = 0
    x_T = states_with_variance(gamma([900] * 8), D=8)
    _, traj = _run(name, den, x_T, ts, TimeShift(window=10, cutoff=0.301))  # cutoff index 300
    want = [800, 705, 605, 505, 405, 300, 200, 100, 0, -1]  # first step and c <= 300: unshifted
    np.testing.assert_array_equal(index(traj["tau"]), np.array(want)[:, None].repeat(8, 1))


@pytest.mark.parametrize("name", ["ddim", "ddpm", "f-pndm"])
def test_window_wider_than_the_grid_stride_never_steps_upward(x64, name):
    """A window whose half-width (150) exceeds the grid's stride (100 indices) would pin the
    target above the current time; the target then stays at the grid's next time, so no step
    goes upward and DDPM's posterior variance stays >= 0 (it was NaN for every sample)."""
    den = GaussianMixture.create(jnp.zeros((2, 8)), jnp.zeros(2)).denoiser(LINEAR)
    ts = grids.ddim_uniform(10, LINEAR)
    x_T = states_with_variance(gamma([900] * 8), D=8)
    x0, traj = _run(name, den, x_T, ts, TimeShift(window=300, cutoff=0.0))
    assert np.all(np.isfinite(np.asarray(x0)))
    tau = np.asarray(traj["tau"])  # (S, B), targets of steps from ts[:-1]
    assert np.all(tau < np.asarray(ts[:-1])[:, None])


def _mixture_setup():
    gm = GaussianMixture.create(
        jnp.array([[0.5] * 8, [-0.5] * 8]), jnp.array([0.3, 0.6]), jnp.array([0.4, 0.6])
    )
    x_T = jnp.asarray(np.random.default_rng(0).standard_normal((8, 8)))
    return gm.denoiser(LINEAR), x_T, grids.ddim_uniform(10, LINEAR)


def _ddim_map(x, e, s, t):
    """DDIM map with noise estimate e from (x, s) to t (per example), spec §1."""
    a = lambda u: LINEAR.alpha(u)[:, None]
    sg = lambda u: LINEAR.sigma(u)[:, None]
    s = jnp.broadcast_to(s, x.shape[:1])
    return a(t) * (x - sg(s) * e) / a(s) + sg(t) * e


@pytest.mark.parametrize("name", ["ddim", "ddpm", *VARIANTS])
def test_integration_semantics(x64, name):
    den, x_T, ts = _mixture_setup()
    opts = TimeShift(window=10, cutoff=0.3)
    _, tr = _run(name, den, x_T, ts, opts)
    S = ts.shape[0] - 1
    # tau: variance of the current state, centre = next grid time, never on the first step
    for i in range(S):
        want = (
            ts[1]
            if i == 0
            else select_shifted_time(LINEAR, sample_variance(tr["x"][i]), ts[i + 1], opts)
        )
        np.testing.assert_array_equal(tr["tau"][i], jnp.broadcast_to(want, (8,)))
    assert np.any(index(tr["tau"][1:]) != index(ts[2:])[:, None])  # some steps do shift
    # the model always sees the grid label t_i, whatever target the previous step used
    for i in range(S):
        np.testing.assert_allclose(tr["eps"][i], den.eps(tr["x"][i], ts[i]), atol=1e-12)
    x, e, tau = tr["x"], tr["eps"], tr["tau"]
    if name == "ddim":  # tau is the target of the step
        for i in range(S):
            np.testing.assert_allclose(x[i + 1], _ddim_map(x[i], e[i], ts[i], tau[i]), atol=1e-12)
    if name == "s-pndm":  # AB2 on the untouched history, transferred to tau
        for i in range(1, S):
            ab = 1.5 * e[i] - 0.5 * e[i - 1]
            np.testing.assert_allclose(x[i + 1], _ddim_map(x[i], ab, ts[i], tau[i]), atol=1e-12)
    if name == "f-pndm":  # the pseudo-RK4 step 1 with midpoint (t_1 + tau) / 2
        s, t = ts[1], tau[1]
        m = 0.5 * (s + t)
        e1 = den.eps(x[1], s)
        e2 = den.eps(_ddim_map(x[1], e1, s, m), m)
        e3 = den.eps(_ddim_map(x[1], e2, s, m), m)
        e4 = den.eps(_ddim_map(x[1], e3, s, t), t)
        rk = (e1 + 2 * e2 + 2 * e3 + e4) / 6
        np.testing.assert_allclose(x[2], _ddim_map(x[1], rk, s, t), atol=1e-12)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "f-pndm", "dpm-solver-2m"])
def test_window_zero_is_the_base_sampler_bitwise(name):
    den, x_T, ts = _mixture_setup()
    fn = (functools.partial(dpm_solver, order=2, method="multistep")
          if name == "dpm-solver-2m" else SAMPLERS[name])
    base = jit(fn)(den, x_T, ts)
    wrapped = jit(time_shift(fn, window=0, cutoff=0.3))(den, x_T, ts)
    np.testing.assert_array_equal(base, wrapped)


@pytest.mark.parametrize("name", ["ddim", "f-pndm"])
def test_no_extra_network_evaluations(name):
    calls = []

    def fn(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return 0.2 * x

    den = Denoiser(fn, LINEAR, "eps")
    ts = grids.ddim_uniform(6, LINEAR)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8)))
    counts = []
    for opts in (None, TimeShift(window=20, cutoff=0.1)):
        calls.clear()
        _, tr = _run(name, den, x, ts, opts)
        jax.effects_barrier()
        counts.append((len(calls), int(tr["nfe"])))
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]


def test_sharded_and_wrapped(x64):
    den, x, ts = _mixture_setup()
    ts_ddim = jit(time_shift(ddim, window=10, cutoff=0.3))
    ref, _ = _run("ddim", den, x, ts, TimeShift(10, 0.3))
    sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    out = ts_ddim(den, jax.device_put(x, sh), ts)
    assert out.sharding.is_equivalent_to(sh, out.ndim)
    np.testing.assert_allclose(out, ref, atol=1e-12)
