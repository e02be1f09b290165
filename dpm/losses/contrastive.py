"""The symmetric contrastive (InfoNCE) loss of CLIP, per example, with multi-positive targets.

For a batch of B image-caption pairs with unit embeddings ``u_i`` (images) and ``v_j``
(captions) and a logit scale ``s``, the logits are ``l_ij = s u_i . v_j``. Image ``i`` is
trained to pick its caption among the B captions (row ``i``) and caption ``i`` its image
(column ``i``):

    loss_i = 1/2 [ CE(softmax_j l_ij, T_i.) + CE(softmax_j l_ji, T_.i) ],

with the target ``T = I`` (CLIP). Small caption grammars repeat captions within a batch; a
repeat is then a false negative. Given ``batch["caption_id"]`` (equal ids = identical
captions), the positives of ``i`` are every ``j`` with the same id and the target is uniform
over them: ``T_ij = P_ij / sum_k P_ik`` with ``P_ij = [id_i == id_j]`` (symmetric, so rows
and columns share it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = ["clip_loss", "contrastive_logits_loss"]


def contrastive_logits_loss(logits: Array, caption_id: Array | None = None) -> Array:
    """Per-example symmetric InfoNCE of a (B, B) image-by-caption logit matrix.

    Args:
      logits: (B, B), ``logits[i, j]`` = scaled similarity of image i and caption j.
      caption_id: optional (B,) ints; equal ids mark identical captions (multi-positive
        targets). None = the diagonal targets of CLIP.

    Returns:
      (B,) float32 (float64 for float64 logits): ``0.5 * (row CE + column CE)`` of each pair.
    """
    if logits.ndim != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be a square (B, B) matrix, got shape {logits.shape}")
    b = logits.shape[0]
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    if caption_id is None:
        positives = jnp.eye(b, dtype=jnp.float32)
    else:
        caption_id = jnp.asarray(caption_id)
        if caption_id.shape != (b,) or not jnp.issubdtype(caption_id.dtype, jnp.integer):
            raise ValueError(
                f"caption_id must be (B,)=({b},) ints, got {caption_id.dtype}{caption_id.shape}"
            )
        positives = (caption_id[:, None] == caption_id[None, :]).astype(jnp.float32)
    target = positives / jnp.sum(positives, axis=1, keepdims=True)  # symmetric P: rows = cols
    row = -jnp.sum(target * jax.nn.log_softmax(logits, axis=1), axis=1)  # image -> captions
    col = -jnp.sum(target.T * jax.nn.log_softmax(logits, axis=0), axis=0)  # caption -> images
    return 0.5 * (row + col)


def clip_loss(
    apply: Callable[[Any, Array, Array], tuple[Array, Array, Array]],
) -> Callable[[Any, dict[str, Array], Array], Array]:
    """CLIP's contrastive loss with the project's signature ``loss(params, batch, key) -> (B,)``.

    Args:
      apply: ``apply(params, images, tokens) -> (img_emb (B, E), txt_emb (B, E), logit_scale
        ())`` with L2-normalised embeddings, e.g. ``lambda p, x, t: nnx.merge(graphdef, p)(x,
        t)`` for a :class:`nets.ContrastiveModel`.

    Returns:
      ``loss(params, batch, key)`` with ``batch = {"x": (B, ...), "tokens": (B, L)}`` and
      optionally ``"caption_id"`` (B,) ints for multi-positive targets (see the module
      docstring); ``key`` is unused. The loss is (B,) float32 (at least); its batch mean is
      CLIP's loss.

    Example:
      >>> loss_fn = clip_loss(lambda p, x, t: nnx.merge(graphdef, p)(x, t))
      >>> per_example = loss_fn(params, {"x": x, "tokens": tokens}, key)  # (B,)
    """

    def loss(params: Any, batch: dict[str, Array], key: Array) -> Array:
        del key
        for name in ("x", "tokens"):
            if name not in batch:
                raise ValueError(f"batch must contain {name!r}, got keys {sorted(batch)}")
        img, txt, scale = apply(params, batch["x"], batch["tokens"])
        if img.ndim != 2 or img.shape != txt.shape:
            raise ValueError(
                f"apply must return img_emb and txt_emb of the same shape (B, E), got "
                f"{img.shape} and {txt.shape}"
            )
        dtype = jnp.promote_types(jnp.result_type(img, txt), jnp.float32)
        logits = scale * jnp.einsum("ie,je->ij", img.astype(dtype), txt.astype(dtype))
        return contrastive_logits_loss(logits, batch.get("caption_id"))

    return loss
