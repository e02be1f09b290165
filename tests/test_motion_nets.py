"""Tests for the motion networks of EMDM / MDM (nets.motion): the generator transformer, the
discriminator and the evaluator's motion encoder.

Compilation dominates on CPU: nets are built abstractly (`nnx.eval_shape`) and filled from numpy
with nonzero values; every numerical check of a configuration runs as one program through the
tests' fast-compiling `jit`; shapes and parameter counts of the paper-size presets come from
`eval_shape` (nothing is allocated). The outputs are checked against numpy float64 references
written from the architectures' definitions and run on each example's *unpadded* frames only,
so a reference match at the real frames also shows that the padding is ignored.
"""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from flax import nnx
from scipy.special import erf

from nets import (
    MotionDiscriminator,
    MotionDiscriminatorConfig,
    MotionEncoder,
    MotionEncoderConfig,
    MotionTransformer,
    MotionTransformerConfig,
    count_params,
    ddgan_mlp_paper,
    emdm_paper,
    mdm_paper,
    motion_disc_small,
    motion_small,
)

D, FMAX, F, B = 5, 8, 6, 3
LENGTHS = (6, 4, 1)

GEN_EMDM = MotionTransformerConfig(D, FMAX, d_model=16, num_layers=2, num_heads=2, ff_dim=24,
                                   dropout=0.2, activation="selu", cond="text", cond_dim=3,
                                   latent_dim=4, separate_cond_token=True)
GEN_MDM = MotionTransformerConfig(D, FMAX, d_model=16, num_layers=2, num_heads=4, ff_dim=24,
                                  dropout=0.2, activation="gelu", cond="action", num_actions=4,
                                  latent_dim=0, separate_cond_token=False)
DISC_MLP = MotionDiscriminatorConfig(D, FMAX, cond="text", cond_dim=3, time_dim=8,
                                     hidden=(16, 16, 8, 8), norm_groups=(0, 4, 0, 2))
DISC_RED = MotionDiscriminatorConfig(D, FMAX, cond="action", num_actions=4, time_dim=8,
                                     hidden=(16, 8), norm_groups=(4, 0), reduce_channels=3,
                                     reduce_kernel=3)
DISC_TF = MotionDiscriminatorConfig(D, FMAX, cond="text", cond_dim=3, time_dim=8,
                                    kind="transformer", d_model=16, num_layers=2, num_heads=2,
                                    ff_dim=24, activation="gelu")
ENC = MotionEncoderConfig(D, FMAX, width=16, depth=2, num_heads=2, embed_dim=8)


@functools.cache
def _abstract(cls, cfg):
    """(graphdef, abstract params), without allocating or compiling anything."""
    return nnx.split(nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _random_params(abstract, seed=0):
    """Nonzero parameters: fan-in scaled normal kernels, norm scales near 1."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if len(s.shape) >= 2:
            return rng.normal(size=s.shape).astype(np.float32) / np.sqrt(np.prod(s.shape[:-1]))
        centre = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
        return (centre + 0.1 * rng.normal(size=s.shape)).astype(np.float32)

    return jax.device_put(jax.tree_util.tree_map_with_path(fill, abstract))


def _build(cls, cfg, seed=0):
    graphdef, abstract = _abstract(cls, cfg)
    params = _random_params(abstract, seed)
    return graphdef, params, jax.tree.map(lambda a: np.asarray(a, np.float64),
                                          nnx.to_pure_dict(params))


def _mask(lengths=LENGTHS, f=F):
    return np.arange(f)[None, :] < np.asarray(lengths)[:, None]


def _inputs(seed):
    """x, x with other padded content, t and the mask."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, F, D)).astype(np.float32)
    mask = _mask()
    x_pad = np.where(mask[..., None], x, 100.0 * rng.normal(size=x.shape)).astype(np.float32)
    t = rng.uniform(0, 10, size=(B,)).astype(np.float32)
    return x, x_pad, t, mask


# ---------------------------------------------------------------- numpy references (float64)

_ACT = {
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    "gelu": lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2.0))),
    "relu": lambda x: np.maximum(x, 0.0),
}


def _lin(p, h):
    return h @ p["kernel"] + p["bias"]


def _ln(p, h, eps=1e-5):
    mu = h.mean(-1, keepdims=True)
    return (h - mu) / np.sqrt(h.var(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _softmax(a):
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _silu(x):
    return x / (1 + np.exp(-x))


def _pe(pos, d):
    """MDM's positional encoding: pe[2i] = sin(pos w_i), pe[2i+1] = cos(pos w_i),
    w_i = 10000^(-2i/d)."""
    pos = np.asarray(pos, np.float64)
    out = np.zeros((*pos.shape, d))
    w = 10_000.0 ** (-np.arange(0, d, 2) / d)
    out[..., 0::2] = np.sin(pos[..., None] * w)
    out[..., 1::2] = np.cos(pos[..., None] * w)
    return out


def _ddpm_sin(t, dim):
    """DDPM's timestep embedding [sin(t f_k), cos(t f_k)], f_k = 10000^(-k / (dim/2 - 1))."""
    f = np.exp(-math.log(10_000.0) * np.arange(dim // 2) / (dim // 2 - 1))
    a = np.asarray(t, np.float64)[:, None] * f
    return np.concatenate([np.sin(a), np.cos(a)], -1)


def _attention(q, k, v):
    """q, k, v: (L, H, C) -> (L, H * C), no mask."""
    w = _softmax(np.einsum("qhc,khc->hqk", q, k) / np.sqrt(q.shape[-1]))
    return np.einsum("hqk,khc->qhc", w, v).reshape(q.shape[0], -1)


def _post_ln_layer(p, h, heads, act):
    """PyTorch nn.TransformerEncoderLayer(norm_first=False), eval mode, one sequence (L, d)."""
    l, d = h.shape
    qkv = _lin(p["qkv"], h).reshape(l, 3, heads, d // heads)
    h = _ln(p["norm1"], h + _lin(p["out"], _attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])))
    return _ln(p["norm2"], h + _lin(p["fc2"], _ACT[act](_lin(p["fc1"], h))))


def _ref_generator(P, cfg, x, t, c_emb, z):
    """One example's real frames x (L, D) -> (L, D); c_emb (d,) or None; z (nz,) or None."""
    d = cfg.d_model
    t_emb = _lin(P["time_1"], _silu(_lin(P["time_0"], _pe(t, d))))
    if c_emb is None:
        prefix = [t_emb]
    elif cfg.separate_cond_token:
        prefix = [t_emb, c_emb]
    else:
        prefix = [t_emb + c_emb]
    if z is not None:
        h = z
        for i in range(5):
            h = _lin(P["z_layers"][i], h)
            h = np.where(h > 0, h, 0.2 * h)
        prefix.append(h)
    h = np.concatenate([np.stack(prefix), _lin(P["frame_proj"], x)])
    h = h + _pe(np.arange(len(h)), d)
    for i in range(cfg.num_layers):
        h = _post_ln_layer(P["layers"][i], h, cfg.num_heads, cfg.activation)
    return _lin(P["out_proj"], h[len(prefix):])


# ---------------------------------------------------------------- counts derived by hand


def _n(a, b):
    return a * b + b  # a Linear(a -> b)


def _post_ln_count(d, ff, layers):
    # in-projection (3d x d + 3d), out-projection, two feed-forward Linears, two LayerNorms
    return layers * (_n(d, 3 * d) + _n(d, d) + _n(d, ff) + _n(ff, d) + 4 * d)


def _gen_count(c):
    d = c.d_model
    n = 2 * _n(d, d) + _n(c.feature_dim, d) + _n(d, c.feature_dim)
    n += {"text": _n(c.cond_dim, d), "action": c.num_actions * d, "none": 0}[c.cond]
    if c.latent_dim:
        n += _n(c.latent_dim, d) + 4 * _n(d, d)
    return n + _post_ln_count(d, c.ff_dim, c.num_layers)


def _disc_count(c):
    n = 2 * _n(c.time_dim, c.time_dim)
    cw = c.cond_dim + c.num_actions
    if c.kind == "transformer":
        d = c.d_model
        return (n + _n(c.time_dim, d) + (_n(cw, d) if cw else 0) + _n(2 * c.feature_dim, d)
                + _post_ln_count(d, c.ff_dim, c.num_layers) + _n(d, 1))
    if c.reduce_channels is None:
        per_frame = 2 * c.feature_dim
    else:
        per_frame = c.reduce_channels
        n += _n(c.reduce_kernel * 2 * c.feature_dim, c.reduce_channels)
    widths = (c.max_frames * per_frame + c.time_dim + cw, *c.hidden)
    n += sum(_n(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True))
    n += sum(2 * h for h, g in zip(c.hidden, c.norm_groups, strict=True) if g)
    return n + _n(c.hidden[-1], 1)


def _enc_count(c):
    w = c.width
    block = 4 * w + _n(w, 3 * w) + _n(w, w) + _n(w, c.mlp_ratio * w) + _n(c.mlp_ratio * w, w)
    return _n(c.feature_dim, w) + c.depth * block + 2 * w + _n(w, c.embed_dim)


# ---------------------------------------------------------------- shapes, presets, counts


def _gen_call_shape(cfg, b, f, *, dtype_x=jnp.float32):
    model = nnx.eval_shape(lambda: MotionTransformer(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((b, f, cfg.feature_dim), dtype_x)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    cond = {"text": jax.ShapeDtypeStruct((b, cfg.cond_dim), jnp.float32),
            "action": jax.ShapeDtypeStruct((b,), jnp.int32), "none": None}[cfg.cond]
    z = jax.ShapeDtypeStruct((b, cfg.latent_dim), jnp.float32) if cfg.latent_dim else None
    mask = jax.ShapeDtypeStruct((b, f), jnp.bool_)
    out = jax.eval_shape(lambda m, x, t, c, z, mk: m(x, t, c, mask=mk, z=z), model, x, t, cond, z,
                         mask)
    return model, out


@pytest.mark.parametrize("cond", ["text", "action", "none"])
@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("latent_dim", [0, 4])
def test_generator_shapes_and_counts_for_every_layout(cond, separate, latent_dim):
    cfg = MotionTransformerConfig(D, FMAX, d_model=16, num_layers=2, num_heads=2, ff_dim=24,
                                  cond=cond, cond_dim=3 if cond == "text" else 0,
                                  num_actions=4 if cond == "action" else 0,
                                  latent_dim=latent_dim, separate_cond_token=separate)
    assert cfg.num_prefix == 1 + (separate and cond != "none") + (latent_dim > 0)
    model, out = _gen_call_shape(cfg, 2, 7)
    assert out.shape == (2, 7, D) and out.dtype == jnp.float32
    assert count_params(model) == _gen_count(cfg)


def test_generator_bfloat16_compute_keeps_float32_output():
    _, out = _gen_call_shape(motion_small(D, FMAX, cond_dim=3, dtype=jnp.bfloat16), 2, FMAX)
    assert out.shape == (2, FMAX, D) and out.dtype == jnp.float32


def test_generator_presets_build_abstractly_with_hand_counts():
    emdm = emdm_paper()
    assert (emdm.num_layers, emdm.d_model, emdm.num_heads, emdm.ff_dim, emdm.activation,
            emdm.latent_dim, emdm.separate_cond_token, emdm.dropout) == (
                12, 1024, 32, 1024, "selu", 64, True, 0.1)
    mdm = mdm_paper()
    assert (mdm.num_layers, mdm.d_model, mdm.num_heads, mdm.ff_dim, mdm.activation,
            mdm.latent_dim, mdm.separate_cond_token) == (8, 512, 4, 1024, "gelu", 0, False)
    for cfg in (emdm, mdm, motion_small(), emdm_paper(150, 60, cond="action", num_actions=12),
                motion_small(D, FMAX, cond="none", latent_dim=8, separate_cond_token=True)):
        model, out = _gen_call_shape(cfg, 1, cfg.max_frames)
        assert out.shape == (1, cfg.max_frames, cfg.feature_dim)
        assert count_params(model) == _gen_count(cfg)
    # the (rounded) sizes: ~83.0M for EMDM's generator, ~17.9M for MDM's (no CLIP)
    assert _gen_count(emdm) == 83_049_735 and _gen_count(mdm) == 17_880_327


def _disc_call_shape(cfg, b, f):
    model = nnx.eval_shape(lambda: MotionDiscriminator(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((b, f, cfg.feature_dim), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.float32)
    cond = {"text": jax.ShapeDtypeStruct((b, cfg.cond_dim), jnp.float32),
            "action": jax.ShapeDtypeStruct((b,), jnp.int32), "none": None}[cfg.cond]
    out = jax.eval_shape(lambda m, x, t, c: m(x, x, t, c), model, x, t, cond)
    return model, out


def test_discriminator_presets_and_configs_build_abstractly_with_hand_counts():
    paper = ddgan_mlp_paper()
    model, out = _disc_call_shape(paper, 2, 196)
    assert out.shape == (2,) and out.dtype == jnp.float32
    # the paper's first layer: (2 F D + time_dim + cond_dim) x 1024 + 1024
    first = (2 * 196 * 263 + 128 + 512) * 1024 + 1024
    assert first == 106_226_688
    assert model.mlp[0].kernel.shape == (2 * 196 * 263 + 128 + 512, 1024)
    assert count_params(model.mlp[0]) == first
    assert count_params(model) == _disc_count(paper)
    assert [n.groups if n is not None else 0 for n in model.norms] == [0, 32, 0, 16, 0, 0]
    for cfg in (motion_disc_small(), ddgan_mlp_paper(150, 60, cond="action", num_actions=12),
                motion_disc_small(D, FMAX, cond="none"), DISC_MLP, DISC_RED, DISC_TF,
                MotionDiscriminatorConfig(D, FMAX, kind="transformer", d_model=16, num_heads=2)):
        model, out = _disc_call_shape(cfg, 3, cfg.max_frames)
        assert out.shape == (3,)
        assert count_params(model) == _disc_count(cfg)
    # kind="transformer" accepts shorter sequences; the mlp kind pads them
    assert _disc_call_shape(DISC_TF, 2, 3)[1].shape == (2,)
    assert _disc_call_shape(DISC_MLP, 2, 3)[1].shape == (2,)


def test_encoder_builds_abstractly_with_hand_count():
    for cfg in (ENC, MotionEncoderConfig(263, 196)):
        model = nnx.eval_shape(lambda c=cfg: MotionEncoder(c, rngs=nnx.Rngs(0)))
        x = jax.ShapeDtypeStruct((2, cfg.max_frames, cfg.feature_dim), jnp.float32)
        assert jax.eval_shape(lambda m, x: m(x), model, x).shape == (2, cfg.embed_dim)
        assert count_params(model) == _enc_count(cfg)


# ---------------------------------------------------------------- generator numerics


def _gen_outputs(graphdef, params, a):
    g = nnx.merge(graphdef, params)
    x, t, c, mask, z = a["x"], a["t"], a["c"], a["mask"], a["z"]
    out = dict(
        base=g(x, t, c, mask=mask, z=z),
        pad=g(a["x_pad"], t, c, mask=mask, z=z),
        nomask=g(x, t, c, z=z),
        drop=g(x, t, c, mask=mask, z=z, cond_drop=a["drop_all"]),
        null=g(x, t, a["c_null"], mask=mask, z=z, cond_drop=a["null_drop"]),
        mixed=g(x, t, c, mask=mask, z=z, cond_drop=a["drop_mixed"]),
        k1=g(x, t, c, mask=mask, z=z, key=a["k1"]),
        k1b=g(x, t, c, mask=mask, z=z, key=a["k1"]),
        k2=g(x, t, c, mask=mask, z=z, key=a["k2"]),
    )
    if a["z2"] is not None:
        out["z2"] = g(x, t, c, mask=mask, z=a["z2"])
    if a["c_bad"] is not None:
        out["bad"] = g(x, t, a["c_bad"], mask=mask, z=z)
    return out


def _gen_args(cfg, seed):
    rng = np.random.default_rng(seed)
    x, x_pad, t, mask = _inputs(seed)
    drop_all = np.ones((B,), bool)
    a = dict(x=x, x_pad=x_pad, t=t, mask=mask, drop_all=drop_all,
             drop_mixed=np.array([True, False, True]), k1=jax.random.key(seed + 1),
             k2=jax.random.key(seed + 2), z=None, z2=None, c_bad=None)
    if cfg.cond == "text":
        a["c"] = rng.normal(size=(B, cfg.cond_dim)).astype(np.float32)
        a["c_null"], a["null_drop"] = np.zeros_like(a["c"]), None  # the null condition itself
    else:  # actions: dropped, any id gives the null embedding
        a["c"] = np.array([0, 3, 1], np.int32)
        a["c_null"], a["null_drop"] = np.array([2, 2, 0], np.int32), drop_all
        a["c_bad"] = np.array([0, cfg.num_actions, 1], np.int32)  # unknown id in row 1
    if cfg.latent_dim:
        a["z"], a["z2"] = (rng.normal(size=(2, B, cfg.latent_dim)).astype(np.float32))
    return a


def _check_generator(cfg, P, a, out):
    mask, lengths = a["mask"], LENGTHS
    for name in out:
        if name not in ("bad", "nomask"):
            np.testing.assert_array_equal(np.asarray(out[name])[~mask], 0.0)  # padded frames

    def ref(i, dropped=False):
        if cfg.cond == "text":
            c = np.zeros(cfg.cond_dim) if dropped else a["c"][i].astype(np.float64)
            c_emb = _lin(P["cond_proj"], c)  # the null condition is a zero text feature
        else:
            c_emb = 0.0 * P["action_table"][0] if dropped else P["action_table"][a["c"][i]]
        z = None if a["z"] is None else a["z"][i].astype(np.float64)
        n = lengths[i]  # the reference sees the real frames only
        return _ref_generator(P, cfg, a["x"][i, :n].astype(np.float64), a["t"][i], c_emb, z)

    for i, n in enumerate(lengths):
        np.testing.assert_allclose(out["base"][i, :n], ref(i), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out["drop"][i, :n], ref(i, dropped=True), rtol=1e-4,
                                   atol=1e-4)
    # the padding's content changes nothing; mask=None is all frames real
    np.testing.assert_allclose(out["pad"], out["base"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["nomask"][0], out["base"][0], rtol=1e-6, atol=1e-6)
    # cond_drop=True is the null condition; mixed rows pick per example
    np.testing.assert_allclose(out["null"], out["drop"], rtol=1e-6, atol=1e-6)
    keep = a["drop_mixed"][:, None, None]
    np.testing.assert_allclose(out["mixed"], np.where(keep, out["drop"], out["base"]), rtol=1e-6,
                               atol=1e-6)
    # dropout: off without a key, on with one, a function of the key
    np.testing.assert_allclose(out["k1"], out["k1b"], rtol=1e-6, atol=1e-6)
    assert np.abs(out["k1"] - out["base"])[mask].max() > 1e-3
    assert np.abs(out["k1"] - out["k2"])[mask].max() > 1e-3


@pytest.mark.parametrize("cfg", [GEN_EMDM, GEN_MDM], ids=["emdm_text_z", "mdm_action"])
def test_generator_matches_reference_ignores_padding_and_does_not_retrace(cfg):
    graphdef, params, P = _build(MotionTransformer, cfg)
    chex.clear_trace_counter()  # count this configuration's traces only
    run = jit(chex.assert_max_traces(_gen_outputs, n=1), static_argnums=0)
    for seed in (0, 1):  # the second call reuses the compiled program
        a = _gen_args(cfg, seed)
        out = jax.tree.map(np.asarray, run(graphdef, params, a))
        _check_generator(cfg, P, a, out)
        if cfg.latent_dim:  # z is an input of the net iff latent_dim > 0 (else z must be None)
            assert np.abs(out["z2"] - out["base"])[a["mask"]].max() > 1e-3
        else:  # under jit an unknown id cannot be checked: its example is NaN, the rest intact
            valid = a["mask"]
            assert np.isnan(out["bad"][1][valid[1]]).all()
            np.testing.assert_allclose(out["bad"][[0, 2]], out["base"][[0, 2]], rtol=1e-6,
                                       atol=1e-6)


# ---------------------------------------------------------------- discriminator numerics


def _ref_time(P, cfg, t):
    act = _ACT[cfg.activation]
    return _lin(P["time_1"], act(_lin(P["time_0"], _ddpm_sin(t, cfg.time_dim))))


def _ref_cond(cfg, c):
    if cfg.cond == "action":
        return np.eye(cfg.num_actions)[c]
    return np.asarray(c, np.float64)


def _ref_disc_mlp(P, cfg, xp, xt, t, c, mask):
    act = _ACT[cfg.activation]
    mask = mask[..., None]
    xp, xt = np.where(mask, xp, 0.0), np.where(mask, xt, 0.0)
    pad = ((0, 0), (0, cfg.max_frames - xp.shape[1]), (0, 0))
    xp, xt = np.pad(xp, pad), np.pad(xt, pad)
    b = xp.shape[0]
    if cfg.reduce_channels is None:
        flat = [xp.reshape(b, -1), xt.reshape(b, -1)]  # the paper's flatten: x_prev, then x_t
    else:  # 1-D convolution, "SAME" zero padding, over the frames of [x_prev, x_t]
        pair = np.concatenate([xp, xt], -1)
        k = cfg.reduce_kernel
        padded = np.pad(pair, ((0, 0), (k // 2, k // 2), (0, 0)))
        kern = P["reduce"]["kernel"]
        red = sum(padded[:, j:j + cfg.max_frames] @ kern[j] for j in range(k)) + P["reduce"]["bias"]
        flat = [red.reshape(b, -1)]
    h = np.concatenate([*flat, _ref_time(P, cfg, t), _ref_cond(cfg, c)], -1)
    for i, g in enumerate(cfg.norm_groups):
        h = _lin(P["mlp"][i], h)
        if g:
            hg = h.reshape(b, g, -1)
            hg = (hg - hg.mean(-1, keepdims=True)) / np.sqrt(hg.var(-1, keepdims=True) + 1e-5)
            h = hg.reshape(b, -1) * P["norms"][i]["scale"] + P["norms"][i]["bias"]
        h = act(h)
    return _lin(P["head"], h)[:, 0]


def _ref_disc_tf(P, cfg, xp, xt, t, c, lengths):
    temb, cond = _ref_time(P, cfg, t), _ref_cond(cfg, c)
    out = []
    for i, n in enumerate(lengths):  # the real frames only
        tokens = [_lin(P["time_token"], temb[i]), _lin(P["cond_token"], cond[i])]
        frames = _lin(P["frame_proj"], np.concatenate([xp[i, :n], xt[i, :n]], -1))
        h = np.concatenate([np.stack(tokens), frames])
        h = h + _pe(np.arange(len(h)), cfg.d_model)
        for j in range(cfg.num_layers):
            h = _post_ln_layer(P["layers"][j], h, cfg.num_heads, cfg.activation)
        out.append(_lin(P["head"], h.mean(0))[0])
    return np.array(out)


def _disc_outputs(graphdefs, params, a):
    out = {}
    for name, graphdef in graphdefs:
        d = nnx.merge(graphdef, params[name])
        c = a["ids"] if d.config.cond == "action" else a["c"]
        out[name] = d(a["xp"], a["xt"], a["t"], c, mask=a["mask"])
        out[name + "_pad"] = d(a["xp_pad"], a["xt_pad"], a["t"], c, mask=a["mask"])
        out[name + "_nomask"] = d(a["xp"], a["xt"], a["t"], c)
    # the mlp kind zero-pads a short input to max_frames (what a mask does to padded frames)
    d = nnx.merge(graphdefs[0][1], params[graphdefs[0][0]])
    out["short"] = d(a["xp"][:, :4], a["xt"][:, :4], a["t"], a["c"])
    out["bad"] = nnx.merge(graphdefs[1][1], params["red"])(a["xp"], a["xt"], a["t"], a["ids_bad"])
    return out


def test_discriminators_match_reference_and_ignore_padding():
    cfgs = {"mlp": DISC_MLP, "red": DISC_RED, "tf": DISC_TF}
    built = {n: _build(MotionDiscriminator, c, seed=i) for i, (n, c) in enumerate(cfgs.items())}
    graphdefs = tuple((n, built[n][0]) for n in cfgs)
    params = {n: built[n][1] for n in cfgs}
    rng = np.random.default_rng(3)
    xp, xp_pad, t, mask = _inputs(3)
    xt, xt_pad, _, _ = _inputs(4)
    a = dict(xp=xp, xt=xt, xp_pad=xp_pad, xt_pad=xt_pad, t=t, mask=mask,
             c=rng.normal(size=(B, 3)).astype(np.float32), ids=np.array([3, 0, 2], np.int32),
             ids_bad=np.array([3, -1, 2], np.int32))
    out = jax.tree.map(np.asarray, jit(_disc_outputs, static_argnums=0)(graphdefs, params, a))
    x64 = {k: v.astype(np.float64) for k, v in a.items() if k in ("xp", "xt")}
    for name in ("mlp", "red"):
        cfg, P = cfgs[name], built[name][2]
        c = a["ids"] if cfg.cond == "action" else a["c"]
        ref = _ref_disc_mlp(P, cfg, x64["xp"], x64["xt"], t, c, mask)
        np.testing.assert_allclose(out[name], ref, rtol=1e-4, atol=1e-4)
        ref_nomask = _ref_disc_mlp(P, cfg, x64["xp"], x64["xt"], t, c, np.ones_like(mask))
        np.testing.assert_allclose(out[name + "_nomask"], ref_nomask, rtol=1e-4, atol=1e-4)
    ref_tf = _ref_disc_tf(built["tf"][2], DISC_TF, x64["xp"], x64["xt"], t, a["c"], LENGTHS)
    np.testing.assert_allclose(out["tf"], ref_tf, rtol=1e-4, atol=1e-4)
    for name in cfgs:  # with a mask, the padding's content changes nothing
        np.testing.assert_allclose(out[name + "_pad"], out[name], rtol=1e-6, atol=1e-6)
        assert np.abs(out[name + "_nomask"] - out[name]).max() > 1e-4  # padding seen unmasked
    short = _ref_disc_mlp(built["mlp"][2], DISC_MLP, x64["xp"][:, :4], x64["xt"][:, :4], t,
                          a["c"], np.ones((B, 4), bool))
    np.testing.assert_allclose(out["short"], short, rtol=1e-4, atol=1e-4)
    assert np.isnan(out["bad"][1]) and np.isfinite(out["bad"][[0, 2]]).all()
    np.testing.assert_allclose(out["bad"][[0, 2]], out["red_nomask"][[0, 2]], rtol=1e-6,
                               atol=1e-6)


# ---------------------------------------------------------------- motion encoder numerics


def _ref_pre_ln_block(p, h, heads):
    l, d = h.shape
    qkv = _lin(p["qkv"], _ln(p["norm1"], h)).reshape(l, 3, heads, d // heads)
    h = h + _lin(p["proj"], _attention(qkv[:, 0], qkv[:, 1], qkv[:, 2]))
    u = _lin(p["fc1"], _ln(p["norm2"], h))
    gelu = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))  # jax's default
    return h + _lin(p["fc2"], gelu)


def _ref_encoder(P, cfg, x):
    """One example's real frames (L, D) -> (E,) features."""
    h = _lin(P["frame_proj"], x) + _pe(np.arange(len(x)), cfg.width)
    for i in range(cfg.depth):
        h = _ref_pre_ln_block(P["blocks"][i], h, cfg.num_heads)
    return _lin(P["out_proj"], _ln(P["norm"], h).mean(0))


def _enc_outputs(graphdef, params, a):
    e = nnx.merge(graphdef, params)
    return dict(emb=e(a["x"], a["mask"]), feat=e.features(a["x"], a["mask"]),
                pad=e(a["x_pad"], a["mask"]), nomask=e.features(a["x"]))


def test_motion_encoder_matches_reference_ignores_padding_and_is_unit_norm():
    graphdef, params, P = _build(MotionEncoder, ENC)
    x, x_pad, _, mask = _inputs(5)
    a = dict(x=x, x_pad=x_pad, mask=mask)
    out = jax.tree.map(np.asarray, jit(_enc_outputs, static_argnums=0)(graphdef, params, a))
    chex.assert_shape([out["emb"], out["feat"]], (B, ENC.embed_dim))
    for i, n in enumerate(LENGTHS):
        ref = _ref_encoder(P, ENC, x[i, :n].astype(np.float64))
        np.testing.assert_allclose(out["feat"][i], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["nomask"][0], out["feat"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out["emb"], axis=1), 1.0, rtol=1e-5)
    f = out["feat"].astype(np.float64)
    np.testing.assert_allclose(out["emb"], f / np.linalg.norm(f, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["pad"], out["emb"], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- bad input


def _eager(cls, cfg):
    graphdef, params, _ = _build(cls, cfg)
    return nnx.merge(graphdef, params)


def test_generator_bad_input_is_a_clear_error():
    g = _eager(MotionTransformer, GEN_EMDM)
    x, t = np.zeros((2, 4, D), np.float32), np.zeros((2,), np.float32)
    c, z = np.zeros((2, 3), np.float32), np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match=r"x must have shape \(B, F, feature_dim=5\)"):
        g(np.zeros((2, 4, D + 1), np.float32), t, c, z=z)
    with pytest.raises(ValueError, match=r"x has F=9 frames.*max_frames=8"):
        g(np.zeros((2, 9, D), np.float32), t, c, z=z)
    with pytest.raises(ValueError, match=r"z of shape \(2, latent_dim=4\) is required"):
        g(x, t, c)
    with pytest.raises(ValueError, match=r"z must be a float array of shape \(2, 4\)"):
        g(x, t, c, z=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"cond must have shape \(B, cond_dim\) = \(2, 3\)"):
        g(x, t, np.zeros((2, 4), np.float32), z=z)
    with pytest.raises(ValueError, match="cond is required when cond='text'"):
        g(x, t, None, z=z)
    with pytest.raises(TypeError, match="cond must be float text features"):
        g(x, t, np.zeros((2, 3), np.int32), z=z)
    with pytest.raises(ValueError, match="mask must be a bool array of shape"):
        g(x, t, c, z=z, mask=np.ones((2, 4), np.float32))
    with pytest.raises(ValueError, match="cond_drop must be a bool array"):
        g(x, t, c, z=z, cond_drop=np.ones((3,), bool))
    with pytest.raises(ValueError, match=r"t must have shape \(\) or \(2,\)"):
        g(x, np.zeros((3,), np.float32), c, z=z)

    m = _eager(MotionTransformer, GEN_MDM)
    ids = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match=r"unknown action ids \[-1, 4\].*num_actions=4"):
        m(x, t, np.array([4, -1], np.int32))
    with pytest.raises(TypeError, match="cond must be integer action ids"):
        m(x, t, np.zeros((2,), np.float32))
    with pytest.raises(ValueError, match=r"cond must have shape \(2,\) \(action ids\)"):
        m(x, t, np.zeros((2, 1), np.int32))
    with pytest.raises(ValueError, match="z must be None when latent_dim=0"):
        m(x, t, ids, z=z)
    u = _eager(MotionTransformer, motion_small(D, FMAX, cond="none", d_model=8, num_heads=2,
                                               num_layers=1, ff_dim=8))
    with pytest.raises(ValueError, match="cond must be None when cond='none'"):
        u(x, t, ids)
    with pytest.raises(ValueError, match="cond_drop given but cond='none'"):
        u(x, t, cond_drop=np.ones((2,), bool))


def test_discriminator_and_encoder_bad_input_is_a_clear_error():
    d = _eager(MotionDiscriminator, DISC_RED)
    x, t = np.zeros((2, 4, D), np.float32), np.zeros((2,), np.float32)
    ids = np.array([0, 1], np.int32)
    with pytest.raises(ValueError, match=r"x_prev must have shape \(B, F, feature_dim=5\)"):
        d(np.zeros((2, 4, 3), np.float32), x, t, ids)
    with pytest.raises(ValueError, match=r"x_t must have shape \(2, 4, 5\)"):
        d(x, np.zeros((2, 3, D), np.float32), t, ids)
    with pytest.raises(ValueError, match=r"x_prev has F=9 frames.*max_frames=8"):
        d(np.zeros((2, 9, D), np.float32), np.zeros((2, 9, D), np.float32), t, ids)
    with pytest.raises(ValueError, match=r"unknown action ids \[7\]"):
        d(x, x, t, np.array([7, 1], np.int32))
    e = _eager(MotionEncoder, ENC)
    with pytest.raises(ValueError, match=r"x must have shape \(B, F, feature_dim=5\)"):
        e(np.zeros((2, 4, 7), np.float32))
    with pytest.raises(ValueError, match=r"mask rows \[1\] have no real \(True\) frame"):
        e(x, np.array([[True] * 4, [False] * 4]))


@pytest.mark.parametrize("make, match", [
    (lambda: MotionTransformerConfig(D, FMAX, d_model=18, num_heads=4), "divisible by num_heads"),
    (lambda: MotionTransformerConfig(D, FMAX, d_model=15, num_heads=3), "d_model must be even"),
    (lambda: MotionTransformerConfig(D, FMAX, cond="text"), "cond_dim must be >= 1"),
    (lambda: MotionTransformerConfig(D, FMAX, cond="text", cond_dim=3, num_actions=2),
     "num_actions must be 0 when cond='text'"),
    (lambda: MotionTransformerConfig(D, FMAX, cond="audio"), "cond must be one of"),
    (lambda: MotionTransformerConfig(D, FMAX, activation="tanh"), "activation must be one of"),
    (lambda: MotionTransformerConfig(D, FMAX, dropout=1.0), r"dropout must be a number in"),
    (lambda: MotionTransformerConfig(D, 0), "max_frames must be an int >= 1"),
    (lambda: MotionDiscriminatorConfig(D, FMAX, hidden=(16, 12), norm_groups=(0, 5)),
     "norm_groups entries must be 0 or ints dividing"),
    (lambda: MotionDiscriminatorConfig(D, FMAX, hidden=(16,), norm_groups=(0, 0)),
     "one entry per hidden layer"),
    (lambda: MotionDiscriminatorConfig(D, FMAX, kind="transformer", reduce_channels=4),
     "reduce_channels applies to kind='mlp' only"),
    (lambda: MotionDiscriminatorConfig(D, FMAX, kind="cnn"), "kind must be one of"),
    (lambda: MotionDiscriminatorConfig(D, FMAX, cond="action"), "num_actions must be >= 1"),
    (lambda: MotionEncoderConfig(D, FMAX, width=10, num_heads=4), "divisible by num_heads"),
])
def test_configs_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_constructors_reject_the_wrong_config():
    with pytest.raises(TypeError, match="config must be a MotionTransformerConfig"):
        MotionTransformer(ENC, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="config must be a MotionDiscriminatorConfig"):
        MotionDiscriminator(GEN_MDM, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="config must be a MotionEncoderConfig"):
        MotionEncoder(DISC_MLP, rngs=nnx.Rngs(0))


def test_motion_text_model_is_its_two_towers_and_ignores_padding():
    from nets import MotionTextConfig, MotionTextModel, TextEncoderConfig

    cfg = MotionTextConfig(text=TextEncoderConfig(vocab_size=20, max_len=6, width=16, depth=1),
                           motion=MotionEncoderConfig(D, FMAX, width=16, depth=1, embed_dim=8))
    model = MotionTextModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, FMAX, D)), jnp.float32)
    mask = jnp.asarray(np.arange(FMAX)[None] < np.array([[FMAX], [3]]))
    tokens = jnp.asarray([[1, 5, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0]], jnp.int32)
    m, t, scale = model(x, mask, tokens)
    chex.assert_shape((m, t), (2, 8))
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(scale), 1 / 0.07, rtol=1e-5)
    # the motion tower is the MotionEncoder; its features are the un-normalised embedding
    f = model.motion_features(x, mask)
    np.testing.assert_allclose(np.asarray(m), np.asarray(f / jnp.linalg.norm(f, axis=1,
                                                                             keepdims=True)),
                               rtol=1e-5, atol=1e-6)
    # padded frames change nothing
    x2 = x.at[1, 3:].set(100.0)
    np.testing.assert_allclose(np.asarray(model.embed_motion(x2, mask)), np.asarray(m),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="text must be a TextEncoderConfig"):
        MotionTextConfig(text=cfg.motion, motion=cfg.motion)
