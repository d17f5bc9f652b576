"""partial_fit: one epoch per call from the fitted model, as scikit-learn's MLP estimators
(scikit-learn's own partial_fit checks run in test_common.py)."""

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from skorch.callbacks import Callback

import sklearn_moe
from sklearn_moe import MoEClassifier, MoERegressor

from .conftest import FAST

pytestmark = pytest.mark.filterwarnings("ignore::sklearn_moe.callbacks.ExpertCollapseWarning")


def regression(n=1200, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 4))
    return X, X[:, 0] * 2 + np.sin(3 * X[:, 1])


def stream(model, X, y, passes, n_chunks=4, **kwargs):
    """``passes`` passes over ``(X, y)`` in ``n_chunks`` partial_fit calls each."""
    for _ in range(passes):
        for chunk in np.array_split(np.arange(len(X)), n_chunks):
            model.partial_fit(X[chunk], y[chunk], **kwargs)
    return model


def test_batches_of_a_stream_train_the_regressor():
    X, y = regression()
    model = stream(MoERegressor(**FAST), X[:1000], y[:1000], passes=8)
    assert model.score(X[1000:], y[1000:]) > 0.9
    assert model.n_iter_ == 32 and model.history_["epoch"].tolist() == list(range(1, 33))
    assert "valid_loss" not in model.history_  # no rows held out, no early stopping
    assert model.history_["train_loss"].iloc[-4:].mean() < 0.2 * model.history_["train_loss"].iloc[:4].mean()


def test_the_optimizer_goes_on_at_the_current_learning_rate():
    X, y = regression(400)
    model = MoERegressor(**dict(FAST, batch_size=50)).partial_fit(X, y)
    model.partial_fit(X, y)
    optimizer = model.net_.optimizer_
    steps = {float(state["step"]) for state in optimizer.state.values()}
    assert steps == {16.0}  # AdamW's running averages over both calls' 8 + 8 batches
    model.set_params(learning_rate=1e-3).partial_fit(X, y)
    assert [group["lr"] for group in model.net_.optimizer_.param_groups] == pytest.approx(
        [1e-3 * model.router_lr_scale, 1e-3])
    assert {float(state["step"]) for state in model.net_.optimizer_.state.values()} == {24.0}


def test_partial_fit_continues_a_fit_at_the_learning_rate_not_the_schedules_end():
    X, y = regression(600)
    model = MoERegressor(**dict(FAST, lr_schedule="cosine", early_stopping=False, max_epochs=10)).fit(X, y)
    last_loss = model.history_["train_loss"].iloc[-1]
    model.partial_fit(X, y)
    assert model.n_iter_ == 11
    assert model.net_.optimizer_.param_groups[-1]["lr"] == pytest.approx(model.learning_rate)
    fresh = MoERegressor(**FAST).partial_fit(X, y)
    assert model.history_["train_loss"].iloc[-1] < min(2 * last_loss, 0.5 * fresh.history_["train_loss"].iloc[0])


def test_the_temperature_anneals_over_the_calls_as_over_fits_epochs():
    X, y = regression(200)
    params = dict(FAST, router="topk", temperature=1.0, temperature_final=0.25, max_epochs=4, early_stopping=False)
    fitted = MoERegressor(**params).fit(X, y)
    streamed = stream(MoERegressor(**params), X, y, passes=1)
    np.testing.assert_allclose(streamed.history_["temperature"], fitted.history_["temperature"])
    assert streamed.history_["temperature"].iloc[-1] == pytest.approx(0.25)


def test_the_same_calls_give_the_same_model():
    X, y = regression(300)
    first = stream(MoERegressor(**FAST), X, y, passes=2)
    second = stream(MoERegressor(**FAST), X, y, passes=2)
    np.testing.assert_array_equal(first.predict(X), second.predict(X))


class BatchOrder(Callback):
    """Records the first input value of every training batch."""

    def __init__(self):
        self.firsts = []

    def on_batch_begin(self, net, batch=None, training=False, **kwargs):
        if training:
            self.firsts.append(float(batch[0]["x"][0, 0]))


def test_every_call_draws_its_own_batches_reproducibly():
    X, y = regression(200)
    orders = []
    for _ in range(2):
        recorder = BatchOrder()
        model = MoERegressor(**dict(FAST, callbacks=[recorder]))
        model.partial_fit(X, y).partial_fit(X, y)
        orders.append(recorder.firsts)
    first_call, second_call = orders[0][:7], orders[0][7:]
    assert len(first_call) == len(second_call) == 7 and first_call != second_call
    assert orders[0] == orders[1]  # the same calls, the same batches


def test_a_refused_call_leaves_the_model_as_it_was():
    X, y = regression(300)
    model = MoERegressor(**FAST).partial_fit(X, y)
    before = model.predict(X)
    with pytest.raises(ValueError, match="features"):
        model.partial_fit(X[:, :3], y)
    with pytest.raises(ValueError, match="y has 2 targets but the fitted model"):
        model.partial_fit(X, np.column_stack([y, y]))
    with pytest.raises(ValueError, match=r"partial_fit\): the hyperparameters now describe another network"):
        model.set_params(n_experts=3).partial_fit(X, y)
    np.testing.assert_array_equal(model.predict(X), before)
    assert model.n_iter_ == 1


def test_a_target_constant_in_the_first_call_is_learned_once_it_varies():
    """A constant target is predicted exactly (scale 0); a later call whose targets vary
    re-encodes it, instead of predicting the first call's constant forever, for partial_fit
    and warm_start alike. Each output is re-encoded on its own."""
    X, y = regression(600)
    stream_model = MoERegressor(**FAST).partial_fit(X[:50], np.full(50, 3.0))
    np.testing.assert_array_equal(stream_model.predict(X[:5]), 3.0)
    stream(stream_model, X[:500], y[:500], passes=6)
    assert stream_model._y_scale[0] > 0 and stream_model.score(X[500:], y[500:]) > 0.8
    warm = MoERegressor(**FAST, warm_start=True).fit(X[:500], np.full(500, 3.0))
    assert warm.fit(X[:500], y[:500]).score(X[500:], y[500:]) > 0.8
    # Two outputs, the second constant throughout: it stays exact.
    two = MoERegressor(**FAST).partial_fit(X[:50], np.column_stack([np.full(50, 3.0), np.full(50, -1.0)]))
    stream(two, X[:500], np.column_stack([y[:500], np.full(500, -1.0)]), passes=6)
    assert two._y_scale[0] > 0 and two._y_scale[1] == 0
    np.testing.assert_array_equal(two.predict(X[500:])[:, 1], -1.0)
    assert np.corrcoef(two.predict(X[500:])[:, 0], y[500:])[0, 1] > 0.9


def test_a_failed_call_that_re_encoded_the_target_restores_the_encoding():
    X, y = regression(300)
    model = MoERegressor(**FAST).partial_fit(X, np.full(300, 3.0))

    class Fails(Callback):
        def on_epoch_end(self, net, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        model.set_params(callbacks=[Fails()]).partial_fit(X, y)
    assert model._y_mean[0] == 3.0 and model._y_scale[0] == 0.0
    np.testing.assert_array_equal(model.set_params(callbacks=None).predict(X[:5]), 3.0)


@pytest.mark.parametrize("call", ["partial_fit", "warm_start"])
def test_a_continued_fit_that_fails_on_y_keeps_the_columns_names(call):
    """The input check of an encoded table's continued fit takes feature_names_in_ off before
    it checks y: a y of another length had left the model matching columns by position, so
    swapped columns were predicted silently wrong."""
    X, y = regression(300)
    frame = pd.DataFrame(X[:, :3], columns=["a", "b", "c"]).assign(kind=np.where(X[:, 3] > 0, "p", "q"))
    model = MoERegressor(**FAST, warm_start=call == "warm_start").fit(frame, y)
    continue_fit = model.partial_fit if call == "partial_fit" else model.fit
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        continue_fit(frame, y[:-1])
    assert model.feature_names_in_.tolist() == ["a", "b", "c", "kind"]
    with pytest.raises(ValueError, match="Feature names must be in the same order"):
        model.predict(frame[["b", "a", "c", "kind"]])


def test_pickled_and_loaded_models_train_on(tmp_path):
    X, y = regression(300)
    model = MoERegressor(**FAST).partial_fit(X, y)
    unpickled = pickle.loads(pickle.dumps(model)).partial_fit(X, y)
    assert unpickled.n_iter_ == 2
    model.save(tmp_path / "streamed.moe")
    loaded = sklearn_moe.load(tmp_path / "streamed.moe").partial_fit(X, y)  # a fresh optimizer state
    assert loaded.n_iter_ == 2
    assert loaded.history_["train_loss"].iloc[-1] < loaded.history_["train_loss"].iloc[0]


# ----------------------------------------------------------------------------- classifier


def classification(n=800, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 3))
    return X, np.array(["low", "mid", "high"])[np.digitize(X[:, 0] + 0.5 * X[:, 1], [-0.6, 0.6])]


def test_the_classifier_learns_every_class_from_batches_of_single_classes():
    X, y = classification()
    model = MoEClassifier(**FAST)
    classes = ["high", "low", "mid"]
    for _ in range(10):
        for label in classes:  # each call sees one class only
            rows = y[:600] == label
            model.partial_fit(X[:600][rows], y[:600][rows], classes=classes)
    np.testing.assert_array_equal(model.classes_, classes)
    assert model.predict_proba(X[600:]).shape == (200, 3)
    assert model.score(X[600:], y[600:]) > 0.65  # the most frequent class is 0.415 of the rows


def test_the_classifier_takes_its_classes_from_the_first_call():
    X, y = classification()
    model = MoEClassifier(**FAST)
    with pytest.raises(ValueError, match="classes must be passed on the first call to partial_fit"):
        model.partial_fit(X, y)
    model.partial_fit(X[y != "mid"], y[y != "mid"], classes=np.array(["low", "mid", "high"]))
    np.testing.assert_array_equal(model.classes_, ["high", "low", "mid"])  # sorted, "mid" included
    model.partial_fit(X, y)  # later calls need no classes
    with pytest.raises(ValueError, match=r"classes=\['low', 'mid'\] differs from the classes_ of the first call"):
        model.partial_fit(X, y, classes=["low", "mid"])
    with pytest.raises(ValueError, match=r"y has classes \['top'\] that the model does not know"):
        model.partial_fit(X, np.where(y == "high", "top", y))
    assert model.n_iter_ == 2


def test_a_first_call_whose_y_is_not_among_its_classes_says_so():
    X, y = classification()
    with pytest.raises(ValueError, match=r"y has classes \['mid'\] that are not among classes=\['high', 'low'\]"):
        MoEClassifier(**FAST).partial_fit(X, y, classes=["low", "high"])


def test_a_warm_start_fit_of_one_class_is_refused_as_a_first_fit_is():
    X, y = classification()
    model = MoEClassifier(**FAST, warm_start=True).fit(X, y)
    with pytest.raises(ValueError, match="at least 2 classes in y, but y contains only one class: 'low'"):
        model.fit(X[y == "low"], y[y == "low"])
    model.partial_fit(X[y == "low"], y[y == "low"])  # a stream's batch may hold one class


def test_a_continued_fit_keeps_the_columns_of_the_first():
    """An encoded table (a categorical column) continued with an array, or with columns in
    another order: the fitted names stay, and another order is refused, not learned."""
    import pandas as pd

    X, y = regression(300)
    frame = pd.DataFrame(X, columns=list("abcd")).assign(kind=np.where(X[:, 0] > 0, "up", "down"))
    model = MoERegressor(**FAST).fit(frame, y)
    with pytest.warns(UserWarning, match="X does not have valid feature names"):
        model.partial_fit(frame.to_numpy(), y)
    assert model.feature_names_in_.tolist() == list(frame.columns) and model.n_features_in_ == 5
    with pytest.raises(ValueError, match="feature names"):
        model.partial_fit(frame[["b", "a", "c", "d", "kind"]], y)
    with pytest.raises(ValueError, match="feature names"):
        model.set_params(warm_start=True).fit(frame[["b", "a", "c", "d", "kind"]], y)
    assert model.feature_names_in_.tolist() == list(frame.columns)


def test_a_multilabel_stream_needs_no_classes():
    X, _ = classification()
    Y = np.column_stack([X[:, 0] > 0, X[:, 1] > 0]).astype(int)
    model = stream(MoEClassifier(**FAST), X, Y, passes=3)
    assert model.predict(X).shape == Y.shape and model._multilabel
    assert (model.predict(X) == Y).mean() > 0.85
    assert MoEClassifier(**FAST).partial_fit(X, Y, classes=range(2)).classes_.tolist() == [0, 1]
    # Label names would be dropped silently: a multilabel model's classes_ are the columns' indices.
    for classes in ([0, 1, 2], ["rain", "wind"], [1, 0], [0.0, 1.5]):
        with pytest.raises(ValueError, match=r"classes must be the label columns' indices 0 \.\. 1 of the multilabel"):
            MoEClassifier(**FAST).partial_fit(X, Y, classes=classes)


def test_class_weight_applies_to_single_class_batches():
    X, y = classification()
    model = MoEClassifier(**dict(FAST, class_weight={"high": 0.0}))
    with pytest.raises(ValueError, match="every row of this partial_fit batch weight 0"):
        model.partial_fit(X[y == "high"], y[y == "high"], classes=["high", "low", "mid"])
    model.partial_fit(X[y == "low"], y[y == "low"], classes=["high", "low", "mid"])
    assert model.n_iter_ == 1


@pytest.mark.gpu
def test_partial_fit_on_cuda_goes_on_from_its_optimizer():
    X, y = regression(400)
    model = MoERegressor(**dict(FAST, device="cuda", batch_size=50)).partial_fit(X, y).partial_fit(X, y)
    assert {float(state["step"]) for state in model.net_.optimizer_.state.values()} == {16.0}
    assert next(model.module_.parameters()).device.type == "cuda"
    assert torch.isfinite(torch.as_tensor(model.predict(X))).all()
