"""The examples double as smoke tests."""

import re

import pytest


@pytest.mark.slow
def test_demo_prints_a_table_of_all_models(capsys):
    from examples.demo import main

    main()
    out = capsys.readouterr().out
    for model in ("MoERegressor (defaults)", "MoEClassifier (defaults)", "MLPRegressor", "HistGradientBoosting"):
        assert model in out
    scores = [float(s) for s in re.findall(r"\| (-?\d\.\d{4}) ±", out)]
    assert len(scores) == 8
    moe_rows = [line for line in out.splitlines() if "MoE" in line]
    assert all(float(re.search(r"(-?\d\.\d{4}) ±", line).group(1)) > 0.3 for line in moe_rows)
