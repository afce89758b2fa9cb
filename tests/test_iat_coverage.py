"""Error bars against the autocorrelation time: coverage of the jackknife interval on AR(1)
chains of known IAT, the block-length warning it justifies, and Pareto-k of heavy weights."""

import math
import warnings

import pytest
import torch

import suscept
from suscept.estimators import BLOCK_IATS_MIN

K = 250  # independent AR(1) series per call (one column each); 8 calls per setting


def ar1(chains: int, draws: int, tau: float, seed: int) -> torch.Tensor:
    """Stationary unit-variance AR(1) draws [chain, draw, K] with IAT (1 + r) / (1 - r) = tau."""
    r = (tau - 1) / (tau + 1)
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(chains, draws, K, generator=g, dtype=torch.float64)
    x = torch.empty_like(e)
    x[:, 0] = e[:, 0]
    for d in range(1, draws):
        x[:, d] = r * x[:, d - 1] + math.sqrt(1 - r * r) * e[:, d]
    return x


def coverage(tau: float, blocks_per_iat: float, seed: int) -> dict:
    """4 chains x 5 blocks (the default 20 segments); +-1.96 SE coverage of the mean (via
    per_sample_llc with n_beta 1, anchor 0) and of the variance (singular_fluctuation)."""
    length = round(blocks_per_iat * tau)
    hits = {"mean": [], "var": [], "block_iats": [], "iat": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rep in range(8):
            x = ar1(4, 5 * length, tau, seed + rep)
            mean = suscept.per_sample_llc(x, torch.zeros(K), 1.0, n_blocks=5)
            var = suscept.singular_fluctuation(x, 2.0, per_sample=True, n_blocks=5)
            hits["mean"].append((mean.value.abs() < 1.96 * mean.stderr).double().mean())
            hits["var"].append(((var.value - 1).abs() < 1.96 * var.stderr).double().mean())
            hits["block_iats"].append(mean.meta["block_iats"])
            hits["iat"].append(mean.meta["iat"])
    out = {k: float(torch.tensor(v).mean()) for k, v in hits.items()}
    return out | {"warned": any("autocorrelation times" in str(w.message) for w in caught)}


@pytest.fixture(scope="module")
def table():
    rows = {r: coverage(5.0, r, seed=int(100 * r)) for r in (1, 4, 16)}
    print("\nblocks/IAT  reported  IAT(est)  coverage mean  coverage var   (nominal 0.935)")
    for r, row in rows.items():
        print(f"{r:10g}  {row['block_iats']:8.2f}  {row['iat']:8.2f}  {row['mean']:13.3f}  "
              f"{row['var']:12.3f}")
    return rows


def test_reported_block_length_in_iats(table):
    for r, row in table.items():
        assert 0.67 * r < row["block_iats"] < 1.5 * r, (r, row)  # batch means, true IAT 5


def test_coverage_is_honest_above_the_threshold_and_warned_below(table):
    se = math.sqrt(0.935 * 0.065 / (8 * K))  # binomial error of one coverage figure
    for r in (4, 16):
        assert r >= BLOCK_IATS_MIN and not table[r]["warned"]
        assert table[r]["mean"] > 0.935 - 0.035 and table[r]["var"] > 0.935 - 0.05
    short = table[1]
    assert short["warned"]
    # the test has power: one IAT per block loses coverage well beyond the binomial error
    assert table[16]["mean"] - short["mean"] > 3 * math.sqrt(2) * se
    assert table[16]["var"] - short["var"] > 3 * math.sqrt(2) * se


def test_pareto_k_flags_infinite_variance_weights():
    """Weights exp(beta l) with l = c w^2 / 2, w ~ N(0, 1): tail index k = beta c exactly."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 1000, 1, generator=g, dtype=torch.float64)
    losses = torch.cat([0.3 * w**2 / 2, 0.9 * w**2 / 2], -1)  # k = 0.3 and 0.9 at beta 1
    with pytest.warns(suscept.EstimatorWarning, match=r"samples \[1\]"):
        est = suscept.loo_reweighted(losses, w, beta=1.0)
    k = est.meta["pareto_k"]
    assert abs(k[0] - 0.3) < 0.15 and k[1] > 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        suscept.loo_reweighted(losses[..., :1], w, beta=1.0)


def test_restricted_runs_have_their_own_seeds_and_a_joint_error():
    pytest.importorskip("transformer_lens")
    import observables as ob

    model = ob.build(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=20, n_ctx=8, seed=0)
    train = torch.randint(0, 20, (32, 8), generator=torch.Generator().manual_seed(0))
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=20.0, gamma=300.0, n_chains=2,
                                n_draws=20, batch_size=16, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", suscept.EstimatorWarning)
        res = ob.restricted_runs(model, train, train[:3], ["L0H0", "L0H1"], cfg, progress=False)
    assert res.full_run.config["seed"] == 3 and res.total.meta["seeds"] == [4, 5]
    torch.testing.assert_close(res.total.value, res.covariance.value + res.shift.value)
    # the parts share the restricted draws: the joint error is not their quadrature sum
    independent = (res.covariance.stderr**2 + res.shift.stderr**2).sqrt()
    assert ((res.total.stderr - independent).abs() > 0.05 * independent).any()
