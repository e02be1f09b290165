"""PNDM family: measured convergence orders on the Gaussian oracle, exactness of the pseudo
RK / AB weights on polynomial noise, point-mass exactness, NFE bookkeeping, the JAX contract."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.tree_util import Partial

from dpm.denoiser import Denoiser, expand_like
from dpm.oracle import GaussianMixture
from dpm.schedules import EDM, DiscreteVP, LinearVP
from solvers import grids
from solvers.pndm import pndm

VARIANTS = ("f-pndm", "s-pndm", "plms")
MU = jnp.array([0.5, -1.0])


@functools.cache
def batched(variant):
    """``pndm`` jitted and vmapped over a stack of grids of equal length (one compile each)."""
    return jit(
        jax.vmap(
            functools.partial(pndm, variant=variant, return_trajectory=True),
            in_axes=(None, None, 0),
        )
    )


def randn(*shape, seed=0):
    """Test inputs from numpy (no per-shape compilation of jax.random)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def slope(steps, errs):
    return float(np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(errs), 1)[0])


# --------------------------------------------------------------------------------------------
# Convergence order (spec §4 [analysis]: 2 on t- or lambda-uniform grids, 4 on sigma_bar-uniform)
# --------------------------------------------------------------------------------------------

SB_MAX, SB_MIN = 3.0, 0.05  # sigma_bar range: the asymptotic regime needs h << data std (0.5)


def _three_grids(sched, S):
    t0, t1 = (float(sched.t_of_sigma_bar(jnp.asarray(v))) for v in (SB_MAX, SB_MIN))
    return jnp.stack(
        [
            grids.karras(S, sched, sigma_min=SB_MIN, sigma_max=SB_MAX, rho=1.0, append_zero=False),
            grids.uniform_log_snr(S, sched, t_start=t0, t_end=t1),
            grids.uniform_time(S, sched, t_start=t0, t_end=t1),
        ]
    )


@pytest.mark.parametrize(
    "variant, steps, orders",
    [
        ("f-pndm", [80, 160, 320, 640, 1280], (4.0, 2.0, 2.0)),
        ("plms", [80, 160, 320, 640, 1280], (4.0, 2.0, 2.0)),
        ("s-pndm", [20, 40, 80, 160, 320], (2.0, 2.0, 2.0)),
    ],
)
def test_convergence_order(x64, variant, steps, orders):
    sched = LinearVP()
    gm = GaussianMixture.gaussian(MU, 0.5)
    x_T = randn(4, 2)
    errs = []
    for S in steps:
        ts = _three_grids(sched, S)
        x0, _ = batched(variant)(gm.denoiser(sched), x_T, ts)
        ref = jax.vmap(lambda t: gm.flow(sched, x_T, t[0], t[-1]))(ts)
        errs.append(np.max(np.abs(x0 - ref), axis=(1, 2)))
    errs = np.array(errs)
    slopes = [slope(steps, errs[:, j]) for j in range(3)]
    print(
        f"{variant} order: sigma_bar-uniform {slopes[0]:.3f}, lambda-uniform {slopes[1]:.3f}, "
        f"t-uniform {slopes[2]:.3f}"
    )
    np.testing.assert_allclose(slopes, orders, atol=0.3)


# --------------------------------------------------------------------------------------------
# Exact weights: with eps_hat = p(sigma) independent of x on the EDM schedule (x_bar = x, the
# DDIM map is an Euler step in sigma, t-midpoints are sigma-midpoints), the pseudo methods are
# quadrature rules: pseudo RK4 = Simpson, pseudo improved Euler = trapezoid, AB-k exact for
# polynomials of degree < k. So F-PNDM is exact for cubic p, S-PNDM and PLMS for linear p.
# --------------------------------------------------------------------------------------------


def _poly_model(coef, x, t, cond):
    u = jnp.asarray(t)  # sigma / sigma_max on the EDM schedule
    p = sum(coef[k] * u**k for k in range(coef.shape[0]))
    return expand_like(p, x) * jnp.ones_like(x)


def _poly_integral(coef, t0, t1):  # int_{sigma(t0)}^{sigma(t1)} p d sigma, sigma = 80 t
    P_ = lambda u: 80.0 * sum(c * u ** (k + 1) / (k + 1) for k, c in enumerate(coef))
    return P_(t1) - P_(t0)


@pytest.mark.parametrize("variant, exact_degree", [("f-pndm", 3), ("s-pndm", 1), ("plms", 1)])
def test_pseudo_weights_exact_on_polynomials(x64, variant, exact_degree):
    x_T = jnp.array([[1.0, -2.0]])
    run = jit(functools.partial(pndm, variant=variant))
    for S in (7,):  # warm-up and multistep (AB2, AB3, AB4 for PLMS)
        ts = grids.uniform_time(S, t_start=1.0, t_end=0.25)
        for degree in (exact_degree, exact_degree + 1):
            coef = np.array([0.7, -1.3, 2.1, -0.9, 1.7])
            coef[degree + 1 :] = 0.0
            den = Denoiser(Partial(_poly_model, jnp.asarray(coef)), EDM(), "eps")
            err = float(jnp.max(jnp.abs(run(den, x_T, ts) - x_T - _poly_integral(coef, 1, 0.25))))
            if degree == exact_degree:
                assert err < 1e-11, (S, degree, err)
            else:
                assert err > 1e-6, (S, degree, err)  # one degree more is not exact


# --------------------------------------------------------------------------------------------
# Point mass, NFE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_point_mass_exact_and_nfe(x64, variant):
    """Spec §12.3: eps_hat is constant along exact trajectories of point-mass data, so every
    variant is exact. Small S: warm-up only, with a warm-up step into t = 0."""
    pm = GaussianMixture.gaussian(MU, 0.0)
    sched = LinearVP()
    x_T = randn(4, 2)
    small = 2 if variant == "f-pndm" else 1
    for S in (small, 20 if variant == "s-pndm" else 80):  # the latter shares the order test's
        ts = jnp.stack(
            [grids.uniform_time(S), grids.uniform_time(S, sched), grids.uniform_log_snr(S, sched)]
        )
        x0, traj = batched(variant)(pm.denoiser(sched), x_T, ts)
        np.testing.assert_allclose(x0[0], jnp.broadcast_to(MU, (4, 2)), atol=1e-10)  # t = 0
        for j in (1, 2):  # ending at t_min: the forward-process point alpha mu + sigma eps_T
            eps_T = (x_T - sched.alpha(ts[j, 0]) * MU) / sched.sigma(ts[j, 0])
            want = sched.alpha(ts[j, -1]) * MU + sched.sigma(ts[j, -1]) * eps_T
            np.testing.assert_allclose(x0[j], want, atol=1e-11)
        nfe = {"f-pndm": S + 3 * min(S, 3), "s-pndm": S + 1, "plms": S + 1}[variant]
        assert int(traj["nfe"][0]) == nfe
        chex.assert_shape([traj["x"], traj["eps"]], [(3, S + 1, 4, 2), (3, S, 4, 2)])
        np.testing.assert_array_equal(traj["x"][:, -1], x0)


def test_nfe_counts_model_calls():
    """F-PNDM S + 9, S-PNDM and PLMS S + 1: counted at run time with a debug callback."""
    calls = []

    def fn(x, t, cond):
        jax.debug.callback(lambda: calls.append(1))
        return 0.1 * x

    den = Denoiser(fn, DiscreteVP.from_name("linear"), "eps")
    ts = grids.ddim_uniform(6, den.schedule)
    for variant, nfe in (("f-pndm", 6 + 9), ("s-pndm", 6 + 1), ("plms", 6 + 1)):
        calls.clear()
        _, traj = jit(functools.partial(pndm, variant=variant, return_trajectory=True))(
            den, jnp.ones((2, 3)), ts
        )
        jax.effects_barrier()
        assert len(calls) == nfe == int(traj["nfe"]), (variant, len(calls))


# --------------------------------------------------------------------------------------------
# JAX contract
# --------------------------------------------------------------------------------------------


def test_jit_no_retrace_grad_and_sharding(x64):
    gm = GaussianMixture.gaussian(MU, 0.5)
    sched = DiscreteVP.from_name("linear")
    den = gm.denoiser(sched)

    @jit
    @chex.assert_max_traces(n=1)
    def run(den, x, ts):
        return pndm(den, x, ts, variant="f-pndm")

    x = randn(16, 2)
    for k in range(2):
        run(den, x + k, grids.ddim_uniform(6, sched, offset=k))
    ts = grids.ddim_uniform(6, sched)
    run = jit(functools.partial(pndm, variant="f-pndm"))  # retraces below are expected
    # grad w.r.t. x_T: the Gaussian oracle makes the sampler affine, finite differences exact
    g = jit(jax.grad(lambda x: jnp.sum(pndm(den, x, ts, variant="f-pndm"))))(x)
    e = jnp.zeros_like(x).at[3, 1].set(1e-3)
    fd = (jnp.sum(run(den, x + e, ts)) - jnp.sum(run(den, x, ts))) / 1e-3
    np.testing.assert_allclose(g[3, 1], fd, rtol=1e-8)
    # sharded batch: same values, same sharding
    sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    out = run(den, jax.device_put(x, sh), ts)
    assert out.sharding.is_equivalent_to(sh, out.ndim)
    np.testing.assert_allclose(out, run(den, x, ts), atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_program_size_independent_of_step_count(variant):
    den = GaussianMixture.gaussian(MU, 0.5).denoiser(LinearVP())

    def text(S):
        f = jit(functools.partial(pndm, den, variant=variant))
        return re.sub(r"\d+", "N", f.lower(jnp.ones((2, 2)), grids.uniform_time(S)).as_text())

    assert text(10) == text(100)


def test_bad_inputs():
    den = GaussianMixture.gaussian(MU, 0.5).denoiser(LinearVP())
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match="variant"):
        pndm(den, x, grids.uniform_time(5), variant="pndm4")
    with pytest.raises(ValueError, match="strictly decreasing"):
        pndm(den, x, jnp.array([1.0, 0.6, 0.6, 0.0]))
    with pytest.raises(ValueError, match="at least 1 step"):
        pndm(den, x, jnp.array([1.0]))
