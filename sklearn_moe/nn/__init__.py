"""Pure-PyTorch Mixture-of-Experts engine (no scikit-learn imports)."""

from .dispatch import DispatchPlan, dense_combine, dispatch_combine, expert_capacity, plan_dispatch
from .experts import ACTIVATIONS, StackedExperts, StackedLinear
from .losses import cv2_balance_loss, router_z_loss, squared_cv, switch_balance_loss
from .moe import MixtureOfExperts, MoEOutput
from .routers import ROUTERS, NoisyTopKRouter, Router, Routing, SoftmaxRouter, SwitchRouter, TopKRouter, make_router

__all__ = [
    "ACTIVATIONS",
    "DispatchPlan",
    "MixtureOfExperts",
    "MoEOutput",
    "NoisyTopKRouter",
    "ROUTERS",
    "Router",
    "Routing",
    "SoftmaxRouter",
    "StackedExperts",
    "StackedLinear",
    "SwitchRouter",
    "TopKRouter",
    "cv2_balance_loss",
    "dense_combine",
    "dispatch_combine",
    "expert_capacity",
    "make_router",
    "plan_dispatch",
    "router_z_loss",
    "squared_cv",
    "switch_balance_loss",
]
