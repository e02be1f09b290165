"""Quickstart, the main job: train a class-conditional U-Net on the train split of the 8x8 digits
(built-in data, a few minutes on 2 CPU cores), sample with the project's fast samplers and
grade them against the held-out test split with an independently trained judge classifier.

    python -m experiments.quickstart [--workdir runs/quickstart] [--config.train.steps=3000]

The protocol (``experiments._zoo``): the U-Net and both classifiers see only the train split
(half of the 1,797 digits); samples are compared with the held-out test split; the first row,
``real train digits``, is the real-vs-real floor (as many train-split images as samples, against
the same test split), and ``Gaussian noise`` is a broken sampler's score. Columns: KID (mean +-
sd over subsets), feature-FD, k-NN precision / recall, the judge's class accuracy on the
conditioning labels, HFER (share of spectral power above half-Nyquist; the floor row is the
data's value). All feature metrics are in-project proxies (a small classifier's features).

Heun and DPM-Solver++(2M) run on the *same* three grids (uniform in t, Karras rho = 7, uniform
in log-SNR) at the same NFE (Heun S steps = 2S - 1 evaluations), so the table separates the grid
from the solver; EDM-Heun also runs as EDM configures it (Karras grid from sigma_max = 80,
18 steps = 35 NFE).

Why EDM-Heun failed at 9 NFE on the Karras grid (the old row: feature-FD 7.5): it is the method
at that budget, not a defect. ``solvers.edm_heun`` reproduces a literal float64 transcription of
EDM's Algorithm 1 to 1e-13 on the exact two-Gaussian mixture. A Heun step from sigma to sigma'
puts the weight ``(sigma - sigma') / (2 sigma')`` on the denoiser's output at the Euler-predicted
point (Euler / DDIM put ``1 - sigma'/sigma <= 1`` on the current one), so any error of the
denoised estimate there is amplified whenever ``sigma / sigma' > 3``. Five Karras steps from
sigma_bar(1) = 157 of DDPM's linear schedule step 157 -> 36.9 -> 5.9 -> 0.49 -> 0.01 -> 0, ratio
12 across the range where the data's modes separate, weight 5.5: the samples overshoot. At
EDM's own setting (18 steps from 80, ratios <= 2.7) and on the uniform-t grid (sigma_bar 157,
25, 6.1, 2.0, 0.72, 0: ratios ~3 where the modes separate, the big jump the final Euler step)
Heun is accurate. Writes ``<workdir>/report.{md,json}`` and one PNG grid per row under
``<workdir>/samples/``. Re-running resumes training from the workdir's latest checkpoint;
``--config.eval.zoo_root=runs/zoo`` takes the model and the judges from the shared zoo of the
paper experiments instead (trained there once, ``experiments._zoo``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

import dpm
from dpm.training import fast_compile_options
from experiments import _io, _report, _zoo
from experiments._cli import parse_args
from experiments._runner import train_denoiser
from solvers.ddim import ddim
from solvers.ddpm import ddpm
from solvers.dpm_solver import dpm_solver_pp
from solvers.edm import edm_heun
from solvers.grids import karras, uniform_log_snr, uniform_time
from solvers.pndm import pndm
from solvers.time_shift import time_shift

GRIDS = ("uniform-t", "karras", "log-SNR")
DENOISERS = ("unet", "oracle")


def get_config() -> ml_collections.ConfigDict:
    c = _zoo.digits_config("eps", 8)
    c.name = "quickstart"
    c.eval = ml_collections.ConfigDict(
        dict(
            num_samples=800,  # 80 per class: every class of the train split has >= 82
            guidance_scale=1.0,
            nfe=9,  # the ~10-NFE budget (Heun: 5 steps)
            edm_steps=18,  # EDM-Heun as EDM runs it: 18 steps from sigma_max = 80
            edm_sigma_max=80.0,
            ddpm_steps=250,
            ts_window=40,
            ts_cutoff=0.2,
            classifier_steps=_zoo.JUDGE_STEPS,
            denoiser="unet",  # or "oracle": the exact denoiser of the train split (see below)
            oracle_std=0.05,
            zoo_root="",  # e.g. "runs/zoo": take the model and judges from the shared zoo
            seed=123,
        )
    )
    return c


# --------------------------------------------------------------------------------------------
# Grids and rows
# --------------------------------------------------------------------------------------------


def make_grid(kind: str, steps: int, schedule: dpm.Schedule, sigma_max: float | None = None):
    """``(steps + 1,)`` descending times ending at ``t = 0`` (the last step denoises).

    ``uniform-t``: linspace(1, 0); ``karras``: EDM's rho = 7 grid in sigma_bar from
    ``sigma_max`` (default sigma_bar(1), 157 for DDPM's linear schedule) down to
    sigma_bar(t_min), then 0; ``log-SNR``: uniform in log-SNR from t = 1 to t_min over
    ``steps - 1`` steps, then 0.
    """
    if kind == "uniform-t":
        return uniform_time(steps, schedule, t_end=0.0)
    if kind == "karras":
        return karras(steps, schedule, sigma_max=sigma_max)
    if kind == "log-SNR":
        if steps < 2:
            raise ValueError(f"log-SNR grid needs steps >= 2 (the last step denoises); got {steps}")
        return jnp.concatenate([uniform_log_snr(steps - 1, schedule), jnp.zeros(1)])
    raise ValueError(f"grid must be one of {GRIDS}; got {kind!r}")


@dataclasses.dataclass(frozen=True)
class Row:
    """One sampler at one grid and step count."""

    solver: str
    grid: str
    steps: int
    sigma_max: float | None = None
    note: str = ""

    @property
    def name(self) -> str:
        g = self.grid + (f" from {self.sigma_max:g}" if self.sigma_max else "")
        return f"{self.solver}, {g}, {self.steps} steps{self.note}"

    def nfe(self) -> int:
        return {"EDM-Heun": 2 * self.steps - 1, "F-PNDM": self.steps + 9}.get(self.solver,
                                                                               self.steps)


def solvers_of(config) -> dict[str, Callable]:
    """solver name -> ``fn(den, x_T, ts, key)`` (one jitted program per solver and grid
    length; with ``train.fast_compile`` compiled with XLA backend optimisations off, like the
    train step)."""
    e = config.eval
    ts_ddim = time_shift(ddim, window=e.ts_window, cutoff=e.ts_cutoff)
    fns = {
        "DDIM": lambda d, x, ts, key: ddim(d, x, ts),
        "DPM-Solver++(2M)": lambda d, x, ts, key: dpm_solver_pp(d, x, ts, order=2),
        "F-PNDM": lambda d, x, ts, key: pndm(d, x, ts, variant="f-pndm"),
        "EDM-Heun": lambda d, x, ts, key: edm_heun(d, x, ts),
        "TS-DDIM": lambda d, x, ts, key: ts_ddim(d, x, ts),
        "DDPM": lambda d, x, ts, key: ddpm(d, x, ts, key=key),
    }
    fast = config.train.get("fast_compile", False)
    opts = fast_compile_options() if fast else None
    return {k: jax.jit(f, compiler_options=opts) for k, f in fns.items()}


def rows_of(config) -> list[Row]:
    """The table's rows: the common ~``eval.nfe`` budget on uniform-t, the grid x solver block
    (Heun vs DPM-Solver++(2M) at the same NFE on each grid), EDM-Heun at EDM's own setting,
    and strided DDPM as the slow reference."""
    e = config.eval
    hs = max((e.nfe + 1) // 2, 2)  # Heun steps; 2 hs - 1 NFE
    n = 2 * hs - 1
    rows = [Row("DDIM", "uniform-t", n), Row("TS-DDIM", "uniform-t", n,
                                               note=f" (w={e.ts_window}, t_c={e.ts_cutoff})"),
            Row("F-PNDM", "uniform-t", n)]
    for g in GRIDS:
        rows += [Row("DPM-Solver++(2M)", g, n), Row("EDM-Heun", g, hs)]
    rows += [Row("EDM-Heun", "karras", e.edm_steps, sigma_max=e.edm_sigma_max),
             Row("DDPM", "uniform-t", e.ddpm_steps, note=" (reference)")]
    return rows


# --------------------------------------------------------------------------------------------
# Denoisers
# --------------------------------------------------------------------------------------------


def _memorizing_x0(images, labels, std, schedule, x, t, cond):
    # Exact posterior mean of x0 for data = sum_k N(images_k, std^2 I) (uniform weights),
    # restricted to the components of the conditioning label (all of them for the null label).
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    a = schedule.alpha(t)[:, None]
    s = schedule.sigma(t)[:, None]
    xf = x.reshape(x.shape[0], -1)
    m = images.reshape(images.shape[0], -1)
    v = a**2 * std**2 + s**2  # (B, 1)
    d2 = (jnp.sum(xf**2, 1, keepdims=True) - 2 * a * (xf @ m.T)
          + a**2 * jnp.sum(m**2, 1)[None])  # |x - a m_k|^2, (B, K)
    logits = -d2 / (2 * v)
    if cond is not None:
        lab = cond["label"][:, None]
        keep = (labels[None, :] == lab) | (lab >= 10)
        logits = jnp.where(keep, logits, -jnp.inf)
    r = jax.nn.softmax(logits, axis=-1)
    mean_m = r @ m
    x0 = mean_m + (a * std**2 / v) * (xf - a * mean_m)
    return x0.reshape(x.shape).astype(x.dtype)


def memorizing_denoiser(images, labels, std: float, schedule: dpm.Schedule, cond=None):
    """The exact x0-denoiser of a mixture of isotropic Gaussians (sd ``std``) at the train
    images: the minimiser of the training loss on the train split, i.e. a perfectly trained,
    memorising model. Samplers that do not reproduce train-like images with it are at fault,
    not the network."""
    fn = Partial(_memorizing_x0, jnp.asarray(images), jnp.asarray(labels), std, schedule)
    return dpm.Denoiser(fn, schedule, "x0", cond)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def sample(denoiser_of, shape, fn, ts, labels, key, scale: float, num_classes: int = 10):
    """Raw (unclipped) samples of ``fn`` with the denoiser ``denoiser_of(cond)``."""
    cond = {"label": jnp.asarray(labels, jnp.int32)}
    den = denoiser_of(cond)
    if scale != 1.0:
        den = dpm.classifier_free_guidance(
            den, scale, {"label": jnp.full_like(cond["label"], num_classes)})
    k_x, k_s = jax.random.split(key)
    x_T = jax.random.normal(k_x, (len(labels), *shape))
    return np.asarray(fn(den, x_T, ts, k_s))


def grade_rows(config, denoiser_of, schedule, data, test_data, judge, out_dir,
               *, progress: bool = True, cache_dir: str | None = None,
               model_key: dict | None = None) -> dict:
    """Samples every row of :func:`rows_of` and grades it with :func:`experiments._zoo.evaluate`;
    the floor and the noise control first. Returns ``{row name: metrics}``.

    With ``cache_dir``, each row's metrics are cached under the key (row, evaluation settings,
    ``model_key``): a re-run with nothing changed reads them back, a changed row or setting is
    recomputed alone."""
    e = config.eval
    say = print if progress else (lambda *a, **k: None)
    n = min(e.num_samples, len(test_data["x"]), len(data["x"]))
    labels = np.arange(n) % (int(data["y"].max()) + 1)  # class-balanced
    shape = test_data["x"].shape[1:]
    ev = functools.partial(_zoo.evaluate, judge=judge, test_data=test_data, seed=e.seed)
    grading = {k: e[k] for k in ("num_samples", "guidance_scale", "classifier_steps", "seed",
                                 "denoiser", "oracle_std", "zoo_root")}

    def cached(key, fn):
        return _io.cached(cache_dir, {**key, "grading": grading, "n": n,
                                      "model": model_key}, fn)

    say(f"grading: the real-data floor and a noise control (n = {n}) ...", flush=True)

    def floor():
        return {"nfe": 0, **_zoo.floor(data, test_data, judge, n, labels=labels, seed=e.seed)}

    results = {"real train digits (floor)": cached({"row": "floor"}, floor)}
    noise = np.random.default_rng(e.seed).standard_normal((n, *shape))
    results["Gaussian noise (broken sampler)"] = {"nfe": 0, **ev(noise, labels)}
    fns = solvers_of(config)
    rows = rows_of(config)
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        fname = f"{i:02d}_{row.solver}_{row.grid}_{row.steps}".replace("(", "_").replace(
            ")", "").replace("+", "p")
        ran = []

        def run(row=row, fname=fname, t0=t0, ran=ran):
            ts = make_grid(row.grid, row.steps, schedule, row.sigma_max)
            imgs = sample(denoiser_of, shape, fns[row.solver], ts, labels,
                          jax.random.key(e.seed + 1), e.guidance_scale)
            secs = time.perf_counter() - t0
            _io.save_image_grid(os.path.join(out_dir, f"{fname}.png"),
                                np.clip(np.nan_to_num(imgs[:100]), -1, 1), ncol=10)
            ran.append(True)
            return {"nfe": row.nfe(), **ev(imgs, labels), "seconds": secs}

        results[row.name] = cached({"row": dataclasses.asdict(row)}, run)
        r = results[row.name]
        say(f"  [{i + 1}/{len(rows)}] {row.name}: NFE {row.nfe()}, KID {r['kid']:.4f}, "
            f"FD {r['fd']:.3f}, acc {r['accuracy']:.3f}, "
            + (f"{r['seconds']:.1f}s" if ran else "cached"), flush=True)
    return results


COLUMNS = [("nfe", "NFE"), ("kid_pm", "KID x 1e3"), ("fd", "feature-FD"),
           ("precision", "precision"), ("recall", "recall"), ("accuracy", "accuracy"),
           ("hfer", "HFER"), ("frac_pixels_out_of_range", "pixels > 1")]


def table(results: dict) -> str:
    """The markdown table of :func:`grade_rows`' results."""
    rows = {}
    for name, r in results.items():
        rows[name] = {**r, "kid_pm": {"mean": 1e3 * r["kid"], "sd": 1e3 * r["kid_sd"]}}
    return _report.markdown_table(rows, COLUMNS, row_header="sampler, grid, steps")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True) -> dict:
    e = config.eval
    if e.denoiser not in DENOISERS:
        raise ValueError(f"eval.denoiser must be one of {DENOISERS}; got {e.denoiser!r}")
    if e.nfe < 3:
        raise ValueError(f"eval.nfe must be >= 3 (Heun needs 2 steps); got {e.nfe}")
    if e.zoo_root:  # the shared zoo's model and judges (trained once for all experiments)
        trained = _zoo.digits_model(config, e.zoo_root, progress=progress)
    else:
        trained = train_denoiser(config, workdir, progress=progress)
    if trained.test_data is None:
        raise ValueError("config.data.test_fraction must be > 0: samples are graded against the "
                         f"held-out split; got {config.data.test_fraction!r}")
    data, test_data = trained.data, trained.test_data
    if progress:
        print(f"judges: training (or restoring) two digit classifiers ({e.classifier_steps} "
              "steps each) ...", flush=True)
    primary, judge = _zoo.judges(data, e.zoo_root or workdir, test_data,
                                 steps=e.classifier_steps)
    if e.denoiser == "unet":
        denoiser_of = trained.denoiser
        model = (f"class-conditional `{config.model.preset}` U-Net trained "
                 f"{int(trained.state.step)} steps on the train split")
    else:
        denoiser_of = functools.partial(memorizing_denoiser, data["x"], data["y"], e.oracle_std,
                                        trained.schedule)
        model = (f"exact denoiser of the train split (mixture of N(image, {e.oracle_std}^2 I)), "
                 "no network")
    t0 = time.perf_counter()
    model_key = {"config": {k: v for k, v in config.to_dict().items() if k != "eval"},
                 "step": int(trained.state.step), "denoiser": e.denoiser}
    results = grade_rows(config, denoiser_of, trained.schedule, data, test_data, judge,
                         os.path.join(workdir, "samples"), progress=progress,
                         cache_dir=workdir, model_key=model_key)
    report = {
        "config": config.to_dict(),
        "model": model,
        "train": {"steps": int(trained.state.step), "seconds_this_run": trained.seconds,
                  "skipped_updates": int(trained.state.skipped)},
        "judge_held_out_accuracy": judge.held_out_accuracy,
        "primary_held_out_accuracy": primary.held_out_accuracy,
        "train_size": len(data["x"]),
        "test_size": len(test_data["x"]),
        "num_samples": results["real train digits (floor)"]["n"],
        "sampling_seconds": time.perf_counter() - t0,
        "samplers": results,
    }
    report["table_md"] = table(results)
    notes = (f"Model: {model}. n = {report['num_samples']} samples per row (class-balanced; the "
             f"floor draws train digits with the same labels), compared with the "
             f"{report['test_size']} held-out test digits; KID sd is "
             "over 100 half-size subsets. Command: `python -m experiments.quickstart`.")
    _report.write_report(workdir, "report", report["table_md"], report,
                         judge=_zoo.judge_description(judge, e.classifier_steps),
                         title="Quickstart: samplers of the digits U-Net", notes=notes)
    return report


def print_report(report: dict) -> None:
    print(report["table_md"])
    print(f"model: {report['model']}; judge held-out accuracy "
          f"{report['judge_held_out_accuracy']:.3f}; n = {report['num_samples']} per row vs "
          f"{report['test_size']} test digits; the floor row is real train digits")


def main(argv: Sequence[str] | None = None) -> dict:
    config, workdir = parse_args(argv, "experiments.quickstart", __doc__.splitlines()[0])
    report = train_and_evaluate(config, workdir)
    print_report(report)
    print(f"report: {os.path.join(workdir, 'report.md')}; sample grids: "
          f"{os.path.join(workdir, 'samples')}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
