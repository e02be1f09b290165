"""DiffuseVAE's refiner on the shifted variable (dpm.losses.diffusevae.refiner_denoiser,
refiner_loss; solvers.diffusevae_sample) against independent truths: the official code's
ancestral and DDIM updates written out by hand, a zero loss for the exact noise oracle of each
formulation's marginal, the plain DDPM at xhat = 0, and the corruptions' statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from dpm import Denoiser, DiscreteVP
from dpm.losses import denoising_loss
from dpm.losses.diffusevae import (
    CORRUPTIONS,
    FORMULATIONS,
    corrupt,
    refiner_denoiser,
    refiner_loss,
    shift,
    vae_reconstruction,
)
from solvers import ddim, ddpm, diffusevae_sample

SCHED = DiscreteVP.from_name("linear", num_steps=1000)
SHAPE = (3, 4, 4, 1)


def _net(x, t, cond):
    # an arbitrary smooth "eps-network" that reads x_t, t and xhat
    return jnp.tanh(0.8 * x - 0.5 * cond["image"]) * (0.5 + t)


def _data(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    xhat = jax.random.uniform(k1, SHAPE, minval=-1, maxval=1)
    x_t = xhat + jax.random.normal(k2, SHAPE)
    return xhat, x_t, k3


def _abar(t):
    return SCHED.alpha(jnp.asarray(t)) ** 2


def test_ancestral_step_is_the_official_code_update(x64):
    # code (ddpm_form2.py): x0_hat = (x_t - xhat)/sqrt(abar_t) - sqrt(1/abar_t - 1) eps,
    # mean = c1 x0_hat + c2 x_t + (1 - c2) xhat; paper: mean = c1 x0_hat + c2 x_t + c3 xhat
    xhat, x_t, _ = _data()
    t, s = 0.6, 0.55
    ab_t, ab_s = _abar(t), _abar(s)
    a = ab_t / ab_s
    c1 = jnp.sqrt(ab_s) * (1 - a) / (1 - ab_t)
    c2 = jnp.sqrt(a) * (1 - ab_s) / (1 - ab_t)
    eps = _net(x_t, t, {"image": xhat})
    for form in ("form2_code", "form2_paper"):
        den = refiner_denoiser(Denoiser(_net, SCHED, "eps", {"image": xhat}), form)
        if form == "form2_code":
            x0_hat = (x_t - xhat) / jnp.sqrt(ab_t) - jnp.sqrt(1 / ab_t - 1) * eps
            want = c1 * x0_hat + c2 * x_t + (1 - c2) * xhat
        else:
            x0_hat = (x_t - (1 - jnp.sqrt(ab_t)) * xhat - jnp.sqrt(1 - ab_t) * eps) / jnp.sqrt(ab_t)
            want = c1 * x0_hat + c2 * x_t + (1 - c1 - c2) * xhat
        # the last step of a sampler adds no noise: ts = [t, s] gives the posterior mean in u
        got = ddpm(den, x_t - xhat, jnp.asarray([t, s]), key=jax.random.key(0)) + xhat
        chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-10)


def test_ddim_step_is_the_official_code_update(x64):
    # code (spaced_diff_form2.py, eta = 0): x_s = xhat + sqrt(abar_s) x0_hat + sqrt(1-abar_s) eps
    xhat, x_t, _ = _data(1)
    t, s = 0.8, 0.3
    ab_t, ab_s = _abar(t), _abar(s)
    eps = _net(x_t, t, {"image": xhat})
    x0_hat = (x_t - xhat) / jnp.sqrt(ab_t) - jnp.sqrt(1 / ab_t - 1) * eps
    want = xhat + jnp.sqrt(ab_s) * x0_hat + jnp.sqrt(1 - ab_s) * eps
    den = refiner_denoiser(Denoiser(_net, SCHED, "eps", {"image": xhat}), "form2_code")
    got = ddim(den, x_t - xhat, jnp.asarray([t, s])) + xhat
    chex.assert_trees_all_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_sampling_at_zero_xhat_is_the_plain_sampler(formulation):
    xhat = jnp.zeros(SHAPE)
    noise = jax.random.normal(jax.random.key(3), SHAPE)
    ts = jnp.linspace(1.0, 0.0, 6)
    plain = Denoiser(_net, SCHED, "eps", {"image": xhat})
    den = refiner_denoiser(plain, formulation)
    for sampler, kw in ((ddim, {}), (ddpm, {"key": jax.random.key(4)})):
        got = jax.jit(lambda d, n, s=sampler, kw=kw: diffusevae_sample(
            s, d, n, ts, formulation, **kw))(den, noise)
        want = jax.jit(lambda d, n, s=sampler, kw=kw: s(d, n, ts, **kw))(plain, noise)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_clip_bounds_the_data_prediction_in_x(x64):
    xhat, x_t, _ = _data(2)
    wild = Denoiser(lambda x, t, c: 50.0 * jnp.sin(7 * x), SCHED, "eps", {"image": xhat})
    for form in FORMULATIONS:
        den = refiner_denoiser(wild, form, clip=(-1.0, 1.0))
        u0 = den.x0(x_t, 0.5)
        x0 = diffusevae_sample(lambda d, x, ts: d.x0(x, ts[0]), den, x_t, jnp.asarray([0.5]),
                               form)
        assert float(jnp.max(jnp.abs(x0))) <= 1.0 + 1e-12
        # and some predictions are clipped (the test can fail)
        assert float(jnp.mean(jnp.abs(jnp.abs(x0) - 1.0) < 1e-12)) > 0.2, form
        chex.assert_shape(u0, SHAPE)
    with pytest.raises(ValueError, match="clip"):
        refiner_denoiser(wild, "form1", clip=(1.0, -1.0))
    with pytest.raises(ValueError, match="formulation"):
        refiner_denoiser(wild, "form3")


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_loss_is_zero_for_the_exact_noise_of_the_formulation(formulation, x64):
    # an oracle that knows x0 inverts the formulation's marginal: it recovers eps exactly only
    # if the network input x_t is forward_sample(x0, xhat, abar_t, eps) of this formulation
    k1, k2 = jax.random.split(jax.random.key(5))
    x0 = jax.random.uniform(k1, SHAPE, minval=-1, maxval=1)
    xhat = jax.random.uniform(k2, SHAPE, minval=-1, maxval=1)

    def oracle(form, x, t, cond):
        ab = (SCHED.alpha(t) ** 2)[:, None, None, None]
        return (x - shift(cond["image"], ab, form) - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)

    batch = {"x": x0, "xhat": xhat}
    for form in FORMULATIONS:
        make = lambda p, form=form: Denoiser(Partial(oracle, form), SCHED, "eps")  # noqa: E731
        loss = refiner_loss(make, formulation, time_sampler="discrete")(None, batch,
                                                                        jax.random.key(6))
        chex.assert_shape(loss, (SHAPE[0],))
        if form == formulation:
            assert float(jnp.max(loss)) < 1e-10, (form, formulation)
        else:
            assert float(jnp.max(loss)) > 1e-2, (form, formulation)


def test_loss_at_zero_xhat_is_the_plain_denoising_loss():
    x0 = jax.random.uniform(jax.random.key(7), SHAPE, minval=-1, maxval=1)
    xhat = jnp.zeros(SHAPE)
    make = lambda p: Denoiser(lambda x, t, c: p * _net(x, t, c), SCHED, "eps")  # noqa: E731
    plain = denoising_loss(make, time_sampler="discrete")(2.0, {"x": x0, "cond": {"image": xhat}},
                                                          jax.random.key(8))
    for form in FORMULATIONS:
        got = refiner_loss(make, form, time_sampler="discrete")(
            2.0, {"x": x0, "xhat": xhat}, jax.random.key(8))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(plain))
    with pytest.raises(ValueError, match="xhat"):
        refiner_loss(make, "form1")(2.0, {"x": x0, "xhat": xhat[:, :2]}, jax.random.key(8))


def test_vae_reconstruction_maps_ranges_and_blocks_gradients():
    x = jax.random.uniform(jax.random.key(9), SHAPE, minval=-1, maxval=1)
    encode = lambda p, x01: (p["w"] * x01, jnp.full(x01.shape, -2.0))  # noqa: E731
    decode = lambda p, z: jax.nn.sigmoid(p["v"] * z)  # noqa: E731
    params = {"w": jnp.asarray(1.5), "v": jnp.asarray(2.0)}
    mean_rec = vae_reconstruction(encode, decode, params, x)
    chex.assert_trees_all_close(mean_rec, 2 * jax.nn.sigmoid(2.0 * 1.5 * (x + 1) / 2) - 1)
    sampled = vae_reconstruction(encode, decode, params, x, jax.random.key(0))
    assert float(jnp.max(jnp.abs(sampled - mean_rec))) > 1e-3
    again, z = vae_reconstruction(encode, decode, params, x, jax.random.key(0),
                                  return_latent=True)
    chex.assert_trees_all_close(again, sampled)
    chex.assert_trees_all_close(again, 2 * decode(params, z) - 1)
    # z ~ q(z | x): mean 1.5 (x + 1) / 2, sd exp(-1)
    assert 0.05 < float(jnp.std(z - 1.5 * (x + 1) / 2)) < 0.7
    g = jax.grad(lambda p: jnp.sum(vae_reconstruction(encode, decode, p, x, jax.random.key(0))))(
        params)
    assert all(float(v) == 0.0 for v in jax.tree.leaves(g))


def test_corruptions():
    x = jnp.zeros((64, 16, 16, 1)) - 0.2
    key = jax.random.key(10)
    for kind in CORRUPTIONS:
        np.testing.assert_array_equal(np.asarray(corrupt(x, kind, 0.0, key)), np.asarray(x))
    g = corrupt(x, "gaussian", 0.3, key) - x
    assert abs(float(jnp.std(g)) - 0.3) < 0.01 and abs(float(jnp.mean(g))) < 0.01
    sp = corrupt(x, "salt_pepper", 0.25, key)
    hit = np.asarray(sp != x)
    assert abs(hit.mean() - 0.25) < 0.01
    assert set(np.unique(np.asarray(sp)[hit])) == {-1.0, 1.0}
    # blur: a constant image is unchanged, an impulse spreads to the Gaussian's variance
    np.testing.assert_allclose(np.asarray(corrupt(x, "blur", 1.0, key)), np.asarray(x),
                               atol=1e-6)
    imp = jnp.zeros((1, 17, 17, 1)).at[0, 8, 8, 0].set(1.0)
    b = np.asarray(corrupt(imp, "blur", 1.0, key))[0, :, :, 0]
    assert abs(b.sum() - 1.0) < 1e-5
    r2 = ((np.arange(17)[:, None] - 8) ** 2 + (np.arange(17)[None] - 8) ** 2)
    assert abs((b * r2).sum() - 2.0) < 0.05  # E|r|^2 = 2 sigma^2
    with pytest.raises(ValueError, match="kind"):
        corrupt(x, "jpeg", 0.1, key)
    with pytest.raises(ValueError, match="strength"):
        corrupt(x, "gaussian", -0.1, key)
