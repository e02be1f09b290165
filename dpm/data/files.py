"""User data on disk: folders of image files and ``.npz`` arrays."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from dpm.data.transforms import check_finite, fit_size, to_unit_range

__all__ = [
    "IMAGE_EXTENSIONS",
    "folder_class_names",
    "load_image_folder",
    "load_npz",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

# Pillow modes wider than 8 bits per channel, which convert("L" / "RGB") would clip.
_WIDE_MODES = {
    "F": "32-bit float",
    "I": "32-bit integer",
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
}


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
            if img.mode in _WIDE_MODES:
                # convert("L" / "RGB") would clip these to 0..255 (a float image in [0, 1]
                # would come out black), and a float image may hold NaN
                raise ValueError(
                    f"it has Pillow mode {img.mode!r} ({_WIDE_MODES[img.mode]}); "
                    "load_image_folder reads 8-bit images: convert it to 8-bit, or save the "
                    "array to an .npz and use load_npz(path, value_range=(lo, hi))"
                )
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

    Files are read in sorted path order and decoded as 8-bit (0..255, mapped onto [-1, 1]);
    16-bit and float images are refused, since their range is not known (use :func:`load_npz`
    with ``value_range``). With ``labels=True`` every image must lie in a
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
      ValueError: ``path`` is not a folder or holds no images, an image cannot be read or is
        not 8-bit, or ``labels=True`` with images directly in ``path``.
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
    out = {"x": to_unit_range(x, 0.0, 255.0)}
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
        means ``(0, 255)`` for integer data and "already in [-1, 1]" for float data. Values
        outside the range are refused, not clipped or rescaled: float images in 0..255 need
        ``value_range=(0, 255)``, and float images in ``[0, 1]`` need ``value_range=(0, 1)``
        (they lie inside ``[-1, 1]``, so they cannot be told apart and would pass unmapped).
      channels_first: the images are NCHW (converted to NHWC).
      image_size: optional bilinear resize of square images to this side.

    Returns:
      ``{"x": float32 (N, ...)}`` with ``"y": (N,) int32`` when labels exist; images
      (3-D or 4-D data) come out NHWC, a 3-D ``(N, H, W)`` array gets a channel axis.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: unreadable file, missing key, NaN or infinite values (with their count),
        values outside ``value_range`` (saying how to pass the range), or labels that are not
        N finite integers.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path={path!r} does not exist")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic[:2] != b"PK" and magic != b"\x93NUMPY":  # neither a zip archive nor a .npy array
        raise ValueError(
            f"path={path!r} is not an .npz archive (a zip of .npy arrays, as written by "
            f"numpy.savez): its first bytes are {magic!r}; save the arrays with "
            "numpy.savez(path, x=images, y=labels)")
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
    if not any(np.issubdtype(x.dtype, k) for k in (np.integer, np.floating, np.bool_)):
        raise ValueError(f"array {xk!r} in {path!r} must hold real numbers; got dtype {x.dtype}")
    check_finite(x, f"array {xk!r} in {path!r}")
    given = value_range is not None
    if value_range is None:
        value_range = (0.0, 255.0) if np.issubdtype(x.dtype, np.integer) else (-1.0, 1.0)
    try:
        lo, hi = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise ValueError(f"value_range must be a pair (lo, hi), got {value_range!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"value_range must be finite with lo < hi, got {value_range!r}")
    x_min, x_max = float(np.min(x)), float(np.max(x))
    slack = 1e-6 * (hi - lo)  # float round-off of data saved at the ends of the range
    if x_min < lo - slack or x_max > hi + slack:
        source = "value_range" if given else f"the default for {x.dtype} data"
        raise ValueError(
            f"array {xk!r} in {path!r} holds values in [{x_min:.6g}, {x_max:.6g}], outside "
            f"[{lo:g}, {hi:g}] ({source}), which is mapped onto [-1, 1]; pass the range the "
            "values were stored in, e.g. load_npz(path, value_range=(0, 255)) for 8-bit values"
        )
    x = np.clip(to_unit_range(x, lo, hi), -1.0, 1.0)
    if x.ndim == 4 and not channels_first and x.shape[1] in (1, 3, 4) and (
            x.shape[-1] not in (1, 3, 4)):
        raise ValueError(
            f"array {xk!r} in {path!r} of shape {x.shape} looks channels-first (NCHW): images "
            "are read as (N, H, W, C); pass channels_first=True")
    if x.ndim == 4 and channels_first:
        x = np.transpose(x, (0, 2, 3, 1))
    elif x.ndim == 3:
        x = x[..., None]
    if image_size is not None:
        if x.ndim != 4:
            raise ValueError(
                f"image_size needs images of shape (N, H, W, C) (or (N, H, W) for one channel); "
                f"array {xk!r} in {path!r} has {x.ndim} dimensions, shape {x.shape}")
        x = fit_size(x, image_size, "bilinear", fill=-1.0)
    out = {"x": np.ascontiguousarray(x)}
    if y is not None:
        if np.issubdtype(y.dtype, np.inexact):
            check_finite(y, f"labels {yk!r} in {path!r}")
            if np.any(y != np.round(y)):
                raise ValueError(f"labels {yk!r} in {path!r} must be integers; got fractions")
        elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise ValueError(f"labels {yk!r} in {path!r} must be integers; got dtype {y.dtype}")
        if y.shape[:1] != x.shape[:1]:
            raise ValueError(
                f"labels {yk!r} in {path!r} have shape {y.shape}, expected leading size {len(x)}"
            )
        out["y"] = y.astype(np.int32)
    return out
