"""Where the engine may read device data on the host, and where it must not.

On the CPU reading a tensor's value (``int(t)``, ``t.tolist()``, a boolean mask's row
count) costs nothing. On a GPU each such read makes the host wait until the device has run
everything queued before it, so the host can no longer queue kernels ahead of the device,
and a step with one cannot be captured in a CUDA graph. In training on any device but the
CPU the engine therefore takes paths that keep every size on the device (see the module
docstrings of :mod:`.dispatch`, :mod:`.layouts` and :mod:`.moe`); evaluation reads sizes
where that is simpler, a prediction ends with a copy to the host anyway.

:func:`sync_free_paths` makes the CPU take those paths too, so that tests can check them
(numerically, and with a detector of host reads) on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch

_forced = False


def avoid_host_reads(device: torch.device, training: bool) -> bool:
    """Whether a training forward on ``device`` must keep every size on the device.

    Parameters
    ----------
    device : torch.device
        Where the batch lives.
    training : bool
        Whether the module is in training mode (evaluation reads sizes freely).

    Returns
    -------
    bool
        True in training on any device but the CPU (and on the CPU inside
        :func:`sync_free_paths`).
    """
    return training and (device.type != "cpu" or _forced)


@contextlib.contextmanager
def sync_free_paths():
    """Take the GPU's host-read-free training paths on the CPU as well (for tests)."""
    global _forced
    previous, _forced = _forced, True
    try:
        yield
    finally:
        _forced = previous


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs its fused kernel here, without reading the group
    offsets on the host.

    PyTorch's CUDA implementation (``_grouped_mm_cuda`` in
    ``aten/src/ATen/native/cuda/GroupedBlas.cpp``) takes its CUTLASS kernel only for
    bfloat16 operands and output on devices of compute capability 9.0 or 10.0; anywhere
    else it falls back to a loop over the groups that copies the offsets to the host.

    Parameters
    ----------
    device : torch.device
        Where the experts run.
    dtype : torch.dtype
        The dtype the products run in (the autocast dtype under autocast).

    Returns
    -------
    bool
    """
    if dtype != torch.bfloat16 or device.type != "cuda" or not hasattr(torch, "_grouped_mm"):
        return False
    return _major_capability(torch.cuda.current_device() if device.index is None else device.index) in (9, 10)


@functools.cache
def _major_capability(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype that matrix products of ``x`` run in: the autocast dtype where autocast
    is on for its device, else ``x.dtype``."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype
