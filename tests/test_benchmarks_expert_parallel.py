"""The expert-parallel benchmark: its lower-bound arithmetic and report, by hand, and one
small run in two gloo processes (no timing is asserted)."""

import json
import statistics

import pytest

from benchmarks import expert_parallel as bench

# 5 experts over 2 ranks: rank 0 holds experts 0-2, rank 1 experts 3-4.
SHARDS = [(0, 3), (3, 5)]
COUNTS = [[2, 0, 1, 4, 3],  # rank 0's assignments per expert: 7 to rank 1's experts
          [1, 1, 0, 2, 5]]  # rank 1's: 2 to rank 0's experts


def test_expert_owner_and_expected_remote_share():
    assert bench.expert_owner(SHARDS) == [0, 0, 0, 1, 1]
    assert bench.expected_remote_share(SHARDS, 0) == pytest.approx(2 / 5)
    assert bench.expected_remote_share(SHARDS, 1) == pytest.approx(3 / 5)
    assert bench.expected_remote_share([(0, 4), (4, 8)], 0) == 0.5  # (R - 1) / R
    assert bench.expected_remote_share([(0, 2), (2, 4), (4, 6), (6, 8)], 3) == 0.75
    assert bench.expected_remote_share([(0, 8)], 0) == 0.0


def test_lower_bound_counts_rows_out_outputs_back_and_output_gradients():
    # d = 3 float32 columns in, w = 2 bf16 values out
    zero = bench.lower_bound_bytes(COUNTS, SHARDS, 0, in_width=3, out_width=2, in_itemsize=4, out_itemsize=2)
    assert zero == {"assignments_sent": 7, "assignments_received": 2, "rows_out": 7 * 3 * 4,
                    "outputs_back": 2 * 2 * 2, "backward": 7 * 2 * 2, "forward": 84 + 8, "total": 84 + 8 + 28}
    one = bench.lower_bound_bytes(COUNTS, SHARDS, 1, in_width=3, out_width=2, in_itemsize=4, out_itemsize=2)
    assert (one["assignments_sent"], one["assignments_received"]) == (2, 7)
    assert (one["rows_out"], one["outputs_back"], one["backward"]) == (2 * 3 * 4, 7 * 2 * 2, 2 * 2 * 2)
    # what one rank sends out, the other sends back
    assert zero["rows_out"] / (3 * 4) == one["assignments_received"]


def test_lower_bound_adds_the_row_gradients_when_rows_need_them():
    bound = bench.lower_bound_bytes(COUNTS, SHARDS, 1, in_width=3, out_width=2, rows_need_grad=True)
    # backward: 2 output gradients out (float32) and the 7 received rows' gradients back
    assert bound["backward"] == 2 * 2 * 4 + 7 * 3 * 4
    assert bound["total"] == bound["rows_out"] + bound["outputs_back"] + bound["backward"]


def test_lower_bound_is_zero_on_one_rank_and_checks_its_input():
    alone = bench.lower_bound_bytes([[3, 4]], [(0, 2)], 0, in_width=5, out_width=1)
    assert alone["total"] == 0 and alone["assignments_sent"] == 0
    with pytest.raises(ValueError, match="one entry per expert"):
        bench.lower_bound_bytes([[1, 2, 3], [1, 2]], SHARDS, 0, 3, 2)
    with pytest.raises(ValueError, match="rank"):
        bench.lower_bound_bytes(COUNTS, SHARDS, 2, 3, 2)


def _step(counts, rank, extra_row_bytes=0, count_bytes=16, remote_row_ranks=0):
    """A step record whose counters are the bound's parts (plus ``extra_row_bytes``)."""
    bound = bench.lower_bound_bytes(counts, SHARDS, rank, in_width=3, out_width=2)
    return {"counts": counts, "count_bytes": count_bytes, "row_bytes": bound["rows_out"] + extra_row_bytes,
            "output_bytes": bound["outputs_back"], "backward_bytes": bound["backward"],
            "rows_sent": bound["assignments_sent"], "rows_received": bound["assignments_received"],
            "remote_row_ranks": remote_row_ranks}


def test_summarize_rank_adds_the_counts_to_the_bound():
    other = [[1, 1, 1, 2, 1], [0, 2, 0, 3, 1]]
    steps = [_step(COUNTS, 0, remote_row_ranks=5), _step(other, 0, remote_row_ranks=3)]
    summary = bench.summarize_rank(steps, SHARDS, 0, 3, 2, 4, 4, False, batch=5, top_k=2)
    bounds = [bench.lower_bound_bytes(c, SHARDS, 0, 3, 2)["total"] for c in (COUNTS, other)]
    assert summary["per_step"]["lower_bound_bytes"] == bounds
    assert summary["per_step"]["total_bytes"] == [b + 16 for b in bounds]
    assert summary["ratio"] == pytest.approx((sum(bounds) + 32) / sum(bounds))
    assert summary["ratio_max"] == pytest.approx(max((b + 16) / b for b in bounds))
    assert summary["mean"]["lower_bound_bytes"] == pytest.approx(statistics.fmean(bounds))
    assert summary["counters_match_bound"]
    # sent: 7 and 3 of 2 steps x 5 rows x top-2; 8 distinct (row, remote rank) pairs of 10
    assert summary["remote_share_measured"] == pytest.approx(10 / 20)
    assert summary["remote_share_expected"] == pytest.approx(0.4)
    assert summary["row_dedup_share"] == pytest.approx(8 / 10)
    assert summary["experts"] == [0, 3] and summary["rank"] == 0


def test_summarize_rank_notices_bytes_beyond_the_bound():
    summary = bench.summarize_rank([_step(COUNTS, 1, extra_row_bytes=12)], SHARDS, 1, 3, 2, 4, 4, False, 5, 2)
    assert not summary["counters_match_bound"]
    bound = summary["per_step"]["lower_bound_bytes"][0]
    assert summary["ratio"] == pytest.approx((bound + 12 + 16) / bound)


def test_summarize_timing_takes_the_slowest_rank_of_each_step():
    ep = [[0.010, 0.020, 0.030], [0.012, 0.018, 0.040]]  # slowest per step: 0.012, 0.020, 0.040
    single = [[0.004, 0.005, 0.006], [0.005, 0.004, 0.009]]  # 0.005, 0.005, 0.009
    timing = bench.summarize_timing(ep, single, batch=100)
    assert timing["ep_step_ms"] == pytest.approx(20.0) and timing["single_step_ms"] == pytest.approx(5.0)
    assert timing["ep_over_single"] == pytest.approx(4.0)
    assert timing["ep_rows_per_s_per_rank"] == pytest.approx(5000)
    assert timing["single_rows_per_s_per_rank"] == pytest.approx(20000)
    # step pairs' ratios 2.4, 4.0, 4.44: quartiles (inclusive) 3.2, 4.0, 4.22
    assert timing["pair_ratio_quartiles"] == pytest.approx([(2.4 + 4.0) / 2, 4.0, (4.0 + 0.04 / 0.009) / 2])
    assert bench.summarize_timing([[0.02]], [[0.01]], 1)["pair_ratio_quartiles"] == pytest.approx([2.0] * 3)


def _result():
    steps = [_step(COUNTS, rank, remote_row_ranks=6) for rank in (0, 1)]
    ranks = [bench.summarize_rank([steps[rank]], SHARDS, rank, 3, 2, 4, 4, False, 5, 2) for rank in (0, 1)]
    return {
        "command": "python -m benchmarks.expert_parallel --batch 5",
        "machine": "a test machine",
        "config": {"world_size": 2, "batch": 5, "n_features": 3, "expert_hidden": [8], "n_experts": [5],
                   "top_k": [2], "threads": 1, "warmup": 1, "steps": 1},
        "configs": [{"n_experts": 5, "top_k": 2, "rows_need_grad": False, "replicated_gradient_bytes": 80,
                     "ranks": ranks, "timing": bench.summarize_timing([[0.02], [0.03]], [[0.01], [0.01]], 5)}],
    }


def test_markdown_report_has_the_command_machine_bound_and_tables():
    text = bench.markdown_report(_result())
    assert text.startswith("# Expert parallelism: bytes per step\n")
    assert "Command: `python -m benchmarks.expert_parallel --batch 5`. Machine: a test machine." in text
    assert bench.LOWER_BOUND_DEFINITION in text
    assert "carry no gradient" in text
    # rank 0: 7 rows out x 12 B = 84, 2 outputs back x 8 B = 16, 7 output gradients x 8 B = 56; bound 156
    assert "| 5 | 2 | 0 | 16 | 84 | 16 | 56 | 172 | 156 | 1.10256 | 0.400 | 0.700 |" in text
    # rank 1: 2 x 12 = 24 out, 7 x 8 = 56 back, 2 x 8 = 16 backward; bound 96
    assert "| 5 | 2 | 1 | 16 | 24 | 56 | 16 | 112 | 96 | 1.16667 | 0.600 | 0.200 |" in text
    assert "equal the bound's parts exactly" in text
    assert "| 5 | 2 | 30.00 | 10.00 | 3.00x | 3.00x / 3.00x / 3.00x | 167 | 500 |" in text
    assert "not a scaling result" in text
    assert "80 bytes of payload at 5 experts" in text


def test_compact_json_keeps_the_values_and_puts_number_lists_on_one_line():
    data = {"a": [1, 2.5, -3e-05], "b": {"c": []}, "names": ["x", "y"], "shards": [[0, 3], [3, 5]]}
    text = bench._compact_json(data)
    assert json.loads(text) == data
    assert '"a": [1, 2.5, -3e-05]' in text and "[0, 3]" in text


def test_small_run_in_two_processes_stays_near_the_bound(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    bench.main(["--batch", "64", "--n-experts", "4", "--top-k", "1", "2", "--steps", "2", "--warmup", "1",
                "--n-features", "8", "--expert-hidden", "16", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "expert_parallel.json").read_text())
    assert result["benchmark"] == "expert_parallel" and result["lower_bound"] == bench.LOWER_BOUND_DEFINITION
    assert result["command"].startswith("python -m benchmarks.expert_parallel --batch 64")
    assert [(c["n_experts"], c["top_k"]) for c in result["configs"]] == [(4, 1), (4, 2)]
    for config in result["configs"]:
        assert config["shards"] == [[0, 2], [2, 4]]
        assert (config["in_width"], config["out_width"], config["rows_need_grad"]) == (8, 1, False)
        assert set(config["timing"]) == {"ep_step_ms", "single_step_ms", "ep_over_single", "pair_ratio_quartiles",
                                         "ep_rows_per_s_per_rank", "single_rows_per_s_per_rank"}
        assert config["timing"]["ep_over_single"] > 0
        sent = [rank["per_step"]["rows_sent"] for rank in config["ranks"]]
        received = [rank["per_step"]["rows_received"] for rank in config["ranks"]]
        assert sent[0] == received[1] and sent[1] == received[0]  # what one rank sends, the other receives
        for rank in config["ranks"]:
            steps = rank["per_step"]
            assert len(steps["total_bytes"]) == 2
            assert all(t >= b > 0 for t, b in zip(steps["total_bytes"], steps["lower_bound_bytes"]))
            assert steps["count_bytes"] == [8 * 2, 8 * 2]  # int64 counts of the other rank's 2 experts
            assert rank["counters_match_bound"]
            assert 1.0 < rank["ratio"] < 1.1
            assert 0.0 < rank["remote_share_measured"] < 1.0 and rank["remote_share_expected"] == 0.5
    text = (tmp_path / "expert_parallel.md").read_text()
    assert result["machine"] in text and "| 4 | 2 | 1 |" in text
