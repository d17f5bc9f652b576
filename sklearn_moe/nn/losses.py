"""Auxiliary routing losses as pure functions, the per-expert training loss, and the
multilabel task loss (:class:`MultilabelLoss`).

Every routing loss takes an optional boolean ``mask`` of shape ``(n,)``: rows where it is
False (e.g. rows with zero sample weight, or padding) do not count.

Host synchronisation: none. Masked rows are set aside with ``torch.where`` and counted on
the device, never selected with the mask (a selection's size is read on the host, which on
a GPU waits for the device); what a masked row holds, even a non-finite value, never
reaches the loss or its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import count_routed, normalize_per_row, sum_per_row


def _masked_sum(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the rows (dim 0) where ``mask`` is True."""
    keep = mask.view(-1, *([1] * (tensor.ndim - 1)))
    return torch.where(keep, tensor, 0).sum(dim=0)


def switch_balance_loss(
    probs: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None = None,
    active: torch.Tensor | None = None, counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss, normalised so that perfect balance is 1.

    ``loss = E * sum_e f_e * P_e`` where ``f_e`` is the fraction of the ``n * k`` routing
    assignments that went to expert ``e`` and ``P_e`` the mean router probability of ``e``
    over the full softmax. Both sum to 1, so uniform routing gives exactly 1 for every
    ``k``; total collapse onto ``k`` experts (one, for top-1) gives ``E / k``. Gradients
    flow through ``P_e`` only.

    Parameters
    ----------
    probs : Tensor of shape (n, n_experts)
        Full softmax of the router.
    indices : Tensor of shape (n, k)
        Chosen experts.
    mask : Tensor of shape (n,), bool, optional
        Rows that count, e.g. those with a non-zero sample weight; all when None.
    active : Tensor of shape (n, k), bool, optional
        Which assignments count (dynamic-k routing); all when None.
    counts : Tensor of shape (n_experts,), int64, optional
        The assignments per expert that count, when the caller has them already:
        ``count_routed(indices, n_experts, active, mask)[0]``.

    Returns
    -------
    Tensor
        The scalar loss, of the dtype of ``probs``: 1 for uniform routing, ``n_experts / k``
        at total collapse; 0 when no row counts.
    """
    n_experts = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    if counts is None:
        counts = count_routed(indices, n_experts, active, mask)[0]
    counts = counts.to(probs.dtype)
    total = counts.sum()
    # No row counting: every fraction 0, hence the loss 0 (the clamp only avoids 0 / 0).
    fraction_routed = counts / (total if active is None and mask is None else total.clamp_min(1))
    if mask is None:
        mean_prob = probs.mean(dim=0)
    else:
        mean_prob = _masked_sum(probs, mask) / mask.sum().clamp_min(1)
    return n_experts * torch.dot(fraction_routed, mean_prob)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean(logsumexp(logits)^2)``: keeps router logits small.

    Parameters
    ----------
    logits : Tensor of shape (n, n_experts)
        The router's logits (before the softmax).
    mask : Tensor of shape (n,), bool, optional
        Rows that count, e.g. those with a non-zero sample weight; all when None.

    Returns
    -------
    Tensor
        The scalar loss (non-negative); 0 when no row counts.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    if mask is None:
        return torch.logsumexp(logits, dim=-1).square().mean()
    squares = torch.logsumexp(torch.where(mask.unsqueeze(1), logits, 0), dim=-1).square()
    return _masked_sum(squares, mask) / mask.sum().clamp_min(1)


def squared_cv(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``var / mean^2`` (population variance).

    Computed from the variance, never from a standard deviation: the gradient of ``std``
    at perfect balance (std = 0) is NaN, that of the variance is 0.

    Parameters
    ----------
    values : Tensor
        The values (e.g. per-expert loads), all elements taken together.
    eps : float, default=1e-10
        Added to ``mean^2`` so that all-zero values give 0, not NaN.

    Returns
    -------
    Tensor
        The scalar squared coefficient of variation; 0 for fewer than 2 values.
    """
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean().square() + eps)


def cv2_balance_loss(
    gates: torch.Tensor, load: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Shazeer et al. (2017) importance + load loss: ``CV^2(importance) + CV^2(load)``.

    0 at perfect balance, with finite (zero) gradients there.

    Parameters
    ----------
    gates : Tensor of shape (n, n_experts)
        Gate weights (zero for experts not chosen); importance is their column sum.
    load : Tensor of shape (n, n_experts)
        Per-row probability (or indicator) that each expert was chosen; the load is its
        column sum. The noisy top-k router's smooth estimate makes this term differentiable.
    mask : Tensor of shape (n,), bool, optional
        Rows that count, e.g. those with a non-zero sample weight; all when None.

    Returns
    -------
    Tensor
        The scalar loss: 0 at perfect balance, and when no row counts.
    """
    if gates.shape[0] == 0:
        return gates.new_zeros(())
    if mask is None:
        return squared_cv(gates.sum(dim=0)) + squared_cv(load.sum(dim=0))
    # No row counting: all-zero sums, whose squared CV is 0.
    return squared_cv(_masked_sum(gates, mask)) + squared_cv(_masked_sum(load, mask))


def routing_switch_loss(routing, gates: torch.Tensor, mask: torch.Tensor | None, active,
                        counts: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`switch_balance_loss` of a router's output (``Routing``): its full softmax and
    chosen experts (``counts``: the assignments per expert that count, if known)."""
    return switch_balance_loss(routing.probs, routing.indices, mask, active, counts)


def routing_cv2_loss(routing, gates: torch.Tensor, mask: torch.Tensor | None, active,
                     counts: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`cv2_balance_loss` of a router's output: its gate weights ``gates`` (n,
    n_experts), and as the load the noisy router's smooth selection probabilities, or
    whether each expert was chosen."""
    load = routing.selection_probs if routing.selection_probs is not None else (gates > 0).to(gates.dtype)
    return cv2_balance_loss(gates, load, mask)


BALANCE_LOSSES = {"switch": routing_switch_loss, "cv2": routing_cv2_loss, "aux_free": None}
"""The ``balance_loss`` names and the loss each computes from ``(routing, gates, mask,
active, counts)`` (``counts``, optional: the assignments per expert that count);
``"aux_free"`` is a selection-bias update, not a loss."""


def expert_diversity_loss(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between the experts' centred outputs on shared rows.

    ``expert_outputs[e]`` is expert ``e``'s output on the same ``m`` rows. Each expert's
    outputs are centred over the rows (a constant offset is not a behaviour) and flattened
    to a vector ``v_e`` of length ``m * n_outputs``; the loss is the mean of
    ``cos(v_i, v_j)^2`` over pairs ``i != j``. It is 0 when every pair of experts varies
    across the rows in uncorrelated ways, and 1 when all experts are scaled copies of one
    another, so it pushes experts to respond differently to the same inputs.

    Parameters
    ----------
    expert_outputs : Tensor of shape (n_experts, m, n_outputs)
        Every expert's output on the same ``m`` rows.

    Returns
    -------
    Tensor
        The scalar loss, in [0, 1] (computed in float32); 0 with fewer than 2 experts or
        2 rows.
    """
    n_experts, m = expert_outputs.shape[:2]
    if n_experts < 2 or m < 2:
        return expert_outputs.new_zeros(())
    centred = (expert_outputs - expert_outputs.mean(dim=1, keepdim=True)).reshape(n_experts, -1).float()
    unit = centred / centred.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.t()
    off_diagonal = cosine.square().sum() - cosine.diagonal().square().sum()
    return off_diagonal / (n_experts * (n_experts - 1))


EXPERT_LOSSES = ("mixture", "per_expert")


def per_expert_loss(
    criterion, outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
    sample_weight: torch.Tensor | None = None, expert_mask: torch.Tensor | None = None, mixture=None,
    grid: str | None = None,
) -> torch.Tensor:
    """Each chosen expert trained on its own loss; the gate on the mixture's.

    ``loss = sum_a g_a * L(o_a, y_(r_a)) / n + mean_i L(m_i, y_i)``, where the sum runs over
    the ``(row r_a, expert)`` assignments with gate weight ``g_a`` and output ``o_a``, and
    ``m_i = sum_(a: r_a = i) g_a * o_a`` is row ``i``'s mixture. In the first term the gate
    weights carry no gradient: the experts learn, each on the rows it serves, as much as
    it serves them. In the second the outputs carry none: the gate learns how to mix the
    experts as they are. Trained on the loss of their mixture alone, experts that share
    rows can learn to cancel one another's errors, one ensemble member rather than several
    (TabM's finding for uniformly mixed members).

    Parameters
    ----------
    criterion : callable
        ``criterion(prediction, target)`` -> per-row loss of shape (m,) or (m, ...)
        (``reduction="none"``).
    outputs : Tensor of shape (m, n_outputs)
        The experts' outputs for their assignments.
    rows : Tensor of shape (m,), int64
        Row of each assignment.
    weights : Tensor of shape (m,)
        Gate weight of each assignment.
    target : Tensor of shape (n, ...)
        The rows' targets, as ``criterion`` takes them.
    sample_weight : Tensor of shape (n,), optional
        Row weights (mean 1 over the training set).
    expert_mask : Tensor of shape (m,), bool, optional
        Which assignments the experts train on; a row's gate weights in the first term are
        renormalised over its kept assignments (a row with none teaches the experts
        nothing). The gate's term keeps every assignment.
    mixture : callable, optional
        ``mixture(outputs, rows, weights, n)`` -> the rows' mixtures (n, n_outputs), e.g.
        :func:`~sklearn_moe.nn.density.mixture_log_probabilities`; by default the
        gate-weighted sum of the outputs.
    grid : {None, "row_major", "choice_major"}, default=None
        How the assignments tile a grid of the rows
        (:class:`~sklearn_moe.nn.dispatch.ExpertAssignments`): the per-row sums are then
        reductions of a view.

    Returns
    -------
    Tensor, scalar
        The objective to minimise (add the auxiliary losses to it).
    """
    n = target.shape[0]
    weights = weights.float()
    if mixture is None:
        mixture_for_gate = sum_per_row(outputs.detach().float() * weights.unsqueeze(1), rows, n, grid)
    else:
        mixture_for_gate = mixture(outputs.detach(), rows, weights, n)
    expert_weights = weights.detach()
    if expert_mask is not None:
        expert_weights = normalize_per_row(expert_weights * expert_mask, rows, n, grid)
    expert_terms = mean_per_row(criterion(outputs.float(), target.index_select(0, rows))) * expert_weights
    gate_terms = mean_per_row(criterion(mixture_for_gate, target))
    if sample_weight is not None:
        expert_terms = expert_terms * sample_weight.index_select(0, rows)
        gate_terms = gate_terms * sample_weight
    return expert_terms.sum() / n + gate_terms.mean()


def mean_per_row(loss: torch.Tensor) -> torch.Tensor:
    """An unreduced loss (``reduction="none"``: per row, or per row and output) as one value
    per row, the mean over its outputs."""
    return loss.mean(dim=tuple(range(1, loss.ndim))) if loss.ndim > 1 else loss


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of ``values`` over its rows (dim 0), weighted by ``weights`` (one per row)
    where given."""
    if weights is None:
        return values.mean(dim=0)
    return (values * weights[:, None]).sum(dim=0) / weights.sum()


class MultilabelLoss(torch.nn.Module):
    """Binary cross-entropy of label logits against 0/1 labels, per row and label
    (``reduction="none"``): the task loss of multilabel classification.

    Parameters
    ----------
    label_smoothing : float, default=0.0
        Each label's target is smoothed towards 1/2, as a two-class cross-entropy's is
        towards the uniform distribution: ``y * (1 - label_smoothing) + label_smoothing / 2``.

    Notes
    -----
    ``forward(logits, labels)`` takes logits of shape (n, n_labels) and labels of the same
    shape in any dtype (0 or 1), and returns the loss of shape (n, n_labels), float.
    """

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = labels.to(logits.dtype)
        if self.label_smoothing:
            target = target * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none")
