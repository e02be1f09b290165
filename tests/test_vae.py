"""DiffuseVAE's VAE (nets.vae) and the beta-VAE loss (dpm.losses.vae): the block-string grammar
and the published presets, shapes under jit, and the loss against closed forms (the Gaussian KL,
and the optimum of a linear VAE on Gaussian data: probabilistic PCA)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpm.losses import beta_vae_loss, gaussian_kl
from nets import (
    VAE,
    count_params,
    init_params,
    parse_blocks,
    vae_celeba64,
    vae_celebahq128,
    vae_cifar10,
    vae_digits,
)


def _abstract(cfg):
    return nnx.eval_shape(lambda: VAE(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize(
    "preset, size, z",
    [(vae_cifar10, 32, 512), (vae_celeba64, 64, 512), (vae_celebahq128, 128, 1024)],
)
def test_published_presets_build_with_their_widths_and_latent(preset, size, z):
    cfg = preset()
    assert cfg.image_size == size and cfg.latent_dim == z
    model = _abstract(cfg)
    # widths: the stem maps 3 -> 64 channels; the latent heads are z -> z 1x1 maps
    assert model.stem.kernel.shape == (3, 3, 3, 64)
    assert model.to_mean.kernel.shape == (1, 1, z, z)
    assert model.out.kernel.shape[-2:] == (64, 3)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    mean, logvar = jax.eval_shape(lambda m, x: m.encode(x), model, x)
    assert mean.shape == logvar.shape == (2, 1, 1, z)
    out = jax.eval_shape(lambda m, z: m.decode(z), model, mean)
    assert out.shape == (2, size, size, 3)


def test_cifar_preset_block_counts():
    ops = parse_blocks(vae_cifar10().enc_blocks, start=32, decoder=False)
    per_res = {}
    for o in ops:
        if o.kind in ("res", "down"):
            per_res[o.res] = per_res.get(o.res, 0) + (o.arg if o.kind == "res" else 1)
    assert per_res == {32: 8, 16: 5, 8: 5, 4: 4, 1: 3}
    model = _abstract(vae_cifar10())
    # the 3x3 convolutions become 1x1 at resolution 1
    blocks = [layer for layer in model.enc_ops if hasattr(layer, "c2")]
    assert blocks[-1].c2.kernel.shape[:2] == (1, 1) and blocks[0].c2.kernel.shape[:2] == (3, 3)
    assert blocks[0].c2.kernel.shape[2:] == (32, 32)  # middle width = half of 64


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("enc_blocks", "16x2,16q2", "'16q2'"),
        ("enc_blocks", "16x2,8x2", "'8x2' acts at resolution 8"),
        ("enc_blocks", "16d2,8x1", "16t8 token is missing"),
        ("enc_blocks", "16x2,16u2", "'16u2'"),
        ("dec_blocks", "1x1,1d2", "'1d2'"),
        ("enc_blocks", "16x2,16d3", "not divisible"),
        ("enc_blocks", "16x2,16d2,16t8,8x1", "must end at resolution 1"),
        ("enc_channels", "16:32,8:64,4:64", "no width for resolution"),
        ("enc_channels", "16-32", "res:width"),
        ("dec_channels", "16:32,8:64,4:64,1:16", "latent width differs"),
        ("enc_blocks", "", "non-empty"),
    ],
)
def test_bad_layouts_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        vae_digits(16, **{field: value})


def test_digits_vae_round_trip_shapes_range_and_bad_inputs():
    cfg = vae_digits(16)
    graphdef, params = init_params(VAE, cfg, seed=0)

    @jax.jit
    def run(params, x, key):
        return nnx.merge(graphdef, params)(x, key)

    x = jax.random.uniform(jax.random.key(1), (5, 16, 16, 1))
    x_rec, mean, logvar = run(params, x, jax.random.key(2))
    assert x_rec.shape == x.shape and mean.shape == (5, 1, 1, cfg.latent_dim)
    assert float(x_rec.min()) >= 0.0 and float(x_rec.max()) <= 1.0
    # examples do not interact
    x2 = x.at[0].set(0.0)
    mean_of = jax.jit(lambda params, x: nnx.merge(graphdef, params).encode(x)[0])
    m1, m2 = mean_of(params, x), mean_of(params, x2)
    np.testing.assert_allclose(m1[1:], m2[1:], rtol=1e-5, atol=1e-6)
    assert not np.allclose(m1[0], m2[0])
    assert count_params(params) > 10_000
    model = nnx.merge(graphdef, params)
    with pytest.raises(ValueError, match=r"x must have shape"):
        model.encode(jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"z must have shape"):
        model.decode(jnp.zeros((2, cfg.latent_dim)))


def test_gaussian_kl_matches_monte_carlo():
    mean = jnp.array([[0.5, -1.0, 2.0]])
    logvar = jnp.array([[0.3, -0.7, 0.0]])
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(jax.random.key(0), (400_000, 3))
    log_q = -0.5 * jnp.sum((z - mean) ** 2 / jnp.exp(logvar) + logvar + jnp.log(2 * jnp.pi), 1)
    log_p = -0.5 * jnp.sum(z**2 + jnp.log(2 * jnp.pi), 1)
    mc = float(jnp.mean(log_q - log_p))
    assert float(gaussian_kl(mean, logvar)[0]) == pytest.approx(mc, abs=0.01)
    with pytest.raises(ValueError, match="same shape"):
        gaussian_kl(mean, logvar[:, :2])


def test_linear_vae_reaches_the_probabilistic_pca_optimum():
    # Data x ~ N(0, diag(lam)) in D = 4 dims, latent k = 2. The loss SSE + KL is the negative
    # ELBO of a Gaussian decoder with variance s2 = 1/2, minus D/2 log(pi). A linear VAE can
    # reach the optimum marginal likelihood of PPCA with fixed noise s2: model covariance
    # eigenvalues max(lam_i, s2) on the top k directions and s2 elsewhere.
    lam = np.array([3.0, 1.5, 0.3, 0.2])
    D, k, s2 = 4, 2, 0.5
    c = np.array([max(lam[0], s2), max(lam[1], s2), s2, s2])
    nll = 0.5 * np.sum(np.log(2 * np.pi * c) + lam / c)
    optimum = nll - 0.5 * D * np.log(np.pi)

    def encode(p, x):
        return x @ p["A"], jnp.broadcast_to(p["logvar"], (x.shape[0], k))

    def decode(p, z):
        return z @ p["W"] + p["b"]

    loss = beta_vae_loss(encode, decode, alpha=1.0)
    key = jax.random.key(0)
    params = {"A": 0.1 * jax.random.normal(key, (D, k)), "logvar": jnp.zeros(k),
              "W": 0.1 * jax.random.normal(jax.random.key(1), (k, D)), "b": jnp.zeros(D)}
    opt = optax.adam(optax.cosine_decay_schedule(3e-2, 3000))
    scale = jnp.sqrt(jnp.asarray(lam, jnp.float32))

    def step(carry, key):
        params, state = carry
        kx, kz = jax.random.split(key)
        x = jax.random.normal(kx, (512, D)) * scale
        g = jax.grad(lambda p: jnp.mean(loss(p, {"x": x}, kz)))(params)
        upd, state = opt.update(g, state, params)
        return (optax.apply_updates(params, upd), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                  jax.random.split(jax.random.key(2), 3000))
    x = jax.random.normal(jax.random.key(3), (200_000, D)) * scale
    reached = float(jnp.mean(loss(params, {"x": x}, jax.random.key(4))))
    assert reached == pytest.approx(optimum, abs=0.03), (reached, optimum)
    # and no VAE beats the closed form: a worse model (alpha = 1, decoder scaled) is above it
    worse = dict(params, W=params["W"] * 0.7)
    assert float(jnp.mean(loss(worse, {"x": x}, jax.random.key(4)))) > optimum + 0.05


def test_loss_rejects_bad_alpha_and_shape():
    with pytest.raises(ValueError, match="alpha"):
        beta_vae_loss(lambda p, x: (x, x), lambda p, z: z, alpha=-1.0)
    loss = beta_vae_loss(lambda p, x: (x[:, :2], x[:, :2]), lambda p, z: z)
    with pytest.raises(ValueError, match="decode returned shape"):
        loss(None, {"x": jnp.zeros((3, 4))}, jax.random.key(0))
