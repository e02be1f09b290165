"""Command-line handling shared by the experiments: ``get_config()`` modules with
``--config.a.b=value`` overrides (the ml_collections convention of JAX research code)."""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
from collections.abc import Sequence

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """The config of ``spec``: a module name (``experiments.quickstart``) or a ``.py`` file that
    defines ``get_config()``."""
    if spec.endswith(".py"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"config file {spec!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location("_dpm_config", spec)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {spec!r} defines no get_config()")
    return module.get_config()


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if isinstance(current, str) or current is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        return value if current is None else str(text)
    value = ast.literal_eval(text)
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]):
    """Applies ``key.path=value`` overrides (values parsed as Python literals, typed by the
    field they replace). Unknown keys are a ValueError naming the key."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override must look like key.path=value; got {item!r}")
        path, text = item.split("=", 1)
        path = path.removeprefix("--").removeprefix("config.")
        *parents, leaf = path.split(".")
        node = config
        for p in parents:
            if p not in node:
                raise ValueError(f"unknown config key {path!r} (no {p!r})")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"unknown config key {path!r}; known: {sorted(node.keys())}")
        try:
            value = _parse_value(text, node[leaf])
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"bad value for {path!r}: {text!r} ({e})") from None
        with config.unlocked():
            node[leaf] = value
    return config


def parse_args(
    argv: Sequence[str] | None, default_config: str, description: str
) -> tuple[ml_collections.ConfigDict, str]:
    """``--config MODULE_OR_FILE --workdir DIR [--config.key=value ...]`` -> (config, workdir)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, help="module or .py with get_config()")
    parser.add_argument("--workdir", default=None, help="output and checkpoint directory")
    args, rest = parser.parse_known_args(argv)
    config = load_config(args.config)
    overrides = []
    for item in rest:
        if not item.startswith("--config."):
            raise ValueError(f"unknown argument {item!r}; overrides look like --config.key=value")
        overrides.append(item[len("--config.") :])
    apply_overrides(config, overrides)
    workdir = args.workdir or os.path.join("runs", config.get("name", "run"))
    return config, workdir
