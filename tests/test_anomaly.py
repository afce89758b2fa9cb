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


# ---- MAD-FA scores and the metrics -------------------------------------------------------
def factor_traces(n_draws, loadings, seed):
    """Gaussian loss traces ``[2, n_draws // 2, n]``: input i is ``sum_f loadings[i, f] z_f +
    e_i`` with independent standard normal factors ``z_f`` and noise ``e_i`` per draw, so
    ``Corr(l_i, l_j) = a_i . a_j / sqrt((|a_i|^2 + 1)(|a_j|^2 + 1))`` exactly."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_draws, loadings.shape[1], generator=g, dtype=torch.float64)
    e = torch.randn(n_draws, loadings.shape[0], generator=g, dtype=torch.float64)
    return (z @ loadings.T + e).reshape(2, n_draws // 2, -1)


def test_trace_correlation_is_the_loss_kernel_correlation():
    import suscept

    x = factor_traces(400, torch.rand(12, 2, generator=torch.Generator().manual_seed(0),
                                      dtype=torch.float64), 1)
    k = suscept.loss_kernel(x, correlation=True).value
    r = anomaly.trace_correlation(x[..., :5], x[..., 5:])
    torch.testing.assert_close(r, k[:5, 5:], rtol=1e-12, atol=1e-12)


def test_madfa_scores_recover_planted_correlations():
    """Trusted inputs of class 0 load 1.5 on factor 0, class 1 on factor 1; clean test inputs
    load like class 1, anomalous ones on factor 2 (shared by no trusted input). Exact
    correlations: rho = 1.5^2 / (1.5^2 + 1) within a factor, 0 across factors, so mean score
    -rho / 2 (clean) and 0 (anomalous), class-wise -rho and 0. Tolerance: 4 standard errors of
    a sample correlation, (1 - rho^2) / sqrt(draws), which bounds a mean of correlations too."""
    n_draws, a = 4000, 1.5
    loadings = torch.zeros(40 + 20 + 20, 3, dtype=torch.float64)
    loadings[:20, 0] = a
    loadings[20:40, 1] = a  # trusted: 20 of class 0, 20 of class 1
    loadings[40:60, 1] = a  # clean test
    loadings[60:, 2] = a  # anomalous test
    x = factor_traces(n_draws, loadings, 2)
    classes = torch.arange(40) >= 20
    s = anomaly.madfa_scores(x[..., 40:], x[..., :40], classes)
    rho = a**2 / (a**2 + 1)
    tol = 4 * (1 - rho**2) / math.sqrt(n_draws)
    clean, odd = slice(0, 20), slice(20, 40)
    assert (s["mean"][clean] + rho / 2).abs().max() < tol
    assert (s["classwise"][clean] + rho).abs().max() < tol
    assert s["mean"][odd].abs().max() < 4 / math.sqrt(n_draws)
    assert s["classwise"][odd].abs().max() < 4 / math.sqrt(n_draws)
    positive = torch.arange(40) >= 20
    named = anomaly.madfa_scores(x[..., 40:], x[..., :40], ["b" if c else "a" for c in classes])
    assert torch.equal(named["classwise"], s["classwise"])
    for key in ("mean", "classwise"):  # separable: exact AUROC 1, standard error 0
        assert anomaly.auroc(s[key], positive) == (1.0, 0.0)


def test_pool_exact():
    s = torch.tensor([[1.0, 5.0, 3.0, 2.0], [4.0, 0.0, 9.0, 8.0]])
    mask = torch.tensor([[True, False, True, True], [True, True, True, True]])
    assert anomaly.pool(s, "max").tolist() == [5.0, 9.0]
    assert anomaly.pool(s, "topk", k=2).tolist() == [4.0, 8.5]
    assert anomaly.pool(s, "mean").tolist() == [2.75, 5.25]
    assert anomaly.pool(s, "max", mask=mask).tolist() == [3.0, 9.0]
    assert anomaly.pool(s, "topk", k=2, mask=mask).tolist() == [2.5, 8.5]
    with pytest.raises(ConfigError, match="fewer than 4"):
        anomaly.pool(s, "topk", k=4, mask=mask)


def test_auroc_exact_and_against_the_normal_shift():
    pos, neg = torch.tensor([0.9, 0.5, 0.5]), torch.tensor([0.1, 0.5, 0.2, 0.3])
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    value, se = anomaly.auroc(torch.cat([pos, neg]), labels)
    # pairs: 0.9 beats 4; each 0.5 beats 3 and ties 1: (4 + 3.5 + 3.5) / 12
    assert value == pytest.approx(11 / 12, abs=1e-15) and se > 0
    assert value == pytest.approx(auroc(torch.cat([pos, neg]), labels), abs=1e-15)
    g = torch.Generator().manual_seed(3)
    d, n = 1.0, 2000
    scores = torch.cat([torch.randn(n, generator=g) + d, torch.randn(n, generator=g)])
    value, se = anomaly.auroc(scores, torch.arange(2 * n) < n)
    assert abs(value - stats.norm.cdf(d / math.sqrt(2))) < 4 * se


def test_delong_standard_errors_match_the_spread_over_repetitions():
    """AUROC and the paired difference of two correlated scores, 300 repetitions of 100 + 100
    inputs: the mean DeLong standard error equals the standard deviation of the estimates
    within 4 relative standard errors of a standard deviation, 4 / sqrt(2 (R - 1))."""
    g = torch.Generator().manual_seed(4)
    reps, n = 300, 100
    labels = torch.arange(2 * n) < n
    a_vals, d_vals, a_se, d_se = [], [], [], []
    for _ in range(reps):
        base = torch.randn(2 * n, generator=g, dtype=torch.float64) + 0.8 * labels
        other = base + torch.randn(2 * n, generator=g, dtype=torch.float64) + 0.3 * labels
        a = anomaly.auroc(base, labels)
        dd = anomaly.auroc_difference(base, other, labels)
        a_vals.append(a.value)
        a_se.append(a.stderr)
        d_vals.append(dd.value)
        d_se.append(dd.stderr)
    tol = 4 / math.sqrt(2 * (reps - 1))
    for vals, ses in ((a_vals, a_se), (d_vals, d_se)):
        ratio = float(np.mean(ses) / np.std(vals, ddof=1))
        assert abs(ratio - 1) < tol, ratio
    assert anomaly.auroc_difference(base, base, labels) == (0.0, 0.0)


def test_conformal_rates_cover_the_false_positive_rate():
    """Held-out clean scores: averaged over 300 calibration sets of m = 39, the FPR equals the
    exact 1 - r/(m+1) = 0.05 within 4 standard errors; one set's TPR and FPR are binomial
    proportions with their reported standard errors."""
    g = torch.Generator().manual_seed(5)
    fprs = []
    for _ in range(300):
        cal = torch.randn(39, generator=g)
        test = torch.cat([torch.randn(100, generator=g), torch.randn(50, generator=g) + 3])
        r = anomaly.conformal_rates(cal, test, torch.arange(150) >= 100, 0.05)
        fprs.append(r["fpr"].value)
    assert r["expected_fpr"] == pytest.approx(0.05)
    fprs = torch.tensor(fprs)
    assert abs(fprs.mean().item() - 0.05) < 4 * fprs.std().item() / math.sqrt(len(fprs))
    p = r["tpr"].value
    assert r["tpr"].stderr == pytest.approx(math.sqrt(p * (1 - p) / 50))
    assert r["threshold"] == anomaly.conformal_threshold(cal, 0.05)[0] == cal.sort()[0][37]
    with pytest.raises(ConfigError, match="at least 19"):
        anomaly.conformal_threshold(cal[:10], 0.05)


def test_detection_rate_and_evaluate():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.55, 0.95])
    positive = torch.tensor([0] * 10 + [1, 1], dtype=torch.bool)
    rate = anomaly.detection_rate(scores, positive, 0.1)
    assert rate.value == 0.5 and rate.stderr == pytest.approx(math.sqrt(0.25 / 2), rel=1e-15)
    out = anomaly.evaluate(scores, positive, calibration=torch.linspace(0, 1, 39))
    assert out["detection_rate"].value == anomaly.tpr_at_fpr(scores, positive, 0.05)
    assert set(out) == {"auroc", "detection_rate", "conformal"}


def test_madfa_errors():
    x = factor_traces(100, torch.ones(6, 1, dtype=torch.float64), 6)
    with pytest.raises(ShapeError, match="same draws"):
        anomaly.madfa_scores(x[:, :20], x)
    bad = x.clone()
    bad[0, 3, 2] = float("nan")
    with pytest.raises(ShapeError, match=r"inputs \[2\]"):
        anomaly.madfa_scores(bad, x)
    const = x.clone()
    const[..., 1] = 0.5
    with pytest.raises(ShapeError, match="constant"):
        anomaly.madfa_scores(x, const)
    with pytest.raises(ShapeError, match="class labels"):
        anomaly.madfa_scores(x, x, classes=torch.zeros(3))
    with pytest.raises(ConfigError, match="both positive"):
        anomaly.auroc(torch.ones(4), torch.zeros(4))
