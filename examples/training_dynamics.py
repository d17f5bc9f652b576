"""Training dynamics on regime-switching data
============================================

Routing metrics, annealing, collapse, the routing report, pruning and the plots.

Run it::

    python -m examples.training_dynamics           # about half a minute on 2 CPU cores
    python -m examples.training_dynamics --quick   # a tiny configuration, seconds

A sparse mixture (8 independent experts, top-2) learns the regime-switching data of
:mod:`examples.regime_switching` with its router's temperature annealed from 2 to 0.5 and
collapse recovery on. The script prints the last epoch's routing metrics, the routing
report on held-out rows, prunes the experts that serve less than 2% of the routing, and
writes four figures to ``examples/figures/`` (``training_dynamics_*.png``): the training
curves, the experts' utilization over the epochs, the routing against the target's
deciles, and the inputs coloured by first-choice expert.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from examples import FIGURES
from examples.regime_switching import make_regime_data
from sklearn_moe import MoERegressor
from sklearn_moe.plotting import (
    plot_expert_utilization,
    plot_routing_embedding,
    plot_routing_heatmap,
    plot_training_curves,
)

DEFAULT_OUT = FIGURES
METRICS = ["train_loss", "valid_loss", "temperature", "load_cv", "load_entropy", "routing_entropy",
           "valid_routing_instability", "valid_specialization"]


def main(argv=None):
    """Fit, report, prune and plot, with the command-line arguments ``argv`` (default:
    ``sys.argv``); returns a dict of ``model`` (pruned), ``report`` (the routing report
    before pruning), ``r2`` (held-out R^2 before and after) and ``figures`` (paths)."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rows and epochs: seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"figure folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    X, y, _ = make_regime_data(300 if args.quick else 2000, random_state=0)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    model = MoERegressor(n_experts=8, router="topk", top_k=2, expert_type="independent", expert_hidden=(64, 64),
                         numeric_embedding=None, temperature=2.0, temperature_final=0.5, collapse_recovery=True,
                         max_epochs=5 if args.quick else 80, random_state=0)
    model.fit(X_train, y_train)

    with pd.option_context("display.width", 140, "display.max_columns", 20, "display.precision", 3):
        print(f"Fitted {model.n_iter_} epochs. Routing metrics of the last epochs:")
        print(model.history_[[key for key in METRICS if key in model.history_]].tail(3).to_string())
        report = model.routing_report(X_test, y_test)
        print("\nRouting report on the held-out rows:")
        print(report.to_string())
    before = model.score(X_test, y_test)
    n_experts = model.n_experts
    model.prune_experts(0.02)
    after = model.score(X_test, y_test)
    print(f"\nprune_experts(0.02): {n_experts} -> {model.n_experts} experts; held-out R^2 {before:.4f} -> {after:.4f}")

    args.out.mkdir(parents=True, exist_ok=True)
    figures = {
        "curves": plot_training_curves(model),
        "utilization": plot_expert_utilization(model),
        "heatmap": plot_routing_heatmap(model, X_test, y_test),
        "embedding": plot_routing_embedding(model, X_test),
    }
    paths = []
    for name, figure in figures.items():
        path = args.out / f"training_dynamics_{name}.png"
        figure.savefig(path, dpi=80)
        paths.append(path)
    print("wrote " + ", ".join(str(path) for path in paths))
    return {"model": model, "report": report, "r2": (before, after), "figures": paths}


if __name__ == "__main__":
    main()
