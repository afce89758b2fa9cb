"""``sample``: localized SGLD chains around a checkpoint, observables evaluated at each draw.

Which weights each recorded quantity is taken at (steps counted from ``w_0 = w*``):

- ``run.loss_trace[c, k]``: the minibatch mean loss at ``w_k``, the weights the gradient of
  update ``k -> k+1`` is taken at (recorded *before* that update).
- draw ``d``: every observable at ``w_{burn_in + (d+1) * thin}``, i.e. *after* that update,
  in eval mode (no dropout), without gradients. ``run.anchor_values`` are the same
  observables at ``w*``.

The user's module is deep-copied; the original is never written to, keeps its train/eval
mode and gains no hooks, whether the call returns or raises. Randomness comes only from
per-chain generators derived from ``(config.seed, chain)``; the global RNG is untouched, and
the same seed gives bitwise identical draws.

Chain ``c`` depends only on ``(seed, c)``, so ``chains=`` runs any subset of the chains with
the draws a full run would give them (:mod:`suscept.distributed` splits chains over processes
this way). With ``store=`` (:mod:`suscept.store`) each finished block of draws is committed
to disk with a checkpoint of its chain (weights, preconditioner, generator states, minibatch
position, traces, block moments), and chains the store already holds continue from their
last checkpoint: an interrupted run resumes to the draws and moments of an uninterrupted one.

No step reads a value back from the device (on a GPU, no host-device synchronisation per
step): the steps' losses stay on the device and are read and checked once per draw, with the
draw's own numbers, in one transfer (:mod:`suscept.window`). A chain whose loss diverges at a
step inside a draw's steps is recorded exactly as if it had stopped at that step.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from suscept import data as batches
from suscept.errors import ConfigError, DivergenceWarning, MemoryWarning, ShapeError
from suscept.estimators import default_blocks
from suscept.model import FlatModule, build_mask, private_copy
from suscept.moments import Moments
from suscept.run import Divergence, Run, _as_dict
from suscept.sgld import SGLDHyper, build
from suscept.streams import Cross, Marginal, Stream, as_stream, memory_bytes, physical_memory
from suscept.window import BURN_IN_WINDOW, Minibatches, caller_level, summary

LossFn = Callable[[nn.Module, "batches.Batch"], Tensor]
Observable = Callable[[nn.Module], Tensor]
ObservableSet = Callable[[nn.Module], Mapping[str, Tensor]]


@dataclass(frozen=True)
class SamplerConfig(SGLDHyper):
    """SGLD hyperparameters (see :class:`suscept.sgld.SGLDHyper`) plus the run's layout.

    Attributes:
        n_chains: independent chains, all started at w*.
        n_draws: draws per chain.
        burn_in: SGLD steps before the first draw window.
        thin: SGLD steps between draws (evaluate observables every ``thin`` steps).
        batch_size: minibatch size; ``None`` = full batch. Minibatches are drawn without
            replacement within an epoch (one shuffle per epoch, consecutive slices).
        seed: chain ``c`` draws its noise and minibatches from generators seeded by
            ``(seed, c)`` only.
        n_blocks: blocks per chain for streamed moments and standard errors (default: about
            20 segments in all).
        max_loss_rise: a chain is stopped when its minibatch loss becomes NaN/inf or moves
            more than this away from ``L0``, the loss of its first minibatch (taken at w*);
            default ``1000 * (1 + |L0|)``.
    """

    n_chains: int = 4
    n_draws: int = 100
    burn_in: int = 0
    thin: int = 1
    batch_size: int | None = None
    seed: int = 0
    n_blocks: int | None = None
    max_loss_rise: float | None = None

    def validate(self) -> None:
        """Every field of the right type and range; a ConfigError naming the first bad one."""
        for name in ("step_size", "n_beta", "gamma", "weight_decay", "rmsprop_alpha",
                     "rmsprop_delta", "max_loss_rise"):
            v = getattr(self, name)
            if v is None and name == "max_loss_rise":
                continue
            if not _is_real(v) or not math.isfinite(v):
                raise ConfigError(f"{name}={v!r} is invalid: it must be a finite number")
        for name, low in (("n_chains", 1), ("n_draws", 1), ("thin", 1), ("burn_in", 0),
                          ("seed", 0), ("batch_size", 1), ("n_blocks", 1)):
            v = getattr(self, name)
            if v is None and name in ("batch_size", "n_blocks"):
                continue
            if not _is_int(v) or v < low:
                raise ConfigError(f"{name}={v!r} is invalid: it must be an integer >= {low}"
                                  + (" (or None for the default)" if low and name in
                                     ("batch_size", "n_blocks") else ""))
        if self.precondition is not None and not isinstance(self.precondition, str):
            raise ConfigError(f"precondition={self.precondition!r} must be None or 'rmsprop'")
        super().validate()
        if self.n_blocks is not None and self.n_blocks > self.n_draws:
            raise ConfigError(f"n_blocks={self.n_blocks!r} must be in [1, n_draws]")
        if self.max_loss_rise is not None and not self.max_loss_rise > 0:
            raise ConfigError(f"max_loss_rise={self.max_loss_rise!r} is invalid: it must be a "
                              "finite number > 0 (None: 1000 (1 + |L0|))")
        if self.step_size * max(self.n_beta, self.gamma, 1.0) > 1e30:
            raise ConfigError(f"step_size={self.step_size!r} is invalid: step_size times n_beta "
                              "or gamma overflows (try 1e-4)")

    @property
    def n_steps(self) -> int:
        return self.burn_in + self.n_draws * self.thin


def _is_real(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def chain_generators(seed: int, chain: int, device: torch.device) -> tuple[torch.Generator, ...]:
    """(noise, minibatch) generators of one chain, a function of ``(seed, chain)`` only."""
    s_noise, s_data = np.random.SeedSequence([seed, chain]).generate_state(2)
    noise = torch.Generator(device=device).manual_seed(int(s_noise))
    data = torch.Generator().manual_seed(int(s_data))
    return noise, data


def sample(
    model: nn.Module,
    loss_fn: LossFn,
    data: batches.Batch,
    config: SamplerConfig,
    *,
    probe: batches.Batch | None = None,
    observables: Mapping[str, Observable] | ObservableSet | None = None,
    anchor: Mapping[str, Tensor] | None = None,
    mask: Mapping[str, bool | Tensor] | None = None,
    stream: Sequence[tuple[str, str] | Stream] | None = None,
    third_order: bool = False,
    store_draws: bool | Sequence[str] = True,
    chains: Sequence[int] | None = None,
    store: Recorder | None = None,
    progress: bool = True,
    batched: bool | object = False,
) -> Run:
    """Run ``config.n_chains`` localized SGLD chains and evaluate observables at each draw.

    Args:
        model: any ``torch.nn.Module``; its trainable parameters are sampled (never modified).
        loss_fn: ``loss_fn(model, batch) -> Tensor[batch]`` of per-sample losses.
        data: training set (tensor, tuple/list or dict of tensors; dim 0 = samples), size n.
        config: :class:`SamplerConfig`.
        probe: fixed batch like ``data``; its per-sample losses are the observable ``"loss"``.
        observables: extra named observables ``{name: f(model) -> Tensor}`` (any fixed
            shape), or one callable ``f(model) -> {name: Tensor}`` that evaluates a whole set
            at once (e.g. an evaluation plan of component-restricted losses).
        anchor: w* as ``{parameter name: tensor}``; default the model's current weights.
        mask: restricted run: ``{name pattern: True | 0/1 tensor}``; unmatched params frozen.
        stream: what to accumulate while sampling (:mod:`suscept.streams`): pairs ``(x, y)``
            of observable names (moments of x against y, third-order slices if
            ``third_order``), or :class:`~suscept.streams.Cross` / ``Marginal`` /
            ``Paired`` objects; default ``[Marginal("loss")]`` when a probe is given:
            means and variances of the probe losses only, O(n) memory (enough for ``llc``);
            pass ``[("loss", "loss")]`` for the n x n loss kernel and BIF.
        third_order: also stream the two third-order slices of every ``(x, y)`` pair
            (``kx * ky`` each per segment; needed by ``variance_response``,
            ``influence_expansion``, ``third_cumulant`` on Moments).
        store_draws: keep every draw as ``run.draws[name]`` ``[chain, draw, *shape]``: all
            observables (True), none (False) or the names listed.
        chains: run only these chains (default all ``range(n_chains)``); the others stay NaN
            and give no moments. Chain ``c``'s draws do not depend on which others run, so
            :func:`suscept.distributed.sample` splits chains over processes with this.
        store: a :class:`suscept.store.DrawStore` (or any :class:`Recorder`): every finished
            block of draws is written to it with a checkpoint of the chain, and chains it
            already holds are continued from their last checkpoint (resume), giving the
            same draws and moments as an uninterrupted run.
        progress: one tqdm bar per chain.
        batched: advance all chains in lockstep with one vectorized forward/backward per
            step (:mod:`suscept.batched`; True or a :class:`suscept.batched.Batched`).
    Returns:
        A :class:`~suscept.run.Run`.
    """
    if not isinstance(config, SamplerConfig):
        raise ConfigError("config must be a suscept.SamplerConfig")
    config.validate()
    n, observables = check_inputs(loss_fn, data, probe, observables)
    if stream is None:  # O(n): the n x n kernel and third order only when asked for
        stream = [Marginal("loss")] if probe is not None else []
    streams = [Cross(s.x, s.y, third=third_order) if isinstance(spec, tuple) else s
               for spec, s in ((spec, as_stream(spec)) for spec in stream)]
    t0 = time.perf_counter()
    fm = private_copy(model)
    anchor_flat = fm.params.clone() if anchor is None else fm.flatten(anchor, "anchor")
    fm.params.copy_(anchor_flat)
    _check_mask(mask)
    mask_flat = None if mask is None else build_mask(fm, mask)
    if mask_flat is not None:  # frozen parameters need no gradient: skip them in backward
        params = dict(fm.module.named_parameters())
        for name, sl in fm.slices().items():
            if not bool(mask_flat[sl].any()):
                params[name].requires_grad_(False)
    evaluate = _evaluator(loss_fn, probe, observables)
    anchor_values = {k: v.detach().cpu() for k, v in evaluate(fm.module, check=True).items()}
    shapes = {k: tuple(v.shape) for k, v in anchor_values.items()}
    for s in streams:
        s.check(shapes)
    _warn_memory(config, streams, shapes, store_draws)
    chains = _check_chains(chains, config.n_chains)
    args = (fm, loss_fn, data, n, config, anchor_flat, mask_flat, evaluate, anchor_values,
            streams, store_draws, chains, store)
    if batched:
        from suscept.batched import as_options, make_sampler
        sampler = make_sampler(as_options(batched), *args)
    else:
        sampler = _Sampler(*args)
    sampler.check_batch_loss()
    try:
        if store is not None:
            store.prepare(asdict(config), shapes, anchor_values, sampler.bounds)
        sampler.run_all(progress)
    finally:  # a store's writer lock is released when sampling ends, also on error
        if store is not None and hasattr(store, "close"):
            store.close()
    run = sampler.result(anchor_values, time.perf_counter() - t0)
    # which observable is the loss the chain samples (for suscept.llc): the probe's, when
    # the probe is the training set itself
    run.config["sampled_loss"] = "loss" if probe is not None and _same(probe, data) else None
    return run


def _same(a: batches.Batch, b: batches.Batch) -> bool:
    la, lb = batches.leaves(a), batches.leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and torch.equal(x, y)
                                      for x, y in zip(la, lb))


def _warn_memory(config: SamplerConfig, streams: list, shapes: dict, store_draws) -> None:
    """A MemoryWarning when the streamed moments and in-memory draws are predicted
    (:func:`suscept.streams.memory_bytes`) to need more than half the physical memory."""
    segs = config.n_chains * (config.n_blocks or default_blocks(config.n_chains,
                                                                 config.n_draws))
    kept = list(shapes) if store_draws is True else list(store_draws or [])
    stored = {k: config.n_chains * config.n_draws * math.prod(shapes[k])
              for k in kept if k in shapes}
    items = memory_bytes(streams, shapes, segs, stored)
    need, have = sum(items.values()), physical_memory()
    if need > 0.5 * have:
        top = max(items, key=items.get)
        warnings.warn(f"this run is predicted to need {need / 2**30:.3g} GB of memory ({top!r}: "
                      f"{items[top] / 2**30:.3g} GB) of {have / 2**30:.3g} GB: stream fewer "
                      "observables, store_draws=False, or fewer blocks", MemoryWarning,
                      stacklevel=3)


def _check_mask(mask) -> None:
    if not isinstance(mask, Mapping):
        return  # None, or refused with its own message by build_mask
    for pattern, value in mask.items():
        ok = isinstance(value, bool | Tensor | np.ndarray) or (
            isinstance(value, list | tuple) and bool(value)
            and all(isinstance(v, bool | int | float) for v in np.ravel(value)))
        if not ok:
            raise ConfigError(f"mask[{pattern!r}] = {value!r} must be True/False or a 0/1 tensor "
                              "of the parameter's shape")


def _check_chains(chains: Sequence[int] | None, n_chains: int) -> list[int]:
    if chains is None:
        return list(range(n_chains))
    out = sorted(chains)
    if len(set(out)) != len(out) or any(not isinstance(c, int) or not 0 <= c < n_chains
                                        for c in out):
        raise ConfigError(f"chains={list(chains)} must be distinct integers in [0, {n_chains})")
    return out


class Recorder(Protocol):
    """Where :func:`sample` records finished blocks of draws (see :mod:`suscept.store`).

    ``prepare`` is called once with the sampler config, the observables' shapes, their anchor
    values and the block lengths; ``restore(chain)`` returns the chain's last checkpoint (or
    None); ``read(name, chain, k)`` its first ``k`` recorded draws ``[k, *shape]``;
    ``commit(chain, start, values, checkpoint)`` records draws ``start .. start + L - 1``
    (``values[name]`` is ``[L, *shape]``, None when there are none) and then the checkpoint.
    """

    def prepare(self, config: dict, shapes: dict, anchor_values: dict, bounds: list) -> None: ...

    def restore(self, chain: int) -> dict | None: ...

    def read(self, name: str, chain: int, k: int) -> Tensor: ...

    def commit(self, chain: int, start: int, values: dict | None, checkpoint: dict) -> None: ...


def check_inputs(loss_fn, data, probe, observables):
    """``(n, observables)``: the number of training samples and the observables as a dict or
    callable, after the checks every sampler (SGLD, spring-only) shares."""
    if not callable(loss_fn):
        raise ConfigError("loss_fn must be callable: loss_fn(model, batch) -> per-sample losses")
    n = batches.n_samples(data, "data")
    if observables is None:
        observables = {}
    elif not callable(observables):
        observables = dict(observables)
    if probe is not None:
        batches.check_like(probe, data)
    if not observables and probe is None:
        raise ConfigError("nothing to record: pass a probe batch and/or observables")
    return n, observables


def _evaluator(loss_fn, probe, observables):
    def evaluate(module: nn.Module, check: bool = False) -> dict[str, Tensor]:
        out = {}
        with torch.no_grad():
            if probe is not None:
                losses = loss_fn(module, probe)
                if check:
                    _check_losses(losses, batches.n_samples(probe), "probe")
                out["loss"] = _as_record("loss", losses)
            if callable(observables):
                named = observables(module)
                if not isinstance(named, Mapping):
                    raise ConfigError("an observable set must return a dict {name: tensor}; "
                                      f"got {type(named).__name__}")
            else:
                named = {name: f(module) for name, f in observables.items()}
            for name, v in named.items():
                if name in out:
                    raise ConfigError("the observable name 'loss' is reserved for the probe's "
                                      "per-sample losses")
                out[name] = _as_record(name, v)
        return out

    evaluate.probe = probe  # read by suscept.batched (one vmapped probe forward)
    return evaluate


def _as_record(name: str, v: object) -> Tensor:
    """An observable's value as recorded: a real tensor of float32 or wider (float16 and
    bfloat16 are widened, integers and booleans converted), never aliasing the parameters."""
    if not isinstance(v, Tensor):
        raise ConfigError(f"observable {name!r} must return a tensor; got {type(v).__name__}")
    if v.dtype.is_complex:
        raise ConfigError(f"observable {name!r} returned a complex tensor; return a real one "
                          "(e.g. .abs() or .real)")
    if not v.dtype.is_floating_point or v.dtype.itemsize < 4:
        return v.detach().float()
    return v.detach().clone()


def _check_losses(losses: object, m: int, what: str, grad: bool = False) -> None:
    """Per-sample losses ``[m]``, real floating point (and, for ``grad``, differentiable)."""
    if not isinstance(losses, Tensor) or losses.shape != (m,):
        shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ShapeError(f"loss_fn must return per-sample losses of shape [{m}] for a {what} "
                         f"batch of {m} samples; got {shape} (do not reduce with mean())")
    if not losses.dtype.is_floating_point:
        raise ConfigError(f"loss_fn must return floating-point losses; got dtype {losses.dtype} "
                          "(a complex or integer loss cannot be sampled from)")
    if grad and not losses.requires_grad:
        raise ConfigError("loss_fn returned losses that do not depend on the parameters "
                          "(detached or computed without gradients): SGLD needs their gradient")


class _Chain:
    """The mutable state of one chain: enough to continue it exactly after a checkpoint."""

    def __init__(self, chain: int, state, noise: torch.Generator, batches: Minibatches):
        self.chain, self.state, self.noise, self.batches = chain, state, noise, batches
        self.step, self.block, self.draw = 0, 0, 0  # next step, next block, draws taken
        self.loss0: float | None = None
        self.limit: float | None = None
        self.buf: list[dict[str, Tensor]] = []  # draws of the unfinished block
        self.parts: dict[str, list] = {}  # stream key -> one result per finished block
        self.done = False


class _Sampler:
    """The chain loop; one instance per ``sample`` call."""

    def __init__(self, fm: FlatModule, loss_fn, data, n, config: SamplerConfig, anchor_flat,
                 mask_flat, evaluate, anchor_values, streams, store_draws, chains, recorder):
        self.fm, self.loss_fn, self.data, self.n, self.cfg = fm, loss_fn, data, n, config
        self.anchor, self.mask, self.evaluate = anchor_flat, mask_flat, evaluate
        shapes = {k: tuple(v.shape) for k, v in anchor_values.items()}
        # every draw of an observable is recorded in its dtype at w* (float32 or wider): a
        # value that does not fit becomes inf there, and a divergence, never a silent inf
        self.dtypes = {k: v.dtype for k, v in anchor_values.items()}
        self.shapes, self.streams = shapes, streams
        self.chains, self.recorder = chains, recorder
        self.init, self.update = build(config, mask_flat)
        self.blocks = config.n_blocks or default_blocks(config.n_chains, config.n_draws)
        self.bounds = [len(b) for b in torch.tensor_split(torch.arange(config.n_draws),
                                                          self.blocks)]
        c, d = config.n_chains, config.n_draws
        nan = float("nan")
        self.trace = torch.full((c, config.n_steps), nan, dtype=torch.float64)
        self.probe_loss = torch.full((c, d), nan, dtype=torch.float64)
        self.distance = torch.full((c, d), nan, dtype=torch.float64)
        stored = list(shapes) if store_draws is True else list(store_draws or [])
        unknown = sorted(set(stored) - set(shapes))
        if unknown:
            raise ConfigError(f"store_draws names unknown observables {unknown}; known: "
                              f"{sorted(shapes)}")
        self.draws = {k: torch.full((c, d, *shapes[k]), nan, dtype=self.dtypes[k])
                      for k in stored}
        self.parts: dict[str, list] = {s.key: [] for s in streams}  # (chain, segment result)
        self.divergences: list[Divergence] = []
        self.batch_size = config.batch_size if config.batch_size and config.batch_size < n \
            else None
        self.data_device = batches.leaves(data)[0].device
        # the minibatch losses of one window of steps (see _window), on the device
        window = max(config.thin, min(config.burn_in, BURN_IN_WINDOW))
        self.losses = torch.empty(window, dtype=torch.float64, device=fm.params.device)
        self.saved: list | None = None  # the weights at a window's start (with a recorder)

    def check_batch_loss(self) -> None:
        m = self.batch_size or self.n
        batch = self.data if self.batch_size is None else batches.index(self.data,
                                                                         torch.arange(m))
        _check_losses(self.loss_fn(self.fm.module, batch), m, "training", grad=True)

    def run_all(self, progress: bool) -> None:
        for chain in self.chains:  # one progress bar per chain
            with tqdm(total=self.cfg.n_steps, disable=not progress, desc=f"chain {chain}",
                      unit="step") as bar:
                ch = self._start(chain)
                bar.update(ch.step)
                if not ch.done:
                    self.run_chain(ch, bar)
            for key, results in ch.parts.items():
                self.parts[key] += [(chain, r) for r in results]

    def _start(self, chain: int) -> _Chain:
        """A fresh chain at w*, or the chain restored from the recorder's last checkpoint."""
        noise_gen, data_gen = chain_generators(self.cfg.seed, chain, self.fm.params.device)
        ch = _Chain(chain, None, noise_gen, Minibatches(self.n, self.batch_size, data_gen,
                                                         self.data_device))
        ch.parts = {s.key: [] for s in self.streams}
        saved = self.recorder.restore(chain) if self.recorder is not None else None
        self.fm.params.copy_(self.anchor if saved is None else saved["params"])
        ch.state = self.init(self.fm.params)
        if saved is not None:
            _restore(self, ch, saved, data_gen)
        return ch

    def run_chain(self, ch: _Chain, bar) -> None:
        """Advance chain ``ch`` window by window (see :meth:`_window`) to its last step."""
        self.batches = ch.batches
        first = ch.step
        while first < self.cfg.n_steps and not ch.done:
            last = self._window_last(first)
            self._window(ch, first, last, bar)
            first = last + 1
        ch.done = True

    def _window_last(self, first: int) -> int:
        """The last step of the window starting at ``first``: the step that ends its draw
        (``burn_in + k * thin - 1``), or during burn-in at most ``BURN_IN_WINDOW`` steps on."""
        cfg = self.cfg
        if first < cfg.burn_in:
            return min(first + BURN_IN_WINDOW, cfg.burn_in) - 1
        return first + cfg.thin - 1 - (first - cfg.burn_in) % cfg.thin

    def _window(self, ch: _Chain, first: int, last: int, bar) -> None:
        """Steps ``first .. last`` of chain ``ch``, then the draw that ``last`` ends, if any.

        Nothing in the steps reads a device tensor on the host: each step's minibatch mean
        loss goes to a device buffer. One read at the end (``summary``: the window's losses,
        the draw's finiteness flags, probe loss and ``||w - w*||``) checks them. A loss that
        diverged at step ``k`` is recorded as if the chain had stopped there: trace up to
        ``k``, ``Divergence(chain, k)``, and (with a recorder) the checkpoint of ``w_k``, got
        by replaying ``first .. k - 1`` from the window's snapshot; the steps after ``k``
        computed in between are discarded."""
        cfg, fm = self.cfg, self.fm
        snap = self._snapshot(ch)
        losses, taken = self.losses, 0
        try:
            for _ in range(first, last + 1):
                losses[taken] = self._loss_and_grad()
                taken += 1
                ch.state = self.update(ch.state, fm.grad, self.anchor, ch.noise)
                bar.update(1)
            values = self._evaluate() if last >= cfg.burn_in else None
            numbers = summary(losses[:taken], values, fm.params, self.anchor).tolist()
        except Exception:  # raised after a divergence in the window: report the divergence
            if not self._stopped(ch, first, losses[:taken].tolist(), snap):
                raise
            return
        if self._stopped(ch, first, numbers[:taken], snap):
            return
        tick = first + (-first) % 50  # the progress bar shows the loss every 50 steps
        if tick <= last:
            bar.set_postfix(loss=f"{numbers[tick - first]:.4f}")
        if values is not None:
            self._take(ch, last, values, numbers[taken:])

    def _evaluate(self) -> dict[str, Tensor]:
        values = {k: v.to(self.dtypes.get(k, v.dtype))
                  for k, v in self.evaluate(self.fm.module).items()}
        changed = {k: tuple(v.shape) for k, v in values.items()
                   if tuple(v.shape) != self.shapes.get(k)}
        if changed or len(values) != len(self.shapes):
            raise ShapeError(f"observables changed shape (or set) during the run: "
                             f"{changed or sorted(values)} vs {self.shapes} at w*; an "
                             "observable must return the same shape at every draw")
        return values

    def _take(self, ch: _Chain, step: int, values: dict[str, Tensor], numbers: list) -> None:
        """Record the draw ending at ``step`` from its summary numbers (finiteness flags, probe
        loss, distance), or stop the chain if an observable is not finite."""
        bad = [k for k, flag in zip(values, numbers) if not flag]
        if bad:
            return self._diverge(ch, step, f"non-finite observables {bad}")
        probe = numbers[len(values)] if len(numbers) > len(values) + 1 else None
        self._record(ch.chain, (step + 1 - self.cfg.burn_in) // self.cfg.thin - 1, values,
                     probe, numbers[-1])
        ch.buf.append(values)
        if len(ch.buf) == self.bounds[ch.block]:
            self._flush(ch, step + 1)

    def _first_bad(self, ch: _Chain, first: int, losses: list[float]) -> tuple | None:
        """Trace the losses of steps ``first, first + 1, ...`` up to the first that diverges
        (NaN/inf, or more than the limit away from ``L0``, the chain's first loss):
        ``(step, reason)`` of that one, or None."""
        cfg = self.cfg
        for step, loss in enumerate(losses, start=first):
            if ch.loss0 is None:
                ch.loss0 = loss
                ch.limit = cfg.max_loss_rise if cfg.max_loss_rise is not None \
                    else 1000.0 * (1.0 + abs(loss))
            self.trace[ch.chain, step] = loss
            if not math.isfinite(loss) or abs(loss - ch.loss0) > ch.limit:
                return step, f"minibatch loss {loss:.4g} (at w*: {ch.loss0:.4g})"
        return None

    def _stopped(self, ch: _Chain, first: int, losses: list[float], snap) -> bool:
        """Check the window's losses; if one diverged, stop the chain at its step (in the
        state it had there, when recording): True."""
        bad = self._first_bad(ch, first, losses)
        if bad is None:
            return False
        if snap is not None:
            self._rewind(ch, snap, first, bad[0])
        self._diverge(ch, *bad)
        return True

    def _snapshot(self, ch: _Chain) -> tuple | None:
        """What a recorder's checkpoint of a chain stopped inside this window needs: the state
        at the window's start (weights and preconditioner into reused buffers). Without a
        recorder a stopped chain's state is never read: None."""
        if self.recorder is None:
            return None
        if self.saved is None:
            self.saved = [torch.empty_like(ch.state.params),
                          None if ch.state.sq_avg is None else torch.empty_like(ch.state.sq_avg)]
        self.saved[0].copy_(ch.state.params)
        if ch.state.sq_avg is not None:
            self.saved[1].copy_(ch.state.sq_avg)
        return ch.state.step, ch.noise.get_state(), ch.batches.state()

    def _rewind(self, ch: _Chain, snap: tuple, first: int, step: int) -> None:
        """Put chain ``ch`` in the state it had when step ``step``'s loss was read: back to the
        window's start, steps ``first .. step - 1`` again, then step ``step``'s minibatch."""
        sgld_step, noise, data = snap
        ch.state.params.copy_(self.saved[0])
        if ch.state.sq_avg is not None:
            ch.state.sq_avg.copy_(self.saved[1])
        ch.state = ch.state._replace(step=sgld_step)
        ch.noise.set_state(noise)
        ch.batches.set_state(data)
        for _ in range(first, step):
            self._loss_and_grad()
            ch.state = self.update(ch.state, self.fm.grad, self.anchor, ch.noise)
        if self.batch_size is not None:
            ch.batches.next()

    def _loss_and_grad(self) -> Tensor:
        """The minibatch mean loss (detached, on the device; not read) and its gradient in
        ``fm.grad``."""
        fm = self.fm
        batch = self.data if self.batch_size is None else batches.index(self.data,
                                                                         self.batches.next())
        fm.grad.zero_()
        loss = self.loss_fn(fm.module, batch).mean()
        loss.backward()
        return loss.detach()

    def _record(self, chain: int, draw: int, values: dict[str, Tensor], probe_loss: float | None,
                distance: float) -> None:
        if probe_loss is not None:
            self.probe_loss[chain, draw] = probe_loss
        self.distance[chain, draw] = distance
        for k, store in self.draws.items():
            store[chain, draw] = values[k].detach().cpu().to(store.dtype)

    def _flush(self, ch: _Chain, next_step: int) -> None:
        """Close a block: stream its moments, then commit it (draws + checkpoint) if recording."""
        stacked = {k: torch.stack([b[k] for b in ch.buf]) for k in ch.buf[0]}
        for s in self.streams:
            ch.parts[s.key].append(s.block(stacked))
        start = ch.draw
        ch.draw, ch.block, ch.buf, ch.step = ch.draw + len(ch.buf), ch.block + 1, [], next_step
        ch.done = ch.draw == self.cfg.n_draws
        if self.recorder is not None:
            self.recorder.commit(ch.chain, start, stacked, _checkpoint(self, ch))

    def _diverge(self, ch: _Chain, step: int, reason: str) -> None:
        chain = ch.chain
        self.divergences.append(Divergence(chain, step, reason))
        warnings.warn(f"chain {chain} diverged at step {step} ({reason}); it is stopped and "
                      "excluded from every estimate. Lower step_size or raise gamma.",
                      DivergenceWarning, stacklevel=caller_level())
        self.trace[chain, step + 1:] = float("nan")  # draws not yet taken stay NaN
        ch.done = True
        if self.recorder is not None:  # record the partial block too, and that it diverged
            stacked = {k: torch.stack([b[k] for b in ch.buf]) for k in ch.buf[0]} \
                if ch.buf else None
            start = ch.draw
            ch.draw, ch.buf, ch.step = ch.draw + len(ch.buf), [], step + 1
            self.recorder.commit(chain, start, stacked, _checkpoint(self, ch))

    def result(self, anchor_values: dict[str, Tensor], wall_s: float) -> Run:
        bad = {d.chain for d in self.divergences}
        moments = {}
        for s in self.streams:
            kept = [m for c, m in self.parts[s.key] if c not in bad]
            if kept:
                moments[s.key] = s.combine(kept)
        return Run(config=asdict(self.cfg), n=self.n, shapes=self.shapes,
                   anchor_values=anchor_values, draws=self.draws, moments=moments,
                   loss_trace=self.trace, probe_loss=self.probe_loss, distance=self.distance,
                   divergences=self.divergences, wall_s=wall_s)


def _checkpoint(sampler: _Sampler, ch: _Chain) -> dict:
    """Everything that continues chain ``ch`` bitwise: weights, preconditioner, generator
    states, the minibatch position, the loss limit, its traces and its blocks' moments.
    Plain tensors, numbers and dicts only (loadable with ``torch.load(weights_only=True)``)."""
    c = ch.chain
    div = [asdict(d) for d in sampler.divergences if d.chain == c]
    return {
        "chain": c, "step": ch.step, "block": ch.block, "draw": ch.draw, "done": ch.done,
        "sgld_step": ch.state.step, "params": sampler.fm.params.detach().clone(),
        "sq_avg": None if ch.state.sq_avg is None else ch.state.sq_avg.clone(),
        "noise": ch.noise.get_state(), "data": ch.batches.gen.get_state(),
        "perm": ch.batches.perm, "pos": ch.batches.pos, "loss0": ch.loss0, "limit": ch.limit,
        "trace": sampler.trace[c].clone(), "probe_loss": sampler.probe_loss[c].clone(),
        "distance": sampler.distance[c].clone(), "divergence": div[0] if div else None,
        "parts": {k: [_plain_part(r) for r in v] for k, v in ch.parts.items()},
    }


def _restore(sampler: _Sampler, ch: _Chain, saved: dict, data_gen: torch.Generator) -> None:
    c = ch.chain
    if saved["sq_avg"] is not None:
        ch.state.sq_avg.copy_(saved["sq_avg"])
    ch.state = ch.state._replace(step=saved["sgld_step"])
    ch.noise.set_state(saved["noise"])
    data_gen.set_state(saved["data"])
    ch.batches.use(saved["perm"], saved["pos"])
    ch.step, ch.block, ch.draw, ch.done = saved["step"], saved["block"], saved["draw"], \
        saved["done"]
    ch.loss0, ch.limit = saved["loss0"], saved["limit"]
    sampler.trace[c] = saved["trace"]
    sampler.probe_loss[c], sampler.distance[c] = saved["probe_loss"], saved["distance"]
    for name, draws in sampler.draws.items():
        if ch.draw:
            draws[c, :ch.draw] = sampler.recorder.read(name, c, ch.draw).to(draws.dtype)
    ch.parts = {k: [_moments_part(r) for r in saved["parts"][k]] for k in ch.parts}
    if saved["divergence"] is not None:
        d = Divergence(**saved["divergence"])
        sampler.divergences.append(d)
        warnings.warn(f"chain {c} diverged at step {d.step} ({d.reason}) before the resume; it "
                      "stays excluded from every estimate.", DivergenceWarning,
                      stacklevel=caller_level())


def _plain_part(r: Moments | list[Moments]) -> dict | list[dict]:
    return [_as_dict(m) for m in r] if isinstance(r, list) else _as_dict(r)


def _moments_part(r: dict | list[dict]) -> Moments | list[Moments]:
    return [Moments(**m) for m in r] if isinstance(r, list) else Moments(**r)
