"""Tests for ProDiff's networks: the DiffNet mel denoiser and the FastSpeech 2 conditioner.

Compilation dominates on CPU: nets are built abstractly (`nnx.eval_shape`) and filled from numpy
with nonzero values (the zero-initialised output layer then passes signal), and one jitted
apply per configuration and shape is shared. Padding tests compare real positions between
batches that differ only in the padding's content or length.
"""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from flax import nnx

from nets import (
    DiffNet,
    DiffNetConfig,
    FastSpeech2,
    FastSpeech2Config,
    count_params,
    diffnet_prodiff,
    diffnet_small,
    fastspeech2_prodiff,
    fastspeech2_small,
    length_regulate,
)

DCFG = diffnet_small(cond_dim=12, in_dims=10)
NUM_SYMBOLS = 20
FCFG = fastspeech2_small(NUM_SYMBOLS, log_f0_range=(-2.0, 2.0), energy_range=(-2.0, 2.0))


@functools.cache
def _abstract(cls, cfg):
    """(graphdef, abstract params), without allocating or compiling anything."""
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _random_params(abstract, seed=0):
    """Nonzero parameters: fan-in scaled normal kernels, LayerNorm scales near 1."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if len(s.shape) >= 2:
            return rng.normal(size=s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1]))
        centre = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return (centre + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract))


def _lengths_mask(lengths, n):
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------- length_regulate


def test_length_regulate_repeats_each_phoneme_its_duration():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(3, 5, 4)).astype(np.float32)
    d = np.array([[2, 0, 3, 1, 0], [0, 0, 0, 0, 0], [4, 4, 4, 4, 4]], np.int32)
    lr = jit(chex.assert_max_traces(length_regulate, n=1), static_argnums=2)
    frames, mask = lr(h, d, 12)
    chex.assert_shape(frames, (3, 12, 4))
    chex.assert_shape(mask, (3, 12))
    for i in range(3):
        ref = np.repeat(h[i], d[i], axis=0)[:12]  # numpy's repeat is the definition
        n = len(ref)
        assert n == min(d[i].sum(), 12)
        np.testing.assert_array_equal(frames[i, :n], ref)
        np.testing.assert_array_equal(frames[i, n:], 0.0)
        np.testing.assert_array_equal(mask[i], (np.arange(12) < n).astype(np.float32))
    # phoneme 1 has duration 0: skipped; frames 0 0 2 2 2 3
    np.testing.assert_array_equal(frames[0, :6], h[0, [0, 0, 2, 2, 2, 3]])
    # new values, same shapes: no retrace; max_frames is static
    frames2, mask2 = lr(h + 1.0, d, 12)
    np.testing.assert_array_equal(mask2, mask)


def test_length_regulate_bad_inputs():
    h = np.zeros((2, 3, 4), np.float32)
    d = np.ones((2, 3), np.int32)
    for call, exc, match in [
        (lambda: length_regulate(h, d.astype(np.float32), 5), TypeError, "durations"),
        (lambda: length_regulate(h, d[:, :2], 5), ValueError, "durations"),
        (lambda: length_regulate(h[0], d, 5), ValueError, "h must"),
        (lambda: length_regulate(h, d, 5.0), TypeError, "max_frames"),
        (lambda: length_regulate(h, d, 0), ValueError, "max_frames"),
    ]:
        with pytest.raises(exc, match=match):
            call()


# ------------------------------------------------------------------------------------ DiffNet


def _diffnet_fwd(cfg):
    """The un-jitted apply (for use inside other jitted functions)."""
    graphdef, _ = _abstract(DiffNet, cfg)
    return lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c)


@functools.cache
def _diffnet(cfg):
    """(random nonzero params, jitted apply)."""
    return _random_params(_abstract(DiffNet, cfg)[1]), jit(_diffnet_fwd(cfg))


def _diffnet_inputs(lengths, f, seed=0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    x = rng.normal(size=(b, f, DCFG.in_dims)).astype(np.float32)
    c = rng.normal(size=(b, f, DCFG.cond_dim)).astype(np.float32)
    return x, np.array([3.0, 0.37], np.float32)[:b], {"cond": c, "mask": _lengths_mask(lengths, f)}


def _diffnet_param_formula(m, c, n, e):
    """Parameters of DiffNet from its layer sizes (in_dims m, channels c, layers n, cond e)."""
    conv = lambda i, o, k=1: k * i * o + o  # noqa: E731
    layer = conv(c, c) + conv(c, 2 * c, 3) + conv(e, 2 * c) + conv(c, 2 * c)
    return conv(m, c) + conv(c, 4 * c) + conv(4 * c, c) + n * layer + conv(c, c) + conv(c, m)


def test_diffnet_shapes_and_parameter_counts():
    for cfg in (DCFG, dataclasses.replace(DCFG, dtype=jnp.bfloat16)):
        graphdef, abstract = _abstract(DiffNet, cfg)
        x = jax.ShapeDtypeStruct((2, 7, cfg.in_dims), jnp.float32)
        c = {"cond": jax.ShapeDtypeStruct((2, 7, cfg.cond_dim), jnp.float32),
             "mask": jax.ShapeDtypeStruct((2, 7), jnp.float32)}
        for t in (jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)):
            out = jax.eval_shape(lambda p, x, t, c, g=graphdef: nnx.merge(g, p)(x, t, c),
                                 abstract, x, t, c)
            chex.assert_shape(out, (2, 7, cfg.in_dims))
            chex.assert_type(out, jnp.float32)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
        n = count_params(nnx.merge(graphdef, abstract))
        assert n == _diffnet_param_formula(cfg.in_dims, cfg.residual_channels,
                                           cfg.residual_layers, cfg.cond_dim)
    # ProDiff / DiffSinger: 80 mel bins, 256 channels, 20 layers, 256-wide condition
    n = count_params(nnx.eval_shape(lambda: DiffNet(diffnet_prodiff(), rngs=nnx.Rngs(0))))
    assert n == _diffnet_param_formula(80, 256, 20, 256) == 15_086_416


def test_diffnet_fresh_net_predicts_zero():
    # the real initialisers of a tiny net, built as one program (an rbg key compiles fast)
    cfg = diffnet_small(cond_dim=4, in_dims=3, residual_layers=2, residual_channels=8)
    init = jit(lambda key: nnx.split(DiffNet(cfg, rngs=nnx.Rngs(key)), nnx.Param)[1])
    params = init(jax.random.key(0, impl="rbg"))
    out_layer = params["output_projection"]
    assert not np.any(out_layer["kernel"][...]) and not np.any(out_layer["bias"][...])
    assert np.any(params["input_projection"]["kernel"][...])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 3)).astype(np.float32)
    cond = {"cond": rng.normal(size=(2, 6, 4)).astype(np.float32),
            "mask": _lengths_mask([6, 4], 6)}
    out = jit(_diffnet_fwd(cfg))(params, x, np.array([1.0, 7.0], np.float32), cond)
    chex.assert_shape(out, x.shape)
    np.testing.assert_array_equal(out, 0.0)


def test_diffnet_real_frames_ignore_padding():
    params, apply = _diffnet(DCFG)
    lengths = [16, 11]
    x, t, cond = _diffnet_inputs(lengths, 16)
    y = np.asarray(apply(params, x, t, cond))
    real = cond["mask"][..., None] > 0
    assert np.min(np.abs(y[real[..., 0]]).max(-1)) > 1e-3  # nonzero on every real frame
    np.testing.assert_array_equal(y[~real[..., 0]], 0.0)  # zero on padding

    # (a) other padding content in x and cond
    rng = np.random.default_rng(1)
    x2 = np.where(real, x, 100.0 * rng.normal(size=x.shape)).astype(np.float32)
    c2 = np.where(real, cond["cond"], rng.normal(size=cond["cond"].shape)).astype(np.float32)
    y2 = np.asarray(apply(params, x2, t, {"cond": c2, "mask": cond["mask"]}))
    np.testing.assert_array_equal(y2, y)

    # (b) more padding frames
    pad = lambda a: np.concatenate([a, np.ones((2, 7) + a.shape[2:], a.dtype)], 1)  # noqa: E731
    y3 = np.asarray(apply(params, pad(x), t,
                          {"cond": pad(cond["cond"]), "mask": _lengths_mask(lengths, 23)}))
    np.testing.assert_allclose(y3[:, :16], y, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(y3[:, 16:], 0.0)

    # (c) the unpadded sequence alone gives the same real frames
    n = lengths[1]
    y4 = np.asarray(apply(params, x[1:, :n], t[1:],
                          {"cond": cond["cond"][1:, :n], "mask": np.ones((1, n), np.float32)}))
    np.testing.assert_allclose(y4[0], y[1, :n], rtol=1e-5, atol=1e-5)

    # the test has teeth: a change on the last real frame reaches earlier frames
    x5 = x.copy()
    x5[1, n - 1] += 1.0
    y5 = np.asarray(apply(params, x5, t, cond))
    assert np.abs(y5[1, n - 2] - y[1, n - 2]).max() > 1e-4


def test_diffnet_depends_on_noise_level_and_cond():
    params, apply = _diffnet(DCFG)
    x, t, cond = _diffnet_inputs([16, 11], 16)
    w = np.random.default_rng(2).normal(size=x.shape).astype(np.float32)

    @jit
    def grads(t, c):
        fwd = _diffnet_fwd(DCFG)
        return jax.grad(lambda t, c: jnp.sum(fwd(params, x, t, {"cond": c,
                                                               "mask": cond["mask"]}) * w),
                        argnums=(0, 1))(t, c)

    g_t, g_c = (np.asarray(g) for g in grads(t, cond["cond"]))
    assert np.all(np.abs(g_t) > 1e-4), g_t  # a continuous noise level is used
    real = cond["mask"] > 0
    assert np.min(np.abs(g_c[real]).max(-1)) > 1e-5  # every real frame's condition is used
    np.testing.assert_array_equal(g_c[~real], 0.0)  # padded conditions are not
    y = apply(params, x, t, cond)
    assert np.abs(apply(params, x, t + 1.0, cond) - y).max() > 1e-3


def test_diffnet_bad_inputs_name_the_argument():
    net = nnx.merge(*_abstract(DiffNet, DCFG))
    x, t, cond = _diffnet_inputs([5, 3], 5)
    c, m = cond["cond"], cond["mask"]
    for call, exc, match in [
        (lambda: net(x[0], t, cond), ValueError, "x must"),
        (lambda: net(x[..., :3], t, cond), ValueError, "in_dims"),
        (lambda: net(x, np.zeros(3, np.float32), cond), ValueError, "noise_level"),
        (lambda: net(x, t, c), TypeError, "cond must be a dict"),
        (lambda: net(x, t, {"mask": m}), ValueError, r"cond\['cond'\]"),
        (lambda: net(x, t, {"cond": c[:, :4], "mask": m}), ValueError, r"cond\['cond'\]"),
        (lambda: net(x, t, {"cond": c[..., :2], "mask": m}), ValueError, "cond_dim"),
        (lambda: net(x, t, {"cond": c, "mask": m[:, :4]}), ValueError, r"cond\['mask'\]"),
        (lambda: net(x, t, {"cond": c, "mask": m, "spk": m}), ValueError, "unknown"),
    ]:
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("field, value", [
    ("residual_channels", 7), ("residual_layers", 0), ("cond_dim", 0), ("dilation_cycle", 0),
    ("in_dims", 2.0), ("dtype", jnp.int32),
])
def test_diffnet_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        DiffNetConfig(**{field: value})


# -------------------------------------------------------------------------------- FastSpeech 2

PHONES, FRAMES = 8, 24


def _fs2_fwd(cfg):
    """The un-jitted apply (for use inside other jitted functions)."""
    graphdef, _ = _abstract(FastSpeech2, cfg)

    def apply(params, phonemes, mask, max_frames, durations=None, log_f0=None, energy=None,
              key=None):
        return nnx.merge(graphdef, params)(phonemes, mask, max_frames=max_frames,
                                           durations=durations, log_f0=log_f0, energy=energy,
                                           key=key)

    return apply


@functools.cache
def _fs2(cfg):
    """(random nonzero params, jitted apply with static max_frames)."""
    params = _random_params(_abstract(FastSpeech2, cfg)[1])
    return params, jit(_fs2_fwd(cfg), static_argnames="max_frames")


def _fs2_inputs(lengths, p=PHONES, f=FRAMES, seed=0):
    """Phonemes, mask, durations (sum <= f), log-F0 and energy for a padded batch."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    mask = _lengths_mask(lengths, p)
    phonemes = np.where(mask > 0, rng.integers(1, NUM_SYMBOLS, size=(b, p)), 0).astype(np.int32)
    durations = (rng.integers(0, 4, size=(b, p)) * mask).astype(np.int32)
    assert durations.sum(1).max() <= f
    log_f0 = rng.normal(size=(b, f)).astype(np.float32)
    energy = rng.normal(size=(b, f)).astype(np.float32)
    return phonemes, mask, durations, log_f0, energy


def _fs2_param_formula(cfg: FastSpeech2Config):
    h, c, k = cfg.hidden, cfg.predictor_channels, cfg.predictor_kernel
    lin = lambda i, o, k=1: k * i * o + o  # noqa: E731
    block = 4 * lin(h, h) + lin(h, cfg.ffn_dim, cfg.ffn_kernel) + lin(cfg.ffn_dim, h) + 4 * h
    layers = lin(h, c, k) + 2 * c + (cfg.predictor_layers - 1) * (lin(c, c, k) + 2 * c)
    predictors = 3 * layers + lin(c, 1) + lin(c, 2) + lin(c, 1)
    embeds = (cfg.num_symbols + cfg.pitch_bins + cfg.energy_bins) * h
    return embeds + cfg.encoder_layers * block + predictors


def test_fastspeech2_shapes_and_parameter_counts():
    b, p, f = 2, 6, 15
    for cfg in (FCFG, dataclasses.replace(FCFG, dtype=jnp.bfloat16)):
        graphdef, abstract = _abstract(FastSpeech2, cfg)
        ph = jax.ShapeDtypeStruct((b, p), jnp.int32)
        m = jax.ShapeDtypeStruct((b, p), jnp.float32)
        d = jax.ShapeDtypeStruct((b, p), jnp.int32)
        v = jax.ShapeDtypeStruct((b, f), jnp.float32)
        for given in ((None, None, None), (d, v, v)):
            out = jax.eval_shape(
                lambda params, ph, m, d, lf0, e, g=graphdef: nnx.merge(g, params)(
                    ph, m, max_frames=f, durations=d, log_f0=lf0, energy=e),
                abstract, ph, m, *given)
            assert set(out) == {"cond", "frame_mask", "log_duration", "durations", "log_f0",
                                "uv_logit", "energy"}
            chex.assert_shape(out["cond"], (b, f, cfg.hidden))
            chex.assert_shape([out["frame_mask"], out["log_f0"], out["uv_logit"],
                               out["energy"]], (b, f))
            chex.assert_shape([out["log_duration"], out["durations"]], (b, p))
            chex.assert_type(out["durations"], jnp.int32)
            chex.assert_type([out[k] for k in out if k != "durations"], jnp.float32)
        assert count_params(nnx.merge(graphdef, abstract)) == _fs2_param_formula(cfg)
    cfg = fastspeech2_prodiff(80)
    n = count_params(nnx.eval_shape(lambda: FastSpeech2(cfg, rngs=nnx.Rngs(0))))
    assert n == _fs2_param_formula(cfg) == 12_884_484


def _compare_real(out, ref, lengths, n_frames):
    """Outputs agree on real phonemes / frames; padded positions are zero."""
    for i, (n, nf) in enumerate(zip(lengths, n_frames, strict=True)):
        for k in ("log_duration", "durations"):
            np.testing.assert_allclose(out[k][i, :n], ref[k][i, :n], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(out[k][i, n:], 0)
        for k in ("cond", "log_f0", "uv_logit", "energy", "frame_mask"):
            np.testing.assert_allclose(out[k][i, :nf], ref[k][i, :nf], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(out[k][i, nf:], 0)


def test_fastspeech2_teacher_forcing_ignores_padding():
    params, apply = _fs2(FCFG)
    lengths = [PHONES, 5]
    ph, mask, dur, lf0, en = _fs2_inputs(lengths)
    out = jax.device_get(apply(params, ph, mask, FRAMES, dur, lf0, en))
    n_frames = dur.sum(1)
    np.testing.assert_array_equal(out["frame_mask"].sum(1), n_frames)  # teacher forcing
    np.testing.assert_array_equal(out["durations"], dur)
    assert np.abs(out["cond"][1, : n_frames[1]]).max(-1).min() > 1e-3
    _compare_real(out, out, lengths, n_frames)  # padding is zero

    # padded ids changed, out-of-vocabulary ones included (the mask says what is padding)
    ph2 = ph.copy()
    ph2[1, 5:] = [3, NUM_SYMBOLS + 100, -7]
    _compare_real(jax.device_get(apply(params, ph2, mask, FRAMES, dur, lf0, en)), out,
                  lengths, n_frames)

    # more padding phonemes and frames
    p3, f3 = PHONES + 3, FRAMES + 6
    grow = lambda a, n, v: np.concatenate([a, np.full((2, n), v, a.dtype)], 1)  # noqa: E731
    out3 = jax.device_get(apply(params, grow(ph, 3, 5), _lengths_mask(lengths, p3), f3,
                                grow(dur, 3, 2), grow(lf0, 6, 1.0), grow(en, 6, -1.0)))
    _compare_real(out3, out, lengths, n_frames)


def test_fastspeech2_given_pitch_and_energy_replace_the_predictions():
    params, apply = _fs2(FCFG)
    ph, mask, dur, lf0, en = _fs2_inputs([PHONES, 5])
    out = apply(params, ph, mask, FRAMES, dur, lf0, en)
    # changing the given values changes cond, not the predictions of pitch from the encoder
    out2 = apply(params, ph, mask, FRAMES, dur, -lf0, en)
    np.testing.assert_array_equal(out2["log_f0"], out["log_f0"])
    assert np.abs(out2["cond"] - out["cond"]).max() > 1e-3
    out3 = apply(params, ph, mask, FRAMES, dur, lf0, -en)
    np.testing.assert_array_equal(out3["energy"], out["energy"])
    assert np.abs(out3["cond"] - out["cond"]).max() > 1e-3


@functools.cache
def _fs2_infer(cfg):
    graphdef, _ = _abstract(FastSpeech2, cfg)

    @jit
    @chex.assert_max_traces(n=1)
    def infer(params, phonemes, mask):
        return nnx.merge(graphdef, params)(phonemes, mask, max_frames=FRAMES)

    return infer


def test_fastspeech2_predicted_durations_under_jit():
    params, _ = _fs2(FCFG)
    infer = _fs2_infer(FCFG)
    lengths = [PHONES, 5]
    ph, mask, *_ = _fs2_inputs(lengths)
    out = jax.device_get(infer(params, ph, mask))
    ref = np.clip(np.round(np.exp(out["log_duration"]) - 1.0), 0, FRAMES) * mask
    np.testing.assert_array_equal(out["durations"], ref.astype(np.int32))
    assert out["durations"].sum() > 0
    np.testing.assert_array_equal(out["frame_mask"].sum(1),
                                  np.minimum(out["durations"].sum(1), FRAMES))
    # padded ids do not change the predicted durations, hence nor the frames
    ph2 = ph.copy()
    ph2[1, 5:] = 11
    _compare_real(jax.device_get(infer(params, ph2, mask)), out, lengths,
                  out["frame_mask"].sum(1).astype(int))

    # a duration predictor that predicts 0 everywhere: every frame is padding, nothing breaks
    def silence(path, a):
        key = jax.tree_util.keystr(path)
        if "duration_predictor" in key and "linear" in key:
            return jnp.full_like(a, -10.0 if "bias" in key else 0.0)
        return a

    out0 = jax.device_get(infer(jax.tree_util.tree_map_with_path(silence, params), ph, mask))
    np.testing.assert_array_equal(out0["durations"], 0)
    np.testing.assert_array_equal(out0["frame_mask"], 0.0)
    for k in ("cond", "log_f0", "uv_logit", "energy"):
        np.testing.assert_array_equal(out0[k], 0.0)
    assert np.all(np.isfinite(out0["log_duration"]))


@functools.cache
def _fs2_train_step():
    """jit(value_and_grad) of a training-like loss of FCFG (teacher forced; aux: outputs)."""
    apply = _fs2_fwd(FCFG)
    ph, mask, dur, lf0, en = _fs2_inputs([PHONES, 5])
    w = np.random.default_rng(3).normal(size=(2, FRAMES, FCFG.hidden)).astype(np.float32)

    def loss(params, key):
        out = apply(params, ph, mask, FRAMES, dur, lf0, en, key)
        target = np.log1p(dur).astype(np.float32)
        value = (jnp.sum(out["cond"] * w) + jnp.sum((out["log_duration"] - target) ** 2)
                 + jnp.sum((out["log_f0"] - lf0) ** 2) + jnp.sum(out["uv_logit"] ** 2)
                 + jnp.sum((out["energy"] - en) ** 2))
        return value, out

    return jit(jax.value_and_grad(loss, has_aux=True))


def test_fastspeech2_dropout_only_with_a_key():
    params, apply = _fs2(FCFG)
    ph, mask, dur, lf0, en = _fs2_inputs([PHONES, 5])
    plain = jax.device_get(apply(params, ph, mask, FRAMES, dur, lf0, en))
    step = _fs2_train_step()
    k1, k2 = jax.random.key(1, impl="rbg"), jax.random.key(2, impl="rbg")  # fast to compile
    a, b, c = (jax.device_get(step(params, k)[0][1]) for k in (k1, k1, k2))
    chex.assert_trees_all_equal(a, b)  # deterministic given the key
    for k in ("cond", "log_duration", "log_f0", "energy"):
        assert np.abs(a[k] - plain[k]).max() > 1e-3, k
        assert np.abs(a[k] - c[k]).max() > 1e-3, k
    # dropout never touches padding
    _compare_real(a, a, [PHONES, 5], dur.sum(1))


def test_fastspeech2_gradients_reach_every_parameter():
    params, _ = _fs2(FCFG)
    ph, mask, *_ = _fs2_inputs([PHONES, 5])
    _, g = _fs2_train_step()(params, jax.random.key(0, impl="rbg"))
    flat = jax.tree_util.tree_leaves_with_path(g)
    groups = {"embed", "encoder", "duration_predictor", "pitch_predictor",
              "energy_predictor", "pitch_embed", "energy_embed"}
    assert {p[0].key for p, _ in flat} == groups
    for path, leaf in flat:
        leaf = np.asarray(leaf)
        assert leaf.dtype == np.float32 and np.all(np.isfinite(leaf))
        assert np.any(leaf != 0), jax.tree_util.keystr(path)
    # ids never used by a real phoneme (the padding id 0 included) get no gradient
    used = np.unique(ph[mask > 0])
    unused = np.setdiff1d(np.arange(NUM_SYMBOLS), used)
    assert 0 in unused
    np.testing.assert_array_equal(np.asarray(g["embed"]["embedding"][...])[unused], 0.0)


def test_fastspeech2_bad_inputs_name_the_argument():
    net = nnx.merge(*_abstract(FastSpeech2, FCFG))
    ph, mask, dur, lf0, en = _fs2_inputs([PHONES, 5])
    call = functools.partial(net, max_frames=FRAMES)
    for fn, exc, match in [
        (lambda: call(ph.astype(np.float32), mask), TypeError, "phonemes"),
        (lambda: call(ph[0], mask), ValueError, "phonemes"),
        (lambda: call(ph, mask[:, :3]), ValueError, "phone_mask"),
        (lambda: call(ph, mask, durations=dur[:, :3]), ValueError, "durations"),
        (lambda: call(ph, mask, durations=dur.astype(np.float32)), TypeError, "durations"),
        (lambda: call(ph, mask, log_f0=lf0[:, :5]), ValueError, "log_f0"),
        (lambda: call(ph, mask, log_f0=lf0.astype(np.int32)), TypeError, "log_f0"),
        (lambda: call(ph, mask, energy=en[:1]), ValueError, "energy"),
        (lambda: net(ph, mask, max_frames=None), TypeError, "max_frames"),
        (lambda: net(ph, mask, max_frames=0), ValueError, "max_frames"),
    ]:
        with pytest.raises(exc, match=match):
            fn()
    short = nnx.merge(*_abstract(FastSpeech2, dataclasses.replace(FCFG, max_positions=4)))
    with pytest.raises(ValueError, match="max_positions"):
        short(ph, mask, max_frames=FRAMES)


@pytest.mark.parametrize("field, value", [
    ("num_symbols", 1), ("hidden", 30), ("heads", 0), ("dropout", 1.0),
    ("predictor_dropout", -0.1), ("pitch_bins", 1), ("log_f0_range", (1.0, -1.0)),
    ("energy_range", (0.0,)), ("ffn_kernel", 0), ("dtype", jnp.int32),
])
def test_fastspeech2_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(fastspeech2_small(NUM_SYMBOLS, heads=4), **{field: value})
