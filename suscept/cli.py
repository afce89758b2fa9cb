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
import platform
import sys
from pathlib import Path

import torch

from suscept import config as config_mod
from suscept import distributed
from suscept.errors import ConfigError, SusceptError
from suscept.estimate import Estimate
from suscept.estimators import bif, llc, loss_kernel
from suscept.report import report
from suscept.run import Run
from suscept.store import DrawStore
from suscept.streams import Cross
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
        return _pretrained(m)
    ob = importlib.import_module("observables")
    keys = ("n_layers", "d_model", "n_heads", "d_head", "d_vocab", "n_ctx", "d_mlp", "seed")
    model = ob.build(**{k: m[k] for k in keys})
    if m["checkpoint"]:
        path = Path(m["checkpoint"])
        if not path.exists():
            raise ConfigError(f"[model] checkpoint {path} does not exist")
        model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return model.to(m["device"]).eval()


def _pretrained(m: dict) -> torch.nn.Module:
    """``[model] kind = "pretrained"``: ``folder`` (a Hugging Face model folder) or ``name``
    (a model in the local Hugging Face cache), loaded offline by the installed line."""
    ob = importlib.import_module("observables")
    return ob.load_pretrained(m["folder"] or m["name"], device=m["device"])


def build_data(cfg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(train, probe, query)`` token ids: query = the last ``n_query`` sequences, train =
    the others, probe = the first ``n_probe`` training sequences."""
    d = cfg["data"]
    if d["kind"] == "zoo":
        lang = importlib.import_module("experiments.zoo.language")
        tokens = lang.make_dataset(d["n_sequences"], d["seed"], d["language_seed"],
                                   vocab=d["vocab"], seq_len=d["seq_len"]).tokens
    else:
        path = Path(d["path"])
        if not path.exists():
            raise ConfigError(f"[data] path {path} does not exist")
        tokens = torch.load(path, weights_only=True)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
        raise ConfigError("[data] must give token ids of shape [n_sequences, pos]")
    n_query, n_probe = d["n_query"], d["n_probe"]
    if not 0 < n_probe <= len(tokens) - n_query or n_query < 1:
        raise ConfigError(f"[data] has {len(tokens)} sequences: need n_query >= 1 and "
                          f"1 <= n_probe <= n_sequences - n_query (got {n_query}, {n_probe})")
    train, query = tokens[:-n_query].long(), tokens[-n_query:].long()
    return train, train[:n_probe], query


def build_observables(cfg: dict, model, query: torch.Tensor):
    """The evaluation plan, streams, dims of each recorded observable, coords."""
    ob = importlib.import_module("observables")
    o = cfg["observables"]
    specs, streams, names = [], [("loss", "loss")], []
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


# ---- run ------------------------------------------------------------------------------------
def run(config_path: str, *, folder: str | None = None, resume: bool = False,
        progress: bool = True) -> Path | None:
    """Sample and estimate what ``config_path`` describes; returns the results folder."""
    cfg = config_mod.load(config_path)
    if folder is not None:
        cfg["output"]["folder"] = str(folder)
    out = Path(cfg["output"]["folder"])
    distributed.init()
    rank = distributed.rank()
    config_mod.claim_folder(out, cfg, versions(), write=rank == 0)
    if (out / "store" / "progress").exists() and any((out / "store" / "progress").iterdir()) \
            and not resume:
        raise ConfigError(f"{out} already holds draws; pass --resume to continue that run, or "
                          "choose another output folder")
    torch.manual_seed(0)  # model construction must not depend on the caller's RNG state
    model = build_model(cfg)
    train, probe, query = build_data(cfg)
    plan, streams, dims, coords = build_observables(cfg, model, query)
    store = None
    if cfg["output"]["store"]:
        store = DrawStore(out / "store", meta=config_mod.identity(cfg), dims=dims,
                          coords=coords, resume=resume)
    loss_fn = importlib.import_module("observables").lm_loss
    sampled = distributed.sample(model, loss_fn, train, config_mod.sampler_config(cfg),
                                 probe=probe, observables=plan, stream=streams,
                                 store_draws=[k for k in SMALL if k in dims],
                                 store=store, progress=progress)
    if distributed.is_active():
        torch.distributed.destroy_process_group()  # every rank holds the merged run
    if rank != 0:
        return None
    sampled.config["components"] = coords["component"]
    sampled.save(out / "run")
    estimates = estimate(cfg, sampled, store)
    (out / "estimates").mkdir(exist_ok=True)
    for stale in (out / "estimates").glob("*.pt"):  # estimators may change on a resume
        stale.unlink()
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
def main(argv: list[str] | None = None) -> int:
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
    except SusceptError as e:
        print(f"suscept {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
