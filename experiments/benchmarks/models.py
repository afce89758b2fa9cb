"""Benchmark models and data shared by ``step_cost.py`` and ``vs_devinterp.py`` (plain torch).

- ``mlp``: 64-128-128-10 ReLU MLP on Gaussian inputs with random labels; per-sample
  cross-entropy.
- ``transformer``: 2-layer pre-LN causal transformer (vocab 64, d_model 64, 4 heads,
  d_mlp 256, context 32) on random token sequences of 33 tokens; per-sample loss = mean
  next-token cross-entropy over the 32 predicted positions.

Every ``Task`` carries the model, a training set, a fixed batch of ``batch`` samples (the
first ones) and ``loss_fn(model, batch) -> [batch]`` per-sample losses, the signature
``suscept.sample`` takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)
                   for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 64, d_model: int = 64, n_heads: int = 4, n_layers: int = 2,
                 d_mlp: int = 256, ctx: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(0.02 * torch.randn(ctx, d_model))
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def per_token_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Next-token cross-entropy ``[batch, seq - 1]`` of sequences ``[batch, seq]``."""
    logits = model(input_ids[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")


def lm_loss(model: nn.Module, input_ids: Tensor) -> Tensor:
    """Per-sample loss ``[batch]``: mean next-token cross-entropy of each sequence."""
    return per_token_loss(model, input_ids).mean(-1)


def mlp_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


@dataclass
class Task:
    name: str
    model: nn.Module
    data: object  # training set (suscept batch: tensor or tuple of tensors)
    batch: object  # a fixed batch of ``batch_size`` samples (the first ones of ``data``)
    loss_fn: Callable[[nn.Module, object], Tensor]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def mlp_task(batch: int = 128, n: int = 4096, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    x = torch.randn(n, 64, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Task("mlp 64-128-128-10", model, (x, y), (x[:batch], y[:batch]), mlp_loss)


def transformer_task(batch: int = 64, n: int = 2048, seq: int = 32, vocab: int = 64,
                     seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Transformer(vocab=vocab, ctx=seq)
    ids = torch.randint(0, vocab, (n, seq + 1), generator=g)
    return Task("transformer 2L d64", model, ids, ids[:batch], lm_loss)


TASKS = {"mlp": mlp_task, "transformer": transformer_task}
