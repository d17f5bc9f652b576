"""The estimators' methods that inspect and edit a fitted model's experts."""

from __future__ import annotations

from ._pruning import prune_experts
from ._report import routing_report


class ExpertMethods:
    """``routing_report`` and ``prune_experts``, shared by the estimators (through
    :class:`~sklearn_moe._base.BaseMoE`)."""

    def prune_experts(self, threshold=0.01):
        """Remove the experts whose share of the routing is below ``threshold``.

        The share is ``expert_load_``, measured on the training data: the mean gate weight
        under a dense router, the share of routed rows under a sparse one. The kept
        experts keep their weights and their rows of the router, whose softmax then
        renormalises over them; ``n_experts`` becomes the number kept, ``route`` returns
        that many columns, ``expert_load_`` is renormalised, and the model saves, loads and
        trains on (``warm_start``) as any other. Removing an expert with gate weight ``g``
        on a row changes that row's prediction by at most about ``g`` times the spread of
        the experts' outputs there, so experts with a share below 1% move predictions by
        little; under a sparse router, the few rows that chose a removed expert go to
        their next choice instead.

        Parameters
        ----------
        threshold : float in [0, 1), default=0.01
            Smallest share of the routing an expert must have to be kept.

        Returns
        -------
        self
            The estimator, with fewer experts, or unchanged when none is below
            ``threshold``.

        Raises
        ------
        ValueError
            For ``router="hierarchical"``, or when every expert is below ``threshold``.
        """
        return prune_experts(self, threshold)

    def routing_report(self, X, y=None, n_top_features=3):
        """Report what each expert does on ``X``: one row per expert.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.
        y : array-like of shape (n_samples,), optional
            With targets, each expert's ``score`` on the rows it serves.
        n_top_features : int, default=3
            Number of inputs listed in ``distinguishing_features``.

        Returns
        -------
        pandas.DataFrame
            Indexed by ``expert``: ``share`` (of the rows whose first choice it is),
            ``mean_gate`` (its mean gate weight), ``n_rows`` (rows served first),
            ``score`` (with ``y``: the estimator's ``score`` on those rows; NaN below two)
            and ``distinguishing_features``: the inputs whose mean on those rows differs
            most from the other rows', in standard deviations of the (scaled) input, e.g.
            ``"x2 (+1.35), x0 (-0.40)"``. The inputs are the model's: a one-hot encoded
            column's categories (``"city=Paris"``) and the missing-value indicators
            (``"income (missing)"``) count one by one; an embedded column's codes are left
            out.

        Raises
        ------
        ValueError
            If ``y`` has another number of rows than ``X``, or ``n_top_features`` is not a
            non-negative int.
        """
        return routing_report(self, X, y, n_top_features)
