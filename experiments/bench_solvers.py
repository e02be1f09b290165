"""Benchmark: every sampler on the Gaussian-mixture oracle at matched NFE — error to the exact
probability-flow endpoint, MMD to exact data, time per sample and compile time.

    python -m experiments.bench_solvers            # NFE 5, 10, 20, 50 on both problems
    python -m experiments.bench_solvers --quick    # NFE 10, the 2-D ring, 256 samples (< 1 min)

Problems (exact denoiser, so only the sampler is measured): ``mix8d``, 3 isotropic Gaussians in
8-D, and ``ring2d``, 8 Gaussians on a circle of radius 2 (std 0.15); discrete linear-beta DDPM
schedule (N = 1000; ``--quick``: its continuous counterpart, cheaper to compile). Every sampler
starts from the same exact samples of ``x_1`` and ends at ``t = 0``.

* **Flow error** (deterministic samplers): RMS distance per coordinate to the exact flow's
  endpoint from the same ``x_1``. The flow of a mixture has no closed form; the reference is
  classical RK4 in EDM's variables (``dx_bar / dsigma_bar = eps_hat``, smooth down to
  ``sigma_bar = 0`` because every component has std > 0) on a Karras grid (rho = 7) with
  ``--ref-steps`` steps in float64; its own error, the RMS change when the steps are halved, is
  reported and is orders of magnitude below every sampler's.
* **MMD^2** (all samplers, the only score of the stochastic ones): unbiased RBF MMD^2 to as many
  exact data samples, bandwidth = median pairwise distance of exact data. The same statistic
  for 5 fresh exact sample sets against the same data gives its offset (mean, slightly
  negative) and noise (std); the plot shows the excess over that mean, with +-2 std shaded:
  a sampler inside the band is indistinguishable from exact sampling at this sample size.
* **Time**: microseconds per sample of the compiled sampler (best of ``--reps`` runs) and its
  compile time, both also as ratios to DDIM at the same NFE target, all from the same run.

Steps per method are chosen to match each NFE target (F-PNDM's warm-up costs 9 extra, EDM Heun
2S - 1, BDIA-EDM with Heun both ways 3S - 2, DPM-Solver-fast hits it exactly); the table shows
the actual NFE each run reports. Grids (``--grid recommended``): uniform in t for
DDPM/DDIM/PNDM/BDIA-DDIM, uniform in log-SNR (last point moved to t = 0) for DPM-Solver(++),
Karras for EDM and BDIA-EDM; or one grid for all. Writes ``results.json`` and ``error_vs_nfe.png``
into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import dpm
from dpm.metrics import mmd_rbf
from experiments import _io
from experiments._registry import get_schedule
from solvers import grids
from solvers.bdia import bdia_ddim, bdia_edm
from solvers.ddim import ddim
from solvers.ddpm import ddpm
from solvers.dpm_solver import dpm_solver, dpm_solver_fast_orders, dpm_solver_pp
from solvers.edm import edm_euler, edm_heun, edm_stochastic
from solvers.pndm import pndm
from solvers.time_shift import time_shift

NFE_TARGETS = (5, 10, 20, 50)
GRIDS = ("recommended", "time", "logsnr", "karras")


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


def mix8d() -> dpm.GaussianMixture:
    """3 isotropic Gaussians in 8-D with unequal weights and widths."""
    means = np.random.default_rng(0).normal(size=(3, 8)) * 1.5
    return dpm.GaussianMixture.create(means, [0.3, 0.5, 0.2], [0.5, 0.3, 0.2])


def ring2d() -> dpm.GaussianMixture:
    """8 equal Gaussians (std 0.15) on a circle of radius 2."""
    a = 2 * np.pi * np.arange(8) / 8
    return dpm.GaussianMixture.create(2.0 * np.stack([np.cos(a), np.sin(a)], 1), 0.15)


PROBLEMS = {"mix8d": mix8d, "ring2d": ring2d}


# --------------------------------------------------------------------------------------------
# Samplers at an NFE target
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A sampler configuration: ``steps(nfe)`` picks the step count for an NFE target and
    ``call(den, x_T, ts, key, nfe)`` runs it with ``return_trajectory=True``."""

    name: str
    call: Callable
    steps: Callable[[int], int]
    grid: str  # the recommended grid: "time", "logsnr" or "karras"
    stochastic: bool = False


def _plain(sampler, **opts):
    return lambda den, x, ts, key, nfe: sampler(den, x, ts, key=key, return_trajectory=True, **opts)


def _fast(sampler, order):
    return lambda den, x, ts, key, nfe: sampler(
        den, x, ts, order=order, method="fast", nfe=nfe, return_trajectory=True
    )


def _f_pndm_steps(n: int) -> int:  # NFE = S + 9 for S >= 3, 4 S below
    return n - 9 if n - 9 >= 3 else max(1, n // 4)


same = lambda n: n
minus_one = lambda n: max(1, n - 1)
heun_steps = lambda n: (n + 1) // 2  # 2S - 1
fast_steps = lambda order: lambda n: len(dpm_solver_fast_orders(n, order))

METHODS = (
    Method("ddpm", _plain(ddpm), same, "time", stochastic=True),
    Method("ddim", _plain(ddim), same, "time"),
    Method("ddim_eta1", _plain(ddim, eta=1.0), same, "time", stochastic=True),
    Method("ts_ddim", _plain(time_shift(ddim, window=10, cutoff=0.3)), same, "time"),
    Method("f_pndm", _plain(pndm, variant="f-pndm"), _f_pndm_steps, "time"),
    Method("s_pndm", _plain(pndm, variant="s-pndm"), minus_one, "time"),
    Method("plms", _plain(pndm, variant="plms"), minus_one, "time"),
    Method("dpm_solver_1", _plain(dpm_solver, order=1, method="singlestep"), same, "logsnr"),
    Method("dpm_solver_2", _fast(dpm_solver, 2), fast_steps(2), "logsnr"),
    Method("dpm_solver_3", _fast(dpm_solver, 3), fast_steps(3), "logsnr"),
    Method("dpm_solver_2M", _plain(dpm_solver, order=2, method="multistep"), same, "logsnr"),
    Method("dpm_solver_3M", _plain(dpm_solver, order=3, method="multistep"), same, "logsnr"),
    Method("dpm_solver_pp_2S", _fast(dpm_solver_pp, 2), fast_steps(2), "logsnr"),
    Method("dpm_solver_pp_2M", _plain(dpm_solver_pp, order=2, method="multistep"), same, "logsnr"),
    Method("dpm_solver_pp_3M", _plain(dpm_solver_pp, order=3, method="multistep"), same, "logsnr"),
    Method("edm_euler", _plain(edm_euler), same, "karras"),
    Method("edm_heun", _plain(edm_heun), heun_steps, "karras"),
    Method(
        "edm_stochastic",
        _plain(edm_stochastic, S_churn=5.0, S_tmin=0.05, S_tmax=50.0, S_noise=1.003),
        heun_steps,
        "karras",
        stochastic=True,
    ),
    Method("bdia_ddim_g0.5", _plain(bdia_ddim, gamma=0.5), same, "time"),
    Method("bdia_ddim_g1", _plain(bdia_ddim, gamma=1.0), same, "time"),
    Method("bdia_edm_g0.5", _plain(bdia_edm, gamma=0.5), lambda n: max(1, (n + 2) // 3), "karras"),
)


def make_grid(kind: str, n_steps: int, schedule: dpm.Schedule) -> jax.Array:
    """A grid of ``n_steps`` steps from t = 1 to t = 0."""
    if kind == "time":
        return grids.uniform_time(n_steps, schedule, t_end=0.0)
    if kind == "karras":
        return grids.karras(n_steps, schedule)
    if kind == "logsnr":  # lambda-uniform to t_min, last point moved to 0 (final step order 1)
        return grids.uniform_log_snr(n_steps, schedule).at[-1].set(0.0)
    raise ValueError(f"grid must be one of {GRIDS[1:]}; got {kind!r}")


# --------------------------------------------------------------------------------------------
# Reference flow: RK4 in (x_bar, sigma_bar), float64
# --------------------------------------------------------------------------------------------


def reference_flow(gm: dpm.GaussianMixture, schedule, x_T: np.ndarray, n_steps: int) -> np.ndarray:
    """The probability-flow endpoint at t = 0 from ``x_T`` at t = 1: classical RK4 on
    ``dx_bar/dsigma_bar = eps_hat(alpha x_bar, t(sigma_bar))`` over a Karras grid (rho = 7),
    in float64."""
    with jax.enable_x64(True):
        gm64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gm)
        sched = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), schedule)
        den = gm64.denoiser(sched, "eps")
        top = sched.sigma_bar(1.0)
        ramp = jnp.linspace(0.0, 1.0, n_steps)
        sb = top ** (1 / 7) + ramp * (sched.sigma_bar(sched.t_min) ** (1 / 7) - top ** (1 / 7))
        sb = jnp.concatenate([sb**7, jnp.zeros(1)])

        def d(x_bar, sigma_bar):
            t = jnp.where(sigma_bar > 0, jnp.clip(sched.t_of_sigma_bar(sigma_bar), 0.0, 1.0), 0.0)
            return den.eps(sched.alpha(t) * x_bar, t)

        def rk4(x, s):
            s0, s1 = s
            h = s1 - s0
            k1 = d(x, s0)
            k2 = d(x + 0.5 * h * k1, s0 + 0.5 * h)
            k3 = d(x + 0.5 * h * k2, s0 + 0.5 * h)
            k4 = d(x + h * k3, s1)
            return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

        x_bar = jnp.asarray(x_T, jnp.float64) / sched.alpha(1.0)
        x_bar, _ = jax.jit(lambda x: jax.lax.scan(rk4, x, (sb[:-1], sb[1:])))(x_bar)
        return np.asarray(x_bar)  # alpha(0) = 1


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _time_compiled(fn, args, reps: int) -> tuple[float, float, tuple]:
    """(compile seconds, best run seconds, outputs) of ``jax.jit(fn)`` on ``args``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t0)
    return compile_s, best, out


def _x0_and_nfe(m: Method, ts: jax.Array, nfe: int) -> Callable:
    def fn(den, x_T, key):
        x0, traj = m.call(den, x_T, ts, key, nfe)
        return x0, traj["nfe"]  # the unused trajectory is pruned by the compiler

    return fn


def run_problem(name: str, args, methods: Sequence[Method], progress=None) -> dict:
    gm = PROBLEMS[name]()
    schedule = get_schedule(args.schedule)
    den = gm.denoiser(schedule, "eps")
    n = args.num_samples
    k_T, k_data, k_floor, k_run = jax.random.split(jax.random.key(args.seed), 4)
    x_T = gm.sample_marginal(k_T, schedule, 1.0, n)
    data = gm.sample(k_data, n)
    sub = np.asarray(data[:1000])
    bandwidth = float(np.median(np.linalg.norm(sub[:, None] - sub[None], axis=-1)))
    mmd = jax.jit(lambda x, y: mmd_rbf(x, y, bandwidth))
    # the statistic for exact samples against the same data set: its offset and spread
    exact = [float(mmd(gm.sample(k, n), data)) for k in jax.random.split(k_floor, 5)]

    ref = reference_flow(gm, schedule, x_T, args.ref_steps)
    ref_half = reference_flow(gm, schedule, x_T, args.ref_steps // 2)
    ref_err = float(np.sqrt(np.mean((ref - ref_half) ** 2)))

    rows = []
    for nfe in args.nfe:
        for m in methods:
            S = m.steps(nfe)
            kind = m.grid if args.grid == "recommended" else args.grid
            ts = make_grid(kind, S, schedule)
            fn = _x0_and_nfe(m, ts, nfe)
            compile_s, run_s, (x0, nfe_used) = _time_compiled(fn, (den, x_T, k_run), args.reps)
            x0 = np.asarray(x0, np.float64)
            finite = bool(np.all(np.isfinite(x0)))
            rows.append(
                dict(
                    sampler=m.name,
                    nfe_target=nfe,
                    nfe=int(nfe_used),
                    steps=S,
                    grid=kind,
                    stochastic=m.stochastic,
                    flow_rmse=None if m.stochastic else float(np.sqrt(np.mean((x0 - ref) ** 2))),
                    mmd2=float(mmd(jnp.asarray(x0, jnp.float32), data)) if finite else None,
                    us_per_sample=1e6 * run_s / n,
                    compile_s=compile_s,
                    finite=finite,
                )
            )
            if progress is not None:
                progress()
        base = next(r for r in rows if r["sampler"] == "ddim" and r["nfe_target"] == nfe)
        for r in rows:
            if r["nfe_target"] == nfe:
                r["time_vs_ddim"] = r["us_per_sample"] / base["us_per_sample"]
                r["compile_vs_ddim"] = r["compile_s"] / base["compile_s"]
    return dict(
        problem=name,
        dim=gm.dim,
        components=gm.num_components,
        schedule=args.schedule,
        num_samples=n,
        reference=dict(
            method="RK4 in (x_bar, sigma_bar), Karras rho=7, float64",
            steps=args.ref_steps,
            rmse_vs_half_steps=ref_err,
        ),
        mmd2_exact=dict(mean=float(np.mean(exact)), std=float(np.std(exact, ddof=1))),
        mmd_bandwidth=bandwidth,
        rows=rows,
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_tables(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for p in results["problems"]:
        t = Table(
            title=f"{p['problem']} ({p['dim']}-D, {p['components']} components, "
            f"{p['num_samples']} samples); reference RK4 {p['reference']['steps']} steps "
            f"(own error {p['reference']['rmse_vs_half_steps']:.1e}); MMD^2 of exact samples "
            f"{p['mmd2_exact']['mean']:.1e} +- {p['mmd2_exact']['std']:.1e}"
        )
        cols = (
            "sampler",
            "grid",
            "NFE",
            "steps",
            "flow RMSE",
            "MMD^2",
            "us/sample",
            "x DDIM",
            "compile s",
            "x DDIM",
        )
        for c in cols:
            t.add_column(c, justify="left" if c in ("sampler", "grid") else "right")
        for r in p["rows"]:
            t.add_row(
                r["sampler"],
                r["grid"],
                f"{r['nfe']} ({r['nfe_target']})",
                str(r["steps"]),
                _fmt(r["flow_rmse"], ".2e"),
                _fmt(r["mmd2"], ".1e"),
                f"{r['us_per_sample']:.2f}",
                f"{r['time_vs_ddim']:.2f}",
                f"{r['compile_s']:.2f}",
                f"{r['compile_vs_ddim']:.2f}",
            )
        console.print(t)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = results["problems"]
    fig, axes = plt.subplots(2, len(probs), figsize=(6 * len(probs) + 2.5, 9), squeeze=False)
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    handles = {}
    for j, p in enumerate(probs):
        base, noise = p["mmd2_exact"]["mean"], max(p["mmd2_exact"]["std"], 1e-9)
        names = list(dict.fromkeys(r["sampler"] for r in p["rows"]))
        for i, name in enumerate(names):
            rs = [r for r in p["rows"] if r["sampler"] == name]
            kw = dict(
                color=colors[i % 20],
                marker="osD^v<>"[i % 7],
                ms=4,
                ls="--" if rs[0]["stochastic"] else "-",
            )
            pts = [(r["nfe"], r["flow_rmse"]) for r in rs if r["flow_rmse"]]
            if pts:
                (handles[name],) = axes[0, j].plot(*zip(*pts, strict=True), **kw)
            pts = [(r["nfe"], r["mmd2"] - base) for r in rs if r["mmd2"] is not None]
            if pts:
                (handles[name],) = axes[1, j].plot(*zip(*pts, strict=True), **kw)
        axes[1, j].axhspan(-2 * noise, 2 * noise, color="k", alpha=0.1)
        axes[1, j].set_yscale("symlog", linthresh=2 * noise)
        axes[0, j].set(
            yscale="log",
            ylabel="RMS error to the exact flow",
            title=f"{p['problem']}: flow error (deterministic samplers)",
        )
        axes[1, j].set(
            ylabel="MMD^2 - MMD^2 of exact samples (symlog)",
            title=f"{p['problem']}: MMD^2 excess (shaded: +-2 std of exact)",
        )
        for ax in axes[:, j]:
            ax.set(xscale="log", xlabel="NFE")
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles.values(), handles.keys(), loc="center right", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="NFE 10, the ring only, 256 samples, 1 timed run (smoke test, < 1 min)",
    )
    p.add_argument("--problems", nargs="+", default=None, choices=sorted(PROBLEMS))
    p.add_argument("--nfe", type=int, nargs="+", default=None, help="NFE targets")
    p.add_argument("--samplers", nargs="+", default=None, help="subset of sampler names")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--grid", default="recommended", choices=GRIDS)
    p.add_argument(
        "--schedule",
        default=None,
        help="schedule name (default: linear, the discrete DDPM schedule)",
    )
    p.add_argument("--ref-steps", type=int, default=None, help="RK4 steps of the reference")
    p.add_argument("--reps", type=int, default=None, help="timed runs per sampler (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_solvers")
    args = p.parse_args(argv)
    quick = args.quick
    args.problems = args.problems or (["ring2d"] if quick else list(PROBLEMS))
    args.nfe = args.nfe or ([10] if quick else list(NFE_TARGETS))
    args.num_samples = args.num_samples or (256 if quick else 4096)
    args.ref_steps = args.ref_steps or (256 if quick else 2048)
    args.reps = args.reps or (3 if quick else 5)
    args.schedule = args.schedule or ("vp_linear" if quick else "linear")
    names = [m.name for m in METHODS]
    for s in args.samplers or []:
        if s not in names:
            p.error(f"unknown sampler {s!r}; choose from {names}")
    methods = [m for m in METHODS if args.samplers is None or m.name in args.samplers]
    if "ddim" not in [m.name for m in methods]:
        methods.insert(0, METHODS[1])  # the baseline of the ratios

    from rich.progress import Progress

    total = len(args.problems) * len(args.nfe) * len(methods)
    with Progress(transient=True) as bar:
        task = bar.add_task("sampling", total=total)
        problems = [
            run_problem(name, args, methods, progress=lambda: bar.advance(task))
            for name in args.problems
        ]
    results = dict(
        config=dict(vars(args)),
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        problems=problems,
    )
    print_tables(results)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "results.json")
    png_path = os.path.join(args.out, "error_vs_nfe.png")
    _io.write_json(json_path, results)
    plot(results, png_path)
    print(f"wrote {json_path} and {png_path}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
