"""EDM samplers: DDIM identity, measured orders, churn, schedules, JAX transformations, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import Partial

from dpm import EDM, Denoiser, DiscreteVP, GaussianMixture, LinearVP
from solvers.edm import edm_euler, edm_heun, edm_stochastic

SCHEDULES = [DiscreteVP.from_name("linear"), LinearVP(), EDM()]


def _mixture(dim=2):
    means = jnp.array([[1.5, 0.0, -1.0, 0.5], [-1.0, 1.0, 0.5, 0.0], [0.0, -2.0, 1.0, -1.0]])
    return GaussianMixture.create(means[:, :dim], jnp.array([0.3, 0.5, 0.2]), [0.5, 0.3, 0.2])


def _karras_ts(sched, S, rho=7.0, end_at_zero=True):
    """Karras sigma_bar grid mapped to t with the schedule's inverse (no solvers.grids)."""
    sb_max, sb_min = sched.sigma_bar(1.0), sched.sigma_bar(sched.t_min)
    i = jnp.arange(S + (0 if end_at_zero else 1)) / (S - (1 if end_at_zero else 0))
    sb = (sb_max ** (1 / rho) + i * (sb_min ** (1 / rho) - sb_max ** (1 / rho))) ** rho
    ts = jnp.clip(sched.t_of_sigma_bar(sb), 0.0, 1.0).at[0].set(1.0)
    return jnp.concatenate([ts, jnp.zeros(1)]) if end_at_zero else ts


def _x_T(sched, n, dim, key=0, t=1.0):
    return sched.sigma(t) * jax.random.normal(jax.random.key(key), (n, dim))


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: type(s).__name__)
def test_identities_on_every_schedule(sched):
    """On DiscreteVP, LinearVP and EDM, float32, a grid ending at t = 0: Euler in (x_bar,
    sigma_bar) with d = eps_hat is the DDIM map step for step (spec §12.2); edm_stochastic
    without churn (S_churn = 0, or churn only outside [S_tmin, S_tmax]) is edm_heun exactly."""
    den = _mixture().denoiser(sched, "eps")
    ts = _karras_ts(sched, 8)
    x_T = _x_T(sched, 16, 2)
    key = jax.random.key(1)

    @jax.jit
    def run(x_T):
        x0, traj = edm_euler(den, x_T, ts, return_trajectory=True)
        x = traj["x"]
        # closed-form DDIM map from the sampler's own state at each step
        x0_hat, eps_hat = jax.vmap(den.predict)(x[:-1], ts[:-1])
        a, s = sched.alpha(ts[1:])[:, None, None], sched.sigma(ts[1:])[:, None, None]
        heun = (
            edm_heun(den, x_T, ts),
            edm_stochastic(den, x_T, ts, key=key, S_churn=0.0),
            edm_stochastic(den, x_T, ts, key=key, S_churn=40.0, S_tmin=1e6),
            edm_stochastic(den, x_T, ts, key=key, S_churn=40.0),
        )
        return x0, traj, a * x0_hat + s * eps_hat, heun

    x0, traj, ddim, (heun, stoch, far, churned) = run(x_T)
    chex.assert_shape(traj["x"], (9, 16, 2))
    chex.assert_shape(traj["x0"], (8, 16, 2))
    # float32 round-off of x / alpha at sigma_bar up to ~160 (DiscreteVP): relative to the scale
    scale = jnp.abs(ddim) + sched.sigma(ts[:-1])[:, None, None]
    assert float(jnp.max(jnp.abs(traj["x"][1:] - ddim) / scale)) < 2e-5
    np.testing.assert_array_equal(x0, traj["x"][-1])
    chex.assert_tree_all_finite((x0, heun, churned))
    np.testing.assert_array_equal(stoch, heun)
    np.testing.assert_array_equal(far, heun)
    assert float(jnp.max(jnp.abs(churned - heun))) > 1e-2


def _orders(samplers, sched, gm, Ns, t0=1.0, t1=1e-2):
    """Measured global orders (slope of log max-error on log 1/N), on lambda-uniform grids."""
    den = gm.denoiser(sched, "eps")
    x_T = sched.alpha(t0) * gm.means[0] + sched.sigma(t0) * jax.random.normal(
        jax.random.key(3), (8, gm.dim)
    )
    ref = gm.flow(sched, x_T, t0, t1)
    run = jax.jit(lambda ts: [jnp.max(jnp.abs(f(den, x_T, ts) - ref)) for f in samplers])
    errs = []
    for N in Ns:  # one compile per step count for all samplers
        ts = sched.t_of_log_snr(jnp.linspace(sched.log_snr(t0), sched.log_snr(t1), N + 1))
        errs.append([float(e) for e in run(ts.at[0].set(t0).at[-1].set(t1))])
    errs = np.asarray(errs)
    slopes = np.polyfit(np.log(1.0 / np.asarray(Ns)), np.log(errs), 1)[0]
    return slopes, errs


def test_measured_orders_euler_1_heun_2(x64):
    gm = GaussianMixture.gaussian(jnp.array([0.5, -1.0]), 0.3)
    (p_euler, p_heun), errs = _orders([edm_euler, edm_heun], LinearVP(), gm, [10, 20, 40, 80, 160])
    print(f"\nEDM Euler order {p_euler:.3f}, Heun order {p_heun:.3f}; errors\n{errs}")
    assert abs(p_euler - 1.0) < 0.3
    assert abs(p_heun - 2.0) < 0.3


@pytest.mark.parametrize("sched", SCHEDULES[1:], ids=lambda s: type(s).__name__)
def test_point_mass_is_exact_and_end_at_zero(sched, x64):
    """Spec §12.3: for point-mass data every consistent sigma_bar-space integrator returns the
    point exactly (eps_hat is constant along exact trajectories), churn or not."""
    mu = jnp.array([0.7, -1.3])
    den = GaussianMixture.gaussian(mu, 0.0).denoiser(sched, "eps")
    ts = _karras_ts(sched, 6)
    x_T = _x_T(sched, 4, 2)
    run = jax.jit(
        lambda x: (
            edm_euler(den, x, ts),
            edm_heun(den, x, ts),
            edm_stochastic(den, x, ts, key=jax.random.key(0), S_churn=5.0, S_noise=1.007),
        )
    )
    for x0 in run(x_T):
        np.testing.assert_allclose(x0, jnp.broadcast_to(mu, x0.shape), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "sched, prediction",
    [(SCHEDULES[0], "x0"), (SCHEDULES[1], "eps"), (SCHEDULES[2], "x0")],
    ids=["DiscreteVP-x0", "LinearVP-eps", "EDM-x0"],
)
def test_heun_last_step_is_euler_and_nfe(sched, prediction):
    """Onto sigma_bar = 0 Heun is an Euler step, which returns x0_hat: NFE 2S - 1; an x0-model
    gives no NaN (its eps at t = 0 is never asked for)."""
    calls = []
    inner = _mixture().denoiser(sched, prediction).fn

    def fn(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return inner(x, t, cond)

    den = Denoiser(fn, sched, prediction)
    ts = _karras_ts(sched, 5)
    x_T = _x_T(sched, 8, 2)
    x0, traj = jax.jit(edm_heun, static_argnames="return_trajectory")(
        den, x_T, ts, return_trajectory=True
    )
    jax.effects_barrier()
    assert len(calls) == 2 * 5 - 1 == int(traj["nfe"])
    assert not jnp.any(jnp.isnan(x0))
    np.testing.assert_allclose(x0, traj["x0"][-1], rtol=1e-5, atol=1e-5)
    if isinstance(sched, LinearVP):  # a grid ending at t_min > 0: Heun everywhere, NFE 2S
        calls.clear()
        jax.jit(edm_heun)(den, x_T, ts[:-1])
        jax.effects_barrier()
        assert len(calls) == 2 * 4


def _mmd(x, y, bw):
    """Unbiased RBF-kernel MMD^2 (inline, independent of the code under test)."""
    k = lambda a, b: jnp.exp(-jnp.sum((a[:, None] - b[None]) ** 2, -1) / (2 * bw**2))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return (
        (kxx.sum() - jnp.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - jnp.trace(kyy)) / (m * (m - 1))
        - 2 * kxy.mean()
    )


def test_stochastic_samples_the_mixture():
    """With churn at many steps the samples follow the data distribution: moments within 4
    standard errors and MMD^2 to exact samples within the spread of MMD^2 between two exact
    sample sets of the same size (the statistic's own noise floor)."""
    gm, sched, n = _mixture(), LinearVP(), 2000
    den = gm.denoiser(sched, "eps")
    ts = _karras_ts(sched, 64)
    x_T = jax.random.normal(jax.random.key(5), (n, 2))
    x = jax.jit(edm_stochastic)(
        den,
        x_T,
        ts,
        key=jax.random.key(6),
        S_churn=30.0,
        S_tmin=0.05,
        S_tmax=50.0,
        S_noise=1.003,
    )
    exact = gm.sample(jax.random.key(7), n)
    mean = jnp.sum(gm.weights[:, None] * gm.means, 0)
    var = jnp.sum(gm.weights[:, None] * (gm.stds[:, None] ** 2 + (gm.means - mean) ** 2), 0)
    se = jnp.sqrt(var / n)
    assert jnp.all(jnp.abs(x.mean(0) - mean) < 4 * se), (x.mean(0), mean, se)
    # variance of a sample variance ~ (m4 - var^2) / n; bound m4 by the exact samples'
    m4 = jnp.mean((exact - mean) ** 4, 0)
    assert jnp.all(jnp.abs(x.var(0) - var) < 4 * jnp.sqrt((m4 - var**2) / n))
    # the estimator's own spread: MMD^2 between independent exact sample sets of size n
    pairs = [
        (gm.sample(jax.random.key(10 + i), n), gm.sample(jax.random.key(20 + i), n))
        for i in range(4)
    ]
    floors = np.array([float(_mmd(a, b, 0.5)) for a, b in pairs])
    mmd = float(_mmd(x, exact, 0.5))
    print(f"\nMMD^2 churned samples vs exact {mmd:.2e}; exact vs exact {floors}")
    assert mmd < 5 * np.sqrt(np.mean(floors**2))


def test_jit_no_retrace_vmap_grad_sharded():
    sched = LinearVP()
    den = _mixture().denoiser(sched, "eps")
    ts = _karras_ts(sched, 6)
    x_T = _x_T(sched, 16, 2)

    # one trace for several inputs, keys and churn values
    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(den, x, key, churn):
        return edm_heun(den, x, ts), edm_stochastic(den, x, ts, key=key, S_churn=churn)

    run(den, x_T, jax.random.key(0), 10.0)
    chex.assert_tree_all_finite(run(den, x_T + 1.0, jax.random.key(1), 20.0))

    def scaled(w, x, t, cond):  # a model with a traced parameter
        return w * den.fn(x, t, cond)

    @jax.jit
    def transforms(x_T):
        # vmap over keys; grad w.r.t. x_T and w.r.t. the model parameter
        keys = jax.random.split(jax.random.key(2), 3)
        xs = jax.vmap(lambda k: edm_stochastic(den, x_T, ts, key=k, S_churn=20.0))(keys)
        g = jax.grad(lambda x: jnp.sum(edm_heun(den, x, ts) ** 2))(x_T)
        gw = jax.grad(
            lambda w: jnp.sum(
                edm_stochastic(
                    Denoiser(Partial(scaled, w), sched), x_T, ts, key=keys[0], S_churn=5.0
                )
            )
        )(1.0)
        # a bfloat16 state: coefficients and integration in float32, bfloat16 out
        lo = edm_heun(den, x_T.astype(jnp.bfloat16), ts)
        return xs, g, gw, lo

    xs, g, gw, lo = transforms(x_T)
    assert lo.dtype == jnp.bfloat16
    x_lo = x_T.astype(jnp.bfloat16).astype(jnp.float32)  # the same start in float32
    ref = run(den, x_lo, jax.random.key(0), 0.0)[0]
    np.testing.assert_allclose(lo.astype(jnp.float32), ref, rtol=1e-2, atol=1e-2)
    chex.assert_shape(xs, (3, 16, 2))
    assert float(jnp.max(jnp.abs(xs[0] - xs[1]))) > 1e-3  # different keys, different samples
    chex.assert_tree_all_finite((g, gw))
    assert float(jnp.max(jnp.abs(g))) > 0 and float(gw) != 0

    # a batch sharded over 8 devices: same result, same sharding
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sh = NamedSharding(mesh, PartitionSpec("data"))
    out = jax.jit(edm_heun)(den, jax.device_put(x_T, sh), ts)
    assert out.sharding.is_equivalent_to(sh, out.ndim)
    np.testing.assert_allclose(out, run(den, x_T, jax.random.key(0), 0.0)[0], rtol=1e-5, atol=1e-5)


def test_grad_matches_finite_differences(x64):
    sched = LinearVP()
    den = _mixture().denoiser(sched, "eps")
    ts = _karras_ts(sched, 5)
    x_T, v, d = jax.random.normal(jax.random.key(9), (3, 2, 2))
    f = lambda x: jnp.sum(edm_heun(den, x, ts) * v)

    @jax.jit
    def check(x_T):
        fd = (f(x_T + 1e-6 * d) - f(x_T - 1e-6 * d)) / 2e-6
        return jnp.sum(jax.grad(f)(x_T) * d), fd

    g, fd = check(x_T)
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_bad_inputs():
    sched = DiscreteVP.from_name("linear")
    den = _mixture().denoiser(sched, "eps")
    ts = _karras_ts(sched, 4)
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="PRNG key"):
        edm_stochastic(den, x, ts, S_churn=1.0)
    with pytest.raises(ValueError, match="S_churn"):
        edm_stochastic(den, x, ts, key=jax.random.key(0), S_churn=-1.0)
    with pytest.raises(ValueError, match="S_noise"):
        edm_stochastic(den, x, ts, key=jax.random.key(0), S_noise=-1.0)
    with pytest.raises(ValueError, match="S_tmin"):
        edm_stochastic(den, x, ts, key=jax.random.key(0), S_tmin=2.0, S_tmax=1.0)
    with pytest.raises(ValueError, match="solver"):
        edm_stochastic(den, x, ts, key=jax.random.key(0), solver="rk4")
    with pytest.raises(ValueError, match="decreasing"):
        edm_heun(den, x, ts[::-1])
    with pytest.raises(ValueError, match="at least 1 step"):
        edm_euler(den, x, ts[:1])
    with pytest.raises(ValueError, match="1-D"):
        edm_heun(den, x, ts[None])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        edm_heun(den, x, jnp.array([1.5, 0.5, 0.0]))
    with pytest.raises(TypeError, match="Denoiser"):
        edm_heun(lambda x, t: x, x, ts)


@pytest.mark.parametrize("sched", SCHEDULES, ids=lambda s: type(s).__name__)
def test_prior_sample_is_the_state_samplers_start_from(sched):
    """``Schedule.prior_sample``: exactly ``N(0, I)`` (same draw) for VP schedules, ``sigma(t)``
    times it for EDM; Heun from it reaches the mixture's moments on every schedule, while the
    EDM model started from ``N(0, I)`` collapses towards the mean (the bug it prevents)."""
    key, shape = jax.random.key(3), (4000, 2)
    z = jax.random.normal(key, shape)
    x_T = sched.prior_sample(key, shape)
    if sched.is_variance_preserving:
        np.testing.assert_array_equal(x_T, z)
    else:
        np.testing.assert_allclose(x_T, 80.0 * z, rtol=1e-6)
        np.testing.assert_allclose(sched.prior_sample(key, shape, t=0.25), 20.0 * z, rtol=1e-6)
    with pytest.raises(ValueError, match="t must lie in"):
        sched.prior_sample(key, shape, t=1.5)
    gm = _mixture()
    den = gm.denoiser(sched, "eps")
    ts = _karras_ts(sched, 32)
    x = jax.jit(edm_heun)(den, x_T, ts)
    mean = jnp.sum(gm.weights[:, None] * gm.means, 0)
    var = jnp.sum(gm.weights[:, None] * (gm.stds[:, None] ** 2 + (gm.means - mean) ** 2), 0)
    np.testing.assert_allclose(x.var(0), var, rtol=0.1)
    if not sched.is_variance_preserving:
        collapsed = jax.jit(edm_heun)(den, z, ts)
        assert jnp.all(collapsed.var(0) < 0.5 * var), (collapsed.var(0), var)
