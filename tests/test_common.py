"""scikit-learn's own estimator checks, run on both estimators with fast settings."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from sklearn_moe import MoEClassifier, MoERegressor

from .conftest import FAST

SGD_REASON = (
    "minibatch SGD: a row with weight 2 is not the same as the row seen twice, since the "
    "two copies land in different batches and the early-stopping split"
)


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
    ],
    expected_failed_checks=expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)
