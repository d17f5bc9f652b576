"""Figures of a fitted estimator's training and routing (needs matplotlib: the ``plot`` extra).

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing
is ever shown and no global figure state is touched: save it with ``fig.savefig(path)``,
or display it in a notebook by leaving it as a cell's value.

- :func:`plot_training_curves`: the losses and the auxiliary losses per epoch;
- :func:`plot_expert_utilization`: each expert's share of the routing per epoch;
- :func:`plot_routing_heatmap`: experts against classes or target deciles;
- :func:`plot_routing_embedding`: a 2-D projection of the inputs, coloured by expert;
- :func:`plot_expert_count_curve`: the cross-validated score per expert count.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import issparse

from .diagnostics import target_bins
from .nn._checks import check_int

__all__ = [
    "plot_expert_count_curve",
    "plot_expert_utilization",
    "plot_routing_embedding",
    "plot_routing_heatmap",
    "plot_training_curves",
]

_AUX_LOSSES = ("balance_loss", "z_loss", "diversity_loss")


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("sklearn_moe.plotting needs matplotlib: pip install 'sklearn-moe[plot]'") from error
    figure = Figure(figsize=(width * ncols, height), layout="constrained")
    axes = figure.subplots(1, ncols)
    return figure, np.atleast_1d(axes)


def _moe(estimator, X=None):
    """The MoE estimator of ``estimator`` (itself, or the last step of a Pipeline) and ``X``
    as that step receives it (transformed by the pipeline's earlier steps)."""
    from sklearn.pipeline import Pipeline

    from ._base import BaseMoE

    if isinstance(estimator, Pipeline) and isinstance(estimator[-1], BaseMoE):
        if X is not None:
            X = estimator[:-1].transform(X)
        estimator = estimator[-1]
    if not isinstance(estimator, BaseMoE):
        raise TypeError("sklearn_moe.plotting needs a MoERegressor or MoEClassifier, or a Pipeline ending in one; "
                        f"got {type(estimator).__name__}.")
    return estimator, X


def _history(estimator):
    history = getattr(estimator, "history_", None)
    if history is None or len(history) == 0:
        raise ValueError("the estimator has no training history: fit it first.")
    return history


def _fitted_moe(estimator, X=None):
    """:func:`_moe`, for a fitted estimator."""
    estimator, X = _moe(estimator, X)
    _history(estimator)
    return estimator, X


_LOSS_LABELS = {"task_loss": "training rows (task_loss)", "valid_loss": "validation rows (valid_loss)",
                "train_loss": "training objective (train_loss)"}


def plot_training_curves(estimator):
    """Plot the training and validation loss per epoch, and the auxiliary losses beside them.

    Parameters
    ----------
    estimator : MoERegressor, MoEClassifier or Pipeline
        A fitted estimator, or a fitted Pipeline whose last step is one.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes. The mixture's loss on the training rows (``task_loss``) and on the
        validation rows (``valid_loss``, when there was a split), which compare like with
        like, and, dashed, the whole training objective (``train_loss``: with
        ``expert_loss="per_expert"`` the experts' own losses as well, and the auxiliary
        losses). Beside them, the auxiliary losses that training recorded.

    Raises
    ------
    TypeError
        If ``estimator`` is not a MoE estimator (or a Pipeline ending in one).
    ValueError
        If the estimator has no training history (it was not fitted).

    Examples
    --------
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn_moe import MoERegressor
    >>> from sklearn_moe.plotting import plot_training_curves
    >>> data = load_diabetes(as_frame=True)
    >>> model = MoERegressor(n_experts=2, max_epochs=3, random_state=0).fit(data.data, data.target)
    >>> figure = plot_training_curves(model)
    >>> len(figure.axes)
    2
    >>> figure.savefig("training_curves.png")  # doctest: +SKIP
    """
    history = _history(_moe(estimator)[0])
    figure, (losses, aux) = _figure(ncols=2, width=5.0)
    epochs = history["epoch"].to_numpy()
    for key, style in (("task_loss", "-"), ("valid_loss", "-"), ("train_loss", "--")):
        if key in history:
            losses.plot(epochs, history[key].to_numpy(dtype=float), style, marker=".", label=_LOSS_LABELS[key])
    losses.set(xlabel="epoch", ylabel="loss", title="losses")
    for key in _AUX_LOSSES:
        if key in history:
            aux.plot(epochs, history[key].to_numpy(dtype=float), marker=".", label=key)
    aux.set(xlabel="epoch", ylabel="auxiliary loss", title="auxiliary losses")
    for axes in (losses, aux):
        axes.grid(alpha=0.3)
        if axes.get_lines():
            axes.legend(fontsize=8)
    return figure


def plot_expert_utilization(estimator, share: str = "auto"):
    """Plot each expert's share of the routing per epoch, as a stacked area.

    Parameters
    ----------
    estimator : MoERegressor, MoEClassifier or Pipeline
        A fitted estimator, or a fitted Pipeline whose last step is one.
    share : {"auto", "gate_share", "expert_share", "valid_gate_share", "valid_expert_share"}
        The history column: ``"auto"`` is the gate mass for a dense router and the routed
        rows for a sparse one, on the training batches.

    Returns
    -------
    matplotlib.figure.Figure
        One axes: the epochs against the experts' stacked shares, which sum to 1; after
        ``prune_experts`` or ``grow_experts`` and further training, the epochs
        since (the earlier ones' shares are of other experts).

    Raises
    ------
    TypeError
        If ``estimator`` is not a MoE estimator (or a Pipeline ending in one).
    ValueError
        If the estimator has no training history, or the history has no ``share`` column
        (e.g. a validation column without a validation split).
    """
    estimator, _ = _moe(estimator)
    history = _history(estimator)
    if share == "auto":
        share = "gate_share" if estimator.module_.router.is_dense else "expert_share"
    if share not in history:
        raise ValueError(f"the history has no {share!r} column; it has {sorted(history.columns)}.")
    records = history[share].dropna()
    # After prune_experts or grow_experts (then partial_fit), the earlier epochs' shares are
    # of other experts: only the epochs since the experts last changed are drawn.
    sizes = np.array([len(record) for record in records])
    changed = np.flatnonzero(sizes != sizes[-1])
    current = changed[-1] + 1 if changed.size else 0
    records = records.iloc[current:]
    shares = np.vstack([np.asarray(record, dtype=float) for record in records])
    figure, (axes,) = _figure(width=6.5)
    axes.stackplot(history.loc[records.index, "epoch"].to_numpy(), shares.T,
                   labels=[f"expert {e}" for e in range(shares.shape[1])], alpha=0.85)
    title = "expert utilization" + (f" (the {shares.shape[1]} experts' epochs)" if current else "")
    axes.set(xlabel="epoch", ylabel=share.replace("_", " "), ylim=(0, 1), title=title)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return figure


def plot_routing_heatmap(estimator, X, y, n_bins: int = 10):
    """Plot which expert serves which part of the target: experts against classes or deciles.

    Cell ``(e, g)`` is the share of group ``g``'s rows (a class, the rows that have a label
    of a multilabel target, or a quantile bin of a regression target) whose first choice is
    expert ``e``; every column sums to 1 (a label no row has: 0).

    Parameters
    ----------
    estimator : MoERegressor, MoEClassifier or Pipeline
        A fitted estimator, or a fitted Pipeline whose last step is one.
    X : array-like of shape (n_samples, n_features)
        Input rows, as for ``predict``.
    y : array-like of shape (n_samples,) or (n_samples, n_labels)
        Their targets: class labels (among the classifier's ``classes_``), a multilabel
        classifier's indicator matrix, or regression targets binned into ``n_bins`` quantile
        bins (of the first target), each column named by its range; tied targets can merge
        bins, and only those that hold rows are shown.
    n_bins : int, default=10
        Quantile bins of a regression target.

    Returns
    -------
    matplotlib.figure.Figure
        Two axes: the heatmap of the table (experts as rows, groups as columns) and its
        colour bar.

    Raises
    ------
    TypeError
        If ``estimator`` is not a MoE estimator (or a Pipeline ending in one).
    ValueError
        If the estimator is not fitted, ``X`` and ``y`` have different numbers of rows, a
        class label is not among ``classes_``, a multilabel classifier's ``y`` is not an
        indicator matrix of its labels, or ``n_bins`` is not a positive int.
    """
    check_int("n_bins", n_bins)
    estimator, X = _fitted_moe(estimator, X)
    y = y.toarray() if issparse(y) else np.asarray(y)  # a multilabel classifier's y may be sparse
    top1 = estimator.route(X).argmax(axis=1)
    if y.shape[0] != top1.shape[0]:
        raise ValueError(f"X has {top1.shape[0]} rows but y has {y.shape[0]}.")
    n_experts = estimator.module_.n_experts
    if hasattr(estimator, "classes_"):
        labels = [str(c) for c in estimator.classes_]
        if not estimator._multilabel and y.ndim == 2 and y.shape[1] == 1:
            y = y.ravel()  # a one-column frame of labels, as fit takes it
        if estimator._multilabel or y.ndim == 2:
            # Row i counts in label j's column when it has label j.
            members = estimator._check_label_matrix(y).astype(float)
            group_name = "label"
        else:
            unknown = np.setdiff1d(y, estimator.classes_)
            if unknown.size:
                raise ValueError(f"y holds labels the classifier was not fitted on: {unknown[:10].tolist()}; its "
                                 f"classes are {estimator.classes_.tolist()}.")
            members = np.eye(estimator.classes_.shape[0])[np.searchsorted(estimator.classes_, y)]
            group_name = "class"
    else:
        values = y.astype(float)
        values = values[:, 0] if values.ndim == 2 else values  # binned on the first target
        # Tied targets merge quantile bins: only the bins that hold rows, named by their range.
        occupied, groups = np.unique(target_bins(values, n_bins), return_inverse=True)
        labels = [f"{values[groups == g].min():.3g} to {values[groups == g].max():.3g}" for g in range(len(occupied))]
        members = np.eye(len(labels))[groups]
        group_name = "target range (quantile bins)"
    table = np.eye(n_experts)[top1].T @ members  # (expert, group): rows of the group served first by the expert
    table /= np.maximum(table.sum(axis=0, keepdims=True), 1.0)
    figure, (axes,) = _figure(width=1.2 + 0.5 * len(labels), height=1.2 + 0.45 * n_experts)
    image = axes.imshow(table, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ranges = not hasattr(estimator, "classes_")  # long labels: slanted
    axes.set_xticks(range(len(labels)), labels, rotation=45 if ranges else 0, ha="right" if ranges else "center")
    axes.set_yticks(range(n_experts), [str(e) for e in range(n_experts)])
    axes.set(xlabel=group_name, ylabel="expert (first choice)", title="routing by target")
    figure.colorbar(image, ax=axes, label="share of the column's rows")
    return figure


def plot_routing_embedding(estimator, X, max_points: int = 5000, random_state=0):
    """Plot the inputs' 2-D principal-component projection, coloured by first-choice expert.

    The projection is of the inputs as the model sees them (encoded and scaled).

    Parameters
    ----------
    estimator : MoERegressor, MoEClassifier or Pipeline
        A fitted estimator, or a fitted Pipeline whose last step is one.
    X : array-like of shape (n_samples, n_features)
        Input rows, as for ``predict``.
    max_points : int, default=5000
        Rows drawn at random beyond this many.
    random_state : int or None, default=0
        Seed of the random row sample and of the PCA.

    Returns
    -------
    matplotlib.figure.Figure
        One axes: a scatter plot of the projected rows, one colour per first-choice expert.

    Raises
    ------
    TypeError
        If ``estimator`` is not a MoE estimator (or a Pipeline ending in one).
    ValueError
        If the estimator is not fitted, ``X`` has fewer than 2 rows, or ``max_points`` is
        less than 2.
    """
    from sklearn.decomposition import PCA

    check_int("max_points", max_points, minimum=2)
    estimator, X = _fitted_moe(estimator, X)
    X_scaled = estimator._scaled_input(X)  # validated and scaled once, for the gates and the projection
    inputs = X_scaled.detach().cpu().numpy()
    if inputs.shape[0] < 2:
        raise ValueError(f"a projection needs at least 2 rows of X; got {inputs.shape[0]}.")
    top1 = estimator._gates(X_scaled).argmax(axis=1)
    if inputs.shape[0] > max_points:
        keep = np.random.default_rng(random_state).choice(inputs.shape[0], max_points, replace=False)
        inputs, top1 = inputs[keep], top1[keep]
    n_components = min(2, inputs.shape[1])
    points = PCA(n_components=n_components, random_state=random_state).fit_transform(inputs)
    if n_components == 1:
        points = np.column_stack([points[:, 0], np.zeros(len(points))])
    figure, (axes,) = _figure(width=5.5, height=4.5)
    for expert in np.unique(top1):
        rows = top1 == expert
        axes.scatter(points[rows, 0], points[rows, 1], s=6, alpha=0.7, label=f"expert {expert}")
    axes.set(xlabel="principal component 1", ylabel="principal component 2", title="inputs by first-choice expert")
    axes.legend(fontsize=7, markerscale=2)
    return figure


def plot_expert_count_curve(selection):
    """Plot the cross-validated score per expert count, with the chosen count marked.

    The figure holds :meth:`~sklearn_moe.tuning.NExpertsSelection.plot`.

    Parameters
    ----------
    selection : NExpertsSelection
        The result of :func:`sklearn_moe.tuning.select_n_experts`.

    Returns
    -------
    matplotlib.figure.Figure
        One axes: the mean score ± its standard deviation per candidate count, the
        one-standard-error threshold and the chosen count.

    Raises
    ------
    TypeError
        If ``selection`` is not a :class:`~sklearn_moe.tuning.NExpertsSelection`.
    """
    if not callable(getattr(selection, "plot", None)):  # no import of tuning (and Optuna) here
        raise TypeError(f"selection must be the NExpertsSelection that select_n_experts returns; got "
                        f"{type(selection).__name__}.")
    figure, (axes,) = _figure()
    selection.plot(ax=axes)
    return figure
