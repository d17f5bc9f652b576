"""MoEClassifier: a Mixture-of-Experts classifier (binary, multiclass and multilabel)."""

from __future__ import annotations

import inspect
import math
from numbers import Integral, Real

import numpy as np
import pandas as pd
import torch
from scipy.sparse import issparse
from scipy.special import expit, log_expit, log_softmax
from sklearn.base import ClassifierMixin
from sklearn.exceptions import DataConversionWarning
from sklearn.model_selection import StratifiedShuffleSplit
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d
from torch import nn

from ._base import BaseMoE
from ._parameters import PARAMETERS, PARTIAL_FIT, TRAINING_RAISES
from ._validation import NEGLIGIBLE_WEIGHT, _shown, check_one_label_per_row, target_shape
from ._warnings import warn_at_caller
from .nn.losses import MultilabelLoss, weighted_mean


def _check_indicator_values(y) -> None:
    """Raise a ``ValueError`` unless the multilabel ``y`` holds only 0 and 1."""
    values = np.unique(y)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"A multilabel y must be an indicator matrix of 0 and 1 (1: the row has the label); "
                         f"this one holds {values.tolist()}. Map it to 0 and 1 first, e.g. "
                         f"(Y == {values.max().item()!r}).")


def _checked_classes(classes) -> np.ndarray:
    """The sorted distinct labels of ``partial_fit``'s ``classes``."""
    classes = np.asarray(classes)
    if classes.ndim != 1 or classes.shape[0] == 0:
        raise ValueError(f"classes must be a 1-d array of the class labels, got shape {classes.shape}.")
    return np.unique(classes)


def _check_two_weighted_classes(encoded, weights, source: str) -> None:
    """Raise a ``ValueError`` unless rows of at least 2 classes have a positive weight."""
    if weights is not None and np.unique(encoded[weights > 0]).shape[0] < 2:
        raise ValueError(f"Only one class has a positive weight under {source}; a classifier needs at least 2 "
                         f"classes with positive weight (a weight below {NEGLIGIBLE_WEIGHT:g} of the largest counts as "
                         "0: it vanishes in float32 training).")


class MoEClassifier(ClassifierMixin, BaseMoE):
    __doc__ = (
        """Mixture-of-Experts neural network classifier.

    A learned gate weighs ``n_experts`` MLP experts for every row and mixes their class
    logits (see :class:`MoERegressor` for the experts, their training and the gate); trained
    with (sample-weighted) cross-entropy. Labels may be integers or strings; binary and
    multiclass problems are supported, and multilabel ones: with ``y`` a 0/1 indicator
    matrix of shape (n_samples, n_labels), every expert outputs one logit per label, the
    gate mixes them, and each label is trained on its binary cross-entropy (as
    scikit-learn's ``MLPClassifier``).

    Parameters
    ----------
"""
        + PARAMETERS
        + """    label_smoothing : float, default=0.0
        Train on the cross-entropy against targets smoothed towards the uniform
        distribution: ``(1 - label_smoothing)`` on the true class plus ``label_smoothing /
        n_classes`` on every class, in [0, 1) (multilabel: each label's 0/1 target
        smoothed towards 1/2, ``y * (1 - label_smoothing) + label_smoothing / 2``). Early
        stopping monitors the same smoothed loss on the validation rows. Predictions are
        unchanged in kind; the probabilities of a smoothed model are less confident.
    mixing : {"logits", "probabilities"}, default="logits"
        What the gate mixes. ``"logits"``: the experts' class logits, then one softmax.
        ``"probabilities"``: the experts' class probabilities (each expert's softmax), a
        mixture of categorical distributions, trained on its log-likelihood (multilabel:
        each label's probability, each expert's sigmoid, mixed by the gate).
    class_weight : dict, "balanced" or None, default=None
        Weights of the classes in the loss, ``{class_label: weight}`` (classes left out
        weigh 1), as in scikit-learn's ``LogisticRegression`` and
        ``HistGradientBoostingClassifier``; a class not in ``y`` (in a cross-validation
        fold that lacks a rare class) is unused, with a warning. ``"balanced"`` weighs
        each class by ``n_samples / (n_classes * n_samples_of_the_class)`` in the fitted
        ``y`` (rows counted, not their ``sample_weight``, as
        ``HistGradientBoostingClassifier`` does). Multiplied with ``sample_weight``; early
        stopping monitors the weighted validation loss. For one label per row only (a
        multilabel ``y`` is an error); ``partial_fit`` takes a dict only, as one batch does
        not show the classes' frequencies.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Class labels; for a multilabel ``y``, the label columns' indices ``0 ..
        n_labels - 1``, as scikit-learn's ``MLPClassifier``.
    net_ : skorch.NeuralNet
    module_ : sklearn_moe.nn.MixtureOfExperts
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
    n_iter_ : int
        Epochs run (those of this fit; ``partial_fit`` adds one per call).
    history_ : pandas.DataFrame
        One row per epoch of losses and routing metrics (see :class:`MoERegressor`).
    expert_load_ : ndarray of shape (n_experts,)
        Share of the training rows' routing per expert (sums to 1); after
        ``grow_experts`` or ``prune_experts`` and before further training, the estimate
        those methods leave (see :class:`MoERegressor`).

    Examples
    --------
    >>> from sklearn.datasets import load_iris
    >>> from sklearn_moe import MoEClassifier
    >>> X, y = load_iris(return_X_y=True)
    >>> clf = MoEClassifier(n_experts=4, max_epochs=5, random_state=0).fit(X, y)
    >>> clf.predict_proba(X[:2]).shape
    (2, 3)
    """
    )

    _fitted_attributes = BaseMoE._fitted_attributes + ("classes_", "_y_ndim")
    _parameter_constraints: dict = {
        **BaseMoE._parameter_constraints,
        "label_smoothing": [Interval(Real, 0, 1, closed="left")],
        "mixing": [StrOptions({"logits", "probabilities"})],
        "class_weight": [dict, StrOptions({"balanced"}), None],
    }

    def __init__(self, *, label_smoothing=0.0, mixing="logits", class_weight=None, **params):
        self._refuse_unknown_parameters(params)
        super().__init__(**params)
        self.label_smoothing = label_smoothing
        self.mixing = mixing
        self.class_weight = class_weight

    # scikit-learn reads an estimator's parameters off its constructor's signature: the
    # shared ones, then this one.
    _shared = inspect.signature(BaseMoE.__init__)
    __init__.__signature__ = _shared.replace(parameters=[
        *_shared.parameters.values(),
        inspect.Parameter("label_smoothing", inspect.Parameter.KEYWORD_ONLY, default=0.0),
        inspect.Parameter("mixing", inspect.Parameter.KEYWORD_ONLY, default="logits"),
        inspect.Parameter("class_weight", inspect.Parameter.KEYWORD_ONLY, default=None),
    ])
    del _shared

    def _target_validation_kwargs(self):
        return {"multi_output": True}  # a multilabel indicator matrix; a column vector is raveled below

    @property
    def _multilabel(self) -> bool:
        """Whether the model was fitted on a multilabel indicator matrix."""
        return getattr(self, "_y_ndim", 1) == 2

    def _encode_targets(self, y, sample_weight, reset, classes=None, partial=False):
        """Class indices into ``classes_`` (or the 0/1 label matrix of a multilabel ``y``),
        and the target encoding to keep (``classes_`` and ``_y_ndim`` on a first fit, and
        ``_n_outputs``). ``classes``: every class, given to ``partial_fit`` (whose ``y``
        need not hold each one, or two)."""
        if issparse(y):
            y = y.toarray()
        if y.ndim == 2 and y.shape[1] == 1:
            warn_at_caller("A column-vector y was passed when a 1d array was expected. Please change the shape "
                           "of y to (n_samples,), for example using ravel().", DataConversionWarning)
            y = y.ravel()
        multilabel = y.ndim == 2
        if not reset and multilabel != self._multilabel:
            fitted = f"a multilabel y of {self.classes_.shape[0]} labels" if self._multilabel else "one label per row"
            raise ValueError(f"The model was fitted on {fitted}, y now has shape {y.shape}, and this fit continues "
                             "it (warm_start or partial_fit); set warm_start=False and call fit to start afresh.")
        if multilabel:
            return self._encode_label_matrix(y, reset, classes)
        check_classification_targets(y)
        present = np.unique(y)
        if reset:
            if classes is None and partial:
                raise ValueError("classes must be passed on the first call to partial_fit: every class that any "
                                 "call's y may hold, e.g. np.unique(y_all).")
            classes = present if classes is None else _checked_classes(classes)
            if classes.shape[0] < 2:
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes in y, but y "
                    f"contains only one class: {classes[0]!r}."
                )
            state = {"classes_": classes, "_y_ndim": 1}
        else:
            if not partial and present.shape[0] < 2:  # a warm-start fit: one class is not a classification
                raise ValueError(
                    f"{type(self).__name__} needs samples of at least 2 classes in y, but y contains only one "
                    f"class: {present.tolist()[0]!r}. (partial_fit takes batches of one class.)"
                )
            if classes is not None and not np.array_equal(_checked_classes(classes), self.classes_):
                raise ValueError(f"classes={np.asarray(classes).tolist()[:20]} differs from the classes_ of the first "
                                 f"call, {self.classes_.tolist()[:20]}.")
            classes, state = self.classes_, {}
        unknown = np.setdiff1d(present, classes)
        if unknown.size and reset:  # partial_fit's first call
            raise ValueError(f"y has classes {unknown.tolist()[:10]} that are not among classes="
                             f"{classes.tolist()[:20]}: pass every class that any call's y may hold.")
        if unknown.size:
            raise ValueError(
                f"y has classes {unknown.tolist()[:10]} that the model does not know (classes_="
                f"{classes.tolist()[:20]}): a continued fit (warm_start or partial_fit) keeps the classes of the "
                "first, and partial_fit's first call takes them from its classes. Set warm_start=False and call fit "
                "to start afresh."
            )
        return np.searchsorted(classes, y).astype(np.int64), {**state, "_n_outputs": classes.shape[0]}

    def _loss_weight(self, targets, sample_weight, partial=False):
        """``sample_weight`` times each row's ``class_weight``, checked to leave rows of 2
        classes with a positive weight (in a ``partial_fit`` batch, which may hold a single
        class, some row)."""
        if self._multilabel:
            if self.class_weight is not None:
                raise ValueError("class_weight weighs the classes of one label per row; for a multilabel y, weigh "
                                 "the rows with sample_weight instead (e.g. by how rare their labels are).")
            return sample_weight
        if partial and isinstance(self.class_weight, str):
            raise ValueError(
                'class_weight="balanced" needs the class frequencies of all the data, which a partial_fit batch does '
                "not show. Compute them once, e.g. dict(zip(classes, sklearn.utils.class_weight.compute_class_weight("
                '"balanced", classes=classes, y=y_sample))) from a large enough sample of the targets, and pass that '
                "dict as class_weight.")
        weights, source = sample_weight, "sample_weight"
        if self.class_weight is not None:
            weights = self._class_weights(targets)[targets] * (1.0 if sample_weight is None else sample_weight)
            source = "class_weight and sample_weight"
        if weights is None:
            return None
        if not partial:
            _check_two_weighted_classes(targets, weights, source)
        elif not weights.max() > 0:
            raise ValueError(f"{source} give every row of this partial_fit batch weight 0.")
        return weights

    def _class_weights(self, targets) -> np.ndarray:
        """The weight of each class of ``classes_`` under ``class_weight``."""
        n_classes = self.classes_.shape[0]
        if isinstance(self.class_weight, str):  # "balanced", over the classes present in y
            counts = np.bincount(targets, minlength=n_classes)
            present = counts > 0
            return np.where(present, len(targets) / (present.sum() * np.maximum(counts, 1)), 0.0)
        known = set(self.classes_.tolist())
        unknown = [label for label in self.class_weight if label not in known]
        if unknown:  # as scikit-learn's classifiers, which a fold lacking a rare class needs
            warn_at_caller(f"class_weight names class(es) {unknown[:10]} that are not in y (the classes are "
                           f"{self.classes_.tolist()[:20]}); their weights are unused. If y should hold them, check "
                           "the labels' spelling and type.", UserWarning)
        weights = np.array([self.class_weight.get(label, 1.0) for label in self.classes_.tolist()], dtype=object)
        if not all(isinstance(w, Real) and not isinstance(w, bool) and np.isfinite(w) and w >= 0 for w in weights):
            raise ValueError(f"class_weight's weights must be finite non-negative numbers; got {self.class_weight!r}.")
        return weights.astype(np.float64)

    def _encode_label_matrix(self, y, reset, classes=None):
        """The 0/1 labels of a multilabel indicator matrix ``y`` as uint8, and the target
        encoding to keep (``classes``, if given, must have one entry per label)."""
        check_one_label_per_row(type(self).__name__, y)  # two values at most, else a clear error
        _check_indicator_values(y)
        n_labels = y.shape[1]
        if classes is not None and not _is_label_indices(classes, n_labels):
            given = _shown(np.asarray(classes, dtype=object).ravel().tolist())
            raise ValueError(f"classes must be the label columns' indices 0 .. {n_labels - 1} of the multilabel y "
                             f"(classes_ of a multilabel model), e.g. range({n_labels}); got [{given}].")
        if not reset and n_labels != self.classes_.shape[0]:
            raise ValueError(f"y has {n_labels} labels but the model was fitted on {self.classes_.shape[0]}, and "
                             "this fit continues it (warm_start or partial_fit); set warm_start=False and call fit "
                             "to start afresh.")
        state = {"classes_": np.arange(n_labels), "_y_ndim": 2} if reset else {}
        return np.asarray(y).astype(np.uint8), {**state, "_n_outputs": n_labels}

    def _split_order(self, targets, n_valid, rng):
        """A class of a single row kept in training, the other rows stratified by class when
        each of their classes can appear on both sides, else shuffled (and a multilabel
        target's rows shuffled)."""
        if targets.ndim == 2:
            return rng.permutation(len(targets))
        counts = np.bincount(targets)
        single = counts[targets] == 1
        n_classes = np.count_nonzero(counts > 1)
        rows = np.flatnonzero(~single)
        if n_classes < 2 or n_valid < n_classes or len(rows) - n_valid < n_classes:
            order = rows[rng.permutation(len(rows))]
        else:
            split = StratifiedShuffleSplit(n_splits=1, test_size=n_valid, random_state=rng)
            train, valid = next(split.split(np.zeros(len(rows)), targets[rows]))
            order = np.concatenate([rows[valid], rows[train]])
        return np.concatenate([order, np.flatnonzero(single)])

    def _criterion(self, label_smoothing=None):
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        if self._multilabel:
            return MultilabelLoss(smoothing)
        return nn.CrossEntropyLoss(reduction="none", label_smoothing=smoothing)

    def _comparable_criterion(self):
        """The per-row loss that configurations are compared on while they train (tuning's
        pruning): the log loss, without the training-only ``label_smoothing``."""
        return self._criterion(label_smoothing=0.0)

    def _uninformed_loss(self) -> float:
        return math.log(2) if self._multilabel else math.log(self.classes_.shape[0])

    def _constant_output(self, targets, weights):
        # The training rows' class (or label) frequencies, as logits.
        if self._multilabel:
            rate = weighted_mean(targets.float(), weights).clamp(1e-6, 1 - 1e-6)
            return torch.log(rate) - torch.log1p(-rate)
        # On the CPU: CUDA's weighted bincount has no deterministic kernel, an error under
        # torch.use_deterministic_algorithms(True).
        counts = torch.bincount(targets.cpu(), weights=None if weights is None else weights.cpu(),
                                minlength=self.classes_.shape[0])
        return (counts / counts.sum()).clamp_min(1e-6).log().to(targets.device)

    def _module_output(self) -> str:
        if self.mixing != "probabilities":
            return "point"
        return "bernoulli_mixture" if self._multilabel else "categorical_mixture"

    def fit(self, X, y, sample_weight=None, callbacks=None):
        check_one_label_per_row(type(self).__name__, y)
        return self._fit(X, y, sample_weight, callbacks)

    fit.__doc__ = """Fit the model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs: numeric columns, and the categorical ones that
            ``categorical_features`` names (by default a DataFrame's category, string,
            object and bool columns), encoded inside the estimator.
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels (integers or strings), at least two classes; or a multilabel
            indicator matrix of 0 and 1 (dense or sparse), one column per label. For
            several multiclass labels per row, see
            :class:`sklearn.multioutput.MultiOutputClassifier`.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights of the rows in the loss (not in the routing losses, where
            zero-weight rows are left out).
        callbacks : list of skorch.callbacks.Callback, optional
            Extra skorch callbacks for this fit only (plain instances or ``(name, callback)``
            pairs), e.g. to report per-epoch validation losses to an Optuna trial. They run
            after the built-in ones and are not kept on the fitted estimator.

        Returns
        -------
        MoEClassifier
            The fitted estimator (``self``).

        Raises
        ------""" + TRAINING_RAISES

    def partial_fit(self, X, y, sample_weight=None, classes=None):
        check_one_label_per_row(type(self).__name__, y)
        return self._partial_fit(X, y, sample_weight, classes)

    partial_fit.__doc__ = """Train one epoch on ``(X, y)``, continuing the fitted model.
""" + PARTIAL_FIT + """
        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training inputs, with the columns of the first call.
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels, among ``classes``; or a multilabel indicator matrix of as many
            labels as in the first call. A call's rows may hold a single class.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights of the rows in the task loss.
        classes : array-like of shape (n_classes,), optional
            Every class that any call's ``y`` may hold: required on the first call (as in
            scikit-learn), optional later (then it must be the same). For a multilabel
            ``y``, optional: the label columns' indices, ``range(n_labels)``.

        Returns
        -------
        MoEClassifier
            The fitted estimator (``self``).

        Raises
        ------
        ValueError
            If the first call has no ``classes`` (one label per row), ``y`` holds a class
            not in them, or ``X`` does not match the first call's columns.""" + TRAINING_RAISES

    def score(self, X, y, sample_weight=None):
        """Return the mean accuracy on ``X`` and ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            True labels, all of them among ``classes_`` (in cross-validation where a fold
            may lack a class, pass ``scoring="accuracy"``, which counts such rows as
            errors); for a multilabel model, the indicator matrix (the score is then the
            subset accuracy: the share of rows whose every label is predicted right).
        sample_weight : array-like of shape (n_samples,), optional
            Weights of the rows in the mean; equal weights when None.

        Returns
        -------
        float
            The (weighted) share of rows whose predicted label is the true one.

        Raises
        ------
        ValueError
            If ``y`` holds labels the model was not fitted on: it can never predict them,
            so the score would silently count them as errors; or if ``y`` is not a target
            of the kind the model was fitted on (labels, or an indicator matrix of as many
            labels).
        """
        check_is_fitted(self)
        check_one_label_per_row(type(self).__name__, y)
        shape = target_shape(y) or ()
        if self._multilabel or (len(shape) == 2 and shape[1] > 1):
            return super().score(X, self._check_label_matrix(y), sample_weight=sample_weight)
        y = column_or_1d(y, warn=True)
        missing = pd.isna(y)
        if missing.any():
            raise ValueError(f"y has {int(missing.sum())} missing label(s) (NaN, None or pd.NA), the first in row "
                             f"{int(np.flatnonzero(missing)[0])}; score on the rows with a label.")
        labels = np.unique(y)
        unseen = labels[~np.isin(labels, self.classes_)]
        if unseen.size:
            raise ValueError(
                f"y contains label(s) {unseen.tolist()[:10]} not seen in fit (classes_="
                f"{self.classes_.tolist()[:20]}); the model can never predict them. Score on rows with "
                "known labels, or refit on data that includes every class."
            )
        return super().score(X, y, sample_weight=sample_weight)

    def _check_label_matrix(self, y) -> np.ndarray:
        """``y`` as a dense array; a ``ValueError`` unless the model is multilabel and ``y``
        is an indicator matrix (of 0 and 1, dense or sparse) of its number of labels."""
        shape = target_shape(y)
        if not self._multilabel:
            raise ValueError(f"y has shape {shape}, a multilabel indicator matrix, but the model was fitted on one "
                             "label per row: pass y of shape (n_samples,).")
        if len(shape) != 2 or shape[1] != self.classes_.shape[0]:
            raise ValueError(f"The model was fitted on a multilabel y of {self.classes_.shape[0]} labels; y must be "
                             f"an indicator matrix of shape (n_samples, {self.classes_.shape[0]}), got {shape}.")
        y = y.toarray() if issparse(y) else np.asarray(y)
        _check_indicator_values(y)
        return y

    def predict_proba(self, X):
        """Predict class probabilities.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_classes), float64
            Columns follow ``classes_``. For a multilabel model, each label's probability
            (its mixed logit's sigmoid), independently of the others: a row's need not sum
            to 1.
        """
        logits = self._raw_output(X)  # a new array: the probabilities are computed in its place
        if self._multilabel:
            return expit(logits, out=logits)
        # scipy.special.softmax's operations, in place: with many classes its temporaries
        # took three times the probabilities' memory.
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        return logits

    def predict_log_proba(self, X):
        """Predict the logarithm of the class probabilities (:meth:`predict_proba`).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_classes), float64
            The log-probabilities, computed stably from the logits; columns follow
            ``classes_``.
        """
        logits = self._raw_output(X)
        return log_expit(logits) if self._multilabel else log_softmax(logits, axis=1)

    def predict(self, X):
        """Predict class labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.

        Returns
        -------
        ndarray of shape (n_samples,) or (n_samples, n_labels)
            Each row's most probable class, an element of ``classes_``; for a multilabel
            model, the indicator matrix (int64) of the labels whose probability exceeds
            1/2.
        """
        # Each chunk's logits are reduced to its labels as they come: the whole
        # (n_samples, n_classes) logit matrix is never held.
        X_scaled = self._scaled_input(X)
        if self._multilabel:
            return self._forward(X_scaled, "predict", reduce=lambda logits: (logits > 0).long())
        return self.classes_[self._forward(X_scaled, "predict", reduce=lambda logits: logits.argmax(dim=1))]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags


def _is_label_indices(classes, n_labels: int) -> bool:
    """Whether ``classes`` is ``0 .. n_labels - 1``, the classes of a multilabel model."""
    values = np.asarray(classes, dtype=object).ravel()
    return values.size == n_labels and all(
        isinstance(value, Integral) and not isinstance(value, bool) and value == index
        for index, value in enumerate(values))
