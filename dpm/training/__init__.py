"""Training machinery: the train state, optimizer and EMA (optax), the jitted data-parallel
train step (and the two-network GAN step), device meshes and sharding (a replicated or an
FSDP parameter-sharded state), atomic, verified, resumable checkpoints, and the workdir lock
(one writer per run)."""

from dpm.training.checkpoint import Checkpointer
from dpm.training.gan import gan_optimizers, init_gan_state, make_gan_step
from dpm.training.sharding import (
    FSDP_AXIS,
    FSDP_MIN_SIZE,
    batch_sharding,
    fsdp_sharding,
    fsdp_size,
    initialize_distributed,
    make_mesh,
    process_batch_size,
    process_count,
    process_index,
    replicate,
    replicated,
    shard_batch,
    shard_state,
    state_shardings,
)
from dpm.training.train import (
    LR_SCHEDULES,
    TrainState,
    edm_ema_decay,
    ema_update,
    fast_compile_options,
    flatten_if_uniform,
    init_train_state,
    jit_train_step,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
    warmup_ema_decay,
)
from dpm.training.workdir import WorkdirBusyError, WorkdirLock

__all__ = [
    "FSDP_AXIS",
    "FSDP_MIN_SIZE",
    "LR_SCHEDULES",
    "Checkpointer",
    "TrainState",
    "WorkdirBusyError",
    "WorkdirLock",
    "batch_sharding",
    "edm_ema_decay",
    "ema_update",
    "fast_compile_options",
    "flatten_if_uniform",
    "fsdp_sharding",
    "fsdp_size",
    "gan_optimizers",
    "init_gan_state",
    "init_train_state",
    "initialize_distributed",
    "jit_train_step",
    "make_gan_step",
    "make_lr_schedule",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "process_batch_size",
    "process_count",
    "process_index",
    "replicate",
    "replicated",
    "shard_batch",
    "shard_state",
    "state_shardings",
    "warmup_ema_decay",
]
