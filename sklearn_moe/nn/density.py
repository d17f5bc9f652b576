"""Mixture density outputs: each expert predicts a Gaussian per target, the gate mixes them.

With ``output="mixture_density"`` an expert's output row holds ``n_targets`` means followed
by ``n_targets`` raw scales; its standard deviations are ``softplus(raw) + SCALE_FLOOR``
(:func:`expert_scales`), the targets independent given the expert. A row's predictive
density is the gate-weighted mixture ``p(y) = sum_e g_e prod_j N(y_j | mu_ej, sigma_ej)``.
Its negative log-likelihood is computed in log space with a log-sum-exp over the row's
experts (:func:`mixture_nll`), so that tiny scales and far targets stay finite.

With ``output="categorical_mixture"`` (classification) an expert's output row holds class
logits and the gate mixes the experts' class probabilities,
``p(c) = sum_e g_e softmax(o_e)_c``, kept in log space
(:func:`mixture_log_probabilities`). With ``output="bernoulli_mixture"`` (multilabel
classification) an expert's output row holds one logit per label and the gate mixes each
label's probability, ``p_j = sum_e g_e sigmoid(o_ej)``; the mixture is kept as that
probability's logit, ``log p_j - log(1 - p_j)`` (:func:`mixture_label_logits`), so that a
sigmoid and a binary cross-entropy read it as they read a point output's logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .dispatch import normalize_per_row
from .products import vector_loop_only

OUTPUTS = ("point", "mixture_density", "categorical_mixture", "bernoulli_mixture")
#: The outputs of a regressor (``MoERegressor(output=...)``).
REGRESSOR_OUTPUTS = OUTPUTS[:2]
#: Smallest standard deviation an expert can predict (in the standardised target's units).
SCALE_FLOOR = 1e-3
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def split_outputs(outputs: torch.Tensor, n_targets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An expert output's means and standard deviations: each of shape (..., n_targets)."""
    return outputs[..., :n_targets], expert_scales(outputs[..., n_targets:])


def expert_scales(raw: torch.Tensor) -> torch.Tensor:
    """``softplus(raw) + SCALE_FLOOR``: a positive standard deviation, floored."""
    return vector_loop_only(F.softplus, raw.float()) + SCALE_FLOOR


def gaussian_log_likelihood(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_j log N(y_j | mu_j, sigma_j)`` per row of raw expert ``outputs`` (m, 2 k) and
    ``target`` (m, k): Tensor of shape (m,), float32."""
    mean, scale = split_outputs(outputs.float(), target.shape[1])
    return _gaussian_log_density(mean, scale, target.float()).sum(dim=1)


def _gaussian_log_density(mean: torch.Tensor, scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``log N(target | mean, scale)``, elementwise."""
    z = (target - mean) / scale
    return -0.5 * z.square() - scale.log() - _HALF_LOG_2PI


def _row_logsumexp(log_terms: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """``log sum_(a: r_a = i) exp(t_a)`` per row ``i`` of the terms ``log_terms`` (m, ...),
    each row's largest term factored out; a row without terms gets ``log(tiny)``."""
    shape = (n_rows, *log_terms.shape[1:])
    index = rows.view(-1, *([1] * (log_terms.ndim - 1))).expand_as(log_terms)
    peak = torch.full(shape, -torch.inf, dtype=log_terms.dtype, device=log_terms.device).scatter_reduce(
        0, index, log_terms.detach(), "amax")
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    shifted = (log_terms - peak.index_select(0, rows)).exp()
    total = torch.zeros(shape, dtype=log_terms.dtype, device=log_terms.device).index_add(0, rows, shifted)
    return peak + total.clamp_min(torch.finfo(torch.float32).tiny).log()


def _log_weights(weights: torch.Tensor) -> torch.Tensor:
    """``log(weights)``, ``-inf`` for a weight of 0 (an unchosen expert adds nothing) with a
    zero gradient there, not NaN."""
    weights = weights.float()
    return torch.where(weights > 0, weights.clamp_min(torch.finfo(torch.float32).tiny).log(), -torch.inf)


def mixture_log_probabilities(outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n_rows: int
                              ) -> torch.Tensor:
    """Log class probabilities of each row's mixture of the experts' categorical
    distributions: ``log sum_(a: r_a = i) g_a softmax(o_a)``, as a log-sum-exp.

    Parameters
    ----------
    outputs : Tensor of shape (m, n_classes)
        Class logits of the ``(row, expert)`` assignments.
    rows : Tensor of shape (m,), int64
    weights : Tensor of shape (m,)
        Gate weights (each row's sum to 1).
    n_rows : int

    Returns
    -------
    Tensor of shape (n_rows, n_classes), float32
        Normalised log-probabilities: a valid input to a softmax or a cross-entropy.
    """
    log_terms = _log_weights(weights).unsqueeze(1) + torch.log_softmax(outputs.float(), dim=1)
    return _row_logsumexp(log_terms, rows, n_rows)


def mixture_label_logits(outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, n_rows: int
                         ) -> torch.Tensor:
    """Logit of each row's mixture of the experts' label probabilities: with
    ``p = sum_(a: r_a = i) g_a sigmoid(o_a)``, ``log p - log(1 - p)``, both terms as
    log-sum-exps (``1 - sigmoid(o) = sigmoid(-o)``), so that confident experts stay finite.

    Parameters
    ----------
    outputs : Tensor of shape (m, n_labels)
        Label logits of the ``(row, expert)`` assignments.
    rows : Tensor of shape (m,), int64
    weights : Tensor of shape (m,)
        Gate weights (each row's sum to 1).
    n_rows : int

    Returns
    -------
    Tensor of shape (n_rows, n_labels), float32
        The logits of the mixed probabilities: their sigmoid is the mixture's probability of
        each label, and a binary cross-entropy on them is the mixture's negative
        log-likelihood of the labels.
    """
    outputs = outputs.float()
    log_terms = _log_weights(weights).view(-1, 1, 1) + F.logsigmoid(torch.stack((outputs, -outputs), dim=1))
    both = _row_logsumexp(log_terms, rows, n_rows)  # (n_rows, 2, n_labels): log p, log(1 - p)
    return both[:, 0] - both[:, 1]


def mixture_nll(outputs: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, target: torch.Tensor
                ) -> torch.Tensor:
    """Negative log-likelihood of each row's target under its mixture of experts.

    ``nll_i = -log sum_(a: r_a = i) g_a N(y_i | mu_a, sigma_a)`` over the row's
    ``(row r_a, expert)`` assignments with gate weight ``g_a``, computed as a log-sum-exp
    (each row's largest term factored out). An assignment of weight 0 contributes nothing,
    and a row without assignments gets ``-log(tiny)`` (about 87; the module gives every row
    at least one).

    Parameters
    ----------
    outputs : Tensor of shape (m, 2 * n_targets)
        Raw expert outputs (means, then raw scales) of the assignments.
    rows : Tensor of shape (m,), int64
        Row of each assignment.
    weights : Tensor of shape (m,)
        Gate weight of each assignment (each row's sum to 1).
    target : Tensor of shape (n, n_targets)
        The rows' targets.

    Returns
    -------
    Tensor of shape (n,), float32
        Each row's negative log-likelihood (its mean is the density model's task loss).
    """
    log_terms = _log_weights(weights) + gaussian_log_likelihood(outputs, target.index_select(0, rows))
    return -_row_logsumexp(log_terms, rows, target.shape[0])


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


def mixture_nll_dense(weights: torch.Tensor, means: torch.Tensor, scales: torch.Tensor, target: torch.Tensor
                      ) -> torch.Tensor:
    """Negative log-likelihood of each row's target under its mixture, from every expert's
    Gaussian: :func:`mixture_nll` for the layout of :meth:`MixtureOfExperts.predict_distribution`.

    Parameters
    ----------
    weights : Tensor of shape (n, n_experts)
    means, scales : Tensors of shape (n, n_experts, n_targets)
    target : Tensor of shape (n, n_targets)

    Returns
    -------
    Tensor of shape (n,), in the dtype of ``means``
    """
    log_terms = (weights.clamp_min(torch.finfo(weights.dtype).tiny).log()
                 + _gaussian_log_density(means, scales, target.unsqueeze(1)).sum(dim=2))
    return -torch.logsumexp(log_terms, dim=1)


def calibrated_scale(weights: torch.Tensor, means: torch.Tensor, scales: torch.Tensor, target: torch.Tensor,
                     sample_weight: torch.Tensor | None = None, bounds: tuple[float, float] = (0.125, 8.0)
                     ) -> float:
    """The factor ``s`` by which every expert's standard deviation is multiplied to minimise
    the mean negative log-likelihood of ``target`` (held-out rows): a one-parameter
    recalibration of the predictive spread, as temperature scaling is for a classifier.

    A grid of ``log s`` over ``bounds`` finds the basin, a golden-section search refines it.

    Parameters
    ----------
    weights : Tensor of shape (n, n_experts)
    means, scales : Tensors of shape (n, n_experts, n_targets)
    target : Tensor of shape (n, n_targets)
    sample_weight : Tensor of shape (n,), optional
    bounds : (float, float), default=(0.125, 8.0)
        Smallest and largest factor.

    Returns
    -------
    float
    """
    weights, means, scales, target = (t.double() for t in (weights, means, scales, target))
    row_weight = torch.ones_like(target[:, 0]) if sample_weight is None else sample_weight.double()
    if not row_weight.sum() > 0:
        return 1.0

    def loss(log_factor: float) -> float:
        nll = mixture_nll_dense(weights, means, scales * math.exp(log_factor), target)
        return float((nll * row_weight).sum() / row_weight.sum())

    grid = torch.linspace(math.log(bounds[0]), math.log(bounds[1]), 49).tolist()
    best = min(range(len(grid)), key=lambda i: loss(grid[i]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    for _ in range(40):
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    best = (low + high) / 2
    if loss(grid[0]) <= loss(best):  # the optimum lies at (or beyond) the lower bound
        return bounds[0]
    return min(math.exp(best), bounds[1])


def mixture_moments(weights: torch.Tensor, means: torch.Tensor, scales: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of each row's mixture: ``m = sum_e g_e mu_e`` and
    ``sd = sqrt(sum_e g_e (sigma_e^2 + (mu_e - m)^2))``, the centred form of
    ``sum_e g_e (sigma_e^2 + mu_e^2) - m^2``, which cancels every digit of a small spread
    around a large mean.

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
    variance = (weights * (scales.square() + (means - mean.unsqueeze(1)).square())).sum(dim=1)
    return mean, variance.sqrt()


#: The mixtures of the experts' class outputs, per ``output``: each maps the assignments'
#: ``(outputs, rows, weights, n_rows)`` to the mixture's (log-probabilities or label logits).
CLASS_MIXTURES = {"categorical_mixture": mixture_log_probabilities, "bernoulli_mixture": mixture_label_logits}
