"""Predictive distributions: a mixture of Gaussians from a mixture of experts
==========================================================================

Run it::

    python -m examples.predictive_distributions           # about half a minute on 2 CPU cores
    python -m examples.predictive_distributions --quick   # a tiny configuration, seconds

Two synthetic one-input problems, fitted with ``MoERegressor(output="mixture_density")``:

- heteroscedastic: ``y = sin(2x) + noise`` whose spread grows with ``|x|``; the default
  per-expert objective, and a 90% interval that widens where the noise does;
- bimodal: ``y = x +- 2 + noise``, two modes at every input; ``expert_loss="mixture"``,
  under which the experts split the modes.

The script prints the held-out 90% coverage and the negative log-likelihood against a
constant-variance Gaussian around the point model, and writes
``examples/figures/predictive_distributions.png``: the data, the mixture's mean and 90%
interval, and, for the bimodal problem, each expert's mean weighted by its gate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy.stats import norm

from examples import FIGURES
from sklearn_moe import MoERegressor

DEFAULT_OUT = FIGURES


def heteroscedastic_data(n, random_state=0):
    rng = np.random.RandomState(random_state)
    x = rng.uniform(-2, 2, size=n)
    return x[:, None], np.sin(2 * x) + (0.05 + 0.5 * np.abs(x)) * rng.normal(size=n)


def bimodal_data(n, random_state=0):
    rng = np.random.RandomState(random_state)
    x = rng.uniform(-1, 1, size=n)
    return x[:, None], x + np.where(rng.uniform(size=n) < 0.5, -2.0, 2.0) + 0.2 * rng.normal(size=n)


def gaussian_nll(point, X_train, y_train, X_test, y_test):
    """NLL of a constant-variance Gaussian around a point model (its training residuals' variance)."""
    sd = np.sqrt(np.mean((point.predict(X_train) - y_train) ** 2))
    return float(np.mean(-norm.logpdf(y_test, point.predict(X_test), sd)))


def main(argv=None):
    """Fit both problems, print the scores and write the figure, with the command-line
    arguments ``argv`` (default: ``sys.argv``); returns a dict of scores per problem and
    the figure's path."""
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rows and epochs: seconds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"figure folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    n, epochs = (400, 5) if args.quick else (3000, 60)
    problems = {"heteroscedastic": (heteroscedastic_data, "per_expert"), "bimodal": (bimodal_data, "mixture")}
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    axes = figure.subplots(1, 2)
    scores = {}
    for panel, (name, (make, expert_loss)) in zip(axes, problems.items()):
        X, y = make(n, random_state=0)
        X_test, y_test = make(n // 2, random_state=1)
        params = dict(n_experts=4, max_epochs=epochs, random_state=0)
        density = MoERegressor(output="mixture_density", expert_loss=expert_loss, **params).fit(X, y)
        point = MoERegressor(**params).fit(X, y)
        low, high = density.predict_quantiles(X_test, [0.05, 0.95]).T
        scores[name] = {"coverage": float(np.mean((y_test >= low) & (y_test <= high))),
                        "nll": density.score_nll(X_test, y_test),
                        "gaussian_nll": gaussian_nll(point, X, y, X_test, y_test)}
        print(f"{name}: 90% interval covers {scores[name]['coverage']:.3f} of held-out rows; NLL "
              f"{scores[name]['nll']:.3f} (a Gaussian around the point model: {scores[name]['gaussian_nll']:.3f})")
        grid = np.linspace(X[:, 0].min(), X[:, 0].max(), 200)[:, None]
        mean = density.predict(grid)
        grid_low, grid_high = density.predict_quantiles(grid, [0.05, 0.95]).T
        panel.scatter(X[:, 0], y, s=3, alpha=0.25, color="grey", label="training rows")
        panel.plot(grid[:, 0], mean, color="C0", label="mixture mean")
        panel.fill_between(grid[:, 0], grid_low, grid_high, color="C0", alpha=0.2, label="90% interval")
        if name == "bimodal":
            parts = density.predict_distribution(grid)
            for expert in range(parts["means"].shape[1]):
                weight = parts["weights"][:, expert]
                if weight.max() > 0.05:
                    panel.plot(grid[:, 0], parts["means"][:, expert], ls="--", lw=0.5 + 2 * weight.mean(),
                               label=f"expert {expert} mean (gate {weight.mean():.2f})")
        panel.set(title=f"{name} (expert_loss={expert_loss!r})", xlabel="x", ylabel="y")
        panel.legend(fontsize=7)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "predictive_distributions.png"
    figure.savefig(path, dpi=80)
    print(f"wrote {path}")
    return {"scores": scores, "figure": path}


if __name__ == "__main__":
    main()
