"""A GAN run under the checkpointed training loop: lazy R1 as two compiled steps chosen by the
step index, and a run interrupted and resumed equals the uninterrupted one bit for bit (both
networks, both optimizers, the EMA, the key and the data position)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dpm
from dpm.data import BatchIterator
from dpm.losses import ddgan_d_loss, ddgan_g_loss
from dpm.training import init_gan_state, make_gan_step
from experiments._runner import fit

B, F, D, Z = 8, 3, 2, 2


def _gan():
    sched = dpm.ddgan_schedule(4)

    def G(p, x, t, z, cond, mask):
        return x @ p["w"] + (z @ p["v"])[:, None, :] + p["b"]

    def D_(p, x_t, x_tp1, t, cond, mask):
        h = jnp.concatenate([x_t.reshape(len(x_t), -1), x_tp1.reshape(len(x_t), -1),
                             t[:, None]], axis=1)
        return (jnp.tanh(h @ p["w1"]) @ p["w2"])[:, 0]

    d_loss = ddgan_d_loss(G, D_, sched, latent_shape=(Z,), r1_gamma=0.5)
    g_loss = ddgan_g_loss(G, D_, sched, latent_shape=(Z,), rec_weight=1.0)
    g_opt, d_opt = optax.adam(1e-2, b1=0.5, b2=0.9), optax.adam(1e-2, b1=0.5, b2=0.9)
    steps = tuple(make_gan_step(d_loss, g_loss, d_opt, g_opt, ema_decay=0.9, r1=r1)
                  for r1 in (True, False))
    rng = np.random.default_rng(0)
    g = {"w": jnp.asarray(rng.normal(size=(D, D)) * 0.3, jnp.float32),
         "v": jnp.asarray(rng.normal(size=(Z, D)) * 0.3, jnp.float32),
         "b": jnp.zeros((D,), jnp.float32)}
    d = {"w1": jnp.asarray(rng.normal(size=(2 * F * D + 1, 8)) * 0.3, jnp.float32),
         "w2": jnp.asarray(rng.normal(size=(8, 1)) * 0.3, jnp.float32)}
    # fresh buffers for every run: fit donates the state it is given
    return steps, lambda: init_gan_state(jax.tree.map(jnp.array, g), jax.tree.map(jnp.array, d),
                                         g_opt, d_opt, jax.random.key(3))


def _data():
    x = np.random.default_rng(1).normal(size=(40, F, D)).astype(np.float32)
    return {"x": x}


def _run(steps, init, workdir, n, choice):
    state, _ = fit(steps, init(), BatchIterator(_data(), B, seed=0), str(workdir), steps=n,
                   ckpt_config={"gan": 1}, ckpt_every=100, step_choice=choice, progress=False,
                   log=lambda *_: None)
    return jax.device_get(state)


def test_gan_fit_with_lazy_r1_resumes_bit_for_bit(tmp_path):
    steps, init = _gan()
    chosen = []

    def choice(i):  # R1 every 3 steps, as DDGAN's lazy regularisation
        chosen.append(i)
        return 0 if i % 3 == 0 else 1

    straight = _run(steps, init, tmp_path / "a", 7, choice)
    assert chosen == list(range(7))
    _run(steps, init, tmp_path / "b", 4, choice)
    resumed = _run(steps, init, tmp_path / "b", 7, choice)
    assert chosen[7:] == [0, 1, 2, 3, 4, 5, 6]  # the second run, then the resumed steps
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        a, b = (jax.random.key_data(a), jax.random.key_data(b)) if jnp.issubdtype(
            a.dtype, jax.dtypes.prng_key) else (a, b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(straight.step) == 7
    # the R1 steps are a different program: always taking the plain step changes the result
    plain = _run(steps, init, tmp_path / "c", 7, lambda i: 1)
    assert not np.array_equal(np.asarray(plain.params["d"]["w1"]),
                              np.asarray(straight.params["d"]["w1"]))


def test_fit_refuses_a_tuple_without_its_choice(tmp_path):
    steps, init = _gan()
    with pytest.raises(ValueError, match="step_choice"):
        fit(steps, init(), BatchIterator(_data(), B, seed=0), str(tmp_path), steps=1,
            ckpt_config={}, ckpt_every=1, progress=False)
