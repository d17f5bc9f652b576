"""Fit a model data-parallel over the processes ``torchrun`` starts.

::

    torchrun --nproc-per-node 2 -m sklearn_moe.distributed.fit DATA.csv --target COL --out DIR \\
        [--task auto] [--seed 0] [--max-epochs N] [--param NAME=VALUE ...] [--expert-parallel]
        [--backend auto]

Every process reads the table (categorical columns and missing values are encoded inside
the model, as by ``sklearn-moe fit``), and the processes fit one model together
(:func:`~sklearn_moe.distributed.data_parallel`); rank 0 writes ``DIR/model.moe`` (the safe
format, loadable on any single machine with :func:`sklearn_moe.load`) and
``DIR/summary.json`` (the task, the processes, the epochs and the best validation loss).
``--expert-parallel`` also shards the experts over the processes (independent experts only:
``--param expert_type=independent``).

On several machines, start the same command on each with ``torchrun``'s rendezvous options
(``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``); the data file must be readable on
every machine. ``--backend auto`` is NCCL when CUDA is available, else gloo. ``--param``
sets any estimator parameter, as for ``sklearn-moe fit`` (``--param n_experts=16 --param
expert_hidden=[256,256] --param device=cuda``; :func:`sklearn_moe.cli.parse_params`).

Exit status: 0 on success, 2 for a bad command line, 3 for bad input (see
:mod:`sklearn_moe.cli`), 130 when interrupted (Ctrl-C; no model is written).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..cli import (
    EXIT_INPUT,
    MODEL_FILE,
    SUMMARY_FILE,
    InputError,
    add_csv_options,
    add_param_option,
    check_output_directory,
    csv_options,
    int_at_least,
    new_estimator,
    save_model,
    training_data,
)
from .data_parallel import data_parallel

__all__ = ["main"]


def fit(args) -> int:
    """Fit on every process, write the model on rank 0; returns the exit status.

    Parameters
    ----------
    args : argparse.Namespace
        The parsed command line.

    Returns
    -------
    int
        0 on success.
    """
    check_output_directory(Path(args.out))  # before the work, not after it
    X, y, task = training_data(args.data, args.target, args.task, csv_options(args))
    model = new_estimator(task, args)
    with data_parallel(expert_parallel=args.expert_parallel) as parallel:
        model.fit(X, y)
    if parallel.rank == 0:
        out = Path(args.out)
        history = model.history_
        best = float(history["valid_loss"].min()) if "valid_loss" in history else None
        save_model(model, out, args, task, X, y, world_size=parallel.world_size,
                   expert_parallel=parallel.expert_parallel, backend=dist.get_backend(),
                   epochs=int(model.n_iter_), best_valid_loss=best)
        print(f"{parallel.world_size} processes, {model.n_iter_} epochs, best validation loss {best}; "
              f"wrote {out / MODEL_FILE}, {out / SUMMARY_FILE}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun ... -m sklearn_moe.distributed.fit",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="CSV or parquet file")
    parser.add_argument("--target", required=True, help="the column to predict")
    parser.add_argument("--out", required=True, help="folder for model.moe and summary.json (rank 0)")
    parser.add_argument("--task", choices=["auto", "regression", "classification"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-epochs", type=int_at_least(1), default=None)
    add_param_option(parser)
    add_csv_options(parser)
    parser.add_argument("--expert-parallel", action="store_true",
                        help="also shard the experts over the processes (needs --param expert_type=independent)")
    parser.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    return parser


def main(argv=None) -> int:
    """Entry point under ``torchrun``; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The command line (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit status.
    """
    args = _parser().parse_args(argv)
    if "RANK" not in os.environ:
        print("sklearn_moe.distributed.fit: error: start it with torchrun (torchrun --nproc-per-node N -m "
              "sklearn_moe.distributed.fit ...)", file=sys.stderr)
        return 2
    backend = args.backend if args.backend != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":  # one GPU per process: device="cuda" is then this process's own
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    try:
        return fit(args)
    except (InputError, ValueError) as error:
        print(f"sklearn_moe.distributed.fit: error (rank {dist.get_rank()}): {' '.join(str(error).split())}",
              file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:  # Ctrl-C: torchrun passes it to every process; nothing is written
        print(f"sklearn_moe.distributed.fit: interrupted (rank {dist.get_rank()})", file=sys.stderr)
        return 130
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
