"""dpm.pytree.device_cached_dataclass: host leaves reach the device once per instance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpm
import solvers
from dpm.pytree import device_cached_dataclass
from solvers import grids


def test_schedule_fields_stay_float64_host_values():
    s = dpm.DiscreteVP.from_name("linear")
    leaves = jax.tree.leaves(s)
    assert isinstance(s.betas, np.ndarray) and s.betas.dtype == np.float64
    assert all(isinstance(x, jax.Array) for x in leaves)
    assert leaves[0].dtype == jnp.float32  # what JAX itself makes of float64 without x64
    np.testing.assert_array_equal(np.asarray(leaves[0]), s.betas.astype(np.float32))
    # made once: a second flatten hands out the same device arrays
    assert all(a is b for a, b in zip(leaves, jax.tree.leaves(s), strict=True))
    # keys name the fields
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(s)[0]]
    assert paths == [".betas", ".log_alpha_grid"]


def test_x64_gets_float64_leaves(x64):
    s = dpm.DiscreteVP.from_name("linear")
    jax.tree.leaves(s)  # nothing carried over from a float32 flatten either way
    leaf = jax.tree.leaves(s)[0]
    assert leaf.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(leaf), s.betas)


def test_repeated_jit_call_copies_nothing_to_the_device():
    for schedule in (dpm.DiscreteVP.from_name("linear"), dpm.LinearVP(), dpm.EDM()):
        gm = dpm.GaussianMixture.create(means=jnp.array([[1.0, 0.0]]), stds=jnp.array([0.5]))
        den = gm.denoiser(schedule, "eps")
        x = jax.random.normal(jax.random.key(0), (8, 2))
        ts = grids.uniform_time(4, schedule, t_end=0.0)
        f = jax.jit(solvers.ddim)
        first = f(den, x, ts)
        with jax.transfer_guard("disallow"):
            again = f(den, x, ts)
        np.testing.assert_array_equal(np.asarray(first), np.asarray(again))


def test_unflatten_validates_and_tracers_are_not_cached():
    s = dpm.EDM(sigma_min=0.002, sigma_max=80.0)
    leaves, treedef = jax.tree.flatten(s)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        jax.tree.unflatten(treedef, [jnp.asarray(5.0), jnp.asarray(1.0)])

    seen = []

    @jax.jit
    def f(s):
        seen.append(s)
        return s.sigma(jnp.asarray(0.5))

    np.testing.assert_allclose(float(f(s)), 40.0, rtol=1e-6)
    traced = seen[0]
    assert isinstance(traced.sigma_max, jax.core.Tracer)
    assert "_device_leaves_cache" not in traced.__dict__  # no tracer kept past its trace
    # gradients reach a float field through the cached leaves
    g = jax.grad(lambda smax: dpm.LinearVP(0.1, smax).log_alpha(jnp.asarray(1.0)))(20.0)
    assert float(g) == pytest.approx(-0.25)


def test_static_fields_are_aux_data():
    @device_cached_dataclass
    @dataclasses.dataclass(frozen=True)
    class Opt:
        n: int = dataclasses.field(default=2, metadata=dict(static=True))
        scale: float = 1.5

    leaves, treedef = jax.tree.flatten(Opt())
    assert len(leaves) == 1 and float(leaves[0]) == 1.5
    assert jax.tree.unflatten(treedef, [jnp.asarray(3.0)]).n == 2
    assert jax.tree.structure(Opt(n=3)) != treedef  # part of the jit cache key
    with pytest.raises(TypeError, match="not a dataclass"):
        device_cached_dataclass(int)
