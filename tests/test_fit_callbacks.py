"""``fit(..., callbacks=...)``: per-fit skorch callbacks (the hook Optuna pruning uses)."""

import pickle

import numpy as np
import pytest
from skorch.callbacks import Callback

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
