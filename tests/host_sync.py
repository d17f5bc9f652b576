"""A CPU-runnable detector of host synchronisations: the operations that, were the tensors on
a CUDA device, would make the host wait for the device (a device-to-host read, or an output
whose size depends on the device's data).

On the CPU nothing waits, so these operations go unnoticed; on a GPU each one stalls the
host until the device has caught up, and a training step with one cannot be captured in a
CUDA graph. :class:`HostSyncDetector` records them while a piece of code runs on CPU
tensors, each with the line of project code that caused it, through two PyTorch hooks:

- a :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten operator, the
  backward pass's included: ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``,
  ``float(t)``, a tensor in an ``if``), ``nonzero`` (``torch.where(cond)``), ``unique``,
  ``masked_select``, indexing with a boolean mask, ``repeat_interleave`` with tensor
  repeats and no ``output_size``, ``bincount`` (CUDA sizes its output by the largest value,
  read on the host, whatever ``minlength`` is), ``equal``, ``is_nonzero``;
- a :class:`~torch.overrides.TorchFunctionMode` sees the copies to the host that the
  dispatcher never does for CPU tensors: ``.tolist()``, ``.numpy()``, ``.cpu()``,
  ``.to("cpu")`` (unless PyTorch's own code calls it: in a CPU run that is a move to the
  tensors' own device), and tensors made from host data (``torch.tensor``,
  ``torch.as_tensor``, ``torch.from_numpy``), whose blocking copy to a GPU waits for it;

and ``torch.cuda.synchronize`` is replaced by a recorder while the detector is active.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from collections import Counter
from typing import NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: aten operators that read device data on the host (or size their output by it) on CUDA.
SYNCING_OPS = {
    aten._local_scalar_dense.default: "_local_scalar_dense",
    aten.nonzero.default: "nonzero",
    aten.nonzero_numpy.default: "nonzero",
    aten.argwhere.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
    aten.unique_dim_consecutive.default: "unique",
    aten.bincount.default: "bincount",
    aten.equal.default: "equal",
    aten.is_nonzero.default: "is_nonzero",
}
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_HOST_COPIES = {"tolist", "numpy", "cpu", "__array__"}
# Tensors made from host data: on a GPU their copy to the device (from pageable memory, not
# non-blocking) waits for the device.
_FROM_HOST_DATA = {"tensor", "as_tensor", "asarray", "from_numpy"}
# Frames of these files are PyTorch's own; the reported location is the first frame outside.
_LIBRARY_PARTS = ("/torch/", "/host_sync.py", "/contextlib.py", "/functools.py")


class HostSync(NamedTuple):
    """One recorded synchronisation: the operation and the code that caused it."""

    op: str
    where: str  # "path/file.py:line in function", the innermost frame outside PyTorch
    stack: tuple[str, ...]  # every frame outside PyTorch, outermost first


def _is_mask(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _location(stack) -> tuple[str, tuple[str, ...]]:
    frames = [f for f in stack if not any(part in f.filename for part in _LIBRARY_PARTS)]
    described = tuple(f"{_short(f.filename)}:{f.lineno} in {f.name}" for f in frames)
    return (described[-1] if described else "?"), described


def _short(filename: str) -> str:
    for root in ("sklearn_moe/", "tests/", "benchmarks/", "skorch/"):
        at = filename.rfind(root)
        if at >= 0:
            return filename[at:]
    return filename


class _Dispatch(TorchDispatchMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = SYNCING_OPS.get(func)
        if name is None and func in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(_is_mask(index) for index in indices):
                name = "boolean_mask_index"
        if name is None and func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            name = "repeat_interleave"
        if name is not None:
            self.record(name)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, record):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_COPIES:
            self.record(name)
        elif name == "to" and _to_host(args, kwargs) and not _called_from_torch():
            self.record("to_cpu")
        elif name in _FROM_HOST_DATA and not _called_from_torch():
            self.record("tensor_from_host_data")
        return func(*args, **kwargs)


def _called_from_torch() -> bool:
    """Whether the ``.to`` call came from PyTorch's own code: there a move to the CPU in a
    CPU run is a move to the tensors' own device (as ``clip_grad_norm_`` gathers the norms
    onto the first gradient's device), not a copy to the host."""
    frame = sys._getframe(2)  # the caller of __torch_function__'s caller
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame is not None and "/torch/" in frame.f_code.co_filename


def _to_host(args, kwargs) -> bool:
    targets = [*args[1:], kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


class HostSyncDetector(contextlib.AbstractContextManager):
    """Record the host synchronisations of the code run inside ``with HostSyncDetector() as d``.

    Attributes
    ----------
    syncs : list of HostSync
        In the order they happened.
    """

    def __init__(self):
        self.syncs: list[HostSync] = []
        self._stack = contextlib.ExitStack()

    def _record(self, op: str) -> None:
        where, stack = _location(traceback.extract_stack()[:-2])
        self.syncs.append(HostSync(op, where, stack))

    def __enter__(self):
        original = torch.cuda.synchronize

        def synchronize(*args, **kwargs):
            self._record("cuda_synchronize")
            if torch.cuda.is_available():
                original(*args, **kwargs)

        self._stack.enter_context(_patched(torch.cuda, "synchronize", synchronize))
        self._stack.enter_context(_Function(self._record))
        self._stack.enter_context(_Dispatch(self._record))
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def summary(self) -> Counter:
        """``Counter`` of ``(op, where)``: how often each operation ran at each line."""
        return Counter((s.op, s.where) for s in self.syncs)

    def report(self) -> str:
        """One line per distinct ``(op, where)``, with its count and the calling frames."""
        lines = []
        for (op, where), count in sorted(self.summary().items()):
            stack = next(s.stack for s in self.syncs if (s.op, s.where) == (op, where))
            lines.append(f"{count:4d} x {op:22s} {where}\n" + "".join(f"         <- {f}\n" for f in stack[-4:-1][::-1]))
        return "".join(lines) or "no host synchronisation\n"


@contextlib.contextmanager
def _patched(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)

