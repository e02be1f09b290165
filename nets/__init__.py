"""Flax NNX backbones. They know nothing about schedules or parameterizations."""

from nets._init import init_params
from nets.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    PatchDiscriminator,
    PatchDiscriminatorConfig,
    autoencoder_digits,
    decode_with_frozen,
    frozen_encoder_decoder,
    kl_f4,
    kl_f8,
    latent_codec,
    split_decoder,
)
from nets.classifier import Classifier
from nets.clip import ContrastiveConfig, ContrastiveModel
from nets.diffnet import DiffNet, DiffNetConfig, diffnet_prodiff, diffnet_small
from nets.face import (
    FaceConditioner,
    FaceConditionerConfig,
    FaceEncoder,
    FaceEncoderConfig,
    face_encoder_small,
    reface_conditioner_paper,
    reface_conditioner_small,
)
from nets.fastspeech2 import (
    FastSpeech2,
    FastSpeech2Config,
    fastspeech2_prodiff,
    fastspeech2_small,
    length_regulate,
)
from nets.mlp import MLP
from nets.text import TextEncoder, TextEncoderConfig
from nets.unet import UNet, UNetConfig, count_params, ddpm_cifar10, small, tiny
from nets.vae import (
    VAE,
    VAEConfig,
    parse_blocks,
    parse_channels,
    vae_celeba64,
    vae_celebahq128,
    vae_cifar10,
    vae_digits,
)

__all__ = [
    "Classifier",
    "MLP",
    "UNet",
    "UNetConfig",
    "VAE",
    "VAEConfig",
    "count_params",
    "init_params",
    "parse_blocks",
    "parse_channels",
    "ddpm_cifar10",
    "small",
    "tiny",
    "vae_celeba64",
    "vae_celebahq128",
    "vae_cifar10",
    "vae_digits",
    "AutoencoderConfig",
    "AutoencoderKL",
    "PatchDiscriminator",
    "PatchDiscriminatorConfig",
    "autoencoder_digits",
    "decode_with_frozen",
    "frozen_encoder_decoder",
    "kl_f4",
    "kl_f8",
    "latent_codec",
    "split_decoder",
    "DiffNet",
    "DiffNetConfig",
    "diffnet_prodiff",
    "diffnet_small",
    "FastSpeech2",
    "FastSpeech2Config",
    "fastspeech2_prodiff",
    "fastspeech2_small",
    "length_regulate",
    "ContrastiveConfig",
    "ContrastiveModel",
    "TextEncoder",
    "TextEncoderConfig",
    "FaceConditioner",
    "FaceConditionerConfig",
    "FaceEncoder",
    "FaceEncoderConfig",
    "face_encoder_small",
    "reface_conditioner_paper",
    "reface_conditioner_small",
]
