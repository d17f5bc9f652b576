"""The models of the cross-validated accuracy suites (``quick``, ``full``).

Every model is put behind the same :func:`benchmarks.datasets.preprocessor` in a pipeline,
so they all see the same one-hot + standard-scaled features and the same folds.

The tuned MoE
-------------
``MoE (tuned)`` is one fixed configuration, chosen by reasoning before any suite was run,
not by searching on the benchmark's folds:

- ``shared_expert=True``: an always-on expert next to the routed ones (DeepSeekMoE). Real
  tabular data rarely fall into clean regimes; the shared expert learns the common part of
  the function and the routed experts only correct it, so the model starts from a dense
  MLP rather than from a random partition of the rows.
- ``dropout=0.1``: most data sets here have 10^2..10^4 training rows while eight (128, 128)
  experts hold 0.14M-0.46M weights (8 to 314 input columns); RealMLP and TabM both
  regularise their MLPs with dropout around 0.1.
- ``temperature=0.5``: a sharper router, halfway to the 0.1 that
  ``examples/regime_switching.py`` needed for the experts to find the regimes before they
  specialise on a random split. That example uses the same generator as the ``regime``
  data set, so the tuned MoE's score there is not independent of this choice.

Everything else (8 experts, top-2, (128, 128) experts, the training loop) stays at the
estimator's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor

from sklearn_moe import MoEClassifier, MoERegressor

#: The tuned MoE's parameters on top of the defaults (see the module docstring).
TUNED_MOE = {"shared_expert": True, "dropout": 0.1, "temperature": 0.5}


def lightgbm_available() -> bool:
    """Whether LightGBM can be imported (its model is skipped otherwise).

    Returns
    -------
    bool
    """
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ModelSpec:
    """A model of the suites, for both tasks.

    Attributes
    ----------
    key : str
        Name on the command line (``--models``).
    names : dict
        Display name per task (``"regression"``, ``"classification"``).
    build : callable
        ``build(task, seed, moe_params) -> estimator``; ``moe_params`` are the suite's
        extra MoE parameters (e.g. a ``max_epochs`` cap), ignored by the other models.
    is_moe : bool
        Whether the suite's MoE parameters apply.
    aliases : tuple of str
        Other names accepted by ``--models``.
    """

    key: str
    names: dict
    build: Callable
    is_moe: bool = False
    aliases: tuple = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """The display name for both tasks, e.g. ``"Ridge / LogisticRegression"``."""
        return " / ".join(dict.fromkeys(self.names.values()))


def _moe(task, seed, moe_params, **params):
    estimator = MoERegressor if task == "regression" else MoEClassifier
    return estimator(random_state=seed, **{**params, **moe_params})


def _linear(task, seed, moe_params):
    return Ridge() if task == "regression" else LogisticRegression(max_iter=2000)


def _mlp(task, seed, moe_params):
    estimator = MLPRegressor if task == "regression" else MLPClassifier
    return estimator(max_iter=2000, early_stopping=True, random_state=seed)


def _hgb(task, seed, moe_params):
    estimator = HistGradientBoostingRegressor if task == "regression" else HistGradientBoostingClassifier
    return estimator(random_state=seed)


def _lightgbm(task, seed, moe_params):
    import lightgbm

    estimator = lightgbm.LGBMRegressor if task == "regression" else lightgbm.LGBMClassifier
    return estimator(random_state=seed, verbose=-1, n_jobs=1)


MODEL_SPECS = {
    spec.key: spec
    for spec in [
        ModelSpec("moe", {"regression": "MoE (defaults)", "classification": "MoE (defaults)"},
                  lambda task, seed, p: _moe(task, seed, p), is_moe=True),
        ModelSpec("moe_tuned", {"regression": "MoE (tuned)", "classification": "MoE (tuned)"},
                  lambda task, seed, p: _moe(task, seed, p, **TUNED_MOE), is_moe=True),
        ModelSpec("moe_1expert", {"regression": "MoE n_experts=1", "classification": "MoE n_experts=1"},
                  lambda task, seed, p: _moe(task, seed, p, n_experts=1), is_moe=True, aliases=("moe1",)),
        ModelSpec("mlp", {"regression": "MLPRegressor", "classification": "MLPClassifier"}, _mlp),
        ModelSpec("linear", {"regression": "Ridge", "classification": "LogisticRegression"}, _linear,
                  aliases=("ridge", "logreg", "logistic")),
        ModelSpec("hgb", {"regression": "HistGradientBoosting", "classification": "HistGradientBoosting"}, _hgb),
        ModelSpec("lightgbm", {"regression": "LightGBM", "classification": "LightGBM"}, _lightgbm,
                  aliases=("lgbm",)),
    ]
}

#: One line per model for the report.
MODEL_NOTES = {
    "moe": "MoERegressor / MoEClassifier at their defaults (8 experts, top-2, (128, 128) experts)",
    "moe_tuned": "MoE with " + ", ".join(f"{k}={v!r}" for k, v in TUNED_MOE.items())
                 + " (chosen by reasoning, not on these folds: see benchmarks/models.py)",
    "moe_1expert": "MoE with n_experts=1: the same network and training loop without routing (ablation)",
    "mlp": "scikit-learn MLPRegressor / MLPClassifier(max_iter=2000, early_stopping=True)",
    "linear": "Ridge() / LogisticRegression(max_iter=2000)",
    "hgb": "HistGradientBoostingRegressor / Classifier at their defaults",
    "lightgbm": "LightGBM LGBMRegressor / LGBMClassifier at their defaults (n_jobs=1)",
}


def resolve_models(names=None) -> list[str]:
    """Model keys to run, in the registry's order.

    Parameters
    ----------
    names : list of str or None
        Keys or aliases from ``--models``; ``None`` means every model. LightGBM is dropped
        silently when it is not installed.

    Returns
    -------
    list of str
        Registry keys.

    Raises
    ------
    ValueError
        If a name is neither a key nor an alias.
    """
    lookup = {key: key for key in MODEL_SPECS}
    lookup.update({alias: spec.key for spec in MODEL_SPECS.values() for alias in spec.aliases})
    if names is None:
        wanted = set(MODEL_SPECS)
    else:
        unknown = [name for name in names if name not in lookup]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(lookup)}")
        wanted = {lookup[name] for name in names}
    if not lightgbm_available():
        wanted.discard("lightgbm")
    return [key for key in MODEL_SPECS if key in wanted]
