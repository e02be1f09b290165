"""Deterministic, resumable iterators of numpy batches, and the built-in data sources.

A data set is a dict of numpy arrays sharing the leading dimension N (``"x"`` for the data,
``"y"`` for integer labels where there are any). Images are NHWC float32 in ``[-1, 1]``.
Nothing is downloaded: every built-in source is made here or ships inside a pip package.

``BatchIterator`` walks such a dict in batches. Its order is a pure function of
``(seed, step)``, so its whole position is the small dict ``state()``; each process of a
multi-host run takes its own contiguous slice of every global batch.

Example:
  >>> data = make_dataset("ring8", n=1024, seed=0)
  >>> it = BatchIterator(data, batch_size=128, seed=0)
  >>> batch = next(it)          # {"x": (128, 2) float32, "y": (128,) int32}
  >>> saved = it.state()        # JSON-serialisable; BatchIterator(data, 128, seed=0, state=saved)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BatchIterator",
    "IMAGE_EXTENSIONS",
    "SKIMAGE_COLOR_IMAGES",
    "SKIMAGE_GRAY_IMAGES",
    "TOY_2D_NAMES",
    "folder_class_names",
    "gaussian_mixture_samples",
    "load_digits",
    "load_image_folder",
    "load_lfw_faces",
    "load_npz",
    "make_dataset",
    "resize_images",
    "skimage_patches",
    "toy_2d",
    "toy_2d_mixture",
]

TOY_2D_NAMES = ("ring8", "grid25", "two_moons", "swiss_roll")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
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


# --------------------------------------------------------------------------------------------
# Batch iterator
# --------------------------------------------------------------------------------------------


class BatchIterator:
    """Infinite iterator of (per-process shards of) batches of an in-memory array data set.

    Step ``k`` of the global stream is batch ``k % steps_per_epoch`` of epoch
    ``k // steps_per_epoch``; each epoch uses a fresh permutation seeded by ``(seed, epoch)``.
    The stream is thus a pure function of ``(seed, step)`` and does not depend on the number
    of processes: process ``p`` of ``P`` yields rows ``[p * B / P, (p + 1) * B / P)`` of each
    global batch of size ``B``, so the union over processes is the single-process batch.

    Args:
      arrays: dict of numpy arrays with the same leading dimension N.
      batch_size: global batch size B (over all processes), divisible by ``process_count``.
      seed: seed of the per-epoch permutations.
      shuffle: permute every epoch (else the natural order).
      drop_remainder: drop the last incomplete batch of each epoch; otherwise it is yielded
        smaller (its size must then be divisible by ``process_count``).
      process_index: this process, default ``jax.process_index()``.
      process_count: number of processes, default ``jax.process_count()``.
      state: a dict from ``state()`` to resume from (same as calling ``restore``).

    Raises:
      ValueError: on empty/mismatched arrays, non-positive or indivisible batch sizes, a batch
        larger than the data set with ``drop_remainder``, or a bad process index.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        process_index: int | None = None,
        process_count: int | None = None,
        state: Mapping[str, Any] | None = None,
    ):
        if not isinstance(arrays, Mapping) or not arrays:
            raise ValueError(f"arrays must be a non-empty dict of numpy arrays, got {arrays!r:.80}")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        if len(set(lengths.values())) != 1 or None in lengths.values():
            raise ValueError(
                f"arrays must share their leading dimension N, got leading sizes {lengths}"
            )
        self.num_examples = int(next(iter(lengths.values())))
        if self.num_examples == 0:
            raise ValueError("arrays are empty (N = 0); the data set has no examples")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise ValueError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if drop_remainder and batch_size > self.num_examples:
            raise ValueError(
                f"batch_size={batch_size} is larger than the data set (N={self.num_examples}) "
                "with drop_remainder=True: every batch would be dropped"
            )
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if process_count < 1:
            raise ValueError(f"process_count must be >= 1, got {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        if batch_size % process_count:
            raise ValueError(
                f"batch_size={batch_size} must be divisible by process_count={process_count}"
            )
        remainder = self.num_examples % batch_size
        if not drop_remainder and remainder % process_count:
            raise ValueError(
                f"with drop_remainder=False the last batch of each epoch has {remainder} "
                f"examples, not divisible by process_count={process_count}; use "
                "drop_remainder=True or another batch_size"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.drop_remainder = bool(drop_remainder)
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        if drop_remainder:
            self.steps_per_epoch = self.num_examples // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_examples // self.batch_size)
        self.step = 0
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None
        if state is not None:
            self.restore(state)

    @property
    def epoch(self) -> int:
        """The epoch the next batch belongs to."""
        return self.step // self.steps_per_epoch

    @property
    def local_batch_size(self) -> int:
        """Rows of a full batch that this process yields (``batch_size / process_count``)."""
        return self.batch_size // self.process_count

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the examples in ``epoch``: int array (N,), a function of (seed, epoch)."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int) -> np.ndarray:
        """Indices into the data set of this process's shard of global batch ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.batch_size
        stop = min(start + self.batch_size, self.num_examples)
        shard = (stop - start) // self.process_count
        lo = start + self.process_index * shard
        return self.permutation(epoch)[lo : lo + shard]

    def get_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's shard of global batch ``step`` (does not move the iterator)."""
        idx = self.indices(step)
        return {k: v[idx] for k, v in self.arrays.items()}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.get_batch(self.step)
        self.step += 1
        return batch

    def state(self) -> dict[str, Any]:
        """Position of the iterator as a small JSON-serialisable dict.

        The position is global (identical on every process), so a run may resume on a
        different number of processes with the same global batch size.
        """
        return {
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_examples": self.num_examples,
            "shuffle": self.shuffle,
            "drop_remainder": self.drop_remainder,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Move to the position saved by ``state()``.

        Raises:
          ValueError: if ``state`` lacks ``"step"`` or was saved by an iterator over a
            different stream (seed, batch size, data set size, shuffle, drop_remainder).
        """
        if "step" not in state:
            raise ValueError(f"state must contain 'step', got keys {sorted(state)}")
        mine = self.state()
        for key in ("seed", "batch_size", "num_examples", "shuffle", "drop_remainder"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"cannot restore: state has {key}={state[key]!r} but this iterator has "
                    f"{key}={mine[key]!r}"
                )
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"state['step'] must be >= 0, got {step}")
        self.step = step


# --------------------------------------------------------------------------------------------
# 2-D toy data
# --------------------------------------------------------------------------------------------


def toy_2d_mixture(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Parameters of the 2-D Gaussian-mixture toy sets, for the analytic oracle.

    ``"ring8"``: 8 components evenly on a circle of radius 2, std 0.1.
    ``"grid25"``: 25 components on the 5x5 grid ``{-2, -1, 0, 1, 2}^2``, std 0.05.

    Args:
      name: ``"ring8"`` or ``"grid25"``.

    Returns:
      ``(means (K, 2), stds (K,), weights (K,))`` float64, weights uniform.
    """
    if name == "ring8":
        theta = 2 * np.pi * np.arange(8) / 8
        means = 2.0 * np.stack([np.cos(theta), np.sin(theta)], axis=-1)
        stds = np.full(8, 0.1)
    elif name == "grid25":
        g = np.arange(-2.0, 3.0)
        means = np.stack(np.meshgrid(g, g, indexing="ij"), axis=-1).reshape(-1, 2)
        stds = np.full(25, 0.05)
    else:
        raise ValueError(f"name must be 'ring8' or 'grid25' (mixtures), got {name!r}")
    return means, stds, np.full(len(means), 1.0 / len(means))


def gaussian_mixture_samples(
    means: np.ndarray,
    stds: np.ndarray | float,
    weights: np.ndarray | None,
    n: int,
    *,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact samples of a Gaussian mixture with diagonal covariances.

    Args:
      means: (K, D) component means.
      stds: component standard deviations, broadcastable to (K, D): a scalar, (K,) isotropic
        per component, or (K, D).
      weights: (K,) non-negative mixture weights (normalised here); None for uniform.
      n: number of samples.
      seed: numpy seed.

    Returns:
      ``(x (n, D) float32, y (n,) int32)``: samples and their component index.
    """
    means = np.asarray(means, dtype=np.float64)
    if means.ndim != 2 or len(means) == 0:
        raise ValueError(f"means must have shape (K, D) with K >= 1, got {means.shape}")
    k, d = means.shape
    stds = np.asarray(stds, dtype=np.float64)
    if stds.ndim == 1:
        stds = stds[:, None]
    try:
        stds = np.broadcast_to(stds, (k, d))
    except ValueError:
        raise ValueError(
            f"stds must broadcast to (K, D)=({k}, {d}) (scalar, (K,) or (K, D)), got "
            f"shape {np.shape(stds)}"
        ) from None
    if np.any(stds < 0):
        raise ValueError("stds must be >= 0")
    if weights is None:
        weights = np.full(k, 1.0 / k)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (k,) or np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError(
            f"weights must be (K,)=({k},) non-negative with a positive sum, got {weights}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    y = rng.choice(k, size=n, p=weights / weights.sum())
    x = means[y] + stds[y] * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.int32)


def toy_2d(name: str, n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """2-D toy data set.

    Args:
      name: ``"ring8"``, ``"grid25"`` (mixtures, see ``toy_2d_mixture``), ``"two_moons"``
        (two interleaved half circles, noise std 0.05) or ``"swiss_roll"`` (a 2-D spiral with
        radius in [0.5, 2], noise std 0.05).
      n: number of points.
      seed: numpy seed.

    Returns:
      ``{"x": (n, 2) float32, "y": (n,) int32}``: points and their component (ring8, grid25),
      moon (two_moons) or 0 (swiss_roll).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if name in ("ring8", "grid25"):
        x, y = gaussian_mixture_samples(*toy_2d_mixture(name), n, seed=seed)
        return {"x": x, "y": y}
    rng = np.random.default_rng(seed)
    if name == "two_moons":
        y = rng.integers(0, 2, size=n)
        phi = np.pi * rng.uniform(size=n)
        upper = np.stack([np.cos(phi), np.sin(phi)], axis=-1)
        lower = np.stack([1.0 - np.cos(phi), 0.5 - np.sin(phi)], axis=-1)
        x = np.where(y[:, None] == 0, upper, lower) - np.array([0.5, 0.25])
        x = x + 0.05 * rng.standard_normal((n, 2))
    elif name == "swiss_roll":
        u = rng.uniform(size=n)
        phi = 1.5 * np.pi * (1.0 + 2.0 * u)
        r = 0.5 + 1.5 * u
        x = r[:, None] * np.stack([np.cos(phi), np.sin(phi)], axis=-1)
        x = x + 0.05 * rng.standard_normal((n, 2))
        y = np.zeros(n)
    else:
        raise ValueError(f"name must be one of {TOY_2D_NAMES}, got {name!r}")
    return {"x": x.astype(np.float32), "y": y.astype(np.int32)}


# --------------------------------------------------------------------------------------------
# Images: resizing and scaling
# --------------------------------------------------------------------------------------------


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of antialiased linear interpolation (half-pixel centres)."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # widen the triangle when shrinking (antialiasing)
    centre = (np.arange(n_out) + 0.5) * scale
    src = np.arange(n_in) + 0.5
    w = np.maximum(0.0, 1.0 - np.abs(src[None, :] - centre[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of NHWC images, antialiased when shrinking (as Pillow's BILINEAR).

    Args:
      images: (N, H, W, C) float array.
      size: output side, or ``(height, width)``.

    Returns:
      (N, size_h, size_w, C) float32.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
    h_out, w_out = (size, size) if isinstance(size, (int, np.integer)) else size
    if h_out <= 0 or w_out <= 0:
        raise ValueError(f"size must be positive, got {size}")
    n, h, w, c = images.shape
    a_h = _resize_matrix(h, h_out).astype(np.float32)
    a_w = _resize_matrix(w, w_out).astype(np.float32)
    rows = np.matmul(a_h, images.astype(np.float32).reshape(n, h, w * c))  # (n, h_out, w*c)
    return np.matmul(a_w, rows.reshape(n, h_out, w, c))  # (n, h_out, w_out, c)


def _to_unit_range(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto ``[-1, 1]``, float32."""
    return (2.0 * (np.asarray(x, np.float64) - lo) / (hi - lo) - 1.0).astype(np.float32)


def _fit_size(images: np.ndarray, image_size: int | None, method: str, fill: float) -> np.ndarray:
    """Resize (``"bilinear"``) or centre-pad with ``fill`` (``"pad"``) square NHWC images."""
    if image_size is None or image_size == images.shape[1] == images.shape[2]:
        return images
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    if method == "bilinear":
        return resize_images(images, image_size)
    if method == "pad":
        h, w = images.shape[1:3]
        if image_size < max(h, w):
            raise ValueError(
                f"image_size={image_size} is smaller than the images ({h}x{w}); "
                "method='pad' cannot shrink, use method='bilinear'"
            )
        top, left = (image_size - h) // 2, (image_size - w) // 2
        pad = ((0, 0), (top, image_size - h - top), (left, image_size - w - left), (0, 0))
        return np.pad(images, pad, constant_values=fill)
    raise ValueError(f"method must be 'bilinear' or 'pad', got {method!r}")


# --------------------------------------------------------------------------------------------
# Built-in image sources (ship inside pip packages)
# --------------------------------------------------------------------------------------------


def load_digits(image_size: int = 8, *, method: str = "bilinear") -> dict[str, np.ndarray]:
    """scikit-learn's 8x8 handwritten digits (1,797 images, labels 0-9), offline.

    Args:
      image_size: output side; 8 keeps the originals, larger sizes (16, 32) are made by
        bilinear upsampling or by centre-padding with the background value -1.
      method: ``"bilinear"`` or ``"pad"``.

    Returns:
      ``{"x": (1797, S, S, 1) float32 in [-1, 1], "y": (1797,) int32}``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = _to_unit_range(bunch.images, 0.0, 16.0)[..., None]
    x = _fit_size(x, image_size, method, fill=-1.0)
    return {"x": np.ascontiguousarray(x, np.float32), "y": bunch.target.astype(np.int32)}


def load_lfw_faces(image_size: int | None = None) -> dict[str, np.ndarray]:
    """The 100 25x25 grayscale faces of ``skimage.data.lfw_subset`` (offline).

    Args:
      image_size: None keeps 25x25; otherwise bilinear resize to this side (e.g. 32).

    Returns:
      ``{"x": (100, S, S, 1) float32 in [-1, 1]}``.
    """
    import skimage.data

    faces = skimage.data.lfw_subset()[:100]  # the other 100 images are not faces
    x = _to_unit_range(faces, 0.0, 1.0)[..., None]
    x = np.clip(_fit_size(x, image_size, "bilinear", fill=-1.0), -1.0, 1.0)
    return {"x": np.ascontiguousarray(x, np.float32)}


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
    for name, img in zip(images, sources, strict=True):
        if min(img.shape[:2]) < patch_size:
            raise ValueError(
                f"patch_size={patch_size} exceeds image {name!r} of size {img.shape[:2]}"
            )
    rng = np.random.default_rng(seed)
    which = rng.integers(0, len(sources), size=num_patches)
    channels = 1 if grayscale else 3
    x = np.empty((num_patches, patch_size, patch_size, channels), np.float32)
    for i, j in enumerate(which):
        h, w = sources[j].shape[:2]
        top = rng.integers(0, h - patch_size + 1)
        left = rng.integers(0, w - patch_size + 1)
        x[i] = sources[j][top : top + patch_size, left : left + patch_size]
    out = {"x": _to_unit_range(x, 0.0, 1.0)}
    if downscale is not None:
        s, m = downscale, patch_size // downscale
        out["x_low"] = out["x"].reshape(num_patches, m, s, m, s, channels).mean(axis=(2, 4))
    return out


# --------------------------------------------------------------------------------------------
# User data on disk: image folders and .npz files
# --------------------------------------------------------------------------------------------


def _check_dir(path: str | os.PathLike, argument: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{argument}={path!r} does not exist")
    if not os.path.isdir(path):
        raise ValueError(f"{argument}={path!r} is not a directory")
    return path


def _list_images(root: str, extensions: Sequence[str]) -> list[str]:
    """Image files under ``root`` (recursive, sorted, relative paths)."""
    suffixes = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            if f.lower().endswith(suffixes) and not f.startswith("."):
                found.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(found)


def folder_class_names(
    path: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> list[str]:
    """Sorted names of the sub-folders of ``path`` holding images: label ``i`` is name ``i``."""
    root = _check_dir(path, "path")
    files = _list_images(root, extensions)
    return sorted({f.split(os.sep)[0] for f in files if os.sep in f})


def _load_image(file: str, image_size: int, grayscale: bool) -> np.ndarray:
    """One image file: short side resized to ``image_size``, centre-cropped; uint8 (S, S, C)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img = img.convert("L" if grayscale else "RGB")
            w, h = img.size
            short = min(w, h)
            new_w = max(image_size, round(w * image_size / short))
            new_h = max(image_size, round(h * image_size / short))
            img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
            left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            arr = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read image file {file!r}: {e}") from e
    return arr[..., None] if arr.ndim == 2 else arr


def load_image_folder(
    path: str | os.PathLike,
    image_size: int,
    *,
    grayscale: bool = False,
    labels: bool = False,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    max_images: int | None = None,
) -> dict[str, np.ndarray]:
    """All images under a folder (recursive), resized on the short side and centre-cropped.

    Files are read in sorted path order. With ``labels=True`` every image must lie in a
    sub-folder of ``path``; its label is the index of that sub-folder's name in
    ``folder_class_names(path)`` (ImageFolder convention).

    Args:
      path: root folder.
      image_size: side of the square output images.
      grayscale: one channel (Pillow "L") instead of RGB.
      labels: add ``"y"`` from the top-level sub-folder names.
      extensions: file suffixes counted as images (case-insensitive).
      max_images: read at most this many (the first in sorted order).

    Returns:
      ``{"x": (N, S, S, C) float32 in [-1, 1]}`` (C = 1 or 3) and, with ``labels``,
      ``"y": (N,) int32``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: ``path`` is not a folder or holds no images, an image cannot be read, or
        ``labels=True`` with images directly in ``path``.
    """
    root = _check_dir(path, "path")
    if image_size <= 0:
        raise ValueError(f"image_size must be > 0, got {image_size}")
    files = _list_images(root, extensions)
    if not files:
        raise ValueError(f"path={root!r} holds no image files with extensions {extensions}")
    if max_images is not None:
        if max_images <= 0:
            raise ValueError(f"max_images must be > 0, got {max_images}")
        files = files[:max_images]
    y = None
    if labels:
        loose = [f for f in files if os.sep not in f]
        if loose:
            raise ValueError(
                f"labels=True needs every image in a sub-folder of path={root!r}, but "
                f"{os.path.join(root, loose[0])!r} lies directly in it"
            )
        names = sorted({f.split(os.sep)[0] for f in files})
        index = {name: i for i, name in enumerate(names)}
        y = np.array([index[f.split(os.sep)[0]] for f in files], np.int32)
    x = np.stack([_load_image(os.path.join(root, f), image_size, grayscale) for f in files])
    out = {"x": _to_unit_range(x, 0.0, 255.0)}
    if y is not None:
        out["y"] = y
    return out


def load_npz(
    path: str | os.PathLike,
    *,
    x_key: str | None = None,
    y_key: str | None = None,
    value_range: tuple[float, float] | None = None,
    channels_first: bool = False,
    image_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Arrays from an ``.npz`` file, e.g. CIFAR-10 exported by the user.

    Args:
      path: the ``.npz`` file.
      x_key: key of the data; None tries ``"x"``, ``"images"``, ``"image"``, ``"arr_0"``.
      y_key: key of integer labels; None tries ``"y"``, ``"labels"``, ``"label"`` and goes
        without labels if none is present.
      value_range: range ``(lo, hi)`` of the stored values, mapped onto ``[-1, 1]``; None
        means ``(0, 255)`` for integer data and "already in [-1, 1]" for float data.
      channels_first: the images are NCHW (converted to NHWC).
      image_size: optional bilinear resize of square images to this side.

    Returns:
      ``{"x": float32 (N, ...)}`` with ``"y": (N,) int32`` when labels exist; images
      (3-D or 4-D data) come out NHWC, a 3-D ``(N, H, W)`` array gets a channel axis.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: unreadable file, missing key, or labels whose length is not N.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path={path!r} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read path={path!r} as .npz: {e}") from e
    if not hasattr(npz, "files"):
        raise ValueError(f"path={path!r} is a .npy array, not an .npz archive")
    with npz:
        keys = list(npz.files)

        def pick(key: str | None, candidates: Sequence[str], argument: str, required: bool):
            if key is not None:
                if key not in keys:
                    raise ValueError(f"{argument}={key!r} is not in {path!r}; its keys are {keys}")
                return key
            for c in candidates:
                if c in keys:
                    return c
            if required:
                raise ValueError(
                    f"{path!r} has none of the keys {list(candidates)}; its keys are {keys}; "
                    f"pass {argument}"
                )
            return None

        xk = pick(x_key, ("x", "images", "image", "arr_0"), "x_key", required=True)
        yk = pick(y_key, ("y", "labels", "label"), "y_key", required=False)
        x = npz[xk]
        y = npz[yk] if yk is not None else None
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"array {xk!r} in {path!r} is empty or scalar, shape {x.shape}")
    if value_range is None:
        value_range = (0.0, 255.0) if np.issubdtype(x.dtype, np.integer) else (-1.0, 1.0)
    x = _to_unit_range(x, *value_range)
    if x.ndim == 4 and channels_first:
        x = np.transpose(x, (0, 2, 3, 1))
    elif x.ndim == 3:
        x = x[..., None]
    if image_size is not None:
        if x.ndim != 4:
            raise ValueError(f"image_size needs image data (N, H, W, C), got shape {x.shape}")
        x = _fit_size(x, image_size, "bilinear", fill=-1.0)
    out = {"x": np.ascontiguousarray(x)}
    if y is not None:
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"labels {yk!r} in {path!r} have shape {y.shape}, expected leading size {len(x)}"
            )
        out["y"] = y.astype(np.int32)
    return out


# --------------------------------------------------------------------------------------------
# One entry point for experiments
# --------------------------------------------------------------------------------------------


def make_dataset(name: str, **kwargs: Any) -> dict[str, np.ndarray]:
    """Build a data set (dict of arrays with a shared leading N) by name.

    Names and the function whose keyword arguments they take:
      ``"ring8" | "grid25" | "two_moons" | "swiss_roll"``: ``toy_2d(name, n, seed=...)``;
      ``"gaussian_mixture"``: ``gaussian_mixture_samples(means, stds, weights, n, seed=...)``;
      ``"digits"``: ``load_digits``; ``"lfw"``: ``load_lfw_faces``;
      ``"skimage_patches"``: ``skimage_patches``; ``"folder"``: ``load_image_folder``;
      ``"npz"``: ``load_npz``.

    Args:
      name: one of the names above.
      **kwargs: keyword arguments of the function named above.

    Returns:
      dict of numpy arrays: ``"x"`` and, where the source has them, ``"y"`` labels.
    """
    builders: dict[str, Callable[..., dict[str, np.ndarray]]] = {
        "digits": load_digits,
        "lfw": load_lfw_faces,
        "skimage_patches": skimage_patches,
        "folder": load_image_folder,
        "npz": load_npz,
    }
    if name in TOY_2D_NAMES:
        return toy_2d(name, **kwargs)
    if name == "gaussian_mixture":
        x, y = gaussian_mixture_samples(**kwargs)
        return {"x": x, "y": y}
    if name not in builders:
        names = sorted([*TOY_2D_NAMES, "gaussian_mixture", *builders])
        raise ValueError(f"name must be one of {names}, got {name!r}")
    return builders[name](**kwargs)
