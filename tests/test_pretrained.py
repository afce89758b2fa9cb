"""Pretrained models loaded offline from Hugging Face folders made here: small GPT-2, GPT-NeoX
(Pythia's architecture: rotary, parallel attention and MLP) and Llama-style (RMSNorm, rotary,
grouped-query attention, gated MLP) models with random weights, through the installed
TransformerLens line (3.x ``HookedTransformer`` in .venv, 4.x ``TransformerBridge`` in
.venv-tl4)."""

import os

import pytest
import torch

pytest.importorskip("transformer_lens")
transformers = pytest.importorskip("transformers")

from test_architectures import assert_exact  # noqa: E402

import observables as ob  # noqa: E402
import suscept  # noqa: E402

V = 50
CONFIGS = {  # folder name -> (config class, keyword arguments); "llama" in a folder name on
    # purpose: TransformerLens 3.x reads that substring of a name as an architecture
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=32, n_head=4, n_positions=16, n_ctx=16)),
    "pythia-like": ("GPTNeoXConfig", dict(num_hidden_layers=2, hidden_size=32,
                                          num_attention_heads=4, intermediate_size=64,
                                          max_position_embeddings=16, rotary_pct=0.5)),
    "tiny-llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=32,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=64, max_position_embeddings=16)),
}
G = torch.Generator().manual_seed(0)
TRAIN = torch.randint(0, V, (32, 12), generator=G)
PROBE = TRAIN[:4]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Model folders as ``save_pretrained`` writes them, each with a word-level tokenizer."""
    from tokenizers import Tokenizer, models

    root = tmp_path_factory.mktemp("hf")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(V)}, "t1")),
        bos_token="t0", eos_token="t0")
    out = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name, (cls, kw) in CONFIGS.items():
            cfg = getattr(transformers, cls)(vocab_size=V, bos_token_id=0, eos_token_id=0, **kw)
            hf = transformers.AutoModelForCausalLM.from_config(cfg)
            hf.save_pretrained(root / name)
            tok.save_pretrained(root / name)
            out[name] = root / name
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def loaded(request, folders):
    folder = folders[request.param]
    return request.param, folder, ob.load_pretrained(folder)


def test_loads_the_same_function_as_transformers(loaded):
    name, folder, model = loaded
    assert type(model).__name__ == {"hooked": "HookedTransformer",
                                    "bridge": "TransformerBridge"}[ob.backend()]
    assert not model.training and model.tokenizer is not None
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        ours = torch.log_softmax(model(PROBE), -1)  # 3.x centres the unembedding: compare
        ref = torch.log_softmax(hf.eval()(PROBE).logits, -1)  # log-probabilities
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4)


def test_names_cover_heads_mlps_layers_and_kv_groups(loaded):
    name, _, model = loaded
    ad = ob.Adapter.of(model)
    names = ob.valid_names(ad)
    assert {f"L{l}H{h}" for l in range(2) for h in range(4)} <= set(names)
    assert {"L0", "L1", "L0.attn", "L1.attn", "L0.mlp", "L1.mlp", "embed"} <= set(names)
    assert ad.grouped == (name == "tiny-llama")
    if ad.grouped:
        assert {"L0KV0", "L0KV1", "L1KV0", "L1KV1"} <= set(names)
    # layers, embeddings, unembedding and final norm own every trainable entry exactly once
    total = {n: torch.zeros(s, dtype=torch.int64) for n, s in ad.shapes}
    for c in ob.expand(["all layers"] + [n for n in names if not n.startswith("L")], ad):
        for n, m in c.entries:
            total[n] += m
    assert all(bool((t == 1).all()) for t in total.values())


def test_every_restricted_loss_is_exact(loaded):
    name, _, model = loaded
    assert_exact(name, model, PROBE)


@pytest.mark.skipif(ob.backend() != "bridge", reason="4.x option")
def test_bridge_compatibility_mode_is_exact(folders):
    """4.x's HookedTransformer-equivalent weight processing (``enable_compatibility_mode``)."""
    model = ob.load_pretrained(folders["gpt2"])
    model.enable_compatibility_mode()
    assert_exact("gpt2 compatibility mode", model, PROBE)


def test_one_run_over_all_heads_leaves_the_model_unchanged(loaded):
    name, _, model = loaded
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    cfg = suscept.SamplerConfig(step_size=1e-4, n_beta=10.0, gamma=1000.0, n_chains=2,
                                n_draws=3, batch_size=8, seed=0)
    comps = ["all heads"] + (["all kv groups"] if ob.Adapter.of(model).grouped else [])
    run = ob.one_run(model, TRAIN, PROBE, comps, cfg, progress=False)
    chi = suscept.susceptibility(run)
    assert chi.value.shape == (PROBE.numel() - PROBE.shape[0], len(run.config["components"]))
    assert torch.isfinite(chi.value).all()
    assert not model.training
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n].detach(), v) and after[n].requires_grad == g
               for n, (v, g) in before.items())


def test_missing_folder_cache_entry_or_tokenizer_is_a_clear_error(folders, tmp_path,
                                                                   monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.delenv("HF_HUB_OFFLINE")  # offline only while loading, then as it was
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    with pytest.raises(suscept.ConfigError, match="no config.json"):
        ob.load_pretrained(tmp_path)
    with pytest.raises(suscept.ConfigError, match="offline"):
        ob.load_pretrained("no-such-org/no-such-model")
    assert "HF_HUB_OFFLINE" not in os.environ and hub.HF_HUB_OFFLINE is False
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((folders["gpt2"] / f).read_bytes())
    if ob.backend() == "bridge":
        with pytest.raises(suscept.ConfigError, match="no tokenizer"):
            ob.load_pretrained(bare)
    else:
        assert ob.load_pretrained(bare).tokenizer is None


def test_suscept_run_with_a_pretrained_folder(folders, tmp_path):
    from suscept import cli
    from suscept.estimate import Estimate

    torch.save(TRAIN, tmp_path / "tokens.pt")
    toml = f"""
[model]
kind = "pretrained"
folder = "{folders['tiny-llama']}"

[data]
kind = "tokens"
path = "{tmp_path / 'tokens.pt'}"
n_probe = 4
n_query = 2

[observables]
components = ["all heads", "L1KV0"]

[sampler]
step_size = 1e-4
n_beta = 10.0
gamma = 1000.0
n_chains = 2
n_draws = 4
batch_size = 8

[estimators]
wanted = ["llc", "susceptibility"]

[output]
store = false
"""
    (tmp_path / "run.toml").write_text(toml)
    out = cli.run(str(tmp_path / "run.toml"), folder=tmp_path / "out", progress=False)
    chi = Estimate.load(out / "estimates" / "susceptibility.pt")
    assert chi.shape[1] == 9 and torch.isfinite(chi.value).all()
    both = toml.replace('kind = "pretrained"', 'kind = "pretrained"\nname = "gpt2"')
    (tmp_path / "both.toml").write_text(both)
    with pytest.raises(suscept.ConfigError, match="exactly one of name"):
        cli.run(str(tmp_path / "both.toml"), folder=tmp_path / "out2", progress=False)
