"""Warnings said of the user's line: the first frame outside this package, skorch and torch."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

import skorch
import torch

_LIBRARY_FOLDERS = tuple(os.path.dirname(os.path.abspath(path)) + os.sep
                         for path in (__file__, skorch.__file__, torch.__file__))


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)``, attributed to the first calling frame outside
    sklearn-moe, skorch and torch: the user's line that called ``fit``, ``predict`` or the
    like, however deep in the training loop the warning arises (a fixed ``stacklevel``
    would name skorch's or this package's code from a callback)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (frame.f_code.co_filename.startswith(_LIBRARY_FOLDERS)
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
