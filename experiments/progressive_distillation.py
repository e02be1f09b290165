"""Progressive distillation (Salimans & Ho, ICLR 2022) in miniature: 8x8 digits, a 256-step
DDIM teacher distilled 256 -> 128 -> ... -> 1, against the teacher and an equal-compute model
sampled at the same number of steps.

Every network is the same class-conditional tiny U-Net on the continuous cosine log-SNR
schedule (log-SNR in [-20, 20], the paper's), trained on the digits train split only
(``split_seed = 0``, the zoo's):

* the **teacher**: x0-head (the paper's CIFAR-10 choice), truncated-SNR weighting, EMA;
* the **students**: the halving driver (``experiments._distill``) with the paper's round
  recipe (student = copy of its teacher, fresh Adam, learning rate annealed linearly to 0 in
  each round, no EMA, gradients clipped to 1), ``config.distill.steps_per_round`` updates per
  halving, one cascade per seed;
* the **equal-compute baseline**: the same U-Net trained from scratch (the teacher's recipe)
  for the teacher's steps plus the cascade's compute in train-step units (a distillation step
  costs two teacher forwards plus a student forward and backward, 5 forward-units against 3 for
  a train step);
* the **ablations** (one cascade each): an eps-head teacher and student (the paper: eps
  students collapse at 1-2 steps); SNR and SNR + 1 weightings instead of truncated SNR.

All are sampled with DDIM (eta 0, x0 clipped to [-1, 1], the paper's evaluation sampler) on the
uniform grid of N steps, labels 0..9 in turn, and graded against the held-out test split by the
zoo's judge classifier (trained on the test split; the ``primary`` classifier is not used:
nothing is tuned on the judge). Seed ``s`` is the main cascade's training seed and the sampling
noise of every row; the teacher, baseline and ablations are trained once. Run::

    python -m experiments.progressive_distillation --workdir runs/progressive_distillation
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

import dpm
import nets
from dpm.data import BatchIterator
from dpm.losses import WEIGHTINGS, denoising_loss, progressive_distillation_loss
from dpm.metrics import frechet_distance_from_features, hfer
from dpm.training import (
    fast_compile_options,
    init_train_state,
    make_optimizer,
    make_train_step,
    warmup_ema_decay,
)
from experiments import _io
from experiments._checks import as_tuple, int_values
from experiments._cli import run_experiment
from experiments._distill import distillation_step, halving_schedule, progressive_distillation
from experiments._model import build_unet, make_denoiser
from experiments._report import command_flags, markdown_table, over_seeds, plot_curves, write_report
from experiments._runner import fit
from experiments._zoo import (
    digits_config,
    digits_data,
    evaluate,
    judge_description,
    judges,
    report_fields,
)
from solvers import ddim
from solvers.grids import uniform_time

HEADS = ("x0", "v", "both", "eps")
# name -> (head of teacher and student, distillation weighting), as in dpm.losses.log_weight:
# "eps" = SNR, "v" = SNR + 1, "truncated_snr" = max(SNR, 1)
ABLATIONS = {"eps_head": ("eps", "truncated_snr"), "snr_weight": ("x0", "eps"),
             "snr_plus_one_weight": ("x0", "v")}
WEIGHT_NAMES = {"truncated_snr": "max(SNR, 1)", "v": "SNR + 1", "eps": "SNR", "x0": "1"}
# forward-pass units of a train step (forward + backward = 3) and of a distillation step (two
# teacher forwards + the student's forward and backward = 5)
TRAIN_UNITS, DISTILL_UNITS = 3, 5
SCHEDULE = dpm.CosineLogSNR()


def get_config() -> ml_collections.ConfigDict:
    """The default run: 8x8 digits, 3 seeds, sized for about 25 min on 2 idle CPU cores
    (training included; a rerun in the same workdir restores the networks)."""
    c = ml_collections.ConfigDict()
    c.name = "progressive_distillation"
    c.image_size = 8
    report_fields(c)  # zoo_root, judge_steps, seeds (0, 1, 2), fast_compile, kid_subsets
    c.base_channels = 16  # the tiny U-Net's width (class-conditional, 2 levels)
    c.teacher = ml_collections.ConfigDict(dict(
        prediction="x0", weighting="truncated_snr", steps=2000, batch_size=64,
        learning_rate=2e-3, warmup_steps=100, ema_decay=0.999))
    c.distill = ml_collections.ConfigDict(dict(
        start_steps=256, end_steps=1, steps_per_round=96, batch_size=32, learning_rate=5e-4,
        clip_norm=1.0, weighting="truncated_snr"))
    c.scratch = True  # train the equal-compute baseline
    c.ablations = tuple(ABLATIONS)
    # ablations are graded where they matter, at N <= ablation_max_steps
    c.sample = ml_collections.ConfigDict(dict(num_samples=224, ablation_max_steps=8))
    return c


# ----------------------------------------------------------------------------------------------
# Validation (before any work)
# ----------------------------------------------------------------------------------------------


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the first bad field."""
    if config.image_size not in (8, 16):
        raise ValueError(f"config.image_size must be 8 or 16; got {config.image_size!r}")
    int_values("config.seeds", config.seeds, 0)
    int_values("config.judge_steps", config.judge_steps, 1)
    int_values("config.base_channels", config.base_channels, 4)
    t, d = config.teacher, config.distill
    if t.prediction not in HEADS:
        raise ValueError(f"config.teacher.prediction must be one of {HEADS}; "
                         f"got {t.prediction!r}")
    for name, w in (("teacher", t.weighting), ("distill", d.weighting)):
        if w not in WEIGHTINGS:
            raise ValueError(f"config.{name}.weighting must be one of {WEIGHTINGS}; got {w!r}")
    for sec, name in ((t, "teacher"), (d, "distill")):
        int_values(f"config.{name}.batch_size", sec.batch_size, 1)
        if sec.batch_size % jax.device_count():
            raise ValueError(f"config.{name}.batch_size must be a multiple of the "
                             f"{jax.device_count()} devices; got {sec.batch_size!r}")
        if not 0 < sec.learning_rate < 1:
            raise ValueError(f"config.{name}.learning_rate must be in (0, 1); "
                             f"got {sec.learning_rate!r}")
    int_values("config.teacher.steps", t.steps, 1)
    int_values("config.teacher.warmup_steps", t.warmup_steps, 0)
    if not 0 <= t.ema_decay < 1:
        raise ValueError(f"config.teacher.ema_decay must be in [0, 1); got {t.ema_decay!r}")
    int_values("config.distill.steps_per_round", d.steps_per_round, 1)
    try:
        halving_schedule(d.start_steps, d.end_steps)
    except ValueError as e:
        raise ValueError(f"config.distill: {e}") from None
    if d.clip_norm is not None and not d.clip_norm > 0:
        raise ValueError(f"config.distill.clip_norm must be > 0 or None; got {d.clip_norm!r}")
    for a in as_tuple(config.ablations):
        if a not in ABLATIONS:
            raise ValueError(f"config.ablations must name some of {tuple(ABLATIONS)}; "
                             f"got {config.ablations!r}")
    int_values("config.sample.num_samples", config.sample.num_samples, 4)
    int_values("config.sample.ablation_max_steps", config.sample.ablation_max_steps, 1)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


def unet_config(config, head: str) -> nets.UNetConfig:
    """The tiny class-conditional U-Net; a ``"both"`` head has two output channel groups."""
    return nets.tiny(image_size=config.image_size, channels=1, num_classes=10,
                     base_channels=config.base_channels, out_channels=2 if head == "both" else 1)


def _den(graphdef, params, head: str, labels, key=None) -> dpm.Denoiser:
    return make_denoiser(graphdef, params, SCHEDULE,
                         ml_collections.ConfigDict(dict(prediction=head, preconditioning=None)),
                         {"label": labels}, train_key=key)


def _batches(train, batch_size: int, seed: int) -> BatchIterator:
    return BatchIterator({"x": train["x"], "y": train["y"].astype(np.int32)}, batch_size,
                         seed=seed)


def scratch_steps(config) -> int:
    """Train steps of the equal-compute baseline (at the teacher's batch size): the teacher's,
    plus the cascade's compute (distillation steps x 5/3 x distill batch / teacher batch)."""
    d = config.distill
    cascade = len(halving_schedule(d.start_steps, d.end_steps)) * d.steps_per_round
    ratio = DISTILL_UNITS / TRAIN_UNITS * d.batch_size / config.teacher.batch_size
    return int(config.teacher.steps + round(cascade * ratio))


_TEACHER_KEYS = ("weighting", "batch_size", "learning_rate", "warmup_steps", "ema_decay")


def train_base(config, head: str, train, workdir: str, *, steps: int | None = None,
               name: str = "teacher", progress=True):
    """A diffusion model trained on data (the teacher's recipe; ``steps`` overrides its
    length, for the equal-compute baseline). Returns ``(graphdef, ema_params)``."""
    t = config.teacher
    steps = t.steps if steps is None else steps
    graphdef, params = build_unet(unet_config(config, head), 0)

    def make(p, key=None):
        return _den(graphdef, p, head, None, key)

    inner = denoising_loss(make, weighting=t.weighting)

    def loss(params, batch, key):
        return inner(params, {"x": batch["x"], "cond": {"label": batch["y"]}}, key)

    opt = make_optimizer(t.learning_rate, total_steps=steps,
                         warmup_steps=min(t.warmup_steps, steps - 1))
    step = make_train_step(loss, opt,
                           ema_decay=functools.partial(warmup_ema_decay, decay=t.ema_decay))
    state, _ = fit(step, init_train_state(params, opt, jax.random.key(0)),
                   _batches(train, t.batch_size, 0), os.path.join(workdir, name), steps=steps,
                   ckpt_config={"teacher": {k: t[k] for k in _TEACHER_KEYS}, "head": head,
                                "steps": steps,  # the learning-rate schedule depends on it
                                "base_channels": config.base_channels,
                                "image_size": config.image_size},
                   ckpt_every=max(1, steps // 2), fast_compile=config.fast_compile,
                   progress=progress, label=name)
    return graphdef, jax.device_get(state.ema_params)


@functools.cache
def _distill_step(graphdef, head: str, weighting: str, steps_per_round: int, lr: float,
                  clip_norm):
    """One train step (and optimiser) for every round of every cascade of this kind."""
    inner = progressive_distillation_loss(lambda p: _den(graphdef, p, head, None),
                                          weighting=weighting)

    def loss(params, batch, key, teacher_params, student_steps):
        return inner(params, {"x": batch["x"], "cond": {"label": batch["y"]}}, key,
                     teacher_params, student_steps)

    return distillation_step(loss, steps_per_round, learning_rate=lr, clip_norm=clip_norm)


def distill(config, base, head: str, weighting: str, seed: int, train, workdir: str, *,
            progress=True) -> dict:
    """One cascade from ``base = (graphdef, params)``: ``{student_steps: params}``."""
    d = config.distill
    graphdef, params = base
    step, opt = _distill_step(graphdef, head, weighting, d.steps_per_round,
                              float(d.learning_rate), d.clip_norm)
    return progressive_distillation(
        step, opt, params, lambda r: _batches(train, d.batch_size, 1000 * seed + r), workdir,
        start_steps=d.start_steps, end_steps=d.end_steps, steps_per_round=d.steps_per_round,
        seed=seed, ckpt_config={"distill": {k: d[k] for k in (
            "start_steps", "batch_size", "learning_rate", "clip_norm")}, "weighting": weighting,
            "head": head, "base_channels": config.base_channels,
            "teacher": {k: config.teacher[k] for k in (*_TEACHER_KEYS, "steps")}},
        fast_compile=config.fast_compile, progress=progress,
        label=f"{head}/{WEIGHT_NAMES.get(weighting, weighting)} seed {seed}")


# ----------------------------------------------------------------------------------------------
# Sampling and evaluation
# ----------------------------------------------------------------------------------------------


@functools.cache
def _sampler(graphdef, head: str, steps: int, fast: bool):
    """``run(params, noise, labels) -> x0``: DDIM (eta 0, x0 clipped to [-1, 1]), N steps."""
    ts = uniform_time(steps, t_end=0.0)

    def run(params, noise, labels):
        return ddim(dpm.clip_x0(_den(graphdef, params, head, labels)), noise, ts)

    opts = fast_compile_options() if fast else None
    return jax.jit(run, compiler_options=opts) if opts else jax.jit(run)


def sample(config, net, head: str, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(samples, labels)``: ``num_samples`` images, labels 0..9 in turn, noise of ``seed``."""
    n, s = config.sample.num_samples, config.image_size
    noise = np.random.default_rng(seed + 10_000).standard_normal((n, s, s, 1)).astype(np.float32)
    labels = (np.arange(n) % 10).astype(np.int32)
    graphdef, params = net
    return np.asarray(_sampler(graphdef, head, steps, config.fast_compile)(
        params, noise, labels)), labels


def _steps(config) -> tuple[int, ...]:
    """The evaluated step counts: every power of two from 1 to ``start_steps``."""
    d = config.distill
    return tuple(2**k for k in range(int(np.log2(d.start_steps)) + 1))


REF_SEED = 50_000  # noise seed offset of the reference samples (a run with a single seed)


def reference_features(config, judge, teacher, head: str) -> tuple[dict, dict]:
    """The reference of the fidelity metric: ``({seed: judge features}, {seed: samples})``.

    ``samples`` is ``{seed: (images, labels)}``. The teacher's ``start_steps``-step samples are
    drawn once per seed (the noise of its graded
    row, which reuses them); seed ``s``'s reference is the next seed's draw (cyclically), noise
    independent of every row graded at seed ``s``, so the teacher's own row at ``start_steps``
    measures the finite-sample floor. With a single seed the reference is drawn with noise
    ``seed + REF_SEED``."""
    N0 = config.distill.start_steps
    seeds = as_tuple(config.seeds)
    own = {s: sample(config, teacher, head, N0, s) for s in seeds}
    feats = {s: judge.features(np.clip(np.nan_to_num(x), -1.0, 1.0))
             for s, (x, _) in own.items()}
    if len(seeds) == 1:
        s = seeds[0]
        feats = {s: judge.features(np.clip(sample(config, teacher, head, N0, s + REF_SEED)[0],
                                           -1.0, 1.0))}
        return feats, own
    return {s: feats[seeds[(i + 1) % len(seeds)]] for i, s in enumerate(seeds)}, own


def row_cells(config, judge, test, nets_for_seed, head: str, steps, *, log=print,
              name="", ref: dict | None = None, drawn: dict | None = None) -> dict:
    """``{N: over_seeds cell}`` for the network ``nets_for_seed(seed, N)`` at each N; with
    ``ref`` (:func:`reference_features`) also ``fd_to_teacher``, the Fréchet distance of the
    samples to the many-step teacher's in the judge's features. ``drawn`` (``{seed: (images,
    labels)}``) are this network's samples at ``max(steps)``, already drawn."""
    out = {}
    for N in steps:
        t0 = time.perf_counter()

        def one(seed, N=N):
            if drawn is not None and N == max(steps):
                x, y = drawn[seed]
            else:
                x, y = sample(config, nets_for_seed(seed, N), head, N, seed)
            m = evaluate(x, y, judge, test, seed=seed, kid_subsets=config.kid_subsets)
            if ref is not None:
                m["fd_to_teacher"] = frechet_distance_from_features(
                    ref[seed], judge.features(np.clip(np.nan_to_num(x), -1.0, 1.0)))
            return m

        out[N] = over_seeds(one, as_tuple(config.seeds))
        log(f"  {name} N={N}: KID {1e3 * out[N]['kid']['mean']:.1f}e-3 "
            f"({time.perf_counter() - t0:.0f} s)")
    return out


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

MAIN = "student (PD)"
TEACHER = "teacher DDIM"
SCRATCH = "equal-compute model DDIM"


def _paired(a: dict, b: dict, key="kid") -> tuple[float, float]:
    """Mean and standard error of ``a - b`` paired over seeds."""
    d = np.asarray(a[key]["values"]) - np.asarray(b[key]["values"])
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()), se


def _sign(d: float, se: float, lower_better: bool = True) -> str:
    if abs(d) <= 2 * se:
        return "tie"
    return "better" if (d < 0) == lower_better else "worse"


def _fmt_d(d, se, k=1.0) -> str:
    return f"{k * d:+.3g} ± {k * se:.2g}"


def verdict(config, q: dict) -> list[str]:
    """The paper's headline, tested part by part (differences paired over seeds, ± 1 se;
    "beyond noise" = beyond 2 se):

    1. quality against data (KID, as the paper's FID): the 4-step student within noise of the
       many-step teacher while the 4-step teacher is clearly worse;
    2. fidelity: the student's samples at 4, 2, 1 steps closer to the many-step teacher's than
       the teacher's own at as many steps (FD in the judge's features);
    3. graceful degradation: the student better than the teacher at 2 and 1 steps (KID);
    4. at equal training compute, the student against the model trained from scratch;
    5. ablations: the eps-head student collapsing at 1-2 steps; SNR weighting at 1 step.
    """
    N0 = config.distill.start_steps
    T, S = q[TEACHER], q[MAIN]
    ref, out = T[N0], []
    if 4 in S:
        ds, ses = _paired(S[4], ref)
        dt, set_ = _paired(T[4], ref)
        near = abs(ds) <= 2 * ses or abs(ds) <= 0.25 * abs(dt)
        holds = near and dt > 2 * set_
        out.append(
            f"1. KID x 1e3 at 4 steps minus the {N0}-step teacher's: student {_fmt_d(ds, ses, 1e3)}"
            f", teacher {_fmt_d(dt, set_, 1e3)}. Headline as the paper states it (student "
            "within noise or a quarter of the teacher's gap, teacher worse beyond noise): "
            + ("holds" if holds else "does not hold" + (
                "" if dt > 2 * set_ else " (the 4-step teacher is not worse than the "
                f"{N0}-step one on this metric)")))
    if "fd_to_teacher" in ref:
        parts, wins = [], []
        for N in (4, 2, 1):
            if N in S:
                d, se = _paired(S[N], T[N], "fd_to_teacher")
                wins.append(d + 2 * se < 0)
                parts.append(f"N={N}: student {S[N]['fd_to_teacher']['mean']:.3g} vs teacher "
                             f"{T[N]['fd_to_teacher']['mean']:.3g}")
        if parts:
            out.append(f"2. Fréchet distance to the {N0}-step teacher's samples (floor: its own "
                       f"samples with other noise, {ref['fd_to_teacher']['mean']:.3g}): "
                       + "; ".join(parts) + ". Student closer at every N beyond noise: "
                       + ("holds" if all(wins) else "does not hold"))
    for N in (2, 1):
        if N in S:
            d, se = _paired(S[N], T[N])
            out.append(f"3. {N} step(s), KID x 1e3 student - teacher: {_fmt_d(d, se, 1e3)} "
                       f"(student {_sign(d, se)}); recall {S[N]['recall']['mean']:.3f} vs "
                       f"{T[N]['recall']['mean']:.3f} (teacher at {N0}: "
                       f"{ref['recall']['mean']:.3f})")
    if SCRATCH in q:
        for N in (4, 2, 1):
            if N in q[SCRATCH] and N in S:
                d, se = _paired(S[N], q[SCRATCH][N])
                out.append(f"4. {N} step(s), KID x 1e3 student - equal-compute model: "
                           f"{_fmt_d(d, se, 1e3)} (student {_sign(d, se)})")
    eps = "ablation: eps_head"
    if eps in q:
        for N in (n for n in (2, 1) if n in q[eps] and n in S):
            d, se = _paired(q[eps][N], S[N])
            collapse = d - 2 * se > 0 and q[eps][N]["kid"]["mean"] > 2 * S[N]["kid"]["mean"]
            out.append(f"5. eps-head minus x0-head student at {N} step(s), KID x 1e3: "
                       f"{_fmt_d(d, se, 1e3)} (" + ("collapses" if collapse else "no collapse")
                       + ")")
    snr = "ablation: snr_weight"
    if snr in q and 1 in q[snr] and 1 in S:
        d, se = _paired(q[snr][1], S[1], "recall")
        out.append(f"5. SNR minus truncated-SNR weighting, 1-step recall: {_fmt_d(d, se)} "
                   f"({q[snr][1]['recall']['mean']:.3f} vs {S[1]['recall']['mean']:.3f})")
    return out


METRICS = (("kid", 1e3, "KID x 1e3 (lower is better)"),
           ("fd", 1.0, "feature Fréchet distance to the test split (lower is better)"),
           ("fd_to_teacher", 1.0, "Fréchet distance to the many-step teacher's samples "
            "(fidelity; lower is better)"),
           ("recall", 1.0, "recall, k = 3 (diversity; higher is better)"),
           ("precision", 1.0, "precision, k = 3 (fidelity to data; higher is better)"),
           ("hfer", 1.0, "high-frequency energy ratio (detail; data's in the note)"),
           ("accuracy", 1.0, "label adherence: judge accuracy on the conditioning labels"))


def tables(config, report) -> str:
    q, steps = report["quality"], _steps(config)

    def scaled(cell, k):
        return {kk: (v * k if kk in ("mean", "sd") else v) for kk, v in cell.items()}

    def metric(name, k=1.0):
        return {row: {N: scaled(cells[N][name], k) for N in steps
                      if N in cells and name in cells[N]}
                for row, cells in q.items()}

    cols = [(N, f"N={N}") for N in steps]
    md = []
    for name, k, title in METRICS:
        md += [f"## {title} vs sampling steps N", "",
               markdown_table(metric(name, k), cols, row_header="model"), ""]
    md[2:2] = ["DDIM, eta 0, x0 clipped to [-1, 1]. Students exist for N below the teacher's; "
               "ablations are graded at N <= " f"{config.sample.ablation_max_steps}.", ""]
    return "\n".join(md)


def _plot(path, config, q, metric="kid", scale=1e3, ylabel="KID x 1e3 (judge)",
          logy=True) -> str:
    """``metric`` vs N, one curve per row (NaN where a row has no N), and the many-step
    teacher's value as a horizontal reference."""
    steps = _steps(config)
    N0 = config.distill.start_steps
    curves = {}
    for row, cells in q.items():
        curves[row] = {k: [scale * cells[N][metric][k] if N in cells else np.nan
                           for N in steps] for k in ("mean", "sd")}
    curves[f"teacher @ {N0} steps"] = [scale * q[TEACHER][N0][metric]["mean"]] * len(steps)
    return plot_curves(path, steps, curves, "sampling steps N (DDIM)", ylabel,
                       f"progressive distillation, {config.image_size}px digits", logx=True,
                       logy=logy)


def _sample_figure(path, config, teacher, students, scratch) -> str:
    """Rows (labels 0..9, one noise): teacher at N0, 4, 1 steps; student at 4, 1 steps; the
    equal-compute model at 4 steps."""
    sub = config.copy_and_resolve_references()
    sub.sample.num_samples = 10
    N0, head = config.distill.start_steps, config.teacher.prediction
    rows = [sample(sub, teacher, head, N0, 0)[0]]
    for N in (4, 1):
        if N < N0:
            rows.append(sample(sub, teacher, head, N, 0)[0])
            if N in students:
                rows.append(sample(sub, (teacher[0], students[N]), head, N, 0)[0])
    if scratch is not None:
        rows.append(sample(sub, scratch, head, min(4, N0), 0)[0])
    _io.save_image_grid(path, np.concatenate(rows), ncol=10)
    return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True,
                       log=print) -> dict:
    """Validates ``config``, trains (or restores) every network, evaluates and writes the
    report to ``workdir``. Returns the report dict."""
    check_config(config)
    t0 = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    train, test = digits_data(digits_config("eps", config.image_size))
    _, judge = judges(train, config.zoo_root, test, steps=config.judge_steps)
    secs = {"judges": time.perf_counter() - t0}
    head, d = config.teacher.prediction, config.distill
    t1 = time.perf_counter()
    teacher = train_base(config, head, train, workdir, progress=progress)
    secs["teacher"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    cascades = {s: distill(config, teacher, head, d.weighting, s, train,
                           os.path.join(workdir, f"cascade_seed{s}"), progress=progress)
                for s in as_tuple(config.seeds)}
    secs["cascades"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    scratch = None
    if config.scratch:
        scratch = train_base(config, head, train, workdir, steps=scratch_steps(config),
                             name="scratch", progress=progress)
    secs["scratch"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    ablations = {}
    for name in as_tuple(config.ablations):
        a_head, a_weight = ABLATIONS[name]
        base = teacher if a_head == head else train_base(
            config, a_head, train, workdir, name=f"teacher_{a_head}", progress=progress)
        ablations[name] = (base, a_head, distill(
            config, base, a_head, a_weight, 0, train, os.path.join(workdir, f"ablation_{name}"),
            progress=progress))
    secs["ablations"] = time.perf_counter() - t1
    log("networks ready: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))

    t1 = time.perf_counter()
    steps = _steps(config)
    student_steps = tuple(N for N in steps if d.end_steps <= N < d.start_steps)
    ref, drawn = reference_features(config, judge, teacher, head)
    rows = functools.partial(row_cells, config, judge, test, log=log, ref=ref)
    q = {TEACHER: rows(lambda s, N: teacher, head, steps, name=TEACHER, drawn=drawn)}
    q[MAIN] = rows(lambda s, N: (teacher[0], cascades[s][N]), head, student_steps, name=MAIN)
    if scratch is not None:  # at the students' step counts, where it is their baseline
        q[SCRATCH] = rows(lambda s, N: scratch, head, student_steps, name=SCRATCH)
    few = tuple(N for N in student_steps if N <= config.sample.ablation_max_steps)
    for name, (base, a_head, students) in ablations.items():
        q[f"ablation: {name}"] = rows(lambda s, N, b=base, st=students: (b[0], st[N]), a_head,
                                      few, name=name)
        if a_head != head:  # its own teacher, at the same N
            q[f"ablation: {a_head}-head teacher DDIM"] = rows(
                lambda s, N, b=base: b, a_head, few, name=f"{a_head} teacher")
    secs["evaluation"] = time.perf_counter() - t1
    report = {"config": config.to_dict(), "quality": q}
    figs = [_plot(os.path.join(workdir, "kid_vs_steps.png"), config, q),
            _plot(os.path.join(workdir, "recall_vs_steps.png"), config, q, "recall", 1.0,
                  "recall (k = 3, judge features)", logy=False),
            _sample_figure(os.path.join(workdir, "samples.png"), config, teacher, cascades[
                as_tuple(config.seeds)[0]], scratch)]
    secs["total"] = time.perf_counter() - t0
    report["seconds"] = secs
    rounds = len(halving_schedule(d.start_steps, d.end_steps))
    report["compute"] = {
        "teacher_train_steps": config.teacher.steps,
        "distill_steps_per_cascade": rounds * d.steps_per_round,
        "scratch_train_steps": scratch_steps(config) if config.scratch else 0,
        "forward_units": {"train_step": TRAIN_UNITS, "distill_step": DISTILL_UNITS}}
    report["verdict"] = verdict(config, q)
    flags = command_flags(config, get_config())
    c = report["compute"]
    notes = ["## Verdict", ""] + [f"- {v}" for v in report["verdict"]] + [
        "", f"Training compute: teacher {c['teacher_train_steps']} steps at batch "
        f"{config.teacher.batch_size}; each cascade {rounds} rounds x {d.steps_per_round} "
        f"distillation steps at batch {d.batch_size} ({DISTILL_UNITS}/{TRAIN_UNITS} of a train "
        f"step each, per example); the equal-compute model {c['scratch_train_steps']} train "
        f"steps at batch {config.teacher.batch_size} = teacher + one cascade. Seeds vary the main "
        "cascade's training (data order, times, noise) and every row's sampling noise; the "
        "teacher, the equal-compute model and the ablations are trained once (seed 0).",
        "", f"Real data: HFER of the test split {float(np.mean(hfer(test['x']))):.4f}.",
        "", "Command: `python -m experiments.progressive_distillation --workdir "
        "runs/progressive_distillation" + (f" {flags}`" if flags else "`"),
        "", "Run time: " + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items())
        + " (restored networks cost nothing)."]
    write_report(workdir, "report", tables(config, report), report, figs,
                 judge=judge_description(judge, config.judge_steps),
                 title=f"Progressive distillation in miniature ({config.image_size}x"
                 f"{config.image_size} digits)", notes="\n".join(notes))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    return run_experiment(argv, "experiments.progressive_distillation", __doc__.splitlines()[0],
                          train_and_evaluate, validate=check_config)


if __name__ == "__main__":
    main(sys.argv[1:])
