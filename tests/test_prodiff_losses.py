"""ProDiff's objectives: the VP-SDE table, the ancestral x0-head step against the closed-form
posterior, the student's target identity on that table, and masked mel losses that ignore
padding (content and length)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial
from scipy import ndimage

import dpm
from dpm.losses import (
    distillation_target,
    fastspeech2_variance_loss,
    masked_l1,
    masked_ssim,
    mel_loss,
    prodiff_distillation_loss,
    prodiff_teacher_loss,
)
from solvers import ddpm


def _prodiff_schedule():
    return dpm.DiscreteVP.from_betas(dpm.make_betas("vpsde", 4, table_size=5))


def test_vpsde_table_is_the_integrated_sde_and_prodiffs_numbers(x64):
    b_min, b_max, T = 0.1, 40.0, 5
    betas = dpm.make_betas("vpsde", 4, table_size=T)
    a_bar = np.cumprod(1.0 - betas)
    u = np.arange(1, 5) / T
    # closed form of the VP-SDE at the grid points: exp(-int_0^u beta)
    np.testing.assert_allclose(a_bar, np.exp(-(b_min * u + 0.5 * (b_max - b_min) * u**2)),
                               rtol=1e-12)
    # the spec's table (its first four entries) and log-SNRs
    np.testing.assert_allclose(a_bar, [0.441, 0.0395, 7.2e-4, 2.6e-6], rtol=0.02)
    sched = _prodiff_schedule()
    lam = np.asarray(sched.log_snr(jnp.asarray(u * T / 4)))
    np.testing.assert_allclose(lam, [-0.24, -3.19, -7.24, -12.85], atol=0.02)
    with pytest.raises(ValueError, match="table_size must be an int >= num_steps=4"):
        dpm.make_betas("vpsde", 4, table_size=3)
    with pytest.raises(ValueError, match="table_size is a 'vpsde' option"):
        dpm.make_betas("linear", 4, table_size=5)


def _const_x0(x0, x, t, cond):
    return jnp.broadcast_to(x0, x.shape)


def test_x0_head_ancestral_step_is_the_closed_form_posterior(x64):
    sched = _prodiff_schedule()
    a_bar = np.cumprod(1.0 - np.asarray(sched.betas))
    x0 = jnp.full((1, 400_000), 0.7)
    den = dpm.Denoiser(Partial(_const_x0, x0), sched, "x0")
    x_T = jax.random.normal(jax.random.key(0), x0.shape, jnp.float64)
    ts = jnp.asarray([1.0, 0.75, 0.5, 0.25, 0.0])
    _, traj = ddpm(den, x_T, ts, key=jax.random.key(1), return_trajectory=True)
    xs = np.asarray(traj["x"]) if isinstance(traj, dict) and "x" in traj else None
    assert xs is not None, f"trajectory keys: {list(traj)}"
    for k, (i, j) in enumerate(((3, 2), (2, 1), (1, 0))):  # index i -> i - 1
        x_t, x_s = xs[k], xs[k + 1]
        beta = 1.0 - a_bar[i] / a_bar[j]
        mean = (np.sqrt(a_bar[j]) * beta * 0.7 + np.sqrt(1.0 - beta) * (1.0 - a_bar[j]) * x_t
                ) / (1.0 - a_bar[i])
        var = (1.0 - a_bar[j]) / (1.0 - a_bar[i]) * beta
        r = (x_s - mean) / np.sqrt(var)
        assert abs(r.mean()) < 0.01 and abs(r.std() - 1.0) < 0.01, (k, r.mean(), r.std())
    # the last step (index 0 -> data) adds no noise: it is the x0 guess
    np.testing.assert_allclose(xs[-1], 0.7, atol=1e-12)


def _teacher_fn(x, t, cond):
    t = jnp.reshape(jnp.asarray(t, x.dtype), (-1,) + (1,) * (x.ndim - 1))
    return jnp.tanh(0.7 * x + 0.3 * jnp.roll(x, 1, axis=-1)) * (1.0 + t) + 0.1 * t


@pytest.mark.parametrize("t,s", [(1.0, 0.5), (0.5, 0.0)])
def test_one_student_step_lands_on_the_teachers_two(x64, t, s):
    sched = _prodiff_schedule()
    teacher = dpm.Denoiser(_teacher_fn, sched, "x0")
    z = jax.random.normal(jax.random.key(2), (3, 16, 5), jnp.float64)
    x_til, z_s = distillation_target(teacher, z, jnp.full((3,), t), jnp.full((3,), s))
    # the teacher's two DDIM steps, written out from the alpha_bar table
    a_bar = np.concatenate([[1.0], np.cumprod(1.0 - np.asarray(sched.betas))])
    zz = np.asarray(z)
    for hi, lo in ((t, (t + s) / 2), ((t + s) / 2, s)):
        i, j = round(4 * hi), round(4 * lo)
        x0 = np.asarray(_teacher_fn(jnp.asarray(zz), jnp.full((3,), hi), None))
        eps = (zz - np.sqrt(a_bar[i]) * x0) / np.sqrt(1 - a_bar[i])
        zz = np.sqrt(a_bar[j]) * x0 + np.sqrt(1 - a_bar[j]) * eps
    np.testing.assert_allclose(np.asarray(z_s), zz, rtol=1e-9, atol=1e-12)
    # one student DDIM step with x0_hat = x_til lands there
    i, j = round(4 * t), round(4 * s)
    eps = (np.asarray(z) - np.sqrt(a_bar[i]) * np.asarray(x_til)) / np.sqrt(1 - a_bar[i])
    one = np.sqrt(a_bar[j]) * np.asarray(x_til) + np.sqrt(1 - a_bar[j]) * eps
    np.testing.assert_allclose(one, zz, rtol=1e-8, atol=1e-10)


def _mels(key, b=2, f=40, m=20):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (b, f, m))
    y = x + 0.3 * jax.random.normal(k2, (b, f, m))
    lengths = jnp.asarray([f, f - 13])[:b]
    mask = (jnp.arange(f)[None] < lengths[:, None]).astype(jnp.float32)
    return x, y, mask


def _repad(a, mask, key, extra=7):
    """Other padding content, and ``extra`` more padded frames."""
    junk = 5.0 * jax.random.normal(key, a.shape)
    a = jnp.where(mask[..., None] > 0, a, junk)
    return jnp.pad(a, ((0, 0), (0, extra), (0, 0)), constant_values=3.0)


def test_masked_losses_ignore_padding_content_and_length():
    x, y, mask = _mels(jax.random.key(0))
    mask2 = jnp.pad(mask, ((0, 0), (0, 7)))
    x2, y2 = _repad(x, mask, jax.random.key(1)), _repad(y, mask, jax.random.key(2))
    for fn in (masked_l1, masked_ssim, mel_loss):
        np.testing.assert_allclose(fn(x, y, mask), fn(x2, y2, mask2), rtol=1e-5, atol=1e-6)
    # L1 against numpy over the real frames only
    n = int(mask[1].sum())
    np.testing.assert_allclose(masked_l1(x, y, mask)[1],
                               np.mean(np.abs(np.asarray(x - y)[1, :n])), rtol=1e-5)
    np.testing.assert_allclose(masked_ssim(x, x, mask), 1.0, rtol=1e-5)
    worse = masked_ssim(x, x + 0.6 * (y - x) / 0.3, mask)
    assert np.all(np.asarray(masked_ssim(x, y, mask)) > np.asarray(worse))


def test_masked_ssim_matches_an_independent_scipy_computation():
    x, y, mask = _mels(jax.random.key(3))
    got = np.asarray(masked_ssim(x, y, mask, data_range=2.0))
    for b in range(2):
        m = np.asarray(mask[b])[:, None]
        a, c = np.asarray(x[b], np.float64) * m, np.asarray(y[b], np.float64) * m

        def g(v):  # 11-tap Gaussian (radius int(3.34 * 1.5 + 0.5) = 5), zero padding
            return ndimage.gaussian_filter(v, 1.5, mode="constant", truncate=3.34)

        mx, my = g(a), g(c)
        vx, vy, cxy = g(a * a) - mx**2, g(c * c) - my**2, g(a * c) - mx * my
        c1, c2 = 0.02**2, 0.06**2
        smap = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        n = int(m.sum())
        np.testing.assert_allclose(got[b], smap[:n].mean(), rtol=1e-4)


def _oracle_model(head, x0, sched):
    """A model that knows the clean mel: exact x0, or the exact noise of z."""
    def fn(x, t, cond):
        if head == "x0":
            return x0 * cond["mask"][..., None]
        a = dpm.expand_like(sched.alpha(t), x)
        s = dpm.expand_like(sched.sigma(t), x)
        return (x - a * x0) / s * cond["mask"][..., None]
    return dpm.Denoiser(fn, sched, head)


@pytest.mark.parametrize("head", ["x0", "eps"])
def test_teacher_loss_is_zero_for_the_oracle_and_positive_otherwise(head):
    sched = _prodiff_schedule()
    x, _, mask = _mels(jax.random.key(4))
    x = x * mask[..., None]
    batch = {"x": x, "mask": mask, "cond": {"mask": mask}}
    loss = prodiff_teacher_loss(lambda p: _oracle_model(head, p, sched), steps=4)
    np.testing.assert_allclose(loss(x, batch, jax.random.key(5)), 0.0, atol=2e-4)
    wrong = loss(0.5 * x, batch, jax.random.key(5))
    assert np.all(np.asarray(wrong) > 0.05)


def _mixing_fn(p, z, t, c):
    """A smooth nonlinear x0 model that mixes neighbouring frames (as convolutions do), scaled
    by ``p``; padding zeroed on output like DiffNet's."""
    t = jnp.reshape(jnp.asarray(t, z.dtype), (-1, 1, 1))
    h = jnp.tanh(0.7 * z + 0.3 * jnp.roll(z, 1, axis=1)) * (1.0 + t)
    return p * h * c["mask"][..., None]


def test_distillation_loss_masks_padding_and_never_trains_the_teacher():
    sched = _prodiff_schedule()
    x, _, mask = _mels(jax.random.key(6))

    def make(p):
        return dpm.Denoiser(Partial(_mixing_fn, p), sched, "x0")

    loss = prodiff_distillation_loss(make, student_steps=2)
    batch = {"x": x, "mask": mask, "cond": {"mask": mask}}
    key = jax.random.key(7)
    g_teacher = jax.grad(lambda tp: loss(1.2, batch, key, tp).sum())(0.9)
    assert g_teacher == 0.0
    g_student = jax.grad(lambda p: loss(p, batch, key, 0.9).sum())(1.2)
    assert abs(float(g_student)) > 1e-3
    v = loss(1.2, batch, key, 0.9)
    assert np.all(np.asarray(v) > 0)
    # other content in the padded frames: the same loss, although the model mixes frames
    junk = jnp.where(mask[..., None] > 0, x, 7.0 * jax.random.normal(key, x.shape))
    np.testing.assert_allclose(loss(1.2, {**batch, "x": junk}, key, 0.9), v, rtol=1e-6)
    # a copy of the teacher is not a solution (one of its steps is not two)
    assert np.any(np.asarray(loss(0.9, batch, key, 0.9)) > 1e-4)
    with pytest.raises(ValueError, match="student must predict 'x0'"):
        prodiff_distillation_loss(
            lambda p: dpm.Denoiser(_teacher_fn, sched, "eps"))(1.0, batch, key, 1.0)
    with pytest.raises(ValueError, match="mask must have shape"):
        loss(1.2, {**batch, "mask": mask[:, :5]}, key, 0.9)


def test_variance_losses_are_masked_and_zero_at_the_target():
    rng = np.random.default_rng(0)
    B, P, F = 2, 6, 30
    pm = (np.arange(P)[None] < np.array([[6], [4]])).astype(np.float32)
    fm = (np.arange(F)[None] < np.array([[30], [21]])).astype(np.float32)
    target = {"durations": rng.integers(0, 7, (B, P)), "phone_mask": pm,
              "log_f0": rng.standard_normal((B, F)), "uv": (rng.random((B, F)) < 0.3) * 1.0,
              "energy": rng.standard_normal((B, F)), "frame_mask": fm}
    perfect = {"log_duration": np.log1p(target["durations"]), "log_f0": target["log_f0"],
               "uv_logit": np.where(target["uv"] > 0, 30.0, -30.0), "energy": target["energy"]}
    out = fastspeech2_variance_loss(perfect, target)
    for k, v in out.items():
        np.testing.assert_allclose(v, 0.0, atol=1e-6, err_msg=k)
    off = dict(perfect, energy=perfect["energy"] + np.where(fm > 0, 1.0, 100.0))
    np.testing.assert_allclose(fastspeech2_variance_loss(off, target)["energy"], 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown terms"):
        fastspeech2_variance_loss(perfect, target, weights={"pitch": 1.0})
