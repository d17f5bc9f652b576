"""Running a benchmark's work in several gloo processes on this machine.

:func:`run_ranks` starts ``world_size`` processes (``torch.multiprocessing.spawn``; the
rendezvous store listens on a port the system picks, held until the processes are done, so
that no other process can take it in between), initialises the default process group in
each, runs ``work(config)`` there and returns what every rank's call returned.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path

import torch

from .machine import describe_machine

TIMEOUT = timedelta(seconds=300)  # of the rendezvous and of every collective


def run_ranks(work, world_size: int, config: dict) -> list[dict]:
    """Run ``work(config)`` in ``world_size`` gloo processes.

    Parameters
    ----------
    work : callable
        A module-level function (it is pickled to the processes) of the configuration,
        returning a JSON-serialisable dict; it runs after ``init_process_group``, with
        ``config["threads"]`` torch threads.
    world_size : int
        Number of processes (ranks).
    config : dict
        JSON-serialisable; must hold ``threads``.

    Returns
    -------
    list of dict
        Every rank's result, in rank order: ``work``'s dict with ``rank``, and rank 0's
        with ``machine`` (:func:`~benchmarks.machine.describe_machine`).

    Raises
    ------
    RuntimeError
        If a rank failed (with its traceback).
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_rank, args=(work, store.port, world_size, config, out_dir), nprocs=world_size, join=True)
        except Exception as error:
            found = [Path(out_dir, f"rank{rank}.json") for rank in range(world_size)]
            tracebacks = [json.loads(path.read_text()).get("traceback", "") for path in found if path.exists()]
            raise RuntimeError("a rank failed:\n" + "\n".join(t for t in tracebacks if t)) from error
        return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world_size)]


def _rank(rank: int, work, port: int, world_size: int, config: dict, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(config["threads"])
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    result = {"rank": rank}
    try:
        if rank == 0:
            result["machine"] = describe_machine()
        result.update(work(config))
    except Exception:  # noqa: BLE001 - reported by the parent process
        result["traceback"] = traceback.format_exc()
        raise
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def ranks_parser(description: str, results: Path) -> argparse.ArgumentParser:
    """The command line's parser with the options every multi-process benchmark takes:
    ``--world-size``, ``--threads`` (per process) and ``--out`` (default ``results``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--out", type=Path, default=results, help="folder for the JSON and Markdown")
    return parser


def write_report(out: Path, name: str, json_text: str, report: str) -> None:
    """Print the Markdown ``report``; write it and ``json_text`` as ``out/name.md`` and
    ``out/name.json``."""
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json_text + "\n")
    (out / f"{name}.md").write_text(report)
    print(f"wrote {out / (name + '.json')} and {out / (name + '.md')}")
