"""Frozen dataclasses as pytrees whose host-valued leaves go to the device once, not every call.

A schedule keeps its tables as float64 numpy arrays and its constants as Python floats: the host
truth, exact and usable without touching a device (module-level constants build no JAX array,
so ``jax.distributed.initialize`` can still run after import). Registered with
``jax.tree_util.register_dataclass``, those leaves are copied host -> device on *every* call of a
jitted function that takes the dataclass as an argument (``jax.jit(solver)(denoiser, x, ts)``):
a 1001-entry table per call, and ``jax.transfer_guard("disallow")`` refuses the call.

:func:`device_cached_dataclass` registers the dataclass with a flatten that hands out a device
copy of each host leaf (numpy array, numpy scalar or Python number), made on the first flatten
and kept on the instance. The fields themselves are unchanged (still the float64 host values);
only what JAX sees as leaves is the cached copy, in the dtype JAX itself would have given the
host value (float32, or float64 under ``jax_enable_x64``; Python floats stay weakly typed).
Leaves that are already JAX arrays or tracers pass through untouched; an instance holding a
tracer caches nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["device_cached_dataclass"]

_CACHE = "_device_leaves_cache"


def _is_host(v: Any) -> bool:
    return isinstance(v, np.ndarray | np.generic | int | float | complex) and not isinstance(
        v, bool)


def _to_device(v: Any) -> Any:
    if not _is_host(v):
        return v
    with jax.ensure_compile_time_eval():  # a concrete array even when flattened inside a trace
        return jnp.asarray(v)


def device_cached_dataclass(cls: type) -> type:
    """Registers the frozen dataclass ``cls`` as a pytree whose host leaves are converted to
    device arrays once per instance (see the module docstring). A field with
    ``metadata=dict(static=True)`` is auxiliary data (hashable, part of the jit cache key), as
    with ``jax.tree_util.register_dataclass``; every other field is a leaf.

    Unflattening calls ``cls(**fields)``, so ``__post_init__`` checks run as with
    ``jax.tree_util.register_dataclass``.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"device_cached_dataclass: {cls!r} is not a dataclass")
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields if not f.metadata.get("static", False))
    static = tuple(f.name for f in fields if f.metadata.get("static", False))
    keys = tuple(jax.tree_util.GetAttrKey(n) for n in names)

    def leaves(obj) -> tuple:
        x64 = bool(jax.config.jax_enable_x64)
        cached = obj.__dict__.get(_CACHE)
        if cached is not None and cached[0] == x64:
            return cached[1]
        out = tuple(_to_device(getattr(obj, n)) for n in names)
        if not any(isinstance(v, jax.core.Tracer) for v in out):
            object.__setattr__(obj, _CACHE, (x64, out))
        return out

    def meta(obj) -> tuple:
        return tuple(getattr(obj, n) for n in static)

    def flatten(obj):
        return leaves(obj), meta(obj)

    def flatten_with_keys(obj):
        return tuple(zip(keys, leaves(obj), strict=True)), meta(obj)

    def unflatten(aux, values):
        return cls(**dict(zip(static, aux, strict=True)), **dict(zip(names, values, strict=True)))

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls
