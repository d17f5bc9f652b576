"""``fit(..., callbacks=...)``: per-fit skorch callbacks (the hook Optuna pruning uses)."""

import pickle

import numpy as np
import pytest
from sklearn.metrics import get_scorer
from skorch.callbacks import BatchScoring, Callback, EpochScoring

from sklearn_moe import MoEClassifier, MoERegressor


class RecordValidLoss(Callback):
    def __init__(self):
        self.losses = []

    def on_epoch_end(self, net, **kwargs):
        self.losses.append(net.history[-1, "valid_loss"])


class StopAtEpoch(Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            raise KeyError("stop requested by the test")


@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier])
def test_callback_sees_every_epoch_and_is_not_kept(estimator_class, regression_data, classification_data):
    X, y = regression_data if estimator_class is MoERegressor else classification_data
    recorder = RecordValidLoss()
    model = estimator_class(n_experts=2, max_epochs=4, n_iter_no_change=10, random_state=0)
    model.fit(X, y, callbacks=[recorder])
    assert recorder.losses == list(model.history_["valid_loss"])
    assert len(recorder.losses) == model.n_iter_ == 4
    assert all(not isinstance(cb, RecordValidLoss) for _, cb in model.net_.callbacks_)
    assert b"RecordValidLoss" not in pickle.dumps(model)


def test_named_callback_pairs_are_accepted(regression_data):
    X, y = regression_data
    recorder = RecordValidLoss()
    MoERegressor(n_experts=2, max_epochs=2, random_state=0).fit(X, y, callbacks=[("record", recorder)])
    assert len(recorder.losses) == 2


def test_callbacks_do_not_change_the_fit(regression_data):
    X, y = regression_data
    plain = MoERegressor(n_experts=2, max_epochs=3, random_state=0).fit(X, y)
    observed = MoERegressor(n_experts=2, max_epochs=3, random_state=0).fit(X, y, callbacks=[RecordValidLoss()])
    np.testing.assert_array_equal(plain.predict(X), observed.predict(X))


@pytest.mark.parametrize("bad", [RecordValidLoss(), [print], ["not a callback"], 3])
def test_bad_callbacks_are_rejected(regression_data, bad):
    X, y = regression_data
    with pytest.raises(TypeError, match="callback"):
        MoERegressor(n_experts=2, max_epochs=1).fit(X, y, callbacks=bad)


def test_callback_raising_leaves_estimator_unfitted(regression_data):
    X, y = regression_data
    model = MoERegressor(n_experts=2, max_epochs=5, random_state=0)
    with pytest.raises(KeyError, match="stop requested"):
        model.fit(X, y, callbacks=[StopAtEpoch(2)])
    assert not hasattr(model, "net_")


MULTILABEL_ROWS = np.random.RandomState(3).normal(size=(160, 4))


@pytest.mark.parametrize("task, scoring", [("regression", "r2"), ("multiclass", "accuracy"),
                                           ("multilabel", "f1_macro")])
def test_skorch_scoring_callbacks_score_the_model(task, scoring):
    # EpochScoring and BatchScoring call a scikit-learn scorer with the net: it predicts as
    # the estimator does (on the network's own targets), so the last epoch's training
    # score is the fitted model's on the same rows.
    X = MULTILABEL_ROWS
    targets = {"regression": X[:, 0] + np.sin(2 * X[:, 1]), "multiclass": (X[:, 0] > 0) + (X[:, 1] > 0.5).astype(int),
               "multilabel": np.stack([X[:, 0] > 0, X[:, 1] + X[:, 2] > 0], axis=1).astype(int)}
    y = targets[task]
    estimator_class = MoERegressor if task == "regression" else MoEClassifier
    callbacks = [EpochScoring(scoring, lower_is_better=False, on_train=True, name="epoch_score"),
                 BatchScoring(scoring, lower_is_better=False, on_train=True, name="batch_score")]
    model = estimator_class(n_experts=2, expert_hidden=(8,), max_epochs=6, early_stopping=False, random_state=0,
                            callbacks=callbacks).fit(X, y)
    assert model.history_["epoch_score"].iloc[-1] == pytest.approx(get_scorer(scoring)(model, X, y), abs=1e-6)
    assert np.isfinite(model.history_["batch_score"]).all()
    # And on the validation rows (skorch's default), once per epoch.
    scored = estimator_class(n_experts=2, expert_hidden=(8,), max_epochs=3, random_state=0,
                             callbacks=[EpochScoring(scoring, lower_is_better=False)]).fit(X, y)
    assert scored.history_[scoring].between(-1, 1).all() and len(scored.history_) == 3
