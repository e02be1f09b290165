"""Tests for the Flax NNX backbones in `nets/` (U-Net, classifier).

Compilation dominates on CPU, so the file compiles few programs: nets are built abstractly
(`nnx.eval_shape`) and filled from numpy with nonzero values (the zero-initialised layers then
pass signal too), inputs and checks are numpy, and one jitted apply per config is shared.
`test_fresh_net_predicts_zero` and the classifier fit use the real initialisers.
"""

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nets import (
    Classifier,
    UNet,
    UNetConfig,
    count_params,
    ddpm_cifar10,
    init_params,
    small,
    tiny,
)
from nets._layers import AttnBlock, GroupNorm, group_count, sinusoidal_embedding

# A conditional tiny net exercising labels, a conditioning image and dropout at once, plus the
# ADM options (scale-shift norm, 4 heads of 12 channels) and conv-free resampling.
COND = tiny(
    num_classes=3,
    extra_in_channels=2,
    dropout=0.2,
    use_scale_shift_norm=True,
    head_channels=12,
    resample_with_conv=False,
)


@functools.cache
def _abstract(cfg: UNetConfig):
    """(graphdef, abstract params) of a config, without allocating or compiling anything."""
    return nnx.split(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _random_params(abstract, seed=0):
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if len(s.shape) >= 2:  # kernels, embeddings: unit-variance fan-in scaling
            return rng.normal(size=s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1]))
        centre = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return (centre + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract))


@functools.cache
def _net(cfg: UNetConfig):
    """(random nonzero params, jitted apply) for a config."""
    graphdef, abstract = _abstract(cfg)

    @functools.partial(jax.jit, static_argnames="train")
    def apply(params, x, t, cond=None, key=None, train=False):
        return nnx.merge(graphdef, params)(x, t, cond, key=key, train=train)

    return _random_params(abstract), apply


def _inputs(cfg, b, seed=0):
    """Numpy inputs: x (B, S, S, C), noise levels (B,), cond dict or None."""
    rng = np.random.default_rng(seed)
    s = cfg.image_size
    x = rng.normal(size=(b, s, s, cfg.in_channels)).astype(np.float32)
    cond = {}
    if cfg.num_classes is not None:
        cond["label"] = rng.integers(0, cfg.num_classes + 1, size=(b,)).astype(np.int32)
    if cfg.extra_in_channels:
        cond["image"] = rng.normal(size=(b, s, s, cfg.extra_in_channels)).astype(np.float32)
    return x, np.linspace(1.0, 900.0, b, dtype=np.float32), cond or None


def _max_abs(a):
    return float(np.max(np.abs(np.asarray(a))))


# ---------------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize(
    "cfg",
    [
        tiny(),
        small(),
        tiny(dtype=jnp.bfloat16),
        tiny(learned_variance=True, out_channels=2),
        tiny(image_size=16, channels=3, num_classes=10, extra_in_channels=3),
        ddpm_cifar10(dtype=jnp.bfloat16, num_classes=10, learned_variance=True),
    ],
    ids=["tiny", "small", "tiny-bf16", "tiny-learned-variance", "tiny-16-cond", "cifar10-bf16"],
)
def test_preset_shapes_and_dtypes(cfg):
    graphdef, abstract = _abstract(cfg)
    x, t, cond = _inputs(cfg, 3)
    out = jax.eval_shape(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c), abstract, x, t, cond)
    s = cfg.image_size
    chex.assert_shape(out, (3, s, s, cfg.output_channels))
    chex.assert_type(out, jnp.float32)
    assert cfg.output_channels == cfg.out_channels * (2 if cfg.learned_variance else 1)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))


def test_fresh_net_predicts_zero():
    # The output conv is zero-initialised: a freshly initialised net outputs exactly zero.
    cfg = tiny(base_channels=8, channel_mult=(1,), attn_resolutions=())
    x, t, _ = _inputs(cfg, 2)

    @jax.jit
    def init_and_apply(x, t):
        net = UNet(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
        return net(x, t), nnx.state(net, nnx.Param)

    out, params = init_and_apply(x, t)
    chex.assert_shape(out, x.shape)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_array_equal(out, 0.0)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    assert _max_abs(params["conv_in"]["kernel"][...]) > 0


def test_ddpm_cifar10_parameter_count():
    # Ho et al. (2020): the CIFAR-10 model has 35.7M parameters.
    n = count_params(nnx.eval_shape(lambda: UNet(ddpm_cifar10(), rngs=nnx.Rngs(0))))
    assert abs(n - 35.7e6) / 35.7e6 < 0.01, n
    # presets that must stay CPU-fast
    for cfg, upper in ((tiny(), 1e6), (small(), 2e6)):
        assert count_params(nnx.eval_shape(lambda c=cfg: UNet(c, rngs=nnx.Rngs(0)))) < upper


def test_count_params_matches_hand_count():
    # conv3x3 3->5 with bias + GroupNorm(5) scale and bias
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 5, (3, 3), rngs=rngs)
            self.norm = GroupNorm(5, rngs=rngs)

    assert count_params(nnx.eval_shape(lambda: Net(nnx.Rngs(0)))) == 3 * 3 * 3 * 5 + 5 + 2 * 5


def test_circular_translation_equivariance():
    # With circular padding every layer commutes with circular shifts by multiples of the total
    # downsampling factor (4 here): convs, stride-2 convs, nearest upsampling, GroupNorm (its
    # statistics are shift-invariant) and attention (permutation-equivariant). A shift by 2 is
    # misaligned with the stride-2 sampling and must NOT commute: the check can fail.
    cfg = small(padding="CIRCULAR")
    assert cfg.downsampling_factor == 4 and cfg.attn_resolutions
    params, apply = _net(cfg)
    x, _, _ = _inputs(cfg, 1, seed=3)
    xs = np.concatenate([x, np.roll(x, (4, 8), (1, 2)), np.roll(x, 2, 1)])
    y = np.asarray(apply(params, xs, np.float32(250.0)))  # a scalar noise level is broadcast
    scale = _max_abs(y[0])
    assert scale > 0.1
    err_aligned = _max_abs(y[1] - np.roll(y[0], (4, 8), (0, 1)))
    err_misaligned = _max_abs(y[2] - np.roll(y[0], 2, 0))
    assert err_aligned < 1e-4 * scale, (err_aligned, scale)
    assert err_misaligned > 1e-2 * scale, (err_misaligned, scale)


def test_examples_do_not_interact_and_noise_level_matters():
    # No statistic is shared across the batch (GroupNorm, attention are per example).
    params, apply = _net(COND)
    x, t, cond = _inputs(COND, 4)
    y = np.asarray(apply(params, x, t, cond))
    chex.assert_shape(y, (4, 8, 8, 1))
    chex.assert_tree_all_finite(y)
    x2 = x.copy()
    x2[1:] = _inputs(COND, 4, seed=9)[0][1:]
    y2 = np.asarray(apply(params, x2, t, cond))
    np.testing.assert_allclose(y2[0], y[0], rtol=1e-5, atol=1e-6)
    assert _max_abs(y2[1:] - y[1:]) > 1e-3
    # same x and cond, different noise levels -> different outputs
    same = {k: np.repeat(v[:1], 4, 0) for k, v in cond.items()}
    y3 = np.asarray(apply(params, np.repeat(x[:1], 4, 0), t, same))
    assert _max_abs(y3[0] - y3[2]) > 1e-3


@functools.cache
def _bf16_loss_and_grad():
    """jit(value_and_grad) of a squared-error loss of the bfloat16 COND net (aux: output)."""
    graphdef, _ = _abstract(dataclasses.replace(COND, dtype=jnp.bfloat16))

    @chex.assert_max_traces(n=1)
    def loss(p, x, t, cond):
        out = nnx.merge(graphdef, p)(x, t, cond)
        return jnp.mean((out - x) ** 2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_bf16_compute_matches_float32():
    params, apply32 = _net(COND)
    x, t, cond = _inputs(COND, 4)
    y32 = np.asarray(apply32(params, x, t, cond))
    (_, y16), _ = _bf16_loss_and_grad()(params, x, t, cond)
    chex.assert_type(y16, jnp.float32)
    rel = np.linalg.norm(np.asarray(y16) - y32) / np.linalg.norm(y32)
    assert 0 < rel < 5e-2, rel


def test_functional_split_merge_jit_and_gradients():
    # nnx.split once, nnx.merge inside jit; new parameter values do not retrace.
    params, _ = _net(COND)
    x, t, cond = _inputs(COND, 4)
    value_and_grad = _bf16_loss_and_grad()
    (l0, _), g0 = value_and_grad(params, x, t, cond)
    params1 = _random_params(_abstract(COND)[1], seed=1)
    (l1, _), g1 = value_and_grad(params1, x, t, cond)
    assert float(l1) != float(l0)
    for g in (g0, g1):
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(g)]
        assert all(leaf.dtype == np.float32 for leaf in leaves)
        assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
        # every parameter tensor receives gradient (embedding: only the rows of used labels)
        assert all(np.any(leaf != 0) for leaf in leaves)


def test_class_conditioning_and_null_class():
    params, apply = _net(COND)
    assert COND.null_class == COND.num_classes == 3
    x, _, cond = _inputs(COND, 4)
    b = COND.num_classes + 1
    xs, ts = np.repeat(x[:1], b, 0), np.full((b,), 300.0, np.float32)
    image = np.repeat(cond["image"][:1], b, 0)
    labels = np.arange(b, dtype=np.int32)  # every class and the null class
    y = np.asarray(apply(params, xs, ts, {"label": labels, "image": image})).reshape(b, -1)
    dists = np.linalg.norm(y[:, None] - y[None], axis=-1)
    assert np.min(dists[~np.eye(b, dtype=bool)]) > 1e-3, dists  # null included: own output
    # the label is the only thing that differs: the same label twice gives the same output
    y_same = np.asarray(
        apply(params, xs, ts, {"label": np.full((b,), 3, np.int32), "image": image})
    )
    np.testing.assert_allclose(y_same[0], y_same[-1], atol=1e-6)
    np.testing.assert_allclose(y_same[0].reshape(-1), y[3], rtol=1e-5, atol=1e-6)
    # one embedding row per class plus the null class
    assert params["label_emb"]["embedding"].shape[0] == COND.num_classes + 1


def test_image_conditioning_changes_output():
    params, apply = _net(COND)
    x, t, cond = _inputs(COND, 4)
    y = np.asarray(apply(params, x, t, cond))
    image2 = cond["image"].copy()
    image2[2:] *= -1.0
    y2 = np.asarray(apply(params, x, t, {"label": cond["label"], "image": image2}))
    np.testing.assert_allclose(y2[:2], y[:2], rtol=1e-5, atol=1e-6)
    assert np.min(np.max(np.abs(y2[2:] - y[2:]), axis=(1, 2, 3))) > 1e-3


def test_dropout_only_in_training_and_deterministic_given_key():
    params, apply = _net(COND)
    x, t, cond = _inputs(COND, 4)
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")
    y_eval = np.asarray(apply(params, x, t, cond))
    np.testing.assert_array_equal(apply(params, x, t, cond, key=k1), y_eval)
    y1 = np.asarray(apply(params, x, t, cond, key=k1, train=True))
    np.testing.assert_array_equal(apply(params, x, t, cond, key=k1, train=True), y1)
    y2 = np.asarray(apply(params, x, t, cond, key=k2, train=True))
    assert _max_abs(y1 - y2) > 1e-3
    assert _max_abs(y1 - y_eval) > 1e-3
    with pytest.raises(ValueError, match="key"):
        apply(params, x, t, cond, train=True)


def test_bad_inputs_raise():
    # Validation happens before any computation, so abstract nets suffice.
    net = nnx.merge(*_abstract(COND))
    x, t, cond = _inputs(COND, 2)
    label, image = cond["label"], cond["image"]
    x7 = np.zeros((2, 7, 7, 1), np.float32)
    cases = [
        (lambda: net(x[0], t, cond), "shape"),
        (lambda: net(np.zeros((2, 8, 8, 3), np.float32), t, cond), "in_channels"),
        (lambda: net(x7, t, {"label": label, "image": image[:, :7, :7]}), "divisible"),
        (lambda: net(x, np.zeros((3,), np.float32), cond), "noise_level"),
        (lambda: net(x, np.zeros((2, 1), np.float32), cond), "noise_level"),
        (lambda: net(x, t, {"image": image}), "label"),
        (lambda: net(x, t, {"label": label}), "image"),
        (lambda: net(x, t, {"label": label.astype(np.float32), "image": image}), "label"),
        (lambda: net(x, t, {"label": label[:1], "image": image}), "label"),
        (lambda: net(x, t, {"label": label, "image": image[..., :1]}), "image"),
        (lambda: net(x, t, {**cond, "text": label}), "unknown"),
        (lambda: net(x, t, cond, train=True), "key"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()
    uncond = nnx.merge(*_abstract(tiny()))
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, {"label": label})
    with pytest.raises(ValueError, match="extra_in_channels"):
        uncond(x, t, {"image": image})
    with pytest.raises(TypeError, match="dict"):
        uncond(x, t, label)
    with pytest.raises(ValueError, match="unconditional"):
        _ = tiny().null_class


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(attn_resolutions=(16,)), "attn_resolutions"),
        (dict(image_size=10, channel_mult=(1, 2, 2)), "image_size"),
        (dict(num_heads=5), "num_heads"),
        (dict(head_channels=7), "head_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(base_channels=3), "base_channels"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(padding="REFLECT"), "padding"),
        (dict(dtype=jnp.int32), "dtype"),
        (dict(extra_in_channels=-1), "extra_in_channels"),
        (dict(vector_cond_dim=-2), "vector_cond_dim"),
        (dict(attention_impl="flash"), "attention_impl"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_vector_condition_enters_through_the_time_embedding():
    # DiffuseVAE's z_cond: a (B, D) vector -> Linear, SiLU, Linear -> added to the embedding
    cfg = tiny(vector_cond_dim=5, use_scale_shift_norm=True)
    params, apply = _net(cfg)
    x, t, _ = _inputs(cfg, 2)
    v = np.random.default_rng(1).normal(size=(2, 5)).astype(np.float32)
    out = apply(params, x, t, {"vector": v})
    chex.assert_shape(out, x.shape)
    assert _max_abs(out - apply(params, x, t, {"vector": 2 * v})) > 1e-4
    # the vector acts like a shift of the time embedding: zeroing its second layer removes it
    params0 = jax.tree_util.tree_map_with_path(
        lambda p, a: a * 0 if "vec_emb_1" in jax.tree_util.keystr(p) else a, params)
    chex.assert_trees_all_close(apply(params0, x, t, {"vector": v}),
                                apply(params0, x, t, {"vector": 2 * v}))
    net = nnx.merge(*_abstract(cfg))
    with pytest.raises(ValueError, match="vector"):
        net(x, t, None)
    with pytest.raises(ValueError, match=r"cond\['vector'\] must have shape"):
        net(x, t, {"vector": v[:, :3]})
    with pytest.raises(ValueError, match="vector_cond_dim"):
        nnx.merge(*_abstract(tiny()))(x, t, {"vector": v})


def test_group_count_is_a_valid_divisor():
    for c in range(1, 600):
        g = group_count(c)
        assert c % g == 0 and 1 <= g <= 32
        assert g == 1 or c // g >= 4
    assert group_count(128) == 32 and group_count(256) == 32 and group_count(64) == 16


def test_group_norm_matches_reference_and_keeps_dtype():
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.normal(size=(2, 4, 4, 12))).astype(np.float32)
    gamma, beta = np.linspace(0.5, 1.5, 12), np.linspace(-1.0, 1.0, 12)
    gn = nnx.eval_shape(lambda: GroupNorm(12, rngs=nnx.Rngs(0)))  # 3 groups of 4 channels
    graphdef, abstract = nnx.split(gn, nnx.Param)
    params = jax.device_put(
        jax.tree_util.tree_map_with_path(
            lambda p, s: (gamma if "scale" in jax.tree_util.keystr(p) else beta).astype(np.float32),
            abstract,
        )
    )
    apply = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    xn = x.astype(np.float64).reshape(2, 16, 3, 4)
    ref = (xn - xn.mean(axis=(1, 3), keepdims=True)) / np.sqrt(
        xn.var(axis=(1, 3), keepdims=True) + 1e-6
    )
    ref = ref.reshape(2, 4, 4, 12) * gamma + beta
    np.testing.assert_allclose(apply(params, x), ref, rtol=1e-4, atol=1e-4)
    y16 = apply(params, jnp.asarray(x, jnp.bfloat16))
    chex.assert_type(y16, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(y16, np.float32), ref, rtol=0.05, atol=0.05)


def test_attention_matches_numpy_multi_head_reference():
    c, heads = 12, 3
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: AttnBlock(c, heads, rngs=nnx.Rngs(0))), nnx.Param
    )
    params = _random_params(abstract, seed=4)
    x = np.random.default_rng(5).normal(size=(2, 2, 3, c)).astype(np.float32)
    out = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(params))
    xn = x.astype(np.float64).reshape(2, 6, 3, 4)  # GroupNorm: 3 groups of 4 channels
    h = (xn - xn.mean((1, 3), keepdims=True)) / np.sqrt(xn.var((1, 3), keepdims=True) + 1e-6)
    h = h.reshape(2, 6, c) * p["norm"]["scale"] + p["norm"]["bias"]
    qkv = h @ p["qkv"]["kernel"] + p["qkv"]["bias"]
    ref = np.zeros((2, 6, c))
    d = c // heads
    for n in range(heads):  # head n uses channels n*d:(n+1)*d of each of q, k, v
        q, k, v = (qkv[..., i * c + n * d : i * c + (n + 1) * d] for i in range(3))
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        ref[..., n * d : (n + 1) * d] = (w / w.sum(-1, keepdims=True)) @ v
    ref = ref @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]
    ref = x.astype(np.float64) + ref.reshape(x.shape)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_sinusoidal_embedding_closed_form():
    n = np.array([0.0, 1.0, 250.0, 999.0], np.float32)
    emb = jax.jit(sinusoidal_embedding, static_argnums=1)(n, 16)
    f = np.exp(-np.log(10_000.0) * np.arange(8) / 7)  # f_0 = 1 ... f_7 = 1e-4
    ref = np.concatenate([np.sin(n[:, None] * f), np.cos(n[:, None] * f)], axis=1)
    np.testing.assert_allclose(emb, ref, atol=2e-4)


# ------------------------------------------------------------------------------ classifier


@pytest.mark.parametrize("image_size", [8, 16])
def test_classifier_shapes(image_size):
    clf = nnx.eval_shape(lambda: Classifier(10, 1, image_size, 8, rngs=nnx.Rngs(0)))
    x = np.zeros((3, image_size, image_size, 1), np.float32)
    logits = jax.eval_shape(lambda m, x: m(x), clf, x)
    feats = jax.eval_shape(lambda m, x: m.features(x), clf, x)
    chex.assert_shape(logits, (3, 10))
    chex.assert_shape(feats, (3, clf.feature_dim))
    chex.assert_type([logits, feats], jnp.float32)
    with pytest.raises(ValueError, match="shape"):
        clf(np.zeros((3, image_size, image_size, 3), np.float32))


def test_classifier_dropout_needs_key():
    clf = nnx.eval_shape(lambda: Classifier(4, 1, 8, 4, dropout=0.5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="key"):
        clf(np.zeros((1, 8, 8, 1), np.float32), train=True)


def test_classifier_fits_a_tiny_batch():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 4, size=(16,))  # random labels: pure memorisation
    opt = optax.adam(1e-2)

    @jax.jit
    def init_and_train(x, y):
        key = jax.random.key(0, impl="rbg")
        clf = Classifier(4, 1, 8, 8, dropout=0.1, rngs=nnx.Rngs(key))
        graphdef, params = nnx.split(clf, nnx.Param)

        def loss_fn(p, key):
            logits = nnx.merge(graphdef, p)(x, train=True, key=key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        def step(carry, key):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p, key)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        keys = jax.random.split(jax.random.fold_in(key, 1), 150)
        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), keys)
        preds = jnp.argmax(nnx.merge(graphdef, params)(x), axis=-1)
        return losses, jnp.mean(preds == y)

    losses, accuracy = init_and_train(x, y)
    losses = np.asarray(losses)
    assert losses[0] > 0.8 * math.log(4)
    assert losses[-1] < 0.1 * losses[0], losses[-1]
    assert float(accuracy) == 1.0


def test_init_params_is_the_eager_construction_compiled_once():
    cfg = tiny(8, num_classes=10)
    eager_graphdef, eager = nnx.split(UNet(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    graphdef, params = init_params(UNet, cfg, seed=3)
    assert graphdef == eager_graphdef
    # the same random bits; only the initialisers' scaling may round differently when fused
    chex.assert_trees_all_close(params, eager, rtol=1e-6, atol=1e-7)
    other = init_params(UNet, cfg, seed=4)[1]
    assert not np.allclose(other["conv_in"]["kernel"][...], params["conv_in"]["kernel"][...])
    g2, p2 = init_params(Classifier, 10, 1, 8, 16, dropout=0.1, seed=0)
    clf = nnx.merge(g2, p2)
    assert clf(jnp.zeros((2, 8, 8, 1))).shape == (2, 10)
    with pytest.raises(TypeError, match="hashable"):
        init_params(Classifier, 10, 1, 8, 16, dropout=[0.1], seed=0)
