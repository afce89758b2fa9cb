"""Build small TransformerLens models from a config with whichever line is installed.

3.x gives a ``HookedTransformer``; 4.x a native ``TransformerBridge`` (``boot_native``). No
download happens either way: weights are initialized from ``seed``.
"""

from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import torch
from torch import nn


def backend() -> str:
    """``"hooked"`` (TransformerLens 3.x) or ``"bridge"`` (4.x); ImportError if neither."""
    from importlib.metadata import version

    return "bridge" if int(version("transformer-lens").split(".")[0]) >= 4 else "hooked"


def build(*, n_layers: int = 2, d_model: int = 32, n_heads: int = 4, d_head: int = 8,
          d_vocab: int = 20, n_ctx: int = 16, d_mlp: int | None = None, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> nn.Module:
    """A small transformer; attention-only when ``d_mlp`` is None, LayerNorm, GELU MLPs.

    The weights are a function of ``seed`` alone. TransformerLens initializes them from the
    global generators (and 3.x reseeds torch, numpy and ``random``), so their states are saved
    before and restored after: the caller's random streams are left as they were.
    """
    with _global_rng_restored():
        return _build(n_layers, d_model, n_heads, d_head, d_vocab, n_ctx, d_mlp, seed, dtype)


@contextlib.contextmanager
def _global_rng_restored():
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def _build(n_layers, d_model, n_heads, d_head, d_vocab, n_ctx, d_mlp, seed, dtype) -> nn.Module:
    attn_only = d_mlp is None
    common = dict(n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, d_head=d_head,
                  n_heads=n_heads, d_vocab=d_vocab, attn_only=attn_only,
                  normalization_type="LN", seed=seed)
    if not attn_only:
        common["d_mlp"] = d_mlp
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if backend() == "hooked":
            from transformer_lens import HookedTransformer, HookedTransformerConfig

            cfg = HookedTransformerConfig(act_fn=None if attn_only else "gelu", dtype=dtype,
                                          **common)
            return HookedTransformer(cfg).eval()
        from transformer_lens import TransformerBridge, TransformerBridgeConfig

        cfg = TransformerBridgeConfig(act_fn="gelu", dtype=dtype, **common)
        torch.manual_seed(seed)
        return TransformerBridge.boot_native(cfg).eval()
