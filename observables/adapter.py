"""One adapter over the two TransformerLens lines; every backend difference lives here.

- 3.x ``HookedTransformer``: parameters ``blocks.{l}.attn.W_Q`` ``[head, d_model, d_head]``,
  ``W_O`` ``[head, d_head, d_model]``, ``b_Q`` ``[head, d_head]``...
- 4.x ``TransformerBridge`` (native, or a Hugging Face model by ``boot_transformers``):
  parameter names follow the wrapped model (``layers.{l}._original_component.attn...``,
  ``transformer.h.{l}...``), so they are found through the bridge's TransformerLens-named
  modules ``blocks[l].attn.q/k/v/o``, ``blocks[l].mlp``, ``embed``... (:func:`_bridge_roles`);
  q/k/v weights ``[head * d_head, d_model]`` (nn.Linear) or ``[d_model, head * d_head]``
  (GPT-2's Conv1D); ``start_at_layer`` must be below ``n_layers``.

Both expose the hooks ``blocks.{l}.hook_resid_pre``, ``blocks.{l}.attn.hook_z``
``[batch, pos, head, d_head]``,
``blocks.{l}.hook_resid_mid`` (``hook_resid_post`` when attention-only), the ``W_O``
property ``[head, d_head, d_model]`` and
``model.hooks(fwd_hooks=...)``, which removes its hooks on exit, also after an exception.

Grouped-query attention (``n_key_value_heads < n_heads``; 3.x names ``_W_K``, ``_W_V``,
``_b_K``, ``_b_V`` ``[kv_head, ...]``, 4.x ``k``/``v`` rows ``[kv_head * d_head]``): a head owns
its query and output slices, each key/value group is a component of its own
(:class:`Adapter`). Options whose forward the plan does not reproduce are refused
(:func:`check_supported`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from suscept.errors import ConfigError

Entries = dict[str, Tensor]  # parameter name -> bool mask of the parameter's shape


def _head_path(kind: str, cfg) -> str:
    """How the evaluation plan computes a single head's restricted loss.

    A head enters the rest of the network only through its additive share ``z_h W_O^h`` of the
    attention output, so its restricted forward is the anchor's ``resid_mid`` plus the change of
    that share. ``"mid"`` (3.x, pre-norm, sequential attention and MLP): start right there, after
    layer ``l``'s attention. ``"fan"`` (4.x): run the anchor from layer ``l`` and add the change
    by a hook. ``"swap"``: architectures where the attention output is normalized before it is
    added (post-norm, ``use_normalization_before_and_after``) or attention and MLP read the same
    residual (``parallel_attn_mlp``): a forward at the swapped weights from layer ``l``.
    """
    if (getattr(cfg, "original_architecture", None) in _post_norm()
            or getattr(cfg, "use_normalization_before_and_after", False)
            or getattr(cfg, "parallel_attn_mlp", False)):
        return "swap"
    return "mid" if kind == "hooked" else "fan"


def _post_norm() -> set:
    try:
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES
    except ImportError:  # older 3.x releases have no post-norm architectures
        return set()
    return set(POST_NORM_ARCHITECTURES)


# (config field, values the plan is exact for, what to do instead); every other value is refused.
# Options not listed here only change computations inside one sublayer (rotary and alibi
# variants, attention scale and soft caps, local attention, norm types, gated or MoE MLPs), so
# every path of the plan reproduces them; tests/test_architectures.py checks each to 1e-5.
_REFUSED = (
    ("positional_embedding_type", {None, "standard", "shortformer", "rotary", "alibi"},
     "only standard, shortformer, rotary and alibi position embeddings are supported"),
    ("n_devices", {None, 1}, "load the model on one device (n_devices=1)"),
    ("use_attention_sinks", {None, False}, "attention sinks are not supported"),
)


def check_supported(cfg) -> None:
    """Refuse TransformerLens options whose forward the evaluation plan does not reproduce."""
    for key, ok, what in _REFUSED:
        value = getattr(cfg, key, None)
        if value not in ok:
            raise ConfigError(f"component observables do not support {key}={value!r}: {what}")


def n_kv_heads(cfg) -> int:
    """Key/value heads per layer: ``cfg.n_key_value_heads`` under grouped-query attention
    (TransformerLens keeps the grouped parameters also with ``ungroup_grouped_query_attention``,
    which only changes hook shapes), else ``n_heads``."""
    n = getattr(cfg, "n_key_value_heads", None)
    return int(n) if n else cfg.n_heads


def _check_no_aliases(trainable: list[tuple[str, nn.Parameter]]) -> None:
    """Refuse trainable parameters that share memory (4.x bridges of fused-QKV models keep the
    fused matrix beside views of it): sampling would move those entries twice."""
    seen: dict[int, str] = {}
    for n, p in trainable:
        ptr = p.untyped_storage().data_ptr()
        if ptr in seen:
            raise ConfigError(f"trainable parameters {seen[ptr]!r} and {n!r} share memory; "
                              "give each its own memory (p.data = p.data.clone()) and freeze any "
                              "the forward does not use; observables.load_pretrained does so "
                              "for fused qkv matrices")
        seen[ptr] = n


def _bridge_roles(model: nn.Module, trainable) -> dict[str, tuple[tuple[str, int], ...]]:
    """4.x: the trainable parameters of each part of a TransformerBridge, found through its
    TransformerLens-named modules (``blocks[l].attn.q`` ...), whatever the Hugging Face names.

    Roles ``"{l}"``, ``"{l}.attn"``, ``"{l}.mlp"``, ``"embed"``, ``"pos_embed"``,
    ``"unembed"``, ``"ln_final"`` hold ``(name, -1)``; ``"{l}.q"`` ... ``"{l}.o"`` hold the
    projection weights (and q/k/v biases) with the axis along which heads are laid out
    (``nn.Linear`` weight ``[out, in]``, GPT-2's ``Conv1D`` ``[in, out]``).
    """
    names = {id(p): n for n, p in trainable}

    def of(module, axis=lambda n, p, conv: -1):
        if module is None:
            return ()
        conv = type(getattr(module, "original_component", module)).__name__ == "Conv1D"
        return tuple((names[id(p)], axis(n, p, conv)) for n, p in module.named_parameters()
                     if id(p) in names and axis(n, p, conv) is not None)

    def qkv_axis(n, p, conv):
        return 1 if conv and p.ndim == 2 else 0

    def o_axis(n, p, conv):
        return None if p.ndim == 1 else (0 if conv else 1)  # b_O is shared by all heads

    roles = {k: of(getattr(model, k, None)) for k in ("embed", "pos_embed", "unembed",
                                                      "ln_final")}
    tied = {n for n, _ in roles["embed"]}  # a tied unembedding is the embedding's parameter
    roles["unembed"] = tuple(e for e in roles["unembed"] if e[0] not in tied)
    for l, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        roles[f"{l}"], roles[f"{l}.attn"] = of(block), of(attn)
        roles[f"{l}.mlp"] = of(getattr(block, "mlp", None))
        for c in "qkvo":
            roles[f"{l}.{c}"] = of(getattr(attn, c, None), o_axis if c == "o" else qkv_axis)
    return roles


def _is_hooked(model: nn.Module) -> bool:
    return type(model).__name__ == "HookedTransformer" or any(
        c.__name__ == "HookedTransformer" for c in type(model).__mro__)


def _is_bridge(model: nn.Module) -> bool:
    return any(c.__name__ == "TransformerBridge" for c in type(model).__mro__)


@dataclass(frozen=True)
class Adapter:
    """Shapes, parameter names and hook names of one TransformerLens model.

    Heads under grouped-query attention (``n_kv_heads < n_heads``): query head ``h`` of layer
    ``l`` (component ``L{l}H{h}``) owns its slices of W_Q, b_Q and W_O; the keys and values
    shared by the ``group_size`` query heads ``g * group_size ... (g + 1) * group_size - 1``
    are the separate component ``L{l}KV{g}`` (its slices of W_K, W_V, b_K, b_V). Without
    grouping a head owns its slices of all seven. Parameters every head of a layer shares
    (``b_O``, query/key norms) belong to ``L{l}.attn`` only.
    """

    kind: str  # "hooked" (TransformerLens 3.x) or "bridge" (4.x)
    n_layers: int
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    has_mlp: bool
    head_path: str  # how the plan evaluates single heads: "mid", "fan" or "swap" (see _head_path)
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # trainable parameters, in order
    n_kv_heads: int = 0  # key/value heads per layer (= n_heads without grouping)
    # 4.x: role ("0", "0.attn", "0.mlp", "0.q" ... "0.o", "embed", ...) -> (name, head axis)
    roles: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def grouped(self) -> bool:
        """Whether key/value heads are shared by several query heads (grouped-query)."""
        return self.n_kv_heads < self.n_heads

    @staticmethod
    def of(model: nn.Module) -> Adapter:
        if _is_hooked(model):
            kind = "hooked"
        elif _is_bridge(model):
            kind = "bridge"
        else:
            raise ConfigError(f"component observables need a TransformerLens model "
                              f"(HookedTransformer or TransformerBridge); got "
                              f"{type(model).__name__}")
        cfg = model.cfg
        check_supported(cfg)
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        _check_no_aliases(trainable)
        shapes = tuple((n, tuple(p.shape)) for n, p in trainable)
        roles = _bridge_roles(model, trainable) if kind == "bridge" else {}
        return Adapter(kind, cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_vocab, cfg.n_ctx,
                       not cfg.attn_only, _head_path(kind, cfg), shapes, n_kv_heads(cfg), roles)

    # ---- parameter entries ----------------------------------------------------------------
    def _params(self, pattern: str) -> list[tuple[str, tuple[int, ...]]]:
        rx = re.compile(pattern)
        return [(n, s) for n, s in self.shapes if rx.fullmatch(n)]

    def _all(self, pattern: str) -> Entries:
        return {n: torch.ones(s, dtype=torch.bool) for n, s in self._params(pattern)}

    def _role(self, role: str) -> Entries:
        """4.x: every entry of the parameters of ``role`` (see :func:`_bridge_roles`)."""
        shapes = dict(self.shapes)
        return {n: torch.ones(shapes[n], dtype=torch.bool) for n, _ in self.roles.get(role, ())}

    def _slices(self, layer: int, index: int, which: str) -> Entries:
        """Slice ``index`` (a head, or a key/value group) of the projections in ``which``
        (letters of ``"qkvo"``)."""
        out: Entries = {}
        if self.kind == "hooked":
            names = "|".join(rf"_?W_{c.upper()}|_?b_{c.upper()}" if c != "o" else "W_O"
                             for c in which)
            for n, s in self._params(rf"blocks\.{layer}\.attn\.({names})"):
                m = torch.zeros(s, dtype=torch.bool)
                m[index] = True
                out[n] = m
            return out
        shapes = dict(self.shapes)
        for c in which:
            entries = self.roles.get(f"{layer}.{c}", ())
            if not entries:
                raise ConfigError(f"cannot find a separate {c} projection in layer {layer} of "
                                  "this TransformerBridge; head components need q, k, v and o")
            for n, axis in entries:
                m = torch.zeros(shapes[n], dtype=torch.bool)
                m.narrow(axis, index * self.d_head, self.d_head).fill_(True)
                out[n] = m
        return out

    def head(self, layer: int, head: int) -> Entries:
        """The head's slices of W_Q, b_Q and W_O, and of W_K, W_V, b_K, b_V unless keys and
        values are grouped (then they are :meth:`kv_group`'s). Never b_O."""
        return self._slices(layer, head, "qo" if self.grouped else "qkvo")

    def kv_group(self, layer: int, group: int) -> Entries:
        """Key/value group ``group``'s slices of W_K, W_V, b_K, b_V (grouped-query only)."""
        return self._slices(layer, group, "kv")

    def _hooked_or_role(self, pattern: str, role: str) -> Entries:
        return self._all(pattern) if self.kind == "hooked" else self._role(role)

    def attn(self, layer: int) -> Entries:
        return self._hooked_or_role(rf"blocks\.{layer}\.attn\..*", f"{layer}.attn")

    def mlp(self, layer: int) -> Entries:
        return self._hooked_or_role(rf"blocks\.{layer}\.mlp\..*", f"{layer}.mlp")

    def layer(self, layer: int) -> Entries:
        return self._hooked_or_role(rf"blocks\.{layer}\..*", f"{layer}")

    def embed(self) -> Entries:
        """The token embedding (and the norm right after it, ``post_embedding_ln``)."""
        return self._hooked_or_role(r"embed\.(W_E|ln\..*)", "embed")

    def pos_embed(self) -> Entries:
        return self._hooked_or_role(r"pos_embed\.W_pos", "pos_embed")

    def unembed(self) -> Entries:
        return self._hooked_or_role(r"unembed\..*", "unembed")

    def ln_final(self) -> Entries:
        return self._hooked_or_role(r"ln_final\..*", "ln_final")

    # ---- hooks and forwards -------------------------------------------------------------
    @staticmethod
    def resid_pre(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_pre"

    @staticmethod
    def z(layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    def rest_of_block(self, model: nn.Module, layer: int, resid_mid: Tensor) -> Tensor:
        """``resid_post`` of layer ``layer`` from its ``resid_mid`` (``head_path == "mid"``
        only): ``resid_mid + MLP(LN2(resid_mid))``, or ``resid_mid`` itself when attention-only.
        The forward then goes on with ``model(resid_post, start_at_layer=layer + 1)``."""
        if not self.has_mlp:
            return resid_mid
        block = model.blocks[layer]
        return resid_mid + block.apply_mlp(block.ln2(resid_mid))

    @property
    def fan_out_mid(self) -> bool:
        """Whether replacing :meth:`resid_mid`'s output (with a larger batch) feeds the rest of
        the block. Not on 4.x bridge models with MLPs, whose block adds the MLP output to its
        own copy of the residual stream."""
        return self.kind == "hooked" or not self.has_mlp

    @staticmethod
    def attn_out(layer: int) -> str:
        return f"blocks.{layer}.hook_attn_out"

    def resid_mid(self, layer: int) -> str:
        """The residual stream right after layer ``layer``'s attention is added."""
        return f"blocks.{layer}.hook_resid_mid" if self.has_mlp \
            else f"blocks.{layer}.hook_resid_post"

    @staticmethod
    def w_o(model: nn.Module, layer: int) -> Tensor:
        return model.blocks[layer].attn.W_O  # [head, d_head, d_model]
