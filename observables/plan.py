"""The evaluation plan: every requested observable at one draw, with few forward passes.

For a draw ``w`` (the sampler's model copy) and each needed weight setting — the full model
``w``, or a component's mixed weights ``w^C`` — the plan computes the per-token probe losses:

- **full**: one forward of the draw's model.
- **single heads** (``"L1H6"``), grouped per layer: the anchor's activations never change, so
  the plan caches them once. For layer l it runs layer l's attention of the anchor copy with the
  draw's weights of all its heads swapped in (LayerNorm and ``b_O`` stay at w*) on the cached
  residual stream, stopping at ``hook_z``, to get every head's ``z(w)``. A head enters the rest
  of the network only through its share of the attention output, so its mixed-weight residual
  stream after layer l's attention is the anchor's plus
  ``delta_h = z_h(w) W_O^h(w) - z_h(w*) W_O^h(w*)``; the plan starts there (3.x: the rest of
  block l, then ``start_at_layer=l + 1``), so earlier layers and layer l's attention are not
  recomputed per head. On 4.x bridge models the anchor is run from layer l with ``delta_h``
  added by a hook. Heads are evaluated in batches of ``max_batch_tokens`` (on CPU one head at
  a time: larger batches cost more per token there).
- **other components** (sublayers, layers, embeddings, circuits): the anchor copy's parameters
  of C are swapped for the draw's, and the forward starts at C's first layer from the cached
  residual stream; the anchor values are restored afterwards (also after an exception).

``naive=True`` evaluates every component by a full forward from the tokens instead (the
baseline of the benchmark). Hooks exist only inside ``model.hooks(...)`` contexts.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from observables.adapter import Adapter
from observables.components import Component, expand
from observables.lm import check_tokens, token_losses
from observables.registry import Anchor, Observable
from suscept.errors import ConfigError
from suscept.model import copy_module

FULL = None  # the weight setting "full model at w"


class EvaluationPlan:
    """Callable ``plan(model_at_w) -> {observable key: Tensor}``; build once per anchor.

    Args:
        model: the TransformerLens model at the anchor w* (copied; never modified).
        probe: token ids ``[batch, pos]`` evaluated at every draw.
        specs: the observables (see :mod:`observables.registry`).
        naive: evaluate each component with a full forward (for benchmarks).
        max_batch_tokens: at most this many tokens per batch of heads (heads of a layer are
            evaluated in chunks). Default: one head per batch on CPU, where a batch of several
            heads costs more than the heads one by one; 65536 tokens on other devices.
    """

    def __init__(self, model: nn.Module, probe: Tensor, specs: Sequence[Observable],
                 naive: bool = False, max_batch_tokens: int | None = None):
        self.adapter = Adapter.of(model)
        self.tokens = check_tokens(probe, model)
        if not specs:
            raise ConfigError("an evaluation plan needs at least one observable")
        keys = [s.key for s in specs]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"observable names must be unique; got {keys}")
        self.specs = list(specs)
        names = [c for s in specs if s.components for c in s.components]
        self.components: dict[str, Component] = {
            c.name: c for c in expand(list(dict.fromkeys(names)), self.adapter)} if names else {}
        self.rows = {s.key: [FULL] if s.components is None else   # canonical names
                     [c.name for c in expand(list(s.components), self.adapter)] for s in specs}
        self.naive = naive
        self.head_path = self.adapter.head_path  # "swap" after a failed self-check
        self.anchor_model = copy_module(model).eval()
        for p in self.anchor_model.parameters():
            p.requires_grad_(False)
        self.own = dict(self.anchor_model.named_parameters())
        self.anchor_params = {n: p.detach().clone() for n, p in self.own.items()}
        device = next(iter(self.anchor_params.values())).device
        self.tokens = self.tokens.to(device)
        if max_batch_tokens is None:
            max_batch_tokens = self.tokens.numel() if device.type == "cpu" else 65536
        self.max_batch_tokens = max_batch_tokens
        self.masks = {c.name: [(n, _dense(m, device)) for n, m in c.entries]
                      for c in self.components.values()}
        self.keep_logits = any(s.needs_logits for s in specs)
        self._cache_anchor()

    def _cache_anchor(self) -> None:
        ad = self.adapter
        wanted = set()
        for l in range(ad.n_layers):
            wanted.add(ad.resid_pre(l))
            if self.head_path == "mid":
                wanted.add(ad.resid_mid(l))
        with torch.no_grad():
            logits, cache = self.anchor_model.run_with_cache(
                self.tokens, names_filter=lambda name: name in wanted)
        self.cache = {k: cache[k].detach().clone() for k in wanted}
        self.forward_kwargs = self._forward_kwargs()
        self.w_o = [ad.w_o(self.anchor_model, l).detach().clone() for l in range(ad.n_layers)]
        self.layer_heads = {}  # layer -> entries of all its heads (not b_O)
        for l in range(ad.n_layers):
            merged: dict[str, Tensor] = {}
            for h in range(ad.n_heads):
                for n, m in ad.head(l, h).items():
                    merged[n] = merged[n] | m if n in merged else m
            self.layer_heads[l] = [(n, _dense(m, self.tokens.device)) for n, m in merged.items()]
        # the anchor's z through the same computation as the draws' (bitwise comparable)
        with torch.no_grad():
            self.z_anchor = [self._layer_z(l, self.anchor_params) for l in range(ad.n_layers)]
        self.anchor_losses = token_losses(logits, self.tokens)
        # Lbar_S(w*) of every weight setting, through the same path as the draws, so that
        # relative observables are exactly 0 at the anchor (batched forwards round differently
        # from a plain forward, by ~1e-7)
        with torch.no_grad():
            settings = self._losses(self.anchor_model, full=True)
            if self._check_paths(settings):  # heads now by the swapped forward
                settings = self._losses(self.anchor_model, full=True)
        baseline = {k: float(v[0].double().mean()) for k, v in settings.items()}
        self.anchors = {s.key: Anchor(mean_loss=torch.tensor(
            [baseline[k] for k in self.rows[s.key]], dtype=torch.float64,
            device=self.tokens.device)) for s in self.specs}

    def _check_paths(self, settings: dict) -> bool:
        """Self-checks of the shortcuts, once per plan, so an option the plan does not
        reproduce is caught rather than silently mis-evaluated.

        1. At the anchor every component's losses must equal the model's own forward from the
           tokens (a forward from a layer that misses what the model passes to its blocks
           fails here): otherwise ``ConfigError``.
        2. A head of the first and of the last layer with requested heads, at perturbed
           weights: the additive head shortcut must match a forward at the swapped weights to
           1e-2 of the perturbation's effect; otherwise the plan warns and evaluates heads by
           the swapped forward (exact, slower), and returns True.
        """
        full = settings[FULL][0]
        low = next(iter(self.anchor_params.values())).dtype in (torch.float16, torch.bfloat16)
        tol = 5e-2 if low else 1e-3
        for name in self.components:
            err = float((settings[name][0] - full).abs().max())
            if err > tol:
                raise ConfigError(
                    f"at the anchor, the plan's forward for {name} differs from the model's own "
                    f"forward by {err:.3g} nats: the model uses an option the plan does not "
                    "reproduce; pass naive=True (one full forward per component)")
        heads = [c for c in self.components.values() if c.head is not None]
        if self.naive or self.head_path == "swap" or not heads:
            return False
        layers = sorted({c.head[0] for c in heads})
        for layer in sorted({layers[0], layers[-1]}):
            c = next(h for h in heads if h.head[0] == layer)
            params = dict(self.anchor_params)
            g = torch.Generator().manual_seed(layer)
            for n, m in self.layer_heads[layer]:
                noise = torch.randn(params[n].shape, generator=g).to(params[n])
                params[n] = params[n] + noise * (0.1 * params[n].std() + 1e-3) * m
            with self._draw_weights(self.layer_heads[layer], params) as mixed:
                w_o = self.adapter.w_o(mixed, layer).detach().clone()
            fast = self._heads(layer, [c], w_o, self._layer_z(layer, params))[c.name][0]
            slow = self._swapped(c, params)[0]
            err = float((fast - slow).abs().max())
            if err > tol + 1e-2 * float((slow - full).abs().max()):
                warnings.warn(f"the head shortcut of the evaluation plan is off by {err:.3g} "
                              f"nats for {c.name} on this model; evaluating heads by a forward "
                              "at the swapped weights instead (exact, slower)", RuntimeWarning,
                              stacklevel=4)
                self.head_path = "swap"
                return True
        return False

    def _forward_kwargs(self) -> dict[str, Tensor]:
        """What a forward from the tokens passes to every block besides the residual stream,
        which a forward with ``start_at_layer`` must be given (3.x): the shortformer position
        embedding ``[batch, pos, d_model]`` (added to queries and keys in every layer) and the
        padding mask ``[batch, pos]`` (when the tokenizer pads on the left)."""
        if self.adapter.kind != "hooked":
            return {}
        with torch.no_grad():
            _, _, pos, mask = self.anchor_model.input_to_embed(self.tokens)
        kwargs = {"shortformer_pos_embed": pos, "attention_mask": mask}
        return {k: v.detach().clone() for k, v in kwargs.items() if v is not None}

    def _kwargs(self, k: int) -> dict[str, Tensor]:
        """:meth:`_forward_kwargs` for ``k`` copies of the probe stacked along the batch."""
        return {n: v if k == 1 else v.repeat(k, *(1,) * (v.ndim - 1))
                for n, v in self.forward_kwargs.items()}

    # ---- per draw -------------------------------------------------------------------------
    def __call__(self, model: nn.Module) -> dict[str, Tensor]:
        with torch.no_grad():
            settings = self._losses(model)
            out = {}
            for s in self.specs:
                keys = self.rows[s.key]
                losses = torch.stack([settings[k][0] for k in keys])
                logits = torch.stack([settings[k][1] for k in keys]) if s.needs_logits else None
                v = s.reduce(losses, logits, self.tokens, self.anchors[s.key])
                out[s.key] = v[0] if s.components is None else v
        return out

    def _losses(self, model: nn.Module, full: bool = False) -> dict:
        """Weight setting -> (per-token losses [batch, pos-1], logits or None)."""
        out = {}
        if full or any(s.components is None for s in self.specs):
            out[FULL] = self._pack(model(self.tokens))
        params = dict(model.named_parameters())
        heads: dict[int, list[Component]] = {}
        for c in self.components.values():
            if c.head is not None and not self.naive and self.head_path != "swap":
                heads.setdefault(c.head[0], []).append(c)
            else:
                out[c.name] = self._swapped(c, params)
        per_chunk = max(1, self.max_batch_tokens // self.tokens.numel())
        for layer, comps in heads.items():
            z_w = self._layer_z(layer, params)  # every head of the layer, once per draw
            for i in range(0, len(comps), per_chunk):  # bounded fan-out batches
                out.update(self._heads(layer, comps[i:i + per_chunk],
                                       self.adapter.w_o(model, layer), z_w))
        return out

    def _pack(self, logits: Tensor) -> tuple[Tensor, Tensor | None]:
        return token_losses(logits, self.tokens), (logits if self.keep_logits else None)

    @contextmanager
    def _draw_weights(self, masks: list[tuple[str, Tensor]], params: dict[str, Tensor]):
        """The anchor copy with the masked entries taken from the draw, restored on exit."""
        own = self.own
        try:
            for n, m in masks:
                own[n].copy_(params[n] if m is True else
                             torch.where(m, params[n], self.anchor_params[n]))
            yield self.anchor_model
        finally:
            for n, _ in masks:
                own[n].copy_(self.anchor_params[n])

    def _swapped(self, c: Component, params: dict[str, Tensor]):
        """Forward at ``w^C``, from C's first layer on the cached residual stream."""
        start = None if self.naive else c.start_layer
        with self._draw_weights(self.masks[c.name], params) as mixed:
            if start is None:
                logits = mixed(self.tokens)
            else:
                logits = mixed(self.cache[self.adapter.resid_pre(start)], start_at_layer=start,
                               **self._kwargs(1))
        return self._pack(logits)

    def _layer_z(self, layer: int, params: dict[str, Tensor]) -> Tensor:
        """``z [batch, pos, head, d_head]`` of layer ``layer`` with its heads' weights from
        ``params`` and everything else (LayerNorm, earlier layers) at the anchor."""
        captured = {}

        def grab_z(t, hook):  # the rest of the block is not needed: stop the forward here
            captured["z"] = t
            raise _GotZ

        resid = self.cache[self.adapter.resid_pre(layer)]
        with self._draw_weights(self.layer_heads[layer], params) as mixed, \
                mixed.hooks(fwd_hooks=[(self.adapter.z(layer), grab_z)]):
            try:
                mixed(resid, start_at_layer=layer, stop_at_layer=layer + 1, **self._kwargs(1))
            except _GotZ:
                pass
        return captured["z"]

    def _heads(self, layer: int, comps: list[Component], w_o: Tensor, z_all: Tensor) -> dict:
        """Restricted losses of single heads of ``layer`` from the draw's ``z`` of every head
        ``[batch, pos, head, d_head]`` and ``W_O`` ``[head, d_head, d_model]``."""
        ad = self.adapter
        resid = self.cache[ad.resid_pre(layer)]
        idx = [c.head[1] for c in comps]
        z_w = z_all[:, :, idx]
        z_a = self.z_anchor[layer][:, :, idx]
        w_o_w, w_o_a = w_o[idx], self.w_o[layer][idx]
        delta = (torch.einsum("bphd,hdm->hbpm", z_w, w_o_w)
                 - torch.einsum("bphd,hdm->hbpm", z_a, w_o_a))  # [K, batch, pos, d_model]
        k, b = len(comps), resid.shape[0]
        delta = delta.reshape(k * b, *delta.shape[2:])

        def fan_out(t, hook):  # [batch] -> [K * batch]: resid_mid*, plus each head's change
            return t.repeat(k, 1, 1) + delta

        def add_delta(t, hook):  # already [K * batch]
            return t + delta

        if self.head_path == "mid":  # start right after layer l's attention
            mid = self.cache[ad.resid_mid(layer)].repeat(k, 1, 1) + delta
            post = ad.rest_of_block(self.anchor_model, layer, mid)
            logits = self.anchor_model(post, start_at_layer=layer + 1, **self._kwargs(k))
            logits = logits.reshape(k, b, *logits.shape[1:])
            return {c.name: self._pack(logits[i]) for i, c in enumerate(comps)}
        if ad.fan_out_mid:
            hooks, inputs = [(ad.resid_mid(layer), fan_out)], resid
        else:  # fan out before the layer; add each head's change to the attention output
            hooks, inputs = [(ad.attn_out(layer), add_delta)], resid.repeat(k, 1, 1)
        with self.anchor_model.hooks(fwd_hooks=hooks):
            logits = self.anchor_model(inputs, start_at_layer=layer)
        logits = logits.reshape(k, b, *logits.shape[1:])
        return {c.name: self._pack(logits[i]) for i, c in enumerate(comps)}


class _GotZ(Exception):
    """Raised by the ``hook_z`` hook to end a forward once ``z`` is captured."""


def _dense(mask: Tensor, device) -> Tensor | bool:
    """``True`` for a mask that selects the whole parameter (copied without a ``where``)."""
    return True if bool(mask.all()) else mask.to(device)
