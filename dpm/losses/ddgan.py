"""DDGAN / EMDM objectives (Xiao, Kreis & Vahdat, ICLR 2022; Zhou et al., ECCV 2024): the
training pairs of DDGAN's ``T``-step VP discretisation, the posterior sample, the
non-saturating GAN terms with R1, EMDM's masked geometric losses, and the discriminator's and
generator's per-example losses.

**Indices and times.** On :func:`dpm.schedules.ddgan_schedule` (a ``T``-step
:class:`~dpm.schedules.DiscreteVP`) DDGAN's index ``k = 0..T`` sits at time ``k / T``
(``k = 0``: clean data, ``alpha = 1``; ``k >= 1``: grid point ``k - 1``). A training pair is
DDGAN's ``(x_t, x_{t+1})`` for an integer ``t = index ~ U{0..T-1}``: ``x_t`` at time ``index /
T`` and ``x_{t+1}`` at ``(index + 1) / T = schedule.t_of_index(index)``. The networks get this
continuous time of ``x_{t+1}`` (the same ``t`` the sampler :func:`solvers.ddgan` passes to
``Denoiser.x0(x, t)``); a backbone conditioned on ``schedule.c_noise(t) = index`` sees exactly
DDGAN's integer ``t``.

**The networks** are callables supplied by the caller:

* generator ``G(g_params, x_tp1, t, z, cond, mask) -> x0_hat`` of the shape of ``x_tp1``;
* discriminator ``D(d_params, x_t, x_tp1, t, cond, mask) -> (B,)`` logits, each example's
  logit a function of that example only (R1 takes per-example input gradients of their sum).

``x`` is ``(B, F, ...)`` (frames second), ``mask`` ``(B, F)`` (True = real frame) or None,
``t`` ``(B,)``, ``z`` ``(B, *latent_shape)``; ``cond`` is any pytree or None. A batch is
``{"x": (B, F, ...), "mask": optional (B, F), "cond": optional}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpm.denoiser import expand_like
from dpm.schedules import DiscreteVP

Array = jax.Array

__all__ = [
    "GEOMETRIC_OPTIONS",
    "DDGANPair",
    "GeometricTerms",
    "DDGANDTerms",
    "DDGANGTerms",
    "ddgan_pair",
    "ddgan_posterior",
    "posterior_sample",
    "r1_penalty",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "geometric_loss",
    "ddgan_d_loss",
    "ddgan_g_loss",
]

GEOMETRIC_OPTIONS = (
    "rec_weight",
    "vel_weight",
    "vel_features",
    "pos_weight",
    "joint_vel_weight",
    "foot_weight",
    "feet",
    "foot_threshold",
)


def _check_schedule(schedule: Any) -> DiscreteVP:
    if not isinstance(schedule, DiscreteVP):
        raise TypeError(
            "DDGAN losses need the T-step dpm.DiscreteVP of dpm.ddgan_schedule; got "
            f"{type(schedule).__name__}"
        )
    return schedule


def _check_x(x: Any, name: str) -> None:
    if not hasattr(x, "shape") or jnp.ndim(x) < 1:
        raise ValueError(f"{name} must be an array of shape (B, ...); got {x!r:.80}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(f"{name} must be a floating-point array; got dtype {jnp.result_type(x)}")


def _check_index(index: Any, B: int, T: int) -> Array:
    index = jnp.asarray(index)
    if index.shape != (B,) or not jnp.issubdtype(index.dtype, jnp.integer):
        raise ValueError(
            f"index must be a (B,) = ({B},) integer array of DDGAN steps in 0..{T - 1}; got "
            f"shape {index.shape}, dtype {index.dtype}"
        )
    if not isinstance(index, jax.core.Tracer) and (index.min() < 0 or index.max() >= T):
        raise ValueError(
            f"index must lie in 0..T-1 = 0..{T - 1}; got values in [{int(index.min())}, "
            f"{int(index.max())}]"
        )
    return index


def _require_key(key: Any, fn: str) -> Array:
    if key is None:
        raise ValueError(f"{fn} is stochastic and needs a PRNG key: pass key=jax.random.key(0)")
    return key


# --------------------------------------------------------------------------------------------
# The forward pair and the posterior
# --------------------------------------------------------------------------------------------


class DDGANPair(NamedTuple):
    """A DDGAN training pair (``q_sample_pairs``).

    Attributes:
      t: ``(B,)`` the networks' time, that of ``x_tp1``: ``(index + 1) / T`` for DDGAN's
        integer ``t = index`` in ``0..T-1`` (``schedule.c_noise(t) = index``).
      x_t: ``(B, ...)`` ``x_t ~ q(x_t | x0)`` at time ``index / T`` (``x0`` itself at 0).
      x_tp1: ``(B, ...)`` ``x_{t+1} = sqrt(1 - beta_{t+1}) x_t + sqrt(beta_{t+1}) eps'``.
    """

    t: Array
    x_t: Array
    x_tp1: Array


def _index_of_t(t: Any, B: int, T: int) -> Array:
    """DDGAN's integer step ``index = t T - 1`` of the networks' times ``t`` ((B,) or scalar),
    checked to be grid times ``1/T, ..., 1`` when concrete."""
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != B):
        raise ValueError(f"t must be a scalar or (B,) = ({B},) times; got shape {t.shape}")
    u = t * T
    if not isinstance(t, jax.core.Tracer):
        a = np.asarray(u, np.float64)
        if np.any(np.abs(a - np.round(a)) > 1e-3) or np.any(a < 0.5) or np.any(a > T + 0.5):
            raise ValueError(
                f"t must be the time of x_tp1 on the T = {T} grid, (index + 1) / T in "
                f"{{1/T, ..., 1}}; got values in [{np.min(t):.6g}, {np.max(t):.6g}]"
            )
    return jnp.broadcast_to(jnp.round(u).astype(jnp.int32) - 1, (B,))


def ddgan_pair(
    schedule: DiscreteVP, x0: Array, key: Array, index: Array | None = None
) -> DDGANPair:
    """DDGAN's training pair (``q_sample_pairs``, spec 3.4): ``t ~ U{0..T-1}``, ``x_t ~ q(x_t |
    x0)`` with the cumulative coefficients, then one forward step to ``x_{t+1}``.

    ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps`` with ``alpha_bar_0 = 1``: at
    ``t = 0`` this is ``x0`` exactly, as in DDGAN's float32 code, where the dummy ``beta_0 =
    1e-8`` rounds away in ``sqrt(1 - beta_0)`` (so ``sigmas_cum[0] = 0``). Then ``x_{t+1}`` has
    the marginal ``q(x_{t+1} | x0)`` of the grid.

    Args:
      schedule: :func:`dpm.ddgan_schedule` (any :class:`~dpm.schedules.DiscreteVP`).
      x0: ``(B, ...)`` clean data.
      key: PRNG key.
      index: optional ``(B,)`` integer steps (drawn uniformly in ``0..T-1`` when None).

    Returns:
      :class:`DDGANPair` ``(t, x_t, x_tp1)``; ``t`` is the networks' time of ``x_tp1``,
      ``schedule.t_of_index(index)``.
    """
    sched = _check_schedule(schedule)
    _check_x(x0, "x0")
    key = _require_key(key, "ddgan_pair")
    B, T = x0.shape[0], sched.num_steps
    k_t, k_eps, k_eps1 = jax.random.split(key, 3)
    if index is None:
        index = jax.random.randint(k_t, (B,), 0, T)
    index = _check_index(index, B, T).astype(jnp.int32)
    dt = x0.dtype
    log_a = jnp.asarray(sched.log_alpha_grid)[index]  # log sqrt(alpha_bar) at DDGAN index t
    a_cum = expand_like(jnp.exp(log_a), x0).astype(dt)
    s_cum = expand_like(jnp.sqrt(-jnp.expm1(2.0 * log_a)), x0).astype(dt)
    beta = expand_like(jnp.asarray(sched.betas)[index], x0)  # beta_{t+1}
    x_t = a_cum * x0 + s_cum * jax.random.normal(k_eps, x0.shape, dt)  # q_sample
    noise = jax.random.normal(k_eps1, x0.shape, dt)
    x_tp1 = jnp.sqrt(1.0 - beta).astype(dt) * x_t + jnp.sqrt(beta).astype(dt) * noise
    t = sched.t_of_index(index.astype(jnp.result_type(float)))
    return DDGANPair(t, x_t, x_tp1)


def ddgan_posterior(schedule: DiscreteVP) -> tuple[Array, Array, Array]:
    """DDGAN's ``Posterior_Coefficients``: ``q(x_t | x_{t+1}, x0) = N(coef1[t] x0 + coef2[t]
    x_{t+1}, var[t])`` for ``t = 0..T-1``.

    With ``beta = betas`` (DDGAN's ``betas[1:]``), ``abar = cumprod(1 - beta)`` and ``abar_prev
    = (1, abar[:-1])``: ``coef1 = beta sqrt(abar_prev) / (1 - abar)``, ``coef2 = (1 - abar_prev)
    sqrt(1 - beta) / (1 - abar)``, ``var = beta (1 - abar_prev) / (1 - abar)`` (0 at ``t = 0``).

    Returns:
      ``(coef1, coef2, var)``, each ``(T,)``.
    """
    sched = _check_schedule(schedule)
    beta = jnp.asarray(sched.betas)
    log_a = jnp.asarray(sched.log_alpha_grid)  # (T + 1,): log sqrt(alpha_bar), 0 first
    abar_prev = jnp.exp(2.0 * log_a[:-1])
    one_m_abar = -jnp.expm1(2.0 * log_a[1:])
    one_m_abar_prev = -jnp.expm1(2.0 * log_a[:-1])
    coef1 = beta * jnp.sqrt(abar_prev) / one_m_abar
    coef2 = one_m_abar_prev * jnp.sqrt(1.0 - beta) / one_m_abar
    var = beta * one_m_abar_prev / one_m_abar
    return coef1, coef2, var


def posterior_sample(
    schedule: DiscreteVP, x0_hat: Array, x_tp1: Array, t: Array, key: Array
) -> Array:
    """A draw of ``x_t ~ q(x_t | x_{t+1}, x0_hat)`` (DDGAN's ``sample_posterior``); no noise
    where DDGAN's step is 0 (``x_t`` is the clean end: the draw is ``x0_hat``).

    Args:
      schedule: the DDGAN schedule.
      x0_hat: ``(B, ...)`` the generator's prediction.
      x_tp1: ``(B, ...)`` the state at time ``t``.
      t: ``(B,)`` (or scalar) the networks' time of ``x_tp1``, ``(index + 1) / T``
        (:attr:`DDGANPair.t`); the draw is at ``index / T``.
      key: PRNG key.

    Returns:
      ``x_t``, ``(B, ...)`` in the dtype of ``x_tp1``.
    """
    sched = _check_schedule(schedule)
    _check_x(x_tp1, "x_tp1")
    if jnp.shape(x0_hat) != x_tp1.shape:
        raise ValueError(
            f"x0_hat must have the shape of x_tp1 {x_tp1.shape}; got {jnp.shape(x0_hat)}"
        )
    key = _require_key(key, "posterior_sample")
    index = _index_of_t(t, x_tp1.shape[0], sched.num_steps)
    coef1, coef2, var = ddgan_posterior(sched)
    f = lambda c: expand_like(c[index], x_tp1).astype(x_tp1.dtype)
    mean = f(coef1) * x0_hat + f(coef2) * x_tp1
    std = f(jnp.sqrt(var)) * expand_like(index > 0, x_tp1)  # var[0] = 0 already
    return mean + std * jax.random.normal(key, x_tp1.shape, x_tp1.dtype)


# --------------------------------------------------------------------------------------------
# GAN terms
# --------------------------------------------------------------------------------------------


def _logits_and_r1(d_fn: Callable[[Array], Array], x: Array, gamma) -> tuple[Array, Array]:
    """``(D(x), gamma / 2 ||grad_x D(x)||^2)`` per example, with one forward pass."""
    d, vjp = jax.vjp(d_fn, x)
    if d.shape != (x.shape[0],):
        raise ValueError(f"the discriminator must return (B,) = ({x.shape[0]},) logits; got "
                         f"shape {d.shape}")
    (g,) = vjp(jnp.ones_like(d))  # per-example input gradients (examples do not interact)
    return d, 0.5 * gamma * jnp.sum(jnp.square(g).reshape(x.shape[0], -1), axis=1)


def r1_penalty(d_fn: Callable[[Array], Array], x_real: Array, *, gamma: float = 0.02) -> Array:
    """R1 (Mescheder et al. 2018) as in DDGAN: ``gamma / 2 ||grad_x D(x_real)||^2`` per example.

    DDGAN applies it every ``lazy_reg`` steps without rescaling by the interval; so does
    :func:`ddgan_d_loss` with ``r1=True``.

    Args:
      d_fn: ``x -> (B,)`` logits, each example's a function of that example only.
      x_real: ``(B, ...)`` the real samples (DDGAN: the real ``x_t`` of the pair).
      gamma: the R1 weight (0.02 in DDGAN's CIFAR-10 and EMDM).

    Returns:
      ``(B,)`` penalties (differentiable in the discriminator's parameters).
    """
    _check_x(x_real, "x_real")
    return _logits_and_r1(d_fn, x_real, gamma)[1]


def nonsaturating_d_loss(d_real: Array, d_fake: Array) -> Array:
    """The discriminator's non-saturating loss ``softplus(-D(real)) + softplus(D(fake))``."""
    return jax.nn.softplus(-d_real) + jax.nn.softplus(d_fake)


def nonsaturating_g_loss(d_fake: Array) -> Array:
    """The generator's non-saturating loss ``softplus(-D(fake))``."""
    return jax.nn.softplus(-d_fake)


# --------------------------------------------------------------------------------------------
# Geometric losses
# --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GeometricTerms:
    """EMDM's masked geometric terms (spec 3.8), each ``(B,)``; zeros where not computed.

    Attributes:
      rec: ``L_rec``, mean squared feature error over real frames.
      vel: ``L_vel``, mean squared error of the features' frame differences over real pairs.
      pos: ``L_pos`` on the joints (needs ``joints_fn``).
      vel_xyz: ``L_velxyz`` on the joints' frame differences.
      foot: ``L_foot``, the predicted foot joints' frame differences on ground-truth contact.
      loss: the weighted total.
    """

    rec: Array
    vel: Array
    pos: Array
    vel_xyz: Array
    foot: Array
    loss: Array


def _masked_mean(err: Array, w: Array, n_entries) -> Array:
    """``(B,)`` ``sum(err * w) / (sum_frames(w) * n_entries)``: the mean over real frames (or
    pairs) of ``err (B, F, ...)`` with ``n_entries`` entries per frame; ``w`` ``(B, F)``."""
    e = jnp.sum(err.reshape(err.shape[0], err.shape[1], -1), axis=-1)
    return jnp.sum(e * w, axis=1) / (jnp.maximum(jnp.sum(w, axis=1), 1.0) * n_entries)


def geometric_loss(
    x0_hat: Array,
    x0: Array,
    mask: Array | None = None,
    *,
    rec_weight: float = 100.0,
    vel_weight: float = 0.0,
    vel_features: Array | None = None,
    joints_fn: Callable[[Array], Array] | None = None,
    pos_weight: float = 0.0,
    joint_vel_weight: float = 0.0,
    foot_weight: float = 0.0,
    feet: tuple[int, ...] | None = None,
    foot_threshold: float = 0.01,
) -> GeometricTerms:
    """EMDM's geometric losses on the predicted ``x0`` (MDM's ``training_losses``), masked.

    Means are over real frames (``mask``) and, for differences, real pairs (both frames real):

    * ``L_rec = mean ||x0_hat - x0||^2`` on the features (``rec_weight``: 100 for t2m, 1 a2m);
    * ``L_vel = mean ||dx0_hat - dx0||^2`` on frame differences ``d`` of the features selected
      by ``vel_features`` (all by default; MDM's a2m drops the root-translation row);
    * with ``joints_fn`` (features -> joints ``(B, F, J, 3)``, differentiable; FK of rot6d):
      ``L_pos`` on ``P``, ``L_velxyz`` on ``dP``, and ``L_foot = mean ||dP_feet(x0_hat) *
      1[||dP_feet(x0)|| <= foot_threshold]||^2`` on the joints ``feet`` (MDM: SMPL 7, 8, 10,
      11), averaged over all feet coordinates of the real pairs.

    Padded frames change no term. Weights are Python numbers (0 drops a term).

    Args:
      x0_hat: ``(B, F, ...)`` the prediction.
      x0: ``(B, F, ...)`` the data (no gradient is taken through it).
      mask: ``(B, F)`` bool, True on real frames; None: all real.
      rec_weight, vel_weight, pos_weight, joint_vel_weight, foot_weight: the ``lambda``'s.
      vel_features: optional 0/1 weights broadcastable to ``x0.shape[2:]`` choosing the
        features of ``L_vel``.
      joints_fn: features ``(B, F, ...)`` -> joints ``(B, F, J, 3)``, or None.
      feet: indices of the foot joints (needed when ``foot_weight > 0``).
      foot_threshold: the contact threshold on the ground truth's per-frame displacement.

    Returns:
      :class:`GeometricTerms`.
    """
    _check_x(x0, "x0")
    if x0.ndim < 2:
        raise ValueError(f"x0 must be (B, F, ...) with a frame axis; got shape {x0.shape}")
    if jnp.shape(x0_hat) != x0.shape:
        raise ValueError(f"x0_hat must have the shape of x0 {x0.shape}; got {jnp.shape(x0_hat)}")
    B, F = x0.shape[:2]
    if mask is None:
        mask = jnp.ones((B, F), bool)
    if jnp.shape(mask) != (B, F):
        raise ValueError(f"mask must have shape (B, F) = {(B, F)}; got {jnp.shape(mask)}")
    if joints_fn is None and (pos_weight or joint_vel_weight or foot_weight):
        raise ValueError(
            "pos_weight, joint_vel_weight and foot_weight need joints_fn (features -> joints "
            f"(B, F, J, 3)); got weights {pos_weight}, {joint_vel_weight}, {foot_weight} and "
            "joints_fn=None"
        )
    if foot_weight and feet is None:
        raise ValueError("foot_weight > 0 needs feet, the indices of the foot joints")
    dt = jnp.result_type(x0_hat, x0, jnp.float32)
    x0, x0_hat = jax.lax.stop_gradient(x0).astype(dt), x0_hat.astype(dt)
    w = mask.astype(dt)
    w_pair = w[:, 1:] * w[:, :-1]  # both frames real
    d = lambda a: a[:, 1:] - a[:, :-1]  # frame differences
    zero = jnp.zeros((B,), dt)

    n_feat = x0[0, 0].size
    rec = _masked_mean(jnp.square(x0_hat - x0), w, n_feat)
    vw = jnp.ones(x0.shape[2:], dt)
    if vel_features is not None:
        vw = jnp.broadcast_to(jnp.asarray(vel_features, dt), x0.shape[2:])
    vel = _masked_mean(jnp.square(d(x0_hat) - d(x0)) * vw, w_pair, jnp.maximum(jnp.sum(vw), 1.0))

    pos = vel_xyz = foot = zero
    if joints_fn is not None:
        P_hat, P = joints_fn(x0_hat), jax.lax.stop_gradient(joints_fn(x0))
        if P.ndim != 4 or P.shape[:2] != (B, F) or P.shape[-1] != 3 or P_hat.shape != P.shape:
            raise ValueError(
                f"joints_fn must map (B, F, ...) features to (B, F, J, 3) joints; got {P.shape}"
            )
        J = P.shape[2]
        pos = _masked_mean(jnp.square(P_hat - P), w, J * 3)
        vel_xyz = _masked_mean(jnp.square(d(P_hat) - d(P)), w_pair, J * 3)
        if feet is not None:
            feet = jnp.asarray(feet, jnp.int32)
            dP_hat, dP = d(P_hat)[:, :, feet], d(P)[:, :, feet]  # (B, F - 1, n_feet, 3)
            contact = jnp.linalg.norm(dP, axis=-1, keepdims=True) <= foot_threshold
            foot = _masked_mean(jnp.square(dP_hat * contact), w_pair, feet.shape[0] * 3)
    loss = (
        rec_weight * rec
        + vel_weight * vel
        + pos_weight * pos
        + joint_vel_weight * vel_xyz
        + foot_weight * foot
    )
    return GeometricTerms(rec=rec, vel=vel, pos=pos, vel_xyz=vel_xyz, foot=foot, loss=loss)


# --------------------------------------------------------------------------------------------
# The two per-example losses
# --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDGANDTerms:
    """The discriminator's per-example terms, each ``(B,)``.

    Attributes:
      loss: ``d_real + d_fake + r1``.
      d_real: ``softplus(-D(x_t, x_{t+1}))`` on the real pair.
      d_fake: ``softplus(D(x_t_fake, x_{t+1}))``, ``x_t_fake ~ q(x_t | x_{t+1}, G(x_{t+1}, z))``.
      r1: ``gamma / 2 ||grad_{x_t} D||^2`` on the real pair (0 when ``r1=False``).
    """

    loss: Array
    d_real: Array
    d_fake: Array
    r1: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DDGANGTerms:
    """The generator's per-example terms, each ``(B,)``.

    Attributes:
      loss: ``g_geo + adv_weight * g_adv``.
      g_adv: ``softplus(-D(x_t_fake, x_{t+1}))`` on a fresh ``(t, z)`` draw (0 when
        ``adv_weight = 0``).
      g_geo: the weighted geometric total on the first draw; its parts follow.
      rec, vel, pos, vel_xyz, foot: :class:`GeometricTerms`.
    """

    loss: Array
    g_adv: Array
    g_geo: Array
    rec: Array
    vel: Array
    pos: Array
    vel_xyz: Array
    foot: Array


def _check_latent_shape(latent_shape) -> tuple[int, ...]:
    shape = (latent_shape,) if isinstance(latent_shape, int) else latent_shape
    if not isinstance(shape, tuple | list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape
    ):
        raise ValueError(
            f"latent_shape must be a positive int or a tuple of positive ints; got "
            f"{latent_shape!r}"
        )
    return tuple(shape)


def _batch_x(batch: Any) -> Array:
    if not isinstance(batch, dict) or "x" not in batch:
        raise ValueError(
            "a DDGAN batch is a dict {'x': (B, F, ...), 'mask': optional (B, F), 'cond': "
            f"optional}}; got {type(batch).__name__}"
            + (f" with keys {sorted(batch)}" if isinstance(batch, dict) else "")
        )
    x0 = batch["x"]
    _check_x(x0, "batch['x']")
    return x0


def ddgan_d_loss(
    generator: Callable[..., Array],
    discriminator: Callable[..., Array],
    schedule: DiscreteVP,
    *,
    latent_shape: int | tuple[int, ...],
    r1_gamma: float = 0.02,
) -> Callable[..., DDGANDTerms]:
    """The discriminator's loss of one DDGAN iteration (spec 3.7, D step).

    Draw ``t`` and the real pair ``(x_t, x_{t+1})``; real term ``softplus(-D(x_t, x_{t+1}, t))``
    (plus R1 on ``x_t`` when ``r1``); draw ``z``, ``x0_hat = G(x_{t+1}, t, z)`` (no gradient to
    G), ``x_t_fake ~ q(x_t | x_{t+1}, x0_hat)``; fake term ``softplus(D(x_t_fake, x_{t+1},
    t))``.

    Args:
      generator: ``G(g_params, x_tp1, t, z, cond, mask) -> x0_hat``.
      discriminator: ``D(d_params, x_t, x_tp1, t, cond, mask) -> (B,)``.
      schedule: :func:`dpm.ddgan_schedule`.
      latent_shape: shape of one ``z`` (without the batch axis).
      r1_gamma: the R1 weight ``gamma``.

    Returns:
      ``d_loss(d_params, g_params, batch, key, *, r1=False) -> DDGANDTerms``; ``r1`` is a
      static Python bool (lazy R1: two compiled steps, see :func:`dpm.training.make_gan_step`).
    """
    sched = _check_schedule(schedule)
    latent_shape = _check_latent_shape(latent_shape)

    def d_loss(d_params, g_params, batch, key, *, r1: bool = False) -> DDGANDTerms:
        x0 = _batch_x(batch)
        key = _require_key(key, "ddgan_d_loss")
        cond, mask = batch.get("cond"), batch.get("mask")
        k_pair, k_z, k_post = jax.random.split(key, 3)
        pair = ddgan_pair(sched, x0, k_pair)
        D = lambda x_t: discriminator(d_params, x_t, pair.x_tp1, pair.t, cond, mask)
        if r1:  # real term with R1 on x_t
            d_real, pen = _logits_and_r1(D, pair.x_t, r1_gamma)
        else:
            d_real, pen = D(pair.x_t), jnp.zeros((x0.shape[0],), jnp.float32)
        z = jax.random.normal(k_z, (x0.shape[0], *latent_shape), x0.dtype)
        x0_hat = generator(jax.lax.stop_gradient(g_params), pair.x_tp1, pair.t, z, cond, mask)
        x_fake = jax.lax.stop_gradient(posterior_sample(sched, x0_hat, pair.x_tp1, pair.t, k_post))
        d_fake = D(x_fake)
        real, fake = jax.nn.softplus(-d_real), jax.nn.softplus(d_fake)
        return DDGANDTerms(loss=real + fake + pen, d_real=real, d_fake=fake, r1=pen)

    return d_loss


def ddgan_g_loss(
    generator: Callable[..., Array],
    discriminator: Callable[..., Array],
    schedule: DiscreteVP,
    *,
    latent_shape: int | tuple[int, ...],
    adv_weight: float = 1.0,
    joints_fn: Callable[[Array], Array] | None = None,
    **geometric_options: Any,
) -> Callable[..., DDGANGTerms]:
    """The generator's loss of one DDGAN / EMDM iteration (spec 3.7, G step): the geometric
    term on one ``(t, z)`` draw plus ``adv_weight`` times the adversarial term on a fresh one
    (EMDM's two backward passes before one optimizer step = the gradient of the sum).

    Geometric: ``x0_hat = G(x_{t+1}, t, z)``, :func:`geometric_loss` ``(x0_hat, x0, mask)``.
    Adversarial: a new pair and ``z``, ``x_t_fake ~ q(x_t | x_{t+1}, G(x_{t+1}, t, z))``,
    ``softplus(-D(x_t_fake, x_{t+1}, t))`` (no gradient to D). ``adv_weight = 0`` (static) is
    EMDM-noGAN: reconstruction only, D is never evaluated (``d_params`` may be None, so
    ``lambda p, batch, key: g_loss(p, None, batch, key).loss`` is a plain
    :func:`dpm.training.make_train_step` loss).

    Args:
      generator: ``G(g_params, x_tp1, t, z, cond, mask) -> x0_hat``.
      discriminator: ``D(d_params, x_t, x_tp1, t, cond, mask) -> (B,)``.
      schedule: :func:`dpm.ddgan_schedule`.
      latent_shape: shape of one ``z`` (without the batch axis).
      adv_weight: weight of the adversarial term (a Python number).
      joints_fn: features -> joints ``(B, F, J, 3)`` for the joint terms, or None.
      **geometric_options: :func:`geometric_loss`'s options (:data:`GEOMETRIC_OPTIONS`:
        ``rec_weight`` (default 100, t2m), ``vel_weight``, ``vel_features``, ``pos_weight``,
        ``joint_vel_weight``, ``foot_weight``, ``feet``, ``foot_threshold``).

    Returns:
      ``g_loss(g_params, d_params, batch, key) -> DDGANGTerms``.
    """
    sched = _check_schedule(schedule)
    latent_shape = _check_latent_shape(latent_shape)
    unknown = sorted(set(geometric_options) - set(GEOMETRIC_OPTIONS))
    if unknown:
        raise TypeError(
            f"ddgan_g_loss got unknown geometric options {unknown}; expected some of "
            f"{GEOMETRIC_OPTIONS}"
        )
    if isinstance(adv_weight, bool) or not isinstance(adv_weight, int | float) or adv_weight < 0:
        raise ValueError(f"adv_weight must be a number >= 0; got {adv_weight!r}")

    def g_loss(g_params, d_params, batch, key) -> DDGANGTerms:
        x0 = _batch_x(batch)
        key = _require_key(key, "ddgan_g_loss")
        cond, mask = batch.get("cond"), batch.get("mask")
        B = x0.shape[0]
        k_geo, k_adv = jax.random.split(key)
        # geometric term on one (t, z) draw
        k_pair, k_z = jax.random.split(k_geo)
        pair = ddgan_pair(sched, x0, k_pair)
        z = jax.random.normal(k_z, (B, *latent_shape), x0.dtype)
        x0_hat = generator(g_params, pair.x_tp1, pair.t, z, cond, mask)
        geo = geometric_loss(x0_hat, x0, mask, joints_fn=joints_fn, **geometric_options)
        # adversarial term on a fresh (t, z) draw
        adv = jnp.zeros((B,), jnp.float32)
        if adv_weight:
            k_pair, k_z, k_post = jax.random.split(k_adv, 3)
            pair = ddgan_pair(sched, x0, k_pair)
            z = jax.random.normal(k_z, (B, *latent_shape), x0.dtype)
            x0_hat = generator(g_params, pair.x_tp1, pair.t, z, cond, mask)
            x_fake = posterior_sample(sched, x0_hat, pair.x_tp1, pair.t, k_post)
            d_fake = discriminator(jax.lax.stop_gradient(d_params), x_fake, pair.x_tp1, pair.t,
                                   cond, mask)
            adv = nonsaturating_g_loss(d_fake)
        return DDGANGTerms(
            loss=geo.loss + adv_weight * adv,
            g_adv=adv,
            g_geo=geo.loss,
            rec=geo.rec,
            vel=geo.vel,
            pos=geo.pos,
            vel_xyz=geo.vel_xyz,
            foot=geo.foot,
        )

    return g_loss
