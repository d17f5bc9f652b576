"""MixtureOfExperts: router + stacked experts + combine, returning a :class:`MoEOutput`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .dispatch import dense_combine, dispatch_combine, expert_capacity, plan_dispatch
from .experts import StackedExperts
from .losses import BALANCE_LOSSES, cv2_balance_loss, router_z_loss, switch_balance_loss
from .routers import make_router


class MoEOutput(NamedTuple):
    """What :meth:`MixtureOfExperts.forward` returns.

    Attributes
    ----------
    output : Tensor of shape (n, n_outputs)
        The prediction (first field, which is all skorch's ``predict`` keeps).
    gates : Tensor of shape (n, n_experts)
        Gate weight of every expert for every row; zero for experts not chosen.
    balance_loss : Tensor, scalar
        Load-balancing loss (1 at perfect balance for ``"switch"``; 0 when disabled).
    z_loss : Tensor, scalar
        Router z-loss.
    expert_counts : Tensor of shape (n_experts,), int64
        Routing assignments per expert in this batch, before any capacity cap, counting
        only rows with positive ``sample_weight`` when one is given.
    n_dropped : Tensor, scalar int64
        Assignments dropped by the capacity cap (always 0 outside training).
    """

    output: torch.Tensor
    gates: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_counts: torch.Tensor
    n_dropped: torch.Tensor


class MixtureOfExperts(nn.Module):
    """A mixture of MLP experts for tabular data.

    Parameters
    ----------
    n_features : int
        Input width.
    n_outputs : int
        Output width (regression targets, or class logits).
    n_experts : int, default=8
    top_k : int, default=2
        Experts per row for sparse routers.
    router : {"softmax", "topk", "noisy_topk", "switch"}, default="topk"
        ``"softmax"`` is the dense soft mixture (every expert on every row, ``top_k``
        unused); ``"topk"`` routes each row to its ``top_k`` best experts with gate weights
        renormalised over them; ``"noisy_topk"`` adds learned Gaussian noise to the ranking
        in training (Shazeer et al. 2017); ``"switch"`` is top-1 with input jitter in
        training (Fedus et al. 2021). See :mod:`sklearn_moe.nn.routers`.
    expert_hidden : tuple of int, default=(128,)
        Hidden layer sizes of every expert.
    activation : str, default="relu"
    dropout : float, default=0.0
    layer_norm : bool, default=False
    skip_connections : bool, default=True
    temperature : float, default=1.0
        Router softmax temperature.
    capacity_factor : float or None, default=None
        In training only, caps each expert at ``ceil(capacity_factor * n * top_k /
        n_experts)`` rows per batch; ``None`` is dropless. Evaluation is always dropless, so a
        row's prediction never depends on the other rows of its batch.
    balance_loss : {"switch", "cv2", "aux_free"} or None, default="switch"
        Which load-balancing loss :class:`MoEOutput` carries (weighting is the trainer's):
        the Switch loss (1 at perfect balance) or Shazeer's importance + load ``CV^2``
        (0 at perfect balance). ``"aux_free"`` carries no loss: the trainer calls
        ``router.update_selection_bias(expert_counts, rate)`` after each optimizer step.
    output_init_scale : float, default=0.1
        Scale of the experts' output-layer initialisation.
    shared_expert : bool, default=False
        Add an always-on expert, of the same architecture, to every row's output
        (DeepSeekMoE): it learns what all rows share, the routed experts what differs.
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP router; ``()`` is a linear router.
    expert_dropout : float, default=0.0
        In training only, each of a row's chosen experts is dropped with this probability
        (never all of them: the first choice stays if every one was drawn), and the row's
        remaining gate weights are renormalised. A regulariser against rows leaning on one
        expert.
    """

    def __init__(
        self,
        n_features: int,
        n_outputs: int,
        n_experts: int = 8,
        top_k: int = 2,
        router: str = "topk",
        expert_hidden: tuple[int, ...] = (128,),
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
        skip_connections: bool = True,
        temperature: float = 1.0,
        capacity_factor: float | None = None,
        balance_loss: str | None = "switch",
        output_init_scale: float = 0.1,
        shared_expert: bool = False,
        gate_hidden: tuple[int, ...] = (),
        expert_dropout: float = 0.0,
    ):
        super().__init__()
        if balance_loss is not None and balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {sorted(BALANCE_LOSSES)} or None, got {balance_loss!r}")
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        if capacity_factor is not None and not capacity_factor >= 1:
            raise ValueError(f"capacity_factor must be None or >= 1, got {capacity_factor}")
        self.n_features = n_features
        self.n_outputs = n_outputs
        self.n_experts = n_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.balance_loss = balance_loss
        self.expert_dropout = expert_dropout
        self.router = make_router(router, n_features, n_experts, top_k, temperature, tuple(gate_hidden))
        expert_args = (n_features, n_outputs, tuple(expert_hidden), activation, dropout, layer_norm,
                       skip_connections, output_init_scale)
        self.experts = StackedExperts(n_experts, *expert_args)
        self.shared_expert = StackedExperts(1, *expert_args) if shared_expert else None

    def forward(self, x: torch.Tensor, sample_weight: torch.Tensor | None = None) -> MoEOutput:
        """Route and mix.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
        sample_weight : Tensor of shape (n,), optional
            Rows with zero weight are left out of the auxiliary losses.
        """
        routing = self.router(x)
        n = x.shape[0]
        mask = None if sample_weight is None else sample_weight > 0
        active = self._expert_dropout_mask(routing.indices) if self.training and self.expert_dropout > 0 else None
        if routing.dense:
            gates = routing.probs
            if active is not None:
                gates = torch.zeros_like(gates).scatter(1, routing.indices, active.to(gates.dtype)) * gates
                gates = gates / gates.sum(dim=1, keepdim=True)
            output = dense_combine(x, self.experts, gates)
            counts = torch.full((self.n_experts,), n, dtype=torch.long, device=x.device)
            n_dropped = counts.new_zeros(())
        else:
            capacity = None
            if self.training and self.capacity_factor is not None:
                capacity = expert_capacity(self.capacity_factor, n, routing.indices.shape[1], self.n_experts)
            weights = routing.weights
            if active is not None:
                weights = weights * active
                weights = weights / weights.sum(dim=1, keepdim=True)
            plan = plan_dispatch(routing.indices, weights, self.n_experts, capacity, active)
            output = dispatch_combine(x, self.experts, plan, self.n_outputs)
            gates = routing.probs.new_zeros(n, self.n_experts).scatter(1, routing.indices, weights)
            counts = plan.counts
            n_dropped = counts.sum() - plan.rows.shape[0]
        if self.shared_expert is not None:
            output = output + self.shared_expert(x.unsqueeze(0))[0]
        counted = active  # routing counts leave out dropped experts and zero-weight rows
        if mask is not None:
            counted = mask.unsqueeze(1).expand_as(routing.indices) if counted is None else counted & mask.unsqueeze(1)
        if counted is not None:
            counts = torch.bincount(routing.indices[counted], minlength=self.n_experts)
        balance = self._balance_loss(routing, gates, mask)
        z_loss = router_z_loss(routing.logits, mask)
        return MoEOutput(output, gates, balance, z_loss, counts, n_dropped)

    def _expert_dropout_mask(self, indices: torch.Tensor) -> torch.Tensor:
        """(n, k) bool: which chosen experts survive; at least the first choice of each row."""
        active = torch.rand(indices.shape, device=indices.device) >= self.expert_dropout
        active[:, 0] |= ~active.any(dim=1)
        return active

    def _balance_loss(self, routing, gates: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.balance_loss == "switch":
            return switch_balance_loss(routing.probs, routing.indices, mask)
        if self.balance_loss == "cv2":
            load = routing.selection_probs if routing.selection_probs is not None else (gates > 0).to(gates.dtype)
            return cv2_balance_loss(gates, load, mask)
        return routing.probs.new_zeros(())  # None, or "aux_free" (a bias update, not a loss)
