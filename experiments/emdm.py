"""EMDM (Zhou, Dou, Cao et al., ECCV 2024: "EMDM: Efficient Motion Diffusion Model for Fast and
High-Quality Motion Generation") in miniature, with the MDM baseline (Tevet et al., ICLR 2023),
on procedural skeleton motion.

    python -m experiments.emdm --workdir runs/emdm
    python -m experiments.emdm generate "a person walks forward" --workdir runs/emdm --out walk.npy

Every part is built here, nothing downloaded:

* **Motion** (:mod:`dpm.data.motion`): a 16-joint skeleton, twelve action families with
  parametric joint-angle curves and root motion, 20 fps, features in the HumanML3D recipe
  (191 dims: root yaw velocity, root x-z velocity, height, root-relative positions, 6-D
  rotations, local velocities, foot contacts), z-normalised, with frame masks. Captions from a
  grammar with synonyms; "a person waves a hand" is deliberately multimodal (left or right).
  Three disjoint sets: *train* (generators and the CLIP-role text model), *eval* (the
  evaluator) and *test* (the captions to generate and the real reference).
* **Text**: two contrastive text-motion models (:class:`nets.TextEncoder` +
  :class:`nets.MotionEncoder`): the *CLIP role* (train set; its frozen text embedding is the
  generators' condition) and the *evaluator* (the Guo et al. role: eval set, another seed; used
  only to grade).
* **MDM** (:class:`nets.MotionTransformer`, one token ``t + cond``): x0 prediction, cosine
  schedule, T = 1000, sampled by DDPM at 1000 and 100 steps and by DDIM at 10.
* **EMDM** (the same transformer with separate condition and latent-z tokens): the DDGAN VP
  discretisation with T = 10 (and 4), a conditional MLP discriminator on ``(x_{t-1}, x_t, t,
  cond)``, softplus GAN losses with lazy R1 (gamma 0.02 every 15 steps: two compiled steps),
  ``100 L_rec``, Adam(0.5, 0.9), EMA; sampled with :func:`solvers.ddgan`, CFG with the same z.
* **EMDM-noGAN**: the same 10-step model trained with ``L_rec`` only (the control for "the GAN
  is what makes large steps work").
* **a2m variant**: action-conditioned EMDM on the rot6d layout with the FK geometric losses,
  with and without the foot-contact term.

Every t2m model of a seed trains for the same measured wall-clock time (equal training compute).
Graded with the held-out evaluator: R-precision top-1/3 among 32, FID and KID in its motion
features, MM-Dist, diversity, multimodality; physics after recovering joints (foot skate, bone
length variance); the measured time per sample on this CPU; the mode test on the wave prompt.
All metrics are in-project proxies. Writes ``<workdir>/report.{md,json}`` and PNGs; the
committed copy lives in ``experiments/results/emdm/``.
"""

from __future__ import annotations

import argparse
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
from jax.tree_util import Partial

import dpm
import nets
import solvers
from dpm.data import (
    ACTIONS,
    BatchIterator,
    CaptionVocab,
    default_skeleton,
    motion_dataset,
    motion_stats,
    recover_joints,
    rot6d_layout_joints,
)
from dpm.losses import ddgan_d_loss, ddgan_g_loss, geometric_loss
from dpm.metrics import (
    bone_length_variance,
    diversity,
    foot_skate_ratio,
    frechet_distance_from_features,
    kid,
    mm_dist,
    multimodality,
    r_precision,
)
from dpm.training import (
    flatten_if_uniform,
    gan_optimizers,
    init_gan_state,
    init_train_state,
    make_gan_step,
    make_mesh,
    make_optimizer,
    make_train_step,
    replicate,
    shard_batch,
)
from experiments import _io
from experiments._checks import as_tuple, config_int, config_number, int_values
from experiments._cli import UsageError, run_experiment, user_errors
from experiments._latent import batched, jit
from experiments._report import finished_config, markdown_table, over_seeds, write_report
from experiments._runner import fit, jitted_step

__all__ = ["get_config", "check_config", "train_and_evaluate", "generate", "main"]

T2M = ("mdm", "emdm", "emdm4", "nogan")           # the text-to-motion models of a seed
A2M = ("a2m_foot", "a2m_nofoot")                  # action-to-motion, with / without L_foot
MAX_WORDS = 16


def get_config() -> ml_collections.ConfigDict:
    """The default run: 16-joint motion, 40-60 frames, 3 seeds, sized for <= 30 min on 2 CPUs."""
    c = ml_collections.ConfigDict()
    c.name = "emdm"
    c.seeds = (0, 1, 2)
    c.fast_compile = False
    c.data = ml_collections.ConfigDict(dict(
        n_train=3000, n_eval=1500, n_test=256, min_frames=40, max_frames=60, fps=20, seed=0))
    # both contrastive text-motion models (CLIP role: train set, seed 100; evaluator: eval set,
    # seed 200)
    c.text = ml_collections.ConfigDict(dict(
        width=64, depth=2, heads=4, embed_dim=64, motion_width=64, motion_depth=2, steps=300,
        batch_size=64, learning_rate=2e-3))
    c.model = ml_collections.ConfigDict(dict(
        d_model=96, num_layers=3, num_heads=4, ff_dim=192, dropout=0.1, latent_dim=16,
        cond_dropout=0.1))
    c.disc = ml_collections.ConfigDict(dict(
        kind="mlp", reduce_channels=8, hidden=(256, 256, 128, 128, 64, 32),
        norm_groups=(0, 32, 0, 16, 0, 0), time_dim=32))
    # every t2m model of a seed trains `seconds` of wall-clock time (its step count measured
    # once per workdir and cached); steps > 0: that many steps each instead
    c.train = ml_collections.ConfigDict(dict(
        seconds=60.0, steps=0, batch_size=32, ema_decay=0.999))
    c.mdm = ml_collections.ConfigDict(dict(learning_rate=5e-4, num_steps=1000))
    c.emdm = ml_collections.ConfigDict(dict(
        num_steps=10, alt_steps=4, lr_g=1e-4, lr_d=1.25e-4, r1_gamma=0.02, r1_every=15,
        rec_weight=100.0, adv_weight=1.0))
    c.a2m = ml_collections.ConfigDict(dict(seconds=40.0, steps=0, foot_weight=1.0))
    c.sample = ml_collections.ConfigDict(dict(
        num_eval=128, cfg_scale=2.5, mode_samples=32, mm_prompts=4, mm_repeats=8,
        timing_batch=32, pool=32, figure_frames=6))
    return c


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every setting checked before any work; errors name the key, the value, the choices."""
    d = config.data
    for k in ("n_train", "n_eval"):
        config_int(f"data.{k}", d[k], 64)
    config_int("data.n_test", d.n_test, 8)
    config_int("data.min_frames", d.min_frames, 8)
    config_int("data.max_frames", d.max_frames, d.min_frames)
    config_number("data.fps", d.fps, 0.0, open_low=True)
    config_int("data.seed", d.seed, 0)
    t = config.text
    for k in ("width", "depth", "heads", "embed_dim", "motion_width", "motion_depth", "steps"):
        config_int(f"text.{k}", t[k])
    for sec in ("text", "train"):
        config_int(f"{sec}.batch_size", config[sec].batch_size, 2)
        if config[sec].batch_size % jax.device_count():
            raise ValueError(f"config.{sec}.batch_size must be a multiple of the "
                             f"{jax.device_count()} devices; got {config[sec].batch_size}")
    config_number("text.learning_rate", t.learning_rate, 0.0, open_low=True)
    m = config.model
    for k in ("d_model", "num_layers", "num_heads", "ff_dim", "latent_dim"):
        config_int(f"model.{k}", m[k])
    if m.d_model % m.num_heads:
        raise ValueError(f"config.model.num_heads must divide model.d_model={m.d_model}; "
                         f"got {m.num_heads!r}")
    config_number("model.dropout", m.dropout, 0.0, 0.9)
    config_number("model.cond_dropout", m.cond_dropout, 0.0, 0.9)
    k = config.disc
    if k.kind not in ("mlp", "transformer"):
        raise ValueError(f"config.disc.kind must be 'mlp' or 'transformer'; got {k.kind!r}")
    config_int("disc.reduce_channels", k.reduce_channels)
    int_values("config.disc.hidden", k.hidden, 1)
    groups = int_values("config.disc.norm_groups", k.norm_groups, 0)
    if len(groups) != len(as_tuple(k.hidden)) or any(
            g and h % g for g, h in zip(groups, as_tuple(k.hidden), strict=False)):
        raise ValueError(f"config.disc.norm_groups must have one entry per hidden layer, each 0 "
                         f"or dividing its width {tuple(k.hidden)}; got {k.norm_groups!r}")
    config_int("disc.time_dim", k.time_dim, 2)
    tr = config.train
    config_number("train.seconds", tr.seconds, 0.0, open_low=True)
    config_int("train.steps", tr.steps, 0)
    config_number("train.ema_decay", tr.ema_decay, 0.0, 0.99999)
    config_number("mdm.learning_rate", config.mdm.learning_rate, 0.0, open_low=True)
    config_int("mdm.num_steps", config.mdm.num_steps, 10)
    e = config.emdm
    config_int("emdm.num_steps", e.num_steps, 2)
    config_int("emdm.alt_steps", e.alt_steps, 2)
    for name in ("lr_g", "lr_d"):
        config_number(f"emdm.{name}", e[name], 0.0, open_low=True)
    config_number("emdm.r1_gamma", e.r1_gamma, 0.0)
    config_int("emdm.r1_every", e.r1_every)
    config_number("emdm.rec_weight", e.rec_weight, 0.0, open_low=True)
    config_number("emdm.adv_weight", e.adv_weight, 0.0, open_low=True)
    config_number("a2m.seconds", config.a2m.seconds, 0.0, open_low=True)
    config_int("a2m.steps", config.a2m.steps, 0)
    config_number("a2m.foot_weight", config.a2m.foot_weight, 0.0, open_low=True)
    s = config.sample
    for k in ("num_eval", "mode_samples", "mm_prompts", "mm_repeats", "timing_batch",
              "figure_frames"):
        config_int(f"sample.{k}", s[k])
    config_int("sample.pool", s.pool, 2)
    if s.timing_batch < 3:
        raise ValueError(f"config.sample.timing_batch must be >= 3 (the figure's prompts); got "
                         f"{s.timing_batch}")
    if s.num_eval < s.pool:
        raise ValueError(f"config.sample.num_eval must be >= sample.pool={s.pool}; got "
                         f"{s.num_eval}")
    if s.mm_repeats < 2:
        raise ValueError(f"config.sample.mm_repeats must be >= 2; got {s.mm_repeats}")
    if s.num_eval > d.n_test:
        raise ValueError(f"config.sample.num_eval must be <= data.n_test={d.n_test} (one "
                         f"generation per test caption); got {s.num_eval}")
    config_number("sample.cfg_scale", s.cfg_scale, 0.0)
    int_values("config.seeds", config.seeds, 0)


# ----------------------------------------------------------------------------------------------
# Data: three disjoint procedural sets, normalised features, caption tokens
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train: dict          # generators and the CLIP-role text model
    eval: dict           # the evaluator only
    test: dict           # captions to generate for, the real reference
    stats: object        # MotionStats of the t2m features (train set)
    a2m_stats: object    # MotionStats of the flattened rot6d layout (train set)
    vocab: CaptionVocab
    skeleton: object


def _vocab() -> CaptionVocab:
    from dpm.data import MOTION_WORDS

    return CaptionVocab(words=CaptionVocab.SPECIALS + tuple(sorted(MOTION_WORDS)))


def _prepare(ds: dict, stats, a2m_stats, vocab: CaptionVocab) -> dict:
    m = ds["mask"][..., None]
    n, f = ds["mask"].shape
    rot = ds["rot6d"].reshape(n, f, -1)
    captions = [str(c) for c in ds["caption"]]
    uniq = {c: i for i, c in enumerate(sorted(set(captions)))}
    return {**ds,
            "xn": (dpm.data.normalize(ds["x"], stats) * m).astype(np.float32),
            "rn": (dpm.data.normalize(rot, a2m_stats) * m).astype(np.float32),
            "tokens": np.asarray(vocab.encode(captions, max_len=MAX_WORDS + 2), np.int32),
            "caption_id": np.array([uniq[c] for c in captions], np.int32)}


def load_data(config) -> Data:
    d = config.data
    sk = default_skeleton()
    kw = dict(skeleton=sk, min_frames=int(d.min_frames), max_frames=int(d.max_frames),
              fps=float(d.fps))
    raw = {name: motion_dataset(int(n), seed=int(d.seed) * 3 + i, **kw)
           for i, (name, n) in enumerate((("train", d.n_train), ("eval", d.n_eval),
                                          ("test", d.n_test)))}
    tr = raw["train"]
    n, f = tr["mask"].shape
    stats = motion_stats(tr["x"], tr["mask"])
    a2m_stats = motion_stats(tr["rot6d"].reshape(n, f, -1), tr["mask"])
    vocab = _vocab()
    sets = {k: _prepare(v, stats, a2m_stats, vocab) for k, v in raw.items()}
    return Data(sets["train"], sets["eval"], sets["test"], stats, a2m_stats, vocab, sk)


# ----------------------------------------------------------------------------------------------
# Text-motion models: the CLIP role (condition) and the evaluator (grading only)
# ----------------------------------------------------------------------------------------------

TEXT_MODELS = {"clip": ("train", 100), "evaluator": ("eval", 200)}


def text_config(config, data: Data) -> nets.MotionTextConfig:
    t = config.text
    return nets.MotionTextConfig(
        text=nets.TextEncoderConfig(vocab_size=len(data.vocab.words), max_len=MAX_WORDS + 2,
                                    width=int(t.width), depth=int(t.depth),
                                    num_heads=int(t.heads)),
        motion=nets.MotionEncoderConfig(feature_dim=data.train["x"].shape[-1],
                                        max_frames=int(config.data.max_frames),
                                        width=int(t.motion_width), depth=int(t.motion_depth),
                                        num_heads=int(t.heads), embed_dim=int(t.embed_dim)))


@functools.cache
def _text_step(graphdef, optim: tuple):
    def loss(params, batch, key):
        del key
        net = nnx.merge(graphdef, params)
        m, t, scale = net(batch["x"], batch["mask"], batch["tokens"])
        return dpm.losses.contrastive_logits_loss(scale * m @ t.T, batch["caption_id"])

    lr, steps = optim
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(50, steps - 1))
    return make_train_step(loss, opt, ema_decay=0.0), opt


@dataclasses.dataclass
class TextModels:
    clip: tuple          # (graphdef, params)
    evaluator: tuple
    seconds: float


def train_text_models(config, data: Data, workdir: str, *, progress=True) -> TextModels:
    t = config.text
    cfg = text_config(config, data)
    out, t0 = {}, time.perf_counter()
    for name, (split, seed) in TEXT_MODELS.items():
        ds = getattr(data, split)
        graphdef, params = nets.init_params(nets.MotionTextModel, cfg, seed=seed)
        step, opt = _text_step(graphdef, (float(t.learning_rate), int(t.steps)))
        batch = {k: ds[k] for k in ("mask", "tokens", "caption_id")}
        batch["x"] = ds["xn"]
        state, _ = fit(step, init_train_state(params, opt, jax.random.key(seed)),
                       BatchIterator(batch, int(t.batch_size), seed=seed),
                       os.path.join(workdir, f"text_{name}"), steps=int(t.steps),
                       ckpt_config={"text": t.to_dict(), "data": config.data.to_dict(),
                                    "name": name},
                       ckpt_every=int(t.steps), fast_compile=config.fast_compile,
                       progress=progress, label=f"text model ({name})")
        out[name] = (graphdef, jax.device_get(state.params))
    return TextModels(out["clip"], out["evaluator"], time.perf_counter() - t0)


@functools.cache
def _text_fns(graphdef, fast: bool):
    def text(params, tokens):
        return nnx.merge(graphdef, params).embed_text(tokens)

    def motion(params, x, mask):
        net = nnx.merge(graphdef, params)
        return net.embed_motion(x, mask), net.motion_features(x, mask)

    return jit(text, fast), jit(motion, fast)


def embed_text(model: tuple, tokens: np.ndarray, fast: bool) -> np.ndarray:
    fn = _text_fns(model[0], fast)[0]
    return batched(lambda a: fn(model[1], a), tokens, size=256)


def embed_motion(model: tuple, x: np.ndarray, mask: np.ndarray, fast: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The evaluator's (unit-norm embedding, pooled features) of normalised motions."""
    fn = _text_fns(model[0], fast)[1]
    out = batched(lambda a, b: jnp.concatenate(fn(model[1], a, b), axis=-1), x, mask, size=256)
    e = out.shape[1] // 2  # both are embed_dim wide
    return out[:, :e], out[:, e:]


# ----------------------------------------------------------------------------------------------
# Generators and discriminators
# ----------------------------------------------------------------------------------------------


@functools.cache
def mdm_schedule(num_steps: int) -> dpm.DiscreteVP:
    """MDM's cosine schedule (x0 prediction, T steps)."""
    return dpm.DiscreteVP.from_name("cosine", num_steps)


@functools.cache
def ddgan_schedule(num_steps: int) -> dpm.DiscreteVP:
    """The DDGAN VP discretisation with T = ``num_steps`` (beta 0.1 .. 20, eps 1e-3)."""
    return dpm.ddgan_schedule(num_steps)


def variant_steps(config, variant: str) -> int:
    """The diffusion length T a variant is trained on."""
    e = config.emdm
    return {"mdm": int(config.mdm.num_steps), "emdm4": int(e.alt_steps)}.get(
        variant, int(e.num_steps))


def variant_schedule(config, variant: str) -> dpm.DiscreteVP:
    T = variant_steps(config, variant)
    return mdm_schedule(T) if variant == "mdm" else ddgan_schedule(T)


def generator_config(config, variant: str, data: Data) -> nets.MotionTransformerConfig:
    m = config.model
    a2m = variant in A2M
    common = dict(
        feature_dim=int(data.train["rn" if a2m else "xn"].shape[-1]),
        max_frames=int(config.data.max_frames), d_model=int(m.d_model),
        num_layers=int(m.num_layers), num_heads=int(m.num_heads), ff_dim=int(m.ff_dim),
        dropout=0.0)
    cond = (dict(cond="action", num_actions=len(ACTIONS)) if a2m
            else dict(cond="text", cond_dim=int(config.text.embed_dim)))
    if variant == "mdm":  # MDM: one token t + cond, GELU, no latent
        return nets.motion_small(**common, **cond, activation="gelu", latent_dim=0,
                                 separate_cond_token=False)
    return nets.motion_small(**common, **cond, activation="selu",
                             latent_dim=int(m.latent_dim), separate_cond_token=True)


def discriminator_config(config, variant: str, data: Data) -> nets.MotionDiscriminatorConfig:
    k = config.disc
    a2m = variant in A2M
    cond = (dict(cond="action", num_actions=len(ACTIONS)) if a2m
            else dict(cond="text", cond_dim=int(config.text.embed_dim)))
    return nets.MotionDiscriminatorConfig(
        feature_dim=int(data.train["rn" if a2m else "xn"].shape[-1]),
        max_frames=int(config.data.max_frames), time_dim=int(k.time_dim), kind=k.kind,
        hidden=tuple(int(h) for h in as_tuple(k.hidden)),
        norm_groups=tuple(int(g) for g in as_tuple(k.norm_groups)),
        reduce_channels=int(k.reduce_channels), **cond)


def _gen_net(graphdef, params, x, noise_level, cond):
    """A generator as a Denoiser's backbone: ``cond = {"c", "mask", "z"?, "drop"?}``."""
    net = nnx.merge(graphdef, params)
    return net(x, noise_level, cond["c"], mask=cond["mask"], z=cond.get("z"),
               cond_drop=cond.get("drop"))


def generator_denoiser(graphdef, params, schedule, cond) -> dpm.Denoiser:
    return dpm.network_denoiser(Partial(_gen_net, graphdef, params), schedule, "x0",
                                cond=cond)


def guided(den: dpm.Denoiser, scale, null_c) -> dpm.Denoiser:
    """CFG with the same z and mask: only the condition array is swapped for the null one."""
    return dpm.classifier_free_guidance(den, scale, {**den.cond, "c": null_c})


# ----------------------------------------------------------------------------------------------
# Sampling: MDM by DDPM (1000, 100) and DDIM (10); EMDM and noGAN by the DDGAN sampler
# ----------------------------------------------------------------------------------------------

# method -> (trained variant, sampler, steps; None: the variant's T)
METHODS = {
    "MDM@1000": ("mdm", "ddpm", None),
    "MDM@100": ("mdm", "ddpm", 100),
    "MDM-DDIM@10": ("mdm", "ddim", 10),
    "EMDM@10": ("emdm", "ddgan", None),
    "EMDM@4": ("emdm4", "ddgan", None),
    "EMDM-noGAN@10": ("nogan", "ddgan", None),
}


SLOW = ("MDM@1000",)  # graded on the test captions only: no multimodality or mode test


def method_steps(config, method: str) -> int:
    """Sampling steps of a method (a strided MDM grid is capped at MDM's T)."""
    variant, _, steps = METHODS[method]
    T = variant_steps(config, variant)
    return T if steps is None else min(int(steps), T)


@functools.cache
def _sampler(graphdef, variant: str, kind: str, steps: int, T: int, latent: int, fast: bool):
    """Jitted ``run(params, c, null_c, mask, scale, x_T, key) -> x0`` (normalised, zero on
    padded frames). ``null_c`` None: no guidance (the a2m models)."""
    sched = mdm_schedule(T) if variant == "mdm" else ddgan_schedule(T)
    ts = solvers.grids.trailing(steps, sched)

    def run(params, c, null_c, mask, scale, x_T, key):
        def den_of(z=None):
            cond = {"c": c, "mask": mask} if z is None else {"c": c, "mask": mask, "z": z}
            den = generator_denoiser(graphdef, params, sched, cond)
            return den if null_c is None else guided(den, scale, null_c)

        if kind == "ddgan":
            x = solvers.ddgan(den_of, x_T, ts, key=key, latent_shape=(latent,))
        elif kind == "ddpm":
            x = solvers.ddpm(den_of(), x_T, ts, key=key, variance="fixed_small")
        else:
            x = solvers.ddim(den_of(), x_T, ts)
        return x * mask[..., None]

    return jit(run, fast)


def sample(config, graphdef, params, variant: str, kind: str, steps: int, c, mask, dim: int,
           *, seed: int, guide: bool = True, size: int = 128) -> np.ndarray:
    """Generations (normalised features, (N, F, dim)) for conditions ``c`` and frame masks, in
    chunks of ``size`` (one compiled shape)."""
    T = variant_steps(config, variant)
    run = _sampler(graphdef, variant, kind, int(steps), T, int(config.model.latent_dim),
                   bool(config.fast_compile))
    rng = np.random.default_rng(50_000 + seed)
    x_T = rng.standard_normal((len(mask), mask.shape[1], dim)).astype(np.float32)
    seeds = np.arange(len(mask), dtype=np.uint32) + np.uint32(100_000 * seed)
    scale = np.float32(config.sample.cfg_scale)

    def one(c_, m_, x_, s_):
        key = jax.random.fold_in(jax.random.key(seed), s_[0])
        null = jnp.zeros_like(c_) if guide else None
        return run(params, c_, null, m_, scale, x_, key)

    return batched(one, c, mask, x_T, seeds, size=size)


def timed_sample(config, graphdef, params, variant, kind, steps, c, mask, dim, *, seed,
                 guide=True) -> tuple[np.ndarray, float]:
    """:func:`sample` in chunks of ``sample.timing_batch``, plus the measured seconds per
    sample: the median over the chunks after the first (which compiles)."""
    size = int(config.sample.timing_batch)
    if len(mask) <= size:
        raise ValueError(f"timed_sample needs more than one chunk of {size}; got {len(mask)}")
    n = len(mask)
    pad = -n % size  # every chunk full: one compiled shape
    c = np.concatenate([c, np.repeat(c[-1:], pad, axis=0)])
    mask = np.concatenate([mask, np.repeat(mask[-1:], pad, axis=0)])
    out, times = [], []
    for i in range(0, len(mask), size):
        sl = slice(i, i + size)
        t0 = time.perf_counter()
        out.append(sample(config, graphdef, params, variant, kind, steps, c[sl], mask[sl], dim,
                          seed=seed * 7919 + i, guide=guide, size=size))
        times.append((time.perf_counter() - t0) / size)
    return np.concatenate(out)[:n], float(np.median(times[1:]))


# ----------------------------------------------------------------------------------------------
# Grading: the held-out evaluator, physics after recovering joints, the mode test
# ----------------------------------------------------------------------------------------------


def joints_of(data: Data, xn: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Joint positions (N, F, J, 3) of normalised t2m features (zero on padded frames)."""
    x = dpm.data.denormalize(xn, data.stats)
    j = np.asarray(jax.jit(jax.vmap(lambda f: recover_joints(f, data.skeleton)))(
        jnp.asarray(x)))
    return j * mask[..., None, None]


def physics(config, data: Data, joints: np.ndarray, mask: np.ndarray) -> dict:
    sk = data.skeleton
    skate = foot_skate_ratio(joints, mask, sk.feet, fps=float(config.data.fps))
    return {"foot_skate": float(skate["ratio"]), "skate_speed": float(skate["mean_speed"]),
            "bone_var": float(bone_length_variance(joints, mask, sk.parents))}


def grade(config, data: Data, text: TextModels, xn: np.ndarray, rows: np.ndarray) -> dict:
    """Evaluator metrics of generations ``xn`` for the test rows ``rows`` (their captions and
    lengths), against the real test motions."""
    fast, s = bool(config.fast_compile), config.sample
    te = data.test
    mask = te["mask"][rows]
    t_emb = embed_text(text.evaluator, te["tokens"][rows], fast)
    m_emb, m_feat = embed_motion(text.evaluator, xn, mask, fast)
    _, real_feat = embed_motion(text.evaluator, te["xn"], te["mask"], fast)
    rp = r_precision(t_emb, m_emb, pool=int(s.pool), top_k=(1, 3), seed=0)
    k, _ = kid(real_feat, m_feat, subset_size=min(len(real_feat), len(m_feat)) // 2,
               num_subsets=50)
    out = {"r_top1": float(rp["top1"]), "r_top3": float(rp["top3"]),
           "fid": float(frechet_distance_from_features(real_feat, m_feat)), "kid": float(k),
           "mm_dist": float(mm_dist(t_emb, m_emb)),
           "diversity": float(diversity(m_feat, num_pairs=min(300, len(m_feat)), seed=0))}
    return {**out, **physics(config, data, joints_of(data, xn, mask), mask)}


WAVE_PROMPT = "a person waves a hand"


def arm_modes(data: Data, joints: np.ndarray, mask: np.ndarray) -> dict:
    """The wave mode test: per clip, each arm's raise = mean over valid frames of (wrist height
    - shoulder height) / arm length. Left / right: that arm raised (> 0.3) and the other down
    (< -0.5); averaged: both arms between (half raised); other: anything else."""
    sk = data.skeleton
    length = _arm_length(sk)
    m = mask.astype(np.float64)

    def raise_of(wrist, shoulder):
        h = (joints[:, :, wrist, 1] - joints[:, :, shoulder, 1]) / length
        return (h * m).sum(1) / np.maximum(m.sum(1), 1)

    lr = raise_of(sk.left_wrist, sk.left_shoulder)
    rr = raise_of(sk.right_wrist, sk.right_shoulder)
    left = (lr > 0.3) & (rr < -0.5)
    right = (rr > 0.3) & (lr < -0.5)
    averaged = (lr >= -0.5) & (lr <= 0.3) & (rr >= -0.5) & (rr <= 0.3)
    n = len(lr)
    waves = int(left.sum() + right.sum())
    return {"left": float(left.mean()), "right": float(right.mean()),
            "left_share": float(left.sum() / waves) if waves else float("nan"),
            "averaged": float(averaged.mean()),
            "other": float(1.0 - (left.sum() + right.sum() + averaged.sum()) / n)}


def _arm_length(sk) -> float:
    """Shoulder-to-wrist length of the left arm (sum of its bone lengths)."""
    total, j = 0.0, sk.left_wrist
    while j != sk.left_shoulder and j >= 0:
        total += float(np.linalg.norm(np.asarray(sk.offsets[j])))
        j = sk.parents[j]
    return total


# ----------------------------------------------------------------------------------------------
# Training: MDM (x0 regression), EMDM (DDGAN with lazy R1), noGAN (L_rec only), a2m
# ----------------------------------------------------------------------------------------------


def _adam(lr: float) -> optax.GradientTransformation:
    return flatten_if_uniform(optax.adam(lr, b1=0.5, b2=0.9))


def _joints_fn(data: Data):
    """Normalised rot6d-layout features (B, F, (J+1)*6) -> FK joints (B, F, J, 3), traced."""
    mean = jnp.asarray(data.a2m_stats.mean)
    std = jnp.asarray(data.a2m_stats.std)
    sk = data.skeleton

    def fn(xn):
        x = xn * std + mean
        b, f, _ = x.shape
        return rot6d_layout_joints(sk, x.reshape(b, f, -1, 6))

    return fn


def _geometric(config, variant: str, data: Data) -> dict:
    """The geometric-loss weights of a variant (t2m: 100 L_rec; a2m: every term at 1, the
    foot term at ``a2m.foot_weight`` or 0)."""
    if variant in A2M:
        foot = float(config.a2m.foot_weight) if variant == "a2m_foot" else 0.0
        dim = data.train["rn"].shape[-1]
        no_root = np.ones(dim, np.float32)
        no_root[-6:] = 0.0  # L_vel leaves out the root-translation row (MDM's a2m recipe)
        return dict(rec_weight=1.0, vel_weight=1.0, vel_features=no_root, pos_weight=1.0,
                    joint_vel_weight=1.0, foot_weight=foot, joints_fn=_joints_fn(data),
                    feet=data.skeleton.feet)
    return dict(rec_weight=float(config.emdm.rec_weight))


class Recipe:
    """The run's data, frozen text models and the compiled train steps of each variant (built
    once per run: a resumed or repeated fit reuses the compiled programs)."""

    def __init__(self, config, data: Data, text: TextModels):
        fast = bool(config.fast_compile)
        self.config, self.data, self.text = config, data, text
        self.train_c = embed_text(text.clip, data.train["tokens"], fast)   # the condition
        self.test_c = embed_text(text.clip, data.test["tokens"], fast)
        self._built: dict[str, tuple] = {}

    def graphs_and_params(self, variant: str, seed: int):
        g_graph, g_params = nets.init_params(
            nets.MotionTransformer, generator_config(self.config, variant, self.data),
            seed=seed)
        if variant in ("mdm", "nogan"):
            return (g_graph, None), g_params
        d_graph, d_params = nets.init_params(
            nets.MotionDiscriminator, discriminator_config(self.config, variant, self.data),
            seed=seed + 1000)
        return (g_graph, d_graph), (g_params, d_params)

    def batch(self, variant: str) -> dict:
        tr = self.data.train
        if variant in A2M:
            return {"x": tr["rn"], "mask": tr["mask"], "cond": tr["action"].astype(np.int32)}
        return {"x": tr["xn"], "mask": tr["mask"], "cond": self.train_c}

    def steps(self, variant: str, graphs: tuple):
        """``(step functions, step_choice or None, init_state(params, key))``."""
        if variant not in self._built:
            self._built[variant] = self._build(variant, graphs)
        return self._built[variant]

    def _build(self, variant: str, graphs: tuple):
        cfg, data = self.config, self.data
        g_graph, d_graph = graphs
        sched = variant_schedule(cfg, variant)
        p_drop = float(cfg.model.cond_dropout) if variant not in A2M else 0.0
        latent = (int(cfg.model.latent_dim),)
        geo = _geometric(cfg, variant, data)
        e, ema = cfg.emdm, float(cfg.train.ema_decay)

        def G(g_params, x, t, z, cond, mask):  # MDM's random condition masking inside G
            c = {"c": cond["c"], "mask": mask, "drop": cond["drop"]}
            if z is not None:
                c["z"] = z
            return generator_denoiser(g_graph, g_params, sched, c).x0(x, t)

        def D(d_params, x_t, x_tp1, t, cond, mask):  # D sees the true condition
            return nnx.merge(d_graph, d_params)(x_t, x_tp1, sched.c_noise(t), cond["c"],
                                                 mask=mask)

        def with_drop(batch, key):  # (batch with the condition and its dropout, key)
            k_drop, key = jax.random.split(key)
            drop = jax.random.bernoulli(k_drop, p_drop, (batch["x"].shape[0],))
            return {**batch, "cond": {"c": batch["cond"], "drop": drop}}, key

        if variant == "mdm":
            def loss(params, batch, key):
                batch, key = with_drop(batch, key)
                k_t, k_e = jax.random.split(key)
                x0, mask = batch["x"], batch["mask"]
                t = dpm.losses.sample_time(k_t, x0.shape[0], sched, "discrete")
                x_t = dpm.losses.diffuse(sched, x0, t, jax.random.normal(k_e, x0.shape))
                x0_hat = G(params, x_t, t, None, batch["cond"], mask)
                return geometric_loss(x0_hat, x0, mask, rec_weight=1.0).loss

            opt = flatten_if_uniform(optax.adam(float(cfg.mdm.learning_rate)))
            return ((make_train_step(loss, opt, ema_decay=ema),), None,
                    lambda p, k: init_train_state(p, opt, k))

        g_loss = ddgan_g_loss(G, D, sched, latent_shape=latent,
                              adv_weight=0.0 if variant == "nogan" else float(e.adv_weight),
                              **geo)
        g_opt, d_opt = gan_optimizers(float(e.lr_g), float(e.lr_d))
        if variant == "nogan":  # the same G objective without its adversarial term
            def loss(params, batch, key):
                batch, key = with_drop(batch, key)
                return g_loss(params, None, batch, key).loss

            return ((make_train_step(loss, g_opt, ema_decay=ema),), None,
                    lambda p, k: init_train_state(p, g_opt, k))

        d_inner = ddgan_d_loss(G, D, sched, latent_shape=latent, r1_gamma=float(e.r1_gamma))

        def d_loss(d_params, g_params, batch, key, *, r1=False):
            batch, key = with_drop(batch, key)
            return d_inner(d_params, g_params, batch, key, r1=r1)

        def gen_loss(g_params, d_params, batch, key):
            batch, key = with_drop(batch, key)
            return g_loss(g_params, d_params, batch, key)

        steps = tuple(make_gan_step(d_loss, gen_loss, d_opt, g_opt, ema_decay=ema, r1=r1)
                      for r1 in (True, False))
        every = int(e.r1_every)
        return (steps, functools.partial(_lazy_r1, every=every),
                lambda p, k: init_gan_state(p[0], p[1], g_opt, d_opt, k))


def _lazy_r1(i: int, every: int) -> int:
    """Which compiled GAN step takes iteration ``i``: 0 (with R1) every ``every`` steps."""
    return 0 if i % every == 0 else 1


def train_variant(recipe: Recipe, variant: str, seed: int, workdir: str, *, steps: int,
                  progress=True) -> tuple:
    """One model (resumable). Returns ``(generator graphdef, EMA generator params, wall seconds
    of this call)``."""
    cfg = recipe.config
    graphs, params = recipe.graphs_and_params(variant, seed)
    fns, choice, init = recipe.steps(variant, graphs)
    t0 = time.perf_counter()
    state, _ = fit(fns if choice else fns[0], init(params, jax.random.key(seed)),
                   BatchIterator(recipe.batch(variant), int(cfg.train.batch_size), seed=seed),
                   workdir, steps=steps, step_choice=choice,
                   ckpt_config={"variant": variant, "seed": seed, "steps": steps,
                                "model": cfg.model.to_dict(), "disc": cfg.disc.to_dict(),
                                "emdm": cfg.emdm.to_dict(), "mdm": cfg.mdm.to_dict(),
                                "a2m": cfg.a2m.to_dict(), "data": cfg.data.to_dict(),
                                "text": cfg.text.to_dict()},
                   ckpt_every=steps, fast_compile=cfg.fast_compile, progress=progress,
                   label=f"{variant}, seed {seed}")
    ema = state.ema_params
    return graphs[0], jax.device_get(ema), time.perf_counter() - t0


def measure_step_seconds(recipe: Recipe, variant: str, *, warm=3, n=20) -> float:
    """Seconds per train iteration of a variant (median of ``n`` after ``warm``; a GAN
    iteration's lazy R1 counted at its rate). The programs are :func:`fit`'s own (compiled
    once for both)."""
    cfg = recipe.config
    graphs, params = recipe.graphs_and_params(variant, 0)
    fns, choice, init = recipe.steps(variant, graphs)
    mesh = make_mesh()
    state = replicate(init(params, jax.random.key(0)), mesh)
    it = BatchIterator(recipe.batch(variant), int(cfg.train.batch_size), seed=0)
    per = []
    for f in fns:
        fn = jitted_step(f, mesh, bool(cfg.fast_compile))
        times = []
        for i in range(warm + n):
            batch = shard_batch(next(it), mesh)
            t0 = time.perf_counter()
            state, m = fn(state, batch)
            jax.block_until_ready(m["loss"])
            if i >= warm:
                times.append(time.perf_counter() - t0)
        per.append(float(np.median(times)))
    if len(per) == 1:
        return per[0]
    k = int(cfg.emdm.r1_every)  # one R1 step in every k
    return (per[0] + (k - 1) * per[1]) / k


def train_steps(recipe: Recipe, workdir: str, log=print) -> dict:
    """Steps per variant for equal wall time (``train.seconds`` each for t2m, ``a2m.seconds``
    for the a2m pair), measured once and cached; or the fixed ``steps`` when > 0."""
    cfg = recipe.config

    def budget(v):
        sec = cfg.a2m if v in A2M else cfg.train
        return float(sec.seconds), int(sec.steps)

    def measure():
        per = {v: (None if budget(v)[1] > 0 else measure_step_seconds(recipe, v))
               for v in T2M + A2M}
        return {"seconds_per_step": per,
                "steps": {v: budget(v)[1] if budget(v)[1] > 0 else
                          max(1, int(budget(v)[0] / per[v])) for v in per}}

    key = {"train_steps": cfg.train.to_dict(), "a2m": cfg.a2m.to_dict(),
           "model": cfg.model.to_dict(), "disc": cfg.disc.to_dict(),
           "emdm": cfg.emdm.to_dict(), "mdm": cfg.mdm.to_dict(), "data": cfg.data.to_dict()}
    out = _io.cached(workdir, key, measure)
    log("train steps for equal wall time: " + ", ".join(
        f"{v} {out['steps'][v]}" + ("" if out["seconds_per_step"][v] is None else
                                     f" ({out['seconds_per_step'][v] * 1e3:.0f} ms/step)")
        for v in out["steps"]))
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def _eval_conditions(recipe: Recipe) -> dict:
    """The conditions every t2m method generates for, in one list: the first ``num_eval`` test
    captions (at their lengths), ``mm_prompts`` captions x ``mm_repeats`` (multimodality), and
    ``mode_samples`` copies of the wave prompt (full length)."""
    cfg, data = recipe.config, recipe.data
    s, te = cfg.sample, data.test
    n = int(s.num_eval)
    rows = np.arange(n)
    first = {}
    for i, c in enumerate(te["caption"]):
        first.setdefault(str(c), i)
    mm_rows = np.array(sorted(first.values())[: int(s.mm_prompts)])
    mm = np.repeat(mm_rows, int(s.mm_repeats))
    wave_tok = np.asarray(data.vocab.encode([WAVE_PROMPT] * int(s.mode_samples),
                                            max_len=MAX_WORDS + 2), np.int32)
    wave_c = embed_text(recipe.text.clip, wave_tok, bool(cfg.fast_compile))
    F = int(cfg.data.max_frames)
    c = np.concatenate([recipe.test_c[rows], recipe.test_c[mm], wave_c])
    mask = np.concatenate([te["mask"][rows], te["mask"][mm],
                           np.ones((len(wave_c), F), bool)])
    return {"c": c, "mask": mask, "rows": rows, "mm_rows": mm_rows,
            "parts": (n, len(mm), len(wave_c))}


def evaluate_t2m(recipe: Recipe, method: str, model: tuple, seed: int, conds: dict) -> dict:
    cfg, data = recipe.config, recipe.data
    variant, kind, _ = METHODS[method]
    dim = data.train["xn"].shape[-1]
    n, n_mm, n_wave = conds["parts"]
    full = method in SLOW  # the 1000-step baseline: the graded captions only (CPU budget)
    m = n if full else len(conds["mask"])
    x, sec = timed_sample(cfg, model[0], model[1], variant, kind, method_steps(cfg, method),
                          conds["c"][:m], conds["mask"][:m], dim, seed=seed)
    out = grade(cfg, data, recipe.text, x[:n], conds["rows"])
    if full:
        out["multimodality"] = float("nan")
        out.update({f"wave_{k}": float("nan") for k in ("left", "right", "left_share",
                                                         "averaged", "other")})
        out["sec_per_sample"] = sec
        out["nfe"] = float(method_steps(cfg, method) * (2 if cfg.sample.cfg_scale != 1 else 1))
        return out
    fast = bool(cfg.fast_compile)
    _, f_mm = embed_motion(recipe.text.evaluator, x[n:n + n_mm], conds["mask"][n:n + n_mm],
                           fast)
    P, R = len(conds["mm_rows"]), int(cfg.sample.mm_repeats)
    out["multimodality"] = float(multimodality(f_mm.reshape(P, R, -1), num_pairs=min(10, R),
                                               seed=0))
    wave = x[n + n_mm:]
    modes = arm_modes(data, joints_of(data, wave, conds["mask"][n + n_mm:]),
                      conds["mask"][n + n_mm:])
    out.update({f"wave_{k}": v for k, v in modes.items()})
    out["sec_per_sample"] = sec
    out["nfe"] = float(method_steps(cfg, method) * (2 if cfg.sample.cfg_scale != 1 else 1))
    return out


def evaluate_a2m(recipe: Recipe, variant: str, model: tuple, seed: int) -> dict:
    """Foot skate of action-conditioned EMDM@T generations (FK joints of the rot6d layout),
    ``num_eval`` clips cycling through the actions at the test lengths."""
    cfg, data = recipe.config, recipe.data
    n = int(cfg.sample.num_eval)
    mask = data.test["mask"][:n]
    actions = (np.arange(n) % len(ACTIONS)).astype(np.int32)
    dim = data.train["rn"].shape[-1]
    x = sample(cfg, model[0], model[1], variant, "ddgan", variant_steps(cfg, variant), actions,
               mask, dim, seed=seed, guide=False, size=int(cfg.sample.timing_batch))
    joints = np.asarray(jax.jit(_joints_fn(data))(jnp.asarray(x))) * mask[..., None, None]
    sk = data.skeleton
    skate = foot_skate_ratio(joints, mask, sk.feet, fps=float(cfg.data.fps))
    return {"foot_skate": float(skate["ratio"]), "skate_speed": float(skate["mean_speed"])}


def references(recipe: Recipe) -> dict:
    """Real motions through the same evaluator: test captions vs their own motions, and a
    train-set sample against the test set (the FID floor)."""
    cfg, data = recipe.config, recipe.data
    n = int(cfg.sample.num_eval)
    rows = np.arange(n)
    tr_rows = np.arange(n)
    real_test = grade(cfg, data, recipe.text, data.test["xn"][rows], rows)
    fast = bool(cfg.fast_compile)
    _, f_tr = embed_motion(recipe.text.evaluator, data.train["xn"][tr_rows],
                           data.train["mask"][tr_rows], fast)
    _, f_te = embed_motion(recipe.text.evaluator, data.test["xn"], data.test["mask"], fast)
    real_test["fid"] = float(frechet_distance_from_features(f_te, f_tr))
    k, _ = kid(f_te, f_tr, subset_size=min(len(f_te), len(f_tr)) // 2, num_subsets=50)
    real_test["kid"] = float(k)
    wave = data.test["side"] > 0
    if wave.any():
        modes = arm_modes(data, data.test["joints"][wave], data.test["mask"][wave])
        real_test.update({f"wave_{k}": v for k, v in modes.items()})
    sk = data.skeleton
    a2m = foot_skate_ratio(data.test["joints"], data.test["mask"], sk.feet,
                           fps=float(cfg.data.fps))
    return {"real (test motions)": real_test,
            "real a2m": {"foot_skate": float(a2m["ratio"]),
                         "skate_speed": float(a2m["mean_speed"])}}


def run_all(recipe: Recipe, workdir: str, *, log=print, progress=True) -> dict:
    cfg = recipe.config
    seeds = as_tuple(cfg.seeds)
    steps = train_steps(recipe, workdir, log=log)
    models, wall = {}, {}
    for seed in seeds:
        for v in T2M + A2M:
            g, p, secs = train_variant(recipe, v, seed, os.path.join(workdir, f"{v}_seed{seed}"),
                                       steps=int(steps["steps"][v]), progress=progress)
            models[v, seed] = (g, p)
            wall.setdefault(v, []).append(secs)
    log("trained: " + ", ".join(f"{k} {np.mean(v):.0f} s" for k, v in wall.items()))
    conds = _eval_conditions(recipe)
    quality = {}
    t0 = time.perf_counter()
    for method, (variant, _, _) in METHODS.items():
        def one(seed, method=method, variant=variant):
            return _io.cached(workdir, {"t2m": method, "seed": seed,
                                        "sample": cfg.sample.to_dict()},
                              lambda: evaluate_t2m(recipe, method, models[variant, seed], seed,
                                                   conds))
        quality[method] = over_seeds(one, seeds)
        log(f"{method}: " + ", ".join(f"{k} {quality[method][k]['mean']:.3g}"
                                      for k in ("r_top3", "fid", "sec_per_sample")))
    a2m = {}
    for v in A2M:
        a2m[v] = over_seeds(lambda seed, v=v: _io.cached(
            workdir, {"a2m": v, "seed": seed, "sample": cfg.sample.to_dict()},
            lambda: evaluate_a2m(recipe, v, models[v, seed], seed)), seeds)
    log(f"graded ({time.perf_counter() - t0:.0f} s)")
    refs = _io.cached(workdir, {"references": cfg.sample.to_dict()},
                      lambda: references(recipe))
    return {"quality": quality, "a2m": a2m, "references": refs, "train_steps": steps,
            "train_seconds": {k: float(np.mean(v)) for k, v in wall.items()},
            "models": models, "conds": conds}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

COLUMNS = [("r_top1", "R@1"), ("r_top3", "R@3"), ("fid", "FID"), ("kid", "KID"),
           ("mm_dist", "MM-Dist"), ("diversity", "Diversity"), ("multimodality", "MModality"),
           ("foot_skate", "foot skate"), ("bone_var", "bone var"),
           ("sec_per_sample", "s / sample (CPU)"), ("nfe", "NFE")]
MODE_COLUMNS = [("wave_left_share", "left share of waves"), ("wave_averaged", "averaged arms"),
                ("wave_left", "left"), ("wave_right", "right"), ("wave_other", "other")]


def _paired(q: dict, a: str, b: str, metric: str) -> tuple[float, float]:
    x = np.array(q[a][metric]["values"])
    y = np.array(q[b][metric]["values"])
    d = y - x
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def verdict(report: dict) -> list[str]:
    q, lines = report["quality"], []

    def cmp(a, b, metric, higher: bool, claim: str):
        mean, sd = _paired(q, a, b, metric)
        better = mean > sd if higher else mean < -sd
        tie = abs(mean) <= sd
        word = "better" if better else ("tie (|diff| <= sd)" if tie else "worse")
        lines.append(f"{claim}: {b} - {a} = {mean:+.3f} +- {sd:.3f} ({metric}, paired over "
                     f"seeds): {b} {word}.")

    cmp("MDM@1000", "EMDM@10", "r_top3", True, "EMDM@10 vs MDM@1000, text match")
    cmp("MDM@1000", "EMDM@10", "fid", False, "EMDM@10 vs MDM@1000, FID")
    speed = (q["MDM@1000"]["sec_per_sample"]["mean"] / q["EMDM@10"]["sec_per_sample"]["mean"])
    lines.append(f"EMDM@10 generates {speed:.0f}x faster than MDM@1000 per sample on this CPU "
                 f"(measured side by side; {q['MDM@1000']['nfe']['mean']:.0f} vs "
                 f"{q['EMDM@10']['nfe']['mean']:.0f} network evaluations).")
    cmp("EMDM@10", "MDM-DDIM@10", "fid", False, "MDM-DDIM@10 vs EMDM@10 (equal NFE), FID")
    cmp("EMDM@10", "EMDM-noGAN@10", "fid", False,
        "EMDM-noGAN@10 vs EMDM@10 (same sampler, no GAN), FID")
    for m in ("EMDM@10", "MDM-DDIM@10", "EMDM-noGAN@10"):
        r = q[m]
        lines.append(f"mode test, {m}: left share of waves {r['wave_left_share']['mean']:.2f} "
                     f"(0.5 ideal), averaged-arm rate {r['wave_averaged']['mean']:.2f}.")
    a = report["a2m"]
    d = (np.array(a["a2m_foot"]["foot_skate"]["values"])
         - np.array(a["a2m_nofoot"]["foot_skate"]["values"]))
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    lines.append(f"a2m foot-contact loss: foot-skate ratio with - without = {d.mean():+.3f} +- "
                 f"{sd:.3f} (paired over seeds): "
                 f"{'lower with it' if d.mean() < -sd else 'no clear drop'}.")
    return lines


def tables(config, report: dict) -> str:
    q, refs = report["quality"], report["references"]
    rows = {"real (test motions)": refs["real (test motions)"], **q}
    s = config.sample
    out = [f"### text-to-motion, {s.num_eval} test captions, CFG {s.cfg_scale:g}, evaluator "
           f"features (proxies)\n\n" + markdown_table(rows, COLUMNS)]
    modes = {k: v for k, v in rows.items() if k in ("real (test motions)", "EMDM@10", "EMDM@4",
                                                       "MDM-DDIM@10", "EMDM-noGAN@10",
                                                       "MDM@100", "MDM@1000")}
    out.append(f"### mode test: \"{WAVE_PROMPT}\" x {s.mode_samples} (real: the test set's "
               "wave clips)\n\n" + markdown_table(modes, MODE_COLUMNS))
    a2m = {"real (test motions)": refs["real a2m"],
           "EMDM a2m, with L_foot": report["a2m"]["a2m_foot"],
           "EMDM a2m, without L_foot": report["a2m"]["a2m_nofoot"]}
    out.append("### action-to-motion (rot6d layout, FK losses): foot skate\n\n"
               + markdown_table(a2m, [("foot_skate", "foot-skate ratio"),
                                      ("skate_speed", "skating speed (m/s)")]))
    st = report["train_steps"]
    out.append("### training cost (equal wall time per model)\n\n"
               "| model | ms / iteration | iterations | seconds (mean over seeds) |\n"
               "|---|---:|---:|---:|\n" + "\n".join(
                   f"| {v} | {_ms(st['seconds_per_step'][v])} | {st['steps'][v]} | "
                   f"{report['train_seconds'].get(v, float('nan')):.0f} |" for v in st["steps"]))
    return "\n\n".join(out)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def draw_strip(path: str, rows: Sequence[tuple[str, np.ndarray]], parents: Sequence[int],
               frames: int = 6) -> str:
    """Keyframe strips, one row per ``(title, joints (F, J, 3))``: front view (x, y), each
    keyframe centred on its root and laid out left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(1.1 * frames, 1.5 * len(rows)),
                             squeeze=False)
    for ax, (title, j) in zip(axes[:, 0], rows, strict=True):
        idx = np.linspace(0, len(j) - 1, frames).round().astype(int)
        for k, f in enumerate(idx):
            p = j[f] - np.array([j[f, 0, 0], 0.0, j[f, 0, 2]]) + np.array([1.0 * k, 0, 0])
            for c, par in enumerate(parents):
                if par >= 0:
                    ax.plot([p[c, 0], p[par, 0]], [p[c, 1], p[par, 1]], "-", lw=1.2,
                            color="tab:blue" if c % 2 else "tab:orange")
        ax.set_title(title, fontsize=7, loc="left")
        ax.set_aspect("equal")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


FIGURE_METHODS = ("MDM@1000", "MDM-DDIM@10", "EMDM@10", "EMDM-noGAN@10")


def figure(recipe: Recipe, models: dict, seed: int, path: str) -> str:
    """Generated skeletons per method for a walk, the multimodal wave and a jump prompt."""
    from dpm.data import ACTION_PROMPTS

    cfg, data = recipe.config, recipe.data
    prompts = [ACTION_PROMPTS["walk"], WAVE_PROMPT, ACTION_PROMPTS["jump"]]
    tok = np.asarray(data.vocab.encode(prompts, max_len=MAX_WORDS + 2), np.int32)
    c = embed_text(recipe.text.clip, tok, bool(cfg.fast_compile))
    F = int(cfg.data.max_frames)
    mask = np.ones((len(prompts), F), bool)
    rows = []
    for p in prompts:
        real = np.flatnonzero(np.array([str(x) for x in data.test["caption"]]) == p)
        if len(real):
            r = real[0]
            n = int(data.test["length"][r])
            rows.append((f"real: {p}", data.test["joints"][r, :n]))
    size = int(cfg.sample.timing_batch)  # padded to the graded chunk: no new compile
    c_pad = np.concatenate([c, np.repeat(c[-1:], size - len(c), axis=0)])
    m_pad = np.concatenate([mask, np.repeat(mask[-1:], size - len(c), axis=0)])
    for method in FIGURE_METHODS:
        variant, kind, _ = METHODS[method]
        g, params = models[variant, seed]
        x = sample(cfg, g, params, variant, kind, method_steps(cfg, method), c_pad, m_pad,
                   data.train["xn"].shape[-1], seed=seed + 77, size=size)[: len(prompts)]
        j = joints_of(data, x, mask)
        rows += [(f"{method}: {p}", j[i]) for i, p in enumerate(prompts)]
    return draw_strip(path, rows, data.skeleton.parents, int(cfg.sample.figure_frames))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True,
                       log=print) -> dict:
    """Validates ``config``, trains (or restores) every network, generates and grades, writes
    the report to ``workdir``."""
    check_config(config)
    t0 = time.perf_counter()
    data = load_data(config)
    text = train_text_models(config, data, workdir, progress=progress)
    recipe = Recipe(config, data, text)
    res = run_all(recipe, workdir, log=log, progress=progress)
    models = res.pop("models")
    res.pop("conds")
    report = {**res, "text_seconds": text.seconds, "config": config.to_dict()}
    report["verdict"] = verdict(report)
    seed0 = as_tuple(config.seeds)[0]
    figures = [figure(recipe, models, seed0, os.path.join(workdir, "motions.png"))]
    report["seconds"] = time.perf_counter() - t0
    notes = [f"motions.png: keyframes (front view, each centred on its root) of real test "
             f"clips and of each method's generation for the same prompts (seed {seed0}).", "",
             "## Verdict", "", *[f"- {v}" for v in report["verdict"]], "",
             f"Run time: {report['seconds']:.0f} s. Command: `python -m experiments.emdm "
             f"--workdir {workdir}`."]
    write_report(workdir, "report", tables(config, report), report, figures=figures,
                 judge="Evaluator: a contrastive text-motion model (nets.TextEncoder + "
                 "nets.MotionEncoder, seed 200) trained on the eval set, a split of the "
                 "procedural motions no generator or condition encoder saw, and never used in "
                 "training; R-precision, FID / KID, MM-Dist, diversity and multimodality are "
                 "computed in its embedding / feature space. Physics metrics use joints "
                 "recovered from the generated features. All are in-project proxies.",
                 title="EMDM in miniature", notes="\n".join(notes))
    return report


# ----------------------------------------------------------------------------------------------
# A user's prompt: `python -m experiments.emdm generate "a person walks forward" ...`
# ----------------------------------------------------------------------------------------------


def generate(workdir: str, prompt: str, out: str, *, method: str = "EMDM@10", frames: int = 0,
             seed: int = 0) -> np.ndarray:
    """Generates one motion for ``prompt`` with a finished run's seed-``seed`` model; writes the
    features in the dataset's format (un-normalised, (F, D) ``.npy``) to ``out`` and a
    keyframe strip next to it (``.png``). Returns the features."""
    config = finished_config(workdir, "emdm")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}; got {method!r}")
    F = int(config.data.max_frames)
    frames = frames or F
    if not 1 <= frames <= F:
        raise ValueError(f"frames must be in [1, {F}] (the run's data.max_frames); "
                         f"got {frames}")
    seeds = as_tuple(config.seeds)
    if seed not in seeds:
        raise ValueError(f"seed must be one of the run's seeds {list(seeds)}; got {seed}")
    data = load_data(config)
    try:
        tok = np.asarray(data.vocab.encode([prompt], max_len=MAX_WORDS + 2, strict=True),
                         np.int32)
    except ValueError as e:
        raise ValueError(f"prompt {prompt!r}: {e}. Known words: "
                         f"{' '.join(data.vocab.words[4:])}") from None
    text = train_text_models(config, data, workdir, progress=False)
    recipe = Recipe(config, data, text)
    steps = train_steps(recipe, workdir, log=lambda *_: None)
    variant, kind, _ = METHODS[method]
    g, params, _ = train_variant(recipe, variant, seed, os.path.join(workdir,
                                                                     f"{variant}_seed{seed}"),
                                 steps=int(steps["steps"][variant]), progress=False)
    c = embed_text(text.clip, tok, bool(config.fast_compile))
    mask = np.zeros((1, F), bool)
    mask[0, :frames] = True
    x = sample(config, g, params, variant, kind, method_steps(config, method), c, mask,
               data.train["xn"].shape[-1], seed=seed + 1, size=1)
    feats = np.asarray(dpm.data.denormalize(x, data.stats))[0, :frames].astype(np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.save(out, feats)
    joints = joints_of(data, x, mask)[0, :frames]
    draw_strip(os.path.splitext(out)[0] + ".png", [(f"{method}: {prompt}", joints)],
               data.skeleton.parents, int(config.sample.figure_frames))
    return feats


def _generate_main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m experiments.emdm generate",
                                 description="Generate a motion for a prompt with a finished "
                                 "run (features .npy in the dataset's format, and a .png).")
    ap.add_argument("prompt")
    ap.add_argument("--workdir", default="runs/emdm")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", default="EMDM@10", choices=sorted(METHODS))
    ap.add_argument("--frames", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(list(argv))
    with user_errors():
        try:
            generate(a.workdir, a.prompt, a.out, method=a.method, frames=a.frames, seed=a.seed)
        except ValueError as e:  # a user's input: one line, not a traceback
            raise UsageError(str(e)) from None
    print(f"wrote {a.out} and {os.path.splitext(a.out)[0]}.png")


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate"]:
        _generate_main(argv[1:])
        return None
    return run_experiment(argv, "experiments.emdm", __doc__.splitlines()[0],
                          train_and_evaluate, validate=check_config)


if __name__ == "__main__":
    main(sys.argv[1:])
