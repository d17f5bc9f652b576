"""Pure-PyTorch Mixture-of-Experts engine (no scikit-learn imports)."""

from .dispatch import DispatchPlan, dense_combine, dispatch_combine, expert_capacity, plan_dispatch
from .experts import ACTIVATIONS, StackedExperts, StackedLinear
from .losses import router_z_loss, switch_balance_loss
from .moe import MixtureOfExperts, MoEOutput
from .routers import ROUTERS, Router, Routing, SoftmaxRouter, TopKRouter, make_router

__all__ = [
    "ACTIVATIONS",
    "DispatchPlan",
    "MixtureOfExperts",
    "MoEOutput",
    "ROUTERS",
    "Router",
    "Routing",
    "SoftmaxRouter",
    "StackedExperts",
    "StackedLinear",
    "TopKRouter",
    "dense_combine",
    "dispatch_combine",
    "expert_capacity",
    "make_router",
    "plan_dispatch",
    "router_z_loss",
    "switch_balance_loss",
]
