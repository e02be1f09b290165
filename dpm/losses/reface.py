"""REFace (Baliah et al., WACV 2025): face swapping as self-supervised inpainting, with a few
DDIM steps unrolled inside the training step.

The target's face region is masked out and the network repaints it from a condition built from
the source. Per example the objective is

    L = L_simple + id_weight * L_id + perceptual_weight * L_perc,

- ``L_simple = |eps - eps_theta([z_t | masked target | mask], t, c)|^2`` at a random training
  time (the inpainting loss of Paint-by-Example / LDM);
- the **unrolled branch**: from ``z_T = alpha_T z0 + sigma_T eps`` (the same ``eps``), ``S``
  deterministic DDIM steps (eta = 0, no guidance) of the network under the *swap* condition
  (in the release: the condition of the batch-flipped reference, i.e. another person), with
  gradients through every step. Each step's ``x0_hat_k`` is decoded (identity in pixel mode);
  ``L_id = mean_k (1 - cos(E_id(x0_hat_k restricted to the face region), E_id(source)))`` and
  ``L_perc = sum_k P(x0_hat_k, target)`` (LPIPS at 3 scales in the paper; here any
  ``perceptual_fn``, by default :func:`multiscale_l1`, the proxy used where LPIPS weights are
  not available).

The release evaluates the net at training indices 748, 499, 250, 1 while it takes the DDIM alphas
from 1, 251, 501, 751 (a grid that does not start at ``T``); :func:`unrolled_times` gives the
consistent grid ``t_k = 1 - k / S`` (indices 999, 749, 499, 249 for ``T = 1000``), ending at
``t = 0`` where a DDIM step returns its ``x0_hat``. The release trains with one example per GPU,
which makes the in-batch flip of the swap condition a no-op (self-reconstruction only); a batch
of at least 2 per device (:func:`swap_partner`) makes it a true cross-identity branch.

Each unrolled step is wrapped in ``jax.checkpoint``, so the backward pass keeps one step's
activations at a time instead of ``S``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dpm.denoiser import Denoiser, expand_like
from dpm.losses.denoising import diffuse, sample_time
from dpm.losses.identity import cosine_distance
from dpm.losses.progressive import ddim_step

Array = jax.Array

__all__ = [
    "ReFaceTerms",
    "ddim_unroll",
    "multiscale_l1",
    "reface_terms",
    "restrict",
    "shuffle_masks",
    "swap_partner",
    "unrolled_times",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ReFaceTerms:
    """Named per-example terms of the REFace objective (all ``(B,)`` except ``x0_hats``).

    Attributes:
      simple: the eps-MSE of the inpainting branch.
      identity: ``mean_k (1 - cos)`` of the unrolled predictions (0 without the branch).
      perceptual: ``sum_k P(x0_hat_k, target)`` (0 without the branch).
      loss: the weighted total.
      x0_hats: ``(S, k, ...)`` the decoded predictions of the unrolled steps on the ``k``
        examples of the branch (``(0, B, ...)`` without the branch).
    """

    simple: Array
    identity: Array
    perceptual: Array
    loss: Array
    x0_hats: Array


def unrolled_times(steps: int) -> Array:
    """The unrolled branch's grid ``t_k = 1 - k / S``, ``k = 0..S``: ``(S + 1,)`` descending,
    from ``t = 1`` (training index ``T - 1``) to ``t = 0``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return jnp.linspace(1.0, 0.0, steps + 1)


def ddim_unroll(den: Denoiser, z_T: Array, ts: Array, *, remat: bool = True
                ) -> tuple[Array, Array]:
    """Deterministic DDIM (eta = 0) over the grid ``ts``, differentiable through every step.

    The same update as :func:`solvers.ddim` with ``eta = 0``, written for training: it also
    returns every step's ``x0_hat`` and each step is ``jax.checkpoint``-ed when ``remat``.
    ``ts`` must be concrete in its length (one traced program per ``S``).

    Args:
      den: the denoiser (its condition bound).
      z_T: ``(B, ...)`` the start at ``ts[0]``.
      ts: ``(S + 1,)`` descending times.
      remat: recompute each step's activations in the backward pass.

    Returns:
      ``(z_end, x0_hats)``: ``(B, ...)`` the state at ``ts[-1]`` and ``(S, B, ...)`` the
      prediction of each step.
    """
    ts = jnp.asarray(ts, jnp.float32)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-D grid of >= 2 times, got shape {ts.shape}")

    def step(z, ts_pair):
        t, s = ts_pair
        return ddim_step(den, z, t, s)

    if remat:
        step = jax.checkpoint(step)
    # S is small (4 in the paper): the steps are unrolled at trace time. Under lax.scan, XLA's
    # CPU backend ran this U-Net's convolutions ~10x slower (measured: 2.1 s vs 0.22 s for
    # the gradient of 4 steps on 4 examples at 32x32).
    z, x0_hats = z_T, []
    for i in range(ts.shape[0] - 1):
        z, x0 = step(z, (ts[i], ts[i + 1]))
        x0_hats.append(x0)
    return z, jnp.stack(x0_hats)


def _avg_pool(x: Array, f: int) -> Array:
    B, H, W, C = x.shape
    return x.reshape(B, H // f, f, W // f, f, C).mean(axis=(2, 4))


def multiscale_l1(a: Array, b: Array, scales: tuple[int, ...] = (1, 2, 4)) -> Array:
    """Perceptual proxy ``sum_s mean |pool_s(a) - pool_s(b)|``: L1 at full, 1/2 and 1/4
    resolution (average pooling), the slots of REFace's 3-scale LPIPS. ``(B, H, W, C)`` ->
    ``(B,)``; each scale must divide H and W."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"a and b must be (B, H, W, C) of one shape, got {a.shape}, {b.shape}")
    for f in scales:
        if f < 1 or a.shape[1] % f or a.shape[2] % f:
            raise ValueError(f"scale {f} must divide the image size {a.shape[1:3]}")
    return sum(
        jnp.mean(jnp.abs(_avg_pool(a, f) - _avg_pool(b, f)), axis=(1, 2, 3)) for f in scales
    )


def restrict(x: Array, region: Array, fill: float = -1.0) -> Array:
    """``x`` inside ``region`` (``(B, H, W, 1)``, 1 = keep) and ``fill`` elsewhere."""
    return region * x + (1.0 - region) * fill


def swap_partner(n: int) -> Array:
    """The in-batch partner of each example for the swap condition: the reversed batch
    (REFace's ``reference[::-1]``), except that an odd middle example is paired with its
    neighbour instead of itself. Needs ``n >= 2``."""
    if n < 2:
        raise ValueError(
            f"the cross-identity branch needs a batch of >= 2 examples per device, got {n} "
            "(with 1 the flip is a no-op, as in the release's batch-1 training)"
        )
    perm = jnp.arange(n)[::-1]
    if n % 2:
        mid = n // 2
        perm = perm.at[mid].set(mid - 1)
    return perm


def shuffle_masks(face_keep: Array, head_keep: Array, key: Array, head_rate: float = 0.5
                  ) -> tuple[Array, Array]:
    """REFace's mask shuffling: per example, the face-only or the face+hair (head-swap) mask.

    Args:
      face_keep, head_keep: ``(B, H, W, 1)`` keep masks (1 = kept from the target).
      key: PRNG key.
      head_rate: probability of the head mask (0 = face swap only, as in the release).

    Returns:
      ``(keep, is_head)``: ``(B, H, W, 1)`` and ``(B,)`` bool.
    """
    if face_keep.shape != head_keep.shape:
        raise ValueError(f"face_keep and head_keep shapes differ: {face_keep.shape} vs "
                         f"{head_keep.shape}")
    is_head = jax.random.bernoulli(key, head_rate, (face_keep.shape[0],))
    return jnp.where(expand_like(is_head, face_keep), head_keep, face_keep), is_head


def reface_terms(
    den: Denoiser,
    z0: Array,
    key: Array,
    *,
    swap_den: Denoiser | None = None,
    unroll_steps: int = 4,
    unroll_examples: int | None = None,
    target: Array | None = None,
    face_region: Array | None = None,
    source_identity: Array | None = None,
    identity_fn: Callable[[Array], Array] | None = None,
    decode: Callable[[Array], Array] | None = None,
    perceptual_fn: Callable[[Array, Array], Array] = multiscale_l1,
    id_weight: float = 0.3,
    perceptual_weight: float = 0.1,
    time_sampler: str = "discrete",
    remat: bool = True,
    fill: float = -1.0,
) -> ReFaceTerms:
    """The REFace objective's per-example terms (module docstring).

    Args:
      den: the inpainting denoiser, eps-prediction, with its condition bound (the clean
        ``[masked target | mask]`` channels and the context of the same photo's source).
      z0: ``(B, ...)`` the clean target (latent or pixels).
      key: PRNG key.
      swap_den: the same network under the swap condition for the unrolled branch (default
        ``den``: self-reconstruction).
      unroll_steps: ``S``; 0 = the inpainting loss only (no unrolled branch).
      unroll_examples: run the unrolled branch on the first ``k`` examples only (its cost is
        ``S`` forward and backward passes per example); their unrolled terms are weighted
        ``B / k`` so that the batch mean of the loss keeps the full-batch scale, and the other
        examples' unrolled terms are 0. None = every example.
      target: ``(B, H, W, C)`` the target image for the perceptual term (default ``decode(z0)``).
      face_region: ``(B, H, W, 1)`` 1 inside the inpainted region (pixel space): the identity
        encoder sees only these pixels of each ``x0_hat`` (the rest ``fill``).
      source_identity: ``(B, D)`` the identity embedding of the source.
      identity_fn: image ``(B, H, W, C)`` -> ``(B, D)`` identity embedding (the training
        encoder, frozen by the caller).
      decode: latent -> image (default: pixel mode, the identity).
      perceptual_fn: ``(image, target) -> (B,)``.
      id_weight, perceptual_weight: the paper's 0.3 and 0.1.
      time_sampler: the inpainting branch's time sampler (:func:`dpm.losses.sample_time`).
      remat: ``jax.checkpoint`` each unrolled step.
      fill: value of the pixels outside the face region for the identity encoder.

    Returns:
      :class:`ReFaceTerms`.
    """
    if den.prediction != "eps":
        raise ValueError(f"REFace trains an eps-prediction network, got {den.prediction!r}")
    if isinstance(unroll_steps, bool) or not isinstance(unroll_steps, int) or unroll_steps < 0:
        raise ValueError(f"unroll_steps must be an int >= 0, got {unroll_steps!r}")
    B = z0.shape[0]
    sched = den.schedule
    kt, ke = jax.random.split(key)
    t = sample_time(kt, B, sched, time_sampler)
    eps = jax.random.normal(ke, z0.shape, z0.dtype)
    # inpainting branch
    eps_hat = den.output(diffuse(sched, z0, t, eps), t)
    simple = jnp.mean(jnp.square(eps_hat - eps).reshape(B, -1), axis=1)
    zeros = jnp.zeros((B,), simple.dtype)
    if unroll_steps == 0:
        return ReFaceTerms(simple, zeros, zeros, simple, jnp.zeros((0, *z0.shape), z0.dtype))

    if identity_fn is None or source_identity is None or face_region is None:
        raise ValueError("the unrolled branch (unroll_steps > 0) needs identity_fn, "
                         "source_identity and face_region")
    decode = decode if decode is not None else (lambda z: z)
    target = target if target is not None else decode(z0)
    if face_region.shape != (*target.shape[:3], 1):
        raise ValueError(f"face_region must have shape {(*target.shape[:3], 1)}, "
                         f"got {face_region.shape}")
    k = B if unroll_examples is None else unroll_examples
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= B:
        raise ValueError(f"unroll_examples must be None or an int in [1, {B}], got "
                         f"{unroll_examples!r}")
    head = lambda a: a[:k]  # noqa: E731
    swap_den = swap_den if swap_den is not None else den
    swap_den = swap_den.with_cond(jax.tree.map(head, swap_den.cond))
    ts = unrolled_times(unroll_steps)
    z_T = diffuse(sched, z0[:k], jnp.full((k,), ts[0]), eps[:k])  # the same eps
    _, x0_hats = ddim_unroll(swap_den, z_T, ts, remat=remat)
    images = jax.vmap(decode)(x0_hats)  # (S, k, H, W, C)
    target, face_region = target[:k], face_region[:k]
    src = source_identity[:k]

    def per_step(img):
        e = identity_fn(restrict(img, face_region, fill))
        return cosine_distance(e, src), perceptual_fn(img, target)

    id_k, perc_k = jax.vmap(per_step)(images)
    pad = lambda a: jnp.concatenate([a, jnp.zeros((B - k,), a.dtype)])  # noqa: E731
    identity, perceptual = pad(jnp.mean(id_k, axis=0)), pad(jnp.sum(perc_k, axis=0))
    loss = simple + (B / k) * (id_weight * identity + perceptual_weight * perceptual)
    return ReFaceTerms(simple, identity, perceptual, loss, images)
