"""Counting the kernels a piece of PyTorch code launches, on any device."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that make no kernel on a GPU besides the views: an allocation, a metadata change,
# a Python number wrapped as a tensor (on the host, as ``torch.where(mask, x, 0.0)`` does).
_NO_KERNEL = {aten._unsafe_view.default, aten.empty.memory_format, aten.empty_strided.default,
              aten.new_empty.default, aten.new_empty_strided.default,
              aten._reshape_alias.default, aten.scalar_tensor.default}


class KernelLaunchCounter(TorchDispatchMode):
    """Count the aten operators run inside ``with KernelLaunchCounter() as c`` that launch a
    kernel on a GPU (every operator but views, allocations and metadata changes; the
    backward pass's included; not the profiler's markers): ``c.launches``, and
    ``c.by_op``, a ``Counter`` by name.

    On a GPU a small training step is bound by its launches, eager (the host's time per
    operator) as much as replayed from a CUDA graph (a few microseconds per kernel), so
    their count is a machine-independent measure of the step's cost there, which a CPU
    run measures as well. (A composite kernel such as a radix sort may launch several.)
    """

    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view and func not in _NO_KERNEL:
            self.by_op[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launches(self) -> int:
        """Operators counted so far."""
        return sum(self.by_op.values())
