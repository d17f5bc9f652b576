"""Expert MLPs stored as stacked weights, so that every expert runs in one batched matmul.

All ``n_experts`` experts share one architecture. Their parameters are stacked along a
leading expert axis: a linear layer holds ``weight`` of shape ``(n_experts, in, out)`` and
``bias`` of shape ``(n_experts, out)``. :meth:`StackedExperts.forward` takes a padded
input of shape ``(n_experts, rows, in)`` (row ``r`` of slice ``e`` goes through expert
``e``) and runs each layer as a single batched product (:func:`~.products.batched_linear`,
which in evaluation computes each row the same way in a batch of any size).

Dispatch can also pass a list of blocks, each with the experts it holds (``None``: all of
them, weights used in place; else an index tensor, weights gathered): each block runs as
its own batched matmul. Topping up the busiest experts in extra blocks needs less padding
than one block padded to the busiest expert.

:meth:`StackedExperts.forward_grouped` runs expert-sorted rows instead, each expert's
group of rows at its offset, as one ``torch._grouped_mm`` per layer: the layout of a GPU
that runs that product as one kernel (:mod:`.layouts`). Nothing in it reads a device value
on the host; neither does :meth:`StackedExperts.forward` (its block sizes are the
caller's).
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._random import draw_generator
from ._sync import avoid_host_reads, compute_dtype
from .dispatch import in_row_order, padded_layout, plan_dispatch, run_buffer
from .layouts import GROUP_ALIGN, blocked_layout
from .products import batched_linear, needs_autograd, row_invariant_addmm, vector_loop_only

ACTIVATIONS = {
    "relu": F.relu,
    "gelu": functools.partial(vector_loop_only, F.gelu),
    "silu": functools.partial(vector_loop_only, F.silu),
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "elu": functools.partial(vector_loop_only, F.elu),
}

IN_PLACE_ACTIVATIONS = {
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "leaky_relu": lambda z: F.leaky_relu(z, inplace=True),
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

    def extra_repr(self) -> str:
        """The shapes, as ``nn.Linear`` shows its own.

        Returns
        -------
        str
            ``n_experts=..., in_features=..., out_features=...``.
        """
        n_experts, in_features, out_features = self.weight.shape
        return f"n_experts={n_experts}, in_features={in_features}, out_features={out_features}"

    def forward(self, blocks: list[torch.Tensor], block_experts: list[torch.Tensor | None],
                selected: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        """Map each block ``(n_j, rows_j, in)`` to ``(n_j, rows_j, out)`` (see the module docstring).

        Parameters
        ----------
        blocks : list of Tensor
            Block ``j`` has shape ``(n_j, rows_j, in_features)``: its slice ``i`` goes through
            layer ``block_experts[j][i]``.
        block_experts : list of (Tensor of shape (n_j,), int64, or None)
            The layers of each block's slices; None stands for every layer in index order
            (``n_j = n_experts``, weights used in place).
        selected : (list of Tensor, list of Tensor), optional
            The weights and biases of each block, when the caller selected them already
            (:func:`select_experts`).

        Returns
        -------
        list of Tensor
            Block ``j``'s outputs, of shape ``(n_j, rows_j, out_features)``.
        """
        weights, biases = selected or select_experts([self.weight, self.bias], block_experts)
        return [batched_linear(x, w, b) for x, w, b in zip(blocks, weights, biases)]

    def grouped(self, x: torch.Tensor, offsets: torch.Tensor, row_experts: torch.Tensor) -> torch.Tensor:
        """Map expert-sorted rows ``(m, in)`` to ``(m, out)`` with one grouped product.

        Rows ``offsets[e - 1] .. offsets[e] - 1`` go through layer ``e`` (``torch._grouped_mm``
        in the dtype products run in, autocast's where it is on, with its autocast
        disabled); ``row_experts`` gives each row's layer, for the biases. The widths are
        zero-padded to multiples of :data:`GROUP_ALIGN` for the product.

        Parameters
        ----------
        x : Tensor of shape (m, in_features)
            The rows, sorted by layer.
        offsets : Tensor of shape (n_experts,), int32
            End of each layer's group of rows; the last is ``m``.
        row_experts : Tensor of shape (m,), int64
            Every row's layer.

        Returns
        -------
        Tensor of shape (m, out_features)
            Each row's output from its layer.
        """
        dtype = compute_dtype(x)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        n_in, n_out = weight.shape[1:]
        pad_in, pad_out = -n_in % GROUP_ALIGN, -n_out % GROUP_ALIGN
        x = x.to(dtype)
        if pad_in:
            x, weight = F.pad(x, (0, pad_in)), F.pad(weight, (0, 0, 0, pad_in))
        if pad_out:
            weight = F.pad(weight, (0, pad_out))
        with torch.autocast(x.device.type, enabled=False):
            out = _contiguous_grad(torch._grouped_mm(x.contiguous(), weight.contiguous(), offs=offsets))
        if pad_out:
            out = out[:, :n_out]
        return out + bias.index_select(0, row_experts)


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the gradient contiguous (a grouped product's
    backward needs 16-byte aligned strides, which an expanded gradient lacks)."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(tensor: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(tensor) if tensor.requires_grad else tensor


class _SelectExperts(torch.autograd.Function):
    """For each of ``n_stacked`` stacked tensors, ``[stacked if ids is None else
    stacked[ids] for ids in block_experts]``, all in one autograd node (on a GPU each node
    costs host time in the forward and the backward alike), whose backward adds the
    blocks' gradients into one tensor per stacked tensor, where ``index_select``'s would
    scatter each into a zero tensor of the full size.

    Index tensors that are prefixes of an earlier one (views of its first entries, as the
    staircase's nested blocks are) share its gathered copy instead of copying again.
    """

    @staticmethod
    def forward(ctx, n_stacked, *args):
        stacked, block_experts = args[:n_stacked], args[n_stacked:]
        ctx.block_experts = block_experts
        ctx.n_experts = stacked[0].shape[0]
        ctx.prefix_of = _prefix_sources(block_experts)
        selected = []
        for tensor in stacked:
            own = []
            for ids, source in zip(block_experts, ctx.prefix_of):
                if ids is None:
                    own.append(tensor)
                elif source is None:
                    own.append(tensor.index_select(0, ids))
                else:
                    own.append(own[source].narrow(0, 0, ids.shape[0]))
            selected += own
        return tuple(selected)

    @staticmethod
    def backward(ctx, *grads):
        n_blocks = len(ctx.block_experts)
        totals = [_SelectExperts._total(ctx, list(grads[start:start + n_blocks]))
                  for start in range(0, len(grads), n_blocks)]
        return (None, *totals, *(None for _ in ctx.block_experts))

    @staticmethod
    def _total(ctx, grads: list[torch.Tensor]) -> torch.Tensor:
        """One stacked tensor's gradient from its blocks' ``grads``."""
        # Fold a prefix block's gradient into its source's (a fresh matmul gradient) first.
        for index in reversed(range(len(grads))):
            source = ctx.prefix_of[index]
            if source is not None:
                grads[source][:grads[index].shape[0]] += grads[index]
        # Block 0's gradient is a fresh tensor that nothing else holds (the matmul's weight
        # gradient): adding the other blocks into it in place saves a full-size copy, which
        # at 64 experts costs as much as the blocks' matmuls.
        total = None
        for ids, grad, source in zip(ctx.block_experts, grads, ctx.prefix_of):
            if source is not None:
                continue
            if total is None:
                total = grad if ids is None else grad.new_zeros(ctx.n_experts, *grad.shape[1:]).index_add_(0, ids, grad)
            elif ids is None:
                total = total + grad
            else:
                total.index_add_(0, ids, grad)
        return total


def _prefix_sources(block_experts) -> list[int | None]:
    """For each index tensor, the earlier block whose index tensor it is a leading view of."""
    sources: list[int | None] = []
    for i, ids in enumerate(block_experts):
        source = None
        if ids is not None:
            for j in range(i):
                earlier = block_experts[j]
                if (earlier is not None and sources[j] is None and ids.shape[0] <= earlier.shape[0]
                        and ids.data_ptr() == earlier.data_ptr() and ids.stride() == earlier.stride()):
                    source = j
                    break
        sources.append(source)
    return sources


def apply_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time dropout, ``F.dropout(x, p, training=True)``.

    On the CPU the mask is drawn as 16-bit random integers compared with a threshold, from
    numpy's SFC64 generator seeded by one draw of torch's (so ``torch.manual_seed`` still
    fixes it): PyTorch's CPU generator draws one value at a time, and its Bernoulli sampler
    and ``torch.rand`` took 4.9 and 2.8 ms for a (2048, 256) mask on 2 Xeon cores, against
    0.45 ms here. ``p`` is rounded to a multiple of 1/65536 (at least that, at most
    1 - 1/65536) and the kept values are scaled by the inverse of the rounded keep
    probability, so the expectation stays ``x``. Elsewhere
    ``F.dropout``, one fused kernel on a GPU (and on the CPU inside
    :func:`~._sync.sync_free_paths`, which takes the GPU's paths: the seed's draw reads a
    value on the host), or, inside :func:`~._random.drawing_from`, whose generator
    ``F.dropout`` cannot take, a Bernoulli mask drawn from it.

    Parameters
    ----------
    x : Tensor
    p : float
        Probability of zeroing each value.

    Returns
    -------
    Tensor of the shape of ``x``
    """
    generator, on_device = draw_generator(), avoid_host_reads(x.device, training=True)
    if not 0 < p < 1 or (on_device and generator is None):
        return F.dropout(x, p, training=True)
    if on_device:
        return x * torch.empty_like(x).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    kept = min(max(round((1.0 - p) * 65536), 1), 65535)  # of 65536 equally likely 16-bit values
    n = x.numel()
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    words = np.random.SFC64(seed).random_raw(-(-n // 4))  # 64 random bits: four 16-bit values
    # numpy compares the 16-bit values, and the bytes of its booleans become floats, where
    # torch's int16 comparison and bool-to-float conversion took 4 to 8 times as long.
    keep = np.less(words.view(np.int16)[:n], kept - 32768)
    mask = torch.from_numpy(keep.view(np.uint8)).view(x.shape).to(x.dtype).mul_(65536 / kept)
    return x * mask


class _SelectExpertsAtOnce(torch.autograd.Function):
    """``[stacked[ids] for stacked in ...]`` for one index tensor ``ids``, as one gather of
    the stacked tensors laid side by side; the backward adds each tensor's gradient rows
    into its view of one zero buffer of the tensors laid end to end, which autograd keeps
    as the parameters' gradients without copying them (contiguous, as the parameters).
    On a GPU, where a small step's time is its launches, that is two kernels forward and
    one plus one per tensor backward, instead of one and two per tensor. The selections
    are views of the gathered rows."""

    @staticmethod
    def forward(ctx, ids, *stacked):
        n_experts = stacked[0].shape[0]
        ctx.save_for_backward(ids)
        ctx.shapes = [tensor.shape for tensor in stacked]
        side_by_side = torch.cat([tensor.reshape(n_experts, -1) for tensor in stacked], dim=1)
        return tuple(_split_rows(side_by_side.index_select(0, ids), ctx.shapes))

    @staticmethod
    def backward(ctx, *grads):
        (ids,) = ctx.saved_tensors
        end_to_end = grads[0].new_zeros(sum(shape.numel() for shape in ctx.shapes))
        pieces = end_to_end.split([shape.numel() for shape in ctx.shapes])
        return (None, *(piece.view(shape).index_add_(0, ids, grad)
                        for piece, shape, grad in zip(pieces, ctx.shapes, grads)))


def _split_rows(side_by_side: torch.Tensor, shapes) -> list[torch.Tensor]:
    """Views of the row-aligned pieces of ``side_by_side`` (rows, sum of the pieces'
    sizes), each reshaped to its ``shapes`` entry, with as many rows."""
    pieces = side_by_side.split([shape[1:].numel() for shape in shapes], dim=1)
    return [piece.view(side_by_side.shape[0], *shape[1:]) for piece, shape in zip(pieces, shapes)]


def select_experts(stacked: list[torch.Tensor], block_experts: list[torch.Tensor | None]
                   ) -> list[list[torch.Tensor]]:
    """For each tensor of ``stacked`` (experts on axis 0), its slices that go with each block."""
    if all(ids is None for ids in block_experts):
        return [[tensor] * len(block_experts) for tensor in stacked]
    if len(block_experts) == 1 and len({tensor.dtype for tensor in stacked}) == 1:
        return [[tensor] for tensor in _SelectExpertsAtOnce.apply(block_experts[0], *stacked)]
    flat = _SelectExperts.apply(len(stacked), *stacked, *block_experts)
    n_blocks = len(block_experts)
    return [list(flat[start:start + n_blocks]) for start in range(0, len(flat), n_blocks)]


class StackedLayerNorm(nn.Module):
    """Layer normalisation over the last axis with a separate affine map per expert."""

    def __init__(self, n_experts: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_experts, 1, width))
        self.bias = nn.Parameter(torch.zeros(n_experts, 1, width))

    def forward(self, blocks: list[torch.Tensor], block_experts: list[torch.Tensor | None],
                selected: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None) -> list[torch.Tensor]:
        weights, biases = selected or select_experts([self.weight, self.bias], block_experts)
        return [torch.addcmul(b, F.layer_norm(x, x.shape[-1:]), w) for x, w, b in zip(blocks, weights, biases)]

    def grouped(self, x: torch.Tensor, row_experts: torch.Tensor) -> torch.Tensor:
        """Normalise rows ``(m, width)``, row ``i`` with expert ``row_experts[i]``'s affine map."""
        return torch.addcmul(self.bias[:, 0].index_select(0, row_experts), F.layer_norm(x, x.shape[-1:]),
                             self.weight[:, 0].index_select(0, row_experts))


class _ExpertMLP(nn.Module):
    """What every kind of expert shares: the MLP's shape and activation, its dropout and
    which hidden layers are residual (equal widths after the first, with skip connections)."""

    def __init__(self, n_experts: int, in_features: int, out_features: int, expert_hidden: tuple[int, ...],
                 activation: str, dropout: float, skip_connections: bool):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.n_experts = n_experts
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        self.dropout = dropout
        self.widths = (in_features, *expert_hidden)
        self.residual = [skip_connections and i > 0 and w_in == w_out
                         for i, (w_in, w_out) in enumerate(zip(self.widths[:-1], self.widths[1:]))]


class StackedExperts(_ExpertMLP):
    """The experts of a mixture: ``n_experts`` MLPs with identical architecture.

    Each expert maps ``in_features -> expert_hidden[0] -> ... -> out_features``. A hidden
    layer after the first is ``h = act(linear(norm(h)))``; with ``skip_connections`` and
    equal widths it is residual: ``h = h + act(linear(norm(h)))``. Dropout follows every
    activation. The output layer starts scaled down (``output_init_scale``), which keeps the
    initial predictions near the (standardised) target mean.

    Parameters
    ----------
    n_experts : int
        Number of experts.
    in_features : int
        Width of an expert's input.
    out_features : int
        Width of an expert's output.
    expert_hidden : tuple of int, default=(128,)
        Hidden layer sizes; ``()`` makes each expert a linear model.
    activation : str, default="relu"
        One of :data:`ACTIVATIONS`.
    dropout : float, default=0.0
        Dropout probability after every hidden activation, in training.
    layer_norm : bool, default=False
        Normalise the input of every hidden layer after the first and of the output layer.
    skip_connections : bool, default=True
        Residual connections between hidden layers of equal width.
    output_init_scale : float, default=0.1
        Multiplier on the output layer's default uniform initialisation.

    Raises
    ------
    ValueError
        If ``activation`` is not one of :data:`ACTIVATIONS`.
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
        super().__init__(n_experts, in_features, out_features, expert_hidden, activation, dropout, skip_connections)
        widths = self.widths
        self.hidden = nn.ModuleList(
            StackedLinear(n_experts, w_in, w_out) for w_in, w_out in zip(widths[:-1], widths[1:])
        )
        # No norm before the first layer: the estimators standardise the inputs already.
        self.norms = nn.ModuleList(StackedLayerNorm(n_experts, w) for w in widths[1:] if layer_norm)
        self.output = StackedLinear(n_experts, widths[-1], out_features, init_scale=output_init_scale)

    def forward(self, x: torch.Tensor | list[torch.Tensor],
                block_experts: list[torch.Tensor | None] | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Run expert ``e`` on ``x[e]``; or, for a list of blocks, the experts of each block.

        Parameters
        ----------
        x : Tensor of shape (n_experts, rows, in_features), or list of blocks
            Block ``j`` has shape ``(n_j, rows_j, in_features)``: its slice ``i`` goes through
            expert ``block_experts[j][i]``.
        block_experts : list of (Tensor of shape (n_j,), int64, or None)
            Required with a list of blocks; None stands for every expert in index order.

        Returns
        -------
        Tensor or list of Tensor
            For a tensor ``x``, a tensor of shape ``(n_experts, rows, out_features)``; for a
            list of blocks, block ``j``'s outputs of shape ``(n_j, rows_j, out_features)``.
        """
        if isinstance(x, torch.Tensor):
            h, block_experts = [x], [None]
        else:
            h = list(x)
        # Every layer's weights for every block, selected at once.
        layers = [*self.hidden, *self.norms, self.output]
        selected = select_experts([p for layer in layers for p in (layer.weight, layer.bias)], block_experts)
        chosen = {layer: (selected[2 * i], selected[2 * i + 1]) for i, layer in enumerate(layers)}
        out = self._network(h, lambda layer, blocks: layer(blocks, block_experts, chosen[layer]))
        return out[0] if isinstance(x, torch.Tensor) else out

    def _network(self, h: list[torch.Tensor], apply) -> list[torch.Tensor]:
        """The experts' network on blocks ``h``, each layer and norm run by ``apply(module,
        blocks)``: hidden layers (norm, product, activation, dropout, residual), the last
        norm and the output layer."""
        for i, layer in enumerate(self.hidden):
            z = apply(layer, apply(self.norms[i - 1], h) if i > 0 and len(self.norms) else h)
            z = [self._act(block) for block in z]
            if self.training and self.dropout > 0:
                z = [apply_dropout(block, self.dropout) for block in z]
            h = [a + b for a, b in zip(h, z)] if self.residual[i] else z
        if self.hidden and len(self.norms):
            h = apply(self.norms[-1], h)
        return apply(self.output, h)

    def forward_grouped(self, x: torch.Tensor, offsets: torch.Tensor, row_experts: torch.Tensor) -> torch.Tensor:
        """Run expert-sorted rows through their experts, one grouped product per layer.

        The same network as :meth:`forward` (norms, activations, dropout, residuals), on
        rows grouped by expert instead of a padded buffer (:func:`~.layouts.grouped_layout`).
        Nothing here reads a device value on the host; on a GPU it is meant for bfloat16
        under autocast on devices where ``torch._grouped_mm`` has its fused kernel
        (:func:`~._sync.grouped_mm_supported`), else PyTorch reads the offsets on the host.

        Parameters
        ----------
        x : Tensor of shape (m, in_features)
            The rows, expert ``e``'s in rows ``offsets[e - 1] .. offsets[e] - 1``; each group
            a multiple of :data:`~.layouts.GROUP_ALIGN` rows.
        offsets : Tensor of shape (n_experts,), int32
            End of each expert's group; the last is ``m``.
        row_experts : Tensor of shape (m,), int64
            Every row's expert.

        Returns
        -------
        Tensor of shape (m, out_features)
            Each row's output from its expert, in the order of ``x`` (padding rows included).
        """
        def apply(module, rows):
            if isinstance(module, StackedLayerNorm):
                return [module.grouped(rows[0], row_experts)]
            return [module.grouped(rows[0], offsets, row_experts)]

        return self._network([x], apply)[0]

    def all_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Run every expert on every row.

        Parameters
        ----------
        x : Tensor of shape (n, in_features)
            The rows.

        Returns
        -------
        Tensor of shape (n_experts, n, out_features)
            Slice ``e`` is expert ``e``'s output on every row.
        """
        return self(x.unsqueeze(0).expand(self.n_experts, -1, -1))

    def expert_parameters(self) -> list[nn.Parameter]:
        """List the parameters that belong to one expert each, expert on axis 0.

        Returns
        -------
        list of torch.nn.Parameter
            All the parameters: independent experts share none.
        """
        return list(self.parameters())

    def forward_sorted(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Run the experts on rows sorted by expert, without padding.

        Rows ``sum(counts[:e]) .. sum(counts[:e+1]) - 1`` of ``x`` go through expert ``e``,
        each expert as plain matrix products on its contiguous slice. This is the fastest
        layout when every expert has many rows (large prediction batches); with few rows
        per expert the per-expert calls cost more than :meth:`forward`'s batched padding.
        Dropout is not applied: meant for evaluation.

        Parameters
        ----------
        x : Tensor of shape (sum(counts), in_features)
            The rows, sorted by expert.
        counts : list of int, length n_experts
            Rows per expert, in expert order.

        Returns
        -------
        Tensor of shape (sum(counts), out_features)
            Each row's output from its expert, in the order of ``x``.
        """
        outputs, start = [], 0
        for expert, count in enumerate(counts):
            if count:
                outputs.append(self._expert_forward(expert, x[start:start + count]))
            start += count
        return torch.cat(outputs) if outputs else x.new_zeros(0, self.out_features)

    def _expert_forward(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        # Without autograd, activations and residual sums can overwrite their inputs.
        in_place = not torch.is_grad_enabled() and self.activation in IN_PLACE_ACTIVATIONS
        for i, layer in enumerate(self.hidden):
            inputs = self._norm_one(i - 1, expert, h) if i > 0 else h
            z = self._addmm(layer.bias[expert], inputs, layer.weight[expert])
            if in_place:
                z = IN_PLACE_ACTIVATIONS[self.activation](z)
                h = z.add_(h) if self.residual[i] else z
            else:
                z = self._act(z)
                h = h + z if self.residual[i] else z
        if self.hidden:
            h = self._norm_one(-1, expert, h)
        return self._addmm(self.output.bias[expert], h, self.output.weight[expert])

    @staticmethod
    def _addmm(bias: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if needs_autograd(bias, x, weight):
            return torch.addmm(bias, x, weight)
        return row_invariant_addmm(bias, x, weight)

    def _norm_one(self, index: int, expert: int, h: torch.Tensor) -> torch.Tensor:
        if not len(self.norms):
            return h
        norm = self.norms[index]
        return torch.addcmul(norm.bias[expert], F.layer_norm(h, h.shape[-1:]), norm.weight[expert])


ADAPTER_INITS = ("random_signs", "normal")


class AdapterExperts(_ExpertMLP):
    """Experts that share one MLP's weights and differ by elementwise adapters (BatchEnsemble).

    Expert ``e`` computes every hidden layer as ``act(((h * r_e) @ W) * s_e + b_e)``: the
    weight ``W`` is shared by all experts, the input scaling ``r_e``, output scaling
    ``s_e`` and bias ``b_e`` are the expert's own, and so is its output head ``(W_e, c_e)``.
    This is the TabM recipe (Gorishniy et al., ICLR 2025): weight sharing regularises, and
    a row routed to ``k`` experts runs as ``k`` rows through the shared weights, one matmul
    over all routed rows, so the cost grows with ``top_k`` and not with ``n_experts``, with
    no per-expert weight matrices and no padding.

    Initialisation as in TabM: the first layer's input scaling ``r_e`` is random (signs,
    or normal values constant within each input chunk, e.g. each embedded feature) so that
    the experts differ before the first matmul mixes the features; every other scaling is
    1, and every expert starts with the same biases. Residual connections, layer norm (a
    per-expert affine map) and dropout follow :class:`StackedExperts`.

    Parameters
    ----------
    n_experts : int
    in_features, out_features : int
    expert_hidden : tuple of int
        Hidden layer sizes of the shared MLP; ``()`` makes each expert a linear model with
        its own weights.
    activation : str, default="relu"
    dropout : float, default=0.0
    layer_norm : bool, default=False
    skip_connections : bool, default=True
    output_init_scale : float, default=0.1
        Scale of the output heads' initialisation.
    first_scaling : {"random_signs", "normal"}, default="random_signs"
        Initialisation of the first layer's input scalings.
    input_chunks : sequence of int, optional
        Widths of the input's pieces (summing to ``in_features``) that share one random
        first-layer scaling per expert; ``None`` is one value per input column.
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
        first_scaling: str = "random_signs",
        input_chunks=None,
    ):
        super().__init__(n_experts, in_features, out_features, expert_hidden, activation, dropout, skip_connections)
        if first_scaling not in ADAPTER_INITS:
            raise ValueError(f"first_scaling must be one of {ADAPTER_INITS}, got {first_scaling!r}")
        widths = self.widths
        self.weights = nn.ParameterList()
        self.in_scales = nn.ParameterList()
        self.out_scales = nn.ParameterList()
        self.biases = nn.ParameterList()
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            bound = 1 / math.sqrt(w_in)
            self.weights.append(nn.Parameter(torch.empty(w_in, w_out).uniform_(-bound, bound)))
            self.in_scales.append(nn.Parameter(torch.ones(n_experts, w_in)))
            self.out_scales.append(nn.Parameter(torch.ones(n_experts, w_out)))
            self.biases.append(nn.Parameter(torch.empty(w_out).uniform_(-bound, bound).expand(n_experts, -1).clone()))
        if expert_hidden:
            _init_scaling(self.in_scales[0], first_scaling, input_chunks)
        self.norm_weights = nn.ParameterList(nn.Parameter(torch.ones(n_experts, w)) for w in widths[1:] if layer_norm)
        self.norm_biases = nn.ParameterList(nn.Parameter(torch.zeros(n_experts, w)) for w in widths[1:] if layer_norm)
        bound = output_init_scale / math.sqrt(widths[-1])
        self.head_weight = nn.Parameter(torch.empty(n_experts, widths[-1], out_features).uniform_(-bound, bound))
        self.head_bias = nn.Parameter(torch.empty(n_experts, out_features).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """Run row ``i`` of ``x`` through expert ``experts[i]``, or every row through every
        expert.

        Parameters
        ----------
        x : Tensor of shape (m, in_features)
        experts : Tensor of shape (m,), int64, or None
            None: every expert on every row (:meth:`all_experts`).

        Returns
        -------
        Tensor of shape (m, out_features), or (n_experts, m, out_features) for ``experts=None``
        """
        if experts is None:
            return self._all_experts(x)
        per_expert = self._row_adapters()
        if per_expert and (x.device.type != "cpu" or avoid_host_reads(x.device, self.training)):
            gathered = {id(p): rows[0] for p, rows in zip(per_expert, select_experts(per_expert, [experts]))}
            select = lambda p: gathered[id(p)]  # noqa: E731
        else:  # on the CPU a gather per parameter, as it is used, is faster
            select = lambda p: p.index_select(0, experts)  # noqa: E731
        return self._heads(self._hidden(x, select), experts, select)

    def all_experts(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: Tensor of shape (n_experts, n, out_features).

        The adapters broadcast over an expert axis instead of being gathered per row, and
        the heads run as one batched matmul.
        """
        return self(x)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The parameters that belong to one expert each, expert on axis 0: the scalings,
        biases, norms and heads (not the shared weights)."""
        return [*self._layer_adapters(), self.head_weight, self.head_bias]

    def _layer_adapters(self) -> list[nn.Parameter]:
        return [*self.in_scales, *self.out_scales, *self.biases, *self.norm_weights, *self.norm_biases]

    def _row_adapters(self) -> list[nn.Parameter]:
        """The per-expert parameters a row gathers in :meth:`forward`: every layer's
        scalings, biases and norms, and a single output's head (more outputs run their
        heads by expert, in :meth:`_heads`). On a GPU one gather for all of them: a small
        step's time is its launches there, and one gather per parameter took 13 more
        kernels per training step. On the CPU one per parameter, as each is used, which
        was faster there (a 64-expert step by 2 to 14%, from run to run)."""
        heads = [self.head_weight, self.head_bias] if self.out_features == 1 else []
        return [*self._layer_adapters(), *heads]

    def _all_experts(self, x: torch.Tensor) -> torch.Tensor:
        h = self._hidden(x.unsqueeze(0), lambda p: p.unsqueeze(1))
        if h.shape[0] == 1:  # no hidden layers: the same input for every expert
            h = h.expand(self.n_experts, -1, -1)
        return batched_linear(h, self.head_weight.to(h.dtype), self.head_bias.to(h.dtype))

    def _hidden(self, h: torch.Tensor, select) -> torch.Tensor:
        """The shared hidden layers with each row's adapters, ``select(per_expert_param)``:
        gathered per row (rows of shape (m, width)) or broadcast over an expert axis."""
        for i, weight in enumerate(self.weights):
            inputs = self._norm(i - 1, h, select) if i > 0 else h
            scaled = inputs * select(self.in_scales[i]).to(inputs.dtype)
            weight = weight.to(inputs.dtype)
            z = scaled @ weight if needs_autograd(scaled, weight) else row_invariant_addmm(None, scaled, weight)
            z = torch.addcmul(select(self.biases[i]).to(z.dtype), z, select(self.out_scales[i]).to(z.dtype))
            z = self._act(z)
            if self.training and self.dropout > 0:
                z = apply_dropout(z, self.dropout)
            h = h + z if self.residual[i] else z
        if len(self.weights):
            h = self._norm(-1, h, select)
        return h

    def _heads(self, h: torch.Tensor, experts: torch.Tensor, select) -> torch.Tensor:
        """Row ``i`` through expert ``experts[i]``'s output head.

        One output: the head's weight row for each row (``select(parameter)``, the rows'
        slices of a per-expert parameter), multiplied elementwise. More outputs:
        the rows are dispatched as in :mod:`.dispatch`, by expert into a buffer padded to the
        busiest expert, and every head runs as one batched matmul (gathering a weight matrix
        per row would move ``rows * width * outputs`` values). In training on a GPU, where
        reading the busiest expert's count would make the host wait, the buffer is the
        ``"blocked"`` layout of :mod:`.layouts` instead, each block through its expert's
        gathered head.
        """
        if self.out_features == 1:
            weight = select(self.head_weight)[:, :, 0].to(h.dtype)
            bias = select(self.head_bias).to(h.dtype)
            return (h * weight).sum(dim=1, keepdim=True) + bias
        if h.shape[0] == 0:
            return h.new_zeros(0, self.out_features)
        sync_free = avoid_host_reads(h.device, self.training)
        plan = plan_dispatch(experts.unsqueeze(1), h.new_ones(h.shape[0], 1), self.n_experts, sync_free=sync_free,
                             expert_order=not sync_free)
        weight, bias = self.head_weight.to(h.dtype), self.head_bias.to(h.dtype)

        def heads(blocks, block_experts):  # one block: every expert in order (padded), or one per block
            ids = block_experts[0]
            if ids is None:
                return [batched_linear(blocks[0], weight, bias)]
            return [batched_linear(blocks[0], weight.index_select(0, ids), bias.index_select(0, ids))]

        layout = blocked_layout(plan) if sync_free else padded_layout(plan)
        return in_row_order(run_buffer(h, heads, plan, layout, self.out_features), plan)

    def _norm(self, index: int, h: torch.Tensor, select) -> torch.Tensor:
        if not len(self.norm_weights):
            return h
        weight = select(self.norm_weights[index]).to(h.dtype)
        bias = select(self.norm_biases[index]).to(h.dtype)
        return torch.addcmul(bias, F.layer_norm(h, h.shape[-1:]), weight)


@torch.no_grad()
def _init_scaling(scale: torch.Tensor, kind: str, chunks=None) -> None:
    """Random first-layer scalings: ``kind`` values, one per expert and input chunk."""
    n_experts, width = scale.shape
    chunks = [1] * width if chunks is None else [int(c) for c in chunks]
    if sum(chunks) != width:
        raise ValueError(f"input_chunks sum to {sum(chunks)}, expected {width}")
    if kind == "random_signs":
        values = torch.where(torch.rand(n_experts, len(chunks)) < 0.5, -1.0, 1.0)
    else:
        values = torch.randn(n_experts, len(chunks))
    repeats = torch.tensor(chunks, device=values.device)
    scale.copy_(values.repeat_interleave(repeats, dim=1, output_size=width))
