"""Checkpoints: orbax ``CheckpointManager`` behind a small wrapper that makes runs resumable.

Every saved step holds two items: ``state`` (the arrays of the train state, written by orbax to a
temporary directory and renamed when complete, so a crash mid-save leaves the previous checkpoint
intact) and ``meta`` (JSON: the run's config, the data iterator's position and the layout -- key
path, shape, dtype -- of every array). Restoring compares the stored config and layout with the
current ones first, so a checkpoint of another model is refused with a message saying what
differs, and falls back to an older checkpoint, with a warning, when the newest cannot be read.
Every save also holds ``dpm_manifest.json`` (size and CRC32 of every file of the step), written
into the temporary directory after the arrays and before orbax's final rename: a step directory
that exists is complete *and* verifiable, so a truncated, deleted or altered file is found before
orbax reads it, the newest checkpoint of a killed run included. A step directory that a crash
left behind without any content (no orbax metadata, no manifest) is moved aside once, to
``<directory>/quarantine/``, with one warning.

Typical use::

    with Checkpointer(workdir / "ckpt", save_every=1000, keep=3, config=config) as ckpt:
        restored = ckpt.restore_latest(jax.eval_shape(lambda: state))
        if restored is not None:
            state, data_state, _ = restored
        for ...:
            state, metrics = train_step(state, batch)
            ckpt.maybe_save(int(state.step), state, data_state={"position": position})
        ckpt.save(int(state.step), state, data_state={"position": position})
"""

from __future__ import annotations

import json
import os
import time
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import LatestN

__all__ = ["Checkpointer"]

PyTree = Any

_MAX_LISTED = 8  # differences listed in a refusal message
_MANIFEST = "dpm_manifest.json"
_ORBAX_METADATA = "_CHECKPOINT_METADATA"  # written by orbax into every step it saves
_TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's temporary step directories: "<step>.orbax-...-<id>"
_QUARANTINE = "quarantine"
_CHUNK = 1 << 24


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


# written or rewritten by orbax when it commits the step, after the manifest: step-level
# bookkeeping (times, commit marker), not the saved data
_COMMIT_FILES = (_ORBAX_METADATA, "commit_success.txt")


def _file_table(step_dir: str) -> dict[str, list[int]]:
    """``{relative path: [size, crc32]}`` of every file of the saved items under ``step_dir``
    (all but the manifest and orbax's step-level commit files)."""
    table = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if not rel.startswith(_MANIFEST) and rel not in _COMMIT_FILES:
                table[rel] = [os.path.getsize(path), _crc32(path)]
    return table


def _json_roundtrip(value: Any, name: str) -> Any:
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON-serialisable, got {value!r} ({e}).") from e


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


def _read_once(abstract: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """``(read, place)``: the restore target with every leaf replicated over several devices of
    this process read onto one of them, and the function that copies the restored tree back to
    the requested shardings. Orbax reads a replicated array once per device; this reads it once
    (a restore onto 8 CPU devices did 8x the reads). Multi-process runs keep orbax's placement."""
    leaves, treedef = jax.tree.flatten(abstract)
    read, targets = [], []
    for x in leaves:
        s = x.sharding
        if (
            jax.process_count() == 1
            and isinstance(s, jax.sharding.Sharding)
            and len(s.device_set) > 1
            and s.is_fully_replicated
        ):
            first = jax.sharding.SingleDeviceSharding(min(s.device_set, key=lambda d: d.id))
            read.append(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=first))
            targets.append(s)
        else:
            read.append(x)
            targets.append(None)

    def place(state: PyTree) -> PyTree:
        got = treedef.flatten_up_to(state)
        return treedef.unflatten(
            [x if s is None else jax.device_put(x, s) for x, s in zip(got, targets, strict=True)]
        )

    return treedef.unflatten(read), place


def _layout(tree: PyTree) -> dict[str, dict[str, Any]]:
    """``{key path: {"shape": [...], "dtype": "..."}}`` for every array leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path): {"shape": list(np.shape(x)), "dtype": str(x.dtype)}
        for path, x in leaves
    }


def _flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, dict) and config:
        out = {}
        for k, v in config.items():
            out.update(_flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): config}


def _listing(lines: list[str]) -> str:
    more = len(lines) - _MAX_LISTED
    shown = lines[:_MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
    return "\n  ".join([""] + shown)


def _replicas_to_host(state: PyTree) -> PyTree:
    """Fully replicated arrays as one host (numpy) copy, in a single-process run.

    Orbax writes a replicated ``jax.Array`` through per-shard slicing and host copies: on 8
    devices about 4,000 eager ops per save of the tiny U-Net's train state (5 s on CPU, against
    under 1 s for the same state as numpy). The bytes written are the same, and a restore
    into a sharded abstract state reads them back as sharded arrays."""
    if jax.process_count() != 1:
        return state

    def host(x):
        if isinstance(x, jax.Array) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) \
                and x.is_fully_replicated and len(x.sharding.device_set) > 1:
            return np.asarray(x)
        return x

    return jax.tree.map(host, state)


class Checkpointer:
    """Periodic, atomic, resumable checkpoints of a train state plus config and data position.

    Args:
      directory: where step directories ``<directory>/<step>`` are written (created if missing).
      save_every: :meth:`maybe_save` saves the steps that are multiples of this.
      keep: number of most recent checkpoints kept; older ones are deleted.
      config: the run's configuration (a JSON-serialisable dict, or anything with ``to_dict()``
        such as an ``ml_collections.ConfigDict``); stored with every checkpoint and compared on
        restore. None skips the comparison.
      async_save: write the arrays in a background thread after copying them to host memory;
        :meth:`wait_until_finished` blocks until written.

    A save's integrity manifest (sizes and CRC32s, one read of the files) is written in the
    background thread that finishes the save, inside the temporary directory, before orbax
    renames it into place. Keep ``keep >= 2`` so that an unreadable newest checkpoint has a
    fallback.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 1,
        keep: int = 3,
        config: Mapping[str, Any] | None = None,
        async_save: bool = True,
    ):
        if isinstance(save_every, bool) or not isinstance(save_every, int) or save_every < 1:
            raise ValueError(f"save_every must be an int >= 1, got {save_every!r}.")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}.")
        if config is not None and hasattr(config, "to_dict"):
            config = config.to_dict()
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict or None, got {type(config).__name__}.")
        self._config = None if config is None else _json_roundtrip(dict(config), "config")
        self._save_every = save_every
        self._directory = os.path.abspath(os.fspath(directory))
        self._corrupt_steps: set[int] = set()
        self._saving_step: int | None = None  # the step whose save is under way
        self._seal_error: BaseException | None = None
        self._async = bool(async_save)
        self._closed = False
        self._quarantine_partial_steps()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the decision is taken in maybe_save
            preservation_policy=LatestN(n=keep),
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a crashed save
            # always orbax's async checkpointer: its finalisation hook writes the manifest into
            # the temporary directory before the final rename (a synchronous save waits for it)
            enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._seal_pending_save),
        )
        self._manager = ocp.CheckpointManager(
            self._directory, item_names=("state", "meta"), options=options
        )

    def _quarantine_partial_steps(self) -> None:
        """Move step directories with neither orbax metadata nor a manifest (left by a crash
        or an interrupted copy; orbax would list them as steps and fail on each start) to
        ``quarantine/``, or delete them when empty; one warning names them."""
        if jax.process_index() != 0 or not os.path.isdir(self._directory):
            return
        moved = []
        for name in sorted(os.listdir(self._directory)):
            path = os.path.join(self._directory, name)
            if not (name.isdigit() and os.path.isdir(path)):
                continue
            if os.path.exists(os.path.join(path, _ORBAX_METADATA)) or os.path.exists(
                os.path.join(path, _MANIFEST)
            ):
                continue
            if not os.listdir(path):
                os.rmdir(path)
                moved.append(f"{name} (empty, removed)")
                continue
            target = os.path.join(self._directory, _QUARANTINE, f"{name}.{time.time_ns()}")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(path, target)
            moved.append(f"{name} (moved to {target})")
        if moved:
            warnings.warn(
                f"checkpoint directory {self._directory} held incomplete step directories "
                f"(no checkpoint metadata, no manifest): {', '.join(moved)}. They are not "
                "checkpoints; the run resumes from the complete ones.",
                UserWarning,
                stacklevel=3,
            )

    @property
    def directory(self) -> str:
        """Absolute path of the checkpoint directory."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Steps with a (complete) checkpoint, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def maybe_save(
        self, step: int, state: PyTree, data_state: Mapping[str, Any] | None = None
    ) -> bool:
        """Save when ``step`` is a positive multiple of ``save_every``; see :meth:`save`."""
        step = int(step)
        if step <= 0 or step % self._save_every != 0:
            return False
        return self.save(step, state, data_state)

    def save(self, step: int, state: PyTree, data_state: Mapping[str, Any] | None = None) -> bool:
        """Save ``state`` and ``data_state`` as step ``step`` now (e.g. at the end of a run).

        Args:
          step: the step number (usually ``int(state.step)``).
          state: pytree of arrays (e.g. a ``TrainState``).
          data_state: small JSON-serialisable dict, e.g. the data iterator's position.

        Returns:
          True if a save was started; False if ``step`` is already saved.
        """
        step = int(step)
        data_state = _json_roundtrip(data_state, "data_state")
        if step in self._corrupt_steps:  # unreadable checkpoint found by restore_latest
            self._manager.delete(step)
            self._corrupt_steps.discard(step)
        elif step in self._manager.all_steps():
            return False
        self._manager.wait_until_finished()  # one save at a time: the hook knows its step
        self._raise_seal_error()
        meta = {"config": self._config, "data_state": data_state, "layout": _layout(state)}
        state = _replicas_to_host(state)
        self._saving_step = step
        started = bool(
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )
        )
        if not self._async:
            self.wait_until_finished()
        return started

    def _step_dir(self, step: int) -> str:
        return os.path.join(self._directory, str(step))

    def _seal_pending_save(self) -> None:
        """orbax's post-finalisation hook (background thread, before the final rename): write
        the manifest of the step being saved into its temporary directory. An error is kept
        and raised in the caller's thread at the next save, wait or close."""
        step = self._saving_step
        try:
            if step is None or jax.process_index() != 0:
                return
            prefix = f"{step}{_TMP_MARK}"
            tmp_dirs = [
                os.path.join(self._directory, n)
                for n in os.listdir(self._directory)
                if n.startswith(prefix) and os.path.isdir(os.path.join(self._directory, n))
            ]
            if not tmp_dirs:  # no temporary directory (a file system committing in place)
                tmp_dirs = [self._step_dir(step)]
            step_dir = max(tmp_dirs, key=os.path.getmtime)  # the newest: this save's
            table = _file_table(step_dir)
            tmp = os.path.join(step_dir, _MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"files": table}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(step_dir, _MANIFEST))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._seal_error = e

    def _raise_seal_error(self) -> None:
        if self._seal_error is not None:
            e, self._seal_error = self._seal_error, None
            raise OSError(f"writing the integrity manifest of a checkpoint in "
                          f"{self._directory} failed: {e}") from e

    def _verify(self, step: int) -> None:
        """Raise ``OSError`` when a file of the step differs from its manifest (if it has one)."""
        step_dir = self._step_dir(step)
        manifest = os.path.join(step_dir, _MANIFEST)
        if not os.path.exists(manifest):
            return  # a checkpoint of an older version without manifests: let orbax try
        with open(manifest) as f:
            expected = json.load(f)["files"]
        problems = []
        for rel, (size, crc) in expected.items():
            path = os.path.join(step_dir, rel)
            if not os.path.isfile(path):
                problems.append(f"{rel} is missing")
            elif os.path.getsize(path) != size:
                problems.append(f"{rel} has {os.path.getsize(path)} bytes, expected {size}")
            elif _crc32(path) != crc:
                problems.append(f"{rel} has another CRC32 than when saved")
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise OSError("; ".join(problems[:3]) + more)

    def _check_compatible(self, meta: Mapping[str, Any], layout: dict, step: int) -> None:
        where = f"checkpoint {os.path.join(self._directory, str(step))}"
        stored_config = meta.get("config")
        if self._config is not None and stored_config is not None and stored_config != self._config:
            old, new = _flatten_config(stored_config), _flatten_config(self._config)
            lines = [
                f"{k}: checkpoint has {old.get(k, '<absent>')!r}, current config has "
                f"{new.get(k, '<absent>')!r}"
                for k in sorted(set(old) | set(new))
                if old.get(k, "<absent>") != new.get(k, "<absent>")
            ]
            raise ValueError(
                f"{where} was made with another config; refusing to restore it. Differences:"
                + _listing(lines)
            )
        stored = meta.get("layout") or {}
        lines = []  # in the state's leaf order: params first
        for k, b in layout.items():
            a = stored.get(k)
            if a is None:
                lines.append(f"{k}: in the state, not in the checkpoint")
            elif a != b:
                lines.append(
                    f"{k}: checkpoint has shape {tuple(a['shape'])} {a['dtype']}, state has "
                    f"shape {tuple(b['shape'])} {b['dtype']}"
                )
        lines += [f"{k}: in the checkpoint, not in the state" for k in stored if k not in layout]
        if lines:
            raise ValueError(
                f"{where} does not match the structure of the state to restore (another model "
                "or optimizer?); refusing to restore it. Differences:" + _listing(lines)
            )

    def restore_latest(self, abstract_state: PyTree) -> tuple[PyTree, Any, int] | None:
        """Restore the newest readable checkpoint into the structure of ``abstract_state``.

        Args:
          abstract_state: the state a fresh run would start from, or its
            ``jax.eval_shape``; leaves may carry shardings, which the restored arrays get.

        Returns:
          ``(state, data_state, step)``, or None when the directory has no checkpoint.

        Raises:
          ValueError: when the newest readable checkpoint was made with another config or holds
            arrays of other key paths, shapes or dtypes; or when no checkpoint can be read.

        Warns:
          UserWarning: for every unreadable (e.g. truncated) checkpoint skipped in favour of an
            older one. Such a step is overwritten when the run saves it again.
        """
        self.wait_until_finished()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        abstract = jax.tree.map(_abstract, abstract_state)
        layout = _layout(abstract)
        failures = []
        for step in steps:
            try:
                self._verify(step)
            except (OSError, ValueError, KeyError, TypeError) as e:
                failures.append(self._unreadable(step, "files", e))
                continue
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
                if not isinstance(meta, dict):
                    raise ValueError(f"meta item is {type(meta).__name__}, expected a dict")
            except Exception as e:  # noqa: BLE001 - any read failure means "unreadable"
                failures.append(self._unreadable(step, "meta", e))
                continue
            self._check_compatible(meta, layout, step)
            read, place = _read_once(abstract)
            try:
                state = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(read))
                )["state"]
            except Exception as e:  # noqa: BLE001
                failures.append(self._unreadable(step, "state", e))
                continue
            state = place(state)
            return state, meta.get("data_state"), step
        raise ValueError(
            f"no readable checkpoint in directory {self._directory!r}:" + _listing(failures)
        )

    def _unreadable(self, step: int, item: str, error: Exception) -> str:
        self._corrupt_steps.add(step)
        detail = str(error)
        detail = detail if len(detail) <= 300 else detail[:300] + "..."
        message = f"step {step}: {item} unreadable ({type(error).__name__}: {detail})"
        warnings.warn(
            f"checkpoint {os.path.join(self._directory, str(step))} cannot be read ({message}); "
            "falling back to an older checkpoint.",
            UserWarning,
            stacklevel=3,
        )
        return message

    def wait_until_finished(self) -> None:
        """Block until every started save is on disk (with its manifest)."""
        self._manager.wait_until_finished()
        self._raise_seal_error()

    def close(self) -> None:
        """Finish pending saves and release the manager's resources; idempotent."""
        if self._closed:
            return
        self.wait_until_finished()
        self._manager.close()
        self._closed = True

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
