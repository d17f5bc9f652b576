"""Feature and target scaling kept inside the estimators (float64 statistics)."""

from __future__ import annotations

import numpy as np

# Robustly standardised inputs pass through x / sqrt(1 + (x / SMOOTH_CLIP)^2): close to the identity
# within +-2, bounded by +-SMOOTH_CLIP, so outliers (even 1e30) cannot blow up the network
# (the smooth clipping of RealMLP, Holzmueller et al. 2024).
SMOOTH_CLIP = 3.0


# The interquartile range of a normal distribution is 1.349 standard deviations.
_IQR_PER_STD = 1.349


# Spreads below this are treated as zero: dividing by them would overflow.
_TINY_SPREAD = np.finfo(np.float64).tiny / np.finfo(np.float64).eps


def _negligible(spread: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Spreads that are rounding noise relative to the centre (constant columns), at any scale."""
    return ~np.isfinite(spread) | (spread <= np.maximum(1e-12 * np.abs(center), _TINY_SPREAD))


def fit_standardizer(values: np.ndarray, sample_weight: np.ndarray | None = None,
                     constant_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Column means and scales (weighted standard deviations; ``constant_scale`` for constant
    columns).

    Rows with zero ``sample_weight`` do not count, so weighting a row 0 is the same as
    leaving it out.
    """
    values = np.asarray(values, dtype=np.float64)
    if sample_weight is None:
        weights = np.ones(values.shape[0])
    else:
        counted = np.asarray(sample_weight) > 0
        values, weights = values[counted], np.asarray(sample_weight, dtype=np.float64)[counted]
    # Work on values divided by each column's magnitude, so that sums and squares of huge
    # values (1e300) cannot overflow.
    magnitude = np.abs(values).max(axis=0, initial=0.0)
    magnitude = np.where(magnitude > 0, magnitude, 1.0)
    unit = values / magnitude
    unit_mean = np.average(unit, axis=0, weights=weights)
    unit_spread = np.sqrt(np.average((unit - unit_mean) ** 2, axis=0, weights=weights))
    mean, spread = unit_mean * magnitude, unit_spread * magnitude
    return mean, np.where(_negligible(spread, mean), constant_scale, spread)


def weighted_quantiles(values: np.ndarray, quantiles, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Column-wise quantiles (inverted CDF), shape (len(quantiles), n_columns).

    Rows with zero weight do not count.
    """
    values = np.asarray(values, dtype=np.float64)
    if sample_weight is not None:
        keep = np.asarray(sample_weight) > 0
        values, weights = values[keep], np.asarray(sample_weight, dtype=np.float64)[keep]
    else:
        weights = np.ones(values.shape[0])
    order = np.argsort(values, axis=0, kind="stable")
    cumulative = np.cumsum(weights[order], axis=0)
    cumulative /= cumulative[-1]
    columns = np.arange(values.shape[1])
    result = []
    for q in np.atleast_1d(quantiles):
        position = np.minimum((cumulative < q).sum(axis=0), values.shape[0] - 1)
        result.append(values[order[position, columns], columns])
    return np.array(result)


def fit_robust_scaler(values: np.ndarray, sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column centres and scales for the inputs: median and interquartile range / 1.349.

    Robust to outliers and skew, and equal to mean and standard deviation for normal data.
    Columns whose interquartile range is zero (e.g. rare one-hot columns) fall back to mean
    and standard deviation, and constant columns to a scale of 1.
    """
    median, q25, q75 = weighted_quantiles(values, (0.5, 0.25, 0.75), sample_weight)
    spread = (q75 - q25) / _IQR_PER_STD
    mean, std = fit_standardizer(values, sample_weight)
    robust = ~_negligible(spread, median)
    return np.where(robust, median, mean), np.where(robust, spread, std)


def scale_features(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Centre, scale, then smoothly clip ``X``; returns float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        # Far outliers over tiny scales overflow to t = +-inf, which maps to +-SMOOTH_CLIP;
        # hypot instead of sqrt(1 + t^2) keeps huge finite t from overflowing.
        t = (np.asarray(X, dtype=np.float64) - mean) / (scale * SMOOTH_CLIP)
        clipped = t / np.hypot(1.0, t)
    clipped = np.where(np.isinf(t), np.sign(t), clipped)
    return (SMOOTH_CLIP * clipped).astype(np.float32)
