"""Benchmark: U-Net training and sampling throughput, with model FLOPs and fraction of peak.

    python -m experiments.bench_train                                  # CPU-sized default
    python -m experiments.bench_train --preset ddpm_cifar10 --dtype bfloat16 \\
        --train-batch 256 --sample-batch 1024 --peak-tflops 790       # the H200 configuration

Training: images/s of the jitted, data-parallel train step (eps loss, AdamW, EMA). Sampling:
images/s of DPM-Solver++(2M) at ``--nfe`` evaluations, jitted whole. FLOPs per image come from
XLA's cost analysis of the forward pass compiled for the CPU (the GPU backend under-counts
convolutions); a training step is counted as 3x the forward. Compile time (the first call,
compile included) and throughput are also reported for a progressive-distillation step of the
same U-Net (student and teacher; three forwards and one backward per example) and for a latent
consistency distillation step (teacher DDIM step, EMA target; a run of any paper logs each of
its compiled steps' time in ``metrics.jsonl``, ``compile_s``). Prints a table, writes JSON.
``--fast-compile`` turns XLA's backend optimisations off (minutes less compiling on a CPU, for
smoke runs; the FLOP counts are unchanged, the throughputs are then not representative).
``--per-leaf`` adds the same train step with the optimizer's moments kept per parameter leaf
(``make_optimizer(flatten=False)``), compiled and timed side by side in the same run, and both
steps' StableHLO line counts (the size XLA compiles).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.tree_util import Partial

import dpm
import nets
from dpm.training import (
    fast_compile_options,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)
from experiments import _io
from experiments._model import DTYPES, PRESETS, make_loss
from solvers.dpm_solver import dpm_solver_pp
from solvers.grids import uniform_time


def unet_from_args(args) -> nets.UNetConfig:
    """The U-Net of ``--preset`` with ``--dtype`` and the optional width / depth overrides."""
    kw = dict(dtype=DTYPES[args.dtype])
    if getattr(args, "base_channels", None):
        kw["base_channels"] = args.base_channels
    if getattr(args, "channel_mult", None):
        kw["channel_mult"] = tuple(int(m) for m in args.channel_mult.split(","))
        kw["attn_resolutions"] = ()
    if args.preset == "ddpm_cifar10":
        return nets.ddpm_cifar10(**kw)
    return PRESETS[args.preset](image_size=args.image_size, channels=args.channels, **kw)


FAST_COMPILE = fast_compile_options()


def forward_flops_per_image(
    cfg: nets.UNetConfig, batch: int = 4, compiler_options: dict | None = None
) -> float:
    """XLA's FLOP count of one forward pass, per image, compiled for the CPU backend."""
    model = nnx.eval_shape(lambda: nets.UNet(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    on_cpu = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=cpu)
    params = jax.tree.map(lambda a: on_cpu(a.shape, a.dtype), params)
    x = on_cpu((batch, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
    t = on_cpu((batch,), jnp.float32)
    fwd = jax.jit(lambda p, x, t: nnx.merge(graphdef, p)(x, t), compiler_options=compiler_options)
    cost = fwd.lower(params, x, t).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) / batch


def _timeit(fn, n: int) -> float:
    out = fn()
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def run(args) -> dict:
    cfg = unet_from_args(args)
    H, C = cfg.image_size, cfg.in_channels
    opts = FAST_COMPILE if args.fast_compile else None
    mesh = make_mesh()
    graphdef, params = nets.init_params(nets.UNet, cfg, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    schedule = dpm.DiscreteVP.from_name("linear")
    diffusion = ml_collections.ConfigDict(dict(prediction="eps", weighting="eps",
                                               time_sampler="discrete", preconditioning=None))
    loss = make_loss(graphdef, schedule, diffusion)
    p_rep = replicate(jax.tree.map(jnp.copy, params), mesh)  # the train step donates its state
    batch = shard_batch({"x": jax.random.normal(jax.random.key(1), (args.train_batch, H, H, C))},
                        mesh)

    def train_bench(flatten: bool) -> tuple[float, float, int]:
        """(compile s, s per step, StableHLO lines) of the train step, its optimizer's clip
        and Adam on one raveled vector (``flatten``) or per leaf."""
        opt = make_optimizer(1e-4, total_steps=10_000, warmup_steps=10, flatten=flatten)
        train_step = make_train_step(loss, opt, ema_decay=0.999)
        # a fresh copy each time: the jitted step donates its state
        state = replicate(init_train_state(jax.tree.map(jnp.copy, params), opt,
                                           jax.random.key(0)), mesh)
        lines = len(jax.jit(train_step).lower(state, batch).as_text().splitlines())
        step = jit_train_step(train_step, mesh, compiler_options=opts)
        holder = {"state": state}

        def train_once():
            holder["state"], m = step(holder["state"], batch)
            return m["loss"]

        t0 = time.perf_counter()
        jax.block_until_ready(train_once())
        compile_s = time.perf_counter() - t0
        return compile_s, _timeit(train_once, args.iters), lines

    train_compile, train_s, train_lines = train_bench(True)
    per_leaf = train_bench(False) if args.per_leaf else None

    def distill_bench(kind: str) -> tuple[float, float]:
        """(compile s, s per step) of a distillation step with the same U-Net as student and as
        teacher (an extra, replicated argument). ``"pd"``: progressive distillation (Salimans &
        Ho; x0 student, two teacher DDIM steps per example inside the loss; the round's
        student step count a traced argument, so one program serves every halving round).
        ``"lcd"``: latent consistency distillation (one teacher DDIM step on the skipping grid,
        the EMA as the target network, pseudo-Huber distance)."""
        opt = make_optimizer(1e-4, total_steps=10_000, warmup_steps=10)
        if kind == "pd":
            make = lambda p: dpm.network_denoiser(Partial(apply, p), schedule, "x0")  # noqa: E731
            loss = dpm.losses.progressive_distillation_loss(make)
            train_step = make_train_step(loss, opt, ema_decay=0.0)
            extra = (p_rep, jnp.asarray(4, jnp.int32))
        else:
            eps = lambda p: dpm.network_denoiser(Partial(apply, p), schedule, "eps")  # noqa: E731
            loss = dpm.losses.lcd_loss(lambda p, cond, w: eps(p), lambda p, cond: eps(p))
            train_step = make_train_step(loss, opt, ema_decay=0.95, target_from_ema=True)
            extra = (p_rep,)
        step = jit_train_step(train_step, mesh, compiler_options=opts)
        holder = {"state": replicate(init_train_state(jax.tree.map(jnp.copy, params), opt,
                                                      jax.random.key(0)), mesh)}

        def once():
            holder["state"], m = step(holder["state"], batch, *extra)
            return m["loss"]

        t0 = time.perf_counter()
        jax.block_until_ready(once())
        return time.perf_counter() - t0, _timeit(once, args.iters)

    apply = lambda p, x, c_noise, cond: nnx.merge(graphdef, p)(x, c_noise, cond)
    distill_compile, distill_s = distill_bench("pd")
    lcd_compile, lcd_s = distill_bench("lcd")

    ts = uniform_time(args.nfe, schedule, t_end=0.0)

    @functools.partial(jax.jit, compiler_options=opts)
    def sample(p, x_T):
        den = dpm.network_denoiser(Partial(apply, p), schedule, "eps")
        return dpm_solver_pp(den, x_T, ts, order=2)

    x_T = shard_batch(jax.random.normal(jax.random.key(2), (args.sample_batch, H, H, C)), mesh)
    t0 = time.perf_counter()
    jax.block_until_ready(sample(p_rep, x_T))
    sample_compile = time.perf_counter() - t0
    sample_s = _timeit(lambda: sample(p_rep, x_T), args.iters)

    flops = forward_flops_per_image(cfg, compiler_options=opts)
    train_ips = args.train_batch / train_s
    sample_ips = args.sample_batch / sample_s
    result = {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "preset": args.preset, "dtype": args.dtype, "image_size": H, "channels": C,
        "base_channels": cfg.base_channels, "channel_mult": list(cfg.channel_mult),
        "fast_compile": bool(args.fast_compile),
        "params": int(n_params),
        "forward_gflop_per_image": flops / 1e9,
        "train_batch": args.train_batch, "sample_batch": args.sample_batch, "nfe": args.nfe,
        "train_images_per_s": train_ips, "sample_images_per_s": sample_ips,
        "train_compile_s": train_compile, "sample_compile_s": sample_compile,
        "train_hlo_lines": train_lines,
        "distill_compile_s": distill_compile,
        "distill_images_per_s": args.train_batch / distill_s,
        "lcd_compile_s": lcd_compile,
        "lcd_images_per_s": args.train_batch / lcd_s,
        "train_tflops": 3 * flops * train_ips / 1e12,
        "sample_tflops": flops * args.nfe * sample_ips / 1e12,
    }
    if per_leaf is not None:  # the same step with one moment array per parameter leaf
        result.update({"per_leaf_train_compile_s": per_leaf[0],
                       "per_leaf_train_images_per_s": args.train_batch / per_leaf[1],
                       "per_leaf_train_hlo_lines": per_leaf[2]})
    if args.peak_tflops:
        result["train_fraction_of_peak"] = result["train_tflops"] / args.peak_tflops
        result["sample_fraction_of_peak"] = result["sample_tflops"] / args.peak_tflops
    return result


def print_table(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"U-Net {r['preset']} ({r['params'] / 1e6:.2f}M params, "
                    f"{r['forward_gflop_per_image']:.3f} GFLOP/img fwd) on {r['backend']}, "
                    f"{r['dtype']}")
    for col in ("phase", "batch", "images/s", "TFLOP/s", "fraction of peak", "compile s"):
        t.add_column(col, justify="right")
    for ph, b in (("train", r["train_batch"]), ("sample", r["sample_batch"])):
        frac = r.get(f"{ph}_fraction_of_peak")
        t.add_row(f"{ph}" + (f" ({r['nfe']} NFE)" if ph == "sample" else ""), str(b),
                  f"{r[f'{ph}_images_per_s']:.1f}", f"{r[f'{ph}_tflops']:.4f}",
                  "-" if frac is None else f"{frac:.3f}", f"{r[f'{ph}_compile_s']:.1f}")
    t.add_row("distill (PD)", str(r["train_batch"]),
              f"{r['distill_images_per_s']:.1f}", "-", "-", f"{r['distill_compile_s']:.1f}")
    t.add_row("distill (LCD)", str(r["train_batch"]),
              f"{r['lcd_images_per_s']:.1f}", "-", "-", f"{r['lcd_compile_s']:.1f}")
    if "per_leaf_train_compile_s" in r:
        t.add_row("train, per-leaf optimizer", str(r["train_batch"]),
                  f"{r['per_leaf_train_images_per_s']:.1f}", "-", "-",
                  f"{r['per_leaf_train_compile_s']:.1f}")
    Console().print(t)
    print(f"train step StableHLO lines: {r['train_hlo_lines']} (optimizer on one raveled "
          "vector)" + (f", {r['per_leaf_train_hlo_lines']} per leaf"
                       if "per_leaf_train_hlo_lines" in r else ""))


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--image-size", type=int, default=8)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--base-channels", type=int, default=None, help="override the preset's width")
    p.add_argument("--channel-mult", default=None,
                   help="override the preset's levels, e.g. '1,2' (attention is then left out)")
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=256)
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--iters", type=int, default=5, help="timed iterations after compilation")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak, for the fraction of peak (H200 bf16 dense: ~790)")
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA backend optimisations off: faster compiles, slower steps (smoke runs)")
    p.add_argument("--per-leaf", action="store_true",
                   help="also time the train step with the per-leaf optimizer (flatten=False), "
                        "side by side")
    p.add_argument("--out", default="runs/bench_train")
    args = p.parse_args(argv)
    r = run(args)
    print_table(r)
    path = os.path.join(args.out, f"bench_train_{r['preset']}_{r['dtype']}_{r['backend']}.json")
    _io.write_json(path, r)
    print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
