"""Router temperature annealing."""

import math

import numpy as np
import pytest

from sklearn_moe import MoERegressor, load
from sklearn_moe.callbacks import annealed_temperature

from .conftest import FAST


def test_schedules_by_hand():
    assert annealed_temperature(2.0, 0.5, "linear", 0.5) == pytest.approx(1.25)
    assert annealed_temperature(2.0, 0.5, "cosine", 0.5) == pytest.approx(1.25)
    assert annealed_temperature(2.0, 0.5, "cosine", 0.25) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2)
    assert annealed_temperature(2.0, 0.5, "exponential", 0.5) == pytest.approx(1.0)  # the geometric mean
    for schedule in ("linear", "cosine", "exponential"):
        assert annealed_temperature(2.0, 0.5, schedule, 0.0) == pytest.approx(2.0)
        assert annealed_temperature(2.0, 0.5, schedule, 1.0) == pytest.approx(0.5)
        assert annealed_temperature(2.0, 0.5, schedule, 7.0) == pytest.approx(0.5)  # clipped to [0, 1]
    with pytest.raises(ValueError, match="schedule must be one of"):
        annealed_temperature(2.0, 0.5, "step", 0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exponential"])
@pytest.mark.parametrize("start, final", [(1.0, 1e-17), (1e-17, 1.0), (1e-6, 1e6)])
def test_the_schedules_end_exactly_at_their_ends_and_stay_positive(schedule, start, final):
    """Annealing between far-apart temperatures: start + (final - start) * t had given 0.0,
    a temperature the router divides by, at the linear schedule's end (1 to 1e-17) and the
    cosine's start (1e-17 to 1)."""
    assert annealed_temperature(start, final, schedule, 0.0) == start
    assert annealed_temperature(start, final, schedule, 1.0) == final
    path = [annealed_temperature(start, final, schedule, t) for t in np.linspace(0, 1, 11)]
    assert min(path) >= min(start, final) * (1 - 1e-12) and max(path) <= max(start, final) * (1 + 1e-12)


def test_each_epoch_trains_at_its_temperature_and_the_model_keeps_the_last(regression_data, tmp_path):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, router="topk", max_epochs=5, early_stopping=False, temperature=2.0,
                                temperature_final=0.5, temperature_schedule="linear")).fit(X, y)
    np.testing.assert_allclose(model.history_["temperature"], [2.0, 1.625, 1.25, 0.875, 0.5])
    assert float(model.module_.router.temperature) == pytest.approx(0.5)
    model.save(tmp_path / "annealed.moe")
    loaded = load(tmp_path / "annealed.moe")
    assert float(loaded.module_.router.temperature) == pytest.approx(0.5)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    constant = MoERegressor(**dict(FAST, router="topk", max_epochs=5, early_stopping=False, temperature=0.5)).fit(X, y)
    assert "temperature" not in constant.history_
    assert not np.allclose(constant.route(X), model.route(X))  # annealing changed the training


def test_early_stopping_keeps_the_temperature_of_the_best_epoch(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, max_epochs=40, n_iter_no_change=3, temperature=3.0,
                                temperature_final=0.3)).fit(X, y)
    best = int(model.history_["valid_loss"].idxmin())
    assert model.n_iter_ < 40 and best < model.n_iter_  # stopped early, from an earlier epoch's weights
    assert float(model.module_.router.temperature) == pytest.approx(model.history_.loc[best, "temperature"])


def test_annealing_parameters_are_validated():
    X, y = np.zeros((20, 2)), np.zeros(20)
    # 1e-46 is 0 in the router's float32.
    for bad in (dict(temperature_final=0.0), dict(temperature_final=-1.0), dict(temperature_schedule="step"),
                dict(temperature=1e-46), dict(temperature_final=1e39)):
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}' parameter of MoERegressor"):
            MoERegressor(max_epochs=1, **bad).fit(X, y)
