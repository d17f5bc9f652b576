"""What a classifier's gate should mix: the experts' logits or their class probabilities.

    python -m benchmarks.class_mixing [--datasets ...] [--folds 3] [--max-rows 2000]

``MoEClassifier(mixing="logits")`` and ``MoEClassifier(mixing="probabilities")``, their other
parameters at their defaults, on the accuracy suite's classification sets with its
subsamples, folds and preprocessing (:func:`benchmarks.accuracy._suite_data`,
:func:`benchmarks.datasets.preprocessor`). Scores on the held-out fold: log loss, accuracy,
Brier score (the mean squared error of the probability vector, summed over classes) and the
expected calibration error of the top class (15 equal-width confidence bins); and
``collapsed``, whether the fit warned that its router had collapsed onto fewer experts
(:class:`~sklearn_moe.ExpertCollapseWarning`).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss

from sklearn_moe import ExpertCollapseWarning, MoEClassifier

from .datasets import preprocessor
from .variants import run_variants

MIXINGS = ("logits", "probabilities")
RESULTS = Path(__file__).parent / "results" / "class_mixing"
METRICS = ["log_loss", "accuracy", "brier", "ece", "collapsed", "fit_time_s"]
SCORES = METRICS[:4]


def calibration_error(y: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error of the top class: ``sum_b (n_b / n) |acc_b - conf_b|`` over
    equal-width bins of the top-class probability."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    error = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def fold_scores(y: np.ndarray, proba: np.ndarray) -> dict:
    """Log loss, accuracy, Brier score and top-class ECE of class indices ``y`` (n,) under
    probabilities ``proba`` (n, n_classes)."""
    one_hot = np.eye(proba.shape[1])[y]
    return {"log_loss": log_loss(y, proba, labels=np.arange(proba.shape[1])),
            "accuracy": accuracy_score(y, proba.argmax(axis=1)),
            "brier": float(((proba - one_hot) ** 2).sum(axis=1).mean()),
            "ece": calibration_error(y, proba)}


def run_fold(name: str, mixing: str, X, y, train, test, seed: int) -> dict:
    """Fit on the rows ``train`` of ``(X, y)`` and score on the rows ``test``."""
    X_train, y_train, X_test, y_test = X.iloc[train], y[train], X.iloc[test], y[test]
    prep = preprocessor(X).fit(X_train)  # X: which columns need an imputer
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExpertCollapseWarning)
        model = MoEClassifier(mixing=mixing, random_state=seed).fit(prep.transform(X_train), y_train)
    fit_time = time.perf_counter() - start
    collapsed = any(issubclass(w.category, ExpertCollapseWarning) for w in caught)
    proba = model.predict_proba(prep.transform(X_test))
    y_index = np.searchsorted(model.classes_, y_test)
    scores = fold_scores(y_index, proba)
    return {"dataset": name, "mixing": mixing, **scores, "collapsed": collapsed, "fit_time_s": fit_time,
            "summary": f"log loss {scores['log_loss']:.4f} accuracy {scores['accuracy']:.4f}"}


def main(argv=None) -> pd.DataFrame:
    return run_variants("class_mixing", __doc__.split("\n\n")[0], "classification", MIXINGS, run_fold, report,
                        RESULTS, argv)


def report(frame: pd.DataFrame, command: str, machine: str, folds: int, seed: int, max_rows: int) -> str:
    """The markdown report of a run's per-fold ``frame``: means per data set and mixing, and
    how often each mixing scores better, fold by fold."""
    table = frame.groupby(["dataset", "mixing"], sort=True)[METRICS].mean().reset_index()
    paired = frame.pivot_table(index=["dataset", "fold"], columns="mixing", values=SCORES)
    wins = {metric: int((paired[metric]["probabilities"] < paired[metric]["logits"]).sum()
                        if metric != "accuracy" else
                        (paired[metric]["probabilities"] > paired[metric]["logits"]).sum())
            for metric in SCORES}
    means = frame.groupby("mixing")[SCORES].mean()
    collapsed = frame.groupby("mixing")["collapsed"].sum()
    summary = "\n".join(
        f"- {metric}: mean {means.loc['logits', metric]:.4g} (logits) vs {means.loc['probabilities', metric]:.4g} "
        f"(probabilities); probabilities better on {wins[metric]} of {len(paired)} folds"
        for metric in SCORES)
    summary += (f"\n- router collapse warned in {collapsed['logits']} (logits) and {collapsed['probabilities']} "
                f"(probabilities) of {len(paired)} fits")
    return (f"# Classifier mixing: logits or probabilities\n\nCommand: `{command}`. Machine: {machine}.\n\n"
            f"{folds}-fold stratified CV (seed {seed}) on the accuracy suite's subsamples (at most {max_rows} "
            "rows); means over the folds (``collapsed``: the share of fits whose router collapsed). "
            "Lower is better for log loss, Brier score and ECE.\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n\nOver every fold:\n\n" + summary + "\n")


if __name__ == "__main__":
    main()
