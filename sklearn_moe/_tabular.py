"""Raw tables in ``fit`` and ``predict``: categorical columns and missing values, encoded
inside the estimator.

A categorical column with at most ``one_hot_max_categories`` categories seen in fit becomes
one indicator per category plus one for a missing value (a category of its own); a category
unseen in fit sets none of them. A column with more categories becomes one integer code,
which the network replaces by a learned vector (:class:`~sklearn_moe.nn.CategoricalEmbedding`):
code 0 is reserved for a category unseen in fit, ``1..K`` are the categories seen, ``K + 1``
a missing value. An indicator constant in fit is ignored at prediction (its scale is
infinite), and a code no training row holds gets the unseen category's zeros
(``_training.zero_untrained_categories``), so that a missing value where fit had none
reads as an unseen category. A numeric column with missing values in fit gets an indicator
column beside it, and its missing values the column's median in fit.

The encoded matrix is, in order: the numeric columns, their missing-value indicators, the
one-hot columns' indicators, then the embedded columns' codes. The codes are the last
columns so that scaling and the numeric embedding leave them alone. The encoding's fitted
state is plain arrays (the estimator's ``_table_*`` attributes), so that
:mod:`sklearn_moe.persistence` stores it as it stores the scaling.
"""

from __future__ import annotations

import copy
import re
from numbers import Number

import numpy as np
import pandas as pd
from pandas.api.types import is_bool_dtype, is_numeric_dtype

from ._validation import (
    TEMPORAL_KINDS,
    check_column_kinds,
    densify,
    infinity_message,
    is_date_or_duration,
    non_numeric_columns,
    non_numeric_error,
)
from ._warnings import warn_at_caller

#: Most categories a one-hot encoded column may have (each is an input column of the experts).
MAX_ONE_HOT_CATEGORIES = 256
#: Most categories an embedded column may have (each is a row of the embedding table).
MAX_EMBEDDED_CATEGORIES = 1_000_000
HANDLE_MISSING = ("native", "error")
TABLE_STATE = ("_table_categorical", "_table_categories", "_table_offsets", "_table_embedded", "_table_missing",
               "_table_fill")
#: The hyperparameters that choose the encoding, which a continued fit cannot change.
ENCODING_PARAMETERS = ("categorical_features", "one_hot_max_categories")


def empty_state() -> dict:
    """The state of a model fitted without encoding (numeric input, nothing missing)."""
    ints = np.zeros(0, dtype=np.int64)
    return {"_table_categorical": ints, "_table_categories": np.zeros(0, dtype=str),
            "_table_offsets": np.zeros(1, dtype=np.int64), "_table_embedded": ints, "_table_missing": ints,
            "_table_fill": np.zeros(0, dtype=np.float64)}


def embedded_positions(state) -> np.ndarray:
    """Positions, within ``_table_categorical``, of the columns with a learned embedding
    (none for a model pickled before embeddings existed)."""
    embedded = getattr(state, "_table_embedded", None)
    return np.zeros(0, dtype=np.int64) if embedded is None else embedded


def n_code_columns(state) -> int:
    """Number of embedded columns: the encoded matrix's last columns, holding codes."""
    return int(embedded_positions(state).size)


def category_cardinalities(state) -> list[int]:
    """Codes per embedded column: its categories seen in fit, plus the reserved code 0 and
    the code of a missing value (see the module docstring)."""
    positions = embedded_positions(state)
    if not positions.size:
        return []
    counts = np.diff(state._table_offsets)
    return [int(counts[position]) + 2 for position in positions]


def is_encoded(estimator) -> bool:
    """Whether ``estimator`` was fitted with a categorical or missing-value encoding."""
    categorical = getattr(estimator, "_table_categorical", None)  # None: pickled by an older version
    return categorical is not None and bool(categorical.size or estimator._table_missing.size)


def encoded_names(estimator) -> list[str]:
    """A name for every column of the encoded matrix of a fitted ``estimator``, in its order:
    the numeric columns' names, ``"b (missing)"`` for a missing-value indicator,
    ``"city=x"`` and ``"city (missing)"`` for a one-hot column's indicators, ``"city"`` for an
    embedded column's codes. The raw names are ``feature_names_in_``, or ``x0, x1, ...``."""
    raw = getattr(estimator, "feature_names_in_", None)
    raw = [str(name) for name in raw] if raw is not None else [f"x{j}" for j in range(estimator.n_features_in_)]
    if not is_encoded(estimator):
        return raw
    categorical = estimator._table_categorical
    is_categorical = set(categorical.tolist())
    numeric = [name for j, name in enumerate(raw) if j not in is_categorical]
    names = numeric + [f"{numeric[j]} (missing)" for j in estimator._table_missing]
    offsets, embedded = estimator._table_offsets, set(embedded_positions(estimator).tolist())
    for position, column in enumerate(categorical):
        if position not in embedded:
            names += [f"{raw[column]}={category}" for category in
                      estimator._table_categories[offsets[position]:offsets[position + 1]]]
            names.append(f"{raw[column]} (missing)")
    return names + [raw[categorical[position]] for position in sorted(embedded)]


def categorical_mask(X, categorical_features) -> np.ndarray:
    """Which columns of ``X`` are categorical (bool array of length ``n_features``).

    ``"from_dtype"``: a DataFrame's columns of pandas ``category``, ``string`` and ``bool``
    dtypes and its ``object`` columns but those of numbers not all whole (none for an array);
    ``None``: none; else a boolean mask, column indices or (for a DataFrame) column names.
    The other columns are read as numbers, where dates, durations and complex numbers are
    an error (``check_column_kinds``).
    """
    n_features = _shape(X)[1]
    if categorical_features is None:
        return np.zeros(n_features, dtype=bool)
    if isinstance(categorical_features, str):
        if categorical_features != "from_dtype":
            raise ValueError(f"categorical_features must be 'from_dtype', None, a boolean mask, column indices or "
                             f"column names; got {categorical_features!r}.")
        if not isinstance(X, pd.DataFrame):
            return np.zeros(n_features, dtype=bool)
        return np.array([_is_categorical_kind(X.iloc[:, position]) if dtype == np.dtype(object)
                         else _is_categorical_dtype(dtype) for position, dtype in enumerate(X.dtypes)], dtype=bool)
    if isinstance(categorical_features, (list, tuple)):
        kinds = {isinstance(item, str) for item in categorical_features}
        if len(kinds) > 1:
            raise ValueError("categorical_features mixes column names and column indices; give one or the other: "
                             f"{list(categorical_features)!r}.")
    given = np.asarray(categorical_features)
    if given.size == 0 and given.ndim == 1:  # an empty list: no categorical column
        return np.zeros(n_features, dtype=bool)
    if given.dtype == bool:
        if given.shape != (n_features,):
            raise ValueError(f"categorical_features as a boolean mask needs {n_features} entries (one per column); "
                             f"got {given.shape[0] if given.ndim == 1 else given.shape}.")
        return given.copy()
    mask = np.zeros(n_features, dtype=bool)
    if given.dtype.kind in "iu":
        if given.size and not ((given >= -n_features) & (given < n_features)).all():
            raise ValueError(f"categorical_features has column indices outside [0, {n_features}): "
                             f"{given[(given < -n_features) | (given >= n_features)].tolist()}.")
        mask[given] = True
        return mask
    if given.dtype.kind in "UO":
        columns = list(X.columns) if isinstance(X, pd.DataFrame) else []
        unknown = [name for name in given.tolist() if name not in columns]
        if unknown:
            raise ValueError(f"categorical_features names columns that X does not have: {unknown}"
                             + ("" if columns else " (X has no column names: pass a DataFrame, or column indices)")
                             + ".")
        mask[[columns.index(name) for name in given.tolist()]] = True
        return mask
    raise ValueError(f"categorical_features must be 'from_dtype', None, a boolean mask, column indices or column "
                     f"names; got {categorical_features!r}.")


def _is_categorical_dtype(dtype) -> bool:
    """Whether ``"from_dtype"`` takes a column of ``dtype`` (not ``object``) as categorical: a
    bool, category or string column."""
    return is_bool_dtype(dtype) or not (is_numeric_dtype(dtype) or is_date_or_duration(dtype))


def _is_categorical_kind(column: pd.Series) -> bool:
    """Whether ``"from_dtype"`` takes the ``object`` column ``column`` as categorical: yes,
    unless it holds real numbers other than whole numbers only, such as floats or the
    ``Decimal`` values ``pd.read_sql`` gives for SQL ``NUMERIC``; as categories, nearly every
    value of new rows would be unseen. Whole numbers alone (``astype(object)`` of integer
    codes, a way of marking them categorical) stay categorical. Dates, times and durations
    as Python objects are not categorical either: read as numbers, they are an error, as
    in a ``datetime64`` column."""
    kind = pd.api.types.infer_dtype(column, skipna=True)
    if kind in ("floating", "mixed-integer-float", "decimal") or kind in TEMPORAL_KINDS:
        return False  # dates: read as numbers, where they are an error
    if kind in ("mixed", "mixed-integer"):  # Decimal beside floats or ints, say
        values = column.dropna()
        return not all(isinstance(value, Number) and not isinstance(value, _NOT_REAL) for value in values)
    return True


_NOT_REAL = (bool, np.bool_, complex, np.complexfloating)


def fit_table_encoding(X, mask: np.ndarray, handle_missing: str, one_hot_max_categories: int | None = None) -> dict:
    """The encoding's state for the raw table ``X`` with categorical columns ``mask``;
    columns with more than ``one_hot_max_categories`` categories are embedded (``None``:
    none are)."""
    frame = _as_frame(X)
    categorical = np.flatnonzero(mask)
    categories, offsets, embedded = [], [0], []
    for position, column in enumerate(categorical):
        values = _category_strings(frame.iloc[:, column])
        seen = np.unique(values[values != _MISSING])
        embed = one_hot_max_categories is not None and seen.size > one_hot_max_categories
        limit = MAX_EMBEDDED_CATEGORIES if embed else MAX_ONE_HOT_CATEGORIES
        if seen.size > limit:
            advice = ("set one_hot_max_categories to a number below it, so that a learned embedding encodes it"
                      if not embed else "group rare ones, encode it yourself (e.g. TargetEncoder) or drop it")
            raise ValueError(f"Categorical column {_name(frame, column)} has {seen.size} categories, more than "
                             f"{limit} for {'an embedded' if embed else 'a one-hot encoded'} column; {advice}.")
        categories.extend(seen.tolist())
        offsets.append(offsets[-1] + seen.size)
        if embed:
            embedded.append(position)
    numeric = _numeric_values(frame, ~mask, array=not isinstance(X, pd.DataFrame))
    missing = np.isnan(numeric)
    with_missing = np.flatnonzero(missing.any(axis=0))
    if with_missing.size and handle_missing == "error":
        names = [_name(frame, column) for column in np.flatnonzero(~mask)[with_missing]]
        raise ValueError(_missing_values_message(names))
    fill = np.zeros(numeric.shape[1])
    for j in with_missing:
        present = numeric[~missing[:, j], j]
        fill[j] = float(np.median(present)) if present.size else 0.0
    return {"_table_categorical": categorical.astype(np.int64),
            "_table_categories": np.asarray(categories, dtype=str),
            "_table_offsets": np.asarray(offsets, dtype=np.int64),
            "_table_embedded": np.asarray(embedded, dtype=np.int64),
            "_table_missing": with_missing.astype(np.int64), "_table_fill": fill}


def encode_table(X, state) -> np.ndarray:
    """The numeric matrix of the raw table ``X`` under a fitted encoding (``state``: an object
    with the ``_table_*`` attributes): the numeric columns (missing values filled), their
    missing-value indicators, the one-hot columns' indicators, then the embedded columns'
    codes. float64."""
    frame = _as_frame(X)
    mask = np.zeros(frame.shape[1], dtype=bool)
    mask[state._table_categorical] = True
    numeric = _numeric_values(frame, ~mask, fitted=True, array=not isinstance(X, pd.DataFrame))
    missing = np.isnan(numeric)
    filled = state._table_missing
    if missing[:, filled].any():  # the other columns' NaN stay: the scaled input's centre
        fill = np.full(numeric.shape[1], np.nan)
        fill[filled] = state._table_fill[filled]
        numeric = np.where(missing, fill, numeric)
    # Written into one matrix, block by block: one-hot columns make it many times the
    # table's size, and a matrix per block, concatenated, would take it twice.
    encoded = np.zeros((frame.shape[0], encoded_width(frame.shape[1], state)))
    encoded[:, :numeric.shape[1]] = numeric
    at = numeric.shape[1] + filled.size
    encoded[:, numeric.shape[1]:at] = missing[:, filled]
    offsets = state._table_offsets
    embedded = embedded_positions(state)
    at_code = encoded.shape[1] - embedded.size
    rows = np.arange(frame.shape[0])
    for position, column in enumerate(state._table_categorical):
        known = state._table_categories[offsets[position]:offsets[position + 1]]
        values = _category_strings(frame.iloc[:, column])
        codes = _codes(known, values)  # -1: unseen or missing
        is_missing = values == _MISSING
        if position in embedded:
            encoded[:, at_code] = np.where(is_missing, known.size + 1, codes + 1)
            at_code += 1
            continue
        seen = codes >= 0
        encoded[rows[seen], at + codes[seen]] = 1.0
        encoded[:, at + known.size] = is_missing
        at += known.size + 1
    return encoded


_MISSING = "\x00missing"  # no category's string form


def _missing_values_message(names: list[str]) -> str:
    """The error for missing values under ``handle_missing="error"``, naming their columns."""
    return (f"Input X contains NaN in column(s) {', '.join(names[:10])}; handle_missing='error'. Set "
            "handle_missing='native' to encode missing values, or impute them first.")


def _as_frame(X) -> pd.DataFrame:
    if isinstance(X, pd.DataFrame):
        return X
    values = np.asarray(X, dtype=object) if not hasattr(X, "toarray") else X.toarray()
    if values.ndim != 2:
        raise ValueError(f"Expected a 2-d table X; got an array of shape {values.shape}.")
    return pd.DataFrame(values)


def _name(frame: pd.DataFrame, column: int) -> str:
    return repr(frame.columns[column])


def _category_strings(series: pd.Series) -> np.ndarray:
    """A column's values as category keys (strings), a missing value as :data:`_MISSING`.

    A category is matched by its value: ``1``, ``1.0`` and ``"1.0"`` all have the key
    ``"1"``, since a column of whole numbers turns float as soon as it holds a missing
    value, and a row built from floats holds ``1.0`` where fit saw ``1``.
    """
    if series.dtype != np.dtype(object):
        # One dtype: values group as their strings do (equal values print alike, but for
        # -0.0 and 0.0, whose keys are both "0"), so only the distinct values are written.
        positions, distinct = pd.factorize(series)  # -1, a missing value: the last key
        keys = _whole_number_keys(pd.Series(distinct, dtype=object).astype(str).to_numpy().astype(str))
        return np.append(keys, _MISSING)[positions]
    strings = series.astype(object).astype(str).to_numpy().astype(str)
    return np.where(series.isna().to_numpy(), _MISSING, _whole_number_keys(strings)).astype(str)


def _whole_number_keys(strings: np.ndarray) -> np.ndarray:
    """``strings`` with the trailing zeros of whole numbers written as floats dropped
    (``"3.0"`` and ``"-0.0"`` become ``"3"`` and ``"0"``). Each distinct string is rewritten
    once: a column holds far fewer categories than rows."""
    positions, distinct = pd.factorize(strings)
    keys = pd.Series(distinct, dtype=object).str.replace(_WHOLE_FLOAT, r"\1", regex=True)
    keys = np.where(keys == "-0", "0", keys.to_numpy(dtype=str))
    return keys[positions] if len(strings) else np.asarray(strings, dtype=str)


_WHOLE_FLOAT = r"^\+?(-?\d+)\.0+$"


def _value_keys(strings: np.ndarray) -> np.ndarray:
    """Category keys (:func:`_category_strings`) as values to match: whole numbers without
    trailing zeros, and a boolean as the number it equals (``"True"`` as ``"1"``), so that
    a boolean column given as 0/1 (or the reverse) keeps its categories."""
    keys = _whole_number_keys(np.asarray(strings, dtype=str))
    return np.where(keys == "True", "1", np.where(keys == "False", "0", keys))


def _codes(known: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The position of each of ``values`` among the categories ``known``, -1 where it is not
    one of them. Only values not found as they are (an unseen category, a model whose
    categories were kept as text, ``"1.0"``, before they were keyed by value, or booleans
    given as 0/1) are looked up by :func:`_value_keys`: there the first of a key's
    categories takes it."""
    codes = pd.Index(known).get_indexer(values)
    unfound = (codes < 0) & (values != _MISSING)
    if unfound.any() and known.size:
        keys = pd.Index(_value_keys(known))
        first_of_key = np.flatnonzero(~keys.duplicated(keep="first"))
        found = keys[first_of_key].get_indexer(_value_keys(values[unfound]))
        codes[unfound] = np.where(found >= 0, first_of_key[found], -1)
    return codes


def _numeric_values(frame: pd.DataFrame, columns: np.ndarray, fitted: bool = False, array: bool = False) -> np.ndarray:
    """The columns ``columns`` (bool mask) as float64, missing values as NaN. For the errors:
    ``fitted``, the input of a fitted encoding, whose columns were numbers in fit;
    ``array``, ``frame`` holds a 2-d array's columns."""
    check_column_kinds(frame, np.flatnonzero(columns), array)
    chosen = frame.iloc[:, np.flatnonzero(columns)]
    try:
        values = chosen.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as error:
        try:  # an object column's pd.NA or None, which na_value leaves to float()
            values = chosen.astype(object).where(chosen.notna(), np.nan).to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            raise non_numeric_error(chosen, non_numeric_columns(chosen), error, fitted, array) from error
    if np.isinf(values).any():
        raise ValueError(infinity_message(list(chosen.columns[np.isinf(values).any(axis=0)])))
    return values


def encoded_width(n_features: int, state) -> int:
    """Columns of the encoded matrix of a raw table of ``n_features`` columns."""
    counts = np.diff(state._table_offsets)
    one_hot_categories = int(counts.sum() - counts[embedded_positions(state)].sum())
    # A one-hot column has its categories and a missing slot; an embedded column one code.
    return n_features + state._table_missing.size + one_hot_categories


def warn_of_text_columns(frame: pd.DataFrame, mask: np.ndarray) -> None:
    """Warn of each text column among ``mask`` (columns ``"from_dtype"`` made categorical)
    of which most distinct values read as numbers, some of them not whole or the others a
    few placeholders, or as dates.

    A numeric column with a placeholder for missing values (``"?"``, ``"n/a"``), numbers
    written with a decimal comma (``"1,5"``) and dates (``"2024-01-31"``) are text as a CSV
    reader leaves them. As categories, each number or date is one of its own, and a new one
    at prediction is unseen. Whole numbers alone, or zero-padded (codes, zip codes,
    identifiers), are left alone.
    """
    for position in np.flatnonzero(mask):
        column = frame.iloc[:, position]
        if is_bool_dtype(column.dtype) or isinstance(column.dtype, pd.CategoricalDtype):
            continue
        distinct = pd.Series(column.dropna().unique(), dtype=object)
        if not len(distinct):
            continue
        name = _name(frame, position)
        # A sample first: most text is words.
        if _mostly_numbers(distinct[:1000]):
            _warn_of_numbers(distinct, name)
        elif _mostly_dates(distinct[:1000]) and _mostly_dates(distinct):
            dates = distinct[distinct.map(_is_date_text)]
            _warn_of_text_column(name, len(dates), len(distinct), "dates", dates.iloc[0],
                                 f"Derive numeric columns from it, e.g. pd.to_datetime(X[{name}]).dt.year or "
                                 ".dt.dayofweek, or name it in categorical_features to keep its values as categories.")


#: What the warnings of text columns of numbers or dates say of every such column.
TEXT_COLUMN_WARNING = "holds text, so it is encoded as categories (categorical_features='from_dtype')"


def _warn_of_text_column(name: str, n_read: int, n_distinct: int, what: str, example, advice: str) -> None:
    warn_at_caller(
        f"Column {name} {TEXT_COLUMN_WARNING}, yet {n_read} of its {n_distinct} distinct values read as {what}, "
        f"such as {example!r}: each is a category of its own, unseen at prediction if new. {advice}",
        UserWarning,
    )


def _warn_of_numbers(distinct: pd.Series, name: str) -> None:
    """:func:`warn_of_text_columns` for a column of ``distinct`` values, most of which
    read as numbers: a warning unless they are whole numbers without separators, alone or
    zero-padded."""
    numbers, separated = _read_numbers(distinct)
    read = numbers.dropna().to_numpy(dtype=np.float64)
    plain = numbers[~separated].dropna().to_numpy(dtype=np.float64)  # a stray "10115,10117" is no fraction
    fractions = (np.isfinite(plain) & (plain != np.round(plain))).any()
    written_with_separators = _with_separators(separated)
    other = distinct[numbers.isna()]
    # Whole numbers beside a placeholder or two ("?", "n/a") are a numeric column with
    # missing values; zero-padded ones ("007") are codes.
    padded = distinct[numbers.notna()].astype(str).str.strip().str.match(r"[+-]?0\d").any()
    placeholders = 0 < len(other) <= _MAX_PLACEHOLDERS and not padded
    if read.size < _NUMBERS_SHARE * len(distinct) or not (fractions or written_with_separators or placeholders):
        return
    placeholder = f" (such as {other.iloc[0]!r})" if len(other) else ""
    example = distinct[separated if written_with_separators else numbers.notna()].iloc[0]
    advice = (f"If it holds numbers, convert it first: pd.to_numeric(X[{name}], errors='coerce') makes what is not "
              f"a number{placeholder} a missing value.")
    if written_with_separators:
        advice = ("If it holds numbers written with a decimal comma or thousands separators, read the file with "
                  "pd.read_csv(..., decimal=',') or thousands=',' as the file writes them, or convert the column "
                  f"with pd.to_numeric after removing the separators; what is not a number{placeholder} then "
                  "becomes a missing value.")
    _warn_of_text_column(name, read.size, len(distinct), "numbers", example, advice)


# Dates as text: ISO 8601 ("2024-01-31", "2024-01-31T08:00:00Z", "2024/1/31"), and day and
# month in either order separated by slashes ("31/01/2024", "1/31/24") or points with a
# four-digit year ("31.01.2024"), each with a time perhaps; day and month must be in range.
_TIME_TEXT = r"(?:[ T]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?"
_YEAR_FIRST = re.compile(r"\d{4}[-/](\d{1,2})[-/](\d{1,2})" + _TIME_TEXT)
_YEAR_LAST = re.compile(r"(\d{1,2})(?:/(\d{1,2})/(?:\d{4}|\d{2})|\.(\d{1,2})\.\d{4})" + _TIME_TEXT)


def _is_date_text(value) -> bool:
    if not isinstance(value, str):
        return False
    value = value.strip()
    if match := _YEAR_FIRST.fullmatch(value):
        month, day = int(match[1]), int(match[2])
        return 1 <= month <= 12 and 1 <= day <= 31
    if match := _YEAR_LAST.fullmatch(value):
        first, second = int(match[1]), int(match[2] or match[3])
        return min(first, second) >= 1 and ((first <= 31 and second <= 12) or (first <= 12 and second <= 31))
    return False


def _mostly_dates(values: pd.Series) -> bool:
    """Whether at least 90% of ``values`` are text that reads as a date."""
    return values.map(_is_date_text).mean() >= _NUMBERS_SHARE


# The share of a text column's distinct values that must read as numbers for the warning.
_NUMBERS_SHARE = 0.9
# Whole numbers are warned of beside at most this many distinct other values: placeholders
# of missing values, not the letters of codes.
_MAX_PLACEHOLDERS = 3
# Numbers written with separators: thousands grouped by commas ("1,234", "12,345.5"), or a
# decimal comma with thousands perhaps grouped by points ("1,5", "1.234,5").
_GROUPED_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_DECIMAL_COMMA = re.compile(r"[+-]?(?:\d{1,3}(?:\.\d{3})+|\d*),\d+")


def _with_separators(separated: pd.Series) -> bool:
    """Whether values are numbers written with separators: at least a tenth of them (a
    stray ``"10115,10117"`` among whole-number codes is not)."""
    return bool(separated.mean() >= 0.1)  # False for none: the mean of none is NaN


def _mostly_numbers(values: pd.Series) -> bool:
    """Whether ``values`` are text and numbers (floats among a ``"?"``, say), at least 90%
    of which read as numbers."""
    kinds = [isinstance(value, str) or (isinstance(value, Number) and not isinstance(value, _NOT_REAL))
             for value in values]
    return all(kinds) and _read_numbers(values)[0].notna().mean() >= _NUMBERS_SHARE


def _read_numbers(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """``values`` (text and numbers) as floats, NaN where they do not read as a number, and
    which of them are text written with thousands separators or a decimal comma (read as
    their numbers: ``"1,234.5"`` and ``"1.234,5"`` as 1234.5, ``"1,234"`` as 1234)."""
    stripped = values.map(lambda value: value.strip() if isinstance(value, str) else value)
    numbers = pd.to_numeric(stripped, errors="coerce")
    unread = numbers.isna()
    plain = stripped[unread].map(_without_separators)
    separated = pd.Series(False, index=values.index)
    separated[unread] = plain != stripped[unread]
    numbers[separated] = pd.to_numeric(plain[separated[unread]], errors="coerce")
    return numbers, separated


def _without_separators(value):
    if not isinstance(value, str):
        return value
    if _GROUPED_THOUSANDS.fullmatch(value):
        return value.replace(",", "")
    if _DECIMAL_COMMA.fullmatch(value):
        return value.replace(".", "").replace(",", ".")
    return value


def encode_for_fit(estimator, X, reuse: bool):
    """``(X to validate, raw X or None)`` at the start of a fit: the encoded matrix and the raw
    table when the table has categorical columns or (``handle_missing="native"``) missing
    values, the encoding's state set on ``estimator``; else ``X`` itself and ``None``."""
    if reuse:
        check_encoding_kept(estimator, X)
        return (encode_for_predict(estimator, X), X) if is_encoded(estimator) else (X, None)
    record_encoding_parameters(estimator)
    if len(_shape(X)) != 2:
        vars(estimator).update(empty_state())  # not a table: validation says
        return X, None
    mask = categorical_mask(X, estimator.categorical_features)
    to_encode = mask.any() or (estimator.handle_missing == "native" and _has_missing(X))
    if to_encode and hasattr(X, "toarray"):  # sparse: encoded as a dense array is
        X = densify(X, warn=True)
    if isinstance(estimator.categorical_features, str):  # "from_dtype" chose the columns
        warn_of_text_columns(X, mask)
    if not to_encode:
        vars(estimator).update(empty_state())
        return X, None
    vars(estimator).update(fit_table_encoding(X, mask, estimator.handle_missing, estimator.one_hot_max_categories))
    return encode_table(X, estimator), X


def record_encoding_parameters(estimator) -> None:
    """Keep the values of :data:`ENCODING_PARAMETERS` that the fitted encoding follows (a copy:
    a list given as a parameter may change in place)."""
    estimator._encoding_parameters = {name: copy.deepcopy(getattr(estimator, name)) for name in ENCODING_PARAMETERS}


def check_encoding_kept(estimator, X) -> None:
    """A continued fit's check that :data:`ENCODING_PARAMETERS`, if changed since the fit,
    still describe the fitted encoding of ``X``'s columns: the encoding is fixed by the
    first fit (the network's inputs are its columns), so a change that would encode the
    table otherwise is an error rather than silently ignored."""
    fitted_with = getattr(estimator, "_encoding_parameters", None)
    if fitted_with is None or getattr(estimator, "_table_categorical", None) is None:  # an older model
        return
    changed = {name for name in ENCODING_PARAMETERS if not _same_parameter(fitted_with[name], getattr(estimator, name))}
    if not changed or len(_shape(X)) != 2:  # (not a table: validation says)
        return
    fitted = estimator._table_categorical
    # Only a changed parameter is checked: the columns' dtypes in this batch may differ from
    # fit's (a text column all missing reads as numbers), which the fitted encoding copes with.
    now = np.flatnonzero(categorical_mask(X, estimator.categorical_features)) if "categorical_features" in changed \
        else fitted
    counts, limit = np.diff(estimator._table_offsets), estimator.one_hot_max_categories
    embedded_now = np.zeros(0, dtype=np.int64) if limit is None else np.flatnonzero(counts > limit)
    if not np.array_equal(now, fitted):
        name, change = "categorical_features", (
            f"reads {_column_list(estimator, now)} as categorical, where the model was fitted with "
            f"{_column_list(estimator, fitted)}")
    elif not np.array_equal(embedded_now, embedded_positions(estimator)):
        name, change = "one_hot_max_categories", (
            f"embeds {_column_list(estimator, fitted[embedded_now])}, where the model was fitted embedding "
            f"{_column_list(estimator, fitted[embedded_positions(estimator)])}")
    else:
        return
    raise ValueError(
        f"Continuing the fitted model (warm_start or partial_fit): {name}={getattr(estimator, name)!r} {change}. "
        f"The first fit fixes how the table's columns are encoded (they are the network's inputs); set {name} "
        f"back to {fitted_with[name]!r}, or set warm_start=False and call fit to start afresh.")


def _same_parameter(a, b) -> bool:
    if isinstance(a, (str, Number)) or a is None or isinstance(b, (str, Number)) or b is None:
        return type(a) is type(b) and a == b
    try:
        return np.array_equal(np.asarray(a), np.asarray(b))
    except (TypeError, ValueError):
        return False


def _column_list(estimator, positions: np.ndarray) -> str:
    if not positions.size:
        return "no column"
    names = getattr(estimator, "feature_names_in_", None)
    return ", ".join(repr(names[j]) if names is not None else f"column {j}" for j in positions.tolist())


def encode_for_predict(estimator, X) -> np.ndarray:
    """The encoded matrix of a raw table at prediction, its columns checked against fit's.

    A numeric column that had no missing value in fit keeps its NaN (which the scaled input
    turns into the column's centre), or, with ``handle_missing="error"``, is an error."""
    from sklearn.utils.validation import validate_data

    validate_data(estimator, X, reset=False, skip_check_array=True)  # the columns' names and number
    if _shape(X)[0] == 0:  # as scikit-learn's check_array says of an array
        raise ValueError(f"Found array with 0 sample(s) (shape={_shape(X)}) while a minimum of 1 is required by "
                         f"{type(estimator).__name__}.")
    encoded = encode_table(X, estimator)
    if estimator.handle_missing == "error":
        numeric = np.flatnonzero(~np.isin(np.arange(_shape(X)[1]), estimator._table_categorical))
        with_nan = np.isnan(encoded[:, :numeric.size]).any(axis=0)
        if with_nan.any():
            frame = _as_frame(X)
            raise ValueError(_missing_values_message([_name(frame, column) for column in numeric[with_nan]]))
    return encoded


def _shape(X) -> tuple:
    """``X.shape``, for array-likes without one (lists, objects with ``__array__``)."""
    shape = getattr(X, "shape", None)
    return tuple(shape) if shape is not None else np.asarray(X, dtype=object).shape


def _has_missing(X) -> bool:
    if hasattr(X, "toarray"):  # sparse: NaN stored explicitly
        data = getattr(X, "data", np.zeros(0))
        return data.dtype.kind == "f" and bool(np.isnan(data).any())
    if isinstance(X, pd.DataFrame):
        return bool(X.isna().to_numpy().any())
    values = np.asarray(X)
    if values.dtype.kind == "f":
        return bool(np.isnan(values).any())
    return values.dtype.kind == "O" and bool(pd.isna(values).any())
