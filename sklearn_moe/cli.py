"""The ``sklearn-moe`` command line: fit, predict, inspect and demo without writing Python.

::

    sklearn-moe fit DATA.csv --target COL [--task auto|regression|classification] [--cv 5] [--tune N_TRIALS]
                    [--ignore COL ...] [--seed 0] [--max-epochs N] [--param NAME=VALUE ...]
                    [--sep SEP] [--decimal MARK] [--thousands MARK] [--na-values TEXT ...]
                    [--encoding NAME] --out DIR
    sklearn-moe predict MODEL DATA.csv [--keep COL ...] [--sep ...] > predictions.csv
    sklearn-moe info MODEL
    sklearn-moe demo [--cv 3] [--max-epochs N] [--out DIR]

``fit`` reads the table as it is (categorical columns and missing values are encoded inside
the model), cross-validates the MoE against baselines (HistGradientBoosting, a linear model
and scikit-learn's MLP) on the same folds, prints the table, then fits on every row and
writes ``DIR/model.moe`` (the safe format), ``DIR/summary.json`` and, with matplotlib,
``DIR/training_curves.png`` and ``DIR/expert_utilization.png``. ``--param`` sets any
parameter of the MoE (``--param n_experts=4 --param expert_hidden=[64,64]``; see
:func:`parse_params`).

Exit status: 0 on success, 2 for a bad command line, 3 for bad input (a missing or
unreadable file, an unknown column, wrong types, an unreadable model file), 130 when
interrupted, 1 otherwise. Errors are one line on standard error.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__

__all__ = ["main"]  # the command line is the interface; the helpers serve it

EXIT_INPUT = 3
MODEL_FILE, SUMMARY_FILE = "model.moe", "summary.json"


class InputError(ValueError):
    """A problem with the user's input, reported as one line with exit status 3."""


#: Suffixes of files read as parquet; every other file is read as CSV (compressed too).
PARQUET_SUFFIXES = (".parquet", ".pq")
#: Formats this command line does not read, named in the error instead of a CSV parser's.
OTHER_FORMATS = (".json", ".jsonl", ".feather", ".arrow", ".xlsx", ".xls", ".ods", ".orc", ".h5", ".hdf5", ".pkl",
                 ".pickle", ".sav", ".dta", ".sas7bdat")


def read_table(path, csv_options: dict | None = None) -> pd.DataFrame:
    """A CSV or parquet file as a DataFrame.

    Where a CSV's rows have one field more than its header, the first field is a row label
    (R's ``write.csv``), which is dropped, unless every row's last field is empty: the rows
    then end in a separator (as some exporters write them), and keep their columns.
    ``csv_options`` are :func:`csv_options`' ``pandas.read_csv`` arguments.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix in OTHER_FORMATS:
        raise InputError(f"cannot read {path}: {suffix} files are not read here; give a CSV or parquet file")
    try:
        frame = pd.read_parquet(path) if suffix in PARQUET_SUFFIXES else _read_csv(path, csv_options or {})
    except UnicodeDecodeError as error:
        encoding = (csv_options or {}).get("encoding", "utf-8")
        raise InputError(f"cannot read {path} as {encoding} text (it holds the byte "
                         f"{error.object[error.start:error.end]!r}): give the file's encoding with --encoding, such "
                         "as latin-1 or cp1252 for many files written on Windows") from error
    except LookupError as error:  # an unknown --encoding
        raise InputError(f"cannot read {path}: {error}") from error
    except Exception as error:  # noqa: BLE001 - whatever the reader raises, it is the file
        raise InputError(f"cannot read {path}: {' '.join(str(error).split())}") from error
    if frame.empty:
        raise InputError(f"{path} has no rows")
    return frame


def _read_csv(path: Path, options: dict) -> pd.DataFrame:
    # Read with index_col=False, pandas drops a last field that is empty in every row (a
    # trailing separator), and warns of a longer row: the first field is then a label.
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(path, index_col=False, **options)
        except pd.errors.ParserWarning:
            pass
    return pd.read_csv(path, **options).reset_index(drop=True)


def csv_options(args) -> dict:
    """The ``pandas.read_csv`` arguments of the command line's ``--sep``, ``--decimal``,
    ``--thousands``, ``--na-values`` and ``--encoding``."""
    sep = getattr(args, "sep", None)
    options = {"sep": "\t" if sep == "\\t" else sep,  # as typed in a shell: backslash, t
               "decimal": getattr(args, "decimal", None), "thousands": getattr(args, "thousands", None),
               "encoding": getattr(args, "encoding", None)}
    options = {name: value for name, value in options.items() if value is not None}
    if getattr(args, "na_values", None):
        options["na_values"] = list(args.na_values)
    return options


def add_csv_options(parser: argparse.ArgumentParser) -> None:
    """The options of reading a CSV file: ``--sep``, ``--decimal``, ``--thousands``,
    ``--na-values``, ``--encoding``."""
    group = parser.add_argument_group("reading a CSV file")
    group.add_argument("--sep", help="field separator (default ','; ';' for many European files, '\\t' for TSV)")
    group.add_argument("--decimal", help="decimal mark of the numbers (default '.')")
    group.add_argument("--thousands", help="thousands separator of the numbers (default none)")
    group.add_argument("--na-values", nargs="+", metavar="TEXT",
                       help="text that marks a missing value, besides the empty field and pandas' own (NA, NaN, ...)")
    group.add_argument("--encoding", help="the file's text encoding (default utf-8; latin-1 or cp1252 for many files "
                                          "written on Windows)")


def infer_task(y: pd.Series) -> str:
    """``"classification"`` for a target of text, booleans or integers with at most 20
    distinct values; ``"regression"`` for any other (floats included)."""
    numeric = pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
    discrete = not numeric or pd.api.types.is_integer_dtype(y)
    return "classification" if discrete and y.nunique() <= 20 else "regression"


def _whole_number_floats(y: pd.Series) -> bool:
    """Whether ``y`` is a float column of at most 20 whole numbers (as a CSV's column of
    class codes reads where it has a missing value or was written as 0.0/1.0)."""
    if not pd.api.types.is_float_dtype(y) or y.nunique() > 20:
        return False
    values = y.dropna().to_numpy(dtype=np.float64)
    return bool(np.isfinite(values).all() and (values == np.round(values)).all())


def parse_params(pairs, option: str = "--param") -> dict:
    """``NAME=VALUE`` strings as estimator parameters.

    A VALUE is read as a Python literal where it is one (``16``, ``0.5``, ``None``,
    ``(64, 64)``, ``[64, 64]``, ``"cuda"``), else as JSON (``true``, ``null``), else as the
    text itself (``router=topk``); a list becomes a tuple.

    Parameters
    ----------
    pairs : list of str or None
        The option's arguments.
    option : str, default="--param"
        The option's name, for the error.

    Returns
    -------
    dict
        Parameter names and values.

    Raises
    ------
    InputError
        If an entry is not ``NAME=VALUE`` with NAME an identifier.
    """
    params = {}
    for pair in pairs or []:
        name, equals, text = pair.partition("=")
        if not equals or not name.isidentifier():
            raise InputError(f"{option} takes NAME=VALUE (e.g. n_experts=4); got {pair!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
        params[name] = tuple(value) if isinstance(value, list) else value
    return params


def split_target(frame: pd.DataFrame, target: str, task: str):
    """``(X, y, task)``; ``task="auto"``: :func:`infer_task`."""
    if target not in frame:
        raise InputError(f"unknown column {target!r}; the columns are {list(frame.columns)}")
    y = frame[target]
    if y.isna().any():
        rows = np.flatnonzero(y.isna().to_numpy())
        raise InputError(f"the target column {target!r} has {rows.size} missing value(s), in row(s) "
                         f"{_first_rows(rows)}; drop those rows or fill them in")
    if task != "classification":
        _check_numbers_as_text(y, target)
    X = frame.drop(columns=target)
    if X.shape[1] == 0:
        raise InputError(f"the table has no column besides the target {target!r} to predict it from")
    if task == "auto":
        task = infer_task(y)
        if _whole_number_floats(y):
            print(f"sklearn-moe: note: the target {target!r} holds {y.nunique()} distinct whole numbers as floats, "
                  "fitted as a regression; --task classification fits them as classes", file=sys.stderr)
    if task == "regression" and not pd.api.types.is_numeric_dtype(y):
        raise InputError(f"the target column {target!r} is not numeric; use --task classification")
    return X, y.to_numpy(), task


def training_data(path, target: str, task: str, options: dict, ignore=()):
    """``(X, y, task)`` of a training file: :func:`read_table`, without the ``ignore``
    columns, split by :func:`split_target`; a classification's labels as the file writes
    them (:func:`_labels_as_written`)."""
    X, y, task = split_target(without_columns(read_table(path, options), ignore, target), target, task)
    if task == "classification":
        y = _labels_as_written(Path(path), target, options, y)
    return X, y, task


def _labels_as_written(path: Path, target: str, options: dict, y: np.ndarray) -> np.ndarray:
    """The class labels ``y`` as pandas read them from a CSV where they render as the file
    writes them, else the file's own text: pandas reads ``"007"`` as 7, ``"01"`` and ``"1"``
    as one class, and ``"3.5"`` beside ``"1"`` as floats, which are no class labels."""
    if path.suffix.lower() in PARQUET_SUFFIXES or y.dtype.kind not in "biuf":
        return y  # a parquet file's types are its own; text labels are read as written
    written = _read_csv(path, {**options, "dtype": {target: str}})[target].str.strip().to_numpy(dtype=object)
    return y if (y.astype(str).astype(object) == written).all() else written


def _first_rows(rows) -> str:
    """Row positions as the table counts them (1 = the first row after the header), the
    first five at most."""
    shown = ", ".join(str(int(row) + 1) for row in rows[:5])
    return shown + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def _check_numbers_as_text(y: pd.Series, target: str) -> None:
    """Raise an :class:`InputError` for a text target of numbers but for a few rows (a
    placeholder such as ``"?"``), which would otherwise be fitted as classes."""
    from ._tabular import _NUMBERS_SHARE, _read_numbers, _with_separators

    if pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return
    numbers, separated = _read_numbers(pd.Series(y.to_numpy(dtype=object), dtype=object))
    unread = np.flatnonzero(numbers.isna().to_numpy())
    if unread.size > (1 - _NUMBERS_SHARE) * len(y):
        return
    if _with_separators(separated):
        raise InputError(f"the target column {target!r} holds numbers written with separators, such as "
                         f"{y[separated.to_numpy()].iloc[0]!r}: read them with --thousands ',' (or --decimal ',' "
                         "for a decimal comma)")
    if unread.size == 0:
        return
    raise InputError(f"the target column {target!r} holds numbers, but text in {unread.size} row(s), such as "
                     f"{y.iloc[unread[0]]!r} in row {unread[0] + 1}: give those rows a number or drop them "
                     f"(--na-values {y.iloc[unread[0]]!r} reads such text as missing), or use --task "
                     "classification to fit its values as classes")


def baselines(task: str, seed: int) -> dict:
    """Non-MoE models that take the same raw table (their own encoding in a pipeline; the
    MLP regressor's target standardised)."""
    from sklearn.compose import TransformedTargetRegressor, make_column_selector, make_column_transformer
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, OrdinalEncoder, StandardScaler

    def encoded(model, categories):
        numbers = make_pipeline(SimpleImputer(strategy="median"), StandardScaler())
        text = make_pipeline(SimpleImputer(strategy="most_frequent"), categories)
        columns = make_column_transformer((text, make_column_selector(dtype_exclude="number")),
                                          (numbers, make_column_selector(dtype_include="number")))
        return make_pipeline(FunctionTransformer(_with_numpy_dtypes, feature_names_out="one-to-one"), columns, model)

    ordinal = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=-1)
    one_hot = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    if task == "classification":
        return {"hist_gradient_boosting": encoded(HistGradientBoostingClassifier(random_state=seed), ordinal),
                "logistic_regression": encoded(LogisticRegression(max_iter=1000), one_hot),
                "mlp": encoded(MLPClassifier(max_iter=300, early_stopping=True, random_state=seed), one_hot)}
    return {"hist_gradient_boosting": encoded(HistGradientBoostingRegressor(random_state=seed), ordinal),
            "ridge": encoded(Ridge(), one_hot),
            # The MLP fits a standardised target, as the MoE does: on raw prices (targets far
            # from 0, in large units) it stops early far from any fit.
            "mlp": encoded(TransformedTargetRegressor(
                MLPRegressor(max_iter=300, early_stopping=True, random_state=seed), transformer=StandardScaler()),
                one_hot)}


def _with_numpy_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with pandas' nullable columns (``boolean``, ``Int64``, ``Float64``,
    ``string``, as parquet files give them) as NumPy's, ``pd.NA`` as NaN: scikit-learn's
    imputers and encoders fail on ``pd.NA`` ("boolean value of NA is ambiguous")."""
    nullable = [name for name, dtype in frame.dtypes.items() if isinstance(dtype, pd.api.extensions.ExtensionDtype)
                and not isinstance(dtype, (pd.CategoricalDtype, pd.DatetimeTZDtype))]
    if not nullable:
        return frame
    converted = {}
    for name in nullable:
        column = frame[name]
        if pd.api.types.is_numeric_dtype(column.dtype) or pd.api.types.is_bool_dtype(column.dtype):
            converted[name] = column.astype("float64")
        else:
            converted[name] = column.astype(object).where(column.notna(), np.nan)
    return frame.assign(**converted)


def cross_validate_models(models: dict, X, y, task: str, cv: int, seed: int) -> pd.DataFrame:
    """Every model's mean and standard deviation of the test score (R² or accuracy) and fit
    time over the same ``cv`` folds, with a progress line per fit on standard error.

    The first model's failure is an error; another (a baseline) that fails is left out of
    the table, with a note on standard error. Accuracy counts a test label that the fold's
    training rows lacked (a class rarer than the folds) as an error for every model.
    """
    from sklearn.base import clone
    from sklearn.metrics import get_scorer
    from sklearn.model_selection import KFold, StratifiedKFold

    from sklearn_moe._base import BaseMoE

    # The baselines learn the classes' codes, in the labels' sorted order (the same folds and
    # scores; scikit-learn < 1.8's MLPClassifier(early_stopping=True) fails on text labels);
    # the MoE learns the labels, which its class_weight names.
    codes = np.unique(y, return_inverse=True)[1] if task == "classification" else y
    splitter = (StratifiedKFold if task == "classification" else KFold)(cv, shuffle=True, random_state=seed)
    scorer = get_scorer("accuracy" if task == "classification" else "r2")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)  # scored as said above
        folds = list(splitter.split(X, codes))
    rows = []
    for position, (name, model) in enumerate(models.items()):
        targets = y if isinstance(model, BaseMoE) else codes
        scores, times = [], []
        try:
            for index, (train, test) in enumerate(folds, 1):
                _progress(f"cross-validating {name}: fold {index}/{cv}")
                fitted = clone(model)
                start = time.perf_counter()
                fitted.fit(X.iloc[train], targets[train])
                times.append(time.perf_counter() - start)
                scores.append(scorer(fitted, X.iloc[test], targets[test]))
        except Exception as error:
            _progress("")
            if position == 0:
                raise
            print(f"sklearn-moe: note: {name} left out of the comparison, it failed: "
                  f"{' '.join(str(error).split())[:300]}", file=sys.stderr)
            continue
        rows.append({"model": name, "score": float(np.mean(scores)), "score_std": float(np.std(scores)),
                     "fit_time_s": float(np.mean(times))})
    _progress("")
    return pd.DataFrame(rows).sort_values("score", ascending=False, ignore_index=True)


def new_estimator(task: str, args, **params):
    """The MoE estimator for ``task``, with the command line's ``--seed`` and
    ``--max-epochs``, its ``--param`` settings where it has them, and ``params``."""
    from sklearn_moe import MoEClassifier, MoERegressor
    from sklearn_moe._parameters import check_hyperparameters

    params = {"random_state": args.seed, **({"max_epochs": args.max_epochs} if args.max_epochs is not None else {}),
              **parse_params(getattr(args, "param", None)), **params}
    estimator = MoEClassifier if task == "classification" else MoERegressor
    unknown = sorted(set(params) - set(estimator().get_params()))
    if unknown:
        raise InputError(f"--param names no parameter of {estimator.__name__}: {', '.join(unknown)}")
    model = estimator(**params)
    check_hyperparameters(model)  # a bad value is an error now, not at the first fold's fit
    return model


def save_model(model, out: Path, args, task: str, X, y, **summary) -> None:
    """Write ``model`` and its summary (the data's description and ``summary``) to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / MODEL_FILE)
    summary = {"task": task, "target": args.target, "data": str(args.data), "n_rows": int(len(y)),
               "columns": [str(c) for c in X.columns], **summary}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def without_columns(frame: pd.DataFrame, ignore, target: str) -> pd.DataFrame:
    """``frame`` without the columns named in ``ignore`` (an id, say), each checked."""
    unknown = [name for name in ignore if name not in frame]
    if unknown:
        raise InputError(f"--ignore names unknown column(s) {unknown}; the columns are {list(frame.columns)}")
    if target in ignore:
        raise InputError(f"--ignore names the target {target!r}")
    return frame.drop(columns=list(ignore))


def fit_command(args) -> int:
    out = Path(args.out)
    check_output_directory(out)  # before the work, not after it
    X, y, task = training_data(args.data, args.target, args.task, csv_options(args), args.ignore)
    if args.cv > len(y):
        raise InputError(f"--cv must be at most the number of rows ({len(y)}); got {args.cv}")
    moe = new_estimator(task, args)
    with warnings.catch_warnings():
        _warn_of_text_columns(moe, X)
        if args.tune:
            moe = _tuned(moe, X, y, args)
        table = cross_validate_models({"moe": moe, **baselines(task, args.seed)}, X, y, task, args.cv, args.seed)
        metric = "accuracy" if task == "classification" else "R²"
        print(f"{args.cv}-fold cross-validation, {task} ({metric}, higher is better):")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        _progress("fitting the MoE on every row")
        moe.fit(X, y)
        _progress("")
    save_model(moe, out, args, task, X, y, cv=args.cv, metric=metric, ignored=list(args.ignore),
               cross_validation=table.to_dict(orient="records"))
    written = [MODEL_FILE, SUMMARY_FILE] + _plots(moe, out)
    if args.report_files:
        print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


def _warn_of_text_columns(moe, X: pd.DataFrame) -> None:
    """The estimator's warning of text columns of numbers (or dates), said once of the whole
    table, with the command line's options for numbers; the fits that follow, each on its
    own rows, keep it to themselves (call it in a ``warnings.catch_warnings()`` block)."""
    from ._tabular import TEXT_COLUMN_WARNING, categorical_mask, warn_of_text_columns

    if isinstance(moe.categorical_features, str):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warn_of_text_columns(X, categorical_mask(X, moe.categorical_features))
        for warning in caught:
            warnings.warn(warning.message, stacklevel=2)
        said = " ".join(str(warning.message) for warning in caught)
        if "values read as numbers" in said:
            print("sklearn-moe: note: on the command line, --na-values TEXT reads such text as a missing value, and "
                  "--decimal and --thousands read numbers written with those marks", file=sys.stderr)
        if "values read as dates" in said:
            print("sklearn-moe: note: the command line takes dates as they are; add numeric columns derived from "
                  "them (the year, the day of the week) to the file, or leave them out with --ignore",
                  file=sys.stderr)
    warnings.filterwarnings("ignore", message=f"Column .* {re.escape(TEXT_COLUMN_WARNING)}")


def check_output_directory(out: Path) -> None:
    """Raise an :class:`InputError` unless ``out`` is, or can be made, a writable directory."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory (new or existing)")
    existing = next(folder for folder in (out, *out.parents) if folder.exists())
    if not existing.is_dir():
        raise InputError(f"--out {out}: {existing} is a file, so the directory cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {existing} is not writable")


def _tuned(moe, X, y, args):
    try:
        from sklearn_moe.tuning import search_space, tune
    except ImportError as error:
        raise InputError(f"--tune needs Optuna: pip install 'sklearn-moe[tune]' ({error})") from error
    _progress(f"tuning: {args.tune} trials")
    fixed = parse_params(getattr(args, "param", None))  # set by --param: not searched
    space = {name: distribution for name, distribution in search_space(moe).items() if name not in fixed}
    result = tune(moe, X, y, n_trials=args.tune, cv=args.cv, random_state=args.seed, refit=False,
                  param_distributions=space)
    _progress("")
    print(f"tuning: best {args.cv}-fold score {result.best_score:.4f} with {result.best_params}")
    return moe.set_params(**result.best_params)


def _plots(model, out: Path) -> list[str]:
    try:
        import matplotlib.pyplot as plt

        from sklearn_moe.plotting import plot_expert_utilization, plot_training_curves
    except ImportError:
        print("matplotlib is not installed: no plots (pip install 'sklearn-moe[plot]')", file=sys.stderr)
        return []
    names = []
    for name, plot in (("training_curves.png", plot_training_curves), ("expert_utilization.png",
                                                                        plot_expert_utilization)):
        figure = plot(model).figure
        figure.savefig(out / name, dpi=100, bbox_inches="tight")
        plt.close(figure)  # main() may run many times in one process
        names.append(name)
    return names


def load_model(path):
    """The model and summary of a ``fit --out`` directory, or a model file saved from Python
    (``model.save(path)``) and no summary."""
    import sklearn_moe

    path = Path(path)
    model_file = path if path.is_file() else path / MODEL_FILE
    if not model_file.is_file():
        raise InputError(f"no model in {path}: expected {path / MODEL_FILE} (written by sklearn-moe fit) or a model "
                         "file (written by model.save)")
    try:
        model = sklearn_moe.load(model_file)
    except ValueError as error:
        raise InputError(f"unreadable model file {model_file}: {error}") from error
    if model_file == path:
        return model, {}
    summary_path = path / SUMMARY_FILE
    if not summary_path.is_file():
        return model, {}
    try:
        summary = json.loads(summary_path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"unreadable summary {summary_path}: {error}") from error
    missing = [key for key in ("task", "target", "n_rows") if not isinstance(summary, dict) or key not in summary]
    if missing:
        raise InputError(f"{summary_path} lacks {missing} (written by sklearn-moe fit; delete it to use the model "
                         "without it)")
    return model, summary


def predict_command(args) -> int:
    model, summary = load_model(args.model_dir)
    frame = read_table(args.data, csv_options(args))
    unknown = [name for name in args.keep if name not in frame]
    if unknown:
        raise InputError(f"--keep names unknown column(s) {unknown}; the columns are {list(frame.columns)}")
    X = frame.drop(columns=[summary["target"]]) if summary.get("target") in frame else frame
    missing = [name for name in getattr(model, "feature_names_in_", []) if name not in X]
    if missing:
        raise InputError(f"{args.data} lacks the model's column(s) {missing}; its columns are {list(frame.columns)}")
    if hasattr(model, "feature_names_in_"):
        used, ignored = set(model.feature_names_in_), set(summary.get("ignored", []))  # fit's --ignore: no note
        unused = [str(name) for name in X.columns if name not in used and name not in ignored]
        if unused:
            print(f"sklearn-moe: note: ignoring column(s) the model does not use: {unused}", file=sys.stderr)
        X = X[list(model.feature_names_in_)]
    else:  # fitted on an array: the table's columns are its columns, in fit's order
        if X.shape[1] != model.n_features_in_:
            raise InputError(f"{args.data} has {X.shape[1]} column(s) besides any target, but the model was fitted "
                             f"without column names on {model.n_features_in_}: give exactly those, in fit's order")
        X = X.set_axis(range(X.shape[1]), axis=1)  # positions, as an array's columns are named
    # Rows labelled as the file counts them (1: the first after the header), which the
    # estimator's errors name.
    X = X.set_axis(pd.RangeIndex(1, len(X) + 1))
    try:
        predicted = model.predict(X)
        if predicted.ndim == 1:
            predictions = pd.DataFrame({"prediction": predicted})
        else:  # a multilabel classifier's labels, a multi-output regressor's targets
            predictions = pd.DataFrame({f"prediction_{j}": predicted[:, j] for j in range(predicted.shape[1])})
        if hasattr(model, "predict_proba"):
            probabilities = model.predict_proba(X)
            for index, label in enumerate(model.classes_):
                predictions[f"probability_{label}"] = probabilities[:, index]
    except (ValueError, TypeError) as error:
        raise InputError(f"cannot predict on {args.data}: {' '.join(str(error).split())}") from error
    if args.keep:
        kept = frame[list(args.keep)].reset_index(drop=True)
        clashes = [name for name in kept.columns if name in predictions]
        if clashes:
            raise InputError(f"--keep column(s) {clashes} have the names of prediction columns; rename them")
        predictions = pd.concat([kept, predictions], axis=1)
    predictions.to_csv(sys.stdout, index=False)
    return 0


def info_command(args) -> int:
    model, summary = load_model(args.model_dir)
    print(f"{type(model).__name__}: {model.n_features_in_} input columns, {model.n_experts} experts, "
          f"router {model.router!r}, {model.n_iter_} epochs")
    if summary:
        best = summary["cross_validation"][0] if summary.get("cross_validation") else None
        moe = next((row for row in summary.get("cross_validation", []) if row["model"] == "moe"), None)
        print(f"target {summary['target']!r} ({summary['task']}), {summary['n_rows']} rows")
        if moe:
            print(f"{summary['cv']}-fold {summary['metric']}: MoE {moe['score']:.4f} ± {moe['score_std']:.4f}; "
                  f"best {best['model']} {best['score']:.4f}")
    last = model.history_.iloc[-1] if len(model.history_) else {}  # none after a fit interrupted at once
    print("routing: expert load " + " ".join(f"{share:.2f}" for share in model.expert_load_)
          + (f"; routing entropy {last['routing_entropy']:.3f}" if "routing_entropy" in last else ""))
    defaults = type(model)().get_params()
    changed = {name: value for name, value in model.get_params().items()
               if value != defaults[name] and name != "device"}  # load() chooses the device
    print("parameters (not at their defaults): " + (", ".join(f"{k}={v!r}" for k, v in changed.items()) or "none"))
    return 0


def demo_command(args) -> int:
    """Fit and cross-validate on scikit-learn's bundled diabetes data (no download)."""
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "diabetes.csv"
        frame.to_csv(data, index=False)
        out = Path(args.out) if args.out else Path(scratch) / "model"
        print(f"demo: {len(frame)} rows of scikit-learn's diabetes data, target 'target'")
        status = fit_command(argparse.Namespace(data=data, target="target", task="regression", cv=args.cv,
                                                tune=0, out=out, seed=0, max_epochs=args.max_epochs, ignore=[],
                                                report_files=bool(args.out)))
        if args.out:  # the summary names the data set, not the scratch file just deleted
            summary = json.loads((out / SUMMARY_FILE).read_text())
            (out / SUMMARY_FILE).write_text(json.dumps({**summary, "data": "sklearn.datasets.load_diabetes()"},
                                                       indent=2))
        else:
            print("(the model is not kept: demo --out DIR keeps it)")
    return status


def _progress(text: str) -> None:
    if sys.stderr.isatty():
        print(f"\r\033[K{text}", end="" if text else "", file=sys.stderr, flush=True)
    elif text:
        print(text, file=sys.stderr, flush=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a line on standard error, as the command's notes are."""
    print(f"sklearn-moe: warning: {' '.join(str(message).split())}", file=sys.stderr)


def int_at_least(minimum: int):
    """An argparse type: an int of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def add_param_option(parser: argparse.ArgumentParser, *aliases: str, note: str = "") -> None:
    """The repeatable ``--param NAME=VALUE`` option (:func:`parse_params`), also named
    ``aliases``; ``note`` ends its help."""
    parser.add_argument("--param", *aliases, dest="param", action="append", metavar="NAME=VALUE",
                        help="set a parameter of the MoE, e.g. n_experts=4 or expert_hidden=[64,64] (a Python "
                             f"literal, JSON, or else text such as router=topk); repeatable{note}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sklearn-moe", description=__doc__.split("\n\n")[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="cross-validate against baselines, then fit and save the model")
    fit.add_argument("data", help="CSV or parquet file")
    fit.add_argument("--target", required=True, help="the column to predict")
    fit.add_argument("--task", choices=("auto", "regression", "classification"), default="auto",
                     help="auto (default): a text, boolean or integer target with at most 20 values is a "
                          "classification, any other a regression")
    fit.add_argument("--cv", type=int_at_least(2), default=5, help="cross-validation folds (default 5)")
    fit.add_argument("--tune", type=int_at_least(0), default=0, metavar="N_TRIALS", help="tune with Optuna first")
    fit.add_argument("--out", required=True, help="directory for the model, its summary and plots")
    fit.add_argument("--ignore", nargs="+", default=[], metavar="COLUMN",
                     help="columns not to learn from (an id, say); predict ignores them too")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--max-epochs", type=int_at_least(1), help="override the MoE's max_epochs")
    add_param_option(fit)
    add_csv_options(fit)
    fit.set_defaults(report_files=True)
    model_help = "directory written by sklearn-moe fit, or a model file written by model.save"
    predict = commands.add_parser("predict", help="predict a table's rows with a fitted model (CSV to stdout)")
    predict.add_argument("model_dir", metavar="MODEL", help=model_help)
    predict.add_argument("data", help="CSV or parquet file")
    predict.add_argument("--keep", nargs="+", default=[], metavar="COLUMN",
                         help="columns of the table (an id, say) to write before the predictions")
    add_csv_options(predict)
    info = commands.add_parser("info", help="a fitted model's parameters, score and routing")
    info.add_argument("model_dir", metavar="MODEL", help=model_help)
    demo = commands.add_parser("demo", help="fit and cross-validate on bundled data (scikit-learn's diabetes)")
    demo.add_argument("--cv", type=int_at_least(2), default=3, help="cross-validation folds (default 3)")
    demo.add_argument("--out", help="keep the model in this directory (else it is not kept)")
    demo.add_argument("--max-epochs", type=int_at_least(1), help="override the MoE's max_epochs")
    return parser


COMMANDS = {"fit": fit_command, "predict": predict_command, "info": info_command, "demo": demo_command}


def main(argv=None) -> int:
    """Run the ``sklearn-moe`` command line.

    Parameters
    ----------
    argv : list of str, optional
        The arguments after the program name (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status: 0 on success, 3 for bad input, 130 when interrupted, 1 otherwise
        (argparse exits with 2 for a bad command line).
    """
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not sys.warnoptions:  # python -W decides where given
                # Each warning once (not once per fold), as one line of the command's own;
                # those Python hides by default stay hidden.
                warnings.simplefilter("once")
                for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                    warnings.simplefilter("ignore", hidden)
                warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except InputError as error:
        print(f"sklearn-moe: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except (ValueError, TypeError) as error:  # the estimators' input errors (wrong types, bad values)
        print(f"sklearn-moe: error: {' '.join(str(error).split())}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("sklearn-moe: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader closed the pipe (e.g. `| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
