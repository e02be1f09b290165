"""LDM's KL autoencoder (nets.autoencoder) and its loss (dpm.losses.autoencoder): shapes under
jit, the published presets (Stable Diffusion's VAE has 83,653,863 parameters, taming's patch
discriminator 2,765,633), errors naming the argument, the latent scale factor against closed
forms, sharded == single-device, training on the digits, the multi-scale L1 against closed
forms, and the GAN's stop-gradient identity (one loss == two separate losses' gradients)."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fastjit import jit
from flax import nnx

from dpm.data import load_digits
from dpm.losses import gaussian_kl, kl_autoencoder_loss, kl_autoencoder_terms, measure_scale_factor
from dpm.training import (
    init_train_state,
    jit_train_step,
    make_mesh,
    make_train_step,
    replicate,
    shard_batch,
)
from nets import (
    AutoencoderConfig,
    AutoencoderKL,
    PatchDiscriminator,
    PatchDiscriminatorConfig,
    autoencoder_digits,
    count_params,
    frozen_encoder_decoder,
    init_params,
    kl_f4,
    kl_f8,
    latent_codec,
)

FAST = jit.keywords["compiler_options"]
TINY = dict(base_channels=16)  # the digits preset at half width: compiles and runs fast
DISC = PatchDiscriminatorConfig(in_channels=1, base_channels=8, n_layers=1)


def _tiny(factor=4):
    cfg = autoencoder_digits(factor, **TINY)
    return cfg, *init_params(AutoencoderKL, cfg, seed=0)


@functools.lru_cache(maxsize=1)
def _all_digits():
    return load_digits(16)["x"]


def _digits(n=32):
    """The first ``n`` digits, (n, 16, 16, 1) in [-1, 1]."""
    return _all_digits()[:n]


def _np(tree):
    """The tree on the host, as numpy: checks below then compile nothing op by op."""
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(v, dtype=np.float64))
                             for v in jax.tree.leaves(_np(tree)))))


def _diff(a, b):
    return jax.tree.map(np.subtract, _np(a), _np(b))


# ------------------------------------------------------------------------------------------
# the network
# ------------------------------------------------------------------------------------------


def _run_all(graphdef):
    """One jitted program: encode, decode, the round trip at the mode (key None)."""

    @chex.assert_max_traces(n=1)
    def run(params, x):
        model = nnx.merge(graphdef, params)
        mean, logvar = model.encode(x)
        return mean, logvar, model.decode(mean), model(x, None)

    return run


def test_shapes_under_jit_f4():
    chex.clear_trace_counter()
    cfg, graphdef, params = _tiny(4)
    assert cfg.factor == 4
    run = jit(_run_all(graphdef))
    x = _digits(6)
    mean, logvar, x_rec, (rec_mode, m2, _) = run(params, x)
    run(params, x + 0.1)  # no retrace
    chex.assert_shape([mean, logvar], (6, 4, 4, 4))
    chex.assert_shape([x_rec, rec_mode], (6, 16, 16, 1))
    chex.assert_type([mean, logvar, x_rec], jnp.float32)
    mean, logvar, x_rec, rec_mode, m2 = _np((mean, logvar, x_rec, rec_mode, m2))
    chex.assert_tree_all_finite((mean, logvar, x_rec))
    assert np.std(mean) > 1e-3  # not a degenerate (all-zero) output
    # the round trip without a key decodes the mean (with one: see the sharded test)
    chex.assert_trees_all_close(rec_mode, x_rec, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(m2, mean, rtol=1e-4, atol=1e-5)


def test_shapes_under_jit_f8():
    # traced under jit on the abstract model (nothing allocated, nothing compiled)
    chex.clear_trace_counter()
    cfg = autoencoder_digits(8, **TINY)
    assert cfg.factor == 8 and cfg.channel_mult == (1, 2, 2, 2)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param)
    x = jax.ShapeDtypeStruct((3, 32, 16, 1), jnp.float32)
    mean, logvar, x_rec, (rec_mode, _, _) = jax.eval_shape(jax.jit(_run_all(graphdef)), params, x)
    chex.assert_shape([mean, logvar], (3, 4, 2, 4))
    chex.assert_shape([x_rec, rec_mode], (3, 32, 16, 1))


def test_dropout_only_with_a_dropout_key():
    cfg, graphdef, params = _tiny(4)
    # the same parameters under a config with dropout (the rate is static, not a parameter)
    drop_cfg = autoencoder_digits(4, dropout=0.5, **TINY)
    drop_graphdef = nnx.graphdef(nnx.eval_shape(lambda: AutoencoderKL(drop_cfg,
                                                                      rngs=nnx.Rngs(0))))

    @jit
    def means(params, x, key):
        plain, drop = nnx.merge(graphdef, params), nnx.merge(drop_graphdef, params)
        return (plain.encode(x, dropout_key=key)[0], drop.encode(x)[0],
                drop.encode(x, dropout_key=key)[0])

    m_key, d_none, d_key = _np(means(params, _digits(4), jax.random.key(1)))
    # rate 0: the key changes nothing; no key: no dropout; a key and a rate: dropout
    np.testing.assert_allclose(d_none, m_key, rtol=1e-5, atol=1e-6)
    assert not np.allclose(d_key, d_none, rtol=1e-3, atol=1e-3)


def test_logvar_is_clipped_to_ldm_range():
    cfg, graphdef, params = _tiny(4)
    # scale the quant conv so that the raw log-variances are huge in both directions
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 1e6 if "quant_conv" in jax.tree_util.keystr(p)
        and "post" not in jax.tree_util.keystr(p) else v, params)
    _, logvar = jit(lambda p, x: nnx.merge(graphdef, p).encode(x))(params, _digits(4))
    assert float(logvar.min()) == -30.0 and float(logvar.max()) == 20.0


def test_kl_f8_is_stable_diffusions_vae():
    cfg = kl_f8()
    assert cfg.factor == 8 and cfg.widths == (128, 256, 512, 512)
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    # Stable Diffusion's AutoencoderKL (CompVis kl-f8, diffusers "vae"): 83,653,863 parameters
    assert count_params(model) == 83_653_863  # exactly: the same layers, the same widths
    assert model.encoder.conv_in.kernel.shape == (3, 3, 3, 128)
    assert model.encoder.conv_out.kernel.shape == (3, 3, 512, 8)
    assert model.quant_conv.kernel.shape == (1, 1, 8, 8)
    assert model.post_quant_conv.kernel.shape == (1, 1, 4, 4)
    assert model.decoder.conv_in.kernel.shape == (3, 3, 4, 512)
    assert model.decoder.conv_out.kernel.shape == (3, 3, 128, 3)
    assert [len(level.blocks) for level in model.decoder.levels] == [3, 3, 3, 3]
    assert model.encoder.mid.attn_1 is not None
    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    mean, logvar = jax.eval_shape(lambda m, x: m.encode(x), model, x)
    assert mean.shape == logvar.shape == (1, 32, 32, 4)
    out = jax.eval_shape(lambda m, z: m.decode(z), model, mean)
    assert out.shape == (1, 256, 256, 3)


def test_kl_f4_and_the_patch_discriminator_published_layouts():
    model = nnx.eval_shape(lambda: AutoencoderKL(kl_f4(), rngs=nnx.Rngs(0)))
    assert model.config.factor == 4
    assert model.quant_conv.kernel.shape == (1, 1, 6, 6)  # embed_dim = z_channels = 3
    assert [lv.resample is None for lv in model.encoder.levels] == [False, False, True]
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    mean, _ = jax.eval_shape(lambda m, x: m.encode(x), model, x)
    assert mean.shape == (2, 64, 64, 3)
    # taming's NLayerDiscriminator(3, ndf=64, n_layers=3): 2,765,633 trainable parameters (the
    # affine GroupNorm has as many as the BatchNorm it replaces); the 70x70 PatchGAN maps a
    # 256x256 image to 30x30 logits
    disc = nnx.eval_shape(lambda: PatchDiscriminator(PatchDiscriminatorConfig(),
                                                     rngs=nnx.Rngs(0)))
    assert count_params(disc) == 2_765_633
    logits = jax.eval_shape(lambda d, x: d(x), disc, x)
    assert logits.shape == (2, 30, 30, 1)
    assert [c.kernel.shape[-1] for c in disc.convs] == [128, 256, 512]


@pytest.mark.parametrize(
    "field, value",
    [
        ("in_channels", 0),
        ("base_channels", 2.5),
        ("channel_mult", ()),
        ("channel_mult", (1, 0)),
        ("num_res_blocks", 0),
        ("latent_channels", -1),
        ("attn_in_middle", 1),
        ("dropout", 1.0),
        ("dtype", jnp.int32),
    ],
)
def test_bad_configs_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field} must .*got {re.escape(repr(value))}"):
        AutoencoderConfig(**{field: value})


def test_bad_presets_and_discriminator_configs():
    with pytest.raises(ValueError, match="factor must be a power of two.*got 6"):
        autoencoder_digits(6)
    with pytest.raises(ValueError, match="n_layers must be an int >= 1; got 0"):
        PatchDiscriminatorConfig(n_layers=0)
    with pytest.raises(TypeError, match="AutoencoderConfig"):
        AutoencoderKL(PatchDiscriminatorConfig(), rngs=nnx.Rngs(0))


def test_bad_inputs_name_the_argument():
    cfg, graphdef, params = _tiny(4)
    model = nnx.merge(graphdef, params)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H, W, in_channels=1\); got "
                                         r"\(2, 16, 16, 3\)"):
        model.encode(jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"x: image size \(18, 16\) must be divisible by .*f = 4"):
        model.encode(jnp.zeros((2, 18, 16, 1)))
    with pytest.raises(ValueError, match=r"z must have shape .*latent_channels=4.*\(2, 4, 4\)"):
        model.decode(jnp.zeros((2, 4, 4)))
    disc = nnx.eval_shape(lambda: PatchDiscriminator(DISC, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"image size \(4, 4\) is too small for n_layers=1"):
        disc(jnp.zeros((1, 4, 4, 1)))


# ------------------------------------------------------------------------------------------
# the latent scale factor and the frozen codec
# ------------------------------------------------------------------------------------------


def test_scale_factor_against_closed_forms():
    # z = a x + b per pixel, x ~ N(0, 1) i.i.d.: std(z) = |a| (pooled about the common mean b)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3001, 4, 4, 2)).astype(np.float32)
    a, b, s = 2.5, 7.0, 0.4

    def encode(x):
        return a * x + b, np.full(x.shape, 2 * np.log(s), np.float32)

    got = measure_scale_factor(encode, x, batch_size=1024)  # an uneven last batch
    assert got == pytest.approx(1 / a, rel=0.01)
    # ... and exactly the pooled float64 std of these latents, however they are batched
    exact = 1 / np.std(np.asarray(encode(x)[0], np.float64))
    assert got == pytest.approx(exact, rel=1e-9)
    assert measure_scale_factor(encode, x, batch_size=7) == pytest.approx(exact, rel=1e-9)
    # samples z = a x + b + s eps: std = sqrt(a^2 + s^2)
    sampled = measure_scale_factor(encode, x, batch_size=4096, key=jax.random.key(0))
    assert sampled == pytest.approx(1 / np.sqrt(a**2 + s**2), rel=0.01)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1; got 0"):
        measure_scale_factor(encode, x, batch_size=0)
    with pytest.raises(ValueError, match="variance"):
        measure_scale_factor(lambda x: (np.zeros_like(x), np.zeros_like(x)), x[:3])


def test_scaled_latents_have_unit_std_and_the_codec_is_frozen():
    cfg, graphdef, params = _tiny(4)
    ae_encode = jit(lambda x: nnx.merge(graphdef, params).encode(x))
    x = np.random.default_rng(0).uniform(-1.0, 1.0, (96, 16, 16, 1)).astype(np.float32)
    c = measure_scale_factor(ae_encode, x[:64], batch_size=32)
    encode, decode = frozen_encoder_decoder(graphdef, params, c)
    p_encode, p_decode = latent_codec(graphdef, c)

    @jit
    def run(x):
        z = encode(x)
        # gradients never reach the parameters (through either half) ...
        g_params = jax.grad(lambda p: jnp.sum(p_encode(p, x[:2])) + jnp.sum(p_decode(p, z[:2])))
        # ... but reach the latents (REFace and reward tuning differentiate through decode)
        g_z = jax.grad(lambda z: jnp.sum(decode(z) ** 2))(z[:2])
        x_rec_ae = nnx.merge(graphdef, params).decode(z / c)
        return z, decode(z), x_rec_ae, g_params(params), g_z

    z, x_rec, x_rec_ae, g_params, g_z = _np(run(x[64:]))  # images c was not measured on
    assert float(np.std(z)) == pytest.approx(1.0, rel=0.1)
    chex.assert_trees_all_close(z, c * _np(ae_encode(x[64:])[0]), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(x_rec, x_rec_ae, rtol=1e-4, atol=1e-5)
    assert all(np.abs(g).max() == 0.0 for g in jax.tree.leaves(g_params))
    assert np.abs(g_z).max() > 0.0
    with pytest.raises(ValueError, match="scale_factor must be > 0"):
        latent_codec(graphdef, 0.0)


# ------------------------------------------------------------------------------------------
# data parallel
# ------------------------------------------------------------------------------------------


def test_sharded_encode_decode_matches_one_device():
    cfg, graphdef, params = _tiny(4)
    mesh = make_mesh()
    assert mesh.size == 8

    def round_trip(params, batch, key):
        # through a posterior sample z = mean + exp(logvar / 2) eps
        return nnx.merge(graphdef, params)(batch["x"], key)

    f = jit(round_trip)
    batch, key = {"x": _digits(16)}, jax.random.key(1)
    single = f(params, {"x": jnp.asarray(batch["x"])}, key)
    sharded_batch = shard_batch(batch, mesh)
    assert len(sharded_batch["x"].sharding.device_set) == 8
    sharded = f(replicate(params, mesh), sharded_batch, key)
    assert len(sharded[0].sharding.device_set) == 8
    chex.assert_trees_all_close(_np(sharded), _np(single), rtol=1e-4, atol=1e-5)
    x_rec, mean, logvar = _np(single)
    chex.assert_shape(x_rec, (16, 16, 16, 1))
    assert np.abs(x_rec - f(params, {"x": batch["x"]}, jax.random.key(2))[0]).max() > 1e-4


# ------------------------------------------------------------------------------------------
# the loss
# ------------------------------------------------------------------------------------------


def _checkerboard(shape, c):
    i = np.arange(shape[1])[:, None] + np.arange(shape[2])[None, :]
    return jnp.asarray(c * (2 * (i % 2) - 1), jnp.float32)[None, :, :, None]


def test_multiscale_l1_and_kl_against_closed_forms():
    x = jnp.asarray(_digits(3))  # (3, 16, 16, 1): D = 256 pixel values
    m, lv = 0.3, -0.5
    kl = 64 * 0.5 * (m**2 + np.exp(lv) - 1 - lv)  # 4 x 4 x 4 latent elements

    def encode(p, x):
        return jnp.full((x.shape[0], 4, 4, 4), m), jnp.full((x.shape[0], 4, 4, 4), lv)

    @jit
    def run(x, offset, key):
        decode = lambda p, z: x + offset
        t = kl_autoencoder_terms(encode, decode, scales=(1, 2, 4))(None, {"x": x}, key)
        loss = kl_autoencoder_loss(encode, decode, kl_weight=0.1, l1_weight=2.0, scales=(1, 4))
        return t, loss(None, {"x": x}, key)

    key = jax.random.key(0)
    # a constant offset c: |c| at every scale
    t, loss = run(x, jnp.full((1, 16, 16, 1), 0.2), key)
    np.testing.assert_allclose(t["rec"], 256 * 3 * 0.2, rtol=1e-5)
    np.testing.assert_allclose(t["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(loss, 2 * 256 * 2 * 0.2 + 0.1 * kl, rtol=1e-5)
    # a checkerboard of +-c: c at full resolution, 0 once 2x2 (or 4x4) averaged
    t, loss = run(x, _checkerboard(x.shape, 0.2), key)
    np.testing.assert_allclose(t["rec"], 256 * 0.2, rtol=1e-5)
    np.testing.assert_allclose(loss, 2 * 256 * 0.2 + 0.1 * kl, rtol=1e-5)
    with pytest.raises(ValueError, match=r"scales \[3\] do not divide the image size"):
        kl_autoencoder_terms(encode, lambda p, z: x, scales=(1, 3))(None, {"x": x}, key)
    with pytest.raises(ValueError, match="scales must be"):
        kl_autoencoder_loss(encode, encode, scales=(0,))
    with pytest.raises(ValueError, match="kl_weight must be a number >= 0; got -1"):
        kl_autoencoder_loss(encode, encode, kl_weight=-1)
    with pytest.raises(ValueError, match="disc_start must be an int >= 0"):
        kl_autoencoder_loss(encode, encode, disc_start=-3)
    with pytest.raises(ValueError, match="decode returned shape"):
        jax.eval_shape(kl_autoencoder_loss(encode, lambda p, z: z), None, {"x": x}, key)


def test_training_reduces_the_loss_on_digits():
    cfg, graphdef, params = _tiny(4)
    ae = lambda p: nnx.merge(graphdef, p)
    loss = kl_autoencoder_loss(lambda p, x: ae(p).encode(x), lambda p, z: ae(p).decode(z))
    # one flat vector for Adam: the same update, a much smaller program to compile
    optimizer = optax.flatten(optax.adam(2e-3))
    state = jit(lambda p: init_train_state(p, optimizer, jax.random.key(0)))(params)
    step = jit_train_step(make_train_step(loss, optimizer, ema_decay=0.0),
                          compiler_options=FAST)
    batch = {"x": jnp.asarray(_digits(16))}
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses


# The GAN tests: the identities are properties of the loss, so a small hand-written
# autoencoder (4x4 average pooling to a 4-channel latent, and back) stands in for the network;
# the discriminator is the real one.


def _light_encode(p, x):
    b, h, w, _ = x.shape
    pooled = jnp.mean(x.reshape(b, h // 4, 4, w // 4, 4, 1), axis=(2, 4))
    mean = jnp.tanh(pooled * p["a"] + p["b"])
    return mean, jnp.broadcast_to(p["logvar"], mean.shape)


def _light_decode(p, z):
    h = jnp.repeat(jnp.repeat(z @ p["w"], 4, axis=1), 4, axis=2)
    return h + p["c"]


def _gan_setup():
    d_graphdef, d_params = init_params(PatchDiscriminator, DISC, seed=1)
    k = jax.random.split(jax.random.key(7), 3)
    ae_params = {"a": 1.0 + 0.1 * jax.random.normal(k[0], (4,)), "b": jnp.zeros(4),
                 "logvar": jnp.full(4, -2.0), "w": 0.5 * jax.random.normal(k[1], (4, 1)),
                 "c": jnp.zeros((16, 16, 1))}
    disc = lambda p, x: nnx.merge(d_graphdef, p)(x)
    return disc, {"ae": ae_params, "disc": d_params}


def test_gan_stop_gradients_give_each_network_its_own_loss():
    disc, params = _gan_setup()
    encode, decode = _light_encode, _light_decode
    kl_w, d_w = 1e-3, 3.0
    loss = kl_autoencoder_loss(encode, decode, kl_weight=kl_w, scales=(1, 2),
                               discriminator=disc, disc_weight=d_w, disc_start=5)
    no_gan = kl_autoencoder_loss(encode, decode, kl_weight=kl_w, scales=(1, 2))
    batch, key = {"x": jnp.asarray(_digits(4))}, jax.random.key(3)

    # the two objectives, written out separately (reference pooling: nnx.avg_pool)
    def reconstruction(ae_params):
        mean, logvar = encode(ae_params, batch["x"])
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return decode(ae_params, z), mean, logvar

    def ae_objective(ae_params):
        x = batch["x"]
        x_rec, mean, logvar = reconstruction(ae_params)
        l1 = jnp.sum(jnp.abs(x_rec - x), axis=(1, 2, 3))
        pool = lambda v: nnx.avg_pool(v, (2, 2), strides=(2, 2))
        l1 = l1 + 4 * jnp.sum(jnp.abs(pool(x_rec) - pool(x)), axis=(1, 2, 3))
        gen = -jnp.mean(disc(params["disc"], x_rec), axis=(1, 2, 3))
        return jnp.mean(l1 + kl_w * gaussian_kl(mean, logvar) + d_w * gen)

    def disc_objective(d_params):
        x_rec = reconstruction(params["ae"])[0]
        real = jnp.mean(jax.nn.relu(1 - disc(d_params, batch["x"])), axis=(1, 2, 3))
        fake = jnp.mean(jax.nn.relu(1 + disc(d_params, x_rec)), axis=(1, 2, 3))
        return jnp.mean(0.5 * (real + fake))

    @jit
    def grads(params):
        combined = lambda p, step: jnp.mean(loss(p, batch, key, step))
        return (jax.grad(combined)(params, jnp.int32(5)),
                jax.grad(ae_objective)(params["ae"]),
                jax.grad(disc_objective)(params["disc"]),
                jax.grad(lambda p: jnp.mean(no_gan(p, batch, key)))(params["ae"]),
                loss(params, batch, key, jnp.int32(4)), no_gan(params["ae"], batch, key))

    g, g_ae, g_disc, g_plain, before, plain = _np(grads(params))
    chex.assert_trees_all_close(g["ae"], g_ae, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(g["disc"], g_disc, rtol=1e-4, atol=1e-6)
    # neither identity is vacuous: the generator term moves the autoencoder's gradient, and
    # the discriminator's gradient is not zero
    assert _norm(_diff(g["ae"], g_plain)) > 1e-3 * _norm(g_plain)
    assert _norm(g["disc"]) > 0.0
    # before disc_start the adversarial terms are off: the loss is the plain one
    chex.assert_trees_all_close(before, plain, rtol=1e-5)
    with pytest.raises(ValueError, match="disc_start=5 needs the step"):
        loss(params, batch, key)


def test_gan_loss_trains_both_networks_in_one_step():
    disc, params = _gan_setup()
    loss = kl_autoencoder_loss(_light_encode, _light_decode, discriminator=disc, disc_start=1)
    optimizer = optax.adam(1e-3)
    state = jit(lambda p: init_train_state(p, optimizer, jax.random.key(0)))(params)
    step = jit_train_step(make_train_step(loss, optimizer, ema_decay=0.0), compiler_options=FAST)
    batch = {"x": jnp.asarray(_digits(8))}
    moved = lambda a, b: _norm(_diff(a, b)) > 0
    s0 = _np(state.params)
    state, _ = step(state, batch, jnp.int32(0))  # before disc_start: the discriminator rests
    assert moved(state.params["ae"], s0["ae"]) and not moved(state.params["disc"], s0["disc"])
    s1 = _np(state.params)
    state, metrics = step(state, batch, jnp.int32(1))
    assert moved(state.params["disc"], s1["disc"]) and np.isfinite(float(metrics["loss"]))
