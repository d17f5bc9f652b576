"""The categorical-encoding benchmark's models and report (not its numbers)."""

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from benchmarks import categorical


def test_the_variants_differ_only_in_the_encoding():
    X = pd.DataFrame({"x": [1.0, 2.0], "c": ["a", "b"]})
    embedded = categorical.build("embedded", "regression", X, 0)
    one_hot = categorical.build("one_hot", "classification", X, 0)
    pipeline = categorical.build("pipeline", "regression", X, 0)
    assert embedded.one_hot_max_categories == 8 and one_hot.one_hot_max_categories is None
    assert type(one_hot).__name__ == "MoEClassifier"
    assert isinstance(pipeline, Pipeline) and pipeline[-1].get_params() == embedded.get_params()
    assert embedded.set_params(one_hot_max_categories=256).get_params() == type(embedded)(random_state=0).get_params()


def test_report_counts_the_folds_the_embedding_wins():
    rows = []
    for fold, scores in enumerate([(0.9, 0.8, 0.9), (0.7, 0.8, 0.6)]):
        for variant, score in zip(categorical.VARIANTS, scores):
            rows.append({"dataset": "d", "task": "regression", "fold": fold, "variant": variant, "score": score,
                         "loss": 1 - score})
    text = categorical.report(pd.DataFrame(rows), "cmd", "machine", 2, 0, 100)
    assert "higher than `one_hot` on 1 of 2 folds (equal on 0)" in text
    assert "higher than `pipeline` on 1 of 2 folds (equal on 1)" in text
    header = next(line for line in text.splitlines() if line.startswith("| dataset"))
    columns = [cell.strip() for cell in header.split("|")[1:-1]]
    assert columns == ["dataset", "task"] + [f"{m} {v}" for m in ("score", "loss") for v in categorical.VARIANTS]
    row = next(line for line in text.splitlines() if line.startswith("| d "))
    assert np.isclose(float(row.split("|")[3]), 0.8)  # the embedding's mean score
