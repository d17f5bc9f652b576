"""Cross-validated accuracy of the MoE estimators against non-MoE baselines.

    python -m benchmarks.accuracy --suite foundation

Every model gets the same preprocessing (one-hot + standard scaling) and the same folds.
Writes ``<out>/accuracy_<suite>.md`` (table and machine) and ``.csv``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import KFold, StratifiedKFold, cross_validate
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline

from sklearn_moe import MoEClassifier, MoERegressor

from .datasets import DATASETS, preprocessor
from .machine import describe_machine

MODELS = {
    "regression": {
        "MoERegressor (defaults)": lambda seed: MoERegressor(random_state=seed),
        "MLPRegressor (defaults)": lambda seed: MLPRegressor(random_state=seed),
        # The defaults stop at max_iter=200 before converging on small data sets.
        "MLPRegressor (max_iter=2000)": lambda seed: MLPRegressor(max_iter=2000, random_state=seed),
        "HistGradientBoosting": lambda seed: HistGradientBoostingRegressor(random_state=seed),
    },
    "classification": {
        "MoEClassifier (defaults)": lambda seed: MoEClassifier(random_state=seed),
        "MLPClassifier (defaults)": lambda seed: MLPClassifier(random_state=seed),
        "MLPClassifier (max_iter=2000)": lambda seed: MLPClassifier(max_iter=2000, random_state=seed),
        "HistGradientBoosting": lambda seed: HistGradientBoostingClassifier(random_state=seed),
    },
}
SCORING = {"regression": "r2", "classification": "accuracy"}
SUITES = {
    "foundation": ["concrete", "diamonds"],
    "demo": ["diabetes", "breast_cancer"],
}


def evaluate(dataset_name: str, n_folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """Cross-validate every model of the dataset's task; one row per model."""
    dataset = DATASETS[dataset_name]
    X, y = dataset.load()
    splitter = (KFold if dataset.task == "regression" else StratifiedKFold)(n_folds, shuffle=True, random_state=seed)
    rows = []
    for model_name, make_model in MODELS[dataset.task].items():
        pipeline = make_pipeline(preprocessor(X), make_model(seed))
        started = time.perf_counter()
        with warnings.catch_warnings():
            # scikit-learn's MLP at max_iter=200 warns on every fold; the table shows the effect.
            warnings.simplefilter("ignore", ConvergenceWarning)
            result = cross_validate(pipeline, X, y, cv=splitter, scoring=SCORING[dataset.task], error_score="raise")
        rows.append({
            "dataset": dataset_name,
            "model": model_name,
            "metric": SCORING[dataset.task],
            "mean": float(np.mean(result["test_score"])),
            "std": float(np.std(result["test_score"])),
            "fit_time_s": float(np.mean(result["fit_time"])),
            "wall_time_s": time.perf_counter() - started,
        })
    return pd.DataFrame(rows)


def to_markdown(results: pd.DataFrame) -> str:
    table = results.assign(
        score=[f"{m:.4f} ± {s:.4f}" for m, s in zip(results["mean"], results["std"])],
        fit_time=[f"{t:.1f} s" for t in results["fit_time_s"]],
    )[["dataset", "model", "metric", "score", "fit_time"]]
    header = "| " + " | ".join(table.columns) + " |\n|" + "---|" * len(table.columns) + "\n"
    return header + "\n".join("| " + " | ".join(map(str, row)) + " |" for row in table.itertuples(index=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="foundation")
    parser.add_argument("--datasets", nargs="*", help="override the suite's datasets")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    names = args.datasets or SUITES[args.suite]
    results = pd.concat([evaluate(name, args.folds, args.seed) for name in names], ignore_index=True)
    command = "python -m benchmarks.accuracy " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    report = (
        f"# Accuracy: suite `{args.suite}`\n\n{args.folds}-fold cross-validation (shuffled, seed {args.seed}), "
        f"same preprocessing for every model (one-hot + standard scaling); fit time is the mean per fold.\n\n"
        f"{to_markdown(results)}\n\nDatasets:\n"
        + "".join(f"- {DATASETS[n].description}\n" for n in names)
        + f"\nMachine: {describe_machine()}\n\nCommand: `{command.strip()}`\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out / f"accuracy_{args.suite}.csv", index=False)
    (args.out / f"accuracy_{args.suite}.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
