"""Data-parallel fitting over the processes of a ``torch.distributed`` group.

Every process calls ``fit`` on the same data inside :func:`data_parallel`; each trains on its
own shard of the training rows, and the gradients are averaged over the processes before
every optimizer step, which is what :class:`torch.nn.parallel.DistributedDataParallel` does:

- The seeds the fit draws (initialisation, batch order, validation split) are rank 0's, so
  every process builds the same network, holds out the same validation rows and starts
  from the same weights (rank 0's, broadcast when training begins).
- The training rows are dealt out round-robin, ``rows[rank::world_size]``, each shard cut to
  the smallest one's length (at most ``world_size - 1`` rows go unused), and each process's
  batch is the single-process batch size divided by the number of processes: an epoch has
  as many optimizer steps, each over as many rows, as a single-process fit's.
- After every backward pass, the gradients of all the network's parameters are summed over
  the processes in one flat all-reduce and divided by their number (a parameter without a
  gradient on a process, such as an expert no row of its batch chose, counts as zero
  there, and keeps no gradient where it had none on every process). Gradient clipping and
  the optimizer step then see the average, the same on every process.
- The validation rows are shared out too: each process evaluates every ``world_size``-th
  one, and the epoch's validation loss and routing metrics are computed over all of them
  (:mod:`.validation`; a fit given callbacks of the user's own evaluates the whole set on
  every process, so that any score they compute is the whole set's). At each epoch's end
  the processes agree on one history row and take rank 0's weights and buffers before
  early stopping, the learning-rate schedule and the other callbacks decide anything:
  every process stops at the same epoch and keeps the same weights. The row's training
  metrics are merged over the processes (the losses and routing shares are their means,
  which with equal shards are the whole epoch's values; see
  :class:`~.callbacks.EpochAgreement`).
- A numerical fault (a non-finite loss or weight) is decided by every process together at
  the epoch's end (:func:`agree_on_fault`): when one process had one, every process rolls
  the epoch back and runs it again at a lower learning rate, as a single-process fit
  does. A process never stops alone, which would leave the others waiting for it.

With ``expert_parallel=True`` the network's experts are sharded over the processes as
well (:class:`~sklearn_moe.distributed.ExpertParallelMoE`: each process holds a block of
the experts and rows travel to their experts' processes and back). Only the replicated
parts (embeddings, router, shared expert) are then averaged and kept in step; an expert's
gradient already sums over every process's rows, and is divided by the number of
processes. Gradient clipping then takes the norm over every expert and the replicated
parts (one all-reduce of the experts' squared norms). When training ends, rank 0 gathers
the experts and every process receives the whole network. Adapter experts share their
backbone and cannot be sharded: fit them data-parallel only.

The synchronisation is the work of three callbacks (:mod:`.callbacks`). The fitted
estimator on every process is an ordinary one: they are removed when training ends, so it
pickles, saves and predicts on one machine. The wrappers a ``DistributedDataParallel``
module needs do not fit the estimator's own use of its module, which is why the averaging
is a callback rather than that class.

Start the processes with ``torchrun`` (see :mod:`sklearn_moe.distributed.fit`) or any other
way that initialises the default process group; gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from .._guard import NonFiniteLoss
from ._gradients import global_rank

__all__ = ["DataParallelGroup", "active_group", "agree_on_fault", "data_parallel", "shard_for_training",
           "whole_after_training"]

_ACTIVE: list[DataParallelGroup] = []


@dataclass(frozen=True)
class DataParallelGroup:
    """The processes a data-parallel fit runs on.

    Parameters
    ----------
    group : ProcessGroup or None
        The ``torch.distributed`` group (``None``: the default group).
    rank : int
        This process's rank in ``group``.
    world_size : int
        Number of processes in ``group``.
    expert_parallel : bool, default=False
        Shard the experts over the processes too.
    """

    group: object
    rank: int
    world_size: int
    expert_parallel: bool = False

    def broadcast_object(self, value):
        """``value`` as rank 0 holds it, on every process.

        Parameters
        ----------
        value : object
            Any picklable object (only rank 0's is used).

        Returns
        -------
        object
            Rank 0's ``value``.
        """
        holder = [value]
        dist.broadcast_object_list(holder, src=self.global_rank(0), group=self.group)
        return holder[0]

    def global_rank(self, rank: int) -> int:
        """The global rank of ``rank`` in this group.

        Parameters
        ----------
        rank : int
            A rank in the group.

        Returns
        -------
        int
            Its rank in the default group.
        """
        return global_rank(self.group, rank)

    def shard(self, n_rows: int) -> np.ndarray:
        """Choose this process's training rows among ``n_rows``.

        Every ``world_size``-th row from ``rank`` on, cut so that every process has as many.

        Parameters
        ----------
        n_rows : int
            Rows to deal out.

        Returns
        -------
        ndarray of int64
            Row positions, ``n_rows // world_size`` of them.
        """
        return np.arange(self.rank, n_rows, self.world_size)[:n_rows // self.world_size]


def active_group() -> DataParallelGroup | None:
    """The group of the innermost :func:`data_parallel` block, or ``None`` outside one.

    Returns
    -------
    DataParallelGroup or None
        Where fits in this process run data-parallel.
    """
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def data_parallel(group=None, expert_parallel: bool = False):
    """Fit estimators data-parallel over the processes of ``group`` inside this block.

    Every process of the group must enter the block and call ``fit`` with the same
    estimator parameters, the same ``X`` and ``y`` (and ``sample_weight``) in the same order;
    a fit checks the data's shape and a digest of its values against rank 0's and raises
    ``ValueError`` on a difference (another row order included).

    Parameters
    ----------
    group : ProcessGroup, optional
        The ``torch.distributed`` group; default: the default group, which must be
        initialised (``torch.distributed.init_process_group``, done by ``torchrun``
        scripts).
    expert_parallel : bool, default=False
        Also shard the experts over the processes (independent experts only, at least one
        per process); see the module docstring.

    Yields
    ------
    DataParallelGroup
        The group, with this process's rank.

    Raises
    ------
    RuntimeError
        If ``torch.distributed`` is unavailable or its default group is not initialised.

    Examples
    --------
    In a script started by ``torchrun --nproc-per-node 2 script.py`` (on GPUs: the
    ``"nccl"`` backend, after ``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))``, so
    that ``device="cuda"`` is each process's own GPU)::

        import torch.distributed as dist
        from sklearn_moe import MoERegressor
        from sklearn_moe.distributed import data_parallel

        dist.init_process_group("gloo")
        with data_parallel():
            model = MoERegressor(random_state=0).fit(X, y)
        if dist.get_rank() == 0:
            model.save("model.moe")
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("data_parallel needs an initialised torch.distributed process group: start the processes "
                           "with torchrun and call torch.distributed.init_process_group first.")
    parallel = DataParallelGroup(group, dist.get_rank(group), dist.get_world_size(group), bool(expert_parallel))
    _ACTIVE.append(parallel)
    try:
        yield parallel
    finally:
        _ACTIVE.pop()


def agree_on_seeds(seeds: tuple[int, ...]) -> tuple[int, ...]:
    """Rank 0's ``seeds`` inside a :func:`data_parallel` block; ``seeds`` outside one.

    Parameters
    ----------
    seeds : tuple of int
        The seeds this process drew.

    Returns
    -------
    tuple of int
        The seeds every process uses.
    """
    parallel = active_group()
    return seeds if parallel is None else tuple(parallel.broadcast_object(seeds))


def check_backend(device) -> None:
    """Raise ``ValueError`` inside a :func:`data_parallel` block whose group's backend cannot
    carry tensors on ``device`` (NCCL holds CUDA tensors only); a no-op outside one.

    Parameters
    ----------
    device : torch.device or str
        Where the fit trains.

    Raises
    ------
    ValueError
        For an NCCL group and a device other than CUDA.
    """
    parallel = active_group()
    if parallel is None:
        return
    backend = dist.get_backend(parallel.group)
    if backend == "nccl" and torch.device(device).type != "cuda":
        raise ValueError(f"A data-parallel fit over an NCCL process group trains on CUDA, but the estimator's "
                         f"device is {str(device)!r}: set device='cuda' (after torch.cuda.set_device(local_rank)), "
                         "or use the gloo backend on CPUs.")


def check_same_data(X: np.ndarray, y: np.ndarray) -> None:
    """Raise ``ValueError`` unless every process of the active group has rank 0's data.

    Compares the shapes and a digest of the bytes of ``X`` and ``y``, which sees another
    row order as well as other values; a no-op outside a :func:`data_parallel` block.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
        The scaled training input.
    y : ndarray
        The encoded targets.

    Raises
    ------
    ValueError
        If this process's data differ from rank 0's.
    """
    parallel = active_group()
    if parallel is None:
        return
    digest = hashlib.blake2b(digest_size=16)
    for array in (X, y):
        digest.update(np.ascontiguousarray(array).view(np.uint8).ravel())
    mine = (X.shape, y.shape, digest.hexdigest())
    theirs = parallel.broadcast_object(mine)
    if mine != theirs:
        what = (f"shapes {mine[:2]} against {theirs[:2]}" if mine[:2] != theirs[:2]
                else "other values or another row order")
        raise ValueError(f"Process {parallel.rank} of the data-parallel fit has other data than rank 0 ({what}): "
                         "every process must fit the same X and y, in the same order.")


def shard_rows(n_rows: int) -> np.ndarray | None:
    """This process's training rows inside a :func:`data_parallel` block, else ``None``.

    Parameters
    ----------
    n_rows : int
        Training rows of the fit.

    Returns
    -------
    ndarray of int64 or None
        :meth:`DataParallelGroup.shard`.

    Raises
    ------
    ValueError
        If there are fewer training rows than processes.
    """
    parallel = active_group()
    if parallel is None:
        return None
    if n_rows < parallel.world_size:
        raise ValueError(f"A data-parallel fit over {parallel.world_size} processes needs at least as many training "
                         f"rows; got {n_rows}.")
    return parallel.shard(n_rows)


def shard_for_training(module):
    """``module`` as this process trains it inside a :func:`data_parallel` block: its
    experts sharded with ``expert_parallel=True``, else itself.

    Parameters
    ----------
    module : MixtureOfExperts
        The network every process built alike.

    Returns
    -------
    MixtureOfExperts
        An :class:`~sklearn_moe.distributed.ExpertParallelMoE` or ``module``.
    """
    parallel = active_group()
    if parallel is None or not parallel.expert_parallel:
        return module
    from .expert_parallel import shard_experts

    return shard_experts(module, parallel.group, src=0)


def whole_after_training(trained, module):
    """The whole trained network on every process: ``trained`` unless its experts are
    sharded, else ``module`` (the unsharded network of the same configuration) loaded with
    the experts gathered from every process.

    Parameters
    ----------
    trained : MixtureOfExperts
        The module that was trained (:func:`shard_for_training`'s result).
    module : MixtureOfExperts
        The unsharded network it came from.

    Returns
    -------
    MixtureOfExperts
        An ordinary module holding every expert, in ``trained``'s mode.
    """
    from .expert_parallel import ExpertParallelMoE, gather_experts

    if not isinstance(trained, ExpertParallelMoE):
        return trained
    parallel = active_group()
    gathered = gather_experts(trained, dst=0)
    state = parallel.broadcast_object(None if gathered is None else {k: v.cpu() for k, v in
                                                                     gathered.state_dict().items()})
    module.load_state_dict(state)
    return module.train(trained.training)



def agree_on_fault(fault: NonFiniteLoss | None) -> NonFiniteLoss | None:
    """The numerical fault of an epoch as every process of the active group sees it.

    Outside a :func:`data_parallel` block, ``fault`` itself. Inside one, every process
    passes its own (or ``None``) and every process gets the same answer: ``None`` when no
    process had a fault, else one :class:`~sklearn_moe._guard.NonFiniteLoss` naming each
    process that had one. Every process then rolls the epoch back, or none does: a process
    that stopped alone would leave the others waiting in their next collective call.

    Parameters
    ----------
    fault : NonFiniteLoss or None
        This process's fault in the epoch that just ended.

    Returns
    -------
    NonFiniteLoss or None
        The group's fault.
    """
    parallel = active_group()
    if parallel is None:
        return fault
    messages = [None] * parallel.world_size
    dist.all_gather_object(messages, None if fault is None else str(fault), group=parallel.group)
    faults = [f"process {rank}: {message}" for rank, message in enumerate(messages) if message is not None]
    return NonFiniteLoss("; ".join(faults)) if faults else None
