"""Cross-validating a few variants of a model on the suite's data sets of one task, fold by
fold, and writing the per-fold CSV and a markdown report: the loop shared by
:mod:`benchmarks.uncertainty` and :mod:`benchmarks.class_mixing`."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from sklearn_moe.cli import int_at_least

from .accuracy import SUITES, _suite_data
from .datasets import DATASETS
from .machine import command_line, describe_machine


def run_variants(module: str, description: str, task: str | None, variants: Sequence[str], run_fold: Callable,
                 report: Callable, out: Path, argv=None, datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """Parse the command line, cross-validate every variant and write the results.

    Parameters
    ----------
    module : str
        The benchmark's module name (``benchmarks.<module>``); also the results' file stem.
    description : str
        The command line's help text.
    task : {"regression", "classification"} or None
        The suite's data sets of this task are the default ``--datasets`` (``None``: those
        named by ``datasets``).
    variants : sequence of str
    run_fold : callable
        ``run_fold(name, variant, X, y, train, test, seed)`` -> dict of scores for one fold;
        the dict's ``summary`` entry, a short text, is printed and not kept.
    report : callable
        ``report(frame, command, machine, folds, seed, max_rows)`` -> markdown text.
    out : Path
        Default output folder.
    argv : list of str, optional
    datasets : sequence of str, optional
        The default ``--datasets`` when ``task`` is None.

    Returns
    -------
    DataFrame
        One row per data set, fold and variant.
    """
    parser = argparse.ArgumentParser(description=description)
    default = list(datasets) if task is None else [d for d in SUITES["full"] if DATASETS[d].task == task]
    allowed = sorted(name for name, data in DATASETS.items() if task is None or data.task == task)
    parser.add_argument("--datasets", nargs="*", default=default, choices=allowed, metavar="DATASET",
                        help=f"data sets, from {allowed} (default {default})")
    parser.add_argument("--folds", type=int_at_least(2), default=3, help="CV folds (default 3)")
    parser.add_argument("--max-rows", type=int_at_least(1), default=2000,
                        help="larger data sets are subsampled to this many rows (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds, subsamples and models (default 0)")
    parser.add_argument("--out", type=Path, default=out, help=f"folder of the results (default {out}, the "
                        "committed results)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.datasets:
        X, y, splits = _suite_data(name, args.folds, 1, args.max_rows, args.seed)
        for fold, (train, test) in enumerate(splits):
            for variant in variants:
                row = run_fold(name, variant, X, y, train, test, args.seed)
                print(f"{name} fold {fold} {variant}: {row.pop('summary')}", flush=True)
                rows.append({**row, "fold": fold})
    frame = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / f"{module}.csv", index=False)
    command = command_line(module, argv)
    text = report(frame, command, describe_machine(), args.folds, args.seed, args.max_rows)
    (args.out / f"{module}.md").write_text(text)
    print(text)
    return frame
