"""Sort-based dispatch of rows to experts, and the weighted combine of their outputs.

The ``n * k`` (row, expert) assignments are sorted by expert; each assignment gets a slot
in its expert's slice of a padded buffer of shape ``(n_experts, slots, features)``, the
experts run as one batched matmul, and the outputs are gathered back and summed per row
with ``index_add_``. The buffer holds ``max_e count_e`` slots per expert (``n * k / E``
under balanced routing), so the work grows with ``top_k``, not with ``n_experts``. No
one-hot ``(n, n_experts, capacity)`` tensor is ever built.

An expert output that is not finite (a diverged expert) is masked: the (row, expert)
assignment gets weight 0, the row's other weights are renormalised, and a
``RuntimeWarning`` names the expert.

A ``capacity`` (training only) caps the slots per expert. Assignments are ranked
choice-major: every row's first choice outranks any row's second choice, then by row order.
Assignments past the cap are dropped and the row's remaining gate weights are renormalised
(it falls back to its other experts); a row that loses every expert gets a zero output.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch


class DispatchPlan(NamedTuple):
    """Where each kept assignment goes.

    Attributes
    ----------
    rows, experts, slots : Tensor of shape (m,), int64
        Source row, expert and slot in the padded buffer, sorted by expert.
    weights : Tensor of shape (m,)
        Gate weight of the assignment (renormalised if capacity dropped some).
    counts : Tensor of shape (n_experts,), int64
        Assignments per expert before the capacity cap.
    n_slots : int
        Slots per expert in the padded buffer.
    """

    rows: torch.Tensor
    experts: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    n_slots: int


def expert_capacity(capacity_factor: float, n_rows: int, top_k: int, n_experts: int) -> int:
    """Slots per expert: ``ceil(capacity_factor * n_rows * top_k / n_experts)``."""
    return max(1, math.ceil(capacity_factor * n_rows * top_k / n_experts))


def plan_dispatch(
    indices: torch.Tensor, weights: torch.Tensor, n_experts: int, capacity: int | None = None,
    active: torch.Tensor | None = None,
) -> DispatchPlan:
    """Sort the assignments of ``indices`` (n, k) by expert and give each a buffer slot.

    Parameters
    ----------
    indices : Tensor of shape (n, k), int64
    weights : Tensor of shape (n, k)
    n_experts : int
    capacity : int, optional
        Maximum slots per expert; ``None`` keeps every assignment (dropless).
    active : Tensor of shape (n, k), bool, optional
        Assignments to dispatch at all (expert dropout); the others are left out entirely,
        counts included. The caller renormalises ``weights`` over the active ones.
    """
    n, k = indices.shape
    flat_experts = indices.t().reshape(-1)  # choice-major: priority to first choices
    flat_rows = torch.arange(n, device=indices.device).repeat(k)
    flat_weights = weights.t().reshape(-1)
    if active is not None:
        flat_active = active.t().reshape(-1)
        flat_experts, flat_rows = flat_experts[flat_active], flat_rows[flat_active]
        flat_weights = flat_weights[flat_active]
    order = torch.argsort(flat_experts, stable=True)
    experts = flat_experts[order]
    counts = torch.bincount(flat_experts, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.arange(flat_experts.shape[0], device=indices.device) - starts[experts]
    rows, expert_weights = flat_rows[order], flat_weights[order]
    max_count = int(counts.max()) if flat_experts.numel() else 0
    if capacity is None or capacity >= max_count:
        return DispatchPlan(rows, experts, slots, expert_weights, counts, max_count)
    keep = slots < capacity
    rows, experts, slots, expert_weights = rows[keep], experts[keep], slots[keep], expert_weights[keep]
    row_totals = expert_weights.new_zeros(n).index_add(0, rows, expert_weights)
    # A row whose kept experts all have underflowed (zero) weights would divide 0 by 0.
    expert_weights = expert_weights / row_totals[rows].clamp_min(torch.finfo(expert_weights.dtype).tiny)
    return DispatchPlan(rows, experts, slots, expert_weights, counts, capacity)


def dispatch_combine(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, n_outputs: int) -> torch.Tensor:
    """Run the experts on their assigned rows and return the gate-weighted sum per row.

    Parameters
    ----------
    x : Tensor of shape (n, features)
    experts : module mapping (n_experts, slots, features) -> (n_experts, slots, n_outputs)
    plan : DispatchPlan
    n_outputs : int

    Returns
    -------
    Tensor of shape (n, n_outputs)
    """
    n_experts = plan.counts.shape[0]
    buffer = x.new_zeros(n_experts, plan.n_slots, x.shape[1])
    buffer = buffer.index_put((plan.experts, plan.slots), x[plan.rows])
    expert_out = experts(buffer)[plan.experts, plan.slots]
    weights = plan.weights.to(expert_out.dtype)
    finite = torch.isfinite(expert_out).all(dim=1)
    if not bool(finite.all()):
        _warn_failed_experts(plan.experts[~finite])
        expert_out = torch.where(finite.unsqueeze(1), expert_out, 0.0)
        weights = torch.where(finite, weights, 0.0)
        totals = weights.new_zeros(x.shape[0]).index_add(0, plan.rows, weights)
        weights = weights / totals[plan.rows].clamp_min(torch.finfo(weights.dtype).tiny)
    weighted = expert_out * weights.unsqueeze(1)
    return expert_out.new_zeros(x.shape[0], n_outputs).index_add(0, plan.rows, weighted)


def dense_combine(x: torch.Tensor, experts: torch.nn.Module, gates: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, mixed by ``gates`` of shape (n, n_experts)."""
    n_experts = gates.shape[1]
    expert_out = experts(x.unsqueeze(0).expand(n_experts, -1, -1))  # (E, n, out)
    gates = gates.to(expert_out.dtype)
    finite = torch.isfinite(expert_out).all(dim=2)  # (E, n)
    if not bool(finite.all()):
        _warn_failed_experts(torch.nonzero(~finite)[:, 0])
        expert_out = torch.where(finite.unsqueeze(2), expert_out, 0.0)
        gates = torch.where(finite.t(), gates, 0.0)
        gates = gates / gates.sum(dim=1, keepdim=True).clamp_min(torch.finfo(gates.dtype).tiny)
    return torch.einsum("eno,ne->no", expert_out, gates)


def _warn_failed_experts(failed_experts: torch.Tensor) -> None:
    experts = sorted(set(failed_experts.tolist()))
    warnings.warn(
        f"Expert(s) {experts} produced non-finite output for {failed_experts.numel()} routed "
        "row(s); those outputs were masked and the rows' remaining gate weights renormalised.",
        RuntimeWarning,
        stacklevel=3,
    )
