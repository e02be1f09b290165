"""Progressive distillation: the target identity, the loss, one round on the exact
Gaussian-mixture teacher, the sharded step, and the halving driver's resume."""

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
from dpm.data import BatchIterator
from dpm.losses import (
    ddim_step,
    distillation_target,
    progressive_distillation_loss,
    student_times,
)
from dpm.training import init_train_state, jit_train_step, make_mesh
from experiments._distill import distillation_step, halving_schedule, progressive_distillation
from solvers import ddim, pd_stochastic

FAST = jit.keywords["compiler_options"]

SCHEDULES = {
    "discrete_linear": lambda: dpm.DiscreteVP.from_name("linear", num_steps=1000),
    "vp_linear": dpm.LinearVP,
    "vp_cosine": dpm.CosineVP,
    "cosine_log_snr": dpm.CosineLogSNR,
    "edm": dpm.EDM,
}
HEADS = ("x0", "eps", "v", "both")


def _teacher_fn(prediction, x, t, cond):
    # an arbitrary smooth nonlinear "network" of (x, t)
    t = jnp.reshape(jnp.asarray(t, x.dtype), (-1,) + (1,) * (x.ndim - 1))
    out = jnp.tanh(0.7 * x + 0.3 * jnp.roll(x, 1, axis=-1)) * (1.0 + t) + 0.1 * t
    return jnp.concatenate([out, 0.5 * out - 0.2], axis=-1) if prediction == "both" else out


def _teacher(schedule, prediction):
    return dpm.Denoiser(Partial(_teacher_fn, prediction), schedule, prediction)


def _in_head(prediction, schedule, z, t, x_til):
    """A student output that means x0_hat = x_til at (z, t) in the given head."""
    a = dpm.expand_like(schedule.alpha(t), z)
    s = dpm.expand_like(schedule.sigma(t), z)
    eps = (z - a * x_til) / s
    return {"x0": x_til, "eps": eps, "v": a * eps - s * x_til,
            "both": jnp.concatenate([x_til, eps], axis=-1)}[prediction]


def test_cosine_log_snr_schedule(x64):
    sched = dpm.CosineLogSNR()
    t = jnp.linspace(0.0, 1.0, 101)
    lam = sched.log_snr(t)
    # the closed form of the PD code: log_snr = -2 log tan(a t + b)
    b = np.arctan(np.exp(-10.0))
    a = np.arctan(np.exp(10.0)) - b
    np.testing.assert_allclose(lam, -2.0 * np.log(np.tan(a * np.asarray(t) + b)), rtol=1e-9,
                               atol=1e-9)
    assert float(lam[0]) == pytest.approx(20.0) and float(lam[-1]) == pytest.approx(-20.0)
    np.testing.assert_allclose(sched.alpha(t) ** 2 + sched.sigma(t) ** 2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(sched.t_of_log_snr(lam), t, atol=1e-9)
    assert np.all(np.diff(np.asarray(lam)) < 0)
    # alpha near t = 1 to full relative precision (the tan form loses it there)
    np.testing.assert_allclose(sched.alpha(1.0), np.exp(-10.0) / np.sqrt(1 + np.exp(-20.0)),
                               rtol=1e-9)
    with pytest.raises(ValueError, match="log_snr_min < log_snr_max"):
        dpm.CosineLogSNR(log_snr_min=5.0, log_snr_max=-5.0)


@pytest.mark.parametrize("prediction", ["x0", "eps", "v"])
def test_both_head_reduces_to_its_halves(prediction, x64):
    # "both" = sigma^2-weighted x0 guess + alpha^2-weighted x0 implied by the eps guess
    sched = dpm.CosineLogSNR()
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    t = jnp.array([0.1, 0.5, 0.9])
    x_g = jax.random.normal(jax.random.key(1), x.shape)
    e_g = jax.random.normal(jax.random.key(2), x.shape)
    both = dpm.Denoiser(lambda z, t, c: jnp.concatenate([x_g, e_g], -1), sched, "both")
    a, s = (dpm.expand_like(f(t), x) for f in (sched.alpha, sched.sigma))
    x0_from_eps = (x - s * e_g) / a
    x0, eps = both.predict(x, t)
    np.testing.assert_allclose(x0, s**2 * x_g + a**2 * x0_from_eps, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(eps, (x - a * x0) / s, rtol=1e-8, atol=1e-8)
    # wrong output width is refused with the shapes named
    bad = dpm.Denoiser(lambda z, t, c: z, sched, "both")
    with pytest.raises(ValueError, match="twice the channels"):
        bad.x0(x, t)


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("teacher_head", ["eps", "v"])
def test_one_student_step_lands_on_the_teachers_two_step_endpoint(schedule, teacher_head, x64):
    sched = SCHEDULES[schedule]()
    teacher = _teacher(sched, teacher_head)
    B = 6
    z = jax.random.normal(jax.random.key(3), (B, 4, 4, 1))
    t = jnp.array([1.0, 0.75, 0.5, 0.3, 0.125, 0.0625])
    s = t - jnp.array([0.5, 0.25, 0.25, 0.1, 0.0625, 0.0625])  # the last one ends at s = 0
    x_til, z_s = distillation_target(teacher, z, t, s)
    # the endpoint is the teacher's own two DDIM steps (the project's sampler, per example)
    for b in range(B):
        ref = ddim(teacher, z[b:b + 1], jnp.array([t[b], (t[b] + s[b]) / 2, s[b]]))
        np.testing.assert_allclose(z_s[b:b + 1], ref, rtol=1e-9, atol=1e-10)
    for head in HEADS:
        out = _in_head(head, sched, z, t, x_til)
        student = dpm.Denoiser(Partial(lambda o, x, tt, c: o, out), sched, head)
        landed, _ = ddim_step(student, z, t, s)
        np.testing.assert_allclose(landed, z_s, rtol=1e-9, atol=1e-9, err_msg=head)
        for b in range(B - 1):  # and through the sampler (s > 0 there)
            one = dpm.Denoiser(Partial(lambda o, x, tt, c: o, out[b:b + 1]), sched, head)
            np.testing.assert_allclose(ddim(one, z[b:b + 1], jnp.array([t[b], s[b]])),
                                       z_s[b:b + 1], rtol=1e-8, atol=1e-9, err_msg=head)
    # the target is not the teacher's x0 guess, except where the last step ends at sigma = 0
    _, x_mid = ddim_step(teacher, ddim_step(teacher, z, t, (t + s) / 2)[0], (t + s) / 2, s)
    assert not np.allclose(x_til[:-1], x_mid[:-1], atol=1e-3)
    if float(sched.sigma(0.0)) == 0.0:
        np.testing.assert_allclose(x_til[-1], x_mid[-1], rtol=1e-9, atol=1e-12)


def test_student_times_cover_the_grid():
    t, s = student_times(jax.random.key(0), 4000, jnp.int32(8))
    np.testing.assert_allclose(t - s, 1 / 8, atol=1e-7)
    assert set(np.round(np.asarray(t) * 8).astype(int)) == set(range(1, 9))
    assert float(jnp.min(s)) == 0.0 and float(jnp.max(t)) == 1.0


def _oracle_student(gm, sched, prediction="x0", student_steps=None):
    g, p = nets.init_params(nets.MLP, gm.dim, 64, 2, seed=0)

    def apply(params, x, c, cond):
        return nnx.merge(g, params)(x, c, cond)

    def make(params):
        return dpm.network_denoiser(Partial(apply, params), sched, prediction)

    teacher = gm.denoiser(sched, "x0")
    loss = progressive_distillation_loss(make, make_teacher=lambda tp: teacher,
                                         student_steps=student_steps)
    return make, p, loss


@pytest.mark.parametrize("weighting", ["truncated_snr", "v", "eps", "x0"])
def test_loss_is_zero_at_the_target_and_weighted_as_named(weighting, x64):
    # a student that outputs the exact target has zero loss; a shifted one has loss
    # w(t) * shift^2 in x0 units
    sched = dpm.CosineLogSNR()
    teacher = _teacher(sched, "v")
    x = jax.random.normal(jax.random.key(0), (16, 2, 2, 1))
    key = jax.random.key(5)
    kt, ke = jax.random.split(key)
    t, s = student_times(kt, 16, 4)
    z = dpm.losses.diffuse(sched, x, t, jax.random.normal(ke, x.shape, x.dtype))
    x_til, _ = distillation_target(teacher, z, t, s)
    for head in ("x0", "v", "both"):
        for shift in (0.0, 0.3):
            out = _in_head(head, sched, z, t, x_til + shift)
            loss = progressive_distillation_loss(
                lambda p, o=out, h=head: dpm.Denoiser(Partial(lambda o, *a: o, o), sched, h),
                make_teacher=lambda p: teacher, weighting=weighting, student_steps=4)
            got = loss(None, {"x": x}, key, None)
            w = jnp.exp(dpm.losses.log_weight(weighting, sched, t))
            # (the loss accumulates in float32, as in mixed-precision training)
            np.testing.assert_allclose(got, w * shift**2, rtol=1e-6, atol=1e-12)


def test_one_round_on_the_exact_teacher_beats_the_teachers_two_steps():
    # teacher: the exact denoiser of a 2-D Gaussian mixture; "exact flow": its DDIM with 2000
    # steps. One round (teacher 4 steps -> student 2) of a small MLP: the student's 2-step
    # error falls well below the teacher's own 2-step error, to about its 4-step error.
    sched = dpm.CosineLogSNR()
    gm = dpm.GaussianMixture.create(jnp.array([[-1.0, 0.5], [1.0, -0.5], [0.3, 1.2]]),
                                    jnp.array([0.2, 0.3, 0.15]))
    teacher = gm.denoiser(sched, "x0")
    x_T = jax.random.normal(jax.random.key(1), (1000, 2))
    run = jit(ddim)
    exact = run(teacher, x_T, jnp.linspace(1.0, 0.0, 2001))

    def err(den, n):
        return float(jnp.sqrt(jnp.mean(jnp.sum((run(den, x_T, jnp.linspace(1, 0, n + 1))
                                                - exact) ** 2, -1))))

    make, params, loss = _oracle_student(gm, sched, student_steps=2)
    K = 600
    step, opt = distillation_step(loss, K, learning_rate=3e-3)
    step = jit_train_step(step, compiler_options=FAST)
    state = init_train_state(params, opt, jax.random.key(0))
    for k in range(K):
        state, m = step(state, {"x": gm.sample(jax.random.key(100 + k), 256)}, None, 2)
    teacher2, teacher4, student2 = err(teacher, 2), err(teacher, 4), err(make(state.params), 2)
    assert student2 < 0.6 * teacher2, (student2, teacher2)
    assert abs(student2 - teacher4) < 0.15 * teacher4, (student2, teacher4)


def test_sharded_step_equals_single_device_step():
    sched = dpm.CosineLogSNR()
    gm = dpm.GaussianMixture.create(jnp.array([[-1.0, 0.5], [1.0, -0.5]]), jnp.array([0.2, 0.3]))
    make, params, _ = _oracle_student(gm, sched)
    # the teacher is a network with parameters passed as an argument; both nets get nonzero
    # output layers (the init's are zero: gradients ~0, and Adam's first steps amplify noise)
    def jitter(tree, seed):
        leaves, tdef = jax.tree.flatten(tree)
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        return tdef.unflatten([p + 0.2 * jax.random.normal(k, p.shape, p.dtype)
                               for p, k in zip(leaves, keys, strict=True)])

    loss = progressive_distillation_loss(make)
    params, teacher_params = jitter(params, 1), jitter(params, 2)
    step, opt = distillation_step(loss, 10, learning_rate=1e-3)
    batch = {"x": gm.sample(jax.random.key(0), 64)}
    outs = []
    for mesh in (None, make_mesh()):
        state = init_train_state(jax.tree.map(jnp.copy, params), opt, jax.random.key(1))
        fn = jit_train_step(step, mesh, compiler_options=FAST)
        for _ in range(2):
            state, m = fn(state, batch, teacher_params, jnp.int32(4))
        outs.append((jax.device_get(state.params), float(m["loss"])))
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5)
    chex.assert_trees_all_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)


def test_halving_schedule_and_its_errors():
    assert halving_schedule(8) == [(8, 4), (4, 2), (2, 1)]
    assert halving_schedule(256, 4) == [(256, 128), (128, 64), (64, 32), (32, 16), (16, 8),
                                        (8, 4)]
    with pytest.raises(ValueError, match="start_steps must be a power of two"):
        halving_schedule(12)
    with pytest.raises(ValueError, match="end_steps must be < start_steps"):
        halving_schedule(4, 4)


class _Interrupt(Exception):
    pass


class _Stopping:
    """A BatchIterator that raises after ``limit`` batches (a killed run)."""

    def __init__(self, it, limit):
        self.it, self.left = it, limit

    def __next__(self):
        if self.left == 0:
            raise _Interrupt
        self.left -= 1
        return next(self.it)

    def state(self):
        return self.it.state()

    def restore(self, s):
        self.it.restore(s)


def test_cascade_resumes_mid_round_bitwise(tmp_path):
    sched = dpm.CosineLogSNR()
    gm = dpm.GaussianMixture.create(jnp.array([[-1.0, 0.5], [1.0, -0.5]]), jnp.array([0.2, 0.3]))
    make, params, _ = _oracle_student(gm, sched)
    step, opt = distillation_step(progressive_distillation_loss(make), 4, learning_rate=1e-3)
    # one compiled step serves every round (teacher and student steps are arguments)
    chex.clear_trace_counter()
    step = chex.assert_max_traces(step, n=1)
    data = {"x": np.asarray(gm.sample(jax.random.key(0), 256))}

    def its(r):
        return BatchIterator(data, 32, seed=r)

    kw = dict(start_steps=4, steps_per_round=4, ckpt_every=2, ckpt_config={"net": "mlp"},
              progress=False, fast_compile=True)
    full = progressive_distillation(step, opt, params, its, str(tmp_path / "a"), **kw)
    assert sorted(full) == [1, 2]
    # killed in round 2 after 3 of its 4 steps (its step-2 checkpoint survives), then rerun
    calls = []

    def stopping(r):
        calls.append(r)
        return _Stopping(its(r), 3) if r == 1 else its(r)

    with pytest.raises(_Interrupt):
        progressive_distillation(step, opt, params, stopping, str(tmp_path / "b"), **kw)
    resumed = progressive_distillation(step, opt, params, its, str(tmp_path / "b"), **kw)
    for n in (1, 2):
        chex.assert_trees_all_equal(resumed[n], full[n])
    # the distilled students moved away from the teacher
    assert not np.allclose(np.asarray(jax.tree.leaves(full[1])[0]),
                           np.asarray(jax.tree.leaves(params)[0]))
    # a cascade of another config is refused, naming the difference
    with pytest.raises(ValueError, match="net"):
        progressive_distillation(step, opt, params, its, str(tmp_path / "b"),
                                 **{**kw, "ckpt_config": {"net": "other"}})


def test_pd_stochastic_sampler_steps_written_out(x64):
    sched = dpm.CosineLogSNR()
    den = _teacher(sched, "v")
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 1))
    key = jax.random.key(7)
    ts = jnp.array([1.0, 0.6, 0.25])
    got = pd_stochastic(den, x, ts, key=key)
    # by hand: DDIM 1 -> 0.25, forward-noise 0.25 -> 0.6, then DDIM 0.6 -> 0.25
    n = jax.random.normal(jax.random.split(key, 2)[0], x.shape, x.dtype)
    z_far = ddim(den, x, jnp.array([1.0, 0.25]))
    a1, a2, s1, s2 = sched.alpha(0.6), sched.alpha(0.25), sched.sigma(0.6), sched.sigma(0.25)
    z1 = a1 / a2 * z_far + jnp.sqrt(s1**2 - (a1 * s2 / a2) ** 2) * n
    np.testing.assert_allclose(got, ddim(den, z1, jnp.array([0.6, 0.25])), rtol=1e-9, atol=1e-10)
    # one step is DDIM; a key is required
    np.testing.assert_allclose(pd_stochastic(den, x, ts[:2], key=key), ddim(den, x, ts[:2]),
                               rtol=1e-12)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        pd_stochastic(den, x, ts)


def test_pd_stochastic_sampler_samples_the_exact_gaussian():
    # the exact denoiser of N(mu, c^2): the samples' sd converges to c (first order: the
    # bias shrinks about 4x from 100 to 400 steps), the mean is unbiased
    sched = dpm.CosineLogSNR()
    mu, c = jnp.array([0.7, -0.4]), 0.3
    den = dpm.GaussianMixture.gaussian(mu, c).denoiser(sched, "eps")
    x_T = jax.random.normal(jax.random.key(2), (20000, 2))
    run = jit(pd_stochastic, static_argnames="return_trajectory")
    key = jax.random.key(3)
    coarse = run(den, x_T, jnp.linspace(1.0, 0.0, 101), key=key)
    out, traj = run(den, x_T, jnp.linspace(1.0, 0.0, 401), key=key, return_trajectory=True)
    np.testing.assert_allclose(jnp.mean(out, 0), mu, atol=0.01)
    np.testing.assert_allclose(jnp.std(out, 0), c, rtol=0.03)
    assert float(jnp.mean(jnp.abs(jnp.std(coarse, 0) - c))) > 2 * float(
        jnp.mean(jnp.abs(jnp.std(out, 0) - c)))
    assert int(traj["nfe"]) == 400
    # an intermediate state has the forward marginal's sd sqrt(alpha^2 c^2 + sigma^2)
    t = 0.5
    sd = float(jnp.sqrt(sched.alpha(t) ** 2 * c**2 + sched.sigma(t) ** 2))
    np.testing.assert_allclose(jnp.std(traj["x"][200], 0), sd, rtol=0.03)
