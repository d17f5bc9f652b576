"""Cross-validated accuracy of the MoE estimators against other models.

    python -m benchmarks.accuracy --suite quick --jobs 2   # 11 data sets, 3-fold CV, <= 2000 rows, every model
    python -m benchmarks.accuracy --suite full --jobs 2    # 14 data sets, 5-fold x 2 repeats, <= 20000 rows
    python -m benchmarks.accuracy --suite demo             # what examples/demo.py prints
    python -m benchmarks.accuracy --suite quick --datasets concrete --models ridge hgb --folds 2 --out /tmp/x

Every model gets the same preprocessing (one-hot + standard scaling, imputation where data
are missing) and the same folds: repeated (stratified, for classification) K-fold CV of the
models in ``benchmarks/models.py``: the MoE at its defaults and its ablations, scikit-learn's
MLP (``early_stopping=True``), Ridge / LogisticRegression, HistGradientBoosting, and where
installed LightGBM, CatBoost, RealMLP and TabM. Scores: R^2 (regression), accuracy and log
loss (classification), mean +- std over all folds, rank per data set, fit time per fold.
A suite writes ``<out>/accuracy_<suite>.md`` (tables, summary, machine, command), ``.csv``
(every fold) and ``.png`` (score against HistGradientBoosting, average ranks). A run
changed by ``--datasets``, ``--models``, ``--folds``, ``--repeats``, ``--max-rows``,
``--max-epochs``, ``--seed`` or ``--threads`` writes ``accuracy_<suite>_custom.*`` instead, so
it never overwrites the suite's committed results. The report is rewritten after every model
of every data set, with the protocol in ``.json``, so an interrupted run (Ctrl-C, which also
stops a fit in progress, unscored) leaves a partial report; ``--resume`` continues it (same
protocol required), skipping the (data set, model) pairs already done.
``--jobs`` runs folds in that many processes. PyTorch and the BLAS/OpenMP pools of every
process get ``--threads`` threads (default 1): the models are small, and on a shared 2-core
machine two threads per process were several times slower than one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, log_loss, r2_score
from sklearn.model_selection import (
    RepeatedKFold,
    RepeatedStratifiedKFold,
)
from sklearn.pipeline import make_pipeline

from sklearn_moe.cli import int_at_least

from .datasets import DATASETS, preprocessor, subsample
from .machine import command_line, describe_machine
from .models import MODEL_SPECS, resolve_models

SUITES = {
    "demo": ["regime", "concrete"],
    "quick": ["concrete", "diamonds", "ames", "computers", "boston", "regime",
              "wa_churn", "credit_data", "hpc_data", "attrition", "breast_cancer"],
    "full": ["concrete", "diamonds", "ames", "computers", "boston", "sacramento", "diabetes", "regime",
             "wa_churn", "credit_data", "hpc_data", "attrition", "breast_cancer", "wine"],
}


@dataclass(frozen=True)
class CVSuite:
    """Protocol of a repeated-CV suite.

    Attributes
    ----------
    folds, repeats : int
        ``RepeatedKFold`` / ``RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats)``.
    max_rows : int or None
        Larger data sets are subsampled to this many rows (fixed seed; stratified for
        classification) before the folds are drawn.
    moe_params : dict
        Parameters set on every MoE model of the suite on top of its own (e.g. an epoch cap).
    model_max_rows : dict
        Models that run only on data sets of at most this many rows (after the row cap),
        because their fits would take hours beyond it; the report says where they did not run.
    models : tuple of str or None
        The models run when ``--models`` is not given; None is
        :data:`benchmarks.models.DEFAULT_MODELS`.
    """

    folds: int
    repeats: int
    max_rows: int | None
    moe_params: dict = field(default_factory=dict)
    model_max_rows: dict = field(default_factory=dict)
    models: tuple | None = None


CV_SUITES = {
    # quick: every model, the default MoE's ablations and TabM included (not the options run only by name).
    "quick": CVSuite(folds=3, repeats=1, max_rows=2000,
                     models=tuple(key for key, spec in MODEL_SPECS.items() if spec.in_quick_suite)),
    # demo (examples/demo.py): the default MoE, its one-expert and no-gate ablations and two
    # baselines, on data where a mixture should pay and on a real table; about a minute.
    "demo": CVSuite(folds=3, repeats=1, max_rows=1200, models=("moe", "moe_1expert", "moe_uniform", "mlp", "hgb")),
    # full: TabM's CPU fits take minutes per fold: it runs on the data sets of up to 1100 rows.
    "full": CVSuite(folds=5, repeats=2, max_rows=20000, model_max_rows={"tabm": 1100}),
}


def _short(message: str, limit: int = 160) -> str:
    message = " ".join(str(message).split())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _iterations(estimator) -> dict:
    """Epochs or iterations run (``n_iter_``) and, for the MoE, the best validation epoch
    (of the regressor inside a ``TransformedTargetRegressor``)."""
    estimator = getattr(estimator, "regressor_", estimator)
    n_iter = getattr(estimator, "n_iter_", None)
    result = {"n_iter": float(np.max(n_iter)) if n_iter is not None else np.nan}
    history = getattr(estimator, "history_", None)
    if isinstance(history, pd.DataFrame) and {"epoch", "valid_loss_best"} <= set(history.columns):
        best = history.loc[history["valid_loss_best"].astype(bool), "epoch"]
        result["best_epoch"] = float(best.max()) if len(best) else np.nan
    return result


def _score_fold(task, model, X_test, y_test):
    started = time.perf_counter()
    if task == "regression":
        scores = {"r2": r2_score(y_test, model.predict(X_test))}
    else:
        scores = {"accuracy": accuracy_score(y_test, model.predict(X_test))}
        if hasattr(model, "predict_proba"):
            scores["log_loss"] = log_loss(y_test, model.predict_proba(X_test), labels=model.classes_)
    scores["predict_time_s"] = time.perf_counter() - started
    return scores


@lru_cache(maxsize=4)
def _suite_data(dataset_name: str, folds: int, repeats: int, max_rows: int | None, seed: int):
    """The subsampled data set and its folds (cached: every fold of a worker reuses them)."""
    dataset = DATASETS[dataset_name]
    X, y = subsample(*dataset.load(), max_rows, dataset.task, seed)
    splitter_class = RepeatedKFold if dataset.task == "regression" else RepeatedStratifiedKFold
    splits = list(splitter_class(n_splits=folds, n_repeats=repeats, random_state=seed).split(X, y))
    return X, y, splits


def cross_validate_fold(dataset_name, key, index, folds=3, repeats=1, max_rows=None, seed=0, moe_params=None) -> dict:
    """Fit and score one model on one fold; the row of :func:`cross_validate_models`.

    A fold that raises is recorded (``error``, scores NaN) rather than raised; warnings are
    recorded (``warnings``) rather than printed.
    """
    dataset = DATASETS[dataset_name]
    X, y, splits = _suite_data(dataset_name, folds, repeats, max_rows, seed)
    train, test = splits[index]
    spec = MODEL_SPECS[key]
    estimator = spec.build(dataset.task, seed, dict(moe_params or {}) if spec.is_moe else {})
    model = make_pipeline(preprocessor(X), estimator)
    row = {"dataset": dataset_name, "task": dataset.task, "model_key": key, "model": spec.names[dataset.task],
           "repeat": index // folds, "fold": index % folds, "n_train": len(train), "n_test": len(test),
           "fit_time_s": np.nan, "predict_time_s": np.nan, "n_iter": np.nan, "best_epoch": np.nan,
           "error": "", "warnings": ""}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            started = time.perf_counter()
            model.fit(X.iloc[train], y[train])  # Ctrl-C propagates: the run stops, no fold is scored
            row["fit_time_s"] = time.perf_counter() - started
            row.update(_iterations(model[-1]))
            row.update(_score_fold(dataset.task, model, X.iloc[test], y[test]))
        except Exception as error:  # noqa: BLE001 - recorded in the results, the run goes on
            row["error"] = _short(f"{type(error).__name__}: {error}")
    messages = dict.fromkeys(_short(f"{w.category.__name__}: {w.message}", 120) for w in caught)
    row["warnings"] = " | ".join(messages)
    return row


def cross_validate_models(dataset_name, model_keys, folds=3, repeats=1, max_rows=None, seed=0, moe_params=None,
                          log=None) -> pd.DataFrame:
    """Repeated K-fold CV of the suite models on one data set; one row per model and fold.

    Every model sees the same subsample, the same folds and the same preprocessing. A fold
    that raises is recorded (``error``, scores NaN) rather than stopping the run; warnings
    are recorded per fold (``warnings``) rather than printed.

    Parameters
    ----------
    dataset_name : str
        Key of :data:`benchmarks.datasets.DATASETS`.
    model_keys : list of str
        Keys of :data:`benchmarks.models.MODEL_SPECS`.
    folds, repeats : int
        ``RepeatedKFold`` (regression) or ``RepeatedStratifiedKFold`` (classification).
    max_rows : int or None
        Row cap; larger data sets are subsampled with ``seed`` first.
    seed : int, default=0
        Seed of the subsample, the folds and every model.
    moe_params : dict or None
        Extra parameters of the MoE models (e.g. ``{"max_epochs": 60}``).
    log : callable or None
        Called with one progress line per model.

    Returns
    -------
    DataFrame
        Columns: dataset, task, model_key, model, repeat, fold, n_train, n_test, the
        scores (``r2``, or ``accuracy`` and ``log_loss``), fit_time_s, predict_time_s,
        n_iter (epochs or iterations of the fitted model, where it has ``n_iter_``),
        best_epoch (the MoE's epoch of lowest validation loss), error, warnings.
    """
    rows = []
    for key in model_keys:
        done = [cross_validate_fold(dataset_name, key, index, folds, repeats, max_rows, seed, moe_params)
                for index in range(folds * repeats)]
        rows.extend(done)
        if log is not None:
            log(_progress_line(pd.DataFrame(done)))
    return pd.DataFrame(rows)


def _progress_line(done: pd.DataFrame) -> str:
    first = done.iloc[0]
    metric = "r2" if first["task"] == "regression" else "accuracy"
    scores = done[metric] if metric in done else pd.Series([np.nan])
    failed = f", {int((done['error'] != '').sum())} failed folds" if (done["error"] != "").any() else ""
    return (f"{first['dataset']:>14} | {first['model']:<24} {metric} {scores.mean():.4f} ± "
            f"{scores.std(ddof=0):.4f}, fit {done['fit_time_s'].mean():.1f} s/fold{failed}")


def run_suite(suite, datasets=None, models=None, folds=None, repeats=None, max_rows=-1, max_epochs=None, seed=0,
              log=None, done=None, on_progress=None, jobs=1, threads=1) -> tuple[pd.DataFrame, dict]:
    """Run a repeated-CV suite (``quick`` or ``full``), possibly narrowed.

    Parameters
    ----------
    suite : {"quick", "full"}
        The protocol (:data:`CV_SUITES`) and the default data sets (:data:`SUITES`).
    datasets, models : list of str or None
        Subsets of the data sets and models; ``None`` runs all of them.
    folds, repeats : int or None
        Override the suite's folds and repeats.
    max_rows : int or None, default=-1
        Row cap; -1 keeps the suite's, ``None`` or 0 removes it.
    max_epochs : int or None
        Override the MoE models' ``max_epochs``.
    seed : int, default=0
        Seed of the subsamples, folds and models.
    log : callable or None
        Progress lines go here.
    done : DataFrame or None
        Folds of an earlier, interrupted run of the same protocol: its (data set, model)
        pairs are kept as they are and not run again.
    on_progress : callable or None
        Called as ``on_progress(folds, settings)`` after each (data set, model) pair, with
        every fold so far; ``settings["pending"]`` lists the pairs still to run.
    jobs : int, default=1
        Folds run in this many worker processes at once, each with ``threads`` threads.
    threads : int, default=1
        Threads of each worker's PyTorch and BLAS/OpenMP pools (``jobs > 1``; the caller
        sets its own otherwise).

    Returns
    -------
    folds : DataFrame
        Every fold of every model (see :func:`cross_validate_models`).
    settings : dict
        The protocol that ran: suite, datasets, models, folds, repeats, max_rows,
        moe_params, seed, jobs, rows (used and available per data set), skipped (the
        (data set, model, row limit) triples left out by ``model_max_rows``), wall_time_s
        (of this call) and pending (empty once every pair has run).
    """
    config = CV_SUITES[suite]
    names = list(datasets or SUITES[suite])
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    model_keys = resolve_models(models or config.models)
    moe_params = dict(config.moe_params)
    if max_epochs is not None:
        moe_params["max_epochs"] = max_epochs
    settings = {
        "suite": suite, "datasets": names, "models": model_keys, "folds": folds or config.folds,
        "repeats": repeats or config.repeats, "max_rows": config.max_rows if max_rows == -1 else (max_rows or None),
        "moe_params": moe_params, "seed": seed, "jobs": jobs,
    }
    n_folds = settings["folds"] * settings["repeats"]
    protocol = (settings["folds"], settings["repeats"], settings["max_rows"], seed)
    rows = {name: len(_suite_data(name, *protocol)[1]) for name in names}
    pairs, skipped = [], []
    for name in names:
        for key in (k for k in model_keys if DATASETS[name].task in MODEL_SPECS[k].names):
            limit = config.model_max_rows.get(key)
            (skipped.append([name, key, limit]) if limit is not None and rows[name] > limit
             else pairs.append((name, key)))
    settings["skipped"] = skipped
    started = time.perf_counter()
    earlier = done is not None and len(done) > 0
    finished = set(zip(done["dataset"], done["model_key"])) if earlier else set()
    results = [done] if earlier else []
    todo = [pair for pair in pairs if pair not in finished]

    def pair_done(pair, frame):
        results.append(frame)
        finished.add(pair)
        if log is not None:
            log(_progress_line(frame))
        if on_progress is not None:
            on_progress(*_collect(results, settings, pairs, finished, started))

    if jobs == 1:
        for name, key in todo:
            frame = cross_validate_models(name, [key], settings["folds"], settings["repeats"], settings["max_rows"],
                                          seed, moe_params)
            pair_done((name, key), frame)
        return _collect(results, settings, pairs, finished, started)
    with ProcessPoolExecutor(jobs, initializer=_limit_worker_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(cross_validate_fold, name, key, index, *protocol[:3], seed, moe_params): (name, key)
                   for name, key in todo for index in range(n_folds)}
        pending_rows = {pair: [] for pair in todo}
        for future in as_completed(futures):
            pair = futures[future]
            pending_rows[pair].append(future.result())
            if len(pending_rows[pair]) == n_folds:
                frame = pd.DataFrame(pending_rows.pop(pair)).sort_values(["repeat", "fold"], ignore_index=True)
                pair_done(pair, frame)
    return _collect(results, settings, pairs, finished, started)


def _limit_worker_threads(threads: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)


def _collect(results, settings, pairs, finished, started) -> tuple[pd.DataFrame, dict]:
    """The folds so far in suite order, and the settings with rows, wall time and pending pairs."""
    folds = pd.concat(results, ignore_index=True) if results else pd.DataFrame(columns=["dataset", "model_key"])
    order = {pair: i for i, pair in enumerate(pairs)}
    if len(folds):
        folds = folds.iloc[np.argsort([order[pair] for pair in zip(folds["dataset"], folds["model_key"])],
                                      kind="stable")].reset_index(drop=True)
    settings = dict(settings, wall_time_s=time.perf_counter() - started,
                    pending=[list(pair) for pair in pairs if pair not in finished])
    first = folds.drop_duplicates("dataset") if len(folds) else folds
    settings["rows"] = {row.dataset: int(row.n_train + row.n_test) for row in first.itertuples()}
    return folds, settings


@contextmanager
def limit_threads(threads: int):
    """Run the block with ``threads`` threads in PyTorch and in the BLAS/OpenMP pools.

    Parameters
    ----------
    threads : int
        Threads per pool; restored on exit.
    """
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)


def main(argv=None):
    """Command-line entry point; see the module docstring and ``--help``.

    Parameters
    ----------
    argv : list of str or None
        Arguments; ``None`` reads ``sys.argv``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--datasets", nargs="*", help=f"override the suite's datasets; from {sorted(DATASETS)}")
    parser.add_argument("--models", nargs="*", help="a subset of "
                        f"{list(MODEL_SPECS)} (aliases: ridge, logreg, moe1, lgbm)")
    parser.add_argument("--folds", type=int_at_least(2), help="folds per repeat (default: full 5, others 3)")
    parser.add_argument("--repeats", type=int_at_least(1), help="CV repeats (default: full 2, others 1)")
    parser.add_argument("--max-rows", type=int_at_least(0), default=-1,
                        help="subsample larger data sets (default: quick 2000, full 20000, demo 1200; 0: no cap)")
    parser.add_argument("--max-epochs", type=int_at_least(1),
                        help="max_epochs of the MoE models (default: the suite's, else the estimator's)")
    parser.add_argument("--threads", type=int_at_least(1),
                        help="threads of PyTorch and the BLAS/OpenMP pools (default 1)")
    parser.add_argument("--jobs", type=int_at_least(1), default=1, help="folds run in this many processes at "
                        "once, each with --threads threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, subsamples and models (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted run "
                        "whose report is in --out (same options), skipping the (data set, model) pairs it has")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="folder of the report (default benchmarks/results, the committed results)")
    args = parser.parse_args(argv)

    from .accuracy_report import write_report

    try:
        resolve_models(args.models)
    except ValueError as error:
        parser.error(str(error))
    unknown = [name for name in args.datasets or [] if name not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {sorted(DATASETS)}")
    custom = any([args.datasets, args.models, args.folds, args.repeats, args.max_rows != -1, args.max_epochs,
                  args.seed != 0, args.threads not in (None, 1)])
    stem = f"accuracy_{args.suite}" + ("_custom" if custom else "")
    command = command_line("accuracy", argv)
    threads = args.threads or 1
    protocol = _protocol(args, threads)
    done, earlier_wall_time = None, 0.0
    if args.resume:
        try:
            done, earlier_wall_time = load_progress(args.out, stem, protocol)
        except ValueError as error:
            parser.error(str(error))

    def report(folds, settings):
        settings = dict(settings, threads=threads, wall_time_s=earlier_wall_time + settings["wall_time_s"])
        paths = write_report(folds, settings, args.out, stem, command.strip(), describe_machine())
        save_progress(args.out, stem, protocol, settings)
        return paths

    with limit_threads(threads):
        results, settings = run_suite(args.suite, args.datasets, args.models, args.folds, args.repeats,
                                      args.max_rows, args.max_epochs, args.seed,
                                      log=lambda line: print(line, file=sys.stderr, flush=True),
                                      done=done, on_progress=report, jobs=args.jobs, threads=threads)
        paths = report(results, settings)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()), file=sys.stderr)


def _protocol(args, threads: int) -> dict:
    """What must match for ``--resume`` to continue a run: every option that changes a result."""
    return {"suite": args.suite, "datasets": args.datasets,
            "models": resolve_models(args.models or CV_SUITES[args.suite].models),
            "folds": args.folds, "repeats": args.repeats, "max_rows": args.max_rows, "max_epochs": args.max_epochs,
            "seed": args.seed, "threads": threads}


def save_progress(out: Path, stem: str, protocol: dict, settings: dict) -> Path:
    """Write ``<stem>.json``: the protocol of the run, its wall time and the pairs still pending."""
    path = Path(out) / f"{stem}.json"
    path.write_text(json.dumps({"protocol": protocol, "wall_time_s": settings["wall_time_s"],
                                "pending": settings["pending"]}, indent=2) + "\n")
    return path


def load_progress(out: Path, stem: str, protocol: dict) -> tuple[pd.DataFrame, float]:
    """The folds and wall time of the run in ``out`` to resume; ValueError if it used another protocol.

    Parameters
    ----------
    out : Path
        Folder of the run's ``<stem>.json`` and ``<stem>.csv``.
    stem : str
    protocol : dict
        The resuming run's :func:`_protocol`.

    Returns
    -------
    folds : DataFrame
    wall_time_s : float
        Wall time the earlier run(s) took.
    """
    meta_path, csv_path = Path(out) / f"{stem}.json", Path(out) / f"{stem}.csv"
    if not meta_path.exists() or not csv_path.exists():
        raise ValueError(f"nothing to resume: {meta_path} or {csv_path} is missing (run without --resume first)")
    meta = json.loads(meta_path.read_text())
    if meta["protocol"] != protocol:
        changed = sorted(key for key in set(meta["protocol"]) | set(protocol)
                         if meta["protocol"].get(key) != protocol.get(key))
        raise ValueError(f"cannot resume: the run in {out} used other settings ({', '.join(changed)}): "
                         f"{ {key: meta['protocol'].get(key) for key in changed} }")
    folds = pd.read_csv(csv_path)
    for column in ("error", "warnings"):  # empty strings, which read_csv turns into NaN
        folds[column] = folds[column].astype(object).where(folds[column].notna(), "")
    return folds, float(meta["wall_time_s"])


if __name__ == "__main__":
    main()
