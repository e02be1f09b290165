"""The README's "In a notebook" snippet runs as printed and samples the mixture it defines: the
per-coordinate mean and standard deviation of its 1024 samples match the mixture's closed form.

The same check fails for the snippet's former grid (10 steps uniform in t ending at t = 0, whose
last first-order jump shrank the modes' spread from 0.30 to 0.20), so it can catch a bad grid.
"""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
OLD_GRID = "ts = grids.uniform_time(10, schedule, t_end=0.0)"


def readme_snippet(section: str = "## In a notebook") -> str:
    """The first python block of a README section."""
    text = README.read_text()
    assert section in text, f"README has no section {section!r}"
    body = text.split(section, 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", body, re.S)
    assert m, f"no python block in README section {section!r}"
    return m.group(1)


def run(code: str) -> dict:
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - the README's own snippet
    return ns


def moment_errors(ns: dict) -> tuple[np.ndarray, np.ndarray]:
    """(|mean - exact| / (exact std / sqrt(n)), |std / exact std - 1|) per coordinate."""
    data, x0 = ns["data"], np.asarray(ns["x0"], np.float64)
    mu = np.asarray(data.means, np.float64)  # (K, D)
    s2 = np.asarray(data.stds, np.float64) ** 2  # (K,) isotropic components
    w = np.asarray(data.weights, np.float64)
    mean = w @ mu
    std = np.sqrt(w @ (s2[:, None] + mu**2) - mean**2)
    z = np.abs(x0.mean(0) - mean) / (std / np.sqrt(x0.shape[0]))
    return z, np.abs(x0.std(0) / std - 1.0)


def test_notebook_snippet_samples_the_mixture():
    code = readme_snippet()
    assert OLD_GRID not in code
    ns = run(code)
    assert ns["x0"].shape == ns["x_T"].shape
    z, rel_std = moment_errors(ns)
    # the means within 4 standard errors, the stds within 10% (measured: 0.3% and 3.4%)
    assert np.all(z < 4.0), z
    assert np.all(rel_std < 0.10), rel_std

    # the former grid fails the same check: the second coordinate's std is 0.20, not 0.30
    old = re.sub(r"^ts = .*$", OLD_GRID, code, count=1, flags=re.M)
    assert old != code
    _, rel_old = moment_errors(run(old))
    assert rel_old[1] > 0.25, rel_old
