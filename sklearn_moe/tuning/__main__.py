"""Command line: ``python -m sklearn_moe.tuning worker|summary ...``.

Start as many workers as you like, on one host with a journal file, or on several machines
with a database URL; they share the study and together run ``--n-trials`` trials::

    python -m sklearn_moe.tuning worker --storage study.log --study diabetes --data diabetes \\
        --n-trials 40 --cv 5 --param max_epochs=100
    python -m sklearn_moe.tuning worker --storage postgresql+psycopg2://user:pw@db-host/optuna \\
        --study concrete --data concrete.csv --target strength --n-trials 200
    python -m sklearn_moe.tuning summary --storage study.log --study diabetes

``--data`` is a CSV or parquet file (with ``--target`` naming the target column;
non-numeric columns are one-hot encoded in a Pipeline before the MoE) or the name of a
scikit-learn data set bundled with the package (nothing is downloaded): diabetes,
breast_cancer, iris, wine.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import pandas as pd

from ..cli import add_param_option, infer_task, parse_params

BUILTIN = {
    "diabetes": ("load_diabetes", "regressor"),
    "breast_cancer": ("load_breast_cancer", "classifier"),
    "iris": ("load_iris", "classifier"),
    "wine": ("load_wine", "classifier"),
}


def load_data(data: str, target: str | None):
    """``(X, y, kind)``: a built-in data set's or a CSV/parquet file's features and target."""
    if data in BUILTIN:
        import sklearn.datasets

        loader, kind = BUILTIN[data]
        X, y = getattr(sklearn.datasets, loader)(return_X_y=True, as_frame=True)
        return X, y, kind
    if not data.endswith((".csv", ".parquet", ".pq")):
        raise ValueError(f"--data must be a .csv/.parquet file or one of {sorted(BUILTIN)}; got {data!r}.")
    frame = pd.read_parquet(data) if data.endswith((".parquet", ".pq")) else pd.read_csv(data)
    if target is None or target not in frame:
        raise ValueError(f"--target must name a column of {data}; columns: {list(frame.columns)}.")
    y = frame.pop(target)
    return frame, y, "classifier" if infer_task(y) == "classification" else "regressor"


def build_estimator(kind, X, settings):
    """The MoE estimator, in a one-hot Pipeline when X has non-numeric columns."""
    from sklearn.compose import make_column_transformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder

    from sklearn_moe import MoEClassifier, MoERegressor

    moe = (MoEClassifier if kind == "classifier" else MoERegressor)(device="cpu")
    moe.set_params(**settings)
    categorical = list(X.select_dtypes(exclude=["number"]).columns)
    if not categorical:
        return moe
    encoder = make_column_transformer((OneHotEncoder(handle_unknown="ignore"), categorical), remainder="passthrough")
    return make_pipeline(encoder, moe)


def _parser():
    parser = argparse.ArgumentParser(prog="python -m sklearn_moe.tuning", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("worker", help="run trials of a shared study until its n_trials are claimed")
    summary = commands.add_parser("summary", help="print a study's trials by state and its best trial")
    for sub in (worker, summary):
        sub.add_argument("--storage", required=True, help="journal file (*.log) or database URL")
        sub.add_argument("--study", required=True, help="study name shared by the workers")
    worker.add_argument("--data", required=True, help=f"CSV/parquet file or one of {sorted(BUILTIN)}")
    worker.add_argument("--target", help="target column of a CSV/parquet file")
    worker.add_argument("--estimator", choices=("auto", "regressor", "classifier"), default="auto")
    worker.add_argument("--n-trials", type=int, default=20, help="total trials of the study (all workers)")
    worker.add_argument("--cv", type=int, default=5, help="number of folds (default 5)")
    worker.add_argument("--scoring", help="scikit-learn scorer name (default: the estimator's score)")
    add_param_option(worker, "--set", note="; a parameter set so is not searched")
    worker.add_argument("--include", nargs="+", metavar="NAME", help="search only these parameters")
    worker.add_argument("--max-experts", type=int, default=16)
    worker.add_argument("--no-pruning", action="store_true")
    worker.add_argument("--warmup-epochs", type=int, default=5)
    worker.add_argument("--timeout", type=float, help="claim no new trial after this many seconds")
    worker.add_argument("--seed", type=int, help="sampler seed (give each worker its own)")
    worker.add_argument("--heartbeat-interval", type=int, default=10)
    worker.add_argument("--grace-period", type=int, default=60)
    worker.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser


def _summary(study):
    from optuna.trial import TrialState

    counts = {state.name: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    print(f"study {study.study_name!r}: " + ", ".join(f"{name} {n}" for name, n in counts.items() if n))
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if completed:
        best = max(completed, key=lambda trial: trial.value)
        print(f"best trial {best.number}: score {best.value:.6g}")
        for name, value in best.params.items():
            print(f"  {name} = {value}")
    return counts


def main(argv=None):
    """Entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    import optuna
    import torch

    from . import make_storage, search_space, tune
    from ._space import base_space

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.command == "summary":
        storage = make_storage(args.storage, heartbeat_interval=None)
        _summary(optuna.load_study(study_name=args.study, storage=storage))
        return 0
    torch.set_num_threads(args.threads)
    X, y, kind = load_data(args.data, args.target)
    kind = kind if args.estimator == "auto" else args.estimator
    settings = parse_params(args.param)
    estimator = build_estimator(kind, X, settings)
    tunable = base_space(classifier=kind == "classifier")
    fixed = [name for name in settings if name in tunable and name not in (args.include or ())]
    space = search_space(estimator, max_experts=args.max_experts, include=args.include, exclude=fixed)
    result = tune(estimator, X, np.asarray(y), n_trials=args.n_trials, cv=args.cv, scoring=args.scoring,
                  storage=args.storage, study_name=args.study, pruning=not args.no_pruning, timeout=args.timeout,
                  param_distributions=space, random_state=args.seed, warmup_epochs=args.warmup_epochs,
                  refit=False, heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period)
    _summary(result.study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
