"""Optuna tuning of a MoE with per-epoch pruning, and the study's visualisations
=============================================================================

Run it::

    python -m examples.tune_optuna                        # about a minute on 2 CPU cores
    python -m examples.tune_optuna --quick                # a tiny configuration, seconds
    python -m examples.tune_optuna --storage study.log    # a journal file other workers can join

``sklearn_moe.tuning.tune`` samples configurations from ``search_space`` (routers, expert
count and width, top-k, temperature, capacity, balance loss, learning rate, ...), scores each
by cross-validation and reports every fold's per-epoch validation loss to Optuna, so that the
median pruner stops a trial as soon as it falls behind the others at the same fold and epoch.
With ``--storage`` more workers can join the same study from other shells, each running the
same command (it is printed). The figures (optimisation history, parameter importances,
intermediate values) go to ``examples/figures/tune_optuna_*.png``. Data: the regime-switching data of
``examples.regime_switching``.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import optuna
import torch
from sklearn.model_selection import KFold

from examples import FIGURES
from examples.regime_switching import CLASSIC_MOE, make_regime_data
from sklearn_moe import MoERegressor
from sklearn_moe.tuning import search_space, tune

DEFAULT_OUT = FIGURES


def save_figures(study, out):
    """Optuna's matplotlib visualisations of ``study`` as PNG files in ``out``.

    Parameters
    ----------
    study : optuna.Study
    out : pathlib.Path

    Returns
    -------
    list of pathlib.Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out.mkdir(parents=True, exist_ok=True)
    plots = {"history": ovm.plot_optimization_history, "intermediate": ovm.plot_intermediate_values,
             "importances": ovm.plot_param_importances}
    paths = []
    for name, plot in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            ax = plot(study)
        if name == "intermediate":  # one line per trial: a legend of 30 trials hides the plot
            ax.get_legend().remove()
            ax.set_xlabel("step = fold * max_epochs + epoch")
            ax.set_ylabel("- mean validation loss over the folds so far")
            ax.set_title("Reported values (pruned trials stop early)")
        ax.figure.set_size_inches(8, 5)
        ax.figure.tight_layout()
        path = out / f"tune_optuna_{name}.png"
        ax.figure.savefig(path, dpi=80)
        plt.close(ax.figure)
        paths.append(path)
    return paths


def main(argv=None):
    """Tune, print the best configuration and the trial counts, save the figures.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; ``None`` reads ``sys.argv``.

    Returns
    -------
    sklearn_moe.tuning.TuneResult
        With ``figures`` (the written files) added.
    """
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rows, epochs and trials")
    parser.add_argument("--n-trials", type=int, default=None, help="trials (default 30; 6 with --quick)")
    parser.add_argument("--storage", help="journal file (*.log) or database URL to share the study")
    parser.add_argument("--study", default="tune_optuna_example", help="study name (with --storage)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"figure folder (default {DEFAULT_OUT})")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    n_trials = args.n_trials or (6 if args.quick else 30)
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    X, y, _ = make_regime_data(300 if args.quick else 1000, random_state=0)
    model = MoERegressor(batch_size=128, max_epochs=6 if args.quick else 60, device="cpu", random_state=0,
                         **dict(CLASSIC_MOE, n_iter_no_change=15))
    # The classic sparse MoE's space: its training recipe fixed, the routing searched.
    space = search_space(model, max_experts=8 if args.quick else 16, expert_widths=(16, 32),
                         expert_depths=(1, 2), exclude=["expert_type", "expert_loss", "numeric_embedding",
                                                        "lr_schedule", "router_lr_scale"])
    if args.storage:  # the same command builds the same data and space: another shell joins with it
        print("more workers can join this study: run the same command in other shells,\n  python -m "
              f"examples.tune_optuna --storage {args.storage} --study {args.study}"
              + (" --quick" if args.quick else "") + (f" --n-trials {args.n_trials}" if args.n_trials else ""))
    result = tune(model, X, y, n_trials=n_trials, cv=KFold(3, shuffle=True, random_state=0), scoring="r2",
                  storage=args.storage, study_name=args.study if args.storage else None,
                  param_distributions=space, random_state=0, warmup_epochs=2 if args.quick else 5)
    trials = result.study.trials
    counts = {state.name: sum(t.state == state for t in trials) for state in optuna.trial.TrialState}
    print("trials: " + ", ".join(f"{n} {name}" for name, n in counts.items() if n))
    print(f"best CV R^2 {result.best_score:.4f} with")
    for name, value in result.best_params.items():
        print(f"  {name} = {value!r}")
    result.figures = save_figures(result.study, args.out)
    print("figures: " + ", ".join(str(path) for path in result.figures))
    return result


if __name__ == "__main__":
    main()
