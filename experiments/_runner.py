"""The training driver shared by ``experiments.train``, the quickstart and the paper modules:
data iterator, U-Net, optimizer, data-parallel jitted step, atomic resumable checkpoints,
a progress bar, JSON-lines metrics and periodic PNG sample grids."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
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
    LR_SCHEDULES,
    Checkpointer,
    TrainState,
    WorkdirLock,
    fast_compile_options,
    init_train_state,
    jit_train_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    shard_batch,
    shard_state,
    warmup_ema_decay,
)
from experiments import _io
from experiments._model import (
    DTYPES,
    PRESETS,
    build_unet,
    make_denoiser,
    make_loss,
    make_schedule,
    unet_config,
)
from experiments._registry import DATASETS, SCHEDULES, dataset_builder, make_dataset


class ConfigError(ValueError):
    """A config field, or the data set it names, that a run cannot use."""


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
             sample_every=0, sample_steps=20, num_sample_images=64, fast_compile=False,
             max_skipped_fraction=0.01, fsdp=1)
    )
    return c


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config.{key} must be {expected}; got {value!r}")


def _get(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _check_int(config, key: str, low: int, *, optional: bool = False) -> None:
    v = _get(config, key)
    if optional and v is None:
        return
    _check(_is_int(v) and v >= low, key, v,
           f"{'None or ' if optional else ''}an int >= {low}")


def _check_range(config, key: str, low: float, high: float, *, high_open: bool,
                 optional: bool = False) -> None:
    v = _get(config, key)
    if optional and v is None:
        return
    ok = _is_number(v) and low <= v and (v < high if high_open else v <= high)
    _check(ok, key, v, f"{'None or ' if optional else ''}a number in "
                       f"[{low}, {high}{')' if high_open else ']'}")


def _check_choice(config, key: str, choices) -> None:
    v = _get(config, key)
    _check(v in choices, key, v, f"one of {list(choices)}")


def _check_int_seq(config, key: str, *, allow_empty: bool) -> None:
    v = _get(config, key)
    if v is None:
        return
    ok = (isinstance(v, list | tuple) and (allow_empty or len(v) > 0)
          and all(_is_int(i) and i >= 1 for i in v))
    _check(ok, key, v, f"None or a {'' if allow_empty else 'non-empty '}tuple of ints >= 1")


def _check_data(data) -> None:
    _check(data.name in DATASETS, "data.name", data.name, f"one of {list(DATASETS)}")
    kwargs = data.kwargs.to_dict() if hasattr(data.kwargs, "to_dict") else data.kwargs
    _check(isinstance(kwargs, dict), "data.kwargs", kwargs, "a dict of keyword arguments")
    fn = dataset_builder(data.name)
    sig = inspect.signature(fn)
    name = getattr(getattr(fn, "func", fn), "__name__", data.name)
    accepted = ", ".join(p for p in sig.parameters if p not in ("args", "kwargs"))
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    for key in kwargs:
        if not takes_any and key not in sig.parameters:
            raise ConfigError(
                f"config.data.kwargs.{key} is not an argument of data.name={data.name!r} "
                f"({name}); its arguments: {accepted}"
            )
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ConfigError(
            f"config.data.kwargs {kwargs} do not fit data.name={data.name!r} ({name}: {e}); "
            f"its arguments: {accepted}"
        ) from None
    if "path" in kwargs:
        path = kwargs["path"]
        _check(isinstance(path, str | os.PathLike) and os.path.exists(path), "data.kwargs.path",
               path, "an existing file or folder")
    _check_range({"data": data}, "data.test_fraction", 0.0, 1.0, high_open=True)
    _check(_is_int(data.split_seed) and data.split_seed >= 0, "data.split_seed",
           data.split_seed, "an int >= 0")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every field of a :func:`base_config` training config, before any work is done.

    Fields an experiment adds are its own to check; missing ones of ``base_config`` are errors.

    Raises:
      ConfigError: (a ``ValueError``) naming the first bad field (``config.train.log_every``),
        the value it has and what it must be.
    """
    try:
        for section in ("data", "model", "diffusion", "optim", "train"):
            _check(isinstance(config[section], ml_collections.ConfigDict), section,
                   config[section], "a ConfigDict")
        _check(isinstance(config.get("name", "run"), str) and config.get("name", "run"), "name",
               config.get("name"), "a non-empty str")
        _check(_is_int(config.seed) and config.seed >= 0, "seed", config.seed, "an int >= 0")
        _check_data(config.data)

        _check_choice(config, "model.preset", sorted(PRESETS))
        _check_choice(config, "model.dtype", sorted(DTYPES))
        _check_int(config, "model.num_classes", 1, optional=True)
        _check_range(config, "model.label_dropout", 0.0, 1.0, high_open=False)
        _check_int(config, "model.base_channels", 1, optional=True)
        _check_int_seq(config, "model.channel_mult", allow_empty=False)
        _check_int(config, "model.num_res_blocks", 1, optional=True)
        _check_int_seq(config, "model.attn_resolutions", allow_empty=True)
        _check_range(config, "model.dropout", 0.0, 1.0, high_open=True, optional=True)
        _check_int(config, "model.extra_in_channels", 0)

        d = config.diffusion
        _check_choice(config, "diffusion.schedule", SCHEDULES)
        _check_int(config, "diffusion.num_steps", 1)
        _check_choice(config, "diffusion.prediction", dpm.PREDICTIONS)
        _check_choice(config, "diffusion.weighting", dpm.losses.WEIGHTINGS)
        _check_choice(config, "diffusion.time_sampler", dpm.losses.TIME_SAMPLERS)
        _check_choice(config, "diffusion.preconditioning", (None, "edm"))
        _check(_is_number(d.sigma_data) and d.sigma_data > 0, "diffusion.sigma_data",
               d.sigma_data, "a number > 0")

        o = config.optim
        _check(_is_number(o.learning_rate) and o.learning_rate > 0, "optim.learning_rate",
               o.learning_rate, "a number > 0")
        _check_int(config, "optim.warmup_steps", 0)
        _check(_is_number(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay",
               o.weight_decay, "a number >= 0")
        _check(o.clip_norm is None or (_is_number(o.clip_norm) and o.clip_norm > 0),
               "optim.clip_norm", o.clip_norm, "None or a number > 0")
        _check_range(config, "optim.ema_decay", 0.0, 1.0, high_open=True)
        _check_choice(config, "optim.schedule", LR_SCHEDULES)

        t = config.train
        for key in ("steps", "batch_size", "log_every", "ckpt_every", "keep", "sample_steps",
                    "num_sample_images"):
            _check_int(config, f"train.{key}", 1)
        _check_int(config, "train.sample_every", 0)
        _check(isinstance(t.get("fast_compile", False), bool), "train.fast_compile",
               t.get("fast_compile"), "True or False")
        msf = t.get("max_skipped_fraction", 0.01)
        _check(_is_number(msf) and 0 <= msf <= 1, "train.max_skipped_fraction", msf,
               "a number in [0, 1]")
        n_dev = jax.device_count()
        _check(t.batch_size % n_dev == 0, "train.batch_size", t.batch_size,
               f"a multiple of the {n_dev} devices (the batch is split over them)")
        fsdp = t.get("fsdp", 1)
        _check(_is_int(fsdp) and fsdp >= 1 and n_dev % fsdp == 0, "train.fsdp", fsdp,
               f"an int >= 1 dividing the {n_dev} devices (1: replicated state; N: parameters "
               "and optimizer state split over N devices)")
    except (KeyError, AttributeError) as e:
        raise ConfigError(f"config lacks a field of base_config(): {e}") from None


def _check_images(x: np.ndarray, config) -> None:
    """The data a U-Net trains on: square NHWC images (a ConfigError says what was found)."""
    where = f"config.data (name={config.data.name!r}, kwargs={config.data.kwargs.to_dict()})"
    if x.ndim != 4:
        raise ConfigError(
            f"{where}: the images must have shape (N, H, W, C) (or (N, H, W) for one channel); "
            f"got {x.ndim} dimensions, shape {x.shape}")
    _, H, W, C = x.shape
    if H == W:
        return
    if x.shape[1] in (1, 3, 4) and x.shape[2] == x.shape[3]:
        raise ConfigError(
            f"{where}: images of shape {x.shape} look channels-first (NCHW); pass "
            "--config.data.kwargs.channels_first=True")
    raise ConfigError(f"{where}: the images must be square (N, S, S, C); got shape {x.shape}")


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
    x_T = trained.schedule.prior_sample(key, (n, u.image_size, u.image_size, u.in_channels))
    ts = uniform_time(steps, t_end=0.0)
    return np.asarray(jax.jit(ddim)(den, x_T, ts))


@functools.lru_cache(maxsize=32)
def jitted_step(train_step, mesh, fast_compile: bool):
    # one compiled program per step function: a run resumed in the same process (or several
    # runs of one step) compiles once
    opts = fast_compile_options() if fast_compile else None
    return jit_train_step(train_step, mesh, compiler_options=opts)


def fit(
    train_step,
    state: TrainState,
    it: BatchIterator,
    workdir: str,
    *,
    steps: int,
    ckpt_config: dict[str, Any],
    ckpt_every: int,
    keep: int = 3,
    log_every: int = 50,
    extra: tuple = (),
    fast_compile: bool = False,
    progress: bool = True,
    label: str = "train",
    mesh=None,
    on_step=None,
    max_skipped_fraction: float = 0.01,
    log=print,
    step_choice=None,
) -> tuple[TrainState, int]:
    """Runs (or resumes) ``train_step`` to ``steps`` steps with atomic checkpoints in
    ``workdir/checkpoints`` and metrics in ``workdir/metrics.jsonl``.

    The latest checkpoint of ``workdir`` (state, data position) is restored first; one of
    another ``ckpt_config`` is refused with a clear error. A finished run costs nothing; a
    workdir already past ``steps`` is returned as it is, with a message. The workdir is locked
    for the run (:class:`dpm.training.WorkdirLock`: a second process is refused), and metric
    records past the restored step are dropped, so a resumed run's ``metrics.jsonl`` equals an
    uninterrupted run's (but for the timings: ``steps_per_s``, and ``compile_s`` -- or
    ``compile_s_<i>`` for the step function ``i`` of a tuple -- the seconds of a step function's
    first call, compile included, in the first record written after it; also printed).

    Args:
      train_step: ``(state, batch, *extra) -> (state, metrics)`` (not jitted: jitted here,
        data-parallel over ``mesh``), or a tuple of such step functions sharing one state
        structure, ``step_choice(i)`` naming the one that takes step ``i`` (0-based): e.g. a
        GAN step with and without its lazy R1 penalty, two compiled programs instead of a
        branch inside one.
      state: the freshly initialised state (its structure is what a checkpoint must match);
        consumed: its buffers are donated to the train step.
      it: the batch iterator (its position is checkpointed).
      workdir: the run directory.
      steps: the total number of steps.
      ckpt_config: what must match to resume (model, data, ...), stored with each checkpoint.
      ckpt_every, keep: checkpoint period and the number kept.
      log_every: metrics period.
      extra: further train-step arguments (e.g. a frozen network's parameters), laid out like
        the state (replicated, or split by ``dpm.training.shard_state`` on an fsdp mesh).
      fast_compile: compile with XLA backend optimisations off (smoke runs).
      progress: show a progress bar.
      label: the progress bar's name.
      mesh: the device mesh (all devices by default); ``dpm.training.make_mesh(fsdp=N)``
        splits the state's large leaves over N devices (its optimizer must keep per-leaf
        moments, ``make_optimizer(flatten=False)``).
      on_step: optional ``(done, state) -> None`` called after every step.
      max_skipped_fraction: the run fails (``RuntimeError`` with the count) once more than this
        fraction of ``steps`` had its update skipped for a non-finite loss or gradient: a run
        that learned nothing must not exit as a success.
      log: where messages go.
      step_choice: ``(i) -> index`` into a tuple ``train_step`` (required with one; the
        choice depends on the step index only, so a resumed run takes the same steps).

    Returns:
      ``(state, start)``: the final state and the step the run started (resumed) from.
    """
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise ValueError(f"max_skipped_fraction must be in [0, 1]; got {max_skipped_fraction!r}")
    if isinstance(train_step, tuple) != (step_choice is not None):
        raise ValueError("a tuple of train steps needs step_choice (and step_choice a tuple); "
                         f"got {type(train_step).__name__} and step_choice={step_choice!r}")
    os.makedirs(workdir, exist_ok=True)
    # one writer per workdir (process 0 of a multi-process run writes for all)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _fit_locked(train_step, state, it, workdir, steps=steps, ckpt_config=ckpt_config,
                           ckpt_every=ckpt_every, keep=keep, log_every=log_every, extra=extra,
                           fast_compile=fast_compile, progress=progress, label=label,
                           mesh=mesh, on_step=on_step,
                           max_skipped_fraction=max_skipped_fraction, log=log,
                           step_choice=step_choice)


def _fit_locked(train_step, state, it, workdir, *, steps, ckpt_config, ckpt_every, keep,
                log_every, extra, fast_compile, progress, label, mesh, on_step,
                max_skipped_fraction, log, step_choice=None):
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    mesh = make_mesh() if mesh is None else mesh
    state = shard_state(state, mesh)  # replicated unless the mesh has an "fsdp" axis
    extra = tuple(shard_state(e, mesh) for e in extra)
    # fast_compile: XLA backend optimisations off, for smoke runs (compiles in a fraction of the
    # time, steps run slower)
    steps_fn = tuple(jitted_step(f, mesh, bool(fast_compile)) for f in (
        train_step if isinstance(train_step, tuple) else (train_step,)))
    choice = step_choice if step_choice is not None else (lambda i: 0)
    metrics_log = _io.JsonlWriter(os.path.join(workdir, "metrics.jsonl"))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=ckpt_every,
                        keep=keep, config=ckpt_config)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        state, data_state, _ = restored
        it.restore(data_state)
    start = int(state.step)
    if jax.process_index() == 0:  # records past the restored step will be logged again
        metrics_log.truncate_after(start)
    if start > steps:
        log(f"{label}: {workdir} is already at step {start}, past the requested {steps} "
            f"steps; nothing trained, the step-{start} state is returned")
    total = max(steps, start)  # a workdir already past `steps` is judged on its own length
    allowed = math.floor(max_skipped_fraction * total)

    def check_skipped(skipped: int, done: int) -> None:
        if skipped > allowed:
            raise RuntimeError(
                f"{label}: {skipped} of {done} updates were skipped for a non-finite loss or "
                f"gradient, more than max_skipped_fraction={max_skipped_fraction} of {total} "
                f"steps allows ({allowed}); the run is not trustworthy. Check the data (non-"
                "finite values?) and the learning rate.")
    columns = [TextColumn(f"[bold]{label}"), BarColumn(),
               TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]:.1f} it/s"), TextColumn("loss {task.fields[loss]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(label, total=steps, completed=start, rate=0.0, loss="-")
        t_log, s_log = time.perf_counter(), start
        compiled: dict[int, float] = {}  # step function -> seconds of its first call
        pending: dict[str, float] = {}  # compile times not yet written to metrics.jsonl
        for step in range(start, steps):
            batch = shard_batch(next(it), mesh)
            which = choice(step)
            t_call = time.perf_counter()
            state, metrics = steps_fn[which](state, batch, *extra)
            if which not in compiled:  # the first call compiles: its time is logged once
                jax.block_until_ready(metrics)
                compiled[which] = time.perf_counter() - t_call
                name = "compile_s" if len(steps_fn) == 1 else f"compile_s_{which}"
                pending[name] = compiled[which]
                log(f"{label}: train step {which} compiled and ran once in "
                    f"{compiled[which]:.1f} s")
                t_log = time.perf_counter()  # the rate counts steps, not the compile
            done = step + 1
            if done % log_every == 0 or done == steps:
                m = jax.device_get(metrics)
                now = time.perf_counter()
                rate = (done - s_log) / max(now - t_log, 1e-9)
                t_log, s_log = now, done
                if jax.process_index() == 0:
                    metrics_log.write({"step": done, **m, "steps_per_s": rate, **pending})
                pending = {}
                bar.update(task, completed=done, rate=rate, loss=f"{float(m['loss']):.4f}")
                if "skipped" in m:
                    check_skipped(int(m["skipped"]), done)
            ckpt.maybe_save(done, state, data_state=it.state())
            if on_step is not None:
                on_step(done, state)
        if start < steps:
            ckpt.save(steps, state, data_state=it.state())
    ckpt.wait_until_finished()
    ckpt.close()
    check_skipped(int(jax.device_get(state.skipped)), int(state.step))
    return state, start


def train_denoiser(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True
) -> Trained:
    """Trains (or resumes training of) a U-Net denoiser as ``config`` says.

    Re-running with the same ``workdir`` restores the latest checkpoint (parameters, optimizer,
    EMA, PRNG key and data position) and continues to ``config.train.steps``; a checkpoint of
    another model/diffusion/data config is refused with a clear error.
    """
    validate_config(config)
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    try:
        dataset = make_dataset(config.data.name, **config.data.kwargs.to_dict())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"config.data (name={config.data.name!r}, kwargs={config.data.kwargs.to_dict()}): {e}"
        ) from e
    _check_images(dataset["x"], config)
    data, test_data = train_test_split(
        dataset, config.data.get("test_fraction", 0.0), seed=config.data.get("split_seed", 0)
    )
    arrays = {"x": data["x"]}
    if config.model.num_classes is not None:
        if "y" not in data:
            raise ConfigError(
                f"config.model.num_classes={config.model.num_classes} but data "
                f"{config.data.name!r} has no labels; set --config.model.num_classes=None"
            )
        arrays["y"] = data["y"]
    it = BatchIterator(arrays, config.train.batch_size, seed=config.seed)
    _, H, W, C = data["x"].shape
    ucfg = unet_config(config.model, H, C)
    graphdef, params = build_unet(ucfg, config.seed)
    schedule = make_schedule(config.diffusion)
    o = config.optim
    fsdp = config.train.get("fsdp", 1)
    optimizer = make_optimizer(
        o.learning_rate, total_steps=config.train.steps,
        warmup_steps=min(o.warmup_steps, config.train.steps - 1),
        weight_decay=o.weight_decay, clip_norm=o.clip_norm, schedule=o.schedule,
        # per-leaf moments whatever the layout: sharded parameters need them, and so a run's
        # checkpoint resumes under any train.fsdp (1 included). With XLA's default options the
        # per-leaf step is also the faster one here (bench_train --per-leaf: 10-18 % on the
        # tiny U-Net); the raveled optimizer only compiles faster with fast_compile.
        flatten=False,
    )
    state = init_train_state(params, optimizer, jax.random.key(config.seed))
    loss = make_loss(graphdef, schedule, config.diffusion, num_classes=ucfg.num_classes,
                     label_dropout=config.model.label_dropout)
    ema = functools.partial(warmup_ema_decay, decay=o.ema_decay)
    trained = Trained(graphdef, None, schedule, ucfg, data, config.diffusion, 0, 0.0,
                      test_data if len(test_data["x"]) else None)

    def sample_grid(done, state):
        se = config.train.sample_every
        if se and done % se == 0:
            trained.state = state
            imgs = _sample_grid(trained, config, config.train.num_sample_images,
                                config.train.sample_steps, jax.random.key(done))
            _io.save_image_grid(os.path.join(workdir, "samples", f"step_{done:07d}.png"), imgs)

    t = config.train
    state, start = fit(
        make_train_step(loss, optimizer, ema_decay=ema), state, it, workdir, steps=t.steps,
        ckpt_config=_checkpoint_config(config), ckpt_every=t.ckpt_every, keep=t.keep,
        log_every=t.log_every, fast_compile=bool(t.get("fast_compile")), progress=progress,
        on_step=sample_grid, max_skipped_fraction=float(t.get("max_skipped_fraction", 0.01)),
        mesh=make_mesh(fsdp=fsdp))
    trained.state = state
    trained.steps_run = max(t.steps - start, 0)
    trained.seconds = time.perf_counter() - t_start
    return trained
