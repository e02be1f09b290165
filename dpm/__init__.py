"""dpm: diffusion math and training machinery (schedules, denoisers, guidance, losses, the
analytic oracle, training, sharding, checkpoints, data, metrics)."""

from dpm import data, metrics
from dpm.checkpoint import Checkpointer
from dpm.data import BatchIterator, make_dataset
from dpm.denoiser import (
    PREDICTIONS,
    Denoiser,
    classifier_free_guidance,
    clip_x0,
    dynamic_thresholding,
    expand_like,
    network_denoiser,
)
from dpm.losses import TIME_SAMPLERS, WEIGHTINGS, denoising_loss, diffuse, log_weight, sample_time
from dpm.oracle import GaussianMixture
from dpm.parallel import (
    batch_sharding,
    initialize_distributed,
    make_mesh,
    replicate,
    replicated,
    shard_batch,
)
from dpm.schedules import EDM, CosineVP, DiscreteVP, LinearVP, Schedule, get_schedule, make_betas
from dpm.train import (
    TrainState,
    edm_ema_decay,
    ema_update,
    init_train_state,
    jit_train_step,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
    warmup_ema_decay,
)

__all__ = [
    "data",
    "metrics",
    "BatchIterator",
    "Checkpointer",
    "TrainState",
    "batch_sharding",
    "edm_ema_decay",
    "ema_update",
    "init_train_state",
    "initialize_distributed",
    "jit_train_step",
    "make_dataset",
    "make_lr_schedule",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "replicate",
    "replicated",
    "shard_batch",
    "warmup_ema_decay",
    "PREDICTIONS",
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "EDM",
    "CosineVP",
    "Denoiser",
    "DiscreteVP",
    "GaussianMixture",
    "LinearVP",
    "Schedule",
    "classifier_free_guidance",
    "clip_x0",
    "denoising_loss",
    "diffuse",
    "dynamic_thresholding",
    "expand_like",
    "get_schedule",
    "log_weight",
    "make_betas",
    "network_denoiser",
    "sample_time",
]
