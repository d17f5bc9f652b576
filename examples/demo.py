"""The main demo: the default MoE against its own ablations and two baselines
==========================================================================

Run it::

    make demo          # or: python -m examples.demo   (two to three minutes on 2 CPU cores)

Three-fold cross-validation, the same folds and preprocessing for every model, on two data
sets (1200 rows at most each):

- ``regime``: synthetic data whose target follows a different function in each of four
  input regions (``examples/regime_switching.py``), where a mixture should pay;
- ``concrete``: a real table (modeldata concrete, compressive strength, 1030 rows).

The models: ``MoERegressor()`` at its defaults; the same with ``n_experts=1`` (one
network, no mixture) and with ``router="uniform"`` (the same experts averaged, no gate);
scikit-learn's ``MLPRegressor`` (fitted to the standardised target) and
``HistGradientBoostingRegressor``. Folds run in two processes. Prints R^2 (mean ± std over
folds, rank), fit times and which comparisons the default MoE wins.
"""

from __future__ import annotations

import time

from benchmarks.accuracy import run_suite
from benchmarks.accuracy_report import aggregate, score_table, summary_text, time_table


def main(jobs: int = 2) -> None:
    started = time.perf_counter()
    folds, _ = run_suite("demo", jobs=jobs)
    summary = aggregate(folds)
    print("R^2, 3-fold cross-validation (mean ± std, rank):\n")
    print(score_table(summary, "regression"))
    print("\nFit time per fold (s):\n")
    print(time_table(summary, "regression"))
    lines = [line for line in summary_text(folds, summary).splitlines() if line.startswith("- The default MoE beats")]
    print("\n" + "\n".join(lines))
    print(f"\nTotal: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
