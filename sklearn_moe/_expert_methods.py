"""The estimators' methods that inspect and edit a fitted model's experts."""

from __future__ import annotations

from ._pruning import grow_experts, prune_experts
from ._report import routing_report


class ExpertMethods:
    """``routing_report``, ``prune_experts`` and ``grow_experts``, shared by the estimators (through
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

    def grow_experts(self, n_new=1, noise=0.01, random_state=None):
        """Add ``n_new`` experts, each a perturbed copy of a busy expert that splits its traffic.

        Growth by splitting: each new expert copies the expert with the largest share of
        the routing (``expert_load_``) per copy at its turn (one expert can be split
        several times), its weights and its rows of the router each multiplied by ``1 +
        noise * N(0, 1)`` elementwise. Under a softmax over all experts (``"softmax"``,
        ``"top_p"``) the gate logits of the expert and its copies are lowered by ``log(1 +
        copies)`` so that together they keep the gate weight the expert had; under a top-k
        choice (``"topk"``, ``"noisy_topk"``, ``"switch"``), which ranks the logits, they
        keep the expert's, so that the copies are chosen where it is (see
        :meth:`sklearn_moe.nn.MixtureOfExperts.split_expert`). Under the dense ``"softmax"``
        gate the predictions therefore change only by the perturbation (with ``noise=0`` not
        at all, up to rounding: float32's, or, with ``precision="bf16"``, bfloat16's, about
        1e-3 relative). Under a top-k choice a row that chose a split expert now chooses it
        and a copy in place of its next choice where it came first, or one of them where it
        came later; under ``router="uniform"`` every expert weighs the same, so a split
        expert and its copies together weigh more than it did: with these routers the
        predictions change until the model is trained on. ``n_experts`` grows by ``n_new``
        (``top_k`` stays), ``expert_load_`` gives each copy an equal part of its source's
        share (an estimate: under a top-k choice the copies' real shares differ;
        :meth:`routing_report` measures them), and the model predicts, saves, loads and
        trains on as any other: train on with ``set_params(warm_start=True).fit(X, y)``,
        where the perturbation lets the copies specialise (exact copies, ``noise=0``, get
        the same gradients).

        Parameters
        ----------
        n_new : int, default=1
            Number of experts to add, >= 1.
        noise : float, default=0.01
            Relative standard deviation of the copies' perturbation, >= 0.
        random_state : int, RandomState instance or None, default=None
            Seeds the perturbation; None draws from numpy's global generator.

        Returns
        -------
        self
            The estimator, with ``n_experts + n_new`` experts.

        Raises
        ------
        ValueError
            For ``router="hierarchical"``, or an ``n_new`` or ``noise`` out of range.
        """
        return grow_experts(self, n_new, noise, random_state)

    def routing_report(self, X, y=None, n_top_features=3):
        """Report what each expert does on ``X``: one row per expert.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.
        y : array-like of shape (n_samples,) or (n_samples, n_outputs), optional
            With targets, each expert's ``score`` on the rows it serves: those ``fit``
            takes (several targets of a multi-output regressor, scored by their mean R²;
            a multilabel classifier's indicator matrix, dense or sparse, scored by subset
            accuracy).
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
            If ``y`` has another number of rows than ``X``, or is not a target of the kind
            the model was fitted on (see ``score``), or ``n_top_features`` is not a
            non-negative int.

        Examples
        --------
        >>> from sklearn.datasets import load_diabetes
        >>> from sklearn_moe import MoERegressor
        >>> X, y = load_diabetes(return_X_y=True, as_frame=True)
        >>> model = MoERegressor(n_experts=3, max_epochs=3, random_state=0).fit(X, y)
        >>> report = model.routing_report(X, y)
        >>> list(report.columns)
        ['share', 'mean_gate', 'n_rows', 'score', 'distinguishing_features']
        >>> len(report), round(float(report["share"].sum()), 6)
        (3, 1.0)
        """
        return routing_report(self, X, y, n_top_features)
