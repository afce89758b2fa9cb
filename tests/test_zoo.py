"""The model zoo (experiments/zoo): language, cached training, head scores. Runs on either
TransformerLens line."""

import pytest
import torch

import observables
from experiments.zoo import heads, language
from experiments.zoo.language import (
    BIGRAM,
    BRACKET_CLOSE,
    BRACKET_OPEN,
    INDUCTION,
    OTHER,
    Language,
    make_dataset,
)
from experiments.zoo.train import TrainConfig, checkpoint_steps, train_or_load

TINY = dict(n_layers=2, d_model=32, n_heads=2, d_head=8)


def test_language_is_deterministic_from_its_seeds():
    a, b = make_dataset(40, seed=3), make_dataset(40, seed=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.types, b.types)
    assert a.tokens.shape == a.types.shape == (40, 32) and a.tokens.dtype == torch.long
    assert not torch.equal(a.tokens, make_dataset(40, seed=4).tokens)
    assert not torch.equal(a.tokens, make_dataset(40, seed=3, language_seed=1).tokens)
    assert (Language(0).successors == Language(0).successors).all()
    assert int(a.tokens.min()) >= 0 and int(a.tokens.max()) < 64
    assert a.type_names == language.TYPE_NAMES


def test_labels_are_right():
    lang = Language(0)
    d = lang.sample(200, seed=7)
    succ = lang.successors
    opens, closes = set(lang.open_ids), set(lang.close_ids)
    for i in range(len(d)):
        tok, typ = d.tokens[i].tolist(), d.types[i].tolist()
        (p1, p2), L = d.seg_starts[i].tolist(), int(d.seg_len[i])
        assert 6 <= L <= 10 and p1 >= 1 and p2 >= p1 + L + 1 and p2 + L <= 32
        assert tok[p1:p1 + L] == tok[p2:p2 + L]
        induction = [s for s in range(32) if typ[s] == INDUCTION]
        assert induction == list(range(p2 + 1, p2 + L))
        assert all(tok[s] == tok[s - p2 + p1] for s in induction)
        stack = []
        for s in range(32):
            if tok[s] in opens:
                assert typ[s] == BRACKET_OPEN
                stack.append(tok[s])
            elif tok[s] in closes:
                assert typ[s] == BRACKET_CLOSE and stack and tok[s] == stack.pop() + 1
            elif typ[s] == BIGRAM:
                assert tok[s - 1] < lang.n_text and tok[s] in succ[tok[s - 1]]
            else:
                assert typ[s] in (OTHER, INDUCTION)
        assert typ[0] in (OTHER, BRACKET_OPEN)
    tt = d.target_types
    assert tt.shape == (200, 31) and torch.equal(tt, d.types[:, 1:])
    frac = torch.bincount(tt.flatten(), minlength=5).float() / tt.numel()
    assert frac[INDUCTION] > 0.15 and frac[BIGRAM] > 0.25 and frac[BRACKET_CLOSE] > 0.01


def test_repeated_random_and_checkpoint_steps():
    r = language.repeated_random(5, half=16, seed=1)
    assert r.shape == (5, 32) and torch.equal(r[:, :16], r[:, 16:])
    assert all(len(set(row[:16].tolist())) == 16 for row in r)
    steps = checkpoint_steps(2000, 10)
    assert steps[0] == 0 and steps[-1] == 2000 and len(steps) == 10 and steps == sorted(steps)


def test_short_training_descends_and_the_cache_round_trips(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(steps=30, batch_size=16, lr=1e-2, warmup=5, n_train=256, n_eval=32,
                      eval_every=10, n_checkpoints=4)
    first = train_or_load("attn", seed=0, cache_dir=tmp_path, config=cfg, model_kw=TINY)
    assert not first.from_cache
    all_loss = first.curve["eval"]["all"]
    assert all_loss[-1] < all_loss[0] - 0.2
    assert first.checkpoints == [0, 1, 5, 30] == checkpoint_steps(30, 4)
    assert first.backend == observables.backend() and first.backend in first.path.name
    second = train_or_load("attn", seed=0, cache_dir=tmp_path, config=cfg, model_kw=TINY)
    assert second.from_cache and second.path == first.path
    assert second.train_seconds == first.train_seconds  # the recorded time, not a new run
    s1, s2 = first.model.state_dict(), second.model.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    init = second.checkpoint(0).state_dict()
    assert any(not torch.equal(init[k], s2[k]) for k in s2 if s2[k].is_floating_point())
    with pytest.raises(KeyError):
        second.checkpoint(7)


def test_scores_of_hand_made_patterns():
    T, half = 8, 4
    prev = torch.zeros(1, 2, T, T)  # batch 1, 2 heads: head 0 previous-token, head 1 induction
    prev[0, :, 0, 0] = 1.0
    for q in range(1, T):
        prev[0, 0, q, q - 1] = 1.0
        prev[0, 1, q, q - half + 1 if q >= half else q] = 1.0
    assert torch.allclose(heads.prev_token_score(prev), torch.tensor([1.0, 0.0]))
    assert torch.allclose(heads.induction_score(prev, half), torch.tensor([0.0, 1.0]))
    uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    pat = uniform.expand(3, 5, 1, T, T)  # extra leading dim (layers) kept
    expect_prev = torch.tensor([1 / (q + 1) for q in range(1, T)]).mean()
    expect_ind = torch.tensor([1 / (q + 1) for q in range(half, T)]).mean()
    assert torch.allclose(heads.prev_token_score(pat), expect_prev.expand(3, 1))
    assert torch.allclose(heads.induction_score(pat, half), expect_ind.expand(3, 1))


def test_head_scores_and_ablation_on_a_model():
    model = observables.build(**TINY, d_vocab=64, n_ctx=32, seed=1)
    s = heads.head_scores(model, n_sequences=8)
    for x in (s.prev_token, s.induction):
        assert x.shape == (2, 2) and ((x >= 0) & (x <= 1)).all()
    pat = heads.attention_patterns(model, language.repeated_random(3, seed=0))
    assert pat.shape == (2, 3, 2, 32, 32)
    assert torch.allclose(pat.sum(-1), torch.ones(()), atol=1e-5)
    data = make_dataset(16, seed=0)
    eff, clean = heads.ablation_effects(model, data)
    assert eff.shape == (2, 2) and (eff != 0).all()
    # the hook agrees with zeroing the head's rows of W_O
    with torch.no_grad():
        attn = model.blocks[1].attn
        if observables.backend() == "hooked":
            attn.W_O[1] = 0.0
        else:
            attn.o.weight[:, 8:16] = 0.0
    ablated = data.tokens
    mask = data.target_types == INDUCTION
    with torch.no_grad():
        manual = observables.token_losses(model(ablated), ablated)[mask].mean()
    assert abs(float(manual) - clean - float(eff[1, 1])) < 1e-4
    mean_eff, _ = heads.ablation_effects(model, data, mode="mean")
    assert mean_eff.shape == (2, 2) and not torch.allclose(mean_eff, eff)
