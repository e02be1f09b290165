"""Metrics: distribution distances on samples or features, and image fidelity.

No feature network lives here: experiments compute features (e.g. with a classifier trained in
the project) and pass them in.
"""

from dpm.metrics.distribution import (
    frechet_distance,
    frechet_distance_from_features,
    mmd_rbf,
    sliced_wasserstein,
)
from dpm.metrics.image import gaussian_window, psnr, ssim

__all__ = [
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_window",
    "mmd_rbf",
    "psnr",
    "sliced_wasserstein",
    "ssim",
]
