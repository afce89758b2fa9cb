"""The coupled estimator of the LDS table's BIF: twins (spring-only or linear-Gaussian), an
i.i.d. antithetic base of their law, per-part variances and the best split of a CPU budget.

With ``C`` the k-statistic covariance of the training losses ``l_j`` against the query losses
``l_q``, ``tau = -beta (C(SGLD) - C(twins) + C(base))`` ``[n, Q]`` (derivative scale,
docs/theory.md section 3): the plain estimator's expectation up to the twins' ``O(1/N)``
finite-run bias (docs/efficiency.md, "An exact i.i.d. base"). Per-draw variances ``V_p``
(plain), ``V_d`` (difference, per SGLD draw), ``V_b`` (base, per draw), costs ``c_p``,
``c_run`` (an SGLD draw and its twin), ``c_b``; the least variance per CPU second is at
``N_b / N_run = sqrt(V_b c_run / (V_d c_b))``, with variance factor against plain
``(sqrt(V_d c_run) + sqrt(V_b c_b))^2 / (V_p c_p)``. Used by
``experiments/benchmarks/lds_variants.py``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import suscept
from experiments import lds
from suscept.control_variates import block_sums, combine_se
from suscept.coupled import coupled_covariance, coupling_skip, spring_draws

HALVES = ([0, 1], [2, 3])
POOL_CHAINS = 8  # base groups 0-3 go with SGLD chains {0, 1}, 4-7 with {2, 3}
BASE_SEED = 1000


def per_draw_variance(x, y) -> float:
    """Median over entries of ``N se^2`` of the k-statistic ``Cov(x, y)`` (5 blocks/chain)."""
    sums, sizes, n = block_sums(x, y, False, min(5, x.shape[1]))
    return float((combine_se(sums, sizes, n) ** 2 * n).median())


def split_half(bif_of) -> float:
    """Mean over queries of the Spearman between the BIFs ``[n, Q]`` of the two halves."""
    return float(lds.spearman_cols(*(bif_of(h) for h in HALVES)).mean())


def observe(p: lds.Problem):
    def f(module):
        return {"loss": p.loss_fn(module, p.data), "query": p.loss_fn(module, p.queries)}
    return f


def coupled_bif(run, twin, base, beta: float, chains, groups, k: int, kb: int, skip: int):
    """``tau = -beta (C(SGLD) - C(twins) + C(base))`` on SGLD/twin draws ``skip:skip+k`` of
    ``chains`` and the first ``kb`` draws (antithetic pairs) of base ``groups``."""
    sl = slice(skip, skip + k)
    est = coupled_covariance((run["loss"][chains, sl], run["query"][chains, sl]),
                             (twin["loss"][chains, sl], twin["query"][chains, sl]),
                             (base["loss"][groups, :kb], base["query"][groups, :kb]),
                             antithetic=True, n_blocks=min(5, k))
    return -beta * est.value, est


def spring_parts(model, p, cfg, n_per_group: int):
    """Stationary spring-only twins and an antithetic i.i.d. spring-only pool (another seed),
    with their costs."""
    with lds.Cost() as c:
        twin = spring_draws(model, cfg, observe(p), start="stationary")
    t_twin = c.record()
    pool_cfg = dataclasses.replace(cfg, seed=BASE_SEED, n_chains=POOL_CHAINS,
                                   n_draws=n_per_group)
    with warnings.catch_warnings(), lds.Cost() as c:
        warnings.simplefilter("ignore")
        pool = suscept.spring_sample(model, p.loss_fn, p.data, pool_cfg, probe=p.data,
                                     observables={"query": lambda m: p.loss_fn(m, p.queries)},
                                     stream=[], antithetic=True, progress=False)
    t_pool = c.record()
    suscept.coupled.check_base(cfg, pool)
    return twin, {k: pool.flat(k) for k in ("loss", "query")}, t_twin, t_pool, 0.0


def laplace_parts(model, p, cfg, n_per_group: int):
    """Stationary linear-Gaussian (Laplace) twins and an antithetic i.i.d. pool of their law
    (:mod:`experiments.benchmarks.laplace_twin`); the Hessian's CPU seconds as a fixed cost."""
    from experiments.benchmarks import laplace_twin as lt

    with lds.Cost() as c0:
        law = lt.laplace_law(model, p.loss_fn, p.data, cfg)
    with lds.Cost() as c:
        twin = lt.laplace_twins(model, cfg, law, observe(p))
    t_twin = c.record()
    with lds.Cost() as c:
        base = lt.laplace_pool(model, law, observe(p), POOL_CHAINS, n_per_group, BASE_SEED)
    return twin, base, t_twin, c.record(), c0.record()["cpu_s"]


def coupled_variant(model, p, cfg, run, t_run: dict, args, twin: str = "spring") -> dict:
    """Twins (``"spring"``-only or linear-Gaussian ``"laplace"``), an antithetic i.i.d. pool of
    their law, per-part variances, the best split and the coupled BIF at the plain run's CPU
    time (a fixed cost, the Laplace twin's Hessian, included; the variance factor is the
    per-draw one, without it)."""
    n_per_group = 2 * round(args.pool / POOL_CHAINS / 2)
    parts = laplace_parts if twin == "laplace" else spring_parts
    twin, base, t_twin, t_pool, t_fixed = parts(model, p, cfg, n_per_group)
    beta, skip, d = cfg.n_beta / len(p.data[0]), coupling_skip(cfg), cfg.n_draws
    n_pool = POOL_CHAINS * n_per_group
    k_all = d - skip
    _, est = coupled_bif(run, twin, base, beta, [0, 1, 2, 3], list(range(POOL_CHAINS)), k_all,
                         n_per_group, skip)
    n_run = est.meta["n_draws"]
    v_d = est.meta["se_difference_median"] ** 2 * n_run
    v_b = est.meta["se_independent_median"] ** 2 * n_pool
    v_p = per_draw_variance(run["loss"], run["query"])
    v_twin = per_draw_variance(twin["loss"][:, skip:], twin["query"][:, skip:])
    c_p = t_run["cpu_s"] / (4 * d)
    c_run = (t_run["cpu_s"] + t_twin["cpu_s"]) / (4 * d)
    c_b = t_pool["cpu_s"] / n_pool
    ratio = math.sqrt(v_b * c_run / (v_d * c_b))  # base draws per SGLD draw
    factor = (math.sqrt(v_d * c_run) + math.sqrt(v_b * c_b)) ** 2 / (v_p * c_p)
    # equal CPU with the plain run: SGLD (with the skipped draws) + twins + base at `ratio`
    budget = t_run["cpu_s"] - t_fixed
    k = int((budget / 4 - skip * c_run) / (c_run + ratio * c_b))
    k = max(2, min(k_all, k))
    kb = max(2, 2 * round(min(n_pool, ratio * 4 * k) / POOL_CHAINS / 2))
    kb = min(kb, n_per_group)
    cpu = 4 * (skip + k) * c_run + POOL_CHAINS * kb * c_b + t_fixed
    half = POOL_CHAINS // 2

    def bif_of(h):
        g = list(range(half)) if h[0] == 0 else list(range(half, POOL_CHAINS))
        return coupled_bif(run, twin, base, beta, h, g, k, kb, skip)[0]

    tau, _ = coupled_bif(run, twin, base, beta, [0, 1, 2, 3], list(range(POOL_CHAINS)), k, kb,
                         skip)
    return {"tau": tau, "split_half": split_half(bif_of), "cpu_s": cpu,
            "draws": 4 * k, "base_draws": POOL_CHAINS * kb, "skip": skip,
            "V_plain": v_p, "V_difference": v_d, "V_twins": v_twin, "V_base": v_b,
            "difference_over_plain": v_d / v_p, "twins_over_plain": v_twin / v_p,
            "c_plain": c_p, "c_run_and_twin": c_run, "c_base": c_b,
            "base_per_sgld_draw": ratio, "variance_factor": factor,
            "cost": {"twins": t_twin, "pool": t_pool, "fixed_cpu_s": t_fixed},
            "parts": {"twin": twin, "base": base, "beta": beta, "k": k, "kb": kb}}


