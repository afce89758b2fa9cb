"""The spring-only (``n_beta -> 0``) susceptibility with less noise: antithetic i.i.d. draws, a
linear control variate and its Stein (pathwise) correction.

Under the spring-only stationary law ``w = mu + d``, ``d ~ N(0, diag(s^2))``
(:func:`suscept.spring.stationary`), the one-run susceptibility (docs/theory.md section 5) of
component ``C_k`` (parameter mask ``M_k``, restricted point ``w^k = w* + M_k (w - w*)``) is
``chi0[x, k] = -Cov0(phi_k, y_kx)`` with ``phi_k(w) = Lbar_S(w^k) - Lbar_S(w*)`` and
``y_kx(w) = l_x(w^k) - Lbar_S(w^k)`` (``l_x`` the probe's per-token losses, ``Lbar_S`` their
mean). With antithetic pairs ``w = mu +- d``, even and odd parts ``e, o`` (:func:`odd_even`)::

    Cov0(phi, y) = Cov(e_phi, e_y) + E[o_phi o_y]                                   (1)

Let ``a_x = grad (l_x - Lbar_S)(w*)`` (fixed) and ``u_kx = (M_k * d) . a_x``, odd and linear in
``d``. Split ``o_y = (o_y - u) + u``. Stein's identity for a Gaussian (``E[f(d) d_i] = s_i^2
E[d_i f(d)]``, exact for any smooth ``f`` with finite moments) turns the second part into a
derivative::

    E[o_phi_k u_kx] = E[phi_k u_kx] = E[(s^2 * M_k * g_k) . a_x],
    g_k = (grad Lbar_S(w^k_+) + grad Lbar_S(w^k_-)) / 2                             (2)

(the even part of ``phi_k``'s gradient over the pair). Hence the estimator, per pair ``j``::

    Cov0 = C_pairs(e_phi, e_y) + mean_j o_phi (o_y - u) + mean_{j in G} (s^2 M_k g_k) . a_x

the last mean over a subset ``G`` of the pairs (every ``grad_every``-th): it is exact in
expectation whatever the subset, and its variance is small (the odd, linear-in-``d`` part of
the gradient cancels within a pair), so few gradient pairs suffice. Every term has the plain
antithetic estimator's expectation (1): the same estimand, ``Cov0`` exactly, with less noise
where the observables' odd parts are close to linear (``o_y - u`` small). Pairs are i.i.d., so
standard errors are the plain ones of the means (``C_pairs`` with its mean plugged in); both
come from streamed raw-moment sums (:class:`Sums`), nothing per pair is kept.

Costs per pair: two evaluations (as the antithetic base), one product ``[K, X] x d`` with the
token Jacobian ``A [X, d]`` (computed once at ``w*``, ``X d`` floats: meant for small models and
probes), and on gradient pairs ``2 K`` forward-backward passes of the probe loss.

:func:`first_order_susceptibility` gives the leading term of ``chi0`` in the spring's noise,
``-Cov0`` of the linearized observables, ``chi1[x, k] = -(s^2 * M_k * grad Lbar_S(w*)) . a_x``:
deterministic (no draws), exact for observables linear in ``w``, ``chi0 - chi1 = O(s^4)``. How
much of a matrix it explains says how far the matrix is first-order geometry at w* (a
restricted gradient alignment) rather than the curvature and higher-order response.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from suscept import data as batches
from suscept.errors import ConfigError
from suscept.estimate import Estimate
from suscept.interpolation import restricted_gradients
from suscept.model import FlatModule, build_mask, private_copy
from suscept.spring import stationary

TokenLoss = Callable[[nn.Module, batches.Batch], Tensor]
MAX_JACOBIAN = 2 * 10**8  # entries of A [X, d]


def check_jacobian_size(fm: FlatModule, token_loss: TokenLoss, probe: batches.Batch,
                        advice: str = "") -> None:
    """Refuse a token Jacobian ``[X, d]`` above ``MAX_JACOBIAN`` entries (before building it)."""
    with torch.no_grad():
        x = token_loss(fm.module, batches.index(probe, torch.tensor([0]))).numel() \
            * batches.n_samples(probe, "probe")
    if x * fm.params.numel() > MAX_JACOBIAN:
        raise ConfigError(f"the token Jacobian would hold {x} x {fm.params.numel()} entries "
                          f"(> {MAX_JACOBIAN:.0e}): use fewer probe tokens {advice}".rstrip())


def token_jacobian(fm: FlatModule, token_loss: TokenLoss, probe: batches.Batch
                   ) -> Float[Tensor, "X d"]:
    """``A [X, d]`` (float32): rows ``grad (l_x - Lbar_S)`` at ``fm``'s parameters, ``l [X]`` the
    flattened ``token_loss(module, probe)`` (per sample ``[n, ...]``), one sample at a time."""
    n = batches.n_samples(probe, "probe")
    rows = []
    params = [p for p in fm.module.parameters() if p.requires_grad]  # fm.params' order
    for i in range(n):
        loss = token_loss(fm.module, batches.index(probe, torch.tensor([i]))).flatten()
        eye = torch.eye(loss.numel(), dtype=loss.dtype, device=loss.device)
        grads = torch.autograd.grad(loss, params, grad_outputs=eye, is_grads_batched=True,
                                    allow_unused=True)
        rows.append(torch.cat([(g.reshape(len(eye), -1) if g is not None else
                                torch.zeros(len(eye), p.numel(), device=p.device)).float()
                               for g, p in zip(grads, params)], 1))
    jac = torch.cat(rows)
    return jac - jac.mean(0)


@dataclass
class PairTerms:
    """One antithetic pair's terms of the module docstring (float64): ``e_phi, o_phi [K]``,
    ``e_y, r [K, X]`` (``r = o_y - u``) and, on gradient pairs, ``path [K, X]``."""

    e_phi: Tensor
    o_phi: Tensor
    e_y: Tensor
    r: Tensor
    path: Tensor | None


class PathwiseBase:
    """Draws antithetic spring-only pairs and yields :class:`PairTerms` (see
    :func:`pathwise_susceptibility`); ``seconds`` holds the CPU-time parts."""

    def __init__(self, model: nn.Module, config, evaluate, token_loss: TokenLoss,
                 probe: batches.Batch, masks: Sequence[Mapping[str, bool | Tensor]], *,
                 keys: tuple[str, str] = ("phi", "restricted_token_loss")):
        if config.precondition is not None:
            raise ConfigError("the pathwise spring-only estimator needs plain SGLD "
                              "(precondition=None): its law is N(mu, s^2) only then")
        self.fm = private_copy(model)
        self.anchor = self.fm.params.detach().clone()
        self.mu, sd = stationary(config, self.anchor)
        self.sd, self.var = sd, (sd.double() ** 2)
        self.masks = torch.stack([build_mask(self.fm, m) for m in masks]).to(self.anchor.dtype)
        check_jacobian_size(self.fm, token_loss, probe, "or the plain antithetic base "
                                                        "(suscept.spring_sample)")
        self.config, self.evaluate, self.keys = config, evaluate, keys
        self.token_loss, self.probe = token_loss, probe
        t0 = time.process_time()
        jac = token_jacobian(self.fm, token_loss, probe)
        self.support = [m.nonzero()[:, 0] for m in self.masks]
        self.blocks = [jac[:, i].contiguous() for i in self.support]  # A restricted to M_k
        self.seconds = {"jacobian": time.process_time() - t0, "evaluate": 0.0, "linear": 0.0,
                        "gradient": 0.0}

    @contextmanager
    def _clock(self, part: str):
        t0 = time.process_time()
        yield
        self.seconds[part] += time.process_time() - t0

    def _values(self, sign: int, d: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            self.fm.params.copy_(self.mu + sign * d)
            v = self.evaluate(self.fm.module)
        return v[self.keys[0]].double(), v[self.keys[1]].double()

    def _grads(self, sign: int, d: Tensor) -> Tensor:
        """``[K, d]``: ``M_k * grad Lbar_S(w^k)`` at ``w = mu + sign d``."""
        return restricted_gradients(self.fm, self.token_loss, self.probe, self.masks,
                                    self.anchor, self.mu + sign * d)

    def _apply(self, v: Tensor) -> Tensor:
        """``[K, X]``: ``(M_k * v_k) . a_x`` for ``v [K, d]`` (the 0/1 mask as the support's
        columns; float32 products, float64 out)."""
        return torch.stack([a @ vk[i].float() for a, vk, i in
                            zip(self.blocks, v, self.support)]).double()

    def pairs(self, chain: int, n_pairs: int, grad_every: int):
        """Yield ``n_pairs`` PairTerms of chain ``chain`` (noise of ``(config.seed, chain)``)."""
        from suscept.sample import chain_generators

        noise, _ = chain_generators(self.config.seed, chain, self.anchor.device)
        for j in range(n_pairs):
            d = self.sd * torch.randn(self.mu.shape, generator=noise, dtype=self.mu.dtype,
                                      device=self.mu.device)
            with self._clock("evaluate"):
                (phi_p, y_p), (phi_m, y_m) = self._values(1, d), self._values(-1, d)
            with self._clock("linear"):
                u = self._apply(d.expand(len(self.masks), -1))
            path = None
            if j % grad_every == 0:
                with self._clock("gradient"):
                    path = self._apply((self._grads(1, d) + self._grads(-1, d)) / 2 * self.var)
            yield PairTerms((phi_p + phi_m) / 2, (phi_p - phi_m) / 2, (y_p + y_m) / 2,
                            (y_p - y_m) / 2 - u, path)
        self.fm.params.copy_(self.anchor)


class Sums:
    """Streamed sums of pair terms (raw moments about a shift, the first pair's ``e_phi, e_y``
    unless given; float64): enough for the estimate and its i.i.d. standard error without
    keeping any pair."""

    KEYS = ("p", "pp", "y", "yy", "py", "ppy", "pyy", "ppyy", "c", "cc", "pc", "yc", "pyc",
            "g", "gg")

    def __init__(self, shift: tuple[Tensor, Tensor] | None = None):
        self.n = self.n_g = 0
        self.s: dict[str, Tensor] = {}
        self.shift = shift  # (e_phi, e_y) of the first pair added, unless given

    def add(self, t: PairTerms) -> None:
        if self.shift is None:
            self.shift = (t.e_phi.clone(), t.e_y.clone())
        p = (t.e_phi - self.shift[0])[..., None]
        y = t.e_y - self.shift[1]
        c = t.o_phi[..., None] * t.r
        parts = {"p": p, "pp": p * p, "y": y, "yy": y * y, "py": p * y, "ppy": p * p * y,
                 "pyy": p * y * y, "ppyy": p * p * y * y, "c": c, "cc": c * c, "pc": p * c,
                 "yc": y * c, "pyc": p * y * c}
        if t.path is not None:
            parts.update(g=t.path, gg=t.path * t.path)
            self.n_g += 1
        for k, v in parts.items():
            self.s[k] = self.s[k] + v if k in self.s else v.clone()
        self.n += 1

    def merge(self, other: Sums) -> Sums:
        """The sums of both; ``other`` must have been started with this one's shift
        (``Sums(shift=a.shift)``), so that its raw moments add."""
        if other.shift is not self.shift:
            raise ConfigError("Sums can only be merged when they share their shift: start the "
                              "second with Sums(shift=first.shift)")
        out = Sums(self.shift)
        out.n, out.n_g = self.n + other.n, self.n_g + other.n_g
        out.s = {k: self.s.get(k, 0) + other.s.get(k, 0) for k in {*self.s, *other.s}}
        return out

    def result(self) -> tuple[Tensor, Tensor, dict]:
        """``(Cov0 [K, X], stderr [K, X], parts)`` (module docstring): the pair term
        ``q = f (e_phi - mean)(e_y - mean) + o_phi r`` (``f = n / (n - 1)``) and the gradient
        term, each a mean of i.i.d. values with its sample variance; ``parts``: the per-pair
        variances (median over entries) of the two."""
        n, s = self.n, self.s
        if n < 2:
            raise ConfigError("the pathwise estimator needs at least 2 pairs")
        if self.n_g < 2:
            raise ConfigError("the pathwise estimator needs at least 2 gradient pairs: lower "
                              "grad_every or draw more pairs")
        f = n / (n - 1)
        P, Y = s["p"] / n, s["y"] / n
        s_ab = s["py"] - n * P * Y
        s_aabb = (s["ppyy"] - 2 * Y * s["ppy"] + Y**2 * s["pp"] - 2 * P * s["pyy"]
                  + 4 * P * Y * s["py"] - 2 * P * Y**2 * s["p"] + P**2 * s["yy"]
                  - 2 * P**2 * Y * s["y"] + n * P**2 * Y**2)
        s_abc = s["pyc"] - Y * s["pc"] - P * s["yc"] + P * Y * s["c"]
        s_q = f * s_ab + s["c"]
        var_q = (f**2 * s_aabb + 2 * f * s_abc + s["cc"] - s_q**2 / n) / (n - 1)
        m = self.n_g
        var_g = (s["gg"] - s["g"] ** 2 / m) / (m - 1)
        value = s_q / n + s["g"] / m
        se = (var_q.clamp(min=0) / n + var_g.clamp(min=0) / m).sqrt()
        parts = {"n_pairs": n, "n_gradient_pairs": m, "var_pair": float(var_q.median()),
                 "var_path": float(var_g.median())}
        return value, se, parts


def combine(terms: Sequence[PairTerms]) -> tuple[Tensor, Tensor, dict]:
    """``(Cov0 [K, X], stderr [K, X], parts)`` from pair terms (:meth:`Sums.result`)."""
    acc = Sums()
    for t in terms:
        acc.add(t)
    return acc.result()


def first_order_susceptibility(model: nn.Module, config, token_loss: TokenLoss,
                               probe: batches.Batch,
                               masks: Sequence[Mapping[str, bool | Tensor]]) -> Estimate:
    """The first-order term of the spring-only susceptibility (module docstring),
    ``chi1 [token, component]``, ``chi1[x, k] = -sum_i s_i^2 (M_k grad Lbar_S(w*))_i
    (a_x)_i`` with ``a_x = grad (l_x - Lbar_S)(w*)``; sign of ``chi`` (``< 0``: token x lowers
    the component's loss to first order). Deterministic: ``stderr`` is 0.

    Args as :func:`pathwise_susceptibility` (no evaluation plan: only the token losses at w*).
    ``config``: plain SGLD without weight decay (the expansion point is the spring law's mean,
    which is w* only then).
    """
    if config.precondition is not None:
        raise ConfigError("the first-order spring-only term needs plain SGLD "
                          "(precondition=None): its law is N(w*, s^2) only then")
    if config.weight_decay:
        raise ConfigError(f"weight_decay={config.weight_decay:g} moves the spring law's mean "
                          "off w*, where the first-order term is taken; use weight_decay=0")
    fm = private_copy(model)
    mask = torch.stack([build_mask(fm, m) for m in masks]).to(fm.params.dtype)
    _, sd = stationary(config, fm.params.detach())
    check_jacobian_size(fm, token_loss, probe)
    jac = token_jacobian(fm, token_loss, probe)  # [X, d] (float32): rows a_x
    fm.grad.zero_()
    token_loss(fm.module, probe).mean().backward()
    g = fm.grad.detach().double() * sd.double() ** 2  # s^2 grad Lbar_S(w*)
    value = -torch.stack([jac[:, i].double() @ g[i] for i in  # [X, K], one support at a time
                          (m.nonzero()[:, 0] for m in mask)], 1)
    return Estimate(value, torch.zeros_like(value), ("token", "component"), "susceptibility",
                    "-(s^2 M_k grad Lbar_S(w*)) . grad (l_x - Lbar_S)(w*): first-order "
                    "spring-only term; < 0: token x lowers C's loss",
                    {"order": 1, "law": {k: getattr(config, k) for k in
                                         ("step_size", "gamma", "weight_decay")}})


def pathwise_susceptibility(model: nn.Module, config, evaluate, token_loss: TokenLoss,
                            probe: batches.Batch, masks: Sequence[Mapping[str, bool | Tensor]],
                            *, grad_every: int = 16, progress: bool = True) -> Estimate:
    """The spring-only susceptibility ``chi0 [token, component]`` (``-Cov0``, docs/theory.md
    section 5; ``< 0``: token x lowers the component's loss) by the pathwise estimator above.

    Args:
        model: the module at w* (copied, never modified).
        config: the run's SamplerConfig (plain SGLD): its law; ``n_chains`` x ``n_draws / 2``
            antithetic pairs (``n_draws`` even) from the noise of ``(seed, chain)``: give it a
            seed other than the run's.
        evaluate: ``f(module) -> {"phi": [K], "restricted_token_loss": [K, X]}`` (an evaluation
            plan of these two observables over the components of ``masks``, in that order).
        token_loss: ``f(module, batch) -> [batch, ...]`` the per-token losses whose restricted
            versions ``evaluate`` returns (flattened they index ``X``).
        probe: the probe batch; masks: one parameter mask per component.
        grad_every: one pair in this many carries the gradient term.
    Returns:
        An Estimate ``[token, component]``; ``meta`` holds ``split_half`` (per component, the
        Spearman between the standardized columns of the two halves of the chains, with two
        or more chains), the per-pair variances ``var_pair``, ``var_path`` of the two terms
        and the CPU seconds of each part: the best ``grad_every`` is about
        ``sqrt(var_pair c_gradient / (var_path c_pair))`` (costs per gradient pair and per pair).
    """
    if config.n_draws % 2:
        raise ConfigError(f"antithetic pairs: n_draws={config.n_draws} must be even")
    if grad_every < 1:
        raise ConfigError(f"grad_every={grad_every} must be >= 1")
    base = PathwiseBase(model, config, evaluate, token_loss, probe, masks)
    n_pairs = config.n_draws // 2
    return chi0_from_pairs(lambda c: base.pairs(c, n_pairs, grad_every), config, n_pairs, Sums,
                           what="pathwise", progress=progress,
                           meta={"seconds": base.seconds, "grad_every": grad_every})


def chi0_from_pairs(pairs_of: Callable[[int], Iterable], config, n_pairs: int, sums, *,
                    what: str, progress: bool, meta: dict) -> Estimate:
    """``chi0 [token, component] = -Cov0`` from the i.i.d. pair terms of every chain,
    ``pairs_of(chain)``, streamed into ``sums`` (:class:`Sums` or
    :class:`suscept.interpolation.MeanSums`): the first half of the chains in one, the second
    in another that shares its shift, for the split-half reliability; ``meta`` is added to the
    Estimate's with the pairs' parts, ``n_draws`` and the law."""
    first, second = sums(), None
    with tqdm(total=config.n_chains * n_pairs, disable=not progress,
              desc=f"{what} spring pairs") as bar:
        for c in range(config.n_chains):
            for t in pairs_of(c):
                if c < config.n_chains // 2 or config.n_chains < 2:
                    first.add(t)
                else:  # chain 0 came first: share its shift so that the sums add
                    second = second or sums(first.shift)
                    second.add(t)
                bar.update()
    total = first if second is None else first.merge(second)
    value, se, parts = total.result()
    parts["split_half"] = None if second is None else split_half(first, second)
    return Estimate(-value.T, se.T, ("token", "component"), "susceptibility",
                    f"-Cov0(phi_C, l^C_x - Lbar_S(w^C)), spring-only law, {what} estimator; "
                    "< 0: token x lowers C's loss",
                    {**parts, **{k: dict(v) if isinstance(v, dict) else v
                                 for k, v in meta.items()}, "n_draws": 2 * total.n,
                     "law": {k: getattr(config, k) for k in ("step_size", "gamma",
                                                             "weight_decay", "seed")}})


def split_half(a, b) -> list[float] | None:
    """Per component, the Spearman between the standardized ``chi0`` columns of two halves of
    the chains; None when a half cannot give its estimate (too few pairs)."""
    from suscept.susceptibilities import spearman, standardize

    try:
        ma, mb = (-h.result()[0].T for h in (a, b))
    except ConfigError:
        return None
    return [float(v) for v in spearman(standardize(ma), standardize(mb))]
