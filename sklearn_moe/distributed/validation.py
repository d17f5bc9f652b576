"""Validation rows shared out over the processes of a data-parallel fit.

Every process of a data-parallel fit holds the same validation rows. Rather than each
evaluating all of them every epoch (the same forward pass ``world_size`` times), each
process evaluates every ``world_size``-th row from its rank on (:func:`shard_validation`),
and the epoch's validation figures are then those of the whole set:

- ``valid_loss`` is the mean of the processes' losses weighted by their rows
  (:class:`~.callbacks.EpochAgreement`), the mean over every validation row, as on one
  process;
- :class:`~sklearn_moe.callbacks.RoutingMetrics` sums its validation tallies over the
  processes and gathers the per-row records (top-1 expert, target, loss) before computing
  the ``valid_*`` routing metrics (:meth:`ValidationShard.sum_over_processes`,
  :meth:`ValidationShard.gather_rows`).

Each process splits its rows into the same number of batches (:attr:`ValidationShard.n_batches`,
as even as possible, none larger than the training batch), so that with sharded experts,
whose forward pass exchanges rows between the processes, every process runs as many.

A fit given callbacks of the user's own evaluates the whole set on every process, as one
process would: a validation score such a callback computes is then the whole set's, and the
same on every process (a process that decided alone, say to stop early, would leave the
others waiting). So does a set too small to give every process a row per batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._data import TensorTable
from .data_parallel import DataParallelGroup, active_group

__all__ = ["ValidationShard", "shard_validation"]


class ValidationShard(TensorTable):
    """One process's share of a data-parallel fit's validation rows.

    Parameters
    ----------
    table : TensorTable
        The process's rows (features, targets, sample weights).
    parallel : DataParallelGroup
        The processes.
    n_rows : int
        Rows of the whole validation set.
    n_batches : int
        Batches of a validation pass, the same on every process.
    """

    def __init__(self, table: TensorTable, parallel: DataParallelGroup, n_rows: int, n_batches: int):
        super().__init__(table.X, table.y, table.sample_weight)
        self.parallel = parallel
        self.n_rows = n_rows
        self.n_batches = n_batches

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (float64, exact for counts below 2**53).

        Parameters
        ----------
        tensor : Tensor
            This process's values, on its device.

        Returns
        -------
        Tensor of float64
            The sum, on every process.
        """
        total = tensor.detach().to(torch.float64).clone()
        dist.all_reduce(total, group=self.parallel.group)
        return total

    def gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The processes' per-row values ``tensor`` (one per row of the shard, along the
        first axis), concatenated in rank order: the whole set's rows, in the same order
        at every epoch.

        Parameters
        ----------
        tensor : Tensor of shape (len(self), ...)
            This process's values, on its device.

        Returns
        -------
        Tensor of shape (n_rows, ...)
            Every process's values, on every process.
        """
        world_size = self.parallel.world_size
        longest = -(-self.n_rows // world_size)
        padded = tensor.new_zeros(longest, *tensor.shape[1:])
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(world_size)]
        dist.all_gather(parts, padded, group=self.parallel.group)
        return torch.cat([part[:_shard_length(self.n_rows, world_size, rank)] for rank, part in enumerate(parts)])


def shard_validation(valid_table: TensorTable | None, batch_size: int, whole: bool = False) -> TensorTable | None:
    """This process's validation rows inside a :func:`~.data_parallel.data_parallel` block.

    Parameters
    ----------
    valid_table : TensorTable or None
        The whole validation set (None: no validation).
    batch_size : int
        The process's training batch size; no validation batch is larger.
    whole : bool, default=False
        Keep the whole set on every process (a fit with the user's own callbacks).

    Returns
    -------
    TensorTable or None
        A :class:`ValidationShard` of rows ``rank, rank + world_size, ...``; ``valid_table``
        itself outside a data-parallel block, with ``whole``, on one process, or when the
        set is too small for every process to have a row in each of as many batches.
    """
    parallel = active_group()
    if valid_table is None or parallel is None or whole or parallel.world_size == 1:
        return valid_table
    n_rows, world_size = len(valid_table), parallel.world_size
    n_batches = -(-_shard_length(n_rows, world_size, 0) // batch_size)
    if _shard_length(n_rows, world_size, world_size - 1) < n_batches:
        return valid_table
    rows = torch.arange(parallel.rank, n_rows, world_size, device=valid_table.X.device)
    return ValidationShard(valid_table.subset(rows), parallel, n_rows, n_batches)


def _shard_length(n_rows: int, world_size: int, rank: int) -> int:
    """Rows ``rank, rank + world_size, ...`` below ``n_rows``: how many."""
    return len(range(rank, n_rows, world_size))
