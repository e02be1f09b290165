"""Training objectives, one module per family; each is a per-example loss
``loss(params, batch, key) -> (B,)`` that a train step reduces."""

from dpm.losses import diffusevae
from dpm.losses.autoencoder import (
    decoder_finetune_loss,
    hinge_gan_terms,
    kl_autoencoder_loss,
    kl_autoencoder_terms,
    measure_scale_factor,
)
from dpm.losses.consistency import (
    DISTANCES,
    LCDTerms,
    boundary_coefficients,
    consistency_function,
    guidance_embedding,
    guided_ddim_step,
    lcd_loss,
    lcd_terms,
    pseudo_huber,
    skipping_timesteps,
)
from dpm.losses.contrastive import clip_loss, contrastive_logits_loss
from dpm.losses.denoising import (
    TIME_SAMPLERS,
    WEIGHTINGS,
    denoising_loss,
    diffuse,
    log_weight,
    sample_time,
)
from dpm.losses.prodiff import (
    VARIANCE_WEIGHTS,
    fastspeech2_variance_loss,
    masked_l1,
    masked_ssim,
    mel_loss,
    prodiff_distillation_loss,
    prodiff_teacher_loss,
)
from dpm.losses.progressive import (
    ddim_step,
    distillation_target,
    progressive_distillation_loss,
    student_times,
)
from dpm.losses.reward import (
    PREFERENCE_MODES,
    decoded_reward,
    pairwise_preference_loss,
    rg_lcd_loss,
    rg_lcd_lrm_loss,
    weighted_rewards,
)
from dpm.losses.scale import (
    area_downsample,
    bicubic_upsample,
    check_scale,
    degrade,
    scale_distillation_loss,
)
from dpm.losses.vae import beta_vae_loss, gaussian_kl

__all__ = [
    "DISTANCES",
    "LCDTerms",
    "PREFERENCE_MODES",
    "boundary_coefficients",
    "consistency_function",
    "decoded_reward",
    "guidance_embedding",
    "guided_ddim_step",
    "lcd_loss",
    "lcd_terms",
    "pairwise_preference_loss",
    "pseudo_huber",
    "rg_lcd_loss",
    "rg_lcd_lrm_loss",
    "skipping_timesteps",
    "weighted_rewards",
    "TIME_SAMPLERS",
    "VARIANCE_WEIGHTS",
    "fastspeech2_variance_loss",
    "masked_l1",
    "masked_ssim",
    "mel_loss",
    "prodiff_distillation_loss",
    "prodiff_teacher_loss",
    "WEIGHTINGS",
    "area_downsample",
    "beta_vae_loss",
    "bicubic_upsample",
    "check_scale",
    "clip_loss",
    "contrastive_logits_loss",
    "decoder_finetune_loss",
    "degrade",
    "hinge_gan_terms",
    "scale_distillation_loss",
    "ddim_step",
    "denoising_loss",
    "distillation_target",
    "diffusevae",
    "diffuse",
    "gaussian_kl",
    "log_weight",
    "sample_time",
    "kl_autoencoder_loss",
    "kl_autoencoder_terms",
    "measure_scale_factor",
    "progressive_distillation_loss",
    "student_times",
]
