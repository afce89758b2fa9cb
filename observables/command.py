"""What ``suscept run`` builds from a configuration on TransformerLens models.

The ``suscept`` engine names no model library: it finds these builders through the
``suscept.builders`` entry-point group (``pyproject.toml`` registers this module as
``transformer_lens``). Each function takes the resolved configuration (:mod:`suscept.config`):

- :func:`build_model`: ``[model] kind = "config"`` (a HookedTransformer / TransformerBridge
  built from its keys, weights from ``seed`` or a ``checkpoint`` state_dict) or
  ``"pretrained"`` (``folder`` or ``name``, offline, :func:`observables.load_pretrained`).
- :func:`build_data`: ``[data] kind = "zoo"`` (the synthetic language of
  :mod:`observables.language`), ``"tokens"`` (a torch file of token ids) or ``"text"``
  (:mod:`observables.text`); returns ``(train, probe, query, labels)``.
- :func:`check_data`, :func:`build_observables`, :data:`loss_fn`, :func:`record` (the text
  corpus and its split, written once the folder is claimed) and :func:`label` (token and
  sequence coordinates on the estimates).
- :data:`first_order` (optional for a builder): the deterministic first-order term of the
  spring-only susceptibility, the regime's third control (:func:`observables.
  first_order_susceptibility`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from observables.components import expand
from observables.lm import check_tokens, lm_loss
from observables.models import build
from observables.plan import EvaluationPlan
from observables.registry import TokenLoss
from observables.runs import first_order_susceptibility, susceptibility_observables
from suscept.errors import ConfigError, SusceptError
from suscept.inputs import input_file, split_tokens, torch_load
from suscept.streams import Cross

loss_fn = lm_loss  # per-sample mean token loss [batch] of a TransformerLens model
first_order = first_order_susceptibility  # (model, probe, components, sampler config)


def build_model(cfg: dict) -> torch.nn.Module:
    """The model of ``[model]``: built from its keys (weights from ``seed`` or ``checkpoint``)
    or a pretrained TransformerLens model whose weights are already on this machine."""
    m = cfg["model"]
    if m["kind"] == "pretrained":
        from observables.pretrained import load_pretrained

        return load_pretrained(m["folder"] or m["name"], device=m["device"])
    keys = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "d_mlp", "seed")
    model = build(**{k: m[k] for k in keys})
    if m["checkpoint"]:
        path = input_file(m["checkpoint"], "[model] checkpoint")
        state = torch_load(path, "[model] checkpoint", "a state_dict of the model")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise ConfigError(f"[model] checkpoint {path} is not a state_dict (a dict of "
                              "tensors); save one with torch.save(model.state_dict(), path)")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[1:3]) or first[0]
            raise ConfigError(f"[model] checkpoint {path} does not fit the model [model] "
                              f"describes ({detail[:300]}); set n_layers, d_model, n_heads, "
                              "d_head, d_vocab, n_ctx, d_mlp to the checkpoint's") from e
    return model.to(m["device"]).eval()


def build_data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
    """``(train, probe, query, labels)``: token ids ``[n, pos]`` and what :func:`record` and
    :func:`label` need (``(corpus, chosen)`` for text, else ``None``). Zoo and token files:
    query = the last ``n_query`` sequences, train = the others, probe = the first ``n_probe``
    training sequences; text: the split of :func:`observables.text.from_config`."""
    d = cfg["data"]
    if d["kind"] == "text":  # documents kept apart; nothing written before the folder is ours
        from observables.text import from_config

        corpus, chosen = from_config(cfg)
        sets = [corpus.subset(chosen[k]).tokens for k in ("train", "probe", "query")]
        return (*sets, (corpus, chosen))
    if d["kind"] == "zoo":
        from observables.language import make_dataset

        try:
            tokens = make_dataset(d["n_sequences"], d["seed"], d["language_seed"],
                                  vocab=d["vocab"], seq_len=d["seq_len"]).tokens
        except ValueError as e:
            raise ConfigError(f"[data] kind='zoo': {e} (raise seq_len or vocab)") from e
    else:
        path = input_file(d["path"], "[data] path")
        tokens = torch_load(path, "[data] path", "token ids [n_sequences, pos]")
    return (*split_tokens(tokens, d["n_query"], d["n_probe"]), None)


def check_data(model, train: torch.Tensor, query: torch.Tensor) -> None:
    """Token ids within the model's vocabulary and context (``n_ctx``), before any sampling."""
    for what, tokens in (("[data] training sequences", train), ("[data] query", query)):
        try:
            check_tokens(tokens, model, what)
        except SusceptError as e:
            raise ConfigError(f"{e} (set [model] n_ctx / d_vocab or [data] seq_len / vocab)") \
                from e


def build_observables(cfg: dict, model, query: torch.Tensor):
    """The evaluation plan, streams, dims of each recorded observable, coords."""
    o = cfg["observables"]
    # no estimator of the command needs third-order slices: the n_probe^2 kernel only
    specs, streams, names = [], [Cross("loss", "loss", third=False)], []
    if o["components"]:
        from observables.adapter import Adapter

        names = [c.name for c in expand(o["components"], Adapter.of(model))]
        comp_specs, comp_streams = susceptibility_observables(names)
        specs += comp_specs
        streams += comp_streams
    if o["token_loss"]:
        specs.append(TokenLoss(None, name="token_loss"))
        if not cfg["output"]["store"]:  # no store to read blockwise: stream the BIF's moments
            streams.append(Cross("loss", "token_loss", third=False))
    plan = EvaluationPlan(model, query, specs) if specs else None
    dims = {"loss": ("sample",), "mean_loss": (), "phi": ("component",),
            "restricted_token_loss": ("component", "token"), "token_loss": ("token",)}
    dims = {k: v for k, v in dims.items() if k == "loss" or k in [s.key for s in specs]}
    return plan, streams, dims, {"component": names}


def record(folder: Path, labels) -> None:
    """Write what a rerun needs to be identical: a text corpus and its split (``folder``)."""
    if labels is not None:
        from observables.text import save

        save(folder, *labels)


def label(estimates: dict, labels, probe: torch.Tensor, query: torch.Tensor,
          token_loss: bool) -> dict:
    """Coordinates on the estimates' ``sample``/``token``/``observable`` dims
    (:func:`observables.text.label`): token strings and documents for text."""
    from observables.text import label as text_label

    if labels is not None:
        corpus, chosen = labels
        probe, query = corpus.subset(chosen["probe"]), corpus.subset(chosen["query"])
    return text_label(estimates, probe, query, None, token_loss)
