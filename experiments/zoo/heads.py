"""Mechanistic head scores, independent of any susceptibility: attention patterns and ablations.

- previous-token score of a head: its mean attention from position ``q`` to ``q - 1``
  (over ``q >= 1``);
- induction score: on sequences made of ``half`` distinct random tokens written twice, the mean
  attention from a second-copy position ``q`` (``half <= q < 2 half``) to ``q - half + 1``, the
  position right after the first occurrence of the token at ``q``;
- ablation effect: the increase of the mean loss on tokens of one type (``induction`` by
  default) when the head's output ``z`` (hook ``blocks.{l}.attn.hook_z``, ``[batch, pos, head,
  d_head]``) is replaced by zeros (or by its mean over batch and positions).

Patterns come from ``model.run_with_cache`` at ``blocks.{l}.attn.hook_pattern`` (``[batch, head,
query, key]``); the hook names are the same on a ``HookedTransformer`` (TransformerLens 3.x) and
a ``TransformerBridge`` (4.x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import observables
from experiments.zoo.language import Dataset, repeated_random


def pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


@torch.no_grad()
def attention_patterns(model: nn.Module, tokens: Tensor) -> Tensor:
    """``[n_layers, batch, head, query, key]`` attention probabilities on ``tokens``."""
    names = {pattern_name(layer) for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[pattern_name(layer)] for layer in range(model.cfg.n_layers)])


def prev_token_score(pattern: Tensor) -> Tensor:
    """``[..., head]``: mean of ``pattern[..., q, q - 1]`` over the batch and ``q >= 1``.

    ``pattern``: ``[..., batch, head, query, key]``.
    """
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(-3, -1))


def induction_score(pattern: Tensor, half: int) -> Tensor:
    """``[..., head]``: mean of ``pattern[..., q, q - half + 1]`` over the batch and
    ``half <= q < 2 half``, for sequences of a ``half``-token block written twice."""
    if pattern.shape[-2] < 2 * half or half < 1:
        raise ValueError(f"pattern has {pattern.shape[-2]} queries; need 2 * half = {2 * half}")
    diag = pattern.diagonal(offset=1 - half, dim1=-2, dim2=-1)  # q = j + half - 1, k = j
    return diag[..., 1:half + 1].mean(dim=(-3, -1))


@dataclass
class HeadScores:
    """``[n_layers, n_heads]`` scores; read ``prev_token[0]`` and ``induction[1]``."""

    prev_token: Tensor
    induction: Tensor


def head_scores(model: nn.Module, n_sequences: int = 64, half: int | None = None,
                seed: int = 0, n_text: int = 56) -> HeadScores:
    """Previous-token and induction scores of every head on repeated random sequences."""
    half = model.cfg.n_ctx // 2 if half is None else half
    tokens = repeated_random(n_sequences, half=half, seed=seed, n_text=n_text)
    pat = attention_patterns(model, tokens)
    return HeadScores(prev_token=prev_token_score(pat), induction=induction_score(pat, half))


@torch.no_grad()
def ablation_effects(model: nn.Module, data: Dataset, type_name: str = "induction",
                     mode: str = "zero", batch: int = 512) -> tuple[Tensor, float]:
    """``([n_layers, n_heads] loss increase, clean loss)`` on the predicted tokens labelled
    ``type_name`` when one head's ``hook_z`` output is zeroed (``mode="zero"``) or replaced by
    its mean over the batch and positions (``mode="mean"``)."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean'; got {mode!r}")
    mask = data.target_types == data.type_names.index(type_name)
    if not mask.any():
        raise ValueError(f"no predicted tokens of type {type_name!r}")
    cfg = model.cfg

    def loss(hooks) -> float:
        out = []
        for t in data.tokens.split(batch):
            out.append(observables.token_losses(model.run_with_hooks(t, fwd_hooks=hooks), t))
        return float(torch.cat(out)[mask].mean())

    means = {}
    if mode == "mean":
        names = {z_name(layer) for layer in range(cfg.n_layers)}
        _, cache = model.run_with_cache(data.tokens, names_filter=lambda n: n in names)
        means = {n: cache[n].mean(dim=(0, 1)) for n in names}  # [head, d_head]

    clean = loss([])
    effects = torch.zeros(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            name = z_name(layer)

            def hook(z, hook, h=h, name=name):
                # use our name, not hook.name: a TransformerBridge calls its hook_z an alias
                z = z.clone()
                z[:, :, h] = 0.0 if mode == "zero" else means[name][h]
                return z

            effects[layer, h] = loss([(name, hook)]) - clean
    return effects, clean
