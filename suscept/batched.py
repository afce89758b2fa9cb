"""Batched chains: every chain's SGLD step in one vectorized forward/backward.

``sample(..., batched=True)`` (or ``batched=Batched(...)``) runs the same chains as the
sequential sampler, in lockstep: the chains' flat parameters are stacked into ``W [chain, d]``
and one ``torch.func.vmap`` of ``grad_and_value(functional_call(loss_fn))`` gives every
chain's minibatch mean loss and gradient ``G [chain, d]`` at once. Each chain then takes the
SGLD step of :func:`suscept.sgld.build` on its own row with its own noise generator, so chain
``c`` still depends only on ``(seed, c)`` (its noise and minibatch generators are those of
:func:`suscept.sample.chain_generators`): its draws are those of the sequential sampler up to
the rounding of the vectorized kernels (bitwise on CPU in the tests), and the same whichever
other chains run beside it.

Observables: when the only observable is the probe's per-sample loss, every chain's probe
losses come from one vmapped forward as well; other observables (e.g. an evaluation plan with
hooks) are evaluated chain by chain on the model copy, as in the sequential sampler.

With :class:`Batched` ``(directions=V)`` the sampler also records, per draw, the *Stein
features* of :mod:`suscept.control_variates` (zero-mean functions built from the score the
step leaving the draw computes anyway; one extra gradient after the last draw), under the
observable name ``"stein"``.

Resuming from a draw store is not supported in batched mode (``store=`` raises).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from tqdm.auto import tqdm

from suscept import data as batches
from suscept.errors import ConfigError
from suscept.sgld import SGLDState
from suscept.window import summary, to_device

STEIN = "stein"


@dataclass(frozen=True)
class Batched:
    """Options of the batched sampler.

    Attributes:
        directions: optional ``[r, d]`` directions ``v_i`` in flat parameter space (e.g. the
            gradients of the observables at w*); the sampler then records the ``r (r + 3) / 2``
            Stein features of :func:`suscept.control_variates.stein_features` per draw as the
            observable ``"stein"``. Plain SGLD only (no preconditioner, no mask).
        vmap_probe: evaluate the probe losses of all chains in one vmapped forward when the
            probe loss is the only observable.
    """

    directions: Tensor | None = None
    vmap_probe: bool = True


class _Call(nn.Module):
    """``forward(batch) = loss_fn(inner, batch)``, so functional_call can swap inner's params."""

    def __init__(self, inner: nn.Module, loss_fn):
        super().__init__()
        self.inner, self.loss_fn = inner, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.inner, batch)


def _stack(parts: list) -> batches.Batch:
    """Stack per-chain batches (same structure) along a new leading chain dim."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.stack(parts)
    if isinstance(first, dict):
        return {k: torch.stack([p[k] for p in parts]) for k in first}
    return type(first)(torch.stack(t) for t in zip(*parts))


def make_sampler(options, *args):
    """The batched counterpart of ``suscept.sample._Sampler`` (imported lazily by sample)."""
    from suscept.sample import _Sampler

    class BatchedSampler(_Sampler):
        """Lockstep chain loop; reuses the sequential sampler's records, blocks and result."""

        def __init__(self, opts: Batched, fm, loss_fn, data, n, config, anchor, mask, evaluate,
                     anchor_values, streams, store_draws, chains, recorder):
            if recorder is not None:
                raise ConfigError("batched=True cannot record to or resume from a draw store; "
                                  "drop store= or sample without batched")
            self.opts, self.n_features = opts, 0
            if opts.directions is not None:
                self.n_features = _check_directions(opts.directions, fm.params, config, mask)
                anchor_values = {**anchor_values,  # the features' shape and dtype (float64)
                                 STEIN: torch.zeros(self.n_features, dtype=torch.float64)}
            super().__init__(fm, loss_fn, data, n, config, anchor, mask, evaluate,
                             anchor_values, streams, store_draws, chains, recorder)
            self.call = _Call(fm.module, loss_fn)
            sl = fm.slices()
            moving = [nm for nm in fm.names if mask is None or bool(mask[sl[nm]].any())]
            self.moving = moving
            self.frozen = {f"inner.{nm}": fm.params[sl[nm]].view(sh).clone()
                           for nm, sh in zip(fm.names, fm.shapes) if nm not in moving}
            self.live_index: tuple = (None, None)  # (live rows, their index on the device)

        # ---- vectorized pieces -------------------------------------------------------
        def _views(self, w: Tensor) -> dict[str, Tensor]:
            """``W [chain, d]`` -> ``{inner.name: [chain, *shape]}`` for the moving params."""
            sl, shp = self.fm.slices(), dict(zip(self.fm.names, self.fm.shapes))
            return {f"inner.{nm}": w[:, sl[nm]].reshape(w.shape[0], *shp[nm])
                    for nm in self.moving}

        def _grads(self, w: Tensor, batch, shared: bool) -> tuple[Tensor, Tensor]:
            """Minibatch mean loss ``[chain]`` and its gradient ``[chain, d]`` at every row."""
            frozen = self.frozen

            def mean_loss(p, b):
                return functional_call(self.call, {**p, **frozen}, (b,)).mean()

            g, loss = vmap(grad_and_value(mean_loss), in_dims=(0, None if shared else 0))(
                self._views(w), batch)
            flat = torch.zeros_like(w)
            sl = self.fm.slices()
            for nm in self.moving:
                flat[:, sl[nm]] = g[f"inner.{nm}"].reshape(w.shape[0], -1)
            return loss.detach(), flat

        def _probe_losses(self, w: Tensor) -> Tensor | None:
            """Every row's probe losses ``[chain, m]`` in one vmapped forward, or None."""
            probe = getattr(self.evaluate, "probe", None)
            if not (self.opts.vmap_probe and probe is not None
                    and set(self.shapes) - {STEIN} == {"loss"}):
                return None
            frozen = self.frozen
            with torch.no_grad():
                return vmap(lambda p: functional_call(self.call, {**p, **frozen}, (probe,)))(
                    self._views(w))

        # ---- the loop ------------------------------------------------------------------
        def run_all(self, progress: bool) -> None:
            """Lockstep steps; a draw is evaluated at the start of the step that leaves it,
            after that step's gradient (the Stein features use that step's drift). As in the
            sequential sampler, the steps' losses stay on the device and are read once per
            window (the steps of a draw): a chain whose loss diverged at step ``k`` is stopped
            with ``Divergence(chain, k)`` at the window's end; its rows computed after ``k``
            are discarded (the other chains' rows do not depend on them)."""
            cfg, fm = self.cfg, self.fm
            chs = [self._start(c) for c in self.chains]
            w = self.anchor.repeat(len(chs), 1)
            sq = torch.zeros_like(w) if cfg.precondition == "rmsprop" else None
            for i, ch in enumerate(chs):  # each chain's state is a row of the stack
                ch.state = SGLDState(w[i], 0, None if sq is None else sq[i])
            losses = torch.empty(len(self.losses), len(chs), dtype=torch.float64,
                                 device=w.device)  # [window step, chain]
            first = 0  # the open window's first step
            with tqdm(total=cfg.n_steps * len(chs), disable=not progress,
                      desc=f"{len(chs)} batched chains", unit="step") as bar:
                for step in range(cfg.n_steps + 1):
                    if step > first and step - 1 == self._window_last(first):
                        self._check(chs, first, losses[:step - first])
                        first = step
                    live = [i for i, ch in enumerate(chs) if not ch.done]
                    if not live:
                        break
                    last = step == cfg.n_steps
                    loss = grad = None
                    if not last or self.n_features:  # one more gradient for the last features
                        loss, grad = self._gradients([chs[i] for i in live], self._rows(w, live))
                    done = step - cfg.burn_in
                    if done > 0 and done % cfg.thin == 0:
                        self._draws([chs[i] for i in live], w, live, grad, step - 1)
                    if not last:
                        self._advance(losses[step - first], chs, live, loss, grad)
                        bar.update(len(live))
            for ch in chs:
                for key, results in ch.parts.items():
                    self.parts[key] += [(ch.chain, r) for r in results]
            fm.params.copy_(self.anchor)

        def _rows(self, w: Tensor, live: list[int]) -> Tensor:
            """The live chains' rows of ``W`` (their index sent to the device once per set)."""
            if len(live) == w.shape[0]:
                return w
            if self.live_index[0] != live:
                self.live_index = (live, to_device(torch.tensor(live), w.device))
            return w.index_select(0, self.live_index[1])

        def _gradients(self, chs, rows: Tensor) -> tuple[Tensor, Tensor]:
            if self.batch_size is None:
                return self._grads(rows, self.data, shared=True)
            parts = [batches.index(self.data, ch.batches.next()) for ch in chs]
            return self._grads(rows, _stack(parts), shared=False)

        def _advance(self, row: Tensor, chs, live, loss, grad) -> None:
            """Keep the live chains' losses in ``row [chain]`` (on the device) and take their
            SGLD steps."""
            if len(live) == len(chs):
                row.copy_(loss)
            else:
                for j, i in enumerate(live):
                    row[i] = loss[j]
            for j, i in enumerate(live):
                if not chs[i].done:  # else stopped by its observables at this draw
                    chs[i].state = self.update(chs[i].state, grad[j], self.anchor, chs[i].noise)

        def _check(self, chs, first: int, losses: Tensor) -> None:
            """Read the window's losses ``[step, chain]`` (one transfer) and stop each chain at
            its first diverging step."""
            rows = losses.tolist()
            for i, ch in enumerate(chs):
                if ch.done:  # stopped before this window, or by its observables at its start
                    continue
                bad = self._first_bad(ch, first, [r[i] for r in rows])
                if bad is not None:
                    self._diverge(ch, *bad)

        def _draws(self, chs, w, live, grad, step) -> None:
            from suscept.control_variates import stein_features

            fm, cfg = self.fm, self.cfg
            probe = self._probe_losses(self._rows(w, live))
            none = self.losses[:0]
            for j, ch in enumerate(chs):
                fm.params.copy_(w[live[j]])
                values = self.evaluate(fm.module) if probe is None else {"loss": probe[j]}
                if self.n_features:
                    x = w[live[j]] - self.anchor
                    values[STEIN] = stein_features(
                        self.opts.directions, x, _drift(cfg, grad[j], w[live[j]], self.anchor),
                        cfg.step_size).to(fm.params.dtype)
                self._take(ch, step, values, summary(none, values, fm.params,
                                                      self.anchor).tolist())

    return BatchedSampler(options, *args)


def _drift(cfg, grad: Tensor, w: Tensor, anchor: Tensor) -> Tensor:
    """Drift ``D = t g + gamma (w - w*) + lambda_wd w`` (docs/theory.md section 2): step
    ``-(eps/2) D + noise``."""
    out = grad * cfg.n_beta + (w - anchor) * cfg.gamma
    return out + w * cfg.weight_decay if cfg.weight_decay else out


def _check_directions(v: Tensor, params: Tensor, config, mask) -> int:
    if not isinstance(v, Tensor) or v.ndim != 2 or v.shape[1] != params.numel():
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ConfigError(f"Batched(directions=) must be a [r, d] tensor with d = "
                          f"{params.numel()} (the flat trainable parameters); got {shape}")
    if config.precondition is not None or mask is not None:
        raise ConfigError("Stein features need plain SGLD on all parameters: drop "
                          "precondition= and mask= or the directions")
    r = v.shape[0]
    return r + r * (r + 1) // 2


def as_options(batched) -> Batched:
    if batched is True:
        return Batched()
    if isinstance(batched, Batched):
        return batched
    raise ConfigError(f"batched must be True, False or a suscept.batched.Batched; got {batched!r}")
