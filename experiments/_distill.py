"""The halving driver of progressive distillation (Salimans & Ho, ICLR 2022): N -> N/2 -> ... .

Each round trains a student initialised from its teacher (the previous round's student, or the
base model) so that one of its DDIM steps does two of the teacher's, with the paper's recipe: a
fresh Adam optimiser, the learning rate annealed linearly to 0 within the round, no warm-up, no
weight decay, gradients clipped to global norm 1, no EMA (the student *is* its parameters).

Every round is a :func:`experiments._runner.fit` run in ``workdir/round_<r>_<N>``: atomic
checkpoints, resumable mid-round, a progress bar naming the round, metrics in JSON lines. All
rounds share one train step, and the number of student steps and the teacher's parameters are
its arguments, so the cascade compiles once. ProDiff's distillation reuses this driver.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from dpm.data import BatchIterator
from dpm.training import init_train_state, make_optimizer, make_train_step
from experiments._runner import fit

__all__ = ["halving_schedule", "distillation_step", "progressive_distillation"]


def halving_schedule(start_steps: int, end_steps: int = 1) -> list[tuple[int, int]]:
    """``[(teacher_steps, student_steps), ...]`` from ``start_steps`` halving to
    ``end_steps``; both must be powers of two with ``end_steps < start_steps``."""
    for name, v in (("start_steps", start_steps), ("end_steps", end_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 1; got {v!r}")
    if not end_steps < start_steps:
        raise ValueError(f"end_steps must be < start_steps; got end_steps={end_steps}, "
                         f"start_steps={start_steps}")
    out, n = [], start_steps
    while n > end_steps:
        out.append((n, n // 2))
        n //= 2
    return out


def distillation_step(loss_fn: Callable[..., jax.Array], steps_per_round: int, *,
                      learning_rate: float, clip_norm: float | None = 1.0,
                      warmup_steps: int = 0):
    """``(train_step, optimizer)`` of one round, the same for every round: Adam, learning rate
    annealed linearly to 0 over ``steps_per_round``, no weight decay, no EMA.

    ``loss_fn(params, batch, key, teacher_params, student_steps) -> (B,)``, e.g.
    :func:`dpm.losses.progressive_distillation_loss`.
    """
    opt = make_optimizer(learning_rate, total_steps=steps_per_round, schedule="linear",
                         warmup_steps=warmup_steps, weight_decay=0.0, clip_norm=clip_norm)
    return make_train_step(loss_fn, opt, ema_decay=0.0), opt


def progressive_distillation(
    train_step,
    optimizer,
    teacher_params: Any,
    make_iterator: Callable[[int], BatchIterator],
    workdir: str,
    *,
    start_steps: int,
    end_steps: int = 1,
    steps_per_round: int,
    seed: int = 0,
    ckpt_config: dict[str, Any],
    ckpt_every: int | None = None,
    fast_compile: bool = False,
    progress: bool = True,
    label: str = "distill",
    on_round: Callable[[int, Any], None] | None = None,
    mesh=None,
) -> dict[int, Any]:
    """Runs (or resumes) the cascade ``start_steps -> ... -> end_steps``.

    Args:
      train_step, optimizer: from :func:`distillation_step` (one for all rounds).
      teacher_params: the base model's parameters (its EMA, as in the paper); not consumed.
      make_iterator: ``round -> BatchIterator``, a fresh iterator per round (its position is
        checkpointed with the round).
      workdir: the cascade's directory; round ``r`` lives in ``round_<r>_<student_steps>``.
      start_steps: the base model's number of DDIM steps (a power of two).
      end_steps: the last student's.
      steps_per_round: updates per halving.
      seed: PRNG seed; round ``r``'s key is ``fold_in(key(seed), r)``.
      ckpt_config: what must match to resume (stored with each checkpoint; the round and its
        step counts are added).
      ckpt_every: checkpoint period within a round (default: once, at its end).
      fast_compile: XLA backend optimisations off (smoke runs).
      progress: progress bars.
      label: prefix of the progress bars.
      on_round: ``(student_steps, params) -> None`` called after each round.
      mesh: device mesh (all devices by default).

    Returns:
      ``{student_steps: params}`` for every round (host arrays).
    """
    rounds = halving_schedule(start_steps, end_steps)
    if isinstance(steps_per_round, bool) or not isinstance(steps_per_round, int) or (
            steps_per_round < 1):
        raise ValueError(f"steps_per_round must be an int >= 1; got {steps_per_round!r}")
    teacher = jax.device_get(teacher_params)
    students = {}
    for r, (n_teacher, n_student) in enumerate(rounds):
        # the student starts as a copy of its teacher (a copy: the step donates its state)
        state = init_train_state(jax.tree.map(jnp.array, teacher), optimizer,
                                 jax.random.fold_in(jax.random.key(seed), r))
        state, _ = fit(
            train_step, state, make_iterator(r), os.path.join(workdir, f"round_{r}_{n_student}"),
            steps=steps_per_round,
            ckpt_config={**ckpt_config, "round": r, "teacher_steps": n_teacher,
                         "student_steps": n_student, "steps_per_round": steps_per_round},
            ckpt_every=ckpt_every or steps_per_round,
            log_every=max(1, min(50, steps_per_round // 4)),
            extra=(teacher, jnp.asarray(n_student, jnp.int32)),
            fast_compile=fast_compile, progress=progress,
            label=f"{label} round {r + 1}/{len(rounds)}: {n_teacher}->{n_student} steps",
            mesh=mesh)
        teacher = jax.device_get(state.params)
        students[n_student] = teacher
        if on_round is not None:
            on_round(n_student, teacher)
    return students
