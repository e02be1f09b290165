"""Metrics against closed forms and independent implementations (scipy, scikit-image)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from skimage.metrics import structural_similarity

from dpm.metrics import (
    frechet_distance,
    frechet_distance_from_features,
    mmd_rbf,
    psnr,
    sliced_wasserstein,
    ssim,
)


def _random_spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


# ------------------------------------------------------------------ Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_frechet_commuting_covariances_closed_form():
    # cov1, cov2 share eigenvectors q: the distance is the diagonal formula in that basis
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    s1, s2 = rng.uniform(0.1, 2.0, 6), rng.uniform(0.1, 2.0, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    got = frechet_distance(mu1, q @ np.diag(s1) @ q.T, mu2, q @ np.diag(s2) @ q.T)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    np.testing.assert_allclose(got, expected, rtol=1e-9)


def test_frechet_non_commuting_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    d = 8
    cov1, cov2 = _random_spd(rng, d), _random_spd(rng, d, scale=2.0)
    assert not np.allclose(cov1 @ cov2, cov2 @ cov1)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    tr_sqrt = np.trace(scipy.linalg.sqrtm(cov1 @ cov2)).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt
    np.testing.assert_allclose(frechet_distance(mu1, cov1, mu2, cov2), expected, rtol=1e-8)


def test_frechet_identical_and_singular_stats_are_zero():
    rng = np.random.default_rng(3)
    mu = rng.standard_normal(10)
    a = rng.standard_normal((10, 3))
    cov_singular = a @ a.T  # rank 3: eigenvalues of order -1e-16 appear
    assert frechet_distance(mu, cov_singular, mu, cov_singular) < 1e-10
    cov = _random_spd(rng, 10)
    assert frechet_distance(mu, cov, mu, cov) < 1e-10


def test_frechet_from_features_gaussian_samples():
    # Two large samples of N(0, I) and N(m, 4 I) in D = 3: FD -> |m|^2 + D (2 - 1)^2
    rng = np.random.default_rng(4)
    m = np.array([1.0, -2.0, 0.5])
    f1 = rng.standard_normal((200_000, 3))
    f2 = m + 2.0 * rng.standard_normal((200_000, 3))
    np.testing.assert_allclose(frechet_distance_from_features(f1, f2), np.sum(m**2) + 3, rtol=1e-2)


def test_frechet_validation():
    with pytest.raises(ValueError, match="cov1"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="f1"):
        frechet_distance_from_features(np.zeros((1, 3)), np.zeros((5, 3)))


# ------------------------------------------------------------------ MMD


def test_mmd_same_distribution_near_zero_and_monotone_in_shift(x64):
    # Population value for N(0, I) vs N(delta, I) in D dims with bandwidth h:
    # MMD^2 = 2 (h^2 / (h^2 + 2))^(D/2) (1 - exp(-|delta|^2 / (2 (h^2 + 2))))
    key1, key2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key1, (2000, 2))
    y = jax.random.normal(key2, (2000, 2))
    mmd = jax.jit(mmd_rbf)
    shifts = (0.0, 0.25, 0.5, 1.0, 2.0)
    values = [float(mmd(x, y + jnp.array([s, 0.0]), 1.0)) for s in shifts]
    exact = [2 / 3 * (1 - np.exp(-(s**2) / 6)) for s in shifts]
    np.testing.assert_allclose(values, exact, rtol=0.1, atol=2e-3)  # sampling error ~3 sd
    assert abs(values[0]) < 1e-3
    assert all(b > a for a, b in zip(values, values[1:], strict=False))
    # median heuristic: also ~0 for the same distribution and monotone in the shift
    x, y = x[:500], y[:500]
    auto = [float(mmd(x, y + jnp.array([s, 0.0]))) for s in shifts]
    assert abs(auto[0]) < 2e-3
    assert all(b > a for a, b in zip(auto, auto[1:], strict=False))


def test_mmd_unbiased_matches_direct_sum(x64):
    # Independent double loop over the definition (small sizes)
    rng = np.random.default_rng(5)
    x, y, h = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3, 0.8
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h**2))
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(a, b) for a in x for b in y) / (7 * 5)
    np.testing.assert_allclose(float(mmd_rbf(x, y, h)), xx + yy - 2 * xy, rtol=1e-10)
    # median heuristic bandwidth = median pairwise distance of the pooled sample
    z = np.concatenate([x, y])
    dists = [np.linalg.norm(z[i] - z[j]) for i in range(12) for j in range(i + 1, 12)]
    np.testing.assert_allclose(
        float(mmd_rbf(x, y)), float(mmd_rbf(x, y, np.median(dists))), rtol=1e-10
    )


# ------------------------------------------------------------------ sliced Wasserstein


def test_sliced_wasserstein_1d_gaussians_closed_form(x64):
    # W2(N(0, 1), N(m, s^2))^2 = m^2 + (1 - s)^2; in 1-D every projection is +-identity
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    m, s = 0.7, 1.5
    x = jax.random.normal(k1, (50_000, 1))
    y = m + s * jax.random.normal(k2, (50_000, 1))
    sw = float(jax.jit(sliced_wasserstein, static_argnums=3)(x, y, k3, 4))
    np.testing.assert_allclose(sw, np.sqrt(m**2 + (1 - s) ** 2), rtol=2e-2)


def test_sliced_wasserstein_shift_exact(x64):
    # y = x + v: every sorted projection shifts by theta . v, so SW2^2 = mean (theta . v)^2
    # -> |v|^2 / D over uniform directions.
    k1, k2 = jax.random.split(jax.random.key(2))
    d = 4
    x = jax.random.normal(k1, (16, d))
    v = jnp.array([1.0, -2.0, 0.5, 3.0])
    sw = float(sliced_wasserstein(x, x + v, k2, num_projections=20_000))
    np.testing.assert_allclose(sw, float(jnp.linalg.norm(v)) / np.sqrt(d), rtol=2e-2)
    assert float(sliced_wasserstein(x, x, k2)) == 0.0


# ------------------------------------------------------------------ PSNR / SSIM


def test_psnr_constant_offset_closed_form():
    x = jax.random.uniform(jax.random.key(3), (3, 8, 8, 3), minval=-1.0, maxval=1.0)
    offsets = jnp.array([0.1, 0.01, 0.5])
    got = jax.jit(psnr, static_argnums=2)(x + offsets[:, None, None, None], x, 2.0)
    np.testing.assert_allclose(got, 10 * np.log10(4.0 / np.asarray(offsets) ** 2), rtol=1e-5)


def test_ssim_identity_and_decreasing_with_noise():
    key1, key2 = jax.random.split(jax.random.key(4))
    x = jax.random.uniform(key1, (1, 24, 24, 3))
    noise = jax.random.normal(key2, x.shape)
    f = jax.jit(ssim, static_argnums=2)
    np.testing.assert_allclose(f(x, x, 1.0), 1.0, atol=1e-6)
    values = [float(f(x + s * noise, x, 1.0)[0]) for s in (0.01, 0.05, 0.2, 0.5)]
    assert values[0] < 1.0
    assert all(b < a for a, b in zip(values, values[1:], strict=False))


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage(channels):
    rng = np.random.default_rng(6)
    # smooth images plus noise, so the structure term matters
    base = rng.uniform(size=(2, 6, 6, channels))
    x = np.kron(base, np.ones((1, 5, 5, 1)))[:, :27, :29]
    y = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0.0, 1.0)
    got = np.asarray(ssim(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), 1.0))
    for i in range(2):
        ref = structural_similarity(
            x[i],
            y[i],
            data_range=1.0,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        np.testing.assert_allclose(got[i], ref, atol=1e-4)


def test_ssim_validation():
    with pytest.raises(ValueError, match="win_size"):
        ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)), 1.0)
