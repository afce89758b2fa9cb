"""The ``suscept`` command: ``suscept run CONFIG.toml`` and ``suscept report FOLDER``.

``run`` builds the model, data and observables a TOML file describes (:mod:`suscept.config`),
samples (split over ranks under ``torchrun``, see :mod:`suscept.distributed`), writes every
draw to a crash-safe :class:`~suscept.store.DrawStore` and the estimates beside it, and prints
a summary table. ``--resume`` continues an interrupted run from its store. ``report``
re-renders the table and plots from a folder's saved results without sampling.

Folder layout: ``config.json``, ``versions.json``, ``store/`` (draws), ``run/`` (the
:class:`~suscept.run.Run`: streamed moments, traces, small draws), ``estimates/NAME.pt``
(:class:`~suscept.estimate.Estimate`), ``summary.txt``, ``summary.json``, ``*.png``.

TransformerLens models, losses and observables come from the ``observables`` package and the
synthetic language from ``experiments.zoo`` (run from a checkout); they are imported by name
when a configuration asks for them, so the ``suscept`` engine itself never depends on them.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
import tomllib
from pathlib import Path

import torch

from suscept import config as config_mod
from suscept import distributed
from suscept.errors import ConfigError, SusceptError
from suscept.estimate import Estimate
from suscept.estimators import bif, default_blocks, llc, loss_kernel
from suscept.folder import RunFolder, fingerprint
from suscept.report import report
from suscept.run import Run
from suscept.store import DrawStore
from suscept.streams import Cross, as_stream, memory_bytes, physical_memory
from suscept.susceptibilities import susceptibility

SMALL = ("loss", "mean_loss", "phi")  # observables also kept in memory (the rest: store only)


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("suscept", "torch", "transformer-lens", "zarr", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---- building what a configuration describes ----------------------------------------------
def build_model(cfg: dict) -> torch.nn.Module:
    """The model of ``[model]``: built from its keys (weights from ``seed`` or ``checkpoint``)
    or a pretrained TransformerLens model whose weights are already on this machine."""
    m = cfg["model"]
    if m["kind"] == "pretrained":
        return _pretrained(m["name"], m["device"])
    ob = _import("observables", "TransformerLens models")
    keys = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "d_mlp", "seed")
    model = ob.build(**{k: m[k] for k in keys})
    if m["checkpoint"]:
        path = _input_file(m["checkpoint"], "[model] checkpoint")
        state = _torch_load(path, "[model] checkpoint", "a state_dict of the model")
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


def _import(name: str, what: str):
    """Import a package the configuration needs, or say how to get it."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        top = name.split(".")[0]
        if e.name is None or e.name.split(".")[0] != top:
            raise
        where = ("a suscept checkout: run from its root (or use [data] kind = 'tokens')"
                 if top == "experiments" else "the suscept distribution (pip install suscept)")
        raise ConfigError(f"{what} need the {top!r} package, which is not importable here; it "
                          f"comes with {where}") from e


def _input_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p} does not exist")
    if not p.is_file():
        raise ConfigError(f"{what} {p} is not a file (a folder?); give the path of a torch file")
    return p


def _torch_load(path: Path, what: str, need: str):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except OSError:
        raise
    except Exception as e:  # pickle, zip and torch errors of a file that is not a tensor file
        raise ConfigError(f"{what} {path} is not a readable torch file of {need} "
                          f"({type(e).__name__}); save it with torch.save") from e


def _pretrained(name: str, device: str) -> torch.nn.Module:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights must already be cached locally
    tl = importlib.import_module("transformer_lens")
    try:
        if importlib.import_module("observables").backend() == "hooked":
            return tl.HookedTransformer.from_pretrained(name, device=device).eval()
        return tl.TransformerBridge.boot_transformers(name, device=device).eval()
    except Exception as e:
        raise ConfigError(f"could not load pretrained model {name!r} offline ({e}); its weights "
                          "must be in the local Hugging Face cache") from e


def build_data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, probe, query)`` token ids: query = the last ``n_query`` sequences, train =
    the others, probe = the first ``n_probe`` training sequences."""
    d = cfg["data"]
    if d["kind"] == "zoo":
        lang = _import("experiments.zoo.language", "[data] kind = 'zoo' (the synthetic language)")
        tokens = lang.make_dataset(d["n_sequences"], d["seed"], d["language_seed"],
                                   vocab=d["vocab"], seq_len=d["seq_len"]).tokens
    else:
        path = _input_file(d["path"], "[data] path")
        tokens = _torch_load(path, "[data] path", "token ids [n_sequences, pos]")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ConfigError(f"[data] must give token ids of shape [n_sequences, pos]; got {got}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ConfigError(f"[data] token ids must be an integer tensor; got dtype {tokens.dtype} "
                          "(save them with .long(); values are not rounded for you)")
    n_query, n_probe = d["n_query"], d["n_probe"]
    if not 0 < n_probe <= len(tokens) - n_query or n_query < 1:
        raise ConfigError(f"[data] has {len(tokens)} sequences: need n_query >= 1 and "
                          f"1 <= n_probe <= n_sequences - n_query (got {n_query}, {n_probe})")
    train, query = tokens[:-n_query].long(), tokens[-n_query:].long()
    return train, train[:n_probe], query


def check_data(model, train: torch.Tensor, query: torch.Tensor) -> None:
    """Token ids within the model's vocabulary and context (``n_ctx``), before any sampling."""
    ob = _import("observables", "TransformerLens models")
    for what, tokens in (("[data] training sequences", train), ("[data] query", query)):
        try:
            ob.check_tokens(tokens, model, what)
        except SusceptError as e:
            raise ConfigError(f"{e} (set [model] n_ctx / d_vocab or [data] seq_len / vocab)") \
                from e


def build_observables(cfg: dict, model, query: torch.Tensor):
    """The evaluation plan, streams, dims of each recorded observable, coords."""
    ob = importlib.import_module("observables")
    o = cfg["observables"]
    # no estimator of the command needs third-order slices: the n_probe^2 kernel only
    specs, streams, names = [], [Cross("loss", "loss", third=False)], []
    if o["components"]:
        names = [c.name for c in ob.expand(o["components"], ob.Adapter.of(model))]
        comp_specs, comp_streams = ob.susceptibility_observables(names)
        specs += comp_specs
        streams += comp_streams
    if o["token_loss"]:
        specs.append(ob.TokenLoss(None, name="token_loss"))
        if not cfg["output"]["store"]:  # no store to read blockwise: stream the BIF's moments
            streams.append(Cross("loss", "token_loss", third=False))
    plan = ob.EvaluationPlan(model, query, specs) if specs else None
    dims = {"loss": ("sample",), "mean_loss": (), "phi": ("component",),
            "restricted_token_loss": ("component", "token"), "token_loss": ("token",)}
    dims = {k: v for k, v in dims.items() if k == "loss" or k in [s.key for s in specs]}
    return plan, streams, dims, {"component": names}


def observable_shapes(dims: dict, n_probe: int, n_components: int,
                      query: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The shape of one draw of each recorded observable."""
    n_tokens = query.shape[0] * (query.shape[1] - 1)
    sizes = {"sample": n_probe, "component": n_components, "token": n_tokens}
    return {name: tuple(sizes[d] for d in axes) for name, axes in dims.items()}


def memory_budget(cfg: dict) -> float:
    """Bytes a run may use: ``[output] memory_budget_gb``, default half the physical memory."""
    if cfg["output"]["memory_budget_gb"] is not None:
        return cfg["output"]["memory_budget_gb"] * 2**30
    return 0.5 * physical_memory()


def check_memory(cfg: dict, shapes: dict, streams: list) -> dict[str, int]:
    """Predicted peak memory of the streamed moments, in-memory draws and the store-backed BIF
    (:func:`suscept.streams.memory_bytes`); a ConfigError past :func:`memory_budget`."""
    s = config_mod.sampler_config(cfg)
    segs = s.n_chains * (s.n_blocks or default_blocks(s.n_chains, s.n_draws))
    stored = {k: s.n_chains * s.n_draws * math.prod(shapes[k]) for k in SMALL if k in shapes}
    items = memory_bytes([as_stream(x) for x in streams], shapes, segs, stored)
    if cfg["output"]["store"] and "token_loss" in shapes and "bif" in cfg["estimators"]["wanted"]:
        cols = min(cfg["output"]["col_block"], math.prod(shapes["token_loss"]))
        items["store-backed bif"] = memory_bytes([Cross("loss", "token", third=False)],
                                                 {"loss": shapes["loss"], "token": (cols,)},
                                                 segs)["loss|token"]
    total, budget = sum(items.values()), memory_budget(cfg)
    if total > budget:
        top = max(items, key=items.get)
        raise ConfigError(f"this run would need about {total / 2**30:.3g} GB of memory, over the "
                          f"budget of {budget / 2**30:.3g} GB ([output] memory_budget_gb); most "
                          f"of it is {top!r} ({items[top] / 2**30:.3g} GB): lower n_probe, the "
                          "components, [data] seq_len, n_chains or n_blocks, or raise the budget")
    return items


# ---- run ------------------------------------------------------------------------------------
REPORT_FILES = ("summary.txt", "summary.json", "trace.png", "bif.png", "susceptibility.png")


def run(config_path: str, *, folder: str | None = None, resume: bool = False,
        progress: bool = True) -> Path | None:
    """Sample and estimate what ``config_path`` describes; returns the results folder.

    Everything (configuration, output folder, model, data, observables, memory) is checked
    before the folder is claimed; the folder is locked while the run writes, and only files
    the run wrote are ever replaced (see :mod:`suscept.folder`).
    """
    cfg = config_mod.load(config_path)
    if folder is not None:
        cfg["output"]["folder"] = str(folder)
    out = Path(cfg["output"]["folder"])
    rf = RunFolder(out)  # refuses a file, or a non-empty folder no run wrote
    distributed.init()
    rank = distributed.rank()
    model = build_model(cfg)
    train, probe, query = build_data(cfg)
    check_data(model, train, query)
    plan, streams, dims, coords = build_observables(cfg, model, query)
    check_memory(cfg, observable_shapes(dims, len(probe), len(coords["component"]), query),
                 streams)
    loss_fn = _import("observables", "TransformerLens models").lm_loss
    with torch.no_grad():
        anchor_loss = loss_fn(model, probe.to(next(model.parameters()).device))
    inputs = fingerprint(cfg, model, {"train": train, "query": query}, anchor_loss)
    wanted = [f"estimates/{w}.pt" for w in cfg["estimators"]["wanted"]]
    rf = config_mod.claim_folder(rf, cfg, versions(), write=rank == 0, inputs=inputs,
                                 resume=resume, outputs=("store/", "run/", *wanted,
                                                         *REPORT_FILES))
    try:
        return _sample_and_save(cfg, rf, model, loss_fn, (train, probe), plan, streams, dims,
                                coords, inputs, resume, progress)
    finally:
        rf.unlock()


def _sample_and_save(cfg, rf: RunFolder, model, loss_fn, data, plan, streams, dims, coords,
                     inputs, resume, progress) -> Path | None:
    out, (train, probe) = rf.path, data
    store = None
    if cfg["output"]["store"]:
        meta = {**config_mod.identity(cfg), "inputs": {k: v for k, v in inputs.items()
                                                       if k.endswith("sha256")}}
        store = DrawStore(out / "store", meta=meta, dims=dims, coords=coords, resume=resume)
    sampled = distributed.sample(model, loss_fn, train, config_mod.sampler_config(cfg),
                                 probe=probe, observables=plan, stream=streams,
                                 store_draws=[k for k in SMALL if k in dims],
                                 store=store, progress=progress)
    if distributed.is_active():
        torch.distributed.destroy_process_group()  # every rank holds the merged run
    if distributed.rank() != 0:
        return None
    sampled.config["components"] = coords["component"]
    sampled.save(out / "run")
    estimates = estimate(cfg, sampled, store)
    (out / "estimates").mkdir(exist_ok=True)
    for old in (out / "estimates").glob("*.pt"):  # estimators may change on a resume
        if old.stem not in estimates:
            rf.remove_owned(f"estimates/{old.name}")  # files the run did not write stay
    for name, est in estimates.items():
        est.save(out / "estimates" / f"{name}.pt")
    report(out)
    return out


def estimate(cfg: dict, run: Run, store: DrawStore | None) -> dict[str, Estimate]:
    """The estimators ``[estimators] wanted`` asks for, from the run's streams or its store."""
    wanted, out = cfg["estimators"]["wanted"], {}
    if not run.valid_chains:
        raise SusceptError("every chain diverged: nothing to estimate (lower step_size)")
    losses = run.moments_of("loss")
    if "llc" in wanted:
        out["llc"] = llc(losses, run.anchor_values["loss"], run.config["n_beta"])
    if "loss_kernel" in wanted:
        out["loss_kernel"] = loss_kernel(losses)
    if "bif" in wanted:
        if cfg["observables"]["token_loss"] and store is not None:  # per-token, blockwise
            out["bif"] = store.bif("loss", "token_loss", col_block=cfg["output"]["col_block"])
        elif cfg["observables"]["token_loss"]:  # per-token, from the streamed moments
            out["bif"] = bif(run.moments_of("loss", "token_loss"))
        else:  # train on train: -Cov(l_j, l_k)
            out["bif"] = bif(losses)
    if "susceptibility" in wanted:
        out["susceptibility"] = susceptibility(run)
    return out


# ---- entry point ----------------------------------------------------------------------------
EXPECTED = (SusceptError, OSError, UnicodeError, tomllib.TOMLDecodeError, MemoryError)


def main(argv: list[str] | None = None) -> int:
    """The ``suscept`` command. Exit status: 0 done, 2 a mistake (one line on stderr naming
    it), 130 interrupted (Ctrl-C; ``run`` prints how to resume)."""
    parser = argparse.ArgumentParser(prog="suscept", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="sample and estimate what a TOML configuration describes")
    p_run.add_argument("config", help="the TOML configuration file")
    p_run.add_argument("--out", help="results folder (overrides [output] folder)")
    p_run.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_rep = sub.add_parser("report", help="re-render tables and plots of a results folder")
    p_rep.add_argument("folder")
    p_rep.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            run(args.config, folder=args.out, resume=args.resume, progress=not args.no_progress)
        else:
            report(args.folder, plots=not args.no_plots)
    except KeyboardInterrupt:
        hint = ""
        if args.command == "run":
            out = f" --out {args.out}" if args.out else ""
            hint = (f"; the draws committed so far are kept: continue with suscept run "
                    f"{args.config}{out} --resume")
        print(f"suscept {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except EXPECTED as e:
        print(f"suscept {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _one_line(e: BaseException) -> str:
    """The message of an expected error, on one line."""
    if isinstance(e, SusceptError):
        text = str(e)
    elif isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        text = f"{e.strerror or e}{where}: check the path, its permissions and the free space"
    elif isinstance(e, MemoryError):
        text = "out of memory; lower n_probe, the components, or n_chains"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
