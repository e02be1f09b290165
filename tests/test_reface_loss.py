"""REFace's objective: the unrolled DDIM branch against solvers.ddim and finite differences,
the weighted total, the swap partner, mask shuffling and paste-back."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import dpm
import solvers
from dpm.losses import (
    ddim_unroll,
    multiscale_l1,
    reface_terms,
    restrict,
    shuffle_masks,
    swap_partner,
    unrolled_times,
)

SCHED = dpm.DiscreteVP.from_name("scaled_linear", 1000)


def _oracle():
    gm = dpm.GaussianMixture.create([[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.3])
    return gm.denoiser(SCHED, "eps")


def _tiny_net(params, x, t, cond):
    # a small nonlinear eps-model on (B, 2, 2, 1) images: per-pixel MLP of (x, t)
    t = jnp.broadcast_to(t, (x.shape[0],))[:, None, None, None]
    h = jnp.tanh(x * params["w1"] + t * params["b1"])
    return h * params["w2"] + params["c"]


def _tiny_den(params):
    return dpm.Denoiser(Partial(_tiny_net, params), SCHED, "eps")


def _tiny_params(dtype=jnp.float32):
    return {
        "w1": jnp.asarray(0.7, dtype),
        "b1": jnp.asarray(-0.4, dtype),
        "w2": jnp.asarray(0.9, dtype),
        "c": jnp.asarray(0.05, dtype),
    }


def test_unrolled_times_consistent_grid():
    ts = np.asarray(unrolled_times(4))
    np.testing.assert_allclose(ts, [1.0, 0.75, 0.5, 0.25, 0.0])
    # t = 1, 0.75, ... are training indices 999, 749, 499, 249 of the discrete schedule
    np.testing.assert_allclose(np.asarray(SCHED.t_of_index(jnp.array([999.0, 749, 499, 249]))),
                               ts[:4], atol=1e-6)
    with pytest.raises(ValueError, match="steps"):
        unrolled_times(0)


@pytest.mark.parametrize("steps", [1, 4])
def test_unroll_equals_solvers_ddim(steps):
    den = _oracle()
    z_T = jax.random.normal(jax.random.key(0), (64, 2))
    ts = unrolled_times(steps)
    z_end, x0s = jax.jit(ddim_unroll)(den, z_T, ts)
    ref, traj = solvers.ddim(den, z_T, ts, return_trajectory=True)
    np.testing.assert_allclose(np.asarray(z_end), np.asarray(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(x0s), np.asarray(traj["x0"]), rtol=1e-5, atol=1e-5)
    # the last step into t = 0 returns its x0 guess
    np.testing.assert_allclose(np.asarray(z_end), np.asarray(x0s[-1]), atol=1e-6)


def test_unroll_gradient_matches_finite_differences(x64):
    z_T = jax.random.normal(jax.random.key(1), (3, 2, 2, 1), jnp.float64)
    ts = unrolled_times(3)

    def f(params, remat=True):
        _, x0s = ddim_unroll(_tiny_den(params), z_T, ts, remat=remat)
        return jnp.sum(jnp.sin(x0s))

    p = _tiny_params(jnp.float64)
    g = jax.grad(f)(p)
    g_plain = jax.grad(lambda q: f(q, remat=False))(p)
    for name in p:
        h = 1e-6
        up = dict(p, **{name: p[name] + h})
        dn = dict(p, **{name: p[name] - h})
        fd = (f(up) - f(dn)) / (2 * h)
        np.testing.assert_allclose(float(g[name]), float(fd), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(float(g[name]), float(g_plain[name]), rtol=1e-12)
        assert abs(float(g[name])) > 1e-4  # every parameter is reached through the steps


def _terms(params, key, **kw):
    x = jax.random.uniform(jax.random.key(3), (4, 4, 4, 1), minval=-1, maxval=1)
    region = jnp.zeros((4, 4, 4, 1)).at[:, 1:3, 1:3].set(1.0)
    ident = lambda img: jnp.stack([img.mean((1, 2, 3)), img.std((1, 2, 3)) + 0.1], -1)
    src = jnp.tile(jnp.array([[0.2, 1.0]]), (4, 1))
    return reface_terms(_tiny_den_img(params), x, key, target=x, face_region=region,
                        source_identity=src, identity_fn=ident, **kw)


def _tiny_den_img(params):
    return dpm.Denoiser(Partial(_tiny_net, params), SCHED, "eps")


def test_reface_terms_total_and_branch_switch():
    p = _tiny_params()
    key = jax.random.key(5)
    t = _terms(p, key, unroll_steps=4)
    assert t.x0_hats.shape == (4, 4, 4, 4, 1)
    np.testing.assert_allclose(np.asarray(t.loss), np.asarray(
        t.simple + 0.3 * t.identity + 0.1 * t.perceptual), rtol=1e-6)
    assert np.all(np.asarray(t.identity) > 0) and np.all(np.asarray(t.perceptual) > 0)
    # without the branch: the same inpainting term (same key), nothing else
    t0 = _terms(p, key, unroll_steps=0)
    np.testing.assert_allclose(np.asarray(t0.simple), np.asarray(t.simple), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(t0.loss), np.asarray(t0.simple))
    # the identity term sees only the face region: changing a pixel outside changes nothing
    img = t.x0_hats[0]
    region = jnp.zeros((4, 4, 4, 1)).at[:, 1:3, 1:3].set(1.0)
    moved = img.at[:, 0, 0].add(5.0)
    np.testing.assert_array_equal(np.asarray(restrict(img, region)),
                                  np.asarray(restrict(moved, region)))


def test_reface_terms_gradient_flows_through_unrolled_steps():
    p = _tiny_params()
    key = jax.random.key(6)
    g_id = jax.grad(lambda q: jnp.mean(_terms(q, key, unroll_steps=2).identity))(p)
    assert all(np.isfinite(float(v)) for v in g_id.values())
    assert abs(float(g_id["w2"])) > 1e-6


def test_reface_terms_errors():
    p = _tiny_params()
    x = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="identity_fn"):
        reface_terms(_tiny_den(p), x, jax.random.key(0), unroll_steps=2)
    with pytest.raises(ValueError, match="eps-prediction"):
        reface_terms(dpm.Denoiser(Partial(_tiny_net, p), SCHED, "x0"), x, jax.random.key(0))
    with pytest.raises(ValueError, match="unroll_steps"):
        reface_terms(_tiny_den(p), x, jax.random.key(0), unroll_steps=-1)
    with pytest.raises(ValueError, match="face_region"):
        reface_terms(_tiny_den(p), x, jax.random.key(0), unroll_steps=1,
                     face_region=jnp.zeros((2, 3, 3, 1)), source_identity=jnp.ones((2, 2)),
                     identity_fn=lambda i: i.reshape(2, -1)[:, :2])


@pytest.mark.parametrize("n", [2, 3, 8, 9])
def test_swap_partner_is_a_permutation_without_fixed_points(n):
    perm = np.asarray(swap_partner(n))
    assert sorted(perm.tolist()) == list(range(n)) or n % 2  # odd: the middle borrows
    assert np.all(perm != np.arange(n))
    if n % 2 == 0:
        np.testing.assert_array_equal(perm, np.arange(n)[::-1])


def test_swap_partner_refuses_batch_one():
    with pytest.raises(ValueError, match="no-op"):
        swap_partner(1)


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 1.0])
def test_shuffle_masks_rate(rate):
    n = 4000
    face = jnp.zeros((n, 2, 2, 1)).at[:, 0].set(1.0)
    head = jnp.zeros((n, 2, 2, 1))
    keep, is_head = jax.jit(shuffle_masks)(face, head, jax.random.key(0), rate)
    frac = float(np.mean(np.asarray(is_head)))
    assert abs(frac - rate) <= 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9
    expect = np.where(np.asarray(is_head)[:, None, None, None], 0.0, np.asarray(face))
    np.testing.assert_array_equal(np.asarray(keep), expect)


def test_multiscale_l1_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 3, 8, 8, 2)).astype(np.float32)
    want = 0.0
    for f in (1, 2, 4):
        pa = a.reshape(3, 8 // f, f, 8 // f, f, 2).mean((2, 4))
        pb = b.reshape(3, 8 // f, f, 8 // f, f, 2).mean((2, 4))
        want = want + np.abs(pa - pb).mean((1, 2, 3))
    np.testing.assert_allclose(np.asarray(multiscale_l1(a, b)), want, rtol=1e-5)
    with pytest.raises(ValueError, match="scale 3"):
        multiscale_l1(a, b, scales=(3,))


def test_paste_back_preserves_outside_exactly():
    rng = np.random.default_rng(1)
    x, target = rng.normal(size=(2, 2, 8, 8, 3)).astype(np.float32)
    keep = (rng.random((2, 8, 8, 1)) > 0.4).astype(np.float32)
    out = np.asarray(solvers.paste_back(jnp.asarray(x), jnp.asarray(target), jnp.asarray(keep)))
    k = keep[..., 0] > 0.5
    np.testing.assert_array_equal(out[k], target[k])
    np.testing.assert_array_equal(out[~k], x[~k])
    with pytest.raises(ValueError, match="keep"):
        solvers.paste_back(jnp.asarray(x), jnp.asarray(target), jnp.ones((2, 8, 8, 2)))


def test_inpaint_with_ddim_and_start_from():
    den = _tiny_den(_tiny_params())
    target = jnp.ones((2, 4, 4, 1)) * 0.3
    keep = jnp.zeros((2, 4, 4, 1)).at[:, :2].set(1.0)
    noise = jax.random.normal(jax.random.key(2), (2, 4, 4, 1))
    ts = jnp.linspace(0.6, 0.0, 6)
    out = solvers.inpaint(solvers.ddim, den, noise, ts, target=target, keep=keep,
                          start_from=target)
    raw = solvers.ddim(den, SCHED.alpha(0.6) * target + SCHED.sigma(0.6) * noise, ts)
    np.testing.assert_array_equal(np.asarray(out[:, :2]), np.asarray(target[:, :2]))
    np.testing.assert_allclose(np.asarray(out[:, 2:]), np.asarray(raw[:, 2:]), rtol=1e-6)
