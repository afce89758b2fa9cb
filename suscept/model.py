"""A private copy of the user's module whose trainable parameters live in one flat vector.

The user's module is never modified: :func:`private_copy` deep-copies it, puts the copy in
eval mode (no dropout noise) and re-points each trainable parameter (and its ``.grad``) at a
view into one flat ``[d]`` buffer, so the SGLD kernel updates all parameters with a few
whole-vector operations.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from suscept.errors import ConfigError, ShapeError


@dataclass
class FlatModule:
    module: nn.Module  # the private copy, eval mode
    names: list[str]  # trainable parameter names, in flat order
    shapes: list[torch.Size]
    offsets: list[int]
    params: Tensor  # [d] storage of every trainable parameter of ``module``
    grad: Tensor  # [d] storage of their gradients

    def slices(self) -> dict[str, slice]:
        return {n: slice(o, o + s.numel()) for n, o, s in zip(self.names, self.offsets,
                                                                self.shapes)}

    def flatten(self, tensors: Mapping[str, Tensor], what: str) -> Tensor:
        """A ``[d]`` vector from a name -> tensor mapping (e.g. an anchor state dict)."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ConfigError(f"{what} lacks parameters {missing[:5]}; it must map every "
                              "trainable parameter name to a tensor")
        out = torch.empty_like(self.params)
        for n, sl, shape in zip(self.names, self.slices().values(), self.shapes):
            t = torch.as_tensor(tensors[n])
            if t.shape != shape:
                raise ShapeError(f"{what}[{n!r}] has shape {tuple(t.shape)}, the parameter has "
                                 f"{tuple(shape)}")
            out[sl] = t.detach().reshape(-1).to(out)
        return out


def _unwire_copied_hooks(clone: nn.Module) -> None:
    """Drop the hooks a deep copy shares with its original through closures.

    ``copy.deepcopy`` copies a module's hook dicts but not the hook functions: a closure that
    holds a (weak) reference to a submodule of the original still points at the original. On
    TransformerLens 4.x bridge blocks such hooks (listed in ``_capture_hook_handles``, wired
    lazily on the next forward when ``_capture_hooks_wired`` is False) store the residual of
    each forward on the original's attention module, so a forward of the copy would leave a
    tensor (with its graph) on the user's model. The copy's entries of those handles are
    removed and the block rewires its own hooks on its first forward."""
    modules = list(clone.modules())
    for m in modules:
        handles = getattr(m, "_capture_hook_handles", None)
        if not isinstance(handles, list) or not handles:
            continue
        ids = {h.id for h in handles}
        for owner in modules:
            for name, table in vars(owner).items():
                if name.startswith(("_forward", "_backward")) and isinstance(table, dict):
                    for i in ids & set(table):
                        del table[i]
        handles.clear()
        m._capture_hooks_wired = False


def copy_module(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose forwards leave the original untouched (no hook of the
    copy writes into the original: :func:`_unwire_copied_hooks`)."""
    clone = copy.deepcopy(model)
    _unwire_copied_hooks(clone)
    return clone


def private_copy(model: nn.Module) -> FlatModule:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    clone = copy_module(model)
    clone.eval()
    named = [(n, p) for n, p in clone.named_parameters() if p.requires_grad]
    if not named:
        raise ConfigError("model has no trainable parameters (requires_grad=True) to sample")
    dtypes = {p.dtype for _, p in named}
    devices = {p.device for _, p in named}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ConfigError(f"all trainable parameters must share one dtype and device; got "
                          f"{sorted(map(str, dtypes))} on {sorted(map(str, devices))}")
    if not next(iter(dtypes)).is_floating_point:
        raise ConfigError("trainable parameters must be floating point")
    flat = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
    grad = torch.zeros_like(flat)
    offsets, o = [], 0
    for _, p in named:
        offsets.append(o)
        k = p.numel()
        with torch.no_grad():
            p.data = flat[o:o + k].view_as(p)
        p.grad = grad[o:o + k].view_as(p)
        o += k
    return FlatModule(clone, [n for n, _ in named], [p.shape for _, p in named], offsets,
                      flat, grad)


def build_mask(fm: FlatModule, mask: Mapping[str, bool | Tensor]) -> Tensor:
    """A 0/1 ``[d]`` vector from ``{name pattern: True | bool tensor of the param's shape}``.

    Patterns use shell wildcards (``"0.*"``); parameters matched by no pattern are frozen.
    """
    if not isinstance(mask, Mapping) or not mask:
        raise ConfigError("mask must be a non-empty dict {parameter name or pattern: True or a "
                          "0/1 tensor of the parameter's shape}")
    out = torch.zeros_like(fm.params)
    sl = fm.slices()
    for pattern, value in mask.items():
        hits = [n for n in fm.names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ConfigError(f"mask entry {pattern!r} matches no trainable parameter; valid "
                              f"names: {fm.names[:30]}")
        for n in hits:
            shape = fm.shapes[fm.names.index(n)]
            if isinstance(value, bool):
                v = torch.full(shape, float(value))
            else:
                v = torch.as_tensor(value)
                if v.shape != shape:
                    raise ShapeError(f"mask[{pattern!r}] has shape {tuple(v.shape)} but parameter "
                                     f"{n!r} has {tuple(shape)}")
            out[sl[n]] = v.reshape(-1).to(out)
    if not bool((out != 0).any()):
        raise ConfigError("mask selects no parameter entry: nothing would move")
    if not bool(((out == 0) | (out == 1)).all()):
        raise ConfigError("mask values must be 0/1 (or booleans)")
    return out
