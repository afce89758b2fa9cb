"""Head-level readouts of a one-run susceptibility: which data a head depends on, and which
heads a kind of data depends on (docs/theory.md section 5; signs as in ``docs/conventions.md``).

- :func:`head_table`: the ``[component, group]`` table of the mean susceptibility over a token
  group ``G``, ``chi[C, G] = (1/|G|) sum_{x in G} chi[x, C]`` with
  ``chi[x, C] = -Cov(phi_C, l^C_x - Lbar_S(w^C))`` (exactly the susceptibility of the group's
  mean loss: chi is linear in the token loss); the within-layer contrast
  ``d[C, G] = chi[C, G] - mean_{C' in layer(C)} chi[C', G]`` (removes the mode shared by all
  heads of a layer); and the mean per-token fluctuation ``(n_beta/2) mean_{x in G}
  Var(l^C_x - Lbar_S(w^C))``. Standard errors: leave-one-segment-out jackknife over the run's
  segments (blocks of consecutive draws of each chain), computed jointly for all components
  so that the contrast's error includes the heads' covariance. ``chi < 0``: up-weighting the
  group's tokens lowers C's loss (C expresses them).
- :func:`cross_table`: the same group means of the cross susceptibility
  ``-Cov(phi_C, l_x(w) - Lbar_S(w))`` (the full model's token loss: exactly the derivative
  ``d E[phi_C] / d rho`` of up-weighting the group in the posterior, up to ``beta``).
- :func:`against_control`: ``chi - chi_0``, the table minus its spring-only control's (what the
  loss adds over the geometry at w*), errors in quadrature.
- :func:`top_data`: per component, the tokens or sequences with the most negative (or
  positive) susceptibility, i.e. the rows of the BIF of the head's restricted observable
  ``phi_C``, with their context.
- :func:`cluster`, :func:`adjusted_rand`: hierarchical clustering of heads (scipy) and its
  agreement with known roles; :func:`pca_roles`: which principal component of the
  standardized matrix separates which roles; :func:`within_layer_spearman`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from suscept.anomaly import auroc
from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate
from suscept.estimators import jackknife
from suscept.moments import Moments
from suscept.run import Run
from suscept.susceptibilities import FULL, PHI, RESTRICTED, pca, spearman, standardize

HEAD = re.compile(r"^L(\d+)H(\d+)$")
DTYPE = torch.float64


@dataclass(frozen=True)
class Groups:
    """Token groups: ``names [G]`` and the membership ``members [X, G]`` (bool; groups may
    overlap, a token may belong to none)."""

    names: list[str]
    members: Tensor

    @property
    def weights(self) -> Tensor:
        """``[X, G]``: ``1/|G|`` for members, 0 otherwise (a group mean is ``y @ weights``)."""
        m = self.members.to(DTYPE)
        return m / m.sum(0).clamp(min=1)


def token_groups(spec, tokens: Sequence[str] | None = None, names: Sequence | None = None
                 ) -> Groups:
    """Token groups from labels, regular expressions or a function.

    Args:
        spec: one label per token ``[X]`` (ints or strings; one group per distinct label,
            ``None`` / negative ints belong to none); a dict ``{name: regex}`` or one regex
            (groups ``regex`` and ``"other"``) matched (``re.search``) against ``tokens``; or
            a function ``f(token_string) -> label or None``.
        tokens: ``[X]`` strings describing each token (needed for regexes and functions),
            e.g. :func:`contexts`.
        names: for labels and functions, the labels to make groups of, in this order
            (default: every distinct label, sorted).
    """
    if isinstance(spec, str):
        spec = {spec: spec}
        other = True
    else:
        other = False
    if isinstance(spec, dict) or callable(spec):
        if tokens is None:
            raise ConfigError("regex or function groups need tokens=[X] strings to match")
    if isinstance(spec, dict):
        names = list(spec)
        members = torch.tensor([[re.search(p, t) is not None for p in spec.values()]
                                for t in tokens], dtype=torch.bool).reshape(len(tokens), -1)
        if other:
            names.append("other")
            members = torch.cat([members, ~members.any(1, keepdim=True)], 1)
        return _checked(names, members)
    labels = [spec(t) for t in tokens] if callable(spec) else (
        spec.tolist() if isinstance(spec, Tensor) else list(spec))
    if names is None:
        keep = {lab for lab in labels if lab is not None and not (isinstance(lab, int) and lab < 0)}
        names = sorted(keep, key=lambda v: (str(type(v)), v))
    members = torch.tensor([[lab == n for n in names] for lab in labels], dtype=torch.bool)
    return _checked([str(n) for n in names], members.reshape(len(labels), len(names)))


def sequence_groups(n_sequences: int, n_tokens: int) -> Groups:
    """One group per sequence, for token rows ordered ``(sequence, position)``: a sequence's
    susceptibility is its tokens' mean (exact), with joint jackknife errors."""
    members = torch.eye(n_sequences, dtype=torch.bool).repeat_interleave(n_tokens, 0)
    return Groups([str(i) for i in range(n_sequences)], members)


def _checked(names: list[str], members: Tensor) -> Groups:
    empty = [n for n, c in zip(names, members.sum(0).tolist()) if c == 0]
    if not names or empty:
        raise ConfigError(f"token groups {empty or names} hold no token; check the labels or "
                          "regexes against the token strings")
    return Groups(names, members)


def layers_of(components: Sequence[str]) -> list[int | None]:
    """Layer of each ``L{l}H{h}`` head; ``None`` for other components (no contrast)."""
    return [int(m.group(1)) if (m := HEAD.match(c)) else None for c in components]


# ---- the head x token-group table ---------------------------------------------------------
def _replicates(moments: list[Moments], stat: Callable[[Moments], Tensor]) -> tuple[Tensor,
                                                                                     Tensor]:
    """``stat`` on every component's merged Moments ``[K, ...]`` and its leave-one-segment-out
    replicates ``[S, K, ...]`` (the same segments for all components)."""
    n0 = moments[0].n
    if any(m.n.shape != n0.shape or not torch.equal(m.n, n0) for m in moments):
        raise ShapeError("the components' Moments have different segments; they must come "
                         "from one run")
    values, reps = [], []
    for m in moments:
        total = m.total()
        values.append(stat(total)[0])
        reps.append(torch.stack([stat(total.remove(m.segment(s)))[0]
                                 for s in range(m.n_segments)]))
    return torch.stack(values), torch.stack(reps, 1)


def _jackknife_se(reps: Tensor) -> Tensor:
    s = reps.shape[0]
    if s < 2:
        return torch.full_like(reps[0], float("nan"))
    return ((reps - reps.mean(0)) ** 2).sum(0).mul((s - 1) / s).sqrt()


def _layer_contrast(x: Tensor, layers: list[int | None]) -> Tensor:
    """``x[..., C, G]`` minus its mean over the components of C's layer (NaN for non-heads)."""
    out = torch.full_like(x, float("nan"))
    for layer in {v for v in layers if v is not None}:
        idx = torch.tensor([i for i, v in enumerate(layers) if v == layer])
        out[..., idx, :] = x[..., idx, :] - x[..., idx, :].mean(-2, keepdim=True)
    return out


@dataclass(frozen=True)
class HeadTable:
    """Head x token-group readouts (module docstring). Estimates have dims
    ``("component", "group")``; ``z_zero = chi / se``, ``z_layer = contrast / se``."""

    susceptibility: Estimate
    contrast: Estimate
    fluctuation: Estimate | None
    n_tokens: list[int]

    @property
    def components(self) -> list[str]:
        return self.susceptibility.meta["components"]

    @property
    def groups(self) -> list[str]:
        return self.susceptibility.meta["groups"]

    @property
    def z_zero(self) -> Tensor:
        return self.susceptibility.value / self.susceptibility.stderr

    @property
    def z_layer(self) -> Tensor:
        return self.contrast.value / self.contrast.stderr

    def markdown(self, what: str = "susceptibility") -> str:
        """A table ``value ± se (z)`` per component and group (``what``: an attribute)."""
        est = getattr(self, what)
        z = est.value / est.stderr
        lines = ["| component | " + " | ".join(f"{g} (n={n})" for g, n in
                                               zip(self.groups, self.n_tokens)) + " |",
                 "|---" * (len(self.groups) + 1) + "|"]
        for i, c in enumerate(self.components):
            cells = [f"{est.value[i, j]:.3g} ± {est.stderr[i, j]:.2g} ({z[i, j]:+.1f})"
                     for j in range(len(self.groups))]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("susceptibility", "contrast", "fluctuation"):
            if getattr(self, name) is not None:
                getattr(self, name).save(folder / f"{name}.pt")
        (folder / "head_table.json").write_text(json.dumps({"n_tokens": self.n_tokens}))
        return folder

    @staticmethod
    def load(folder: str | Path) -> HeadTable:
        folder = Path(folder)
        fl = folder / "fluctuation.pt"
        return HeadTable(Estimate.load(folder / "susceptibility.pt"),
                         Estimate.load(folder / "contrast.pt"),
                         Estimate.load(fl) if fl.exists() else None,
                         json.loads((folder / "head_table.json").read_text())["n_tokens"])


def head_table(source: Run | list[Moments], groups: Groups | None, *,
               components: list[str] | None = None, layers: list[int | None] | None = None,
               n_beta: float | None = None) -> HeadTable:
    """The head x token-group table of a one-run susceptibility (module docstring).

    Args:
        source: a Run that streamed ``Paired("phi", "restricted_token_loss")`` (e.g.
            ``observables.one_run``), or its per-component Moments (x = ``phi_C`` ``[1]``,
            y = ``l^C_x - Lbar_S(w^C)`` ``[X]``).
        groups: token groups over the ``X`` probe tokens (:func:`token_groups`); ``None``:
            one group per token (the per-token table, without an ``[X, X]`` weight matrix).
        components: names of the K components (default: the run's).
        layers: layer of each component for the contrast (default: parsed from ``L{l}H{h}``).
        n_beta: scales the fluctuation ``(n_beta/2) Var`` (default: the run's; without one no
            fluctuation is reported).
    """
    if isinstance(source, Run):
        components = components or source.config.get("components")
        n_beta = n_beta if n_beta is not None else source.config.get("n_beta")
        source = source.paired(PHI, RESTRICTED)
    if not source:
        raise ConfigError("head_table needs the per-component Moments of a one-run "
                          "susceptibility")
    k, x = len(source), source[0].mean_y.shape[1]
    components = list(components) if components else [str(i) for i in range(k)]
    layers = layers_of(components) if layers is None else list(layers)
    if len(components) != k or len(layers) != k:
        raise ShapeError(f"{len(components)} component names / {len(layers)} layers for {k} "
                         "components")
    if groups is None:
        names, n_tokens, mean = [str(i) for i in range(x)], [1] * x, lambda v: v
    else:
        if groups.members.shape[0] != x:
            raise ShapeError(f"groups cover {groups.members.shape[0]} tokens but the run has "
                             f"{x} probe tokens")
        w = groups.weights
        names, n_tokens = groups.names, [int(c) for c in groups.members.sum(0).tolist()]
        mean = lambda v: v @ w  # noqa: E731
    chi, chi_reps = _replicates(source, lambda t: mean(-t.cov()[:, 0]))
    con, con_reps = _layer_contrast(chi, layers), _layer_contrast(chi_reps, layers)
    meta = {"components": components, "groups": names, "layers": layers,
            "n_segments": source[0].n_segments, "n_draws": int(source[0].n.sum()),
            "stderr": "leave-one-segment-out jackknife, joint over components"}
    dims = ("component", "group")
    out = [Estimate(chi, _jackknife_se(chi_reps), dims, "head_table",
                    "mean over the group of -Cov(phi_C, l^C_x - Lbar_S(w^C)); < 0: the group "
                    "lowers C's loss", meta),
           Estimate(con, _jackknife_se(con_reps), dims, "head_table_contrast",
                    "chi[C, G] minus the mean over C's layer", meta)]
    if n_beta is not None:
        fl, fl_reps = _replicates(source, lambda t: mean(0.5 * n_beta * t.var_y()))
        out.append(Estimate(fl, _jackknife_se(fl_reps), dims, "head_table_fluctuation",
                            "(n_beta/2) mean over the group of Var(l^C_x - Lbar_S(w^C))",
                            {**meta, "n_beta": n_beta}))
    else:
        out.append(None)
    return HeadTable(*out, n_tokens=n_tokens)


def cross_table(run: Run, groups: Groups, *, components: list[str] | None = None
                ) -> Estimate:
    """``[component, group]``: the group mean of the cross susceptibility,
    ``chi_cross[C, G] = -Cov(phi_C, (1/|G|) sum_{x in G} l_x(w) - Lbar_S(w))``.

    Up-weighting the group's tokens in the posterior (and the probe's mean down by as much)
    moves ``E[phi_C]`` by ``beta`` times this (docs/theory.md section 5): ``> 0`` raises C's
    restricted loss, ``< 0`` lowers it. Unlike :func:`head_table`'s restricted ``l^C_x``,
    the token loss here is the full model's, so it is the response a fine-tuning of the whole
    model on the group approximates. Errors: leave-one-segment-out jackknife.

    Args:
        run: a Run that streamed the cross variant (``observables.one_run(..., cross=True)``).
        groups: token groups over its ``X`` probe tokens (:func:`token_groups`,
            :func:`sequence_groups`).
        components: names of the K components (default: the run's).
    """
    m = run.moments_of(PHI, FULL)
    x = m.mean_y.shape[-1]
    if groups.members.shape[0] != x:
        raise ShapeError(f"groups cover {groups.members.shape[0]} tokens but the run has {x} "
                         "probe tokens")
    w = groups.weights
    value, se = jackknife(m, lambda t: -(t.cov().double() @ w))
    components = components or run.config.get("components")
    meta = {"components": components, "groups": groups.names, "cross": True,
            "n_segments": m.n_segments, "n_draws": int(m.n.sum()),
            "stderr": "leave-one-segment-out jackknife"}
    return Estimate(value, se, ("component", "group"), "cross_table",
                    "mean over the group of -Cov(phi_C, l_x(w) - Lbar_S(w)); < 0: the group "
                    "lowers C's loss", meta)


def against_control(run: Estimate, control: Estimate) -> Estimate:
    """What the loss adds, per entry: ``Delta = chi - chi_0``, a run's head table (e.g.
    ``HeadTable.susceptibility`` or ``.contrast``) minus the same table of its spring-only
    control (``n_beta = 0`` draws with the run's step size and gamma, docs/regime.md), dims and
    shape of ``run`` (e.g. ``("component", "group")``). The two must come from independent
    draws (the control on another seed): ``se = sqrt(se^2 + se_0^2)``. Sign as chi's:
    ``Delta < 0``: under the loss the group lowers C's loss more than under the spring alone.
    """
    if run.shape != control.shape or run.dims != control.dims:
        raise ShapeError(f"control has dims {control.dims} {control.shape}, the run "
                         f"{run.dims} {run.shape}; give the same table of both")
    for key in ("components", "groups"):
        if key in run.meta and key in control.meta and run.meta[key] != control.meta[key]:
            raise ShapeError(f"the control's {key} differ from the run's; compute both tables "
                             "with the same components and groups")
    return Estimate(run.value - control.value, torch.hypot(run.stderr, control.stderr),
                    run.dims, f"{run.name}_minus_control",
                    f"({run.convention}) minus the same under the spring-only control",
                    {**run.meta, "stderr": "independent errors added in quadrature"})


# ---- per-head data attribution ------------------------------------------------------------
def contexts(tokens: Tensor, decode: Callable[[int], str] | Sequence[str] | None = None,
             width: int = 6) -> list[str]:
    """``[N * (pos - 1)]`` strings for the token rows of ``tokens [N, pos]`` (row ``(i, s)``
    predicts token ``s + 1``): the last ``width`` context tokens, then ``-> [target]``."""
    dec = (decode.__getitem__ if isinstance(decode, Sequence) else decode) or str
    words = [[dec(int(t)) for t in row] for row in tokens]
    return [" ".join(row[max(0, s - width + 1):s + 1]) + f" -> [{row[s + 1]}]"
            for row in words for s in range(len(row) - 1)]


def top_data(attribution: Estimate, k: int = 10, *, labels: Sequence[str] | None = None,
             order: str = "negative") -> dict[str, list[dict]]:
    """Per component, the ``k`` data rows with the most extreme attribution.

    Args:
        attribution: ``[data, component]`` (``susceptibility(run)``: token rows) or
            ``[component, group]`` (``head_table(...).susceptibility`` with
            :func:`sequence_groups`: sequence rows).
        labels: a string per data row (:func:`contexts`), shown beside it.
        order: ``"negative"`` (default: the data that lower the component's loss most,
            ``chi < 0``), ``"positive"`` or ``"abs"``.
    Returns:
        ``{component: [{"index", "value", "stderr", "z", "label"}, ...]}``, best first.
    """
    value, se = attribution.value, attribution.stderr
    if attribution.dims[0] == "component":
        value, se = value.T, se.T
    names = attribution.meta.get("components") or [str(i) for i in range(value.shape[1])]
    key = {"negative": -value, "positive": value, "abs": value.abs()}.get(order)
    if key is None:
        raise ConfigError(f"order={order!r} must be 'negative', 'positive' or 'abs'")
    if labels is not None and len(labels) != value.shape[0]:
        raise ShapeError(f"{len(labels)} labels for {value.shape[0]} data rows")
    out = {}
    for c, name in enumerate(names):
        idx = key[:, c].topk(min(k, value.shape[0])).indices.tolist()
        out[name] = [{"index": i, "value": float(value[i, c]), "stderr": float(se[i, c]),
                      "z": float(value[i, c] / se[i, c]),
                      "label": labels[i] if labels is not None else None} for i in idx]
    return out


# ---- clustering, PCA and agreement with known roles ---------------------------------------
def head_vectors(matrix: Tensor | Estimate) -> Tensor:
    """``[K, X]``: each component's column of the standardized ``[token, component]`` matrix
    (Gordon et al.: z-score columns, subtract row means), the vectors heads are clustered by."""
    return standardize(matrix).T


def cluster(vectors: Tensor, n_clusters: int, *, method: str = "average",
            metric: str = "correlation") -> dict:
    """Hierarchical clustering of ``vectors [K, F]`` (one row per component; e.g.
    :func:`head_vectors`, or the rows of a :class:`HeadTable` contrast / ``z_layer``).

    Returns ``labels [K]`` (1..n_clusters) and the scipy ``linkage [K-1, 4]`` (for a
    dendrogram). ``metric`` and ``method`` are scipy's (``pdist``, ``linkage``).
    """
    from scipy.cluster import hierarchy
    from scipy.spatial.distance import pdist

    v = vectors.double().cpu().numpy()
    if v.ndim != 2 or v.shape[0] < 2:
        raise ShapeError(f"cluster needs [K >= 2, F] vectors; got {tuple(vectors.shape)}")
    z = hierarchy.linkage(pdist(v, metric=metric), method=method)
    labels = hierarchy.fcluster(z, t=n_clusters, criterion="maxclust")
    return {"labels": torch.as_tensor(labels), "linkage": torch.as_tensor(z)}


def adjusted_rand(a: Sequence, b: Sequence) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie 1985): 1 for identical partitions,
    0 in expectation for random ones. ``(I - E) / (M - E)`` with ``I = sum_ij C(n_ij, 2)``,
    ``E = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2)``, ``M = (sum_i C(a_i, 2) +
    sum_j C(b_j, 2)) / 2`` over the contingency table ``n_ij``."""
    a, b = list(a), list(b)
    if len(a) != len(b) or len(a) < 2:
        raise ShapeError(f"adjusted_rand needs two labelings of the same n >= 2 items; got "
                         f"{len(a)} and {len(b)}")
    ia = {v: i for i, v in enumerate(dict.fromkeys(a))}
    ib = {v: i for i, v in enumerate(dict.fromkeys(b))}
    table = torch.zeros(len(ia), len(ib), dtype=DTYPE)
    for u, v in zip(a, b):
        table[ia[u], ib[v]] += 1

    def c2(t: Tensor) -> float:
        return float((t * (t - 1) / 2).sum())

    index, sa, sb = c2(table), c2(table.sum(1)), c2(table.sum(0))
    expected = sa * sb / (len(a) * (len(a) - 1) / 2)
    top = (sa + sb) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def pca_roles(matrix: Tensor | Estimate, roles: Sequence[str], n_pcs: int = 3) -> dict:
    """The PCA route: PCA of the standardized ``[token, component]`` matrix, and for each PC
    and each role the AUROC of the role's heads' loadings against the other heads' (1: the
    role's heads load highest on that PC, 0: lowest, 0.5: not separated).

    Returns ``loadings [pc, K]``, ``explained [pc]``, ``separation[role] [pc]`` and
    ``best[role] = (pc, auroc)`` (the PC with the AUROC farthest from 0.5).
    """
    z = standardize(matrix)
    if len(roles) != z.shape[1]:
        raise ShapeError(f"{len(roles)} roles for {z.shape[1]} components")
    p = pca(z, n_pcs)
    sep, best = {}, {}
    for role in dict.fromkeys(roles):
        member = torch.tensor([r == role for r in roles])
        if member.all():
            continue
        sep[role] = torch.tensor([auroc(p["loadings"][i], member).value
                                  for i in range(p["loadings"].shape[0])])
        i = int((sep[role] - 0.5).abs().argmax())
        best[role] = (i, float(sep[role][i]))
    return {"loadings": p["loadings"], "explained": p["explained"], "separation": sep,
            "best": best}


def within_layer_spearman(score: Tensor, reference: Tensor, layers: Sequence[int | None]
                          ) -> dict[int, float]:
    """Per layer, the Spearman correlation of ``score [K]`` and ``reference [K]`` over that
    layer's heads (NaN when either is constant there)."""
    out = {}
    for layer in sorted({v for v in layers if v is not None}):
        idx = torch.tensor([i for i, v in enumerate(layers) if v == layer])
        a, b = score[idx].double()[:, None], reference[idx].double()[:, None]
        r = spearman(a, b)[0] if len(idx) > 1 and a.std() > 0 and b.std() > 0 else math.nan
        out[layer] = float(r)
    return out
