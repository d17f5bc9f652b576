"""Training throughput on a large table: a sparse mixture against a dense MLP of the same
active size.

``python -m benchmarks.throughput`` trains, on ``--rows`` synthetic rows (default 1M, 32
features, held on the device), a :class:`~sklearn_moe.nn.MixtureOfExperts` of 64 experts
(two hidden layers of 128) routed top-2, and a plain ``torch.nn`` MLP of two equal hidden
layers whose width makes its parameter count match the mixture's *active* parameters (the
router's and two experts' weights and biases: what one row runs through). Both train with
the same fused AdamW, squared error (plus the mixture's Switch balance and z losses) and
shuffled batches, one epoch of full batches at a time, alternating between the models over
``--rounds`` rounds after a few warm-up steps each; each reports the median rows per second
of its epochs, for every batch size of ``--batch-sizes``. ``ratio`` is the mixture's rows/s
over the MLP's: sparse routing should let the mixture keep up with the dense network whose
per-row work it matches.

``--precision bf16`` runs the forwards under bfloat16 autocast; ``--graph`` (CUDA) replays
each step from a CUDA graph (every batch copied into fixed input buffers first), which the
mixture's training step allows because it never waits for the device. Results are printed
and written to ``benchmarks/results/throughput[_bf16][_graph][_cuda].json``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from sklearn_moe.cli import int_at_least
from sklearn_moe.nn import MixtureOfExperts

from .speed import RESULTS, _bf16, _sync, capture_graph, device_flags, device_result, save_result

N_FEATURES = 32
EXPERT_HIDDEN = (128, 128)
WARMUP_STEPS = 5
#: The batch sizes timed by default.
BATCH_SIZES = (1024, 8192, 65536)


def active_parameters(module: MixtureOfExperts) -> int:
    """Parameters one row runs through in a mixture of independent experts: the router's
    (its noise layer excepted, used in training only) and ``top_k`` experts' weights and
    biases."""
    router = sum(p.numel() for name, p in module.router.named_parameters() if not name.startswith("noise"))
    experts = module.experts
    per_expert = sum(layer.weight[0].numel() + layer.bias[0].numel() for layer in (*experts.hidden, experts.output))
    return int(router + module.top_k * per_expert)


def dense_width(n_features: int, n_outputs: int, n_parameters: int) -> int:
    """The width ``h`` of two hidden layers whose MLP has closest to ``n_parameters``
    parameters: ``(n_features + 1) h + (h + 1) h + (h + 1) n_outputs``."""
    a, b, c = 1, n_features + 2 + n_outputs, n_outputs - n_parameters
    root = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return min((math.floor(root), math.ceil(root)),
               key=lambda h: abs(mlp_parameters(n_features, n_outputs, h) - n_parameters))


def mlp_parameters(n_features: int, n_outputs: int, width: int) -> int:
    """Parameters of the two-hidden-layer MLP of :func:`dense_width`."""
    return (n_features + 1) * width + (width + 1) * width + (width + 1) * n_outputs


def _models(device: torch.device, n_experts: int, top_k: int):
    torch.manual_seed(0)
    moe = MixtureOfExperts(N_FEATURES, 1, n_experts=n_experts, top_k=top_k, expert_hidden=EXPERT_HIDDEN).to(device)
    width = dense_width(N_FEATURES, 1, active_parameters(moe))
    mlp = torch.nn.Sequential(torch.nn.Linear(N_FEATURES, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, 1)).to(device)
    return {"moe": moe.train(), "mlp": mlp.train()}, width


def _step(model, x, y, autocast: bool, graph: bool):
    """A full training step of ``model`` on ``(x, y)`` (a callable of no arguments)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graph)
    is_moe = isinstance(model, MixtureOfExperts)

    def full_step():
        model.zero_grad(set_to_none=True)
        with _bf16(x.device, autocast, cache=not graph):
            out = model(x)
        prediction = out.output if is_moe else out
        loss = (prediction.float() - y).square().mean()
        if is_moe:
            loss = loss + 1e-2 * out.balance_loss + 1e-3 * out.z_loss
        loss.backward()
        optimizer.step()

    if not graph:
        return full_step
    replay = capture_graph(full_step, model)
    if isinstance(replay, str):
        raise RuntimeError(f"the {type(model).__name__} step could not be captured in a CUDA graph: {replay}")
    return replay


def _epoch_seconds(step, x_batch, y_batch, X, Y, batch_size, generator) -> float:
    """Seconds of one shuffled epoch of full batches, each copied into ``x_batch, y_batch``
    and trained on by ``step()``."""
    _sync(X.device)
    start = time.perf_counter()
    order = torch.randperm(X.shape[0], device=X.device, generator=generator)
    for first in range(0, X.shape[0] - batch_size + 1, batch_size):
        rows = order[first:first + batch_size]
        torch.index_select(X, 0, rows, out=x_batch)
        torch.index_select(Y, 0, rows, out=y_batch)
        step()
    _sync(X.device)
    return time.perf_counter() - start


def throughput(n_rows: int = 1_000_000, batch_sizes=BATCH_SIZES, rounds: int = 3, device: str = "cpu",
               precision: str = "float32", graph: bool = False, n_experts: int = 64, top_k: int = 2) -> dict:
    """Training rows per second of the mixture and of the dense MLP, per batch size."""
    device = torch.device(device)
    if graph and device.type != "cuda":
        raise ValueError("--graph needs a CUDA device")
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(n_rows, N_FEATURES, generator=generator)
    Y = (X[:, :4].sin().sum(dim=1, keepdim=True) + 0.1 * torch.randn(n_rows, 1, generator=generator))
    X, Y = X.to(device), Y.to(device)
    shuffle = torch.Generator(device=device).manual_seed(0)
    rows = []
    for batch_size in batch_sizes:
        if batch_size > n_rows:
            continue
        models, width = _models(device, n_experts, top_k)
        x_batch, y_batch = X[:batch_size].clone(), Y[:batch_size].clone()
        steps = {name: _step(model, x_batch, y_batch, precision == "bf16", graph) for name, model in models.items()}
        for step in steps.values():
            for _ in range(WARMUP_STEPS):
                step()
        seconds = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                seconds[name].append(_epoch_seconds(step, x_batch, y_batch, X, Y, batch_size, shuffle))
        trained_rows = (n_rows // batch_size) * batch_size
        rate = {name: trained_rows / statistics.median(values) for name, values in seconds.items()}
        rows.append({"batch_size": batch_size, "moe_rows_per_s": rate["moe"], "mlp_rows_per_s": rate["mlp"],
                     "ratio": rate["moe"] / rate["mlp"], "mlp_width": width,
                     "moe_active_parameters": active_parameters(models["moe"]),
                     "mlp_parameters": mlp_parameters(N_FEATURES, 1, width),
                     "moe_parameters": sum(p.numel() for p in models["moe"].parameters()),
                     "epoch_seconds": {name: values for name, values in seconds.items()}})
    flags = "" if n_rows == 1_000_000 else f" --rows {n_rows}"
    flags += "" if tuple(batch_sizes) == BATCH_SIZES else " --batch-sizes " + " ".join(map(str, batch_sizes))
    flags += "" if rounds == 3 else f" --rounds {rounds}"
    config = {"n_rows": n_rows, "n_features": N_FEATURES, "n_experts": n_experts, "top_k": top_k,
              "expert_hidden": list(EXPERT_HIDDEN), "rounds": rounds, "precision": precision, "graph": graph}
    return device_result("throughput", "python -m benchmarks.throughput" + flags
                         + device_flags(device, precision, graph), device, config, rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int_at_least(1), default=1_000_000,
                        help="rows of the synthetic table (default 1,000,000)")
    parser.add_argument("--batch-sizes", type=int_at_least(1), nargs="+", default=list(BATCH_SIZES),
                        help="batch sizes timed; those above --rows are left out (default 1024 8192 65536)")
    parser.add_argument("--rounds", type=int_at_least(1), default=3, help="passes over the rows timed (default 3)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--precision", choices=("float32", "bf16"), default="float32",
                        help="bf16: bfloat16 autocast (default float32)")
    parser.add_argument("--graph", action="store_true", help="CUDA: replay every step from a CUDA graph")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="folder for the JSON result (default benchmarks/results, the committed results)")
    args = parser.parse_args(argv)
    too_large = [size for size in args.batch_sizes if size > args.rows]
    if len(too_large) == len(args.batch_sizes):
        parser.error(f"every one of --batch-sizes {too_large} exceeds --rows {args.rows}: no full batch to time")
    if too_large:
        print(f"note: batch size(s) {too_large} exceed --rows {args.rows} and are left out", file=sys.stderr)
    result = throughput(args.rows, tuple(args.batch_sizes), args.rounds, args.device, args.precision, args.graph)
    for row in result["rows"]:
        print(f"batch {row['batch_size']:>6}: mixture {row['moe_rows_per_s']:>12,.0f} rows/s, dense MLP (width "
              f"{row['mlp_width']}) {row['mlp_rows_per_s']:>12,.0f} rows/s, ratio {row['ratio']:.2f}")
    save_result(result, args.out, "throughput", args.device, "" if args.precision == "float32" else args.precision,
                "graph" if args.graph else "")
    return result


if __name__ == "__main__":
    main()
