"""Removing experts from a fitted estimator: :meth:`BaseMoE.prune_experts`."""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._training import fitted_net, history_frame, rebuilt_module


def prune_experts(estimator, threshold: float):
    """Remove the experts whose share of the routing (``expert_load_``) is below
    ``threshold``; see :meth:`BaseMoE.prune_experts`."""
    check_is_fitted(estimator)
    if not isinstance(threshold, Real) or isinstance(threshold, bool) or not 0 <= threshold < 1:
        raise ValueError(f"threshold must be a share in [0, 1), got {threshold!r}.")
    if estimator.router == "hierarchical":
        raise ValueError("prune_experts does not support router='hierarchical': removing experts would "
                         "empty or unbalance its groups.")
    share = np.asarray(estimator.expert_load_, dtype=np.float64)
    keep = np.flatnonzero(share >= threshold)
    if keep.size == share.size:
        return estimator
    if keep.size == 0:
        raise ValueError(f"threshold={threshold} would remove every expert (largest share {share.max():.3g}).")
    module = estimator.module_
    per_expert = set(module.expert_state_names())
    index = torch.as_tensor(keep, device=next(module.parameters()).device)
    state = {name: tensor.index_select(0, index) if name in per_expert else tensor
             for name, tensor in module.state_dict().items()}
    device = estimator.net_.device
    history = [{k: v for k, v in epoch.items() if k != "batches"} for epoch in estimator.net_.history]
    estimator.n_experts = int(keep.size)
    estimator.net_ = fitted_net(estimator, rebuilt_module(estimator, state, device), device,
                                estimator.net_.batch_size, history)
    estimator.history_ = history_frame(estimator.net_.history)
    estimator.expert_load_ = share[keep] / share[keep].sum()
    return estimator
