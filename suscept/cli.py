"""The ``suscept`` command: ``suscept run CONFIG.toml`` and ``suscept report FOLDER``.

``run`` builds the model, data and observables a TOML file describes (:mod:`suscept.config`),
samples (split over ranks under ``torchrun``, see :mod:`suscept.distributed`), writes every
draw to a crash-safe :class:`~suscept.store.DrawStore` and the estimates beside it, and prints
a summary table. ``--resume`` continues an interrupted run from its store. ``report``
re-renders the table and plots from a folder's saved results without sampling.

Folder layout: ``manifest.json`` (the paths the run wrote: nothing else is ever replaced),
``lock`` (held while a run writes), ``config.json``, ``versions.json``, ``inputs.json`` (the
inputs by content, :func:`suscept.folder.fingerprint`), ``store/`` (draws), ``run/`` (the
:class:`~suscept.run.Run`: streamed moments, traces, small draws), ``estimates/NAME.pt``
(:class:`~suscept.estimate.Estimate`), ``summary.txt``, ``summary.json``, ``*.png``.
Everything a configuration names is loaded and checked (:mod:`suscept.inputs`) before the
folder is claimed; mistakes end in one line and exit status 2, Ctrl-C in status 130.

Models, data, losses and observables come from the builders registered in the
``suscept.builders`` entry-point group (:func:`suscept.inputs.builders`; the distribution
registers ``observables.command`` for TransformerLens models, the synthetic language
included), so the ``suscept`` engine names no model library.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tomllib
from pathlib import Path

import torch

from suscept import config as config_mod
from suscept import distributed
from suscept.controls import first_order_control, run_regime, spring_controls
from suscept.errors import ConfigError, SusceptError
from suscept.estimate import Estimate
from suscept.estimators import bif, llc, llc_from_trace, loss_kernel
from suscept.folder import RunFolder, fingerprint
from suscept.inputs import SMALL, builders, check_memory, observable_shapes
from suscept.report import report
from suscept.run import Run
from suscept.store import DrawStore, write_json
from suscept.susceptibilities import susceptibility


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("suscept", "torch", "transformer-lens", "zarr", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# ---- run ------------------------------------------------------------------------------------
REPORT_FILES = ("summary.txt", "summary.json", "regime.json", "trace.png", "bif.png",
                "susceptibility.png")


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
    b = builders()
    model = b.build_model(cfg)
    train, probe, query, labels = b.build_data(cfg)  # labels: what record/label need
    b.check_data(model, train, query)
    plan, streams, dims, coords = b.build_observables(cfg, model, query)
    check_memory(cfg, observable_shapes(dims, len(probe), len(coords["component"]), query),
                 streams)
    loss_fn = b.loss_fn
    with torch.no_grad():
        anchor_loss = loss_fn(model, probe.to(next(model.parameters()).device))
    if not bool(torch.isfinite(anchor_loss).all()):
        raise ConfigError("the probe losses at the anchor are NaN/inf: the model's weights (or "
                          "[model] checkpoint) are not finite; nothing can be sampled from them")
    inputs = fingerprint(cfg, model, {"train": train, "query": query}, anchor_loss)
    wanted = [f"estimates/{w}.pt" for w in cfg["estimators"]["wanted"]]
    rf = config_mod.claim_folder(rf, cfg, versions(), write=rank == 0, inputs=inputs,
                                 resume=resume, outputs=("store/", "run/", "data/", *wanted,
                                                         *REPORT_FILES))
    try:
        return _sample_and_save(cfg, rf, rank, b, model, (train, probe, query, labels),
                                plan, streams, dims, coords, inputs, resume, progress)
    finally:
        rf.unlock()


def _sample_and_save(cfg, rf: RunFolder, rank: int, b, model, data, plan, streams, dims,
                     coords, inputs, resume, progress) -> Path | None:
    out, (train, probe, query, labels) = rf.path, data
    store = None
    if cfg["output"]["store"]:
        meta = {**config_mod.identity(cfg), "inputs": {k: v for k, v in inputs.items()
                                                       if k.endswith("sha256")}}
        store = DrawStore(out / "store", meta=meta, dims=dims, coords=coords, resume=resume)
    sampled = distributed.sample(model, b.loss_fn, train, config_mod.sampler_config(cfg),
                                 probe=probe, observables=plan, stream=streams,
                                 store_draws=[k for k in SMALL if k in dims],
                                 store=store, progress=progress)
    if distributed.is_active():
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()  # every rank holds the merged run
    if rank != 0:
        return None
    sampled.config["components"] = coords["component"]
    sampled.save(out / "run")
    b.record(out / "data", labels)
    train_loss = _mean_loss(model, b.loss_fn, train, sampled.config["batch_size"])
    estimates = b.label(estimate(cfg, sampled, store, train_loss), labels, probe, query,
                        cfg["observables"]["token_loss"])
    asked = [w for w in ("susceptibility", "bif") if w in estimates]
    control = spring_controls(cfg, model, b.loss_fn, train, probe, plan, streams, sampled,
                              store, asked if cfg["estimators"]["spring_control"] else [],
                              progress)
    first = None
    if "susceptibility" in asked and cfg["estimators"]["spring_control"]:
        first = first_order_control(getattr(b, "first_order", None), model, query, sampled,
                                    config_mod.sampler_config(cfg))
    regime, measured = run_regime(model, b.loss_fn, train, sampled, estimates.get("llc"),
                                  control)
    write_json(out / "regime.json", {**regime.as_dict(), **measured,
                                     "spring_control": control.get("susceptibility"),
                                     "bif_spring_control": control.get("bif"),
                                     "first_order_control": first})
    (out / "estimates").mkdir(exist_ok=True)
    for old in (out / "estimates").glob("*.pt"):  # estimators may change on a resume
        if old.stem not in estimates:
            rf.remove_owned(f"estimates/{old.name}")  # files the run did not write stay
    for name, est in estimates.items():
        est.save(out / "estimates" / f"{name}.pt")
    report(out)
    return out


def _mean_loss(model, loss_fn, data: torch.Tensor, batch_size: int | None) -> float:
    """``L_n(w*)``: the mean per-sample loss over the whole training set, in batches."""
    size = batch_size or len(data)
    device = next(model.parameters()).device
    with torch.no_grad():
        total = sum(float(loss_fn(model, data[i:i + size].to(device)).double().sum())
                    for i in range(0, len(data), size))
    return total / len(data)


def estimate(cfg: dict, run: Run, store: DrawStore | None,
             train_loss: float | None = None) -> dict[str, Estimate]:
    """The estimators ``[estimators] wanted`` asks for, from the run's streams or its store.
    The LLC is that of the sampled loss: the chain's minibatch losses against ``train_loss``
    (``L_n(w*)`` on the training set, :func:`suscept.llc_from_trace`)."""
    wanted, out = cfg["estimators"]["wanted"], {}
    if not run.valid_chains:
        raise SusceptError("every chain diverged: nothing to estimate (lower step_size)")
    losses = run.moments_of("loss")
    if "llc" in wanted:
        out["llc"] = (llc_from_trace(run, train_loss) if train_loss is not None
                      else llc(losses, run.anchor_values["loss"], run.config["n_beta"]))
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
EXPECTED = (SusceptError, OSError, UnicodeError, tomllib.TOMLDecodeError, MemoryError,
            torch.cuda.OutOfMemoryError)


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
    elif isinstance(e, MemoryError | torch.cuda.OutOfMemoryError):
        text = "out of memory; lower n_probe, the components, or n_chains"
    else:
        text = f"{type(e).__name__}: {e}"
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
