"""Data-parallel fitting (:mod:`sklearn_moe.distributed.data_parallel`) over two gloo
processes on this machine, started by torchrun, against a single-process fit."""

import json
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from sklearn.datasets import make_friedman1

import sklearn_moe
from sklearn_moe import MoERegressor
from sklearn_moe._guard import LossLedger, NonFiniteLoss
from sklearn_moe.distributed.callbacks import merge_history_rows
from sklearn_moe.distributed.data_parallel import DataParallelGroup, agree_on_fault, data_parallel
from sklearn_moe.distributed.fit import main as fit_main
from sklearn_moe.nn import MixtureOfExperts

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

PARAMS = dict(random_state=0, max_epochs=25, n_experts=4, expert_hidden=(32,), batch_size=64)


def torchrun(*args, cwd, timeout=600):
    """Run ``torchrun --standalone --nproc-per-node 2`` (a free port of its choosing), its log
    folders in ``cwd`` (torchrun leaves them in the temporary directory)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TMPDIR": str(cwd)})


def friedman(n=900):
    X, y = make_friedman1(n, noise=0.3, random_state=0)
    return X[:600], y[:600], X[600:], y[600:]


# The end of a worker script that leaves a dict ``report`` (JSON) for the test.
WRITE_REPORT = """
with open(f"report_{{parallel.rank}}.json", "w") as handle:
    json.dump(report, handle)
dist.destroy_process_group()
"""


def read_reports(tmp_path):
    """Each process's ``report`` (see :data:`WRITE_REPORT`), in rank order."""
    return [json.loads((tmp_path / f"report_{rank}.json").read_text()) for rank in range(2)]


def run_workers(tmp_path, script, timeout=600, **fields):
    """Run ``script`` (formatted with ``fields``) in two processes on the training rows of
    :func:`friedman` (``data.npz``: ``X``, ``y``, ``X_test``); return the data."""
    X, y, X_test, y_test = friedman()
    np.savez(tmp_path / "data.npz", X=X, y=y, X_test=X_test)
    (tmp_path / "worker.py").write_text(textwrap.dedent(script.format(**fields)))
    result = torchrun("worker.py", cwd=tmp_path, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return X, y, X_test, y_test


def test_shards_deal_rows_round_robin_with_equal_lengths():
    shards = [DataParallelGroup(None, rank, 3).shard(11) for rank in range(3)]
    assert [s.tolist() for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # rows 9 and 10 unused


def test_merged_history_row_averages_the_shards_training_metrics():
    rows = [
        dict(epoch=2, train_loss=1.0, train_loss_best=True, valid_loss=0.5, expert_share=[0.5, 0.5, 0.0, 0.0],
             load_entropy=0.69, load_cv=1.0, load_imbalance=2.0, routing_entropy=0.2, dur=1.5,
             expert_grad_norm=[1.0, 2.0]),
        dict(epoch=2, train_loss=3.0, train_loss_best=True, valid_loss=0.5, expert_share=[0.0, 0.0, 0.5, 0.5],
             load_entropy=0.69, load_cv=1.0, load_imbalance=2.0, routing_entropy=0.4, dur=9.0,
             expert_grad_norm=[3.0, 4.0]),
    ]
    merged = merge_history_rows(rows, earlier=[dict(train_loss=1.5)])
    assert merged["train_loss"] == 2.0 and merged["routing_entropy"] == pytest.approx(0.3)
    assert merged["expert_share"] == [0.25] * 4
    # the loads are those of the merged shares (perfect balance), not the shards' means
    assert merged["load_cv"] == 0.0 and merged["load_imbalance"] == 1.0
    assert merged["load_entropy"] == pytest.approx(np.log(4))
    assert merged["train_loss_best"] is False  # 2.0 is not below the earlier 1.5
    assert merged["dur"] == 1.5 and merged["valid_loss"] == 0.5  # rank 0's
    assert merged["expert_grad_norm"] == [1.0, 2.0]  # the experts are replicated: rank 0's
    assert merge_history_rows(rows, [], expert_parallel=True)["expert_grad_norm"] == [1.0, 2.0, 3.0, 4.0]
    assert merge_history_rows(rows, [])["train_loss_best"] is True


def test_a_deferring_ledger_records_a_non_finite_loss_and_keeps_the_fault():
    strict, deferring, record = LossLedger(), LossLedger(defer=True), {}
    with pytest.raises(NonFiniteLoss, match="loss=nan"):
        strict.add(torch.tensor([float("nan")]), ("train_loss",), {}, check=("loss",))
    deferring.add(torch.tensor([float("nan")]), ("train_loss",), record, check=("loss",))
    deferring.add(torch.tensor([float("inf")]), ("train_loss",), {}, check=("loss",))
    assert np.isnan(record["train_loss"]) and "loss=nan" in str(deferring.fault)  # the first fault
    # outside a data-parallel block a process's fault is its own
    fault = NonFiniteLoss("x")
    assert agree_on_fault(fault) is fault and agree_on_fault(None) is None


@pytest.fixture
def one_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_one_process_group_fits_like_no_group_and_nccl_needs_cuda(one_process_group, monkeypatch):
    X, y, X_test, _ = friedman()
    params = dict(PARAMS, max_epochs=3)
    with data_parallel():
        parallel = MoERegressor(**params).fit(X, y)
    alone = MoERegressor(**params).fit(X, y)
    np.testing.assert_allclose(parallel.predict(X_test), alone.predict(X_test), rtol=1e-5, atol=1e-6)
    assert not any(name.startswith("data_parallel") for name, _ in parallel.net_.callbacks_)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with data_parallel(), pytest.raises(ValueError, match="NCCL process group trains on CUDA.*'cpu'"):
        MoERegressor(**params, device="cpu").fit(X, y)


def test_every_process_must_have_rank_0s_data_in_its_order(monkeypatch):
    # A fake group whose broadcast returns rank 0's fingerprint (recorded from rank 0's data).
    from types import SimpleNamespace

    # The module (the package's name data_parallel is the function).
    data_parallel_module = sys.modules[data_parallel.__module__]

    rng = np.random.RandomState(0)
    X, y = rng.normal(size=(20, 3)).astype(np.float32), rng.normal(size=20).astype(np.float32)
    sent = []
    group = SimpleNamespace(rank=1, broadcast_object=lambda mine: sent.append(mine) or sent[0])
    monkeypatch.setattr(data_parallel_module, "active_group", lambda: group)
    data_parallel_module.check_same_data(X, y)  # rank 0's own data: its fingerprint
    data_parallel_module.check_same_data(X.copy(), y.copy())  # equal data pass
    order = rng.permutation(20)
    with pytest.raises(ValueError, match=r"Process 1 .* other data than rank 0 \(other values or another row order"):
        data_parallel_module.check_same_data(X[order], y[order])  # the same rows, shuffled
    with pytest.raises(ValueError, match=r"shapes \(\(19, 3\), \(19,\)\) against \(\(20, 3\), \(20,\)\)"):
        data_parallel_module.check_same_data(X[:19], y[:19])


def test_adapter_experts_cannot_be_sharded_and_say_so(tmp_path):
    X, y, _, _ = friedman()
    np.savez(tmp_path / "data.npz", X=X, y=y, X_test=X[:5])
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER.format(params=dict(PARAMS, max_epochs=1),
                                                                      expert_parallel=True)))
    result = torchrun("worker.py", cwd=tmp_path)
    assert result.returncode != 0 and "expert_type='adapter' experts share one backbone" in result.stderr


def test_data_parallel_needs_a_process_group_and_the_entry_point_torchrun(capsys):
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        with data_parallel():
            pass
    assert fit_main(["data.csv", "--target", "y", "--out", "out"]) == 2
    assert "start it with torchrun" in capsys.readouterr().err


WORKER = """
import pickle, sys
import numpy as np, torch.distributed as dist
from sklearn_moe import MoERegressor
from sklearn_moe.distributed import data_parallel

data = np.load("data.npz")
dist.init_process_group("gloo")
with data_parallel(expert_parallel={expert_parallel!r}) as parallel:
    model = MoERegressor(**{params!r}).fit(data["X"], data["y"])
np.save(f"prediction_{{parallel.rank}}.npy", model.predict(data["X_test"]))
if parallel.rank == 0:
    with open("model.pkl", "wb") as handle:
        pickle.dump(model, handle)
    model.save("model.moe")
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn_moe.ExpertCollapseWarning")
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_two_processes_reach_the_single_process_score_and_return_an_ordinary_estimator(tmp_path, expert_parallel):
    # sharded experts must be independent ones; the single-process fit has the same
    params = dict(PARAMS, expert_type="independent") if expert_parallel else PARAMS
    X, y, X_test, y_test = run_workers(tmp_path, WORKER, params=params, expert_parallel=expert_parallel)
    # both processes end with the same model
    np.testing.assert_array_equal(np.load(tmp_path / "prediction_0.npy"), np.load(tmp_path / "prediction_1.npy"))
    with open(tmp_path / "model.pkl", "rb") as handle:
        pickled = pickle.load(handle)
    loaded = sklearn_moe.load(tmp_path / "model.moe")
    prediction = np.load(tmp_path / "prediction_0.npy")
    np.testing.assert_array_equal(pickled.predict(X_test), prediction)
    np.testing.assert_array_equal(loaded.predict(X_test), prediction)
    assert not any(name == "data_parallel" for name, _ in pickled.net_.callbacks_)
    assert type(pickled.module_) is MixtureOfExperts  # every expert, gathered when sharded
    single = MoERegressor(**params).fit(X, y)
    parallel_score, single_score = pickled.score(X_test, y_test), single.score(X_test, y_test)
    assert parallel_score > 0.8 and abs(parallel_score - single_score) < 0.03, (parallel_score, single_score)


VALIDATION_WORKER = """
import json
import numpy as np, torch.distributed as dist
from skorch.callbacks import Callback
from sklearn_moe import MoERegressor
from sklearn_moe.distributed import data_parallel

KEYS = ("valid_loss", "valid_expert_share", "valid_gate_share", "valid_routing_entropy", "valid_specialization",
        "valid_expert_loss", "valid_routing_instability")
data = np.load("data.npz")
dist.init_process_group("gloo")
report = {{}}
with data_parallel(expert_parallel={expert_parallel!r}) as parallel:
    # a callback of the user's own: every process evaluates the whole validation set
    for name, callbacks in (("shared_out", None), ("whole", [("noop", Callback())])):
        model = MoERegressor(**{params!r}, callbacks=callbacks).fit(data["X"], data["y"])
        history = model.net_.history
        report[name] = dict(epochs=model.n_iter_, prediction=model.predict(data["X_test"]).tolist(),
                            metrics={{key: history[:, key] for key in KEYS}},
                            rows=sum(b["valid_batch_size"] for b in history[0]["batches"] if "valid_batch_size" in b))
""" + WRITE_REPORT


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn_moe.ExpertCollapseWarning")
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_processes_sharing_out_the_validation_rows_record_the_whole_sets_validation(tmp_path, expert_parallel):
    params = dict(PARAMS, max_epochs=8, expert_type="independent", router="topk", top_k=2)
    run_workers(tmp_path, VALIDATION_WORKER, params=params, expert_parallel=expert_parallel)
    reports = read_reports(tmp_path)
    for report in reports:
        shared, whole = report["shared_out"], report["whole"]
        # 60 validation rows (a tenth of 600): 30 on each process, or all 60
        assert shared["rows"] == 30 and whole["rows"] == 60
        # the same training, and the same validation figures up to float rounding
        assert shared["epochs"] == whole["epochs"]
        np.testing.assert_allclose(shared["prediction"], whole["prediction"], rtol=1e-5, atol=1e-6)
        for key, values in shared["metrics"].items():
            np.testing.assert_allclose(np.asarray(values, dtype=float), np.asarray(whole["metrics"][key], dtype=float),
                                       rtol=1e-5, atol=1e-6, err_msg=key)
    assert reports[0]["shared_out"]["metrics"] == reports[1]["shared_out"]["metrics"]


COLLAPSE_WORKER = """
import json, warnings
import numpy as np, torch.distributed as dist
from sklearn_moe import MoERegressor
from sklearn_moe.distributed import data_parallel

data = np.load("data.npz")
dist.init_process_group("gloo")
with data_parallel(expert_parallel={expert_parallel!r}) as parallel, warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = MoERegressor(**{params!r}).fit(data["X"], data["y"])
revived = model.history_["revived_experts"].dropna().tolist() if "revived_experts" in model.history_ else []
report = dict(revived=revived, prediction=model.predict(data["X_test"]).tolist())
""" + WRITE_REPORT


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_collapse_recovery_keeps_every_process_on_one_model(tmp_path, expert_parallel):
    # a threshold that calls some expert starved at every epoch's end, the last one included:
    # the copies' perturbations are drawn on each process, the processes must still agree
    params = dict(PARAMS, max_epochs=4, early_stopping=False, expert_type="independent", router="topk",
                  collapse_threshold=0.9, collapse_patience=1, collapse_recovery=True)
    run_workers(tmp_path, COLLAPSE_WORKER, params=params, expert_parallel=expert_parallel)
    reports = read_reports(tmp_path)
    assert len(reports[0]["revived"]) == 4 and reports[0]["revived"] == reports[1]["revived"]
    np.testing.assert_array_equal(reports[0]["prediction"], reports[1]["prediction"])


@pytest.mark.slow
def test_the_torchrun_entry_point_writes_a_model_on_rank_0(tmp_path):
    X, y, X_test, y_test = friedman()
    frame = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])]).assign(
        kind=np.where(X[:, 0] > 0.5, "high", "low"), y=y)
    frame.to_csv(tmp_path / "train.csv", index=False)
    result = torchrun("-m", "sklearn_moe.distributed.fit", "train.csv", "--target", "y", "--out", "out",
                      "--max-epochs", 10, "--param", "n_experts=4", "--param", "expert_hidden=[32]",
                      "--param", "expert_type=independent", "--expert-parallel", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["task"] == "regression"
    assert summary["expert_parallel"] is True
    model = sklearn_moe.load(tmp_path / "out" / "model.moe")
    assert model.n_experts == 4 and model.expert_hidden == (32,) and summary["epochs"] == model.n_iter_ <= 10
    assert np.isfinite(model.predict(frame.drop(columns="y"))).all()
    bad = torchrun("-m", "sklearn_moe.distributed.fit", "train.csv", "--target", "nope", "--out", "out", cwd=tmp_path)
    assert bad.returncode != 0 and "unknown column 'nope'" in bad.stderr


FAULT_WORKER = """
import json, sys, warnings
import numpy as np, torch.distributed as dist
from skorch.callbacks import Callback
from sklearn_moe import MoERegressor
from sklearn_moe.distributed import data_parallel


class NaNInputOnRank1(Callback):
    \"\"\"Put a NaN in one training batch of rank 1 in epoch 3: only that process's loss is
    non-finite.\"\"\"

    def on_batch_begin(self, net, batch=None, training=None, **kwargs):
        if training and dist.get_rank() == 1 and len(net.history) == 3 and not getattr(self, "done", False):
            batch[0]["x"][0, 0] = float("nan")
            self.done = True


data = np.load("data.npz")
dist.init_process_group("gloo")
with data_parallel(expert_parallel={expert_parallel!r}) as parallel, warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model = MoERegressor(**{params!r}, callbacks=[("nan", NaNInputOnRank1())]).fit(data["X"], data["y"])
report = dict(rollbacks=[str(w.message) for w in caught if "rolled back" in str(w.message)],
              train_loss=[row["train_loss"] for row in model.net_.history], epochs=model.n_iter_,
              prediction=model.predict(data["X_test"]).tolist())
""" + WRITE_REPORT


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn_moe.ExpertCollapseWarning")
@pytest.mark.parametrize("expert_parallel", [False, True])
def test_a_non_finite_loss_on_one_process_rolls_back_the_epoch_on_every_process(tmp_path, expert_parallel):
    params = dict(PARAMS, max_epochs=6, early_stopping=False)
    if expert_parallel:
        params["expert_type"] = "independent"
    # Were the fault rank 1's alone, rank 1 would roll back and lower its learning rate
    # alone, and its collective calls would no longer pair with rank 0's: the processes
    # would hang, or exchange mismatched tensors.
    run_workers(tmp_path, FAULT_WORKER, timeout=300, params=params, expert_parallel=expert_parallel)
    reports = read_reports(tmp_path)
    for report in reports:
        assert len(report["rollbacks"]) == 1, report["rollbacks"]
        assert "process 1: non-finite training loss" in report["rollbacks"][0]
        assert report["epochs"] == 6 and np.isfinite(report["train_loss"]).all()
    assert reports[0]["train_loss"] == reports[1]["train_loss"]
    assert reports[0]["prediction"] == reports[1]["prediction"]
