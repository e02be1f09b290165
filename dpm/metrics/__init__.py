"""Metrics: distribution distances on samples or features (FD, KID, k-NN precision / recall),
label adherence, image fidelity and spectra (PSNR, SSIM, HFER), and mel-spectrogram metrics
(L1, SSIM, sharpness) with the real-time factor, identity retrieval (top-k), and the
text-to-motion protocol (R-precision, MM-Dist, diversity, multimodality) with motion physics
checks (foot skating, bone-length variance).

No feature network lives here: experiments compute features (e.g. with a classifier trained in
the project) and pass them in.
"""

from dpm.metrics.audio import mel_l1, mel_sharpness, mel_ssim, real_time_factor
from dpm.metrics.distribution import (
    frechet_distance,
    frechet_distance_from_features,
    mmd_rbf,
    sliced_wasserstein,
)
from dpm.metrics.identity import identity_retrieval
from dpm.metrics.image import gaussian_window, psnr, ssim
from dpm.metrics.motion import (
    bone_length_variance,
    diversity,
    foot_skate_ratio,
    matching_score,
    mm_dist,
    multimodality,
    r_precision,
)
from dpm.metrics.sample_quality import kid, label_accuracy, precision_recall
from dpm.metrics.spectral import HFER_CUTOFF, hfer

__all__ = [
    "HFER_CUTOFF",
    "bone_length_variance",
    "diversity",
    "foot_skate_ratio",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_window",
    "hfer",
    "identity_retrieval",
    "kid",
    "label_accuracy",
    "matching_score",
    "mel_l1",
    "mel_sharpness",
    "mel_ssim",
    "mm_dist",
    "mmd_rbf",
    "multimodality",
    "precision_recall",
    "psnr",
    "r_precision",
    "real_time_factor",
    "sliced_wasserstein",
    "ssim",
]
