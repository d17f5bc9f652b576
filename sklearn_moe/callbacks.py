"""skorch callbacks that carry the training behaviour of the MoE estimators."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from skorch.callbacks import Callback

from ._warnings import warn_at_caller
from .diagnostics import (
    expert_specialization,
    expert_utilization,
    gate_share,
    load_cv,
    load_entropy,
    load_imbalance,
    per_expert_mean,
    routing_instability,
    row_entropy,
    target_bins,
)
from .distributed.validation import ValidationShard


class RoutingMetrics(Callback):
    """Record per-epoch routing metrics in the net's history.

    The metrics are computed on the training batches and on the validation split.

    Training columns: the batch-size-weighted means of the batch keys ``task_loss``,
    ``balance_loss``, ``z_loss`` and ``diversity_loss`` (those recorded by the net's
    ``get_loss``); ``expert_share`` (each expert's share of the routed rows, a list),
    ``gate_share`` (its share of the gate mass, a list), ``load_entropy``, ``load_cv``,
    ``load_imbalance`` (busiest expert's share over the mean share; the load is the routed
    rows', or for a dense router, whose every expert serves every row, the gate mass's),
    ``routing_entropy``
    (mean per-row gate entropy, nats) and ``dropped_fraction`` (share of assignments
    dropped by the capacity cap). See :mod:`sklearn_moe.diagnostics` for the formulas.

    Validation columns (when there is a validation split): ``valid_expert_share``,
    ``valid_gate_share``, ``valid_load_entropy``, ``valid_load_cv``,
    ``valid_load_imbalance``, ``valid_routing_entropy``; ``valid_routing_instability``
    (share of validation rows whose top-1 expert changed since the last epoch; NaN on the
    first), ``valid_specialization`` (normalised mutual information between the top-1
    expert and the class, the set of labels of a multilabel target, or the decile of a
    regression target, the first target's for several) and ``valid_expert_loss`` (the
    mixture's loss on the rows each expert serves first, a list; NaN where none).
    """

    averaged_keys = ("task_loss", "balance_loss", "z_loss", "diversity_loss")

    def initialize(self):
        """Clear the state of any previous fit.

        Returns
        -------
        RoutingMetrics
            This callback.
        """
        self._previous_top1 = None
        self._reset()
        return super().initialize()

    def on_train_begin(self, net, **kwargs):
        """Forget the previous fit's top-1 experts, so that instability starts at NaN.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        self._previous_top1 = None

    def on_train_end(self, net, **kwargs):
        """Forget the last epoch's top-1 experts (one per validation row).

        A fitted model keeps no array of its rows, and its pickle carries none.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        self._previous_top1 = None

    def _reset(self):
        # Accumulated on the model's device: no host synchronisation per batch.
        self._train = _RoutingTally()
        self._valid = _RoutingTally()
        self._valid_top1, self._valid_targets, self._valid_losses = [], [], []

    def on_epoch_begin(self, net, **kwargs):
        """Start the epoch's tallies from zero.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        self._reset()

    def on_batch_end(self, net, batch=None, training=None, y_pred=None, **kwargs):
        """Add the batch's routing to the training or the validation tally.

        For a validation batch also keep each row's top-1 expert, target and loss, on the
        device, for the epoch's specialization and per-expert loss.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        batch : tuple of Tensor, optional
            The batch ``(X, y)``; ``y`` holds the (scaled) targets.
        training : bool, optional
            Whether the batch is a training batch (False for a validation batch).
        y_pred : MoEOutput, optional
            The module's output on the batch (:class:`sklearn_moe.nn.MoEOutput`); nothing is
            recorded when it is None.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        if y_pred is None:
            return
        gates = y_pred.gates.detach()
        if training:
            self._train.add(y_pred.expert_counts.detach(), gates, y_pred.n_dropped.detach())
            return
        self._valid.add(y_pred.expert_counts.detach(), gates, None)
        targets = batch[1]
        self._valid_top1.append(gates.argmax(dim=1))
        self._valid_targets.append(targets.detach())
        with torch.no_grad():
            losses = net.criterion_(y_pred.output.float(), targets)
        self._valid_losses.append(losses.reshape(losses.shape[0], -1).mean(dim=1))

    def on_epoch_end(self, net, dataset_valid=None, **kwargs):
        """Record the epoch's averaged losses and routing metrics in the history.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        dataset_valid : Dataset, optional
            The validation rows. In a data-parallel fit whose processes each evaluate a
            share of them (a :class:`~sklearn_moe.distributed.validation.ValidationShard`),
            the validation metrics are computed over every process's rows.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        batches = [b for b in net.history[-1, "batches"] if "train_batch_size" in b]
        sizes = [b["train_batch_size"] for b in batches]
        for key in self.averaged_keys:
            values = [b[key] for b in batches if key in b]
            if values and len(values) == len(sizes):
                net.history.record(key, sum(v * s for v, s in zip(values, sizes)) / sum(sizes))
        dense = net.module_.router.is_dense
        if self._train.rows:
            for key, value in self._train.metrics(dense).items():
                net.history.record(key, value)
        if self._valid.rows:
            if isinstance(dataset_valid, ValidationShard):
                self._gather_validation(dataset_valid)
            for key, value in self._valid.metrics(dense).items():
                if key != "dropped_fraction":
                    net.history.record(f"valid_{key}", value)
            self._record_validation_routing(net)
        # Device tensors must not outlive the epoch: a pickled CUDA tensor left here would
        # make a CUDA-trained model impossible to unpickle on a machine without CUDA.
        self._reset()

    def _gather_validation(self, shard: ValidationShard) -> None:
        """Replace this process's validation tally and per-row records by every process's."""
        self._valid = self._valid.summed(shard.sum_over_processes)
        for records in (self._valid_top1, self._valid_targets, self._valid_losses):
            records[:] = [shard.gather_rows(torch.cat(records))]

    def _record_validation_routing(self, net):
        top1 = torch.cat(self._valid_top1).cpu().numpy()
        targets = torch.cat(self._valid_targets).cpu().numpy()
        if targets.dtype.kind not in "iub":
            groups = target_bins(targets)
        elif targets.ndim == 2:  # multilabel: each row's set of labels
            groups = np.unique(targets, axis=0, return_inverse=True)[1].reshape(-1)
        else:
            groups = targets
        n_experts = net.module_.n_experts
        losses = torch.cat(self._valid_losses).cpu().numpy()
        instability = float("nan")
        if self._previous_top1 is not None and self._previous_top1.shape == top1.shape:
            instability = routing_instability(self._previous_top1, top1)
        net.history.record("valid_routing_instability", instability)
        net.history.record("valid_specialization", expert_specialization(top1, groups))
        net.history.record("valid_expert_loss", per_expert_mean(losses, top1, n_experts).tolist())
        self._previous_top1 = top1


class _RoutingTally:
    """Per-epoch sums of routing counts, gate mass, row entropies and drops (on device)."""

    def __init__(self):
        self.counts = self.gate_mass = None
        self.entropy = self.dropped = 0.0
        self.rows = 0

    def add(self, counts, gates, dropped):
        self.counts = counts if self.counts is None else self.counts + counts
        mass = gates.sum(dim=0)
        self.gate_mass = mass if self.gate_mass is None else self.gate_mass + mass
        self.entropy = self.entropy + row_entropy(gates).sum()
        self.rows += gates.shape[0]
        if dropped is not None:
            self.dropped = self.dropped + dropped

    def summed(self, total) -> _RoutingTally:
        """The tally whose sums are ``total(sums)``, a function of a float64 tensor (in a
        data-parallel fit, the sums over the processes)."""
        n_experts, device = self.counts.shape[0], self.counts.device
        scalars = [torch.as_tensor(value, dtype=torch.float64, device=device).reshape(1)
                   for value in (self.entropy, self.dropped, self.rows)]
        sums = total(torch.cat([self.counts.to(torch.float64), self.gate_mass.to(torch.float64), *scalars]))
        merged = _RoutingTally()
        merged.counts = sums[:n_experts].round().long()
        merged.gate_mass = sums[n_experts:2 * n_experts]
        merged.entropy, merged.dropped = sums[2 * n_experts], sums[2 * n_experts + 1]
        merged.rows = int(sums[2 * n_experts + 2])
        return merged

    def metrics(self, dense: bool = False) -> dict:
        """The tally's metrics; the load metrics of a ``dense`` router (every expert on
        every row, equal routed counts by construction) are of its gate mass."""
        counts = self.counts.cpu().numpy()
        total = int(counts.sum())
        load = self.gate_mass.double().cpu().numpy() if dense else counts
        return {
            "expert_share": expert_utilization(counts).tolist(),
            "gate_share": gate_share(self.gate_mass.unsqueeze(0)).tolist(),
            "load_entropy": load_entropy(load),
            "load_cv": load_cv(load),
            "load_imbalance": load_imbalance(load),
            "routing_entropy": float(self.entropy) / max(self.rows, 1),
            "dropped_fraction": int(self.dropped) / max(total, 1),
        }


class ExpertGradientNorms(Callback):
    """Record each expert's gradient norm, averaged over the epoch's training batches.

    The history column ``expert_grad_norm`` holds a list, one value per expert.

    The norm of expert ``e`` is ``sqrt(sum_p ||grad p[e]||^2)`` over the parameters that
    belong to one expert each (``experts.expert_parameters()``: for adapter experts their
    scalings, biases, norms and heads, not the shared weights), before gradient clipping.
    A starved expert shows as a norm near zero.
    """

    def on_epoch_begin(self, net, **kwargs):
        """Start the epoch's sum of gradient norms from zero.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        self._sum, self._batches = None, 0

    def on_grad_computed(self, net, named_parameters=None, training=None, **kwargs):
        """Add each expert's gradient norm of this step (before clipping) to the sum.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        named_parameters : iterable of (str, Parameter), optional
            The module's named parameters, as skorch passes them; not used (the gradients are
            read from ``experts.expert_parameters()``).
        training : bool, optional
            Whether the gradients come from a training step (skorch passes True); not used.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        grads = [p.grad.detach().reshape(p.shape[0], -1) for p in net.module_.experts.expert_parameters()
                 if p.grad is not None]
        if grads:
            # One concatenation and one norm for all the parameters: on a GPU each kernel
            # launched here adds to every training step's time.
            norms = torch.linalg.vector_norm(torch.cat(grads, dim=1), dim=1, dtype=torch.float32)
            self._sum = norms if self._sum is None else self._sum + norms
            self._batches += 1

    def on_epoch_end(self, net, **kwargs):
        """Record the epoch's mean gradient norms as ``expert_grad_norm``, then reset.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        if self._sum is not None:
            net.history.record("expert_grad_norm", (self._sum / self._batches).cpu().tolist())
        self.on_epoch_begin(net)


class StepTimes(Callback):
    """Record where the training batches' time goes, in seconds per epoch.

    The history columns are ``router_s`` and ``experts_s`` (their forward passes, the shared
    expert's included) and ``optimizer_s`` (the optimizer steps). The rest of an epoch's
    ``dur`` is the backward pass, the losses and the data.

    Timed by forward hooks on the router and the experts, and from the end of the gradient
    computation to the optimizer's step post-hook (gradient clipping included); the hooks
    are removed when training ends. On a GPU the spans are CUDA events, read once an epoch;
    on the CPU, wall-clock time.
    """

    keys = ("router_s", "experts_s", "optimizer_s")

    def on_train_begin(self, net, **kwargs):
        """Register the timing hooks on the router, the experts and the optimizer.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        module = net.module_
        self._cuda = next(module.parameters()).is_cuda
        self._open, self._spans = {}, {key: [] for key in self.keys}
        timed = {"router_s": [module.router], "experts_s": [module.experts]}
        if module.shared_expert is not None:
            timed["experts_s"].append(module.shared_expert)
        self._handles = []
        for key, modules in timed.items():
            for part in modules:
                self._handles.append(part.register_forward_pre_hook(_TimerHook(self, key, start=True)))
                self._handles.append(part.register_forward_hook(_TimerHook(self, key, start=False)))
        self._handles.append(net.optimizer_.register_step_post_hook(_TimerHook(self, "optimizer_s", start=False)))

    def on_grad_computed(self, net, training=None, **kwargs):
        """Open the optimizer span: the gradients are ready, the update comes next.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        training : bool, optional
            Whether the gradients come from a training step (skorch passes True); not used.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        # skorch steps the optimizer with a closure that runs forward and backward and ends
        # by notifying this: the update itself (and gradient clipping) comes after.
        if hasattr(self, "_spans"):
            self._mark("optimizer_s", start=True)

    def _mark(self, key, start):
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        if start:
            self._open[key] = event
        elif key in self._open:
            self._spans[key].append((self._open.pop(key), event))

    def on_epoch_end(self, net, **kwargs):
        """Record the epoch's total seconds per span (``router_s``, ``experts_s``, ``optimizer_s``).

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        if not hasattr(self, "_spans"):
            return
        if self._cuda:
            torch.cuda.synchronize()
        for key, spans in self._spans.items():
            if self._cuda:
                total = sum(begin.elapsed_time(end) for begin, end in spans) / 1e3
            else:
                total = sum(end - begin for begin, end in spans)
            net.history.record(key, total)
            spans.clear()

    def on_train_end(self, net, **kwargs):
        """Remove the timing hooks and drop the recorded spans.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        for handle in getattr(self, "_handles", []):
            handle.remove()
        self._handles, self._open, self._spans = [], {}, {key: [] for key in self.keys}


class _TimerHook:
    """A forward (pre-)hook or optimizer step post-hook that marks a span of :class:`StepTimes`;
    forward passes in evaluation mode (validation) are not timed."""

    def __init__(self, timer: StepTimes, key: str, start: bool):
        self.timer, self.key, self.start = timer, key, start

    def __call__(self, owner, *args):
        if isinstance(owner, torch.nn.Module) and not owner.training:
            return None
        self.timer._mark(self.key, self.start)
        return None


class EpochLine(Callback):
    """``verbose=1``: print one compact line per epoch (under skorch's progress bar).

    ``epoch   3  loss 0.1621  valid 0.0484  load_cv 0.000  entropy 1.500  0.08s``: the
    mixture's loss on the training batches (``task_loss``, as the validation loss is: not
    the whole objective ``train_loss``, which adds the per-expert and routing losses), the
    validation loss (when there is a split), the training batches' load coefficient of
    variation and mean per-row routing entropy, and the epoch's time. A ``*`` marks a new
    best validation (or training objective) loss.

    Parameters
    ----------
    sink : callable, default=print
        Called with each epoch's line (a str).
    """

    def __init__(self, sink=print):
        self.sink = sink

    def on_epoch_end(self, net, **kwargs):
        """Pass the epoch's line to ``sink``.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        row = net.history[-1]
        loss = row.get("task_loss", row.get("train_loss", float("nan")))
        parts = [f"epoch {row['epoch']:>3}", f"loss {loss:.4f}"]
        if "valid_loss" in row:
            parts.append(f"valid {row['valid_loss']:.4f}")
        parts += [f"load_cv {row.get('load_cv', float('nan')):.3f}",
                  f"entropy {row.get('routing_entropy', float('nan')):.3f}", f"{row.get('dur', 0.0):.2f}s"]
        best = row.get("valid_loss_best", row.get("train_loss_best", False))
        self.sink("  ".join(parts) + ("  *" if best else ""))


TEMPERATURE_SCHEDULES = ("cosine", "linear", "exponential")


def annealed_temperature(start: float, final: float, schedule: str, progress: float) -> float:
    """Compute the router temperature at a point of training.

    See the estimators' ``temperature_schedule``.

    Parameters
    ----------
    start : float
        Temperature at the start of training (``progress=0``).
    final : float
        Temperature at the end of training (``progress=1``).
    schedule : {"cosine", "linear", "exponential"}
        Path from ``start`` to ``final``: a half cosine, a straight line, or a geometric
        interpolation ``start * (final / start) ** progress``.
    progress : float
        Training progress in [0, 1]; values outside are clipped.

    Returns
    -------
    float
        The temperature.

    Raises
    ------
    ValueError
        If ``schedule`` is not one of the names above.
    """
    t = min(max(progress, 0.0), 1.0)
    # Weighted sums of the two ends, not differences: each end is returned exactly, and a
    # temperature between two positive ones stays positive (start + (final - start) * t
    # gave 0.0 at t=1 for start=1, final=1e-17).
    if schedule == "linear":
        return start * (1 - t) + final * t
    if schedule == "cosine":
        weight = (1 + math.cos(math.pi * t)) / 2
        return start * weight + final * (1 - weight)
    if schedule == "exponential":
        return start * (final / start) ** t
    raise ValueError(f"schedule must be one of {TEMPERATURE_SCHEDULES}, got {schedule!r}")


class TemperatureAnnealing(Callback):
    """Anneal the router's temperature over the epochs.

    At the start of every epoch the temperature is set, from ``start`` (epoch 1) to ``final``
    (epoch ``max_epochs``) along ``schedule`` (:func:`annealed_temperature`), and recorded in
    the history as ``temperature``.

    The temperature is a buffer of the router, so early stopping's restored weights come
    with the temperature of their epoch, and a saved model keeps it.

    Parameters
    ----------
    start : float
        Temperature of the first epoch.
    final : float
        Temperature of epoch ``max_epochs`` (and of any later one).
    schedule : {"cosine", "linear", "exponential"}
        Path from ``start`` to ``final`` (:func:`annealed_temperature`).
    max_epochs : int
        Epoch at which ``final`` is reached.
    """

    def __init__(self, start: float, final: float, schedule: str, max_epochs: int):
        self.start = start
        self.final = final
        self.schedule = schedule
        self.max_epochs = max_epochs

    def on_epoch_begin(self, net, **kwargs):
        """Set the router's temperature for this epoch and record it as ``temperature``.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        epoch = len(net.history)  # the row of this epoch exists already
        progress = (epoch - 1) / max(self.max_epochs - 1, 1)
        temperature = annealed_temperature(self.start, self.final, self.schedule, progress)
        net.module_.router.temperature.fill_(temperature)
        net.history.record("temperature", temperature)


class AdaptiveCapacity(Callback):
    """``capacity_factor="auto"``: set each epoch's capacity from the load of the last.

    The first epoch is dropless. During an epoch the callback records, for every training
    batch, the busiest expert's routed load over the mean load (before any cap); the next
    epoch's capacity factor is the ``quantile`` of those ratios (at least 1). Most batches
    then fit with nothing dropped, while the busiest expert of an unusually skewed batch is
    capped. The history records the factor of each epoch as ``capacity_factor`` (NaN when
    dropless); prediction stays dropless.

    Parameters
    ----------
    quantile : float, default=0.9
        Quantile, in [0, 1], of the last epoch's per-batch load ratios that becomes the next
        epoch's capacity factor.
    """

    def __init__(self, quantile: float = 0.9):
        self.quantile = quantile

    def on_train_begin(self, net, **kwargs):
        """Make the first epoch dropless.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        net.module_.capacity_factor = None

    def on_epoch_begin(self, net, **kwargs):
        """Record the epoch's capacity factor as ``capacity_factor`` (NaN when dropless).

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        self._ratios = []
        factor = net.module_.capacity_factor
        net.history.record("capacity_factor", float("nan") if factor is None else factor)

    def on_batch_end(self, net, training=None, y_pred=None, **kwargs):
        """Keep a training batch's busiest-expert load over its mean load.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        training : bool, optional
            Whether the batch is a training batch (False for a validation batch).
        y_pred : MoEOutput, optional
            The module's output on the batch (:class:`sklearn_moe.nn.MoEOutput`); nothing is
            recorded when it is None.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        if training and y_pred is not None:
            counts = y_pred.expert_counts.detach().float()
            self._ratios.append(counts.max() / counts.mean().clamp_min(1e-12))

    def on_epoch_end(self, net, **kwargs):
        """Set the next epoch's capacity factor to the ``quantile`` of the load ratios (at least 1).

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        if self._ratios:
            ratios = torch.stack(self._ratios).cpu().numpy()
            net.module_.capacity_factor = max(1.0, float(np.quantile(ratios, self.quantile)))
        self._ratios = []

    def on_train_end(self, net, **kwargs):
        """Leave the fitted module dropless.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        net.module_.capacity_factor = None  # the fitted module is dropless, as the parameter says


class ExpertCollapseWarning(UserWarning):
    """Training routed (almost) nothing to some experts for several epochs in a row."""


class CollapseMonitor(Callback):
    """Warn when experts starve, and optionally revive them by splitting the busiest.

    At the end of every epoch each expert's share of the training routing is read from the
    history (``gate_share`` for a dense router, ``expert_share`` for a sparse one). An
    expert below ``threshold / n_experts`` for ``patience`` epochs in a row is starved.
    With ``recovery``, each starved expert is then re-initialised as a perturbed copy of
    the busiest expert (:meth:`~sklearn_moe.nn.MixtureOfExperts.split_expert`), its count
    restarts, and the epoch's history records the revived experts in
    ``revived_experts``. When training ends, one :class:`ExpertCollapseWarning` names the
    experts that starved (and the revivals).

    Parameters
    ----------
    threshold : float
        Fraction of an equal share below which an expert counts as starved.
    patience : int
        Number of consecutive epochs an expert must stay below the threshold to count as
        starved.
    recovery : bool, default=False
        Whether to re-initialise starved experts as perturbed copies of the busiest one.
        The copies' perturbation draws from the fit's generator of training draws, which
        the estimators seed from ``random_state`` (torch's global generator outside a fit).
    """

    def __init__(self, threshold: float, patience: int, recovery: bool = False):
        self.threshold = threshold
        self.patience = patience
        self.recovery = recovery

    def on_train_begin(self, net, **kwargs):
        """Count the starved epochs already in the history, and the experts warned about.

        A continued fit (every ``partial_fit`` call after the first) carries its earlier
        epochs, so a stream's starvation is counted across calls; a new fit has none.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        self._starved_for = None
        self._warned = set()
        self._starved, self._revival_sources = {}, []  # this run's: warned of at its end
        for row in net.history:
            _, collapsed = self._count_starved(net.module_, row)
            if self.recovery:
                if self._starved_for is not None:
                    self._starved_for[[e for e in row.get("revived_experts", []) if e < self._starved_for.size]] = 0
            else:
                self._warned.update(collapsed)

    def _count_starved(self, module, row) -> tuple[np.ndarray | None, list[int]]:
        """Count ``row``'s starved experts into the running counts: the epoch's shares (None
        if it has none) and the experts starved for ``patience`` epochs. An epoch of another
        number of experts (before pruning or growth) restarts the counts."""
        key = "gate_share" if module.router.is_dense else "expert_share"
        if module.n_experts < 2 or key not in row:
            return None, []
        share = np.asarray(row[key], dtype=np.float64)
        if share.shape != (module.n_experts,):
            self._starved_for = None
            return share, []
        starved = share < self.threshold / module.n_experts
        self._starved_for = np.where(starved, (0 if self._starved_for is None else self._starved_for) + 1, 0)
        return share, [int(e) for e in np.flatnonzero(self._starved_for >= self.patience)]

    def on_epoch_end(self, net, **kwargs):
        """Count starved epochs per expert; optionally revive starved experts.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
        module = net.module_
        row = net.history[-1]
        share, collapsed = self._count_starved(module, row)
        if not collapsed:
            return
        busiest = int(share.argmax())
        if self.recovery:
            module.split_expert(busiest, collapsed)
            self._starved_for[collapsed] = 0
            net.history.record("revived_experts", collapsed)
            self._revival_sources.append(busiest)
        for expert in collapsed:
            if expert not in self._warned or self.recovery:
                self._starved[expert] = share[expert]
        self._warned.update(collapsed)
        self._n_experts = len(share)
        self._advice = _balancing_advice(module)

    def on_train_end(self, net, **kwargs):
        """Warn once of the experts that starved in this run, and of their revival.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.

        Warns
        -----
        ExpertCollapseWarning
            Naming the experts starved for ``patience`` epochs in this run (each once,
            and, without ``recovery``, not again in a run that continues this one).
        """
        self.warn_of_starved_experts()

    def warn_of_starved_experts(self):
        """Give the warning of :meth:`on_train_end`, if not yet given.

        Also for a run that failed, where skorch calls no ``on_train_end`` (starved experts
        may be why).

        Warns
        -----
        ExpertCollapseWarning
        """
        if not getattr(self, "_starved", None):
            return
        experts = sorted(self._starved)
        if self.recovery:
            sources = sorted(set(self._revival_sources))
            source = f"expert {sources[0]}" if len(sources) == 1 else f"the busiest expert (of {sources}, in turn)"
            count = len(self._revival_sources)
            action = f"re-initialised as copies of {source}, {count} revival{'s' if count > 1 else ''} in all"
        else:
            action = f"{self._advice}, or set collapse_recovery=True to re-initialise them"
        shares = ", ".join(f"{self._starved[e]:.3g}" for e in experts)
        warn_at_caller(
            f"Expert(s) {experts} received less than {self.threshold:g} of an equal share of the routing for "
            f"{self.patience} epochs (their shares {shares}, where an equal share is {1 / self._n_experts:.3g}): "
            f"the router has collapsed onto fewer experts; {action}.", ExpertCollapseWarning)
        self._starved, self._revival_sources = {}, []


def _balancing_advice(module) -> str:
    """What would even out the routing of ``module`` (a ``MixtureOfExperts``), given its
    router and balance loss: the advice of :class:`CollapseMonitor`'s warning.

    Under a dense router every expert serves every row, so the ``"switch"`` loss is the
    constant 1 and the ``"aux_free"`` bias selects nothing: raising ``balance_coef`` would
    change nothing there, and ``"cv2"`` is the balance loss that evens out the gate weights.
    """
    balance_loss = getattr(module, "balance_loss", None)
    if module.router.is_dense and balance_loss != "cv2":
        return ('set balance_loss="cv2" (under a dense router the only balance loss that '
                "evens out the gate weights)")
    if balance_loss is None:
        return 'set balance_loss ("switch", "cv2" or "aux_free")'
    return "raise balance_coef"


class AuxFreeBalancing(Callback):
    """DeepSeek-V3's auxiliary-loss-free load balancing.

    After every optimizer step, nudge each expert's selection bias by ``rate`` toward
    balance: ``b_e += rate * sign(mean_load - load_e)`` from the batch's routing counts
    (rows with zero sample weight not counted). The bias changes which experts are chosen,
    never the gate weights, so no gradient interferes with the task loss. The scores it
    biases are the router's softmax probabilities (DeepSeek-V3 biases sigmoid affinities;
    Wang et al. 2024 apply the rule to softmax gates as well).

    Parameters
    ----------
    rate : float
        Bias step per optimizer step (the estimators pass ``balance_coef``).
    """

    def __init__(self, rate: float = 1e-2):
        self.rate = rate

    def on_batch_end(self, net, batch=None, training=None, y_pred=None, **kwargs):
        """Nudge the router's selection biases from a training batch's routing counts.

        Parameters
        ----------
        net : skorch.NeuralNet
            The net being trained.
        batch : tuple of Tensor, optional
            The batch ``(X, y)``; not used.
        training : bool, optional
            Whether the batch is a training batch (False for a validation batch).
        y_pred : MoEOutput, optional
            The module's output on the batch (:class:`sklearn_moe.nn.MoEOutput`), whose
            ``expert_counts`` drive the update; nothing changes when it is None.
        **kwargs : dict
            The other arguments skorch passes to the hook; not used.
        """
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
        Share of training, in [0, 1), held at 1 by ``"flat_cosine"``; ignored by the other
        kinds.
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
