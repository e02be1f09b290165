"""YONOS-SR (Noroozi et al., ECCV 2024: "You Only Need One Step: fast super-resolution with
stable diffusion via scale distillation") in miniature, on patches of the images that ship
inside scikit-image's wheel.

    python -m experiments.yonos_sr --workdir runs/yonos_sr
    python -m experiments.yonos_sr upscale in.png out.png --scale 4 --workdir runs/yonos_sr

The pipeline, every part built here (no public code exists):

* **Data.** 32x32 high-resolution (HR) patches, grayscale by default, from the bundled images,
  **split by source image**: the test patches come from images no network saw.
* **Autoencoder.** LDM's KL autoencoder (``nets.AutoencoderKL``, f = 4: 32x32 -> 8x8x4),
  trained on the train patches, then frozen; latents scaled to unit variance.
* **SR diffusion.** A low-resolution input is the HR patch area-downsampled by the scale and
  bicubic-upsampled back (``dpm.losses.degrade``), then encoded; its latent is concatenated to
  the noisy latent (the tiny U-Net's extra input channels). v-prediction, truncated-SNR
  weighting, cosine log-SNR schedule (t = 1 is pure noise).
* **Scale distillation** (``dpm.losses.scale_distillation_loss``): the x2 model is trained on
  ground truth (the teacher); the x4 student starts as a copy of it and regresses the teacher's
  ``x0`` guess at the same noisy latent (teacher input: the x2 LR of the same patch); the x4
  student then teaches x8. Baseline: the **same** students (same initialisation: the x2
  teacher, then the direct x4 model; same steps, batch, optimiser, data order) trained
  directly on ground truth.
* **Inference.** One DDIM step from pure noise at t = 1 (``solvers.ddim`` on the grid
  ``[1, 0]``); the many-step rows use the same sampler on a uniform grid.
* **Decoder fine-tuning.** The U-Net frozen, the autoencoder's decoder is fine-tuned on pairs
  (one-step latent of a train patch, its HR patch) with L1 + SSIM
  (``dpm.losses.decoder_finetune_loss``; the patch discriminator is optional).

Measured against the held-out HR patches: PSNR and SSIM (data range 2) and the
high-frequency energy ratio (HFER: fraction of the FFT power above half-Nyquist; the HR
patches' own value is the target, blur scores low). Seeds vary the students' training (data
order, noise) and the sampling noise; the autoencoder and the x2 teacher are trained once.
Learning curves: one-step PSNR against training steps and against the number of training
patches the student stage sees (the teacher fixed). Writes ``<workdir>/report.{md,json}`` and
three PNGs; the committed copy lives in ``experiments/results/yonos_sr/``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

import dpm
import nets
from dpm.data import (
    SKIMAGE_COLOR_IMAGES,
    SKIMAGE_GRAY_IMAGES,
    BatchIterator,
    skimage_patches,
)
from dpm.losses import (
    WEIGHTINGS,
    area_downsample,
    check_scale,
    decoder_finetune_loss,
    degrade,
    denoising_loss,
    kl_autoencoder_loss,
    measure_scale_factor,
    scale_distillation_loss,
)
from dpm.metrics import hfer, psnr, ssim
from dpm.training import (
    fast_compile_options,
    init_train_state,
    make_optimizer,
    make_train_step,
    warmup_ema_decay,
)
from experiments import _io
from experiments._checks import as_tuple, int_values
from experiments._cli import UsageError, run_experiment, user_errors
from experiments._latent import batched, codec, jit
from experiments._model import build_unet, make_denoiser
from experiments._report import (
    command_flags,
    finished_config,
    markdown_table,
    over_seeds,
    plot_curves,
    write_report,
)
from experiments._runner import fit
from solvers import ddim
from solvers.grids import uniform_time

SCHEDULE = dpm.CosineLogSNR()
ALL_IMAGES = SKIMAGE_COLOR_IMAGES + SKIMAGE_GRAY_IMAGES
# held-out source images (grayscale runs): a photograph, a cat, coins, a texture
TEST_IMAGES = ("camera", "chelsea", "coins", "gravel")
TRAIN_IMAGES = tuple(n for n in ALL_IMAGES if n not in TEST_IMAGES)
SPACES = ("latent", "pixel")
PREDICTIONS = ("v", "x0")


def get_config() -> ml_collections.ConfigDict:
    """The default run: 32x32 grayscale patches, latent space (f = 4), x2 teacher -> x4 -> x8,
    3 seeds, sized for <= 25 min on 2 idle CPU cores.

    Costs measured on 2 idle cores (compiled, float32): a step of the autoencoder (widths
    16-32) at batch 32 0.40 s (widths 32-64: 1.28 s); of the tiny U-Net on 8x8x4 latents at
    batch 32 86 ms (direct) and 114 ms (distillation: the teacher's forward pass too); each
    train step compiles in ~21 s.
    """
    c = ml_collections.ConfigDict()
    c.name = "yonos_sr"
    c.seeds = (0, 1, 2)
    c.fast_compile = False
    c.space = "latent"
    c.data = ml_collections.ConfigDict(dict(
        patch_size=32, channels=1, train_images=TRAIN_IMAGES, test_images=TEST_IMAGES,
        num_train=2048, num_test=256, seed=0))
    c.autoencoder = ml_collections.ConfigDict(dict(
        factor=4, base_channels=16, latent_channels=4, attention=True, steps=500, batch_size=16,
        learning_rate=2e-3, warmup_steps=50, kl_weight=1e-6))
    c.unet = ml_collections.ConfigDict(dict(base_channels=32, channel_mult=(1, 2),
                                            attention=True))
    # t_one_fraction: share of training times set to t = 1 (the one-step regime) instead of
    # drawn uniformly; 0 = the paper's uniform t (an ablation knob, not the paper's recipe)
    c.diffusion = ml_collections.ConfigDict(dict(prediction="v", weighting="truncated_snr",
                                                 t_one_fraction=0.0))
    c.teacher = ml_collections.ConfigDict(dict(
        scale=2, steps=1000, batch_size=32, learning_rate=1e-3, warmup_steps=50,
        ema_decay=0.999))
    # every student stage (distilled and direct alike): initialised from the previous stage
    c.student = ml_collections.ConfigDict(dict(
        scales=(4, 8), steps=300, batch_size=16, learning_rate=5e-4, warmup_steps=0,
        ema_decay=0.99))
    # learning curves at the first student scale: one-step PSNR at these steps (all seeds),
    # and at the end of stages that see only `data_sizes` train patches (distilled vs direct)
    c.curve = ml_collections.ConfigDict(dict(points=(50, 100, 200), data_sizes=(64, 256)))
    c.decoder = ml_collections.ConfigDict(dict(
        steps=100, batch_size=16, learning_rate=1e-4, l1_weight=1.0, ssim_weight=1.0,
        ssim_window=7, discriminator=False, disc_weight=0.1))
    c.sample = ml_collections.ConfigDict(dict(many_steps=(20, 200), figure_patches=6))
    return c


# ----------------------------------------------------------------------------------------------
# Validation (before any work)
# ----------------------------------------------------------------------------------------------


def _positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.{name} must be an int >= {low}; got {value!r}")
    return value


def _positive_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"config.{name} must be a number > 0; got {value!r}")


def scales_of(config) -> tuple[int, ...]:
    """The chain ``(teacher scale, student scales...)``."""
    return (int(config.teacher.scale), *as_tuple(config.student.scales))


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every setting checked before any work; errors name the key, the value, the choices."""
    if config.space not in SPACES:
        raise ValueError(f"config.space must be one of {SPACES}; got {config.space!r}")
    d = config.data
    p = _positive_int("data.patch_size", d.patch_size, 8)
    if d.channels not in (1, 3):
        raise ValueError(f"config.data.channels must be 1 (grayscale) or 3 (RGB); "
                         f"got {d.channels!r}")
    for key in ("train_images", "test_images"):
        names = as_tuple(d[key])
        bad = [n for n in names if n not in ALL_IMAGES]
        if not names or bad:
            raise ValueError(f"config.data.{key} must name bundled images from {ALL_IMAGES}; "
                             f"got {d[key]!r}")
        if d.channels == 3 and any(n in SKIMAGE_GRAY_IMAGES for n in names):
            raise ValueError(f"config.data.{key}: RGB runs (channels=3) need colour images "
                             f"{SKIMAGE_COLOR_IMAGES}; got {d[key]!r}")
    shared = set(as_tuple(d.train_images)) & set(as_tuple(d.test_images))
    if shared:
        raise ValueError(f"config.data.train_images and test_images must be disjoint (the "
                         f"test patches come from unseen images); both name {sorted(shared)}")
    for key in ("num_train", "num_test"):
        _positive_int(f"data.{key}", d[key], 8)
    scales = scales_of(config)
    check_scale(scales[0], p, "config.teacher.scale")
    if scales[0] < 2:
        raise ValueError(f"config.teacher.scale must be >= 2; got {scales[0]}")
    if not as_tuple(config.student.scales):
        raise ValueError("config.student.scales must name at least one scale; got ()")
    for prev, s in zip(scales, scales[1:], strict=False):
        check_scale(s, p, "config.student.scales")
        if s != 2 * prev:
            raise ValueError(f"config.student.scales must double the teacher's scale at each "
                             f"stage ({scales[0]} -> {2 * scales[0]} -> ...); got "
                             f"{as_tuple(config.student.scales)!r}")
    a = config.autoencoder
    check_scale(a.factor, p, "config.autoencoder.factor")
    latent = p // a.factor if config.space == "latent" else p
    levels = len(as_tuple(config.unet.channel_mult))
    if levels < 1 or latent % 2 ** (levels - 1):
        raise ValueError(f"config.unet.channel_mult: {levels} levels need a "
                         f"{'latent' if config.space == 'latent' else 'patch'} side divisible by "
                         f"{2 ** (levels - 1)}; it is {latent}")
    if config.diffusion.prediction not in PREDICTIONS:
        raise ValueError(f"config.diffusion.prediction must be one of {PREDICTIONS}; got "
                         f"{config.diffusion.prediction!r}")
    f = config.diffusion.t_one_fraction
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f < 1.0:
        raise ValueError(f"config.diffusion.t_one_fraction must be in [0, 1); got {f!r}")
    if config.diffusion.weighting not in WEIGHTINGS:
        raise ValueError(f"config.diffusion.weighting must be one of {WEIGHTINGS}; got "
                         f"{config.diffusion.weighting!r}")
    for sec in ("autoencoder", "teacher", "student", "decoder"):
        s = config[sec]
        _positive_int(f"{sec}.steps", s.steps)
        b = _positive_int(f"{sec}.batch_size", s.batch_size)
        n = jax.device_count()
        if b % n:
            raise ValueError(f"config.{sec}.batch_size must be a multiple of the {n} devices; "
                             f"got {b}")
        _positive_number(f"{sec}.learning_rate", s.learning_rate)
    for key in ("l1_weight", "ssim_weight", "disc_weight"):
        v = config.decoder[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f"config.decoder.{key} must be a number >= 0; got {v!r}")
    w = config.decoder.ssim_window
    if isinstance(w, bool) or not isinstance(w, int) or w < 1 or w % 2 == 0 or w > p:
        raise ValueError(f"config.decoder.ssim_window must be an odd int <= the patch size "
                         f"{p}; got {w!r}")
    if as_tuple(config.curve.points):
        int_values("config.curve.points", config.curve.points, 1, config.student.steps - 1)
    int_values("config.curve.data_sizes", config.curve.data_sizes, 1, d.num_train - 1)
    int_values("config.sample.many_steps", config.sample.many_steps, 2)
    int_values("config.seeds", config.seeds, 0)
    _positive_int("sample.figure_patches", config.sample.figure_patches)


# ----------------------------------------------------------------------------------------------
# Data and the first stage
# ----------------------------------------------------------------------------------------------


def sr_data(config) -> tuple[np.ndarray, np.ndarray]:
    """``(train_hr, test_hr)``: HR patches in [-1, 1] from disjoint source images."""
    d = config.data
    gray = d.channels == 1
    train = skimage_patches(d.patch_size, d.num_train, seed=d.seed,
                            images=as_tuple(d.train_images), grayscale=gray)["x"]
    test = skimage_patches(d.patch_size, d.num_test, seed=d.seed + 1,
                           images=as_tuple(d.test_images), grayscale=gray)["x"]
    return train, test


def _fast(config):
    return fast_compile_options() if config.fast_compile else None






@functools.cache
def _degrade(scale: int):
    return jax.jit(functools.partial(degrade, scale=scale))




class Space:
    """Where the diffusion runs: the frozen autoencoder's scaled latents, or pixels.

    ``encode(x)`` / ``decode(z)`` map numpy batches (decode clips to [-1, 1]); ``ae`` is
    ``(graphdef, params, scale_factor)`` in latent space, else None."""

    def __init__(self, ae=None, fast: bool = False):
        self.latent = ae is not None
        self.ae = ae
        self.fast = fast
        if self.latent:
            self._enc, self._dec = codec(ae[0], bool(fast))

    def with_decoder_params(self, params) -> Space:
        """The same space decoding with other autoencoder parameters (decoder fine-tuning)."""
        g, _, sf = self.ae
        return Space((g, params, sf), self.fast)

    def encode(self, x: np.ndarray) -> np.ndarray:
        if not self.latent:
            return np.asarray(x, np.float32)
        return batched(lambda a: self._enc(self.ae[1], a, self.ae[2]), x)

    def decode(self, z: np.ndarray) -> np.ndarray:
        if not self.latent:
            return np.clip(np.asarray(z), -1.0, 1.0)
        return batched(lambda a: self._dec(self.ae[1], a, self.ae[2]), z)


def _ae_config(config) -> nets.AutoencoderConfig:
    a = config.autoencoder
    return nets.autoencoder_digits(int(a.factor), int(config.data.channels),
                                   base_channels=int(a.base_channels),
                                   latent_channels=int(a.latent_channels),
                                   attn_in_middle=bool(a.attention))


def _ckpt_data(config) -> dict:
    d = config.data
    return {k: (list(as_tuple(d[k])) if k.endswith("images") else d[k]) for k in d}


@functools.cache
def _ae_step(graphdef, kl_weight: float, scales: tuple, lr: float, steps: int, warmup: int):
    """The autoencoder's ``(train_step, optimizer)``, built (and compiled) once per setting."""

    def model(p):
        return nnx.merge(graphdef, p)

    loss = kl_autoencoder_loss(lambda p, x: model(p).encode(x), lambda p, z: model(p).decode(z),
                               kl_weight=kl_weight, scales=scales)
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(warmup, steps - 1))
    return make_train_step(loss, opt, ema_decay=0.0), opt


def train_autoencoder(config, train_hr: np.ndarray, workdir: str, *, progress=True):
    """The first stage: LDM's KL autoencoder on the train patches (resumable). Returns
    ``(graphdef, params, scale_factor)``."""
    a = config.autoencoder
    graphdef, params = nets.init_params(nets.AutoencoderKL, _ae_config(config), seed=0)
    scales = tuple(s for s in (1, 2, 4) if config.data.patch_size % s == 0)
    step, opt = _ae_step(graphdef, float(a.kl_weight), scales, float(a.learning_rate),
                         int(a.steps), int(a.warmup_steps))
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(0)),
                   BatchIterator({"x": train_hr}, a.batch_size, seed=0),
                   os.path.join(workdir, "autoencoder"), steps=a.steps,
                   ckpt_config={"autoencoder": a.to_dict(), "data": _ckpt_data(config)},
                   ckpt_every=a.steps, fast_compile=config.fast_compile, progress=progress,
                   label="autoencoder")
    params = jax.device_get(state.params)
    enc = codec(graphdef, bool(config.fast_compile))[0]
    sf = measure_scale_factor(lambda x: (enc(params, x, 1.0), None), train_hr[:512])
    return graphdef, params, sf


def make_space(config, train_hr, workdir, *, progress=True) -> Space:
    if config.space == "pixel":
        return Space()
    return Space(train_autoencoder(config, train_hr, workdir, progress=progress),
                 config.fast_compile)


def sr_inputs(space: Space, hr: np.ndarray, scales) -> dict:
    """``{"x": encoded HR, s: encoded degraded input at scale s}`` for each scale."""
    out = {"x": space.encode(hr)}
    for s in scales:
        out[s] = space.encode(batched(_degrade(s), hr))
    return out


# ----------------------------------------------------------------------------------------------
# The SR denoiser, its two objectives and its training stages
# ----------------------------------------------------------------------------------------------


def unet_config(config, space: Space) -> nets.UNetConfig:
    p = config.data.patch_size
    side = p // config.autoencoder.factor if space.latent else p
    ch = config.autoencoder.latent_channels if space.latent else config.data.channels
    return nets.tiny(image_size=side, channels=ch, base_channels=config.unet.base_channels,
                     channel_mult=tuple(config.unet.channel_mult),
                     attn_resolutions=(side // 2,) if config.unet.attention else (),
                     extra_in_channels=ch)


def _den(graphdef, params, prediction: str, lr, key=None) -> dpm.Denoiser:
    return make_denoiser(graphdef, params, SCHEDULE, ml_collections.ConfigDict(
        dict(prediction=prediction, preconditioning=None)),
        None if lr is None else {"image": lr}, train_key=key)


def time_sampler(t_one_fraction: float):
    """Training times: uniform on [1e-5, 1], a share ``t_one_fraction`` of them set to 1."""

    def sample(key, n):
        k_u, k_one = jax.random.split(key)
        t = jax.random.uniform(k_u, (n,), minval=1e-5, maxval=1.0)
        return jnp.where(jax.random.bernoulli(k_one, t_one_fraction, (n,)), 1.0, t)

    return sample


@functools.cache
def _step(graphdef, kind: str, prediction: str, weighting: str, optim: tuple,
          t_one_fraction: float = 0.0):
    """``(train_step, optimizer)``: ``kind`` "direct" (ground truth) or "distill" (the
    teacher's x0 at the same noisy input); ``optim = (learning_rate, steps, warmup,
    ema_decay)``. One compiled step per distinct setting serves every stage and seed."""
    lr, steps, warmup, ema = optim
    times = time_sampler(t_one_fraction) if t_one_fraction else "uniform"

    def make_student(p):
        return _den(graphdef, p, prediction, None)

    if kind == "direct":
        inner = denoising_loss(make_student, weighting=weighting, time_sampler=times)

        def loss(params, batch, key):
            return inner(params, {"x": batch["x"], "cond": {"image": batch["lr"]}}, key)
    else:
        inner = scale_distillation_loss(make_student, weighting=weighting, time_sampler=times)

        def loss(params, batch, key, teacher_params):
            return inner(params, {"x": batch["x"], "cond": {"image": batch["lr"]},
                                  "teacher_cond": {"image": batch["lr_teacher"]}}, key,
                         teacher_params)
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(warmup, steps - 1))
    return make_train_step(loss, opt, ema_decay=functools.partial(
        warmup_ema_decay, decay=ema)), opt


def _config_json(config) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=list)


def train_stage(config, graphdef, kind: str, section: str, init, data: dict, seed: int,
                workdir: str, *, teacher=None, points=(), evaluate=None, progress=True,
                label="") -> tuple:
    """One stage (resumable), trained in segments ending at each of ``points`` (and the
    stage's length) so that ``evaluate(params) -> dict`` can read the learning curve there
    (cached in the stage's directory: a rerun costs nothing). Returns ``(ema_params,
    {point: evaluate(...)})``."""
    s = config[section]
    step, opt = _step(graphdef, kind, config.diffusion.prediction, config.diffusion.weighting,
                      (float(s.learning_rate), int(s.steps), int(s.warmup_steps),
                       float(s.ema_decay)), float(config.diffusion.t_one_fraction))
    curve = {}
    for k in sorted({*points, int(s.steps)}):
        state = init_train_state(jax.tree.map(jnp.array, init), opt, jax.random.key(seed))
        it = BatchIterator(data, s.batch_size, seed=seed)
        state, _ = fit(step, state, it, workdir, steps=k,
                       ckpt_config={"kind": kind, section: s.to_dict(), "seed": seed,
                                    "diffusion": config.diffusion.to_dict(),
                                    "unet": config.unet.to_dict(), "space": config.space,
                                    "data": _ckpt_data(config), "n": len(data["x"])},
                       ckpt_every=int(s.steps), extra=() if teacher is None else (teacher,),
                       fast_compile=config.fast_compile, progress=progress, label=label,
                       log_every=max(1, min(50, k)))
        params = jax.device_get(state.ema_params)
        if evaluate is not None and k in points:
            curve[k] = _io.cached(workdir, {"curve_step": k}, lambda p=params: evaluate(p))
    return params, curve


def _stage_data(inputs: dict, scale: int, teacher_scale: int | None, n: int | None = None):
    out = {"x": inputs["x"], "lr": inputs[scale]}
    if teacher_scale is not None:
        out["lr_teacher"] = inputs[teacher_scale]
    return {k: v[:n] for k, v in out.items()} if n is not None else out


# ----------------------------------------------------------------------------------------------
# Sampling and metrics
# ----------------------------------------------------------------------------------------------


@functools.cache
def _sampler(graphdef, prediction: str, pixel: bool, steps: int, fast: bool):
    """``run(params, lr, noise) -> x0``: DDIM (eta 0) from t = 1 on ``steps`` uniform steps
    (``steps = 1``: YONOS-SR's one step from pure noise); pixel-space x0 clipped to [-1, 1]."""
    ts = uniform_time(steps, t_end=0.0)

    def run(params, lr, noise):
        den = _den(graphdef, params, prediction, lr)
        return ddim(dpm.clip_x0(den) if pixel else den, noise, ts)

    return jit(run, fast)


def super_resolve(config, graphdef, params, lr: np.ndarray, steps: int, seed: int
                  ) -> np.ndarray:
    """Latents (or pixels) of ``steps``-step SR from the encoded inputs ``lr``; noise of
    ``seed``."""
    # the state at t = 1 of the VP schedule: N(0, I) (drawn on the host: no compile per shape)
    noise = np.random.default_rng(seed + 10_000).standard_normal(lr.shape).astype(np.float32)
    run = _sampler(graphdef, config.diffusion.prediction, config.space == "pixel", int(steps),
                   bool(config.fast_compile))
    return batched(lambda a, b: run(params, a, b), lr, noise)


@jax.jit
def _fidelity(x, y):
    return psnr(x, y, 2.0), ssim(x, y, 2.0, win_size=7)


def fidelity(images: np.ndarray, hr: np.ndarray) -> dict:
    """Mean PSNR (dB), SSIM (7x7 Gaussian window) and HFER of ``images`` against ``hr``."""
    p, s = _fidelity(jnp.asarray(images), jnp.asarray(hr))
    return {"psnr": float(jnp.mean(p)), "ssim": float(jnp.mean(s)),
            "hfer": float(np.mean(hfer(images)))}


# ----------------------------------------------------------------------------------------------
# Decoder fine-tuning
# ----------------------------------------------------------------------------------------------


@functools.cache
def _decoder_step(graphdef, config_json: str):
    config = ml_collections.ConfigDict(json.loads(config_json))
    dcfg = config.decoder
    disc = None
    if dcfg.discriminator:
        dg = nets.init_params(nets.PatchDiscriminator, nets.PatchDiscriminatorConfig(
            in_channels=config.data.channels, base_channels=16, n_layers=2), seed=1)[0]

        def disc(p, x):
            return nnx.merge(dg, p)(x)
    loss = decoder_finetune_loss(nets.decode_with_frozen(graphdef), l1_weight=dcfg.l1_weight,
                                 ssim_weight=dcfg.ssim_weight, ssim_window=dcfg.ssim_window,
                                 discriminator=disc, disc_weight=dcfg.disc_weight)
    opt = make_optimizer(dcfg.learning_rate, total_steps=dcfg.steps,
                         warmup_steps=min(20, dcfg.steps - 1))
    return make_train_step(loss, opt, ema_decay=0.0), opt


def finetune_decoder(config, space: Space, z_onestep: np.ndarray, hr: np.ndarray, seed: int,
                     workdir: str, *, progress=True):
    """The autoencoder's parameters with the decoder fine-tuned on ``(z_onestep, hr)`` pairs;
    the encoder (and the frozen U-Net that made ``z_onestep``) untouched."""
    g, params, sf = space.ae
    dec, rest = nets.split_decoder(params)
    trainable = dec
    if config.decoder.discriminator:
        trainable = {"dec": dec, "disc": nets.init_params(
            nets.PatchDiscriminator, nets.PatchDiscriminatorConfig(
                in_channels=config.data.channels, base_channels=16, n_layers=2), seed=1)[1]}
    step, opt = _decoder_step(g, _config_json(config))
    state, _ = fit(step, init_train_state(jax.tree.map(jnp.array, trainable), opt,
                                          jax.random.key(seed)),
                   BatchIterator({"z": z_onestep / sf, "x": hr}, config.decoder.batch_size,
                                 seed=seed), workdir, steps=config.decoder.steps,
                   ckpt_config={"decoder": config.decoder.to_dict(), "seed": seed,
                                "autoencoder": config.autoencoder.to_dict()},
                   ckpt_every=config.decoder.steps, extra=(rest,),
                   fast_compile=config.fast_compile, progress=progress,
                   label=f"decoder FT seed {seed}")
    new = jax.device_get(state.params)
    new_dec = new["dec"] if config.decoder.discriminator else new
    return nnx.State.merge(rest, new_dec)


# ----------------------------------------------------------------------------------------------
# The networks of a run (trained, or restored from the workdir)
# ----------------------------------------------------------------------------------------------


class Run:
    """Everything a run trains: the space (autoencoder), the U-Net's graphdef, the x2 teacher,
    the students ``students[kind, scale, seed]`` (kind "distill" or "direct") and their
    learning curves ``curves[kind, seed] = {step: metrics}`` at the first student scale."""

    def __init__(self, space, graphdef, teacher, students, curves, inputs):
        self.space, self.graphdef, self.teacher = space, graphdef, teacher
        self.students, self.curves, self.inputs = students, curves, inputs


def train_networks(config, train_hr, test_hr, workdir, *, seeds, log=print, progress=True,
                   kinds=("distill", "direct")) -> Run:
    scales = scales_of(config)
    space = make_space(config, train_hr, workdir, progress=progress)
    inputs = {"train": sr_inputs(space, train_hr, scales), "test": sr_inputs(space, test_hr,
                                                                             scales)}
    graphdef, init = build_unet(unet_config(config, space), 0)
    tr, te = inputs["train"], inputs["test"]
    teacher, _ = train_stage(config, graphdef, "direct", "teacher", init,
                             _stage_data(tr, scales[0], None), 0,
                             os.path.join(workdir, f"teacher_x{scales[0]}"), progress=progress,
                             label=f"x{scales[0]} teacher")

    def onestep(scale):
        return lambda params: onestep_fidelity(config, graphdef, space, params, te[scale],
                                               test_hr)

    students, curves = {}, {}
    for seed in seeds:
        prev = {"distill": teacher, "direct": teacher}
        for i, s in enumerate(scales[1:]):
            for kind in kinds:
                params, curve = train_stage(
                    config, graphdef, kind, "student", prev[kind],
                    _stage_data(tr, s, scales[i] if kind == "distill" else None), seed,
                    os.path.join(workdir, f"{kind}_x{s}_seed{seed}"),
                    teacher=prev[kind] if kind == "distill" else None,
                    points=as_tuple(config.curve.points) if i == 0 else (),
                    evaluate=onestep(s), progress=progress,
                    label=f"{kind} x{s} seed {seed}")
                students[kind, s, seed] = params
                if i == 0:
                    curves[kind, seed] = curve
                prev[kind] = params
    return Run(space, graphdef, teacher, students, curves, inputs)


def data_size_curve(config, run: Run, test_hr, workdir, *, seeds, full: dict,
                    progress=True) -> dict:
    """``{kind: {n: over_seeds one-step fidelity}}`` at the first student scale, the stage
    seeing only the first ``n`` train patches; ``full[kind]`` (the main run's last curve point)
    is the column of all of them."""
    scales = scales_of(config)
    s, t = scales[1], scales[0]
    tr, te = run.inputs["train"], run.inputs["test"]
    out = {}
    for kind in ("distill", "direct"):
        row = {}
        for n in as_tuple(config.curve.data_sizes):
            def one(seed, n=n, kind=kind):
                params, _ = train_stage(
                    config, run.graphdef, kind, "student", run.teacher,
                    _stage_data(tr, s, t if kind == "distill" else None, n), seed,
                    os.path.join(workdir, f"data{n}_{kind}_x{s}_seed{seed}"),
                    teacher=run.teacher if kind == "distill" else None, progress=progress,
                    label=f"{kind} x{s} on {n} patches, seed {seed}")
                return onestep_fidelity(config, run.graphdef, run.space, params, te[s],
                                        test_hr)
            row[n] = over_seeds(one, seeds)
        row[config.data.num_train] = full[kind]
        out[kind] = row
    return out


def onestep_fidelity(config, graphdef, space: Space, params, lr: np.ndarray,
                     test_hr: np.ndarray) -> dict:
    """:func:`fidelity` of one-step SR from the encoded inputs ``lr`` (noise of seed 0: every
    point of a learning curve sees the same start noise)."""
    return fidelity(space.decode(super_resolve(config, graphdef, params, lr, 1, 0)), test_hr)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def evaluate_scale(config, run: Run, s: int, test_hr, train_hr, workdir, *, seeds,
                   log=print, progress=True) -> tuple[dict, dict]:
    """``(rows, figure_images)``: ``{row: over_seeds fidelity}`` at scale ``s``, and seed
    ``seeds[0]``'s outputs of the figure's columns."""
    te, tr = run.inputs["test"], run.inputs["train"]
    space, g = run.space, run.graphdef
    deg = batched(_degrade(s), test_hr)
    rows = {"bicubic": over_seeds(lambda seed: fidelity(deg, test_hr), seeds[:1])}
    if space.latent:
        rows["autoencoder round trip of HR (ceiling)"] = over_seeds(
            lambda seed: fidelity(space.decode(te["x"]), test_hr), seeds[:1])
    shown = {"bicubic": deg}

    def sr(kind, steps, seed, sp=space):
        x = sp.decode(super_resolve(config, g, run.students[kind, s, seed], te[s], steps, seed))
        if seed == seeds[0] and steps == 1:
            shown[f"{kind}, 1 step" + ("" if sp is space else " + decoder FT")] = x
        return fidelity(x, test_hr)

    for steps in sorted(as_tuple(config.sample.many_steps), reverse=True):
        t0 = time.perf_counter()
        rows[f"direct, {steps} steps"] = over_seeds(
            lambda seed, steps=steps: sr("direct", steps, seed), seeds)
        log(f"  x{s} direct {steps} steps ({time.perf_counter() - t0:.0f} s)")
    rows["direct, 1 step"] = over_seeds(lambda seed: sr("direct", 1, seed), seeds)
    rows["scale-distilled, 1 step"] = over_seeds(lambda seed: sr("distill", 1, seed), seeds)
    steps = min(as_tuple(config.sample.many_steps))
    rows[f"scale-distilled, {steps} steps"] = over_seeds(
        lambda seed: sr("distill", steps, seed), seeds)
    if space.latent:
        def finetuned(seed):
            z1 = super_resolve(config, g, run.students["distill", s, seed], tr[s], 1, seed)
            ae = finetune_decoder(config, space, z1, train_hr, seed,
                                  os.path.join(workdir, f"decoder_x{s}_seed{seed}"),
                                  progress=progress)
            return sr("distill", 1, seed, space.with_decoder_params(ae))
        t0 = time.perf_counter()
        rows["scale-distilled, 1 step + decoder FT"] = over_seeds(finetuned, seeds)
        log(f"  x{s} decoder fine-tuning ({time.perf_counter() - t0:.0f} s)")
    rows["HR (ground truth)"] = {"hfer": {"mean": float(np.mean(hfer(test_hr))), "sd": 0.0,
                                          "values": [float(np.mean(hfer(test_hr)))]}}
    return rows, shown


def _paired(a: dict, b: dict, metric: str) -> tuple[float, float]:
    """Mean and sd over seeds of ``a - b`` (paired: same seeds)."""
    d = np.asarray(a[metric]["values"]) - np.asarray(b[metric]["values"])
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def _call(mean: float, sd: float, better_if_positive: bool = True) -> str:
    if abs(mean) <= sd:
        return "tie (within 1 sd)"
    return "better" if (mean > 0) == better_if_positive else "worse"


def verdict(config, report) -> list[str]:
    """The paper's claims, checked on the paired seed differences (beyond +-1 sd)."""
    out = []
    many = max(as_tuple(config.sample.many_steps))
    for s in as_tuple(config.student.scales):
        r = report["quality"][f"x{s}"]
        one, direct1 = r["scale-distilled, 1 step"], r["direct, 1 step"]
        directN = r[f"direct, {many} steps"]
        m, sd = _paired(one, directN, "psnr")
        ms, sds = _paired(one, directN, "ssim")
        out.append(f"x{s}: scale-distilled 1 step vs direct {many} steps: PSNR {m:+.2f} +- "
                   f"{sd:.2f} dB ({_call(m, sd)}), SSIM {ms:+.3f} +- {sds:.3f} "
                   f"({_call(ms, sds)})")
        m, sd = _paired(one, direct1, "psnr")
        ms, sds = _paired(one, direct1, "ssim")
        out.append(f"x{s}: scale-distilled vs direct, both 1 step: PSNR {m:+.2f} +- {sd:.2f} dB "
                   f"({_call(m, sd)}), SSIM {ms:+.3f} +- {sds:.3f} ({_call(ms, sds)})")
        ft = r.get("scale-distilled, 1 step + decoder FT")
        if ft is not None:
            m, sd = _paired(ft, one, "psnr")
            ms, sds = _paired(ft, one, "ssim")
            out.append(f"x{s}: + decoder fine-tuning vs without: PSNR {m:+.2f} +- {sd:.2f} dB "
                       f"({_call(m, sd)}), SSIM {ms:+.3f} +- {sds:.3f} ({_call(ms, sds)})")
    curve = report["curve_steps"]
    pts = sorted(curve["distill"], key=int)
    first, last = pts[0], pts[-1]
    m0, sd0 = _paired(curve["distill"][first], curve["direct"][first], "psnr")
    m1, sd1 = _paired(curve["distill"][last], curve["direct"][last], "psnr")
    out.append(f"learning curve (x{scales_of(config)[1]}, 1 step): distilled - direct PSNR "
               f"{m0:+.2f} +- {sd0:.2f} dB after {first} steps, {m1:+.2f} +- {sd1:.2f} dB after "
               f"{last}" + (": the gap closes with training" if abs(m1) < abs(m0) else ""))
    data = report["curve_data"]
    ns = sorted(data["distill"], key=int)
    m0, sd0 = _paired(data["distill"][ns[0]], data["direct"][ns[0]], "psnr")
    m1, sd1 = _paired(data["distill"][ns[-1]], data["direct"][ns[-1]], "psnr")
    out.append(f"data efficiency (x{scales_of(config)[1]}, 1 step): distilled - direct PSNR "
               f"{m0:+.2f} +- {sd0:.2f} dB on {ns[0]} patches, {m1:+.2f} +- {sd1:.2f} dB on "
               f"{ns[-1]}")
    return out


def tables(config, report) -> str:
    parts = []
    for s in as_tuple(config.student.scales):
        rows = report["quality"][f"x{s}"]
        parts += [f"### x{s} (held-out patches, {config.data.num_test}; mean +- sd over "
                  "seeds)", "",
                  markdown_table(rows, [("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
                                        ("hfer", "HFER")], row_header="method", digits=4), ""]
    s1 = scales_of(config)[1]
    for key, title, col in (("curve_steps", "one-step PSNR (dB) vs training steps", "steps"),
                            ("curve_data", "one-step PSNR (dB) vs training patches",
                             "patches")):
        cur = report[key]
        xs = sorted(cur["distill"], key=int)
        parts += [f"### x{s1}: {title}", "",
                  markdown_table({k: {str(x): cur[k][x]["psnr"] for x in xs}
                                  for k in ("distill", "direct")},
                                 [str(x) for x in xs], row_header=f"student \\ {col}",
                                 digits=4), ""]
    return "\n".join(parts)


def _figure(path, config, test_hr, shown: dict, s: int) -> str:
    """LR | bicubic | direct 1 step | distilled 1 step | + decoder FT | HR, one row per patch."""
    k = min(int(config.sample.figure_patches), len(test_hr))
    low = np.asarray(area_downsample(jnp.asarray(test_hr[:k]), s))
    low = low.repeat(s, axis=1).repeat(s, axis=2)  # the LR patch, nearest-neighbour enlarged
    cols = [low, shown["bicubic"][:k], shown["direct, 1 step"][:k],
            shown["distill, 1 step"][:k]]
    if "distill, 1 step + decoder FT" in shown:
        cols.append(shown["distill, 1 step + decoder FT"][:k])
    cols.append(test_hr[:k])
    grid = np.stack(cols, axis=1).reshape(-1, *test_hr.shape[1:])
    _io.save_image_grid(path, grid, ncol=len(cols), scale=3)
    return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True,
                       log=print) -> dict:
    """Validates ``config``, trains (or restores) every network, evaluates, and writes the
    report to ``workdir``. Returns the report dict."""
    check_config(config)
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    seeds = as_tuple(config.seeds)
    train_hr, test_hr = sr_data(config)
    run = train_networks(config, train_hr, test_hr, workdir, seeds=seeds, log=log,
                         progress=progress)
    t_train = time.perf_counter()
    log(f"networks ready ({t_train - t0:.0f} s)")
    report = {"config": config.to_dict(), "quality": {}}
    figs = []
    for s in as_tuple(config.student.scales):
        rows, shown = evaluate_scale(config, run, s, test_hr, train_hr, workdir, seeds=seeds,
                                     log=log, progress=progress)
        report["quality"][f"x{s}"] = rows
        if s == scales_of(config)[1]:
            figs.append(_figure(os.path.join(workdir, f"samples_x{s}.png"), config, test_hr,
                                shown, s))
    report["curve_steps"] = {
        kind: {k: over_seeds(lambda seed, k=k, kind=kind: run.curves[kind, seed][k], seeds)
               for k in as_tuple(config.curve.points)} for kind in ("distill", "direct")}
    s1 = scales_of(config)[1]
    for kind in ("distill", "direct"):
        report["curve_steps"][kind][config.student.steps] = over_seeds(
            lambda seed, kind=kind: onestep_fidelity(
                config, run.graphdef, run.space, run.students[kind, s1, seed],
                run.inputs["test"][s1], test_hr), seeds)
    t_curve = time.perf_counter()
    report["curve_data"] = data_size_curve(
        config, run, test_hr, workdir, seeds=seeds, progress=progress,
        full={k: report["curve_steps"][k][config.student.steps] for k in ("distill", "direct")})
    log(f"data-size curve ({time.perf_counter() - t_curve:.0f} s)")
    labels = {"distill": "scale-distilled", "direct": "direct (ground truth)"}
    for key, xlabel in (("curve_steps", "student training steps"),
                        ("curve_data", "training patches seen by the student stage")):
        cur = report[key]
        xs = sorted(cur["distill"], key=int)
        figs.append(plot_curves(os.path.join(workdir, f"{key}.png"), [int(x) for x in xs],
                                {labels[k]: [cur[k][x]["psnr"] for x in xs]
                                 for k in ("distill", "direct")},
                                xlabel, "one-step PSNR (dB), held-out patches",
                                f"x{s1}: scale distillation vs direct training",
                                logx=key == "curve_data"))
    report["step_cost"] = _step_cost(workdir, s1, seeds[0])
    report["seconds"] = {"train": t_train - t0, "total": time.perf_counter() - t0}
    report["verdict"] = verdict(config, report)
    flags = command_flags(config, get_config())
    cost = report["step_cost"]
    notes = ["## Verdict (paired differences over seeds, beyond +-1 sd)", ""]
    notes += [f"- {v}" for v in report["verdict"]]
    notes += ["", f"Training: autoencoder {config.autoencoder.steps} steps; x"
              f"{scales_of(config)[0]} teacher {config.teacher.steps} steps; every student stage "
              f"{config.student.steps} steps at batch {config.student.batch_size} (distilled and "
              f"direct alike, same initialisation and data order); decoder fine-tuning "
              f"{config.decoder.steps} steps. Equal updates are not equal compute: a "
              "distillation step also runs the teacher's forward pass"
              + (f" (measured here: {cost['ratio']:.2f}x the time of a direct step)"
                 if cost else "") + ".",
              "", "Command: `python -m experiments.yonos_sr --workdir runs/yonos_sr"
              + (f" {flags}`" if flags else "`"),
              "", f"Run time: {report['seconds']['total']:.0f} s (networks "
              f"{report['seconds']['train']:.0f} s; restored networks cost nothing)."]
    write_report(workdir, "report", tables(config, report), report, figs,
                 judge="none: PSNR, SSIM and HFER against the held-out HR patches (images no "
                 "network saw); SSIM with a 7x7 Gaussian window, data range 2",
                 title=f"YONOS-SR in miniature ({config.data.patch_size}x"
                 f"{config.data.patch_size} patches of scikit-image's bundled images, "
                 f"{config.space} space)", notes="\n".join(notes))
    return report


def _step_cost(workdir: str, s: int, seed: int) -> dict:
    """Median steps/s of the distilled and direct stage at scale ``s`` (their metrics logs,
    the first record, which holds the compilation, dropped) and the time ratio."""
    rates = {}
    for kind in ("distill", "direct"):
        path = os.path.join(workdir, f"{kind}_x{s}_seed{seed}", "metrics.jsonl")
        recs = _io.read_jsonl(path) if os.path.exists(path) else []
        r = [x["steps_per_s"] for x in recs[1:] if "steps_per_s" in x]
        if not r:
            return {}
        rates[kind] = float(np.median(r))
    return {"distill_steps_per_s": rates["distill"], "direct_steps_per_s": rates["direct"],
            "ratio": rates["direct"] / rates["distill"]}


# ----------------------------------------------------------------------------------------------
# upscale: a user's own image, tiled
# ----------------------------------------------------------------------------------------------


def _taper(tile: int, overlap: int) -> np.ndarray:
    """``(tile, tile)`` blending weights: 1 inside, a linear ramp over ``overlap`` pixels at
    each edge (never 0, so a pixel covered by one tile keeps its value)."""
    ramp = np.ones(tile)
    if overlap:
        r = (np.arange(overlap) + 1.0) / (overlap + 1.0)
        ramp[:overlap], ramp[-overlap:] = r, r[::-1]
    return np.outer(ramp, ramp)


def tiled(fn, image: np.ndarray, tile: int, overlap: int, batch: int = 64) -> np.ndarray:
    """``fn`` (``(B, tile, tile, C) -> (B, tile, tile, C)``) over an ``(H, W, C)`` image of any
    size: overlapping tiles on a stride of ``tile - overlap``, the image padded by symmetric
    reflection to cover them, outputs blended with linear ramps over the overlaps and cropped
    back to ``(H, W, C)``."""
    if not 0 <= overlap < tile // 2 + 1:
        raise ValueError(f"overlap must be in [0, tile / 2]; got {overlap} for tile {tile}")
    h, w, c = image.shape
    stride = tile - overlap

    def count(n):
        return max(1, -(-(n - tile) // stride) + 1)

    ny, nx = count(h), count(w)
    ph, pw = (ny - 1) * stride + tile, (nx - 1) * stride + tile
    padded = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)), mode="symmetric")
    corners = [(i * stride, j * stride) for i in range(ny) for j in range(nx)]
    tiles = np.stack([padded[y:y + tile, x:x + tile] for y, x in corners])
    out_tiles = np.concatenate([np.asarray(fn(tiles[i:i + batch]))
                                for i in range(0, len(tiles), batch)])
    wgt = _taper(tile, overlap)[..., None]
    acc = np.zeros((ph, pw, c))
    norm = np.zeros((ph, pw, 1))
    for (y, x), t in zip(corners, out_tiles, strict=True):
        acc[y:y + tile, x:x + tile] += wgt * t
        norm[y:y + tile, x:x + tile] += wgt
    return (acc / norm)[:h, :w].astype(np.float32)


def _read_image(path: str, channels: int) -> np.ndarray:
    """An 8-bit image file as ``(H, W, channels)`` in [-1, 1]; a colour image for a grayscale
    model (or the reverse) is refused, naming both."""
    from PIL import Image

    with Image.open(path) as im:
        mode = im.mode
        if mode in ("L", "LA", "1"):
            got = 1
        elif mode in ("RGB", "RGBA", "P"):
            rgb = np.asarray(im.convert("RGB"))
            gray_palette = mode == "P" and bool(np.all(rgb == rgb[..., :1]))
            got = 1 if gray_palette else 3
        else:
            raise ValueError(f"{path}: 8-bit grayscale or RGB images only; got mode {mode!r}")
        if got != channels:
            kinds = {1: "grayscale", 3: "RGB"}
            raise ValueError(f"{path} is a {kinds[got]} image but the model was trained on "
                             f"{kinds[channels]} patches (config.data.channels={channels}); "
                             f"convert the image to {kinds[channels]} first")
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), np.float32)
    arr = arr.reshape(*arr.shape[:2], channels)
    return arr / 127.5 - 1.0


def _write_image(path: str, x: np.ndarray) -> None:
    from PIL import Image

    u8 = np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8).save(path)


def load_run(workdir: str, *, progress=False) -> tuple[ml_collections.ConfigDict, Run]:
    """The config and networks of a finished run in ``workdir`` (restored, nothing trained;
    the first seed's scale-distilled chain only)."""
    config = finished_config(workdir, "yonos_sr")
    config.seeds = as_tuple(config.seeds)[:1]
    train_hr, test_hr = sr_data(config)
    run = train_networks(config, train_hr, test_hr[:8], workdir, seeds=config.seeds,
                         log=lambda *_: None, progress=progress, kinds=("distill",))
    run.train_hr = train_hr
    return config, run


def upscale(workdir: str, src: str, dst: str, scale: int, *, overlap: int = 8,
            finetuned_decoder: bool = True, seed: int = 0) -> np.ndarray:
    """Super-resolves the image file ``src`` by ``scale`` with the run in ``workdir`` (its
    one-step scale-distilled model; x{teacher scale}: the teacher) and writes ``dst``.

    The input is bicubic-upsampled to the output size (the models' input, as in training),
    then processed in overlapping patch-sized tiles. Returns the output in [-1, 1]. The scale
    and the image are checked before any network is restored."""
    config = finished_config(workdir, "yonos_sr")
    scales = scales_of(config)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in scales:
        raise ValueError(f"scale must be one of {scales} (the chain trained in {workdir}); "
                         f"got {scale!r}")
    lr = _read_image(src, int(config.data.channels))
    config, run = load_run(workdir)
    up = np.asarray(jax.image.resize(jnp.asarray(lr), (lr.shape[0] * scale,
                                                       lr.shape[1] * scale, lr.shape[2]),
                                     "cubic"))
    params = run.teacher if scale == scales[0] else run.students["distill", scale,
                                                                config.seeds[0]]
    space = run.space
    if finetuned_decoder and space.latent and scale != scales[0]:
        s0 = config.seeds[0]
        z1 = super_resolve(config, run.graphdef, params, run.inputs["train"][scale], 1, s0)
        ae = finetune_decoder(config, space, z1, run.train_hr, s0,
                              os.path.join(workdir, f"decoder_x{scale}_seed{s0}"),
                              progress=False)
        space = space.with_decoder_params(ae)

    def fn(tiles):
        z = super_resolve(config, run.graphdef, params, space.encode(tiles), 1, seed)
        return space.decode(z)

    out = tiled(fn, up, int(config.data.patch_size), overlap)
    _write_image(dst, out)
    return out


def _upscale_main(argv: Sequence[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m experiments.yonos_sr upscale",
        description="Super-resolve an image with a finished run's one-step model.")
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--workdir", default="runs/yonos_sr")
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--no-finetuned-decoder", action="store_true")
    a = ap.parse_args(list(argv))
    with user_errors():
        if not os.path.exists(a.input):
            raise UsageError(f"input {a.input!r} does not exist")
        try:
            out = upscale(a.workdir, a.input, a.output, a.scale, overlap=a.overlap,
                          finetuned_decoder=not a.no_finetuned_decoder)
        except ValueError as e:  # a user's input: one line, not a traceback
            raise UsageError(str(e)) from None
    print(f"wrote {a.output} ({out.shape[1]}x{out.shape[0]})")


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["upscale"]:
        _upscale_main(argv[1:])
        return None
    return run_experiment(argv, "experiments.yonos_sr", __doc__.splitlines()[0],
                          train_and_evaluate, validate=check_config)


if __name__ == "__main__":
    main(sys.argv[1:])
