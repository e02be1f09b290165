import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from dpm import (
    EDM,
    Denoiser,
    DiscreteVP,
    GaussianMixture,
    LinearVP,
)
from dpm.losses import denoising_loss, log_weight, sample_time


def test_weightings_closed_form(x64):
    s = LinearVP()
    t = jnp.array([0.05, 0.3, 0.7, 0.95])
    snr = s.alpha(t) ** 2 / s.sigma(t) ** 2
    sb = s.sigma(t) / s.alpha(t)
    expected = {
        "eps": snr,
        "x0": jnp.ones_like(t),
        "v": snr + 1,
        "truncated_snr": jnp.maximum(snr, 1.0),
        "min_snr": jnp.minimum(snr, 5.0),
        "edm": (sb**2 + 0.25) / (sb * 0.5) ** 2,
    }
    for name, w in expected.items():
        np.testing.assert_allclose(jnp.exp(log_weight(name, s, t)), w, rtol=1e-10, err_msg=name)


def _oracle_as(pred, gm, sched):
    """The exact denoiser re-expressed as an eps-, x0- or v-model."""
    ex = gm.denoiser(sched, "eps")
    fns = {"eps": ex.eps, "x0": ex.x0, "v": ex.v}
    return Denoiser(lambda x, t, c: fns[pred](x, t), sched, pred)


@pytest.mark.parametrize("sched", [DiscreteVP.from_name("linear"), EDM()], ids=["vp", "edm"])
@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_oracle_loss_equals_posterior_variance(pred, sched, x64):
    """For N(mu, c^2 I) the oracle's x0-MSE at fixed t is the posterior variance
    c^2 sigma^2 / (alpha^2 c^2 + sigma^2); each weighting multiplies it by w(t).

    On EDM (alpha = 1, sigma = 32 at t = 0.4) a v-model's error is rescaled by
    sigma / (alpha^2 + sigma^2), not by the VP-only sigma."""
    c = 0.6
    gm = GaussianMixture.gaussian(jnp.array([0.3, -0.5, 1.0, 0.0]), c)
    t0 = 0.4
    den = _oracle_as(pred, gm, sched)
    x = gm.sample(jax.random.key(0), 100_000)
    a2, s2 = sched.alpha(t0) ** 2, sched.sigma(t0) ** 2
    post_var = c**2 * s2 / (a2 * c**2 + s2)
    for weighting, w in [("x0", 1.0), ("eps", a2 / s2), ("v", a2 / s2 + 1)]:
        loss = denoising_loss(lambda p: den, weighting=weighting, time_sampler=lambda k, n: t0)
        vals = loss(None, {"x": x}, jax.random.key(1))
        assert vals.shape == (100_000,)
        # standard error of a mean of chi^2_4/4-type terms: ~ sqrt(2/4/1e5) relative
        np.testing.assert_allclose(float(vals.mean()), float(w * post_var), rtol=0.015)


def test_native_space_loss_is_exact_mse():
    """An eps-model with eps weighting gets exactly its eps-MSE (no rescaling error)."""
    sched = DiscreteVP.from_name("linear")
    w = jax.random.normal(jax.random.key(0), (3, 3))
    model = lambda p, x, t, c: jnp.tanh(x @ p)
    make = lambda p: Denoiser(Partial(model, p), sched, "eps")
    x0 = jax.random.normal(jax.random.key(1), (8, 3))
    key = jax.random.key(2)
    loss = denoising_loss(make, weighting="eps", time_sampler="discrete")
    vals = loss(w, {"x": x0}, key)
    kt, ke = jax.random.split(key)
    t = sample_time(kt, 8, sched, "discrete")
    eps = jax.random.normal(ke, x0.shape)
    xt = sched.alpha(t)[:, None] * x0 + sched.sigma(t)[:, None] * eps
    np.testing.assert_allclose(vals, jnp.mean((jnp.tanh(xt @ w) - eps) ** 2, 1), rtol=1e-5)
    # and it is differentiable
    g = jax.grad(lambda p: loss(p, {"x": x0}, key).mean())(w)
    assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


def test_point_mass_oracle_has_zero_loss():
    pm = GaussianMixture.gaussian(jnp.array([0.2, -0.3]), 0.0)
    sched = EDM()
    den = pm.denoiser(sched, "x0")
    loss = denoising_loss(lambda p: den, weighting="edm", time_sampler="lognormal")
    x = jnp.tile(jnp.array([[0.2, -0.3]]), (64, 1))
    np.testing.assert_allclose(loss(None, {"x": x}, jax.random.key(0)), 0.0, atol=1e-10)


def test_time_samplers():
    sched = DiscreteVP.from_name("linear")
    key = jax.random.key(0)
    t = sample_time(key, 10_000, sched, "discrete")
    idx = np.asarray(sched.index_of_t(t))
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
    assert idx.min() >= 0 and idx.max() <= 999
    t = sample_time(key, 20_000, EDM(), "lognormal")
    log_sb = np.log(np.asarray(EDM().sigma_bar(t)))
    assert abs(log_sb.mean() + 1.2) < 0.03 and abs(log_sb.std() - 1.2) < 0.03
    t = sample_time(key, 1000, LinearVP(), "uniform")
    assert float(t.min()) > 0 and float(t.max()) <= 1


def test_bad_input():
    sched = LinearVP()
    den = Denoiser(lambda x, t, c: x, sched)
    with pytest.raises(ValueError, match="weighting must be one of"):
        denoising_loss(lambda p: den, weighting="snr2")
    with pytest.raises(ValueError, match="time_sampler must be one of"):
        denoising_loss(lambda p: den, time_sampler="beta")
    with pytest.raises(ValueError, match="needs a DiscreteVP"):
        sample_time(jax.random.key(0), 4, sched, "discrete")
