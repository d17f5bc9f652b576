"""skorch callbacks that carry the training behaviour of the MoE estimators."""

from __future__ import annotations

import math

from skorch.callbacks import Callback

from .diagnostics import load_imbalance, row_entropy


class RoutingMetrics(Callback):
    """Record per-epoch routing metrics of the training batches in the net's history.

    Columns added each epoch: the batch-size-weighted means of the batch keys
    ``task_loss``, ``balance_loss``, ``z_loss`` and ``diversity_loss`` (those recorded by the
    net's ``get_loss``),
    ``load_imbalance`` (busiest expert's share over the mean
    share, 1 = perfect balance), ``routing_entropy`` (mean per-row gate entropy, nats) and
    ``dropped_fraction`` (share of assignments dropped by the capacity cap).
    """

    def on_epoch_begin(self, net, **kwargs):
        # Accumulated on the model's device: no host synchronisation per batch.
        self._counts = None
        self._entropy_sum = 0.0
        self._rows = 0
        self._dropped = 0

    def on_batch_end(self, net, batch=None, training=None, y_pred=None, **kwargs):
        if not training or y_pred is None:
            return
        counts = y_pred.expert_counts.detach()
        self._counts = counts if self._counts is None else self._counts + counts
        gates = y_pred.gates.detach()
        self._entropy_sum = self._entropy_sum + row_entropy(gates).sum()
        self._rows += gates.shape[0]
        self._dropped = self._dropped + y_pred.n_dropped.detach()

    averaged_keys = ("task_loss", "balance_loss", "z_loss", "diversity_loss")

    def on_epoch_end(self, net, **kwargs):
        if self._counts is None:
            return
        batches = [b for b in net.history[-1, "batches"] if "train_batch_size" in b]
        sizes = [b["train_batch_size"] for b in batches]
        for key in self.averaged_keys:
            values = [b[key] for b in batches if key in b]
            if len(values) == len(sizes):
                net.history.record(key, sum(v * s for v, s in zip(values, sizes)) / sum(sizes))
        total = int(self._counts.sum())
        net.history.record("load_imbalance", load_imbalance(self._counts))
        net.history.record("routing_entropy", float(self._entropy_sum) / max(self._rows, 1))
        net.history.record("dropped_fraction", int(self._dropped) / max(total, 1))
        # Device tensors must not outlive the epoch: a pickled CUDA tensor left here would
        # make a CUDA-trained model impossible to unpickle on a machine without CUDA.
        self.on_epoch_begin(net)


class AuxFreeBalancing(Callback):
    """DeepSeek-V3's auxiliary-loss-free load balancing.

    After every optimizer step, nudge each expert's selection bias by ``rate`` toward
    balance: ``b_e += rate * sign(mean_load - load_e)`` from the batch's routing counts
    (rows with zero sample weight not counted). The bias changes which experts are chosen,
    never the gate weights, so no gradient interferes with the task loss.

    Parameters
    ----------
    rate : float
        Bias step per optimizer step (the estimators pass ``balance_coef``).
    """

    def __init__(self, rate: float = 1e-2):
        self.rate = rate

    def on_batch_end(self, net, batch=None, training=None, y_pred=None, **kwargs):
        if training and y_pred is not None:
            net.module_.router.update_selection_bias(y_pred.expert_counts, self.rate)


LR_SCHEDULES = ("plateau", "cosine", "flat_cosine", "constant")


class LearningRateShape:
    """The learning-rate multiplier at optimizer step ``step`` of ``total_steps``.

    A picklable ``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR`` (stepped every
    batch), so that a fitted estimator that keeps its scheduler still pickles.

    Parameters
    ----------
    kind : {"cosine", "flat_cosine", "constant"}
        ``"cosine"``: ``(1 + cos(pi * t)) / 2`` over the training progress ``t`` in [0, 1];
        ``"flat_cosine"``: 1 for the first ``flat_fraction`` of training, then a cosine
        decay to 0 over the rest; ``"constant"``: always 1.
    total_steps : int
        Optimizer steps of ``max_epochs`` epochs.
    flat_fraction : float, default=0.5
    """

    def __init__(self, kind: str, total_steps: int, flat_fraction: float = 0.5):
        if kind not in ("cosine", "flat_cosine", "constant"):
            raise ValueError(f"kind must be 'cosine', 'flat_cosine' or 'constant', got {kind!r}")
        self.kind = kind
        self.total_steps = max(1, int(total_steps))
        self.flat_fraction = flat_fraction

    def __call__(self, step: int) -> float:
        progress = min(step / self.total_steps, 1.0)
        if self.kind == "constant":
            return 1.0
        if self.kind == "flat_cosine":
            if progress <= self.flat_fraction:
                return 1.0
            progress = (progress - self.flat_fraction) / (1.0 - self.flat_fraction)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
