"""The causal-sign experiment's noise-corrected slope (experiments/causal_sign.py) on
simulated predictions with a known true slope: two independent noisy predictions of a truth
``x`` and a measurement ``m = b x + noise``. The plain regression on one prediction is diluted
to ``b var(x) / (var(x) + var(e))``; the corrected slopes are not, and their jackknife errors
match the spread over repetitions."""

import math

import torch

from experiments.causal_sign import noise_corrected_slope

B, N, REPS = 1.0, 150, 200


def simulate(g: torch.Generator):
    x = torch.randn(N, generator=g, dtype=torch.float64)
    p1 = x + torch.randn(N, generator=g, dtype=torch.float64)  # var(e) = var(x): dilution 1/2
    p2 = x + torch.randn(N, generator=g, dtype=torch.float64)
    m = B * x + 0.5 * torch.randn(N, generator=g, dtype=torch.float64)
    return p1, p2, m


def test_noise_corrected_slope_is_unbiased_where_plain_regression_is_diluted():
    g = torch.Generator().manual_seed(0)
    fits, plain = [], []
    for _ in range(REPS):
        p1, p2, m = simulate(g)
        fits.append(noise_corrected_slope(p1, p2, m))
        plain.append(float((p1 * m).sum() / (p1 * p1).sum()))
    plain = torch.tensor(plain)
    # power: the uncorrected slope sits near 1/2, many of its standard errors below B
    assert float(plain.mean()) + 4.5 * float(plain.std()) / math.sqrt(REPS) < 0.75 * B
    for key in ("", "symmetric_"):
        slope = torch.tensor([f[f"{key}slope" if key else "slope"] for f in fits])
        se = torch.tensor([f[f"{key}se"] for f in fits])
        spread = float(slope.std())
        # unbiased (to O(1/N)) within the error of the mean over repetitions
        assert abs(float(slope.mean()) - B) < 4.5 * spread / math.sqrt(REPS), (key, slope.mean())
        # the jackknife error is honest: its mean matches the spread over repetitions within
        # the sampling error of a standard deviation, sd / sqrt(2 (R - 1))
        assert abs(float(se.mean()) / spread - 1) < 4.5 / math.sqrt(2 * (REPS - 1)), key
