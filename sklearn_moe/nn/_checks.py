"""Argument checks shared by the engine and the estimators (no scikit-learn here)."""

from __future__ import annotations

from numbers import Integral


def check_int(name: str, value, minimum: int = 1):
    """``value``, checked to be an int (not a bool) of at least ``minimum``; a ValueError
    naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        kind = {0: "a non-negative int", 1: "a positive int"}.get(minimum, f"an int of at least {minimum}")
        raise ValueError(f"{name} must be {kind}; got {value!r}.")
    return value
