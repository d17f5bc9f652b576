"""The tuning examples, run in their quick configurations (they double as smoke tests)."""

import numpy as np
import pytest

pytest.importorskip("optuna", reason="the tuning tests need the tune extra")
from sklearn_moe.tuning import one_standard_error_rule  # noqa: E402


@pytest.mark.slow
def test_grid_search_pipeline_example_ranks_every_configuration(capsys):
    from examples.grid_search_pipeline import main

    table = main(["--quick"])
    assert len(table) == 7 and sorted(table["rank"]) == list(range(1, 8))
    assert set(table["router"]) == {"topk", "noisy_topk", "softmax"}
    assert np.isfinite(table["r2_mean"]).all()
    assert "best:" in capsys.readouterr().out


@pytest.mark.slow
def test_tune_optuna_example_tunes_and_saves_figures(tmp_path):
    from examples.tune_optuna import main

    result = main(["--quick", "--out", str(tmp_path), "--n-trials", "4"])
    assert len(result.study.trials) == 4 and np.isfinite(result.best_score)
    assert result.best_estimator.predict(np.zeros((2, 5))).shape == (2,)
    for path in result.figures:
        assert path.parent == tmp_path and 0 < path.stat().st_size < 300_000


@pytest.mark.slow
def test_select_n_experts_example_writes_its_plot(tmp_path):
    from examples.select_n_experts import main, make_switching_linear_data

    result = main(["--quick", "--out", str(tmp_path)])
    assert list(result.cv_results_.index) == [1, 2, 4]
    table = result.cv_results_
    assert result.best_n_experts_ == one_standard_error_rule(table)
    # the one-SE rule: no smaller count is within a standard error of the best mean
    best = table.loc[table["mean_score"].idxmax()]
    smaller = table[table["n_experts"] < result.best_n_experts_]
    assert (smaller["mean_score"] < best["mean_score"] - best["sem_score"]).all()
    assert result.figure.parent == tmp_path and 0 < result.figure.stat().st_size < 300_000
    with pytest.raises(ValueError, match="n_regimes"):
        make_switching_linear_data(10, n_regimes=5)
