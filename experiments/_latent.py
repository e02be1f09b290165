"""Helpers the latent-diffusion experiments share (YONOS-SR, RG-LCD): jitted encode / decode of
a frozen KL autoencoder, and running a jitted function over a large array in fixed-size chunks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpm.training import fast_compile_options

__all__ = ["batched", "codec", "jit"]


def jit(fn, fast: bool):
    """``jax.jit(fn)``, with XLA's backend optimisations off when ``fast`` (smoke runs)."""
    return jax.jit(fn, compiler_options=fast_compile_options()) if fast else jax.jit(fn)


@functools.cache
def codec(graphdef, fast: bool):
    """Jitted ``encode(params, x, scale_factor) -> scaled mean`` and ``decode(params, z,
    scale_factor) -> x`` (clipped to [-1, 1]): compiled once per autoencoder layout."""

    def enc(q, x, sf):
        return sf * nnx.merge(graphdef, q).encode(x)[0]

    def dec(q, z, sf):
        return jnp.clip(nnx.merge(graphdef, q).decode(z / sf), -1.0, 1.0)

    return jit(enc, fast), jit(dec, fast)


def batched(fn, *arrays, size: int = 256) -> np.ndarray:
    """``fn`` over chunks of ``size`` examples, the last padded to the full size (one compiled
    shape per ``fn``)."""
    n, out = len(arrays[0]), []
    for i in range(0, n, size):
        parts = [a[i:i + size] for a in arrays]
        m = len(parts[0])
        if m < size and n > size:
            parts = [np.concatenate([q, np.repeat(q[-1:], size - m, axis=0)]) for q in parts]
        out.append(np.asarray(fn(*parts))[:m])
    return np.concatenate(out)
