"""Data parallelism on 8 fake CPU devices: mesh, shardings, and the sharded train step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from jax.sharding import PartitionSpec

from dpm.training import (
    batch_sharding,
    init_train_state,
    initialize_distributed,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    process_batch_size,
    replicate,
    replicated,
    shard_batch,
)
from dpm.training import sharding as parallel

FAST = jit.keywords["compiler_options"]  # the tests' fast-compile XLA options

N_DEVICES = 8


def test_mesh_and_shardings():
    assert jax.device_count() == N_DEVICES  # tests/conftest.py fakes 8 CPU devices
    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.devices.shape == (N_DEVICES,)
    assert batch_sharding(mesh).spec == PartitionSpec("data")
    assert replicated(mesh).spec == PartitionSpec()
    sub = make_mesh(jax.devices()[:2], axis_name="batch")
    assert sub.axis_names == ("batch",) and sub.devices.shape == (2,)
    assert batch_sharding(sub).spec == PartitionSpec("batch")
    with pytest.raises(ValueError, match="devices is empty"):
        make_mesh([])


def test_shard_batch_splits_leading_axis_in_order():
    mesh = make_mesh()
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = shard_batch({"x": x, "label": np.arange(16)}, mesh)
    assert batch["x"].shape == (16, 3)
    assert batch["x"].sharding.is_equivalent_to(batch_sharding(mesh), 2)
    for shard in batch["x"].addressable_shards:
        i = mesh.devices.tolist().index(shard.device)
        np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i : 2 * i + 2])
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(16))
    with pytest.raises(ValueError, match=r"\['x'\] has leading \(batch\) size 10.*not divisible"):
        shard_batch({"x": np.zeros((10, 3))}, mesh)
    with pytest.raises(ValueError, match="scalar"):
        shard_batch({"t": np.float32(0.5)}, mesh)


def test_replicate_puts_full_copy_on_every_device():
    mesh = make_mesh()
    tree = replicate({"w": np.arange(6.0).reshape(2, 3)}, mesh)
    assert tree["w"].sharding.is_fully_replicated
    assert len(tree["w"].addressable_shards) == N_DEVICES
    for shard in tree["w"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.arange(6.0).reshape(2, 3))


def test_process_batch_size():
    assert parallel.process_index() == 0 and parallel.process_count() == 1
    assert process_batch_size(64) == 64
    with pytest.raises(ValueError, match="global_batch=12 must be a positive multiple of"):
        process_batch_size(12)
    with pytest.raises(ValueError, match="global_batch"):
        process_batch_size(0)


def _noisy_loss(params, batch, key):
    # a key-dependent loss: the sharded step must draw the same noise as the single-device one
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    noise = 0.1 * jax.random.normal(key, batch["y"].shape)
    return jnp.sum((h @ params["w2"] - batch["y"] - noise) ** 2, axis=-1)


def _params():
    rng = np.random.default_rng(0)
    return {
        "w1": jnp.asarray(rng.normal(size=(3, 8)), jnp.float32),
        "b1": jnp.zeros((8,), jnp.float32),
        "w2": jnp.asarray(0.3 * rng.normal(size=(8, 2)), jnp.float32),
    }


def _batch(i):
    rng = np.random.default_rng(100 + i)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    return {"x": x, "y": np.sin(x[:, :2]).astype(np.float32)}


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_sharded_step_matches_single_device(grad_accum_steps):
    opt = make_optimizer(0.01, total_steps=10, warmup_steps=2, weight_decay=0.01)
    train_step = make_train_step(_noisy_loss, opt, grad_accum_steps=grad_accum_steps)
    state0 = init_train_state(_params(), opt, jax.random.key(0))

    single = jit_train_step(train_step, compiler_options=FAST, donate=False)
    s1 = state0
    for i in range(3):
        s1, m1 = single(s1, _batch(i))

    mesh = make_mesh()
    # donates its input state; traced (compiled) once for all steps
    chex.clear_trace_counter()
    sharded = jit_train_step(chex.assert_max_traces(train_step, n=1), mesh,
                             compiler_options=FAST)
    s8 = replicate(state0, mesh)
    for i in range(3):
        s8, m8 = sharded(s8, shard_batch(_batch(i), mesh))

    chex.assert_trees_all_close(s8.params, s1.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s8.ema_params, s1.ema_params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s8.opt_state, s1.opt_state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m8, m1, rtol=1e-5)
    np.testing.assert_array_equal(jax.random.key_data(s8.key), jax.random.key_data(s1.key))
    assert int(s8.step) == 3
    # the output state is replicated on all 8 devices, as declared
    for leaf in jax.tree.leaves(s8):
        assert leaf.sharding.is_equivalent_to(replicated(mesh), leaf.ndim)
        assert len(leaf.sharding.device_set) == N_DEVICES


def test_sharded_step_refuses_indivisible_batch():
    opt = make_optimizer(0.01, total_steps=10)
    mesh = make_mesh()
    sharded = jit_train_step(make_train_step(_noisy_loss, opt), mesh, donate=False,
                             compiler_options=FAST)
    state = replicate(init_train_state(_params(), opt, jax.random.key(0)), mesh)
    bad = {k: v[:12] for k, v in _batch(0).items()}
    with pytest.raises(ValueError, match=r"\['x'\] has leading size 12.*8 devices"):
        sharded(state, bad)


def test_initialize_distributed_uses_jax_cluster_detection_and_is_idempotent(monkeypatch):
    calls = []
    outcome = {"error": None}

    def fake_initialize(**kw):
        calls.append(kw)
        if outcome["error"] is not None:
            raise outcome["error"]

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)

    # JAX detects no cluster and no coordinator is given: a single process, nothing brought up
    outcome["error"] = ValueError("coordinator_address should be defined.")
    assert initialize_distributed() is False
    assert calls == [{}]
    # a detected but misconfigured cluster, or explicit arguments JAX refuses, are not hidden
    outcome["error"] = ValueError("process_id and num_processes must be nonnegative")
    with pytest.raises(ValueError, match="process_id"):
        initialize_distributed()
    outcome["error"] = ValueError("coordinator_address should be defined.")
    with pytest.raises(ValueError, match="coordinator_address"):
        initialize_distributed(num_processes=2)

    # JAX detects a cluster: it is brought up once, later calls do nothing
    outcome["error"] = None
    calls.clear()
    assert initialize_distributed() is True
    assert initialize_distributed() is True
    assert calls == [{}]

    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
    kwargs = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}
    assert initialize_distributed(**kwargs) is True
    assert calls == [{}, kwargs]


def test_initialize_distributed_after_jax_has_run(monkeypatch):
    """In a process where JAX already computed (this test session) the runtime cannot come up:
    a single process is told False; arguments, or a launcher's environment naming several
    processes, get an error saying to call it first."""
    jax.devices()
    monkeypatch.setattr(parallel, "_DISTRIBUTED_INITIALIZED", False)
    for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                 "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed() is False
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # a batch script's own step: one process
    assert initialize_distributed() is False
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    with pytest.raises(RuntimeError, match="SLURM_STEP_NUM_TASKS=4.*before any other JAX call"):
        initialize_distributed()
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS")
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2")
    with pytest.raises(RuntimeError, match="TPU_WORKER_HOSTNAMES"):
        initialize_distributed()
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    with pytest.raises(RuntimeError, match="already run"):
        initialize_distributed(coordinator_address="127.0.0.1:1", num_processes=2, process_id=0)


def test_initialize_distributed_on_one_process_with_real_jax():
    # the real jax.distributed.initialize, in a clean environment (no cluster variables)
    import subprocess
    import sys

    code = (
        "import jax\n"
        "from dpm.training import initialize_distributed\n"
        "assert initialize_distributed() is False\n"
        "assert initialize_distributed() is False\n"
        "assert not jax.distributed.is_initialized() and jax.process_count() == 1\n"
        "print('single-process')\n"
    )
    env = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu", "HOME": "/tmp"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "single-process" in out.stdout
