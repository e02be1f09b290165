"""Training objectives, one module per family; each is a per-example loss
``loss(params, batch, key) -> (B,)`` that a train step reduces."""

from dpm.losses.denoising import (
    TIME_SAMPLERS,
    WEIGHTINGS,
    denoising_loss,
    diffuse,
    log_weight,
    sample_time,
)

__all__ = [
    "TIME_SAMPLERS",
    "WEIGHTINGS",
    "denoising_loss",
    "diffuse",
    "log_weight",
    "sample_time",
]
