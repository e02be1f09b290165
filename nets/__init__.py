"""Flax NNX backbones. They know nothing about schedules or parameterizations."""

from nets._init import init_params
from nets.classifier import Classifier
from nets.mlp import MLP
from nets.unet import UNet, UNetConfig, count_params, ddpm_cifar10, small, tiny

__all__ = [
    "Classifier",
    "MLP",
    "UNet",
    "UNetConfig",
    "count_params",
    "init_params",
    "ddpm_cifar10",
    "small",
    "tiny",
]
