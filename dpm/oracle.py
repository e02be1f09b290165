"""The analytic oracle: an isotropic Gaussian mixture whose diffused marginals, denoiser and
(for one component) probability-flow ODE are known in closed form.

For data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x_t = alpha x0 + sigma eps``, component ``k``
of the marginal is ``N(alpha mu_k, v_k I)`` with ``v_k = alpha^2 s_k^2 + sigma^2``, and

* ``E[x0 | x_t, k] = mu_k + alpha s_k^2 (x_t - alpha mu_k) / v_k``,
* ``E[eps | x_t, k] = sigma (x_t - alpha mu_k) / v_k``,

mixed with the posterior responsibilities (computed with log-sum-exp, so float32 is stable at
``t`` near 0 and 1). Every sampler is tested against these.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from dpm.denoiser import Denoiser, expand_like
from dpm.schedules import Schedule

Array = jax.Array

__all__ = ["GaussianMixture"]


def _as_float(value, name: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array of numbers; got {value!r:.80} ({e})") from None


def _check_finite(a: np.ndarray, name: str) -> None:
    bad = int(np.sum(~np.isfinite(a)))
    if bad:
        raise ValueError(
            f"{name} must be finite; got {bad} NaN or infinite value(s) among its {a.size}"
        )


def _oracle_eps(gm: GaussianMixture, schedule: Schedule, x, t, cond):
    del cond
    return gm.posterior_mean(schedule, x, t)[1]


def _oracle_x0(gm: GaussianMixture, schedule: Schedule, x, t, cond):
    del cond
    return gm.posterior_mean(schedule, x, t)[0]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture in ``D`` dimensions.

    Attributes:
      means: ``(K, D)`` component means.
      stds: ``(K,)`` component standard deviations (``>= 0``; 0 is a point mass).
      weights: ``(K,)`` mixture weights, summing to 1 (``create`` normalises them).
    """

    means: Array
    stds: Array
    weights: Array

    @classmethod
    def create(cls, means, stds, weights=None) -> GaussianMixture:
        """Validates and normalises the parameters (concrete values, not traced ones).

        Args:
          means: ``(K, D)`` component means, or ``(D,)`` for one component; finite, K, D >= 1.
          stds: scalar (shared) or ``(K,)``, one isotropic standard deviation per component;
            finite and ``>= 0`` (0 is a point mass).
          weights: ``(K,)`` finite and ``> 0``, relative: they are divided by their sum, so
            ``[2, 1, 1]`` means ``[0.5, 0.25, 0.25]``. None for uniform.

        Returns:
          The mixture, in the default float dtype.

        Raises:
          ValueError: naming the argument, its shape or values and what was expected.
        """
        dtype = jnp.result_type(float)
        m = _as_float(means, "means")
        if m.ndim == 1:
            m = m[None]
        if m.ndim != 2 or 0 in m.shape:
            raise ValueError(
                f"means must have shape (K, D) or (D,) with K, D >= 1; got shape {np.shape(means)}"
            )
        K = m.shape[0]
        _check_finite(m, "means")
        sd = _as_float(stds, "stds")
        if sd.ndim > 1:
            raise ValueError(
                f"stds must be a scalar or have shape (K,) = ({K},): the components are "
                f"isotropic; got shape {sd.shape}"
            )
        if sd.ndim == 1 and sd.shape[0] != K:
            raise ValueError(
                f"stds must be a scalar or one value per component (shape (K,) = ({K},), K the "
                f"rows of means); got length {sd.shape[0]}, expected {K}"
            )
        sd = np.broadcast_to(sd, (K,))
        _check_finite(sd, "stds")
        if np.any(sd < 0):
            raise ValueError(
                f"stds must be >= 0; got {int(np.sum(sd < 0))} negative, the smallest "
                f"{sd.min():.6g}"
            )
        if weights is None:
            w = np.full((K,), 1.0 / K)
        else:
            w = _as_float(weights, "weights")
            if w.shape != (K,):
                raise ValueError(
                    f"weights must have shape ({K},) to match means (K = {K} components); got "
                    f"shape {w.shape}"
                )
            _check_finite(w, "weights")
            if np.any(w <= 0):
                raise ValueError(
                    f"weights must be > 0; got {int(np.sum(w <= 0))} value(s) <= 0, the smallest "
                    f"{w.min():.6g}"
                )
        w = w / np.sum(w)
        return cls(jnp.asarray(m, dtype), jnp.asarray(sd, dtype), jnp.asarray(w, dtype))

    @classmethod
    def gaussian(cls, mean, std) -> GaussianMixture:
        """A single isotropic Gaussian ``N(mean, std^2 I)``; ``mean`` has shape ``(D,)``, ``std``
        is a scalar."""
        mean, std = _as_float(mean, "mean"), _as_float(std, "std")
        if mean.ndim != 1 or std.ndim != 0:
            raise ValueError(
                f"gaussian needs mean of shape (D,) and a scalar std; got mean.shape={mean.shape}, "
                f"std.shape={std.shape}"
            )
        return cls.create(mean[None], std[None])

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def _check_x(self, x: Array) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"x must have last dimension D = {self.dim} (the mixture's); got x.shape={x.shape}"
            )

    def _component_terms(self, schedule: Schedule, x: Array, t: Array):
        """Per-component log-likelihood of ``x_t`` and posterior pieces; shapes ``(..., K)``."""
        self._check_x(x)
        t = jnp.asarray(t, dtype=x.dtype)
        a = expand_like(schedule.alpha(t), x)[..., None]  # (..., 1, 1)
        s = expand_like(schedule.sigma(t), x)[..., None]
        diff = x[..., None, :] - a * self.means  # (..., K, D)
        v = a[..., 0] ** 2 * self.stds**2 + s[..., 0] ** 2  # (..., K)
        v = jnp.maximum(v, jnp.finfo(v.dtype).tiny)  # a point mass at t = 0
        D = self.dim
        sq = jnp.sum(diff**2, axis=-1)
        loglik = jnp.log(self.weights) - 0.5 * D * jnp.log(2 * jnp.pi * v) - 0.5 * sq / v
        return loglik, diff, v, a[..., 0], s[..., 0]

    def log_prob(self, schedule: Schedule, x: Array, t: Array) -> Array:
        """Exact log-density of the marginal ``p_t`` at ``x``; shape ``x.shape[:-1]``."""
        loglik, *_ = self._component_terms(schedule, x, t)
        return jax.nn.logsumexp(loglik, axis=-1)

    def posterior_mean(self, schedule: Schedule, x: Array, t: Array) -> tuple[Array, Array]:
        """Exact ``(E[x0 | x_t], E[eps | x_t])``, each of the shape of ``x``."""
        loglik, diff, v, a, s = self._component_terms(schedule, x, t)
        r = jax.nn.softmax(loglik, axis=-1)[..., None]  # (..., K, 1)
        x0_k = self.means + (a * self.stds**2 / v)[..., None] * diff
        eps_k = (s / v)[..., None] * diff
        return jnp.sum(r * x0_k, axis=-2), jnp.sum(r * eps_k, axis=-2)

    def denoiser(self, schedule: Schedule, prediction: str = "eps") -> Denoiser:
        """The exact denoiser of this mixture under ``schedule``, predicting ``"eps"`` or
        ``"x0"``."""
        if prediction not in ("eps", "x0"):
            raise ValueError(f"prediction must be 'eps' or 'x0'; got {prediction!r}")
        fn = _oracle_x0 if prediction == "x0" else _oracle_eps
        return Denoiser(Partial(fn, self, schedule), schedule, prediction)

    def sample(self, key: Array, n: int) -> Array:
        """``n`` exact samples of the data, shape ``(n, D)``."""
        kc, kz = jax.random.split(key)
        k = jax.random.categorical(kc, jnp.log(self.weights), shape=(n,))
        z = jax.random.normal(kz, (n, self.dim), dtype=self.means.dtype)
        return self.means[k] + self.stds[k][:, None] * z

    def sample_marginal(self, key: Array, schedule: Schedule, t: Array, n: int) -> Array:
        """``n`` exact samples of ``x_t``, shape ``(n, D)``."""
        k0, ke = jax.random.split(key)
        x0 = self.sample(k0, n)
        eps = jax.random.normal(ke, x0.shape, dtype=x0.dtype)
        t = jnp.asarray(t, dtype=x0.dtype)
        return expand_like(schedule.alpha(t), x0) * x0 + expand_like(schedule.sigma(t), x0) * eps

    def flow(self, schedule: Schedule, x: Array, t: Array, s: Array) -> Array:
        """Exact probability-flow ODE map ``x_t -> x_s`` for a single Gaussian.

        For ``N(mu, c^2 I)`` the flow is affine: ``(x_t - alpha_t mu) / sqrt(alpha_t^2 c^2 +
        sigma_t^2)`` is invariant. Works for any ``t, s`` in ``[0, 1]`` (either direction).
        """
        if self.num_components != 1:
            raise ValueError(
                "the exact probability-flow map is only available for a single Gaussian; "
                f"this mixture has {self.num_components} components"
            )
        self._check_x(x)
        mu, c = self.means[0], self.stds[0]

        def scale(u):
            u = jnp.asarray(u, dtype=x.dtype)
            a, sg = expand_like(schedule.alpha(u), x), expand_like(schedule.sigma(u), x)
            return a, jnp.sqrt(a**2 * c**2 + sg**2)

        a_t, r_t = scale(t)
        a_s, r_s = scale(s)
        return a_s * mu + (r_s / r_t) * (x - a_t * mu)
