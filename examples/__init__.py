"""Runnable examples (``python -m examples.NAME``); sphinx-gallery builds the documentation's gallery from them."""

from pathlib import Path

# Where the examples write their figures by default. sphinx-gallery runs each example as a
# script without ``__file__``, so the examples take this path from the package.
FIGURES = Path(__file__).resolve().parent / "figures"
