"""ProDiff (Huang et al., ACM MM 2022) in miniature: a 4-step x0-head mel denoiser on a
FastSpeech 2 conditioner, distilled into a 2-step student, against the teacher at 4 and 2 steps,
a 2-step model trained directly with the same compute and an eps-head teacher.

Data: English sentences of a procedural grammar rendered by espeak-ng at 22,050 Hz
(``experiments.speech_corpus``, an LJSpeech-format folder with espeak-ng's own phoneme timing),
80-bin log-mels (n_fft 1024, hop 256, 80-7600 Hz), frame F0 / voicing and energy
(``dpm.data``); 10% of the sentences are held out (never trained on) and graded.

Networks (``nets``): the FastSpeech 2 conditioner (phoneme encoder, duration / pitch / energy
predictors, length regulator) and DiffNet, the non-causal WaveNet denoiser, on ProDiff's
4-entry VP-SDE table (beta_min 0.1, beta_max 40; log-SNR -0.24 .. -12.85):

* the **teacher**: conditioner and x0-head denoiser trained jointly, ``0.5 L1 + 0.5 SSIM`` on
  masked mels plus the variance losses (``dpm.losses.prodiff_teacher_loss``,
  ``fastspeech2_variance_loss``), 4 levels;
* the **student** (one per seed): a copy of the teacher's denoiser distilled 4 -> 2 by the
  progressive-distillation driver (``experiments._distill``) with ProDiff's masked L1
  (``dpm.losses.prodiff_distillation_loss``); the conditioner frozen;
* the **direct 2-step model**: the teacher's recipe on the student's two levels, trained for the
  teacher's steps plus the distillation's compute (5/3 of a train step per distillation step);
* the **eps-head teacher**: the paper's "gradient-based" baseline, 4 levels, L1 on the noise.
The baselines reuse the teacher's trained conditioner (frozen), so rows differ only in the
denoiser. Every row samples with ProDiff's ancestral posterior steps (x0 head; no noise on the
last step) on its grid: teacher@4, student@2, teacher@2 (skip-step), direct@2, eps@4, eps@2.

Metrics (proxies only, no listeners): mel L1 and SSIM against the ground truth of held-out
sentences synthesised with their true durations (so frames align), spectral sharpness (mean
|d mel / d f| and |d mel / d t| as a ratio to the ground truth's: over-smoothing lowers both),
diversity (sd across three noise draws), and the real-time factor on this machine (end to end
from phonemes with predicted durations; acoustic model alone and with Griffin-Lim). Run::

    python -m experiments.prodiff --workdir runs/prodiff
    python -m experiments.prodiff synthesize "Seven grey owls sang at noon." --workdir runs/prodiff
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
from dpm.data import BatchIterator
from dpm.data.audio import MelConfig, griffin_lim, write_wav
from dpm.data.speech import PhonemeVocab, SpeechCorpus, load_ljspeech, phonemize
from dpm.losses import fastspeech2_variance_loss, prodiff_distillation_loss, prodiff_teacher_loss
from dpm.metrics.audio import mel_l1, mel_sharpness, mel_ssim
from dpm.training import (
    fast_compile_options,
    init_train_state,
    make_optimizer,
    make_train_step,
    warmup_ema_decay,
)
from experiments import _io, speech_corpus
from experiments._checks import as_tuple, int_values
from experiments._cli import run_experiment
from experiments._distill import distillation_step, progressive_distillation
from experiments._report import command_flags, markdown_table, over_seeds, save_figure, write_report
from experiments._runner import fit
from solvers import ddpm
from solvers.grids import uniform_time

# ProDiff's table: T = 4 levels of a 5-entry VP-SDE discretisation (spec section 2.5); the
# sampler starts from N(0, I) at level 4 (alpha_bar 2.6e-6) as ProDiff's does
SCHEDULE = dpm.DiscreteVP.from_betas(dpm.make_betas("vpsde", 4, table_size=5))
TEACHER_STEPS = 4
TRAIN_UNITS, DISTILL_UNITS = 3, 5  # denoiser forwards per train / distillation step
CONDITIONERS = {"small": nets.fastspeech2_small, "prodiff": nets.fastspeech2_prodiff}
DENOISERS = {"small": nets.diffnet_small, "prodiff": nets.diffnet_prodiff}
_CONFIG_TYPES = {"conditioner": nets.FastSpeech2Config, "denoiser": nets.DiffNetConfig}


def get_config() -> ml_collections.ConfigDict:
    """The default run: 300 sentences, small networks, 3 seeds, about 30 min on 2 CPU cores."""
    c = ml_collections.ConfigDict()
    c.name = "prodiff"
    c.corpus = ml_collections.ConfigDict(dict(
        root="runs/speech_corpus", num_sentences=300, seed=0, voice="en-us", rate=175,
        test_fraction=0.1))
    c.seeds = (0, 1, 2)
    c.fast_compile = False
    c.conditioner = "small"  # or "prodiff" (the paper's FastSpeech 2: 4 blocks, hidden 256)
    c.denoiser = "small"  # or "prodiff" (the paper's DiffNet: 20 layers, 256 channels)
    # fields of the presets' configs to change, e.g. {"residual_layers": 10}
    c.conditioner_overrides = ml_collections.ConfigDict()
    c.denoiser_overrides = ml_collections.ConfigDict()
    c.teacher = ml_collections.ConfigDict(dict(
        train_steps=900, batch_size=16, learning_rate=1e-3, warmup_steps=50, ema_decay=0.995,
        l1_weight=0.5, ssim_weight=0.5))
    c.distill = ml_collections.ConfigDict(dict(
        train_steps=180, batch_size=16, learning_rate=2e-4, clip_norm=1.0))
    c.direct = True  # the 2-step model trained from data with the same compute
    c.eps_head = True  # the eps-head teacher
    c.eval = ml_collections.ConfigDict(dict(griffin_lim_iters=32, figure_sentence=0))
    return c


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field."""
    k = config.corpus
    int_values("config.corpus.num_sentences", k.num_sentences, 4)
    int_values("config.corpus.seed", k.seed, 0)
    if not 0 < k.test_fraction < 1:
        raise ValueError(f"config.corpus.test_fraction must be in (0, 1); "
                         f"got {k.test_fraction!r}")
    int_values("config.seeds", config.seeds, 0)
    for name, table in (("conditioner", CONDITIONERS), ("denoiser", DENOISERS)):
        if config[name] not in table:
            raise ValueError(f"config.{name} must be one of {sorted(table)}; "
                             f"got {config[name]!r}")
        fields = {f.name for f in dataclasses.fields(_CONFIG_TYPES[name])}
        bad = sorted(set(config[f"{name}_overrides"]) - fields)
        if bad:
            raise ValueError(f"config.{name}_overrides has unknown fields {bad}; "
                             f"expected some of {sorted(fields)}")
    for sec in ("teacher", "distill"):
        s = config[sec]
        int_values(f"config.{sec}.train_steps", s.train_steps, 1)
        int_values(f"config.{sec}.batch_size", s.batch_size, 1)
        if s.batch_size % jax.device_count():
            raise ValueError(f"config.{sec}.batch_size must be a multiple of the "
                             f"{jax.device_count()} devices; got {s.batch_size!r}")
        if not 0 < s.learning_rate < 1:
            raise ValueError(f"config.{sec}.learning_rate must be in (0, 1); "
                             f"got {s.learning_rate!r}")
    if not 0 <= config.teacher.ema_decay < 1:
        raise ValueError(f"config.teacher.ema_decay must be in [0, 1); "
                         f"got {config.teacher.ema_decay!r}")
    int_values("config.eval.griffin_lim_iters", config.eval.griffin_lim_iters, 1)


# ----------------------------------------------------------------------------------------------
# Data: the corpus, its normalisation, padded batches
# ----------------------------------------------------------------------------------------------


class Data:
    """The train / held-out split as padded arrays, normalised with train statistics: mels
    per bin to [-1, 1] (DiffSpeech's spec_min / spec_max), log-F0 and energy standardised."""

    def __init__(self, corpus: SpeechCorpus, test_fraction: float, seed: int):
        train, test = corpus.split(test_fraction, seed)
        self.vocab, self.mel_config = corpus.vocab, corpus.mel_config
        self.num_train, self.num_test = len(train), len(test)
        raw = corpus.padded()  # one shape for every batch: one compiled step
        P, F = raw["phonemes"].shape[1], raw["mel"].shape[1]
        tr, te = train.padded(P, F), test.padded(P, F)
        fm = tr["frame_mask"] > 0
        mels = tr["mel"][fm]
        self.mel_lo, self.mel_hi = mels.min(0), mels.max(0)
        voiced = fm & (tr["uv"] < 0.5)
        self.f0_mean, self.f0_std = float(tr["log_f0"][voiced].mean()), float(
            tr["log_f0"][voiced].std() + 1e-6)
        self.e_mean, self.e_std = float(tr["energy"][fm].mean()), float(
            tr["energy"][fm].std() + 1e-6)
        self.train, self.test = self._normalise(tr), self._normalise(te)
        self.test_texts = list(test.texts)
        self.max_phonemes, self.max_frames = P, F

    def _normalise(self, d: dict) -> dict:
        fm = d["frame_mask"]
        out = dict(d)
        out["mel"] = (self.norm_mel(d["mel"]) * fm[..., None]).astype(np.float32)
        out["log_f0"] = ((d["log_f0"] - self.f0_mean) / self.f0_std * fm).astype(np.float32)
        out["energy"] = ((d["energy"] - self.e_mean) / self.e_std * fm).astype(np.float32)
        return out

    def norm_mel(self, mel):
        return np.clip(2.0 * (mel - self.mel_lo) / (self.mel_hi - self.mel_lo) - 1.0, -1.0, 1.0)

    def denorm_mel(self, mel):
        return (np.asarray(mel) + 1.0) / 2.0 * (self.mel_hi - self.mel_lo) + self.mel_lo

    def batches(self, batch_size: int, seed: int) -> BatchIterator:
        return BatchIterator(self.train, batch_size, seed=seed)


def load_data(config) -> Data:
    """Builds (or reuses) the rendered corpus and its feature cache; returns the split."""
    k = config.corpus
    folder = speech_corpus.build(k.root, num_sentences=k.num_sentences, seed=k.seed,
                                 voice=k.voice, rate=k.rate)
    cache = os.path.join(folder, "features.npz")
    mel_config = MelConfig()
    if os.path.exists(cache):
        corpus = SpeechCorpus.load_npz(cache, mel_config=mel_config)
    else:
        corpus = load_ljspeech(folder, mel_config=mel_config, voice=k.voice)
        corpus.save_npz(cache)
    return Data(corpus, k.test_fraction, k.seed)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


def conditioner_config(config, data: Data):
    # pitch / energy embeddings quantise the standardised values over +-4 sd
    return CONDITIONERS[config.conditioner](
        len(data.vocab), **{"log_f0_range": (-4.0, 4.0), "energy_range": (-4.0, 4.0),
                            **config.conditioner_overrides.to_dict()})


def denoiser_config(config, data: Data, cond_dim: int):
    return DENOISERS[config.denoiser](cond_dim=cond_dim, **config.denoiser_overrides.to_dict())


def _cond_apply(graphdef, params, batch, *, max_frames, teacher_forced=True, key=None,
                durations=None):
    net = nnx.merge(graphdef, params)
    if teacher_forced:
        return net(batch["phonemes"], batch["phone_mask"], max_frames=max_frames,
                   durations=batch["durations"], log_f0=batch["log_f0"],
                   energy=batch["energy"], key=key)
    return net(batch["phonemes"], batch["phone_mask"], max_frames=max_frames,
               durations=durations, key=key)


def _den_apply(graphdef, params, x, noise_level, cond):
    return nnx.merge(graphdef, params)(x, noise_level, cond)


def make_den(graphdef, params, head: str) -> dpm.Denoiser:
    return dpm.network_denoiser(Partial(_den_apply, graphdef, params), SCHEDULE, head)


class Nets:
    """The graph definitions of the conditioner and the denoiser (shared by every model)."""

    def __init__(self, config, data: Data):
        ccfg = conditioner_config(config, data)
        self.cond_graph, self.cond_init = nets.init_params(nets.FastSpeech2, ccfg, seed=0)
        dcfg = denoiser_config(config, data, ccfg.hidden)
        self.den_graph, self.den_init = nets.init_params(nets.DiffNet, dcfg, seed=0)
        self.max_frames, self.bins = data.max_frames, data.mel_config.n_mels

    def condition(self, cparams, batch, *, key=None, teacher_forced=True, durations=None):
        return _cond_apply(self.cond_graph, cparams, batch, max_frames=self.max_frames,
                           teacher_forced=teacher_forced, key=key, durations=durations)

    def den(self, dparams, head: str) -> dpm.Denoiser:
        return make_den(self.den_graph, dparams, head)


def _mel_batch(batch, out) -> dict:
    return {"x": batch["mel"], "mask": batch["frame_mask"],
            "cond": {"cond": out["cond"], "mask": batch["frame_mask"]}}


def _ckpt(config, data: Data, **kw) -> dict:
    return {"corpus": config.corpus.to_dict(), "conditioner": config.conditioner,
            "denoiser": config.denoiser,
            "conditioner_overrides": config.conditioner_overrides.to_dict(),
            "denoiser_overrides": config.denoiser_overrides.to_dict(), "vocab": len(data.vocab),
            "frames": data.max_frames, **kw}


def train_teacher(config, data: Data, n: Nets, workdir: str, *, progress=True):
    """Conditioner + x0-head denoiser, jointly (ProDiff's teacher). Returns EMA params
    ``{"conditioner", "denoiser"}``."""
    t = config.teacher
    mel_loss = prodiff_teacher_loss(lambda p: n.den(p, "x0"), steps=TEACHER_STEPS,
                                    l1_weight=t.l1_weight, ssim_weight=t.ssim_weight)

    def loss(params, batch, key):
        k1, k2 = jax.random.split(key)
        out = n.condition(params["conditioner"], batch, key=k1)
        var = fastspeech2_variance_loss(out, batch)["total"]
        return mel_loss(params["denoiser"], _mel_batch(batch, out), k2) + var

    params = {"conditioner": n.cond_init, "denoiser": n.den_init}
    return _train(config, loss, params, data, os.path.join(workdir, "teacher"), t.train_steps,
                  ckpt=_ckpt(config, data, head="x0", steps=TEACHER_STEPS), label="teacher",
                  progress=progress)


def train_denoiser_only(config, data: Data, n: Nets, cond_params, workdir: str, *, head: str,
                        levels: int, train_steps: int, name: str, progress=True):
    """A denoiser on the frozen conditioner ``cond_params`` (the baselines). Returns its EMA
    parameters."""
    t = config.teacher
    mel_loss = prodiff_teacher_loss(lambda p: n.den(p, head), steps=levels,
                                    l1_weight=t.l1_weight, ssim_weight=t.ssim_weight)

    def loss(params, batch, key, frozen):
        out = n.condition(jax.lax.stop_gradient(frozen), batch)
        return mel_loss(params, _mel_batch(batch, out), key)

    return _train(config, loss, n.den_init, data, os.path.join(workdir, name), train_steps,
                  ckpt=_ckpt(config, data, head=head, steps=levels), label=name,
                  progress=progress, extra=(cond_params,))


def _train(config, loss, params, data, workdir, steps, *, ckpt, label, progress, extra=()):
    t = config.teacher
    opt = make_optimizer(t.learning_rate, total_steps=steps,
                         warmup_steps=min(t.warmup_steps, steps - 1), clip_norm=1.0)
    step = make_train_step(loss, opt,
                           ema_decay=functools.partial(warmup_ema_decay, decay=t.ema_decay))
    params = jax.tree.map(jnp.array, params)  # a copy: fit donates the state's buffers
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(0)),
                   data.batches(t.batch_size, 0), workdir, steps=steps,
                   ckpt_config={**ckpt, "train_steps": steps,
                                "teacher": {k: t[k] for k in t}},
                   ckpt_every=max(1, steps // 2), extra=extra, fast_compile=config.fast_compile,
                   progress=progress, label=label)
    return jax.device_get(state.ema_params)


@functools.cache
def _student_step(n: Nets, train_steps: int, learning_rate: float, clip_norm: float):
    # one step function (so one compiled program) for every seed's student
    inner = prodiff_distillation_loss(lambda p: n.den(p, "x0"))

    def loss(params, batch, key, teacher_params, student_steps):
        out = n.condition(jax.lax.stop_gradient(teacher_params["conditioner"]), batch)
        return inner(params["denoiser"], _mel_batch(batch, out), key,
                     teacher_params["denoiser"], student_steps)

    return distillation_step(loss, train_steps, learning_rate=learning_rate,
                             clip_norm=clip_norm)


def distill_student(config, data: Data, n: Nets, teacher: dict, seed: int, workdir: str, *,
                    progress=True):
    """The 2-step student of ``seed``: one round 4 -> 2 of the halving driver; the conditioner
    is the teacher's, frozen (its copy in the student receives no gradient). Returns the
    student's denoiser parameters."""
    d = config.distill
    step, opt = _student_step(n, d.train_steps, d.learning_rate, d.clip_norm)
    students = progressive_distillation(
        step, opt, teacher, lambda r: data.batches(d.batch_size, 1000 * seed + r), workdir,
        start_steps=TEACHER_STEPS, end_steps=TEACHER_STEPS // 2, steps_per_round=d.train_steps,
        seed=seed, ckpt_config=_ckpt(config, data, distill={k: d[k] for k in d}),
        fast_compile=config.fast_compile, progress=progress, label=f"student seed {seed}")
    return students[TEACHER_STEPS // 2]["denoiser"]


def direct_steps(config) -> int:
    """Train steps of the directly trained 2-step model: the teacher's plus the distillation's
    compute in train-step units (batch sizes accounted)."""
    d, t = config.distill, config.teacher
    ratio = DISTILL_UNITS / TRAIN_UNITS * d.batch_size / t.batch_size
    return int(t.train_steps + round(d.train_steps * ratio))


# ----------------------------------------------------------------------------------------------
# Synthesis
# ----------------------------------------------------------------------------------------------


@functools.cache
def _synth_fn(n: Nets, head: str, steps: int, true_durations: bool, fast: bool):
    """``run(cparams, dparams, batch, key) -> (mel (B, F, 80), frame_mask (B, F))``: phonemes
    -> conditioner -> ``steps`` ancestral x0 steps, one jitted function of padded batches.
    Every head's x0 is clipped to the data range [-1, 1] (DiffSpeech's ``clip_denoised``; the
    eps head's x0 = (z - sigma eps) / alpha divides by alpha = 1.6e-3 at the first level)."""
    ts = uniform_time(steps, t_end=0.0)

    def run(cparams, dparams, batch, key):
        out = n.condition(cparams, batch, teacher_forced=False,
                          durations=batch["durations"] if true_durations else None)
        mask = out["frame_mask"]
        den = dpm.clip_x0(n.den(dparams, head)).with_cond({"cond": out["cond"], "mask": mask})
        k1, k2 = jax.random.split(key)
        z = jax.random.normal(k1, mask.shape + (n.bins,)) * mask[..., None]
        mel = ddpm(den, z, ts, key=k2) * mask[..., None]
        return mel, mask

    opts = fast_compile_options() if fast else None
    return jax.jit(run, compiler_options=opts) if opts else jax.jit(run)


def synthesize(config, n: Nets, model, head: str, steps: int, batch: dict, seed: int, *,
               true_durations=True):
    cparams, dparams = model
    mel, mask = _synth_fn(n, head, steps, true_durations, bool(config.fast_compile))(
        cparams, dparams, {k: jnp.asarray(v) for k, v in batch.items()}, jax.random.key(seed))
    return np.asarray(mel), np.asarray(mask)


def _metrics(mel, mask, ref, ref_mask) -> dict:
    m = mask * ref_mask
    sharp, sharp_ref = mel_sharpness(mel, m), mel_sharpness(ref, m)
    return {"l1": float(np.mean(mel_l1(mel, ref, m))),
            "ssim": float(np.mean(mel_ssim(mel, ref, m, data_range=2.0))),
            "sharp_f": float(np.mean(sharp["df"]) / np.mean(sharp_ref["df"])),
            "sharp_t": float(np.mean(sharp["dt"]) / np.mean(sharp_ref["dt"]))}


def evaluate_row(config, data: Data, n: Nets, models_for_seed, head: str, steps: int) -> dict:
    """``over_seeds`` cells of the metrics of a row, plus its diversity (sd across three noise
    draws of seed 0's network, mean over real frames and bins) and real-time factors."""
    test = data.test
    batch = {k: test[k] for k in ("phonemes", "phone_mask", "durations")}

    def one(seed):
        mel, mask = synthesize(config, n, models_for_seed(seed), head, steps, batch, seed)
        return _metrics(mel, mask, test["mel"], test["frame_mask"])

    cells = over_seeds(one, as_tuple(config.seeds))
    draws = np.stack([synthesize(config, n, models_for_seed(as_tuple(config.seeds)[0]), head,
                                 steps, batch, 100 + i)[0] for i in range(3)])
    fm = test["frame_mask"][..., None]
    cells["diversity"] = float((draws.std(0) * fm).sum() / (fm.sum() * draws.shape[-1]))
    cells.update(real_time_factor(config, data, n, models_for_seed(as_tuple(config.seeds)[0]),
                                  head, steps))
    return cells


def real_time_factor(config, data: Data, n: Nets, model, head: str, steps: int) -> dict:
    """Wall time of synthesising the held-out sentences end to end (predicted durations) over
    the audio's duration: the acoustic model alone (best of 3, compiled beforehand) and with
    Griffin-Lim on every sentence."""
    test = data.test
    batch = {k: test[k] for k in ("phonemes", "phone_mask", "durations")}
    synthesize(config, n, model, head, steps, batch, 0, true_durations=False)  # compile
    best = np.inf
    for r in range(3):
        t0 = time.perf_counter()
        mel, mask = synthesize(config, n, model, head, steps, batch, r, true_durations=False)
        best = min(best, time.perf_counter() - t0)
    frames = mask.sum(1).astype(int)
    hop, sr = data.mel_config.hop_length, data.mel_config.sample_rate
    seconds = float(frames.sum() * hop / sr)
    gl = _griffin_lim_fn(data, config.eval.griffin_lim_iters)
    gl(mel[0])  # compile (one padded length for every sentence)
    t0 = time.perf_counter()
    for i in range(len(mel)):
        np.asarray(gl(mel[i]))
    t_gl = time.perf_counter() - t0
    return {"rtf": best / max(seconds, 1e-9), "rtf_with_griffin_lim": (best + t_gl) / max(
        seconds, 1e-9)}


@functools.cache
def _griffin_lim_fn(data: Data, iters: int):
    """Jitted: normalised mel (F, n_mels) -> waveform, compiled once per padded length."""
    lo, hi = jnp.asarray(data.mel_lo), jnp.asarray(data.mel_hi)

    def run(mel_norm):
        return griffin_lim((mel_norm + 1.0) / 2.0 * (hi - lo) + lo, data.mel_config,
                           n_iter=iters)
    return jax.jit(run)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

TEACHER4, STUDENT2, TEACHER2 = "teacher @ 4", "student (ProDiff) @ 2", "teacher @ 2 (skip-step)"
DIRECT2, EPS4, EPS2 = "direct 2-step model @ 2", "eps-head teacher @ 4", "eps-head teacher @ 2"
COLUMNS = [("l1", "mel L1 (lower better)"), ("ssim", "SSIM (higher better)"),
           ("sharp_f", "sharpness d/df vs GT"), ("sharp_t", "sharpness d/dt vs GT"),
           ("diversity", "diversity (sd over draws)"), ("rtf", "RTF acoustic"),
           ("rtf_with_griffin_lim", "RTF + Griffin-Lim")]


def _paired(a: dict, b: dict, key: str) -> tuple[float, float]:
    d = np.asarray(a[key]["values"]) - np.asarray(b[key]["values"])
    return float(d.mean()), float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def verdict(q: dict) -> list[str]:
    """The paper's headline, part by part (differences paired over seeds, +- 1 se; "beyond
    noise" = beyond 2 se): (1) student@2 close to teacher@4 on L1 and SSIM (within noise, or
    within a quarter of the skip-step teacher's gap), (2) student@2 sharper than teacher@2 and
    the direct 2-step model, (3) the eps-head teacher worst at few steps, (4) speed."""
    out = []
    S, T4, T2 = q[STUDENT2], q[TEACHER4], q[TEACHER2]
    for key, name in (("l1", "mel L1"), ("ssim", "SSIM")):
        ds, ses = _paired(S, T4, key)
        dt, set_ = _paired(T2, T4, key)
        close = abs(ds) <= 2 * ses or abs(ds) <= 0.25 * abs(dt)
        out.append(f"1. {name}, student@2 minus teacher@4: {ds:+.4f} ± {ses:.2g}; teacher@2 "
                   f"minus teacher@4: {dt:+.4f} ± {set_:.2g}. Student close to teacher@4: "
                   + ("holds" if close else "does not hold"))
    for other in (TEACHER2, DIRECT2):
        if other in q:
            parts = []
            for key in ("sharp_f", "sharp_t"):
                d, se = _paired(S, q[other], key)
                parts.append(f"{key} {d:+.3f} ± {se:.2g} ("
                             + ("sharper" if d > 2 * se else "not sharper") + ")")
            out.append(f"2. student@2 minus {other}: " + "; ".join(parts))
    if EPS2 in q:
        worst = max(q, key=lambda r: q[r]["l1"]["mean"])
        out.append(f"3. worst mel L1 of all rows: {worst} ({q[worst]['l1']['mean']:.4f}); "
                   f"eps-head @ 2 {q[EPS2]['l1']['mean']:.4f}, @ 4 {q[EPS4]['l1']['mean']:.4f}"
                   ". eps-head worst at few steps: "
                   + ("holds" if worst in (EPS2, EPS4) else "does not hold"))
    out.append(f"4. real-time factor on this machine (acoustic model): student@2 "
               f"{S['rtf']:.4f}, teacher@4 {T4['rtf']:.4f} ({T4['rtf'] / S['rtf']:.2f}x); with "
               f"Griffin-Lim {S['rtf_with_griffin_lim']:.3f} vs "
               f"{T4['rtf_with_griffin_lim']:.3f}")
    return out


def _mel_figure(path, data: Data, mels: dict, index: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_frames = int(data.test["frame_mask"][index].sum())
    fig, axes = plt.subplots(len(mels), 1, figsize=(6, 1.3 * len(mels)), sharex=True)
    for ax, (name, mel) in zip(axes, mels.items(), strict=True):
        ax.imshow(mel[index, :n_frames].T, origin="lower", aspect="auto", vmin=-1, vmax=1,
                  cmap="magma")
        ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        ax.set_yticks([])
    axes[-1].set_xlabel("frame (11.6 ms)")
    fig.suptitle(f"held-out: \"{data.test_texts[index]}\"", fontsize=8)
    return save_figure(fig, path)


def train_all(config, data: Data, n: Nets, workdir: str, *, progress=True, secs=None):
    """Every network (restored where trained): ``{"teacher", "students", "direct", "eps"}``."""
    secs = {} if secs is None else secs
    t0 = time.perf_counter()
    teacher = train_teacher(config, data, n, workdir, progress=progress)
    secs["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    students = {s: distill_student(config, data, n, teacher, s,
                                   os.path.join(workdir, f"student_seed{s}"), progress=progress)
                for s in as_tuple(config.seeds)}
    secs["students"] = time.perf_counter() - t0
    out = {"teacher": teacher, "students": students}
    t0 = time.perf_counter()
    if config.direct:
        out["direct"] = train_denoiser_only(
            config, data, n, teacher["conditioner"], workdir, head="x0",
            levels=TEACHER_STEPS // 2, train_steps=direct_steps(config), name="direct",
            progress=progress)
    secs["direct"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if config.eps_head:
        out["eps"] = train_denoiser_only(
            config, data, n, teacher["conditioner"], workdir, head="eps", levels=TEACHER_STEPS,
            train_steps=config.teacher.train_steps, name="teacher_eps", progress=progress)
    secs["eps"] = time.perf_counter() - t0
    return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True,
                       log=print) -> dict:
    """Validates ``config``, builds the corpus, trains (or restores) every network, evaluates
    on the held-out sentences and writes the report to ``workdir``."""
    check_config(config)
    t_start = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    secs = {}
    data = load_data(config)
    secs["corpus"] = time.perf_counter() - t_start
    log(f"corpus: {data.num_train} train / {data.num_test} held-out sentences, "
        f"{len(data.vocab)} symbols, {data.max_frames} frames max ({secs['corpus']:.0f} s)")
    n = Nets(config, data)
    m = train_all(config, data, n, workdir, progress=progress, secs=secs)
    teacher = m["teacher"]
    tc = teacher["conditioner"]

    t0 = time.perf_counter()
    rows = {TEACHER4: (lambda s: (tc, teacher["denoiser"]), "x0", TEACHER_STEPS),
            STUDENT2: (lambda s: (tc, m["students"][s]), "x0", 2),
            TEACHER2: (lambda s: (tc, teacher["denoiser"]), "x0", 2)}
    if "direct" in m:
        rows[DIRECT2] = (lambda s: (tc, m["direct"]), "x0", 2)
    if "eps" in m:
        rows[EPS4] = (lambda s: (tc, m["eps"]), "eps", TEACHER_STEPS)
        rows[EPS2] = (lambda s: (tc, m["eps"]), "eps", 2)
    q = {}
    for name, (models, head, steps) in rows.items():
        t1 = time.perf_counter()
        q[name] = evaluate_row(config, data, n, models, head, steps)
        log(f"  {name}: L1 {q[name]['l1']['mean']:.4f} SSIM {q[name]['ssim']['mean']:.4f} "
            f"({time.perf_counter() - t1:.0f} s)")
    secs["evaluation"] = time.perf_counter() - t0
    test = data.test
    batch = {k: test[k] for k in ("phonemes", "phone_mask", "durations")}
    first = as_tuple(config.seeds)[0]
    mels = {"ground truth": test["mel"]}
    for name in (TEACHER4, STUDENT2, TEACHER2):
        models, head, steps = rows[name]
        mels[name] = synthesize(config, n, models(first), head, steps, batch, first)[0]
    fig = _mel_figure(os.path.join(workdir, "mels.png"), data, mels,
                      min(config.eval.figure_sentence, data.num_test - 1))
    secs["total"] = time.perf_counter() - t_start
    report = {"config": config.to_dict(), "quality": q, "seconds": secs,
              "compute": {"teacher_train_steps": config.teacher.train_steps,
                          "distill_steps": config.distill.train_steps,
                          "direct_train_steps": direct_steps(config) if config.direct else 0,
                          "forward_units": {"train_step": TRAIN_UNITS,
                                            "distill_step": DISTILL_UNITS}},
              "data": {"train": data.num_train, "held_out": data.num_test,
                       "symbols": len(data.vocab), "max_frames": data.max_frames}}
    report["verdict"] = verdict(q)
    flags = command_flags(config, get_config())
    c = report["compute"]
    notes = ["## Verdict", ""] + [f"- {v}" for v in report["verdict"]] + [
        "", f"Training compute: teacher {c['teacher_train_steps']} steps at batch "
        f"{config.teacher.batch_size} (conditioner and denoiser); each student "
        f"{c['distill_steps']} distillation steps at batch {config.distill.batch_size} "
        f"({DISTILL_UNITS}/{TRAIN_UNITS} of a train step each); the direct 2-step model "
        f"{c['direct_train_steps']} steps = teacher + one distillation; the eps-head teacher as "
        "many steps as the teacher. Seeds vary the student's distillation (data order, levels, "
        "noise) and every row's sampling noise; the teacher and the baselines are trained once.",
        "", "Sampling: ancestral posterior steps on ProDiff's 4-level table (2 levels: its "
        "levels 2 and 4), x0 of every head clipped to [-1, 1] (DiffSpeech's clip_denoised).",
        "", "Proxy metrics only: no listening test (MOS) is claimed. Mel L1 / SSIM in the "
        "normalised mel space ([-1, 1] per bin), against the ground truth of held-out "
        "sentences synthesised with their true durations; RTF end to end from phonemes with "
        "predicted durations on this machine (2 CPU cores), Griffin-Lim "
        f"({config.eval.griffin_lim_iters} iterations) standing in for a neural vocoder.",
        "", "Command: `python -m experiments.prodiff --workdir runs/prodiff"
        + (f" {flags}`" if flags else "`"),
        "", "Run time: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
        + " (restored networks cost nothing)."]
    write_report(workdir, "report", markdown_table(q, COLUMNS, row_header="model (NFE)"),
                 report, [fig], judge="No judge network: every metric compares synthesised "
                 "mels with the held-out ground truth (proxies for listening tests).",
                 title="ProDiff in miniature (espeak-ng speech, 2-step distilled mel "
                 "denoiser)", notes="\n".join(notes))
    return report


# ----------------------------------------------------------------------------------------------
# Command line: the experiment, or `synthesize "text"`
# ----------------------------------------------------------------------------------------------


def encode_text(text: str, vocab: PhonemeVocab, voice: str) -> np.ndarray:
    """Phoneme ids of ``text`` (espeak-ng), refusing empty text and unknown symbols."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text must be a non-empty string; got {text!r}")
    return np.asarray(vocab.encode(phonemize(text, voice=voice), item=repr(text)), np.int32)


def synthesize_text(config, workdir: str, text: str, out_dir: str, *, steps: int = 2,
                    seed: int = 0, progress=True) -> dict:
    """Text -> phonemes -> conditioner -> the 2-step student (or the teacher with
    ``steps=4``) -> mel; writes ``mel.png`` and ``speech_griffin_lim.wav`` to ``out_dir``."""
    if steps not in (2, 4):
        raise ValueError(f"steps must be 2 (the student) or 4 (the teacher); got {steps!r}")
    check_config(config)
    data = load_data(config)
    n = Nets(config, data)
    teacher = train_teacher(config, data, n, workdir, progress=progress)  # restored if trained
    if steps == 2:
        s0 = as_tuple(config.seeds)[0]
        dparams = distill_student(config, data, n, teacher, s0,
                                  os.path.join(workdir, f"student_seed{s0}"), progress=progress)
    else:
        dparams = teacher["denoiser"]
    ids = encode_text(text, data.vocab, config.corpus.voice)
    P = data.max_phonemes
    if len(ids) > P:
        raise ValueError(f"text has {len(ids)} phonemes; the model's batches hold at most {P}")
    batch = {"phonemes": np.zeros((1, P), np.int32), "phone_mask": np.zeros((1, P), np.float32),
             "durations": np.zeros((1, P), np.int32)}
    batch["phonemes"][0, :len(ids)] = ids
    batch["phone_mask"][0, :len(ids)] = 1.0
    mel, mask = synthesize(config, n, (teacher["conditioner"], dparams), "x0", steps,
                           batch, seed, true_durations=False)
    frames = int(mask[0].sum())
    if frames == 0:
        raise ValueError(f"the duration predictor gave no frames for {text!r}")
    os.makedirs(out_dir, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2))
    ax.imshow(mel[0, :frames].T, origin="lower", aspect="auto", vmin=-1, vmax=1, cmap="magma")
    ax.set_title(f"{text} ({steps}-step {'student' if steps == 2 else 'teacher'})", fontsize=8)
    png = save_figure(fig, os.path.join(out_dir, "mel.png"))
    wav = np.asarray(_griffin_lim_fn(data, config.eval.griffin_lim_iters)(mel[0, :frames]))
    wav_path = os.path.join(out_dir, "speech_griffin_lim.wav")
    write_wav(wav_path, wav, data.mel_config.sample_rate)
    _io.write_json(os.path.join(out_dir, "synthesis.json"), {
        "text": text, "steps": steps, "frames": frames, "vocoder": "Griffin-Lim (no neural "
        "vocoder ships offline)", "mel": png, "wav": wav_path})
    return {"mel": png, "wav": wav_path, "frames": frames}


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synthesize":
        import argparse

        p = argparse.ArgumentParser(prog="python -m experiments.prodiff synthesize",
                                    description="text -> mel (PNG) and a Griffin-Lim wav")
        p.add_argument("text")
        p.add_argument("--workdir", default="runs/prodiff")
        p.add_argument("--out", default=None, help="output folder (default WORKDIR/synthesis)")
        p.add_argument("--steps", type=int, choices=(2, 4), default=2)
        p.add_argument("--seed", type=int, default=0)
        a = p.parse_args(argv[1:])
        out = synthesize_text(get_config(), a.workdir, a.text,
                              a.out or os.path.join(a.workdir, "synthesis"), steps=a.steps,
                              seed=a.seed)
        print(f"mel: {out['mel']}\nwav (Griffin-Lim): {out['wav']}")
        return out
    return run_experiment(argv, "experiments.prodiff", __doc__.splitlines()[0],
                          train_and_evaluate, validate=check_config)


if __name__ == "__main__":
    main(sys.argv[1:])
