"""The throughput benchmark's measuring code (not its numbers: no timing is asserted)."""

import json

import pytest
import torch

from benchmarks import throughput
from sklearn_moe.nn import MixtureOfExperts


@pytest.mark.parametrize("n_parameters", [100, 5_000, 43_842, 1_000_000])
def test_the_dense_width_matches_the_parameter_count_best(n_parameters):
    width = throughput.dense_width(32, 1, n_parameters)
    error = abs(throughput.mlp_parameters(32, 1, width) - n_parameters)
    assert all(error <= abs(throughput.mlp_parameters(32, 1, w) - n_parameters) for w in (width - 1, width + 1))
    mlp = torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                              torch.nn.ReLU(), torch.nn.Linear(width, 1))
    assert sum(p.numel() for p in mlp.parameters()) == throughput.mlp_parameters(32, 1, width)


def test_active_parameters_are_the_router_and_top_k_experts():
    module = MixtureOfExperts(32, 1, n_experts=64, top_k=2, expert_hidden=(128, 128))
    per_expert = (32 * 128 + 128) + (128 * 128 + 128) + (128 + 1)
    assert throughput.active_parameters(module) == (32 * 64 + 64) + 2 * per_expert
    noisy = MixtureOfExperts(32, 1, n_experts=64, top_k=2, expert_hidden=(128, 128), router="noisy_topk")
    assert throughput.active_parameters(noisy) == throughput.active_parameters(module)  # noise: training only


def test_throughput_reports_both_models_per_batch_size(tmp_path):
    result = throughput.main(["--rows", "2048", "--batch-sizes", "256", "512", "4096", "--rounds", "1",
                              "--out", str(tmp_path)])
    assert [row["batch_size"] for row in result["rows"]] == [256, 512]  # no batch larger than the data
    for row in result["rows"]:
        assert row["ratio"] == pytest.approx(row["moe_rows_per_s"] / row["mlp_rows_per_s"])
        assert abs(row["mlp_parameters"] - row["moe_active_parameters"]) < row["mlp_width"]
        assert len(row["epoch_seconds"]["moe"]) == len(row["epoch_seconds"]["mlp"]) == 1
    assert result["command"] == "python -m benchmarks.throughput --rows 2048 --batch-sizes 256 512 4096 --rounds 1"
    assert json.loads((tmp_path / "throughput.json").read_text())["rows"] == result["rows"]
    with pytest.raises(ValueError, match="CUDA"):
        throughput.throughput(n_rows=64, batch_sizes=(32,), graph=True)
    with pytest.raises(SystemExit):  # no batch size fits: an error, not an empty result
        throughput.main(["--rows", "500", "--batch-sizes", "1024", "--out", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
