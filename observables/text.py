"""Real text as token sequences: files or folders, the model's own tokenizer, metadata per token.

- :func:`load_tokenizer` reads a Hugging Face tokenizer from a local folder (``tokenizer.json``
  or ``vocab.json`` + ``merges.txt``, as ``save_pretrained`` writes it); nothing is downloaded.
- :func:`tokenize` reads documents (each file is one document; with ``separator``, each file is
  cut into several at that string, e.g. ``"\\n\\n"``), tokenizes each one on its own and cuts it
  into sequences of ``seq_len`` tokens. **No sequence spans two documents**: a document's last
  ``len % seq_len`` tokens (fewer than a sequence) are dropped and counted in ``dropped``. With
  ``prepend_bos`` every sequence starts with the tokenizer's BOS token and holds ``seq_len - 1``
  text tokens.
- :func:`split` chooses the query and probe sets by a rule (``"first"``, ``"random"`` with a
  seed, ``"every K"``) or from explicit indices: the rule orders the sequences, the query is the
  first ``n_query`` of that order, the probe the next ``n_probe``; the training set is every
  sequence but the query (so the probe is part of it, as the BIF's "train sample j" needs).
- :func:`token_coords` gives the per-token metadata of a ``[token, ...]`` result. A probe of
  ``[batch, pos]`` tokens has ``X = batch * (pos - 1)`` token losses ``l_{i,s} = -log p(x_{i,s+1}
  | x_{i,<=s})`` (row-major); entry ``(i, s)`` is labelled by the token it predicts:
  ``token_id = x_{i,s+1}``, ``token_str`` (decoded), ``position = s + 1`` (within the sequence),
  ``sequence`` (the sequence's index in the corpus) and ``document`` (its document's index).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from suscept.errors import ConfigError


def load_tokenizer(folder: str | Path):
    """The Hugging Face tokenizer saved in ``folder``, or of a model name whose files are in the
    local Hugging Face cache; offline (``local_files_only``)."""
    from transformers import AutoTokenizer

    where = "folder" if Path(folder).is_dir() else "local Hugging Face cache"
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for a bad folder
        raise ConfigError(f"cannot load a tokenizer for {str(folder)!r} from the {where} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the "
                          "model's folder (tokenizer.json or vocab.json + merges.txt, as "
                          "save_pretrained writes them)") from e


def read_documents(paths: str | Path | list, separator: str | None = None) -> list[tuple]:
    """``[(name, text)]`` from files and folders (a folder: its files, recursively, sorted;
    hidden files skipped). With ``separator`` each file gives one document per non-empty part,
    named ``file#k``."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file()
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"text path {p} does not exist")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{f} is not UTF-8 text ({e.reason}); convert it or leave it "
                              "out") from e
        if separator is None:
            docs.append((str(f), text))
        else:
            parts = [t for t in text.split(separator) if t.strip()]
            docs += [(f"{f}#{k}", t) for k, t in enumerate(parts)]
    if not docs:
        raise ConfigError(f"no text found in {paths}")
    return docs


@dataclass(frozen=True)
class TextData:
    """Token sequences cut from documents, with where each one came from.

    Attributes:
        tokens: ``[n, seq_len]`` int64 token ids.
        sequence: ``[n]`` index of each sequence in the corpus (kept by :meth:`subset`).
        document: ``[n]`` index of its document in ``names``.
        start: ``[n]`` offset of its first text token within the document's tokens.
        names: the documents' names (file path, or ``path#k`` with a separator).
        strings: token id -> decoded string, for every id in ``tokens``.
        dropped: text tokens dropped at document ends (fewer than a sequence).
    """

    tokens: Tensor
    sequence: Tensor
    document: Tensor
    start: Tensor
    names: tuple[str, ...]
    strings: dict[int, str] = field(repr=False)
    dropped: int = 0

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def subset(self, idx) -> TextData:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TextData(self.tokens[idx], self.sequence[idx], self.document[idx],
                        self.start[idx], self.names, self.strings, self.dropped)

    def coords(self) -> dict[str, list]:
        """Per-token metadata of this set's ``X = n * (seq_len - 1)`` token losses."""
        return token_coords(self.tokens, sequence=self.sequence, document=self.document,
                            strings=self.strings)

    def save(self, path: str | Path) -> None:
        torch.save({"tokens": self.tokens, "sequence": self.sequence, "document": self.document,
                    "start": self.start, "meta": json.dumps(
                        {"names": list(self.names), "dropped": self.dropped,
                         "strings": {str(k): v for k, v in self.strings.items()}})}, Path(path))

    @staticmethod
    def load(path: str | Path) -> TextData:
        d = torch.load(Path(path), weights_only=True)
        meta = json.loads(d["meta"])
        return TextData(d["tokens"], d["sequence"], d["document"], d["start"],
                        tuple(meta["names"]), {int(k): v for k, v in meta["strings"].items()},
                        meta["dropped"])


def tokenize(paths, tokenizer, seq_len: int, *, separator: str | None = None,
             prepend_bos: bool = False) -> TextData:
    """Documents of ``paths`` tokenized by ``tokenizer`` (a folder or a loaded tokenizer) and
    cut into ``[n, seq_len]`` sequences, none spanning two documents (module docstring)."""
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if seq_len < 2 + prepend_bos:
        raise ConfigError(f"seq_len={seq_len} is too short: a sequence needs 2 tokens or more")
    bos = []
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise ConfigError("prepend_bos: this tokenizer has no BOS token; set it false")
        bos = [tokenizer.bos_token_id]
    width = seq_len - len(bos)
    docs = read_documents(paths, separator)
    rows, seq_doc, starts, dropped = [], [], [], 0
    for d, (_, text) in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        n = len(ids) // width
        dropped += len(ids) - n * width
        for k in range(n):
            rows.append(bos + ids[k * width:(k + 1) * width])
            seq_doc.append(d)
            starts.append(k * width)
    if not rows:
        raise ConfigError(f"no document of {paths} has {width} tokens or more: lower seq_len "
                          f"(= {seq_len}) or give more text")
    tokens = torch.tensor(rows, dtype=torch.long)
    strings = {i: tokenizer.decode([i]) for i in tokens.unique().tolist()}
    return TextData(tokens, torch.arange(len(rows)), torch.tensor(seq_doc), torch.tensor(starts),
                    tuple(name for name, _ in docs), strings, dropped)


def split(n: int, n_query: int, n_probe: int, rule: str = "first", *, seed: int = 0,
          indices: dict | str | Path | None = None) -> tuple[list[int], list[int], list[int]]:
    """``(train, probe, query)`` sequence indices; train = all but the query, probe within it.

    ``rule``: ``"first"`` (corpus order), ``"random"`` (a permutation seeded by ``seed``) or
    ``"every K"`` (every K-th sequence first, then the others). ``indices``: a dict or JSON file
    ``{"query": [...], "probe": [...]}`` that overrides the rule.
    """
    if indices is not None:
        if not isinstance(indices, dict):
            try:
                indices = json.loads(Path(indices).read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot read indices file {indices}: {e}") from e
        query, probe = list(indices.get("query", [])), list(indices.get("probe", []))
    else:
        order = _order(n, rule, seed)
        if not (n_query >= 1 and n_probe >= 1 and n_query + n_probe <= n):
            raise ConfigError(f"the text gives {n} sequences: need n_query >= 1, n_probe >= 1 "
                              f"and n_query + n_probe <= {n} (got {n_query}, {n_probe})")
        query, probe = order[:n_query], order[n_query:n_query + n_probe]
    bad = [i for i in query + probe if not (isinstance(i, int) and 0 <= i < n)]
    if bad or not query or not probe or set(query) & set(probe) or len(set(query)) < len(query) \
            or len(set(probe)) < len(probe):
        raise ConfigError(f"indices need distinct query and probe lists of sequence numbers in "
                          f"0..{n - 1} that do not overlap (bad entries: {bad[:5]})")
    in_query = set(query)
    return [i for i in range(n) if i not in in_query], probe, query


def _order(n: int, rule: str, seed: int) -> list[int]:
    if rule == "first":
        return list(range(n))
    if rule == "random":
        order = list(range(n))
        random.Random(seed).shuffle(order)
        return order
    parts = rule.split()
    if len(parts) == 2 and parts[0] == "every" and parts[1].isdigit() and int(parts[1]) >= 1:
        k = int(parts[1])
        picked = list(range(0, n, k))
        return picked + [i for i in range(n) if i % k]
    raise ConfigError(f"select = {rule!r}: use 'first', 'random' or 'every K' (K >= 1)")


def token_coords(tokens: Tensor | TextData, *, sequence=None, document=None,
                 strings: dict[int, str] | None = None) -> dict[str, list]:
    """Per-token metadata of the ``X = batch * (pos - 1)`` token losses of ``tokens``
    ``[batch, pos]`` (module docstring): lists ``token_id``, ``token_str``, ``position``,
    ``sequence`` (default: the row index) and, when known, ``document``, each of length X."""
    if isinstance(tokens, TextData):
        return tokens.coords()
    batch, pos = tokens.shape
    target = tokens[:, 1:].reshape(-1).tolist()
    seq = torch.as_tensor(range(batch) if sequence is None else sequence).tolist()
    out = {"token_id": target,
           "token_str": [strings[t] if strings else str(t) for t in target],
           "position": list(range(1, pos)) * batch,
           "sequence": [s for s in seq for _ in range(pos - 1)]}
    if document is not None:
        out["document"] = [d for d in torch.as_tensor(document).tolist() for _ in range(pos - 1)]
    return out


def sample_coords(tokens: Tensor | TextData) -> dict[str, list]:
    """Per-sequence metadata (``sequence``, and ``document`` when known) of a ``[batch, pos]``
    set, for a ``sample`` dim."""
    if isinstance(tokens, TextData):
        return {"sequence": tokens.sequence.tolist(), "document": tokens.document.tolist()}
    return {"sequence": list(range(tokens.shape[0]))}


# ---- the `suscept run` side: [data] kind = "text" ---------------------------------------------
def from_config(cfg: dict) -> tuple[TextData, dict[str, list[int]]]:
    """``(corpus, chosen)`` of a resolved configuration's ``[data] kind = "text"``: the
    tokenized corpus and the sequence indices of ``train``, ``probe`` and ``query``.

    Nothing is written here (the command checks everything before it claims its folder; it then
    records both with :func:`save` in ``OUTPUT/data/text.pt`` and ``split.json``). If the
    output folder already holds them, a corpus whose token ids or split differ is refused
    (edited text or another tokenizer). Tokenizer: ``[data] tokenizer``, else the pretrained
    model's folder or name (its files in the local Hugging Face cache).
    """
    d, m = cfg["data"], cfg["model"]
    folder = d["tokenizer"] or m.get("folder") or m.get("name")
    if not folder:
        raise ConfigError("[data] kind='text' needs tokenizer = '<folder with tokenizer.json>' "
                          "(default: the pretrained model's folder or name)")
    corpus = tokenize(d["path"], folder, d["seq_len"], separator=d["document_separator"],
                      prepend_bos=d["prepend_bos"])
    train, probe, query = split(len(corpus), d["n_query"], d["n_probe"], d["select"],
                                seed=d["seed"], indices=d["indices"])
    out = Path(cfg["output"]["folder"]) / "data"
    chosen = {"train": train, "probe": probe, "query": query}
    if (out / "text.pt").exists():
        old = TextData.load(out / "text.pt")
        same = old.tokens.shape == corpus.tokens.shape and bool((old.tokens == corpus.tokens)
                                                                .all())
        if not same or json.loads((out / "split.json").read_text()) != chosen:
            raise ConfigError(f"the text's token ids differ from those saved in {out} (edited "
                              "files or another tokenizer); use another output folder")
    return corpus, chosen


def save(folder: str | Path, corpus: TextData, chosen: dict[str, list[int]]) -> None:
    """Record the tokenized corpus and its split in ``folder`` (``text.pt``, ``split.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus.save(folder / "text.pt")
    (folder / "split.json").write_text(json.dumps(chosen))


def label(estimates: dict, probe: Tensor, query: Tensor, folder: str | Path | None = None,
          token_loss: bool = True) -> dict:
    """``estimates`` with coordinates on their ``sample`` dim (the probe's sequences) and
    ``token`` / ``observable`` dims (the query's token losses; ``observable`` only with
    ``token_loss``, else the probe's sequences). Text runs take the documents and token
    strings saved in ``folder/data``; other data are labelled by ids and positions."""
    data = Path(folder) / "data" if folder is not None else None
    if data is not None and (data / "text.pt").exists():
        corpus = TextData.load(data / "text.pt")
        chosen = json.loads((data / "split.json").read_text())
        probe, query = corpus.subset(chosen["probe"]), corpus.subset(chosen["query"])
    by_dim = {"sample": sample_coords(probe), "token": token_coords(query),
              "observable": token_coords(query) if token_loss else sample_coords(probe)}
    out = {}
    for name, est in estimates.items():
        coords = {dim: c for dim, c in by_dim.items() if dim in est.dims
                  and len(next(iter(c.values()))) == est.shape[est.dims.index(dim)]}
        out[name] = est.with_coords(**coords) if coords else est
    return out
