"""Checkpoints: bitwise resume, refusing foreign checkpoints, fallback, crash safety, retention."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit

from dpm.training import (
    Checkpointer,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicated,
)

FAST = jit.keywords["compiler_options"]  # the tests' fast-compile XLA options

REPO = Path(__file__).resolve().parents[1]
CONFIG = {"model": {"width": 8}, "lr": 0.01, "seed": 0}
TOTAL_STEPS = 6


def mlp_loss(params, batch, key):
    noise = 0.1 * jax.random.normal(key, batch["y"].shape)  # uses the state's key
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.sum((h @ params["w2"] - batch["y"] + noise) ** 2, axis=-1)


def fresh_state(width=8):
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(2, width)), jnp.float32),
        "b1": jnp.zeros((width,), jnp.float32),
        "w2": jnp.asarray(0.3 * rng.normal(size=(width, 1)), jnp.float32),
    }
    opt = make_optimizer(0.01, total_steps=TOTAL_STEPS, warmup_steps=2, weight_decay=0.01)
    return init_train_state(params, opt, jax.random.key(42)), opt


def batch_at(position):
    """A deterministic data stream: the batch is a function of the iterator's position."""
    rng = np.random.default_rng(1000 + position)
    x = rng.normal(size=(8, 2)).astype(np.float32)
    return {"x": x, "y": np.cos(x[:, :1]).astype(np.float32)}


_STEP = {}


def train_step_fn():
    # one jitted step for the whole module (compiled once)
    if "step" not in _STEP:
        _, opt = fresh_state()
        _STEP["step"] = jit_train_step(make_train_step(mlp_loss, opt), compiler_options=FAST)
    return _STEP["step"]


def leaves_as_numpy(tree):
    def to_np(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    return [to_np(x) for x in jax.tree.leaves(tree)]


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_as_numpy(a), leaves_as_numpy(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def save_steps(directory, steps, keep=3, config=CONFIG):
    """Train to each of ``steps`` and save there; returns {step: saved state as numpy}."""
    step_fn, (state, _) = train_step_fn(), fresh_state()
    saved = {}
    with Checkpointer(directory, keep=keep, config=config) as ckpt:
        for position in range(max(steps)):
            state, _ = step_fn(state, batch_at(position))
            if position + 1 in steps:
                ckpt.save(position + 1, state, data_state={"position": position + 1})
                saved[position + 1] = leaves_as_numpy(state)
    return saved


def test_resume_is_bitwise_identical(tmp_path):
    step_fn = train_step_fn()
    straight, _ = fresh_state()
    for position in range(TOTAL_STEPS):
        straight, _ = step_fn(straight, batch_at(position))

    # run 1: trains 4 steps, checkpointing every 2, and is "killed"
    state, _ = fresh_state()
    with Checkpointer(tmp_path, save_every=2, keep=2, config=CONFIG) as ckpt:
        for position in range(4):
            state, _ = step_fn(state, batch_at(position))
            ckpt.maybe_save(int(state.step), state, data_state={"position": position + 1})
    del state, ckpt

    # run 2: rebuilds everything from scratch and resumes where run 1 stopped
    state, _ = fresh_state()
    with Checkpointer(tmp_path, save_every=2, keep=2, config=CONFIG) as ckpt:
        state, data_state, step = ckpt.restore_latest(jax.eval_shape(lambda: state))
        assert step == 4 and data_state == {"position": 4} and int(state.step) == 4
        for position in range(data_state["position"], TOTAL_STEPS):
            state, _ = step_fn(state, batch_at(position))
            ckpt.maybe_save(int(state.step), state, data_state={"position": position + 1})
        assert ckpt.all_steps() == [4, 6]
    assert_bitwise_equal(state, straight)


def test_restore_uses_the_abstract_shardings(tmp_path):
    saved = save_steps(tmp_path, {2})
    mesh = make_mesh()
    state, _ = fresh_state()
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), state
    )
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        restored, data_state, step = ckpt.restore_latest(abstract)
    assert step == 2 and data_state == {"position": 2}
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding.is_equivalent_to(replicated(mesh), leaf.ndim)
    for x, y in zip(leaves_as_numpy(restored), saved[2], strict=True):
        np.testing.assert_array_equal(x, y)


def test_replicated_state_round_trips_to_any_sharding(tmp_path):
    # a state replicated over the 8 devices is written as one host copy (see
    # _replicas_to_host): it must restore bitwise, replicated or on one device
    mesh = make_mesh()
    state, _ = fresh_state()
    rep = jax.device_put(state, replicated(mesh))
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        ckpt.save(3, rep, data_state={"position": 3})
    want = leaves_as_numpy(state)
    for sharding in (replicated(mesh), jax.sharding.SingleDeviceSharding(jax.devices()[0])):
        abstract = jax.tree.map(
            lambda x, s=sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state)
        with Checkpointer(tmp_path, config=CONFIG) as ckpt:
            restored, _, step = ckpt.restore_latest(abstract)
        assert step == 3
        for leaf in jax.tree.leaves(restored):
            assert isinstance(leaf, jax.Array)
            assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
        for x, y in zip(leaves_as_numpy(restored), want, strict=True):
            np.testing.assert_array_equal(x, y)


def test_empty_directory_restores_none(tmp_path):
    state, _ = fresh_state()
    with Checkpointer(tmp_path / "new") as ckpt:
        assert ckpt.restore_latest(state) is None
        assert ckpt.latest_step() is None


def test_other_config_or_shapes_are_refused(tmp_path):
    save_steps(tmp_path, {1})
    state, _ = fresh_state()
    other = {"model": {"width": 16}, "lr": 0.01, "seed": 0}
    with Checkpointer(tmp_path, config=other) as ckpt:
        with pytest.raises(
            ValueError, match=r"another config(.|\n)*model\.width: checkpoint has 8"
        ):
            ckpt.restore_latest(state)

    wide, _ = fresh_state(width=16)
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        with pytest.raises(
            ValueError, match=r"\.params\['w1'\]: checkpoint has shape \(2, 8\) float32, state"
        ):
            ckpt.restore_latest(wide)

    extra = state.replace(params={**state.params, "w3": jnp.zeros((1,))})
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        with pytest.raises(
            ValueError, match=r"\.params\['w3'\]: in the state, not in the checkpoint"
        ):
            ckpt.restore_latest(extra)


def _truncate_arrays(step_dir):
    files = [p for p in Path(step_dir, "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(b"")


def test_corrupted_latest_falls_back_to_previous(tmp_path):
    saved = save_steps(tmp_path, {1, 2, 3, 4}, keep=4)
    data_file = next((tmp_path / "4" / "state").rglob("d/*"))
    flipped = bytearray(data_file.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one byte altered
    data_file.write_bytes(bytes(flipped))
    _truncate_arrays(tmp_path / "3")
    (tmp_path / "2" / "dpm_manifest.json").unlink()  # unverifiable: orbax itself must fail
    (tmp_path / "2" / "meta" / "metadata").unlink()
    state, _ = fresh_state()
    with Checkpointer(tmp_path, keep=4, config=CONFIG) as ckpt:
        with pytest.warns(UserWarning) as record:
            restored, data_state, step = ckpt.restore_latest(jax.eval_shape(lambda: state))
        messages = [str(w.message) for w in record]
        assert len(messages) == 3, messages
        assert "step 4: files unreadable" in messages[0] and "CRC32" in messages[0], messages
        assert "step 3: files unreadable" in messages[1] and "0 bytes" in messages[1], messages
        assert "step 2: meta unreadable" in messages[2], messages
        assert all("falling back to an older checkpoint" in m for m in messages)
        assert step == 1 and data_state == {"position": 1}
        for x, y in zip(leaves_as_numpy(restored), saved[1], strict=True):
            np.testing.assert_array_equal(x, y)
        # the resumed run overwrites an unreadable step when it gets there again
        assert ckpt.save(3, restored, data_state={"position": 3})
        ckpt.wait_until_finished()
    with Checkpointer(tmp_path, keep=4, config=CONFIG) as ckpt:
        with pytest.warns(UserWarning, match="step 4: files unreadable"):
            again, data_state, step = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert step == 3 and data_state == {"position": 3}
    assert_bitwise_equal(again, restored)


def test_no_readable_checkpoint_is_an_error(tmp_path):
    save_steps(tmp_path, {1})
    _truncate_arrays(tmp_path / "1")
    state, _ = fresh_state()
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        with pytest.warns(UserWarning, match="cannot be read"):
            with pytest.raises(ValueError, match="no readable checkpoint"):
                ckpt.restore_latest(state)


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    import jax, numpy as np
    from orbax.checkpoint._src.path import async_path
    from dpm.training import Checkpointer

    state = {{"w": jax.numpy.arange(6.0), "step": jax.numpy.int32(0)}}
    ckpt = Checkpointer({directory!r}, keep=3)
    ckpt.save(1, state, data_state={{"position": 1}})
    ckpt.wait_until_finished()

    rename = async_path.rename

    async def die_before_final_rename(src, dst):
        if os.path.basename(str(dst)) == "2":  # the step directory's atomic rename
            os._exit(17)  # the process is killed mid-save
        return await rename(src, dst)

    async_path.rename = die_before_final_rename
    ckpt.save(2, {{"w": state["w"] + 1, "step": jax.numpy.int32(2)}}, data_state={{"position": 2}})
    ckpt.wait_until_finished()
    """
)


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path):
    script = CRASH_SCRIPT.format(repo=str(REPO), directory=str(tmp_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if ".orbax-checkpoint-tmp" in p.name]
    assert leftovers, sorted(p.name for p in tmp_path.iterdir())  # the save was under way
    abstract = {
        "w": jax.ShapeDtypeStruct((6,), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }
    with Checkpointer(tmp_path, keep=3) as ckpt:
        assert ckpt.all_steps() == [1]
        restored, data_state, step = ckpt.restore_latest(abstract)
    assert step == 1 and data_state == {"position": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))


def test_save_every_and_keep_last_n(tmp_path):
    state, _ = fresh_state()
    with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
        started = [ckpt.maybe_save(s, state) for s in range(0, 8)]
        assert started == [False, False, True, False, True, False, True, False]
        assert ckpt.save(7, state)  # forced, e.g. at the end of a run
        assert not ckpt.save(7, state)  # already there
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [6, 7]
        ckpt.close()  # closing twice (here and on exit) is fine
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["6", "7"]


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(TypeError, match="config must be JSON-serialisable"):
        Checkpointer(tmp_path, config={"f": object()})
    state, _ = fresh_state()
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(TypeError, match="data_state must be JSON-serialisable"):
            ckpt.save(1, state, data_state={"rng": np.random.default_rng(0)})


CRASH_AFTER_SAVE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {repo!r})
    import jax
    from dpm.training import Checkpointer

    ckpt = Checkpointer({directory!r}, keep=3)
    for step in (1, 2):
        w = jax.numpy.arange(4096.0) + step
        ckpt.save(step, {{"w": w, "step": jax.numpy.int32(step)}}, data_state={{"position": step}})
    ckpt._manager.wait_until_finished()  # step 2 committed by orbax ...
    os._exit(9)  # ... and the process killed at once: no close(), no further save
    """
)


def test_newest_checkpoint_of_a_killed_run_is_verified(tmp_path):
    """The manifest is part of the atomic save: after a crash right after a save, a flipped byte
    in that (newest) checkpoint is found, named, and the previous checkpoint restored."""
    script = CRASH_AFTER_SAVE_SCRIPT.format(repo=str(REPO), directory=str(tmp_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()[-2000:]
    for step in (1, 2):
        assert (tmp_path / str(step) / "dpm_manifest.json").is_file()
    data_file = max((p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file()),
                    key=lambda p: p.stat().st_size)  # the array bytes
    flipped = bytearray(data_file.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    data_file.write_bytes(bytes(flipped))
    abstract = {"w": jax.ShapeDtypeStruct((4096,), jnp.float32),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    with Checkpointer(tmp_path, keep=3) as ckpt:
        with pytest.warns(UserWarning) as record:
            restored, data_state, step = ckpt.restore_latest(abstract)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "step 2: files unreadable" in messages[0], messages
    assert str(data_file.relative_to(tmp_path / "2")) in messages[0]
    assert "CRC32" in messages[0]
    assert step == 1 and data_state == {"position": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(4096.0) + 1)


def test_synchronous_saves_are_sealed_too(tmp_path):
    state, _ = fresh_state()
    with Checkpointer(tmp_path, keep=2, async_save=False) as ckpt:
        ckpt.save(1, state)
        # no wait: a synchronous save returns committed, its manifest inside
        manifest = tmp_path / "1" / "dpm_manifest.json"
        assert manifest.is_file()
        import json

        files = json.loads(manifest.read_text())["files"]
        assert any(k.startswith("state") for k in files)
        assert any(k.startswith("meta") for k in files)


def test_partial_step_directories_are_moved_aside_once(tmp_path):
    saved = save_steps(tmp_path, {1})
    (tmp_path / "5").mkdir()  # empty: a crash between mkdir and the first write
    junk = tmp_path / "7"
    junk.mkdir()
    (junk / "half_written").write_bytes(b"\0" * 10)  # no orbax metadata, no manifest
    state, _ = fresh_state()
    with pytest.warns(UserWarning) as record:
        ckpt = Checkpointer(tmp_path, config=CONFIG)
    messages = [str(w.message) for w in record if "incomplete step directories" in str(w.message)]
    assert len(messages) == 1, [str(w.message) for w in record]
    assert "5 (empty, removed)" in messages[0] and "7 (moved to" in messages[0]
    with ckpt:
        assert ckpt.all_steps() == [1]
        restored, _, step = ckpt.restore_latest(jax.eval_shape(lambda: state))
    assert step == 1
    for x, y in zip(leaves_as_numpy(restored), saved[1], strict=True):
        np.testing.assert_array_equal(x, y)
    assert not (tmp_path / "5").exists() and not (tmp_path / "7").exists()
    kept = list((tmp_path / "quarantine").iterdir())
    assert len(kept) == 1 and (kept[0] / "half_written").is_file()
    import warnings

    with warnings.catch_warnings():  # a second start has nothing to say
        warnings.simplefilter("error")
        Checkpointer(tmp_path, config=CONFIG).close()


def test_mixed_replicated_and_split_leaves_restore_to_their_shardings(tmp_path):
    # replicated leaves are read once and copied to every device; a split leaf keeps orbax's
    # per-shard reads: both must come back bitwise on exactly the requested shardings
    mesh = make_mesh()
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    host = {"rep": np.arange(12, dtype=np.float32).reshape(3, 4),
            "split": np.arange(32, dtype=np.float32).reshape(16, 2) ** 1.5}
    shardings = {"rep": replicated(mesh), "split": split}
    state = jax.tree.map(jax.device_put, host, shardings)
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        ckpt.save(1, state, data_state={"position": 1})
    with Checkpointer(tmp_path, config=CONFIG) as ckpt:
        restored, _, step = ckpt.restore_latest(state)
    assert step == 1
    for k in host:
        assert restored[k].sharding.is_equivalent_to(shardings[k], restored[k].ndim), k
        np.testing.assert_array_equal(np.asarray(restored[k]), host[k])
