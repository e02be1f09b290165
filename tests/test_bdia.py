"""BDIA: exact round trips for any model, DDIM at gamma = 0, measured orders, inversion
stability, BDIA-EDM, JAX transformations, errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.tree_util import Partial

from dpm import EDM, Denoiser, DiscreteVP, GaussianMixture, LinearVP
from solvers.bdia import BDIAPair, bdia_ddim, bdia_edm, bdia_edm_invert, bdia_invert
from solvers.edm import edm_euler, edm_heun

VP = LinearVP()  # compiles faster than DiscreteVP's table lookups; exactness is algebraic
DVP = DiscreteVP.from_name("linear")


def _mixture():
    means = jnp.array([[1.5, 0.0, -1.0, 0.5], [-1.0, 1.0, 0.5, 0.0], [0.0, -2.0, 1.0, -1.0]])
    return GaussianMixture.create(means, jnp.array([0.3, 0.5, 0.2]), [0.5, 0.3, 0.2])


def _mlp(params, x, t, cond):
    """A random nonlinear eps-model: the round trip's exactness must not depend on the model."""
    W1, b1, w_t, W2 = params
    h = jnp.tanh(x @ W1 + b1 + jnp.sin(3.0 * jnp.reshape(t, (-1, 1)) * w_t))
    return 2.0 * jnp.tanh(h @ W2)


def _mlp_denoiser(sched, dim=4, hidden=32, dtype=jnp.float32):
    k = jax.random.split(jax.random.key(42), 4)
    params = (
        jax.random.normal(k[0], (dim, hidden), dtype) / np.sqrt(dim),
        jax.random.normal(k[1], (hidden,), dtype),
        jax.random.normal(k[2], (hidden,), dtype),
        jax.random.normal(k[3], (hidden, dim), dtype) / np.sqrt(hidden),
    )
    return Denoiser(Partial(_mlp, params), sched, "eps")


def _grid(sched, S, end):
    """S steps, uniform in t from 1 to 2 t_min, then the end point (0 or t_min)."""
    return jnp.concatenate([jnp.linspace(1.0, 2 * sched.t_min, S), jnp.array([end])])


def _ddim_roundtrip(den, x_0, ts):
    """Closed-form DDIM inversion (eps at (z_k, t_k) run upward, DDIM paper) then DDIM."""
    a, s = den.schedule.alpha(ts), den.schedule.sigma(ts)

    def move(x, k, j):  # D_{k -> j}(x) = alpha_j x0_hat + sigma_j eps_hat
        x0, eps = den.predict(x, ts[k])
        return a[j] * x0 + s[j] * eps

    S = ts.shape[0] - 1
    z = jax.lax.fori_loop(0, S, lambda i, z: move(z, S - i, S - i - 1), x_0)
    return jax.lax.fori_loop(0, S, lambda k, x: move(x, k, k + 1), z)


@pytest.mark.parametrize("S, end", [(10, 0.0), (50, VP.t_min)], ids=["S10-to0", "S50-to-tmin"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bdia_ddim_round_trip_is_exact(S, end, dtype):
    """Invert, then sample from the pair: x_0 back to <= 1e-5 (float32; 1e-4 for the random MLP,
    whose steep eps field amplifies round-off more) / 1e-10 (float64) relative, for the oracle
    and for a random MLP (DiscreteVP and LinearVP), while the DDIM-inversion round trip is off
    by O(h). The gammas are those whose inverted latent stays O(1): the inversion's parasitic
    mode grows like gamma^-S (see the next test), so small gammas at many steps lose digits in
    proportion to the latent's size (measured, float32, S = 50, MLP: 1e-3 at gamma = 0.9)."""
    with jax.enable_x64(dtype == "float64"):
        dt = jnp.dtype(dtype)
        sched = DVP if (S, dtype) == (10, "float64") else VP
        models = {"mixture": _mixture().denoiser(sched), "mlp": _mlp_denoiser(sched, dtype=dt)}
        x_0 = _mixture().sample(jax.random.key(0), 16).astype(dt)
        ts = _grid(sched, S, end).astype(dt)

        @jax.jit
        def round_trips(x_0, gamma):  # one compile for both models and every gamma
            out = {}
            for name, den in models.items():
                pair = bdia_invert(den, x_0, ts, gamma=gamma)
                x_rec = bdia_ddim(den, pair.x_T, ts, gamma=gamma, x_next=pair.x_next)
                out[name] = (x_rec, pair, _ddim_roundtrip(den, x_0, ts))
            return out

        scale = float(jnp.max(jnp.abs(x_0)))
        if dtype == "float32":  # the random MLP amplifies round-off more: measured 1e-5-4e-5
            tols, gammas = (1e-5, 1e-4), (0.9, 0.95, 1.0) if S == 10 else (1.0,)
        else:
            tols, gammas = (1e-10, 1e-10), (0.5, 0.9, 0.95, 1.0) if S == 10 else (0.9, 0.95, 1.0)
        errs, ddim_err = {m: {} for m in models}, {}
        for g in gammas:
            for name, (x_rec, pair, x_ddim) in round_trips(x_0, jnp.asarray(g, dt)).items():
                assert isinstance(pair, BDIAPair) and pair.x_T.dtype == dt
                errs[name][g] = float(jnp.max(jnp.abs(x_rec - x_0))) / scale
                ddim_err[name] = float(jnp.max(jnp.abs(x_ddim - x_0))) / scale
        for name, tol in zip(models, tols, strict=True):
            worst = max(errs[name].values())
            print(
                f"\n{name} S={S} {dtype}: BDIA round trip {errs[name]}; DDIM {ddim_err[name]:.2e}"
            )
            assert worst <= tol
            assert ddim_err[name] > 1e3 * max(worst, 1e-7)  # DDIM inversion is inexact


def test_inversion_parasitic_mode_grows_like_inverse_gamma(x64):
    """The inversion recurrence has the extra root -1/gamma: over 10 more steps the inverted
    latent grows by about gamma^-10 (times the shrinking local error, (40/50)^2 here), while the
    round trip stays exact relative to the numbers involved."""
    den, x_0 = _mixture().denoiser(VP), _mixture().sample(jax.random.key(0), 16)
    size = {}
    for S in (40, 50):
        ts = _grid(VP, S, 0.0)

        @jax.jit
        def round_trip(gamma, ts=ts):
            pair = bdia_invert(den, x_0, ts, gamma=gamma)
            return pair, bdia_ddim(den, pair.x_T, ts, gamma=gamma, x_next=pair.x_next)

        for gamma in (0.5, 0.7):
            pair, x_rec = round_trip(gamma)
            size[S, gamma] = float(jnp.max(jnp.abs(pair.x_T)))
            assert float(jnp.max(jnp.abs(x_rec - x_0))) < 1e-13 * size[S, gamma]
    for gamma in (0.5, 0.7):
        rate = np.log(size[50, gamma] / size[40, gamma]) / 10
        print(
            f"\ngamma={gamma}: latent growth per step {rate:.3f}, log(1/gamma) {-np.log(gamma):.3f}"
        )
        assert 0.7 < rate / -np.log(gamma) < 1.1


def test_gamma_zero_is_ddim_bit_for_bit():
    """gamma = 0 reduces the update to the DDIM map exactly (0 * finite = 0, a + 0 = a). Run
    op by op (no jit), so the comparison is not blurred by the compiler fusing a * b + c into
    an FMA differently in the two programs (which it does: 1-ulp differences under jit)."""
    sched = LinearVP()
    den = _mixture().denoiser(sched)
    ts = _grid(sched, 6, 0.0)
    x_T = jax.random.normal(jax.random.key(1), (16, 4))
    a, s = sched.alpha(ts), sched.sigma(ts)

    def ddim(x):
        for k in range(6):  # closed-form DDIM (eta = 0)
            x0, eps = den.predict(x, ts[k])
            x = a[k + 1] * x0 + s[k + 1] * eps
        return x

    with jax.disable_jit():
        np.testing.assert_array_equal(bdia_ddim(den, x_T, ts, gamma=0.0), ddim(x_T))


@pytest.mark.parametrize("sched", [VP, EDM()], ids=["LinearVP", "EDM"])
def test_point_mass_is_exact_for_any_gamma(sched, x64):
    """Spec §12.3: for point-mass data every one-step map here is exact, so BDIA (any gamma)
    returns the point up to round-off (EDM Heun: 1e-19). The round-off is amplified by BDIA's
    parasitic root -gamma / rho, rho = sigma_bar_{i+1} / sigma_bar_i the flow's contraction per
    step: up to ~1e4-1e5 on this grid, hence the tolerance; an inexact map would be off by
    O(h) ~ 0.1."""
    mu = jnp.array([0.3, -0.7, 1.1, 0.0])
    den = GaussianMixture.gaussian(mu, 0.0).denoiser(sched)
    ts = _grid(sched, 8, 0.0)
    x_T = sched.sigma(1.0) * jax.random.normal(jax.random.key(2), (4, 4))
    run = jax.jit(lambda x, g: (bdia_ddim(den, x, ts, gamma=g), bdia_edm(den, x, ts, gamma=g)))
    for g in (0.3, 1.0):
        for x0 in run(x_T, g):
            np.testing.assert_allclose(x0, jnp.broadcast_to(mu, x0.shape), atol=1e-7)


def _orders(samplers, sched, Ns, t0=1.0, t1=1e-2):
    """Measured orders vs the exact flow of a single Gaussian, on lambda-uniform grids."""
    gm = GaussianMixture.gaussian(jnp.array([0.5, -1.0]), 0.3)
    den = gm.denoiser(sched)
    x_T = sched.alpha(t0) * gm.means[0] + sched.sigma(t0) * jax.random.normal(
        jax.random.key(3), (8, 2)
    )
    ref = gm.flow(sched, x_T, t0, t1)
    run = jax.jit(lambda ts: [jnp.max(jnp.abs(f(den, x_T, ts) - ref)) for f in samplers])
    errs = []
    for N in Ns:
        ts = sched.t_of_log_snr(jnp.linspace(sched.log_snr(t0), sched.log_snr(t1), N + 1))
        errs.append([float(e) for e in run(ts.at[0].set(t0).at[-1].set(t1))])
    errs = np.asarray(errs)
    return np.polyfit(np.log(1.0 / np.asarray(Ns)), np.log(errs), 1)[0], errs


def partial_gamma(gamma):
    return lambda den, x, ts: bdia_ddim(den, x, ts, gamma=gamma)


def test_measured_orders_bdia_ddim(x64):
    """Spec §8 [analysis]: order 1 for gamma < 1, order 2 for gamma = 1 (lambda-uniform grid);
    gamma < 1 needs more steps to reach its asymptotic regime."""
    samplers = [partial_gamma(g) for g in (0.5, 1.0)]
    (p_half, p_one), errs = _orders(samplers, LinearVP(), [20, 40, 80, 160, 320])
    print(f"\nBDIA-DDIM order gamma=0.5: {p_half:.3f}, gamma=1: {p_one:.3f}; errors\n{errs}")
    assert abs(p_half - 1.0) < 0.3
    assert abs(p_one - 2.0) < 0.3


def test_measured_orders_bdia_edm(x64):
    """Heun both ways: order 2; Heun with a backward Euler map: order 1 (its O(h^2) local error
    enters with weight gamma)."""
    samplers = [
        lambda den, x, ts: bdia_edm(den, x, ts, gamma=0.5),
        lambda den, x, ts: bdia_edm(den, x, ts, gamma=0.5, backward_solver="euler"),
    ]
    (p_heun, p_mixed), errs = _orders(samplers, EDM(), [20, 40, 80, 160, 320], t1=1e-3)
    print(f"\nBDIA-EDM order Heun/Heun {p_heun:.3f}, Heun/Euler {p_mixed:.3f}; errors\n{errs}")
    assert abs(p_heun - 2.0) < 0.3
    assert abs(p_mixed - 1.0) < 0.3


@pytest.mark.parametrize("sched", [VP, EDM()], ids=["LinearVP", "EDM"])
def test_bdia_edm_round_trip(sched, x64):
    """Exact for Heun/Heun, Heun/Euler and Euler/Euler maps, for a random MLP, float64."""
    den = _mlp_denoiser(sched, dtype=jnp.float64)
    x_0 = _mixture().sample(jax.random.key(0), 16)
    ts = _grid(sched, 20, 0.0)
    configs = [("heun", None), ("heun", "euler"), ("euler", None)]

    @jax.jit
    def round_trips(x_0, gamma):
        out = []
        for solver, backward in configs:
            kw = dict(solver=solver, backward_solver=backward)
            pair = bdia_edm_invert(den, x_0, ts, gamma=gamma, **kw)
            out.append(bdia_edm(den, pair.x_T, ts, gamma=gamma, x_next=pair.x_next, **kw))
        return out

    # relative to the largest numbers involved, x_bar ~ sigma_bar(1) (80-160)
    scale = float(jnp.max(jnp.abs(x_0))) * float(sched.sigma_bar(1.0))
    for g in (0.9, 1.0):
        for cfg, x_rec in zip(configs, round_trips(x_0, g), strict=True):
            err = float(jnp.max(jnp.abs(x_rec - x_0)))
            assert err < 1e-10 * scale, (cfg, g, err)


def test_bdia_edm_float32_round_trip():
    """In float32 BDIA-EDM loses digits: it works in x_bar = x / alpha (up to sigma_bar_max ~ 160
    at t = 1), and the gamma ~ 1 scheme amplifies early round-off like the leapfrog parasitic
    mode, by up to sigma_bar_max / s_data. Bound: eps32 * sigma_bar_max^2 / s_min."""
    den = _mixture().denoiser(VP)
    x_0 = _mixture().sample(jax.random.key(0), 16)
    ts = _grid(VP, 20, 0.0)

    @jax.jit
    def round_trip(x_0, gamma):
        pair = bdia_edm_invert(den, x_0, ts, gamma=gamma)
        return bdia_edm(den, pair.x_T, ts, gamma=gamma, x_next=pair.x_next)

    bound = float(jnp.finfo(jnp.float32).eps * VP.sigma_bar(1.0) ** 2 / 0.2)
    for g in (0.9, 1.0):
        err = float(jnp.max(jnp.abs(round_trip(x_0, g) - x_0)) / jnp.max(jnp.abs(x_0)))
        print(f"\nBDIA-EDM float32 round trip gamma={g}: {err:.2e} (bound {bound:.1e})")
        assert err < bound


@pytest.mark.parametrize("sched", [VP, EDM()], ids=["LinearVP", "EDM"])
def test_bdia_edm_special_cases(sched):
    """gamma = 0 is EDM; with alpha = 1 and Euler maps BDIA-EDM is BDIA-DDIM."""
    den = _mixture().denoiser(sched)
    ts = _grid(sched, 9, 0.0)
    x = sched.sigma(1.0) * jax.random.normal(jax.random.key(4), (8, 4))
    out = jax.jit(
        lambda x: (
            bdia_edm(den, x, ts, gamma=0.0),
            edm_heun(den, x, ts),
            bdia_edm(den, x, ts, gamma=0.0, solver="euler"),
            edm_euler(den, x, ts),
            bdia_edm(den, x, ts, gamma=0.7, solver="euler"),
            bdia_ddim(den, x, ts, gamma=0.7),
        )
    )(x)
    # float32 round-off of x_bar ~ sigma_bar(1) |z|, fused differently by the compiler
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out[2], out[3], rtol=1e-5, atol=1e-4)
    if isinstance(sched, EDM):
        np.testing.assert_allclose(out[4], out[5], rtol=1e-5, atol=1e-4)
    else:  # the combination is taken in x_bar, not in x: a different sampler
        assert float(jnp.max(jnp.abs(out[4] - out[5]))) > 1e-3


def test_trajectories_and_nfe():
    den = _mixture().denoiser(LinearVP())
    ts = _grid(LinearVP(), 6, 0.0)
    x_T = jax.random.normal(jax.random.key(5), (8, 4))
    run = jax.jit(bdia_ddim, static_argnames="return_trajectory")
    x0, traj = run(den, x_T, ts, gamma=1.0, return_trajectory=True)
    chex.assert_shape((traj["x"], traj["x0"], traj["eps"]), [(7, 8, 4), (6, 8, 4), (6, 8, 4)])
    np.testing.assert_array_equal(traj["x"][0], x_T)
    np.testing.assert_array_equal(traj["x"][-1], x0)
    # from a pair: S - 1 evaluations, and the states are those of the inversion, in ts order
    pair, inv = jax.jit(bdia_invert, static_argnames="return_trajectory")(
        den, x0, ts, gamma=1.0, return_trajectory=True
    )
    chex.assert_shape(inv["x"], (7, 8, 4))
    np.testing.assert_array_equal(inv["x"][0], pair.x_T)
    np.testing.assert_array_equal(inv["x"][1], pair.x_next)
    np.testing.assert_array_equal(inv["x"][-1], x0)
    x0b, trajb = run(den, pair.x_T, ts, gamma=1.0, x_next=pair.x_next, return_trajectory=True)
    chex.assert_shape(trajb["x0"], (5, 8, 4))
    np.testing.assert_allclose(trajb["x"], inv["x"], rtol=1e-4, atol=1e-4)
    e, traj_e = jax.jit(bdia_edm, static_argnames="return_trajectory")(
        den, x_T, ts, return_trajectory=True
    )
    chex.assert_shape(traj_e["x"], (7, 8, 4))
    np.testing.assert_allclose(traj_e["x"][-1], e, rtol=1e-6)
    assert (int(traj["nfe"]), int(inv["nfe"]), int(trajb["nfe"])) == (6, 6, 5)


@pytest.mark.parametrize("S", [1, 3])
def test_reported_nfe_counts_model_calls(S):
    """traj["nfe"] equals the model calls made at run time (lax.cond skips Heun's correction
    onto t = 0), for every BDIA-EDM configuration, with and without a pair, and inversion."""
    calls = []
    inner = _mixture().denoiser(EDM()).fn

    def fn(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return inner(x, t, cond)

    den = Denoiser(fn, EDM(), "eps")
    x = jax.random.normal(jax.random.key(7), (2, 4))
    for end in (0.0, 1e-3):
        ts = jnp.concatenate([jnp.linspace(1.0, 0.01, S), jnp.array([end])])

        @jax.jit
        def run(x, ts=ts):
            out = []
            for solver, backward in (("heun", None), ("heun", "euler"), ("euler", "heun")):
                kw = dict(solver=solver, backward_solver=backward, return_trajectory=True)
                pair, inv = bdia_edm_invert(den, x, ts, **kw)
                _, fwd = bdia_edm(den, x, ts, **kw)
                _, frm = bdia_edm(den, pair.x_T, ts, x_next=pair.x_next, **kw)
                out += [inv["nfe"], fwd["nfe"], frm["nfe"]]
            return out

        calls.clear()
        nfe = run(x)
        jax.effects_barrier()
        assert sum(int(n) for n in nfe) == len(calls), (S, end, [int(n) for n in nfe])
        if S == 3 and end == 0.0:  # documented: Heun both ways 3S - 2, backward Euler 2S - 1
            assert (int(nfe[1]), int(nfe[4])) == (3 * S - 2, 2 * S - 1)


def test_jit_no_retrace_vmap_grad_sharded():
    sched = LinearVP()
    den = _mlp_denoiser(sched)
    ts = _grid(sched, 8, 0.0)
    x_T = jax.random.normal(jax.random.key(6), (16, 4))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(den, x, gamma):
        return bdia_ddim(den, x, ts, gamma=gamma), bdia_edm(den, x, ts, gamma=gamma)

    run(den, x_T, 0.5)
    chex.assert_tree_all_finite(run(den, x_T + 1.0, 1.0))

    @jax.jit
    def transforms(x_T):
        # vmap over gamma; grad w.r.t. x_T; grad w.r.t. the model's parameters through a
        # round trip; the round trip's Jacobian is the identity
        xs = jax.vmap(lambda g: bdia_ddim(den, x_T, ts, gamma=g))(jnp.array([0.0, 0.5, 1.0]))
        g = jax.grad(lambda x: jnp.sum(bdia_ddim(den, x, ts) ** 2))(x_T)

        def rt(params, x0):
            d = Denoiser(Partial(_mlp, params), sched, "eps")
            pair = bdia_invert(d, x0, ts, gamma=0.9)
            return bdia_ddim(d, pair.x_T, ts, gamma=0.9, x_next=pair.x_next)

        params = den.fn.args[0]
        g_params = jax.grad(lambda p: jnp.sum(rt(p, x_T)))(params)
        v = jnp.arange(4.0)
        vjp = jax.grad(lambda x: jnp.sum(rt(params, x) * v))(x_T[:2])
        lo = (
            bdia_ddim(den, x_T.astype(jnp.bfloat16), ts),
            bdia_edm(den, x_T.astype(jnp.bfloat16), ts),
        )
        return xs, g, g_params, vjp, lo

    xs, g, g_params, vjp, lo = transforms(x_T)
    x_lo = x_T.astype(jnp.bfloat16).astype(jnp.float32)  # the same start in float32
    for a, b in zip(lo, run(den, x_lo, 1.0), strict=True):  # bfloat16 in and out, f32 inside
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=1e-2, atol=1e-2)
    chex.assert_shape(xs, (3, 16, 4))
    np.testing.assert_allclose(xs[1], run(den, x_T, 0.5)[0], rtol=1e-5)
    chex.assert_tree_all_finite((g, g_params))
    assert float(jnp.max(jnp.abs(g))) > 0
    # d(round trip)/d(params) = 0 and d(round trip)/d(x_0) = I, up to round-off
    assert max(float(jnp.max(jnp.abs(p))) for p in g_params) < 1e-3
    np.testing.assert_allclose(vjp, jnp.broadcast_to(jnp.arange(4.0), (2, 4)), atol=1e-3)

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sh = NamedSharding(mesh, PartitionSpec("data"))
    out = jax.jit(bdia_ddim)(den, jax.device_put(x_T, sh), ts)
    assert out.sharding.is_equivalent_to(sh, out.ndim)
    np.testing.assert_allclose(out, run(den, x_T, 1.0)[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs():
    den = _mixture().denoiser(VP)
    ts = _grid(VP, 4, 0.0)
    x = jnp.zeros((2, 4))
    for g in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"gamma must lie in \[0, 1\]"):
            bdia_ddim(den, x, ts, gamma=g)
        with pytest.raises(ValueError, match="gamma"):
            bdia_edm(den, x, ts, gamma=g)
    for inv in (bdia_invert, bdia_edm_invert):
        with pytest.raises(ValueError, match=r"gamma must lie in \(0, 1\]"):
            inv(den, x, ts, gamma=0.0)
    with pytest.raises(ValueError, match="scalar"):
        bdia_ddim(den, x, ts, gamma=jnp.ones(2))
    with pytest.raises(ValueError, match="x_next must match"):
        bdia_ddim(den, x, ts, x_next=jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="solver"):
        bdia_edm(den, x, ts, solver="rk4")
    with pytest.raises(ValueError, match="backward_solver"):
        bdia_edm_invert(den, x, ts, backward_solver="midpoint")
    with pytest.raises(ValueError, match="decreasing"):
        bdia_invert(den, x, ts[::-1])
    with pytest.raises(ValueError, match="at least 1 step"):
        bdia_ddim(den, x, ts[:1])
    with pytest.raises(TypeError, match="floating"):
        bdia_ddim(den, jnp.zeros((2, 4), jnp.int32), ts)
