"""Expert MLPs stored as stacked weights, so that every expert runs in one batched matmul.

All ``n_experts`` experts share one architecture. Their parameters are stacked along a
leading expert axis: a linear layer holds ``weight`` of shape ``(n_experts, in, out)`` and
``bias`` of shape ``(n_experts, out)``. :meth:`StackedExperts.forward` takes a padded
input of shape ``(n_experts, rows, in)`` (row ``r`` of slice ``e`` goes through expert
``e``) and runs each layer as a single :func:`torch.baddbmm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
}


class StackedLinear(nn.Module):
    """``n_experts`` independent linear layers applied as one batched matmul.

    Parameters
    ----------
    n_experts : int
        Number of stacked layers.
    in_features, out_features : int
        Sizes of each layer.
    init_scale : float, default=1.0
        Multiplier on the default (PyTorch ``nn.Linear``) uniform initialisation.
    """

    def __init__(self, n_experts: int, in_features: int, out_features: int, init_scale: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(n_experts, out_features))
        bound = init_scale / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``(n_experts, rows, in)`` to ``(n_experts, rows, out)``."""
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


class StackedLayerNorm(nn.Module):
    """Layer normalisation over the last axis with a separate affine map per expert."""

    def __init__(self, n_experts: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_experts, 1, width))
        self.bias = nn.Parameter(torch.zeros(n_experts, 1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, F.layer_norm(x, x.shape[-1:]), self.weight)


class StackedExperts(nn.Module):
    """The experts of a mixture: ``n_experts`` MLPs with identical architecture.

    Each expert maps ``in_features -> expert_hidden[0] -> ... -> out_features``. A hidden
    layer after the first is ``h = act(linear(norm(h)))``; with ``skip_connections`` and
    equal widths it is residual: ``h = h + act(linear(norm(h)))``. Dropout follows every
    activation. The output layer starts scaled down (``output_init_scale``), which keeps the
    initial predictions near the (standardised) target mean.

    Parameters
    ----------
    n_experts : int
    in_features, out_features : int
    expert_hidden : tuple of int
        Hidden layer sizes; ``()`` makes each expert a linear model.
    activation : str, default="relu"
        One of :data:`ACTIVATIONS`.
    dropout : float, default=0.0
    layer_norm : bool, default=False
        Normalise the input of every hidden layer after the first and of the output layer.
    skip_connections : bool, default=True
        Residual connections between hidden layers of equal width.
    output_init_scale : float, default=0.1
    """

    def __init__(
        self,
        n_experts: int,
        in_features: int,
        out_features: int,
        expert_hidden: tuple[int, ...] = (128,),
        activation: str = "relu",
        dropout: float = 0.0,
        layer_norm: bool = False,
        skip_connections: bool = True,
        output_init_scale: float = 0.1,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.n_experts = n_experts
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self.dropout = dropout
        widths = (in_features, *expert_hidden)
        self.hidden = nn.ModuleList(
            StackedLinear(n_experts, w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        self.residual = [skip_connections and i > 0 and w_in == w_out
                         for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:]))]
        # No norm before the first layer: the estimators standardise the inputs already.
        self.norms = nn.ModuleList(
            StackedLayerNorm(n_experts, w) if layer_norm else nn.Identity() for w in widths[1:]
        )
        self.output = StackedLinear(n_experts, widths[-1], out_features, init_scale=output_init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on ``x[e]``.

        Parameters
        ----------
        x : Tensor of shape (n_experts, rows, in_features)

        Returns
        -------
        Tensor of shape (n_experts, rows, out_features)
        """
        h = x
        for i, layer in enumerate(self.hidden):
            z = self._act(layer(self.norms[i - 1](h) if i > 0 else h))
            z = F.dropout(z, self.dropout, self.training)
            h = h + z if self.residual[i] else z
        if self.hidden:
            h = self.norms[-1](h)
        return self.output(h)
