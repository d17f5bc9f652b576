"""scikit-learn's own estimator checks, run on both estimators with fast settings."""

from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_moe import MoEClassifier, MoERegressor

from .conftest import FAST

SGD_REASON = (
    "minibatch SGD: a row with weight 2 is not the same as the row seen twice, since the "
    "two copies land in different batches and the early-stopping split"
)


# Checks of what fit and predict accept, return and leave alone, not of what is learned: a
# fit of two epochs exercises them as fully as thirty.
INPUT_CHECKS = frozenset({
    "check_estimator_sparse_array", "check_estimator_sparse_matrix", "check_estimator_sparse_tag",
    "check_estimators_dtypes", "check_dtype_object", "check_n_features_in", "check_n_features_in_after_fitting",
    "check_fit_check_is_fitted", "check_fit2d_predict1d", "check_fit2d_1feature", "check_dict_unchanged",
    "check_dont_overwrite_parameters", "check_estimators_overwrite_params", "check_estimators_fit_returns_self",
    "check_readonly_memmap_input", "check_f_contiguous_array_estimator", "check_fit_score_takes_y",
    "check_positive_only_tag_during_fit", "check_supervised_y_2d", "check_estimators_pickle",
    "check_sample_weights_not_overwritten", "check_sample_weights_shape", "check_sample_weights_not_an_array",
    "check_sample_weights_pandas_series", "check_sample_weights_list",
})


def expected_failed_checks(estimator):
    return {
        "check_sample_weight_equivalence_on_dense_data": SGD_REASON,
        "check_sample_weight_equivalence_on_sparse_data": SGD_REASON,
    }


@parametrize_with_checks(
    [
        MoERegressor(**FAST),
        MoEClassifier(**FAST),
        MoERegressor(**dict(FAST, router="noisy_topk", balance_loss="cv2", capacity_factor=1.25,
                            shared_expert=True, gate_hidden=(8,), expert_dropout=0.2)),
        MoEClassifier(**dict(FAST, router="switch", balance_loss="aux_free")),
        MoERegressor(**dict(FAST, router="top_p", learned_threshold=True, capacity_factor=1.0,
                            capacity_overflow="reroute", diversity_coef=0.1)),
        MoEClassifier(**dict(FAST, router="top_p", top_p=0.7, expert_grad_scaling=True)),
        MoERegressor(**dict(FAST, router="hierarchical", n_groups=2, expert_grad_scaling=True)),
        MoEClassifier(**dict(FAST, router="softmax", layer_norm=True)),
        MoERegressor(**dict(FAST, expert_type="adapter", expert_loss="per_expert", numeric_embedding="piecewise_linear",
                            router="softmax", lr_schedule="flat_cosine")),
        MoEClassifier(**dict(FAST, expert_type="adapter", expert_loss="per_expert", numeric_embedding="periodic",
                             router="topk", capacity_factor=1.25, layer_norm=True, lr_schedule="cosine")),
        MoERegressor(**dict(FAST, expert_type="adapter", router="uniform", shared_expert=True)),
        MoEClassifier(**dict(FAST, expert_type="independent", expert_loss="per_expert", router="noisy_topk",
                             numeric_embedding="piecewise_linear")),
        MoERegressor(**dict(FAST, output="mixture_density", router="topk", capacity_factor="auto",
                            temperature_final=0.5)),
        MoEClassifier(**dict(FAST, mixing="probabilities", router="topk", shared_expert=True,
                             expert_loss="per_expert")),
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    if check.func.__name__ in INPUT_CHECKS:
        estimator = clone(estimator).set_params(max_epochs=2)
    check(estimator)
