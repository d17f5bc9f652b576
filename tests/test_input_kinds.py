"""Input kinds beyond numbers, strings and categories: numbers stored as objects, other
libraries' dataframes, complex numbers, dates at prediction, and missing values in a
continued fit."""

import datetime
import re
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

from sklearn_moe import MoEClassifier, MoERegressor
from sklearn_moe._tabular import encoded_names

from .conftest import FAST

TINY = dict(FAST, max_epochs=2)


def numbers_and_city(n=120, seed=0):
    rng = np.random.RandomState(seed)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n),
                          "city": rng.choice(["Oslo", "Lima"], n)})
    return frame, frame["a"].to_numpy() + 3 * frame["b"].to_numpy() + (frame["city"] == "Lima")


@pytest.mark.parametrize("as_object", [lambda v: Decimal(f"{v:.6f}"), float], ids=["Decimal", "float"])
def test_an_object_column_of_numbers_is_numeric(as_object):
    """As pd.read_sql gives a NUMERIC column: as categories, new rows' values would be unseen."""
    frame, y = numbers_and_city()
    stored = frame.assign(b=pd.Series([as_object(v) for v in frame["b"]], dtype=object))
    stored.loc[3, "b"] = None
    model = MoERegressor(**TINY).fit(stored, y)
    assert encoded_names(model)[:3] == ["a", "b", "b (missing)"]
    plain = MoERegressor(**TINY).fit(frame.assign(b=stored["b"].astype(float)), y)
    np.testing.assert_array_equal(model.predict(stored), plain.predict(frame.assign(b=stored["b"].astype(float))))


def test_an_object_column_of_numbers_and_text_stays_categorical():
    frame, y = numbers_and_city()
    mixed = frame.assign(b=pd.Series([1, "two", 3.0] * 40, dtype=object))
    assert "b=two" in encoded_names(MoERegressor(**TINY).fit(mixed, y))


def test_an_object_column_of_whole_numbers_stays_categorical():
    """astype(object) of integer codes marks them categorical; a text value later is an
    unseen category, not an error."""
    frame, y = numbers_and_city()
    codes = frame.assign(store=pd.Series(np.arange(len(frame)) % 3 + 101, dtype=object))
    model = MoERegressor(**TINY).fit(codes, y)
    assert [name for name in encoded_names(model) if name.startswith("store")][:3] == [
        "store=101", "store=102", "store=103"]
    assert np.isfinite(model.predict(codes.assign(store="N/A"))).all()


def test_decimals_beside_floats_or_ints_are_numeric():
    frame, y = numbers_and_city()
    mixed = [Decimal(f"{v:.6f}") if i % 2 else (float(v) if i % 4 == 1 else 0) for i, v in enumerate(frame["b"])]
    model = MoERegressor(**TINY).fit(frame.assign(b=pd.Series(mixed, dtype=object)), y)
    assert encoded_names(model)[:2] == ["a", "b"]


@pytest.mark.parametrize("missing", [pd.NA, None, np.nan])
@pytest.mark.parametrize("stored", [float, lambda v: Decimal(f"{v:.6f}")], ids=["float", "Decimal"])
def test_a_missing_value_in_an_object_column_of_numbers_at_prediction_is_its_centre(stored, missing):
    frame, y = numbers_and_city()
    numbers = frame[["a", "b"]].assign(b=pd.Series([stored(v) for v in frame["b"]], dtype=object))
    model = MoERegressor(**TINY).fit(numbers, y)
    later = numbers.head(3).copy()
    later.loc[0, "b"] = missing
    centre = later.assign(b=[model._x_mean[1], later.loc[1, "b"], later.loc[2, "b"]])
    np.testing.assert_allclose(model.predict(later), model.predict(centre), rtol=1e-6)


@pytest.mark.parametrize("library", ["polars", "pyarrow"])
def test_other_libraries_dataframes_read_as_pandas(library):
    """Their string and bool columns are categorical and their names count, as pandas'."""
    module = pytest.importorskip(library)
    frame, y = numbers_and_city()
    frame = frame.assign(member=frame["a"] > 0)
    other = module.from_pandas(frame) if library == "polars" else module.Table.from_pandas(frame)
    reference = MoERegressor(**TINY).fit(frame, y)
    model = MoERegressor(**TINY).fit(other, y)
    assert model.feature_names_in_.tolist() == ["a", "b", "city", "member"]
    np.testing.assert_array_equal(model.predict(other), reference.predict(frame))
    np.testing.assert_array_equal(reference.route(other), reference.route(frame))
    named = MoERegressor(**TINY, categorical_features=["city", "member"]).fit(other, y)
    np.testing.assert_array_equal(named.predict(other), reference.predict(frame))


def test_a_polars_date_column_is_refused_as_a_pandas_one():
    pl = pytest.importorskip("polars")
    frame, y = numbers_and_city()
    dated = pl.from_pandas(frame.assign(day=pd.date_range("2020-01-01", periods=len(frame))))
    with pytest.raises(TypeError, match=r"'day' of X hold dates, times or durations"):
        MoERegressor(**TINY).fit(dated, y)


def test_a_lazy_frame_or_a_to_pandas_that_is_no_table_is_refused_clearly():
    pl = pytest.importorskip("polars")
    frame, y = numbers_and_city()
    with pytest.raises(TypeError, match=r"X is a lazy polars\..*LazyFrame: pass X.collect\(\)"):
        MoERegressor(**TINY).fit(pl.from_pandas(frame).lazy(), y)

    class SeriesMaker:
        columns = ["a"]

        def to_pandas(self):
            return frame["a"]

    with pytest.raises(TypeError, match=r"gave a Series from to_pandas\(\), not a DataFrame"):
        MoERegressor(**TINY).fit(SeriesMaker(), y)


def test_a_complex_target_is_named_as_the_target():
    frame, y = numbers_and_city()
    with pytest.raises(ValueError, match=r"^Complex data not supported: y holds complex numbers"):
        MoERegressor(**TINY).fit(frame[["a", "b"]], y + 1j)


@pytest.mark.parametrize("names", [[1, 0], [10, 20]])
def test_the_hint_for_a_text_column_of_a_frame_with_number_names_gives_its_position(names):
    frame, y = numbers_and_city()
    numbered = pd.DataFrame({names[0]: frame["a"], names[1]: frame["city"]})
    with pytest.raises(ValueError, match=r"e\.g\. categorical_features=\[1\]\)"):
        MoERegressor(**TINY, categorical_features=None).fit(numbered, y)
    assert np.isfinite(MoERegressor(**TINY, categorical_features=[1]).fit(numbered, y).predict(numbered)).all()


@pytest.mark.parametrize("columns", [["a", "z", "city"], ["a", "z"]], ids=["encoded", "plain"])
def test_complex_columns_are_refused_by_name(columns):
    frame, y = numbers_and_city()
    frame = frame.assign(z=frame["a"] + 1j)[columns]
    with pytest.raises(ValueError, match=r"^Complex data not supported: Column\(s\) 'z' of X hold complex"):
        MoERegressor(**TINY).fit(frame, y)
    model = MoERegressor(**TINY).fit(frame.assign(z=1.0), y)
    with pytest.raises(ValueError, match=r"Column\(s\) 'z' of X hold complex"):
        model.predict(frame)


def test_a_complex_sample_weight_is_refused_without_printing_it():
    weights = np.ones(50) + 1j
    with pytest.raises(ValueError, match=r"^Complex data not supported: sample_weight holds complex numbers; [^\n]*$"):
        MoERegressor(**TINY).fit(np.random.RandomState(0).normal(size=(50, 2)), np.arange(50.0), sample_weight=weights)


def test_a_complex_array_is_refused_without_printing_it():
    X = np.random.RandomState(0).normal(size=(50, 2)) + 1j
    with pytest.raises(ValueError, match=r"^Complex data not supported: X holds complex numbers\. [^\n]*$"):
        MoERegressor(**TINY).fit(X, np.arange(50.0))


@pytest.mark.parametrize("columns", [["a", "b", "city"], ["a", "b"], ["a"]], ids=["encoded", "plain", "one column"])
def test_dates_at_prediction_are_refused_as_in_fit(columns):
    frame, y = numbers_and_city()
    model = MoERegressor(**TINY).fit(frame[columns], y)
    for dates in (pd.date_range("2020-01-01", periods=len(frame)), pd.to_timedelta(np.arange(len(frame)), "h")):
        with pytest.raises(TypeError, match=r"Column\(s\) 'a' of X hold dates, times or durations"):
            model.predict(frame[columns].assign(a=dates))


def test_an_arrays_dates_and_durations_are_refused_as_a_tables_are():
    """A datetime64 or timedelta64 array would be read as counts of its unit, and dates as
    Python objects in an object array were 'neither numeric nor categorical'; both get the
    date error, naming the array's columns by position, in fit and at prediction."""
    rng = np.random.RandomState(0)
    numbers = rng.normal(size=(40, 2))
    day = np.datetime64("2020-01-01") + np.arange(40)
    objects = numbers.astype(object)
    objects[:, 1] = [datetime.date(2020, 1, 1) + datetime.timedelta(days=i) for i in range(40)]
    stamps = np.stack([day, day], axis=1)
    scalars = numbers.astype(object)
    scalars[:, 1] = list(day)  # np.datetime64 objects
    cases = [(stamps, "0, 1", "datetime64[D]"), ((day - day[0]).astype("m8[s]")[:, None], "0", "timedelta64[s]"),
             (objects, "1", "date objects"), (stamps.tolist(), "0, 1", "date objects"),  # nested lists
             (scalars, "1", "datetime64[s]")]
    model = MoERegressor(**TINY).fit(numbers, numbers[:, 0])
    for X, where, kind in cases:
        message = (rf"^Column\(s\) {where} of X hold dates, times or durations \({re.escape(kind)}\)"
                   rf".* pd\.Series\(X\[:, {where[0]}\]\)")
        with pytest.raises(TypeError, match=message):
            MoERegressor(**TINY).fit(X, numbers[:, 0])
        if np.shape(X)[1] == 2:
            with pytest.raises(TypeError, match=message):
                model.predict(X)
    # Beside a categorical column (the encoded path), the same words.
    with pytest.raises(TypeError, match=r"^Column\(s\) 1 of X hold dates.* pd\.Series\(X\[:, 1\]\)"):
        MoERegressor(**TINY, categorical_features=[0]).fit(stamps, numbers[:, 0])
    # Named as categories, as the message offers, they fit.
    dates = MoERegressor(**TINY, categorical_features=[0, 1]).fit(stamps, numbers[:, 0])
    assert np.isfinite(dates.predict(stamps)).all()


def test_period_columns_are_dates():
    frame, y = numbers_and_city()
    frame = frame.assign(month=pd.period_range("2010-01", periods=len(frame), freq="M"))
    with pytest.raises(TypeError, match=r"'month' of X hold dates, times or durations \(period\[M\]\).*\.dt\.year"):
        MoERegressor(**TINY).fit(frame, y)
    named = MoERegressor(**TINY, categorical_features=["city", "month"]).fit(frame, y)
    assert np.isfinite(named.predict(frame)).all()


def _python_objects(frame, kind):
    """Dates, times of day or durations as Python objects, as pd.read_sql gives SQL DATE,
    TIME and INTERVAL columns."""
    days = [datetime.timedelta(days=int(i)) for i in range(len(frame))]
    values = {"date": [datetime.date(2020, 1, 1) + day for day in days],
              "datetime": [datetime.datetime(2020, 1, 1) + day for day in days],
              "time": [datetime.time(i % 24) for i in range(len(frame))], "timedelta": days}[kind]
    return pd.Series(values, index=frame.index, dtype=object)


@pytest.mark.parametrize("kind", ["date", "datetime", "time", "timedelta"])
def test_dates_held_as_python_objects_are_dates(kind):
    """Not one category per day under from_dtype (every later date unseen), nor float()'s
    error under categorical_features=None or at prediction."""
    frame, y = numbers_and_city()
    stored = frame.assign(day=_python_objects(frame, kind))
    message = rf"Column\(s\) 'day' of X hold dates, times or durations \({kind} objects\).*pd\.to_datetime"
    for categorical_features in ("from_dtype", None):
        with pytest.raises(TypeError, match=message):
            MoERegressor(**TINY, categorical_features=categorical_features).fit(stored, y)
    numeric = MoERegressor(**TINY).fit(frame.assign(day=np.arange(len(frame), dtype=float)), y)
    with pytest.raises(TypeError, match=message):
        numeric.predict(stored)
    named = MoERegressor(**TINY, categorical_features=["city", "day"]).fit(stored, y)
    assert np.isfinite(named.predict(stored)).all()


@pytest.mark.parametrize("arrow_type", ["duration", "time64", "date32"])
def test_pyarrow_dates_times_and_durations_are_dates(arrow_type):
    pa = pytest.importorskip("pyarrow")
    frame, y = numbers_and_city()
    kind = {"duration": "timedelta", "time64": "time", "date32": "date"}[arrow_type]
    typed = {"duration": pa.duration("s"), "time64": pa.time64("us"), "date32": pa.date32()}[arrow_type]
    stored = frame.assign(day=pd.array(_python_objects(frame, kind).tolist(), dtype=pd.ArrowDtype(typed)))
    with pytest.raises(TypeError, match=rf"'day' of X hold dates, times or durations \({arrow_type}"):
        MoERegressor(**TINY).fit(stored, y)


@pytest.mark.parametrize("columns", [["a", "b", "city"], ["a", "b"]], ids=["encoded", "plain"])
def test_no_row_at_prediction_is_an_error_for_a_table_as_for_an_array(columns):
    frame, y = numbers_and_city()
    model = MoERegressor(**TINY).fit(frame[columns], y)
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\) \(shape=\(0, \d\)\)"):
        model.predict(frame[columns].iloc[:0])


@pytest.mark.parametrize("columns", [["a", "b", "city"], ["a", "b"]], ids=["encoded", "plain"])
@pytest.mark.parametrize("how", ["partial_fit", "warm_start"])
def test_a_continued_fit_reads_a_new_missing_value_as_prediction_does(columns, how):
    """A column complete in the first fit has no missing-value indicator: its NaN in a later
    batch is the column's centre, as at prediction, not an error."""
    frame, y = numbers_and_city()
    later = frame[columns].copy()
    later.loc[::3, "a"] = np.nan
    model = MoERegressor(**TINY, warm_start=how == "warm_start")
    if how == "partial_fit":
        model.partial_fit(frame[columns][:60], y[:60]).partial_fit(later[60:], y[60:])
    else:
        model.fit(frame[columns], y).fit(later, y)
    assert np.isfinite(model.predict(later)).all()
    strict = MoERegressor(**TINY, handle_missing="error").partial_fit(frame[columns][:60], y[:60])
    with pytest.raises(ValueError, match="NaN"):
        strict.partial_fit(later[60:], y[60:])


def test_a_continued_classifier_fit_reads_a_new_missing_value():
    X = np.random.RandomState(0).normal(size=(80, 3))
    labels = np.where(X[:, 0] > 0, "yes", "no")
    model = MoEClassifier(**TINY).partial_fit(X[:40], labels[:40], classes=["no", "yes"])
    X[50, 1] = np.nan
    model.partial_fit(X[40:], labels[40:])
    assert np.isfinite(model.predict_proba(X)).all()


def test_a_sparse_matrix_with_categorical_columns_named_is_encoded_as_the_dense_one():
    sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.RandomState(0)
    codes = rng.randint(0, 4, 200).astype(float)
    X = np.c_[codes, rng.normal(size=200)]
    y = np.array([0.0, 5.0, -3.0, 1.0])[codes.astype(int)] + X[:, 1]
    dense = MoERegressor(**TINY, categorical_features=[0]).fit(X, y)
    with pytest.warns(UserWarning, match="densified"):
        from_sparse = MoERegressor(**TINY, categorical_features=[0]).fit(sparse.csr_matrix(X), y)
    assert encoded_names(from_sparse) == encoded_names(dense) == ["x1", "x0=0", "x0=1", "x0=2", "x0=3", "x0 (missing)"]
    np.testing.assert_array_equal(from_sparse.predict(X), dense.predict(X))
    with pytest.raises(ValueError, match=r"categorical_features has column indices outside \[0, 2\): \[7\]"):
        MoERegressor(**TINY, categorical_features=[7]).fit(sparse.csr_matrix(X), y)


@pytest.mark.parametrize("view", [
    lambda X: X[::-1], lambda X: X[:, ::-1], lambda X: X.astype(">f8"), lambda X: X.astype(np.longdouble),
], ids=["rows reversed", "columns reversed", "big-endian", "longdouble"])
def test_large_arrays_torch_cannot_take_as_they_are_predict_as_their_copies(view):
    """Views with negative strides, other byte orders and float types that torch has no
    tensor of, at a size that the threaded scaling takes."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(10_000, 4))
    model = MoERegressor(**TINY).fit(X[:300], X[:300, 0])
    given = view(X)
    np.testing.assert_array_equal(model.predict(given), model.predict(np.array(given, dtype=np.float64)))
    assert np.isfinite(MoERegressor(**TINY).fit(given, X[:, 0]).predict(X[:5])).all()


@pytest.mark.parametrize("estimator", [MoERegressor, MoEClassifier])
def test_a_misspelt_parameter_names_the_estimator_and_the_parameters_spelt_alike(estimator):
    with pytest.raises(TypeError, match=rf"^{estimator.__name__}.__init__\(\) got an unexpected keyword argument "
                                        r"'n_expert'; did you mean 'n_experts'"):
        estimator(n_expert=3)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'\.$"):
        estimator(zzz=3)


def test_a_subclass_passing_parameters_on_takes_the_estimators_own():
    class WithExtra(MoERegressor):
        def __init__(self, extra=1, **params):
            super().__init__(**params)
            self.extra = extra

    assert WithExtra(n_experts=3).n_experts == 3
    with pytest.raises(TypeError, match=r"WithExtra.__init__\(\) got an unexpected keyword argument 'n_expert'; did "
                                        r"you mean 'n_experts'"):
        WithExtra(n_expert=3)
