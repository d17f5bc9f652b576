"""The engine's learned categorical embeddings (:class:`sklearn_moe.nn.CategoricalEmbedding`)
and their place in :class:`sklearn_moe.nn.MixtureOfExperts`."""

import warnings

import pytest
import torch

from sklearn_moe.nn import CategoricalEmbedding, MixtureOfExperts, NumericEmbedding
from sklearn_moe.nn.embeddings import D_CATEGORY_EMBEDDING, D_EMBEDDING


def codes_and_numbers(n=40, seed=0):
    """Two numeric columns (one with 3 values), then codes of two categorical columns of 3
    and 5 codes (code 0 appears: unseen categories)."""
    generator = torch.Generator().manual_seed(seed)
    numbers = torch.cat((torch.randn(n, 1, generator=generator),
                         torch.randint(0, 3, (n, 1), generator=generator).float()), dim=1)
    codes = torch.cat((torch.randint(0, 3, (n, 1), generator=generator),
                       torch.randint(0, 5, (n, 1), generator=generator)), dim=1).float()
    return torch.cat((numbers, codes), dim=1)


def test_each_code_is_its_row_of_the_table_and_code_0_is_zeros():
    torch.manual_seed(0)
    embedding = CategoricalEmbedding([3, 5])
    assert embedding.n_columns == 2 and embedding.out_features == 2 * D_CATEGORY_EMBEDDING
    codes = torch.tensor([[1.0, 4.0], [0.0, 2.0], [2.0, 0.0]])
    out = embedding(codes)
    d = D_CATEGORY_EMBEDDING
    table = embedding.table.weight
    torch.testing.assert_close(out[0], torch.cat((table[1], table[3 + 4])), rtol=0, atol=0)
    torch.testing.assert_close(out[1], torch.cat((torch.zeros(d), table[3 + 2])), rtol=0, atol=0)
    torch.testing.assert_close(out[2], torch.cat((table[2], torch.zeros(d))), rtol=0, atol=0)
    out.sum().backward()
    grad = embedding.table.weight.grad
    used = {1, 2, 3 + 4, 3 + 2}
    for row in range(8):
        assert bool(grad[row].abs().sum() > 0) == (row in used)  # the reserved rows 0 and 3 learn nothing


def test_zero_unused_zeroes_the_vectors_no_row_holds_only():
    torch.manual_seed(0)
    embedding = CategoricalEmbedding([3, 5])
    before = embedding.table.weight.detach().clone()
    embedding.zero_unused(torch.tensor([[1.0, 4.0], [1.0, 2.0], [0.0, 2.0]]))
    # The shared table's rows: column 0's codes 0-2, then column 1's codes 0-4.
    used = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    assert torch.equal(embedding.table.weight[used], before[used])
    assert not embedding.table.weight[~used].any()
    unseen = embedding(torch.tensor([[0.0, 0.0]]))
    assert torch.equal(embedding(torch.tensor([[2.0, 3.0]])), unseen)


def test_invalid_cardinalities():
    for cardinalities in ([], [1, 4], [2**24 + 1]):
        with pytest.raises(ValueError, match="cardinalities"):
            CategoricalEmbedding(cardinalities)
    with pytest.raises(ValueError, match="category_cardinalities names 4 code columns; the input has 3"):
        MixtureOfExperts(3, 1, category_cardinalities=[2, 2, 2, 2])


@pytest.mark.parametrize("codes", [[[3.0, 1.0]], [[1.5, 1.0]], [[-1.0, 0.0]], [[0.0, 5.0]]])
def test_a_code_outside_its_column_is_an_error(codes):
    """Not another column's vector: code 3 of a 3-code column would read the next column's
    reserved row."""
    with pytest.raises(RuntimeError, match=r"not a whole number in \[0, cardinality\) of its column"):
        CategoricalEmbedding([3, 5])(torch.tensor(codes))


@pytest.mark.parametrize("numeric_embedding", [None, "periodic"])
@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_the_codes_are_embedded_after_the_numeric_columns(numeric_embedding, expert_type):
    x = codes_and_numbers()
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=3, top_k=2, expert_type=expert_type,
                              numeric_embedding=numeric_embedding, embedding_columns=[0, 1] if numeric_embedding
                              else None, category_cardinalities=[3, 5])
    d_numeric = D_EMBEDDING["periodic"] if numeric_embedding else 1
    width = 2 * d_numeric + 2 * D_CATEGORY_EMBEDDING
    assert module.router.gate.in_features == width and module.experts.in_features == width
    numeric = x[:, :2] if numeric_embedding is None else module.embedding(x[:, :2])
    expected = torch.cat((numeric, module.category_embedding(x[:, 2:])), dim=1)
    torch.testing.assert_close(module._embed(x), expected, rtol=0, atol=0)
    if expert_type == "adapter":  # one value per categorical column and expert, as for a numeric embedding
        first = module.experts.in_scales[0]
        for start in (2 * d_numeric, 2 * d_numeric + D_CATEGORY_EMBEDDING):
            block = first[:, start:start + D_CATEGORY_EMBEDDING]
            assert torch.equal(block, block[:, :1].expand_as(block))
    module.train()
    module(x).output.square().mean().backward()
    assert module.category_embedding.table.weight.grad.abs().sum() > 0
    module.eval()
    with torch.no_grad():
        changed = x.clone()
        changed[5, 3] = (x[5, 3] + 1) % 5  # another category in one row
        before, after = module.predict(x), module.predict(changed)
    assert not torch.equal(before[5], after[5])
    torch.testing.assert_close(torch.cat((before[:5], before[6:])), torch.cat((after[:5], after[6:])), rtol=0, atol=0)


def test_a_column_of_one_bin_builds_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NumericEmbedding("piecewise_linear", 2, [0, 1], bins=[torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])])
