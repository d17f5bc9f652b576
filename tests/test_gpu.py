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


# ---------------------------------------------------------------------------------------
# Training steps without host synchronisation (what tests/test_host_sync.py checks on the
# CPU, here on the device itself), and the grouped-product layout
# ---------------------------------------------------------------------------------------

SYNC_FREE_OPTIONS = [
    {"router": "topk"},
    {"router": "softmax", "expert_type": "adapter"},
    {"router": "topk", "expert_type": "adapter", "n_outputs": 3},
    {"router": "switch", "shared_expert": True, "expert_grad_scaling": True},
    {"router": "noisy_topk", "balance_loss": "cv2", "layer_norm": True, "dropout": 0.1},
    {"router": "hierarchical", "n_groups": 2},
    {"router": "topk", "output": "mixture_density"},
    {"router": "softmax", "expert_type": "adapter", "category_cardinalities": [5, 40]},
]


def _sync_free_id(options):
    return "-".join(f"{value}" for value in options.values())


def _cuda_step(module, optimizer, x, y, weight, bf16):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = module(x, sample_weight=weight)
    loss = (out.output.float()[:, :1] - y).square().mean() + 1e-2 * out.balance_loss + 1e-3 * out.z_loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("bf16", [False, True], ids=["float32", "bf16"])
@pytest.mark.parametrize("options", SYNC_FREE_OPTIONS, ids=_sync_free_id)
def test_a_cuda_training_step_never_synchronises(options, bf16):
    options = dict(options)
    n_outputs = options.pop("n_outputs", 1)
    n_codes = len(options.get("category_cardinalities", ()))
    torch.manual_seed(0)
    module = MixtureOfExperts(6 + n_codes, n_outputs, n_experts=8, top_k=2, expert_hidden=(32, 32),
                              **options).cuda().train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    x = torch.randn(1024, 6 + n_codes, device="cuda")
    if n_codes:
        x[:, 6:] = torch.randint(0, 5, (1024, n_codes), device="cuda").float()
    y = torch.randn(1024, 1, device="cuda")
    weight = (torch.arange(1024, device="cuda") % 7 != 0).float()
    for _ in range(2):  # lazy state: cuBLAS handles, the optimizer's, the failure tally
        _cuda_step(module, optimizer, x, y, weight, bf16)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _cuda_step(module, optimizer, x, y, weight, bf16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    module.eval()  # reads the failure tally: nothing failed
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_an_estimator_training_step_never_synchronises(precision):
    from skorch.callbacks import Callback

    class SyncErrorsInOneStep(Callback):
        def initialize(self):
            self.count, self.checked = -1, False
            return super().initialize()

        def on_batch_begin(self, net, training=None, **kwargs):
            if training:
                self.count += 1
                if self.count == 5:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")

        def on_batch_end(self, net, training=None, **kwargs):
            if training and self.count == 5:
                torch.cuda.set_sync_debug_mode("default")
                self.checked = True

    rng = np.random.RandomState(0)
    X = rng.normal(size=(2000, 5))
    y = X[:, 0] + np.sin(2 * X[:, 1])
    probe = SyncErrorsInOneStep()
    try:
        MoERegressor(max_epochs=1, batch_size=128, device="cuda", precision=precision, random_state=0).fit(
            X, y, callbacks=[probe])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert probe.checked


@pytest.mark.parametrize("options", [{"router": "topk"}, {"router": "topk", "layer_norm": True, "dropout": 0.0}],
                         ids=["topk", "layer-norm"])
def test_a_cuda_training_step_captures_in_a_cuda_graph(options):
    torch.manual_seed(0)
    module = MixtureOfExperts(6, 1, n_experts=16, top_k=2, expert_hidden=(32, 32), **options).cuda().train()
    x = torch.randn(1024, 6, device="cuda")

    def step():
        module.zero_grad(set_to_none=True)
        out = module(x)
        (out.output.square().mean() + 1e-2 * out.balance_loss).backward()
        return out.output

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager = step()
    torch.cuda.current_stream().wait_stream(side)
    eager_grads = [p.grad.clone() for p in module.parameters()]
    graph = torch.cuda.CUDAGraph()
    module.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):  # fails on any host synchronisation
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-6)
    for parameter, grad in zip(module.parameters(), eager_grads):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_the_grouped_layout_matches_the_padded_one_on_cuda(layer_norm):
    from sklearn_moe.nn import expert_outputs, plan_dispatch
    from sklearn_moe.nn._sync import grouped_mm_supported

    if not grouped_mm_supported(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm has no fused bf16 kernel on this device (compute capability 9.0/10.0)")
    torch.manual_seed(0)
    module = MixtureOfExperts(12, 3, n_experts=16, top_k=2, expert_hidden=(64, 64), layer_norm=layer_norm).cuda()
    module.train()
    x = torch.randn(1000, 12, device="cuda")
    with torch.no_grad():
        routing = module.router(x)
    plan = plan_dispatch(routing.indices, routing.weights, 16, sync_free=True)
    results = {}
    for layout in ("padded", "blocked", "grouped"):
        module.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = expert_outputs(x, module.experts, plan, 3, layout)
        out.float().square().sum().backward()
        results[layout] = (out.float(), {n: p.grad.float().clone() for n, p in module.experts.named_parameters()})
    reference, reference_grads = results["padded"]
    for layout in ("blocked", "grouped"):
        out, grads = results[layout]
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=5e-2, atol=5e-2 * float(grad.abs().max()), msg=name)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = expert_outputs(x, module.experts, plan, 3, "grouped")
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sync_free_cuda_training_matches_the_cpu():
    cpu, cuda = _module_pair(router="topk", shared_expert=True)
    cpu.train(), cuda.train()
    x = torch.randn(600, 6)
    weight = (torch.arange(600) % 7 != 0).float()
    outs = []
    for module, device in ((cpu, "cpu"), (cuda, "cuda")):
        out = module(x.to(device), sample_weight=weight.to(device))
        (out.output.square().mean() + 1e-2 * out.balance_loss + 1e-3 * out.z_loss).backward()
        outs.append((out, {n: p.grad.cpu() for n, p in module.named_parameters() if p.grad is not None}))
    (expected, expected_grads), (got, grads) = outs
    torch.testing.assert_close(got.output.cpu(), expected.output, rtol=1e-4, atol=1e-5)
    assert got.expert_counts.cpu().tolist() == expected.expert_counts.tolist()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_the_launch_counter_sees_the_backward_and_the_update_of_a_cuda_step():
    # The backward of a CUDA step runs in autograd's device thread: the dispatch mode must
    # still see it, or the benchmark's kernel_launches would miss half the step.
    from benchmarks.launches import KernelLaunchCounter

    torch.manual_seed(0)
    module = MixtureOfExperts(6, 1, n_experts=16, top_k=2, expert_hidden=(16, 16)).cuda().train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(256, 6, device="cuda"), torch.randn(256, 1, device="cuda")

    def step():
        out = module(x)
        ((out.output - y).square().mean() + 1e-2 * out.balance_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with KernelLaunchCounter() as counter:
        step()
    torch.cuda.synchronize()
    assert counter.by_op["aten.threshold_backward.default"] == 2, counter.by_op  # two hidden ReLUs
    assert counter.by_op["aten._fused_adamw_.default"] == 1


def test_the_throughput_benchmark_replays_both_models_from_cuda_graphs(tmp_path):
    from benchmarks import throughput

    result = throughput.main(["--rows", "8192", "--batch-sizes", "1024", "--rounds", "1", "--device", "cuda",
                              "--graph", "--out", str(tmp_path)])
    row = result["rows"][0]
    assert row["moe_rows_per_s"] > 0 and row["mlp_rows_per_s"] > 0
    assert result["command"].endswith("--device cuda --graph") and "device_name" in result
    assert (tmp_path / "throughput_graph_cuda.json").exists()
