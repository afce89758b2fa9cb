"""Real text (observables.text): a byte-level BPE tokenizer trained in the test and saved as a
Hugging Face tokenizer folder, documents kept apart, probe/query rules, per-token metadata on
results, and ``[data] kind = "text"`` through ``suscept run`` (token ids saved and checked)."""

import json
import random

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from observables import text  # noqa: E402
from suscept import cli  # noqa: E402
from suscept.errors import ConfigError  # noqa: E402
from suscept.estimate import Estimate  # noqa: E402

WORDS = ("the cat dog sat ran on under a mat log big small red blue and then it was "
         "who what where why").split()
SEQ_LEN = 12


def _document(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + ".\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 4 documents (one too short for a sequence) and a tokenizer folder."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("text")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    for name, seed, n in (("a.txt", 1, 80), ("b.txt", 2, 50), ("sub/c.txt", 3, 120),
                          ("short.txt", 4, 3)):
        (docs / name).write_text(_document(seed, n))
    (docs / ".hidden").write_text("never read")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([_document(s, 200) for s in range(5)], vocab_size=300,
                            min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    tok.save_pretrained(root / "model")
    return docs, root / "model", len(tok)


def test_sequences_never_span_two_documents(corpus):
    docs, folder, vocab = corpus
    tok = text.load_tokenizer(folder)
    data = text.tokenize(docs, tok, SEQ_LEN)
    names = [n.split("docs/")[-1] for n in data.names]
    assert names == ["a.txt", "b.txt", "short.txt", "sub/c.txt"]  # sorted, hidden skipped
    own = {d: tok(open(n).read(), add_special_tokens=False)["input_ids"]
           for d, n in enumerate(data.names)}
    for row, d, s in zip(data.tokens.tolist(), data.document.tolist(), data.start.tolist()):
        assert row == own[d][s:s + SEQ_LEN]  # a slice of its own document's tokens
    per_doc = [len(own[d]) // SEQ_LEN for d in range(4)]
    assert per_doc[2] == 0 and data.document.tolist() == sum(
        ([d] * k for d, k in enumerate(per_doc)), [])
    assert data.dropped == sum(len(own[d]) % SEQ_LEN for d in range(4))
    bos = text.tokenize(docs, tok, SEQ_LEN, prepend_bos=True)
    assert (bos.tokens[:, 0] == tok.bos_token_id).all()
    assert bos.tokens[0, 1:].tolist() == own[0][:SEQ_LEN - 1]


def test_separator_splits_files(corpus, tmp_path):
    _, folder, _ = corpus
    f = tmp_path / "two.txt"
    f.write_text(_document(5, 40) + "\n\n" + _document(6, 40))
    data = text.tokenize(f, folder, SEQ_LEN, separator="\n\n")
    assert [n.split("#")[-1] for n in data.names] == ["0", "1"]
    assert set(data.document.tolist()) == {0, 1}


def test_split_rules():
    train, probe, query = text.split(10, 2, 3, "first")
    assert query == [0, 1] and probe == [2, 3, 4] and train == list(range(2, 10))
    _, probe, query = text.split(10, 2, 3, "every 3")
    assert query == [0, 3] and probe == [6, 9, 1]
    r1, r2 = text.split(50, 5, 5, "random", seed=1), text.split(50, 5, 5, "random", seed=1)
    assert r1 == r2 and r1 != text.split(50, 5, 5, "random", seed=2)
    train, probe, query = r1
    assert not set(query) & set(train) and set(probe) <= set(train)
    _, probe, query = text.split(10, 0, 0, indices={"query": [9], "probe": [0, 4]})
    assert query == [9] and probe == [0, 4]
    for bad in ({"query": [1], "probe": [1]}, {"query": [10], "probe": [0]}):
        with pytest.raises(ConfigError, match="do not overlap"):
            text.split(10, 1, 1, indices=bad)
    with pytest.raises(ConfigError, match="every K"):
        text.split(10, 1, 1, "every other")
    with pytest.raises(ConfigError, match="n_query \\+ n_probe"):
        text.split(4, 2, 3)


def test_bad_text_is_named(corpus, tmp_path):
    docs, folder, vocab = corpus
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        text.tokenize(tmp_path / "bin.txt", folder, SEQ_LEN)
    with pytest.raises(ConfigError, match="does not exist"):
        text.tokenize(tmp_path / "missing", folder, SEQ_LEN)
    with pytest.raises(ConfigError, match="lower seq_len"):
        text.tokenize(docs / "short.txt", folder, SEQ_LEN)
    with pytest.raises(ConfigError, match="tokenizer"):
        text.load_tokenizer(tmp_path)


def test_token_metadata_travels_with_susceptibility(corpus):
    pytest.importorskip("transformer_lens")
    import observables
    import suscept

    docs, folder, vocab = corpus
    data = text.tokenize(docs, folder, SEQ_LEN)
    model = observables.build(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=vocab,
                              n_ctx=SEQ_LEN, seed=0)
    _, probe, _ = text.split(len(data), 1, 3, "every 2")
    probe = data.subset(probe)
    cfg = suscept.SamplerConfig(step_size=1e-3, n_beta=10.0, gamma=300.0, n_chains=2,
                                n_draws=6, n_blocks=2, batch_size=4)
    chi = suscept.susceptibility(observables.one_run(model, data, probe, "all heads", cfg,
                                                     progress=False))
    df = chi.to_dataframe()
    assert len(df) == 3 * (SEQ_LEN - 1) * 2
    for row in df.iloc[::7].itertuples():  # every entry names the token its loss predicts
        i, s = divmod(row.token, SEQ_LEN - 1)
        assert row.position == s + 1 and row.sequence == probe.sequence[i].item()
        assert row.document == probe.document[i].item()
        assert row.token_id == probe.tokens[i, s + 1].item()
        assert row.token_str == text.load_tokenizer(folder).decode([row.token_id])
        assert row.component == ["L0H0", "L0H1"][row.Index % 2]
    ds = chi.to_xarray()
    assert list(ds["component"].values) == ["L0H0", "L0H1"] and "token_str" in ds.coords


def _toml(docs, folder, vocab) -> str:
    return f"""
[model]
n_layers = 1
d_model = 16
n_heads = 2
d_head = 8
d_vocab = {vocab}
n_ctx = {SEQ_LEN}

[data]
kind = "text"
path = "{docs}"
tokenizer = "{folder}"
seq_len = {SEQ_LEN}
select = "random"
n_probe = 4
n_query = 2

[sampler]
step_size = 1e-3
n_beta = 10.0
gamma = 300.0
n_chains = 2
n_draws = 6
n_blocks = 2
batch_size = 4
"""


def test_text_through_suscept_run(corpus, tmp_path):
    pytest.importorskip("transformer_lens")
    docs, folder, vocab = corpus
    mine = tmp_path / "docs"  # a copy this test may edit
    mine.mkdir()
    for f in docs.rglob("*.txt"):
        (mine / f.name).write_text(f.read_text())
    conf = tmp_path / "run.toml"
    conf.write_text(_toml(mine, folder, vocab))
    out = tmp_path / "out"
    cli.run(str(conf), folder=out, progress=False)
    saved = text.TextData.load(out / "data" / "text.pt")
    chosen = json.loads((out / "data" / "split.json").read_text())
    assert saved.tokens.equal(text.tokenize(mine, folder, SEQ_LEN).tokens)
    chi = Estimate.load(out / "estimates" / "susceptibility.pt")
    query = saved.subset(chosen["query"])
    assert chi.to_dataframe()["token_str"].tolist()[::2] == [
        saved.strings[t] for t in query.tokens[:, 1:].flatten().tolist()]
    bif = Estimate.load(out / "estimates" / "bif.pt").to_dataframe()
    assert set(bif["sample_sequence"]) == set(chosen["probe"])
    assert set(bif["observable_sequence"]) == set(chosen["query"])
    top = (out / "top_susceptibility.csv").read_text().splitlines()
    assert top[0].startswith("rank,token,") and "token_str" in top[0] and len(top) > 5
    # an edited document changes the token ids: a resume into this folder is refused
    (mine / "a.txt").write_text(_document(99, 80))
    with pytest.raises(ConfigError, match="token ids differ"):
        cli.run(str(conf), folder=out, resume=True, progress=False)


def test_readme_your_own_model_runs(corpus, tmp_path, monkeypatch):
    """README's "Your own model and text" block, as written, on a GPT-2 folder made here."""
    import observables

    if observables.backend() != "hooked":
        pytest.skip("the README block is checked on TransformerLens 3.x")
    from test_docs import ROOT, python_blocks, run_blocks
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    docs, folder, vocab = corpus
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32, n_ctx=32,
                                     vocab_size=vocab))
    gpt.save_pretrained(tmp_path / "my-gpt2")
    AutoTokenizer.from_pretrained(folder, local_files_only=True).save_pretrained(
        tmp_path / "my-gpt2")
    (tmp_path / "my-corpus").mkdir()
    for f in docs.rglob("*.txt"):
        (tmp_path / "my-corpus" / f.name).write_text(f.read_text() * 3)
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(ROOT / "README.md")
    index = next(i for i, b in enumerate(blocks) if "my-gpt2" in b)
    ns = run_blocks(blocks[:index + 1], "README.md")
    table = ns["table"]
    assert {"token_str", "position", "sequence", "document", "component", "z"} <= set(table)
    assert table["component"].nunique() == 4 and len(table) == 4 * 4 * 31


def test_text_config_needs_path_and_tokenizer(tmp_path):
    from suscept import config as config_mod

    sampler = {"step_size": 1e-3, "n_beta": 10.0}
    with pytest.raises(ConfigError, match="kind='text' needs path"):
        config_mod.resolve({"data": {"kind": "text"}, "sampler": sampler})
    cfg = config_mod.resolve({"data": {"kind": "text", "path": str(tmp_path)},
                              "sampler": sampler})
    assert cfg["data"]["select"] == "first" and cfg["data"]["prepend_bos"] is False
    with pytest.raises(ConfigError, match="needs tokenizer"):
        text.from_config(cfg)
