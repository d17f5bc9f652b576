"""The examples double as smoke tests."""

import re


def test_demo_prints_scores_times_and_the_default_moes_comparisons(capsys, monkeypatch):
    import benchmarks.accuracy as accuracy
    from examples.demo import main

    # The demo's protocol on fewer rows and epochs: the output's form, in seconds.
    small = accuracy.CVSuite(folds=2, repeats=1, max_rows=150, moe_params={"max_epochs": 3},
                             models=accuracy.CV_SUITES["demo"].models)
    monkeypatch.setitem(accuracy.CV_SUITES, "demo", small)
    main(jobs=1)
    out = capsys.readouterr().out
    for model in ("MoE (defaults)", "MoE n_experts=1", "MoE router=uniform", "MLPRegressor", "HistGradientBoosting"):
        assert model in out
    assert "| regime |" in out and "| concrete |" in out
    assert len(re.findall(r"-?\d\.\d{4} ± \d\.\d{4}", out)) == 10  # 2 data sets x 5 models
    assert "The default MoE beats MoE n_experts=1 on" in out and "The default MoE beats MoE router=uniform on" in out
