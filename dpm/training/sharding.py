"""Data parallelism in today's JAX form: a 1-D device mesh, a sharded batch, a replicated state.

The same jitted train step runs on one CPU, on 8 fake CPU devices, on one GPU or on a TPU pod slice:
the state is replicated (``PartitionSpec()``), the batch is split along its leading axis over the
``"data"`` mesh axis, and the compiler inserts the gradient all-reduce. This replaces ``pmap``.

Typical use::

    mesh = make_mesh()
    state = replicate(state, mesh)
    step = jit_train_step(train_step, mesh)       # dpm.training
    state, metrics = step(state, shard_batch(host_batch, mesh))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "batch_sharding",
    "initialize_distributed",
    "make_mesh",
    "process_batch_size",
    "process_count",
    "process_index",
    "replicate",
    "replicated",
    "shard_batch",
]

# Set once `initialize_distributed` has brought up the multi-host runtime (idempotence).
_DISTRIBUTED_INITIALIZED = False

def make_mesh(devices: Sequence[jax.Device] | None = None, axis_name: str = "data") -> Mesh:
    """A 1-D device mesh over which the batch is split.

    Args:
      devices: the devices of the mesh, in order; all devices of all processes (``jax.devices()``)
        by default.
      axis_name: the name of the single mesh axis.

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(len(devices),)`` with axis ``(axis_name,)``.
    """
    devices = jax.devices() if devices is None else list(devices)
    if len(devices) == 0:
        raise ValueError("make_mesh: devices is empty; expected at least one device.")
    if not isinstance(axis_name, str) or not axis_name:
        raise ValueError(f"make_mesh: axis_name must be a non-empty str, got {axis_name!r}.")
    return Mesh(np.asarray(devices, dtype=object), (axis_name,))


def _batch_spec(mesh: Mesh) -> PartitionSpec:
    names = tuple(mesh.axis_names)
    return PartitionSpec(names[0] if len(names) == 1 else names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits an array's leading (batch) axis over all devices of ``mesh``."""
    return NamedSharding(mesh, _batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def process_index() -> int:
    """Index of this process among the processes of the run (0 on a single host)."""
    return jax.process_index()


def process_count() -> int:
    """Number of processes taking part in the run (1 on a single host)."""
    return jax.process_count()


def process_batch_size(global_batch: int) -> int:
    """The number of examples this process loads per step for a global batch of ``global_batch``.

    Args:
      global_batch: the batch size of one train step summed over all processes and devices.

    Returns:
      ``global_batch // process_count()``.

    Raises:
      ValueError: when ``global_batch`` is not a positive multiple of the number of devices (then
        it cannot be split evenly over processes and devices).
    """
    if isinstance(global_batch, bool) or not isinstance(global_batch, int | np.integer):
        raise ValueError(f"process_batch_size: global_batch must be an int, got {global_batch!r}.")
    n_devices = jax.device_count()
    if global_batch <= 0 or global_batch % n_devices != 0:
        raise ValueError(
            f"process_batch_size: global_batch={global_batch} must be a positive multiple of the "
            f"number of devices ({n_devices}), so that every device gets as many examples."
        )
    return int(global_batch) // jax.process_count()


def _leaf_name(path: tuple) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host batch (numpy) -> global ``jax.Array``s split along axis 0 over the devices of ``mesh``.

    On several processes each one passes its own slice of the global batch (of leading size
    ``process_batch_size(global_batch)``); the global array is their concatenation in process
    order (``jax.make_array_from_process_local_data``).

    Args:
      batch: a pytree of arrays, every leaf of shape ``(B_local, ...)``.
      mesh: the device mesh.

    Returns:
      The same pytree of ``jax.Array``s of shape ``(B_local * process_count(), ...)`` with sharding
      ``batch_sharding(mesh)``.

    Raises:
      ValueError: when a leaf is a scalar or its leading size is not divisible by the number of
        this process's devices in the mesh.
    """
    sharding = batch_sharding(mesh)
    n_local = len(mesh.local_devices)

    def put(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(
                f"shard_batch: leaf {_leaf_name(path)} is a scalar; every batch leaf needs a "
                "leading batch axis."
            )
        if x.shape[0] % n_local != 0:
            raise ValueError(
                f"shard_batch: leaf {_leaf_name(path)} has leading (batch) size {x.shape[0]}, "
                f"which is not divisible by the number of devices ({n_local}) of this process "
                "in the mesh; choose a batch size that is a multiple of it."
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a full copy of every leaf of ``tree`` on every device of ``mesh``.

    On several processes every process must pass the same values. There ``jax.device_put``
    refuses typed PRNG keys and arrays committed to a local device for a sharding that spans
    other processes' devices: such leaves go through host memory (a key through its key data).
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and x.is_fully_addressable:
            x = np.asarray(x)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


def initialize_distributed(**kwargs: Any) -> bool:
    """Bring up JAX's multi-host runtime when this run spans several processes; idempotent.

    Calls ``jax.distributed.initialize(**kwargs)``, which detects the cluster itself (Cloud TPU
    pods, Slurm, Open MPI, Kubernetes, ... and ``JAX_COORDINATOR_ADDRESS``) and fills in the
    arguments not given (``coordinator_address``, ``num_processes``, ``process_id``; or pass
    ``cluster_detection_method=...``). When no argument is given and JAX detects no cluster, the run
    is a single process and nothing is done. Every call after a successful one does nothing. Call
    it before any other JAX call.

    Args:
      **kwargs: passed to ``jax.distributed.initialize``.

    Returns:
      True when the multi-host runtime is up after the call, False for a single-process run.

    Raises:
      ValueError: from ``jax.distributed.initialize`` when arguments were given, or a detected
        cluster is misconfigured.
    """
    global _DISTRIBUTED_INITIALIZED
    if _DISTRIBUTED_INITIALIZED or jax.distributed.is_initialized():
        _DISTRIBUTED_INITIALIZED = True
        return True
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        # JAX's own answer to "no cluster detected and no coordinator given": a single process.
        if kwargs or "coordinator_address" not in str(e):
            raise
        return False
    _DISTRIBUTED_INITIALIZED = True
    return True
