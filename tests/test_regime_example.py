"""The regime-switching example: its data generator, its parameter counts, and a quick run."""

import numpy as np
import pytest

from examples.regime_switching import (
    MOE_CONFIG,
    build_models,
    main,
    make_regime_data,
    matched_hidden,
    mlp_param_count,
    moe_param_counts,
)
from sklearn_moe.nn import MixtureOfExperts

from .conftest import needs


@pytest.mark.parametrize("n_regimes", [2, 4, 6])
def test_regime_data_shapes_determinism_and_regimes(n_regimes):
    X, y, regime = make_regime_data(600, n_regimes=n_regimes, random_state=3)
    assert X.shape == (600, 5) and y.shape == (600,) and regime.shape == (600,)
    assert np.isfinite(X).all() and np.isfinite(y).all()
    assert set(np.unique(regime)) == set(range(n_regimes))
    assert np.bincount(regime).min() > 600 / n_regimes / 2  # roughly balanced

    X2, y2, regime2 = make_regime_data(600, n_regimes=n_regimes, random_state=3)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(regime, regime2)
    X3, _, _ = make_regime_data(600, n_regimes=n_regimes, random_state=4)
    assert not np.array_equal(X, X3)
    assert make_regime_data(50, n_regimes=n_regimes, n_features=7, random_state=0)[0].shape == (50, 7)


def test_regime_is_a_function_of_the_selectors_and_the_functions_differ():
    X, y, regime = make_regime_data(4000, noise=0.0, random_state=0)
    # The regime is the nearest of the centres of the selector features.
    centres = np.array([X[regime == r, :2].mean(axis=0) for r in range(4)])
    nearest = ((X[:, None, :2] - centres[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert (nearest == regime).mean() > 0.99
    # The regimes' targets are different functions of the same inputs.
    slopes = [np.polyfit(X[regime == r, 2], y[regime == r], 1)[0] for r in range(4)]
    assert np.ptp(slopes) > 2


@pytest.mark.parametrize("kwargs", [{"n_regimes": 1}, {"n_regimes": 7}, {"n_features": 4}])
def test_regime_data_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        make_regime_data(100, **kwargs)


def test_param_counts_match_the_torch_modules():
    assert mlp_param_count(5, (16, 16)) == 5 * 16 + 16 + 16 * 16 + 16 + 16 + 1
    for n_experts, top_k, hidden in [(8, 2, (16, 16)), (4, 1, (32,)), (1, 1, (25, 25))]:
        counts = moe_param_counts(5, n_experts, top_k, hidden)
        module = MixtureOfExperts(n_features=5, n_outputs=1, n_experts=n_experts, top_k=top_k, router="topk",
                                  expert_hidden=hidden)
        assert sum(p.numel() for p in module.parameters()) == counts["total"]
        assert sum(p.numel() for p in module.experts.parameters()) == n_experts * counts["expert"]
        assert counts["active"] == top_k * counts["expert"] + counts["router"]


def test_matched_dense_models_are_within_10_percent_of_the_moe_active_count():
    counts = moe_param_counts(5, **MOE_CONFIG)
    hidden, count = matched_hidden(counts["active"], 5, extra=6)
    assert count == mlp_param_count(5, hidden) + 6
    assert abs(count / counts["active"] - 1) < 0.10
    # No other width is closer.
    for width in (hidden[0] - 1, hidden[0] + 1):
        assert abs(mlp_param_count(5, (width, width)) + 6 - counts["active"]) >= abs(count - counts["active"])

    models, params, _ = build_models(5)
    assert len(models) == 3
    assert all(abs(count / counts["active"] - 1) < 0.10 for count in params.values())
    dense = [model for name, model in models.items() if "n_experts=1" in name][0]
    assert dense.n_experts == 1
    n_dense = sum(p.numel() for p in MixtureOfExperts(
        n_features=5, n_outputs=1, n_experts=1, top_k=1, expert_hidden=dense.expert_hidden).parameters())
    assert n_dense == params[next(name for name in models if "n_experts=1" in name)]


@pytest.mark.slow
@needs("matplotlib")
def test_quick_run_writes_figures_and_scores_every_model(tmp_path, capsys):
    results = main(["--quick", "--out", str(tmp_path)])
    assert len(results) == 3
    names = list(results["model"])
    assert names[0].startswith("MoE top-2 of 8")
    assert any("n_experts=1" in name for name in names)
    assert any("MLPRegressor" in name for name in names)
    for column in ("mse_mean", "mse_std", "r2_mean", "r2_std"):
        assert np.isfinite(results[column]).all()
    assert (results["mse_mean"] > 0).all()
    for path in results.attrs["figures"]:
        assert path.parent == tmp_path
        assert path.exists() and 0 < path.stat().st_size < 300_000
    assert results.attrs["routing"].to_numpy().sum() > 0
    out = capsys.readouterr().out
    assert "active params" in out and "CV MSE" in out
