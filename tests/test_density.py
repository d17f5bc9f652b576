"""Mixture density outputs: the likelihood, its gradients, and the regressor's distributions."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from sklearn_moe import MoEClassifier, MoERegressor, load
from sklearn_moe._data import TensorTable
from sklearn_moe.nn import MixtureOfExperts
from sklearn_moe.nn.density import (
    SCALE_FLOOR,
    calibrated_scale,
    expert_scales,
    mixture_moments,
    mixture_nll,
    per_expert_mixture_nll,
)

from .conftest import FAST


def normal_pdf(y, mean, sd):
    return math.exp(-0.5 * ((y - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))


def raw_scale(sd):
    """The raw output whose scale is ``sd``: the inverse of softplus(raw) + floor."""
    return math.log(math.expm1(sd - SCALE_FLOOR))


def test_mixture_nll_by_hand():
    # row 0: two experts (0.3 and 0.7); row 1: one expert
    outputs = torch.tensor([[0.0, raw_scale(1.0)], [2.0, raw_scale(0.5)], [-1.0, raw_scale(2.0)]])
    rows, weights = torch.tensor([0, 0, 1]), torch.tensor([0.3, 0.7, 1.0])
    target = torch.tensor([[1.0], [0.5]])
    expected = [-math.log(0.3 * normal_pdf(1.0, 0.0, 1.0) + 0.7 * normal_pdf(1.0, 2.0, 0.5)),
                -math.log(normal_pdf(0.5, -1.0, 2.0))]
    torch.testing.assert_close(mixture_nll(outputs, rows, weights, target), torch.tensor(expected), rtol=1e-5,
                               atol=1e-6)
    # the per-expert objective: each expert's own NLL by its gate weight, plus the mixture's
    own = [-math.log(normal_pdf(1.0, 0.0, 1.0)), -math.log(normal_pdf(1.0, 2.0, 0.5)), expected[1]]
    per_expert = (0.3 * own[0] + 0.7 * own[1] + own[2]) / 2 + sum(expected) / 2
    assert float(per_expert_mixture_nll(outputs, rows, weights, target)) == pytest.approx(per_expert, rel=1e-5)


def test_an_assignment_of_weight_zero_adds_nothing_even_to_a_far_target():
    """Small evaluation batches list unchosen experts with weight 0: a row's likelihood must
    not depend on them (it did by float32's smallest weight, which dominates far out)."""
    outputs = torch.tensor([[0.0, raw_scale(1.0)], [40.0, raw_scale(1.0)]], requires_grad=True)
    target = torch.tensor([[40.0]])
    with_zero = mixture_nll(outputs, torch.tensor([0, 0]), torch.tensor([1.0, 0.0]), target)
    alone = mixture_nll(outputs[:1], torch.tensor([0]), torch.tensor([1.0]), target)
    torch.testing.assert_close(with_zero, alone)
    with_zero.sum().backward()
    assert torch.isfinite(outputs.grad).all() and (outputs.grad[1] == 0).all()


def test_loss_and_gradients_stay_finite_at_the_scale_floor_and_far_away():
    raw = torch.tensor([[0.0, -100.0], [0.0, -100.0]], requires_grad=True)  # scales at the floor
    assert torch.allclose(expert_scales(raw[:, 1:]), torch.tensor(SCALE_FLOOR))
    weights = torch.tensor([0.5, 0.5], requires_grad=True)
    target = torch.tensor([[1e6], [0.0]])  # one target a million standard deviations away
    nll = mixture_nll(raw, torch.tensor([0, 1]), weights, target)
    assert torch.isfinite(nll).all() and nll[0] > 1e10
    nll.sum().backward()
    assert torch.isfinite(raw.grad).all() and torch.isfinite(weights.grad).all()


def test_calibrated_scale_is_the_likelihood_optimum():
    rng = np.random.RandomState(0)
    n = 500
    means, scales = torch.as_tensor(rng.normal(size=(n, 1, 1))), torch.as_tensor(rng.uniform(0.5, 2, size=(n, 1, 1)))
    target = means[:, 0] + 2.5 * scales[:, 0] * torch.as_tensor(rng.normal(size=(n, 1)))
    weights = torch.ones(n, 1)
    # one Gaussian per row: the optimal factor is sqrt(mean(z^2)) in closed form
    optimum = float(((target - means[:, 0]) / scales[:, 0]).square().mean().sqrt())
    assert calibrated_scale(weights, means, scales, target) == pytest.approx(optimum, rel=1e-5)
    # a row of weight 0 does not count; no weight at all keeps the spread as it is
    far = torch.cat([target[:-1], target[-1:] + 1e3])
    sample_weight = torch.cat([torch.ones(n - 1), torch.zeros(1)])
    optimum_without_last = float(((target[:-1] - means[:-1, 0]) / scales[:-1, 0]).square().mean().sqrt())
    assert calibrated_scale(weights, means, scales, far, sample_weight) == pytest.approx(optimum_without_last,
                                                                                         rel=1e-5)
    assert calibrated_scale(weights, means, scales, target, torch.zeros(n)) == 1.0
    # bounded: a spread far too wide stops at the smallest factor, exactly
    assert calibrated_scale(weights, means, scales * 100, target) == 0.125
    assert calibrated_scale(weights, means, scales, target, bounds=(3.0, 8.0)) == 3.0


def test_spread_is_recalibrated_on_the_validation_rows(tmp_path):
    X, y = heteroscedastic(300, 2)
    params = dict(FAST, output="mixture_density", router="topk", max_epochs=5)
    model = MoERegressor(**params).fit(X, y)
    assert model.scale_calibration_ >= 1.0 and float(model.module_.scale_calibration) == model.scale_calibration_
    # held-out rows three times as spread as the training rows: the factor widens the spread
    X_scaled = model._scaled_input(X)
    with torch.no_grad():
        mean = model.module_.predict(X_scaled)
    wide = TensorTable(X_scaled, mean + 3 * (torch.as_tensor((y - model._y_mean) / model._y_scale,
                                                              dtype=torch.float32)[:, None] - mean))
    model._after_training(wide)
    factor = model.scale_calibration_
    assert 2 < factor < 8
    model.module_.scale_calibration.fill_(1.0)
    with torch.no_grad():
        raw = model.module_.predict_distribution(X_scaled)
    assert factor == pytest.approx(calibrated_scale(*raw, wide.y, bounds=(1.0, 8.0)), rel=1e-6)  # a float32 buffer
    model.module_.scale_calibration.fill_(factor)
    np.testing.assert_allclose(model.predict_distribution(X)["scales"],
                               raw[2].double().numpy()[..., 0] * factor * model._y_scale, rtol=1e-5)
    model.save(tmp_path / "calibrated.moe")
    assert load(tmp_path / "calibrated.moe").scale_calibration_ == pytest.approx(factor, rel=1e-7)
    # held-out rows predicted better than the training rows never narrow the spread
    model._after_training(TensorTable(X_scaled, mean))
    assert model.scale_calibration_ == 1.0
    # no validation rows, nothing to calibrate on: a new model's factor is 1, a continued
    # fit's stays
    assert MoERegressor(**params, early_stopping=False).fit(X, y).scale_calibration_ == 1.0
    model.module_.scale_calibration.fill_(factor)
    assert model.partial_fit(X, y).scale_calibration_ == pytest.approx(factor, rel=1e-7)
    # a point regressor has no spread
    assert not hasattr(MoERegressor(**dict(FAST, max_epochs=2)).fit(X, y), "scale_calibration_")


def test_mixture_moments_by_hand():
    weights = torch.tensor([[0.25, 0.75]])
    means, scales = torch.tensor([[[0.0], [4.0]]]), torch.tensor([[[1.0], [2.0]]])
    mean, std = mixture_moments(weights, means, scales)
    assert float(mean) == pytest.approx(3.0)
    assert float(std) == pytest.approx(math.sqrt(0.25 * 1 + 0.75 * (4 + 16) - 9))


def test_mixture_std_keeps_its_digits_around_a_large_mean():
    """A spread of about 1.6 around 1e8 (a timestamp, an amount in cents): the uncentred
    form's difference of two numbers near 1e16 loses it."""
    weights = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    scales = torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)
    for offset in (0.0, 1e8):
        means = torch.tensor([[[0.0], [4.0]]], dtype=torch.float64) + offset
        mean, std = mixture_moments(weights, means, scales)
        assert float(mean) == pytest.approx(3.0 + offset, rel=1e-15)
        assert float(std) == pytest.approx(math.sqrt(0.25 * 1 + 0.75 * (4 + 16) - 9), rel=1e-12)


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_module_mean_is_the_mixture_of_the_distribution(router):
    torch.manual_seed(0)
    module = MixtureOfExperts(3, 2, n_experts=4, router=router, output="mixture_density", shared_expert=True).eval()
    x = torch.randn(20, 3)
    with torch.no_grad():
        weights, means, scales = module.predict_distribution(x)
        torch.testing.assert_close(mixture_moments(weights, means, scales)[0], module.predict(x), rtol=1e-5,
                                   atol=1e-6)
    assert (scales >= SCALE_FLOOR).all() and means.shape == (20, 4, 2)
    with pytest.raises(ValueError, match="mixture_density"):
        MixtureOfExperts(3, 2).predict_distribution(x)


def heteroscedastic(n, seed):
    rng = np.random.RandomState(seed)
    X = rng.uniform(-2, 2, size=(n, 2))
    return X, np.sin(2 * X[:, 0]) + (0.05 + 0.5 * np.abs(X[:, 0])) * rng.normal(size=n)


@pytest.mark.slow
def test_heteroscedastic_intervals_cover_about_ninety_percent():
    X, y = heteroscedastic(2000, 0)
    X_test, y_test = heteroscedastic(1000, 1)
    model = MoERegressor(output="mixture_density", n_experts=4, expert_hidden=(64, 64), max_epochs=40,
                         batch_size=128, random_state=0).fit(X, y)
    bounds = model.predict_quantiles(X_test, [0.05, 0.95])
    coverage = np.mean((y_test >= bounds[:, 0]) & (y_test <= bounds[:, 1]))
    assert 0.85 <= coverage <= 0.95
    _, std = model.predict(X_test, return_std=True)
    wide = np.abs(X_test[:, 0]) > 1.5
    assert std[wide].mean() > 3 * std[np.abs(X_test[:, 0]) < 0.3].mean()  # it learned where the noise is


@pytest.mark.slow
def test_bimodal_data_are_far_likelier_under_the_mixture():
    # Two modes at every input: the experts must split them, which the mixture's own
    # likelihood teaches (under "per_expert" each expert fits the whole distribution).
    rng = np.random.RandomState(0)
    X = rng.uniform(-1, 1, size=(2000, 1))
    y = X[:, 0] + np.where(rng.uniform(size=2000) < 0.5, -2.0, 2.0) + 0.2 * rng.normal(size=2000)
    X_test, y_test = X[1500:], y[1500:]
    params = dict(n_experts=4, router="softmax", expert_hidden=(64, 64), max_epochs=40, batch_size=128,
                  random_state=0)
    density = MoERegressor(output="mixture_density", expert_loss="mixture", **params).fit(X[:1500], y[:1500])
    point = MoERegressor(**params).fit(X[:1500], y[:1500])
    variance = np.mean((point.predict(X[:1500]) - y[:1500]) ** 2)  # a constant-variance Gaussian around it
    gaussian_nll = np.mean(0.5 * np.log(2 * np.pi * variance) + 0.5 * (y_test - point.predict(X_test)) ** 2 / variance)
    assert density.score_nll(X_test, y_test) < gaussian_nll - 1.0
    weights = density.predict_distribution(X_test)["weights"]
    means = density.predict_distribution(X_test)["means"]
    upper = (weights * (means > X_test)).sum(axis=1)  # the gate mass on the upper mode
    assert 0.3 < upper.mean() < 0.7


@pytest.fixture(scope="module")
def density_model():
    X, y = heteroscedastic(300, 2)
    return MoERegressor(**dict(FAST, output="mixture_density", router="topk", max_epochs=5)).fit(X, y), X, y


def test_quantiles_are_monotone_and_the_median_sits_inside(density_model):
    model, X, _ = density_model
    levels = [0.9, 0.1, 0.5, 0.25, 0.99]
    quantiles = model.predict_quantiles(X, levels)
    assert quantiles.shape == (len(X), 5)
    ordered = quantiles[:, np.argsort(levels)]
    assert (np.diff(ordered, axis=1) >= 0).all()
    single = model.predict_quantiles(X[:5], 0.5)
    np.testing.assert_allclose(single[:, 0], quantiles[:5, 2], rtol=1e-6, atol=1e-9)
    for bad in (0.0, 1.0, [0.5, 1.5], [[0.5]]):
        with pytest.raises(ValueError, match="probabilities in"):
            model.predict_quantiles(X, bad)


def test_distribution_samples_and_moments_agree(density_model):
    model, X, _ = density_model
    distribution = model.predict_distribution(X[:4])
    np.testing.assert_allclose(distribution["weights"].sum(axis=1), 1.0)
    mean, std = model.predict(X[:4], return_std=True)
    np.testing.assert_allclose(mean, (distribution["weights"] * distribution["means"]).sum(axis=1), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(model.predict(X[:4]), mean, rtol=1e-5, atol=1e-6)
    draws = model.sample(X[:4], 20000, random_state=0)
    assert draws.shape == (4, 20000)
    np.testing.assert_allclose(draws.mean(axis=1), mean, atol=0.05 * std.max() + 0.01)
    np.testing.assert_allclose(draws.std(axis=1), std, rtol=0.05)
    np.testing.assert_array_equal(model.sample(X[:4], 3, random_state=1), model.sample(X[:4], 3, random_state=1))
    with pytest.raises(ValueError, match="n_samples"):
        model.sample(X, 0)


def test_score_nll_in_the_targets_units(density_model):
    model, X, y = density_model
    distribution = model.predict_distribution(X)
    by_hand = -np.mean([math.log(sum(w * normal_pdf(t, m, s) for w, m, s in zip(*row)))
                        for row, t in zip(zip(distribution["weights"], distribution["means"], distribution["scales"]),
                                          y)])
    assert model.score_nll(X, y) == pytest.approx(by_hand, rel=1e-6)
    assert model.score_nll(X, y * 10) > model.score_nll(X, y)
    with pytest.raises(ValueError, match=f"X has {len(X)} rows but y has 5"):
        model.score_nll(X, y[:5])
    with pytest.raises(ValueError, match="y has none \\(a scalar\\)"):
        model.score_nll(X, 1.0)
    with pytest.raises(ValueError, match="y contains NaN or infinity"):
        model.score_nll(X, np.where(np.arange(len(y)) == 3, np.nan, y))

def test_score_nll_takes_read_only_targets_silently(density_model):
    model, X, y = density_model
    read_only = np.array(y)
    read_only.flags.writeable = False  # as a pandas column's values can be
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.score_nll(X, read_only) == model.score_nll(X, pd.Series(y)) == model.score_nll(X, y)


def test_multi_target_shapes_and_round_trip(tmp_path):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 3))
    y = np.c_[X[:, 0], X[:, 1] * 2]
    model = MoERegressor(**dict(FAST, output="mixture_density", max_epochs=3)).fit(X, y)
    assert model.predict_quantiles(X, [0.1, 0.9]).shape == (200, 2, 2)
    assert model.sample(X, 5, random_state=0).shape == (200, 5, 2)
    assert model.predict_distribution(X)["means"].shape == (200, FAST["n_experts"], 2)
    assert model.predict(X, return_std=True)[1].shape == (200, 2)
    model.save(tmp_path / "density.moe")
    loaded = load(tmp_path / "density.moe")
    assert loaded.output == "mixture_density"
    np.testing.assert_array_equal(loaded.predict_quantiles(X, 0.3), model.predict_quantiles(X, 0.3))


def test_a_constant_target_is_a_point_mass():
    """As ``predict`` gives the constant exactly, so do the distribution's moments,
    quantiles and samples; a point mass has no density to score by."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(120, 3))
    model = MoERegressor(**dict(FAST, max_epochs=3), output="mixture_density").fit(X, np.c_[np.full(120, 5.0), X[:, 0]])
    mean, std = model.predict(X[:4], return_std=True)
    np.testing.assert_array_equal(mean[:, 0], 5.0)
    np.testing.assert_array_equal(std[:, 0], 0.0)
    assert (std[:, 1] > 0).all()
    quantiles = model.predict_quantiles(X[:4], [0.05, 0.95])
    np.testing.assert_array_equal(quantiles[:, 0, :], 5.0)
    assert (quantiles[:, 1, 1] > quantiles[:, 1, 0]).all()
    np.testing.assert_array_equal(model.sample(X[:4], 3, random_state=0)[..., 0], 5.0)
    np.testing.assert_array_equal(model.predict_distribution(X[:4])["scales"][..., 0], 0.0)
    with pytest.raises(ValueError, match=r"constant target \(5\).*point mass"):
        model.score_nll(X[:4], np.c_[np.full(4, 5.0), X[:4, 0]])


def test_point_models_say_what_they_lack(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, max_epochs=2)).fit(X, y)
    for call in (lambda: model.predict(X, return_std=True), lambda: model.predict_quantiles(X, 0.5),
                 lambda: model.sample(X), lambda: model.predict_distribution(X), lambda: model.score_nll(X, y)):
        with pytest.raises(ValueError, match="output='mixture_density'"):
            call()
    assert "output" not in MoEClassifier().get_params()
    with pytest.raises(ValueError, match="'output' parameter of MoERegressor"):
        MoERegressor(output="gaussian", max_epochs=1).fit(X, y)
