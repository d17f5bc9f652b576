"""Training: the network and everything skorch, apart from the estimators.

:func:`build_module` builds the network the hyperparameters describe; :func:`train` builds
the training net for it (optimizer, callbacks, validation split), runs it and cleans it up;
:func:`build_net` builds that net alone. A fit and a loaded model (:mod:`.persistence`)
both go through :func:`build_module` and :func:`build_net`. Each reads the hyperparameters
from ``params``, the estimator.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import torch
from skorch.callbacks import EarlyStopping, GradientNormClipping, LRScheduler, ProgressBar
from skorch.history import History

from ._data import TensorTable
from ._net import (
    MoENet,
    PredefinedSplit,
    drop_callbacks,
    drop_unpicklable_callbacks,
    interruption_message,
    named_callbacks,
)
from ._tabular import category_cardinalities
from .callbacks import (
    AdaptiveCapacity,
    AuxFreeBalancing,
    CollapseMonitor,
    EpochLine,
    ExpertGradientNorms,
    LearningRateShape,
    RoutingMetrics,
    StepTimes,
    TemperatureAnnealing,
)
from .distributed.callbacks import EpochAgreement, GradientAveraging, ShardedGradientClipping
from .distributed.data_parallel import active_group, shard_for_training, whole_after_training
from .distributed.validation import shard_validation
from .nn import MixtureOfExperts
from .nn._locks import ForkSafeLock


def _silent(*args, **kwargs):
    pass


# The fit-only callbacks of a data-parallel fit (sklearn_moe.distributed.callbacks).
DATA_PARALLEL_CALLBACKS = ("data_parallel", "data_parallel_epoch", "data_parallel_clipping")
#: Hyperparameters that MixtureOfExperts takes as they are, under the same names.
_MODULE_PARAMETERS = ("router", "activation", "dropout", "layer_norm", "skip_connections", "temperature",
                      "balance_loss", "shared_expert", "expert_dropout", "capacity_overflow",
                      "top_p", "learned_threshold", "expert_grad_scaling", "expert_type")


def zero_untrained_categories(module: MixtureOfExperts, table: TensorTable) -> None:
    """Zero the learned vectors of the categories (and missing values) that no row of
    ``table`` of positive weight holds, which training would leave at their random initial
    values: they then read as an unseen category does (see
    :meth:`~sklearn_moe.nn.CategoricalEmbedding.zero_unused`)."""
    embedding = module.category_embedding
    if embedding is None:
        return
    # The code columns first, then the rows: selecting rows of the whole table would copy it.
    codes = table.X[:, table.X.shape[1] - embedding.n_columns:]
    embedding.zero_unused(codes if table.sample_weight is None else codes[table.sample_weight > 0])


def build_module(params, n_features: int, device, layout=None, bins=None) -> MixtureOfExperts:
    """The network the hyperparameters of ``params`` describe, for its fitted outputs.

    Parameters
    ----------
    params : BaseMoE
        The estimator: its hyperparameters, and ``_n_outputs`` from its target encoding.
    n_features : int
    device : str or torch.device
    layout : tuple (columns, n_bins) of int arrays, optional
        The numeric embedding's columns and bin counts; default: the fitted ones
        (``_embedding_columns``, ``_embedding_n_bins``).
    bins : list of Tensor, optional
        The piecewise-linear embedding's bin edges; default: placeholders, to be loaded with
        ``load_state_dict``.
    """
    columns, n_bins = layout if layout is not None else (params._embedding_columns, params._embedding_n_bins)
    embedding = params.numeric_embedding if len(columns) else None
    with float32_by_default():
        return MixtureOfExperts(
            n_features=n_features,
            n_outputs=params._n_outputs,
            n_experts=params.n_experts,
            top_k=min(params.top_k, params.n_experts),  # so n_experts=1 needs no top_k=1 beside it
            expert_hidden=tuple(params.expert_hidden),
            gate_hidden=tuple(params.gate_hidden),
            n_groups=min(params.n_groups, params.n_experts),
            diversity_loss=params.diversity_coef > 0,
            numeric_embedding=embedding,
            embedding_columns=columns.tolist() if embedding else None,
            embedding_bins=bins,
            embedding_n_bins=n_bins.tolist() if embedding == "piecewise_linear" and bins is None else None,
            category_cardinalities=category_cardinalities(params),
            capacity_factor=None if params.capacity_factor == "auto" else params.capacity_factor,
            output=params._module_output(),
            **{name: getattr(params, name) for name in _MODULE_PARAMETERS},
        ).to(device)


@contextlib.contextmanager
def float32_by_default():
    """torch's default dtype float32 within the block (built so, a network's initial weights
    are the same whatever the user's default dtype); as before after it. The default dtype is
    the process's: it changes only where the user made it other than float32."""
    previous = torch.get_default_dtype()
    if previous == torch.float32:
        yield
        return
    with _DEFAULT_GENERATORS_LOCK:
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


# torch's default generators are one per process and device: building a network draws its
# weights from them, which a fit seeds. One such block at a time, so that blocks running at
# once in threads neither draw from each other's seeded generators nor leave one seeded.
_DEFAULT_GENERATORS_LOCK = ForkSafeLock()


@contextlib.contextmanager
def default_generators_seeded(seed: int | None, device="cpu"):
    """Within the block, torch's default generator of the CPU, and of ``device`` where it is
    a CUDA device, seeded with ``seed`` (``None``: left as they are); after it, as they were
    before. No other such block runs meanwhile."""
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with _DEFAULT_GENERATORS_LOCK, torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.default_generator.manual_seed(seed)
            for index in cuda:  # not torch.manual_seed, which seeds every GPU
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
        yield


def train(params, module, device: str, train_table: TensorTable, valid_table: TensorTable | None,
          generator: torch.Generator, extra_callbacks=(), epochs: int | None = None,
          optimizer_state: dict | None = None, history=None) -> MoENet:
    """Train ``module`` on ``train_table`` (early stopping on ``valid_table`` when given).

    Returns the trained net, ready to keep on a fitted estimator: the module in eval mode,
    the fit-only ``extra_callbacks`` removed, no validation rows or early-stopping weight
    copies kept. After a KeyboardInterrupt, the net's ``interrupted_`` is the message that says
    which weights it kept (False otherwise), for the caller to raise once its model is whole.
    ``epochs``: how many to train (default ``params.max_epochs``). With an
    ``optimizer_state`` (the ``state_dict()`` of an optimizer of the same network), the
    optimizer goes on from its running averages, at the learning rates and weight decay of
    ``params``; with a ``history`` (an earlier net's), the epochs go on after its epochs
    (numbered on, and the temperature annealed on).
    """
    trained = shard_for_training(module)  # module itself unless its experts are sharded
    net = build_net(params, trained, device, len(train_table), valid_table, generator, extra_callbacks)
    net.initialize()
    if optimizer_state is not None:
        _load_optimizer_state(net.optimizer_, optimizer_state)
    if history is not None:
        net.history = History([dict(epoch) for epoch in history])
    try:
        net.fit(train_table, y=None, epochs=epochs)
    except BaseException:
        monitor = dict(net.callbacks_).get("collapse")
        if monitor is not None:  # skorch calls no on_train_end for a failed fit; starved experts may be why
            monitor.warn_of_starved_experts()
        raise
    if net.history and "train_loss" not in net.history[-1]:  # an epoch a KeyboardInterrupt cut short
        del net.history[-1]
    trained.eval()
    if trained is not module:  # every process gets the whole network, and an optimizer for it
        net.module_ = whole_after_training(trained, module)
        net.initialize_optimizer()
    drop_callbacks(net, {name for name, _ in extra_callbacks} | set(DATA_PARALLEL_CALLBACKS))
    drop_unpicklable_callbacks(net, {name for name, _ in named_callbacks(params.callbacks, "callback")})
    if net.interrupted_:
        net.interrupted_ = interruption_message(net)
    net.train_split = None  # don't keep (and pickle) the validation rows
    for name, callback in net.callbacks_:
        # Copies of the weights and of the optimizer that a pickle would carry twice; the next
        # fit makes them anew (skorch's LRScheduler builds its scheduler at every train start).
        # A user's own scheduler callback keeps its scheduler, which they may read.
        if isinstance(callback, EarlyStopping):
            callback.best_model_weights_ = None
        elif isinstance(callback, LRScheduler) and name == "lr_scheduler":
            callback.lr_scheduler_ = None
    return net


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load ``state``'s per-parameter state (AdamW's moments and step counts) into
    ``optimizer``, keeping ``optimizer``'s hyperparameters (learning rates, weight decay):
    a schedule may have left the stored ones anywhere."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, setting in zip(optimizer.param_groups, settings):
        # A scheduler resuming after earlier epochs starts from initial_lr (a stored one may
        # be stale): the current rate.
        group.update(setting, initial_lr=setting["lr"])


class PartialFitSettings:
    """The hyperparameters of an estimator for a ``partial_fit`` epoch: those of
    ``estimator``, but no early stopping and a constant learning rate (a schedule spans the
    epochs of one fit)."""

    early_stopping = False
    lr_schedule = "constant"

    def __init__(self, estimator):
        self._estimator = estimator

    def __getattr__(self, name):
        return getattr(self._estimator, name)


def build_net(params, module, device: str, n_train: int, valid_table: TensorTable | None = None,
              generator: torch.Generator | None = None, extra_callbacks=()) -> MoENet:
    """The skorch net that trains ``module`` on ``n_train`` rows (early stopping on
    ``valid_table`` when given) with the hyperparameters of ``params``."""
    has_valid = valid_table is not None
    monitor = "valid_loss" if has_valid else "train_loss"
    sink = print if params.verbose else _silent
    parallel = active_group()
    # Data-parallel: each process's batch is its share of the single-process one.
    world_size = 1 if parallel is None else parallel.world_size
    expert_parallel = parallel is not None and parallel.expert_parallel
    size = max(1, batch_size(params.batch_size, n_train * world_size) // world_size)
    callbacks = [
        # the gradients averaged before anything reads them
        *([("data_parallel", GradientAveraging(parallel))] if parallel is not None else []),
        ("routing", RoutingMetrics()),
        ("expert_grad_norm", ExpertGradientNorms()),
        ("step_times", StepTimes()),
        # after the metrics are recorded, before anything acts on them
        *([("data_parallel_epoch", EpochAgreement(parallel))] if parallel is not None else []),
        ("lr_scheduler", _lr_scheduler(params, monitor, n_train, size)),
        ("early_stopping", EarlyStopping(
            monitor=monitor, patience=params.n_iter_no_change, threshold=params.tol,
            threshold_mode="rel", load_best=params.early_stopping, sink=sink)),
    ]
    if params.max_grad_norm is not None and expert_parallel:
        callbacks.append(("data_parallel_clipping", ShardedGradientClipping(parallel, params.max_grad_norm)))
    elif params.max_grad_norm is not None:
        callbacks.append(("gradient_clipping", GradientNormClipping(params.max_grad_norm)))
    if params.capacity_factor == "auto" and not module.router.is_dense:  # a dense router caps nothing
        callbacks.append(("capacity", AdaptiveCapacity()))
    if params.temperature_final is not None:
        callbacks.append(("temperature", TemperatureAnnealing(params.temperature, params.temperature_final,
                                                              params.temperature_schedule, params.max_epochs)))
    if params.collapse_threshold is not None:
        callbacks.append(("collapse", CollapseMonitor(params.collapse_threshold, params.collapse_patience,
                                                      params.collapse_recovery)))
    if params.balance_loss == "aux_free":
        callbacks.append(("aux_free_balancing", AuxFreeBalancing(params.balance_coef)))
    if params.verbose:
        callbacks += [("progress_bar", ProgressBar()), ("epoch_line", EpochLine())]
    callbacks.extend(named_callbacks(params.callbacks, "callback"))
    callbacks.extend(extra_callbacks)
    # Data-parallel: each process evaluates its share of the validation rows, unless
    # callbacks of the user's own may score them (see distributed.validation).
    valid_rows = shard_validation(valid_table, size, whole=bool(params.callbacks or extra_callbacks))
    return MoENet(
        module,
        criterion=params._criterion(),
        optimizer=torch.optim.AdamW,
        lr=params.learning_rate,
        optimizer__weight_decay=params.weight_decay,
        optimizer__fused=True,
        optimizer__param_groups=[("router.*", {"lr": params.learning_rate * params.router_lr_scale})],
        max_epochs=params.max_epochs,
        batch_size=size,
        train_split=PredefinedSplit(valid_rows) if has_valid else None,
        callbacks=callbacks,
        device=device,
        verbose=int(params.verbose),
        callbacks__print_log=None,  # EpochLine prints instead: the metrics' lists make a table unreadable
        use_caching=False,  # scoring callbacks predict (see MoENet.get_dataset)
        warm_start=True,
        balance_coef=params.balance_coef,
        z_loss_coef=params.z_loss_coef,
        diversity_coef=params.diversity_coef,
        autocast_dtype=torch.bfloat16 if params.precision == "bf16" else None,
        shuffle_generator=generator,
        expert_loss=params.expert_loss,
        # With one expert there is nothing to diversify: it trains on every row.
        expert_subsample=params.expert_subsample if params.n_experts > 1 else 1.0,
    )


def rebuilt_module(params, state: dict, device) -> MixtureOfExperts:
    """The fitted network of ``params`` (its hyperparameters and fitted encodings) with the
    weights ``state``, in eval mode; building it leaves the caller's random state alone."""
    with default_generators_seeded(None, device):  # building initialises weights before the load
        module = build_module(params, params._x_mean.shape[0], device)
    module.load_state_dict(state, strict=True)
    return module.eval()


def fitted_net(params, module, device, batch_size: int, history_records) -> MoENet:
    """The net a fitted estimator keeps around a trained ``module``: it predicts and holds
    the history (a warm start trains a new one)."""
    net = build_net(params, module, device, batch_size)
    net.initialize()  # keeps the given module instance and its weights
    net.batch_size = batch_size
    net.history = History([{"batches": [], **epoch} for epoch in history_records])
    return net


def history_frame(history) -> pd.DataFrame:
    """The net's per-epoch history as a DataFrame (without the per-batch records)."""
    rows = [{key: value for key, value in epoch.items() if key != "batches"} for epoch in history]
    frame = pd.DataFrame(rows)
    # Plain object column labels: pandas' default string dtype is pyarrow-backed where
    # pyarrow is installed, and a pickle holding it would not load where it is not.
    frame.columns = pd.Index(frame.columns.tolist(), dtype=object)
    if "epoch" not in frame:
        return frame
    # Rows labelled by epoch, the index unnamed: an index named as a column makes
    # reset_index and groupby("epoch") ambiguous.
    return frame.set_index(pd.Index(frame["epoch"].to_numpy(), name=None))


def batch_size(setting, n_train: int) -> int:
    """Rows per optimizer step: ``setting`` (at most ``n_train``), or for ``"auto"`` about
    ``n_train / 32`` rounded down to a power of 2, within [32, 256], so that small data sets
    still get enough optimizer steps per epoch."""
    if setting == "auto":
        size = 2 ** int(np.floor(np.log2(max(n_train / 32, 1))))
        return int(min(n_train, min(256, max(32, size))))
    return min(setting, n_train)


def _lr_scheduler(params, monitor: str, n_train: int, size: int) -> LRScheduler:
    if params.lr_schedule == "plateau":
        return LRScheduler(policy="ReduceLROnPlateau", monitor=monitor, mode="min", factor=0.3,
                           patience=max(1, params.n_iter_no_change // 3), threshold=params.tol)
    steps = params.max_epochs * max(1, -(-n_train // size))
    return LRScheduler(policy=torch.optim.lr_scheduler.LambdaLR, step_every="batch",
                       lr_lambda=LearningRateShape(params.lr_schedule, steps))
