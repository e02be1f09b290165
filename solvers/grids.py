"""Time grids for the samplers: descending arrays of times on a schedule's axis.

Every grid has the same signature ``grid(n_steps, schedule=None, *, options) -> ts`` and returns
``ts`` of shape ``(n_steps + 1,)`` (the discrete spacings with ``final="none"`` or
``final="first_index"`` may return one point less, see :func:`ddim_uniform`): ``ts[0]`` is the
start, ``ts[-1]`` the end, strictly decreasing, in the default float dtype (float32, or float64
under ``jax.enable_x64``). ``schedule`` is required by the grids that depend on it and gives the
default end time ``schedule.t_min`` of the continuous grids.

Continuous grids (any schedule):

* :func:`uniform_time` -- uniform in ``t`` (DPM-Solver ``time_uniform``).
* :func:`quadratic_time` -- uniform in ``sqrt(t)``, dense near 0 (DPM-Solver ``time_quadratic``).
* :func:`uniform_log_snr` -- uniform in ``log_snr`` (DPM-Solver ``logSNR``).
* :func:`karras` -- the EDM ``rho`` grid in ``sigma_bar``, ending at ``t = 0``.

Discrete spacings of other libraries over the ``N`` training indices of a
:class:`~dpm.schedules.DiscreteVP` (index ``i`` sits at ``t = (i + 1) / N``):

* :func:`ddim_uniform` -- DDIM repo ``uniform``: ``i * (N // S)`` (S = 10: 900, 800, ..., 0).
* :func:`ddim_quadratic` -- DDIM repo ``quad``: ``int(linspace(0, sqrt(0.8 N), S) ** 2)``.
* :func:`leading` -- diffusers ``leading``: ``i * (N // S) + offset`` (Stable Diffusion: offset 1).
* :func:`trailing` -- diffusers ``trailing``: ``round(N - i N / S) - 1`` (includes ``N - 1``).
* :func:`linspace` -- diffusers ``linspace``: ``round(linspace(0, N - 1, S))``.

The discrete spacings end, by default, with ``t = 0`` (``alpha_bar = 1``: the DDIM repo and
diffusers ``set_alpha_to_one=True``); ``final="first_index"`` ends at index 0 instead
(``alpha_bar_0``: LDM / Stable Diffusion ``set_alpha_to_one=False``, PNDM), ``final="none"``
at the smallest chosen index.

Which grid: a few-step solver needs its steps where the samples take shape, near the data.

* :func:`uniform_time` with ``t_end=0`` puts one huge last step (in log-SNR) onto ``t = 0``,
  which is first order and returns ``x0_hat`` of a still-noisy state: with 10 steps of
  DPM-Solver++(2M) the modes of a mixture come out a third too narrow. Use it only with many
  steps, or for comparisons with codes that use it.
* :func:`uniform_log_snr` (DPM-Solver's choice) and :func:`karras` (EDM's) are dense at low
  noise: the right defaults for few-step multistep solvers and Heun from ~20 steps, but with
  very few steps (<= 10) they leave few steps where the modes separate and overshoot the modes'
  positions (Karras more: it was tuned for EDM's ``sigma_max = 80``).
* :func:`quadratic_time` sits between; it was the most accurate at 5-10 steps of
  DPM-Solver++(2M) on a discrete VP schedule.

Measured figures: ``solvers/NOTES.md``.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from dpm.schedules import DiscreteVP, Schedule

Array = jax.Array

__all__ = [
    "uniform_time",
    "quadratic_time",
    "uniform_log_snr",
    "karras",
    "ddim_uniform",
    "ddim_quadratic",
    "leading",
    "trailing",
    "linspace",
]

Final = Literal["zero", "first_index", "none"]


def _check_n_steps(n_steps, upper: int | None = None) -> None:
    if not isinstance(n_steps, int | np.integer) or isinstance(n_steps, bool) or n_steps < 1:
        raise ValueError(f"n_steps must be an integer >= 1; got {n_steps!r}")
    if upper is not None and n_steps > upper:
        raise ValueError(
            f"n_steps must be <= the number of training steps N = {upper}; got {n_steps}"
        )


def _as_ts(a) -> Array:
    return jnp.asarray(a, dtype=jnp.result_type(float))


def _ends(schedule: Schedule | None, t_start, t_end) -> tuple[float, float]:
    if t_end is None:
        t_end = 0.0 if schedule is None else float(schedule.t_min)
    t_start, t_end = float(t_start), float(t_end)
    if not (0.0 <= t_end < t_start <= 1.0):
        raise ValueError(
            f"need 0 <= t_end < t_start <= 1; got t_start={t_start!r}, t_end={t_end!r}"
        )
    return t_start, t_end


def _need_schedule(schedule, grid: str) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise TypeError(f"{grid} needs a dpm.schedules.Schedule; got {type(schedule).__name__}")
    return schedule


def uniform_time(
    n_steps: int, schedule: Schedule | None = None, *, t_start: float = 1.0, t_end=None
) -> Array:
    """Grid uniform in ``t``: ``linspace(t_start, t_end, n_steps + 1)``.

    Args:
      n_steps: number of steps S >= 1.
      schedule: optional; gives the default ``t_end = schedule.t_min``.
      t_start: start time (default 1).
      t_end: end time; default ``schedule.t_min``, or 0 without a schedule.

    Returns:
      ``ts``, shape ``(S + 1,)``, descending.
    """
    _check_n_steps(n_steps)
    t_start, t_end = _ends(schedule, t_start, t_end)
    return _as_ts(np.linspace(t_start, t_end, n_steps + 1))


def quadratic_time(
    n_steps: int, schedule: Schedule | None = None, *, t_start: float = 1.0, t_end=None
) -> Array:
    """Grid uniform in ``sqrt(t)`` (quadratic in ``t``, dense near ``t_end``), as DPM-Solver's
    ``time_quadratic``: ``linspace(sqrt(t_start), sqrt(t_end), S + 1) ** 2``.

    Args and Returns as :func:`uniform_time`.
    """
    _check_n_steps(n_steps)
    t_start, t_end = _ends(schedule, t_start, t_end)
    ts = np.linspace(np.sqrt(t_start), np.sqrt(t_end), n_steps + 1) ** 2
    ts[0], ts[-1] = t_start, t_end
    return _as_ts(ts)


def uniform_log_snr(n_steps: int, schedule: Schedule, *, t_start: float = 1.0, t_end=None) -> Array:
    """Grid uniform in ``log_snr`` between ``log_snr(t_start)`` and ``log_snr(t_end)``
    (DPM-Solver's ``logSNR`` skip type), mapped back with ``schedule.t_of_log_snr``.

    Args:
      n_steps: number of steps S >= 1.
      schedule: the schedule (required).
      t_start: start time (default 1).
      t_end: end time > 0 (``log_snr(0) = inf``); default ``schedule.t_min``.

    Returns:
      ``ts``, shape ``(S + 1,)``, descending, ``ts[0] = t_start``, ``ts[-1] = t_end``.
    """
    _check_n_steps(n_steps)
    schedule = _need_schedule(schedule, "uniform_log_snr")
    t_start, t_end = _ends(schedule, t_start, t_end)
    if t_end <= 0.0:
        raise ValueError(f"uniform_log_snr needs t_end > 0 (log_snr(0) = inf); got {t_end!r}")
    lo, hi = _log_snr_ends(schedule, _as_ts(t_start), _as_ts(t_end))
    lam = np.linspace(float(lo), float(hi), n_steps + 1)
    ts = np.clip(_on_host_grid("t_of_log_snr", schedule, lam), t_end, t_start)
    ts[0], ts[-1] = t_start, t_end
    return _as_ts(ts)


@jax.jit
def _log_snr_ends(schedule: Schedule, t_start: Array, t_end: Array):
    return schedule.log_snr(t_start), schedule.log_snr(t_end)


@functools.partial(jax.jit, static_argnums=0)
def _apply(method: str, schedule: Schedule, a: Array) -> Array:
    return getattr(schedule, method)(a)


def _on_host_grid(method: str, schedule: Schedule, a: np.ndarray) -> np.ndarray:
    """``schedule.<method>(a)`` for a 1-D host array, padded to a power-of-two length so that
    one compilation serves many step counts."""
    n = a.shape[0]
    size = max(16, 1 << (n - 1).bit_length())
    padded = np.concatenate([a, np.full(size - n, a[-1])])
    return np.asarray(_apply(method, schedule, _as_ts(padded)), np.float64)[:n]


def karras(
    n_steps: int,
    schedule: Schedule,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float = 7.0,
    append_zero: bool = True,
) -> Array:
    """The EDM grid of Karras et al. (2022), eq. 5, in ``sigma_bar = sigma / alpha``.

    ``sigma_bar_i = (sigma_max^(1/rho) + i / (M - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``i = 0..M-1``, mapped to time with ``schedule.t_of_sigma_bar``; with ``append_zero`` the grid
    has ``M = n_steps`` such points followed by ``t = 0`` (EDM's ``num_steps``), otherwise
    ``M = n_steps + 1``. ``rho = 1`` is uniform in ``sigma_bar``.

    Args:
      n_steps: number of steps S >= 1.
      schedule: the schedule (required).
      sigma_min: smallest noisy level; default ``schedule.sigma_bar(schedule.t_min)``.
      sigma_max: largest level; default ``schedule.sigma_bar(1)`` (must not exceed it).
      rho: the exponent (7 in EDM).
      append_zero: end with ``t = 0`` (clean data).

    Returns:
      ``ts``, shape ``(S + 1,)``, descending.
    """
    _check_n_steps(n_steps)
    schedule = _need_schedule(schedule, "karras")
    top = float(schedule.sigma_bar(_as_ts(1.0)))
    s_max = top if sigma_max is None else float(sigma_max)
    s_min = float(schedule.sigma_bar(_as_ts(schedule.t_min))) if sigma_min is None else sigma_min
    s_min = float(s_min)
    if not (0.0 < s_min < s_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max; got {s_min!r}, {s_max!r}")
    if s_max > top * (1.0 + 1e-6):
        raise ValueError(
            f"sigma_max must be <= the schedule's sigma_bar(1) = {top:.6g}; got {s_max}"
        )
    if rho <= 0:
        raise ValueError(f"rho must be > 0; got {rho!r}")
    M = n_steps if append_zero else n_steps + 1
    ramp = np.linspace(0.0, 1.0, M)
    inv_max, inv_min = s_max ** (1.0 / rho), s_min ** (1.0 / rho)
    sigma_bar = (inv_max + ramp * (inv_min - inv_max)) ** rho
    ts = np.clip(_on_host_grid("t_of_sigma_bar", schedule, sigma_bar), 0.0, 1.0)
    if sigma_max is None:
        ts[0] = 1.0
    if append_zero:
        ts = np.append(ts, 0.0)
    return _as_ts(ts)


# --------------------------------------------------------------------------------------------
# Discrete spacings (DiscreteVP training indices)
# --------------------------------------------------------------------------------------------


def _discrete(schedule, n_steps, grid: str) -> int:
    if not isinstance(schedule, DiscreteVP):
        raise TypeError(
            f"{grid} spaces the training indices of a DiscreteVP schedule; "
            f"got {type(schedule).__name__}"
        )
    N = schedule.num_steps
    _check_n_steps(n_steps, N)
    return N


def _from_indices(idx: np.ndarray, N: int, final: Final, grid: str) -> Array:
    """Ascending indices -> descending times ``(i + 1) / N`` plus the final point."""
    idx = np.asarray(idx, dtype=np.int64)
    if final not in ("zero", "first_index", "none"):
        raise ValueError(f"final must be 'zero', 'first_index' or 'none'; got {final!r}")
    if idx.min() < 0 or idx.max() > N - 1:
        raise ValueError(
            f"{grid} indices must lie in [0, N - 1 = {N - 1}]; got [{idx.min()}, {idx.max()}] "
            "(lower n_steps or offset)"
        )
    if np.any(np.diff(idx) <= 0):
        raise ValueError(
            f"{grid} with {len(idx)} steps repeats training indices ({idx.tolist()[:6]}...); "
            "use fewer steps"
        )
    ts = (idx[::-1] + 1.0) / N
    if final == "zero":
        ts = np.append(ts, 0.0)
    elif final == "first_index" and idx[0] > 0:
        ts = np.append(ts, 1.0 / N)
    if ts.shape[0] < 2:
        raise ValueError(f"{grid} with final={final!r} and 1 step gives a single time point")
    return _as_ts(ts)


def ddim_uniform(
    n_steps: int, schedule: DiscreteVP, *, offset: int = 0, final: Final = "zero"
) -> Array:
    """DDIM repo (Song et al.) ``uniform`` skip: indices ``i * (N // S) + offset``, ``i < S``.

    S = 10, N = 1000 gives 900, 800, ..., 0 (the grid starts at 900, not 999); ``offset = 1``
    gives LDM's ``make_ddim_timesteps`` (901, ..., 1). Where S does not divide N, the DDIM repo's
    ``range(0, N, N // S)`` has extra indices; here there are exactly S (its first S).

    Args:
      n_steps: number of chosen indices S, ``1 <= S <= N``.
      schedule: a :class:`~dpm.schedules.DiscreteVP` (gives N).
      offset: added to every index (diffusers ``steps_offset``).
      final: what follows the smallest index: ``"zero"`` (``t = 0``, ``alpha_bar = 1``),
        ``"first_index"`` (``t = 1 / N``, ``alpha_bar_0``; nothing is appended when the smallest
        index is already 0, since that step would be the identity) or ``"none"``.

    Returns:
      ``ts``: times ``(i + 1) / N`` of the indices, descending, then the final point; shape
      ``(S + 1,)``, or ``(S,)`` for ``final="none"`` / ``"first_index"`` with index 0 chosen.
    """
    N = _discrete(schedule, n_steps, "ddim_uniform")
    return _from_indices(np.arange(n_steps) * (N // n_steps) + offset, N, final, "ddim_uniform")


def ddim_quadratic(
    n_steps: int, schedule: DiscreteVP, *, offset: int = 0, final: Final = "zero"
) -> Array:
    """DDIM repo ``quad`` skip: indices ``int(linspace(0, sqrt(0.8 N), S) ** 2) + offset``.

    S = 10, N = 1000 gives 800, 632, 483, 355, 246, 158, 88, 39, 9, 0. Step counts that repeat an
    index (S above about ``sqrt(0.8 N) / 0.6``) are rejected. Args and Returns as
    :func:`ddim_uniform`.
    """
    N = _discrete(schedule, n_steps, "ddim_quadratic")
    idx = (np.linspace(0.0, np.sqrt(0.8 * N), n_steps) ** 2).astype(np.int64) + offset
    return _from_indices(idx, N, final, "ddim_quadratic")


def leading(n_steps: int, schedule: DiscreteVP, *, offset: int = 0, final: Final = "zero") -> Array:
    """diffusers ``timestep_spacing="leading"``: indices ``i * (N // S) + offset``, ``i < S``
    (the DDIM uniform indices; Stable Diffusion uses ``offset = 1``: 901, ..., 1).

    Args and Returns as :func:`ddim_uniform`.
    """
    N = _discrete(schedule, n_steps, "leading")
    return _from_indices(np.arange(n_steps) * (N // n_steps) + offset, N, final, "leading")


def trailing(
    n_steps: int, schedule: DiscreteVP, *, offset: int = 0, final: Final = "zero"
) -> Array:
    """diffusers ``timestep_spacing="trailing"``: indices ``round(N - i N / S) - 1 + offset``,
    ``i < S`` (S = 10: 999, 899, ..., 99; always starts at ``N - 1``).

    Args and Returns as :func:`ddim_uniform`.
    """
    N = _discrete(schedule, n_steps, "trailing")
    idx = np.round(N - np.arange(n_steps)[::-1] * (N / n_steps)).astype(np.int64) - 1 + offset
    return _from_indices(idx, N, final, "trailing")


def linspace(
    n_steps: int, schedule: DiscreteVP, *, offset: int = 0, final: Final = "zero"
) -> Array:
    """diffusers ``timestep_spacing="linspace"``: indices ``round(linspace(0, N - 1, S)) + offset``
    (S = 10: 999, 888, ..., 111, 0).

    Args and Returns as :func:`ddim_uniform`.
    """
    N = _discrete(schedule, n_steps, "linspace")
    idx = np.round(np.linspace(0.0, N - 1.0, n_steps)).astype(np.int64) + offset
    return _from_indices(idx, N, final, "linspace")
