"""Input validation of the estimators: scikit-learn's, with errors that say what to do."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.exceptions import DataConversionWarning
from sklearn.utils.validation import _check_sample_weight, validate_data

# Weights below this fraction of the largest vanish in float32 training: they count as 0.
NEGLIGIBLE_WEIGHT = 1e-30

# Sparse X (e.g. one-hot output of a ColumnTransformer) is densified up to this many cells
# (2 GiB as float64); beyond it densifying would exhaust memory, so it is an error.
_MAX_DENSE_CELLS = 2**28


def _densify(X, warn: bool):
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
        warnings.warn(
            f"X is a sparse matrix; the experts need dense input, so X was densified "
            f"({X.shape[0]} x {X.shape[1]}, {n_cells * 4 / 2**20:.1f} MiB as float32). Pass dense input to "
            "silence this, e.g. OneHotEncoder(sparse_output=False) or ColumnTransformer(sparse_threshold=0).",
            DataConversionWarning,
            stacklevel=7,  # the caller of fit()
        )
    return X.toarray()


def _non_finite_columns(X) -> list:
    """Names (DataFrame) or indices of the columns of X holding NaN or infinity."""
    try:
        if sp.issparse(X):
            coo = sp.coo_matrix(X)
            return np.unique(coo.col[~np.isfinite(coo.data.astype(np.float64))]).tolist()
        values = X.to_numpy(dtype=np.float64, na_value=np.nan) if isinstance(X, pd.DataFrame) else X
        bad = ~np.isfinite(np.asarray(values, dtype=np.float64)).all(axis=0)
    except (TypeError, ValueError):
        return []
    names = X.columns if isinstance(X, pd.DataFrame) else np.arange(bad.shape[0])
    return [name.item() if hasattr(name, "item") else name for name in names[bad]]


def validate_input(estimator, X, y="no_validation", reset=False, **kwargs):
    """``validate_data`` as float64 (sparse input densified), with errors that name the
    non-numeric or non-finite columns and say how to fix them."""
    try:
        validated = validate_data(
            estimator, X, y, reset=reset, dtype=np.float64, accept_sparse=("csr", "csc", "coo"), **kwargs
        )
    except ValueError as error:
        if "convert" in str(error) and "float" in str(error):
            raise _string_features_error(type(estimator).__name__, error, X) from error
        if str(error).startswith("Input X contains"):
            raise _non_finite_error(type(estimator).__name__, error, X) from error
        raise
    if isinstance(validated, tuple):
        return (_densify(validated[0], warn=reset), *validated[1:])
    return _densify(validated, warn=reset)


def relative_sample_weight(sample_weight, X) -> np.ndarray:
    """Checked non-negative weights divided by the largest, negligible ones set to 0.

    Only relative weights matter; this keeps sums and means of tiny (subnormal) or huge
    weights from underflowing or overflowing.
    """
    sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64, ensure_non_negative=True)
    if not sample_weight.max() > 0:
        raise ValueError("sample_weight must contain at least one positive weight.")
    sample_weight = sample_weight / sample_weight.max()
    sample_weight[sample_weight < NEGLIGIBLE_WEIGHT] = 0.0
    return sample_weight


def _non_finite_error(name: str, error: ValueError, X) -> ValueError:
    columns = _non_finite_columns(X)
    shown = ", ".join(repr(c) for c in columns[:10]) + (", ..." if len(columns) > 10 else "")
    where = f" NaN or infinity in column(s) {shown}." if columns else ""
    return ValueError(
        f"{str(error).splitlines()[0]}{where} {name} needs finite inputs: set handle_missing='native' to "
        "encode missing values (NaN), or impute them first (e.g. sklearn.impute.SimpleImputer in a Pipeline) "
        "or drop those rows."
    )


def _string_features_error(name: str, error: ValueError, X) -> ValueError:
    columns = ""
    if isinstance(X, pd.DataFrame):
        names = list(X.select_dtypes(exclude=["number", "bool"]).columns)
        columns = f" Non-numeric columns: {names}."
    return ValueError(
        f"{name} needs numeric features, but X contains strings "
        f"({error}).{columns} Encode categorical columns first, for example with "
        "sklearn.compose.ColumnTransformer and a OneHotEncoder in a Pipeline."
    )
