"""Expert parallelism: bytes sent per training step against the rows x width lower bound.

``python -m benchmarks.expert_parallel [--world-size 2] [--batch 1024] [--n-experts 8 16]
[--top-k 1 2] [--steps 20] [--out benchmarks/results/expert_parallel]``

``world_size`` gloo processes on loopback (``torch.multiprocessing.spawn``; the rendezvous
store on a port the system picks) each build the same :class:`~sklearn_moe.nn.MixtureOfExperts` (same seed) and shard it
with :class:`~sklearn_moe.distributed.ExpertParallelMoE`. For every configuration
(``n_experts`` x ``top_k``) each rank trains on its own batches of
``batch`` random rows: forward, backward, :func:`~sklearn_moe.distributed.reduce_gradients`
and an AdamW step. Every step, each rank records what its
:class:`~sklearn_moe.distributed.CommStats` counted (per-expert counts, rows out, outputs
back, backward) and the kept (row, expert) assignments of its batch; from every rank's
assignments the parent process computes, independently of the counters, the lower bound
(:func:`lower_bound_bytes`).

The lower bound of rank ``r`` in one step is the rows x width bytes that must cross ranks
for the step's routing, at minimum: for every (row, chosen expert) assignment whose expert
lives on another rank, the row out (its input width ``d`` x itemsize) and its output back
(output width ``w`` x itemsize); in backward the same again for the gradients, the output
gradient out for every assignment the rank sent and, when the rows entering the experts
require gradients (an input embedding before them), the row gradient back for every
assignment it received. It is exactly what an ideal exchange sends without padding and
without count headers; the ratio measured / bound shows the overhead of the
implementation.

In the same run, in alternating rounds, each rank also times a full step of the
single-process module (all experts, the same per-rank batch) so that the two step times
are a ratio measured together. The ranks share the machine's cores: on a machine with as
many cores as ranks, that ratio is the cost of the exchanges and the split of the work, not
a scaling result. Results: ``expert_parallel.json`` and ``expert_parallel.md`` in
``--out``.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from .processes import ranks_parser, run_ranks, write_report

RESULTS = Path(__file__).parent / "results" / "expert_parallel"
COMMAND = "python -m benchmarks.expert_parallel"
COUNTER_FIELDS = ("count_bytes", "row_bytes", "output_bytes", "backward_bytes", "rows_sent", "rows_received")
BOUND_FIELDS = ("rows_out", "outputs_back", "backward")

LOWER_BOUND_DEFINITION = (
    "Lower bound of rank r in one step: for every (row, chosen expert) assignment of rank r's batch whose "
    "expert lives on another rank (a of them), the row out, d x s_in bytes, and later its output gradient "
    "out, w x s_out bytes; for every assignment of another rank's batch to one of rank r's experts (b of "
    "them), the output back, w x s_out bytes, and, when the rows entering the experts require gradients, "
    "the row gradient back, d x s_in bytes. bound = a*d*s_in + b*w*s_out + a*w*s_out "
    "[+ b*d*s_in]: the rows x width bytes an ideal exchange without padding or count headers sends "
    "(d, w: the experts' input and output widths; s_in, s_out: their itemsizes)."
)


# --- pure arithmetic ----------------------------------------------------------------------


def expert_owner(shards: list[tuple[int, int]]) -> list[int]:
    """The rank that holds each expert.

    Parameters
    ----------
    shards : list of (int, int)
        ``(start, stop)`` of every rank's block of experts, in rank order (as
        :func:`~sklearn_moe.distributed.expert_shards` returns them).

    Returns
    -------
    list of int
        Entry ``e`` is the rank that holds expert ``e``.
    """
    return [rank for rank, (start, stop) in enumerate(shards) for _ in range(start, stop)]


def lower_bound_bytes(counts: list[list[int]], shards: list[tuple[int, int]], rank: int, in_width: int,
                      out_width: int, in_itemsize: int = 4, out_itemsize: int = 4,
                      rows_need_grad: bool = False) -> dict:
    """The bytes rank ``rank`` must send to other ranks in one step, at minimum.

    Parameters
    ----------
    counts : list of list of int
        ``counts[q][e]``: the kept (row, expert) assignments of rank ``q``'s batch to
        expert ``e``, for every rank ``q``.
    shards : list of (int, int)
        ``(start, stop)`` of every rank's block of experts.
    rank : int
        The rank whose bytes are counted.
    in_width, out_width : int
        Width of the rows entering the experts (``d``) and of the experts' outputs (``w``).
    in_itemsize, out_itemsize : int, default=4
        Bytes per element of the rows and of the outputs.
    rows_need_grad : bool, default=False
        Whether the rows entering the experts require gradients (then the row gradients
        travel back in backward).

    Returns
    -------
    dict
        ``assignments_sent`` (``a``: this rank's assignments to other ranks' experts),
        ``assignments_received`` (``b``: other ranks' assignments to this rank's experts),
        ``rows_out`` (``a * d * s_in``), ``outputs_back`` (``b * w * s_out``), ``backward``
        (``a * w * s_out``, plus ``b * d * s_in`` when ``rows_need_grad``), ``forward``
        and ``total``.

    Raises
    ------
    ValueError
        If a rank's counts do not have one entry per expert, or ``rank`` is not a rank.
    """
    owner = expert_owner(shards)
    if not 0 <= rank < len(shards):
        raise ValueError(f"rank must be in [0, {len(shards)}), got {rank}")
    if any(len(row) != len(owner) for row in counts):
        raise ValueError(f"every rank's counts need one entry per expert ({len(owner)})")
    sent = sum(n for e, n in enumerate(counts[rank]) if owner[e] != rank)
    received = sum(n for q, row in enumerate(counts) if q != rank for e, n in enumerate(row) if owner[e] == rank)
    rows_out = sent * in_width * in_itemsize
    outputs_back = received * out_width * out_itemsize
    backward = sent * out_width * out_itemsize + (received * in_width * in_itemsize if rows_need_grad else 0)
    return {"assignments_sent": sent, "assignments_received": received, "rows_out": rows_out,
            "outputs_back": outputs_back, "backward": backward, "forward": rows_out + outputs_back,
            "total": rows_out + outputs_back + backward}


def expected_remote_share(shards: list[tuple[int, int]], rank: int) -> float:
    """The share of a rank's assignments that go to other ranks under balanced routing.

    Parameters
    ----------
    shards : list of (int, int)
        ``(start, stop)`` of every rank's block of experts.
    rank : int
        The rank.

    Returns
    -------
    float
        ``1 - e_r / E``, ``e_r`` the rank's experts of ``E``: ``(R - 1) / R`` when the
        experts divide evenly over the ``R`` ranks.
    """
    start, stop = shards[rank]
    return 1.0 - (stop - start) / shards[-1][1]


def summarize_rank(steps: list[dict], shards: list[tuple[int, int]], rank: int, in_width: int, out_width: int,
                   in_itemsize: int, out_itemsize: int, rows_need_grad: bool, batch: int, top_k: int) -> dict:
    """One rank's bytes over the measured steps, against the lower bound.

    Parameters
    ----------
    steps : list of dict
        One entry per step: ``counts`` (every rank's kept assignments per expert,
        ``counts[q][e]``), the :class:`~sklearn_moe.distributed.CommStats` fields of
        :data:`COUNTER_FIELDS` for this rank, and ``remote_row_ranks`` (distinct (row,
        remote rank) pairs of this rank's assignments).
    shards : list of (int, int)
        Every rank's block of experts.
    rank : int
        The rank summarised.
    in_width, out_width : int
        Width of the rows entering the experts and of their outputs.
    in_itemsize, out_itemsize : int
        Bytes per element of the rows and of the outputs.
    rows_need_grad : bool
        Whether the rows' gradients travel back (as in :func:`lower_bound_bytes`).
    batch : int
        Rows of the rank's batch.
    top_k : int
        Experts per row.

    Returns
    -------
    dict
        ``per_step`` (lists, one value per step, of the counters, ``total_bytes``, the
        bound's parts and ``lower_bound_bytes``), ``mean`` (their means per step),
        ``ratio`` (total bytes over the bound, summed over the steps), ``ratio_max`` (the
        largest per-step ratio), ``counters_match_bound`` (whether rows out, outputs back
        and backward each equal the bound's part on every step),
        ``remote_share_expected`` and ``remote_share_measured`` (assignments sent over
        ``batch * top_k``), and ``row_dedup_share`` (distinct (row, remote rank) pairs
        over assignments sent: what sending a row once per remote rank would keep of the
        rows out).
    """
    per_step = {name: [] for name in (*COUNTER_FIELDS, "total_bytes", *BOUND_FIELDS, "lower_bound_bytes",
                                      "remote_row_ranks")}
    for step in steps:
        bound = lower_bound_bytes(step["counts"], shards, rank, in_width, out_width, in_itemsize, out_itemsize,
                                  rows_need_grad)
        for name in COUNTER_FIELDS:
            per_step[name].append(step[name])
        per_step["total_bytes"].append(sum(step[name] for name in COUNTER_FIELDS[:4]))
        for name in BOUND_FIELDS:
            per_step[name].append(bound[name])
        per_step["lower_bound_bytes"].append(bound["total"])
        per_step["remote_row_ranks"].append(step["remote_row_ranks"])
    total, bound = sum(per_step["total_bytes"]), sum(per_step["lower_bound_bytes"])
    sent = sum(per_step["rows_sent"])
    matches = all(per_step[counter] == per_step[part] for counter, part in
                  (("row_bytes", "rows_out"), ("output_bytes", "outputs_back"), ("backward_bytes", "backward")))
    return {
        "rank": rank,
        "experts": list(shards[rank]),
        "per_step": per_step,
        "mean": {name: statistics.fmean(values) for name, values in per_step.items()},
        "ratio": total / bound if bound else float("nan"),
        "ratio_max": max((t / b for t, b in zip(per_step["total_bytes"], per_step["lower_bound_bytes"]) if b),
                         default=float("nan")),
        "counters_match_bound": matches,
        "remote_share_expected": expected_remote_share(shards, rank),
        "remote_share_measured": sent / (len(steps) * batch * top_k),
        "row_dedup_share": sum(per_step["remote_row_ranks"]) / sent if sent else float("nan"),
    }


def summarize_timing(ep_seconds: list[list[float]], single_seconds: list[list[float]], batch: int) -> dict:
    """Step times of the expert-parallel and single-process modules, as a ratio.

    A step's time is the slowest rank's (the exchanges make every rank wait for the
    others); each module reports the median over the steps. Each expert-parallel step ran
    right before a single-process step: the ratios of these pairs, which a slow spell of a
    shared machine touches alike, give the spread.

    Parameters
    ----------
    ep_seconds, single_seconds : list of list of float
        ``[rank][step]`` seconds of an expert-parallel and of a single-process training step.
    batch : int
        Rows of each rank's batch.

    Returns
    -------
    dict
        ``ep_step_ms``, ``single_step_ms``, ``ep_over_single`` (their ratio),
        ``ep_rows_per_s_per_rank`` and ``single_rows_per_s_per_rank`` (``batch`` over the
        step time), and ``pair_ratio_quartiles``: the first, second and third quartiles of
        the step pairs' ratios (all three the one ratio when there is one step).
    """
    ep_steps = [max(times) for times in zip(*ep_seconds)]
    single_steps = [max(times) for times in zip(*single_seconds)]
    ep, single = statistics.median(ep_steps), statistics.median(single_steps)
    pairs = [a / b for a, b in zip(ep_steps, single_steps)]
    quartiles = statistics.quantiles(pairs, n=4, method="inclusive") if len(pairs) > 1 else pairs * 3
    return {"ep_step_ms": 1e3 * ep, "single_step_ms": 1e3 * single, "ep_over_single": ep / single,
            "ep_rows_per_s_per_rank": batch / ep, "single_rows_per_s_per_rank": batch / single,
            "pair_ratio_quartiles": list(quartiles)}


def _gradient_note(result: dict) -> list[str]:
    need = {entry["rows_need_grad"] for entry in result["configs"]}
    if need == {False}:
        return ["The rows enter the experts as they are (no embedding before them) and carry no gradient: the "
                "backward bound is the output gradients alone, a x w x s_out, and no row gradient travels.", ""]
    return []


def _compact_json(result: dict) -> str:
    """JSON with one line per list of numbers (the per-step values)."""
    text = json.dumps(result, indent=1)
    return re.sub(r"\[\s*([-+0-9.eE,\s]+?)\s*\]",
                  lambda m: "[" + ", ".join(value.strip() for value in m.group(1).split(",")) + "]", text)


def _bytes(value: float) -> str:
    return f"{value:,.0f}"


def markdown_report(result: dict) -> str:
    """The report as Markdown: the command, the machine, the bound and two tables.

    Parameters
    ----------
    result : dict
        What :func:`run` returns.

    Returns
    -------
    str
        The Markdown text of ``expert_parallel.md``.
    """
    config = result["config"]
    world = config["world_size"]
    lines = [
        "# Expert parallelism: bytes per step",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']}.",
        "",
        f"{world} gloo processes on loopback, torch threads per process: {config['threads']}. Every rank holds its "
        f"block of the experts (`expert_shards`) and its own batch of {config['batch']} random rows of "
        f"{config['n_features']} features; `MixtureOfExperts(n_features={config['n_features']}, n_outputs=1, "
        f"router=\"topk\", expert_hidden={tuple(config['expert_hidden'])})`, float32, MSE + 0.01 x balance + "
        f"0.001 x z-loss, AdamW; a step is forward, backward, `reduce_gradients` and the optimizer step. "
        f"Per configuration: warm-up steps {config['warmup']}, then measured steps {config['steps']}.",
        "",
        "## Bytes sent per step and rank",
        "",
        LOWER_BOUND_DEFINITION,
        "",
        *_gradient_note(result),
        "Measured: the `CommStats` counters (counts, rows out, outputs back, backward), means per step. "
        "Remote share: the rank's assignments that go to other ranks' experts, expected under balanced routing "
        "(1 - e_r / E) and measured (this routing: freshly initialised, trained for the measured steps).",
        "",
        "| n_experts | top_k | rank | counts | rows out | outputs back | backward | total | "
        "lower bound | total / bound | remote share expected | measured |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in result["configs"]:
        for rank in entry["ranks"]:
            mean = rank["mean"]
            lines.append(
                f"| {entry['n_experts']} | {entry['top_k']} | {rank['rank']} | "
                f"{_bytes(mean['count_bytes'])} | {_bytes(mean['row_bytes'])} | {_bytes(mean['output_bytes'])} | "
                f"{_bytes(mean['backward_bytes'])} | {_bytes(mean['total_bytes'])} | "
                f"{_bytes(mean['lower_bound_bytes'])} | {rank['ratio']:.5f} | "
                f"{rank['remote_share_expected']:.3f} | {rank['remote_share_measured']:.3f} |")
    matched = all(rank["counters_match_bound"] for entry in result["configs"] for rank in entry["ranks"])
    worst = max(rank["ratio_max"] for entry in result["configs"] for rank in entry["ranks"])
    summary = ("On every step and rank the rows out, outputs back and backward bytes equal the bound's parts "
               "exactly: the only overhead is the per-expert counts, 8 bytes for each expert on another rank."
               if matched else
               "On some step the rows out, outputs back or backward bytes differ from the bound's parts (see the "
               "JSON).")
    summary += f" The largest per-step ratio is {worst:.5f}."
    dedup = [rank for entry in result["configs"] if entry["top_k"] > 1 for rank in entry["ranks"]]
    if dedup:
        share = statistics.fmean(rank["row_dedup_share"] for rank in dedup)
        summary += (f" With top_k > 1 a row that chose two experts on the same remote rank travels twice: sending "
                    f"each row once per remote rank would keep {share:.3f} of the rows-out bytes (mean over ranks "
                    f"and configurations), a per-row bound below this per-assignment one.")
    lines += [
        "",
        summary,
        "",
        "Not in the counters: `reduce_gradients` all-reduces the replicated gradients (here the router's) every "
        "step, "
        + ", ".join(f"{_bytes(entry['replicated_gradient_bytes'])} bytes of payload at {entry['n_experts']} experts"
                    for entry in result["configs"] if entry["top_k"] == result["configs"][0]["top_k"])
        + ", plus one int32 flag per replicated parameter.",
        "",
        "## Step time: expert-parallel against single-process",
        "",
        f"Each rank also trains a copy of the single-process module (all {config['n_experts'][0]}"
        + "".join(f"/{n}" for n in config["n_experts"][1:])
        + " experts) on the same per-rank batch; the two steps alternate, every step starts after a barrier, a "
        "step's time is its slowest rank's, medians over the measured steps; the quartiles are those of the "
        "ratios of each expert-parallel step to the single-process step right after it. "
        f"The {world} processes share the machine's cores, so this is the cost of the exchanges and of the "
        "split work, not a scaling result.",
        "",
        "| n_experts | top_k | expert-parallel step (ms) | single-process step (ms) | "
        "expert-parallel / single | step pairs' ratio, quartiles | rows/s per rank, expert-parallel | "
        "rows/s per rank, single |",
        "|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for entry in result["configs"]:
        timing = entry["timing"]
        quartiles = " / ".join(f"{q:.2f}x" for q in timing["pair_ratio_quartiles"])
        lines.append(
            f"| {entry['n_experts']} | {entry['top_k']} | "
            f"{timing['ep_step_ms']:.2f} | {timing['single_step_ms']:.2f} | {timing['ep_over_single']:.2f}x | "
            f"{quartiles} | "
            f"{timing['ep_rows_per_s_per_rank']:,.0f} | {timing['single_rows_per_s_per_rank']:,.0f} |")
    return "\n".join(lines) + "\n"


# --- the distributed run ------------------------------------------------------------------


def _loss(out, y):
    return (out.output - y).square().mean() + 1e-2 * out.balance_loss + 1e-3 * out.z_loss


def _run_config(config: dict, n_experts: int, top_k: int, index: int) -> dict:
    """One rank's steps of one configuration: counters, routing and times."""
    import torch.distributed as dist

    from sklearn_moe.distributed import ExpertParallelMoE, reduce_gradients
    from sklearn_moe.nn import MixtureOfExperts

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config["seed"] + index)  # the same module on every rank
    single = MixtureOfExperts(config["n_features"], 1, n_experts=n_experts, top_k=top_k, router="topk",
                              expert_hidden=tuple(config["expert_hidden"])).train()
    parallel = ExpertParallelMoE.from_module(single).train()
    reference = copy.deepcopy(single)
    ep_optimizer = torch.optim.AdamW(parallel.parameters(), lr=config["lr"])
    single_optimizer = torch.optim.AdamW(reference.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(10_000 * (index + 1) + rank)  # each rank its own batches
    batches = [(torch.randn(config["batch"], config["n_features"], generator=generator),
                torch.randn(config["batch"], 1, generator=generator)) for _ in range(config["n_batches"])]
    shards = parallel.experts.shards
    owner = torch.tensor(expert_owner(shards))
    stats = parallel.comm_stats

    def ep_step(x, y):
        ep_optimizer.zero_grad(set_to_none=True)
        stats.reset()
        out = parallel(x)
        _loss(out, y).backward()
        counted = {name: getattr(stats, name) for name in COUNTER_FIELDS}  # reduce_gradients is not counted
        reduce_gradients(parallel, "mean")
        ep_optimizer.step()
        return counted, out.assignments

    def bookkeeping(counted, assignments):
        experts, rows = assignments.experts.detach(), assignments.rows.detach()
        remote = owner[experts] != rank
        pairs = rows[remote] * world + owner[experts][remote]
        return {**counted, "local_counts": torch.bincount(experts, minlength=n_experts).tolist(),
                "remote_row_ranks": int(torch.unique(pairs).numel())}

    def single_step(x, y):
        single_optimizer.zero_grad(set_to_none=True)
        _loss(reference(x), y).backward()
        single_optimizer.step()

    records, ep_seconds, single_seconds = [], [], []
    for step in range(config["warmup"] + config["steps"]):
        x, y = batches[step % len(batches)]
        dist.barrier()
        start = time.perf_counter()
        counted, assignments = ep_step(x, y)
        ep_time = time.perf_counter() - start
        record = bookkeeping(counted, assignments)
        dist.barrier()
        start = time.perf_counter()
        single_step(x, y)
        single_time = time.perf_counter() - start
        if step >= config["warmup"]:
            records.append(record)
            ep_seconds.append(ep_time)
            single_seconds.append(single_time)
    own = {id(p) for p in parallel.experts.parameters()}
    replicated = sum(p.numel() * p.element_size() for p in parallel.parameters()
                     if p.requires_grad and id(p) not in own)
    return {
        "shards": [list(block) for block in shards],
        "in_width": parallel.experts.in_features,
        "out_width": parallel.experts.out_features,
        # float32 rows, and outputs in the rows' dtype (no autocast)
        "in_itemsize": batches[0][0].element_size(),
        "out_itemsize": batches[0][0].element_size(),
        # the rows entering the experts carry a gradient when a trainable embedding comes first
        "rows_need_grad": parallel.embedding is not None or parallel.category_embedding is not None,
        "replicated_gradient_bytes": replicated,
        "records": records,
        "ep_seconds": ep_seconds,
        "single_seconds": single_seconds,
    }


def _all_configs(config: dict) -> dict:
    """One rank's part of the run: every configuration."""
    return {"configs": [_run_config(config, n_experts, top_k, index)
                        for index, (n_experts, top_k) in enumerate(_configurations(config))]}


def _configurations(config: dict) -> list[tuple[int, int]]:
    return [(n_experts, top_k) for n_experts in config["n_experts"] for top_k in config["top_k"]]


def _combine(config: dict, per_rank: list[dict]) -> list[dict]:
    """The configurations' reports from every rank's records."""
    entries = []
    for index, (n_experts, top_k) in enumerate(_configurations(config)):
        parts = [found["configs"][index] for found in per_rank]
        first = parts[0]
        shards = [tuple(block) for block in first["shards"]]
        n_steps = len(first["records"])
        ranks = []
        for rank, part in enumerate(parts):
            steps = []
            for step in range(n_steps):
                record = dict(part["records"][step])
                record["counts"] = [other["records"][step]["local_counts"] for other in parts]
                steps.append(record)
            ranks.append(summarize_rank(steps, shards, rank, first["in_width"], first["out_width"],
                                        first["in_itemsize"], first["out_itemsize"], first["rows_need_grad"],
                                        config["batch"], top_k))
        entries.append({
            "n_experts": n_experts, "top_k": top_k,
            "shards": first["shards"], "in_width": first["in_width"], "out_width": first["out_width"],
            "in_itemsize": first["in_itemsize"], "out_itemsize": first["out_itemsize"],
            "rows_need_grad": first["rows_need_grad"], "replicated_gradient_bytes": first["replicated_gradient_bytes"],
            "ranks": ranks,
            "timing": summarize_timing([p["ep_seconds"] for p in parts], [p["single_seconds"] for p in parts],
                                       config["batch"]),
        })
    return entries


def run(world_size: int = 2, batch: int = 1024, n_experts=(8, 16), top_k=(1, 2), steps: int = 20, warmup: int = 3,
        n_features: int = 32, expert_hidden=(128,), n_batches: int = 4, threads: int = 1,
        lr: float = 1e-3, seed: int = 0, command: str = COMMAND) -> dict:
    """Run the benchmark in ``world_size`` gloo processes and collect the report.

    Parameters
    ----------
    world_size : int, default=2
        Number of processes (ranks).
    batch : int, default=1024
        Rows of each rank's batch.
    n_experts, top_k : sequence of int
        The configurations: every ``n_experts`` with every ``top_k``.
    steps : int, default=20
        Measured training steps per configuration.
    warmup : int, default=3
        Untimed, unrecorded steps before them.
    n_features : int, default=32
        Input columns.
    expert_hidden : sequence of int, default=(128,)
        The experts' hidden layers.
    n_batches : int, default=4
        Random batches per rank, cycled through.
    threads : int, default=1
        Torch threads per process.
    lr : float, default=1e-3
        AdamW learning rate.
    seed : int, default=0
        Seed of the modules' initialisation.
    command : str
        The command line recorded in the report.

    Returns
    -------
    dict
        ``benchmark``, ``command``, ``machine``, ``config``, ``lower_bound`` (its
        definition) and ``configs`` (one entry per configuration: widths, shards, ``ranks``
        from :func:`summarize_rank` and ``timing`` from :func:`summarize_timing`).

    Raises
    ------
    RuntimeError
        If a rank failed (with its traceback).
    """
    config = {"world_size": world_size, "batch": batch, "n_experts": list(n_experts), "top_k": list(top_k),
              "steps": steps, "warmup": warmup, "n_features": n_features, "expert_hidden": list(expert_hidden),
              "n_batches": n_batches, "threads": threads, "lr": lr, "seed": seed}
    per_rank = run_ranks(_all_configs, world_size, config)
    return {
        "benchmark": "expert_parallel",
        "command": command,
        "machine": per_rank[0]["machine"],
        "config": config,
        "lower_bound": LOWER_BOUND_DEFINITION,
        "configs": _combine(config, per_rank),
    }


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
    parser.add_argument("--batch", type=int, default=1024, help="rows of each rank's batch")
    parser.add_argument("--n-experts", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=20, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--n-features", type=int, default=32)
    parser.add_argument("--expert-hidden", type=int, nargs="+", default=[128])
    args = parser.parse_args(argv)
    result = run(world_size=args.world_size, batch=args.batch, n_experts=args.n_experts, top_k=args.top_k,
                 steps=args.steps, warmup=args.warmup, n_features=args.n_features,
                 expert_hidden=args.expert_hidden, threads=args.threads,
                 command=" ".join([COMMAND, *argv]))
    write_report(args.out, "expert_parallel", _compact_json(result), markdown_report(result))
    return result


if __name__ == "__main__":
    main()
