"""The classical influence ladder: what the BIF reduces to under stronger and stronger assumptions.

Every method returns an :class:`~suscept.estimate.Estimate` with dims
``("sample", "observable")``, shape ``[n, q]``, oriented like :func:`suscept.bif` and on its
*derivative* scale (``bif(..., scale="derivative", beta=run.beta)``): for
``L_rho(w) = (1/n) sum_j rho_j l_j(w)`` trained to its minimum ``w(rho)``,

    tau[j, q] = d O_q(w(rho)) / d rho_j |_{rho = 1} = -(1/n) g_j^T C^-1 grad O_q

with ``g_j = grad l_j(w*)`` and a curvature ``C`` that each rung approximates differently:

=====================  =====================================================================
``influence``          ``C = H + damping I``, ``H`` the Hessian of ``L_n`` at w* (explicit
                       for up to ``max_explicit`` parameters, else conjugate gradients)
``diagonal``           ``C = diag(H) + damping`` or ``diag(F) + damping`` with the empirical
                       Fisher / Gauss-Newton diagonal ``F = mean_i g_i^2``
``gradsim``            ``C = I`` (gradient dot products; ``normalize=True``: minus cosines)
``projected_gradsim``  ``C = I`` after a random projection ``P [dim, d]`` (TRAK-style);
                       with ``damping``: ``C = Phi^T Phi / n + damping`` in the projected space
``ekfac``              EK-FAC Fisher (kronfluence, optional), ``C = F_ekfac + damping``
=====================  =====================================================================

Positive ``tau[j, q]``: up-weighting train sample ``j`` raises ``O_q``; when ``O_q`` is a query
loss, "j helps q" means ``tau[j, q] < 0``. Regular (Laplace) limit, docs/theory.md section 3: the
derivative-scale BIF ``-beta Cov(l_j, O_q)`` at localization ``gamma`` tends to
``influence(..., damping=gamma / n_beta)`` as ``gamma`` grows. The methods are deterministic
(``projected_gradsim`` given its seed): ``stderr`` is zero, there is no Monte Carlo error.

The user's model is deep-copied (eval mode); it is never modified and gains no hooks. Per-sample
losses come from the same ``loss_fn(model, batch) -> Tensor[batch]`` as :func:`suscept.sample`;
linear algebra is done in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from tqdm.auto import tqdm

from suscept import data as batches
from suscept.errors import ConfigError, EstimatorWarning, ShapeError, SusceptError
from suscept.estimate import Estimate
from suscept.model import copy_module

LossFn = Callable[[nn.Module, batches.Batch], Tensor]
Queries = batches.Batch | Callable[[nn.Module], Tensor]
F64 = torch.float64
CONVENTION = "-(1/n) g_j^T C^-1 grad O_q = dO_q/drho_j (derivative scale, like bif)"


# ---- the model as a function of one flat parameter vector -------------------------------
class _Loss(nn.Module):
    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, batch):
        return self.fn(self.model, batch)


class Functional:
    """A private copy of ``model`` (eval mode) as functions of a flat parameter vector ``[d]``.

    ``losses(flat, batch) -> [m]`` evaluates ``loss_fn`` at weights ``flat``; ``flat0`` holds
    the model's own (trainable) weights, in ``names`` order.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not callable(loss_fn):
            raise ConfigError("loss_fn must be callable: loss_fn(model, batch) -> per-sample "
                              "losses [batch]")
        module = copy_module(model).eval()
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("model has no trainable parameters (requires_grad=True)")
        self.wrapper = _Loss(module, loss_fn)
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.flat0 = torch.cat([p.detach().reshape(-1) for _, p in named])
        self.d = self.flat0.numel()

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        out, o = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = math.prod(s)
            out["model." + n] = flat[o:o + k].view(s)
            o += k
        return out

    def losses(self, flat: Tensor, batch) -> Tensor:
        return functional_call(self.wrapper, self.params(flat), (batch,))

    def observable(self, flat: Tensor, f: Callable[[nn.Module], Tensor]) -> Tensor:
        return functional_call(_Obs(self.wrapper.model, f), self.params(flat), ())


class _Obs(nn.Module):
    def __init__(self, model: nn.Module, f):
        super().__init__()
        self.model, self.f = model, f

    def forward(self):
        return self.f(self.model).reshape(-1)


def _chunks(data, batch_size: int | None) -> list:
    n = batches.n_samples(data)
    if batch_size is None or batch_size >= n:
        return [data]
    return [batches.index(data, idx) for idx in torch.arange(n).split(batch_size)]


def _unsqueeze(item):
    if isinstance(item, Tensor):
        return item[None]
    if isinstance(item, Mapping):
        return {k: v[None] for k, v in item.items()}
    return type(item)(t[None] for t in item)


def _check_losses(losses: Tensor, m: int) -> None:
    if not isinstance(losses, Tensor) or losses.shape != (m,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ShapeError(f"loss_fn must return per-sample losses of shape [{m}] for a batch of "
                         f"{m} samples; got {got} (do not reduce with mean())")


def per_sample_grads(fn: Functional, data, *, batch_size: int | None = 256) -> Tensor:
    """Gradients ``g_i = grad l_i(w*)`` of every sample of ``data``: ``[n, d]`` float64.

    Vectorized with ``torch.func.vmap``; models whose forward vmap cannot trace fall back to a
    loop over samples (same numbers, slower).
    """
    n = batches.n_samples(data)
    with torch.no_grad():
        _check_losses(fn.losses(fn.flat0, batches.index(data, torch.arange(min(n, 2)))),
                      min(n, 2))

    def one(flat, item):
        return fn.losses(flat, _unsqueeze(item))[0]

    out = []
    for chunk in _chunks(data, batch_size):
        try:
            g = vmap(grad(one), in_dims=(None, 0))(fn.flat0, chunk)
        except Exception:  # noqa: BLE001 - vmap-incompatible forward: same result by a loop
            m = batches.n_samples(chunk)
            g = torch.stack([grad(lambda f, c=chunk, i=i: fn.losses(f, batches.index(
                c, torch.tensor([i]))).sum())(fn.flat0) for i in range(m)])
        out.append(g.detach().to(F64))
    return torch.cat(out)


def query_grads(fn: Functional, queries: Queries, *, batch_size: int | None = 256) -> Tensor:
    """Gradients of the observables ``O_q`` at w*: ``[q, d]`` float64.

    ``queries`` is a batch like the training data (``O_q`` = its per-sample losses) or a
    callable ``f(model) -> Tensor`` (any shape, flattened to ``q`` observables).
    """
    if not callable(queries):
        return per_sample_grads(fn, queries, batch_size=batch_size)
    flat = fn.flat0.detach().clone().requires_grad_(True)
    obs = fn.observable(flat, queries)
    rows = [torch.autograd.grad(o, flat, retain_graph=True, allow_unused=True)[0]
            for o in obs]
    return torch.stack([torch.zeros_like(flat) if r is None else r for r in rows]).to(F64)


# ---- curvature -------------------------------------------------------------------------
def hvp(fn: Functional, data, *, batch_size: int | None = None) -> Callable[[Tensor], Tensor]:
    """``V [k, d] -> (H V^T)^T [k, d]`` with ``H`` the Hessian of ``L_n = mean_i l_i`` at w*.

    Forward-over-reverse products (``jvp`` of ``grad``), vectorized over the rows of ``V``,
    summed over chunks of ``batch_size`` samples; inputs and outputs float64.
    """
    n = batches.n_samples(data)
    chunks = _chunks(data, batch_size)
    dtype = fn.flat0.dtype

    def apply(v: Tensor) -> Tensor:
        out = torch.zeros(v.shape, dtype=F64)
        for chunk in chunks:
            g = grad(lambda f, c=chunk: fn.losses(f, c).sum())
            out += vmap(lambda t, g=g: jvp(g, (fn.flat0,), (t,))[1])(v.to(dtype)).to(F64)
        return out / n

    return apply


def hessian(fn: Functional, data, *, batch_size: int | None = None, block: int = 64,
            progress: bool = False) -> Tensor:
    """Explicit Hessian ``[d, d]`` (float64, symmetrized) of ``L_n`` at w*, by ``d`` HVPs."""
    apply = hvp(fn, data, batch_size=batch_size)
    eye = torch.eye(fn.d, dtype=F64)
    rows = [apply(eye[i:i + block]) for i in tqdm(range(0, fn.d, block), disable=not progress,
                                                 desc="Hessian", unit="block")]
    h = torch.cat(rows)
    return 0.5 * (h + h.T)


def hessian_diagonal(fn: Functional, data, *, n_probes: int | None = None, seed: int = 0,
                     batch_size: int | None = None, block: int = 64) -> Tensor:
    """``diag H`` ``[d]`` float64: exact (``n_probes=None``, ``d`` HVPs) or Hutchinson's
    unbiased ``mean_k v_k * H v_k`` over ``n_probes`` Rademacher vectors."""
    apply = hvp(fn, data, batch_size=batch_size)
    if n_probes is None:
        eye = torch.eye(fn.d, dtype=F64)
        return torch.cat([apply(eye[i:i + block]).diagonal(offset=i) for i in
                          range(0, fn.d, block)])
    gen = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 2, (n_probes, fn.d), generator=gen).to(F64) * 2 - 1
    return torch.cat([v[i:i + block] * apply(v[i:i + block])
                      for i in range(0, n_probes, block)]).mean(0)


def cg(apply: Callable[[Tensor], Tensor], b: Tensor, *, damping: float, tol: float = 1e-6,
       max_iter: int = 500) -> tuple[Tensor, dict]:
    """Solve ``(H + damping I) x_k = b_k`` for every row of ``b [k, d]`` by conjugate gradients.

    ``apply(V)`` gives ``H V`` row-wise. Stops when every residual is below ``tol |b_k|``;
    returns ``x [k, d]`` and ``{"iterations", "max_relative_residual"}``.
    """
    def a(v):
        return apply(v) + damping * v

    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = (r * r).sum(1)
    bnorm = b.norm(dim=1).clamp_min(1e-300)
    it = 0
    while it < max_iter:
        it += 1
        ap = a(p)
        pap = (p * ap).sum(1)
        if bool((pap <= 0).any()):
            raise SusceptError(f"conjugate gradients met a non-positive curvature p^T (H + "
                               f"{damping:g} I) p = {float(pap.min()):.3g}: the damped Hessian "
                               "is not positive definite; raise damping")
        alpha = rr / pap
        x += alpha[:, None] * p
        r -= alpha[:, None] * ap
        rr_new = (r * r).sum(1)
        if bool((rr_new.sqrt() <= tol * bnorm).all()):
            break
        p = r + (rr_new / rr)[:, None] * p
        rr = rr_new
    rel = float((r.norm(dim=1) / bnorm).max())
    if rel > tol:
        warnings.warn(f"conjugate gradients stopped after {it} iterations with relative "
                      f"residual {rel:.2g} > tol {tol:g}; raise max_iter or damping",
                      EstimatorWarning, stacklevel=3)
    return x, {"iterations": it, "max_relative_residual": rel}


# ---- the ladder ------------------------------------------------------------------------
def _prepare(model, loss_fn, data, queries, batch_size):
    fn = Functional(model, loss_fn)
    n = batches.n_samples(data, "data")
    if not callable(queries):
        batches.check_like(queries, data)
    return fn, n, per_sample_grads(fn, data, batch_size=batch_size), \
        query_grads(fn, queries, batch_size=batch_size)


def _estimate(value: Tensor, name: str, **meta) -> Estimate:
    return Estimate(value, torch.zeros_like(value), ("sample", "observable"), name,
                    CONVENTION, meta)


def _check_damping(damping: float, who: str) -> float:
    if not (isinstance(damping, int | float) and math.isfinite(damping) and damping >= 0):
        raise ConfigError(f"{who}: damping={damping!r} must be a finite number >= 0")
    return float(damping)


def influence(model: nn.Module, loss_fn: LossFn, data, queries: Queries, *, damping: float,
              solver: str = "auto", max_explicit: int = 10_000, tol: float = 1e-6,
              max_iter: int = 500, batch_size: int | None = None,
              progress: bool = False) -> Estimate:
    """Damped influence function ``tau[j, q] = -(1/n) g_j^T (H + damping I)^-1 grad O_q``.

    ``H`` is the Hessian of ``L_n(w) = (1/n) sum_i l_i(w)`` over ``data`` at the model's
    weights w*. The training objective's own weight decay ``wd/2 |w|^2`` belongs in
    ``damping``. With ``damping = gamma / n_beta`` this is the regular limit of
    ``bif(..., scale="derivative")`` (docs/theory.md section 3).

    Args:
        data: the ``n`` training samples (batch format of :func:`suscept.sample`).
        queries: a batch like ``data`` (``O_q`` = its per-sample losses) or ``f(model)``.
        solver: ``"explicit"`` (form ``H``, ``d^2`` memory, solve), ``"cg"`` (conjugate
            gradients on Hessian-vector products, one solve per observable) or ``"auto"``
            (explicit when ``d <= max_explicit``).
        batch_size: samples per vectorized chunk of the gradient / HVP passes.
    Returns:
        Estimate ``[n, q]``, dims ``("sample", "observable")``, derivative scale; ``stderr``
        zero; ``meta`` holds the solver, ``d``, and ``min_eigenvalue`` of ``H`` (explicit) or
        CG iterations and residual.
    """
    damping = _check_damping(damping, "influence")
    if solver not in ("auto", "explicit", "cg"):
        raise ConfigError(f"solver={solver!r} must be 'auto', 'explicit' or 'cg'")
    fn, n, g_train, g_q = _prepare(model, loss_fn, data, queries, batch_size)
    if solver == "auto":
        solver = "explicit" if fn.d <= max_explicit else "cg"
    if solver == "explicit":
        h = hessian(fn, data, batch_size=batch_size, progress=progress)
        lam = torch.linalg.eigvalsh(h)
        if float(lam[0]) + damping <= 0:
            raise SusceptError(f"H + damping I is not positive definite (smallest eigenvalue of "
                               f"H: {float(lam[0]):.3g}); use damping > {-float(lam[0]):.3g}")
        x = torch.linalg.solve(h + damping * torch.eye(fn.d, dtype=F64), g_q.T).T
        meta = {"min_eigenvalue": float(lam[0]), "max_eigenvalue": float(lam[-1])}
    else:
        x, meta = cg(hvp(fn, data, batch_size=batch_size), g_q, damping=damping, tol=tol,
                     max_iter=max_iter)
    return _estimate(-(g_train @ x.T) / n, "influence", solver=solver, d=fn.d,
                     damping=damping, **meta)


def diagonal(model: nn.Module, loss_fn: LossFn, data, queries: Queries, *, damping: float,
             curvature: str = "hessian", n_probes: int | None = None,
             batch_size: int | None = None) -> Estimate:
    """Diagonal-curvature influence ``tau[j, q] = -(1/n) sum_k g_jk grad_k O_q / (c_k + damping)``.

    ``curvature="hessian"``: ``c = diag H`` (exact by ``d`` HVPs, or Hutchinson with
    ``n_probes``), negative entries clamped to 0; ``"fisher"``: the empirical Fisher /
    Gauss-Newton diagonal ``c = (1/n) sum_i g_i^2``. Returns Estimate ``[n, q]``,
    dims ``("sample", "observable")``, derivative scale, zero ``stderr``.
    """
    damping = _check_damping(damping, "diagonal")
    if curvature not in ("hessian", "fisher"):
        raise ConfigError(f"curvature={curvature!r} must be 'hessian' or 'fisher'")
    fn, n, g_train, g_q = _prepare(model, loss_fn, data, queries, batch_size)
    if curvature == "fisher":
        c = (g_train ** 2).mean(0)
    else:
        c = hessian_diagonal(fn, data, n_probes=n_probes, batch_size=batch_size).clamp_min(0)
    if damping == 0 and bool((c <= 0).any()):
        raise SusceptError("the curvature diagonal has zero entries; use damping > 0")
    return _estimate(-((g_train / (c + damping)) @ g_q.T) / n, "diagonal",
                     curvature=curvature, damping=damping, d=fn.d)


def gradsim(model: nn.Module, loss_fn: LossFn, data, queries: Queries, *,
            normalize: bool = False, batch_size: int | None = None) -> Estimate:
    """GradSim, the identity-curvature rung: ``tau[j, q] = -(1/n) g_j^T grad O_q``.

    ``normalize=True``: ``-cos(g_j, grad O_q)`` (scale-free, for ranking). Estimate ``[n, q]``,
    dims ``("sample", "observable")``, zero ``stderr``.
    """
    _, n, g_train, g_q = _prepare(model, loss_fn, data, queries, batch_size)
    if normalize:
        g_train = g_train / g_train.norm(dim=1, keepdim=True).clamp_min(1e-300)
        g_q = g_q / g_q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        return _estimate(-(g_train @ g_q.T), "gradsim", normalized=True)
    return _estimate(-(g_train @ g_q.T) / n, "gradsim", normalized=False)


def project(g: Tensor, dim: int, seed: int = 0, block: int = 4096) -> Tensor:
    """``g P^T`` for ``g [m, d]`` and a Gaussian ``P [dim, d]`` with entries ``N(0, 1/dim)``.

    ``P`` is drawn from ``seed`` in column blocks (never stored whole), so
    ``E[(P a)^T (P b)] = a^T b`` and ``Var = ((a^T b)^2 + |a|^2 |b|^2) / dim`` (Johnson-
    Lindenstrauss). Returns ``[m, dim]`` float64.
    """
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(g.shape[0], dim, dtype=F64)
    for o in range(0, g.shape[1], block):
        k = min(block, g.shape[1] - o)
        p = torch.randn(dim, k, generator=gen, dtype=F64) / math.sqrt(dim)
        out += g[:, o:o + k].to(F64) @ p.T
    return out


def projected_gradsim(model: nn.Module, loss_fn: LossFn, data, queries: Queries, *, dim: int,
                      seed: int = 0, damping: float | None = None,
                      batch_size: int | None = None) -> Estimate:
    """Random-projection GradSim in the spirit of TRAK: ``phi = P g`` with ``P [dim, d]``.

    ``damping=None``: ``tau[j, q] = -(1/n) phi_j^T phi_q``, an unbiased estimate of
    :func:`gradsim` with variance ``((g_j^T g_q)^2 + |g_j|^2 |g_q|^2) / (n^2 dim)``.
    ``damping`` given: TRAK's projected Gauss-Newton, ``-(1/n) phi_j^T (Phi^T Phi / n +
    damping I)^-1 phi_q`` with ``Phi [n, dim]`` the projected train gradients.
    Estimate ``[n, q]``, dims ``("sample", "observable")``, derivative scale, zero ``stderr``
    (the projection is fixed by ``seed``).
    """
    if not isinstance(dim, int) or dim < 1:
        raise ConfigError(f"dim={dim!r} must be an integer >= 1 (the projection dimension)")
    _, n, g_train, g_q = _prepare(model, loss_fn, data, queries, batch_size)
    phi, phi_q = project(g_train, dim, seed), project(g_q, dim, seed)
    if damping is not None:
        f = phi.T @ phi / n + _check_damping(damping, "projected_gradsim") * torch.eye(
            dim, dtype=F64)
        phi_q = torch.linalg.solve(f, phi_q.T).T
    return _estimate(-(phi @ phi_q.T) / n, "projected_gradsim", dim=dim, seed=seed,
                     damping=damping)


# ---- EK-FAC through kronfluence (optional) ---------------------------------------------
def ekfac_available() -> str | None:
    """``None`` when kronfluence imports, else the reason it cannot be used."""
    try:
        import kronfluence  # noqa: F401
    except ImportError as e:
        return (f"kronfluence is not installed ({e}); install the optional extra: "
                "pip install 'suscept[kronfluence]'")
    return None


class _Holder(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class _Items(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data, self.n = data, batches.n_samples(data)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        item = batches.index(self.data, torch.tensor([i]))
        if isinstance(item, Tensor):
            return item[0]
        if isinstance(item, Mapping):
            return {k: v[0] for k, v in item.items()}
        return tuple(t[0] for t in item)


def ekfac(model: nn.Module, loss_fn: LossFn, data, queries, *, damping: float | None = None,
          batch_size: int = 64, progress: bool = False) -> Estimate:
    """EK-FAC influence through kronfluence: ``tau[j, q] = -(1/n) g_j^T (F + damping)^-1 g_q``.

    ``F`` is kronfluence's eigenvalue-corrected Kronecker-factored empirical Fisher of the
    ``nn.Linear`` / ``nn.Conv2d`` modules of the model (other parameters are ignored);
    ``damping=None`` is kronfluence's heuristic (0.1 x the mean eigenvalue). ``queries`` must
    be a batch like ``data``. Raises :class:`SusceptError` when kronfluence is missing or
    does not support the model (it needs such modules). Estimate ``[n, q]``,
    dims ``("sample", "observable")``, derivative scale, zero ``stderr``.
    """
    import logging
    import tempfile

    reason = ekfac_available()
    if reason:
        raise SusceptError(reason)
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    n = batches.n_samples(data, "data")
    if callable(queries):
        raise ConfigError("ekfac needs queries as a batch like data (kronfluence measures losses)")
    batches.check_like(queries, data)

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return loss_fn(model.model, batch).sum()

        def compute_measurement(self, batch, model):
            return loss_fn(model.model, batch).sum()

    module = _Holder(copy_module(model).eval())  # kronfluence wraps children in place
    task = _Task()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = prepare_model(module, task)
            analyzer = Analyzer("suscept", module, task, cpu=True, disable_tqdm=not progress,
                                output_dir=tmp, log_level=logging.WARNING)
        except Exception as e:  # noqa: BLE001 - kronfluence's own error, re-raised with advice
            why = str(e).splitlines()[0][:160]
            raise SusceptError(f"kronfluence does not support this model ({why}); EK-FAC needs "
                               "nn.Linear / nn.Conv2d modules") from e
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        analyzer.fit_all_factors("f", _Items(data), per_device_batch_size=batch_size,
                                 factor_args=factor_args)
        analyzer.compute_pairwise_scores("s", "f", _Items(queries), _Items(data),
                                         per_device_query_batch_size=batch_size,
                                         per_device_train_batch_size=batch_size,
                                         score_args=ScoreArguments(damping_factor=damping))
        scores = analyzer.load_pairwise_scores("s")["all_modules"]  # [q, n], + = helpful
    value = -scores.T.to(F64) / n
    return _estimate(value, "ekfac", damping=damping)
