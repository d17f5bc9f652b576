"""Bad input and bad hyperparameters get a clear error."""

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.exceptions import NotFittedError

import sklearn_moe
from sklearn_moe import MoEClassifier, MoERegressor

from .conftest import FAST

TINY = dict(FAST, max_epochs=1)
ESTIMATORS = [MoERegressor, MoEClassifier]
by_name = pytest.mark.parametrize("estimator_class", ESTIMATORS, ids=lambda c: c.__name__)


PREDICT_METHODS = {
    MoERegressor: ["predict", "route", "score"],
    MoEClassifier: ["predict", "predict_proba", "predict_log_proba", "route", "score"],
}
# (estimator class, prediction method taking only X)
X_METHODS = [(cls, m) for cls, methods in PREDICT_METHODS.items() for m in methods if m != "score"]
by_method = pytest.mark.parametrize(
    ("estimator_class", "method"), X_METHODS, ids=[f"{cls.__name__}.{m}" for cls, m in X_METHODS]
)


def _data(estimator_class, n=100, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 3))
    if estimator_class is MoERegressor:
        return X, X[:, 0] - X[:, 1]
    return X, np.where(X[:, 0] > 0, "pos", "neg")


@pytest.fixture(scope="module")
def fitted_models():
    models = {}
    for estimator_class in ESTIMATORS:
        X, y = _data(estimator_class)
        models[estimator_class] = estimator_class(**TINY).fit(X, y)
    return models


def _with_value(X, value, row=3, col=1):
    X = X.copy()
    X[row, col] = value
    return X


# ---------------------------------------------------------------------------- non-finite values


@by_name
@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "Input X contains NaN"), (np.inf, "Input X contains infinity"), (-np.inf, "Input X contains infinity")],
    ids=["nan", "inf", "-inf"],
)
def test_non_finite_X_in_fit(estimator_class, value, message):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match=message):
        estimator_class(**TINY, handle_missing="error").fit(_with_value(X, value), y)


@by_method
@pytest.mark.parametrize(
    ("value", "message"),
    [(np.nan, "Input X contains NaN"), (np.inf, "Input X contains infinity")],
    ids=["nan", "inf"],
)
def test_non_finite_X_in_predict(fitted_models, estimator_class, method, value, message):
    model = copy.deepcopy(fitted_models[estimator_class]).set_params(handle_missing="error")
    X, _ = _data(estimator_class)
    with pytest.raises(ValueError, match=message):
        getattr(model, method)(_with_value(X, value))


@pytest.mark.parametrize("value,message", [(np.nan, "Input y contains NaN"), (np.inf, "Input y contains infinity")])
def test_non_finite_y_regressor(value, message):
    X, y = _data(MoERegressor)
    y = y.copy()
    y[5] = value
    with pytest.raises(ValueError, match=message):
        MoERegressor(**TINY).fit(X, y)


def test_nan_in_y_classifier():
    X, _ = _data(MoEClassifier)
    y = np.where(X[:, 0] > 0, 1.0, 0.0)
    y[5] = np.nan
    with pytest.raises(ValueError, match="Input y contains NaN"):
        MoEClassifier(**TINY).fit(X, y)


# ---------------------------------------------------------------------------- shapes


@by_method
def test_wrong_number_of_features_at_predict(fitted_models, estimator_class, method):
    model = fitted_models[estimator_class]
    X, _ = _data(estimator_class)
    with pytest.raises(ValueError, match=r"X has 2 features, but \w+ is expecting 3 features"):
        getattr(model, method)(X[:, :2])
    with pytest.raises(ValueError, match=r"X has 4 features, but \w+ is expecting 3 features"):
        getattr(model, method)(np.hstack([X, X[:, :1]]))


@by_name
def test_empty_X_in_fit(estimator_class):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        estimator_class(**TINY).fit(X[:0], y[:0])


@by_name
def test_empty_X_in_predict(fitted_models, estimator_class):
    X, _ = _data(estimator_class)
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        fitted_models[estimator_class].predict(X[:0])


@by_name
def test_1d_X_in_fit(estimator_class):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        estimator_class(**TINY).fit(X[:, 0], y)


@by_name
def test_1d_X_in_predict(fitted_models, estimator_class):
    X, _ = _data(estimator_class)
    with pytest.raises(ValueError, match="Expected 2D array, got 1D array"):
        fitted_models[estimator_class].predict(X[0])


@by_name
def test_y_of_wrong_length(estimator_class):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        estimator_class(**TINY).fit(X, y[:-1])


# ---------------------------------------------------------------------------- strings and classes


def _frame_with_strings(n=100, seed=0):
    rng = np.random.RandomState(seed)
    return pd.DataFrame({
        "age": rng.normal(size=n),
        "city": rng.choice(["Paris", "Oslo"], size=n),
        "income": rng.normal(size=n),
    })


@by_name
def test_string_column_without_encoder_in_fit(estimator_class):
    frame = _frame_with_strings()
    _, y = _data(estimator_class)
    with pytest.raises(ValueError, match="ColumnTransformer") as excinfo:
        estimator_class(**TINY, categorical_features=None).fit(frame, y)
    message = str(excinfo.value)
    assert "'city'" in message
    assert "'age'" not in message and "'income'" not in message


@by_name
def test_string_column_without_encoder_in_predict(estimator_class):
    frame = _frame_with_strings()
    _, y = _data(estimator_class)
    model = estimator_class(**TINY).fit(frame.drop(columns="city").assign(city=0.0), y)
    # What to do with a fitted model's input: the values, not the model's encoding.
    first = frame["city"].iloc[0]
    message = (rf"^Column\(s\) 'city' of X held numbers in fit and now hold text: 'city' holds '{first}' in row "
               rf"0\. .*pd\.to_numeric\(X\['city'\], errors='coerce'\).*categorical_features\.$")
    with pytest.raises(ValueError, match=message):
        model.predict(frame[["age", "income", "city"]])
    with pytest.raises(ValueError, match=message):
        model.partial_fit(frame[["age", "income", "city"]], y)
    # An array's columns by position; the first text found, with its row.
    values = frame[["age", "income", "city"]].to_numpy()
    values[0, 2] = 7.0
    array_model = estimator_class(**TINY).fit(np.column_stack([values[:, :2].astype(float), np.zeros(len(y))]), y)
    with pytest.raises(ValueError, match=r"^Column\(s\) 2 of X held numbers in fit.* 2 holds '\w+' in row 1\. "
                                         r".*pd\.to_numeric\(X\[:, 2\], errors"):
        array_model.predict(values)
    # Beside categorical columns (the encoded path), the same.
    encoded = estimator_class(**TINY).fit(frame, y)
    unknown = frame.astype({"income": object})
    unknown.loc[unknown.index[1], "income"] = "unknown"
    with pytest.raises(ValueError, match=r"^Column\(s\) 'income' of X held numbers in fit.* 'unknown' in row 1\. "):
        encoded.predict(unknown)


def test_the_text_named_in_a_fitted_models_error_is_the_first_value_that_is_no_number():
    """Text that float() reads ("NaN", " 2 ") is not what fails; the message names '?'."""
    X = pd.DataFrame({"a": [0.5, 1.5, 2.0, 3.0] * 10, "b": np.arange(40.0)})
    model = MoERegressor(**TINY).fit(X, X["b"])
    new = X.head(4).astype({"a": object})
    new["a"] = ["NaN", " 2 ", "?", "n/a"]
    with pytest.raises(ValueError, match=r"'a' holds '\?' in row 2\."):
        model.predict(new)


# Columns that scikit-learn's own conversion fails on in ways its message does not name.
UNCONVERTED_TABLES = {
    "text column of no value": pd.DataFrame({"age": np.arange(6.0), "note": pd.array([None] * 6, dtype="string")}),
    "nullable integers beside text": pd.DataFrame({"n": pd.array([1, None, 3, 4, 5, 6], dtype="Int64"),
                                                   "city": pd.Series(list("abcabc")).astype("category")}),
}


@by_name
@pytest.mark.parametrize("name", list(UNCONVERTED_TABLES))
def test_unconverted_columns_are_named_whatever_failed_in_the_conversion(estimator_class, name):
    frame = UNCONVERTED_TABLES[name]
    y = np.arange(6.0) if estimator_class is MoERegressor else np.array(["a", "b"] * 3)
    column = frame.columns[1]
    # (a TypeError where the conversion's was one, as scikit-learn's checks expect)
    with pytest.raises((TypeError, ValueError), match=f"Column\\(s\\) '{column}' of X are neither numeric nor marked "
                                         "categorical.*categorical_features"):
        estimator_class(**TINY, categorical_features=None, handle_missing="error").fit(frame, y)


def test_numbers_written_as_text_are_named_and_pd_to_numeric_suggested():
    frame = pd.DataFrame({"n": pd.array(["1", "2", "3"] * 2, dtype="string"), "note": list("abcabc")})
    with pytest.raises(ValueError, match=r"'n', 'note' .*'n' holds '1' as text \(dtype string\): pd.to_numeric"):
        MoERegressor(**TINY, categorical_features=None).fit(frame, np.arange(6.0))


@by_name
def test_pd_na_in_an_object_array_is_a_missing_value(estimator_class):
    X, y = _data(estimator_class)
    X = X.astype(object)
    X[0, 0], X[1, 1] = pd.NA, None
    model = estimator_class(**TINY).fit(X, y)
    assert model._table_missing.tolist() == [0, 1]


@by_name
def test_pd_na_in_an_object_array_at_prediction_reads_as_none(estimator_class):
    X, y = _data(estimator_class)
    model = estimator_class(**TINY).fit(X, y)
    with_na, with_none = X[:5].astype(object), X[:5].astype(object)
    with_na[0, 1], with_none[0, 1] = pd.NA, None
    np.testing.assert_array_equal(model.predict(with_na), model.predict(with_none))
    with pytest.raises(ValueError, match="NaN"):
        estimator_class(**TINY, handle_missing="error").fit(X, y).predict(with_na)


@pytest.mark.parametrize("param", ["n_experts", "top_k", "max_epochs", "batch_size", "learning_rate", "weight_decay"])
def test_a_bool_for_a_number_is_refused_by_name(param):
    X, y = _data(MoERegressor)
    with pytest.raises(ValueError, match=f"The '{param}' parameter of MoERegressor is a number; got the bool True"):
        MoERegressor(**TINY).set_params(**{param: True}).fit(X, y)


@by_name
def test_a_table_of_no_column_is_refused_as_such(estimator_class):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match=r"0 feature\(s\) \(shape=\(100, 0\)\) while a minimum of 1 is required"):
        estimator_class(**TINY).fit(pd.DataFrame(index=range(100)), y)


def test_a_text_column_of_an_object_array_is_named_by_its_index():
    X = np.array([[1.0, "Paris"], [2.0, "Oslo"]] * 5, dtype=object)
    with pytest.raises(ValueError, match=r"Column\(s\) 1 of X .*\(1 holds 'Paris'\)"):
        MoERegressor(**TINY, categorical_features=None).fit(X, np.arange(10.0))


@pytest.mark.parametrize("y", [np.array(list("abcdef")), np.array(["1", "2", "x", "4", "5", "6"], dtype=object)],
                         ids=["str", "object"])
def test_a_regressors_text_target_is_named_as_the_target(y):
    X = np.random.RandomState(0).normal(size=(6, 2))
    text = "a" if y[0] == "a" else "x"
    with pytest.raises(ValueError, match=f"MoERegressor needs a numeric target y, but y holds '{text}'.*MoEClassifier"):
        MoERegressor(**TINY).fit(X, y)


@pytest.mark.parametrize(
    "y",
    [np.array(["only"] * 100), np.zeros(100, dtype=int)],
    ids=["str", "int"],
)
def test_classifier_with_one_class(y):
    X, _ = _data(MoEClassifier)
    with pytest.raises(ValueError, match="class") as excinfo:
        MoEClassifier(**TINY).fit(X, y)
    assert "one class" in str(excinfo.value)


def test_classifier_with_continuous_target():
    X, _ = _data(MoEClassifier)
    with pytest.raises(ValueError, match="Unknown label type"):
        MoEClassifier(**TINY).fit(X, X[:, 0])


def test_classifier_with_one_positively_weighted_class():
    X, y = _data(MoEClassifier)
    with pytest.raises(ValueError, match="class") as excinfo:
        MoEClassifier(**TINY).fit(X, y, sample_weight=(y == "pos").astype(float))
    assert "sample_weight" in str(excinfo.value)


# ---------------------------------------------------------------------------- sample weights


@by_name
@pytest.mark.parametrize("bad,message", [
    (-1.0, "Negative values in data passed to `sample_weight`"),
    (np.nan, "sample_weight contains NaN"),
])
def test_bad_sample_weight_value(estimator_class, bad, message):
    X, y = _data(estimator_class)
    weights = np.ones(len(y))
    weights[7] = bad
    with pytest.raises(ValueError, match=message):
        estimator_class(**TINY).fit(X, y, sample_weight=weights)


@by_name
def test_all_zero_sample_weight(estimator_class):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match=r"(?i)sample.?weights? must contain at least one (non-zero|positive)"):
        estimator_class(**TINY).fit(X, y, sample_weight=np.zeros(len(y)))


@by_name
def test_sample_weight_of_wrong_length(estimator_class):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match=r"sample_weight\.shape == \(99,\), expected \(100,\)"):
        estimator_class(**TINY).fit(X, y, sample_weight=np.ones(len(y) - 1))


# ---------------------------------------------------------------------------- not fitted


ALL_METHODS = [(cls, m) for cls, methods in PREDICT_METHODS.items() for m in methods]


@pytest.mark.parametrize(
    ("estimator_class", "method"), ALL_METHODS, ids=[f"{cls.__name__}.{m}" for cls, m in ALL_METHODS]
)
def test_predict_before_fit(estimator_class, method):
    model = estimator_class(**TINY)
    X, y = _data(estimator_class)
    args = (X, y) if method == "score" else (X,)
    with pytest.raises(NotFittedError, match="not fitted yet"):
        getattr(model, method)(*args)


@by_name
def test_module_before_fit(estimator_class):
    # module_ is a property over net_; unfitted it must not look like a fitted attribute.
    with pytest.raises(AttributeError):
        estimator_class(**TINY).module_  # noqa: B018


# ---------------------------------------------------------------------------- hyperparameters

ACTIVATIONS = ["relu", "gelu", "silu", "tanh", "leaky_relu", "elu"]

# (parameter, bad value, substrings that state the allowed values)
BAD_HYPERPARAMETERS = [
    ("n_experts", 0, ["[1, inf)"]),
    ("n_experts", 2.5, ["int"]),
    ("top_k", 0, ["[1, inf)"]),
    ("router", "nope", ["'topk'", "'softmax'"]),
    ("temperature", 0, ["[1.1754943508222875e-38, 3.4028234663852886e+38]"]),
    ("temperature", -1.0, ["[1.1754943508222875e-38, 3.4028234663852886e+38]"]),
    ("capacity_factor", 0.5, ["None", "[1.0, inf)"]),
    ("balance_loss", "nope", ["'switch'", "None"]),
    ("expert_hidden", (0,), ["positive ints"]),
    ("gate_hidden", (0,), ["positive ints"]),
    ("gate_hidden", 8, ["tuple", "list"]),
    ("expert_dropout", 1.0, ["[0.0, 1.0)"]),
    ("expert_hidden", ("a",), ["positive ints"]),
    ("expert_hidden", (16, -3), ["positive ints"]),
    ("expert_hidden", 16, ["tuple", "list"]),
    ("activation", "nope", [f"'{name}'" for name in ACTIVATIONS]),
    ("dropout", 1.0, ["[0.0, 1.0)"]),
    ("dropout", -0.1, ["[0.0, 1.0)"]),
    ("batch_size", 0, ["[1, inf)"]),
    ("learning_rate", 0, ["(0.0, inf)"]),
    ("validation_fraction", 1.0, ["[0.0, 1.0)"]),
    ("validation_fraction", -0.1, ["[0.0, 1.0)"]),
    ("max_epochs", 0, ["[1, inf)"]),
    ("n_iter_no_change", 0, ["[1, inf)"]),
    ("weight_decay", -1.0, ["[0.0, inf)"]),
    ("max_grad_norm", 0.0, ["None", "(0.0, inf)"]),
    ("device", "tpu", ["'cpu'", "'cuda'", "'auto'"]),
]


@by_name
@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    BAD_HYPERPARAMETERS,
    ids=[f"{name}={value!r}" for name, value, _ in BAD_HYPERPARAMETERS],
)
def test_invalid_hyperparameter(estimator_class, name, value, allowed):
    X, y = _data(estimator_class)
    model = estimator_class(**dict(TINY, **{name: value}))
    with pytest.raises(ValueError, match=re.escape(f"'{name}' parameter of {estimator_class.__name__}")) as excinfo:
        model.fit(X, y)
    message = str(excinfo.value)
    for text in allowed:
        assert text in message, f"{text!r} not in {message!r}"
    assert f"Got {value!r}" in message
    assert not model.__sklearn_is_fitted__()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@by_name
def test_cuda_requested_without_cuda(estimator_class):
    X, y = _data(estimator_class)
    with pytest.raises(ValueError, match="CUDA is not available") as excinfo:
        estimator_class(**dict(TINY, device="cuda")).fit(X, y)
    assert "device='cpu'" in str(excinfo.value)


@by_name
@pytest.mark.parametrize("n_experts", [1, 3])
def test_top_k_above_n_experts_means_every_expert(estimator_class, n_experts):
    # top_k is "at most top_k experts": n_experts=1 (the non-MoE ablation) works with the
    # default top_k=2, and so does a grid over n_experts with a fixed top_k.
    X, y = _data(estimator_class)
    model = estimator_class(**dict(TINY, n_experts=n_experts, top_k=n_experts + 1)).fit(X, y)
    gates = model.route(X)
    assert gates.shape == (len(X), n_experts)
    assert (np.count_nonzero(gates, axis=1) == n_experts).all()


@by_name
def test_router_topk_accepts_top_k_equal_to_n_experts(estimator_class):
    # The boundary of the top_k <= n_experts check is allowed.
    X, y = _data(estimator_class)
    model = estimator_class(**dict(TINY, n_experts=3, top_k=3)).fit(X, y)
    assert model.route(X).shape == (len(X), 3)


# ---------------------------------------------------------------------------- failed fits


@by_name
def test_failed_fit_leaves_estimator_unfitted(estimator_class):
    X, y = _data(estimator_class)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    model = estimator_class(**TINY, handle_missing="error").fit(frame, y)
    model.predict(frame)
    with pytest.raises(ValueError, match="Input X contains NaN"):
        model.fit(_with_value(X, np.nan), y)
    with pytest.raises(NotFittedError):
        model.predict(X)
    for attribute in ("net_", "n_iter_", "history_", "expert_load_", "n_features_in_", "feature_names_in_"):
        assert not hasattr(model, attribute), attribute
    if estimator_class is MoEClassifier:
        assert not hasattr(model, "classes_")
    # And a later good fit works again.
    model.fit(X, y)
    assert model.predict(X).shape == (len(X),)


@by_name
def test_fit_failing_on_hyperparameter_leaves_estimator_unfitted(estimator_class):
    X, y = _data(estimator_class)
    model = estimator_class(**TINY).fit(X, y)
    model.set_params(top_k=0)
    with pytest.raises(ValueError, match="'top_k' parameter"):
        model.fit(X, y)
    with pytest.raises(NotFittedError):
        model.predict(X)


# ---------------------------------------------------------------------------- issue 5: every kind of input


def test_non_finite_error_names_the_dataframe_columns():
    X, y = _data(MoERegressor)
    frame = pd.DataFrame(X, columns=["age", "income", "height"])
    frame.loc[4, "income"] = np.nan
    frame.loc[7, "height"] = np.inf
    with pytest.raises(ValueError, match=r"NaN in column\(s\) 'income': set handle_missing='native'.*SimpleImputer"
                                         r".* infinity in column\(s\) 'height'; replace it with a finite value\.$"):
        MoERegressor(**TINY, handle_missing="error").fit(frame, y)
    # NaN is a missing value, infinity is not: only the infinity is named, without advice to set what is set
    message = r"^Input X contains infinity in column\(s\) 'height'; replace it with a finite value or NaN"
    with pytest.raises(ValueError, match=message) as raised:
        MoERegressor(**TINY).fit(frame, y)
    assert "income" not in str(raised.value) and "handle_missing" not in str(raised.value)
    # the same from the array path (no table encoding: every column numeric, none missing)
    with pytest.raises(ValueError, match=message):
        MoERegressor(**TINY).fit(frame.fillna(0.0), y)


@by_method
def test_non_finite_error_names_the_column_index_at_predict(fitted_models, estimator_class, method):
    X, _ = _data(estimator_class)
    with pytest.raises(ValueError, match=r"Input X contains NaN.*column\(s\) 2\b"):
        getattr(copy.deepcopy(fitted_models[estimator_class]).set_params(handle_missing="error"), method)(
            _with_value(X, np.nan, col=2))


@by_name
def test_wrong_feature_names_at_predict(estimator_class):
    X, y = _data(estimator_class)
    model = estimator_class(**TINY).fit(pd.DataFrame(X, columns=["a", "b", "c"]), y)
    with pytest.raises(ValueError, match="feature names should match"):
        model.predict(pd.DataFrame(X, columns=["a", "b", "z"]))


def test_unseen_classes_in_score_are_named(fitted_models):
    model = fitted_models[MoEClassifier]
    X, y = _data(MoEClassifier)
    y = y.astype(object)
    y[:3] = "maybe"
    with pytest.raises(ValueError, match=r"label\(s\) \['maybe'\] not seen in fit"):
        model.score(X, y)
    assert 0 <= model.score(*_data(MoEClassifier)) <= 1


@pytest.mark.parametrize("missing", [None, np.nan, pd.NA])
def test_missing_labels_in_score_are_named_as_missing(fitted_models, missing):
    """They were called unseen labels ('[nan] not seen in fit'), or None failed a sort."""
    model = fitted_models[MoEClassifier]
    X, y = _data(MoEClassifier)
    y = pd.Series(y, dtype="string" if missing is pd.NA else object)
    y[4] = missing
    with pytest.raises(ValueError, match=r"y has 1 missing label\(s\) \(NaN, None or pd.NA\), the first in row 4"):
        model.score(X, y)


@by_name
def test_sparse_input_is_densified_with_a_warning_in_fit(estimator_class):
    import scipy.sparse as sp
    from sklearn.exceptions import DataConversionWarning

    X, y = _data(estimator_class)
    X_sparse = sp.csr_matrix(np.where(np.abs(X) > 1, X, 0.0))
    size = rf"{X.shape[0]} x {X.shape[1]}, {X.size * 8 / 2**20:.1f} MiB as float64"  # the array it makes
    with pytest.warns(DataConversionWarning, match=rf"densified \({size}\)"):
        sparse_model = estimator_class(**TINY).fit(X_sparse, y)
    dense_model = estimator_class(**TINY).fit(X_sparse.toarray(), y)
    np.testing.assert_array_equal(sparse_model.predict(X_sparse), dense_model.predict(X_sparse.toarray()))


@by_name
def test_missing_values_in_sparse_input_are_encoded_as_in_dense_input(estimator_class):
    import scipy.sparse as sp
    from sklearn.exceptions import DataConversionWarning

    X, y = _data(estimator_class)
    X = X.copy()
    X[np.random.RandomState(0).uniform(size=X.shape) < 0.1] = np.nan
    with pytest.warns(DataConversionWarning, match="densified") as caught:
        sparse_model = estimator_class(**TINY).fit(sp.csr_matrix(X), y)
    assert caught[0].filename == __file__  # said of the caller's line
    dense_model = estimator_class(**TINY).fit(X, y)
    np.testing.assert_array_equal(sparse_model.predict(sp.csr_matrix(X)), dense_model.predict(X))
    with pytest.raises(ValueError, match=r"Input X contains NaN in column\(s\) 0, 1, 2: set handle_missing='native'"):
        estimator_class(**TINY, handle_missing="error").fit(sp.csr_matrix(X), y)


def test_too_large_sparse_input_is_rejected(monkeypatch):
    import scipy.sparse as sp

    import sklearn_moe._validation as validation

    monkeypatch.setattr(validation, "_MAX_DENSE_CELLS", 100)
    X, y = _data(MoERegressor)
    with pytest.raises(ValueError, match="too large to densify"):
        MoERegressor(**TINY).fit(sp.csr_matrix(X), y)


DTYPES = [np.bool_, np.int8, np.int64, np.uint16, np.float16, np.float32, np.float64]


@by_name
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_numeric_dtype_of_X(estimator_class, dtype):
    X, y = _data(estimator_class)
    X = (X > 0) if dtype is np.bool_ else (X * 10).astype(dtype)
    model = estimator_class(**TINY).fit(X, y)
    expected = estimator_class(**TINY).fit(X.astype(np.float64), y).predict(X.astype(np.float64))
    np.testing.assert_array_equal(model.predict(X), expected)


@by_name
def test_read_only_and_non_contiguous_arrays(estimator_class):
    X, y = _data(estimator_class)
    wide = np.repeat(X, 2, axis=1)
    strided = wide[:, ::2]  # non-contiguous view equal to X
    assert not strided.flags.c_contiguous
    read_only_X, read_only_y = X.copy(), y.copy()
    read_only_X.flags.writeable = False
    read_only_y.flags.writeable = False
    reference = estimator_class(**TINY).fit(X, y).predict(X)
    np.testing.assert_array_equal(estimator_class(**TINY).fit(strided, y).predict(strided), reference)
    np.testing.assert_array_equal(
        estimator_class(**TINY).fit(read_only_X, read_only_y).predict(read_only_X), reference)
    np.testing.assert_array_equal(estimator_class(**TINY).fit(np.asfortranarray(X), y).predict(X), reference)


@by_name
@pytest.mark.parametrize("n_samples", [1, 2, 5])
def test_fewer_samples_than_the_batch_and_the_validation_split_need(estimator_class, n_samples):
    X, y = _data(estimator_class, n=40)
    if estimator_class is MoEClassifier:
        y = np.array(["neg", "pos"] * 20)
    if n_samples == 1 and estimator_class is MoEClassifier:
        with pytest.raises(ValueError, match="at least 2 classes"):
            estimator_class(**TINY).fit(X[:1], y[:1])
        return
    model = estimator_class(**dict(TINY, batch_size=256)).fit(X[:n_samples], y[:n_samples])
    assert "valid_loss" not in model.history_  # too few rows for an internal validation split
    assert np.isfinite(model.predict(X)).all() if estimator_class is MoERegressor else True
    assert model.predict(X[:1]).shape == (1,)


def test_constant_features_and_constant_target():
    X, _ = _data(MoERegressor)
    X[:, 1] = 7.0
    model = MoERegressor(**TINY).fit(X, np.full(len(X), 3.5))
    np.testing.assert_array_equal(model.predict(X), 3.5)
    constant_X = np.ones((50, 3))
    assert np.isfinite(MoERegressor(**TINY).fit(constant_X, np.arange(50.0)).predict(constant_X)).all()


@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier])
@pytest.mark.parametrize("embedding", ["piecewise_linear", None])
def test_a_column_constant_in_fit_is_ignored_whatever_it_later_holds(estimator_class, embedding, tmp_path):
    """A flag never set in the training rows (or a column all one value there) carries
    nothing the model learned; the network never saw it vary, so its later values must not
    move the predictions, as they do not move a tree's."""
    X, y = _data(estimator_class)
    frame = pd.DataFrame(X).assign(flag=0.0, kind=np.where(np.arange(len(X)) % 2, "a", "b"))
    frame.columns = frame.columns.astype(str)
    model = estimator_class(**dict(FAST, max_epochs=3, numeric_embedding=embedding)).fit(frame, y)
    # The flag, and the indicator of a missing kind (none in fit)
    assert np.isinf(model._x_scale).sum() == 2
    model.save(tmp_path / "model.moe")
    loaded = sklearn_moe.load(tmp_path / "model.moe")
    method = "predict" if estimator_class is MoERegressor else "predict_proba"
    expected = getattr(model, method)(frame)
    for value in (1.0, -250.0, 1e12, np.nan):
        np.testing.assert_array_equal(getattr(model, method)(frame.assign(flag=value)), expected)
        np.testing.assert_array_equal(getattr(loaded, method)(frame.assign(flag=value)), expected)
    # A missing kind, unseen in fit, is an unseen category.
    np.testing.assert_array_equal(getattr(model, method)(frame.assign(kind=None)),
                                  getattr(model, method)(frame.assign(kind="c")))
    # partial_fit's first call keeps such a column: its later calls may vary it.
    first_call = {"classes": np.unique(y)} if estimator_class is MoEClassifier else {}
    assert np.isfinite(estimator_class(**FAST).partial_fit(frame, y, **first_call)._x_scale).all()


@pytest.mark.parametrize("magnitude", [1e-30, 1e30, 1e300])
def test_extreme_magnitudes_are_handled_by_the_internal_scaling(magnitude):
    """Scaling X and y by a huge or tiny constant gives the same fit, scaled."""
    X, y = _data(MoERegressor)
    reference = MoERegressor(**TINY).fit(X, y).predict(X)
    scaled = MoERegressor(**TINY).fit(X * magnitude, y * magnitude).predict(X * magnitude)
    assert np.isfinite(scaled).all()
    np.testing.assert_allclose(scaled / magnitude, reference, rtol=1e-4, atol=1e-4)


def test_a_large_offset_on_a_varying_target_or_column_is_scaled_away():
    """A target or column far from 0 with a small spread (1e13 + N(0, 1)) varies: its spread
    is the signal, not rounding noise. Shifting X and y gives the same scales and as good a fit."""
    X, y = _data(MoERegressor)
    reference = MoERegressor(**FAST).fit(X, y).score(X, y)
    model = MoERegressor(**FAST).fit(X + 1e10, y + 1e13)
    assert model._y_scale[0] == pytest.approx(np.std(y), rel=1e-3)
    np.testing.assert_allclose(model._x_scale, MoERegressor(**FAST).fit(X, y)._x_scale, rtol=1e-3)
    assert model.score(X + 1e10, y + 1e13) == pytest.approx(reference, abs=0.05)


def test_outliers_of_1e30_in_X_do_not_break_the_fit():
    X, y = _data(MoERegressor)
    X = _with_value(X, 1e30)
    model = MoERegressor(**FAST).fit(X, y)
    assert np.isfinite(model.predict(X)).all()
    assert model.score(X, y) > 0.9


def test_values_beyond_the_float32_range_are_scaled_before_the_cast():
    X, y = _data(MoERegressor)
    X[:, 2] *= 1e39  # float32 tops out at 3.4e38
    model = MoERegressor(**TINY).fit(X, y)
    assert np.isfinite(model.predict(X)).all()
    np.testing.assert_array_equal(model.predict(X), MoERegressor(**TINY).fit(X / 1e39, y).predict(X / 1e39))


def test_huge_target_on_a_zero_weight_row_does_not_break_training():
    """Found by the property tests: 0 * inf in the float32 loss was nan."""
    X, y = _data(MoERegressor)
    y = y.copy()
    y[0] = 3e38
    weights = np.ones(len(y))
    weights[0] = 0.0
    model = MoERegressor(**TINY).fit(X, y, sample_weight=weights)
    reference = MoERegressor(**TINY).fit(X, np.where(weights > 0, y, 0.0), sample_weight=weights)
    np.testing.assert_allclose(model.predict(X), reference.predict(X), rtol=1e-9)


@pytest.mark.parametrize("scale", [5e-324, 1e-300, 1e300])
def test_only_relative_sample_weights_matter(scale):
    """Found by the property tests: subnormal weights underflowed to a zero mean."""
    X, y = _data(MoERegressor)
    weights = np.random.RandomState(0).uniform(size=len(y)) > 0.3
    model = MoERegressor(**TINY).fit(X, y, sample_weight=weights * scale)
    reference = MoERegressor(**TINY).fit(X, y, sample_weight=weights.astype(float))
    np.testing.assert_array_equal(model.predict(X), reference.predict(X))
