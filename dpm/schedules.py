"""Noise schedules on a continuous time axis ``t in [0, 1]`` (``t = 0`` clean).

A schedule defines the forward process ``x_t = alpha(t) * x_0 + sigma(t) * eps`` and answers

* ``alpha(t)``, ``sigma(t)``, ``log_snr(t) = log(alpha^2 / sigma^2)`` and the inverse
  ``t_of_log_snr(lam)``;
* ``sigma_bar(t) = sigma / alpha`` (the EDM noise level of ``x / alpha``);
* ``c_noise(t)``: the scalar a backbone is conditioned on (a discrete training index, ``1000 t``
  or EDM's ``log(sigma) / 4``), so networks never see the schedule.

Every schedule is a frozen dataclass registered as a pytree, so it can be passed to a jitted
function; all methods work on scalars and arrays, under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from dpm.pytree import device_cached_dataclass

Array = jax.Array

__all__ = [
    "Schedule",
    "DiscreteVP",
    "LinearVP",
    "CosineVP",
    "CosineLogSNR",
    "EDM",
    "make_betas",
    "ddgan_betas",
    "ddgan_schedule",
]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _is_number(x) -> bool:
    return isinstance(x, int | float | np.number) or (
        isinstance(x, np.ndarray | jax.Array) and _is_concrete(x) and np.ndim(x) == 0
    )


def check_time(t, name: str = "t") -> None:
    """Raises ValueError if a concrete ``t`` lies outside ``[0, 1]`` (traced values pass)."""
    if _is_concrete(t):
        a = np.asarray(t)
        if a.size and (np.any(a < 0) or np.any(a > 1) or np.any(np.isnan(a))):
            raise ValueError(
                f"{name} must lie in [0, 1] (t = 0 is clean data); got values in "
                f"[{np.nanmin(a):.6g}, {np.nanmax(a):.6g}]"
                + (" with NaN" if np.any(np.isnan(a)) else "")
            )


def _log_alpha_from_log_snr(lam: Array) -> Array:
    # alpha^2 = sigmoid(lam)  =>  log alpha = log_sigmoid(lam) / 2
    return 0.5 * jax.nn.log_sigmoid(lam)


class Schedule(abc.ABC):
    """Common interface. Subclasses implement ``log_alpha``, ``log_sigma``, ``t_of_log_snr``
    and ``c_noise``; everything else derives from them."""

    @abc.abstractmethod
    def log_alpha(self, t: Array) -> Array:
        """``log alpha(t)``."""

    @abc.abstractmethod
    def log_sigma(self, t: Array) -> Array:
        """``log sigma(t)``."""

    @abc.abstractmethod
    def t_of_log_snr(self, lam: Array) -> Array:
        """The time whose ``log_snr`` is ``lam`` (inverse of :meth:`log_snr`)."""

    @abc.abstractmethod
    def c_noise(self, t: Array) -> Array:
        """The scalar a backbone is conditioned on at time ``t``."""

    # Derived quantities, shared by every schedule.
    def alpha(self, t: Array) -> Array:
        """Signal scale ``alpha(t)``; same shape as ``t``."""
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t: Array) -> Array:
        """Noise scale ``sigma(t)``; same shape as ``t``."""
        return jnp.exp(self.log_sigma(t))

    def log_snr(self, t: Array) -> Array:
        """``log(alpha^2 / sigma^2)``, strictly decreasing in ``t``; ``+inf`` at ``t = 0``."""
        return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

    def sigma_bar(self, t: Array) -> Array:
        """EDM noise level ``sigma / alpha`` of ``x / alpha``."""
        return jnp.exp(self.log_sigma(t) - self.log_alpha(t))

    def t_of_sigma_bar(self, sigma_bar: Array) -> Array:
        """Inverse of :meth:`sigma_bar`."""
        return self.t_of_log_snr(-2.0 * jnp.log(sigma_bar))

    @property
    def is_variance_preserving(self) -> bool:
        return True

    def prior_sample(self, key: Array, shape: tuple[int, ...], t: float = 1.0,
                     dtype=jnp.float32) -> Array:
        """A draw of the state ``x`` at time ``t`` that samplers start from: ``N(0, I)`` for a
        variance-preserving schedule (its marginal at ``t = 1`` for unit-variance data), and
        ``N(0, sigma(t)^2 I)`` otherwise (EDM's ``sigma_max * N(0, I)``: the noise swamps the
        data). Starting a variance-exploding model from ``N(0, I)`` instead silently collapses
        its samples towards the conditional mean.

        Args:
          key: PRNG key.
          shape: ``(B, ...)``.
          t: the start time in ``[0, 1]`` (``ts[0]`` of the sampling grid).
          dtype: floating dtype of the draw.
        """
        check_time(t)
        z = jax.random.normal(key, shape, dtype)
        if self.is_variance_preserving:
            return z
        return (self.sigma(jnp.asarray(t, dtype)) * z).astype(dtype)

    def log_snr_range(self) -> tuple[float, float]:
        """``(log_snr(1), log_snr(t_min))`` where ``t_min`` is the smallest noisy grid time."""
        return float(self.log_snr(jnp.asarray(1.0))), float(self.log_snr(jnp.asarray(self.t_min)))

    @property
    def t_min(self) -> float:
        """Smallest time a sampler should stop at before a final denoising jump to ``t = 0``."""
        return 1e-3


def _vp_log_sigma(log_alpha: Array) -> Array:
    # sigma^2 = 1 - alpha^2, computed without cancellation near t = 0.
    return 0.5 * jnp.log(-jnp.expm1(2.0 * log_alpha))


# --------------------------------------------------------------------------------------------
# Discrete DDPM schedules
# --------------------------------------------------------------------------------------------


def make_betas(
    name: Literal["linear", "scaled_linear", "cosine", "vpsde"] = "linear",
    num_steps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
    table_size: int | None = None,
) -> np.ndarray:
    """The beta tables of DDPM (``linear``), Stable Diffusion (``scaled_linear``), Nichol &
    Dhariwal (``cosine``) and DiffSinger / ProDiff (``vpsde``), in float64.

    Args:
      name: ``"linear"`` (1e-4 .. 0.02), ``"scaled_linear"`` (sqrt-space linear, 0.00085 .. 0.012),
        ``"cosine"`` (``alpha_bar(u) = cos^2((u + s) / (1 + s) * pi / 2)``, betas capped at
        ``max_beta``) or ``"vpsde"``: the VP-SDE ``beta(u) = beta_min + u (beta_max -
        beta_min)`` integrated over the cells of a ``T = table_size`` grid,
        ``beta_i = 1 - exp(-beta_min / T - (beta_max - beta_min) (2 i - 1) / (2 T^2))``,
        ``i = 1..num_steps`` (``beta_min = beta_start``, default 0.1; ``beta_max = beta_end``,
        default 40, ProDiff's). ProDiff builds its ``T = 4``-step teacher on a table of
        ``table_size = 5`` and samples on the first four entries.
      num_steps: number of training steps N.
      beta_start, beta_end: override the end points of the linear tables (``vpsde``: the
        SDE's ``beta_min`` and ``beta_max``).
      table_size: ``vpsde`` only: the grid size ``T >= num_steps`` (default ``num_steps``).

    Returns:
      ``betas``, shape ``(num_steps,)``, float64.
    """
    if not isinstance(num_steps, int | np.integer) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if table_size is not None and name != "vpsde":
        raise ValueError(f"table_size is a 'vpsde' option; got it with name={name!r}")
    if name == "vpsde":
        T = num_steps if table_size is None else table_size
        if not isinstance(T, int | np.integer) or T < num_steps:
            raise ValueError(f"table_size must be an int >= num_steps={num_steps}; got {T!r}")
        b0 = 0.1 if beta_start is None else beta_start
        b1 = 40.0 if beta_end is None else beta_end
        if not 0 < b0 < b1:
            raise ValueError(f"vpsde needs 0 < beta_start < beta_end; got {b0!r}, {b1!r}")
        i = np.arange(1, num_steps + 1, dtype=np.float64)
        return -np.expm1(-b0 / T - 0.5 * (b1 - b0) * (2 * i - 1) / T**2)
    if name == "linear":
        b0 = 1e-4 if beta_start is None else beta_start
        b1 = 0.02 if beta_end is None else beta_end
        # Scaled so that other N keep the same total noise (Ho et al. use N = 1000).
        scale = 1000.0 / num_steps
        return np.linspace(scale * b0, scale * b1, num_steps, dtype=np.float64)
    if name == "scaled_linear":
        b0 = 0.00085 if beta_start is None else beta_start
        b1 = 0.012 if beta_end is None else beta_end
        return np.linspace(math.sqrt(b0), math.sqrt(b1), num_steps, dtype=np.float64) ** 2
    if name == "cosine":
        u = np.arange(num_steps + 1, dtype=np.float64) / num_steps
        f = np.cos((u + cosine_s) / (1 + cosine_s) * np.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], max_beta)
    raise ValueError(
        "schedule name must be one of 'linear', 'scaled_linear', 'cosine', 'vpsde'; "
        f"got {name!r}"
    )


@device_cached_dataclass
@dataclasses.dataclass(frozen=True)
class DiscreteVP(Schedule):
    """Discrete DDPM variance-preserving schedule from a beta table.

    Grid point ``i`` (training index, ``0 <= i < N``) sits at ``t = (i + 1) / N``; ``log alpha`` is
    piecewise linear through ``(0, 0)`` and the grid points ``(t_i, log sqrt(alpha_bar_i))``, so
    ``alpha(0) = 1`` and ``sigma(0) = 0`` while the grid reproduces ``cumprod(1 - beta)`` exactly.

    Attributes:
      betas: ``(N,)`` beta table (float64 numpy at construction).
      log_alpha_grid: ``(N + 1,)`` values of ``log alpha`` at ``t = 0, 1/N, ..., 1``.
    """

    betas: Array
    log_alpha_grid: Array

    @classmethod
    def from_betas(cls, betas) -> DiscreteVP:
        """Builds the schedule from a beta table, validating it."""
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.shape[0] < 2:
            raise ValueError(f"betas must be a 1-D array with >= 2 entries, got shape {b.shape}")
        if np.any(~np.isfinite(b)) or np.any(b <= 0) or np.any(b >= 1):
            raise ValueError(
                "betas must lie in the open interval (0, 1); "
                f"got min {b.min():.3g}, max {b.max():.3g}"
            )
        log_alpha_bar = np.cumsum(np.log1p(-b))
        grid = np.concatenate([[0.0], 0.5 * log_alpha_bar])
        return cls(betas=b, log_alpha_grid=grid)

    @classmethod
    def from_name(cls, name: str = "linear", num_steps: int = 1000, **kwargs) -> DiscreteVP:
        """``DiscreteVP.from_name("linear" | "scaled_linear" | "cosine", N)``."""
        return cls.from_betas(make_betas(name, num_steps, **kwargs))

    @property
    def num_steps(self) -> int:
        """Number of training steps N (static: the table's length)."""
        return self.betas.shape[0]

    @property
    def alphas_cumprod(self) -> Array:
        """``alpha_bar_i = prod_{k <= i} (1 - beta_k)``, shape ``(N,)``."""
        return jnp.exp(2.0 * jnp.asarray(self.log_alpha_grid)[1:])

    @property
    def t_min(self) -> float:
        return 1.0 / self.num_steps

    def log_alpha(self, t: Array) -> Array:
        # Linear interpolation on the uniform grid by index arithmetic (a gather), not
        # jnp.interp: searchsorted does not lower for per-example times sharded over devices.
        t = jnp.asarray(t)
        grid = jnp.asarray(self.log_alpha_grid, dtype=jnp.result_type(t, float))
        N = self.num_steps
        u = t.astype(grid.dtype) * N
        i = jnp.clip(jnp.floor(u), 0, N - 1).astype(jnp.int32)
        frac = u - i
        return grid[i] + frac * (grid[i + 1] - grid[i])

    def log_sigma(self, t: Array) -> Array:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_log_snr(self, lam: Array) -> Array:
        la = _log_alpha_from_log_snr(jnp.asarray(lam))
        grid = jnp.asarray(self.log_alpha_grid, dtype=la.dtype)  # decreasing, grid[0] = 0
        N = self.num_steps
        # segment k with grid[k] >= la > grid[k + 1]: count the grid points above la
        k = jnp.sum(grid[1:] >= la[..., None], axis=-1)
        k = jnp.clip(k, 0, N - 1)
        g0, g1 = grid[k], grid[k + 1]
        frac = jnp.clip((g0 - la) / (g0 - g1), 0.0, 1.0)
        return (k + frac) / N

    def index_of_t(self, t: Array) -> Array:
        """Continuous training index ``t * N - 1`` (grid point ``i`` <-> ``t = (i + 1) / N``)."""
        return jnp.asarray(t) * self.num_steps - 1.0

    def t_of_index(self, i: Array) -> Array:
        """Time of training index ``i``: ``(i + 1) / N``."""
        return (jnp.asarray(i) + 1.0) / self.num_steps

    def c_noise(self, t: Array) -> Array:
        """The network's time input: the (continuous) training index ``t N - 1``."""
        return self.index_of_t(t)


def ddgan_betas(
    num_steps: int = 10, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3
) -> np.ndarray:
    """The betas of DDGAN's VP discretisation (Xiao et al. 2022, ``get_sigma_schedule``), in
    float64, without DDGAN's dummy first entry.

    ``t_i = eps + (1 - eps) i / T`` for ``i = 0..T``, ``alpha_bar(t) = exp(-t^2 (beta_max -
    beta_min) / 2 - t beta_min)`` and ``beta_i = 1 - alpha_bar(t_i) / alpha_bar(t_{i-1})``,
    ``i = 1..T``. DDGAN prepends ``beta_0 = 1e-8``, which its posterior coefficients drop and
    which rounds away in its float32 ``sqrt(1 - beta_0)``; so ``cumprod(1 - betas)[k - 1] =
    alpha_bar(t_k) / alpha_bar(t_0)``, exactly DDGAN's ``alphas_cumprod[k - 1]``.

    Args:
      num_steps: ``T >= 2``, the number of (large) steps.
      beta_min, beta_max: the VP-SDE's ``0 < beta_min < beta_max``.
      eps: the smallest time ``t_0``, ``0 <= eps < 1``.

    Returns:
      ``betas``, shape ``(T,)``, float64; ``betas[k - 1]`` is DDGAN's ``beta_k``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 2:
        raise ValueError(f"num_steps must be an integer >= 2, got {num_steps!r}")
    if not 0 < float(beta_min) < float(beta_max) < math.inf:
        raise ValueError(
            f"ddgan_betas needs 0 < beta_min < beta_max < inf; got beta_min={beta_min!r}, "
            f"beta_max={beta_max!r}"
        )
    if not 0 <= float(eps) < 1:
        raise ValueError(f"eps must lie in [0, 1); got {eps!r}")
    t = float(eps) + (1.0 - float(eps)) * np.arange(num_steps + 1, dtype=np.float64) / num_steps
    log_alpha_bar = -0.5 * t**2 * (float(beta_max) - float(beta_min)) - t * float(beta_min)
    return -np.expm1(np.diff(log_alpha_bar))


def ddgan_schedule(
    num_steps: int = 10, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-3
) -> DiscreteVP:
    """DDGAN's ``T``-step VP discretisation (spec 3.4) as a :class:`DiscreteVP`.

    Grid point ``k - 1`` (time ``k / T``) is DDGAN's index ``k`` (``alpha_bar = alpha_bar(t_k)
    / alpha_bar(t_0)``); DDGAN's index 0 is ``t = 0`` (clean data). A network's time input
    ``c_noise(k / T) = k - 1`` is DDGAN's integer ``t`` of the step ``x_k -> x_{k-1}``.

    Args: as :func:`ddgan_betas`.

    Returns:
      ``DiscreteVP.from_betas(ddgan_betas(num_steps, beta_min, beta_max, eps))``.
    """
    return DiscreteVP.from_betas(ddgan_betas(num_steps, beta_min, beta_max, eps))


# --------------------------------------------------------------------------------------------
# Continuous VP schedules
# --------------------------------------------------------------------------------------------


@device_cached_dataclass
@dataclasses.dataclass(frozen=True)
class LinearVP(Schedule):
    """Continuous VP-SDE with linear beta(t) (Song et al. 2021):
    ``log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2``."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self):
        if _is_number(self.beta_min) and _is_number(self.beta_max):
            if not (0 <= float(self.beta_min) < float(self.beta_max)):
                raise ValueError(
                    "LinearVP needs 0 <= beta_min < beta_max; got "
                    f"beta_min={self.beta_min}, beta_max={self.beta_max}"
                )

    def log_alpha(self, t: Array) -> Array:
        t = jnp.asarray(t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def log_sigma(self, t: Array) -> Array:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_log_snr(self, lam: Array) -> Array:
        # Solve a t^2 + b t + la = 0 for t >= 0 in the cancellation-free form.
        la = _log_alpha_from_log_snr(jnp.asarray(lam))
        a = 0.25 * (self.beta_max - self.beta_min)
        b = 0.5 * self.beta_min
        return -2.0 * la / (b + jnp.sqrt(b * b - 4.0 * a * la))

    def c_noise(self, t: Array) -> Array:
        """Score-SDE convention: ``1000 t``."""
        return 1000.0 * jnp.asarray(t)


@device_cached_dataclass
@dataclasses.dataclass(frozen=True)
class CosineVP(Schedule):
    """Continuous cosine schedule of Nichol & Dhariwal:
    ``alpha(t)^2 = f(T t) / f(0)``, ``f(u) = cos^2((u + s) / (1 + s) * pi / 2)``.

    ``t`` is rescaled by ``t_max`` (default 0.9946, as in the DPM-Solver code) so that
    ``log_snr(1)`` stays finite (about -9.9) and ``t -> log_snr`` is strictly monotone on
    ``[0, 1]``.
    """

    s: float = 0.008
    t_max: float = 0.9946

    def __post_init__(self):
        if _is_number(self.s) and _is_number(self.t_max):
            # t_max = 1 puts alpha(1) = cos(pi / 2) at 0 (negative in float32: NaN log_snr)
            if not (0 <= float(self.s) < math.inf and 0 < float(self.t_max) < 1):
                raise ValueError(
                    "CosineVP needs a finite s >= 0 and 0 < t_max < 1 (log_snr(1) finite); got "
                    f"s={self.s}, t_max={self.t_max}"
                )

    def _phi(self, u):
        return (u + self.s) / (1.0 + self.s) * (jnp.pi / 2)

    def log_alpha(self, t: Array) -> Array:
        u = jnp.asarray(t) * self.t_max
        return jnp.log(jnp.cos(self._phi(u))) - jnp.log(jnp.cos(self._phi(0.0)))

    def log_sigma(self, t: Array) -> Array:
        return _vp_log_sigma(self.log_alpha(t))

    def t_of_log_snr(self, lam: Array) -> Array:
        la = _log_alpha_from_log_snr(jnp.asarray(lam))
        phi = jnp.arccos(jnp.exp(la) * jnp.cos(self._phi(0.0)))
        u = phi * 2.0 / jnp.pi * (1.0 + self.s) - self.s
        return jnp.clip(u / self.t_max, 0.0, 1.0)

    def c_noise(self, t: Array) -> Array:
        return 1000.0 * jnp.asarray(t)


@device_cached_dataclass
@dataclasses.dataclass(frozen=True)
class CosineLogSNR(Schedule):
    """The cosine schedule written in log-SNR, with its ends clipped (Salimans & Ho's
    progressive-distillation code): ``log_snr(t) = -2 log tan(a t + b)`` with
    ``b = arctan(exp(-log_snr_max / 2))`` and ``a = arctan(exp(-log_snr_min / 2)) - b``.

    Equivalently ``alpha(t) = cos(a t + b)``, ``sigma(t) = sin(a t + b)``: the cosine schedule
    ``alpha = cos(pi t / 2)`` squeezed so that ``log_snr`` runs from ``log_snr_max`` at ``t = 0``
    to ``log_snr_min`` at ``t = 1`` (defaults +-20: ``sigma(0) = 4.5e-5``, ``alpha(1) =
    4.5e-5``, so ``t = 1`` is pure noise to float32 precision). ``log_snr(0)`` is finite: a
    sampler ending at ``t = 0`` takes a last ordinary step there.
    """

    log_snr_min: float = -20.0
    log_snr_max: float = 20.0

    def __post_init__(self):
        if _is_number(self.log_snr_min) and _is_number(self.log_snr_max):
            lo, hi = float(self.log_snr_min), float(self.log_snr_max)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(
                    "CosineLogSNR needs finite log_snr_min < log_snr_max; got "
                    f"log_snr_min={self.log_snr_min}, log_snr_max={self.log_snr_max}"
                )

    def _abc(self):
        b = jnp.arctan(jnp.exp(-0.5 * jnp.asarray(self.log_snr_max)))
        c = jnp.arctan(jnp.exp(0.5 * jnp.asarray(self.log_snr_min)))  # pi / 2 - b - a
        a = jnp.arctan(jnp.exp(-0.5 * jnp.asarray(self.log_snr_min))) - b
        return a, b, c

    def log_alpha(self, t: Array) -> Array:
        # cos(a t + b) = sin(pi / 2 - a t - b) = sin(a (1 - t) + c): accurate near t = 1 too
        a, _, c = self._abc()
        return jnp.log(jnp.sin(a * (1.0 - jnp.asarray(t)) + c))

    def log_sigma(self, t: Array) -> Array:
        a, b, _ = self._abc()
        return jnp.log(jnp.sin(a * jnp.asarray(t) + b))

    def t_of_log_snr(self, lam: Array) -> Array:
        a, b, _ = self._abc()
        t = (jnp.arctan(jnp.exp(-0.5 * jnp.asarray(lam))) - b) / a
        return jnp.clip(t, 0.0, 1.0)

    def c_noise(self, t: Array) -> Array:
        """``1000 t``."""
        return 1000.0 * jnp.asarray(t)


# --------------------------------------------------------------------------------------------
# EDM / variance exploding
# --------------------------------------------------------------------------------------------


@device_cached_dataclass
@dataclasses.dataclass(frozen=True)
class EDM(Schedule):
    """EDM (Karras et al. 2022) / VE schedule: ``alpha = 1``, ``sigma(t) = t * sigma_max``.

    ``sigma_min`` is not a bound of the map (``t = 0`` gives ``sigma = 0``, clean data) but the
    smallest noise level a sampling grid should visit before the final jump to zero
    (``t_min = sigma_min / sigma_max``).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        if _is_number(self.sigma_min) and _is_number(self.sigma_max):
            if not (0 < float(self.sigma_min) < float(self.sigma_max)):
                raise ValueError(
                    "EDM needs 0 < sigma_min < sigma_max; got "
                    f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"
                )

    @property
    def is_variance_preserving(self) -> bool:
        return False

    @property
    def t_min(self) -> float:
        return float(self.sigma_min) / float(self.sigma_max)

    def log_alpha(self, t: Array) -> Array:
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(t, float)))

    def log_sigma(self, t: Array) -> Array:
        return jnp.log(jnp.asarray(t) * self.sigma_max)

    def t_of_log_snr(self, lam: Array) -> Array:
        return jnp.clip(jnp.exp(-0.5 * jnp.asarray(lam)) / self.sigma_max, 0.0, 1.0)

    def c_noise(self, t: Array) -> Array:
        """EDM's ``c_noise = log(sigma) / 4`` (finite floor at ``t = 0``)."""
        sigma = jnp.maximum(jnp.asarray(t) * self.sigma_max, 1e-20)
        return 0.25 * jnp.log(sigma)
