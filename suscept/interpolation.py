"""The spring-only susceptibility by the Gaussian interpolation identity: gradients instead of
products of draws.

For ``d ~ N(0, S)`` (``S = diag(s^2)``), an independent copy ``d'`` and ``z_t = t d +
sqrt(1 - t^2) d'`` (so that ``(d, z_t)`` is Gaussian with correlation ``t``), any smooth ``f, g``
whose gradients have finite second moments satisfy (Houdre and Perez-Abreu 1995; Chatterjee
2014, chapter 2; docs/theory.md section 5)::

    Cov(f(d), g(d)) = int_0^1 E[grad f(d)^T S grad g(z_t)] dt                         (1)

so with ``t ~ U(0, 1)`` drawn with ``d, d'``, one draw of ``Q = grad f(d)^T S grad g(z_t)`` is an
unbiased estimate of the covariance. The spring-only susceptibility (docs/theory.md sections 2
and 5) is ``chi0[x, k] = -Cov0(phi_k, y_kx)`` under ``w = mu + d``
(:func:`suscept.spring.stationary`), with ``phi_k(w) = Lbar_S(w^k) - Lbar_S(w*)``, ``y_kx(w) =
l_x(w^k) - Lbar_S(w^k)`` and ``w^k = w* + M_k (w - w*)``. Then ``grad_d phi_k = M_k grad
Lbar_S(w^k)`` and, with ``v_k = S M_k grad Lbar_S(w^k(mu + d))``::

    Q_kx = d/de y_kx(mu + z_t + e v_k) at e = 0                                       (2)

one forward-mode derivative (JVP) of all probe tokens' losses per component. Each pair of
draws uses ``(d, d', t)`` and its mirror ``(-d, -d', t)`` (the same law, so the same
expectation) and averages them: that cancels the parts of ``Q`` odd in ``d``. Pairs are
i.i.d., so the estimate is their mean and its standard error their standard deviation over
``sqrt(pairs)``. The estimand is ``Cov0`` exactly, as the plain i.i.d. or antithetic base's.

Why it has little noise: where the observables are close to linear in ``d`` their gradients are
close to constant and ``Q`` to the first-order term ``s^2 (M_k grad Lbar_S(w*)) . a_x``
(:func:`suscept.pathwise.first_order_susceptibility`), deterministic; the noise comes only from
how the gradients vary over the spring's law. A product of two draws' values instead carries
``O(1)`` relative noise however linear the observables are, since it samples one direction
``d`` of a ``d``-dimensional law where (2) contracts whole gradient vectors.

Costs per pair: ``2 K`` forward-backward passes and ``2 K`` JVPs of the probe (``K``
components); memory ``O(d + X)`` (no token Jacobian, no evaluation plan).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from suscept import data as batches
from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.model import FlatModule, build_mask, private_copy
from suscept.spring import stationary

TokenLoss = Callable[[nn.Module, batches.Batch], Tensor]


def restricted_gradients(fm: FlatModule, token_loss: TokenLoss, probe: batches.Batch,
                         masks: Tensor, anchor: Tensor, point: Tensor) -> Float[Tensor, "K d"]:
    """``[K, d]`` (float64): ``M_k * grad Lbar_S(w^k)``, ``w^k = anchor + M_k (point -
    anchor)``, one forward-backward pass of the probe per component (``masks [K, d]``, 0/1).
    Leaves ``fm``'s parameters at the last restricted point."""
    out = []
    for m in masks:
        with torch.no_grad():
            fm.params.copy_(anchor + m * (point - anchor))
        fm.grad.zero_()
        token_loss(fm.module, probe).mean().backward()
        out.append((fm.grad * m).double())
    return torch.stack(out)


class _Bound(nn.Module):
    """``forward() = token_loss(inner, probe)``: lets ``torch.func.functional_call`` replace the
    inner module's parameters for one call."""

    def __init__(self, inner: nn.Module, token_loss: TokenLoss, probe: batches.Batch):
        super().__init__()
        self.inner, self.token_loss, self.probe = inner, token_loss, probe

    def forward(self) -> Tensor:
        return self.token_loss(self.inner, self.probe)


class InterpolationBase:
    """Draws mirrored pairs of the spring-only law and yields each pair's ``Q [K, X]`` (float64;
    module docstring); ``seconds`` holds the CPU time of the gradients and of the JVPs."""

    def __init__(self, model: nn.Module, config, token_loss: TokenLoss, probe: batches.Batch,
                 masks: Sequence[Mapping[str, bool | Tensor]]):
        if config.precondition is not None:
            raise ConfigError("the interpolation estimator needs plain SGLD "
                              "(precondition=None): the spring-only law is N(mu, s^2) only then")
        self.fm = private_copy(model)
        self.anchor = self.fm.params.detach().clone()
        self.mu, sd = stationary(config, self.anchor)
        self.sd, self.var = sd, sd.double() ** 2
        self.masks = torch.stack([build_mask(self.fm, m) for m in masks]).to(self.anchor.dtype)
        self.config, self.token_loss, self.probe = config, token_loss, probe
        self.bound = _Bound(self.fm.module, token_loss, probe)
        self.slices = list(self.fm.slices().values())
        self.seconds = {"gradient": 0.0, "jvp": 0.0}

    def _y(self, flat: Tensor) -> Tensor:
        """``[X]``: ``l_x - Lbar_S`` at the flat parameters ``flat`` (functional)."""
        params = {f"inner.{n}": flat[s].view(shape) for n, s, shape in
                  zip(self.fm.names, self.slices, self.fm.shapes)}
        loss = torch.func.functional_call(self.bound, params, ()).flatten()
        return loss - loss.mean()

    def q(self, d: Tensor, z: Tensor) -> Tensor:
        """``[K, X]``: ``Q_kx`` of (2) for the draw ``d`` and its interpolant ``z``."""
        t0 = time.process_time()
        v = restricted_gradients(self.fm, self.token_loss, self.probe, self.masks,
                                 self.anchor, self.mu + d) * self.var
        t1 = time.process_time()
        rows = []
        with torch.no_grad():
            for m, vk in zip(self.masks, v):
                point = self.anchor + m * (self.mu + z - self.anchor)
                _, dy = torch.func.jvp(self._y, (point,), (vk.to(point.dtype),))
                rows.append(dy.double())
        self.seconds["gradient"] += t1 - t0
        self.seconds["jvp"] += time.process_time() - t1
        return torch.stack(rows)

    def pairs(self, chain: int, n_pairs: int):
        """Yield ``n_pairs`` mirrored pair means ``(Q(d, z_t) + Q(-d, -z_t)) / 2 [K, X]`` of
        chain ``chain`` (``d, d', t`` from the noise of ``(config.seed, chain)``)."""
        from suscept.sample import chain_generators

        noise, _ = chain_generators(self.config.seed, chain, self.anchor.device)
        shape, dtype, dev = self.mu.shape, self.mu.dtype, self.mu.device
        for _ in range(n_pairs):
            d = self.sd * torch.randn(shape, generator=noise, dtype=dtype, device=dev)
            d2 = self.sd * torch.randn(shape, generator=noise, dtype=dtype, device=dev)
            t = float(torch.rand((), generator=noise, dtype=torch.float64, device=dev))
            z = t * d + (1 - t * t) ** 0.5 * d2
            yield (self.q(d, z) + self.q(-d, -z)) / 2
        with torch.no_grad():
            self.fm.params.copy_(self.anchor)


class MeanSums:
    """Streamed sum and sum of squares of i.i.d. ``[K, X]`` values (float64, about the first
    value): their mean and its standard error without keeping any value."""

    def __init__(self, shift: Tensor | None = None):
        self.n, self.shift, self.s, self.ss = 0, shift, 0.0, 0.0

    def add(self, q: Tensor) -> None:
        if self.shift is None:
            self.shift = q.clone()
        c = q - self.shift
        self.s, self.ss, self.n = self.s + c, self.ss + c * c, self.n + 1

    def merge(self, other: MeanSums) -> MeanSums:
        if other.shift is not self.shift:
            raise ConfigError("MeanSums can only be merged when they share their shift: start "
                              "the second with MeanSums(shift=first.shift)")
        out = MeanSums(self.shift)
        out.n, out.s, out.ss = self.n + other.n, self.s + other.s, self.ss + other.ss
        return out

    def result(self) -> tuple[Tensor, Tensor, dict]:
        """``(mean [K, X], stderr [K, X], parts)``; ``parts["var_pair"]``: the per-value
        variance, median over entries."""
        if self.n < 2:
            raise ConfigError("the interpolation estimator needs at least 2 pairs")
        mean = self.s / self.n
        var = ((self.ss - self.n * mean * mean) / (self.n - 1)).clamp(min=0)
        return self.shift + mean, (var / self.n).sqrt(), {"n_pairs": self.n,
                                                         "var_pair": float(var.median())}


def interpolation_susceptibility(model: nn.Module, config, token_loss: TokenLoss,
                                 probe: batches.Batch,
                                 masks: Sequence[Mapping[str, bool | Tensor]], *,
                                 progress: bool = True) -> Estimate:
    """The spring-only susceptibility ``chi0 [token, component]`` (``-Cov0``, docs/theory.md
    section 5; ``< 0``: token x lowers the component's loss) by the interpolation identity
    (module docstring): the same estimand as :func:`suscept.pathwise.pathwise_susceptibility`
    and the i.i.d. base of :func:`suscept.spring_sample`.

    Args:
        model: the module at w* (copied, never modified).
        config: the run's SamplerConfig (plain SGLD): its law; ``n_chains`` x ``n_draws / 2``
            mirrored pairs (``n_draws`` even; a pair costs ``2 K`` forward-backward passes and
            ``2 K`` JVPs of the probe) from the noise of ``(seed, chain)``: give it a seed
            other than the run's.
        token_loss: ``f(module, batch) -> [batch, ...]`` the per-token losses (flattened they
            index ``X``); it must be differentiable in forward mode (``torch.func.jvp``).
        probe: the probe batch; masks: one parameter mask per component.
    Returns:
        An Estimate ``[token, component]``; ``meta`` holds ``split_half`` (per component, the
        Spearman between the standardized columns of the two halves of the chains, with two or
        more chains), ``var_pair`` (the per-pair variance, median over entries), the CPU
        seconds of the gradients and the JVPs, and the law (for
        :func:`suscept.coupled_susceptibility`, which takes this matrix as its base).
    """
    from suscept.pathwise import chi0_from_pairs

    if config.n_draws % 2:
        raise ConfigError(f"mirrored pairs: n_draws={config.n_draws} must be even")
    base = InterpolationBase(model, config, token_loss, probe, masks)
    n_pairs = config.n_draws // 2
    return chi0_from_pairs(lambda c: base.pairs(c, n_pairs), config, n_pairs, MeanSums,
                           what="interpolation", progress=progress,
                           meta={"seconds": base.seconds})
