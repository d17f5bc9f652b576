"""Routing diagnostics as pure functions of routing counts and gate weights.

Each takes NumPy arrays or tensors and returns plain floats or NumPy arrays (except
:func:`row_entropy`, which keeps a tensor on its device), so they serve the training
callbacks, the fitted estimators and users' own analyses alike.
"""

from __future__ import annotations

import numpy as np
import torch

from .nn._checks import check_int


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _counts(counts) -> np.ndarray:
    """``counts`` as a float64 vector, checked: one dimension, no negative or missing count."""
    counts = _as_numpy(counts)
    if counts.ndim != 1:
        raise ValueError(f"counts must be one count per expert (1-d); got shape {counts.shape}.")
    if not (counts >= 0).all():  # also NaN
        raise ValueError(f"counts must be non-negative numbers; got {counts.tolist()[:20]}.")
    return counts


def _gate_table(gates):
    """Raise unless ``gates`` is a (rows, experts) table (array or tensor)."""
    if len(gates.shape) != 2:
        raise ValueError(f"gates must be a (rows, experts) table; got shape {tuple(gates.shape)}.")
    return gates


def expert_utilization(counts) -> np.ndarray:
    """Share of routing assignments per expert.

    Parameters
    ----------
    counts : array-like or Tensor of shape (n_experts,)
        Number of rows (or assignments) routed to each expert.

    Returns
    -------
    ndarray of shape (n_experts,), float64
        Each expert's share of the assignments, summing to 1; all zeros when nothing was
        routed.

    Raises
    ------
    ValueError
        If ``counts`` is not 1-d, or holds a negative or missing count.
    """
    counts = _counts(counts)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def load_imbalance(counts) -> float:
    """Busiest expert's load over the mean load.

    Parameters
    ----------
    counts : array-like or Tensor of shape (n_experts,)
        Number of rows (or assignments) routed to each expert.

    Returns
    -------
    float
        ``max(c) / mean(c)``: 1 is perfect balance, ``n_experts`` is total collapse onto one
        expert; NaN when nothing was routed.

    Raises
    ------
    ValueError
        If ``counts`` is not 1-d, or holds a negative or missing count.
    """
    share = expert_utilization(counts)
    return float(share.max() * share.size) if share.sum() > 0 else float("nan")


def row_entropy(gates):
    """Entropy (nats) of each row's gate weights.

    The entropy is ``-sum_e g_e log g_e`` over the experts with ``g_e > 0``.

    Parameters
    ----------
    gates : Tensor or array-like of shape (n, n_experts)
        Each row's gate weights over the experts (non-negative, rows summing to 1).

    Returns
    -------
    Tensor or ndarray of shape (n,)
        Each row's entropy: a tensor on the gates' device and of their dtype for tensor input
        (no host synchronisation), or a float64 array for array input.

    Raises
    ------
    ValueError
        If ``gates`` is not 2-d.
    """
    if isinstance(gates, torch.Tensor):
        return torch.special.entr(_gate_table(gates)).sum(dim=1)  # entr(0) = 0: two kernels, no masking
    gates = _gate_table(_as_numpy(gates))
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0 log 0 = 0; a NaN weight gives a NaN entropy (as entr does), not 0
        return -np.where(gates > 0, gates * np.log(gates), np.where(np.isnan(gates), np.nan, 0.0)).sum(axis=1)


def routing_entropy(gates) -> float:
    """Mean per-row entropy (nats) of the gate weights (:func:`row_entropy`).

    Parameters
    ----------
    gates : array-like or Tensor of shape (n, n_experts)
        Each row's gate weights over the experts (non-negative, rows summing to 1).

    Returns
    -------
    float
        0 when every row uses one expert; ``log(k)`` for an even split over ``k`` experts.
        NaN for no rows.

    Raises
    ------
    ValueError
        If ``gates`` is not 2-d.
    """
    gates = _gate_table(_as_numpy(gates))
    return float(row_entropy(gates).mean()) if gates.shape[0] else float("nan")


def gate_share(gates) -> np.ndarray:
    """Each expert's share of the gate mass: ``sum_i g_ie / sum_ie g_ie``.

    Under a dense router every expert serves every row, and this, not the routed rows, says
    how much each one contributes.

    Parameters
    ----------
    gates : array-like or Tensor of shape (n, n_experts)
        Each row's gate weights over the experts.

    Returns
    -------
    ndarray of shape (n_experts,), float64
        Each expert's share of the total gate weight, summing to 1; all zeros for no rows.

    Raises
    ------
    ValueError
        If ``gates`` is not 2-d.
    """
    mass = _gate_table(_as_numpy(gates)).sum(axis=0)
    total = mass.sum()
    return mass / total if total > 0 else np.zeros_like(mass)


def load_entropy(counts) -> float:
    """Entropy (nats) of the experts' load shares.

    With ``p_e`` the load shares of :func:`expert_utilization`, the entropy is
    ``-sum_e p_e log p_e``.

    Parameters
    ----------
    counts : array-like or Tensor of shape (n_experts,)
        Number of rows (or assignments) routed to each expert.

    Returns
    -------
    float
        ``log(n_experts)`` at perfect balance, 0 when one expert takes everything; NaN when
        nothing was routed.

    Raises
    ------
    ValueError
        If ``counts`` is not 1-d, or holds a negative or missing count.
    """
    share = expert_utilization(counts)
    if share.sum() == 0:
        return float("nan")
    share = share[share > 0]
    return float(-(share * np.log(share)).sum()) + 0.0  # + 0.0: no "-0.0" for one expert


def load_cv(counts) -> float:
    """Coefficient of variation of the experts' loads.

    Parameters
    ----------
    counts : array-like or Tensor of shape (n_experts,)
        Number of rows (or assignments) routed to each expert.

    Returns
    -------
    float
        ``std(c) / mean(c)`` (population standard deviation): 0 at perfect balance,
        ``sqrt(n_experts - 1)`` when one expert takes everything; NaN when nothing was routed.

    Raises
    ------
    ValueError
        If ``counts`` is not 1-d, or holds a negative or missing count.
    """
    counts = _counts(counts)
    mean = counts.mean() if counts.size else 0.0
    return float(counts.std() / mean) if mean > 0 else float("nan")


def routing_instability(previous_top1, top1) -> float:
    """Share of rows whose first-choice expert changed: ``mean(previous_top1 != top1)``.

    Parameters
    ----------
    previous_top1, top1 : array of shape (n,), int
        Each row's top-1 expert at two points of training (the same rows in the same order).

    Returns
    -------
    float
        The share of rows whose top-1 expert differs, in [0, 1]; NaN for no rows.

    Raises
    ------
    ValueError
        If the two arrays do not have the same shape.
    """
    previous_top1, top1 = np.asarray(previous_top1), np.asarray(top1)
    if previous_top1.shape != top1.shape:
        raise ValueError(f"previous_top1 has shape {previous_top1.shape}, top1 {top1.shape}: not the same rows")
    return float((previous_top1 != top1).mean()) if top1.size else float("nan")


def expert_specialization(top1, target_groups) -> float:
    """Normalised mutual information between the rows' top-1 experts and target groups.

    The target group ``Y`` of a row is its class, or the quantile bin of a regression target
    (:func:`target_bins`); ``E`` is its top-1 expert.

    ``NMI = I(E; Y) / ((H(E) + H(Y)) / 2)``, with the entropies and the mutual information
    ``I(E; Y) = sum_ey p(e, y) log(p(e, y) / (p(e) p(y)))`` of the empirical joint
    distribution (scikit-learn's ``normalized_mutual_info_score`` with the arithmetic mean).
    1: the expert tells the target group exactly (and back); 0: independent, or a single
    expert or a single group (nothing to tell).

    Parameters
    ----------
    top1 : array-like of shape (n,), int
        Each row's top-1 (first-choice) expert.
    target_groups : array-like of shape (n,)
        Each row's target group; any hashable labels.

    Returns
    -------
    float
        The normalised mutual information in [0, 1]; NaN for no rows.

    Raises
    ------
    ValueError
        If ``top1`` and ``target_groups`` do not have the same shape.
    """
    top1, target_groups = np.asarray(top1), np.asarray(target_groups)
    if top1.shape != target_groups.shape:
        raise ValueError(f"top1 has shape {top1.shape}, target_groups {target_groups.shape}: not the same rows")
    if top1.size == 0:
        return float("nan")
    _, experts = np.unique(top1, return_inverse=True)
    _, groups = np.unique(target_groups, return_inverse=True)
    joint = np.zeros((experts.max() + 1, groups.max() + 1))
    np.add.at(joint, (experts, groups), 1.0)
    joint /= joint.sum()
    p_expert, p_group = joint.sum(axis=1), joint.sum(axis=0)
    h_expert, h_group = -(p_expert * np.log(p_expert)).sum(), -(p_group * np.log(p_group)).sum()
    if h_expert == 0 or h_group == 0:
        return 0.0
    nonzero = joint > 0
    mutual = (joint[nonzero] * np.log(joint[nonzero] / np.outer(p_expert, p_group)[nonzero])).sum()
    return float(np.clip(mutual / ((h_expert + h_group) / 2), 0.0, 1.0))


def target_bins(y, n_bins: int = 10) -> np.ndarray:
    """Quantile bin of each regression target, for :func:`expert_specialization`.

    Bin edges are the ``1/n_bins .. (n_bins-1)/n_bins`` quantiles, so the bins hold about
    equal numbers of rows (ties can merge bins).

    Parameters
    ----------
    y : array-like or Tensor of shape (n,) or (n, n_targets)
        Regression targets; a 2-d target is binned on its first column.
    n_bins : int, default=10
        Number of quantile bins.

    Returns
    -------
    ndarray of shape (n,), int64
        Each row's bin, in ``0 .. n_bins - 1``.

    Raises
    ------
    ValueError
        If ``n_bins`` is not a positive int.
    """
    check_int("n_bins", n_bins)
    y = _as_numpy(y)
    y = y[:, 0] if y.ndim == 2 else y
    if y.size == 0:
        return np.zeros(0, dtype=np.int64)
    edges = np.quantile(y, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.searchsorted(edges, y, side="right").astype(np.int64)


def per_expert_mean(values, top1, n_experts: int) -> np.ndarray:
    """Mean of ``values`` over the rows each expert serves first.

    Expert ``e`` gets ``mean_{i: top1_i = e} values_i``. With per-row losses it is each
    expert's loss on its own rows.

    Parameters
    ----------
    values : array-like or Tensor of shape (n,)
        One value per row (e.g. the row's loss); flattened.
    top1 : array-like of shape (n,), int
        Each row's top-1 (first-choice) expert, in ``0 .. n_experts - 1``.
    n_experts : int
        Number of experts (the length of the result).

    Returns
    -------
    ndarray of shape (n_experts,), float64
        Each expert's mean value; NaN for an expert that serves no row.

    Raises
    ------
    ValueError
        If ``values`` and ``top1`` do not have the same number of rows, or ``top1`` holds
        an expert outside ``0 .. n_experts - 1``.
    """
    values = _as_numpy(values).reshape(-1)
    top1 = np.asarray(top1).reshape(-1)
    if values.shape != top1.shape:
        raise ValueError(f"values has {values.size} rows, top1 {top1.size}: not the same rows")
    if top1.size and not (0 <= top1.min() and top1.max() < n_experts):
        raise ValueError(f"top1 must hold experts 0 to n_experts - 1 = {n_experts - 1}; it holds {top1.min()} to "
                         f"{top1.max()}.")
    sums = np.bincount(top1, weights=values, minlength=n_experts)
    counts = np.bincount(top1, minlength=n_experts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
