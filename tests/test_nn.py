"""Unit tests of the pure-PyTorch Mixture-of-Experts engine (``sklearn_moe.nn``)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sklearn_moe.nn import (
    ACTIVATIONS,
    MixtureOfExperts,
    MoEOutput,
    StackedExperts,
    TopKRouter,
    cv2_balance_loss,
    dense_combine,
    dispatch_combine,
    expert_capacity,
    make_router,
    plan_dispatch,
    router_z_loss,
    switch_balance_loss,
)
from sklearn_moe.nn.products import NARROW_MAX_OUTPUTS, NARROW_MIN_ROWS, batched_linear


def make_moe(seed=0, **kwargs):
    params = dict(n_features=5, n_outputs=2, n_experts=4, top_k=2, expert_hidden=(8,))
    params.update(kwargs)
    torch.manual_seed(seed)
    return MixtureOfExperts(**params)


def inputs(n, n_features=5, seed=1):
    return torch.randn(n, n_features, generator=torch.Generator().manual_seed(seed))


def skew_router(module, expert=0, bias=10.0):
    """Make every row pick ``expert`` first (small weights, one large bias)."""
    with torch.no_grad():
        module.router.gate.weight.mul_(0.01)
        module.router.gate.bias.zero_()
        module.router.gate.bias[expert] = bias


def reference_plan(indices, weights, capacity):
    """Slow, obvious implementation of plan_dispatch's drop rule: {(row, expert): weight}."""
    n, k = indices.shape
    used, kept = {}, {}
    for choice in range(k):  # choice-major: every first choice before any second choice
        for row in range(n):
            e = int(indices[row, choice])
            slot = used.get(e, 0)
            used[e] = slot + 1
            if capacity is None or slot < capacity:
                kept[(row, e)] = (slot, float(weights[row, choice]))
    totals = {}
    for (row, _), (_, w) in kept.items():
        totals[row] = totals.get(row, 0.0) + w
    return {key: (slot, w / totals[key[0]]) for key, (slot, w) in kept.items()}


def assert_plan_matches_reference(plan, indices, weights, capacity, rel):
    """Same kept (row, expert) pairs, slots and weights as the slow reference."""
    ref = reference_plan(indices, weights, capacity)
    got = {(int(r), int(e)): (int(s), float(w)) for r, e, s, w in
           zip(plan.rows, plan.experts, plan.slots, plan.weights)}
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key][0] == ref[key][0]
        assert got[key][1] == pytest.approx(ref[key][1], rel=rel)
    return got


# ---------------------------------------------------------------------------------------
# 1. dense router == top-k with k = n_experts; sparse dispatch == dense combine
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_hidden", [(), (8,), (8, 8)])
def test_softmax_router_equals_topk_with_all_experts(expert_hidden):
    dense = make_moe(router="softmax", expert_hidden=expert_hidden).eval()
    full_topk = make_moe(seed=7, router="topk", top_k=4, expert_hidden=expert_hidden).eval()
    full_topk.load_state_dict(dense.state_dict())
    x = inputs(20)
    a, b = dense(x), full_topk(x)
    torch.testing.assert_close(a.output, b.output, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.gates, b.gates, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.gates.sum(1), torch.ones(20))
    assert bool((a.gates > 0).all())
    torch.testing.assert_close(a.balance_loss, b.balance_loss)
    torch.testing.assert_close(a.z_loss, b.z_loss)
    assert a.expert_counts.tolist() == [20] * 4 == b.expert_counts.tolist()


@pytest.mark.parametrize("expert_hidden", [(), (8,)])
def test_sparse_dispatch_with_all_experts_matches_dense_combine(expert_hidden):
    module = make_moe(top_k=4, expert_hidden=expert_hidden)
    x = inputs(13)
    routing = module.router(x)
    assert module.router.is_dense
    plan = plan_dispatch(routing.indices, routing.weights, 4)
    assert plan.n_slots == 13
    assert plan.counts.tolist() == [13] * 4
    sparse = dispatch_combine(x, module.experts, plan, 2)
    dense = dense_combine(x, module.experts, routing.probs)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


def test_sparse_dispatch_matches_dense_combine_with_zero_gates():
    """top-k dispatch == dense combine with the unchosen experts' gates set to zero."""
    module = make_moe(n_experts=6, top_k=2)
    x = inputs(17)
    routing = module.router(x)
    plan = plan_dispatch(routing.indices, routing.weights, 6)
    gates = torch.zeros(17, 6).scatter(1, routing.indices, routing.weights)
    torch.testing.assert_close(
        dispatch_combine(x, module.experts, plan, 2),
        dense_combine(x, module.experts, gates),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "top_p", "hierarchical"])
def test_tiny_eval_batches_take_the_dense_path_with_the_same_result(router):
    """Batches of at most DENSE_EVAL_MAX_ROWS rows run every expert (unchosen ones weighted 0):
    the dispatch path's mixture, up to float32 rounding (matmuls of other shapes)."""
    from sklearn_moe.nn.moe import DENSE_EVAL_MAX_ROWS

    module = make_moe(n_experts=6, top_k=2, router=router, expert_hidden=(8, 8)).eval()
    x = inputs(40)
    with torch.inference_mode():
        batch = module.predict(x)
        one_by_one = torch.cat([module.predict(x[i:i + 1]) for i in range(40)])
        in_fours = torch.cat([module.predict(x[i:i + DENSE_EVAL_MAX_ROWS]) for i in range(0, 40, DENSE_EVAL_MAX_ROWS)])
    torch.testing.assert_close(one_by_one, batch, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(in_fours, batch, rtol=1e-5, atol=1e-7)


def test_dense_combine_ignores_non_finite_output_of_experts_with_zero_gate(recwarn):
    module = make_moe(n_experts=4, top_k=2)
    x = inputs(3)
    with torch.no_grad():
        module.experts.output.bias[3].fill_(float("inf"))  # expert 3: infinite everywhere
    gates = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.3, 0.7, 0.0], [1.0, 0.0, 0.0, 0.0]])
    out = dense_combine(x, module.experts, gates)
    assert torch.isfinite(out).all()
    assert not [w for w in recwarn if "non-finite" in str(w.message)]
    with pytest.warns(RuntimeWarning, match=r"Expert\(s\) \[3\]"):
        out = dense_combine(x, module.experts, torch.tensor([[0.5, 0.0, 0.0, 0.5]] * 3))
    expected = module.experts(x.unsqueeze(0).expand(4, -1, -1))[0]
    torch.testing.assert_close(out, expected)


# ---------------------------------------------------------------------------------------
# 2. top-k router
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts, top_k", [(4, 1), (4, 2), (6, 3), (5, 4)])
def test_topk_router_choices_and_weights(n_experts, top_k):
    module = make_moe(n_experts=n_experts, top_k=top_k).eval()
    x = inputs(25)
    routing = module.router(x)
    gates = module(x).gates
    assert gates.shape == (25, n_experts)
    assert ((gates != 0).sum(1) == top_k).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(25))
    torch.testing.assert_close(routing.weights.sum(1), torch.ones(25))

    chosen = gates != 0
    # the chosen experts are the k largest logits
    assert (routing.logits.masked_fill(~chosen, math.inf).min(1).values
            > routing.logits.masked_fill(chosen, -math.inf).max(1).values).all()
    # best first
    assert (routing.weights[:, :-1] >= routing.weights[:, 1:]).all()
    # the weights are the full softmax restricted to the chosen experts, renormalised
    probs = torch.softmax(routing.logits.double(), dim=1)
    expected = torch.where(chosen, probs, 0.0)
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(gates.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(routing.probs.double(), probs, rtol=1e-5, atol=1e-7)
    assert module.router.is_dense == (top_k == n_experts)


def test_topk_router_on_explicit_logits():
    router = TopKRouter(n_features=3, n_experts=4, top_k=2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(4, 3))
        router.gate.bias.zero_()
    x = torch.tensor([[1.0, 3.0, 2.0], [-1.0, -2.0, -3.0]])  # logits [1, 3, 2, 0], [-1, -2, -3, 0]
    routing = router(x)
    assert routing.indices.tolist() == [[1, 2], [3, 0]]
    e = math.e
    torch.testing.assert_close(routing.weights, torch.tensor([[e / (e + 1), 1 / (e + 1)]] * 2))


# ---------------------------------------------------------------------------------------
# 3. switch balance loss
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_experts", [3, 4, 8])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_switch_balance_loss_uniform_is_one(n_experts, top_k):
    n = 2 * n_experts
    probs = torch.full((n, n_experts), 1.0 / n_experts)
    indices = (torch.arange(n)[:, None] + torch.arange(top_k)[None, :]) % n_experts
    assert torch.bincount(indices.reshape(-1)).tolist() == [n * top_k // n_experts] * n_experts
    torch.testing.assert_close(switch_balance_loss(probs, indices), torch.tensor(1.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("n_experts", [2, 4, 7])
@pytest.mark.parametrize("expert", [0, 1])
def test_switch_balance_loss_collapse_is_n_experts(n_experts, expert):
    n = 10
    probs = torch.zeros(n, n_experts)
    probs[:, expert] = 1.0
    indices = torch.full((n, 1), expert)
    assert switch_balance_loss(probs, indices).item() == pytest.approx(n_experts, rel=1e-6)
    # nearly one-hot probabilities give nearly n_experts
    logits = torch.zeros(n, n_experts)
    logits[:, expert] = 30.0
    assert switch_balance_loss(logits.softmax(1), indices).item() == pytest.approx(n_experts, rel=1e-5)


def test_switch_balance_loss_ignores_masked_rows():
    torch.manual_seed(0)
    probs = torch.randn(12, 5).softmax(1)
    indices = torch.randn(12, 5).topk(2, dim=1).indices
    garbage_probs = torch.zeros(7, 5)
    garbage_probs[:, 3] = 1.0
    garbage_indices = torch.full((7, 2), 3)
    all_probs = torch.cat([garbage_probs[:3], probs, garbage_probs[3:]])
    all_indices = torch.cat([garbage_indices[:3], indices, garbage_indices[3:]])
    mask = torch.ones(19, dtype=torch.bool)
    mask[:3] = False
    mask[15:] = False
    expected = switch_balance_loss(probs, indices)
    torch.testing.assert_close(switch_balance_loss(all_probs, all_indices, mask), expected)
    assert not torch.isclose(switch_balance_loss(all_probs, all_indices), expected)
    # by hand: E * sum_e f_e P_e
    f = torch.bincount(indices.reshape(-1), minlength=5).double() / 24
    torch.testing.assert_close(switch_balance_loss(probs.double(), indices), 5 * (f * probs.double().mean(0)).sum())
    # no row left: zero
    assert switch_balance_loss(all_probs, all_indices, torch.zeros(19, dtype=torch.bool)).item() == 0.0


def test_switch_balance_loss_gradient_goes_through_probs():
    torch.manual_seed(0)
    probs = torch.randn(6, 4).softmax(1).requires_grad_()
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0], [2, 0]])
    switch_balance_loss(probs, indices).backward()
    fraction = torch.tensor([6.0, 3.0, 2.0, 1.0]) / 12
    torch.testing.assert_close(probs.grad, (4 * fraction / 6).expand(6, 4))


def test_moe_balance_loss_uses_sample_weight_mask():
    module = make_moe().eval()
    x = inputs(10)
    garbage = 50 * inputs(4, seed=3)
    weight = torch.tensor([1.0] * 10 + [0.0] * 4)
    clean = module(x)
    masked = module(torch.cat([x, garbage]), sample_weight=weight)
    torch.testing.assert_close(masked.balance_loss, clean.balance_loss)
    torch.testing.assert_close(masked.z_loss, clean.z_loss)
    routing = module.router(x)
    torch.testing.assert_close(clean.balance_loss, switch_balance_loss(routing.probs, routing.indices))
    assert make_moe(balance_loss=None)(x).balance_loss.item() == 0.0


# ---------------------------------------------------------------------------------------
# 4. router z-loss
# ---------------------------------------------------------------------------------------


def test_router_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 4.0], [5.0, 5.0]])
    by_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 4
    assert router_z_loss(logits).item() == pytest.approx(by_hand, rel=1e-6)
    assert router_z_loss(torch.zeros(3, 4)).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    mask = torch.tensor([True, False, True, False])
    masked_by_hand = (math.log(2) ** 2 + math.log(math.exp(-3) + math.exp(4)) ** 2) / 2
    assert router_z_loss(logits, mask).item() == pytest.approx(masked_by_hand, rel=1e-6)
    garbage = torch.cat([logits, torch.full((3, 2), 1e3)])
    mask = torch.tensor([True] * 4 + [False] * 3)
    torch.testing.assert_close(router_z_loss(garbage, mask), router_z_loss(logits))
    assert router_z_loss(logits, torch.zeros(4, dtype=torch.bool)).item() == 0.0


def test_moe_z_loss_is_z_loss_of_router_logits():
    module = make_moe(temperature=0.5).eval()
    x = inputs(9)
    logits = module.router.gate(x) / 0.5
    torch.testing.assert_close(module(x).z_loss, torch.logsumexp(logits, 1).square().mean())


# ---------------------------------------------------------------------------------------
# 5. capacity
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capacity_factor, n_rows, top_k, n_experts, expected",
    [(1.0, 10, 2, 4, 5), (1.25, 10, 2, 4, 7), (1.0, 8, 2, 4, 4), (2.0, 3, 1, 8, 1), (1.0, 0, 2, 4, 1),
     (1.5, 7, 3, 5, 7)],
)
def test_expert_capacity_formula(capacity_factor, n_rows, top_k, n_experts, expected):
    assert expert_capacity(capacity_factor, n_rows, top_k, n_experts) == expected
    assert expected == max(1, math.ceil(capacity_factor * n_rows * top_k / n_experts))


def test_capacity_first_choices_outrank_second_choices():
    # rows 0 and 1 want expert 0 second; rows 2 and 3 want it first
    indices = torch.tensor([[1, 0], [2, 0], [0, 1], [0, 2]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    plan = plan_dispatch(indices, weights, 3, capacity=2)
    kept = {(int(r), int(e)): float(w) for r, e, w in zip(plan.rows, plan.experts, plan.weights)}
    assert kept == pytest.approx({(2, 0): 0.8, (3, 0): 0.9, (0, 1): 1.0, (2, 1): 0.2, (1, 2): 1.0, (3, 2): 0.1})
    assert plan.counts.tolist() == [4, 2, 2]
    assert plan.n_slots == 2


def test_capacity_same_choice_ranked_by_row():
    indices = torch.zeros(5, 1, dtype=torch.long)
    plan = plan_dispatch(indices, torch.ones(5, 1), 2, capacity=2)
    assert plan.rows.tolist() == [0, 1]
    assert plan.slots.tolist() == [0, 1]
    out = dispatch_combine(torch.randn(5, 3), StackedExperts(2, 3, 2, ()), plan, 2)
    assert (out[2:] == 0).all()
    assert (out[:2] != 0).all()


def test_capacity_on_skewed_routing():
    torch.manual_seed(0)
    n, n_experts, k, capacity = 40, 5, 2, 9
    logits = torch.randn(n, n_experts)
    logits[:34, 0] += 10.0  # most rows choose expert 0 first
    top, indices = logits.topk(k, dim=1)
    weights = top.softmax(1)
    plan = plan_dispatch(indices, weights, n_experts, capacity)
    kept_per_expert = torch.bincount(plan.experts, minlength=n_experts)
    assert kept_per_expert.max().item() <= capacity
    assert kept_per_expert.tolist() == torch.clamp(plan.counts, max=capacity).tolist()
    assert plan.counts[0].item() >= 34
    # every row that kept an expert has weights summing to 1
    totals = torch.zeros(n).index_add(0, plan.rows, plan.weights)
    kept_rows = torch.unique(plan.rows)
    torch.testing.assert_close(totals[kept_rows], torch.ones(len(kept_rows)))
    # (expert, slot) pairs are distinct and inside the buffer
    assert len(set(zip(plan.experts.tolist(), plan.slots.tolist()))) == len(plan.rows)
    assert int(plan.slots.max()) < plan.n_slots == capacity
    assert (plan.experts[1:] >= plan.experts[:-1]).all()
    # exactly the reference drop rule
    assert_plan_matches_reference(plan, indices, weights, capacity, rel=1e-5)


@st.composite
def routings(draw):
    n_experts = draw(st.integers(1, 5))
    top_k = draw(st.integers(1, n_experts))
    n = draw(st.integers(0, 9))
    rows = [draw(st.permutations(range(n_experts)))[:top_k] for _ in range(n)]
    raw = [[draw(st.floats(0.05, 1.0)) for _ in range(top_k)] for _ in range(n)]
    indices = torch.tensor(rows, dtype=torch.long).reshape(n, top_k)
    weights = torch.tensor(raw, dtype=torch.float64).reshape(n, top_k)
    if n:
        weights = weights / weights.sum(1, keepdim=True)
    capacity = draw(st.one_of(st.none(), st.integers(1, max(1, n * top_k))))
    return indices, weights, n_experts, capacity


@settings(max_examples=80, deadline=None, database=None, derandomize=True)
@given(routings())
def test_plan_dispatch_matches_reference(routing):
    indices, weights, n_experts, capacity = routing
    plan = plan_dispatch(indices, weights, n_experts, capacity)
    got = assert_plan_matches_reference(plan, indices, weights, capacity, rel=1e-9)
    assert plan.counts.tolist() == torch.bincount(indices.reshape(-1), minlength=n_experts).tolist()
    assert all(s < plan.n_slots for s, _ in got.values())
    if capacity is not None:
        assert plan.n_slots <= capacity


def assert_capacity_drops_in_training_only(capped, dropless):
    """``capped`` (capacity factor 1, 4 experts, top-2, router skewed to expert 0) drops
    assignments in training and none in evaluation, where it equals ``dropless`` (the same
    weights, no capacity). Returns the capped training forward of 32 rows, and the rows."""
    skew_router(capped)
    dropless.load_state_dict(capped.state_dict())
    x = inputs(32)
    out = capped.train()(x)
    capacity = expert_capacity(1.0, 32, 2, 4)
    assert capacity == 16
    assert out.expert_counts[0].item() == 32
    assert out.expert_counts.sum().item() == 64
    assert out.n_dropped.item() == torch.clamp(out.expert_counts - capacity, min=0).sum().item() > 0
    assert dropless.train()(x).n_dropped.item() == 0

    capped.eval()
    dropless.eval()
    out_eval = capped(x)
    assert out_eval.n_dropped.item() == 0
    torch.testing.assert_close(out_eval.output, dropless(x).output, rtol=0, atol=0)
    torch.testing.assert_close(out_eval.gates, dropless(x).gates, rtol=0, atol=0)
    return out, x


def test_moe_capacity_drops_in_training_only():
    assert_capacity_drops_in_training_only(make_moe(n_experts=4, top_k=2, capacity_factor=1.0),
                                           make_moe(seed=5, n_experts=4, top_k=2, capacity_factor=None))


def test_moe_capacity_top1_dropped_rows_are_zero():
    module = make_moe(n_experts=4, top_k=1, capacity_factor=1.0)
    skew_router(module, expert=2)
    x = inputs(16)
    full = module.eval()(x)
    out = module.train()(x)
    assert out.expert_counts.tolist() == [0, 0, 16, 0]
    assert out.n_dropped.item() == 12  # capacity ceil(16 / 4) = 4
    assert (out.output[4:] == 0).all()
    torch.testing.assert_close(out.output[:4], full.output[:4])
    # the gates report the routing decision, before the cap
    assert out.gates[:, 2].tolist() == [1.0] * 16


def test_capacity_renormalisation_with_zero_kept_weight_is_finite():
    # row 1 loses its first choice (weight 1) and keeps only a second choice whose gate
    # weight underflowed to 0 in float32: its output must stay finite, not NaN
    indices = torch.tensor([[0, 1], [0, 2]])
    weights = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    plan = plan_dispatch(indices, weights, 3, capacity=1)
    assert torch.isfinite(plan.weights).all()


def test_moe_capacity_with_sharp_router_is_finite():
    module = make_moe(n_experts=4, top_k=2, capacity_factor=1.0, temperature=0.01)
    skew_router(module, expert=0, bias=3.0)  # logit gap 3 / 0.01 = 300: exp(-300) == 0 in float32
    out = module.train()(inputs(8))
    assert out.n_dropped.item() > 0
    assert torch.isfinite(out.output).all()


# ---------------------------------------------------------------------------------------
# 6. gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_gradients_reach_exactly_the_chosen_experts(capacity_factor):
    module = make_moe(n_features=3, n_experts=6, top_k=2, capacity_factor=capacity_factor).train()
    with torch.no_grad():
        module.router.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, -100.0, -100.0, -100.0]))
    x = inputs(16, n_features=3)
    out = module(x)
    chosen = set(torch.unique(module.router(x).indices).tolist())
    assert chosen == {0, 1, 2}
    assert out.expert_counts.tolist()[3:] == [0, 0, 0]
    out.output.sum().backward()
    for param in (module.experts.hidden[0].weight, module.experts.hidden[0].bias,
                  module.experts.output.weight, module.experts.output.bias):
        per_expert = param.grad.reshape(6, -1).abs().sum(1)
        assert (per_expert[:3] > 0).all()
        assert (per_expert[3:] == 0).all()
    gate = module.router.gate
    assert (gate.weight.grad[:3].abs().sum(1) > 0).all()
    assert (gate.bias.grad[:3] != 0).all()
    # the output depends on the logits of the chosen experts only
    assert (gate.weight.grad[3:] == 0).all()
    assert (gate.bias.grad[3:] == 0).all()


def test_dense_router_gradients_reach_every_expert():
    module = make_moe(router="softmax", n_experts=5)
    module(inputs(8)).output.sum().backward()
    assert (module.experts.hidden[0].weight.grad.reshape(5, -1).abs().sum(1) > 0).all()
    assert (module.router.gate.weight.grad.abs().sum(1) > 0).all()


def test_balance_loss_gradient_reaches_router():
    module = make_moe()
    module(inputs(8)).balance_loss.backward()
    assert module.router.gate.weight.grad.abs().sum() > 0
    assert module.experts.output.weight.grad is None


# ---------------------------------------------------------------------------------------
# 7. batch independence in eval mode
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["topk", "softmax", "top_p", "hierarchical"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_eval_is_batch_independent(router, capacity_factor):
    module = make_moe(router=router, n_experts=5, top_k=2, capacity_factor=capacity_factor,
                      expert_hidden=(8, 8), layer_norm=True, dropout=0.3, capacity_overflow="reroute")
    skew_router(module, bias=0.5)  # uneven counts, which matter if capacity leaked into eval
    with torch.no_grad():
        module.router.gate.weight.mul_(100)
    module.eval()
    x = inputs(24)
    full = module(x)
    assert full.n_dropped.item() == 0
    for i in range(24):
        alone = module(x[i:i + 1])
        torch.testing.assert_close(alone.output, full.output[i:i + 1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(alone.gates, full.gates[i:i + 1], rtol=1e-5, atol=1e-6)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(module(x[perm]).output, full.output[perm], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# 8. experts and argument validation
# ---------------------------------------------------------------------------------------


def test_linear_experts_are_one_linear_map_each():
    torch.manual_seed(0)
    experts = StackedExperts(3, 4, 2, expert_hidden=())
    assert len(experts.hidden) == 0
    x = torch.randn(3, 6, 4)
    expected = torch.stack([x[e] @ experts.output.weight[e] + experts.output.bias[e] for e in range(3)])
    torch.testing.assert_close(experts(x), expected)
    # affine: f(a) - f(b) is linear in a - b
    y = torch.randn(3, 6, 4)
    torch.testing.assert_close(experts(x) - experts(y), torch.bmm(x - y, experts.output.weight))


@pytest.mark.parametrize("n_outputs", [1, 3, NARROW_MAX_OUTPUTS - 1, NARROW_MAX_OUTPUTS])
@pytest.mark.parametrize("n_rows", [NARROW_MIN_ROWS // 3 - 1, NARROW_MIN_ROWS // 3 + 1])
def test_batched_linear_value_and_gradients_match_baddbmm(n_outputs, n_rows):
    # From NARROW_MIN_ROWS rows and below NARROW_MAX_OUTPUTS outputs the products run
    # transposed, with a hand-written backward.
    torch.manual_seed(0)
    x = torch.randn(3, n_rows, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, n_outputs, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, n_outputs, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, n_rows, n_outputs, dtype=torch.float64)
    out = batched_linear(x, weight, bias)
    assert out.shape == (3, n_rows, n_outputs) and out.is_contiguous()
    ours = torch.autograd.grad(out, (x, weight, bias), grad)
    expected = torch.baddbmm(bias.unsqueeze(1), x, weight)
    torch.testing.assert_close(out, expected)
    for got, want in zip(ours, torch.autograd.grad(expected, (x, weight, bias), grad)):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(batched_linear(x, weight, bias), expected)


@pytest.mark.parametrize("n_outputs", [1, 3])
def test_batched_linear_narrow_under_bf16_autocast_matches_baddbmm(n_outputs):
    # Autocast runs the products in bfloat16; the gradients come back in float32, as
    # autocast's own casts around baddbmm return them.
    torch.manual_seed(0)
    leaves = [torch.randn(2, NARROW_MIN_ROWS, 8), torch.randn(2, 8, n_outputs), torch.randn(2, n_outputs)]
    grad = torch.randn(2, NARROW_MIN_ROWS, n_outputs)
    results = []
    for linear in (batched_linear, lambda x, w, b: torch.baddbmm(b.unsqueeze(1), x, w)):
        x, weight, bias = (leaf.clone().requires_grad_() for leaf in leaves)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear(x, weight, bias)
        out.backward(grad.to(out.dtype))
        results.append((out, x.grad, weight.grad, bias.grad))
    for ours, reference in zip(*results):
        assert ours.dtype == reference.dtype
        torch.testing.assert_close(ours, reference, rtol=2e-2, atol=5e-2)


def test_batched_linear_narrow_weight_gradient_alone():
    # Only the weight needs a gradient (frozen input and bias): x^T grad, per slice.
    x = torch.randn(2, NARROW_MIN_ROWS, 3)
    weight = torch.randn(2, 3, 1, requires_grad=True)
    bias = torch.zeros(2, 1)
    batched_linear(x, weight, bias).sum().backward()
    torch.testing.assert_close(weight.grad, x.sum(dim=1).unsqueeze(2))


@pytest.mark.parametrize("expert_hidden", [(), (6,), (6, 6)])
def test_expert_slices_are_independent(expert_hidden):
    torch.manual_seed(0)
    experts = StackedExperts(3, 4, 2, expert_hidden=expert_hidden, layer_norm=True)
    x = torch.randn(3, 5, 4)
    before = experts(x)
    x2 = x.clone()
    x2[1] = torch.randn(5, 4) * 10
    after = experts(x2)
    assert torch.equal(after[0], before[0])
    assert torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])
    # expert e on slice e equals expert e's parameters applied alone
    single = StackedExperts(1, 4, 2, expert_hidden=expert_hidden, layer_norm=True)
    single.load_state_dict({k: v[2:3] for k, v in experts.state_dict().items()})
    torch.testing.assert_close(single(x[2:3])[0], before[2], rtol=1e-6, atol=1e-6)


def test_residual_only_between_equal_widths():
    assert StackedExperts(2, 8, 1, expert_hidden=(8, 8, 4, 4, 6)).residual == [False, True, False, True, False]
    assert StackedExperts(2, 3, 1, expert_hidden=(5, 5)).residual == [False, True]
    assert StackedExperts(2, 3, 1, expert_hidden=(5, 5), skip_connections=False).residual == [False, False]
    assert StackedExperts(2, 3, 1, expert_hidden=(5,)).residual == [False]


@pytest.mark.parametrize("skip_connections", [True, False])
def test_residual_connection_behaviour(skip_connections):
    torch.manual_seed(0)
    experts = StackedExperts(2, 3, 2, expert_hidden=(4, 4), skip_connections=skip_connections)
    with torch.no_grad():
        experts.hidden[1].weight.zero_()
        experts.hidden[1].bias.zero_()  # second hidden layer outputs relu(0) = 0
    x = torch.randn(2, 5, 3)
    h1 = torch.relu(torch.bmm(x, experts.hidden[0].weight) + experts.hidden[0].bias[:, None])
    h2 = h1 if skip_connections else torch.zeros_like(h1)
    expected = torch.bmm(h2, experts.output.weight) + experts.output.bias[:, None]
    torch.testing.assert_close(experts(x), expected)


def test_layer_norm_before_output_removes_hidden_scale():
    torch.manual_seed(0)
    experts = StackedExperts(3, 4, 2, expert_hidden=(16,), layer_norm=True)
    x = torch.randn(3, 7, 4)
    before = experts(x)
    with torch.no_grad():  # relu is positively homogeneous: scales h by 10, which the norm removes
        experts.hidden[0].weight.mul_(10)
        experts.hidden[0].bias.mul_(10)
    torch.testing.assert_close(experts(x), before, rtol=1e-3, atol=1e-4)
    plain = StackedExperts(3, 4, 2, expert_hidden=(16,), layer_norm=False)
    assert len(list(plain.norms.parameters())) == 0
    assert len(list(experts.norms.parameters())) == 2


def test_dropout_only_in_training():
    torch.manual_seed(0)
    experts = StackedExperts(2, 4, 3, expert_hidden=(32, 32), dropout=0.5, layer_norm=True)
    x = torch.randn(2, 9, 4)
    experts.train()
    a, b = experts(x), experts(x)
    assert not torch.equal(a, b)
    experts.eval()
    c, d = experts(x), experts(x)
    assert torch.equal(c, d)
    no_dropout = StackedExperts(2, 4, 3, expert_hidden=(32, 32), dropout=0.0, layer_norm=True)
    no_dropout.load_state_dict(experts.state_dict())
    torch.testing.assert_close(no_dropout.train()(x), c)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_every_activation_runs(activation):
    torch.manual_seed(0)
    experts = StackedExperts(2, 3, 1, expert_hidden=(4,), activation=activation)
    x = torch.randn(2, 5, 3)
    h = ACTIVATIONS[activation](torch.bmm(x, experts.hidden[0].weight) + experts.hidden[0].bias[:, None])
    torch.testing.assert_close(experts(x), torch.bmm(h, experts.output.weight) + experts.output.bias[:, None])


def test_invalid_activation_names_allowed_values():
    with pytest.raises(ValueError, match="activation") as info:
        StackedExperts(2, 3, 1, activation="sigmoidish")
    for name in ACTIVATIONS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="activation"):
        MixtureOfExperts(3, 1, activation="swish")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=-1), "top_k"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(capacity_factor=0.5), "capacity_factor"),
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(router="hash"), "router"),
        (dict(balance_loss="zloss"), "balance_loss"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfExperts(3, 1, n_experts=4, **kwargs)


def test_valid_edge_arguments():
    MixtureOfExperts(3, 1, n_experts=4, top_k=4, capacity_factor=1.0)
    MixtureOfExperts(3, 1, n_experts=4, top_k=1, temperature=1e-3)
    with pytest.raises(ValueError, match="top_k"):
        make_router("topk", 3, 4, 0, 1.0)


# ---------------------------------------------------------------------------------------
# 9. temperature
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["topk", "softmax"])
def test_temperature_divides_logits(name):
    torch.manual_seed(0)
    cold = make_router(name, 5, 4, 2, 1.0)
    hot = make_router(name, 5, 4, 2, 2.0)
    hot.gate.load_state_dict(cold.gate.state_dict())
    assert float(hot.temperature) == 2.0 and "temperature" in hot.state_dict()  # saved with the weights
    x = inputs(11)
    a, b = cold(x), hot(x)
    torch.testing.assert_close(b.logits, a.logits / 2, rtol=0, atol=0)
    torch.testing.assert_close(a.logits, cold.gate(x), rtol=0, atol=0)
    torch.testing.assert_close(b.probs, torch.softmax(a.logits / 2, 1))
    # flatter: the largest probability shrinks
    assert (b.probs.max(1).values < a.probs.max(1).values).all()
    assert torch.equal(a.indices, b.indices)  # monotone: same ranking


# ---------------------------------------------------------------------------------------
# 10. MoEOutput
# ---------------------------------------------------------------------------------------


def test_moe_output_fields():
    assert MoEOutput._fields == ("output", "gates", "balance_loss", "z_loss", "expert_counts", "n_dropped",
                                "diversity_loss", "assignments")
    module = make_moe().eval()
    out = module(inputs(6))
    assert out[0] is out.output
    assert out.output.shape == (6, 2)


@pytest.mark.parametrize("n_experts, top_k", [(4, 1), (4, 2), (6, 3)])
def test_expert_counts_sum_to_n_times_k(n_experts, top_k):
    module = make_moe(n_experts=n_experts, top_k=top_k, capacity_factor=1.0).train()
    skew_router(module, bias=1.0)
    out = module(inputs(15))
    assert out.expert_counts.dtype == torch.int64
    assert out.expert_counts.sum().item() == 15 * top_k
    assert out.expert_counts.tolist() == torch.bincount(module.router(inputs(15)).indices.reshape(-1),
                                                        minlength=n_experts).tolist()
    assert out.n_dropped.dtype == torch.int64


def test_empty_batch():
    module = make_moe().eval()
    out = module(torch.zeros(0, 5))
    assert out.output.shape == (0, 2)
    assert out.expert_counts.tolist() == [0, 0, 0, 0]
    assert out.balance_loss.item() == 0.0
    assert out.z_loss.item() == 0.0


def test_top1_router_gets_task_gradient_with_unit_weight():
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=3, top_k=1, expert_hidden=(8,))
    out = module(torch.randn(16, 4))
    torch.testing.assert_close(out.gates.sum(dim=1), torch.ones(16))
    out.output.sum().backward()
    assert module.router.gate.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- noisy top-k, switch, cv2


def test_noisy_topk_selects_by_noisy_scores_and_estimates_selection_probability():
    torch.manual_seed(0)
    router = make_router("noisy_topk", 5, 6, 2, 1.0)
    torch.nn.init.normal_(router.noise.weight)
    x = torch.randn(40, 5)
    torch.manual_seed(123)
    routing = router(x)
    with torch.no_grad():
        logits = router.compute_logits(x)
        noise_std = torch.nn.functional.softplus(router.noise(x)) + 1e-6
    torch.manual_seed(123)
    noisy = logits + torch.randn_like(logits) * noise_std
    torch.testing.assert_close(routing.indices, noisy.topk(2, dim=-1).indices)
    torch.testing.assert_close(routing.weights, noisy.topk(2, dim=-1).values.softmax(dim=-1))
    # selection probability: P(clean + noise > 2nd largest noisy score among the others)
    expected = torch.empty_like(logits)
    for row in range(40):
        for expert in range(6):
            others = torch.cat([noisy[row, :expert], noisy[row, expert + 1:]])
            threshold = others.topk(2).values[-1]
            z = (logits[row, expert] - threshold) / noise_std[row, expert]
            expected[row, expert] = 0.5 * (1 + math.erf(float(z) / math.sqrt(2)))
    torch.testing.assert_close(routing.selection_probs, expected, rtol=1e-4, atol=1e-5)


def test_noisy_topk_is_noise_free_at_prediction():
    torch.manual_seed(0)
    noisy = make_router("noisy_topk", 5, 6, 2, 1.0)
    plain = make_router("topk", 5, 6, 2, 1.0)
    plain.gate.load_state_dict(noisy.gate.state_dict())
    noisy.eval()
    x = torch.randn(30, 5)
    a, b = noisy(x), plain(x)
    torch.testing.assert_close(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)
    assert a.selection_probs is None


def test_switch_router_is_top1_with_training_jitter_only():
    torch.manual_seed(0)
    switch = make_router("switch", 5, 4, 3, 1.0)  # top_k is not used
    x = torch.randn(50, 5)
    routing = switch(x)
    assert routing.indices.shape == (50, 1)
    torch.testing.assert_close(routing.weights, torch.ones(50, 1))
    assert not torch.equal(routing.logits, switch.gate(x))  # jittered input in training
    switch.eval()
    torch.testing.assert_close(switch(x).logits, switch.gate(x))


def test_cv2_loss_is_zero_with_zero_gradient_at_perfect_balance():
    gates = torch.full((8, 4), 0.25, requires_grad=True)
    load = torch.full((8, 4), 0.5, requires_grad=True)
    loss = cv2_balance_loss(gates, load)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(gates.grad).all() and gates.grad.abs().max() == 0
    assert torch.isfinite(load.grad).all()


def test_cv2_loss_is_importance_plus_load_squared_cv():
    gates = torch.tensor([[0.7, 0.3, 0.0], [0.6, 0.0, 0.4], [0.0, 0.0, 1.0]])
    load = (gates > 0).float()
    importance, counts = gates.sum(0), load.sum(0)
    expected = importance.var(unbiased=False) / importance.mean() ** 2 + counts.var(unbiased=False) / counts.mean() ** 2
    torch.testing.assert_close(cv2_balance_loss(gates, load), expected)
    # masked rows do not count
    mask = torch.tensor([True, True, True, False])
    padded = cv2_balance_loss(torch.cat([gates, torch.tensor([[1.0, 0, 0]])]),
                              torch.cat([load, torch.tensor([[1.0, 0, 0]])]), mask)
    torch.testing.assert_close(padded, expected)


@pytest.mark.parametrize("balance_loss", ["switch", "cv2", "aux_free", None])
def test_module_balance_loss_is_the_named_loss_of_its_routing(balance_loss):
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=4, top_k=2, router="noisy_topk", balance_loss=balance_loss,
                              expert_hidden=(8,)).train()
    x = torch.randn(32, 4)
    torch.manual_seed(1)
    out = module(x)
    torch.manual_seed(1)
    routing = module.router(x)  # the same noise as inside the forward
    expected = {
        "switch": lambda: switch_balance_loss(routing.probs, routing.indices),
        "cv2": lambda: cv2_balance_loss(out.gates, routing.selection_probs),
    }.get(balance_loss, lambda: torch.zeros(()))()
    assert expected.item() != 0 or balance_loss not in ("switch", "cv2")
    torch.testing.assert_close(out.balance_loss, expected)


@pytest.mark.parametrize("router", ["noisy_topk", "switch"])
def test_new_routers_train_a_module_end_to_end(router):
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=4, top_k=2, router=router, balance_loss="cv2", expert_hidden=(8,))
    out = module(torch.randn(32, 4))
    (out.output.sum() + out.balance_loss).backward()
    assert torch.isfinite(out.balance_loss)
    assert module.router.gate.weight.grad.abs().sum() > 0


def test_aux_free_bias_moves_load_toward_uniform_on_a_skewed_router():
    torch.manual_seed(0)
    router = make_router("topk", 4, 4, 1, 1.0)
    with torch.no_grad():
        router.gate.bias.copy_(torch.tensor([2.0, 0.5, 0.0, -0.5]))
    x = torch.randn(512, 4)

    def imbalance():
        counts = torch.bincount(router(x).indices.reshape(-1), minlength=4).float()
        return (counts.max() / counts.mean()).item(), counts

    before, counts = imbalance()
    weights_before = router(x).weights
    for _ in range(300):
        router.update_selection_bias(torch.bincount(router(x).indices.reshape(-1), minlength=4), 0.01)
    after, _ = imbalance()
    assert before > 2.0 and after < 1.3
    # the bias selects, it never weights: top-1 weights stay exactly 1
    torch.testing.assert_close(router(x).weights, weights_before)
    # the update is the sign rule: the busiest expert's bias went down, the idlest up
    assert router.selection_bias[0] < 0 < router.selection_bias[3]


def test_aux_free_bias_does_not_change_gate_weights_of_chosen_experts():
    torch.manual_seed(0)
    router = make_router("topk", 4, 5, 2, 1.0)
    x = torch.randn(64, 4)
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([3.0, 0.0, 0.0, 0.0, -3.0]))
    routing = router(x)
    assert (routing.indices == 0).any(dim=1).all()  # bias forces expert 0 into every row
    expected = routing.logits.gather(1, routing.indices).softmax(dim=-1)
    torch.testing.assert_close(routing.weights, expected)


def test_expert_counts_leave_out_zero_weight_rows():
    torch.manual_seed(0)
    module = MixtureOfExperts(3, 1, n_experts=4, top_k=2, expert_hidden=(4,))
    x = torch.randn(10, 3)
    weight = torch.tensor([1.0] * 6 + [0.0] * 4)
    counts = module(x, sample_weight=weight).expert_counts
    assert counts.sum() == 6 * 2
    torch.testing.assert_close(counts, module(x[:6]).expert_counts)


def test_shared_expert_adds_an_always_on_expert():
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 2, n_experts=3, top_k=1, expert_hidden=(8,), shared_expert=True)
    plain = MixtureOfExperts(4, 2, n_experts=3, top_k=1, expert_hidden=(8,))
    plain.load_state_dict({k: v for k, v in module.state_dict().items() if not k.startswith("shared_expert.")})
    module.eval()
    plain.eval()
    x = torch.randn(12, 4)
    shared = module.shared_expert(x.unsqueeze(0))[0]
    torch.testing.assert_close(module(x).output, plain(x).output + shared)
    module.train()
    module(x).output.sum().backward()
    assert module.shared_expert.output.weight.grad.abs().sum() > 0


def test_mlp_gate():
    torch.manual_seed(0)
    router = make_router("topk", 4, 5, 2, 1.0, gate_hidden=(16, 8))
    assert [m.out_features for m in router.gate if isinstance(m, torch.nn.Linear)] == [16, 8, 5]
    routing = router(torch.randn(7, 4))
    torch.testing.assert_close(routing.weights.sum(dim=1), torch.ones(7))


@pytest.mark.parametrize("router,top_k", [("topk", 2), ("softmax", 3)])
def test_an_expert_with_non_finite_output_is_masked_with_a_warning(router, top_k):
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=3, top_k=top_k, router=router, expert_hidden=(8,)).eval()
    x = torch.randn(20, 4)
    before = module(x)
    with torch.no_grad():
        module.experts.output.bias[1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"Expert\(s\) \[1\]"):
        after = module(x)
    assert torch.isfinite(after.output).all()
    # Equal to a mixture of the healthy experts alone, their weights renormalised.
    healthy = torch.tensor([0, 2])
    outputs = module.experts(x.unsqueeze(0).expand(3, -1, -1))[healthy]  # (2, n, 1)
    gates = before.gates[:, healthy]
    keep = gates.sum(dim=1) > 0
    expected = torch.einsum("eno,ne->no", outputs, gates / gates.sum(dim=1, keepdim=True).clamp_min(1e-30))
    torch.testing.assert_close(after.output[keep], expected[keep])


def test_expert_dropout_drops_chosen_experts_in_training_only():
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=6, top_k=3, expert_hidden=(8,), expert_dropout=0.5)
    x = torch.randn(400, 4)
    out = module(x)
    active = (out.gates > 0).sum(dim=1)
    assert active.min() >= 1 and active.max() <= 3 and active.float().mean() < 2.5
    torch.testing.assert_close(out.gates.sum(dim=1), torch.ones(400))
    assert out.expert_counts.sum() == active.sum()  # dropped assignments are not dispatched
    module.eval()
    reference = MixtureOfExperts(4, 1, n_experts=6, top_k=3, expert_hidden=(8,))
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(module(x).output, reference.eval()(x).output)
    with pytest.raises(ValueError, match="expert_dropout"):
        MixtureOfExperts(4, 1, expert_dropout=1.0)


@pytest.mark.parametrize("router, top_k, expert_dropout", [
    ("noisy_topk", 1, 0.0), ("softmax", 2, 0.5), ("topk", 2, 0.5), ("hierarchical", 2, 0.5), ("switch", 1, 0.5)])
def test_a_low_temperature_trains_without_nan(router, top_k, expert_dropout):
    """At temperature 1e-4 most gate probabilities underflow to 0: a noisy choice of such an
    expert, or expert dropout keeping only such experts, must not divide 0 by 0."""
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=4, top_k=top_k, router=router, expert_hidden=(8,), temperature=1e-4,
                              expert_dropout=expert_dropout, **({"n_groups": 2} if router == "hierarchical" else {}))
    out = module(torch.randn(256, 4) * 3)
    assert torch.isfinite(out.output).all() and torch.isfinite(out.gates).all()
    torch.testing.assert_close(out.gates.sum(dim=1), torch.ones(256))
    # a loss far from its target: gradients of the gate weights far above 1
    ((out.output - 100).pow(2).sum() + out.balance_loss + out.z_loss).backward()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("router", ["topk", "softmax"])
def test_counts_with_expert_dropout_and_sample_weight_count_only_live_assignments(router):
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=4, top_k=2, router=router, expert_hidden=(8,), expert_dropout=0.5)
    weight = torch.tensor([1.0] * 30 + [0.0] * 10)
    out = module(torch.randn(40, 4), sample_weight=weight)
    assert out.expert_counts.sum() == (out.gates[:30] > 0).sum()


@pytest.mark.parametrize("router", ["topk", "softmax", "noisy_topk", "switch", "top_p", "hierarchical"])
def test_inference_methods_match_forward_in_eval(router):
    module = make_moe(router=router, n_experts=4, top_k=2, shared_expert=True, expert_dropout=0.3).eval()
    x = inputs(30)
    with torch.no_grad():  # as predict and route run (with autograd, other kernels may round otherwise)
        full = module(x)
    predicted, routed = module.predict(x), module.route(x)
    assert not predicted.requires_grad and not routed.requires_grad
    torch.testing.assert_close(predicted, full.output, rtol=0, atol=0)
    torch.testing.assert_close(routed, full.gates, rtol=0, atol=0)
    torch.testing.assert_close(routed.sum(dim=1), torch.ones(30))


# ---------------------------------------------------------------------------------------
# forward_sorted: each expert on its own contiguous rows (the "sorted" layout)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("expert_hidden,layer_norm", [((), False), ((6,), False), ((6, 6), True), ((6, 6, 4), False)])
def test_forward_sorted_equals_each_expert_alone(expert_hidden, layer_norm, activation):
    torch.manual_seed(0)
    experts = StackedExperts(3, 4, 2, expert_hidden=expert_hidden, layer_norm=layer_norm, activation=activation)
    counts = [5, 0, 7]
    x = torch.randn(sum(counts), 4)
    by_expert = [experts(x[start:start + c].unsqueeze(0).expand(3, -1, -1))[e]
                 for e, (start, c) in enumerate(zip((0, 5, 5), counts))]
    expected = torch.cat(by_expert)
    with_grad = experts.forward_sorted(x, counts)
    with torch.no_grad():  # the in-place path
        without_grad = experts.forward_sorted(x, counts)
    torch.testing.assert_close(with_grad, expected)
    torch.testing.assert_close(without_grad, expected)
    assert experts.forward_sorted(x[:0], [0, 0, 0]).shape == (0, 2)


def test_forward_sorted_trains_the_experts_it_uses():
    torch.manual_seed(0)
    experts = StackedExperts(3, 4, 1, expert_hidden=(6,))
    experts.forward_sorted(torch.randn(4, 4), [4, 0, 0]).sum().backward()
    assert experts.output.weight.grad[0].abs().sum() > 0
    assert experts.output.weight.grad[1:].abs().sum() == 0


# ---------------------------------------------------------------------------------------
# the module's own checks: its arguments, its input's dtype, its dtype conversions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (dict(n_features=0), "n_features must be a positive int; got 0"),
    (dict(n_outputs=0), "n_outputs must be a positive int; got 0"),
    (dict(top_k=1.5), "top_k must be a positive int; got 1.5"),
    (dict(expert_hidden=(8, 0)), "expert_hidden sizes must be a positive int; got 0"),
    (dict(gate_hidden=(0,)), "gate_hidden sizes must be a positive int; got 0"),
    (dict(dropout=1.5), r"dropout must be in \[0, 1\), got 1.5"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
    (dict(output_init_scale=-1.0), "output_init_scale must be > 0, got -1.0"),
])
def test_invalid_arguments_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        make_moe(**bad)


@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_integer_input_is_refused_not_truncated(expert_type):
    """Adapter experts cast their weights to the input's dtype: an integer input gave
    integer outputs."""
    module = make_moe(expert_type=expert_type, router="softmax")
    with pytest.raises(TypeError, match="takes floating-point input.*got torch.int64"):
        module(torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="floating-point"):
        module.eval().predict(torch.ones(4, 5, dtype=torch.long))


@pytest.mark.parametrize("router", ["softmax", "topk", "noisy_topk", "switch", "top_p", "hierarchical", "uniform"])
def test_a_module_converted_to_float64_runs_in_float64(router):
    """So that gradients can be checked in double precision; half precision is autocast's."""
    module = make_moe(router=router, n_experts=4).double()
    x = inputs(8).double().requires_grad_()
    out = module(x)
    assert out.output.dtype == torch.float64
    out.output.sum().backward()
    assert x.grad.dtype == torch.float64 and torch.isfinite(x.grad).all()
    if router != "uniform":
        with pytest.raises(TypeError, match="use torch.autocast for mixed precision"):
            make_moe(router=router, n_experts=4).half()(inputs(8).half())


@pytest.mark.parametrize("router", ["softmax", "uniform", "topk", "noisy_topk", "switch", "top_p"])
def test_top_k_is_at_most_n_experts_as_in_the_estimators(router):
    """n_experts=1 needs no top_k=1 beside it; a top_k past n_experts means every expert."""
    single = make_moe(router=router, n_experts=1)  # top_k=2 by default
    assert single.top_k == 1
    torch.testing.assert_close(single(inputs(6)).gates, torch.ones(6, 1))
    if router in ("topk", "noisy_topk"):
        every = make_moe(router=router, n_experts=4, top_k=9)
        assert every.top_k == 4 and (every(inputs(6)).gates > 0).all()
