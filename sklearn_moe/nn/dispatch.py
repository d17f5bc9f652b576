"""Sort-based dispatch of rows to experts, and the weighted combine of their outputs.

The ``n * k`` (row, expert) assignments are sorted by expert; each assignment gets a slot
in its expert's slice of a padded buffer, the experts run as batched matmuls over stacked
weights, and the outputs are gathered back and summed per row with ``index_add_``. No
one-hot ``(n, n_experts, capacity)`` tensor is ever built.

Buffer layout. Padding every expert to the busiest one's count wastes work when routing is
uneven (at initialisation the busiest of 64 experts can get 2.5x the mean). In training the
buffer is therefore a staircase of at most :data:`MAX_GROUPS` blocks (:func:`plan_layout`):
the first holds the first ``t_1`` slots of every expert, with the weights used in place;
each further block tops up only the experts that have more assignments, over their gathered
weights. Training on a GPU uses one block padded to the busiest expert, where the extra
blocks' kernel launches cost more than the padding's arithmetic. Evaluation pads in one
block too when the experts have few rows each; with many (large prediction batches) each
expert runs on its own contiguous rows with no padding at all (``unpadded=True`` of
:func:`dispatch_combine`). Either way a row's output does not depend on the rows beside
it, up to float rounding: matmuls of other shapes can round differently in the last bit.

An expert output that is not finite (a diverged expert) is masked: the (row, expert)
assignment gets weight 0, the row's other weights are renormalised, and a
``RuntimeWarning`` names the expert.

A ``capacity`` (training only) caps the assignments per expert. Assignments are ranked
choice-major: every row's first choice outranks any row's second choice, then by row order.
What happens to an assignment past the cap is the overflow policy: ``"drop"`` removes it and
renormalises the row's remaining gate weights (the row falls back to its other experts, and
to the shared expert when there is one; a row that loses every expert gets a zero routed
output); ``"reroute"`` moves it, with its gate weight, to the row's next-ranked expert that
still has room, and drops it only when none has.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

MAX_GROUPS = 4
STAIRCASE_MIN_ASSIGNMENTS = 512
OVERFLOW_POLICIES = ("drop", "reroute")


class ExpertGroup(NamedTuple):
    """A block of the flat dispatch buffer, run as one batched matmul.

    Attributes
    ----------
    experts : Tensor of shape (n_block_experts,), int64, or None
        The experts of the block's slices; None is every expert, in index order.
    n_experts : int
    first_slot : int
        The block holds slots ``first_slot .. first_slot + n_slots - 1`` of each expert.
    n_slots : int
    offset : int
        First row of the block in the flat buffer.
    """

    experts: torch.Tensor | None
    n_experts: int
    first_slot: int
    n_slots: int
    offset: int


class DispatchPlan(NamedTuple):
    """Where each kept assignment goes.

    Attributes
    ----------
    rows, experts, slots : Tensor of shape (m,), int64
        Source row, expert, and slot among that expert's assignments, sorted by expert.
    weights : Tensor of shape (m,)
        Gate weight of the assignment (renormalised if capacity dropped some).
    counts : Tensor of shape (n_experts,), int64
        Assignments per expert as routed, before the capacity cap.
    n_slots : int
        Largest number of assignments kept by one expert.
    positions : Tensor of shape (m,), int64
        Row of the assignment in the flat dispatch buffer.
    groups : tuple of ExpertGroup
        The buffer's blocks, in buffer order.
    kept_counts : Tensor of shape (n_experts,), int64
        Assignments per expert after the capacity cap: the lengths of the expert runs of
        ``rows``.
    """

    rows: torch.Tensor
    experts: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    n_slots: int
    positions: torch.Tensor
    groups: tuple[ExpertGroup, ...]
    kept_counts: torch.Tensor


def expert_capacity(capacity_factor: float, n_rows: int, top_k: int, n_experts: int) -> int:
    """Slots per expert: ``ceil(capacity_factor * n_rows * top_k / n_experts)``."""
    return max(1, math.ceil(capacity_factor * n_rows * top_k / n_experts))


def plan_layout(counts: np.ndarray, gather_cost: int = 24, block_cost: int | None = None) -> list[int]:
    """Slot thresholds of the buffer's blocks: ``[t_1, t_2, ..., t_L]``, increasing.

    Block 1 holds slots ``[0, t_1)`` of every expert (weights used in place); block ``l``
    holds slots ``[t_(l-1), t_l)`` of the experts with more than ``t_(l-1)`` assignments
    (weights gathered); ``t_L`` is the largest count. Chosen to minimise the buffer rows
    plus ``gather_cost`` rows per gathered expert plus ``block_cost`` rows per block, over
    at most :data:`MAX_GROUPS` blocks. ``block_cost`` defaults to a quarter of the
    assignments, and at least 8 rows.

    Parameters
    ----------
    counts : array of shape (n_experts,), int
        Assignments per expert.
    gather_cost, block_cost : int
        Costs, in buffer rows, of one more expert in an upper block and of one more block.
        An expert's matrix in a batched matmul costs about 20 rows on its own (measured on
        2 EPYC cores with 128-wide layers: the library packs each matrix), plus the copy of
        its gathered weights. A block costs every layer's extra calls forward and backward:
        at 4 to 16 experts and batches of 256 rows, a two-block staircase that saved a
        quarter of the rows was 10-18% slower per step than one padded block.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0 or counts.max() == 0:
        return []
    if block_cost is None:
        block_cost = max(8, int(counts.sum()) // 4)
    n = counts.shape[0]
    # Thresholds are taken from the counts themselves: values[j], ascending, the last the max.
    values = np.unique(counts)
    above = n - np.searchsorted(np.sort(counts), values, side="right")  # experts with more than values[j]
    # step[j, j2]: cost of an upper block from threshold values[j] to values[j2] (j < j2):
    # its rows, plus gathering the weights of the experts it holds, plus the block itself.
    step = above[:, None] * (values[None, :] - values[:, None] + gather_cost) + block_cost
    step = np.where(np.arange(values.shape[0])[:, None] < np.arange(values.shape[0])[None, :], step, np.inf)
    # to_top[k][j]: cheapest cost from threshold values[j] up to the max in exactly k upper
    # blocks; choices[k][j] is the next threshold on that route.
    to_top = [np.where(np.arange(values.shape[0]) == values.shape[0] - 1, 0.0, np.inf)]
    choices = [None]
    for _ in range(1, MAX_GROUPS):
        candidates = step + to_top[-1][None, :]
        choices.append(candidates.argmin(axis=1))
        to_top.append(candidates[np.arange(values.shape[0]), choices[-1]])
    first = n * values + block_cost  # the bottom block: every expert, weights in place
    totals = np.stack([first + cost for cost in to_top])
    n_upper, j = np.unravel_index(int(totals.argmin()), totals.shape)
    thresholds = [int(values[j])]
    for k in range(n_upper, 0, -1):
        j = choices[k][j]
        thresholds.append(int(values[j]))
    return thresholds


def plan_dispatch(
    indices: torch.Tensor,
    weights: torch.Tensor,
    n_experts: int,
    capacity: int | None = None,
    active: torch.Tensor | None = None,
    overflow: str = "drop",
    ranking: torch.Tensor | None = None,
    staircase: bool = True,
) -> DispatchPlan:
    """Sort the assignments of ``indices`` (n, k) by expert and give each a buffer row.

    Parameters
    ----------
    indices : Tensor of shape (n, k), int64
    weights : Tensor of shape (n, k)
    n_experts : int
    capacity : int, optional
        Most assignments per expert; ``None`` keeps every assignment (dropless).
    active : Tensor of shape (n, k), bool, optional
        Assignments to dispatch at all (expert dropout, dynamic k); the others are left out
        entirely, counts included. The caller renormalises ``weights`` over the active ones.
    overflow : {"drop", "reroute"}, default="drop"
        What happens to assignments past ``capacity`` (see the module docstring).
    ranking : Tensor of shape (n, n_experts), int64, optional
        Every row's experts, best first; required by ``overflow="reroute"``.
    staircase : bool, default=True
        Lay the buffer out as :func:`plan_layout`'s blocks when there are at least
        :data:`STAIRCASE_MIN_ASSIGNMENTS` assignments and one block would pad them by more
        than 25%; False always pads every expert to the busiest one in one block.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    n = indices.shape[0]
    flat_rows, flat_experts, flat_weights = flat_assignments(indices, weights, active)
    counts = torch.bincount(flat_experts, minlength=n_experts)
    if capacity is not None and flat_experts.numel() and capacity < int(counts.max()):
        keep = _rank_within_expert(flat_experts, n_experts) < capacity
        dropped = ~keep
        if overflow == "reroute":
            if ranking is None:
                raise ValueError("overflow='reroute' needs the routers' ranking of every expert")
            extra = _reroute(flat_rows[dropped], flat_weights[dropped], indices, active, ranking,
                             capacity - torch.bincount(flat_experts[keep], minlength=n_experts))
            flat_rows = torch.cat((flat_rows[keep], extra[0]))
            flat_experts = torch.cat((flat_experts[keep], extra[1]))
            flat_weights = torch.cat((flat_weights[keep], extra[2]))
        else:
            flat_rows, flat_experts, flat_weights = flat_rows[keep], flat_experts[keep], flat_weights[keep]
        flat_weights = normalize_per_row(flat_weights, flat_rows, n)
    order = _stable_order(flat_experts)
    rows, experts = flat_rows.index_select(0, order), flat_experts.index_select(0, order)
    expert_weights = flat_weights.index_select(0, order)
    kept_counts = torch.bincount(experts, minlength=n_experts)
    slots = _rank_in_sorted(experts, kept_counts)
    n_slots = int(kept_counts.max()) if experts.numel() else 0
    n_kept = experts.shape[0]
    # Planning a staircase costs host time every step: worth it only for large batches
    # with much padding to save.
    if staircase and n_kept >= STAIRCASE_MIN_ASSIGNMENTS and n_experts * n_slots > 1.25 * n_kept:
        kept = kept_counts.cpu().numpy()
        thresholds = plan_layout(kept)
        if len(thresholds) > 1:  # one threshold is the single padded block below
            positions, groups = _staircase_positions(thresholds, kept, experts, slots)
            return DispatchPlan(rows, experts, slots, expert_weights, counts, n_slots, positions, groups, kept_counts)
    groups = (ExpertGroup(None, n_experts, 0, n_slots, 0),) if n_slots else ()
    return DispatchPlan(rows, experts, slots, expert_weights, counts, n_slots, experts * n_slots + slots, groups,
                        kept_counts)


def normalize_per_row(weights: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Assignment ``weights`` divided by their row's total, so each row's weights sum to 1.

    A row whose weights are all zero (none kept, or all underflowed) keeps zeros instead of
    dividing 0 by 0.

    Parameters
    ----------
    weights : Tensor of shape (m,)
    rows : Tensor of shape (m,), int64
        The row of each assignment, in ``[0, n_rows)``.
    n_rows : int

    Returns
    -------
    Tensor of shape (m,)
    """
    totals = weights.new_zeros(n_rows).index_add(0, rows, weights)
    return weights / totals.index_select(0, rows).clamp_min(torch.finfo(weights.dtype).tiny)


def flat_assignments(indices: torch.Tensor, weights: torch.Tensor, active: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (row, expert, weight) assignments of a routing, choice-major: every row's first
    choice, then every row's second choice, ... (the priority order of the capacity cap).

    Parameters
    ----------
    indices : Tensor of shape (n, k), int64
    weights : Tensor of shape (n, k)
    active : Tensor of shape (n, k), bool, optional
        Assignments to keep; all when None.

    Returns
    -------
    rows, experts, weights : Tensors of shape (m,)
    """
    n, k = indices.shape
    rows = torch.arange(n, device=indices.device).repeat(k)
    experts, weights = _choice_major(indices), _choice_major(weights)
    if active is not None:
        keep = _choice_major(active)
        rows, experts, weights = rows[keep], experts[keep], weights[keep]
    return rows, experts, weights


def _staircase_positions(thresholds: list[int], kept: np.ndarray, experts: torch.Tensor,
                         slots: torch.Tensor) -> tuple[torch.Tensor, tuple[ExpertGroup, ...]]:
    """Buffer rows of the assignments, and the blocks, of :func:`plan_layout`'s staircase
    over the kept counts per expert ``kept``, for two or more ``thresholds`` (one is the flat
    layout, which :func:`plan_dispatch` builds directly)."""
    n_experts, device = kept.shape[0], experts.device
    # The upper blocks hold the experts busiest first, so that each block's experts are the
    # leading ones of the block below: their weights are gathered once, as one tensor.
    busiest_first = np.argsort(-kept, kind="stable")
    upper_ids = torch.as_tensor(busiest_first, device=device)
    groups, bases, offset, first_slot = [], [], 0, 0
    for level, threshold in enumerate(thresholds):
        n_members = n_experts if level == 0 else int((kept > first_slot).sum())
        members = np.arange(n_experts) if level == 0 else busiest_first[:n_members]
        width = threshold - first_slot
        base = np.zeros(n_experts, dtype=np.int64)
        base[members] = offset + np.arange(n_members) * width - first_slot
        bases.append(base)
        ids = None if level == 0 else upper_ids[:n_members]
        if width > 0:  # the first block is empty when gathering the busy experts beats padding
            groups.append(ExpertGroup(ids, members.shape[0], first_slot, width, offset))
        offset, first_slot = offset + members.shape[0] * width, threshold
    # Host arithmetic: the staircase is a CPU layout, and numpy indexes 1-d arrays faster.
    slots_host = slots.cpu().numpy()
    level = np.searchsorted(np.asarray(thresholds), slots_host, side="right")
    positions = np.stack(bases)[level, experts.cpu().numpy()] + slots_host
    return torch.from_numpy(positions).to(device), tuple(groups)


def _choice_major(table: torch.Tensor) -> torch.Tensor:
    """``table.t().reshape(-1)``: column 0, then column 1, ... (5x faster than the strided
    copy on CPU at 16k rows)."""
    return torch.cat(table.unbind(1))


def _stable_order(experts: torch.Tensor) -> torch.Tensor:
    """The stable sorting permutation of expert ids, sorted as int32 (faster than int64)."""
    return torch.argsort(experts.to(torch.int32), stable=True)


def _rank_within_expert(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """For each assignment, how many earlier assignments (in order) chose the same expert."""
    order = _stable_order(experts)
    counts = torch.bincount(experts, minlength=n_experts)
    sorted_rank = _rank_in_sorted(experts[order], counts)
    return torch.empty_like(sorted_rank).scatter_(0, order, sorted_rank)


def _rank_in_sorted(sorted_experts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Position of each entry of an expert-sorted sequence within its expert's run."""
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_experts.shape[0], device=sorted_experts.device) - first[sorted_experts]


def _reroute(rows, weights, indices, active, ranking, room):
    """Move overflowing assignments down their rows' rankings to experts with room left.

    ``rows``/``weights`` are the overflowing assignments in priority order; ``room`` is the
    free capacity per expert. Returns the placed ``(rows, experts, weights)``.
    """
    n, n_experts = ranking.shape
    used = torch.zeros(n, n_experts, dtype=torch.bool, device=ranking.device)
    chosen = indices if active is None else torch.where(active, indices, indices[:, :1])
    used.scatter_(1, chosen, True)
    pointer = torch.zeros_like(rows)
    placed_rows, placed_experts, placed_weights = [], [], []
    room = room.clone()
    for _ in range(n_experts):
        if rows.numel() == 0:
            break
        candidates = ranking[rows, pointer]
        key = rows * n_experts + candidates
        # only the first (highest-priority) assignment of a row may claim a given expert per round
        _, inverse = torch.unique(key, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), rows.numel(), device=rows.device)
        first = first.scatter_reduce(0, inverse, torch.arange(rows.numel(), device=rows.device), "amin")
        eligible = (first[inverse] == torch.arange(rows.numel(), device=rows.device)) & ~used[rows, candidates]
        rank = _rank_within_expert(torch.where(eligible, candidates, n_experts), n_experts + 1)
        accepted = eligible & (rank < room[candidates])
        placed_rows.append(rows[accepted])
        placed_experts.append(candidates[accepted])
        placed_weights.append(weights[accepted])
        used[rows[accepted], candidates[accepted]] = True
        room -= torch.bincount(candidates[accepted], minlength=n_experts)
        pointer = pointer + 1
        waiting = ~accepted & (pointer < n_experts)
        rows, weights, pointer = rows[waiting], weights[waiting], pointer[waiting]
    if not placed_rows:
        return rows[:0], rows[:0], weights[:0]
    return torch.cat(placed_rows), torch.cat(placed_experts), torch.cat(placed_weights)


class ExpertAssignments(NamedTuple):
    """The experts' own outputs for the (row, expert) pairs a batch was routed to.

    Attributes
    ----------
    rows : Tensor of shape (m,), int64
        Source row of each assignment.
    experts : Tensor of shape (m,), int64
        Expert of each assignment.
    weights : Tensor of shape (m,)
        Gate weight of each assignment; a row's weights sum to 1 (0 for a row whose every
        assignment was dropped).
    outputs : Tensor of shape (m, n_outputs)
        The expert's output for its row (plus the shared expert's, when there is one).
    """

    rows: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    outputs: torch.Tensor


def combine(assignments: ExpertAssignments, n_rows: int) -> torch.Tensor:
    """The gate-weighted sum of the assignments' outputs per row: Tensor (n_rows, n_outputs)."""
    weighted = assignments.outputs * assignments.weights.to(assignments.outputs.dtype).unsqueeze(1)
    return weighted.new_zeros(n_rows, weighted.shape[1]).index_add(0, assignments.rows, weighted)


def mask_failed_experts(assignments: ExpertAssignments, n_rows: int) -> ExpertAssignments:
    """Mask non-finite expert outputs (a diverged expert).

    Such an output gets weight 0 and its row's other weights are renormalised, with a
    ``RuntimeWarning`` naming the experts; an assignment that already had weight 0 (an
    expert not chosen for the row) does not count, and is silently zeroed. Nothing changes
    (and nothing is copied) when every output is finite.
    """
    finite = torch.isfinite(assignments.outputs).all(dim=1)
    if bool(finite.all()):
        return assignments
    failed = ~finite & (assignments.weights != 0)
    outputs = torch.where(finite.unsqueeze(1), assignments.outputs, 0.0)
    weights = assignments.weights
    if bool(failed.any()):
        _warn_failed_experts(assignments.experts[failed])
        weights = torch.where(finite, weights, 0.0)
        weights = normalize_per_row(weights, assignments.rows, n_rows)
    return assignments._replace(weights=weights, outputs=outputs)


def dispatch_assignments(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, n_outputs: int,
                         grad_scale: torch.Tensor | None = None, unpadded: bool = False) -> ExpertAssignments:
    """Run independent experts on their assigned rows.

    Parameters
    ----------
    x : Tensor of shape (n, features)
    experts : StackedExperts
        Called as ``experts(blocks, block_experts)`` on the buffer's blocks.
    plan : DispatchPlan
    n_outputs : int
    grad_scale : Tensor of shape (n_experts,), optional
        Multiplies the gradient reaching each expert's output (hence its parameters);
        the forward value is unchanged.
    unpadded : bool, default=False
        Ignore the plan's buffer layout and run each expert on its contiguous run of the
        expert-sorted rows (:meth:`StackedExperts.forward_sorted`): no padding, one call per
        expert. For evaluation with many rows per expert.

    Returns
    -------
    ExpertAssignments
        In plan order, non-finite outputs masked (:func:`mask_failed_experts`).
    """
    if unpadded:
        expert_out = experts.forward_sorted(x.index_select(0, plan.rows), plan.kept_counts.tolist())
    else:
        expert_out = _run_blocks(x, experts, plan, n_outputs)
    if grad_scale is not None:
        expert_out = scale_gradient(expert_out, grad_scale[plan.experts].unsqueeze(1))
    return mask_failed_experts(ExpertAssignments(plan.rows, plan.experts, plan.weights, expert_out), x.shape[0])


def dispatch_combine(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, n_outputs: int,
                     grad_scale: torch.Tensor | None = None, unpadded: bool = False) -> torch.Tensor:
    """Run the experts on their assigned rows and return the gate-weighted sum per row.

    The parameters are those of :func:`dispatch_assignments`.

    Returns
    -------
    Tensor of shape (n, n_outputs)
    """
    return combine(dispatch_assignments(x, experts, plan, n_outputs, grad_scale, unpadded), x.shape[0])


def _run_blocks(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, n_outputs: int) -> torch.Tensor:
    """The experts' outputs for the plan's assignments, in plan order, through its padded blocks."""
    buffer = x.new_zeros(sum(g.n_experts * g.n_slots for g in plan.groups), x.shape[1])
    buffer = buffer.index_put((plan.positions,), x.index_select(0, plan.rows))
    blocks = [buffer[g.offset:g.offset + g.n_experts * g.n_slots].view(g.n_experts, g.n_slots, -1)
              for g in plan.groups]
    if not blocks:
        return x.new_zeros(0, n_outputs)
    outputs = [block.reshape(-1, block.shape[-1]) for block in experts(blocks, [g.experts for g in plan.groups])]
    return (torch.cat(outputs) if len(outputs) > 1 else outputs[0])[plan.positions]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.save_for_backward(scale)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def scale_gradient(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``scale`` (broadcast)."""
    return _ScaleGradient.apply(tensor, scale.detach())


def dense_assignments(x: torch.Tensor, experts: torch.nn.Module, gates: torch.Tensor) -> ExpertAssignments:
    """Every expert on every row, weighted by ``gates`` of shape (n, n_experts).

    ``experts.all_experts(x)`` gives the outputs; the assignments are expert-major (all
    rows of expert 0, then of expert 1, ...). An expert whose gate is 0 for a row does not
    count for it, even if its output there is not finite (:func:`mask_failed_experts`).
    """
    n, n_experts = gates.shape
    expert_out = experts.all_experts(x)  # (E, n, out)
    rows = torch.arange(n, device=x.device).repeat(n_experts)
    expert_ids = torch.arange(n_experts, device=x.device).repeat_interleave(n)
    assignments = ExpertAssignments(rows, expert_ids, gates.t().reshape(-1),
                                     expert_out.reshape(n_experts * n, expert_out.shape[-1]))
    return mask_failed_experts(assignments, n)


def dense_combine(x: torch.Tensor, experts: torch.nn.Module, gates: torch.Tensor) -> torch.Tensor:
    """Every expert on every row, mixed by ``gates`` of shape (n, n_experts).

    With a sparse router's gates this is the same mixture as :func:`dispatch_combine` (up
    to the rounding of matmuls of other shapes); see :func:`dense_assignments`.
    """
    return combine(dense_assignments(x, experts, gates), x.shape[0])


def _warn_failed_experts(failed_experts: torch.Tensor) -> None:
    experts = sorted(set(failed_experts.tolist()))
    warnings.warn(
        f"Expert(s) {experts} produced non-finite output for {failed_experts.numel()} routed "
        "row(s); those outputs were masked and the rows' remaining gate weights renormalised.",
        RuntimeWarning,
        stacklevel=3,
    )
