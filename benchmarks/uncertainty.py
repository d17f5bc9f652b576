"""Predictive distributions on the suite's regression sets: NLL, 90% interval coverage and
width, and CRPS.

    python -m benchmarks.uncertainty [--datasets ...] [--folds 3] [--max-rows 2000]

Every model sees the accuracy suite's subsample, folds and preprocessing
(:func:`benchmarks.accuracy._suite_data`, :func:`benchmarks.datasets.preprocessor`):

- ``moe_density``: ``MoERegressor(output="mixture_density")``, its other parameters at
  their defaults;
- ``moe_gaussian``: the default (point) ``MoERegressor`` with a constant-variance Gaussian
  around its prediction, the variance of its training residuals;
- ``hgb_quantile``: ``HistGradientBoostingRegressor(loss="quantile")``, one model per
  quantile level (5% and 95% for the interval; every level below for the CRPS).

The CRPS is estimated the same way for every model, from its quantiles at the levels
0.05, 0.10, ..., 0.95: twice the mean pinball loss over the levels (a Riemann sum of
``CRPS = 2 * integral_0^1 pinball_q dq``). The NLL needs a density, so it is reported for
the two MoE models only. Lower is better for NLL, width and CRPS; coverage should be 0.90.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.pipeline import make_pipeline

from sklearn_moe import MoERegressor

from .datasets import preprocessor
from .variants import run_variants

LEVELS = np.round(np.arange(0.05, 0.951, 0.05), 2)
INTERVAL = (0.05, 0.95)
MODELS = ("moe_density", "moe_gaussian", "hgb_quantile")
RESULTS = Path(__file__).parent / "results" / "uncertainty"


def pinball(y: np.ndarray, quantiles: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Mean pinball loss per level: ``mean_i max(q (y_i - x_iq), (q - 1) (y_i - x_iq))``."""
    error = y[:, None] - quantiles
    return np.maximum(levels * error, (levels - 1) * error).mean(axis=0)


def fold_scores(y: np.ndarray, quantiles: np.ndarray, nll: float | None) -> dict:
    """NLL, interval coverage and width, and CRPS from the quantiles at :data:`LEVELS`."""
    low, high = (quantiles[:, int(np.flatnonzero(np.isclose(LEVELS, q))[0])] for q in INTERVAL)
    return {"nll": np.nan if nll is None else nll, "coverage": float(np.mean((y >= low) & (y <= high))),
            "width": float(np.mean(high - low)), "crps": float(2 * pinball(y, quantiles, LEVELS).mean())}


def run_fold(name: str, model: str, X, y, train, test, seed: int) -> dict:
    """Fit on the rows ``train`` of ``(X, y)`` and score on the rows ``test``."""
    X_train, y_train, X_test, y_test = X.iloc[train], y[train], X.iloc[test], y[test]
    prep = preprocessor(X).fit(X_train)  # X: which columns need an imputer
    train, test = prep.transform(X_train), prep.transform(X_test)
    start = time.perf_counter()
    if model == "moe_density":
        moe = MoERegressor(output="mixture_density", random_state=seed).fit(train, y_train)
        quantiles, nll = moe.predict_quantiles(test, LEVELS), moe.score_nll(test, y_test)
    elif model == "moe_gaussian":
        moe = MoERegressor(random_state=seed).fit(train, y_train)
        sd = float(np.sqrt(np.mean((moe.predict(train) - y_train) ** 2)))
        mean = moe.predict(test)
        quantiles = mean[:, None] + sd * norm.ppf(LEVELS)[None, :]
        nll = float(np.mean(-norm.logpdf(y_test, mean, sd)))
    else:
        quantiles = np.column_stack([
            make_pipeline(HistGradientBoostingRegressor(loss="quantile", quantile=q, random_state=seed))
            .fit(train, y_train).predict(test) for q in LEVELS])
        quantiles = np.maximum.accumulate(quantiles, axis=1)  # separate models can cross
        nll = None
    fit_time = time.perf_counter() - start
    scores = fold_scores(np.asarray(y_test, dtype=float), quantiles, nll)
    return {"dataset": name, "model": model, **scores, "fit_time_s": fit_time,
            "summary": f"coverage {scores['coverage']:.3f} crps {scores['crps']:.4g}"}


def main(argv=None) -> pd.DataFrame:
    return run_variants("uncertainty", __doc__.split("\n\n")[0], "regression", MODELS, run_fold, report,
                        RESULTS, argv)


def report(frame: pd.DataFrame, command: str, machine: str, folds: int, seed: int, max_rows: int) -> str:
    """The markdown report of a run's per-fold ``frame``: means per data set and model."""
    table = (frame.groupby(["dataset", "model"], sort=True)[["nll", "coverage", "width", "crps", "fit_time_s"]]
             .mean().reset_index())
    return (f"# Predictive distributions\n\nCommand: `{command}`. Machine: {machine}.\n\n"
            f"{folds}-fold CV (seed {seed}) on the accuracy suite's subsamples (at most {max_rows} rows); "
            "means over the folds. NLL (nats per row) and CRPS (the target's units) are lower-is-better; the "
            "interval's width is in the target's units; coverage of "
            "the 5-95% interval (nominal 0.90); NLL needs a density (the MoE models only).\n\n"
            + table.to_markdown(index=False, floatfmt=".4g") + "\n")


if __name__ == "__main__":
    main()
