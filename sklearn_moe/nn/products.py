"""The experts' matrix products, and how evaluation keeps each row's result independent
of the batch that holds it.

Training runs the products as PyTorch gives them, except :func:`batched_linear`'s narrow
layers (see there). Evaluation pads them instead, because on the CPU a float32 product
picks its kernel by shape, and kernels round differently:

- a product of one row takes a matrix-vector path;
- a product with one output column takes another;
- PyTorch's batched product loops naively (no blocked kernel) over a matrix with fewer
  than :data:`NAIVE_BMM_MAX_TERMS` terms, rows x inputs x outputs (``bmm_out_or_baddbmm_``
  in ``aten/src/ATen/native/LinearAlgebra.cpp``);
- with a single input, the bias is added to the product in one rounding (a fused
  multiply-add) or two, depending on how many matrices a batched product holds.

Outside these cases the blocked GEMM (MKL on x86) sums each output row over its inputs in
one order, whatever the row count, so a row's result is the same bit for bit in a batch of
any size. The forward-only paths here compute a single input's product elementwise
(``x * w + b``, two roundings), and pad every other product into that regime: at least
:data:`MIN_ROWS` rows (duplicates of the first), at least :data:`MIN_OUTPUTS` output columns
(zero weights) and enough rows to reach :data:`NAIVE_BMM_MAX_TERMS` terms per matrix; the
padding is sliced off. The extra arithmetic is a few rows or a few columns, and only small
or narrow products have any.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MIN_ROWS = 2
MIN_OUTPUTS = 16
NAIVE_BMM_MAX_TERMS = 400
NARROW_MAX_OUTPUTS = 16
NARROW_MIN_ROWS = 256


# A CPU kernel rounds gelu, silu, elu and softplus one way in its vector loop and another in its
# scalar loop, which PyTorch runs on runs of contiguous values too short for a vector: the
# few values of a small batch, the tail of a run, the narrow rows of a strided view. In
# evaluation (without autograd) they are computed on a contiguous copy padded to a multiple
# of this many values, so that every value takes the vector loop, whatever the batch (relu,
# leaky_relu and tanh round alike in both loops).
VECTOR_RUN = 64


def vector_loop_only(function, z: torch.Tensor) -> torch.Tensor:
    """``function(z)``, elementwise, without autograd (evaluation) on the CPU with every
    value in the vector loop (see :data:`VECTOR_RUN`); with autograd, training's plain call,
    on detached values too."""
    if torch.is_grad_enabled() or z.device.type != "cpu":
        return function(z)
    flat, n = z.reshape(-1), z.numel()
    if n % VECTOR_RUN:
        flat = torch.cat((flat, flat.new_zeros(VECTOR_RUN - n % VECTOR_RUN)))
    return function(flat)[:n].view(z.shape)


def needs_autograd(*tensors: torch.Tensor) -> bool:
    """Whether a product of ``tensors`` records a graph (else it may take a forward-only path)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``baddbmm(bias.unsqueeze(1), x, weight)``: ``(n, rows, in) -> (n, rows, out)``.

    With autograd and fewer than :data:`NARROW_MAX_OUTPUTS` outputs, a batched matmul whose
    result is a thin column block runs several times slower than its arithmetic on CPU
    (at one output and 128 inputs, a forward and backward cost as much as a 32x128
    layer's). Such layers compute the same products transposed instead, with the rows as
    the long side: ``weight^T x^T`` forward, ``grad^T x`` for the weight gradient, and for
    one output the input gradient as an outer product. Below :data:`NARROW_MIN_ROWS` rows
    in all the plain call is cheaper than the rearrangement; on other devices the plain
    call is kept (the rearrangement is a Python autograd node, whose host time a GPU step
    would wait for). Without autograd the product is :func:`row_invariant_baddbmm`.
    """
    if not needs_autograd(x, weight, bias):
        return row_invariant_baddbmm(bias.unsqueeze(1), x, weight)
    if (weight.shape[-1] >= NARROW_MAX_OUTPUTS or x.shape[0] * x.shape[1] < NARROW_MIN_ROWS
            or x.device.type != "cpu"):
        return torch.baddbmm(bias.unsqueeze(1), x, weight)
    return _NarrowBatchedLinear.apply(x, weight, bias)


def row_invariant_baddbmm(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``torch.baddbmm(bias, x, weight)`` for ``x`` of shape (n, rows, in) and ``weight``
    (n, in, out), each output row computed the same way whatever ``rows`` is (see the
    module docstring). Forward only."""
    n, rows, n_in = x.shape
    n_out = weight.shape[-1]
    if rows == 0:  # nothing to pad from (an expert-parallel rank that received no row)
        return torch.baddbmm(bias, x, weight)
    if n_in == 1:
        return x * weight + bias
    padded_rows = max(rows, MIN_ROWS, math.ceil(NAIVE_BMM_MAX_TERMS / max(1, n_in * max(n_out, MIN_OUTPUTS))))
    if padded_rows > rows:
        x = torch.cat((x, x[:, :1].expand(n, padded_rows - rows, n_in)), dim=1)
    if n_out < MIN_OUTPUTS:
        weight = F.pad(weight, (0, MIN_OUTPUTS - n_out))
        bias = F.pad(bias, (0, MIN_OUTPUTS - n_out))
    out = torch.baddbmm(bias, x, weight)
    if padded_rows > rows or n_out < MIN_OUTPUTS:
        out = out[:, :rows, :n_out]
    return out


def row_invariant_addmm(bias: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias`` for ``x`` of shape (..., rows, in) and ``weight`` (in, out), as
    one 2-d product over the flattened rows, each computed the same way whatever the row
    count (see the module docstring). Forward only."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, n_in)
    rows, n_out = flat.shape[0], weight.shape[-1]
    if n_in == 1 or rows == 0:  # rows == 0: nothing to pad from
        out = flat * weight if n_in == 1 else flat @ weight
        return (out if bias is None else out + bias).reshape(*lead, n_out)
    if rows < MIN_ROWS:
        flat = torch.cat((flat, flat[:1].expand(MIN_ROWS - rows, n_in)))
    weight = weight.contiguous()
    if bias is None:
        bias = weight.new_zeros(n_out)
    if n_out < MIN_OUTPUTS:
        weight = F.pad(weight, (0, MIN_OUTPUTS - n_out))
        bias = F.pad(bias, (0, MIN_OUTPUTS - n_out))
    out = torch.addmm(bias, flat, weight)
    if rows < MIN_ROWS or n_out < MIN_OUTPUTS:
        out = out[:rows, :n_out]
    return out.reshape(*lead, n_out)


class RowInvariantLinear(nn.Linear):
    """:class:`torch.nn.Linear` (same parameters and state dict) whose forward-only product
    is :func:`row_invariant_addmm`: ``F.linear`` multiplies by the transposed weight, which
    takes another kernel for batches of up to about ten rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if needs_autograd(x, self.weight, self.bias):
            return super().forward(x)
        return row_invariant_addmm(self.bias, x, self.weight.t())


def _narrow_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    out = torch.baddbmm(bias.unsqueeze(2), weight.transpose(1, 2), x.transpose(1, 2))
    return out.transpose(1, 2).contiguous()  # a no-op copy at one output


class _NarrowBatchedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype
        return _narrow_forward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        # Under autocast the products ran in grad's (lower) precision; each gradient goes
        # back in its input's own dtype, as autocast's casts would return it.
        x_low, weight_low = x.to(grad.dtype), weight.to(grad.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight_t = weight_low.transpose(1, 2)
            grad_x = (grad * weight_t if weight.shape[2] == 1 else torch.bmm(grad, weight_t)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.bmm(grad.transpose(1, 2), x_low).transpose(1, 2).to(weight.dtype).contiguous()
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum(dim=1, dtype=ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias
