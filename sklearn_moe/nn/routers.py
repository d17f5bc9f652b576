"""Routers: turn an input batch into per-row expert choices and gate weights.

One class per routing rule, registered in :data:`ROUTERS` under the name the estimators'
``router`` parameter takes. Every router computes its logits and probabilities in float32.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
from torch import nn

from ._random import draw_generator
from ._sync import avoid_host_reads
from .products import RowInvariantLinear


class Routing(NamedTuple):
    """The routing decision for one batch.

    Each parameter is kept as the field of the same name.

    Parameters
    ----------
    logits : Tensor of shape (n, n_experts)
        Router logits divided by the temperature, float32.
    probs : Tensor of shape (n, n_experts)
        Full softmax over all experts (what balance losses use).
    indices : Tensor of shape (n, k), int64
        Chosen experts per row, best first.
    weights : Tensor of shape (n, k)
        Gate weights of the chosen experts; each row sums to 1. Whether every row uses
        every expert is the router's :attr:`Router.is_dense`.
    selection_probs : Tensor of shape (n, n_experts) or None, optional
        Differentiable probability that each expert is selected for each row (the noisy
        top-k router's smooth load estimate); None where selection is deterministic.
    active : Tensor of shape (n, k), bool, or None, optional
        Which of the ``k`` candidate columns a row really uses (dynamic-k routers: the
        others have weight 0); None when all are used.
    scores : Tensor of shape (n, n_experts) or None, optional
        The scores that ranked the experts (with any selection bias and noise): a row's
        next choices, for rerouting capacity overflow. None for dense routing.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    selection_probs: torch.Tensor | None = None
    active: torch.Tensor | None = None
    scores: torch.Tensor | None = None


def _make_gate(n_features: int, n_experts: int, hidden: tuple[int, ...]) -> nn.Module:
    if not hidden:
        return RowInvariantLinear(n_features, n_experts)
    widths = (n_features, *hidden)
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [RowInvariantLinear(w_in, w_out), nn.ReLU()]
    return nn.Sequential(*layers, RowInvariantLinear(widths[-1], n_experts))


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's ``k`` highest-scoring columns, highest first: ``scores.topk(k, dim=1).indices``.

    On the CPU, ``k`` of 1 or 2 are found by arg-maxima instead (a second one with the first
    masked), taken as ``max(dim=1).indices``, which a CPU computes faster than ``argmax``:
    on 65,536 rows of 64 scores (2 Xeon cores) PyTorch's top-k takes 20.6 ms, the two
    ``argmax`` 14.8 and the two ``max`` 8.9. Where scores tie, the first column wins.

    Parameters
    ----------
    scores : Tensor of shape (n, n_columns)
    k : int
        At most ``n_columns``.

    Returns
    -------
    Tensor of shape (n, k), int64
        Distinct columns per row.
    """
    if k > 2 or avoid_host_reads(scores.device, training=True):  # a GPU (or its paths, sync_free_paths)
        return scores.topk(k, dim=1).indices
    scores = scores.detach()
    first = scores.max(dim=1, keepdim=True).indices
    if k == 1:
        return first
    second = scores.scatter(1, first, float("-inf")).max(dim=1, keepdim=True).indices
    # A row of -inf beyond its first column would give the first column again.
    second = torch.where(second == first, (first + 1) % scores.shape[1], second)
    return torch.cat((first, second), dim=1)


def _unit_weight(log_p: torch.Tensor) -> torch.Tensor:
    """``exp(log_p - stop_gradient(log_p))``: the value 1, with the gradient of ``log p``.

    Taken from the log-probability, not as ``p / stop_gradient(p)``: at a low temperature,
    or for a noisy choice the clean probabilities rule out, ``p`` underflows to 0, where
    that quotient is 0/0 and its gradient overflows."""
    return torch.exp(log_p - log_p.detach())


class Router(nn.Module):
    """Base class: a linear gate ``x -> logits`` with a softmax temperature.

    Parameters
    ----------
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int
        Experts per row, in ``[1, n_experts]`` (ignored by dense routers).
    temperature : float, default=1.0
        Logits are divided by it: below 1 sharpens the routing, above 1 flattens it. Kept
        as the buffer ``temperature`` (a 0-d tensor) that annealing may change in training.
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.

    Raises
    ------
    ValueError
        If ``top_k`` is not in ``[1, n_experts]`` or ``temperature`` is not positive.
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
        # A buffer, so that a temperature annealed in training is saved with the weights.
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.gate = _make_gate(n_features, n_experts, tuple(gate_hidden))
        # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores that
        # *select* experts, never to the gate weights. Zero unless a trainer updates it.
        self.register_buffer("selection_bias", torch.zeros(n_experts))

    #: Whether the router has a gate that training updates (False: fixed weights).
    learned = True

    def expert_state_names(self) -> list[str]:
        """List the router's state-dict entries with one row per expert (axis 0).

        Returns
        -------
        list of str
            The names of the selection bias and of the gate's output layer (weight and bias).
        """
        names = ["selection_bias"]
        if self.gate is not None:
            last = "gate" if isinstance(self.gate, nn.Linear) else f"gate.{len(self.gate) - 1}"
            names += [f"{last}.weight", f"{last}.bias"]
        return names

    @torch.no_grad()
    def update_selection_bias(self, expert_counts: torch.Tensor, rate: float) -> None:
        """Favour under-loaded experts: ``b_e += rate * sign(mean_load - load_e)``.

        Parameters
        ----------
        expert_counts : Tensor of shape (n_experts,)
            Each expert's load (routed assignments) in the last batch.
        rate : float
            Step added to (or subtracted from) each expert's selection bias.
        """
        load = expert_counts.to(self.selection_bias.dtype)
        self.selection_bias += rate * torch.sign(load.mean() - load)

    @property
    def is_dense(self) -> bool:
        """Whether every row uses every expert."""
        return self.top_k == self.n_experts

    @property
    def chooses_by_rank(self) -> bool:
        """Whether a row's experts are those of its largest logits (a top-k choice).

        Lowering some logits then moves rows away from those experts rather than sharing
        out their weight.
        """
        return False

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the router logits, in float32 at least (also under mixed-precision autocast).

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Tensor of shape (n, n_experts)
            The gate's output divided by the temperature: float32, or float64 for a module
            converted with ``.double()``.

        Raises
        ------
        TypeError
            If the gate's weights are of a half-precision dtype (``.half()`` or
            ``.to(torch.bfloat16)``): the router computes in float32, so mixed precision is
            ``torch.autocast`` around a float32 module.
        """
        dtype = self.temperature.dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"The router computes in float32 or float64, not {dtype}: keep the module in float32 "
                            "(or .double()) and use torch.autocast for mixed precision.")
        # Entering a disabled autocast costs more than the gate itself on a 1-row predict.
        full_precision = (torch.autocast(device_type=x.device.type, enabled=False)
                          if torch.is_autocast_enabled(x.device.type) else contextlib.nullcontext())
        with full_precision:
            return self.gate(x.to(dtype)) / self.temperature

    def forward(self, x: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        """Route a batch; each routing rule (subclass) implements it.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Routing
            The batch's routing decision.

        Raises
        ------
        NotImplementedError
            Always: the base class has no routing rule.
        """
        raise NotImplementedError


class SoftmaxRouter(Router):
    """Dense soft mixture: every expert gets its softmax weight; ``top_k`` is not used.

    Parameters
    ----------
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int
        Not used (every row gets every expert), but must be in ``[1, n_experts]``.
    temperature : float, default=1.0
        Softmax temperature, > 0 (see :class:`Router`).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.

    Raises
    ------
    ValueError
        If ``top_k`` is not in ``[1, n_experts]`` or ``temperature`` is not positive.
    """

    is_dense = True

    def forward(self, x: torch.Tensor) -> Routing:
        """Give every row every expert, weighted by the softmax of the logits.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Routing
            The batch's logits, full softmax, chosen experts and gate weights; ``indices``
            lists every expert and ``weights`` is ``probs``.
        """
        logits = self.compute_logits(x)
        probs = logits.softmax(dim=-1)
        indices = torch.arange(self.n_experts, device=x.device).expand(x.shape[0], -1)
        return Routing(logits, probs, indices, probs)


class UniformRouter(Router):
    """No gate: every expert weighs ``1 / n_experts`` on every row (``top_k`` is not used).

    The mixture is then a plain ensemble of its experts, the baseline that shows what a
    learned gate adds. The router has no parameters; its logits are zeros.
    """

    is_dense = True
    learned = False

    def __init__(self, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = ()):
        super().__init__(n_features, n_experts, top_k, temperature, ())
        self.gate = None

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Return zero logits: there is no gate.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Tensor of shape (n, n_experts), float32
            Zeros.
        """
        return x.new_zeros(x.shape[0], self.n_experts, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> Routing:
        """Give every row every expert, each with weight ``1 / n_experts``.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Routing
            The batch's logits, full softmax, chosen experts and gate weights; ``indices``
            lists every expert and ``weights`` is ``probs``.
        """
        logits = self.compute_logits(x)
        probs = logits.softmax(dim=-1)
        indices = torch.arange(self.n_experts, device=x.device).expand(x.shape[0], -1)
        return Routing(logits, probs, indices, probs)


class TopKRouter(Router):
    """Sparse routing: the ``top_k`` largest logits, weights renormalised over them.

    The renormalised weights equal ``softmax(logits[chosen])``, i.e. the full softmax
    restricted to the chosen experts and rescaled to sum to 1. With ``top_k=1`` that weight
    is the constant 1, which would give the router no gradient from the task loss; there
    the weight is ``p / stop_gradient(p)``: still exactly 1, but with the gradient of
    ``log p`` (the direction of the Switch Transformer's ``p * expert(x)`` without scaling
    the output by ``p``).

    Parameters
    ----------
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int
        Experts per row, in ``[1, n_experts]``.
    temperature : float, default=1.0
        Softmax temperature, > 0 (see :class:`Router`).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.

    Raises
    ------
    ValueError
        If ``top_k`` is not in ``[1, n_experts]`` or ``temperature`` is not positive.
    """

    def selection_scores(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the scores that pick (and weigh) the experts, and ``Routing.selection_probs``.

        Here the clean logits, and None: selection is deterministic.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.
        logits : Tensor of shape (n, n_experts)
            The batch's logits (:meth:`compute_logits`).

        Returns
        -------
        scores : Tensor of shape (n, n_experts)
            The scores that rank the experts (before the selection bias) and whose softmax
            over the chosen ones gives the gate weights.
        selection_probs : Tensor of shape (n, n_experts) or None
            Each expert's probability of being selected where selection is random; None here.
        """
        return logits, None

    @property
    def chooses_by_rank(self) -> bool:
        """Whether a row's experts are those of its largest logits: unless ``top_k`` is all."""
        return not self.is_dense

    def forward(self, x: torch.Tensor) -> Routing:
        """Route each row to the ``top_k`` experts of highest score (plus selection bias).

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Routing
            The batch's logits, full softmax, chosen experts and gate weights, with the
            ranking ``scores`` for rerouting.
        """
        logits = self.compute_logits(x)
        probs = logits.softmax(dim=-1)
        scores, selection_probs = self.selection_scores(x, logits)
        ranking_scores = scores + self.selection_bias
        indices = top_indices(ranking_scores, self.top_k)
        if self.top_k == 1:
            weights = _unit_weight(logits.log_softmax(dim=-1).gather(1, indices))
        else:
            weights = scores.gather(1, indices).softmax(dim=-1)
        return Routing(logits, probs, indices, weights, selection_probs, scores=ranking_scores)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al., 2017).

    In training the experts are ranked and weighted by ``logits + eps * softplus(x W_noise)
    / temperature`` with ``eps ~ N(0, 1)``: a learned, per-expert amount of noise that
    spreads rows over experts. At prediction there is no noise. With ``top_k >=
    n_experts`` every expert serves every row with its clean softmax weight (the module
    then routes densely), so the noise changes nothing there. ``selection_probs`` is the
    paper's smooth load estimate ``P(expert e is chosen) = Phi((logit_e - threshold_e) /
    noise_std_e)``, where ``threshold_e`` is the k-th largest noisy score among the other
    experts; the ``"cv2"`` balance loss uses it.

    Parameters
    ----------
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int
        Experts per row, in ``[1, n_experts]``.
    temperature : float, default=1.0
        Softmax temperature, > 0 (see :class:`Router`).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.

    Raises
    ------
    ValueError
        If ``top_k`` is not in ``[1, n_experts]`` or ``temperature`` is not positive.
    """

    def __init__(self, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = ()):
        super().__init__(n_features, n_experts, top_k, temperature, gate_hidden)
        self.noise = nn.Linear(n_features, n_experts)
        nn.init.zeros_(self.noise.weight)
        nn.init.zeros_(self.noise.bias)

    def expert_state_names(self) -> list[str]:
        """List the router's state-dict entries with one row per expert (axis 0).

        Returns
        -------
        list of str
            The names of the selection bias, the gate's output layer and the noise layer.
        """
        return [*super().expert_state_names(), "noise.weight", "noise.bias"]

    def _noise_std(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return nn.functional.softplus(self.noise(x.to(self.temperature.dtype))) / self.temperature + 1e-6

    def selection_scores(self, x: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the noisy scores that pick (and weigh) the experts, and their smooth load estimate.

        In evaluation there is no noise: the clean logits, and None.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.
        logits : Tensor of shape (n, n_experts)
            The batch's logits (:meth:`compute_logits`).

        Returns
        -------
        scores : Tensor of shape (n, n_experts)
            In training, the logits plus learned-scale Gaussian noise; else the logits.
        selection_probs : Tensor of shape (n, n_experts) or None
            In training with ``top_k < n_experts``, each expert's probability of being among
            the row's ``top_k`` (the paper's smooth load estimate); else None.
        """
        if not self.training:
            return logits, None
        noise_std = self._noise_std(x)
        noisy = logits + torch.randn(logits.shape, dtype=logits.dtype, device=logits.device,
                                     generator=draw_generator()) * noise_std
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
    """Switch Transformer routing (Fedus et al., 2021): top-1, with jitter on the router input.

    In training the router input is multiplied by uniform noise in ``[1 - jitter,
    1 + jitter]``.

    Parameters
    ----------
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int, default=1
        Not used: one expert per row.
    temperature : float, default=1.0
        Softmax temperature, > 0 (see :class:`Router`).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.

    Raises
    ------
    ValueError
        If ``temperature`` is not positive.
    """

    jitter = 1e-2

    def __init__(self, n_features: int, n_experts: int, top_k: int = 1, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = ()):
        super().__init__(n_features, n_experts, 1, temperature, gate_hidden)

    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the router logits in float32, on the jittered input in training.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Tensor of shape (n, n_experts), float32
            The gate's output divided by the temperature.
        """
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter, generator=draw_generator())
        return super().compute_logits(x)


class TopPRouter(Router):
    """Dynamic k (top-p routing, Huang et al. 2024): each row takes experts until ``top_p``.

    Each row takes its most probable experts until their probabilities add up to ``top_p``,
    at most ``top_k`` of them.

    Confident rows use one expert, uncertain rows several. With ``learned_threshold=True``
    the rule is per expert instead: a row also uses expert ``e`` (among its ``top_k`` best)
    when ``p_e >= sigmoid(theta_e)``, with ``theta_e`` a trained parameter (initialised to
    a threshold of ``1 / n_experts``), so how many experts a row uses is learned. The hard
    keep/skip decision passes the gradient of ``sigmoid((p_e - threshold_e) / 0.1)`` to
    the threshold (straight-through). A row always keeps its best expert. Gate weights are
    the kept experts' probabilities, renormalised: unlike the paper, which weighs the kept
    experts by their raw probabilities (a row's outputs then shrink with the probability
    mass it keeps), so that every row's gate weights sum to 1 as under the other routers.
    The paper's entropy ("dynamic") loss, which keeps a router from reaching ``top_p`` by
    spreading its probability thinly over many experts, is not used: the ``top_k`` cap
    bounds the experts per row instead.

    Parameters
    ----------
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int
        Experts per row, in ``[1, n_experts]`` (the most a row may use).
    temperature : float, default=1.0
        Softmax temperature, > 0 (see :class:`Router`).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.
    top_p : float, default=0.5
        Probability mass, in (0, 1], that a row's kept experts reach.
    learned_threshold : bool, default=False
        Use a learned per-expert probability threshold instead of ``top_p``.

    Raises
    ------
    ValueError
        If ``top_k`` is not in ``[1, n_experts]``, ``temperature`` is not positive, or
        ``top_p`` is not in (0, 1].
    """

    threshold_sharpness = 0.1

    def __init__(self, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = (), top_p: float = 0.5, learned_threshold: bool = False):
        super().__init__(n_features, n_experts, top_k, temperature, gate_hidden)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.top_p = float(top_p)
        self.threshold_logit = None
        if learned_threshold:
            initial = -math.log(n_experts - 1) if n_experts > 1 else 0.0  # logit(1 / n_experts)
            self.threshold_logit = nn.Parameter(torch.full((n_experts,), initial))

    @property
    def is_dense(self) -> bool:
        """Whether every row uses every expert: never, the number of experts is per row."""
        return False

    def expert_state_names(self) -> list[str]:
        """List the router's state-dict entries with one row per expert (axis 0).

        Returns
        -------
        list of str
            The names of the selection bias, the gate's output layer and, with
            ``learned_threshold``, the threshold logits.
        """
        names = super().expert_state_names()
        return names if self.threshold_logit is None else [*names, "threshold_logit"]

    def forward(self, x: torch.Tensor) -> Routing:
        """Route each row to its most probable experts until their mass reaches ``top_p``.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Routing
            The batch's logits, full softmax, chosen experts and gate weights, with
            ``active`` marking the candidates each row keeps and the ranking ``scores``.
        """
        logits = self.compute_logits(x)
        probs = logits.softmax(dim=-1)
        ranking_scores = logits + self.selection_bias
        indices = ranking_scores.topk(self.top_k, dim=-1).indices
        chosen = probs.gather(1, indices)
        if self.threshold_logit is None:
            mass_before = chosen.cumsum(dim=1) - chosen
            keep = (mass_before < self.top_p).to(chosen.dtype)
        else:
            threshold = torch.sigmoid(self.threshold_logit)[indices]
            soft = torch.sigmoid((chosen - threshold) / self.threshold_sharpness)
            keep = (chosen >= threshold).to(chosen.dtype)
            keep = keep + (soft - soft.detach())  # exactly 0 and 1 forward, the soft gradient backward
        keep = torch.cat((torch.ones_like(keep[:, :1]), keep[:, 1:]), dim=1)  # the best expert always
        active = keep.detach() > 0
        kept = chosen * keep
        weights = kept / kept.sum(dim=1, keepdim=True)
        # A lone expert's weight is 1 whatever p is: give it the gradient of log p, as top-1 does.
        single = active.sum(dim=1, keepdim=True) == 1
        weights = torch.where(single, weights * _unit_weight(logits.log_softmax(dim=-1).gather(1, indices[:, :1])),
                              weights)
        return Routing(logits, probs, indices, weights, active=active, scores=ranking_scores)


class HierarchicalRouter(Router):
    """A two-level tree of gates (hierarchical MoE, Jordan & Jacobs 1994; Shazeer et al. 2017).

    The experts are split into ``n_groups`` contiguous groups of near-equal size. A group
    gate gives ``q_g = softmax(x W_group)_g``; a gate within each group gives
    ``w_e = softmax over the group's experts of (x W_expert)_e``. Leaf probabilities are
    the products ``p_e = q_g(e) * w_e``, which sum to 1 (``Routing.probs``).

    Sparse (``top_k < n_experts``): each row goes to its best group, and there to its
    ``top_k`` best experts (at most the smallest group's size); gate weights are the
    within-group weights renormalised over the chosen experts, times the chosen group's
    renormalised weight (1, carrying the gradient of ``log q_g``). Dense (``top_k ==
    n_experts``): every expert, weighted by ``p_e`` (the soft hierarchical mixture).
    ``Routing.logits`` (for the z-loss) is the sum of the two levels' logits.

    Parameters
    ----------
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int
        Experts per row, in ``[1, n_experts]``; ``top_k == n_experts`` is the dense mixture,
        and a sparse row takes at most the smallest group's size.
    temperature : float, default=1.0
        Softmax temperature, > 0 (see :class:`Router`).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.
    n_groups : int, default=2
        Number of expert groups, in ``[1, n_experts]``.

    Raises
    ------
    ValueError
        If ``top_k`` or ``n_groups`` is not in ``[1, n_experts]``, or ``temperature`` is not
        positive.
    """

    def __init__(self, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                 gate_hidden: tuple[int, ...] = (), n_groups: int = 2):
        super().__init__(n_features, n_experts, top_k, temperature, gate_hidden)
        if not 1 <= n_groups <= n_experts:
            raise ValueError(f"n_groups must be in [1, n_experts={n_experts}], got {n_groups}")
        self.n_groups = n_groups
        self.register_buffer("group_of_expert", torch.arange(n_experts) * n_groups // n_experts)
        self.group_gate = _make_gate(n_features, n_groups, tuple(gate_hidden))
        self.experts_per_row = min(top_k, n_experts // n_groups)

    def forward(self, x: torch.Tensor) -> Routing:
        """Route each row to its best group, and there to its best experts (or all, dense).

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The batch's (embedded) input rows.

        Returns
        -------
        Routing
            The batch's logits, full softmax, chosen experts and gate weights, with the
            ranking ``scores`` for rerouting when sparse.
        """
        expert_logits = self.compute_logits(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            group_logits = self.group_gate(x.to(self.temperature.dtype)) / self.temperature
        in_group = self.group_of_expert.unsqueeze(0) == torch.arange(self.n_groups, device=x.device).unsqueeze(1)
        masked = expert_logits.unsqueeze(1).masked_fill(~in_group, float("-inf"))  # (n, G, E)
        # Each expert's group's column by index_select, whose gradient is an index_add (that of
        # indexing is an accumulating index_put, which a GPU runs with a sort).
        log_within = expert_logits - masked.logsumexp(dim=2).index_select(1, self.group_of_expert)
        log_group = group_logits.log_softmax(dim=1)
        probs = (log_group.index_select(1, self.group_of_expert) + log_within).exp()
        logits = expert_logits + group_logits.index_select(1, self.group_of_expert)
        if self.is_dense:
            indices = torch.arange(self.n_experts, device=x.device).expand(x.shape[0], -1)
            return Routing(logits, probs, indices, probs)
        best_group = group_logits.argmax(dim=1, keepdim=True)
        outside = self.group_of_expert.unsqueeze(0) != best_group
        ranking_scores = (expert_logits + self.selection_bias).masked_fill(outside, float("-inf"))
        indices = ranking_scores.topk(self.experts_per_row, dim=1).indices
        group_weight = _unit_weight(log_group.gather(1, best_group))
        if self.experts_per_row == 1:
            weights = _unit_weight(log_within.gather(1, indices))
        else:
            weights = log_within.gather(1, indices).softmax(dim=1)
        # Rerouting goes to the rest of the best group first (in selection order), then to the
        # other experts by leaf probability: their scores are shifted below the group's lowest.
        with torch.no_grad():
            inside = expert_logits + self.selection_bias
            others = probs.log() + self.selection_bias
            shift = (others.masked_fill(~outside, float("-inf")).amax(dim=1, keepdim=True)
                     - inside.masked_fill(outside, float("inf")).amin(dim=1, keepdim=True) + 1.0)
            ranking_scores = torch.where(outside, others - shift, inside)
        return Routing(logits, probs, indices, weights * group_weight, scores=ranking_scores)


ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "top_p": TopPRouter,
    "hierarchical": HierarchicalRouter,
    "uniform": UniformRouter,
}

ROUTER_OPTIONS = {"top_p": ("top_p", "learned_threshold"), "hierarchical": ("n_groups",)}


def make_router(name: str, n_features: int, n_experts: int, top_k: int, temperature: float = 1.0,
                gate_hidden: tuple[int, ...] = (), **options) -> Router:
    """Build the router registered under ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`ROUTERS`: ``"softmax"``, ``"topk"``, ``"noisy_topk"``, ``"switch"``,
        ``"top_p"``, ``"hierarchical"`` or ``"uniform"``.
    n_features : int
        Width of the router's input (the model's embedded input row).
    n_experts : int
        Number of experts to route among.
    top_k : int
        Experts per row, in ``[1, n_experts]``.
    temperature : float, default=1.0
        Softmax temperature, > 0 (see :class:`Router`).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP gate (ReLU); ``()`` is a linear gate.
    **options
        Router-specific settings (``top_p`` and ``learned_threshold`` for ``"top_p"``,
        ``n_groups`` for ``"hierarchical"``); the ones another router takes are ignored, so
        callers can pass every setting whatever the router.

    Returns
    -------
    Router
        A new router of the class registered under ``name``.

    Raises
    ------
    ValueError
        For an unknown ``name``, or settings the router rejects.
    """
    try:
        router_cls = ROUTERS[name]
    except KeyError:
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}") from None
    own = {key: value for key, value in options.items() if key in ROUTER_OPTIONS.get(name, ())}
    return router_cls(n_features, n_experts, top_k, temperature, gate_hidden, **own)
