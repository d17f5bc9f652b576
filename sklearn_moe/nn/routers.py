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
    selection_probs : Tensor of shape (n, n_experts) or None
        Differentiable probability that each expert is selected for each row (the noisy
        top-k router's smooth load estimate); None where selection is deterministic.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    dense: bool
    selection_probs: torch.Tensor | None = None


def _make_gate(n_features: int, n_experts: int, hidden: tuple[int, ...]) -> nn.Module:
    if not hidden:
        return nn.Linear(n_features, n_experts)
    widths = (n_features, *hidden)
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], n_experts))


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
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.
    """

    def __init__(self, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = ()):
        super().__init__()
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={n_experts}], got {top_k}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.n_experts = n_experts
        self.top_k = top_k
        self.temperature = float(temperature)
        self.gate = _make_gate(n_features, n_experts, tuple(gate_hidden))
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores that
        # *select* experts, never to the gate weights. Zero unless a trainer updates it.
        self.register_buffer("selection_bias", torch.zeros(n_experts))

    @torch.no_grad()
    def update_selection_bias(self, expert_counts: torch.Tensor, rate: float) -> None:
        """``b_e += rate * sign(mean_load - load_e)``: favour under-loaded experts."""
        load = expert_counts.to(self.selection_bias.dtype)
        self.selection_bias += rate * torch.sign(load.mean() - load)

    @property
    def is_dense(self) -> bool:
        """Whether every row uses every expert."""
        return self.top_k == self.n_experts

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.gate(x.float()) / self.temperature

    def forward(self, x: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class SoftmaxRouter(Router):
    """Dense soft mixture: every expert gets its softmax weight; ``top_k`` is not used."""

    is_dense = True

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

    def selection_scores(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scores that pick (and weigh) the experts, and ``Routing.selection_probs``.

        Here the clean logits, and None: selection is deterministic.
        """
        return logits, None

    def forward(self, x: torch.Tensor) -> Routing:
        logits = self.compute_logits(x)
        probs = logits.softmax(dim=-1)
        scores, selection_probs = self.selection_scores(x, logits)
        indices = (scores + self.selection_bias).topk(self.top_k, dim=-1).indices
        top_scores = scores.gather(1, indices)
        if self.top_k == 1:
            chosen = probs.gather(1, indices)
            weights = chosen / chosen.detach()
        else:
            weights = top_scores.softmax(dim=-1)
        return Routing(logits, probs, indices, weights, self.top_k == self.n_experts, selection_probs)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al., 2017).

    In training the experts are ranked and weighted by ``logits + eps * softplus(x W_noise)
    / temperature`` with ``eps ~ N(0, 1)``: a learned, per-expert amount of noise that
    spreads rows over experts. At prediction there is no noise. ``selection_probs`` is the
    paper's smooth load estimate ``P(expert e is chosen) = Phi((logit_e - threshold_e) /
    noise_std_e)``, where ``threshold_e`` is the k-th largest noisy score among the other
    experts; the ``"cv2"`` balance loss uses it.
    """

    def __init__(self, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = ()):
        super().__init__(n_features, n_experts, top_k, temperature, gate_hidden)
        self.noise = nn.Linear(n_features, n_experts)
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.noise.bias)

    def _noise_std(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return nn.functional.softplus(self.noise(x.float())) / self.temperature + 1e-6

    def selection_scores(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.training:
            return logits, None
        noise_std = self._noise_std(x)
        noisy = logits + torch.randn_like(logits) * noise_std
        if self.top_k == self.n_experts:
            return noisy, None
        # Threshold for expert e: the k-th largest noisy score among the other experts,
        # which is the (k+1)-th overall if e is in the top k, else the k-th.
        top = noisy.topk(self.top_k + 1, dim=-1).values
        kth, next_after_kth = top[:, self.top_k - 1:self.top_k], top[:, self.top_k:]
        threshold = torch.where(noisy > next_after_kth, next_after_kth, kth)
        selection_probs = torch.special.ndtr((logits - threshold) / noise_std)
        return noisy, selection_probs


class SwitchRouter(TopKRouter):
    """Switch Transformer routing (Fedus et al., 2021): top-1, with the router input
    multiplied by uniform noise in ``[1 - jitter, 1 + jitter]`` in training. ``top_k`` is
    not used."""

    jitter = 1e-2

    def __init__(self, n_features: int, n_experts: int, top_k: int = 1, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = ()):
        super().__init__(n_features, n_experts, 1, temperature, gate_hidden)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return super().compute_logits(x)


ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
}


def make_router(name: str, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                gate_hidden: tuple[int, ...] = ()) -> Router:
    """Build the router registered under ``name``."""
    try:
        router_cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}") from None
    return router_cls(n_features, n_experts, top_k, temperature, gate_hidden)
