"""Glue between configs, backbones (nets) and denoisers (dpm): build a U-Net from a config,
apply it functionally, wrap it as a Denoiser, and build its denoising loss."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.tree_util import Partial

import dpm
import nets
from experiments._registry import get_schedule

# config.model.preset -> U-Net config builder, config.model.dtype -> compute dtype
PRESETS = {"tiny": nets.tiny, "small": nets.small, "ddpm_cifar10": nets.ddpm_cifar10}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def unet_config(
    model: ml_collections.ConfigDict, image_size: int, channels: int
) -> nets.UNetConfig:
    """The UNetConfig of ``config.model`` (a preset plus overrides)."""
    if model.preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}; got {model.preset!r}")
    if model.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}; got {model.dtype!r}")
    overrides: dict[str, Any] = dict(
        num_classes=model.get("num_classes"),
        dtype=DTYPES[model.dtype],
        extra_in_channels=model.get("extra_in_channels", 0),
    )
    for k in ("base_channels", "channel_mult", "num_res_blocks", "attn_resolutions", "dropout"):
        if model.get(k) is not None:
            overrides[k] = tuple(model[k]) if isinstance(model[k], list) else model[k]
    if model.preset == "ddpm_cifar10":
        return nets.ddpm_cifar10(in_channels=channels, out_channels=channels,
                                 image_size=image_size, **overrides)
    return PRESETS[model.preset](image_size=image_size, channels=channels, **overrides)


def build_unet(cfg: nets.UNetConfig, seed: int) -> tuple[nnx.GraphDef, Any]:
    """A freshly initialised U-Net, split into ``(graphdef, params)``."""
    return nets.init_params(nets.UNet, cfg, seed=seed)


def _apply(graphdef, params, x, noise_level, cond):
    return nnx.merge(graphdef, params)(x, noise_level, cond)


def _apply_train(graphdef, key, params, x, noise_level, cond):
    return nnx.merge(graphdef, params)(x, noise_level, cond, key=key, train=True)


def make_schedule(diffusion: ml_collections.ConfigDict) -> dpm.Schedule:
    kw = {"num_steps": diffusion.num_steps} if diffusion.schedule in (
        "linear", "scaled_linear", "cosine") else {}
    return get_schedule(diffusion.schedule, **kw)


def make_denoiser(
    graphdef, params, schedule, diffusion, cond=None, *, train_key=None
) -> dpm.Denoiser:
    """The Denoiser of a U-Net's parameters (traced: ``params`` stay jit arguments)."""
    if train_key is None:
        apply = Partial(_apply, graphdef, params)
    else:
        apply = Partial(_apply_train, graphdef, train_key, params)
    return dpm.network_denoiser(
        apply,
        schedule,
        diffusion.prediction,
        preconditioning=diffusion.get("preconditioning"),
        sigma_data=diffusion.get("sigma_data", 0.5),
        cond=cond,
    )


def make_loss(graphdef, schedule, diffusion, *, num_classes=None, label_dropout=0.0):
    """``loss(params, batch, key) -> (B,)``: the denoising loss of the U-Net, with labels
    replaced by the null class with probability ``label_dropout`` (classifier-free guidance
    training) and dropout keyed per step."""

    def loss(params, batch, key):
        k_drop, k_net, k_loss = jax.random.split(key, 3)
        cond = None
        if num_classes is not None:
            y = batch["y"]
            drop = jax.random.bernoulli(k_drop, label_dropout, y.shape)
            cond = {"label": jnp.where(drop, num_classes, y).astype(jnp.int32)}
        inner = dpm.denoising_loss(
            lambda p: make_denoiser(graphdef, p, schedule, diffusion, train_key=k_net),
            weighting=diffusion.weighting,
            time_sampler=diffusion.time_sampler,
        )
        return inner(params, {"x": batch["x"], "cond": cond}, k_loss)

    return loss
