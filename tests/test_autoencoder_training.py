"""Both autoencoders train through the project's train step and training loop
(``experiments._runner.fit``): checkpointed, and a run stopped half way and resumed ends
bitwise where an uninterrupted run ends."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nets
from dpm.data import BatchIterator, load_digits
from dpm.losses import beta_vae_loss, kl_autoencoder_loss
from dpm.training import init_train_state, make_optimizer, make_train_step
from experiments._runner import fit


def _vae():
    g, p = nets.init_params(nets.VAE, nets.vae_digits(8), seed=0)
    enc = lambda q, x: nnx.merge(g, q).encode(x)  # noqa: E731
    dec = lambda q, z: nnx.merge(g, q).decode(z)  # noqa: E731
    return p, beta_vae_loss(enc, dec), lambda x: (x + 1) / 2  # the VAE works in [0, 1]


def _kl_autoencoder():
    cfg = nets.autoencoder_digits(factor=2, base_channels=8, attn_in_middle=False)
    g, p = nets.init_params(nets.AutoencoderKL, cfg, seed=0)
    enc = lambda q, x: nnx.merge(g, q).encode(x)  # noqa: E731
    dec = lambda q, z: nnx.merge(g, q).decode(z)  # noqa: E731
    return p, kl_autoencoder_loss(enc, dec, scales=(1, 2)), lambda x: x


@pytest.mark.parametrize("build", [_vae, _kl_autoencoder], ids=["diffusevae_vae", "kl_f2"])
def test_training_resumes_bitwise(tmp_path, build):
    params, loss, to_range = build()
    x = to_range(load_digits()["x"][:64])
    opt = make_optimizer(1e-3, total_steps=4)
    step = make_train_step(loss, opt)
    initial = jax.device_get(params)

    def run(workdir, steps):
        # a fresh state per run: fit donates the state it is given
        params = jax.tree.map(jnp.asarray, initial)
        it = BatchIterator({"x": x}, 16, seed=0)
        state, start = fit(step, init_train_state(params, opt, jax.random.key(0)), it,
                           str(workdir), steps=steps, ckpt_config={"run": "ae"}, ckpt_every=2,
                           fast_compile=True, progress=False)
        return jax.device_get(state), start

    straight, _ = run(tmp_path / "a", 4)
    half, start = run(tmp_path / "b", 2)
    assert start == 0 and int(half.step) == 2
    resumed, start = run(tmp_path / "b", 4)
    assert start == 2 and int(resumed.step) == 4
    chex.assert_trees_all_equal(resumed.params, straight.params)
    chex.assert_trees_all_equal(resumed.opt_state, straight.opt_state)
    assert not np.array_equal(jax.tree.leaves(straight.params)[0],
                              jax.tree.leaves(initial)[0])  # it trained
