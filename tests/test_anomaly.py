"""The anomaly detector on synthetic profiles with known answers: Ledoit-Wolf and Mahalanobis
against scikit-learn, the conformal false-positive rate against its exact value, detection of
planted outliers against the noncentral chi-square, the explanation of which component."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from experiments.common import auroc
from suscept import anomaly
from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate

K = 8


def gaussian(n, seed, cov=None):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, K, generator=g, dtype=torch.float64)
    return z if cov is None else z @ torch.linalg.cholesky(cov).T


def correlated_cov():
    a = gaussian(K, 99) / math.sqrt(K)
    return a @ a.T + 0.5 * torch.eye(K, dtype=torch.float64)


def test_ledoit_wolf_and_mahalanobis_equal_sklearn():
    cov_mod = pytest.importorskip("sklearn.covariance")
    for n in (12, 40, 500):  # few profiles per component (strong shrinkage) to many
        x = gaussian(n, n, correlated_cov())
        y = gaussian(30, 1000 + n, correlated_cov()) + 1.0
        lw = cov_mod.LedoitWolf().fit(x.numpy())
        cov, a = anomaly.ledoit_wolf(x)
        np.testing.assert_allclose(cov.numpy(), lw.covariance_, rtol=1e-10, atol=1e-14)
        assert a == pytest.approx(lw.shrinkage_, abs=1e-12)
        det = anomaly.fit(x, x, fpr=0.5)
        np.testing.assert_allclose(det.score(y).numpy(), lw.mahalanobis(y.numpy()), rtol=1e-9)


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_contributions_sum_to_the_score(method):
    x = gaussian(200, 1, correlated_cov())
    det = anomaly.fit(x, method=method, k=4)
    y = gaussian(50, 2) * 3
    c = det.contributions(y)
    assert c.shape == (50, K)
    torch.testing.assert_close(c.sum(1), det.score(y), rtol=1e-12, atol=1e-12)
    if method == "knn":  # brute force: mean squared standardized distance to the 4 nearest
        ref = det.reference / det.scale
        d2 = ((y[:, None] / det.scale - ref[None]) ** 2).sum(-1)
        torch.testing.assert_close(det.score(y), d2.sort(1)[0][:, :4].mean(1), rtol=1e-12,
                                   atol=1e-12)


def test_false_positive_rate_is_the_exact_conformal_rate():
    """Averaged over calibration sets, P(score > threshold) = 1 - r/(m + 1) exactly."""
    m, trials, n_test = 39, 300, 50  # r = ceil(0.95 * 40) = 38: expected FPR 0.05
    cov = correlated_cov()
    det = anomaly.fit(gaussian(300, 0, cov), gaussian(m, 1, cov))
    rates = []
    for t in range(trials):
        det.calibrate(gaussian(m, 10 + t, cov), fpr=0.05)
        rates.append(det.predict(gaussian(n_test, 10_000 + t, cov)).double().mean().item())
    rates = torch.tensor(rates)
    assert det.expected_fpr == pytest.approx(1 - 38 / 40)
    se = rates.std().item() / math.sqrt(trials)
    assert abs(rates.mean().item() - det.expected_fpr) < 4 * se, (rates.mean(), se)


def test_threshold_matches_the_chi_square_quantile():
    """Gaussian profiles: the Mahalanobis score is ~ chi^2_K, so the calibrated threshold (an
    order statistic of m scores) estimates its quantile; tolerance 4 standard errors of it."""
    m, n = 2000, 4000
    det = anomaly.fit(gaussian(n, 3, correlated_cov()), gaussian(m, 4, correlated_cov()))
    q = 1 - det.expected_fpr
    x_q = stats.chi2.ppf(q, K)
    se = math.sqrt(q * (1 - q) / m) / stats.chi2.pdf(x_q, K)
    assert abs(det.threshold - x_q) < 4 * se, (det.threshold, x_q, se)


def test_planted_outliers_are_detected_and_explained():
    """Outliers shifted by delta along component 3: the score is noncentral chi^2_K with
    lambda = delta^2 (Sigma^-1)_33; the detected fraction matches its tail within binomial
    error, and component 3 has the largest contribution."""
    cov = correlated_cov()
    det = anomaly.fit(gaussian(4000, 5, cov), gaussian(1000, 6, cov),
                      components=[f"L{i // 4}H{i % 4}" for i in range(K)])
    delta, n_out = 2.5, 2000
    shift = torch.zeros(K, dtype=torch.float64)
    shift[3] = delta
    outliers = gaussian(n_out, 7, cov) + shift
    lam = delta**2 * torch.linalg.inv(cov)[3, 3].item()
    p = stats.ncx2.sf(det.threshold, K, lam)
    tpr = det.predict(outliers).double().mean().item()
    assert abs(tpr - p) < 4 * math.sqrt(p * (1 - p) / n_out) + 0.01, (tpr, p)
    big = gaussian(200, 8, cov) + 4 * shift
    assert det.predict(big).all()
    top = [e[0][0] for e in det.explain(big)]
    assert top.count("L0H3") >= 0.95 * len(top)


def test_knn_handles_two_clusters_where_mahalanobis_cannot():
    centers = torch.full((2, K), 3.0, dtype=torch.float64)
    centers[0] = -3.0
    ref = gaussian(600, 9) + centers[torch.arange(600) % 2]
    test_in = gaussian(200, 10) + centers[torch.arange(200) % 2]
    test_out = gaussian(200, 11)  # between the clusters: near the overall mean
    x = torch.cat([test_in, test_out])
    is_out = torch.arange(400) >= 200
    knn = anomaly.fit(ref, method="knn", k=5)
    maha = anomaly.fit(ref)
    assert auroc(knn.score(x), is_out) > 0.99
    assert auroc(maha.score(x), is_out) < 0.6  # the single ellipsoid puts them in its middle


def test_estimate_input_and_save_load(tmp_path):
    x = gaussian(100, 12)
    est = Estimate(x, torch.zeros_like(x), ("sample", "component"), "susceptibility", "t",
                   {"components": [f"C{i}" for i in range(K)]})
    det = anomaly.fit(est, method="knn", k=3)
    assert det.components == [f"C{i}" for i in range(K)] and det.n_calibration == 30
    back = anomaly.Detector.load(det.save(tmp_path / "det.pt"))
    y = gaussian(20, 13)
    torch.testing.assert_close(back.score(y), det.score(y), rtol=0, atol=0)
    assert back.threshold == det.threshold and back.method == "knn"


def test_tpr_at_fpr_exact():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.55, 0.95])
    positive = torch.tensor([0] * 10 + [1, 1], dtype=torch.bool)
    # 10 negatives, fpr 0.1: threshold = 9th smallest negative (0.9); flagged: 0.95 only
    assert anomaly.tpr_at_fpr(scores, positive, 0.1) == 0.5


def test_bad_input_gets_clear_errors():
    x = gaussian(100, 14)
    with pytest.raises(ConfigError, match="empty"):
        anomaly.fit(x[:0])
    det = anomaly.fit(x)
    with pytest.raises(ShapeError, match="fitted on 8"):
        det.score(x[:, :5])
    bad = x.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ShapeError, match=r"rows \[7\]"):
        det.score(bad)
    with pytest.raises(ShapeError, match="NaN"):
        anomaly.fit(bad)
    with pytest.raises(ConfigError, match="calibrate fpr"):
        anomaly.fit(x, x[:10], fpr=0.05)
    with pytest.raises(ConfigError, match="method"):
        anomaly.fit(x, method="isolation")
    with pytest.raises(ShapeError, match="shape"):
        det.score(x[0])
    const = x.clone()
    const[:, 4] = 1.0
    with pytest.raises(ShapeError, match="constant"):
        anomaly.fit(const)
