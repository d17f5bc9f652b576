"""Hyperparameter tuning and expert-count selection (the optional ``tune`` extra).

- :func:`search_space`: Optuna distributions over the MoE hyperparameters, keyed for the
  estimator or the Pipeline step that holds it, ready for
  ``optuna_integration.OptunaSearchCV``.
- :func:`tune`: cross-validated Optuna search with per-epoch pruning, on in-memory,
  journal-file or RDB (PostgreSQL) storages shared by several workers; returns the refitted
  best estimator and the study.
- :func:`select_n_experts`: cross-validation over candidate expert counts with the
  one-standard-error rule (``n_experts=1`` is the non-MoE ablation).
- ``python -m sklearn_moe.tuning worker --storage URL --study NAME ...`` starts a worker.

Optuna is imported here, so importing this module without it raises an ``ImportError`` that
says how to install it.
"""

try:
    import optuna  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised by a test that hides optuna
    raise ImportError(
        "sklearn_moe.tuning needs Optuna (and optuna-integration for OptunaSearchCV): "
        "pip install 'sklearn-moe[tune]'"
    ) from error

from ._select import NExpertsSelection, one_standard_error_rule, select_n_experts
from ._space import find_moe_step, search_space
from ._storage import make_storage
from ._tune import TuneResult, tune

__all__ = [
    "NExpertsSelection",
    "TuneResult",
    "find_moe_step",
    "make_storage",
    "one_standard_error_rule",
    "search_space",
    "select_n_experts",
    "tune",
]
