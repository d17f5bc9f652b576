"""Routing diagnostics as pure functions of routing counts and gate weights.

Each takes NumPy arrays or tensors and returns plain floats or NumPy arrays, so they serve
the training callbacks, the fitted estimators and users' own analyses alike.
"""

from __future__ import annotations

import numpy as np


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


def routing_entropy(gates) -> float:
    """Mean per-row entropy (nats) of the gate weights, shape (n, n_experts).

    0 when every row uses one expert; ``log(k)`` for an even split over ``k`` experts.
    """
    gates = _as_numpy(gates)
    if gates.shape[0] == 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(gates > 0, gates * np.log(gates), 0.0)
    return float(-terms.sum(axis=1).mean())
