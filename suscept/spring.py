"""The spring-only control from exact i.i.d. draws: what the localized sampler gives when the
loss is switched off (``n_beta -> 0``), without running a chain.

With ``n_beta = 0`` the SGLD kernel (docs/theory.md section 2) is linear in ``w``. Per coordinate,
with ``gamma_eff = gamma + lambda_wd`` and ``mu = (gamma / gamma_eff) w*`` (the weight-decay
shift of the mean; ``mu = w*`` without weight decay), ``x = w - mu`` follows the AR(1)

    x_{k+1} = (1 - eps G gamma_eff / 2) x_k + sqrt(eps G) xi_k,

``G = 1`` for plain SGLD, ``G_i = 1 / (sqrt(V_i) + delta)`` with RMSprop. Its stationary law is
Gaussian with mean ``mu`` and per-coordinate variance (solve ``s = (1 - a)^2 s + eps G`` with
``a = eps G gamma_eff / 2``)

    sigma_i^2 = 1 / (gamma_eff (1 - eps G_i gamma_eff / 4))     (stable iff eps G_i gamma_eff < 4)

so the preconditioner enters only through ``eps G_i`` in the discretization factor; the
continuous-time answer (``match_chain=False``) is ``1 / gamma_eff``. ``V`` is the RMSprop average
of squared minibatch gradients of the mean loss, which the chain keeps accumulating although
its drift ignores the loss; here ``V_i`` is taken as the mean of ``g_i^2`` over ``n_grad``
minibatch gradients at spring draws (the chain's ``V`` fluctuates around it; ``G`` is then
treated as fixed, which is exact to first order in the fluctuation). Coordinates outside a
``mask`` stay at ``w*``.

:func:`spring_sample` has :func:`suscept.sample`'s signature and returns a
:class:`~suscept.run.Run` with the same observables, streams and stored draws, so every
estimator, susceptibility and BIF can be computed on the control exactly as on the run, and
compared with :func:`agreement` against its reliability ceiling. With ``antithetic=True``
draws come in pairs ``(mu + d, mu - d)``; :func:`odd_even` splits any observable into its
even and odd parts, and ``Cov(O, l) = Cov(O_even, l_even) + E[O_odd l_odd]`` (the cross terms
vanish by symmetry): in the quadratic picture the odd part carries the gradient term
``b_O^T Sigma b_l`` and the even part the curvature term ``1/2 tr(A_O Sigma A_l Sigma)``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from suscept import data as batches
from suscept.errors import ConfigError, ShapeError
from suscept.estimators import default_blocks
from suscept.model import FlatModule, build_mask, private_copy
from suscept.run import Run
from suscept.sample import (
    LossFn,
    Observable,
    ObservableSet,
    SamplerConfig,
    _check_mask,
    _evaluator,
    chain_generators,
    check_inputs,
)
from suscept.streams import Cross, Stream, as_stream


def stationary(config: SamplerConfig, anchor: Float[Tensor, " d"], *,
               precond: Float[Tensor, " d"] | None = None, match_chain: bool = True
               ) -> tuple[Tensor, Tensor]:
    """Mean ``mu [d]`` and standard deviation ``sigma [d]`` of the spring-only chain.

    ``mu = gamma / (gamma + lambda_wd) * w*``; ``sigma^2 = 1 / (gamma_eff (1 - eps G gamma_eff /
    4))`` (``match_chain``) or ``1 / gamma_eff``; ``precond`` is ``G [d]`` (default 1).
    """
    g_eff = config.gamma + config.weight_decay
    if g_eff <= 0:
        raise ConfigError("the spring-only control needs gamma + weight_decay > 0: without a "
                          "spring the n_beta -> 0 posterior is improper")
    eps_g = config.step_size * (torch.ones_like(anchor) if precond is None else precond)
    factor = 1 - eps_g * g_eff / 4
    if match_chain and bool((factor <= 0).any()):
        raise ConfigError(f"step_size {config.step_size:g} is unstable for the spring alone "
                          f"(eps G gamma_eff >= 4 with gamma_eff {g_eff:g}); lower step_size")
    var = 1 / (g_eff * factor) if match_chain else torch.full_like(anchor, 1 / g_eff)
    return anchor * (config.gamma / g_eff), var.sqrt()


def rmsprop_scale(fm: FlatModule, loss_fn: LossFn, data: batches.Batch, config: SamplerConfig,
                  mu: Tensor, n_grad: int, generator: torch.Generator) -> Tensor:
    """``G = 1 / (sqrt(V) + delta)`` with ``V`` the mean squared minibatch gradient of the mean
    loss over ``n_grad`` draws of the continuous spring law ``N(mu, 1 / gamma_eff)``."""
    n = batches.n_samples(data)
    size = config.batch_size if config.batch_size and config.batch_size < n else n
    sd = (1 / (config.gamma + config.weight_decay)) ** 0.5
    v = torch.zeros_like(fm.params)
    for _ in range(n_grad):
        fm.params.copy_(mu + sd * torch.randn(mu.shape, generator=generator, dtype=mu.dtype))
        idx = torch.randperm(n, generator=generator)[:size]
        fm.grad.zero_()
        loss_fn(fm.module, batches.index(data, idx)).mean().backward()
        v += fm.grad**2
    return 1 / ((v / n_grad).sqrt() + config.rmsprop_delta)


def spring_sample(
    model: nn.Module,
    loss_fn: LossFn,
    data: batches.Batch,
    config: SamplerConfig,
    *,
    probe: batches.Batch | None = None,
    observables: Mapping[str, Observable] | ObservableSet | None = None,
    anchor: Mapping[str, Tensor] | None = None,
    mask: Mapping[str, bool | Tensor] | None = None,
    stream: Sequence[tuple[str, str] | Stream] | None = None,
    third_order: bool = False,
    store_draws: bool | Sequence[str] = True,
    antithetic: bool = False,
    match_chain: bool = True,
    n_grad: int = 32,
    progress: bool = True,
) -> Run:
    """Exact i.i.d. draws of the spring-only (``n_beta = 0``) stationary law of ``config``'s
    sampler, evaluated like :func:`suscept.sample` (same arguments, same :class:`Run`).

    Each chain ``c`` draws ``config.n_draws`` independent ``w = mu + sigma * xi`` (module
    docstring; ``xi`` from the chain's noise generator of ``(config.seed, c)``, so a control with
    the run's seed shares its Gaussian noise stream: give it another seed). ``n_beta``,
    ``burn_in``, ``thin`` are ignored; ``data`` and ``loss_fn`` are used only for ``run.n``, the
    probe's losses and, with ``precondition="rmsprop"``, for ``G`` (``n_grad`` gradients).

    Args:
        stream, third_order: as in :func:`suscept.sample`, but the default stream with a probe
            is the kernel ``("loss", "loss")`` (a control is compared with BIFs and kernels:
            ``n_probe^2`` per segment), without third-order slices unless asked.
        antithetic: draws ``2k`` and ``2k + 1`` are ``mu + d`` and ``mu - d`` (needs an even
            ``n_draws``; pairs never straddle a block); split with :func:`odd_even`.
        match_chain: the chain's own variance (default) or the continuous-time ``1/gamma_eff``.
    Returns:
        A Run with ``config["n_beta"] = 0``, ``config["draw_source"] = "spring"``, an empty
        ``loss_trace [chain, 0]`` and ``config["spring_sd"]`` (min, max of ``sigma``).
    """
    if not isinstance(config, SamplerConfig):
        raise ConfigError("config must be a suscept.SamplerConfig")
    config.validate()
    if antithetic and config.n_draws % 2:
        raise ConfigError(f"antithetic draws come in pairs: n_draws={config.n_draws} must be even")
    n, observables = check_inputs(loss_fn, data, probe, observables)
    _check_mask(mask)
    if stream is None:
        stream = [("loss", "loss")] if probe is not None else []
    streams = [Cross(s.x, s.y, third=third_order) if isinstance(spec, tuple) else s
               for spec, s in ((spec, as_stream(spec)) for spec in stream)]
    t0 = time.perf_counter()
    fm = private_copy(model)
    anchor_flat = fm.params.clone() if anchor is None else fm.flatten(anchor, "anchor")
    fm.params.copy_(anchor_flat)
    evaluate = _evaluator(loss_fn, probe, observables)
    anchor_values = {k: v.detach().cpu() for k, v in evaluate(fm.module, check=True).items()}
    shapes = {k: tuple(v.shape) for k, v in anchor_values.items()}
    for s in streams:
        s.check(shapes)
    mu, sd = _law(fm, loss_fn, data, config, anchor_flat, mask, match_chain, n_grad)
    draws = _Draws(fm, config, shapes, streams, store_draws, anchor_flat, antithetic)
    for chain in tqdm(range(config.n_chains), disable=not progress, desc="spring draws"):
        draws.chain(chain, mu, sd, evaluate)
    cfg = {**asdict(config), "n_beta": 0.0, "draw_source": "spring", "antithetic": antithetic,
           "match_chain": match_chain, "spring_sd": [float(sd.max()), float(sd.min())]}
    return draws.result(cfg, n, anchor_values, time.perf_counter() - t0)


def _law(fm, loss_fn, data, config, anchor_flat, mask, match_chain, n_grad):
    precond = None
    mu_plain, _ = stationary(config, anchor_flat, match_chain=False)
    if config.precondition == "rmsprop":
        gen = torch.Generator().manual_seed(int(config.seed) + 7919)
        precond = rmsprop_scale(fm, loss_fn, data, config, mu_plain, n_grad, gen)
        fm.params.copy_(anchor_flat)
    mu, sd = stationary(config, anchor_flat, precond=precond, match_chain=match_chain)
    if mask is not None:
        m = build_mask(fm, mask)
        mu, sd = torch.where(m > 0, mu, anchor_flat), sd * m
    return mu, sd


class _Draws:
    """Evaluates and records draws chain by chain, in the blocks :func:`suscept.sample` uses."""

    def __init__(self, fm, config, shapes, streams, store_draws, anchor, antithetic):
        self.fm, self.cfg, self.streams, self.anchor = fm, config, streams, anchor
        self.antithetic = antithetic
        c, d = config.n_chains, config.n_draws
        unit = 2 if antithetic else 1
        blocks = min(config.n_blocks or default_blocks(c, d), d // unit)
        self.bounds = [unit * len(b) for b in torch.tensor_split(torch.arange(d // unit),
                                                                 blocks)]
        stored = list(shapes) if store_draws is True else list(store_draws or [])
        unknown = sorted(set(stored) - set(shapes))
        if unknown:
            raise ConfigError(f"store_draws names unknown observables {unknown}; known: "
                              f"{sorted(shapes)}")
        nan = float("nan")
        self.draws = {k: torch.full((c, d, *shapes[k]), nan, dtype=fm.params.dtype)
                      for k in stored}
        self.probe_loss = torch.full((c, d), nan, dtype=torch.float64)
        self.distance = torch.full((c, d), nan, dtype=torch.float64)
        self.parts: dict[str, list] = {s.key: [] for s in streams}

    def chain(self, chain: int, mu: Tensor, sd: Tensor, evaluate) -> None:
        noise, _ = chain_generators(self.cfg.seed, chain, self.fm.params.device)
        draw = 0
        for length in self.bounds:
            buf = []
            for k in range(length):
                if not (self.antithetic and k % 2):
                    xi = torch.randn(mu.shape, generator=noise, dtype=mu.dtype, device=mu.device)
                self.fm.params.copy_(mu + sd * (-xi if self.antithetic and k % 2 else xi))
                values = evaluate(self.fm.module)
                self._record(chain, draw, values)
                buf.append(values)
                draw += 1
            stacked = {k: torch.stack([b[k] for b in buf]) for k in buf[0]}
            for s in self.streams:
                self.parts[s.key].append(s.block(stacked))
        self.fm.params.copy_(self.anchor)

    def _record(self, chain: int, draw: int, values: dict[str, Tensor]) -> None:
        probe = values.get("loss", values.get("mean_loss"))
        if probe is not None:
            self.probe_loss[chain, draw] = float(probe.double().mean())
        self.distance[chain, draw] = float(torch.linalg.vector_norm(
            self.fm.params - self.anchor, dtype=torch.float64))
        for k, store in self.draws.items():
            store[chain, draw] = values[k].detach().cpu().to(store.dtype)

    def result(self, cfg: dict, n: int, anchor_values: dict, wall_s: float) -> Run:
        moments = {s.key: s.combine(self.parts[s.key]) for s in self.streams}
        trace = torch.empty((self.cfg.n_chains, 0), dtype=torch.float64)
        return Run(config=cfg, n=n, shapes={k: tuple(v.shape) for k, v in anchor_values.items()},
                   anchor_values=anchor_values, draws=self.draws, moments=moments,
                   loss_trace=trace, probe_loss=self.probe_loss, distance=self.distance,
                   wall_s=wall_s)


def odd_even(draws: Float[Tensor, "chain draw *shape"]) -> tuple[Tensor, Tensor]:
    """Even and odd parts ``(f(mu + d) + f(mu - d)) / 2`` and ``(f(mu + d) - f(mu - d)) / 2`` of
    antithetic draws ``[chain, 2 m, ...]``; each ``[chain, m, ...]``. Under the symmetric law
    ``Cov(O, l) = Cov(O_even, l_even) + E[O_odd l_odd]`` and ``E[O_odd] = 0``."""
    if draws.ndim < 2 or draws.shape[1] % 2:
        raise ShapeError(f"antithetic draws need shape [chain, even number of draws, ...]; got "
                         f"{tuple(draws.shape)}")
    plus, minus = draws[:, 0::2], draws[:, 1::2]
    return (plus + minus) / 2, (plus - minus) / 2
