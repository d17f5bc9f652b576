"""Optuna storages for one or several workers, with heartbeats so a killed worker's trial fails.

Optuna's own heartbeat covers RDB storages only (in Optuna 5.0 ``JournalStorage`` has none), so
:class:`HeartbeatJournalStorage` adds it to the journal file: a running trial's worker writes a
time stamp into the trial's system attributes every ``heartbeat_interval`` seconds, and any
worker fails the running trials whose last stamp is older than ``grace_period``, through
Optuna's own :func:`optuna.storages.fail_stale_trials`.

A study made by :func:`~sklearn_moe.tuning.tune` holds its trials as *tickets*: the worker that
creates the study enqueues ``n_trials`` empty trials (``study.enqueue_trial({})``), and every
worker pops them atomically (the storage lets exactly one worker move a WAITING trial to
RUNNING). No trial is created any other way, so however many workers share the study, it ends
with exactly ``n_trials`` trials, none run twice.
"""

from __future__ import annotations

import logging
import os
import time

import optuna
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, InMemoryStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..nn._warnings import ignoring_warnings
from ._optuna_private import BaseHeartbeat, HeartbeatJournalStorage, storage_trial_id

logger = logging.getLogger("sklearn_moe.tuning")

N_TRIALS_KEY = "sklearn_moe:n_trials"
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


def make_storage(storage=None, *, heartbeat_interval=10, grace_period=60):
    """Open an Optuna storage from what :func:`~sklearn_moe.tuning.tune` accepts as ``storage``.

    Parameters
    ----------
    storage : None, str, os.PathLike or optuna.storages.BaseStorage
        ``None``: in memory (one process). A path ending in ``.log``, ``.journal`` or
        ``.jsonl``: a journal file that several worker processes on one host (or on a shared
        file system) append to. A database URL (``"postgresql+psycopg2://user@host/db"``,
        ``"sqlite:///study.db"``): an RDB storage, for workers on several machines. A storage
        object is used as it is (its own heartbeat settings apply).
    heartbeat_interval : int or None, default=10
        Seconds between heartbeats of a running trial (journal and RDB storages); ``None``
        disables them, and a killed worker's trial then stays RUNNING.
    grace_period : int or None, default=60
        Seconds without a heartbeat after which another worker fails the trial.

    Returns
    -------
    optuna.storages.BaseStorage
        An in-memory, journal-file or RDB storage, or ``storage`` itself if it is one.

    Raises
    ------
    ValueError
        For anything else (a string that is neither a URL nor a journal path, bad intervals).
    """
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or a positive int (seconds); got {value!r}.")
    if storage is None:
        return InMemoryStorage()
    if isinstance(storage, BaseStorage):
        return storage
    if isinstance(storage, os.PathLike):
        storage = os.fspath(storage)
    if not isinstance(storage, str):
        raise ValueError(f"storage must be None, a URL, a journal file path or an Optuna storage; got {storage!r}.")
    if "://" in storage:
        return _rdb_storage(storage, heartbeat_interval, grace_period if heartbeat_interval else None)
    if storage.endswith(JOURNAL_SUFFIXES):
        return HeartbeatJournalStorage(JournalFileBackend(storage), heartbeat_interval, grace_period)
    raise ValueError(
        f"storage={storage!r} is neither a database URL (e.g. 'postgresql+psycopg2://user@host/db', "
        f"'sqlite:///study.db') nor a journal file path ending in {JOURNAL_SUFFIXES}."
    )


def _rdb_storage(url, heartbeat_interval, grace_period, attempts=5):
    """``RDBStorage``, retried while another worker is creating the same schema.

    Workers starting together on a fresh database race to create Optuna's tables (and, on
    PostgreSQL, its enum types); the loser gets a duplicate-object error and simply retries.
    """
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with ignoring_warnings(category=ExperimentalWarning):
                return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=heartbeat_interval,
                                  grace_period=grace_period)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))


def heartbeat_enabled(storage) -> bool:
    return isinstance(storage, BaseHeartbeat) and storage.get_heartbeat_interval() is not None


def fail_stale_trials(study, storage) -> None:
    """Fail the running trials of workers that stopped sending heartbeats."""
    if heartbeat_enabled(storage):
        with ignoring_warnings(category=ExperimentalWarning):
            optuna.storages.fail_stale_trials(study)


def open_study(storage, study_name, n_trials, sampler, pruner, wait_s=60.0):
    """Create the study with ``n_trials`` tickets, or join it when it exists.

    Returns
    -------
    study : optuna.Study
    n_trials : int
        The study's total, set by the worker that created it.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize",
                                    sampler=sampler, pruner=pruner)
    except DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
    else:
        study.set_user_attr(N_TRIALS_KEY, n_trials)
        for _ in range(n_trials):
            study.enqueue_trial({})
        return study, n_trials
    deadline = time.monotonic() + wait_s
    while N_TRIALS_KEY not in study.user_attrs:  # the creator writes it right after creating
        if time.monotonic() > deadline:
            raise ValueError(
                f"Study {study_name!r} exists but was not created by sklearn_moe.tuning.tune (no "
                f"{N_TRIALS_KEY!r} attribute); use a new study_name."
            )
        time.sleep(0.2)
    total = study.user_attrs[N_TRIALS_KEY]
    if total != n_trials:
        logger.warning("Study %r was created with n_trials=%d; this worker's n_trials=%d is ignored.",
                       study_name, total, n_trials)
    return study, total


def pop_ticket(storage, study_id, n_trials, wait_s=60.0):
    """Atomically claim a WAITING trial of the study; ``None`` when all are claimed.

    While the creating worker is still enqueueing (fewer than ``n_trials`` trials exist and
    none waits), wait for it, up to ``wait_s`` seconds.
    """
    deadline = time.monotonic() + wait_s
    while True:
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
            try:
                if storage.set_trial_state_values(storage_trial_id(trial), state=TrialState.RUNNING):
                    return storage_trial_id(trial)
            except UpdateFinishedTrialError:
                continue
        if len(storage.get_all_trials(study_id, deepcopy=False)) >= n_trials or time.monotonic() > deadline:
            return None
        time.sleep(0.2)
