"""Distributed tuning: worker processes sharing one study on a journal file or on PostgreSQL.

The PostgreSQL tests start a throw-away server on loopback (``initdb`` + ``pg_ctl`` in a
temporary directory, run as the ``postgres`` user when the tests run as root, since
``initdb`` refuses root) and skip when no server binary is installed.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="the tuning tests need the tune extra")
from optuna.trial import TrialState  # noqa: E402

from sklearn_moe.tuning import make_storage  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tuning_distributed")]

# A worker whose trials block: its Pipeline's first step touches `started` when fitted and
# then waits for a `release` file that never comes, so the test can kill it mid-trial.
BLOCKING_WORKER = '''
import pathlib, sys, time

import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.datasets import load_diabetes
from sklearn.pipeline import make_pipeline

from sklearn_moe import MoERegressor
from sklearn_moe.tuning import search_space, tune


class Gate(TransformerMixin, BaseEstimator):
    def __init__(self, started="", release=""):
        self.started = started
        self.release = release

    def fit(self, X, y=None):
        if self.started:
            pathlib.Path(self.started).touch()
        while self.release and not pathlib.Path(self.release).exists():
            time.sleep(0.05)
        return self

    def transform(self, X):
        return X


torch.set_num_threads(1)
storage, started, release = sys.argv[1:4]
X, y = load_diabetes(return_X_y=True)
pipe = make_pipeline(Gate(started, release),
                     MoERegressor(expert_hidden=(8,), max_epochs=4, device="cpu", random_state=0))
space = search_space(pipe, include=["n_experts", "learning_rate"], max_experts=4)
tune(pipe, X, y, n_trials=3, cv=2, storage=storage, study_name="killed", param_distributions=space,
     refit=False, heartbeat_interval=1, grace_period=2)
'''


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _worker(storage, study, n_trials):
    command = [sys.executable, "-m", "sklearn_moe.tuning", "worker", "--storage", storage, "--study", study,
               "--data", "diabetes", "--n-trials", str(n_trials), "--cv", "2", "--param", "max_epochs=4",
               "--set", "expert_hidden=(8,)", "--set", "random_state=0",
               "--include", "n_experts", "top_k", "learning_rate", "--max-experts", "4",
               "--heartbeat-interval", "1", "--grace-period", "5"]
    return subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process, timeout=300):
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        pytest.fail(f"worker {process.pid} did not finish in {timeout} s:\n{out[-3000:]}")
    assert process.returncode == 0, f"worker {process.pid} failed:\n{out[-3000:]}"
    return out


def _wait_for(condition, what, timeout=120.0, process=None):
    """Poll ``condition`` until true (no fixed sleeps deciding the outcome)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"process {process.pid} exited ({process.returncode}) before {what}:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _load(storage, study):
    return optuna.load_study(study_name=study, storage=make_storage(storage, heartbeat_interval=None))


def _workers_of(trial):
    return [key.split(":")[2] for key in trial.user_attrs if key.startswith("worker:")]  # the pids


def _check_two_workers_share_the_study(storage):
    n_trials = 8
    first, second = _worker(storage, "shared", n_trials), _worker(storage, "shared", n_trials)
    outputs = [_finish(first), _finish(second)]
    trials = _load(storage, "shared").get_trials()
    assert sorted(t.number for t in trials) == list(range(n_trials)), "lost or extra trials"
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials, outputs
    pids = {str(first.pid), str(second.pid)}
    for trial in trials:
        assert len(_workers_of(trial)) == 1 and _workers_of(trial)[0] in pids, "a trial ran twice"
        assert 1 <= trial.params["top_k"] <= trial.params["n_experts"] <= 4
    share = {pid: sum(_workers_of(t)[0] == pid for t in trials) for pid in pids}
    print(f"trials per worker: {share}")


def _check_killed_worker_leaves_the_study_usable(storage, tmp_path):
    script = tmp_path / "blocking_worker.py"
    script.write_text(BLOCKING_WORKER)
    started = tmp_path / "started"
    run = [sys.executable, str(script), storage]
    victim = subprocess.Popen([*run, str(started), str(tmp_path / "never")], cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(started.exists, "the first worker to start its trial", process=victim)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
    reader = make_storage(storage, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="killed", storage=reader)
    assert [t.state for t in study.get_trials()].count(TrialState.RUNNING) == 1
    study_id = reader.get_study_id_from_name("killed")
    _wait_for(lambda: reader._get_stale_trial_ids(study_id), "the killed worker's heartbeat to go stale")

    survivor = subprocess.Popen([*run, "", ""], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    _finish(survivor)
    trials = sorted(_load(storage, "killed").get_trials(), key=lambda t: t.number)
    assert [t.number for t in trials] == [0, 1, 2]
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert _workers_of(trials[0]) == [str(victim.pid)]
    assert all(_workers_of(t) == [str(survivor.pid)] for t in trials[1:])


# ---------------------------------------------------------------- journal file (one host)
def test_two_workers_share_a_journal_study(tmp_path):
    _check_two_workers_share_the_study(str(tmp_path / "study.log"))


def test_killed_worker_fails_its_trial_and_others_continue_on_a_journal(tmp_path):
    _check_killed_worker_leaves_the_study_usable(str(tmp_path / "study.log"), tmp_path)


# ---------------------------------------------------------------- PostgreSQL (several machines)
def _pg_binary(name):
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return candidates[-1] if candidates else None


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server on a free loopback port for this session; yields a database URL."""
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
                    "install the 'postgresql' package (.ci/run does so on CI)")
    as_user, owner = [], None
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the postgres user
        runuser = shutil.which("runuser")
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            owner = None
        if runuser is None or owner is None:
            pytest.skip("running as root without a 'postgres' user and runuser to start PostgreSQL as")
        as_user = [runuser, "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="sklearn-moe-pg-"))
    if owner is not None:
        os.chown(base, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", _free_port()

    def pg(*args):
        result = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout}\n{result.stderr}"

    pg(initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "--no-sync")
    pg(pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o",
       f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE optuna_test")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna_test"
    finally:
        pg(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_two_workers_share_a_postgresql_study(postgres_url):
    _check_two_workers_share_the_study(postgres_url)


def test_killed_worker_fails_its_trial_and_others_continue_on_postgresql(postgres_url, tmp_path):
    _check_killed_worker_leaves_the_study_usable(postgres_url, tmp_path)
