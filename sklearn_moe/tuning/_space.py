"""Optuna search spaces over the MoE hyperparameters, keyed for the MoE inside any Pipeline."""

from __future__ import annotations

from collections.abc import Mapping

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from sklearn.base import is_classifier
from sklearn.pipeline import Pipeline

from .._base import BaseMoE
from ..nn._checks import check_int
from ..nn._warnings import ignoring_warnings
from ..nn.density import REGRESSOR_OUTPUTS as OUTPUTS

#: Routers of the default space: the ones whose behaviour the space's parameters fully
#: describe. ``"top_p"`` and ``"hierarchical"`` need ``top_p`` / ``n_groups`` as well; add
#: them with ``routers=`` and your own distributions for those.
DEFAULT_ROUTERS = ("topk", "noisy_topk", "softmax", "switch")
DEFAULT_EXPERT_WIDTHS = (16, 32, 64, 128)
DEFAULT_EXPERT_DEPTHS = (1, 2)


def find_moe_step(estimator):
    """The MoE estimator inside ``estimator`` and the parameter prefix that reaches it.

    Parameters
    ----------
    estimator : estimator
        A :class:`~sklearn_moe.MoERegressor` / :class:`~sklearn_moe.MoEClassifier`, or a
        meta-estimator (e.g. a :class:`~sklearn.pipeline.Pipeline`, nested or not) holding
        exactly one of them.

    Returns
    -------
    prefix : str
        ``""`` for the MoE itself, else the ``get_params`` path to it followed by ``"__"``
        (``"moeregressor__"`` for ``make_pipeline(scaler, MoERegressor())``).
    moe : BaseMoE
        The MoE estimator object found at that path.

    Raises
    ------
    ValueError
        When ``estimator`` holds no MoE estimator, or more than one.
    """
    if isinstance(estimator, BaseMoE):
        return "", estimator
    if not hasattr(estimator, "get_params"):
        raise ValueError(f"Expected a scikit-learn estimator holding a MoE estimator; got {estimator!r}.")
    found = [(key, value) for key, value in estimator.get_params(deep=True).items() if isinstance(value, BaseMoE)]
    if not found:
        raise ValueError(
            f"{type(estimator).__name__} holds no MoERegressor or MoEClassifier step; tuning and "
            "select_n_experts need one (e.g. make_pipeline(StandardScaler(), MoERegressor()))."
        )
    if len(found) > 1:
        raise ValueError(
            f"{type(estimator).__name__} holds several MoE estimators ({[key for key, _ in found]}); "
            "tune one at a time (build the search space for it by hand)."
        )
    key, moe = found[0]
    return key + "__", moe


def fit_param_name(estimator, prefix: str, name: str) -> str:
    """The ``fit`` keyword that passes ``name`` to the MoE step at ``prefix``.

    Pipelines route ``step__name`` to their step; other meta-estimators have no such rule, so
    they are refused with a clear error.
    """
    if not prefix:
        return name
    node = estimator
    for part in prefix[:-2].split("__"):
        if not isinstance(node, Pipeline):
            raise ValueError(
                f"Cannot pass fit parameters through {type(node).__name__} to the MoE step "
                f"{prefix[:-2]!r}; per-epoch pruning needs the MoE estimator itself or Pipelines "
                "around it (use pruning=False otherwise)."
            )
        node = node.named_steps[part]
    return prefix + name


def base_space(
    max_experts: int = 16,
    max_top_k: int = 2,
    routers=DEFAULT_ROUTERS,
    expert_widths=DEFAULT_EXPERT_WIDTHS,
    expert_depths=DEFAULT_EXPERT_DEPTHS,
    classifier: bool = False,
    outputs=("point",),
) -> dict[str, BaseDistribution]:
    """The unprefixed default space (with ``label_smoothing`` for a classifier, and
    ``output`` for a regressor given several ``outputs``); see :func:`search_space`."""
    outputs = tuple(outputs)
    if not outputs or not set(outputs) <= set(OUTPUTS) or len(set(outputs)) != len(outputs):
        raise ValueError(f"outputs must be distinct values of {OUTPUTS}; got {outputs!r}.")
    if classifier and outputs != ("point",):
        raise ValueError("outputs applies to regressors: a classifier has no output parameter.")
    check_int("max_experts", max_experts)
    check_int("max_top_k", max_top_k)
    if max_top_k > max_experts:
        raise ValueError(f"max_top_k={max_top_k} must not exceed max_experts={max_experts}.")
    for name, values in (("routers", routers), ("expert_widths", expert_widths), ("expert_depths", expert_depths)):
        if len(values) == 0:
            raise ValueError(f"{name} must not be empty.")
    for value in (*expert_widths, *expert_depths):
        check_int("expert widths and depths", value)
    # Lists: a storage keeps a categorical's choices as JSON, and a study resumed from one
    # (OptunaSearchCV's) refuses choices that differ from the stored ones, as tuples do
    # from the lists they come back as. tune() suggests them as strings (see suggest()).
    architectures = tuple([width] * depth for depth in expert_depths for width in expert_widths)
    with ignoring_warnings("Choices for a categorical distribution"):
        expert_hidden = CategoricalDistribution(architectures)
    # aux_free cannot balance the groups of the hierarchical router, which refuses it.
    balance_losses = ("switch", "cv2", None) if "hierarchical" in routers else ("switch", "cv2", "aux_free", None)
    space = {
        # Every combination is valid: top_k <= max_top_k <= n_experts.
        "n_experts": IntDistribution(max_top_k, max_experts, log=True),
        "top_k": IntDistribution(1, max_top_k),
        "router": CategoricalDistribution(tuple(routers)),
        "temperature": FloatDistribution(0.05, 2.0, log=True),
        "capacity_factor": CategoricalDistribution((None, 1.25, 2.0)),
        "balance_loss": CategoricalDistribution(balance_losses),
        "balance_coef": FloatDistribution(1e-4, 1e-1, log=True),
        "z_loss_coef": FloatDistribution(1e-5, 1e-2, log=True),
        "expert_hidden": expert_hidden,
        "learning_rate": FloatDistribution(1e-4, 3e-2, log=True),
        "router_lr_scale": FloatDistribution(0.03, 1.0, log=True),
        "weight_decay": FloatDistribution(1e-6, 1e-2, log=True),
        "dropout": FloatDistribution(0.0, 0.3),
        "expert_type": CategoricalDistribution(("adapter", "independent")),
        "expert_loss": CategoricalDistribution(("per_expert", "mixture")),
        "numeric_embedding": CategoricalDistribution(("piecewise_linear", "periodic", None)),
        "lr_schedule": CategoricalDistribution(("flat_cosine", "cosine", "plateau")),
    }
    if classifier:
        space["label_smoothing"] = FloatDistribution(0.0, 0.2)
    if len(outputs) > 1:
        space["output"] = CategoricalDistribution(outputs)
    return space


def search_space(
    estimator,
    *,
    max_experts: int = 16,
    max_top_k: int = 2,
    routers=DEFAULT_ROUTERS,
    expert_widths=DEFAULT_EXPERT_WIDTHS,
    expert_depths=DEFAULT_EXPERT_DEPTHS,
    include=None,
    exclude=(),
    outputs=("point",),
) -> dict[str, BaseDistribution]:
    """Build Optuna distributions over the MoE hyperparameters of ``estimator``.

    The space is static (the same distributions for every trial), as
    ``optuna_integration.OptunaSearchCV`` needs, and every combination of its values is a
    valid configuration: ``top_k`` is drawn from ``1..max_top_k`` and ``n_experts`` from
    ``max_top_k..max_experts`` (log scale), so ``top_k <= n_experts`` always holds.

    ========================  ==========================================================
    parameter                 distribution
    ========================  ==========================================================
    ``n_experts``             int in [max_top_k, max_experts], log scale
    ``top_k``                 int in [1, max_top_k] (unused by "softmax"; "switch" uses 1)
    ``router``                one of ``routers`` (default topk, noisy_topk, softmax, switch)
    ``temperature``           float in [0.05, 2], log
    ``capacity_factor``       None (dropless), 1.25 or 2.0 (unused by "softmax")
    ``balance_loss``          "switch", "cv2", "aux_free" (unless ``routers`` holds
                              "hierarchical") or None
    ``balance_coef``          float in [1e-4, 0.1], log (for "aux_free": the bias step)
    ``z_loss_coef``           float in [1e-5, 0.01], log
    ``expert_hidden``         ``[width] * depth`` for every width and depth given (lists, which
                              Optuna's storages keep as they are; :func:`tune` passes tuples)
    ``learning_rate``         float in [1e-4, 0.03], log
    ``router_lr_scale``       float in [0.03, 1], log: the gate's learning rate over the
                              experts'
    ``weight_decay``          float in [1e-6, 0.01], log
    ``dropout``               float in [0, 0.3]
    ``expert_type``           "adapter" or "independent"
    ``expert_loss``           "per_expert" or "mixture"
    ``numeric_embedding``     "piecewise_linear", "periodic" or None
    ``lr_schedule``           "flat_cosine", "cosine" or "plateau"
    ``label_smoothing``       float in [0, 0.2] (classifiers only)
    ``output``                one of ``outputs``, when it holds several (regressors only)
    ========================  ==========================================================

    ``"top_p"`` and ``"hierarchical"`` routers are left out by default because their own
    parameters (``top_p``, ``learned_threshold``, ``n_groups``) would make the space
    conditional; pass them in ``routers`` and add distributions for those parameters to
    the returned dict to search them too. The number of epochs is not searched: early
    stopping picks it.

    Parameters
    ----------
    estimator : estimator
        A MoE estimator or a Pipeline (or other meta-estimator) holding exactly one.
    max_experts : int, default=16
        Largest ``n_experts``; at least ``max_top_k``.
    max_top_k : int, default=2
        Largest ``top_k``; also the smallest ``n_experts``.
    routers : sequence of str, default=("topk", "noisy_topk", "softmax", "switch")
        The ``router`` choices (names of the estimators' ``router`` parameter); not empty.
    expert_widths : sequence of int, default=(16, 32, 64, 128)
        Hidden-layer widths of the ``expert_hidden`` choices; positive, not empty.
    expert_depths : sequence of int, default=(1, 2)
        Hidden-layer counts of the ``expert_hidden`` choices; positive, not empty. Every
        width is combined with every depth.
    include : sequence of str, optional
        Keep only these parameters (unprefixed names).
    exclude : sequence of str, default=()
        Leave these parameters out, e.g. the ones you fix on the estimator.
    outputs : sequence of {"point", "mixture_density"}, default=("point",)
        A regressor's ``output`` values to search; with one value ``output`` is not
        searched (the estimator's own applies). Scores compare the mixture's mean
        either way.

    Returns
    -------
    dict of str to optuna.distributions.BaseDistribution
        Keys are prefixed with the path to the MoE step (``"moeregressor__n_experts"``).

    Raises
    ------
    ValueError
        No (or several) MoE estimators in ``estimator``, an unknown name in ``include`` or
        ``exclude``, or bad bounds.

    Examples
    --------
    >>> from optuna_integration import OptunaSearchCV
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from sklearn_moe import MoERegressor
    >>> pipe = make_pipeline(StandardScaler(), MoERegressor(max_epochs=20))
    >>> space = search_space(pipe, include=["n_experts", "top_k", "learning_rate"])
    >>> sorted(space)
    ['moeregressor__learning_rate', 'moeregressor__n_experts', 'moeregressor__top_k']
    >>> search = OptunaSearchCV(pipe, space, n_trials=5, cv=3)  # doctest: +SKIP
    """
    prefix, moe = find_moe_step(estimator)
    space = base_space(max_experts, max_top_k, routers, expert_widths, expert_depths, is_classifier(moe), outputs)
    for label, names in (("include", include), ("exclude", exclude)):
        if isinstance(names, str):
            raise ValueError(f"{label} must be a sequence of parameter names, not a string; got {names!r}.")
        unknown = sorted(set(names or ()) - set(space))
        if unknown:
            raise ValueError(f"Unknown parameters in {label}: {unknown}; choose among {sorted(space)}.")
    keep = set(space) if include is None else set(include)
    keep -= set(exclude)
    return {prefix + name: dist for name, dist in space.items() if name in keep}


def _is_plain(choice) -> bool:
    return choice is None or isinstance(choice, (bool, int, float, str))


def _label(choice) -> str:
    """A choice's name in a storage: its ``repr``, a list's as a tuple's."""
    return repr(_estimator_value(choice))


def _estimator_value(choice):
    """The value an estimator gets for a choice: a list (an ``expert_hidden``) as a tuple."""
    return tuple(choice) if isinstance(choice, list) else choice


def suggest(trial, name: str, distribution: BaseDistribution):
    """Draw ``name`` from ``distribution`` through the public ``trial.suggest_*`` API.

    Categorical choices that are not plain values (the lists of ``expert_hidden``) are
    suggested as strings (a list's ``repr`` as a tuple's) and mapped back, lists as tuples,
    so every trial's parameters are plain values, valid on journal and RDB storages shared
    by several processes.
    """
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(name, distribution.low, distribution.high, step=distribution.step,
                                 log=distribution.log)
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(name, distribution.low, distribution.high, step=distribution.step,
                                   log=distribution.log)
    if isinstance(distribution, CategoricalDistribution):
        choices = distribution.choices
        if all(_is_plain(choice) for choice in choices):
            return trial.suggest_categorical(name, choices)
        labels = [_label(choice) for choice in choices]
        return _estimator_value(choices[labels.index(trial.suggest_categorical(name, labels))])
    raise ValueError(f"Unsupported distribution for {name!r}: {distribution!r}.")


def decode_params(params: Mapping, space: Mapping[str, BaseDistribution]) -> dict:
    """Map a trial's stored params back to estimator values (undo :func:`suggest`'s strings)."""
    decoded = {}
    for name, value in params.items():
        distribution = space.get(name)
        if isinstance(distribution, CategoricalDistribution) and not all(map(_is_plain, distribution.choices)):
            labels = [_label(choice) for choice in distribution.choices]
            value = _estimator_value(distribution.choices[labels.index(value)]) if value in labels else value
        decoded[name] = value
    return decoded


def check_space(space, estimator) -> dict[str, BaseDistribution]:
    """Validate a user-given ``param_distributions`` mapping for ``estimator``: Optuna
    distributions, each keyed by one of the estimator's parameters (before any trial runs,
    where a wrong name would fail every trial)."""
    if not isinstance(space, Mapping) or not space:
        raise ValueError(f"param_distributions must be a non-empty dict of Optuna distributions; got {space!r}.")
    valid = estimator.get_params(deep=True)
    for name, distribution in space.items():
        if name not in valid:
            close = [key for key in valid if key.endswith(f"__{name}") or key.split("__")[-1] == str(name)]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"param_distributions has {name!r}, which is not a parameter of "
                             f"{type(estimator).__name__}{hint}; its parameters are {sorted(valid)}.")
        if not isinstance(distribution, BaseDistribution):
            raise ValueError(
                f"param_distributions[{name!r}] is {distribution!r}, not an Optuna distribution "
                "(e.g. optuna.distributions.IntDistribution(1, 8))."
            )
    return dict(space)
