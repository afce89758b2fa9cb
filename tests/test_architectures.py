"""Every TransformerLens option that changes the forward: each restricted loss of the
evaluation plan equals a brute-force forward at the mixed weights w^C to 1e-5, at the anchor
and at perturbed weights, or the option is refused with a clear error (never silently wrong).

Runs on the installed line: 3.x ``HookedTransformer`` (.venv) or 4.x native
``TransformerBridge`` (.venv-tl4, whose native models support fewer options)."""

import pytest
import torch

pytest.importorskip("transformer_lens")

from test_observables import PROBE, brute_force, perturbed  # noqa: E402

import observables as ob  # noqa: E402
import suscept  # noqa: E402

BACKEND = ob.backend()
BASE = dict(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=20, seed=0)
MLP = dict(d_mlp=64, act_fn="gelu")
LLAMA = dict(MLP, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
             rotary_dim=8, n_key_value_heads=2, gated_mlp=True, final_rms=True)

# option name -> config overrides (on BASE); "processed" folds the norms after building
HOOKED = {
    "shortformer_attn_only": dict(positional_embedding_type="shortformer", attn_only=True),
    "shortformer_mlp": dict(MLP, positional_embedding_type="shortformer"),
    "rotary": dict(MLP, positional_embedding_type="rotary", rotary_dim=4),
    "rotary_adjacent_pairs": dict(MLP, positional_embedding_type="rotary", rotary_dim=8,
                                  rotary_adjacent_pairs=True),
    "alibi": dict(MLP, positional_embedding_type="alibi"),
    "gqa": dict(MLP, n_key_value_heads=2),
    "gqa_one_group_attn_only": dict(n_key_value_heads=1, attn_only=True),
    "gqa_ungrouped_hooks": dict(MLP, n_key_value_heads=2, ungroup_grouped_query_attention=True),
    "kv_heads_equal_heads": dict(MLP, n_key_value_heads=4),
    "llama_like": LLAMA,
    "parallel_attn_mlp": dict(MLP, parallel_attn_mlp=True),
    "neox_like": dict(MLP, parallel_attn_mlp=True, positional_embedding_type="rotary",
                      rotary_dim=4),
    "LNPre": dict(MLP, normalization_type="LNPre"),
    "RMS": dict(MLP, normalization_type="RMS"),
    "RMSPre": dict(MLP, normalization_type="RMSPre"),
    "no_norm": dict(MLP, normalization_type=None),
    "norm_before_and_after": dict(MLP, normalization_type="RMS",
                                  use_normalization_before_and_after=True),
    "final_rms": dict(MLP, normalization_type="RMS", final_rms=True),
    "no_attn_scale": dict(MLP, use_attn_scale=False),
    "attn_scale": dict(MLP, attn_scale=3.0),
    "scale_by_inverse_layer_idx": dict(MLP, scale_attn_by_inverse_layer_idx=True),
    "soft_caps": dict(MLP, attn_scores_soft_cap=2.0, output_logits_soft_cap=3.0),
    "gated_mlp": dict(MLP, act_fn="silu", gated_mlp=True),
    "mixture_of_experts": dict(MLP, act_fn="silu", gated_mlp=True, num_experts=4,
                               experts_per_token=2),
    "qk_norm": dict(MLP, use_qk_norm=True, normalization_type="RMS"),
    "local_attn": dict(MLP, attn_types=["global", "local"], window_size=4),
    "post_embedding_ln": dict(MLP, post_embedding_ln=True),
    "processed_fold_ln": dict(MLP, processed=False),
    "processed_refactored_attn_only": dict(attn_only=True, processed=True),
}
BRIDGE = {
    "rotary": dict(MLP, positional_embedding_type="rotary", rotary_dim=4),
    "gqa": dict(MLP, n_key_value_heads=2),
    "llama_like": LLAMA,
    "LNPre": dict(MLP, normalization_type="LNPre"),
    "RMS": dict(MLP, normalization_type="RMS"),
    "RMSPre": dict(MLP, normalization_type="RMSPre"),
    "final_rms": dict(MLP, normalization_type="RMS", final_rms=True),
    "attn_scale": dict(MLP, attn_scale=3.0),
    "soft_caps": dict(MLP, attn_scores_soft_cap=2.0, output_logits_soft_cap=3.0),
    "gated_mlp": dict(MLP, act_fn="silu", gated_mlp=True),
    "gqa_attn_only": dict(n_key_value_heads=2, attn_only=True),
}
OPTIONS = HOOKED if BACKEND == "hooked" else BRIDGE


def build(overrides):
    overrides = dict(overrides)
    processed = overrides.pop("processed", None)
    cfg = {**BASE, "normalization_type": "LN", **overrides}
    if BACKEND == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**cfg)).eval()
        if processed is not None:  # what from_pretrained does by default, and more
            model.process_weights_(fold_ln=True, center_writing_weights=True,
                                   center_unembed=True, refactor_factored_attn_matrices=processed)
        return model
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    cfg.setdefault("act_fn", "gelu")
    return TransformerBridge.boot_native(TransformerBridgeConfig(**cfg)).eval()


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def arch(request):
    model = build(OPTIONS[request.param])
    return request.param, model, ob.Adapter.of(model)


def every_name(ad):
    """Every atomic component and two circuits (one across layers, one head with its keys)."""
    names = ob.valid_names(ad)
    extra = ["L0H1+L1H2"] + (["L1H0+L1KV0"] if ad.grouped else [])
    return names + extra


def assert_exact(option, model, probe):
    """Every component's restricted losses from the plan equal a brute-force forward at w^C
    (a copy with C's entries from w) to 1e-5, at the anchor and at perturbed weights w."""
    ad = ob.Adapter.of(model)
    names = every_name(ad)
    plan = ob.EvaluationPlan(model, probe, [ob.TokenLoss(tuple(names), name="t")])
    with torch.no_grad():  # a 4.x fused-QKV bridge keeps a forward's graph (not deep-copyable)
        anchor_losses = ob.token_losses(model(probe), probe).flatten()
    at_anchor = plan(model)["t"]
    w = perturbed(model)
    at_w = plan(w)["t"]
    for i, name in enumerate(names):
        torch.testing.assert_close(at_anchor[i], anchor_losses, rtol=0, atol=1e-5,
                                   msg=f"{option} {name} at the anchor")
        ref = brute_force(model, w, ob.parse(name, ad), probe)
        if (option, name) != ("alibi", "pos_embed"):  # TransformerLens keeps an unused W_pos
            assert (ref - anchor_losses).abs().max() > 1e-3, f"{option} {name}: no effect"
        torch.testing.assert_close(at_w[i], ref, rtol=0, atol=1e-5, msg=f"{option} {name}")


def test_every_restricted_loss_is_exact(arch):
    option, model, _ = arch
    assert_exact(option, model, PROBE)


@pytest.mark.skipif(BACKEND != "hooked", reason="3.x computes a padding mask from the tokenizer")
@pytest.mark.parametrize("pos", ["standard", "shortformer"])
def test_left_padding_tokenizer(pos, tmp_path):
    """A tokenizer that pads on the left makes 3.x mask leading pad tokens and shift absolute
    positions; the plan's forwards from a layer must get the same mask."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(20)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t1")),
                            pad_token="t0", bos_token="t2").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = build(dict(MLP, positional_embedding_type=pos))
    model.set_tokenizer(tok, default_padding_side="left")
    probe = PROBE.clone().clamp(min=1)
    probe[0, :5] = 0  # leading pads
    probe[3, :2] = 0
    with torch.no_grad():
        padded = model(probe)
        model.tokenizer.padding_side = "right"  # the same tokens without the mask
        assert (model(probe) - padded).abs().max() > 1e-3
        model.tokenizer.padding_side = "left"
    assert_exact(f"left padding {pos}", model, probe)


def test_names_cover_every_parameter(arch):
    """Heads (with key/value groups under grouped-query attention) and the layer's shared
    attention parameters partition each attention sublayer; layers, embeddings, unembedding and
    the final norm partition the model."""
    option, model, ad = arch
    total = {n: torch.zeros(s, dtype=torch.int64) for n, s in ad.shapes}
    for c in ob.expand(["all layers"] + [n for n in ob.valid_names(ad) if not n[0] == "L"], ad):
        for n, m in c.entries:
            total[n] += m
    assert all(bool((t == 1).all()) for t in total.values()), option
    for layer in range(ad.n_layers):
        heads = [f"L{layer}H{h}" for h in range(ad.n_heads)]
        groups = [f"L{layer}KV{g}" for g in range(ad.n_kv_heads)] if ad.grouped else []
        count = {n: torch.zeros(s, dtype=torch.int64) for n, s in ad.shapes}
        for c in ob.expand(heads + groups, ad):
            for n, m in c.entries:
                count[n] += m
        attn = ob.parse(f"L{layer}.attn", ad).mask()
        for n, m in attn.items():
            assert int(count[n].max()) <= 1, f"{option} {n}: two heads own one entry"
            shared = m & (count[n] == 0)  # owned by no head: b_O and norms only
            if shared.any():
                assert any(k in n for k in ("b_O", "o._original_component.bias", "norm")), n
        assert {n for n, t in count.items() if t.any()} <= set(attn)


def test_gqa_names_and_errors():
    model = build(OPTIONS["gqa"])
    ad = ob.Adapter.of(model)
    assert ad.grouped and ad.n_kv_heads == 2
    assert [c.name for c in ob.expand("all kv groups", ad)] == ["L0KV0", "L0KV1", "L1KV0",
                                                                 "L1KV1"]
    head = dict(ob.parse("L1H3", ad).entries)
    assert sum(int(m.sum()) for m in head.values()) == 2 * 32 * 8 + 8  # W_Q, W_O, b_Q
    group = dict(ob.parse("L1KV1", ad).entries)
    assert sum(int(m.sum()) for m in group.values()) == 2 * 32 * 8 + 2 * 8  # W_K W_V b_K b_V
    with pytest.raises(suscept.ConfigError, match="group 2 out of range"):
        ob.parse("L0KV2", ad)
    plain = ob.Adapter.of(build(OPTIONS["gqa"] | dict(n_key_value_heads=None)))
    with pytest.raises(suscept.ConfigError, match="no grouped-query attention"):
        ob.parse("L0KV0", plain)
    with pytest.raises(suscept.ConfigError, match="needs grouped-query attention"):
        ob.expand("all kv groups", plain)


@pytest.mark.skipif(BACKEND != "hooked", reason="3.x option")
def test_unsupported_options_are_refused():
    model = build(MLP)
    model.cfg.positional_embedding_type = "relative_positional_bias"
    with pytest.raises(suscept.ConfigError, match="positional_embedding_type"):
        ob.EvaluationPlan(model, PROBE, [ob.TokenLoss(("L0H0",), name="t")])


def test_pos_embed_is_not_a_name_without_position_embeddings():
    ad = ob.Adapter.of(build(OPTIONS["rotary"]))
    assert "pos_embed" not in ob.valid_names(ad)
    with pytest.raises(suscept.ConfigError, match="owns no trainable parameter"):
        ob.parse("pos_embed", ad)


@pytest.mark.skipif(BACKEND != "hooked", reason="3.x options")
def test_self_checks_catch_a_path_the_plan_gets_wrong(monkeypatch):
    """The plan checks its shortcuts once: a forward from a layer that misses what the model
    passes to its blocks is refused; a head shortcut that does not hold falls back to the
    swapped forward, with a warning, and stays exact."""
    from observables import adapter as adapter_mod
    from observables.plan import EvaluationPlan

    spec = [ob.TokenLoss(("L0H1", "L1.attn"), name="t")]
    shortformer = build(OPTIONS["shortformer_attn_only"])
    with monkeypatch.context() as m:  # as if the shortformer embedding were not passed along
        m.setattr(EvaluationPlan, "_forward_kwargs", lambda self: {})
        with pytest.raises(suscept.ConfigError, match="naive=True"):
            ob.EvaluationPlan(shortformer, PROBE, spec)
    post_normed = build(OPTIONS["norm_before_and_after"])
    monkeypatch.setattr(adapter_mod, "_head_path", lambda kind, cfg: "mid")  # a wrong shortcut
    with pytest.warns(RuntimeWarning, match="head shortcut"):
        plan = ob.EvaluationPlan(post_normed, PROBE, spec)
    assert plan.head_path == "swap"
    w = perturbed(post_normed)
    ref = brute_force(post_normed, w, ob.parse("L0H1", ob.Adapter.of(post_normed)), PROBE)
    torch.testing.assert_close(plan(w)["t"][0], ref, rtol=0, atol=1e-5)
    assert plan(post_normed)["t"].sub(plan.anchor_losses.flatten()).abs().max() < 1e-5
