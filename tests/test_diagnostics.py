"""The routing diagnostics against hand-computed values."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from sklearn_moe.diagnostics import (
    expert_specialization,
    expert_utilization,
    gate_share,
    load_cv,
    load_entropy,
    load_imbalance,
    per_expert_mean,
    routing_entropy,
    routing_instability,
    row_entropy,
    target_bins,
)


def test_expert_utilization_is_each_experts_share():
    np.testing.assert_allclose(expert_utilization([3, 1, 0, 4]), [0.375, 0.125, 0.0, 0.5])
    np.testing.assert_allclose(expert_utilization(torch.tensor([2, 2])), [0.5, 0.5])
    np.testing.assert_array_equal(expert_utilization([0, 0, 0]), [0.0, 0.0, 0.0])


def test_load_imbalance_is_the_busiest_share_over_the_mean():
    assert load_imbalance([5, 5, 5, 5]) == pytest.approx(1.0)
    assert load_imbalance([3, 1, 0, 4]) == pytest.approx(0.5 * 4)
    assert load_imbalance([0, 7, 0]) == pytest.approx(3.0)  # total collapse: n_experts
    assert math.isnan(load_imbalance([0, 0]))


def test_routing_entropy_is_the_mean_per_row_entropy():
    gates = np.array([[1.0, 0.0, 0.0, 0.0],     # one expert: 0
                      [0.5, 0.5, 0.0, 0.0],     # an even split over 2: log 2
                      [0.25, 0.25, 0.25, 0.25],  # over 4: log 4
                      [0.7, 0.3, 0.0, 0.0]])
    uneven = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    expected = (0.0 + math.log(2) + math.log(4) + uneven) / 4
    assert routing_entropy(gates) == pytest.approx(expected)
    assert routing_entropy(torch.tensor(gates, dtype=torch.float32)) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(routing_entropy(np.zeros((0, 4))))
    per_row = [0.0, math.log(2), math.log(4), uneven]
    np.testing.assert_allclose(row_entropy(gates), per_row)
    on_device = row_entropy(torch.tensor(gates, dtype=torch.float32))
    assert isinstance(on_device, torch.Tensor) and on_device.shape == (4,)
    np.testing.assert_allclose(on_device.numpy(), per_row, rtol=1e-6)


def test_training_history_records_the_mean_row_entropy_of_the_gates(regression_data):
    from sklearn_moe import MoERegressor

    from .conftest import FAST

    X, y = regression_data
    model = MoERegressor(**dict(FAST, router="topk", max_epochs=1, early_stopping=False, random_state=0,
                                learning_rate=1e-12, weight_decay=0.0)).fit(X, y)
    # With a vanishing learning rate the gates after the epoch are the gates seen in training.
    assert model.history_["routing_entropy"].iloc[-1] == pytest.approx(routing_entropy(model.route(X)), rel=1e-5)


def test_gate_share_is_each_experts_share_of_the_gate_mass():
    gates = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    np.testing.assert_allclose(gate_share(gates), [0.75, 0.25, 0.0])
    np.testing.assert_allclose(gate_share(np.zeros((0, 3))), [0.0, 0.0, 0.0])


def test_load_entropy_and_cv_by_hand():
    assert load_entropy([2, 2]) == pytest.approx(math.log(2))
    assert load_entropy([4, 0]) == 0.0
    assert load_entropy([1, 1, 2]) == pytest.approx(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert math.isnan(load_entropy([0, 0]))
    assert load_cv([2, 2]) == 0.0
    assert load_cv([4, 0]) == pytest.approx(1.0)  # sqrt(n_experts - 1): total collapse
    assert load_cv([1, 2, 3]) == pytest.approx(math.sqrt(2 / 3) / 2)
    assert math.isnan(load_cv([0, 0, 0]))


def test_routing_instability_is_the_share_of_changed_first_choices():
    assert routing_instability([0, 1, 2, 3], [0, 1, 1, 3]) == 0.25
    assert routing_instability([2, 2], [2, 2]) == 0.0
    with pytest.raises(ValueError, match="not the same rows"):
        routing_instability([0, 1], [0, 1, 2])


def test_expert_specialization_by_hand_and_against_scikit_learn():
    assert expert_specialization([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert expert_specialization([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0, abs=1e-12)
    assert expert_specialization([3, 3, 3, 3], ["a", "a", "b", "b"]) == 0.0  # one expert tells nothing
    # a 2 x 2 table with counts [[2, 1], [0, 1]]: MI over the mean of the two entropies
    joint = np.array([[2, 1], [0, 1]]) / 4
    p_e, p_y = joint.sum(1), joint.sum(0)
    mutual = sum(joint[i, j] * math.log(joint[i, j] / (p_e[i] * p_y[j])) for i in range(2) for j in range(2)
                 if joint[i, j] > 0)
    entropy = lambda p: -sum(v * math.log(v) for v in p if v > 0)  # noqa: E731
    expected = mutual / ((entropy(p_e) + entropy(p_y)) / 2)
    assert expert_specialization([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(expected)
    rng = np.random.RandomState(0)
    experts, classes = rng.randint(0, 5, 300), rng.randint(0, 3, 300)
    assert expert_specialization(experts, classes) == pytest.approx(normalized_mutual_info_score(classes, experts))


def test_target_bins_are_quantile_bins():
    np.testing.assert_array_equal(target_bins(np.arange(10.0), n_bins=5), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(target_bins(np.c_[np.arange(4.0), -np.arange(4.0)], n_bins=2), [0, 0, 1, 1])
    assert target_bins(np.zeros(0)).shape == (0,)


def test_per_expert_mean_over_each_experts_rows():
    np.testing.assert_allclose(per_expert_mean([1.0, 2.0, 3.0, 4.0], [0, 0, 2, 2], 3), [1.5, np.nan, 3.5])
    with pytest.raises(ValueError, match="not the same rows"):
        per_expert_mean([1.0], [0, 1], 2)


@pytest.mark.parametrize("call, match", [
    (lambda: expert_utilization([-1, 2]), "non-negative"),
    (lambda: load_cv([1.0, np.nan]), "non-negative"),
    (lambda: load_imbalance([[1, 2]]), "1-d"),
    (lambda: routing_entropy([0.5, 0.5]), r"\(rows, experts\) table; got shape \(2,\)"),
    (lambda: row_entropy(torch.ones(3)), r"\(rows, experts\) table"),
    (lambda: gate_share([0.5, 0.5]), r"\(rows, experts\) table"),
    (lambda: target_bins([1.0, 2.0], n_bins=0), "n_bins must be a positive int"),
    (lambda: per_expert_mean([1.0, 2.0], [0, 5], 2), "experts 0 to n_experts - 1 = 1; it holds 0 to 5"),
])
def test_bad_inputs_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_a_missing_gate_weight_gives_a_missing_entropy_on_arrays_as_on_tensors():
    gates = [[np.nan, 1.0], [0.5, 0.5]]
    np.testing.assert_array_equal(np.isnan(row_entropy(gates)), [True, False])
    assert torch.isnan(row_entropy(torch.tensor(gates))[0])
    assert math.isnan(routing_entropy(gates))
