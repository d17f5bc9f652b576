"""No host synchronisation inside a training step: what a GPU would wait for, found on the CPU.

The engine takes its GPU training paths on the CPU inside ``sync_free_paths()``; the
detector of :mod:`tests.host_sync` records every operation that would make the host wait
for a GPU. A training step (forward, loss, backward, optimizer step) of the default
configuration and of the main router, expert and output variants must record none; the
variants whose number of kept assignments depends on the data (capacity, dynamic k, expert
dropout) record exactly the documented reads. The sync-free paths must compute what the
CPU paths compute, and the estimators' deferred loss check must keep its guarantees.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

import sklearn_moe.nn.moe as moe_module
from benchmarks.launches import KernelLaunchCounter
from sklearn_moe import MoEClassifier, MoERegressor, TrainingDivergedError
from sklearn_moe._guard import MAX_ROLLBACKS
from sklearn_moe.nn import MixtureOfExperts, choose_layout, expert_outputs, plan_dispatch
from sklearn_moe.nn._sync import avoid_host_reads, sync_free_paths
from sklearn_moe.nn.density import mixture_nll
from sklearn_moe.nn.losses import MultilabelLoss, per_expert_loss

from .host_sync import HostSyncDetector
from .test_training_faults import BATCHES_PER_EPOCH, PARAMS, PoisonOutput

N_ROWS = 256

# ---------------------------------------------------------------------------------------
# The detector itself
# ---------------------------------------------------------------------------------------


def test_the_detector_sees_what_a_gpu_would_wait_for():
    x = torch.randn(6)
    ids = torch.tensor([2, 0, 1])
    mask = x > 0
    cases = {
        "_local_scalar_dense": [lambda: x[0].item(), lambda: bool(mask.any()), lambda: int(ids.max()),
                                lambda: float(x.sum()), lambda: f"{x.sum():.2f}"],
        "tolist": [lambda: ids.tolist()],
        "cpu": [lambda: ids.cpu()],
        "numpy": [lambda: ids.numpy()],
        "to_cpu": [lambda: x.to("cpu")],
        "nonzero": [lambda: mask.nonzero(), lambda: torch.where(mask)],
        "boolean_mask_index": [lambda: x[mask]],
        "bincount": [lambda: torch.bincount(ids, minlength=4)],
        "unique": [lambda: torch.unique(ids)],
        "repeat_interleave": [lambda: torch.arange(3).repeat_interleave(ids)],
        "masked_select": [lambda: x.masked_select(mask)],
        "tensor_from_host_data": [lambda: torch.tensor([1.0, 2.0]), lambda: torch.as_tensor(np.ones(2))],
        "cuda_synchronize": [lambda: torch.cuda.synchronize()],
    }
    for op, calls in cases.items():
        for call in calls:
            with HostSyncDetector() as detector:
                call()
            assert op in {s.op for s in detector.syncs}, op
            assert all(s.where.startswith("tests/test_host_sync.py") for s in detector.syncs)


def test_the_detector_lets_device_side_work_pass():
    x = torch.randn(6, requires_grad=True)
    ids = torch.tensor([2, 0, 1])
    with HostSyncDetector() as detector:
        y = x.index_select(0, ids) * 2
        torch.arange(3).repeat_interleave(ids, output_size=3)
        torch.zeros(4, dtype=torch.long).scatter_add_(0, ids, torch.ones_like(ids))
        torch.where(x > 0, x, 0.0).sum().backward()
        torch.nn.utils.clip_grad_norm_([x], 1.0)  # moves norms to the gradients' device, not the host
        y.sum().backward()
    assert detector.syncs == [], detector.report()


# ---------------------------------------------------------------------------------------
# A training step of the module
# ---------------------------------------------------------------------------------------

SYNC_FREE_CONFIGS = {
    "topk-independent": dict(router="topk"),  # the speed benchmark's configuration
    "two-experts": dict(router="topk", n_experts=2),  # blocked layout: one block per expert
    "softmax-adapter": dict(router="softmax", expert_type="adapter"),  # the estimators' default
    "topk-adapter-3-outputs": dict(router="topk", expert_type="adapter", n_outputs=3),
    "switch-shared-grad-scaling": dict(router="switch", shared_expert=True, expert_grad_scaling=True),
    "noisy-cv2-layer-norm": dict(router="noisy_topk", balance_loss="cv2", layer_norm=True, dropout=0.1),
    "hierarchical-aux-free": dict(router="hierarchical", n_groups=2, balance_loss="aux_free"),
    "uniform-adapter": dict(router="uniform", expert_type="adapter"),
    "diversity": dict(router="topk", diversity_loss=True, diversity_rows=32),
    "mixture-density": dict(router="topk", output="mixture_density"),
    "categorical-mixture": dict(router="topk", output="categorical_mixture", n_outputs=3),
    "bernoulli-mixture": dict(router="topk", output="bernoulli_mixture", n_outputs=3),
    "piecewise-linear": dict(router="softmax", expert_type="adapter", numeric_embedding="piecewise_linear",
                             embedding_columns=[0, 1, 2], embedding_n_bins=[4, 4, 4]),
}
# The reads that remain by design: the kept assignments are a data-dependent number.
DOCUMENTED_SYNCS = {
    "top-p": (dict(router="top_p"), {("nonzero", "flat_assignments")}),
    "expert-dropout": (dict(router="topk", expert_dropout=0.3), {("nonzero", "flat_assignments")}),
    "capacity-drop": (dict(router="topk", capacity_factor=1.0),
                      {("_local_scalar_dense", "plan_dispatch"), ("nonzero", "plan_dispatch")}),
}


def _module(n_outputs=1, seed=0, **options):
    torch.manual_seed(seed)
    return MixtureOfExperts(6, n_outputs, **{"n_experts": 8, "top_k": 2, "expert_hidden": (16, 16), **options}).train()


def _loss(module, out, y, sample_weight=None):
    assignments = out.assignments
    if module.output == "mixture_density":
        task = mixture_nll(assignments.outputs, assignments.rows, assignments.weights, y).mean()
    elif module.output == "categorical_mixture":
        task = torch.nn.functional.nll_loss(out.output, y.argmax(dim=1))
    elif module.output == "bernoulli_mixture":
        task = MultilabelLoss()(out.output, y > 0).mean()
    else:
        task = per_expert_loss(torch.nn.MSELoss(reduction="none"), assignments.outputs.float(), assignments.rows,
                               assignments.weights, y, sample_weight)
    return task + 1e-2 * out.balance_loss + 1e-3 * out.z_loss + 0.1 * out.diversity_loss


def _training_step(module, optimizer, x, y, sample_weight=None, autocast=False):
    """forward, loss, backward and a fused AdamW step, as the estimators train."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = module(x, sample_weight=sample_weight)
    loss = _loss(module, out, y, sample_weight)
    loss.backward()
    if module.router.__class__.__name__ != "UniformRouter" and module.balance_loss == "aux_free":
        module.router.update_selection_bias(out.expert_counts, 1e-2)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out, loss


def _probe_step(options, probe, sample_weight=False, autocast=False):
    """Run a sync-free training step of a module of ``options`` inside ``probe`` (a dispatch
    mode: a detector or a counter), after a first step that builds the lazy state."""
    options = dict(options)
    module = _module(options.pop("n_outputs", 1), **options)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_ROWS, 6, generator=generator)
    y = torch.randn(N_ROWS, module.n_outputs, generator=generator)
    weight = (torch.arange(N_ROWS) % 5 != 0).float() if sample_weight else None
    with sync_free_paths():
        _training_step(module, optimizer, x, y, weight, autocast)
        with probe:
            _training_step(module, optimizer, x, y, weight, autocast)
    return probe


def _detect_step(options, sample_weight=False, autocast=False):
    return _probe_step(options, HostSyncDetector(), sample_weight, autocast)


@pytest.mark.parametrize("name", SYNC_FREE_CONFIGS)
def test_a_training_step_reads_nothing_on_the_host(name):
    detector = _detect_step(SYNC_FREE_CONFIGS[name])
    assert detector.syncs == [], detector.report()


def _launches_per_step(n_experts: int) -> KernelLaunchCounter:
    return _probe_step(dict(n_experts=n_experts, top_k=2, expert_hidden=(32, 32)), KernelLaunchCounter())


def test_a_sync_free_training_step_launches_as_many_kernels_whatever_the_number_of_experts():
    # Sparse routing's promise on a GPU, where a small step's time is its launches: the
    # launches of a training step do not grow with the experts (none per expert). (With
    # few experts the blocked layout is one block per expert, which launches fewer.)
    counters = {n_experts: _launches_per_step(n_experts) for n_experts in (8, 16, 64, 128)}
    launches = {n_experts: counter.launches for n_experts, counter in counters.items()}
    assert len(set(launches.values())) == 1, (launches, counters[128].by_op - counters[8].by_op)
    assert launches[64] > 100  # the counter sees the forward, the backward and the update


class _ExpertTableGathers(TorchDispatchMode):
    """Count the row gathers (``index_select`` along axis 0) from tensors with one row per
    expert: the per-expert parameters that a sparse step selects for its routed rows."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.gathers = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func == torch.ops.aten.index_select.default and args[1] == 0 and args[0].shape[0] == self.n_experts:
            self.gathers += 1
        return func(*args, **(kwargs or {}))


def test_a_sparse_adapter_step_gathers_every_adapter_at_once():
    # Every layer's scalings and biases, its norms and the output head are selected for the
    # routed rows by one gather (a GPU's step time is its launches), not one each.
    options = dict(n_experts=64, expert_type="adapter", layer_norm=True)
    assert _probe_step(options, _ExpertTableGathers(64)).gathers == 1


class _SlowGpuKernels(TorchDispatchMode):
    """Operators that a GPU runs far below its width: a scan along an axis other than the
    last of a tensor of several dimensions (PyTorch's CUDA scan then loops over that axis
    in one thread per column) and an accumulating ``index_put`` (a sort of the indices)."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.cumsum.default, torch.ops.aten.cumprod.default):
            tensor, dim = args[0], args[1]
            if tensor.dim() > 1 and dim % tensor.dim() != tensor.dim() - 1:
                self.found.append(f"{func} along axis {dim} of {tuple(tensor.shape)}")
        if func in (torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                    torch.ops.aten._index_put_impl_.default):
            if (args[3] if len(args) > 3 else kwargs.get("accumulate", False)):
                self.found.append(f"{func} with accumulate=True")
        return func(*args, **kwargs)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("name", SYNC_FREE_CONFIGS)
def test_a_training_step_runs_no_scan_a_gpu_would_serialise(name, grouped, monkeypatch):
    if grouped:
        monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda device, dtype: True)
    slow = _probe_step(SYNC_FREE_CONFIGS[name], _SlowGpuKernels(), autocast=grouped)
    assert slow.found == []


def test_the_slow_kernel_detector_sees_them():
    table, rows = torch.ones(5, 3), torch.tensor([0, 0])
    with _SlowGpuKernels() as slow:
        table.cumsum(0), table.cumsum(1), table.view(-1).cumsum(0)
        table.index_put((rows,), torch.ones(2, 3), accumulate=True)
        table.index_put((rows,), torch.ones(2, 3))
    assert len(slow.found) == 2 and "axis 0 of (5, 3)" in slow.found[0] and "accumulate" in slow.found[1]


@pytest.mark.parametrize("name", ["topk-independent", "softmax-adapter", "topk-adapter-3-outputs"])
def test_a_training_step_with_sample_weights_or_bf16_autocast_reads_nothing(name):
    for detector in (_detect_step(SYNC_FREE_CONFIGS[name], sample_weight=True),
                     _detect_step(SYNC_FREE_CONFIGS[name], autocast=True)):
        assert detector.syncs == [], detector.report()


def test_the_grouped_layout_reads_nothing_on_the_host(monkeypatch):
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda device, dtype: True)
    calls = []
    original = moe_module.expert_outputs
    monkeypatch.setattr(moe_module, "expert_outputs", lambda *args: calls.append(args[4]) or original(*args))
    detector = _detect_step(dict(router="topk", layer_norm=True))
    assert set(calls) == {"grouped"}
    assert detector.syncs == [], detector.report()


@pytest.mark.parametrize("name", DOCUMENTED_SYNCS)
def test_the_variants_with_data_dependent_sizes_read_only_what_is_documented(name):
    options, expected = DOCUMENTED_SYNCS[name]
    detector = _detect_step(options)
    found = {(s.op, s.where.rsplit(" in ", 1)[1]) for s in detector.syncs}
    assert found == expected, detector.report()


def test_evaluation_and_the_cpu_paths_are_unchanged():
    assert not avoid_host_reads(torch.device("cpu"), training=True)
    assert avoid_host_reads(torch.device("cuda"), training=True)
    assert not avoid_host_reads(torch.device("cuda"), training=False)
    with sync_free_paths():
        assert avoid_host_reads(torch.device("cpu"), training=True)
        assert not avoid_host_reads(torch.device("cpu"), training=False)
    assert not avoid_host_reads(torch.device("cpu"), training=True)


# ---------------------------------------------------------------------------------------
# The sync-free paths compute what the CPU paths compute
# ---------------------------------------------------------------------------------------


def _forward_backward(module, x, y, sample_weight, sync_free, seed=3):
    module = copy.deepcopy(module)
    torch.manual_seed(seed)  # the same noise, jitter and dropout on both paths
    if sync_free:
        with sync_free_paths():
            out = module(x, sample_weight=sample_weight)
            loss = _loss(module, out, y, sample_weight)
            loss.backward()
    else:
        out = module(x, sample_weight=sample_weight)
        loss = _loss(module, out, y, sample_weight)
        loss.backward()
    return out, loss, {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", ["topk-independent", "two-experts", "topk-adapter-3-outputs",
                                  "switch-shared-grad-scaling", "hierarchical-aux-free", "mixture-density",
                                  "softmax-adapter"])
@pytest.mark.parametrize("grouped", [False, True], ids=["blocked", "grouped"])
def test_sync_free_training_equals_the_cpu_paths(name, grouped, monkeypatch):
    monkeypatch.setattr(moe_module, "grouped_mm_supported", lambda device, dtype: grouped)
    options = dict(SYNC_FREE_CONFIGS[name])
    module = _module(options.pop("n_outputs", 1), **options)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(600, 6, generator=generator)  # enough rows for the CPU's staircase layout
    y = torch.randn(600, module.n_outputs, generator=generator)
    weight = (torch.arange(600) % 7 != 0).float()
    reference, reference_loss, reference_grads = _forward_backward(module, x, y, weight, sync_free=False)
    out, loss, grads = _forward_backward(module, x, y, weight, sync_free=True)
    for field in ("output", "gates", "balance_loss", "z_loss"):
        torch.testing.assert_close(getattr(out, field), getattr(reference, field), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.expert_counts, reference.expert_counts)
    assert int(out.n_dropped) == int(reference.n_dropped) == 0
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for key, grad in reference_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


def _by_assignment(assignments) -> torch.Tensor:
    """The assignments' weights ordered by (expert, row)."""
    key = assignments.experts * (int(assignments.rows.max()) + 1) + assignments.rows
    return assignments.weights[key.argsort()]


def test_sync_free_masking_of_a_failed_expert_is_the_same_and_warns_on_leaving_training():
    module = _module(router="topk")
    with torch.no_grad():
        module.experts.output.bias[3] = float("nan")
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(4))
    with pytest.warns(RuntimeWarning, match=r"Expert\(s\) \[3\]"):
        reference = module(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing while training
        with sync_free_paths():
            out = module(x)
            out.output.sum().backward()
    torch.testing.assert_close(out.output, reference.output, rtol=1e-5, atol=1e-6)
    # The sync-free plan keeps the assignments in row order: compare them by (expert, row).
    torch.testing.assert_close(_by_assignment(out.assignments), _by_assignment(reference.assignments), rtol=0, atol=0)
    assert torch.isfinite(out.output).all()
    n_failed = int((reference.assignments.experts == 3).sum())  # every row routed to expert 3
    with pytest.warns(RuntimeWarning, match=rf"Expert\(s\) \[3\] produced non-finite output for {n_failed} routed"):
        module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.eval()  # reported once
        pickled = copy.deepcopy(module)
    assert pickled._failed_outputs is None


# ---------------------------------------------------------------------------------------
# The layouts that read nothing: their structure
# ---------------------------------------------------------------------------------------


def _plan(n_rows=300, n_experts=6, skew=1.5):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(n_rows, n_experts, generator=generator) + torch.linspace(skew, -skew, n_experts)
    top = logits.topk(2, dim=1)
    return plan_dispatch(top.indices, top.values.softmax(dim=1), n_experts, sync_free=True)


def test_a_sync_free_plan_leaves_n_slots_unread_and_gets_a_sync_free_layout():
    plan = _plan()
    assert plan.n_slots is None
    assert choose_layout(plan, training=True, device_type="cuda") == "blocked"
    assert choose_layout(plan, training=True, device_type="cuda", grouped=True) == "grouped"
    assert choose_layout(plan, training=True, device_type="cpu") == "blocked"
    read = plan_dispatch(torch.arange(12).remainder(6).view(6, 2), torch.full((6, 2), 0.5), 6)
    assert choose_layout(read, training=True, device_type="cuda", grouped=True) == "padded"


@pytest.mark.parametrize("skew", [0.0, 1.5, 30.0])
def test_the_blocked_layout_holds_whole_blocks_of_one_expert(skew):
    from sklearn_moe.nn.layouts import block_rows, blocked_layout

    plan = _plan(skew=skew)
    layout = blocked_layout(plan)
    (group,) = layout.groups
    m, n_experts = plan.rows.shape[0], 6
    rows = block_rows(m, n_experts)
    assert group.n_slots == rows and group.n_experts == (m + n_experts * (rows - 1)) // rows
    assert layout.positions.unique().numel() == m  # one buffer row each
    block = layout.positions // rows
    assert torch.equal(group.experts[block], plan.experts)  # every assignment in a block of its expert
    needed = ((plan.kept_counts + rows - 1) // rows).sum()
    assert int(needed) <= group.n_experts
    assert torch.equal(group.experts, group.experts.sort().values)


@pytest.mark.parametrize("n_experts", [4, 16, 64, 128])
def test_the_blocked_layouts_buffer_stays_near_the_assignments_of_a_large_batch(n_experts):
    # Every buffer row runs through the experts: past a mean load of 128 the buffer is
    # under 1.5 times the assignments; below it no block is thinner than 32 rows (or the
    # mean load), so a small batch does not run as many thin blocks.
    from sklearn_moe.nn.layouts import block_rows

    for mean_load in (1, 5, 16, 31, 32, 100, 128, 1000, 2048, 5000):
        m = mean_load * n_experts
        rows = block_rows(m, n_experts)
        buffer_rows = (m + n_experts * (rows - 1)) // rows * rows
        assert rows & (rows - 1) == 0 and rows >= 8
        if mean_load >= 128:
            assert buffer_rows < 1.5 * m, (mean_load, rows)
        else:
            assert rows >= min(32, mean_load), (mean_load, rows)


def test_the_blocked_layout_is_one_block_per_expert_when_a_bound_makes_that_smaller():
    from sklearn_moe.nn.layouts import blocked_layout

    generator = torch.Generator().manual_seed(6)
    indices = torch.rand(300, 2, generator=generator).argsort(dim=1)  # 2 experts, both on every row
    plan = plan_dispatch(indices, torch.full((300, 2), 0.5), 2, sync_free=True)
    layout = blocked_layout(plan, max_count=300)
    (group,) = layout.groups
    assert group.experts is None and group.n_experts == 2 and group.n_slots == 300  # exactly the rows
    assert torch.equal(layout.positions, plan.experts * 300 + plan.slots)
    wide = _plan()  # 6 experts: one block of the 300 rows each would be larger than the blocks
    assert blocked_layout(wide, max_count=300).groups[0].experts is not None
    module = _module(router="topk")
    module.experts = MixtureOfExperts(6, 1, n_experts=2, top_k=2, expert_hidden=(16, 16)).experts
    x = torch.randn(300, 6, generator=generator)
    with torch.no_grad():
        bounded = expert_outputs(x, module.experts, plan, 1, "blocked", max_count=300)
        reference = expert_outputs(x, module.experts, plan, 1, "padded")
    assert torch.equal(bounded, reference)


@pytest.mark.parametrize("skew", [0.0, 1.5, 30.0])
def test_the_grouped_layout_pads_every_group_to_whole_alignment_units(skew):
    from sklearn_moe.nn.layouts import GROUP_ALIGN, grouped_layout

    plan = _plan(skew=skew)
    layout = grouped_layout(plan)
    m = plan.rows.shape[0]
    assert layout.n_rows == -(-m // GROUP_ALIGN) * GROUP_ALIGN + 6 * GROUP_ALIGN
    ends = layout.offsets.long()
    assert layout.offsets.dtype == torch.int32 and int(ends[-1]) == layout.n_rows
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    assert bool((sizes % GROUP_ALIGN == 0).all()) and bool((sizes >= torch.clamp(plan.kept_counts, min=1)).all())
    assert torch.equal(layout.row_experts[layout.positions], plan.experts)
    assert layout.positions.unique().numel() == m
    assert torch.equal(layout.row_experts, torch.repeat_interleave(torch.arange(6), sizes))


def test_the_sync_free_layouts_of_an_empty_batch():
    module = _module(router="topk")
    plan = plan_dispatch(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 8, sync_free=True)
    for layout in ("blocked", "grouped"):
        assert expert_outputs(torch.zeros(0, 6), module.experts, plan, 1, layout).shape == (0, 1)


# ---------------------------------------------------------------------------------------
# The estimators: a training step reads nothing, and the deferred loss check holds
# ---------------------------------------------------------------------------------------


class StepDetector(Callback):
    """Run the detectors (host reads, and kernels a GPU would serialise) over one training
    step: from its batch's start to the end of every callback's ``on_batch_end`` (forward,
    losses, backward, clipping, optimizer step, the learning-rate schedule and the routing
    metrics)."""

    def __init__(self, step=3):
        self.step = step

    def initialize(self):
        self.count, self.detector, self.syncs, self.slow_kernels = -1, None, None, None
        return super().initialize()

    def on_batch_begin(self, net, training=None, **kwargs):
        if training:
            self.count += 1
            if self.count == self.step:
                self.detector = HostSyncDetector().__enter__()
                self.slow = _SlowGpuKernels().__enter__()

    def on_batch_end(self, net, training=None, **kwargs):
        if training and self.detector is not None:
            self.slow.__exit__(None, None, None)
            self.detector.__exit__(None, None, None)
            self.syncs, self.report, self.detector = self.detector.syncs, self.detector.report(), None
            self.slow_kernels = self.slow.found


@pytest.mark.parametrize("options", [{}, {"router": "topk", "expert_type": "independent", "balance_loss": "aux_free"},
                                     {"sample_weight": True}, {"classifier": True}],
                         ids=["default", "topk-independent-aux-free", "sample-weight", "classifier"])
def test_an_estimator_training_step_reads_nothing_on_the_host(options, regression_data):
    X, y = regression_data
    options = dict(options)
    fit_params = {"sample_weight": np.linspace(0.5, 2.0, len(y))} if options.pop("sample_weight", False) else {}
    estimator_class = MoEClassifier if options.pop("classifier", False) else MoERegressor
    target = (y > 0).astype(int) if estimator_class is MoEClassifier else y
    probe = StepDetector()
    with sync_free_paths():
        estimator_class(**dict(PARAMS, max_epochs=1, **options)).fit(X, target, callbacks=[probe], **fit_params)
    assert probe.syncs == [], probe.report
    assert probe.slow_kernels == []  # nor a scan a GPU would serialise (see _SlowGpuKernels)


def test_the_default_estimator_fits_the_same_on_the_sync_free_paths(regression_data):
    X, y = regression_data
    # Without dropout, whose masks are drawn otherwise on the GPU's paths (a Bernoulli mask)
    params = dict(PARAMS, max_epochs=3, dropout=0.0)
    reference = MoERegressor(**params).fit(X, y)
    with sync_free_paths():
        model = MoERegressor(**params).fit(X, y)
    np.testing.assert_array_equal(model.history_["train_loss"], reference.history_["train_loss"])
    np.testing.assert_array_equal(model.history_["task_loss"], reference.history_["task_loss"])
    np.testing.assert_array_equal(model.predict(X), reference.predict(X))


def test_a_deferred_nan_loss_still_rolls_the_epoch_back(regression_data):
    X, y = regression_data
    poison = PoisonOutput({BATCHES_PER_EPOCH * 2 + 3})  # fourth batch of the third epoch
    model = MoERegressor(**PARAMS)
    with sync_free_paths(), pytest.warns(RuntimeWarning, match="non-finite training loss .* epoch 3: rolled back"):
        model.fit(X, y, callbacks=[poison])
    # Checked at the end of the epoch's batches (where a GPU's copies have landed): the
    # poisoned epoch ran to its end before its rollback and rerun.
    assert poison.count + 1 == BATCHES_PER_EPOCH * (PARAMS["max_epochs"] + 1)
    assert model.n_iter_ == PARAMS["max_epochs"]
    assert list(model.history_["epoch"]) == list(range(1, PARAMS["max_epochs"] + 1))
    assert np.isfinite(model.history_["train_loss"]).all()
    assert model.net_.optimizer_.param_groups[0]["lr"] == pytest.approx(PARAMS["learning_rate"] * 0.1)
    assert np.isfinite(model.predict(X)).all()


def test_a_deferred_persistent_divergence_still_raises(regression_data):
    X, y = regression_data
    model = MoERegressor(**PARAMS)
    with sync_free_paths(), pytest.warns(RuntimeWarning, match="rolled back") as record:
        with pytest.raises(TrainingDivergedError, match="Training diverged"):
            model.fit(X, y, callbacks=[PoisonOutput(range(10_000))])
    assert len([w for w in record if "rolled back" in str(w.message)]) == MAX_ROLLBACKS
    assert not hasattr(model, "net_")
