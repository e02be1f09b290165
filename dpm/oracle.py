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
from jax.tree_util import Partial

from dpm.denoiser import Denoiser, expand_like
from dpm.schedules import Schedule

Array = jax.Array

__all__ = ["GaussianMixture"]


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
      weights: ``(K,)`` mixture weights (normalised on construction).
    """

    means: Array
    stds: Array
    weights: Array

    @classmethod
    def create(cls, means, stds, weights=None) -> GaussianMixture:
        """Validates and normalises the parameters.

        Args:
          means: ``(K, D)`` or ``(D,)`` (one component).
          stds: scalar or ``(K,)``.
          weights: ``(K,)`` positive, or None for uniform.
        """
        means = jnp.asarray(means, dtype=jnp.result_type(float))
        if means.ndim == 1:
            means = means[None]
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D) or (D,); got {means.shape}")
        K = means.shape[0]
        stds = jnp.broadcast_to(jnp.asarray(stds, dtype=means.dtype), (K,))
        if weights is None:
            weights = jnp.full((K,), 1.0 / K, dtype=means.dtype)
        weights = jnp.asarray(weights, dtype=means.dtype)
        if weights.shape != (K,):
            raise ValueError(f"weights must have shape ({K},) to match means; got {weights.shape}")
        if bool(jnp.any(stds < 0)):
            raise ValueError(f"stds must be >= 0; got {stds}")
        if bool(jnp.any(weights <= 0)):
            raise ValueError(f"weights must be > 0; got {weights}")
        return cls(means, stds, weights / jnp.sum(weights))

    @classmethod
    def gaussian(cls, mean, std) -> GaussianMixture:
        """A single isotropic Gaussian ``N(mean, std^2 I)``; ``mean`` has shape ``(D,)``."""
        return cls.create(jnp.asarray(mean)[None], jnp.asarray(std)[None])

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
