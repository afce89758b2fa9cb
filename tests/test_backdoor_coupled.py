"""The backdoor's coupled susceptibility profile (experiments/benchmarks/backdoor_coupled.py):
its per-sequence observable and an end-to-end quick run."""

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformer_lens")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import observables as ob  # noqa: E402
from experiments.benchmarks import backdoor_coupled as bc  # noqa: E402
from observables.registry import CenteredTokenLoss  # noqa: E402


def test_centered_sample_loss_is_the_token_mean():
    """``l_i - Lbar_S`` per sequence is the mean over i's tokens of ``l_x - Lbar_S``, per
    component at a draw away from w*, so its susceptibility is the mean chi row exactly."""
    model = ob.build(n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=12, n_ctx=8, seed=0)
    probe = torch.randint(0, 12, (5, 8), generator=torch.Generator().manual_seed(0))
    comps = ("L0H1", "L1H0", "embed")
    plan = ob.EvaluationPlan(model, probe, [CenteredTokenLoss(comps, name="token"),
                                            bc.CenteredSampleLoss(comps, name="sequence")])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    v = plan(model)
    assert v["sequence"].shape == (3, 5)
    token = v["token"].reshape(3, 5, 7).mean(-1)
    assert torch.allclose(v["sequence"], token, atol=1e-6)
    assert v["sequence"].abs().max() > 1e-3  # the sequences differ: not a vacuous match
    loss = bc.sequence_loss(model, probe)
    assert loss.shape == (5,) and torch.allclose(loss, ob.token_losses(model(probe), probe)
                                                 .mean(-1))


@pytest.mark.parametrize("base", ["pathwise", "interpolation"])
def test_quick_run_end_to_end(tmp_path, base):
    pool = ["--pool", "4"] if base == "interpolation" else []  # a draw costs ~10 evaluations
    report = bc.main(["--quick", "--base", base, "--out", str(tmp_path), *pool])
    profiles = report["profiles"]
    assert set(profiles) == {"plain", "coupled", "added (chi - chi0)",
                             "chi0 of the coupled split", "chi0, whole pool"}
    for name, f in profiles.items():
        assert len(f["split_half"]) == 10, name
        assert 0 <= f["auroc"] <= 1 and f["auroc_se"] >= 0 and 0 <= f["tpr_at_5fpr"] <= 1
    diff = report["auroc_differences"]["coupled - plain"]
    assert diff["value"] == pytest.approx(profiles["coupled"]["auroc"]
                                          - profiles["plain"]["auroc"], abs=1e-12)
    sp, sec = report["split"], report["seconds"]
    # its CPU seconds: every chain's skipped and kept SGLD draws with their twins, its base
    # pairs and the base's one-off Jacobian
    charged = 4 * ((sp["skip"] + sp["ks"]) * sp["c_run_and_twin"]
                   + 2 * sp["kb_pairs"] * sp["c_base"]) + sec["pool_parts"].get("jacobian", 0)
    assert ("jacobian" in sec["pool_parts"]) == (base == "pathwise")
    assert sp["seconds"] == pytest.approx(charged, rel=1e-12)
    assert sp["ks"] >= 2 and sp["kb_pairs"] >= 2
    # the budget (the plain run's seconds) is kept unless the floor of 2 SGLD draws is over it
    assert sp["over_budget"] == (sp["seconds"] > sec["run"])
    assert not sp["over_budget"] or sp["ks"] == 2
    assert report["regime"]["stability"] > 0 and "agreement_detail" in report["regime"]
    tag = "" if base == "pathwise" else "_interpolation"
    saved = torch.load(tmp_path / f"profiles_quick_rate0.03_seed0{tag}.pt")
    n = len(saved["part"])
    for key in ("chi", "added", "chi0", "plain", "chi0_pool"):
        assert saved[key].shape == (n, 10) and torch.isfinite(saved[key]).all(), key
    assert torch.allclose(saved["chi"], saved["added"] + saved["chi0"], rtol=0, atol=1e-12)
    assert not torch.allclose(saved["chi"], saved["plain"])
