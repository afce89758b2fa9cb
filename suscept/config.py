"""The TOML run configuration of ``suscept run`` and the identity of a results folder.

A configuration has six tables; every key has a default except the sampler's ``step_size``
and ``n_beta``, and an unknown table or key is an error naming it::

    [model]        kind = "config" (a TransformerLens model built from the keys below, weights
                   from seed, or loaded from `checkpoint`, a state_dict file) or "pretrained"
                   (`folder`, a Hugging Face model folder, or `name`, a model in the local
                   Hugging Face cache; loaded offline by the installed TransformerLens line)
    [data]         kind = "zoo" (the synthetic language of experiments/zoo: n_sequences, seed,
                   language_seed, vocab, seq_len) or "tokens" (`path`: a torch file of token
                   ids [N, pos]); the last n_query sequences are the query, the rest the
                   training set, and its first n_probe sequences the probe whose per-sample
                   losses l_j are the observable "loss"
    [observables]  components (names as observables.one_run takes them; [] for none) and
                   token_loss (per-token losses of the query, the per-token BIF's columns)
    [sampler]      the fields of suscept.SamplerConfig
    [estimators]   wanted: any of "llc", "loss_kernel", "bif", "susceptibility"
    [output]       folder, store (write every draw to a DrawStore), col_block (columns per
                   block of the store-backed BIF)

The *identity* of a run is the resolved ``model``, ``data``, ``observables`` and ``sampler``
tables: they decide the draws. A folder keeps it in ``config.json``; running a different
identity into it is refused with the differing keys named. ``estimators`` and ``output`` may
change between a run and its resume or report.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import fields
from pathlib import Path

from suscept.errors import ConfigError
from suscept.sample import SamplerConfig
from suscept.store import differing_keys, write_json

ESTIMATORS = ("llc", "loss_kernel", "bif", "susceptibility")
IDENTITY = ("model", "data", "observables", "sampler")
DEFAULTS: dict[str, dict] = {
    "model": {"kind": "config", "n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8,
              "d_vocab": 64, "n_ctx": 32, "d_mlp": None, "seed": 0, "checkpoint": None,
              "name": None, "folder": None, "device": "cpu"},
    "data": {"kind": "zoo", "n_sequences": 64, "seed": 0, "language_seed": 0, "vocab": 64,
             "seq_len": 32, "path": None, "n_probe": 16, "n_query": 4},
    "observables": {"components": ["all heads"], "token_loss": True},
    "sampler": {f.name: f.default for f in fields(SamplerConfig)
                if f.name not in ("step_size", "n_beta")},
    "estimators": {"wanted": list(ESTIMATORS)},
    "output": {"folder": "results/run", "store": True, "col_block": 4096},
}
REQUIRED = {"sampler": ("step_size", "n_beta")}


def load(path: str | Path) -> dict:
    """Read and resolve a TOML configuration file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"configuration file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return resolve(raw)


def resolve(raw: dict) -> dict:
    """Defaults filled in, unknown tables/keys and bad values refused; a JSON-able dict."""
    unknown = sorted(set(raw) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown tables {unknown}; the tables are {list(DEFAULTS)}")
    out = {}
    for table, defaults in DEFAULTS.items():
        given = raw.get(table, {})
        if not isinstance(given, dict):
            raise ConfigError(f"[{table}] must be a table")
        bad = sorted(set(given) - set(defaults) - set(REQUIRED.get(table, ())))
        if bad:
            raise ConfigError(f"unknown keys {bad} in [{table}]; valid: "
                              f"{sorted(set(defaults) | set(REQUIRED.get(table, ())))}")
        missing = [k for k in REQUIRED.get(table, ()) if k not in given]
        if missing:
            raise ConfigError(f"[{table}] needs {missing}")
        out[table] = {**defaults, **given}
    _check(out)
    return json.loads(json.dumps(out))


def _check(cfg: dict) -> None:
    kinds = {"model": ("config", "pretrained"), "data": ("zoo", "tokens")}
    for table, allowed in kinds.items():
        if cfg[table]["kind"] not in allowed:
            raise ConfigError(f"[{table}] kind={cfg[table]['kind']!r} must be one of {allowed}")
    m = cfg["model"]
    if m["kind"] == "pretrained" and bool(m["name"]) == bool(m["folder"]):
        raise ConfigError("[model] kind='pretrained' needs exactly one of name = '<model in the "
                          "local Hugging Face cache>' or folder = '<Hugging Face model folder>'")
    if cfg["data"]["kind"] == "tokens" and not cfg["data"]["path"]:
        raise ConfigError("[data] kind='tokens' needs path = '<torch file of token ids>'")
    wanted = cfg["estimators"]["wanted"]
    bad = [w for w in wanted if w not in ESTIMATORS]
    if bad:
        raise ConfigError(f"[estimators] wanted has unknown {bad}; choose from {ESTIMATORS}")
    comps = cfg["observables"]["components"]
    if isinstance(comps, str):
        cfg["observables"]["components"] = [comps]
    if "susceptibility" in wanted and not cfg["observables"]["components"]:
        raise ConfigError("the susceptibility estimator needs [observables] components")
    sampler_config(cfg).validate()


def sampler_config(cfg: dict) -> SamplerConfig:
    try:
        return SamplerConfig(**cfg["sampler"])
    except TypeError as e:
        raise ConfigError(f"[sampler]: {e}") from e


def identity(cfg: dict) -> dict:
    """The tables that decide the draws (see the module docstring)."""
    return {k: cfg[k] for k in IDENTITY}


def claim_folder(folder: Path, cfg: dict, versions: dict, write: bool = True) -> None:
    """Check that ``folder`` is new or holds a run of the same identity; then record
    ``config.json`` (the resolved configuration) and ``versions.json`` beside the results."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        keys = differing_keys(identity(old), identity(cfg))
        if keys:
            raise ConfigError(f"{folder} holds a run with different settings: {keys}. Use "
                              "another output folder, or restore those settings to resume")
    if write:
        write_json(path, cfg)
        write_json(folder / "versions.json", versions)
