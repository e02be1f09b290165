"""REFace (Baliah, Lin, Liao, Liang & Khan, WACV 2025: "Realistic and Efficient Face Swapping:
A Unified Approach with Diffusion Models") in miniature, on procedurally rendered faces.

    python -m experiments.reface --workdir runs/reface
    python -m experiments.reface swap --workdir runs/reface --source a.png --source-labels \
        a_labels.png --target b.png --target-labels b_labels.png --mask head --out out.png \
        [--steps 50] [--start-t 0.7]

Every part is built here, nothing downloaded:

* **Faces** (:mod:`dpm.data.faces`): 32x32 RGB faces with CelebAMask-HQ label maps; fixed
  per-identity traits and per-image nuisance (pose, expression, lighting, hair, background).
  Identities split in two: the diffusion model and its training encoders see only the *train*
  identities; the swap pairs come from the *unseen* ones (source and target of different
  people).
* **Encoders** (:class:`nets.FaceEncoder`): two ArcFace identity encoders (additive angular
  margin, different seeds and splits): ``E_id^train`` (train identities; conditioning and the
  identity loss) and ``E_id^eval`` (enrolment images of every identity; used only to grade);
  a generic image encoder regressing every rendered attribute (the frozen CLIP ViT-L/14 role,
  for the source and target branches of the condition); and the *evaluation* attribute
  regressor of pose and expression (the Hopenet / 3DMM roles).
* **Model**: pixel-space inpainting diffusion, U-Net input ``[x_t | masked target | mask]``
  (3 + 3 + 1 channels), cross-attention to REFace's fused condition token
  (:class:`nets.FaceConditioner`: ``(w_clip (e_src + e_tgt) + w_id e_id) / (w_clip + w_id)``),
  a learnable null token with 20 % condition dropout, eps-prediction on LDM's scaled-linear
  betas; guided DDIM at inference, pasted back outside the mask.
* **Training** (:func:`dpm.losses.reface_terms`): a shared base (per seed) trained with the
  inpainting loss, then the ablation ladder, each rung fine-tuned from the base for the *same
  wall-clock time*: A (inpainting loss only), B (+ S = 4 DDIM steps unrolled in the training
  step, identity loss with ``E_id^train`` on the face region and a multi-scale L1 perceptual
  proxy, the swap condition from the in-batch partner), C (+ the target-attribute branch
  ``e_tgt``), D (+ mask shuffling: face-only or face+hair masks, so one model also swaps
  heads).

Graded on held-out cross-identity pairs with face masks and head masks: identity retrieval
top-1 / top-5 of the swapped face among the unseen identities' enrolment centroids
(``E_id^eval``), target-identity leakage, pose and expression error (the evaluation
regressor, L2 between swapped and target estimates as in REFace's protocol), KID in the
evaluation regressor's features against real unseen faces, background PSNR of the raw sample
outside the mask, and for head swaps the hair-colour error against the source. All are
in-project proxies. Writes ``<workdir>/report.{md,json}`` and PNGs; the committed copy lives in
``experiments/results/reface/``.
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
from flax import nnx
from jax.tree_util import Partial

import dpm
import nets
from dpm.data import (
    BatchIterator,
    augment_source,
    face_dataset,
    region_mask,
    tps_warp,
)
from dpm.losses import (
    arcface_loss,
    diffuse,
    reface_terms,
    restrict,
    shuffle_masks,
    swap_partner,
)
from dpm.training import (
    init_train_state,
    make_optimizer,
    make_train_step,
    warmup_ema_decay,
)
from experiments import _io
from experiments._checks import as_tuple, config_int, config_number, int_values
from experiments._cli import UsageError, run_experiment, user_errors
from experiments._latent import batched, jit
from experiments._report import finished_config, markdown_table, over_seeds, write_report
from experiments._runner import fit
from solvers import ddim, paste_back
from solvers.grids import trailing

# LDM's "linear" schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2
SCHEDULE = dpm.DiscreteVP.from_name("scaled_linear", 1000)
VARIANTS = ("A", "B", "C", "D")
DESCRIPTION = {
    "A": "A: inpainting loss only",
    "B": "B: + DDIM-in-training (identity + perceptual)",
    "C": "C: + target-attribute token",
    "D": "D: + mask shuffling (face / head)",
}
ENCODERS = ("id_train", "id_eval", "generic", "attr_eval")
MASKS = ("face", "head")


def get_config() -> ml_collections.ConfigDict:
    """The default run: 32x32 faces, 3 seeds, sized for <= 30 min on 2 idle CPU cores."""
    c = ml_collections.ConfigDict()
    c.name = "reface"
    c.seeds = (0, 1, 2)
    c.fast_compile = False
    c.data = ml_collections.ConfigDict(dict(
        n_identities=160, test_identities=40, images_per_identity=24, size=32, seed=0))
    c.encoders = ml_collections.ConfigDict(dict(
        steps=600, batch_size=64, learning_rate=2e-3, width=16, embed_dim=64, margin=0.3,
        scale=16.0))
    c.model = ml_collections.ConfigDict(dict(
        base_channels=16, channel_mult=(1, 2, 2), width=64, mapper_layers=2, heads=4,
        w_clip=1.0, w_id=10.0))
    # the shared base: inpainting loss only, face masks, no target branch; trained once (its
    # own seed), every rung of every seed fine-tunes it
    c.base = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=16, learning_rate=5e-4, warmup_steps=100, ema_decay=0.999,
        seed=0))
    # each rung of the ladder fine-tunes the base for the same wall-clock `seconds` (its step
    # count measured once per workdir and cached); steps > 0: that many steps each instead
    c.finetune = ml_collections.ConfigDict(dict(
        seconds=35.0, steps=0, batch_size=16, learning_rate=2e-4, warmup_steps=10,
        ema_decay=0.99, unroll_steps=4, unroll_examples=4, id_weight=0.3,
        perceptual_weight=0.1, head_rate=0.5))
    c.train = ml_collections.ConfigDict(dict(cond_dropout=0.2, warp_strength=0.1))
    c.sample = ml_collections.ConfigDict(dict(
        steps=15, start_t=1.0, cfg_scale=3.0, clip_x0=True, num_pairs=200, figure_pairs=6,
        kid_subsets=50))
    return c


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every setting checked before any work; errors name the key, the value, the choices."""
    d = config.data
    config_int("data.n_identities", d.n_identities, 4)
    config_int("data.test_identities", d.test_identities, 2)
    if d.test_identities > d.n_identities - 2:
        raise ValueError(f"config.data.test_identities must leave >= 2 train identities of "
                         f"{d.n_identities}; got {d.test_identities!r}")
    config_int("data.images_per_identity", d.images_per_identity, 4)
    if d.size not in (16, 32, 48, 64):
        raise ValueError(f"config.data.size must be 32, 48 or 64 (16 for smoke runs); got "
                         f"{d.size!r}")
    config_int("data.seed", d.seed, 0)
    for sec in ("encoders", "base", "finetune"):
        s = config[sec]
        config_int(f"{sec}.batch_size", s.batch_size, 2)
        if s.batch_size % jax.device_count():
            raise ValueError(f"config.{sec}.batch_size must be a multiple of the "
                             f"{jax.device_count()} devices; got {s.batch_size}")
        config_number(f"{sec}.learning_rate", s.learning_rate, 0.0, open_low=True)
    config_int("encoders.steps", config.encoders.steps)
    config_int("encoders.width", config.encoders.width, 4)
    config_int("encoders.embed_dim", config.encoders.embed_dim, 2)
    config_number("encoders.margin", config.encoders.margin, 0.0, 1.5)
    config_number("encoders.scale", config.encoders.scale, 0.0, open_low=True)
    m = config.model
    config_int("model.base_channels", m.base_channels, 4)
    mult = as_tuple(m.channel_mult)
    if not mult or not all(isinstance(v, int) and v >= 1 for v in mult) or d.size % 2 ** (
            len(mult) - 1):
        raise ValueError(f"config.model.channel_mult must be positive ints, at most "
                         f"log2({d.size}) + 1 levels; got {m.channel_mult!r}")
    config_int("model.width", m.width, 4)
    config_int("model.mapper_layers", m.mapper_layers)
    config_int("model.heads", m.heads)
    if m.width % m.heads:
        raise ValueError(f"config.model.heads must divide model.width={m.width}; "
                         f"got {m.heads!r}")
    config_number("model.w_clip", m.w_clip, 0.0)
    config_number("model.w_id", m.w_id, 0.0)
    if m.w_clip + m.w_id <= 0:
        raise ValueError("config.model.w_clip + model.w_id must be > 0")
    b = config.base
    config_int("base.steps", b.steps)
    config_int("base.warmup_steps", b.warmup_steps, 0)
    config_int("base.seed", b.seed, 0)
    config_number("base.ema_decay", b.ema_decay, 0.0, 0.99999)
    f = config.finetune
    config_number("finetune.seconds", f.seconds, 0.0, open_low=True)
    config_int("finetune.steps", f.steps, 0)
    config_int("finetune.warmup_steps", f.warmup_steps, 0)
    config_number("finetune.ema_decay", f.ema_decay, 0.0, 0.99999)
    config_int("finetune.unroll_steps", f.unroll_steps)
    config_int("finetune.unroll_examples", f.unroll_examples)
    config_number("finetune.id_weight", f.id_weight, 0.0)
    config_number("finetune.perceptual_weight", f.perceptual_weight, 0.0)
    config_number("finetune.head_rate", f.head_rate, 0.0, 1.0)
    config_number("train.cond_dropout", config.train.cond_dropout, 0.0, 0.99)
    config_number("train.warp_strength", config.train.warp_strength, 0.0, 0.5)
    s = config.sample
    config_int("sample.steps", s.steps)
    if s.steps > SCHEDULE.num_steps:
        raise ValueError(f"config.sample.steps must be <= {SCHEDULE.num_steps}; got {s.steps!r}")
    config_number("sample.start_t", s.start_t, 0.0, 1.0, open_low=True)
    start_grid(int(s.steps), float(s.start_t), "config.sample.start_t")
    config_number("sample.cfg_scale", s.cfg_scale, 0.0)
    if not isinstance(s.clip_x0, bool):
        raise ValueError(f"config.sample.clip_x0 must be True or False; got {s.clip_x0!r}")
    config_int("sample.num_pairs", s.num_pairs, 2)
    config_int("sample.figure_pairs", s.figure_pairs)
    config_int("sample.kid_subsets", s.kid_subsets)
    int_values("config.seeds", config.seeds, 0)


# ----------------------------------------------------------------------------------------------
# Data: rendered faces, identity split, swap pairs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    train: dict          # every image of the train identities (the diffusion model's data)
    enrol: dict          # first half of every identity's images (E_id^eval, the galleries)
    pool: dict           # second half of the unseen identities' images (the swap pairs)
    pairs: dict          # {"source": (P,), "target": (P,)} rows of `pool`
    n_train_ids: int
    n_ids: int


def _rows(ds: dict, idx: np.ndarray) -> dict:
    return {k: v[idx] for k, v in ds.items()}


def _with_masks(ds: dict) -> dict:
    return {**ds, "face_keep": region_mask(ds["labels"], "face"),
            "head_keep": region_mask(ds["labels"], "head")}


def load_data(config) -> Data:
    d = config.data
    ds = _with_masks(face_dataset(n_identities=d.n_identities,
                                  images_per_identity=d.images_per_identity, size=d.size,
                                  seed=d.seed))
    n_train = d.n_identities - d.test_identities
    ident = ds["identity"]
    # the k-th image of its identity: the first half enrols, the second half is held out
    order = np.zeros(len(ident), np.int64)
    for i in np.unique(ident):
        rows = np.flatnonzero(ident == i)
        order[rows] = np.arange(len(rows))
    half = d.images_per_identity // 2
    train = _rows(ds, np.flatnonzero(ident < n_train))
    enrol = _rows(ds, np.flatnonzero(order < half))
    pool = _rows(ds, np.flatnonzero((ident >= n_train) & (order >= half)))
    rng = np.random.default_rng(d.seed + 1)
    n = min(int(config.sample.num_pairs), len(pool["identity"]))
    src = rng.choice(len(pool["identity"]), n, replace=len(pool["identity"]) < n)
    tgt = np.empty_like(src)
    for j, s in enumerate(src):  # a target of another (unseen) person
        others = np.flatnonzero(pool["identity"] != pool["identity"][s])
        tgt[j] = rng.choice(others)
    return Data(train, enrol, pool, {"source": src, "target": tgt}, n_train, d.n_identities)


# ----------------------------------------------------------------------------------------------
# Encoders: ArcFace identities, the generic (CLIP-role) encoder, the evaluation regressor
# ----------------------------------------------------------------------------------------------


def _targets(ds: dict, kind: str) -> np.ndarray:
    if kind == "generic":  # every rendered attribute: identity traits and nuisance
        return np.concatenate([ds["traits"], ds["attributes"]], axis=1).astype(np.float32)
    return np.concatenate([ds["pose"], ds["expression"]], axis=1).astype(np.float32)


def encoder_config(config, kind: str, data: Data) -> nets.FaceEncoderConfig:
    e = config.encoders
    size = int(config.data.size)
    common = dict(image_size=size, width=int(e.width), embed_dim=int(e.embed_dim),
                  num_stages=3 if size <= 32 else 4)
    if kind in ("id_train", "id_eval"):
        # one class per identity for both (one layout, one compiled step): E_id^train's
        # unseen-identity classes never occur as labels
        return nets.face_encoder_small(num_classes=data.n_ids, **common)
    dim = _targets(data.train, kind).shape[1]
    return nets.face_encoder_small(num_outputs=dim, **common)


@functools.cache
def _encoder_step(graphdef, kind: str, margin: float, scale: float, optim: tuple):
    def loss(params, batch, key):
        net = nnx.merge(graphdef, params)
        k_aug, k_mix = jax.random.split(key)
        face = restrict(batch["x"], 1.0 - batch["face_keep"])
        if kind == "arcface":  # face-only, augmented crops (the swap sources)
            return arcface_loss(net.cosine_logits(augment_source(face, k_aug)), batch["label"],
                                margin=margin, scale=scale)
        x = batch["x"]
        if kind == "generic":  # full images and face-only crops, as the condition sees them
            crop = jax.random.bernoulli(k_mix, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(crop, augment_source(face, k_aug), x)
        return jnp.mean(jnp.square(net.regress(x) - batch["target"]), axis=-1)

    lr, steps = optim
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(50, steps - 1))
    return make_train_step(loss, opt, ema_decay=0.0), opt


def train_encoder(config, kind: str, data: Data, workdir: str, *, progress=True):
    """One encoder (resumable). Returns ``(graphdef, params, info)``."""
    e = config.encoders
    ds = data.enrol if kind in ("id_eval", "attr_eval") else data.train
    cfg = encoder_config(config, kind, data)
    seed = 10 + ENCODERS.index(kind)
    graphdef, params = nets.init_params(nets.FaceEncoder, cfg, seed=seed)
    loss_kind = "arcface" if kind in ("id_train", "id_eval") else kind
    step, opt = _encoder_step(graphdef, loss_kind, float(e.margin), float(e.scale),
                              (float(e.learning_rate), int(e.steps)))
    batch = {"x": ds["x"], "face_keep": ds["face_keep"]}
    info = {}
    if kind in ("id_train", "id_eval"):
        batch["label"] = ds["identity"].astype(np.int32)
    else:
        y = _targets(ds, kind)
        mu, sd = y.mean(0), y.std(0) + 1e-6
        batch["target"] = ((y - mu) / sd).astype(np.float32)
        info = {"mean": mu, "std": sd}
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(seed)),
                   BatchIterator(batch, e.batch_size, seed=seed), workdir, steps=e.steps,
                   ckpt_config={"encoder": kind, "encoders": e.to_dict(),
                                "data": config.data.to_dict()},
                   ckpt_every=e.steps, fast_compile=config.fast_compile, progress=progress,
                   label=f"encoder {kind}")
    return graphdef, jax.device_get(state.params), info


@functools.cache
def _encoder_fn(graphdef, method: str, fast: bool):
    return jit(lambda p, x: getattr(nnx.merge(graphdef, p), method)(x), fast)


def encode(enc, method: str, x: np.ndarray, fast: bool) -> np.ndarray:
    fn = _encoder_fn(enc[0], method, fast)
    return batched(lambda a: fn(enc[1], a), x)


def face_crop(ds: dict, kind: str = "face") -> np.ndarray:
    """The source crop: the region's pixels (face, or face + hair), the rest -1."""
    keep = ds["face_keep"] if kind == "face" else ds["head_keep"]
    return keep * -1.0 + (1.0 - keep) * ds["x"]


def retrieval_by_identity(query: np.ndarray, centroids: np.ndarray, labels: np.ndarray,
                          ks=(1, 5)) -> dict:
    """Top-k accuracy of ``labels`` among the gallery identities (rows of ``centroids``) by
    cosine similarity; ties count against the query."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True).clip(1e-12)
    g = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)
    sim = q @ g.T
    true = sim[np.arange(len(q)), labels]
    rank = np.sum(sim >= true[:, None], axis=1) - 1
    return {f"top{k}": float(np.mean(rank < k)) for k in ks}


@dataclasses.dataclass
class Encoders:
    id_train: tuple
    id_eval: tuple
    generic: tuple
    attr_eval: tuple
    centroids: np.ndarray        # (n_unseen, D) E_id^eval enrolment centroids of unseen ids
    unseen: np.ndarray           # their identity numbers
    sanity: dict
    seconds: float


def train_encoders(config, data: Data, workdir: str, *, log=print, progress=True) -> Encoders:
    t0 = time.perf_counter()
    fast = bool(config.fast_compile)
    out = {k: train_encoder(config, k, data, os.path.join(workdir, f"encoder_{k}"),
                            progress=progress) for k in ENCODERS}
    enc = {k: v[:2] for k, v in out.items()}
    unseen = np.arange(data.n_train_ids, data.n_ids)
    en = data.enrol
    e_en = encode(enc["id_eval"], "embed", face_crop(en), fast)
    e_en = e_en / np.linalg.norm(e_en, axis=1, keepdims=True)
    centroids = np.stack([e_en[en["identity"] == i].mean(0) for i in unseen])
    # sanity: the judges on held-out images of unseen identities
    pool = data.pool
    lab = np.searchsorted(unseen, pool["identity"])
    sanity = {"id_eval_top1_real_unseen": retrieval_by_identity(
        encode(enc["id_eval"], "embed", face_crop(pool), fast), centroids, lab)["top1"]}
    e_tr = encode(enc["id_train"], "embed", face_crop(pool), fast)
    cen_tr = np.stack([e_tr[pool["identity"] == i].mean(0) for i in unseen])
    sanity["id_train_top1_real_unseen (own centroids)"] = retrieval_by_identity(
        e_tr, cen_tr, lab)["top1"]
    info = out["attr_eval"][2]
    pred = encode(enc["attr_eval"], "regress", pool["x"], fast) * info["std"] + info["mean"]
    y = _targets(pool, "attr_eval")
    sanity["attr_eval_pose_r2"] = float(1 - np.mean((pred[:, :2] - y[:, :2]) ** 2)
                                        / np.mean((y[:, :2] - y[:, :2].mean(0)) ** 2))
    sanity["attr_eval_expression_r2"] = float(1 - np.mean((pred[:, 2:] - y[:, 2:]) ** 2)
                                              / np.mean((y[:, 2:] - y[:, 2:].mean(0)) ** 2))
    secs = time.perf_counter() - t0
    log("encoders: " + ", ".join(f"{k} {v:.3f}" for k, v in sanity.items())
        + f" ({secs:.0f} s)")
    enc["attr_eval"] = (*enc["attr_eval"], info)
    return Encoders(enc["id_train"], enc["id_eval"], enc["generic"], enc["attr_eval"],
                    centroids, unseen, sanity, secs)


# ----------------------------------------------------------------------------------------------
# The inpainting model and its training (base, then the ablation ladder)
# ----------------------------------------------------------------------------------------------


def unet_config(config) -> nets.UNetConfig:
    m = config.model
    size = int(config.data.size)
    mult = tuple(int(v) for v in as_tuple(m.channel_mult))
    sizes = tuple(size // 2**i for i in range(len(mult)))
    return nets.tiny(image_size=size, channels=3, base_channels=int(m.base_channels),
                     channel_mult=mult, attn_resolutions=sizes[-1:],
                     context_dim=int(m.width), cross_attn_resolutions=sizes[1:],
                     extra_in_channels=4)


def conditioner_config(config) -> nets.FaceConditionerConfig:
    m, e = config.model, config.encoders
    dim = int(e.embed_dim)
    return nets.reface_conditioner_small(dim, dim, width=int(m.width),
                                         mapper_layers=int(m.mapper_layers), heads=int(m.heads),
                                         w_clip=float(m.w_clip), w_id=float(m.w_id),
                                         use_target=True)


def init_model(config, seed: int):
    """``((unet graphdef, conditioner graphdef), {"unet": ..., "cond": ...})``."""
    ug, up = nets.init_params(nets.UNet, unet_config(config), seed=seed)
    cg, cp = nets.init_params(nets.FaceConditioner, conditioner_config(config), seed=seed)
    return (ug, cg), {"unet": up, "cond": cp}


@functools.cache
def _graphs(ucfg: nets.UNetConfig, ccfg: nets.FaceConditionerConfig) -> tuple:
    ug = nnx.graphdef(nnx.eval_shape(lambda: nets.UNet(ucfg, rngs=nnx.Rngs(0))))
    cg = nnx.graphdef(nnx.eval_shape(lambda: nets.FaceConditioner(ccfg, rngs=nnx.Rngs(0))))
    return ug, cg


def model_graphs(config) -> tuple:
    """The model's graphdefs without initialising parameters."""
    return _graphs(unet_config(config), conditioner_config(config))


def _unet_apply(graphdef, params, x, noise_level, cond):
    return nnx.merge(graphdef, params)(x, noise_level, cond)


def _denoiser(unet_g, params, cond) -> dpm.Denoiser:
    return dpm.network_denoiser(Partial(_unet_apply, unet_g, params), SCHEDULE, "eps",
                                cond=cond)


def _features(gen, idn, src, tgt, use_target) -> tuple:
    """The condition's frozen-encoder inputs: generic features of the source crop, its
    identity embedding, and the full target's generic features times ``use_target`` (traced 0
    or 1: the rungs without the target branch feed zeros, so every rung shares one parameter
    tree and one compiled step). Per-example (GroupNorm), so rows may be permuted after."""
    return gen.features(src), idn.embed(src), gen.features(tgt) * use_target


def _context(cond_g, params, feats):
    """The condition token from :func:`_features`."""
    return nnx.merge(cond_g, params["cond"])(*feats)


def rung(config, variant: str) -> tuple[int, bool, float]:
    """The rung's ``(unroll_steps, use_target, head_rate)``."""
    f = config.finetune
    return {"base": (0, False, 0.0), "A": (0, False, 0.0),
            "B": (int(f.unroll_steps), False, 0.0), "C": (int(f.unroll_steps), True, 0.0),
            "D": (int(f.unroll_steps), True, float(f.head_rate))}[variant]


@functools.cache
def _model_step(graphs: tuple, enc_graphs: tuple, setting: tuple, optim: tuple):
    (unet_g, cond_g), (gen_g, id_g) = graphs, enc_graphs
    unroll, dropout, warp, id_w, perc_w, unroll_examples = setting

    def loss(params, batch, key, frozen, flags):
        gen, idn = nnx.merge(gen_g, frozen["generic"]), nnx.merge(id_g, frozen["id_train"])
        use_target, head_rate = flags["use_target"], flags["head_rate"]
        x = batch["x"]
        B = x.shape[0]
        k_mask, k_warp, k_aug, k_drop, k_loss = jax.random.split(key, 5)
        keep_kind, _ = shuffle_masks(batch["face_keep"], batch["head_keep"], k_mask, head_rate)
        region = 1.0 - keep_kind
        # the inpainted region, TPS-warped so its outline does not leak the face shape
        keep = 1.0 - tps_warp(region, k_warp, strength=warp) if warp > 0 else keep_kind
        src = augment_source(restrict(x, region), k_aug)  # same photo, region-only, augmented
        feats = _features(gen, idn, src, x, use_target)
        ctx = _context(cond_g, params, feats)
        null = nnx.merge(cond_g, params["cond"]).null_context(B)
        drop = jax.random.bernoulli(k_drop, dropout, (B,))
        ctx_train = jnp.where(drop[:, None, None], null, ctx)
        image = jnp.concatenate([x * keep, keep], axis=-1)
        den = _denoiser(unet_g, params["unet"], {"image": image, "context": ctx_train})
        if not unroll:
            return reface_terms(den, x, k_loss, unroll_steps=0).loss
        # the swap condition: the in-batch partner's source (another person), this target
        perm = swap_partner(B)
        ctx_swap = _context(cond_g, params, (feats[0][perm], feats[1][perm], feats[2]))
        face = 1.0 - batch["face_keep"]
        src_id = idn.embed(restrict(x, face))[perm]
        terms = reface_terms(den, x, k_loss, swap_den=den.with_cond({"image": image,
                                                                     "context": ctx_swap}),
                             unroll_steps=unroll, unroll_examples=min(unroll_examples, B),
                             target=x, face_region=face * (1.0 - keep),
                             source_identity=src_id, identity_fn=idn.embed,
                             id_weight=id_w, perceptual_weight=perc_w)
        return terms.loss

    lr, steps, warmup, ema = optim
    opt = make_optimizer(lr, total_steps=steps, warmup_steps=min(warmup, steps - 1))
    return make_train_step(loss, opt, ema_decay=functools.partial(warmup_ema_decay,
                                                                  decay=ema)), opt


def _setting(config, variant: str) -> tuple:
    """What the compiled step is specialised on (B, C and D share it; flags are traced)."""
    unroll = rung(config, variant)[0]
    f, t = config.finetune, config.train
    return (unroll, float(t.cond_dropout), float(t.warp_strength), float(f.id_weight),
            float(f.perceptual_weight), int(f.unroll_examples))


def _flags(config, variant: str) -> dict:
    _, use_target, head_rate = rung(config, variant)
    return {"use_target": np.float32(use_target), "head_rate": np.float32(head_rate)}


def _train_batch(data: Data) -> dict:
    tr = data.train
    return {"x": tr["x"], "face_keep": tr["face_keep"], "head_keep": tr["head_keep"]}


def _frozen(enc: Encoders) -> dict:
    return {"generic": enc.generic[1], "id_train": enc.id_train[1]}


def train_model(config, data: Data, enc: Encoders, variant: str, seed: int, workdir: str, *,
                steps: int, init=None, progress=True):
    """The base (``variant="base"``) or one rung fine-tuned from ``init`` (resumable).
    Returns ``(params, wall seconds of this call)``."""
    sec = config.base if variant == "base" else config.finetune
    graphs, params = init_model(config, seed)
    if init is not None:
        params = jax.tree.map(jnp.array, init)
    setting = _setting(config, variant)
    step, opt = _model_step(graphs, (enc.generic[0], enc.id_train[0]), setting,
                            (float(sec.learning_rate), int(steps), int(sec.warmup_steps),
                             float(sec.ema_decay)))
    t0 = time.perf_counter()
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(seed)),
                   BatchIterator(_train_batch(data), sec.batch_size, seed=seed), workdir,
                   steps=steps, ckpt_config={"variant": variant, "setting": list(setting),
                                             "flags": {k: float(v) for k, v in
                                                       _flags(config, variant).items()},
                                             "optim": sec.to_dict(), "steps": steps,
                                             "seed": seed, "model": config.model.to_dict(),
                                             "data": config.data.to_dict()},
                   ckpt_every=steps, extra=(_frozen(enc), _flags(config, variant)),
                   fast_compile=config.fast_compile,
                   progress=progress, label=f"{variant}, seed {seed}")
    return jax.device_get(state.ema_params), time.perf_counter() - t0


def train_base(config, data: Data, enc: Encoders, workdir: str, *, progress=True):
    """The shared base of the ladder (inpainting loss, face masks, no target branch), trained
    once with ``base.seed``; every rung of every seed fine-tunes it."""
    return train_model(config, data, enc, "base", int(config.base.seed),
                       os.path.join(workdir, "base"), steps=int(config.base.steps),
                       progress=progress)


def measure_step_seconds(config, data: Data, enc: Encoders, variant: str, *, warm=2, n=6
                         ) -> float:
    """Seconds per train step of a rung (compiled, median of ``n`` after ``warm``)."""
    sec = config.finetune
    graphs, params = init_model(config, 0)
    step, opt = _model_step(graphs, (enc.generic[0], enc.id_train[0]), _setting(config, variant),
                            (float(sec.learning_rate), 100, 1, float(sec.ema_decay)))
    fn = jit(step, bool(config.fast_compile))
    state = init_train_state(params, opt, jax.random.key(0))
    it = BatchIterator(_train_batch(data), sec.batch_size, seed=0)
    frozen, flags = _frozen(enc), _flags(config, variant)
    times = []
    for i in range(warm + n):
        batch = next(it)
        t0 = time.perf_counter()
        state, m = fn(state, batch, frozen, flags)
        jax.block_until_ready(m["loss"])
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def finetune_steps(config, data: Data, enc: Encoders, workdir: str, log=print) -> dict:
    """Steps per rung for ``finetune.seconds`` of training each (measured once, cached), or
    ``finetune.steps`` each when that is > 0."""
    if int(config.finetune.steps) > 0:
        return {"seconds_per_step": {v: None for v in VARIANTS},
                "steps": {v: int(config.finetune.steps) for v in VARIANTS}}
    def measure():
        per = {v: measure_step_seconds(config, data, enc, v) for v in VARIANTS}
        return {"seconds_per_step": per,
                "steps": {v: max(1, int(float(config.finetune.seconds) / per[v]))
                          for v in VARIANTS}}
    key = {"finetune_steps": config.finetune.to_dict(), "model": config.model.to_dict(),
           "train": config.train.to_dict()}
    out = _io.cached(workdir, key, measure)
    log("fine-tune steps for equal wall time: " + ", ".join(
        f"{v} {out['steps'][v]} ({out['seconds_per_step'][v] * 1e3:.0f} ms/step)"
        for v in VARIANTS))
    return out


# ----------------------------------------------------------------------------------------------
# Swapping and grading
# ----------------------------------------------------------------------------------------------


def start_grid(steps: int, start_t: float, name: str = "start_t") -> np.ndarray:
    """The swap's descending DDIM grid: ``steps`` trailing steps from T, truncated to the times
    ``<= start_t`` when ``start_t < 1`` (REFace's ``target_start_noise_t``: the sampler starts
    from the target noised to the grid's first time, so fewer steps run)."""
    full = np.asarray(trailing(steps, SCHEDULE))
    ts = full if start_t >= 1.0 else full[full <= start_t + 1e-9]
    if len(ts) < 2:
        raise ValueError(f"{name} must leave a step of the {steps}-step grid (its first time "
                         f"below 1 is {float(full[1]):.3f}); got {start_t!r}")
    return ts


@functools.cache
def _swap_sampler(graphs: tuple, enc_graphs: tuple, steps: int, clip: bool, fast: bool,
                  start_t: float = 1.0):
    (unet_g, cond_g), (gen_g, id_g) = graphs, enc_graphs
    ts = start_grid(steps, start_t)

    def run(params, frozen, use_target, target, keep, src, scale, noise):
        gen, idn = nnx.merge(gen_g, frozen["generic"]), nnx.merge(id_g, frozen["id_train"])
        ctx = _context(cond_g, params, _features(gen, idn, src, target, use_target))
        null = nnx.merge(cond_g, params["cond"]).null_context(target.shape[0])
        image = jnp.concatenate([target * keep, keep], axis=-1)
        den = _denoiser(unet_g, params["unet"], {"image": image, "context": ctx})
        guided = dpm.classifier_free_guidance(den, scale, {"image": image, "context": null})
        if clip:  # pixel-space DDIM's x0 clipping (DDPM's clip_sample) at every step
            guided = dpm.clip_x0(guided)
        if start_t < 1.0:  # the whole target, noised to the grid's first time
            noise = diffuse(SCHEDULE, target, jnp.full(target.shape[:1], ts[0]), noise)
        raw = jnp.clip(ddim(guided, noise, ts), -1.0, 1.0)
        return jnp.stack([raw, paste_back(raw, target, keep)], axis=1)

    return jit(run, fast)


def swap(config, enc: Encoders, params, variant: str, target: np.ndarray, keep: np.ndarray,
         src: np.ndarray, seed: int, *, steps: int | None = None, start_t: float | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """Guided DDIM swaps ``(raw, pasted)`` of ``src`` crops into ``target`` outside ``keep``
    (``steps`` / ``start_t``: the config's ``sample`` values by default)."""
    s = config.sample
    steps = int(s.steps if steps is None else steps)
    start_t = float(s.start_t if start_t is None else start_t)
    run = _swap_sampler(model_graphs(config), (enc.generic[0], enc.id_train[0]), steps,
                        bool(s.clip_x0), bool(config.fast_compile), start_t)
    use_target = _flags(config, variant)["use_target"]
    noise = np.random.default_rng(20_000 + seed).standard_normal(target.shape).astype(
        np.float32)
    scale = np.float32(s.cfg_scale)
    frozen = _frozen(enc)
    out = batched(lambda a, b, c, d: run(params, frozen, use_target, a, b, c, scale, d), target,
                  keep, src, noise, size=100)
    return out[:, 0], out[:, 1]


def pair_arrays(data: Data, kind: str) -> dict:
    p = data.pool
    src, tgt = data.pairs["source"], data.pairs["target"]
    s, t = _rows(p, src), _rows(p, tgt)
    return {"target": t["x"], "keep": t[f"{kind}_keep"], "src": face_crop(s, kind),
            "target_face": 1.0 - t["face_keep"], "src_identity": s["identity"],
            "tgt_identity": t["identity"], "src_hair": s["hair_color"],
            "tgt_hair": t["hair_color"], "tgt_hair_mask": t["labels"] == 13}


def grade(config, enc: Encoders, data: Data, kind: str, raw: np.ndarray, out: np.ndarray
          ) -> dict:
    """The report metrics of swapped images (pasted ``out``; ``raw`` before paste-back)."""
    fast = bool(config.fast_compile)
    a = pair_arrays(data, kind)
    q = encode(enc.id_eval, "embed", restrict(out, a["target_face"]), fast)
    src_lab = np.searchsorted(enc.unseen, a["src_identity"])
    tgt_lab = np.searchsorted(enc.unseen, a["tgt_identity"])
    r = retrieval_by_identity(q, enc.centroids, src_lab)
    leak = retrieval_by_identity(q, enc.centroids, tgt_lab)["top1"]
    info = enc.attr_eval[2]
    pred = encode(enc.attr_eval[:2], "regress", out, fast) * info["std"] + info["mean"]
    ref = encode(enc.attr_eval[:2], "regress", a["target"], fast) * info["std"] + info["mean"]
    pose = np.linalg.norm(pred[:, :2] - ref[:, :2], axis=1).mean()
    expr = np.linalg.norm(pred[:, 2:] - ref[:, 2:], axis=1).mean()
    f_fake = encode(enc.attr_eval[:2], "features", out, fast)
    f_real = encode(enc.attr_eval[:2], "features", data.pool["x"], fast)
    kid, _ = dpm.metrics.kid(f_real, f_fake, subset_size=min(len(f_fake), len(f_real)) // 2,
                             num_subsets=int(config.sample.kid_subsets))
    keep = a["keep"][..., 0] > 0.5
    mse = np.array([np.mean((raw[i][keep[i]] - a["target"][i][keep[i]]) ** 2)
                    for i in range(len(raw))])
    bg_psnr = float(np.mean(10 * np.log10(4.0 / np.maximum(mse, 1e-10))))
    res = {"id_top1": r["top1"], "id_top5": r["top5"], "target_leak_top1": leak,
           "pose_err": float(pose), "expr_err": float(expr), "kid": float(kid),
           "bg_psnr": bg_psnr}
    if kind == "head":
        hair = a["tgt_hair_mask"]
        rgb = (out + 1.0) / 2.0
        mean = np.array([rgb[i][hair[i]].mean(0) if hair[i].any() else np.full(3, np.nan)
                         for i in range(len(out))])
        ok = np.isfinite(mean[:, 0])
        res["hair_err_vs_source"] = float(np.linalg.norm(mean[ok] - a["src_hair"][ok],
                                                         axis=1).mean())
        res["hair_err_vs_target"] = float(np.linalg.norm(mean[ok] - a["tgt_hair"][ok],
                                                         axis=1).mean())
    return res


def references(config, enc: Encoders, data: Data) -> dict:
    """Reference rows: the untouched target (no swap: identity stays the target's) and the
    source image itself (the retrieval ceiling of a perfect identity transfer)."""
    out = {}
    for kind in MASKS:
        a = pair_arrays(data, kind)
        out[f"target unchanged ({kind} mask)"] = grade(config, enc, data, kind, a["target"],
                                                        a["target"])
    src = _rows(data.pool, data.pairs["source"])["x"]
    r = grade(config, enc, data, "face", src, src)
    out["source image (ceiling, face)"] = {k: r[k] for k in ("id_top1", "id_top5")}
    return out


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def run_all(config, data: Data, enc: Encoders, workdir: str, *, log=print, progress=True
            ) -> dict:
    seeds = as_tuple(config.seeds)
    ft = finetune_steps(config, data, enc, workdir, log=log)
    models, wall = {}, {}
    base, secs = train_base(config, data, enc, workdir, progress=progress)
    wall["base"] = [secs]
    for seed in seeds:
        for v in VARIANTS:
            models[v, seed], secs = train_model(
                config, data, enc, v, seed, os.path.join(workdir, f"rung_{v}_seed{seed}"),
                steps=int(ft["steps"][v]), init=base, progress=progress)
            wall.setdefault(v, []).append(secs)
    log("trained: " + ", ".join(f"{k} {np.mean(v):.0f} s" for k, v in wall.items()))
    shown = {}
    quality = {}
    t0 = time.perf_counter()
    for kind in MASKS:
        for v in VARIANTS:
            def one(seed, v=v, kind=kind):
                def fn():
                    a = pair_arrays(data, kind)
                    raw, out = swap(config, enc, models[v, seed], v, a["target"], a["keep"],
                                    a["src"], seed)
                    if seed == seeds[0]:
                        shown[v, kind] = out[: int(config.sample.figure_pairs)]
                    return grade(config, enc, data, kind, raw, out)
                return _io.cached(workdir, {"cell": [v, kind, seed],
                                            "sample": config.sample.to_dict()}, fn)
            quality[f"{DESCRIPTION[v]} ({kind} mask)"] = over_seeds(one, seeds)
    log(f"graded ({time.perf_counter() - t0:.0f} s)")
    refs = _io.cached(workdir, {"references": config.sample.to_dict()},
                      lambda: references(config, enc, data))
    return {"quality": quality, "references": refs, "finetune": ft,
            "train_seconds": {k: float(np.mean(v)) for k, v in wall.items()}, "shown": shown}


COLUMNS = [("id_top1", "ID top-1"), ("id_top5", "ID top-5"),
           ("target_leak_top1", "target-ID leak"), ("pose_err", "pose err"),
           ("expr_err", "expr err"), ("kid", "KID"), ("bg_psnr", "bg PSNR (raw)"),
           ("hair_err_vs_source", "hair err vs source"),
           ("hair_err_vs_target", "hair err vs target")]


def _paired(report, a: str, b: str, kind: str, metric: str) -> tuple[float, float]:
    q = report["quality"]
    x = np.array(q[f"{DESCRIPTION[a]} ({kind} mask)"][metric]["values"])
    y = np.array(q[f"{DESCRIPTION[b]} ({kind} mask)"][metric]["values"])
    d = y - x
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else 0.0


def verdict(config, report) -> list[str]:
    lines = []

    def cmp(a, b, kind, metric, higher: bool, claim: str):
        mean, sd = _paired(report, a, b, kind, metric)
        holds = (mean > sd) if higher else (mean < -sd)
        tie = abs(mean) <= sd
        word = "holds" if holds else ("tie (|diff| <= sd)" if tie else "does not hold")
        lines.append(f"{claim}: {b} - {a} = {mean:+.3f} +- {sd:.3f} ({metric}, {kind} mask, "
                     f"paired over seeds): {word}.")

    cmp("A", "B", "face", "id_top1", True, "DDIM-in-training raises identity retrieval")
    cmp("B", "C", "face", "pose_err", False, "the target token lowers pose error")
    cmp("B", "C", "face", "expr_err", False, "the target token lowers expression error")
    cmp("C", "D", "head", "id_top1", True, "mask shuffling makes head swaps work (ID)")
    cmp("C", "D", "head", "hair_err_vs_source", False,
        "mask shuffling transfers the source's hair in head swaps")
    return lines


def tables(config, report) -> str:
    out = []
    for kind in MASKS:
        rows = {k: v for k, v in report["quality"].items() if k.endswith(f"({kind} mask)")}
        cols = [c for c in COLUMNS if c[0] in next(iter(rows.values()))]
        out.append(f"### {kind} swap, {config.sample.num_pairs} unseen-identity pairs, "
                   f"{config.sample.steps} guided DDIM steps (scale {config.sample.cfg_scale:g})"
                   f"\n\n" + markdown_table(rows, cols))
    refs = report["references"]
    out.append("### references (real images, no generation)\n\n" + markdown_table(
        {k: {m: {"mean": v, "sd": 0.0} for m, v in r.items()} for k, r in refs.items()},
        [c for c in COLUMNS if c[0] in ("id_top1", "id_top5", "target_leak_top1", "pose_err",
                                        "expr_err", "kid")]))
    ft = report["finetune"]
    out.append("### training cost (fine-tuning from the shared base, equal wall time)\n\n"
               "| rung | ms / step | steps | network passes / step |\n|---|---|---|---|\n"
               + "\n".join(f"| {DESCRIPTION[v]} | {_ms(ft['seconds_per_step'][v])} | "
                           f"{ft['steps'][v]} | {1 + rung(config, v)[0]} |" for v in VARIANTS))
    return "\n\n".join(out)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f}"


def _figure(path, config, shown: dict, data: Data) -> str:
    k = int(config.sample.figure_pairs)
    rows = []
    for kind in MASKS:
        a = pair_arrays(data, kind)
        rows += [a["src"][:k], a["target"][:k], a["target"][:k] * a["keep"][:k]]
        rows += [shown[v, kind][:k] for v in VARIANTS if (v, kind) in shown]
    _io.save_image_grid(path, np.concatenate(rows), ncol=k)
    return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True,
                       log=print) -> dict:
    """Validates ``config``, trains (or restores) every network, swaps and grades, writes the
    report to ``workdir``."""
    check_config(config)
    t0 = time.perf_counter()
    data = load_data(config)
    enc = train_encoders(config, data, workdir, log=log, progress=progress)
    res = run_all(config, data, enc, workdir, log=log, progress=progress)
    shown = res.pop("shown")
    report = {**res, "sanity": enc.sanity, "encoder_seconds": enc.seconds,
              "config": config.to_dict()}
    report["verdict"] = verdict(config, report)
    figures = []
    if len(shown) == len(VARIANTS) * len(MASKS):
        figures.append(_figure(os.path.join(workdir, "swaps.png"), config, shown, data))
    report["seconds"] = time.perf_counter() - t0
    notes = ["swaps.png, top to bottom (the first pairs, seed "
             f"{as_tuple(config.seeds)[0]}): face swap: source crop, target, masked target, "
             "A, B, C, D; then the same for head swaps.", "",
             "## Verdict", "", *[f"- {v}" for v in report["verdict"]], "",
             "## Sanity (judges on real held-out faces of unseen identities)", "",
             *[f"- {k}: {v:.3f}" for k, v in enc.sanity.items()], "",
             f"Run time: {report['seconds']:.0f} s. Command: `python -m experiments.reface "
             f"--workdir {workdir}`."]
    write_report(workdir, "report", tables(config, report), report, figures=figures,
                 judge="Identity: E_id^eval (nets.FaceEncoder, ArcFace margin "
                 f"{config.encoders.margin:g}, seed 11), trained on the enrolment half of every "
                 "identity's images and never used in training; retrieval among the unseen "
                 "identities' enrolment centroids. Pose / expression error and KID: the "
                 "evaluation attribute regressor (seed 13, enrolment images; L2 between its "
                 "estimates on the swap and on the target). All are in-project proxies.",
                 title="REFace in miniature", notes="\n".join(notes))
    return report


# ----------------------------------------------------------------------------------------------
# A user's own pair: `python -m experiments.reface swap ...`
# ----------------------------------------------------------------------------------------------


def read_face(image: str, labels: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (box-resized) and its CelebAMask-HQ label map (one uint8 id per pixel,
    nearest-resized) as ``(size, size, 3)`` in [-1, 1] and ``(size, size)``."""
    from PIL import Image

    with Image.open(image) as im:
        x = np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BOX), np.float32)
    with Image.open(labels) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"{labels}: a label map must be a single-channel 8-bit image of "
                             f"CelebAMask-HQ ids 0..18; got mode {im.mode!r}")
        lab = np.asarray(im.resize((size, size), Image.Resampling.NEAREST))
    if lab.max() > 18:
        raise ValueError(f"{labels}: label ids must be in 0..18 (CelebAMask-HQ); got "
                         f"{int(lab.max())}")
    return x / 127.5 - 1.0, lab


def swap_files(workdir: str, source: str, source_labels: str, target: str,
               target_labels: str, out: str, *, mask: str = "face", variant: str = "D",
               seed: int | None = None, steps: int = 50, start_t: float = 1.0) -> np.ndarray:
    """Swaps the face (or head) of ``source`` into ``target`` with a finished run's rung
    ``variant`` and writes ``out``; returns the pasted image in [-1, 1]. ``steps`` guided DDIM
    steps (REFace's 50 by default; the run's grading used its ``sample.steps``), starting from
    the target noised to ``start_t`` when below 1 (:func:`start_grid`). The inputs are checked
    before any network is restored."""
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}; got {mask!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise ValueError(f"steps must be an int in 1..1000; got {steps!r}")
    if isinstance(start_t, bool) or not isinstance(start_t, int | float) or not 0 < start_t <= 1:
        raise ValueError(f"start_t must be a number in (0, 1]; got {start_t!r}")
    start_grid(steps, float(start_t))
    config = finished_config(workdir, "reface")
    size = int(config.data.size)
    xs, ls = read_face(source, source_labels, size)
    xt, lt = read_face(target, target_labels, size)
    s = _with_masks({"x": xs[None], "labels": ls[None]})
    t = _with_masks({"x": xt[None], "labels": lt[None]})
    for name, d in (("source", s), ("target", t)):
        if not np.any(d["face_keep"] < 0.5):
            raise ValueError(f"the {name} label map has no face pixel (labels "
                             "1,2,4-12,17 of CelebAMask-HQ)")
    seed = as_tuple(config.seeds)[0] if seed is None else seed
    quiet = lambda *_: None  # noqa: E731
    data = load_data(config)
    enc = train_encoders(config, data, workdir, log=quiet, progress=False)
    ft = finetune_steps(config, data, enc, workdir, log=quiet)
    base, _ = train_base(config, data, enc, workdir, progress=False)
    params, _ = train_model(config, data, enc, variant, seed,
                            os.path.join(workdir, f"rung_{variant}_seed{seed}"),
                            steps=int(ft["steps"][variant]), init=base, progress=False)
    _, pasted = swap(config, enc, params, variant, t["x"], t[f"{mask}_keep"],
                     face_crop(s, mask), seed, steps=steps, start_t=float(start_t))
    from PIL import Image

    Image.fromarray(np.round((pasted[0] + 1.0) * 127.5).clip(0, 255).astype(np.uint8)).save(out)
    return pasted[0]


def _swap_main(argv: Sequence[str]) -> None:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m experiments.reface swap",
        description="Swap the source's face (or head) into the target with a finished run.")
    for name in ("source", "source-labels", "target", "target-labels", "out"):
        ap.add_argument(f"--{name}", required=True)
    ap.add_argument("--mask", default="face", choices=MASKS)
    ap.add_argument("--variant", default="D", choices=VARIANTS)
    ap.add_argument("--steps", type=int, default=50, help="guided DDIM steps (REFace: 50)")
    ap.add_argument("--start-t", type=float, default=1.0,
                    help="start from the target noised to this time in (0, 1] (1: pure noise)")
    ap.add_argument("--workdir", default="runs/reface")
    a = ap.parse_args(list(argv))
    with user_errors():
        for f in (a.source, a.source_labels, a.target, a.target_labels):
            if not os.path.exists(f):
                raise UsageError(f"{f!r} does not exist")
        try:
            swap_files(a.workdir, a.source, a.source_labels, a.target, a.target_labels, a.out,
                       mask=a.mask, variant=a.variant, steps=a.steps, start_t=a.start_t)
        except ValueError as e:  # a user's input: one line, not a traceback
            raise UsageError(str(e)) from None
    print(f"wrote {a.out}")


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["swap"]:
        _swap_main(argv[1:])
        return None
    return run_experiment(argv, "experiments.reface", __doc__.splitlines()[0],
                          train_and_evaluate, validate=check_config)


if __name__ == "__main__":
    main(sys.argv[1:])
