"""DiffuseVAE's forward processes (dpm.losses.diffusevae) against independent truths: the
marginal against Monte Carlo runs of the one-step chain, the posterior against the Gaussian
product formula, the inverse data prediction, and the plain DDPM at xhat = 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpm import DiscreteVP
from dpm.losses.diffusevae import FORMULATIONS, forward_sample, posterior, predict_x0, shift

SCHED = DiscreteVP.from_name("linear", num_steps=50)


def _alpha_bar():
    t = (jnp.arange(51) / 50.0).astype(jnp.float64)
    return np.asarray(jnp.exp(2 * SCHED.log_alpha(t)), np.float64)  # abar_0 = 1 .. abar_50


def _one_step(x_prev, xhat, alpha, eps, formulation):
    # the forward *transition* of each formulation, written independently of the module
    if formulation == "form2_paper":  # q(x_t | x_{t-1}, xhat) of the paper
        return np.sqrt(alpha) * x_prev + (1 - np.sqrt(alpha)) * xhat + np.sqrt(1 - alpha) * eps
    if formulation == "form2_code":  # the plain chain on x - xhat
        return np.sqrt(alpha) * (x_prev - xhat) + xhat + np.sqrt(1 - alpha) * eps
    return np.sqrt(alpha) * x_prev + np.sqrt(1 - alpha) * eps


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_marginal_matches_the_chain_monte_carlo(formulation, x64):
    abar = _alpha_bar()
    rng = np.random.default_rng(0)
    n, x0, xhat = 200_000, 0.7, -0.4
    # the code's chain starts at x0 + xhat (its x_0); the others at x0
    x = np.full(n, x0 + (xhat if formulation == "form2_code" else 0.0))
    for t in range(1, 51):
        x = _one_step(x, xhat, abar[t] / abar[t - 1], rng.standard_normal(n), formulation)
        if t in (5, 25, 50):
            mean = float(forward_sample(x0, xhat, abar[t], 0.0, formulation))
            assert np.mean(x) == pytest.approx(mean, abs=0.01), (t, formulation)
            assert np.var(x) == pytest.approx(1 - abar[t], rel=0.02, abs=2e-3), t
    if formulation != "form1":  # x_T is centred on xhat
        assert np.mean(x) == pytest.approx(xhat + np.sqrt(abar[50]) * x0, abs=0.01)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_posterior_is_the_gaussian_product(formulation, x64):
    abar = _alpha_bar()
    x0, xhat, x_t = 0.3, 0.8, -0.5
    for t in (1, 2, 10, 40):
        alpha = abar[t] / abar[t - 1]
        # q(x_{t-1} | x_t, x0, xhat) ∝ q(x_t | x_{t-1}, xhat) q(x_{t-1} | x0, xhat): a Gaussian
        # in x_{t-1}; the transition is x_t = sqrt(alpha) x_{t-1} + b + noise(1 - alpha)
        b = _one_step(0.0, xhat, alpha, 0.0, formulation)
        prior_m = float(forward_sample(x0, xhat, abar[t - 1], 0.0, formulation))
        if formulation == "form2_code" and t == 1:
            prior_m = x0 + xhat  # the code's chain starts at x0 + xhat
        prior_v = 1 - abar[t - 1]
        if prior_v == 0:  # t = 1: x_0 is known
            m, v = prior_m, 0.0
        else:
            prec = alpha / (1 - alpha) + 1 / prior_v
            m = (np.sqrt(alpha) * (x_t - b) / (1 - alpha) + prior_m / prior_v) / prec
            v = 1 / prec
        mean, var = posterior(x0, x_t, xhat, abar[t], abar[t - 1], formulation)
        assert float(mean) == pytest.approx(m, abs=1e-12), (formulation, t)
        assert float(var) == pytest.approx(v, abs=1e-12)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_predict_x0_inverts_the_forward_sample(formulation, x64):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.uniform(k1, (4, 8, 8, 1), minval=-1, maxval=1, dtype=jnp.float64)
    xhat = jax.random.uniform(k2, x0.shape, minval=-1, maxval=1, dtype=jnp.float64)
    eps = jax.random.normal(k3, x0.shape, jnp.float64)
    abar = jnp.array([0.9, 0.5, 0.01, 0.3], jnp.float64)[:, None, None, None]
    x_t = forward_sample(x0, xhat, abar, eps, formulation)
    np.testing.assert_allclose(predict_x0(x_t, xhat, abar, eps, formulation), x0, atol=1e-12)


def test_zero_xhat_is_the_plain_ddpm_and_bad_names_are_refused(x64):
    abar = _alpha_bar()
    rng = np.random.default_rng(1)
    x0, x_t = rng.standard_normal(6), rng.standard_normal(6)
    zero = np.zeros(6)
    plain = [posterior(x0, x_t, zero, abar[t], abar[t - 1], "form1") for t in range(1, 51)]
    for f in FORMULATIONS:
        assert np.all(np.asarray(shift(zero, abar[10], f)) == 0)
        for t in range(1, 51):
            m, v = posterior(x0, x_t, zero, abar[t], abar[t - 1], f)
            np.testing.assert_array_equal(m, plain[t - 1][0])
            np.testing.assert_array_equal(v, plain[t - 1][1])
    # form1's posterior is the textbook DDPM one
    t = 20
    beta = 1 - abar[t] / abar[t - 1]
    c1 = np.sqrt(abar[t - 1]) * beta / (1 - abar[t])
    c2 = np.sqrt(1 - beta) * (1 - abar[t - 1]) / (1 - abar[t])
    np.testing.assert_allclose(plain[t - 1][0], c1 * x0 + c2 * x_t, rtol=1e-12)
    with pytest.raises(ValueError, match="formulation"):
        shift(zero, 0.5, "form3")
