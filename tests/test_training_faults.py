"""Training faults: non-finite losses roll back, divergence raises, Ctrl-C keeps a usable model."""

import signal
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from skorch.callbacks import Callback

from sklearn_moe import MoEClassifier, MoERegressor, TrainingDivergedError
from sklearn_moe._guard import MAX_ROLLBACKS

# 200 rows, 10% validation, batch 32: 6 training batches per epoch.
BATCHES_PER_EPOCH = 6
# A constant learning rate and one for the router too: a rollback's 10x cut is then the rate at the end.
PARAMS = dict(n_experts=3, top_k=2, expert_hidden=(8,), batch_size=32, max_epochs=6, learning_rate=1e-2,
              lr_schedule="constant", router_lr_scale=1.0, n_iter_no_change=50, device="cpu", random_state=0)


class TrainingBatchCounter(Callback):
    """Counts training batches over the whole fit (rollbacks included)."""

    def initialize(self):
        self.count = -1
        return super().initialize()

    def on_batch_begin(self, net, training=None, **kwargs):
        if training:
            self.count += 1


class PoisonOutput(TrainingBatchCounter):
    """Make the module's output NaN on the given training batches (counted over the fit)."""

    def __init__(self, batches):
        self.batches = set(batches)

    def on_train_begin(self, net, **kwargs):
        def hook(module, args, output):
            if module.training and self.count in self.batches:
                return output._replace(output=output.output * float("nan"))
            return output

        self.handle = net.module_.register_forward_hook(hook)

    def on_train_end(self, net, **kwargs):
        self.handle.remove()


class CorruptRouterAfter(TrainingBatchCounter):
    """Fill the router's weight with inf after the given training batch's optimizer step."""

    def __init__(self, batch):
        self.batch = batch

    def on_batch_end(self, net, training=None, **kwargs):
        if training and self.count == self.batch:
            with torch.no_grad():
                net.module_.router.gate.weight.fill_(float("inf"))


class InterruptAt(TrainingBatchCounter):
    """Ctrl-C (a real SIGINT, whose handler raises KeyboardInterrupt) at the given training
    batch."""

    def __init__(self, batch):
        self.batch = batch

    def on_batch_end(self, net, training=None, **kwargs):
        if training and self.count == self.batch:
            signal.raise_signal(signal.SIGINT)


class RecordEpochs(Callback):
    """Weights and validation loss after every completed epoch, and the initial weights."""

    def on_train_begin(self, net, **kwargs):
        self.initial = _weights(net.module_)
        self.weights, self.valid_losses = [], []

    def on_epoch_end(self, net, **kwargs):
        self.weights.append(_weights(net.module_))
        self.valid_losses.append(net.history[-1].get("valid_loss"))


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_weights_equal(module, expected):
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)


def test_a_nan_loss_rolls_back_and_training_recovers(regression_data):
    X, y = regression_data
    poison = PoisonOutput({BATCHES_PER_EPOCH * 2 + 3})  # fourth batch of the third epoch
    model = MoERegressor(**PARAMS)
    with pytest.warns(RuntimeWarning, match="non-finite training loss .* epoch 3: rolled back") as record:
        model.fit(X, y, callbacks=[poison])
    rollbacks = [w for w in record if "rolled back" in str(w.message)]
    assert len(rollbacks) == 1 and rollbacks[0].filename == __file__  # said of the line that called fit
    assert model.n_iter_ == PARAMS["max_epochs"]
    assert list(model.history_["epoch"]) == list(range(1, PARAMS["max_epochs"] + 1))
    assert np.isfinite(model.history_["train_loss"]).all()
    assert model.net_.optimizer_.param_groups[0]["lr"] == pytest.approx(PARAMS["learning_rate"] * 0.1)
    assert np.isfinite(model.predict(X)).all()
    assert model.history_["train_loss"].iloc[-1] < model.history_["train_loss"].iloc[0]


def test_the_rolled_back_epoch_restarts_from_the_last_good_weights(regression_data):
    """Poisoning the first batch of epoch 2 must leave epoch 2 starting from epoch 1's weights."""
    X, y = regression_data
    epochs = RecordEpochs()
    starts = []

    class RecordEpochStart(Callback):
        def on_epoch_begin(self, net, **kwargs):
            starts.append(_weights(net.module_))

    poison = PoisonOutput({BATCHES_PER_EPOCH})
    with pytest.warns(RuntimeWarning, match="rolled back"):
        MoERegressor(**PARAMS).fit(X, y, callbacks=[poison, epochs, RecordEpochStart()])
    # epoch 1, the failed epoch 2, the retried epoch 2: both attempts start from epoch 1's end.
    for expected in (starts[1], starts[2]):
        for key, value in epochs.weights[0].items():
            torch.testing.assert_close(expected[key], value, rtol=0, atol=0)


def test_non_finite_weights_at_the_end_of_an_epoch_roll_back(regression_data):
    X, y = regression_data
    corrupt = CorruptRouterAfter(BATCHES_PER_EPOCH - 1)  # the last step of epoch 1
    model = MoERegressor(**PARAMS)
    with pytest.warns(RuntimeWarning, match="epoch 1: rolled back"):
        model.fit(X, y, callbacks=[corrupt])
    assert torch.isfinite(model.module_.router.gate.weight).all()
    assert np.isfinite(model.predict(X)).all()


@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier])
def test_persistent_divergence_raises_and_leaves_the_estimator_unfitted(
        estimator_class, regression_data, classification_data):
    X, y = regression_data if estimator_class is MoERegressor else classification_data
    poison = PoisonOutput(range(10_000))
    model = estimator_class(**PARAMS)
    with pytest.warns(RuntimeWarning, match="rolled back") as record:
        # Each rollback lowers the rate of the one before: 1e-2 -> 1e-3 -> 1e-4 -> 1e-5.
        with pytest.raises(TrainingDivergedError, match=r"Training diverged.*reached 1e-05.*Try a lower learning_rate"):
            model.fit(X, y, callbacks=[poison])
    assert len([w for w in record if "rolled back" in str(w.message)]) == MAX_ROLLBACKS
    assert not hasattr(model, "net_")
    with pytest.raises(Exception, match="not fitted"):
        model.predict(X)


def test_divergence_error_is_a_runtime_error():
    assert issubclass(TrainingDivergedError, RuntimeError)


@pytest.mark.parametrize("params", [{}, {"early_stopping": False}])
@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier])
def test_a_finite_but_exploded_fit_is_warned_of(regression_data, estimator_class, params):
    """learning_rate=10: the losses stay finite but enormous, and the model is far worse than
    a constant prediction (R² -2e34); the fit had returned it without a word."""
    X, y = regression_data
    y = y if estimator_class is MoERegressor else (y > np.median(y)).astype(int)
    with pytest.warns(ConvergenceWarning, match=r"Training did not converge: the kept model's (validation|training) "
                                                r"loss, .* is over 10 times a constant prediction's .*learning_rate "
                                                r"\(now 10\)"):
        estimator_class(**dict(PARAMS, max_epochs=3, learning_rate=10.0), **params).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        estimator_class(**dict(PARAMS, max_epochs=3), **params).fit(X, y)


def test_the_warning_measures_a_constant_prediction_on_the_same_rows():
    """The yardstick is a constant prediction's loss on the scored rows with their weights:
    with one row in 20 of positive weight the validation loss is some 20 times its
    unweighted value, and a model that learned had been warned of."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(2000, 4))
    y = X[:, 0] + 2 * rng.normal(size=2000)
    weights = np.where(np.arange(len(y)) % 20 == 0, 1.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = MoERegressor(**dict(PARAMS, max_epochs=3)).fit(X, y, sample_weight=weights)
    assert model.history_["valid_loss"].min() > 10  # 10 times the standardised target's mean's loss


def test_rows_that_a_constant_predicts_exactly_are_no_divergence(regression_data):
    """A constant target, or a partial_fit batch of one class: the best constant's loss is
    all but 0 there, and the yardstick is at least an uninformed prediction's."""
    X, y = regression_data
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        MoERegressor(**PARAMS).fit(X, np.full(len(y), 3.0))
        MoERegressor(**dict(PARAMS, output="mixture_density")).fit(X, np.full(len(y), 3.0))
        classifier = MoEClassifier(**PARAMS)
        for label in (0, 1, 0, 1):
            classifier.partial_fit(X, np.full(len(y), label), classes=[0, 1])


def test_a_diverging_partial_fit_after_an_early_stopped_fit_is_warned_of(regression_data):
    """partial_fit adds its epoch to the fit's history: its own training loss is judged, not
    the fit's best validation loss."""
    X, y = regression_data
    model = MoERegressor(**dict(PARAMS, max_epochs=3)).fit(X, y)
    with pytest.warns(ConvergenceWarning, match="the kept model's training loss"):
        for _ in range(3):
            model.set_params(learning_rate=10.0).partial_fit(X, y)


def test_keyboard_interrupt_keeps_the_best_weights_so_far(regression_data):
    X, y = regression_data
    epochs = RecordEpochs()
    interrupted_in_epoch = 5
    model = MoERegressor(**PARAMS)
    # The interrupt goes on to the caller once the model is whole, saying what it kept.
    with pytest.raises(KeyboardInterrupt, match="interrupted after 4 complete epoch.*best weights so far"):
        model.fit(X, y, callbacks=[epochs, InterruptAt(BATCHES_PER_EPOCH * (interrupted_in_epoch - 1) + 2)])
    assert model.n_iter_ == interrupted_in_epoch - 1
    assert list(model.history_["epoch"]) == [1, 2, 3, 4]
    assert "train_loss" in model.history_ and np.isfinite(model.history_["train_loss"]).all()
    best = int(np.argmin(epochs.valid_losses))
    _assert_weights_equal(model.module_, epochs.weights[best])
    assert np.isfinite(model.predict(X)).all()


def test_keyboard_interrupt_without_early_stopping_keeps_the_last_completed_epoch(regression_data):
    X, y = regression_data
    epochs = RecordEpochs()
    model = MoERegressor(**{**PARAMS, "early_stopping": False})
    with pytest.raises(KeyboardInterrupt, match="interrupted after 2 complete epoch.*last completed epoch"):
        model.fit(X, y, callbacks=[epochs, InterruptAt(int(BATCHES_PER_EPOCH * 2.5))])
    _assert_weights_equal(model.module_, epochs.weights[1])


def test_keyboard_interrupt_in_the_first_epoch_keeps_the_initial_weights(classification_data):
    X, y = classification_data
    epochs = RecordEpochs()
    model = MoEClassifier(**PARAMS)
    with pytest.raises(KeyboardInterrupt, match="no epoch completed"):
        model.fit(X, y, callbacks=[epochs, InterruptAt(1)])
    assert model.n_iter_ == 0
    _assert_weights_equal(model.module_, epochs.initial)
    assert set(model.predict(X)) <= set(model.classes_)


def test_keyboard_interrupt_outside_training_leaves_the_estimator_unfitted(regression_data, monkeypatch):
    X, y = regression_data
    model = MoERegressor(**PARAMS)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "_expert_load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y)
    assert not hasattr(model, "net_")


def test_an_interrupted_fit_stops_cross_validation_instead_of_scoring_the_fold(regression_data):
    """The interrupt reaches what called fit: cross-validation stops at the interrupted fold
    rather than scoring its cut-short model and going on to the next."""
    from sklearn.model_selection import cross_validate

    X, y = regression_data
    model = MoERegressor(**PARAMS, callbacks=[InterruptAt(2)])
    with pytest.raises(KeyboardInterrupt, match="interrupted after 0 complete epoch"):
        cross_validate(model, X, y, cv=3, error_score="raise")


def test_an_interrupted_partial_fit_keeps_the_model_of_the_calls_before(regression_data):
    X, y = regression_data
    model = MoERegressor(**PARAMS).partial_fit(X, y)
    weights = _weights(model.module_)
    with pytest.raises(KeyboardInterrupt, match="after 1 complete epoch"):
        model.set_params(callbacks=[InterruptAt(3)]).partial_fit(X, y)
    assert model.n_iter_ == 1 and len(model.history_) == 1
    _assert_weights_equal(model.module_, weights)
    model.set_params(callbacks=None).partial_fit(X, y)  # and goes on from it
    assert model.n_iter_ == 2


class StopAt(TrainingBatchCounter):
    """Ends training from its own code (a KeyboardInterrupt, skorch's way, as early
    stopping's) at the given training batch, or at the end of the given epoch; with
    ``ctrl_c``, Ctrl-C arrives there instead (a real SIGINT)."""

    def __init__(self, batch=None, epoch=None, ctrl_c=False):
        self.batch, self.epoch, self.ctrl_c = batch, epoch, ctrl_c

    def on_batch_end(self, net, training=None, **kwargs):
        if training and self.count == self.batch:
            self.stop()

    def on_epoch_end(self, net, **kwargs):
        if len(net.history) == self.epoch:
            self.stop()

    def stop(self):
        if self.ctrl_c:
            signal.raise_signal(signal.SIGINT)
        raise KeyboardInterrupt


def test_a_callbacks_own_stop_is_no_interruption(regression_data):
    """Amid an epoch, the last completed epoch's weights and history stay; at an epoch's
    end, that epoch counts."""
    X, y = regression_data
    model, epochs = MoERegressor(**{**PARAMS, "early_stopping": False}), RecordEpochs()
    model.fit(X, y, callbacks=[epochs, StopAt(batch=int(BATCHES_PER_EPOCH * 2.5))])
    assert model.n_iter_ == 2 and list(model.history_["epoch"]) == [1, 2]
    _assert_weights_equal(model.module_, epochs.weights[1])
    assert MoERegressor(**PARAMS).fit(X, y, callbacks=[StopAt(epoch=3)]).n_iter_ == 3


def test_a_ctrl_c_in_an_epoch_end_callback_is_an_interruption(regression_data):
    X, y = regression_data
    model, epochs = MoERegressor(**{**PARAMS, "early_stopping": False}), RecordEpochs()
    # The epoch's steps were done: it counts, with its weights.
    with pytest.raises(KeyboardInterrupt, match="interrupted after 3 complete epoch.*last completed epoch"):
        model.fit(X, y, callbacks=[epochs, StopAt(epoch=3, ctrl_c=True)])
    assert model.n_iter_ == 3 and np.isfinite(model.predict(X)).all()
    _assert_weights_equal(model.module_, epochs.weights[2])


def test_a_callbacks_own_stop_in_a_thread_is_no_interruption(regression_data):
    """Python runs signal handlers in the main thread only: a fit in another thread records
    no Ctrl-C, and a callback's stop there is a stop."""
    from concurrent.futures import ThreadPoolExecutor

    X, y = regression_data
    with ThreadPoolExecutor(1) as pool:
        model = pool.submit(MoERegressor(**PARAMS).fit, X, y, callbacks=[StopAt(batch=BATCHES_PER_EPOCH + 2)]).result()
    assert model.n_iter_ == 1


def test_early_stopping_is_not_reported_as_an_interruption(regression_data, recwarn):
    X, y = regression_data
    model = MoERegressor(**{**PARAMS, "max_epochs": 200, "n_iter_no_change": 2}).fit(X, y)
    assert model.n_iter_ < 200
    assert not [w for w in recwarn if "interrupted" in str(w.message)]


def test_each_epoch_runs_skorchs_own_loop_with_the_arguments_as_given(regression_data, monkeypatch):
    # The guarded loop adds nothing to skorch's and takes nothing away: skorch's fit_loop
    # (its split, metadata routing and callbacks) runs once per epoch with every keyword
    # skorch's fit passed, whatever skorch's version calls them.
    from skorch import NeuralNet

    from sklearn_moe._net import MoENet

    received, forwarded = [], []
    ours, skorchs = MoENet.fit_loop, NeuralNet.fit_loop
    monkeypatch.setattr(MoENet, "fit_loop", lambda self, X, y=None, epochs=None, **kw: (
        received.append(kw), ours(self, X, y, epochs, **kw))[1])
    monkeypatch.setattr(NeuralNet, "fit_loop", lambda self, X, y=None, epochs=None, **kw: (
        forwarded.append((epochs, kw)), skorchs(self, X, y, epochs, **kw))[1])
    X, y = regression_data
    model = MoERegressor(**dict(PARAMS, max_epochs=3)).fit(X, y)
    assert model.n_iter_ == 3 and len(received) == 1
    assert forwarded == [(1, received[0])] * 3
