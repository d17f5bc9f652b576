"""MoERegressor: a Mixture-of-Experts regressor (single or multi-output)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from sklearn.base import RegressorMixin
from sklearn.utils._param_validation import StrOptions
from torch import nn

from ._base import BaseMoE
from ._density_methods import DensityMethods
from ._parameters import PARAMETERS, PARTIAL_FIT, TRAINING_RAISES
from ._scaling import fit_standardizer
from ._validation import non_numeric_target_error
from .nn.density import REGRESSOR_OUTPUTS, SCALE_FLOOR
from .nn.losses import weighted_mean


class MoERegressor(DensityMethods, RegressorMixin, BaseMoE):
    __doc__ = (
        """Mixture-of-Experts neural network regressor.

    A learned gate weighs ``n_experts`` MLP experts for every row and mixes their
    outputs. By default the experts share one MLP's weights and differ by their own
    elementwise adapters, biases and output heads; every expert is trained on its own loss,
    weighted by its gate, and the gate, which learns ten times slower than the experts, on
    the mixture's loss; numeric columns enter through piecewise-linear embeddings. Inputs
    and targets are standardised inside the estimator; training uses AdamW with gradient
    clipping, a flat-then-cosine learning-rate schedule and early stopping on an internal
    validation split with the best weights restored.

    Parameters
    ----------
"""
        + PARAMETERS
        + """    output : {"point", "mixture_density"}, default="point"
        ``"mixture_density"``: every expert predicts a Gaussian (a mean and a standard
        deviation, floored) per target and the gate mixes them; training minimises the
        mixture's negative log-likelihood (``expert_loss="per_expert"``: each expert's own,
        weighted by its gate, and the mixture's for the gate: every expert then fits the
        whole conditional distribution, so for a target with several modes at the same
        input use ``expert_loss="mixture"``, under which the experts split the modes).
        ``predict`` returns the
        mixture's mean; ``predict(X, return_std=True)``, ``predict_quantiles``,
        ``sample``, ``predict_distribution`` and ``score_nll`` describe the distribution.
        After training, the spread is recalibrated on the validation rows (see
        ``scale_calibration_``).

    Attributes
    ----------
    net_ : skorch.NeuralNet
        The training engine.
    module_ : sklearn_moe.nn.MixtureOfExperts
        The fitted network.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Defined only when X has string feature names.
    n_iter_ : int
        Epochs run (those of this fit; ``partial_fit`` adds one per call).
    history_ : pandas.DataFrame
        One row per epoch, labelled by its number (also the ``epoch`` column):
        ``train_loss`` (with aux losses), ``task_loss``, ``valid_loss``, ``balance_loss``,
        ``z_loss``, ``load_imbalance``, ``routing_entropy``, ``dropped_fraction``, ``dur``
        and more.
    expert_load_ : ndarray of shape (n_experts,)
        Share of the training rows' routing per expert (sums to 1): fraction of routing
        assignments for sparse routers, mean gate weight for the dense router. After
        ``grow_experts`` or ``prune_experts``, until the model trains again, it is their
        estimate (a split expert's share divided among its copies; the kept experts'
        shares renormalised), not a measurement.
    scale_calibration_ : float
        ``output="mixture_density"`` only: the factor, at least 1, by which every expert's
        standard deviation is multiplied, chosen after training to minimise the negative
        log-likelihood of the validation rows. A fit that holds none out
        (``early_stopping=False``, ``partial_fit``) keeps it as it was: 1.0 on a new model,
        the earlier factor in a continued fit.

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn_moe import MoERegressor
    >>> X, y = load_diabetes(return_X_y=True)
    >>> model = MoERegressor(n_experts=4, max_epochs=5, random_state=0).fit(X, y)
    >>> model.predict(X[:2]).shape
    (2,)
    """
    )

    _target_encoding = ("_y_mean", "_y_scale", "_y_ndim")
    _fitted_attributes = BaseMoE._fitted_attributes + _target_encoding
    _parameter_constraints: dict = {**BaseMoE._parameter_constraints, "output": [StrOptions(set(REGRESSOR_OUTPUTS))]}

    def __init__(self, *, output="point", **params):
        self._refuse_unknown_parameters(params)
        super().__init__(**params)
        self.output = output

    # scikit-learn reads an estimator's parameters off its constructor's signature: the
    # shared ones, then this one.
    _shared = inspect.signature(BaseMoE.__init__)
    __init__.__signature__ = _shared.replace(parameters=[
        *_shared.parameters.values(),
        inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default="point"),
    ])
    del _shared

    def _target_validation_kwargs(self):
        return {"multi_output": True, "y_numeric": True}

    def _encode_targets(self, y, sample_weight, reset, classes=None, partial=False):
        """Standardised float32 targets, and the target encoding to keep (``_y_ndim``,
        and ``_y_mean`` and ``_y_scale`` on a first fit, and ``_n_outputs``)."""
        try:
            y = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise non_numeric_target_error(type(self).__name__, y) from error
        y2d = y.reshape(len(y), -1)
        if reset:
            # A constant target gets scale 0, so that it is predicted exactly.
            y_mean, y_scale = fit_standardizer(y2d, sample_weight, constant_scale=0.0)
            state = {"_y_ndim": y.ndim, "_y_mean": y_mean, "_y_scale": y_scale}
        elif y2d.shape[1] != self._y_mean.shape[0]:
            raise ValueError(
                f"y has {y2d.shape[1]} targets but the fitted model, which this fit continues (warm_start or "
                f"partial_fit), predicts {self._y_mean.shape[0]}; set warm_start=False and call fit to start afresh."
            )
        else:
            # Predictions take the shape of the latest fit's y: (n,) or (n, 1) for one target.
            y_mean, y_scale, state = self._y_mean, self._y_scale, {"_y_ndim": y.ndim}
            # A target constant so far (scale 0: predicted exactly) that now varies gets an
            # encoding from this call's rows and the constant, else it would be predicted
            # forever. The network, trained on zeros, maps to the new mean.
            counted = y2d if sample_weight is None else y2d[sample_weight > 0]
            refit = (y_scale == 0) & (counted != y_mean).any(axis=0)
            if refit.any():
                weights = None  # the constant weighs as an average row
                if sample_weight is not None:
                    weights = np.append(sample_weight, sample_weight[sample_weight > 0].mean())
                new_mean, new_scale = fit_standardizer(np.vstack((y2d, y_mean)), weights, constant_scale=0.0)
                y_mean, y_scale = np.where(refit, new_mean, y_mean), np.where(refit, new_scale, y_scale)
                state = {**state, "_y_mean": y_mean, "_y_scale": y_scale}
        if sample_weight is not None:
            # Rows of weight 0 do not count, but a huge target there would still overflow
            # the scaling or the float32 loss (0 * inf = nan): they get the mean.
            y2d = np.where((sample_weight > 0)[:, None], y2d, y_mean)
        targets = ((y2d - y_mean) / np.where(y_scale > 0, y_scale, 1.0)).astype(np.float32)
        return targets, {**state, "_n_outputs": y2d.shape[1]}

    def _criterion(self):
        return nn.MSELoss(reduction="none")

    def _comparable_criterion(self):
        """The per-row loss that configurations are compared on while they train (tuning's
        pruning): the squared error of the prediction (a density mixture's mean) on the
        standardised targets, whatever ``output`` trains on."""
        return self._criterion()

    def _module_output(self) -> str:
        return self.output

    def _constant_output(self, targets, weights):
        mean = weighted_mean(targets, weights)
        if self.output != "mixture_density":
            return mean
        # One Gaussian per target, of the rows' mean and spread.
        return mean, weighted_mean((targets - mean) ** 2, weights).clamp_min(SCALE_FLOOR ** 2)

    def _constant_loss_per_row(self, constant, targets):
        if self.output != "mixture_density":
            return super()._constant_loss_per_row(constant, targets)
        # The Gaussians' negative log-likelihood, summed over the targets as the mixture's is.
        mean, variance = constant
        return (0.5 * torch.log(2 * math.pi * variance) + (targets - mean) ** 2 / (2 * variance)).sum(dim=1)

    def _uninformed_loss(self) -> float:
        # The standardised targets' mean: squared error 1; as a density, the standard
        # normal's negative log-likelihood, summed over the targets.
        if self.output == "mixture_density":
            return 0.5 * math.log(2 * math.pi * math.e) * self._n_outputs
        return 1.0

    def fit(self, X, y, sample_weight=None, callbacks=None):
        return self._fit(X, y, sample_weight, callbacks)

    fit.__doc__ = """Fit the model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs: numeric columns, and the categorical ones that
            ``categorical_features`` names (by default a DataFrame's category, string,
            object and bool columns), encoded inside the estimator.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Numeric targets, standardised inside the estimator; predictions have the same
            dimensionality.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights of the rows in the task loss (not in the routing losses,
            where zero-weight rows are left out).
        callbacks : list of skorch.callbacks.Callback, optional
            Extra skorch callbacks for this fit only (plain instances or ``(name, callback)``
            pairs), e.g. to report per-epoch validation losses to an Optuna trial. They run
            after the built-in ones and are not kept on the fitted estimator.

        Returns
        -------
        MoERegressor
            The fitted estimator (``self``).

        Raises
        ------""" + TRAINING_RAISES

    def partial_fit(self, X, y, sample_weight=None):
        return self._partial_fit(X, y, sample_weight)

    partial_fit.__doc__ = """Train one epoch on ``(X, y)``, continuing the fitted model.
""" + PARTIAL_FIT + """
        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs, with the columns of the first call.
        y : array-like of shape (n_samples,) or (n_samples, n_targets)
            Numeric targets, as many as in the first call.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights of the rows in the task loss.

        Returns
        -------
        MoERegressor
            The fitted estimator (``self``).

        Raises
        ------
        ValueError
            If ``X`` or ``y`` do not match the first call's columns or targets.""" + TRAINING_RAISES

    def predict(self, X, return_std=False):
        """Predict targets.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.
        return_std : bool, default=False
            Also return the standard deviation of each row's predictive mixture (as
            ``GaussianProcessRegressor`` does); needs ``output="mixture_density"``.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,) or (n_samples, n_targets), float64
            Same dimensionality as the ``y`` given to ``fit``; with
            ``output="mixture_density"``, the mixture's mean.
        y_std : ndarray of the same shape as ``y_pred``, float64
            Only with ``return_std=True``: the standard deviation of each row's predictive
            mixture.
        """
        if return_std:
            return self._predict_std(X)
        y = self._raw_output(X) * self._y_scale + self._y_mean
        return y.ravel() if self._y_ndim == 1 else y

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
