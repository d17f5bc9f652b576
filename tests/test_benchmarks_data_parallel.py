"""The data-parallel validation benchmark: its summary and report by hand, and one small
run in two gloo processes (no timing is asserted)."""

import json

import pytest

from benchmarks import data_parallel as bench


def runs():
    return {"shared_out": [dict(train_s_per_epoch=1.0, valid_s_per_epoch=0.2, valid_rows=50, valid_loss=0.5),
                           dict(train_s_per_epoch=3.0, valid_s_per_epoch=0.4, valid_rows=50, valid_loss=0.5),
                           dict(train_s_per_epoch=2.0, valid_s_per_epoch=0.3, valid_rows=50, valid_loss=0.5)],
            "whole": [dict(train_s_per_epoch=2.0, valid_s_per_epoch=0.5, valid_rows=100, valid_loss=0.5),
                      dict(train_s_per_epoch=2.2, valid_s_per_epoch=0.7, valid_rows=100, valid_loss=0.5),
                      dict(train_s_per_epoch=2.4, valid_s_per_epoch=0.6, valid_rows=100, valid_loss=0.5)]}


def test_summary_takes_the_medians_and_the_validation_pass_ratio():
    summary = bench.summarize(runs())
    assert summary["shared_out"] == dict(train_s_per_epoch=2.0, valid_s_per_epoch=0.3, valid_rows=50, valid_loss=0.5)
    assert summary["whole"]["valid_s_per_epoch"] == 0.6 and summary["whole"]["valid_rows"] == 100
    assert summary["valid_pass_shared_over_whole"] == pytest.approx(0.5)


def test_report_names_the_command_machine_and_both_ways():
    result = dict(command="python -m benchmarks.data_parallel", machine="a machine", runs=runs(),
                  config=dict(world_size=2, threads=1, rows=200, validation_fraction=0.5, epochs=3, repeats=3),
                  summary=bench.summarize(runs()))
    text = bench.markdown_report(result)
    assert "a machine" in text and "`python -m benchmarks.data_parallel`" in text
    assert "| shared out (a plain fit) | 50 | 2.000 | 0.300 | 0.500000 |" in text
    assert "shared out over whole: 0.50." in text


@pytest.mark.slow
def test_small_run_in_two_processes_halves_the_validation_rows(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    bench.main(["--rows", "600", "--epochs", "2", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "data_parallel.json").read_text())
    assert result["benchmark"] == "data_parallel" and result["command"].endswith("--repeats 1 --out " + str(tmp_path))
    shared, whole = result["summary"]["shared_out"], result["summary"]["whole"]
    # 120 validation rows (a fifth of 600): 60 on each process, or all of them
    assert (shared["valid_rows"], whole["valid_rows"]) == (60, 120)
    assert shared["valid_loss"] == pytest.approx(whole["valid_loss"], rel=1e-5)
    assert min(shared["train_s_per_epoch"], shared["valid_s_per_epoch"], whole["valid_s_per_epoch"]) > 0
    assert result["machine"] in (tmp_path / "data_parallel.md").read_text()
