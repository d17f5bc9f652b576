"""A classifier's gate mixing the experts' class probabilities (``mixing="probabilities"``)."""

import math

import numpy as np
import pytest
import torch
from scipy.special import softmax
from torch import nn

import sklearn_moe
from sklearn_moe import MoEClassifier
from sklearn_moe.nn import MixtureOfExperts
from sklearn_moe.nn.density import mixture_log_probabilities
from sklearn_moe.nn.losses import per_expert_loss

from .conftest import FAST


def test_mixture_log_probabilities_by_hand():
    # row 0: two experts (0.25 and 0.75); row 1: one expert
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-3.0, 0.5, 4.0]])
    rows, weights = torch.tensor([0, 0, 1]), torch.tensor([0.25, 0.75, 1.0])
    expected = np.log(np.stack([0.25 * softmax(logits[0].numpy()) + 0.75 * softmax(logits[1].numpy()),
                                softmax(logits[2].numpy())]))
    result = mixture_log_probabilities(logits, rows, weights, 2)
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.exp().sum(dim=1).numpy(), 1.0, rtol=1e-6)
    # normalised: a cross-entropy on them is the mixture's negative log-likelihood
    loss = nn.CrossEntropyLoss(reduction="none")(result, torch.tensor([1, 2]))
    np.testing.assert_allclose(loss.numpy(), -expected[[0, 1], [1, 2]], rtol=1e-5)


def test_far_logits_stay_finite_with_finite_gradients():
    logits = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], requires_grad=True)
    weights = torch.tensor([0.5, 0.5], requires_grad=True)
    log_p = mixture_log_probabilities(logits, torch.tensor([0, 0]), weights, 1)
    torch.testing.assert_close(log_p, torch.full((1, 2), math.log(0.5)))
    log_p[0, 0].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(weights.grad).all()


def test_per_expert_gate_term_uses_the_given_mixture():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    rows, weights, target = torch.tensor([0, 0]), torch.tensor([0.4, 0.6]), torch.tensor([1])
    criterion = nn.CrossEntropyLoss(reduction="none")
    own = criterion(logits, target.repeat(2))
    mixture_nll = -mixture_log_probabilities(logits, rows, weights, 1)[0, 1]
    expected = 0.4 * own[0] + 0.6 * own[1] + mixture_nll
    result = per_expert_loss(criterion, logits, rows, weights, target, mixture=mixture_log_probabilities)
    torch.testing.assert_close(result, expected)
    linear = per_expert_loss(criterion, logits, rows, weights, target)  # the logits mixed
    torch.testing.assert_close(linear, 0.4 * own[0] + 0.6 * own[1] + criterion((0.4 * logits[0] + 0.6 * logits[1])
                                                                                [None], target)[0])


@pytest.mark.parametrize("router", ["softmax", "topk"])
def test_module_output_is_the_log_of_the_mixed_probabilities(router):
    torch.manual_seed(0)
    module = MixtureOfExperts(5, 3, n_experts=4, top_k=2, router=router, output="categorical_mixture",
                              shared_expert=True).eval()
    x = torch.randn(64, 5)
    with torch.no_grad():
        gates = module.route(x)
        logits = module.experts.all_experts(x) + module.shared_expert(x.unsqueeze(0))  # (E, n, C)
        expected = (gates.T.unsqueeze(2) * torch.softmax(logits, dim=2)).sum(dim=0).log()
        torch.testing.assert_close(module.predict(x), expected, rtol=1e-5, atol=1e-5)
        # training mode: the same mixture, and the loss a cross-entropy on it
        output = module.train()(x).output
    assert torch.allclose(output.exp().sum(dim=1), torch.ones(64), atol=1e-5)


@pytest.mark.parametrize("expert_loss", ["mixture", "per_expert"])
def test_fitted_classifier_probabilities_are_the_experts_mixed(classification_data, expert_loss):
    X, y = classification_data
    model = MoEClassifier(**dict(FAST, mixing="probabilities", expert_loss=expert_loss, router="softmax",
                                 max_epochs=5)).fit(X, y)
    proba = model.predict_proba(X)
    X_scaled = model._scaled_input(X)
    with torch.no_grad():
        gates = model.module_.route(X_scaled).double().numpy()
        logits = model.module_.experts.all_experts(model.module_._embed(X_scaled)).double().numpy()
    np.testing.assert_allclose(proba, np.einsum("ne,enc->nc", gates, softmax(logits, axis=2)), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(model.predict_log_proba(X), np.log(proba), rtol=1e-6, atol=1e-9)
    assert set(model.predict(X)) <= set(model.classes_)


def test_mixing_is_validated_saved_and_defaults_to_logits(tmp_path, classification_data):
    X, y = classification_data
    assert MoEClassifier().mixing == "logits"
    with pytest.raises(ValueError, match="'mixing' parameter of MoEClassifier"):
        MoEClassifier(mixing="softmax", max_epochs=1).fit(X, y)
    model = MoEClassifier(**dict(FAST, mixing="probabilities", max_epochs=3)).fit(X, y)
    assert model.module_.output == "categorical_mixture"
    model.save(tmp_path / "mixed.moe")
    loaded = sklearn_moe.load(tmp_path / "mixed.moe")
    assert loaded.mixing == "probabilities"
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
