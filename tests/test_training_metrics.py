"""The per-epoch training metrics (callbacks.py) against hand-computed values."""

import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skorch.history import History

from benchmarks.launches import KernelLaunchCounter
from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe.callbacks import EpochLine, ExpertGradientNorms, RoutingMetrics
from sklearn_moe.diagnostics import expert_specialization, target_bins
from sklearn_moe.nn import MoEOutput
from sklearn_moe.nn.experts import StackedExperts

from .conftest import FAST


def fake_net(n_experts=3, criterion=None, experts=None, dense=False):
    net = SimpleNamespace(history=History(), criterion_=criterion or torch.nn.MSELoss(reduction="none"))
    net.module_ = SimpleNamespace(n_experts=n_experts, experts=experts, router=SimpleNamespace(is_dense=dense))
    return net


def output(gates, counts=None, dropped=0, prediction=None):
    gates = torch.tensor(gates, dtype=torch.float32)
    counts = torch.tensor(counts if counts is not None else (gates > 0).sum(0).tolist())
    prediction = torch.zeros(gates.shape[0], 1) if prediction is None else torch.tensor(prediction)
    zero = torch.zeros(())
    return MoEOutput(prediction, gates, zero, zero, counts, torch.tensor(dropped), zero)


def run_epoch(callback, net, train=(), valid=()):
    net.history.new_epoch()
    net.history.record("epoch", len(net.history))
    callback.on_epoch_begin(net)
    for y_pred, task_loss in train:
        net.history.new_batch()
        net.history.record_batch("train_batch_size", y_pred.gates.shape[0])
        net.history.record_batch("task_loss", task_loss)
        callback.on_batch_end(net, batch=None, training=True, y_pred=y_pred)
    for y_pred, targets in valid:
        callback.on_batch_end(net, batch=({"x": None}, targets), training=False, y_pred=y_pred)
    callback.on_epoch_end(net)
    return net.history[-1]


def test_training_routing_metrics_by_hand():
    callback = RoutingMetrics().initialize()
    net = fake_net()
    first = output([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], counts=[2, 1, 0], dropped=1)
    second = output([[0.0, 0.0, 1.0]], counts=[0, 0, 1])
    row = run_epoch(callback, net, train=[(first, 1.0), (second, 4.0)])
    # counts [2, 1, 1] of 4 assignments; gate mass [1.5, 0.5, 1.0] of 3
    np.testing.assert_allclose(row["expert_share"], [0.5, 0.25, 0.25])
    np.testing.assert_allclose(row["gate_share"], [0.5, 1 / 6, 1 / 3])
    assert row["load_entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)))
    assert row["load_cv"] == pytest.approx(np.std([2, 1, 1]) / (4 / 3))
    assert row["load_imbalance"] == pytest.approx(1.5)
    assert row["routing_entropy"] == pytest.approx(math.log(2) / 3)  # rows: log 2, 0, 0
    assert row["dropped_fraction"] == pytest.approx(1 / 4)
    assert row["task_loss"] == pytest.approx((1.0 * 2 + 4.0 * 1) / 3)  # weighted by batch size
    assert not any(key.startswith("valid_") for key in row)


def test_the_load_of_a_dense_router_is_its_gate_mass():
    # Every expert serves every row: equal routed counts say nothing; the gate mass does.
    callback = RoutingMetrics().initialize()
    gates = [[0.7, 0.2, 0.1], [0.9, 0.1, 0.0]]
    row = run_epoch(callback, fake_net(dense=True), train=[(output(gates, counts=[2, 2, 2]), 1.0)],
                    valid=[(output(gates, counts=[2, 2, 2]), torch.zeros(2, 1))])
    mass = np.array([1.6, 0.3, 0.1])
    np.testing.assert_allclose(row["expert_share"], [1 / 3] * 3)
    for prefix in ("", "valid_"):
        assert row[f"{prefix}load_cv"] == pytest.approx(mass.std() / mass.mean())
        assert row[f"{prefix}load_imbalance"] == pytest.approx(1.6 / mass.mean())
        shares = mass / mass.sum()
        assert row[f"{prefix}load_entropy"] == pytest.approx(-(shares * np.log(shares)).sum())


def test_validation_routing_metrics_by_hand():
    callback = RoutingMetrics().initialize()
    net = fake_net()
    targets = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    gates = [[0.9, 0.1, 0.0], [0.8, 0.0, 0.2], [0.0, 0.3, 0.7], [0.1, 0.0, 0.9]]  # top-1: 0, 0, 2, 2
    prediction = [[0.5], [1.0], [2.0], [1.0]]  # squared errors 0.25, 0, 0, 4
    row = run_epoch(callback, net, valid=[(output(gates[:2], prediction=prediction[:2]), targets[:2]),
                                          (output(gates[2:], prediction=prediction[2:]), targets[2:])])
    np.testing.assert_allclose(row["valid_expert_loss"], [0.125, np.nan, 2.0])
    assert row["valid_specialization"] == pytest.approx(expert_specialization([0, 0, 2, 2], target_bins(targets)))
    # four targets, four bins; the expert tells the half (log 2 of the bins' log 4): 2 / 3
    assert row["valid_specialization"] == pytest.approx(math.log(2) / ((math.log(2) + math.log(4)) / 2))
    assert math.isnan(row["valid_routing_instability"])  # no earlier epoch
    np.testing.assert_allclose(row["valid_gate_share"], np.sum(gates, axis=0) / 4)
    changed = [[0.9, 0.1, 0.0], [0.0, 0.8, 0.2], [0.0, 0.3, 0.7], [0.1, 0.0, 0.9]]  # row 1 now goes to 1
    row = run_epoch(callback, net, valid=[(output(changed, prediction=prediction), targets)])
    assert row["valid_routing_instability"] == pytest.approx(0.25)


def test_validation_specialization_uses_the_classes_of_a_classifier():
    callback = RoutingMetrics().initialize()
    net = fake_net(2, torch.nn.CrossEntropyLoss(reduction="none"))
    gates = [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]]
    logits = [[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]]
    row = run_epoch(callback, net, valid=[(output(gates, prediction=logits), torch.tensor([1, 1, 0, 0]))])
    assert row["valid_specialization"] == pytest.approx(1.0)
    wrong = -math.log(1 / (1 + math.exp(2.0)))  # the cross-entropy of a confident miss
    np.testing.assert_allclose(row["valid_expert_loss"], [wrong, wrong], rtol=1e-6)


def test_expert_gradient_norms_by_hand():
    experts = StackedExperts(3, 2, 1, expert_hidden=())
    net = fake_net(experts=experts)
    callback = ExpertGradientNorms()
    net.history.new_epoch()
    callback.on_epoch_begin(net)
    for scale in (1.0, 3.0):
        experts.output.weight.grad = scale * torch.tensor([[[3.0], [4.0]], [[0.0], [0.0]], [[1.0], [0.0]]])
        experts.output.bias.grad = scale * torch.tensor([[0.0], [0.0], [0.0]])
        callback.on_grad_computed(net, training=True)
    callback.on_epoch_end(net)
    np.testing.assert_allclose(net.history[-1]["expert_grad_norm"], [10.0, 0.0, 2.0])  # mean of 5 and 15, ...


def test_the_metrics_of_a_training_step_launch_a_fixed_number_of_kernels():
    # On a GPU each kernel the callbacks launch adds to every training step: the gradient
    # norms take a fixed number however many parameters the experts have.
    launches = []
    for hidden in ((4,), (4, 4, 4, 4)):
        experts = StackedExperts(3, 2, 1, expert_hidden=hidden, layer_norm=True)
        for p in experts.parameters():
            p.grad = torch.randn_like(p)
        net, callback = fake_net(experts=experts), ExpertGradientNorms()
        callback.on_epoch_begin(net)
        callback.on_grad_computed(net, training=True)  # the first step starts the sum
        with KernelLaunchCounter() as counter:
            callback.on_grad_computed(net, training=True)
        launches.append(counter.launches)
    assert launches[0] == launches[1] <= 3, launches
    routing, net = RoutingMetrics(), fake_net()
    run_epoch(routing, net, train=[(output([[0.5, 0.5, 0.0]] * 4), 1.0)])
    net.history.new_epoch()
    routing.on_epoch_begin(net)
    y_pred = output([[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]] * 2)
    with KernelLaunchCounter() as counter:
        routing.on_batch_end(net, batch=None, training=True, y_pred=y_pred)
    assert counter.launches <= 6, counter.by_op


def test_adapter_experts_report_only_their_own_parameters():
    from sklearn_moe.nn.experts import AdapterExperts

    experts = AdapterExperts(4, 3, 2, expert_hidden=(5,), layer_norm=True)
    own = experts.expert_parameters()
    assert all(p.shape[0] == 4 for p in own)
    assert not any(p is shared for p in own for shared in experts.weights)
    assert {id(p) for p in experts.parameters()} - {id(p) for p in own} == {id(p) for p in experts.weights}


@pytest.mark.parametrize("expert_type", ["adapter", "independent"])
def test_fitted_history_has_every_metric_and_the_timing_hooks_are_gone(expert_type, regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, expert_type=expert_type, router="topk", max_epochs=3, random_state=0,
                                shared_expert=True)).fit(X, y)
    history = model.history_
    # Rows labelled by epoch; the index is unnamed, so that the epoch column stays unambiguous.
    assert list(history.index) == list(history["epoch"]) == [1, 2, 3] and history.index.name is None
    assert list(history.reset_index()["index"]) == [1, 2, 3] and list(history.groupby("epoch").size()) == [1, 1, 1]
    for key in ("expert_share", "gate_share", "valid_expert_share", "valid_gate_share", "expert_grad_norm",
                "valid_expert_loss"):
        assert all(len(value) == 4 for value in history[key])
    for key in ("expert_share", "gate_share", "valid_expert_share"):
        np.testing.assert_allclose([sum(value) for value in history[key]], 1.0)
    assert all(0 <= value <= 1 for value in history["valid_specialization"])
    assert math.isnan(history["valid_routing_instability"].iloc[0])
    assert all(0 <= value <= 1 for value in history["valid_routing_instability"].iloc[1:])
    timed = history[["router_s", "experts_s", "optimizer_s"]]
    assert (timed > 0).all().all() and (timed.sum(axis=1) < history["dur"]).all()
    module = model.module_
    for part in (module.router, module.experts, module.shared_expert):
        assert not part._forward_hooks and not part._forward_pre_hooks
    assert not model.net_.optimizer_._optimizer_step_post_hooks
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(model)).predict(X), model.predict(X))


def test_a_starved_expert_shows_in_its_gradient_norm(classification_data):
    X, y = classification_data
    model = MoEClassifier(**dict(FAST, router="topk", top_k=1, max_epochs=2, random_state=0, balance_coef=0.0))
    model.set_params(expert_type="independent")
    model.fit(X, y)
    share = np.mean(np.vstack(model.history_["expert_share"]), axis=0)
    norms = np.mean(np.vstack(model.history_["expert_grad_norm"]), axis=0)
    if share.min() == 0:  # an expert no training row reached gets no gradient at all
        assert norms[share.argmin()] == 0.0
    assert np.argmax(norms) == np.argmax(share) or share.max() - np.sort(share)[-2] < 0.1


def test_verbose_prints_one_compact_line_per_epoch(regression_data, capsys):
    X, y = regression_data
    MoERegressor(**dict(FAST, max_epochs=2, random_state=0, verbose=1)).fit(X, y)
    lines = [line.split("\r")[-1].strip() for line in capsys.readouterr().out.splitlines() if "epoch " in line]
    assert len(lines) == 2
    assert lines[0].startswith("epoch   1  loss ") and " valid " in lines[0] and " load_cv " in lines[0]
    assert " entropy " in lines[0] and lines[0].rstrip(" *").endswith("s")


def test_epoch_line_marks_a_new_best():
    printed = []
    net = fake_net()
    net.history.new_epoch()
    for key, value in dict(epoch=4, train_loss=0.5, valid_loss=0.25, valid_loss_best=True, load_cv=0.1,
                           routing_entropy=1.25, dur=0.5).items():
        net.history.record(key, value)
    EpochLine(sink=printed.append).on_epoch_end(net)
    assert printed == ["epoch   4  loss 0.5000  valid 0.2500  load_cv 0.100  entropy 1.250  0.50s  *"]
    # The mixture's loss on the training rows, where recorded: what the validation loss is.
    net.history.record("task_loss", 0.3)
    EpochLine(sink=printed.append).on_epoch_end(net)
    assert printed[-1].startswith("epoch   4  loss 0.3000  valid 0.2500")


def test_adaptive_capacity_follows_the_last_epochs_batch_loads():
    from sklearn_moe.callbacks import AdaptiveCapacity

    net = fake_net()
    net.module_.capacity_factor = 3.0
    callback = AdaptiveCapacity(quantile=0.5)
    callback.on_train_begin(net)
    assert net.module_.capacity_factor is None  # the first epoch is dropless
    for loads in ([[4, 0, 0, 0], [2, 2, 0, 0], [1, 1, 1, 1]], [[1, 1, 1, 1]]):
        net.history.new_epoch()
        callback.on_epoch_begin(net)
        for counts in loads:
            y_pred = output([[1.0, 0.0, 0.0, 0.0]], counts=counts)
            callback.on_batch_end(net, training=True, y_pred=y_pred)
            callback.on_batch_end(net, training=False, y_pred=output([[0.0, 1.0, 0.0, 0.0]], counts=[0, 9, 0, 0]))
        callback.on_epoch_end(net)
    # busiest over mean per batch: 4, 2, 1 -> median 2; then 1 -> 1 (never below 1)
    assert math.isnan(net.history[0]["capacity_factor"]) and net.history[1]["capacity_factor"] == 2.0
    assert net.module_.capacity_factor == 1.0
    callback.on_train_end(net)
    assert net.module_.capacity_factor is None


def test_auto_capacity_caps_a_skewed_router_in_training_only(regression_data, tmp_path):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, router="topk", top_k=1, capacity_factor="auto", max_epochs=4,
                                early_stopping=False, balance_coef=0.0)).fit(X, y)
    factors = model.history_["capacity_factor"]
    assert math.isnan(factors.iloc[0]) and (factors.iloc[1:] >= 1).all()
    assert model.module_.capacity_factor is None  # prediction is dropless
    model.save(tmp_path / "auto.moe")
    from sklearn_moe import load

    loaded = load(tmp_path / "auto.moe")
    assert loaded.capacity_factor == "auto"
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


@pytest.mark.parametrize("routing", [dict(router="softmax"), dict(router="topk", top_k=4, n_experts=4)])
def test_auto_capacity_records_no_factor_under_a_dense_router_which_caps_nothing(regression_data, routing):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, capacity_factor="auto", max_epochs=2, **routing)).fit(X, y)
    assert "capacity_factor" not in model.history_
    assert (model.history_["dropped_fraction"] == 0).all()
