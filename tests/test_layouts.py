"""The faster dispatch layouts (nn/layouts.py) against the reference padded layout."""

import pytest
import torch

from sklearn_moe.nn import LAYOUTS, choose_layout, dispatch_combine, expert_outputs, plan_dispatch
from sklearn_moe.nn.dispatch import ExpertAssignments, assignment_grid, combine, padded_layout
from sklearn_moe.nn.experts import StackedExperts
from sklearn_moe.nn.layouts import SORTED_MIN_ROWS_PER_EXPERT, STAIRCASE_MIN_ASSIGNMENTS, staircase_layout

from .test_nn import inputs, make_moe

FASTER = [layout for layout in LAYOUTS if layout != "padded"]


def skewed_plan(router="topk", n_rows=600, n_outputs=2, **kwargs):
    """A module whose router favours the first experts (uneven loads), its input and its plan."""
    module = make_moe(router=router, n_experts=6, top_k=2, n_outputs=n_outputs, expert_hidden=(8, 8), **kwargs)
    for gate in (m for m in module.router.modules() if isinstance(m, torch.nn.Linear)):
        with torch.no_grad():
            gate.bias.copy_(torch.linspace(1.5, -1.5, gate.bias.shape[0]))
    x = inputs(n_rows)
    with torch.no_grad():
        routing = module.router(x)
    return module, x, plan_dispatch(routing.indices, routing.weights, 6, active=routing.active)


def layout_combine(module, x, plan, layout):
    outputs = expert_outputs(x, module.experts, plan, module.n_outputs, layout)
    return combine(ExpertAssignments(plan.rows, plan.experts, plan.weights, outputs), x.shape[0])


@pytest.mark.parametrize("n_outputs", [1, 3])
@pytest.mark.parametrize("router", ["topk", "top_p", "hierarchical"])
@pytest.mark.parametrize("layout", FASTER)
def test_every_layout_equals_the_reference_bit_for_bit_in_evaluation(layout, router, n_outputs):
    module, x, plan = skewed_plan(router, n_outputs=n_outputs, layer_norm=True)
    module.eval()
    assert len(staircase_layout(plan).groups) > 1  # uneven enough for a real staircase
    with torch.no_grad():
        reference = dispatch_combine(x, module.experts, plan, n_outputs)
        ours = layout_combine(module, x, plan, layout)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("layout", FASTER)
def test_every_layout_trains_like_the_reference(layout):
    module, x, plan = skewed_plan()
    module.train()
    results = []
    for name in ("padded", layout):
        module.zero_grad()
        out = layout_combine(module, x, plan, name)
        (out * torch.linspace(-1, 1, 2)).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in module.experts.named_parameters()}))
    (reference, reference_grads), (ours, grads) = results
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)
    assert any(grad.abs().sum() > 0 for grad in grads.values())


def test_expert_outputs_are_in_plan_order():
    module, x, plan = skewed_plan(n_rows=50)
    with torch.no_grad():
        for layout in LAYOUTS:
            outputs = expert_outputs(x, module.experts, plan, 2, layout)
            each = torch.stack([module.experts(x[row].view(1, 1, -1).expand(6, 1, -1))[expert, 0]
                                for row, expert in zip(plan.rows.tolist(), plan.experts.tolist())])
            torch.testing.assert_close(outputs, each, rtol=1e-6, atol=1e-6)


def test_expert_outputs_rejects_an_unknown_layout():
    module, x, plan = skewed_plan(n_rows=10)
    with pytest.raises(ValueError, match="layout must be one of"):
        expert_outputs(x, module.experts, plan, 2, "diagonal")


def test_choose_layout():
    module, x, skewed = skewed_plan(n_rows=STAIRCASE_MIN_ASSIGNMENTS // 2)  # exactly the minimum assignments
    assert skewed.rows.shape[0] == STAIRCASE_MIN_ASSIGNMENTS
    assert choose_layout(skewed, training=True, device_type="cpu") == "staircase"
    assert choose_layout(skewed, training=True, device_type="cuda") == "padded"
    even = plan_dispatch(torch.arange(600).remainder(6).view(300, 2), torch.full((300, 2), 0.5), 6)
    assert choose_layout(even, training=True, device_type="cpu") == "padded"  # nothing to save
    fewer = plan_dispatch(skewed.experts[:-2].view(-1, 1), torch.ones(skewed.rows.shape[0] - 2, 1), 6)
    assert choose_layout(fewer, training=True, device_type="cpu") == "padded"
    at_sorted = plan_dispatch(torch.arange(SORTED_MIN_ROWS_PER_EXPERT * 6).remainder(6).view(-1, 1),
                              torch.ones(SORTED_MIN_ROWS_PER_EXPERT * 6, 1), 6)
    assert choose_layout(at_sorted, training=False, device_type="cpu") == "sorted"
    assert choose_layout(at_sorted, training=False, device_type="cuda") == "padded"
    below = plan_dispatch(at_sorted.experts[1:].view(-1, 1), torch.ones(at_sorted.rows.shape[0] - 1, 1), 6)
    assert choose_layout(below, training=False, device_type="cpu") == "padded"
    # Few rows per expert, but one expert with most of them: padding 256 experts to it
    # would take 256 x 1000 rows for 2000 assignments (prediction was 30x slower).
    n_experts, n_rows = 256, 1000
    choices = torch.stack([torch.zeros(n_rows, dtype=torch.long), torch.arange(n_rows) % (n_experts - 1) + 1], 1)
    uneven = plan_dispatch(choices, torch.full((n_rows, 2), 0.5), n_experts)
    assert uneven.rows.shape[0] < SORTED_MIN_ROWS_PER_EXPERT * n_experts
    assert choose_layout(uneven, training=False, device_type="cpu") == "sorted"


def test_padded_layout_pads_every_expert_to_the_busiest():
    _, _, plan = skewed_plan(n_rows=40)
    layout = padded_layout(plan)
    (group,) = layout.groups
    assert group.experts is None and group.n_experts == 6 and group.n_slots == int(plan.kept_counts.max())
    assert torch.equal(layout.positions, plan.experts * group.n_slots + plan.slots)


def test_large_eval_batches_take_the_sorted_layout_with_the_same_predictions(monkeypatch):
    module = make_moe(n_experts=3, top_k=2, expert_hidden=(8, 8)).eval()
    x = inputs(SORTED_MIN_ROWS_PER_EXPERT * 3 // 2)  # exactly at the threshold: 2 assignments a row
    calls = []
    original = StackedExperts.forward_sorted
    monkeypatch.setattr(StackedExperts, "forward_sorted",
                        lambda self, *args: calls.append(1) or original(self, *args))
    with torch.inference_mode():
        large = module.predict(x)
        assert torch.equal(large, module(x).output)  # the mixture itself
    assert calls, "a batch with enough rows per expert must take the sorted layout"
    calls.clear()
    with torch.inference_mode():
        small = torch.cat([module.predict(x[i:i + 20]) for i in range(0, len(x), 20)])
    assert not calls
    assert torch.equal(large, small)
    with pytest.warns(RuntimeWarning, match=r"Expert\(s\) \[1\]"):  # failure masking holds here too
        with torch.no_grad():
            module.experts.output.bias[1] = float("nan")
            masked = module.predict(x)
    assert torch.isfinite(masked).all()


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_plan_in_row_order_ranks_each_assignment_within_its_expert(sync_free):
    # expert_order=False ranks each assignment within its expert by a one-hot cumulative
    # sum instead of a sort: the same (row, expert, weight) assignments, in row order.
    module, x, _ = skewed_plan()
    with torch.no_grad():
        routing = module.router(x)
    sorted_plan = plan_dispatch(routing.indices, routing.weights, 6)
    plan = plan_dispatch(routing.indices, routing.weights, 6, sync_free=sync_free, expert_order=False)
    assert sorted_plan.by_expert and not plan.by_expert
    assert sorted_plan.per_row == 0 and plan.per_row == 2
    n = x.shape[0]
    assert torch.equal(plan.rows, torch.arange(2 * n) // 2)  # row 0's two choices, then row 1's, ...
    assert torch.equal(plan.experts, routing.indices.reshape(-1))
    assert torch.equal(plan.counts, sorted_plan.counts) and torch.equal(plan.kept_counts, sorted_plan.kept_counts)
    assert plan.n_slots == (None if sync_free else sorted_plan.n_slots)
    for expert in range(6):  # each expert's assignments take slots 0, 1, 2, ... in row order
        slots = plan.slots[plan.experts == expert]
        assert torch.equal(slots, torch.arange(slots.shape[0]))

    def weights_by_assignment(p):
        return p.weights[(p.experts * n + p.rows).argsort()]

    assert torch.equal(weights_by_assignment(plan), weights_by_assignment(sorted_plan))


def test_a_plan_in_row_order_never_takes_the_sorted_layout():
    module, x, _ = skewed_plan(n_rows=6 * SORTED_MIN_ROWS_PER_EXPERT * 2)
    module.eval()
    with torch.no_grad():
        routing = module.router(x)
        plan = plan_dispatch(routing.indices, routing.weights, 6, expert_order=False)
        assert choose_layout(plan, training=False, device_type="cpu") == "padded"
        assert choose_layout(plan._replace(per_row=0), training=False, device_type="cpu") == "sorted"
        with pytest.raises(ValueError, match="sorted by expert"):
            expert_outputs(x, module.experts, plan, module.n_outputs, "sorted")
        reference = dispatch_combine(x, module.experts, plan_dispatch(routing.indices, routing.weights, 6), 2)
        torch.testing.assert_close(layout_combine(module, x, plan, "blocked"), reference, rtol=1e-6, atol=1e-6)


def test_the_blocked_layout_of_a_single_expert_holds_its_rows():
    from sklearn_moe.nn.layouts import blocked_layout

    plan = plan_dispatch(torch.zeros(100, 1, dtype=torch.long), torch.ones(100, 1), 1, sync_free=True,
                         expert_order=False)
    layout = blocked_layout(plan)
    (group,) = layout.groups
    assert torch.equal(group.experts, torch.zeros(group.n_experts, dtype=torch.long))
    assert torch.equal(layout.positions, torch.arange(100))


@pytest.mark.parametrize("block_experts", [[torch.tensor([3, 0, 3, 5, 1])], [torch.tensor([2, 2]), torch.tensor([4])]])
def test_selecting_experts_for_blocks_has_index_selects_values_and_gradients(block_experts):
    # One block: every tensor gathered side by side and the gradients scattered end to end
    # at once; several: one gather per tensor. Either way the values and gradients of
    # index_select, and gradients with their parameters' strides (autograd keeps them as
    # they are instead of copying them).
    from sklearn_moe.nn.experts import select_experts

    generator = torch.Generator().manual_seed(8)
    stacked = [torch.randn(6, *shape, generator=generator, requires_grad=True) for shape in ((4, 3), (1, 3), (3,), ())]
    references = [[t.index_select(0, ids) for ids in block_experts] for t in stacked]
    selected = select_experts(stacked, block_experts)
    probes = [[torch.randn(s.shape, generator=generator) for s in per_tensor] for per_tensor in references]
    for ours, reference in zip(selected, references):
        for a, b in zip(ours, reference):
            assert torch.equal(a, b)
    grads = torch.autograd.grad(sum((s * p).sum() for ss, ps in zip(selected, probes) for s, p in zip(ss, ps)), stacked)
    reference_grads = torch.autograd.grad(
        sum((s * p).sum() for ss, ps in zip(references, probes) for s, p in zip(ss, ps)), stacked)
    for grad, reference, tensor in zip(grads, reference_grads, stacked):
        torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-6)
        assert grad.stride() == tensor.stride()


def test_a_plan_whose_one_hot_table_would_be_too_large_is_sorted(monkeypatch):
    from sklearn_moe.nn import dispatch

    indices = torch.tensor([[3, 1], [1, 0], [3, 2]])
    weights = torch.full((3, 2), 0.5)
    assert not plan_dispatch(indices, weights, 4, sync_free=True, expert_order=False).by_expert
    monkeypatch.setattr(dispatch, "ONE_HOT_MAX_ENTRIES", 6 * 4 - 1)
    plan = plan_dispatch(indices, weights, 4, sync_free=True, expert_order=False)
    assert plan.by_expert and torch.equal(plan.experts, torch.tensor([0, 1, 1, 2, 3, 3]))


@pytest.mark.parametrize("layout", ["padded", "blocked", "grouped"])
def test_a_plan_in_row_order_trains_like_a_sorted_plan_input_gradient_included(layout):
    # Row order broadcasts each row to its k buffer positions and sums each row's k outputs
    # over a view, where a sorted plan gathers and scatter-adds by row.
    module, x, _ = skewed_plan()
    module.train()
    with torch.no_grad():
        routing = module.router(x)
    results = []
    for plan, name in ((plan_dispatch(routing.indices, routing.weights, 6), "padded"),
                       (plan_dispatch(routing.indices, routing.weights, 6, expert_order=False), layout)):
        module.zero_grad()
        rows = x.clone().requires_grad_()
        outputs = expert_outputs(rows, module.experts, plan, module.n_outputs, name)
        assignments = ExpertAssignments(plan.rows, plan.experts, plan.weights, outputs, assignment_grid(plan))
        out = combine(assignments, x.shape[0])
        (out * torch.linspace(-1, 1, 2)).sum().backward()
        results.append((out.detach(), rows.grad, module.experts.output.weight.grad.clone()))
    assert results[1][1].abs().sum() > 0
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
