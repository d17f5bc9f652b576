"""MoERegressor's predictive-distribution methods (``output="mixture_density"``)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import ndtr
from sklearn.utils import check_random_state

from .nn._checks import check_int
from .nn.density import calibrated_scale, mixture_moments, mixture_nll_dense

#: The range of the spread's recalibration factor. It only widens: trained on the likelihood
#: of the training rows, a model's spread fits them, and new rows are not, on average,
#: predicted better than those; a factor below 1 on the validation rows reflects their luck
#: (and early stopping having chosen the epoch on them) rather than too wide a spread.
CALIBRATION_BOUNDS = (1.0, 8.0)


class DensityMethods:
    """``predict(X, return_std=True)``, ``predict_quantiles``, ``sample``,
    ``predict_distribution`` and ``score_nll`` of a mixture-density regressor, and the
    recalibration of its spread on the validation rows."""

    @property
    def scale_calibration_(self) -> float:
        """Factor every expert's standard deviation is multiplied by (``output="mixture_density"``).

        It is fitted after training on the validation rows: at least 1. A fit without them
        (``early_stopping=False``, or ``partial_fit``) leaves it as it was: 1.0 on a new
        model, the earlier factor in a continued fit.

        Raises
        ------
        AttributeError
            If the estimator is not fitted, or not with ``output="mixture_density"``.
        """
        if not self.__sklearn_is_fitted__() or self.output != "mixture_density":
            raise AttributeError("scale_calibration_ is fitted only with output='mixture_density'.")
        return float(self.module_.scale_calibration)

    def _after_training(self, valid_table) -> None:
        """Fit the spread's recalibration (:func:`~sklearn_moe.nn.density.calibrated_scale`):
        trained on the likelihood of the training rows, the experts' scales shrink to fit
        them; the validation rows, held out of training, measure the spread new rows see."""
        if self.output != "mixture_density" or valid_table is None:
            return  # a new module's factor is 1; a continued fit keeps its factor
        module = self.module_
        module.scale_calibration.fill_(1.0)
        # In chunks, as prediction runs; the search itself is in float64, on the CPU.
        weights, means, scales = (torch.from_numpy(values) for values in
                                  self._forward(valid_table.X, "predict_distribution"))
        row_weight = None if valid_table.sample_weight is None else valid_table.sample_weight.cpu()
        module.scale_calibration.fill_(calibrated_scale(weights, means, scales, valid_table.y.cpu(), row_weight,
                                                        bounds=CALIBRATION_BOUNDS))

    def predict_distribution(self, X) -> dict:
        """Predict each row's mixture of Gaussians, in the target's units.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.

        Returns
        -------
        dict
            ``weights``: ndarray (n_samples, n_experts), the gate weights (rows sum to 1;
            zero for experts a sparse router did not choose); ``means`` and ``scales``:
            ndarrays (n_samples, n_experts), or (n_samples, n_experts, n_targets) for a 2-d
            ``y``, each expert's Gaussian mean and standard deviation.

        Raises
        ------
        ValueError
            If the estimator's ``output`` is not ``"mixture_density"``.
        """
        weights, means, scales = self._distribution(X)
        if self._y_ndim == 1:
            means, scales = means[..., 0], scales[..., 0]
        return {"weights": weights, "means": means, "scales": scales}

    def predict_quantiles(self, X, q) -> np.ndarray:
        """Predict quantiles of each row's predictive mixture.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.
        q : float or array-like of float
            The quantile levels, each in (0, 1), in any order.

        Returns
        -------
        ndarray
            Of shape (n_samples, n_quantiles), or (n_samples, n_targets, n_quantiles) for a
            2-d ``y``, float64, in the target's units; the last axis follows ``q``, and the
            values are nondecreasing in ``q`` for every row.

        Raises
        ------
        ValueError
            If a level is not in (0, 1), or the estimator's ``output`` is not
            ``"mixture_density"``.
        """
        levels = np.atleast_1d(np.asarray(q, dtype=np.float64))
        if levels.ndim != 1 or not np.all((levels > 0) & (levels < 1)):
            raise ValueError(f"q must be probabilities in (0, 1), got {q!r}.")
        weights, means, scales = self._distribution(X)
        constant = self._constant_targets  # a point mass: each of its quantiles is its value
        scales = np.where(constant, 1.0, scales)
        order = np.argsort(levels, kind="stable")
        low = (means - 12 * scales).min(axis=1)
        high = (means + 12 * scales).max(axis=1)
        results = np.empty((*low.shape, levels.size))
        for position in order:  # bisection on the mixture's CDF, to float64 resolution
            lo, hi = low.copy(), high.copy()
            for _ in range(80):
                mid = (lo + hi) / 2
                cdf = (weights[:, :, None] * ndtr((mid[:, None, :] - means) / scales)).sum(axis=1)
                below = cdf < levels[position]
                lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
            results[..., position] = (lo + hi) / 2
        results[..., order] = np.maximum.accumulate(results[..., order], axis=-1)  # monotone in q
        results[:, constant, :] = self._y_mean[constant, None]
        return results[:, 0, :] if self._y_ndim == 1 else results

    def sample(self, X, n_samples: int = 1, random_state=None) -> np.ndarray:
        """Draw samples from each row's predictive mixture.

        Parameters
        ----------
        X : array-like of shape (n_samples_X, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.
        n_samples : int, default=1
            Number of draws per row.
        random_state : int, RandomState instance or None, default=None
            Seed or generator of the draws (an expert by its gate weight, then its
            Gaussian); None uses NumPy's global generator.

        Returns
        -------
        ndarray
            Of shape (n_samples_X, n_samples), or (n_samples_X, n_samples, n_targets) for a
            2-d ``y``, float64, in the target's units.

        Raises
        ------
        ValueError
            If ``n_samples`` is not a positive int, or the estimator's ``output`` is not
            ``"mixture_density"``.
        """
        check_int("n_samples", n_samples)
        rng = check_random_state(random_state)
        weights, means, scales = self._distribution(X)
        cumulative = np.cumsum(weights, axis=1)
        draws = rng.uniform(size=(weights.shape[0], n_samples)) * cumulative[:, -1:]
        experts = np.minimum((draws[:, :, None] > cumulative[:, None, :]).sum(axis=2), weights.shape[1] - 1)
        rows = np.arange(weights.shape[0])[:, None]
        values = means[rows, experts] + scales[rows, experts] * rng.standard_normal((*experts.shape, means.shape[2]))
        return values[..., 0] if self._y_ndim == 1 else values

    def score_nll(self, X, y) -> float:
        """Score ``y`` by its mean negative log-likelihood under the predictive mixtures.

        The score is ``-mean_i log p(y_i | x_i)``, with the densities in the target's units;
        lower is better.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            The observed targets, with as many targets as in ``fit``.

        Returns
        -------
        float
            The mean negative log-likelihood (nats).

        Raises
        ------
        ValueError
            If ``y`` has another number of rows than ``X``, another number of targets than
            the model predicts, or a missing or infinite value, or the estimator's
            ``output`` is not ``"mixture_density"``, or the model was fitted on a
            constant target (a point mass, which has no density).
        """
        constant = self._constant_targets
        if constant.any():
            raise ValueError(f"The model was fitted on a constant target ({self._y_mean[constant][0]:g}): its "
                             "predictive distribution is a point mass, which has no density to score y by.")
        weights, means, scales = self._distribution(X)
        y = np.array(y, dtype=np.float64)  # a copy: a pandas column's values may be read-only
        if y.ndim == 0 or y.shape[0] != weights.shape[0]:
            raise ValueError(f"X has {weights.shape[0]} rows but y has {y.shape[0] if y.ndim else 'none (a scalar)'}.")
        if not np.isfinite(y).all():
            raise ValueError("Input y contains NaN or infinity; a likelihood needs observed targets.")
        y = y.reshape(weights.shape[0], -1)
        if y.shape[1] != means.shape[2]:
            raise ValueError(f"y has {y.shape[1]} targets; the model predicts {means.shape[2]}.")
        nll = mixture_nll_dense(*(torch.as_tensor(a) for a in (weights, means, scales, y)))
        return float(nll.mean())

    def _predict_std(self, X) -> tuple[np.ndarray, np.ndarray]:
        weights, means, scales = self._distribution(X)
        mean, std = mixture_moments(*(torch.as_tensor(a) for a in (weights, means, scales)))
        constant = self._constant_targets
        mean, std = np.where(constant, self._y_mean, mean.numpy()), np.where(constant, 0.0, std.numpy())
        return (mean[:, 0], std[:, 0]) if self._y_ndim == 1 else (mean, std)

    @property
    def _constant_targets(self) -> np.ndarray:
        """Which targets were constant in fit (scale 0): their distribution is a point mass."""
        return self._y_scale == 0

    def _distribution(self, X):
        """Gate weights (n, E) and the experts' means and scales (n, E, k), float64, in the
        target's units."""
        if self.output != "mixture_density":
            raise ValueError(f"{type(self).__name__} predicts distributions only with output='mixture_density'; "
                             f"this one has output={self.output!r}.")
        weights, means, scales = self._forward(self._scaled_input(X), "predict_distribution")
        weights = weights / weights.sum(axis=1, keepdims=True)
        # A constant target (scale 0) is a point mass at its value: every mean is the
        # value, every scale 0, as ``predict`` gives the value itself.
        return weights, means * self._y_scale + self._y_mean, scales * self._y_scale
