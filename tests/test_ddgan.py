"""DDGAN / EMDM: the VP discretisation, training pairs, posterior, sampler (against an exact x0
oracle on Gaussian data), R1, geometric losses and the two-network GAN train step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpm
import solvers
from dpm import Denoiser
from dpm.losses import (
    ddgan_d_loss,
    ddgan_g_loss,
    ddgan_pair,
    ddgan_posterior,
    geometric_loss,
    posterior_sample,
    r1_penalty,
)
from dpm.training import gan_optimizers, init_gan_state, make_gan_step
from solvers._common import posterior_coeffs
from tests._fastjit import jit

BETA_MIN, BETA_MAX, EPS = 0.1, 20.0, 1e-3


def _alpha_bar(t):  # DDGAN's var_func_vp: alpha_bar = 1 - var
    log_mean_coeff = -0.25 * t**2 * (BETA_MAX - BETA_MIN) - 0.5 * t * BETA_MIN
    return np.exp(2.0 * log_mean_coeff)


def _mc_close(samples, mean, var, axis=0, z=5.0):
    """Sample mean and variance within ``z`` standard errors of the truth."""
    n = samples.shape[axis]
    m, v = np.mean(samples, axis), np.var(samples, axis)
    np.testing.assert_array_less(np.abs(m - mean), z * np.sqrt(var / n) + 1e-12)
    np.testing.assert_array_less(np.abs(v - var), z * var * np.sqrt(2.0 / n) + 1e-12)


# ---------------------------------------------------------------------------------------------
# Schedule and grid
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 4, 10])
def test_schedule_is_ddgans_discretisation(x64, T):
    sched = dpm.ddgan_schedule(T)
    t = EPS + (1 - EPS) * np.arange(T + 1) / T
    ab = _alpha_bar(t)
    # DDGAN's posterior arrays: betas[1:] = 1 - ab[1:] / ab[:-1], alphas_cumprod = their cumprod
    np.testing.assert_allclose(sched.betas, 1 - ab[1:] / ab[:-1], rtol=1e-12)
    np.testing.assert_allclose(sched.alphas_cumprod, ab[1:] / ab[0], rtol=1e-12)
    # grid point k - 1 at time k / T is DDGAN's index k; index 0 is t = 0 (clean)
    k = np.arange(1, T + 1)
    np.testing.assert_allclose(sched.alpha(k / T) ** 2, ab[1:] / ab[0], rtol=1e-12)
    assert float(sched.alpha(0.0)) == 1.0 and float(sched.sigma(0.0)) == 0.0
    np.testing.assert_allclose(sched.c_noise(k / T), k - 1, atol=1e-9)  # DDGAN's integer t
    ts = solvers.ddgan_grid(sched)
    np.testing.assert_allclose(ts, np.arange(T, -1, -1) / T)
    np.testing.assert_allclose(ts, solvers.grids.trailing(T, sched))


def test_schedule_bad_arguments():
    for bad in (1, 0, 2.0, True):
        with pytest.raises(ValueError, match="num_steps"):
            dpm.ddgan_schedule(bad)
    with pytest.raises(ValueError, match="beta_min"):
        dpm.ddgan_schedule(4, beta_min=20.0, beta_max=0.1)
    with pytest.raises(ValueError, match="eps"):
        dpm.ddgan_schedule(4, eps=1.0)
    with pytest.raises(TypeError, match="DiscreteVP"):
        solvers.ddgan_grid(dpm.LinearVP())


# ---------------------------------------------------------------------------------------------
# Training pairs and the posterior
# ---------------------------------------------------------------------------------------------


_pair = jit(ddgan_pair)


@pytest.mark.parametrize("k", [0, 2, 3])
def test_pair_marginals_and_conditional(x64, k):
    T, n = 4, 20_000
    sched = dpm.ddgan_schedule(T)
    x0 = jnp.broadcast_to(jnp.array([1.0, -2.0]), (n, 2))
    pair = _pair(sched, x0, jax.random.key(k), jnp.full((n,), k))
    ab = np.concatenate([[1.0], np.asarray(sched.alphas_cumprod)])  # DDGAN's index 0..T
    x_t, x_tp1 = np.asarray(pair.x_t), np.asarray(pair.x_tp1)
    np.testing.assert_allclose(pair.t, (k + 1) / T)
    if k == 0:
        np.testing.assert_array_equal(x_t, x0)  # x_0 itself
    else:
        _mc_close(x_t, np.sqrt(ab[k]) * x0[0], 1 - ab[k])
    _mc_close(x_tp1, np.sqrt(ab[k + 1]) * x0[0], 1 - ab[k + 1])  # q(x_{t+1} | x0)
    beta = float(sched.betas[k])
    r = x_tp1 - np.sqrt(1 - beta) * x_t  # the forward step's noise: N(0, beta), independent
    _mc_close(r, 0.0, beta)
    corr = np.mean((r - r.mean(0)) * (x_t - x_t.mean(0)), 0) / np.sqrt(r.var(0) * x_t.var(0)
                                                                      + 1e-300)
    assert np.all(np.abs(corr) < 5 / np.sqrt(n))


def test_pair_draws_uniform_steps():
    sched = dpm.ddgan_schedule(4)
    pair = jit(lambda x, k: ddgan_pair(sched, x, k))(jnp.ones((4000, 1)), jax.random.key(0))
    index = np.round(np.asarray(pair.t) * 4).astype(int) - 1  # DDGAN's integer t
    np.testing.assert_allclose(pair.t, (index + 1) / 4, rtol=1e-6)  # grid times only
    counts = np.bincount(index, minlength=4)
    assert counts.shape == (4,) and np.all(np.abs(counts - 1000) < 5 * np.sqrt(1000 * 0.75))
    np.testing.assert_allclose(sched.c_noise(pair.t), index, atol=1e-4)


def test_posterior_is_the_gaussian_conditional(x64):
    T = 4
    sched = dpm.ddgan_schedule(T)
    coef1, coef2, var = map(np.asarray, ddgan_posterior(sched))
    ab = np.concatenate([[1.0], np.asarray(sched.alphas_cumprod)])
    for k in range(T):  # x_k = a x0 + s e, x_{k+1} = c x_k + d e'; condition on x_{k+1}
        a, s2 = np.sqrt(ab[k]), 1 - ab[k]
        c, d2 = np.sqrt(1 - sched.betas[k]), sched.betas[k]
        V = c**2 * s2 + d2
        gain = c * s2 / V
        np.testing.assert_allclose(coef2[k], gain, rtol=1e-10)
        np.testing.assert_allclose(coef1[k], a * (1 - gain * c), rtol=1e-10)
        np.testing.assert_allclose(var[k], s2 - c**2 * s2**2 / V, rtol=1e-10, atol=1e-300)
    # the sampler's posterior on the DDGAN grid is the same Gaussian
    ts = np.asarray(solvers.ddgan_grid(sched))
    c_x0, c_x, v = posterior_coeffs(sched, ts[:-1], ts[1:])
    np.testing.assert_allclose(c_x0, coef1[::-1], rtol=1e-10)
    np.testing.assert_allclose(c_x, coef2[::-1], rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(v, var[::-1], rtol=1e-10, atol=1e-300)


def test_posterior_sample_moments(x64):
    T, n = 4, 20_000
    sched = dpm.ddgan_schedule(T)
    coef1, coef2, var = ddgan_posterior(sched)
    x0_hat = jnp.full((n, 1), 0.7)
    x_tp1 = jnp.full((n, 1), -0.4)
    for k in (0, 1, 3):
        t = jnp.full((n,), (k + 1) / T)  # the time of x_tp1
        x = posterior_sample(sched, x0_hat, x_tp1, t, jax.random.key(k))
        mean = float(coef1[k]) * 0.7 - float(coef2[k]) * 0.4
        if k == 0:  # the clean end: no noise
            np.testing.assert_allclose(x, x0_hat, rtol=1e-12)
        else:
            _mc_close(np.asarray(x), mean, float(var[k]))


# ---------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------


MU, S2 = 1.5, 0.25  # data N(MU, S2 I)


def _oracle_generator(sched, noisy: bool):
    """z -> Denoiser predicting a draw of the exact p(x0 | x_t) (or its mean)."""

    def make(z):
        def fn(x, t, cond):
            a, s = sched.alpha(t), sched.sigma(t)
            v = 1.0 / (1.0 / S2 + a**2 / s**2)
            m = v * (MU / S2 + a * x / s**2)
            return m + jnp.sqrt(v) * z if noisy else m

        return Denoiser(fn, sched, "x0")

    return make


@pytest.mark.parametrize("T", [4, 10])
def test_sampler_with_exact_oracle_reproduces_the_data(x64, T):
    sched = dpm.ddgan_schedule(T)
    B, D = 6_000, 2
    a1, s1 = float(sched.alpha(1.0)), float(sched.sigma(1.0))
    x_T = a1 * MU + np.sqrt(a1**2 * S2 + s1**2) * jax.random.normal(jax.random.key(0), (B, D))
    ts = solvers.ddgan_grid(sched)
    run = jit(lambda x, k: solvers.ddgan(_oracle_generator(sched, True), x, ts, key=k,
                                         latent_shape=(D,)))
    x = np.asarray(run(x_T, jax.random.key(1))).reshape(-1)
    _mc_close(x, MU, S2)
    if T != 10:
        return
    # a deterministic x0 (the Gaussian-step assumption) makes the samples far too narrow
    x_det = solvers.ddgan(_oracle_generator(sched, False), x_T, ts, key=jax.random.key(1),
                          latent_shape=D)
    assert np.var(np.asarray(x_det)) < S2 - 30 * S2 * np.sqrt(2.0 / (B * D))


def test_sampler_steps_are_the_posterior(x64):
    T, B = 4, 20_000
    sched = dpm.ddgan_schedule(T)
    coef1, coef2, var = map(np.asarray, ddgan_posterior(sched))
    gen = lambda z: Denoiser(lambda x, t, c: jnp.tanh(x) + 0.3 * z + t, sched, "x0")
    x_T = jax.random.normal(jax.random.key(0), (B, 1))
    ts = solvers.ddgan_grid(sched)
    x, traj = solvers.ddgan(gen, x_T, ts, key=jax.random.key(3), latent_shape=(1,),
                            return_trajectory=True)
    xs, x0s, zs = map(np.asarray, (traj["x"], traj["x0"], traj["z"]))
    assert xs.shape == (T + 1, B, 1) and x0s.shape == zs.shape == (T, B, 1)
    assert int(traj["nfe"]) == T
    np.testing.assert_array_equal(xs[-1], x)
    for i in range(T):
        k = T - 1 - i  # DDGAN's integer t of this step
        np.testing.assert_allclose(x0s[i], np.tanh(xs[i]) + 0.3 * zs[i] + ts[i], atol=1e-13)
        _mc_close(zs[i], 0.0, 1.0)
        r = xs[i + 1] - coef1[k] * x0s[i] - coef2[k] * xs[i]
        if k == 0:
            np.testing.assert_allclose(r, 0.0, atol=1e-12)  # no noise on the last step
        else:
            _mc_close(r, 0.0, var[k])


def test_sampler_cfg_with_the_same_z():
    """CFG doubles the batch; z rides in the condition (the same z in both halves)."""
    sched = dpm.ddgan_schedule(4)
    ts = solvers.ddgan_grid(sched)
    fn = lambda x, t, c: 0.5 * x + c["y"] + c["z"]

    def make(z, y=1.0):
        return Denoiser(fn, sched, "x0", cond={"y": jnp.full((3, 2), y), "z": z})

    null = lambda z: {"y": jnp.zeros((3, 2)), "z": z}
    guided = lambda z: dpm.classifier_free_guidance(make(z), 2.0, null(z))
    x_T = jax.random.normal(jax.random.key(0), (3, 2))
    f = jit(lambda g, x, k: solvers.ddgan(g, x, ts, key=k, latent_shape=(2,)),
            static_argnums=0)
    # out_u + 2 (out_c - out_u) = 0.5 x + z + 2: the conditional model with y = 2, same z
    np.testing.assert_allclose(f(guided, x_T, jax.random.key(1)),
                               f(lambda z: make(z, 2.0), x_T, jax.random.key(1)),
                               rtol=1e-5, atol=1e-6)
    assert f(make, x_T, jax.random.key(2)).dtype == x_T.dtype


def test_sampler_errors():
    sched = dpm.ddgan_schedule(4)
    gen = lambda z: Denoiser(lambda x, t, c: x, sched, "x0")
    x = jnp.zeros((2, 3))
    ts = solvers.ddgan_grid(sched)
    with pytest.raises(ValueError, match="PRNG key"):
        solvers.ddgan(gen, x, ts, latent_shape=(3,))
    with pytest.raises(ValueError, match="decreasing"):
        solvers.ddgan(gen, x, ts[::-1], key=jax.random.key(0), latent_shape=(3,))
    for bad in ((0,), (3, -1), "3", 2.0, None):
        with pytest.raises(ValueError, match="latent_shape"):
            solvers.ddgan(gen, x, ts, key=jax.random.key(0), latent_shape=bad)
    with pytest.raises(TypeError, match="Denoiser"):
        solvers.ddgan(lambda z: z, x, ts, key=jax.random.key(0), latent_shape=(3,))
    with pytest.raises(TypeError, match="floating"):
        solvers.ddgan(gen, jnp.zeros((2, 3), jnp.int32), ts, key=jax.random.key(0),
                      latent_shape=(3,))


def test_ddpm_unchanged_by_the_move(x64):
    # ddpm's posterior (now solvers._common.posterior_coeffs): DDPM's beta-tilde form
    sched = dpm.DiscreteVP.from_name("linear", 1000)
    ab = np.asarray(sched.alphas_cumprod)
    i = np.array([999, 500, 10])
    s, t = (i + 1) / 1000, i / 1000
    c_x0, c_x, var = posterior_coeffs(sched, s, t, "fixed_small")
    beta = 1 - ab[i] / ab[i - 1]
    np.testing.assert_allclose(c_x0, beta * np.sqrt(ab[i - 1]) / (1 - ab[i]), rtol=1e-9)
    np.testing.assert_allclose(c_x, np.sqrt(1 - beta) * (1 - ab[i - 1]) / (1 - ab[i]), rtol=1e-9)
    np.testing.assert_allclose(var, beta * (1 - ab[i - 1]) / (1 - ab[i]), rtol=1e-9)
    _, _, var_large = posterior_coeffs(sched, s, t, "fixed_large")
    np.testing.assert_allclose(var_large, beta, rtol=1e-9)


# ---------------------------------------------------------------------------------------------
# R1 and the GAN losses
# ---------------------------------------------------------------------------------------------


def _d_fn(x):
    W = jnp.arange(12.0).reshape(4, 3) / 10 - 0.5
    return jnp.sum(jnp.tanh(x @ W), axis=1) + 0.3 * jnp.sum(x**3, axis=1)


def test_r1_penalty_against_finite_differences(x64):
    x = jax.random.normal(jax.random.key(0), (3, 4))
    gamma, h = 0.3, 1e-5
    e = h * np.eye(4)[:, None, :]  # (4, 1, 4): one coordinate per row, all examples
    d = jit(jax.vmap(_d_fn))
    grad = ((d(x[None] + e) - d(x[None] - e)) / (2 * h)).T  # (3, 4) central differences
    np.testing.assert_allclose(jit(functools.partial(r1_penalty, _d_fn, gamma=gamma))(x),
                               0.5 * gamma * np.sum(grad**2, 1), rtol=1e-8)


# Tiny networks: G(g, x_tp1, t, z, cond, mask) and D(d, x_t, x_tp1, t, cond, mask).
F, C = 5, 3  # frames, features


def _G(g, x_tp1, t, z, cond, mask):
    return jnp.tanh(x_tp1 * g["a"] + g["b"] * z[:, None, :] + g["c"] * t[:, None, None])


def _D(d, x_t, x_tp1, t, cond, mask):
    h = jnp.tanh(x_t.reshape(x_t.shape[0], -1) @ d["w"] + x_tp1.reshape(x_t.shape[0], -1)
                 @ d["u"] + d["v"] * t[:, None])
    return h @ d["o"]


def _params(key):
    k = jax.random.split(key, 6)
    g = {"a": 1.0 + 0.1 * jax.random.normal(k[0], (C,)), "b": 0.3 * jnp.ones((C,)),
         "c": jnp.float32(0.1)}
    d = {"w": 0.3 * jax.random.normal(k[1], (F * C, 4)), "u": 0.3 * jax.random.normal(
        k[2], (F * C, 4)), "v": 0.1 * jnp.ones((4,)), "o": jax.random.normal(k[3], (4,))}
    return g, d


def _batch(key, B=8):
    x = jax.random.normal(key, (B, F, C))
    lengths = jnp.array([5, 3, 4, 5, 2, 5, 1, 4])[:B]
    return {"x": x, "mask": jnp.arange(F)[None] < lengths[:, None]}


SCHED = dpm.ddgan_schedule(4)


def test_r1_steps_differ_only_by_the_r1_gradient():
    """With SGD on D and a D linear in x_t (grad_x D = w), the two compiled D steps differ by
    exactly lr * grad_w (gamma / 2 ||w||^2) = lr * gamma * w."""
    lr, gamma = 0.1, 0.5
    D = lambda d, x_t, x_tp1, t, c, m: (jnp.sum(d["w"] * x_t, (1, 2)) + jnp.sum(
        jnp.tanh(d["u"] * x_tp1), (1, 2)) + d["v"] * t)
    d_params = {"w": jax.random.normal(jax.random.key(1), (F, C)),
                "u": jnp.ones((F, C)), "v": jnp.float32(0.2)}
    g_params, _ = _params(jax.random.key(0))
    d_loss = ddgan_d_loss(_G, D, SCHED, latent_shape=(C,), r1_gamma=gamma)
    g_loss = ddgan_g_loss(_G, D, SCHED, latent_shape=(C,), adv_weight=0)
    g_opt, _ = gan_optimizers(1e-3, 1e-3)
    d_opt = optax.sgd(lr)
    state = init_gan_state(g_params, d_params, g_opt, d_opt, jax.random.key(2))
    batch = _batch(jax.random.key(3))
    out = {}
    for r1 in (False, True):
        step = jit(make_gan_step(d_loss, g_loss, d_opt, g_opt, ema_decay=0.9, r1=r1))
        out[r1] = step(state, batch)
    d0, d1 = out[False][0].params["d"], out[True][0].params["d"]
    np.testing.assert_allclose(d0["w"] - d1["w"], lr * gamma * d_params["w"], rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(d0["u"], d1["u"], rtol=1e-6)
    np.testing.assert_allclose(d0["v"], d1["v"], rtol=1e-6)
    np.testing.assert_allclose(out[True][1]["r1"], 0.5 * gamma * np.sum(
        np.square(d_params["w"])), rtol=1e-5)
    assert float(out[False][1]["r1"]) == 0.0


def test_loss_gradients_reach_only_their_network():
    g, d = _params(jax.random.key(0))
    batch = _batch(jax.random.key(1))
    d_loss = ddgan_d_loss(_G, _D, SCHED, latent_shape=(C,))
    g_loss = ddgan_g_loss(_G, _D, SCHED, latent_shape=(C,), adv_weight=0.5)
    key = jax.random.key(2)
    dg = jit(jax.grad(lambda g: jnp.mean(d_loss(d, g, batch, key, r1=True).loss)))(g)
    gd = jit(jax.grad(lambda d: jnp.mean(g_loss(g, d, batch, key).loss)))(d)
    assert all(float(jnp.max(jnp.abs(v))) == 0.0 for v in jax.tree.leaves((dg, gd)))
    terms = jit(g_loss)(g, d, batch, key)
    np.testing.assert_allclose(terms.loss, terms.g_geo + 0.5 * terms.g_adv, rtol=1e-6)
    np.testing.assert_allclose(terms.g_geo, 100.0 * terms.rec, rtol=1e-6)
    dt = jit(functools.partial(d_loss, r1=False))(d, g, batch, key)
    np.testing.assert_allclose(dt.loss, dt.d_real + dt.d_fake, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Geometric losses
# ---------------------------------------------------------------------------------------------

J = 4
_M = np.asarray(jax.random.normal(jax.random.key(7), (C, J * 3)))


def _joints(x):  # a differentiable features -> joints map (B, F, J, 3)
    return (x @ jnp.asarray(_M, x.dtype)).reshape(*x.shape[:2], J, 3)


def _np_terms(xh, x, mask, feet, thr):
    m = mask.astype(float)
    mp = m[:, 1:] * m[:, :-1]
    mean = lambda e, w: (e.reshape(*e.shape[:2], -1).sum(-1) * w).sum(1) / (
        np.maximum(w.sum(1), 1) * e[0, 0].size)
    d = lambda a: a[:, 1:] - a[:, :-1]
    P_h = (xh @ _M).reshape(*xh.shape[:2], J, 3)
    P = (x @ _M).reshape(*x.shape[:2], J, 3)
    contact = np.linalg.norm(d(P)[:, :, feet], axis=-1, keepdims=True) <= thr
    return dict(rec=mean((xh - x) ** 2, m), vel=mean((d(xh) - d(x)) ** 2, mp),
                pos=mean((P_h - P) ** 2, m), vel_xyz=mean((d(P_h) - d(P)) ** 2, mp),
                foot=mean((d(P_h)[:, :, feet] * contact) ** 2, mp))


def test_geometric_terms_against_numpy_and_masks(x64):
    batch = _batch(jax.random.key(0))
    x, mask = np.array(batch["x"]), np.asarray(batch["mask"])
    x[:, 2:4] = x[:, 1:2]  # still frames: the feet are in contact on pairs (1,2), (2,3), (3,4)
    xh = x + 0.3 * np.asarray(jax.random.normal(jax.random.key(1), x.shape))
    feet, thr = (0, 2), 0.01
    w = dict(rec_weight=2.0, vel_weight=3.0, pos_weight=0.5, joint_vel_weight=0.25,
             foot_weight=4.0)
    f = jit(functools.partial(geometric_loss, joints_fn=_joints, feet=feet,
                              foot_threshold=thr, **w))
    terms = f(jnp.asarray(xh), jnp.asarray(x), jnp.asarray(mask))
    ref = _np_terms(xh, x, mask, list(feet), thr)
    for name, v in ref.items():
        np.testing.assert_allclose(getattr(terms, name), v, rtol=1e-10, atol=1e-14)
    assert np.all(ref["foot"][mask[:, 2]] > 0)  # the contact frames do count
    total = sum(w[k] * ref[n] for k, n in (("rec_weight", "rec"), ("vel_weight", "vel"),
                                           ("pos_weight", "pos"),
                                           ("joint_vel_weight", "vel_xyz"),
                                           ("foot_weight", "foot")))
    np.testing.assert_allclose(terms.loss, total, rtol=1e-10)
    # padded frames change no term
    junk = np.asarray(jax.random.normal(jax.random.key(2), x.shape)) * 10
    pad = ~mask[..., None]
    terms2 = f(jnp.asarray(np.where(pad, junk, xh)), jnp.asarray(np.where(pad, -junk, x)),
               jnp.asarray(mask))
    for a, b in zip(jax.tree.leaves(terms), jax.tree.leaves(terms2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # the foot term sees the prediction only on contact pairs: moving frame 0 of the
    # prediction (pair (0, 1) is not a contact pair) leaves it unchanged
    moving = x[:, 0] - x[:, 1]
    assert np.all(np.linalg.norm((moving @ _M).reshape(-1, J, 3)[:, list(feet)], axis=-1) > thr)
    xh3 = xh.copy()
    xh3[:, 0] += 5.0
    terms3 = f(jnp.asarray(xh3), jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(terms3.foot, terms.foot, rtol=1e-12)
    assert not np.allclose(terms3.vel_xyz, terms.vel_xyz)


def test_geometric_vel_features_and_errors(x64):
    batch = _batch(jax.random.key(0))
    x, mask = batch["x"], batch["mask"]
    xh = x + 0.1
    xh = xh.at[..., -1].add(jnp.arange(F)[None, :] * 1.0)  # velocity error in the last feature
    sel = jnp.array([1.0, 1.0, 0.0])
    t_all = geometric_loss(xh, x, mask, vel_weight=1.0)
    t_sel = geometric_loss(xh, x, mask, vel_weight=1.0, vel_features=sel)
    np.testing.assert_allclose(t_sel.vel, 0.0, atol=1e-12)
    assert np.all(np.asarray(t_all.vel)[np.asarray(mask[:, 1])] > 0.1)
    with pytest.raises(ValueError, match="joints_fn"):
        geometric_loss(xh, x, mask, pos_weight=1.0)
    with pytest.raises(ValueError, match="feet"):
        geometric_loss(xh, x, mask, joints_fn=_joints, foot_weight=1.0)
    with pytest.raises(ValueError, match="mask"):
        geometric_loss(xh, x, mask[:, :3])
    with pytest.raises(ValueError, match="shape of x0"):
        geometric_loss(xh[:, :3], x, mask)
    with pytest.raises(ValueError, match="joints_fn"):
        geometric_loss(xh, x, mask, joints_fn=lambda a: a)


# ---------------------------------------------------------------------------------------------
# The GAN train step
# ---------------------------------------------------------------------------------------------


def _gan_setup(adv_weight=1.0, r1=True):
    g, d = _params(jax.random.key(0))
    d_loss = ddgan_d_loss(_G, _D, SCHED, latent_shape=(C,))
    g_loss = ddgan_g_loss(_G, _D, SCHED, latent_shape=(C,), adv_weight=adv_weight,
                          joints_fn=_joints, vel_weight=1.0, pos_weight=1.0)
    g_opt, d_opt = gan_optimizers(1e-2, 1e-2)
    step = jit(make_gan_step(d_loss, g_loss, d_opt, g_opt, ema_decay=0.5, r1=r1))
    state = init_gan_state(g, d, g_opt, d_opt, jax.random.key(1))
    return step, state


def _tree_equal(a, b):
    data = lambda u: jax.random.key_data(u) if jax.dtypes.issubdtype(u.dtype,
                                                                      jax.dtypes.prng_key) else u
    return all(np.array_equal(data(u), data(v))
               for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_gan_step_updates_both_networks_and_is_deterministic():
    step, state = _gan_setup()
    batch = _batch(jax.random.key(3))
    new, metrics = step(state, batch)
    assert int(new.step) == 1 and int(new.skipped) == 0
    assert not _tree_equal(new.params["g"], state.params["g"])
    assert not _tree_equal(new.params["d"], state.params["d"])
    assert not _tree_equal(new.ema_params, state.ema_params)
    ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * p, state.ema_params, new.params["g"])
    for a, b in zip(jax.tree.leaves(new.ema_params), jax.tree.leaves(ema), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    for k in ("loss", "d_loss", "g_adv", "r1", "d_real", "d_fake", "rec", "skipped",
              "g_grad_norm", "d_grad_norm"):
        assert k in metrics and np.isfinite(metrics[k])
    assert float(metrics["r1"]) > 0
    again, metrics2 = step(state, batch)
    assert _tree_equal(again, new) and _tree_equal(metrics, metrics2)
    other, _ = step(state.replace(key=jax.random.key(9)), batch)
    assert not _tree_equal(other.params["g"], new.params["g"])
    # non-finite data: the update is skipped, the step still counts
    bad = dict(batch, x=batch["x"].at[0, 0, 0].set(jnp.nan))
    kept, m = step(state, bad)
    assert int(kept.skipped) == 1 and int(kept.step) == 1
    assert _tree_equal(kept.params, state.params) and _tree_equal(kept.ema_params,
                                                                  state.ema_params)


def test_gan_step_without_adversarial_term_ignores_d():
    step, state = _gan_setup(adv_weight=0.0, r1=False)
    batch = _batch(jax.random.key(3))
    other_d = jax.tree.map(lambda p: 3.0 * p + 1.0, state.params["d"])
    a, ma = step(state, batch)
    b, _ = step(state.replace(params={"g": state.params["g"], "d": other_d}), batch)
    assert _tree_equal(a.params["g"], b.params["g"])
    assert float(ma["g_adv"]) == 0.0
    # so the noGAN generator loss is a plain make_train_step loss (D never evaluated)
    g_loss = ddgan_g_loss(_G, None, SCHED, latent_shape=(C,), adv_weight=0)
    loss = jit(lambda g, b, k: g_loss(g, None, b, k).loss)(state.params["g"], batch,
                                                            jax.random.key(0))
    assert loss.shape == (8,)


def test_loss_and_step_errors():
    g, d = _params(jax.random.key(0))
    with pytest.raises(TypeError, match="unknown geometric options"):
        ddgan_g_loss(_G, _D, SCHED, latent_shape=(C,), rec_wieght=1.0)
    with pytest.raises(ValueError, match="latent_shape"):
        ddgan_d_loss(_G, _D, SCHED, latent_shape=(0,))
    with pytest.raises(TypeError, match="DiscreteVP"):
        ddgan_d_loss(_G, _D, dpm.LinearVP(), latent_shape=(C,))
    with pytest.raises(ValueError, match="adv_weight"):
        ddgan_g_loss(_G, _D, SCHED, latent_shape=(C,), adv_weight=-1.0)
    d_loss = ddgan_d_loss(_G, _D, SCHED, latent_shape=(C,))
    with pytest.raises(ValueError, match="batch"):
        d_loss(d, g, {"y": jnp.zeros((2, F, C))}, jax.random.key(0))
    with pytest.raises(ValueError, match="PRNG key"):
        d_loss(d, g, _batch(jax.random.key(0)), None)
    with pytest.raises(TypeError, match="r1"):
        make_gan_step(d_loss, d_loss, optax.sgd(1.0), optax.sgd(1.0), r1=1)
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="index"):
        ddgan_pair(SCHED, x, jax.random.key(0), jnp.array([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="index"):
        ddgan_pair(SCHED, x, jax.random.key(0), jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="PRNG key"):
        ddgan_pair(SCHED, x, None)
    with pytest.raises(ValueError, match="shape of x_tp1"):
        posterior_sample(SCHED, jnp.zeros((4, 3)), x, jnp.ones((4,)), jax.random.key(0))
    for bad_t in (jnp.zeros((4,)), jnp.full((4,), 0.6), jnp.ones((3,))):  # T = 4: 0.25, ..., 1
        with pytest.raises(ValueError, match="t must"):
            posterior_sample(SCHED, x, x, bad_t, jax.random.key(0))
    with pytest.raises(ValueError, match="gan_optimizers|lr_g"):
        gan_optimizers(-1.0, 1e-4)
