"""Removing experts from a fitted estimator and adding some: :meth:`BaseMoE.prune_experts`
and :meth:`BaseMoE.grow_experts`."""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._training import fitted_net, history_frame, rebuilt_module
from .nn._checks import check_int


def prune_experts(estimator, threshold: float):
    """Remove the experts whose share of the routing (``expert_load_``) is below
    ``threshold``; see :meth:`BaseMoE.prune_experts`."""
    check_is_fitted(estimator)
    if not isinstance(threshold, Real) or isinstance(threshold, bool) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a share in [0, 1), got {threshold!r}.")
    _check_flat_router(estimator, "prune_experts", "removing experts would empty or unbalance its groups")
    share = np.asarray(estimator.expert_load_, dtype=np.float64)
    keep = np.flatnonzero(share >= threshold)
    if keep.size == share.size:
        return estimator
    if keep.size == 0:
        raise ValueError(f"threshold={threshold} would remove every expert (largest share {share.max():.3g}).")
    _reindex_experts(estimator, keep)
    estimator.expert_load_ = share[keep] / share[keep].sum()
    return estimator


def grow_experts(estimator, n_new: int, noise: float, random_state):
    """Add ``n_new`` experts, each splitting the traffic of the busiest expert at its turn;
    see :meth:`BaseMoE.grow_experts`."""
    check_is_fitted(estimator)
    check_int("n_new (the number of experts to add)", n_new)
    if not isinstance(noise, Real) or isinstance(noise, bool) or not 0 <= noise < np.inf:
        raise ValueError(f"noise must be a finite float >= 0 (the copies' relative perturbation), got {noise!r}.")
    _check_flat_router(estimator, "grow_experts", "adding experts would unbalance its groups")
    generator = torch.Generator().manual_seed(int(check_random_state(random_state).randint(2**31 - 1)))
    share = np.asarray(estimator.expert_load_, dtype=np.float64)
    n_experts = share.size
    copies = _split_sources(share, int(n_new))
    sources = np.repeat(np.arange(n_experts), copies)
    _reindex_experts(estimator, np.concatenate([np.arange(n_experts), sources]))
    module = estimator.module_
    for source in np.flatnonzero(copies):
        targets = (n_experts + np.flatnonzero(sources == source)).tolist()
        module.split_expert(int(source), targets, noise=float(noise), generator=generator)
    per_copy = share / (1 + copies)
    estimator.expert_load_ = np.concatenate([per_copy, per_copy[sources]])
    return estimator


def _split_sources(share: np.ndarray, n_new: int) -> np.ndarray:
    """How many copies of each expert to add, one at a time, each to the expert whose share
    per copy (``share / (1 + copies)``) is then the largest (the lowest index on a tie)."""
    copies = np.zeros(share.size, dtype=np.int64)
    for _ in range(n_new):
        copies[np.argmax(share / (1 + copies))] += 1
    return copies


def _check_flat_router(estimator, method: str, why: str) -> None:
    if estimator.router == "hierarchical":
        raise ValueError(f"{method} does not support router='hierarchical': {why}.")


def _reindex_experts(estimator, index: np.ndarray) -> None:
    """Rebuild the fitted network with the experts ``index`` (each expert's slices of the
    experts' and the router's per-expert tensors, in that order, repeats allowed), keeping
    the rest of its weights and its history; ``n_experts`` becomes ``len(index)``."""
    module = estimator.module_
    per_expert = set(module.expert_state_names())
    positions = torch.as_tensor(index, device=next(module.parameters()).device)
    state = {name: tensor.index_select(0, positions) if name in per_expert else tensor
             for name, tensor in module.state_dict().items()}
    device = estimator.net_.device
    history = [{k: v for k, v in epoch.items() if k != "batches"} for epoch in estimator.net_.history]
    estimator.n_experts = int(len(index))
    estimator.net_ = fitted_net(estimator, rebuilt_module(estimator, state, device), device,
                                estimator.net_.batch_size, history)
    estimator.history_ = history_frame(estimator.net_.history)
