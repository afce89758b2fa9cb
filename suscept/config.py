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
                   losses l_j are the observable "loss"; or "text" (`path`: files or folders,
                   `tokenizer` folder, seq_len, select "first" | "random" | "every K" with
                   seed, or `indices` file, document_separator, prepend_bos: docs/text.md)
    [observables]  components (names as observables.one_run takes them; [] for none) and
                   token_loss (per-token losses of the query, the per-token BIF's columns)
    [sampler]      the fields of suscept.SamplerConfig
    [estimators]   wanted: any of "llc", "loss_kernel", "bif", "susceptibility";
                   spring_control (default true): one spring-only control run (exact
                   n_beta -> 0 draws, suscept.spring_sample, seed + 1) for the
                   susceptibility and the BIF, their agreements in regime.json
    [output]       folder, store (write every draw to a DrawStore), col_block (columns per
                   block of the store-backed BIF), memory_budget_gb (default: half the RAM)

Every value must have its TOML type (``TYPES``: booleans are ``true``/``false``, counts are
integers, numbers finite); a wrong one is a ConfigError naming table, key and value.

The *identity* of a run is the resolved ``model``, ``data``, ``observables`` and ``sampler``
tables: they decide the draws. A folder keeps it in ``config.json`` and the inputs' content
hashes in ``inputs.json``; running a different identity, or the same one on other inputs,
into a folder with committed draws is refused, naming the differing keys or inputs.
``estimators`` and ``output`` may change between a run and its resume or report.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import fields
from pathlib import Path

from suscept.errors import ConfigError
from suscept.folder import RunFolder, changed_inputs, write_atomic
from suscept.sample import SamplerConfig
from suscept.store import differing_keys

ESTIMATORS = ("llc", "loss_kernel", "bif", "susceptibility")
IDENTITY = ("model", "data", "observables", "sampler")
DEFAULTS: dict[str, dict] = {
    "model": {"kind": "config", "n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8,
              "d_vocab": 64, "n_ctx": 32, "d_mlp": None, "seed": 0, "checkpoint": None,
              "name": None, "folder": None, "device": "cpu"},
    "data": {"kind": "zoo", "n_sequences": 64, "seed": 0, "language_seed": 0, "vocab": 64,
             "seq_len": 32, "path": None, "n_probe": 16, "n_query": 4,
             # kind = "text" only (observables/text.py; docs/text.md)
             "tokenizer": None, "select": "first", "indices": None,
             "document_separator": None, "prepend_bos": False},
    "observables": {"components": ["all heads"], "token_loss": True},
    "sampler": {f.name: f.default for f in fields(SamplerConfig)
                if f.name not in ("step_size", "n_beta")},
    "estimators": {"wanted": list(ESTIMATORS), "spring_control": True},
    "output": {"folder": "results/run", "store": True, "col_block": 4096,
               "memory_budget_gb": None},
}
REQUIRED = {"sampler": ("step_size", "n_beta")}
# the TOML type of every key: "int" (>= the bound), "float", "bool", "str", "strs" (a string or
# a list of strings); keys whose default is None may also be left out
TYPES: dict[str, dict[str, tuple]] = {
    "model": {"kind": ("str",), "n_layers": ("int", 1), "d_model": ("int", 1),
              "n_heads": ("int", 1), "d_head": ("int", 1), "d_vocab": ("int", 2),
              "n_ctx": ("int", 2), "d_mlp": ("int", 1), "seed": ("int", 0),
              "checkpoint": ("str",), "name": ("str",), "folder": ("str",),
              "device": ("str",)},
    "data": {"kind": ("str",), "n_sequences": ("int", 2), "seed": ("int", 0),
             "language_seed": ("int", 0), "vocab": ("int", 2), "seq_len": ("int", 2),
             "path": ("strs",), "n_probe": ("int", 1), "n_query": ("int", 1),
             "tokenizer": ("str",), "select": ("str",), "indices": ("str",),
             "document_separator": ("str",), "prepend_bos": ("bool",)},
    "observables": {"components": ("strs",), "token_loss": ("bool",)},
    "sampler": {"step_size": ("float",), "n_beta": ("float",), "gamma": ("float",),
                "weight_decay": ("float",), "precondition": ("str",),
                "rmsprop_alpha": ("float",), "rmsprop_delta": ("float",),
                "n_chains": ("int", 1), "n_draws": ("int", 1), "burn_in": ("int", 0),
                "thin": ("int", 1), "batch_size": ("int", 1), "seed": ("int", 0),
                "n_blocks": ("int", 1), "max_loss_rise": ("float",)},
    "estimators": {"wanted": ("strs",), "spring_control": ("bool",)},
    "output": {"folder": ("str",), "store": ("bool",), "col_block": ("int", 1),
               "memory_budget_gb": ("float",)},
}
WORDS = {"int": "an integer", "float": "a number", "bool": "true or false (a TOML boolean, "
         "not a string)", "str": "a string", "strs": "a string or a list of strings"}


def load(path: str | Path) -> dict:
    """Read and resolve a TOML configuration file (UTF-8)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"configuration file {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"configuration {path} is not a file (a folder?); pass a TOML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it "
                          "as UTF-8 TOML") from e
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        raw = tomllib.loads(text)
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
        for key, value in given.items():
            _check_type(table, key, value)
        out[table] = {**defaults, **given}
    _check(out)
    return json.loads(json.dumps(out))


def _check_type(table: str, key: str, value: object) -> None:
    """A TOML value of the key's type (``None`` only where the default is ``None``)."""
    kind, *bound = TYPES[table][key]
    if value is None and DEFAULTS[table].get(key, 0) is None:
        return
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, int | float) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str),
          "strs": isinstance(value, str) or (isinstance(value, list)
                                             and all(isinstance(v, str) for v in value))}[kind]
    if not ok:
        raise ConfigError(f"[{table}] {key} = {value!r} must be {WORDS[kind]}")
    if kind == "float" and not math.isfinite(value):
        raise ConfigError(f"[{table}] {key} = {value!r} must be a finite number")
    if kind == "int" and value < bound[0]:
        raise ConfigError(f"[{table}] {key} = {value!r} must be an integer >= {bound[0]}")


def _check(cfg: dict) -> None:
    kinds = {"model": ("config", "pretrained"), "data": ("zoo", "tokens", "text")}
    for table, allowed in kinds.items():
        if cfg[table]["kind"] not in allowed:
            raise ConfigError(f"[{table}] kind={cfg[table]['kind']!r} must be one of {allowed}")
    m = cfg["model"]
    if m["kind"] == "pretrained" and bool(m["name"]) == bool(m["folder"]):
        raise ConfigError("[model] kind='pretrained' needs exactly one of name = '<model in the "
                          "local Hugging Face cache>' or folder = '<Hugging Face model folder>'")
    if cfg["data"]["kind"] == "tokens" and not isinstance(cfg["data"]["path"], str):
        raise ConfigError("[data] kind='tokens' needs path = '<torch file of token ids>' "
                          "(one file)")
    if cfg["data"]["kind"] == "text" and not cfg["data"]["path"]:
        raise ConfigError("[data] kind='text' needs path = '<text file or folder>' (or a list)")
    _check_device(cfg["model"]["device"])
    for table, key in (("estimators", "wanted"), ("observables", "components")):
        if isinstance(cfg[table][key], str):
            cfg[table][key] = [cfg[table][key]]
    wanted = cfg["estimators"]["wanted"]
    bad = [w for w in wanted if w not in ESTIMATORS]
    if bad:
        raise ConfigError(f"[estimators] wanted has unknown {bad}; choose from {ESTIMATORS}")
    if "susceptibility" in wanted and not cfg["observables"]["components"]:
        raise ConfigError("the susceptibility estimator needs [observables] components")
    budget = cfg["output"]["memory_budget_gb"]
    if budget is not None and not budget > 0:
        raise ConfigError(f"[output] memory_budget_gb = {budget!r} must be a number > 0")
    sampler_config(cfg).validate()


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"[model] device = {device!r} is not a torch device (use 'cpu', "
                          "'cuda' or 'cuda:N')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"[model] device = {device!r} but no CUDA device is available here; "
                          "use device = 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"[model] device = {device!r} but this machine has "
                          f"{torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("[model] device = 'mps' but MPS is not available here; use 'cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"[model] device = {device!r}: use 'cpu', 'cuda[:N]' or 'mps'")


def sampler_config(cfg: dict) -> SamplerConfig:
    try:
        return SamplerConfig(**cfg["sampler"])
    except TypeError as e:
        raise ConfigError(f"[sampler]: {e}") from e


def identity(cfg: dict) -> dict:
    """The tables that decide the draws (see the module docstring)."""
    return {k: cfg[k] for k in IDENTITY}


def claim_folder(folder: Path | RunFolder, cfg: dict, versions: dict, write: bool = True, *,
                 inputs: dict | None = None, resume: bool = False,
                 outputs: tuple[str, ...] = ()) -> RunFolder:
    """Claim ``folder`` for the run ``cfg`` after everything was validated.

    Refused when the folder holds committed draws (or a finished run) of another identity or
    of other inputs (``inputs``: :func:`suscept.folder.fingerprint`), or of the same run
    without ``resume``; an uncommitted folder is claimed whatever it held (its old draw store
    is removed). Then records ``config.json`` (the resolved configuration), ``versions.json``,
    ``inputs.json`` and the ``outputs`` the run will write in the folder's manifest. With
    ``write=False`` (the other ranks of a distributed run) it only checks.
    """
    rf = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    if write:
        rf.lock()
    try:
        if rf.committed():
            _check_same_run(rf, cfg, inputs, resume)
        elif write:
            for rel in ("store/", "run/"):  # an unfinished start: nothing committed to keep
                rf.remove_owned(rel)
        if write:
            names = ("config.json", "versions.json", "inputs.json")
            rf.check_writable([*names, *outputs])
            rf.record(*names, *outputs)
            write_atomic(rf.path / "config.json", json.dumps(cfg, indent=1))
            write_atomic(rf.path / "versions.json", json.dumps(versions, indent=1))
            write_atomic(rf.path / "inputs.json", json.dumps(inputs, indent=1))
    except BaseException:
        rf.unlock()
        raise
    return rf


def _read_json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as e:
        raise ConfigError(f"{path} is damaged ({e}); choose a new output folder") from e
    if not isinstance(out, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object); choose a new output folder")
    return out


def _check_same_run(rf: RunFolder, cfg: dict, inputs: dict | None, resume: bool) -> None:
    old = _read_json(rf.path / "config.json")
    if not all(isinstance(old.get(k), dict) for k in IDENTITY):
        raise ConfigError(f"{rf.path} holds draws but its config.json is missing or damaged; "
                          "choose a new output folder")
    keys = differing_keys(identity(old), identity(cfg))
    if keys:
        raise ConfigError(f"{rf.path} holds a run with different settings: {keys}. Use "
                          "another output folder, or restore those settings to resume")
    if inputs is not None:
        changed = changed_inputs(_read_json(rf.path / "inputs.json"), inputs, cfg)
        if changed:
            raise ConfigError(f"{rf.path} holds draws of other inputs: {'; '.join(changed)} "
                              "changed since that run started, and resuming would mix them. "
                              "Restore the original inputs to resume, or use a new folder")
    if not resume:
        raise ConfigError(f"{rf.path} already holds draws; pass --resume to continue that run, "
                          "or choose another output folder")
