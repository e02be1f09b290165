"""Patches of the sample images bundled inside scikit-image's wheel (super-resolution data)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dpm.data.transforms import to_unit_range

__all__ = [
    "SKIMAGE_COLOR_IMAGES",
    "SKIMAGE_GRAY_IMAGES",
    "random_patches",
    "skimage_patches",
]

# Sample images that ship inside the scikit-image wheel (load with no network).
SKIMAGE_COLOR_IMAGES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
SKIMAGE_GRAY_IMAGES = ("camera", "brick", "grass", "gravel", "moon", "coins", "clock", "page")


def _skimage_image(name: str, grayscale: bool) -> np.ndarray:
    """A bundled scikit-image sample as (H, W, C) float in [0, 1], C = 1 or 3."""
    import skimage.data

    known = SKIMAGE_COLOR_IMAGES + SKIMAGE_GRAY_IMAGES
    if name not in known:
        raise ValueError(f"images must be names from {known}, got {name!r}")
    img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64) / 255.0
    if img.ndim == 2:
        img = img[..., None]
    img = img[..., :3]
    if grayscale and img.shape[-1] == 3:
        img = img @ np.array([0.299, 0.587, 0.114])[:, None]  # ITU-R 601 luma
    elif not grayscale and img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    return img


def skimage_patches(
    patch_size: int,
    num_patches: int,
    *,
    seed: int = 0,
    images: Sequence[str] = SKIMAGE_COLOR_IMAGES,
    grayscale: bool = False,
    downscale: int | None = None,
) -> dict[str, np.ndarray]:
    """Random square patches of the sample images bundled inside scikit-image's wheel.

    Each patch picks an image uniformly, then a uniform position in it. For
    super-resolution, ``downscale=s`` adds the low-resolution patch made by averaging
    non-overlapping ``s x s`` blocks.

    Args:
      patch_size: side of a patch (at most the smallest image side).
      num_patches: number of patches.
      seed: numpy seed.
      images: names from ``SKIMAGE_COLOR_IMAGES`` / ``SKIMAGE_GRAY_IMAGES``.
      grayscale: one luma channel instead of RGB.
      downscale: optional integer factor dividing ``patch_size``.

    Returns:
      ``{"x": (num_patches, P, P, C) float32 in [-1, 1]}`` and, with ``downscale``,
      ``"x_low": (num_patches, P / s, P / s, C)``; C is 1 or 3.
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size must be > 0, got {patch_size}")
    if num_patches < 0:
        raise ValueError(f"num_patches must be >= 0, got {num_patches}")
    if isinstance(images, str) or not images:
        raise ValueError(f"images must be a non-empty sequence of names, got {images!r}")
    if downscale is not None and (downscale <= 0 or patch_size % downscale):
        raise ValueError(
            f"downscale must be a positive divisor of patch_size={patch_size}, got {downscale}"
        )
    sources = [_skimage_image(name, grayscale) for name in images]
    out = {"x": random_patches([to_unit_range(img, 0.0, 1.0) for img in sources], patch_size,
                               num_patches, seed=seed, names=images)}
    if downscale is not None:
        s, m, c = downscale, patch_size // downscale, out["x"].shape[-1]
        out["x_low"] = out["x"].reshape(num_patches, m, s, m, s, c).mean(axis=(2, 4))
    return out


def random_patches(
    images: Sequence[np.ndarray],
    patch_size: int,
    num_patches: int,
    *,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """Random square patches of a list of images (the bundled samples, or a user's folder).

    Each patch picks an image uniformly, then a uniform position in it.

    Args:
      images: ``(H_i, W_i, C)`` float arrays (any sizes, one channel count).
      patch_size: side of a patch (at most every image's smaller side).
      num_patches: number of patches.
      seed: numpy seed.
      names: the images' names, for error messages.

    Returns:
      ``(num_patches, P, P, C)`` float32, values as in ``images``.
    """
    for name, v, low in (("patch_size", patch_size, 1), ("num_patches", num_patches, 0)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if not len(images):
        raise ValueError("images must be a non-empty sequence of (H, W, C) arrays")
    names = list(names) if names is not None else [f"#{i}" for i in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"names must name every image: {len(names)} names for "
                         f"{len(images)} images")
    if any(np.ndim(img) != 3 for img in images):
        raise ValueError("images must all be (H, W, C) arrays; got shapes "
                         f"{[np.shape(img) for img in images]}")
    channels = {np.shape(img)[-1] for img in images}
    if len(channels) != 1:
        raise ValueError("images must all be (H, W, C) arrays with one channel count; got "
                         f"shapes {[np.shape(img) for img in images]}")
    for name, img in zip(names, images, strict=True):
        if min(img.shape[:2]) < patch_size:
            raise ValueError(
                f"patch_size={patch_size} exceeds image {name!r} of size {img.shape[:2]}"
            )
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(images), size=num_patches)
    x = np.empty((num_patches, patch_size, patch_size, channels.pop()), np.float32)
    for i, j in enumerate(which):
        h, w = images[j].shape[:2]
        top = rng.integers(0, h - patch_size + 1)
        left = rng.integers(0, w - patch_size + 1)
        x[i] = images[j][top : top + patch_size, left : left + patch_size]
    return x
