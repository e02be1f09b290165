"""Benchmark: what a jitted sampler costs beyond its network evaluations, per call, per step,
in compile time and in memory.

    python -m experiments.bench_overhead             # CPU-sized default (~2 min on 2 cores)
    python -m experiments.bench_overhead --preset ddpm_cifar10 --image-size 32 --channels 3 \\
        --batch 256 --dtype bfloat16                # a GPU

Four tables, all measured in the same run:

* **Call overhead** (the analytic mixture model, no network; 10 steps, batch 64, 2-D): the
  README's ``jax.jit(solver)(denoiser, x_T, ts)`` against the same sampler with the denoiser
  closed over and with the denoiser and the grid closed over (a constant grid is checked when
  traced, so that program has no run-time grid check). Microseconds a call (median), and whether
  the call passes ``jax.transfer_guard("disallow")`` (no host -> device copy on a repeated
  call).
* **Sampler overhead** (a U-Net): time of one jitted sampler call / (NFE x time of one jitted
  forward of the same network at the same batch). 1.00 means the solver's own arithmetic, the
  scan and the dispatch are free; the issue's target is <= 1.02. The forward and the samplers are
  timed interleaved, median of ``--repeats``.
* **Compile time** of each sampler around the same U-Net at 10, 100 and 1000 steps (the scan
  compiles its body once: the ratio 1000 / 10 should stay near 1; target <= 1.5).
* **Memory**: XLA's compiled temporary buffer size at 10, 100 and 1000 steps, and with
  ``return_trajectory=True`` for contrast (that one stores every state). Without a trajectory
  only the per-step coefficient tables (a few scalars a step) grow with the number of steps:
  the table gives the bytes per extra step beside the bytes of one state.

Writes ``bench_overhead_<backend>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.tree_util import Partial

import dpm
import nets
import solvers
from experiments import _io
from experiments._model import DTYPES, PRESETS
from solvers import grids

# name -> (sampler with its options, grid maker): one row per sampler in every table
SAMPLERS: dict[str, tuple[Callable, Callable]] = {
    "ddim": (solvers.ddim, lambda S, sch: grids.uniform_time(S, sch, t_end=0.0)),
    "dpm_solver_pp_2m": (functools.partial(solvers.dpm_solver_pp, order=2),
                         lambda S, sch: grids.uniform_log_snr(S, sch)),
    "pndm_fpndm": (solvers.pndm, lambda S, sch: grids.uniform_time(S, sch, t_end=0.0)),
    "edm_heun": (solvers.edm_heun, lambda S, sch: grids.karras(S, sch)),
}


def _median_us(fn: Callable[[], jax.Array], n: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``n`` back-to-back calls, in microseconds."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return 1e6 * statistics.median(times)


def _guard_passes(fn: Callable[[], jax.Array]) -> bool:
    jax.block_until_ready(fn())
    try:
        with jax.transfer_guard("disallow"):
            jax.block_until_ready(fn())
    except Exception:  # noqa: BLE001 - the guard's refusal, whatever JAX calls it
        return False
    return True


def call_overhead(repeats: int) -> list[dict]:
    """The README's call on the exact mixture model, against closed-over variants."""
    schedule = dpm.DiscreteVP.from_name("linear")
    data = dpm.GaussianMixture.create(means=jnp.array([[2.0, 0.0], [-2.0, 0.0]]),
                                      stds=jnp.array([0.3, 0.3]))
    den = data.denoiser(schedule, "eps")
    x_T = jax.random.normal(jax.random.key(0), (64, 2))
    rows = []
    for name in ("ddim", "dpm_solver_pp_2m"):
        sampler, grid = SAMPLERS[name]
        ts = grid(10, schedule)
        variants = {
            "jit(solver)(den, x_T, ts)": (jax.jit(sampler), (den, x_T, ts)),
            "den closed over": (jax.jit(lambda x, ts, s=sampler: s(den, x, ts)), (x_T, ts)),
            "den and ts closed over": (jax.jit(lambda x, s=sampler, ts=ts: s(den, x, ts)),
                                       (x_T,)),
        }
        for label, (f, args) in variants.items():
            call = functools.partial(f, *args)
            rows.append({"sampler": name, "call": label,
                         "us_per_call": _median_us(call, 2000, repeats),
                         "transfer_guard_passes": _guard_passes(call)})
    return rows


def _network(args):
    cfg = PRESETS[args.preset](image_size=args.image_size, channels=args.channels,
                               dtype=DTYPES[args.dtype])
    graphdef, params = nets.init_params(nets.UNet, cfg, seed=0)
    apply = lambda p, x, c_noise, cond: nnx.merge(graphdef, p)(x, c_noise, cond)  # noqa: E731
    return cfg, params, apply


def sampler_overhead(args, schedule, params, apply, x_T) -> tuple[float, list[dict]]:
    """(forward us, rows): each sampler's time / (NFE x forward time), interleaved."""
    forward = jax.jit(lambda p, x, t: apply(p, x, schedule.c_noise(t), None))
    t_fwd = jnp.full((x_T.shape[0],), 0.5, jnp.float32)

    def make(name):
        sampler, grid = SAMPLERS[name]
        ts = grid(args.steps, schedule)

        def run(p, x, ts, traj):
            den = dpm.network_denoiser(Partial(apply, p), schedule, "eps")
            return sampler(den, x, ts, return_trajectory=traj)

        nfe = int(jax.jit(run, static_argnums=3)(params, x_T, ts, True)[1]["nfe"])
        return functools.partial(jax.jit(run, static_argnums=3), params, x_T, ts, False), nfe

    runs = {name: make(name) for name in args.samplers}
    fwd_call = functools.partial(forward, params, x_T, t_fwd)
    fwd_times, times = [], {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: the forward is re-timed beside every sampler
        fwd_times.append(_median_us(fwd_call, args.iters, 1))
        for name, (call, nfe) in runs.items():
            times[name].append(_median_us(call, max(1, args.iters // nfe), 1))
    fwd_us = statistics.median(fwd_times)
    rows = [{"sampler": name, "steps": args.steps, "nfe": nfe,
             "us_per_call": statistics.median(times[name]),
             "overhead_ratio": statistics.median(times[name]) / (nfe * fwd_us)}
            for name, (_, nfe) in runs.items()]
    return fwd_us, rows


def compile_and_memory(args, schedule, params, apply, x_T) -> list[dict]:
    """Compile seconds and temporary bytes of each sampler at 10 / 100 / 1000 steps."""
    rows = []
    state_bytes = x_T.size * x_T.dtype.itemsize
    for name in args.samplers:
        sampler, grid = SAMPLERS[name]
        row: dict = {"sampler": name}
        for S in args.compile_steps:
            ts = grid(S, schedule)

            def run(p, x, ts, traj, sampler=sampler):
                den = dpm.network_denoiser(Partial(apply, p), schedule, "eps")
                return sampler(den, x, ts, return_trajectory=traj)

            for traj in (False, True) if S == max(args.compile_steps) else (False,):
                t0 = time.perf_counter()
                compiled = jax.jit(run, static_argnums=3).lower(params, x_T, ts, traj).compile()
                seconds = time.perf_counter() - t0
                mem = compiled.memory_analysis()
                temp = None if mem is None else int(mem.temp_size_in_bytes)
                out = None if mem is None else int(mem.output_size_in_bytes)
                key = f"{S}" + ("_trajectory" if traj else "")
                row[f"compile_s_{key}"] = seconds
                row[f"temp_bytes_{key}"] = temp
                row[f"output_bytes_{key}"] = out
        lo, hi = min(args.compile_steps), max(args.compile_steps)
        row["compile_ratio"] = row[f"compile_s_{hi}"] / row[f"compile_s_{lo}"]
        # the per-step coefficient tables (a few scalars a step) are all that may grow
        row["temp_bytes_per_step"] = (row[f"temp_bytes_{hi}"] - row[f"temp_bytes_{lo}"]) / (hi - lo)
        row["state_bytes"] = state_bytes
        rows.append(row)
    return rows


def run(args) -> dict:
    result: dict = {"backend": jax.default_backend(),
                    "devices": [str(d) for d in jax.devices()]}
    result["call_overhead"] = call_overhead(args.repeats)
    cfg, params, apply = _network(args)
    schedule = dpm.DiscreteVP.from_name("linear")
    shape = (args.batch, args.image_size, args.image_size, args.channels)
    x_T = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    result["network"] = {"preset": args.preset, "image_size": args.image_size,
                         "channels": args.channels, "dtype": args.dtype, "batch": args.batch,
                         "params": int(sum(x.size for x in jax.tree.leaves(params)))}
    fwd_us, rows = sampler_overhead(args, schedule, params, apply, x_T)
    result["forward_us"] = fwd_us
    result["sampler_overhead"] = rows
    result["compile_and_memory"] = compile_and_memory(args, schedule, params, apply, x_T)
    result["compile_steps"] = list(args.compile_steps)
    return result


def print_tables(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title="Call overhead: mixture model, 10 steps, batch 64 (us a call, median)")
    for col in ("sampler", "call", "us / call", "transfer guard"):
        t.add_column(col, justify="right")
    for row in r["call_overhead"]:
        t.add_row(row["sampler"], row["call"], f"{row['us_per_call']:.1f}",
                  "passes" if row["transfer_guard_passes"] else "FAILS")
    con.print(t)
    n = r["network"]
    t = Table(title=f"Sampler overhead: U-Net {n['preset']} {n['image_size']}x{n['image_size']}"
                    f"x{n['channels']}, batch {n['batch']}, {n['dtype']}; one forward "
                    f"{r['forward_us'] / 1e3:.2f} ms")
    for col in ("sampler", "steps", "NFE", "ms / call", "call / (NFE x forward)"):
        t.add_column(col, justify="right")
    for row in r["sampler_overhead"]:
        t.add_row(row["sampler"], str(row["steps"]), str(row["nfe"]),
                  f"{row['us_per_call'] / 1e3:.2f}", f"{row['overhead_ratio']:.3f}")
    con.print(t)
    steps = r["compile_steps"]
    hi, lo = max(steps), min(steps)
    each = " / ".join(str(S) for S in steps)
    t = Table(title="Compile time and temporary memory by number of steps")
    for col in ("sampler", f"compile s ({each})", f"{hi} / {lo}", f"temp MiB ({each})",
                f"with trajectory, {hi}", "bytes / step (one state)"):
        t.add_column(col, justify="right")
    mib = lambda b: "-" if b is None else f"{b / 2**20:.2f}"  # noqa: E731
    for row in r["compile_and_memory"]:
        t.add_row(row["sampler"], " / ".join(f"{row[f'compile_s_{S}']:.2f}" for S in steps),
                  f"{row['compile_ratio']:.2f}",
                  " / ".join(mib(row[f"temp_bytes_{S}"]) for S in steps),
                  mib((row[f"temp_bytes_{hi}_trajectory"] or 0)
                      + (row[f"output_bytes_{hi}_trajectory"] or 0)),
                  f"{row['temp_bytes_per_step']:.0f} ({row['state_bytes']})")
    con.print(t)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="sampler steps of the overhead table")
    p.add_argument("--compile-steps", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--iters", type=int, default=40,
                   help="forward calls per timing (a sampler gets iters // NFE calls)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    p.add_argument("--out", default="runs/bench_overhead")
    args = p.parse_args(argv)
    if min(args.compile_steps) < 2 or args.steps < 2:
        p.error("--steps and every --compile-steps must be >= 2 (F-PNDM's minimum)")
    r = run(args)
    print_tables(r)
    path = os.path.join(args.out, f"bench_overhead_{r['backend']}.json")
    _io.write_json(path, r)
    print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
