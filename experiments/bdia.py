"""BDIA (Zhang, Lewis & Kleijn, ECCV 2024, "Exact Diffusion Inversion via Bi-directional
Integration Approximation") in miniature, on the zoo's class-conditional digits U-Nets.

    python -m experiments.bdia --workdir runs/bdia [--config.quality.num_samples=1000]

Three parts, all on networks trained on the digits train split only (``experiments._zoo``):

* **Quality at equal NFE.** BDIA-DDIM (gamma 0.5 and 1) against DDIM at 10 / 20 / 50 steps on
  the eps-prediction model, and BDIA-EDM against EDM's Heun sampler on the EDM-parameterized
  model at the same NFE (Karras grid; BDIA-EDM's backward map is an Euler step, so its NFE is
  Heun's 2S - 1). The samples of every row start from the same ``x_T`` at a seed; KID, feature
  FD, precision / recall and label accuracy are measured in the judge classifier's features
  against the held-out test split (in-project proxies of the paper's FID), mean +- sd over the
  seeds.
* **Exact inversion on a real network.** Held-out test digits, inverted under their own label
  with BDIA (the pair ``(x_T, x_next)``) and with DDIM inversion, then regenerated: round-trip
  max abs and RMS error and reconstruction PSNR, in float32 and in float64 (sampler state and
  coefficients in float64; the U-Net computes in float32 inside, see ``float64_denoiser``).
  Control row: BDIA sampling from ``x_T`` alone (``x_next`` dropped, first step plain DDIM).
* **Editing.** A test digit inverted under its own label, regenerated under another class label
  with each inversion; how much of the source each keeps (PSNR to the source, over the whole
  image and over the pixels where the two classes' mean digits agree) and whether the edit
  took (the judge's accuracy on the target label). Writes the grid ``edit_grid.png``
  (source | DDIM-inversion edit | BDIA edit).

Writes ``<workdir>/report.{md,json}`` and three PNGs; the committed copy lives in
``experiments/results/bdia/``.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpm.metrics import psnr
from dpm.training import fast_compile_options
from experiments import _io
from experiments._checks import int_values
from experiments._cli import run_experiment
from experiments._model import make_denoiser, make_schedule
from experiments._report import (
    markdown_table,
    over_seeds,
    plot_curves,
    save_figure,
    write_report,
)
from experiments._runner import Trained
from experiments._zoo import (
    DEFAULT_ROOT,
    JUDGE_STEPS,
    digits_config,
    digits_data,
    digits_model,
    evaluate,
    floor,
    judge_description,
    judges,
    zoo_name,
)
from solvers import bdia_ddim, bdia_edm, bdia_invert, ddim, ddim_invert, edm_heun
from solvers.grids import karras, uniform_time

SAMPLERS = ("ddim", "bdia_ddim", "edm_heun", "bdia_edm")
PARTS = ("quality", "inversion", "edit")
EPS_SAMPLERS = ("ddim", "bdia_ddim")  # run on the eps-prediction zoo model
EDM_SAMPLERS = ("edm_heun", "bdia_edm")  # run on the EDM-parameterized zoo model
BACKWARD_SOLVERS = ("euler", "heun")
QUALITY_METRICS = ("kid", "kid_sd", "fd", "precision", "recall", "accuracy", "frac_nonfinite")


def get_config() -> ml_collections.ConfigDict:
    """The default run: <= 15 min on 2 idle CPU cores once the zoo models exist."""
    c = ml_collections.ConfigDict()
    c.name = "bdia"
    c.zoo_root = DEFAULT_ROOT
    c.image_size = 8
    c.zoo_train_steps = 0  # 0: the zoo's own step count (shared cache); > 0 for smoke runs
    c.judge_steps = JUDGE_STEPS
    c.seeds = (0, 1, 2)
    c.parts = PARTS  # which of the three parts to run (a subset; the report holds those)
    c.fast_compile = False  # XLA backend optimisation level 0 (smoke tests: faster compiles)
    c.quality = ml_collections.ConfigDict(dict(
        samplers=SAMPLERS,
        num_samples=300,
        steps=(10, 20, 50),  # DDIM / BDIA-DDIM steps (NFE = steps)
        edm_steps=(5, 10),  # Heun / BDIA-EDM steps S (NFE = 2S - 1: 9, 19)
        gammas=(0.5, 1.0),
        edm_gammas=(0.5, 1.0),
        edm_backward_solver="euler",  # "euler": NFE 2S - 1 as Heun; "heun": 3S - 2
        kid_subsets=100,
    ))
    c.invert = ml_collections.ConfigDict(dict(
        num_images=100, steps=(10, 50), gamma=1.0, float64=True))
    c.edit = ml_collections.ConfigDict(dict(
        num_images=100, steps=50, gamma=1.0, t_starts=(1.0, 0.6), grid_rows=8, seed=0))
    return c


# ----------------------------------------------------------------------------------------------
# Validation (before any work)
# ----------------------------------------------------------------------------------------------


def _gammas(name: str, value, *, invert: bool) -> tuple[float, ...]:
    vals = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    ok = len(vals) > 0 and all(
        isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
        and np.isfinite(v) and (0.0 < v <= 1.0 if invert else 0.0 <= v <= 1.0) for v in vals)
    if not ok:
        rng = "(0, 1] (exact inversion divides by gamma)" if invert else "[0, 1]"
        raise ValueError(f"{name} must be gamma values in {rng}; got {value!r}")
    return tuple(float(v) for v in vals)


def check_config(config: ml_collections.ConfigDict, test_size: int | None = None) -> None:
    """Raises ValueError naming the first bad setting (sampler name, steps, gamma, sizes).

    Args:
      config: a :func:`get_config`-shaped config.
      test_size: the number of held-out test images, when known (bounds the image counts).
    """
    q, inv, ed = config.quality, config.invert, config.edit
    samplers = tuple(q.samplers) if isinstance(q.samplers, (list, tuple)) else (q.samplers,)
    bad = [s for s in samplers if s not in SAMPLERS]
    if bad or not samplers:
        raise ValueError(f"quality.samplers must be names from {SAMPLERS}; got {q.samplers!r}")
    parts = tuple(config.parts) if isinstance(config.parts, (list, tuple)) else (config.parts,)
    if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(f"parts must be distinct names from {PARTS}; got {config.parts!r}")
    int_values("seeds", config.seeds, 0)
    int_values("image_size", config.image_size, 8, 16)
    int_values("zoo_train_steps", config.zoo_train_steps, 0)
    int_values("judge_steps", config.judge_steps, 2)
    int_values("quality.num_samples", q.num_samples, 2)
    int_values("quality.kid_subsets", q.kid_subsets, 2)
    int_values("quality.steps", q.steps, 1, 1000)
    int_values("quality.edm_steps", q.edm_steps, 1, 1000)
    _gammas("quality.gammas", q.gammas, invert=False)
    _gammas("quality.edm_gammas", q.edm_gammas, invert=False)
    if q.edm_backward_solver not in BACKWARD_SOLVERS:
        raise ValueError(f"quality.edm_backward_solver must be one of {BACKWARD_SOLVERS}; "
                         f"got {q.edm_backward_solver!r}")
    hi = test_size
    int_values("invert.num_images", inv.num_images, 1, hi)
    int_values("invert.steps", inv.steps, 1, 1000)
    _gammas("invert.gamma", inv.gamma, invert=True)
    if not isinstance(inv.float64, bool):
        raise ValueError(f"invert.float64 must be a bool; got {inv.float64!r}")
    int_values("edit.num_images", ed.num_images, 1, hi)
    int_values("edit.steps", ed.steps, 1, 1000)
    int_values("edit.grid_rows", ed.grid_rows, 1, ed.num_images)
    int_values("edit.seed", ed.seed, 0)
    _gammas("edit.gamma", ed.gamma, invert=True)
    t_starts = ed.t_starts if isinstance(ed.t_starts, (list, tuple)) else (ed.t_starts,)
    if not t_starts or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                               and 0.0 < t <= 1.0 for t in t_starts):
        raise ValueError(f"edit.t_starts must be times in (0, 1]; got {ed.t_starts!r}")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def zoo_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The zoo training configs of the eps-prediction and EDM-parameterized digits models."""
    return {kind: digits_config(kind, config.image_size, train_steps=config.zoo_train_steps,
                                fast_compile=config.fast_compile)
            for kind in ("eps", "edm")}


def _cond(labels) -> dict:
    return {"label": jnp.asarray(labels, jnp.int32)}


def float64_denoiser(trained: Trained, labels):
    """The trained denoiser for a float64 pass (call inside ``jax.enable_x64``): parameters and
    schedule tables cast / rebuilt in float64, so the sampler's state and coefficients are
    float64. The U-Net itself keeps float32 inside (``nets`` computes GroupNorm statistics,
    the time embedding and its output in float32): a deterministic function of its input, which
    is all the exact inversion needs."""
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), trained.state.ema_params)
    return make_denoiser(trained.graphdef, params, make_schedule(trained.diffusion),
                         trained.diffusion, _cond(labels))


def _jit(fast: bool):
    opts = fast_compile_options() if fast else None
    return functools.partial(jax.jit, compiler_options=opts)


def _enable_x64():
    ctx = getattr(jax, "enable_x64", None)
    if ctx is None:  # older JAX
        from jax.experimental import enable_x64 as ctx
    return ctx(True)


# ----------------------------------------------------------------------------------------------
# Quality at equal NFE
# ----------------------------------------------------------------------------------------------


def quality_rows(config) -> list[dict]:
    """The quality rows: ``{"name", "model", "sampler", "steps", "gamma", "nfe"}``."""
    q = config.quality
    rows = []
    for S in q.steps:
        if "ddim" in q.samplers:
            rows.append(dict(name=f"DDIM, {S} steps", model="eps", sampler="ddim", steps=S,
                             gamma=0.0, nfe=S))
        if "bdia_ddim" in q.samplers:
            rows += [dict(name=f"BDIA-DDIM g={g:g}, {S} steps", model="eps", sampler="bdia_ddim",
                          steps=S, gamma=g, nfe=S) for g in q.gammas]
    bw = q.edm_backward_solver
    for S in q.edm_steps:
        if "edm_heun" in q.samplers:
            rows.append(dict(name=f"EDM-Heun, {S} steps", model="edm", sampler="edm_heun",
                             steps=S, gamma=0.0, nfe=2 * S - 1))
        if "bdia_edm" in q.samplers:
            nfe = S if S == 1 else (2 * S - 1 if bw == "euler" else 3 * S - 2)
            rows += [dict(name=f"BDIA-EDM g={g:g}, {S} steps", model="edm", sampler="bdia_edm",
                          steps=S, gamma=g, nfe=nfe) for g in q.edm_gammas]
    return rows


def _samplers(config, jit):
    bw = config.quality.edm_backward_solver
    return {
        "ddim": jit(lambda d, x, ts, g: ddim(d, x, ts)),
        "bdia_ddim": jit(lambda d, x, ts, g: bdia_ddim(d, x, ts, gamma=g)),
        "edm_heun": jit(lambda d, x, ts, g: edm_heun(d, x, ts)),
        "bdia_edm": jit(lambda d, x, ts, g: bdia_edm(d, x, ts, gamma=g, backward_solver=bw)),
    }


def grid(row: dict, schedule) -> jax.Array:
    """The time grid of a quality row: uniform in t to 0 (eps model), Karras (EDM model)."""
    if row["model"] == "eps":
        return uniform_time(row["steps"], schedule, t_end=0.0)
    return karras(row["steps"], schedule)


def run_quality(config, kind: str, trained: Trained, judge, test, jit, log=print) -> dict:
    """Samples the quality rows of model ``kind`` ("eps" | "edm") at every seed and grades
    them; returns ``{name: {metric: over_seeds entry, "nfe", "seconds", ...}}``."""
    q = config.quality
    n = q.num_samples
    labels = np.arange(n) % 10
    fns = _samplers(config, jit)
    den = trained.denoiser(_cond(labels))
    shape = (n, config.image_size, config.image_size, 1)
    out = {}
    for row in quality_rows(config):
        if row["model"] != kind:
            continue
        ts = grid(row, trained.schedule)
        t0 = time.perf_counter()

        def one(seed, row=row, ts=ts):
            # N(0, I) for the VP eps model, sigma_max N(0, I) for the EDM model
            x_T = trained.schedule.prior_sample(jax.random.key(seed), shape, float(ts[0]))
            x = np.asarray(fns[row["sampler"]](den, x_T, ts, row["gamma"]))
            m = evaluate(x, labels, judge, test, kid_subsets=q.kid_subsets, seed=seed)
            return {k: m[k] for k in QUALITY_METRICS}

        res = over_seeds(one, config.seeds)
        secs = time.perf_counter() - t0
        out[row["name"]] = {**{k: row[k] for k in ("model", "sampler", "steps", "gamma", "nfe")},
                            **res, "seconds": secs}
        log(f"  {row['name']:<28} NFE {row['nfe']:>3}  KID {res['kid']['mean']:.4f} "
            f"+- {res['kid']['sd']:.4f}  acc {res['accuracy']['mean']:.3f}  ({secs:.0f} s)")
    return out


def quality_floor(config, train, test, judge) -> dict:
    """The real-vs-real floor: ``quality.num_samples`` real train-split images against the test
    split, at each seed (mean +- sd)."""
    q = config.quality
    return over_seeds(lambda s: {k: v for k, v in floor(train, test, judge, q.num_samples, seed=s,
                                                        kid_subsets=q.kid_subsets).items()
                                 if k in QUALITY_METRICS}, config.seeds)


def _paired_deltas(rows: dict) -> None:
    """Adds ``dkid``: KID minus the baseline's (DDIM / EDM-Heun at the same steps) from the same
    ``x_T``, per seed (paired), as mean +- sd."""
    base = {(r["model"], r["steps"]): r for r in rows.values() if r["sampler"] in
            ("ddim", "edm_heun")}
    for r in rows.values():
        b = base.get((r["model"], r["steps"]))
        if b is None or b is r:
            continue
        d = np.array(r["kid"]["values"]) - np.array(b["kid"]["values"])
        r["dkid"] = {"mean": float(d.mean()),
                     "sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "values": d.tolist()}


# ----------------------------------------------------------------------------------------------
# Exact inversion on the trained U-Net
# ----------------------------------------------------------------------------------------------


def round_trip(den, x_0, ts, gamma):
    """Inverts ``x_0`` with BDIA and with DDIM inversion and regenerates (jit-able).

    Returns:
      dict of ``(B, ...)`` arrays: ``bdia`` (from the pair), ``bdia_no_next`` (BDIA sampling
      from ``x_T`` alone: the pair broken, first step plain DDIM), ``ddim``, and the latents
      ``z_bdia``, ``z_ddim`` at ``ts[0]``.
    """
    pair = bdia_invert(den, x_0, ts, gamma=gamma)
    z = ddim_invert(den, x_0, ts)
    return {
        "bdia": bdia_ddim(den, pair.x_T, ts, gamma=gamma, x_next=pair.x_next),
        "bdia_no_next": bdia_ddim(den, pair.x_T, ts, gamma=gamma),
        "ddim": ddim(den, z, ts),
        "z_bdia": pair.x_T,
        "z_ddim": z,
    }


def reconstruction_errors(x_rec, x_0) -> dict:
    """Round-trip error of ``x_rec`` against ``x_0`` (images in [-1, 1]).

    Returns:
      ``max_abs``, ``rms`` (over all pixels), ``psnr`` (mean over images of
      :func:`dpm.metrics.psnr` with data range 2, over the images not reproduced bit for bit;
      NaN if all are) and ``n_exact`` (images reproduced bit for bit).
    """
    x_rec, x_0 = np.asarray(x_rec, np.float64), np.asarray(x_0, np.float64)
    err = x_rec - x_0
    exact = np.all(err == 0, axis=tuple(range(1, err.ndim)))
    p = np.array([])
    if (~exact).any():  # in float64: float32 would round the float64 pass's errors away
        with _enable_x64():
            p = np.asarray(psnr(jnp.asarray(x_rec[~exact]), jnp.asarray(x_0[~exact]), 2.0))
    return {"max_abs": float(np.max(np.abs(err))), "rms": float(np.sqrt(np.mean(err**2))),
            "psnr": float(np.mean(p)) if p.size else float("nan"),
            "n_exact": int(exact.sum())}


def run_inversion(config, trained: Trained, test, jit, log=print) -> dict:
    """Round trips of the first ``invert.num_images`` test digits at each step count, in float32
    and (``invert.float64``) float64."""
    inv = config.invert
    x, y = test["x"][: inv.num_images], test["y"][: inv.num_images]
    rt = jit(round_trip)
    out = {}
    dtypes = ("float32", "float64") if inv.float64 else ("float32",)
    for S in inv.steps:
        for dtype in dtypes:
            t0 = time.perf_counter()
            if dtype == "float32":
                ts = uniform_time(S, trained.schedule, t_end=0.0)
                res = rt(trained.denoiser(_cond(y)), jnp.asarray(x, jnp.float32), ts, inv.gamma)
                res = jax.tree.map(np.asarray, res)
            else:
                with _enable_x64():
                    den = float64_denoiser(trained, y)
                    ts = uniform_time(S, den.schedule, t_end=0.0).astype(jnp.float64)
                    res = rt(den, jnp.asarray(x, jnp.float64), ts, jnp.float64(inv.gamma))
                    res = jax.tree.map(np.asarray, res)
            for method, label in (("bdia", f"BDIA g={inv.gamma:g}"),
                                  ("ddim", "DDIM inversion"),
                                  ("bdia_no_next", f"BDIA g={inv.gamma:g}, x_next dropped")):
                e = reconstruction_errors(res[method], x)
                z = res["z_ddim" if method == "ddim" else "z_bdia"]
                e["latent_std"] = float(np.std(z))
                e["state_dtype"] = str(res[method].dtype)
                out[f"{label}, {S} steps, {dtype}"] = {
                    "method": method, "steps": S, "dtype": dtype, "gamma": inv.gamma, **e}
            b = out[f"BDIA g={inv.gamma:g}, {S} steps, {dtype}"]
            d = out[f"DDIM inversion, {S} steps, {dtype}"]
            log(f"  {S} steps {dtype}: BDIA max {b['max_abs']:.2e} rms {b['rms']:.2e}; "
                f"DDIM max {d['max_abs']:.2e} rms {d['rms']:.2e} "
                f"({time.perf_counter() - t0:.0f} s)")
    return {"rows": out, "num_images": int(len(x))}


# ----------------------------------------------------------------------------------------------
# Editing: invert under the source label, regenerate under another
# ----------------------------------------------------------------------------------------------


def edit(den_src, den_tgt, x_0, ts, gamma):
    """Conditional edit with both inversions (jit-able): ``{"ddim", "bdia"}`` ``(B, ...)``."""
    z = ddim_invert(den_src, x_0, ts)
    pair = bdia_invert(den_src, x_0, ts, gamma=gamma)
    return {"ddim": ddim(den_tgt, z, ts),
            "bdia": bdia_ddim(den_tgt, pair.x_T, ts, gamma=gamma, x_next=pair.x_next)}


def keep_masks(y_src, y_tgt, class_means) -> np.ndarray:
    """``(B, H, W, C)`` bool: per pair, the pixels where the source and target classes' mean
    digits differ least (at most the median of ``|mean_src - mean_tgt|`` over the image): the
    region an edit to the target class has no reason to change."""
    diff = np.abs(class_means[y_src] - class_means[y_tgt])
    med = np.median(diff.reshape(len(diff), -1), axis=1)
    return diff <= med.reshape((-1,) + (1,) * (diff.ndim - 1))


def _masked_psnr(x, ref, mask) -> np.ndarray:
    mse = np.sum(mask * (x - ref) ** 2, axis=(1, 2, 3)) / np.sum(mask, axis=(1, 2, 3))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-30))


def edit_metrics(x_edit, x_src, y_src, y_tgt, mask, judge) -> dict:
    """PSNR to the source (whole image and ``mask``), judge accuracy on target and source."""
    x_edit = np.clip(np.nan_to_num(np.asarray(x_edit, np.float32)), -1.0, 1.0)
    pred = judge.predict(x_edit)
    return {"psnr_src": float(np.mean(_masked_psnr(x_edit, x_src, np.ones_like(mask)))),
            "psnr_src_keep": float(np.mean(_masked_psnr(x_edit, x_src, mask))),
            "acc_target": float(np.mean(pred == y_tgt)),
            "acc_source": float(np.mean(pred == y_src))}


def run_edit(config, trained: Trained, train, test, judge, jit, log=print) -> dict:
    ed = config.edit
    x, y_src = test["x"][: ed.num_images], test["y"][: ed.num_images]
    rng = np.random.default_rng(ed.seed)
    y_tgt = (y_src + rng.integers(1, 10, size=len(y_src))) % 10  # any other class
    class_means = np.stack([train["x"][train["y"] == k].mean(0) for k in range(10)])
    mask = keep_masks(y_src, y_tgt, class_means)
    den_src, den_tgt = trained.denoiser(_cond(y_src)), trained.denoiser(_cond(y_tgt))
    # reference: a real test digit of the target class (another image) against the source
    ref_idx = np.array([rng.choice(np.flatnonzero((test["y"] == t)
                                                  & (np.arange(len(test["y"])) != i)))
                        for i, t in enumerate(y_tgt)])
    rows = {"real digit of the target class (reference)":
            edit_metrics(test["x"][ref_idx], x, y_src, y_tgt, mask, judge)}
    edits = {}
    fn = jit(edit)
    for t_start in ed.t_starts:
        t0 = time.perf_counter()
        ts = uniform_time(ed.steps, trained.schedule, t_start=float(t_start), t_end=0.0)
        res = jax.tree.map(np.asarray, fn(den_src, den_tgt, jnp.asarray(x), ts, ed.gamma))
        edits[t_start] = res
        for method, label in (("ddim", "DDIM-inversion edit"),
                              ("bdia", f"BDIA g={ed.gamma:g} edit")):
            m = edit_metrics(res[method], x, y_src, y_tgt, mask, judge)
            rows[f"{label}, from t={t_start:g}"] = {"method": method, "t_start": t_start, **m}
        log(f"  edit from t={t_start:g}: " + "; ".join(
            f"{k.split(',')[0]} PSNR {v['psnr_src']:.1f} dB acc {v['acc_target']:.2f}"
            for k, v in rows.items() if k.endswith(f"t={t_start:g}"))
            + f" ({time.perf_counter() - t0:.0f} s)")
    return {"rows": rows, "num_images": int(len(x)), "steps": ed.steps, "gamma": ed.gamma,
            "keep_region": "pixels where |mean(source class) - mean(target class)| <= its "
                           "per-image median (train-split class means)",
            "_arrays": dict(x=x, y_src=y_src, y_tgt=y_tgt, edits=edits)}


def edit_grid(path: str, arrays: dict, judge, rows: int, judge_name: str) -> str:
    """PNG: per example, source | DDIM-inversion edit | BDIA edit for each ``t_start``, with
    the judge's predicted class under each image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y_src, y_tgt = arrays["x"][:rows], arrays["y_src"][:rows], arrays["y_tgt"][:rows]
    cols = [("source", x)]
    for t_start, res in arrays["edits"].items():
        cols += [(f"DDIM-inv edit\nfrom t={t_start:g}", res["ddim"][:rows]),
                 (f"BDIA edit\nfrom t={t_start:g}", res["bdia"][:rows])]
    fig, axes = plt.subplots(rows, len(cols), figsize=(1.25 * len(cols), 1.25 * rows + 0.9),
                             dpi=80, squeeze=False)
    for j, (title, imgs) in enumerate(cols):
        imgs = np.clip(np.nan_to_num(np.asarray(imgs, np.float32)), -1, 1)
        pred = judge.predict(imgs)
        for i in range(rows):
            ax = axes[i, j]
            ax.imshow(imgs[i, ..., 0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            label = f"{y_src[i]}" if j == 0 else f"{y_src[i]}->{y_tgt[i]}"
            ax.set_xlabel(f"{label} (judge {pred[i]})", fontsize=7)
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"Conditional edits of held-out digits; labels under images: "
                 f"class (judge's prediction).\nJudge: {judge_name}", fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _tables(report: dict) -> str:
    q, inv, ed = report["quality"], report["inversion"], report["edit"]
    parts = []
    if q is not None:
        qrows = {r: {**v, "steps": v["steps"], "nfe": v["nfe"]} for r, v in q["rows"].items()}
        qrows["real train images (floor)"] = {**q["floor"], "nfe": "-", "steps": "-"}
        parts += [
            f"## Quality at equal NFE (n = {q['num_samples']} samples per seed, "
            f"seeds {report['seeds']}, mean ± sd over seeds)\n",
            "KID: mean over 100 subsets within a seed; dKID: KID minus the baseline's (DDIM / "
            "EDM-Heun at the same steps) from the same x_T, per seed. Eps model: uniform-t grid "
            "to t = 0; EDM model: Karras grid (rho = 7). Lower KID / FD is better.\n",
            markdown_table(qrows, [("nfe", "NFE"), ("kid", "KID"), ("dkid", "dKID vs base"),
                                   ("fd", "feature-FD"), ("precision", "precision"),
                                   ("recall", "recall"), ("accuracy", "label acc.")],
                           row_header="sampler", digits=3)]
    if inv is not None:
        parts += [
            f"\n## Exact inversion on the trained U-Net ({inv['num_images']} held-out test digits, "
            "inverted under their own label, regenerated)\n",
            "Error of the regenerated images against the originals (pixels in [-1, 1]); PSNR is "
            "the mean over images not reproduced bit for bit (n_exact). latent std: std of the "
            "inverted x_T. float64: sampler state and coefficients in float64, U-Net internals "
            "float32.\n",
            markdown_table(inv["rows"], [("max_abs", "max abs err"), ("rms", "RMS err"),
                                         ("psnr", "PSNR (dB)"), ("n_exact", "n_exact"),
                                         ("latent_std", "latent std")],
                           row_header="round trip", digits=3)]
    if ed is not None:
        parts += [
            f"\n## Editing ({ed['num_images']} held-out digits, inverted under their label, "
            f"regenerated under a random other label; {ed['steps']} steps)\n",
            "PSNR to the source over the whole image and over the keep region "
            f"({ed['keep_region']}); acc: the judge's accuracy on the target / source label "
            "(the edit took / did not).\n",
            markdown_table(ed["rows"], [("psnr_src", "PSNR to source"),
                                        ("psnr_src_keep", "PSNR keep region"),
                                        ("acc_target", "acc target"), ("acc_source", "acc source")],
                           row_header="edit", digits=3)]
    return "\n".join(parts)


def _notes(report: dict) -> str:
    lines = ["## Findings (computed from the tables above)", ""]
    if report["inversion"] is not None:
        inv = report["inversion"]["rows"]
        worst = {d: max((v["max_abs"] for v in inv.values()
                         if v["method"] == "bdia" and v["dtype"] == d), default=float("nan"))
                 for d in ("float32", "float64")}
        ddim_best = min((v["max_abs"] for v in inv.values() if v["method"] == "ddim"),
                        default=float("nan"))
        lines.append(f"- BDIA round trip: worst max abs error {worst['float32']:.2e} "
                     f"(float32), {worst['float64']:.2e} (float64); DDIM inversion's best "
                     f"{ddim_best:.2e}.")
    q = report["quality"]["rows"] if report["quality"] is not None else {}
    for r, v in q.items():
        if "dkid" in v:
            d = v["dkid"]
            sig = "lower than" if d["mean"] + d["sd"] < 0 else (
                "higher than" if d["mean"] - d["sd"] > 0 else "within 1 sd of")
            lines.append(f"- {r}: KID {sig} the baseline's (dKID {d['mean']:+.4f} ± "
                         f"{d['sd']:.4f}).")
    secs = report["section_seconds"]
    spent = ", ".join(f"{p} {secs[p]:.0f} s" for p in PARTS if p in secs)
    lines += ["", f"Command: `{report['command']}`; wall time {report['seconds']:.0f} s "
              f"({spent}, models and judges {secs['models']:.0f} s; CPU time of the process "
              f"{secs['cpu_seconds']:.0f} s)."]
    return "\n".join(lines)


def _curves(report: dict, workdir: str, judge_name: str) -> list[str]:
    q = report["quality"]["rows"] if report["quality"] is not None else {}
    figs = []
    for model, title in (("eps", "eps model: DDIM vs BDIA-DDIM"),
                         ("edm", "EDM model: Heun vs BDIA-EDM")):
        rows = [v for v in q.values() if v["model"] == model]
        if not rows:
            continue
        nfes = sorted({v["nfe"] for v in rows})
        curves: dict = {}
        for r, v in q.items():
            if v["model"] != model:
                continue
            label = r.rsplit(",", 1)[0]
            curves.setdefault(label, {})[v["nfe"]] = v["kid"]
        curves = {k: [c[n] for n in nfes] for k, c in curves.items() if len(c) == len(nfes)}
        if len(nfes) < 1 or not curves:
            continue
        path = os.path.join(workdir, f"kid_vs_nfe_{model}.png")
        figs.append(plot_curves(
            path, nfes, curves, "NFE", "KID (judge features; in-project proxy for FID)",
            f"{title}, mean ± sd over seeds\nJudge: {judge_name}"))
    return figs


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool = True, log=print) -> dict:
    """Runs the three parts and writes ``workdir/report.{md,json}`` and the PNGs.

    Args:
      config: see :func:`get_config`.
      workdir: output directory (the zoo models live under ``config.zoo_root``).
      progress: show training progress bars (zoo models, only when not cached).
      log: where progress lines go.

    Returns:
      The report dict (as in ``report.json``'s ``data``).
    """
    t_all = time.perf_counter()
    check_config(config)
    zoo = zoo_configs(config)
    train, test = digits_data(zoo["eps"])
    check_config(config, test_size=len(test["x"]))  # image counts against the test split
    jit = _jit(config.fast_compile)
    secs = {}

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    models = {"eps": digits_model(zoo["eps"], config.zoo_root, progress=progress)}
    _, judge = judges(train, config.zoo_root, test, steps=config.judge_steps)
    judge_name = (f"in-project CNN (seed 1, {config.judge_steps} steps on the train split; "
                  f"test acc. {judge.held_out_accuracy:.3f})")
    secs["models"] = time.perf_counter() - t0

    parts = tuple(config.parts) if isinstance(config.parts, (list, tuple)) else (config.parts,)
    rows, inversion, edited, arrays = {}, None, None, None
    if "quality" in parts:
        log("quality at equal NFE (eps model)")
        t0 = time.perf_counter()
        rows = run_quality(config, "eps", models["eps"], judge, test, jit, log)
        secs["quality"] = time.perf_counter() - t0
    if "inversion" in parts:
        log("exact inversion (eps model)")
        t0 = time.perf_counter()
        inversion = run_inversion(config, models["eps"], test, jit, log)
        secs["inversion"] = time.perf_counter() - t0
    if "edit" in parts:
        log("editing (eps model)")
        t0 = time.perf_counter()
        edited = run_edit(config, models["eps"], train, test, judge, jit, log)
        arrays = edited.pop("_arrays")
        secs["edit"] = time.perf_counter() - t0

    def write(rows, partial: bool) -> dict:
        d = {k: dict(v) for k, v in rows.items()}
        _paired_deltas(d)
        report = {
            "config": config.to_dict(),
            "seeds": list(config.seeds),
            "zoo": {k: os.path.join(config.zoo_root, zoo_name(zoo[k])) for k in models},
            "zoo_train_steps": {k: int(m.state.step) for k, m in models.items()},
            "judge_test_accuracy": judge.held_out_accuracy,
            "quality": ({"rows": d, "floor": fl, "num_samples": config.quality.num_samples}
                        if "quality" in parts else None),
            "inversion": inversion,
            "edit": edited,
            "command": "python -m experiments.bdia --workdir " + workdir,
            "section_seconds": {**secs, "cpu_seconds": time.process_time() - cpu0},
            "partial": partial,
        }
        figs = _curves(report, workdir, judge_name)
        if edited is not None:
            figs.append(edit_grid(os.path.join(workdir, "edit_grid.png"), arrays, judge,
                                  config.edit.grid_rows, judge_name))
        report["seconds"] = time.perf_counter() - t_all
        notes = _notes(report)
        if partial:
            notes = "**Partial report: the EDM-model rows are still running.**\n\n" + notes
        write_report(workdir, "report", _tables(report), report, figs,
                     judge=judge_description(judge, config.judge_steps),
                     title="BDIA (Zhang, Lewis & Kleijn, ECCV 2024) in miniature: digits 8x8",
                     notes=notes)
        _io.write_json(os.path.join(workdir, "timing.json"),
                       {"seconds": report["seconds"], **report["section_seconds"]})
        return report

    fl = quality_floor(config, train, test, judge) if "quality" in parts else None
    edm_rows = "quality" in parts and any(r["model"] == "edm" for r in quality_rows(config))
    if edm_rows:
        write(rows, partial=True)  # the eps parts, while the EDM model loads / runs
        t0 = time.perf_counter()
        models["edm"] = digits_model(zoo["edm"], config.zoo_root, progress=progress)
        secs["models"] += time.perf_counter() - t0
        log("quality at equal NFE (EDM model)")
        t0 = time.perf_counter()
        rows.update(run_quality(config, "edm", models["edm"], judge, test, jit, log))
        secs["quality"] += time.perf_counter() - t0
    return write(rows, partial=False)


def main(argv: Sequence[str] | None = None) -> dict:
    return run_experiment(argv, "experiments.bdia", __doc__.splitlines()[0],
                          train_and_evaluate, validate=check_config, summary=lambda r: [])


if __name__ == "__main__":
    main(sys.argv[1:])
