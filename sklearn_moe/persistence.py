"""Safe persistence of fitted estimators: safetensors weights + JSON metadata, no pickle.

A saved model is ONE `safetensors <https://github.com/huggingface/safetensors>`_ file:

* the tensors are the network's ``state_dict()`` (parameters and buffers, such as the
  aux-loss-free selection bias), on the CPU;
* the safetensors header's ``metadata`` holds, under the key ``"sklearn-moe"``, one JSON
  document: ``format`` (``"sklearn-moe"``), ``format_version``, ``library_version``,
  ``kind`` (``"MoERegressor"`` or ``"MoEClassifier"``), ``params`` (``get_params()``),
  ``fitted`` (``n_features_in_``, ``feature_names_in_``, ``classes_``, ``n_iter_``,
  ``expert_load_``, the input/target scaling and the table encoding; arrays as ``{"dtype",
  "shape", "data"}`` with the data as JSON numbers or strings, which round-trip float64
  exactly; and the fit's ``categorical_features`` and ``one_hot_max_categories``, which a
  continued fit checks the current ones against, stored as ``params`` are), ``history``
  (the per-epoch records of ``net_.history``, without the per-batch entries) and ``net``
  (the training net's batch size);
* the metadata's key ``"sklearn-moe-sha256"`` holds a SHA-256 digest of that document and of
  every tensor (name, dtype, shape and bytes, in name order), which :func:`load` checks
  first: a file damaged on disk or in transit (a flipped bit that would otherwise load as a
  slightly different model) is reported as corrupt. It guards against accidents, not
  tampering, which the checks below cover. Files written before the digest existed load
  without it.

Why not pickle: unpickling a file runs whatever code the file names (``__reduce__``), so
``pickle.load``/``joblib.load`` of a file from someone else can take over the machine.
:func:`load` never unpickles and never imports or calls anything named in the file: the
estimator class comes from a fixed whitelist, every value is checked (hyperparameters by the
estimator's own validation, tensor names, shapes and dtypes against the network those
hyperparameters build) before anything is built, and any mismatch is a ``ValueError``.
Pickle remains fine for your own files, and is what scikit-learn's tools use.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
from types import SimpleNamespace

import numpy as np
import pandas as pd
import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from sklearn.base import clone
from sklearn.utils.validation import check_is_fitted

from ._parameters import check_hyperparameters
from ._tabular import ENCODING_PARAMETERS, empty_state, encoded_width, record_encoding_parameters
from ._training import build_module, default_generators_seeded, fitted_net, history_frame, rebuilt_module
from ._warnings import warn_at_caller

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load", "save"]

FORMAT_NAME = "sklearn-moe"
FORMAT_VERSION = 9
_VERSION_1_PARAMS = {"expert_type": "independent", "expert_loss": "mixture", "numeric_embedding": None,
                     "lr_schedule": "plateau", "router_lr_scale": 1.0, "expert_subsample": 1.0}
# Parameters that files of a format version below the key did not store, per kind, with the
# behaviour those files had.
_ADDED_PARAMS = {
    2: {"MoERegressor": _VERSION_1_PARAMS, "MoEClassifier": _VERSION_1_PARAMS},
    3: {"MoEClassifier": {"label_smoothing": 0.0}},
    4: {kind: {"collapse_threshold": 0.1, "collapse_patience": 5, "collapse_recovery": False,
               "temperature_final": None, "temperature_schedule": "cosine",
               **({"output": "point"} if kind == "MoERegressor" else {})}
        for kind in ("MoERegressor", "MoEClassifier")},
    5: {kind: {"callbacks": None, "categorical_features": "from_dtype", "handle_missing": "error",
               **({"mixing": "logits"} if kind == "MoEClassifier" else {})}
        for kind in ("MoERegressor", "MoEClassifier")},
    6: {kind: {"one_hot_max_categories": None} for kind in ("MoERegressor", "MoEClassifier")},
    7: {"MoEClassifier": {"class_weight": None}},
}
# Tensors that files of a format version below the key did not store, with how to make them
# from the estimator: the router's temperature was a fixed hyperparameter then, and a
# mixture density's spread was not recalibrated.
_ADDED_TENSORS = {
    4: {"router.temperature": lambda estimator: torch.tensor(float(estimator.temperature))},
    5: {"scale_calibration": lambda estimator: torch.tensor(1.0)},
}
_METADATA_KEY = "sklearn-moe"
_DIGEST_KEY = "sklearn-moe-sha256"
_KINDS = ("MoERegressor", "MoEClassifier")
_TUPLE_PARAMS = ("expert_hidden", "gate_hidden")
# Parameters that may be a dict, stored as a list of [key, value] pairs (JSON object keys are
# strings, and class labels need not be).
_DICT_PARAMS = ("class_weight",)
# Parameters that take an array-like (a numpy array, a pandas Index): stored as a list.
_ARRAY_PARAMS = ("categorical_features",)

_DOCUMENT_KEYS = {"format", "format_version", "library_version", "kind", "params", "fitted", "history", "net"}
# Fitted attributes stored elsewhere in the file (the net's weights and history), as
# parameters are (the fit's encoding parameters), or only when present (feature names).
_STORED_APART = ("net_", "history_", "_encoding_parameters")
_OPTIONAL_FITTED = ("feature_names_in_",)
_INT_FITTED = ("n_features_in_", "n_iter_", "_n_outputs", "_y_ndim")
_SCALARS = (bool, int, float, str)
_SCALING_CHECKS = {
    "_x_mean": (np.isfinite, "finite"),
    # inf (from format version 9): a column constant in fit, which prediction scales to 0
    "_x_scale": (lambda v: v > 0, "positive (inf for a column constant in fit)"),
    "_y_mean": (np.isfinite, "finite"),
    "_y_scale": (lambda v: np.isfinite(v) & (v >= 0), "finite and not negative"),  # 0: a constant target
}


def _required_fitted(kind: str) -> tuple:
    """The fitted attributes a file of ``kind`` holds in its ``fitted`` section."""
    return tuple(name for name in _kind_classes()[kind]._fitted_attributes
                 if name not in _STORED_APART + _OPTIONAL_FITTED)


def _kind_classes() -> dict:
    """The estimator class of each kind, from the package's public names: the estimators'
    modules import this one (``save``), so importing theirs here would make a cycle."""
    import sklearn_moe

    return {kind: getattr(sklearn_moe, kind) for kind in _KINDS}


# ---------------------------------------------------------------------------- save
def save(estimator, path) -> None:
    """Save a fitted :class:`MoERegressor` or :class:`MoEClassifier` to one safe file.

    The file is a safetensors file (the network's weights) whose metadata carries a JSON
    document with the hyperparameters and the fitted state; nothing is pickled. The file is
    written to a temporary file next to ``path`` and then moved into place, so an
    interrupted save never leaves a half-written file behind.

    Parameters
    ----------
    estimator : MoERegressor or MoEClassifier
        A fitted estimator (exactly one of these classes, not a subclass).
    path : str or os.PathLike
        Destination file, conventionally ending in ``.moe``.

    Raises
    ------
    sklearn.exceptions.NotFittedError
        If the estimator is not fitted.
    TypeError
        If ``path`` is not a file name (a file object, for instance).
    FileNotFoundError
        If the directory of ``path`` does not exist.
    ValueError
        If a hyperparameter cannot be stored as JSON (e.g. a ``RandomState`` instance as
        ``random_state``).

    See Also
    --------
    load : Read the file back.
    """
    from . import __version__

    kind = next((name for name, cls in _kind_classes().items() if type(estimator) is cls), None)
    if kind is None:
        raise TypeError(f"save() stores MoERegressor and MoEClassifier estimators, not {type(estimator).__name__}.")
    path = _file_name(path, "save")
    check_is_fitted(estimator)
    fitted = {}
    for name in _required_fitted(kind) + _OPTIONAL_FITTED:
        if hasattr(estimator, name):
            value = getattr(estimator, name)
            fitted[name] = int(value) if name in _INT_FITTED else _encode_array(name, value)
    if getattr(estimator, "_encoding_parameters", None) is not None:  # the fit's, which a continued fit keeps
        fitted["_encoding_parameters"] = {name: _encode_param(name, value)
                                          for name, value in estimator._encoding_parameters.items()}
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "kind": kind,
        "params": {name: _encode_param(name, value) for name, value in _stored_params(estimator).items()},
        "fitted": fitted,
        "history": [{k: v for k, v in epoch.items() if k != "batches"} for epoch in estimator.net_.history],
        "net": {"batch_size": int(estimator.net_.batch_size)},
    }
    text = json.dumps(document, default=_json_default)
    # .cpu() so that a model trained on a GPU saves (and later loads) anywhere.
    tensors = {name: t.detach().cpu().contiguous() for name, t in estimator.module_.state_dict().items()}
    metadata = {_METADATA_KEY: text, _DIGEST_KEY: _digest(text, tensors), "format": "pt"}
    _write_atomic(path, safetensors.torch.save(tensors, metadata=metadata))


def _digest(text: str, tensors: dict) -> str:
    """SHA-256 (hex) of the metadata document ``text`` and of every tensor: its name, dtype,
    shape and bytes, in name order."""
    digest = hashlib.sha256(text.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        # a fresh flat copy: a size-1 tensor of stride 0 counts as contiguous, but no view takes it
        digest.update(tensor.flatten().clone(memory_format=torch.contiguous_format).view(torch.uint8).numpy())
    return digest.hexdigest()


def _stored_params(estimator) -> dict:
    """The hyperparameters to store: all but the callbacks, which are code."""
    params = estimator.get_params(deep=False)
    if params["callbacks"]:
        warn_at_caller(f"save() does not store callbacks ({params['callbacks']!r}): they are code, and the safe "
                       "format holds none; the loaded model has callbacks=None.", UserWarning)
    return {**params, "callbacks": None}


def _encode_param(name, value):
    if isinstance(value, np.generic):
        value = value.item()
    if name in _ARRAY_PARAMS and isinstance(value, (np.ndarray, pd.Index, pd.Series)):
        value = value.tolist()
    if isinstance(value, dict) and name in _DICT_PARAMS:
        return [[_encode_param(name, key), _encode_param(name, item)] for key, item in value.items()]
    if isinstance(value, (tuple, list)):
        return [_encode_param(name, item) for item in value]
    if value is None or isinstance(value, _SCALARS):
        return value
    hint = (" Set random_state to an int (or None) before saving, e.g. model.set_params(random_state=0);"
            " the fitted weights do not change." if name == "random_state" else "")
    raise ValueError(
        f"Cannot save parameter {name}={value!r}: the safe format stores only ints, floats, strings, "
        f"booleans, None and tuples of them.{hint}"
    )


def _encode_array(name, value) -> dict:
    array = np.asarray(value)
    if array.dtype.kind not in "biufUO":
        raise ValueError(f"Cannot save {name} of dtype {array.dtype}: not a numeric, string or object array.")
    data = array.ravel().tolist()
    if array.dtype.kind == "O":
        data = [item.item() if isinstance(item, np.generic) else item for item in data]
        if not all(isinstance(item, _SCALARS) for item in data):
            raise ValueError(f"Cannot save {name}: its elements must be strings, numbers or booleans.")
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": data}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _file_name(path, action: str) -> str:
    """``path`` as a str, or a ``TypeError`` that says what ``action`` takes."""
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"{action}() takes a file name (str or os.PathLike), not {type(path).__name__}; for a "
                        "file object or remote storage, use a local file and copy it.") from None


def _write_atomic(path, data: bytes) -> None:
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):  # else the error would name the temporary file
        raise FileNotFoundError(errno.ENOENT, f"No such directory to save {name!r} in", directory)
    temporary = os.path.join(directory, f".{name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never clobber someone else's file; mode 0o666 lets the umask apply as usual.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


# ---------------------------------------------------------------------------- load
def load(path, device="cpu"):
    """Load an estimator saved by :func:`save` (or ``estimator.save(path)``).

    Nothing in the file is unpickled, imported or executed. The whole file is validated
    before anything is built: its format and version, the estimator kind (one of a fixed
    whitelist), the hyperparameters (by the estimator's own validation), the fitted state,
    and every tensor's name, shape and dtype against the network the hyperparameters
    describe.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save`.
    device : {"cpu", "cuda", "auto"} or str, default="cpu"
        Where the loaded model runs; replaces the saved ``device`` parameter, so a model
        trained on a GPU loads on a machine without one.

    Returns
    -------
    MoERegressor or MoEClassifier
        The fitted estimator, predicting exactly as the saved one did on the same device.

    Raises
    ------
    TypeError
        If ``path`` is not a file name (a file object, for instance).
    FileNotFoundError, IsADirectoryError
        If there is no such file, or ``path`` is a directory.
    ValueError
        If the file is not a valid sklearn-moe file (truncated, corrupt, a pickle, ...), does
        not match the digest saved with it (damaged after it was written), was
        written by a newer sklearn-moe, or was tampered with (unknown estimator kind,
        unknown or invalid hyperparameters, missing, extra or misshapen tensors).

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> from sklearn.datasets import load_diabetes
    >>> from sklearn_moe import MoERegressor, load
    >>> X, y = load_diabetes(return_X_y=True)
    >>> model = MoERegressor(n_experts=2, max_epochs=2, random_state=0).fit(X, y)
    >>> path = Path(tempfile.mkdtemp()) / "model.moe"
    >>> model.save(path)
    >>> bool((load(path).predict(X) == model.predict(X)).all())
    True
    """
    path = _file_name(path, "load")
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "A directory, not a file written by save()", path)
    try:
        with safe_open(path, framework="pt") as handle:
            read = _checked_tensors(handle, path)
            document = _parse_document(handle.metadata() or {})
            estimator, resolved_device = _new_estimator(document, device)
            expected = _expected_state(estimator)
            added = {name: make(estimator) for version, tensors in _ADDED_TENSORS.items()
                     if document["format_version"] < version for name, make in tensors.items()}
            _check_tensors(handle, {name: tensor for name, tensor in expected.items() if name not in added})
            state = {name: added[name] if name in added else read(name) for name in expected}
    except SafetensorError as error:
        hint = _PICKLE_HINT if _starts_like_a_pickle(path) else ""
        raise ValueError(f"{path!r} is not a valid sklearn-moe file: {str(error).rstrip('.')}.{hint}") from error
    for name, tensor in state.items():
        if tensor.dtype != expected[name].dtype:
            raise ValueError(f"Tensor {name!r} has dtype {tensor.dtype}, expected {expected[name].dtype}.")
    return _assemble(estimator, document, state, resolved_device)


_PICKLE_HINT = (" It is a pickle (or joblib) file, which load() never opens: unpickling runs whatever code "
                "the file names. Only if you trust its source, read it with pickle.load or joblib.load.")


def _starts_like_a_pickle(path: str) -> bool:
    """Whether the file begins as a pickle of protocol 2 or later does (joblib's too)."""
    try:
        with open(path, "rb") as file:
            start = file.read(2)
    except OSError:
        return False
    return len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5


def _checked_tensors(handle, path):
    """Raise if the file carries a digest (:func:`_digest`) that its contents do not match;
    return the reader of its tensors by name: the tensors the check read (read once), or
    ``handle.get_tensor`` for a file without a digest."""
    metadata = handle.metadata() or {}
    saved = metadata.get(_DIGEST_KEY)
    if saved is None:  # written before files carried one
        return handle.get_tensor
    text = metadata.get(_METADATA_KEY)
    tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if _digest(text if isinstance(text, str) else "", tensors) != saved:
        raise ValueError(f"{os.fspath(path)!r} is corrupt: its contents do not match the SHA-256 digest saved with "
                         "them (the file was damaged after it was written). Save the model again from its source.")
    return tensors.__getitem__


def _invalid(message: str) -> ValueError:
    return ValueError(f"Not a valid sklearn-moe file: {message}")


def _parse_document(metadata: dict) -> dict:
    text = metadata.get(_METADATA_KEY)
    if text is None:
        raise _invalid(f"no {_METADATA_KEY!r} metadata (a plain safetensors file?).")
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise _invalid(f"its metadata is not valid JSON ({error}).") from error
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise _invalid(f"its format is not {FORMAT_NAME!r}.")
    version = document.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _invalid(f"format_version {version!r} is not a positive int.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"This file was written by a newer sklearn-moe ({str(document.get('library_version'))[:40]!r}, format "
            f"version {version}); this version reads format versions up to {FORMAT_VERSION}. "
            "Upgrade sklearn-moe to load it."
        )
    if set(document) != _DOCUMENT_KEYS:
        raise _invalid(f"expected the keys {sorted(_DOCUMENT_KEYS)}, got {sorted(document)}.")
    kind = document["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise _invalid(f"unknown estimator kind {str(kind)[:100]!r}; expected one of {sorted(_KINDS)}.")
    for key, kind_of_value in (("params", dict), ("fitted", dict), ("history", list), ("net", dict)):
        if not isinstance(document[key], kind_of_value):
            raise _invalid(f"{key!r} must be a JSON {'object' if kind_of_value is dict else 'array'}.")
    if not all(isinstance(epoch, dict) for epoch in document["history"]):
        raise _invalid("'history' must be a list of per-epoch records.")
    batch_size = document["net"].get("batch_size")
    if set(document["net"]) != {"batch_size"} or not _is_int(batch_size, minimum=1):
        raise _invalid("'net' must be {'batch_size': positive int}.")
    return document


def _new_estimator(document: dict, device):
    cls = _kind_classes()[document["kind"]]
    params = dict(document["params"])
    for version, added in _ADDED_PARAMS.items():
        if document["format_version"] < version:
            params = {**added.get(document["kind"], {}), **params}
    names = set(cls().get_params(deep=False))
    unknown, missing = sorted(set(params) - names), sorted(names - set(params))
    if unknown or missing:
        raise _invalid(f"parameters do not match {cls.__name__}'s: unknown {unknown}, missing {missing}.")
    for name in _TUPLE_PARAMS:
        if isinstance(params[name], list):
            params[name] = tuple(params[name])
    for name in _DICT_PARAMS:
        if isinstance(params.get(name), list):
            if not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], _SCALARS)
                       for pair in params[name]):
                raise _invalid(f"parameter {name} must be a list of [key, value] pairs.")
            params[name] = {key: value for key, value in params[name]}
    estimator = cls(**{**params, "device": "cpu"})
    try:
        check_hyperparameters(estimator)
    except (ValueError, TypeError) as error:
        raise _invalid(f"invalid parameters: {error}") from error
    estimator.set_params(device=device)
    resolved_device = check_hyperparameters(estimator)  # errors here are about `device`, not the file
    _restore_fitted(estimator, document)
    return estimator, resolved_device


def _restore_fitted(estimator, document: dict) -> None:
    fitted, kind = dict(document["fitted"]), document["kind"]
    encoding = fitted.pop("_encoding_parameters", None)
    if document["format_version"] == 1:  # no numeric embeddings then
        empty = _encode_array("", np.zeros(0, dtype=np.int64))
        fitted = {"_embedding_columns": empty, "_embedding_n_bins": empty, **fitted}
    if document["format_version"] < 5:  # numeric input only then
        fitted = {**{name: _encode_array(name, value) for name, value in empty_state().items()}, **fitted}
    if document["format_version"] < 6:  # every categorical column one-hot encoded then
        fitted = {"_table_embedded": _encode_array("_table_embedded", np.zeros(0, dtype=np.int64)), **fitted}
    if document["format_version"] < 7 and kind == "MoEClassifier":  # one label per row then
        fitted = {"_y_ndim": 1, **fitted}
    required = set(_required_fitted(kind))
    unknown = sorted(set(fitted) - required - set(_OPTIONAL_FITTED))
    missing = sorted(required - set(fitted))
    if unknown or missing:
        raise _invalid(f"fitted attributes do not match: unknown {unknown}, missing {missing}.")
    values = {name: fitted[name] if name in _INT_FITTED else _decode_array(name, fitted[name]) for name in fitted}
    n_features, n_outputs = values["n_features_in_"], values["_n_outputs"]
    width = _checked_table_width(values, n_features)  # the encoded input's columns
    expected = {
        "n_features_in_": ("int", None), "n_iter_": ("int", None), "_n_outputs": ("int", None),
        "_y_ndim": ("int", None),
        "_x_mean": ("f8", (width,)), "_x_scale": ("f8", (width,)),
        "_y_mean": ("f8", (n_outputs,)), "_y_scale": ("f8", (n_outputs,)),
        "expert_load_": ("f8", (estimator.n_experts,)),
        "feature_names_in_": ("OU", (n_features,)), "classes_": ("biufUO", None),
        "_embedding_columns": ("i", None), "_embedding_n_bins": ("i", None),
        "_table_categorical": ("i", None), "_table_offsets": ("i", None), "_table_missing": ("i", None),
        "_table_embedded": ("i", None),
        "_table_categories": ("U", None), "_table_fill": ("f8", None),
    }
    for name, value in values.items():
        kinds, shape = expected[name]
        if kinds == "int":
            ok = _is_int(value, minimum=1 if name != "n_iter_" else 0)
        elif kinds == "i":
            ok = value.dtype == np.int64 and value.ndim == 1
        else:
            ok = (value.dtype == np.float64 if kinds == "f8" else value.dtype.kind in kinds) and (
                shape is None or value.shape == shape)
        if not ok:
            raise _invalid(f"fitted attribute {name} is malformed.")
    # The scalings every prediction goes through: a NaN or infinite one (or an input scale
    # of 0) would load as a model that predicts NaN, inf or garbage.
    for name, (valid, wanted) in _SCALING_CHECKS.items():
        if name in values and not valid(values[name]).all():  # a classifier has no target scaling
            raise _invalid(f"fitted attribute {name} must be {wanted}, as a fit makes it.")
    _check_embedding_layout(estimator, values["_embedding_columns"], values["_embedding_n_bins"], width)
    if values["n_iter_"] != len(document["history"]):
        raise _invalid("n_iter_ differs from the number of history records.")
    if kind == "MoEClassifier":
        classes = values["classes_"]
        if classes.ndim != 1 or classes.shape[0] < 2 or classes.shape[0] != n_outputs:
            raise _invalid("classes_ must list at least 2 classes, one per output.")
        if values["_y_ndim"] not in (1, 2) or (
                values["_y_ndim"] == 2 and not np.array_equal(classes, np.arange(n_outputs))):
            raise _invalid("_y_ndim must be 1 (one label per row) or 2 (a multilabel model, whose classes_ are "
                           "the label indices 0, 1, ...).")
    elif values["_y_ndim"] not in (1, 2) or (values["_y_ndim"] == 1 and n_outputs != 1):
        raise _invalid("_y_ndim does not match the number of outputs.")
    for name, value in values.items():
        setattr(estimator, name, value)
    _restore_encoding_parameters(estimator, encoding)


def _restore_encoding_parameters(estimator, stored) -> None:
    """The fit's encoding parameters (:func:`~._tabular.check_encoding_kept`), as stored; the
    saved hyperparameters stand for them in a file written before they were stored."""
    if stored is None:
        record_encoding_parameters(estimator)
        return
    if not isinstance(stored, dict) or set(stored) != set(ENCODING_PARAMETERS):
        raise _invalid(f"fitted attribute _encoding_parameters must hold {', '.join(ENCODING_PARAMETERS)}.")
    try:
        check_hyperparameters(clone(estimator).set_params(**stored))
    except (ValueError, TypeError) as error:
        raise _invalid(f"fitted attribute _encoding_parameters is malformed: {error}") from error
    estimator._encoding_parameters = stored


def _checked_table_width(values: dict, n_features) -> int:
    """The encoded input's width under the stored table encoding, which must be consistent."""
    try:
        categorical, offsets = values["_table_categorical"], values["_table_offsets"]
        missing, fill, embedded = values["_table_missing"], values["_table_fill"], values["_table_embedded"]
        n_numeric = n_features - categorical.size
        ok = (categorical.ndim == offsets.ndim == missing.ndim == fill.ndim == 1
              and offsets.size == categorical.size + 1 and offsets[0] == 0 and (np.diff(offsets) >= 0).all()
              and offsets[-1] == values["_table_categories"].size
              and np.array_equal(categorical, np.unique(categorical))
              and (categorical.size == 0 or 0 <= categorical[0] <= categorical[-1] < n_features)
              and embedded.ndim == 1 and np.array_equal(embedded, np.unique(embedded))
              and (embedded.size == 0 or 0 <= embedded[0] <= embedded[-1] < categorical.size)
              and np.array_equal(missing, np.unique(missing))
              and (missing.size == 0 or 0 <= missing[0] <= missing[-1] < n_numeric)
              and fill.size in ({0, n_numeric} if categorical.size or missing.size else {0}))
    except (KeyError, AttributeError, TypeError, IndexError):
        ok = False
    if not ok:
        raise _invalid("the table encoding (_table_* attributes) is malformed.")
    return encoded_width(n_features, SimpleNamespace(**values))


def _check_embedding_layout(estimator, columns: np.ndarray, n_bins: np.ndarray, n_features: int) -> None:
    """The embedded columns are distinct inputs, with a bin count each for piecewise-linear."""
    if len(columns) and estimator.numeric_embedding is None:
        raise _invalid("embedded columns are stored, but numeric_embedding is None.")
    if len(np.unique(columns)) != len(columns) or not all(0 <= c < n_features for c in columns):
        raise _invalid("the embedded columns must be distinct feature indices.")
    expected_bins = len(columns) if estimator.numeric_embedding == "piecewise_linear" else 0
    if len(n_bins) != expected_bins or not all(1 <= b <= 100_000 for b in n_bins):
        raise _invalid("the piecewise-linear bin counts do not match the embedded columns.")


def _decode_array(name: str, spec) -> np.ndarray:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise _invalid(f"fitted attribute {name} must be {{'dtype', 'shape', 'data'}}.")
    shape, data = spec["shape"], spec["data"]
    if not (isinstance(shape, list) and all(_is_int(s, minimum=0) for s in shape) and isinstance(data, list)
            and len(data) == math.prod(shape)):
        raise _invalid(f"fitted attribute {name} has a malformed shape or data.")
    try:
        dtype = np.dtype(spec["dtype"]) if isinstance(spec["dtype"], str) else None
    except (TypeError, ValueError, SyntaxError):
        dtype = None
    allowed = {"b": (bool,), "U": (str,), "O": _SCALARS}.get(getattr(dtype, "kind", None), (int, float))
    if dtype is None or dtype.kind not in "biufUO" or not all(
            isinstance(item, allowed) and (dtype.kind in "bO" or not isinstance(item, bool)) for item in data):
        raise _invalid(f"fitted attribute {name} has an unsupported dtype or values.")
    # A string width far beyond the longest string would only serve to exhaust memory.
    if dtype.kind == "U" and dtype.itemsize // 4 > max(map(len, data), default=0) + 256:
        raise _invalid(f"fitted attribute {name} declares an implausible string width.")
    if dtype.kind == "O":
        array = np.empty(len(data), dtype=object)
        array[:] = data
        return array.reshape(shape)
    try:
        return np.array(data, dtype=dtype).reshape(shape)
    except (ValueError, OverflowError, TypeError) as error:
        raise _invalid(f"fitted attribute {name} does not fit its dtype ({error}).") from error


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _expected_state(estimator) -> dict:
    """The state_dict the saved hyperparameters describe, built on the meta device (no memory)."""
    try:
        # (the piecewise-linear embedding is built on the CPU, initialised from its generator)
        with torch.device("meta"), default_generators_seeded(None):
            skeleton = build_module(estimator, estimator._x_mean.shape[0], "meta")
    except (RuntimeError, ValueError, OverflowError) as error:  # e.g. sizes whose storage overflows
        raise _invalid(f"its parameters describe no buildable network ({error}).") from error
    return skeleton.state_dict()


def _check_tensors(handle, expected: dict) -> None:
    stored = set(handle.keys())
    missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or extra:
        raise ValueError(f"The file's tensors do not match the model: missing {missing}, unexpected {extra}.")
    for name, tensor in expected.items():
        shape = tuple(handle.get_slice(name).get_shape())
        if shape != tuple(tensor.shape):
            raise ValueError(f"Tensor {name!r} has shape {shape}, expected {tuple(tensor.shape)}.")


def _assemble(estimator, document: dict, state: dict, device: str):
    module = rebuilt_module(estimator, state, device)
    estimator.net_ = fitted_net(estimator, module, device, document["net"]["batch_size"], document["history"])
    estimator.history_ = history_frame(estimator.net_.history)
    return estimator
