"""The routing diagnostics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from sklearn_moe.diagnostics import expert_utilization, load_imbalance, routing_entropy, row_entropy


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
