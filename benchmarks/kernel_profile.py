"""Where a training step's time goes, kernel by kernel, at few and at many experts.

``python -m benchmarks.kernel_profile [--device cuda] [--precision bf16]`` profiles the
training step that ``python -m benchmarks.speed --part experts`` times (a
:class:`~sklearn_moe.nn.MixtureOfExperts` at batch 1024, ``top_k=2``, forward, backward and
a fused AdamW update, on the device's training paths) at 2 and at 64 experts with
:mod:`torch.profiler`, and reports for each:

- ``step_ms``: the wall time of one step without the profiler (the median of ``--steps``
  steps, each ended by a device synchronisation);
- ``busy_ms``: the time the device spent in the step's kernels (on a CPU, the operators'
  own times), and ``kernels``, how many ran (on a CPU, every operator call, those an
  operator makes inside itself included): on a GPU, a ``step_ms`` well above ``busy_ms`` is
  a step bound by its launches, not by its arithmetic;
- ``top``: the kernels (on a CPU, operators) that took the most time, per step.

``growth`` then lists the kernels whose time per step grew the most from the first expert
count to the last: what many experts cost over few. The results are printed and written to
``benchmarks/results/kernel_profile[_bf16][_sync_free][_<device>].json``. ``--sync-free`` takes
the GPU's training paths on a CPU as well: their kernels, at the CPU's speed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from sklearn_moe.cli import int_at_least
from sklearn_moe.nn import MixtureOfExperts
from sklearn_moe.nn._sync import sync_free_paths

from .speed import RESULTS, _sync, _training_step, device_flags, device_result, save_result

#: Profiler entries that are bookkeeping, not work: autograd's wrappers of each backward
#: function (the kernels they run are counted on their own).
_WRAPPERS = ("autograd::engine::evaluate_function", "ProfilerStep", "Optimizer.step", "Optimizer.zero_grad")


def training_step(n_experts: int, device: torch.device, precision: str = "float32", batch_size: int = 1024,
                  n_features: int = 32, expert_hidden: tuple[int, ...] = (128, 128), top_k: int = 2):
    """The full training step of ``benchmarks.speed --part experts`` at ``n_experts``: a
    callable that runs forward, backward and a fused AdamW update."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, n_features, generator=generator).to(device)
    y = torch.randn(batch_size, 1, generator=generator).to(device)
    torch.manual_seed(n_experts)
    module = MixtureOfExperts(n_features, 1, n_experts=n_experts, top_k=top_k,
                              expert_hidden=expert_hidden).to(device).train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
    forward_backward = _training_step(module, x, y, autocast=precision == "bf16")

    def step():
        forward_backward()
        optimizer.step()

    return step


def _wall_ms(step, device: torch.device, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def kernel_times(step, device: torch.device, steps: int) -> dict[str, tuple[float, float]]:
    """Per step, each kernel's (on a CPU, each operator's own) milliseconds and calls, by name,
    from ``steps`` profiled calls of ``step``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
        _sync(device)
    on_device = device.type == "cuda"
    times = {}
    for event in profiler.key_averages():
        if on_device != (event.device_type == torch.autograd.DeviceType.CUDA):
            continue
        if event.key.startswith(_WRAPPERS):
            continue
        micros = event.self_device_time_total if on_device else event.self_cpu_time_total
        if micros > 0:
            times[event.key] = (micros / 1e3 / steps, event.count / steps)
    return times


def profile_experts(n_experts: int, device: torch.device, precision: str = "float32", steps: int = 10,
                    top: int = 20) -> tuple[dict, dict[str, float]]:
    """The profile row of one expert count (see the module docstring), and every kernel's
    milliseconds per step by name."""
    step = training_step(n_experts, device, precision)
    for _ in range(3):  # the optimizer's state, lazy buffers, the allocator's pools
        step()
    _sync(device)
    wall = _wall_ms(step, device, steps)
    times = kernel_times(step, device, steps)
    busy = sum(ms for ms, _ in times.values())
    ranked = sorted(times.items(), key=lambda item: -item[1][0])
    return {"n_experts": n_experts, "step_ms": wall, "busy_ms": busy,
            "kernels": sum(calls for _, calls in times.values()),
            "top": [{"name": _short(name), "ms": ms, "calls": calls, "share": ms / busy if busy else 0.0}
                    for name, (ms, calls) in ranked[:top]]}, {name: ms for name, (ms, _) in times.items()}


def _short(name: str, width: int = 120) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def kernel_profile(expert_counts=(2, 64), device: str = "cpu", precision: str = "float32", steps: int = 10,
                   top: int = 20, sync_free: bool = False) -> dict:
    """Profile the training step at each of ``expert_counts`` (see the module docstring);
    ``sync_free`` takes the GPU's training paths on any device
    (:func:`~sklearn_moe.nn._sync.sync_free_paths`).

    Returns
    -------
    dict
        The benchmark's result: ``rows`` (one per expert count) and ``growth`` (the
        kernels whose time per step grew most from the first count to the last, with the
        two times).
    """
    device = torch.device(device)
    with sync_free_paths() if sync_free else contextlib.nullcontext():
        rows, tables = zip(*(profile_experts(n, device, precision, steps, top) for n in expert_counts))
    first, last = tables[0], tables[-1]
    names = set(first) | set(last)
    growth = sorted(names, key=lambda name: first.get(name, 0.0) - last.get(name, 0.0))[:top]
    config = {"batch_size": 1024, "n_features": 32, "expert_hidden": [128, 128], "top_k": 2, "steps": steps,
              "precision": precision, "sync_free": sync_free}
    result = device_result("kernel_profile", "python -m benchmarks.kernel_profile"
                           + device_flags(device, precision, False) + (" --sync-free" if sync_free else ""),
                           device, config, list(rows))
    result["growth"] = [{"name": _short(name), f"ms_at_{expert_counts[0]}": first.get(name, 0.0),
                         f"ms_at_{expert_counts[-1]}": last.get(name, 0.0)}
                        for name in growth if last.get(name, 0.0) > first.get(name, 0.0)]
    return result


def _print(result: dict) -> None:
    for row in result["rows"]:
        print(f"{row['n_experts']:4d} experts: step {row['step_ms']:.3f} ms, busy {row['busy_ms']:.3f} ms "
              f"in {row['kernels']:.0f} kernels")
        for entry in row["top"][:10]:
            print(f"      {entry['ms']:8.4f} ms  x{entry['calls']:<5.0f} {entry['name'][:90]}")
    print("grew most:")
    for entry in result["growth"][:10]:
        times = [value for key, value in entry.items() if key.startswith("ms_at_")]
        print(f"      {times[0]:8.4f} -> {times[1]:8.4f} ms  {entry['name'][:90]}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("float32", "bf16"), default="float32")
    parser.add_argument("--experts", type=int_at_least(1), nargs="+", default=[2, 64],
                        help="expert counts (default: 2 64)")
    parser.add_argument("--steps", type=int_at_least(1), default=10, help="steps timed and profiled per count")
    parser.add_argument("--sync-free", action="store_true",
                        help="take the GPU's training paths on any device (their kernels, the CPU's times)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON result")
    args = parser.parse_args(argv)
    result = kernel_profile(tuple(args.experts), args.device, args.precision, args.steps, sync_free=args.sync_free)
    _print(result)
    save_result(result, args.out, "kernel_profile", args.device, "" if args.precision == "float32" else args.precision,
                "sync_free" if args.sync_free else "")
    return result


if __name__ == "__main__":
    main()
