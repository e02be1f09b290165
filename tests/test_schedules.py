import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpm import EDM, CosineVP, DiscreteVP, LinearVP, make_betas
from experiments._registry import get_schedule

VP_SCHEDULES = {
    "linear": lambda: DiscreteVP.from_name("linear"),
    "scaled_linear": lambda: DiscreteVP.from_name("scaled_linear"),
    "cosine": lambda: DiscreteVP.from_name("cosine"),
    "vp_linear": lambda: LinearVP(),
    "vp_cosine": lambda: CosineVP(),
}
ALL = {**VP_SCHEDULES, "edm": lambda: EDM()}


@pytest.mark.parametrize("name", VP_SCHEDULES)
def test_vp_alpha_sigma_unit_norm(name, x64):
    s = VP_SCHEDULES[name]()
    t = jnp.linspace(0.0, 1.0, 513)
    np.testing.assert_allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0, atol=1e-12)
    assert float(s.alpha(0.0)) == 1.0 and float(s.sigma(0.0)) == 0.0


@pytest.mark.parametrize("name", ALL)
def test_log_snr_strictly_decreasing_and_inverse(name, x64):
    s = ALL[name]()
    t = jnp.linspace(1e-4, 1.0, 2001)
    lam = s.log_snr(t)
    assert np.all(np.diff(np.asarray(lam)) < 0)
    assert float(s.log_snr(0.0)) == np.inf
    np.testing.assert_allclose(s.t_of_log_snr(lam), t, atol=1e-6)
    # and through sigma_bar
    np.testing.assert_allclose(s.t_of_sigma_bar(s.sigma_bar(t)), t, atol=1e-6)


def test_discrete_reproduces_cumprod_and_pinned_constants(x64):
    s = DiscreteVP.from_name("linear")
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1.0 - betas)
    t = (np.arange(1000) + 1) / 1000
    np.testing.assert_allclose(s.alpha(jnp.asarray(t)) ** 2, abar, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod, abar, rtol=1e-12)
    # spec §12.11: published constants of the linear schedule
    np.testing.assert_allclose(abar[0], 0.9999)
    np.testing.assert_allclose(float(s.alphas_cumprod[-1]), 4.0358e-5, rtol=1e-4)
    sb = s.sigma_bar(jnp.asarray([1e-3, 1.0]))
    np.testing.assert_allclose(sb, [0.0100005, 157.407], rtol=1e-5)
    half_lam = s.log_snr(jnp.asarray([1.0, 1e-3])) / 2
    np.testing.assert_allclose(half_lam, [-5.0588, 4.6051], atol=1e-4)
    sl = DiscreteVP.from_name("scaled_linear")
    sb = sl.sigma_bar(jnp.asarray([1e-3, 1.0]))
    np.testing.assert_allclose(sb, [0.029167, 14.6146], rtol=1e-4)


def test_discrete_index_mapping():
    s = DiscreteVP.from_name("linear", 1000)
    i = jnp.arange(1000.0)
    np.testing.assert_allclose(s.index_of_t(s.t_of_index(i)), i, atol=1e-3)
    assert float(s.t_of_index(0)) == pytest.approx(1e-3)
    assert float(s.c_noise(1.0)) == pytest.approx(999.0)


def test_cosine_betas_match_definition():
    b = make_betas("cosine", 1000)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    abar = np.cumprod(1 - b)
    # below the beta cap the cumulative product is exactly f(u)/f(0)
    u = (np.arange(1000) + 1) / 1000
    np.testing.assert_allclose(abar[:900], (f(u) / f(0))[:900], rtol=1e-10)
    assert b.max() <= 0.999


def test_linear_vp_closed_form(x64):
    s = LinearVP(0.1, 20.0)
    t = jnp.linspace(0, 1, 11)
    expected = np.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1)
    np.testing.assert_allclose(s.alpha(t), expected, rtol=1e-12)


def test_edm_schedule():
    s = EDM()
    assert float(s.sigma(0.5)) == pytest.approx(40.0)
    assert float(s.alpha(0.3)) == 1.0
    assert s.t_min == pytest.approx(0.002 / 80)
    assert not s.is_variance_preserving


@pytest.mark.parametrize("name", ALL)
def test_jit_vmap_pytree(name):
    s = ALL[name]()
    f = jax.jit(lambda sched, t: (sched.alpha(t), sched.sigma(t), sched.log_snr(t)))
    t = jnp.linspace(0.01, 1.0, 7)
    a, sg, lam = f(s, t)
    chex.assert_shape([a, sg, lam], (7,))
    av = jax.vmap(s.alpha)(t)
    np.testing.assert_allclose(av, a, rtol=1e-6)
    # the schedule is a pytree: flatten/unflatten round trip
    leaves, tree = jax.tree.flatten(s)
    s2 = jax.tree.unflatten(tree, leaves)
    np.testing.assert_allclose(s2.sigma(t), sg, rtol=1e-6)
    # gradients are finite inside (0, 1)
    g = jax.grad(lambda u: s.log_snr(u))(0.5)
    assert np.isfinite(float(g)) and float(g) < 0


@settings(max_examples=40, deadline=None)
@given(t=st.floats(1e-4, 1.0), name=st.sampled_from(sorted(VP_SCHEDULES)))
def test_hypothesis_inverse_and_unit_norm(t, name):
    with jax.enable_x64(True):
        s = VP_SCHEDULES[name]()
        tt = jnp.asarray(t, dtype=jnp.float64)
        assert abs(float(s.t_of_log_snr(s.log_snr(tt))) - t) < 1e-6
        assert abs(float(s.alpha(tt) ** 2 + s.sigma(tt) ** 2) - 1.0) < 1e-12


def test_bad_input():
    with pytest.raises(ValueError, match="schedule name"):
        get_schedule("sqrt")
    with pytest.raises(ValueError, match="schedule name"):
        make_betas("exp")
    with pytest.raises(ValueError, match="betas must lie"):
        DiscreteVP.from_betas([0.1, -0.1, 0.2])
    with pytest.raises(ValueError, match="betas must be a 1-D"):
        DiscreteVP.from_betas(np.ones((2, 2)) * 0.1)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        LinearVP(20.0, 0.1)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        EDM(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match=r"0 < t_max < 1 .* t_max=1.0"):
        CosineVP(t_max=1.0)  # alpha(1) = cos(pi / 2): a NaN log_snr in float32
    with pytest.raises(ValueError, match=r"s >= 0 .* s=-0.5"):
        CosineVP(s=-0.5)
    with pytest.raises(ValueError, match="num_steps"):
        make_betas("linear", 1)


def test_discrete_schedule_on_sharded_per_example_times():
    """Per-example times sharded over 8 devices (a data-parallel loss or Time-Shift) work under
    jit for the discrete schedule, and agree with the unsharded values."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    s = DiscreteVP.from_name("linear")
    mesh = Mesh(np.array(jax.devices()), ("data",))
    t = jnp.linspace(0.0, 1.0, 16)
    ts = jax.device_put(t, NamedSharding(mesh, PartitionSpec("data")))
    f = jax.jit(lambda sched, u: (sched.sigma(u), sched.t_of_log_snr(sched.log_snr(u))))
    sig, back = f(s, ts)
    np.testing.assert_allclose(sig, s.sigma(t), rtol=1e-6)
    np.testing.assert_allclose(back, t, atol=1e-5)
