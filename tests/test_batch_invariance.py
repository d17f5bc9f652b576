"""Batch-invariant prediction: a row's prediction is bitwise the same whatever batch holds it."""

import numpy as np
import pytest
import torch

from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe.nn import MixtureOfExperts
from sklearn_moe.nn.products import row_invariant_addmm, row_invariant_baddbmm

from .conftest import FAST

ROUTERS = ["softmax", "topk", "noisy_topk", "switch", "top_p", "hierarchical", "uniform"]
# Batch sizes that take every evaluation path: a row padded to two, the dense path (<= 4
# rows), the padded dispatch buffer (5, 17, 63) and the sorted layout (>= 64 assignments
# per expert).
SIZES = [1, 2, 3, 4, 5, 17, 63, 300]
# The three shapes where the CPU GEMM takes another kernel (one row, one output column,
# a batched matrix under 400 terms) and a single input, each in and out of the regime.
SHAPES = [(128, 1), (128, 3), (2, 16), (5, 20), (1, 8), (1, 128), (16, 128)]


def rows_in_batches(values, sizes):
    """Every prefix of ``values`` of each size: the rows a batch of that size holds."""
    return [(size, values[:size]) for size in sizes if size <= values.shape[-2]]


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_row_invariant_batched_product_is_the_product_and_rounds_each_row_alike(n_in, n_out):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 500, n_in, generator=generator), torch.randn(3, n_in, n_out, generator=generator)
    bias = torch.randn(3, 1, n_out, generator=generator)
    full = row_invariant_baddbmm(bias, x, weight)
    torch.testing.assert_close(full, torch.baddbmm(bias, x, weight))
    for size in (1, 2, 3, 7, 24, 100, 499):
        for n_matrices in (1, 3):
            assert torch.equal(row_invariant_baddbmm(bias[:n_matrices], x[:n_matrices, :size], weight[:n_matrices]),
                               full[:n_matrices, :size]), (size, n_matrices)


@pytest.mark.parametrize("n_in,n_out", SHAPES)
def test_row_invariant_product_is_the_product_and_rounds_each_row_alike(n_in, n_out):
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(500, n_in, generator=generator), torch.randn(n_in, n_out, generator=generator)
    bias = torch.randn(n_out, generator=generator)
    full = row_invariant_addmm(bias, x, weight)
    torch.testing.assert_close(full, torch.addmm(bias, x, weight))
    torch.testing.assert_close(row_invariant_addmm(None, x, weight), x @ weight)
    for size in (1, 2, 3, 7, 24, 100, 499):
        assert torch.equal(row_invariant_addmm(bias, x[:size], weight), full[:size]), size
    # a leading batch axis is flattened into the rows, and each matrix of a batched
    # product gives its rows the same values as the 2-d product
    assert torch.equal(row_invariant_addmm(bias, x.view(4, 125, n_in), weight), full.view(4, 125, n_out))
    assert torch.equal(row_invariant_baddbmm(bias.view(1, 1, -1), x.unsqueeze(0), weight.unsqueeze(0))[0], full)
    # no rows (an expert-parallel rank that received none): empty products of the right shape
    assert row_invariant_addmm(bias, x[:0], weight).shape == (0, n_out)
    assert row_invariant_addmm(None, x[:0].view(3, 0, n_in), weight).shape == (3, 0, n_out)
    assert row_invariant_baddbmm(bias.view(1, 1, -1), x[:0].unsqueeze(0), weight.unsqueeze(0)).shape == (1, 0, n_out)


def test_plain_products_are_not_batch_invariant_on_these_shapes():
    # What the row-invariant products guard against: without them a single-output product
    # rounds some rows differently in batches of other sizes.
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(500, 128, generator=generator), torch.randn(128, 1, generator=generator)
    full = x @ weight
    assert any(not torch.equal(x[:size] @ weight, full[:size]) for size in (1, 2, 3, 5, 7))


def make_module(expert_type, router, variant, n_experts=8):
    torch.manual_seed(0)
    if variant == "plain":
        return MixtureOfExperts(6, 1, n_experts=n_experts, router=router, expert_type=expert_type).eval()
    return MixtureOfExperts(6, 3, n_experts=n_experts, router=router, expert_type=expert_type, shared_expert=True,
                            layer_norm=True, gate_hidden=(16,), expert_hidden=(32, 32), numeric_embedding="periodic",
                            embedding_columns=[0, 1, 2]).eval()


@pytest.mark.parametrize("numeric_embedding", ["periodic", "piecewise_linear"])
@pytest.mark.parametrize("columns", [[0], [0, 2]])
def test_few_embedded_columns_are_batch_invariant_in_small_batches(numeric_embedding, columns):
    """The numeric embeddings' plain products round otherwise over fewer than a handful of
    values: small batches are padded to enough rows for the columns embedded."""
    torch.manual_seed(0)
    bins = [torch.linspace(-2, 2, 9) for _ in columns] if numeric_embedding == "piecewise_linear" else None
    module = MixtureOfExperts(6, 1, n_experts=4, router="softmax", expert_type="adapter", embedding_bins=bins,
                              numeric_embedding=numeric_embedding, embedding_columns=columns).eval()
    x = torch.randn(120, 6, generator=torch.Generator().manual_seed(1))
    full = module.predict(x)
    for size in (1, 2, 3, 4):
        for start in range(0, 120 - size, size):
            assert torch.equal(module.predict(x[start:start + size]), full[start:start + size]), (size, start)


@pytest.mark.parametrize("variant", ["plain", "embedded_shared_norm"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_module_predictions_and_gates_are_bitwise_batch_invariant(expert_type, router, variant):
    module = make_module(expert_type, router, variant)
    x = torch.randn(1100, 6, generator=torch.Generator().manual_seed(1))
    shuffled = x[torch.randperm(1100, generator=torch.Generator().manual_seed(2))]
    with torch.inference_mode():
        full, gates = module.predict(x), module.route(x)
        full_shuffled = module.predict(shuffled)
        mixed = module(x)
    assert torch.equal(full, mixed.output) and torch.equal(gates, mixed.gates)  # the mixture itself
    with torch.inference_mode():
        for size, rows in rows_in_batches(x, SIZES):
            assert torch.equal(module.predict(rows), full[:size]), size
            assert torch.equal(module.route(rows), gates[:size]), size
    order = {tuple(row.tolist()): i for i, row in enumerate(x)}
    assert torch.equal(full_shuffled, full[[order[tuple(row.tolist())] for row in shuffled]])


@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_predictive_distributions_are_batch_invariant(expert_type):
    torch.manual_seed(0)
    module = MixtureOfExperts(6, 2, n_experts=4, router="topk", top_k=2, expert_type=expert_type, shared_expert=True,
                              output="mixture_density", numeric_embedding="periodic", embedding_columns=[0]).eval()
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = module.predict_distribution(x)
        for size, rows in rows_in_batches(x, SIZES):
            for part, whole in zip(module.predict_distribution(rows), full):
                assert torch.equal(part, whole[:size]), size
    _, means, scales = module.predict_distribution(x[:1])  # with autograd: differentiable, as forward is
    assert means.requires_grad and scales.requires_grad


def test_a_learned_top_p_threshold_is_batch_invariant():
    """Its straight-through term adds 0 exactly: a kept expert's weight is not 1 + s - s,
    with s a sigmoid that rounds by the CPU kernel's loop."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 4))
    model = MoERegressor(n_experts=4, top_k=2, router="top_p", learned_threshold=True, expert_hidden=(8,),
                         max_epochs=3, device="cpu", random_state=0).fit(X, X[:, 0] * 2 + np.sin(3 * X[:, 1]))
    for method in ("predict", "route"):
        whole = getattr(model, method)(X)
        np.testing.assert_array_equal(np.concatenate([getattr(model, method)(X[i:i + 1]) for i in range(300)]), whole)
    module = MixtureOfExperts(6, 1, n_experts=4, router="top_p", top_k=3, learned_threshold=True)
    module.router(torch.randn(64, 6, generator=torch.Generator().manual_seed(1))).weights[:, 1:].sum().backward()
    assert module.router.threshold_logit.grad.abs().sum() > 0  # with autograd, the threshold learns


def test_a_large_batch_predicts_as_small_ones(regression_data):
    """Batches of 2**15 values and more are scaled with PyTorch, smaller ones with NumPy."""
    X, y = regression_data
    model = MoERegressor(**dict(FAST, max_epochs=2, random_state=0)).fit(X, y)
    big = np.random.RandomState(3).normal(size=(40_000 // X.shape[1], X.shape[1])) * 3
    in_pieces = np.concatenate([model.predict(big[i:i + 500]) for i in range(0, len(big), 500)])
    np.testing.assert_array_equal(model.predict(big), in_pieces)


def test_bf16_predictive_spreads_are_batch_invariant(regression_data):
    """The spreads' softplus runs in the CPU's vector loop (under bf16 its input is a
    contiguous float32 copy, which the scalar loop would take alone)."""
    X, y = regression_data
    model = MoERegressor(**dict(FAST, output="mixture_density", precision="bf16", max_epochs=3,
                                random_state=0)).fit(X, y)
    _, whole = model.predict(X, return_std=True)
    alone = np.concatenate([model.predict(X[i:i + 1], return_std=True)[1] for i in range(40)])
    np.testing.assert_array_equal(alone, whole[:40])


@pytest.mark.parametrize("activation", ["gelu", "silu", "elu"])
@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_activations_that_round_by_kernel_loop_are_batch_invariant(expert_type, activation):
    """Their vector and scalar CPU loops round differently, and narrow layers in small
    batches (strided views of 16 values a row) would take the scalar one."""
    torch.manual_seed(0)
    module = MixtureOfExperts(6, 1, n_experts=3, router="softmax", expert_type=expert_type, activation=activation,
                              expert_hidden=(16, 16)).eval()
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = module.predict(x)
        for size, rows in rows_in_batches(x, SIZES):
            assert torch.equal(module.predict(rows), full[:size]), size
        assert torch.equal(module.predict(x[7:8]), full[7:8])


@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier], ids=lambda c: c.__name__)
def test_fitted_estimators_predict_each_row_alike_alone_and_in_a_batch(estimator_class, expert_type,
                                                                        regression_data, classification_data):
    X, y = regression_data if estimator_class is MoERegressor else classification_data
    model = estimator_class(**dict(FAST, expert_type=expert_type, max_epochs=5, random_state=0)).fit(X, y)
    methods = ["predict", "route"] + (["predict_proba"] if estimator_class is MoEClassifier else [])
    for method in methods:
        whole = getattr(model, method)(X)
        assert len(np.unique(whole, axis=0)) > 1  # the rows' own predictions, not one constant
        one_by_one = np.concatenate([getattr(model, method)(X[i:i + 1]) for i in range(30)])
        in_sevens = np.concatenate([getattr(model, method)(X[i:i + 7]) for i in range(0, 70, 7)])
        np.testing.assert_array_equal(one_by_one, whole[:30])
        np.testing.assert_array_equal(in_sevens, whole[:70])
