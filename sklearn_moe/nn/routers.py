"""Routers: turn an input batch into per-row expert choices and gate weights.

One class per routing rule, registered in :data:`ROUTERS` under the name the estimators'
``router`` parameter takes. Every router computes its logits and probabilities in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class Routing(NamedTuple):
    """The routing decision for one batch.

    Attributes
    ----------
    logits : Tensor of shape (n, n_experts)
        Router logits divided by the temperature, float32.
    probs : Tensor of shape (n, n_experts)
        Full softmax over all experts (what balance losses use).
    indices : Tensor of shape (n, k), int64
        Chosen experts per row, best first.
    weights : Tensor of shape (n, k)
        Gate weights of the chosen experts; each row sums to 1.
    dense : bool
        True when every row uses every expert (``k == n_experts``).
    """

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    dense: bool


class Router(nn.Module):
    """Base class: a linear gate ``x -> logits`` with a softmax temperature.

    Parameters
    ----------
    n_features : int
    n_experts : int
    top_k : int
        Experts per row (ignored by dense routers).
    temperature : float, default=1.0
        Logits are divided by it: below 1 sharpens the routing, above 1 flattens it.
    """

    def __init__(self, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.n_experts = n_experts
        self.top_k = top_k
        self.temperature = float(temperature)
        self.gate = nn.Linear(n_features, n_experts)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.gate(x.float()) / self.temperature

    def forward(self, x: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class SoftmaxRouter(Router):
    """Dense soft mixture: every expert gets its softmax weight; ``top_k`` is not used."""

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.compute_logits(x)
        probs = logits.softmax(dim=-1)
        indices = torch.arange(self.n_experts, device=x.device).expand(x.shape[0], -1)
        return Routing(logits, probs, indices, probs, dense=True)


class TopKRouter(Router):
    """Sparse routing: the ``top_k`` largest logits, weights renormalised over them.

    The renormalised weights equal ``softmax(logits[chosen])``, i.e. the full softmax
    restricted to the chosen experts and rescaled to sum to 1. With ``top_k=1`` that weight
    is the constant 1, which would give the router no gradient from the task loss; there
    the weight is ``p / stop_gradient(p)``: still exactly 1, but with the gradient of
    ``log p`` (the direction of the Switch Transformer's ``p * expert(x)`` without scaling
    the output by ``p``).
    """

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.compute_logits(x)
        probs = logits.softmax(dim=-1)
        top_logits, indices = logits.topk(self.top_k, dim=-1)
        if self.top_k == 1:
            chosen = probs.gather(1, indices)
            weights = chosen / chosen.detach()
        else:
            weights = top_logits.softmax(dim=-1)
        return Routing(logits, probs, indices, weights, dense=self.top_k == self.n_experts)


ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "topk": TopKRouter,
}


def make_router(name: str, n_features: int, n_experts: int, top_k: int, temperature: float) -> Router:
    """Build the router registered under ``name``."""
    try:
        router_cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}") from None
    return router_cls(n_features, n_experts, top_k, temperature)
