"""routing_report: what each expert does."""

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse
import torch
from sklearn.exceptions import DataConversionWarning

from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe._scaling import scale_features

from .conftest import FAST


def sign_routed_regressor(X, y):
    """A fitted two-expert model whose router sends rows with x0 > 0 to expert 1."""
    model = MoERegressor(**dict(FAST, n_experts=2, router="topk", top_k=1, numeric_embedding=None, max_epochs=3))
    model.fit(X, y)
    gate = model.module_.router.gate
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.zero_()
        gate.weight[1, 0], gate.weight[0, 0] = 10.0, -10.0
    return model


def test_report_by_hand(regression_data):
    X, y = regression_data
    model = sign_routed_regressor(X, y)
    report = model.routing_report(X, y)
    assert list(report.index) == [0, 1] and report.index.name == "expert"
    assert list(report.columns) == ["share", "mean_gate", "n_rows", "score", "distinguishing_features"]
    served = model.route(X).argmax(axis=1)
    np.testing.assert_array_equal(served, scale_features(X, model._x_mean, model._x_scale)[:, 0] > 0)
    assert report["n_rows"].tolist() == [int((served == 0).sum()), int((served == 1).sum())]
    np.testing.assert_allclose(report["share"], report["n_rows"] / len(X))
    np.testing.assert_allclose(report["mean_gate"], model.route(X).mean(axis=0))
    for expert in (0, 1):
        rows = served == expert
        assert report.loc[expert, "score"] == pytest.approx(model.score(X[rows], y[rows]))
    # x0 sets the routing: it leads both descriptions, with opposite signs
    assert report.loc[1, "distinguishing_features"].startswith("x0 (+")
    assert report.loc[0, "distinguishing_features"].startswith("x0 (-")
    assert report.loc[1, "distinguishing_features"].count("(") == 3


def test_report_of_sparse_or_list_input_equals_the_dense_one(regression_data):
    X, y = regression_data
    model = sign_routed_regressor(X, y)
    dense = model.routing_report(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataConversionWarning)  # sparse input is densified
        pd.testing.assert_frame_equal(model.routing_report(scipy.sparse.csr_matrix(X), y), dense)
    pd.testing.assert_frame_equal(model.routing_report(X.tolist(), y.tolist()), dense)


def test_report_names_dataframe_columns_and_needs_no_target(regression_data):
    X, y = regression_data
    frame = pd.DataFrame(X, columns=[f"feature_{j}" for j in range(X.shape[1])])
    model = MoERegressor(**dict(FAST, max_epochs=2)).fit(frame, y)
    report = model.routing_report(frame, n_top_features=1)
    assert "score" not in report
    assert all(text.startswith("feature_") and text.count("(") == 1 for text in report["distinguishing_features"]
               if text)
    assert report["n_rows"].sum() == len(X)


def test_report_of_a_classifier_scores_accuracy(classification_data):
    X, y = classification_data
    model = MoEClassifier(**dict(FAST, max_epochs=3)).fit(X, y)
    report = model.routing_report(X, y)
    served = model.route(X).argmax(axis=1)
    for expert, row in report.iterrows():
        rows = served == expert
        if rows.sum() >= 2:
            assert row["score"] == pytest.approx(np.mean(model.predict(X[rows]) == y[rows]))
        else:
            assert np.isnan(row["score"])


def test_report_needs_a_fitted_model():
    with pytest.raises(Exception, match="not fitted"):
        MoERegressor().routing_report(np.zeros((3, 2)))


def test_report_names_the_models_inputs_of_a_raw_table():
    rng = np.random.RandomState(0)
    n = 200
    X = pd.DataFrame({"a": rng.normal(size=n), "city": rng.choice(["Oslo", "Paris"], n), "b": rng.normal(size=n),
                      "user": rng.choice([f"u{i}" for i in range(30)], n)})
    X.loc[::4, "b"] = np.nan
    y = X["a"] + 2 * (X["city"] == "Oslo")
    model = MoERegressor(**dict(FAST, n_experts=2, router="topk", top_k=1, max_epochs=2),
                         one_hot_max_categories=5).fit(X, y)
    report = model.routing_report(X, y, n_top_features=20)
    named = {part.rsplit(" (", 1)[0] for text in report["distinguishing_features"] if text
             for part in text.split(", ")}
    # The one-hot categories and the missing-value indicator, one by one; not the embedded
    # column's codes (labels, whose mean says nothing).
    assert named <= {"a", "b", "b (missing)", "city=Oslo", "city=Paris", "city (missing)"}
    assert {"city=Oslo", "b (missing)"} <= named
    with pytest.raises(ValueError, match="X has 200 rows but y has 5"):
        model.routing_report(X, y[:5])
    with pytest.raises(ValueError, match="n_top_features must be a non-negative int"):
        model.routing_report(X, n_top_features=-1)
