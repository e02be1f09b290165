import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from dpm import (
    EDM,
    CosineVP,
    Denoiser,
    DiscreteVP,
    GaussianMixture,
    LinearVP,
    classifier_free_guidance,
    clip_x0,
    dynamic_thresholding,
    network_denoiser,
)


def _linear_model(w, x, t, cond):
    """A random affine 'network' whose output depends on x, t and the condition."""
    c = 0.0 if cond is None else cond[:, None]
    return jnp.tanh(x @ w) + 0.3 * jnp.asarray(t).reshape(-1, 1) + 0.2 * c


CASES = [
    (pred, sched)
    for sched in (DiscreteVP.from_name("linear"), LinearVP(), EDM())
    for pred in ("eps", "x0", "v")
]


@pytest.mark.parametrize("pred,sched", CASES)
def test_conversions_round_trip(pred, sched, x64):
    key = jax.random.key(0)
    w = jax.random.normal(key, (3, 3))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    t = jnp.linspace(0.1, 0.9, 5)
    d = Denoiser(Partial(_linear_model, w), sched, pred)
    x0, eps = d.predict(x, t)
    a = sched.alpha(t)[:, None]
    s = sched.sigma(t)[:, None]
    # the forward process identity x = alpha x0 + sigma eps holds exactly for every parameterization
    np.testing.assert_allclose(a * x0 + s * eps, x, atol=1e-12)
    # eps -> x0 -> v -> eps through re-wrapped denoisers gives the same predictions
    dx0 = Denoiser(lambda x_, t_, c: d.x0(x_, t_), sched, "x0")
    np.testing.assert_allclose(dx0.eps(x, t), eps, atol=1e-10)
    # v-prediction holds on every schedule, variance-preserving or not (EDM: sigma up to 80)
    dv = Denoiser(lambda x_, t_, c: dx0.v(x_, t_), sched, "v")
    np.testing.assert_allclose(dv.eps(x, t), eps, atol=1e-10)
    np.testing.assert_allclose(dv.x0(x, t), x0, atol=1e-10)


SCHEDULES = {
    "discrete_linear": DiscreteVP.from_name("linear"),
    "discrete_cosine": DiscreteVP.from_name("cosine"),
    "linear_vp": LinearVP(),
    "cosine_vp": CosineVP(),
    "edm": EDM(),
}


def _oracle_output(gm, pred, sched, x, t, cond):
    """The mixture's exact eps, x0 or v, written from its posterior means (not via Denoiser)."""
    x0, eps = gm.posterior_mean(sched, x, t)
    if pred == "eps":
        return eps
    if pred == "x0":
        return x0
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    return a * eps - s * x0  # v = alpha eps - sigma x0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_prediction_on_every_schedule_matches_the_oracle(name, x64):
    """An exact eps-, x0- or v-model, wrapped in a Denoiser, answers the oracle's eps, x0 and v.

    On EDM (alpha = 1, sigma up to 80) the VP-only v-conversion x0 = alpha x - sigma v is off by
    hundreds; the general one is exact.
    """
    sched = SCHEDULES[name]
    gm = GaussianMixture.create(
        jnp.array([[1.0, -0.5], [-1.5, 0.5], [0.2, 1.2]]), jnp.array([0.3, 0.6, 0.1]), [2, 1, 1]
    )
    t = jnp.array([0.004, 0.05, 0.3, 0.6, 0.9, 1.0])
    x = gm.sample_marginal(jax.random.key(3), sched, t, 6)

    @jax.jit
    def answers(x, t):
        # a Python loop at trace time: one compile per schedule serves all three predictions
        out = []
        for pred in ("eps", "x0", "v"):
            den = Denoiser(Partial(_oracle_output, gm, pred, sched), sched, pred)
            out.append(jnp.stack([den.eps(x, t), den.x0(x, t), den.v(x, t)]))
        return jnp.stack(out)  # (prediction, quantity, B, D)

    got = answers(x, t)
    x0, eps = gm.posterior_mean(sched, x, t)
    a, s = sched.alpha(t)[:, None], sched.sigma(t)[:, None]
    want = jnp.stack([eps, x0, a * eps - s * x0])
    scale = jnp.max(jnp.abs(want), axis=(1, 2), keepdims=True)  # |v| reaches ~100 on EDM
    for i, pred in enumerate(("eps", "x0", "v")):
        for j, q in enumerate(("eps", "x0", "v")):
            np.testing.assert_allclose(
                got[i, j],
                want[j],
                rtol=0,
                atol=1e-9 * float(scale[j, 0, 0]),
                err_msg=f"{name}: {q} from a {pred}-model",
            )


def test_v_conversion_keeps_low_precision_vp_exact():
    """On VP schedules alpha^2 + sigma^2 rounds to exactly 1 in bfloat16, so a bfloat16 v-model
    gets x0 = alpha x - sigma v with no extra rounding from the general division."""
    sched = LinearVP()
    x = jax.random.normal(jax.random.key(0), (4, 3)).astype(jnp.bfloat16)
    t = jnp.array([0.05, 0.3, 0.7, 1.0])
    den = Denoiser(lambda x_, t_, c: jnp.tanh(x_), sched, "v")
    x0, eps = den.predict(x, t)
    a = sched.alpha(t)[:, None].astype(jnp.bfloat16)
    s = sched.sigma(t)[:, None].astype(jnp.bfloat16)
    v = jnp.tanh(x)
    assert x0.dtype == eps.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x0, np.float32), np.asarray(a * x - s * v, np.float32))
    np.testing.assert_array_equal(
        np.asarray(eps, np.float32), np.asarray(s * x + a * v, np.float32)
    )


def test_guidance_scale_one_is_conditional_and_zero_unconditional():
    sched = DiscreteVP.from_name("linear")
    w = jax.random.normal(jax.random.key(0), (2, 2))
    cond = jnp.ones((4,))
    base = Denoiser(Partial(_linear_model, w), sched, "eps", cond)
    x = jax.random.normal(jax.random.key(1), (4, 2))
    null = jnp.zeros((4,))
    g1 = classifier_free_guidance(base, 1.0, null)
    g0 = classifier_free_guidance(base, 0.0, null)
    chex.assert_trees_all_close(g1.eps(x, 0.4), base.eps(x, 0.4), atol=1e-6)
    chex.assert_trees_all_close(g0.eps(x, 0.4), base.with_cond(null).eps(x, 0.4), atol=1e-6)
    # linear extrapolation in the scale
    g3 = classifier_free_guidance(base, 3.0, null)
    expected = base.with_cond(null).eps(x, 0.4) + 3.0 * (
        base.eps(x, 0.4) - base.with_cond(null).eps(x, 0.4)
    )
    chex.assert_trees_all_close(g3.eps(x, 0.4), expected, atol=1e-5)

    # vmap over guidance scales, jit with the denoiser as an argument
    def f(scale):
        return classifier_free_guidance(base, scale, null).x0(x, 0.4)

    out = jax.jit(jax.vmap(f))(jnp.array([1.0, 2.0, 4.0]))
    chex.assert_shape(out, (3, 4, 2))
    chex.assert_trees_all_close(out[0], base.x0(x, 0.4), atol=1e-5)


def test_dynamic_thresholding():
    sched = DiscreteVP.from_name("linear")
    x = jax.random.normal(jax.random.key(0), (6, 4, 4, 1)) * 0.3
    # an x0-model returning x: in-range inputs stay unchanged
    ident = Denoiser(lambda x, t, c: jnp.clip(x, -0.9, 0.9), sched, "x0")
    th = dynamic_thresholding(ident)
    chex.assert_trees_all_close(th.x0(x, 0.5), ident.x0(x, 0.5))
    # out-of-range predictions are scaled into [-1, 1] by the per-sample quantile
    big = Denoiser(lambda x, t, c: 5.0 * x, sched, "x0")
    th = dynamic_thresholding(big, ratio=0.995)
    out = th.x0(x, 0.5)
    assert float(jnp.max(jnp.abs(out))) <= 1.0 + 1e-6
    x0 = 5.0 * x
    s = jnp.maximum(jnp.quantile(jnp.abs(x0.reshape(6, -1)), 0.995, axis=1), 1.0)
    expected = (
        jnp.clip(x0, -s[:, None, None, None], s[:, None, None, None]) / s[:, None, None, None]
    )
    chex.assert_trees_all_close(out, expected, atol=1e-6)
    # static clipping
    cl = clip_x0(big)
    assert float(jnp.max(jnp.abs(cl.x0(x, 0.5)))) <= 1.0


def test_denoiser_is_a_pytree_and_params_are_traced():
    sched = DiscreteVP.from_name("linear")

    def apply(p, x, noise_level, cond):
        return x * p["a"] + p["b"]

    params = {"a": jnp.array(0.5), "b": jnp.array(0.1)}
    x = jnp.ones((2, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(den, x):
        return den.x0(x, 0.5)

    out1 = f(network_denoiser(Partial(apply, params), sched), x)
    out2 = f(network_denoiser(Partial(apply, {"a": jnp.array(0.7), "b": jnp.array(0.0)}), sched), x)
    assert not np.allclose(out1, out2)

    g = jax.grad(lambda p: network_denoiser(Partial(apply, p), sched).x0(x, 0.5).sum())(params)
    assert float(g["a"]) != 0.0


def test_edm_preconditioning_limits(x64):
    """c_skip -> 1, c_out -> 0 as sigma -> 0: the denoiser returns x at t = 0 whatever the net."""
    sched = EDM()
    rnd = lambda x, c_noise, cond: jnp.sin(x * 7.0) + c_noise
    den = network_denoiser(rnd, sched, preconditioning="edm")
    x = jax.random.normal(jax.random.key(0), (3, 2))
    chex.assert_trees_all_close(den.x0(x, 0.0), x, atol=1e-12)
    # a perfect F recovers the oracle: with F = (D - c_skip x)/c_out the output equals the oracle D
    gm = GaussianMixture.gaussian(jnp.array([0.3, -0.2]), 0.5)
    vp = DiscreteVP.from_name("linear")
    oracle = gm.denoiser(vp, "x0")

    def perfect(x_in, c_noise, cond):
        sb = jnp.exp(4.0 * c_noise)
        t = vp.t_of_sigma_bar(sb)
        x_bar = x_in * jnp.sqrt(sb**2 + 0.25)
        D = oracle.x0(x_bar * vp.alpha(t), t)
        c_skip = 0.25 / (sb**2 + 0.25)
        c_out = sb * 0.5 / jnp.sqrt(sb**2 + 0.25)
        return (D - c_skip * x_bar) / c_out

    den = network_denoiser(perfect, vp, preconditioning="edm")
    xt = jax.random.normal(jax.random.key(2), (4, 2))
    chex.assert_trees_all_close(den.x0(xt, 0.37), oracle.x0(xt, 0.37), atol=1e-9)


def test_bad_input():
    sched = DiscreteVP.from_name("linear")
    with pytest.raises(ValueError, match="prediction must be one of"):
        Denoiser(lambda x, t, c: x, sched, "score")
    with pytest.raises(TypeError, match="schedule"):
        Denoiser(lambda x, t, c: x, "linear", "eps")
    with pytest.raises(TypeError, match="fn must be callable"):
        Denoiser(3, sched)
    d = Denoiser(lambda x, t, c: x, sched)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        d.x0(jnp.ones((2, 2)), 1.5)
    with pytest.raises(ValueError, match="leading shape of x"):
        d.x0(jnp.ones((2, 2)), jnp.ones((3,)) * 0.5)
    bad = Denoiser(lambda x, t, c: x[:, :1], sched)
    with pytest.raises(ValueError, match="model output must have the shape"):
        bad.x0(jnp.ones((2, 2)), 0.5)
    with pytest.raises(ValueError, match="ratio"):
        dynamic_thresholding(d, ratio=99.5)
    with pytest.raises(ValueError, match="preconditioning"):
        network_denoiser(lambda x, c, k: x, sched, preconditioning="vp")
