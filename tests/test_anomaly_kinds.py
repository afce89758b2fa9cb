"""The anomaly organisms are what they say, and the --quick runner detects them from one run."""

import json

import pytest
import torch

pytest.importorskip("transformer_lens")
pytest.importorskip("matplotlib")

import observables  # noqa: E402
from experiments import anomaly_kinds as ak  # noqa: E402
from experiments import anomaly_profiles as ap  # noqa: E402
from experiments import anomaly_report  # noqa: E402
from experiments.zoo import train as zoo_train  # noqa: E402
from experiments.zoo.language import Language, make_dataset  # noqa: E402
from suscept import anomaly  # noqa: E402

needs_shipped = pytest.mark.skipif(observables.backend() != "hooked",
                                   reason="the shipped zoo checkpoint is TransformerLens 3.x's")


def test_switch_keeps_the_copy_then_follows_the_most_likely_successor():
    keep, n = 3, 60
    got = ak.switch_candidates(n, seed=0, keep=keep)
    data = make_dataset(n, seed=70_000)
    succ = Language().successors
    assert got.shape == data.tokens.shape
    for i in range(n):
        p2, length = int(data.seg_starts[i, 1]), int(data.seg_len[i])
        end = p2 + length
        assert torch.equal(got[i, : p2 + keep], data.tokens[i, : p2 + keep])  # copy kept
        for p in range(p2 + keep, end):
            assert got[i, p] == succ[int(got[i, p - 1]), 0]  # then the top successor
        changed = (got[i] != data.tokens[i]).nonzero().flatten()
        after = changed[changed >= end]  # the Markov filler right after the copy, re-ranked
        for p in after.tolist():
            assert int(data.types[i, p]) == 1
            rank = list(succ[int(data.tokens[i, p - 1])]).index(int(data.tokens[i, p]))
            assert got[i, p] == succ[int(got[i, p - 1]), rank]
        if len(after):
            assert torch.equal(got[i, after.max() + 1:], data.tokens[i, after.max() + 1:])


def test_shift_uses_transitions_the_clean_language_does_not():
    """Text bigrams of the shifted sequences are rarely among the clean table's 3 successors
    (3 of 56 by chance), those of clean sequences often are (all but the random segments)."""
    clean_succ = torch.as_tensor(Language().successors)

    def in_table(tokens):
        a, b = tokens[:, :-1].flatten(), tokens[:, 1:].flatten()
        text = (a < 56) & (b < 56)
        return float((clean_succ[a[text]] == b[text, None]).any(1).double().mean())

    assert in_table(ak.shifted(200, 0, ak.QUICK)) < 0.1  # measured 0.04
    assert in_table(make_dataset(200, seed=1).tokens) > 0.35  # measured 0.46
    assert ak.shifted(10, 0, ak.QUICK).max() < 64


@needs_shipped
def test_switched_sequences_match_clean_loss_but_candidates_do_not(tmp_path):
    """The loss matching is what makes the switch invisible to the loss: unmatched candidates
    differ from clean sequences in their smallest token loss (the induction tokens they lack),
    the matched ones do not (AUROC within 3 DeLong errors of chance, 64 vs 64)."""
    model = zoo_train.train_or_load("attn", 0, cache_dir=tmp_path, shipped=True).model
    clean = make_dataset(64, seed=5).tokens
    s = ak.QUICK
    candidates = ak.switch_candidates(64 * s.switch_pool, 0, s.switch_keep)
    picked = ak.matched(model, candidates, make_dataset(64, seed=6).tokens, seed=0)
    fc, fp, fa = (ak.loss_features(model, t) for t in (clean, picked, candidates[:64]))
    positive = torch.arange(128) >= 64
    raw = anomaly.auroc(torch.cat([fc[:, 1], fa[:, 1]]), positive)
    # the switch shows in the smallest token loss before matching (measured 0.80)
    assert raw.value > 0.5 + 4 * raw.stderr
    for j in range(3):
        r = anomaly.auroc(torch.cat([fc[:, j], fp[:, j]]), positive)
        assert abs(r.value - 0.5) < 3 * r.stderr, (j, r)
    assert len({tuple(t) for t in picked.tolist()}) == 64  # no candidate used twice


@needs_shipped
def test_anomaly_kinds_quick_shift_and_switch(tmp_path):
    # 4 chains x 20 draws keep the test short; the asserts below hold at w* or for any draws
    figures = ak.main(["--quick", "--draws", "20", "--kinds", "shift", "switch",
                       "--out", str(tmp_path)])
    out = tmp_path / "anomaly"
    for name in ("figures.json", "config.json", "report.md", "auroc.png", "scores.png",
                 "switch_losses.png", "profiles_clean_seed0.pt"):
        assert (out / name).exists(), name
    assert json.loads((out / "config.json").read_text())["kinds"] == ["shift", "switch"]
    (run,) = figures["runs"]
    assert run["cost"]["draws"] == 4 * 20
    shift, switch = run["kinds"]["shift"], run["kinds"]["switch"]
    # another transition table raises the bigram tokens' loss: the loss sees it
    assert shift["loss_baseline"]["auroc"] > 0.9
    # the switch is matched in loss: the sequence loss is near chance
    sl = switch["loss_baseline"]
    assert abs(sl["auroc"] - 0.5) < 3 * sl["auroc_se"] + 0.05
    for res in (shift, switch):
        assert set(ap.METHODS) <= set(res)
        for r in res.values():
            assert 0 <= r["auroc"] <= 1 and 0 <= r["conformal"]["expected_fpr"] <= 0.05
    for kind in ("shift", "switch"):
        d = run["differences"][kind]["fixed"]
        a = run["kinds"][kind]["fluctuation_max_token"]["auroc"]
        assert d["value"] == pytest.approx(a - run["kinds"][kind][d["b"]]["auroc"], abs=1e-12)
    assert run["susceptibility_split_half"].shape == (len(ap.COMPONENTS),)
    # runs written to several folders merge into one report
    merged = anomaly_report.merge([str(out), str(out)], tmp_path / "merged")
    assert len(merged["runs"]) == 2 and (tmp_path / "merged" / "report.md").exists()
    # the per-seed table: one column per run, the mean over runs, the best profile named
    table = anomaly_report.per_seed(merged)
    a, cell = shift["loss_baseline"]["auroc"], anomaly_report.cell(shift["loss_baseline"])
    row = next(line for line in table if line.startswith("| sequence loss at w* |"))
    assert row == f"| sequence loss at w* | {cell} | {cell} | {a:.2f} ± 0.00 |"
    best = max(ap.PROFILE_METHODS, key=lambda m: shift[m]["auroc"])
    row = next(line for line in table if line.startswith("| best profile detector |"))
    assert row.count(f"({best})") == 2


def test_head_ablation_is_zero_exactly_for_a_head_that_writes_nothing():
    """Mean-ablating a head whose output matrix is zero cannot change the TARGET loss; every
    other head of a random model does; the model is left as it was."""
    from experiments import anomaly_circuit, backdoor

    model = observables.build(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=65,
                              n_ctx=32, seed=3)
    with torch.no_grad():
        model.blocks[0].attn.W_O[1] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rise = anomaly_circuit.head_ablation(model, backdoor.triggered(8, 0),
                                         make_dataset(8, seed=1).tokens)
    assert rise.shape == (8,)
    assert rise[1] == 0.0
    assert bool((rise[[0, 2, 3, 4, 5, 6, 7]] != 0).all())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not any(h.fwd_hooks for h in model.hook_dict.values())
