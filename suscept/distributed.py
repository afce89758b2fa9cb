"""Chains across processes on ``torch.distributed``: each rank samples its share of the chains
and every rank gets the merged :class:`~suscept.run.Run`, equal to a one-process run.

Launch any script that calls :func:`sample` with ``torchrun``::

    torchrun --nproc_per_node 2 my_script.py          # or: torchrun ... -m suscept run cfg.toml

:func:`init` starts the process group from torchrun's environment (``gloo`` on CPU, ``nccl``
when the model is on a GPU). Rank ``r`` of ``W`` runs the contiguous share of chains
:func:`chains_of` gives it. Chain ``c``'s noise and minibatches come from generators seeded by
``(seed, c)`` only (:func:`suscept.sample.chain_generators`), so the split does not change a
single draw. Merging is exact: every per-chain quantity (draws, traces, and each float64
moment field of every ``(chain, segment)``) is placed in a ``[chain, ...]`` (or
``[chain * blocks, ...]``) tensor that is zero on the rows other ranks own and summed with
``all_reduce`` (adding zeros is exact), then the segments of the chains that did not diverge
are concatenated in chain order, exactly as :func:`suscept.sample` orders them in one process.
Estimates computed from the merged run are therefore those of the one-process run.
"""

from __future__ import annotations

import os
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
from torch import Tensor

from suscept.estimators import default_blocks
from suscept.moments import Moments
from suscept.run import Divergence, Run
from suscept.sample import sample as sample_one


def is_active() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init(backend: str | None = None) -> bool:
    """Start the process group from torchrun's environment (``WORLD_SIZE``, ``RANK``...).

    Returns True when running distributed. ``backend`` defaults to ``nccl`` if CUDA is
    available and ``gloo`` otherwise. Does nothing outside torchrun or when already started.
    """
    if dist.is_available() and dist.is_initialized():
        return is_active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return is_active()


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def chains_of(rank: int, world: int, n_chains: int) -> list[int]:
    """The contiguous block of chains rank ``rank`` of ``world`` runs (sizes differ by <= 1)."""
    return [int(c) for c in torch.tensor_split(torch.arange(n_chains), world)[rank]]


def sample(model, loss_fn, data, config, *, store=None, **kwargs) -> Run:
    """:func:`suscept.sample` with the chains split over the ranks of the process group.

    Same arguments and result as :func:`suscept.sample` (every rank gets the whole merged
    Run); without an active process group it simply calls it. With a ``store``
    (:class:`suscept.store.DrawStore`), rank 0 creates the arrays and each rank writes and
    resumes only its own chains.
    """
    if not is_active():
        return sample_one(model, loss_fn, data, config, store=store, **kwargs)
    if "chains" in kwargs:
        raise TypeError("distributed.sample splits the chains itself; do not pass chains=")
    mine = chains_of(dist.get_rank(), dist.get_world_size(), config.n_chains)
    if store is not None:
        store.rank, store.barrier = dist.get_rank(), dist.barrier
    run = sample_one(model, loss_fn, data, config, chains=mine, store=store, **kwargs)
    return merge(run, mine)


def merge(run: Run, mine: list[int]) -> Run:
    """Combine the partial runs of all ranks (each ran chains ``mine``) into the full Run."""
    world = dist.get_world_size()
    owners: list = [None] * world
    dist.all_gather_object(owners, (mine, [asdict(d) for d in run.divergences],
                                    _moment_spec(run), run.wall_s))
    n_chains = run.config["n_chains"]
    owned = sorted(c for o in owners for c in o[0])
    if owned != list(range(n_chains)):
        raise RuntimeError(f"ranks ran chains {owned}; every chain must run exactly once")
    divergences = sorted((Divergence(**d) for o in owners for d in o[1]),
                         key=lambda d: d.chain)
    bad = {d.chain for d in divergences}
    own = torch.zeros(n_chains, dtype=torch.bool)
    own[mine] = True
    rows = lambda t: _sum_rows(t, own)  # noqa: E731
    blocks = run.config["n_blocks"] or default_blocks(n_chains, run.config["n_draws"])
    spec = next((o[2] for o in owners if o[2]), {})
    moments = {key: _merge_moments(run.moments.get(key), kind, fields_, mine, bad, n_chains,
                                   blocks) for key, (kind, fields_) in spec.items()}
    return Run(config=run.config, n=run.n, shapes=run.shapes, anchor_values=run.anchor_values,
               draws={k: rows(v) for k, v in run.draws.items()}, moments=moments,
               loss_trace=rows(run.loss_trace), probe_loss=rows(run.probe_loss),
               distance=rows(run.distance), divergences=divergences,
               wall_s=max(o[3] for o in owners))


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _sum_rows(t: Tensor, own: Tensor) -> Tensor:
    """``t`` with each rank's own rows (first axis) taken from that rank: zero elsewhere, sum."""
    keep = own.reshape(-1, *([1] * (t.ndim - 1))).to(t.device)
    buf = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device)).to(_device())
    dist.all_reduce(buf)
    return buf.to(t.device)


def _moment_spec(run: Run) -> dict:
    """key -> ("list" | "one", per item {field: trailing shape or None}) of streamed moments."""
    def one(m: Moments) -> dict:
        return {f.name: None if getattr(m, f.name) is None else
                (tuple(getattr(m, f.name).shape[1:]), str(getattr(m, f.name).dtype))
                for f in fields(Moments)}

    return {k: ("list", [one(m) for m in v]) if isinstance(v, list) else ("one", [one(v)])
            for k, v in run.moments.items()}


def _merge_moments(local, kind: str, specs: list[dict], mine: list[int], bad: set[int],
                   n_chains: int, blocks: int):
    items = local if isinstance(local, list) else [local] * (local is not None)
    valid_mine = [c for c in mine if c not in bad]
    rows = torch.tensor([c * blocks + b for c in valid_mine for b in range(blocks)],
                        dtype=torch.long)
    keep = torch.tensor([c * blocks + b for c in range(n_chains) if c not in bad
                         for b in range(blocks)], dtype=torch.long)
    merged = []
    for i, spec in enumerate(specs):
        kw = {}
        for name, s in spec.items():
            if s is None:
                kw[name] = None
                continue
            shape, dtype = s
            full = torch.zeros(n_chains * blocks, *shape, dtype=getattr(torch, dtype[6:]))
            if items:
                full[rows] = getattr(items[i], name).cpu()
            buf = full.to(_device())
            dist.all_reduce(buf)
            kw[name] = buf.cpu()[keep]
        merged.append(Moments(**kw))
    return merged if kind == "list" else merged[0]
