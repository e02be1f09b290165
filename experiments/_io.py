"""Host-side output of experiments: PNG image grids, JSON and JSON-lines files."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def to_jsonable(value: Any) -> Any:
    """Numpy / JAX scalars and arrays to plain Python for strict JSON: non-finite floats become
    the strings ``"nan"``, ``"inf"``, ``"-inf"`` (bare ``NaN`` is not JSON)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON text of ``obj`` (see :func:`to_jsonable`)."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented strict JSON, atomically (temporary file, then rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(dumps(obj, indent=2))
    os.replace(tmp, path)


class JsonlWriter:
    """Appends one strict-JSON object per line (metrics of a training run); flushed per write so
    a killed run keeps what it logged."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, record: Mapping[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(dumps(record) + "\n")

    def truncate_after(self, step: int) -> int:
        """Drops the records of steps past ``step`` (those a resumed run will log again) and a
        torn last line of a killed write, atomically; returns the number dropped. After it, the
        log of a killed-and-resumed run equals the log of an uninterrupted one."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path) as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        if len(kept) != len(lines):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        return len(lines) - len(kept)


def cached(workdir: str | os.PathLike | None, key: Mapping[str, Any], fn):
    """``fn()`` (a JSON-able value), cached as ``workdir/cache/<hash of key>.json``: a re-run
    with the same ``key`` reads it back, so a killed run resumes cell by cell and an unchanged
    one costs nothing; ``workdir=None`` computes without caching. ``key`` must name everything
    the value depends on."""
    if workdir is None:
        return fn()
    import hashlib

    text = dumps(key, sort_keys=True)
    path = os.path.join(os.fspath(workdir), "cache",
                        hashlib.sha1(text.encode()).hexdigest()[:16] + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return _nonfinite_back(json.load(f)["value"])
    value = fn()
    write_json(path, {"key": json.loads(text), "value": value})
    return value


def _nonfinite_back(value: Any) -> Any:
    """The inverse of :func:`to_jsonable` on non-finite floats."""
    if isinstance(value, dict):
        return {k: _nonfinite_back(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nonfinite_back(v) for v in value]
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def image_grid(images: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
    """Tiles ``(N, H, W, C)`` images in ``[-1, 1]`` into one uint8 ``(rows, cols, C)`` picture."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, H, W, C); got {images.shape}")
    n, h, w, c = images.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    pix = np.clip((images + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + q * (w + pad)
        grid[y0 : y0 + h, x0 : x0 + w] = pix[i]
    return grid


def save_image_grid(
    path: str | os.PathLike, images: np.ndarray, ncol: int | None = None, scale: int = 4
) -> None:
    """Saves images in ``[-1, 1]`` as a PNG grid, upscaled ``scale`` times (nearest)."""
    from PIL import Image

    grid = image_grid(images, ncol)
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    Image.fromarray(grid).save(os.fspath(path))
