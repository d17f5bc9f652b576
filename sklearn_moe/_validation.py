"""Input validation of the estimators: scikit-learn's, with errors that say what to do."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pandas.api.types import (
    is_bool_dtype,
    is_complex_dtype,
    is_datetime64_any_dtype,
    is_numeric_dtype,
    is_timedelta64_dtype,
)
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.multiclass import type_of_target
from sklearn.utils.validation import _check_sample_weight, validate_data

from ._warnings import warn_at_caller

# Weights below this fraction of the largest vanish in float32 training: they count as 0.
NEGLIGIBLE_WEIGHT = 1e-30

# Sparse X (e.g. one-hot output of a ColumnTransformer) is densified up to this many cells
# (2 GiB as float64); beyond it densifying would exhaust memory, so it is an error.
_MAX_DENSE_CELLS = 2**28


def densify(X, warn: bool):
    """``X`` as a dense array if it is sparse (a ``ValueError`` if that is too large), with a
    ``DataConversionWarning`` if ``warn``, said of the line that called ``fit``."""
    if not sp.issparse(X):
        return X
    n_cells = X.shape[0] * X.shape[1]
    if n_cells > _MAX_DENSE_CELLS:
        raise ValueError(
            f"Sparse X of shape {X.shape} is too large to densify ({n_cells} cells > "
            f"{_MAX_DENSE_CELLS}). Reduce the number of one-hot columns (e.g. "
            "OneHotEncoder(max_categories=...) or min_frequency) or use fewer rows."
        )
    if warn:
        warn_at_caller(
            f"X is a sparse matrix; the experts need dense input, so X was densified "
            f"({X.shape[0]} x {X.shape[1]}, {n_cells * X.dtype.itemsize / 2**20:.1f} MiB as {X.dtype}). Pass dense "
            "input to silence this, e.g. OneHotEncoder(sparse_output=False) or ColumnTransformer(sparse_threshold=0).",
            DataConversionWarning,
        )
    return X.toarray()


def _columns_where(X, test) -> list:
    """Names (DataFrame) or indices of the columns of X with a value where ``test`` (``np.isnan``
    or ``np.isinf``) holds."""
    try:
        if sp.issparse(X):
            coo = sp.coo_matrix(X)
            return np.unique(coo.col[test(coo.data.astype(np.float64))]).tolist()
        values = X.to_numpy(dtype=np.float64, na_value=np.nan) if isinstance(X, pd.DataFrame) else X
        bad = test(np.asarray(values, dtype=np.float64)).any(axis=0)
    except (TypeError, ValueError):
        return []
    names = X.columns if isinstance(X, pd.DataFrame) else np.arange(bad.shape[0])
    return [name.item() if hasattr(name, "item") else name for name in names[bad]]


def validate_input(estimator, X, y="no_validation", reset=False, **kwargs):
    """``validate_data`` as float64 (sparse input densified), with errors that name the
    non-numeric or non-finite columns and say how to fix them."""
    if isinstance(X, pd.DataFrame) and X.shape[1] == 0:  # scikit-learn's own error would not say
        raise ValueError(f"Found a DataFrame with 0 feature(s) (shape={X.shape}) while a minimum of 1 is required "
                         f"by {type(estimator).__name__}.")
    X = _missing_as_nan(X)
    if isinstance(X, pd.DataFrame):
        check_column_kinds(X, range(X.shape[1]))
    else:
        _check_array_kinds(X)
    try:
        validated = validate_data(
            estimator, X, y, reset=reset, dtype=np.float64, accept_sparse=("csr", "csc", "coo"), **kwargs
        )
    except (TypeError, ValueError) as error:
        # A failed conversion to float: text in a column (or a pandas dtype scikit-learn does
        # not convert when another column holds text), named with what it holds.
        if str(error).startswith("Complex data not supported"):  # whose message prints the whole array
            raise ValueError(_complex_message([], "X" if _is_complex(X) else "y")) from error
        table = _table(X)
        columns = non_numeric_columns(table)
        if kwargs.get("y_numeric") and not columns and _first_text(y) is not None:
            raise non_numeric_target_error(type(estimator).__name__, y) from error
        if columns or (isinstance(error, ValueError) and "convert" in str(error) and "float" in str(error)):
            raise non_numeric_error(table, columns, error, fitted=not reset,
                                    array=not isinstance(X, pd.DataFrame)) from error
        if isinstance(error, ValueError) and str(error).startswith("Input X contains"):
            nan_is_missing = getattr(estimator, "handle_missing", None) == "native"
            raise _non_finite_error(type(estimator).__name__, error, X, nan_is_missing) from error
        raise
    if isinstance(validated, tuple):
        return (densify(validated[0], warn=reset), *validated[1:])
    return densify(validated, warn=reset)


def _missing_as_nan(X):
    """An object ndarray, or a DataFrame's object columns, with their ``pd.NA`` (which
    ``float()`` refuses) as NaN, as fit reads them; any other ``X`` as it is."""
    if isinstance(X, pd.DataFrame):
        objects = [position for position, dtype in enumerate(X.dtypes) if dtype == np.dtype(object)]
        missing = [position for position in objects if X.iloc[:, position].isna().any()]
        if not missing:
            return X
        X = X.copy()
        for position in missing:
            column = X.iloc[:, position]
            X.isetitem(position, column.where(column.notna(), np.nan))
        return X
    if not (isinstance(X, np.ndarray) and X.dtype == object):
        return X
    missing = pd.isna(X)
    if not missing.any():
        return X
    X = X.copy()
    X[missing] = np.nan
    return X


def _table(X) -> pd.DataFrame | None:
    """``X`` as a DataFrame to name its columns in an error (a 2-d array's are its indices);
    None for sparse or other input."""
    if isinstance(X, pd.DataFrame):
        return X
    if sp.issparse(X) or not hasattr(X, "__len__"):
        return None
    values = np.asarray(X, dtype=object)
    return pd.DataFrame(values) if values.ndim == 2 else None


def non_numeric_columns(frame: pd.DataFrame | None) -> list[int]:
    """The columns of ``frame`` that hold something other than numbers and missing values:
    those of pandas' ``string`` dtype, and object or category columns with a value that is
    not a number.

    Parameters
    ----------
    frame : DataFrame or None
        The table (None: no columns).

    Returns
    -------
    list of int
        Their positions, in column order.
    """
    if frame is None:
        return []
    found = []
    for position in range(frame.shape[1]):
        column = frame.iloc[:, position]
        if is_bool_dtype(column.dtype) or (is_numeric_dtype(column.dtype)
                                            and not isinstance(column.dtype, pd.CategoricalDtype)):
            continue
        if isinstance(column.dtype, pd.StringDtype) or _first_text(column) is not None:
            found.append(position)
    return found


def non_numeric_error(frame: pd.DataFrame | None, columns: list[int], error: Exception,
                      fitted: bool = False, array: bool = False) -> ValueError | TypeError:
    """The error for a table whose ``columns`` hold text but are not encoded as categories:
    what they hold (the first one's first value that is not a number, or ``error``'s
    message) and the two ways to fix it. A TypeError (a value that is neither text nor a
    number, such as a dict, as scikit-learn reports it) stays one, its message kept at the
    end.

    Parameters
    ----------
    frame : DataFrame or None
        The table.
    columns : list of int
        The positions of its columns at fault (:func:`non_numeric_columns`); may be empty.
    error : Exception
        The conversion's own error.
    fitted : bool, default=False
        Whether the table is a fitted model's input (to predict, or to go on training),
        whose columns were numeric in fit: then the fix is in the values (or a new fit).
    array : bool, default=False
        Whether ``frame`` holds the columns of a 2-d array ``X`` (the fix then takes
        ``X[:, j]``, not ``X[name]``).

    Returns
    -------
    ValueError or TypeError
    """
    names = [_plain(frame.columns[position]) for position in columns]
    if fitted and columns:
        return _text_in_fitted_numbers_error(frame, columns, names, error, array)
    named = _shown(names)
    holds = str(error).splitlines()[0] if str(error) else type(error).__name__
    if columns:
        column = frame.iloc[:, columns[0]]
        text, present = _first_text(column), column.dropna()
        if text is not None:
            what = f"holds {text!r}"
        elif len(present):  # text that reads as numbers, such as '1'
            what = (f"holds {present.iloc[0]!r} as text (dtype {column.dtype}): pd.to_numeric makes such a "
                    "column numeric")
        else:
            what = f"is of dtype {column.dtype} with no value"
        holds = f"{names[0]!r} {what}"
    kind = TypeError if isinstance(error, TypeError) else ValueError
    return kind(
        f"Column(s) {named or '(unknown)'} of X are neither numeric nor marked categorical ({holds}). Mark them "
        "in categorical_features (the default 'from_dtype' takes a DataFrame's category, object, string and bool "
        "columns that hold more than numbers; an array's columns have no dtypes, so name them by position"
        + (f", e.g. categorical_features=[{columns[0]}]" if columns and not isinstance(names[0], str) else "")
        + "), or encode them first, e.g. with a OneHotEncoder in a sklearn.compose.ColumnTransformer."
        + (f" ({error})" if kind is TypeError else "")
    )


def _text_in_fitted_numbers_error(frame: pd.DataFrame, columns: list[int], names: list, error: Exception,
                                  array: bool) -> ValueError | TypeError:
    """:func:`non_numeric_error` for a fitted model's input: the columns were numbers in fit."""
    found = _first_text_at(frame.iloc[:, columns[0]])
    where = "" if found is None else f": {names[0]!r} holds {found[1]!r} in row {_plain(found[0])!r}"
    column = f"X[:, {names[0]}]" if array else f"X[{names[0]!r}]"
    kind = TypeError if isinstance(error, TypeError) else ValueError
    return kind(
        f"Column(s) {_shown(names)} of X held numbers in fit and now hold text{where}. The fitted model reads them "
        f"as numbers: convert them first (pd.to_numeric({column}, errors='coerce') turns what is not a "
        "number into missing values, which the model takes as handle_missing says), or fit again with them among "
        "categorical_features." + (f" ({error})" if kind is TypeError else "")
    )


# What pandas' infer_dtype calls an object column of dates, times of day or durations
# (``datetime.date``, ``datetime.time``, ``Timestamp``, ``timedelta`` values, as
# ``pd.read_sql`` gives SQL DATE and TIME columns).
TEMPORAL_KINDS = frozenset({"date", "datetime", "datetime64", "time", "timedelta", "timedelta64", "period"})


def is_date_or_duration(dtype) -> bool:
    """Whether a column of ``dtype`` holds dates (``datetime64``, with or without a time
    zone, or periods), durations (``timedelta64``) or, in pyarrow's types, any of these or
    times of day."""
    if isinstance(dtype, pd.ArrowDtype):
        import pyarrow  # present wherever an ArrowDtype is

        return pyarrow.types.is_temporal(dtype.pyarrow_dtype)
    return is_datetime64_any_dtype(dtype) or is_timedelta64_dtype(dtype) or isinstance(dtype, pd.PeriodDtype)


def _temporal_kind(column: pd.Series) -> str | None:
    """How an error names the dates, times or durations ``column`` holds (its dtype, or
    the kind of its objects); None if it holds none."""
    if column.dtype == np.dtype(object):
        kind = pd.api.types.infer_dtype(column, skipna=True)
        return f"{kind} objects" if kind in TEMPORAL_KINDS else None
    return str(column.dtype) if is_date_or_duration(column.dtype) else None


def check_column_kinds(frame: pd.DataFrame, columns, array: bool = False) -> None:
    """Raise an error if one of ``columns`` (positions) of ``frame``, read as numbers,
    holds dates, times or durations (:func:`date_columns_error`, a ``TypeError``) or complex
    numbers, whose imaginary part a conversion to float would drop (a ``ValueError``).
    ``array``: ``frame`` holds the columns of a 2-d array, which the message names so."""
    columns = list(columns)
    dtypes = frame.dtypes.iloc[columns]
    kinds = {position: _temporal_kind(frame.iloc[:, position]) for position, dtype in zip(columns, dtypes)
             if dtype == np.dtype(object) or is_date_or_duration(dtype)}
    dates = [position for position, kind in kinds.items() if kind is not None]
    if dates:
        raise date_columns_error(frame, dates, kinds[dates[0]], array)
    complex_ = [_plain(frame.columns[position]) for position, dtype in zip(columns, dtypes)
                if is_complex_dtype(dtype)]
    if complex_:
        raise ValueError(_complex_message(complex_))


def _check_array_kinds(X) -> None:
    """:func:`check_column_kinds` for a 2-d array, an array-like or nested lists: a
    ``datetime64`` or ``timedelta64`` array, and dates, times or durations in an ``object``
    array, which a conversion to float would take as counts of their unit (or refuse with
    no word of dates)."""
    if not (isinstance(X, (list, tuple)) or hasattr(X, "__array__")) or hasattr(X, "toarray"):  # sparse: numbers
        return
    try:
        values = np.asarray(X)
    except (TypeError, ValueError):  # ragged lists, say: the conversion's own error follows
        return
    if values.ndim != 2:
        return
    if values.dtype.kind in "mM":
        raise date_columns_error(pd.DataFrame(index=[], columns=range(values.shape[1])),
                                 list(range(values.shape[1])), str(values.dtype), array=True)
    if values.dtype == np.dtype(object):
        check_column_kinds(pd.DataFrame(values), range(values.shape[1]), array=True)


def _complex_message(columns: list, name: str = "X") -> str:
    where = f"Column(s) {_shown(columns)} of X hold" if columns else f"{name} holds"
    return (f"Complex data not supported: {where} complex numbers. Pass their real and imaginary parts (np.real, "
            "np.imag), or modulus and angle, as columns of their own.")


def _is_complex(values) -> bool:
    if isinstance(values, pd.DataFrame):
        return any(is_complex_dtype(dtype) for dtype in values.dtypes)
    try:
        return np.iscomplexobj(values)
    except (TypeError, ValueError):
        return False


def as_pandas(X):
    """A dataframe of another library (polars, pyarrow, ...) as a pandas DataFrame, so that
    its column names and kinds (text, categories, bools, dates) count as a pandas
    DataFrame's do; anything else as it is."""
    if isinstance(X, pd.DataFrame):
        return X
    kind = f"{type(X).__module__}.{type(X).__name__}"
    if hasattr(X, "collect") and hasattr(X, "columns") and not hasattr(X, "to_pandas"):
        raise TypeError(f"X is a lazy {kind}: pass X.collect(), the table it computes.")
    if not (hasattr(X, "to_pandas") and hasattr(X, "columns")):
        return X
    try:
        table = X.to_pandas()
    except ImportError as error:  # polars converts through pyarrow
        raise ImportError(f"Reading X, a {kind}, as a pandas DataFrame needs {error.name or 'pyarrow'} (pip "
                          f"install {error.name or 'pyarrow'}); or pass X.to_pandas().") from error
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"X, a {kind}, gave a {type(table).__name__} from to_pandas(), not a DataFrame; pass a "
                        "table (a DataFrame or a 2-d array).")
    return table


def date_columns_error(frame: pd.DataFrame, columns: list[int], kind: str, array: bool = False) -> TypeError:
    """The error for a table whose ``columns`` hold dates, times or durations that are not
    marked categorical: neither reading them as nanosecond counts nor as one category per
    timestamp (where every later date would be unseen) is what a user means, so they
    choose.

    Parameters
    ----------
    frame : DataFrame
        The table.
    columns : list of int
        The positions of the date and duration columns at fault; not empty.
    kind : str
        What the first of them holds, as the message shows it (its dtype, say).
    array : bool, default=False
        Whether ``frame`` holds the columns of a 2-d array ``X`` (its examples then take
        ``pd.Series(X[:, j])``, not ``X[name]``).

    Returns
    -------
    TypeError
    """
    names = [_plain(frame.columns[position]) for position in columns]
    column = f"pd.Series(X[:, {names[0]}])" if array else f"X[{names[0]!r}]"
    return TypeError(
        f"Column(s) {_shown(names)} of X hold dates, times or durations ({kind}), which the MoE reads neither as "
        "numbers nor as categories on its own. Derive numeric columns from them, e.g. "
        f"{column}.dt.year or .dt.dayofweek of a date, .dt.total_seconds() of a duration, or the hour "
        "of a time of day (Python objects first through pd.to_datetime or pd.to_timedelta; times of day "
        "through .map(lambda t: t.hour)); or name them in categorical_features to treat every distinct value "
        "as a category (values not seen in fit then count as unknown)."
    )


def target_shape(y) -> tuple | None:
    """The shape of the target ``y``, read without numpy's array functions (scikit-learn's
    checks pass objects that refuse them); None where ``y`` has none."""
    shape = getattr(y, "shape", None)
    if shape is None:
        try:
            shape = np.asarray(y, dtype=object).shape
        except (TypeError, ValueError):
            return None
    return tuple(shape)


def check_one_label_per_row(name: str, y) -> None:
    """Raise a ``ValueError`` if ``y`` is neither one label per row nor a multilabel
    indicator matrix (a multi-output target of other labels, or more than 2 dimensions),
    saying how to fit such a target.

    A column vector (shape ``(n_samples, 1)``) passes: the classifier ravels it with a
    ``DataConversionWarning``. A 2-d ``y`` of several columns passes when it holds only 0
    and 1 (scikit-learn's ``"multilabel-indicator"``).

    Parameters
    ----------
    name : str
        The classifier's class name.
    y : array-like
        The labels.
    """
    shape = target_shape(y)
    if shape is None:  # scikit-learn's validation says what is wrong
        return
    if len(shape) == 2 and shape[1] != 1:
        try:
            kind = type_of_target(y)
        except ValueError:  # scikit-learn's validation says what is wrong
            return
        if kind == "multilabel-indicator":
            return
        detail = f"a 2-d y must be a multilabel indicator matrix of 0 and 1, but this one is {kind!r}"
    elif len(shape) > 2:
        detail = "y must have 1 or 2 dimensions"
    else:
        return
    raise ValueError(
        f"{name} predicts one label per row (y of shape (n_samples,)) or several binary labels per row (y a "
        f"multilabel indicator matrix of 0 and 1, of shape (n_samples, n_labels)); got y of shape {shape}: {detail}. "
        f"For several multiclass labels per row (multi-output classification), fit one model per label: "
        f"sklearn.multioutput.MultiOutputClassifier({name}()), or ClassifierChain to let each label's model see "
        "the labels before it."
    )


def non_numeric_target_error(name: str, y) -> ValueError:
    """The error for a regressor's target ``y`` that holds something other than numbers.

    Parameters
    ----------
    name : str
        The estimator's class name.
    y : array-like
        The target.

    Returns
    -------
    ValueError
    """
    return ValueError(f"{name} needs a numeric target y, but y holds {_first_text(y)!r}; a regressor predicts "
                      "numbers (for class labels, use MoEClassifier).")


def _first_text(y):
    """The first value of ``y`` (a target, or a table's column) that is neither a number nor
    missing; None if there is none (or ``y`` is not given)."""
    if isinstance(y, str) and y == "no_validation":
        return None
    found = _first_text_at(pd.Series(np.asarray(y, dtype=object).ravel()))
    return None if found is None else found[1]


def _first_text_at(column: pd.Series):
    """``(row label, value)`` of the first value of ``column`` that is neither a number nor
    missing, nor text that float() reads (``"NaN"``, ``"inf"``); None if there is none."""
    values = column.astype(object).dropna()
    for label, value in values[pd.to_numeric(values, errors="coerce").isna()].items():
        try:
            float(value)
        except (TypeError, ValueError):
            return label, value
    return None


def _plain(name):
    return name.item() if hasattr(name, "item") else name


def relative_sample_weight(sample_weight, X) -> np.ndarray:
    """Checked non-negative weights divided by the largest, negligible ones set to 0.

    Only relative weights matter; this keeps sums and means of tiny (subnormal) or huge
    weights from underflowing or overflowing.
    """
    if sample_weight is not None and _is_complex(sample_weight):  # scikit-learn's message prints the array
        raise ValueError("Complex data not supported: sample_weight holds complex numbers; weights are real and "
                         "non-negative.")
    sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
    if not sample_weight.max() > 0:
        raise ValueError("sample_weight must contain at least one positive weight.")
    sample_weight = sample_weight / sample_weight.max()
    sample_weight[sample_weight < NEGLIGIBLE_WEIGHT] = 0.0
    return sample_weight


def _non_finite_error(name: str, error: ValueError, X, nan_is_missing: bool) -> ValueError:
    """The error for NaN (where it is not a missing value, ``handle_missing="error"``) or
    infinity in ``X``, naming the columns and saying what to do about each."""
    infinite = _columns_where(X, np.isinf)
    missing = [] if nan_is_missing else _columns_where(X, np.isnan)
    parts = []
    if missing:
        parts.append(f"Input X contains NaN in column(s) {_shown(missing)}: set handle_missing='native' to encode "
                     "missing values, or impute them first (e.g. sklearn.impute.SimpleImputer in a Pipeline) or "
                     "drop those rows.")
    if infinite:
        parts.append(infinity_message(infinite, nan_is_missing))
    if not parts:
        parts.append(f"{str(error).splitlines()[0]} {name} needs finite numbers, and NaN only as a missing value "
                     "(handle_missing='native'): impute or drop the rows with NaN or infinity.")
    return ValueError(" ".join(parts))


def infinity_message(columns: list, nan_is_missing: bool = True) -> str:
    """What to say of infinite values in ``columns`` of X (names or indices)."""
    instead = "a finite value or NaN (a missing value)" if nan_is_missing else "a finite value"
    return f"Input X contains infinity in column(s) {_shown(columns)}; replace it with {instead}."


def _shown(columns: list) -> str:
    return ", ".join(repr(c) for c in columns[:10]) + (", ..." if len(columns) > 10 else "")
