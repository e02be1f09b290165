"""The training driver shared by ``experiments.train``, the quickstart and the paper modules:
data iterator, U-Net, optimizer, data-parallel jitted step, atomic resumable checkpoints,
a progress bar, JSON-lines metrics and periodic PNG sample grids."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import dpm
import nets
from dpm.data import BatchIterator, train_test_split
from dpm.training import (
    Checkpointer,
    TrainState,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
    warmup_ema_decay,
)
from experiments import _io
from experiments._model import build_unet, make_denoiser, make_loss, make_schedule, unet_config
from experiments.registry import make_dataset


@dataclasses.dataclass
class Trained:
    """What a training run hands to evaluation."""

    graphdef: nnx.GraphDef
    state: TrainState
    schedule: dpm.Schedule
    unet: nets.UNetConfig
    data: dict[str, np.ndarray]  # the training split
    diffusion: ml_collections.ConfigDict
    steps_run: int  # steps taken in this invocation (0 when fully restored)
    seconds: float
    test_data: dict[str, np.ndarray] | None = None  # held out (config.data.test_fraction)

    def denoiser(self, cond=None, *, ema: bool = True) -> dpm.Denoiser:
        """The trained Denoiser (EMA parameters by default) with condition ``cond``."""
        params = self.state.ema_params if ema else self.state.params
        return make_denoiser(self.graphdef, params, self.schedule, self.diffusion, cond)


def base_config() -> ml_collections.ConfigDict:
    """Defaults of a denoiser training run (experiments override what they need)."""
    c = ml_collections.ConfigDict()
    c.name = "train"
    c.seed = 0
    c.data = ml_collections.ConfigDict(
        dict(name="digits", kwargs=dict(image_size=8), test_fraction=0.0, split_seed=0)
    )
    c.model = ml_collections.ConfigDict(
        dict(preset="tiny", dtype="float32", num_classes=None, label_dropout=0.1,
             base_channels=None, channel_mult=None, num_res_blocks=None,
             attn_resolutions=None, dropout=None, extra_in_channels=0)
    )
    c.diffusion = ml_collections.ConfigDict(
        dict(schedule="linear", num_steps=1000, prediction="eps", weighting="eps",
             time_sampler="discrete", preconditioning=None, sigma_data=0.5)
    )
    c.optim = ml_collections.ConfigDict(
        dict(learning_rate=2e-3, warmup_steps=100, weight_decay=0.0, clip_norm=1.0,
             ema_decay=0.999, schedule="cosine")
    )
    c.train = ml_collections.ConfigDict(
        dict(steps=2000, batch_size=128, log_every=50, ckpt_every=500, keep=3,
             sample_every=0, sample_steps=20, num_sample_images=64)
    )
    return c


def _checkpoint_config(config) -> dict[str, Any]:
    # What must match to resume: the model, its diffusion and the data (not step counts).
    return {k: config[k].to_dict() for k in ("model", "diffusion", "data")}


def _sample_grid(trained: Trained, config, n: int, steps: int, key) -> np.ndarray:
    from solvers.ddim import ddim
    from solvers.grids import uniform_time

    u = trained.unet
    cond = None
    if u.num_classes is not None:
        cond = {"label": jnp.arange(n, dtype=jnp.int32) % u.num_classes}
    den = trained.denoiser(cond)
    x_T = jax.random.normal(key, (n, u.image_size, u.image_size, u.in_channels))
    ts = uniform_time(steps, t_end=0.0)
    return np.asarray(jax.jit(ddim)(den, x_T, ts))


def train_denoiser(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
) -> Trained:
    """Trains (or resumes training of) a U-Net denoiser as ``config`` says.

    Re-running with the same ``workdir`` restores the latest checkpoint (parameters, optimizer,
    EMA, PRNG key and data position) and continues to ``config.train.steps``; a checkpoint of
    another model/diffusion/data config is refused with a clear error.
    """
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    data, test_data = train_test_split(
        make_dataset(config.data.name, **config.data.kwargs.to_dict()),
        config.data.get("test_fraction", 0.0), seed=config.data.get("split_seed", 0),
    )
    arrays = {"x": data["x"]}
    if config.model.num_classes is not None:
        if "y" not in data:
            raise ValueError(
                f"model.num_classes is set but data {config.data.name!r} has no labels"
            )
        arrays["y"] = data["y"]
    it = BatchIterator(arrays, config.train.batch_size, seed=config.seed)
    _, H, W, C = data["x"].shape
    ucfg = unet_config(config.model, H, C)
    graphdef, params = build_unet(ucfg, config.seed)
    schedule = make_schedule(config.diffusion)
    o = config.optim
    optimizer = make_optimizer(
        o.learning_rate, total_steps=config.train.steps,
        warmup_steps=min(o.warmup_steps, config.train.steps - 1),
        weight_decay=o.weight_decay, clip_norm=o.clip_norm, schedule=o.schedule,
    )
    mesh = make_mesh()
    state = replicate(init_train_state(params, optimizer, jax.random.key(config.seed)), mesh)
    loss = make_loss(graphdef, schedule, config.diffusion, num_classes=ucfg.num_classes,
                     label_dropout=config.model.label_dropout)
    ema = functools.partial(warmup_ema_decay, decay=o.ema_decay)
    step_fn = jit_train_step(make_train_step(loss, optimizer, ema_decay=ema), mesh)

    metrics_log = _io.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=config.train.ckpt_every,
                        keep=config.train.keep, config=_checkpoint_config(config))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        state, data_state, _ = restored
        it.restore(data_state)
    start = int(state.step)
    total = config.train.steps
    trained = Trained(graphdef, state, schedule, ucfg, data, config.diffusion, 0, 0.0,
                      test_data if len(test_data["x"]) else None)

    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]:.1f} it/s"), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    last_loss = "-"
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, rate=0.0, loss=last_loss)
        t_log, s_log = time.perf_counter(), start
        for step in range(start, total):
            batch = shard_batch(next(it), mesh)
            state, metrics = step_fn(state, batch)
            done = step + 1
            if done % config.train.log_every == 0 or done == total:
                m = jax.device_get(metrics)
                now = time.perf_counter()
                rate = (done - s_log) / max(now - t_log, 1e-9)
                t_log, s_log = now, done
                last_loss = f"{float(m['loss']):.4f}"
                metrics_log.write({"step": done, **m, "steps_per_s": rate})
                bar.update(task, completed=done, rate=rate, loss=last_loss)
            ckpt.maybe_save(done, state, data_state=it.state())
            se = config.train.sample_every
            if se and done % se == 0:
                trained.state = state
                imgs = _sample_grid(trained, config, config.train.num_sample_images,
                                    config.train.sample_steps, jax.random.key(done))
                _io.save_image_grid(os.path.join(workdir, "samples", f"step_{done:07d}.png"), imgs)
        if start < total:
            ckpt.save(total, state, data_state=it.state())
    ckpt.wait_until_finished()
    ckpt.close()
    trained.state = state
    trained.steps_run = total - start
    trained.seconds = time.perf_counter() - t_start
    return trained
