"""Collapse detection and recovery, splitting experts, and pruning and growing them after training."""

import warnings

import numpy as np
import pytest
import torch
from skorch.callbacks import Callback

from sklearn_moe import ExpertCollapseWarning, MoEClassifier, MoERegressor, load
from sklearn_moe._scaling import scale_features
from sklearn_moe.callbacks import _balancing_advice
from sklearn_moe.diagnostics import load_entropy
from sklearn_moe.nn import MixtureOfExperts

from .conftest import FAST


class FavourExperts(Callback):
    """Start training with a router that sends every row to the first ``n`` experts."""

    def __init__(self, n=1):
        self.n = n

    def on_train_begin(self, net, **kwargs):
        gate = net.module_.router.gate
        with torch.no_grad():
            gate.weight.mul_(0.01)
            gate.bias.zero_()
            gate.bias[: self.n] = 5.0


def collapsing_fit(X, y, recovery, expert_type="independent"):
    model = MoERegressor(**dict(FAST, router="topk", top_k=1, expert_type=expert_type, balance_coef=0.0,
                                z_loss_coef=0.0, max_epochs=30, early_stopping=False, random_state=0,
                                collapse_patience=3, collapse_recovery=recovery))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, y, callbacks=[FavourExperts()])
    return model, [w for w in caught if issubclass(w.category, ExpertCollapseWarning)]


@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_forced_collapse_warns_and_recovery_spreads_the_load(expert_type, regression_data):
    X, y = regression_data
    collapsed, warned = collapsing_fit(X, y, recovery=False, expert_type=expert_type)
    assert len(warned) == 1
    message = str(warned[0].message)
    assert warned[0].filename == __file__  # said of the line that called fit, not of skorch's loop
    assert "Expert(s) [1, 2, 3]" in message and "3 epochs" in message and "collapse_recovery=True" in message
    assert collapsed.history_["expert_share"].iloc[-1] == [1.0, 0.0, 0.0, 0.0]
    revived, warned = collapsing_fit(X, y, recovery=True, expert_type=expert_type)
    revivals = revived.history_["revived_experts"].dropna()
    assert revivals.iloc[0] == [1, 2, 3]
    # One warning for the whole fit, however many revivals.
    assert len(warned) == 1 and "re-initialised as copies of" in str(warned[0].message)
    assert f"{len(revivals)} revival" in str(warned[0].message)
    # Over the epochs after the first revival (with top_k=1 and no balance loss a revived
    # mixture may collapse again, and be revived again: a single epoch proves little).
    first = int(revived.history_["revived_experts"].notna().to_numpy().argmax())
    entropy = [np.mean([load_entropy(share) for share in model.history_["expert_share"].iloc[first + 1:]])
               for model in (collapsed, revived)]
    assert entropy[0] == 0.0 and entropy[1] > 0.2


class NarrowTheFavourites(Callback):
    """Send every row to the first three experts, then, from epoch 5, to the first one:
    experts starve in two waves."""

    def on_epoch_begin(self, net, **kwargs):
        n = 3 if len(net.history) < 5 else 1
        gate = net.module_.router.gate
        with torch.no_grad():
            gate.weight.zero_()
            gate.bias.fill_(-20.0)
            gate.bias[:n] = 5.0


def test_experts_that_starve_at_different_epochs_are_named_in_one_warning(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, n_experts=4, router="topk", top_k=1, balance_coef=0.0, max_epochs=10,
                                early_stopping=False, random_state=0, collapse_patience=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, y, callbacks=[NarrowTheFavourites()])
    warned = [w for w in caught if issubclass(w.category, ExpertCollapseWarning)]
    assert len(warned) == 1 and str(warned[0].message).startswith("Expert(s) [1, 2, 3] received less than")


def test_a_fit_that_fails_still_names_the_experts_that_starved(regression_data):
    """skorch calls no on_train_end for a failed fit, and starved experts may be why it failed."""

    class FailsLate(Callback):
        def on_epoch_end(self, net, **kwargs):
            if len(net.history) == 8:
                raise RuntimeError("disk full")

    X, y = regression_data
    model = MoERegressor(**dict(FAST, n_experts=4, router="topk", top_k=1, balance_coef=0.0, max_epochs=10,
                                early_stopping=False, random_state=0, collapse_patience=2))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="disk full"):
        warnings.simplefilter("always")
        model.fit(X, y, callbacks=[NarrowTheFavourites(), FailsLate()])
    warned = [w for w in caught if issubclass(w.category, ExpertCollapseWarning)]
    assert len(warned) == 1 and str(warned[0].message).startswith("Expert(s) [1, 2, 3]")


def test_collapse_under_a_dense_router_advises_the_balance_loss_that_acts_there(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, router="softmax", balance_coef=0.0, z_loss_coef=0.0, max_epochs=6,
                                early_stopping=False, random_state=0, collapse_patience=3))
    with pytest.warns(ExpertCollapseWarning) as caught:
        model.fit(X, y, callbacks=[FavourExperts()])
    message = str(caught[0].message)
    assert 'set balance_loss="cv2"' in message and "raise balance_coef" not in message


@pytest.mark.parametrize(("router", "balance_loss", "advice"), [
    ("softmax", "switch", 'set balance_loss="cv2"'),
    ("softmax", "aux_free", 'set balance_loss="cv2"'),
    ("softmax", None, 'set balance_loss="cv2"'),
    ("softmax", "cv2", "raise balance_coef"),
    ("topk", "switch", "raise balance_coef"),
    ("topk", "aux_free", "raise balance_coef"),
    ("topk", None, 'set balance_loss ("switch", "cv2" or "aux_free")'),
])
def test_balancing_advice_names_what_acts_under_the_router(router, balance_loss, advice):
    module = MixtureOfExperts(4, 1, n_experts=4, router=router, balance_loss=balance_loss)
    assert _balancing_advice(module).startswith(advice)


@pytest.mark.parametrize(("router", "balance_loss"), [("softmax", "cv2"), ("uniform", "switch")])
def test_balanced_training_does_not_warn(router, balance_loss, regression_data):
    X, y = regression_data
    model = MoERegressor(n_experts=4, router=router, balance_loss=balance_loss, balance_coef=0.1, max_epochs=12,
                         random_state=0, collapse_patience=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExpertCollapseWarning)
        model.fit(X, y)
    assert min(min(share) for share in model.history_["gate_share"]) > 0.1 / 4


def test_detection_can_be_switched_off(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, router="topk", top_k=1, balance_coef=0.0, max_epochs=8, early_stopping=False,
                                random_state=0, collapse_threshold=None, collapse_patience=2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExpertCollapseWarning)
        model.fit(X, y, callbacks=[FavourExperts()])
    assert "collapse" not in dict(model.net_.callbacks_)


def test_collapse_parameters_are_validated():
    X, y = np.zeros((20, 2)), np.zeros(20)
    for bad in (dict(collapse_threshold=0.0), dict(collapse_threshold=1.0), dict(collapse_patience=0),
                dict(collapse_recovery="yes")):
        with pytest.raises(ValueError, match=f"'{next(iter(bad))}' parameter of MoERegressor"):
            MoERegressor(max_epochs=1, **bad).fit(X, y)


@pytest.mark.parametrize("recovery", [False, True])
def test_collapse_is_counted_across_partial_fit_calls(recovery, regression_data):
    """Every partial_fit call is one epoch of its own run: the starved epochs are counted
    on from the history, so a stream warns (once per expert) and, with recovery, revives."""
    X, y = regression_data
    model = MoERegressor(**dict(FAST, router="topk", top_k=1, balance_coef=0.0, random_state=0),
                         collapse_threshold=0.9, collapse_patience=2, collapse_recovery=recovery,
                         callbacks=[FavourExperts()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            model.partial_fit(X, y)
    collapse = [w for w in caught if issubclass(w.category, ExpertCollapseWarning)]
    assert collapse, "no collapse was detected over six one-epoch calls"
    if recovery:
        assert "revived_experts" in model.history_
    else:
        warned = [int(e) for w in collapse for e in str(w.message).split("]")[0].split("[")[1].split(",")]
        assert len(warned) == len(set(warned))  # once per expert, not on every call


def test_aux_free_balancing_is_refused_under_the_hierarchical_router():
    """Its bias reranks experts only within the group the group gate chose: it cannot move
    rows between groups."""
    X, y = np.zeros((20, 2)), np.zeros(20)
    with pytest.raises(ValueError, match="balance_loss='aux_free'.*router='hierarchical'.*between groups"):
        MoERegressor(max_epochs=1, router="hierarchical", balance_loss="aux_free").fit(X, y)


@pytest.mark.parametrize("router", ["softmax", "top_p"])
@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_split_expert_copies_the_source_and_halves_its_gate_mass(expert_type, router):
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 2, n_experts=4, router=router, expert_type=expert_type, learned_threshold=True,
                              temperature=0.7).eval()
    x = torch.randn(50, 4)
    with torch.no_grad():
        before = module.router(x).probs
        module.split_expert(1, [3], noise=0.0)
        after = module.router(x).probs
    # expert 3's own logit is gone; the pair shares what expert 1 had against the others
    torch.testing.assert_close(after[:, 1] + after[:, 3], before[:, 1] / (1 - before[:, 3]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after[:, 1], after[:, 3])
    state = module.state_dict()
    for name in module.expert_state_names():
        torch.testing.assert_close(state[name][3], state[name][1])
    with pytest.raises(ValueError, match="distinct experts"):
        module.split_expert(1, [1])


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch"])
def test_under_a_top_k_choice_a_split_keeps_the_sources_logits(router):
    """A top-k choice ranks the logits: the copies take the source's, so that they are
    chosen where it is. Lowered, the pair fell behind the experts it beat, and a revived
    expert starved again, then its source, expert after expert."""
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 2, n_experts=4, router=router, top_k=2, temperature=0.7).eval()
    x = torch.randn(200, 4)
    with torch.no_grad():
        before = module.router.compute_logits(x)
        chosen_before = module.router(x).indices
        module.split_expert(1, [3], noise=0.0)
        after = module.router.compute_logits(x)
        chosen_after = module.router(x).indices
    torch.testing.assert_close(after[:, 1], before[:, 1])
    torch.testing.assert_close(after[:, 3], before[:, 1])
    # Where expert 1 was chosen, the pair still is; where it came first, both are (top-2).
    rows = (chosen_before == 1).any(dim=1)
    assert rows.any() and ((chosen_after[rows] == 1) | (chosen_after[rows] == 3)).any(dim=1).all()
    first = before.argmax(dim=1) == 1
    if router != "switch":  # top-1: the tie goes to one of the pair
        assert first.any() and ((chosen_after[first] == 3).any(dim=1) & (chosen_after[first] == 1).any(dim=1)).all()


def test_split_expert_perturbs_the_copies():
    torch.manual_seed(0)
    module = MixtureOfExperts(4, 1, n_experts=3, router="topk", expert_type="independent")
    module.split_expert(0, [1, 2], noise=0.1, generator=torch.Generator().manual_seed(0))
    weight = module.experts.hidden[0].weight
    assert not torch.equal(weight[1], weight[0]) and not torch.equal(weight[1], weight[2])
    torch.testing.assert_close(weight[1], weight[0], rtol=0.5, atol=0.0)
    bias = module.router.gate.bias
    torch.testing.assert_close(bias[1], bias[0])  # the three share the gate mass equally
    torch.testing.assert_close(bias[2], bias[0])


def starved_model(estimator_class, router, X, y, expert_type="adapter"):
    model = estimator_class(**dict(FAST, n_experts=6, router=router, expert_type=expert_type, balance_coef=0.0,
                                   z_loss_coef=0.0, max_epochs=10, random_state=0, collapse_threshold=None))
    return model.fit(X, y, callbacks=[FavourExperts(n=2)])


def expert_spread(model, X):
    """Per row, the largest difference between two experts' outputs, in the target's units."""
    module = model.module_
    x = torch.as_tensor(scale_features(X, model._x_mean, model._x_scale), dtype=torch.float32)
    with torch.no_grad():
        outputs = module.experts.all_experts(module._embed(x))[..., 0]
    return (outputs.max(dim=0).values - outputs.min(dim=0).values).numpy() * model._y_scale[0]


@pytest.mark.parametrize("router", ["softmax", "topk"])
@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_pruning_starved_experts_keeps_the_predictions(expert_type, router, regression_data, tmp_path):
    X, y = regression_data
    model = starved_model(MoERegressor, router, X, y, expert_type)
    share, before, gates, spread = model.expert_load_.copy(), model.predict(X), model.route(X), expert_spread(model, X)
    assert (share[2:] < 0.05).all()
    assert model.prune_experts(0.05) is model
    assert model.n_experts == 2 and model.module_.n_experts == 2
    assert model.route(X).shape == (len(X), 2)
    np.testing.assert_allclose(model.expert_load_, share[:2] / share[:2].sum())
    after = model.predict(X)
    # the documented bound: the removed experts' gate weight on the row times the experts' spread
    removed = gates[:, 2:].sum(axis=1)
    assert (np.abs(after - before) <= removed * spread * (1 + 1e-4) + 1e-5).all()
    assert np.abs(after - before).max() < 0.05 * y.std()
    path = tmp_path / "pruned.moe"
    model.save(path)
    np.testing.assert_array_equal(load(path).predict(X), after)
    assert load(path).n_experts == 2


def test_pruning_a_classifier_and_training_on(classification_data):
    X, y = classification_data
    model = starved_model(MoEClassifier, "softmax", X, y)
    proba = model.predict_proba(X)
    model.prune_experts(0.05)
    np.testing.assert_allclose(model.predict_proba(X), proba, atol=0.05)
    model.set_params(warm_start=True, max_epochs=2).fit(X, y)  # trains on with two experts
    assert model.route(X).shape == (len(X), 2)


def test_prune_experts_rejects_what_it_cannot_do(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, max_epochs=2, random_state=0)).fit(X, y)
    assert model.prune_experts(0.0) is model and model.n_experts == FAST["n_experts"]  # nothing below 0
    for bad in (-0.1, 1.0, "0.1", True):
        with pytest.raises(ValueError, match="threshold must be a share"):
            model.prune_experts(bad)
    with pytest.raises(ValueError, match="every expert"):
        model.prune_experts(0.99)
    hierarchical = MoERegressor(**dict(FAST, router="hierarchical", max_epochs=2, random_state=0)).fit(X, y)
    with pytest.raises(ValueError, match="hierarchical"):
        hierarchical.prune_experts(0.01)
    with pytest.raises(Exception, match="not fitted"):
        MoERegressor().prune_experts(0.01)


# ---------------------------------------------------------------------------- growth


def _expert_slices(module, expert):
    return {name: tensor[expert].clone() for name, tensor in module.state_dict().items()
            if name in module.expert_state_names()}


@pytest.mark.parametrize("expert_type", ["independent", "adapter"])
def test_growing_under_a_dense_gate_keeps_the_predictions(expert_type, regression_data, tmp_path):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, n_experts=3, expert_type=expert_type, max_epochs=5, random_state=0)).fit(X, y)
    before, share, gates = model.predict(X), model.expert_load_.copy(), model.route(X)
    busiest = int(np.argmax(share))
    assert model.grow_experts(1, noise=0.0) is model
    assert model.n_experts == 4 and model.module_.n_experts == 4
    # The copy is the busiest expert; the two split its gate weight.
    for name, tensor in _expert_slices(model.module_, 3).items():
        if not name.endswith("gate.bias"):
            torch.testing.assert_close(tensor, model.module_.state_dict()[name][busiest], rtol=0, atol=0)
    after_gates = model.route(X)
    np.testing.assert_allclose(after_gates[:, [busiest, 3]].sum(axis=1), gates[:, busiest], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after_gates[:, busiest], after_gates[:, 3], rtol=1e-5)
    np.testing.assert_allclose(model.predict(X), before, rtol=1e-5, atol=1e-5 * y.std())
    halved = np.where(np.arange(3) == busiest, share / 2, share)
    np.testing.assert_allclose(model.expert_load_, np.r_[halved, halved[busiest]])
    assert model.expert_load_.sum() == pytest.approx(1.0)
    # With the default perturbation the predictions move by little, and the copies specialise on.
    model.grow_experts(2, random_state=0)
    assert model.route(X).shape == (len(X), 6)
    assert np.abs(model.predict(X) - before).max() < 0.05 * y.std()
    path = tmp_path / "grown.moe"
    model.save(path)
    np.testing.assert_array_equal(load(path).predict(X), model.predict(X))
    fresh_loss = model.history_["train_loss"].iloc[0]
    model.set_params(warm_start=True, max_epochs=2).fit(X, y)
    assert model.n_experts == 6 and len(model.expert_load_) == 6
    # Trained on from the grown weights, not from a fresh start.
    assert model.history_["train_loss"].iloc[0] < 0.5 * fresh_loss


def test_growth_splits_the_busiest_expert_per_copy_at_each_turn(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, n_experts=3, max_epochs=2, random_state=0)).fit(X, y)
    model.expert_load_ = np.array([0.5, 0.3, 0.2])
    originals = [_expert_slices(model.module_, e) for e in range(3)]
    model.grow_experts(3, noise=0.0)
    # Turns: 0 (0.5), then 1 (0.3 against 0.25), then 0 (0.25 against 0.2 and 0.15).
    np.testing.assert_allclose(model.expert_load_, [0.5 / 3, 0.15, 0.2, 0.5 / 3, 0.5 / 3, 0.15])
    for new, source in zip((3, 4, 5), (0, 0, 1)):
        copy = _expert_slices(model.module_, new)
        for name, tensor in originals[source].items():
            if not name.endswith("gate.bias"):
                torch.testing.assert_close(copy[name], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("router", ["topk", "switch", "top_p", "noisy_topk", "uniform"])
def test_growing_under_other_routers_trains_on(router, regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, router=router, balance_loss="aux_free", max_epochs=3, random_state=0)).fit(X, y)
    model.grow_experts(2, random_state=0)
    assert model.route(X).shape == (len(X), 6)
    model.set_params(warm_start=True, max_epochs=2).fit(X, y)
    assert model.route(X).shape == (len(X), 6) and len(model.expert_load_) == 6
    assert np.isfinite(model.predict(X)).all()


def test_growing_a_classifier_from_one_expert(classification_data):
    X, y = classification_data
    model = MoEClassifier(**dict(FAST, n_experts=1, max_epochs=5, random_state=0)).fit(X, y)
    proba = model.predict_proba(X)
    model.grow_experts(3, random_state=0)
    np.testing.assert_allclose(model.predict_proba(X), proba, atol=0.05)
    np.testing.assert_allclose(model.expert_load_, [0.25] * 4)
    model.set_params(warm_start=True, max_epochs=2).fit(X, y)
    assert model.route(X).shape == (len(X), 4)


def test_grow_experts_rejects_what_it_cannot_do(regression_data):
    X, y = regression_data
    model = MoERegressor(**dict(FAST, max_epochs=2, random_state=0)).fit(X, y)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"n_new \(the number of experts to add\) must be a positive int"):
            model.grow_experts(bad)
    for bad in (-0.1, np.inf, np.nan, "0.1", True):
        with pytest.raises(ValueError, match="noise must be a finite float"):
            model.grow_experts(1, noise=bad)
    assert model.n_experts == FAST["n_experts"]
    hierarchical = MoERegressor(**dict(FAST, router="hierarchical", max_epochs=2, random_state=0)).fit(X, y)
    with pytest.raises(ValueError, match="hierarchical"):
        hierarchical.grow_experts(1)
    # Nor does collapse recovery, which splits experts in training: refused before fitting.
    with pytest.raises(ValueError, match=r"collapse_recovery=True\) does not support router='hierarchical'"):
        MoERegressor(**dict(FAST, router="hierarchical", collapse_recovery=True)).fit(X, y)
    with pytest.raises(Exception, match="not fitted"):
        MoERegressor().grow_experts(1)
