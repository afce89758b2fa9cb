"""The coupling graph: estimates -> networkx graphs, projections, communities, kernel maps.

A pure function of an :class:`~suscept.estimate.Estimate` with two dims, never of the model:

- ``("token", "component")`` (:func:`suscept.susceptibility`), ``("sample", "observable")``
  (:func:`suscept.bif`): a bipartite graph, data nodes on one side (``bipartite=0``) and
  component / observable nodes on the other (``bipartite=1``);
- ``("sample", "sample")`` (:func:`suscept.loss_kernel`): a sample-sample graph (diagonal
  dropped, one undirected edge per pair).

Edges keep the estimate's own sign convention (``value``; e.g. ``chi < 0``: the token lowers
C's loss, ``bif < 0``: sample j helps query q) with ``stderr``, ``z = value / stderr``, the
two-sided p-value ``p`` and ``weight = |value|`` (non-negative, for graph algorithms).

Which couplings are kept (:func:`select`): the two-sided z-test ``|z| >= z_c`` at ``level``,
with Bonferroni (family-wise error ``<= level`` over all ``n_tests`` entries), Benjamini-
Hochberg (false-discovery rate ``<= level``) or no multiplicity correction, and/or the
``top_k`` strongest per node. Everything is filtered with vectorised numpy, in blocks of rows,
before any networkx object exists: memory beyond the input is one block plus the kept edges.
The filter is stated in the graph's attributes (``G.graph``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import numpy as np
import torch
from scipy import sparse, special
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate

TEST = "two-sided z-test, z = value/stderr, p = 2 Phi(-|z|) (normal approximation)"
CORRECTIONS = ("bonferroni", "bh", "none")
FORMATS = (".graphml", ".gexf", ".json")


# ---- which couplings to keep ------------------------------------------------------------
@dataclass(frozen=True)
class Edges:
    """Kept couplings: ``rows``, ``cols`` (int64 ``[E]``), their ``value``, ``stderr``, ``z``
    and ``p`` (float64 ``[E]``), sorted by ``rows * n_cols + cols``; ``facts`` states the
    filter (level, test, correction, n_tests, z_threshold, top_k, per, n_significant)."""

    rows: np.ndarray
    cols: np.ndarray
    value: np.ndarray
    stderr: np.ndarray
    z: np.ndarray
    p: np.ndarray
    facts: dict


def _arrays(est: Estimate) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(est, Estimate):
        raise ShapeError(f"expected an Estimate with two dims; got {type(est).__name__}")
    if est.value.ndim != 2 or est.stderr.shape != est.value.shape:
        raise ShapeError(f"a coupling graph needs a 2-D estimate with stderr of the same shape; "
                         f"got value {tuple(est.value.shape)}, stderr {tuple(est.stderr.shape)}")
    as_np = (lambda t: np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float64))
    return as_np(est.value), as_np(est.stderr)


def _zscores(v: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``v / s`` with ``0 / 0 = 0`` and ``v / 0 = +-inf``."""
    z = np.zeros_like(v)
    np.divide(v, s, out=z, where=s > 0)
    zero = (s == 0) & (v != 0)
    z[zero] = np.copysign(np.inf, v[zero])
    return z


def _blocks(n: int, size: int):
    for r0 in range(0, n, size):
        yield r0, min(n, r0 + size)


def _threshold(value, stderr, level, correction, n_tests, pairs, block) -> float:
    """The ``|z|`` at or above which a coupling is significant."""
    if correction == "bonferroni":
        return float(special.ndtri(1 - level / (2 * n_tests)))
    if correction == "none":
        return float(special.ndtri(1 - level / 2))
    # Benjamini-Hochberg: only p <= level can pass; collect those |z|, then the step-up rule
    z_level = special.ndtri(1 - level / 2)
    cands = []
    for r0, r1 in _blocks(value.shape[0], block):
        z = np.abs(_zscores(value[r0:r1], stderr[r0:r1]))
        cands.append(z[(z >= z_level) & pairs(r0, r1)])
    z = np.sort(np.concatenate(cands))[::-1]
    p = 2 * special.ndtr(-z)
    ok = np.nonzero(p <= level * np.arange(1, len(z) + 1) / n_tests)[0]
    return float(z[ok[-1]]) if len(ok) else float("inf")


def _top(strength: np.ndarray, k: int, axis: int) -> np.ndarray:
    """Boolean mask of the ``k`` largest finite entries along ``axis`` (ties: arbitrary)."""
    n = strength.shape[axis]
    keep = np.zeros(strength.shape, dtype=bool)
    if k >= n:
        return np.isfinite(strength)
    idx = np.argpartition(-strength, k - 1, axis=axis)
    idx = idx[:k] if axis == 0 else idx[:, :k]
    np.put_along_axis(keep, idx, True, axis=axis)
    return keep & np.isfinite(strength)


def select(est: Estimate, *, level: float | None = 0.05, correction: str = "bonferroni",
           top_k: int | None = None, per: str = "both", rank_by: str = "abs",
           block_rows: int = 8192) -> Edges:
    """Couplings of a 2-D estimate that pass the significance filter and/or the top-k rule.

    Args:
        est: an Estimate ``[rows, cols]``; if ``est.dims[0] == est.dims[1]`` (a loss kernel) it
            is treated as symmetric: the diagonal is dropped and each pair ``i < j`` appears once.
        level: significance level of the two-sided z-test (``None``: no test, keep by top-k).
        correction: ``"bonferroni"`` (family-wise, over all ``n_tests`` entries), ``"bh"``
            (Benjamini-Hochberg false-discovery rate) or ``"none"`` (per test).
        top_k: keep only the ``k`` strongest significant couplings per node: an edge stays if it
            is among the ``k`` strongest of its row node or (``per="both"``) of its column node;
            ``per="row"`` / ``"col"`` uses one side only.
        rank_by: strength for top-k: ``"abs"`` = ``|value|`` or ``"z"`` = ``|z|``.
        block_rows: rows filtered at a time (bounds the working memory).
    """
    value, stderr = _arrays(est)
    n, m = value.shape
    symmetric = est.dims[0] == est.dims[1]
    if symmetric and n != m:
        raise ShapeError(f"dims {est.dims} say a square kernel but the shape is {(n, m)}")
    if correction not in CORRECTIONS:
        raise ConfigError(f"correction={correction!r} must be one of {CORRECTIONS}")
    if per not in ("both", "row", "col") or rank_by not in ("abs", "z"):
        raise ConfigError(f"per={per!r} must be 'both', 'row' or 'col' and rank_by={rank_by!r} "
                          "'abs' or 'z'")
    if level is None and top_k is None:
        raise ConfigError("give level (significance filter) and/or top_k; with neither every "
                          "entry would become an edge")
    if level is not None and not 0 < level < 1:
        raise ConfigError(f"level={level!r} must be in (0, 1)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k={top_k!r} must be a positive integer or None")
    for r0, r1 in _blocks(n, block_rows):
        if not np.isfinite(value[r0:r1]).all():
            raise ShapeError(f"{est.name}: value holds NaN/inf (rows {r0}..{r1 - 1}); drop "
                             "diverged chains or those rows before building a graph")
        s = stderr[r0:r1]
        if level is not None and not (np.isfinite(s).all() and (s >= 0).all()):
            raise ShapeError(f"{est.name}: stderr holds NaN/inf or negative entries (a single "
                             "segment of draws?); use more chains or n_blocks, or pass "
                             "level=None to keep couplings by top_k only")

    def pairs(r0, r1):  # entries that are tests: off-diagonal upper triangle if symmetric
        if not symmetric:
            return np.ones((r1 - r0, m), dtype=bool)
        return np.arange(m)[None, :] > np.arange(r0, r1)[:, None]

    n_tests = n * (n - 1) // 2 if symmetric else n * m
    if n_tests == 0:
        raise ShapeError(f"{est.name}: no entries to test (shape {(n, m)})")
    z_c = 0.0 if level is None else _threshold(value, stderr, level, correction, n_tests,
                                               pairs, block_rows)
    if symmetric and top_k is not None:
        per = "row"  # each node's row already holds all its couplings
    kept, n_sig = [], 0
    col_best = None  # running top-k per column: flat indices and strengths, [k, m]
    for r0, r1 in _blocks(n, block_rows):
        z = _zscores(value[r0:r1], stderr[r0:r1])
        sig = (np.abs(z) >= z_c) & (pairs(r0, r1) | (symmetric and top_k is not None))
        if symmetric:
            np.fill_diagonal(sig[:, r0:], False)
        n_sig += int((sig & pairs(r0, r1)).sum())
        if top_k is None:
            keep = sig
        else:
            strength = np.where(sig, np.abs(value[r0:r1] if rank_by == "abs" else z), -np.inf)
            keep = _top(strength, top_k, 1) if per in ("both", "row") else np.zeros_like(sig)
            if per in ("both", "col"):
                flat = (np.arange(r0, r1)[:, None] * m + np.arange(m)[None]).astype(np.int64)
                if col_best is not None:
                    strength = np.concatenate([col_best[1], strength])
                    flat = np.concatenate([col_best[0], flat])
                if strength.shape[0] > top_k:
                    best = np.argpartition(-strength, top_k - 1, axis=0)[:top_k]
                    strength = np.take_along_axis(strength, best, 0)
                    flat = np.take_along_axis(flat, best, 0)
                col_best = (flat, strength)
        r, c = np.nonzero(keep)
        kept.append((r + r0).astype(np.int64) * m + c)
    idx = np.concatenate(kept)
    if col_best is not None:
        idx = np.union1d(idx, col_best[0][np.isfinite(col_best[1])])
    rows, cols = idx // m, idx % m
    if symmetric:
        rows, cols = np.minimum(rows, cols), np.maximum(rows, cols)
        idx = np.unique(rows * m + cols)
        rows, cols = idx // m, idx % m
    v, s = value.ravel()[idx], stderr.ravel()[idx]
    z = _zscores(v, s)
    facts = {"test": TEST if level is not None else "none", "correction": correction,
             "level": level, "n_tests": n_tests, "z_threshold": z_c if level else None,
             "n_significant": n_sig if level else None, "top_k": top_k,
             "per": per if top_k else None, "rank_by": rank_by if top_k else None,
             "n_kept": len(idx)}
    return Edges(rows, cols, v, s, z, 2 * special.ndtr(-np.abs(z)), facts)


# ---- graphs -----------------------------------------------------------------------------
_HEAD, _SUB, _LAYER = re.compile(r"L(\d+)H(\d+)"), re.compile(r"L(\d+)\.(attn|mlp)"), \
    re.compile(r"L(\d+)")


def component_facts(name: str) -> dict:
    """``kind`` (head, attn, mlp, layer, embed, ..., circuit) and ``layer`` / ``head``."""
    if "+" in name:
        return {"kind": "circuit"}
    if m := _HEAD.fullmatch(name):
        return {"kind": "head", "layer": int(m[1]), "head": int(m[2])}
    if m := _SUB.fullmatch(name):
        return {"kind": m[2], "layer": int(m[1])}
    if m := _LAYER.fullmatch(name):
        return {"kind": "layer", "layer": int(m[1])}
    return {"kind": name}


def _scalar(x):
    if isinstance(x, torch.Tensor | np.generic | np.ndarray):
        x = x.item()
    if isinstance(x, bool | int | float | str):
        return x
    raise ConfigError(f"node attributes must be numbers, booleans or strings; got {x!r}")


def _attrs(attrs: dict | None, n: int, what: str) -> dict[str, list]:
    out = {}
    for key, seq in (attrs or {}).items():
        seq = seq.tolist() if isinstance(seq, torch.Tensor | np.ndarray) else list(seq)
        if len(seq) != n:
            raise ShapeError(f"{what} attribute {key!r} has {len(seq)} entries; need {n}")
        out[key] = seq
    return out


def build(est: Estimate, *, level: float | None = 0.05, correction: str = "bonferroni",
          top_k: int | None = None, per: str = "both", rank_by: str = "abs",
          rows: dict | None = None, cols: dict | None = None,
          row_names: list | None = None, col_names: list | None = None,
          keep_isolated: bool = False) -> nx.Graph:
    """The coupling graph of a 2-D estimate (filter: :func:`select`; same arguments).

    Nodes are ``"{dim}:{name}"`` strings (e.g. ``"token:17"``, ``"component:L1H6"``) with
    ``part`` (the dim), ``index``, ``label``, ``bipartite`` (0 rows, 1 columns), the parsed
    ``kind`` / ``layer`` / ``head`` of component names (from ``est.meta["components"]`` or
    ``col_names``) and your own per-node attributes ``rows`` / ``cols`` (``{name: [n]}``, e.g.
    ``{"type": ..., "loss": ..., "token_id": ...}``). Edges carry ``value`` (the estimate's
    convention, ``G.graph["convention"]``), ``stderr``, ``z``, ``p``, ``weight = |value|``.
    Data nodes without a kept edge are left out unless ``keep_isolated``.
    """
    e = select(est, level=level, correction=correction, top_k=top_k, per=per,
               rank_by=rank_by)
    n, m = est.value.shape
    symmetric = est.dims[0] == est.dims[1]
    col_names = col_names or (est.meta.get("components") if est.dims[1] == "component"
                              else None)
    names = [list(row_names or range(n)), list(col_names or range(m))]
    if len(names[0]) != n or len(names[1]) != m:
        raise ShapeError(f"row_names / col_names have {len(names[0])} / {len(names[1])} "
                         f"entries; the estimate is {n} x {m}")
    extra = [_attrs(rows, n, "row"), _attrs(cols if not symmetric else rows, m, "column")]
    ids = [[f"{est.dims[s]}:{x}" for x in names[s]] for s in (0, 1)]

    def node(side: int, i: int):
        a = {"part": est.dims[side], "index": i, "label": str(names[side][i])}
        if not symmetric:
            a["bipartite"] = side
        if est.dims[side] == "component":
            a.update(component_facts(str(names[side][i])))
        a.update({k: _scalar(v[i]) for k, v in extra[side].items()})
        return ids[side][i], a

    G = nx.Graph()
    G.graph.update({k: v for k, v in e.facts.items() if v is not None})
    G.graph.update(name=est.name, convention=est.convention, dims=",".join(est.dims))
    used = range(n) if keep_isolated else np.unique(e.rows).tolist()
    G.add_nodes_from(node(0, i) for i in used)
    if symmetric:
        G.add_nodes_from(node(0, i) for i in np.unique(e.cols).tolist() if i not in G)
    else:
        G.add_nodes_from(node(1, j) for j in range(m))
    right = ids[0] if symmetric else ids[1]
    G.add_edges_from(
        (ids[0][r], right[c], {"value": v, "stderr": s, "z": z, "p": p, "weight": abs(v)})
        for r, c, v, s, z, p in zip(e.rows.tolist(), e.cols.tolist(), e.value.tolist(),
                                    e.stderr.tolist(), e.z.tolist(), e.p.tolist()))
    return G


def edge_table(G: nx.Graph):
    """A pandas DataFrame, one row per edge: ``source``, ``target`` and the edge attributes."""
    import pandas as pd

    return pd.DataFrame([{"source": u, "target": v, **d} for u, v, d in G.edges(data=True)])


def project(G: nx.Graph, side: int = 1) -> nx.Graph:
    """Projection of a bipartite coupling graph onto one side (1: components, 0: data).

    Two nodes of ``side`` are linked when their signed coupling vectors over the other side
    (``value`` on kept edges, 0 elsewhere) have positive cosine similarity: edge ``weight`` =
    that cosine, ``shared`` = the number of nodes of the other side both couple to. Built with
    a sparse product, so it costs ``O(kept edges)``, not ``O(rows x cols)``.
    """
    if "bipartite" not in next(iter(G.nodes.values()), {"bipartite": 0}):
        raise ConfigError("project needs a bipartite coupling graph (a loss-kernel graph is "
                          "already sample-sample)")
    mine = [u for u, d in G.nodes(data=True) if d["bipartite"] == side]
    other = [u for u, d in G.nodes(data=True) if d["bipartite"] != side]
    pos_m, pos_o = {u: i for i, u in enumerate(mine)}, {u: i for i, u in enumerate(other)}
    r, c, v = [], [], []
    for a, b, d in G.edges(data=True):
        a, b = (a, b) if a in pos_m else (b, a)
        r.append(pos_m[a])
        c.append(pos_o[b])
        v.append(d["value"])
    a = sparse.csr_matrix((v, (r, c)), shape=(len(mine), len(other)))
    ones = a.copy()
    ones.data[:] = 1.0
    dot, shared = (a @ a.T).tocoo(), (ones @ ones.T).tocsr()
    norm = np.sqrt(np.asarray(a.multiply(a).sum(1)).ravel())
    P = nx.Graph()
    P.graph.update(G.graph, projection=f"side {side}: cosine of signed couplings (> 0 kept)")
    P.add_nodes_from((u, G.nodes[u]) for u in mine)
    for i, j, x in zip(dot.row.tolist(), dot.col.tolist(), dot.data.tolist()):
        cos = x / (norm[i] * norm[j])
        if i < j and cos > 0:
            P.add_edge(mine[i], mine[j], weight=float(cos), shared=int(shared[i, j]))
    return P


def communities(G: nx.Graph, method: str = "louvain", *, weight: str = "weight",
                seed: int = 0) -> list[frozenset]:
    """Communities with networkx's algorithms, largest first: ``"louvain"``, ``"greedy"``
    (greedy modularity) or ``"label_propagation"`` (asynchronous, seeded)."""
    algos = {"louvain": lambda: nx.community.louvain_communities(G, weight=weight, seed=seed),
             "greedy": lambda: nx.community.greedy_modularity_communities(G, weight=weight),
             "label_propagation": lambda: nx.community.asyn_lpa_communities(
                 G, weight=weight, seed=seed)}
    if method not in algos:
        raise ConfigError(f"method={method!r} must be one of {sorted(algos)}")
    found = [frozenset(c) for c in algos[method]()]
    return sorted(found, key=lambda c: (-len(c), sorted(c)))


def type_summary(G: nx.Graph, attr: str = "type"):
    """Which components couple to which data types: a tidy DataFrame, one row per (column node,
    type): ``n_edges``, ``n_negative`` (edges with ``value < 0``), ``mean_value``, ``mean_z``
    over the kept edges between that node and data nodes whose ``attr`` is that type."""
    import pandas as pd

    rows = []
    for u, v, d in G.edges(data=True):
        a, b = (u, v) if G.nodes[u].get("bipartite") == 1 else (v, u)
        if attr not in G.nodes[b]:
            raise ConfigError(f"data node {b!r} has no attribute {attr!r}; pass it in "
                              f"build(rows={{{attr!r}: ...}})")
        rows.append({"node": a, attr: G.nodes[b][attr], "value": d["value"], "z": d["z"]})
    cols = ["node", attr, "n_edges", "n_negative", "mean_value", "mean_z"]
    if not rows:
        return pd.DataFrame(columns=cols)
    t = pd.DataFrame(rows)
    t["negative"] = t["value"] < 0
    out = t.groupby(["node", attr]).agg(n_edges=("value", "size"),
                                        n_negative=("negative", "sum"),
                                        mean_value=("value", "mean"), mean_z=("z", "mean"))
    return out.reset_index()[cols]


# ---- loss-kernel map ----------------------------------------------------------------------
def adjusted_rand_index(a, b) -> float:
    """Adjusted Rand index of two labelings (1: identical partitions, ~0: chance)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ShapeError(f"labelings have {a.size} and {b.size} entries")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(table, (ia, ib), 1)
    comb = (lambda x: (x * (x - 1) / 2).sum())
    index, ra, rb = comb(table), comb(table.sum(1)), comb(table.sum(0))
    expected = ra * rb / comb(np.array([a.size]))
    top = (ra + rb) / 2
    return 1.0 if top == expected else float((index - expected) / (top - expected))


def kernel_map(kernel: Estimate | torch.Tensor, labels=None, *, n_components: int = 2,
               n_clusters: int | None = None, method: str = "average") -> dict:
    """Kernel PCA and hierarchical clustering of samples from a loss kernel ``[n, n]``.

    Kernel PCA: the doubly centered kernel ``H K H = V diag(lam) V^T`` (``H = I - 11^T/n``);
    ``coords = V[:, :k] sqrt(lam[:k])`` (``[n, k]``), ``explained`` = ``lam[:k] / sum(lam > 0)``.
    Clustering: scipy's ``linkage(method)`` on the kernel distance
    ``d_ij = sqrt(K_ii + K_jj - 2 K_ij)`` (for a correlation kernel ``sqrt(2 (1 - R_ij))``),
    cut into ``n_clusters`` (default: the number of distinct ``labels``). With ``labels``,
    ``ari`` is the adjusted Rand index of the clusters against them.
    Returns ``{"coords", "explained", "clusters" [n], "linkage", "ari"}`` (numpy arrays).
    """
    k = kernel.value if isinstance(kernel, Estimate) else kernel
    k = np.asarray(torch.as_tensor(k).detach().cpu(), dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 3:
        raise ShapeError(f"kernel_map needs a square kernel [n, n] with n >= 3; got {k.shape}")
    if not np.isfinite(k).all():
        raise ShapeError("the kernel holds NaN/inf; drop those samples first")
    k = (k + k.T) / 2
    n = k.shape[0]
    if labels is not None:
        labels = np.asarray(torch.as_tensor(labels)).ravel()
        if labels.size != n:
            raise ShapeError(f"labels has {labels.size} entries for a {n} x {n} kernel")
    if n_clusters is None:
        if labels is None:
            raise ConfigError("give n_clusters or labels (whose distinct values set it)")
        n_clusters = len(np.unique(labels))
    h = np.eye(n) - 1.0 / n
    lam, vec = np.linalg.eigh(h @ k @ h)
    lam, vec = lam[::-1], vec[:, ::-1]
    coords = vec[:, :n_components] * np.sqrt(np.clip(lam[:n_components], 0, None))
    diag = np.diag(k)
    dist = np.sqrt(np.clip(diag[:, None] + diag[None] - 2 * k, 0, None))
    link = hierarchy.linkage(squareform(dist, checks=False), method=method)
    clusters = hierarchy.fcluster(link, n_clusters, criterion="maxclust")
    return {"coords": coords, "explained": lam[:n_components] / lam[lam > 0].sum(),
            "clusters": clusters, "linkage": link,
            "ari": adjusted_rand_index(clusters, labels) if labels is not None else None}


# ---- files --------------------------------------------------------------------------------
def save(G: nx.Graph, path: str | Path) -> Path:
    """Write ``.graphml``, ``.gexf`` or node-link ``.json`` (by the suffix); :func:`load` reads
    it back equal. GEXF keeps nodes, edges and their attributes but not ``G.graph``."""
    path = Path(path)
    if path.suffix == ".graphml":
        nx.write_graphml(G, path)
    elif path.suffix == ".gexf":
        nx.write_gexf(G, path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(nx.node_link_data(G, edges="edges")))
    else:
        raise ConfigError(f"unknown graph format {path.suffix!r}; use one of {FORMATS}")
    return path


def load(path: str | Path) -> nx.Graph:
    """Read a graph written by :func:`save`."""
    path = Path(path)
    if path.suffix == ".graphml":
        G = nx.read_graphml(path)
        for key in ("node_default", "edge_default"):
            G.graph.pop(key, None)
        return G
    if path.suffix == ".gexf":
        G = nx.read_gexf(path, node_type=str)
        for _, _, d in G.edges(data=True):
            d.pop("id", None)
        return nx.Graph(G)
    if path.suffix == ".json":
        return nx.node_link_graph(json.loads(path.read_text()), edges="edges")
    raise ConfigError(f"unknown graph format {path.suffix!r}; use one of {FORMATS}")


def figure(G: nx.Graph, *, max_nodes: int = 300, seed: int = 0):
    """A ``matplotlib.figure.Figure`` of a small graph (no pyplot state): components as black
    squares labelled with their names (``L0H1``), data nodes as circles coloured by ``type``
    (if present, with a legend), edges red for ``value < 0`` and blue for ``value > 0``
    (the estimate's convention, in the title). Labels are never clipped: the axes get margins
    and the layout is constrained."""
    if G.number_of_nodes() > max_nodes:
        raise ConfigError(f"the graph has {G.number_of_nodes()} nodes; draw() is for at most "
                          f"max_nodes={max_nodes}: filter harder (top_k, level) or raise it")
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    pos = nx.spring_layout(G, seed=seed, weight=None)
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    colors = ["tab:red" if d.get("value", 0) < 0 else "tab:blue" for *_, d in G.edges(data=True)]
    nx.draw_networkx_edges(G, pos, ax=ax, edge_color=colors, alpha=0.4, width=0.8)
    comp = [u for u, d in G.nodes(data=True) if d.get("bipartite") == 1]
    data = [u for u in G if u not in set(comp)]
    types = [str(G.nodes[u].get("type", "")) for u in data]
    codes = {t: i for i, t in enumerate(sorted(set(types)))}
    cmap = colormaps["tab10"]
    nx.draw_networkx_nodes(G, pos, nodelist=data, ax=ax, node_size=25,
                           node_color=[cmap(codes[t] % 10) for t in types])
    nx.draw_networkx_nodes(G, pos, nodelist=comp, ax=ax, node_shape="s", node_size=60,
                           node_color="black")
    for u in comp:
        ax.annotate(G.nodes[u]["label"], pos[u], xytext=(0, 6), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8, annotation_clip=False,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                          "alpha": 0.8})
    ax.margins(0.12)
    ax.set_axis_off()
    handles = [Line2D([], [], color="tab:red", label="value < 0"),
               Line2D([], [], color="tab:blue", label="value > 0")]
    if comp:
        handles.append(Line2D([], [], ls="", marker="s", color="black", label="component"))
    if any(types):
        handles += [Line2D([], [], ls="", marker="o", color=cmap(codes[t] % 10), label=t)
                    for t in codes]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    title = f"{G.graph.get('name', '')}: {G.number_of_edges()} couplings"
    if G.graph.get("convention"):
        title += f"\nedge value = {G.graph['convention']}"
    ax.set_title(title, fontsize=9)
    return fig


def draw(G: nx.Graph, path: str | Path, *, max_nodes: int = 300, seed: int = 0) -> Path:
    """Save :func:`figure` of ``G`` as a PNG at ``path``; returns the path."""
    figure(G, max_nodes=max_nodes, seed=seed).savefig(path, dpi=120)
    return Path(path)
