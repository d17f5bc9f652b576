"""Thread safety: one fitted estimator serving predictions from several threads, and fits
running at once in threads."""

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import sklearn_moe._scaling
import sklearn_moe._training
import sklearn_moe.nn._warnings
from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe._training import default_generators_seeded
from sklearn_moe.nn._warnings import ignoring_warnings

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


# Every training draw: dropout, the noisy router's noise, expert dropout, expert subsampling.
RANDOM_TRAINING = dict(FAST, max_epochs=3, router="noisy_topk", dropout=0.2, expert_dropout=0.2, expert_subsample=0.7)


def test_fits_running_at_once_in_threads_equal_fits_one_at_a_time(regression_data):
    X, y = regression_data
    seeds = list(range(4))

    def fit_and_predict(seed):
        return MoERegressor(**dict(RANDOM_TRAINING, random_state=seed)).fit(X, y).predict(X)

    alone = [fit_and_predict(seed) for seed in seeds]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with ThreadPoolExecutor(max_workers=len(seeds)) as pool:
        at_once = list(pool.map(fit_and_predict, seeds + seeds))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's generator is its own
    for seed, predictions in zip(seeds + seeds, at_once):
        np.testing.assert_array_equal(predictions, alone[seed], err_msg=f"random_state={seed}")


def test_prediction_on_large_inputs_leaves_the_warning_filters_alone(regression_data, monkeypatch):
    """Changing the process-wide filters from threads at once can leave one changed for good:
    the scaling of a large (read-only) input, which torch would warn of, changes none."""
    X, y = regression_data
    model = MoERegressor(**dict(FAST, max_epochs=1)).fit(X, y)
    large = np.random.RandomState(0).normal(size=(40_000, X.shape[1]))
    large.flags.writeable = False

    class NoFilterChanges:
        def __getattr__(self, name):
            raise AssertionError(f"warnings.{name} used in the scaling")

    monkeypatch.setattr(sklearn_moe._scaling, "warnings", NoFilterChanges(), raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(pool.map(model.predict, [large, large]))
    np.testing.assert_array_equal(results[0], results[1])


def test_a_fit_with_collapse_recovery_depends_on_its_random_state_only(regression_data):
    """Reviving experts perturbs copies: drawn from the fit's generator, not torch's global one."""
    X, y = regression_data
    params = dict(FAST, router="topk", top_k=1, max_epochs=3, early_stopping=False, collapse_threshold=0.99,
                  collapse_patience=1, collapse_recovery=True)
    predictions = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        with pytest.warns(UserWarning):  # the experts it revived
            model = MoERegressor(**params).fit(X, y)
        assert any(row.get("revived_experts") for row in model.net_.history)
        assert torch.equal(torch.random.get_rng_state(), before)
        predictions.append(model.predict(X))
    np.testing.assert_array_equal(*predictions)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_while_a_thread_holds_the_librarys_locks_can_take_them():
    """multiprocessing's 'fork' start method copies a lock held by another thread, held for
    good in the child: the library's locks are made anew there."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with default_generators_seeded(0), ignoring_warnings("nothing"):
            held.set()
            release.wait()

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if both locks are free (a timeout, not a hang, if not)
        locks = (sklearn_moe._training._DEFAULT_GENERATORS_LOCK, sklearn_moe.nn._warnings._FILTERS_LOCK)
        os._exit(0 if all(lock.acquire(timeout=10) for lock in locks) else 1)
    release.set()
    thread.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child could not take the locks"
