"""Pure-PyTorch Mixture-of-Experts engine (no scikit-learn imports)."""

from .density import mixture_nll
from .dispatch import (
    OVERFLOW_POLICIES,
    DispatchPlan,
    dense_combine,
    dispatch_combine,
    expert_capacity,
    plan_dispatch,
    scale_gradient,
)
from .embeddings import CategoricalEmbedding, NumericEmbedding
from .experts import ACTIVATIONS, StackedExperts, StackedLinear
from .layouts import LAYOUTS, choose_layout, expert_outputs, plan_layout
from .losses import (
    cv2_balance_loss,
    expert_diversity_loss,
    per_expert_loss,
    router_z_loss,
    squared_cv,
    switch_balance_loss,
)
from .moe import MixtureOfExperts, MoEOutput
from .routers import (
    ROUTERS,
    HierarchicalRouter,
    NoisyTopKRouter,
    Router,
    Routing,
    SoftmaxRouter,
    SwitchRouter,
    TopKRouter,
    TopPRouter,
    make_router,
)

__all__ = [
    "ACTIVATIONS",
    "CategoricalEmbedding",
    "OVERFLOW_POLICIES",
    "DispatchPlan",
    "HierarchicalRouter",
    "LAYOUTS",
    "MixtureOfExperts",
    "MoEOutput",
    "NoisyTopKRouter",
    "NumericEmbedding",
    "ROUTERS",
    "Router",
    "Routing",
    "SoftmaxRouter",
    "StackedExperts",
    "StackedLinear",
    "SwitchRouter",
    "TopKRouter",
    "TopPRouter",
    "choose_layout",
    "cv2_balance_loss",
    "dense_combine",
    "dispatch_combine",
    "expert_capacity",
    "expert_diversity_loss",
    "expert_outputs",
    "make_router",
    "mixture_nll",
    "per_expert_loss",
    "plan_dispatch",
    "plan_layout",
    "router_z_loss",
    "scale_gradient",
    "squared_cv",
    "switch_balance_loss",
]
