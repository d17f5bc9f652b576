"""Faster layouts of the reference dispatch (:mod:`.dispatch`), behind one function.

:func:`expert_outputs` runs independent experts on a :class:`~.dispatch.DispatchPlan`'s
assignments in one of :data:`LAYOUTS`, and :func:`choose_layout` picks the layout for a
batch. Every layout returns the reference's outputs: in evaluation bit for bit on the CPU
(the experts' products take the same kernels, :mod:`.products`), in training up to float
rounding.

- ``"padded"`` (the reference): one block, every expert padded to the busiest one. On a
  GPU it is always the fastest: extra blocks or calls are kernel launches.
- ``"staircase"`` (training on the CPU, uneven loads): padding every expert to the busiest
  wastes work when routing is uneven (at initialisation the busiest of 64 experts can get
  2.5x the mean). The buffer becomes a staircase of at most :data:`MAX_GROUPS` blocks
  (:func:`plan_layout`): the first holds the first ``t_1`` slots of every expert, with the
  weights used in place; each further block tops up only the experts that have more
  assignments, over their gathered weights.
- ``"sorted"`` (evaluation on the CPU, many rows per expert or uneven loads): each expert
  runs on its own contiguous run of the expert-sorted rows, with no padding at all
  (:meth:`~.experts.StackedExperts.forward_sorted`): one plain matmul per expert and layer,
  cheap next to products this tall (at 8 experts, 16k rows predict 3.7x faster), or next
  to the padding of uneven loads over many experts (at 256, 20k rows predict 30x faster).
- ``"blocked"`` (training on a GPU): every buffer size is known on the host, so nothing
  waits for the device. Each expert's rows fill whole blocks of ``block_rows`` rows
  (:func:`blocked_layout`); the number of blocks is bounded by ``m / block_rows +
  n_experts`` whatever the routing, and every block runs as one slice of a batched matmul
  over the gathered weights of its expert. The buffer's size does not depend on the
  routing: about ``m + n_experts * block_rows`` rows for ``m`` assignments. With
  ``block_rows`` a quarter of the mean load rounded up to a power of two (:func:`block_rows`),
  that is under ``1.5 m`` for large batches (mean loads of 128 and more).
- ``"grouped"`` (training on a GPU whose PyTorch runs ``torch._grouped_mm`` as one fused
  kernel: bfloat16 on compute capability 9.0 or 10.0, see
  :func:`~._sync.grouped_mm_supported`): the expert-sorted rows, each expert's group
  padded to a multiple of :data:`GROUP_ALIGN` rows, go through one grouped matrix product
  per layer whose group offsets stay on the device (:func:`grouped_layout`,
  :meth:`~.experts.StackedExperts.forward_grouped`): no padding to the busiest expert and
  no gathered weights.

Host synchronisation: ``"blocked"`` and ``"grouped"`` read nothing on the host; they run
the plans that :func:`~.dispatch.plan_dispatch` makes with ``sync_free=True`` (whose
``n_slots`` is None), which :func:`choose_layout` gives them. ``"padded"`` reads the
busiest expert's count (a plan's ``n_slots``), ``"staircase"`` the counts of every expert
and ``"sorted"`` the rows per expert: CPU layouts, or evaluation, where that is free or a
copy to the host follows anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .dispatch import BufferLayout, DispatchPlan, ExpertGroup, padded_layout, rows_in_buffer, run_buffer

LAYOUTS = ("padded", "staircase", "sorted", "blocked", "grouped")
MAX_GROUPS = 6
#: Most rows one more staircase block is taken to cost (see :func:`plan_layout`).
MAX_BLOCK_COST = 256
# Planning a staircase costs host time every step: worth it only for large batches with
# much padding to save.
STAIRCASE_MIN_ASSIGNMENTS = 512
STAIRCASE_MIN_PADDING = 0.25
SORTED_MIN_ROWS_PER_EXPERT = 64
#: ``"grouped"``: the grouped product's kernel needs 16-byte aligned offsets and strides (8
#: bfloat16 values). Every expert's group of rows is a multiple of this many rows (and at
#: least this many), since the weight gradient splits the rows' axis at the group offsets;
#: the operands' widths are padded to a multiple of it (:class:`~.experts.StackedLinear`).
GROUP_ALIGN = 8


def choose_layout(plan: DispatchPlan, training: bool, device_type: str, grouped: bool = False) -> str:
    """Choose the layout of :data:`LAYOUTS` that runs ``plan`` fastest.

    Parameters
    ----------
    plan : DispatchPlan
        The batch's assignments (:func:`~.dispatch.plan_dispatch`).
    training : bool
        Whether the experts run in training (autograd, dropout) or evaluation.
    device_type : str
        ``x.device.type`` of the batch.
    grouped : bool, default=False
        Whether the experts' products can run as ``torch._grouped_mm`` without host reads
        (:func:`~._sync.grouped_mm_supported`); used for a sync-free plan only.

    Returns
    -------
    str
        For a plan made with ``sync_free=True`` (``n_slots`` None): ``"grouped"`` if
        ``grouped``, else ``"blocked"``; neither reads a size on the host. Else
        ``"padded"`` on a GPU; on the CPU, ``"staircase"`` in training when there are at
        least :data:`STAIRCASE_MIN_ASSIGNMENTS` assignments and one block would pad them by
        more than :data:`STAIRCASE_MIN_PADDING`, ``"sorted"`` in evaluation when the
        plan is sorted by expert (``plan.by_expert``) and either the experts average at
        least :data:`SORTED_MIN_ROWS_PER_EXPERT` assignments or padding every expert to
        the busiest one would take more rows than the assignments plus that many per
        expert.
    """
    if plan.n_slots is None:
        return "grouped" if grouped else "blocked"
    if device_type != "cpu":
        return "padded"
    n_kept, n_experts = plan.rows.shape[0], plan.kept_counts.shape[0]
    if training:
        uneven = n_experts * plan.n_slots > (1 + STAIRCASE_MIN_PADDING) * n_kept
        return "staircase" if n_kept >= STAIRCASE_MIN_ASSIGNMENTS and uneven else "padded"
    # One matmul per expert is taken to cost as much as SORTED_MIN_ROWS_PER_EXPERT rows:
    # worth it with many rows per expert, or where the padding to the busiest expert would
    # cost more (uneven routing over many experts: 30x slower at 256).
    per_expert_calls = SORTED_MIN_ROWS_PER_EXPERT * n_experts
    cheaper = n_kept >= per_expert_calls or n_experts * plan.n_slots > n_kept + per_expert_calls
    return "sorted" if cheaper and plan.by_expert else "padded"


def expert_outputs(x: torch.Tensor, experts: torch.nn.Module, plan: DispatchPlan, n_outputs: int,
                   layout: str = "padded", max_count: int | None = None) -> torch.Tensor:
    """Run the independent experts on the plan's assignments.

    Parameters
    ----------
    x : Tensor of shape (n, features)
        The batch's rows.
    experts : StackedExperts
        The independent experts.
    plan : DispatchPlan
        The assignments to run (:func:`~.dispatch.plan_dispatch`).
    n_outputs : int
        Width of an expert's output.
    layout : {"padded", "staircase", "sorted", "blocked", "grouped"}, default="padded"
        See the module docstring; ``"sorted"`` applies no dropout (evaluation only).
        ``"grouped"`` needs :class:`~.experts.StackedExperts` (its
        :meth:`~.experts.StackedExperts.forward_grouped`).
    max_count : int, optional
        ``"blocked"``: a bound, known on the host, on every expert's assignments (see
        :func:`blocked_layout`); the other layouts do not use it.

    Returns
    -------
    Tensor of shape (m, n_outputs)
        Each assignment's expert output, in plan order (``m`` kept assignments).

    Raises
    ------
    ValueError
        For an unknown ``layout``, or ``"sorted"`` for a plan not sorted by expert.
    """
    if layout == "sorted":
        if not plan.by_expert:
            raise ValueError("layout='sorted' needs a plan sorted by expert (plan_dispatch(..., expert_order=True))")
        return experts.forward_sorted(x.index_select(0, plan.rows), plan.kept_counts.tolist())
    if layout == "staircase":
        return run_buffer(x, experts, plan, staircase_layout(plan), n_outputs)
    if layout == "padded":
        return run_buffer(x, experts, plan, padded_layout(plan), n_outputs)
    if layout == "blocked":
        return run_buffer(x, experts, plan, blocked_layout(plan, max_count=max_count), n_outputs)
    if layout == "grouped":
        grouped = grouped_layout(plan)
        buffer = rows_in_buffer(x, plan, grouped.positions, grouped.n_rows)
        outputs = experts.forward_grouped(buffer, grouped.offsets, grouped.row_experts)
        return outputs.index_select(0, grouped.positions)  # see run_buffer
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def block_rows(n_assignments: int, n_experts: int) -> int:
    """Rows per block of :func:`blocked_layout`, a power of two: a quarter of the mean load
    per expert rounded up, but at least 32 (or the mean load rounded up, when that is less)
    and at least 8.

    The buffer holds ``m + n_experts * (B - 1)`` rows, all of which the experts run. A
    quarter of the mean load keeps that under ``1.5 m`` (a block of the whole mean load
    would make it ``2 m`` to ``3 m``: the matrix products of a large batch double); a floor
    of 32 rows keeps small batches from running many thin blocks, which batched matrix
    products run at a lower rate and whose gathered weights cost as much as their rows.
    """
    mean = -(-n_assignments // max(n_experts, 1))
    quarter = -(-mean // 4)
    return max(8, min(_power_of_two_at_least(mean), max(32, _power_of_two_at_least(quarter))))


def _power_of_two_at_least(value: int) -> int:
    return 1 << max(value - 1, 0).bit_length()


def blocked_layout(plan: DispatchPlan, max_count: int | None = None) -> BufferLayout:
    """A buffer of whole blocks per expert, of sizes known on the host.

    Expert ``e``'s ``c_e`` assignments fill ``ceil(c_e / B)`` blocks of ``B`` rows, one
    expert's blocks after the other's; the buffer holds ``(m + n_experts * (B - 1)) // B``
    blocks, as many as the most uneven routing of ``m`` assignments needs, the unused ones
    at its end (zero rows, run through the last expert and never read). When a bound
    ``max_count`` on any expert's assignments is known and ``n_experts * max_count`` rows
    are no more, every expert gets one block of ``max_count`` rows instead, with its
    weights used in place (the padded layout at a size known on the host: with 2 experts
    and ``top_k=2``, exactly the batch's rows per expert). Nothing here reads a device
    value on the host.

    Parameters
    ----------
    plan : DispatchPlan
        The assignments, in any order: each one's expert and its slot there place it
        (``n_slots`` is not used).
    max_count : int, optional
        A bound, known on the host, on every expert's assignments: the batch's rows when no
        row repeats an expert (or a capacity, if smaller).

    Returns
    -------
    BufferLayout
        One group whose ``experts`` holds each block's expert (``first_slot`` is 0), or
        None for every expert in order (one block each).
    """
    m, n_experts = plan.rows.shape[0], plan.kept_counts.shape[0]
    rows = block_rows(m, n_experts)
    n_blocks = (m + n_experts * (rows - 1)) // rows
    if m == 0:
        return BufferLayout(plan.slots, ())
    if max_count is not None and n_experts * max_count <= n_blocks * rows:
        # One block of max_count rows per expert is smaller: the padded layout at a size
        # known on the host, the weights used in place.
        return BufferLayout(plan.experts * max_count + plan.slots, (ExpertGroup(None, n_experts, 0, max_count, 0),))
    blocks = (plan.kept_counts + (rows - 1)) // rows
    ends = torch.cumsum(blocks, 0)
    positions = plan.slots.add((ends - blocks).index_select(0, plan.experts), alpha=rows)
    every_block = torch.arange(n_blocks, device=ends.device)
    # Searching all but the last expert's end sends the unused blocks to the last expert.
    block_experts = torch.searchsorted(ends[:-1], every_block, right=True)
    return BufferLayout(positions, (ExpertGroup(block_experts, n_blocks, 0, rows, 0),))


class GroupedLayout(NamedTuple):
    """Where a plan's assignments sit in the buffer of the ``"grouped"`` layout.

    Attributes
    ----------
    positions : Tensor of shape (m,), int64
        Buffer row of each assignment, in plan order.
    offsets : Tensor of shape (n_experts,), int32
        End of each expert's group of rows (``torch._grouped_mm``'s ``offs``); the last is
        ``n_rows``.
    row_experts : Tensor of shape (n_rows,), int64
        The expert of every buffer row.
    n_rows : int
        Rows of the buffer.
    """

    positions: torch.Tensor
    offsets: torch.Tensor
    row_experts: torch.Tensor
    n_rows: int


def grouped_layout(plan: DispatchPlan) -> GroupedLayout:
    """The expert-sorted rows, each expert's group padded to a multiple of ``align`` =
    :data:`GROUP_ALIGN` rows (at least ``align``), in a buffer of ``ceil(m / align) * align
    + n_experts * align``
    rows: a size known on the host, which no routing exceeds. The last expert's group takes
    the rows left over. Nothing here reads a device value on the host.

    Parameters
    ----------
    plan : DispatchPlan
        The assignments, in any order: each one's expert and its slot there place it
        (``n_slots`` is not used).

    Returns
    -------
    GroupedLayout
    """
    m, n_experts, align = plan.rows.shape[0], plan.kept_counts.shape[0], GROUP_ALIGN
    n_rows = -(-m // align) * align + n_experts * align
    # Each count rounded up to a multiple of align (align is a power of two), at least align.
    sizes = torch.bitwise_and(plan.kept_counts + (align - 1), -align).clamp_min_(align)
    ends = torch.cumsum(sizes, 0, dtype=torch.int32)
    starts = ends - sizes
    ends[-1] = n_rows  # the last group takes the rest
    positions = plan.slots.add(starts.index_select(0, plan.experts))
    row_experts = torch.searchsorted(ends, torch.arange(n_rows, dtype=torch.int32, device=ends.device), right=True)
    return GroupedLayout(positions, ends, row_experts, n_rows)


def staircase_layout(plan: DispatchPlan) -> BufferLayout:
    """The buffer of :func:`plan_layout`'s staircase over the plan's kept counts (the
    padded layout when one block is cheapest)."""
    kept = plan.kept_counts.cpu().numpy()
    thresholds = plan_layout(kept)
    if len(thresholds) <= 1:
        return padded_layout(plan)
    return _staircase_positions(thresholds, kept, plan.experts, plan.slots)


def plan_layout(counts: np.ndarray, gather_cost: int = 24, block_cost: int | None = None) -> list[int]:
    """Plan the slot thresholds of the buffer's blocks: ``[t_1, t_2, ..., t_L]``, increasing.

    Block 1 holds slots ``[0, t_1)`` of every expert (weights used in place); block ``l``
    holds slots ``[t_(l-1), t_l)`` of the experts with more than ``t_(l-1)`` assignments
    (weights gathered); ``t_L`` is the largest count. Chosen to minimise the buffer rows
    plus ``gather_cost`` rows per gathered expert plus ``block_cost`` rows per block, over
    at most :data:`MAX_GROUPS` blocks. ``block_cost`` defaults to a quarter of the
    assignments, at least 8 rows and at most :data:`MAX_BLOCK_COST`.

    Parameters
    ----------
    counts : array of shape (n_experts,), int
        Assignments per expert.
    gather_cost : int, default=24
        Cost, in buffer rows, of one more expert in an upper block. An expert's matrix in a
        batched matmul costs about 20 rows on its own (measured on 2 EPYC cores with
        128-wide layers: the library packs each matrix), plus the copy of its gathered
        weights.
    block_cost : int, optional
        Cost, in buffer rows, of one more block; by default a quarter of the assignments,
        at least 8 and at most :data:`MAX_BLOCK_COST`. A block costs every layer's extra
        calls forward and backward, a fixed time: at 4 to 16 experts and batches of 256
        rows, a two-block staircase that saved a quarter of the rows was 10-18% slower per
        step than one padded block. At large batches the cap pays: with 64 experts and
        batches of 8,192 and 65,536 rows, its staircases (5 and 6 blocks, 1.19 and 1.13
        times the assignments, where an uncapped quarter and 4 blocks at most made 2 blocks
        and 1.5 times) cut a training step's time by 14% and 39% (2-core Xeon, layers of
        128; unchanged at 1,024 rows).

    Returns
    -------
    list of int
        The increasing thresholds, at most :data:`MAX_GROUPS` of them, the last the largest
        count; empty when no expert has an assignment. One threshold is the padded layout.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0 or counts.max() == 0:
        return []
    if block_cost is None:
        block_cost = max(8, min(int(counts.sum()) // 4, MAX_BLOCK_COST))
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


def _staircase_positions(thresholds: list[int], kept: np.ndarray, experts: torch.Tensor,
                         slots: torch.Tensor) -> BufferLayout:
    """Buffer rows of the assignments, and the blocks, of :func:`plan_layout`'s staircase
    over the kept counts per expert ``kept``, for two or more ``thresholds``."""
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
    return BufferLayout(torch.from_numpy(positions).to(device), tuple(groups))
