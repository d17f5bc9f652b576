"""The ``callbacks`` constructor parameter: skorch callbacks on every fit, kept when they pickle."""

import pickle
import threading
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from skorch.callbacks import Callback

import sklearn_moe
from sklearn_moe import MoEClassifier, MoERegressor

from .conftest import FAST


class EpochCounter(Callback):
    def __init__(self):
        self.epochs_ = 0

    def on_epoch_end(self, net, **kwargs):
        self.epochs_ += 1


class HoldsALock(EpochCounter):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()  # cannot be pickled


def test_callbacks_run_on_every_fit_and_stay_on_the_model(regression_data):
    X, y = regression_data
    counter, named = EpochCounter(), EpochCounter()
    fit_only = EpochCounter()
    model = MoERegressor(**dict(FAST, max_epochs=4), callbacks=[counter, ("named", named)])
    model.fit(X, y, callbacks=[fit_only])
    assert counter.epochs_ == named.epochs_ == fit_only.epochs_ == model.n_iter_ == 4
    names = dict(model.net_.callbacks_)
    assert names["callback_0"] is counter and names["named"] is named
    assert "fit_callback_0" not in names  # fit-only callbacks leave with the fit
    restored = pickle.loads(pickle.dumps(model))
    assert dict(restored.net_.callbacks_)["named"].epochs_ == 4
    np.testing.assert_array_equal(restored.predict(X), model.predict(X))
    copy = clone(model)
    assert len(copy.callbacks) == 2 and copy.callbacks[0] is not counter
    model.fit(X, y)
    assert counter.epochs_ == 8


def test_an_unpicklable_callback_is_used_then_removed_with_a_warning(classification_data):
    X, y = classification_data
    logger = HoldsALock()
    with pytest.warns(UserWarning, match=r"'callback_0' \(HoldsALock\) cannot be pickled.*removed from the "
                                         r"trained net.*set_params\(callbacks=None\).*fit\(X, y, callbacks") as caught:
        model = MoEClassifier(**dict(FAST, max_epochs=3), callbacks=[logger]).fit(X, y)
    assert caught[0].filename == __file__  # said of the line that called fit
    assert logger.epochs_ == 3
    assert "callback_0" not in dict(model.net_.callbacks_)
    pickle.dumps(model.net_)
    with pytest.raises(TypeError, match="pickle"):  # the parameter still holds the user's object
        pickle.dumps(model)
    model.set_params(callbacks=None)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).predict(X), model.predict(X))


def test_save_leaves_callbacks_out_with_a_warning(tmp_path, regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, max_epochs=2), callbacks=[EpochCounter()]).fit(X, y)
    with pytest.warns(UserWarning, match="does not store callbacks") as caught:
        model.save(tmp_path / "model.moe")
    assert caught[0].filename == __file__
    loaded = sklearn_moe.load(tmp_path / "model.moe")
    assert loaded.callbacks is None
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.set_params(callbacks=None).save(tmp_path / "plain.moe")


@pytest.mark.parametrize("callbacks, message", [
    ([object()], r"callbacks\[0\] is <object"),
    ([EpochCounter, ], "not a skorch.callbacks.Callback instance"),
    ("logger", "callbacks must be a list of skorch Callback instances; got 'logger'"),
])
def test_invalid_callbacks_are_rejected_before_training(regression_data, callbacks, message):
    X, y = regression_data
    with pytest.raises((TypeError, ValueError), match=message):
        MoERegressor(**FAST, callbacks=callbacks).fit(X, y)


def test_tensorboard_logs_to_a_local_directory(tmp_path, regression_data):
    pytest.importorskip("tensorboard")
    from skorch.callbacks import TensorBoard
    from torch.utils.tensorboard import SummaryWriter

    X, y = regression_data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the writer does not pickle: it leaves the model
        MoERegressor(**dict(FAST, max_epochs=3), callbacks=[TensorBoard(SummaryWriter(tmp_path))]).fit(X, y)
    assert list(tmp_path.glob("events.out.tfevents.*"))
