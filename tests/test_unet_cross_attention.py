"""U-Net cross-attention to a context sequence (``UNetConfig.context_dim``, ``cond["context"]``).

Few compiles on purpose: one jitted forward + VJP for the cross-attention net, one jitted forward
for the plain net, one small net run eagerly; parameter trees are compared through
``nnx.eval_shape`` (no compile).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nets
from nets._layers import CrossAttnBlock
from tests._fastjit import jit

B, L = 2, 5
BASE = dict(image_size=4, channels=4, base_channels=16, channel_mult=(1, 2), attn_resolutions=(2,))
CROSS = dict(context_dim=32, cross_attn_resolutions=(4, 2))
MASK = np.array([[True, True, True, False, False], [True, False, True, True, False]])


@functools.lru_cache
def _abstract(cfg):
    """(graphdef, abstract parameters) of `UNet(cfg)`, without running an initialiser (cached:
    copy before mutating)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: nets.UNet(cfg, rngs=nnx.Rngs(0))),
                                nnx.Param)
    return graphdef, state


def _paths(cfg):
    """{path: shape} of the parameters of `UNet(cfg)`."""
    state = _abstract(cfg)[1]
    return {jax.tree_util.keystr(p): leaf.shape
            for p, leaf in jax.tree_util.tree_leaves_with_path(state)}


def _is_cross(path: str) -> bool:
    return "cross_attn" in path


def _perturb(params, seed, keep=lambda path: False, scale=0.3):
    """`params` plus N(0, scale^2) noise on every leaf whose path `keep` rejects (numpy: no
    compile)."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    new = [np.asarray(leaf) if keep(jax.tree_util.keystr(p))
           else np.asarray(leaf) + scale * rng.standard_normal(leaf.shape).astype(np.float32)
           for p, leaf in leaves]
    return jax.tree_util.tree_unflatten(treedef, new)


def _without_cross(params, base_cfg):
    """The plain net's parameters: `params` with every cross-attention subtree dropped."""
    def drop(tree):
        if isinstance(tree, dict):
            return {k: drop(v) for k, v in tree.items() if not _is_cross(str(k))}
        return tree

    abstract = jax.tree.map(lambda a: a, _abstract(base_cfg)[1])  # a copy: replaced in place
    nnx.replace_by_pure_dict(abstract, drop(params.to_pure_dict()))
    return abstract


@pytest.fixture(scope="module")
def net():
    """The cross-attention net, its plain twin and the jitted programs shared by the tests."""
    cfg = nets.tiny(**BASE, **CROSS)
    base_cfg = nets.tiny(**BASE)
    graphdef, params = nets.init_params(nets.UNet, cfg, seed=0)
    base_graphdef = _abstract(base_cfg)[0]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 4, 4, 4)).astype(np.float32)
    t = np.array([3.0, 700.0], np.float32)
    cot = rng.standard_normal((B, 4, 4, 4)).astype(np.float32)

    @jit
    def run(params, context, mask):
        """(output, d<output, cot>/d context) of the functional apply."""
        def f(c):
            return nnx.merge(graphdef, params)(x, t, {"context": c, "context_mask": mask})
        out, vjp = jax.vjp(f, context)
        return out, vjp(cot)[0]

    base_apply = jit(lambda p: nnx.merge(base_graphdef, p)(x, t))
    return dict(cfg=cfg, base_cfg=base_cfg, graphdef=graphdef, params=params, x=x, t=t,
                run=run, base_apply=base_apply, base_graphdef=base_graphdef)


def _context(seed):
    return np.random.default_rng(seed).standard_normal((B, L, 32)).astype(np.float32)


# ---- parameter trees ----------------------------------------------------------------------------


def test_context_dim_zero_leaves_the_tree_unchanged():
    plain = _paths(nets.tiny())
    assert _paths(nets.tiny(context_dim=0, cross_attn_resolutions=())) == plain
    assert not any(_is_cross(p) or "context" in p for p in plain)
    # adding cross-attention only adds subtrees: every existing name and shape is kept
    cross = _paths(nets.tiny(**BASE, **CROSS))
    assert {p: s for p, s in cross.items() if not _is_cross(p)} == _paths(nets.tiny(**BASE))


@pytest.mark.parametrize("resolutions, count", [((4, 2), 1 + 1 + 1 + 2 + 2), ((2,), 1 + 1 + 2),
                                                ((), 1)])
def test_cross_attention_placement(resolutions, count):
    cfg = nets.tiny(**BASE, context_dim=32, cross_attn_resolutions=resolutions)
    paths = _paths(cfg)
    outs = [p for p in paths if _is_cross(p) and p.endswith("['proj_out']['kernel'].value")]
    assert len(outs) == count  # down + middle + up blocks of the listed levels
    assert paths["['mid_cross_attn']['kv']['kernel'].value"] == (32, 2 * 32)
    assert paths["['mid_cross_attn']['context_norm']['scale'].value"] == (32,)


def test_context_dim_zero_output_unchanged(net):
    """The plain net computes what the cross-attention net computes with its cross-attention
    output projections at zero (the state at init), whatever the context; the rest of the
    parameters are random so the output is not the trivial zero of a fresh net."""
    p = _perturb(net["params"], seed=1, keep=lambda path: _is_cross(path) and "proj_out" in path)
    mask = np.ones((B, L), bool)
    out_1, grad = net["run"](p, _context(1), mask)
    out_2, _ = net["run"](p, 5.0 * _context(2), mask)
    np.testing.assert_array_equal(out_1, out_2)
    np.testing.assert_array_equal(grad, 0.0)
    assert float(jnp.std(out_1)) > 1e-2
    base = net["base_apply"](_without_cross(p, net["base_cfg"]))
    np.testing.assert_allclose(out_1, base, rtol=1e-5, atol=1e-5)
    # and at init exactly (the whole output is zero there: conv_out is zero-initialised too)
    out_init, grad_init = net["run"](net["params"], _context(1), mask)
    np.testing.assert_array_equal(out_init, net["run"](net["params"], _context(3), mask)[0])
    np.testing.assert_array_equal(grad_init, 0.0)


# ---- the context and its mask -------------------------------------------------------------------


def test_output_depends_on_the_context(net):
    p = _perturb(net["params"], seed=2)
    mask = np.ones((B, L), bool)
    out_1, grad = net["run"](p, _context(1), mask)
    out_2, _ = net["run"](p, _context(2), mask)
    assert float(jnp.max(jnp.abs(out_1 - out_2))) > 1e-3
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.max(jnp.abs(grad))) > 1e-6


def test_masked_tokens_have_no_effect(net):
    p = _perturb(net["params"], seed=3)
    c = _context(4)
    out, grad = net["run"](p, c, MASK)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(grad)))
    # padding values do not matter, and get no gradient
    padded = np.where(MASK[..., None], c, 100.0 * _context(5))
    np.testing.assert_allclose(net["run"](p, padded, MASK)[0], out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[~MASK], 0.0)
    assert np.all(np.abs(np.asarray(grad)[MASK]).max(axis=-1) > 0)
    # a valid token does, for its own example only
    changed = c.copy()
    changed[0, 1] += _context(6)[0, 0]  # not a constant shift: the LayerNorm would remove it
    out_changed = net["run"](p, changed, MASK)[0]
    assert float(jnp.max(jnp.abs(out_changed[0] - out[0]))) > 1e-4
    np.testing.assert_allclose(out_changed[1], out[1], rtol=1e-6, atol=1e-6)


def test_jit_matches_eager_and_an_empty_row_under_jit_is_finite(net):
    # a one-level net, small enough to run eagerly op by op
    cfg = nets.tiny(image_size=2, channels=1, base_channels=8, channel_mult=(1,),
                    attn_resolutions=(2,), context_dim=8, cross_attn_resolutions=(2,))
    graphdef, abstract = _abstract(cfg)  # random parameters, no initialiser to compile
    params = _perturb(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract), seed=6)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((B, 2, 2, 1)).astype(np.float32)
    t = np.array([1.0, 500.0], np.float32)
    cond = {"context": rng.standard_normal((B, 3, 8)).astype(np.float32),
            "context_mask": np.array([[True, True, False], [False, True, True]])}
    eager = nnx.merge(graphdef, params)(x, t, cond)
    jitted = jit(lambda p, x, t, cond: nnx.merge(graphdef, p)(x, t, cond))(params, x, t, cond)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    # under jit a fully masked row cannot be checked (documented): no NaN, just meaningless
    empty = MASK.copy()
    empty[1] = False
    out, grad = net["run"](_perturb(net["params"], seed=8), _context(9), empty)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(grad)))


def test_block_mask_none_is_all_valid_and_fresh_block_is_identity():
    block = CrossAttnBlock(8, 6, 2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(10)
    x = rng.standard_normal((B, 2, 2, 8)).astype(np.float32)
    c = rng.standard_normal((B, 3, 6)).astype(np.float32)
    np.testing.assert_array_equal(block(x, c), x)
    block.proj_out.kernel[...] = rng.standard_normal((8, 8)).astype(np.float32)
    np.testing.assert_allclose(block(x, c, np.ones((B, 3), bool)), block(x, c), rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        CrossAttnBlock(8, 6, 3, rngs=nnx.Rngs(0))


# ---- input errors -------------------------------------------------------------------------------


def _call(net, cond, graphdef="graphdef", params=None):
    params = net["params"] if params is None else params
    return nnx.merge(net[graphdef], params)(net["x"], net["t"], cond)


@pytest.mark.parametrize(
    "cond, match",
    [
        (None, r"cond\['context'\].*required when context_dim=32"),
        ({"context_mask": MASK}, r"cond\['context'\].*required"),
        ({"context": np.zeros((B, L, 16), np.float32)}, r"cond\['context'\].*\(2, L >= 1, 32\)"),
        ({"context": np.zeros((B + 1, L, 32), np.float32)}, r"cond\['context'\].*got float32"),
        ({"context": np.zeros((B, 32), np.float32)}, r"cond\['context'\]"),
        ({"context": np.zeros((B, 0, 32), np.float32)}, r"cond\['context'\]"),
        ({"context": np.zeros((B, L, 32), np.int32)}, r"cond\['context'\] must be a float"),
        ({"context": np.zeros((B, L, 32), np.float32), "context_mask": MASK[:, :4]},
         r"cond\['context_mask'\].*shape \(2, 5\).*got bool\(2, 4\)"),
        ({"context": np.zeros((B, L, 32), np.float32), "context_mask": MASK.astype(np.float32)},
         r"cond\['context_mask'\] must be a bool"),
        ({"context": np.zeros((B, L, 32), np.float32), "context_mask": MASK & [[True], [False]]},
         r"cond\['context_mask'\] rows \[1\] have no valid"),
        ({"context": np.zeros((B, L, 32), np.float32), "text": 1}, r"unknown keys \['text'\]"),
    ],
)
def test_bad_context_is_a_clear_error(net, cond, match):
    with pytest.raises(ValueError, match=match):
        _call(net, cond)


@pytest.mark.parametrize("key", ["context", "context_mask"])
def test_context_given_without_cross_attention_is_an_error(net, key):
    cond = {key: np.zeros((B, L, 32), np.float32) if key == "context" else MASK}
    with pytest.raises(ValueError, match=rf"cond\['{key}'\] given but context_dim=0"):
        _call(net, cond, "base_graphdef", _without_cross(net["params"], net["base_cfg"]))


# ---- config validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(context_dim=-1), "context_dim must be an int >= 0"),
        (dict(context_dim=8.0), "context_dim must be an int >= 0"),
        (dict(context_dim=8, cross_attn_resolutions=(3,)), "cross_attn_resolutions entry 3"),
        (dict(context_dim=8, cross_attn_resolutions=(8,)), "cross_attn_resolutions entry 8"),
        (dict(cross_attn_resolutions=(4,)), "requires context_dim > 0"),
        # self-attention (level 2, middle) fits 32 heads; the cross-attention at level 4 does not
        (dict(num_heads=32, context_dim=8, cross_attn_resolutions=(4,)), "num_heads 32"),
        (dict(head_channels=32, context_dim=8, cross_attn_resolutions=(4,)), "head_channels 32"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        nets.tiny(**{**BASE, **overrides})


def test_config_fields_are_hashable_tuples():
    cfg = nets.tiny(**BASE, context_dim=8, cross_attn_resolutions=[4, 2])
    assert cfg.cross_attn_resolutions == (4, 2)
    hash(cfg)
    assert dataclasses.replace(cfg, context_dim=16).context_dim == 16
    nets.tiny(**BASE, num_heads=32, context_dim=8, cross_attn_resolutions=(2,))  # 32 | 32: fine
