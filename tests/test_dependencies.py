"""`pip install dpm` stays light: the library imports none of the experiments' dependencies."""

import ast
import pathlib
import re
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTRAS_ONLY = ("sklearn", "skimage", "PIL", "rich", "matplotlib", "torch", "diffusers")
COMPARE_ONLY = ("torch", "diffusers")  # [compare]: experiments/bench_vs_torch.py, in functions
CORE = {"jax", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "ml_collections", "absl-py"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]


def test_importing_the_library_loads_no_experiment_dependency():
    # rich is left out here: flax itself imports it (flax.linen.summary); the check below makes
    # sure no module of ours does
    code = (
        "import sys, dpm, solvers, nets\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(EXTRAS_ONLY) - {'rich'}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def _module_level_imports(path: pathlib.Path) -> set[str]:
    """Top-level package names imported outside functions (at import time) by ``path``."""
    names = set()

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if not inside and isinstance(child, ast.Import):
                names.update(a.name.split(".")[0] for a in child.names)
            elif not inside and isinstance(child, ast.ImportFrom) and child.level == 0:
                names.add(child.module.split(".")[0])
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return names


def test_library_modules_import_extras_only_inside_functions():
    offenders = {}
    for package in ("dpm", "solvers", "nets"):
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = _module_level_imports(path) & set(EXTRAS_ONLY)
            if bad:
                offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_experiments_import_torch_only_inside_functions():
    # experiments.bench_vs_torch imports torch and diffusers lazily: every experiment module
    # (and the JAX side of the comparison) imports without the [compare] extra
    offenders = {}
    for path in sorted((ROOT / "experiments").rglob("*.py")):
        bad = _module_level_imports(path) & set(COMPARE_ONLY)
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_scan_finds_a_module_level_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom PIL import Image\ndef f():\n    import sklearn\n")
    assert _module_level_imports(f) == {"os", "PIL"}


def test_pyproject_core_and_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {_name(r) for r in project["dependencies"]} == CORE
    extras = project["optional-dependencies"]
    assert {_name(r) for r in extras["experiments"]} == {
        "scikit-learn", "scikit-image", "pillow", "rich", "matplotlib", "filelock"}
    assert "dpm[experiments]" in extras["test"] and "pytest" in map(_name, extras["test"])
    assert extras["cuda"] == ["jax[cuda12]"] and extras["tpu"] == ["jax[tpu]"]
    assert {_name(r) for r in extras["compare"]} == {"dpm", "torch", "diffusers"}
    assert "dpm[experiments]" in extras["compare"]
