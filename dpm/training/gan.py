"""The two-network GAN train step of DDGAN / EMDM: one iteration = a discriminator update, then a
generator update against the updated discriminator, then the EMA of the generator.

The state is the project's :class:`~dpm.training.TrainState` with ``params = {"g": ..., "d":
...}``, ``opt_state = {"g": ..., "d": ...}`` and ``ema_params`` the EMA of the generator only, so
checkpoints, resume and the experiment runners work unchanged. The losses are supplied by the
caller with the signatures

* ``d_loss_fn(d_params, g_params, batch, key, *extra, r1: bool)``,
* ``g_loss_fn(g_params, d_params, batch, key, *extra)``,

each returning ``(B,)`` per-example losses or a terms object with a ``loss`` field (a dataclass
or NamedTuple of ``(B,)`` arrays, e.g. :func:`dpm.losses.ddgan_d_loss` /
:func:`dpm.losses.ddgan_g_loss`), whose other fields are reported as metrics.

**Lazy R1** (DDGAN / EMDM: R1 every 15 steps) is two compiled steps chosen on the host by the
step index, not a branch inside ``jit``::

    g_opt, d_opt = gan_optimizers(2e-5, 1.25e-4)
    state = init_gan_state(g_params, d_params, g_opt, d_opt, jax.random.key(0))
    make = functools.partial(make_gan_step, d_loss, g_loss, d_opt, g_opt, ema_decay=0.999)
    plain, with_r1 = jit_train_step(make(r1=False)), jit_train_step(make(r1=True))
    for i, batch in enumerate(batches, start=int(state.step)):
        state, metrics = (with_r1 if i % 15 == 0 else plain)(state, batch)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dpm.training.train import TrainState, ema_update, flatten_if_uniform

__all__ = ["gan_optimizers", "init_gan_state", "make_gan_step"]

PyTree = Any


def gan_optimizers(
    lr_g: float | optax.Schedule = 2e-5,
    lr_d: float | optax.Schedule = 1.25e-4,
    *,
    b1: float = 0.5,
    b2: float = 0.9,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    flatten: bool = True,
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """DDGAN's / EMDM's optimizers: Adam with ``betas = (0.5, 0.9)`` and separate learning rates
    (EMDM: ``lr_g = 2e-5``, ``lr_d = 1.25e-4``; DDGAN CIFAR-10: ``1.6e-4``, ``1.25e-4``).

    EMDM anneals both rates by a cosine over ``num_epoch = 1e6`` epochs, i.e. keeps them
    constant in practice; pass an ``optax`` schedule for anything else.

    Args:
      lr_g, lr_d: the generator's and discriminator's learning rates (numbers or schedules).
      b1, b2, eps: Adam's moment decays and denominator offset.
      clip_norm: optional maximum global gradient norm (None: no clipping, as in DDGAN).
      flatten: run each on its network's parameters raveled into one vector
        (:func:`dpm.training.flatten_if_uniform`).

    Returns:
      ``(g_optimizer, d_optimizer)``.
    """
    for name, lr in (("lr_g", lr_g), ("lr_d", lr_d)):
        if not callable(lr) and (isinstance(lr, bool) or not isinstance(lr, int | float)
                                 or lr < 0):
            raise ValueError(f"{name} must be a number >= 0 or an optax schedule; got {lr!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None; got {clip_norm!r}")
    if not isinstance(flatten, bool):
        raise ValueError(f"flatten must be True or False; got {flatten!r}")

    def make(lr):
        adam = optax.adam(lr, b1=b1, b2=b2, eps=eps)
        if clip_norm is not None:
            adam = optax.chain(optax.clip_by_global_norm(clip_norm), adam)
        return flatten_if_uniform(adam) if flatten else adam

    return make(lr_g), make(lr_d)


def init_gan_state(
    g_params: PyTree,
    d_params: PyTree,
    g_optimizer: optax.GradientTransformation,
    d_optimizer: optax.GradientTransformation,
    key: jax.Array,
) -> TrainState:
    """A fresh GAN :class:`~dpm.training.TrainState`: step 0, ``params = {"g", "d"}``,
    ``opt_state = {"g", "d"}``, ``ema_params`` a copy of the generator's parameters.

    Args:
      g_params, d_params: the initial generator and discriminator parameters.
      g_optimizer, d_optimizer: the transformations the step will apply (``init`` only here).
      key: PRNG key of the run.
    """
    return TrainState(
        params={"g": g_params, "d": d_params},
        ema_params=jax.tree.map(jnp.copy, g_params),
        opt_state={"g": g_optimizer.init(g_params), "d": d_optimizer.init(d_params)},
        step=jnp.zeros((), jnp.int32),
        key=key,
        skipped=jnp.zeros((), jnp.int32),
    )


def _terms(out: Any, fn: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(mean loss, {name: mean})`` of a loss function's output (array or terms object)."""
    if hasattr(out, "loss"):
        fields = out._asdict() if hasattr(out, "_asdict") else {
            f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
        loss = fields.pop("loss")
    else:
        loss, fields = out, {}
    if jnp.ndim(loss) != 1:
        raise ValueError(f"{fn} must return (B,) per-example losses (or terms with a (B,) "
                         f"'loss'); got shape {jnp.shape(loss)}")
    means = {k: jnp.mean(v) for k, v in fields.items() if jnp.ndim(v) == 1}
    return jnp.mean(loss), means


def make_gan_step(
    d_loss_fn: Callable[..., Any],
    g_loss_fn: Callable[..., Any],
    d_optimizer: optax.GradientTransformation,
    g_optimizer: optax.GradientTransformation,
    *,
    ema_decay: float | Callable[[jax.Array], jax.Array] = 0.9999,
    r1: bool,
    skip_nonfinite: bool = True,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure GAN ``step(state, batch, *extra) -> (state, metrics)`` (DDGAN's
    ``train_ddgan.py`` iteration).

    One step: split ``state.key`` into the next key, the D key and the G key; D update on the
    mean of ``d_loss_fn(d, g, batch, k_d, *extra, r1=r1)`` (no gradient to G); G update on the
    mean of ``g_loss_fn(g, d_new, batch, k_g, *extra)`` against the updated D (no gradient to
    D); EMA of G with ``ema_decay``. If any loss or gradient is not finite and
    ``skip_nonfinite``, both networks, both optimizer states and the EMA stay as they were, the
    step counter still advances and ``skipped`` grows by one.

    Args:
      d_loss_fn: ``(d_params, g_params, batch, key, *extra, r1) -> (B,)`` or terms.
      g_loss_fn: ``(g_params, d_params, batch, key, *extra) -> (B,)`` or terms.
      d_optimizer, g_optimizer: the optax transformations (e.g. :func:`gan_optimizers`).
      ema_decay: constant, or a function of ``state.step`` (before the increment).
      r1: static: pass ``r1=True`` to the D loss (the lazy-R1 step).
      skip_nonfinite: skip updates whose losses or gradient norms are NaN or infinite.

    Returns:
      ``step(state, batch, *extra) -> (state, metrics)``, pure and not yet jitted (see
      :func:`~dpm.training.jit_train_step`). ``metrics``: ``loss`` (the G loss, mean over the
      batch), ``d_loss``, ``g_grad_norm``, ``d_grad_norm``, ``skipped`` (running count) and the
      batch means of the terms' other ``(B,)`` fields by name (``d_real``, ``d_fake``, ``r1``,
      ``g_adv``, ``rec``, ... with the DDGAN losses).
    """
    if not isinstance(r1, bool):
        raise TypeError(f"r1 must be a Python bool (static: one compiled step each); got {r1!r}")

    def d_objective(d_params, g_params, batch, key, extra):
        out = d_loss_fn(d_params, jax.lax.stop_gradient(g_params), batch, key, *extra, r1=r1)
        return _terms(out, "d_loss_fn")

    def g_objective(g_params, d_params, batch, key, extra):
        out = g_loss_fn(g_params, jax.lax.stop_gradient(d_params), batch, key, *extra)
        return _terms(out, "g_loss_fn")

    d_grad = jax.value_and_grad(d_objective, has_aux=True)
    g_grad = jax.value_and_grad(g_objective, has_aux=True)

    def step(state: TrainState, batch: PyTree, *extra: Any):
        if not (isinstance(state.params, dict) and set(state.params) == {"g", "d"}):
            raise ValueError("make_gan_step needs a state from init_gan_state (params = {'g', "
                             f"'d'}}); got params of type {type(state.params).__name__}")
        key, d_key, g_key = jax.random.split(state.key, 3)
        g, d = state.params["g"], state.params["d"]
        # discriminator step
        (d_loss, d_terms), d_grads = d_grad(d, g, batch, d_key, extra)
        d_updates, d_opt = d_optimizer.update(d_grads, state.opt_state["d"], d)
        d_new = optax.apply_updates(d, d_updates)
        # generator step against the updated discriminator
        (g_loss, g_terms), g_grads = g_grad(g, d_new, batch, g_key, extra)
        g_updates, g_opt = g_optimizer.update(g_grads, state.opt_state["g"], g)
        g_new = optax.apply_updates(g, g_updates)
        # EMA of the generator
        decay = ema_decay(state.step) if callable(ema_decay) else ema_decay
        ema = ema_update(state.ema_params, g_new, jnp.asarray(decay, jnp.float32))

        d_norm, g_norm = optax.tree.norm(d_grads), optax.tree.norm(g_grads)
        params, opt_state = {"g": g_new, "d": d_new}, {"g": g_opt, "d": d_opt}
        skipped = state.skipped
        if skip_nonfinite:
            ok = (jnp.isfinite(d_loss) & jnp.isfinite(d_norm) & jnp.isfinite(g_loss)
                  & jnp.isfinite(g_norm))
            keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
            params = keep_old(params, state.params)
            opt_state = keep_old(opt_state, state.opt_state)
            ema = keep_old(ema, state.ema_params)
            skipped = skipped + jnp.where(ok, 0, 1).astype(jnp.int32)

        new_state = TrainState(params=params, ema_params=ema, opt_state=opt_state,
                               step=state.step + 1, key=key, skipped=skipped)
        metrics = {**d_terms, **g_terms, "loss": g_loss, "d_loss": d_loss,
                   "g_grad_norm": g_norm, "d_grad_norm": d_norm, "skipped": skipped}
        return new_state, metrics

    return step
