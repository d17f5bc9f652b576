"""What each expert of a fitted estimator does: :meth:`BaseMoE.routing_report`."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.utils import _safe_indexing
from sklearn.utils.validation import _num_samples

from ._tabular import encoded_names, n_code_columns
from .nn._checks import check_int


def routing_report(estimator, X, y=None, n_top_features: int = 3) -> pd.DataFrame:
    """One row per expert; see :meth:`BaseMoE.routing_report`."""
    check_int("n_top_features", n_top_features, minimum=0)
    X_scaled = estimator._scaled_input(X)
    gates = estimator._gates(X_scaled)
    inputs = X_scaled.detach().cpu().numpy().astype(np.float64)
    n_rows, n_experts = gates.shape
    if y is not None and _num_samples(y) != n_rows:
        raise ValueError(f"X has {n_rows} rows but y has {_num_samples(y)}.")
    top1 = gates.argmax(axis=1)
    counts = np.bincount(top1, minlength=n_experts)
    names = encoded_names(estimator)  # the inputs' columns, categories and missing-value indicators included
    # An embedded column's codes are labels, whose mean says nothing: left out.
    n_compared = inputs.shape[1] - n_code_columns(estimator)
    inputs, names = inputs[:, :n_compared], names[:n_compared]
    records = []
    for expert in range(n_experts):
        served = top1 == expert
        record = {"expert": expert, "share": counts[expert] / n_rows, "mean_gate": float(gates[:, expert].mean()),
                  "n_rows": int(counts[expert])}
        if y is not None:
            record["score"] = _score_on(estimator, X, y, served)
        record["distinguishing_features"] = _distinguishing(inputs, served, names, n_top_features)
        records.append(record)
    return pd.DataFrame.from_records(records).set_index("expert")


def _score_on(estimator, X, y, rows: np.ndarray) -> float:
    """``estimator.score`` on the rows an expert serves first (NaN below two rows)."""
    if rows.sum() < 2:
        return float("nan")
    index = np.flatnonzero(rows)
    # Rows of any input the estimators take (a DataFrame, a sparse matrix, a list, ...).
    return float(estimator.score(_safe_indexing(X, index), _safe_indexing(y, index)))


def _distinguishing(inputs: np.ndarray, rows: np.ndarray, names: list, n_top: int) -> str:
    """The inputs whose mean on ``rows`` differs most from the other rows', in pooled
    standard deviations (``(mean_in - mean_out) / std``), as ``"name (+1.2), ..."``."""
    if rows.sum() == 0 or rows.all():
        return ""
    inside, outside = inputs[rows], inputs[~rows]
    spread = inputs.std(axis=0)
    effect = np.divide(inside.mean(axis=0) - outside.mean(axis=0), spread, out=np.zeros(inputs.shape[1]),
                       where=spread > 0)
    order = np.argsort(-np.abs(effect), kind="stable")[:n_top]
    return ", ".join(f"{names[j]} ({effect[j]:+.2f})" for j in order)
