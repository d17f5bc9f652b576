"""The models of the cross-validated accuracy suites (``quick``, ``full``).

Every model is put behind the same :func:`benchmarks.datasets.preprocessor` in a pipeline,
so they all see the same one-hot + standard-scaled features and the same folds.

Roles
-----
- ``moe``: the MoE estimators at their defaults.
- ``ablation``: the default MoE with one ingredient switched off (the ``n_experts=1``
  network, the gate replaced by equal weights, independent experts, the mixture's loss,
  no numeric embedding, the plateau schedule, a gate as fast as the experts), one option
  added (experts trained on random halves of each batch), and a classic sparse MoE. They
  are compared with the default pairwise, not ranked among the other models. Some (more
  experts) run only when ``--models`` names them, not in the quick suite.
- ``baseline`` and ``peer``: the other models, at their own defaults (scikit-learn's MLP
  regressor fitted to the standardised target, as the networks here are inside); peers are
  the strongest tabular networks (TabM, RealMLP from pytabkit) and CatBoost.

Every model runs on one thread. TabM's CPU fits take minutes per fold, so a suite can limit
it to data sets up to a number of rows (:data:`benchmarks.accuracy.CV_SUITES`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.preprocessing import StandardScaler

from sklearn_moe import MoEClassifier, MoERegressor

#: The ablations: each switches one ingredient of the default MoE off.
ABLATIONS = {
    "moe_1expert": {"n_experts": 1},
    "moe_uniform": {"router": "uniform"},
    "moe_independent": {"expert_type": "independent"},
    "moe_mixture_loss": {"expert_loss": "mixture"},
    "moe_no_embedding": {"numeric_embedding": None},
    "moe_plateau": {"lr_schedule": "plateau"},
    "moe_fast_gate": {"router_lr_scale": 1.0},
}
#: A classic sparse MoE: independent (128, 128) experts, top-2 of 8, trained on the
#: mixture's loss, no embedding, a plateau schedule.
CLASSIC_SPARSE = {
    "n_experts": 8, "top_k": 2, "router": "topk", "expert_type": "independent", "expert_loss": "mixture",
    "numeric_embedding": None, "expert_hidden": (128, 128), "dropout": 0.0, "learning_rate": 3e-3,
    "weight_decay": 1e-4, "lr_schedule": "plateau", "max_epochs": 200, "n_iter_no_change": 30,
}

#: Optional packages of the peer models (extra ``bench``); a model whose package is missing is skipped.
PACKAGES = {"lightgbm": "lightgbm", "catboost": "catboost", "realmlp": "pytabkit", "tabm": "pytabkit"}


def package_available(name: str) -> bool:
    """Whether the package ``name`` can be imported.

    Parameters
    ----------
    name : str

    Returns
    -------
    bool
    """
    import importlib.util

    return importlib.util.find_spec(name) is not None


def lightgbm_available() -> bool:
    """Whether LightGBM can be imported (its model is skipped otherwise).

    Returns
    -------
    bool
    """
    return package_available("lightgbm")


@dataclass(frozen=True)
class ModelSpec:
    """A model of the suites, for both tasks.

    Attributes
    ----------
    key : str
        Name on the command line (``--models``).
    names : dict
        Display name per task (``"regression"``, ``"classification"``); a model runs on
        the data sets of the tasks named here only.
    build : callable
        ``build(task, seed, moe_params) -> estimator``; ``moe_params`` are the suite's
        extra MoE parameters (e.g. a ``max_epochs`` cap), ignored by the other models.
    is_moe : bool
        Whether the suite's MoE parameters apply.
    aliases : tuple of str
        Other names accepted by ``--models``.
    role : {"moe", "ablation", "baseline", "peer"}
        See the module docstring.
    in_quick_suite : bool
        Whether the quick suite runs it (else only when ``--models`` names it).
    """

    key: str
    names: dict
    build: Callable
    is_moe: bool = False
    aliases: tuple = field(default_factory=tuple)
    role: str = "baseline"
    in_quick_suite: bool = True

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
    if task == "classification":
        return MLPClassifier(max_iter=2000, early_stopping=True, random_state=seed)
    # Fitted to the standardised target, as the MoE, RealMLP and TabM are inside: on a raw
    # target far from 0 (log prices near 12) it stops early far from any fit.
    return TransformedTargetRegressor(MLPRegressor(max_iter=2000, early_stopping=True, random_state=seed),
                                      transformer=StandardScaler())


def _hgb(task, seed, moe_params):
    estimator = HistGradientBoostingRegressor if task == "regression" else HistGradientBoostingClassifier
    return estimator(random_state=seed)


def _lightgbm(task, seed, moe_params):
    import lightgbm

    estimator = lightgbm.LGBMRegressor if task == "regression" else lightgbm.LGBMClassifier
    return estimator(random_state=seed, verbose=-1, n_jobs=1)


def _catboost(task, seed, moe_params):
    import catboost

    estimator = catboost.CatBoostRegressor if task == "regression" else catboost.CatBoostClassifier
    return estimator(random_seed=seed, verbose=0, thread_count=1, allow_writing_files=False)


def _pytabkit(name):
    def build(task, seed, moe_params):
        import pytabkit

        estimator = getattr(pytabkit, f"{name}_{'Regressor' if task == 'regression' else 'Classifier'}")
        return estimator(device="cpu", n_threads=1, random_state=seed)
    return build


def _names(label):
    return {"regression": label, "classification": label}


_ABLATION_LABELS = {
    "moe_1expert": "MoE n_experts=1", "moe_uniform": "MoE router=uniform",
    "moe_independent": "MoE independent experts", "moe_mixture_loss": "MoE mixture loss",
    "moe_no_embedding": "MoE no embedding", "moe_plateau": "MoE plateau schedule",
    "moe_fast_gate": "MoE fast gate",
}

MODEL_SPECS = {
    spec.key: spec
    for spec in [
        ModelSpec("moe", _names("MoE (defaults)"), lambda task, seed, p: _moe(task, seed, p), is_moe=True, role="moe"),
        *(ModelSpec(key, _names(_ABLATION_LABELS[key]),
                    lambda task, seed, p, params=params: _moe(task, seed, p, **params),
                    is_moe=True, role="ablation", aliases=("moe1",) if key == "moe_1expert" else ())
          for key, params in ABLATIONS.items()),
        ModelSpec("moe_subsample", _names("MoE expert_subsample=0.5"),
                  lambda task, seed, p: _moe(task, seed, p, expert_subsample=0.5), is_moe=True, role="ablation"),
        ModelSpec("moe_topk", _names("MoE router=topk"),
                  lambda task, seed, p: _moe(task, seed, p, router="topk", top_k=2), is_moe=True, role="ablation"),
        ModelSpec("moe_noisy_topk", _names("MoE router=noisy_topk"),
                  lambda task, seed, p: _moe(task, seed, p, router="noisy_topk", top_k=2), is_moe=True,
                  role="ablation"),
        ModelSpec("moe_label_smoothing", {"classification": "MoE label_smoothing=0.1"},
                  lambda task, seed, p: _moe(task, seed, p, label_smoothing=0.1), is_moe=True, role="ablation"),
        ModelSpec("moe_classic", _names("MoE classic sparse"),
                  lambda task, seed, p: _moe(task, seed, p, **CLASSIC_SPARSE), is_moe=True, role="ablation"),
        *(ModelSpec(f"moe_{n}experts", _names(f"MoE n_experts={n}"),
                    lambda task, seed, p, n=n: _moe(task, seed, p, n_experts=n), is_moe=True, role="ablation",
                    in_quick_suite=False)
          for n in (16, 32)),
        ModelSpec("mlp", {"regression": "MLPRegressor", "classification": "MLPClassifier"}, _mlp),
        ModelSpec("linear", {"regression": "Ridge", "classification": "LogisticRegression"}, _linear,
                  aliases=("ridge", "logreg", "logistic")),
        ModelSpec("hgb", _names("HistGradientBoosting"), _hgb),
        ModelSpec("lightgbm", _names("LightGBM"), _lightgbm, aliases=("lgbm",)),
        ModelSpec("catboost", _names("CatBoost"), _catboost, role="peer"),
        ModelSpec("realmlp", _names("RealMLP"), _pytabkit("RealMLP_TD"), role="peer"),
        ModelSpec("tabm", _names("TabM"), _pytabkit("TabM_D"), role="peer"),
    ]
}

#: The models a suite runs when ``--models`` is not given: everything but the ablations
#: beyond the two that the acceptance of a mixture needs (one expert, no gate).
DEFAULT_MODELS = ("moe", "moe_1expert", "moe_uniform", "mlp", "linear", "hgb", "lightgbm", "catboost", "realmlp",
                  "tabm")

#: One line per model for the report.
MODEL_NOTES = {
    "moe": "MoERegressor / MoEClassifier at their defaults",
    "moe_1expert": "the default MoE with n_experts=1: the same network and training, one expert (no mixture)",
    "moe_uniform": "the default MoE with router='uniform': the same experts weighted equally (no gate)",
    "moe_independent": "the default MoE with expert_type='independent': every expert its own weights",
    "moe_mixture_loss": "the default MoE with expert_loss='mixture': experts trained on the mixture's loss only",
    "moe_no_embedding": "the default MoE with numeric_embedding=None",
    "moe_plateau": "the default MoE with lr_schedule='plateau' (learning rate cut on validation plateaus)",
    "moe_fast_gate": "the default MoE with router_lr_scale=1: the gate learns as fast as the experts",
    "moe_topk": "the default MoE with a sparse gate, router='topk' (top-2 of 8; an option)",
    "moe_noisy_topk": "the default MoE with a noisy sparse gate, router='noisy_topk' (top-2 of 8; an option)",
    "moe_label_smoothing": "the default MoEClassifier with label_smoothing=0.1 (an option; classification only)",
    "moe_subsample": "the default MoE with expert_subsample=0.5: each expert trains on a random half of every batch",
    "moe_16experts": "the default MoE with n_experts=16 (twice the default's experts; an option)",
    "moe_32experts": "the default MoE with n_experts=32 (TabM's ensemble size; an option)",
    "moe_classic": "a classic sparse MoE: " + ", ".join(f"{k}={v!r}" for k, v in CLASSIC_SPARSE.items()),
    "mlp": "scikit-learn MLPRegressor / MLPClassifier(max_iter=2000, early_stopping=True), the regressor fitted to "
           "the standardised target (TransformedTargetRegressor with StandardScaler)",
    "linear": "Ridge() / LogisticRegression(max_iter=2000)",
    "hgb": "HistGradientBoostingRegressor / Classifier at their defaults",
    "lightgbm": "LightGBM LGBMRegressor / LGBMClassifier at their defaults (n_jobs=1)",
    "catboost": "CatBoostRegressor / CatBoostClassifier at their defaults (thread_count=1)",
    "realmlp": "pytabkit RealMLP_TD_Regressor / Classifier at their defaults (CPU, n_threads=1)",
    "tabm": "pytabkit TabM_D_Regressor / Classifier at their defaults (CPU, n_threads=1; k=32 members)",
}


def resolve_models(names=None) -> list[str]:
    """Model keys to run, in the registry's order.

    Parameters
    ----------
    names : list of str or None
        Keys or aliases from ``--models``; ``None`` means :data:`DEFAULT_MODELS`. Models
        whose package is not installed (:data:`PACKAGES`) are dropped silently.

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
        wanted = set(DEFAULT_MODELS)
    else:
        unknown = [name for name in names if name not in lookup]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; choose from {sorted(lookup)}")
        wanted = {lookup[name] for name in names}
    wanted = {key for key in wanted if key not in PACKAGES or package_available(PACKAGES[key])}
    return [key for key in MODEL_SPECS if key in wanted]
