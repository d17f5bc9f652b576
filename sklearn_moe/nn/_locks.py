"""A process-wide lock that a forked child can take."""

from __future__ import annotations

import os
import threading


class ForkSafeLock:
    """A re-entrant lock (``with lock:``) made anew in a child process forked while another
    thread held it, which the child would otherwise wait for for ever (multiprocessing's
    "fork" start method forks so)."""

    def __init__(self):
        self._lock = threading.RLock()
        os.register_at_fork(after_in_child=self._renew)

    def _renew(self) -> None:
        self._lock = threading.RLock()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Take the lock, as ``threading.RLock.acquire``."""
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        """Release the lock, as ``threading.RLock.release``."""
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()
