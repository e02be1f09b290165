"""DPM-Solver and DPM-Solver++: exact identities, measured convergence orders against the exact
probability flow of a Gaussian, the final step onto t = 0, NFE counts, guidance/thresholding
composition, Time-Shift, and the JAX transformations."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from dpm.denoiser import Denoiser, classifier_free_guidance, dynamic_thresholding
from dpm.oracle import GaussianMixture
from dpm.schedules import DiscreteVP, LinearVP
from solvers.dpm_solver import (
    LOWER_ORDER_FINAL_STEPS,
    dpm_solver,
    dpm_solver_fast_orders,
    dpm_solver_orders,
    dpm_solver_pp,
)
from solvers.time_shift import TimeShift, sample_variance, select_shifted_time

# The programs here are tiny: XLA's backend optimisations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

LINEAR = LinearVP()
DISCRETE = DiscreteVP.from_name("linear")


def _lam(schedule, t):
    return 0.5 * schedule.log_snr(jnp.asarray(t))


def lambda_grid(schedule, t0, t1, n):
    """``n`` steps uniform in lambda from ``t0`` to ``t1``."""
    lam = jnp.linspace(_lam(schedule, t0), _lam(schedule, t1), n + 1)
    return schedule.t_of_log_snr(2.0 * lam)


def _nonlinear_fn(x, t, cond):
    del cond
    t = jnp.asarray(t).reshape(jnp.shape(t) + (1,) * (x.ndim - jnp.ndim(t)))
    return jnp.tanh(1.5 * x) * (0.5 + t) + 0.1 * x


def _nonlinear(schedule, prediction="eps"):
    return Denoiser(_nonlinear_fn, schedule, prediction)


def _alpha_sigma(schedule, t):
    return schedule.alpha(jnp.asarray(t)), schedule.sigma(jnp.asarray(t))


# --------------------------------------------------------------------------------------------
# Exact identities
# --------------------------------------------------------------------------------------------


def test_order_one_is_ddim_step_for_step(x64):
    """DDIM(eta = 0) == DPM-Solver-1 == DPM-Solver++-1 on every step (also onto t = 0)."""
    den = _nonlinear(DISCRETE)
    x_T = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
    ts = jnp.concatenate([lambda_grid(DISCRETE, 1.0, 1e-3, 7), jnp.zeros(1)])

    @jit
    def run(x_T, ts):
        return [
            f(den, x_T, ts, order=1, method=m, return_trajectory=True)[1]["x"]
            for f in (dpm_solver, dpm_solver_pp)
            for m in ("singlestep", "multistep")
        ]

    for xs in run(x_T, ts):
        for i in range(ts.shape[0] - 1):
            x0_hat, eps_hat = den.predict(xs[i], ts[i])
            a_t, s_t = _alpha_sigma(DISCRETE, ts[i + 1])
            ddim = a_t * x0_hat + s_t * eps_hat  # the closed-form DDIM map
            np.testing.assert_allclose(xs[i + 1], ddim, rtol=1e-11, atol=1e-12)


def test_dpm_solver_pp_2m_matches_paper_algorithm(x64):
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. 2022b, written here as a Python loop."""
    den = _nonlinear(DISCRETE)
    x = jax.random.normal(jax.random.key(1), (3, 2), jnp.float64)
    ts = lambda_grid(DISCRETE, 1.0, 0.01, 6)
    out = jit(lambda x: dpm_solver_pp(den, x, ts, order=2, lower_order_final=False))(x)
    lam = _lam(DISCRETE, ts)
    a, s = _alpha_sigma(DISCRETE, ts)
    x_ref, x0_prev = x, None
    for i in range(1, ts.shape[0]):
        x0 = den.x0(x_ref, ts[i - 1])
        h = lam[i] - lam[i - 1]
        if x0_prev is None:  # first step: DPM-Solver++1
            D = x0
        else:
            r = (lam[i - 1] - lam[i - 2]) / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x_ref = s[i] / s[i - 1] * x_ref - a[i] * (jnp.exp(-h) - 1) * D
        x0_prev = x0
    np.testing.assert_allclose(out, x_ref, rtol=1e-11)


def test_dpm_solver_3_matches_paper_algorithm(x64):
    """DPM-Solver-3 (singlestep, r1 = 1/3, r2 = 2/3), Algorithm 2 of Lu et al. 2022."""
    den = _nonlinear(LINEAR)
    x = jax.random.normal(jax.random.key(2), (3, 2), jnp.float64)
    ts = lambda_grid(LINEAR, 1.0, 0.01, 4)
    out = jit(lambda x: dpm_solver(den, x, ts, order=3, method="singlestep"))(x)
    lam_of = lambda t: _lam(LINEAR, t)
    t_of = lambda lam: LINEAR.t_of_log_snr(2.0 * lam)
    al = lambda t: LINEAR.alpha(t)
    sg = lambda t: LINEAR.sigma(t)
    x_ref = x
    for i in range(1, ts.shape[0]):
        t_prev, t = ts[i - 1], ts[i]
        h = lam_of(t) - lam_of(t_prev)
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = t_of(lam_of(t_prev) + r1 * h), t_of(lam_of(t_prev) + r2 * h)
        e0 = den.eps(x_ref, t_prev)
        u1 = al(s1) / al(t_prev) * x_ref - sg(s1) * (jnp.exp(r1 * h) - 1) * e0
        D1 = den.eps(u1, s1) - e0
        u2 = (
            al(s2) / al(t_prev) * x_ref
            - sg(s2) * (jnp.exp(r2 * h) - 1) * e0
            - sg(s2) * r2 / r1 * ((jnp.exp(r2 * h) - 1) / (r2 * h) - 1) * D1
        )
        D2 = den.eps(u2, s2) - e0
        x_ref = (
            al(t) / al(t_prev) * x_ref
            - sg(t) * (jnp.exp(h) - 1) * e0
            - sg(t) / r2 * ((jnp.exp(h) - 1) / h - 1) * D2
        )
    np.testing.assert_allclose(out, x_ref, rtol=1e-11)


# --------------------------------------------------------------------------------------------
# Convergence orders (Gaussian oracle, exact flow)
# --------------------------------------------------------------------------------------------

# (name, sampler, options, expected order). Multistep runs use lower_order_final=False.
_ORDER_CASES = [
    ("DPM-Solver-1", dpm_solver, dict(order=1), 1),
    ("DPM-Solver-2 (singlestep)", dpm_solver, dict(order=2), 2),
    ("DPM-Solver-3 (singlestep)", dpm_solver, dict(order=3), 3),
    ("DPM-Solver-2 taylor", dpm_solver, dict(order=2, solver_type="taylor"), 2),
    ("DPM-Solver-3 taylor", dpm_solver, dict(order=3, solver_type="taylor"), 3),
    ("DPM-Solver-2 multistep", dpm_solver, dict(order=2, method="multistep"), 2),
    ("DPM-Solver-3M exact", dpm_solver, dict(order=3, method="multistep"), 3),
    (
        "DPM-Solver-3M reference",
        dpm_solver,
        dict(order=3, method="multistep", third_order="reference"),
        2,
    ),
    ("DPM-Solver++1", dpm_solver_pp, dict(order=1), 1),
    ("DPM-Solver++(2S)", dpm_solver_pp, dict(order=2, method="singlestep"), 2),
    ("DPM-Solver++(3S)", dpm_solver_pp, dict(order=3, method="singlestep"), 3),
    ("DPM-Solver++(2M)", dpm_solver_pp, dict(order=2), 2),
    ("DPM-Solver++(2M) taylor", dpm_solver_pp, dict(order=2, solver_type="taylor"), 2),
    ("DPM-Solver++(3M) exact", dpm_solver_pp, dict(order=3), 3),
    ("DPM-Solver++(3M) reference", dpm_solver_pp, dict(order=3, third_order="reference"), 2),
]


def _warmup_grid(schedule, t0, t1, n):
    """Lambda-uniform grid whose first step is h^2 long, so the first-order warm-up step of
    the 3M solvers contributes O(h^4) and cannot mask their third order (spec §5)."""
    lam0, lam1 = _lam(schedule, t0), _lam(schedule, t1)
    h = (lam1 - lam0) / n
    lam = jnp.concatenate([lam0[None], lam0 + h**2 + jnp.linspace(0.0, lam1 - lam0 - h**2, n)])
    return schedule.t_of_log_snr(2.0 * lam)


def test_convergence_orders(x64):
    """Global order = slope of log error vs log step count on lambda-uniform grids, against
    the exact flow of N(mu, 1.5^2 I), from t = 0.6 to t = 0.1.

    On this interval the local slopes are already steady (2.9-3.1 for third order). On longer
    intervals (e.g. t = 1 to 0.01) the O(h^3) error contributions of the 3M solvers partly
    cancel along the path: their measured local slopes then wander (from about 1 to 5 between
    40 and 640 steps for DPM-Solver-3M), while one 3M step still has an O(h^4) local error.
    """
    gm = GaussianMixture.gaussian(jnp.array([0.5, -1.0]), 1.5)
    den = gm.denoiser(LINEAR, "eps")
    t0, t1 = 0.6, 0.1
    x_T = jax.random.normal(jax.random.key(3), (8, 2), jnp.float64)
    exact = gm.flow(LINEAR, x_T, t0, t1)

    def is_3m(sampler, opts):
        default = "multistep" if sampler is dpm_solver_pp else "singlestep"
        return opts["order"] == 3 and opts.get("method", default) == "multistep"

    def run_all(n):
        # grids closed over: concrete while tracing (every step count compiles anyway), so the
        # singlestep programs need no order-1 branch for a final step onto t = 0
        ts, ts_warm = lambda_grid(LINEAR, t0, t1, n), _warmup_grid(LINEAR, t0, t1, n)
        return jnp.stack(
            [
                f(den, x_T, ts_warm if is_3m(f, opts) else ts, lower_order_final=False, **opts)
                for _, f, opts, _ in _ORDER_CASES
            ]
        )

    ns = np.array([40, 80, 160, 320, 640])
    errs = []
    for n in ns:
        ys = jit(run_all, static_argnums=0)(n)
        errs.append(np.max(np.abs(np.asarray(ys) - np.asarray(exact)[None]), axis=(1, 2)))
    errs = np.stack(errs)  # (len(ns), cases)
    slopes = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    for (name, *_, p), s, e in zip(_ORDER_CASES, slopes, errs.T, strict=True):
        print(
            f"{name:28s} measured order {s:5.2f} (expected {p}); errors {e[0]:.2e} .. {e[-1]:.2e}"
        )
    for (name, *_, p), s in zip(_ORDER_CASES, slopes, strict=True):
        assert abs(s - p) < 0.3, f"{name}: measured order {s:.2f}, expected {p}"
    # the corrected 3M is far more accurate than the reference one at the same cost
    names = [c[0] for c in _ORDER_CASES]
    for exact_name, ref_name in [
        ("DPM-Solver++(3M) exact", "DPM-Solver++(3M) reference"),
        ("DPM-Solver-3M exact", "DPM-Solver-3M reference"),
    ]:
        assert errs[-1, names.index(exact_name)] < 0.05 * errs[-1, names.index(ref_name)]


# --------------------------------------------------------------------------------------------
# Final step onto t = 0, NFE, orders per step
# --------------------------------------------------------------------------------------------

_ALL_VARIANTS = [
    dict(order=1, method="singlestep"),
    dict(order=2, method="singlestep"),
    dict(order=3, method="singlestep"),
    dict(order=2, method="multistep"),
    dict(order=3, method="multistep", lower_order_final=False),
    dict(order=3, method="fast", nfe=8),
]


def _to_zero_grid(schedule, n):
    return jnp.concatenate([lambda_grid(schedule, 1.0, 0.01, n - 1), jnp.zeros(1)])


def test_final_step_onto_zero(x64):
    """ts[-1] = 0: finite output, order 1 on the last step, and DPM-Solver++ returns the last
    x0_hat exactly. Point-mass data (eps_hat constant along exact paths) is integrated exactly
    by every variant, onto t = 0 and onto t > 0; with a traced and with a concrete grid."""
    mu = jnp.array([0.3, -0.7])
    point = GaussianMixture.create(mu[None], 0.0)
    den = point.denoiser(LINEAR)
    x_T = jax.random.normal(jax.random.key(4), (5, 2), jnp.float64)
    # fast with nfe = 8 takes 3 outer steps, the others 4
    grid = lambda o, n: _to_zero_grid(LINEAR, n - 1 if o["method"] == "fast" else n)

    @jit
    def run(x_T, ts3, ts4):
        return [
            f(den, x_T, ts3 if o["method"] == "fast" else ts4, return_trajectory=True, **o)
            for f in (dpm_solver, dpm_solver_pp)
            for o in _ALL_VARIANTS
        ]

    traced = run(x_T, _to_zero_grid(LINEAR, 3), _to_zero_grid(LINEAR, 4))
    # a concrete grid: the order of the last step is then known statically
    ts_c = grid(_ALL_VARIANTS[2], 4)  # closed over: concrete while tracing
    concrete = [
        jit(lambda x: dpm_solver(den, x, ts_c, return_trajectory=True, **_ALL_VARIANTS[2]))(x_T)
    ]
    for x0, traj in traced + concrete:
        assert bool(jnp.all(jnp.isfinite(x0)))
        assert int(traj["order"][-1]) == 1
        np.testing.assert_allclose(x0, jnp.broadcast_to(mu, x0.shape), atol=1e-12)
        if "x0" in traj:  # DPM-Solver++: exactly the last model output
            np.testing.assert_array_equal(x0, traj["x0"][-1])

    # onto t > 0 the exact flow is reached as well (same compiled program, other grid values)
    ts3, ts4 = lambda_grid(LINEAR, 1.0, 0.05, 3), lambda_grid(LINEAR, 1.0, 0.05, 4)
    for x, _ in run(x_T, ts3, ts4):
        np.testing.assert_allclose(x, point.flow(LINEAR, x_T, 1.0, 0.05), atol=1e-12)

    # a non-trivial model: the last step still returns that step's x0_hat (finite, no NaN)
    den = _nonlinear(DISCRETE)
    ts_d = _to_zero_grid(DISCRETE, 5)
    opts = dict(order=3, method="multistep", lower_order_final=False, return_trajectory=True)
    both = jit(lambda x, ts: [f(den, x, ts, **opts) for f in (dpm_solver, dpm_solver_pp)])
    for x0, traj in both(x_T, ts_d):
        x0_hat = den.x0(traj["x"][-2], ts_d[-2])
        np.testing.assert_allclose(x0, x0_hat, rtol=1e-12, atol=1e-12)
        assert [int(k) for k in traj["order"]] == [1, 2, 3, 3, 1]


def test_orders_per_step_and_fast_schedule():
    assert dpm_solver_fast_orders(10) == (3, 3, 3, 1)
    assert dpm_solver_fast_orders(9) == (3, 3, 2, 1)
    assert dpm_solver_fast_orders(8) == (3, 3, 2)
    assert dpm_solver_fast_orders(5, order=2) == (2, 2, 1)
    assert dpm_solver_fast_orders(4, order=1) == (1, 1, 1, 1)
    for n in range(1, 30):
        for k in (1, 2, 3):
            assert sum(dpm_solver_fast_orders(n, k)) == n
            assert dpm_solver_orders(len(dpm_solver_fast_orders(n, k)), k, "fast", nfe=n) == (
                dpm_solver_fast_orders(n, k)
            )
    # multistep: warm-up 1, 2, ..., then lower_order_final below the step threshold
    assert dpm_solver_orders(5, 3) == (1, 2, 3, 2, 1)
    assert dpm_solver_orders(5, 2) == (1, 2, 2, 2, 1)
    assert dpm_solver_orders(5, 3, lower_order_final=False) == (1, 2, 3, 3, 3)
    assert dpm_solver_orders(LOWER_ORDER_FINAL_STEPS, 3)[-3:] == (3, 3, 3)
    assert dpm_solver_orders(LOWER_ORDER_FINAL_STEPS - 1, 3)[-3:] == (3, 2, 1)
    assert dpm_solver_orders(4, 3, "singlestep") == (3, 3, 3, 3)


def test_fast_equals_singlestep_pieces(x64):
    """DPM-Solver-fast with nfe = 10 is three DPM-Solver-3 steps, then one DPM-Solver-1 step."""
    den = _nonlinear(LINEAR)
    x = jax.random.normal(jax.random.key(5), (3, 2), jnp.float64)
    ts = lambda_grid(LINEAR, 1.0, 1e-3, 4)

    @jit
    def both(x, ts):
        fast = dpm_solver(den, x, ts, order=3, method="fast", nfe=10)
        y = dpm_solver(den, x, ts[:4], order=3, method="singlestep")
        return fast, dpm_solver(den, y, ts[3:], order=1, method="singlestep")

    np.testing.assert_allclose(*both(x, ts), rtol=1e-12)


def test_nfe_counts():
    """Model evaluations counted on the host (one callback per evaluation, tagged with the
    case through the condition) == traj["nfe"]."""
    calls = []

    def fn(x, t, cond):
        jax.debug.callback(lambda c: calls.append(int(c)), cond)
        return _nonlinear_fn(x, t, cond)

    cases = [  # (sampler, grid, options, evaluations)
        (dpm_solver, "ts", dict(order=3, method="singlestep"), 18),
        (dpm_solver, "ts0", dict(order=3, method="singlestep"), 16),  # onto 0: last is order 1
        (dpm_solver, "ts", dict(order=2, method="multistep"), 6),
        (dpm_solver_pp, "ts", dict(order=3, denoise_to_zero=True), 7),
        (dpm_solver_pp, "ts4", dict(order=3, method="fast", nfe=10), 10),
        (dpm_solver_pp, "ts4", dict(order=3, method="fast", nfe=10, denoise_to_zero=True), 11),
    ]

    @jit
    def run(x, grids):
        return [
            f(
                Denoiser(fn, DISCRETE, "eps", jnp.asarray(i)),
                x,
                grids[g],
                return_trajectory=True,
                **opts,
            )[1]["nfe"]
            for i, (f, g, opts, _) in enumerate(cases)
        ]

    ts = lambda_grid(DISCRETE, 1.0, 0.01, 6)
    grids = dict(ts=ts, ts0=ts.at[-1].set(0.0), ts4=ts[:5])
    nfes = run(jnp.ones((2, 3)), grids)
    jax.effects_barrier()
    for i, (nfe, (_, _, opts, expected)) in enumerate(zip(nfes, cases, strict=True)):
        assert calls.count(i) == expected == int(nfe), (opts, calls.count(i), int(nfe))


def test_denoise_to_zero_is_x0_hat_of_the_result(x64):
    den = _nonlinear(DISCRETE)
    x = jax.random.normal(jax.random.key(6), (3, 2), jnp.float64)
    ts = lambda_grid(DISCRETE, 1.0, 1e-3, 5)
    y, z = jit(
        lambda x: [dpm_solver_pp(den, x, ts, order=2, denoise_to_zero=d) for d in (False, True)]
    )(x)
    np.testing.assert_allclose(z, den.x0(y, ts[-1]), rtol=1e-13)


# --------------------------------------------------------------------------------------------
# Composition with guidance and thresholding
# --------------------------------------------------------------------------------------------


def _cond_fn(x, t, cond):
    """Exact eps of N(cond, 0.3^2 I): a conditional model whose condition is the mean."""
    a = LINEAR.alpha(jnp.asarray(t))[..., None]
    s = LINEAR.sigma(jnp.asarray(t))[..., None]
    return s * (x - a * cond) / (a**2 * 0.09 + s**2)


def test_guidance_and_thresholding_compose():
    B, D = 6, 4
    cond = 3.0 * jax.random.normal(jax.random.key(7), (B, D))
    den = Denoiser(_cond_fn, LINEAR, "eps", cond)
    null = jnp.zeros_like(cond)
    x = jax.random.normal(jax.random.key(8), (B, D))
    ts = _to_zero_grid(LINEAR, 8)
    run = jit(lambda d, x: dpm_solver_pp(d, x, ts, order=2, return_trajectory=True))

    # scale 1 is the conditional model
    guided, _ = run(classifier_free_guidance(den, 1.0, null), x)
    plain, _ = run(den, x)
    np.testing.assert_allclose(guided, plain, rtol=1e-5, atol=1e-5)

    # dynamic thresholding keeps every x0_hat, and hence the output at t = 0, in [-1, 1]
    strong = classifier_free_guidance(den, 5.0, null)
    raw, _ = run(strong, x)
    assert float(jnp.max(jnp.abs(raw))) > 1.5  # the test would notice missing thresholding
    out, traj = run(dynamic_thresholding(strong), x)
    assert float(jnp.max(jnp.abs(traj["x0"]))) <= 1.0 + 1e-6
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6

    # vmap over guidance scales == one run per scale
    scales = jnp.array([1.0, 2.0, 4.0])
    sweep = jit(jax.vmap(lambda w: dpm_solver_pp(classifier_free_guidance(den, w, null), x, ts)))(
        scales
    )
    for w, y in zip(scales, sweep, strict=True):
        np.testing.assert_allclose(
            y, run(classifier_free_guidance(den, w, null), x)[0], rtol=1e-5, atol=1e-5
        )


# --------------------------------------------------------------------------------------------
# Time-Shift
# --------------------------------------------------------------------------------------------


def _ts_reference(den, x, ts, options, order=2):
    """The official TS-DPM multistep loop (``dpm_solver_utils.py``), order 2, midpoint."""
    sch = den.schedule
    B = x.shape[0]
    lam = lambda t: 0.5 * sch.log_snr(t)
    col = lambda a: a[:, None]
    S = ts.shape[0] - 1
    t_prev = [jnp.full((B,), ts[0])]
    m_prev = [den.eps(x, t_prev[0])]
    times = [t_prev[0]]
    for step in range(1, S + 1):
        t = jnp.full((B,), ts[step])
        if step >= order:  # never during warm-up
            t = select_shifted_time(
                sch, sample_variance(m_prev[-1]).astype(t.dtype), ts[step], options
            )
        # warm-up orders, then lower_order_final (steps < 15)
        k = step if step < order else min(order, S + 1 - step)
        s = t_prev[-1]
        h = lam(t) - lam(s)
        phi_1 = jnp.expm1(h)
        x_new = col(sch.alpha(t) / sch.alpha(s)) * x - col(sch.sigma(t) * phi_1) * m_prev[-1]
        if k == 2:
            r0 = (lam(s) - lam(t_prev[-2])) / h
            D1 = (m_prev[-1] - m_prev[-2]) / col(r0)
            x_new = x_new - 0.5 * col(sch.sigma(t) * phi_1) * D1
        x = x_new
        t_prev, times = (t_prev + [t])[-order:], times + [t]
        if step < S:
            m_prev = (m_prev + [den.eps(x, t)])[-order:]
    return x, jnp.stack(times)


def test_time_shift(x64):
    gm = GaussianMixture.gaussian(jnp.zeros(16), 0.5)
    den = gm.denoiser(DISCRETE, "eps")
    x = jax.random.normal(jax.random.key(9), (8, 16), jnp.float64)
    ts = jnp.linspace(1.0, 1e-3, 7)
    opts = TimeShift(window=200, cutoff=0.2)
    run = jit(
        lambda x, ts, o: dpm_solver(
            den, x, ts, order=2, method="multistep", time_shift=o, return_trajectory=True
        )
    )
    base, base_traj = run(x, ts, None)

    # window 0 is the base sampler bit for bit (also through the wrapper)
    np.testing.assert_array_equal(run(x, ts, TimeShift(0, 0.2))[0], base)
    # a window above the cutoff of every step changes nothing (the per-sample path agrees)
    never, _ = run(x, ts, TimeShift(window=200, cutoff=1.0))
    np.testing.assert_allclose(never, base, rtol=1e-10, atol=1e-10)

    y, traj = run(x, ts, opts)
    t = traj["t"]  # (S + 1, B)
    assert t.shape == (ts.shape[0], x.shape[0])
    np.testing.assert_array_equal(t[1], jnp.full((8,), ts[1]))  # no shift during warm-up
    shifted = ~np.isclose(np.asarray(t[2:]), np.asarray(ts[2:, None]), rtol=0, atol=1e-12)
    assert shifted.any(), "some time point must move"
    assert (np.ptp(np.asarray(t[2:-1]), axis=1) > 0).any(), "the shift must differ per sample"
    assert not np.allclose(y, base)
    # the whole semantics (target, next evaluation time, lambda history) vs the reference loop
    y_ref, t_ref = _ts_reference(den, x, ts, opts)
    np.testing.assert_allclose(t, t_ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(y, y_ref, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# JAX transformations
# --------------------------------------------------------------------------------------------


def test_grad_wrt_x_T_and_params(x64):
    """The Gaussian oracle's flow is affine in x_T: gradients equal finite differences."""
    gm = GaussianMixture.gaussian(jnp.array([0.2, -0.4]), 0.6)
    x = jax.random.normal(jax.random.key(10), (4, 2), jnp.float64)
    ts = _to_zero_grid(LINEAR, 6)
    den = gm.denoiser(LINEAR)

    def loss(x):  # both a singlestep (with lax.switch) and a multistep path
        y1 = dpm_solver(den, x, ts, order=3, method="singlestep")
        y2 = dpm_solver_pp(den, x, ts, order=2, method="multistep")
        return jnp.sum(y1 * jnp.array([1.0, -2.0])) + jnp.sum(y2**2)

    g, loss = jit(jax.grad(loss))(x), jit(loss)
    for i, j in [(1, 0), (3, 1)]:
        d = 1e-5 * jnp.zeros_like(x).at[i, j].set(1.0)
        fd = (loss(x + d) - loss(x - d)) / 2e-5
        np.testing.assert_allclose(g[i, j], fd, rtol=1e-7)

    def model(params, x, t, cond):
        return params["w"] * _nonlinear_fn(x, t, cond)

    def loss_p(params):
        den = Denoiser(Partial(model, params), DISCRETE, "eps")
        return jnp.sum(dpm_solver_pp(den, x, ts[:-1], order=3) ** 2)

    p = {"w": jnp.asarray(0.8)}
    g, loss_p = jit(jax.grad(loss_p))(p)["w"], jit(loss_p)
    fd = (loss_p({"w": p["w"] + 1e-6}) - loss_p({"w": p["w"] - 1e-6})) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_sharding_and_no_retrace():
    den = _nonlinear(DISCRETE)
    ts = lambda_grid(DISCRETE, 1.0, 1e-3, 5)
    x = jax.random.normal(jax.random.key(11), (16, 2))

    one = jit(lambda x: dpm_solver_pp(den, x, ts, order=3))

    # x_T sharded over the 8 devices: same values, same sharding (also the Time-Shift path,
    # on a continuous schedule: DiscreteVP's jnp.interp cannot take per-example times sharded
    # over devices in this JAX version)
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    xsh = jax.device_put(x, sharding)
    gauss = GaussianMixture.gaussian(jnp.array([0.3, 0.1]), 0.5).denoiser(LINEAR)
    ts_l = lambda_grid(LINEAR, 1.0, 1e-3, 5)
    shifted = jit(
        lambda x: dpm_solver(
            gauss, x, ts_l, order=2, method="multistep", time_shift=TimeShift(window=50, cutoff=0.0)
        )
    )
    for run in (one, shifted):
        y = run(xsh)
        assert y.sharding.is_equivalent_to(sharding, y.ndim)
        np.testing.assert_allclose(y, run(x), rtol=1e-5, atol=1e-6)

    # one trace serves every grid and state of the same shapes
    @jit
    @chex.assert_max_traces(n=1)
    def sample(x, ts):
        return dpm_solver(den, x, ts, order=3, method="singlestep")

    sample(x, ts)
    sample(x + 1.0, lambda_grid(DISCRETE, 0.9, 0.01, 5))
    sample(x, jnp.concatenate([ts[:-1], jnp.zeros(1)]))


def test_bad_input():
    den = _nonlinear(DISCRETE)
    x = jnp.ones((2, 2))
    ts = lambda_grid(DISCRETE, 1.0, 0.01, 4)
    bad = [
        (dpm_solver, ts[:3], dict(order=3, method="multistep"), "at least 3 step"),
        (dpm_solver_pp, ts[:1], dict(order=3, method="singlestep"), "at least 1 step"),
        (dpm_solver, ts, dict(order=4), "order must be"),
        (dpm_solver, ts, dict(order=0), "order must be"),
        (dpm_solver, ts, dict(order=True), "order must be"),
        (dpm_solver, ts, dict(method="adaptive"), "method must be"),
        (dpm_solver_pp, ts, dict(solver_type="heun"), "solver_type must be"),
        (dpm_solver_pp, ts, dict(order=3, third_order="doubled"), "third_order must be"),
        (dpm_solver, ts, dict(method="fast"), "needs the evaluation budget"),
        (dpm_solver, ts, dict(method="fast", nfe=6), "ts must have 4 points"),
        (dpm_solver, ts, dict(method="multistep", nfe=6), "only used with method='fast'"),
        (dpm_solver, ts, dict(time_shift=TimeShift(10, 0.3)), "multistep"),
        (dpm_solver, ts[::-1], dict(order=1), "strictly decreasing"),
    ]
    for f, grid, opts, match in bad:
        with pytest.raises(ValueError, match=match):
            f(den, x, grid, **opts)
    with pytest.raises(TypeError, match="time_shift"):
        dpm_solver(den, x, ts, method="multistep", time_shift=10)
    with pytest.raises(ValueError, match="nfe"):
        dpm_solver_fast_orders(0)
