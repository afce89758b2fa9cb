"""Component names, parsed once into parameter masks (docs/theory.md section 5).

Names: ``"L1H6"`` (head 6 of layer 1), ``"L0.attn"`` (attention sublayer, all heads and
``b_O``), ``"L1.mlp"``, ``"L1"`` (the whole block: norms, attention, MLP), ``"embed"``,
``"pos_embed"``, ``"unembed"``, ``"ln_final"``; circuits are unions ``"L0H1+L1H6"``. The
shorthands ``"all heads"`` and ``"all layers"`` expand to one component per head / layer.

Under grouped-query attention (``n_key_value_heads < n_heads``) a head ``"L1H6"`` owns its
query and output slices (W_Q, b_Q, W_O) and the keys and values its group shares are the
component ``"L1KV{g}"`` (g = h // (n_heads / n_key_value_heads)); ``"all kv groups"`` expands
to every one of them. ``"L1.attn"`` holds every attention parameter, shared ones included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from observables.adapter import Adapter, Entries
from suscept.errors import ConfigError

_NUM = r"(0|[1-9][0-9]*)"  # ASCII digits, no leading zeros: one spelling per component
_HEAD = re.compile(rf"L{_NUM}H{_NUM}")
_KV = re.compile(rf"L{_NUM}KV{_NUM}")
_SUB = re.compile(rf"L{_NUM}(?:\.(attn|mlp))?")
SHORTHANDS = ("all heads", "all layers", "all kv groups")


@dataclass(frozen=True)
class Component:
    """A parsed component: its canonical name, atomic parts and parameter masks.

    ``start_layer`` is the first block whose computation its weights change (``None``: the
    embedding, so a restricted forward starts from the tokens); ``head`` is ``(layer, head)``
    for a single head (evaluated by the batched head path of the plan), else ``None``.
    """

    name: str
    parts: tuple[str, ...]
    entries: tuple[tuple[str, Tensor], ...]
    start_layer: int | None
    head: tuple[int, int] | None

    def mask(self) -> dict[str, Tensor]:
        """``{parameter name: bool mask}``, the format of ``suscept.sample(mask=...)``."""
        return dict(self.entries)


def kv_names(ad: Adapter) -> list[str]:
    """``L{l}KV{g}`` for every key/value group (empty without grouped-query attention)."""
    return [f"L{l}KV{g}" for l in range(ad.n_layers) for g in range(ad.n_kv_heads)] \
        if ad.grouped else []


def valid_names(ad: Adapter) -> list[str]:
    """Every atomic component name of this model (those that own a trainable parameter)."""
    heads = [f"L{l}H{h}" for l in range(ad.n_layers) for h in range(ad.n_heads)]
    subs = [f"L{l}{s}" for l in range(ad.n_layers)
            for s in ("", ".attn") + ((".mlp",) if ad.has_mlp else ())]
    special = [n for n, fn in (("embed", ad.embed), ("pos_embed", ad.pos_embed),
                               ("unembed", ad.unembed), ("ln_final", ad.ln_final)) if fn()]
    return heads + kv_names(ad) + subs + special


def _atom(name: str, ad: Adapter) -> tuple[Entries, int | None, tuple[int, int] | None]:
    def layer_ok(l: int) -> int:
        if not 0 <= l < ad.n_layers:
            raise ConfigError(f"component {name!r}: layer {l} out of range; the model has "
                              f"layers 0..{ad.n_layers - 1}")
        return l

    if m := _HEAD.fullmatch(name):
        l, h = layer_ok(int(m[1])), int(m[2])
        if not 0 <= h < ad.n_heads:
            raise ConfigError(f"component {name!r}: head {h} out of range; layer {l} has heads "
                              f"0..{ad.n_heads - 1}")
        return ad.head(l, h), l, (l, h)
    if m := _KV.fullmatch(name):
        l, g = layer_ok(int(m[1])), int(m[2])
        if not ad.grouped:
            raise ConfigError(f"component {name!r}: this model has no grouped-query attention; "
                              f"each head L{l}H<h> owns its own keys and values")
        if not 0 <= g < ad.n_kv_heads:
            raise ConfigError(f"component {name!r}: key/value group {g} out of range; layer {l} "
                              f"has groups 0..{ad.n_kv_heads - 1}")
        return ad.kv_group(l, g), l, None
    if m := _SUB.fullmatch(name):
        l = layer_ok(int(m[1]))
        if m[2] == "mlp" and not ad.has_mlp:
            raise ConfigError(f"component {name!r}: this model is attention-only (no MLP)")
        entries = {None: ad.layer, "attn": ad.attn, "mlp": ad.mlp}[m[2]](l)
        return entries, l, None
    last = ad.n_layers - 1
    special = {"embed": (ad.embed, None), "pos_embed": (ad.pos_embed, None),
               "unembed": (ad.unembed, last), "ln_final": (ad.ln_final, last)}
    if name in special:
        fn, start = special[name]
        return fn(), start, None
    raise ConfigError(f"unknown component {name!r}; valid names: {valid_names(ad)} "
                      f"(circuits join names with '+'; shorthands: {SHORTHANDS})")


def parse(name: str, ad: Adapter) -> Component:
    """Parse one component or circuit name (``"L0H1+L1H6"``) into a :class:`Component`."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"a component name must be a non-empty string; got {name!r}")
    parts = tuple(p.strip() for p in name.split("+"))
    if len(set(parts)) != len(parts):
        dup = sorted({p for p in parts if parts.count(p) > 1})
        raise ConfigError(f"circuit {name!r} lists {dup} more than once")
    merged: dict[str, Tensor] = {}
    starts, head = [], None
    for part in parts:
        entries, start, head = _atom(part, ad)
        starts.append(start)
        for pname, m in entries.items():
            merged[pname] = merged[pname] | m if pname in merged else m.clone()
    if not merged:
        raise ConfigError(f"component {name!r} owns no trainable parameter in this model")
    start = None if None in starts else min(starts)
    return Component("+".join(parts), parts, tuple(merged.items()), start,
                     head if len(parts) == 1 else None)


def expand(names: str | list[str], ad: Adapter) -> list[Component]:
    """Parse names, expanding ``"all heads"`` / ``"all layers"`` / ``"all kv groups"``;
    duplicates are an error."""
    names = [names] if isinstance(names, str) else list(names)
    flat: list[str] = []
    for n in names:
        if n == "all heads":
            flat += [f"L{l}H{h}" for l in range(ad.n_layers) for h in range(ad.n_heads)]
        elif n == "all layers":
            flat += [f"L{l}" for l in range(ad.n_layers)]
        elif n == "all kv groups":
            if not ad.grouped:
                raise ConfigError("'all kv groups' needs grouped-query attention; this model's "
                                  "heads own their keys and values ('all heads')")
            flat += kv_names(ad)
        else:
            flat.append(n)
    comps = [parse(n, ad) for n in flat]
    seen = [c.name for c in comps]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"components listed more than once: "
                          f"{sorted({s for s in seen if seen.count(s) > 1})}")
    if not comps:
        raise ConfigError("no components given")
    return comps


def union_mask(components: list[Component]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for c in components:
        for n, m in c.entries:
            out[n] = out[n] | m if n in out else m.clone()
    return out
