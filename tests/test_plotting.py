"""sklearn_moe.plotting: figures built from a fitted model, returned and never shown."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402
from sklearn.linear_model import Ridge  # noqa: E402

from sklearn_moe import MoEClassifier, MoERegressor  # noqa: E402
from sklearn_moe.plotting import (  # noqa: E402
    plot_expert_count_curve,
    plot_expert_utilization,
    plot_routing_embedding,
    plot_routing_heatmap,
    plot_training_curves,
)
from sklearn_moe.tuning import NExpertsSelection  # noqa: E402

from .conftest import FAST


@pytest.fixture(scope="module")
def fitted(request):
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 4))
    y = X[:, 0] * 2 + np.sin(3 * X[:, 1])
    return MoERegressor(**dict(FAST, router="topk", max_epochs=4)).fit(X, y), X, y


def test_training_curves_show_the_losses_and_the_auxiliary_losses(fitted):
    model, _, _ = fitted
    figure = plot_training_curves(model)
    assert isinstance(figure, Figure)
    losses, aux = figure.axes[:2]
    # The mixture's loss on the training and validation rows (like with like), and the
    # training objective dashed.
    assert [line.get_label() for line in losses.get_lines()] == [
        "training rows (task_loss)", "validation rows (valid_loss)", "training objective (train_loss)"]
    for line, key in zip(losses.get_lines(), ["task_loss", "valid_loss", "train_loss"]):
        np.testing.assert_allclose(line.get_ydata(), model.history_[key])
    assert losses.get_lines()[2].get_linestyle() == "--"
    assert {line.get_label() for line in aux.get_lines()} == {"balance_loss", "z_loss"}


def test_utilization_stacks_each_experts_share(fitted):
    model, _, _ = fitted
    figure = plot_expert_utilization(model)
    (axes,) = figure.axes
    assert len(axes.collections) == model.n_experts  # one band per expert
    assert axes.get_ylabel() == "expert share"  # a sparse router: the routed rows
    top = axes.collections[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(1.0)  # the bands stack to the whole
    with pytest.raises(ValueError, match="no 'nonsense' column"):
        plot_expert_utilization(model, share="nonsense")


def test_utilization_after_growing_draws_the_epochs_of_the_current_experts():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(120, 3))
    y = X[:, 0] + np.sin(2 * X[:, 1])
    model = MoERegressor(**dict(FAST, max_epochs=3, early_stopping=False)).fit(X, y)
    model.grow_experts(2)
    for _ in range(2):
        model.partial_fit(X, y)
    (axes,) = plot_expert_utilization(model).axes
    assert len(axes.collections) == FAST["n_experts"] + 2
    assert axes.collections[0].get_paths()[0].vertices[:, 0].min() == 4  # epochs 4 and 5, not 1 to 3
    assert axes.get_title() == "expert utilization (the 6 experts' epochs)"


def test_heatmap_columns_are_shares_of_each_target_bin(fitted):
    model, X, y = fitted
    figure = plot_routing_heatmap(model, X, y, n_bins=5)
    table = figure.axes[0].images[0].get_array()
    assert table.shape == (model.n_experts, 5)
    np.testing.assert_allclose(table.sum(axis=0), 1.0)
    top1 = model.route(X).argmax(axis=1)
    lowest = y <= np.quantile(y, 0.2)
    np.testing.assert_allclose(table[:, 0], np.bincount(top1[lowest], minlength=model.n_experts) / lowest.sum())
    first = figure.axes[0].get_xticklabels()[0].get_text()
    assert first == f"{y[lowest].min():.3g} to {y[lowest].max():.3g}"  # the bin's range of targets


def test_heatmap_of_tied_targets_shows_the_bins_that_hold_rows(fitted):
    model, X, _ = fitted
    y = np.where(np.arange(len(X)) < 150, 0.0, np.arange(len(X)) - 149.0)  # three quarters tied at 0
    axes = plot_routing_heatmap(model, X, y, n_bins=10).axes[0]
    labels = [label.get_text() for label in axes.get_xticklabels()]
    # The tied rows' bins merged into one (with the next values up to its edge): 3 bins, not 10.
    assert labels[0] == "0 to 10" and len(labels) == axes.images[0].get_array().shape[1] == 3
    np.testing.assert_allclose(axes.images[0].get_array().sum(axis=0), 1.0)  # no empty column


def test_heatmap_of_a_classifier_has_a_column_per_class():
    rng = np.random.RandomState(1)
    X = rng.normal(size=(150, 3))
    y = np.where(X[:, 0] > 0, "yes", "no")
    model = MoEClassifier(**dict(FAST, max_epochs=3)).fit(X, y)
    axes = plot_routing_heatmap(model, X, y).axes[0]
    assert [label.get_text() for label in axes.get_xticklabels()] == ["no", "yes"]
    np.testing.assert_allclose(axes.images[0].get_array().sum(axis=0), 1.0)
    # A one-column frame of labels, as fit takes it (it was taken for a multilabel matrix).
    column = plot_routing_heatmap(model, X, pd.DataFrame({"label": y})).axes[0].images[0].get_array()
    np.testing.assert_array_equal(column, axes.images[0].get_array())


def test_embedding_colours_every_row_by_its_expert(fitted):
    model, X, _ = fitted
    axes = plot_routing_embedding(model, X).axes[0]
    top1 = model.route(X).argmax(axis=1)
    sizes = sorted(len(collection.get_offsets()) for collection in axes.collections)
    assert sizes == sorted(np.bincount(top1)[np.bincount(top1) > 0])
    few = plot_routing_embedding(model, X, max_points=50).axes[0]
    assert sum(len(c.get_offsets()) for c in few.collections) == 50


def test_expert_count_curve_marks_the_chosen_count():
    table = pd.DataFrame({"n_experts": [1, 2, 4], "mean_score": [0.5, 0.8, 0.81], "std_score": [0.05, 0.02, 0.02],
                          "sem_score": [0.02, 0.01, 0.01]}).set_index("n_experts", drop=False)
    selection = NExpertsSelection(table, 2, None, "one_se", None)
    axes = plot_expert_count_curve(selection).axes[0]
    assert any(line.get_label() == "chosen (one_se): 2" for line in axes.get_lines())
    assert axes.get_ylabel() == "cross-validated score"
    # A scorer object is named by its function (its repr runs to hundreds of characters).
    from sklearn.metrics import make_scorer, mean_absolute_error

    for scoring, label in ((make_scorer(mean_absolute_error, greater_is_better=False), "mean_absolute_error"),
                           ("neg_log_loss", "neg_log_loss"), (lambda model, X, y: 0.0, "score")):
        selection = NExpertsSelection(table, 2, None, "one_se", scoring)
        assert plot_expert_count_curve(selection).axes[0].get_ylabel() == f"cross-validated {label}"


def test_plots_need_a_fitted_model():
    with pytest.raises(ValueError, match="fit it first"):
        plot_training_curves(MoERegressor())


def test_plots_of_a_pipeline_ending_in_a_moe_see_its_transformed_input(fitted):
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    _, X, y = fitted
    pipeline = make_pipeline(StandardScaler(), MoERegressor(**dict(FAST, router="topk", max_epochs=2))).fit(
        X * 100, y)
    for figure in (plot_training_curves(pipeline), plot_expert_utilization(pipeline),
                   plot_routing_heatmap(pipeline, X * 100, y), plot_routing_embedding(pipeline, X * 100)):
        assert isinstance(figure, Figure)
    heatmap = plot_routing_heatmap(pipeline, X * 100, y).axes[0].images[0].get_array()
    moe = pipeline[-1]
    direct = plot_routing_heatmap(moe, pipeline[:-1].transform(X * 100), y).axes[0].images[0].get_array()
    np.testing.assert_array_equal(heatmap, direct)


@pytest.mark.parametrize("call, error, match", [
    (lambda m, X, y: plot_training_curves(Ridge().fit(X, y)), TypeError, "Pipeline ending in one; got Ridge"),
    (lambda m, X, y: plot_routing_heatmap(m, X, y[:10]), ValueError, "X has 200 rows but y has 10"),
    (lambda m, X, y: plot_routing_heatmap(m, X, y, n_bins=0), ValueError, "n_bins must be a positive int"),
    (lambda m, X, y: plot_routing_embedding(m, X[:1]), ValueError, "at least 2 rows of X; got 1"),
    (lambda m, X, y: plot_routing_embedding(m, X, max_points=0), ValueError, "max_points must be an int of at least"),
    (lambda m, X, y: plot_expert_count_curve("curve"), TypeError, "NExpertsSelection that select_n_experts returns"),
])
def test_bad_arguments_are_named(fitted, call, error, match):
    model, X, y = fitted
    with pytest.raises(error, match=match):
        call(model, X, y)


def test_a_heatmap_of_labels_the_classifier_never_saw_is_refused():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(60, 3))
    model = MoEClassifier(**dict(FAST, max_epochs=2)).fit(X, np.where(X[:, 0] > 0, "a", "b"))
    with pytest.raises(ValueError, match=r"labels the classifier was not fitted on: \['c'\]"):
        plot_routing_heatmap(model, X, np.where(X[:, 0] > 0, "a", "c"))
