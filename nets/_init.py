"""Initialising a module's parameters as one compiled program.

Built eagerly, every initializer of a module (one per weight shape) is compiled as its own small
XLA program: about 10 s on CPU for the tiny U-Net, paid again by every new process. Built under
``jax.jit`` the whole initialisation is one program, compiled once per module configuration
(and cached here), with backend optimisations off: it runs once, so compiling fast matters more
than running fast.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import jax
from flax import nnx

_FAST = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=64)
def _compiled_init(cls: type, args: tuple, kwargs: tuple):
    def build(key):
        return cls(*args, **dict(kwargs), rngs=nnx.Rngs(key))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(jax.random.key(0))))
    init = jax.jit(lambda key: nnx.split(build(key), nnx.Param)[1], compiler_options=_FAST)
    return graphdef, init


def init_params(cls: type, *args: Hashable, seed: int = 0, **kwargs: Hashable
                ) -> tuple[nnx.GraphDef, Any]:
    """``(graphdef, params)`` of ``cls(*args, **kwargs, rngs=nnx.Rngs(seed))``.

    The same parameters as the eager construction up to float rounding of the initializers'
    scaling (the random bits are identical). Arguments must be hashable (they key the cache of
    compiled initialisers); every state of the module must be an ``nnx.Param``.

    Example:
      >>> graphdef, params = init_params(UNet, tiny(), seed=0)
    """
    try:
        graphdef, init = _compiled_init(cls, tuple(args), tuple(sorted(kwargs.items())))
    except TypeError as e:
        if "unhashable" not in str(e):
            raise
        raise TypeError(f"init_params: the arguments of {cls.__name__} must be hashable "
                        f"(they key the cache of compiled initialisers); {e}") from e
    return graphdef, init(jax.random.key(seed))
