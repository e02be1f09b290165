"""One writer per run directory: an exclusive, crash-safe lock on a workdir.

Two processes started on the same workdir would both train, interleave their metric lines and
race on checkpoints. :class:`WorkdirLock` takes an exclusive ``flock`` on ``<workdir>/.lock``
and records the holder (pid, host, start time) in it; a second process is refused with a
message naming the holder. The operating system releases the lock when its holder exits, killed
or not, so a lock file left by a dead process never blocks a restart. Within one process the
lock is re-entrant (a driver and the training loop it calls may both take it).

Typical use::

    with WorkdirLock(workdir):
        ...  # train, checkpoint, write metrics
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from typing import Any

__all__ = ["WorkdirBusyError", "WorkdirLock"]

_LOCK_NAME = ".lock"
_held: dict[str, list[Any]] = {}  # real path of the lock file -> [file object, depth]
_guard = threading.Lock()


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            info = json.load(f)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"pid {info['pid']} on host {info['host']}, running since {started}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its details are unreadable)"


class WorkdirLock:
    """Exclusive lock on ``workdir`` for the life of a ``with`` block (or acquire/release).

    Args:
      workdir: the run directory (created if missing).

    Raises:
      WorkdirBusyError: on :meth:`acquire` when another live process holds the lock; the
        message names its pid, host and start time.
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.path = os.path.join(self.workdir, _LOCK_NAME)
        self._acquired = False

    def acquire(self) -> WorkdirLock:
        if self._acquired:
            return self
        os.makedirs(self.workdir, exist_ok=True)
        key = os.path.realpath(self.path)
        with _guard:
            if key in _held:  # this process already holds it
                _held[key][1] += 1
                self._acquired = True
                return self
            f = open(self.path, "a+")  # noqa: SIM115 - kept open while the lock is held
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise WorkdirBusyError(
                    f"workdir {self.workdir} is in use by {_holder(self.path)} (lock file "
                    f"{self.path}); one run writes a workdir at a time. Wait for it to finish, "
                    "stop it, or choose another --workdir."
                ) from None
            f.seek(0)
            f.truncate()
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.time()}, f)
            f.flush()
            _held[key] = [f, 1]
        self._acquired = True
        return self

    def release(self) -> None:
        if not self._acquired:
            return
        key = os.path.realpath(self.path)
        with _guard:
            entry = _held.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[key]
                    f = entry[0]
                    f.seek(0)
                    f.truncate()  # no holder any more
                    f.flush()
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                    f.close()
        self._acquired = False

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
