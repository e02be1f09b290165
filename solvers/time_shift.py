"""Time-Shift Sampler (Li et al., ICLR 2024, "Alleviating Exposure Bias in Diffusion Models
through Sampling with Shifted Time Steps").

Exposure bias: during sampling the state ``x_t`` drifts from the forward-process marginal at
``t``. TS-DPM repairs this at sampling time, with no retraining and no extra network
evaluation: in a window of training indices around the next time step it picks, per sample,
the index ``tau`` whose forward-process noise variance ``Gamma(tau) = 1 - alpha_bar_tau``
(``sigma(tau)^2``) is closest to the empirical variance of a tensor of the state, and uses
``tau`` in place of the next time, above a cutoff time ``t_c`` only.

The rule (:func:`select_shifted_time`) is written once; each base sampler applies it at the
integration point of the official code (``ddpm``, ``ddim``, ``pndm``: variance of the current
state, the shifted time is the *target* of the current step only; ``dpm_solver`` multistep:
variance of the last model output, the shifted time replaces the whole next time point). See
each sampler's docstring. :func:`time_shift` turns a base sampler into its TS version.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpm.pytree import device_cached_dataclass
from dpm.schedules import DiscreteVP, Schedule

Array = jax.Array

__all__ = ["TimeShift", "time_shift", "select_shifted_time", "sample_variance"]


@device_cached_dataclass
@dataclasses.dataclass(frozen=True)
class TimeShift:
    """Options of the Time-Shift Sampler.

    Attributes:
      window: window size ``w`` in training-index units; candidates are ``c - w // 2 .. c + w // 2``
        around the centre index ``c`` (static: it sets the window's shape). 0 disables shifting.
      cutoff: cutoff time ``t_c`` in ``[0, 1]``; a step shifts only while its centre index is
        strictly above the cutoff's index (the official ``t > t_c``).
    """

    window: int = dataclasses.field(default=0, metadata=dict(static=True))
    cutoff: float = 0.3

    def __post_init__(self):
        if not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"window must be a non-negative int; got {self.window!r}")
        c = self.cutoff  # checked when concrete (a traced cutoff is the caller's to check)
        concrete = isinstance(c, int | float | np.ndarray | np.generic) or (
            isinstance(c, jax.Array) and not isinstance(c, jax.core.Tracer))
        if concrete and not isinstance(c, bool) and np.ndim(c) == 0 and not (
                np.isfinite(float(c)) and 0.0 <= float(c) <= 1.0):
            raise ValueError(f"cutoff must be a time in [0, 1]; got {c!r}")


def _index_grid(schedule: Schedule) -> int:
    # Discrete schedules shift on their own training grid; continuous ones on a 1000-point grid.
    return schedule.num_steps if isinstance(schedule, DiscreteVP) else 1000


def sample_variance(x: Array) -> Array:
    """Per-example unbiased (ddof = 1) variance over all non-batch entries; shape ``(B,)``.

    Computed in at least float32 (bf16/fp16 states are upcast; float64 stays float64).
    """
    flat = x.reshape(x.shape[0], -1)
    flat = flat.astype(jnp.promote_types(flat.dtype, jnp.float32))
    return jnp.var(flat, axis=1, ddof=1)


def select_shifted_time(
    schedule: Schedule, variance: Array, t_centre: Array, options: TimeShift
) -> Array:
    """The shifted time per example.

    Args:
      schedule: the schedule; ``Gamma(tau) = sigma(t_tau)^2`` on its training-index grid
        ``t_tau = (tau + 1) / N`` (``N = 1000`` for continuous schedules).
      variance: ``(B,)`` empirical variances of the tensor the integration point uses.
      t_centre: scalar or ``(B,)``: the time whose index is the window's centre.
      options: window and cutoff.

    Returns:
      ``(B,)`` times: ``t_tau`` for the argmin over the window (first on ties; the window is
      truncated at the grid's ends), or ``t_centre`` unchanged where the centre index is not
      above the cutoff index, or when ``window == 0``.
    """
    B = variance.shape[0]
    # times keep their own (float) dtype: a float32 variance must not round float64 times
    dt = jnp.result_type(jnp.asarray(t_centre).dtype, variance.dtype, jnp.float32)
    t_c = jnp.broadcast_to(jnp.asarray(t_centre, dtype=dt), (B,))
    if options.window == 0:
        return t_c
    N = _index_grid(schedule)
    k = options.window // 2
    centre = jnp.round(t_c * N - 1.0).astype(jnp.int32)
    offsets = jnp.arange(-k, k + 1, dtype=jnp.int32)
    cand = centre[:, None] + offsets[None, :]  # (B, 2k + 1)
    valid = (cand >= 0) & (cand <= N - 1)
    t_cand = (jnp.clip(cand, 0, N - 1).astype(dt) + 1.0) / N
    gamma = jnp.square(schedule.sigma(t_cand))
    dist = jnp.where(valid, jnp.square(variance[:, None].astype(dt) - gamma), jnp.inf)
    tau = jnp.take_along_axis(cand, jnp.argmin(dist, axis=1)[:, None], axis=1)[:, 0]
    # strict: centre index > cutoff index; 1e-3 absorbs the rounding of cutoff * N - 1
    # (float32 gives 249.99998 for cutoff = 0.251, which would shift at the cutoff itself)
    cutoff_index = jnp.asarray(options.cutoff, dt) * N - 1.0 + 1e-3
    shift = centre.astype(dt) > cutoff_index
    return jnp.where(shift, (tau.astype(dt) + 1.0) / N, t_c)


#: The samplers the Time-Shift rule is integrated into (those with a ``time_shift`` option).
SUPPORTED = ("ddpm", "ddim", "pndm", "dpm_solver (method='multistep')")


def time_shift(sampler: Callable, *, window: int, cutoff: float) -> Callable:
    """The Time-Shift Sampler (Li et al., ICLR 2024) version of a base sampler: ``solvers.ddpm``,
    ``ddim``, ``pndm`` or ``dpm_solver`` (multistep).

    Args:
      sampler: a base sampler that takes a ``time_shift`` option.
      window: :attr:`TimeShift.window` (static).
      cutoff: :attr:`TimeShift.cutoff`.

    Returns:
      ``shifted(denoiser, x_T, ts, **options)``, the sampler with ``time_shift`` set.

    Raises:
      TypeError: ``sampler`` has no ``time_shift`` option (e.g. the EDM or BDIA samplers).

    Example:
      >>> ts_ddim = time_shift(solvers.ddim, window=10, cutoff=0.3)
      >>> x0 = jax.jit(ts_ddim)(denoiser, x_T, grids.uniform_time(10))
    """
    try:
        takes_option = "time_shift" in inspect.signature(sampler).parameters
    except (TypeError, ValueError):  # not a callable with a signature
        takes_option = False
    if not takes_option:
        name = getattr(sampler, "__name__", type(sampler).__name__)
        raise TypeError(
            f"time_shift supports the samplers it is integrated into, {', '.join(SUPPORTED)}; "
            f"got {name}, which has no time_shift option"
        )
    opts = TimeShift(window=window, cutoff=cutoff)

    @functools.wraps(sampler)
    def shifted(denoiser, x_T, ts, **kwargs):
        if "time_shift" in kwargs:
            raise ValueError("time_shift is already set by the wrapper; do not pass it again")
        return sampler(denoiser, x_T, ts, time_shift=opts, **kwargs)

    return shifted
