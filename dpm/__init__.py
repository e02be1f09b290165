"""dpm: the diffusion math (schedules, denoisers with guidance and thresholding, the analytic
oracle) and its sub-packages ``dpm.losses``, ``dpm.training``, ``dpm.data``, ``dpm.metrics``.

The math is re-exported flat (``dpm.DiscreteVP``, ``dpm.Denoiser``, ``dpm.GaussianMixture``);
so are the few machinery names the README uses (``dpm.denoising_loss``, ``dpm.TrainState``).
"""

from dpm import data, losses, metrics, training
from dpm.denoiser import (
    PREDICTIONS,
    Denoiser,
    classifier_free_guidance,
    clip_x0,
    dynamic_thresholding,
    expand_like,
    network_denoiser,
)
from dpm.losses import denoising_loss, diffuse
from dpm.oracle import GaussianMixture
from dpm.schedules import (
    EDM,
    CosineLogSNR,
    CosineVP,
    DiscreteVP,
    LinearVP,
    Schedule,
    ddgan_betas,
    ddgan_schedule,
    make_betas,
)
from dpm.training import Checkpointer, TrainState

__all__ = [
    "data",
    "losses",
    "metrics",
    "training",
    "PREDICTIONS",
    "EDM",
    "Checkpointer",
    "CosineLogSNR",
    "CosineVP",
    "Denoiser",
    "DiscreteVP",
    "GaussianMixture",
    "LinearVP",
    "Schedule",
    "TrainState",
    "classifier_free_guidance",
    "ddgan_betas",
    "ddgan_schedule",
    "clip_x0",
    "denoising_loss",
    "diffuse",
    "dynamic_thresholding",
    "expand_like",
    "make_betas",
    "network_denoiser",
]
