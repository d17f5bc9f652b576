"""The estimators' internal input and target scaling."""

import numpy as np
import pytest

import sklearn_moe._scaling as scaling
from sklearn_moe._scaling import (
    _BLOCK_VALUES,
    SMOOTH_CLIP,
    fit_robust_scaler,
    fit_standardizer,
    scale_features,
    weighted_quantiles,
)


def test_weighted_quantiles_match_numpy_and_ignore_zero_weights():
    X = np.random.RandomState(0).normal(size=(1001, 3))
    expected = np.quantile(X, [0.25, 0.5, 0.75], axis=0, method="inverted_cdf")
    np.testing.assert_array_equal(weighted_quantiles(X, (0.25, 0.5, 0.75)), expected)
    weights = np.r_[np.zeros(500), np.ones(501)]
    np.testing.assert_array_equal(weighted_quantiles(X, (0.5,), weights), weighted_quantiles(X[500:], (0.5,)))
    # An integer weight equals repeating the row.
    doubled = weighted_quantiles(np.r_[X, X[:10]], (0.5,))
    np.testing.assert_array_equal(weighted_quantiles(X, (0.5,), np.r_[2 * np.ones(10), np.ones(991)]), doubled)


@pytest.mark.parametrize("n_rows", [1, 2, 3, 4, 7, 10, 101, 1000])
def test_unweighted_quantiles_equal_those_of_equal_weights(n_rows):
    """Without weights numpy computes them: the same order statistics, ties included."""
    X = np.random.RandomState(n_rows).randint(0, 5, size=(n_rows, 3)) + np.r_[0.0, 0.5, 1e9]
    for weights in (np.ones(n_rows), np.full(n_rows, 0.1)):
        np.testing.assert_array_equal(weighted_quantiles(X, (0.5, 0.25, 0.75)),
                                      weighted_quantiles(X, (0.5, 0.25, 0.75), weights))


@pytest.mark.parametrize("block_columns", [5, 22, 1])
@pytest.mark.parametrize("weighted", [False, True])
def test_the_robust_scaler_in_blocks_of_columns_is_the_scaler_of_the_whole(monkeypatch, weighted, block_columns):
    """Large matrices are scaled a block of columns at a time, to bound the temporaries;
    never one column alone (22 of 23 would leave one), which numpy sums in another order."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(5000, 23)) * np.logspace(-3, 3, 23)
    X[:, ::4] = X[:, ::4] > 1.2  # indicators: the standard-deviation fallback
    X[:, -1] = rng.uniform(size=5000) > 0.97
    weights = rng.uniform(size=5000) if weighted else None
    whole = fit_robust_scaler(X, weights)
    monkeypatch.setattr(scaling, "_SCALER_BLOCK_VALUES", 5000 * block_columns)
    in_blocks = fit_robust_scaler(X, weights)
    for part, expected in zip(in_blocks, whole):
        np.testing.assert_array_equal(part, expected)


def test_robust_scaler_is_median_and_iqr_with_fallbacks():
    rng = np.random.RandomState(0)
    column = rng.normal(size=1000)
    rare_binary = (np.arange(1000) < 100).astype(float)  # IQR 0: falls back to mean/std
    constant = np.full(1000, 7.0)
    X = np.c_[column, rare_binary, constant]
    center, scale = fit_robust_scaler(X)
    q25, q50, q75 = np.quantile(column, [0.25, 0.5, 0.75], method="inverted_cdf")
    assert center[0] == q50 and scale[0] == pytest.approx((q75 - q25) / 1.349)
    assert center[1] == pytest.approx(0.1) and scale[1] == pytest.approx(0.3)
    assert center[2] == 7.0 and scale[2] == 1.0


def test_a_column_is_constant_when_its_spread_is_rounding_noise_of_its_values():
    rng = np.random.RandomState(0)
    offset = 1e13 + rng.normal(size=1000)  # a spread of 1e-13 of the mean
    rounding = np.full(1000, np.pi * 1e13)  # its mean's rounding leaves a spread of a few ulps
    ulps = np.where(np.arange(1000) % 2 == 0, 0.1 * 3, 0.3)  # constant but for one ulp
    mean, scale = fit_standardizer(np.c_[offset, rounding, ulps], constant_scale=0.0)
    assert scale[0] == pytest.approx(offset.std(), rel=1e-3) and scale[1] == 0.0 and scale[2] == 0.0
    center, robust_scale = fit_robust_scaler(np.c_[offset, rounding, ulps])
    q25, q75 = np.quantile(offset, [0.25, 0.75], method="inverted_cdf")
    assert robust_scale[0] == pytest.approx((q75 - q25) / 1.349) and robust_scale[1] == robust_scale[2] == 1.0


def test_outliers_are_bounded_by_smooth_clipping():
    X = np.r_[np.random.RandomState(0).normal(size=(100, 1)), [[1e30]], [[-1e300]]]
    center, scale = fit_robust_scaler(X)
    Z = scale_features(X, center, scale)
    assert np.isfinite(Z).all() and np.abs(Z).max() <= SMOOTH_CLIP
    assert Z[-2, 0] == pytest.approx(SMOOTH_CLIP) and Z[-1, 0] == pytest.approx(-SMOOTH_CLIP)
    assert np.abs(Z[:-2]).max() < SMOOTH_CLIP
    # Close to the identity near the centre.
    one_scale_up = scale_features(np.array([[center[0] + scale[0]]]), center, scale)[0, 0]
    assert one_scale_up == pytest.approx(1 / np.sqrt(1 + 1 / 9))


def test_standardizer_handles_huge_magnitudes():
    mean, scale = fit_standardizer(np.array([[1e30], [-1e30], [0.0]]))
    assert np.isfinite(mean).all() and np.isfinite(scale).all() and scale[0] > 0


def test_scale_features_maps_overflowing_outliers_to_the_clip_bound():
    X = np.array([[-2e142], [1e308], [0.0], [1e-300]])
    scaled = scale_features(X, np.zeros(1), np.array([1e-180]))  # (x - 0) / 1e-180 overflows
    np.testing.assert_array_equal(scaled.ravel(), [-SMOOTH_CLIP, SMOOTH_CLIP, 0.0, 0.0])


def test_scales_near_the_float64_maximum_do_not_overflow():
    X = np.array([[0.0], [8e307]])
    center, scale = fit_standardizer(X)
    with np.errstate(over="raise", invalid="raise"):
        scaled = scale_features(X, center, scale)
    # One scale either side of the centre, like any other column.
    expected = scale_features(np.array([[-1.0], [1.0]]), np.zeros(1), np.ones(1))
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)


@pytest.mark.parametrize("layout", ["C", "F", "strided", "read-only", "float32"])
def test_large_inputs_scale_with_torch_like_small_ones_with_numpy(layout):
    # At least _THREADED_MIN_SIZE values go through torch, in row blocks of _BLOCK_VALUES
    # (this input spans three); fewer through numpy. The same values to the last float32 bit,
    # so that a row's prediction does not depend on the batch's size.
    rng = np.random.RandomState(0)
    n_rows = 2 * _BLOCK_VALUES // 16 + 500
    X = rng.normal(size=(n_rows, 16)) * np.logspace(-3, 6, 16) + 7.0
    X[0, :3] = X[-1, :3] = [1e300, -1e30, 3e38]  # saturated: exactly +-SMOOTH_CLIP on both paths
    center, scale = np.median(X, axis=0), np.std(X[1:-1], axis=0)
    in_pieces = np.concatenate([scale_features(X[i:i + 500], center, scale) for i in range(0, n_rows, 500)])
    if layout == "float32":
        X[0, 0] = X[-1, 0] = 3e38  # float32's range
        A = X.astype(np.float32)
        in_pieces = np.concatenate([scale_features(A[i:i + 500], center, scale) for i in range(0, n_rows, 500)])
    else:
        A = {"C": X, "F": np.asfortranarray(X), "strided": np.repeat(X, 2, axis=0)[::2], "read-only": X.copy()}[layout]
    if layout == "read-only":
        A.setflags(write=False)
    whole = scale_features(A, center, scale)
    assert whole.dtype == np.float32 and whole.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(whole, in_pieces)
    np.testing.assert_array_equal(whole[[0, -1], :2], [[SMOOTH_CLIP, -SMOOTH_CLIP]] * 2)
    assert np.abs(whole).max() <= SMOOTH_CLIP


def test_an_infinite_constant_scale_maps_whatever_a_constant_column_holds_to_0():
    rng = np.random.RandomState(0)
    X = np.c_[rng.normal(size=200), np.full(200, 7.0), np.where(np.arange(200) % 2, 0.1 * 3, 0.3)]
    centre, scale = fit_robust_scaler(X, constant_scale=np.inf)
    np.testing.assert_array_equal(fit_robust_scaler(X)[0], centre)
    assert np.isfinite(scale[0]) and scale[0] == fit_robust_scaler(X)[1][0]
    assert scale[1] == scale[2] == np.inf
    # Rows of zero weight do not count: the column is constant among the others.
    varied = np.c_[X[:, :1], np.r_[np.full(100, 7.0), rng.normal(size=100)]]
    assert fit_robust_scaler(varied, np.r_[np.ones(100), np.zeros(100)], constant_scale=np.inf)[1][1] == np.inf
    new = np.c_[X[:, 0], rng.normal(size=200) * 1e6, np.full(200, -3.0)]
    n_large = 2 * scaling._THREADED_MIN_SIZE // 3 + 1  # through torch's kernels
    for rows in (new, np.resize(new, (n_large, 3))):
        scaled = scale_features(rows, centre, scale)
        assert not scaled[:, 1:].any()
        np.testing.assert_array_equal(scaled[:, 0], scale_features(rows[:, :1], centre[:1], scale[:1])[:, 0])
