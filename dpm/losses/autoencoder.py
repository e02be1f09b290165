"""The first-stage objective of latent diffusion (Rombach et al., CVPR 2022): a KL-regularised
autoencoder trained with a reconstruction loss and, optionally, a patch-GAN.

Per example, with ``z = mean + exp(logvar / 2) eps`` and ``x_rec = decode(z)``:

    rec  = l1_weight * D * sum_{s in scales} mean_pixels |pool_s(x_rec) - pool_s(x)|
    kl   = KL(N(mean, exp(logvar)) || N(0, I))          (summed over the latent's elements)
    gen  = -mean_patches D_phi'(x_rec)                   (hinge generator loss, phi' = sg(phi))
    disc = (mean_patches relu(1 - D_phi(x)) + mean_patches relu(1 + D_phi(sg(x_rec)))) / 2
    loss = rec + kl_weight * kl + a(step) * (disc_weight * gen + disc)

``D`` is the number of pixel values of one image (H * W * C) and ``pool_s`` is s x s average
pooling: the scale-1 term is LDM's L1 summed over pixels (``torch.sum(nll) / batch``, with its
learned log-variance at its initial 0), so ``kl_weight = 1e-6`` keeps its published meaning.
The coarser scales are the in-project stand-in for LDM's LPIPS term, which needs weights that
cannot be downloaded here. ``a(step)`` is 0 before ``disc_start`` and 1 from it on (LDM's
``adopt_weight``). The discriminator's weight is fixed (LDM rescales its generator term by an
adaptive ratio of gradient norms at the decoder's last layer; with the L1 summed over D pixels,
a fixed ``disc_weight`` must be of the order of that ratio to matter).

One loss trains both networks with the project's single-optimizer train step. The stop-
gradients make the step a simultaneous GAN update: ``d loss / d ae = d(rec + kl_weight kl + a
disc_weight gen) / d ae`` and ``d loss / d disc = a d disc / d disc``, exactly. (One optax
chain over both: Adam is per-parameter, so this equals two Adams of the same learning rate,
except that gradient clipping by global norm sees both.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpm.losses.vae import gaussian_kl
from dpm.metrics.image import ssim

__all__ = [
    "decoder_finetune_loss",
    "hinge_gan_terms",
    "kl_autoencoder_loss",
    "kl_autoencoder_terms",
    "measure_scale_factor",
]


def _pool(x: jax.Array, s: int) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, H/s, W/s, C)`` s x s average pooling."""
    if s == 1:
        return x
    b, h, w, c = x.shape
    return jnp.mean(x.reshape(b, h // s, s, w // s, s, c), axis=(2, 4))


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0; got {value!r}")


def kl_autoencoder_terms(
    encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    decode: Callable[[Any, jax.Array], jax.Array],
    *,
    scales: Sequence[int] = (1, 2, 4),
    discriminator: Callable[[Any, jax.Array], jax.Array] | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """The unweighted per-example terms of :func:`kl_autoencoder_loss` (for logging).

    Args:
      encode, decode, scales, discriminator: as in :func:`kl_autoencoder_loss`.

    Returns:
      ``terms(params, batch, key) -> {"rec", "kl"[, "gen", "disc"]}``, each ``(B,)``, with
      ``rec`` the multi-scale L1 at ``l1_weight = 1`` and ``gen`` / ``disc`` the hinge terms
      (present with a discriminator); ``params`` is ``{"ae", "disc"}`` with a discriminator.
    """
    scales = tuple(scales)
    if not scales or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of ints >= 1; got {scales!r}")

    def terms(params, batch, key):
        x = batch["x"]
        if x.ndim != 4:
            raise ValueError(f"batch['x'] must be (B, H, W, C) images; got shape {x.shape}")
        bad = [s for s in scales if x.shape[1] % s or x.shape[2] % s]
        if bad:
            raise ValueError(f"scales {bad} do not divide the image size {x.shape[1:3]}")
        ae = params["ae"] if discriminator is not None else params
        mean, logvar = encode(ae, x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        x_rec = decode(ae, z)
        if x_rec.shape != x.shape:
            raise ValueError(f"decode returned shape {x_rec.shape}; expected {x.shape}")
        d = x[0].size
        rec = sum(
            jnp.mean(jnp.abs(_pool(x_rec, s) - _pool(x, s)).reshape(x.shape[0], -1), axis=1)
            for s in scales
        )
        out = {"rec": d * rec, "kl": gaussian_kl(mean, logvar)}
        if discriminator is None:
            return out
        out["gen"], out["disc"] = hinge_gan_terms(discriminator, params["disc"], x, x_rec)
        return out

    return terms


def hinge_gan_terms(
    discriminator: Callable[[Any, jax.Array], jax.Array], disc_params: Any, x: jax.Array,
    x_fake: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(gen, disc)``, each ``(B,)``: the hinge generator term ``-mean D(x_fake)`` (gradients
    reach ``x_fake`` only) and the discriminator's ``(mean relu(1 - D(x)) + mean relu(1 +
    D(x_fake))) / 2`` (gradients reach the discriminator only), means over patches."""

    def patch_mean(logits):
        return jnp.mean(logits.reshape(logits.shape[0], -1), axis=1)

    gen = -patch_mean(discriminator(jax.lax.stop_gradient(disc_params), x_fake))
    real = patch_mean(jax.nn.relu(1.0 - discriminator(disc_params, x)))
    fake = patch_mean(jax.nn.relu(1.0 + discriminator(disc_params,
                                                      jax.lax.stop_gradient(x_fake))))
    return gen, 0.5 * (real + fake)


def kl_autoencoder_loss(
    encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    decode: Callable[[Any, jax.Array], jax.Array],
    *,
    kl_weight: float = 1e-6,
    l1_weight: float = 1.0,
    scales: Sequence[int] = (1, 2, 4),
    discriminator: Callable[[Any, jax.Array], jax.Array] | None = None,
    disc_weight: float = 0.5,
    disc_start: int = 0,
) -> Callable[..., jax.Array]:
    """LDM's autoencoder loss ``loss(params, batch, key, step=None) -> (B,)`` (module docstring).

    Summed over pixels (the scale-1 L1, and each coarser scale's mean L1 times the full pixel
    count D) and over latent elements (the KL); averaged over patches (the GAN terms); the
    train step averages over the batch.

    Args:
      encode: ``(ae_params, x) -> (mean, logvar)``, each ``(B, h, w, c)``.
      decode: ``(ae_params, z) -> x_rec``, ``(B, H, W, C)`` like ``x``.
      kl_weight: weight of the KL (LDM: 1e-6).
      l1_weight: weight of the multi-scale L1.
      scales: average-pooling factors of the L1 terms (1 = full resolution); they must divide
        the image size.
      discriminator: ``(disc_params, x) -> logits`` of any shape ``(B, ...)``, or None for no
        GAN. With one, ``params`` is ``{"ae": ae_params, "disc": disc_params}``.
      disc_weight: fixed weight of the generator term.
      disc_start: the first step whose adversarial terms count. With ``disc_start > 0`` the loss
        needs ``step``: pass the host loop's step as an array through the train step's extra
        arguments, ``train_step(state, batch, jnp.int32(i))`` (not ``state.step`` itself, whose
        buffer a donating jitted step consumes).

    Returns:
      ``loss(params, batch, key, step=None) -> (B,)``, ``batch["x"]`` the ``(B, H, W, C)``
      images in [-1, 1].

    Example:
      >>> ae = lambda p: nnx.merge(graphdef, p)
      >>> loss = kl_autoencoder_loss(lambda p, x: ae(p).encode(x),
      ...                            lambda p, z: ae(p).decode(z), kl_weight=1e-6)
      >>> train_step = make_train_step(loss, optimizer)
    """
    for name, value in (("kl_weight", kl_weight), ("l1_weight", l1_weight),
                        ("disc_weight", disc_weight)):
        _check_number(name, value)
    if isinstance(disc_start, bool) or not isinstance(disc_start, int) or disc_start < 0:
        raise ValueError(f"disc_start must be an int >= 0; got {disc_start!r}")
    terms = kl_autoencoder_terms(encode, decode, scales=scales, discriminator=discriminator)

    def loss(params, batch, key, step=None):
        gan = discriminator is not None
        if gan and disc_start > 0 and step is None:
            raise ValueError(f"disc_start={disc_start} needs the step: call "
                             "loss(params, batch, key, step)")
        t = terms(params, batch, key)
        total = l1_weight * t["rec"] + kl_weight * t["kl"]
        if not gan:
            return total
        a = jnp.where(jnp.asarray(step) >= disc_start, 1.0, 0.0) if disc_start > 0 else 1.0
        return total + a * (disc_weight * t["gen"] + t["disc"])

    return loss


def decoder_finetune_loss(
    decode: Callable[..., jax.Array],
    *,
    l1_weight: float = 1.0,
    ssim_weight: float = 1.0,
    ssim_window: int = 7,
    discriminator: Callable[[Any, jax.Array], jax.Array] | None = None,
    disc_weight: float = 0.1,
) -> Callable[..., jax.Array]:
    """Decoder fine-tuning on pairs ``(latent, image)`` (YONOS-SR's last stage: the denoiser
    frozen, the autoencoder's decoder trained to map its one-step latents to the
    high-resolution images):

        loss = l1_weight mean |x_rec - x| + ssim_weight (1 - SSIM(x_rec, x))
               [+ disc_weight gen + disc]     (hinge patch-GAN, as kl_autoencoder_loss)

    with ``x_rec = decode(params, z, frozen)``. The frozen rest of the autoencoder is an
    argument of the loss (``loss(params, batch, key, frozen)``), never a trained parameter:
    only ``params`` (the decoder's; ``{"dec", "disc"}`` with a discriminator) move.

    Args:
      decode: ``(decoder_params, z, frozen) -> x_rec``, ``(B, H, W, C)`` images in [-1, 1]
        (e.g. ``nets.autoencoder_decode(graphdef)``).
      l1_weight: weight of the mean absolute error.
      ssim_weight: weight of ``1 - SSIM`` (Gaussian window, data range 2).
      ssim_window: odd SSIM window side (at most the image side).
      discriminator: ``(disc_params, x) -> logits`` or None (no GAN, the default).
      disc_weight: weight of the generator term.

    Returns:
      ``loss(params, batch, key, frozen) -> (B,)`` with ``batch = {"z": (B, h, w, c) latents,
      "x": (B, H, W, C) target images}``.
    """
    for name, value in (("l1_weight", l1_weight), ("ssim_weight", ssim_weight),
                        ("disc_weight", disc_weight)):
        _check_number(name, value)
    if isinstance(ssim_window, bool) or not isinstance(ssim_window, int) or (
            ssim_window < 1 or ssim_window % 2 == 0):
        raise ValueError(f"ssim_window must be a positive odd int; got {ssim_window!r}")

    def loss(params, batch, key, frozen):
        del key
        missing = [k for k in ("z", "x") if k not in batch]
        if missing:
            raise ValueError(f"decoder fine-tuning needs batch['z'] (latents) and batch['x'] "
                             f"(target images); missing {missing}")
        x = batch["x"]
        if min(x.shape[1:3]) < ssim_window:
            raise ValueError(f"ssim_window={ssim_window} exceeds the images' size "
                             f"{tuple(x.shape[1:3])}")
        dec = params["dec"] if discriminator is not None else params
        x_rec = decode(dec, batch["z"], frozen)
        if x_rec.shape != x.shape:
            raise ValueError(f"decode returned shape {x_rec.shape}; batch['x'] has {x.shape}")
        total = l1_weight * jnp.mean(jnp.abs(x_rec - x).reshape(x.shape[0], -1), axis=1)
        if ssim_weight:
            total = total + ssim_weight * (1.0 - ssim(x_rec, x, 2.0, win_size=ssim_window))
        if discriminator is None:
            return total
        gen, disc = hinge_gan_terms(discriminator, params["disc"], x, x_rec)
        return total + disc_weight * gen + disc

    return loss


@jax.jit
def _sample(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, jnp.shape(mean))


def measure_scale_factor(
    encode: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    images: Any,
    *,
    batch_size: int = 256,
    key: jax.Array | None = None,
) -> float:
    """LDM's latent scale factor: ``1 / std`` of the latents over ``images``.

    The (population) standard deviation is over every element of every latent: all examples,
    positions and channels pooled, about their common mean, accumulated in float64 over batches
    (Chan's pairwise update), so ``scale_factor * z`` has unit variance. By default the latents
    are the posterior means (deterministic); with ``key`` they are posterior samples, as in LDM
    (which measures them on its first training batch).

    Args:
      encode: ``x -> (mean, logvar)`` (e.g. ``lambda x: ae.encode(x)``, jitted or not).
      images: ``(N, H, W, C)`` array (numpy or jax) in the encoder's range.
      batch_size: images per ``encode`` call (the last batch may be smaller).
      key: None (means) or a PRNG key (samples ``mean + exp(logvar / 2) eps``).

    Returns:
      The scale factor, a positive Python float.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    n = len(images)
    if n == 0:
        raise ValueError("images is empty; expected at least one image")
    count, mu, ss = 0, 0.0, 0.0
    for i, start in enumerate(range(0, n, batch_size)):
        mean, logvar = encode(images[start:start + batch_size])
        z = mean if key is None else _sample(mean, logvar, jax.random.fold_in(key, i))
        z = np.asarray(z, np.float64).ravel()
        # Chan et al.'s pairwise update of (count, mean, sum of squared deviations)
        m, m2 = z.mean(), np.square(z - z.mean()).sum()
        delta, count = m - mu, count + z.size
        mu += delta * z.size / count
        ss += m2 + delta**2 * z.size * (count - z.size) / count
    var = ss / count
    if not var > 0:
        raise ValueError(f"the latents have variance {var}; cannot scale them to unit variance")
    return float(1.0 / np.sqrt(var))
