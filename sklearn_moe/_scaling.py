"""Feature and target scaling kept inside the estimators (float64 statistics)."""

from __future__ import annotations

import numpy as np
import torch

# Robustly standardised inputs pass through x / sqrt(1 + (x / SMOOTH_CLIP)^2): close to the identity
# within +-2, bounded by +-SMOOTH_CLIP, so outliers (even 1e30) cannot blow up the network
# (the smooth clipping of RealMLP, Holzmueller et al. 2024).
SMOOTH_CLIP = 3.0
# From here on t / sqrt(1 + t^2) is 1 in float32.
_CLIP_SATURATED = 1e8
# Inputs with at least this many values are scaled with torch's threaded kernels.
_THREADED_MIN_SIZE = 1 << 15
# fit_robust_scaler works on blocks of columns of about this many values (128 MiB of float64).
_SCALER_BLOCK_VALUES = 1 << 24
_BLOCK_VALUES = 1 << 18


# The interquartile range of a normal distribution is 1.349 standard deviations.
_IQR_PER_STD = 1.349


# Spreads below this are treated as zero: dividing by them would overflow.
_TINY_SPREAD = np.finfo(np.float64).tiny / np.finfo(np.float64).eps


def _negligible(spread: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Spreads that are rounding noise of values up to ``magnitude`` in size (a few dozen
    ulps: a column constant but for rounding, ``0.1 * 3`` beside ``0.3``), too small to
    divide by, or not finite. A spread far below the values' size but above that (1e13 +
    N(0, 1)) is the signal."""
    noise = np.maximum(_ROUNDING_ULPS * np.finfo(np.float64).eps * np.abs(magnitude), _TINY_SPREAD)
    return ~np.isfinite(spread) | (spread <= noise)


# Spreads within this many float64 ulps of the values' magnitude are rounding noise.
_ROUNDING_ULPS = 64


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
    return mean, np.where(_negligible(spread, magnitude), constant_scale, spread)


def weighted_quantiles(values: np.ndarray, quantiles, sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Column-wise quantiles (inverted CDF), shape (len(quantiles), n_columns).

    Rows with zero weight do not count. Without weights, numpy's quantiles of the same
    definition: a partial sort of each column, several times faster than the weighted full
    sort on a million rows.
    """
    values = np.asarray(values, dtype=np.float64)
    if sample_weight is None:
        return np.quantile(values, np.atleast_1d(quantiles), axis=0, method="inverted_cdf")
    keep = np.asarray(sample_weight) > 0
    values, weights = values[keep], np.asarray(sample_weight, dtype=np.float64)[keep]
    order = np.argsort(values, axis=0, kind="stable")
    cumulative = np.cumsum(weights[order], axis=0)
    cumulative /= cumulative[-1]
    columns = np.arange(values.shape[1])
    result = []
    for q in np.atleast_1d(quantiles):
        position = np.minimum((cumulative < q).sum(axis=0), values.shape[0] - 1)
        result.append(values[order[position, columns], columns])
    return np.array(result)


def fit_robust_scaler(values: np.ndarray, sample_weight: np.ndarray | None = None, n_passthrough: int = 0,
                      constant_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Column centres and scales for the inputs: median and interquartile range / 1.349.

    Robust to outliers and skew, and equal to mean and standard deviation for normal data.
    Columns whose interquartile range is zero (e.g. rare one-hot columns) fall back to mean
    and standard deviation, and constant columns (among the rows of positive weight) to
    ``constant_scale``: ``inf`` scales whatever such a column later holds to 0, the value
    the network was trained on. The last ``n_passthrough`` columns (category codes) get
    centre 0 and scale 1, which :func:`scale_features` leaves alone.
    """
    if n_passthrough:
        mean, scale = fit_robust_scaler(values[:, :-n_passthrough], sample_weight, constant_scale=constant_scale)
        return np.concatenate((mean, np.zeros(n_passthrough))), np.concatenate((scale, np.ones(n_passthrough)))
    # Blocks of columns: each column's statistics are its own, and over the whole matrix at
    # once the sorts' and the standardizer's temporaries would take several times its size.
    # A block holds two columns at least: numpy sums a lone column in another order.
    n_columns = values.shape[1]
    if n_columns == 0:  # every input a category code
        return np.zeros(0), np.ones(0)
    step = max(2, _SCALER_BLOCK_VALUES // max(1, values.shape[0]))
    starts = list(range(0, n_columns, step))
    if len(starts) > 1 and n_columns - starts[-1] == 1:
        starts.pop()
    bounds = [*starts, n_columns]
    blocks = [_robust_scaler_block(values[:, start:stop], sample_weight, constant_scale)
              for start, stop in zip(bounds, bounds[1:])]
    if len(blocks) == 1:
        return blocks[0]
    return np.concatenate([mean for mean, _ in blocks]), np.concatenate([scale for _, scale in blocks])


def _robust_scaler_block(values: np.ndarray, sample_weight, constant_scale: float) -> tuple[np.ndarray, np.ndarray]:
    median, q25, q75 = weighted_quantiles(values, (0.5, 0.25, 0.75), sample_weight)
    spread = (q75 - q25) / _IQR_PER_STD
    mean, std = fit_standardizer(values, sample_weight, constant_scale)
    robust = ~_negligible(spread, np.maximum(np.abs(q25), np.abs(q75)))
    return np.where(robust, median, mean), np.where(robust, spread, std)


def scale_features(X: np.ndarray, mean: np.ndarray, scale: np.ndarray, n_passthrough: int = 0) -> np.ndarray:
    """Centre, scale, then smoothly clip ``X``; returns a new float32 array.

    The last ``n_passthrough`` columns (category codes) pass through unchanged.

    Centring and scaling are float64 (columns far from float32's range stay exact); the
    clip ``t / sqrt(1 + t^2)`` runs in float32, which holds its result, with ``|t| >= 1e8``
    (where it is 1 to float32 precision, and ``t^2`` could overflow) mapped to ``sign(t)``.
    Large inputs go through torch's threaded kernels (numpy's single-threaded passes were
    most of a large prediction's time), small ones through numpy (a few microseconds,
    where each torch call costs more). Both give the same float32 values to the last bit
    (a row's prediction must not depend on its batch's size): the same operations in the
    same order, with torch's square root taken in float64, as torch's float32 one is not
    always correctly rounded, as numpy's is.
    """
    if n_passthrough:
        head = scale_features(X[:, :-n_passthrough], mean[:-n_passthrough], scale[:-n_passthrough])
        return np.concatenate((head, np.asarray(X[:, -n_passthrough:], dtype=np.float32)), axis=1)
    # Divided in two steps: scale * SMOOTH_CLIP can overflow for scales near float64's maximum.
    inverse = (1.0 / np.asarray(scale, dtype=np.float64)) / SMOOTH_CLIP
    mean = np.asarray(mean, dtype=np.float64)
    if np.size(X) < _THREADED_MIN_SIZE:
        with np.errstate(over="ignore", invalid="ignore"):
            t = ((np.asarray(X, dtype=np.float64) - mean) * inverse).astype(np.float32)
            clipped = t / np.sqrt(t * t + np.float32(1.0))
        saturated = np.abs(t) >= _CLIP_SATURATED
        if saturated.any():
            clipped = np.where(saturated, np.sign(t), clipped)
        return clipped * np.float32(SMOOTH_CLIP)
    X = np.asarray(X)
    mean, inverse = torch.from_numpy(mean), torch.from_numpy(inverse)
    scaled = torch.empty(X.shape, dtype=torch.float32)
    # Row blocks of ~1 MiB: the six passes over a block then run in cache (a third faster
    # than over the whole array at 100k x 32).
    rows = max(1, _BLOCK_VALUES // max(1, X.shape[1]))
    for start in range(0, X.shape[0], rows):
        # Each block copied by numpy into a float64 array of its own, which torch takes
        # whatever X is (read-only, reversed, big-endian, longdouble).
        block = torch.from_numpy(np.array(X[start:start + rows], dtype=np.float64))
        t = block.sub_(mean).mul_(inverse).float()
        clipped = torch.div(t, t.square().add_(1.0).double().sqrt_().float())
        saturated = t.abs() >= _CLIP_SATURATED
        if bool(saturated.any()):
            clipped = torch.where(saturated, torch.sign(t), clipped)
        torch.mul(clipped, SMOOTH_CLIP, out=scaled[start:start + rows])
    return scaled.numpy()
