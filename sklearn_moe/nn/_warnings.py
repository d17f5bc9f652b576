"""Ignoring a warning for a block of code, safely when threads run such blocks at once."""

from __future__ import annotations

import contextlib
import warnings

from ._locks import ForkSafeLock

# warnings.catch_warnings saves the process-wide filters on entry and puts them back on
# exit: two such blocks overlapping in two threads can leave the first's filter in place
# for good (silencing that warning for the whole process). One block at a time cannot.
_FILTERS_LOCK = ForkSafeLock()


@contextlib.contextmanager
def ignoring_warnings(message: str = "", category: type[Warning] = Warning):
    """Inside the block, warnings of ``category`` whose text matches the regular expression
    ``message`` are ignored; the filters are as before afterwards, also with threads."""
    with _FILTERS_LOCK, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=message, category=category)
        yield
