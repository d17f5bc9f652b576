"""Speed benchmarks, reported as ratios measured in one run.

``python -m benchmarks.speed --part PART`` with PART one of:

- ``experts``: the forward+backward time of one :class:`~sklearn_moe.nn.MixtureOfExperts`
  training step at ``top_k=2`` over ``n_experts`` in {2, 4, ..., 128}, relative to
  ``n_experts=2``, the same for a full optimizer step, and the router's share. Sparse
  routing should make an extra expert cost little: the work per row grows with ``top_k``,
  not with ``n_experts``. ``--expert-type adapter`` times shared-backbone experts instead,
  and beside them, in the same run, the PyPI ``mixture-of-experts`` layer (top-2 gating
  over one-hidden-layer experts) and this library's layer in the same configuration
  (one hidden layer of the same width, as many outputs as inputs). ``--precision bf16``
  runs the steps under bfloat16 autocast (on a GPU that supports it, the independent
  experts then run as grouped matrix products); ``--graph`` (CUDA) also times the full
  step captured once in a CUDA graph and replayed, which only a step without host
  synchronisation allows (a failed capture is reported, not raised). Each row names the
  dispatch layout the step used.
- ``overhead``: seconds per epoch of ``MoERegressor.fit`` against a plain PyTorch loop
  training the same module with the same batches, losses, clipping and optimizer.
- ``predict``: single-row latency and 100k-row throughput of ``MoERegressor.predict``
  against scikit-learn's ``MLPRegressor`` with the same hidden sizes.
- ``memory``: peak resident memory of a fit, each in a fresh process.
- ``all``: every part.

Timing protocol: every configuration is built first; then rounds of (one timed step per
configuration, in shuffled order) are repeated, and each configuration reports its median.
Interleaving spreads any slow spell of the machine over all configurations alike, so the
ratios are steadier than the absolute times. Results are printed and written as JSON to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import random
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from sklearn_moe import MoERegressor
from sklearn_moe._training import build_module
from sklearn_moe.cli import int_at_least
from sklearn_moe.nn import MixtureOfExperts
from sklearn_moe.nn._sync import avoid_host_reads, grouped_mm_supported, sync_free_paths
from sklearn_moe.nn.dispatch import padded_layout, plan_dispatch
from sklearn_moe.nn.layouts import blocked_layout, choose_layout, grouped_layout, staircase_layout
from sklearn_moe.nn.losses import per_expert_loss

from .launches import KernelLaunchCounter
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


def _block_medians(steps: dict, blocks: int, calls: int) -> dict:
    """Median seconds per call of each ``steps[name]()``, timed in alternating blocks.

    Each block is one untimed call then ``calls`` timed ones of the same step. Multi-threaded
    libraries keep their threads spinning for a while after a call (torch's OpenMP pool,
    numpy's OpenBLAS pool): on a machine with few cores, a call right after the other
    library's would time the two pools fighting for the cores, which no user sees.
    """
    times = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            step()
            for _ in range(calls):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def expert_scaling(batch_size: int = 1024, n_features: int = 32, expert_hidden: tuple[int, ...] = (128, 128),
                   top_k: int = 2, expert_counts=EXPERT_COUNTS, rounds: int = 30, device: str = "cpu",
                   expert_type: str = "independent", precision: str = "float32", graph: bool = False,
                   sync_free: bool = False) -> dict:
    """Seconds per training step of a MixtureOfExperts, per n_experts.

    Three timings each: forward+backward, the full step (with a fused AdamW update) and the
    router's forward+backward alone. For independent experts, two more: as the floor that
    dispatch cannot beat, the experts' forward+backward alone on a perfectly balanced
    buffer (every expert ``batch_size * top_k / n_experts`` rows, no routing, no
    dispatch); and the experts alone in the layout that dispatch uses for the actual
    routing (its padding and gathered weights, without the routing, the rows' gathers and
    the combine). For adapter experts, the PyPI ``mixture-of-experts`` layer's
    forward+backward and this library's in the same configuration (see
    :func:`_pypi_steps`). The modules are freshly initialised (routing as uneven as at the
    start of training) and in training mode, with the Switch balance and z-loss terms in
    the loss. ``precision="bf16"`` runs every forward under bfloat16 autocast. With
    ``graph`` on CUDA, the full step is also captured in a CUDA graph (with a capturable
    fused AdamW) and its replay timed. ``sync_free`` runs every step on the GPU's training
    paths (:func:`~sklearn_moe.nn._sync.sync_free_paths`) on the CPU too: its
    ``kernel_launches`` are those of the GPU's step (the times are the CPU's).
    """
    if sync_free:
        with sync_free_paths():
            result = expert_scaling(batch_size, n_features, expert_hidden, top_k, expert_counts, rounds, device,
                                    expert_type, precision, graph)
        result["command"] += " --sync-free"
        result["config"]["sync_free"] = True
        return result
    device = torch.device(device)
    autocast = precision == "bf16"
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, n_features, generator=generator).to(device)
    y = torch.randn(batch_size, 1, generator=generator).to(device)
    steps, counts, layouts, graph_errors, launches = {}, {}, {}, {}, {}
    independent = expert_type == "independent"
    pypi = not independent and _pypi_moe_available()
    for n_experts in expert_counts:
        torch.manual_seed(n_experts)
        module = MixtureOfExperts(n_features, 1, n_experts=n_experts, top_k=top_k, expert_hidden=expert_hidden,
                                  expert_type=expert_type).to(device).train()
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True)
        forward_backward = _training_step(module, x, y, autocast)

        def full_step(optimizer=optimizer, forward_backward=forward_backward):
            forward_backward()
            optimizer.step()

        def router_step(module=module):
            module.zero_grad(set_to_none=True)
            with _bf16(device, autocast):
                routing = module.router(x)
            (routing.weights.sum() + routing.probs.square().sum()).backward()

        steps["forward_backward", n_experts] = forward_backward
        steps["full_step", n_experts] = full_step
        steps["router", n_experts] = router_step
        if independent:
            steps["balanced_experts", n_experts], steps["routed_experts", n_experts] = _experts_alone_steps(
                module, x, n_experts, batch_size, top_k, n_features, generator, autocast)
            layouts[n_experts] = _training_layout(module, x, autocast)
        if pypi:
            steps["pypi", n_experts], steps["matched", n_experts] = _pypi_steps(
                n_experts, x, expert_hidden[0], top_k, expert_type)
        if graph and device.type == "cuda":
            graphed = _graphed_step(module, x, y, autocast)
            if isinstance(graphed, str):
                graph_errors[n_experts] = graphed
            else:
                steps["graphed_full_step", n_experts] = graphed
        counts[n_experts] = module(x).expert_counts.cpu()
        launches[n_experts] = _launches(full_step, device)
    medians = _interleaved_medians(steps, rounds=rounds, warmup=3, device=device)
    first = expert_counts[0]
    rows = []
    for n_experts in expert_counts:
        load = counts[n_experts].float()
        row = {"n_experts": n_experts, "busiest_expert_over_mean": float(load.max() / load.mean()),
               "router_ms": 1e3 * medians["router", n_experts], "kernel_launches": launches[n_experts]}
        if n_experts in layouts:
            row["layout"] = layouts[n_experts]
        for name, label in (("forward_backward", "forward_backward"), ("full_step", "full_step"),
                            ("graphed_full_step", "graphed_full_step"),
                            ("balanced_experts", "balanced_experts_alone"),
                            ("routed_experts", "routed_experts_alone"), ("pypi", "pypi_forward_backward"),
                            ("matched", "matched_forward_backward")):
            if (name, n_experts) in medians and (name, first) in medians:
                row[f"{label}_ms"] = 1e3 * medians[name, n_experts]
                row[f"{label}_ratio"] = medians[name, n_experts] / medians[name, first]
        if n_experts in graph_errors:
            row["graph_error"] = graph_errors[n_experts]
        if pypi:
            row["matched_over_pypi"] = medians["matched", n_experts] / medians["pypi", n_experts]
        rows.append(row)
    flags = "" if independent else f" --expert-type {expert_type}"
    config = {"batch_size": batch_size, "n_features": n_features, "expert_hidden": list(expert_hidden),
              "top_k": top_k, "rounds": rounds, "expert_type": expert_type, "precision": precision}
    result = device_result("expert_scaling", "python -m benchmarks.speed --part experts"
                           + flags + device_flags(device, precision, graph), device, config, rows)
    result["criterion"] = _criterion(rows)
    return result


def device_result(name: str, command: str, device: torch.device, config: dict, rows: list[dict]) -> dict:
    """A benchmark's result: its name, command, machine, device (a GPU named, with its
    compute capability), configuration and rows."""
    result = {"benchmark": name, "command": command, "machine": describe_machine(), "device": str(device),
              "config": config, "rows": rows}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name(device)
        result["compute_capability"] = list(torch.cuda.get_device_capability(device))
    return result


def save_result(result: dict, out: Path, stem: str, device: str, *tags: str) -> Path:
    """Write ``result`` as ``out/<stem>[_<tag>...][_<device type>].json`` (empty tags left
    out; no device suffix on the CPU), say where, and return the path."""
    name = "_".join([stem, *(tag for tag in tags if tag)])
    name += "" if device == "cpu" else f"_{device.split(':')[0]}"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def device_flags(device: torch.device, precision: str, graph: bool) -> str:
    """The command-line flags that select ``device``, ``precision`` and ``graph`` (none for
    the defaults), for a result's recorded command."""
    flags = "" if device.type == "cpu" else f" --device {device.type}"
    flags += "" if precision == "float32" else f" --precision {precision}"
    return flags + (" --graph" if graph else "")


def _launches(full_step, device: torch.device) -> int:
    """Kernels one call of ``full_step`` launches (:class:`~benchmarks.launches.KernelLaunchCounter`),
    after a first call (which also builds the optimizer's state and any lazy buffers)."""
    full_step()
    with KernelLaunchCounter() as counter:
        full_step()
    _sync(device)
    return counter.launches


def _criterion(rows: list[dict]) -> dict:
    """The step times at 2 and 64 experts and their ratio (for each timing that has both)."""
    by_count = {row["n_experts"]: row for row in rows}
    if 2 not in by_count or 64 not in by_count:
        return {}
    summary = {}
    for label in ("forward_backward", "full_step", "graphed_full_step"):
        key = f"{label}_ms"
        if key in by_count[2] and key in by_count[64]:
            summary[label] = {"ms_at_2_experts": by_count[2][key], "ms_at_64_experts": by_count[64][key],
                              "ratio_64_over_2": by_count[64][key] / by_count[2][key]}
    summary["kernel_launches"] = {"at_2_experts": by_count[2]["kernel_launches"],
                                  "at_64_experts": by_count[64]["kernel_launches"],
                                  "ratio_64_over_2": by_count[64]["kernel_launches"] / by_count[2]["kernel_launches"]}
    return summary


def _training_step(module, x, y, autocast: bool = False, cache: bool = True):
    """A training step's forward and backward of ``module`` on ``(x, y)``, from no gradients
    (``cache``: autocast's cache of cast weights, which a CUDA graph capture must not use)."""
    def forward_backward():
        # From no gradients, as in a training step: accumulating into existing ones would
        # time a read-modify-write of every parameter, 32x more of them at 64 experts.
        module.zero_grad(set_to_none=True)
        with _bf16(x.device, autocast, cache):
            out = module(x)
        loss = (out.output.float() - y).square().mean() + 1e-2 * out.balance_loss + 1e-3 * out.z_loss
        loss.backward()
    return forward_backward


def _bf16(device: torch.device, enabled: bool, cache: bool = True):
    """bfloat16 autocast on ``device`` when ``enabled``; else no context at all (entering a
    disabled autocast costs time in the steps timed)."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def _graphed_step(module, x, y, autocast: bool):
    """The full training step (forward, backward, a capturable fused AdamW update) captured
    in a CUDA graph, as a replay callable; or the error message if the capture failed (a
    host synchronisation inside the step makes it fail)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=True, capturable=True)
    step = _training_step(module, x, y, autocast, cache=False)

    def full_step():
        step()
        optimizer.step()

    return capture_graph(full_step, module)


def capture_graph(full_step, module):
    """``full_step()`` captured once in a CUDA graph, as a replay callable; or the error
    message if the capture failed (a host synchronisation inside the step makes it fail).

    ``full_step`` must read and write only tensors that outlive the graph (the module's,
    its optimizer's, fixed input buffers); it runs three times on a side stream first, and
    ``module``'s gradients are reset before the capture, so that the graph allocates them.
    """
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # capturable=True run outside a capture
            for _ in range(3):
                full_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        module.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            full_step()

        def replay(graph=graph, keep_alive=full_step):
            # The graph holds no reference to what it reads and writes: without this one the
            # optimizer (in full_step's closure) and its state would be freed, and every
            # replay would write to freed memory.
            graph.replay()

        return replay
    except Exception as error:  # noqa: BLE001 - report any capture failure
        with contextlib.suppress(Exception):  # the failed capture may have left an error behind
            torch.cuda.synchronize()
        return f"{type(error).__name__}: {error}"


def _training_layout(module: MixtureOfExperts, x: torch.Tensor, autocast: bool) -> str:
    """The dispatch layout a training step of ``module`` on ``x`` uses."""
    with torch.no_grad():
        routing = module.router(x)
    plan = plan_dispatch(routing.indices, routing.weights, module.n_experts,
                         sync_free=avoid_host_reads(x.device, training=True))
    dtype = torch.bfloat16 if autocast else x.dtype
    grouped = plan.n_slots is None and grouped_mm_supported(x.device, dtype)
    layout = choose_layout(plan, training=True, device_type=x.device.type, grouped=grouped)
    if layout == "blocked" and blocked_layout(plan, max_count=x.shape[0]).groups[0].experts is None:
        return "blocked (one block of the batch's rows per expert)"
    return layout


def _experts_alone_steps(module, x, n_experts, batch_size, top_k, n_features, generator, autocast=False):
    device = x.device
    balanced = torch.randn(n_experts, batch_size * top_k // n_experts, n_features, generator=generator).to(device)
    balanced_grad = torch.randn(n_experts, balanced.shape[1], 1, generator=generator).to(device)

    def under_autocast(run):
        with _bf16(device, autocast):
            return run()

    def balanced_experts_step():
        module.zero_grad(set_to_none=True)
        under_autocast(lambda: module.experts(balanced)).backward(balanced_grad.to(_out_dtype(x, autocast)))

    if _training_layout(module, x, autocast) == "grouped":
        buffer, offsets, row_experts, grad = _routed_groups(module, x)

        def routed_experts_step():
            module.zero_grad(set_to_none=True)
            out = under_autocast(lambda: module.experts.forward_grouped(buffer, offsets, row_experts))
            out.backward(grad.to(out.dtype))

        return balanced_experts_step, routed_experts_step
    routed_blocks, routed_experts, routed_grads = _routed_layout(module, x)

    def routed_experts_step():
        module.zero_grad(set_to_none=True)
        outputs = under_autocast(lambda: module.experts(routed_blocks, routed_experts))
        torch.autograd.backward(outputs, [grad.to(out.dtype) for grad, out in zip(routed_grads, outputs)])

    return balanced_experts_step, routed_experts_step


def _out_dtype(x: torch.Tensor, autocast: bool) -> torch.dtype:
    return torch.bfloat16 if autocast else x.dtype


def _pypi_moe_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("mixture_of_experts") is not None


def _pypi_steps(n_experts: int, x: torch.Tensor, hidden: int, top_k: int, expert_type: str):
    """Forward+backward of the PyPI ``mixture-of-experts`` layer (``MoE(dim, n_experts,
    hidden)``: top-2 gating, one-hidden-layer ReLU experts mapping ``dim`` to ``dim``, its
    auxiliary loss in the loss) and of this library's layer configured alike: one hidden
    layer of width ``hidden``, ``dim`` outputs, ``top_k`` of ``n_experts``."""
    from mixture_of_experts import MoE

    dim = x.shape[1]
    theirs = MoE(dim=dim, num_experts=n_experts, hidden_dim=hidden).to(x.device).train()
    batch = x.unsqueeze(0)

    def pypi_step():
        theirs.zero_grad(set_to_none=True)
        out, aux = theirs(batch)
        (out.square().mean() + aux).backward()

    ours = MixtureOfExperts(dim, dim, n_experts=n_experts, top_k=top_k, expert_hidden=(hidden,),
                            expert_type=expert_type).to(x.device).train()
    return pypi_step, _training_step(ours, x, torch.zeros(x.shape[0], dim, device=x.device))


def _routed_layout(module: MixtureOfExperts, x: torch.Tensor):
    """The blocks that dispatch lays out for ``module``'s routing of ``x`` in training
    (padding and gathered expert weights included), filled with random rows, and random
    output gradients: timing the experts on them leaves out routing, the rows' gathers and
    the combine."""
    with torch.no_grad():
        routing = module.router(x)
    sync_free = avoid_host_reads(x.device, training=True)
    plan = plan_dispatch(routing.indices, routing.weights, module.n_experts, sync_free=sync_free)
    if sync_free:
        groups = blocked_layout(plan, max_count=x.shape[0]).groups
    else:
        staircase = choose_layout(plan, training=True, device_type=x.device.type) == "staircase"
        groups = (staircase_layout(plan) if staircase else padded_layout(plan)).groups
    generator = torch.Generator().manual_seed(1)
    blocks = [torch.randn(g.n_experts, g.n_slots, x.shape[1], generator=generator).to(x.device) for g in groups]
    grads = [torch.randn(g.n_experts, g.n_slots, module.n_outputs, generator=generator).to(x.device) for g in groups]
    return blocks, [g.experts for g in groups], grads


def _routed_groups(module: MixtureOfExperts, x: torch.Tensor):
    """The ``"grouped"`` layout's buffer for ``module``'s routing of ``x`` in training,
    filled with random rows, its offsets and row experts, and a random output gradient."""
    with torch.no_grad():
        routing = module.router(x)
    layout = grouped_layout(plan_dispatch(routing.indices, routing.weights, module.n_experts, sync_free=True))
    generator = torch.Generator().manual_seed(1)
    buffer = torch.randn(layout.n_rows, x.shape[1], generator=generator).to(x.device)
    grad = torch.randn(layout.n_rows, module.n_outputs, generator=generator).to(x.device)
    return buffer, layout.offsets, layout.row_experts, grad


def _print_scaling(result: dict) -> None:
    config = result["config"]
    print(f"# MixtureOfExperts training step, {config['expert_type']} experts, top_k={config['top_k']}, "
          f"batch {config['batch_size']}, {config['n_features']} features, "
          f"expert_hidden={tuple(config['expert_hidden'])}, {config.get('precision', 'float32')}, "
          f"{result.get('device_name', result['device'])}")
    print(f"# {result['machine']}")
    columns = [("forward_backward", "forward+backward"), ("full_step", "full step"),
               ("graphed_full_step", "full step, CUDA graph"),
               ("balanced_experts_alone", "balanced experts alone"), ("routed_experts_alone", "routed experts alone"),
               ("pypi_forward_backward", "PyPI mixture-of-experts fwd+bwd"),
               ("matched_forward_backward", "this library, same config, fwd+bwd")]
    columns = [(key, label) for key, label in columns if any(f"{key}_ms" in row for row in result["rows"])]
    header = ["n_experts"] + [f"{label} (ms) | ratio" for _, label in columns] + [
        "router alone (ms)", "busiest expert / mean", "kernel launches"]
    if "matched_over_pypi" in result["rows"][0]:
        header.append("this library / PyPI")
    if "layout" in result["rows"][0]:
        header.append("layout")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * (1 + 2 * len(columns) + 3 + ("matched_over_pypi" in result["rows"][0])
                          + ("layout" in result["rows"][0])))
    for row in result["rows"]:
        if "graph_error" in row:
            print(f"# CUDA graph capture failed at {row['n_experts']} experts: {row['graph_error']}")
    for row in result["rows"]:
        cells = [str(row["n_experts"])]
        cells += [f"{row[key + '_ms']:.2f} | {row[key + '_ratio']:.2f}x" if key + "_ms" in row else "- | -"
                  for key, _ in columns]
        cells += [f"{row['router_ms']:.2f}", f"{row['busiest_expert_over_mean']:.2f}", str(row["kernel_launches"])]
        if "matched_over_pypi" in row:
            cells.append(f"{row['matched_over_pypi']:.2f}x")
        if "layout" in row:
            cells.append(row["layout"])
        print("| " + " | ".join(cells) + " |")
    for label, summary in result.get("criterion", {}).items():
        if label == "kernel_launches":
            print(f"# kernel launches: {summary['at_2_experts']} at 2 experts, {summary['at_64_experts']} at 64 "
                  f"({summary['ratio_64_over_2']:.2f}x)")
            continue
        print(f"# {label}: {summary['ms_at_2_experts']:.3f} ms at 2 experts, {summary['ms_at_64_experts']:.3f} ms "
              f"at 64 ({summary['ratio_64_over_2']:.2f}x)")


def _regression_data(n_rows: int, n_features: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_rows, n_features)).astype(np.float32)
    y = np.sin(X[:, 0]) + X[:, 1] * X[:, 2] + 0.1 * rng.normal(size=n_rows)
    return X, y


def wrapper_overhead(n_rows: int = 20_000, n_features: int = 32, epochs: int = 4, repeats: int = 3,
                     batch_size: int = 256, device: str = "cpu") -> dict:
    """Seconds per epoch: ``MoERegressor.fit`` against a plain loop over the same module.

    The estimator trains without a validation split (``early_stopping=False``), so both
    see every row once per epoch. The plain loop does what the estimator's training does
    per batch: forward, task + balance + z loss, backward, gradient clipping and a fused
    AdamW step, over shuffled in-memory batches, with the estimator's objective (the
    per-expert loss of :func:`~sklearn_moe.nn.losses.per_expert_loss` by default). Fits and
    loops alternate ``repeats`` times.
    """
    X, y = _regression_data(n_rows, n_features)
    params = dict(max_epochs=epochs, batch_size=batch_size, early_stopping=False, n_iter_no_change=epochs + 1,
                  random_state=0, device=device)
    estimator_epochs, plain_epochs = [], []
    for repeat in range(repeats):
        model = MoERegressor(**params).fit(X, y)
        estimator_epochs += list(model.history_["dur"])
        plain_epochs += _plain_loop_epochs(model, X, y, epochs, batch_size, device, seed=repeat)
    estimator, plain = statistics.median(estimator_epochs), statistics.median(plain_epochs)
    return {
        "benchmark": "wrapper_overhead",
        "command": "python -m benchmarks.speed --part overhead",
        "machine": describe_machine(),
        "config": {"n_rows": n_rows, "n_features": n_features, "epochs": epochs, "repeats": repeats,
                   "batch_size": batch_size, "device": device},
        "estimator_epoch_s": estimator,
        "plain_loop_epoch_s": plain,
        "ratio": estimator / plain,
    }


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row squared error (``MSELoss(reduction="none")``)."""
    return (prediction - target).square()


def _plain_loop_epochs(model, X, y, epochs, batch_size, device, seed) -> list[float]:
    """Train a fresh copy of ``model``'s architecture with a hand-written loop."""
    torch.manual_seed(seed)
    module = build_module(model, X.shape[1], device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=model.learning_rate, weight_decay=model.weight_decay,
                                  fused=True)
    x_all = torch.as_tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32, device=device)
    y_all = torch.as_tensor(((y - y.mean()) / y.std())[:, None], dtype=torch.float32, device=device)
    generator = torch.Generator().manual_seed(seed)
    durations = []
    module.train()
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x_all), generator=generator).to(device)
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            out = module(x_all[rows])
            if model.expert_loss == "per_expert":
                a = out.assignments
                loss = per_expert_loss(squared_error, a.outputs, a.rows, a.weights, y_all[rows])
            else:
                loss = (out.output - y_all[rows]).square().mean()
            loss = loss + model.balance_coef * out.balance_loss + model.z_loss_coef * out.z_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), model.max_grad_norm)
            optimizer.step()
        _sync(torch.device(device))
        durations.append(time.perf_counter() - start)
    return durations


def predict_speed(n_features: int = 32, hidden: tuple[int, ...] = (256, 256), n_fit: int = 5000,
                  n_throughput: int = 100_000, n_latency: int = 300, moe_params=None) -> dict:
    """Single-row predict latency and 100k-row throughput, MoERegressor (its defaults, or
    ``moe_params``) against MLPRegressor with the same hidden sizes."""
    from sklearn.neural_network import MLPRegressor

    X, y = _regression_data(max(n_fit, n_throughput), n_features)
    moe = MoERegressor(expert_hidden=hidden, max_epochs=3, random_state=0, device="cpu", **(moe_params or {}))
    moe.fit(X[:n_fit], y[:n_fit])
    mlp = MLPRegressor(hidden_layer_sizes=hidden, max_iter=3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: 3 iterations are enough to time predict
        mlp.fit(X[:n_fit], y[:n_fit])
    models = {"MoERegressor": moe, "MLPRegressor": mlp}
    multiply_adds = {name: multiply_adds_per_row(model) for name, model in models.items()}
    single = {(name, i): (lambda model=model, i=i: model.predict(X[i:i + 1]))
              for name, model in models.items() for i in range(n_latency)}
    latency = _interleaved_medians(single, rounds=1, warmup=1, device=torch.device("cpu"))
    per_model = {name: statistics.median(latency[name, i] for i in range(n_latency)) for name in models}
    bulk = _block_medians({name: (lambda model=model: model.predict(X[:n_throughput]))
                           for name, model in models.items()}, blocks=3, calls=3)
    return {
        "benchmark": "predict",
        "command": "python -m benchmarks.speed --part predict",
        "machine": describe_machine(),
        "config": {"n_features": n_features, "hidden": list(hidden), "n_throughput": n_throughput,
                   "moe": {key: value for key, value in moe.get_params().items()
                           if key in ("n_experts", "top_k", "router", "expert_type", "numeric_embedding")}},
        "single_row_latency_ms": {name: 1e3 * value for name, value in per_model.items()},
        "latency_ratio": per_model["MoERegressor"] / per_model["MLPRegressor"],
        "rows_per_s": {name: n_throughput / bulk[name] for name in models},
        "throughput_ratio": bulk["MLPRegressor"] / bulk["MoERegressor"],
        # Throughput ratio = (MoE's arithmetic rate / MLP's) / arithmetic_ratio: with twice
        # the MLP's work per row, parity needs twice its rate.
        "multiply_adds_per_row": multiply_adds,
        "arithmetic_ratio": multiply_adds["MoERegressor"] / multiply_adds["MLPRegressor"],
        "gflop_per_s": {name: 2 * multiply_adds[name] * n_throughput / bulk[name] / 1e9 for name in models},
    }


def multiply_adds_per_row(model) -> int:
    """Multiply-adds of one row's prediction in the weight layers: a fitted
    ``MLPRegressor``'s, or a fitted MoE estimator's (numeric embedding, router, and the
    experts a row runs through: ``top_k``, or all of them for a dense router)."""
    if hasattr(model, "coefs_"):
        return int(sum(coef.size for coef in model.coefs_))
    module = model.module_
    embedding = 0
    if module.embedding is not None:  # every embedding weight multiplies once per row
        embedding = sum(p.numel() for name, p in module.embedding.named_parameters() if name.endswith("weight"))
    experts_per_row = module.n_experts if module.router.is_dense else module.top_k
    experts = module.experts
    if hasattr(experts, "hidden"):  # independent experts: stacked weights, one slice per expert
        per_expert = sum(layer.weight[0].numel() for layer in (*experts.hidden, experts.output))
    else:  # adapter experts: the shared weights, and one expert's head
        per_expert = sum(weight.numel() for weight in experts.weights) + experts.head_weight[0].numel()
    # The noise layer of a noisy router is used in training only.
    router = sum(layer.weight.numel() for name, layer in module.router.named_modules()
                 if isinstance(layer, torch.nn.Linear) and not name.startswith("noise"))
    return int(embedding + router + experts_per_row * per_expert)


def _status_kib(field: str) -> int | None:
    """A memory field of ``/proc/self/status`` (Linux) in KiB, or None elsewhere."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Restart the peak-RSS count (``VmHWM``) from the current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_kib() -> int:
    """This process's peak resident memory so far, in KiB (``VmHWM`` where Linux has it)."""
    peak = _status_kib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_memory_child(kind: str, n_rows: int, n_features: int, queue) -> None:
    X, y = _regression_data(n_rows, n_features)
    # The peak of the fit alone: imports and data generation can pass through a higher
    # transient peak than the fit reaches, so the count restarts here where it can (else
    # the fit's "added" memory is what it adds above that earlier peak). getrusage's
    # ru_maxrss cannot be restarted and even carries the parent's peak over into a
    # spawned child.
    before = _status_kib("VmRSS") if _reset_peak_rss() else _peak_kib()
    if kind == "MoERegressor":
        MoERegressor(max_epochs=2, random_state=0, device="cpu").fit(X, y)
    elif kind == "MLPRegressor":
        from sklearn.neural_network import MLPRegressor

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            MLPRegressor(hidden_layer_sizes=(128, 128), max_iter=2, random_state=0).fit(X, y)
    queue.put((before, _peak_kib()))


def peak_memory(n_rows: int = 100_000, n_features: int = 32) -> dict:
    """Peak resident memory (MiB) of a 2-epoch fit, each model in a fresh process: the
    process's peak during the fit, and how far above its resident memory before the fit."""
    context = multiprocessing.get_context("spawn")
    result = {}
    for kind in ("MoERegressor", "MLPRegressor"):
        queue = context.Queue()
        process = context.Process(target=_peak_memory_child, args=(kind, n_rows, n_features, queue))
        process.start()
        before, after = queue.get()
        process.join()
        result[kind] = {"peak_mib": after / 1024, "added_by_fit_mib": (after - before) / 1024}
    return {
        "benchmark": "memory",
        "command": "python -m benchmarks.speed --part memory",
        "machine": describe_machine(),
        "config": {"n_rows": n_rows, "n_features": n_features, "epochs": 2},
        "models": result,
    }


PARTS = {
    "experts": lambda args: expert_scaling(rounds=args.rounds, device=args.device, expert_type=args.expert_type,
                                           precision=args.precision, graph=args.graph, sync_free=args.sync_free),
    "overhead": lambda args: wrapper_overhead(device=args.device),
    "predict": lambda args: predict_speed(),
    "memory": lambda args: peak_memory(),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=(*PARTS, "all"), default="all",
                        help="experts: step time against the number of experts; overhead: the estimator's epoch "
                             "against a plain PyTorch loop; predict: prediction latency and throughput; memory: "
                             "peak memory of a fit (predict and memory: CPU only, fixed sizes); all (default): "
                             "every part the device runs")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N (experts and overhead)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch threads (default: torch's own)")
    parser.add_argument("--rounds", type=int_at_least(1), default=30,
                        help="experts part: timed rounds per configuration (default 30)")
    parser.add_argument("--expert-type", choices=("independent", "adapter"), default="independent",
                        help="experts part: the experts timed (default: independent)")
    parser.add_argument("--precision", choices=("float32", "bf16"), default="float32",
                        help="experts part: bfloat16 autocast for the steps (default: float32)")
    parser.add_argument("--graph", action="store_true",
                        help="experts part on CUDA: also time the full step replayed from a CUDA graph")
    parser.add_argument("--sync-free", action="store_true",
                        help="experts part: take the GPU's training paths on the CPU too (their kernel launches)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device: cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda") or (device.type == "cuda" and not torch.cuda.is_available()):
        parser.error(f"--device {args.device!r} is not available here")
    cpu_only = ("predict", "memory")
    if device.type != "cpu" and args.part in cpu_only:
        parser.error(f"--part {args.part} runs on the CPU only")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    parts = [part for part in PARTS if device.type == "cpu" or part not in cpu_only]
    for part in parts if args.part == "all" else (args.part,):
        result = PARTS[part](args)
        experts = part == "experts"
        if experts:
            _print_scaling(result)
        else:
            print(json.dumps(result, indent=2))
        save_result(result, args.out, f"speed_{part}", args.device,
                    args.expert_type if experts and args.expert_type != "independent" else "",
                    args.precision if experts and args.precision != "float32" else "",
                    "sync_free" if experts and args.sync_free else "")
        results[part] = result
    return results


if __name__ == "__main__":
    main()
