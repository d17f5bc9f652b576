"""MixtureOfExperts: router + stacked experts + combine, returning a :class:`MoEOutput`.

Host synchronisation
--------------------
A training forward on a GPU reads nothing on the host for the default configuration and
its common variants: the dense routers (``"softmax"``, ``"uniform"``) and the sparse
ones with a fixed number of experts per row (``"topk"``, ``"noisy_topk"``, ``"switch"``,
``"hierarchical"``), independent or adapter experts, a shared expert, gradient scaling,
sample weights, every balance loss and the z-loss, the mixture-density and categorical
outputs. Such a batch's ``n * k`` assignments have a size known on the host; the counts
per expert are scatter-adds, the independent experts run in a layout whose sizes are known
on the host (``"blocked"``, or ``"grouped"`` where PyTorch runs ``torch._grouped_mm`` as one
kernel: bfloat16 autocast on compute capability 9.0 or 10.0; see :mod:`.layouts`), masked
rows enter the losses through ``torch.where`` rather than a boolean selection, and a
non-finite expert output is masked without a host read: the failures are counted per
expert on the device and reported, as the same ``RuntimeWarning``, when the module leaves
training mode (``module.eval()``, ``module.train(False)``).

What still reads a size on the host in training, because the number of assignments kept
depends on the data and :class:`MoEOutput` carries exactly the kept ones: a capacity cap
(``capacity_factor``; rerouting loops until every overflowing assignment is placed),
dynamic-k routing (``"top_p"``) and ``expert_dropout``; also the diversity loss with
sample weights (it takes the first weighted rows). On the CPU, and in evaluation
anywhere, the engine reads sizes where that is simpler or faster: there reading is free, or
a copy to the host follows anyway. :func:`~._sync.avoid_host_reads` decides.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ._checks import check_int
from ._random import draw_generator
from ._sync import avoid_host_reads, compute_dtype, grouped_mm_supported
from .density import CLASS_MIXTURES, OUTPUTS, split_outputs
from .dispatch import (
    OVERFLOW_POLICIES,
    ExpertAssignments,
    assignment_grid,
    assignments_with_outputs,
    combine,
    count_experts,
    count_routed,
    dense_assignments,
    expert_capacity,
    flat_assignments,
    plan_dispatch,
    warn_failed_experts,
)
from .embeddings import N_FREQUENCIES, CategoricalEmbedding, NumericEmbedding
from .experts import AdapterExperts, StackedExperts
from .layouts import choose_layout, expert_outputs
from .losses import BALANCE_LOSSES, expert_diversity_loss, router_z_loss
from .routers import make_router

# Expert dropout keeps a row's most weighted expert where its survivors would carry less
# than this share of the row's gate weight.
MIN_SURVIVING_WEIGHT = 1e-6
# predict and route evaluate at least this many rows (a one-row batch is padded with a
# zero row): the numeric embeddings (rtdl_num_embeddings) run plain float32 products, which
# take a matrix-vector kernel, rounding differently, for one row; see :mod:`.products`.
MIN_EVAL_ROWS = 2
# ... and at least this many embedded values (rows times embedded columns): the periodic
# embedding's product over them rounded differently below 5 on a 2-core Xeon (a module
# embedding one column gave 1- to 4-row batches other last bits than a large batch).
MIN_EVAL_EMBEDDED = 8
# In evaluation, batches of at most this many rows run every expert on every row (unchosen
# experts weighted 0): a padded dispatch block has a slot per expert anyway, and skipping
# the sort-based dispatch takes about a third off a 1-row prediction.
DENSE_EVAL_MAX_ROWS = 4
EXPERT_TYPES = ("independent", "adapter")


def copy_perturbed(tensor: torch.Tensor, row: torch.Tensor, targets: list[int], noise: float | None,
                   generator=None) -> None:
    """Set ``tensor[t]`` to ``row`` times ``1 + noise * N(0, 1)`` elementwise, a fresh draw
    for each ``t`` of ``targets`` (in place; ``row`` exactly where ``noise`` is None or the
    tensor is not floating point: no draw is then made). The draws come from ``generator``,
    else from this thread's training generator (:func:`~._random.drawing_from`), else from
    torch's global one."""
    generator = generator if generator is not None else draw_generator()
    device = generator.device if generator is not None else "cpu"
    for target in targets:
        copy = row.clone()
        if noise is not None and copy.is_floating_point():
            draw = torch.randn(copy.shape, generator=generator, device=device, dtype=copy.dtype).to(copy.device)
            copy = copy * (1 + noise * draw)
        tensor[target] = copy


class MoEOutput(NamedTuple):
    """What :meth:`MixtureOfExperts.forward` returns.

    A named tuple: each parameter below is kept as the field of the same name.

    Parameters
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
    diversity_loss : Tensor, scalar
        :func:`~sklearn_moe.nn.losses.expert_diversity_loss` of the experts' outputs on the
        first rows of the batch; 0 unless ``diversity_loss=True`` and training.
    assignments : ExpertAssignments
        Every chosen expert's own output for its row, with its gate weight: what a
        per-expert loss (:func:`~sklearn_moe.nn.losses.per_expert_loss`) trains on.
    """

    output: torch.Tensor
    gates: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    expert_counts: torch.Tensor
    n_dropped: torch.Tensor
    diversity_loss: torch.Tensor
    assignments: ExpertAssignments | None = None


class _Mixed(NamedTuple):
    output: torch.Tensor
    routing: object
    active: torch.Tensor | None
    weights: torch.Tensor
    plan_counts: torch.Tensor | None
    n_dropped: torch.Tensor
    assignments: ExpertAssignments


def _floating(x: torch.Tensor) -> torch.Tensor:
    """``x``, refused unless it is floating point: the adapter experts would cast their
    weights to an integer input's dtype, the others fail in a matmul."""
    if not x.is_floating_point():
        raise TypeError(f"MixtureOfExperts takes floating-point input (category codes as floats too); got {x.dtype}. "
                        "Convert it with x.float().")
    return x


class MixtureOfExperts(nn.Module):
    """A mixture of MLP experts for tabular data.

    Parameters
    ----------
    n_features : int
        Input width.
    n_outputs : int
        Output width (regression targets, or class logits).
    n_experts : int, default=8
        Number of routed experts.
    top_k : int, default=2
        Experts per row for sparse routers, at most: a larger value than ``n_experts``
        means every expert (as in the estimators, so that ``n_experts=1`` needs no
        ``top_k=1`` beside it).
    router : {"softmax", "topk", "noisy_topk", "switch", "top_p", "hierarchical", "uniform"}, default="topk"
        ``"softmax"`` is the dense soft mixture (every expert on every row, ``top_k``
        unused); ``"topk"`` routes each row to its ``top_k`` best experts with gate weights
        renormalised over them; ``"noisy_topk"`` adds learned Gaussian noise to the ranking
        in training (Shazeer et al. 2017); ``"switch"`` is top-1 with input jitter in
        training (Fedus et al. 2021); ``"top_p"`` takes a row's best experts until their
        probability reaches ``top_p`` (dynamic k, at most ``top_k``); ``"hierarchical"`` is
        a group gate over ``n_groups`` groups, then a gate within the best group;
        ``"uniform"`` weighs every expert equally (an ensemble, no gate). See
        :mod:`sklearn_moe.nn.routers`.
    expert_hidden : tuple of int, default=(128,)
        Hidden layer sizes of every expert.
    activation : str, default="relu"
        Hidden activation of every expert, one of :data:`~sklearn_moe.nn.ACTIVATIONS`.
    dropout : float, default=0.0
        Dropout probability after every hidden layer of every expert, in training.
    layer_norm : bool, default=False
        Layer normalisation of the input of every expert layer after the first (each later
        hidden layer and the output layer).
    skip_connections : bool, default=True
        Residual connections around the experts' hidden layers of equal width.
    temperature : float, default=1.0
        Router softmax temperature.
    capacity_factor : float or None, default=None
        In training only, caps each expert at ``ceil(capacity_factor * n * top_k /
        n_experts)`` rows per batch, under a sparse router; ``None`` is dropless. Evaluation
        is always dropless, so a row's prediction never depends on the other rows of its
        batch.
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
    capacity_overflow : {"drop", "reroute"}, default="drop"
        What happens to a row's assignment past an expert's capacity: ``"drop"`` falls back
        to the row's other experts (and the shared expert); ``"reroute"`` sends it, with its
        gate weight, to the row's next-ranked expert that has room. See
        :mod:`sklearn_moe.nn.dispatch`.
    top_p : float, default=0.5
        Probability mass threshold of ``router="top_p"``.
    learned_threshold : bool, default=False
        ``router="top_p"``: learn a per-expert probability threshold instead.
    n_groups : int, default=2
        Expert groups of ``router="hierarchical"`` (at most ``n_experts``).
    diversity_loss : bool, default=False
        Compute :attr:`MoEOutput.diversity_loss` in training: every expert is also run on the
        first ``diversity_rows`` rows of the batch.
    diversity_rows : int, default=64
        Rows of the batch on which every expert runs for the diversity loss.
    expert_grad_scaling : bool, default=False
        In training, multiply the gradient reaching each expert by ``mean_count / count_e``
        (clipped to ``[0, n_experts]``), where ``count_e`` is the number of rows routed to it
        in the batch: every expert then learns at the pace of an average-load one, so a
        rarely-chosen expert is not starved into staying rarely chosen. Sparse routing only.
    expert_type : {"independent", "adapter"}, default="independent"
        ``"independent"``: every expert has its own weights (:class:`StackedExperts`).
        ``"adapter"``: the experts share one MLP and differ by elementwise adapters, biases
        and output heads (:class:`AdapterExperts`); a row's ``top_k`` experts run as
        ``top_k`` rows through the shared weights.
    numeric_embedding : {"periodic", "piecewise_linear"} or None, default=None
        Embed the ``embedding_columns`` of the input (:class:`NumericEmbedding`) before the
        router and the experts, which both see the embedded input.
    embedding_columns : sequence of int, optional
        Columns to embed; required with ``numeric_embedding``.
    embedding_bins : list of Tensor, optional
        ``"piecewise_linear"``: bin edges of every embedded column.
    embedding_n_bins : sequence of int, optional
        ``"piecewise_linear"`` without ``embedding_bins``: bins per column, the edges to be
        loaded with ``load_state_dict``.
    category_cardinalities : sequence of int, optional
        The last ``len(category_cardinalities)`` columns of the input hold integer category
        codes, one column per categorical feature, code 0 reserved for a category unseen in
        training (:class:`CategoricalEmbedding`); each column is replaced by its learned
        vector before the router and the experts. The numeric embedding, if any, applies to
        the columns before them (``embedding_columns`` index those).
    output : {"point", "mixture_density", "categorical_mixture", "bernoulli_mixture"}, default="point"
        ``"mixture_density"``: every expert outputs a Gaussian per target (a mean and a
        raw scale, :mod:`sklearn_moe.nn.density`); :attr:`MoEOutput.output` is the
        mixture's mean and the assignments carry the raw outputs for the likelihood.
        ``"categorical_mixture"`` (classification): every expert outputs class logits and
        the gate mixes the experts' class probabilities; :attr:`MoEOutput.output` holds the
        mixture's log-probabilities. ``"bernoulli_mixture"`` (multilabel classification):
        every expert outputs one logit per label and the gate mixes each label's
        probability; :attr:`MoEOutput.output` holds the logits of the mixed probabilities
        (:func:`~sklearn_moe.nn.density.mixture_label_logits`). ``"point"`` mixes the
        experts' outputs (for a classifier, their logits) linearly.

    Notes
    -----
    In a training loop of your own:

    - The input must be floating point (an integer tensor is a ``TypeError``) and finite:
      it is not checked, since a check would synchronise a GPU. A NaN row makes NaN gate
      weights, auxiliary losses and gradients; the estimators impute missing values first.
    - An expert whose output is not finite is masked in the forward pass (its rows fall
      back to their other experts, with a ``RuntimeWarning``). The backward pass cannot mask
      it: weights that every expert shares (adapter experts' shared layers, the router, a
      shared expert) receive NaN gradients from it. Check the weights' finiteness after an
      optimizer step, as the estimators do (they roll the epoch back).
    - Precision: float32, or float64 after ``.double()``; for half precision keep the
      module in float32 and run it under ``torch.autocast`` (the router then still
      computes in float32). ``torch.compile`` works; TorchScript does not (:class:`MoEOutput` holds
      non-tensor fields, and sparse routing has data-dependent sizes).
    - ``balance_loss="aux_free"`` under ``router="hierarchical"`` balances only within the
      chosen group (the estimators refuse the combination).
    - ``predict`` and ``route`` run without autograd.

    Examples
    --------
    One training step of a sparse mixture in a loop of one's own, then inference:

    >>> import torch
    >>> from sklearn_moe.nn import MixtureOfExperts
    >>> moe = MixtureOfExperts(n_features=4, n_outputs=1, n_experts=8, top_k=2, router="topk")
    >>> optimizer = torch.optim.AdamW(moe.parameters(), lr=1e-3)
    >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
    >>> out = moe(x)
    >>> loss = torch.nn.functional.mse_loss(out.output, y) + 0.01 * out.balance_loss + 1e-3 * out.z_loss
    >>> loss.backward()
    >>> optimizer.step()
    >>> out.gates.shape, int((out.gates > 0).sum(dim=1).max())
    (torch.Size([64, 8]), 2)
    >>> moe.eval().predict(x[:3]).shape
    torch.Size([3, 1])
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
        capacity_overflow: str = "drop",
        top_p: float = 0.5,
        learned_threshold: bool = False,
        n_groups: int = 2,
        diversity_loss: bool = False,
        diversity_rows: int = 64,
        expert_grad_scaling: bool = False,
        expert_type: str = "independent",
        numeric_embedding: str | None = None,
        embedding_columns=None,
        embedding_bins=None,
        embedding_n_bins=None,
        category_cardinalities=None,
        output: str = "point",
    ):
        super().__init__()
        for name, size in (("n_features", n_features), ("n_outputs", n_outputs), ("n_experts", n_experts),
                           ("top_k", top_k), ("diversity_rows", diversity_rows)):
            check_int(name, size)
        for name, widths in (("expert_hidden", expert_hidden), ("gate_hidden", gate_hidden)):
            for width in widths:
                check_int(f"{name} sizes", width)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not output_init_scale > 0:
            raise ValueError(f"output_init_scale must be > 0, got {output_init_scale}")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {expert_type!r}")
        if balance_loss is not None and balance_loss not in BALANCE_LOSSES:
            raise ValueError(f"balance_loss must be one of {sorted(BALANCE_LOSSES)} or None, got {balance_loss!r}")
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"expert_dropout must be in [0, 1), got {expert_dropout}")
        if capacity_factor is not None and not capacity_factor >= 1:
            raise ValueError(f"capacity_factor must be None or >= 1, got {capacity_factor}")
        if capacity_overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"capacity_overflow must be one of {OVERFLOW_POLICIES}, got {capacity_overflow!r}")
        self.n_features = n_features
        self.n_outputs = n_outputs
        self.n_experts = n_experts
        top_k = min(top_k, n_experts)
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.balance_loss = balance_loss
        self.expert_dropout = expert_dropout
        self.capacity_overflow = capacity_overflow
        self.diversity_loss = diversity_loss
        self.diversity_rows = diversity_rows
        self.expert_grad_scaling = expert_grad_scaling
        self.expert_type = expert_type
        self.output = output
        # A mixture-density expert outputs a mean and a raw scale per target.
        self.expert_width = 2 * n_outputs if output == "mixture_density" else n_outputs
        if output == "mixture_density":
            # Multiplies every expert's standard deviation in predict_distribution: a
            # recalibration fitted on held-out rows after training (1 in training).
            self.register_buffer("scale_calibration", torch.tensor(1.0))
        self.category_embedding = None
        n_numeric = n_features
        if category_cardinalities is not None and len(category_cardinalities):
            if not 0 < len(category_cardinalities) <= n_features:
                raise ValueError(f"category_cardinalities names {len(category_cardinalities)} code columns; the "
                                 f"input has {n_features}")
            self.category_embedding = CategoricalEmbedding(category_cardinalities)
            n_numeric = n_features - self.category_embedding.n_columns
        self.embedding = None
        width = n_numeric
        chunks = [1] * n_numeric
        if numeric_embedding is not None:
            if embedding_columns is None:
                raise ValueError("numeric_embedding needs embedding_columns")
            self.embedding = NumericEmbedding(numeric_embedding, n_numeric, embedding_columns, embedding_bins,
                                              embedding_n_bins)
            width, chunks = self.embedding.out_features, self.embedding.chunks
        n_embedded = 0 if self.embedding is None else self.embedding.columns.shape[0]
        # predict and route pad a smaller batch to this many rows (see MIN_EVAL_EMBEDDED)
        self._min_eval_rows = max(MIN_EVAL_ROWS, -(-MIN_EVAL_EMBEDDED // n_embedded) if n_embedded else 0)
        if self.category_embedding is not None:
            width += self.category_embedding.out_features
            chunks += [self.category_embedding.d_embedding] * self.category_embedding.n_columns
        embedded = self.embedding is not None or self.category_embedding is not None
        self.router = make_router(router, width, n_experts, top_k, temperature, tuple(gate_hidden),
                                  top_p=top_p, learned_threshold=learned_threshold, n_groups=n_groups)
        expert_args = (width, self.expert_width, tuple(expert_hidden), activation, dropout, layer_norm,
                       skip_connections, output_init_scale)
        if expert_type == "adapter":
            first_scaling = "normal" if embedded else "random_signs"
            self.experts = AdapterExperts(n_experts, *expert_args, first_scaling=first_scaling,
                                          input_chunks=chunks if embedded else None)
        else:
            self.experts = StackedExperts(n_experts, *expert_args)
        self.shared_expert = StackedExperts(1, *expert_args) if shared_expert else None
        # Failed (non-finite) expert outputs counted on the device in sync-free training,
        # reported when the module leaves training mode; never saved, copied or moved.
        self._failed_outputs = None

    def train(self, mode: bool = True) -> MixtureOfExperts:
        """Set training mode (``mode=True``) or evaluation mode, as :meth:`torch.nn.Module.train`.

        Leaving training mode first reports, as a ``RuntimeWarning``, the non-finite expert
        outputs that training steps on a GPU masked without reading anything on the host
        (see the module docstring).

        Parameters
        ----------
        mode : bool, default=True
            Training mode if True, evaluation mode if False.

        Returns
        -------
        MixtureOfExperts
            This module.
        """
        if not mode:
            self._report_failed_outputs()
        return super().train(mode)

    def __getstate__(self):
        state = super().__getstate__()
        state["_failed_outputs"] = None  # a device tally, not part of the model
        return state

    def _report_failed_outputs(self) -> None:
        tally = getattr(self, "_failed_outputs", None)
        if tally is not None:
            warn_failed_experts(tally)

    def _failure_tally(self, device: torch.device) -> torch.Tensor:
        """The device tally of failed outputs that sync-free training adds to."""
        tally = getattr(self, "_failed_outputs", None)
        if tally is None or tally.device != device:
            self._report_failed_outputs()
            tally = self._failed_outputs = torch.zeros(self.n_experts, dtype=torch.int64, device=device)
        return tally

    def forward(self, x: torch.Tensor, sample_weight: torch.Tensor | None = None) -> MoEOutput:
        """Route and mix.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The input rows (category codes last, when the module has
            ``category_cardinalities``).
        sample_weight : Tensor of shape (n,), optional
            Rows with zero weight are left out of the auxiliary losses.

        Returns
        -------
        MoEOutput
            The mixture's output and the routing's auxiliary terms.
        """
        x = self._embed(_floating(x))
        mixed = self._mix(x)
        routing, active = mixed.routing, mixed.active
        mask = None if sample_weight is None else sample_weight > 0
        gates = self._gates(routing, active, mixed.weights)
        counts = self._routing_counts(routing, active, mask, mixed.plan_counts)
        balance = self._balance_loss(routing, gates, mask, active, counts)
        z_loss = router_z_loss(routing.logits, mask) if self.router.learned else x.new_zeros((), dtype=torch.float32)
        diversity = self._diversity_loss(x, mask) if self.training and self.diversity_loss else x.new_zeros(())
        return MoEOutput(mixed.output, gates, balance, z_loss, counts, mixed.n_dropped, diversity, mixed.assignments)

    @property
    def values_per_row(self) -> int:
        """About how many values one row's evaluation holds at once, at its widest steps.

        The input, the numeric embedding's per-bin or per-frequency encoding of every
        embedded column, the gate's widest layer, and the widest layer (hidden or output) of
        every expert that runs the row, the shared expert included. Callers size the chunks
        of a large prediction by it.

        Returns
        -------
        int
        """
        embedding = 0
        if self.embedding is not None:
            per_column = max(self.embedding.n_bins) if self.embedding.n_bins else 2 * N_FREQUENCIES
            embedding = self.embedding.columns.shape[0] * (per_column + self.embedding.d_embedding)
        gate = max((layer.out_features for layer in self.router.modules() if isinstance(layer, nn.Linear)),
                   default=self.n_experts)
        running = (self.n_experts if self.router.is_dense else self.top_k) + (self.shared_expert is not None)
        return self.n_features + embedding + gate + running * max(*self.experts.widths, self.expert_width)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The mixture's output alone, without the auxiliary terms (for inference).

        In evaluation mode a row's output is the same, bit for bit on the CPU, whatever
        batch holds it (see :mod:`sklearn_moe.nn.products`).

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The input rows.

        Returns
        -------
        Tensor of shape (n, n_outputs)
            The mixture's output (for ``output="categorical_mixture"``, log-probabilities;
            for ``"bernoulli_mixture"``, the logits of the mixed label probabilities).
        """
        return self._evaluate(x, lambda rows: self._mix(self._embed(rows)).output)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """The gate weights alone.

        Batch-invariant in evaluation mode, as :meth:`predict`.

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The input rows.

        Returns
        -------
        Tensor of shape (n, n_experts)
            Every row's gate weights, zero for experts not chosen.
        """
        def gates(rows):
            routing = self.router(self._embed(rows))
            return self._gates(routing, *self._active_weights(routing))

        return self._evaluate(x, gates)

    def predict_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's mixture of Gaussians, for ``output="mixture_density"``.

        The mixture is given as gate weights and every expert's Gaussian (see
        :mod:`sklearn_moe.nn.density`).

        Parameters
        ----------
        x : Tensor of shape (n, n_features)
            The input rows.

        Returns
        -------
        weights : Tensor of shape (n, n_experts)
            The gate weights (:meth:`route`): zero for experts a sparse router did not choose.
        means, scales : Tensors of shape (n, n_experts, n_outputs)
            The scales are multiplied by the buffer ``scale_calibration``.

        Notes
        -----
        With autograd enabled the outputs carry gradients; without it (``torch.no_grad``,
        ``torch.inference_mode``), in evaluation mode, a small batch is padded as in
        :meth:`predict`, so that each row's result does not depend on its batch.
        """
        if self.output != "mixture_density":
            raise ValueError(f"predict_distribution needs output='mixture_density'; this module has {self.output!r}")
        if torch.is_grad_enabled():  # differentiable, as the module's forward is
            return self._distribution(x)
        return self._evaluate(x, self._distribution)

    def _distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        weights = self.route(x)
        h = self._embed(x)
        outputs = self.experts.all_experts(h)
        if self.shared_expert is not None:
            outputs = outputs + self.shared_expert(h.unsqueeze(0))
        means, scales = split_outputs(outputs.transpose(0, 1), self.n_outputs)
        return weights, means.float(), scales * self.scale_calibration

    @torch.no_grad()
    def _evaluate(self, x: torch.Tensor, compute) -> torch.Tensor:
        """``compute(x)`` (a tensor or a tuple of them) without autograd, on at least
        ``_min_eval_rows`` rows in evaluation mode."""
        x = _floating(x)
        n = x.shape[0]
        if self.training or n >= self._min_eval_rows:
            return compute(x)
        result = compute(torch.cat((x, x.new_zeros(self._min_eval_rows - n, x.shape[1]))))
        return tuple(part[:n] for part in result) if isinstance(result, tuple) else result[:n]

    def expert_state_names(self) -> list[str]:
        """The state-dict entries that hold one slice per expert on axis 0.

        These are the experts' own parameters and the router's per-expert rows: what
        :meth:`split_expert` copies and what keeping a subset of the experts slices.

        Returns
        -------
        list of str
            State-dict keys of this module.
        """
        own = {id(p) for p in self.experts.expert_parameters()}
        names = [f"experts.{name}" for name, p in self.experts.named_parameters() if id(p) in own]
        return names + [f"router.{name}" for name in self.router.expert_state_names()]

    @torch.no_grad()
    def split_expert(self, source: int, targets, noise: float = 0.01, generator=None) -> None:
        """Overwrite the experts ``targets`` with perturbed copies of expert ``source``.

        The copies and ``source`` share its routing (growth by splitting).

        Every per-expert tensor (:meth:`expert_state_names`) of a target becomes
        ``source``'s times ``1 + noise * N(0, 1)`` elementwise (the router's gate rows too,
        so that rows come to prefer one copy or another), and the logits of ``source`` and
        its ``m`` copies drop by ``log(1 + m)`` (their gate biases by ``temperature * log(1 +
        m)``): together they start with the softmax weight ``source`` had against the other
        experts. That holds where every expert shares one softmax (the flat routers); under
        ``router="hierarchical"`` a copy in another group shifts the weight between the
        groups. A top-k choice (``"topk"``, ``"noisy_topk"``, ``"switch"``) ranks the logits,
        so there they keep ``source``'s: the copies are chosen where it is, beside it or, as
        their perturbed gate rows part, instead of it (lowered, all of them would fall behind
        the experts they beat and stop being chosen).

        Parameters
        ----------
        source : int
            The expert to copy.
        targets : int or sequence of int
            Experts to overwrite, distinct and other than ``source``.
        noise : float, default=0.01
            Relative standard deviation of the multiplicative perturbation.
        generator : torch.Generator, optional
            Source of the perturbation (default: the training draws' generator inside
            :func:`~._random.drawing_from`, as in a fit; else torch's global generator).
        """
        targets = self._split_targets(source, targets)
        own = {id(p) for p in self.experts.expert_parameters()}
        for tensor in (p for p in self.experts.parameters() if id(p) in own):
            copy_perturbed(tensor, tensor[source], targets, noise, generator)
        self._split_router(source, targets, noise, generator)

    def _split_targets(self, source: int, targets) -> list[int]:
        """``targets`` of :meth:`split_expert` as a list, checked against ``source``."""
        targets = [int(targets)] if isinstance(targets, int) else [int(t) for t in targets]
        experts = [source, *targets]
        if len(set(experts)) != len(experts) or not all(0 <= e < self.n_experts for e in experts):
            raise ValueError(f"source and targets must be distinct experts in [0, {self.n_experts}), "
                             f"got {source} and {targets}")
        return targets

    def _split_router(self, source: int, targets: list[int], noise: float, generator) -> None:
        """The router's part of :meth:`split_expert`: its per-expert rows copied (the gate
        rows perturbed), and, unless the router chooses by rank, the gate biases of
        ``source`` and its copies lowered."""
        # A top-k choice ranks the logits: lowered, the source and its copies would drop
        # below the experts they beat and stop being chosen, so the copies starve in turn.
        by_rank = self.router.chooses_by_rank
        for name, tensor in self._router_expert_tensors().items():
            gate_bias = name.endswith(".bias") and not name.startswith("noise")
            exact = gate_bias or name == "selection_bias"
            copy_perturbed(tensor, tensor[source], targets, None if exact else noise, generator)
            if gate_bias and not by_rank:  # logits are the gate's output over the temperature
                tensor[[source, *targets]] = tensor[source] - self.router.temperature * math.log(1 + len(targets))

    def _router_expert_tensors(self) -> dict[str, torch.Tensor]:
        """The router's per-expert parameters and buffers (expert on axis 0), by name."""
        state = dict(self.router.named_parameters()) | dict(self.router.named_buffers())
        return {name: state[name] for name in self.router.expert_state_names()}

    def _active_weights(self, routing):
        """Which chosen experts take part (dynamic k, expert dropout) and their gate weights."""
        active = routing.active
        if self.training and self.expert_dropout > 0:
            active = self._expert_dropout_mask(routing.weights, active)
        weights = routing.weights
        if active is not None and active is not routing.active:
            weights = weights * active
            weights = weights / weights.sum(dim=1, keepdim=True)
        return active, weights

    def _gates(self, routing, active: torch.Tensor | None, weights: torch.Tensor) -> torch.Tensor:
        if self.router.is_dense and active is None:
            return routing.probs
        return routing.probs.new_zeros(routing.probs.shape).scatter(1, routing.indices, weights)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.category_embedding is None:
            return x if self.embedding is None else self.embedding(x)
        n_numeric = x.shape[1] - self.category_embedding.n_columns
        numeric = x[:, :n_numeric] if self.embedding is None else self.embedding(x[:, :n_numeric])
        categories = self.category_embedding(x[:, n_numeric:])
        return torch.cat((numeric.to(categories.dtype), categories), dim=1)

    def _mix(self, x: torch.Tensor) -> _Mixed:
        routing = self.router(x)
        active, weights = self._active_weights(routing)
        n = x.shape[0]
        tally = self._failure_tally(x.device) if avoid_host_reads(x.device, self.training) else None
        small_eval = self.expert_type == "independent" and not self.training and n <= DENSE_EVAL_MAX_ROWS
        if self.router.is_dense or small_eval:
            assignments = dense_assignments(x, self.experts, self._gates(routing, active, weights), tally,
                                            choice_major=self.training)
            plan_counts, n_dropped = None, torch.zeros((), dtype=torch.long, device=x.device)
        else:
            assignments, plan_counts, n_dropped = self._dispatch(x, routing, active, weights, tally)
        output = combine(assignments, n)
        shared = None
        if self.shared_expert is not None:
            shared = self.shared_expert(x.unsqueeze(0))[0]
            output = output + shared
            assignments = assignments._replace(outputs=assignments.outputs + shared.index_select(0, assignments.rows))
        if self.output != "point" and self.training and self.capacity_factor is not None and not self.router.is_dense:
            assignments = self._serve_dropped_rows(assignments, routing, shared, n)
        if self.output == "mixture_density":
            output = output[:, :self.n_outputs]  # the mixture's mean (the raw scales do not mix linearly)
        elif self.output in CLASS_MIXTURES:
            output = CLASS_MIXTURES[self.output](assignments.outputs, assignments.rows, assignments.weights, n)
        return _Mixed(output, routing, active, weights, plan_counts, n_dropped, assignments)

    def _serve_dropped_rows(self, assignments, routing, shared: torch.Tensor | None, n: int):
        """``assignments`` with one of weight 1 for every row the capacity cap left without
        an expert, whose output is the shared expert's (zeros without one): the point output
        of such a row is that output too, and a mixture of no component has no likelihood.
        Finding the rows reads their number on the host, as a capacity's plan already does
        in every training step."""
        rows = torch.nonzero(torch.bincount(assignments.rows, minlength=n) == 0).squeeze(1)
        if rows.numel() == 0:
            return assignments
        outputs = (shared.index_select(0, rows) if shared is not None
                   else assignments.outputs.new_zeros((rows.shape[0], assignments.outputs.shape[1])))
        return assignments._replace(
            rows=torch.cat((assignments.rows, rows)),
            experts=torch.cat((assignments.experts, routing.indices[rows, 0])),  # their first choice's tally
            weights=torch.cat((assignments.weights, assignments.weights.new_ones(rows.shape[0]))),
            outputs=torch.cat((assignments.outputs, outputs.to(assignments.outputs.dtype))), grid=None)

    def _dispatch(self, x: torch.Tensor, routing, active, weights, tally=None):
        """Sparse routing: the experts' outputs for the chosen (row, expert) pairs, the counts
        per expert as routed (None: count ``routing.indices``) and the number dropped.
        With a failure ``tally`` (sync-free training), no size is read on the host where the
        routing allows (see the module docstring)."""
        n = x.shape[0]
        independent = self.expert_type == "independent"
        capacity = None
        if self.training and self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, n, routing.indices.shape[1], self.n_experts)
        n_dropped = torch.zeros((), dtype=torch.long, device=x.device)
        plan = plan_counts = None
        grid = None
        if independent or capacity is not None:
            ranking = None
            if capacity is not None and self.capacity_overflow == "reroute":
                ranking = routing.scores.argsort(dim=1, descending=True)
            plan = plan_dispatch(routing.indices, weights, self.n_experts, capacity, active, self.capacity_overflow,
                                 ranking, sync_free=tally is not None,
                                 expert_order=self._expert_sorted_plans or tally is None)
            rows, experts, flat_weights, grid = plan.rows, plan.experts, plan.weights, assignment_grid(plan)
            plan_counts = plan.counts
            if capacity is not None:  # else nothing was dropped
                n_dropped = plan.counts.sum() - plan.rows.shape[0]
        else:
            # Adapter experts need no expert-sorted layout: every routed row goes through
            # the shared weights as it is.
            rows, experts, flat_weights = flat_assignments(routing.indices, weights, active)
            if active is None and self.training:  # every row's k choices, choice by choice
                grid = "choice_major"
        grad_scale = None
        if self.training and self.expert_grad_scaling:
            counts = plan_counts if plan_counts is not None else count_experts(experts, self.n_experts)
            grad_scale = self._grad_scale(counts)
        if independent:
            # No router repeats an expert within a row: no expert keeps more assignments than
            # rows, nor more than the capacity applied to the plan.
            outputs = self._independent_outputs(x, plan, n if capacity is None else min(n, capacity))
        else:
            outputs = self.experts(x.index_select(0, rows), experts)
        assignments = assignments_with_outputs(rows, experts, flat_weights, outputs, n, grad_scale, tally, grid)
        return assignments, plan_counts, n_dropped

    #: Whether :meth:`_independent_outputs` needs its plans sorted by expert. The sync-free
    #: layouts place assignments by (expert, slot), so a sync-free dropless plan skips the
    #: sort (elsewhere the sort is cheaper than the one-hot ranks on a CPU, and evaluation's
    #: ``"sorted"`` layout needs it).
    _expert_sorted_plans = False

    def _independent_outputs(self, x: torch.Tensor, plan, max_count: int) -> torch.Tensor:
        """The independent experts' outputs for ``plan``'s assignments, in plan order: Tensor
        of shape (m, expert_width); ``max_count`` bounds every expert's kept assignments. A
        hook: :class:`sklearn_moe.distributed.ExpertParallelMoE` sends the rows to the ranks
        that hold their experts here."""
        grouped = plan.n_slots is None and grouped_mm_supported(x.device, compute_dtype(x))
        layout = choose_layout(plan, self.training, x.device.type, grouped)
        return expert_outputs(x, self.experts, plan, self.expert_width, layout, max_count)

    def _routing_counts(self, routing, active, mask, plan_counts) -> torch.Tensor:
        """Assignments per expert, leaving out inactive ones and zero-weight rows."""
        if active is None and mask is None and plan_counts is not None:
            return plan_counts
        return count_routed(routing.indices, self.n_experts, active, mask)[0]

    def _grad_scale(self, counts: torch.Tensor) -> torch.Tensor:
        mean_count = counts.sum().float() / self.n_experts
        return (mean_count / counts.float().clamp_min(1)).clamp(max=float(self.n_experts))

    def _diversity_loss(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        rows = x if mask is None else x[mask]
        rows = rows[: self.diversity_rows]
        return expert_diversity_loss(self.experts.all_experts(rows))

    def _expert_dropout_mask(self, weights: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """(n, k) bool: which chosen (active) experts survive. Where the survivors carry
        less than :data:`MIN_SURVIVING_WEIGHT` of the row's weight (none survives, or, at a
        low temperature, only experts whose weights underflowed), the row's most weighted
        one survives too: the survivors' weights are divided by their sum, whose gradient
        is NaN at 0 and overflows near it."""
        kept = torch.rand(weights.shape, device=weights.device, generator=draw_generator()) >= self.expert_dropout
        if active is not None:
            kept &= active
        eligible = weights if active is None else weights.masked_fill(~active, -1.0)
        heaviest = torch.zeros_like(kept).scatter_(1, eligible.argmax(dim=1, keepdim=True), True)
        weightless = (weights * kept).sum(dim=1, keepdim=True) < MIN_SURVIVING_WEIGHT
        return kept | (heaviest & weightless)

    def _balance_loss(self, routing, gates: torch.Tensor, mask: torch.Tensor | None, active,
                      counts: torch.Tensor) -> torch.Tensor:
        loss = BALANCE_LOSSES.get(self.balance_loss)
        if loss is None:  # None, or "aux_free" (a bias update, not a loss)
            return routing.probs.new_zeros(())
        return loss(routing, gates, mask, active, counts)
