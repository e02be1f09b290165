"""RG-LCD (Li, Feng, Chen & Wang, TMLR 2024: "Reward Guided Latent Consistency Distillation")
and the latent consistency distillation it builds on (LCD / LCM, Luo et al. 2023), in
miniature, on captioned 16x16 digits.

    python -m experiments.rg_lcd --workdir runs/rg_lcd

Every part is built here, nothing downloaded:

* **Prompts.** Captions from a template grammar over attributes measured on each image (the
  digit, stroke thickness, slant, size; synonyms; :mod:`dpm.data.captions`). Networks train
  on the digits train split (the zoo's split) with four captions per image; the evaluation
  prompts are captions of the *test* split drawn with another seed.
* **Latent text-to-image teacher.** LDM's KL autoencoder (f = 4: 16x16 -> 4x4x4, frozen,
  latents scaled to unit variance) and a U-Net with cross-attention to the token features of
  a small text encoder (trained jointly, then frozen, the frozen-CLIP-text role);
  eps-prediction on Stable Diffusion's scaled-linear betas (0.00085 -> 0.012, 1,000 steps),
  10 % condition dropout (the empty caption) for classifier-free guidance.
* **Reward models.** CLIP-style contrastive image-text models (InfoNCE): the *expert* reward on
  pixels (the CLIPScore analogue, trained on the train split), the *latent* CLIP of the
  paper's proxy reward model (its pretraining, on train latents), and the *judge* CLIP
  (another seed, trained on the test split) that is never optimized.
* **LCD** (:func:`dpm.losses.lcd_loss`): the student starts as the teacher plus a zero-
  initialized w-embedding; skipping step k = 20 on the 50-point grid, w ~ U[w_min, w_max],
  the teacher's guided DDIM step inside the jitted step, EMA target mu = 0.95, pseudo-Huber.
  Sampled with the multistep LCM sampler (:func:`solvers.lcm`).
* **RG-LCD**: the same plus ``-beta * expert(decode(f_theta(z_start)))`` (gradients through
  the decoder and the expert; :func:`dpm.losses.rg_lcd_loss`), and the LRM variant: the
  latent CLIP fitted online to the expert's preferences among {student, target, ground
  truth} latents, the student rewarded by it (:func:`dpm.losses.rg_lcd_lrm_loss`).

Graded on the evaluation prompts: the judge CLIP's score (cosine of image and prompt), digit
adherence by the zoo's judge classifier (the digit the prompt names), KID / precision /
recall in its features against the test split, HFER (the reward-hacking detector) and the
expert's own reward. All are in-project proxies. Seeds vary the students' training and the
sampling noise; the autoencoder, teacher and reward models are trained once. Writes
``<workdir>/report.{md,json}`` and PNGs; the committed copy lives in
``experiments/results/rg_lcd/``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import dpm
import nets
from dpm.data import (
    BatchIterator,
    CaptionVocab,
    attribute_thresholds,
    caption_dataset,
    digit_attributes,
)
from dpm.losses import (
    DISTANCES,
    PREFERENCE_MODES,
    clip_loss,
    decoded_reward,
    denoising_loss,
    guidance_embedding,
    kl_autoencoder_loss,
    lcd_loss,
    measure_scale_factor,
    rg_lcd_loss,
    rg_lcd_lrm_loss,
)
from dpm.training import (
    init_train_state,
    make_optimizer,
    make_train_step,
    warmup_ema_decay,
)
from experiments import _io
from experiments._checks import as_tuple, config_int, config_number, int_values
from experiments._cli import run_experiment
from experiments._latent import batched, codec, jit
from experiments._report import markdown_table, over_seeds, plot_curves, write_report
from experiments._runner import fit
from experiments._zoo import (
    digits_config,
    digits_data,
    evaluate,
    floor,
    judge_description,
    judges,
    report_fields,
)
from solvers import ddim, lcm, lcm_grid
from solvers.grids import trailing

SCHEDULE = dpm.DiscreteVP.from_name("scaled_linear", 1000)
STUDENTS = ("lcd", "rg", "rg_lrm")


def get_config() -> ml_collections.ConfigDict:
    """The default run: 16x16 captioned digits, 3 seeds, sized for <= 30 min on 2 idle CPU
    cores (the zoo's 16x16 judge classifiers cached)."""
    c = ml_collections.ConfigDict()
    c.name = "rg_lcd"
    report_fields(c)  # zoo_root, judge_steps, seeds (0, 1, 2), fast_compile, kid_subsets
    c.image_size = 16
    # max_len 0: the grammar's longest caption
    c.captions = ml_collections.ConfigDict(dict(per_image=4, max_len=0, seed=0,
                                                num_prompts=300))
    c.autoencoder = ml_collections.ConfigDict(dict(
        factor=4, base_channels=16, latent_channels=4, steps=400, batch_size=32,
        learning_rate=2e-3, warmup_steps=50, kl_weight=1e-6))
    c.text = ml_collections.ConfigDict(dict(width=64, depth=2, num_heads=4))
    # the U-Net (teacher and students): nets.tiny's levels; self-attention at the lowest
    # resolution of two or more levels, cross-attention at every level
    c.teacher = ml_collections.ConfigDict(dict(
        base_channels=32, channel_mult=(1, 2), steps=1200, batch_size=64, learning_rate=1e-3,
        warmup_steps=100, ema_decay=0.999, cond_dropout=0.1))
    c.clip = ml_collections.ConfigDict(dict(steps=300, batch_size=128, learning_rate=2e-3,
                                            embed_dim=64, image_width=32))
    # LCD (LCM's recipe; w in LCM's convention: guidance scale 1 + w)
    c.lcd = ml_collections.ConfigDict(dict(
        skip=20, w_min=0.0, w_max=4.0, distance="huber", huber_c=1e-3, boundary=True,
        ema_decay=0.95, steps=300, batch_size=32, learning_rate=2e-4, warmup_steps=20,
        w_embed_dim=64))
    # RG-LCD: direct reward at each beta; the LRM variant at lrm_beta, its own optimizer;
    # temperature 0 = the expert's learned logit scale (for both models' pairwise softmax)
    c.rg = ml_collections.ConfigDict(dict(
        betas=(0.1, 1.0, 10.0), lrm_beta=1.0, rm_batch_size=16, lrm_learning_rate=1e-4,
        mode="kl", temperature=0.0))
    # the w sweep runs the teacher at 8 steps (16 NFE): at w = 2 its 8- and 50-step samples
    # were within 0.001 judge CLIP (the 50-step sweep cost ~6 of the run's minutes)
    c.sample = ml_collections.ConfigDict(dict(
        w=2.0, teacher_steps=(1, 2, 4, 8, 50), student_steps=(1, 2, 4, 8),
        w_sweep=(0.0, 1.0, 2.0, 4.0), sweep_steps=4, sweep_teacher_steps=8, figure_prompts=10))
    # one change each from c.lcd, graded at `steps` LCM steps; off in the default run (its
    # 30-minute budget): `--config.ablations.enabled=True` in the same workdir adds them,
    # reusing every network and cell already there
    c.ablations = ml_collections.ConfigDict(dict(
        enabled=False, skip=(1, 5, 50), ema_decay=(0.0,), boundary=(False,), distance=("l2",),
        steps=2))
    return c


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every setting checked before any work; errors name the key, the value, the choices."""
    if config.image_size not in (8, 16):
        raise ValueError(f"config.image_size must be 8 or 16 (the zoo's digits judges); got "
                         f"{config.image_size!r}")
    cp = config.captions
    config_int("captions.per_image", cp.per_image)
    config_int("captions.max_len", cp.max_len, 0)
    config_int("captions.num_prompts", cp.num_prompts, 2)
    a = config.autoencoder
    if a.factor not in (2, 4) or config.image_size // a.factor < 2:
        raise ValueError(f"config.autoencoder.factor must be 2 or 4, leaving latents of side "
                         f">= 2 (the U-Net's two levels); got {a.factor!r} for "
                         f"image_size={config.image_size}")
    for sec in ("autoencoder", "teacher", "clip", "lcd"):
        s = config[sec]
        config_int(f"{sec}.steps", s.steps)
        config_int(f"{sec}.batch_size", s.batch_size)
        if s.batch_size % jax.device_count():
            raise ValueError(f"config.{sec}.batch_size must be a multiple of the "
                             f"{jax.device_count()} devices; got {s.batch_size}")
        config_number(f"{sec}.learning_rate", s.learning_rate, 0.0, open_low=True)
    mult = as_tuple(config.teacher.channel_mult)
    side = config.image_size // a.factor
    if not mult or not all(isinstance(m, int) and m >= 1 for m in mult) or side % 2 ** (
            len(mult) - 1):
        raise ValueError(f"config.teacher.channel_mult must be positive ints, at most "
                         f"log2(latent side {side}) + 1 levels; got "
                         f"{config.teacher.channel_mult!r}")
    config_number("teacher.cond_dropout", config.teacher.cond_dropout, 0.0)
    if not config.teacher.cond_dropout < 1:
        raise ValueError(f"config.teacher.cond_dropout must be in [0, 1); got "
                         f"{config.teacher.cond_dropout!r}")
    d = config.lcd
    config_int("lcd.skip", d.skip)
    if SCHEDULE.num_steps % d.skip:
        raise ValueError(f"config.lcd.skip must divide {SCHEDULE.num_steps}; got {d.skip!r}")
    config_number("lcd.w_min", d.w_min, 0.0)
    config_number("lcd.w_max", d.w_max, d.w_min)
    if d.distance not in DISTANCES:
        raise ValueError(f"config.lcd.distance must be one of {DISTANCES}; got {d.distance!r}")
    config_number("lcd.huber_c", d.huber_c, 0.0, open_low=True)
    config_number("lcd.ema_decay", d.ema_decay, 0.0)
    if not d.ema_decay < 1:
        raise ValueError(f"config.lcd.ema_decay must be in [0, 1); got {d.ema_decay!r}")
    config_int("lcd.w_embed_dim", d.w_embed_dim, 4)
    if d.w_embed_dim % 2:
        raise ValueError(f"config.lcd.w_embed_dim must be even; got {d.w_embed_dim!r}")
    r = config.rg
    for b in as_tuple(r.betas):
        config_number("rg.betas", b, 0.0, open_low=True)
    config_number("rg.lrm_beta", r.lrm_beta, 0.0)
    config_int("rg.rm_batch_size", r.rm_batch_size)
    if r.rm_batch_size > d.batch_size:
        raise ValueError(f"config.rg.rm_batch_size ({r.rm_batch_size}) must be <= "
                         f"config.lcd.batch_size ({d.batch_size})")
    config_number("rg.lrm_learning_rate", r.lrm_learning_rate, 0.0, open_low=True)
    if r.mode not in PREFERENCE_MODES:
        raise ValueError(f"config.rg.mode must be one of {PREFERENCE_MODES}; got {r.mode!r}")
    config_number("rg.temperature", r.temperature, 0.0)
    s = config.sample
    config_number("sample.w", s.w, 0.0)
    for w in as_tuple(s.w_sweep):
        config_number("sample.w_sweep", w, 0.0)
    int_values("sample.teacher_steps", s.teacher_steps, 1)
    n_grid = SCHEDULE.num_steps // d.skip
    int_values("sample.student_steps", s.student_steps, 1, n_grid)
    config_int("sample.sweep_steps", s.sweep_steps)
    config_int("sample.sweep_teacher_steps", s.sweep_teacher_steps)
    config_int("sample.figure_prompts", s.figure_prompts)
    ab = config.ablations
    for k in as_tuple(ab.skip):
        config_int("ablations.skip", k)
        if SCHEDULE.num_steps % k:
            raise ValueError(f"config.ablations.skip entries must divide {SCHEDULE.num_steps}; "
                             f"got {k!r}")
    for m in as_tuple(ab.ema_decay):
        config_number("ablations.ema_decay", m, 0.0)
    for dist in as_tuple(ab.distance):
        if dist not in DISTANCES:
            raise ValueError(f"config.ablations.distance entries must be in {DISTANCES}; "
                             f"got {dist!r}")
    config_int("ablations.steps", ab.steps)
    if not isinstance(ab.enabled, bool):
        raise ValueError(f"config.ablations.enabled must be True or False; got {ab.enabled!r}")
    int_values("config.seeds", config.seeds, 0)


# ----------------------------------------------------------------------------------------------
# Data: captioned digits and evaluation prompts
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train: dict          # the train split, captioned per_image times (tokens, y, x, ...)
    test: dict           # the test split, captioned per_image times (the judge CLIP's data)
    test_images: dict    # the raw test split {"x", "y"} (the reference of KID / precision)
    train_images: dict   # the raw train split {"x", "y"}
    prompts: dict        # {"tokens", "y", "captions"}: the evaluation prompts
    vocab: CaptionVocab
    max_len: int
    empty: np.ndarray    # (1, L) the empty caption (the null condition)
    novel_fraction: float


def load_data(config) -> Data:
    train_img, test_img = digits_data(digits_config("eps", config.image_size))
    vocab = CaptionVocab()
    c = config.captions
    th = attribute_thresholds(digit_attributes(train_img["x"]))
    kw = dict(thresholds=th, vocab=vocab, **({"max_len": c.max_len} if c.max_len else {}))
    train, train_caps = caption_dataset(train_img["x"], train_img["y"], seed=c.seed,
                                        per_image=c.per_image, **kw)
    test, test_caps = caption_dataset(test_img["x"], test_img["y"], seed=c.seed + 1,
                                      per_image=c.per_image, **kw)
    max_len = train["tokens"].shape[1]
    # the prompts: one caption each of distinct test images
    rng = np.random.default_rng(c.seed + 2)
    n_img = len(test_img["y"])
    img = np.sort(rng.choice(n_img, min(c.num_prompts, n_img), replace=False))
    idx = img * c.per_image + rng.integers(c.per_image, size=len(img))
    seen = set(train_caps)
    prompts = {"tokens": test["tokens"][idx], "y": test["y"][idx],
               "captions": [test_caps[i] for i in idx], "image_index": test["image_index"][idx]}
    novel = float(np.mean([test_caps[i] not in seen for i in idx]))
    return Data(train, test, test_img, train_img, prompts, vocab, max_len,
                vocab.empty(1, max_len), novel)


# ----------------------------------------------------------------------------------------------
# Networks: autoencoder, contrastive models, teacher, students
# ----------------------------------------------------------------------------------------------






def _optimizer(sec, steps=None):
    steps = int(sec.steps if steps is None else steps)
    return make_optimizer(float(sec.learning_rate), total_steps=steps,
                          warmup_steps=min(int(sec.get("warmup_steps", 0)), steps - 1))




@dataclasses.dataclass
class Autoencoder:
    graphdef: nnx.GraphDef
    params: object
    scale_factor: float
    fast: bool = False

    def encode(self, x):
        enc = codec(self.graphdef, self.fast)[0]
        return batched(lambda a: enc(self.params, a, self.scale_factor), x)

    def decode(self, z):
        dec = codec(self.graphdef, self.fast)[1]
        return batched(lambda a: dec(self.params, a, self.scale_factor), z)


@functools.cache
def _ae_step(graphdef, kl_weight: float, optim: tuple):
    def model(p):
        return nnx.merge(graphdef, p)

    loss = kl_autoencoder_loss(lambda p, x: model(p).encode(x), lambda p, z: model(p).decode(z),
                               kl_weight=kl_weight, scales=(1, 2, 4))
    lr, steps, warmup = optim
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(warmup, steps - 1))
    return make_train_step(loss, opt, ema_decay=0.0), opt


def train_autoencoder(config, images: np.ndarray, workdir: str, *, progress=True
                      ) -> Autoencoder:
    """LDM's KL autoencoder on the train images (resumable), frozen after; latents scaled to
    unit variance (LDM's scale factor, measured on the train images)."""
    a = config.autoencoder
    cfg = nets.autoencoder_digits(int(a.factor), 1, base_channels=int(a.base_channels),
                                  latent_channels=int(a.latent_channels), attn_in_middle=False)
    graphdef, params = nets.init_params(nets.AutoencoderKL, cfg, seed=0)
    step, opt = _ae_step(graphdef, float(a.kl_weight),
                         (float(a.learning_rate), int(a.steps), int(a.warmup_steps)))
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(0)),
                   BatchIterator({"x": images}, a.batch_size, seed=0), workdir, steps=a.steps,
                   ckpt_config={"autoencoder": a.to_dict()}, ckpt_every=a.steps,
                   fast_compile=config.fast_compile, progress=progress, label="autoencoder")
    params = jax.device_get(state.params)
    enc = codec(graphdef, bool(config.fast_compile))[0]
    sf = measure_scale_factor(lambda x: (enc(params, x, 1.0), None), images[:512])
    return Autoencoder(graphdef, params, sf, bool(config.fast_compile))


def text_config(config, data: Data) -> nets.TextEncoderConfig:
    t = config.text
    return nets.TextEncoderConfig(vocab_size=len(data.vocab), max_len=data.max_len,
                                  width=int(t.width), depth=int(t.depth),
                                  num_heads=int(t.num_heads))


def clip_config(config, data: Data, size: int, channels: int) -> nets.ContrastiveConfig:
    c = config.clip
    return nets.ContrastiveConfig(image_size=size, in_channels=channels,
                                  text=text_config(config, data),
                                  image_width=int(c.image_width), embed_dim=int(c.embed_dim))


@functools.cache
def _clip_step(graphdef, optim: tuple):
    loss = clip_loss(lambda p, x, t: nnx.merge(graphdef, p)(x, t))
    lr, steps, warmup = optim
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(warmup, steps - 1))
    return make_train_step(loss, opt, ema_decay=0.0), opt


def train_clip(config, data: Data, x: np.ndarray, rows: dict, seed: int, workdir: str, *,
               progress=True, label="clip"):
    """A contrastive image-text model on ``(x, rows["tokens"])`` (multi-positive InfoNCE over
    identical captions), resumable. Returns ``(graphdef, params)``."""
    c = config.clip
    cfg = clip_config(config, data, x.shape[1], x.shape[-1])
    graphdef, params = nets.init_params(nets.ContrastiveModel, cfg, seed=seed)
    step, opt = _clip_step(graphdef, (float(c.learning_rate), int(c.steps), 50))
    it = BatchIterator({"x": x, "tokens": rows["tokens"], "caption_id": rows["caption_id"]},
                       c.batch_size, seed=seed)
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(seed)), it, workdir,
                   steps=c.steps, ckpt_config={"clip": c.to_dict(), "seed": seed,
                                               "shape": list(x.shape)},
                   ckpt_every=c.steps, fast_compile=config.fast_compile, progress=progress,
                   label=label)
    return graphdef, jax.device_get(state.params)


@functools.cache
def _clip_score(graphdef, fast: bool):
    def score(p, x, tokens):
        return nnx.merge(graphdef, p).score(x, tokens)

    return jit(score, fast)


def clip_scores(clip, x: np.ndarray, tokens: np.ndarray, fast: bool) -> np.ndarray:
    """Cosine of each image (or latent) with its own caption, ``(N,)``."""
    graphdef, params = clip
    fn = _clip_score(graphdef, fast)
    return batched(lambda a, t: fn(params, a, t), x, tokens)


def digit_retrieval(clip, data: Data, x: np.ndarray, y: np.ndarray, fast: bool) -> float:
    """Zero-shot digit accuracy of a contrastive model: each image against the ten captions
    "the digit <d>"; a sanity number for the reward models."""
    caps = data.vocab.encode([f"the digit {d}" for d in range(10)], data.max_len)
    scores = np.stack([clip_scores(clip, x, np.repeat(caps[d:d + 1], len(x), 0), fast)
                       for d in range(10)], axis=1)
    return float(np.mean(scores.argmax(1) == y))


# --- the teacher -------------------------------------------------------------------------------


def teacher_unet_config(config, latent_side: int, channels: int, context_dim: int,
                        w_embed_dim: int = 0) -> nets.UNetConfig:
    mult = tuple(int(m) for m in as_tuple(config.teacher.channel_mult))
    sizes = tuple(latent_side // 2**i for i in range(len(mult)))
    return nets.tiny(image_size=latent_side, channels=channels,
                     base_channels=int(config.teacher.base_channels), channel_mult=mult,
                     attn_resolutions=sizes[-1:] if len(mult) > 1 else (),
                     context_dim=context_dim, cross_attn_resolutions=sizes,
                     vector_cond_dim=w_embed_dim)


def _unet_apply(graphdef, params, x, noise_level, cond):
    return nnx.merge(graphdef, params)(x, noise_level, cond)


def unet_denoiser(graphdef, params, cond) -> dpm.Denoiser:
    return dpm.network_denoiser(jax.tree_util.Partial(_unet_apply, graphdef, params), SCHEDULE,
                                "eps", cond=cond)


def _encode_text(text_graphdef, text_params, tokens):
    features, mask, _ = nnx.merge(text_graphdef, text_params)(tokens)
    return {"context": features, "context_mask": mask}


@functools.cache
def _teacher_step(unet_g, text_g, dropout: float, optim: tuple):
    inner = denoising_loss(lambda p: unet_denoiser(unet_g, p["unet"], None), weighting="eps")

    def loss(params, batch, key, empty):
        k_drop, k_loss = jax.random.split(key)
        drop = jax.random.bernoulli(k_drop, dropout, batch["tokens"].shape[:1])
        tokens = jnp.where(drop[:, None], empty[None], batch["tokens"])
        cond = _encode_text(text_g, params["text"], tokens)
        return inner(params, {"x": batch["x"], "cond": cond}, k_loss)

    lr, steps, warmup, ema = optim
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(warmup, steps - 1))
    # warmed-up EMA: a constant 0.999 would keep 0.999^1500 = 22 % of the random
    # initialisation in the sampled parameters
    return make_train_step(loss, opt, ema_decay=functools.partial(warmup_ema_decay,
                                                                  decay=ema)), opt


@dataclasses.dataclass
class Teacher:
    unet_graphdef: nnx.GraphDef
    text_graphdef: nnx.GraphDef
    params: dict            # {"unet", "text"}
    null: dict              # {"context": (1, L, D), "context_mask": (1, L)}: the empty caption


def train_teacher(config, data: Data, latents: np.ndarray, workdir: str, *, progress=True
                  ) -> Teacher:
    """The latent text-to-image teacher: text encoder + cross-attention U-Net, trained jointly
    (eps-MSE, condition dropout), resumable."""
    t = config.teacher
    tcfg = text_config(config, data)
    text_g, text_p = nets.init_params(nets.TextEncoder, tcfg, seed=0)
    ucfg = teacher_unet_config(config, latents.shape[1], latents.shape[-1], tcfg.width)
    unet_g, unet_p = nets.init_params(nets.UNet, ucfg, seed=0)
    step, opt = _teacher_step(unet_g, text_g, float(t.cond_dropout),
                              (float(t.learning_rate), int(t.steps), int(t.warmup_steps),
                               float(t.ema_decay)))
    rows = data.train
    it = BatchIterator({"x": latents[rows["image_index"]], "tokens": rows["tokens"]},
                       t.batch_size, seed=0)
    state, _ = fit(step, init_train_state({"unet": unet_p, "text": text_p}, opt,
                                          jax.random.key(0)),
                   it, workdir, steps=t.steps,
                   ckpt_config={"teacher": t.to_dict(), "text": config.text.to_dict(),
                                "autoencoder": config.autoencoder.to_dict()},
                   ckpt_every=t.steps, extra=(jnp.asarray(data.empty[0]),),
                   fast_compile=config.fast_compile, progress=progress, label="teacher")
    params = jax.device_get(state.ema_params)
    null = jax.device_get(_encode_text(text_g, params["text"], jnp.asarray(data.empty)))
    return Teacher(unet_g, text_g, params, null)


@functools.cache
def _text_fn(text_g, fast: bool):
    return jit(lambda p, tokens: _encode_text(text_g, p, tokens), fast)


def encode_prompts(teacher: Teacher, tokens: np.ndarray, fast: bool) -> dict:
    """The frozen text encoder's ``{"context": (N, L, D), "context_mask": (N, L)}``."""
    fn = _text_fn(teacher.text_graphdef, fast)
    out = [jax.device_get(fn(teacher.params["text"], tokens[i:i + 512]))
           for i in range(0, len(tokens), 512)]
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


# --- the students ------------------------------------------------------------------------------


def student_init(config, teacher: Teacher, latent_shape) -> tuple[nnx.GraphDef, object]:
    """LCM's student: the teacher's U-Net plus a w-embedding (``vector_cond_dim``), teacher
    weights copied, the new embedding freshly initialised (as LCM loads the teacher
    non-strictly: a zero layer would barely learn w, its first layer getting no gradient)."""
    ucfg = teacher_unet_config(config, latent_shape[0], latent_shape[-1],
                               int(config.text.width), int(config.lcd.w_embed_dim))
    graphdef, params = nets.init_params(nets.UNet, ucfg, seed=1)
    pure = nnx.to_pure_dict(params)
    pure.update(jax.tree.map(np.asarray, nnx.to_pure_dict(teacher.params["unet"])))
    nnx.replace_by_pure_dict(params, pure)
    return graphdef, params


def _make_student(graphdef, dim):
    def make(params, cond, w):
        return unet_denoiser(graphdef, params, {**cond, "vector": guidance_embedding(w, dim)})

    return make


def _make_teacher(graphdef):
    def make(params, cond):
        return unet_denoiser(graphdef, params["unet"], cond)

    return make


def _with_null(batch, teacher_params):
    """The batch with the empty caption's context as ``null_cond`` (from the teacher's
    parameters, so no array is baked into the compiled step)."""
    B = batch["x"].shape[0]
    null = {k: jnp.broadcast_to(v, (B,) + v.shape[1:]) for k, v in teacher_params["null"].items()}
    cond = {"context": batch["context"], "context_mask": batch["context_mask"]}
    return {**batch, "cond": cond, "null_cond": null}


def _reward_fns(ae_graphdef, sf: float, expert_g, lrm_g):
    def decode(p, z):
        return nnx.merge(ae_graphdef, p).decode(z / sf)

    def expert_image(p, x, tokens):
        return nnx.merge(expert_g, p).score(x, tokens)

    def lrm(p, z, tokens):
        return nnx.merge(lrm_g, p).score(z, tokens)

    return decoded_reward(decode, expert_image), lrm


@functools.cache
def _student_step(kind: str, graphdef, teacher_g, lcd: tuple, optim: tuple, rg: tuple):
    """``(train_step, optimizer)`` of one student kind ("lcd", "rg", "rg_lrm") and LCD
    setting
    ``lcd = (skip, w_min, w_max, distance, huber_c, boundary, w_embed_dim)``; ``optim = (lr,
    steps, warmup, ema)``; ``rg = (ae_graphdef, sf, expert_g, lrm_g, rm_batch, lrm_lr,
    mode, temperature, lrm_beta)``. Cached: every seed and beta of a kind shares one compile
    (beta is a batch column)."""
    skip, w_min, w_max, distance, huber_c, boundary, dim = lcd
    opts = dict(skip=skip, w_min=w_min, w_max=w_max, distance=distance, huber_c=huber_c,
                boundary=boundary)
    make_student, make_teacher = _make_student(graphdef, dim), _make_teacher(teacher_g)
    lr, steps, warmup, ema = optim
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(warmup, steps - 1))
    ae_g, sf, expert_g, lrm_g, rm_batch, lrm_lr, mode, temp, lrm_beta = rg
    expert, lrm = _reward_fns(ae_g, sf, expert_g, lrm_g)
    if kind == "lcd":
        inner_lcd = lcd_loss(make_student, make_teacher, **opts)

        def inner(params, batch, key, teacher_params, reward_params, *, target_params):
            del reward_params  # the same step signature as the rewarded kinds
            return inner_lcd(params, batch, key, teacher_params, target_params=target_params)
    elif kind == "rg":
        inner = rg_lcd_loss(make_student, make_teacher, expert, **opts)
    else:
        inner = rg_lcd_lrm_loss(make_student, make_teacher, lrm, expert, beta=lrm_beta,
                                rm_batch_size=rm_batch, lrm_temperature=temp,
                                expert_temperature=temp, mode=mode, **opts)
        lrm_opt = make_optimizer(lrm_lr, total_steps=steps, warmup_steps=0)
        opt = optax.multi_transform(
            {"student": opt, "lrm": lrm_opt},
            lambda p: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in p.items()})

    def loss(params, batch, key, teacher_params, reward_params, *, target_params):
        b = {**_with_null(batch, teacher_params), "reward_cond": batch["tokens"]}
        return inner(params, b, key, teacher_params, reward_params,
                     target_params=target_params)
    return make_train_step(loss, opt, ema_decay=ema, target_from_ema=True), opt


@dataclasses.dataclass
class Nets:
    ae: Autoencoder
    teacher: Teacher
    expert: tuple            # (graphdef, params): the pixel CLIP (the reward)
    latent_clip: tuple       # (graphdef, params): the LRM's pretrained latent CLIP
    judge_clip: tuple        # (graphdef, params): never optimized
    judge: object            # the zoo's judge classifier
    latents: np.ndarray      # scaled train latents, one per train image
    rows: dict               # the captioned train rows (tokens, image_index, ...)
    contexts: dict           # the frozen text encoder's features of those captions
    expert_temperature: float
    student_graphdef: nnx.GraphDef
    student_init: object
    seconds: dict


def lcd_setting(config, **override) -> tuple:
    d = {**config.lcd.to_dict(), **override}
    return (int(d["skip"]), float(d["w_min"]), float(d["w_max"]), str(d["distance"]),
            float(d["huber_c"]), bool(d["boundary"]), int(d["w_embed_dim"]))


def train_student(config, n: Nets, kind: str, seed: int, workdir: str, *, beta: float = 0.0,
                  progress=True, label="", **override):
    """One LCD / RG-LCD student (resumable). Returns the target network's parameters (the EMA
    with decay mu: LCM's ``theta-``, which is what is sampled)."""
    d = config.lcd
    ema = float(override.pop("ema_decay", d.ema_decay))
    setting = lcd_setting(config, **override)
    r = config.rg
    rg = (n.ae.graphdef, float(n.ae.scale_factor), n.expert[0], n.latent_clip[0],
          int(r.rm_batch_size), float(r.lrm_learning_rate), str(r.mode),
          float(n.expert_temperature), float(r.lrm_beta))
    step, opt = _student_step(kind, n.student_graphdef,
                              n.teacher.unet_graphdef, setting,
                              (float(d.learning_rate), int(d.steps), int(d.warmup_steps), ema),
                              rg)
    rows = n.rows
    data = {"x": n.latents[rows["image_index"]], "tokens": rows["tokens"],
            "context": n.contexts["context"], "context_mask": n.contexts["context_mask"]}
    if kind == "rg":
        data["beta"] = np.full(len(data["x"]), beta, np.float32)
    params = jax.tree.map(jnp.array, n.student_init)
    if kind == "rg_lrm":
        params = {"student": params, "lrm": jax.tree.map(jnp.array, n.latent_clip[1])}
    teacher_params = {"unet": n.teacher.params["unet"], "null": n.teacher.null}
    extra = (teacher_params, (n.ae.params, n.expert[1]))
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(seed)),
                   BatchIterator(data, d.batch_size, seed=seed), workdir, steps=d.steps,
                   ckpt_config={"kind": kind, "lcd": list(setting), "ema": ema, "beta": beta,
                                "seed": seed, "optim": d.to_dict(),
                                # only what this kind reads: adding a beta to config.rg.betas
                                # leaves every trained student restorable
                                "lrm": ({k: r[k] for k in ("lrm_beta", "rm_batch_size",
                                                           "lrm_learning_rate", "mode",
                                                           "temperature")}
                                        if kind == "rg_lrm" else None)},
                   ckpt_every=d.steps, extra=extra, fast_compile=config.fast_compile,
                   progress=progress, label=label or kind)
    out = jax.device_get(state.ema_params)
    return out["student"] if kind == "rg_lrm" else out


def train_networks(config, data: Data, workdir: str, *, log=print, progress=True) -> Nets:
    """The autoencoder, the three contrastive models, the teacher and the judge classifier
    (each resumable and cached in ``workdir``)."""
    fast = bool(config.fast_compile)
    t0 = time.perf_counter()
    _, judge = judges(data.train_images, config.zoo_root, data.test_images,
                      steps=config.judge_steps)
    t1 = time.perf_counter()
    ae = train_autoencoder(config, data.train_images["x"], os.path.join(workdir, "autoencoder"),
                           progress=progress)
    latents = ae.encode(data.train_images["x"])
    t2 = time.perf_counter()
    expert = train_clip(config, data, data.train["x"], data.train, 0,
                        os.path.join(workdir, "clip_expert"), progress=progress,
                        label="expert clip")
    judge_clip = train_clip(config, data, data.test["x"], data.test, 1,
                            os.path.join(workdir, "clip_judge"), progress=progress,
                            label="judge clip")
    latent_clip = train_clip(config, data, latents[data.train["image_index"]], data.train, 2,
                             os.path.join(workdir, "clip_latent"), progress=progress,
                             label="latent clip")
    t3 = time.perf_counter()
    teacher = train_teacher(config, data, latents, os.path.join(workdir, "teacher"),
                            progress=progress)
    t4 = time.perf_counter()
    contexts = encode_prompts(teacher, data.train["tokens"], fast)
    sg, sp = student_init(config, teacher, latents.shape[1:])
    temp = float(config.rg.temperature) or float(jax.device_get(
        nnx.merge(expert[0], expert[1]).logit_scale()))
    secs = {"judge": t1 - t0, "autoencoder": t2 - t1, "clips": t3 - t2, "teacher": t4 - t3}
    log("networks: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))
    return Nets(ae, teacher, expert, latent_clip, judge_clip, judge, latents, data.train,
                contexts, temp, sg, sp, secs)


# ----------------------------------------------------------------------------------------------
# Sampling and grading
# ----------------------------------------------------------------------------------------------


@functools.cache
def _teacher_sampler(graphdef, steps: int, fast: bool):
    """Guided DDIM (eta 0, ``trailing`` timesteps 999, ...; one step = 999 -> 0): two network
    evaluations per step."""
    ts = trailing(steps, SCHEDULE)

    def run(params, ctx, mask, null_ctx, null_mask, w, noise):
        den = unet_denoiser(graphdef, params, {"context": ctx, "context_mask": mask})
        guided = dpm.classifier_free_guidance(den, 1.0 + w, {"context": null_ctx,
                                                             "context_mask": null_mask})
        return ddim(guided, noise, ts)

    return jit(run, fast)


@functools.cache
def _lcm_sampler(graphdef, steps: int, skip: int, boundary: bool, dim: int, fast: bool):
    ts = lcm_grid(steps, SCHEDULE, skip)

    def run(params, ctx, mask, w, noise, row):
        den = unet_denoiser(graphdef, params, {"context": ctx, "context_mask": mask,
                                               "vector": guidance_embedding(w, dim)})
        return lcm(den, noise, ts, key=jax.random.key(row[0]), boundary=boundary)

    return jit(run, fast)


def generate(config, n: Nets, prompts_ctx: dict, model, steps: int, w: float, seed: int, *,
             skip=None, boundary=None) -> np.ndarray:
    """Decoded images (clipped to [-1, 1]) for every prompt: ``model`` "teacher" (guided DDIM)
    or a student's parameters (LCM sampling); the start noise is the seed's."""
    fast = bool(config.fast_compile)
    N = len(prompts_ctx["context"])
    shape = (N, *n.latents.shape[1:])
    noise = np.random.default_rng(10_000 + seed).standard_normal(shape).astype(np.float32)
    ws = np.full((N,), w, np.float32)
    ctx, mask = prompts_ctx["context"], prompts_ctx["context_mask"]
    if isinstance(model, str):
        run = _teacher_sampler(n.teacher.unet_graphdef, int(steps), fast)
        null = {k: np.repeat(v, N, 0) for k, v in n.teacher.null.items()}
        z = batched(lambda a, b, c, d, e, f: run(n.teacher.params["unet"], a, b, c, d, e, f),
                     ctx, mask, null["context"], null["context_mask"], ws, noise)
    else:
        d = config.lcd
        run = _lcm_sampler(n.student_graphdef, int(steps),
                           int(d.skip if skip is None else skip),
                           bool(d.boundary if boundary is None else boundary),
                           int(d.w_embed_dim), fast)
        rows = np.arange(N, dtype=np.int32) + 1_000_000 * (seed + 1)
        z = batched(lambda a, b, c, e, f: run(model, a, b, c, e, f), ctx, mask, ws, noise, rows)
    return n.ae.decode(z)


def grade(config, n: Nets, data: Data, images: np.ndarray) -> dict:
    """The report metrics of images generated for the evaluation prompts."""
    fast = bool(config.fast_compile)
    tokens = data.prompts["tokens"]
    m = evaluate(images, data.prompts["y"], n.judge, data.test_images,
                 kid_subsets=config.kid_subsets)
    return {"judge_clip": float(np.mean(clip_scores(n.judge_clip, images, tokens, fast))),
            "accuracy": m["accuracy"], "kid": m["kid"], "precision": m["precision"],
            "recall": m["recall"], "hfer": m["hfer"],
            "expert_reward": float(np.mean(clip_scores(n.expert, images, tokens, fast)))}


def real_floor(config, n: Nets, data: Data) -> dict:
    """The same metrics for real *train* images of the prompts' digits, scored against their
    own captions (the real-vs-real floor at the same n)."""
    fast = bool(config.fast_compile)
    y = data.prompts["y"]
    m = floor(data.train_images, data.test_images, n.judge, len(y), labels=y,
              kid_subsets=config.kid_subsets)
    # the real images' own first captions (same digits; the floor's draw is by label)
    rng = np.random.default_rng(0)
    rows = np.array([rng.choice(np.flatnonzero(data.train["y"] == k)) for k in y])
    x, tok = data.train["x"][rows], data.train["tokens"][rows]
    return {"judge_clip": float(np.mean(clip_scores(n.judge_clip, x, tok, fast))),
            "accuracy": m["accuracy"], "kid": m["kid"], "precision": m["precision"],
            "recall": m["recall"], "hfer": m["hfer"],
            "expert_reward": float(np.mean(clip_scores(n.expert, x, tok, fast)))}


# ----------------------------------------------------------------------------------------------
# The experiment
# ----------------------------------------------------------------------------------------------


def student_specs(config) -> dict:
    """``{row name: (kind, beta)}`` of the main table's students."""
    specs = {"LCM": ("lcd", 0.0)}
    for b in as_tuple(config.rg.betas):
        specs[f"RG-LCM direct, beta={b:g}"] = ("rg", float(b))
    specs[f"RG-LCM with LRM, beta={config.rg.lrm_beta:g}"] = ("rg_lrm",
                                                              float(config.rg.lrm_beta))
    return specs


def ablation_specs(config) -> dict:
    """``{row name: overrides of config.lcd}``: one change each from the LCM row."""
    ab, d = config.ablations, config.lcd
    out = {}
    if not ab.enabled:
        return out
    for k in as_tuple(ab.skip):
        if k != d.skip:
            out[f"k = {k}"] = {"skip": int(k)}
    for m in as_tuple(ab.ema_decay):
        if m != d.ema_decay:
            out[f"EMA mu = {m:g}"] = {"ema_decay": float(m)}
    for b in as_tuple(ab.boundary):
        if bool(b) != bool(d.boundary):
            out[f"boundary {'on' if b else 'off'} (f = x0_hat)"] = {"boundary": bool(b)}
    for dist in as_tuple(ab.distance):
        if dist != d.distance:
            out[f"distance {dist}"] = {"distance": str(dist)}
    return out


def _student_dir(workdir, name, seed):
    safe = "".join(ch if ch.isalnum() or ch in "=.-" else "_" for ch in name)
    return os.path.join(workdir, "students", f"{safe}_seed{seed}")


def run_all(config, data: Data, n: Nets, workdir: str, *, log=print, progress=True) -> dict:
    seeds = as_tuple(config.seeds)
    fast = bool(config.fast_compile)
    s = config.sample
    ctx = encode_prompts(n.teacher, data.prompts["tokens"], fast)
    w = float(s.w)
    students, t_students = {}, {}
    for name, (kind, beta) in student_specs(config).items():
        t0 = time.perf_counter()
        for seed in seeds:
            students[name, seed] = train_student(config, n, kind, seed,
                                                 _student_dir(workdir, name, seed), beta=beta,
                                                 progress=progress, label=f"{name}, seed {seed}")
        t_students[name] = time.perf_counter() - t0
        log(f"trained {name} ({t_students[name]:.0f} s)")

    def cell(key, fn):
        return _io.cached(workdir, {"cell": key, "w": w, "n": len(data.prompts["y"])}, fn)

    quality = {"real train images (floor)": over_seeds(
        lambda seed: cell(["floor"], lambda: real_floor(config, n, data)), seeds[:1])}
    shown = {}
    t0 = time.perf_counter()
    for steps in as_tuple(s.teacher_steps):
        def one(seed, steps=steps):
            def fn():
                x = generate(config, n, ctx, "teacher", steps, w, seed)
                if seed == seeds[0]:
                    shown[f"teacher {steps}"] = x[: int(s.figure_prompts)]
                return {"nfe": 2 * steps, **grade(config, n, data, x)}
            return cell(["teacher", steps, seed], fn)
        quality[f"teacher, guided DDIM, {steps} steps"] = over_seeds(one, seeds)
    for name in student_specs(config):
        for steps in as_tuple(s.student_steps):
            def one(seed, steps=steps, name=name):
                def fn():
                    x = generate(config, n, ctx, students[name, seed], steps, w, seed)
                    if seed == seeds[0]:
                        shown[f"{name} {steps}"] = x[: int(s.figure_prompts)]
                    return {"nfe": steps, **grade(config, n, data, x)}
                return cell([name, steps, seed], fn)
            quality[f"{name}, {steps} steps"] = over_seeds(one, seeds)
    log(f"graded the main table ({time.perf_counter() - t0:.0f} s)")

    # inference w sweep: the student's w input vs the teacher's guidance scale 1 + w
    sweep = {}
    for wv in as_tuple(s.w_sweep):
        for label, model, steps in (
                (f"teacher, {s.sweep_teacher_steps} steps", "teacher", s.sweep_teacher_steps),
                (f"LCM, {s.sweep_steps} steps", "LCM", s.sweep_steps)):
            def one(seed, wv=wv, model=model, steps=steps, label=label):
                def fn():
                    m = model if model == "teacher" else students["LCM", seed]
                    return grade(config, n, data, generate(config, n, ctx, m, steps, wv, seed))
                return _io.cached(workdir, {"sweep": [label, float(wv), seed]}, fn)
            sweep.setdefault(label, {})[f"{wv:g}"] = over_seeds(one, seeds)

    # ablations: one change each from LCM, graded at `ablations.steps` LCM steps
    ablations = {}
    if config.ablations.enabled and config.ablations.steps in as_tuple(s.student_steps):
        d = config.lcd
        base = f"LCM (k = {d.skip}, mu = {d.ema_decay:g}, boundary, {d.distance})"
        ablations[base] = quality[f"LCM, {config.ablations.steps} steps"]
    t0 = time.perf_counter()
    for name, over in ablation_specs(config).items():
        def one(seed, name=name, over=over):
            def fn():
                params = train_student(config, n, "lcd", seed,
                                       _student_dir(workdir, "ablation " + name, seed),
                                       progress=progress, label=f"ablation {name}, seed {seed}",
                                       **over)
                x = generate(config, n, ctx, params, config.ablations.steps, w, seed,
                             skip=over.get("skip"), boundary=over.get("boundary"))
                return grade(config, n, data, x)
            return _io.cached(workdir, {"ablation": name, "seed": seed,
                                        "steps": config.ablations.steps}, fn)
        ablations[name] = over_seeds(one, seeds)
    log(f"ablations ({time.perf_counter() - t0:.0f} s)")
    return {"quality": quality, "sweep": sweep, "ablations": ablations,
            "student_seconds": t_students, "shown": shown}


COLUMNS = [("nfe", "NFE"), ("judge_clip", "judge CLIP"), ("accuracy", "adherence"),
           ("kid", "KID"), ("hfer", "HFER"), ("precision", "precision"), ("recall", "recall"),
           ("expert_reward", "expert reward")]


def _paired(a: dict, b: dict, metric: str) -> tuple[float, float]:
    d = np.asarray(a[metric]["values"]) - np.asarray(b[metric]["values"])
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def _call(mean: float, sd: float, higher_is_better=True) -> str:
    if abs(mean) <= sd:
        return "tie (within 1 sd)"
    return "better" if (mean > 0) == higher_is_better else "worse"


def verdict(config, report) -> list[str]:
    """The papers' claims, checked on paired seed differences (beyond +-1 sd)."""
    q = report["quality"]
    big = max(as_tuple(config.sample.teacher_steps))
    t50 = q[f"teacher, guided DDIM, {big} steps"]
    out = []

    def cmp(a_name, b_name, metric, higher=True):
        m, sd = _paired(q[a_name], q[b_name], metric)
        return f"{metric} {m:+.4f} +- {sd:.4f} ({_call(m, sd, higher)})"

    for steps in (2, 4):
        if steps in as_tuple(config.sample.student_steps):
            a = f"LCM, {steps} steps"
            out.append(f"LCM {steps} steps vs teacher {big} steps: "
                       + "; ".join(cmp(a, f"teacher, guided DDIM, {big} steps", mt, hi)
                                   for mt, hi in (("judge_clip", True), ("accuracy", True),
                                                  ("kid", False))))
            if steps in as_tuple(config.sample.teacher_steps):
                out.append(f"LCM vs teacher, both {steps} steps: "
                           + "; ".join(cmp(a, f"teacher, guided DDIM, {steps} steps", mt, hi)
                                       for mt, hi in (("judge_clip", True), ("accuracy", True),
                                                      ("kid", False))))
    s2 = 2 if 2 in as_tuple(config.sample.student_steps) else min(config.sample.student_steps)
    lcm2 = f"LCM, {s2} steps"
    for name in student_specs(config):
        if name == "LCM":
            continue
        row = f"{name}, {s2} steps"
        out.append(f"{name} vs LCM at {s2} steps: "
                   + "; ".join(cmp(row, lcm2, mt, hi) for mt, hi in (
                       ("expert_reward", True), ("judge_clip", True), ("accuracy", True),
                       ("hfer", False), ("kid", False))))
    best = max((n for n in student_specs(config)),
               key=lambda n: q[f"{n}, {s2} steps"]["judge_clip"]["mean"])
    m, sd = _paired(q[f"{best}, {s2} steps"], t50, "judge_clip")
    out.append(f"best student by judge CLIP at {s2} steps ({best}) vs teacher {big} steps: "
               f"judge CLIP {m:+.4f} +- {sd:.4f} ({_call(m, sd)}); HFER "
               f"{q[f'{best}, {s2} steps']['hfer']['mean']:.3f} vs {t50['hfer']['mean']:.3f}")
    return out


def tables(config, report) -> str:
    parts = [f"### Quality on {len(report['prompts'])} held-out prompts (mean +- sd over "
             f"seeds; w = {config.sample.w:g}, guidance scale 1 + w)", "",
             markdown_table(report["quality"], COLUMNS, row_header="sampler", digits=3), ""]
    for label, rows in report["sweep"].items():
        parts += [f"### Inference w sweep: {label}", "",
                  markdown_table(rows, COLUMNS[1:], row_header="w", digits=3), ""]
    if report["ablations"]:
        parts += [f"### LCD ablations ({config.ablations.steps} LCM steps)", "",
                  markdown_table(report["ablations"], COLUMNS[1:], row_header="student",
                                 digits=3), ""]
    return "\n".join(parts)


def _figure(path, config, shown: dict) -> str:
    s2 = 2 if 2 in as_tuple(config.sample.student_steps) else min(config.sample.student_steps)
    big = max(as_tuple(config.sample.teacher_steps))
    keys = [f"teacher {big}", f"teacher {s2}"] + [f"{n} {s2}" for n in student_specs(config)]
    keys = [k for k in keys if k in shown]
    k = min(len(shown[key]) for key in keys)
    _io.save_image_grid(path, np.concatenate([shown[key][:k] for key in keys]), ncol=k)
    return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True,
                       log=print) -> dict:
    """Validates ``config``, trains (or restores) every network, grades every sampler and
    writes the report to ``workdir``."""
    check_config(config)
    t0 = time.perf_counter()
    data = load_data(config)
    n = train_networks(config, data, workdir, log=log, progress=progress)
    fast = bool(config.fast_compile)
    sanity = {
        "autoencoder_psnr_test": float(np.mean(dpm.metrics.psnr(
            jnp.asarray(n.ae.decode(n.ae.encode(data.test_images["x"]))),
            jnp.asarray(data.test_images["x"]), 2.0))),
        "expert_digit_retrieval_test": digit_retrieval(n.expert, data, data.test_images["x"],
                                                       data.test_images["y"], fast),
        "judge_clip_digit_retrieval_train": digit_retrieval(
            n.judge_clip, data, data.train_images["x"], data.train_images["y"], fast),
        "judge_classifier_accuracy_train": n.judge.held_out_accuracy,
        "novel_prompt_fraction": data.novel_fraction,
    }
    log("sanity: " + ", ".join(f"{k} {v:.3f}" for k, v in sanity.items()))
    res = run_all(config, data, n, workdir, log=log, progress=progress)
    shown = res.pop("shown")
    report = {**res, "sanity": sanity, "prompts": data.prompts["captions"],
              "networks_seconds": n.seconds, "config": config.to_dict()}
    report["verdict"] = verdict(config, report)
    figures = []
    if shown:
        figures.append(_figure(os.path.join(workdir, "samples.png"), config, shown))
    big = max(as_tuple(config.sample.teacher_steps))
    curves = {name: [report["quality"][f"{name}, {st} steps"]["judge_clip"]
                     for st in as_tuple(config.sample.student_steps)]
              for name in student_specs(config)}
    t_big = report["quality"][f"teacher, guided DDIM, {big} steps"]["judge_clip"]["mean"]
    figures.append(plot_curves(os.path.join(workdir, "judge_vs_steps.png"),
                               list(as_tuple(config.sample.student_steps)), curves,
                               xlabel="sampling steps", ylabel="judge CLIP score",
                               title=f"students vs steps (teacher, {big} steps: {t_big:.3f})"))
    report["seconds"] = time.perf_counter() - t0
    s2 = 2 if 2 in as_tuple(config.sample.student_steps) else min(config.sample.student_steps)
    rows = [f"teacher {big} steps", f"teacher {s2} steps",
            *[f"{name}, {s2} steps" for name in student_specs(config)]]
    notes = ["samples.png, top to bottom (the first prompts, seed "
             f"{as_tuple(config.seeds)[0]}): " + "; ".join(rows) + ".", "",
             "## Verdict", "", *[f"- {v}" for v in report["verdict"]], "",
             "## Sanity", "", *[f"- {k}: {v:.3f}" for k, v in sanity.items()], "",
             f"Run time: {report['seconds']:.0f} s. Command: `python -m experiments.rg_lcd "
             f"--workdir {workdir}`."]
    write_report(workdir, "report", tables(config, report), report, figures=figures,
                 judge=judge_description(n.judge, config.judge_steps)
                 + " The judge CLIP (nets.ContrastiveModel, seed 1) is trained on the test "
                 "split's images and captions and is never optimized; the expert CLIP (seed 0, "
                 "train split) is the reward. All are in-project proxies.",
                 title="RG-LCD / LCD in miniature", notes="\n".join(notes))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    return run_experiment(argv, "experiments.rg_lcd", __doc__.splitlines()[0],
                          train_and_evaluate, validate=check_config)


if __name__ == "__main__":
    main(sys.argv[1:])
