"""YONOS-SR (scale distillation) against independent truths: the degradation (exact block means,
exact composition of area downsampling, exact reproduction of linear ramps by the bicubic
upsampler), the distillation loss on a linear-Gaussian toy whose Bayes-optimal denoisers are
known in closed form (the same minimiser as direct training by the tower property, a lower loss
by the law of total variance), decoder fine-tuning with the encoder frozen, and random
patches."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _fastjit import jit
from flax import nnx
from jax.tree_util import Partial

import dpm
import nets
from dpm.data import random_patches
from dpm.losses import (
    area_downsample,
    bicubic_upsample,
    check_scale,
    decoder_finetune_loss,
    degrade,
    denoising_loss,
    hinge_gan_terms,
    scale_distillation_loss,
)
from dpm.training import init_train_state, jit_train_step, make_optimizer, make_train_step

FAST = jit.keywords["compiler_options"]
F32_EPS = float(np.finfo(np.float32).eps)


def _grid(n):
    return np.meshgrid(np.arange(n), np.arange(n), indexing="ij")


# ---------------------------------------------------------------------------------------------
# The degradation
# ---------------------------------------------------------------------------------------------


def test_area_downsample_is_the_block_mean_and_composes_exactly():
    x = jax.random.normal(jax.random.key(0), (3, 32, 32, 2))
    x4 = area_downsample(x, 4)
    chex.assert_shape(x4, (3, 8, 8, 2))
    # the block mean, written out in float64
    xn = np.asarray(x, np.float64)
    ref = np.zeros((3, 8, 8, 2))
    for i in range(8):
        for j in range(8):
            ref[:, i, j] = xn[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4].mean(axis=(1, 2))
    np.testing.assert_allclose(x4, ref, atol=4 * F32_EPS)
    # the deterministic chain x -> x2 -> x4 -> x8
    x2 = area_downsample(x, 2)
    chex.assert_trees_all_close(area_downsample(x2, 2), x4, atol=4 * F32_EPS, rtol=0)
    chex.assert_trees_all_close(area_downsample(x4, 2), area_downsample(x, 8),
                                atol=4 * F32_EPS, rtol=0)
    np.testing.assert_array_equal(area_downsample(x, 1), x)
    np.testing.assert_array_equal(degrade(x, 1), x)


@pytest.mark.parametrize("scale", [2, 4])
def test_degrade_reproduces_linear_ramps_in_the_interior(scale):
    # The block mean of a linear function is its value at the block centre, and Keys' cubic
    # (a = -0.5) reproduces linear functions wherever its 4 taps lie inside the image (beyond
    # 1.5 s - 0.5 pixels from the border): degrade is exactly the identity there.
    r, c = _grid(32)
    ramp = jnp.asarray((0.03 * r - 0.02 * c + 0.1)[None, :, :, None], jnp.float32)
    out = degrade(ramp, scale)
    chex.assert_shape(out, ramp.shape)
    m = 2 * scale
    np.testing.assert_allclose(out[:, m:-m, m:-m], ramp[:, m:-m, m:-m], atol=4 * F32_EPS)
    # a constant survives everywhere, borders included
    const = jnp.full((1, 32, 32, 1), -0.3, jnp.float32)
    np.testing.assert_allclose(degrade(const, scale), const, atol=4 * F32_EPS)


def test_degrade_keeps_a_band_limited_image_and_removes_a_checkerboard():
    r, c = _grid(32)
    u, v = 2 * np.pi * (r + 0.5) / 32, 2 * np.pi * (c + 0.5) / 32
    # one cycle per image side: far below the Nyquist frequency of the x4 grid (4 cycles)
    smooth = 0.5 * np.cos(u) + 0.3 * np.sin(v + 0.4) + 0.2 * np.cos(u + v)
    checker = (-1.0) ** (r + c)
    x = jnp.asarray(np.stack([smooth, checker])[..., None], jnp.float32)
    for scale, tol in ((2, 0.01), (4, 0.04)):
        err = np.abs(np.asarray(degrade(x, scale) - x))[:, 8:-8, 8:-8]  # interior
        assert err[0].max() < tol, (scale, err[0].max())
        # the checkerboard averages to 0 over every block: nothing of it is left
        np.testing.assert_allclose(degrade(x, scale)[1], 0.0, atol=4 * F32_EPS)
        assert err[1].min() > 1 - 1e-6


@pytest.mark.parametrize("scale", [3, 0, -2, True, 2.0, "2"])
def test_bad_scales_are_refused(scale):
    x = jnp.zeros((1, 8, 8, 1))
    for fn in (check_scale, lambda s: area_downsample(x, s), lambda s: bicubic_upsample(x, s),
               lambda s: degrade(x, s)):
        with pytest.raises(ValueError, match="scale must be a power of two"):
            fn(scale)


def test_scales_that_do_not_divide_and_non_images_are_refused():
    with pytest.raises(ValueError, match="scale=8 must divide the image size 12"):
        check_scale(8, size=12)
    with pytest.raises(ValueError, match=r"scale=8 must divide the image size \(12, 16\)"):
        area_downsample(jnp.zeros((1, 12, 16, 1)), 8)
    with pytest.raises(ValueError, match=r"scale=4 must divide the image size \(8, 6\)"):
        degrade(jnp.zeros((1, 8, 6, 1)), 4)
    for bad in (jnp.zeros((8, 8, 1)), jnp.zeros((1, 1, 8, 8, 1))):
        with pytest.raises(ValueError, match=r"x must be \(B, H, W, C\) images"):
            area_downsample(bad, 2)
        with pytest.raises(ValueError, match=r"x must be \(B, H, W, C\) images"):
            bicubic_upsample(bad, 2)
    assert check_scale(4, size=12) == 4


# ---------------------------------------------------------------------------------------------
# Scale distillation on a linear-Gaussian toy with closed-form Bayes-optimal denoisers
# ---------------------------------------------------------------------------------------------
# x ~ N(0, S) on (4, 4, 1) images, lr2 = A2 x (2 x 2 block means), lr4 = A4 x (the mean). At a
# fixed t, y = [z_t; lr] = H x + n with H = [alpha I; A], Cov n = diag(sigma^2 I, 0), and
# E[x | y] = K y, K = S H^T (H S H^T + Cov n)^{-1}, Cov(x | y) = S - K H S.

SIDE, D = 4, 16


def _block_mean_matrix(n, s):
    """The ``(n/s)^2 x n^2`` matrix of the s x s block means of a row-major n x n image (built
    by hand, independently of area_downsample)."""
    m = n // s
    A = np.zeros((m * m, n * n))
    for r in range(n):
        for c in range(n):
            A[(r // s) * m + c // s, r * n + c] = 1.0 / s**2
    return A


def _prior_covariance():
    r, c = _grid(SIDE)
    p = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.float64)
    d2 = np.sum((p[:, None] - p[None]) ** 2, axis=-1)
    return np.exp(-d2 / (2 * 1.5**2)) + 0.05 * np.eye(D)


def _posterior(S, A, alpha, sigma):
    """``(K, Cov(x | z_t, A x), Cov y)`` by Gaussian conditioning."""
    m = A.shape[0]
    H = np.vstack([alpha * np.eye(D), A])
    R = np.zeros((D + m, D + m))
    R[:D, :D] = sigma**2 * np.eye(D)
    Cy = H @ S @ H.T + R
    K = np.linalg.solve(Cy, H @ S).T  # S H^T Cy^{-1}
    return K, S - K @ H @ S, Cy


def _linear(W, z, t, cond):
    """``W [z; lr]``: a linear x0-model of the flat noisy image and the flat condition."""
    n = z.shape[0]
    u = jnp.concatenate([z.reshape(n, -1), cond["image"].reshape(n, -1)], axis=1)
    return (u @ W.T).reshape(z.shape)


def _linear_denoiser(W, prediction="x0", schedule=None):
    return dpm.Denoiser(Partial(_linear, W), schedule or dpm.CosineLogSNR(), prediction)


def _toy_data(key, n):
    L = np.linalg.cholesky(_prior_covariance())
    x = (jax.random.normal(key, (n, D), jnp.float64) @ jnp.asarray(L).T).reshape(
        n, SIDE, SIDE, 1)
    return x, area_downsample(x, 2), area_downsample(x, 4)


def _newton_minimiser(f, w0):
    """The minimiser of a quadratic ``f``: one Newton step from ``w0`` with the exact Hessian,
    built from Hessian-vector products over a basis (what ``jax.hessian`` computes; mapped in
    chunks so that B x 272 x 16 tangents are never held at once)."""
    g = jax.grad(f)(w0).ravel()
    hvp = lambda v: jax.jvp(jax.grad(f), (w0,), (v.reshape(w0.shape),))[1].ravel()
    H = jax.lax.map(hvp, jnp.eye(w0.size, dtype=w0.dtype), batch_size=17)
    return w0 - jnp.linalg.solve(H, g).reshape(w0.shape)


@jax.jit
def _toy_fit(batch, t, K2, K4, key):
    sampler = lambda k, n: jnp.full((n,), t)
    direct = denoising_loss(_linear_denoiser, weighting="x0", time_sampler=sampler)
    distilled = scale_distillation_loss(_linear_denoiser, weighting="x0", time_sampler=sampler)
    f_direct = lambda W: jnp.mean(direct(W, {"x": batch["x"], "cond": batch["cond"]}, key))
    f_distilled = lambda W: jnp.mean(distilled(W, batch, key, K2))
    W0 = jnp.zeros((D, D + 1), K2.dtype)
    return {"W_direct": _newton_minimiser(f_direct, W0),
            "W_distilled": _newton_minimiser(f_distilled, W0),
            "L_direct": f_direct(K4), "L_distilled": f_distilled(K4)}


def test_distilled_and_direct_training_share_the_bayes_minimiser(x64):
    B = 20_000
    S, sched = _prior_covariance(), dpm.CosineLogSNR()
    A2, A4 = _block_mean_matrix(SIDE, 2), _block_mean_matrix(SIDE, 4)
    x, lr2, lr4 = _toy_data(jax.random.key(0), B)
    # the toy's linear maps are the library's area downsampling
    np.testing.assert_allclose(lr2.reshape(B, 4), x.reshape(B, D) @ A2.T, atol=1e-12)
    np.testing.assert_allclose(lr4.reshape(B, 1), x.reshape(B, D) @ A4.T, atol=1e-12)
    batch = {"x": x, "cond": {"image": lr4}, "teacher_cond": {"image": lr2}}

    def closed_form(t):
        a, s = float(sched.alpha(t)), float(sched.sigma(t))
        K2, Sigma2, _ = _posterior(S, A2, a, s)
        K4, Sigma4, Cu4 = _posterior(S, A4, a, s)
        return K2, Sigma2, K4, Sigma4, Cu4

    K4_at = {t: closed_form(t)[2] for t in (0.3, 0.7)}
    for t, t_other in ((0.3, 0.7), (0.7, 0.3)):
        K2, Sigma2, K4, Sigma4, Cu4 = closed_form(t)
        fit = _toy_fit(batch, jnp.float64(t), jnp.asarray(K2), jnp.asarray(K4),
                       jax.random.key(1))
        # The OLS minimiser's error is E^T U (U^T U)^{-1} with residuals E independent of the
        # regressors U = [z_t; lr4] (jointly Gaussian, uncorrelated): entry (j, k) has standard
        # error sqrt(Var(residual_j) (Cov u)^{-1}_kk / B). The residual is x - K4 u (variance
        # Sigma4) for direct training and K2 u2 - K4 u (variance Sigma4 - Sigma2) for
        # distillation. Max |z| over the 272 entries < 5: P(fail) ~ 272 * 6e-7.
        inv_cu = np.diag(np.linalg.inv(Cu4))
        for W, res_var in ((fit["W_direct"], np.diag(Sigma4)),
                           (fit["W_distilled"], np.diag(Sigma4 - Sigma2))):
            se = np.sqrt(np.outer(res_var, inv_cu) / B)
            assert np.max(np.abs(np.asarray(W) - K4) / se) < 5.0
            # ... a tolerance tight enough to tell K4 at t from K4 at the other time
            assert np.max(np.abs(K4_at[t_other] - K4) / se) > 50.0
        # mean losses at K4: tr Cov(x | z_t, lr4) / 16 and (tr Sigma4 - tr Sigma2) / 16 (law of
        # total variance); a residual r ~ N(0, C) has Var |r|^2 = 2 tr C^2
        for L, C in ((fit["L_direct"], Sigma4), (fit["L_distilled"], Sigma4 - Sigma2)):
            se = np.sqrt(2 * np.trace(C @ C) / B) / D
            assert abs(float(L) - np.trace(C) / D) < 5 * se
        # the distilled target has lower variance, by tr Sigma2 / 16 (many standard errors)
        assert np.trace(Sigma2) / D > 20 * np.sqrt(2 * np.trace(Sigma4 @ Sigma4) / B) / D
        assert float(fit["L_distilled"]) < float(fit["L_direct"])


def test_no_gradient_reaches_the_teacher(x64):
    x, lr2, lr4 = _toy_data(jax.random.key(2), 64)
    batch = {"x": x, "cond": {"image": lr4}, "teacher_cond": {"image": lr2}}
    k1, k2 = jax.random.split(jax.random.key(3))
    W = jax.random.normal(k1, (D, D + 1), jnp.float64) / 4
    K = jax.random.normal(k2, (D, D + 4), jnp.float64) / 4
    loss = scale_distillation_loss(_linear_denoiser)
    mean = lambda W, K: jnp.mean(loss(W, batch, jax.random.key(4), K))
    g_student, g_teacher = jit(jax.grad(mean, argnums=(0, 1)))(W, K)
    assert np.all(np.asarray(g_teacher) == 0.0)
    assert np.max(np.abs(g_student)) > 1e-3
    assert abs(float(jit(mean)(W, K) - jit(mean)(W, 0.5 * K))) > 1e-3  # it depends on K


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_output_space_error_is_rescaled_exactly_to_the_x0_error(x64, prediction):
    sched = dpm.CosineLogSNR()
    B = 16
    t = jnp.linspace(0.05, 0.95, B)  # both sides of SNR = 1 (t = 0.5)
    sampler = lambda key, n: t
    x, lr2, lr4 = _toy_data(jax.random.key(5), B)
    batch = {"x": x, "cond": {"image": lr4}, "teacher_cond": {"image": lr2}}
    k1, k2 = jax.random.split(jax.random.key(6))
    W = jax.random.normal(k1, (D, D + 1), jnp.float64) / 4
    K = jax.random.normal(k2, (D, D + 4), jnp.float64) / 4

    def x0_by_hand(W, z, t, cond):
        # the x0 the student's raw output means: z = a x0 + s eps, v = a eps - s x0
        out = _linear(W, z, t, cond)
        a, s = sched.alpha(t)[:, None, None, None], sched.sigma(t)[:, None, None, None]
        if prediction == "v":
            return (a * z - s * out) / (a**2 + s**2)
        return (z - s * out) / a

    teacher = lambda K: _linear_denoiser(K)
    in_head = scale_distillation_loss(lambda W: _linear_denoiser(W, prediction),
                                      make_teacher=teacher, time_sampler=sampler,
                                      weighting="truncated_snr")
    on_x0 = scale_distillation_loss(lambda W: dpm.Denoiser(Partial(x0_by_hand, W), sched, "x0"),
                                    make_teacher=teacher, time_sampler=sampler, weighting="x0")
    snr = np.asarray(sched.alpha(t) ** 2 / sched.sigma(t) ** 2)
    key = jax.random.key(7)
    got, x0_err = jit(in_head)(W, batch, key, K), jit(on_x0)(W, batch, key, K)
    assert np.all(np.asarray(x0_err) > 1e-3)
    # (to float32 rounding: the losses cast the model output to float32)
    np.testing.assert_allclose(got, np.maximum(snr, 1.0) * x0_err, rtol=1e-6)


def test_scale_distillation_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="weighting must be one of .*got 'snr_plus'"):
        scale_distillation_loss(_linear_denoiser, weighting="snr_plus")
    with pytest.raises(ValueError, match="time_sampler must be one of .*got 'beta'"):
        scale_distillation_loss(_linear_denoiser, time_sampler="beta")
    x = jnp.zeros((2, SIDE, SIDE, 1))
    W, K = jnp.zeros((D, D + 1)), jnp.zeros((D, D + 4))
    cond, tcond = {"image": area_downsample(x, 4)}, {"image": area_downsample(x, 2)}
    loss = scale_distillation_loss(_linear_denoiser)
    with pytest.raises(ValueError, match=r"batch\['teacher_cond'\]"):
        loss(W, {"x": x, "cond": cond}, jax.random.key(0), K)
    with pytest.raises(ValueError, match=r"batch\['cond'\]"):
        loss(W, {"x": x, "teacher_cond": tcond}, jax.random.key(0), K)
    other = scale_distillation_loss(
        _linear_denoiser, make_teacher=lambda K: _linear_denoiser(K, schedule=dpm.CosineVP()))
    with pytest.raises(ValueError, match="share one schedule.*CosineVP and CosineLogSNR"):
        other(W, {"x": x, "cond": cond, "teacher_cond": tcond}, jax.random.key(0), K)


# ---------------------------------------------------------------------------------------------
# Decoder fine-tuning
# ---------------------------------------------------------------------------------------------


def test_decoder_finetuning_moves_the_decoder_only():
    cfg = nets.autoencoder_digits(2, base_channels=8, attn_in_middle=False)
    graphdef, params = nets.init_params(nets.AutoencoderKL, cfg, seed=0)
    dec, rest = nets.split_decoder(params)
    assert set(dec) == {"decoder", "post_quant_conv"} and set(rest) == {"encoder", "quant_conv"}
    assert len(jax.tree.leaves(dec)) + len(jax.tree.leaves(rest)) == len(
        jax.tree.leaves(params))
    original_dec, original_rest = jax.device_get(dec), jax.device_get(rest)  # the step donates

    x = jnp.tanh(jax.random.normal(jax.random.key(0), (4, 16, 16, 1)))
    encode = jit(lambda p, x: nnx.merge(graphdef, p).encode(x))
    decode = jit(lambda p, z: nnx.merge(graphdef, p).decode(z))
    mean, logvar = encode(params, x)
    mean, logvar, x_dec = map(np.asarray, (mean, logvar, decode(params, mean)))
    batch = {"z": jnp.asarray(mean), "x": x}

    loss = decoder_finetune_loss(nets.decode_with_frozen(graphdef), ssim_window=7)
    opt = make_optimizer(1e-3, total_steps=2)
    step = jit_train_step(make_train_step(loss, opt, ema_decay=0.0), compiler_options=FAST)
    state = init_train_state(dec, opt, jax.random.key(1))
    for _ in range(2):
        state, metrics = step(state, batch, rest)
    assert int(state.step) == 2 and int(metrics["skipped"]) == 0
    assert np.isfinite(float(metrics["loss"]))
    chex.assert_trees_all_equal(state.ema_params, state.params)  # ema_decay = 0

    trained = jax.device_get(state.params)
    moved = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(trained), jax.tree.leaves(original_dec), strict=True)]
    assert all(moved), f"{moved.count(False)} of {len(moved)} decoder leaves did not move"
    merged = nnx.State.merge(rest, state.params)
    _, rest_after = nets.split_decoder(merged)
    chex.assert_trees_all_equal(jax.device_get(rest_after), original_rest)
    # the pure-dict form splits the same way; anything else is refused by name
    dec_d, rest_d = nets.split_decoder(merged.to_pure_dict())
    assert set(dec_d) == set(nets.split_decoder(merged)[0]) and set(rest_d) == set(rest_after)
    with pytest.raises(TypeError, match="params must be the nnx.State"):
        nets.split_decoder([1, 2])
    chex.assert_trees_all_equal(jax.device_get(rest), original_rest)
    mean_after, logvar_after = encode(merged, x)
    np.testing.assert_array_equal(mean_after, mean)
    np.testing.assert_array_equal(logvar_after, logvar)
    assert not np.allclose(decode(merged, jnp.asarray(mean)), x_dec)


def test_decoder_finetune_loss_closed_form(x64):
    # x constant c per image and x_rec = x + d: L1 = |d|, and the Gaussian-window SSIM is its
    # luminance term, 1 - SSIM = d^2 / (c^2 + (c + d)^2 + C1), C1 = (0.01 * 2)^2
    shift = lambda p, z, frozen: z + p
    c = np.array([0.3, -0.5])
    x = jnp.asarray(np.broadcast_to(c[:, None, None, None], (2, 16, 16, 1)), jnp.float64)
    loss = decoder_finetune_loss(shift, l1_weight=0.5, ssim_weight=2.0, ssim_window=7)
    batch = {"z": x, "x": x}
    np.testing.assert_allclose(loss(0.0, batch, None, None), 0.0, atol=1e-12)
    d, C1 = 0.1, (0.01 * 2) ** 2
    want = 0.5 * d + 2.0 * d**2 / (c**2 + (c + d) ** 2 + C1)
    np.testing.assert_allclose(loss(d, batch, None, None), want, rtol=1e-9)
    # the loss is 0 at x_rec == x for any image
    xr = jnp.tanh(jax.random.normal(jax.random.key(0), (2, 16, 16, 1), jnp.float64))
    np.testing.assert_allclose(loss(0.0, {"z": xr, "x": xr}, None, None), 0.0, atol=1e-12)
    # with a discriminator: + disc_weight gen + disc (the hinge terms)
    disc = lambda p, img: p * img
    gan = decoder_finetune_loss(shift, l1_weight=0.5, ssim_weight=2.0, discriminator=disc,
                                disc_weight=0.1)
    p = 1.5
    gen = -p * (c + d)
    dis = 0.5 * (np.maximum(1 - p * c, 0) + np.maximum(1 + p * (c + d), 0))
    np.testing.assert_allclose(gan({"dec": d, "disc": p}, batch, None, None),
                               want + 0.1 * gen + dis, rtol=1e-9)


def test_hinge_gan_terms_route_gradients():
    disc = lambda p, img: p * img
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    fake = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
    p = 0.7
    gen, dis = hinge_gan_terms(disc, p, x, fake)
    mean = lambda a: a.reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(gen, -mean(p * fake), rtol=1e-6)
    np.testing.assert_allclose(
        dis, 0.5 * (mean(jax.nn.relu(1 - p * x)) + mean(jax.nn.relu(1 + p * fake))), rtol=1e-6)
    grad = lambda i: jit(jax.grad(lambda p, f: hinge_gan_terms(disc, p, x, f)[i].sum(), (0, 1)))
    g_gen, g_dis = grad(0)(p, fake), grad(1)(p, fake)
    assert float(g_gen[0]) == 0.0 and np.all(np.asarray(g_dis[1]) == 0.0)
    np.testing.assert_allclose(g_gen[1], -p / 16 * jnp.ones_like(fake), rtol=1e-6)
    assert abs(float(g_dis[0])) > 1e-3


@pytest.mark.parametrize("kwargs, match", [
    ({"l1_weight": -1.0}, "l1_weight must be a number >= 0; got -1.0"),
    ({"ssim_weight": True}, "ssim_weight must be a number >= 0; got True"),
    ({"disc_weight": "0.1"}, "disc_weight must be a number >= 0; got '0.1'"),
    ({"ssim_weight": float("nan")}, "ssim_weight must be a number >= 0; got nan"),
    ({"ssim_window": 8}, "ssim_window must be a positive odd int; got 8"),
    ({"ssim_window": 0}, "ssim_window must be a positive odd int; got 0"),
    ({"ssim_window": 7.0}, "ssim_window must be a positive odd int; got 7.0"),
])
def test_decoder_finetune_loss_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decoder_finetune_loss(lambda p, z, f: z, **kwargs)


def test_decoder_finetune_loss_rejects_mismatched_shapes_and_windows():
    x = jnp.zeros((2, 16, 16, 1))
    half = decoder_finetune_loss(lambda p, z, f: z[:, ::2, ::2])
    with pytest.raises(ValueError, match="decode returned shape"):
        half(None, {"z": x, "x": x}, None, None)
    wide = decoder_finetune_loss(lambda p, z, f: z, ssim_window=17)
    with pytest.raises(ValueError, match="ssim_window=17 exceeds"):
        wide(None, {"z": x, "x": x}, None, None)
    with pytest.raises(ValueError, match=r"missing \['z'\]"):
        half(None, {"x": x}, None, None)


# ---------------------------------------------------------------------------------------------
# Random patches
# ---------------------------------------------------------------------------------------------


def test_random_patches_come_from_the_given_images():
    a = np.full((10, 12, 1), 0.25, np.float32)
    b = np.full((8, 8, 1), 0.75, np.float32)
    p = random_patches([a, b], 5, 200, seed=0)
    chex.assert_shape(p, (200, 5, 5, 1))
    assert p.dtype == np.float32
    flat = p.reshape(200, -1)
    assert np.all(flat == flat[:, :1])  # every patch constant ...
    n_a = int(np.sum(flat[:, 0] == 0.25))
    assert n_a + int(np.sum(flat[:, 0] == 0.75)) == 200  # ... with one of the two values
    assert abs(n_a - 100) < 5 * np.sqrt(50)  # images picked uniformly: Binomial(200, 1/2)
    assert random_patches([a], 10, 3).shape == (3, 10, 10, 1)  # the patch may be the image
    assert random_patches([a, b], 5, 0).shape == (0, 5, 5, 1)


def test_random_patches_are_crops_at_uniform_positions():
    H, W, P = 7, 6, 4
    ramp = np.arange(H * W, dtype=np.float32).reshape(H, W)
    img = np.stack([ramp, -ramp], axis=-1)  # channels travel together
    p = random_patches([img], P, 600, seed=1)
    chex.assert_shape(p, (600, P, P, 2))
    positions = set()
    for patch in p:
        top, left = divmod(int(patch[0, 0, 0]), W)
        np.testing.assert_array_equal(patch, img[top:top + P, left:left + P])
        positions.add((top, left))
    # every one of the (H - P + 1) (W - P + 1) = 12 positions, the last row and column included
    assert positions == {(i, j) for i in range(H - P + 1) for j in range(W - P + 1)}
    np.testing.assert_array_equal(random_patches([img], P, 600, seed=1), p)
    assert not np.array_equal(random_patches([img], P, 600, seed=2), p)


def test_random_patches_reject_bad_input():
    a, b = np.zeros((10, 12, 1)), np.zeros((8, 8, 1))
    with pytest.raises(ValueError, match="patch_size=9 exceeds image '#1' of size"):
        random_patches([a, b], 9, 3)
    with pytest.raises(ValueError, match="patch_size=9 exceeds image 'small'"):
        random_patches([a, b], 9, 3, names=["big", "small"])
    with pytest.raises(ValueError, match="one channel count"):
        random_patches([a, np.zeros((8, 8, 3))], 4, 3)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        random_patches([np.zeros((8, 8))], 4, 3)
    with pytest.raises(ValueError, match="non-empty"):
        random_patches([], 4, 3)
    with pytest.raises(ValueError, match="patch_size must be an int >= 1, got 0"):
        random_patches([a], 0, 3)
    with pytest.raises(ValueError, match="patch_size must be an int >= 1, got True"):
        random_patches([a], True, 3)
    with pytest.raises(ValueError, match="num_patches must be an int >= 0, got -1"):
        random_patches([a], 4, -1)
    with pytest.raises(ValueError, match=r"\(H, W, C\)"):
        random_patches([np.float32(1.0)], 4, 3)  # a 0-d "image"
    with pytest.raises(ValueError, match="1 names for 2 images"):
        random_patches([a, b], 4, 3, names=["only"])
