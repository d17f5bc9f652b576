"""Multilabel classification: MoEClassifier fitted on a 0/1 indicator matrix, as scikit-learn's
MLPClassifier takes it (its estimator checks of multilabel output run in test_common.py)."""

import json
import pickle
import warnings

import numpy as np
import pandas as pd
import pytest
import safetensors
import scipy.sparse as sp
import scipy.special
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, cross_val_score

import sklearn_moe
from sklearn_moe import MoEClassifier
from sklearn_moe.nn import MixtureOfExperts
from sklearn_moe.nn.density import mixture_label_logits
from sklearn_moe.nn.losses import MultilabelLoss

from .conftest import FAST, needs
from .test_expert_types import KEY, rewrite_metadata

pytestmark = pytest.mark.filterwarnings("ignore::sklearn_moe.callbacks.ExpertCollapseWarning")

SHORT = dict(FAST, max_epochs=5)


def label_data(n=300, seed=0):
    """Three labels, each a region of the inputs: label 0 ``x0 > 0``, label 1 ``x1 > 0.5``,
    label 2 both ``x0 < 0`` and ``x2 > 0`` (rows may have none, one or several)."""
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 4))
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] > 0.5, (X[:, 0] < 0) & (X[:, 2] > 0)]).astype(np.int64)
    return X, Y


@pytest.fixture(scope="module")
def fitted():
    X, Y = label_data()
    return MoEClassifier(**FAST).fit(X, Y), X, Y


# ----------------------------------------------------------------------------- the estimator


def test_predictions_are_an_indicator_matrix_of_the_labels(fitted):
    model, X, Y = fitted
    np.testing.assert_array_equal(model.predict_proba(X), scipy.special.expit(model._raw_output(X)))
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])
    predicted = model.predict(X)
    assert predicted.shape == Y.shape and predicted.dtype == np.int64
    assert set(np.unique(predicted)) <= {0, 1}
    proba = model.predict_proba(X)
    assert proba.shape == Y.shape and proba.dtype == np.float64
    assert ((proba > 0) & (proba < 1)).all()
    # Each label's probability on its own: rows need not sum to 1, and the labels are those above 1/2.
    assert not np.allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(predicted, (proba > 0.5).astype(np.int64))
    np.testing.assert_allclose(np.exp(model.predict_log_proba(X)), proba, rtol=1e-12)


def test_the_labels_are_learned(fitted):
    model, X, Y = fitted
    X_test, Y_test = label_data(400, seed=1)
    assert f1_score(Y_test, model.predict(X_test), average="micro") > 0.9
    assert model.score(X_test, Y_test) == accuracy_score(Y_test, model.predict(X_test))  # subset accuracy
    assert model.score(X_test, Y_test) > 0.75


@pytest.mark.parametrize("params", [dict(mixing="probabilities"), dict(mixing="probabilities", expert_loss="mixture"),
                                    dict(expert_loss="mixture", router="softmax"), dict(label_smoothing=0.1)],
                         ids=["probabilities", "probabilities-mixture-loss", "softmax-mixture-loss", "smoothing"])
def test_every_mixing_and_loss_learns_the_labels(params):
    X, Y = label_data()
    model = MoEClassifier(**dict(FAST, **params)).fit(X, Y)
    X_test, Y_test = label_data(400, seed=1)
    assert f1_score(Y_test, model.predict(X_test), average="micro") > 0.85
    assert np.isfinite(model.history_["valid_specialization"]).all()


def test_label_smoothing_makes_the_probabilities_less_confident():
    X, Y = label_data()
    sharp = MoEClassifier(**FAST).fit(X, Y).predict_proba(X)
    smooth = MoEClassifier(**dict(FAST, label_smoothing=0.3)).fit(X, Y).predict_proba(X)
    # A smoothed target puts 0.15 on the other value: the optimum stays inside [0.15, 0.85],
    # which a row's probability overshoots a little at most (measured: mean 0.34, at most
    # 0.40 from 0.5 over four seeds, against 0.49 and 0.50 unsmoothed).
    assert np.abs(smooth - 0.5).mean() < 0.36 < np.abs(sharp - 0.5).mean()
    assert np.abs(smooth - 0.5).max() < 0.45 < np.abs(sharp - 0.5).max()


def test_a_sparse_indicator_matrix_fits_as_the_dense_one():
    X, Y = label_data(120)
    dense = MoEClassifier(**SHORT).fit(X, Y)
    sparse = MoEClassifier(**SHORT).fit(X, sp.csr_matrix(Y))
    np.testing.assert_array_equal(sparse.predict_proba(X), dense.predict_proba(X))


def test_rows_of_weight_zero_do_not_teach_the_labels():
    X, Y = label_data(400)
    flipped = np.vstack([Y, 1 - Y])  # every row again with every label wrong
    X_twice = np.vstack([X, X])
    weight = np.r_[np.ones(len(X)), np.zeros(len(X))]
    X_test, Y_test = label_data(400, seed=1)
    weighted = MoEClassifier(**FAST).fit(X_twice, flipped, sample_weight=weight)
    assert f1_score(Y_test, weighted.predict(X_test), average="micro") > 0.85
    unweighted = MoEClassifier(**FAST).fit(X_twice, flipped)
    assert f1_score(Y_test, unweighted.predict(X_test), average="micro") < 0.75


def test_pickle_and_save_load_round_trip(fitted, tmp_path):
    model, X, _ = fitted
    expected = model.predict_proba(X)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).predict_proba(X), expected)
    model.save(tmp_path / "labels.moe")
    loaded = sklearn_moe.load(tmp_path / "labels.moe")
    np.testing.assert_array_equal(loaded.predict_proba(X), expected)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_a_file_whose_multilabel_classes_are_not_label_indices_is_refused(fitted, tmp_path):
    model, _, _ = fitted
    model.save(tmp_path / "labels.moe")

    def relabel(document):
        classes = document["fitted"]["classes_"]
        classes["data"] = [5, 6, 7]

    rewrite_metadata(tmp_path / "labels.moe", tmp_path / "bad.moe", relabel)
    with safetensors.safe_open(str(tmp_path / "bad.moe"), framework="pt") as handle:
        assert json.loads(handle.metadata()[KEY])["fitted"]["_y_ndim"] == 2
    with pytest.raises(ValueError, match="_y_ndim"):
        sklearn_moe.load(tmp_path / "bad.moe")


def test_warm_start_continues_on_as_many_labels_and_refuses_others(fitted):
    _, X, Y = fitted
    model = MoEClassifier(**dict(SHORT, warm_start=True)).fit(X, Y)
    model.fit(X, Y)
    before = model.predict_proba(X)
    with pytest.raises(ValueError, match="y has 2 labels but the model was fitted on 3"):
        model.fit(X, Y[:, :2])
    with pytest.raises(ValueError, match="fitted on a multilabel y of 3 labels, y now has shape"):
        model.fit(X, Y[:, 0])
    np.testing.assert_array_equal(model.predict_proba(X), before)  # the refused fits left it as it was
    single = MoEClassifier(**dict(SHORT, warm_start=True)).fit(X, Y[:, 0])
    with pytest.raises(ValueError, match="fitted on one label per row"):
        single.fit(X, Y)


def test_score_refuses_a_target_of_the_other_kind(fitted):
    model, X, Y = fitted
    with pytest.raises(ValueError, match=r"indicator matrix of shape \(n_samples, 3\), got \(300, 2\)"):
        model.score(X, Y[:, :2])
    with pytest.raises(ValueError, match=r"indicator matrix of shape \(n_samples, 3\), got \(300,\)"):
        model.score(X, Y[:, 0])
    single = MoEClassifier(**SHORT).fit(X, Y[:, 0])
    with pytest.raises(ValueError, match="fitted on one label per row"):
        single.score(X, Y)


def test_scoring_and_diagnostics_refuse_a_label_matrix_of_other_values(fitted):
    """fit refuses -1/+1 labels, and so do score, the routing report and the heatmap: they
    had scored such a matrix 0.0 (and drawn shares of -43) without a word."""
    model, X, Y = fitted
    for coded in (2 * Y - 1, 2 * Y):
        with pytest.raises(ValueError, match=r"indicator matrix of 0 and 1.*Map it to 0 and 1"):
            model.score(X, coded)
        with pytest.raises(ValueError, match=r"indicator matrix of 0 and 1"):
            model.routing_report(X, coded)


def test_a_sparse_label_matrix_serves_the_diagnostics_as_the_dense_one(fitted):
    model, X, Y = fitted
    sparse = sp.csr_matrix(Y)
    assert model.score(X, sparse) == model.score(X, Y)
    pd.testing.assert_frame_equal(model.routing_report(X, sparse), model.routing_report(X, Y))


def test_a_matrix_of_other_values_than_0_and_1_is_refused():
    X, Y = label_data(60)
    with pytest.raises(ValueError, match="'multiclass-multioutput'.*MultiOutputClassifier"):
        MoEClassifier(**SHORT).fit(X, Y + Y[:, :1])  # 0, 1 and 2
    with pytest.raises(ValueError, match=r"indicator matrix of 0 and 1.*holds \[-1, 1\].*\(Y == 1\)"):
        MoEClassifier(**SHORT).fit(X, 2 * Y - 1)


def test_model_selection_takes_a_multilabel_target():
    X, Y = label_data(150)
    scores = cross_val_score(MoEClassifier(**SHORT), X, Y, cv=3, scoring="f1_micro")
    assert scores.shape == (3,) and ((scores > 0) & (scores <= 1)).all()
    search = GridSearchCV(MoEClassifier(**SHORT), {"n_experts": [2, 4]}, cv=2).fit(X, Y)
    assert search.best_estimator_.predict(X).shape == Y.shape


def test_routing_report_scores_each_expert_on_the_label_matrix(fitted):
    model, X, Y = fitted
    report = model.routing_report(X, Y)
    top1 = model.route(X).argmax(axis=1)
    busiest = int(np.bincount(top1).argmax())
    rows = top1 == busiest
    assert report.loc[busiest, "score"] == pytest.approx(accuracy_score(Y[rows], model.predict(X[rows])))


@needs("matplotlib")
def test_heatmap_has_a_column_per_label(fitted):
    from sklearn_moe.plotting import plot_routing_heatmap

    model, X, Y = fitted
    axes = plot_routing_heatmap(model, X, Y).axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["0", "1", "2"]
    table = axes.images[0].get_array()
    top1 = model.route(X).argmax(axis=1)
    has_label_1 = Y[:, 1] == 1
    served = np.bincount(top1[has_label_1], minlength=model.n_experts)
    np.testing.assert_allclose(table[:, 1], served / has_label_1.sum())
    np.testing.assert_allclose(table.sum(axis=0), 1.0)
    sparse = plot_routing_heatmap(model, X, sp.csr_matrix(Y)).axes[0].images[0].get_array()
    np.testing.assert_array_equal(sparse, table)
    with pytest.raises(ValueError, match=r"indicator matrix of 0 and 1"):
        plot_routing_heatmap(model, X, 2 * Y - 1)
    with pytest.raises(ValueError, match=r"shape \(n_samples, 3\)"):
        plot_routing_heatmap(model, X, Y[:, 0])
    single = MoEClassifier(**SHORT).fit(X, Y[:, 0])
    with pytest.raises(ValueError, match=r"fitted on one label per row: pass y of shape \(n_samples,\)"):
        plot_routing_heatmap(single, X, Y)


def test_a_column_vector_is_still_one_label_per_row():
    X, Y = label_data(120)
    with pytest.warns(Warning, match="column-vector y"):
        column = MoEClassifier(**SHORT).fit(X, Y[:, :1])
    assert column.predict(X).shape == (120,)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        flat = MoEClassifier(**SHORT).fit(X, Y[:, 0])
    np.testing.assert_array_equal(column.predict_proba(X), flat.predict_proba(X))


# ----------------------------------------------------------------------------- the engine


def test_mixture_label_logits_are_the_logits_of_the_mixed_probabilities():
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(5, 3, generator=generator) * 4
    outputs[0, 0] = 60.0  # confident experts stay finite
    outputs[1, 0] = -60.0
    rows = torch.tensor([0, 0, 1, 2, 2])
    weights = torch.tensor([0.3, 0.7, 1.0, 0.5, 0.5])
    logits = mixture_label_logits(outputs, rows, weights, 3)
    assert torch.isfinite(logits).all()
    expected = torch.zeros(3, 3, dtype=torch.float64).index_add(
        0, rows, weights.double().unsqueeze(1) * torch.sigmoid(outputs.double()))
    torch.testing.assert_close(torch.sigmoid(logits.double()), expected, rtol=1e-5, atol=1e-6)


def test_a_bernoulli_mixture_module_mixes_the_experts_label_probabilities():
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 3, n_experts=3, top_k=3, router="softmax", expert_hidden=(8,),
                              output="bernoulli_mixture").eval()
    x = torch.randn(10, 4)
    out = module(x)
    with torch.no_grad():
        each = torch.sigmoid(module.experts(x.unsqueeze(0).expand(3, -1, -1).contiguous()))  # (expert, row, label)
    mixed = (out.gates.t().unsqueeze(2) * each).sum(dim=0)
    torch.testing.assert_close(torch.sigmoid(out.output), mixed, rtol=1e-5, atol=1e-6)


def test_the_multilabel_loss_is_the_binary_cross_entropy_of_smoothed_labels():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]])
    labels = torch.tensor([[1, 0], [0, 1]], dtype=torch.uint8)
    torch.testing.assert_close(MultilabelLoss()(logits, labels),
                               F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="none"))
    smoothed = torch.tensor([[0.95, 0.05], [0.05, 0.95]])
    torch.testing.assert_close(MultilabelLoss(0.1)(logits, labels),
                               F.binary_cross_entropy_with_logits(logits, smoothed, reduction="none"))


@pytest.mark.gpu
@pytest.mark.parametrize("mixing", ["logits", "probabilities"])
def test_a_multilabel_fit_on_cuda_learns_the_labels(mixing):
    X, Y = label_data()
    model = MoEClassifier(**dict(FAST, device="cuda", mixing=mixing)).fit(X, Y)
    assert model.module_.router.gate.weight.device.type == "cuda"
    X_test, Y_test = label_data(400, seed=1)
    assert model.predict(X_test).shape == Y_test.shape
    assert f1_score(Y_test, model.predict(X_test), average="micro") > 0.85
