"""sklearn_moe.tuning: search spaces, tune() with pruning, select_n_experts and the one-SE rule."""

import importlib
import logging
import sys
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.compose import TransformedTargetRegressor
from sklearn.linear_model import Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from sklearn_moe import MoEClassifier, MoERegressor

optuna = pytest.importorskip("optuna", reason="the tuning tests need the tune extra")
from optuna.distributions import CategoricalDistribution, FloatDistribution  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from sklearn_moe.tuning import (  # noqa: E402
    NExpertsSelection,
    TuneResult,
    find_moe_step,
    make_storage,
    one_standard_error_rule,
    search_space,
    select_n_experts,
    tune,
)
from sklearn_moe.tuning._optuna_private import HEARTBEAT_KEY, HeartbeatJournalStorage  # noqa: E402
from sklearn_moe.tuning._space import decode_params, suggest  # noqa: E402
from sklearn_moe.tuning._storage import fail_stale_trials, pop_ticket  # noqa: E402
from sklearn_moe.tuning._tune import PruningCallback  # noqa: E402

from .conftest import needs  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)
TINY = dict(expert_hidden=(8,), max_epochs=4, batch_size=32, n_iter_no_change=5, device="cpu", random_state=0)
SMALL_SPACE = dict(include=["n_experts", "top_k", "router", "learning_rate", "expert_hidden"], max_experts=4,
                   expert_widths=(8,), expert_depths=(1, 2))


@pytest.fixture
def data():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(120, 4))
    y = X[:, 0] * 2 + np.sin(2 * X[:, 1]) + 0.1 * rng.normal(size=120)
    return X, y


# ---------------------------------------------------------------- import without optuna
def test_import_without_optuna_says_how_to_install(monkeypatch):
    for name in [name for name in sys.modules if name.startswith("sklearn_moe.tuning")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "optuna", None)
    with pytest.raises(ImportError, match=r"pip install 'sklearn-moe\[tune\]'"):
        importlib.import_module("sklearn_moe.tuning")


# ---------------------------------------------------------------- search spaces
def test_space_covers_the_moe_hyperparameters():
    space = search_space(MoERegressor())
    assert set(space) == {"n_experts", "top_k", "router", "temperature", "capacity_factor", "balance_loss",
                          "balance_coef", "z_loss_coef", "expert_hidden", "learning_rate", "router_lr_scale",
                          "weight_decay", "dropout", "expert_type", "expert_loss", "numeric_embedding", "lr_schedule"}
    assert space["top_k"].high <= space["n_experts"].low  # every combination valid
    assert [16, 16] in space["expert_hidden"].choices and [128] in space["expert_hidden"].choices
    classifier_space = search_space(make_pipeline(StandardScaler(), MoEClassifier()))
    assert set(classifier_space) == {f"moeclassifier__{name}" for name in space} | {"moeclassifier__label_smoothing"}
    assert (classifier_space["moeclassifier__label_smoothing"].low,
            classifier_space["moeclassifier__label_smoothing"].high) == (0.0, 0.2)


def test_a_space_with_the_hierarchical_router_leaves_out_aux_free_balancing():
    assert "aux_free" in search_space(MoERegressor())["balance_loss"].choices
    space = search_space(MoERegressor(), routers=("softmax", "hierarchical"))
    assert space["balance_loss"].choices == ("switch", "cv2", None)


def test_space_can_search_a_regressors_output(regression_data):
    space = search_space(MoERegressor(), outputs=("point", "mixture_density"))
    assert space["output"].choices == ("point", "mixture_density")
    assert "output" not in search_space(MoERegressor(), outputs=("mixture_density",))  # fixed: the estimator's own
    with pytest.raises(ValueError, match="outputs applies to regressors"):
        search_space(MoEClassifier(), outputs=("point", "mixture_density"))
    for bad in ((), ("gaussian",), ("point", "point")):
        with pytest.raises(ValueError, match="outputs must be distinct values"):
            search_space(MoERegressor(), outputs=bad)
    X, y = regression_data
    drawn = MoERegressor(max_epochs=2, random_state=0).set_params(output=space["output"].choices[1]).fit(X, y)
    assert drawn.predict_quantiles(X[:3], 0.5).shape == (3, 1)


@pytest.mark.parametrize("make, prefix", [
    (lambda moe: moe, ""),
    (lambda moe: make_pipeline(StandardScaler(), moe), "moeregressor__"),
    (lambda moe: Pipeline([("scale", StandardScaler()), ("model", moe)]), "model__"),
    (lambda moe: Pipeline([("inner", make_pipeline(StandardScaler(), moe))]), "inner__moeregressor__"),
    (lambda moe: make_pipeline(moe, "passthrough"), "moeregressor__"),  # the MoE needn't be the last step
    (lambda moe: TransformedTargetRegressor(regressor=moe), "regressor__"),
])
def test_space_is_prefixed_for_the_moe_step(make, prefix):
    estimator = make(MoERegressor())
    assert find_moe_step(estimator)[0] == prefix
    space = search_space(estimator)
    assert all(key.startswith(prefix) for key in space) and len(space) == 17
    estimator.set_params(**{key: dist.choices[0] if hasattr(dist, "choices") else dist.low
                            for key, dist in space.items()})  # every key is a real parameter


def test_space_include_exclude_and_bounds():
    space = search_space(MoEClassifier(), include=["n_experts", "top_k", "dropout"], exclude=["dropout"],
                         max_experts=32, max_top_k=4)
    assert sorted(space) == ["n_experts", "top_k"]
    assert (space["n_experts"].low, space["n_experts"].high, space["top_k"].high) == (4, 32, 4)
    with pytest.raises(ValueError, match="Unknown parameters in include"):
        search_space(MoERegressor(), include=["n_expert"])
    with pytest.raises(ValueError, match="Unknown parameters in exclude"):
        search_space(MoERegressor(), exclude=["max_epochs"])
    with pytest.raises(ValueError, match="not a string"):
        search_space(MoERegressor(), include="n_experts")
    with pytest.raises(ValueError, match="must not exceed"):
        search_space(MoERegressor(), max_experts=2, max_top_k=4)
    for bad in (dict(max_experts=0), dict(max_top_k=1.5), dict(routers=()), dict(expert_widths=(0,))):
        with pytest.raises(ValueError):
            search_space(MoERegressor(), **bad)


@pytest.mark.parametrize("estimator", [Ridge(), make_pipeline(StandardScaler(), Ridge()), "not an estimator"])
def test_no_moe_step_is_a_clear_error(estimator):
    with pytest.raises(ValueError, match="MoE"):
        search_space(estimator)


def test_two_moe_steps_are_refused():
    stack = Pipeline([("a", MoERegressor()), ("b", TransformedTargetRegressor(regressor=MoERegressor()))])
    with pytest.raises(ValueError, match="several MoE"):
        find_moe_step(stack)


@settings(max_examples=25, deadline=None)
@given(max_top_k=st.integers(1, 4), extra=st.integers(0, 30), seed=st.integers(0, 2**16),
       tpe=st.booleans(), classifier=st.booleans())
def test_sampled_configurations_are_always_valid(max_top_k, extra, seed, tpe, classifier):
    """Property: whatever the bounds and the sampler, every trial has top_k <= n_experts and
    passes the estimator's own parameter validation."""
    moe = (MoEClassifier if classifier else MoERegressor)()
    estimator = make_pipeline(StandardScaler(), moe)
    space = search_space(estimator, max_top_k=max_top_k, max_experts=max_top_k + extra,
                         routers=("topk", "noisy_topk", "softmax", "switch", "top_p", "hierarchical"))
    sampler = (optuna.samplers.TPESampler(seed=seed, n_startup_trials=3) if tpe
               else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(sampler=sampler, direction="maximize")
    name = type(moe).__name__.lower()
    for _ in range(12):
        trial = study.ask()
        params = decode_params({key: suggest(trial, key, dist) for key, dist in space.items()}, space)
        assert 1 <= params[f"{name}__top_k"] <= params[f"{name}__n_experts"] <= max_top_k + extra
        assert isinstance(params[f"{name}__expert_hidden"], tuple)
        estimator.set_params(**params)
        estimator[-1]._validate_params()
        study.tell(trial, float(params[f"{name}__n_experts"]))


def test_the_space_survives_a_storage_and_a_resumed_optuna_search_cv(tmp_path):
    # OptunaSearchCV asks its trials with the space's distributions as they are; a study
    # resumed from a storage must accept them, every choice coming back as it went in.
    from optuna_integration import OptunaSearchCV

    space = search_space(MoERegressor(), include=["n_experts", "expert_hidden"], max_experts=3,
                         expert_widths=(4, 8), expert_depths=(1,))
    X, y = np.random.RandomState(0).normal(size=(60, 3)), np.arange(60.0)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    for seed in (0, 1):  # the second search resumes the stored study
        study = optuna.create_study(storage=storage, study_name="s", direction="maximize", load_if_exists=True)
        search = OptunaSearchCV(MoERegressor(**TINY), space, n_trials=2, cv=2, study=study, random_state=seed,
                                error_score="raise").fit(X, y)
        assert search.best_params_["expert_hidden"] in ([4], [8])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4


def test_tuple_choices_are_stored_as_strings_and_decoded():
    space = search_space(MoERegressor(), include=["expert_hidden"], expert_widths=(8, 16), expert_depths=(1, 2))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    value = suggest(trial, "expert_hidden", space["expert_hidden"])
    assert isinstance(value, tuple) and trial.params["expert_hidden"] == repr(value)
    assert decode_params(trial.params, space) == {"expert_hidden": value}
    with pytest.raises(ValueError, match="Unsupported distribution"):
        suggest(trial, "x", object())


def test_optuna_search_cv_runs_end_to_end_with_the_space(data):
    from optuna_integration import OptunaSearchCV

    X, y = data
    pipe = make_pipeline(StandardScaler(), MoERegressor(**TINY))
    space = search_space(pipe, **SMALL_SPACE)
    search = OptunaSearchCV(pipe, space, n_trials=3, cv=2, random_state=0, timeout=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        search.fit(X, y)
    assert len(search.trials_) == 3 and all(t.state == TrialState.COMPLETE for t in search.trials_)
    assert set(search.best_params_) == set(space)
    best = search.best_estimator_[-1]
    assert best.top_k <= best.n_experts and best.expert_hidden in space["moeregressor__expert_hidden"].choices
    assert search.predict(X).shape == y.shape


# ---------------------------------------------------------------- tune()
def test_tune_in_memory_returns_refitted_best_and_study(data):
    X, y = data
    pipe = make_pipeline(StandardScaler(), MoERegressor(**TINY))
    result = tune(pipe, X, y, n_trials=4, cv=2, param_distributions=search_space(pipe, **SMALL_SPACE),
                  random_state=0, pruning=False)
    assert isinstance(result, TuneResult)
    best_estimator, study = result
    assert len(study.trials) == 4 and all(t.state == TrialState.COMPLETE for t in study.trials)
    assert result.best_score == max(t.value for t in study.trials)
    best = max(study.trials, key=lambda t: t.value)
    assert result.best_params == decode_params(best.params, search_space(pipe, **SMALL_SPACE))
    moe = best_estimator[-1]
    assert moe.n_experts == result.best_params["moeregressor__n_experts"]
    assert isinstance(moe.expert_hidden, tuple)
    assert best_estimator.predict(X).shape == y.shape
    assert len(best.user_attrs["fold_scores"]) == 2 and best.user_attrs["mean_fit_time"] > 0
    assert pipe[-1].n_experts == 8  # the given estimator is not modified


def test_tune_classifier_with_scoring_and_threads(data):
    X, y = data
    labels = np.where(y > np.median(y), "high", "low")
    clf = MoEClassifier(**TINY)
    result = tune(clf, X, labels, n_trials=4, cv=2, scoring="accuracy", n_jobs=2, random_state=0,
                  param_distributions=search_space(clf, include=["n_experts", "learning_rate"], max_experts=4))
    trials = result.study.trials
    assert len(trials) == 4 and sorted(t.number for t in trials) == [0, 1, 2, 3]
    best = result.study.best_trial
    assert result.best_score == best.value == max(t.value for t in trials if t.value is not None)
    assert best.value == pytest.approx(np.mean(best.user_attrs["fold_scores"]))
    fold_sizes = (len(X) // 2, len(X) - len(X) // 2)
    for score in best.user_attrs["fold_scores"]:  # accuracy: a count of a fold's rows
        assert any(abs(score * size - round(score * size)) < 1e-9 for size in fold_sizes)
    assert set(result.best_estimator.predict(X)) <= {"high", "low"}


class ScriptedSampler(optuna.samplers.BaseSampler):
    """Samples learning rates from a fixed list, one per trial number (everything else: first choice)."""

    def __init__(self, learning_rates):
        self.learning_rates = learning_rates

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, name, distribution):
        if name.endswith("learning_rate"):
            return self.learning_rates[trial.number]
        return distribution.choices[0] if hasattr(distribution, "choices") else distribution.low


def test_pruning_stops_trials_that_learn_nothing(data):
    """Three trials learn at a sound rate, then two with a learning rate of 1e-7 (their loss
    stays at the initial one): the median pruner must stop them at the first fold."""
    X, y = data
    model = MoERegressor(**{**TINY, "max_epochs": 6, "n_experts": 2})
    space = {"learning_rate": FloatDistribution(1e-8, 1.0, log=True)}
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    result = tune(model, X, y, n_trials=5, cv=2, param_distributions=space, pruning=pruner, warmup_epochs=2,
                  sampler=ScriptedSampler([1e-2, 1e-2, 1e-2, 1e-7, 1e-7]))
    states = [t.state for t in sorted(result.study.trials, key=lambda t: t.number)]
    assert states[:3] == [TrialState.COMPLETE] * 3
    assert states[3:] == [TrialState.PRUNED] * 2
    for trial in result.study.trials[3:]:
        assert max(trial.intermediate_values) == 2  # pruned at epoch 2 of fold 0
    complete = result.study.trials[0]
    steps = sorted(complete.intermediate_values)
    assert steps == [*range(6), *range(6, 12)]  # step = fold * max_epochs + epoch
    assert all(value < 0 for value in complete.intermediate_values.values())  # minus a loss: greater is better
    assert result.best_estimator.learning_rate == 1e-2


class FakeNet:
    def __init__(self):
        self.history = []


class RecordingTrial:
    def __init__(self):
        self.reports = {}

    def report(self, value, step):
        self.reports[step] = value

    def should_prune(self):
        return False


def test_pruning_reports_the_running_mean_over_folds_at_fold_and_epoch_steps():
    trial, fold_losses = RecordingTrial(), []
    for fold, losses in enumerate([[3.0, 2.0], [5.0, 4.0, 3.0]]):
        callback, net = PruningCallback(trial, fold, 10, fold_losses), FakeNet()
        callback.on_train_begin(net)
        for loss in losses:
            net.history.append({"train_loss": 9.0, "valid_loss": loss})
            callback.on_epoch_end(net)
    # fold 0 stopped early after 2 epochs; its last loss stands in for epoch 2.
    assert trial.reports == {0: -3.0, 1: -2.0, 10: -4.0, 11: -3.0, 12: -2.5}
    net = FakeNet()
    net.history.append({"train_loss": 1.0, "task_loss": 0.5})  # no validation split: task loss
    callback = PruningCallback(trial, 2, 10, [])
    callback.on_train_begin(net)
    callback.on_epoch_end(net)
    assert trial.reports[20] == -0.5
    net.history.append({"valid_loss": float("nan")})
    with pytest.raises(optuna.TrialPruned, match="non-finite"):
        callback.on_epoch_end(net)


class _Output:
    def __init__(self, output):
        self.output = output


def _epoch_of_batches(callback, net, batches):
    """One epoch through ``callback``: ``(training, X, y, output)`` batches, then its end."""
    callback.on_epoch_begin(net)
    for training, X, y, output in batches:
        callback.on_batch_end(net, batch=(X, y), training=training, y_pred=_Output(output))
    net.history.append({"train_loss": 9.0, "valid_loss": 7.0, "task_loss": 8.0})
    callback.on_epoch_end(net)


def test_pruning_compares_trials_on_one_loss_whatever_they_train_on():
    # Label smoothing changes the training and validation loss; density outputs train on a
    # likelihood. The pruner must see the same loss for every configuration: the log loss
    # unsmoothed, the squared error of the (mixture's mean) prediction.
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([0, 2, 2])
    log_loss = torch.nn.functional.cross_entropy(logits, labels).item()
    noise = torch.zeros(2, 3)
    for smoothing in (0.0, 0.3):
        trial = RecordingTrial()
        callback, net = PruningCallback(trial, 0, 10, [], estimator=MoEClassifier(label_smoothing=smoothing)), FakeNet()
        callback.on_train_begin(net)
        # Training batches do not count where there are validation batches, which are
        # averaged per row over the epoch.
        _epoch_of_batches(callback, net, [(True, {"X": noise}, labels[:2], noise),
                                          (False, {"X": logits[:2]}, labels[:2], logits[:2]),
                                          (False, {"X": logits[2:]}, labels[2:], logits[2:])])
        assert trial.reports[0] == pytest.approx(-log_loss)
    for output in ("point", "mixture_density"):
        trial = RecordingTrial()
        estimator = MoERegressor(output=output)
        callback, net = PruningCallback(trial, 0, 10, [], estimator=estimator), FakeNet()
        callback.on_train_begin(net)
        prediction, target = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.0], [4.0]])
        weights = torch.tensor([0.5, 1.5])
        # No validation split: the training batches, with their sample weights.
        _epoch_of_batches(callback, net, [(True, {"X": noise, "sample_weight": weights}, target, prediction)])
        assert trial.reports[0] == pytest.approx(-(0.5 * 1 + 1.5 * 4) / 2)


def test_tune_in_a_pipeline_sets_params_on_the_step_and_prunes_through_it(data):
    X, y = data
    pipe = Pipeline([("scale", StandardScaler()), ("inner", make_pipeline(MoERegressor(**TINY)))])
    result = tune(pipe, X, y, n_trials=3, cv=2, random_state=1, warmup_epochs=0,
                  param_distributions=search_space(pipe, include=["n_experts", "top_k"], max_experts=4))
    assert set(result.best_params) == {"inner__moeregressor__n_experts", "inner__moeregressor__top_k"}
    assert result.best_estimator["inner"][-1].n_experts == result.best_params["inner__moeregressor__n_experts"]
    assert all(t.intermediate_values for t in result.study.trials)  # the pruning callback reached the step


def test_pruning_through_other_meta_estimators_is_refused_but_plain_tuning_works(data):
    X, y = data
    wrapped = TransformedTargetRegressor(regressor=MoERegressor(**TINY), transformer=StandardScaler())
    space = search_space(wrapped, include=["n_experts"], max_experts=2)
    with pytest.raises(ValueError, match="pruning=False"):
        tune(wrapped, X, y, n_trials=2, cv=2, param_distributions=space)
    result = tune(wrapped, X, y, n_trials=2, cv=2, param_distributions=space, pruning=False, refit=False)
    assert result.best_estimator is None and len(result.study.trials) == 2


def test_failed_trials_are_recorded_and_refit_needs_a_completed_one(data, caplog):
    X, y = data
    space = {"learning_rate": CategoricalDistribution((-1.0,))}  # invalid for the estimator
    with caplog.at_level(logging.WARNING, logger="sklearn_moe.tuning"):
        with pytest.raises(ValueError, match="No trial of study .* completed"):
            tune(MoERegressor(**TINY), X, y, n_trials=2, cv=2, param_distributions=space)
    assert "failed" in caplog.text
    result = tune(MoERegressor(**TINY), X, y, n_trials=2, cv=2, param_distributions=space, refit=False)
    assert [t.state for t in result.study.trials] == [TrialState.FAIL] * 2
    assert "learning_rate" in result.study.trials[0].user_attrs["error"]
    assert np.isnan(result.best_score)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_trials=0), "n_trials"),
    (dict(n_trials=2.5), "n_trials"),
    (dict(n_jobs=0), "n_jobs"),
    (dict(timeout=0), "timeout"),
    (dict(pruning="yes"), "pruning"),
    (dict(warmup_epochs=-1), "warmup_epochs"),
    (dict(storage=123), "storage"),
    (dict(storage="study.txt"), "journal file path"),
    (dict(param_distributions={"n_experts": [1, 2]}), "not an Optuna distribution"),
    (dict(param_distributions={}), "non-empty"),
    (dict(param_distributions={"n_expert": optuna.distributions.IntDistribution(1, 3)}),
     "'n_expert', which is not a parameter of MoERegressor"),
    (dict(heartbeat_interval=0), "heartbeat_interval"),
])
def test_tune_rejects_bad_arguments(data, kwargs, match):
    X, y = data
    with pytest.raises(ValueError, match=match):
        tune(MoERegressor(**TINY), X, y, **{"n_trials": 1, "cv": 2, **kwargs})


def test_a_pipelines_search_space_names_the_moe_steps_parameters(data):
    pipeline = make_pipeline(StandardScaler(), MoERegressor(**TINY))
    with pytest.raises(ValueError, match="'n_experts', which is not a parameter of Pipeline "
                                         "\\(did you mean 'moeregressor__n_experts'\\?\\)"):
        tune(pipeline, *data, n_trials=1, cv=2,
             param_distributions={"n_experts": optuna.distributions.IntDistribution(1, 3)})


def test_tune_rejects_estimators_without_moe(data):
    with pytest.raises(ValueError, match="MoE"):
        tune(Ridge(), *data, n_trials=1)


# ---------------------------------------------------------------- storages and tickets
def test_make_storage_kinds(tmp_path):
    assert isinstance(make_storage(None), optuna.storages.InMemoryStorage)
    journal = make_storage(tmp_path / "study.log", heartbeat_interval=5, grace_period=20)
    assert isinstance(journal, HeartbeatJournalStorage) and journal.get_heartbeat_interval() == 5
    rdb = make_storage(f"sqlite:///{tmp_path / 'study.db'}")
    assert isinstance(rdb, optuna.storages.RDBStorage) and rdb.heartbeat_interval == 10 and rdb.grace_period == 60
    assert make_storage(journal) is journal


def test_journal_heartbeat_fails_stale_trials_only(tmp_path):
    storage = make_storage(str(tmp_path / "study.log"), heartbeat_interval=1, grace_period=30)
    study = optuna.create_study(storage=storage, study_name="s")
    for _ in range(3):
        study.enqueue_trial({})
    study_id = storage.get_study_id_from_name("s")
    dead, alive = pop_ticket(storage, study_id, 3), pop_ticket(storage, study_id, 3)
    storage.set_trial_system_attr(dead, HEARTBEAT_KEY, time.time() - 100)  # its worker died long ago
    storage.record_heartbeat(alive)
    assert storage._get_stale_trial_ids(study_id) == [dead]
    fail_stale_trials(study, storage)
    states = {t._trial_id: t.state for t in study.get_trials()}
    assert states[dead] == TrialState.FAIL and states[alive] == TrialState.RUNNING
    assert list(states.values()).count(TrialState.WAITING) == 1
    storage.record_heartbeat(dead)  # a late heartbeat of a finished trial is ignored


def test_shared_study_reruns_complete_it_without_new_trials(data, tmp_path, caplog):
    X, y = data
    space = search_space(MoERegressor(), include=["n_experts"], max_experts=4)
    common = dict(cv=2, param_distributions=space, storage=str(tmp_path / "study.log"), study_name="s",
                  pruning=False)
    first = tune(MoERegressor(**TINY), X, y, n_trials=3, random_state=0, **common)
    with caplog.at_level(logging.WARNING, logger="sklearn_moe.tuning"):
        second = tune(MoERegressor(**TINY), X, y, n_trials=5, random_state=1, **common)
    assert "created with n_trials=3" in caplog.text
    assert len(second.study.trials) == 3 and second.best_params == first.best_params
    assert [len([k for k in t.user_attrs if k.startswith("worker:")]) for t in second.study.trials] == [1, 1, 1]


# ---------------------------------------------------------------- select_n_experts
def test_one_se_rule_on_a_hand_made_table():
    table = pd.DataFrame({"n_experts": [1, 2, 4, 8], "mean_score": [0.50, 0.80, 0.90, 0.92],
                          "sem_score": [0.01, 0.01, 0.02, 0.03]})
    assert one_standard_error_rule(table, "best") == 8
    assert one_standard_error_rule(table, "one_se") == 4  # 0.90 >= 0.92 - 0.03
    table.loc[3, "sem_score"] = 0.005
    assert one_standard_error_rule(table, "one_se") == 8  # nothing else within 0.915
    table.loc[3, "sem_score"] = 0.5
    assert one_standard_error_rule(table, "one_se") == 1  # everything within one SE: the smallest
    tie = pd.DataFrame({"n_experts": [4, 2], "mean_score": [0.7, 0.7], "sem_score": [0.0, float("nan")]})
    assert one_standard_error_rule(tie, "best") == 2 == one_standard_error_rule(tie, "one_se")
    with pytest.raises(ValueError, match="rule"):
        one_standard_error_rule(table, "two_se")
    with pytest.raises(ValueError, match="columns"):
        one_standard_error_rule(table.drop(columns="sem_score"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(rule="median"), "rule"),
    (dict(candidates=()), "at least one"),
    (dict(candidates=(0, 2)), r"every candidate expert count \(1 is the non-MoE ablation\) must be a positive int; "
                               r"got 0"),
    (dict(candidates=(2, True)), "must be a positive int; got True"),
    (dict(candidates=(2, 2.5)), "must be a positive int; got 2.5"),
    (dict(candidates=(2, 2)), "duplicates"),
])
def test_select_n_experts_rejects_bad_arguments(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_n_experts(MoERegressor(**TINY), *data, **kwargs)


def test_select_n_experts_rejects_estimators_without_moe(data):
    with pytest.raises(ValueError, match="MoE"):
        select_n_experts(make_pipeline(StandardScaler(), Ridge()), *data, candidates=(1, 2))


@needs("matplotlib")
def test_select_n_experts_in_a_pipeline_table_and_plot(data, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    X, y = data
    pipe = make_pipeline(StandardScaler(), MoERegressor(**TINY))
    result = select_n_experts(pipe, X, y, candidates=(4, 1, 2), cv=3, scoring="neg_mean_squared_error")
    assert isinstance(result, NExpertsSelection)
    table = result.cv_results_
    assert list(table.index) == [1, 2, 4] and list(table["n_experts"]) == [1, 2, 4]
    for column in ("mean_score", "std_score", "sem_score", "mean_fit_time", "std_fit_time", "split2_score"):
        assert np.isfinite(table[column]).all()
    assert (table["mean_score"] <= 0).all()  # neg MSE
    np.testing.assert_allclose(table["sem_score"], table["std_score"] / np.sqrt(3))
    assert result.best_n_experts_ == one_standard_error_rule(table)
    assert result.best_estimator_[-1].n_experts == result.best_n_experts_
    assert pipe[-1].n_experts == 8
    ax = result.plot()
    ax.figure.savefig(tmp_path / "n_experts.png")
    assert (tmp_path / "n_experts.png").stat().st_size > 0
    assert "chosen" in " ".join(text.get_text() for text in ax.get_legend().get_texts())
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match="matplotlib"):
        result.plot()


def make_switching_linear_data(n_samples, n_regimes, noise=0.5, seed=0):
    """Rows fall into ``n_regimes`` regimes (given as one-hot columns), each with a different
    linear map of two inputs: 3*z1, -3*z1, 3*z2, -3*z2. The maps cancel on average, so one
    linear expert explains nothing, while one linear expert per regime reaches the noise floor
    (R^2 about 0.92); more experts than regimes cannot do better."""
    rng = np.random.RandomState(seed)
    regime = rng.randint(n_regimes, size=n_samples)
    z = rng.uniform(-1, 1, size=(n_samples, 2))
    coef = np.array([[3, 0], [-3, 0], [0, 3], [0, -3]])[regime]
    y = (coef * z).sum(axis=1) + noise * rng.normal(size=n_samples)
    return np.c_[np.eye(n_regimes)[regime], z], y


@pytest.mark.slow
@pytest.mark.parametrize("n_regimes, n_samples, candidates", [(2, 400, (1, 2, 8)), (4, 600, (1, 4, 16))])
def test_select_n_experts_finds_the_number_of_regimes(n_regimes, n_samples, candidates):
    """Linear experts under a sharp dense router: the one-SE rule must settle on one expert per
    regime, not on the single expert (far worse) nor on the largest count (no better)."""
    X, y = make_switching_linear_data(n_samples, n_regimes)
    # The mixture's loss and a gate that learns as fast as the experts: a sharp router
    # that must find the regimes, not the default's ensemble-like gate.
    model = MoERegressor(router="softmax", temperature=0.1, expert_hidden=(), balance_coef=0.1, max_epochs=80,
                         learning_rate=3e-2, batch_size=32, n_iter_no_change=20, device="cpu", random_state=0,
                         expert_loss="mixture", router_lr_scale=1.0, numeric_embedding=None, lr_schedule="plateau")
    result = select_n_experts(model, X, y, candidates=candidates, cv=3, refit=False)
    table = result.cv_results_
    assert table.loc[1, "mean_score"] < 0.1 < 0.85 < table.loc[n_regimes, "mean_score"]
    assert result.best_n_experts_ == n_regimes
