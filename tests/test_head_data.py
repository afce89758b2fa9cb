"""The fine-tuning ground truth of a head's data attribution (experiments/head_data.py)."""

import pytest
import torch

pytest.importorskip("transformer_lens")

import observables as ob  # noqa: E402
from observables.adapter import Adapter  # noqa: E402
from observables.components import expand  # noqa: E402

G = torch.Generator().manual_seed(1)
TRAIN = torch.randint(0, 20, (32, 12), generator=G)
PROBE = torch.randint(0, 20, (6, 12), generator=G)
TYPES = torch.randint(0, 3, (6 * 11,), generator=G)


@pytest.fixture(scope="module")
def model():
    return ob.build(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=20, n_ctx=12, seed=0)


def test_group_weights_move_weight_from_the_probe_mean():
    from experiments.head_data import group_weights

    groups, w = group_weights(6, 11, TYPES, ("a", "b", "c"))
    assert groups.names == [f"seq{i}" for i in range(6)] + ["a", "b", "c"]
    assert w.shape == (66, 9)
    torch.testing.assert_close(w.sum(0), torch.zeros(9, dtype=w.dtype), atol=1e-14, rtol=0)
    # a member gets 1/|g| - 1/X, a non-member -1/X
    assert torch.allclose(w[:11, 0], torch.full((11,), 1 / 11 - 1 / 66, dtype=w.dtype))
    assert torch.allclose(w[11:, 0], torch.full((55,), -1 / 66, dtype=w.dtype))
    n_b = int((TYPES == 1).sum())
    assert torch.allclose(w[TYPES == 1, 7], torch.full((n_b,), 1 / n_b - 1 / 66, dtype=w.dtype))


def test_head_losses_mix_only_the_head(model):
    from experiments.head_data import head_losses, token_loss

    masks = [c.mask() for c in expand("all heads", Adapter.of(model))]
    own = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        base = token_loss(model, PROBE).mean().double()
    torch.testing.assert_close(head_losses(model, own, masks, PROBE), base.expand(8))
    moved = {n: p + 0.3 * torch.randn(p.shape, generator=G) for n, p in own.items()}
    mixed = head_losses(model, moved, masks, PROBE)
    assert (mixed != base).all()  # every head's slice of the moved weights changes its loss
    # head L1H2 alone moved: only its entry changes
    only = {n: torch.where(masks[6][n], moved[n], p) if n in masks[6] else p
            for n, p in own.items()}
    one = head_losses(model, only, masks, PROBE)
    assert one[6] == mixed[6] and (one[[0, 1, 2, 3, 4, 5, 7]] == base).all()


def test_short_fine_tuning_is_the_gradient_dot_product_and_the_linearized_descent(model):
    """One gradient step of length ``lr`` on ``L_anchor + a f_g``: the central difference in
    ``a`` of ``phi_C`` divided by ``lr`` is ``-grad_C Lbar_S . grad_C f_g`` up to O(lr) (the
    anchor's gradient cancels in the difference). The remainder, measured 0.8% of the largest
    entry at lr 1e-2, is ~0.08% at lr 1e-3; float32 rounding of the loss differences adds
    ~3e-4 (6e-8 relative on a loss of ~3, over lr * 2a * max|gd| ~ 6e-4). Bound: 5e-3."""
    from experiments.head_data import (
        FineTune,
        finetune,
        gradient_dot,
        group_weights,
        head_losses,
        unrolled,
    )

    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    masks = [c.mask() for c in expand("all heads", Adapter.of(model))]
    _, w = group_weights(6, 11, TYPES, ("a", "b", "c"))
    gd = gradient_dot(model, PROBE, w, masks)
    lr = 1e-3
    ft = FineTune(lr=lr, steps=(1, 2), a=1.0, n_anchor=32)

    def response(g: int) -> dict[int, torch.Tensor]:
        up, down = (finetune(model, TRAIN, PROBE, w[:, g], a, ft) for a in (1.0, -1.0))
        return {k: (head_losses(model, up[k], masks, PROBE)
                    - head_losses(model, down[k], masks, PROBE)) / (2 * lr) for k in ft.steps}

    fd = [response(g) for g in range(w.shape[1])]
    one, two = (torch.stack([f[k] for f in fd]) for k in (1, 2))
    assert float((one - gd).abs().max() / gd.abs().max()) < 5e-3
    # the linearized descent: one step is lr * gradient_dot exactly (float32 gradients summed
    # in float64 both ways); two steps follow the fine-tuning's second step to the same bound
    lin = unrolled(model, TRAIN, PROBE, w, masks, ft)
    torch.testing.assert_close(lin[1] / lr, gd, rtol=1e-5, atol=1e-7)
    assert float((lin[2] / lr - two).abs().max() / two.abs().max()) < 5e-3
    assert float((lin[2] - lin[1]).abs().max()) > 0.5 * float(lin[1].abs().max())  # 2nd step
    # the model is untouched: same weights, no gradients left, eval mode kept
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_head_data_quick(tmp_path):
    """End to end on the quick model: files, shapes, the ground truth's linearity in ``a``
    and the deterministic first-order predictor (measured with these settings: ratio 1.06,
    gradient_dot 0.86-0.99 at both lengths)."""
    pytest.importorskip("matplotlib")
    from experiments import head_data

    figures = head_data.main(["--quick", "--variant", "attn", "--draws", "8",
                              "--chi0-draws", "4", "--out", str(tmp_path)])
    for name in ("figures.json", "report.md", "data_attn_seed0.pt", "data_attn_seed0.png"):
        assert (tmp_path / name).exists(), name
    r = figures["runs"][0]
    steps = [str(k) for k in head_data.QUICK_FT.steps]
    assert list(r["scores"]) == steps
    assert set(r["scores"][steps[0]]) == set(head_data.SIGNALS)
    assert set(r["ceiling"]) == {"cross", "restricted"}
    for k in steps:
        for name, sc in r["scores"][k].items():
            v = sc["sequences"]["per_head"]
            assert ((v >= -1) & (v <= 1)).all(), (k, name)
    # deterministic (no sampling): the central difference is linear in a (a vs a/2) ...
    assert 0.8 < r["truth_linearity"]["ratio"] < 1.25
    # ... and the short fine-tuning follows its first-order term, per head over sequences
    assert min(r["scores"][steps[0]]["gradient_dot"]["sequences"]["layer"].values()) > 0.7
    saved = torch.load(tmp_path / "data_attn_seed0.pt")
    n_groups = len(saved["groups"])
    assert saved["truth"][int(steps[0])].shape == (n_groups, 8)
    assert saved["values"]["cross"][0].shape == (n_groups, 8)
    report = (tmp_path / "report.md").read_text()
    assert "| cross |" in report and "eps * p_max" in report
    # analysed again from the saved values, without sampling or fine-tuning: the same scores
    again = head_data.main(["--quick", "--rescore", "--out", str(tmp_path)])["runs"][0]
    for k in steps:
        for name in head_data.SIGNALS:
            torch.testing.assert_close(
                torch.as_tensor(again["scores"][k][name]["sequences"]["per_head"]),
                torch.as_tensor(r["scores"][k][name]["sequences"]["per_head"]))
    assert set(again["vs_gradient_dot"]) == set(head_data.SAMPLED)
    # another sampler, the same fine-tuning ground truth reused (it does not depend on it)
    other = head_data.main(["--quick", "--variant", "attn", "--draws", "4", "--chi0-draws", "2",
                            "--n-beta", "60", "--step-size", "5e-4", "--truth-from",
                            str(tmp_path), "--out", str(tmp_path / "nb60")])["runs"][0]
    assert other["sampler"]["n_beta"] == 60 and other["truth_from"] == str(tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "nb60" / "data_attn_seed0.pt")["truth"],
                               saved["truth"])
    with pytest.raises(FileNotFoundError, match="truth-from"):
        head_data.main(["--quick", "--variant", "attn", "--seeds", "1", "--draws", "4",
                        "--truth-from", str(tmp_path), "--out", str(tmp_path / "none")])
