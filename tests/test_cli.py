"""The ``sklearn-moe`` command line on CSV files: the console script as a subprocess, and
its ``main`` in this process where only the exit status and the messages are checked."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import r2_score

from sklearn_moe.cli import baselines

SCRIPT = shutil.which("sklearn-moe", path=str(Path(sys.executable).parent))
pytestmark = pytest.mark.skipif(SCRIPT is None, reason="the console script is not installed (pip install -e .)")


def run(*args, cwd):
    """The console script in a subprocess: for the tests of the installed command itself."""
    return subprocess.run([SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def run_main(*args, cwd):
    """``main`` in this process, in ``cwd``: what the console script runs, without the
    seconds of a new interpreter's imports. Returns what ``run`` does."""
    from sklearn_moe.cli import main

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main([str(arg) for arg in args])
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A raw table (a text column, missing values), a table to predict, and a fitted model."""
    path = tmp_path_factory.mktemp("cli")
    rng = np.random.RandomState(0)
    n = 120
    frame = pd.DataFrame({"a": rng.normal(size=n), "city": rng.choice(["x", "y", "z"], n), "b": rng.normal(size=n)})
    frame.loc[::7, "b"] = np.nan
    frame["price"] = frame["a"] * 2 + (frame["city"] == "x") + 0.1 * rng.normal(size=n)
    frame.to_csv(path / "train.csv", index=False)
    frame.drop(columns="price").head(6).assign(city=["x", "y", "new", None, "z", "x"]).to_csv(path / "new.csv",
                                                                                              index=False)
    frame.assign(label=np.where(frame["price"] > 0, "up", "down")).drop(columns="price").to_csv(
        path / "labels.csv", index=False)
    fitted = run("fit", "train.csv", "--target", "price", "--cv", "2", "--max-epochs", "3", "--out", "model",
                 cwd=path)
    assert fitted.returncode == 0, fitted.stderr
    return path, fitted


def test_version(tmp_path):
    import sklearn_moe

    result = run_main("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"sklearn-moe {sklearn_moe.__version__}"


def test_fit_prints_the_table_and_writes_the_model(workdir):
    path, fitted = workdir
    for model in ("moe", "hist_gradient_boosting", "ridge", "mlp"):
        assert model in fitted.stdout
    assert "2-fold cross-validation, regression" in fitted.stdout
    summary = json.loads((path / "model" / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["target"] == "price" and summary["columns"] == ["a", "city", "b"]
    assert {row["model"] for row in summary["cross_validation"]} == {"moe", "hist_gradient_boosting", "ridge", "mlp"}
    assert (path / "model" / "model.moe").is_file()
    assert "fold 1/2" in fitted.stderr  # progress


def test_predict_writes_csv_to_stdout(workdir):
    path, _ = workdir
    predicted = run_main("predict", "model", "new.csv", cwd=path)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.strip().splitlines()
    assert lines[0] == "prediction" and len(lines) == 7  # unseen and missing categories included
    assert np.isfinite([float(v) for v in lines[1:]]).all()
    # the training table, target column included: the target is left out
    assert run_main("predict", "model", "train.csv", cwd=path).returncode == 0


def test_info_prints_parameters_score_and_routing(workdir):
    path, _ = workdir
    info = run_main("info", "model", cwd=path)
    assert info.returncode == 0, info.stderr
    assert "MoERegressor: 3 input columns" in info.stdout and "2-fold R²: MoE" in info.stdout
    assert "routing: expert load" in info.stdout and "max_epochs=3" in info.stdout


def test_a_text_target_is_a_classification(workdir):
    path, _ = workdir
    fitted = run_main("fit", "labels.csv", "--target", "label", "--cv", "2", "--max-epochs", "2", "--out", "clf",
                      cwd=path)
    assert fitted.returncode == 0, fitted.stderr
    assert "classification (accuracy" in fitted.stdout and "logistic_regression" in fitted.stdout
    predicted = run_main("predict", "clf", "labels.csv", cwd=path).stdout.splitlines()
    assert predicted[0] == "prediction,probability_down,probability_up" and predicted[1].split(",")[0] in ("up", "down")


def test_class_labels_are_the_files_own_text(workdir, tmp_path):
    """pandas reads "010" as 10, and "01" and "1" as one class: the labels keep the file's
    text, and the cross-validated MoE learns them, not their codes, so a class_weight names
    them (it had failed: 'names class(es) ['01'] that are not in y; the classes are [0, 1,
    2]'). Labels that pandas reads as written stay its numbers."""
    from sklearn_moe import load

    path, _ = workdir
    table = pd.read_csv(path / "train.csv")
    price = table.pop("price")
    table.assign(label=np.where(price > 0.5, "010", np.where(price < -0.5, "01", "1"))).to_csv(
        tmp_path / "codes.csv", index=False)
    fitted = run_main("fit", "codes.csv", "--target", "label", "--task", "classification", "--cv", "2",
                      "--max-epochs", "2", "--param", "class_weight={'01': 3.0}", "--out", "codes", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    assert load(tmp_path / "codes" / "model.moe").classes_.tolist() == ["01", "010", "1"]
    predicted = pd.read_csv(io.StringIO(run_main("predict", "codes", "codes.csv", cwd=tmp_path).stdout), dtype=str)
    assert list(predicted.columns) == ["prediction", "probability_01", "probability_010", "probability_1"]
    assert set(predicted["prediction"]) <= {"01", "010", "1"}
    table.assign(label=np.where(price > 0, 1, 0)).to_csv(tmp_path / "ints.csv", index=False)
    fitted = run_main("fit", "ints.csv", "--target", "label", "--cv", "2", "--max-epochs", "2", "--out", "ints",
                      cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    classes = load(tmp_path / "ints" / "model.moe").classes_
    assert classes.dtype.kind == "i" and classes.tolist() == [0, 1]


def test_fit_sets_the_moes_parameters_from_param_options(workdir):
    path, _ = workdir
    fitted = run_main("fit", "train.csv", "--target", "price", "--cv", "2", "--max-epochs", "2", "--param",
                      "n_experts=2", "--param", "expert_hidden=[8]", "--param", "router=topk", "--param",
                      "temperature_final=None", "--out", "small", cwd=path)
    assert fitted.returncode == 0, fitted.stderr
    from sklearn_moe import load

    params = load(path / "small" / "model.moe").get_params()
    assert (params["n_experts"], params["expert_hidden"], params["router"]) == (2, (8,), "topk")
    assert params["max_epochs"] == 2 and params["temperature_final"] is None


def test_param_values_are_python_literals_else_json_else_text():
    from sklearn_moe.cli import InputError, parse_params

    assert parse_params(["n_experts=16", "expert_hidden=[64,64]", "gate_hidden=(32,)", "router=switch",
                         "layer_norm=true", "shared_expert=True", "temperature_final=None", "device='cuda'",
                         "learning_rate=1e-3"]) == {
        "n_experts": 16, "expert_hidden": (64, 64), "gate_hidden": (32,), "router": "switch", "layer_norm": True,
        "shared_expert": True, "temperature_final": None, "device": "cuda", "learning_rate": 1e-3}
    assert parse_params(None) == {}
    for bad in ("n_experts", "=4", "n experts=4"):
        with pytest.raises(InputError, match="NAME=VALUE"):
            parse_params([bad])


@pytest.mark.parametrize("values, task", [
    (["a", "b", "a"], "classification"), ([True, False, True], "classification"), ([0, 1, 1, 2], "classification"),
    ([0.0, 1.0, 1.0], "regression"), ([0.0, 0.5, 1.0], "regression"), (list(range(21)), "regression"),
])
def test_the_task_follows_the_targets_values(values, task):
    from sklearn_moe.cli import infer_task

    assert infer_task(pd.Series(values)) == task


def test_a_float_target_of_few_whole_numbers_is_a_regression_with_a_note(workdir, tmp_path):
    path, _ = workdir
    frame = pd.read_csv(path / "train.csv")
    frame.assign(flag=(frame["price"] > 0).astype(float)).drop(columns="price").to_csv(tmp_path / "flags.csv",
                                                                                     index=False)
    fitted = run_main("fit", "flags.csv", "--target", "flag", "--cv", "2", "--max-epochs", "1", "--out", "f",
                      cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    assert "regression (R²" in fitted.stdout
    assert ("note: the target 'flag' holds 2 distinct whole numbers as floats, fitted as a regression; --task "
            "classification fits them as classes") in fitted.stderr


ERRORS = [
    (("fit", "missing.csv", "--target", "price", "--out", "m"), 3, "no such file: missing.csv"),
    (("fit", "train.csv", "--target", "cost", "--out", "m"), 3, "unknown column 'cost'"),
    (("fit", "labels.csv", "--target", "label", "--task", "regression", "--out", "m"), 3, "is not numeric"),
    (("fit", "train.csv", "--target", "price", "--cv", "1", "--out", "m"), 2,
     "argument --cv: must be at least 2, got 1"),
    (("fit", "train.csv", "--target", "price", "--out", "new.csv"), 3, "--out new.csv is a file"),
    (("predict", "nowhere", "new.csv"), 3, "no model in nowhere: expected nowhere/model.moe (written by "
                                           "sklearn-moe fit) or a model file (written by model.save)"),
    (("predict", "broken", "new.csv"), 3, "unreadable model file"),
    (("info", "bad_summary"), 3, "unreadable summary bad_summary/summary.json"),
    (("fit", "train.csv", "--target", "price", "--ignore", "nope", "--out", "m"), 3,
     "--ignore names unknown column(s) ['nope']"),
    (("fit", "train.csv", "--target", "price", "--ignore", "a", "price", "--out", "m"), 3,
     "--ignore names the target 'price'"),
    (("info", "no_task"), 3, "no_task/summary.json lacks ['task']"),
    (("predict", "model", "lacking.csv"), 3, "lacks the model's column(s) ['city']"),
    (("predict", "model", "wrong_types.csv"), 3, "cannot predict on wrong_types.csv: Column(s) 'a' of X held "
                                                 "numbers in fit and now hold text: 'a' holds 'many' in row 3."),
    (("fit", "target_only.csv", "--target", "price", "--out", "m"), 3, "no column besides the target 'price'"),
    (("fit", "train.csv", "--target", "price", "--cv", "500", "--out", "m"), 3,
     "--cv must be at most the number of rows (120); got 500"),
    (("fit", "train.csv", "--target", "price", "--param", "n_experts", "--out", "m"), 3,
     "--param takes NAME=VALUE (e.g. n_experts=4); got 'n_experts'"),
    (("fit", "train.csv", "--target", "price", "--param", "experts=4", "--param", "hidden=[8]", "--out", "m"), 3,
     "--param names no parameter of MoERegressor: experts, hidden"),
    (("fit", "train.csv", "--target", "price", "--param", "n_experts=0", "--out", "m"), 3,
     "The 'n_experts' parameter of MoERegressor must be"),
    (("fit", "train.csv", "--target", "price", "--max-epochs", "0", "--out", "m"), 2,
     "argument --max-epochs: must be at least 1, got 0"),
    (("fit", "train.csv", "--target", "price", "--tune", "-1", "--out", "m"), 2, "argument --tune: must be at least 0"),
    (("fit", "train.csv"), 2, "the following arguments are required: --target, --out"),
    (("train",), 2, "invalid choice: 'train'"),
    (("fit", "extra_fields.csv", "--target", "price", "--out", "m"), 3,
     "cannot read extra_fields.csv: Error tokenizing data"),
    (("fit", "train.json", "--target", "price", "--out", "m"), 3,
     "cannot read train.json: .json files are not read here; give a CSV or parquet file"),
    (("fit", "placeholder_target.csv", "--target", "price", "--out", "m"), 3,
     "the target column 'price' holds numbers, but text in 2 row(s), such as '?' in row 3: give those rows a "
     "number or drop them (--na-values '?' reads such text as missing), or use --task classification"),
    (("fit", "placeholder_target.csv", "--target", "price", "--na-values", "?", "--out", "m"), 3,
     "the target column 'price' has 2 missing value(s), in row(s) 3, 6; drop those rows or fill them in"),
    (("fit", "train.csv", "--target", "price", "--out", "new.csv/m"), 3,
     "--out new.csv/m: new.csv is a file, so the directory cannot be made"),
    (("predict", "model", "new.csv", "--keep", "id"), 3, "--keep names unknown column(s) ['id']; the columns are"),
    (("fit", "grouped_target.csv", "--target", "price", "--out", "m"), 3,
     "the target column 'price' holds numbers written with separators, such as '1,"),
]
# Warnings a plain ``python`` run does not print (its default filters).
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture(scope="module")
def bad_inputs(workdir):
    path, _ = workdir
    (path / "broken").mkdir(exist_ok=True)
    (path / "broken" / "model.moe").write_text("not a model")
    for name, summary in (("bad_summary", "{not json"), ("no_task", json.dumps({"target": "price", "n_rows": 3}))):
        shutil.copytree(path / "model", path / name, dirs_exist_ok=True)
        (path / name / "summary.json").write_text(summary)
    pd.read_csv(path / "new.csv").drop(columns="city").to_csv(path / "lacking.csv", index=False)
    wrong_types = pd.read_csv(path / "new.csv").astype({"a": object})
    wrong_types.loc[2, "a"] = "many"  # the third row after the header
    wrong_types.to_csv(path / "wrong_types.csv", index=False)
    pd.read_csv(path / "train.csv")[["price"]].to_csv(path / "target_only.csv", index=False)
    (path / "extra_fields.csv").write_text("a,city,price\n1.0,x,2.0\n0.5,y,1.0,8,9\n")
    (path / "train.json").write_text(pd.read_csv(path / "train.csv").to_json())
    pd.read_csv(path / "train.csv").astype({"price": object}).assign(
        price=lambda t: t["price"].where(~t.index.isin([2, 5]), "?")).to_csv(path / "placeholder_target.csv",
                                                                         index=False)
    pd.read_csv(path / "train.csv").assign(price=lambda t: [f"{1000 + 100 * v:,.2f}" for v in t["price"]]).to_csv(
        path / "grouped_target.csv", index=False)
    return path


def _assert_reported(status, stderr, expected_status, message):
    assert status == expected_status
    assert message in stderr
    if expected_status == 3:
        assert stderr.count("\n") == 1 and stderr.startswith("sklearn-moe: error: ")


@pytest.mark.parametrize("args, status, message", ERRORS)
def test_errors_are_one_line_with_an_exit_status(bad_inputs, monkeypatch, capsys, args, status, message):
    from sklearn_moe.cli import main

    monkeypatch.chdir(bad_inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            returned = main(list(args))
        except SystemExit as exit_:  # argparse's errors
            returned = exit_.code
    _assert_reported(returned, capsys.readouterr().err, status, message)
    assert not [w for w in caught if not issubclass(w.category, HIDDEN_WARNINGS)]


@pytest.mark.parametrize("args, status, message", [ERRORS[5], ERRORS[-1]])
def test_the_console_script_reports_errors_the_same(bad_inputs, args, status, message):
    result = run(*args, cwd=bad_inputs)
    _assert_reported(result.returncode, result.stderr, status, message)


def test_csv_options_and_rows_ending_in_a_separator_are_read(workdir):
    """A European file (';' between fields, decimal commas) reads with --sep and --decimal;
    rows ending in one separator more than the header (as some exporters write them) keep
    their columns, where pandas' default made the first field the index and shifted every
    name one column left; R's row labels are dropped."""
    from argparse import Namespace

    from sklearn_moe.cli import csv_options, read_table

    path, _ = workdir
    table = pd.read_csv(path / "train.csv")
    table.to_csv(path / "european.csv", sep=";", decimal=",", index=False)
    options = csv_options(Namespace(sep=";", decimal=",", thousands=None, na_values=None))
    pd.testing.assert_frame_equal(read_table(path / "european.csv", options), table)
    lines = (path / "train.csv").read_text().splitlines()
    (path / "trailing.csv").write_text("\n".join([lines[0], *(line + "," for line in lines[1:])]) + "\n")
    pd.testing.assert_frame_equal(read_table(path / "trailing.csv"), table)
    # R's write.csv: a quoted row label before each row, none in the header.
    (path / "row_names.csv").write_text("\n".join([lines[0], *(f'"{i + 1}",{line}' for i, line in
                                                              enumerate(lines[1:]))]) + "\n")
    pd.testing.assert_frame_equal(read_table(path / "row_names.csv"), table)
    tab = Namespace(sep="\\t", decimal=None, thousands=None, na_values=["?", "n/a"])
    assert csv_options(tab) == {"sep": "\t", "na_values": ["?", "n/a"]}  # '\t' as typed in a shell


def test_a_file_not_in_utf8_is_an_error_naming_the_encoding_option(tmp_path):
    """A Latin-1 file (as many Windows programs write them) gave pandas' codec message; the
    error now says what to do, and --encoding reads the file."""
    from argparse import Namespace

    from sklearn_moe.cli import InputError, csv_options, read_table

    (tmp_path / "latin.csv").write_bytes("city,price\nMünchen,1\nKöln,2\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"as utf-8 text \(it holds the byte b'\\xfc'\): give the file's encoding "
                                         r"with --encoding"):
        read_table(tmp_path / "latin.csv")
    options = csv_options(Namespace(sep=None, decimal=None, thousands=None, na_values=None, encoding="latin-1"))
    assert read_table(tmp_path / "latin.csv", options)["city"].tolist() == ["München", "Köln"]
    with pytest.raises(InputError, match="unknown encoding: klingon"):
        read_table(tmp_path / "latin.csv", {"encoding": "klingon"})


def test_text_numbers_are_warned_of_once_with_the_options_that_read_them(workdir, tmp_path):
    path, _ = workdir
    table = pd.read_csv(path / "train.csv").astype({"a": object})
    table.loc[[3, 9], "a"] = "?"
    table.to_csv(tmp_path / "placeholder.csv", index=False)
    fitted = run_main("fit", "placeholder.csv", "--target", "price", "--cv", "3", "--max-epochs", "2", "--out", "m",
                      cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    warned = [line for line in fitted.stderr.splitlines() if line.startswith("sklearn-moe: warning: Column 'a'")]
    assert len(warned) == 1 and "holds text, so it is encoded as categories" in warned[0]  # not once per fold
    assert "note: on the command line, --na-values TEXT reads such text as a missing value" in fitted.stderr
    quiet = run_main("fit", "placeholder.csv", "--target", "price", "--na-values", "?", "--cv", "2", "--max-epochs",
                     "2", "--out", "m2", cwd=tmp_path)
    assert quiet.returncode == 0 and "warning" not in quiet.stderr
    assert json.loads((tmp_path / "m2" / "summary.json").read_text())["n_rows"] == 120


def test_warnings_python_hides_stay_hidden(monkeypatch, capsys, tmp_path):
    import warnings as warnings_module

    import sklearn_moe.cli as cli

    def deprecated(args):
        warnings_module.warn("an API of a dependency is deprecated", DeprecationWarning, stacklevel=2)
        warnings_module.warn("a model did not converge", UserWarning, stacklevel=2)
        warnings_module.warn("a model did not converge", UserWarning, stacklevel=2)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "info", deprecated)
    monkeypatch.setattr(cli.sys, "warnoptions", [])
    assert cli.main(["info", str(tmp_path)]) == 0
    assert capsys.readouterr().err == "sklearn-moe: warning: a model did not converge\n"


def test_predict_keeps_the_columns_asked_for_before_the_predictions(workdir, tmp_path):
    path, _ = workdir
    pd.read_csv(path / "new.csv").assign(id=[f"r{i}" for i in range(6)]).to_csv(tmp_path / "ids.csv", index=False)
    predicted = run_main("predict", str(path / "model"), "ids.csv", "--keep", "id", "city", cwd=tmp_path)
    assert predicted.returncode == 0, predicted.stderr
    output = pd.read_csv(io.StringIO(predicted.stdout))
    assert list(output.columns) == ["id", "city", "prediction"] and output["id"].tolist() == [f"r{i}" for i in range(6)]
    plain = pd.read_csv(io.StringIO(run_main("predict", str(path / "model"), "ids.csv", cwd=tmp_path).stdout))
    np.testing.assert_array_equal(output["prediction"], plain["prediction"])
    assert "note: ignoring column(s) the model does not use: ['id']" in predicted.stderr


def test_baselines_take_pandas_nullable_columns():
    """Parquet files give nullable columns (boolean, Int64, string) with pd.NA, on which
    scikit-learn's imputers fail ("boolean value of NA is ambiguous"): the baselines read
    them as NumPy's, NA as NaN."""
    rng = np.random.RandomState(0)
    n = 60
    frame = pd.DataFrame({"x": rng.normal(size=n),
                          "flag": pd.array(rng.choice([True, False, None], n), dtype="boolean"),
                          "count": pd.array(rng.choice([1, 2, None], n), dtype="Int64"),
                          "kind": pd.array(rng.choice(["u", "v", None], n), dtype="string")})
    y = frame["x"].to_numpy() * 2
    for name, model in baselines("regression", 0).items():
        assert np.isfinite(model.fit(frame, y).predict(frame)).all(), name


def test_a_class_rarer_than_the_folds_and_a_failing_baseline_do_not_stop_fit(tmp_path):
    # A class with one row is missing from one fold's training rows: every model's accuracy
    # counts it as an error there. On 6 rows the MLP baseline's own early-stopping split
    # fails: it is left out of the comparison with a note, the MoE is fitted all the same.
    rng = np.random.RandomState(0)
    x = rng.normal(size=60)
    label = np.where(x > 0, "pos", "neg").astype(object)
    label[0] = "rare"
    pd.DataFrame({"x": x, "label": label}).to_csv(tmp_path / "rare.csv", index=False)
    pd.DataFrame({"x": [0.1, 0.5, -1, 2, 0.3, -0.2], "label": list("ababab")}).to_csv(tmp_path / "six.csv",
                                                                                      index=False)
    rare = run_main("fit", "rare.csv", "--target", "label", "--cv", "2", "--max-epochs", "2", "--out", "r",
                    cwd=tmp_path)
    assert rare.returncode == 0, rare.stderr
    assert {row["model"] for row in json.loads((tmp_path / "r" / "summary.json").read_text())["cross_validation"]} == {
        "moe", "logistic_regression", "hist_gradient_boosting", "mlp"}
    six = run_main("fit", "six.csv", "--target", "label", "--cv", "3", "--max-epochs", "2", "--out", "s", cwd=tmp_path)
    assert six.returncode == 0, six.stderr
    assert "note: mlp left out of the comparison, it failed: The test_size" in six.stderr
    assert "mlp" not in six.stdout and "moe" in six.stdout and (tmp_path / "s" / "model.moe").exists()


def test_ignored_columns_are_left_out_of_fit_and_predict(workdir, tmp_path):
    path, _ = workdir
    table = pd.read_csv(path / "train.csv").assign(row_id=np.arange(120), note="x")
    table.to_csv(tmp_path / "with_id.csv", index=False)
    fitted = run_main("fit", "with_id.csv", "--target", "price", "--ignore", "row_id", "note", "--cv", "2",
                 "--max-epochs", "2", "--out", "m", cwd=tmp_path)
    assert fitted.returncode == 0, fitted.stderr
    summary = json.loads((tmp_path / "m" / "summary.json").read_text())
    assert summary["ignored"] == ["row_id", "note"] and summary["columns"] == ["a", "city", "b"]
    predicted = run_main("predict", "m", "with_id.csv", cwd=tmp_path)
    assert predicted.returncode == 0 and "note:" not in predicted.stderr  # ignored by request: no note
    assert len(predicted.stdout.splitlines()) == 121


def test_date_columns_and_a_model_without_epochs_are_reported(tmp_path, monkeypatch, capsys):
    from skorch.callbacks import Callback

    import sklearn_moe.cli as cli
    from sklearn_moe import MoERegressor

    # A date column (as a Parquet file gives it) is the estimator's TypeError: one line, 3.
    dated = pd.DataFrame({"day": pd.date_range("2024-01-01", periods=20), "a": np.arange(20.0), "y": np.arange(20.0)})
    monkeypatch.setattr(cli, "read_table", lambda path, options=None: dated)
    assert cli.main(["fit", "dated.parquet", "--target", "y", "--cv", "2", "--out", str(tmp_path / "d")]) == 3
    assert "'day' of X hold dates, times or durations" in capsys.readouterr().err

    class Interrupt(Callback):  # Ctrl-C
        def on_batch_end(self, net, **kwargs):
            signal.raise_signal(signal.SIGINT)

    # A fit interrupted in its first epoch leaves a model with no epoch in its history.
    X = np.random.RandomState(0).normal(size=(50, 2))
    model = MoERegressor(n_experts=2, max_epochs=3)
    with pytest.raises(KeyboardInterrupt, match="no epoch completed"):
        model.fit(X, X[:, 0], callbacks=[Interrupt()])
    assert len(model.history_) == 0
    (tmp_path / "m").mkdir()
    model.save(tmp_path / "m" / "model.moe")
    assert cli.main(["info", str(tmp_path / "m")]) == 0
    assert "0 epochs" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_on_bundled_data(tmp_path):
    demo = run("demo", "--cv", "2", "--max-epochs", "3", "--out", "demo_model", cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr
    assert "scikit-learn's diabetes data" in demo.stdout and "moe" in demo.stdout
    assert (tmp_path / "demo_model" / "model.moe").is_file()
    summary = json.loads((tmp_path / "demo_model" / "summary.json").read_text())
    assert summary["data"] == "sklearn.datasets.load_diabetes()"  # not the deleted scratch file
    info = run_main("info", "demo_model", cwd=tmp_path)
    assert "parameters (not at their defaults): max_epochs=3" in info.stdout  # not load()'s device


@pytest.mark.slow
def test_fit_can_tune_first(workdir):
    pytest.importorskip("optuna")
    path, _ = workdir
    tuned = run_main("fit", "train.csv", "--target", "price", "--cv", "2", "--max-epochs", "2", "--tune", "2",
                     "--param", "n_experts=3", "--param", "router=softmax", "--out", "tuned", cwd=path)
    assert tuned.returncode == 0, tuned.stderr
    assert "tuning: best 2-fold score" in tuned.stdout and (path / "tuned" / "model.moe").is_file()
    # What --param sets is not searched: the tuned model keeps it.
    from sklearn_moe import load

    params = load(path / "tuned" / "model.moe").get_params()
    assert (params["n_experts"], params["router"]) == (3, "softmax")
    assert "n_experts" not in tuned.stdout.split("with", 1)[1] and "'router'" not in tuned.stdout


def test_predict_names_the_columns_it_ignores(workdir):
    path, _ = workdir
    pd.read_csv(path / "new.csv").assign(row_id=range(6)).to_csv(path / "with_id.csv", index=False)
    plain, with_id = (run_main("predict", "model", name, cwd=path) for name in ("new.csv", "with_id.csv"))
    assert plain.returncode == with_id.returncode == 0, with_id.stderr
    assert with_id.stdout == plain.stdout
    assert "ignoring column(s) the model does not use: ['row_id']" in with_id.stderr
    assert "ignoring" not in plain.stderr


def test_predict_writes_a_column_per_output_of_a_multilabel_model(workdir):
    from sklearn_moe import MoEClassifier

    path, _ = workdir
    frame = pd.read_csv(path / "train.csv")[["a", "b"]].fillna(0.0)
    labels = np.column_stack([frame["a"] > 0, frame["b"] > 0]).astype(int)
    (path / "labels_model").mkdir()
    model = MoEClassifier(n_experts=2, expert_hidden=(8,), max_epochs=3, random_state=0).fit(frame, labels)
    model.save(path / "labels_model" / "model.moe")
    frame.head(5).to_csv(path / "numbers.csv", index=False)
    predicted = run_main("predict", "labels_model", "numbers.csv", cwd=path)
    assert predicted.returncode == 0, predicted.stderr
    table = pd.read_csv(io.StringIO(predicted.stdout))
    assert table.columns.tolist() == ["prediction_0", "prediction_1", "probability_0", "probability_1"]
    np.testing.assert_array_equal(table[["prediction_0", "prediction_1"]], model.predict(frame.head(5)))
    np.testing.assert_allclose(table[["probability_0", "probability_1"]], model.predict_proba(frame.head(5)))


def test_predict_and_info_take_a_model_file_saved_from_python(workdir, monkeypatch, capsys):
    """A model fitted on an array (no column names) takes the table's columns in fit's order,
    without scikit-learn's feature-names warning, and refuses a table of another width."""
    from sklearn_moe import MoERegressor
    from sklearn_moe.cli import main

    path, _ = workdir
    monkeypatch.chdir(path)
    frame = pd.read_csv(path / "train.csv")[["a", "b"]].fillna(0.0)
    model = MoERegressor(n_experts=2, expert_hidden=(8,), max_epochs=3, random_state=0).fit(frame.to_numpy(),
                                                                                           frame["a"].to_numpy())
    model.save(path / "array.moe")
    frame.head(5).to_csv(path / "two_columns.csv", index=False)
    frame.head(5).assign(c=1.0).to_csv(path / "three_columns.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["predict", "array.moe", "two_columns.csv"]) == 0
    predicted = pd.read_csv(io.StringIO(capsys.readouterr().out))
    np.testing.assert_allclose(predicted["prediction"], model.predict(frame.head(5).to_numpy()), rtol=1e-6)
    assert main(["predict", "array.moe", "three_columns.csv"]) == 3
    assert "has 3 column(s) besides any target, but the model was fitted without column names on 2" in (
        capsys.readouterr().err)
    assert main(["info", "array.moe"]) == 0
    assert "MoERegressor: 2 input columns" in capsys.readouterr().out


def test_the_mlp_baseline_fits_targets_far_from_zero():
    # House prices in dollars: an MLP fitted to the raw target stops early far from any fit
    # (R^2 far below 0), which would make the comparison meaningless.
    rng = np.random.RandomState(0)
    X = pd.DataFrame({"area": rng.normal(size=400), "rooms": rng.normal(size=400)})
    y = 300_000 + 80_000 * X["area"] + 20_000 * X["rooms"] + 5_000 * rng.normal(size=400)
    mlp = baselines("regression", seed=0)["mlp"].fit(X[:300], y[:300])
    assert r2_score(y[300:], mlp.predict(X[300:])) > 0.8
