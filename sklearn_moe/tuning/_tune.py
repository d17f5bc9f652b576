"""tune(): cross-validated Optuna search with per-epoch pruning, for one or several workers."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.distributions import IntDistribution
from optuna.trial import TrialState
from sklearn.base import clone, is_classifier
from sklearn.metrics import check_scoring
from sklearn.model_selection import check_cv
from sklearn.utils import _safe_indexing
from skorch.callbacks import Callback

from ..nn._checks import check_int
from ..nn.losses import mean_per_row
from ._optuna_private import claimed_trial
from ._space import check_space, decode_params, find_moe_step, fit_param_name, search_space, suggest
from ._storage import fail_stale_trials, heartbeat_enabled, logger, make_storage, open_study, pop_ticket


@dataclass
class TuneResult:
    """What :func:`tune` returns; unpacks as ``best_estimator, study = tune(...)``.

    Each parameter is kept as the attribute of the same name.

    Parameters
    ----------
    best_estimator : estimator or None
        A clone of the estimator with the best trial's parameters, refitted on all of X, y
        (``None`` with ``refit=False``).
    study : optuna.Study
        The study (all workers' trials when the storage is shared).
    best_params : dict
        The best trial's parameters as estimator values (prefixed as in the search space).
    best_score : float
        Its mean cross-validated score (greater is better).
    """

    best_estimator: object
    study: optuna.Study
    best_params: dict
    best_score: float

    def __iter__(self):
        return iter((self.best_estimator, self.study))


class PruningCallback(Callback):
    """Reports a fold's per-epoch loss to an Optuna trial and prunes it when told to.

    The value reported at ``step = fold * stride + epoch`` is minus the mean, over the folds
    so far, of a loss at that epoch; the sign makes greater better, like the study's
    direction (scikit-learn scores). A fold that stopped early contributes its last loss.
    Every trial is thus compared with the others at the same fold and epoch, on the same
    folds' average.

    With ``estimator`` (the MoE estimator being fitted) the loss is its
    ``_comparable_criterion`` on the estimator's internal early-stopping split (on the
    training batches when there is none): the log loss without label smoothing, or the
    squared error of the (mixture's mean) prediction, so that trials which train on other
    losses (``label_smoothing``, ``output="mixture_density"``) are compared on the same one.
    Without, the net's own ``valid_loss`` (``task_loss`` when there is no split).
    """

    def __init__(self, trial, fold, stride, fold_losses, warmup_epochs=5, estimator=None):
        self.trial = trial
        self.fold = fold
        self.stride = stride
        self.fold_losses = fold_losses  # losses of the earlier folds, one list per fold
        self.warmup_epochs = warmup_epochs
        self.estimator = estimator

    def on_train_begin(self, net, **kwargs):
        self.fold_losses.append([])
        # Built once the estimator knows its targets (a classifier's multilabel or not).
        self._criterion = None if self.estimator is None else self.estimator._comparable_criterion()

    def on_epoch_begin(self, net, **kwargs):
        self._totals = {}  # training (bool) -> (sum of the rows' losses, rows), on the device

    def on_batch_end(self, net, batch, training, y_pred=None, **kwargs):
        if self._criterion is None or y_pred is None:
            return
        X, y = batch
        per_row = mean_per_row(self._criterion(y_pred.output.detach().float(), y))
        weight = X.get("sample_weight") if isinstance(X, Mapping) else None
        if weight is not None:
            per_row = per_row * weight
        total, rows = self._totals.get(training, (0.0, 0))
        self._totals[training] = (total + per_row.sum(), rows + per_row.shape[0])

    def on_epoch_end(self, net, **kwargs):
        epoch = len(net.history) - 1
        loss = self._epoch_loss(net.history[-1])
        if loss is None or not math.isfinite(loss):
            raise optuna.TrialPruned(f"non-finite loss {loss} at fold {self.fold}, epoch {epoch}")
        self.fold_losses[-1].append(loss)
        mean = np.mean([losses[min(epoch, len(losses) - 1)] for losses in self.fold_losses])
        self.trial.report(-float(mean), self.fold * self.stride + epoch)
        if epoch >= self.warmup_epochs and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at fold {self.fold}, epoch {epoch} (mean loss {mean:.4g})")

    def _epoch_loss(self, row) -> float | None:
        if self._criterion is not None:
            total, rows = self._totals.get(False) or self._totals.get(True, (None, 0))
            return float(total) / rows if rows else None  # one read on the host per epoch
        loss = next((row[key] for key in ("valid_loss", "task_loss", "train_loss") if key in row), None)
        return None if loss is None else float(loss)


def _make_pruner(pruning):
    if pruning is True:
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    if pruning is False or pruning is None:
        return optuna.pruners.NopPruner()
    if isinstance(pruning, optuna.pruners.BasePruner):
        return pruning
    raise ValueError(f"pruning must be True, False or an optuna.pruners.BasePruner; got {pruning!r}.")


class _Objective:
    def __init__(self, estimator, X, y, splits, scorer, space, prefix, stride, pruning, warmup_epochs):
        self.estimator, self.X, self.y, self.splits, self.scorer = estimator, X, y, splits, scorer
        self.space, self.prefix, self.stride = space, prefix, stride
        self.pruning, self.warmup_epochs = pruning, warmup_epochs
        self.fit_key = fit_param_name(estimator, prefix, "callbacks") if pruning else None

    def __call__(self, trial):
        params = {name: suggest(trial, name, dist) for name, dist in self.space.items()}
        configured = clone(self.estimator).set_params(**params)
        scores, fit_times, fold_losses = [], [], []
        for fold, (train, test) in enumerate(self.splits):
            model = clone(configured)
            fit_params = {}
            if self.pruning:
                fit_params[self.fit_key] = [PruningCallback(trial, fold, self.stride, fold_losses, self.warmup_epochs,
                                                            find_moe_step(model)[1])]
            start = time.perf_counter()
            model.fit(_safe_indexing(self.X, train), _safe_indexing(self.y, train), **fit_params)
            fit_times.append(time.perf_counter() - start)
            scores.append(float(self.scorer(model, _safe_indexing(self.X, test), _safe_indexing(self.y, test))))
        trial.set_user_attr("fold_scores", scores)
        trial.set_user_attr("mean_fit_time", float(np.mean(fit_times)))
        score = float(np.mean(scores))
        if not math.isfinite(score):
            raise ValueError(f"non-finite cross-validated score {score} (fold scores {scores})")
        return score


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


class _Heartbeat:
    """Records the running trial's heartbeat every ``interval`` seconds in a thread."""

    def __init__(self, storage, trial_id):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        if heartbeat_enabled(self.storage):
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def _beat(self):
        while not self.stop.wait(self.storage.get_heartbeat_interval()):
            self.storage.record_heartbeat(self.trial_id)

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _run_worker(storage, study_name, n_trials, objective, sampler, pruner, deadline):
    """Claim tickets and run their trials until none is left (or the deadline passes)."""
    study_id = storage.get_study_id_from_name(study_name)
    while deadline is None or time.monotonic() < deadline:
        # A fresh Study object per trial: samplers cache the trial list per Study and thread.
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        fail_stale_trials(study, storage)
        trial_id = pop_ticket(storage, study_id, n_trials)
        if trial_id is None:
            break
        trial = claimed_trial(study, trial_id)
        trial.set_user_attr(f"worker:{_worker_id()}", True)
        value, state = None, None
        with _Heartbeat(storage, trial_id):
            try:
                value = objective(trial)
            except optuna.TrialPruned as pruned:
                state = TrialState.PRUNED
                logger.info("Trial %d pruned: %s", trial.number, pruned)
            except Exception as error:
                state = TrialState.FAIL
                logger.warning("Trial %d failed: %r", trial.number, error)
                trial.set_user_attr("error", repr(error)[:500])
            except BaseException:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
        finished = study.tell(trial, value, state=state, skip_if_finished=True)
        if state is None:
            logger.info("Trial %d finished with score %.6g (%s).", trial.number, value, finished.state.name)
    study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    fail_stale_trials(study, storage)
    return study


def tune(
    estimator,
    X,
    y,
    n_trials=20,
    cv=5,
    scoring=None,
    storage=None,
    study_name=None,
    pruning=True,
    n_jobs=1,
    timeout=None,
    *,
    param_distributions=None,
    groups=None,
    sampler=None,
    random_state=None,
    warmup_epochs=5,
    refit=True,
    heartbeat_interval=10,
    grace_period=60,
):
    """Tune a MoE estimator (or a Pipeline holding one) with Optuna and cross-validation.

    Every trial draws a configuration from ``param_distributions`` (by default
    :func:`search_space`), fits it on each cross-validation fold and scores it with
    ``scoring``; the study maximises the mean score. With ``pruning``, each fold's per-epoch
    validation loss is reported to the trial (see :class:`PruningCallback`: the value at step
    ``fold * max_epochs + epoch`` is minus the running mean over the folds so far; the same
    loss for every configuration, the log loss without label smoothing or the squared error
    of the mean prediction) and a trial the pruner judges worse than the others at the same
    fold and epoch stops at once.

    Several processes (or machines) can run ``tune`` on the same ``storage`` and
    ``study_name`` at the same time; they share one study. ``n_trials`` is the study's
    *total*, not each worker's: the worker that creates the study enqueues ``n_trials``
    trials and every worker claims them one at a time (atomically, in the storage) until
    none is left, so the study ends with exactly ``n_trials`` trials whatever the number of
    workers, none run twice. A worker that joins a finished study runs nothing and returns
    its best estimator; rerunning an interrupted study completes it. On journal and RDB
    storages a running trial sends heartbeats; when its worker dies, another worker marks
    the trial FAIL after ``grace_period`` seconds and the rest carry on.

    Parameters
    ----------
    estimator : estimator
        A :class:`~sklearn_moe.MoERegressor` / :class:`~sklearn_moe.MoEClassifier`, or a
        Pipeline holding one; the search space's keys are prefixed for its step.
    X : array-like of shape (n_samples, n_features)
        Training inputs.
    y : array-like of shape (n_samples,) or (n_samples, n_targets)
        Training targets.
    n_trials : int, default=20
        Total number of trials of the study (all workers together).
    cv : int, cross-validation generator or iterable, default=5
        As in :func:`sklearn.model_selection.cross_validate`. Workers sharing a study must
        use the same folds (an int, or a splitter with a fixed ``random_state``).
    scoring : str or callable, optional
        A scikit-learn scorer (greater is better); ``None`` is the estimator's ``score``.
    storage : None, str, os.PathLike or optuna.storages.BaseStorage, optional
        ``None`` (in memory), a journal file path (``*.log``, ``*.journal``, ``*.jsonl``;
        workers on one host), a database URL (e.g. ``postgresql+psycopg2://...``; workers on
        several machines) or a storage object. See :func:`make_storage`.
    study_name : str, optional
        Name of the shared study; needed for workers to find each other.
    pruning : bool or optuna.pruners.BasePruner, default=True
        ``True``: ``MedianPruner(n_startup_trials=5)``; ``False``: no pruning.
    n_jobs : int, default=1
        Trials run in parallel threads of this process.
    timeout : float, optional
        Seconds after which this worker claims no more trials (the running ones finish).
        Unclaimed trials stay WAITING in the study; running ``tune`` again on the same
        storage and study claims them.
    param_distributions : dict, optional
        Optuna distributions keyed like ``estimator.get_params()``; default
        ``search_space(estimator)``. Tuple-valued categorical choices (``expert_hidden``)
        are stored as strings so that journal and RDB storages accept them.
    groups : array-like, optional
        Group labels for group-aware ``cv`` splitters.
    sampler : optuna.samplers.BaseSampler, optional
        Default ``TPESampler(seed=random_state)``. Give each worker its own seed.
    random_state : int, optional
        Seed of the default sampler.
    warmup_epochs : int, default=5
        No pruning before this epoch of each fold.
    refit : bool, default=True
        Refit the best configuration on all of X, y.
    heartbeat_interval, grace_period : int or None, default=10, 60
        Heartbeats of running trials (see :func:`make_storage`); storages given as objects
        keep their own settings.

    Returns
    -------
    TuneResult
        ``best_estimator``, ``study``, ``best_params``, ``best_score``; unpacks as
        ``best_estimator, study``.

    Raises
    ------
    ValueError
        Bad arguments, no MoE step, or (with ``refit``) no trial of the study completed.
    """
    check_int("n_trials", n_trials)
    check_int("n_jobs", n_jobs)
    check_int("warmup_epochs", warmup_epochs, minimum=0)
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be None or a positive number of seconds; got {timeout!r}.")
    prefix, moe = find_moe_step(estimator)
    space = search_space(estimator) if param_distributions is None else check_space(param_distributions, estimator)
    max_epochs = space.get(prefix + "max_epochs")
    stride = max(moe.max_epochs, max_epochs.high if isinstance(max_epochs, IntDistribution) else 0)
    pruner = _make_pruner(pruning)
    splits = list(check_cv(cv, y, classifier=is_classifier(estimator)).split(X, y, groups))
    scorer = check_scoring(estimator, scoring=scoring)
    objective = _Objective(estimator, X, y, splits, scorer, space, prefix, stride,
                           not isinstance(pruner, optuna.pruners.NopPruner), warmup_epochs)
    sampler = sampler if sampler is not None else optuna.samplers.TPESampler(seed=random_state)
    storage = make_storage(storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period)
    study, total = open_study(storage, study_name, n_trials, sampler, pruner)
    deadline = None if timeout is None else time.monotonic() + timeout
    args = (storage, study.study_name, total, objective, sampler, pruner, deadline)
    if n_jobs == 1:
        study = _run_worker(*args)
    else:
        with ThreadPoolExecutor(max_workers=n_jobs) as pool:
            for future in [pool.submit(_run_worker, *args) for _ in range(n_jobs)]:
                future.result()
        study = optuna.load_study(study_name=study.study_name, storage=storage, sampler=sampler, pruner=pruner)
    return _result(study, estimator, X, y, space, refit)


def _result(study, estimator, X, y, space, refit):
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        if refit:
            states = {state.name: n for state in TrialState
                      if (n := len(study.get_trials(deepcopy=False, states=(state,))))}
            raise ValueError(f"No trial of study {study.study_name!r} completed (trials by state: {states}); "
                             "nothing to refit. Look at the trials' 'error' user attribute.")
        return TuneResult(None, study, {}, float("nan"))
    best = max(completed, key=lambda trial: trial.value)
    params = decode_params(best.params, space)
    best_estimator = clone(estimator).set_params(**params).fit(X, y) if refit else None
    return TuneResult(best_estimator, study, params, float(best.value))
