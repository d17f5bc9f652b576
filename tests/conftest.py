import importlib.util

import numpy as np
import pytest
import torch

# Small, fast settings shared by the tests.
FAST = dict(
    n_experts=4,
    top_k=2,
    expert_hidden=(16,),
    max_epochs=30,
    batch_size=32,
    learning_rate=1e-2,
    n_iter_no_change=10,
    device="cpu",
    random_state=0,
)


def needs(*modules: str):
    """Skip a test, or with ``pytestmark`` a module, whose optional libraries (another extra's:
    the benchmarks' data sets, matplotlib) are not installed."""
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} (pip install -e '.[dev]')")


@pytest.fixture
def fast_params():
    return dict(FAST)


@pytest.fixture
def regression_data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 5))
    y = X[:, 0] * 2 + np.sin(3 * X[:, 1]) + 0.1 * rng.normal(size=200)
    return X, y


@pytest.fixture
def classification_data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 4))
    y = np.where(X[:, 0] + X[:, 1] ** 2 > 1, "yes", "no")
    return X, y


def pytest_configure(config):
    # The test models are tiny: one thread is fastest, and with pytest-xdist workers sharing
    # the cores, more threads oversubscribe them (OpenMP spinning makes that ~10x slower).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
