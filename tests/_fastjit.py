"""``jit`` for the tests' tiny programs: XLA's backend optimisations (and, where this XLA has the
option, the CPU fusion emitters) cost more compile time than they save (about 3x faster compiles;
the numerics are unchanged up to rounding)."""

import functools

import jax
import jax.numpy as jnp


def _options() -> dict:
    options = {"xla_backend_optimization_level": 0}
    try:  # the option exists in jax 0.10's XLA, not in newer ones
        trial = {**options, "xla_cpu_use_fusion_emitters": False}
        jax.jit(lambda x: x + 1, compiler_options=trial)(jnp.zeros(()))
        return trial
    except Exception:  # noqa: BLE001 - any rejection of the option means "not available"
        return options


jit = functools.partial(jax.jit, compiler_options=_options())
