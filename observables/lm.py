"""Language-model losses for TransformerLens models of either line."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from suscept.errors import ConfigError, ShapeError


def token_losses(logits: Float[Tensor, "*batch pos vocab"],
                 tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "*batch pos_minus_1"]:
    """``l_{i,s} = -log p(x_{i,s+1} | x_{i,<=s})`` for every position but the last."""
    logp = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    target = tokens[..., 1:].expand(*logp.shape[:-1])
    return -logp.gather(-1, target[..., None])[..., 0]


def lm_loss(model: nn.Module, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Per-sequence loss ``l_i`` = mean of its per-token losses; the SGLD ``loss_fn``."""
    return token_losses(model(tokens), tokens).mean(-1)


def check_tokens(tokens: Tensor, model: nn.Module, what: str = "probe") -> Tensor:
    """Validate a token batch ``[batch, pos]`` against the model's ``n_ctx`` and vocabulary."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "n_ctx"):
        raise ConfigError(f"a TransformerLens model (HookedTransformer or TransformerBridge) is "
                          f"needed here; got {type(model).__name__}")
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or not len(tokens):
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ShapeError(f"{what} must be token ids of shape [batch, pos] with batch >= 1; "
                         f"got {shape}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ShapeError(f"{what} must hold integer token ids; got dtype {tokens.dtype}")
    if not 2 <= tokens.shape[1] <= cfg.n_ctx:
        raise ShapeError(f"{what} has {tokens.shape[1]} positions; the model takes 2..{cfg.n_ctx}"
                         " (n_ctx); cut the sequences")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= cfg.d_vocab):
        raise ConfigError(f"{what} holds token ids outside the vocabulary [0, {cfg.d_vocab}): "
                          f"min {int(tokens.min())}, max {int(tokens.max())}")
    return tokens
