"""Reporting helpers of the paper experiments: runs over seeds (mean +- sd), markdown tables,
report files (markdown + JSON) and metric-vs-NFE curves (PNG)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from experiments import _io

__all__ = ["command_flags", "format_mean_sd", "markdown_table", "over_seeds", "overrides",
           "plot_curves", "save_figure", "write_report"]


def over_seeds(fn: Callable[[int], Mapping[str, float]], seeds: Sequence[int]) -> dict:
    """Runs ``fn(seed) -> {metric: value}`` for each seed.

    Args:
      fn: one configuration's evaluation at a seed; every call must return the same keys.
      seeds: the seeds (>= 1; use >= 3 for a reported sd).

    Returns:
      ``{metric: {"mean": float, "sd": float, "values": [float, ...]}}`` with ``sd`` the sample
      standard deviation (ddof=1; 0.0 for a single seed).
    """
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds must be a non-empty sequence of ints; got []")
    runs = [dict(fn(s)) for s in seeds]
    keys = list(runs[0])
    for s, r in zip(seeds, runs, strict=True):
        if list(r) != keys:
            raise ValueError(f"fn(seed) must return the same metrics for every seed; seed {s} "
                             f"returned {sorted(r)}, seed {seeds[0]} returned {sorted(keys)}")
    out = {}
    for k in keys:
        v = np.array([float(r[k]) for r in runs])
        out[k] = {"mean": float(np.mean(v)),
                  "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                  "values": v.tolist()}
    return out


def _fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}g}"


def format_mean_sd(cell: Any, digits: int = 3) -> str:
    """``"mean +- sd"`` of an :func:`over_seeds` entry, or a plain number / string as is."""
    if isinstance(cell, Mapping):
        return f"{_fmt(cell['mean'], digits)} ± {_fmt(cell['sd'], digits)}"
    if isinstance(cell, (int, np.integer)):
        return str(int(cell))
    if isinstance(cell, (float, np.floating)):
        return _fmt(float(cell), digits)
    return str(cell)


def markdown_table(
    rows: Mapping[str, Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    *,
    row_header: str = "",
    digits: int = 3,
) -> str:
    """A markdown table: one row per ``rows`` entry, one column per metric.

    Args:
      rows: ``{row name: {metric: cell}}``, a cell an :func:`over_seeds` entry (shown as
        ``mean ± sd``), a number or a string; a missing metric shows as ``-``.
      columns: metric keys, or ``(key, header)`` pairs.
      row_header: header of the first column.
      digits: significant digits of numbers.

    Returns:
      The table as a string (ends with a newline).
    """
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    lines = ["| " + " | ".join([row_header] + [h for _, h in cols]) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
    for name, r in rows.items():
        cells = [format_mean_sd(r[k], digits) if k in r else "-" for k, _ in cols]
        lines.append("| " + " | ".join([str(name)] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    dir: str,
    name: str,
    table_md: str,
    data_json: Any,
    figures: Sequence[str] = (),
    *,
    judge: str,
    title: str | None = None,
    notes: str = "",
) -> tuple[str, str]:
    """Writes ``dir/<name>.md`` (title, judge statement, table, notes, figure links) and
    ``dir/<name>.json`` (``data_json`` plus the judge statement).

    Args:
      dir: output directory (created).
      name: file stem.
      table_md: the markdown table(s).
      data_json: JSON-serialisable data (numpy scalars and arrays are converted).
      figures: paths of PNGs already written (linked relative to ``dir``).
      judge: required: which network judges and how it was trained, and that its metrics are
        in-project proxies (e.g. ``experiments._zoo.judge_description(judge)``).
      title: heading (default ``name``).
      notes: markdown after the table (the finding, the command that made it).

    Returns:
      ``(markdown path, json path)``.
    """
    if not isinstance(judge, str) or not judge.strip():
        raise ValueError(f"judge must be a non-empty description of the grading network; "
                         f"got {judge!r}")
    os.makedirs(dir, exist_ok=True)
    md_path = os.path.join(dir, f"{name}.md")
    json_path = os.path.join(dir, f"{name}.json")
    parts = [f"# {title or name}", "", judge.strip(), "", table_md.rstrip(), ""]
    if notes:
        parts += [notes.rstrip(), ""]
    for f in figures:
        rel = os.path.relpath(f, dir)
        parts += [f"![{os.path.basename(f)}]({rel})", ""]
    with open(md_path, "w") as fh:
        fh.write("\n".join(parts))
    _io.write_json(json_path, {"judge": judge, "data": data_json})
    return md_path, json_path


def plot_curves(
    path: str,
    x: Sequence[float],
    curves: Mapping[str, Any],
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    logx: bool = False,
    logy: bool = False,
) -> str:
    """A small (600x400 px) line plot of metric vs ``x`` (e.g. NFE), one line per curve.

    Args:
      path: PNG path (directories created).
      x: (K,) x values shared by all curves.
      curves: ``{label: ys}`` with ``ys`` a (K,) sequence, or a list of :func:`over_seeds`
        entries (plotted as mean with a ±sd band), or ``{"mean": (K,), "sd": (K,)}``.
      xlabel: x-axis label.
      ylabel: y-axis label.
      title: plot title.
      logx: log-scale x axis.
      logy: log-scale y axis.

    Returns:
      ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(x, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, ys in curves.items():
        if isinstance(ys, Mapping):
            mean, sd = np.asarray(ys["mean"], float), np.asarray(ys["sd"], float)
        elif len(ys) and isinstance(ys[0], Mapping):
            mean = np.array([float(c["mean"]) for c in ys])
            sd = np.array([float(c["sd"]) for c in ys])
        else:
            mean, sd = np.asarray(ys, float), None
        if mean.shape != x.shape:
            raise ValueError(f"curve {label!r} must have {x.shape[0]} values (one per x); "
                             f"got {mean.shape}")
        (line,) = ax.plot(x, mean, marker="o", ms=3, label=str(label))
        if sd is not None:
            ax.fill_between(x, mean - sd, mean + sd, color=line.get_color(), alpha=0.2)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_figure(fig, path: str) -> str:
    """Lays out, writes (making the folder) and closes a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def overrides(config, default) -> list[tuple[str, object]]:
    """``(dotted key, value)`` of every setting of ``config`` that differs from ``default``
    (both ConfigDicts), so a report states exactly how its run departed from the default."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
        return out

    new, old = flat(config.to_dict()), flat(default.to_dict())
    return [(k, v) for k, v in new.items() if old.get(k, object()) != v]


def command_flags(config, default) -> str:
    """The ``--config.key=value`` flags that turn ``default`` into ``config``."""
    return " ".join(f"--config.{k}={v!r}".replace(" ", "") for k, v in overrides(config, default))


def finished_config(workdir: str, experiment: str):
    """The config of the finished run of ``experiments.<experiment>`` in ``workdir``, as its
    ``report.json`` (written by :func:`write_report` with the report's ``"config"``) records it.

    Raises:
      ValueError: naming the workdir and the command that makes the run, when there is none.
    """
    import json

    import ml_collections

    path = os.path.join(workdir, "report.json")
    if not os.path.exists(path):
        raise ValueError(f"workdir={workdir!r} holds no finished {experiment} run (no "
                         f"report.json): run `python -m experiments.{experiment} --workdir "
                         f"{workdir}` first")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f)["data"]["config"])

