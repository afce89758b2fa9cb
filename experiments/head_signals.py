"""Per-head ground truth and cheap signals at w*, independent of any SGLD run.

All functions take a TransformerLens ``HookedTransformer`` with attention hooks
(``blocks.{l}.attn.hook_z [batch, pos, head, d_head]``, ``hook_k``, ``hook_resid_pre``) and a
:class:`experiments.zoo.language.Dataset`; ``L`` is the mean next-token loss on the predicted
tokens labelled ``type_name``. Every result is ``[n_layers, n_heads]``, positive = the head
helps (removing it raises ``L``). The model is left unchanged: hooks live inside the call and
no ``.grad`` is written.

- :func:`attribution_patching`: the first-order estimate of the mean-ablation effect,
  ``sum_{b,p} (mean_z - z) . dL/dz`` (Nanda 2023, "Attribution patching");
- :func:`gradient_norm`: ``|| dL/dtheta_h ||`` over the head's own parameters ``W_Q, W_K, W_V,
  W_O, b_Q, b_K, b_V`` (its slice ``h``), the gradient-norm signal;
- :func:`token_fisher`: ``mean_x || d l_x / dtheta_h ||^2`` over the same slices, the per-head
  trace of the tokens' empirical Fisher (the linear part of the spring-only fluctuation);
- per token rather than per token type: :func:`token_ablation` (each token's own
  mean-ablation effect, the per-token ground truth) and :func:`per_token_gradients` (each
  token's Fisher trace and attribution-patching score per head);
- :func:`key_path_patching`: path patching (Wang et al. 2023, "Interpretability in the wild",
  ICLR; Goldowsky-Dill et al. 2023, arXiv:2304.05969) of the previous-token -> induction
  composition: the head's output is mean-ablated *only in the key input* of every later layer's
  heads, ``k_r = LN1_r(resid_pre_r + delta) W_K_r + b_K_r`` with ``delta[b, p] = (mean_z -
  z[b, p]) W_O[h]``; queries, values and the residual stream keep the clean head. The effect is
  ``L(patched) - L(clean)``; heads of the last layer (no later keys) get ``nan``.

:func:`truth_reliability` measures how reproducible such a ground truth is over random halves
of its own data (the ceiling it puts on any signal's agreement with it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import observables as ob
from experiments.zoo.heads import z_name
from experiments.zoo.language import Dataset
from suscept.susceptibilities import spearman

ROLE_SCORE = 0.3
KEY_PATH_CHECK = 1e-4  # nats: the recomputed keys must reproduce the clean loss


@torch.no_grad()
def mean_z(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    """``{hook_z name: [head, d_head]}`` means over batch and positions."""
    names = {z_name(layer) for layer in range(model.cfg.n_layers)}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return {n: cache[n].mean(dim=(0, 1)) for n in names}


def _mask(data: Dataset, type_name: str) -> Tensor:
    return data.target_types == data.type_names.index(type_name)


def attribution_patching(model: nn.Module, data: Dataset, type_name: str) -> Tensor:
    """``[n_layers, n_heads]``: ``sum_{b,p} (mean_z - z) . dL/dz`` per head."""
    means = mean_z(model, data.tokens)
    names = [z_name(layer) for layer in range(model.cfg.n_layers)]
    saved: dict[str, Tensor] = {}

    def keep(z, hook, name):
        saved[name] = z
        return z

    hooks = [(n, lambda z, hook, n=n: keep(z, hook, n)) for n in names]
    logits = model.run_with_hooks(data.tokens, fwd_hooks=hooks)
    loss = ob.token_losses(logits, data.tokens)[_mask(data, type_name)].mean()
    zs = [saved[n] for n in names]
    grads = torch.autograd.grad(loss, zs)
    return torch.stack([((means[n] - z.detach()) * g).sum(dim=(0, 1, 3))
                        for n, z, g in zip(names, zs, grads)]).detach()


HEAD_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


def gradient_norm(model: nn.Module, data: Dataset, type_name: str) -> Tensor:
    """``[n_layers, n_heads]``: ``|| dL/dtheta_h ||_2`` over the head's slices of
    ``HEAD_PARAMS`` (first dim = head in TransformerLens' layout)."""
    params = [getattr(model.blocks[layer].attn, p) for layer in range(model.cfg.n_layers)
              for p in HEAD_PARAMS]
    loss = ob.token_losses(model(data.tokens), data.tokens)[_mask(data, type_name)].mean()
    grads = torch.autograd.grad(loss, params)
    sq = torch.stack([g.detach().pow(2).flatten(1).sum(1) for g in grads])
    return sq.reshape(model.cfg.n_layers, len(HEAD_PARAMS), -1).sum(1).sqrt()



def token_fisher(model: nn.Module, data: Dataset, type_name: str, batch: int = 8) -> Tensor:
    """``[n_layers, n_heads]``: ``mean_x || d l_x / d theta_h ||^2`` over the predicted tokens
    ``x`` labelled ``type_name``, ``theta_h`` the head's slices of ``HEAD_PARAMS`` (the
    per-head trace of the empirical Fisher of those tokens). Unlike :func:`gradient_norm`
    (the norm of the *mean* gradient, where tokens' gradients cancel) it adds the tokens'
    squared gradients; it is the first-order (linear) part of the spring-only fluctuation
    ``Var_0(l_x(w^C)) / s^2`` for ``C`` = the head."""
    return per_token_gradients(model, data, _mask(data, type_name), batch=batch)[
        "fisher"].mean(0)


def per_token_gradients(model: nn.Module, data: Dataset, mask: Tensor | None = None,
                        means: dict[str, Tensor] | None = None, batch: int = 8
                        ) -> dict[str, Tensor]:
    """Per predicted token ``x`` (the rows of ``mask [B, pos - 1]``, default all, in
    ``(sequence, position)`` order) and head ``h``, from one backward pass per token:

    - ``"fisher"`` ``[n, n_layers, n_heads]``: ``|| d l_x / d theta_h ||^2`` over the head's
      slices of ``HEAD_PARAMS`` (:func:`token_fisher` is its mean over a token type);
    - ``"patching"`` ``[n, n_layers, n_heads]``: ``sum_p (mean_z - z_p) . d l_x / d z_p``
      over the positions ``p`` of x's sequence, the first-order estimate of ``x``'s own
      mean-ablation effect (:func:`token_ablation`); positive = the head helps ``x``.

    ``means``: the ``hook_z`` means to ablate towards (default :func:`mean_z` of ``data``).
    The model is left unchanged and no ``.grad`` is written."""
    cfg = model.cfg
    mask = torch.ones_like(data.target_types, dtype=torch.bool) if mask is None else mask
    means = mean_z(model, data.tokens) if means is None else means
    names = [z_name(layer) for layer in range(cfg.n_layers)]
    params = [getattr(model.blocks[layer].attn, p) for layer in range(cfg.n_layers)
              for p in HEAD_PARAMS]
    saved: dict[str, Tensor] = {}

    def keep(z, hook, name):
        saved[name] = z
        return z

    hooks = [(n, lambda z, hook, n=n: keep(z, hook, n)) for n in names]
    fisher, patching = [], []
    for i in range(0, len(data), batch):
        rows = mask[i:i + batch].nonzero()
        if not len(rows):
            continue
        tokens = data.tokens[i:i + batch]
        losses = ob.token_losses(model.run_with_hooks(tokens, fwd_hooks=hooks), tokens)
        picked = losses[rows[:, 0], rows[:, 1]]
        zs = [saved[n] for n in names]
        eye = torch.eye(len(picked), dtype=picked.dtype)
        grads = torch.autograd.grad(picked, params + zs, grad_outputs=eye,
                                    is_grads_batched=True)
        sq = torch.stack([g.detach().double().pow(2).flatten(2).sum(2)
                          for g in grads[:len(params)]], 1)  # [n, L * P, H]
        fisher.append(sq.reshape(len(picked), cfg.n_layers, len(HEAD_PARAMS), -1).sum(2))
        # token x's gradient is nonzero only in its own sequence
        patching.append(torch.stack(
            [((means[n] - z.detach()).double()[None] * g.detach().double()).sum((1, 2, 4))
             for n, z, g in zip(names, zs, grads[len(params):])], 1))
    if not fisher:
        raise ValueError("the mask selects no predicted token")
    return {"fisher": torch.cat(fisher).float(), "patching": torch.cat(patching).float()}


@torch.no_grad()
def token_ablation(model: nn.Module, data: Dataset, means: dict[str, Tensor] | None = None,
                   batch: int = 512) -> Tensor:
    """``[B, pos - 1, n_layers, n_heads]``: each predicted token's own mean-ablation effect,
    ``l_x(z_h -> mean_z_h) - l_x`` (nats; positive = the head helps ``x``), ``means`` the
    ``hook_z`` means to ablate towards (default :func:`mean_z` of ``data``, as
    :func:`experiments.zoo.heads.ablation_effects` with ``mode="mean"``, whose per-type value
    is this one's mean over the type's tokens)."""
    cfg = model.cfg
    means = mean_z(model, data.tokens) if means is None else means

    def losses(hooks) -> Tensor:
        return torch.cat([ob.token_losses(model.run_with_hooks(t, fwd_hooks=hooks), t)
                          for t in data.tokens.split(batch)])

    clean = losses([])
    out = torch.zeros(*clean.shape, cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        name = z_name(layer)
        for h in range(cfg.n_heads):
            def hook(z, hook, h=h, name=name):
                z = z.clone()
                z[:, :, h] = means[name][h]
                return z

            out[..., layer, h] = losses([(name, hook)]) - clean
    return out


@torch.no_grad()
def key_path_patching(model: nn.Module, data: Dataset, type_name: str = "induction"
                      ) -> Tensor:
    """``[n_layers, n_heads]``: loss increase on ``type_name`` tokens when a head is
    mean-ablated only in the keys of every later layer (module docstring); ``nan`` in the last
    layer. Raises ``RuntimeError`` when the recomputed keys do not reproduce the clean loss
    (a positional scheme or normalization the recomputation does not cover)."""
    cfg = model.cfg
    tokens, mask = data.tokens, _mask(data, type_name)
    names = [z_name(layer) for layer in range(cfg.n_layers)]
    means = mean_z(model, tokens)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in set(names))

    def loss_with(delta: Tensor | None, receivers: range) -> float:
        resid: dict[int, Tensor] = {}

        def save(x, hook, layer):
            resid[layer] = x
            return x

        def keys(k, hook, layer):
            x = resid[layer] if delta is None else resid[layer] + delta
            attn = model.blocks[layer].attn
            return torch.einsum("bpd,hdk->bphk", model.blocks[layer].ln1(x),
                                attn.W_K) + attn.b_K

        hooks = []
        for r in receivers:
            hooks += [(f"blocks.{r}.hook_resid_pre", lambda x, hook, r=r: save(x, hook, r)),
                      (f"blocks.{r}.attn.hook_k", lambda k, hook, r=r: keys(k, hook, r))]
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        return float(ob.token_losses(logits, tokens)[mask].mean())

    clean = float(ob.token_losses(model(tokens), tokens)[mask].mean())
    recomputed = loss_with(None, range(1, cfg.n_layers))
    if abs(recomputed - clean) > KEY_PATH_CHECK:
        raise RuntimeError(f"key_path_patching: recomputed keys give loss {recomputed:.6f}, "
                           f"clean {clean:.6f}; this model's keys are not LN1(resid) W_K + b_K")
    out = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
    for layer in range(cfg.n_layers - 1):
        z = cache[names[layer]]
        w_o = model.blocks[layer].attn.W_O  # [head, d_head, d_model]
        for h in range(cfg.n_heads):
            delta = (means[names[layer]][h] - z[:, :, h]) @ w_o[h]
            out[layer, h] = loss_with(delta, range(layer + 1, cfg.n_layers)) - clean
    return out


def roles_of(scores, layers: list[int], n_heads: int) -> list[str]:
    """Ground-truth role per head from attention scores (:func:`experiments.zoo.heads.
    head_scores`): ``induction`` when its induction score is at least ``ROLE_SCORE`` (layer >=
    1), else ``previous-token`` when its previous-token score is, else ``other``."""
    out = []
    for i, layer in enumerate(layers):
        h = i % n_heads
        if layer >= 1 and float(scores.induction[layer, h]) >= ROLE_SCORE:
            out.append("induction")
        elif float(scores.prev_token[layer, h]) >= ROLE_SCORE:
            out.append("previous-token")
        else:
            out.append("other")
    return out


def truth_reliability(signal, model: nn.Module, data: Dataset, n_splits: int = 20,
                      seed: int = 0) -> dict[int, dict[str, float]]:
    """How reproducible a per-head ground truth is across its own data, per layer.

    ``signal(model, data) -> [n_layers, n_heads]`` (e.g. ``lambda m, d: ablation_effects(m, d,
    "induction", mode="mean")[0]`` or :func:`key_path_patching`) is computed on two random
    halves of ``data``'s sequences, ``n_splits`` times; per layer, ``half`` is the mean
    within-layer Spearman between the halves, ``reliability`` its Spearman-Brown step-up to
    the whole set, ``R = 2 r / (1 + r)``, and ``ceiling = sqrt(R)``: about the largest
    within-layer Spearman any signal, however exact, can reach against the whole set's ranking
    (the ranking's own sampling noise attenuates it). Layers where the signal is all NaN (key
    paths of the last layer) are left out."""
    g = torch.Generator().manual_seed(seed)
    n = len(data)
    rhos: dict[int, list[float]] = {}
    for _ in range(n_splits):
        perm = torch.randperm(n, generator=g)
        a, b = (signal(model, data[perm[i::2]]).double() for i in (0, 1))
        for layer in range(a.shape[0]):
            if torch.isnan(a[layer]).all():
                continue
            r = spearman(a[layer][:, None], b[layer][:, None])[0]
            rhos.setdefault(layer, []).append(float(r))
    out = {}
    for layer, rs in rhos.items():
        r = sum(rs) / len(rs)
        big = 2 * r / (1 + r) if r > -1 else float("nan")
        out[layer] = {"half": r, "reliability": big,
                      "ceiling": max(big, 0.0) ** 0.5}
    return out
