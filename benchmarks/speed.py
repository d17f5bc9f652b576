"""Speed benchmarks, reported as ratios measured in one run.

``python -m benchmarks.speed --part experts``: the forward+backward time of one
:class:`~sklearn_moe.nn.MixtureOfExperts` training step at ``top_k=2`` over
``n_experts`` in {2, 4, ..., 128}, relative to ``n_experts=2``, and the router's share of it.
Sparse routing should make an extra expert cost little: the work per row grows with
``top_k``, not with ``n_experts``.

Timing protocol: every configuration is built first; then rounds of (one timed step per
configuration, in shuffled order) are repeated, and each configuration reports its median.
Interleaving spreads any slow spell of the machine over all configurations alike, so the
ratios are steadier than the absolute times. Results are printed and written as JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from sklearn_moe.nn import MixtureOfExperts

from .machine import describe_machine

RESULTS = Path(__file__).parent / "results"
EXPERT_COUNTS = (2, 4, 8, 16, 32, 64, 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(steps: dict, rounds: int, warmup: int, device: torch.device) -> dict:
    """Median seconds per call of each ``steps[name]()``, timed in shuffled rounds."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times = {name: [] for name in steps}
    order = list(steps)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def expert_scaling(batch_size: int = 1024, n_features: int = 32, expert_hidden: tuple[int, ...] = (128, 128),
                   top_k: int = 2, expert_counts=EXPERT_COUNTS, rounds: int = 30, device: str = "cpu") -> dict:
    """Forward+backward seconds of a MixtureOfExperts step, and of its router alone, per n_experts.

    The modules are freshly initialised (routing as uneven as at the start of training)
    and in training mode, with the Switch balance and z-loss terms in the loss.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, n_features, generator=generator).to(device)
    y = torch.randn(batch_size, 1, generator=generator).to(device)
    steps, router_steps, counts = {}, {}, {}
    for n_experts in expert_counts:
        torch.manual_seed(n_experts)
        module = MixtureOfExperts(n_features, 1, n_experts=n_experts, top_k=top_k,
                                  expert_hidden=expert_hidden).to(device).train()

        def step(module=module):
            out = module(x)
            loss = (out.output - y).square().mean() + 1e-2 * out.balance_loss + 1e-3 * out.z_loss
            loss.backward()

        def router_step(module=module):
            routing = module.router(x)
            (routing.weights.sum() + routing.probs.square().sum()).backward()

        steps[n_experts] = step
        router_steps[n_experts] = router_step
        counts[n_experts] = module(x).expert_counts.cpu()
    medians = _interleaved_medians({**{("moe", e): s for e, s in steps.items()},
                                    **{("router", e): s for e, s in router_steps.items()}},
                                   rounds=rounds, warmup=3, device=device)
    base = medians[("moe", expert_counts[0])]
    rows = []
    for n_experts in expert_counts:
        load = counts[n_experts].float()
        rows.append({
            "n_experts": n_experts,
            "step_ms": 1e3 * medians[("moe", n_experts)],
            "ratio_to_first": medians[("moe", n_experts)] / base,
            "router_ms": 1e3 * medians[("router", n_experts)],
            "busiest_expert_over_mean": float(load.max() / load.mean()),
        })
    return {
        "benchmark": "expert_scaling",
        "machine": describe_machine(),
        "device": str(device),
        "config": {"batch_size": batch_size, "n_features": n_features, "expert_hidden": list(expert_hidden),
                   "top_k": top_k, "rounds": rounds},
        "rows": rows,
    }


def _print_scaling(result: dict) -> None:
    config = result["config"]
    print(f"# MixtureOfExperts forward+backward, top_k={config['top_k']}, batch {config['batch_size']}, "
          f"{config['n_features']} features, expert_hidden={tuple(config['expert_hidden'])}, {result['device']}")
    print(f"# {result['machine']}")
    print("| n_experts | step (ms) | ratio to n_experts=2 | router alone (ms) | busiest expert / mean load |")
    print("|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['n_experts']} | {row['step_ms']:.2f} | {row['ratio_to_first']:.2f}x | "
              f"{row['router_ms']:.2f} | {row['busiest_expert_over_mean']:.2f} |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("experts",), default="experts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = expert_scaling(rounds=args.rounds, device=args.device)
    _print_scaling(result)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
    path = args.out / f"speed_experts{suffix}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
