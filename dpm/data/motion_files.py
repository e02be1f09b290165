"""User motion data on disk: HumanML3D / KIT-ML feature folders and the a2m rot6d layout.

Every loader returns ``(data, info)``. ``data`` is the common motion format, a dict of numpy
arrays sharing N that :class:`dpm.data.BatchIterator` takes as it is:

- ``"x"``: (N, max_frames, D) float32 raw (not normalised) features, zero past each length;
- ``"mask"``: (N, max_frames) bool, True on the first ``length`` frames;
- ``"length"``: (N,) int32 valid frames;
- ``"caption"``: (N,) str, the first caption of each clip ("" where there is none);
- ``"action"``: (N,) int32 action id, -1 where unknown (text-to-motion data).

``info`` (:class:`MotionFilesInfo`) holds what does not share N as arrays: the clip ids, every
caption of every clip (a list of lists), their tokens, the dataset's ``Mean.npy`` / ``Std.npy``
and how many clips were dropped or cropped. Normalise with
``(data["x"] - info.mean) / info.std`` (then zero the padded frames again).

Nothing is downloaded: the folders come from the user (HumanML3D / KIT-ML as prepared by Guo et
al.'s scripts; the a2m ``.npz`` written by the user's own conversion).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dpm.data.transforms import check_finite

__all__ = [
    "MotionFilesInfo",
    "load_a2m_rot6d",
    "load_humanml3d",
    "load_kit_ml",
]


@dataclasses.dataclass(frozen=True)
class MotionFilesInfo:
    """What a motion loader found besides the arrays (entry ``i`` of each list is clip ``i``).

    Attributes:
      ids: N clip ids. HumanML3D / KIT-ML: the file id for a whole clip, ``"<id>@<start>-<end>"``
        (seconds, as in the text file) for a clip cut out by a sub-range caption; a2m: the
        index of the sequence in the file, as a string.
      captions: N lists of captions (HumanML3D: every whole-clip caption of the file, or the
        one caption of a sub-range clip; a2m: ``[action name]`` or ``[]``).
      tokens: N lists (one per caption) of token lists such as ``["a/DET", "person/NOUN"]``
        (a2m: empty lists).
      mean: (D,) float32 feature mean (``Mean.npy``), None for a2m.
      std: (D,) float32 feature std (``Std.npy``), None for a2m.
      fps: frame rate of the features.
      num_dropped_short: clips (or sub-ranges) dropped for having fewer than ``min_frames``.
      num_dropped_long: clips dropped for having more than ``max_source_frames``.
      num_cropped: clips longer than ``max_frames``, cropped to a ``max_frames`` window.
    """

    ids: list[str]
    captions: list[list[str]]
    tokens: list[list[list[str]]]
    mean: np.ndarray | None
    std: np.ndarray | None
    fps: float
    num_dropped_short: int = 0
    num_dropped_long: int = 0
    num_cropped: int = 0


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _load_npy(path: str, what: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"cannot read {what} {path!r}: {e}") from e
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{what} {path!r} has dtype {arr.dtype}; expected real numbers")
    check_finite(arr, f"{what} {path!r}")
    return arr


def _pack(
    clips: list[np.ndarray], max_frames: int, crop_seed: int | None
) -> tuple[dict[str, np.ndarray], int]:
    """Zero-pads (or crops) (F_i, D) clips to (N, max_frames, D) with masks; counts the crops."""
    rng = None if crop_seed is None else np.random.default_rng(crop_seed)
    n, d = len(clips), clips[0].shape[1]
    x = np.zeros((n, max_frames, d), np.float32)
    length = np.zeros(n, np.int32)
    cropped = 0
    for i, c in enumerate(clips):
        if c.shape[0] > max_frames:
            cropped += 1
            start = 0 if rng is None else int(rng.integers(0, c.shape[0] - max_frames + 1))
            c = c[start : start + max_frames]
        x[i, : c.shape[0]] = c
        length[i] = c.shape[0]
    mask = np.arange(max_frames)[None, :] < length[:, None]
    return {"x": x, "mask": mask, "length": length}, cropped


def _parse_text_file(path: str) -> list[tuple[str, list[str], float, float]]:
    """Lines ``caption#tokens#start#end`` -> ``(caption, tokens, start, end)`` (NaN -> 0.0)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path!r} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit("#", 3)
            where = f"{path!r} line {line_no}"
            if len(parts) != 4:
                raise ValueError(
                    f"{where}: expected 'caption#tokens#start#end' (4 fields split by '#'), "
                    f"got {line!r:.120}"
                )
            caption, tokens, start, end = parts
            if not caption.strip():
                raise ValueError(f"{where}: the caption is empty in {line!r:.120}")
            try:
                t0, t1 = float(start), float(end)
            except ValueError:
                raise ValueError(
                    f"{where}: start and end must be numbers (seconds), got {start!r}, {end!r}"
                ) from None
            # the original loader reads NaN tags as 0.0
            t0 = 0.0 if math.isnan(t0) else t0
            t1 = 0.0 if math.isnan(t1) else t1
            if t0 < 0 or t1 < 0 or math.isinf(t0) or math.isinf(t1):
                raise ValueError(f"{where}: start and end must be finite and >= 0, got {t0}, {t1}")
            out.append((caption.strip(), tokens.split(" ") if tokens else [], t0, t1))
    if not out:
        raise ValueError(f"caption file {path!r} holds no captions")
    return out


# --------------------------------------------------------------------------------------------
# HumanML3D / KIT-ML
# --------------------------------------------------------------------------------------------


def load_humanml3d(
    root: str | os.PathLike,
    split: str = "train",
    *,
    max_frames: int = 196,
    min_frames: int = 40,
    max_source_frames: int | None = None,
    feature_dim: int | None = None,
    fps: float = 20.0,
    crop_seed: int | None = None,
    limit: int | None = None,
) -> tuple[dict[str, np.ndarray], MotionFilesInfo]:
    """A HumanML3D (or KIT-ML) feature folder in the common motion format.

    The folder, as Guo et al.'s scripts write it::

        root/new_joint_vecs/<id>.npy   (F, D) float features per clip (D = 263 / 251)
        root/texts/<id>.txt            one caption per line: caption#tokens#start#end
        root/<split>.txt               the ids of the split, one per line
        root/Mean.npy, root/Std.npy    (D,) feature statistics

    Captions follow the original loader (``Text2MotionDatasetV2``): a line with start = end =
    0.0 (or NaN) describes the whole clip; the whole clip becomes one sample with all of those
    captions (a file with sub-range captions only gives no whole-clip sample). Any other line
    cuts out frames ``motion[int(start * fps) : int(end * fps)]`` (the same truncation as the
    original) as a sample of its own with that one caption. Samples with fewer than
    ``min_frames`` frames are dropped (as the original, which also drops those with 200 frames
    or more: ``max_source_frames=199`` reproduces that); longer than ``max_frames`` they are
    cropped to a ``max_frames`` window, the first one by default (the original draws a random
    window, and a length rounded to its ``unit_length``, on every read; ``crop_seed`` draws one
    random window per sample, once). Samples are ordered as the split file, each file's whole
    clip before its sub-ranges. ``x`` takes ``N * max_frames * D * 4`` bytes (several GB for
    the HumanML3D train split): ``limit`` reads only the first ids.

    Args:
      root: the dataset folder.
      split: name of the split file ``root/<split>.txt`` (``"train"``, ``"val"``, ``"test"``,
        ``"train_val"``, ``"all"``).
      max_frames: padded length of ``x``.
      min_frames: samples with fewer frames are dropped (HumanML3D 40, KIT-ML 24).
      max_source_frames: samples with more frames than this are dropped (None keeps them).
      feature_dim: expected D (263 HumanML3D, 251 KIT-ML); None takes it from ``Mean.npy``.
        Every clip and both statistics files must have it.
      fps: frame rate, to convert sub-range seconds to frames (HumanML3D 20, KIT-ML 12.5).
      crop_seed: None crops the first window; an int draws the windows with this seed.
      limit: read only the first ``limit`` ids of the split file.

    Returns:
      ``(data, info)``: ``data`` the common format (module docstring; ``action`` is -1,
      ``caption`` the first caption), ``info`` a :class:`MotionFilesInfo` with ``mean`` and
      ``std`` from ``Mean.npy`` / ``Std.npy`` and the drop / crop counts.

    Raises:
      FileNotFoundError: ``root``, the split file, ``Mean.npy`` / ``Std.npy``, or a listed
        id's ``.npy`` or ``.txt`` does not exist (the message names the path).
      ValueError: bad arguments; an empty split file; a feature file that is not (F, D) with
        the expected D, or holds NaN / infinite values; statistics of another shape, not
        finite, or with ``std <= 0``; a malformed caption line; no samples left. Each message
        names the file.

    Example:
      >>> data, info = load_humanml3d("HumanML3D", "test", max_source_frames=199)
      >>> data["x"].shape, info.num_dropped_short     # ((N, 196, 263), ...)
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"root={root!r} does not exist or is not a folder")
    max_frames = _check_int(max_frames, "max_frames", 1)
    min_frames = _check_int(min_frames, "min_frames", 1)
    if max_source_frames is not None:
        max_source_frames = _check_int(max_source_frames, "max_source_frames", min_frames)
    if feature_dim is not None:
        feature_dim = _check_int(feature_dim, "feature_dim", 1)
    if limit is not None:
        limit = _check_int(limit, "limit", 1)
    if not (isinstance(fps, int | float) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not isinstance(split, str) or not split or os.sep in split or "/" in split:
        raise ValueError(f"split must be a file name such as 'train', got {split!r}")

    split_path = os.path.join(root, f"{split}.txt")
    if not os.path.isfile(split_path):
        found = sorted(f[:-4] for f in os.listdir(root) if f.endswith(".txt"))
        raise FileNotFoundError(
            f"split file {split_path!r} does not exist (splits found in root: {found})"
        )
    with open(split_path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    if not ids:
        raise ValueError(f"split file {split_path!r} lists no ids")
    if limit is not None:
        ids = ids[:limit]

    stats = []  # read first: they fix D when feature_dim is None
    for fname in ("Mean.npy", "Std.npy"):
        path = os.path.join(root, fname)
        stat = _load_npy(path, "statistics file")
        d = feature_dim if feature_dim is not None else stats[0].shape[0] if stats else None
        if stat.ndim != 1 or stat.shape[0] < 1 or (d is not None and stat.shape[0] != d):
            if feature_dim is not None:
                why = f"feature_dim={feature_dim}"
            else:
                why = "the shape of Mean.npy" if stats else "D >= 1"
            raise ValueError(
                f"statistics file {path!r} has shape {stat.shape}; expected ({d or 'D'},) ({why})"
            )
        stats.append(stat.astype(np.float32))
    if np.any(stats[1] <= 0):
        bad = np.flatnonzero(stats[1] <= 0)
        raise ValueError(
            f"statistics file {os.path.join(root, 'Std.npy')!r} holds {bad.size} entries <= 0 "
            f"(first at index {int(bad[0])}); the std must be positive to normalise by it"
        )
    feature_dim = stats[0].shape[0]

    clips, names, captions, tokens = [], [], [], []
    dropped_short = dropped_long = 0

    def add(motion, name, caps, toks):
        nonlocal dropped_short, dropped_long
        if motion.shape[0] < min_frames:
            dropped_short += 1
        elif max_source_frames is not None and motion.shape[0] > max_source_frames:
            dropped_long += 1
        else:
            clips.append(motion)
            names.append(name)
            captions.append(caps)
            tokens.append(toks)

    for name in ids:
        motion_path = os.path.join(root, "new_joint_vecs", f"{name}.npy")
        if not os.path.isfile(motion_path):
            raise FileNotFoundError(
                f"id {name!r} of {split_path!r}: motion file {motion_path!r} does not exist"
            )
        motion = _load_npy(motion_path, "motion file")
        if motion.ndim != 2 or motion.shape[1] != feature_dim:
            raise ValueError(
                f"motion file {motion_path!r} has shape {motion.shape}; expected (F, {feature_dim})"
            )
        motion = motion.astype(np.float32)
        lines = _parse_text_file(os.path.join(root, "texts", f"{name}.txt"))
        whole = [(c, t) for c, t, t0, t1 in lines if t0 == 0.0 and t1 == 0.0]
        if whole:
            add(motion, name, [c for c, _ in whole], [t for _, t in whole])
        for c, t, t0, t1 in lines:
            if not (t0 == 0.0 and t1 == 0.0):
                sub = motion[int(t0 * fps) : int(t1 * fps)]  # empty if end <= start
                add(sub, f"{name}@{t0:g}-{t1:g}", [c], [t])

    if not clips:
        raise ValueError(
            f"no samples left from {split_path!r}: {dropped_short} shorter than "
            f"min_frames={min_frames}, {dropped_long} longer than "
            f"max_source_frames={max_source_frames}"
        )
    data, cropped = _pack(clips, max_frames, crop_seed)
    data["caption"] = np.array([c[0] for c in captions], dtype=str)
    data["action"] = np.full(len(clips), -1, np.int32)
    info = MotionFilesInfo(
        ids=names,
        captions=captions,
        tokens=tokens,
        mean=stats[0],
        std=stats[1],
        fps=float(fps),
        num_dropped_short=dropped_short,
        num_dropped_long=dropped_long,
        num_cropped=cropped,
    )
    return data, info


def load_kit_ml(
    root: str | os.PathLike,
    split: str = "train",
    *,
    max_frames: int = 196,
    min_frames: int = 24,
    max_source_frames: int | None = None,
    feature_dim: int | None = 251,
    fps: float = 12.5,
    crop_seed: int | None = None,
    limit: int | None = None,
) -> tuple[dict[str, np.ndarray], MotionFilesInfo]:
    """A KIT-ML feature folder: :func:`load_humanml3d` with KIT-ML's defaults.

    251-D features (21 joints), 12.5 fps, clips of at least 24 frames. The original loader
    converts sub-range seconds with 20 fps for both datasets; pass ``fps=20`` to reproduce
    its frame ranges exactly. Arguments, returns and errors as :func:`load_humanml3d`.
    """
    return load_humanml3d(
        root,
        split,
        max_frames=max_frames,
        min_frames=min_frames,
        max_source_frames=max_source_frames,
        feature_dim=feature_dim,
        fps=fps,
        crop_seed=crop_seed,
        limit=limit,
    )


# --------------------------------------------------------------------------------------------
# a2m rot6d (HumanAct12 / UESTC)
# --------------------------------------------------------------------------------------------


def _a2m_sources(path_or_arrays, allow_pickle: bool) -> tuple[object, object, object, str]:
    """(poses, actions, lengths or None, a description for messages)."""
    if isinstance(path_or_arrays, str | os.PathLike):
        path = os.fspath(path_or_arrays)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"path_or_arrays={path!r} does not exist")
        try:
            z = np.load(path, allow_pickle=allow_pickle)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError(f"{path!r} is not an .npz archive")
            with z:
                arrays = {k: z[k] for k in z.files}
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ValueError(
                    f"{path!r} stores an object array (e.g. variable-length 'poses'); load it "
                    "with allow_pickle=True if the file is trusted (unpickling runs code), or "
                    "store padded poses (N, F, J+1, 6) with 'lengths' (N,)"
                ) from e
            if str(e).startswith(repr(path)):
                raise
            raise ValueError(f"cannot read {path!r}: {e}") from e
        except (OSError, EOFError) as e:
            raise ValueError(f"cannot read {path!r}: {e}") from e
        where = repr(path)
    elif isinstance(path_or_arrays, Mapping):
        arrays, where = path_or_arrays, "path_or_arrays"
    else:
        raise TypeError(
            "path_or_arrays must be a path to an .npz or a dict with 'poses' and 'actions', "
            f"got {type(path_or_arrays).__name__}"
        )
    missing = [k for k in ("poses", "actions") if k not in arrays]
    if missing:
        raise ValueError(f"{where} lacks {missing}; it holds {sorted(arrays)}")
    return arrays["poses"], arrays["actions"], arrays.get("lengths"), where


def load_a2m_rot6d(
    path_or_arrays: str | os.PathLike | Mapping[str, object],
    *,
    num_joints: int = 24,
    max_frames: int = 60,
    num_actions: int | None = None,
    action_names: Sequence[str] | None = None,
    fps: float = 20.0,
    crop_seed: int | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, np.ndarray], MotionFilesInfo]:
    """Action-to-motion data in the rot6d layout (HumanAct12 / UESTC, as MDM and EMDM use it).

    Each frame is a (J + 1, 6) block: J joint rotations in the continuous 6-D representation,
    then the root translation ``(x, y, z)`` padded with three zeros to 6. It is flattened
    joint-major to ``(J + 1) * 6`` features (150 for the 24 SMPL joints). Sequences longer than
    ``max_frames`` are cropped to a ``max_frames`` window (the first by default; the original
    data loaders sample frames on every read, ``crop_seed`` draws one random window, once);
    shorter ones are zero-padded with their mask.

    Args:
      path_or_arrays: an ``.npz`` (or a dict) with ``poses``: a list / object array of N
        arrays (F_i, J + 1, 6), or a padded array (N, F, J + 1, 6) with optional ``lengths``
        (N,) (all F frames valid without it); ``actions``: (N,) integer action ids.
      num_joints: J.
      max_frames: padded length of ``x``.
      num_actions: number of classes (HumanAct12 12, UESTC 40); ids must lie in
        ``[0, num_actions)``. None: ``len(action_names)`` if given, else only negative ids
        are refused.
      action_names: optional class names; ``caption`` is the name of each sample's action
        ("" without names).
      fps: frame rate, recorded in ``info`` (HumanAct12 as MDM uses it: 20).
      crop_seed: None crops the first window; an int draws the windows with this seed.
      allow_pickle: read an ``.npz`` whose ``poses`` is an object array (only for trusted
        files: unpickling runs code).

    Returns:
      ``(data, info)``: ``data`` the common format with ``x`` (N, max_frames, (J + 1) * 6)
      and ``action`` (N,); ``info`` with ids ``"0" .. "N-1"``, no statistics (``mean`` and
      ``std`` None) and the crop count.

    Raises:
      FileNotFoundError: the file does not exist.
      TypeError: ``path_or_arrays`` is neither a path nor a dict.
      ValueError: missing ``poses`` / ``actions``; a pose array not (F, J + 1, 6) with F >= 1
        (the message names the sequence), NaN / infinite poses, lengths outside
        ``[1, F]``, an action id outside ``[0, num_actions)`` (named with its sample), or
        ``poses`` and ``actions`` of different N.
    """
    num_joints = _check_int(num_joints, "num_joints", 1)
    max_frames = _check_int(max_frames, "max_frames", 1)
    if action_names is not None:
        action_names = [str(a) for a in action_names]
        if num_actions is None:
            num_actions = len(action_names)
        elif len(action_names) != num_actions:
            raise ValueError(
                f"action_names has {len(action_names)} names; expected num_actions={num_actions}"
            )
    if num_actions is not None:
        num_actions = _check_int(num_actions, "num_actions", 1)
    poses, actions, lengths, where = _a2m_sources(path_or_arrays, allow_pickle)
    block = (num_joints + 1, 6)

    if isinstance(poses, np.ndarray) and poses.dtype != object:
        if poses.ndim != 4 or poses.shape[2:] != block:
            raise ValueError(
                f"poses of {where} has shape {poses.shape}; expected padded (N, F, "
                f"{block[0]}, 6) or a list of (F_i, {block[0]}, 6) (num_joints={num_joints})"
            )
        n, f = poses.shape[:2]
        if lengths is None:
            lengths = np.full(n, f)
        lengths = np.asarray(lengths)
        if lengths.shape != (n,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(
                f"lengths of {where} must be ({n},) integers, got {lengths.dtype} {lengths.shape}"
            )
        if np.any(lengths < 1) or np.any(lengths > f):
            i = int(np.flatnonzero((lengths < 1) | (lengths > f))[0])
            raise ValueError(
                f"lengths of {where} must lie in [1, {f}]; sample {i} has {lengths[i]}"
            )
        seqs = [poses[i, : lengths[i]] for i in range(n)]
    else:
        if lengths is not None:
            raise ValueError(f"lengths of {where} only goes with a padded (N, F, J+1, 6) poses")
        seqs = [np.asarray(p) for p in poses]
        for i, p in enumerate(seqs):
            if p.ndim != 3 or p.shape[1:] != block or p.shape[0] < 1:
                raise ValueError(
                    f"poses[{i}] of {where} has shape {p.shape}; expected (F, {block[0]}, 6) "
                    f"with F >= 1 (num_joints={num_joints})"
                )
    if not seqs:
        raise ValueError(f"{where} holds no sequences")
    for i, p in enumerate(seqs):
        if not np.issubdtype(p.dtype, np.floating):
            raise ValueError(f"poses[{i}] of {where} has dtype {p.dtype}; expected floats")
        check_finite(p, f"poses[{i}] of {where}")

    actions = np.asarray(actions)
    if actions.shape != (len(seqs),) or not np.issubdtype(actions.dtype, np.integer):
        raise ValueError(
            f"actions of {where} must be ({len(seqs)},) integers (one per sequence), got "
            f"{actions.dtype} {actions.shape}"
        )
    hi = num_actions if num_actions is not None else np.iinfo(np.int64).max
    bad = np.flatnonzero((actions < 0) | (actions >= hi))
    if bad.size:
        i = int(bad[0])
        expected = f"[0, {num_actions})" if num_actions is not None else ">= 0"
        raise ValueError(
            f"unknown action id {int(actions[i])} of sample {i} in {where} ({bad.size} bad "
            f"ids); expected ids in {expected}"
        )

    clips = [p.reshape(p.shape[0], -1).astype(np.float32) for p in seqs]
    data, cropped = _pack(clips, max_frames, crop_seed)
    names = [action_names[a] for a in actions] if action_names is not None else None
    data["caption"] = np.array(names if names is not None else [""] * len(clips), dtype=str)
    data["action"] = actions.astype(np.int32)
    info = MotionFilesInfo(
        ids=[str(i) for i in range(len(clips))],
        captions=[[c] for c in names] if names is not None else [[] for _ in clips],
        tokens=[[] for _ in clips],
        mean=None,
        std=None,
        fps=float(fps),
        num_cropped=cropped,
    )
    return data, info
