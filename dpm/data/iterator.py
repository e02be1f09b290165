"""Deterministic, resumable iterators of numpy batches.

``BatchIterator`` walks a dict of arrays sharing the leading dimension N in batches. Its order
is a pure function of ``(seed, step)``, so its whole position is the small dict ``state()``;
each process of a multi-host run takes its own contiguous slice of every global batch.

Example:
  >>> data = dpm.data.toy_2d("ring8", n=1024, seed=0)
  >>> it = BatchIterator(data, batch_size=128, seed=0)
  >>> batch = next(it)          # {"x": (128, 2) float32, "y": (128,) int32}
  >>> saved = it.state()        # JSON-serialisable; BatchIterator(data, 128, seed=0, state=saved)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from dpm.data.transforms import check_finite

__all__ = [
    "BatchIterator",
]


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
      ValueError: on empty/mismatched arrays, NaN or infinite values, non-positive or
        indivisible batch sizes, a batch larger than the data set with ``drop_remainder``, or a
        bad process index.
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
        for k, v in self.arrays.items():
            check_finite(v, f"arrays[{k!r}]")  # a NaN data set would train to NaN silently
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
