"""Categorical columns: learned embeddings, one-hot inside the estimator, or a one-hot pipeline.

    python -m benchmarks.categorical [--datasets ...] [--folds 3] [--max-rows 2000]

Three ways to give an MoE a table with categorical columns, on the accuracy suite's data
sets that have a column of more than 8 categories, with its subsamples and folds
(:func:`benchmarks.accuracy._suite_data`):

- ``embedded``: the raw frame to ``MoERegressor(one_hot_max_categories=8)`` /
  ``MoEClassifier(one_hot_max_categories=8)``, which one-hot encode columns of at most 8
  categories and give the others a learned embedding (RealMLP's threshold);
- ``one_hot``: the raw frame with ``one_hot_max_categories=None`` (every column one-hot
  inside the estimator);
- ``pipeline``: the suite's preprocessing (:func:`benchmarks.datasets.preprocessor`:
  imputation, a OneHotEncoder and a StandardScaler) in front of the default estimator.

Scores on the held-out fold: R^2 and RMSE (regression), accuracy and log loss
(classification).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss, mean_squared_error, r2_score
from sklearn.pipeline import make_pipeline

from sklearn_moe import MoEClassifier, MoERegressor

from .datasets import DATASETS, preprocessor
from .variants import run_variants

VARIANTS = ("embedded", "one_hot", "pipeline")
#: The suite's data sets with a categorical column of more than 8 categories.
DEFAULT_DATASETS = ("ames", "sacramento", "hpc_data", "attrition")
RESULTS = Path(__file__).parent / "results" / "categorical"


def build(variant: str, task: str, X: pd.DataFrame, seed: int):
    """The model of ``variant`` for ``task``, unfitted."""
    estimator_class = MoERegressor if task == "regression" else MoEClassifier
    if variant == "embedded":
        return estimator_class(random_state=seed, one_hot_max_categories=8)
    if variant == "one_hot":
        return estimator_class(random_state=seed, one_hot_max_categories=None)
    return make_pipeline(preprocessor(X), estimator_class(random_state=seed, one_hot_max_categories=8))


def run_fold(name: str, variant: str, X, y, train, test, seed: int) -> dict:
    """Fit on the rows ``train`` of ``(X, y)`` and score on the rows ``test``."""
    task = DATASETS[name].task
    model = build(variant, task, X, seed).fit(X.iloc[train], y[train])
    if task == "regression":
        prediction = model.predict(X.iloc[test])
        score, loss = r2_score(y[test], prediction), float(np.sqrt(mean_squared_error(y[test], prediction)))
        summary = f"R2 {score:.4f}"
    else:
        proba = model.predict_proba(X.iloc[test])
        classes = model.classes_
        score = accuracy_score(y[test], classes[proba.argmax(axis=1)])
        loss = log_loss(y[test], proba, labels=classes)
        summary = f"accuracy {score:.4f} log loss {loss:.4f}"
    return {"dataset": name, "task": task, "variant": variant, "score": score, "loss": loss, "summary": summary}


def report(frame: pd.DataFrame, command: str, machine: str, folds: int, seed: int, max_rows: int) -> str:
    """The markdown report of a run's per-fold ``frame``: means per data set and variant, and
    how often the embedding scores better than each one-hot encoding, fold by fold."""
    table = frame.pivot_table(index=["dataset", "task"], columns="variant", values=["score", "loss"])
    table = table.reindex(columns=pd.MultiIndex.from_product([["score", "loss"], VARIANTS]))
    table.columns = [f"{metric} {variant}" for metric, variant in table.columns]
    paired = frame.pivot_table(index=["dataset", "fold"], columns="variant", values="score")
    embedded = paired["embedded"]
    wins = "\n".join(f"- the embedding scores higher than `{other}` on {int((embedded > paired[other]).sum())} of "
                     f"{len(paired)} folds (equal on {int((embedded == paired[other]).sum())})"
                     for other in VARIANTS[1:])
    return (f"# Categorical columns: embeddings against one-hot encodings\n\nCommand: `{command}`. "
            f"Machine: {machine}.\n\n{folds}-fold CV (stratified for classification, seed {seed}) on the accuracy "
            f"suite's subsamples (at most {max_rows} rows); means over the folds. `score`: R^2 (regression) or "
            "accuracy (classification), higher is better; `loss`: RMSE or log loss, lower is better.\n\n"
            + table.reset_index().to_markdown(index=False, floatfmt=".4g") + "\n\nFold by fold:\n\n" + wins + "\n")


def main(argv=None) -> pd.DataFrame:
    return run_variants("categorical", __doc__.split("\n\n")[0], None, VARIANTS, run_fold, report, RESULTS, argv,
                        datasets=DEFAULT_DATASETS)


if __name__ == "__main__":
    main()
