"""Tables, summary and figure of the repeated-CV accuracy suites (``quick``, ``full``).

Input: the per-fold results of :func:`benchmarks.accuracy.run_suite`. Output:
``<stem>.md``, ``<stem>.csv`` (every fold) and ``<stem>.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .datasets import DATASETS
from .models import DEFAULT_MODELS, MODEL_NOTES, MODEL_SPECS, lightgbm_available

#: The score that ranks the models, per task; higher is better.
PRIMARY = {"regression": "r2", "classification": "accuracy"}
METRIC_LABEL = {"r2": "R^2", "accuracy": "accuracy", "log_loss": "log loss"}
TASKS = ("regression", "classification")


def ranked_models(keys, skipped=()) -> list[str]:
    """The models ranked against one another: not ablations, and run on every data set.

    Parameters
    ----------
    keys : iterable of str
        Model keys of the run.
    skipped : iterable of (dataset, key, limit)
        Pairs left out by a suite's ``model_max_rows``.

    Returns
    -------
    list of str
    """
    partial = {key for _, key, _ in skipped}
    return [key for key in keys if key not in partial
            and not (key in MODEL_SPECS and MODEL_SPECS[key].role == "ablation")]


def aggregate(folds: pd.DataFrame, ranked=None) -> pd.DataFrame:
    """Mean and std over folds, fit time and ranks; one row per data set and model.

    Parameters
    ----------
    folds : DataFrame
        Per-fold results (dataset, task, model_key, model, the scores, fit_time_s, error).
    ranked : list of str, optional
        The models that get ranks (the others' ranks are NaN); all when None.

    Returns
    -------
    DataFrame
        Columns: dataset, task, model_key, model, metric, mean, std, rank (1 = best mean
        score of the data set; ties share the better rank), fit_time_s, predict_time_s,
        n_folds, n_failed, and for classification log_loss_mean, log_loss_std,
        log_loss_rank (1 = lowest).
    """
    rows = []
    for (dataset, key), group in folds.groupby(["dataset", "model_key"], sort=False):
        task = group["task"].iloc[0]
        metric = PRIMARY[task]
        scores = group[metric] if metric in group else pd.Series(np.nan, index=group.index)
        row = {
            "dataset": dataset, "task": task, "model_key": key, "model": group["model"].iloc[0], "metric": metric,
            "mean": scores.mean(), "std": scores.std(ddof=0), "fit_time_s": group["fit_time_s"].mean(),
            "predict_time_s": group["predict_time_s"].mean(), "n_folds": len(group),
            "n_failed": int((group["error"].fillna("") != "").sum()),
        }
        if task == "classification":
            losses = group["log_loss"] if "log_loss" in group else pd.Series(np.nan, index=group.index)
            row.update(log_loss_mean=losses.mean(), log_loss_std=losses.std(ddof=0))
        rows.append(row)
    summary = pd.DataFrame(rows)
    if summary.empty:
        return summary
    among = summary["model_key"].isin(summary["model_key"] if ranked is None else ranked)
    summary["rank"] = summary["mean"].where(among).groupby(summary["dataset"]).rank(ascending=False, method="min")
    if "log_loss_mean" in summary:
        losses = summary["log_loss_mean"].where(among)
        summary["log_loss_rank"] = losses.groupby(summary["dataset"]).rank(ascending=True, method="min")
    return summary


def _markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(mean, std, rank, digits=4):
    if not np.isfinite(mean):
        return "failed"
    if not np.isfinite(rank):
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    text = f"{mean:.{digits}f} ± {std:.{digits}f} ({rank:.0f})"
    return f"**{text}**" if rank == 1 else text


def score_table(summary: pd.DataFrame, task: str, column: str = "mean") -> str:
    """Markdown table of one task: data sets as rows, models as columns.

    Parameters
    ----------
    summary : DataFrame
        Output of :func:`aggregate`.
    task : {"regression", "classification"}
        Which data sets.
    column : {"mean", "log_loss_mean"}, default="mean"
        The primary score, or the log loss (classification).

    Returns
    -------
    str
        Cells read ``mean ± std (rank)``; rank 1 is in bold.
    """
    part = summary[summary["task"] == task]
    models = list(dict.fromkeys(part["model"]))
    prefix = column[: -len("mean")]
    rows = []
    for dataset, group in part.groupby("dataset", sort=False):
        by_model = group.set_index("model")
        rows.append([dataset] + [
            _cell(by_model.loc[m, prefix + "mean"], by_model.loc[m, prefix + "std"], by_model.loc[m, prefix + "rank"])
            if m in by_model.index else "" for m in models
        ])
    return _markdown(["dataset"] + models, rows)


def time_table(summary: pd.DataFrame, task: str) -> str:
    """Markdown table of the mean fit time per fold (seconds), data sets by models.

    Parameters
    ----------
    summary : DataFrame
        Output of :func:`aggregate`.
    task : {"regression", "classification"}
        Which data sets.

    Returns
    -------
    str
    """
    part = summary[summary["task"] == task]
    models = list(dict.fromkeys(part["model"]))
    rows = []
    for dataset, group in part.groupby("dataset", sort=False):
        times = group.set_index("model")["fit_time_s"]
        rows.append([dataset] + [f"{times[m]:.2f}" if m in times.index else "" for m in models])
    return _markdown(["dataset"] + models, rows)


def average_ranks(summary: pd.DataFrame) -> pd.DataFrame:
    """Average rank of every model, per task and over all data sets.

    Parameters
    ----------
    summary : DataFrame
        Output of :func:`aggregate`.

    Returns
    -------
    DataFrame
        Index: model key; columns: display name, ``regression``, ``classification``,
        ``all`` (NaN where a model has no data set of that task).
    """
    ranked = summary[summary["rank"].notna()]
    table = pd.DataFrame(index=list(dict.fromkeys(ranked["model_key"])))
    table["model"] = [MODEL_SPECS[key].label if key in MODEL_SPECS else key for key in table.index]
    for task in TASKS:
        table[task] = ranked[ranked["task"] == task].groupby("model_key")["rank"].mean()
    table["all"] = ranked.groupby("model_key")["rank"].mean()
    return table


def _pairwise(folds: pd.DataFrame, summary: pd.DataFrame, dataset: str, a: str, b: str):
    """Mean-score difference a - b on one data set and the folds where a scores higher."""
    part = summary[summary["dataset"] == dataset].set_index("model_key")
    if a not in part.index or b not in part.index:
        return None
    metric = part["metric"].iloc[0]
    fold_scores = folds[folds["dataset"] == dataset].pivot_table(index=["repeat", "fold"], columns="model_key",
                                                                  values=metric)
    both = fold_scores[[a, b]].dropna() if {a, b} <= set(fold_scores.columns) else pd.DataFrame(columns=[a, b])
    return part.loc[a, "mean"] - part.loc[b, "mean"], int((both[a] > both[b]).sum()), len(both)


def _wins(folds, summary, datasets, a, b):
    """Data sets (among ``datasets``) where ``a``'s mean score beats ``b``'s, folds won, folds compared."""
    pairs = {d: _pairwise(folds, summary, d, a, b) for d in datasets}
    pairs = {d: p for d, p in pairs.items() if p is not None and np.isfinite(p[0])}
    return [d for d, p in pairs.items() if p[0] > 0], len(pairs), sum(p[1] for p in pairs.values()), \
        sum(p[2] for p in pairs.values())


def summary_text(folds: pd.DataFrame, summary: pd.DataFrame, max_epochs: int | None = None) -> str:
    """The auto-generated summary: the default MoE against its ablations and every other
    model, average ranks, fit times and the gaps to boosting.

    Parameters
    ----------
    folds : DataFrame
        Per-fold results.
    summary : DataFrame
        Output of :func:`aggregate`.
    max_epochs : int or None
        The suite's epoch cap of the MoE models, if any: the summary counts the fits that
        reached it.

    Returns
    -------
    str
        Markdown: bullet points and tables.
    """
    datasets = list(dict.fromkeys(summary["dataset"]))
    keys = list(dict.fromkeys(summary["model_key"]))
    label = {key: MODEL_SPECS[key].label if key in MODEL_SPECS else key for key in keys}
    lines = []
    if "moe" in keys:
        for other in keys:
            if other == "moe":
                continue
            wins, n_sets, fold_wins, n_folds = _wins(folds, summary, datasets, "moe", other)
            if not n_sets:
                continue
            where = "" if n_sets == len(datasets) else " where it ran"
            lines.append(f"- The default MoE beats {label[other]} on {len(wins)} of {n_sets} data sets{where} "
                         f"by mean score, and on {fold_wins} of {n_folds} folds.")
        times = folds.loc[folds["model_key"] == "moe", "fit_time_s"].dropna()
        if len(times):
            per_set = summary.loc[summary["model_key"] == "moe", "fit_time_s"]
            lines.append(f"- The default MoE's fit time per fold: median {times.median():.1f} s over all folds "
                         f"(median of the data sets' means {per_set.median():.1f} s; "
                         f"{per_set.min():.1f} to {per_set.max():.1f} s).")
        if "tabm" in keys:
            times = summary.pivot_table(index="dataset", columns="model_key", values="fit_time_s")
            both = times[["moe", "tabm"]].dropna()
            if len(both):
                ratio = both["moe"] / both["tabm"]
                lines.append(f"- Where TabM ran, the default MoE's fit time was {ratio.min():.3f} to "
                             f"{ratio.max():.3f} of TabM's (data set means).")
    ranks = average_ranks(summary)
    if "moe" in ranks.index:
        moe = ranks.loc["moe"]
        parts = [f"{task} {moe[task]:.2f}" for task in TASKS if np.isfinite(moe[task])]
        lines.append(f"- Average rank of the default MoE among the {len(ranks)} ranked models: {moe['all']:.2f} "
                     f"({', '.join(parts)}; 1 = best).")
    ranked = summary[summary["rank"].notna()]
    best = ranked.loc[ranked.groupby("dataset")["mean"].idxmax()].set_index("dataset")["model"]
    counts = best.value_counts()
    lines.append("- Best ranked model per data set: " + ", ".join(f"{m} {n}" for m, n in counts.items()) + ".")
    if max_epochs and "n_iter" in folds:
        cap = max_epochs
        moe = folds[folds["model_key"].isin([k for k, spec in MODEL_SPECS.items() if spec.is_moe])]
        if len(moe):
            capped = moe[moe["n_iter"] >= cap]
            line = (f"- MoE fits stopped by the {cap}-epoch cap rather than by early stopping: "
                    f"{len(capped)} of {len(moe)}")
            if "best_epoch" in capped and capped["best_epoch"].notna().any():
                late = int((capped["best_epoch"] > cap - 10).sum())
                line += (f"; {late} of them had their best validation loss in the last 10 epochs (still improving, "
                         "so the cap may have cost them accuracy)")
            lines.append(line + ".")
    failed = summary[summary["n_failed"] > 0]
    for row in failed.itertuples():
        lines.append(f"- {row.model} failed on {row.n_failed} of {row.n_folds} folds of {row.dataset} "
                     "(see the `error` column of the CSV).")
    text = "\n".join(lines)

    rank_rows = [[row.model] + [f"{row[t]:.2f}" if np.isfinite(row[t]) else "" for t in (*TASKS, "all")]
                 for _, row in ranks.sort_values("all").iterrows()]
    text += ("\n\nAverage rank among the ranked models (1 = best mean score on a data set; ablations and models "
             "that did not run on every data set are compared pairwise above instead):\n\n")
    text += _markdown(["model", "regression", "classification", "all"], rank_rows)

    if "hgb" in keys:
        compared = [k for k in keys if k in MODEL_SPECS and MODEL_SPECS[k].is_moe]
        compared += [k for k in ("mlp", "realmlp", "tabm") if k in keys]
        rows = []
        for dataset in datasets:
            metric = summary.loc[summary["dataset"] == dataset, "metric"].iloc[0]
            cells = []
            for key in compared:
                pair = _pairwise(folds, summary, dataset, key, "hgb")
                cells.append("" if pair is None or not np.isfinite(pair[0])
                             else f"{pair[0]:+.4f} ({pair[1]}/{pair[2]})")
            rows.append([dataset, METRIC_LABEL[metric], *cells, best.get(dataset, "")])
        names = [label[k] for k in compared]
        text += ("\n\nGap to HistGradientBoosting (mean score minus HistGradientBoosting's; in brackets the folds "
                 "where the model scores higher):\n\n")
        text += _markdown(["dataset", "metric", *names, "best ranked model"], rows)
    return text


def plot(summary: pd.DataFrame, path: Path) -> Path:
    """Each model's mean score relative to a reference per data set, and average ranks.

    The reference is HistGradientBoosting when it ran, else the best model of each data set.
    Differences below -0.25 are drawn at -0.25 with an open marker. Of the ablations only
    those of :data:`~benchmarks.models.DEFAULT_MODELS` are drawn (more would crowd the
    rows), unless the run had nothing else; the tables hold every model.

    Parameters
    ----------
    summary : DataFrame
        Output of :func:`aggregate`.
    path : Path
        Where the PNG goes.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if (summary["task"] == t).any()]
    run = list(dict.fromkeys(summary["model_key"]))
    keys = [key for key in run
            if key in DEFAULT_MODELS or key not in MODEL_SPECS or MODEL_SPECS[key].role != "ablation"] or run
    palette = plt.get_cmap("tab10" if len(keys) <= 10 else "tab20").colors
    colours = {key: palette[i % len(palette)] for i, key in enumerate(keys)}
    heights = [max(2.0, 0.45 * summary.loc[summary["task"] == t, "dataset"].nunique() + 1.2) for t in tasks]
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(5.2 * (len(tasks) + 1), max(heights) + 0.6),
                             squeeze=False)
    axes = axes[0]
    floor = -0.25
    for ax, task in zip(axes, tasks):
        part = summary[summary["task"] == task]
        datasets = list(dict.fromkeys(part["dataset"]))
        means = part.pivot_table(index="dataset", columns="model_key", values="mean").reindex(datasets)
        if "hgb" in means:
            reference, label = means["hgb"], "HistGradientBoosting"
        else:
            reference, label = means.max(axis=1), "the best model"
        offsets = np.linspace(-0.3, 0.3, len(keys))
        any_clipped = False
        for offset, key in zip(offsets, keys):
            if key not in means:
                continue
            diff = (means[key] - reference).to_numpy()
            ypos = np.arange(len(datasets)) + offset
            clipped = diff < floor
            any_clipped |= bool(clipped.any())
            ax.scatter(np.maximum(diff, floor)[~clipped], ypos[~clipped], color=colours[key], s=28,
                       label=MODEL_SPECS[key].label if key in MODEL_SPECS else key)
            ax.scatter(np.full(clipped.sum(), floor), ypos[clipped], facecolors="none", edgecolors=colours[key], s=28)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(np.arange(len(datasets)), datasets)
        ax.invert_yaxis()
        ax.set_xlabel(f"{METRIC_LABEL[PRIMARY[task]]} minus {label}'s"
                      + (f"\n(open marker: below {floor}, drawn at {floor})" if any_clipped else ""))
        ax.set_title(f"{task}: mean over folds")
        ax.grid(axis="x", alpha=0.3)
    ranks = average_ranks(summary)
    ax = axes[-1]
    width = 0.8 / len(tasks)
    for i, task in enumerate(tasks):
        ax.barh(np.arange(len(ranks)) + (i - (len(tasks) - 1) / 2) * width, ranks[task], height=width, label=task,
                color=["tab:blue", "tab:orange"][i], alpha=0.8)
    ax.set_yticks(np.arange(len(ranks)), ranks["model"])
    ax.invert_yaxis()
    ax.set_xlabel("average rank (1 = best)")
    ax.set_title("average rank per model")
    ax.legend(fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pending_text(pending, datasets, models) -> str:
    """What an interrupted run has still to do: data sets not started, and the models left
    on data sets in progress."""
    left = {}
    for dataset, key in pending:
        left.setdefault(dataset, []).append(MODEL_SPECS[key].label)
    untouched = [dataset for dataset in datasets if len(left.get(dataset, ())) == len(models)]
    text = (f"**Partial results**: {len(pending)} of {len(datasets) * len(models)} (data set, model) runs "
            "still to do (`--resume` continues).")
    in_progress = {dataset: labels for dataset, labels in left.items() if dataset not in untouched}
    if in_progress:
        text += " Still to run on " + "; ".join(f"{dataset}: {', '.join(labels)}"
                                                for dataset, labels in in_progress.items()) + "."
    if untouched:
        text += f" Not started: {', '.join(untouched)}."
    return text + "\n"


def write_report(folds: pd.DataFrame, settings: dict, out: Path, stem: str, command: str, machine: str) -> dict:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` under ``out``.

    Parameters
    ----------
    folds : DataFrame
        Per-fold results of :func:`benchmarks.accuracy.run_suite`.
    settings : dict
        The protocol that ran (``run_suite``'s second output, plus ``threads``).
    out : Path
        Output folder, created if needed.
    stem : str
        File name without extension, e.g. ``accuracy_quick``.
    command : str
        The command line, quoted in the report.
    machine : str
        One-line machine description.

    Returns
    -------
    dict
        Paths of the ``md``, ``csv`` and ``png`` files.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / f"{stem}.md", "csv": out / f"{stem}.csv", "png": out / f"{stem}.png"}
    folds.to_csv(paths["csv"], index=False)
    skipped = settings.get("skipped", [])
    summary = aggregate(folds, ranked_models(dict.fromkeys(folds["model_key"]), skipped) if len(folds) else None)
    plot(summary, paths["png"])

    s = settings
    cv = "RepeatedKFold (regression) / RepeatedStratifiedKFold (classification)"
    cap = f"data sets over {s['max_rows']} rows subsampled to {s['max_rows']} (seed {s['seed']}, stratified for " \
          "classification) before the folds are drawn" if s["max_rows"] else "no row cap"
    moe = ", ".join(f"{k}={v}" for k, v in s["moe_params"].items())
    parts = [
        f"# Accuracy: suite `{s['suite']}`\n",
        f"{cv}, {s['folds']} folds x {s['repeats']} repeat(s) (seed {s['seed']}); the same folds and the same "
        "preprocessing (one-hot + standard scaling, median / own-category imputation where values are missing) for "
        f"every model; {cap}. Scores are mean ± std over all {s['folds'] * s['repeats']} folds, (rank) among the "
        "models on that data set (1 = best mean, in bold); fit time is the mean per fold, preprocessing included. "
        f"Every model ran with {s.get('threads', 'default')} thread(s)."
        + (f" All MoE models ran with {moe} (the estimator's default is {_default_max_epochs()} epochs)."
           if moe else "")
        + "\n",
        f"Total wall time: {s['wall_time_s'] / 60:.1f} min.\n",
    ]
    if s.get("pending"):
        parts.append(_pending_text(s["pending"], s["datasets"], s["models"]))
    if skipped:
        by_model = {}
        for dataset, key, limit in skipped:
            by_model.setdefault((key, limit), []).append(dataset)
        parts.append("Not run, to keep the suite's time in bounds: " + "; ".join(
            f"{MODEL_SPECS[key].label} on data sets over {limit} rows ({', '.join(names)})"
            for (key, limit), names in by_model.items()) + ".\n")
    for task in TASKS:
        if not (summary["task"] == task).any():
            continue
        parts.append(f"## {task.capitalize()}: {METRIC_LABEL[PRIMARY[task]]}\n\n{score_table(summary, task)}\n")
        if task == "classification" and summary["log_loss_mean"].notna().any():
            parts.append(f"Log loss (lower is better; rank by log loss):\n\n"
                         f"{score_table(summary, task, 'log_loss_mean')}\n")
        parts.append(f"Fit time per fold (s):\n\n{time_table(summary, task)}\n")
    parts.append(f"## Summary\n\n{summary_text(folds, summary, s['moe_params'].get('max_epochs'))}\n")
    parts.append(f"![score relative to HistGradientBoosting and average ranks]({paths['png'].name})\n")
    model_lines = [f"- {MODEL_SPECS[k].label}: {MODEL_NOTES[k]}" for k in s["models"]]
    if not lightgbm_available():
        model_lines.append("- LightGBM: not installed here, skipped.")
    parts.append("## Models\n\n" + "\n".join(model_lines) + "\n")
    data_lines = []
    for name in s["datasets"]:
        used = s["rows"].get(name)
        data_lines.append(f"- `{name}` ({DATASETS[name].task}): {DATASETS[name].description}"
                          + (f"; {used} rows used" if used is not None else ""))
    parts.append("## Data sets\n\n" + "\n".join(data_lines) + "\n")
    warned = folds[folds["warnings"].fillna("") != ""]
    if len(warned):
        counts = warned.groupby(["model", "dataset"]).size()
        parts.append("## Warnings\n\nFolds with warnings (messages in the CSV's `warnings` column): "
                     + "; ".join(f"{m} on {d}: {n}" for (m, d), n in counts.items()) + ".\n")
    parts.append(f"Machine: {machine}\n\nCommand: `{command}`\n\nPer-fold scores: `{paths['csv'].name}`.\n")
    paths["md"].write_text("\n".join(parts))
    return paths


def _default_max_epochs() -> int:
    from sklearn_moe import MoERegressor

    return MoERegressor().max_epochs
