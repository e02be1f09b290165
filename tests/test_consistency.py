"""Latent consistency distillation (LCD), the multistep LCM sampler and the RG-LCD losses,
against closed forms: the boundary coefficients, the guided DDIM step on a class-conditional
Gaussian mixture, LCMScheduler's published timesteps, the re-noising variance, and an LCD run
of a small MLP student with the exact teacher."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dpm
import nets
from dpm.losses import (
    boundary_coefficients,
    consistency_function,
    guidance_embedding,
    guided_ddim_step,
    lcd_loss,
    lcd_terms,
    pairwise_preference_loss,
    rg_lcd_loss,
    rg_lcd_lrm_loss,
    skipping_timesteps,
    weighted_rewards,
)
from dpm.metrics import mmd_rbf
from dpm.schedules import make_betas
from dpm.training import init_train_state, jit_train_step, make_mesh, make_train_step
from solvers import ddim, dpm_solver_pp, lcm, lcm_grid, lcm_timesteps
from solvers.grids import uniform_time

SD = dpm.DiscreteVP.from_name("scaled_linear", 1000)
ABAR = np.cumprod(1.0 - make_betas("scaled_linear", 1000))  # independent of DiscreteVP


def _const_denoiser(value=0.0, prediction="x0"):
    return dpm.Denoiser(lambda x, t, c: jnp.full_like(x, value), SD, prediction)


# ----------------------------------------------------------------------------------------------
# The consistency function and its grid
# ----------------------------------------------------------------------------------------------


def test_boundary_coefficients_at_known_timesteps():
    c_skip, c_out = boundary_coefficients(jnp.array([0, 1, 19, 999]))
    tau = 10.0 * np.array([0, 1, 19, 999])
    np.testing.assert_allclose(c_skip, 0.25 / (tau**2 + 0.25), rtol=1e-6)
    np.testing.assert_allclose(c_out, tau / np.sqrt(tau**2 + 0.25), rtol=1e-6)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0
    np.testing.assert_allclose([c_skip[1], c_out[1]], [0.0024937656, 0.9987523], rtol=1e-6)


def test_consistency_function_is_identity_at_timestep_zero():
    z = jax.random.normal(jax.random.key(0), (4, 3))
    den = _const_denoiser(5.0)
    np.testing.assert_array_equal(consistency_function(den, z, jnp.zeros(4, jnp.int32)), z)
    # away from 0 it is almost the network's x0: c_skip(19) = 1.7e-6
    f = consistency_function(den, z, jnp.full(4, 19))
    c_skip, c_out = boundary_coefficients(19)
    np.testing.assert_allclose(f, c_skip * z + c_out * 5.0, rtol=1e-6)
    # without the boundary parameterization: x0_hat itself
    np.testing.assert_allclose(consistency_function(den, z, 0, boundary=False), 5.0)


def test_skipping_grid_and_its_errors():
    np.testing.assert_array_equal(skipping_timesteps(1000, 20), np.arange(19, 1000, 20))
    np.testing.assert_array_equal(skipping_timesteps(1000, 1), np.arange(1000))
    assert len(skipping_timesteps(1000, 50)) == 20
    with pytest.raises(ValueError, match="skip .* must divide"):
        skipping_timesteps(1000, 30)
    with pytest.raises(ValueError, match="skip must be an int >= 1"):
        skipping_timesteps(1000, 0)


def test_guidance_embedding_is_lcms_sinusoid():
    w = jnp.array([0.0, 2.5])
    e = guidance_embedding(w, 8)
    freqs = np.exp(-np.log(10_000.0) * np.arange(4) / 3)
    want = np.concatenate([np.sin(1000 * np.asarray(w)[:, None] * freqs),
                           np.cos(1000 * np.asarray(w)[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(e, want, atol=5e-4)  # float32 arguments up to 2,500
    with pytest.raises(ValueError, match="dim must be an even int"):
        guidance_embedding(w, 7)


# ----------------------------------------------------------------------------------------------
# The guided teacher step, on a class-conditional mixture with exact denoisers
# ----------------------------------------------------------------------------------------------

MEANS = np.array([[-1.0, 0.5], [1.0, -0.5]])
STD = 0.3


def _class_oracle():
    """Exact eps of each class (a Gaussian) and of the mixture (label 2 = null)."""
    per_class = [dpm.GaussianMixture.gaussian(m, STD) for m in MEANS]
    mixture = dpm.GaussianMixture.create(MEANS, [STD, STD])

    def fn(x, t, cond):
        outs = [gm.posterior_mean(SD, x, t)[1] for gm in (*per_class, mixture)]
        return jnp.stack(outs)[cond["label"], jnp.arange(x.shape[0])]

    return dpm.Denoiser(fn, SD, "eps"), per_class, mixture


def test_guided_step_is_ddim_on_the_cfg_combination(x64):
    teacher, per_class, mixture = _class_oracle()
    B = 6
    z = jax.random.normal(jax.random.key(1), (B, 2), jnp.float64)
    label = jnp.array([0, 1, 0, 1, 0, 1])
    start = jnp.array([999, 519, 39, 19, 259, 759])
    end = jnp.maximum(start - 20, 0)
    w = jnp.array([0.0, 1.0, 3.0, 7.5, 14.0, 5.0])
    got = guided_ddim_step(teacher.with_cond({"label": label}), {"label": jnp.full(B, 2)},
                           z, start, end, w)
    # by hand: LCM's x0_w = x0_c + w (x0_c - x0_u), eps_w alike, on the numpy alpha_bar table
    want = []
    for i in range(B):
        t = (int(start[i]) + 1) / 1000
        x0_c, eps_c = per_class[int(label[i])].posterior_mean(SD, z[i:i + 1], t)
        x0_u, eps_u = mixture.posterior_mean(SD, z[i:i + 1], t)
        x0_w = x0_c + w[i] * (x0_c - x0_u)
        eps_w = eps_c + w[i] * (eps_c - eps_u)
        ab = ABAR[int(end[i])]
        want.append(np.sqrt(ab) * x0_w + np.sqrt(1 - ab) * eps_w)
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# The LCM sampler
# ----------------------------------------------------------------------------------------------


def test_lcm_timesteps_match_the_fixed_lcmscheduler():
    # the published selections of diffusers' LCMScheduler (after PR #5836), N = 1000, 50 steps
    published = {1: [999], 2: [999, 499], 3: [999, 679, 339], 4: [999, 759, 499, 259],
                 8: [999, 879, 759, 639, 499, 379, 259, 139]}
    for s, want in published.items():
        np.testing.assert_array_equal(lcm_timesteps(s), want)
    for s in range(1, 9):
        ts = lcm_timesteps(s)
        assert len(ts) == s and ts[0] == 999 and np.all(np.diff(ts) < 0)
        assert set(ts) <= set(skipping_timesteps(1000, 20))
    grid = lcm_grid(4, SD)
    np.testing.assert_allclose(grid, [1.0, 0.76, 0.5, 0.26, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="num_inference_steps"):
        lcm_timesteps(51)


def test_one_lcm_step_is_the_consistency_function():
    den = dpm.Denoiser(lambda x, t, c: 0.3 * x + jnp.sin(x), SD, "eps")
    z = jax.random.normal(jax.random.key(2), (5, 3))
    np.testing.assert_allclose(lcm(den, z, lcm_grid(1, SD)),
                               consistency_function(den, z, jnp.full(5, 999)), rtol=1e-5)


def test_lcm_renoising_has_the_exact_variance():
    den = _const_denoiser(0.7)  # x0_hat = 0.7 everywhere
    n = 20_000
    z = jnp.zeros((n, 1))
    ts = lcm_grid(2, SD)
    out, traj = lcm(den, z, ts, key=jax.random.key(3), return_trajectory=True)
    # step 0: d = c_skip z + c_out 0.7 (z = 0); re-noised to t_1 = 500 / 1000
    c_skip, c_out = boundary_coefficients(999)
    d0 = c_out * 0.7
    a1, s1 = np.sqrt(ABAR[499]), np.sqrt(1 - ABAR[499])
    z1 = np.asarray(traj["x"][1])
    np.testing.assert_allclose(z1.mean(), a1 * d0, atol=4 * s1 / np.sqrt(n))
    np.testing.assert_allclose(z1.var(), s1**2, rtol=0.04)
    # the last step adds no noise: the output is the consistency function at 499
    f1 = consistency_function(den, traj["x"][1], jnp.full(n, 499))
    np.testing.assert_allclose(out, f1, rtol=1e-6)
    with pytest.raises(ValueError, match="key"):
        lcm(den, z[:2], ts)
    with pytest.raises(ValueError, match="must end at t = 0"):
        lcm(den, z[:2], ts[:-1], key=jax.random.key(0))


# ----------------------------------------------------------------------------------------------
# LCD of an MLP student with the exact teacher
# ----------------------------------------------------------------------------------------------


def _mlp_student(graphdef):
    def make(params, cond, w):
        del cond, w
        return dpm.network_denoiser(jax.tree_util.Partial(_apply, graphdef, params), SD, "x0")

    return make


def _apply(graphdef, params, x, noise_level, cond):
    return nnx.merge(graphdef, params)(x, noise_level, cond)


def test_lcd_student_beats_the_teachers_two_step_ddim():
    """Unconditional 2-D mixture, exact eps teacher; after LCD the student's one step lands
    nearer the exact flow endpoint than two teacher DDIM steps, and its 2-step LCM samples are
    nearer the data than the teacher's 2-step DDIM samples."""
    gm = dpm.GaussianMixture.create(MEANS, [STD, STD])
    teacher_den = gm.denoiser(SD, "eps")
    graphdef, params = nets.init_params(nets.MLP, 2, 64, 2, seed=0)
    make_student = _mlp_student(graphdef)
    loss = lcd_loss(make_student, lambda p, c: teacher_den, skip=50, w_min=0.0, w_max=0.0,
                    distance="l2")
    opt = optax.adam(3e-3)
    train_step = make_train_step(loss, opt, ema_decay=0.95, target_from_ema=True)
    state = init_train_state(params, opt, jax.random.key(0))

    @jax.jit
    def run(state, keys):
        def body(s, k):
            s, m = train_step(s, {"x": gm.sample(k, 128)}, None)
            return s, m["loss"]

        return jax.lax.scan(body, state, keys)

    state, losses = run(state, jax.random.split(jax.random.key(1), 1000))
    assert np.all(np.isfinite(losses))
    student = make_student(state.ema_params, None, None)

    x_T = jax.random.normal(jax.random.key(5), (2000, 2))
    exact = dpm_solver_pp(teacher_den, x_T, uniform_time(200, t_end=0.0), order=2)
    one_step = lcm(student, x_T, lcm_grid(1, SD, skip=50))
    teacher_2 = ddim(teacher_den, x_T, uniform_time(2, t_end=0.0))
    err_student = float(jnp.mean(jnp.linalg.norm(one_step - exact, axis=1)))
    err_teacher = float(jnp.mean(jnp.linalg.norm(teacher_2 - exact, axis=1)))
    # measured: 0.068 against 0.63
    assert err_student < 0.25 * err_teacher, (err_student, err_teacher)

    data = gm.sample(jax.random.key(6), 2000)
    two_step = lcm(student, x_T, lcm_grid(2, SD, skip=50), key=jax.random.key(7))
    mmd_student = float(mmd_rbf(two_step, data, 0.5))
    mmd_teacher = float(mmd_rbf(teacher_2, data, 0.5))
    # measured: 0.0027 against 0.29
    assert mmd_student < 0.1 * mmd_teacher, (mmd_student, mmd_teacher)


# ----------------------------------------------------------------------------------------------
# The train step's target network, and the RG-LCD losses
# ----------------------------------------------------------------------------------------------


def test_target_from_ema_passes_the_pre_update_ema():
    seen = {}

    def loss(params, batch, key, *, target_params):
        seen["target"] = target_params
        return jnp.sum(jnp.square(params["w"] - target_params["w"])) + 0.0 * batch["x"]

    opt = optax.sgd(0.1)
    state = init_train_state({"w": jnp.ones(3)}, opt, jax.random.key(0))
    state = state.replace(ema_params={"w": jnp.zeros(3)})
    new, _ = make_train_step(loss, opt, ema_decay=0.5, target_from_ema=True)(
        state, {"x": jnp.zeros(2)})
    np.testing.assert_allclose(seen["target"]["w"], 0.0)  # the EMA before the step
    # gradient 2 (w - target) = 2: w <- 1 - 0.1 * 2; no gradient reached the target
    np.testing.assert_allclose(new.params["w"], 0.8)
    np.testing.assert_allclose(new.ema_params["w"], 0.5 * 0.0 + 0.5 * 0.8)


def test_preference_loss_is_zero_iff_lrm_agrees_with_the_expert():
    expert = jax.random.normal(jax.random.key(0), (5, 3))
    shifted = expert + jnp.arange(5.0)[:, None]  # same pairwise differences
    np.testing.assert_allclose(pairwise_preference_loss(shifted, expert), 0.0, atol=1e-6)
    other = expert.at[:, 2].add(1.0)
    assert np.all(np.asarray(pairwise_preference_loss(other, expert)) > 1e-3)
    # closed form of one pair: KL of two Bernoullis
    e = jnp.array([[0.0, 1.0, 0.0]])
    q = jnp.array([[0.0, 0.0, 0.0]])
    p1 = 1 / (1 + np.exp(-1.0))
    kl01 = (1 - p1) * np.log((1 - p1) / 0.5) + p1 * np.log(p1 / 0.5)
    np.testing.assert_allclose(pairwise_preference_loss(q, e), 2 * kl01, rtol=1e-5)
    # cross-entropy mode: -log q(winner)
    np.testing.assert_allclose(pairwise_preference_loss(q, e, mode="ce"), 3 * np.log(2),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="mode must be one of"):
        pairwise_preference_loss(q, e, mode="hinge")
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        pairwise_preference_loss(q[:, :2], e[:, :2])


def _toy_lcd(key=0):
    gm = dpm.GaussianMixture.create(MEANS, [STD, STD])
    graphdef, params = nets.init_params(nets.MLP, 2, 32, 1, seed=key)
    return gm, graphdef, params, _mlp_student(graphdef), (lambda p, c: gm.denoiser(SD, "eps"))


def _linear_reward(params, x, cond):
    return x @ params["v"] + cond


def test_weighted_rewards_and_rg_lcd_gradients():
    gm, _, params, make_student, make_teacher = _toy_lcd()
    mix = weighted_rewards([(1.0, _linear_reward), (0.1, _linear_reward)])
    rp = ({"v": jnp.array([1.0, 0.0])}, {"v": jnp.array([0.0, 2.0])})
    x = jnp.array([[1.0, 1.0]])
    np.testing.assert_allclose(mix(rp, x, 0.0), 1.0 + 0.2)

    batch = {"x": gm.sample(jax.random.key(1), 8), "reward_cond": jnp.zeros(8)}
    opts = dict(skip=50, w_min=0.0, w_max=0.0)
    rg = rg_lcd_loss(make_student, make_teacher, _linear_reward, beta=2.0, **opts)
    terms = lcd_terms(make_student, make_teacher, **opts)
    key = jax.random.key(2)
    rv = {"v": jnp.array([0.5, -1.0])}
    got = rg(params, batch, key, None, rv, target_params=params)
    t = terms(params, batch, key, None, params)
    np.testing.assert_allclose(got, t.distance - 2.0 * (t.prediction @ rv["v"]), rtol=1e-5)
    # the reward model is not trained; a per-example beta overrides the default
    g = jax.grad(lambda r: rg(params, batch, key, None, r, target_params=params).sum())(rv)
    np.testing.assert_allclose(g["v"], 0.0)
    got_b = rg(params, {**batch, "beta": jnp.zeros(8)}, key, None, rv, target_params=params)
    np.testing.assert_allclose(got_b, t.distance, rtol=1e-6)


def test_rg_lcd_lrm_splits_its_gradient():
    gm, _, sparams, make_student, make_teacher = _toy_lcd()
    opts = dict(skip=50, w_min=0.0, w_max=0.0)
    expert_params = {"v": jnp.array([1.0, -2.0])}
    loss = rg_lcd_lrm_loss(make_student, make_teacher, _linear_reward, _linear_reward,
                           beta=0.5, rm_batch_size=4, **opts)
    params = {"student": sparams, "lrm": {"v": jnp.array([0.3, 0.1])}}
    batch = {"x": gm.sample(jax.random.key(1), 8), "reward_cond": jnp.zeros(8)}
    key = jax.random.key(3)
    grads = jax.grad(lambda p: loss(p, batch, key, None, expert_params,
                                    target_params=params).mean())(params)
    t = lcd_terms(make_student, make_teacher, **opts)(sparams, batch, key, None, sparams)

    def lrm_only(v):  # the sub-batch's mean preference loss, by hand
        c = jnp.stack([t.prediction[:4], t.target[:4], batch["x"][:4]], axis=1)  # (4, 3, 2)
        return pairwise_preference_loss(c @ v, c @ expert_params["v"]).mean()

    np.testing.assert_allclose(grads["lrm"]["v"], jax.grad(lrm_only)(params["lrm"]["v"]),
                               rtol=1e-4, atol=1e-6)

    def student_only(p):
        tt = lcd_terms(make_student, make_teacher, **opts)(p, batch, key, None, sparams)
        return (tt.distance - 0.5 * tt.prediction @ params["lrm"]["v"]).mean()

    chex.assert_trees_all_close(grads["student"], jax.grad(student_only)(sparams), rtol=1e-4,
                                atol=1e-6)
    with pytest.raises(ValueError, match="params must be"):
        loss(sparams, batch, key, None, expert_params, target_params=sparams)


def test_lcd_step_on_8_devices_equals_one_device():
    gm, graphdef, params, make_student, make_teacher = _toy_lcd()
    del graphdef
    loss = lcd_loss(make_student, make_teacher, skip=20, w_min=0.0, w_max=0.0)
    opt = optax.adam(1e-3)
    train_step = make_train_step(loss, opt, ema_decay=0.95, target_from_ema=True)
    batch = {"x": gm.sample(jax.random.key(1), 16)}
    out = {}
    for name, mesh in (("one", None), ("eight", make_mesh())):
        state = init_train_state(params, opt, jax.random.key(0))
        step = jit_train_step(train_step, mesh, donate=False)
        for _ in range(2):
            state, _ = step(state, batch, None)
        out[name] = state
    assert len(jax.devices()) == 8
    chex.assert_trees_all_close(out["one"].params, out["eight"].params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(out["one"].ema_params, out["eight"].ema_params, rtol=1e-5,
                                atol=1e-6)


def test_lcd_bad_options_are_clear_errors():
    _, _, _, ms, mt = _toy_lcd()
    with pytest.raises(ValueError, match="distance must be one of"):
        lcd_terms(ms, mt, distance="l1")
    with pytest.raises(ValueError, match="w_min"):
        lcd_terms(ms, mt, w_min=3.0, w_max=1.0)
    cos = dpm.CosineLogSNR()

    def bad_student(p, c, w):
        return dpm.Denoiser(lambda x, t, cc: x, cos, "eps")

    loss = lcd_loss(bad_student, mt)
    with pytest.raises(TypeError, match="DiscreteVP"):
        loss(None, {"x": jnp.zeros((2, 2))}, jax.random.key(0), None, target_params=None)
