"""Quickstart, the main job: train a class-conditional U-Net on the 8x8 digits (built-in data,
a few minutes on 2 CPU cores), then sample with the project's fast samplers at ~10 network
evaluations and grade them with an independently trained classifier.

    python -m experiments.quickstart [--workdir runs/quickstart] [--config.train.steps=3000]

Prints a table of feature-FD (Fréchet distance in the judge classifier's features, lower is
better) and class accuracy of the samples per sampler, writes ``<workdir>/report.json`` and one
PNG grid per sampler under ``<workdir>/samples/``. Re-running resumes training from the
workdir's latest checkpoint (and skips it when finished).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import dpm
from experiments import _io
from experiments._cli import parse_args
from experiments._runner import Trained, base_config, train_denoiser
from experiments.features import feature_fd, primary_and_judge
from solvers.ddim import ddim
from solvers.ddpm import ddpm
from solvers.dpm_solver import dpm_solver_pp
from solvers.edm import edm_heun
from solvers.grids import karras, uniform_time
from solvers.pndm import pndm
from solvers.time_shift import time_shift


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "quickstart"
    c.model.num_classes = 10
    c.model.label_dropout = 0.1
    c.train.steps = 1500
    c.train.batch_size = 128
    c.train.ckpt_every = 500
    c.optim.learning_rate = 2e-3
    c.optim.warmup_steps = 100
    c.eval = ml_collections.ConfigDict(
        dict(num_samples=400, guidance_scale=1.0, nfe=10, ddpm_steps=1000,
             ts_window=40, ts_cutoff=0.2, classifier_steps=600, seed=123)
    )
    return c


def samplers(config) -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (sampler(den, x_T, ts, key), grid(schedule), NFE) at about ``config.eval.nfe``
    evaluations (F-PNDM's warm-up costs 9 more; Heun uses 2S - 1)."""
    n = config.eval.nfe
    grid = lambda s: uniform_time(n, s, t_end=0.0)
    heun_steps = max((n + 1) // 2, 1)  # Heun: 2S - 1 evaluations
    ts_ddim = time_shift(ddim, window=config.eval.ts_window, cutoff=config.eval.ts_cutoff)
    return {
        "DDIM": (lambda d, x, ts, key: ddim(d, x, ts), grid, n),
        "DPM-Solver++(2M)": (lambda d, x, ts, key: dpm_solver_pp(d, x, ts, order=2), grid, n),
        "F-PNDM": (lambda d, x, ts, key: pndm(d, x, ts, variant="f-pndm"), grid, n + 9),
        "EDM-Heun": (lambda d, x, ts, key: edm_heun(d, x, ts),
                     lambda s: karras(heun_steps, s), 2 * heun_steps - 1),
        "TS-DDIM": (lambda d, x, ts, key: ts_ddim(d, x, ts), grid, n),
        f"DDPM-{config.eval.ddpm_steps} (reference)": (
            lambda d, x, ts, key: ddpm(d, x, ts, key=key),
            lambda s: uniform_time(config.eval.ddpm_steps, s, t_end=0.0),
            config.eval.ddpm_steps),
    }


def sample(trained: Trained, fn, ts, labels, key, scale: float) -> np.ndarray:
    u = trained.unet
    cond = {"label": jnp.asarray(labels, jnp.int32)}
    den = trained.denoiser(cond)
    if scale != 1.0:
        den = dpm.classifier_free_guidance(
            den, scale, {"label": jnp.full_like(cond["label"], u.num_classes)})
    k_x, k_s = jax.random.split(key)
    x_T = jax.random.normal(k_x, (len(labels), u.image_size, u.image_size, u.in_channels))
    out = jax.jit(fn)(den, x_T, ts, k_s)
    return np.asarray(jnp.clip(out, -1.0, 1.0))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, progress=True) -> dict:
    trained = train_denoiser(config, workdir, progress=progress)
    e = config.eval
    x, y = trained.data["x"], trained.data["y"]
    primary, judge = primary_and_judge(x, y, os.path.join(workdir, "classifiers"),
                                       steps=e.classifier_steps)
    labels = np.arange(e.num_samples) % trained.unet.num_classes
    # two disjoint halves of the data: samples are compared with A, and B vs A is the floor
    perm = np.random.default_rng(e.seed).permutation(len(x))
    ref_a, ref_b = x[perm[: len(x) // 2]], x[perm[len(x) // 2 :]]
    report = {
        "config": config.to_dict(),
        "train": {"steps": int(trained.state.step), "seconds_this_run": trained.seconds,
                  "skipped_updates": int(trained.state.skipped)},
        "judge_held_out_accuracy": judge.held_out_accuracy,
        "primary_held_out_accuracy": primary.held_out_accuracy,
        "reference_size": len(ref_a),
        # held-out real digits, as many as the samples: the best feature-FD at this size
        "data_vs_data_feature_fd": feature_fd(judge, ref_b[: e.num_samples], ref_a),
        "samplers": {},
    }
    for i, (name, (fn, grid, nfe)) in enumerate(samplers(config).items()):
        t0 = time.perf_counter()
        imgs = sample(trained, fn, grid(trained.schedule), labels, jax.random.key(e.seed + i),
                      e.guidance_scale)
        secs = time.perf_counter() - t0
        fname = name.split(" ")[0].replace("(", "_").replace(")", "").replace("+", "p")
        _io.save_image_grid(os.path.join(workdir, "samples", f"{fname}.png"), imgs[:100], ncol=10)
        report["samplers"][name] = {
            "nfe": nfe,
            "feature_fd": feature_fd(judge, imgs, ref_a),
            "accuracy": float(np.mean(judge.predict(imgs) == labels)),
            "seconds": secs,
        }
    _io.write_json(os.path.join(workdir, "report.json"), report)
    return report


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Samples of the digits U-Net (judge: an independently trained classifier)")
    for col in ("sampler", "NFE", "feature-FD (lower is better)", "class accuracy", "seconds"):
        table.add_column(col, justify="right" if col != "sampler" else "left")
    for name, r in report["samplers"].items():
        table.add_row(name, str(r["nfe"]), f"{r['feature_fd']:.3f}", f"{r['accuracy']:.3f}",
                      f"{r['seconds']:.1f}")
    Console().print(table)
    print(f"feature-FD of held-out real digits (the floor at this sample size): "
          f"{report['data_vs_data_feature_fd']:.3f}; "
          f"judge held-out accuracy {report['judge_held_out_accuracy']:.3f}; "
          f"trained {report['train']['steps']} steps")


def main(argv: Sequence[str] | None = None) -> dict:
    config, workdir = parse_args(argv, "experiments.quickstart", __doc__.splitlines()[0])
    report = train_and_evaluate(config, workdir)
    print_report(report)
    print(f"report: {os.path.join(workdir, 'report.json')}; sample grids: "
          f"{os.path.join(workdir, 'samples')}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
