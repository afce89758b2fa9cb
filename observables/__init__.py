"""The observable catalogue: component names, the registry of observable kinds, the
evaluation plan that computes them all from one SGLD run, and susceptibility runs.

Works with TransformerLens 3.x ``HookedTransformer`` and 4.x ``TransformerBridge``
(:mod:`observables.adapter` holds every difference between them); pretrained models load
offline with :func:`load_pretrained`.
"""

from observables.adapter import Adapter
from observables.components import (
    Component,
    expand,
    kv_names,
    parse,
    union_mask,
    valid_names,
)
from observables.coupled import coupled_run
from observables.lm import check_tokens, lm_loss, token_losses
from observables.models import backend, build
from observables.plan import EvaluationPlan
from observables.pretrained import load_pretrained
from observables.registry import (
    REGISTRY,
    CenteredTokenLoss,
    MeanLoss,
    Metric,
    Observable,
    SampleLoss,
    TokenLoss,
    make,
    register,
)
from observables.runs import (
    RestrictedResult,
    first_order_susceptibility,
    one_run,
    restricted_runs,
    spring_susceptibility,
    susceptibility_observables,
)

__all__ = [
    "Adapter", "CenteredTokenLoss", "Component", "EvaluationPlan", "MeanLoss", "Metric",
    "Observable", "REGISTRY", "RestrictedResult", "SampleLoss", "TokenLoss", "backend", "build",
    "check_tokens", "coupled_run", "expand", "first_order_susceptibility", "kv_names",
    "lm_loss", "load_pretrained", "make",
    "one_run", "parse", "register", "restricted_runs", "spring_susceptibility",
    "susceptibility_observables", "token_losses", "union_mask", "valid_names",
]
