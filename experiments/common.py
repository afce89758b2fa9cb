"""Shared pieces of the experiment scripts: results folders, AUROC, plots."""

from __future__ import annotations

import contextlib
import json
import platform
import time
from pathlib import Path

import torch
from torch import Tensor


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean labels ``positive``.

    Rank-based (Mann-Whitney), ties counted half: the probability that a random positive
    scores above a random negative.
    """
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    ranks = average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_ranks(x: Tensor) -> Tensor:
    """Ranks ``1..n`` of the 1-d ``x``, ties given their average rank."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    if len(values) < len(x):  # average the ranks of ties
        sums = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def results_dir(name: str, root: str | Path = "results") -> Path:
    out = Path(root) / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(_plain(data), indent=2))


def write_results(out: Path, figures: dict, report_md: str) -> None:
    """``figures.json`` and ``report.md`` into an experiment's results folder."""
    write_json(out / "figures.json", figures)
    (out / "report.md").write_text(report_md)
    print(f"wrote {out}")


def _plain(x):
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for pkg in ("torch", "transformer-lens", "suscept"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


@contextlib.contextmanager
def torch_threads(n: int):
    """While active, torch uses ``n`` threads (1 is fastest on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
