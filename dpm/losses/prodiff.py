"""ProDiff (Huang et al., ACM MM 2022): the mel-spectrogram objectives of a few-step TTS
diffusion model and of its 2-step student.

Mels are ``(B, F, M)`` (frames, mel bins) with a frame mask ``(B, F)`` (1 = real frame); every
term here is an average over real frames only, and the diffused input is zero on padding, so a
loss does not change when the padding's content or length does.

* :func:`prodiff_teacher_loss`: the teacher's (and the directly trained baselines') objective.
  A level of the model's ``K``-step grid ``t = i / K``, ``i ~ U{1..K}``, ``z_t = alpha_t x +
  sigma_t eps``; an x0-head model is fit with ``0.5 L1 + 0.5 (1 - SSIM)`` of its ``x0`` guess
  (ProDiff's ``mel_loss: "ssim:0.5|l1:0.5"``), an eps-head model (the paper's "gradient-based"
  baseline, DiffSpeech's) with the L1 of its noise guess.
* :func:`prodiff_distillation_loss`: the student's. The target is the progressive-distillation
  ``x_til`` (:func:`dpm.losses.distillation_target`: two teacher DDIM steps ``t -> t - 1/(2N)
  -> t - 1/N``), keyed on each model's own grid of the shared schedule (the student's step
  ``t = i / N`` is the teacher's ``2 i / 2N``, same log-SNR, same network time input) rather than
  ProDiff code's shifted step labels; masked L1 on ``x0``, no SNR weighting.
* :func:`fastspeech2_variance_loss`: the conditioner's duration / pitch / uv / energy terms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpm.denoiser import Denoiser
from dpm.losses.denoising import diffuse
from dpm.losses.progressive import distillation_target, student_steps_resolver, student_times

Array = jax.Array

__all__ = [
    "masked_l1",
    "masked_ssim",
    "mel_loss",
    "prodiff_teacher_loss",
    "prodiff_distillation_loss",
    "fastspeech2_variance_loss",
    "VARIANCE_WEIGHTS",
]

# FastSpeech 2 / NATSpeech loss weights (spec: phone duration 0.1, f0 1, uv 1, energy 0.1)
VARIANCE_WEIGHTS = {"duration": 0.1, "f0": 1.0, "uv": 1.0, "energy": 0.1}


def _check_mel(x: Array, mask: Array, name: str = "x") -> None:
    if x.ndim != 3:
        raise ValueError(f"{name} must be a mel batch (B, F, M); got shape {x.shape}")
    if mask.shape != x.shape[:2]:
        raise ValueError(f"mask must have shape (B, F) = {x.shape[:2]}; got {mask.shape}")


def _masked_frame_mean(err: Array, mask: Array) -> Array:
    """``(B,)`` mean of ``err (B, F, ...)`` over the real frames (and the trailing axes)."""
    m = mask.astype(jnp.float32)
    per_frame = jnp.mean(err.reshape(err.shape[0], err.shape[1], -1), axis=-1)
    return jnp.sum(per_frame * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def masked_l1(pred: Array, target: Array, mask: Array) -> Array:
    """``(B,)`` mean absolute error over the real frames of ``(B, F, M)`` mels."""
    _check_mel(pred, mask, "pred")
    if target.shape != pred.shape:
        raise ValueError(f"target must have the shape of pred {pred.shape}; got {target.shape}")
    return _masked_frame_mean(jnp.abs(pred.astype(jnp.float32) - target), mask)


def _gaussian(win: int, sigma: float) -> np.ndarray:
    r = np.arange(win) - (win - 1) / 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def _blur_matrix(n: int, win_size: int, sigma: float) -> Array:
    """``(n, n)`` matrix of a centred Gaussian blur with zero padding: ``(T a)_i =
    sum_j g_j a_{i + j - k}``, entries outside the signal dropped."""
    g, k = _gaussian(win_size, sigma), win_size // 2
    t = sum(np.eye(n, k=j - k) * g[j] for j in range(win_size))
    return jnp.asarray(t, jnp.float32)


def masked_ssim(pred: Array, target: Array, mask: Array, *, data_range: float = 2.0,
                win_size: int = 11, sigma: float = 1.5) -> Array:
    """``(B,)`` SSIM of two mel batches seen as ``F x M`` images, averaged over real frames.

    Both mels are zeroed on padding, local statistics use a separable Gaussian window with zero
    ("same") padding at the borders (NATSpeech's mel SSIM), and the SSIM map is averaged over
    the real frames: padding content and length do not matter. Differentiable.

    Args:
      pred, target: ``(B, F, M)``.
      mask: ``(B, F)``, 1 on real frames.
      data_range: value range of the mels (``C1 = (0.01 R)^2``, ``C2 = (0.03 R)^2``).
      win_size, sigma: the Gaussian window (odd size).
    """
    _check_mel(pred, mask, "pred")
    if target.shape != pred.shape:
        raise ValueError(f"target must have the shape of pred {pred.shape}; got {target.shape}")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"win_size must be a positive odd int; got {win_size!r}")
    m = mask.astype(jnp.float32)[..., None]
    x, y = pred.astype(jnp.float32) * m, target.astype(jnp.float32) * m
    # separable Gaussian blur over frames and bins with zero padding, as two banded (Toeplitz)
    # matrices: one matmul each, ~10x faster to differentiate on CPU than shifted slices
    blur_f = _blur_matrix(pred.shape[1], win_size, sigma)
    blur_m = _blur_matrix(pred.shape[2], win_size, sigma)
    stats = jnp.einsum("fg,sbgm,mn->sbfn", blur_f, jnp.stack([x, y, x * x, y * y, x * y]),
                       blur_m, precision=jax.lax.Precision.HIGHEST)
    mx, my, exx, eyy, exy = stats
    vx, vy, cxy = exx - mx * mx, eyy - my * my, exy - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return _masked_frame_mean(s, mask)


def mel_loss(pred: Array, target: Array, mask: Array, *, l1_weight: float = 0.5,
             ssim_weight: float = 0.5, data_range: float = 2.0) -> Array:
    """ProDiff's mel reconstruction loss ``l1_weight L1 + ssim_weight (1 - SSIM)``, ``(B,)``."""
    out = l1_weight * masked_l1(pred, target, mask)
    if ssim_weight:
        out = out + ssim_weight * (1.0 - masked_ssim(pred, target, mask, data_range=data_range))
    return out


def _grid_times(key: Array, n: int, steps: int) -> Array:
    """``t = i / K`` with ``i ~ U{1..K}``: the levels a ``K``-step model is sampled on."""
    return jax.random.randint(key, (n,), 1, steps + 1).astype(jnp.float32) / steps


def _noised(den: Denoiser, batch: dict, key: Array, t: Array) -> tuple[Array, Array, Array]:
    x0, mask = batch["x"], batch["mask"]
    _check_mel(x0, mask)
    m = mask[..., None].astype(x0.dtype)
    eps = jax.random.normal(key, x0.shape, x0.dtype) * m
    z_t = diffuse(den.schedule, x0 * m, t, eps).astype(x0.dtype)  # zero on padding
    return z_t, eps, mask


def prodiff_teacher_loss(
    make_model: Callable[[Any], Denoiser],
    *,
    steps: int = 4,
    l1_weight: float = 0.5,
    ssim_weight: float = 0.5,
    data_range: float = 2.0,
) -> Callable[[Any, dict, Array], Array]:
    """The per-example objective of a ``steps``-step mel denoiser: ``loss(params, batch, key)``.

    Args:
      make_model: ``params -> Denoiser`` (prediction ``"x0"`` or ``"eps"``; condition unset).
      steps: ``K``, the number of levels of the model's grid ``t = 1/K, ..., 1`` on its
        schedule (ProDiff's teacher: 4 on the 4-entry VP-SDE table; the directly trained
        2-step baseline: 2 on the same table).
      l1_weight, ssim_weight: the x0-head mel loss (ProDiff: 0.5 and 0.5).
      data_range: value range of the mels for SSIM.

    Returns:
      ``loss(params, batch, key) -> (B,)`` with ``batch = {"x": (B, F, M) mels, "mask": (B, F),
      "cond": the model's condition}``.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}")

    def loss(params, batch, key):
        den = make_model(params).with_cond(batch.get("cond"))
        if den.prediction not in ("x0", "eps"):
            raise ValueError(f"the model must predict 'x0' or 'eps'; got {den.prediction!r}")
        kt, ke = jax.random.split(key)
        t = _grid_times(kt, batch["x"].shape[0], steps)
        z_t, eps, mask = _noised(den, batch, ke, t)
        out = den.output(z_t, t)
        if den.prediction == "eps":
            return masked_l1(out, eps, mask)
        return mel_loss(out, batch["x"], mask, l1_weight=l1_weight, ssim_weight=ssim_weight,
                        data_range=data_range)

    return loss


def prodiff_distillation_loss(
    make_student: Callable[[Any], Denoiser],
    *,
    student_steps: int | None = 2,
    make_teacher: Callable[[Any], Denoiser] | None = None,
) -> Callable[..., Array]:
    """The student's per-example objective
    ``loss(params, batch, key, teacher_params, student_steps=None)``, the signature of
    :func:`dpm.losses.progressive_distillation_loss` (so the halving driver runs it).

    Args:
      make_student: ``params -> Denoiser`` with an ``"x0"`` head (ProDiff's generator-based
        parameterization).
      student_steps: ``N``; the teacher runs ``2N`` steps on the same schedule (ProDiff: 2).
        May instead be passed to the loss (a traced int).
      make_teacher: ``params -> Denoiser`` of the teacher (default ``make_student``: the
        student is a copy of the teacher).

    Returns:
      ``loss(params, batch, key, teacher_params, student_steps=None) -> (B,)``, masked L1
      between the student's ``x0`` at ``z_t`` and the target ``x_til`` of two teacher DDIM
      steps; no gradient reaches the teacher. ``batch`` as in :func:`prodiff_teacher_loss`.
    """
    student_steps_of = student_steps_resolver(student_steps, "prodiff_distillation_loss")
    make_teacher = make_student if make_teacher is None else make_teacher

    def loss(params, batch, key, teacher_params, student_steps=None):
        N = student_steps_of(student_steps)
        cond = batch.get("cond")
        student = make_student(params).with_cond(cond)
        teacher = make_teacher(jax.lax.stop_gradient(teacher_params)).with_cond(cond)
        if student.prediction != "x0":
            raise ValueError(f"the student must predict 'x0'; got {student.prediction!r}")
        kt, ke = jax.random.split(key)
        t, s = student_times(kt, batch["x"].shape[0], N)
        z_t, _, mask = _noised(student, batch, ke, t)
        x_til, _ = distillation_target(teacher, z_t, t, s)
        return masked_l1(student.output(z_t, t), jax.lax.stop_gradient(x_til), mask)

    return loss


def fastspeech2_variance_loss(pred: dict, target: dict, *,
                              weights: dict | None = None) -> dict[str, Array]:
    """FastSpeech 2's variance-adaptor losses, ``{name: (B,)}`` plus ``"total"``.

    Args:
      pred: ``log_duration (B, P)`` (predicts ``log(d + 1)``), ``log_f0 (B, F)``,
        ``uv_logit (B, F)``, ``energy (B, F)``.
      target: ``durations (B, P)``, ``phone_mask (B, P)``, ``log_f0 (B, F)`` (continuous,
        normalised), ``uv (B, F)`` (1 = unvoiced), ``energy (B, F)``, ``frame_mask (B, F)``.
      weights: per-term weights (default :data:`VARIANCE_WEIGHTS`).

    Returns:
      Masked MSE of log durations (real phonemes), L1 of log-F0 on voiced real frames, the
      binary cross-entropy of the uv flag and the MSE of energy on real frames, and their
      weighted sum ``"total"``.
    """
    w = dict(VARIANCE_WEIGHTS, **(weights or {}))
    unknown = set(w) - set(VARIANCE_WEIGHTS)
    if unknown:
        raise ValueError(f"weights has unknown terms {sorted(unknown)}; "
                         f"expected some of {sorted(VARIANCE_WEIGHTS)}")
    pred = {k: jnp.asarray(v, jnp.float32) for k, v in pred.items()}
    target = {k: jnp.asarray(v, jnp.float32) for k, v in target.items()}
    pm, fm = target["phone_mask"], target["frame_mask"]

    def mean(v, m):
        return jnp.sum(v * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)

    log_d = jnp.log1p(target["durations"])
    voiced = fm * (1.0 - target["uv"])
    out = {
        "duration": mean(jnp.square(pred["log_duration"] - log_d), pm),
        "f0": mean(jnp.abs(pred["log_f0"] - target["log_f0"]), voiced),
        "uv": mean(optax.sigmoid_binary_cross_entropy(
            pred["uv_logit"], target["uv"]), fm),
        "energy": mean(jnp.square(pred["energy"] - target["energy"]), fm),
    }
    out["total"] = sum(w[k] * out[k] for k in VARIANCE_WEIGHTS)
    return out
