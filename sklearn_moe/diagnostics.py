"""Routing diagnostics as pure functions of routing counts and gate weights.

Each takes NumPy arrays or tensors and returns plain floats or NumPy arrays (except
:func:`row_entropy`, which keeps a tensor on its device), so they serve the training
callbacks, the fitted estimators and users' own analyses alike.
"""

from __future__ import annotations

import numpy as np
import torch


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def expert_utilization(counts) -> np.ndarray:
    """Share of routing assignments per expert, shape (n_experts,), summing to 1.

    All zeros when nothing was routed.
    """
    counts = _as_numpy(counts)
    total = counts.sum()
    return counts / total if total > 0 else np.zeros_like(counts)


def load_imbalance(counts) -> float:
    """Busiest expert's load over the mean load: 1 is perfect balance, ``n_experts`` is
    total collapse onto one expert. NaN when nothing was routed."""
    share = expert_utilization(counts)
    return float(share.max() * share.size) if share.sum() > 0 else float("nan")


def row_entropy(gates):
    """Entropy (nats) of each row's gate weights: ``-sum_e g_e log g_e`` over the experts
    with ``g_e > 0``.

    Parameters
    ----------
    gates : Tensor or array of shape (n, n_experts)

    Returns
    -------
    Tensor of shape (n,) on the gates' device (no host synchronisation), or a float64
    array for array input.
    """
    if isinstance(gates, torch.Tensor):
        return -torch.where(gates > 0, gates * gates.clamp_min(torch.finfo(gates.dtype).tiny).log(), 0.0).sum(dim=1)
    gates = _as_numpy(gates)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(gates > 0, gates * np.log(gates), 0.0).sum(axis=1)


def routing_entropy(gates) -> float:
    """Mean per-row entropy (nats) of the gate weights, shape (n, n_experts)
    (:func:`row_entropy`).

    0 when every row uses one expert; ``log(k)`` for an even split over ``k`` experts. NaN
    for no rows.
    """
    gates = _as_numpy(gates)
    return float(row_entropy(gates).mean()) if gates.shape[0] else float("nan")
