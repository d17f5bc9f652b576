import json

from benchmarks.kernel_profile import kernel_profile, main


def test_kernel_profile_ranks_each_counts_operators_and_what_grew_with_the_experts():
    result = kernel_profile(expert_counts=(2, 8), steps=2, top=200)
    assert [row["n_experts"] for row in result["rows"]] == [2, 8]
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["busy_ms"] > 0 and row["kernels"] > 0
        times = [entry["ms"] for entry in row["top"]]
        assert len(times) > 5 and times == sorted(times, reverse=True)
        assert sum(entry["share"] for entry in row["top"]) <= 1 + 1e-9
        assert all(entry["calls"] > 0 for entry in row["top"])
        assert "all" not in row
    # Eight experts route their rows (a plan, gathers): operators the two-expert step never runs.
    assert result["growth"] and all(entry["ms_at_8"] > entry["ms_at_2"] for entry in result["growth"])
    assert any(entry["ms_at_2"] == 0 for entry in result["growth"])
    assert result["rows"][1]["kernels"] > result["rows"][0]["kernels"]
    assert result["command"] == "python -m benchmarks.kernel_profile" and result["device"] == "cpu"


def test_kernel_profile_on_the_sync_free_paths_writes_its_own_file(tmp_path):
    main(["--experts", "2", "4", "--steps", "1", "--sync-free", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "kernel_profile_sync_free.json").read_text())
    assert result["config"]["sync_free"] and result["command"].endswith("--sync-free")
    assert len(result["rows"]) == 2
