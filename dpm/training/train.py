"""Train state, optimizer, parameter EMA and one pure train step.

A train step is a pure function ``train_step(state, batch, *extra) -> (state, metrics)`` of a
:class:`TrainState` (arrays only) and a batch. Every loss in the project has the signature
``loss_fn(params, batch, key, *extra) -> (B,)`` per-example losses; the step takes their mean,
differentiates, applies optax (clip by global norm, AdamW, warmup + cosine) and updates the
parameter EMA. Distillation passes the teacher's parameters through ``*extra`` (an argument, not a
closed-over constant).

Typical use::

    optimizer = make_optimizer(2e-4, total_steps=10_000, warmup_steps=500)
    state = init_train_state(params, optimizer, jax.random.key(0))
    train_step = jit_train_step(make_train_step(loss_fn, optimizer))
    for batch in batches:
        state, metrics = train_step(state, batch)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dpm.training.sharding import batch_sharding, fsdp_size, replicated, state_shardings

__all__ = [
    "LR_SCHEDULES",
    "fast_compile_options",
    "TrainState",
    "edm_ema_decay",
    "warmup_ema_decay",
    "ema_update",
    "init_train_state",
    "jit_train_step",
    "make_lr_schedule",
    "make_optimizer",
    "flatten_if_uniform",
    "make_train_step",
]

PyTree = Any
LR_SCHEDULES = ("cosine", "linear", "constant")
LossFn = Callable[..., jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a training run carries from step to step; a pytree of arrays only.

    Attributes:
      params: the trained parameters (a pytree of arrays).
      ema_params: exponential moving average of ``params`` (same structure).
      opt_state: the optax state of the optimizer that built it.
      step: int32 scalar, number of train steps taken (skipped ones included).
      key: PRNG key; split once per step, so a run is deterministic given the initial key.
      skipped: int32 scalar, number of steps whose update was skipped for a non-finite loss or
        gradient.
    """

    params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    step: jax.Array
    key: jax.Array
    skipped: jax.Array

    def replace(self, **changes: Any) -> TrainState:
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **changes)


def make_lr_schedule(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
) -> optax.Schedule:
    """Learning rate as a function of the update count: linear warmup, then cosine, linear or
    constant.

    ``eta(s) = learning_rate * s / W`` for ``s < W``; afterwards
    ``learning_rate * (1 + cos(pi * min(s - W, T - W) / (T - W))) / 2`` (cosine, reaching 0 at
    ``s = T``), ``learning_rate * (1 - min(s - W, T - W) / (T - W))`` (linear, annealed to 0 at
    ``s = T``, as in progressive distillation's rounds) or ``learning_rate`` (constant), with
    ``W = warmup_steps``, ``T = total_steps``.

    Args:
      learning_rate: peak learning rate (>= 0).
      total_steps: ``T``, the length of the run in updates (>= 1).
      warmup_steps: ``W``, the length of the linear warmup (0 <= W < T).
      schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after the warmup.

    Returns:
      An ``optax.Schedule`` ``count -> learning rate`` (built from
      ``optax.warmup_cosine_decay_schedule``, or ``optax.linear_schedule`` joined to
      ``optax.constant_schedule``), usable under ``jit``.
    """
    if not isinstance(learning_rate, int | float) or learning_rate < 0:
        raise ValueError(f"learning_rate must be a non-negative number, got {learning_rate!r}.")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}.")
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, int)
        or not 0 <= warmup_steps < total_steps
    ):
        raise ValueError(
            f"warmup_steps must be an int with 0 <= warmup_steps < total_steps={total_steps}, "
            f"got {warmup_steps!r}."
        )
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {LR_SCHEDULES}, got {schedule!r}.")
    eta, W, T = float(learning_rate), warmup_steps, total_steps
    if schedule == "cosine":
        # linear 0 -> eta over W updates, then eta (1 + cos(pi (s - W) / (T - W))) / 2
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=eta, warmup_steps=W, decay_steps=T, end_value=0.0
        )
    if schedule == "linear":
        decay = optax.linear_schedule(eta, 0.0, transition_steps=T - W)
        if W == 0:
            return decay
        return optax.join_schedules([optax.linear_schedule(0.0, eta, transition_steps=W), decay],
                                    [W])
    if W == 0:
        return optax.constant_schedule(eta)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, eta, transition_steps=W), optax.constant_schedule(eta)], [W]
    )


def _default_decay_mask(params: PyTree) -> PyTree:
    # weight decay on matrices and kernels, not on biases, norms' scales or scalars
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def flatten_if_uniform(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``optax.flatten(inner)`` when every parameter leaf has one dtype, else ``inner`` as is.

    On one vector the clip and Adam moments are a handful of operations instead of a handful
    per leaf: a 128-leaf U-Net's train step lowers to 7.3k StableHLO lines instead of 12.5k. With
    XLA's backend optimisations off (the tests' and smoke runs' fast compile) it compiles ~20 %
    faster (4.2 vs 5.2 s) and restores faster (fewer leaves); with the default options compile
    time is about the same, and the step time depends on the model: equal on REFace's inpainting
    U-Net (162 vs 159-178 ms), 10-18 % slower on the 8x8 ``tiny`` U-Net at batch 128 on this
    2-core CPU (``python -m experiments.bench_train --per-leaf`` measures both side by side).
    Pass ``flatten=False`` where that matters. The moments
    are the same numbers elementwise; the clip's global norm is summed in another order (equal
    to rounding). Mixed-dtype trees (e.g. bfloat16 and float32 leaves) keep the per-leaf path,
    which never promotes a leaf's dtype."""
    flat = optax.flatten(inner)

    def uniform(tree: PyTree) -> bool:  # one dtype (an empty tree has nothing to ravel)
        return len({jnp.result_type(x) for x in jax.tree.leaves(tree)}) == 1

    def init_fn(params):
        return (flat if uniform(params) else inner).init(params)

    def update_fn(updates, state, params=None):
        return (flat if uniform(updates) else inner).update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    learning_rate: float,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decay_mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    clip_norm: float | None = 1.0,
    flatten: bool = True,
) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with a warmup + cosine (or constant) learning rate.

    AdamW is ``optax.adamw``'s chain written out (Adam's scaling, decoupled weight decay on the
    masked leaves, the learning rate), so that the clip and Adam can run on one flat vector.

    Args:
      learning_rate: peak learning rate.
      total_steps: length of the run in updates (the cosine reaches 0 there).
      warmup_steps: length of the linear warmup from 0.
      schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` after the warmup (see
        :func:`make_lr_schedule`).
      b1, b2, eps: Adam's moment decays and denominator offset.
      weight_decay: decoupled weight decay coefficient (AdamW's ``lambda``).
      decay_mask: which parameters are decayed: a pytree of bools or a function of the params
        returning one; by default those with ``ndim >= 2``.
      clip_norm: maximum global gradient norm, or None for no clipping.
      flatten: run the clip and Adam on the parameters raveled into one vector (see
        :func:`flatten_if_uniform`); False keeps one moment array per leaf (the layout a
        parameter-sharded model needs).

    Returns:
      An ``optax.GradientTransformation``.
    """
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive or None, got {clip_norm!r}.")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
    if not isinstance(flatten, bool):
        raise ValueError(f"flatten must be True or False, got {flatten!r}.")
    lr = make_lr_schedule(
        learning_rate, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule
    )
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    if clip_norm is not None:
        adam = optax.chain(optax.clip_by_global_norm(clip_norm), adam)
    parts = [flatten_if_uniform(adam) if flatten else adam]
    if weight_decay > 0:
        mask = _default_decay_mask if decay_mask is None else decay_mask
        parts.append(optax.add_decayed_weights(weight_decay, mask))
    parts.append(optax.scale_by_learning_rate(lr))
    return optax.chain(*parts)


def ema_update(ema_params: PyTree, params: PyTree, decay: float | jax.Array) -> PyTree:
    """One step of the parameter EMA: ``ema <- decay * ema + (1 - decay) * params``.

    This is ``optax.incremental_update(params, ema_params, step_size=1 - decay)``.

    Args:
      ema_params: the running average (pytree of arrays).
      params: the current parameters (same structure).
      decay: scalar in [0, 1]; 0 copies ``params``, 1 keeps ``ema_params``.

    Returns:
      The updated average, with the dtypes of ``ema_params``.
    """

    # optax's step_size is the weight of the new value: 1 - decay
    new = optax.incremental_update(params, ema_params, step_size=1 - decay)
    return jax.tree.map(lambda n, e: n.astype(e.dtype), new, ema_params)


def warmup_ema_decay(step: jax.Array, decay: float, *, warmup: float = 10.0) -> jax.Array:
    """EMA decay with warm-up, ``min(decay, (1 + step) / (warmup + step))``.

    A constant decay keeps a weight ``decay**n`` on the initial parameters after ``n`` updates
    (22 % after 1500 steps at 0.999); the warm-up lets early averages follow the parameters.
    Use as ``make_train_step(..., ema_decay=functools.partial(warmup_ema_decay, decay=0.999))``.
    """
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (warmup + step))


def edm_ema_decay(
    step: jax.Array | int,
    batch_size: int,
    ema_halflife_kimg: float = 500.0,
    ema_rampup_ratio: float | None = 0.05,
) -> jax.Array:
    """EMA decay with a half-life in images and a ramp-up (Karras et al. 2022, EDM training loop).

    With ``n = step * batch_size`` images seen before this update, the half-life is
    ``h = min(1000 * ema_halflife_kimg, ema_rampup_ratio * n)`` images and the decay is
    ``0.5 ** (batch_size / max(h, 1e-8))``; at step 0 the decay is 0 (the EMA starts at the
    parameters).

    Args:
      step: index of the update (0 for the first), as used by ``make_train_step``.
      batch_size: global batch size.
      ema_halflife_kimg: half-life of the average in thousands of images.
      ema_rampup_ratio: half-life at most this fraction of the images seen so far; None disables
        the ramp-up.

    Returns:
      float32 scalar decay.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}.")
    halflife_nimg = jnp.asarray(ema_halflife_kimg * 1000.0, jnp.float32)
    if ema_rampup_ratio is not None:
        cur_nimg = jnp.asarray(step, jnp.float32) * batch_size
        halflife_nimg = jnp.minimum(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return jnp.float32(0.5) ** (batch_size / jnp.maximum(halflife_nimg, 1e-8))


def init_train_state(
    params: PyTree, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """A fresh :class:`TrainState`: step 0, EMA equal to (a copy of) the parameters.

    Args:
      params: the initial parameters, e.g. ``nnx.split(model, nnx.Param)[1]``.
      optimizer: the transformation the train step will apply (only its ``init`` is used here).
      key: PRNG key of the run (typed ``jax.random.key`` or raw ``uint32[2]``).

    Returns:
      The initial state.
    """
    return TrainState(
        params=params,
        # a copy, so that params and EMA never share a buffer (the step donates the state)
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        key=key,
        skipped=jnp.zeros((), jnp.int32),
    )


def _batch_size(batch: PyTree, strict: bool) -> int | None:
    """The leading size shared by all batch leaves; None (or an error if ``strict``) if none."""
    leaves = jax.tree.leaves(batch)
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) == 1 and None not in sizes:
        return sizes.pop()
    if strict:
        shapes = [jnp.shape(x) for x in leaves]
        raise ValueError(
            f"batch leaves must share one leading batch size, got leaf shapes {shapes}."
        )
    return None


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float | Callable[[jax.Array], jax.Array] = 0.9999,
    grad_accum_steps: int = 1,
    skip_nonfinite: bool = True,
    learning_rate: optax.Schedule | float | None = None,
    target_from_ema: bool = False,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Build the pure ``train_step(state, batch, *extra) -> (state, metrics)``.

    One step: split the state's key; mean of ``loss_fn(params, batch, key, *extra)`` and its
    gradient (accumulated over ``grad_accum_steps`` micro-batches with ``lax.scan``); optax update;
    EMA update with ``ema_decay``. If the loss or the gradient is not finite and
    ``skip_nonfinite``, the parameters, optimizer state and EMA stay as they were, the step counter
    still advances and ``skipped`` grows by one.

    Args:
      loss_fn: ``(params, batch, key, *extra) -> (B,)`` per-example losses.
      optimizer: the optax transformation (closed over, never stored in the state).
      ema_decay: constant decay, or a function of the update index ``state.step`` (before it is
        incremented) returning it, e.g. ``functools.partial(edm_ema_decay, batch_size=B)``.
      grad_accum_steps: number of micro-batches the batch's leading axis is split into; the
        micro-batch ``i`` holds examples ``i, i + n, i + 2n, ...`` so that a batch sharded over
        devices stays local. With a key-independent loss the result equals the full-batch step.
      skip_nonfinite: skip updates whose loss or gradient norm is NaN or infinite.
      learning_rate: the optimizer's schedule (or constant), only to report the learning rate of
        the update in ``metrics["learning_rate"]`` (evaluated at the number of applied updates,
        ``step - skipped``); omitted from the metrics when None.
      target_from_ema: pass the state's EMA parameters (before this step's update) to the loss
        as ``target_params=`` (keyword, no gradient): the target network of consistency
        distillation, ``theta- <- mu theta- + (1 - mu) theta`` with ``mu = ema_decay``.

    Returns:
      ``train_step(state, batch, *extra) -> (state, metrics)``, pure and not yet jitted (see
      :func:`jit_train_step`). ``metrics`` holds ``loss`` (mean over the batch), ``grad_norm``
      (global norm before clipping), ``skipped`` (running count) and maybe ``learning_rate``.
    """
    if (
        isinstance(grad_accum_steps, bool)
        or not isinstance(grad_accum_steps, int)
        or (grad_accum_steps < 1)
    ):
        raise ValueError(f"grad_accum_steps must be an int >= 1, got {grad_accum_steps!r}.")
    n_micro = grad_accum_steps

    def mean_loss(params, batch, key, extra):
        if target_from_ema:
            *extra, target = extra
            losses = loss_fn(params, batch, key, *extra,
                             target_params=jax.lax.stop_gradient(target))
        else:
            losses = loss_fn(params, batch, key, *extra)
        B = _batch_size(batch, strict=False)
        if jnp.ndim(losses) != 1 or (B is not None and jnp.shape(losses)[0] != B):
            raise ValueError(
                f"loss_fn must return per-example losses of shape (B,) = ({B},), got shape "
                f"{jnp.shape(losses)}."
            )
        return jnp.mean(losses)

    loss_and_grad = jax.value_and_grad(mean_loss)

    def accumulated_loss_and_grad(params, batch, key, extra):
        B = _batch_size(batch, strict=True)
        if B % n_micro != 0:
            raise ValueError(
                f"grad_accum_steps={n_micro} must divide the batch's leading size, got {B}."
            )
        # (B, ...) -> (n, B / n, ...): micro-batch i takes examples i, i + n, ...
        micro = jax.tree.map(
            lambda x: jnp.swapaxes(x.reshape(B // n_micro, n_micro, *x.shape[1:]), 0, 1), batch
        )
        keys = jax.random.split(key, n_micro)

        def body(grad_sum, xs):
            micro_batch, micro_key = xs
            loss, grads = loss_and_grad(params, micro_batch, micro_key, extra)
            return jax.tree.map(jnp.add, grad_sum, grads), loss

        zero = jax.tree.map(jnp.zeros_like, params)
        grad_sum, losses = jax.lax.scan(body, zero, (micro, keys))
        return jnp.mean(losses), jax.tree.map(lambda g: g / n_micro, grad_sum)

    def train_step(
        state: TrainState, batch: PyTree, *extra: Any
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        key, step_key = jax.random.split(state.key)
        if target_from_ema:
            extra = (*extra, state.ema_params)
        if n_micro == 1:
            loss, grads = loss_and_grad(state.params, batch, step_key, extra)
        else:
            loss, grads = accumulated_loss_and_grad(state.params, batch, step_key, extra)
        grad_norm = optax.tree.norm(grads)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = ema_decay(state.step) if callable(ema_decay) else ema_decay
        ema_params = ema_update(state.ema_params, params, jnp.asarray(decay, jnp.float32))

        skipped = state.skipped
        if skip_nonfinite:
            ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
            params = keep_old(params, state.params)
            opt_state = keep_old(opt_state, state.opt_state)
            ema_params = keep_old(ema_params, state.ema_params)
            skipped = skipped + jnp.where(ok, 0, 1).astype(jnp.int32)

        new_state = TrainState(
            params=params,
            ema_params=ema_params,
            opt_state=opt_state,
            step=state.step + 1,
            key=key,
            skipped=skipped,
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": skipped}
        if learning_rate is not None:
            applied = state.step - state.skipped
            metrics["learning_rate"] = (
                jnp.asarray(learning_rate(applied), jnp.float32)
                if callable(learning_rate)
                else jnp.float32(learning_rate)
            )
        return new_state, metrics

    return train_step


@functools.cache
def fast_compile_options() -> dict[str, Any]:
    """XLA options that compile about 3x faster for smoke runs and tests (numerics unchanged up
    to rounding; programs run slower): backend optimisations off and, where this XLA has the
    option, the CPU fusion emitters off (probed once: newer XLAs dropped the option)."""
    options: dict[str, Any] = {"xla_backend_optimization_level": 0}
    trial = {**options, "xla_cpu_use_fusion_emitters": False}
    try:
        jax.jit(lambda x: x + 1, compiler_options=trial)(jnp.zeros(()))
        return trial
    except Exception:  # noqa: BLE001 - any rejection of the option means "not available"
        return options


def _check_divisible(batch: PyTree, n_devices: int) -> None:
    for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]:
        shape = jnp.shape(x)
        if not shape or shape[0] % n_devices != 0:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)} has leading size "
                f"{shape[0] if shape else '<scalar>'}; it must be a multiple of the {n_devices} "
                "devices of the mesh."
            )


def jit_train_step(
    train_step: Callable[..., tuple[TrainState, dict[str, jax.Array]]],
    mesh: Mesh | None = None,
    *,
    donate: bool = True,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """Jit a train step, data-parallel over ``mesh`` when given, donating the input state.

    With a mesh the state, the extra arguments (e.g. teacher parameters) and the outputs are
    replicated and every batch leaf is split along its leading axis over the ``"data"`` axis
    (see ``dpm.training.sharding``); the compiler inserts the gradient all-reduce. On a mesh
    with an ``"fsdp"`` axis (``make_mesh(fsdp=N)``) the input and output state and the extra
    arguments are laid out by ``dpm.training.state_shardings`` instead (large leaves split over
    ``"fsdp"``; place the state with ``shard_state``, the extras too), the batch is split over
    all devices, the metrics are replicated, and the program is compiled on the first call for
    the state's shapes. Without a mesh it is a plain ``jax.jit``.

    Args:
      train_step: from :func:`make_train_step` (or any ``(state, batch, *extra) -> (state, m)``).
      mesh: a 1-D device mesh, a 2-D ``("data", "fsdp")`` one, or None.
      donate: donate the input state's buffers to the output (do not reuse the input state).
      compiler_options: XLA options passed to ``jax.jit`` (e.g. :func:`fast_compile_options`
        for faster compiles of smoke runs).

    Returns:
      ``step(state, batch, *extra) -> (state, metrics)``.
    """
    donate_argnums = (0,) if donate else ()

    def packed(state, batch, extra):
        return train_step(state, batch, *extra)

    if mesh is not None and fsdp_size(mesh) > 1:
        return _jit_fsdp_step(packed, mesh, donate_argnums, compiler_options)
    if mesh is None:
        jitted = jax.jit(packed, donate_argnums=donate_argnums, compiler_options=compiler_options)
    else:
        rep = replicated(mesh)
        jitted = jax.jit(
            packed,
            in_shardings=(rep, batch_sharding(mesh), rep),
            out_shardings=(rep, rep),
            donate_argnums=donate_argnums,
            compiler_options=compiler_options,
        )

    def step(state: TrainState, batch: PyTree, *extra: Any):
        if mesh is not None:
            _check_divisible(batch, mesh.size)
        return jitted(state, batch, extra)

    step.jitted = jitted
    return step


def _jit_fsdp_step(packed, mesh, donate_argnums, compiler_options):
    """``jit_train_step`` on an fsdp mesh: the state's and extras' shardings depend on their
    shapes, so the program is jitted per (structure, shapes, dtypes) of its first arguments."""
    cache: dict[Any, Any] = {}
    rep = replicated(mesh)

    def step(state: TrainState, batch: PyTree, *extra: Any):
        _check_divisible(batch, mesh.size)
        leaves, treedef = jax.tree.flatten((state, extra))
        signature = (treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves))
        if signature not in cache:
            state_s = state_shardings(state, mesh)
            cache[signature] = jax.jit(
                packed,
                in_shardings=(state_s, batch_sharding(mesh), state_shardings(extra, mesh)),
                out_shardings=(state_s, rep),
                donate_argnums=donate_argnums,
                compiler_options=compiler_options,
            )
        return cache[signature](state, batch, extra)

    return step
