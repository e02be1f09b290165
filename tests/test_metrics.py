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
    hfer,
    kid,
    label_accuracy,
    mmd_rbf,
    precision_recall,
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


# ------------------------------------------------------------------ KID


def _cubic(a, b, d):
    return (float(np.dot(a, b)) / d + 1.0) ** 3


def test_kid_matches_brute_force_double_loop():
    # With subset_size = N the subsets are the whole sets (in some order): KID is the plain
    # unbiased MMD^2, every subset gives the same value and the sd is ~0.
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((9, 4)), 0.5 + rng.standard_normal((9, 4))
    d, m = 4, 9
    xx = sum(_cubic(x[i], x[j], d) for i in range(m) for j in range(m) if i != j)
    yy = sum(_cubic(y[i], y[j], d) for i in range(m) for j in range(m) if i != j)
    xy = sum(_cubic(a, b, d) for a in x for b in y)
    expected = xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2
    mean, sd = kid(x, y, subset_size=100, num_subsets=5)  # capped at min(N1, N2) = 9
    np.testing.assert_allclose(mean, expected, rtol=1e-12)
    assert sd < 1e-12
    # proper subsets: each subset's value is the brute-force MMD^2 of the drawn rows; redo the
    # same draws (numpy default_rng, x then y per subset) with a double loop
    mean, sd = kid(x, y[:7], subset_size=5, num_subsets=4, seed=3)
    draw = np.random.default_rng(3)
    values = []
    for _ in range(4):
        ix = np.sort(draw.choice(9, 5, replace=False))
        iy = np.sort(draw.choice(7, 5, replace=False))
        a, b = x[ix], y[:7][iy]
        v = (sum(_cubic(a[i], a[j], d) for i in range(5) for j in range(5) if i != j) / 20
             + sum(_cubic(b[i], b[j], d) for i in range(5) for j in range(5) if i != j) / 20
             - 2 * sum(_cubic(p, q, d) for p in a for q in b) / 25)
        values.append(v)
    np.testing.assert_allclose(mean, np.mean(values), rtol=1e-12)
    np.testing.assert_allclose(sd, np.std(values, ddof=1), rtol=1e-10)


def _expected_cubic_kernel(a, b, s, d):
    # E[(X.Y/d + 1)^3], X ~ N(a, s^2 I), Y ~ N(b, s^2 I) independent, S = X.Y:
    # S | Y ~ N(a.Y, s^2 |Y|^2), so E S = a.b,
    # E S^2 = (a.b)^2 + s^2 |a|^2 + s^2 (|b|^2 + d s^2),
    # E S^3 = E[(a.Y)^3] + 3 s^2 E[(a.Y) |Y|^2]
    #       = mu^3 + 3 mu s^2 |a|^2 + 3 s^2 (mu (|b|^2 + d s^2) + 2 s^2 mu),  mu = a.b
    mu = float(a @ b)
    es = mu
    es2 = mu**2 + s**2 * (a @ a) + s**2 * (b @ b + d * s**2)
    es3 = mu**3 + 3 * mu * s**2 * (a @ a) + 3 * s**2 * (mu * (b @ b + d * s**2) + 2 * s**2 * mu)
    return es3 / d**3 + 3 * es2 / d**2 + 3 * es / d + 1


def _mmd2_gaussians(mu1, mu2, s):
    d = len(mu1)
    e = lambda a, b: _expected_cubic_kernel(a, b, s, d)
    return e(mu1, mu1) + e(mu2, mu2) - 2 * e(mu1, mu2)


def test_kid_unbiased_same_distribution_and_closed_form_shift():
    # Many independent small draws: the mean of the KID estimates is the population MMD^2
    # within its standard error (a biased V-statistic is off by ~2 E[k(x,x) - k(x,x')] / m,
    # here ~0.2, dozens of standard errors).
    rng = np.random.default_rng(8)
    d, s, m, reps = 3, 0.8, 40, 400
    mu = np.array([0.3, -0.2, 0.5])
    shift = np.array([0.6, 0.0, -0.3])
    for delta in (np.zeros(3), shift):
        vals = np.array([
            kid(mu + s * rng.standard_normal((m, d)), mu + delta + s * rng.standard_normal((m, d)),
                subset_size=m, num_subsets=2)[0]
            for _ in range(reps)
        ])
        exact = _mmd2_gaussians(mu, mu + delta, s)
        se = np.std(vals, ddof=1) / np.sqrt(reps)
        assert abs(np.mean(vals) - exact) < 4 * se, (np.mean(vals), exact, se)
        if delta.any():
            assert exact > 10 * se  # the shift is resolved, not lost in the noise
    # larger sets through subsets: close to the closed form, and the spread is reported
    x = mu + s * rng.standard_normal((3000, d))
    y = mu + shift + s * rng.standard_normal((3000, d))
    mean, sd = kid(x, y, subset_size=1000, num_subsets=50)
    np.testing.assert_allclose(mean, _mmd2_gaussians(mu, mu + shift, s), rtol=0.1)
    assert 0 < sd < mean


def test_kid_validation():
    x = np.zeros((5, 3))
    with pytest.raises(ValueError, match="f_fake"):
        kid(x, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, x, subset_size=1)
    with pytest.raises(ValueError, match="num_subsets"):
        kid(x, x, num_subsets=1)
    with pytest.raises(ValueError, match="f_real must be finite"):
        kid(np.full((5, 3), np.nan), x)


# ------------------------------------------------------------------ precision / recall


def _clusters(rng, centres, n_per, s=0.3):
    return np.concatenate([c + s * rng.standard_normal((n_per, len(c))) for c in centres])


def test_precision_recall_known_overlap():
    rng = np.random.default_rng(9)
    # four modes 20 apart, spread 0.3; 250 points each (the k-NN balls of a sample cover ~98%
    # of a fresh draw of its own distribution at this size in 2-D, ~93% at 100 points)
    centres = 20.0 * np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    real = _clusters(rng, centres, 250)
    assert precision_recall(real, real) == (1.0, 1.0)
    # disjoint, far away
    far = _clusters(rng, centres + 100.0, 250)
    assert precision_recall(real, far) == (0.0, 0.0)
    # fake covers half of the modes, faithfully: precision ~ 1, recall ~ 1/2
    half = _clusters(rng, centres[:2], 500)
    p, r = precision_recall(real, half)
    assert p > 0.95 and 0.45 < r <= 0.5, (p, r)
    # the symmetric case: real covers half of the fake modes -> precision ~ 1/2, recall ~ 1
    p, r = precision_recall(half, real)
    assert 0.45 < p <= 0.5 and r > 0.95, (p, r)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(10)
    real, fake = rng.standard_normal((30, 2)), 0.7 + rng.standard_normal((25, 2))

    def radii(a, k):
        return [sorted(np.linalg.norm(a[i] - a[j]) for j in range(len(a)) if j != i)[k - 1]
                for i in range(len(a))]

    for k in (1, 3, 5):
        rr, rf = radii(real, k), radii(fake, k)
        prec = np.mean([any(np.linalg.norm(f - real[j]) <= rr[j] for j in range(30)) for f in fake])
        rec = np.mean([any(np.linalg.norm(x - fake[j]) <= rf[j] for j in range(25)) for x in real])
        assert 0 < prec < 1 and 0 < rec < 1
        np.testing.assert_allclose(precision_recall(real, fake, k=k), (prec, rec))


def test_precision_recall_validation():
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(np.zeros((5, 2)), np.zeros((5, 2)), k=0)
    with pytest.raises(ValueError, match="fake must have shape"):
        precision_recall(np.zeros((5, 2)), np.zeros((3, 2)), k=3)


# ------------------------------------------------------------------ HFER


def _wave(kx, ky, n=16, phase=0.3):
    yy, xx = np.mgrid[0:n, 0:n]
    return np.cos(2 * np.pi * (kx * xx + ky * yy) / n + phase)


def test_hfer_sinusoids():
    n = 16  # bins at multiples of 1/16 cycles/pixel; cutoff 0.25 = 4/16
    low = _wave(2, 1)  # |f| = sqrt(5)/16 = 0.14
    high = _wave(6, 0)  # |f| = 6/16 = 0.375
    diag = _wave(3, 3)  # each axis 3/16 < 0.25, radially 0.265 > 0.25: high
    edge = _wave(4, 0)  # exactly 0.25: not strictly above
    imgs = np.stack([low, high, diag, edge, 3.0 * low + high + 5.0])[..., None]
    got = hfer(imgs)
    np.testing.assert_allclose(got[:4], [0.0, 1.0, 1.0, 0.0], atol=1e-12)
    # a mix: power splits as the squared amplitudes (the constant offset is removed)
    np.testing.assert_allclose(got[4], 1.0 / (9.0 + 1.0), rtol=1e-10)
    # channels are summed: a low channel and a high channel of equal amplitude -> 1/2
    np.testing.assert_allclose(hfer(np.stack([low, high], -1)[None]), [0.5], rtol=1e-10)
    # (N, H, W) accepted; a constant image (no non-DC power) scores 0
    np.testing.assert_allclose(hfer(np.stack([high, np.full((n, n), 0.7)])), [1.0, 0.0])


def test_hfer_white_noise_is_the_share_of_high_bins():
    rng = np.random.default_rng(11)
    got = hfer(rng.standard_normal((4000, 8, 8, 1)))
    np.testing.assert_allclose(got.mean(), 51 / 63, atol=3 * got.std() / np.sqrt(4000))
    with pytest.raises(ValueError, match="images must have shape"):
        hfer(np.zeros((2, 1, 8, 1)))
    with pytest.raises(ValueError, match="images must be finite"):
        hfer(np.full((2, 8, 8, 1), np.inf))


# ------------------------------------------------------------------ label adherence


def test_label_accuracy():
    labels = np.array([0, 1, 2, 3])
    assert label_accuracy(np.array([0, 1, 0, 3]), labels) == 0.75
    scores = np.eye(4)[[0, 1, 2, 2]]  # argmax of (N, K) scores
    assert label_accuracy(scores, labels) == 0.75
    with pytest.raises(ValueError, match="predicted must have shape"):
        label_accuracy(np.array([0, 1]), labels)
    with pytest.raises(TypeError, match="integers"):
        label_accuracy(np.array([0.0, 1.0, 2.0, 3.0]), labels)
