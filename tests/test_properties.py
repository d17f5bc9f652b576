"""Property-based tests: whatever the shapes, dtypes and values of the input, a valid draw
gives a fitted model with finite predictions, and an invalid one (one of the documented
reasons below) the ValueError that names the reason, leaving the estimator unfitted."""

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.exceptions import DataConversionWarning

from sklearn_moe import MoEClassifier, MoERegressor

# Derandomised in CI so that a run is reproducible; random (with the example database) locally.
PROPERTY_SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, np.bool_]
ROUTERS = ["topk", "softmax", "noisy_topk", "switch", "top_p", "hierarchical"]


def _elements(dtype, allow_nonfinite):
    if np.dtype(dtype).kind == "f":
        return st.floats(allow_nan=allow_nonfinite, allow_infinity=allow_nonfinite, width=np.dtype(dtype).itemsize * 8)
    return None  # hypothesis' default for the dtype: its whole range


@st.composite
def datasets(draw, classification):
    n_samples = draw(st.integers(1, 40))
    n_features = draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    allow_nonfinite = draw(st.booleans())
    X = draw(hnp.arrays(dtype, (n_samples, n_features), elements=_elements(dtype, allow_nonfinite)))
    if classification:
        labels = draw(st.sampled_from([[0, 1], [0, 1, 2], ["a", "b"], [True, False], [-1.0, 2.0], [-1.5, 2.5]]))
        y = np.array(draw(st.lists(st.sampled_from(labels), min_size=n_samples, max_size=n_samples)))
    else:
        y = draw(hnp.arrays(np.float64, n_samples, elements=st.floats(
            allow_nan=allow_nonfinite, allow_infinity=allow_nonfinite, min_value=None if allow_nonfinite else -1e300,
            max_value=None if allow_nonfinite else 1e300)))
    sample_weight = None
    if draw(st.booleans()):
        sample_weight = draw(hnp.arrays(np.float64, n_samples, elements=st.floats(0, 10)))
    return X, y, sample_weight


hyperparameters = st.fixed_dictionaries({
    "n_experts": st.integers(1, 3),
    "top_k": st.integers(1, 3),
    "router": st.sampled_from(ROUTERS),
    "batch_size": st.sampled_from(["auto", 1, 7, 64]),
    "capacity_factor": st.sampled_from([None, 1.0]),
    "early_stopping": st.booleans(),
})


def documented_invalidity(X, y, sample_weight, classification: bool) -> str | None:
    """Why the estimators refuse to fit a draw (a pattern of the error's message), in the
    order they check, or None for a valid draw."""
    if np.isinf(np.asarray(X, dtype=np.float64)).any():  # NaN is a missing value (handle_missing="native")
        return "Input X contains"
    if not classification and not np.isfinite(y).all():
        return "Input y contains"
    weights = None
    if sample_weight is not None:
        if not sample_weight.max() > 0:
            return "[Ss]ample.weights? must contain at least one"  # scikit-learn's check, or ours
        weights = sample_weight / sample_weight.max()
        weights[weights < 1e-30] = 0.0  # negligible next to the largest: they count as 0
    if classification:
        if y.dtype.kind == "f" and not np.array_equal(y, np.round(y)):
            return "Unknown label type: continuous"  # float labels must be whole numbers
        if np.unique(y).shape[0] < 2:
            return "needs samples of at least 2 classes"
        if weights is not None and np.unique(y[weights > 0]).shape[0] < 2:
            return "Only one class has a positive weight under sample_weight"
    return None


def _fit_or_documented_error(estimator, X, y, sample_weight, classification):
    """Fit; True when fitted. A draw with a documented reason must raise it, any other must fit."""
    reason = documented_invalidity(X, y, sample_weight, classification)
    with warnings.catch_warnings():
        # Densifying sparse input is the only warning expected here; anything else (e.g. a
        # numerical RuntimeWarning) stays an error (see pyproject's filterwarnings).
        warnings.simplefilter("ignore", DataConversionWarning)
        if reason is None:
            estimator.fit(X, y, sample_weight=sample_weight)
            return True
        with pytest.raises(ValueError, match=reason):
            estimator.fit(X, y, sample_weight=sample_weight)
    assert not hasattr(estimator, "net_"), "a failed fit left the estimator fitted"
    return False


def _check_predictions(estimator, X, n_outputs_shape):
    try:
        prediction = estimator.predict(X)
    except ValueError as error:
        # Only infinite X may be refused at predict time, after a successful fit.
        assert "Input X contains" in str(error), error
        assert np.isinf(np.asarray(X, dtype=np.float64)).any()
        return
    assert prediction.shape == n_outputs_shape
    return prediction


@pytest.mark.slow
@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier], ids=["regressor", "classifier"])
@PROPERTY_SETTINGS
@given(draw=st.data(), params=hyperparameters)
def test_fit_gives_valid_predictions_or_a_clear_error(estimator_class, draw, params):
    X, y, sample_weight = draw.draw(datasets(classification=estimator_class is MoEClassifier))
    model = estimator_class(**params, expert_hidden=(4,), max_epochs=2, device="cpu", random_state=0)
    if not _fit_or_documented_error(model, X, y, sample_weight, estimator_class is MoEClassifier):
        return
    prediction = _check_predictions(model, X, (X.shape[0],))
    zeros = np.zeros((3, X.shape[1]))
    if estimator_class is MoERegressor:
        assert prediction is None or (prediction.dtype == np.float64 and np.isfinite(prediction).all())
        assert np.isfinite(model.predict(zeros)).all()
    else:
        assert prediction is None or set(np.unique(prediction)) <= set(model.classes_)
        proba = model.predict_proba(zeros)
        assert np.isfinite(proba).all()
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
