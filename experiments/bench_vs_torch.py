"""Benchmark: the project side by side with PyTorch / diffusers, the same computations in one run.

    pip install -e ".[compare]"              # torch and diffusers (only this module uses them)
    python -m experiments.bench_vs_torch     # CPU-sized default (about a minute on 2 cores)
    python -m experiments.bench_vs_torch --preset ddpm_cifar10 --dtype bfloat16 \\
        --sample-batch 1024 --train-batch 256 --peak-tflops 989 --torch-compile   # one H200

**A. The network.** The project's ``nets.UNet`` of ``--preset`` and diffusers' ``UNet2DModel``
configured to the same shape (block widths, residual blocks per level, attention at the same
resolutions with the same head width, DDPM's time embedding: sin-then-cos, ``freq_shift=1``;
GroupNorm eps 1e-6; TF-"SAME" stride-2 downsampling, ``downsample_padding=0``). diffusers has one
GroupNorm group count for the whole net, the project ``min(32, channels // 4)`` per layer (32
everywhere at ``ddpm_cifar10``'s widths): every ``torch.nn.GroupNorm`` of the torch model is set
to the project's count of its width, so both compute one function. Before timing, the project's
parameters (randomly perturbed, so that no zero-initialised layer hides a wrong copy) are copied
into the torch model key by key (every key once: ``load_state_dict(strict=True)``), and the table
reports both parameter counts, the largest difference of one forward pass and of the
``--nfe``-step samples from the same noise (float32, TF32 off in both). Then, timed interleaved
(``--repeats`` repeats, the order of the frameworks reversed every repeat, the median reported):

* sampling, DPM-Solver++(2M) at ``--nfe`` evaluations on the DDPM linear schedule (N = 1000)
  and diffusers' ``trailing`` spacing (``solvers.grids.trailing``: 999, 899, ..., 99, then
  ``t = 0``; diffusers' default ``linspace`` spacing of ``DPMSolverMultistepScheduler``,
  999, 899, ..., 500, 400, ..., 100, is none of the project's grids): diffusers'
  ``DPMSolverMultistepScheduler`` loop (``algorithm_type="dpmsolver++"``, ``solver_order=2``,
  ``final_sigmas_type="zero"``) around the torch model, eager and, with ``--torch-compile``,
  ``torch.compile``-d (default mode), against ``solvers.dpm_solver_pp`` with the network
  denoiser, jitted whole;
* training, one step: eps-prediction MSE at a uniform training index, gradient clipped to norm 1,
  AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay: the project's default), EMA
  0.999, dropout as the preset says; torch eager / compiled model (fused AdamW on CUDA) against
  the project's jitted train step (``dpm.training``, as in ``bench_train``, on one device).
  torch gets ``cudnn.benchmark = True``; its float32 keeps torch's defaults (cuDNN convolutions
  may use TF32), JAX its default precision; both settings are recorded in the JSON.

Section A's JAX rows are then timed once more in a fresh interpreter that never imports torch
("project (JAX), own process"; ``--no-alone`` skips it): in one process the two frameworks'
CPU thread pools share the cores.

Both are timed in float32, and with ``--dtype bfloat16`` in bfloat16 as well: the project's
U-Net computes in bfloat16 with float32 parameters and GroupNorm statistics; torch runs the
same mixed precision with ``torch.autocast`` (float32 parameters, bfloat16 convolutions and
matmuls, float32 GroupNorm). Reported: images/s, the ratio project / torch (> 1: the project is
faster), model TFLOP/s (XLA's FLOP count of the forward pass, as in ``bench_train``; a training
step counts 3 forwards) and, with ``--peak-tflops``, the fraction of peak.

**B. The scheduler loop alone.** No network: the exact eps of a 2-D Gaussian mixture (8
Gaussians on a circle, ``bench_solvers.ring2d``), ``GaussianMixture.denoiser`` in the project
and the same closed form (``dpm/oracle.py``) written in torch for diffusers, batch 64. diffusers'
``DDIMScheduler`` (``clip_sample=False``, ``set_alpha_to_one=True``) and
``DPMSolverMultistepScheduler`` loops against ``jax.jit(solvers.ddim)`` /
``jax.jit(solvers.dpm_solver_pp)`` called as ``f(denoiser, x_T, ts)`` and the closed-over
``jax.jit(lambda x: solver(den, x, ts))``, at 10, 100 and 1000 steps on the ``trailing`` grid.
Both must give the same samples (max abs difference in the table; a difference above
``--tol`` stops the run). Time per sampling call, the median of the interleaved repeats as in A;
speed-up = torch time / project time. On a CPU torch runs this section single-threaded (its
best case: on (64, 2) arrays an intra-op thread pool only adds wake-ups, 20x slower loops on a
busy 2-core machine).

Prints the tables and writes ``bench_vs_torch_<preset>_<dtype>_<backend>.json`` into ``--out``.
torch and diffusers are imported inside functions only; without them the module imports and
its JAX side runs (:func:`jax_section_b`), and the benchmark stops with :func:`require_torch`'s
message.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# torch shares the device: JAX allocates GPU memory as it needs it instead of taking 75% of it
# up front (read when JAX starts its backends, so set before the first JAX import of the run)
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.tree_util import Partial  # noqa: E402

import dpm  # noqa: E402
import nets  # noqa: E402
from dpm.training import (  # noqa: E402
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)
from experiments import _io  # noqa: E402
from experiments._model import DTYPES, make_loss  # noqa: E402
from experiments.bench_solvers import ring2d  # noqa: E402
from experiments.bench_train import forward_flops_per_image  # noqa: E402
from solvers import ddim, dpm_solver_pp, grids  # noqa: E402

flops_per_image = functools.cache(forward_flops_per_image)  # compiled once per config

INSTALL_HINT = 'pip install -e ".[compare]"'
PRESETS = ("tiny", "ddpm_cifar10")
SOLVERS = {"ddim": ddim, "dpm_solver_pp_2M": dpm_solver_pp}
LR, EMA_DECAY, CLIP_NORM = 1e-4, 0.999, 1.0


def require_torch() -> tuple[Any, Any]:
    """``(torch, diffusers)``, or an ImportError that says how to install them."""
    try:
        import diffusers
        import torch
    except ImportError as e:
        raise ImportError(
            f"experiments.bench_vs_torch compares against PyTorch and diffusers, which are not "
            f"installed ({e}). Install them with: {INSTALL_HINT}  (the dpm package itself never "
            "imports torch)"
        ) from e
    return torch, diffusers


def unet_config(preset: str, dtype: str = "float32") -> nets.UNetConfig:
    """The benchmark's U-Net: ``tiny`` (16x16x3, widths 32 and 64, one residual block a level,
    attention at 8x8 with 2 heads of 32: 0.70M parameters) or DDPM's CIFAR-10 net (35.7M)."""
    if preset == "tiny":
        return nets.tiny(image_size=16, channels=3, base_channels=32, dtype=DTYPES[dtype])
    if preset == "ddpm_cifar10":
        return nets.ddpm_cifar10(dtype=DTYPES[dtype])
    raise ValueError(f"preset must be one of {PRESETS}; got {preset!r}")


# --------------------------------------------------------------------------------------------
# The same network in diffusers
# --------------------------------------------------------------------------------------------


def diffusers_unet_kwargs(cfg: nets.UNetConfig) -> dict:
    """``UNet2DModel`` keyword arguments of the network ``cfg`` describes (ValueError for the
    options diffusers' ``UNet2DModel`` has no counterpart of)."""
    unsupported = dict(num_classes=None, extra_in_channels=0, vector_cond_dim=0,
                       learned_variance=False, use_scale_shift_norm=False,
                       resample_with_conv=True, padding="SAME", context_dim=0)
    for name, plain in unsupported.items():
        if getattr(cfg, name) != plain:
            raise ValueError(f"bench_vs_torch builds only plain DDPM U-Nets; got {name}="
                             f"{getattr(cfg, name)!r}, expected {plain!r}")
    sizes = [cfg.image_size // 2**i for i in range(cfg.num_levels)]
    widths = [cfg.base_channels * m for m in cfg.channel_mult]
    attn = [w for s, w in zip(sizes, widths, strict=True) if s in cfg.attn_resolutions]
    head_dims = {w // cfg.heads(w) for w in attn + [widths[-1]]}  # the middle block attends
    if len(head_dims) != 1:
        raise ValueError(f"diffusers' UNet2DModel has one attention head width; this config's "
                         f"attention layers have {sorted(head_dims)}")
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.output_channels,
        block_out_channels=tuple(widths),
        layers_per_block=cfg.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if s in cfg.attn_resolutions else "DownBlock2D"
                               for s in sizes),
        up_block_types=tuple("AttnUpBlock2D" if s in cfg.attn_resolutions else "UpBlock2D"
                             for s in reversed(sizes)),
        attention_head_dim=head_dims.pop(),
        time_embedding_type="positional",
        flip_sin_to_cos=False,  # DDPM: [sin, cos]
        freq_shift=1,  # frequencies 10000^(-k / (half - 1))
        downsample_padding=0,  # pad (0, 1, 0, 1): TF / XLA "SAME" for a stride-2 3x3 conv
        dropout=cfg.dropout,
        norm_eps=1e-6,
        norm_num_groups=32,  # replaced layer by layer by match_group_norms
        act_fn="silu",
    )


def match_group_norms(model) -> int:
    """Sets every ``torch.nn.GroupNorm`` of ``model`` to the project's group count for its
    width (``nets._layers.group_count``); returns how many changed."""
    import torch

    from nets._layers import group_count

    changed = 0
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            g = group_count(m.num_channels)
            changed += g != m.num_groups
            m.num_groups = g
    return changed


# project parameter path -> diffusers state_dict key, applied in order
_RENAMES = (
    (r"^emb_0\.", "time_embedding.linear_1."),
    (r"^emb_1\.", "time_embedding.linear_2."),
    (r"^(down|up)\.(\d+)\.blocks\.", r"\1_blocks.\2.resnets."),
    (r"^(down|up)\.(\d+)\.attns\.", r"\1_blocks.\2.attentions."),
    (r"^down\.(\d+)\.resample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^up\.(\d+)\.resample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^mid_res_(\d+)\.", r"mid_block.resnets.\1."),
    (r"^mid_attn\.", "mid_block.attentions.0."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.emb_proj\.", ".time_emb_proj."),
    (r"\.skip\.", ".conv_shortcut."),
    (r"(attentions\.\d+)\.norm\.", r"\1.group_norm."),
    (r"\.proj_out\.", ".to_out.0."),
    (r"\.(scale|kernel)$", ".weight"),
)


def torch_state_dict(params) -> dict[str, np.ndarray]:
    """The project U-Net's parameters as a diffusers ``UNet2DModel`` state dict: NHWC kernels
    ``(kh, kw, in, out)`` -> ``(out, in, kh, kw)``, dense ``(in, out)`` -> ``(out, in)``, the
    fused qkv projection split into ``to_q``, ``to_k``, ``to_v`` (heads are contiguous column
    blocks in both)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0]:
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        a = np.asarray(leaf, np.float32)
        if a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        elif a.ndim == 2:
            a = a.T
        for pattern, repl in _RENAMES:
            name = re.sub(pattern, repl, name)
        qkv = re.fullmatch(r"(.*)\.qkv\.(weight|bias)", name)
        if qkv:
            for part, piece in zip(("to_q", "to_k", "to_v"), np.split(a, 3, axis=0), strict=True):
                out[f"{qkv[1]}.{part}.{qkv[2]}"] = piece
        else:
            out[name] = a
    return out


def build_torch_unet(cfg: nets.UNetConfig, params, device) -> tuple[Any, int]:
    """diffusers' ``UNet2DModel`` of ``cfg`` on ``device`` holding the project's ``params``,
    and the number of its GroupNorms set to another group count (:func:`match_group_norms`)."""
    import torch
    from diffusers import UNet2DModel

    model = UNet2DModel(**diffusers_unet_kwargs(cfg))
    changed = match_group_norms(model)
    sd = {k: torch.tensor(v) for k, v in torch_state_dict(params).items()}
    model.load_state_dict(sd, strict=True)  # every key once, every shape checked
    return model.to(device), changed


def perturbed(params, scale: float = 0.01, seed: int = 1):
    """``params + scale * N(0, 1)``: no layer left at its zero initialisation."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                        for p, k in zip(leaves, keys, strict=True)])


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


def _calibrate(fn: Callable[[], Any], min_s: float) -> tuple[int, float]:
    """``(calls per timed chunk, seconds of one call)``: enough calls to last ``min_s``."""
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    return max(1, int(np.ceil(min_s / max(once, 1e-9)))), once


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, min_s: float,
                settle_s: float = 0.05) -> dict:
    """Median seconds per call of each (warm, self-synchronising) ``fn``, timed in chunks of
    at least ``min_s``, the variants interleaved and their order reversed every repeat; a pause
    of ``settle_s`` before each chunk lets the previous framework's worker threads go idle
    (XLA's and OpenMP's CPU thread pools spin-wait after work)."""
    calls = {name: _calibrate(fn, min_s)[0] for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            time.sleep(settle_s)
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            times[name].append((time.perf_counter() - t0) / calls[name])
    return {name: statistics.median(ts) for name, ts in times.items()}


def _first_call(fn: Callable[[], Any]) -> tuple[float | None, str | None]:
    """Seconds of the first (compiling) call, or ``(None, error)`` when it fails."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # torch.compile may fail on a machine without a working toolchain
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return time.perf_counter() - t0, None


# --------------------------------------------------------------------------------------------
# Section A: the network
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TorchSide:
    """torch and its device."""

    torch: Any
    device: Any

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def autocast(self, dtype: str):
        """torch's mixed precision for the project's ``dtype`` (a no-op for float32)."""
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16,
                                   enabled=dtype == "bfloat16")


def make_torch_side(dtype: str) -> TorchSide:
    torch, _ = require_torch()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--dtype bfloat16: the device {torch.cuda.get_device_name()} does not "
                         "support bfloat16")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16; got {dtype!r}")
    return TorchSide(torch, device)


def dpm_scheduler(num_train_timesteps: int = 1000):
    """diffusers' DPM-Solver++(2M) on DDPM's linear betas, on the ``trailing`` grid, ending at
    ``sigma = 0`` with a first-order step (the project's ``dpm_solver_pp`` defaults)."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4,
        beta_end=0.02, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        prediction_type="epsilon", timestep_spacing="trailing", final_sigmas_type="zero",
        lower_order_final=True, thresholding=False,
    )


def ddim_scheduler(num_train_timesteps: int = 1000):
    """diffusers' deterministic DDIM on DDPM's linear betas, ``trailing`` grid, ending at
    ``alpha_bar = 1`` (``t = 0``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=num_train_timesteps, beta_schedule="linear", beta_start=1e-4,
        beta_end=0.02, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
        prediction_type="epsilon", timestep_spacing="trailing",
    )


def diffusers_sample(eps_model, scheduler, x_T, steps: int, autocast=None):
    """The standard diffusers sampling loop: ``x <- scheduler.step(eps(x, t), t, x)``."""
    import contextlib

    import torch

    scheduler.set_timesteps(steps, device=x_T.device)
    x = x_T
    with torch.inference_mode():
        for t in scheduler.timesteps:
            with autocast or contextlib.nullcontext():
                eps = eps_model(x, t)
            x = scheduler.step(eps.float(), t, x).prev_sample
    return x


def jax_sampler(graphdef, schedule, ts) -> Callable:
    """``sample(params, x_T)``: DPM-Solver++(2M) on ``ts`` with the U-Net, jitted whole."""
    apply = lambda p, x, c_noise, cond: nnx.merge(graphdef, p)(x, c_noise, cond)

    @jax.jit
    def sample(params, x_T):
        den = dpm.network_denoiser(Partial(apply, params), schedule, "eps")
        return dpm_solver_pp(den, x_T, ts, order=2)

    return sample


def check_same_network(cfg32, graphdef32, params, tmodel, ts_side: TorchSide, schedule, nfe,
                       batch: int = 4) -> dict:
    """Both nets on the same input, float32, TF32 off: parameter counts and the largest
    differences of one forward pass and of the ``nfe``-step DPM-Solver++(2M) samples."""
    torch = ts_side.torch
    H, C = cfg32.image_size, cfg32.in_channels
    x = jax.random.normal(jax.random.key(7), (batch, H, H, C))
    t_index = jnp.linspace(0.0, 999.0, batch)
    to_torch = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy()).to(
        ts_side.device)
    from_torch = lambda a: a.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with jax.default_matmul_precision("float32"):
            out_jax = jax.jit(lambda p, x, t: nnx.merge(graphdef32, p)(x, t))(params, x, t_index)
            ts = grids.trailing(nfe, schedule)
            x0_jax = jax_sampler(graphdef32, schedule, ts)(params, x)
        tmodel.eval()
        with torch.inference_mode():
            out_torch = from_torch(tmodel(to_torch(x), torch.from_numpy(np.array(t_index))
                                          .to(ts_side.device)).sample)
        x0_torch = from_torch(diffusers_sample(lambda x, t: tmodel(x, t).sample,
                                               dpm_scheduler(), to_torch(x), nfe))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return {
        "params_project": int(sum(p.size for p in jax.tree.leaves(params))),
        "params_diffusers": int(sum(p.numel() for p in tmodel.parameters())),
        "forward_max_abs": float(np.max(np.abs(out_jax))),
        "forward_max_abs_diff": float(np.max(np.abs(np.asarray(out_jax) - out_torch))),
        "samples_max_abs": float(np.max(np.abs(x0_jax))),
        "samples_max_abs_diff": float(np.max(np.abs(np.asarray(x0_jax) - x0_torch))),
    }


def torch_train_step(model, ts_side: TorchSide, alphas_cumprod, compiled: bool, autocast):
    """``step(x0) -> loss``: eps MSE at a uniform training index, clip, AdamW, EMA."""
    torch = ts_side.torch
    params = [p for p in model.parameters()]
    ema = [p.detach().clone() for p in params]
    fused = ts_side.device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                            fused=fused or None)
    net = torch.compile(model) if compiled else model
    ab = alphas_cumprod.to(ts_side.device)

    def step(x0):
        model.train()
        t = torch.randint(0, ab.shape[0], (x0.shape[0],), device=x0.device)
        eps = torch.randn_like(x0)
        a = ab[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        with autocast():
            out = net(x_t, t).sample
        loss = torch.mean((out.float() - eps) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - EMA_DECAY)
        return loss

    return step


def jax_train_step(graphdef, params, schedule, batch_size: int, H: int, C: int) -> Callable:
    """``step() -> loss``: the project's jitted train step (``dpm.training``, on a one-device
    mesh) on a fixed batch (eps loss at a discrete training index, clip, AdamW, EMA), its state
    carried along."""
    import ml_collections

    mesh = make_mesh(jax.devices()[:1])  # one device, as torch
    diffusion = ml_collections.ConfigDict(dict(prediction="eps", weighting="eps",
                                               time_sampler="discrete", preconditioning=None))
    opt = make_optimizer(LR, total_steps=10_000, schedule="constant", clip_norm=CLIP_NORM,
                         flatten=False)  # per-leaf moments, as experiments.train
    train_step = make_train_step(make_loss(graphdef, schedule, diffusion), opt,
                                 ema_decay=EMA_DECAY)
    state = replicate(init_train_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(0)),
                      mesh)
    batch = shard_batch({"x": jax.random.normal(jax.random.key(1), (batch_size, H, H, C))}, mesh)
    step = jit_train_step(train_step, mesh)
    holder = {"state": state}

    def once():
        holder["state"], m = step(holder["state"], batch)
        return jax.block_until_ready(m["loss"])

    return once


ALONE = "project (JAX), own process"


def jax_alone_rows(args) -> list[dict]:
    """Section A's JAX sampling and training timed in a process that never loads torch.

    In one process with torch, XLA's CPU programs run slower than alone (measured on 2 cores:
    the tiny U-Net's 10-NFE sampling 89 images/s alone, ~62 interleaved with torch; importing
    torch and running one op already costs ~12 %): the two frameworks' thread pools share the
    cores. This row is the JAX side as a user runs it; the ratio beside it divides by the torch
    row of the interleaved timing."""
    cfg32 = unet_config(args.preset)
    _, params = nets.init_params(nets.UNet, cfg32, seed=0)
    params = perturbed(params)
    schedule = dpm.DiscreteVP.from_name("linear")
    rows = []
    for dtype in dict.fromkeys(("float32", args.dtype)):
        cfg = unet_config(args.preset, dtype)
        H, C = cfg.image_size, cfg.in_channels
        graphdef = nnx.split(nnx.eval_shape(lambda cfg=cfg: nets.UNet(cfg, rngs=nnx.Rngs(0))),
                             nnx.Param)[0]
        sample = jax_sampler(graphdef, schedule, grids.trailing(args.nfe, schedule))
        x_T = jax.random.normal(jax.random.key(2), (args.sample_batch, H, H, C))
        sample_once = functools.partial(lambda s, x: jax.block_until_ready(s(params, x)),
                                        sample, x_T)
        fns = {
            f"sample ({args.nfe} NFE)": (sample_once, args.sample_batch),
            "train step": (jax_train_step(graphdef, params, schedule, args.train_batch, H, C),
                           args.train_batch),
        }
        for phase, (fn, batch) in fns.items():
            first, err = _first_call(fn)
            sec = interleaved({ALONE: fn}, args.repeats, args.min_time)[ALONE]
            rows.append(dict(phase=phase, dtype=dtype, framework=ALONE, batch=batch,
                             first_call_s=first, error=err, seconds=sec,
                             images_per_s=batch / sec))
    return rows


def run_alone(args) -> list[dict]:
    """:func:`jax_alone_rows` in a fresh interpreter (torch never imported there)."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "alone.json")
        cmd = [sys.executable, "-m", "experiments.bench_vs_torch", "--jax-alone-json", out,
               "--preset", args.preset, "--dtype", args.dtype, "--nfe", str(args.nfe),
               "--sample-batch", str(args.sample_batch), "--train-batch", str(args.train_batch),
               "--repeats", str(args.repeats), "--min-time", str(args.min_time)]
        print("[A] the JAX side again, in its own process (no torch loaded) ...")
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def section_a(args, ts_side: TorchSide) -> dict:
    """Section A: the same U-Net in both frameworks, checked, then sampling and training timed
    interleaved, in float32 and, with ``--dtype bfloat16``, in bfloat16 too."""
    cfg32 = unet_config(args.preset)
    graphdef32, params = nets.init_params(nets.UNet, cfg32, seed=0)
    params = perturbed(params)
    schedule = dpm.DiscreteVP.from_name("linear")
    tmodel, groups_changed = build_torch_unet(cfg32, params, ts_side.device)
    print(f"[A] {args.preset}: checking that both nets compute the same function ...")
    check = check_same_network(cfg32, graphdef32, params, tmodel, ts_side, schedule, args.nfe)
    for what in ("forward", "samples"):
        if check[f"{what}_max_abs_diff"] > args.tol * max(1.0, check[f"{what}_max_abs"]):
            raise RuntimeError(f"section A: the two nets' {what} differ by "
                               f"{check[f'{what}_max_abs_diff']:.3g} (> --tol {args.tol} x scale):"
                               " the comparison would not time the same computation")
    rows = []
    for dtype in dict.fromkeys(("float32", args.dtype)):
        rows += time_section_a(args, ts_side, dtype, params, tmodel, schedule)
    if args.alone:
        for row in run_alone(args):
            torch_row = next((r for r in rows if r["phase"] == row["phase"] and r["dtype"]
                              == row["dtype"] and r["framework"] == "torch eager"), None)
            if torch_row is not None and torch_row.get("images_per_s"):
                row["project_over_torch"] = row["images_per_s"] / torch_row["images_per_s"]
            flop = (args.nfe if row["phase"].startswith("sample") else 3) * flops_per_image(cfg32)
            row["tflops"] = flop * row["images_per_s"] / 1e12
            if args.peak_tflops:
                row["fraction_of_peak"] = row["tflops"] / args.peak_tflops
            at = max(i for i, r in enumerate(rows)
                     if r["phase"] == row["phase"] and r["dtype"] == row["dtype"])
            rows.insert(at + 1, row)
    return dict(check=check, forward_gflop_per_image=flops_per_image(cfg32) / 1e9,
                rows=rows, diffusers_config=diffusers_unet_kwargs(cfg32),
                group_norms_changed=groups_changed)


def time_section_a(args, ts_side: TorchSide, dtype: str, params, tmodel, schedule) -> list[dict]:
    """The rows of section A in ``dtype``: sampling and training, every framework variant."""
    torch = ts_side.torch
    cfg = unet_config(args.preset, dtype)
    H, C = cfg.image_size, cfg.in_channels
    graphdef = nnx.split(nnx.eval_shape(lambda: nets.UNet(cfg, rngs=nnx.Rngs(0))), nnx.Param)[0]
    autocast = functools.partial(ts_side.autocast, dtype)

    # sampling
    sample = jax_sampler(graphdef, schedule, grids.trailing(args.nfe, schedule))
    x_T = jax.random.normal(jax.random.key(2), (args.sample_batch, H, H, C))
    xt_T = torch.randn(args.sample_batch, C, H, H, device=ts_side.device)
    tmodel.eval()
    sample_fns = {"project (JAX)": lambda: jax.block_until_ready(sample(params, x_T))}
    variants = {"torch eager": lambda x, t: tmodel(x, t).sample}
    if args.torch_compile:
        compiled_model = torch.compile(tmodel)
        variants["torch.compile"] = lambda x, t: compiled_model(x, t).sample
    for name, eps_model in variants.items():
        sched = dpm_scheduler()

        def run(eps_model=eps_model, sched=sched):
            out = diffusers_sample(eps_model, sched, xt_T, args.nfe, autocast())
            ts_side.sync()
            return out

        sample_fns[name] = run

    # training: every torch step updates its own copy of the model
    train_fns = {"project (JAX)": jax_train_step(graphdef, params, schedule, args.train_batch,
                                                 H, C)}
    ab = dpm_scheduler().alphas_cumprod
    x0_torch = torch.randn(args.train_batch, C, H, H, device=ts_side.device)
    for name, with_compile in (("torch eager", False), ("torch.compile", True)):
        if with_compile and not args.torch_compile:
            continue
        step = torch_train_step(build_torch_unet(unet_config(args.preset), params,
                                                 ts_side.device)[0],
                                ts_side, ab, with_compile, autocast)

        def run(step=step):
            loss = step(x0_torch)
            ts_side.sync()
            return loss

        train_fns[name] = run

    flops = flops_per_image(cfg)
    rows = []
    for phase, fns, batch, flop in (
        (f"sample ({args.nfe} NFE)", sample_fns, args.sample_batch, args.nfe * flops),
        ("train step", train_fns, args.train_batch, 3 * flops),
    ):
        print(f"[A] {phase}, {dtype}: first calls (compilation) ...")
        first = {name: _first_call(fn) for name, fn in fns.items()}
        ok = {name: fn for name, fn in fns.items() if first[name][1] is None}
        print(f"[A] {phase}, {dtype}: timing {list(ok)} interleaved, {args.repeats} repeats ...")
        sec = interleaved(ok, args.repeats, args.min_time)
        jax_ips = batch / sec["project (JAX)"] if "project (JAX)" in sec else None
        for name in fns:
            row = dict(phase=phase, dtype=dtype, framework=name, batch=batch,
                       first_call_s=first[name][0], error=first[name][1])
            if name in sec:
                ips = batch / sec[name]
                row.update(seconds=sec[name], images_per_s=ips,
                           tflops=flop * ips / 1e12)
                if name != "project (JAX)" and jax_ips:
                    row["project_over_torch"] = jax_ips / ips
                if args.peak_tflops:
                    row["fraction_of_peak"] = row["tflops"] / args.peak_tflops
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Section B: the scheduler loop alone, on the exact Gaussian-mixture model
# --------------------------------------------------------------------------------------------


def torch_mixture_eps(gm: dpm.GaussianMixture, alphas_cumprod, device) -> Callable:
    """``eps(x, t)`` of ``gm`` at training index ``t`` in torch: the closed form of
    ``GaussianMixture.posterior_mean`` (``dpm/oracle.py``), float32."""
    import torch

    f32 = lambda a: torch.tensor(np.array(a, np.float32), device=device)
    means, stds, log_w = f32(gm.means), f32(gm.stds), f32(np.log(np.asarray(gm.weights)))
    ab = alphas_cumprod.to(device)
    D = means.shape[-1]

    def eps(x, t):
        alpha, sigma = ab[t].sqrt(), (1.0 - ab[t]).sqrt()
        diff = x[:, None, :] - alpha * means  # (B, K, D)
        v = alpha**2 * stds**2 + sigma**2  # (K,)
        loglik = log_w - 0.5 * D * torch.log(2 * np.pi * v) - 0.5 * (diff**2).sum(-1) / v
        r = torch.softmax(loglik, dim=-1)[..., None]  # responsibilities (B, K, 1)
        return (r * (sigma / v)[:, None] * diff).sum(-2)

    return eps


def _closed_over(solver, den, ts) -> Callable:
    return jax.jit(lambda x: solver(den, x, ts))  # the denoiser and grid: compile-time constants


def jax_section_b(steps: Sequence[int], batch: int = 64, seed: int = 0) -> dict:
    """The project's side of section B: for every solver and step count, the jitted samplers
    ``f(den, x_T, ts)`` and ``lambda x: solver(den, x, ts)`` (warm, self-synchronising), their
    samples and the shared inputs. Needs no torch."""
    gm, schedule = ring2d(), dpm.DiscreteVP.from_name("linear")
    den = gm.denoiser(schedule, "eps")
    x_T = jax.random.normal(jax.random.key(seed), (batch, gm.dim))
    out = {"gm": gm, "x_T": x_T, "cells": {}}
    for name, solver in SOLVERS.items():
        f = jax.jit(solver)
        for S in steps:
            ts = grids.trailing(S, schedule)
            g = _closed_over(solver, den, ts)
            x0 = jax.block_until_ready(f(den, x_T, ts))
            jax.block_until_ready(g(x_T))
            out["cells"][name, S] = dict(
                x0=np.asarray(x0),
                fns={"project f(den, x, ts)":
                     lambda f=f, ts=ts: jax.block_until_ready(f(den, x_T, ts)),
                     "project closed-over": lambda g=g: jax.block_until_ready(g(x_T))})
    return out


def section_b(args, ts_side: TorchSide) -> list[dict]:
    """Section B: diffusers' DDIM / DPM-Solver++(2M) loops vs the project's jitted samplers on
    the exact mixture eps: same samples checked, then times interleaved."""
    torch = ts_side.torch
    steps = [int(s) for s in args.steps.split(",")]
    print(f"[B] compiling the project's samplers at {steps} steps ...")
    jx = jax_section_b(steps, args.b_batch)
    xt_T = torch.from_numpy(np.array(jx["x_T"])).to(ts_side.device)
    threads = torch.get_num_threads()
    if ts_side.device.type == "cpu":  # (64, 2) arrays: an intra-op pool only adds wake-ups
        torch.set_num_threads(1)
    try:
        return _section_b_rows(args, ts_side, jx, xt_T)
    finally:
        torch.set_num_threads(threads)


def _section_b_rows(args, ts_side: TorchSide, jx: dict, xt_T) -> list[dict]:
    torch = ts_side.torch
    rows = []
    for (name, S), cell in jx["cells"].items():
        sched = dpm_scheduler() if name == "dpm_solver_pp_2M" else ddim_scheduler()
        eps = torch_mixture_eps(jx["gm"], sched.alphas_cumprod, ts_side.device)

        def run(sched=sched, eps=eps, S=S):
            out = diffusers_sample(eps, sched, xt_T, S)
            ts_side.sync()
            return out

        diff = float(np.max(np.abs(cell["x0"] - run().cpu().numpy())))
        if not diff <= args.tol * max(1.0, float(np.max(np.abs(cell["x0"])))):
            raise RuntimeError(f"section B: {name} at {S} steps: project and diffusers samples "
                               f"differ by {diff:.3g} (> --tol {args.tol}): not the same "
                               "computation")
        print(f"[B] {name}, {S} steps: max |x_project - x_diffusers| = {diff:.2e}; timing ...")
        sec = interleaved({**cell["fns"], "diffusers": run}, args.repeats, args.min_time)
        rows.append(dict(solver=name, steps=S, batch=args.b_batch, max_abs_diff=diff,
                         diffusers_ms=1e3 * sec["diffusers"],
                         project_ms=1e3 * sec["project f(den, x, ts)"],
                         project_closed_ms=1e3 * sec["project closed-over"],
                         speedup=sec["diffusers"] / sec["project f(den, x, ts)"],
                         speedup_closed=sec["diffusers"] / sec["project closed-over"],
                         torch_threads=torch.get_num_threads()))
    return rows


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def environment(ts_side: TorchSide) -> dict:
    torch = ts_side.torch
    import diffusers

    dev = ts_side.device
    return {
        "jax": jax.__version__, "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "torch_device": str(dev) + (f" ({torch.cuda.get_device_name()})"
                                    if dev.type == "cuda" else ""),
        "torch_threads": torch.get_num_threads(),
        "torch_cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "torch_cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "torch_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
        "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0],
        "xla_python_client_preallocate": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE"),
    }


def run(args) -> dict:
    ts_side = make_torch_side(args.dtype)
    torch = ts_side.torch
    torch.manual_seed(0)
    env = environment(ts_side)
    if env["jax_backend"] != ts_side.device.type and not (
            env["jax_backend"] == "gpu" and ts_side.device.type == "cuda"):
        print(f"warning: JAX runs on {env['jax_backend']}, torch on {ts_side.device}")
    if env["load_average_1min"] > 0.5 * env["cpu_count"]:
        print(f"warning: load average {env['load_average_1min']:.1f} on {env['cpu_count']} "
              "CPUs: other processes share the machine, the CPU times are noisy")
    result: dict = {"env": env, "args": vars(args), "preset": args.preset, "dtype": args.dtype}
    t0 = time.perf_counter()
    if "a" in args.sections:
        result["section_a"] = section_a(args, ts_side)
    if "b" in args.sections:
        result["section_b"] = section_b(args, ts_side)
    result["wall_s"] = time.perf_counter() - t0
    result["load_average_1min_at_end"] = os.getloadavg()[0]
    return result


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_tables(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console, env = Console(width=150), r["env"]
    console.print(f"JAX {env['jax']} on {env['jax_devices'][0]}; torch {env['torch']} on "
                  f"{env['torch_device']} ({env['torch_threads']} threads); diffusers "
                  f"{env['diffusers']}")
    if "section_a" in r:
        a, c = r["section_a"], r["section_a"]["check"]
        t = Table(title=f"A. U-Net {r['preset']}: {c['params_project'] / 1e6:.3f}M "
                        f"params (project) / {c['params_diffusers'] / 1e6:.3f}M (diffusers), "
                        f"{a['forward_gflop_per_image']:.3f} GFLOP/img forward")
        for col in ("phase", "dtype", "framework", "batch", "images/s", "project / torch",
                    "TFLOP/s", "fraction of peak", "first call s"):
            t.add_column(col, justify="right")
        for row in a["rows"]:
            t.add_row(row["phase"], row["dtype"], row["framework"], str(row["batch"]),
                      _f(row.get("images_per_s"), ".1f") if not row["error"] else "failed",
                      _f(row.get("project_over_torch"), ".2f"), _f(row.get("tflops"), ".4f"),
                      _f(row.get("fraction_of_peak"), ".3f"), _f(row["first_call_s"], ".1f"))
        console.print(t)
        for row in a["rows"]:
            if row["error"]:
                console.print(f"  {row['phase']}, {row['dtype']}, {row['framework']} failed: "
                              f"{row['error']}")
        console.print(f"  same function (float32, TF32 off): forward max |diff| "
                      f"{c['forward_max_abs_diff']:.2e} (outputs up to {c['forward_max_abs']:.2f}),"
                      f" {r['args']['nfe']}-step samples max |diff| {c['samples_max_abs_diff']:.2e}"
                      f" (up to {c['samples_max_abs']:.2f});\n  {a['group_norms_changed']} torch "
                      "GroupNorms set to the project's group count of their width")
    if "section_b" in r:
        t = Table(title="B. Scheduler loop alone: exact 2-D Gaussian-mixture eps, batch "
                        f"{r['args']['b_batch']}, ms per sampling call "
                        "(speed-up = torch / project)")
        for col in ("solver", "steps", "max |x_proj - x_diff|", "diffusers ms",
                    "project f(den,x,ts) ms", "speed-up", "closed-over ms", "speed-up"):
            t.add_column(col, justify="right")
        for row in r["section_b"]:
            t.add_row(row["solver"], str(row["steps"]), f"{row['max_abs_diff']:.1e}",
                      f"{row['diffusers_ms']:.2f}", f"{row['project_ms']:.3f}",
                      f"{row['speedup']:.0f}x", f"{row['project_closed_ms']:.3f}",
                      f"{row['speedup_closed']:.0f}x")
        console.print(t)
    console.print(f"wall time {r['wall_s'] / 60:.1f} min; load average "
                  f"{env['load_average_1min']:.1f} at the start, "
                  f"{r['load_average_1min_at_end']:.1f} at the end ({env['cpu_count']} CPUs)")


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="bfloat16: section A is timed in bfloat16 after float32")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--train-batch", type=int, default=32)
    p.add_argument("--nfe", type=int, default=10, help="DPM-Solver++(2M) steps in section A")
    p.add_argument("--steps", default="10,100,1000", help="section B step counts")
    p.add_argument("--b-batch", type=int, default=64, help="section B batch (2-D points)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats (median)")
    p.add_argument("--min-time", type=float, default=0.05,
                   help="seconds a timed chunk of calls lasts at least")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak, for the fraction of peak (H200 bf16 dense: 989)")
    p.add_argument("--tol", type=float, default=1e-3,
                   help="largest max |difference| of the two frameworks' outputs, relative to "
                        "max(1, max |output|)")
    p.add_argument("--sections", default="ab", help="'a', 'b' or 'ab'")
    p.add_argument("--no-alone", dest="alone", action="store_false",
                   help="skip section A's JAX rows timed again in a process without torch")
    p.add_argument("--jax-alone-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="runs/bench_vs_torch")
    args = p.parse_args(argv)
    if args.repeats < 1 or not set(args.sections) <= {"a", "b"} or not args.sections:
        p.error("--repeats must be >= 1 and --sections one of 'a', 'b', 'ab'")
    if args.jax_alone_json:  # the child of run_alone: JAX only, torch never imported
        _io.write_json(args.jax_alone_json, jax_alone_rows(args))
        return {}
    r = run(args)
    print_tables(r)
    path = os.path.join(args.out, f"bench_vs_torch_{args.preset}_{args.dtype}_"
                                  f"{r['env']['jax_backend']}.json")
    _io.write_json(path, r)
    print(f"wrote {path}")
    return r


if __name__ == "__main__":
    main(sys.argv[1:])
