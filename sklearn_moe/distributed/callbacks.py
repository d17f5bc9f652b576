"""The skorch callbacks that keep the processes of a data-parallel fit in step.

The estimator adds them to its net inside a :func:`~.data_parallel.data_parallel` block and
removes them when training ends:

- :class:`GradientAveraging`, first in the list: every process starts from rank 0's
  weights, and every gradient is averaged over the processes as soon as it is computed, so
  the gradient metrics, clipping and the optimizer all see the average.
- :class:`ShardedGradientClipping`, with sharded experts, in place of the estimator's
  gradient clipping: the norm is taken over every process's experts.
- :class:`EpochAgreement`, after the metrics' callbacks and before every callback that
  acts on them: at each epoch's end every process records the same history row (the
  training metrics, and the validation loss where each process evaluated a share of the
  validation rows, merged over the processes) and takes rank 0's weights and buffers, so
  early stopping, the schedules and collapse recovery decide alike everywhere.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from skorch.callbacks import Callback

from ..diagnostics import load_cv, load_entropy, load_imbalance
from ._gradients import all_reduce_gradients
from .data_parallel import DataParallelGroup
from .validation import ValidationShard

__all__ = ["EpochAgreement", "GradientAveraging", "ShardedGradientClipping"]

# History keys of the training batches: each process holds its own shard's value. The shards
# have the same number of rows and batches, so the mean over the processes is the value of
# the whole epoch's training rows.
MEAN_OVER_PROCESSES = ("train_loss", "task_loss", "balance_loss", "z_loss", "diversity_loss", "routing_entropy",
                       "dropped_fraction", "expert_share", "gate_share")
# Functions of the merged expert_share, recomputed from it.
FROM_EXPERT_SHARE = {"load_entropy": load_entropy, "load_cv": load_cv, "load_imbalance": load_imbalance}


class GradientAveraging(Callback):
    """Start every process from rank 0's weights and average the gradients over the processes.

    The gradients of the replicated parameters are summed over the processes in one flat
    all-reduce and divided by their number; with sharded experts (see
    :mod:`~sklearn_moe.distributed.expert_parallel`) an expert's gradient already sums over
    every process's rows and is divided by the number of processes.

    Parameters
    ----------
    parallel : DataParallelGroup
        The processes.
    """

    def __init__(self, parallel: DataParallelGroup):
        self.parallel = parallel

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Start every process from rank 0's weights and buffers.

        Parameters
        ----------
        net : MoENet
            The net being trained.
        X, y : object, optional
            The training data (unused).
        **kwargs
            Other skorch arguments (unused).
        """
        broadcast_state(net.module_, self.parallel)

    def on_grad_computed(self, net, named_parameters, X=None, y=None, training=None, **kwargs):
        """Replace every gradient by its average over the processes.

        Parameters
        ----------
        net : MoENet
            The net being trained.
        named_parameters : iterable of (str, Parameter)
            The parameters whose gradients were computed.
        X, y : object, optional
            The batch (unused).
        training : bool, optional
            Whether the step trains (unused).
        **kwargs
            Other skorch arguments (unused).
        """
        parameters = [p for _, p in named_parameters]
        if not parameters:
            return
        if self.parallel.expert_parallel:
            from .expert_parallel import reduce_gradients

            reduce_gradients(net.module_, "mean")
        else:
            all_reduce_gradients(parameters, self.parallel.group, self.parallel.world_size)


class ShardedGradientClipping(Callback):
    """Clip the gradients of a module with sharded experts to a global norm.

    Every gradient is scaled by ``min(1, max_norm / (norm + 1e-6))``, ``norm`` taken over
    every process's experts and the replicated parameters, as ``clip_grad_norm_`` would on
    one process holding them all.

    Parameters
    ----------
    parallel : DataParallelGroup
        The processes.
    max_norm : float
        The largest gradient norm kept.
    """

    def __init__(self, parallel: DataParallelGroup, max_norm: float):
        self.parallel = parallel
        self.max_norm = max_norm

    def on_grad_computed(self, net, named_parameters, X=None, y=None, training=None, **kwargs):
        """Scale every gradient down to the global norm ``max_norm`` where it is larger.

        Parameters
        ----------
        net : MoENet
            The net being trained.
        named_parameters : iterable of (str, Parameter)
            The parameters whose gradients were computed.
        X, y : object, optional
            The batch (unused).
        training : bool, optional
            Whether the step trains (unused).
        **kwargs
            Other skorch arguments (unused).
        """
        own = sharded_expert_tensors(net.module_)
        with_grad = [p for _, p in named_parameters if p.grad is not None]
        if not with_grad:
            return
        squares = torch.stack([p.grad.detach().float().pow(2).sum() for p in with_grad])
        is_own = torch.tensor([id(p) in own for p in with_grad], device=squares.device)
        experts = squares[is_own].sum()
        dist.all_reduce(experts, group=self.parallel.group)
        norm = (experts + squares[~is_own].sum()).sqrt()
        factor = (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in with_grad:
            p.grad.mul_(factor.to(p.grad.dtype))


class EpochAgreement(Callback):
    """At every epoch's end, give every process the same history row, weights and buffers.

    The history row is rank 0's (timings, the per-batch records, the validation routing
    metrics, which :class:`~sklearn_moe.callbacks.RoutingMetrics` computes over every
    process's validation rows), with the training metrics merged over the processes: the
    losses, ``routing_entropy``, ``dropped_fraction``, ``expert_share`` and ``gate_share``
    are the processes' means (equal shards: the whole epoch's values), ``load_entropy``,
    ``load_cv`` and ``load_imbalance`` are recomputed from the merged ``expert_share``,
    ``train_loss_best`` from the merged losses, and with sharded experts
    ``expert_grad_norm`` lists every process's experts in order. Where the processes shared
    out the validation rows (:mod:`.validation`), ``valid_loss`` is their mean weighted by
    their rows, and ``valid_loss_best`` follows it. The weights and buffers are rank 0's
    (each process keeps its own sharded experts), and again at the next epoch's start and
    when training ends, whatever the callbacks after this one changed on each process.

    Parameters
    ----------
    parallel : DataParallelGroup
        The processes.
    """

    def __init__(self, parallel: DataParallelGroup):
        self.parallel = parallel

    def on_epoch_begin(self, net, **kwargs):
        """Take rank 0's weights and buffers again (before every epoch, and when training ends).

        A callback after this one may have changed them at the last epoch's end, each
        process on its own (collapse recovery draws its copies' perturbations on each
        process); so every epoch starts, and every process ends, with the same model.

        Parameters
        ----------
        net : MoENet
            The net being trained.
        **kwargs
            Other skorch arguments (unused).
        """
        broadcast_state(net.module_, self.parallel)

    on_train_end = on_epoch_begin

    def on_epoch_end(self, net, dataset_valid=None, **kwargs):
        """Merge the epoch's history row over the processes and take rank 0's weights.

        Parameters
        ----------
        net : MoENet
            The net being trained.
        dataset_valid : Dataset, optional
            The validation rows: a :class:`~.validation.ValidationShard` when each process
            evaluated a share of them, whose ``valid_loss`` values are then merged.
        **kwargs
            Other skorch arguments (unused).
        """
        rows = [None] * self.parallel.world_size
        dist.all_gather_object(rows, dict(net.history[-1]), group=self.parallel.group)
        merged = merge_history_rows(rows, [row for row in net.history[:-1]], self.parallel.expert_parallel,
                                    isinstance(dataset_valid, ValidationShard))
        net.history[-1].clear()
        net.history[-1].update(merged)
        broadcast_state(net.module_, self.parallel)


def merge_history_rows(rows: list[dict], earlier: list[dict], expert_parallel: bool = False,
                       sharded_validation: bool = False) -> dict:
    """One epoch's history row from every process's (see :class:`EpochAgreement`).

    Parameters
    ----------
    rows : list of dict
        Each process's row, in rank order.
    earlier : list of dict
        The history's earlier rows (already merged), for ``train_loss_best`` and
        ``valid_loss_best``.
    expert_parallel : bool, default=False
        Whether each process's ``expert_grad_norm`` lists only its own experts.
    sharded_validation : bool, default=False
        Whether each process evaluated its own share of the validation rows: ``valid_loss``
        is then the processes' mean weighted by their validation rows (the sum of their
        batches' ``valid_batch_size``), the mean over every validation row.

    Returns
    -------
    dict
        The merged row.
    """
    merged = dict(rows[0])
    for key in MEAN_OVER_PROCESSES:
        if all(key in row for row in rows):
            values = np.mean([np.asarray(row[key], dtype=np.float64) for row in rows], axis=0)
            merged[key] = values.tolist() if isinstance(rows[0][key], list) else float(values)
    if "expert_share" in merged:
        for key, metric in FROM_EXPERT_SHARE.items():
            if key in merged:
                merged[key] = metric(np.asarray(merged["expert_share"]))
    if sharded_validation and all("valid_loss" in row for row in rows):
        sizes = [sum(batch.get("valid_batch_size", 0) for batch in row.get("batches", ())) for row in rows]
        merged["valid_loss"] = float(np.average([row["valid_loss"] for row in rows], weights=sizes))
    for key in ("train_loss", "valid_loss"):
        if f"{key}_best" in merged:
            previous = [row[key] for row in earlier if key in row]
            merged[f"{key}_best"] = not previous or merged[key] < min(previous)
    if expert_parallel and all("expert_grad_norm" in row for row in rows):
        merged["expert_grad_norm"] = [norm for row in rows for norm in row["expert_grad_norm"]]
    return merged


def broadcast_state(module: torch.nn.Module, parallel: DataParallelGroup) -> None:
    """Every process takes rank 0's parameters and buffers (its own sharded experts excepted).

    Parameters
    ----------
    module : torch.nn.Module
        The module being trained.
    parallel : DataParallelGroup
        The processes.
    """
    source = parallel.global_rank(0)
    own = sharded_expert_tensors(module)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in own:
                dist.broadcast(tensor.data, src=source, group=parallel.group)


def sharded_expert_tensors(module) -> set[int]:
    """``id``s of this process's own expert parameters and buffers (none unless sharded).

    Parameters
    ----------
    module : torch.nn.Module
        The module being trained.

    Returns
    -------
    set of int
        The ``id`` of every parameter and buffer of its sharded experts.
    """
    from .expert_parallel import ExpertParallelMoE

    if not isinstance(module, ExpertParallelMoE):
        return set()
    return {id(t) for t in [*module.experts.parameters(), *module.experts.buffers()]}
