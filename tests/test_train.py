"""Train state, optimizer, EMA and train step against closed forms on a tiny linear model."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _fastjit import jit

from dpm.training import (
    TrainState,
    edm_ema_decay,
    ema_update,
    init_train_state,
    jit_train_step,
    make_lr_schedule,
    make_optimizer,
    make_train_step,
)

FAST = jit.keywords["compiler_options"]  # the tests' fast-compile XLA options

D_IN, D_OUT, B = 3, 2, 8


def init_params(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(D_IN, D_OUT)), dtype),
        "b": jnp.asarray(0.1 * rng.normal(size=(D_OUT,)), dtype),
    }


def regression_loss(params, batch, key):
    del key
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.sum((pred - batch["y"]) ** 2, axis=-1)


def make_batch(seed, n=B, dtype=np.float32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D_IN)).astype(dtype)
    w_true = np.array([[1.0, -2.0], [0.5, 0.0], [-1.0, 3.0]], dtype)
    return {"x": x, "y": x @ w_true + dtype(0.5)}


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_train_state_is_a_pytree_of_arrays():
    opt = make_optimizer(1e-2, total_steps=10)
    state = init_train_state(init_params(0), opt, jax.random.key(1))
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert state.skipped.dtype == jnp.int32 and int(state.skipped) == 0
    # EMA starts equal to the parameters, in buffers of its own
    assert_trees_equal(state.ema_params, state.params)
    assert state.ema_params["w"] is not state.params["w"]
    # round trip through flatten/unflatten (what jit does)
    leaves, treedef = jax.tree.flatten(state)
    again = jax.tree.unflatten(treedef, leaves)
    assert isinstance(again, TrainState)
    assert_trees_equal(again, state)


def test_train_step_reduces_loss():
    lr = make_lr_schedule(0.05, total_steps=150, warmup_steps=10)
    opt = make_optimizer(0.05, total_steps=150, warmup_steps=10)
    state = init_train_state(init_params(0), opt, jax.random.key(1))
    step = jit_train_step(make_train_step(regression_loss, opt, learning_rate=lr),
                          compiler_options=FAST)
    losses = []
    for i in range(150):
        state, metrics = step(state, make_batch(i))
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 150 and int(state.skipped) == 0
    assert losses[-1] < 1e-3 * losses[0]
    assert float(metrics["learning_rate"]) == pytest.approx(float(lr(149)))


def test_first_adamw_step_closed_form(x64):
    # Adam's first bias-corrected step is -lr * g / (|g| + eps), for every coordinate.
    params = init_params(0, np.float64)
    batch = jax.tree.map(jnp.asarray, make_batch(0, dtype=np.float64))
    eta, eps = 0.01, 1e-8
    opt = make_optimizer(eta, total_steps=100, schedule="constant", eps=eps, clip_norm=None)
    state = init_train_state(params, opt, jax.random.key(1))
    new_state, metrics = jit(make_train_step(regression_loss, opt))(state, batch)

    # gradient of mean_j |x_j w + b - y_j|^2 by hand
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    x, y = np.asarray(batch["x"]), np.asarray(batch["y"])
    r = x @ w + b - y
    g = {"w": 2 * x.T @ r / len(x), "b": 2 * r.sum(0) / len(x)}
    expected = {k: np.asarray(params[k]) - eta * g[k] / (np.abs(g[k]) + eps) for k in g}
    np.testing.assert_allclose(new_state.params["w"], expected["w"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(new_state.params["b"], expected["b"], rtol=1e-12, atol=1e-14)
    g_norm = np.sqrt(np.sum(g["w"] ** 2) + np.sum(g["b"] ** 2))
    assert float(metrics["grad_norm"]) == pytest.approx(g_norm, rel=1e-12)
    assert float(metrics["loss"]) == pytest.approx(np.mean(np.sum(r**2, -1)), rel=1e-12)


def test_weight_decay_applies_to_matrices_only(x64):
    # zero gradient: Adam's step is 0, only the decoupled decay -lr * wd * p acts
    params = init_params(0, np.float64)
    eta, wd = 0.01, 0.1
    opt = make_optimizer(eta, total_steps=10, schedule="constant", weight_decay=wd)
    state = init_train_state(params, opt, jax.random.key(1))
    zero_loss = lambda p, batch, key: 0.0 * jnp.sum(p["w"]) * batch["x"][:, 0]
    new_state, _ = jit(make_train_step(zero_loss, opt))(state, make_batch(0))
    np.testing.assert_allclose(new_state.params["w"], params["w"] * (1 - eta * wd), rtol=1e-14)
    np.testing.assert_array_equal(new_state.params["b"], params["b"])


def test_two_clipped_adamw_steps_closed_form(x64):
    # linear loss: the gradient is whatever the batch says, so both steps are known in closed form
    eta, b1, b2, eps, c = 0.01, 0.9, 0.999, 1e-8, 1.0
    p0 = np.array([[0.3, -0.2], [0.1, 0.4]])
    linear_loss = lambda p, batch, key: jnp.sum(batch["g"] * p["w"], axis=(1, 2))
    g1 = np.array([[60.0, -80.0], [0.0, 0.0]])  # norm 100: clipped to norm c
    g2 = np.array([[0.03, 0.04], [-0.05, 0.0]])  # norm < c: untouched
    batches = [{"g": np.stack([g, g])} for g in (g1, g2)]

    def adam_closed_form(clip):
        p, m, v = p0, 0.0, 0.0
        for t, g in enumerate((g1, g2), start=1):
            if clip:
                g = g * min(1.0, c / np.linalg.norm(g))
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
            p = p - eta * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        return p

    for clip_norm in (c, None):
        opt = make_optimizer(eta, total_steps=10, schedule="constant", clip_norm=clip_norm)
        state = init_train_state({"w": jnp.asarray(p0)}, opt, jax.random.key(0))
        step = jit(make_train_step(linear_loss, opt))
        for batch in batches:
            state, metrics = step(state, batch)
        expected = adam_closed_form(clip=clip_norm is not None)
        np.testing.assert_allclose(state.params["w"], expected, rtol=1e-10, atol=1e-12)
        assert float(metrics["grad_norm"]) == pytest.approx(np.linalg.norm(g2))  # before clipping
    assert not np.allclose(adam_closed_form(True), adam_closed_form(False), atol=1e-4)


def test_lr_schedule_closed_form():
    eta, W, T = 0.3, 10, 110
    lr = make_lr_schedule(eta, total_steps=T, warmup_steps=W)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(eta * 5 / W)
    assert float(lr(W)) == pytest.approx(eta)
    assert float(lr(W + (T - W) // 2)) == pytest.approx(eta / 2)
    assert float(lr(W + (T - W) // 4)) == pytest.approx(eta * (1 + math.cos(math.pi / 4)) / 2)
    assert float(lr(T)) == pytest.approx(0.0, abs=1e-9)
    assert float(lr(T + 50)) == pytest.approx(0.0, abs=1e-9)
    const = make_lr_schedule(eta, total_steps=T, warmup_steps=W, schedule="constant")
    assert float(const(W // 2)) == pytest.approx(eta / 2)
    assert float(const(T + 1)) == pytest.approx(eta)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_lr_schedule(eta, total_steps=10, warmup_steps=10)
    lin = make_lr_schedule(eta, total_steps=T, warmup_steps=W, schedule="linear")
    assert float(lin(W // 2)) == pytest.approx(eta / 2)
    assert float(lin(W)) == pytest.approx(eta)
    assert float(lin(W + (T - W) // 4)) == pytest.approx(eta * 3 / 4)
    assert float(lin(T)) == pytest.approx(0.0, abs=1e-9)
    lin0 = make_lr_schedule(eta, total_steps=T, schedule="linear")
    assert float(lin0(0)) == pytest.approx(eta) and float(lin0(T // 2)) == pytest.approx(eta / 2)
    with pytest.raises(ValueError, match="schedule"):
        make_lr_schedule(eta, total_steps=10, schedule="exponential")


def test_ema_update_closed_form():
    # k updates toward constant params: e_k = d^k e_0 + (1 - d^k) p
    d, k = 0.9, 7
    e0 = {"a": jnp.array([1.0, -2.0]), "b": jnp.array(3.0)}
    p = {"a": jnp.array([0.5, 4.0]), "b": jnp.array(-1.0)}
    e = e0
    for _ in range(k):
        e = ema_update(e, p, d)
    expected = jax.tree.map(lambda e0, p: d**k * e0 + (1 - d**k) * p, e0, p)
    chex.assert_trees_all_close(e, expected, rtol=1e-6)
    assert_trees_equal(ema_update(e0, p, 0.0), p)
    assert_trees_equal(ema_update(e0, p, 1.0), e0)


def test_train_step_ema_closed_form_with_frozen_params():
    # learning rate 0 keeps params constant; EMA started at 0 must equal (1 - d^k) p
    d, k = 0.8, 5
    opt = make_optimizer(0.0, total_steps=10)
    params = init_params(0)
    state = init_train_state(params, opt, jax.random.key(1))
    state = state.replace(ema_params=jax.tree.map(jnp.zeros_like, params))
    step = jit(make_train_step(regression_loss, opt, ema_decay=d))
    for i in range(k):
        state, _ = step(state, make_batch(i))
    assert_trees_equal(state.params, params)
    expected = jax.tree.map(lambda p: (1 - d**k) * p, params)
    chex.assert_trees_all_close(state.ema_params, expected, rtol=1e-5)


def test_edm_ema_decay_formula():
    batch_size, halflife_kimg, rampup = 64, 2.0, 0.05
    for step in [0, 1, 10, 100, 1_000, 100_000]:
        # EDM training_loop.py: halflife = min(kimg * 1000, cur_nimg * rampup),
        # beta = 0.5 ** (B / halflife)
        nimg = step * batch_size
        halflife = min(halflife_kimg * 1000, nimg * rampup)
        expected = 0.5 ** (batch_size / max(halflife, 1e-8))
        got = float(edm_ema_decay(step, batch_size, halflife_kimg, rampup))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-30)
    assert float(edm_ema_decay(0, batch_size)) == 0.0
    # the weight of an update halves after one half-life's worth of images
    d = float(edm_ema_decay(10**7, batch_size, halflife_kimg, None))
    assert d ** (halflife_kimg * 1000 / batch_size) == pytest.approx(0.5, rel=1e-4)


def test_edm_ema_in_train_step():
    # decay 0 at step 0 -> EMA equals the params after the first step, then follows the formula
    opt = make_optimizer(0.05, total_steps=100)
    state = init_train_state(init_params(0), opt, jax.random.key(1))
    decay = functools.partial(edm_ema_decay, batch_size=B, ema_halflife_kimg=0.01)
    # jax.jit with XLA's default options: with backend optimisations off (the tests' fast
    # `jit`) XLA may recompute the update inside the EMA's fusion with another rounding (1 ulp)
    step = jax.jit(make_train_step(regression_loss, opt, ema_decay=decay))
    state, _ = step(state, make_batch(0))
    assert_trees_equal(state.ema_params, state.params)
    ema = state.ema_params
    for i in range(1, 4):
        state, _ = step(state, make_batch(i))
        d = 0.5 ** (B / min(10.0, i * B * 0.05))
        ema = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, ema, state.params)
    chex.assert_trees_all_close(state.ema_params, ema, rtol=1e-5)


def test_grad_accumulation_equals_full_batch():
    opt = make_optimizer(0.05, total_steps=10, weight_decay=0.01)
    state = init_train_state(init_params(0), opt, jax.random.key(1))
    full = jit(make_train_step(regression_loss, opt))
    accum = jit(make_train_step(regression_loss, opt, grad_accum_steps=2))
    s_full, s_acc = state, state
    for i in range(3):
        batch = make_batch(i)
        s_full, m_full = full(s_full, batch)
        s_acc, m_acc = accum(s_acc, batch)
        np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-6)
        np.testing.assert_allclose(m_acc["grad_norm"], m_full["grad_norm"], rtol=1e-6)
    chex.assert_trees_all_close(s_acc.params, s_full.params, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s_acc.opt_state, s_full.opt_state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(s_acc.ema_params, s_full.ema_params, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        make_train_step(regression_loss, opt, grad_accum_steps=3)(state, make_batch(0))


def test_nonfinite_batch_is_skipped():
    opt = make_optimizer(0.05, total_steps=10)
    state = init_train_state(init_params(0), opt, jax.random.key(1))
    step = jit(make_train_step(regression_loss, opt))
    bad = make_batch(0)
    bad["y"][3, 1] = np.nan
    new, metrics = step(state, bad)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(new.step) == 1 and int(new.skipped) == 1 and int(metrics["skipped"]) == 1
    assert_trees_equal(new.params, state.params)
    assert_trees_equal(new.ema_params, state.ema_params)
    assert_trees_equal(new.opt_state, state.opt_state)
    assert not np.array_equal(jax.random.key_data(new.key), jax.random.key_data(state.key))
    # a finite batch afterwards updates normally
    newer, metrics = step(new, make_batch(1))
    assert int(newer.step) == 2 and int(newer.skipped) == 1
    assert not np.allclose(newer.params["w"], state.params["w"])
    # a finite loss with a non-finite gradient (d|b|/db at b = 0 is 0/0) is skipped too
    norm_loss = lambda p, batch, key: jnp.sqrt(jnp.sum(p["b"] ** 2)) + 0.0 * batch["x"][:, 0]
    zero_b = state.replace(params={**state.params, "b": jnp.zeros(D_OUT)})
    new, metrics = jit(make_train_step(norm_loss, opt))(zero_b, make_batch(0))
    assert float(metrics["loss"]) == 0.0 and not np.isfinite(float(metrics["grad_norm"]))
    assert int(new.skipped) == 1
    assert_trees_equal(new.params, zero_b.params)
    # without skipping the NaN reaches the parameters
    unguarded = make_train_step(regression_loss, opt, skip_nonfinite=False)
    nan_state, _ = jit(unguarded)(state, bad)
    assert np.isnan(np.asarray(nan_state.params["w"])).any()


def test_key_split_each_step_is_deterministic():
    def noise_loss(params, batch, key):  # depends on the key only
        noise = jax.random.normal(key, batch["y"].shape)
        return jnp.sum(noise**2, axis=-1) + 0.0 * jnp.sum(params["w"])

    opt = make_optimizer(0.05, total_steps=10)
    state0 = init_train_state(init_params(0), opt, jax.random.key(1))
    step = jit(make_train_step(noise_loss, opt))
    runs = []
    for _ in range(2):
        state, losses = state0, []
        for _ in range(3):
            state, m = step(state, make_batch(0))
            losses.append(float(m["loss"]))
        runs.append((state, losses))
    assert_trees_equal(runs[0][0], runs[1][0])  # deterministic given the initial key
    assert runs[0][1] == runs[1][1]
    # step n draws from the second half of split(key_n), and carries the first half on
    key, expected = jax.random.key(1), []
    for _ in range(3):
        key, step_key = jax.random.split(key)
        noise = np.asarray(jax.random.normal(step_key, (B, D_OUT)))
        expected.append(np.mean(np.sum(noise**2, axis=-1)))
    np.testing.assert_allclose(runs[0][1], expected, rtol=1e-6)
    assert len(set(runs[0][1])) == 3  # a fresh key every step
    np.testing.assert_array_equal(jax.random.key_data(runs[0][0].key), jax.random.key_data(key))


def test_teacher_params_are_an_argument():
    # distillation-like loss: the student matches a teacher passed through *extra
    traces = []

    def distill_loss(params, batch, key, teacher):
        traces.append(1)
        target = batch["x"] @ teacher["w"] + teacher["b"]
        return jnp.sum((batch["x"] @ params["w"] + params["b"] - target) ** 2, axis=-1)

    opt = make_optimizer(0.05, total_steps=200, schedule="constant")
    state = init_train_state(init_params(0), opt, jax.random.key(1))
    step = jit_train_step(make_train_step(distill_loss, opt), compiler_options=FAST)
    teacher = init_params(7)
    for i in range(200):
        state, m = step(state, make_batch(i), teacher)
    chex.assert_trees_all_close(state.params, teacher, atol=2e-2)
    other = jax.tree.map(lambda t: t + 1.0, teacher)
    state, _ = step(state, make_batch(0), other)  # new teacher values: no retrace
    assert len(traces) == 1


def test_loss_must_be_per_example():
    opt = make_optimizer(0.05, total_steps=10)
    state = init_train_state(init_params(0), opt, jax.random.key(1))
    scalar_loss = lambda p, batch, key: jnp.mean(regression_loss(p, batch, key))
    with pytest.raises(ValueError, match=r"per-example losses of shape \(B,\)"):
        make_train_step(scalar_loss, opt)(state, make_batch(0))
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_train_step(regression_loss, opt, grad_accum_steps=0)


def test_warmup_ema_decay_forgets_the_initial_parameters():
    from dpm.training import warmup_ema_decay

    steps = jnp.arange(3000)
    d = warmup_ema_decay(steps, 0.999)
    np.testing.assert_allclose(d[0], 0.1)
    np.testing.assert_allclose(d[-1], 3000 / 3009, rtol=1e-6)
    np.testing.assert_allclose(warmup_ema_decay(10**6, 0.999), 0.999)
    assert bool(jnp.all(jnp.diff(d) >= 0))
    # weight left on the initial parameters after 1500 updates: prod of decays
    w_warm = float(jnp.prod(d[:1500]))
    w_const = 0.999**1500
    assert w_const > 0.2 and w_warm < 1e-3 * w_const


def test_flat_optimizer_equals_the_per_leaf_one_and_keeps_mixed_dtypes_per_leaf():
    params = init_params(0)
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p) * 7.0, params)  # norm > 1: the clip acts
    outs = {}
    for flat in (True, False):
        opt = make_optimizer(0.05, total_steps=10, weight_decay=0.1, flatten=flat)
        state = opt.init(params)
        p = params
        for _ in range(3):
            updates, state = opt.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        outs[flat] = (p, state)
    chex.assert_trees_all_close(outs[True][0], outs[False][0], rtol=1e-6, atol=1e-7)
    # the flat moments are one vector of all 8 parameters; the per-leaf ones one per leaf
    mu_flat = [x for x in jax.tree.leaves(outs[True][1]) if jnp.ndim(x) == 1 and x.size == 8]
    assert len(mu_flat) == 2  # Adam's mu and nu
    # a tree of two dtypes is never promoted: per-leaf moments in each leaf's own dtype
    mixed = {"w": params["w"], "b": params["b"].astype(jnp.bfloat16)}
    opt = make_optimizer(0.05, total_steps=10)
    state = opt.init(mixed)
    assert {str(x.dtype) for x in jax.tree.leaves(state) if jnp.ndim(x)} == {"float32",
                                                                           "bfloat16"}
    updates, _ = opt.update(jax.tree.map(jnp.ones_like, mixed), state, mixed)
    assert updates["b"].dtype == jnp.bfloat16 and updates["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match="flatten"):
        make_optimizer(0.05, total_steps=10, flatten=1)
    # a tree without leaves (nothing to ravel) passes through
    opt = make_optimizer(0.05, total_steps=10)
    updates, _ = opt.update({}, opt.init({}), {})
    assert updates == {}
