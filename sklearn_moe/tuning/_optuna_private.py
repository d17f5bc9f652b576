"""Every use of Optuna beyond its public API, in one place.

``tests/test_optuna_private.py`` pins each of them on the installed Optuna; ``pyproject.toml``
bounds Optuna to the versions checked (``optuna>=4.0,<6``).

- ``optuna.storages._heartbeat.BaseHeartbeat``: the protocol (``record_heartbeat``,
  ``_get_stale_trial_ids``, ``get_heartbeat_interval``, ``get_heartbeat_stale_trial_callback``)
  through which :func:`optuna.storages.fail_stale_trials` fails the trials of dead workers.
  Optuna implements it for RDB storages only; :class:`HeartbeatJournalStorage` implements it
  for journal files.
- ``FrozenTrial._trial_id``: a trial's id in its storage (the public ``number`` counts within
  the study), which the storage's own methods take (:func:`storage_trial_id`).
- ``optuna.trial.Trial(study, trial_id)``: the live trial of a WAITING trial that this worker
  claimed from the storage itself (:func:`claimed_trial`); ``study.ask()`` would claim one by
  its own rules instead.
"""

from __future__ import annotations

import time
from datetime import datetime

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.trial import TrialState

__all__ = ["HEARTBEAT_KEY", "BaseHeartbeat", "HeartbeatJournalStorage", "claimed_trial", "storage_trial_id"]

HEARTBEAT_KEY = "sklearn_moe:heartbeat"


def storage_trial_id(trial: optuna.trial.FrozenTrial) -> int:
    """The id of ``trial`` in its storage."""
    return trial._trial_id


def claimed_trial(study: optuna.Study, trial_id: int) -> optuna.trial.Trial:
    """The live :class:`optuna.trial.Trial` of the storage's trial ``trial_id``, which this
    worker has moved to RUNNING."""
    return optuna.trial.Trial(study, trial_id)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A :class:`optuna.storages.JournalStorage` with Optuna's heartbeat protocol.

    Parameters
    ----------
    backend : optuna.storages.journal.BaseJournalBackend
        E.g. ``JournalFileBackend("study.log")``.
    heartbeat_interval : int or None
        Seconds between two heartbeats of a running trial; ``None`` disables heartbeats.
    grace_period : int or None
        Seconds without a heartbeat after which a running trial is failed; ``None`` is
        ``2 * heartbeat_interval`` (as for Optuna's RDB storage).
    heartbeat_stale_trial_callback : callable, optional
        Called with ``(study, trial)`` for each trial failed for lack of heartbeats, e.g.
        :class:`optuna.storages.RetryFailedTrialCallback`.
    """

    def __init__(self, backend, heartbeat_interval=None, grace_period=None, heartbeat_stale_trial_callback=None):
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except (UpdateFinishedTrialError, KeyError):
            pass  # the trial just finished (or was failed by another worker)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = trial.system_attrs.get(HEARTBEAT_KEY)
            if beat is None and isinstance(trial.datetime_start, datetime):
                beat = trial.datetime_start.timestamp()  # popped, killed before its first beat
            if beat is not None and now - beat > grace:
                stale.append(storage_trial_id(trial))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback
