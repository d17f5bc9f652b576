"""Pins every use of Optuna beyond its public API (``sklearn_moe.tuning._optuna_private``) on
the installed Optuna: an upgrade that moves or changes one fails here, by name."""

import re
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.storages import RDBStorage  # noqa: E402
from optuna.storages.journal import JournalFileBackend  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from packaging.version import Version  # noqa: E402

from sklearn_moe.tuning._optuna_private import (  # noqa: E402
    HEARTBEAT_KEY,
    BaseHeartbeat,
    HeartbeatJournalStorage,
    claimed_trial,
    storage_trial_id,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_installed_optuna_is_in_the_supported_range():
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    bounds = set(re.findall(r'"optuna>=([\d.]+),<([\d.]+)"', pyproject))
    assert len(bounds) == 1  # the tune extra and the dev extra agree
    low, high = bounds.pop()
    assert Version(low) <= Version(optuna.__version__) < Version(high)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_base_heartbeat_is_the_protocol_that_fail_stale_trials_uses(tmp_path):
    rdb = RDBStorage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=5, grace_period=10)
    assert isinstance(rdb, BaseHeartbeat)  # Optuna's own heartbeat storage implements it
    for name in ("record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval",
                 "get_heartbeat_stale_trial_callback"):
        assert callable(getattr(BaseHeartbeat, name))

    storage = HeartbeatJournalStorage(JournalFileBackend(str(tmp_path / "study.log")), heartbeat_interval=1,
                                      grace_period=1)
    study = optuna.create_study(storage=storage)
    study.ask()
    storage.set_trial_system_attr(storage_trial_id(study.trials[0]), HEARTBEAT_KEY, 0.0)  # a beat long ago
    assert optuna.storages.fail_stale_trials(study) is None
    assert study.trials[0].state == TrialState.FAIL


def test_storage_trial_id_and_claimed_trial(tmp_path):
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({})
    study.enqueue_trial({})
    waiting = storage.get_all_trials(storage.get_study_id_from_name(study.study_name), states=(TrialState.WAITING,))
    second = waiting[1]
    trial_id = storage_trial_id(second)
    assert storage.get_trial(trial_id).number == second.number == 1
    assert storage.set_trial_state_values(trial_id, state=TrialState.RUNNING)
    trial = claimed_trial(study, trial_id)
    assert trial.number == 1
    trial.set_user_attr("seen", True)
    study.tell(trial, 0.5)
    finished = study.trials[1]
    assert finished.user_attrs == {"seen": True} and finished.value == 0.5
    assert study.trials[0].state == TrialState.WAITING
