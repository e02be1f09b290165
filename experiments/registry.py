"""Name -> function tables for the command line (the library itself has no string registries).

``make_dataset(name, **kwargs)`` builds a built-in or user data set, ``get_schedule(name,
**kwargs)`` a noise schedule; configs name them as strings, the library takes objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

import dpm
from dpm import data as D

__all__ = ["SCHEDULES", "get_schedule", "make_dataset"]

def make_dataset(name: str, **kwargs: Any) -> dict[str, np.ndarray]:
    """Build a data set (dict of arrays with a shared leading N) by name.

    Names and the function whose keyword arguments they take:
      ``"ring8" | "grid25" | "two_moons" | "swiss_roll"``: ``toy_2d(name, n, seed=...)``;
      ``"gaussian_mixture"``: ``gaussian_mixture_samples(means, stds, weights, n, seed=...)``;
      ``"digits"``: ``load_digits``; ``"lfw"``: ``D.load_lfw_faces``;
      ``"skimage_patches"``: ``skimage_patches``; ``"folder"``: ``D.load_image_folder``;
      ``"npz"``: ``D.load_npz``.

    Args:
      name: one of the names above.
      **kwargs: keyword arguments of the function named above.

    Returns:
      dict of numpy arrays: ``"x"`` and, where the source has them, ``"y"`` labels.
    """
    builders: dict[str, Callable[..., dict[str, np.ndarray]]] = {
        "digits": D.load_digits,
        "lfw": D.load_lfw_faces,
        "skimage_patches": D.skimage_patches,
        "folder": D.load_image_folder,
        "npz": D.load_npz,
    }
    if name in D.TOY_2D_NAMES:
        return D.toy_2d(name, **kwargs)
    if name == "gaussian_mixture":
        x, y = D.gaussian_mixture_samples(**kwargs)
        return {"x": x, "y": y}
    if name not in builders:
        names = sorted([*D.TOY_2D_NAMES, "gaussian_mixture", *builders])
        raise ValueError(f"name must be one of {names}, got {name!r}")
    return builders[name](**kwargs)


SCHEDULES = ("linear", "scaled_linear", "cosine", "vp_linear", "vp_cosine", "edm")


def get_schedule(name: str, **kwargs: Any) -> dpm.Schedule:
    """A schedule by name: ``"linear" | "scaled_linear" | "cosine"`` (discrete DDPM, N =
    ``num_steps``), ``"vp_linear"`` / ``"vp_cosine"`` (continuous) or ``"edm"``."""
    if name in ("linear", "scaled_linear", "cosine"):
        return dpm.DiscreteVP.from_name(name, **kwargs)
    builders: dict[str, Callable[..., dpm.Schedule]] = {
        "vp_linear": dpm.LinearVP, "vp_cosine": dpm.CosineVP, "edm": dpm.EDM}
    if name not in builders:
        raise ValueError(f"schedule name must be one of {list(SCHEDULES)}; got {name!r}")
    return builders[name](**kwargs)
