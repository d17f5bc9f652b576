"""Unit tests of the routing family: top-p and hierarchical routers, capacity rerouting, the
staircase dispatch layout, the diversity loss and per-expert gradient scaling, and the
estimator parameters that expose them."""

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe.nn import (
    HierarchicalRouter,
    TopPRouter,
    dispatch_combine,
    expert_diversity_loss,
    make_router,
    plan_dispatch,
    plan_layout,
    scale_gradient,
    switch_balance_loss,
)
from sklearn_moe.nn.dispatch import ExpertGroup, padded_layout
from sklearn_moe.nn.layouts import MAX_GROUPS, staircase_layout

from .conftest import FAST
from .test_nn import inputs, make_moe, skew_router

# The probabilities of experts 0..3; expert 1 is the best, then 3, 0, 2.
PROBS = [0.15, 0.5, 0.05, 0.3]
ORDER = [1, 3, 0, 2]


def fixed_top_p_router(top_p, top_k=4, learned_threshold=False, probs=PROBS):
    """A top-p router whose probabilities are ``probs`` on every row (zero gate weight)."""
    router = make_router("top_p", 3, n_experts=len(probs), top_k=top_k, top_p=top_p,
                         learned_threshold=learned_threshold)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.copy_(torch.tensor(probs).log())
    return router


def expert_grads(module):
    return {name: p.grad.clone() for name, p in module.experts.named_parameters()}


# ---------------------------------------------------------------------------------------
# 1. top-p router: the minimal prefix of the sorted experts reaching top_p
# ---------------------------------------------------------------------------------------


def test_top_p_router_is_registered_with_its_options():
    router = make_router("top_p", 3, n_experts=4, top_k=2, top_p=0.3, n_groups=7)  # n_groups: not its option
    assert isinstance(router, TopPRouter)
    assert router.top_p == 0.3 and router.threshold_logit is None
    assert not router.is_dense
    for bad in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError, match="top_p"):
            make_router("top_p", 3, n_experts=4, top_k=2, top_p=bad)


@pytest.mark.parametrize("top_p, n_active", [(0.5, 1), (0.7, 2), (0.81, 3), (0.96, 4), (1.0, 4), (0.2, 1)])
def test_top_p_picks_the_minimal_prefix_reaching_top_p(top_p, n_active):
    # the reference: smallest prefix of the sorted probabilities whose sum reaches top_p
    cumulative = np.cumsum(sorted(PROBS, reverse=True))
    assert int(np.argmax(cumulative >= top_p - 1e-12)) + 1 == n_active
    router = fixed_top_p_router(top_p)
    routing = router(inputs(6, 3))
    assert routing.indices.tolist() == [ORDER] * 6
    assert routing.active.dtype == torch.bool
    assert routing.active.tolist() == [[True] * n_active + [False] * (4 - n_active)] * 6
    chosen = torch.tensor([PROBS[e] for e in ORDER])
    kept = torch.where(routing.active[0], chosen, 0.0)
    torch.testing.assert_close(routing.weights, (kept / kept.sum()).expand(6, -1))
    torch.testing.assert_close(routing.weights.sum(1), torch.ones(6))
    assert (routing.weights[~routing.active] == 0).all()
    torch.testing.assert_close(routing.probs, torch.tensor(PROBS).expand(6, -1))
    assert router.is_dense is False
    # the scores rank the experts in the order they were chosen (rerouting's next choices)
    assert routing.scores.argsort(dim=1, descending=True).tolist() == [ORDER] * 6


@pytest.mark.parametrize("top_k, top_p, n_active", [(2, 0.96, 2), (3, 1.0, 3), (1, 0.9, 1), (3, 0.7, 2)])
def test_top_k_caps_the_top_p_set(top_k, top_p, n_active):
    routing = fixed_top_p_router(top_p, top_k=top_k)(inputs(3, 3))
    assert routing.indices.tolist() == [ORDER[:top_k]] * 3
    assert routing.active.sum(1).tolist() == [n_active] * 3
    chosen = torch.tensor([PROBS[e] for e in ORDER[:n_active]])
    torch.testing.assert_close(routing.weights[:, :n_active], (chosen / chosen.sum()).expand(3, -1))


def test_top_p_single_expert_has_unit_weight_and_gradient_of_log_p():
    router = fixed_top_p_router(0.5)
    x = inputs(5, 3)
    routing = router(x)
    assert routing.active.sum(1).tolist() == [1] * 5
    assert (routing.weights[:, 0] == 1.0).all()  # exactly 1
    value = torch.tensor([2.0, -1.0, 0.5, 3.0])  # something expert-dependent
    (routing.weights * value[routing.indices]).sum().backward()
    # d/dlogits of sum_rows value[best] * log p_best = n * value[best] * (onehot(best) - p)
    p = torch.tensor(PROBS)
    per_row = value[1] * (torch.nn.functional.one_hot(torch.tensor(1), 4).float() - p)
    torch.testing.assert_close(router.gate.bias.grad, 5 * per_row)
    torch.testing.assert_close(router.gate.weight.grad, torch.outer(per_row, x.sum(0)))
    assert router.gate.bias.grad.abs().sum() > 0


def test_top_p_multi_expert_weights_carry_the_gradient_of_the_renormalised_probabilities():
    router = fixed_top_p_router(0.7)  # experts 1 and 3, weights 0.625 and 0.375
    routing = router(inputs(1, 3))
    value = torch.tensor([0.0, 1.0, 0.0, 0.0])
    (routing.weights * value[routing.indices]).sum().backward()
    # w_1 = p_1 / (p_1 + p_3) = sigmoid(l_1 - l_3): dw/dl_1 = w(1-w), dw/dl_3 = -w(1-w), else 0
    w = 0.625
    torch.testing.assert_close(router.gate.bias.grad, torch.tensor([0.0, w * (1 - w), 0.0, -w * (1 - w)]))


# ---------------------------------------------------------------------------------------
# 2. top-p with learned per-expert thresholds
# ---------------------------------------------------------------------------------------


def test_learned_threshold_parameter_and_initial_value():
    router = make_router("top_p", 3, n_experts=5, top_k=3, learned_threshold=True)
    assert isinstance(router.threshold_logit, torch.nn.Parameter)
    assert router.threshold_logit.shape == (5,)
    torch.testing.assert_close(torch.sigmoid(router.threshold_logit.detach()), torch.full((5,), 0.2))
    assert any(p is router.threshold_logit for p in router.parameters())


def test_learned_threshold_keeps_an_expert_iff_its_probability_reaches_the_threshold():
    torch.manual_seed(0)
    router = make_router("top_p", 5, n_experts=4, top_k=4, learned_threshold=True, top_p=0.01)
    thresholds = torch.tensor([0.12, 0.3, 0.2, 0.25])
    with torch.no_grad():
        router.gate.weight.mul_(4.0)
        router.threshold_logit.copy_(torch.logit(thresholds))
    x = inputs(300, 5)
    routing = router(x)
    probs = routing.probs.detach()
    chosen = probs.gather(1, routing.indices)
    expected = chosen >= thresholds[routing.indices]
    expected[:, 0] = True  # the best expert always
    assert torch.equal(routing.active, expected)
    # top_p is not the rule here (0.01 would keep only the best expert)
    assert routing.active[:, 1:].any() and not routing.active[:, 1:].all()
    kept = torch.where(expected, chosen, 0.0)
    torch.testing.assert_close(routing.weights.detach(), kept / kept.sum(1, keepdim=True))
    # gradient reaches the thresholds (straight-through), finite
    value = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (routing.weights * value[routing.indices]).sum().backward()
    grad = router.threshold_logit.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert torch.isfinite(router.gate.weight.grad).all()


def test_learned_threshold_gradient_sign_raising_a_threshold_drops_a_useful_expert():
    # two active experts, expert 3 (second) has the higher value: raising its threshold would
    # lower its (straight-through) keep, so the loss -value gets a positive gradient.
    router = fixed_top_p_router(0.5, learned_threshold=True)
    with torch.no_grad():
        router.threshold_logit.copy_(torch.logit(torch.tensor([0.9, 0.9, 0.9, 0.25])))
    routing = router(inputs(2, 3))
    # expert 1 (p = 0.5) is below its threshold 0.9 but is the best: kept
    assert routing.active.tolist() == [[True, True, False, False]] * 2
    value = torch.tensor([0.0, 0.0, 0.0, 1.0])
    (-(routing.weights * value[routing.indices]).sum()).backward()
    grad = router.threshold_logit.grad
    assert grad[3] > 0
    assert grad[1] == 0  # the best expert's keep is the constant 1


# ---------------------------------------------------------------------------------------
# 3. hierarchical router
# ---------------------------------------------------------------------------------------

GROUPS = {2: [[0, 1, 2], [3, 4, 5]], 3: [[0, 1], [2, 3], [4, 5]]}  # contiguous groups of 6 experts


def hierarchical_reference(router, x, n_groups):
    """(group probabilities, within-group probabilities, leaf probabilities), float64."""
    q = router.group_gate(x).double().softmax(dim=1)
    logits = router.gate(x).double()
    within = torch.zeros_like(logits)
    leaf = torch.zeros_like(logits)
    for g, members in enumerate(GROUPS[n_groups]):
        within[:, members] = logits[:, members].softmax(dim=1)
        leaf[:, members] = q[:, g:g + 1] * within[:, members]
    return q, within, leaf


@pytest.mark.parametrize("n_groups", [2, 3])
@pytest.mark.parametrize("top_k", [1, 2, 3, 6])
def test_hierarchical_router_probabilities_and_choices(n_groups, top_k):
    torch.manual_seed(top_k)
    router = make_router("hierarchical", 5, n_experts=6, top_k=top_k, n_groups=n_groups, top_p=0.9)
    assert isinstance(router, HierarchicalRouter)
    assert router.n_groups == n_groups
    assert router.experts_per_row == min(top_k, 6 // n_groups)
    x = inputs(40, 5)
    routing = router(x)
    q, within, leaf = hierarchical_reference(router, x, n_groups)
    torch.testing.assert_close(routing.probs.double(), leaf, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(routing.probs.sum(1), torch.ones(40))
    if top_k == 6:
        assert router.is_dense is True
        assert routing.indices.tolist() == [list(range(6))] * 40
        torch.testing.assert_close(routing.weights, routing.probs)
        return
    assert router.is_dense is False
    k = min(top_k, 6 // n_groups)
    assert routing.indices.shape == (40, k)
    best_group = q.argmax(dim=1)
    group_of = torch.tensor([g for g, members in enumerate(GROUPS[n_groups]) for _ in members])
    assert (group_of[routing.indices] == best_group.unsqueeze(1)).all()
    assert routing.indices.unique(dim=1).shape[1] == k  # distinct within a row
    # the chosen are the best of the group, best first
    chosen = within.gather(1, routing.indices)
    in_group = group_of.unsqueeze(0) == best_group.unsqueeze(1)
    rest = within.masked_fill(~in_group, -1.0).scatter(1, routing.indices, -1.0)
    assert (chosen.min(1).values >= rest.max(1).values).all()
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
    torch.testing.assert_close(routing.weights.sum(1), torch.ones(40))
    torch.testing.assert_close(routing.weights.double(), chosen / chosen.sum(1, keepdim=True), rtol=1e-5, atol=1e-7)


def test_hierarchical_group_sizes_and_invalid_n_groups():
    router = make_router("hierarchical", 3, n_experts=7, top_k=3, n_groups=3)
    assert torch.bincount(router.group_of_expert).tolist() == [3, 2, 2]
    assert router.experts_per_row == 2  # at most the smallest group
    assert (router.group_of_expert[1:] >= router.group_of_expert[:-1]).all()  # contiguous
    for bad in (0, 8):
        with pytest.raises(ValueError, match="n_groups"):
            make_router("hierarchical", 3, n_experts=7, top_k=2, n_groups=bad)


def test_hierarchical_single_group_is_topk():
    torch.manual_seed(0)
    hier = make_router("hierarchical", 5, n_experts=4, top_k=2, n_groups=1)
    topk = make_router("topk", 5, n_experts=4, top_k=2)
    topk.gate.load_state_dict(hier.gate.state_dict())
    x = inputs(30, 5)
    a, b = hier(x), topk(x)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(a.probs, b.probs)


@pytest.mark.parametrize("top_k", [1, 2, 6])
def test_moe_with_hierarchical_router_trains_and_predicts(top_k):
    module = make_moe(n_experts=6, top_k=top_k, router="hierarchical", n_groups=3)
    x = inputs(32)
    out = module(x)
    assert out.output.shape == (32, 2) and torch.isfinite(out.output).all()
    torch.testing.assert_close(out.gates.sum(1), torch.ones(32))
    assert out.expert_counts.sum() == 32 * (6 if top_k == 6 else min(top_k, 2))
    out.output.square().sum().backward()  # the task loss alone reaches both levels
    for gate in (module.router.group_gate, module.router.gate):
        assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        predicted = module(x)
    assert torch.isfinite(predicted.output).all()
    torch.testing.assert_close(predicted.output, out.output.detach())  # no noise, no capacity here


def test_hierarchical_task_gradient_reaches_the_group_gate_through_the_unit_group_weight():
    # top-1 in a group: the gate weight is exactly 1, but d/d(group logits) is that of log q_g
    torch.manual_seed(0)
    router = make_router("hierarchical", 5, n_experts=6, top_k=1, n_groups=2)
    x = inputs(8, 5)
    routing = router(x)
    assert (routing.weights == 1.0).all()
    routing.weights.sum().backward()
    q = router.group_gate(x).softmax(dim=1).detach()
    best = q.argmax(dim=1)
    expected = (torch.nn.functional.one_hot(best, 2) - q).sum(0)  # sum_rows d log q_best / d logits
    torch.testing.assert_close(router.group_gate.bias.grad, expected)


# ---------------------------------------------------------------------------------------
# 4. Switch balance loss with dynamic k
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, 3, 4])
def test_switch_balance_uniform_routing_with_active_mask_is_one(top_k):
    n_experts = 4
    probs = torch.full((8, n_experts), 1 / n_experts)
    indices = torch.stack([torch.roll(torch.arange(n_experts), -r)[:top_k] for r in range(8)])
    torch.testing.assert_close(switch_balance_loss(probs, indices), torch.tensor(1.0))
    # an active mask that leaves a balanced subset: first choices only (every expert twice)
    active = torch.zeros(8, top_k, dtype=torch.bool)
    active[:, 0] = True
    torch.testing.assert_close(switch_balance_loss(probs, indices, active=active), torch.tensor(1.0))


def test_switch_balance_loss_counts_only_active_assignments():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    indices = torch.tensor([[0, 1], [1, 2], [2, 0], [0, 1]])
    active = torch.tensor([[True, False], [True, True], [True, False], [True, True]])
    # active assignments: 0, 1, 2, 2, 0, 1 -> f = [2, 2, 2] / 6; inactive would add 1 and 0
    f = torch.tensor([2.0, 2.0, 2.0]) / 6
    expected = 3 * torch.dot(f, probs.mean(0))
    torch.testing.assert_close(switch_balance_loss(probs, indices, active=active), expected)
    all_f = torch.tensor([3.0, 3.0, 2.0]) / 8
    torch.testing.assert_close(switch_balance_loss(probs, indices), 3 * torch.dot(all_f, probs.mean(0)))
    # with a row mask too: rows 0 and 1 only -> assignments 0, 1, 2
    mask = torch.tensor([True, True, False, False])
    expected = 3 * torch.dot(torch.full((3,), 1 / 3), probs[:2].mean(0))
    torch.testing.assert_close(switch_balance_loss(probs, indices, mask, active), expected)


def test_moe_top_p_balance_loss_and_counts_use_only_active_experts():
    module = make_moe(n_experts=4, top_k=3, router="top_p", top_p=0.6)
    x = inputs(50)
    out = module(x)
    routing = module.router(x)
    assert 0 < (~routing.active).sum() < routing.active.numel()  # genuinely dynamic
    assert out.expert_counts.tolist() == torch.bincount(routing.indices[routing.active], minlength=4).tolist()
    assert out.expert_counts.sum() == (out.gates > 0).sum()
    expected = switch_balance_loss(routing.probs, routing.indices, active=routing.active)
    torch.testing.assert_close(out.balance_loss, expected)


# ---------------------------------------------------------------------------------------
# 5. capacity overflow "reroute"
# ---------------------------------------------------------------------------------------


def plan_pairs(plan):
    return {(int(r), int(e)): float(w) for r, e, w in zip(plan.rows, plan.experts, plan.weights.detach())}


def test_reroute_by_hand_top1():
    indices = torch.zeros(5, 1, dtype=torch.long)
    weights = torch.ones(5, 1)
    ranking = torch.tensor([[0, 1, 2]] * 5)
    plan = plan_dispatch(indices, weights, 3, capacity=2, overflow="reroute", ranking=ranking)
    # rows 0, 1 keep expert 0; rows 2, 3 move to expert 1; expert 1 full, row 4 goes to expert 2
    assert plan_pairs(plan) == {(0, 0): 1.0, (1, 0): 1.0, (2, 1): 1.0, (3, 1): 1.0, (4, 2): 1.0}
    assert plan.counts.tolist() == [5, 0, 0]  # as routed
    drop = plan_dispatch(indices, weights, 3, capacity=2)
    assert plan_pairs(drop) == {(0, 0): 1.0, (1, 0): 1.0}
    # no room anywhere: the overflow is dropped
    tight = plan_dispatch(indices[:4], weights[:4], 3, capacity=1, overflow="reroute", ranking=ranking[:4])
    assert plan_pairs(tight) == {(0, 0): 1.0, (1, 1): 1.0, (2, 2): 1.0}
    # each row follows its own ranking
    own = torch.tensor([[0, 2, 1], [0, 1, 2], [0, 2, 1], [0, 1, 2]])
    plan = plan_dispatch(indices[:4], weights[:4], 3, capacity=1, overflow="reroute", ranking=own)
    assert plan_pairs(plan) == {(0, 0): 1.0, (1, 1): 1.0, (2, 2): 1.0}


def test_reroute_by_hand_top2_moves_the_gate_weight():
    indices = torch.tensor([[0, 1], [0, 1], [0, 1], [2, 0]])
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.8, 0.2], [0.9, 0.1]])
    ranking = torch.tensor([[0, 1, 2, 3], [0, 1, 3, 2], [0, 1, 3, 2], [2, 0, 3, 1]])
    plan = plan_dispatch(indices, weights, 4, capacity=2, overflow="reroute", ranking=ranking)
    # choice-major priority: (0,0) (1,0) keep 0; (2,0) overflows; (3,2) keeps 2;
    # (0,1) (1,1) keep 1; (2,1) overflows; (3,0) overflows.
    # round 2: row 2's first overflow goes to 3 (its third choice) with 0.8; its second overflow may not
    # claim 3 too; row 3's goes to its third choice 3 as well (room 2). Round 3: row 2's 0.2 goes to 2.
    got = plan_pairs(plan)
    expected = {(0, 0): 0.7, (0, 1): 0.3, (1, 0): 0.6, (1, 1): 0.4, (2, 3): 0.8, (2, 2): 0.2,
                (3, 2): 0.9, (3, 3): 0.1}
    assert got.keys() == expected.keys()
    for key, w in expected.items():
        assert got[key] == pytest.approx(w, rel=1e-6)
    assert torch.bincount(plan.experts, minlength=4).tolist() == [2, 2, 2, 2]


def test_reroute_skips_the_rows_own_kept_expert():
    # row 2 overflows on expert 0 but keeps expert 2, which still has room: the overflow must not
    # go to expert 2 again, but on to expert 3
    indices = torch.tensor([[0, 1], [0, 1], [0, 2]])
    weights = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.6, 0.4]])
    ranking = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 2, 3, 1]])
    plan = plan_dispatch(indices, weights, 4, capacity=2, overflow="reroute", ranking=ranking)
    got = plan_pairs(plan)
    assert got.keys() == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3)}
    assert got[(2, 3)] == pytest.approx(0.6) and got[(2, 2)] == pytest.approx(0.4)


def test_reroute_leftover_weight_is_renormalised():
    # 3 experts, row 2 overflows on both; only expert 2 has room (2 slots): it takes the first
    # (weight 0.7), the second may not reuse expert 2 -> dropped; the row's weight renormalised to 1.
    indices = torch.tensor([[0, 1]] * 3)
    weights = torch.tensor([[0.7, 0.3]] * 3)
    ranking = torch.tensor([[0, 1, 2]] * 3)
    plan = plan_dispatch(indices, weights, 3, capacity=2, overflow="reroute", ranking=ranking)
    got = plan_pairs(plan)
    assert got.keys() == {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2)}
    assert got[(2, 2)] == pytest.approx(1.0)
    assert got[(0, 0)] == pytest.approx(0.7)


def test_reroute_needs_a_ranking_and_overflow_is_validated():
    indices = torch.zeros(4, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="ranking"):
        plan_dispatch(indices, torch.ones(4, 1), 3, capacity=2, overflow="reroute")
    with pytest.raises(ValueError, match="overflow"):
        plan_dispatch(indices, torch.ones(4, 1), 3, capacity=2, overflow="spill")
    # without overflow no ranking is needed
    plan = plan_dispatch(indices, torch.ones(4, 1), 3, capacity=4, overflow="reroute")
    assert len(plan.rows) == 4
    with pytest.raises(ValueError, match="capacity_overflow"):
        make_moe(capacity_overflow="spill")


@pytest.mark.parametrize("shared_expert", [False, True])
@pytest.mark.parametrize("output", ["mixture_density", "categorical_mixture", "bernoulli_mixture"])
def test_a_row_the_capacity_strips_of_every_expert_is_the_shared_experts_or_zeros(output, shared_expert):
    """Under a mixture output such a row is a one-component mixture of the output a point
    model gives it (the shared expert's, else zeros), not a mixture of no component."""
    from sklearn_moe.nn.density import mixture_nll, split_outputs

    n_outputs = 1 if output == "mixture_density" else 3
    module = make_moe(n_outputs=n_outputs, top_k=1, router="switch", capacity_factor=1.0, output=output,
                      shared_expert=shared_expert)
    skew_router(module)
    module.train()
    x = inputs(8)
    out = module(x)
    assert int(out.n_dropped) == 6  # capacity ceil(8 / 4) = 2 rows of expert 0
    assignments = out.assignments
    served = torch.zeros(8).index_add_(0, assignments.rows[:2], torch.ones(2)) > 0  # the experts' own rows
    dropped = torch.nonzero(~served).squeeze(1)
    assert sorted(assignments.rows[2:].tolist()) == dropped.tolist()
    width = 2 * n_outputs if output == "mixture_density" else n_outputs
    fallback = module.shared_expert(x.unsqueeze(0))[0] if shared_expert else torch.zeros(8, width)
    if output == "mixture_density":
        y = torch.randn(8, 1)
        mean, scale = split_outputs(fallback[dropped], 1)
        expected = -torch.distributions.Normal(mean, scale).log_prob(y[dropped]).sum(dim=1)
        nll = mixture_nll(assignments.outputs, assignments.rows, assignments.weights, y)
        torch.testing.assert_close(nll[dropped], expected.detach())
    elif output == "categorical_mixture":
        torch.testing.assert_close(out.output[dropped], torch.log_softmax(fallback[dropped], dim=1).detach())
    else:
        torch.testing.assert_close(out.output[dropped], fallback[dropped].detach())
    out.output.sum().backward()
    if shared_expert:  # the shared expert learns from the rows it serves alone
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.shared_expert.parameters())


@st.composite
def overflowing_routings(draw):
    n_experts = draw(st.integers(2, 6))
    top_k = draw(st.integers(1, min(3, n_experts)))
    n = draw(st.integers(1, 10))
    ranking = torch.tensor([draw(st.permutations(range(n_experts))) for _ in range(n)], dtype=torch.long)
    raw = torch.tensor([[draw(st.floats(0.05, 1.0)) for _ in range(top_k)] for _ in range(n)], dtype=torch.float64)
    active = None
    if draw(st.booleans()):
        active = torch.tensor([[True] + [draw(st.booleans()) for _ in range(top_k - 1)] for _ in range(n)])
        raw = raw * active
    weights = raw / raw.sum(1, keepdim=True)
    capacity = draw(st.integers(1, n * top_k))
    staircase = draw(st.booleans())
    return ranking, ranking[:, :top_k].clone(), weights, active, capacity, staircase


@settings(max_examples=80, deadline=None, database=None, derandomize=True)
@given(overflowing_routings())
def test_reroute_properties(case):
    ranking, indices, weights, active, capacity, staircase = case
    n, n_experts = ranking.shape
    drop = plan_dispatch(indices, weights, n_experts, capacity, active)
    plan = plan_dispatch(indices, weights, n_experts, capacity, active, "reroute", ranking)
    kept = torch.bincount(plan.experts, minlength=n_experts)
    assert (kept <= capacity).all()
    pairs = plan_pairs(plan)
    assert len(pairs) == len(plan.rows)  # no row gets an expert twice
    totals = torch.zeros(n, dtype=plan.weights.dtype).index_add(0, plan.rows, plan.weights)
    rows = plan.rows.unique()
    torch.testing.assert_close(totals[rows], torch.ones(len(rows), dtype=totals.dtype))
    assert len(plan.rows) >= len(drop.rows)
    assert set(plan_pairs(drop)) <= set(pairs)
    assert torch.equal(plan.counts, drop.counts)
    # a rerouted assignment goes to an expert the row did not choose
    chosen = {(r, int(e)) for r in range(n) for c, e in enumerate(indices[r])
              if active is None or bool(active[r, c])}
    assert {pair for pair in pairs if pair not in set(plan_pairs(drop))}.isdisjoint(chosen)
    # an assignment is dropped only when every expert the row does not use is full
    n_routed = torch.full((n,), indices.shape[1]) if active is None else active.sum(1)
    per_row = torch.bincount(plan.rows, minlength=n)
    for r in range(n):
        if per_row[r] < n_routed[r]:
            free = [e for e in range(n_experts) if (r, e) not in pairs and kept[e] < capacity]
            assert free == []
    # buffer positions stay unique and inside the buffer
    layout = staircase_layout(plan) if staircase else padded_layout(plan)
    size = sum(g.n_experts * g.n_slots for g in layout.groups)
    assert len(set(layout.positions.tolist())) == len(layout.positions)
    assert len(layout.positions) == 0 or 0 <= int(layout.positions.min()) <= int(layout.positions.max()) < size


def test_moe_reroute_drops_fewer_in_training_and_is_unchanged_in_eval():
    modules = {}
    for policy in ("drop", "reroute"):
        modules[policy] = make_moe(n_experts=4, top_k=2, capacity_factor=1.0, capacity_overflow=policy)
        skew_router(modules[policy])
    x = inputs(40)
    out = {policy: module(x) for policy, module in modules.items()}
    assert out["drop"].n_dropped == 20  # every first choice is expert 0, capacity 20
    assert out["reroute"].n_dropped < out["drop"].n_dropped
    assert torch.equal(out["reroute"].expert_counts, out["drop"].expert_counts)  # counted as routed
    assert torch.isfinite(out["reroute"].output).all()
    out["reroute"].output.sum().backward()
    for module in modules.values():
        module.eval()
    with torch.no_grad():
        ev = {policy: module(x) for policy, module in modules.items()}
    assert ev["drop"].n_dropped == 0 and ev["reroute"].n_dropped == 0
    assert torch.equal(ev["drop"].output, ev["reroute"].output)


def test_moe_reroute_output_is_the_dispatch_of_the_routers_ranking():
    module = make_moe(n_experts=4, top_k=1, capacity_factor=1.0, capacity_overflow="reroute")
    with torch.no_grad():
        module.router.gate.bias.copy_(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    x = inputs(40)
    out = module(x)
    routing = module.router(x)
    assert (routing.indices[:, 0] == 0).all()  # capacity 10: rows 10..39 overflow
    ranking = routing.scores.argsort(dim=1, descending=True)
    plan = plan_dispatch(routing.indices, routing.weights, 4, 10, overflow="reroute", ranking=ranking)
    torch.testing.assert_close(out.output, dispatch_combine(x, module.experts, plan, 2))
    assert out.n_dropped == 40 - len(plan.rows)
    # first reroute round: each expert takes the first 10 overflowing rows (row order) ranking it second
    pairs = plan_pairs(plan)
    assert {(r, 0) for r in range(10)} <= set(pairs)
    second = ranking[10:, 1].tolist()
    for e in (1, 2, 3):
        takers = [r + 10 for r, s in enumerate(second) if s == e][:10]
        assert {(r, e) for r in takers} <= set(pairs)
    assert len(set(second)) == 3  # the case spreads over every other expert


@pytest.mark.parametrize("router, extra", [("top_p", {"top_p": 0.9}), ("hierarchical", {"n_groups": 2}),
                                           ("noisy_topk", {}), ("topk", {})])
def test_moe_reroute_works_with_every_sparse_router(router, extra):
    module = make_moe(n_experts=6, top_k=2, router=router, capacity_factor=1.0, capacity_overflow="reroute", **extra)
    skew_router(module)
    torch.manual_seed(0)  # same noise for both (noisy_topk)
    out = module(inputs(30))
    assert torch.isfinite(out.output).all()
    torch.testing.assert_close(out.gates.sum(1), torch.ones(30))
    reference = make_moe(n_experts=6, top_k=2, router=router, capacity_factor=1.0, **extra)
    reference.load_state_dict(module.state_dict())
    torch.manual_seed(0)
    dropped = reference(inputs(30)).n_dropped
    assert dropped > 0
    assert 0 <= out.n_dropped <= dropped


def test_router_scores_rank_the_chosen_experts_first():
    torch.manual_seed(0)
    x = inputs(200, 5)
    for name in ("topk", "top_p", "hierarchical"):
        router = make_router(name, 5, n_experts=6, top_k=2, n_groups=2, top_p=0.9)
        routing = router(x)
        ranking = routing.scores.argsort(dim=1, descending=True)
        assert torch.equal(ranking[:, :routing.indices.shape[1]], routing.indices), name


def test_hierarchical_scores_rank_the_rest_of_the_best_group_before_other_groups():
    torch.manual_seed(0)
    router = make_router("hierarchical", 5, n_experts=6, top_k=1, n_groups=2)
    routing = router(inputs(100, 5))
    ranking = routing.scores.argsort(dim=1, descending=True)
    group_of = router.group_of_expert
    best = router.group_gate(inputs(100, 5)).argmax(dim=1, keepdim=True)
    assert (group_of[ranking[:, :3]] == best).all() and (group_of[ranking[:, 3:]] != best).all()


def test_hierarchical_scores_rank_the_chosen_experts_first_with_a_selection_bias():
    torch.manual_seed(0)
    router = make_router("hierarchical", 5, n_experts=6, top_k=2, n_groups=2)
    with torch.no_grad():
        router.gate.weight.mul_(3.0)
        router.selection_bias.copy_(torch.tensor([0.5, -0.3, 0.2, 0.0, 0.4, -0.5]))
    routing = router(inputs(200, 5))
    ranking = routing.scores.argsort(dim=1, descending=True)
    assert torch.equal(ranking[:, :2], routing.indices)


# ---------------------------------------------------------------------------------------
# 6. staircase buffer layout
# ---------------------------------------------------------------------------------------


def staircase_rows(counts, thresholds):
    counts = np.asarray(counts)
    total, previous = len(counts) * thresholds[0], thresholds[0]
    for t in thresholds[1:]:
        total += int((counts > previous).sum()) * (t - previous)
        previous = t
    return total


def layout_cost(counts, thresholds, gather_cost=8, block_cost=20):
    """plan_layout's objective: buffer rows + gather_cost per gathered expert-block + block_cost per block."""
    level = [next(i for i, t in enumerate(thresholds) if t >= c) for c in counts]
    return staircase_rows(counts, thresholds) + gather_cost * sum(level) + block_cost * len(thresholds)


def test_plan_layout_by_hand():
    assert plan_layout(np.array([5, 5, 5, 5])) == [5]
    assert plan_layout(np.array([0, 0, 0])) == []
    assert plan_layout(np.array([], dtype=np.int64)) == []
    counts = np.array([400, 3, 5, 2, 4, 1, 0, 3])
    thresholds = plan_layout(counts)
    assert thresholds[-1] == 400
    assert all(a < b for a, b in zip(thresholds, thresholds[1:]))
    assert len(thresholds) >= 2
    assert staircase_rows(counts, thresholds) < len(counts) * counts.max()
    # padding everything to 400 costs 3200 rows; the staircase a handful more than 400 + 8 * 5
    assert staircase_rows(counts, thresholds) <= 400 + 8 * 5


@settings(max_examples=60, deadline=None, database=None, derandomize=True)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=7))
def test_plan_layout_is_the_optimal_staircase(counts):
    counts = np.array(counts)
    thresholds = plan_layout(counts, gather_cost=8, block_cost=20)
    if counts.max() == 0:
        assert thresholds == []
        return
    assert thresholds[-1] == counts.max()
    assert all(a < b for a, b in zip(thresholds, thresholds[1:])) and len(thresholds) <= MAX_GROUPS
    assert staircase_rows(counts, thresholds) <= len(counts) * counts.max()
    # every expert gets at least its count: the first threshold at or above it exists
    assert all(any(t >= c for t in thresholds) for c in counts)
    # optimal among thresholds taken from the counts (max included), at most MAX_GROUPS blocks
    values = sorted(set(int(c) for c in counts))
    best = min(layout_cost(counts, sorted({*subset, values[-1]}))
               for size in range(MAX_GROUPS) for subset in itertools.combinations(values[:-1], size))
    assert layout_cost(counts, thresholds) == best


def skewed_routing(n=400, n_experts=8, seed=0):
    module = make_moe(seed=seed, n_experts=n_experts, top_k=2)
    with torch.no_grad():
        module.router.gate.bias.copy_(torch.linspace(4.0, -1.0, n_experts))
    x = inputs(n)
    routing = module.router(x)
    return module, x, routing


def test_staircase_planner_choosing_one_block_gives_the_flat_layout():
    # Padding to the busiest expert wastes 200 of 720 rows (over the 25% that triggers the
    # planner), but topping up four experts in a second block costs more than it saves.
    counts = np.array([90, 90, 90, 90, 40, 40, 40, 40])
    assert plan_layout(counts) == [90]
    indices = torch.repeat_interleave(torch.arange(8), torch.as_tensor(counts))[torch.randperm(520)].unsqueeze(1)
    plan = plan_dispatch(indices, torch.ones(520, 1), 8)
    layout = staircase_layout(plan)
    assert layout.groups == (ExpertGroup(None, 8, 0, 90, 0),)
    assert torch.equal(layout.positions, plan.experts * 90 + plan.slots)


def test_staircase_plan_positions_and_layout():
    module, x, routing = skewed_routing()
    plan = plan_dispatch(routing.indices, routing.weights, 8)
    layout, flat = staircase_layout(plan), padded_layout(plan)
    counts = plan.counts.numpy()
    assert len(layout.groups) > 1  # the case is skewed enough for a staircase
    size = sum(g.n_experts * g.n_slots for g in layout.groups)
    assert size == staircase_rows(counts, plan_layout(counts)) < 8 * counts.max()
    assert sum(g.n_experts * g.n_slots for g in flat.groups) == 8 * counts.max()
    assert len(flat.groups) == 1 and flat.groups[0].experts is None
    assert len(set(layout.positions.tolist())) == len(layout.positions)
    assert 0 <= int(layout.positions.min()) and int(layout.positions.max()) < size
    # every position is inside the block of its expert and slot
    for position, expert, slot in zip(layout.positions.tolist(), plan.experts.tolist(), plan.slots.tolist()):
        (group,) = [g for g in layout.groups if g.first_slot <= slot < g.first_slot + g.n_slots]
        members = list(range(8)) if group.experts is None else group.experts.tolist()
        local = position - group.offset
        assert members[local // group.n_slots] == expert and local % group.n_slots == slot - group.first_slot


def test_moe_uses_the_staircase_in_training_and_one_block_in_eval():
    module, x, _ = skewed_routing()
    train_out = module(x).output
    module.eval()
    with torch.no_grad():
        eval_out = module(x).output
    torch.testing.assert_close(train_out.detach(), eval_out, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 7. diversity loss
# ---------------------------------------------------------------------------------------


def test_diversity_loss_analytic_values():
    torch.manual_seed(0)
    base = torch.randn(10, 3)
    identical = base.expand(4, -1, -1)
    torch.testing.assert_close(expert_diversity_loss(identical), torch.tensor(1.0))
    scaled = base * torch.tensor([1.0, -2.0, 0.5, 7.0]).view(4, 1, 1)
    torch.testing.assert_close(expert_diversity_loss(scaled), torch.tensor(1.0))
    outputs = torch.randn(3, 10, 3)
    offsets = torch.randn(3, 1, 3) * 5
    torch.testing.assert_close(expert_diversity_loss(outputs + offsets), expert_diversity_loss(outputs))
    # mutually orthogonal centred outputs (rows of a Hadamard matrix, without the constant one)
    hadamard = torch.tensor([[1.0, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    torch.testing.assert_close(expert_diversity_loss(hadamard.unsqueeze(2)), torch.tensor(0.0))
    torch.testing.assert_close(expert_diversity_loss(hadamard.unsqueeze(2) + 3.0), torch.tensor(0.0), atol=1e-6,
                               rtol=0)
    # two experts with cosine 1/2 -> 1/4
    pair = torch.tensor([[1.0, -1, 0, 0], [1, 0, -1, 0]]).unsqueeze(2)
    torch.testing.assert_close(expert_diversity_loss(pair), torch.tensor(0.25))
    # three experts: cosines 1 (pair 0-1), 0 (0-2, 1-2) -> 2 * 1 / 6
    trio = torch.stack([hadamard[0], 2 * hadamard[0], hadamard[1]]).unsqueeze(2)
    torch.testing.assert_close(expert_diversity_loss(trio), torch.tensor(1 / 3))
    # fewer than 2 experts or rows
    assert expert_diversity_loss(base.unsqueeze(0)) == 0
    assert expert_diversity_loss(torch.randn(3, 1, 2)) == 0
    # a constant expert (zero after centring) does not make NaN
    assert torch.isfinite(expert_diversity_loss(torch.stack([base, torch.ones(10, 3)])))


def test_diversity_loss_in_the_moe():
    module = make_moe(n_experts=4, diversity_loss=True, diversity_rows=10)
    x = inputs(30)
    out = module(x)
    assert out.diversity_loss > 0
    expected = expert_diversity_loss(module.experts(x[:10].unsqueeze(0).expand(4, -1, -1)))
    torch.testing.assert_close(out.diversity_loss, expected)
    # zero-weight rows are not among the rows used
    weight = torch.tensor([0.0] * 5 + [1.0] * 25)
    expected = expert_diversity_loss(module.experts(x[5:15].unsqueeze(0).expand(4, -1, -1)))
    torch.testing.assert_close(module(x, sample_weight=weight).diversity_loss, expected)
    module.zero_grad()
    out.diversity_loss.backward()
    grads = expert_grads(module)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["hidden.0.weight"].abs().sum() > 0 and grads["output.weight"].abs().sum() > 0
    assert module.router.gate.weight.grad is None or module.router.gate.weight.grad.abs().sum() == 0
    module.eval()
    assert module(x).diversity_loss == 0
    assert make_moe(n_experts=4).train()(x).diversity_loss == 0  # off by default


# ---------------------------------------------------------------------------------------
# 8. per-expert gradient scaling
# ---------------------------------------------------------------------------------------


def test_scale_gradient_is_identity_forward_and_scales_backward():
    t = torch.randn(4, 3, requires_grad=True)
    scale = torch.tensor([[1.0], [2.0], [0.5], [0.0]])
    out = scale_gradient(t, scale)
    assert torch.equal(out, t)
    out.sum().backward()
    torch.testing.assert_close(t.grad, scale.expand(4, 3))


def test_expert_grad_scaling_multiplies_each_experts_gradient():
    x = inputs(40)
    runs = {}
    for scaling in (False, True):
        module = make_moe(n_experts=4, top_k=2, expert_grad_scaling=scaling)
        with torch.no_grad():
            module.router.gate.weight.mul_(2.0)
            module.router.gate.bias.copy_(torch.tensor([1.0, 0.3, 0.0, -1.0]))
        out = module(x)
        (out.output * torch.tensor([1.0, -0.5])).sum().backward()
        runs[scaling] = (out, expert_grads(module), module.router.gate.weight.grad.clone())
    (plain, plain_grads, plain_router), (scaled, scaled_grads, scaled_router) = runs[False], runs[True]
    assert torch.equal(plain.output, scaled.output)
    counts = scaled.expert_counts.float()
    assert counts.sum() == 80
    assert (counts > 0).all() and counts.min() < counts.mean() / 4  # every expert used, one clipped
    scale = (counts.mean() / counts).clamp(max=4.0)
    assert scale.min() < 1 < scale.max() == 4.0
    for name, grad in plain_grads.items():
        expected = grad * scale.view(-1, *[1] * (grad.ndim - 1))
        torch.testing.assert_close(scaled_grads[name], expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scaled_router, plain_router)


def test_expert_grad_scaling_is_off_in_eval_and_for_dense_routing():
    x = inputs(20)
    for router, top_k in (("softmax", 4), ("topk", 2)):
        grads = []
        for scaling in (False, True):
            module = make_moe(n_experts=4, top_k=top_k, router=router, expert_grad_scaling=scaling)
            if router == "topk":
                module.eval()
            module(x).output.sum().backward()
            grads.append(expert_grads(module))
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name])


# ---------------------------------------------------------------------------------------
# 9. estimators
# ---------------------------------------------------------------------------------------

SHORT = dict(FAST, max_epochs=3)


def _data(classification, n=120):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n, 4))
    if classification:
        return X, np.where(X[:, 0] + X[:, 1] ** 2 > 1, "yes", "no")
    return X, X[:, 0] * 2 + np.sin(3 * X[:, 1])


CONFIGS = [
    dict(router="top_p"),
    dict(router="top_p", top_p=0.9, learned_threshold=True),
    dict(router="hierarchical", n_groups=3),
    dict(router="hierarchical", n_groups=10),  # capped at n_experts
    dict(capacity_factor=1.0, capacity_overflow="reroute"),
    dict(diversity_coef=0.1),
    dict(expert_grad_scaling=True),
]


@pytest.mark.parametrize("estimator", [MoERegressor, MoEClassifier])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_estimators_fit_and_predict_with_the_new_options(estimator, config):
    classification = estimator is MoEClassifier
    X, y = _data(classification)
    model = estimator(**SHORT, **config).fit(X, y)
    if classification:
        proba = model.predict_proba(X)
        assert np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-6)
        assert set(model.predict(X)) <= {"yes", "no"}
    else:
        assert np.isfinite(model.predict(X)).all()
    gates = model.route(X)
    np.testing.assert_allclose(gates.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.expert_load_.sum(), 1.0, rtol=1e-6)
    module = model.module_
    if config.get("router") == "hierarchical":
        assert module.router.n_groups == min(config["n_groups"], 4)
        assert (gates > 0).sum(1).max() <= max(1, 4 // module.router.n_groups)
    if config.get("router") == "top_p":
        assert (gates > 0).sum(1).max() <= 2  # top_k caps it
        if config.get("learned_threshold"):
            assert module.router.threshold_logit is not None
    if "diversity_coef" in config:
        assert "diversity_loss" in model.history_
        assert np.isfinite(model.history_["diversity_loss"]).all()
        assert (model.history_["diversity_loss"] > 0).all()
    else:
        assert "diversity_loss" not in model.history_
    assert module.capacity_overflow == config.get("capacity_overflow", "drop")
    assert module.expert_grad_scaling == config.get("expert_grad_scaling", False)


def test_learned_thresholds_are_trained_by_the_estimator():
    X, y = _data(False)
    model = MoERegressor(**SHORT, router="top_p", learned_threshold=True).fit(X, y)
    threshold = torch.sigmoid(model.module_.router.threshold_logit.detach())
    assert torch.isfinite(threshold).all()
    assert not torch.allclose(threshold, torch.full((4,), 0.25))


@pytest.mark.parametrize("estimator", [MoERegressor, MoEClassifier])
@pytest.mark.parametrize("param, value", [("top_p", 0), ("top_p", 1.5), ("n_groups", 0),
                                          ("capacity_overflow", "spill"), ("diversity_coef", -1)])
def test_estimators_reject_invalid_new_options(estimator, param, value):
    X, y = _data(estimator is MoEClassifier, n=40)
    with pytest.raises(ValueError, match=param):
        estimator(**SHORT, **{param: value}).fit(X, y)


def test_top_p_one_and_edge_values_are_accepted():
    X, y = _data(False, n=40)
    model = MoERegressor(**dict(SHORT, max_epochs=1), router="top_p", top_p=1.0, n_groups=1).fit(X, y)
    assert (model.route(X) > 0).sum(1).min() == 2  # top_p=1 uses top_k experts
    assert math.isfinite(float(model.predict(X[:1])[0]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_indices_are_topks_on_the_cpu_and_distinct_whatever_the_scores(k):
    from sklearn_moe.nn._sync import sync_free_paths
    from sklearn_moe.nn.routers import top_indices

    scores = torch.randn(500, 7, generator=torch.Generator().manual_seed(k))
    assert torch.equal(top_indices(scores, k), scores.topk(k, dim=1).indices)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    if k <= 2:  # the arg-maxima: the first of tied columns wins
        assert torch.equal(top_indices(ties, k), torch.tensor([[1, 2], [0, 1]])[:, :k])
    cornered = torch.tensor([[float("-inf"), float("-inf"), 5.0], [float("-inf")] * 3, [float("nan")] * 3])
    for row in top_indices(cornered, k):
        assert len(set(row.tolist())) == k
    assert int(top_indices(cornered, k)[0, 0]) == 2
    with sync_free_paths():  # the GPU's path: torch.topk itself
        assert torch.equal(top_indices(ties, k), ties.topk(k, dim=1).indices)
