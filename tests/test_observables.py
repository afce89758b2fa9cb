"""Observable registry and evaluation plan on real TransformerLens models (the installed
line: 3.x HookedTransformer in .venv, 4.x TransformerBridge in .venv-tl4; CI runs both)."""

import copy

import pytest
import torch

pytest.importorskip("transformer_lens")

import observables as ob  # noqa: E402
import suscept  # noqa: E402

BACKEND = ob.backend()


def perturbed(model, seed=1, scale=0.05):
    w = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in w.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return w


def brute_force(model, w, component, probe):
    """Per-token losses at w^C built explicitly: a copy with C's entries taken from w."""
    mixed = copy.deepcopy(model)
    mask = component.mask()
    wp = dict(w.named_parameters())
    with torch.no_grad():
        for name, p in mixed.named_parameters():
            if name in mask:
                p.copy_(torch.where(mask[name], wp[name], p))
        return ob.token_losses(mixed(probe), probe).flatten()


@pytest.fixture(scope="module", params=["attn_only", "mlp"])
def model(request):
    d_mlp = None if request.param == "attn_only" else 64
    return ob.build(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=20, n_ctx=16,
                    d_mlp=d_mlp, seed=0)


PROBE = torch.randint(0, 20, (6, 16), generator=torch.Generator().manual_seed(0))


def test_backend_is_the_installed_line(model):
    kind = ob.Adapter.of(model).kind
    assert kind == BACKEND
    assert type(model).__name__ == {"hooked": "HookedTransformer",
                                    "bridge": "TransformerBridge"}[kind]


def test_restricted_losses_equal_brute_force(model):
    ad = ob.Adapter.of(model)
    names = ["L0H0", "L0H3", "L1H2", "L0.attn", "L1", "embed", "pos_embed", "unembed",
             "ln_final", "L0H1+L1H2", "L0H2+L1.attn"]
    if ad.has_mlp:
        names += ["L1.mlp", "L0.mlp+L1H0"]
    w = perturbed(model)
    specs = [ob.TokenLoss(tuple(names), name="t")]
    fast = ob.EvaluationPlan(model, PROBE, specs)(w)["t"]
    naive = ob.EvaluationPlan(model, PROBE, specs, naive=True)(w)["t"]
    anchor_losses = ob.token_losses(model(PROBE), PROBE).flatten()
    for i, name in enumerate(names):
        ref = brute_force(model, w, ob.parse(name, ad), PROBE)
        assert (ref - anchor_losses).abs().max() > 1e-3, f"{name}: perturbation has no effect"
        torch.testing.assert_close(fast[i], ref, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(naive[i], ref, rtol=0, atol=1e-5, msg=name)


def test_restricted_loss_at_the_anchor_is_the_anchor_loss(model):
    specs = [ob.TokenLoss(("L0H0", "L1"), name="t"), ob.TokenLoss(None, name="full"),
             ob.MeanLoss(("L0H0",), relative=True, name="phi")]
    plan = ob.EvaluationPlan(model, PROBE, specs)
    out = plan(model)
    assert torch.equal(out["full"], plan.anchor_losses.flatten())
    torch.testing.assert_close(out["t"][0], plan.anchor_losses.flatten(), rtol=0, atol=1e-6)
    assert torch.equal(out["t"][1], plan.anchor_losses.flatten())
    assert out["phi"].abs().max() < 1e-6


@pytest.mark.parametrize("kind", sorted(ob.REGISTRY))
@pytest.mark.parametrize("components", [None, ("L0H1", "L1")])
def test_registry_contract(model, kind, components):
    spec = ob.REGISTRY[kind].example(components)
    assert spec.kind == kind
    plan = ob.EvaluationPlan(model, PROBE, [spec])
    w = perturbed(model)
    a, b = plan(w), plan(w)
    assert list(a) == [spec.key]
    v = a[spec.key]
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    if components is not None:
        assert v.shape[0] == len(components)
    assert torch.equal(v, b[spec.key])  # deterministic
    expected = {"token_loss": (6 * 15,), "sample_loss": (6,), "mean_loss": (),
                "centered_token_loss": (6 * 15,), "metric": (6,)}[kind]
    assert tuple(v.shape[1 if components else 0:]) == expected


def test_no_hooks_left_even_after_an_exception(model):
    plan = ob.EvaluationPlan(model, PROBE, [ob.TokenLoss(("L0H0", "L1H1", "L1"), name="t")])
    w = perturbed(model)
    before = {n: p.clone() for n, p in plan.anchor_model.named_parameters()}
    models = [w, plan.anchor_model, model]
    hooks = [hook_count(m) for m in models]  # the bridge keeps hooks of its own

    def boom(module, args, output):
        raise RuntimeError("boom")

    # raises in the last block, while the plan's own hooks are active
    handle = plan.anchor_model.blocks[1].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        plan(w)
    handle.remove()
    assert [hook_count(m) for m in models] == hooks
    assert all(torch.equal(p, before[n]) for n, p in plan.anchor_model.named_parameters())
    torch.testing.assert_close(plan(w)["t"], ob.EvaluationPlan(
        model, PROBE, [ob.TokenLoss(("L0H0", "L1H1", "L1"), name="t")])(w)["t"])


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_component_names(model):
    ad = ob.Adapter.of(model)
    heads = ob.expand("all heads", ad)
    assert [c.name for c in heads] == [f"L{l}H{h}" for l in range(2) for h in range(4)]
    assert [c.name for c in ob.expand("all layers", ad)] == ["L0", "L1"]
    head = ob.parse("L1H2", ad)
    assert head.head == (1, 2) and head.start_layer == 1
    counts = {n: int(m.sum()) for n, m in head.entries}
    # W_Q, W_K, W_V, W_O slices of d_model x d_head and b_Q, b_K, b_V of d_head; never b_O
    assert sum(counts.values()) == 4 * 32 * 8 + 3 * 8
    assert not any("b_O" in n or ("o._original_component.bias" in n) for n in counts)
    circuit = ob.parse("L0H1+L1H2", ad)
    assert circuit.head is None and circuit.start_layer == 0
    assert sum(int(m.sum()) for _, m in circuit.entries) == 2 * sum(counts.values())


@pytest.mark.parametrize("name, match", [
    ("L0H9", "head 9 out of range"), ("L7H0", "layer 7 out of range"),
    ("L0.foo", "unknown component"), ("head3", "valid names"),
    ("L0H1+L0H1", "more than once"), ("", "non-empty"),
])
def test_bad_component_names(model, name, match):
    with pytest.raises(suscept.ConfigError, match=match):
        ob.parse(name, ob.Adapter.of(model))


def test_bad_plan_input(model):
    spec = [ob.TokenLoss(("L0H0",), name="t")]
    with pytest.raises(suscept.ShapeError, match="n_ctx"):
        ob.EvaluationPlan(model, torch.zeros(2, 17, dtype=torch.long), spec)
    with pytest.raises(suscept.ConfigError, match="vocabulary"):
        ob.EvaluationPlan(model, torch.full((2, 8), 20, dtype=torch.long), spec)
    with pytest.raises(suscept.ShapeError, match="batch, pos"):
        ob.EvaluationPlan(model, torch.zeros(8, dtype=torch.long), spec)
    with pytest.raises(suscept.ConfigError, match="more than once"):
        ob.EvaluationPlan(model, PROBE, [ob.TokenLoss(("L0H0", "L0H0"), name="t")])
    with pytest.raises(suscept.ConfigError, match="TransformerLens"):
        ob.EvaluationPlan(torch.nn.Linear(3, 3), PROBE, spec)
    with pytest.raises(suscept.ConfigError, match="unknown observable kind"):
        ob.make("nope")
