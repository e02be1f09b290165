"""Time grids: shapes, order, end points, the closed forms they follow, and the published index
lists of the reference codes (shared/spec/solvers.md §1.1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import solvers
from dpm.oracle import GaussianMixture
from dpm.schedules import EDM, CosineVP, DiscreteVP, LinearVP
from solvers import grids
from solvers._common import check_grid

LINEAR = DiscreteVP.from_name("linear")
SCHEDULES = [LINEAR, LinearVP(), CosineVP(), EDM()]


def indices(ts, N=1000):
    """Training indices of the times of a discrete grid (a final t = 0 maps to -1)."""
    return np.round(np.asarray(ts, np.float64) * N - 1).astype(int).tolist()


def assert_valid(ts, n_points):
    assert ts.shape == (n_points,)
    assert ts.dtype == jnp.result_type(float)
    assert np.all(np.diff(np.asarray(ts)) < 0)
    check_grid(ts)


# --------------------------------------------------------------------------------------------
# Continuous grids
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("n_steps", [1, 12])
def test_continuous_grids_shape_order_endpoints(schedule, n_steps):
    t_min = schedule.t_min
    for make in (grids.uniform_time, grids.quadratic_time, grids.uniform_log_snr):
        ts = make(n_steps, schedule)
        assert_valid(ts, n_steps + 1)
        np.testing.assert_allclose([ts[0], ts[-1]], [1.0, t_min], rtol=1e-6)
        ts = make(n_steps, schedule, t_start=0.8, t_end=0.1)
        np.testing.assert_allclose([ts[0], ts[-1]], [0.8, 0.1], rtol=1e-6)
    ts = grids.karras(n_steps, schedule)
    assert_valid(ts, n_steps + 1)
    assert ts[0] == 1.0 and ts[-1] == 0.0


def test_uniform_and_quadratic_time(x64):
    ts = grids.uniform_time(10)  # no schedule: ends at t = 0
    np.testing.assert_allclose(ts, np.arange(10, -1, -1) / 10, atol=1e-15)
    ts = grids.quadratic_time(8, LINEAR)
    d = np.diff(np.sqrt(np.asarray(ts)))
    np.testing.assert_allclose(d, d[0], rtol=1e-12)  # uniform in sqrt(t): dense near 0
    steps = -np.diff(np.asarray(ts))
    assert ts[-1] == LINEAR.t_min and np.all(np.diff(steps) < 0)  # steps shrink towards 0


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
def test_uniform_log_snr_is_uniform(x64, schedule):
    ts = grids.uniform_log_snr(20, schedule, t_start=0.9)
    d = np.diff(np.asarray(schedule.log_snr(ts)))
    assert np.all(d > 0)
    np.testing.assert_allclose(d, d[0], rtol=1e-8)


def test_karras_closed_form_edm(x64):
    # EDM schedule: sigma_bar = t * 80; defaults sigma_min = 0.002, sigma_max = 80, rho = 7.
    S, rho = 18, 7.0
    ts = grids.karras(S, EDM())
    i = np.arange(S)
    sigma = (80 ** (1 / rho) + i / (S - 1) * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    np.testing.assert_allclose(np.asarray(ts[:-1]) * 80.0, sigma, rtol=1e-12)
    assert ts.shape == (S + 1,) and ts[-1] == 0.0


def test_karras_closed_form_vp(x64):
    S, rho, lo, hi = 10, 3.0, 0.05, 20.0
    ts = grids.karras(S, LinearVP(), sigma_min=lo, sigma_max=hi, rho=rho, append_zero=False)
    i = np.arange(S + 1)
    sigma = (hi ** (1 / rho) + i / S * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    np.testing.assert_allclose(LinearVP().sigma_bar(ts), sigma, rtol=1e-9)
    # rho = 1 is uniform in sigma_bar
    ts = grids.karras(S, LINEAR, sigma_min=lo, sigma_max=hi, rho=1.0, append_zero=False)
    np.testing.assert_allclose(np.diff(np.asarray(LINEAR.sigma_bar(ts))), -(hi - lo) / S, rtol=1e-8)


# --------------------------------------------------------------------------------------------
# Discrete spacings: published index lists
# --------------------------------------------------------------------------------------------


def test_ddim_uniform_and_quadratic_published_lists():
    ts = grids.ddim_uniform(10, LINEAR)
    assert indices(ts) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0, -1]
    assert ts[-1] == 0.0  # DDIM repo: last target alpha_bar = 1
    ts = grids.ddim_quadratic(10, LINEAR)
    assert indices(ts)[:-1] == [800, 632, 483, 355, 246, 158, 88, 39, 9, 0]
    # LDM make_ddim_timesteps: the uniform list + 1, ending at alpha_bar_0
    ts = grids.ddim_uniform(10, LINEAR, offset=1, final="first_index")
    assert indices(ts) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1, 0]


def test_diffusers_spacings_published_lists():
    assert indices(grids.leading(10, LINEAR, offset=1))[:-1] == list(range(901, 0, -100))
    assert indices(grids.trailing(10, LINEAR))[:-1] == list(range(999, 0, -100))
    assert indices(grids.linspace(10, LINEAR))[:-1] == list(range(999, -1, -111))
    # trailing for S = 3: round(arange(1000, 0, -1000 / 3)) - 1
    assert indices(grids.trailing(3, LINEAR))[:-1] == [999, 666, 332]


def test_discrete_final_conventions():
    zero = grids.leading(4, LINEAR, offset=1)
    first = grids.leading(4, LINEAR, offset=1, final="first_index")
    none = grids.leading(4, LINEAR, offset=1, final="none")
    assert indices(zero) == [751, 501, 251, 1, -1]
    assert indices(first) == [751, 501, 251, 1, 0]
    assert indices(none) == [751, 501, 251, 1]
    # index 0 already chosen: "first_index" appends nothing (that step would be the identity)
    assert indices(grids.ddim_uniform(4, LINEAR, final="first_index")) == [750, 500, 250, 0]
    for ts in (zero, first, none):
        check_grid(ts)


@pytest.mark.parametrize(
    "make", [grids.ddim_uniform, grids.leading, grids.trailing, grids.linspace]
)
def test_discrete_grids_every_step_count(make):
    small = DiscreteVP.from_name("linear", 50)
    for S in range(1, 51):
        ts = make(S, small)
        assert_valid(ts, S + 1)
        idx = np.asarray(indices(ts, 50)[:-1])
        assert idx.min() >= 0 and idx.max() <= 49


def test_grid_validation_errors():
    with pytest.raises(ValueError, match="n_steps"):
        grids.uniform_time(0)
    with pytest.raises(ValueError, match="n_steps"):
        grids.ddim_uniform(1001, LINEAR)
    with pytest.raises(ValueError, match="t_start"):
        grids.uniform_time(5, t_start=0.2, t_end=0.5)
    with pytest.raises(ValueError, match="t_end > 0"):
        grids.uniform_log_snr(5, LINEAR, t_end=0.0)
    with pytest.raises(TypeError, match="DiscreteVP"):
        grids.leading(5, LinearVP())
    with pytest.raises(TypeError, match="Schedule"):
        grids.karras(5, None)
    with pytest.raises(ValueError, match="final"):
        grids.trailing(5, LINEAR, final="one")
    with pytest.raises(ValueError, match="repeats"):
        grids.ddim_quadratic(100, LINEAR)
    with pytest.raises(ValueError, match=r"N - 1"):
        grids.trailing(10, LINEAR, offset=1)
    with pytest.raises(ValueError, match="sigma_max"):
        grids.karras(5, EDM(), sigma_max=100.0)
    with pytest.raises(ValueError, match="single time point"):
        grids.leading(1, LINEAR, final="none")


def test_grids_are_device_arrays():
    ts = grids.uniform_log_snr(5, LinearVP())
    assert isinstance(ts, jax.Array)


# --------------------------------------------------------------------------------------------
# Every sampler checks its grid, also when the grid is traced (jit, vmap, grad, sharded batch)
# --------------------------------------------------------------------------------------------


def every_sampler():
    """``name -> f(denoiser, x, ts)`` for every public sampler (and the time-shifted ones)."""
    key = jax.random.key(0)
    p = functools.partial
    shift = functools.partial(solvers.time_shift, window=10, cutoff=0.3)
    ms = p(solvers.dpm_solver, method="multistep")
    return {
        "ddpm": p(solvers.ddpm, key=key),
        "ddim": solvers.ddim,
        "ddim_eta": p(solvers.ddim, key=key, eta=0.5),
        "ddim_invert": solvers.ddim_invert,
        "f-pndm": solvers.pndm,
        "s-pndm": p(solvers.pndm, variant="s-pndm"),
        "plms": p(solvers.pndm, variant="plms"),
        "dpm_solver": solvers.dpm_solver,
        "dpm_solver_multistep": ms,
        "dpm_solver_pp": solvers.dpm_solver_pp,
        "dpm_solver_pp_3S": p(solvers.dpm_solver_pp, order=3, method="singlestep"),
        "edm_euler": solvers.edm_euler,
        "edm_heun": solvers.edm_heun,
        "edm_stochastic": p(solvers.edm_stochastic, key=key, S_churn=1.0),
        "bdia_ddim": solvers.bdia_ddim,
        "bdia_edm": solvers.bdia_edm,
        "bdia_invert": lambda d, x, ts: solvers.bdia_invert(d, x, ts).x_T,
        "bdia_edm_invert": lambda d, x, ts: solvers.bdia_edm_invert(d, x, ts).x_T,
        "time_shift_ddpm": shift(p(solvers.ddpm, key=key)),
        "time_shift_ddim": shift(solvers.ddim),
        "time_shift_pndm": shift(solvers.pndm),
        "time_shift_dpm_solver": shift(ms),
    }


def mixture_denoiser():
    gm = GaussianMixture.create(
        means=jnp.array([[1.0, 0.0], [-1.0, 0.0]]), stds=jnp.array([0.3, 0.3])
    )
    return gm.denoiser(LINEAR)


BAD_GRIDS = {  # (grid of 5 points, the message)
    "increasing": (lambda ts: ts[::-1], "be strictly decreasing"),
    "repeated": (lambda ts: ts.at[2].set(ts[1]), "be strictly decreasing"),
    "nan": (lambda ts: ts.at[1].set(jnp.nan), "be finite"),
    "above 1": (lambda ts: ts.at[0].set(1.5), r"lie in \[0, 1\]"),
    "below 0": (lambda ts: ts.at[-1].set(-0.1), r"lie in \[0, 1\]"),
}


def test_traced_grid_errors_at_run_time():
    """Under jit, vmap, grad and on 8 sharded devices a bad grid is a run-time error naming ts
    and the problem, never silent NaNs; one compiled program serves every grid."""
    den = mixture_denoiser()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 2)), jnp.float32)
    ts = grids.uniform_log_snr(4, LINEAR)
    run = jit(lambda x, ts: solvers.dpm_solver_pp(den, x, ts))
    assert np.all(np.isfinite(run(x, ts)))
    for make, match in BAD_GRIDS.values():
        with pytest.raises(jax.errors.JaxRuntimeError, match="ts must " + match):
            np.asarray(run(x, make(ts)))
    assert np.all(np.isfinite(run(x, ts)))  # a good grid after a bad one runs as before

    # vmap over grids: one bad row fails the batch
    many = jit(jax.vmap(lambda ts: solvers.ddim(den, x, ts)))
    with pytest.raises(jax.errors.JaxRuntimeError, match="ts must be strictly decreasing"):
        np.asarray(many(jnp.stack([ts, ts[::-1]])))
    # grad through the sampler
    g = jit(jax.grad(lambda x, ts: jnp.sum(solvers.ddim(den, x, ts) ** 2)))
    assert np.all(np.isfinite(g(x, ts)))
    with pytest.raises(jax.errors.JaxRuntimeError, match="ts must be finite"):
        np.asarray(g(x, ts.at[1].set(jnp.nan)))
    # a batch sharded over 8 devices
    mesh = jax.make_mesh((8,), ("data",))
    xs = jax.device_put(x, NamedSharding(mesh, P("data")))
    sharded = jit(lambda x, ts: solvers.ddim(den, x, ts))
    with pytest.raises(jax.errors.JaxRuntimeError, match=r"ts must lie in \[0, 1\]"):
        np.asarray(sharded(xs, ts.at[0].set(1.5)))
    # a good run replaces the failed run's effect tokens (jax.effects_barrier() is clean again)
    assert np.all(np.isfinite(sharded(xs, ts)))
    jax.effects_barrier()
