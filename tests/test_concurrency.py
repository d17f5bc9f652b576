"""Thread safety: one fitted estimator serving predictions from several threads."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from sklearn_moe import MoEClassifier, MoERegressor

from .conftest import FAST

N_THREADS = 8
CALLS_PER_THREAD = 6


@pytest.mark.parametrize(
    ("estimator_class", "methods"),
    [(MoERegressor, ("predict", "route")), (MoEClassifier, ("predict", "predict_proba", "route"))],
    ids=["regressor", "classifier"],
)
@pytest.mark.parametrize("router", ["topk", "softmax", "top_p", "hierarchical"])
def test_concurrent_predictions_equal_sequential_ones(estimator_class, methods, router,
                                                      regression_data, classification_data):
    X, y = regression_data if estimator_class is MoERegressor else classification_data
    model = estimator_class(**dict(FAST, router=router, max_epochs=3)).fit(X, y)
    rng = np.random.RandomState(1)
    # Different inputs (and sizes) per call, so that mixed-up state between threads shows.
    inputs = [rng.normal(size=(rng.randint(1, 300), X.shape[1])) for _ in range(N_THREADS * CALLS_PER_THREAD)]
    jobs = [(method, i) for i in range(len(inputs)) for method in methods]
    expected = {job: getattr(model, job[0])(inputs[job[1]]) for job in jobs}

    def run(job):
        return job, getattr(model, job[0])(inputs[job[1]])

    with ThreadPoolExecutor(max_workers=N_THREADS) as pool:
        results = dict(pool.map(run, jobs))
    for job in jobs:
        np.testing.assert_array_equal(results[job], expected[job], err_msg=str(job))
