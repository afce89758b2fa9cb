"""suscept: Bayesian influence functions and susceptibilities from one localized SGLD run.

Sign and scale conventions: ``docs/conventions.md`` (docs/theory.md section 3). Entry points:

- :func:`sample` runs localized SGLD chains around a checkpoint and records observables.
- estimators (:mod:`suscept.estimators`) turn draws ``[chain, draw, k]`` or streamed
  :class:`Moments` into :class:`Estimate` values with standard errors.
- :func:`susceptibility` (:mod:`suscept.susceptibilities`) gives the ``[token, component]``
  matrix of a run; the ``observables`` package defines components and runs on
  TransformerLens models.
"""

from suscept import (
    anomaly,
    bias,
    classical,
    diagnostics,
    distributed,
    graph,
    heads,
    regime,
    sgld,
    spring,
    store,
    sweep,
    tables,
)
from suscept.calibrate import Calibration, calibrate, top_hessian_eigenvalue
from suscept.errors import (
    ConfigError,
    DivergenceWarning,
    EstimatorWarning,
    ShapeError,
    SusceptError,
)
from suscept.estimate import Estimate
from suscept.estimators import (
    Expansion,
    bif,
    influence_expansion,
    llc,
    llc_from_trace,
    loo_reweighted,
    loss_kernel,
    per_sample_llc,
    singular_fluctuation,
    third_cumulant,
    variance_response,
)
from suscept.moments import Moments
from suscept.run import Divergence, Run
from suscept.sample import SamplerConfig, sample
from suscept.spring import spring_sample
from suscept.store import DrawStore
from suscept.streams import Cross, Paired
from suscept.susceptibilities import (
    agreement_ceiling,
    pca,
    reliability,
    split_half,
    standardize,
    susceptibility,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DivergenceWarning", "Divergence", "Estimate", "EstimatorWarning",
    "Expansion", "Moments", "Run", "SamplerConfig", "ShapeError", "SusceptError", "bif",
    "diagnostics", "influence_expansion", "llc", "loo_reweighted", "loss_kernel",
    "per_sample_llc", "sample", "sgld", "singular_fluctuation", "third_cumulant",
    "variance_response", "Cross", "Paired", "agreement_ceiling", "pca", "reliability",
    "split_half", "standardize",
    "susceptibility", "Calibration", "calibrate", "top_hessian_eigenvalue", "DrawStore",
    "distributed", "store", "anomaly", "graph", "sweep",
    "classical", "heads", "tables",
    "bias", "llc_from_trace", "regime", "spring", "spring_sample",
]

# variance reduction per unit of compute (docs/efficiency.md)
from suscept import batched, control_variates, coupled, schedule  # noqa: E402
from suscept.batched import Batched  # noqa: E402
from suscept.control_variates import cv_covariance, stein_features  # noqa: E402
from suscept.coupled import coupled_covariance, spring_draws, spring_moments  # noqa: E402

__all__ += ["batched", "control_variates", "coupled", "schedule", "Batched", "cv_covariance",
            "stein_features", "coupled_covariance", "spring_draws", "spring_moments"]
from suscept.coupled import coupled_susceptibility  # noqa: E402

__all__ += ["coupled_susceptibility"]

from suscept import pathwise  # noqa: E402
from suscept.pathwise import first_order_susceptibility, pathwise_susceptibility  # noqa: E402

__all__ += ["pathwise", "pathwise_susceptibility", "first_order_susceptibility"]

from suscept import interpolation  # noqa: E402
from suscept.interpolation import interpolation_susceptibility  # noqa: E402

__all__ += ["interpolation", "interpolation_susceptibility"]
