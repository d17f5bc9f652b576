"""BaseMoE: hyperparameters, validation and the fit/predict plumbing shared by the estimators."""

from __future__ import annotations

import difflib

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted, validate_data

from ._data import TensorTable
from ._expert_methods import ExpertMethods
from ._guard import warn_if_not_learned
from ._net import named_callbacks
from ._parameters import PARAMETER_CONSTRAINTS, check_hyperparameters
from ._scaling import fit_robust_scaler, scale_features
from ._tabular import TABLE_STATE, encode_for_fit, encode_for_predict, is_encoded, n_code_columns
from ._training import (
    PartialFitSettings,
    build_module,
    default_generators_seeded,
    float32_by_default,
    history_frame,
    rebuilt_module,
    train,
    zero_untrained_categories,
)
from ._validation import as_pandas, relative_sample_weight, validate_input
from .diagnostics import expert_utilization
from .distributed.data_parallel import agree_on_seeds, check_backend, check_same_data, shard_rows
from .nn import MixtureOfExperts
from .nn._random import drawing_from
from .nn.embeddings import fit_embedding_layout
from .nn.losses import mean_per_row

#: Values of the constant prediction's expanded output per chunk of rows
#: (:meth:`BaseMoE._measured_constant_loss`).
_CONSTANT_LOSS_VALUES = 1 << 22

# Prediction runs in chunks of rows that hold about this many values at the module's widest
# step (``MixtureOfExperts.values_per_row``), within these row bounds: a wide table's
# numeric embedding holds dozens of values per input value, which in chunks of the
# largest size would take gigabytes.
_CHUNK_VALUES = 1 << 22
_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS = 256, 16384
_MIN_VALIDATION_ROWS = 2


class BaseMoE(ExpertMethods, BaseEstimator):
    """Shared implementation of :class:`MoERegressor` and :class:`MoEClassifier`.

    Subclasses provide ``_encode_targets`` (the training targets and the fitted target
    encoding, ``_n_outputs`` included), ``_criterion``, their ``_fitted_attributes`` and
    the public prediction methods.
    """

    #: Every attribute a fit sets (the subclasses add their target encoding's): clearing a
    #: failed fit and persistence (all but ``net_``, ``history_``, ``_encoding_parameters``
    #: and the optional ``feature_names_in_``, which it stores its own way) use this list.
    _fitted_attributes: tuple = ("net_", "n_iter_", "history_", "expert_load_", "n_features_in_",
                                 "feature_names_in_", "_x_mean", "_x_scale", "_n_outputs", "_embedding_columns",
                                 "_embedding_n_bins", *TABLE_STATE, "_encoding_parameters")

    #: The fitted target encoding: a continued fit that fails restores it.
    _target_encoding: tuple = ()

    _parameter_constraints: dict = PARAMETER_CONSTRAINTS

    def __init__(
        self,
        *,
        n_experts=8,
        top_k=2,
        router="softmax",
        temperature=1.0,
        temperature_final=None,
        temperature_schedule="cosine",
        capacity_factor=None,
        balance_loss="switch",
        balance_coef=1e-2,
        z_loss_coef=1e-3,
        expert_hidden=(256, 256),
        activation="relu",
        dropout=0.1,
        layer_norm=False,
        skip_connections=True,
        shared_expert=False,
        gate_hidden=(),
        expert_dropout=0.0,
        capacity_overflow="drop",
        top_p=0.5,
        learned_threshold=False,
        n_groups=2,
        diversity_coef=0.0,
        expert_grad_scaling=False,
        collapse_threshold=0.1,
        collapse_patience=5,
        collapse_recovery=False,
        expert_type="adapter",
        expert_loss="per_expert",
        expert_subsample=1.0,
        numeric_embedding="piecewise_linear",
        max_epochs=60,
        batch_size="auto",
        learning_rate=2e-3,
        router_lr_scale=0.1,
        lr_schedule="flat_cosine",
        weight_decay=3e-4,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=16,
        tol=1e-4,
        max_grad_norm=1.0,
        device="auto",
        precision="float32",
        random_state=None,
        verbose=0,
        warm_start=False,
        callbacks=None,
        categorical_features="from_dtype",
        one_hot_max_categories=256,
        handle_missing="native",
    ):
        self.n_experts = n_experts
        self.top_k = top_k
        self.router = router
        self.temperature = temperature
        self.temperature_final = temperature_final
        self.temperature_schedule = temperature_schedule
        self.capacity_factor = capacity_factor
        self.balance_loss = balance_loss
        self.balance_coef = balance_coef
        self.z_loss_coef = z_loss_coef
        self.expert_hidden = expert_hidden
        self.activation = activation
        self.dropout = dropout
        self.layer_norm = layer_norm
        self.skip_connections = skip_connections
        self.shared_expert = shared_expert
        self.gate_hidden = gate_hidden
        self.expert_dropout = expert_dropout
        self.capacity_overflow = capacity_overflow
        self.top_p = top_p
        self.learned_threshold = learned_threshold
        self.n_groups = n_groups
        self.diversity_coef = diversity_coef
        self.expert_grad_scaling = expert_grad_scaling
        self.collapse_threshold = collapse_threshold
        self.collapse_patience = collapse_patience
        self.collapse_recovery = collapse_recovery
        self.expert_type = expert_type
        self.expert_loss = expert_loss
        self.expert_subsample = expert_subsample
        self.numeric_embedding = numeric_embedding
        self.max_epochs = max_epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.router_lr_scale = router_lr_scale
        self.lr_schedule = lr_schedule
        self.weight_decay = weight_decay
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.max_grad_norm = max_grad_norm
        self.device = device
        self.precision = precision
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.callbacks = callbacks
        self.categorical_features = categorical_features
        self.one_hot_max_categories = one_hot_max_categories
        self.handle_missing = handle_missing

    @classmethod
    def _refuse_unknown_parameters(cls, params: dict) -> None:
        """The TypeError of a keyword that is none of the estimator's parameters, naming the
        estimator called (not this base class) and the parameters spelt most alike."""
        # A subclass of ours whose own __init__ passes **params on names only its own.
        known = sorted(set().union(*(klass._get_param_names() for klass in cls.__mro__ if issubclass(klass, BaseMoE))))
        for name in params:
            if name not in known:
                alike = difflib.get_close_matches(name, known, n=3)
                hint = f"; did you mean {' or '.join(map(repr, alike))}?" if alike else "."
                raise TypeError(f"{cls.__name__}.__init__() got an unexpected keyword argument {name!r}{hint}")

    # ------------------------------------------------------------------ validation
    def _validate_X(self, X, y="no_validation", reset=False, **kwargs):
        """``validate_data`` with clearer errors (see :func:`validate_input`)."""
        return validate_input(self, X, y, reset=reset, **kwargs)

    # ------------------------------------------------------------------ fitting
    def _fit(self, X, y, sample_weight=None, callbacks=None, partial=False, classes=None):
        reuse = (self.warm_start or partial) and self.__sklearn_is_fitted__()
        named_callbacks(self.callbacks, "callback")  # a clear error before any work
        extra_callbacks = named_callbacks(callbacks)
        # A continued fit may re-encode the target (a regressor's constant target that now
        # varies), and its input check takes the columns' names off before it checks y.
        kept = (*self._target_encoding, "n_features_in_", "feature_names_in_")
        before = {name: vars(self)[name] for name in kept if name in vars(self)}
        try:
            # Training needs autograd, also when fit is called under torch.no_grad() or
            # torch.inference_mode() (say, inside a user's evaluation loop).
            with torch.inference_mode(False), torch.enable_grad():
                self._fit_unguarded(X, y, sample_weight, reuse, extra_callbacks, partial, classes)
        except BaseException:
            # A failed fit leaves the estimator unfitted, never half fitted; a failed
            # continued fit restores what it may have changed.
            if not reuse:
                self._clear_fitted_state()
            else:
                for name in kept:
                    vars(self).pop(name, None)
                vars(self).update(before)
            raise
        if self.net_.interrupted_:
            # Ctrl-C: the model of the epochs so far is whole and predicts; the interrupt goes
            # on to what called fit (a loop, cross-validation, a search), which stops too.
            raise KeyboardInterrupt(self.net_.interrupted_)
        return self

    def _partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over ``(X, y)`` from the fitted model, or from a new one (see
        ``partial_fit``)."""
        return self._fit(X, y, sample_weight, partial=True, classes=classes)

    def _fit_unguarded(self, X, y, sample_weight, reuse, extra_callbacks=(), partial=False, classes=None):
        device = check_hyperparameters(self)
        check_backend(device)
        X, raw = encode_for_fit(self, as_pandas(X), reuse)
        # An encoded table's matrix is validated as a new one (its columns are not the
        # raw table's); the estimator then takes the raw table's columns, or, continuing a
        # fit, keeps its own (encode_for_fit checked the table against them).
        fitted_columns = {name: vars(self)[name] for name in ("n_features_in_", "feature_names_in_")
                          if name in vars(self)}
        # A continued fit reads missing values as prediction does; a first fit has encoded them.
        X, y = self._validate_X(X, y, reset=not reuse or raw is not None, **self._target_validation_kwargs(),
                                ensure_all_finite=self._new_missing_allowed() if reuse else True)
        if raw is not None and reuse:
            vars(self).pop("feature_names_in_", None)
            vars(self).update(fitted_columns)
        elif raw is not None:
            validate_data(self, raw, reset=True, skip_check_array=True)
        if sample_weight is not None:
            sample_weight = relative_sample_weight(sample_weight, X)
        targets, target_encoding = self._encode_targets(y, sample_weight, reset=not reuse, classes=classes,
                                                        partial=partial)
        vars(self).update(target_encoding)
        if reuse:
            x_mean, x_scale = self._x_mean, self._x_scale
        else:
            # A column constant in fit carries nothing the model could learn from: prediction
            # ignores what it holds later, as the network never saw it vary. partial_fit's
            # first call keeps it (scale 1), since its later calls may vary it.
            x_mean, x_scale = fit_robust_scaler(X, sample_weight, n_code_columns(self),
                                                constant_scale=1.0 if partial else np.inf)
        X_scaled = np.nan_to_num(scale_features(X, x_mean, x_scale, n_code_columns(self)), copy=False)
        # Training reads the scaled float32 copy only: the validated (float64) matrix, twice
        # its size, is not kept alive through the epochs.
        n_features = X.shape[1]
        del X

        rng = check_random_state(self.random_state)
        seeds = tuple(int(s) for s in rng.randint(0, 2**31 - 1, size=3))
        if partial and reuse:  # every call its own batches and dropout masks, reproducibly
            seeds = tuple(int(np.random.SeedSequence([seed, self.n_iter_]).generate_state(1)[0] >> 1) for seed in seeds)
        init_seed, shuffle_seed, split_seed = agree_on_seeds(seeds)
        check_same_data(X_scaled, targets)
        layout, bins = (None, None) if reuse else self._embedding_layout(X_scaled, init_seed)
        weights = None
        loss_weight = self._loss_weight(targets, sample_weight, partial)
        if loss_weight is not None:
            weights = torch.as_tensor(loss_weight / loss_weight.mean(), dtype=torch.float32, device=device)
        table = TensorTable(torch.as_tensor(X_scaled, device=device), torch.as_tensor(targets, device=device), weights)
        train_table, valid_table = (table, None) if partial else self._split(table, targets, split_seed)
        unsharded_train_table = train_table  # every process's training rows
        shard = shard_rows(len(train_table))  # data-parallel: this process's training rows
        if shard is not None:
            train_table = train_table.subset(torch.as_tensor(shard, device=device))

        generator = torch.Generator()
        generator.manual_seed(shuffle_seed)
        # Training's own draws (dropout, noise, ...) come from a generator of this fit's, so
        # that fits running at once in threads give what they give one at a time.
        draws = torch.Generator(device).manual_seed(int(np.random.SeedSequence([init_seed, 1]).generate_state(1)[0]))
        continued = self.net_ if partial and reuse else None  # its optimizer's state and history go on
        with default_generators_seeded(init_seed, device):
            module = self._warm_module(device) if reuse else build_module(self, n_features, device, layout, bins)
        if not reuse:
            zero_untrained_categories(module, unsharded_train_table)
        with drawing_from(draws):
            net = train(PartialFitSettings(self) if partial else self, module, device, train_table, valid_table,
                        generator, extra_callbacks, epochs=1 if partial else None,
                        optimizer_state=None if continued is None else continued.optimizer_.state_dict(),
                        history=None if continued is None else continued.history)

        self._x_mean, self._x_scale = x_mean, x_scale
        if not reuse:
            self._embedding_columns, self._embedding_n_bins = layout
        self.net_ = net
        self.n_iter_ = len(net.history)
        self.history_ = history_frame(net.history)
        self._after_training(valid_table)
        self.expert_load_ = self._expert_load(table.X)
        # Last: a warning raised as an error leaves the fitted model whole.
        scored = train_table if valid_table is None else valid_table
        warn_if_not_learned(self.history_, valid_table is not None, self._constant_prediction_loss(train_table, scored),
                            self)
        return self

    def _warm_module(self, device: str):
        """The fitted network for a warm start: rebuilt from the current hyperparameters, with
        the fitted weights. Every hyperparameter that leaves the weights' shapes alone (dropout,
        the router's kind among those of the same weights, capacity, the device, ...) takes
        effect; one that changes them cannot, and is an error rather than silently ignored."""
        try:
            module = rebuilt_module(self, self.module_.state_dict(), device)
        except RuntimeError as error:  # load_state_dict: missing, unexpected or misshapen weights
            detail = " ".join(str(error).split())
            raise ValueError(
                "Continuing the fitted model (warm_start or partial_fit): the hyperparameters now describe another "
                "network than the fitted one, whose weights do not fit it; a parameter that shapes the network "
                "(n_experts, expert_hidden, expert_type, gate_hidden, shared_expert, layer_norm, numeric_embedding, "
                "output, a router with other weights, ...) cannot change in a continued fit. Set it back, or set "
                f"warm_start=False and call fit to start afresh. ({detail[:400]})"
            ) from error
        if self.temperature_final is None:
            # The weights' state holds the temperature they were trained at (annealed, or
            # an earlier ``temperature``); a continued fit without annealing runs at the
            # current parameter's. (Annealing sets it every epoch.)
            module.router.temperature.fill_(float(self.temperature))
        return module

    def _constant_prediction_loss(self, train: TensorTable, scored: TensorTable) -> float:
        """The yardstick of :func:`~._guard.warn_if_not_learned`, in the history's units: the
        task loss on ``scored`` (with its weights) of the best constant prediction on
        ``train``, but at least an uninformed prediction's (:meth:`_uninformed_loss`, times
        the scored rows' mean weight). A constant can predict some rows all but exactly (a
        constant target, a batch of one class), where a model that learned still has a
        loss."""
        weights = scored.sample_weight
        floor = self._uninformed_loss() * (1.0 if weights is None else float(weights.mean()))
        return max(self._measured_constant_loss(train, scored), floor)

    def _measured_constant_loss(self, train: TensorTable, scored: TensorTable) -> float:
        """The task loss on ``scored`` (with its weights) of the best constant prediction on
        ``train``."""
        constant = self._constant_output(train.y, train.sample_weight)
        weights, total = scored.sample_weight, 0.0
        # In chunks of rows: the constant expanded over many rows and classes is large.
        rows = max(1, _CONSTANT_LOSS_VALUES // self._n_outputs)
        for start in range(0, len(scored), rows):
            chunk = slice(start, start + rows)
            per_row = self._constant_loss_per_row(constant, scored.y[chunk])
            total += float(per_row.sum() if weights is None else (per_row * weights[chunk]).sum())
        return total / max(len(scored), 1)

    def _constant_output(self, targets: torch.Tensor, weights: torch.Tensor | None):
        """The network output (one row) that is the best constant prediction of ``targets``."""
        raise NotImplementedError

    def _constant_loss_per_row(self, constant, targets: torch.Tensor) -> torch.Tensor:
        """The task loss of each of ``targets``' rows under the ``constant`` prediction."""
        return mean_per_row(self._criterion()(constant.expand(len(targets), -1), targets))

    def _uninformed_loss(self) -> float:
        """The task loss of an uninformed prediction on an average row (the standardised
        target's mean, uniform probabilities)."""
        raise NotImplementedError

    def _after_training(self, valid_table) -> None:
        """Fit what is fitted on the validation rows (``None`` without) once training ends."""

    def _loss_weight(self, targets, sample_weight, partial=False):
        """The rows' weights in the loss (None: equal): ``sample_weight``, which a
        subclass may combine with weights of its own (the classifier's ``class_weight``)."""
        return sample_weight

    def _split(self, table, targets, seed):
        """Hold out ``validation_fraction`` of the rows of positive weight for early
        stopping, when enough. Rows of weight 0 stay in training, where they count for
        nothing either: held out, they would make the validation loss 0 at every epoch
        where they are all the validation rows, and the first epoch the best."""
        positive = (np.ones(len(table), dtype=bool) if table.sample_weight is None
                    else table.sample_weight.cpu().numpy() > 0)
        weighted = np.flatnonzero(positive)
        n = len(weighted)
        n_valid = int(self.validation_fraction * n)
        if not self.early_stopping or n_valid < _MIN_VALIDATION_ROWS or n - n_valid < 1:
            return table, None
        order = weighted[self._split_order(targets[weighted], n_valid, np.random.RandomState(seed))]
        order = np.concatenate([order, np.flatnonzero(~positive)])
        index = torch.as_tensor(order, device=table.X.device)
        return table.subset(index[n_valid:]), table.subset(index[:n_valid])

    def _split_order(self, targets, n_valid, rng):
        """A permutation whose first ``n_valid`` rows form the validation set."""
        return rng.permutation(len(targets))

    def _embedding_layout(self, X_scaled: np.ndarray, seed: int):
        """``((columns, n_bins), bins)`` of the numeric embedding (see :func:`fit_embedding_layout`)."""
        numeric = X_scaled[:, :X_scaled.shape[1] - n_code_columns(self)]  # not the category codes
        X = torch.from_numpy(np.ascontiguousarray(numeric, dtype=np.float32))
        with float32_by_default():  # (rtdl_num_embeddings' quantiles are of the default dtype's levels)
            columns, n_bins, bins = fit_embedding_layout(X, self.numeric_embedding, torch.Generator().manual_seed(seed))
        return (np.asarray(columns, dtype=np.int64), np.asarray(n_bins, dtype=np.int64)), bins

    def _expert_load(self, X_scaled: torch.Tensor) -> np.ndarray:
        gates = self._gates(X_scaled)
        if self.module_.router.is_dense:
            load = gates.mean(axis=0)
            return load / load.sum()  # exactly 1 in float64, not up to float32 rounding
        return expert_utilization((gates > 0).sum(axis=0))

    def _clear_fitted_state(self):
        for name in self._fitted_attributes:
            self.__dict__.pop(name, None)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = True  # densified, up to a size limit
        tags.input_tags.allow_nan = self.handle_missing == "native"
        tags.input_tags.categorical = True
        return tags

    # ------------------------------------------------------------------ prediction
    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "net_")

    @property
    def module_(self) -> MixtureOfExperts:
        """The fitted :class:`~sklearn_moe.nn.MixtureOfExperts` (``net_.module_``)."""
        return self.net_.module_

    def _scaled_input(self, X) -> torch.Tensor:
        if not self.__sklearn_is_fitted__():
            check_is_fitted(self)  # raises NotFittedError with scikit-learn's message
        if self._is_plain_valid_input(X):
            return torch.as_tensor(scale_features(X, self._x_mean, self._x_scale), device=self.net_.device)
        X = as_pandas(X)
        if is_encoded(self):
            X = encode_for_predict(self, X)
        else:
            X = self._validate_X(X, reset=False, ensure_all_finite=self._new_missing_allowed())
        X_scaled = scale_features(X, self._x_mean, self._x_scale, n_code_columns(self))
        # a missing value in a column that had none in fit: the column's centre
        return torch.as_tensor(np.nan_to_num(X_scaled, copy=False), device=self.net_.device)

    def _new_missing_allowed(self):
        """``validate_data``'s ``ensure_all_finite`` for the input of a fitted model, where a
        missing value in a column that had none in fit becomes the column's centre."""
        return "allow-nan" if self.handle_missing == "native" else True

    def _is_plain_valid_input(self, X) -> bool:
        """The common prediction input that needs no conversion: a finite 2-d float ndarray
        of the fitted width, for a model fitted without feature names. Checking it here
        takes microseconds, where ``validate_data`` takes about 0.3 ms (a third of a 1-row
        predict); any other input goes through ``validate_data`` and its errors."""
        return (type(X) is np.ndarray and X.ndim == 2 and X.dtype.kind == "f" and X.shape[0] > 0
                and not is_encoded(self)
                and X.shape[1] == self.n_features_in_ and not hasattr(self, "feature_names_in_")
                and bool(np.isfinite(X).all()))

    def _forward(self, X_scaled: torch.Tensor, method: str, reduce=None):
        """``module_.predict``, ``route`` or ``predict_distribution`` on every row, in eval
        mode, as float64 arrays (a tuple of them for a tuple of tensors), run in chunks of
        rows (:data:`_CHUNK_VALUES`) and written chunk by chunk into the arrays: a row's
        result does not depend on the chunk that holds it.

        ``reduce``, where given, maps each chunk's tensor to what is kept of it (a class
        index per row, say), so that the whole output is never held; a reduced floating
        tensor is kept as float64, any other as its own dtype."""
        module_method = getattr(self.module_, method)
        n_rows = X_scaled.shape[0]
        rows = int(np.clip(_CHUNK_VALUES // self.module_.values_per_row, _MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS))
        arrays = None
        with torch.inference_mode(), self.net_.autocast(X_scaled.device):
            for start in range(0, max(n_rows, 1), rows):
                result = module_method(X_scaled[start:start + rows])
                if reduce is not None:
                    result = reduce(result)
                parts = result if isinstance(result, tuple) else (result,)
                parts = tuple(part.to("cpu", torch.float64 if part.is_floating_point() else part.dtype).numpy()
                              for part in parts)
                if arrays is None:
                    arrays = tuple(np.empty((n_rows, *part.shape[1:]), dtype=part.dtype) for part in parts)
                for array, part in zip(arrays, parts):
                    array[start:start + part.shape[0]] = part
        return arrays if isinstance(result, tuple) else arrays[0]

    def _raw_output(self, X) -> np.ndarray:
        return self._forward(self._scaled_input(X), "predict")

    def _gates(self, X_scaled: torch.Tensor) -> np.ndarray:
        return self._forward(X_scaled, "route")

    def save(self, path) -> None:
        """Save the fitted estimator in the safe format read by :func:`sklearn_moe.load`.

        Weights go to safetensors and everything else (hyperparameters, scaling, classes,
        history) to JSON; nothing is pickled, so loading a file never runs code from it.

        Parameters
        ----------
        path : str or os.PathLike
            Destination file.
        """
        from .persistence import save

        save(self, path)

    def route(self, X) -> np.ndarray:
        """Compute the gate weights of every expert for every row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Input rows, with the columns (and, for a DataFrame, the column names) seen in
            ``fit``.

        Returns
        -------
        ndarray of shape (n_samples, n_experts)
            Rows sum to 1; experts not chosen for a row have weight 0.
        """
        return self._gates(self._scaled_input(X))
