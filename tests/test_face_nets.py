"""Tests for REFace's face networks (nets.face), ArcFace's loss and the cosine identity distance
(dpm.losses.identity) and identity retrieval (dpm.metrics.identity).

Compilation dominates on CPU: networks are initialised with `nets.init_params` and every
numerical check of a configuration runs as one program through the tests' fast-compiling `jit`;
shapes of the full-size presets come from `jax.eval_shape` (no compilation).
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fastjit import jit
from flax import nnx

from dpm.losses import arcface_loss, cosine_distance
from dpm.metrics import identity_retrieval
from nets import (
    FaceConditioner,
    FaceConditionerConfig,
    FaceEncoder,
    FaceEncoderConfig,
    face_encoder_small,
    init_params,
    reface_conditioner_paper,
    reface_conditioner_small,
)

# ------------------------------------------------------------------------------- FaceEncoder

_ENC = FaceEncoderConfig(image_size=16, in_channels=3, width=8, num_stages=3, embed_dim=16,
                         num_classes=5, num_outputs=3)


def _all_outputs(graphdef, params, x):
    m = nnx.merge(graphdef, params)
    return dict(features=m.features(x), embed=m.embed(x), cos=m.cosine_logits(x),
                regress=m.regress(x), maps=m.feature_maps(x), call=m(x))


def test_face_encoder_shapes_norms_and_cosines():
    graphdef, params = init_params(FaceEncoder, _ENC, seed=1)
    x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    out = jit(_all_outputs, static_argnums=0)(graphdef, params, x)
    chex.assert_shape([out["features"], out["embed"], out["call"]], (4, 16))
    chex.assert_shape(out["cos"], (4, 5))
    chex.assert_shape(out["regress"], (4, 3))
    assert [f.shape for f in out["maps"]] == [(4, 16, 16, 8), (4, 8, 8, 16), (4, 4, 4, 32)]
    np.testing.assert_allclose(np.linalg.norm(out["embed"], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["call"], out["embed"])
    # embed = features / |features|; cos = embed . (w_j / |w_j|) against the class weights
    f = np.asarray(out["features"], np.float64)
    np.testing.assert_allclose(out["embed"], f / np.linalg.norm(f, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    w = np.asarray(params["class_weights"][...], np.float64)
    expected = out["embed"] @ (w / np.linalg.norm(w, axis=0, keepdims=True))
    np.testing.assert_allclose(out["cos"], expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(out["cos"]) <= 1.0 + 1e-6)
    # the regression head is linear on the features
    k, b = (np.asarray(params["head"][n][...], np.float64) for n in ("kernel", "bias"))
    np.testing.assert_allclose(out["regress"], f @ k + b, rtol=1e-4, atol=1e-5)


def test_face_encoder_default_preset_shapes():
    cfg = face_encoder_small(num_classes=100, num_outputs=4)
    assert (cfg.image_size, cfg.in_channels, cfg.width, cfg.num_stages, cfg.embed_dim) == (
        32, 3, 32, 3, 64)
    abstract = nnx.eval_shape(lambda: FaceEncoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    out = jax.eval_shape(lambda p, x: _all_outputs(graphdef, p, x), params, x)
    assert out["embed"].shape == (2, 64) and out["cos"].shape == (2, 100)
    assert out["regress"].shape == (2, 4)
    assert [f.shape for f in out["maps"]] == [(2, 32, 32, 32), (2, 16, 16, 64), (2, 8, 8, 128)]


def test_face_encoder_errors():
    cfg = FaceEncoderConfig(image_size=4, in_channels=1, width=4, num_stages=1, embed_dim=4)
    m = nnx.eval_shape(lambda: FaceEncoder(cfg, rngs=nnx.Rngs(0)))  # errors precede compute
    x = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="num_classes"):
        m.cosine_logits(x)
    with pytest.raises(ValueError, match="num_outputs"):
        m.regress(x)
    for bad in (jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 4, 4, 3)), jnp.zeros((4, 4, 1))):
        with pytest.raises(ValueError, match=r"x must have shape \(B, 4, 4, 1\)"):
            m(bad)
    with pytest.raises(TypeError, match="FaceEncoderConfig"):
        FaceEncoder(dict(image_size=4), rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_size=0), "image_size"),
        (dict(width=2.0), "width"),
        (dict(num_stages=True), "num_stages"),
        (dict(embed_dim=-1), "embed_dim"),
        (dict(num_classes=-1), "num_classes"),
        (dict(num_outputs=1.5), "num_outputs"),
        (dict(image_size=20, num_stages=4), r"divisible by 2\*\*\(num_stages - 1\) = 8"),
    ],
)
def test_face_encoder_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaceEncoderConfig(**kwargs)


# ------------------------------------------------------------------------------ arcface_loss

_arcface = jit(arcface_loss, static_argnames=("margin", "scale"))


def _ce_numpy(logits, labels):
    logits = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    return lse - logits[np.arange(len(labels)), labels]


def test_arcface_margin_zero_is_scaled_softmax_ce(x64):
    rng = np.random.default_rng(0)
    cos = jnp.asarray(rng.uniform(-0.99, 0.99, (16, 7)))
    labels = jnp.asarray(rng.integers(0, 7, 16))
    loss = _arcface(cos, labels, margin=0.0, scale=20.0)
    chex.assert_shape(loss, (16,))
    assert loss.dtype == jnp.float64
    truth = jit(optax.softmax_cross_entropy_with_integer_labels)(20.0 * cos, labels)
    np.testing.assert_allclose(loss, truth, rtol=1e-10, atol=1e-10)
    # a margin makes every example's loss larger (its true-class logit smaller)
    assert np.all(_arcface(cos, labels, margin=0.3, scale=20.0) > loss)


def test_arcface_logits_by_hand_including_the_fallback_branch(x64):
    m, s = 0.5, 16.0
    th = math.cos(math.pi - m)  # theta + m > pi  <=>  cos theta < th
    cos = np.array([[0.7, 0.1, -0.3],      # ordinary: l_y = s cos(theta + m)
                    [-0.95, 0.2, 0.0],     # theta + m > pi: l_y = s (cos - m sin m)
                    [0.0, th - 1e-3, 0.4]])
    labels = np.array([0, 0, 1])
    assert cos[1, 0] < th and cos[2, 1] < th
    loss = _arcface(jnp.asarray(cos), jnp.asarray(labels), margin=m, scale=s)
    logits = s * cos.copy()
    logits[0, 0] = s * math.cos(math.acos(0.7) + m)
    logits[1, 0] = s * (-0.95 - m * math.sin(m))
    logits[2, 1] = s * (cos[2, 1] - m * math.sin(m))
    np.testing.assert_allclose(loss, _ce_numpy(logits, labels), rtol=1e-10)

    # the loss keeps growing as theta grows past pi - m (the fallback steps down by
    # s (cos m + m sin m - 1) from s cos(pi) = -s: the standard form is not continuous there)
    def loss_at(c):
        return float(_arcface(jnp.array([[c, 0.0]]), jnp.array([0]), margin=m, scale=s)[0])

    grid = [th + d for d in (1e-2, 1e-3, 1e-9, -1e-9, -1e-3, -1e-2)]
    losses = [loss_at(c) for c in grid]
    assert all(a < b for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    jump = loss_at(th - 1e-12) - loss_at(th + 1e-12)
    np.testing.assert_allclose(jump, s * (math.cos(m) + m * math.sin(m) - 1), rtol=1e-6)


def test_arcface_gradient_finite_at_the_edges():
    cos = jnp.array([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.5], [1.0, 1.0, -1.0]])
    labels = jnp.array([0, 0, 2])
    for margin in (0.0, 0.5):
        loss, g = jit(jax.value_and_grad(
            lambda c, margin=margin: jnp.sum(arcface_loss(c, labels, margin=margin))))(cos)
        assert np.isfinite(loss) and np.all(np.isfinite(g)), (margin, loss, g)


def test_arcface_errors():
    cos, labels = jnp.zeros((3, 4)), jnp.array([0, 1, 2])
    with pytest.raises(ValueError, match="cos must be a floating"):
        arcface_loss(jnp.zeros((3,)), labels)
    with pytest.raises(ValueError, match="labels must be"):
        arcface_loss(cos, jnp.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="labels must be"):
        arcface_loss(cos, jnp.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, C=4\)"):
        arcface_loss(cos, jnp.array([0, 1, 4]))
    with pytest.raises(ValueError, match="margin"):
        arcface_loss(cos, labels, margin=math.pi / 2)
    with pytest.raises(ValueError, match="margin"):
        arcface_loss(cos, labels, margin=-0.1)
    with pytest.raises(ValueError, match="scale"):
        arcface_loss(cos, labels, scale=0.0)


def test_arcface_trains_a_dense_embedding_on_separable_clusters():
    key = jax.random.key(3)
    k_mu, k_x, k_w, k_c = jax.random.split(key, 4)
    centres = 3.0 * jax.random.normal(k_mu, (4, 8))
    labels = jnp.repeat(jnp.arange(4), 16)
    x = centres[labels] + 0.3 * jax.random.normal(k_x, (64, 8))
    params = {"w": 0.3 * jax.random.normal(k_w, (8, 16)),
              "classes": jax.random.normal(k_c, (16, 4))}

    def cosines(p):
        e = x @ p["w"]
        e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
        c = p["classes"] / jnp.linalg.norm(p["classes"], axis=0, keepdims=True)
        return e @ c

    def loss_fn(p):
        return jnp.mean(arcface_loss(cosines(p), labels, margin=0.3, scale=16.0))

    opt = optax.adam(0.05)

    @jit
    def train(p):
        def step(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss

        (q, _), losses = jax.lax.scan(step, (p, opt.init(p)), None, length=30)
        return losses, loss_fn(q), cosines(p), cosines(q)

    losses, final, cos0, cos1 = train(params)
    true0, true1 = (float(np.mean(np.take_along_axis(np.asarray(c), np.asarray(labels)[:, None],
                                                     axis=1))) for c in (cos0, cos1))
    assert np.all(np.isfinite(losses))
    assert float(final) < 0.3 * float(losses[0]), (float(losses[0]), float(final))
    assert true1 > true0 + 0.3 and true1 > 0.6, (true0, true1)
    assert np.mean(np.argmax(cos1, axis=1) == np.asarray(labels)) == 1.0


# --------------------------------------------------------------------------- cosine_distance


def test_cosine_distance(x64):
    a, b = np.random.default_rng(0).normal(size=(2, 5, 7))
    dist = jit(cosine_distance)
    d = dist(jnp.asarray(a), jnp.asarray(b))
    chex.assert_shape(d, (5,))
    expected = 1 - np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(d, expected, rtol=1e-12)
    np.testing.assert_allclose(dist(jnp.asarray(a), jnp.asarray(3 * a)), 0, atol=1e-12)
    zero, other = jnp.zeros((5, 7)), jnp.asarray(b)
    value, g = jit(jax.value_and_grad(lambda z: jnp.sum(cosine_distance(z, other))))(zero)
    np.testing.assert_allclose(value, 5.0)  # a zero vector has cosine 0
    assert np.all(np.isfinite(g))
    with pytest.raises(ValueError, match="same shape"):
        cosine_distance(jnp.zeros((2, 3)), jnp.zeros((2, 4)))


# --------------------------------------------------------------------------- FaceConditioner


def _tokens_by_hand(graphdef, params, src, idv, tgt, lm):
    """The conditioner's output and its branch tokens from the sub-modules, one program."""
    m = nnx.merge(graphdef, params)
    e = {"src": m.proj_src(m.mapper(src[:, None])[:, 0]), "id": m.proj_id(idv)}
    if tgt is not None:
        e["tgt"] = m.proj_tgt(m.mapper(tgt[:, None])[:, 0])
    if lm is not None:
        e["lm"] = m.proj_lm(lm)
    return m(src, idv, tgt, lm), e


def _inputs(cfg, b=3):
    rng = np.random.default_rng(7)
    src, idv, tgt, lm = (rng.normal(size=(b, d)).astype(np.float32) for d in (
        cfg.feature_dim, cfg.id_dim, cfg.feature_dim, max(cfg.landmark_dim, 1)))
    return (src, idv, tgt if cfg.use_target else None, lm if cfg.landmark_dim else None)


# every branch present, non-default fusion weights; a small mapper (compiles fast)
_COND = reface_conditioner_small(12, 10, landmark_dim=6, w_clip=2.0, w_id=3.0, w_lm=0.5,
                                 width=16, heads=2, mapper_layers=1)


def test_fused_token_is_the_weighted_mean_of_present_branches():
    _, full = init_params(FaceConditioner, _COND, seed=2)
    for use_target, landmark_dim in [(True, 6), (False, 0), (True, 0), (False, 6)]:
        # the same parameters without the absent branches' projections
        cfg = dataclasses.replace(_COND, use_target=use_target, landmark_dim=landmark_dim)
        graphdef, abstract = nnx.split(
            nnx.eval_shape(lambda cfg=cfg: FaceConditioner(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        params = nnx.State({name: full[name] for name in abstract})
        c, e = jit(_tokens_by_hand, static_argnums=0)(graphdef, params, *_inputs(cfg))
        chex.assert_shape(c, (3, 1, 16))
        num = 2.0 * e["src"] + 3.0 * e["id"]
        den = 2.0 + 3.0
        if use_target:
            num = num + 2.0 * e["tgt"]  # e_tgt shares w_clip with e_src: no weight of its own
        if landmark_dim:
            num, den = num + 0.5 * e["lm"], den + 0.5
        np.testing.assert_allclose(c[:, 0], num / den, rtol=1e-5, atol=1e-6)
        assert cfg.normalizer == den


def test_paper_fusion_weights_and_separate_tokens():
    small = reface_conditioner_small(12, 10)
    assert (small.w_clip, small.w_id, small.w_lm, small.num_tokens) == (1.0, 10.0, 0.05, 1)
    cfg = dataclasses.replace(_COND, tokens="separate")
    graphdef, params = init_params(FaceConditioner, cfg, seed=0)
    c, e = jit(_tokens_by_hand, static_argnums=0)(graphdef, params, *_inputs(cfg))
    chex.assert_shape(c, (3, 4, 16))
    for i, name in enumerate(("src", "id", "tgt", "lm")):  # [e_src, e_id, e_tgt, e_lm]
        np.testing.assert_allclose(c[:, i], e[name], rtol=1e-6, atol=1e-6)
    assert nnx.merge(graphdef, params).num_tokens == 4


@pytest.mark.parametrize(
    "overrides, length",
    [(dict(), 3), (dict(use_target=False), 2), (dict(use_target=False, landmark_dim=5), 3)],
)
def test_separate_and_null_context_shapes(overrides, length):
    cfg = reface_conditioner_small(12, 10, tokens="separate", **overrides)
    assert cfg.num_tokens == length
    abstract = nnx.eval_shape(lambda: FaceConditioner(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    out = jax.eval_shape(lambda p, *a: nnx.merge(graphdef, p)(*a), params, *_inputs(cfg, 5))
    assert out.shape == (5, length, 64)
    null = jax.eval_shape(lambda p: nnx.merge(graphdef, p).null_context(5), params)
    assert null.shape == (5, length, 64)


def test_paper_preset_shapes():
    cfg = reface_conditioner_paper()
    assert (cfg.feature_dim, cfg.id_dim, cfg.landmark_dim, cfg.width, cfg.mapper_layers,
            cfg.heads, cfg.tokens, cfg.num_tokens) == (768, 512, 136, 768, 5, 12, "fused", 1)
    assert math.isclose(cfg.normalizer, 11.05)
    abstract = nnx.eval_shape(lambda: FaceConditioner(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    args = [jax.ShapeDtypeStruct((2, d), jnp.float32) for d in (768, 512, 768, 136)]
    out = jax.eval_shape(lambda p, *a: nnx.merge(graphdef, p)(*a), params, *args)
    assert out.shape == (2, 1, 768)
    assert len(abstract.mapper.blocks) == 5


def test_null_context_is_a_learnable_parameter():
    graphdef, params = init_params(FaceConditioner, _COND, seed=2)  # cached: shared above
    m = nnx.merge(graphdef, params)
    null = m.null_context(4)
    chex.assert_shape(null, (4, 1, 16))
    token = np.asarray(params["null_token"][...])
    np.testing.assert_allclose(null, np.broadcast_to(token, (4, 1, 16)))
    assert 0.005 < token.std() < 0.05  # N(0, 0.02^2)
    target = np.random.default_rng(1).normal(size=(4, 1, 16)).astype(np.float32)
    grads = jit(jax.grad(lambda p: jnp.sum((nnx.merge(graphdef, p).null_context(4) - target)
                                           ** 2)))(params)
    assert np.abs(np.asarray(grads["null_token"][...])).min() > 0
    others = [g for path, g in nnx.to_flat_state(grads) if path[0] != "null_token"]
    assert all(float(jnp.max(jnp.abs(g[...]))) == 0.0 for g in others)


def test_face_conditioner_errors():
    cfg = _COND
    m = nnx.eval_shape(lambda: FaceConditioner(cfg, rngs=nnx.Rngs(0)))  # errors precede compute
    src, idv, tgt, lm = _inputs(cfg)
    with pytest.raises(ValueError, match="tgt_feat is required"):
        m(src, idv, None, lm)
    with pytest.raises(ValueError, match="landmarks are required"):
        m(src, idv, tgt)
    with pytest.raises(ValueError, match=r"src_feat must have shape \(B, 12\)"):
        m(src[:, :5], idv, tgt, lm)
    with pytest.raises(ValueError, match=r"id_emb must have shape \(3, 10\)"):
        m(src, idv[:2], tgt, lm)
    with pytest.raises(ValueError, match=r"tgt_feat must have shape \(3, 12\)"):
        m(src, idv, tgt[:, :3], lm)
    with pytest.raises(ValueError, match=r"landmarks must have shape \(3, 6\)"):
        m(src, idv, tgt, lm[:1])
    with pytest.raises(ValueError, match="batch_size"):
        m.null_context(0)
    bare = nnx.eval_shape(lambda: FaceConditioner(reface_conditioner_small(
        12, 10, use_target=False, width=16, heads=2), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="tgt_feat must be None"):
        bare(src, idv, tgt)
    with pytest.raises(ValueError, match="landmarks must be None"):
        bare(src, idv, None, lm)
    with pytest.raises(TypeError, match="FaceConditionerConfig"):
        FaceConditioner(cfg.__dict__, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(feature_dim=0), "feature_dim"),
        (dict(id_dim=1.0), "id_dim"),
        (dict(landmark_dim=-1), "landmark_dim"),
        (dict(width=30, heads=4), r"width \(30\) must be divisible by heads \(4\)"),
        (dict(mapper_layers=0), "mapper_layers"),
        (dict(w_id=-1.0), "w_id"),
        (dict(w_clip=float("nan")), "w_clip"),
        (dict(w_clip=0.0, w_id=0.0, w_lm=1.0), "sum to > 0"),
        (dict(use_target=1), "use_target"),
        (dict(tokens="concat"), "tokens"),
    ],
)
def test_face_conditioner_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaceConditionerConfig(**{**dict(feature_dim=12, id_dim=10), **kwargs})


# -------------------------------------------------------------------------- identity_retrieval


def _retrieval_brute_force(q, g, ks):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    out = {f"top{k}": 0.0 for k in ks}
    for i in range(len(q)):
        order = np.argsort(-(gn @ qn[i]))
        position = int(np.flatnonzero(order == i)[0])
        for k in ks:
            out[f"top{k}"] += (position < k) / len(q)
    out["mean_cos"] = float(np.mean(np.sum(qn * gn[: len(q)], axis=1)))
    return out


@pytest.mark.parametrize("num_gallery", [60, 90])
def test_identity_retrieval_against_brute_force(num_gallery):
    rng = np.random.default_rng(0)
    g = rng.normal(size=(num_gallery, 6))
    q = g[:60] + 0.8 * rng.normal(size=(60, 6))
    got = identity_retrieval(q, g, k=(1, 3, 5))
    truth = _retrieval_brute_force(q, g, (1, 3, 5))
    assert set(got) == {"top1", "top3", "top5", "mean_cos"}
    for name, value in truth.items():
        assert math.isclose(got[name], value, rel_tol=1e-12, abs_tol=1e-12), (name, got, truth)
    assert 0.0 < got["top1"] < got["top5"] < 1.0  # the noise makes the task non-trivial


def test_identity_retrieval_perfect_and_collapsed():
    g = np.random.default_rng(1).normal(size=(20, 8))
    got = identity_retrieval(g, g)
    assert got["top1"] == got["top5"] == 1.0
    assert math.isclose(got["mean_cos"], 1.0, rel_tol=1e-12)
    # a collapsed gallery ties everywhere: ties count against the query
    collapsed = identity_retrieval(g, np.ones((20, 8)))
    assert collapsed["top1"] == collapsed["top5"] == 0.0


def test_identity_retrieval_errors():
    q = np.zeros((4, 3))
    with pytest.raises(ValueError, match="query"):
        identity_retrieval(np.zeros(4), q)
    with pytest.raises(ValueError, match="gallery"):
        identity_retrieval(q, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="gallery"):
        identity_retrieval(q, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="k must"):
        identity_retrieval(q, q, k=(1, 5))
    with pytest.raises(ValueError, match="k must"):
        identity_retrieval(q, q, k=())
    with pytest.raises(ValueError, match="finite"):
        identity_retrieval(np.full((4, 3), np.nan), q)
