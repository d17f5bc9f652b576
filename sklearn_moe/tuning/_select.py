"""select_n_experts(): cross-validation over the number of experts, with the one-SE rule."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.base import is_classifier
from sklearn.model_selection import GridSearchCV, check_cv

from ..nn._checks import check_int
from ._space import find_moe_step

RULES = ("one_se", "best")


def one_standard_error_rule(cv_results: pd.DataFrame, rule: str = "one_se") -> int:
    """Choose the expert count from a table of cross-validated scores.

    Parameters
    ----------
    cv_results : pandas.DataFrame
        Columns ``n_experts``, ``mean_score`` and ``sem_score`` (standard error of the mean
        score, ``std / sqrt(n_folds)``); scores are greater-is-better.
    rule : {"one_se", "best"}, default="one_se"
        ``"best"``: the count with the highest mean score (the smaller count on a tie).
        ``"one_se"``: the smallest count whose mean score is at least the best mean minus
        the best count's standard error (Hastie, Tibshirani and Friedman's one-standard-error
        rule: the simplest model statistically indistinguishable from the best).

    Returns
    -------
    int
        The chosen value of the ``n_experts`` column.

    Raises
    ------
    ValueError
        For an unknown ``rule``, missing columns, or no finite mean score.
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}.")
    missing = {"n_experts", "mean_score", "sem_score"} - set(cv_results.columns)
    if missing:
        raise ValueError(f"cv_results lacks the columns {sorted(missing)}.")
    table = cv_results.sort_values("n_experts")
    if table.empty or table["mean_score"].isna().all():
        raise ValueError("cv_results has no finite mean score to choose from.")
    best = table.loc[table["mean_score"].idxmax()]
    if rule == "best":
        return int(best["n_experts"])
    threshold = best["mean_score"] - (0.0 if np.isnan(best["sem_score"]) else best["sem_score"])
    return int(table.loc[table["mean_score"] >= threshold, "n_experts"].min())


class NExpertsSelection:
    """The result of :func:`select_n_experts`.

    Parameters
    ----------
    cv_results : pandas.DataFrame
        Stored as ``cv_results_``.
    best_n_experts : int
        Stored as ``best_n_experts_``.
    best_estimator : estimator or None
        Stored as ``best_estimator_``.
    rule : {"one_se", "best"}
        The rule that chose ``best_n_experts``.
    scoring : str, callable or None
        The scorer of the cross-validation (``None``: the estimator's ``score``).

    Attributes
    ----------
    cv_results_ : pandas.DataFrame
        One row per candidate, indexed by ``n_experts``: ``mean_score``, ``std_score``,
        ``sem_score``, ``mean_fit_time``, ``std_fit_time`` and ``split<i>_score``.
    best_n_experts_ : int
        The count chosen by ``rule``.
    best_estimator_ : estimator or None
        The estimator with ``n_experts=best_n_experts_``, refitted on all data (``None``
        with ``refit=False``).
    rule : str
        The rule that chose ``best_n_experts_``.
    scoring : str, callable or None
        The scorer of the cross-validation.
    """

    def __init__(self, cv_results, best_n_experts, best_estimator, rule, scoring):
        self.cv_results_ = cv_results
        self.best_n_experts_ = best_n_experts
        self.best_estimator_ = best_estimator
        self.rule = rule
        self.scoring = scoring

    def __repr__(self):
        return (f"NExpertsSelection(best_n_experts_={self.best_n_experts_}, rule={self.rule!r}, "
                f"candidates={list(self.cv_results_.index)})")

    def plot(self, ax=None):
        """Plot the mean cross-validated score ± std per candidate, the chosen count marked.

        The dotted line is the one-standard-error threshold (best mean minus its standard
        error). Needs matplotlib (``pip install 'sklearn-moe[plot]'``).

        Parameters
        ----------
        ax : matplotlib.axes.Axes, optional
            Axes to draw on; a new figure otherwise.

        Returns
        -------
        matplotlib.axes.Axes
            The axes drawn on (``ax``, or the new figure's).

        Raises
        ------
        ImportError
            If matplotlib is not installed.
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("NExpertsSelection.plot needs matplotlib: pip install 'sklearn-moe[plot]'") from error
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 4))
        table = self.cv_results_
        counts = table.index.to_numpy()
        ax.errorbar(counts, table["mean_score"], yerr=table["std_score"], fmt="o-", capsize=4,
                    label="mean ± std over folds")
        best = table["mean_score"].idxmax()
        ax.axhline(table.loc[best, "mean_score"] - table.loc[best, "sem_score"], color="grey", ls=":",
                   label="best − 1 standard error")
        chosen = table.loc[self.best_n_experts_]
        ax.plot([self.best_n_experts_], [chosen["mean_score"]], marker="*", ms=16, color="C3", ls="none",
                label=f"chosen ({self.rule}): {self.best_n_experts_}")
        if counts.min() > 0 and counts.max() / counts.min() >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("n_experts (1 = no mixture)")
        ax.set_ylabel(f"cross-validated {_scoring_name(self.scoring)}")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return ax


def _check_candidates(candidates):
    candidates = list(candidates) if candidates is not None else []
    if not candidates:
        raise ValueError("candidates must contain at least one expert count.")
    for count in candidates:
        check_int("every candidate expert count (1 is the non-MoE ablation)", count)
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"candidates has duplicates: {candidates}.")
    return sorted(int(count) for count in candidates)


def _scoring_name(scoring) -> str:
    """A short axis label for ``scoring``: its name, a function's name, or "score" (a
    scorer object's repr can run to hundreds of characters)."""
    if isinstance(scoring, str):
        return scoring
    function = getattr(scoring, "_score_func", scoring)
    name = getattr(function, "__name__", None)
    return name if name and name != "<lambda>" else "score"


def select_n_experts(estimator, X, y, candidates=(1, 2, 4, 8, 16), cv=5, rule="one_se", *, scoring=None,
                     groups=None, refit=True, n_jobs=None):
    """Choose the number of experts by cross-validation.

    Every candidate count is scored on the same folds (the estimator's other parameters
    unchanged; ``top_k`` is "at most", so ``n_experts=1`` runs the single expert: the
    non-MoE ablation) by a :class:`~sklearn.model_selection.GridSearchCV` over
    ``n_experts`` whose ``refit`` is the rule: ``rule="one_se"`` picks the smallest count
    within one standard error of the best mean score, ``rule="best"`` the best mean.

    Parameters
    ----------
    estimator : estimator
        A MoE estimator or a Pipeline (or other meta-estimator) holding exactly one.
    X : array-like of shape (n_samples, n_features)
        Training inputs.
    y : array-like of shape (n_samples,) or (n_samples, n_targets)
        Training targets.
    candidates : sequence of int, default=(1, 2, 4, 8, 16)
        Expert counts to compare, each >= 1 and distinct (1 is the non-MoE ablation).
    cv : int, cross-validation generator or iterable, default=5
        As in :func:`sklearn.model_selection.cross_validate` (stratified folds for a
        classifier given an int); every candidate is scored on the same folds.
    rule : {"one_se", "best"}, default="one_se"
        See :func:`one_standard_error_rule`.
    scoring : str or callable, optional
        A scikit-learn scorer (greater is better); ``None`` is the estimator's ``score``.
    groups : array-like of shape (n_samples,), optional
        Group labels for a group-aware ``cv`` splitter.
    refit : bool, default=True
        Refit the chosen count on all of X, y as ``best_estimator_``.
    n_jobs : int, optional
        Fits (every count on every fold) run in parallel, as ``GridSearchCV``'s ``n_jobs``.

    Returns
    -------
    NExpertsSelection
        With ``cv_results_``, ``best_n_experts_``, ``best_estimator_`` and ``plot()``.

    Raises
    ------
    ValueError
        Empty or invalid candidates, an unknown rule, or no MoE step in ``estimator``.

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn_moe import MoERegressor
    >>> from sklearn_moe.tuning import select_n_experts
    >>> X, y = load_diabetes(return_X_y=True)
    >>> selection = select_n_experts(MoERegressor(max_epochs=3, random_state=0), X, y, candidates=(1, 2), cv=2)
    >>> selection.best_n_experts_ in (1, 2), selection.best_estimator_.n_experts == selection.best_n_experts_
    (True, True)
    >>> list(selection.cv_results_["n_experts"])
    [1, 2]
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}; got {rule!r}.")
    candidates = _check_candidates(candidates)
    prefix, _ = find_moe_step(estimator)
    key = prefix + "n_experts"
    splits = list(check_cv(cv, y, classifier=is_classifier(estimator)).split(X, y, groups))

    def chosen_index(cv_results) -> int:
        table = _table(cv_results, key, len(splits))
        return int(np.flatnonzero(table["n_experts"] == one_standard_error_rule(table, rule))[0])

    search = GridSearchCV(estimator, {key: candidates}, scoring=scoring, n_jobs=n_jobs, cv=splits,
                          refit=chosen_index if refit else False, error_score="raise")
    search.fit(X, y)
    table = _table(search.cv_results_, key, len(splits)).sort_values("n_experts", ignore_index=True)
    best = one_standard_error_rule(table, rule)
    table.index = pd.Index(table["n_experts"].to_numpy())
    return NExpertsSelection(table, best, search.best_estimator_ if refit else None, rule, scoring)


def _table(cv_results, key: str, n_splits: int) -> pd.DataFrame:
    """:class:`NExpertsSelection`'s ``cv_results_`` from ``GridSearchCV``'s, one row per
    count, in the search's order; ``key`` is the ``n_experts`` parameter's name."""
    table = pd.DataFrame({
        "n_experts": [int(params[key]) for params in cv_results["params"]],
        "mean_score": cv_results["mean_test_score"],
        "std_score": cv_results["std_test_score"],
        "sem_score": np.asarray(cv_results["std_test_score"]) / np.sqrt(n_splits),
        "mean_fit_time": cv_results["mean_fit_time"],
        "std_fit_time": cv_results["std_fit_time"],
    })
    for i in range(n_splits):
        table[f"split{i}_score"] = cv_results[f"split{i}_test_score"]
    return table
