"""The constructor parameters shared by :class:`MoERegressor` and :class:`MoEClassifier`:
their constraints (scikit-learn's parameter validation) and their documentation, the body of
both docstrings' ``Parameters`` section."""

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions

from ._net import module_device
from ._tabular import MAX_ONE_HOT_CATEGORIES
from .callbacks import LR_SCHEDULES, TEMPERATURE_SCHEDULES
from .nn import ACTIVATIONS, OVERFLOW_POLICIES, ROUTERS
from .nn.embeddings import NUMERIC_EMBEDDINGS
from .nn.losses import BALANCE_LOSSES, EXPERT_LOSSES
from .nn.moe import EXPERT_TYPES

#: Temperatures the router can divide by in float32: positive normal float32 numbers.
TEMPERATURE_RANGE = (float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max))

PARAMETER_CONSTRAINTS: dict = {
    "n_experts": [Interval(Integral, 1, None, closed="left")],
    "top_k": [Interval(Integral, 1, None, closed="left")],
    "router": [StrOptions(set(ROUTERS))],
    "temperature": [Interval(Real, *TEMPERATURE_RANGE, closed="both")],
    "temperature_final": [None, Interval(Real, *TEMPERATURE_RANGE, closed="both")],
    "temperature_schedule": [StrOptions(set(TEMPERATURE_SCHEDULES))],
    "capacity_factor": [None, Interval(Real, 1, None, closed="left"), StrOptions({"auto"})],
    "balance_loss": [StrOptions(set(BALANCE_LOSSES)), None],
    "balance_coef": [Interval(Real, 0, None, closed="left")],
    "z_loss_coef": [Interval(Real, 0, None, closed="left")],
    "expert_hidden": [tuple, list],
    "shared_expert": ["boolean"],
    "gate_hidden": [tuple, list],
    "expert_dropout": [Interval(Real, 0, 1, closed="left")],
    "capacity_overflow": [StrOptions(set(OVERFLOW_POLICIES))],
    "top_p": [Interval(Real, 0, 1, closed="right")],
    "learned_threshold": ["boolean"],
    "n_groups": [Interval(Integral, 1, None, closed="left")],
    "diversity_coef": [Interval(Real, 0, None, closed="left")],
    "expert_grad_scaling": ["boolean"],
    "collapse_threshold": [None, Interval(Real, 0, 1, closed="neither")],
    "collapse_patience": [Interval(Integral, 1, None, closed="left")],
    "collapse_recovery": ["boolean"],
    "expert_type": [StrOptions(set(EXPERT_TYPES))],
    "expert_loss": [StrOptions(set(EXPERT_LOSSES))],
    "expert_subsample": [Interval(Real, 0, 1, closed="right")],
    "numeric_embedding": [StrOptions(set(NUMERIC_EMBEDDINGS)), None],
    "activation": [StrOptions(set(ACTIVATIONS))],
    "dropout": [Interval(Real, 0, 1, closed="left")],
    "layer_norm": ["boolean"],
    "skip_connections": ["boolean"],
    "max_epochs": [Interval(Integral, 1, None, closed="left")],
    "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
    "learning_rate": [Interval(Real, 0, None, closed="neither")],
    "router_lr_scale": [Interval(Real, 0, None, closed="left")],
    "lr_schedule": [StrOptions(set(LR_SCHEDULES))],
    "weight_decay": [Interval(Real, 0, None, closed="left")],
    "early_stopping": ["boolean"],
    "validation_fraction": [Interval(Real, 0, 1, closed="left")],
    "n_iter_no_change": [Interval(Integral, 1, None, closed="left")],
    "tol": [Interval(Real, 0, None, closed="left")],
    "max_grad_norm": [None, Interval(Real, 0, None, closed="neither")],
    "device": [StrOptions({"auto", "cpu", "cuda"}), str],
    "precision": [StrOptions({"float32", "bf16"})],
    "random_state": ["random_state"],
    "verbose": ["verbose"],
    "warm_start": ["boolean"],
    "callbacks": [None, list, tuple],
    "categorical_features": [StrOptions({"from_dtype"}), None, "array-like"],
    "one_hot_max_categories": [Interval(Integral, 0, MAX_ONE_HOT_CATEGORIES, closed="both"), None],
    "handle_missing": [StrOptions({"native", "error"})],
}


PARAMETERS = """\
    n_experts : int, default=8
        Number of experts. ``n_experts=1`` is a plain MLP (the non-MoE ablation).
    top_k : int, default=2
        At most this many experts per row for the sparse routers; more than ``n_experts``
        means every expert (so that a search over ``n_experts`` down to 1 needs no
        ``top_k`` beside it). Unused by ``router="softmax"`` and ``"uniform"``;
        ``"switch"`` routes one expert per row whatever it is.
    router : {"softmax", "topk", "noisy_topk", "switch", "top_p", "hierarchical", "uniform"}, default="softmax"
        ``"topk"``: each row goes to its ``top_k`` highest-scoring experts, gate weights
        renormalised over them. ``"softmax"``: dense soft mixture, every expert on every row.
        ``"noisy_topk"``: top-k with learned Gaussian noise on the ranking in training
        (Shazeer et al. 2017). ``"switch"``: top-1 with multiplicative input jitter in
        training (Fedus et al. 2021). ``"top_p"``: dynamic k, a row's best experts until
        their probabilities reach ``top_p`` (at most ``top_k``). ``"hierarchical"``: a gate
        over ``n_groups`` groups of experts, then the ``top_k`` best experts of the chosen
        group (at most a group's size); leaf probabilities are products of the two levels'.
        ``"uniform"``: no gate, every expert weighted ``1 / n_experts`` on every row (an
        ensemble; what the gate adds is measured against it). Prediction is noise-free for
        every router.
    temperature : float, default=1.0
        Router softmax temperature (> 0, a normal float32 number: 1.2e-38 to 3.4e38);
        lower is sharper. With ``temperature_final``, the temperature of the first epoch.
    temperature_final : float or None, default=None
        Anneal the router's temperature from ``temperature`` (first epoch) to this value
        (epoch ``max_epochs``), once per epoch, along ``temperature_schedule``; the history
        records it as ``temperature``, and the model predicts with the temperature of the
        epoch whose weights it keeps. A high start lets every expert see rows before the
        gate sharpens. None: constant (a continued fit, ``warm_start`` or ``partial_fit``,
        runs at ``temperature``, whatever temperature the fitted model ended at).
    temperature_schedule : {"cosine", "linear", "exponential"}, default="cosine"
        At training progress ``t`` in [0, 1]: ``"linear"``: ``T0 + (T1 - T0) t``;
        ``"cosine"``: ``T1 + (T0 - T1) (1 + cos(pi t)) / 2``; ``"exponential"``:
        ``T0 (T1 / T0)^t``.
    capacity_factor : float, "auto" or None, default=None
        In training only, cap each expert at ``ceil(capacity_factor * batch * top_k /
        n_experts)`` rows per batch (>= 1); ``None`` is dropless. Sparse routing only: a
        dense router (``"softmax"``, ``"uniform"``, or a top-k one with ``top_k >=
        n_experts``) sends every row to every expert, and nothing is capped. ``"auto"``
        adjusts it to the observed load: dropless in the first epoch, then each epoch the
        90th percentile of the last epoch's per-batch busiest-over-mean load
        (:class:`~sklearn_moe.callbacks.AdaptiveCapacity`; ``history_["capacity_factor"]``).
        Prediction is always dropless and independent of the batch.
    balance_loss : {"switch", "cv2", "aux_free"} or None, default="switch"
        Load-balancing loss: ``"switch"`` (Switch Transformer, 1 at perfect balance for any
        ``top_k``) or ``"cv2"`` (Shazeer et al.'s importance + load squared coefficient of
        variation, 0 at perfect balance; with ``"noisy_topk"`` its load term is the smooth,
        differentiable estimate) or ``"aux_free"`` (DeepSeek-V3: no loss; a per-expert bias
        on expert *selection* moves by ``balance_coef`` after every optimizer step toward
        the under-loaded experts; gate weights are unaffected). Under a dense router
        (``"softmax"``) every expert serves every row: ``"switch"`` is then the constant 1
        and ``"aux_free"`` selects nothing, and only ``"cv2"`` evens out the gate weights.
    balance_coef : float, default=0.01
        Weight of the balance loss (for ``"aux_free"``: the bias step).
    z_loss_coef : float, default=0.001
        Weight of the router z-loss ``mean(logsumexp(logits)^2)``.
    expert_hidden : tuple of int, default=(256, 256)
        Hidden layer sizes of each expert.
    activation : {"relu", "gelu", "silu", "tanh", "leaky_relu", "elu"}, default="relu"
    dropout : float, default=0.1
        Dropout after every hidden activation, in [0, 1).
    layer_norm : bool, default=False
        Layer normalisation before every expert layer after the first.
    skip_connections : bool, default=True
        Residual connections between expert hidden layers of equal width.
    shared_expert : bool, default=False
        Add an always-on expert of the same architecture to every row (DeepSeekMoE).
    gate_hidden : tuple of int, default=()
        Hidden layer sizes of an MLP router; ``()`` is a linear router.
    expert_dropout : float, default=0.0
        In training, drop each of a row's chosen experts with this probability (keeping at
        least one) and renormalise its gate weights; in [0, 1).
    capacity_overflow : {"drop", "reroute"}, default="drop"
        With a ``capacity_factor`` and a sparse router, a row's assignment past an
        expert's capacity: ``"drop"`` falls back to the row's other experts (and the shared
        expert; a row left with none has a zero routed output for that step);
        ``"reroute"`` moves it, with its gate weight, to the row's next-ranked expert that
        still has room.
    top_p : float, default=0.5
        ``router="top_p"``: the probability mass a row's experts must reach, in (0, 1].
    learned_threshold : bool, default=False
        ``router="top_p"``: instead of ``top_p``, learn a per-expert probability threshold
        (straight-through), so how many experts a row uses is learned.
    n_groups : int, default=2
        ``router="hierarchical"``: number of expert groups; more than ``n_experts`` means
        one group per expert (as ``top_k``, so that a search over ``n_experts`` needs no
        ``n_groups`` beside it).
    diversity_coef : float, default=0.0
        Weight of a diversity loss: the mean squared cosine similarity between the experts'
        centred outputs on the first 64 rows of each batch (every expert is run on them).
        Above 0 it pushes experts to respond differently to the same inputs.
    expert_grad_scaling : bool, default=False
        Multiply each expert's gradient by ``mean_load / load_e`` of the batch (at most
        ``n_experts``), so rarely chosen experts learn as fast as busy ones. Sparse routing
        only (under a dense router every expert sees every row).
    collapse_threshold : float in (0, 1) or None, default=0.1
        Collapse detection: an expert whose share of the training routing (of the routed
        rows for a sparse router, of the gate mass for a dense one) stays below this
        fraction of an equal share (``1 / n_experts``) for ``collapse_patience`` epochs in a
        row is starved; when training ends, one :class:`~sklearn_moe.ExpertCollapseWarning`
        names the starved experts. None: no detection.
    collapse_patience : int, default=5
        Epochs an expert must stay starved before the warning (and the recovery).
    collapse_recovery : bool, default=False
        On detected collapse, re-initialise each starved expert as a perturbed copy of the
        busiest one, the two sharing its routing (growth by splitting; see
        :meth:`sklearn_moe.nn.MixtureOfExperts.split_expert`). Not with
        ``router="hierarchical"``, whose group gate would keep the copies starved.
    expert_type : {"adapter", "independent"}, default="adapter"
        ``"independent"``: every expert is an MLP with its own weights. ``"adapter"``: the
        experts share one MLP's weights and differ by their own elementwise scaling of
        every layer's input and output, their own biases and output heads (TabM's
        BatchEnsemble adapters); a row's experts run as extra rows through the shared
        weights, so the cost grows with ``top_k`` (or ``n_experts`` for dense routers)
        but the parameters barely grow with ``n_experts``.
    expert_loss : {"per_expert", "mixture"}, default="per_expert"
        ``"mixture"``: train on the loss of the gated mixture. ``"per_expert"``: every
        chosen expert is trained on its own loss, weighted by its gate weight, and the gate
        on the mixture's loss; prediction is always the gated mixture. Experts trained on
        the loss of their mixture can learn to cancel one another's errors instead of each
        being a good model.
    expert_subsample : float, default=1.0
        With ``expert_loss="per_expert"`` and several experts: the share, in (0, 1], of its
        rows of every batch that each expert trains on, drawn afresh at every step, so that
        the experts see different data (as TabM's members see different batches); the gate
        still learns from every row.
    numeric_embedding : {"piecewise_linear", "periodic"} or None, default="piecewise_linear"
        Embed every input column with more than two distinct values before the router
        and the experts (Gorishniy et al., 2022): ``"piecewise_linear"`` encodes the
        column's quantile bins (48, computed from the training data) and maps them to 16
        values; ``"periodic"`` maps 48 learned frequencies to 24 values. Lets the first
        layer learn step- and wave-like functions of each feature. Binary columns
        (one-hot indicators) pass through unchanged.
    max_epochs : int, default=60
        Most training epochs (passes over the training rows); early stopping may end
        training sooner.
    batch_size : int or "auto", default="auto"
        Rows per optimizer step. ``"auto"`` is about ``n_train / 32`` rounded down to a power
        of 2 and kept within [32, 256]: small data sets get enough steps per epoch.
    learning_rate : float, default=0.002
        AdamW learning rate.
    router_lr_scale : float, default=0.1
        The router's learning rate as a multiple of ``learning_rate`` (>= 0). Below 1 the
        gate moves slower than the experts, so that it learns to weigh experts that are
        already trained instead of committing early to the small differences between
        freshly initialised ones.
    lr_schedule : {"flat_cosine", "cosine", "plateau", "constant"}, default="flat_cosine"
        ``"plateau"``: cut the learning rate 3x when the monitored loss has not improved
        for ``n_iter_no_change // 3`` epochs. ``"cosine"``: decay it to 0 along a cosine
        over ``max_epochs`` (per batch). ``"flat_cosine"``: constant for the first half of
        ``max_epochs``, then the cosine decay. ``"constant"``: never change it. Early
        stopping may end training before the schedule does.
    weight_decay : float, default=0.0003
        AdamW (decoupled) weight decay.
    early_stopping : bool, default=True
        Hold out ``validation_fraction`` of the training rows, stop when the validation loss
        has not improved by ``tol`` (relative) for ``n_iter_no_change`` epochs, and restore the
        best weights. With too few rows for a split the training loss is monitored. When False,
        training stops once the training loss stalls, as in scikit-learn's MLP, and keeps the
        last epoch's weights: on a small table the training loss goes on falling long after
        the model starts to overfit, and a classifier's probabilities grow overconfident.
    validation_fraction : float, default=0.1
        Share of the training rows held out for early stopping, in [0, 1) (stratified by
        class for the classifier, a class of a single row kept in training), drawn from the
        rows of positive ``sample_weight``. 0 holds out none: early stopping then monitors
        the training loss. Unused without early stopping.
    n_iter_no_change : int, default=16
        Epochs without an improvement of the monitored loss (the validation loss, else the
        training loss) by at least ``tol`` after which training stops.
    tol : float, default=0.0001
        Smallest relative decrease of the monitored loss that counts as an improvement.
    max_grad_norm : float or None, default=1.0
        Gradient norm clipping; None disables it.
    device : {"auto", "cpu", "cuda"} or str, default="auto"
        ``"auto"`` uses CUDA when available. ``"cuda:N"`` picks a GPU.
    precision : {"float32", "bf16"}, default="float32"
        ``"bf16"`` runs the experts under bfloat16 autocast in training and prediction
        (mixed precision: weights, router, losses and optimizer stay float32). Worth it on
        GPUs with bf16 tensor cores; on most CPUs it is slower.
    random_state : int, RandomState instance or None, default=None
        Seeds initialisation, shuffling, the validation split and training's random draws
        (dropout, router noise, ...), which come from generators of the fit's own: PyTorch's
        global random state is left as it was. With an int, two fits on the same data and
        CPU, with the same number of PyTorch threads (``torch.get_num_threads()``), give
        identical predictions, also when they run at once in threads.
    verbose : int, default=0
        0 is silent; 1 shows a progress bar and a per-epoch log.
    warm_start : bool, default=False
        Continue training the fitted model instead of starting afresh; the input scaling,
        the table's encoding (its categorical columns and categories, and its missing-value
        indicators: ``categorical_features`` or ``one_hot_max_categories`` changed so that
        they would encode the table otherwise is an error, and ``handle_missing`` only says
        whether a missing value is an error) and the target encoding (scaling, or
        classes) of the first fit are kept, except that a regression target constant in
        the first fit is encoded afresh once it varies. The other hyperparameters take effect where
        they leave the network's weights as they are (``learning_rate``, ``dropout``,
        ``capacity_factor``, ``temperature``, ``device``, ...); changing one that shapes
        the network (``n_experts``, ``expert_hidden``, ...) is an error. Each warm-start
        fit is a run of its own: ``history_`` and ``n_iter_`` hold its epochs, and
        ``temperature_final`` anneals again from ``temperature`` (``partial_fit`` extends
        the history instead).
    callbacks : list of skorch.callbacks.Callback, default=None
        Extra skorch callbacks for every fit (plain instances or ``(name, callback)``
        pairs), run after the built-in ones: loggers such as
        ``skorch.callbacks.TensorBoard`` or ``skorch.callbacks.MlflowLogger``, or your own.
        The instances themselves are used (and initialised) by the training net. They stay
        on the fitted model's ``net_`` when they can be pickled; one that cannot (a logger
        holding an open writer, say) is removed after training with a warning, so that the
        model still pickles. :meth:`save` does not store them. ``fit(callbacks=...)`` adds
        callbacks for one fit only.
    categorical_features : "from_dtype", array-like or None, default="from_dtype"
        The categorical columns, encoded inside the estimator so that a raw DataFrame can be
        fitted as it is. ``"from_dtype"``: a DataFrame's columns of pandas ``category``,
        ``object``, ``string`` and ``bool`` dtypes, except ``object`` columns of numbers
        not all whole (floats, ``Decimal`` from ``pd.read_sql``), which are numeric (whole
        numbers alone, integer codes, stay categorical); or a boolean mask, column indices
        or column names; ``None``: none. A missing value is a category of its own, and a
        category unseen in fit is accepted at prediction, without error. How each column
        is encoded depends on ``one_hot_max_categories``. Date, time and duration columns
        (also pyarrow's, and ``object`` columns of ``datetime`` values) are an error unless
        named here: derive numbers from them (year, day of the week, seconds), or name them
        to treat every timestamp as a category.
    one_hot_max_categories : int or None, default=256
        A categorical column with at most this many categories seen in fit becomes one input
        per category plus one for a missing value (one-hot; a category unseen in fit sets
        none of them); at most 256. A column with more gets a learned embedding:
        8 values per category, trained with the network and shared by the router and every
        expert, with a missing value its own category and every category unseen in fit
        mapped to a reserved all-zero vector. ``0`` embeds every categorical column;
        ``None`` one-hot encodes every one (a column of more than 256 categories is then an
        error). The default one-hot encodes what it can: on the benchmark's tables (columns
        of 9 to 68 categories, ``python -m benchmarks.categorical``) one-hot inputs scored
        better than embeddings past 8 categories on all four.
    handle_missing : {"native", "error"}, default="native"
        Missing numeric values (NaN). ``"native"``: a column with missing values in fit
        gets an indicator input beside it and its missing values the column's median in
        fit; a missing value in a column that had none in fit gets the column's centre
        (at prediction and in a continued fit).
        ``"error"``: NaN in ``X`` is an error.
"""


def check_hyperparameters(estimator) -> str:
    """Validate ``estimator``'s hyperparameters (its ``_parameter_constraints`` and what they
    cannot say: hidden sizes, the device); returns the resolved torch device."""
    estimator._validate_params()
    name = type(estimator).__name__
    for param, constraints in estimator._parameter_constraints.items():
        value = getattr(estimator, param)
        if (isinstance(value, (bool, np.bool_)) and "boolean" not in constraints
                and any(isinstance(constraint, Interval) for constraint in constraints)):
            raise ValueError(f"The '{param}' parameter of {name} is a number; got the bool {value!r} instead.")
    if estimator.collapse_recovery and estimator.router == "hierarchical":
        # As prune_experts and grow_experts: a starved expert's copy stays behind a group
        # gate that does not pick its group.
        raise ValueError(
            f"{name}(collapse_recovery=True) does not support router='hierarchical': a starved expert re-initialised "
            "as a copy of the busiest one stays in its group, which the group gate still does not choose. Use a flat "
            "router, or collapse_recovery=False (the collapse warning still reports it)."
        )
    if estimator.balance_loss == "aux_free" and estimator.router == "hierarchical":
        # The bias reranks experts within the chosen group, but the group gate picks the
        # group unbiased: an unchosen group's biases grow without bound and never win.
        raise ValueError(
            f"{name}(balance_loss='aux_free') does not support router='hierarchical': the selection bias only "
            "reranks the experts of the group the group gate chose, so it cannot move rows between groups. Use "
            "balance_loss='switch' or 'cv2' with the hierarchical router, or a flat router."
        )
    for param in ("expert_hidden", "gate_hidden"):
        hidden = getattr(estimator, param)
        if not all(isinstance(h, Integral) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise ValueError(
                f"The '{param}' parameter of {name} must be a tuple of "
                f"positive ints (hidden layer sizes, e.g. (128, 128)). Got {hidden!r} instead."
            )
    device = module_device(estimator.device)
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(
            f"The 'device' parameter of {name} must be 'cpu', 'cuda', "
            f"'cuda:N' or 'auto'. Got {estimator.device!r} instead."
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device={estimator.device!r} was requested but CUDA is not available on this "
            "machine; use device='cpu' or device='auto'."
        )
    return device

#: The description shared by the estimators' ``partial_fit`` docstrings.
PARTIAL_FIT = """
        One epoch over ``(X, y)``, from the fitted model, or from a new one on the first
        call, as the ``partial_fit`` of scikit-learn's MLP estimators: for data that
        arrives in batches or does not fit in memory at once. The first call fixes the
        input scaling, the table's encoding (its categorical columns and their categories:
        a category first seen in a later call counts as unseen) and the target encoding
        (they are fitted on its rows, so make it representative; a regression target
        constant so far is encoded afresh by the first call whose targets differ); every
        call trains one epoch over its rows in shuffled mini-batches of ``batch_size``, at
        a constant ``learning_rate`` (``lr_schedule`` spans the epochs of one ``fit``),
        without a validation split or early stopping, and AdamW goes on from its running
        averages (fresh after :func:`~sklearn_moe.load`, which stores no optimizer state).
        ``n_iter_`` counts the calls' epochs and ``history_`` holds one row per epoch; a
        ``temperature_final`` anneals over them as over ``fit``'s epochs; ``expert_load_``
        is measured on the last call's rows.
"""


# The Raises entries of fit and partial_fit, after any of their own.
TRAINING_RAISES = """
        TrainingDivergedError
            If the loss or the weights stay non-finite after every rollback to the last
            good epoch at a lower learning rate; the estimator is left as it was before
            the call (unfitted, for a first fit).
        KeyboardInterrupt
            On Ctrl-C during training, raised once the model of the completed epochs is
            whole: it is fitted and predicts, and its message says which weights it kept.
"""
