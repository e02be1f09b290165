"""Name -> function tables for the command line (the library itself has no string registries).

``make_dataset(name, **kwargs)`` builds a built-in or user data set, ``get_schedule(name,
**kwargs)`` a noise schedule; configs name them as strings, the library takes objects.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

import dpm
from dpm import data as D

__all__ = ["DATASETS", "SCHEDULES", "dataset_builder", "get_schedule", "make_dataset"]

_BUILDERS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "digits": D.load_digits,
    "lfw": D.load_lfw_faces,
    "skimage_patches": D.skimage_patches,
    "folder": D.load_image_folder,
    "npz": D.load_npz,
}

DATASETS = tuple(sorted([*D.TOY_2D_NAMES, "gaussian_mixture", *_BUILDERS]))


@functools.wraps(D.gaussian_mixture_samples)
def _gaussian_mixture(*args: Any, **kwargs: Any) -> dict[str, np.ndarray]:
    x, y = D.gaussian_mixture_samples(*args, **kwargs)
    return {"x": x, "y": y}


def dataset_builder(name: str) -> Callable[..., dict[str, np.ndarray]]:
    """The function that ``make_dataset(name, **kwargs)`` calls with ``kwargs``.

    Its signature (``inspect.signature``) lists the keyword arguments the data set takes, so a
    config's ``data.kwargs`` can be checked before anything is loaded.

    Args:
      name: one of :data:`DATASETS`.

    Returns:
      ``fn(**kwargs) -> dict of numpy arrays``.

    Raises:
      ValueError: ``name`` is not one of :data:`DATASETS`.
    """
    if name in D.TOY_2D_NAMES:
        return functools.partial(D.toy_2d, name)
    if name == "gaussian_mixture":
        return _gaussian_mixture
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {list(DATASETS)}, got {name!r}")
    return _BUILDERS[name]


def make_dataset(name: str, **kwargs: Any) -> dict[str, np.ndarray]:
    """Build a data set (dict of arrays with a shared leading N) by name.

    Names and the function whose keyword arguments they take:
      ``"ring8" | "grid25" | "two_moons" | "swiss_roll"``: ``toy_2d(name, n, seed=...)``;
      ``"gaussian_mixture"``: ``gaussian_mixture_samples(means, stds, weights, n, seed=...)``;
      ``"digits"``: ``load_digits``; ``"lfw"``: ``D.load_lfw_faces``;
      ``"skimage_patches"``: ``skimage_patches``; ``"folder"``: ``D.load_image_folder``;
      ``"npz"``: ``D.load_npz``.

    Args:
      name: one of the names above (:data:`DATASETS`).
      **kwargs: keyword arguments of the function named above.

    Returns:
      dict of numpy arrays: ``"x"`` and, where the source has them, ``"y"`` labels.
    """
    return dataset_builder(name)(**kwargs)


SCHEDULES = ("linear", "scaled_linear", "cosine", "vp_linear", "vp_cosine", "cosine_log_snr",
             "edm")


def get_schedule(name: str, **kwargs: Any) -> dpm.Schedule:
    """A schedule by name: ``"linear" | "scaled_linear" | "cosine"`` (discrete DDPM, N =
    ``num_steps``), ``"vp_linear"`` / ``"vp_cosine"`` (continuous), ``"cosine_log_snr"``
    (progressive distillation's, log-SNR in [-20, 20]) or ``"edm"``."""
    if name in ("linear", "scaled_linear", "cosine"):
        return dpm.DiscreteVP.from_name(name, **kwargs)
    builders: dict[str, Callable[..., dpm.Schedule]] = {
        "vp_linear": dpm.LinearVP, "vp_cosine": dpm.CosineVP,
        "cosine_log_snr": dpm.CosineLogSNR, "edm": dpm.EDM}
    if name not in builders:
        raise ValueError(f"schedule name must be one of {list(SCHEDULES)}; got {name!r}")
    return builders[name](**kwargs)
