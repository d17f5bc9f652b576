"""The private skorch net that trains a :class:`~sklearn_moe.nn.MixtureOfExperts`."""

from __future__ import annotations

import contextlib
import pickle
import signal
import threading
from collections.abc import Iterable, Mapping

import torch
from skorch import NeuralNet
from skorch.callbacks import Callback, EarlyStopping
from skorch.dataset import get_len
from skorch.utils import to_device

from ._data import BatchIterator, TensorTable
from ._guard import LossLedger, NonFiniteLoss, TrainingGuard, check_finite_loss
from ._warnings import warn_at_caller
from .distributed.data_parallel import active_group, agree_on_fault
from .nn._random import draw_generator
from .nn.density import CLASS_MIXTURES, mixture_nll, per_expert_mixture_nll
from .nn.losses import MultilabelLoss, mean_per_row, per_expert_loss
from .nn.moe import MoEOutput


class MoENet(NeuralNet):
    """skorch ``NeuralNet`` whose loss adds the weighted auxiliary routing losses.

    The criterion must use ``reduction="none"``: :meth:`get_loss` averages the per-row task
    loss itself, weighted by the batch's ``sample_weight`` (normalised by the estimator to
    mean 1 over the training set). The balance, z and diversity losses are added in training
    only, and recorded per batch as ``task_loss``, ``balance_loss``, ``z_loss`` (and
    ``diversity_loss``); validation loss is the task loss of the mixture alone, so early
    stopping watches what the user cares about. With ``expert_loss="per_expert"`` the
    training loss trains every chosen expert on its own loss and the gate on the mixture's
    (:func:`~sklearn_moe.nn.losses.per_expert_loss`); ``task_loss`` still records the
    mixture's loss.

    Parameters
    ----------
    balance_coef : float
        Weight of ``MoEOutput.balance_loss``.
    z_loss_coef : float
        Weight of ``MoEOutput.z_loss``.
    diversity_coef : float
        Weight of ``MoEOutput.diversity_loss`` (recorded as ``diversity_loss`` when > 0).
    expert_loss : {"mixture", "per_expert"}
        What the experts are trained on in training.
    expert_subsample : float
        ``"per_expert"``: the share of its assigned rows each expert trains on in a batch,
        drawn afresh every step.
    autocast_dtype : torch.dtype or None
        Run the module's forward under ``torch.autocast`` with this dtype (bf16 mixed
        precision); the router stays in float32 and losses are computed in float32.
    shuffle_generator : torch.Generator
        Source of the training-batch shuffling.
    **kwargs
        Passed to :class:`skorch.NeuralNet`.
    """

    def __init__(self, *args, balance_coef=0.0, z_loss_coef=0.0, diversity_coef=0.0, autocast_dtype=None,
                 shuffle_generator=None, expert_loss="mixture", expert_subsample=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.expert_loss = expert_loss
        self.expert_subsample = expert_subsample
        self.autocast_dtype = autocast_dtype
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.diversity_coef = diversity_coef
        self.shuffle_generator = shuffle_generator

    def get_iterator(self, dataset, training=False):
        # A data-parallel fit's share of the validation rows: as many batches on every process.
        n_batches = None if training else getattr(dataset, "n_batches", None)
        return BatchIterator(dataset, self.batch_size, shuffle=training, generator=self.shuffle_generator,
                             n_batches=n_batches)

    def autocast(self, device: torch.device):
        """The mixed-precision context of the forward pass (a no-op in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.autocast_dtype)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        density = self.module_.output == "mixture_density"
        per_expert = training and self.expert_loss == "per_expert"  # then the task loss is recorded only
        if density:
            assignments = y_pred.assignments
            outputs = assignments.outputs.detach() if per_expert else assignments.outputs
            per_row = mixture_nll(outputs, assignments.rows, assignments.weights, y_true)
        else:
            output = y_pred.output.float()
            per_row = mean_per_row(self.criterion_(output.detach() if per_expert else output, y_true))
        sample_weight = X.get("sample_weight") if isinstance(X, Mapping) else None
        task_loss = per_row.mean() if sample_weight is None else (per_row * sample_weight).mean()
        if not training:
            return task_loss
        objective = task_loss
        if self.expert_loss == "per_expert":
            assignments = y_pred.assignments
            mask = None
            if self.expert_subsample < 1:
                mask = torch.rand(assignments.rows.shape, device=assignments.rows.device,
                                  generator=draw_generator()) < self.expert_subsample
            if density:
                objective = per_expert_mixture_nll(assignments.outputs, assignments.rows, assignments.weights, y_true,
                                                   sample_weight, mask)
            else:
                mixture = CLASS_MIXTURES.get(self.module_.output)  # None: the gate-weighted sum
                objective = per_expert_loss(self.criterion_, assignments.outputs, assignments.rows,
                                            assignments.weights, y_true, sample_weight, mask, mixture,
                                            assignments.grid)
        loss = objective + self.balance_coef * y_pred.balance_loss + self.z_loss_coef * y_pred.z_loss
        terms = {"task_loss": task_loss, "balance_loss": y_pred.balance_loss, "z_loss": y_pred.z_loss}
        if self.diversity_coef > 0:
            loss = loss + self.diversity_coef * y_pred.diversity_loss
            terms["diversity_loss"] = y_pred.diversity_loss
        values = torch.stack([t.detach().float() for t in (loss, *terms.values())])
        ledger = getattr(self, "_ledger", None)
        if ledger is None:  # outside the epoch loop: read (and check) at once
            for name, value in zip(terms, check_finite_loss(values, ("loss", *terms))[1:]):
                self.history.record_batch(name, value)
            return loss
        # The batch's loss (train_loss) and its terms, read when the copy to the host has
        # landed (at once on the CPU): a non-finite one raises then, before this step's
        # backward on the CPU, at a later step or the end of the epoch's batches on a GPU;
        # either way fit_loop rolls the epoch back.
        ledger.settle()
        ledger.add(values, ("train_loss", *terms), self.history[-1]["batches"][-1], check=("loss", *terms))
        return loss

    def run_single_epoch(self, iterator, training, prefix, step_fn, **fit_params):
        """skorch's loop over one epoch's batches, recording each batch's loss through a
        :class:`~sklearn_moe._guard.LossLedger` instead of reading it on the host at once.

        skorch's own loop reads every batch's loss with ``.item()``, which on a GPU makes the
        host wait for the device at every step. Here the training losses come from
        :meth:`get_loss` and the validation losses from the steps, copied to the host
        without blocking; all are in the history (and checked) once the loop ends, before
        ``on_epoch_end``. Everything else is skorch's: hooks, batch sizes, batch count.
        """
        if iterator is None:
            return
        # Data-parallel: a fault is decided with every process at the epoch's end.
        self._ledger = LossLedger(defer=active_group() is not None)
        if training:
            self._deferred_fault = None
        try:
            batch_count = 0
            for batch in iterator:
                self.notify("on_batch_begin", batch=batch, training=training)
                step = step_fn(batch, **fit_params)
                if not training:  # a training step's loss went through get_loss
                    self._ledger.add(step["loss"].detach().float().reshape(1), (prefix + "_loss",),
                                     self.history[-1]["batches"][-1])
                batch_size = get_len(batch[0]) if isinstance(batch, (tuple, list)) else get_len(batch)
                self.history.record_batch(prefix + "_batch_size", batch_size)
                self.notify("on_batch_end", batch=batch, training=training, **step)
                batch_count += 1
            self._ledger.settle(wait=True)
            if training:
                self._deferred_fault = self._ledger.fault
        finally:
            del self._ledger
        self.history.record(prefix + "_batch_count", batch_count)

    def fit_loop(self, X, y=None, epochs=None, **fit_params):
        """skorch's epoch loop, one epoch at a time, guarded against numerical faults and
        interruptions.

        Each epoch is a call of skorch's own ``fit_loop`` (its split, metadata routing and
        callbacks, with every argument passed on as given). An epoch whose loss or weights
        become non-finite is rolled back and run again with a lower learning rate (see
        :mod:`sklearn_moe._guard`). A KeyboardInterrupt ends training: raised amid an
        epoch's steps, the weights go back to the last completed epoch (and ``train`` drops
        the cut-short epoch's history row); raised once its steps are done (in its
        callbacks, early stopping's among them), the epoch counts. ``interrupted_`` is set
        when it came from Ctrl-C (a SIGINT during the loop), not when code raised it, as a
        callback does to end training.
        """
        epochs = epochs if epochs is not None else self.max_epochs
        self._guard = TrainingGuard(self)
        self.interrupted_ = False
        completed = 0
        signals = []
        try:
            with _recording_sigint(signals):
                while completed < epochs:
                    self._callbacks_running = False
                    try:
                        super().fit_loop(X, y, epochs=1, **fit_params)
                    except NonFiniteLoss as fault:
                        self._guard.roll_back(fault)
                        continue
                    self._guard.snapshot()
                    completed += 1
        except KeyboardInterrupt:
            if not self._callbacks_running:  # amid an epoch's steps: back to the last completed epoch
                self._guard.restore()
            self.interrupted_ = bool(signals)
            raise
        finally:
            del self._guard
        return self

    def on_epoch_end(self, net, **kwargs):
        """Check the finished epoch before any callback sees it (skorch notifies the net
        first): a non-finite one raises :class:`~sklearn_moe._guard.NonFiniteLoss` (in a
        data-parallel fit, on every process when one process had a fault)."""
        super().on_epoch_end(net, **kwargs)
        guard = getattr(self, "_guard", None)
        if guard is not None:
            fault = agree_on_fault(getattr(self, "_deferred_fault", None) or guard.epoch_fault())
            if fault is not None:
                raise fault
        self._callbacks_running = True

    # skorch's scoring callbacks (EpochScoring, BatchScoring) call a scorer with the net and
    # the rows of a TensorTable (the training or validation split, see get_dataset): the
    # net predicts as a scikit-learn estimator would, on the network's own targets (class
    # indices, 0/1 labels, standardised values). Their cache of the batches' outputs (the
    # MoEOutput named tuples, which skorch's to_device cannot rebuild) is off: they predict.

    def get_dataset(self, X, y=None):
        """A tensor of encoded rows (a scoring callback's) as a :class:`TensorTable`."""
        if isinstance(X, torch.Tensor):
            return TensorTable(X, y)
        return super().get_dataset(X, y)

    def forward_iter(self, X, training=False, device="cpu"):
        """The module's prediction (:attr:`MoEOutput.output`) for each batch of ``X``."""
        dataset = self.get_dataset(X)
        for batch in self.get_iterator(dataset, training=training):
            out = self.evaluation_step(batch, training=training)
            yield to_device((out.output if isinstance(out, MoEOutput) else out).float(), device=device)

    def predict_proba(self, X):
        """Class probabilities (label probabilities for multilabel); the prediction itself
        for regression."""
        output = self._output(X)
        if isinstance(self.criterion_, torch.nn.CrossEntropyLoss):
            output = output.softmax(dim=-1)  # of logits or of log-probabilities alike
        elif isinstance(self.criterion_, MultilabelLoss):
            output = output.sigmoid()
        return output.numpy()

    def predict(self, X):
        """Class indices (0/1 labels for multilabel); standardised targets for regression."""
        output = self._output(X)
        if isinstance(self.criterion_, torch.nn.CrossEntropyLoss):
            output = output.argmax(dim=-1)
        elif isinstance(self.criterion_, MultilabelLoss):
            output = (output > 0).long()
        return output.numpy()

    def _output(self, X) -> torch.Tensor:
        return torch.cat(list(self.forward_iter(X)))

    def infer(self, x, **fit_params):
        # Batches come from TensorTable already as tensors on the right device.
        inputs = x if isinstance(x, Mapping) else {"x": x}
        with self.autocast(inputs["x"].device):
            return self.module_(**inputs, **fit_params)


def module_device(device: str) -> str:
    """Resolve ``"auto"`` to ``"cuda"`` when available, else ``"cpu"``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def named_callbacks(callbacks, prefix: str = "fit_callback") -> list[tuple[str, Callback]]:
    """Validate ``callbacks`` (the parameter, or ``fit(..., callbacks=...)``): skorch
    callbacks or ``(name, callback)`` pairs; a plain one is named ``{prefix}_{position}``."""
    if callbacks is None:
        return []
    if isinstance(callbacks, (Callback, str)) or not isinstance(callbacks, Iterable):
        raise TypeError(f"callbacks must be a list of skorch Callback instances; got {callbacks!r}.")
    named = []
    for position, item in enumerate(callbacks):
        name, callback = item if isinstance(item, tuple) and len(item) == 2 else (f"{prefix}_{position}", item)
        if not isinstance(callback, Callback):
            raise TypeError(
                f"callbacks[{position}] is {callback!r}, not a skorch.callbacks.Callback instance "
                "(subclass Callback and implement on_epoch_end, for example)."
            )
        named.append((str(name), callback))
    return named


@contextlib.contextmanager
def _recording_sigint(received: list):
    """Append every SIGINT (Ctrl-C) during the block to ``received``, the signal then
    handled as before (Python's default raises KeyboardInterrupt): told apart from a
    KeyboardInterrupt that code raised, a callback's way of ending training. Python runs
    signal handlers in the main thread only, so in another thread, or where SIGINT is
    ignored or left to the operating system, no Ctrl-C can raise one there: nothing is
    recorded."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def record(signum, frame):
        received.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def interruption_message(net) -> str:
    """After Ctrl-C: which weights the net kept, as the interrupt's message says it."""
    best = next((cb for _, cb in net.callbacks_ if isinstance(cb, EarlyStopping)), None)
    if not net.history:
        kept = "its initial weights (no epoch completed)"
    elif best is not None and best.load_best and best.best_model_weights_ is not None:
        kept = f"the best weights so far (epoch {best.best_epoch_})"
    else:
        kept = "the weights of the last completed epoch"
    return (f"Training was interrupted after {len(net.history)} complete epoch(s); the fitted model keeps {kept}, "
            "and predicts.")


def drop_unpicklable_callbacks(net, names: set[str]) -> None:
    """Remove the callbacks ``names`` (the estimator's ``callbacks`` parameter's) that cannot
    be pickled from a trained ``net``, with a warning each: the net then pickles, and the
    warning says that the parameter, which still holds the object, does not."""
    unpicklable = set()
    for name, callback in net.callbacks_:
        if name in names:
            try:
                pickle.dumps(callback)
            except Exception as error:  # noqa: BLE001 - whatever pickling raises
                unpicklable.add(name)
                warn_at_caller(f"Callback {name!r} ({type(callback).__name__}) cannot be pickled ({error}); it "
                               "is removed from the trained net (net_), but the estimator's callbacks parameter "
                               "still holds it, so the estimator pickles only after set_params(callbacks=None). "
                               "Callbacks passed to fit(X, y, callbacks=[...]) are not kept.",
                               UserWarning)
    drop_callbacks(net, unpicklable)


def drop_callbacks(net, names: set[str]) -> None:
    """Forget the per-fit callbacks so the fitted estimator neither keeps nor pickles them."""
    if names:
        net.callbacks = [c for c in net.callbacks if c[0] not in names]
        net.callbacks_ = [c for c in net.callbacks_ if c[0] not in names]


class PredefinedSplit:
    """skorch ``train_split`` that returns a fixed validation table."""

    def __init__(self, valid_table):
        self.valid_table = valid_table

    def __call__(self, dataset, y=None, **fit_params):
        return dataset, self.valid_table
