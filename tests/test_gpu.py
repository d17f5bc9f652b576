"""CUDA tests: the engine and the estimators on a GPU. Skipped where CUDA is unavailable."""

import numpy as np
import pytest
import torch

from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe.nn import MixtureOfExperts

from .conftest import FAST

pytestmark = pytest.mark.gpu

ROUTER_OPTIONS = [
    {"router": "topk"},
    {"router": "softmax"},
    {"router": "noisy_topk", "balance_loss": "cv2"},
    {"router": "switch", "balance_loss": "aux_free"},
    {"router": "top_p", "learned_threshold": True},
    {"router": "hierarchical", "n_groups": 2},
    {"router": "softmax", "expert_type": "adapter"},
    {"router": "topk", "expert_type": "adapter"},
    {"router": "uniform", "expert_type": "adapter"},
]
TRAINING_OPTIONS = [
    {},
    {"capacity_factor": 1.0, "capacity_overflow": "reroute"},
    {"capacity_factor": 1.0, "capacity_overflow": "drop", "shared_expert": True},
    {"expert_grad_scaling": True, "diversity_loss": True, "expert_dropout": 0.2},
]


def _module_pair(**options):
    torch.manual_seed(0)
    balance = options.pop("balance_loss", "switch")
    cpu = MixtureOfExperts(6, 2, n_experts=8, top_k=2, expert_hidden=(16, 16), layer_norm=True,
                           balance_loss=balance, **options)
    cuda = MixtureOfExperts(6, 2, n_experts=8, top_k=2, expert_hidden=(16, 16), layer_norm=True,
                            balance_loss=balance, **options).cuda()
    cuda.load_state_dict(cpu.state_dict())
    return cpu, cuda


def _option_id(options):
    return options["router"] + ("-adapter" if options.get("expert_type") == "adapter" else "")


@pytest.mark.parametrize("options", ROUTER_OPTIONS, ids=_option_id)
def test_cuda_eval_matches_cpu(options):
    cpu, cuda = _module_pair(**options)
    x = torch.randn(300, 6)
    expected = cpu.eval()(x)
    got = cuda.eval()(x.cuda())
    torch.testing.assert_close(got.output.cpu(), expected.output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.gates.cpu(), expected.gates, rtol=1e-4, atol=1e-5)
    assert got.expert_counts.cpu().tolist() == expected.expert_counts.tolist()


@pytest.mark.parametrize("training", TRAINING_OPTIONS, ids=["plain", "reroute", "drop+shared", "scaling+diversity"])
@pytest.mark.parametrize("options", ROUTER_OPTIONS, ids=_option_id)
def test_cuda_training_step(options, training):
    _, module = _module_pair(**options, **training)
    module.train()
    x = torch.randn(512, 6, device="cuda")
    weight = (torch.arange(512, device="cuda") % 7 != 0).float()  # some zero-weight rows
    out = module(x, sample_weight=weight)
    loss = out.output.square().mean() + 1e-2 * out.balance_loss + 1e-3 * out.z_loss + 0.1 * out.diversity_loss
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert out.expert_counts.device.type == "cuda"
    # counts: the weighted rows' routed (not dropped-out) assignments, before any capacity cap
    assert int(out.expert_counts.sum()) == int((out.gates[weight > 0] > 0).sum())


@pytest.mark.parametrize("options", ROUTER_OPTIONS, ids=_option_id)
@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier], ids=lambda c: c.__name__)
def test_estimators_fit_on_cuda(estimator_class, options):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 5))
    y = X[:, 0] + np.sin(2 * X[:, 1])
    if estimator_class is MoEClassifier:
        y = np.digitize(y, [-0.5, 0.5])
    model = estimator_class(**dict(FAST, device="cuda", **options)).fit(X, y)
    assert next(model.module_.parameters()).device.type == "cuda"
    pred = model.predict(X)
    assert pred.shape == (300,)
    if estimator_class is MoERegressor:
        assert np.isfinite(pred).all()
        assert model.score(X, y) > 0.5
    else:
        np.testing.assert_allclose(model.predict_proba(X).sum(axis=1), 1.0, rtol=1e-6)
        assert model.score(X, y) > 0.6


@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier], ids=lambda c: c.__name__)
def test_bf16_fit_on_cuda(estimator_class):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 5))
    y = X[:, 0] + np.sin(2 * X[:, 1])
    if estimator_class is MoEClassifier:
        y = np.digitize(y, [-0.5, 0.5])
    model = estimator_class(**dict(FAST, device="cuda", precision="bf16")).fit(X, y)
    assert all(p.dtype == torch.float32 for p in model.module_.parameters())
    pred = model.predict(X)
    assert pred.dtype == (np.float64 if estimator_class is MoERegressor else y.dtype)
    assert model.score(X, y) > 0.5


def test_cuda_trained_model_pickles_without_cuda_tensors_outside_the_net():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 5))
    model = MoERegressor(**dict(FAST, device="cuda")).fit(X, X[:, 0])
    for name, callback in model.net_.callbacks_:
        for attribute, value in vars(callback).items():
            assert not isinstance(value, torch.Tensor), f"callback {name!r} keeps tensor {attribute!r}"


def test_cuda_model_saves_and_loads_on_cpu(tmp_path):
    from sklearn_moe import load

    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 5))
    y = X[:, 0] + np.sin(2 * X[:, 1])
    for estimator_class, target in [(MoERegressor, y), (MoEClassifier, np.digitize(y, [-0.5, 0.5]))]:
        options = dict(FAST, device="cuda", router="topk", balance_loss="aux_free", shared_expert=True)
        model = estimator_class(**options).fit(X, target)
        path = tmp_path / f"{estimator_class.__name__}.moe"
        model.save(path)
        loaded = load(path, device="cpu")
        assert next(loaded.module_.parameters()).device.type == "cpu"
        np.testing.assert_allclose(loaded.route(X), model.route(X), rtol=1e-5, atol=1e-5)
        if estimator_class is MoERegressor:
            np.testing.assert_allclose(loaded.predict(X), model.predict(X), rtol=1e-5, atol=1e-5)
        else:
            np.testing.assert_allclose(loaded.predict_proba(X), model.predict_proba(X), rtol=1e-5, atol=1e-5)
        on_cuda = load(path, device="cuda")
        assert next(on_cuda.module_.parameters()).device.type == "cuda"
        np.testing.assert_allclose(on_cuda.route(X), model.route(X), rtol=1e-6, atol=1e-6)
