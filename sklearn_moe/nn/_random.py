"""The generator of a training run's random draws (dropout, router noise and jitter, expert
dropout, expert subsampling), per thread.

torch's default generators are one per process (and device): fits running at once in
threads (joblib's threading backend, Optuna's ``n_jobs``) would draw from the same one, in
an order that changes from run to run. Inside ``with drawing_from(generator):`` the
engine's training draws in this thread take ``generator`` instead; outside, they take
torch's default one, as plain PyTorch code does.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()


@contextlib.contextmanager
def drawing_from(generator: torch.Generator | None):
    """Within the block, this thread's training draws take ``generator`` (on the device the
    training runs on); ``None``: torch's default generator."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = previous


def draw_generator() -> torch.Generator | None:
    """The generator this thread's training draws take (``None``: torch's default one)."""
    return getattr(_local, "generator", None)
