"""The speed benchmark's measuring code (not its numbers: no timing is asserted)."""

import mmap
import sys

import numpy as np
import pytest
import torch

from benchmarks import speed
from sklearn_moe import MoERegressor
from sklearn_moe.nn import MixtureOfExperts


def test_expert_scaling_reports_every_count_relative_to_the_first():
    result = speed.expert_scaling(batch_size=64, n_features=4, expert_hidden=(8,), expert_counts=(2, 4),
                                  rounds=2)
    rows = result["rows"]
    assert [row["n_experts"] for row in rows] == [2, 4]
    assert rows[0]["forward_backward_ratio"] == 1.0 and rows[0]["full_step_ratio"] == 1.0
    for row in rows:
        for name in ("forward_backward", "full_step", "balanced_experts_alone", "routed_experts_alone"):
            assert row[f"{name}_ratio"] == pytest.approx(row[f"{name}_ms"] / rows[0][f"{name}_ms"])
        assert row["busiest_expert_over_mean"] >= 1.0
    # 2 experts top-2 is dense routing; the sparse dispatch of 4 launches more kernels
    assert 50 < rows[0]["kernel_launches"] < rows[1]["kernel_launches"]
    assert rows[0]["balanced_experts_alone_ratio"] == 1.0 and rows[0]["routed_experts_alone_ratio"] == 1.0


def test_expert_scaling_on_the_sync_free_paths_counts_the_gpus_step(tmp_path):
    result = speed.main(["--part", "experts", "--sync-free", "--rounds", "1", "--out", str(tmp_path)])["experts"]
    assert result["command"] == "python -m benchmarks.speed --part experts --sync-free"
    assert result["config"]["sync_free"] is True
    assert (tmp_path / "speed_experts_sync_free.json").exists()
    rows = {row["n_experts"]: row for row in result["rows"]}
    assert rows[64]["layout"] == "blocked" and rows[2]["layout"].startswith("blocked (one block")
    # Every sparse count launches as many kernels (none per expert)
    assert len({rows[n]["kernel_launches"] for n in (8, 16, 32, 64, 128)}) == 1
    assert result["criterion"]["kernel_launches"]["ratio_64_over_2"] > 1


def test_routed_layout_holds_every_assignment_of_the_routing():
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=16, top_k=2, expert_hidden=(8,)).train()
    x = torch.randn(512, 4)
    blocks, block_experts, grads = speed._routed_layout(module, x)
    slots = torch.zeros(16, dtype=torch.long)
    for block, experts, grad in zip(blocks, block_experts, grads):
        assert block.shape[-1] == 4 and grad.shape == (*block.shape[:2], 1)
        slots[torch.arange(16) if experts is None else experts] += block.shape[1]
    counts = torch.bincount(module.router(x).indices.reshape(-1), minlength=16)
    assert (slots >= counts).all() and int(slots.max()) == int(counts.max())
    assert len(blocks) > 1  # the fresh router's uneven load makes a staircase at 1024 assignments


def test_block_medians_times_each_step_in_blocks_after_an_untimed_call(monkeypatch):
    calls = {"a": 0, "b": 0}
    order = []
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])
    cost = {"a": 1.0, "b": 2.0}

    def step(name):
        def run():
            calls[name] += 1
            order.append(name)
            clock[0] += cost[name]
        return run

    medians = speed._block_medians({"a": step("a"), "b": step("b")}, blocks=2, calls=3)
    assert medians == {"a": 1.0, "b": 2.0}
    assert calls == {"a": 8, "b": 8}  # 2 blocks x (1 untimed + 3 timed)
    assert order == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4


def test_predict_speed_compares_both_models():
    sparse = dict(router="topk", expert_type="independent", numeric_embedding=None)
    result = speed.predict_speed(n_features=4, hidden=(8,), n_fit=200, n_throughput=500, n_latency=3,
                                 moe_params=sparse)
    assert set(result["single_row_latency_ms"]) == {"MoERegressor", "MLPRegressor"}
    latency, rate = result["single_row_latency_ms"], result["rows_per_s"]
    assert result["latency_ratio"] == pytest.approx(latency["MoERegressor"] / latency["MLPRegressor"])
    assert result["throughput_ratio"] == pytest.approx(rate["MoERegressor"] / rate["MLPRegressor"])
    # MLP 4 -> 8 -> 1: 40 multiply-adds; MoE: a 4 -> 8 router plus 2 experts of the MLP's size.
    assert result["multiply_adds_per_row"] == {"MoERegressor": 32 + 2 * 40, "MLPRegressor": 40}
    assert result["arithmetic_ratio"] == pytest.approx(112 / 40)
    rates = result["gflop_per_s"]
    assert rates["MoERegressor"] / rates["MLPRegressor"] == pytest.approx(
        result["throughput_ratio"] * result["arithmetic_ratio"])


def test_multiply_adds_leave_out_the_training_only_noise_layer():
    X = np.random.default_rng(0).normal(size=(60, 3)).astype(np.float32)
    model = MoERegressor(router="noisy_topk", n_experts=4, top_k=1, expert_hidden=(5, 5), gate_hidden=(6,),
                         max_epochs=1, random_state=0, numeric_embedding=None).fit(X, X[:, 0])
    # router 3 -> 6 -> 4, one expert 3 -> 5 -> 5 -> 1
    assert speed.multiply_adds_per_row(model) == (3 * 6 + 6 * 4) + (3 * 5 + 5 * 5 + 5 * 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS restart is Linux's /proc")
def test_peak_memory_counts_what_is_allocated_after_the_restart():
    if not speed._reset_peak_rss():
        pytest.skip("/proc/self/clear_refs is not writable here")
    before = speed._status_kib("VmRSS")
    # 64 MiB of a fresh mapping, every page touched (memory the allocator had freed could
    # still be resident and add nothing).
    block = mmap.mmap(-1, 64 * 1024 * 1024)
    np.frombuffer(block, dtype=np.uint8)[::mmap.PAGESIZE] = 1
    added_mib = (speed._status_kib("VmHWM") - before) / 1024
    block.close()
    assert 60 <= added_mib < 200


def test_multiply_adds_of_dense_adapter_experts_count_every_expert_and_the_embedding():
    X = np.random.default_rng(0).normal(size=(80, 3)).astype(np.float32)
    model = MoERegressor(n_experts=4, expert_hidden=(5, 5), max_epochs=1, random_state=0).fit(X, X[:, 0])
    embedding = model.module_.embedding  # piecewise-linear: 3 columns, d=16, linear0 3 x 16 + bins x 16 each
    bins = embedding.embedding.linear.weight.shape[1]  # the widest column's bin count
    expected_embedding = 3 * 16 + 3 * bins * 16
    width = 3 * 16
    # dense router on the embedded input, then all 4 experts: shared 48 -> 5 -> 5 and a 5 -> 1 head
    assert speed.multiply_adds_per_row(model) == expected_embedding + width * 4 + 4 * (width * 5 + 5 * 5 + 5)


def test_wrapper_overhead_times_the_estimator_and_a_plain_loop_over_the_same_network(monkeypatch):
    built = []
    original = speed.build_module
    monkeypatch.setattr(speed, "build_module", lambda *args: built.append(original(*args)) or built[-1])
    result = speed.wrapper_overhead(n_rows=300, n_features=4, epochs=2, repeats=1, batch_size=64)
    assert result["ratio"] == pytest.approx(result["estimator_epoch_s"] / result["plain_loop_epoch_s"])
    (module,) = built  # the plain loop's network: the fitted estimator's architecture, fresh
    assert isinstance(module, MixtureOfExperts) and module.n_features == 4 and module.training


@pytest.mark.parametrize("argv, message", [
    (["--device", "foo"], "is not a device"),
    (["--part", "predict", "--device", "cuda:0"], "runs on the CPU only" if torch.cuda.is_available()
     else "is not available here"),
    (["--rounds", "0"], "must be at least 1"),
])
def test_bad_options_are_one_line_errors_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        speed.main([*argv, "--out", str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
