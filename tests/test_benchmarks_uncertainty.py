"""The uncertainty benchmark's scoring (not its numbers)."""

import numpy as np
import pytest
from scipy.stats import norm

from benchmarks import uncertainty


def test_pinball_by_hand():
    y = np.array([1.0, 3.0])
    quantiles = np.array([[2.0, 2.0], [2.0, 2.0]])
    levels = np.array([0.1, 0.9])
    # y=1 under 2: (q - 1) * (1 - 2); y=3 over 2: q * (3 - 2)
    np.testing.assert_allclose(uncertainty.pinball(y, quantiles, levels), [(0.9 + 0.1) / 2, (0.1 + 0.9) / 2])


def test_fold_scores_of_a_calibrated_gaussian():
    rng = np.random.RandomState(0)
    y = rng.normal(size=200000)
    quantiles = np.tile(norm.ppf(uncertainty.LEVELS), (y.size, 1))
    scores = uncertainty.fold_scores(y, quantiles, nll=1.5)
    assert scores["coverage"] == pytest.approx(0.90, abs=0.005)
    assert scores["width"] == pytest.approx(2 * 1.6449, rel=1e-3)
    # a standard normal's expected CRPS against its own draws is 1 / sqrt(pi); the mean over
    # 19 levels between 0.05 and 0.95 approximates it within 5%
    assert scores["crps"] == pytest.approx(1 / np.sqrt(np.pi), rel=0.05)
    assert scores["nll"] == 1.5
    assert np.isnan(uncertainty.fold_scores(y[:10], quantiles[:10], None)["nll"])
