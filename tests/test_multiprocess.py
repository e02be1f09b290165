"""Multi-process data parallelism on CPU: two processes on 127.0.0.1 (``jax.distributed``, gloo
collectives, 2 fake CPU devices each) train a tiny MLP denoiser for a few steps, each loading only
its own shard of every global batch, and reach the parameters of one process with the same 4
devices trained on the whole global batch; both processes save and restore one orbax
checkpoint; the data iterator's per-process shards are disjoint and make up the global batch; a
state sharded over both processes (FSDP) trains as the replicated one; a sampler jitted over
both processes' devices samples as one process does. A second test runs the README's
hand-launched ``python -m experiments.train`` on two processes.

The workers are ``tests/_multiprocess_worker.py`` run in fresh interpreters (the distributed
runtime must come up before JAX's backends, and this pytest process has 8 devices). Every worker
is killed when it outlives ``TIMEOUT_S`` or when another worker failed.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("_multiprocess_worker.py")
TIMEOUT_S = 120
STEPS = 3  # the worker's
LOCAL_BATCH = 8  # the worker's global batch of 16 over 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int) -> dict[str, str]:
    """This environment with ``n_devices`` fake CPU devices instead of the test session's 8."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}


def _tail(path: Path, n: int = 40) -> str:
    lines = [l for l in path.read_text(errors="replace").splitlines() if not l.startswith("[Gloo]")]
    return "\n".join(lines[-n:])


def _run_workers(runs: dict[str, tuple], logs: Path) -> None:
    """Run ``{name: (worker arguments, number of devices[, extra environment])}`` concurrently
    (arguments starting with ``-m`` run that module instead of the worker); fail with each
    failed worker's output tail. A worker still running when another fails, or after
    ``TIMEOUT_S``, is killed (a lone distributed process would wait for its peer)."""
    procs = {}
    try:
        for name, (args, n_devices, *extra) in runs.items():
            log = open(logs / f"{name}.log", "w")  # closed below
            cmd = [sys.executable, *(args if args[0] == "-m" else [str(WORKER), *args])]
            env = {**_env(n_devices), **(extra[0] if extra else {})}
            procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            cwd=Path(__file__).parent.parent), log)
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p, _ in procs.values()):
            if time.monotonic() > deadline or any(p.poll() for p, _ in procs.values()):
                break
            time.sleep(0.1)
    finally:
        for p, log in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    failures = [
        f"--- worker {name}: "
        + (f"killed (timed out after {TIMEOUT_S} s, or another worker failed)"
           if p.returncode == -9 else f"exit code {p.returncode}")
        + f"; output tail:\n{_tail(logs / f'{name}.log')}"
        for name, (p, _) in procs.items() if p.returncode != 0
    ]
    assert not failures, "\n".join(failures)


def test_two_processes_match_one(tmp_path):
    multi, single = tmp_path / "multi", tmp_path / "single"
    multi.mkdir()
    single.mkdir()
    port = str(_free_port())
    _run_workers({
        "process_0": ([str(multi), "--num-processes", "2", "--process-id", "0", "--port", port], 2),
        "process_1": ([str(multi), "--num-processes", "2", "--process-id", "1", "--port", port], 2),
        "single": ([str(single), "--num-processes", "1"], 4),
    }, tmp_path)
    p0, p1 = (dict(np.load(multi / f"process_{i}.npz")) for i in (0, 1))
    ref = dict(np.load(single / "process_0.npz"))

    # data: each process loads its own rows; together, in process order, the global batch
    assert p0["ids"].shape == p1["ids"].shape == (STEPS, LOCAL_BATCH)
    for i in range(STEPS):
        assert not set(p0["ids"][i]) & set(p1["ids"][i]), f"step {i}: shards overlap"
        np.testing.assert_array_equal(np.concatenate([p0["ids"][i], p1["ids"][i]]), ref["ids"][i],
                                      err_msg=f"step {i}: the shards' union is not the batch")
    # the mesh holds process 0's devices first, so shard_batch's global array is that union
    np.testing.assert_array_equal(p0["mesh_processes"], [0, 0, 1, 1])
    for p in (p0, p1):
        np.testing.assert_array_equal(p["global_x0"], ref["global_x0"])

    # training: the same parameters as one process on the whole batch (to float rounding: the
    # gradient all-reduce runs over processes), identical on both processes
    np.testing.assert_array_equal(p0["params_0"], ref["params_0"])
    assert np.abs(ref["params"] - ref["params_0"]).max() > 1e-3  # the steps moved the parameters
    for name in ("params", "ema_params"):
        np.testing.assert_array_equal(p0[name], p1[name])
        np.testing.assert_allclose(p0[name], ref[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert int(p0["step"]) == int(ref["step"]) == STEPS
    # FSDP over both processes (fsdp = 4: every large leaf split across them) equals the
    # replicated layout to rounding: the gradient sums run in another order, and Adam's first
    # steps (lr 1e-2, update ~ lr x sign) magnify a flipped last bit of a near-zero gradient
    # (seen: 7e-6 on 1 of 17,090 elements)
    for p in (p0, p1, ref):
        np.testing.assert_allclose(p["fsdp64"], p["rep64"], rtol=1e-4, atol=2e-5)
        assert np.abs(p["rep64"] - p["fsdp64"]).mean() < 1e-7
    np.testing.assert_array_equal(p0["fsdp64"], p1["fsdp64"])
    np.testing.assert_allclose(p0["fsdp64"], ref["fsdp64"], rtol=1e-4, atol=2e-5)
    # a sampler jitted over all devices of both processes, the denoiser an argument
    np.testing.assert_array_equal(p0["sample"], p1["sample"])
    np.testing.assert_allclose(p0["sample"], ref["sample"], rtol=1e-5, atol=1e-5)

    # checkpoint: every leaf of the state restored (in a new Checkpointer) as saved
    n_leaves = sum(k.startswith("saved_") for k in p0)
    assert n_leaves > 0
    for p in (p0, p1):
        for j in range(n_leaves):
            np.testing.assert_array_equal(p[f"restored_{j}"], p[f"saved_{j}"], err_msg=f"leaf {j}")
            np.testing.assert_array_equal(p[f"saved_{j}"], p0[f"saved_{j}"])


def test_the_train_command_on_two_processes(tmp_path):
    """The README's multi-host launch by hand: the same ``python -m experiments.train`` command on
    two processes with ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    (its command line brings the runtime up first) logs the same losses as one process with the
    same 4 devices, into one shared workdir."""
    port = str(_free_port())
    args = ["--config.train.steps=3", "--config.train.batch_size=8", "--config.train.log_every=1",
            "--config.train.sample_every=0", "--config.train.fast_compile=True",
            "--config.model.base_channels=8", "--config.model.channel_mult=(1,)",
            "--config.model.attn_resolutions=()", "--config.optim.warmup_steps=0"]
    multi, single = tmp_path / "multi", tmp_path / "single"
    launch = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
              "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    train = ["-m", "experiments.train", "--workdir"]
    _run_workers({
        "train_0": ([*train, str(multi), *args], 2, {**launch, "JAX_PROCESS_ID": "0"}),
        "train_1": ([*train, str(multi), *args], 2, {**launch, "JAX_PROCESS_ID": "1"}),
        "train_single": ([*train, str(single), *args], 4),
    }, tmp_path)

    def losses(workdir):
        with open(workdir / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        assert [r["step"] for r in records] == [1, 2, 3]  # written once, by process 0
        return np.array([r["loss"] for r in records])

    for i in (0, 1):  # one run of two processes, not two runs
        assert f"multi-host run: process {i} of 2, 2 of 4 devices here" in _tail(
            tmp_path / f"train_{i}.log", 1000)
    np.testing.assert_allclose(losses(multi), losses(single), rtol=1e-5)
    assert (multi / ".lock").exists()  # process 0's: the run's one lock
    assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))
