"""The reference dispatch: rows sorted by expert, one padded buffer, a weighted combine.

The ``n * k`` (row, expert) assignments are sorted by expert (:func:`plan_dispatch`); each
gets a slot in its expert's slice of a buffer padded to the busiest expert
(:func:`padded_layout`), the experts run as one batched matmul over stacked weights
(:func:`run_buffer`), and the outputs are gathered back and summed per row with
``index_add_`` (:func:`combine`), or, where the assignments tile a grid of the rows (every
row's ``k`` in turn, or every row's first choice, then every row's second...), summed over
a view of that grid. No
one-hot ``(n, n_experts, capacity)`` tensor is ever built. Faster layouts of the same
computation (a staircase of blocks for uneven loads, unpadded per-expert runs for large
evaluation batches) live in :mod:`.layouts`, each tested equal to this one.

An expert output that is not finite (a diverged expert) is masked: the (row, expert)
assignment gets weight 0, the row's other weights are renormalised, and a
``RuntimeWarning`` names the expert.

Host synchronisation
--------------------
On a GPU, reading a tensor's value on the host (``int(t)``, ``bool(t)``, ``t.tolist()``),
selecting with a boolean mask, or ``torch.bincount`` (whose CUDA kernel reads the largest
value to size its output) makes the host wait for the device. What here needs none:

- the plan of a dropless routing without inactive assignments: its ``n * k`` assignments
  have a size known on the host, the counts per expert are a scatter-add
  (:func:`count_experts`), the sort, slots and offsets stay on the device; with
  ``plan_dispatch(..., sync_free=True)`` the busiest expert's count ``n_slots`` is not read
  (None), and the layouts of :mod:`.layouts` that need no such size run it. Those layouts
  place assignments by (expert, slot), so such a plan may skip the sort
  (``expert_order=False``): its slots come from one cumulative sum over a flat one-hot
  table (a scan a GPU runs in parallel, where a scan along the first axis of a 2-d table
  would run one sequential loop per column);
- :func:`combine`, :func:`normalize_per_row`, :func:`scale_gradient`;
- the masking of non-finite outputs given a device ``tally`` (:func:`mask_failed_experts`):
  every output passes through ``torch.where``, and the failed assignments are counted per
  expert on the device for a warning issued later, where reading is free.

What reads sizes, by design: the padded layout's ``n_slots``; a capacity cap (whether any
expert overflows, and the kept assignments, a data-dependent number) and rerouting (a loop
until every overflowing assignment is placed); inactive assignments (dynamic-k routing,
expert dropout), left out of the plan by a boolean mask; and the masking of non-finite
outputs without a tally, which warns at once. The module runs its training steps on a GPU
without any of these where the routing allows (see :mod:`.moe`).

A ``capacity`` (training only) caps the assignments per expert. Assignments are ranked
choice-major: every row's first choice outranks any row's second choice, then by row order.
What happens to an assignment past the cap is the overflow policy: ``"drop"`` removes it and
renormalises the row's remaining gate weights (the row falls back to its other experts, and
to the shared expert when there is one; a row that loses every expert gets a zero routed
output, and under a mixture output a one-component mixture of that output: see
``MixtureOfExperts``); ``"reroute"`` moves it, with its gate weight, to the row's
next-ranked expert that still has room, and drops it only when none has.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

OVERFLOW_POLICIES = ("drop", "reroute")
#: Largest (experts x assignments) one-hot table a plan without sort builds (int32 running
#: counts: 64 MiB); past it the plan sorts.
ONE_HOT_MAX_ENTRIES = 1 << 24


class ExpertGroup(NamedTuple):
    """A block of a dispatch buffer, run as one batched matmul.

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

    Each parameter is kept as the field of the same name.

    Parameters
    ----------
    rows, experts, slots : Tensor of shape (m,), int64
        Source row, expert, and slot among that expert's assignments, sorted by expert.
    weights : Tensor of shape (m,)
        Gate weight of the assignment (renormalised if capacity dropped some).
    counts : Tensor of shape (n_experts,), int64
        Assignments per expert as routed, before the capacity cap.
    n_slots : int or None
        Largest number of assignments kept by one expert; None in a plan made with
        ``sync_free=True``, which does not read it on the host.
    kept_counts : Tensor of shape (n_experts,), int64
        Assignments per expert after the capacity cap: the lengths of the expert runs of
        ``rows``.
    per_row : int, default=0
        0 for assignments sorted by expert; ``k`` for a plan that :func:`plan_dispatch`
        left in row order (``expert_order=False``): row ``i``'s ``k`` assignments are
        ``i * k`` to ``i * k + k - 1``, and the slots are each assignment's rank within its
        expert in that order.
    """

    rows: torch.Tensor
    experts: torch.Tensor
    slots: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    n_slots: int | None
    kept_counts: torch.Tensor
    per_row: int = 0

    @property
    def by_expert(self) -> bool:
        """Whether the assignments are sorted by expert (else in row order)."""
        return not self.per_row


def assignment_grid(plan: DispatchPlan) -> str | None:
    """The :class:`ExpertAssignments` ``grid`` of a plan's assignments: ``"row_major"`` for
    a plan in row order, else None."""
    return "row_major" if plan.per_row else None


class BufferLayout(NamedTuple):
    """Where a plan's assignments sit in a dispatch buffer.

    Attributes
    ----------
    positions : Tensor of shape (m,), int64
        Buffer row of each assignment, in plan order.
    groups : tuple of ExpertGroup
        The buffer's blocks, in buffer order.
    """

    positions: torch.Tensor
    groups: tuple[ExpertGroup, ...]


def expert_capacity(capacity_factor: float, n_rows: int, top_k: int, n_experts: int) -> int:
    """Compute the slots per expert: ``ceil(capacity_factor * n_rows * top_k / n_experts)``.

    Parameters
    ----------
    capacity_factor : float
        Multiple of an even share of the assignments that one expert may take (>= 1 in
        the estimators).
    n_rows : int
        Rows in the batch.
    top_k : int
        Assignments per row.
    n_experts : int
        Number of experts.

    Returns
    -------
    int
        The most assignments one expert keeps; at least 1.
    """
    return max(1, math.ceil(capacity_factor * n_rows * top_k / n_experts))


def plan_dispatch(
    indices: torch.Tensor,
    weights: torch.Tensor,
    n_experts: int,
    capacity: int | None = None,
    active: torch.Tensor | None = None,
    overflow: str = "drop",
    ranking: torch.Tensor | None = None,
    sync_free: bool = False,
    expert_order: bool = True,
) -> DispatchPlan:
    """Sort the assignments of ``indices`` (n, k) by expert and give each a buffer row.

    Parameters
    ----------
    indices : Tensor of shape (n, k), int64
        Each row's chosen experts, in order of preference.
    weights : Tensor of shape (n, k)
        The gate weights of those choices.
    n_experts : int
        Number of experts (the length of the plan's counts).
    capacity : int, optional
        Most assignments per expert; ``None`` keeps every assignment (dropless).
    active : Tensor of shape (n, k), bool, optional
        Assignments to dispatch at all (expert dropout, dynamic k); the others are left out
        entirely, counts included. The caller renormalises ``weights`` over the active ones.
    overflow : {"drop", "reroute"}, default="drop"
        What happens to assignments past ``capacity`` (see the module docstring).
    ranking : Tensor of shape (n, n_experts), int64, optional
        Every row's experts, best first; required by ``overflow="reroute"``.
    sync_free : bool, default=False
        Leave ``n_slots`` unread (None): reading the busiest expert's count makes the host
        wait for a GPU. Without ``capacity`` and ``active`` nothing else in the plan is
        read on the host either (see the module docstring).
    expert_order : bool, default=True
        False: the caller places assignments by (expert, slot) and does not need them
        grouped by expert (every layout but ``"sorted"``; expert parallelism does need
        them). A plan without ``capacity`` and ``active`` then skips the sort: the
        assignments stay in row order (row 0's choices, then row 1's, ...), and each one's
        slot, its rank within its expert in that order, is read from one cumulative sum
        over the flattened ``(n_experts, n * k)`` one-hot table (fewer kernels on a GPU,
        where a small step's time is its launches), when that table has at most
        :data:`ONE_HOT_MAX_ENTRIES` entries. Other plans are sorted all the same.

    Returns
    -------
    DispatchPlan
        The kept assignments, stably sorted by expert (in row order where
        ``expert_order=False`` allowed it: ``by_expert`` says which), with their slots,
        weights (renormalised per row when capacity removed some) and the per-expert counts
        before and after the cap.

    Raises
    ------
    ValueError
        For an unknown ``overflow``, or ``overflow="reroute"`` without ``ranking``.
    """
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    n = indices.shape[0]
    if active is None and capacity is None and not expert_order and indices.numel() * n_experts <= ONE_HOT_MAX_ENTRIES:
        return _row_major_plan(indices, weights, n_experts, sync_free)
    if active is None and capacity is None:
        # Every assignment, choice-major: flat position p holds row p % n (computed from
        # the sorting order below, a launch instead of three).
        flat_rows, flat_experts, flat_weights = None, _choice_major(indices), _choice_major(weights)
    else:
        flat_rows, flat_experts, flat_weights = flat_assignments(indices, weights, active)
    counts = count_experts(flat_experts, n_experts)
    if capacity is not None and flat_experts.numel() and capacity < int(counts.max()):
        keep = _rank_within_expert(flat_experts, n_experts) < capacity
        dropped = ~keep
        if overflow == "reroute":
            if ranking is None:
                raise ValueError("overflow='reroute' needs the routers' ranking of every expert")
            extra = _reroute(flat_rows[dropped], flat_weights[dropped], indices, active, ranking,
                             capacity - count_experts(flat_experts[keep], n_experts))
            flat_rows = torch.cat((flat_rows[keep], extra[0]))
            flat_experts = torch.cat((flat_experts[keep], extra[1]))
            flat_weights = torch.cat((flat_weights[keep], extra[2]))
        else:
            kept = keep.nonzero().squeeze(1)  # one selection for the three
            flat_rows, flat_experts = flat_rows.index_select(0, kept), flat_experts.index_select(0, kept)
            flat_weights = flat_weights.index_select(0, kept)
        flat_weights = normalize_per_row(flat_weights, flat_rows, n)
    order = _stable_order(flat_experts)
    rows = order.remainder(max(n, 1)) if flat_rows is None else flat_rows.index_select(0, order)
    experts = flat_experts.index_select(0, order)
    expert_weights = flat_weights.index_select(0, order)
    kept_counts = counts if capacity is None else count_experts(experts, n_experts)
    slots = _rank_in_sorted(experts, kept_counts)
    n_slots = None if sync_free else (int(kept_counts.max()) if experts.numel() else 0)
    return DispatchPlan(rows, experts, slots, expert_weights, counts, n_slots, kept_counts)


def _row_major_plan(indices: torch.Tensor, weights: torch.Tensor, n_experts: int, sync_free: bool) -> DispatchPlan:
    """Every assignment in row order (row 0's choices, then row 1's, ...: views of
    ``indices`` and ``weights``), its slot its rank within its expert in that order, from a
    cumulative sum instead of a sort."""
    k = indices.shape[1]
    experts = indices.reshape(-1)
    m = experts.shape[0]
    rows = torch.arange(m, device=experts.device).div(k, rounding_mode="floor")
    if m == 0:
        counts = experts.new_zeros(n_experts)
        return DispatchPlan(rows, experts, experts, weights.reshape(-1), counts, None if sync_free else 0, counts,
                            per_row=k)
    # The one-hot table expert by expert, scanned as one flat sequence: entry (e, p) counts the
    # assignments of the experts before e, plus e's up to p. (A GPU scans a flat tensor in
    # parallel, but scans each column of a 2-d one sequentially, one thread per column:
    # (m, n_experts).cumsum(0) takes m dependent steps.)
    chosen = torch.arange(n_experts, device=experts.device).unsqueeze(1) == experts  # (n_experts, m)
    running = chosen.view(-1).cumsum(0, dtype=torch.int32).view(n_experts, m)  # at most 2**24
    counts = chosen.sum(dim=1)
    before = running[:, -1] - counts  # assignments of the experts before each one
    slots = running.gather(0, experts.unsqueeze(0)).squeeze(0) - before.index_select(0, experts) - 1
    n_slots = None if sync_free else int(counts.max())
    return DispatchPlan(rows, experts, slots, weights.reshape(-1), counts, n_slots, counts, per_row=k)


def padded_layout(plan: DispatchPlan) -> BufferLayout:
    """The reference buffer: one block, every expert's slice padded to the busiest expert's
    ``plan.n_slots`` slots."""
    n_experts = plan.kept_counts.shape[0]
    n_slots = plan.n_slots
    if n_slots is None:  # a sync-free plan: the one read of the padded layout
        n_slots = int(plan.kept_counts.max()) if plan.experts.numel() else 0
    groups = (ExpertGroup(None, n_experts, 0, n_slots, 0),) if n_slots else ()
    return BufferLayout(plan.experts * n_slots + plan.slots, groups)


def normalize_per_row(weights: torch.Tensor, rows: torch.Tensor, n_rows: int, grid: str | None = None
                      ) -> torch.Tensor:
    """Assignment ``weights`` divided by their row's total, so each row's weights sum to 1.

    A row whose weights are all zero (none kept, or all underflowed) keeps zeros instead of
    dividing 0 by 0.

    Parameters
    ----------
    weights : Tensor of shape (m,)
    rows : Tensor of shape (m,), int64
        The row of each assignment, in ``[0, n_rows)``.
    n_rows : int
    grid : {None, "row_major", "choice_major"}, default=None
        How the assignments tile a grid of the rows (see :class:`ExpertAssignments`): the
        totals are then sums over a view of it.

    Returns
    -------
    Tensor of shape (m,)
    """
    tiny = torch.finfo(weights.dtype).tiny
    if grid is not None and n_rows:
        table, dim = _grid_view(weights, n_rows, grid)
        return (table / table.sum(dim=dim, keepdim=True).clamp_min(tiny)).reshape(-1)
    return weights / sum_per_row(weights, rows, n_rows).index_select(0, rows).clamp_min(tiny)


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
        # One selection (one host read of its size on a GPU) for the three.
        keep = _choice_major(active).nonzero().squeeze(1)
        rows, experts, weights = (t.index_select(0, keep) for t in (rows, experts, weights))
    return rows, experts, weights


def _choice_major(table: torch.Tensor) -> torch.Tensor:
    """``table.t().reshape(-1)``: column 0, then column 1, ... (5x faster than the strided
    copy on CPU at 16k rows)."""
    return torch.cat(table.unbind(1))


def count_experts(experts: torch.Tensor, n_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Count the assignments per expert, without a host synchronisation.

    ``torch.bincount(experts, minlength=n_experts)`` for ids in ``[0, n_experts)``, as a
    scatter-add: on CUDA ``bincount`` reads the largest id on the host to size its output.

    Parameters
    ----------
    experts : Tensor of shape (m,), int64
        Expert ids, each in ``[0, n_experts)``.
    n_experts : int
        Length of the result.
    weights : Tensor of shape (m,), bool or integer, optional
        Count assignment ``i`` ``weights[i]`` times (a boolean mask counts the True ones).

    Returns
    -------
    Tensor of shape (n_experts,), int64
    """
    counted = torch.ones_like(experts) if weights is None else weights.to(torch.int64)
    return torch.zeros(n_experts, dtype=torch.int64, device=experts.device).scatter_add_(0, experts, counted)


def count_routed(indices: torch.Tensor, n_experts: int, active: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Count a batch's routing assignments per expert, leaving out inactive ones and masked rows.

    Parameters
    ----------
    indices : Tensor of shape (n, k), int64
        Every row's chosen experts.
    n_experts : int
        Length of the result.
    active : Tensor of shape (n, k), bool, optional
        Which assignments take part (dynamic k, expert dropout); all when None.
    mask : Tensor of shape (n,), bool, optional
        Which rows count (those of positive sample weight); all when None.

    Returns
    -------
    counts : Tensor of shape (n_experts,), int64
        :func:`count_experts` of the assignments that count.
    counted : Tensor of shape (n, k), bool, or None
        Which assignments counted; None when all did.
    """
    counted = active
    if mask is not None:
        rows = mask.unsqueeze(1).expand_as(indices)
        counted = rows if counted is None else counted & rows
    weights = None if counted is None else counted.reshape(-1)
    return count_experts(indices.reshape(-1), n_experts, weights), counted


def _stable_order(experts: torch.Tensor) -> torch.Tensor:
    """The stable sorting permutation of expert ids, sorted as int32 (faster than int64)."""
    return torch.argsort(experts.to(torch.int32), stable=True)


def _rank_within_expert(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """For each assignment, how many earlier assignments (in order) chose the same expert."""
    order = _stable_order(experts)
    counts = count_experts(experts, n_experts)
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
        room -= count_experts(candidates[accepted], n_experts)
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
    grid : {None, "row_major", "choice_major"}, default=None
        How the ``m = n * k`` assignments tile a grid, ``k`` for each of the ``n`` rows:
        ``"row_major"``, row ``i``'s are ``i * k`` to ``i * k + k - 1`` (``rows`` is
        ``arange(m) // k``); ``"choice_major"``, every row's first assignment in row order,
        then every row's second, ... (``rows`` is ``arange(m) % n``; with every expert on
        every row, expert by expert). The per-row sums of :func:`combine` and
        :func:`normalize_per_row` are then reductions of a view instead of additions
        indexed by row (fewer kernels, whose rounding may depend on the batch's size:
        evaluation, which is batch-invariant, leaves the grid None). None: in any order.
    """

    rows: torch.Tensor
    experts: torch.Tensor
    weights: torch.Tensor
    outputs: torch.Tensor
    grid: str | None = None


def _grid_view(values: torch.Tensor, n_rows: int, grid: str) -> tuple[torch.Tensor, int]:
    """``values`` (m, ...) of assignments on a ``grid`` (see :class:`ExpertAssignments`) as
    a view with one axis for the rows, and the axis of each row's assignments."""
    if grid == "row_major":
        return values.reshape(n_rows, -1, *values.shape[1:]), 1
    if grid == "choice_major":
        return values.reshape(-1, n_rows, *values.shape[1:]), 0
    raise ValueError(f"grid must be None, 'row_major' or 'choice_major', got {grid!r}")


def sum_per_row(values: torch.Tensor, rows: torch.Tensor, n_rows: int, grid: str | None = None) -> torch.Tensor:
    """The assignments' ``values`` (m, ...) summed per row: Tensor (n_rows, ...), by an
    addition indexed by row, or a reduction of a view where the assignments tile a
    ``grid`` (see :class:`ExpertAssignments`); ``rows``, ``n_rows`` and ``grid`` as for
    :func:`normalize_per_row`."""
    if grid is not None and n_rows:
        table, dim = _grid_view(values, n_rows, grid)
        return table.sum(dim=dim)
    return values.new_zeros(n_rows, *values.shape[1:]).index_add(0, rows, values)


def combine(assignments: ExpertAssignments, n_rows: int) -> torch.Tensor:
    """The gate-weighted sum of the assignments' outputs per row: Tensor (n_rows, n_outputs)."""
    weighted = assignments.outputs * assignments.weights.to(assignments.outputs.dtype).unsqueeze(1)
    return sum_per_row(weighted, assignments.rows, n_rows, assignments.grid)


def mask_failed_experts(assignments: ExpertAssignments, n_rows: int,
                        tally: torch.Tensor | None = None) -> ExpertAssignments:
    """Mask non-finite expert outputs (a diverged expert).

    Such an output gets weight 0 and its row's other weights are renormalised, with a
    ``RuntimeWarning`` naming the experts; an assignment that already had weight 0 (an
    expert not chosen for the row) does not count, and is silently zeroed. Nothing changes
    (and nothing is copied) when every output is finite.

    Parameters
    ----------
    assignments : ExpertAssignments
        The experts' outputs and the assignments' gate weights.
    n_rows : int
        Rows of the batch.
    tally : Tensor of shape (n_experts,), int64, optional
        Mask without reading anything on the host: every output passes through
        ``torch.where``, the weights are renormalised where any assignment failed (the same
        values as without a tally), and each expert's failed assignments are added to
        ``tally`` in place, for the caller to report (:func:`warn_failed_experts`) where
        reading it is free. No warning here.

    Returns
    -------
    ExpertAssignments
    """
    values = assignments.outputs.detach()
    # x - x is 0 exactly where x is finite (NaN for NaN and ±inf): two kernels where
    # torch.isfinite takes four.
    finite = (values - values).eq(0).all(dim=1)
    if tally is not None:
        # For booleans a > b is a and not b: one kernel for ~finite & (weights != 0).
        failed = (assignments.weights != 0) > finite
        tally.scatter_add_(0, assignments.experts, failed.to(tally.dtype))
        outputs = torch.where(finite.unsqueeze(1), assignments.outputs, 0.0)
        renormalised = normalize_per_row(torch.where(finite, assignments.weights, 0.0), assignments.rows, n_rows,
                                         assignments.grid)
        weights = torch.where(failed.any(), renormalised, assignments.weights)
        return assignments._replace(weights=weights, outputs=outputs)
    if bool(finite.all()):
        return assignments
    outputs = torch.where(finite.unsqueeze(1), assignments.outputs, 0.0)
    weights = assignments.weights
    failed = ~finite & (weights != 0)
    if bool(failed.any()):
        failed_experts = assignments.experts[failed]
        _warn_failed_experts(sorted(set(failed_experts.tolist())), failed_experts.numel(), stacklevel=3)
        weights = torch.where(finite, weights, 0.0)
        weights = normalize_per_row(weights, assignments.rows, n_rows, assignments.grid)
    return assignments._replace(weights=weights, outputs=outputs)


def warn_failed_experts(tally: torch.Tensor) -> None:
    """Warn about the failed assignments counted in a ``tally`` of
    :func:`mask_failed_experts` (one host read), and reset it to zeros.

    Parameters
    ----------
    tally : Tensor of shape (n_experts,), int64
        Failed assignments per expert.
    """
    counts = tally.tolist()
    if any(counts):
        tally.zero_()
        _warn_failed_experts([e for e, count in enumerate(counts) if count], sum(counts), stacklevel=4)


def assignments_with_outputs(rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                             outputs: torch.Tensor, n_rows: int,
                             grad_scale: torch.Tensor | None = None,
                             tally: torch.Tensor | None = None, grid: str | None = None) -> ExpertAssignments:
    """The :class:`ExpertAssignments` of experts' ``outputs`` for (row, expert, weight)
    assignments, non-finite outputs masked (:func:`mask_failed_experts`).

    Parameters
    ----------
    rows, experts, weights : Tensor of shape (m,)
    outputs : Tensor of shape (m, n_outputs)
    n_rows : int
    grad_scale : Tensor of shape (n_experts,), optional
        Multiplies the gradient reaching each expert's output (hence its parameters);
        the forward value is unchanged.
    tally : Tensor of shape (n_experts,), int64, optional
        Mask without host reads, counting failures here (see :func:`mask_failed_experts`).
    grid : {None, "row_major", "choice_major"}, default=None
        How the assignments tile a grid of the rows (see :class:`ExpertAssignments`).
    """
    if grad_scale is not None:
        outputs = scale_gradient(outputs, grad_scale[experts].unsqueeze(1))
    return mask_failed_experts(ExpertAssignments(rows, experts, weights, outputs, grid), n_rows, tally)


def dispatch_assignments(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, n_outputs: int,
                         grad_scale: torch.Tensor | None = None) -> ExpertAssignments:
    """Run independent experts on their assigned rows, in the reference padded layout.

    Parameters
    ----------
    x : Tensor of shape (n, features)
    experts : StackedExperts
        Called as ``experts(blocks, block_experts)`` on the buffer's blocks.
    plan : DispatchPlan
    n_outputs : int
    grad_scale : Tensor of shape (n_experts,), optional
        See :func:`assignments_with_outputs`.

    Returns
    -------
    ExpertAssignments
        In plan order, non-finite outputs masked (:func:`mask_failed_experts`).
    """
    outputs = run_buffer(x, experts, plan, padded_layout(plan), n_outputs)
    return assignments_with_outputs(plan.rows, plan.experts, plan.weights, outputs, x.shape[0], grad_scale,
                                    grid=assignment_grid(plan))


def dispatch_combine(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, n_outputs: int,
                     grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Run the experts on their assigned rows and return the gate-weighted sum per row.

    Parameters
    ----------
    x : Tensor of shape (n, features)
        The batch's rows.
    experts : StackedExperts
        Called as ``experts(blocks, block_experts)`` on the buffer's blocks.
    plan : DispatchPlan
        The assignments to run (:func:`plan_dispatch` on the batch's routing).
    n_outputs : int
        Width of an expert's output.
    grad_scale : Tensor of shape (n_experts,), optional
        Multiplies the gradient reaching each expert's output (hence its parameters); the
        forward value is unchanged.

    Returns
    -------
    Tensor of shape (n, n_outputs)
        Each row's gate-weighted sum of its experts' outputs (non-finite outputs masked,
        :func:`mask_failed_experts`); zero for a row with no kept assignment.
    """
    return combine(dispatch_assignments(x, experts, plan, n_outputs, grad_scale), x.shape[0])


def rows_in_buffer(x: torch.Tensor, plan: DispatchPlan, positions: torch.Tensor, n_buffer_rows: int) -> torch.Tensor:
    """A zero buffer of ``n_buffer_rows`` rows holding the row of ``x`` of the plan's
    assignment ``i`` at row ``positions[i]``: Tensor of shape (n_buffer_rows, features)."""
    buffer = x.new_zeros(n_buffer_rows, x.shape[1])
    if plan.per_row:  # each row broadcast to its k positions, without gathering the rows first
        return buffer.index_put((positions.reshape(-1, plan.per_row),), x.unsqueeze(1))
    return buffer.index_put((positions,), x.index_select(0, plan.rows))


def in_row_order(outputs: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Outputs of ``plan``'s assignments, given in plan (expert) order, in the order of the
    rows they came from, for a plan with one assignment per row: Tensor of the shape of
    ``outputs``."""
    if plan.per_row == 1:  # row-major, one assignment per row: already in row order
        return outputs
    return outputs.new_zeros(outputs.shape).index_copy(0, plan.rows, outputs)


def run_buffer(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, layout: BufferLayout,
               n_outputs: int) -> torch.Tensor:
    """The experts' outputs for the plan's assignments, in plan order, through the blocks of
    a buffer ``layout``: Tensor of shape (m, n_outputs)."""
    buffer = rows_in_buffer(x, plan, layout.positions, sum(g.n_experts * g.n_slots for g in layout.groups))
    blocks = [buffer[g.offset:g.offset + g.n_experts * g.n_slots].view(g.n_experts, g.n_slots, -1)
              for g in layout.groups]
    if not blocks:
        return x.new_zeros(0, n_outputs)
    outputs = [block.reshape(-1, block.shape[-1]) for block in experts(blocks, [g.experts for g in layout.groups])]
    # index_select, whose gradient is an index_add; indexing's is an accumulating index_put,
    # which a GPU runs with a sort of the positions.
    return (torch.cat(outputs) if len(outputs) > 1 else outputs[0]).index_select(0, layout.positions)


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
    """Pass ``tensor`` through unchanged, multiplying its incoming gradient by ``scale``.

    Parameters
    ----------
    tensor : Tensor
        The values to pass through.
    scale : Tensor
        Broadcast against ``tensor`` and multiplied into its gradient in the backward pass;
        no gradient flows into ``scale`` (it is detached).

    Returns
    -------
    Tensor
        A view of ``tensor`` with the same values.
    """
    return _ScaleGradient.apply(tensor, scale.detach())


def dense_assignments(x: torch.Tensor, experts: torch.nn.Module, gates: torch.Tensor,
                      tally: torch.Tensor | None = None, choice_major: bool = False) -> ExpertAssignments:
    """Every expert on every row, weighted by ``gates`` of shape (n, n_experts).

    ``experts.all_experts(x)`` gives the outputs; the assignments are expert-major (all
    rows of expert 0, then of expert 1, ...). An expert whose gate is 0 for a row does not
    count for it, even if its output there is not finite (:func:`mask_failed_experts`, to
    which ``tally`` goes). ``choice_major=True`` marks them as such (``grid="choice_major"``,
    expert ``j`` being every row's ``j``-th choice): their per-row sums are then reductions
    of a view, fewer kernels than additions indexed by row, but rounded in an order that may
    depend on the batch's size, which training allows and batch-invariant evaluation does
    not.
    """
    n, n_experts = gates.shape
    expert_out = experts.all_experts(x)  # (E, n, out)
    rows = torch.arange(n, device=x.device).repeat(n_experts)
    expert_ids = torch.arange(n_experts, device=x.device).repeat_interleave(n)
    assignments = ExpertAssignments(rows, expert_ids, gates.t().reshape(-1),
                                     expert_out.reshape(n_experts * n, expert_out.shape[-1]),
                                     "choice_major" if choice_major else None)
    return mask_failed_experts(assignments, n, tally)


def dense_combine(x: torch.Tensor, experts: torch.nn.Module, gates: torch.Tensor) -> torch.Tensor:
    """Run every expert on every row and mix the outputs by ``gates``.

    With a sparse router's gates this is the same mixture as :func:`dispatch_combine` (up
    to the rounding of matmuls of other shapes); see :func:`dense_assignments`.

    Parameters
    ----------
    x : Tensor of shape (n, features)
        The batch's rows.
    experts : StackedExperts
        Whose ``all_experts(x)`` gives every expert's output on every row.
    gates : Tensor of shape (n, n_experts)
        Each row's gate weights (zero for experts not chosen).

    Returns
    -------
    Tensor of shape (n, n_outputs)
        Each row's gate-weighted sum of the experts' outputs; an expert's non-finite output
        is masked where its gate is not 0 (:func:`mask_failed_experts`).
    """
    return combine(dense_assignments(x, experts, gates), x.shape[0])


def _warn_failed_experts(experts: list[int], n_failed: int, stacklevel: int) -> None:
    warnings.warn(
        f"Expert(s) {experts} produced non-finite output for {n_failed} routed "
        "row(s) (from non-finite weights, or non-finite input rows); those outputs were masked and the rows' "
        "remaining gate weights renormalised.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
