"""dpm: diffusion math and training machinery (schedules, denoisers, guidance, losses, the
analytic oracle, training, sharding, checkpoints, data, metrics)."""

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
from dpm.schedules import EDM, CosineVP, DiscreteVP, LinearVP, Schedule, get_schedule, make_betas

__all__ = [
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
