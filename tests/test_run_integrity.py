"""Long runs that never lie: kill -9 and resume equals an uninterrupted run (state, key, data
position and metrics log), one writer per workdir, strict JSON, honest exits."""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpm.training import WorkdirBusyError, WorkdirLock, init_train_state, make_optimizer
from experiments import _io

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": str(REPO)}

STEPS = 20
ARGS = [f"--config.train.steps={STEPS}", "--config.train.batch_size=8",
        "--config.train.log_every=1", "--config.train.ckpt_every=5", "--config.train.keep=2",
        "--config.train.sample_every=0", "--config.model.base_channels=8",
        "--config.model.channel_mult=(1,)", "--config.model.attn_resolutions=()",
        "--config.model.num_res_blocks=1", "--config.optim.warmup_steps=0",
        "--config.train.fast_compile"]

# A training run as a user starts it, plus (for the test) the final state dumped to final.npz;
# SLOW_COMMIT=s holds every checkpoint's final rename for s seconds, so that a kill can land
# inside a save.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    if os.environ.get("SLOW_COMMIT"):
        import asyncio
        from orbax.checkpoint._src.path import async_path
        rename = async_path.rename

        async def slow(src, dst):
            await asyncio.sleep(float(os.environ["SLOW_COMMIT"]))
            return await rename(src, dst)

        async_path.rename = slow
    import jax, numpy as np
    from dpm.training import Checkpointer
    from experiments._cli import parse_args
    from experiments._runner import train_denoiser

    config, workdir = parse_args(sys.argv[1:], "experiments.train", "integrity test")
    trained = train_denoiser(config, workdir, progress=False)
    state = trained.state
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        _, data_state, step = ckpt.restore_latest(jax.eval_shape(lambda: state))
    raw = jax.tree.map(lambda x: jax.random.key_data(x)
                       if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)
    np.savez(os.path.join(workdir, "final.npz"), *map(np.asarray, jax.tree.leaves(raw)))
    with open(os.path.join(workdir, "final.json"), "w") as f:
        json.dump({"data_state": data_state, "step": step}, f)
    """
)


def _start(workdir, slow_commit=None, extra=()) -> subprocess.Popen:
    env = {**ENV, **({"SLOW_COMMIT": str(slow_commit)} if slow_commit else {})}
    return subprocess.Popen([sys.executable, "-c", CHILD, "--workdir", str(workdir), *ARGS,
                             *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _logged(workdir) -> int:
    path = Path(workdir) / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _kill_when(proc, ready, what: str, timeout=90.0):
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: "
                                 f"{proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def _finish(proc):
    out = proc.communicate(timeout=180)[0].decode()
    proc.stdout.close()
    assert proc.returncode == 0, out[-3000:]


def _metrics(workdir):
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=_no_constants) for line in lines]
    # timings differ between runs: the rate, and the compile time a (resumed) run logs in its
    # first record
    return [{k: v for k, v in r.items() if k != "steps_per_s" and not k.startswith("compile_s")}
            for r in records]


def _no_constants(name):
    raise ValueError(f"not strict JSON: {name}")


def _data_args(tmp_path) -> list[str]:
    """A small .npz of 8x8 images (no scikit-learn import in each child)."""
    path = tmp_path / "images.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 256, (48, 8, 8, 1), np.uint8))
    return ["--config.data.name=npz", f"--config.data.kwargs.path={path}",
            "--config.model.num_classes=None"]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """SIGKILL before the first checkpoint, inside a save (held in its final rename) and between
    checkpoints; each restart resumes. The end state (parameters, optimizer state, EMA, PRNG
    key, skipped count), the data position and metrics.jsonl equal those of a run that was
    never interrupted (run beside it)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    data = _data_args(tmp_path)
    reference = _start(ref, extra=data)

    ckpts = run / "checkpoints"
    p = _start(run, extra=data)
    _kill_when(p, lambda: _logged(run) >= 3, "step 3")  # before any checkpoint
    p = _start(run, slow_commit=1.5, extra=data)
    _kill_when(p, lambda: ckpts.exists() and any(
        ".orbax-checkpoint-tmp" in n and n.split(".")[0] != "5"
        for n in os.listdir(ckpts)), "a save under way")  # inside the save of step 10
    p = _start(run, extra=data)
    _kill_when(p, lambda: _logged(run) >= 17, "step 17")  # between checkpoints
    _finish(_start(run, extra=data))
    _finish(reference)

    with np.load(ref / "final.npz") as a, np.load(run / "final.npz") as b:
        assert len(a.files) == len(b.files) > 10
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((ref / "final.json").read_text()) == json.loads(
        (run / "final.json").read_text())
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(1, STEPS + 1))  # no duplicates, no gaps
    assert _metrics(run) == _metrics(ref)


def test_a_second_writer_is_refused_and_a_dead_holder_is_not_a_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from dpm.training import WorkdirLock; "
         f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        env=ENV, stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with pytest.raises(WorkdirBusyError, match=f"pid {holder.pid} on host"):
        WorkdirLock(tmp_path).acquire()
    holder.kill()  # SIGKILL: the lock file stays, the lock does not
    holder.wait()
    holder.stdout.close()
    assert (tmp_path / ".lock").exists()
    with WorkdirLock(tmp_path):
        with WorkdirLock(tmp_path):  # re-entrant in one process
            pass
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_text() == ""  # released


@contextlib.contextmanager
def _lock_held_elsewhere(workdir):
    """A child process holding ``workdir``'s lock for the duration; yields it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from dpm.training import WorkdirLock; "
         f"WorkdirLock({str(workdir)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        env=ENV, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_the_cli_refuses_a_busy_workdir_in_one_line(tmp_path, capsys):
    from experiments import train as train_cmd

    with _lock_held_elsewhere(tmp_path) as holder:
        with pytest.raises(SystemExit) as e:
            train_cmd.main(["--workdir", str(tmp_path), *ARGS])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is in use by pid" in err[0] and str(holder.pid) in err[0]


def test_an_experiment_refuses_a_busy_workdir_before_any_work(tmp_path, capsys):
    from experiments import progressive_distillation as pd

    with _lock_held_elsewhere(tmp_path) as holder:
        with pytest.raises(SystemExit) as e:
            pd.main(["--workdir", str(tmp_path), f"--config.zoo_root={tmp_path / 'zoo'}"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {holder.pid}" in err[0], err
        assert sorted(os.listdir(tmp_path)) == [".lock"]  # nothing was trained or written


def test_metrics_are_strict_json(tmp_path):
    w = _io.JsonlWriter(tmp_path / "m.jsonl")
    w.write({"step": 1, "loss": np.float32(np.nan), "grad_norm": float("inf"),
             "v": np.array([1.0, -np.inf])})
    (record,) = [json.loads(line, parse_constant=_no_constants)
                 for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert record == {"step": 1, "loss": "nan", "grad_norm": "inf", "v": [1.0, "-inf"]}
    _io.write_json(tmp_path / "r.json", {"kid": np.float64(np.nan)})
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=_no_constants) == {
        "kid": "nan"}


def test_truncate_after_drops_later_records_and_a_torn_line(tmp_path):
    w = _io.JsonlWriter(tmp_path / "m.jsonl")
    for s in range(1, 8):
        w.write({"step": s, "loss": 0.5})
    with open(w.path, "a") as f:
        f.write('{"step": 8, "lo')  # killed mid-write
    assert w.truncate_after(5) == 3
    assert [r["step"] for r in _io.read_jsonl(w.path)] == [1, 2, 3, 4, 5]
    assert w.truncate_after(5) == 0
    assert w.truncate_after(0) == 5 and _io.read_jsonl(w.path) == []


def test_a_workdir_past_the_requested_steps_says_so(tmp_path, capsys):
    from experiments import train as train_cmd

    args = ["--workdir", str(tmp_path), *ARGS]
    train_cmd.main([*args, "--config.train.steps=4"])
    capsys.readouterr()
    train_cmd.main([*args, "--config.train.steps=2"])
    out = capsys.readouterr().out
    assert "already at step 4, past the requested 2 steps; nothing trained" in out
    assert "trained 0 steps" in out and "state at step 4" in out
    assert "-2 steps" not in out


def _nan_loss(params, batch, key):
    return jnp.full(batch["x"].shape[:1], jnp.nan) * params["w"]


def _toy_run(tmp_path, steps, max_skipped_fraction, loss=_nan_loss):
    from dpm.data import BatchIterator
    from dpm.training import make_train_step
    from experiments._runner import fit

    opt = make_optimizer(0.1, total_steps=steps, warmup_steps=0)
    state = init_train_state({"w": jnp.ones(())}, opt, jax.random.key(0))
    it = BatchIterator({"x": np.ones((16, 2), np.float32)}, 8, seed=0)
    return fit(make_train_step(loss, opt), state, it, str(tmp_path), steps=steps,
               ckpt_config={}, ckpt_every=steps, log_every=2, progress=False,
               max_skipped_fraction=max_skipped_fraction)


def test_a_run_whose_updates_were_all_skipped_fails_with_the_count(tmp_path):
    with pytest.raises(RuntimeError, match=r"2 of 2 updates were skipped .* allows \(0\)"):
        _toy_run(tmp_path / "a", 6, 0.1)  # fails at the first log once it cannot succeed
    with pytest.raises(RuntimeError, match=r"6 of 6 updates were skipped"):
        _toy_run(tmp_path / "b", 6, 0.9)  # 5 allowed; found at the end

    def finite(params, batch, key):
        return jnp.sum(batch["x"], -1) * params["w"] ** 2

    state, _ = _toy_run(tmp_path / "c", 6, 0.0, loss=finite)  # nothing skipped: passes
    assert int(state.skipped) == 0 and int(state.step) == 6
    assert math.isfinite(float(state.params["w"]))
