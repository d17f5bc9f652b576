"""The private skorch net that trains a :class:`~sklearn_moe.nn.MixtureOfExperts`."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from skorch import NeuralNet

from ._data import BatchIterator


class MoENet(NeuralNet):
    """skorch ``NeuralNet`` whose loss adds the weighted auxiliary routing losses.

    The criterion must use ``reduction="none"``: :meth:`get_loss` averages the per-row task
    loss itself, weighted by the batch's ``sample_weight`` (normalised by the estimator to
    mean 1 over the training set). The balance, z and diversity losses are added in training
    only, and recorded per batch as ``task_loss``, ``balance_loss``, ``z_loss`` (and
    ``diversity_loss``); validation loss is
    the task loss alone, so early stopping watches what the user cares about.

    Parameters
    ----------
    balance_coef : float
        Weight of ``MoEOutput.balance_loss``.
    z_loss_coef : float
        Weight of ``MoEOutput.z_loss``.
    diversity_coef : float
        Weight of ``MoEOutput.diversity_loss`` (recorded as ``diversity_loss`` when > 0).
    autocast_dtype : torch.dtype or None
        Run the module's forward under ``torch.autocast`` with this dtype (bf16 mixed
        precision); the router stays in float32 and losses are computed in float32.
    shuffle_generator : torch.Generator
        Source of the training-batch shuffling.
    **kwargs
        Passed to :class:`skorch.NeuralNet`.
    """

    def __init__(self, *args, balance_coef=0.0, z_loss_coef=0.0, diversity_coef=0.0, autocast_dtype=None,
                 shuffle_generator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast_dtype = autocast_dtype
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.diversity_coef = diversity_coef
        self.shuffle_generator = shuffle_generator

    def get_iterator(self, dataset, training=False):
        return BatchIterator(dataset, self.batch_size, shuffle=training, generator=self.shuffle_generator)

    def autocast(self, device: torch.device):
        """The mixed-precision context of the forward pass (a no-op in float32)."""
        device_type = torch.device(device).type
        return torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def get_loss(self, y_pred, y_true, X=None, training=False):
        per_row = self.criterion_(y_pred.output.float(), y_true)
        if per_row.ndim > 1:
            per_row = per_row.mean(dim=tuple(range(1, per_row.ndim)))
        sample_weight = X.get("sample_weight") if isinstance(X, Mapping) else None
        task_loss = per_row.mean() if sample_weight is None else (per_row * sample_weight).mean()
        if not training:
            return task_loss
        loss = task_loss + self.balance_coef * y_pred.balance_loss + self.z_loss_coef * y_pred.z_loss
        self.history.record_batch("task_loss", task_loss.item())
        self.history.record_batch("balance_loss", y_pred.balance_loss.item())
        self.history.record_batch("z_loss", y_pred.z_loss.item())
        if self.diversity_coef > 0:
            loss = loss + self.diversity_coef * y_pred.diversity_loss
            self.history.record_batch("diversity_loss", y_pred.diversity_loss.item())
        return loss

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
