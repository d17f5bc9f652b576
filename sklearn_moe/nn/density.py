"""Mixture density outputs: each expert predicts a Gaussian per target, the gate mixes them.

With ``output="mixture_density"`` an expert's output row holds ``n_targets`` means followed
by ``n_targets`` raw scales; its standard deviations are ``softplus(raw) + SCALE_FLOOR``
(:func:`expert_scales`), the targets independent given the expert. A row's predictive
density is the gate-weighted mixture ``p(y) = sum_e g_e prod_j N(y_j | mu_ej, sigma_ej)``.
Its negative log-likelihood is computed in log space with a log-sum-exp over the row's
experts (:func:`mixture_nll`), so that tiny scales and far targets stay finite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import normalize_per_row

OUTPUTS = ("point", "mixture_density")
#: Smallest standard deviation an expert can predict (in the standardised target's units).
SCALE_FLOOR = 1e-3
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def split_outputs(outputs: torch.Tensor, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert output's means and standard deviations: each of shape (..., n_targets)."""
    return outputs[..., :n_targets], expert_scales(outputs[..., n_targets:])


def expert_scales(raw: torch.Tensor) -> torch.Tensor:
    """``softplus(raw) + SCALE_FLOOR``: a positive standard deviation, floored."""
    return F.softplus(raw.float()) + SCALE_FLOOR


def gaussian_log_likelihood(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_j log N(y_j | mu_j, sigma_j)`` per row of raw expert ``outputs`` (m, 2 k) and
    ``target`` (m, k): Tensor of shape (m,), float32."""
    mean, scale = split_outputs(outputs.float(), target.shape[1])
    z = (target.float() - mean) / scale
    return (-0.5 * z.square() - scale.log() - _HALF_LOG_2PI).sum(dim=1)


def mixture_nll(outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, target: torch.Tensor
                ) -> torch.Tensor:
    """Negative log-likelihood of each row's target under its mixture of experts.

    ``nll_i = -log sum_(a: r_a = i) g_a N(y_i | mu_a, sigma_a)`` over the row's
    ``(row r_a, expert)`` assignments with gate weight ``g_a``, computed as a log-sum-exp
    (each row's largest term factored out). An assignment of weight 0 contributes nothing.

    Parameters
    ----------
    outputs : Tensor of shape (m, 2 * n_targets)
        Raw expert outputs (means, then raw scales) of the assignments.
    rows : Tensor of shape (m,), int64
    weights : Tensor of shape (m,)
    target : Tensor of shape (n, n_targets)

    Returns
    -------
    Tensor of shape (n,), float32
    """
    n = target.shape[0]
    log_terms = (weights.float().clamp_min(torch.finfo(torch.float32).tiny).log()
                 + gaussian_log_likelihood(outputs, target.index_select(0, rows)))
    peak = torch.full((n,), -torch.inf, device=target.device).scatter_reduce(0, rows, log_terms.detach(), "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    total = torch.zeros(n, device=target.device).index_add(0, rows, (log_terms - peak.index_select(0, rows)).exp())
    return -(peak + total.clamp_min(torch.finfo(torch.float32).tiny).log())


def per_expert_mixture_nll(outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
                           sample_weight: torch.Tensor | None = None, expert_mask: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """``expert_loss="per_expert"`` for mixture densities: each chosen expert trained on
    its own negative log-likelihood, weighted by its (constant) gate weight, and the gate
    on the mixture's with the experts' outputs held fixed; the density counterpart of
    :func:`~sklearn_moe.nn.losses.per_expert_loss`, with the same parameters.

    Returns
    -------
    Tensor, scalar
    """
    n = target.shape[0]
    expert_weights = weights.detach().float()
    if expert_mask is not None:
        expert_weights = normalize_per_row(expert_weights * expert_mask, rows, n)
    expert_terms = -gaussian_log_likelihood(outputs, target.index_select(0, rows)) * expert_weights
    gate_terms = mixture_nll(outputs.detach(), rows, weights, target)
    if sample_weight is not None:
        expert_terms = expert_terms * sample_weight.index_select(0, rows)
        gate_terms = gate_terms * sample_weight
    return expert_terms.sum() / n + gate_terms.mean()


def mixture_moments(weights: torch.Tensor, means: torch.Tensor, scales: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each row's mixture: ``m = sum_e g_e mu_e`` and
    ``sd = sqrt(sum_e g_e (sigma_e^2 + mu_e^2) - m^2)``.

    Parameters
    ----------
    weights : Tensor of shape (n, n_experts)
    means, scales : Tensor of shape (n, n_experts, n_targets)

    Returns
    -------
    mean, std : Tensors of shape (n, n_targets)
    """
    weights = weights.unsqueeze(2)
    mean = (weights * means).sum(dim=1)
    second = (weights * (scales.square() + means.square())).sum(dim=1)
    return mean, (second - mean.square()).clamp_min(0).sqrt()
