"""What data parallelism (:mod:`.data_parallel`) and expert parallelism
(:mod:`.expert_parallel`) share: the gradient all-reduce, and a group's global ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_gradients(parameters, group, divisor: int = 1) -> None:
    """Sum the gradients of ``parameters`` over the processes of ``group``, then divide them
    by ``divisor``, in one flat all-reduce per dtype.

    A parameter without a gradient on a process counts as zero there; one without a gradient
    on every process keeps none. Every process of the group must call it with the same
    parameters in the same order.

    Parameters
    ----------
    parameters : list of Parameter
        The parameters whose gradients to reduce.
    group : ProcessGroup or None
        The ``torch.distributed`` group (``None``: the default group).
    divisor : int, default=1
        The number to divide the sums by (the group's size for a mean).
    """
    if not parameters:
        return
    # Which parameters have a gradient on some process: those get one on every process.
    present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.int32, device=parameters[0].device)
    dist.all_reduce(present, group=group)
    chosen = [p for p, flag in zip(parameters, present.tolist()) if flag]
    for dtype in sorted({p.dtype for p in chosen}, key=str):
        same = [p for p in chosen if p.dtype == dtype]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in same])
        dist.all_reduce(flat, group=group)
        if divisor != 1:
            flat /= divisor
        for p, grad in zip(same, flat.split([p.numel() for p in same])):
            if p.grad is None:
                p.grad = grad.view_as(p).clone()
            else:
                p.grad.copy_(grad.view_as(p))


def global_rank(group, rank: int) -> int:
    """The global rank of ``rank`` in ``group`` (None: the default group, where they are
    the same)."""
    return rank if group is None else dist.get_global_rank(group, rank)
