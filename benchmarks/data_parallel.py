"""Data-parallel fits: the validation pass with the validation rows shared out or whole.

``python -m benchmarks.data_parallel [--world-size 2] [--rows 40000]
[--validation-fraction 0.2] [--epochs 5] [--repeats 3] [--out benchmarks/results/data_parallel]``

``world_size`` gloo processes on loopback (:func:`~benchmarks.processes.run_ranks`) fit the
default :class:`~sklearn_moe.MoERegressor` on the same ``rows`` rows of Friedman's first
function inside :func:`~sklearn_moe.distributed.data_parallel`, for ``epochs`` epochs
without early stopping, two ways in alternation, ``repeats`` times each:

- ``shared_out``: as a plain fit does, each process evaluates its share of the validation
  rows (:mod:`sklearn_moe.distributed.validation`);
- ``whole``: with a callback of the user's own (one that does nothing), which makes every
  process evaluate the whole validation set.

Every process times its training and validation passes (skorch's loop over an epoch's
batches, whole), per epoch. The report gives rank 0's medians over the repeats of the mean
per epoch, the validation rows each process evaluated, and the last epoch's ``valid_loss``
(the same mean over every validation row both ways, up to rounding). The processes share
the machine's cores: on a machine with as many cores as processes, the training pass is
what one process of such a fit spends, not a scaling result. Results:
``data_parallel.json`` and ``data_parallel.md`` in ``--out``.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

from .processes import ranks_parser, run_ranks, write_report

RESULTS = Path(__file__).parent / "results" / "data_parallel"
COMMAND = "python -m benchmarks.data_parallel"
VARIANTS = ("shared_out", "whole")


@contextlib.contextmanager
def timed_passes(seconds: dict):
    """Add the seconds of every pass over an epoch's batches of a fit (training and
    validation, skorch's ``run_single_epoch``) to ``seconds[prefix]`` inside the block."""
    from sklearn_moe._net import MoENet

    original = MoENet.run_single_epoch

    def run_single_epoch(net, iterator, training, prefix, step_fn, **fit_params):
        start = time.perf_counter()
        try:
            return original(net, iterator, training, prefix, step_fn, **fit_params)
        finally:
            seconds[prefix] = seconds.get(prefix, 0.0) + time.perf_counter() - start

    MoENet.run_single_epoch = run_single_epoch
    try:
        yield seconds
    finally:
        MoENet.run_single_epoch = original


def _fits(config: dict) -> dict:
    """One rank's part: the fits of both variants, alternating, with their pass times."""
    from sklearn.datasets import make_friedman1
    from skorch.callbacks import Callback

    from sklearn_moe import MoERegressor
    from sklearn_moe.distributed import data_parallel

    X, y = make_friedman1(config["rows"], noise=0.3, random_state=0)
    epochs = config["epochs"]
    runs = {variant: [] for variant in VARIANTS}
    with data_parallel():
        for repeat in range(config["repeats"]):
            order = VARIANTS if repeat % 2 == 0 else VARIANTS[::-1]
            for variant in order:
                callbacks = [("whole_validation", Callback())] if variant == "whole" else None
                model = MoERegressor(random_state=0, max_epochs=epochs, n_iter_no_change=epochs + 1,
                                     validation_fraction=config["validation_fraction"], callbacks=callbacks)
                with timed_passes({}) as seconds:
                    model.fit(X, y)
                history = model.net_.history
                runs[variant].append({
                    "train_s_per_epoch": seconds["train"] / len(history),
                    "valid_s_per_epoch": seconds["valid"] / len(history),
                    "valid_rows": sum(b["valid_batch_size"] for b in history[0]["batches"] if "valid_batch_size" in b),
                    "valid_loss": history[-1]["valid_loss"],
                })
    return {"runs": runs}


def summarize(runs: dict) -> dict:
    """Medians over the repeats, per variant, and the validation pass's ratio.

    Parameters
    ----------
    runs : dict
        ``{variant: [run, ...]}`` of one rank, each run with ``train_s_per_epoch``,
        ``valid_s_per_epoch``, ``valid_rows`` and ``valid_loss``.

    Returns
    -------
    dict
        ``{variant: medians}`` and ``valid_pass_shared_over_whole`` (the ratio of the
        validation passes' medians).
    """
    summary = {variant: {key: statistics.median(run[key] for run in variant_runs) for key in variant_runs[0]}
               for variant, variant_runs in runs.items()}
    summary["valid_pass_shared_over_whole"] = (summary["shared_out"]["valid_s_per_epoch"]
                                               / summary["whole"]["valid_s_per_epoch"])
    return summary


def run(world_size: int = 2, rows: int = 40000, validation_fraction: float = 0.2, epochs: int = 5, repeats: int = 3,
        threads: int = 1, command: str = COMMAND) -> dict:
    """Run the benchmark in ``world_size`` gloo processes and collect the report.

    Parameters
    ----------
    world_size : int, default=2
        Number of processes.
    rows : int, default=40000
        Rows of the data set (training and validation).
    validation_fraction : float, default=0.2
        The estimators' ``validation_fraction``.
    epochs : int, default=5
        Epochs of every fit.
    repeats : int, default=3
        Fits of each variant.
    threads : int, default=1
        Torch threads per process.
    command : str
        The command line recorded in the report.

    Returns
    -------
    dict
        ``benchmark``, ``command``, ``machine``, ``config``, ``runs`` (rank 0's) and
        ``summary`` (:func:`summarize`).
    """
    config = {"world_size": world_size, "rows": rows, "validation_fraction": validation_fraction, "epochs": epochs,
              "repeats": repeats, "threads": threads}
    per_rank = run_ranks(_fits, world_size, config)
    runs = per_rank[0]["runs"]
    return {"benchmark": "data_parallel", "command": command, "machine": per_rank[0]["machine"], "config": config,
            "runs": runs, "summary": summarize(runs)}


def markdown_report(result: dict) -> str:
    """The report of :func:`run` as Markdown."""
    config, summary = result["config"], result["summary"]
    lines = [
        "# Data-parallel fits: the validation pass, shared out or whole", "",
        f"Command: `{result['command']}`. Machine: {result['machine']}.", "",
        f"{config['world_size']} gloo processes, {config['threads']} torch thread(s) each, fit the default "
        f"`MoERegressor` on {config['rows']:,} rows of Friedman's first function (validation_fraction "
        f"{config['validation_fraction']}) for {config['epochs']} epochs, {config['repeats']} times each way, "
        "alternating. Rank 0's medians over the fits of the mean seconds per epoch:", "",
        "| validation rows | per process | training pass (s) | validation pass (s) | last valid_loss |",
        "|---|---:|---:|---:|---:|",
    ]
    labels = {"shared_out": "shared out (a plain fit)", "whole": "whole on every process (a callback of one's own)"}
    for variant in VARIANTS:
        row = summary[variant]
        lines.append(f"| {labels[variant]} | {row['valid_rows']:,.0f} | {row['train_s_per_epoch']:.3f} | "
                     f"{row['valid_s_per_epoch']:.3f} | {row['valid_loss']:.6f} |")
    lines += ["", f"Validation pass, shared out over whole: {summary['valid_pass_shared_over_whole']:.2f}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Command line: run, print the Markdown report, write the JSON and Markdown.

    Parameters
    ----------
    argv : list of str, optional
        The arguments; ``sys.argv[1:]`` when None.

    Returns
    -------
    dict
        What :func:`run` returns.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = ranks_parser(__doc__.split("\n\n")[0], RESULTS)
    parser.add_argument("--rows", type=int, default=40000)
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    result = run(world_size=args.world_size, rows=args.rows, validation_fraction=args.validation_fraction,
                 epochs=args.epochs, repeats=args.repeats, threads=args.threads, command=" ".join([COMMAND, *argv]))
    write_report(args.out, "data_parallel", json.dumps(result, indent=1), markdown_report(result))
    return result


if __name__ == "__main__":
    main()
