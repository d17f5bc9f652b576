"""Recovery from numerical faults and interruptions during training.

A non-finite loss (or non-finite weights at the end of an epoch) does not end a fit: the
net rolls back to the weights and optimizer state of the last good epoch, lowers the
learning rate and runs the epoch again, a bounded number of times. A KeyboardInterrupt
rolls back to the last completed epoch, so the model never keeps the weights of half a
step.

Host synchronisation: reading a batch's loss on the host (to record it, and to check that
it is finite) makes the host wait for a GPU. :class:`LossLedger` reads the losses of a
training epoch on a GPU without waiting: each batch's values are copied to pinned host
memory asynchronously and read once the copy has landed, at a later step or at the end of
the epoch's batches. A non-finite training loss then raises at that point instead of
before its own step's backward; the epoch is rolled back all the same, and the steps in
between go with it, so the guarantee holds: no weights that a non-finite loss touched are
kept. On the CPU every value is read at once, as before. The checks of an epoch's end (its
mean losses, its weights) read the host once per epoch.
"""

from __future__ import annotations

import collections
import copy
import math

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from ._warnings import warn_at_caller
from .nn._sync import avoid_host_reads

MAX_ROLLBACKS = 3
LR_FACTOR_AFTER_ROLLBACK = 0.1


class TrainingDivergedError(RuntimeError):
    """Training kept producing non-finite losses or weights after every rollback."""


class NonFiniteLoss(Exception):
    """Raised inside an epoch when the loss or the weights stop being finite."""


def check_finite_loss(values: torch.Tensor, names: tuple[str, ...]) -> list[float]:
    """Host copy of the loss terms ``values`` (one synchronisation); raise on a non-finite one."""
    host = values.tolist()
    _raise_if_not_finite(host, names)
    return host


def _raise_if_not_finite(values: list[float], names: tuple[str, ...]) -> None:
    bad = [f"{name}={value}" for name, value in zip(names, values) if not math.isfinite(value)]
    if bad:
        raise NonFiniteLoss(f"non-finite training loss ({', '.join(bad)})")


class LossLedger:
    """Per-batch loss values on their way to the history, read without waiting for a GPU.

    :meth:`add` takes a batch's values as one device tensor and the batch's history record
    (a dict). On the CPU (and on devices other than CUDA) they are read and recorded at
    once. On CUDA they are copied to pinned host memory without blocking; :meth:`settle`
    records the copies that have landed, in order, and ``settle(wait=True)`` waits for all.
    Inside :func:`~sklearn_moe.nn._sync.sync_free_paths` the CPU behaves as a GPU whose
    copies land only at ``settle(wait=True)`` (for tests). Values added with ``check`` raise
    :class:`NonFiniteLoss` when read, if one is not finite (and the ledger forgets the rest:
    the epoch is rolled back). With ``defer``, a non-finite checked value does not raise:
    every value is recorded and the first fault is kept in :attr:`fault` (a data-parallel
    fit decides on faults with every process at the epoch's end,
    :func:`~sklearn_moe.distributed.data_parallel.agree_on_fault`).

    Parameters
    ----------
    defer : bool, default=False
        Keep a fault in :attr:`fault` instead of raising it.
    """

    def __init__(self, defer: bool = False):
        self._pending = collections.deque()
        self.defer = defer
        self.fault: NonFiniteLoss | None = None

    def add(self, values: torch.Tensor, keys: tuple[str, ...], record: dict,
            check: tuple[str, ...] | None = None) -> None:
        """Record ``values`` under ``keys`` in ``record``, now or once copied to the host.

        Parameters
        ----------
        values : Tensor of shape (k,)
            The batch's values (detached), on the model's device.
        keys : tuple of str
            Their keys in ``record``.
        record : dict
            The batch's history record (``net.history[-1]["batches"][-1]``).
        check : tuple of str, optional
            Names of the values for the error message; when given, a non-finite value
            raises :class:`NonFiniteLoss` when read.
        """
        if values.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            landed = torch.cuda.Event()
            landed.record()
        elif avoid_host_reads(values.device, training=True):  # sync_free_paths on the CPU:
            host, landed = values.clone(), None  # read at the end of the batches, as if in flight
        else:
            self._record(values.tolist(), keys, record, check)
            return
        self._pending.append((landed, host, keys, record, check))

    def settle(self, wait: bool = False) -> None:
        """Record the values whose copies have landed (all of them with ``wait``), in order.

        Raises
        ------
        NonFiniteLoss
            For a non-finite checked value.
        """
        while self._pending:
            landed, host, keys, record, check = self._pending[0]
            if not wait and (landed is None or not landed.query()):
                return
            if landed is not None:
                landed.synchronize()
            self._pending.popleft()
            self._record(host.tolist(), keys, record, check)

    def _record(self, values: list[float], keys, record: dict, check) -> None:
        if check is not None:
            try:
                _raise_if_not_finite(values, check)
            except NonFiniteLoss as fault:
                if not self.defer:
                    self._pending.clear()
                    raise
                self.fault = self.fault or fault
        record.update(zip(keys, values))


def _copied(value):
    """A deep copy of an optimizer's state dict: tensors cloned, containers rebuilt.

    ``copy.deepcopy`` does the same at several times the cost per tensor, paid at every
    epoch's end.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: _copied(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(item) for item in value)
    return copy.deepcopy(value)


class TrainingGuard:
    """Snapshots of the last good epoch and the rollback to them.

    Parameters
    ----------
    net : skorch.NeuralNet
        An initialised net whose ``module_`` and ``optimizer_`` are guarded.
    """

    def __init__(self, net):
        self.net = net
        self.rollbacks = 0
        self.snapshot()

    def snapshot(self) -> None:
        """Remember the current weights and optimizer state as the last good ones (in one
        assignment: an interrupt never leaves half a snapshot)."""
        module_state = {k: v.detach().clone() for k, v in self.net.module_.state_dict().items()}
        self._saved = (module_state, _copied(self.net.optimizer_.state_dict()))

    def restore(self) -> None:
        """Put back the last good weights and optimizer state."""
        module_state, optimizer_state = self._saved
        self.net.module_.load_state_dict(module_state)
        self.net.optimizer_.load_state_dict(optimizer_state)

    def epoch_fault(self) -> NonFiniteLoss | None:
        """The fault of the finished epoch: a non-finite loss or weight, else ``None``."""
        row = self.net.history[-1]
        for key in ("train_loss", "valid_loss"):
            if key in row and not math.isfinite(row[key]):
                return NonFiniteLoss(f"non-finite {key} ({row[key]})")
        names, parameters = zip(*self.net.module_.named_parameters())
        finite = torch.stack([torch.isfinite(p).all() for p in parameters]).tolist()  # one synchronisation
        if not all(finite):
            return NonFiniteLoss(f"non-finite weights in {names[finite.index(False)]}")
        return None

    def roll_back(self, fault: NonFiniteLoss) -> None:
        """Undo the failed epoch: last good weights, a lower learning rate, its history row gone.

        Raises
        ------
        TrainingDivergedError
            After :data:`MAX_ROLLBACKS` rollbacks in one fit.
        """
        epoch = self.net.history[-1, "epoch"]
        del self.net.history[-1]
        # Restoring the optimizer state would also restore its learning rates: keep the
        # lowered ones of earlier rollbacks.
        rates = [group["lr"] for group in self.net.optimizer_.param_groups]
        self.restore()
        if self.rollbacks == MAX_ROLLBACKS:
            lr = max(rates)  # the experts' rate (a router group may run slower)
            raise TrainingDivergedError(
                f"Training diverged: {fault} in epoch {epoch}, after {MAX_ROLLBACKS} rollbacks to the "
                f"last good weights, each lowering the learning rate {1 / LR_FACTOR_AFTER_ROLLBACK:g}x "
                f"(it reached {lr:.3g}). Try a lower learning_rate, gradient clipping (max_grad_norm), "
                "precision='float32', a larger temperature, or check X and y for extreme values."
            ) from fault
        self.rollbacks += 1
        for group, rate in zip(self.net.optimizer_.param_groups, rates):
            group["lr"] = rate * LR_FACTOR_AFTER_ROLLBACK
        for _, callback in self.net.callbacks_:
            # A schedule that recomputes the rate from its base every step (LambdaLR) would
            # undo the lowering at the next step: lower its base too.
            scheduler = getattr(callback, "lr_scheduler_", None)
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                scheduler.base_lrs = [rate * LR_FACTOR_AFTER_ROLLBACK for rate in scheduler.base_lrs]
        warn_at_caller(
            f"{fault} in epoch {epoch}: rolled back to the weights of the last good epoch and lowered "
            f"the learning rate to {max(group['lr'] for group in self.net.optimizer_.param_groups):.3g} "
            f"(rollback {self.rollbacks} of at most {MAX_ROLLBACKS}).",
            RuntimeWarning,
        )


#: The kept model's loss, over a constant prediction's, above which training is taken to
#: have diverged without a non-finite value.
NOT_LEARNED_RATIO = 10.0


def warn_if_not_learned(history, validated: bool, constant_loss: float, params) -> None:
    """Warn (:class:`~sklearn.exceptions.ConvergenceWarning`) where the kept weights' loss
    is over :data:`NOT_LEARNED_RATIO` times ``constant_loss``, a constant prediction's on
    the same rows: with a learning rate far too high the losses can stay finite yet
    enormous, and the fit would return a model far worse than predicting the mean without
    a word.

    ``history`` is the estimator's ``history_``: with ``validated`` (early stopping, a
    fit's own history) the kept weights are the best validation loss's, else the last
    epoch's (its training task loss; a ``partial_fit`` call's epoch is the last)."""
    column = "valid_loss" if validated else "task_loss"
    if column not in history:
        return
    losses = history[column].to_numpy(dtype=float)
    losses = losses[np.isfinite(losses)]
    if not losses.size:
        return
    loss = losses.min() if validated else losses[-1]
    if loss > NOT_LEARNED_RATIO * constant_loss:
        warn_at_caller(
            f"Training did not converge: the kept model's {'validation' if validated else 'training'} loss, "
            f"{loss:.3g}, is over {NOT_LEARNED_RATIO:g} times a constant prediction's ({constant_loss:.3g}), as when "
            f"training diverges without a non-finite value. Lower learning_rate (now {params.learning_rate:g}) or "
            f"weight_decay (now {params.weight_decay:g}), or bound the steps with max_grad_norm "
            f"(now {params.max_grad_norm}).", ConvergenceWarning)
