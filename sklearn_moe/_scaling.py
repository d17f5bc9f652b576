"""Feature and target scaling kept inside the estimators (float64 statistics)."""

from __future__ import annotations

import numpy as np

# Standardised inputs pass through x / sqrt(1 + (x / SMOOTH_CLIP)^2): close to the identity
# within +-2, bounded by +-SMOOTH_CLIP, so outliers (even 1e30) cannot blow up the network
# (the smooth clipping of RealMLP, Holzmueller et al. 2024).
SMOOTH_CLIP = 3.0


def fit_standardizer(values: np.ndarray, sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Column means and scales (weighted standard deviations; 1 for constant columns).

    Rows with zero ``sample_weight`` do not count, so weighting a row 0 is the same as
    leaving it out.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones(values.shape[0]) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    mean = np.average(values, axis=0, weights=weights)
    # Subtract the mean before squaring so that huge magnitudes (1e30) don't overflow.
    spread = np.sqrt(np.average((values - mean) ** 2, axis=0, weights=weights))
    tiny = ~np.isfinite(spread) | (spread <= 1e-12 * np.maximum(np.abs(mean), 1.0))
    scale = np.where(tiny, 1.0, spread)
    return mean, scale


def scale_features(X: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Standardise then smoothly clip ``X``; returns float32."""
    z = (np.asarray(X, dtype=np.float64) - mean) / scale
    return (z / np.sqrt(1.0 + (z / SMOOTH_CLIP) ** 2)).astype(np.float32)
