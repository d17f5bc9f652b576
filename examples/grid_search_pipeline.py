"""GridSearchCV over the router and top_k of a MoE inside a Pipeline
=================================================================

Run it::

    python -m examples.grid_search_pipeline           # about 90 s on 2 CPU cores
    python -m examples.grid_search_pipeline --quick   # a tiny configuration, seconds

The MoE is an ordinary scikit-learn estimator, so its routing hyperparameters are searched
like any other step's: ``moeregressor__router``, ``moeregressor__top_k``. The grid is a list
of two grids because ``router="softmax"`` (every expert on every row) has no ``top_k``. The
data are the regime-switching data of ``examples.regime_switching`` (four input regions,
each with its own function).
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
from sklearn.model_selection import GridSearchCV, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from examples.regime_switching import CLASSIC_MOE, make_regime_data
from sklearn_moe import MoERegressor

PARAM_GRID = [
    {"moeregressor__router": ["topk", "noisy_topk"], "moeregressor__top_k": [1, 2, 4]},
    {"moeregressor__router": ["softmax"]},  # dense: top_k unused
]


def main(argv=None):
    """Run the grid search and print the configurations ranked by CV R^2.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; ``None`` reads ``sys.argv``.

    Returns
    -------
    pandas.DataFrame
        One row per configuration: router, top_k, mean and std test R^2, mean fit time, rank.
    """
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rows and epochs, 2 folds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    X, y, _ = make_regime_data(300 if args.quick else 1500, random_state=0)
    moe = MoERegressor(n_experts=8, expert_hidden=(16, 16), temperature=0.1, learning_rate=1e-2, batch_size=128,
                       max_epochs=5 if args.quick else 150, device="cpu", random_state=0, router="topk",
                       **CLASSIC_MOE)
    pipe = make_pipeline(StandardScaler(), moe)
    search = GridSearchCV(pipe, PARAM_GRID, cv=KFold(2 if args.quick else 3, shuffle=True, random_state=0),
                          scoring="r2")
    search.fit(X, y)
    results = pd.DataFrame(search.cv_results_)
    table = pd.DataFrame({
        "router": results["param_moeregressor__router"],
        "top_k": [str(int(k)) if router != "softmax" else "all" for router, k in
                  zip(results["param_moeregressor__router"], results["param_moeregressor__top_k"])],
        "r2_mean": results["mean_test_score"],
        "r2_std": results["std_test_score"],
        "fit_s": results["mean_fit_time"],
        "rank": results["rank_test_score"],
    }).sort_values("rank")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\nbest: {search.best_params_}, CV R^2 {search.best_score_:.4f}")
    return table


if __name__ == "__main__":
    main()
