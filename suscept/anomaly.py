"""Anomaly detection by susceptibility profiles.

A *profile* is one input's vector over components, ``x [K]``: its row of a susceptibility
matrix ``chi [token, component]`` (or a sequence's mean row; any convention, as long as the
reference and the scored inputs share it). :func:`fit` learns what trusted profiles look like
and calibrates a threshold; :meth:`Detector.score` says how far new profiles are from them and
:meth:`Detector.contributions` which components make them far.

Scores (larger = more anomalous), both sums of per-component contributions ``c [m, K]``:

- ``"mahalanobis"`` (default): ``s(x) = d^T P d`` with ``d = x - mean`` and ``P`` the inverse
  of the Ledoit-Wolf shrunk covariance of the trusted profiles,
  ``S = (1 - a) S_emp + a (tr S_emp / K) I``. Contributions ``c_C = d_C (P d)_C`` (they sum to
  ``s`` exactly; a negative one means component C makes the input look *more* typical given
  the others). Why: components' profiles are strongly correlated (heads of one layer move
  together), which Mahalanobis accounts for; the shrinkage keeps ``P`` stable when there are
  only a few trusted inputs per component; for Gaussian profiles ``s ~ chi^2_K``.
- ``"knn"``: ``s(x) = (1/k) sum_{r in kNN(x)} sum_C ((x_C - r_C) / sd_C)^2``, the mean squared
  standardized distance to the ``k`` nearest trusted profiles; ``c_C`` is the C term. For
  trusted profiles that are not one ellipsoid (several kinds of input).

Threshold: split-conformal. Scores ``s_1 <= ... <= s_m`` of ``m`` held-out trusted profiles;
``threshold = s_(r)``, ``r = ceil((1 - fpr) (m + 1))``; an input is flagged when
``s > threshold``. For inputs exchangeable with the trusted ones the false-positive rate,
averaged over calibration sets, is exactly ``1 - r / (m + 1) <= fpr``.

Also: the MAD-FA baseline (:func:`madfa_scores`, scores from per-draw loss traces), sequence
pooling of per-token scores (:func:`pool`), and metrics with standard errors (:func:`auroc`,
:func:`auroc_difference`, :func:`conformal_rates`, :func:`detection_rate`, :func:`evaluate`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from suscept.errors import ConfigError, ShapeError
from suscept.estimate import Estimate, load_saved

METHODS = ("mahalanobis", "knn")
DTYPE = torch.float64


def profiles(x: Tensor | Estimate, what: str = "profiles", n_components: int | None = None,
             allow_empty: bool = False) -> Tensor:
    """Validate ``[n, K]`` profiles (a tensor or an Estimate's value) as float64."""
    x = x.value if isinstance(x, Estimate) else x
    if not isinstance(x, Tensor):
        raise ShapeError(f"{what} must be a tensor [n, K] or an Estimate; got {type(x).__name__}")
    if x.ndim != 2:
        raise ShapeError(f"{what} must have shape [n, K] (one profile per row); got "
                         f"{tuple(x.shape)} (for a single profile use x[None])")
    if x.shape[0] == 0 and not allow_empty:
        raise ConfigError(f"{what} is empty: at least one profile is needed")
    if n_components is not None and x.shape[1] != n_components:
        raise ShapeError(f"{what} has {x.shape[1]} components per profile but the detector was "
                         f"fitted on {n_components}; use the same components in the same order")
    bad = (~torch.isfinite(x)).any(1).nonzero().flatten()
    if len(bad):
        raise ShapeError(f"{what} holds NaN/inf in rows {bad[:10].tolist()}"
                         f"{' ...' if len(bad) > 10 else ''}; drop or re-estimate them")
    return x.detach().to(DTYPE).cpu()


def ledoit_wolf(x: Tensor) -> tuple[Tensor, float]:
    """Ledoit-Wolf shrunk covariance of ``x [n, K]`` (centered at its mean, divisor ``n``) and
    the shrinkage ``a`` in ``[0, 1]``: ``(1 - a) S + a (tr S / K) I`` (Ledoit & Wolf 2004)."""
    n, p = x.shape
    xc = x - x.mean(0)
    emp = xc.T @ xc / n
    mu = torch.trace(emp) / p
    x2 = xc**2
    beta_ = (x2.T @ x2).sum()
    delta_ = ((xc.T @ xc) ** 2).sum() / n**2
    beta = (beta_ / n - delta_) / (p * n)
    delta = (delta_ - 2 * mu * torch.diagonal(emp).sum() + p * mu**2) / p
    a = 0.0 if delta == 0 else float(min(beta, delta) / delta)
    return (1 - a) * emp + a * mu * torch.eye(p, dtype=x.dtype), a


@dataclass
class Detector:
    """A fitted detector (see the module docstring for the scores). Build with :func:`fit`.

    Attributes:
        method: ``"mahalanobis"`` or ``"knn"``.
        mean, scale: ``[K]`` mean and standard deviation of the fitted trusted profiles.
        precision: ``[K, K]`` inverse Ledoit-Wolf covariance (Mahalanobis), ``shrinkage`` its a.
        reference: ``[n, K]`` the fitted trusted profiles (kNN; empty for Mahalanobis).
        threshold: flag ``score > threshold``; ``fpr`` the target false-positive rate and
            ``expected_fpr = 1 - r/(m+1)`` the exact one, ``m`` calibration profiles.
        components: names of the K components (from the Estimate's meta), or None.
    """

    method: str
    mean: Tensor
    scale: Tensor
    precision: Tensor
    shrinkage: float
    reference: Tensor
    k: int
    threshold: float = math.inf
    fpr: float = 0.05
    expected_fpr: float = 0.0
    n_calibration: int = 0
    components: list[str] | None = field(default=None)

    @property
    def n_components(self) -> int:
        return self.mean.shape[0]

    def contributions(self, x: Tensor | Estimate) -> Tensor:
        """Per-component terms ``c [m, K]`` of the score; ``c.sum(1) == score(x)``."""
        x = profiles(x, "x", self.n_components)
        if self.method == "mahalanobis":
            d = x - self.mean
            return d * (d @ self.precision)
        out = torch.empty_like(x)
        ref = self.reference / self.scale
        for i0 in range(0, len(x), 1024):  # bounded memory: [1024, n] distances at a time
            xs = x[i0:i0 + 1024] / self.scale
            near = torch.cdist(xs, ref).topk(self.k, dim=1, largest=False).indices  # [b, k]
            out[i0:i0 + 1024] = ((xs[:, None] - ref[near]) ** 2).mean(1)
        return out

    def score(self, x: Tensor | Estimate) -> Tensor:
        """Anomaly scores ``[m]`` (larger: further from the trusted profiles)."""
        return self.contributions(x).sum(1)

    def predict(self, x: Tensor | Estimate) -> Tensor:
        """``[m]`` bool: ``score > threshold`` (an anomaly at the calibrated FPR)."""
        return self.score(x) > self.threshold

    def explain(self, x: Tensor | Estimate, top: int = 3) -> list[list[tuple[str, float]]]:
        """For each input, its ``top`` components by contribution, largest first."""
        c = self.contributions(x)
        names = self.components or [str(i) for i in range(self.n_components)]
        idx = c.argsort(1, descending=True)[:, :top]
        return [[(names[j], float(c[i, j])) for j in row.tolist()] for i, row in enumerate(idx)]

    def calibrate(self, trusted: Tensor | Estimate, fpr: float = 0.05) -> Detector:
        """Set the split-conformal threshold from held-out trusted profiles ``[m, K]``."""
        if not 0 < fpr < 1:
            raise ConfigError(f"fpr={fpr!r} must be in (0, 1)")
        s = self.score(profiles(trusted, "calibration profiles", self.n_components)).sort()[0]
        m = len(s)
        r = math.ceil((1 - fpr) * (m + 1))
        if r > m:
            raise ConfigError(f"{m} calibration profiles cannot calibrate fpr={fpr}: need at "
                              f"least {math.ceil((1 - fpr) / fpr)}; give more trusted profiles")
        self.threshold, self.fpr = float(s[r - 1]), fpr
        self.expected_fpr, self.n_calibration = 1 - r / (m + 1), m
        return self

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to ``path`` (``.pt``); reload with :meth:`Detector.load`."""
        meta = {"method": self.method, "shrinkage": self.shrinkage, "k": self.k,
                "threshold": self.threshold, "fpr": self.fpr, "expected_fpr": self.expected_fpr,
                "n_calibration": self.n_calibration, "components": self.components}
        torch.save({"mean": self.mean, "scale": self.scale, "precision": self.precision,
                    "reference": self.reference, "meta": json.dumps(meta)}, Path(path))
        return Path(path)

    @staticmethod
    def load(path: str | Path) -> Detector:
        d = load_saved(path, "detector", {"mean": Tensor, "scale": Tensor, "precision": Tensor,
                                          "reference": Tensor, "meta": str})
        try:
            det = Detector(mean=d["mean"], scale=d["scale"], precision=d["precision"],
                           reference=d["reference"], **json.loads(d["meta"]))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path} is not a valid saved detector ({e})") from e
        k = det.mean.shape[0] if det.mean.ndim == 1 else -1
        if det.method not in METHODS or k < 1 or det.scale.shape != (k,) or (
                det.method == "mahalanobis" and det.precision.shape != (k, k)) or (
                det.method == "knn" and (det.reference.ndim != 2 or det.reference.shape[1] != k
                                         or not 1 <= det.k <= len(det.reference))):
            raise ConfigError(f"{path} is a damaged or edited detector: method {det.method!r}, "
                              f"mean {tuple(det.mean.shape)}, scale {tuple(det.scale.shape)}, "
                              f"precision {tuple(det.precision.shape)}, reference "
                              f"{tuple(det.reference.shape)}, k {det.k}; fit it again")
        return det


def fit(reference: Tensor | Estimate, calibration: Tensor | Estimate | None = None, *,
        method: str = "mahalanobis", k: int = 5, fpr: float = 0.05,
        calibration_fraction: float = 0.3, seed: int = 0,
        components: list[str] | None = None) -> Detector:
    """Fit a detector on trusted profiles ``[n, K]`` and calibrate its threshold.

    Args:
        reference: trusted profiles (a tensor, or an Estimate ``[sample, component]`` whose
            ``meta["components"]`` names the columns).
        calibration: held-out trusted profiles ``[m, K]`` for the threshold; if None, a random
            ``calibration_fraction`` of ``reference`` (generator seeded with ``seed``) is held
            out and the rest fitted.
        method: ``"mahalanobis"`` (Ledoit-Wolf) or ``"knn"`` (``k`` neighbours).
        fpr: target false-positive rate of :meth:`Detector.predict`.
    """
    if method not in METHODS:
        raise ConfigError(f"method={method!r} must be one of {METHODS}")
    if isinstance(reference, Estimate) and components is None:
        components = reference.meta.get("components")
    ref = profiles(reference, "reference profiles")
    if calibration is None:
        if not 0 < calibration_fraction < 1:
            raise ConfigError(f"calibration_fraction={calibration_fraction!r} must be in (0, 1)")
        perm = torch.randperm(len(ref), generator=torch.Generator().manual_seed(seed))
        n_cal = round(calibration_fraction * len(ref))
        ref, calibration = ref[perm[n_cal:]], ref[perm[:n_cal]]
    n, K = ref.shape
    need = k + 1 if method == "knn" else 2
    if n < need:
        raise ConfigError(f"{n} trusted profiles to fit; {method} needs at least {need}")
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"k={k!r} must be a positive integer")
    scale = ref.std(0)
    if bool((scale == 0).any()):
        raise ShapeError(f"components {(scale == 0).nonzero().flatten().tolist()} are constant "
                         "over the trusted profiles (frozen?); drop them")
    if components is not None and len(components) != K:
        raise ShapeError(f"{len(components)} component names for profiles of {K} components")
    if method == "mahalanobis":
        cov, a = ledoit_wolf(ref)
        precision, reference_kept = torch.linalg.inv(cov), ref[:0]
    else:
        precision, a, reference_kept = torch.eye(K, dtype=DTYPE), 0.0, ref
    det = Detector(method, ref.mean(0), scale, precision, a, reference_kept, k,
                   components=list(components) if components else None)
    return det.calibrate(calibration, fpr)


def tpr_at_fpr(scores: Tensor, positive: Tensor, fpr: float = 0.05) -> float:
    """True-positive rate at the threshold that flags a fraction ``<= fpr`` of the negatives:
    the threshold is the ``ceil((1 - fpr) n_neg)``-th smallest negative score, flag ``>``."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    neg = scores[~positive].sort()[0]
    if len(neg) == 0 or bool(positive.sum() == 0):
        raise ConfigError("tpr_at_fpr needs both positive and negative examples")
    thr = neg[max(0, math.ceil((1 - fpr) * len(neg)) - 1)]
    return float((scores[positive] > thr).double().mean())


# ---- MAD-FA: functional-attribution scores from per-draw loss traces ---------------------
def traces(x: Tensor, what: str = "loss traces") -> Tensor:
    """Per-draw loss traces ``[chain, draw, n]`` (or ``[draw, n]``) as float64 ``[draws, n]``:
    chains concatenated, so that correlations pool every draw (as ``loss_kernel`` does)."""
    if not isinstance(x, Tensor) or x.ndim not in (2, 3):
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{what} must be draws [chain, draw, n] or [draw, n]; got {shape}")
    x = x.detach().to(DTYPE).cpu().reshape(-1, x.shape[-1])
    if x.shape[0] < 3:
        raise ConfigError(f"{what} hold {x.shape[0]} draws; correlations need at least 3")
    bad = (~torch.isfinite(x)).any(0).nonzero().flatten()
    if len(bad):
        raise ShapeError(f"{what} hold NaN/inf for inputs {bad[:10].tolist()}; drop diverged "
                         "chains (run.valid_chains) or those inputs")
    return x


def _standardized(x: Tensor, what: str) -> Tensor:
    xc = x - x.mean(0)
    norm = xc.norm(dim=0)
    if bool((norm == 0).any()):
        raise ShapeError(f"{what}: inputs {(norm == 0).nonzero().flatten()[:10].tolist()} have "
                         "a constant loss over the draws (frozen?); drop them")
    return xc / norm


def trace_correlation(test: Tensor, reference: Tensor) -> Tensor:
    """``R [m, n_ref]``: Pearson correlation over draws of each test input's loss trace with
    each trusted input's, ``R[i, j] = Corr(l_i, l_j)`` (the loss kernel's correlation,
    docs/theory.md section 3; the normalized BIF is ``-R``). ``test [chain, draw, m]``,
    ``reference [chain, draw, n_ref]`` from the same draws."""
    t, r = traces(test, "test traces"), traces(reference, "reference traces")
    if t.shape[0] != r.shape[0]:
        raise ShapeError(f"test traces have {t.shape[0]} draws, reference traces "
                         f"{r.shape[0]}: they must come from the same draws")
    return _standardized(t, "test traces").T @ _standardized(r, "reference traces")


def madfa_scores(test: Tensor, reference: Tensor, classes: Tensor | None = None
                 ) -> dict[str, Tensor]:
    """MAD-FA anomaly scores ``[m]`` (Lyons Keenan, Leckie & Erfani 2026, "Mechanistic Anomaly
    Detection via Functional Attribution", ICML, arXiv:2604.18970): an input is anomalous when
    the trusted reference set does not explain it, i.e. when its loss trace over posterior draws
    is weakly coupled to the trusted inputs' traces.

    - ``"mean"``: ``s(x) = -(1/n_ref) sum_j Corr(l_x, l_j)``;
    - ``"classwise"`` (with ``classes [n_ref]``, a label per trusted input, any hashable):
      ``s(x) = -max_c mean_{j in c} Corr(l_x, l_j)``.

    Sign: larger = more anomalous (the negated mean coupling). Traces as in
    :func:`trace_correlation`; the test and reference inputs must be distinct.
    """
    r = trace_correlation(test, reference)
    out = {"mean": -r.mean(1)}
    if classes is not None:
        labels = classes.flatten().tolist() if isinstance(classes, Tensor) else list(classes)
        if len(labels) != r.shape[1]:
            raise ShapeError(f"{len(labels)} class labels for {r.shape[1]} reference inputs")
        index = {v: i for i, v in enumerate(dict.fromkeys(labels))}
        inverse = torch.tensor([index[v] for v in labels])
        onehot = torch.nn.functional.one_hot(inverse).to(DTYPE)  # [n_ref, n_classes]
        out["classwise"] = -(r @ (onehot / onehot.sum(0))).max(1).values
    return out


def pool(scores: Tensor, how: str = "max", k: int = 3, mask: Tensor | None = None) -> Tensor:
    """A sequence's score from its per-token scores ``[n, pos]`` -> ``[n]``: ``"max"``,
    ``"mean"`` or ``"topk"`` (mean of the ``k`` largest). ``mask [n, pos]`` (bool) keeps only
    some tokens (each row needs at least ``k`` for ``"topk"``, one otherwise)."""
    if scores.ndim != 2:
        raise ShapeError(f"pool needs per-token scores [n, pos]; got {tuple(scores.shape)}")
    s = scores.double()
    if mask is None:
        mask = torch.ones_like(s, dtype=torch.bool)
    need = k if how == "topk" else 1
    if how not in ("max", "mean", "topk"):
        raise ConfigError(f"how={how!r} must be 'max', 'mean' or 'topk'")
    if bool((mask.sum(1) < need).any()):
        raise ConfigError(f"some sequences keep fewer than {need} tokens; lower k or the mask")
    if how == "mean":
        return (s * mask).sum(1) / mask.sum(1)
    s = s.masked_fill(~mask, -math.inf)
    return s.max(1).values if how == "max" else s.topk(k, dim=1).values.mean(1)


# ---- metrics with standard errors --------------------------------------------------------
class Rate(NamedTuple):
    """``(value, stderr)`` of a detection metric."""

    value: float
    stderr: float


def _split(scores: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    scores, positive = scores.double().flatten(), torch.as_tensor(positive).bool().flatten()
    if scores.shape != positive.shape:
        raise ShapeError(f"{len(scores)} scores but {len(positive)} labels")
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        raise ConfigError("the metric needs both positive (anomalous) and negative examples")
    return pos, neg


def _placements(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor]:
    """DeLong's placement values: ``V10 [n_pos]``, ``V01 [n_neg]`` (ties count half)."""
    psi = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    return psi.mean(1), psi.mean(0)


def auroc(scores: Tensor, positive: Tensor) -> Rate:
    """AUROC ``P(s_pos > s_neg) + P(=)/2`` with DeLong's standard error
    ``sqrt(Var(V10)/n_pos + Var(V01)/n_neg)`` (DeLong, DeLong & Clarke-Pearson 1988)."""
    v10, v01 = _placements(*_split(scores, positive))
    var = (v10.var() / len(v10) if len(v10) > 1 else 0.0) + \
        (v01.var() / len(v01) if len(v01) > 1 else 0.0)
    return Rate(float(v10.mean()), math.sqrt(float(var)))


def auroc_difference(scores_a: Tensor, scores_b: Tensor, positive: Tensor) -> Rate:
    """``AUROC(a) - AUROC(b)`` on the same inputs with DeLong's paired standard error (the two
    AUROCs' covariance through the shared inputs is subtracted)."""
    a10, a01 = _placements(*_split(scores_a, positive))
    b10, b01 = _placements(*_split(scores_b, positive))
    d10, d01 = a10 - b10, a01 - b01
    var = d10.var() / len(d10) + d01.var() / len(d01)
    return Rate(float(a10.mean() - b10.mean()), math.sqrt(float(var)))


def conformal_threshold(calibration: Tensor, fpr: float = 0.05) -> tuple[float, float]:
    """Split-conformal threshold from ``m`` held-out trusted scores: ``s_(r)``,
    ``r = ceil((1 - fpr)(m + 1))``; flag ``score > threshold``. Returns the threshold and the
    exact expected FPR ``1 - r/(m + 1) <= fpr`` for exchangeable clean inputs."""
    if not 0 < fpr < 1:
        raise ConfigError(f"fpr={fpr!r} must be in (0, 1)")
    s = calibration.double().flatten().sort()[0]
    m = len(s)
    r = math.ceil((1 - fpr) * (m + 1))
    if r > m:
        raise ConfigError(f"{m} calibration scores cannot calibrate fpr={fpr}: need at least "
                          f"{math.ceil((1 - fpr) / fpr)}")
    return float(s[r - 1]), 1 - r / (m + 1)


def _binomial(flags: Tensor) -> Rate:
    p = float(flags.double().mean())
    return Rate(p, math.sqrt(p * (1 - p) / len(flags)))


def conformal_rates(calibration: Tensor, scores: Tensor, positive: Tensor,
                    fpr: float = 0.05) -> dict:
    """TPR and FPR (binomial standard errors) of the split-conformal threshold set on the
    trusted ``calibration`` scores, measured on ``scores`` with labels ``positive``."""
    threshold, expected = conformal_threshold(calibration, fpr)
    pos, neg = _split(scores, positive)
    return {"tpr": _binomial(pos > threshold), "fpr": _binomial(neg > threshold),
            "threshold": threshold, "expected_fpr": expected}


def detection_rate(scores: Tensor, positive: Tensor, fpr: float = 0.05) -> Rate:
    """Detection rate (TPR) at a fixed FPR with the threshold set on the test negatives
    themselves (the ``ceil((1 - fpr) n_neg)``-th smallest, flag ``>``; an oracle threshold,
    as :func:`tpr_at_fpr`), with its binomial standard error over the positives."""
    pos, neg = _split(scores, positive)
    thr = neg.sort()[0][max(0, math.ceil((1 - fpr) * len(neg)) - 1)]
    return _binomial(pos > thr)


def evaluate(scores: Tensor, positive: Tensor, calibration: Tensor | None = None,
             fpr: float = 0.05) -> dict:
    """AUROC, detection rate at ``fpr`` and (with trusted ``calibration`` scores) the
    split-conformal TPR / FPR, each ``(value, stderr)``; larger scores = more anomalous."""
    out = {"auroc": auroc(scores, positive), "detection_rate": detection_rate(scores, positive,
                                                                             fpr)}
    if calibration is not None:
        out["conformal"] = conformal_rates(calibration, scores, positive, fpr)
    return out
