"""Sharded parameters (FSDP) on 8 fake CPU devices: the 2-D ("data", "fsdp") mesh, the sharding
rule, the train step against the replicated one, per-device memory, checkpoints across layouts
and the ``config.train.fsdp`` flag through the training loop."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import nets
from dpm.training import (
    FSDP_MIN_SIZE,
    Checkpointer,
    fast_compile_options,
    fsdp_sharding,
    fsdp_size,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
    shard_state,
    state_shardings,
)

FAST = fast_compile_options()
N_DEVICES = 8


def test_mesh_is_data_by_fsdp():
    mesh = make_mesh(fsdp=4)
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (2, 4)
    assert fsdp_size(mesh) == 4 and fsdp_size(make_mesh()) == 1
    # consecutive devices share a data-parallel row
    assert [d.id for d in mesh.devices[0]] == [d.id for d in jax.devices()[:4]]
    assert make_mesh(fsdp=1).axis_names == ("data",)  # today's 1-D mesh
    with pytest.raises(ValueError, match=r"fsdp=3 must divide the number of devices \(8\)"):
        make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="fsdp must be an int >= 1, got 0"):
        make_mesh(fsdp=0)
    # the batch is split over both axes: every device gets its own examples
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = shard_batch({"x": x}, mesh)["x"]
    assert batch.sharding.spec == PartitionSpec(("data", "fsdp"))
    for shard in batch.addressable_shards:
        i = list(mesh.devices.flat).index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i : 2 * i + 2])


@pytest.mark.parametrize(
    ("shape", "spec"),
    [
        ((3, 8), (None, "fsdp")),  # the only divisible axis
        ((12, 8), ("fsdp",)),  # the largest divisible axis
        ((6, 8), (None, "fsdp")),  # the largest axis (6) is not divisible: the next one
        ((5, 4, 8), (None, None, "fsdp")),
        ((3, 3, 16, 16), (None, None, "fsdp")),  # a tie: the leading one
        ((8,), ("fsdp",)),
        ((6, 10), ()),  # no axis divisible by 4: replicated
        ((), ()),  # a scalar: replicated
    ],
)
def test_sharding_rule_largest_divisible_axis(shape, spec):
    mesh = make_mesh(fsdp=4)
    s = fsdp_sharding(shape, mesh, min_size=1)
    assert s.spec == PartitionSpec(*spec) and s.mesh == mesh
    # on a mesh without an fsdp axis everything is replicated
    assert fsdp_sharding(shape, make_mesh(), min_size=1).spec == PartitionSpec()


def test_sharding_rule_keeps_small_leaves_replicated():
    mesh = make_mesh(fsdp=4)
    assert FSDP_MIN_SIZE == 1024
    assert fsdp_sharding((32, 32), mesh).spec == PartitionSpec("fsdp")  # 1024 elements
    assert fsdp_sharding((4, 255), mesh).spec == PartitionSpec()  # 1020 < FSDP_MIN_SIZE
    assert fsdp_sharding((256,), mesh).spec == PartitionSpec()  # a bias
    assert fsdp_sharding((256,), mesh, min_size=256).spec == PartitionSpec("fsdp")


def test_state_shardings_cover_params_ema_and_moments_and_refuse_flat_moments():
    mesh = make_mesh(fsdp=4)
    params = {"w": jnp.ones((16, 128)), "b": jnp.zeros((128,))}
    state = init_train_state(params, make_optimizer(0.1, total_steps=4, flatten=False),
                             jax.random.key(0))
    specs = jax.tree.map(lambda s: s.spec, state_shardings(state, mesh))
    w, b = PartitionSpec(None, "fsdp"), PartitionSpec()
    assert specs.params == specs.ema_params == {"w": w, "b": b}
    adam = specs.opt_state[0][1]
    assert adam.mu == adam.nu == {"w": w, "b": b} and adam.count == PartitionSpec()
    assert specs.step == specs.key == specs.skipped == PartitionSpec()
    # the same from the abstract state
    abstract = jax.eval_shape(lambda: state)
    assert jax.tree.map(lambda s: s.spec, state_shardings(abstract, mesh)) == specs
    # the default optimizer ravels all moments into one vector: refused, naming the argument
    flat = init_train_state(params, make_optimizer(0.1, total_steps=4), jax.random.key(0))
    with pytest.raises(ValueError, match=r"opt_state.*one vector of 2176 elements.*flatten=False"):
        state_shardings(flat, mesh)
    with pytest.raises(ValueError, match="flatten=False"):
        shard_state(flat, mesh)
    # ... which is fine for a replicated state
    assert all(s.spec == PartitionSpec() for s in jax.tree.leaves(state_shardings(flat,
                                                                                  make_mesh())))


# --- the train step: data=2 x fsdp=4 against the replicated 8-device step -----------------------

DIM, WIDTH = 8, 64


def _mlp():
    return nets.init_params(nets.MLP, DIM, WIDTH, 1, seed=0)


def _denoising_loss(graphdef):
    def loss(params, batch, key, teacher):
        # a key-dependent loss with a frozen extra network (a teacher): both layouts must draw
        # the same noise and see the same teacher
        x = batch["x"]
        sigma = jnp.exp(jax.random.normal(jax.random.fold_in(key, 1), (x.shape[0],)))
        x_t = x + sigma[:, None] * jax.random.normal(key, x.shape)
        target = x + 0.1 * nnx.merge(graphdef, teacher)(x, sigma)
        pred = nnx.merge(graphdef, params)(x_t, sigma)
        return jnp.mean((pred - target) ** 2, axis=-1)

    return loss


def _batch(i):
    rng = np.random.default_rng(100 + i)
    return {"x": rng.normal(size=(32, DIM)).astype(np.float32)}


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_fsdp_step_equals_replicated_step():
    graphdef, params = _mlp()
    teacher = _copy(params)
    opt = make_optimizer(1e-2, total_steps=10, warmup_steps=2, weight_decay=0.01, flatten=False)
    train_step = make_train_step(_denoising_loss(graphdef), opt, ema_decay=0.9)

    def run(mesh, place):
        chex.clear_trace_counter()
        step = jit_train_step(chex.assert_max_traces(train_step, n=1), mesh,
                              compiler_options=FAST)
        state = place(init_train_state(_copy(params), opt, jax.random.key(0)), mesh)
        extra = place(teacher, mesh)
        for i in range(3):  # compiled once, the later calls reuse it
            state, metrics = step(state, shard_batch(_batch(i), mesh), extra)
        return state, metrics

    s_rep, m_rep = run(make_mesh(), replicate)
    mesh = make_mesh(fsdp=4)
    s_fsdp, m_fsdp = run(mesh, shard_state)

    # equal up to the order of the gradient sums (Adam's normalisation lifts a rounding of a
    # near-zero gradient to ~1e-7 of a parameter of size ~0.1)
    chex.assert_trees_all_close(s_fsdp.params, s_rep.params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(s_fsdp.ema_params, s_rep.ema_params, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(s_fsdp.opt_state, s_rep.opt_state, rtol=1e-6, atol=1e-9)
    chex.assert_trees_all_close(m_fsdp, m_rep, rtol=1e-6)
    np.testing.assert_array_equal(jax.random.key_data(s_fsdp.key),
                                  jax.random.key_data(s_rep.key))
    assert int(s_fsdp.step) == 3 and int(s_fsdp.skipped) == 0
    # the output state keeps the fsdp layout, and some of it is actually split
    for leaf, want in zip(jax.tree.leaves(s_fsdp), jax.tree.leaves(state_shardings(s_fsdp, mesh)),
                          strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    assert any(s.spec != PartitionSpec() for s in jax.tree.leaves(state_shardings(s_fsdp, mesh)))
    for v in m_fsdp.values():
        assert v.sharding.is_fully_replicated


def test_fsdp_step_refuses_a_replicated_state():
    graphdef, params = _mlp()
    opt = make_optimizer(1e-2, total_steps=10, flatten=False)
    mesh = make_mesh(fsdp=4)
    step = jit_train_step(make_train_step(_denoising_loss(graphdef), opt), mesh, donate=False,
                          compiler_options=FAST)
    state = replicate(init_train_state(params, opt, jax.random.key(0)), mesh)
    with pytest.raises(ValueError, match="does not match the sharding"):
        step(state, shard_batch(_batch(0), mesh), shard_state(params, mesh))


# --- memory: per-device bytes --------------------------------------------------------------------

def _device_bytes(state) -> list[int]:
    """Bytes on the first device of every leaf of the parameters, EMA and optimizer state."""
    arrays = (state.params, state.ema_params, state.opt_state)
    return [x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(arrays)]


def test_per_device_state_bytes_drop_by_the_fsdp_size():
    # the tiny U-Net of the digits runs (~0.4M parameters), with AdamW's per-leaf moments
    _, params = nets.init_params(nets.UNet, nets.tiny(), seed=0)
    opt = make_optimizer(1e-3, total_steps=10, flatten=False)
    state = init_train_state(params, opt, jax.random.key(0))
    rep = replicate(state, make_mesh())
    mesh = make_mesh(fsdp=4)
    sharded = shard_state(state, mesh)
    full, split = _device_bytes(rep), _device_bytes(sharded)
    layout = state_shardings(state, mesh)
    specs = [s.spec for s in jax.tree.leaves((layout.params, layout.ema_params,
                                              layout.opt_state))]
    n_split = 0
    for f, s, spec in zip(full, split, specs, strict=True):
        if spec == PartitionSpec():
            assert s == f
        else:  # exactly a quarter on each device
            assert 4 * s == f
            n_split += 1
    ratio = sum(full) / sum(split)
    print(f"per-device state bytes: replicated {sum(full)}, fsdp=4 {sum(split)}, "
          f"ratio {ratio:.3f}; {n_split} of {len(specs)} leaves split")
    # 1.1 % of the elements (biases, norm scales, the 1-channel output conv) stay replicated
    assert n_split > 0 and 3.85 < ratio < 4.0, ratio


# --- checkpoints across layouts ------------------------------------------------------------------

def _leaves_np(tree):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype,
                                                                        jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(tree)]


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)


@pytest.mark.parametrize("saved_as", ["replicated", "fsdp"])
def test_checkpoint_restores_into_the_other_layout(tmp_path, saved_as):
    params = {"w1": jnp.asarray(np.random.default_rng(0).normal(size=(16, 128)), jnp.float32),
              "b1": jnp.arange(128, dtype=jnp.float32),
              "w2": jnp.asarray(np.random.default_rng(1).normal(size=(128, 6)), jnp.float32)}
    opt = make_optimizer(0.1, total_steps=4, flatten=False)
    state = init_train_state(params, opt, jax.random.key(7))
    # moments that differ from zero and from the parameters
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x,
                                                 state.opt_state))
    want = _leaves_np(state)
    mesh_rep, mesh_fsdp = make_mesh(), make_mesh(fsdp=4)
    layouts = {"replicated": (mesh_rep, replicate), "fsdp": (mesh_fsdp, shard_state)}
    mesh, place = layouts[saved_as]
    with Checkpointer(tmp_path, config={"m": 1}) as ckpt:
        ckpt.save(1, place(_copy(state), mesh), data_state={"position": 1})
    other_mesh = mesh_fsdp if saved_as == "replicated" else mesh_rep
    shardings = state_shardings(state, other_mesh)
    with Checkpointer(tmp_path, config={"m": 1}) as ckpt:
        restored, data_state, step = ckpt.restore_latest(_abstract(state, shardings))
    assert step == 1 and data_state == {"position": 1}
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
    for x, y in zip(_leaves_np(restored), want, strict=True):
        np.testing.assert_array_equal(x, y)


# --- the config flag through the training loop ---------------------------------------------------

def _config(tmp_steps: int, fsdp: int) -> ml_collections.ConfigDict:
    from experiments._runner import base_config

    c = base_config()
    c.model.base_channels, c.model.channel_mult, c.model.attn_resolutions = 8, (1,), ()
    c.optim.warmup_steps = 0
    t = c.train
    t.steps, t.batch_size, t.log_every, t.ckpt_every, t.fast_compile = tmp_steps, 8, 1, 100, True
    t.fsdp = fsdp
    return c


def test_config_fsdp_trains_through_fit_and_resumes_in_another_layout(tmp_path):
    from experiments._runner import train_denoiser

    trained = train_denoiser(_config(2, 4), str(tmp_path), progress=False)
    state = trained.state
    assert int(state.step) == 2 and trained.steps_run == 2
    mesh = make_mesh(fsdp=4)
    specs = jax.tree.leaves(state_shardings(state, mesh))
    assert any(s.spec != PartitionSpec() for s in specs)
    for leaf, want in zip(jax.tree.leaves(state), specs, strict=True):
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    # the run resumes from its checkpoint on a mesh of another fsdp size
    resumed = train_denoiser(_config(3, 2), str(tmp_path), progress=False)
    assert int(resumed.state.step) == 3 and resumed.steps_run == 1
    w = next(x for x in jax.tree.leaves(resumed.state.params) if x.ndim == 4 and x.size >= 1024)
    assert w.sharding.mesh.shape == {"data": 4, "fsdp": 2}
    assert not w.sharding.is_fully_replicated
    # and on the replicated layout (fsdp=1, a 1-D mesh)
    again = train_denoiser(_config(4, 1), str(tmp_path), progress=False)
    assert int(again.state.step) == 4 and again.steps_run == 1
    w = next(x for x in jax.tree.leaves(again.state.params) if x.ndim == 4 and x.size >= 1024)
    assert w.sharding.is_fully_replicated and len(w.sharding.device_set) == 8


def test_config_fsdp_must_divide_the_device_count():
    from experiments._runner import ConfigError, validate_config

    validate_config(_config(2, 8))
    for bad in (3, 0, 16, -4):
        with pytest.raises(ConfigError, match=r"config\.train\.fsdp must be an int >= 1 dividing "
                                              r"the 8 devices"):
            validate_config(_config(2, bad))
    replicated_run = _config(2, 1)
    del replicated_run.train["fsdp"]  # a config without the field: replicated, as before
    validate_config(replicated_run)
