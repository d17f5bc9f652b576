"""Adapter experts, the uniform router, numeric embeddings, the per-expert loss, learning-rate
schedules, and the estimator parameters and persistence (format version 2) that expose them."""

import json
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import sklearn_moe
from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe.callbacks import LearningRateShape
from sklearn_moe.nn import MixtureOfExperts, make_router
from sklearn_moe.nn.dispatch import (
    ExpertAssignments,
    combine,
    dense_assignments,
    expert_capacity,
    flat_assignments,
    mask_failed_experts,
    normalize_per_row,
)
from sklearn_moe.nn.embeddings import (
    D_EMBEDDING,
    MIN_BIN_WIDTH,
    N_BINS,
    NumericEmbedding,
    embedded_columns,
    quantile_bins,
)
from sklearn_moe.nn.experts import AdapterExperts, StackedExperts
from sklearn_moe.nn.losses import per_expert_loss
from sklearn_moe.nn.routers import UniformRouter
from sklearn_moe.persistence import _ADDED_TENSORS, FORMAT_VERSION

from .conftest import FAST
from .test_nn import assert_capacity_drops_in_training_only, inputs, skew_router
from .test_persistence import assert_same_outputs_and_weights

ROUTER_NAMES = ("softmax", "topk", "noisy_topk", "switch", "top_p", "hierarchical", "uniform")
ADAPTER = dict(FAST, expert_hidden=(8,), max_epochs=8, expert_type="adapter")
KEY = "sklearn-moe"


def make_adapters(n_experts=3, in_features=4, out_features=1, expert_hidden=(8,), seed=0, **kwargs):
    torch.manual_seed(seed)
    return AdapterExperts(n_experts, in_features, out_features, expert_hidden, **kwargs)


def randomise_adapters(module, seed=1):
    """Give every per-expert vector random values, so that a forward that ignored one of
    them (or used another expert's) would differ from the manual computation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in (module.in_scales, module.out_scales, module.biases, module.norm_weights, module.norm_biases):
            for parameter in group:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))


def manual_adapter(module, x, expert, act=F.relu, layer_norm=False, skip_connections=True):
    """Expert ``expert`` on the rows ``x``, written out from the BatchEnsemble formula."""
    e = expert
    widths = [w.shape[0] for w in module.weights] + [w.shape[1] for w in module.weights[-1:]]

    def norm(h, index):
        if not layer_norm:
            return h
        mean = h.mean(dim=1, keepdim=True)
        var = ((h - mean) ** 2).mean(dim=1, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5) * module.norm_weights[index][e] + module.norm_biases[index][e]

    h = x
    for i, weight in enumerate(module.weights):
        inputs_ = norm(h, i - 1) if i > 0 else h
        z = act(((inputs_ * module.in_scales[i][e]) @ weight) * module.out_scales[i][e] + module.biases[i][e])
        residual = skip_connections and i > 0 and widths[i] == widths[i + 1]
        h = h + z if residual else z
    if len(module.weights):
        h = norm(h, -1)
    return h @ module.head_weight[e] + module.head_bias[e]


def make_adapter_moe(router="topk", seed=0, **kwargs):
    params = dict(n_features=5, n_outputs=2, n_experts=4, top_k=2, expert_hidden=(8,), router=router,
                  expert_type="adapter")
    params.update(kwargs)
    torch.manual_seed(seed)
    return MixtureOfExperts(**params)


def regression_data(n=200, n_features=5, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, n_features))
    y = X[:, 0] * 2 + np.sin(3 * X[:, 1]) + 0.1 * rng.normal(size=n)
    return X, y


def gates_from_assignments(assignments, n, n_experts):
    return torch.zeros(n, n_experts, dtype=assignments.weights.dtype).index_put(
        (assignments.rows, assignments.experts), assignments.weights, accumulate=True)


# ---------------------------------------------------------------------------------------
# 1. AdapterExperts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("expert_hidden, layer_norm, skip_connections, out_features", [
    ((8,), False, True, 1),
    ((8,), False, True, 3),
    ((8, 8), False, True, 1),   # residual second layer
    ((8, 8), False, False, 2),  # no residual
    ((8, 8), True, True, 1),    # layer norm + residual
    ((8, 6), True, True, 2),    # unequal widths: never residual
])
def test_adapter_forward_matches_manual_formula(expert_hidden, layer_norm, skip_connections, out_features):
    module = make_adapters(3, 4, out_features, expert_hidden, layer_norm=layer_norm,
                           skip_connections=skip_connections, activation="tanh").double()
    randomise_adapters(module)
    x = inputs(7, 4).double()
    experts = torch.tensor([0, 2, 1, 2, 0, 1, 1])
    out = module(x, experts)
    assert out.shape == (7, out_features)
    for i in range(7):
        expected = manual_adapter(module, x[i:i + 1], int(experts[i]), act=torch.tanh, layer_norm=layer_norm,
                                  skip_connections=skip_connections)
        torch.testing.assert_close(out[i:i + 1], expected, rtol=0, atol=1e-10)
    # every expert gives a different answer on the same row: the adapters matter
    same_row = module(x[:1].expand(3, -1), torch.arange(3))
    assert not torch.allclose(same_row[0], same_row[1]) and not torch.allclose(same_row[1], same_row[2])


def test_adapter_hidden_layer_formula_by_hand():
    """One input, one hidden unit, relu: ``relu((x * r_e) * W * s_e + b_e) * head_e + c_e``."""
    module = AdapterExperts(2, 1, 1, (1,))
    with torch.no_grad():
        module.weights[0].fill_(2.0)
        module.in_scales[0].copy_(torch.tensor([[1.0], [-1.0]]))
        module.out_scales[0].copy_(torch.tensor([[3.0], [0.5]]))
        module.biases[0].copy_(torch.tensor([[1.0], [4.0]]))
        module.head_weight.copy_(torch.tensor([[[2.0]], [[-1.0]]]))
        module.head_bias.copy_(torch.tensor([[0.5], [1.0]]))
    x = torch.tensor([[1.0], [1.0], [3.0]])
    out = module(x, torch.tensor([0, 1, 1]))
    # row 0: relu(1*1*2*3 + 1) = 7 -> 7*2 + 0.5 = 14.5
    # row 1: relu(1*-1*2*0.5 + 4) = 3 -> 3*-1 + 1 = -2
    # row 2: relu(3*-1*2*0.5 + 4) = 1 -> 1*-1 + 1 = 0
    torch.testing.assert_close(out, torch.tensor([[14.5], [-2.0], [0.0]]))


def test_adapter_shared_weights_do_not_grow_with_n_experts():
    small = AdapterExperts(2, 5, 1, (16, 16))
    large = AdapterExperts(64, 5, 1, (16, 16))
    assert len(small.weights) == len(large.weights) == 2
    for w_small, w_large in zip(small.weights, large.weights):
        assert w_small.shape == w_large.shape
    assert [tuple(w.shape) for w in large.weights] == [(5, 16), (16, 16)]
    shared = {id(w) for w in large.weights}
    for name, parameter in large.named_parameters():
        if id(parameter) not in shared:
            assert parameter.shape[0] == 64, name
    # shared: 5*16 + 16*16 = 336; per expert: in scales 5 + 16, out scales 16 + 16,
    # biases 16 + 16, head 16 + 1 = 102
    for module, n_experts in ((small, 2), (large, 64)):
        assert sum(p.numel() for p in module.parameters()) == 336 + 102 * n_experts
    # independent experts, by contrast, have one weight matrix per expert
    assert StackedExperts(64, 5, 1, (16, 16)).hidden[0].weight.shape == (64, 5, 16)


def test_adapter_random_signs_initialisation():
    module = make_adapters(64, 4, 2, (8, 8), layer_norm=True)
    first = module.in_scales[0]
    assert torch.equal(first.abs(), torch.ones_like(first))
    assert (first == 1).any() and (first == -1).any()
    assert torch.unique(first, dim=0).shape[0] > 1  # the experts differ
    assert torch.equal(module.in_scales[1], torch.ones(64, 8))
    for scale in module.out_scales:
        assert torch.equal(scale, torch.ones_like(scale))
    for bias in module.biases:
        assert torch.equal(bias, bias[:1].expand_as(bias))
        assert bias[0].abs().sum() > 0
    for weight, bias in zip(module.norm_weights, module.norm_biases):
        assert torch.equal(weight, torch.ones_like(weight)) and torch.equal(bias, torch.zeros_like(bias))
    # the heads are the experts' own from the start
    assert not torch.equal(module.head_weight[0], module.head_weight[1])


def test_adapter_normal_initialisation_is_constant_within_chunks():
    chunks = [3, 1, 2]
    module = make_adapters(16, 6, 1, (8,), first_scaling="normal", input_chunks=chunks)
    first = module.in_scales[0]
    for start, width in ((0, 3), (3, 1), (4, 2)):
        block = first[:, start:start + width]
        assert torch.equal(block, block[:, :1].expand_as(block))
    per_chunk = first[:, [0, 3, 4]]
    assert not torch.equal(per_chunk.abs(), torch.ones_like(per_chunk))  # normal values, not signs
    assert not torch.equal(per_chunk[:, 0], per_chunk[:, 1])
    assert not torch.equal(per_chunk[0], per_chunk[1])
    assert torch.equal(module.out_scales[0], torch.ones(16, 8))
    # without chunks: one value per column
    columns = make_adapters(16, 6, 1, (8,), first_scaling="normal").in_scales[0]
    assert not torch.equal(columns[:, 0], columns[:, 1])


def test_adapter_invalid_options():
    with pytest.raises(ValueError, match="input_chunks"):
        AdapterExperts(4, 6, 1, (8,), first_scaling="normal", input_chunks=[3, 2])
    with pytest.raises(ValueError, match="first_scaling"):
        AdapterExperts(4, 6, 1, (8,), first_scaling="bogus")
    with pytest.raises(ValueError, match="activation"):
        AdapterExperts(4, 6, 1, (8,), activation="bogus")


@pytest.mark.parametrize("out_features", [1, 3])
def test_adapter_all_experts_equals_forward_per_expert(out_features):
    module = make_adapters(5, 4, out_features, (8, 8), layer_norm=True)
    randomise_adapters(module)
    x = inputs(6, 4)
    every = module.all_experts(x)
    assert every.shape == (5, 6, out_features)
    for e in range(5):
        torch.testing.assert_close(every[e], module(x, torch.full((6,), e)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("out_features", [1, 2])
def test_adapter_without_hidden_layers_is_per_expert_linear(out_features):
    module = make_adapters(3, 4, out_features, ())
    assert len(module.weights) == 0 and len(module.in_scales) == 0
    assert {name for name, _ in module.named_parameters()} == {"head_weight", "head_bias"}
    x = inputs(5, 4)
    experts = torch.tensor([2, 0, 1, 1, 2])
    expected = torch.stack([x[i] @ module.head_weight[e] + module.head_bias[e] for i, e in enumerate(experts)])
    torch.testing.assert_close(module(x, experts), expected)
    assert not torch.allclose(module.head_weight[0], module.head_weight[1])


@pytest.mark.parametrize("out_features", [1, 2])
def test_adapter_gradients_reach_only_the_experts_used(out_features):
    module = make_adapters(4, 3, out_features, (8,))
    x = inputs(6, 3)
    module(x, torch.tensor([0, 2, 0, 2, 2, 0])).square().sum().backward()
    assert module.weights[0].grad.abs().sum() > 0
    for parameter in (module.in_scales[0], module.out_scales[0], module.biases[0], module.head_weight,
                      module.head_bias):
        per_expert = parameter.grad.reshape(4, -1).abs().sum(dim=1)
        assert (per_expert[[0, 2]] > 0).all()
        assert (per_expert[[1, 3]] == 0).all()


# ---------------------------------------------------------------------------------------
# 2. Uniform router
# ---------------------------------------------------------------------------------------


def test_uniform_router_weighs_every_expert_equally():
    router = make_router("uniform", 3, n_experts=4, top_k=2, temperature=0.1, gate_hidden=(8,))
    assert isinstance(router, UniformRouter)
    assert list(router.parameters()) == []
    assert router.learned is False and router.is_dense
    routing = router(inputs(5, 3))
    torch.testing.assert_close(routing.probs, torch.full((5, 4), 0.25))
    torch.testing.assert_close(routing.weights, torch.full((5, 4), 0.25))
    assert torch.equal(routing.logits, torch.zeros(5, 4))
    assert torch.equal(routing.indices, torch.arange(4).expand(5, -1))


@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_uniform_router_mixture_is_the_mean_of_the_experts(expert_type):
    module = make_adapter_moe("uniform", expert_type=expert_type, n_experts=4, n_outputs=2)
    assert sum(p.numel() for p in module.router.parameters()) == 0
    x = inputs(10)
    for train in (True, False):
        module.train(train)
        out = module(x)
        torch.testing.assert_close(out.gates, torch.full((10, 4), 0.25))
        assert out.z_loss.item() == 0.0  # the logits are zeros, but there is no gate to keep small
        assert out.balance_loss.item() == pytest.approx(1.0)
        torch.testing.assert_close(out.output, module.experts.all_experts(x).mean(dim=0), rtol=0, atol=1e-6)
        torch.testing.assert_close(module.route(x), torch.full((10, 4), 0.25))
    module.train()
    out = module(x)
    (out.output.square().mean() + out.balance_loss + out.z_loss).backward()
    grads = [p.grad for p in module.experts.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


# ---------------------------------------------------------------------------------------
# 3. per_expert_loss and the net's loss
# ---------------------------------------------------------------------------------------

# Row 0 is served by two assignments (weights 0.25, 0.75), row 1 by one.
ROWS = torch.tensor([0, 0, 1])
GATE_WEIGHTS = [0.25, 0.75, 1.0]
OUTPUTS = [[1.0], [3.0], [2.0]]
TARGET = torch.tensor([[2.0], [0.0]])


def test_per_expert_loss_mse_by_hand():
    criterion = nn.MSELoss(reduction="none")
    loss = per_expert_loss(criterion, torch.tensor(OUTPUTS), ROWS, torch.tensor(GATE_WEIGHTS), TARGET)
    # experts: (0.25 * 1 + 0.75 * 1 + 1 * 4) / 2 = 2.5
    # mixture: row 0 = 0.25 + 2.25 = 2.5 -> 0.25; row 1 = 2 -> 4; mean 2.125
    assert loss.item() == pytest.approx(4.625)
    weighted = per_expert_loss(criterion, torch.tensor(OUTPUTS), ROWS, torch.tensor(GATE_WEIGHTS), TARGET,
                               sample_weight=torch.tensor([2.0, 0.5]))
    # experts: ((0.25 + 0.75) * 2 + 4 * 0.5) / 2 = 2; mixture: (0.25 * 2 + 4 * 0.5) / 2 = 1.25
    assert weighted.item() == pytest.approx(3.25)


def test_per_expert_loss_multi_output_rows_average_over_outputs():
    criterion = nn.MSELoss(reduction="none")
    outputs = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    loss = per_expert_loss(criterion, outputs, torch.tensor([0, 0]), torch.tensor([0.5, 0.5]),
                           torch.tensor([[2.0, 0.0]]))
    # experts: 0.5 * (1 + 0) / 2 + 0.5 * (1 + 4) / 2 = 1.5 (n = 1)
    # mixture (2, 1): (0 + 1) / 2 = 0.5
    assert loss.item() == pytest.approx(2.0)


def test_per_expert_loss_cross_entropy_by_hand():
    criterion = nn.CrossEntropyLoss(reduction="none")
    ln3, ln4 = math.log(3.0), math.log(4.0)
    outputs = torch.tensor([[0.0, 0.0], [ln3, 0.0], [0.0, ln4]])
    loss = per_expert_loss(criterion, outputs, ROWS, torch.tensor([0.5, 0.5, 1.0]), torch.tensor([0, 1]))
    experts = (0.5 * math.log(2.0) + 0.5 * math.log(4 / 3) + math.log(5 / 4)) / 2
    # row 0's mixed logits (ln3 / 2, 0): p(class 0) = sqrt(3) / (sqrt(3) + 1)
    mixture = (math.log((math.sqrt(3) + 1) / math.sqrt(3)) + math.log(5 / 4)) / 2
    assert loss.item() == pytest.approx(experts + mixture, rel=1e-6)


@pytest.mark.parametrize("sample_weight", [None, [2.0, 0.5]])
def test_per_expert_loss_gradients_are_separated(sample_weight):
    outputs = torch.tensor(OUTPUTS, dtype=torch.float64, requires_grad=True)
    weights = torch.tensor(GATE_WEIGHTS, dtype=torch.float64, requires_grad=True)
    sw = None if sample_weight is None else torch.tensor(sample_weight)
    loss = per_expert_loss(nn.MSELoss(reduction="none"), outputs, ROWS, weights, TARGET, sw)
    grad_outputs, grad_weights = torch.autograd.grad(loss, (outputs, weights))
    row_weight = torch.ones(3) if sw is None else sw[ROWS]
    o, g, y = torch.tensor(OUTPUTS)[:, 0], torch.tensor(GATE_WEIGHTS), TARGET[ROWS, 0]
    # the outputs: only from the experts' own terms, g_a * sw * dL/do / n (no mixture term)
    expected_outputs = g * row_weight * 2 * (o - y) / 2
    torch.testing.assert_close(grad_outputs[:, 0].float(), expected_outputs)
    # the weights: only from the mixture term, sw * 2 (m_r - y_r) o_a / n (no L(o_a) / n term)
    mixture = torch.zeros(2).index_add(0, ROWS, g * o)
    expected_weights = row_weight * 2 * (mixture[ROWS] - y) * o / 2
    torch.testing.assert_close(grad_weights.float(), expected_weights)
    if sample_weight is None:
        torch.testing.assert_close(grad_outputs[:, 0].float(), torch.tensor([-0.25, 0.75, 2.0]))
        torch.testing.assert_close(grad_weights.float(), torch.tensor([0.5, 1.5, 4.0]))


def test_net_get_loss_with_per_expert_loss():
    X, y = regression_data(120)
    model = MoERegressor(**dict(ADAPTER, max_epochs=2, expert_loss="per_expert")).fit(X, y)
    net, module = model.net_, model.module_
    assert net.expert_loss == "per_expert"
    module.train()
    x = torch.as_tensor(X[:20], dtype=torch.float32)
    y_true = torch.randn(20, 1, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    y_pred = module(x)
    a = y_pred.assignments
    mixture_mse = (y_pred.output - y_true).square().mean()
    aux = net.balance_coef * y_pred.balance_loss + net.z_loss_coef * y_pred.z_loss

    loss = net.get_loss(y_pred, y_true, X={"x": x}, training=True)
    expected = per_expert_loss(net.criterion_, a.outputs, a.rows, a.weights, y_true) + aux
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, mixture_mse + aux)
    # task_loss still records the mixture's loss
    assert net.history[-1, "batches", -1, "task_loss"] == pytest.approx(mixture_mse.item(), rel=1e-5)
    # validation: the mixture's loss alone
    torch.testing.assert_close(net.get_loss(y_pred, y_true, X={"x": x}, training=False), mixture_mse)

    sw = torch.linspace(0.0, 2.0, 20)
    weighted = net.get_loss(y_pred, y_true, X={"x": x, "sample_weight": sw}, training=True)
    torch.testing.assert_close(weighted, per_expert_loss(net.criterion_, a.outputs, a.rows, a.weights, y_true, sw)
                               + aux)

    net.expert_loss = "mixture"
    torch.testing.assert_close(net.get_loss(y_pred, y_true, X={"x": x}, training=True), mixture_mse + aux)


# ---------------------------------------------------------------------------------------
# 4. MixtureOfExperts with adapter experts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_adapter_moe_every_router_trains(router):
    module = make_adapter_moe(router)
    assert isinstance(module.experts, AdapterExperts)
    x = inputs(24)
    module.train()
    out = module(x)
    assert out.output.shape == (24, 2) and torch.isfinite(out.output).all()
    (out.output.square().mean() + out.balance_loss + out.z_loss).backward()
    assert module.experts.weights[0].grad.abs().sum() > 0
    assert module.experts.head_weight.grad.abs().sum() > 0
    router_grads = [p.grad for p in module.router.parameters()]
    if router == "uniform":
        assert router_grads == []
    else:
        assert any(g is not None and g.abs().sum() > 0 for g in router_grads)


@pytest.mark.parametrize("router", ROUTER_NAMES)
def test_adapter_moe_prediction_of_a_row_ignores_the_batch(router):
    module = make_adapter_moe(router, n_experts=6, top_k=3, n_groups=2).eval()
    x = inputs(16)
    with torch.no_grad():
        batch = module.predict(x)
        reversed_batch = module.predict(x.flip(0)).flip(0)
        for i in (0, 5, 15):
            torch.testing.assert_close(module.predict(x[i:i + 1]), batch[i:i + 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(reversed_batch, batch, rtol=0, atol=1e-5)


@pytest.mark.parametrize("router", ROUTER_NAMES)
@pytest.mark.parametrize("train", [True, False])
def test_adapter_moe_assignments_match_output_and_gates(router, train):
    module = make_adapter_moe(router, n_experts=4, top_k=2).train(train)
    x = inputs(20)
    out = module(x)
    a = out.assignments
    torch.testing.assert_close(combine(a, 20), out.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(gates_from_assignments(a, 20, 4), out.gates, rtol=0, atol=1e-6)
    pairs = set(zip(a.rows.tolist(), a.experts.tolist()))
    assert len(pairs) == a.rows.shape[0]  # no (row, expert) pair twice
    totals = torch.zeros(20).index_add(0, a.rows, a.weights.float())
    torch.testing.assert_close(totals, torch.ones(20))
    # every assignment carries its expert's own output for its row
    every = module.experts.all_experts(x)
    torch.testing.assert_close(a.outputs, every[a.experts, a.rows], rtol=0, atol=1e-6)


def test_adapter_moe_assignments_with_shared_expert_include_it():
    module = make_adapter_moe("topk", shared_expert=True).eval()
    x = inputs(12)
    out = module(x)
    a = out.assignments
    shared = module.shared_expert(x.unsqueeze(0))[0]
    torch.testing.assert_close(combine(a, 12), out.output, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.outputs - shared[a.rows], module.experts.all_experts(x)[a.experts, a.rows],
                               rtol=0, atol=1e-6)


def test_adapter_moe_capacity_drops_in_training_only():
    out, _ = assert_capacity_drops_in_training_only(
        make_adapter_moe("topk", n_experts=4, top_k=2, capacity_factor=1.0),
        make_adapter_moe("topk", seed=5, n_experts=4, top_k=2))
    a = out.assignments
    assert a.rows.shape[0] == 64 - out.n_dropped.item()
    assert torch.bincount(a.experts, minlength=4).max().item() <= expert_capacity(1.0, 32, 2, 4)
    torch.testing.assert_close(combine(a, 32), out.output, rtol=0, atol=1e-6)
    served = torch.unique(a.rows)
    totals = torch.zeros(32).index_add(0, a.rows, a.weights)
    torch.testing.assert_close(totals[served], torch.ones(served.shape[0]))


def test_adapter_moe_capacity_reroute_respects_the_cap():
    module = make_adapter_moe("topk", n_experts=4, top_k=2, capacity_factor=1.0, capacity_overflow="reroute")
    skew_router(module)
    out = module.train()(inputs(32))
    a = out.assignments
    assert torch.bincount(a.experts, minlength=4).max().item() <= 16
    assert len(set(zip(a.rows.tolist(), a.experts.tolist()))) == a.rows.shape[0]
    assert out.n_dropped.item() == 64 - a.rows.shape[0]
    assert a.rows.shape[0] > 48  # rerouting keeps more than dropping (which keeps 48 here)


def test_flat_assignments_are_choice_major():
    indices = torch.tensor([[2, 0], [1, 3], [0, 2]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1]])
    rows, experts, flat = flat_assignments(indices, weights)
    assert rows.tolist() == [0, 1, 2, 0, 1, 2]
    assert experts.tolist() == [2, 1, 0, 0, 3, 2]
    torch.testing.assert_close(flat, torch.tensor([0.6, 0.7, 0.9, 0.4, 0.3, 0.1]))
    active = torch.tensor([[True, False], [True, True], [True, False]])
    rows, experts, flat = flat_assignments(indices, weights, active)
    assert rows.tolist() == [0, 1, 2, 1] and experts.tolist() == [2, 1, 0, 3]
    torch.testing.assert_close(flat, torch.tensor([0.6, 0.7, 0.9, 0.3]))


# The same assignments indexed by row, row-major and choice-major (the grids whose per-row
# sums are reductions of a view).
ORDERS = {None: [0, 1, 2, 3], "row_major": [0, 1, 2, 3], "choice_major": [0, 2, 1, 3]}


@pytest.mark.parametrize("grid", list(ORDERS))
def test_combine_and_mask_failed_experts_by_hand(grid):
    order = torch.tensor(ORDERS[grid])
    assignments = ExpertAssignments(torch.tensor([0, 0, 1, 1])[order], torch.tensor([0, 1, 0, 2])[order],
                                    torch.tensor([0.25, 0.75, 0.5, 0.5])[order],
                                    torch.tensor([[4.0], [8.0], [2.0], [float("nan")]])[order], grid)
    assert mask_failed_experts(assignments._replace(outputs=torch.ones(4, 1)), 2).weights is assignments.weights
    with pytest.warns(RuntimeWarning, match=r"Expert\(s\) \[2\]"):
        masked = mask_failed_experts(assignments, 2)
    torch.testing.assert_close(masked.weights, torch.tensor([0.25, 0.75, 1.0, 0.0])[order])
    torch.testing.assert_close(combine(masked, 2), torch.tensor([[7.0], [2.0]]))
    tally = torch.zeros(3, dtype=torch.long)  # the sync-free masking: same values, failures counted
    masked = mask_failed_experts(assignments, 2, tally)
    torch.testing.assert_close(masked.weights, torch.tensor([0.25, 0.75, 1.0, 0.0])[order])
    torch.testing.assert_close(combine(masked, 2), torch.tensor([[7.0], [2.0]]))
    assert tally.tolist() == [0, 0, 1]
    finite = mask_failed_experts(assignments._replace(outputs=torch.ones(4, 1)), 2, tally)
    torch.testing.assert_close(finite.weights, assignments.weights, rtol=0, atol=0)
    assert tally.tolist() == [0, 0, 1]
    empty = ExpertAssignments(*(t[:0] for t in assignments[:4]), grid)
    assert combine(empty, 0).shape == (0, 1)


@pytest.mark.parametrize("grid", ["row_major", "choice_major"])
def test_a_grid_sums_outputs_of_any_strides_like_the_indexed_sums(grid):
    n, k = 5, 3
    rows = torch.arange(n * k) // k if grid == "row_major" else torch.arange(n * k) % n
    outputs = torch.randn(2, n * k, generator=torch.Generator().manual_seed(0)).t()  # not contiguous
    weights = torch.rand(n * k, generator=torch.Generator().manual_seed(1))
    indexed = ExpertAssignments(rows, torch.zeros_like(rows), weights, outputs)
    torch.testing.assert_close(combine(indexed._replace(grid=grid), n), combine(indexed, n))
    torch.testing.assert_close(normalize_per_row(weights, rows, n, grid), normalize_per_row(weights, rows, n))


@pytest.mark.parametrize("grid", ["row_major", "choice_major"])
def test_the_per_expert_loss_on_a_grid_is_the_indexed_one(grid):
    n, k = 6, 2
    rows = torch.arange(n * k) // k if grid == "row_major" else torch.arange(n * k) % n
    generator = torch.Generator().manual_seed(3)
    outputs = torch.randn(n * k, 1, generator=generator, requires_grad=True)
    weights = torch.rand(n * k, generator=generator)
    target, mask = torch.randn(n, 1, generator=generator), torch.rand(n * k, generator=generator) < 0.7
    criterion = torch.nn.MSELoss(reduction="none")
    losses = [per_expert_loss(criterion, outputs, rows, weights, target, None, mask, grid=g) for g in (None, grid)]
    torch.testing.assert_close(losses[1], losses[0])
    grads = [torch.autograd.grad(loss, outputs)[0] for loss in losses]
    torch.testing.assert_close(grads[1], grads[0])


def test_an_unknown_assignment_grid_is_refused():
    assignments = ExpertAssignments(torch.tensor([0, 0]), torch.tensor([0, 1]), torch.ones(2), torch.ones(2, 1),
                                    "columns")
    with pytest.raises(ValueError, match="grid must be None, 'row_major' or 'choice_major', got 'columns'"):
        combine(assignments, 1)


def test_dense_assignments_with_adapters():
    module = make_adapters(3, 4, 2, (8,))
    x = inputs(5, 4)
    gates = torch.softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(2)), dim=1)
    a = dense_assignments(x, module, gates)
    assert a.rows.tolist() == list(range(5)) * 3
    assert a.experts.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and a.grid is None
    torch.testing.assert_close(combine(a, 5), (module.all_experts(x) * gates.t().unsqueeze(2)).sum(0))
    choice_major = dense_assignments(x, module, gates, choice_major=True)
    assert choice_major.grid == "choice_major"
    torch.testing.assert_close(combine(choice_major, 5), combine(a, 5))


# ---------------------------------------------------------------------------------------
# 5. Numeric embeddings
# ---------------------------------------------------------------------------------------


def mixed_columns(n=60, seed=0):
    """Columns: continuous, binary, continuous, constant, three-valued."""
    rng = np.random.RandomState(seed)
    X = np.column_stack([rng.normal(size=n), rng.randint(0, 2, n), rng.normal(size=n), np.full(n, 3.0),
                         rng.randint(0, 3, n)])
    return torch.as_tensor(X, dtype=torch.float32)


def test_embedded_columns_skip_columns_with_two_values_or_fewer():
    assert embedded_columns(mixed_columns()) == [0, 2, 4]
    assert embedded_columns(torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])) == []


@pytest.mark.parametrize("kind", ["periodic", "piecewise_linear"])
def test_numeric_embedding_layout(kind):
    X = mixed_columns()
    columns = [0, 2, 4]
    bins = quantile_bins(X[:, columns]) if kind == "piecewise_linear" else None
    torch.manual_seed(0)
    embedding = NumericEmbedding(kind, 5, columns, bins=bins)
    d = D_EMBEDDING[kind]
    assert embedding.d_embedding == d
    assert embedding.out_features == 3 * d + 2
    assert embedding.chunks == [d, d, d, 1, 1]
    out = embedding(X)
    assert out.shape == (60, 3 * d + 2) and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 3 * d:], X[:, [1, 3]], rtol=0, atol=0)
    # each column's piece depends on that column alone
    changed = X.clone()
    changed[:, 2] += 0.5
    out_changed = embedding(changed)
    torch.testing.assert_close(out_changed[:, :d], out[:, :d], rtol=0, atol=0)
    assert not torch.allclose(out_changed[:, d:2 * d], out[:, d:2 * d])
    torch.testing.assert_close(out_changed[:, 2 * d:], out[:, 2 * d:], rtol=0, atol=0)
    # periodic: gradients reach the frequencies
    if kind == "periodic":
        out.sum().backward()
        assert all(p.grad is not None for p in embedding.parameters())


def test_numeric_embedding_without_passthrough_columns():
    X = torch.randn(30, 3, generator=torch.Generator().manual_seed(0))
    embedding = NumericEmbedding("periodic", 3, [2, 0, 1])
    assert embedding.out_features == 3 * D_EMBEDDING["periodic"]
    assert embedding(X).shape == (30, 3 * D_EMBEDDING["periodic"])


def test_piecewise_linear_rebuilt_from_bin_counts_and_state_dict():
    X = mixed_columns(80)
    columns = [0, 2, 4]
    bins = quantile_bins(X[:, columns])
    torch.manual_seed(0)
    real = NumericEmbedding("piecewise_linear", 5, columns, bins=bins)
    assert real.n_bins == [edges.shape[0] - 1 for edges in bins]
    torch.manual_seed(1)
    rebuilt = NumericEmbedding("piecewise_linear", 5, columns, n_bins=real.n_bins)
    assert rebuilt.n_bins == real.n_bins
    assert not torch.allclose(rebuilt(X), real(X))  # placeholder edges (and other weights)
    assert set(rebuilt.state_dict()) == set(real.state_dict())
    rebuilt.load_state_dict(real.state_dict())
    torch.testing.assert_close(rebuilt(X), real(X), rtol=0, atol=0)
    probe = torch.randn(10, 5, generator=torch.Generator().manual_seed(4)) * 3  # also outside the bins
    torch.testing.assert_close(rebuilt(probe), real(probe), rtol=0, atol=0)


def test_quantile_bins():
    X = torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    bins = quantile_bins(X)
    assert len(bins) == 3
    for j, edges in enumerate(bins):
        assert (edges[1:] > edges[:-1]).all()
        assert edges.shape[0] - 1 == N_BINS
        assert edges[0].item() == pytest.approx(X[:, j].min().item())
        assert edges[-1].item() == pytest.approx(X[:, j].max().item())
    assert all(edges.shape[0] - 1 <= 10 for edges in quantile_bins(X, n_bins=10))
    # three distinct values: a few bins over their range, far fewer than N_BINS
    for repeats in (10, 20):
        (edges,) = quantile_bins(torch.tensor([0.0, 1.0, 2.0]).repeat(repeats).unsqueeze(1))
        assert 2 <= edges.shape[0] - 1 <= 4 and (edges[1:] > edges[:-1]).all()
        assert edges[0].item() == 0.0 and edges[-1].item() == 2.0
    # few rows: fewer bins than rows
    (edges,) = quantile_bins(torch.randn(10, 1, generator=torch.Generator().manual_seed(1)))
    assert 2 <= edges.shape[0] <= 10 and (edges[1:] > edges[:-1]).all()


def test_quantile_bins_drop_subnormal_gaps_whose_encoding_would_be_nan():
    # A column's 0 scaled next to a subnormal (0 - centre) / huge-scale: rtdl's bins keep
    # both edges, and the piecewise-linear encoding divides by their gap (inf, then NaN).
    X = torch.tensor([[0.0], [1.2303355], [1.2303355], [-2.9387331e-39]])
    (edges,) = quantile_bins(X)
    assert edges[0] == X.min() and edges[-1] == X.max()
    assert (edges[1:] - edges[:-1] >= MIN_BIN_WIDTH).all()
    embedding = NumericEmbedding("piecewise_linear", 1, [0], [edges])
    assert torch.isfinite(embedding(torch.cat((X, torch.tensor([[-3.0], [3.0]]))))).all()
    (tight,) = quantile_bins(torch.tensor([[0.0], [5e-31], [1.5e-30], [1.6e-30], [1.0]]))
    assert tight[0].item() == 0.0 and tight[-1].item() == 1.0 and (tight[1:] - tight[:-1] >= MIN_BIN_WIDTH).all()


def test_numeric_embedding_invalid_arguments():
    with pytest.raises(ValueError, match="numeric_embedding"):
        NumericEmbedding("bogus", 3, [0])
    with pytest.raises(ValueError, match="columns"):
        NumericEmbedding("periodic", 3, [])
    with pytest.raises(ValueError, match="columns"):
        NumericEmbedding("periodic", 3, [0, 3])
    with pytest.raises(ValueError, match="columns"):
        NumericEmbedding("periodic", 3, [1, 1])
    with pytest.raises(ValueError, match="bins"):
        NumericEmbedding("piecewise_linear", 3, [0])
    with pytest.raises(ValueError, match="bins"):
        NumericEmbedding("piecewise_linear", 3, [0, 1], bins=[torch.tensor([0.0, 1.0])])
    with pytest.raises(ValueError, match="embedding_columns"):
        MixtureOfExperts(3, 1, numeric_embedding="periodic")


@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_moe_with_numeric_embedding(expert_type):
    X = mixed_columns()
    module = make_adapter_moe("topk", n_features=5, expert_type=expert_type, numeric_embedding="periodic",
                              embedding_columns=[0, 2, 4])
    width = 3 * D_EMBEDDING["periodic"] + 2
    assert module.embedding.out_features == width
    assert module.router.gate.in_features == width
    assert module.experts.in_features == width
    if expert_type == "adapter":
        first = module.experts.in_scales[0]
        d = D_EMBEDDING["periodic"]
        for start in (0, d, 2 * d):  # one normal value per embedded column and expert
            block = first[:, start:start + d]
            assert torch.equal(block, block[:, :1].expand_as(block))
        assert not torch.equal(first.abs(), torch.ones_like(first))
    module.train()
    out = module(X)
    out.output.square().mean().backward()
    assert module.embedding.embedding.periodic.weight.grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.predict(X[3:4]), module.predict(X)[3:4], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 6. Estimators
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("numeric_embedding", [None, "periodic", "piecewise_linear"])
@pytest.mark.parametrize("expert_loss", ["mixture", "per_expert"])
def test_regressor_adapter_fits(expert_loss, numeric_embedding):
    X, y = regression_data()
    model = MoERegressor(**ADAPTER, expert_loss=expert_loss, numeric_embedding=numeric_embedding).fit(X, y)
    assert isinstance(model.module_.experts, AdapterExperts)
    assert model.net_.expert_loss == expert_loss
    prediction = model.predict(X)
    assert prediction.shape == (200,) and np.isfinite(prediction).all()
    assert model.score(X, y) > 0.5
    if numeric_embedding is None:
        assert model.module_.embedding is None
        assert model._embedding_columns.tolist() == [] and model._embedding_n_bins.tolist() == []
    else:
        assert model.module_.embedding.kind == numeric_embedding
        assert model._embedding_columns.tolist() == [0, 1, 2, 3, 4]
        if numeric_embedding == "piecewise_linear":
            assert model._embedding_n_bins.tolist() == model.module_.embedding.n_bins
            assert all(1 <= b <= N_BINS for b in model._embedding_n_bins)
        else:
            assert model._embedding_n_bins.tolist() == []
    assert "task_loss" in model.history_ and np.isfinite(model.history_["train_loss"]).all()


@pytest.mark.parametrize("expert_loss, numeric_embedding, router", [
    ("mixture", None, "topk"),
    ("per_expert", "piecewise_linear", "topk"),
    ("per_expert", "periodic", "softmax"),
    ("per_expert", None, "uniform"),
])
def test_classifier_adapter_fits(classification_data, expert_loss, numeric_embedding, router):
    X, y = classification_data
    model = MoEClassifier(**ADAPTER, expert_loss=expert_loss, numeric_embedding=numeric_embedding,
                          router=router).fit(X, y)
    proba = model.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert set(model.predict(X)) <= {"yes", "no"}
    assert model.score(X, y) > 0.7
    if router == "uniform":
        np.testing.assert_allclose(model.route(X[:5]), 0.25)
        np.testing.assert_allclose(model.expert_load_, 0.25)


def test_only_columns_with_more_than_two_values_are_embedded():
    X = mixed_columns(150).numpy().astype(np.float64)
    y = X[:, 0] + X[:, 1] - X[:, 4]
    model = MoERegressor(**dict(ADAPTER, max_epochs=3), numeric_embedding="piecewise_linear").fit(X, y)
    assert model._embedding_columns.tolist() == [0, 2, 4]
    assert model.module_.embedding.others.tolist() == [1, 3]
    assert len(model._embedding_n_bins) == 3
    assert 2 <= model._embedding_n_bins[2] <= 4  # the three-valued column: a few bins, not N_BINS


@pytest.mark.parametrize("numeric_embedding", ["periodic", "piecewise_linear"])
def test_all_binary_input_embeds_nothing(numeric_embedding):
    rng = np.random.RandomState(0)
    X = rng.randint(0, 2, size=(120, 4)).astype(float)
    y = X @ [1.0, 2.0, -1.0, 0.5]
    model = MoERegressor(**dict(ADAPTER, max_epochs=4), numeric_embedding=numeric_embedding).fit(X, y)
    assert model._embedding_columns.shape == (0,) and model._embedding_n_bins.shape == (0,)
    assert model.module_.embedding is None
    assert model.module_.experts.in_features == 4
    # the same network as without an embedding, trained alike
    plain = MoERegressor(**dict(ADAPTER, max_epochs=4)).fit(X, y)
    np.testing.assert_array_equal(model.predict(X), plain.predict(X))


def test_adapter_piecewise_linear_is_reproducible():
    X, y = regression_data()
    params = dict(ADAPTER, max_epochs=4, numeric_embedding="piecewise_linear", expert_loss="per_expert")
    first = MoERegressor(**params).fit(X, y).predict(X)
    second = MoERegressor(**params).fit(X, y).predict(X)
    np.testing.assert_array_equal(first, second)
    other_seed = MoERegressor(**dict(params, random_state=1)).fit(X, y).predict(X)
    assert not np.array_equal(first, other_seed)


def assert_same_predictions(loaded, model, X):
    assert_same_outputs_and_weights(loaded, model, X)
    for name in ("expert_type", "expert_loss", "numeric_embedding", "lr_schedule"):
        assert getattr(loaded, name) == getattr(model, name)
    np.testing.assert_array_equal(loaded._embedding_columns, model._embedding_columns)
    np.testing.assert_array_equal(loaded._embedding_n_bins, model._embedding_n_bins)


ROUND_TRIPS = [
    pytest.param(MoERegressor, dict(ADAPTER, numeric_embedding="piecewise_linear", expert_loss="per_expert"),
        id="regressor-adapter-piecewise-per_expert"),
    pytest.param(MoERegressor, dict(ADAPTER, numeric_embedding="periodic", lr_schedule="cosine"),
        id="regressor-adapter-periodic-cosine"),
    pytest.param(MoEClassifier, dict(ADAPTER, numeric_embedding="piecewise_linear", expert_loss="per_expert",
                                     router="softmax"), id="classifier-adapter-piecewise-per_expert"),
    pytest.param(MoEClassifier, dict(ADAPTER, numeric_embedding="periodic", lr_schedule="flat_cosine"),
        id="classifier-adapter-periodic-flat_cosine"),
    pytest.param(MoERegressor, dict(ADAPTER), id="regressor-adapter"),
    pytest.param(MoERegressor, dict(FAST, expert_hidden=(8,), numeric_embedding="piecewise_linear"),
        id="regressor-independent-piecewise"),
    pytest.param(MoERegressor, dict(ADAPTER, expert_hidden=(), numeric_embedding="periodic",
                                    expert_loss="per_expert"), id="regressor-adapter-linear-periodic-per_expert"),
    pytest.param(MoERegressor, dict(FAST, expert_hidden=(8,), numeric_embedding="periodic", lr_schedule="constant"),
                 id="regressor-independent-periodic"),
    pytest.param(MoEClassifier, dict(FAST, expert_hidden=(8,), numeric_embedding="periodic",
                                     expert_loss="per_expert", lr_schedule="cosine"),
                 id="classifier-independent-periodic-per_expert"),
]


def fit_for_round_trip(estimator, params, classification_data):
    X, y = regression_data() if estimator is MoERegressor else classification_data
    return estimator(**dict(params, max_epochs=4)).fit(X, y), X


@pytest.mark.parametrize("estimator, params", ROUND_TRIPS)
def test_save_load_round_trip(tmp_path, classification_data, estimator, params):
    model, X = fit_for_round_trip(estimator, params, classification_data)
    path = tmp_path / "model.moe"
    model.save(path)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        document = json.loads(handle.metadata()[KEY])
    assert document["format_version"] == FORMAT_VERSION
    for name in ("expert_type", "expert_loss", "numeric_embedding", "lr_schedule"):
        assert document["params"][name] == params.get(name, getattr(estimator(), name))
    loaded = sklearn_moe.load(path)
    assert_same_predictions(loaded, model, X)
    assert type(loaded.module_.experts) is type(model.module_.experts)
    if params.get("numeric_embedding") == "piecewise_linear":
        assert loaded.module_.embedding.n_bins == model.module_.embedding.n_bins


@pytest.mark.parametrize("estimator, params", [pytest.param(*p.values, id=p.id) for p in ROUND_TRIPS])
def test_pickle_round_trip(classification_data, estimator, params):
    model, X = fit_for_round_trip(estimator, params, classification_data)
    assert_same_predictions(pickle.loads(pickle.dumps(model)), model, X)


def rewrite_metadata(source, target, edit):
    """Rewrite a saved file's document with ``edit``; the tensors that the edited format
    version did not store yet are left out too."""
    with safetensors.safe_open(str(source), framework="pt") as handle:
        document = json.loads(handle.metadata()[KEY])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    edit(document)
    for version, added in _ADDED_TENSORS.items():
        if document["format_version"] < version:
            tensors = {name: tensor for name, tensor in tensors.items() if name not in added}
    safetensors.torch.save_file(tensors, str(target), metadata={KEY: json.dumps(document)})
    return target


def as_version_6(document):
    document["format_version"] = 6
    if document["kind"] == "MoEClassifier":
        document["fitted"].pop("_y_ndim", None)
        document["params"].pop("class_weight", None)


def as_version_5(document):
    as_version_6(document)
    document["format_version"] = 5
    document["params"].pop("one_hot_max_categories", None)
    document["fitted"].pop("_table_embedded", None)


def as_version_4(document):
    as_version_5(document)
    document["format_version"] = 4
    document["params"].pop("callbacks", None)
    if document["kind"] == "MoEClassifier":
        document["params"].pop("mixing", None)


def as_version_3(document):
    as_version_4(document)
    document["format_version"] = 3
    for name in ("collapse_threshold", "collapse_patience", "collapse_recovery", "temperature_final",
                 "temperature_schedule"):
        document["params"].pop(name, None)


def as_version_2(document):
    as_version_3(document)
    document["format_version"] = 2
    document["params"].pop("label_smoothing", None)


def as_version_1(document):
    as_version_2(document)
    document["format_version"] = 1
    for name in ("expert_type", "expert_loss", "numeric_embedding", "lr_schedule", "router_lr_scale"):
        del document["params"][name]
    for name in ("_embedding_columns", "_embedding_n_bins"):
        del document["fitted"][name]


def load_as_version(model, X, tmp_path, downgrade, version: int, missing: str):
    """Save ``model``, load it rewritten by ``downgrade`` as a file of format ``version``, and
    check that it predicts as ``model`` does; the same document labelled ``version + 1`` must
    be rejected with ``missing`` (what the newer format must carry). Returns the loaded model."""
    model.save(tmp_path / "new.moe")
    loaded = sklearn_moe.load(rewrite_metadata(tmp_path / "new.moe", tmp_path / "old.moe", downgrade))
    assert_same_predictions(loaded, model, X)
    unversioned = rewrite_metadata(tmp_path / "new.moe", tmp_path / "bad.moe",
                                   lambda d: (downgrade(d), d.update(format_version=version + 1)))
    with pytest.raises(ValueError, match=missing):
        sklearn_moe.load(unversioned)
    return loaded


@pytest.mark.parametrize("estimator", [MoERegressor, MoEClassifier])
def test_version_1_file_loads_with_the_old_behaviour(tmp_path, classification_data, estimator):
    if estimator is MoERegressor:
        X, y = regression_data(120)
    else:
        X, y = classification_data
    old_behaviour = dict(expert_type="independent", expert_loss="mixture", numeric_embedding=None,
                         lr_schedule="plateau", router_lr_scale=1.0)
    model = estimator(**dict(FAST, expert_hidden=(8,), max_epochs=3, **old_behaviour)).fit(X, y)
    # a version-2 file must carry the new parameters: the defaults apply to version 1 only
    loaded = load_as_version(model, X, tmp_path, as_version_1, 1, "missing")
    assert isinstance(loaded.module_.experts, StackedExperts)
    assert loaded._embedding_columns.dtype == np.int64 and loaded._embedding_columns.shape == (0,)


def test_version_2_classifier_file_loads_without_label_smoothing(tmp_path, classification_data):
    X, y = classification_data
    model = MoEClassifier(**dict(ADAPTER, max_epochs=3)).fit(X, y)
    loaded = load_as_version(model, X, tmp_path, as_version_2, 2, r"missing \['label_smoothing'\]")
    assert loaded.label_smoothing == 0.0


@pytest.mark.parametrize("estimator", [MoERegressor, MoEClassifier])
def test_version_3_file_loads_with_collapse_defaults_and_its_fixed_temperature(tmp_path, classification_data,
                                                                                 estimator):
    X, y = regression_data(120) if estimator is MoERegressor else classification_data
    model = estimator(**dict(ADAPTER, max_epochs=3, temperature=0.7, collapse_patience=2)).fit(X, y)
    # a version-4 file must carry the temperature tensor
    loaded = load_as_version(model, X, tmp_path, as_version_3, 3, "missing")
    assert (loaded.collapse_threshold, loaded.collapse_patience, loaded.collapse_recovery) == (0.1, 5, False)
    assert float(loaded.module_.router.temperature) == pytest.approx(0.7)


def test_version_4_files_load_unrecalibrated_and_mixing_logits(tmp_path, classification_data):
    X, y = classification_data
    classifier = MoEClassifier(**dict(ADAPTER, max_epochs=3)).fit(X, y)
    # a version-5 file must carry them
    loaded = load_as_version(classifier, X, tmp_path, as_version_4, 4, r"missing \['callbacks', 'mixing'\]")
    assert loaded.mixing == "logits"
    X, y = regression_data(120)
    density = MoERegressor(**dict(ADAPTER, max_epochs=3, output="mixture_density")).fit(X, y)
    density.module_.scale_calibration.fill_(1.5)
    density.save(tmp_path / "r5.moe")
    loaded = sklearn_moe.load(rewrite_metadata(tmp_path / "r5.moe", tmp_path / "r4.moe", as_version_4))
    assert loaded.scale_calibration_ == 1.0
    np.testing.assert_array_equal(loaded.predict(X), density.predict(X))


def test_version_5_files_load_with_every_categorical_column_one_hot(tmp_path):
    rng = np.random.RandomState(0)
    frame = pd.DataFrame({"x": rng.normal(size=120), "city": rng.choice(list("abcdefghijkl"), 120)})
    y = frame["x"].to_numpy() + (frame["city"] == "a")
    model = MoERegressor(**dict(ADAPTER, max_epochs=3), one_hot_max_categories=None).fit(frame, y)
    # a version-6 file must carry the parameter
    loaded = load_as_version(model, frame, tmp_path, as_version_5, 5, r"missing \['one_hot_max_categories'\]")
    assert loaded.one_hot_max_categories is None and loaded._table_embedded.tolist() == []


def test_version_6_classifier_files_load_as_one_label_per_row_without_class_weights(tmp_path, classification_data):
    X, y = classification_data
    model = MoEClassifier(**dict(ADAPTER, max_epochs=3)).fit(X, y)
    # a version-7 classifier file must carry class_weight, and say whether it is multilabel
    loaded = load_as_version(model, X, tmp_path, as_version_6, 6, r"missing \['class_weight'\]")
    assert loaded._y_ndim == 1 and not loaded._multilabel and loaded.class_weight is None
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_version_1_file_with_an_embedding_layout_is_rejected(tmp_path):
    X, y = regression_data(120)
    model = MoERegressor(**dict(ADAPTER, max_epochs=2), numeric_embedding="periodic").fit(X, y)
    model.save(tmp_path / "v2.moe")

    def edit(document):
        as_version_1(document)
        document["fitted"]["_embedding_columns"] = {"dtype": "<i8", "shape": [1], "data": [0]}

    with pytest.raises(ValueError, match="numeric_embedding is None"):
        sklearn_moe.load(rewrite_metadata(tmp_path / "v2.moe", tmp_path / "v1.moe", edit))


@pytest.mark.parametrize("name", ["expert_type", "expert_loss", "numeric_embedding", "lr_schedule"])
@pytest.mark.parametrize("estimator", [MoERegressor, MoEClassifier])
def test_invalid_new_parameters_are_rejected(name, estimator):
    X = np.random.RandomState(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    with pytest.raises(ValueError, match=name):
        estimator(**dict(FAST, max_epochs=1), **{name: "x"}).fit(X, y)


# ---------------------------------------------------------------------------------------
# 7. Learning-rate schedules
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, expected", [
    ("cosine", [1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2, 0.0]),
    ("flat_cosine", [1.0, 1.0, 1.0, 0.5, 0.0]),
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
])
def test_learning_rate_shape_values(kind, expected):
    shape = LearningRateShape(kind, 100)
    values = [shape(step) for step in (0, 25, 50, 75, 100)]
    assert values == pytest.approx(expected, abs=1e-12)
    assert shape(250) == pytest.approx(expected[-1], abs=1e-12)  # past the end: the last value
    restored = pickle.loads(pickle.dumps(shape))
    assert [restored(step) for step in (0, 25, 50, 75, 100)] == values


def test_learning_rate_shape_flat_fraction_and_errors():
    shape = LearningRateShape("flat_cosine", 10, flat_fraction=0.2)
    assert shape(2) == 1.0
    assert shape(6) == pytest.approx(0.5)  # half way through the decay from step 2 to 10
    assert LearningRateShape("cosine", 0)(0) == 1.0  # at least one step
    for kind in ("plateau", "linear"):
        with pytest.raises(ValueError, match="kind"):
            LearningRateShape(kind, 10)


@pytest.mark.parametrize("lr_schedule", ["cosine", "flat_cosine", "constant"])
def test_lr_schedule_follows_the_shape_every_batch(lr_schedule):
    X, y = regression_data(100)
    # router_lr_scale=1: skorch records the first parameter group's rate, the router's
    params = dict(ADAPTER, max_epochs=4, batch_size=32, learning_rate=1e-2, early_stopping=False,
                  lr_schedule=lr_schedule, router_lr_scale=1.0)
    model = MoERegressor(**params).fit(X, y)
    assert model.n_iter_ == 4
    lrs = [lr for epoch in model.net_.history[:, "batches", :, "event_lr"] for lr in epoch]
    assert len(lrs) == 16  # 4 batches of 100 rows, 4 epochs
    shape = LearningRateShape(lr_schedule, 16)
    np.testing.assert_allclose(lrs, [1e-2 * shape(step) for step in range(16)], rtol=1e-9, atol=1e-15)
    final = model.net_.optimizer_.param_groups[0]["lr"]
    if lr_schedule == "constant":
        assert final == pytest.approx(1e-2)
    else:
        assert final == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(model.predict(X)).all()


def test_plateau_schedule_fits():
    X, y = regression_data(120)
    model = MoERegressor(**dict(ADAPTER, max_epochs=4), lr_schedule="plateau").fit(X, y)
    assert model.net_.optimizer_.param_groups[0]["lr"] <= FAST["learning_rate"]
    assert "event_lr" not in model.net_.history[-1, "batches", -1]
    assert np.isfinite(model.predict(X)).all()



def test_per_expert_loss_with_an_expert_mask_by_hand():
    criterion = nn.MSELoss(reduction="none")
    outputs = torch.tensor([[1.0], [3.0], [2.0]], requires_grad=True)
    weights = torch.tensor([0.25, 0.75, 1.0], requires_grad=True)
    mask = torch.tensor([False, True, False])
    loss = per_expert_loss(criterion, outputs, ROWS, weights, TARGET, expert_mask=mask)
    # experts: row 0 keeps only its second assignment, renormalised to weight 1: (3 - 2)^2 = 1;
    # row 1 keeps none: 0 -> 1 / 2 rows = 0.5; the gate's mixture term is unchanged: 2.125
    assert loss.item() == pytest.approx(2.625)
    output_grad, weight_grad = torch.autograd.grad(loss, (outputs, weights))
    assert output_grad[0].item() == 0 and output_grad[2].item() == 0 and output_grad[1].item() != 0
    assert weight_grad.abs().sum() > 0  # the gate still learns from every assignment


def test_expert_subsample_draws_per_step_and_leaves_one_expert_alone(regression_data):
    X, y = regression_data
    one = dict(FAST, n_experts=1, max_epochs=3)
    np.testing.assert_array_equal(MoERegressor(**one, expert_subsample=0.5).fit(X, y).predict(X),
                                  MoERegressor(**one).fit(X, y).predict(X))
    several = dict(FAST, max_epochs=3)
    subsampled = MoERegressor(**several, expert_subsample=0.5).fit(X, y)
    assert subsampled.net_.expert_subsample == 0.5
    assert not np.array_equal(subsampled.predict(X), MoERegressor(**several).fit(X, y).predict(X))
    np.testing.assert_array_equal(subsampled.predict(X),
                                  MoERegressor(**several, expert_subsample=0.5).fit(X, y).predict(X))
    with pytest.raises(ValueError, match="expert_subsample"):
        MoERegressor(**several, expert_subsample=0.0).fit(X, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_zeroes_a_fraction_p_and_scales_the_rest(dtype):
    from sklearn_moe.nn.experts import apply_dropout

    torch.manual_seed(0)
    x = torch.full((400, 500), 2.0, dtype=dtype, requires_grad=True)
    out = apply_dropout(x, 0.3)
    assert out.dtype == dtype
    zeroed = (out == 0).float().mean().item()
    assert abs(zeroed - 0.3) < 0.005  # 200,000 draws: 5 standard deviations
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 2.0 / 0.7))
    out.sum().backward()
    torch.testing.assert_close(x.grad, (out / 2.0).detach())  # the mask over 1 - p
    assert torch.equal(apply_dropout(x, 0.0), x)
    torch.manual_seed(0)
    again = apply_dropout(x, 0.3)
    assert torch.equal(again, out)  # the default generator's stream
    assert not torch.equal(apply_dropout(x, 0.3), out)  # a fresh mask at every call
    odd = apply_dropout(torch.ones(3, 7, 5, dtype=dtype), 0.5)  # not a whole number of 64-bit words
    assert odd.shape == (3, 7, 5) and set(odd.unique().tolist()) <= {0.0, 2.0}
