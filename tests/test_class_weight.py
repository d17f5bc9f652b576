"""MoEClassifier's class_weight: weights of the classes in the loss, as scikit-learn's
LogisticRegression and HistGradientBoostingClassifier take them (scikit-learn's own
class-weight checks run in test_common.py)."""

import numpy as np
import pytest
from sklearn.base import clone

import sklearn_moe
from sklearn_moe import MoEClassifier

from .conftest import FAST

pytestmark = pytest.mark.filterwarnings("ignore::sklearn_moe.callbacks.ExpertCollapseWarning")


def rare_class_data(n=1000, seed=0):
    """About 10% of the rows are class 1, more likely as x0 grows: the classes overlap."""
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 3))
    y = (rng.rand(n) < 1 / (1 + np.exp(-(1.5 * X[:, 0] - 3)))).astype(np.int64)
    return X, y


@pytest.fixture(scope="module")
def data():
    return rare_class_data()


@pytest.mark.parametrize("class_weight", ["balanced", {1: 5.0}])
def test_weighing_the_rare_class_up_predicts_it_more_often(data, class_weight):
    X, y = data
    plain = MoEClassifier(**FAST).fit(X, y)
    weighted = MoEClassifier(**dict(FAST, class_weight=class_weight)).fit(X, y)
    assert weighted.predict(X).mean() > 2 * plain.predict(X).mean()
    assert weighted.predict_proba(X)[:, 1].mean() > 2 * y.mean()  # no longer calibrated to the class share


def test_the_loss_weights_are_the_class_weights_times_the_sample_weights(data):
    X, y = data
    sample_weight = np.linspace(0.5, 1.0, len(y))
    model = MoEClassifier(**dict(FAST, max_epochs=1, class_weight={1: 4.0})).fit(X, y)
    np.testing.assert_allclose(model._loss_weight(y, sample_weight), sample_weight * np.where(y == 1, 4.0, 1.0))
    balanced = model.set_params(class_weight="balanced")._loss_weight(y, None)
    np.testing.assert_allclose(balanced, np.where(y == 1, len(y) / (2 * y.sum()), len(y) / (2 * (y == 0).sum())))
    assert balanced.mean() == pytest.approx(1.0)  # each class weighs half of the total


def test_class_weight_follows_string_labels_and_leaves_unnamed_classes_at_1(data):
    X, y = data
    labels = np.array(["common", "rare"])[y]
    model = MoEClassifier(**dict(FAST, max_epochs=1, class_weight={"rare": 3.0})).fit(X, labels)
    np.testing.assert_allclose(model._class_weights(y), [1.0, 3.0])


@pytest.mark.parametrize("class_weight, message", [
    ({1: -1.0}, "finite non-negative numbers"),
    ({1: float("nan")}, "finite non-negative numbers"),
    ({1: "heavy"}, "finite non-negative numbers"),
    ({0: 0.0}, "Only one class has a positive weight under class_weight and sample_weight"),
    ("equal", "class_weight"),
])
def test_bad_class_weights_are_refused_with_a_clear_error(data, class_weight, message):
    X, y = data
    model = MoEClassifier(**dict(FAST, max_epochs=1, class_weight=class_weight))
    with pytest.raises(ValueError, match=message):
        model.fit(X, y)
    assert not hasattr(model, "classes_")  # a failed fit leaves no fitted state


def test_a_weight_of_a_class_not_in_y_is_unused_with_a_warning(data):
    """As scikit-learn's classifiers: a cross-validation fold may lack a rare class that
    class_weight weighs (the fit had failed there, where LogisticRegression fits)."""
    X, y = data
    with pytest.warns(UserWarning, match=r"class\(es\) \[2\] that are not in y \(the classes are \[0, 1\]\); "
                                         r"their weights are unused"):
        model = MoEClassifier(**dict(FAST, max_epochs=1, class_weight={1: 3.0, 2: 5.0})).fit(X, y)
        np.testing.assert_allclose(model._class_weights(y), [1.0, 3.0])


def test_a_class_of_negligible_weights_is_named_as_such(data):
    """Weights below 1e-30 of the largest count as 0; the error says so, since they are
    positive."""
    X, y = data
    with pytest.raises(ValueError, match=r"Only one class has a positive weight under sample_weight.*a weight below "
                                         r"1e-30 of the largest counts as 0"):
        MoEClassifier(**dict(FAST, max_epochs=1)).fit(X, y, sample_weight=np.where(y == 1, 1e-40, 1.0))


def test_a_multilabel_y_with_class_weight_is_refused(data):
    X, y = data
    with pytest.raises(ValueError, match="class_weight weighs the classes of one label per row.*sample_weight"):
        MoEClassifier(**dict(FAST, max_epochs=1, class_weight="balanced")).fit(X, np.column_stack([y, 1 - y]))


def test_partial_fit_takes_class_weights_as_a_dict_not_balanced(data):
    X, y = data
    balanced = MoEClassifier(**dict(FAST, class_weight="balanced"))
    with pytest.raises(ValueError, match='class_weight="balanced" needs the class frequencies.*compute_class_weight'):
        balanced.partial_fit(X[:200], y[:200], classes=[0, 1])
    assert not hasattr(balanced, "classes_")  # a refused first call leaves no fitted state
    fitted = MoEClassifier(**FAST).partial_fit(X[:200], y[:200], classes=[0, 1])
    with pytest.raises(ValueError, match='class_weight="balanced"'):
        fitted.set_params(class_weight="balanced").partial_fit(X[200:400], y[200:400])
    assert fitted.n_iter_ == 1  # nor does a refused later call train
    fitted.set_params(class_weight={1: 5.0}).partial_fit(X[200:400], y[200:400])
    assert fitted.n_iter_ == 2


def test_class_weight_survives_clone_save_and_load(data, tmp_path):
    X, y = data
    model = MoEClassifier(**dict(FAST, max_epochs=2, class_weight={np.int64(1): 2.5, 0: 1})).fit(X, y)
    assert clone(model).get_params()["class_weight"] == {1: 2.5, 0: 1}
    model.save(tmp_path / "weighted.moe")
    loaded = sklearn_moe.load(tmp_path / "weighted.moe")
    assert loaded.class_weight == {1: 2.5, 0: 1}
    assert all(type(key) is int for key in loaded.class_weight)  # int labels stay ints
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    labels = np.array(["no", "yes"])[y]
    strings = MoEClassifier(**dict(FAST, max_epochs=2, class_weight="balanced")).fit(X, labels)
    strings.save(tmp_path / "balanced.moe")
    assert sklearn_moe.load(tmp_path / "balanced.moe").class_weight == "balanced"


def test_a_file_with_a_malformed_class_weight_is_refused(data, tmp_path):
    from .test_expert_types import rewrite_metadata

    X, y = data
    MoEClassifier(**dict(FAST, max_epochs=1, class_weight={1: 2.0})).fit(X, y).save(tmp_path / "weighted.moe")
    for malformed in ([[1]], [[[1], 2.0]]):
        path = rewrite_metadata(tmp_path / "weighted.moe", tmp_path / "bad.moe",
                                lambda document, value=malformed: document["params"].update(class_weight=value))
        with pytest.raises(ValueError, match=r"class_weight must be a list of \[key, value\] pairs"):
            sklearn_moe.load(path)
