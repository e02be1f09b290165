"""``jit`` for the tests' tiny programs: XLA's backend optimisations (and, where this XLA has the
option, the CPU fusion emitters) cost more compile time than they save (about 3x faster compiles;
the numerics are unchanged up to rounding); see ``dpm.training.fast_compile_options``."""

import functools

import jax

from dpm.training import fast_compile_options

jit = functools.partial(jax.jit, compiler_options=fast_compile_options())
