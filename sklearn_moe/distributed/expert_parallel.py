"""Expert parallelism: a :class:`~sklearn_moe.nn.MixtureOfExperts` whose experts are sharded
over the ranks of a ``torch.distributed`` process group.

Which rank holds what
---------------------
Rank ``r`` of a group of ``R`` ranks owns one contiguous block of the ``n_experts``
independent experts, ``expert_shards(n_experts, R)[r]`` (the first ``n_experts % R`` ranks
one expert more when the experts do not divide evenly); its
:class:`ShardedExperts` holds that block's stacked weights, and nothing else of the experts.
Everything else is replicated, the same on every rank: the input embeddings, the router,
the shared expert, the combine and the auxiliary losses. Every rank feeds its own batch.

Data flow of one forward (every rank runs it at the same time)
--------------------------------------------------------------
1. Locally: embed the batch, route it, and plan the dispatch exactly as the single-process
   module does (:func:`~sklearn_moe.nn.dispatch.plan_dispatch`, capacity cap included): the
   kept (row, expert) assignments, sorted by expert, with their per-expert counts.
2. Counts: one ``all_to_all_single`` of the per-expert counts, each rank sending every other
   rank the counts of that rank's experts, so that every rank knows how many rows it will
   receive from each rank for each of its experts.
3. Rows: one ``all_to_all_single`` of the assignments' rows (a row goes once per chosen
   expert; sorted by expert, they are already grouped by destination rank).
4. The owner runs its experts on the rows it received (sorted by local expert through the
   engine's own layouts, :func:`~sklearn_moe.nn.layouts.expert_outputs`) and sends the
   outputs back with the reverse ``all_to_all_single``; they arrive in the order their rows
   left.
5. Locally: the combine with the gate weights, the shared expert and the auxiliary terms;
   :meth:`ExpertParallelMoE.forward` returns the :class:`~sklearn_moe.nn.MoEOutput` that the
   single-process module returns for this rank's batch (same fields, same values up to float
   rounding).

The two exchanges of rows and outputs are autograd functions whose backward is the reverse
exchange: the gradients of the outputs travel to the experts' owners, the gradients of the
rows (when the input requires them) travel back. An expert's gradient therefore sums over
every rank's rows; a replicated parameter's gradient is local, and
:func:`reduce_gradients` all-reduces it.

Rules for the caller: every rank of the group calls forward (also with an empty batch) and,
in training, backward on a loss that depends on the output, in the same order; every rank
uses the same module configuration, train/eval mode and autocast setting. Rows and the
counts stay on the input's device; the backend is the group's (gloo on CPU, NCCL on GPU).

What is supported and what is refused
-------------------------------------
- ``expert_type="independent"`` experts are sharded. ``expert_type="adapter"`` is refused
  with a ``ValueError``: adapter experts share one backbone MLP and differ only by small
  per-expert adapters and heads, so sharding them would still need the whole backbone on
  every rank and every routed row to cross it; replicate such a module and train it data
  parallel instead.
- Every router. Sparse routers send each row to the ranks of its chosen experts; dense ones
  (``"softmax"``, ``"uniform"``, or ``top_k == n_experts``), like the small-batch evaluation
  path, the diversity loss and ``predict_distribution``, run every expert on every row and
  so send each row to every remote expert.
- ``capacity_factor`` (``"drop"`` and ``"reroute"``): applied per rank to its own batch, as
  the single-process module applies it to that batch (an expert takes at most
  ``ceil(capacity_factor * n_local * top_k / n_experts)`` assignments from each rank).
  ``expert_grad_scaling`` likewise scales by the local batch's counts.
- ``n_experts`` must be at least the group's size (every rank owns an expert).
- ``split_expert`` (collapse recovery, growth by splitting): a collective call, every rank
  with the same arguments; the source expert's weights travel from its rank to the ranks
  of the copies.

Bytes accounting
----------------
Every :class:`ShardedExperts` counts, in :class:`CommStats`, the bytes it sends to *other*
ranks (what stays on the rank is a local copy). With ``E`` experts, ``e_r`` of them on this
rank, rows of width ``d`` (itemsize ``s_in``), expert outputs of width ``w`` (itemsize
``s_out``, the autocast dtype under autocast, else the input's), ``a`` assignments sent to
other ranks and ``b`` received from other ranks, one exchange sends::

    count_bytes  = 8 * (E - e_r)                  # int64 counts
    row_bytes    = a * d * s_in                    # rows out
    output_bytes = b * w * s_out                   # outputs back
    backward_bytes = a * w * s_out + b * d * s_in  # output gradients out, row gradients back

(the row gradients only when the input requires gradients). The payload, rows and outputs,
is the lower bound: no padding travels, only the counts are overhead.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..nn._sync import compute_dtype
from ..nn.dispatch import in_row_order, plan_dispatch
from ..nn.experts import StackedExperts
from ..nn.layouts import choose_layout, expert_outputs
from ..nn.moe import MixtureOfExperts, copy_perturbed
from ._gradients import all_reduce_gradients, global_rank

REDUCTIONS = ("sum", "mean")


@dataclass
class CommStats:
    """Bytes and rows that one rank sent to the other ranks in expert-parallel exchanges.

    The counters add up over every exchange since the last :meth:`reset` (one exchange per
    forward; see the module docstring for the formulas).

    Parameters
    ----------
    count_bytes : int, default=0
        Bytes of the per-expert counts sent to other ranks (int64).
    row_bytes : int, default=0
        Bytes of the rows sent to the ranks of their experts.
    output_bytes : int, default=0
        Bytes of the expert outputs sent back to the ranks the rows came from.
    backward_bytes : int, default=0
        Bytes sent by the backward passes: output gradients to the experts' ranks, and row
        gradients back to the rows' ranks when the input requires gradients.
    rows_sent : int, default=0
        (row, expert) assignments sent to other ranks.
    rows_received : int, default=0
        Assignments received from other ranks (whose outputs went back).
    exchanges : int, default=0
        Forward exchanges counted.
    """

    count_bytes: int = 0
    row_bytes: int = 0
    output_bytes: int = 0
    backward_bytes: int = 0
    rows_sent: int = 0
    rows_received: int = 0
    exchanges: int = 0

    @property
    def forward_bytes(self) -> int:
        """Bytes sent by the forward passes: counts, rows and outputs.

        Returns
        -------
        int
            ``count_bytes + row_bytes + output_bytes``.
        """
        return self.count_bytes + self.row_bytes + self.output_bytes

    @property
    def total_bytes(self) -> int:
        """Bytes sent by the forward and backward passes.

        Returns
        -------
        int
            ``forward_bytes + backward_bytes``.
        """
        return self.forward_bytes + self.backward_bytes

    def reset(self) -> None:
        """Set every counter back to 0 (for instance at the start of a training step)."""
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


def expert_shards(n_experts: int, world_size: int) -> list[tuple[int, int]]:
    """Split the experts into one contiguous block per rank.

    Parameters
    ----------
    n_experts : int
        Number of experts.
    world_size : int
        Number of ranks.

    Returns
    -------
    list of (int, int)
        ``(start, stop)`` of rank ``r``'s experts, for every rank in order; the first
        ``n_experts % world_size`` ranks hold one expert more than the others.

    Raises
    ------
    ValueError
        If ``world_size < 1`` or ``n_experts < world_size`` (a rank would own no expert).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if n_experts < world_size:
        raise ValueError(f"expert parallelism needs at least one expert per rank: n_experts={n_experts} "
                         f"over {world_size} ranks; use fewer ranks or more experts")
    base, extra = divmod(n_experts, world_size)
    bounds = [0]
    for rank in range(world_size):
        bounds.append(bounds[-1] + base + (rank < extra))
    return list(zip(bounds[:-1], bounds[1:]))


class _GroupHandle:
    """Holds a process group; copies of a module share it (a process group cannot be copied)."""

    def __init__(self, group):
        self.group = group

    def __deepcopy__(self, memo):
        return self


def _all_to_all(tensor: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    tensor = tensor.contiguous()
    received = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
    dist.all_to_all_single(received, tensor, output_splits, input_splits, group=group)
    return received


def _remote_bytes(tensor: torch.Tensor, splits: list[int], rank: int) -> int:
    """Bytes of the rows of ``tensor`` (split by ``splits``) that go to other ranks."""
    return (sum(splits) - splits[rank]) * math.prod(tensor.shape[1:]) * tensor.element_size()


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along axis 0 whose backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, tensor, output_splits, input_splits, group, rank, stats):
        ctx.splits = (output_splits, input_splits)
        ctx.group, ctx.rank, ctx.stats = group, rank, stats
        return _all_to_all(tensor, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        ctx.stats.backward_bytes += _remote_bytes(grad, output_splits, ctx.rank)
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None, None, None


def _exchange(tensor, output_splits, input_splits, group, rank, stats) -> torch.Tensor:
    return _AllToAll.apply(tensor, output_splits, input_splits, group, rank, stats)


def _check_distributed(group) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group: call "
                           "torch.distributed.init_process_group first")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given process group")


class ShardedExperts(nn.Module):
    """One rank's block of independent experts, run for the rows of every rank.

    Stands in for :class:`~sklearn_moe.nn.StackedExperts` in an :class:`ExpertParallelMoE`:
    :meth:`forward` takes this rank's (row, expert) assignments for all ``n_experts``
    experts, sends each row to the rank that holds its expert, runs this rank's experts on
    the rows it receives and returns the outputs to where the rows came from (see the
    module docstring). Every rank of the group must call it together.

    Parameters
    ----------
    local : StackedExperts
        This rank's experts, ``expert_shards(n_experts, world_size)[rank]``, stacked.
    n_experts : int
        Number of experts over all ranks.
    group : torch.distributed.ProcessGroup, optional
        The ranks that share the experts; the default group when None.

    Raises
    ------
    RuntimeError
        If torch.distributed is not initialised.
    ValueError
        If this process is not in ``group``, ``n_experts`` is smaller than the group, or
        ``local`` does not hold this rank's number of experts.
    """

    def __init__(self, local: StackedExperts, n_experts: int, group=None):
        super().__init__()
        _check_distributed(group)
        self.local = local
        self.n_experts = n_experts
        self._group = _GroupHandle(group)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.shards = expert_shards(n_experts, self.world_size)
        self.first_expert, stop = self.shards[self.rank]
        self.n_local = stop - self.first_expert
        if local.n_experts != self.n_local:
            raise ValueError(f"rank {self.rank} owns experts [{self.first_expert}, {stop}) of {n_experts}: "
                             f"{self.n_local} experts, but the local block holds {local.n_experts}")
        self.in_features = local.in_features
        self.out_features = local.out_features
        self.widths = local.widths
        self.stats = CommStats()

    @property
    def group(self):
        """The process group the experts are sharded over.

        Returns
        -------
        torch.distributed.ProcessGroup or None
            None stands for the default group.
        """
        return self._group.group

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run every row through its expert, wherever the expert lives.

        Parameters
        ----------
        x : Tensor of shape (m, in_features)
            This rank's assignments' rows, sorted by expert (global index).
        counts : Tensor of shape (n_experts,), int64
            How many of the rows go to each expert (summing to ``m``).

        Returns
        -------
        Tensor of shape (m, out_features)
            Each row's output from its expert, in the order of ``x``; in the autocast dtype
            under autocast, else in ``x``'s dtype.

        Raises
        ------
        ValueError
            If ``counts`` does not have one entry per expert or does not sum to ``m``.
        """
        if counts.shape != (self.n_experts,):
            raise ValueError(f"counts must have shape ({self.n_experts},), got {tuple(counts.shape)}")
        group, rank, stats = self.group, self.rank, self.stats
        sizes = [stop - start for start, stop in self.shards]
        counts = counts.to(device=x.device, dtype=torch.int64).contiguous()
        # 1. counts: rank r receives every rank's counts for its own experts
        received = counts.new_empty(self.world_size * self.n_local)
        dist.all_to_all_single(received, counts, [self.n_local] * self.world_size, sizes, group=group)
        host = torch.cat((counts, received)).cpu()
        counts_host, received_host = host[:self.n_experts], host[self.n_experts:].view(self.world_size, self.n_local)
        if int(counts_host.sum()) != x.shape[0]:
            raise ValueError(f"counts sum to {int(counts_host.sum())}, but x has {x.shape[0]} rows")
        send = [int(counts_host[start:stop].sum()) for start, stop in self.shards]
        recv = [int(n) for n in received_host.sum(dim=1)]
        stats.exchanges += 1
        stats.count_bytes += (self.n_experts - self.n_local) * counts.element_size()
        stats.rows_sent += sum(send) - send[rank]
        stats.rows_received += sum(recv) - recv[rank]
        # 2. rows to their experts' ranks: they arrive by source rank, then by expert
        rows = _exchange(x, recv, send, group, rank, stats)
        stats.row_bytes += _remote_bytes(x, send, rank)
        local_ids = torch.arange(self.n_local, device=x.device).repeat(self.world_size)
        local_ids = local_ids.repeat_interleave(received, output_size=rows.shape[0])
        outputs = self._run_local(rows, local_ids).to(compute_dtype(x))
        # 3. outputs back to the rows' ranks, in the order the rows left
        stats.output_bytes += _remote_bytes(outputs, recv, rank)
        return _exchange(outputs, send, recv, group, rank, stats)

    def all_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Run every expert on every row of this rank.

        Each row is sent once per remote expert (the dense path of the single-process
        module: dense routers, the diversity loss, predictions of a few rows and
        ``predict_distribution``).

        Parameters
        ----------
        x : Tensor of shape (n, in_features)
            This rank's rows.

        Returns
        -------
        Tensor of shape (n_experts, n, out_features)
            Slice ``e`` is expert ``e``'s output on every row.
        """
        n = x.shape[0]
        rows = x.unsqueeze(0).expand(self.n_experts, n, x.shape[1]).reshape(self.n_experts * n, x.shape[1])
        counts = torch.full((self.n_experts,), n, dtype=torch.int64, device=x.device)
        return self(rows, counts).view(self.n_experts, n, self.out_features)

    def expert_parameters(self) -> list[nn.Parameter]:
        """List this rank's expert parameters, local expert on axis 0.

        Returns
        -------
        list of torch.nn.Parameter
            The parameters of :attr:`local`.
        """
        return self.local.expert_parameters()

    def _run_local(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """This rank's experts on the received ``rows`` (row ``i`` through local expert
        ``local_ids[i]``), in the order of ``rows``."""
        m = rows.shape[0]
        if m == 0:
            # Through the weights and the (empty) received rows all the same, so that the
            # outputs and the rows' exchange take part in autograd as on the ranks that
            # received rows: each backward is a collective every rank must join.
            return self.local(rows.reshape(self.n_local, 0, rows.shape[1])).reshape(0, self.out_features)
        plan = plan_dispatch(local_ids.unsqueeze(1), rows.new_ones(m, 1), self.n_local)
        layout = choose_layout(plan, self.training, rows.device.type)
        return in_row_order(expert_outputs(rows, self.local, plan, self.out_features, layout), plan)


def _slice_experts(experts: StackedExperts, start: int, stop: int) -> StackedExperts:
    """A copy of ``experts`` that holds only the experts ``start .. stop - 1``."""
    memo = {id(p): nn.Parameter(p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
            for p in experts.parameters()}
    local = copy.deepcopy(experts, memo)
    local.n_experts = stop - start
    return local


def _check_module(module) -> None:
    if isinstance(module, ExpertParallelMoE):
        raise ValueError("the module is already expert-parallel")
    if not isinstance(module, MixtureOfExperts):
        raise TypeError(f"expected a sklearn_moe.nn.MixtureOfExperts, got {type(module).__name__}")
    _refuse_adapters(module)


def _refuse_adapters(module: MixtureOfExperts) -> None:
    if module.expert_type != "independent" or not isinstance(module.experts, StackedExperts):
        raise ValueError(f"expert parallelism shards independent experts; expert_type={module.expert_type!r} "
                         "experts share one backbone MLP and differ only by small adapters and heads, so they "
                         "stay whole on every rank: replicate the module and train it data parallel instead")


def _local_block(n_experts: int, group) -> tuple[int, int]:
    """This rank's experts ``(start, stop)``, after checking that the group can shard them."""
    _check_distributed(group)
    return expert_shards(n_experts, dist.get_world_size(group))[dist.get_rank(group)]


class ExpertParallelMoE(MixtureOfExperts):
    """A :class:`~sklearn_moe.nn.MixtureOfExperts` whose experts are sharded over the ranks.

    Rank ``r`` holds only its block of the experts (:func:`expert_shards`) in
    :attr:`experts`, a :class:`ShardedExperts`; the embeddings, router, shared expert and
    combine are replicated. :meth:`forward` returns the same :class:`~sklearn_moe.nn.MoEOutput`
    as the single-process module on this rank's batch, exchanging the routed rows with the
    other ranks (see the module docstring for the data flow, the rules and what is
    refused). Build one from a single-process module with :meth:`from_module` (or
    :func:`shard_experts`), or with the single-process module's arguments plus ``group``
    (every rank must then draw the same initialisation, e.g. after the same
    ``torch.manual_seed``); :func:`gather_experts` turns it back into a single-process
    module. Its state dict holds the replicated parts and, under ``experts.local.``, this
    rank's block of the experts. In training, call :func:`reduce_gradients` after every
    backward pass, before the optimizer step, on every rank.

    Parameters
    ----------
    n_features : int
        Input width.
    n_outputs : int
        Output width.
    *args
        Further positional arguments of :class:`~sklearn_moe.nn.MixtureOfExperts`.
    group : torch.distributed.ProcessGroup, optional
        The ranks to shard the experts over; the default group when None.
    **kwargs
        Further keyword arguments of :class:`~sklearn_moe.nn.MixtureOfExperts`.

    Raises
    ------
    RuntimeError
        If torch.distributed is not initialised.
    ValueError
        For ``expert_type="adapter"``, fewer experts than ranks, or a process outside
        ``group``; and whatever :class:`~sklearn_moe.nn.MixtureOfExperts` refuses.
    """

    def __init__(self, n_features: int, n_outputs: int, *args, group=None, **kwargs):
        super().__init__(n_features, n_outputs, *args, **kwargs)
        _refuse_adapters(self)
        start, stop = _local_block(self.n_experts, group)
        self.experts = ShardedExperts(_slice_experts(self.experts, start, stop), self.n_experts, group)

    @classmethod
    def from_module(cls, module: MixtureOfExperts, group=None, src: int | None = None) -> ExpertParallelMoE:
        """Shard a single-process module's experts onto the ranks.

        Every rank calls it with a module of the same configuration. Rank ``r`` keeps a copy
        of the replicated parts and of its own block of experts; ``module`` itself is left
        unchanged.

        Parameters
        ----------
        module : MixtureOfExperts
            The single-process module, with independent experts.
        group : torch.distributed.ProcessGroup, optional
            The ranks to shard over; the default group when None.
        src : int, optional
            Rank (in ``group``) whose module's weights and buffers every rank takes (a
            broadcast; the other ranks' modules only give the architecture). None: every
            rank already holds the same weights.

        Returns
        -------
        ExpertParallelMoE
            This rank's expert-parallel module, on ``module``'s device.

        Raises
        ------
        TypeError
            If ``module`` is not a :class:`~sklearn_moe.nn.MixtureOfExperts`.
        ValueError
            If ``module`` is already expert-parallel, has adapter experts or fewer experts
            than ranks, or this process is not in ``group``.
        RuntimeError
            If torch.distributed is not initialised.
        """
        _check_module(module)
        start, stop = _local_block(module.n_experts, group)
        if src is not None:
            module = copy.deepcopy(module)
            source = global_rank(group, src)
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=source, group=group)
        experts = module.experts
        sharded = ShardedExperts(_slice_experts(experts, start, stop), module.n_experts, group)
        parallel = copy.deepcopy(module, {id(experts): sharded})
        # The same module layout, with the sharded experts and this class's forward hooks.
        parallel.__class__ = cls
        return parallel

    @property
    def group(self):
        """The process group the experts are sharded over.

        Returns
        -------
        torch.distributed.ProcessGroup or None
            None stands for the default group.
        """
        return self.experts.group

    @property
    def comm_stats(self) -> CommStats:
        """The bytes this rank sent in exchanges (see the module docstring).

        Returns
        -------
        CommStats
            The live counters of :attr:`experts`; ``comm_stats.reset()`` zeroes them.
        """
        return self.experts.stats

    @property
    def expert_range(self) -> tuple[int, int]:
        """The experts this rank holds.

        Returns
        -------
        (int, int)
            ``(start, stop)``: experts ``start .. stop - 1``, local expert ``i`` being
            expert ``start + i``.
        """
        return self.experts.shards[self.experts.rank]

    @torch.no_grad()
    def split_expert(self, source: int, targets, noise: float = 0.01, generator=None) -> None:
        """Overwrite the experts ``targets`` with perturbed copies of expert ``source``.

        As :meth:`~sklearn_moe.nn.MixtureOfExperts.split_expert` does, over the ranks.
        Every rank of the group must call it with the same arguments. The rank that holds
        ``source`` sends its weights to every rank; each rank writes the perturbed copies
        of the targets it holds (each drawn on that rank). The router is replicated: every
        rank splits its rows, then takes rank 0's, so that it stays the same everywhere.

        Parameters
        ----------
        source : int
            The expert to copy.
        targets : int or sequence of int
            Experts to overwrite, distinct and other than ``source``.
        noise : float, default=0.01
            Relative standard deviation of the multiplicative perturbation.
        generator : torch.Generator, optional
            Source of the perturbation (default: torch's global generator).

        Raises
        ------
        ValueError
            If ``source`` and ``targets`` are not distinct experts of the module.
        """
        targets = self._split_targets(source, targets)
        sharded = self.experts
        group, first = sharded.group, sharded.first_expert
        owner = next(rank for rank, (start, stop) in enumerate(sharded.shards) if start <= source < stop)
        mine = [target - first for target in targets if first <= target < first + sharded.n_local]
        for tensor in sharded.local.expert_parameters():
            if sharded.rank == owner:
                row = tensor[source - first].clone()
            else:
                row = tensor.new_empty(tensor.shape[1:])
            dist.broadcast(row, src=global_rank(group, owner), group=group)
            copy_perturbed(tensor, row, mine, noise, generator)
        self._split_router(source, targets, noise, generator)
        for tensor in self._router_expert_tensors().values():
            dist.broadcast(tensor.data, src=global_rank(group, 0), group=group)

    _expert_sorted_plans = True  # sorted by expert, the rows are grouped by the rank that owns it

    def _independent_outputs(self, x: torch.Tensor, plan, max_count: int) -> torch.Tensor:
        return self.experts(x.index_select(0, plan.rows), plan.kept_counts)


def shard_experts(module: MixtureOfExperts, group=None, src: int | None = None) -> ExpertParallelMoE:
    """Shard a trained single-process module's experts onto the ranks of ``group``.

    The same as :meth:`ExpertParallelMoE.from_module`.

    Parameters
    ----------
    module : MixtureOfExperts
        The single-process module, with independent experts; left unchanged.
    group : torch.distributed.ProcessGroup, optional
        The ranks to shard over; the default group when None.
    src : int, optional
        Rank (in ``group``) whose weights every rank takes; None when every rank already
        holds the same weights.

    Returns
    -------
    ExpertParallelMoE
        This rank's expert-parallel module.

    Raises
    ------
    TypeError
        If ``module`` is not a :class:`~sklearn_moe.nn.MixtureOfExperts`.
    ValueError
        If ``module`` is already expert-parallel, has adapter experts or fewer experts than
        ranks, or this process is not in ``group``.
    RuntimeError
        If torch.distributed is not initialised.
    """
    return ExpertParallelMoE.from_module(module, group, src)


def gather_experts(module: ExpertParallelMoE, dst: int = 0) -> MixtureOfExperts | None:
    """Gather an expert-parallel module's experts into one single-process module on ``dst``.

    Every rank of the group must call it. The result is an ordinary
    :class:`~sklearn_moe.nn.MixtureOfExperts` (it saves, loads and predicts without
    torch.distributed), with rank ``dst``'s copy of the replicated parts.

    Parameters
    ----------
    module : ExpertParallelMoE
        This rank's expert-parallel module.
    dst : int, default=0
        Rank (in the module's group) that receives the whole module.

    Returns
    -------
    MixtureOfExperts or None
        On rank ``dst``, a new single-process module holding every expert (on the module's
        device); None on the other ranks. ``module`` is left unchanged.

    Raises
    ------
    TypeError
        If ``module`` is not an :class:`ExpertParallelMoE`.
    ValueError
        If ``dst`` is not a rank of the group.
    """
    if not isinstance(module, ExpertParallelMoE):
        raise TypeError(f"expected an ExpertParallelMoE, got {type(module).__name__}")
    sharded = module.experts
    group, rank, world_size = sharded.group, sharded.rank, sharded.world_size
    if not 0 <= dst < world_size:
        raise ValueError(f"dst must be a rank of the group, in [0, {world_size}), got {dst}")
    target = global_rank(group, dst)
    sizes = [stop - start for start, stop in sharded.shards]
    most = max(sizes)
    full = {}
    for name, parameter in sharded.local.named_parameters():
        block = parameter.detach()
        if block.shape[0] < most:  # dist.gather takes equal shapes: pad to the largest block
            block = torch.cat((block, block.new_zeros(most - block.shape[0], *block.shape[1:])))
        blocks = [torch.empty_like(block) for _ in range(world_size)] if rank == dst else None
        dist.gather(block.contiguous(), blocks, dst=target, group=group)
        if rank == dst:
            full[name] = torch.cat([b[:size] for b, size in zip(blocks, sizes)])
    if rank != dst:
        return None
    local = dict(sharded.local.named_parameters())
    memo = {id(local[name]): nn.Parameter(tensor, requires_grad=local[name].requires_grad)
            for name, tensor in full.items()}
    experts = copy.deepcopy(sharded.local, memo)
    experts.n_experts = module.n_experts
    single = copy.deepcopy(module, {id(sharded): experts})
    single.__class__ = MixtureOfExperts
    return single


def reduce_gradients(module: ExpertParallelMoE, reduction: str = "sum") -> None:
    """Make every rank's gradients those of the ranks' losses together.

    After ``loss.backward()`` on every rank, an expert's gradient (on its owner) already
    sums over every rank's rows, through the exchanges; a replicated parameter's gradient
    (embeddings, router, shared expert) holds this rank's rows only. This all-reduces the
    replicated gradients over the group, so that every rank takes the same optimizer step.
    Every rank of the group must call it.

    Parameters
    ----------
    module : ExpertParallelMoE
        This rank's module, after the backward pass.
    reduction : {"sum", "mean"}, default="sum"
        ``"sum"``: the gradients of the sum of the ranks' losses (replicated gradients
        summed, expert gradients unchanged). ``"mean"``: of their mean (replicated
        gradients averaged, expert gradients divided by the group's size); with equal
        batches and mean losses, that is the gradient of the mean loss over all rows.

    Raises
    ------
    ValueError
        If ``reduction`` is not ``"sum"`` or ``"mean"``.
    TypeError
        If ``module`` is not an :class:`ExpertParallelMoE`.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(module, ExpertParallelMoE):
        raise TypeError(f"expected an ExpertParallelMoE, got {type(module).__name__}")
    group, world_size = module.group, module.experts.world_size
    own = {id(p) for p in module.experts.parameters()}
    replicated = [p for p in module.parameters() if p.requires_grad and id(p) not in own]
    all_reduce_gradients(replicated, group, world_size if reduction == "mean" else 1)
    if reduction == "mean":
        for p in module.experts.parameters():
            if p.grad is not None:
                p.grad /= world_size
