"""Regime switching: a top-k MoE against dense MLPs with the same active parameter count
=====================================================================================

Run it::

    python -m examples.regime_switching               # about a minute on 2 CPU cores
    python -m examples.regime_switching --quick       # a tiny configuration, seconds
    python -m examples.regime_switching --with-total  # also a dense MLP of the MoE's total size

The synthetic data have a few input regions ("regimes"), picked by two selector features,
and each regime's target is a different function of three other features (a sine, a
quadratic, a linear map, a kink plus a smooth step, ...). A sparse Mixture-of-Experts can
give every regime its own expert and run only ``top_k`` of them per row, so it holds several
times more parameters than it uses on any one row. The comparison is at equal *active*
parameters: the dense baselines are an MLP of the same training loop (``MoERegressor`` with
``n_experts=1``, the non-MoE ablation) and scikit-learn's ``MLPRegressor``, both with hidden
widths chosen so that their parameter count matches the MoE's parameters per row.

Every model is scored by the same 5-fold ``KFold(shuffle=True, random_state=0)``
cross-validation (mean squared error and R^2). Two figures are written to ``--out``
(default ``examples/figures/``): the cross-validated MSE per model, and the regimes of the
held-out rows of the first fold next to the expert the fitted MoE routes each of them to.

The MoE uses a sharp router (``temperature=0.1``) and ``top_k=2``: with ``top_k=1`` the
gate weight of a row is the constant 1 and the gate learns only from the weak
straight-through signal, and at ``temperature=1`` the experts specialise on a random early
split of the rows before the gate has found the regimes. ``--seed`` changes the data and the
models' initialisation (not the folds), to check that the comparison does not hang on one
seed.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import KFold, cross_validate
from sklearn.neural_network import MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state

from examples import FIGURES
from sklearn_moe import MoERegressor

DEFAULT_OUT = FIGURES

#: The regime functions of the three "function" features ``a, b, c``, in regime order.
REGIME_FUNCTIONS = {
    "sine": lambda a, b, c: 1.5 * np.sin(3 * a) + 1.5 * np.cos(3 * b),
    "quadratic": lambda a, b, c: 2 * (a**2 - b**2) + 2 * a * c,
    "linear": lambda a, b, c: -2 * a + 1.5 * b - c,
    "kink + step": lambda a, b, c: 2 * np.abs(a + b) - 1 + 1.5 * np.tanh(5 * c),
    "product": lambda a, b, c: 3 * a * b - 1.5 * c**2 + 0.5,
    "linear (other slopes)": lambda a, b, c: 2 * a + 2 * c - b,
}

# The MoE of the full run and the training settings that every MoERegressor shares.
MOE_CONFIG = {"n_experts": 8, "top_k": 2, "expert_hidden": (16, 16)}
TRAINING = {"learning_rate": 1e-2, "batch_size": 128, "max_epochs": 200}
# The classic sparse MoE: independent experts trained on the mixture's loss, no numeric
# embedding, a gate that learns as fast as the experts, a plateau schedule.
CLASSIC_MOE = {"expert_type": "independent", "expert_loss": "mixture", "numeric_embedding": None,
               "router_lr_scale": 1.0, "lr_schedule": "plateau", "dropout": 0.0, "weight_decay": 1e-4,
               "n_iter_no_change": 30}
# A sharp router (low softmax temperature) gives the gate a strong gradient early in
# training; at the default temperature of 1 the experts specialise on a random early
# partition of the rows before the gate has learned the regimes.
TEMPERATURE = 0.1


def make_regime_data(n_samples=2000, n_regimes=4, n_features=5, noise=0.1, spread=0.5, random_state=None):
    """Synthetic regime-switching regression data.

    The first two features are *selectors*: each row is drawn around one of ``n_regimes``
    centres spaced evenly on a circle (adjacent centres 3 apart, Gaussian ``spread``), and
    its regime is the nearest centre, so the regime is a deterministic function of the
    inputs. Features 3 to 5 (``a, b, c``) are uniform on [-1, 1] and the target is the
    regime's function of them (see :data:`REGIME_FUNCTIONS`) plus Gaussian noise. Further
    features, if any, are uniform noise the target does not depend on.

    Parameters
    ----------
    n_samples : int, default=2000
        Number of rows.
    n_regimes : int, default=4
        Number of regimes, 2 to ``len(REGIME_FUNCTIONS)`` (6).
    n_features : int, default=5
        Number of features, at least 5.
    noise : float, default=0.1
        Standard deviation of the Gaussian noise added to the target.
    spread : float, default=0.5
        Standard deviation of the selector features around their regime's centre.
    random_state : int, RandomState instance or None, default=None
        Seed; the same seed gives the same data.

    Returns
    -------
    X : ndarray of shape (n_samples, n_features)
        The features, selectors first.
    y : ndarray of shape (n_samples,)
        The target.
    regime : ndarray of shape (n_samples,), int
        The regime of every row, in ``range(n_regimes)``.
    """
    if not 2 <= n_regimes <= len(REGIME_FUNCTIONS):
        raise ValueError(f"n_regimes must be in [2, {len(REGIME_FUNCTIONS)}], got {n_regimes}")
    if n_features < 5:
        raise ValueError(f"n_features must be at least 5 (2 selectors + 3 function inputs), got {n_features}")
    rng = check_random_state(random_state)
    angles = 2 * np.pi * np.arange(n_regimes) / n_regimes + np.pi / 4
    radius = 1.5 / np.sin(np.pi / n_regimes)  # adjacent centres are 3 apart
    centres = radius * np.c_[np.cos(angles), np.sin(angles)]
    drawn = rng.randint(n_regimes, size=n_samples)
    selectors = centres[drawn] + spread * rng.normal(size=(n_samples, 2))
    regime = ((selectors[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1).argmin(axis=1)
    rest = rng.uniform(-1, 1, size=(n_samples, n_features - 2))
    a, b, c = rest[:, 0], rest[:, 1], rest[:, 2]
    y = np.empty(n_samples)
    for r, function in enumerate(list(REGIME_FUNCTIONS.values())[:n_regimes]):
        rows = regime == r
        y[rows] = function(a[rows], b[rows], c[rows])
    y += noise * rng.normal(size=n_samples)
    return np.c_[selectors, rest], y, regime


def mlp_param_count(n_inputs, hidden, n_outputs=1):
    """Weights and biases of a fully connected network ``n_inputs -> *hidden -> n_outputs``.

    Parameters
    ----------
    n_inputs : int
    hidden : tuple of int
        Hidden layer sizes.
    n_outputs : int, default=1

    Returns
    -------
    int
    """
    widths = (n_inputs, *hidden, n_outputs)
    return int(sum(w_in * w_out + w_out for w_in, w_out in zip(widths[:-1], widths[1:])))


def moe_param_counts(n_features, n_experts, top_k, expert_hidden, n_outputs=1):
    """Active and total parameters of a top-k MoE with a linear router.

    Each expert is an MLP ``n_features -> *expert_hidden -> n_outputs``; the router is a
    linear map ``n_features -> n_experts`` (``n_features * n_experts + n_experts``). A row
    runs the router and ``top_k`` experts.

    Parameters
    ----------
    n_features : int
    n_experts : int
    top_k : int
        At most ``n_experts`` experts are used.
    expert_hidden : tuple of int
    n_outputs : int, default=1

    Returns
    -------
    dict
        ``"expert"``: parameters of one expert; ``"router"``: of the router; ``"active"``:
        per row, ``min(top_k, n_experts) * expert + router``; ``"total"``:
        ``n_experts * expert + router``.
    """
    expert = mlp_param_count(n_features, expert_hidden, n_outputs)
    router = n_features * n_experts + n_experts
    return {
        "expert": expert,
        "router": router,
        "active": min(top_k, n_experts) * expert + router,
        "total": n_experts * expert + router,
    }


def matched_hidden(target, n_inputs, n_layers=2, n_outputs=1, extra=0):
    """The equal-width hidden layers whose parameter count is closest to ``target``.

    Parameters
    ----------
    target : int
        Parameter count to match.
    n_inputs : int
    n_layers : int, default=2
        Number of hidden layers, all of the same width.
    n_outputs : int, default=1
    extra : int, default=0
        Parameters the model has besides the MLP (e.g. the 1-expert router of
        ``MoERegressor(n_experts=1)``).

    Returns
    -------
    hidden : tuple of int
        ``n_layers`` equal widths.
    count : int
        The parameter count with them, ``extra`` included.
    """
    best = None
    for width in range(1, max(2, int(target)) + 1):
        count = mlp_param_count(n_inputs, (width,) * n_layers, n_outputs) + extra
        if best is None or abs(count - target) < abs(best[1] - target):
            best = ((width,) * n_layers, count)
        if count > target:
            break
    return best


def build_models(n_features, quick=False, with_total=False, random_state=0):
    """The compared models and their parameter counts.

    Parameters
    ----------
    n_features : int
    quick : bool, default=False
        Few epochs and iterations, for a fast smoke run.
    with_total : bool, default=False
        Also a dense MLP (``MoERegressor(n_experts=1)``) as large as the MoE's *total*
        parameter count: a reference that runs several times more parameters per row.
    random_state : int, default=0

    Returns
    -------
    models : dict
        Name -> unfitted estimator. The first is the MoE.
    params : dict
        Name -> parameters per row (for the MoE, its active parameters).
    counts : dict
        The MoE's parameter counts from :func:`moe_param_counts`.
    """
    counts = moe_param_counts(n_features, **MOE_CONFIG)
    training = dict(TRAINING, max_epochs=10) if quick else dict(TRAINING)
    # MoERegressor(n_experts=1) keeps its 1-expert router: n_features + 1 parameters.
    dense_hidden, dense_count = matched_hidden(counts["active"], n_features, extra=n_features + 1)
    sk_hidden, sk_count = matched_hidden(counts["active"], n_features)
    moe_name = "MoE top-{top_k} of {n_experts}, experts {expert_hidden}".format(**MOE_CONFIG)
    dense_name = f"dense MLP (MoERegressor n_experts=1) {dense_hidden}"
    sk_name = f"sklearn MLPRegressor {sk_hidden}"
    common = dict(CLASSIC_MOE, router="topk", device="cpu", random_state=random_state, **training)
    models = {
        moe_name: MoERegressor(temperature=TEMPERATURE, **MOE_CONFIG, **common),
        dense_name: MoERegressor(n_experts=1, top_k=1, expert_hidden=dense_hidden, **common),
        sk_name: make_pipeline(
            StandardScaler(),
            MLPRegressor(hidden_layer_sizes=sk_hidden, max_iter=30 if quick else 3000, early_stopping=True,
                         n_iter_no_change=30, random_state=random_state),
        ),
    }
    params = {moe_name: counts["active"], dense_name: dense_count, sk_name: sk_count}
    if with_total:
        big_hidden, big_count = matched_hidden(counts["total"], n_features, extra=n_features + 1)
        big_name = f"dense MLP, MoE's total params {big_hidden}"
        models[big_name] = MoERegressor(n_experts=1, top_k=1, expert_hidden=big_hidden, **common)
        params[big_name] = big_count
    return models, params, counts


def cross_validate_models(models, X, y, n_folds=5):
    """Score every model by the same shuffled K-fold cross-validation.

    Parameters
    ----------
    models : dict
        Name -> estimator.
    X : ndarray of shape (n_samples, n_features)
    y : ndarray of shape (n_samples,)
    n_folds : int, default=5

    Returns
    -------
    scores : dict
        Name -> the ``cross_validate`` result, with the fitted estimators and the fold
        indices.
    """
    cv = KFold(n_folds, shuffle=True, random_state=0)
    scores = {}
    for name, model in models.items():
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            scores[name] = cross_validate(
                model, X, y, cv=cv, scoring={"mse": "neg_mean_squared_error", "r2": "r2"},
                return_estimator=True, return_indices=True,
            )
        print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return scores


def summarize(scores, params):
    """One row per model: parameters per row, CV MSE and R^2 (mean, std), fit time.

    Parameters
    ----------
    scores : dict
        Name -> ``cross_validate`` result.
    params : dict
        Name -> parameters per row.

    Returns
    -------
    pandas.DataFrame
    """
    rows = []
    for name, result in scores.items():
        mse = -result["test_mse"]
        rows.append({
            "model": name,
            "active_params": params[name],
            "mse_mean": mse.mean(),
            "mse_std": mse.std(),
            "r2_mean": result["test_r2"].mean(),
            "r2_std": result["test_r2"].std(),
            "fit_time_s": result["fit_time"].mean(),
            "fold_mse": mse,
        })
    return pd.DataFrame(rows)


def format_table(results):
    """The results as a fixed-width text table.

    Parameters
    ----------
    results : pandas.DataFrame
        From :func:`summarize`.

    Returns
    -------
    str
    """
    width = max(len("model"), *(len(name) for name in results["model"]))
    lines = [f"{'model':<{width}} | active params | CV MSE            | CV R^2            | fit s/fold"]
    lines.append("-" * len(lines[0]))
    for row in results.itertuples():
        lines.append(
            f"{row.model:<{width}} | {row.active_params:>13} | {row.mse_mean:.4f} ± {row.mse_std:.4f} "
            f"   | {row.r2_mean:.4f} ± {row.r2_std:.4f}    | {row.fit_time_s:>10.1f}"
        )
    return "\n".join(lines)


def routing_table(regime, expert, n_experts):
    """Rows per (true regime, top expert) pair.

    Parameters
    ----------
    regime : ndarray of shape (n,), int
    expert : ndarray of shape (n,), int
    n_experts : int

    Returns
    -------
    pandas.DataFrame
        Index: regimes; columns: experts.
    """
    table = np.zeros((regime.max() + 1, n_experts), dtype=int)
    np.add.at(table, (regime, expert), 1)
    return pd.DataFrame(table, index=pd.Index(range(len(table)), name="regime"),
                        columns=pd.Index(range(n_experts), name="expert"))


def plot_scores(results, path):
    """Cross-validated MSE per model: mean ± std, and every fold's MSE.

    Parameters
    ----------
    results : pandas.DataFrame
        From :func:`summarize`.
    path : path-like
        PNG file to write.
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.8 * len(results) + 1.5))
    positions = np.arange(len(results))[::-1]
    for i, (pos, row) in enumerate(zip(positions, results.itertuples())):
        ax.errorbar(row.mse_mean, pos, xerr=row.mse_std, fmt="o", capsize=4, color="C0" if i == 0 else "C1")
        ax.scatter(row.fold_mse, np.full(len(row.fold_mse), pos - 0.18), s=12, color="grey", alpha=0.7)
    labels = [f"{row.model}\n{row.active_params} active params" for row in results.itertuples()]
    ax.set_yticks(positions, labels, fontsize=8)
    ax.set_ylim(positions.min() - 0.6, positions.max() + 0.6)
    ax.set_xlim(0, 1.1 * max(np.max(mse) for mse in results["fold_mse"]))
    ax.set_xlabel("cross-validated MSE: mean ± std, grey dots are the folds (lower is better)", fontsize=9)
    ax.set_title("Regime-switching regression at equal active parameters", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_routing(X, regime, expert, n_experts, path):
    """Selector features coloured by true regime, by top expert, and the regime-expert table.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
        Rows to plot; the first two columns are the selectors.
    regime : ndarray of shape (n,), int
    expert : ndarray of shape (n,), int
        The MoE's top expert (``route(X).argmax(axis=1)``) of every row.
    n_experts : int
    path : path-like
        PNG file to write.
    """
    import matplotlib.pyplot as plt

    names = list(REGIME_FUNCTIONS)
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    cmap = plt.get_cmap("tab10")
    for ax, labels, legend, title in (
        (axes[0], regime, [f"{r}: {name}" for r, name in enumerate(names)], "true regime"),
        (axes[1], expert, [f"expert {e}" for e in range(n_experts)], "top expert of the fitted MoE"),
    ):
        for value, label in enumerate(legend):
            rows = labels == value
            if rows.any():
                ax.scatter(X[rows, 0], X[rows, 1], s=6, color=cmap(value % 10), label=label, rasterized=True)
        ax.set_xlabel("selector 1 (x0)")
        ax.set_ylabel("selector 2 (x1)")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.legend(fontsize=7, markerscale=2, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=4,
                  frameon=False, handletextpad=0.2, columnspacing=0.8)
    table = routing_table(regime, expert, n_experts)
    share = table.to_numpy() / table.to_numpy().sum(axis=1, keepdims=True)
    image = axes[2].imshow(share, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        if value:
            axes[2].text(j, i, value, ha="center", va="center", fontsize=7,
                         color="white" if share[i, j] > 0.6 else "black")
    axes[2].set_xticks(range(n_experts))
    axes[2].set_yticks(range(len(table)), [f"{i}: {names[i]}" for i in range(len(table))], fontsize=8)
    axes[2].set_xlabel("top expert")
    axes[2].set_title("held-out rows per (regime, top expert)", fontsize=10)
    fig.colorbar(image, ax=axes[2], label="share of the regime's rows", fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    """Run the comparison, print the table and write the figures.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments; ``None`` reads ``sys.argv``.

    Returns
    -------
    pandas.DataFrame
        One row per model (see :func:`summarize`); ``attrs["figures"]`` lists the written
        files, ``attrs["routing"]`` is the regime-by-expert table of the first fold's held-out
        rows and ``attrs["routing_purity"]`` the share of those rows whose top expert is the
        one most of their regime goes to.
    """
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--n-samples", type=int, default=None, help="rows of data (default 2000; 300 with --quick)")
    parser.add_argument("--n-regimes", type=int, default=4, help="number of regimes, 2..6 (default 4)")
    parser.add_argument("--quick", action="store_true", help="tiny and fast: few rows and epochs, 2 folds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"figure folder (default {DEFAULT_OUT})")
    parser.add_argument("--with-total", action="store_true",
                        help="also a dense MLP with the MoE's total parameter count (about a minute more)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data and the models (default 0; the CV folds always use 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the models are tiny)")
    args = parser.parse_args(argv)
    n_samples = args.n_samples or (300 if args.quick else 2000)
    n_folds = 2 if args.quick else 5

    import matplotlib

    matplotlib.use("Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        X, y, regime = make_regime_data(n_samples, n_regimes=args.n_regimes, random_state=args.seed)
        models, params, counts = build_models(X.shape[1], quick=args.quick, with_total=args.with_total,
                                               random_state=args.seed)
        print(f"{n_samples} rows, {X.shape[1]} features, {args.n_regimes} regimes; {n_folds}-fold CV")
        print(f"MoE {MOE_CONFIG}: {counts['expert']} parameters per expert, router {counts['router']}; "
              f"active per row {counts['active']}, total {counts['total']}")
        for name, count in params.items():
            print(f"  {name}: {count} parameters per row ({100 * (count / counts['active'] - 1):+.1f}% "
                  "vs the MoE's active count)")
        print("fitting:")
        scores = cross_validate_models(models, X, y, n_folds=n_folds)
    finally:
        torch.set_num_threads(threads)
    results = summarize(scores, params)
    print()
    print(format_table(results))
    moe_folds = results["fold_mse"].iloc[0]
    for row in results.iloc[1:].itertuples():
        wins = int((moe_folds < row.fold_mse).sum())
        print(f"MoE vs {row.model}: MSE {100 * (row.mse_mean - results['mse_mean'].iloc[0]) / row.mse_mean:.0f}% "
              f"lower on average, lower on {wins} of {n_folds} folds (the same folds)")

    moe_name = next(iter(models))
    moe, test_rows = scores[moe_name]["estimator"][0], scores[moe_name]["indices"]["test"][0]
    expert = moe.route(X[test_rows]).argmax(axis=1)
    routing = routing_table(regime[test_rows], expert, moe.n_experts)
    purity = routing.to_numpy().max(axis=0).sum() / len(test_rows)
    print(f"\nrouting of fold 1's held-out rows (rows per regime and top expert; purity {purity:.3f}):")
    print(routing.to_string())

    args.out.mkdir(parents=True, exist_ok=True)
    figures = [args.out / "regime_switching_cv_mse.png", args.out / "regime_switching_routing.png"]
    plot_scores(results, figures[0])
    plot_routing(X[test_rows], regime[test_rows], expert, moe.n_experts, figures[1])
    print("\nfigures: " + ", ".join(str(path) for path in figures))
    results.attrs["figures"] = figures
    results.attrs["routing"] = routing
    results.attrs["routing_purity"] = purity
    return results


if __name__ == "__main__":
    main()
