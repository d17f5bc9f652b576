"""Behaviour of MoERegressor and MoEClassifier as scikit-learn estimators."""

import pickle
import re

import joblib
import numpy as np
import pandas as pd
import pytest
import scipy.special
import sklearn
import torch
from sklearn.base import clone
from sklearn.compose import ColumnTransformer
from sklearn.metrics import r2_score
from sklearn.model_selection import GridSearchCV, cross_validate
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from sklearn.utils.estimator_checks import check_methods_subset_invariance

from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe._base import _MAX_CHUNK_ROWS, _MIN_CHUNK_ROWS
from sklearn_moe._data import TensorTable
from sklearn_moe.nn import MixtureOfExperts

from .conftest import FAST

# Fewer epochs where only the mechanics matter, not the quality of the fit.
SHORT = dict(FAST, max_epochs=5)

ESTIMATORS = [MoERegressor, MoEClassifier]
HISTORY_COLUMNS = ["train_loss", "valid_loss", "balance_loss", "z_loss", "load_imbalance"]


def _regression(n=200, n_features=5, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, n_features))
    y = X[:, 0] * 2 + np.sin(3 * X[:, 1]) + 0.1 * rng.normal(size=n)
    return X, y


def _classification(n=200, n_features=4, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, n_features))
    y = np.where(X[:, 0] + X[:, 1] ** 2 > 1, "yes", "no")
    return X, y


def _data_for(estimator_class, **kwargs):
    return _regression(**kwargs) if estimator_class is MoERegressor else _classification(**kwargs)


def _predictions(model, X):
    """Every prediction-like output of a fitted model, by name."""
    out = {"predict": model.predict(X), "route": model.route(X)}
    if isinstance(model, MoEClassifier):
        out["predict_proba"] = model.predict_proba(X)
        out["predict_log_proba"] = model.predict_log_proba(X)
    return out


@pytest.fixture(scope="module")
def fitted_regressor():
    X, y = _regression()
    return MoERegressor(**FAST).fit(X, y), X, y


@pytest.fixture(scope="module")
def fitted_classifier():
    X, y = _classification()
    return MoEClassifier(**FAST).fit(X, y), X, y


@pytest.fixture(params=ESTIMATORS, ids=lambda c: c.__name__)
def fitted(request):
    """A fitted model (shared within the module; do not mutate it), X and y."""
    name = "fitted_regressor" if request.param is MoERegressor else "fitted_classifier"
    return request.getfixturevalue(name)


# ---------------------------------------------------------------------------- pipelines


def _mixed_frame(n=240, seed=0):
    rng = np.random.RandomState(seed)
    colour = rng.choice(["red", "green", "blue"], size=n)
    frame = pd.DataFrame({
        "colour": colour,
        "a": rng.normal(size=n) * 10 + 50,
        "b": rng.normal(size=n),
    })
    offset = pd.Series(colour).map({"red": -3.0, "green": 0.0, "blue": 3.0}).to_numpy()
    y_reg = offset + 0.1 * (frame["a"].to_numpy() - 50) + 0.1 * rng.normal(size=n)
    y_clf = np.where(colour == "blue", "hot", np.where(colour == "red", "cold", "mild"))
    return frame, y_reg, y_clf


@pytest.mark.parametrize("numeric", ["passthrough", "scaler"])
@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_pipeline_with_column_transformer(estimator_class, numeric):
    frame, y_reg, y_clf = _mixed_frame()
    y = y_reg if estimator_class is MoERegressor else y_clf
    pre = ColumnTransformer([
        ("cat", OneHotEncoder(), ["colour"]),
        ("num", StandardScaler() if numeric == "scaler" else "passthrough", ["a", "b"]),
    ])
    pipe = Pipeline([("pre", pre), ("model", estimator_class(**FAST))])
    pipe.fit(frame, y)
    pred = pipe.predict(frame)
    assert pred.shape == (len(frame),)
    model = pipe.named_steps["model"]
    assert model.n_features_in_ == 5  # 3 one-hot columns + 2 numeric
    if estimator_class is MoERegressor:
        # The colour (only visible through the encoder) explains most of y.
        assert r2_score(y, pred) > 0.8
    else:
        assert set(np.unique(pred)) <= set(model.classes_)
        assert pipe.score(frame, y) > 0.9
        assert pipe.predict_proba(frame).shape == (len(frame), 3)


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_pipeline_with_many_categories(estimator_class):
    rng = np.random.RandomState(0)
    n = 200
    frame = pd.DataFrame({
        "city": rng.choice([f"city{i}" for i in range(12)], size=n),
        "a": rng.normal(size=n),
        "b": rng.normal(size=n),
    })
    y = frame["a"].to_numpy() if estimator_class is MoERegressor else np.where(frame["a"] > 0, "up", "down")
    # 12 one-hot columns + 2 numeric: density 3/14 < sparse_threshold=0.3, so the output is sparse.
    pipe = Pipeline([
        ("pre", ColumnTransformer([("cat", OneHotEncoder(), ["city"])], remainder="passthrough")),
        ("model", estimator_class(**SHORT)),
    ])
    pipe.fit(frame, y)
    assert pipe.predict(frame).shape == (n,)


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_feature_names_in_from_dataframe(estimator_class):
    X, y = _data_for(estimator_class)
    columns = [f"f{i}" for i in range(X.shape[1])]
    frame = pd.DataFrame(X, columns=columns)
    model = estimator_class(**SHORT).fit(frame, y)
    np.testing.assert_array_equal(model.feature_names_in_, columns)
    assert model.n_features_in_ == X.shape[1]
    # Fitting on the DataFrame is fitting on its values.
    from_array = estimator_class(**SHORT).fit(X, y)
    ours, theirs = _predictions(model, frame), _predictions(from_array, X)
    for name, values in ours.items():
        if values.dtype.kind == "f":
            np.testing.assert_allclose(values, theirs[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(values, theirs[name], err_msg=name)


def test_no_feature_names_in_from_ndarray(fitted):
    model, _, _ = fitted
    assert not hasattr(model, "feature_names_in_")


# ---------------------------------------------------------------------------- model selection


def test_grid_search_over_experts_and_top_k():
    X, y = _regression(n=120)
    grid = {"n_experts": [2, 4], "top_k": [1, 2]}
    sparse = dict(FAST, max_epochs=3, router="topk")  # the default softmax gate has no top_k
    search = GridSearchCV(MoERegressor(**sparse), grid, cv=2)
    search.fit(X, y)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores)) and len(set(scores)) == 4  # every setting trains its own model
    best = search.best_estimator_
    assert best.module_.n_experts == search.best_params_["n_experts"]
    assert best.module_.router.top_k == search.best_params_["top_k"]
    assert best.route(X).shape == (len(X), search.best_params_["n_experts"])
    # the refit is the model those parameters give on all rows
    again = MoERegressor(**dict(sparse, **search.best_params_)).fit(X, y)
    np.testing.assert_array_equal(best.predict(X), again.predict(X))


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_cross_validate_gives_finite_scores(estimator_class):
    X, y = _data_for(estimator_class, n=150)
    result = cross_validate(estimator_class(**dict(FAST, max_epochs=3)), X, y, cv=3)
    assert result["test_score"].shape == (3,)
    assert np.all(np.isfinite(result["test_score"]))


def test_clone_is_unfitted_with_equal_params(fitted):
    model, _, _ = fitted
    copy = clone(model)
    assert type(copy) is type(model)
    assert copy.get_params() == model.get_params()
    assert not hasattr(copy, "net_")
    assert not hasattr(copy, "n_features_in_")
    assert not copy.__sklearn_is_fitted__()


# ---------------------------------------------------------------------------- persistence


def test_training_state_keeps_no_tensors_outside_the_module(fitted):
    """A model trained on CUDA must unpickle on a CPU-only machine: skorch maps the module and
    optimizer to the CPU there, but a tensor pickled anywhere else would still name CUDA."""
    model, _, _ = fitted
    for name, callback in model.net_.callbacks_:
        for attribute, value in vars(callback).items():
            assert not isinstance(value, torch.Tensor), f"callback {name!r} keeps tensor {attribute!r}"
    assert not any(isinstance(value, torch.Tensor) for value in vars(model).values())


def test_callbacks_keep_no_copy_of_the_optimizer(fitted):
    """A pickle carries the optimizer's state once, in the net: a learning-rate scheduler
    left in its callback carried it again (37 MiB instead of 25 for 64 experts)."""
    model, _, _ = fitted
    assert "lr_scheduler" in dict(model.net_.callbacks_)
    for name, callback in model.net_.callbacks_:
        for attribute, value in vars(callback).items():
            assert not isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)), (
                f"callback {name!r} keeps {attribute!r}")


def test_a_users_own_scheduler_callback_keeps_its_scheduler():
    from skorch.callbacks import LRScheduler

    X, y = _data_for(MoERegressor)
    own = LRScheduler(policy=torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    model = MoERegressor(**dict(SHORT, max_epochs=2), callbacks=[("halving", own)]).fit(X, y)
    assert len(dict(model.net_.callbacks_)["halving"].lr_scheduler_.get_last_lr()) > 0


def test_a_fitted_models_callbacks_keep_nothing_per_row():
    """The pickle of a fitted model carries no array of the training or validation rows."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(1000, 3))
    model = MoERegressor(**dict(SHORT, max_epochs=2, validation_fraction=0.2)).fit(X, X[:, 0])
    for name, callback in model.net_.callbacks_:
        for attribute, value in vars(callback).items():
            if isinstance(value, (np.ndarray, torch.Tensor)):
                assert value.shape[:1] not in ((800,), (200,)), f"{name}.{attribute}"


def test_pickle_round_trip(fitted):
    model, X, _ = fitted
    restored = pickle.loads(pickle.dumps(model))
    expected = _predictions(model, X)
    for name, values in _predictions(restored, X).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_pickle_needs_no_optional_packages(estimator_class):
    """A pickle must load where pyarrow is absent: pandas' default string dtype is
    pyarrow-backed where it is installed (history_ column labels, DataFrame feature names,
    string labels in a Series)."""
    X, y = _data_for(estimator_class)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])
    target = pd.Series(y.astype(str)) if estimator_class is MoEClassifier else pd.Series(y)
    model = estimator_class(**dict(SHORT, max_epochs=2)).fit(frame, target)
    assert b"arrow" not in pickle.dumps(model).lower()


def test_joblib_round_trip(fitted, tmp_path):
    model, X, _ = fitted
    path = tmp_path / "model.joblib"
    joblib.dump(model, path)
    restored = joblib.load(path)
    expected = _predictions(model, X)
    for name, values in _predictions(restored, X).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    np.testing.assert_array_equal(restored.expert_load_, model.expert_load_)
    assert restored.n_iter_ == model.n_iter_


# ---------------------------------------------------------------------------- batch independence


@pytest.mark.parametrize(
    "extra",
    [{}, {"capacity_factor": 1.0}, {"router": "softmax"},
     {"router": "noisy_topk", "capacity_factor": 1.0, "balance_loss": "cv2", "shared_expert": True,
      "gate_hidden": (8,), "expert_dropout": 0.2},
     {"router": "switch", "balance_loss": "aux_free"},
     {"router": "top_p", "capacity_factor": 1.0, "capacity_overflow": "reroute"},
     {"router": "top_p", "learned_threshold": True, "diversity_coef": 0.1},
     {"router": "hierarchical", "n_groups": 2, "capacity_factor": 1.0, "expert_grad_scaling": True}],
    ids=["topk", "capacity_factor=1", "softmax", "noisy_topk", "switch", "top_p", "top_p_learned", "hierarchical"],
)
@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_predictions_do_not_depend_on_the_batch(estimator_class, extra):
    X, y = _data_for(estimator_class)
    model = estimator_class(**dict(SHORT, **extra)).fit(X, y)
    X_test = X[:60]

    all_at_once = _predictions(model, X_test)
    one_at_a_time = [_predictions(model, X_test[i:i + 1]) for i in range(len(X_test))]
    order = np.random.RandomState(1).permutation(len(X_test))
    shuffled = _predictions(model, X_test[order])
    inverse = np.argsort(order)

    for name, expected in all_at_once.items():
        single = np.concatenate([p[name] for p in one_at_a_time])
        if name == "predict" and isinstance(model, MoEClassifier):
            np.testing.assert_array_equal(single, expected)
            np.testing.assert_array_equal(shuffled[name][inverse], expected)
            continue
        np.testing.assert_allclose(single, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(shuffled[name][inverse], expected, rtol=1e-5, atol=1e-6, err_msg=name)


def test_predictions_beyond_one_internal_chunk(fitted):
    # Prediction runs in chunks of at most _MAX_CHUNK_ROWS rows; more rows change nothing.
    model, X, _ = fitted
    n_rows = _MAX_CHUNK_ROWS + 808
    index = np.arange(n_rows) % len(X)
    big = _predictions(model, X[index])
    small = _predictions(model, X)
    for name, values in big.items():
        assert len(values) == n_rows
        np.testing.assert_array_equal(values, small[name][index], err_msg=name)


def test_a_wide_table_predicts_in_chunks_of_fewer_rows(monkeypatch):
    """Its numeric embedding holds 64 values per input value and row: chunks of the most
    rows would take gigabytes. The chunks' results are written where the rows are."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 400))
    model = MoERegressor(**dict(FAST, output="mixture_density", max_epochs=1)).fit(X, X[:, 0])
    assert model.module_.values_per_row > 400 * 64
    big = X[np.arange(3000) % 300]
    seen = {}
    for method in ("predict", "predict_distribution"):
        original = getattr(model.module_, method)
        monkeypatch.setattr(model.module_, method, lambda x, original=original, method=method: (
            seen.setdefault(method, []).append(x.shape[0]), original(x))[1])
    predictions, spreads = model.predict(big), model.predict_distribution(big)
    assert seen == {method: [_MIN_CHUNK_ROWS] * 11 + [184] for method in ("predict", "predict_distribution")}
    np.testing.assert_array_equal(predictions, model.predict(X)[np.arange(3000) % 300])
    for name, values in spreads.items():
        np.testing.assert_array_equal(values, model.predict_distribution(X)[name][np.arange(3000) % 300])


def test_class_predictions_are_reduced_chunk_by_chunk_to_the_most_probable_labels(monkeypatch):
    """predict keeps each chunk's labels only (never the whole logit matrix): they are the
    labels of predict_proba's largest column, across chunks, for text labels and multilabel."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(300, 400))
    y = np.array([f"class {i}" for i in range(3)])[np.argsort(X[:, :3], axis=1)[:, -1]]
    model = MoEClassifier(**dict(FAST, max_epochs=2)).fit(X, y)
    big = X[np.arange(3000) % 300]  # 12 chunks at this width
    forwarded = []
    forward = model._forward
    monkeypatch.setattr(model, "_forward", lambda *args, **kwargs: forwarded.append(forward(*args, **kwargs))
                        or forwarded[-1])
    labels = model.predict(big)
    assert [(out.shape, out.dtype) for out in forwarded] == [((3000,), np.int64)]  # class indices, no logits
    monkeypatch.undo()
    assert labels.dtype == model.classes_.dtype
    np.testing.assert_array_equal(labels, model.classes_[np.argmax(model.predict_proba(big), axis=1)])
    assert len(set(labels)) > 1
    indicator = (X[:, :3] > 0).astype(int)
    multilabel = MoEClassifier(**dict(FAST, max_epochs=2)).fit(X, indicator)
    flags = multilabel.predict(big)
    assert flags.dtype == np.int64
    np.testing.assert_array_equal(flags, (multilabel.predict_proba(big) > 0.5).astype(np.int64))


# ---------------------------------------------------------------------------- reproducibility


def test_same_random_state_gives_identical_predictions(fitted):
    model, X, y = fitted
    again = clone(model).fit(X, y)
    assert again.n_iter_ == model.n_iter_
    np.testing.assert_array_equal(again.predict(X), model.predict(X))
    np.testing.assert_array_equal(again.route(X), model.route(X))
    if isinstance(model, MoEClassifier):
        np.testing.assert_array_equal(again.predict_proba(X), model.predict_proba(X))


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_a_fit_under_a_disabled_autograd_trains_the_same_model(fitted, grad_mode):
    # As in a user's evaluation loop; continued fits (partial_fit, warm_start) too.
    model, X, y = fitted
    model = clone(model).set_params(max_epochs=2, warm_start=True)

    first_call = {"classes": np.unique(y)} if isinstance(model, MoEClassifier) else {}

    def fit_twice():
        return (clone(model).fit(X, y).fit(X, y).predict(X),
                clone(model).partial_fit(X, y, **first_call).partial_fit(X, y).predict(X))

    expected = fit_twice()
    with grad_mode():
        got = fit_twice()
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_different_random_state_gives_different_weights(estimator_class):
    X, y = _data_for(estimator_class, n=120)
    params = dict(SHORT, max_epochs=2, early_stopping=False)

    def parameters(seed):
        module = estimator_class(**dict(params, random_state=seed)).fit(X, y).module_
        return dict(module.named_parameters())  # buffers (e.g. a zero selection bias) excluded

    seed0, seed0_again, seed1 = parameters(0), parameters(0), parameters(1)
    assert seed0.keys() == seed1.keys() == seed0_again.keys()
    for name in seed0:
        assert torch.equal(seed0[name], seed0_again[name]), name
        # Every parameter tensor is randomly initialised, so each one should differ.
        assert not torch.equal(seed0[name], seed1[name]), name


# ---------------------------------------------------------------------------- regressor targets


def test_regressor_1d_target_gives_1d_predictions(fitted_regressor):
    model, X, _ = fitted_regressor
    pred = model.predict(X)
    assert pred.shape == (len(X),)
    assert pred.dtype == np.float64


def test_regressor_column_target_gives_column_predictions(regression_data, fast_params):
    X, y = regression_data
    model = MoERegressor(**dict(fast_params, max_epochs=5)).fit(X, y.reshape(-1, 1))
    pred = model.predict(X)
    assert pred.shape == (len(X), 1)
    assert pred.dtype == np.float64


def test_regressor_multi_output_fits_easy_linear_problem():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 4))
    W = rng.normal(size=(4, 3))
    Y = X @ W + np.array([10.0, -5.0, 0.0]) + 0.05 * rng.normal(size=(200, 3))
    Y[:, 1] *= 100  # targets on very different scales
    model = MoERegressor(**FAST).fit(X, Y)
    pred = model.predict(X)
    assert pred.shape == (200, 3)
    assert pred.dtype == np.float64
    assert model.score(X, Y) > 0.8
    for j in range(3):
        assert r2_score(Y[:, j], pred[:, j]) > 0.8, f"target {j}"


# ---------------------------------------------------------------------------- classifier labels


def _blobs(labels, n_per_class=60, seed=0):
    """Well separated Gaussian blobs, one per label, rows shuffled."""
    rng = np.random.RandomState(seed)
    centres = rng.normal(size=(len(labels), 3)) * 6
    X = np.concatenate([c + rng.normal(size=(n_per_class, 3)) * 0.5 for c in centres])
    y = np.repeat(np.asarray(labels), n_per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


@pytest.mark.parametrize(
    "labels",
    [
        ["yes", "no"],
        [1, -1],
        ["zebra", "apple", "mango"],
        [9, 2, 5],
    ],
    ids=["binary-str", "binary-int", "3class-str", "3class-int"],
)
def test_classifier_labels_and_probabilities(labels):
    X, y = _blobs(labels)
    model = MoEClassifier(**FAST).fit(X, y)
    np.testing.assert_array_equal(model.classes_, np.sort(labels))
    assert model.classes_.dtype.kind == np.asarray(labels).dtype.kind

    proba = model.predict_proba(X)
    assert proba.shape == (len(X), len(labels))
    assert proba.dtype == np.float64
    assert np.all(proba >= 0)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-10)
    np.testing.assert_allclose(np.exp(model.predict_log_proba(X)), proba, rtol=1e-10, atol=1e-12)
    # computed in place, as scipy's softmax computes it
    np.testing.assert_array_equal(proba, scipy.special.softmax(model._raw_output(X), axis=1))

    pred = model.predict(X)
    assert pred.shape == (len(X),)
    assert set(np.unique(pred)) <= set(model.classes_)
    np.testing.assert_array_equal(pred, model.classes_[proba.argmax(axis=1)])

    # Columns follow classes_: the column of each row's true class carries its probability.
    true_column = np.searchsorted(model.classes_, y)
    assert proba[np.arange(len(y)), true_column].mean() > 0.8
    assert model.score(X, y) > 0.9


def test_classifier_good_score_on_fixture_data(fitted_classifier):
    model, X, y = fitted_classifier
    np.testing.assert_array_equal(model.classes_, ["no", "yes"])
    assert model.score(X, y) > 0.8


# ---------------------------------------------------------------------------- sample weights


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_unit_and_constant_sample_weights_change_nothing(estimator_class):
    X, y = _data_for(estimator_class)
    unweighted = estimator_class(**SHORT).fit(X, y)
    ones = estimator_class(**SHORT).fit(X, y, sample_weight=np.ones(len(y)))
    threes = estimator_class(**SHORT).fit(X, y, sample_weight=np.full(len(y), 3.0))

    expected = _predictions(unweighted, X)
    for name, values in _predictions(ones, X).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    for name, values in _predictions(threes, X).items():
        if values.dtype.kind in "fc":
            np.testing.assert_allclose(values, expected[name], rtol=1e-6, atol=1e-9, err_msg=name)
        else:
            np.testing.assert_array_equal(values, expected[name], err_msg=name)


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_early_stopping_holds_out_rows_of_positive_weight(estimator_class):
    """With most weights 0, a validation set of weightless rows would score 0 at every epoch
    and stop training at the first; they stay in training."""
    X, y = _data_for(estimator_class)
    weight = np.zeros(len(y))
    weight[::8] = 1.0  # 25 rows: 2 held out
    model = estimator_class(**dict(SHORT, max_epochs=2)).fit(X, y, sample_weight=weight)
    assert (model.history_["valid_loss"] > 0).all()
    table = TensorTable(torch.zeros(len(y), 1), torch.zeros(len(y)), torch.as_tensor(weight))
    targets = np.arange(len(y)) % 2
    for seed in range(5):
        train, valid = model._split(table, targets, seed)
        assert len(valid) == 2 and len(train) == len(y) - 2
        assert (valid.sample_weight > 0).all() and train.sample_weight.sum() == weight.sum() - 2


def test_a_class_of_one_row_stays_in_training_and_the_others_are_stratified():
    X, y = _classification()
    y = y.astype(object)
    y[5] = "rare"
    model = MoEClassifier(**dict(SHORT, max_epochs=1)).fit(X, y)
    targets = np.searchsorted(model.classes_, y)
    for seed in range(5):
        order = model._split_order(targets, 20, np.random.RandomState(seed))
        assert sorted(order) == list(range(len(y))) and 5 not in order[:20]
        valid_share = np.mean(y[order[:20]] == "yes")
        assert abs(valid_share - np.mean(y == "yes")) <= 1 / 20


def test_a_class_of_one_row_stays_in_training_beside_a_single_other_class():
    X = np.random.RandomState(0).normal(size=(60, 2))
    y = np.array(["no"] * 59 + ["yes"])
    model = MoEClassifier(**dict(SHORT, max_epochs=1)).fit(X, y)
    targets = np.searchsorted(model.classes_, y)
    for seed in range(20):
        order = model._split_order(targets, 6, np.random.RandomState(seed))
        assert sorted(order) == list(range(60)) and 59 not in order[:6]


def _conflicting_groups(n=200, seed=0):
    """Two groups with the same feature distribution and contradictory targets."""
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 3))
    X[:, 0] += np.sign(X[:, 0])  # a clear gap between x0 < 0 and x0 > 0
    in_b = rng.permutation(np.arange(n) % 2 == 1)
    return X, in_b


def test_upweighted_group_pulls_regression_predictions():
    X, in_b = _conflicting_groups()
    right = X[:, 0] > 0
    # Group B's target is +10 on the right and -10 on the left, group A's the opposite; the
    # features cannot tell the groups apart, and the weighted target mean is about 0 either way,
    # so only the weighted loss can move the predictions to the heavy group's targets.
    y = np.where(in_b, 10.0, -10.0) * np.where(right, 1.0, -1.0)
    heavy_b = MoERegressor(**FAST).fit(X, y, sample_weight=np.where(in_b, 50.0, 1.0))
    heavy_a = MoERegressor(**FAST).fit(X, y, sample_weight=np.where(in_b, 1.0, 50.0))
    pred_b, pred_a = heavy_b.predict(X), heavy_a.predict(X)
    # Unweighted, the best prediction is 0 everywhere; weighted, it is +-10 * 49/51.
    assert pred_b[right].mean() > 5.0 and pred_b[~right].mean() < -5.0
    assert pred_a[right].mean() < -5.0 and pred_a[~right].mean() > 5.0


def test_upweighted_class_pulls_classifier_predictions():
    X, in_b = _conflicting_groups()
    y = np.where(in_b, "b", "a")
    heavy_b = MoEClassifier(**FAST).fit(X, y, sample_weight=np.where(in_b, 20.0, 1.0))
    heavy_a = MoEClassifier(**FAST).fit(X, y, sample_weight=np.where(in_b, 1.0, 20.0))
    assert heavy_b.predict_proba(X)[:, 1].mean() > 0.8
    assert heavy_a.predict_proba(X)[:, 0].mean() > 0.8
    assert np.mean(heavy_b.predict(X) == "b") > 0.9
    assert np.mean(heavy_a.predict(X) == "a") > 0.9


# ---------------------------------------------------------------------------- fitted attributes


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_a_fit_sets_exactly_the_declared_fitted_attributes(estimator_class):
    X, y = _data_for(estimator_class, n=80)
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])
    model = estimator_class(**dict(FAST, max_epochs=2))
    before = set(vars(model))
    model.fit(frame, y)
    assert set(vars(model)) - before == set(estimator_class._fitted_attributes)
    model._clear_fitted_state()
    assert set(vars(model)) == before


def test_fitted_attributes(fitted):
    model, X, _ = fitted
    assert isinstance(model.n_iter_, int)
    assert 1 <= model.n_iter_ <= model.max_epochs

    history = model.history_
    assert isinstance(history, pd.DataFrame)
    assert len(history) == model.n_iter_
    for column in HISTORY_COLUMNS:
        assert column in history.columns, column
        assert np.all(np.isfinite(history[column].to_numpy(dtype=float))), column
    assert np.all(history["load_imbalance"] >= 1.0 - 1e-9)
    assert np.all(history["load_imbalance"] <= model.n_experts + 1e-9)

    load = model.expert_load_
    assert load.shape == (model.n_experts,)
    assert np.all(load >= 0)
    np.testing.assert_allclose(load.sum(), 1.0, rtol=1e-9)

    gates = model.route(X)
    assert gates.shape == (len(X), model.n_experts)
    assert np.all(gates >= 0)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-5)
    # The default router is dense: every expert weighs in on every row.
    np.testing.assert_array_equal((gates > 0).sum(axis=1), model.n_experts)

    assert isinstance(model.module_, MixtureOfExperts)
    assert model.module_.n_experts == model.n_experts
    assert model.n_features_in_ == X.shape[1]


@pytest.mark.parametrize("top_k", [1, 3])
def test_route_has_top_k_nonzeros(top_k):
    X, y = _regression(n=120)
    model = MoERegressor(**dict(SHORT, max_epochs=2, top_k=top_k, router="topk")).fit(X, y)
    gates = model.route(X)
    np.testing.assert_array_equal((gates > 0).sum(axis=1), top_k)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-5)
    # For sparse routing expert_load_ is the share of routing assignments.
    counts = (gates > 0).sum(axis=0)
    np.testing.assert_allclose(model.expert_load_, counts / counts.sum(), rtol=1e-9)


def test_softmax_router_routes_to_every_expert():
    X, y = _regression(n=120)
    model = MoERegressor(**dict(SHORT, max_epochs=2, router="softmax")).fit(X, y)
    gates = model.route(X)
    assert gates.shape == (len(X), model.n_experts)
    assert np.all(gates > 0)
    np.testing.assert_allclose(gates.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(model.expert_load_, gates.mean(axis=0), rtol=1e-6)


# ---------------------------------------------------------------------------- early stopping


def test_early_stopping_stops_before_max_epochs(regression_data, fast_params):
    X, y = regression_data
    model = MoERegressor(**dict(fast_params, max_epochs=1000, n_iter_no_change=3, tol=1e-2)).fit(X, y)
    assert model.n_iter_ < 1000
    assert len(model.history_) == model.n_iter_
    assert "valid_loss" in model.history_.columns
    assert np.all(np.isfinite(model.history_["valid_loss"]))


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_no_validation_loss_without_early_stopping(estimator_class):
    X, y = _data_for(estimator_class)
    model = estimator_class(**dict(SHORT, max_epochs=3, early_stopping=False)).fit(X, y)
    assert "valid_loss" not in model.history_.columns
    assert "train_loss" in model.history_.columns
    assert model.n_iter_ == 3


def test_validation_fraction_0_trains_on_every_row_and_stops_on_the_training_loss(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(SHORT, max_epochs=200, n_iter_no_change=2, tol=0.5, validation_fraction=0.0))
    model.fit(X, y)
    assert "valid_loss" not in model.history_.columns
    assert model.n_iter_ < 200  # early stopping on the training loss
    assert (model.history_["train_batch_count"] == -(-len(X) // SHORT["batch_size"])).all()  # no row held out


# ---------------------------------------------------------------------------- warm start


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_warm_start_continues_training(estimator_class):
    X, y = _data_for(estimator_class)
    model = estimator_class(**dict(FAST, warm_start=True, max_epochs=15)).fit(X, y)
    first_fit_start = model.history_["train_loss"].iloc[0]
    first_fit_end = model.history_["train_loss"].iloc[-1]
    assert first_fit_end < 0.7 * first_fit_start  # the first fit did learn something

    model.fit(X, y)
    second_fit_start = model.history_["train_loss"].iloc[0]
    assert second_fit_start < 0.5 * first_fit_start

    # Without warm_start a second fit starts afresh.
    cold = estimator_class(**dict(FAST, max_epochs=15)).fit(X, y)
    cold.fit(X, y)
    np.testing.assert_allclose(cold.history_["train_loss"].iloc[0], first_fit_start, rtol=1e-6)


def test_a_warm_start_fit_predicts_in_the_shape_of_its_own_y(regression_data):
    """One target given as (n,) or (n, 1): predictions follow the latest fit's y, as after
    a cold fit, in both directions."""
    X, y = regression_data
    model = MoERegressor(**dict(SHORT, max_epochs=1, warm_start=True)).fit(X, y)
    assert model.predict(X).shape == (len(y),)
    assert model.fit(X, y[:, None]).predict(X).shape == (len(y), 1)
    assert model.fit(X, y).predict(X).shape == (len(y),)


def test_warm_start_with_different_number_of_features_raises(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(SHORT, max_epochs=2, warm_start=True)).fit(X, y)
    before = model.predict(X)
    with pytest.raises(ValueError, match="features"):
        model.fit(X[:, :3], y)
    # The fitted model is untouched by the rejected fit.
    np.testing.assert_array_equal(model.predict(X), before)


def test_warm_start_takes_the_new_hyperparameters_that_keep_the_weights(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(SHORT, max_epochs=2, warm_start=True, router="softmax")).fit(X, y)
    weights = {name: tensor.clone() for name, tensor in model.module_.state_dict().items()}
    model.set_params(router="topk", dropout=0.3, max_epochs=1, learning_rate=1e-12)
    model.fit(X, y)
    assert type(model.module_.router).__name__ == "TopKRouter" and model.module_.experts.dropout == 0.3
    # A learning rate of 1e-12: the weights are the first fit's, carried over.
    for name, tensor in model.module_.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=1e-9, msg=name)


def test_a_continued_fit_without_annealing_runs_at_the_temperature_parameter(regression_data):
    # The temperature is saved with the weights (annealing changes it); a continued fit
    # must not silently keep the fitted one when the parameter says otherwise.
    X, y = regression_data
    model = MoERegressor(**dict(SHORT, max_epochs=3, warm_start=True, early_stopping=False, temperature=2.0,
                                temperature_final=0.1)).fit(X, y)
    assert float(model.module_.router.temperature) == pytest.approx(0.1)
    model.set_params(temperature_final=None, max_epochs=1).fit(X, y)
    assert float(model.module_.router.temperature) == 2.0
    model.set_params(temperature=0.5).partial_fit(X, y)
    assert float(model.module_.router.temperature) == 0.5
    sharper = model.route(X).max(axis=1).mean()
    model.set_params(temperature=5.0, learning_rate=1e-12).fit(X, y)
    assert model.route(X).max(axis=1).mean() < sharper  # the routing itself follows


@pytest.mark.parametrize("change", [dict(n_experts=3), dict(expert_hidden=(8,)), dict(expert_type="independent"),
                                    dict(output="mixture_density")], ids=lambda change: next(iter(change)))
def test_warm_start_refuses_a_change_of_the_networks_shape(regression_data, change):
    X, y = regression_data
    model = MoERegressor(**dict(SHORT, max_epochs=2, warm_start=True, expert_type="adapter")).fit(X, y)
    before = model.predict(X)
    with pytest.raises(ValueError, match="partial_fit.: the hyperparameters now describe another network"):
        model.set_params(**change).fit(X, y)
    # The fitted model is untouched by the rejected fit.
    np.testing.assert_array_equal(model.predict(X), before)


def test_warm_start_classifier_rejects_new_classes(classification_data):
    X, y = classification_data
    model = MoEClassifier(**dict(SHORT, max_epochs=2, warm_start=True)).fit(X, y)
    y_new = np.where(np.arange(len(y)) < 20, "maybe", y)
    with pytest.raises(ValueError, match="maybe"):
        model.fit(X, y_new)


@pytest.mark.parametrize("labels_shape", [(120, 3), (120, 2, 1)], ids=["multiclass-multioutput", "3-d"])
def test_classifier_with_several_multiclass_labels_per_row_says_how_to_fit_them(classification_data, labels_shape):
    # (A 0/1 indicator matrix is a multilabel target, which fits: tests/test_multilabel.py.)
    X, y = classification_data
    Y = np.random.RandomState(0).randint(0, 3, size=labels_shape)
    model = MoEClassifier(**dict(SHORT, max_epochs=2))
    with pytest.raises(ValueError, match=r"one label per row.*multilabel indicator matrix.*got y of shape "
                                         + re.escape(str(labels_shape)) + ".*MultiOutputClassifier"):
        model.fit(X[:120], Y)
    assert not hasattr(model, "classes_")
    model.fit(X, y)
    with pytest.raises(ValueError, match="MultiOutputClassifier"):
        model.score(X[:120], Y)


def test_classifier_accepts_a_column_vector_of_labels(classification_data):
    X, y = classification_data
    with pytest.warns(sklearn.exceptions.DataConversionWarning, match="column-vector y") as caught:
        column = MoEClassifier(**dict(SHORT, max_epochs=2)).fit(X, y.reshape(-1, 1))
    assert caught[0].filename == __file__  # said of the line that called fit
    flat = MoEClassifier(**dict(SHORT, max_epochs=2)).fit(X, y)
    np.testing.assert_array_equal(column.predict_proba(X), flat.predict_proba(X))


# ---------------------------------------------------------------------------- verbosity


def test_verbose_prints_progress(capsys):
    X, y = _regression(n=100)
    MoERegressor(**dict(SHORT, max_epochs=2, verbose=1)).fit(X, y)
    captured = capsys.readouterr()
    assert "epoch   2  loss " in captured.out


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_silent_by_default(estimator_class, capsys):
    X, y = _data_for(estimator_class, n=100)
    # Quick to stop early, so that the early-stopping message would have been printed too.
    model = estimator_class(**dict(FAST, verbose=0, n_iter_no_change=2, tol=0.1)).fit(X, y)
    assert model.n_iter_ < model.max_epochs
    model.predict(X)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ""


# ---------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_fit_predict_on_cuda(estimator_class):
    X, y = _data_for(estimator_class)
    model = estimator_class(**dict(SHORT, device="cuda")).fit(X, y)
    assert model.module_.router.gate.weight.device.type == "cuda"
    pred = model.predict(X)
    assert pred.shape == (len(X),)
    gates = model.route(X)
    assert gates.shape == (len(X), model.n_experts)
    assert np.all(np.isfinite(gates))
    if estimator_class is MoERegressor:
        assert np.all(np.isfinite(pred))
    else:
        proba = model.predict_proba(X)
        assert np.all(np.isfinite(proba))
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
        assert set(np.unique(pred)) <= set(model.classes_)

    restored = pickle.loads(pickle.dumps(model))
    expected = _predictions(model, X)
    for name, values in _predictions(restored, X).items():
        np.testing.assert_array_equal(values, expected[name], err_msg=name)


def test_aux_free_balancing_trains_the_selection_bias():
    X, y = _regression()
    model = MoERegressor(**dict(FAST, router="topk", balance_loss="aux_free", max_epochs=5)).fit(X, y)
    bias = model.module_.router.selection_bias
    assert bias.abs().sum() > 0
    assert (model.history_["balance_loss"] == 0).all()  # a bias update, not a loss


# ---------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_bf16_precision_trains_and_predicts_in_float64(estimator_class):
    X, y = _data_for(estimator_class)
    model = estimator_class(**dict(SHORT, precision="bf16")).fit(X, y)
    reference = estimator_class(**SHORT).fit(X, y)
    assert all(p.dtype == torch.float32 for p in model.module_.parameters())
    pred = model.predict(X)
    assert pred.dtype == reference.predict(X).dtype
    if estimator_class is MoERegressor:
        assert np.isfinite(pred).all()
        assert model.score(X, y) > reference.score(X, y) - 0.1  # bf16 rounding, not a different model
    else:
        np.testing.assert_allclose(model.predict_proba(X).sum(axis=1), 1.0, rtol=1e-6)
        assert model.score(X, y) > reference.score(X, y) - 0.1


def test_unknown_precision_is_rejected():
    X, y = _data_for(MoERegressor)
    with pytest.raises(ValueError, match="precision"):
        MoERegressor(**dict(SHORT, precision="fp8")).fit(X, y)


# ---------------------------------------------------------------------------- label smoothing


def test_label_smoothing_is_the_cross_entropy_against_smoothed_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    target = torch.tensor([0, 1])
    smoothed = torch.full((2, 3), 0.3 / 3) + 0.7 * torch.nn.functional.one_hot(target, 3)
    expected = -(smoothed * torch.log_softmax(logits, dim=1)).sum(dim=1)
    loss = MoEClassifier(label_smoothing=0.3)._criterion()(logits, target)
    torch.testing.assert_close(loss, expected)


def test_label_smoothing_makes_probabilities_less_confident(classification_data):
    X, y = classification_data
    params = dict(FAST, max_epochs=60, early_stopping=False, random_state=0)
    sharp = MoEClassifier(**params).fit(X, y).predict_proba(X).max(axis=1)
    smooth_model = MoEClassifier(**params, label_smoothing=0.4).fit(X, y)
    smooth = smooth_model.predict_proba(X).max(axis=1)
    # the smoothed target puts 0.6 + 0.4 / 2 = 0.8 on the true class: the loss's optimum
    assert smooth.max() < 0.9 < sharp.max()
    assert smooth_model.score(X, y) > 0.8


def test_label_smoothing_belongs_to_the_classifier_only():
    assert MoEClassifier().get_params()["label_smoothing"] == 0.0
    assert clone(MoEClassifier(label_smoothing=0.2)).label_smoothing == 0.2
    assert "label_smoothing" not in MoERegressor().get_params()
    with pytest.raises(TypeError, match="label_smoothing"):
        MoERegressor(label_smoothing=0.1)
    X, y = np.arange(20.0).reshape(10, 2), np.arange(10) % 2
    for bad in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="'label_smoothing' parameter of MoEClassifier"):
            MoEClassifier(label_smoothing=bad, max_epochs=1).fit(X, y)


@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_sample_weight_reaches_fit_through_metadata_routing(estimator_class):
    X, y = _data_for(estimator_class, n=120)
    weights = np.random.RandomState(2).uniform(0.1, 3.0, len(y))
    params = dict(FAST, max_epochs=3)
    with sklearn.config_context(enable_metadata_routing=True):
        routed = Pipeline([
            ("scale", StandardScaler().set_fit_request(sample_weight=False)),
            ("moe", estimator_class(**params).set_fit_request(sample_weight=True)),
        ]).fit(X, y, sample_weight=weights)
    X_scaled = routed["scale"].transform(X)
    expected = estimator_class(**params).fit(X_scaled, y, sample_weight=weights)
    np.testing.assert_array_equal(routed["moe"].predict(X_scaled), expected.predict(X_scaled))
    np.testing.assert_array_equal(routed["moe"].route(X_scaled), expected.route(X_scaled))
    unweighted = estimator_class(**params).fit(X_scaled, y)
    assert not np.array_equal(unweighted.route(X_scaled), expected.route(X_scaled))  # the weights matter


@pytest.mark.slow
@pytest.mark.parametrize("expert_type", ["adapter", "independent"])
@pytest.mark.parametrize("router", ["softmax", "topk", "noisy_topk", "switch", "top_p", "uniform"])
@pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)
def test_scikit_learn_subset_invariance_for_ten_seeds(estimator_class, router, expert_type):
    # scikit-learn's own check, at its own tolerance (rtol and atol 1e-7), on fits of the
    # default model: rows predicted in batches of 10 and all 20 at once agree.
    for seed in range(10):
        model = estimator_class(router=router, expert_type=expert_type, max_epochs=10, random_state=seed,
                                device="cpu")
        check_methods_subset_invariance(estimator_class.__name__, model)
