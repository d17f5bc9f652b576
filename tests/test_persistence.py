"""Safe persistence: sklearn_moe.persistence.save / sklearn_moe.load (safetensors + JSON)."""

import importlib.util
import io
import json
import os
import pathlib
import pickle
import sys

import joblib
import numpy as np
import pandas as pd
import pytest
import safetensors
import safetensors.torch
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

import sklearn_moe
from sklearn_moe import MoEClassifier, MoERegressor, load
from sklearn_moe.persistence import FORMAT_VERSION, save

from .conftest import FAST

QUICK = dict(FAST, max_epochs=5)
KEY = "sklearn-moe"


def _data(n=120, seed=0):
    rng = np.random.RandomState(seed)
    X = rng.normal(size=(n, 5)) * [1.0, 3.0, 1 / 3, 100.0, 1.0] + [0.0, 1 / 3, -7.0, 1e4, 0.0]
    y = X[:, 0] + np.sin(X[:, 1]) + 0.1 * rng.normal(size=n)
    return X, y


def assert_same_outputs_and_weights(loaded, model, X):
    """The same class, predictions, routing and (on the CPU) weights, buffers included."""
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_array_equal(loaded.route(X), model.route(X))
    if isinstance(model, MoEClassifier):
        np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))
    original, restored = model.module_.state_dict(), loaded.module_.state_dict()
    assert list(restored) == list(original)
    for name in original:
        assert torch.equal(restored[name].cpu(), original[name].cpu()), name


def _assert_same_model(loaded, model, X):
    assert_same_outputs_and_weights(loaded, model, X)
    if isinstance(model, MoEClassifier):
        assert loaded.classes_.dtype == model.classes_.dtype
        np.testing.assert_array_equal(loaded.classes_, model.classes_)
        assert [type(c) for c in loaded.classes_] == [type(c) for c in model.classes_]
    else:
        for name in ("_y_mean", "_y_scale"):
            assert getattr(loaded, name).dtype == np.float64
            np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
        assert loaded._y_ndim == model._y_ndim
    for name in ("_x_mean", "_x_scale", "expert_load_"):
        assert getattr(loaded, name).dtype == np.float64
        np.testing.assert_array_equal(getattr(loaded, name), getattr(model, name))
    assert loaded.n_features_in_ == model.n_features_in_
    assert loaded.n_iter_ == model.n_iter_ and loaded._n_outputs == model._n_outputs
    assert {k: v for k, v in loaded.get_params().items() if k != "device"} == {
        k: v for k, v in model.get_params().items() if k != "device"}
    assert loaded.get_params()["device"] == "cpu"
    pd.testing.assert_frame_equal(loaded.history_, model.history_)
    # NaN-aware: a first epoch has no routing instability yet
    np.testing.assert_equal([{k: v for k, v in e.items() if k != "batches"} for e in loaded.net_.history],
                            loaded.history_.to_dict("records"))
    # initialize() kept the loaded weights (checked above) and the module is in eval mode
    assert not loaded.module_.training
    assert loaded.net_.train_split is None and loaded.net_.batch_size == model.net_.batch_size


CONFIGS = {
    "regressor-1d": (MoERegressor, {}, "1d"),
    "regressor-2d": (MoERegressor, {}, "2d"),
    "classifier-int": (MoEClassifier, {}, "int"),
    "classifier-str": (MoEClassifier, {}, "str"),
    "classifier-object-str": (MoEClassifier, {}, "object"),
    "classifier-bool": (MoEClassifier, {}, "bool"),
    "softmax": (MoERegressor, {"router": "softmax"}, "1d"),
    "noisy_topk": (MoEClassifier, {"router": "noisy_topk", "balance_loss": "cv2"}, "int"),
    "switch": (MoERegressor, {"router": "switch"}, "1d"),
    "top_p": (MoERegressor, {"router": "top_p", "top_p": 0.7}, "1d"),
    "top_p-learned": (MoEClassifier, {"router": "top_p", "learned_threshold": True}, "str"),
    "hierarchical": (MoERegressor, {"router": "hierarchical", "n_groups": 2}, "2d"),
    "shared-expert": (MoERegressor, {"shared_expert": True, "layer_norm": True, "expert_hidden": (16, 16)}, "1d"),
    "gate-hidden": (MoEClassifier, {"gate_hidden": (8,)}, "int"),
    "aux-free": (MoERegressor, {"router": "topk", "balance_loss": "aux_free", "balance_coef": 0.05}, "1d"),
    "no-early-stopping": (MoERegressor, {"early_stopping": False, "batch_size": "auto"}, "1d"),
    "bf16-capacity-diversity": (MoEClassifier, {"precision": "bf16", "capacity_factor": 1.0, "diversity_coef": 0.1,
                                                "expert_dropout": 0.2, "verbose": 0}, "int"),
}


def _targets(y, kind):
    return {
        "1d": y,
        "2d": np.column_stack([y, -3 * y + 1e3]),
        "int": np.digitize(y, [-0.5, 0.5]),
        "str": np.where(y > 0, "yes", "no"),
        "object": pd.Series(np.where(y > 0, "up", "down")).astype(object),
        "bool": y > 0,
    }[kind]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_predicts_identically(name, tmp_path):
    estimator_class, options, target_kind = CONFIGS[name]
    X, y = _data()
    model = estimator_class(**{**QUICK, **options}).fit(X, _targets(y, target_kind))
    path = tmp_path / "model.moe"
    model.save(path)
    loaded = load(path)
    _assert_same_model(loaded, model, X)
    if name == "aux-free":
        assert model.module_.router.selection_bias.abs().sum() > 0  # the buffer really was trained
    if target_kind == "2d":
        assert loaded.predict(X).shape == (len(X), 2)


def test_loaded_model_pickles_clones_and_resaves_the_same(tmp_path):
    X, y = _data()
    model = MoEClassifier(**QUICK).fit(X, np.digitize(y, [0.0]))
    model.save(tmp_path / "a.moe")
    loaded = load(tmp_path / "a.moe")
    _assert_same_model(pickle.loads(pickle.dumps(loaded)), model, X)
    assert clone(loaded).get_params() == loaded.get_params()
    loaded.save(tmp_path / "b.moe")
    first, second = (_read(tmp_path / name) for name in ("a.moe", "b.moe"))
    assert first[0] == second[0]
    assert first[1].keys() == second[1].keys()
    assert all(torch.equal(first[1][name], second[1][name]) for name in first[1])


def test_a_single_expert_top_p_with_a_learned_threshold_saves(tmp_path):
    """Also a model whose one-element parameter has stride 0 (as an expanded tensor's
    clone has), which no byte view takes."""
    X, y = _data()
    model = MoERegressor(**dict(QUICK, n_experts=1, router="top_p", learned_threshold=True)).fit(X, y)
    model.save(tmp_path / "one.moe")
    assert_same_outputs_and_weights(load(tmp_path / "one.moe"), model, X)
    with torch.no_grad():
        model.module_.router.threshold_logit.data = torch.tensor(0.25).expand(1).clone()
    assert model.module_.router.threshold_logit.stride() == (0,)
    model.save(tmp_path / "strided.moe")
    assert_same_outputs_and_weights(load(tmp_path / "strided.moe"), model, X)


def test_feature_names_survive_and_are_checked(tmp_path):
    X, y = _data()
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    model = MoERegressor(**QUICK).fit(frame, y)
    path = str(tmp_path / "named.moe")  # str paths work as well as PathLike
    save(model, path)
    loaded = load(path)
    np.testing.assert_array_equal(loaded.feature_names_in_, model.feature_names_in_)
    assert loaded.feature_names_in_.dtype == object
    _assert_same_model(loaded, model, frame)
    with pytest.raises(ValueError, match="feature names"):
        loaded.predict(frame[frame.columns[::-1]])
    with pytest.warns(UserWarning, match="feature names"):
        loaded.predict(X)


@pytest.mark.parametrize("estimator_class", [MoERegressor, MoEClassifier])
def test_warm_start_refit_after_load_matches_refit_of_original(estimator_class, tmp_path):
    X, y = _data()
    if estimator_class is MoEClassifier:
        y = np.digitize(y, [0.0])
    model = estimator_class(**{**QUICK, "warm_start": True}).fit(X, y)
    model.save(tmp_path / "warm.moe")
    loaded = load(tmp_path / "warm.moe")
    model.fit(X, y)
    loaded.fit(X, y)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    np.testing.assert_array_equal(loaded._x_mean, model._x_mean)  # warm start kept the saved scaling


def test_file_is_safetensors_with_plain_json_metadata(tmp_path):
    X, y = _data()
    model = MoEClassifier(**QUICK).fit(X, np.where(y > 0, "yes", "no"))
    path = tmp_path / "model.moe"
    model.save(path)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    document = json.loads(metadata[KEY])
    assert document["format"] == "sklearn-moe" and document["format_version"] == FORMAT_VERSION
    assert document["library_version"] == sklearn_moe.__version__
    assert document["kind"] == "MoEClassifier"
    assert document["params"]["expert_hidden"] == [16]
    assert document["fitted"]["classes_"] == {"dtype": "<U3", "shape": [2], "data": ["no", "yes"]}
    assert len(document["history"]) == model.n_iter_
    assert set(tensors) == set(model.module_.state_dict())
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))  # no temp file left


def test_tensors_on_another_device_are_moved_to_cpu(tmp_path, monkeypatch):
    """A CUDA-trained model saves: save() moves every tensor with .cpu() (simulated here by a
    tensor subclass that reports a CUDA device until .cpu() is called), and makes it contiguous."""
    X, y = _data()
    model = MoERegressor(**QUICK).fit(X, y)
    moved = []

    class Elsewhere(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 0)

        def cpu(self, *args, **kwargs):
            moved.append(True)
            return self.as_subclass(torch.Tensor).clone()

    real = model.module_.state_dict()
    fake = {name: (t.t().contiguous().t() if t.ndim == 2 else t).as_subclass(Elsewhere) for name, t in real.items()}
    assert any(not t.is_contiguous() for t in fake.values())
    monkeypatch.setattr(model.module_, "state_dict", lambda *args, **kwargs: fake)
    model.save(tmp_path / "moved.moe")
    assert len(moved) == len(real)
    monkeypatch.undo()
    _assert_same_model(load(tmp_path / "moved.moe"), model, X)


def test_load_device_argument(tmp_path):
    X, y = _data()
    model = MoERegressor(**QUICK).fit(X, y)
    model.save(tmp_path / "model.moe")
    loaded = load(tmp_path / "model.moe", device="auto")
    assert loaded.get_params()["device"] == "auto"
    if not torch.cuda.is_available():
        assert str(loaded.net_.device) == "cpu"
        np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
        with pytest.raises(ValueError, match="CUDA is not available"):
            load(tmp_path / "model.moe", device="cuda")


# ---------------------------------------------------------------------------- save errors


def test_save_unfitted_raises_not_fitted(tmp_path):
    with pytest.raises(NotFittedError):
        MoERegressor().save(tmp_path / "unfitted.moe")
    with pytest.raises(NotFittedError):
        save(MoEClassifier(), tmp_path / "unfitted.moe")
    assert os.listdir(tmp_path) == []


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="MoERegressor and MoEClassifier"):
        save(object(), tmp_path / "x.moe")


def test_save_rejects_non_json_param_with_a_hint(tmp_path):
    X, y = _data()
    model = MoERegressor(**{**QUICK, "random_state": np.random.RandomState(0)}).fit(X, y)
    with pytest.raises(ValueError, match=r"random_state.*int"):
        model.save(tmp_path / "model.moe")
    assert os.listdir(tmp_path) == []
    model.set_params(random_state=np.int64(3))  # numpy scalars are fine
    model.save(tmp_path / "model.moe")
    assert load(tmp_path / "model.moe").random_state == 3


@pytest.mark.parametrize("as_given", [lambda columns: columns[1:], lambda columns: np.asarray(columns[1:]),
                                      lambda columns: np.array([False, True, True])],
                         ids=["index", "names_array", "mask_array"])
def test_categorical_features_given_as_an_array_are_saved(tmp_path, as_given):
    rng = np.random.RandomState(0)
    X = pd.DataFrame({"a": rng.normal(size=60), "b": rng.choice(["x", "y"], 60), "c": rng.choice(["u", "v"], 60)})
    model = MoERegressor(**{**QUICK, "categorical_features": as_given(X.columns)}).fit(X, X["a"])
    model.save(tmp_path / "model.moe")
    loaded = load(tmp_path / "model.moe")
    assert list(loaded.categorical_features) == list(as_given(X.columns))
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    X, y = _data()
    model = MoERegressor(**QUICK).fit(X, y)
    path = tmp_path / "model.moe"
    path.write_bytes(b"previous contents")

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    assert path.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["model.moe"]
    monkeypatch.undo()
    model.save(path)  # overwrites
    _assert_same_model(load(path), model, X)


# ---------------------------------------------------------------------------- load rejections


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    X, y = _data()
    model = MoERegressor(**QUICK).fit(X, y)
    path = tmp_path_factory.mktemp("saved") / "model.moe"
    model.save(path)
    return path


def _read(path):
    with safetensors.safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[KEY]), {name: handle.get_tensor(name) for name in handle.keys()}


def _rewrite(source, target, edit_document=None, edit_tensors=None):
    document, tensors = _read(source)
    if edit_document is not None:
        edit_document(document)
    if edit_tensors is not None:
        edit_tensors(tensors)
    safetensors.torch.save_file(tensors, str(target), metadata={KEY: json.dumps(document)})
    return target


def test_rewrite_helper_keeps_a_valid_file(saved, tmp_path):
    # the tampering tests below edit one thing each: an unedited rewrite must load as saved
    X, _ = _data()
    assert_same_outputs_and_weights(load(_rewrite(saved, tmp_path / "same.moe")), load(saved), X)
    assert _read(tmp_path / "same.moe")[0] == _read(saved)[0]


@pytest.mark.parametrize("kind", ["evil_module_xyz", "evil_module_xyz.Evil", "os.system", "builtins.eval",
                                  "sklearn_moe.MoERegressor", "MoERegressor.__class__", ["MoERegressor"], None])
def test_tampered_kind_imports_and_runs_nothing(saved, tmp_path, monkeypatch, kind):
    marker = tmp_path / "marker"
    (tmp_path / "evil_module_xyz.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\nclass Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("evil_module_xyz") is not None  # it would be importable
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args))

    def edit(document):
        document["kind"] = kind
        document["params"]["device"] = "os.system('touch marker')"

    path = _rewrite(saved, tmp_path / "tampered.moe", edit)
    with pytest.raises(ValueError, match="unknown estimator kind"):
        load(path)
    assert "evil_module_xyz" not in sys.modules
    assert not marker.exists()
    assert calls == []


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["params"].update(evil="os.system"), r"unknown \['evil'\]"),
    (lambda d: d["params"].pop("top_k"), r"missing \['top_k'\]"),
    (lambda d: d["params"].update(n_experts=-1), "n_experts"),
    (lambda d: d["params"].update(router="bogus"), "router"),
    (lambda d: d["params"].update(expert_hidden=[0]), "expert_hidden"),
    (lambda d: d["params"].update(expert_hidden="16"), "expert_hidden"),
    (lambda d: d["params"].update(random_state="numpy.random.RandomState"), "random_state"),
    (lambda d: d["params"].update(expert_hidden=[2**40, 2**40]), "no buildable network"),
    (lambda d: d["fitted"].update(_x_mean={"dtype": "<f8", "shape": [2], "data": [0.0, 1.0]}), "_x_mean"),
    (lambda d: d["fitted"].update(_x_scale={"dtype": "<f8", "shape": [5], "data": ["1"] * 5}), "_x_scale"),
    (lambda d: d["fitted"].update(_y_mean={"dtype": "|V8", "shape": [1], "data": [0]}), "_y_mean"),
    (lambda d: d["fitted"].update(_x_scale={"dtype": "<f8", "shape": [5], "data": [1.0, 1.0, 0.0, 1.0, 1.0]}),
     r"_x_scale must be positive \(inf for a column constant in fit\)"),
    (lambda d: d["fitted"].update(_x_scale={"dtype": "<f8", "shape": [5], "data": [1.0] * 4 + [float("nan")]}),
     "_x_scale must be positive"),
    (lambda d: d["fitted"].update(_y_scale={"dtype": "<f8", "shape": [1], "data": [float("nan")]}),
     "_y_scale must be finite and not negative"),
    (lambda d: d["fitted"].update(_x_mean={"dtype": "<f8", "shape": [5], "data": [float("inf")] * 5}),
     "_x_mean must be finite"),
    (lambda d: d["fitted"].update(classes_={"dtype": "<i8", "shape": [2], "data": [0, 1]}), r"unknown \['classes_'\]"),
    (lambda d: d["fitted"].pop("_x_scale"), r"missing \['_x_scale'\]"),
    (lambda d: d["fitted"].update(_table_embedded={"dtype": "<i8", "shape": [1], "data": [0]}), "table encoding"),
    (lambda d: d["fitted"].update(n_iter_=10**6), "n_iter_"),
    (lambda d: d.update(history={}), "history"),
    (lambda d: d.update(extra="x"), "keys"),
    (lambda d: d.update(format="pickle"), "format"),
    (lambda d: d.update(format_version="1"), "format_version"),
    (lambda d: d["fitted"].update(_encoding_parameters={"categorical_features": None}),
     "_encoding_parameters must hold categorical_features, one_hot_max_categories"),
    (lambda d: d["fitted"].update(_encoding_parameters={"categorical_features": None, "one_hot_max_categories": -3}),
     "_encoding_parameters is malformed"),
])
def test_tampered_document_rejected(saved, tmp_path, edit, message):
    path = _rewrite(saved, tmp_path / "tampered.moe", edit)
    with pytest.raises(ValueError, match=message):
        load(path)


def test_newer_format_version_asks_to_upgrade(saved, tmp_path):
    path = _rewrite(saved, tmp_path / "future.moe", lambda d: d.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=r"newer sklearn-moe.*Upgrade sklearn-moe"):
        load(path)


def test_missing_tensor(saved, tmp_path):
    path = _rewrite(saved, tmp_path / "t.moe", edit_tensors=lambda t: t.pop("router.selection_bias"))
    with pytest.raises(ValueError, match=r"missing \['router.selection_bias'\]"):
        load(path)


def test_extra_tensor(saved, tmp_path):
    path = _rewrite(saved, tmp_path / "t.moe", edit_tensors=lambda t: t.update({"evil.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected \['evil.weight'\]"):
        load(path)


def test_wrong_shape_tensor(saved, tmp_path):
    def edit(tensors):
        tensors["experts.head_bias"] = torch.zeros(4, 7)

    with pytest.raises(ValueError, match="'experts.head_bias' has shape"):
        load(_rewrite(saved, tmp_path / "t.moe", edit_tensors=edit))


def test_wrong_dtype_tensor(saved, tmp_path):
    def edit(tensors):
        tensors["experts.head_bias"] = tensors["experts.head_bias"].double()

    with pytest.raises(ValueError, match="'experts.head_bias' has dtype torch.float64"):
        load(_rewrite(saved, tmp_path / "t.moe", edit_tensors=edit))


@pytest.mark.parametrize("contents", [
    "truncated", "garbage", "empty", "no-metadata", "bad-json",
])
def test_corrupt_files_rejected(saved, tmp_path, contents):
    path = tmp_path / "bad.moe"
    data = saved.read_bytes()
    if contents == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif contents == "garbage":
        path.write_bytes(np.random.RandomState(0).bytes(len(data)))
    elif contents == "empty":
        path.write_bytes(b"")
    elif contents == "no-metadata":
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    else:
        safetensors.torch.save_file({"w": torch.zeros(2)}, str(path), metadata={KEY: "{not json"})
    with pytest.raises(ValueError, match="(?i)not a valid sklearn-moe file") as info:
        load(path)
    if contents in ("truncated", "garbage", "empty"):
        assert isinstance(info.value.__cause__, safetensors.SafetensorError)


def test_a_file_damaged_after_saving_is_reported_as_corrupt(saved, tmp_path):
    with safetensors.safe_open(str(saved), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    assert len(metadata["sklearn-moe-sha256"]) == 64
    # One bit of the weights flipped: the model would still load, predicting a little differently.
    data = bytearray(saved.read_bytes())
    data[-1] ^= 1
    (tmp_path / "weights.moe").write_bytes(bytes(data))
    # A number of the metadata changed, the JSON still valid.
    document = json.loads(metadata[KEY])
    document["history"][0]["train_loss"] += 1.0
    safetensors.torch.save_file(tensors, str(tmp_path / "metadata.moe"),
                                metadata={**metadata, KEY: json.dumps(document)})
    for name in ("weights.moe", "metadata.moe"):
        with pytest.raises(ValueError, match="is corrupt: its contents do not match the SHA-256 digest"):
            load(tmp_path / name)
    # Written again unchanged, with its digest, it loads.
    safetensors.torch.save_file(tensors, str(tmp_path / "same.moe"), metadata=metadata)
    X, _ = _data()
    assert_same_outputs_and_weights(load(tmp_path / "same.moe"), load(saved), X)


class _Bomb:
    """Unpickling this creates a marker file: proof of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_file_is_rejected_and_never_unpickled(tmp_path):
    live = tmp_path / "live-marker"
    pickle.loads(pickle.dumps(_Bomb(live)))
    assert live.exists()  # the bomb works when unpickled

    X, y = _data()
    model = MoERegressor(**QUICK).fit(X, y)
    marker = tmp_path / "marker"
    for name, dump in [("model.joblib", joblib.dump), ("model.pkl", lambda obj, p: p.write_bytes(pickle.dumps(obj)))]:
        dump({"bomb": _Bomb(marker), "model": model}, tmp_path / name)
        with pytest.raises(ValueError, match="not a valid sklearn-moe file.* It is a pickle .* never opens"):
            load(tmp_path / name)
    assert not marker.exists()


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "nothing.moe")


def test_paths_that_cannot_be_written_or_read_say_why(tmp_path):
    X, y = _data()
    model = MoERegressor(**QUICK).fit(X, y)
    with pytest.raises(FileNotFoundError, match="No such directory to save 'model.moe' in") as raised:
        model.save(tmp_path / "absent" / "model.moe")
    assert raised.value.filename == str(tmp_path / "absent")
    for call in (lambda: model.save(io.BytesIO()), lambda: load(io.BytesIO())):
        with pytest.raises(TypeError, match=r"takes a file name \(str or os.PathLike\), not BytesIO"):
            call()
    with pytest.raises(IsADirectoryError, match="not a file written by save"):
        load(tmp_path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("numeric_embedding", ["piecewise_linear", "periodic"])
def test_load_leaves_torchs_random_generator_alone(regression_data, tmp_path, numeric_embedding):
    MoERegressor(**dict(FAST, max_epochs=1, numeric_embedding=numeric_embedding)).fit(*regression_data).save(
        tmp_path / "model.moe")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load(tmp_path / "model.moe")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("estimator_class, params", [
    (MoERegressor, {}), (MoERegressor, {"output": "mixture_density"}),
    (MoEClassifier, {"mixing": "probabilities"}),
], ids=["regressor", "mixture-density", "classifier-mixing-probabilities"])
def test_a_float64_default_dtype_fits_saves_and_loads_the_float32_model(regression_data, tmp_path, estimator_class,
                                                                        params):
    X, y = regression_data
    y = (y > 0).astype(int) if estimator_class is MoEClassifier else y
    params = dict(FAST, max_epochs=2, **params)
    predict = "predict_proba" if estimator_class is MoEClassifier else "predict"
    expected = getattr(estimator_class(**params).fit(X, y), predict)(X)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = estimator_class(**params).fit(X, y)
        assert {p.dtype for p in model.module_.parameters()} == {torch.float32}
        np.testing.assert_array_equal(getattr(model, predict)(X), expected)  # the same initial weights too
        model.save(tmp_path / "model.moe")
        loaded = load(tmp_path / "model.moe")
        np.testing.assert_array_equal(getattr(loaded, predict)(X), expected)
        loaded.set_params(warm_start=True).fit(X, y)
    finally:
        torch.set_default_dtype(previous)


def test_a_loaded_model_keeps_the_fits_encoding_parameters(tmp_path):
    """A parameter changed after the fit is saved as the parameter; the continued fit of the
    loaded model still checks it against the fit's, as the pickled model does."""
    rng = np.random.RandomState(0)
    frame = pd.DataFrame({"x": rng.normal(size=120), "city": rng.choice(["Oslo", "Lima", "Pune"], 120)})
    y = frame["x"].to_numpy() + (frame["city"] == "Lima")
    model = MoERegressor(**dict(FAST, max_epochs=2)).fit(frame, y).set_params(categorical_features=None)
    model.save(tmp_path / "model.moe")
    loaded = load(tmp_path / "model.moe").set_params(warm_start=True)
    assert loaded.categorical_features is None
    for continued in (loaded, pickle.loads(pickle.dumps(model)).set_params(warm_start=True)):
        with pytest.raises(ValueError, match="categorical_features=None reads no column as categorical"):
            continued.fit(frame, y)


def test_a_file_without_the_encoding_parameters_takes_its_saved_ones(saved, tmp_path):
    """Files written before the fit's encoding parameters were stored."""
    def as_version_7(document):
        document["fitted"].pop("_encoding_parameters")
        document["format_version"] = 7

    loaded = load(_rewrite(saved, tmp_path / "v7.moe", as_version_7))
    assert loaded._encoding_parameters == {"categorical_features": "from_dtype", "one_hot_max_categories": 256}
