"""Every public name of the package has a numpydoc docstring that numpydoc's validation accepts.

The public names are the classes and functions that the public modules export (their
``__all__``, or else the public top-level names defined in the module itself), and the public
methods and properties of those classes that this package defines (those inherited unchanged
from scikit-learn, skorch, torch or the standard library are theirs to document).
"""

import functools
import importlib
import inspect

import pytest

numpydoc_validate = pytest.importorskip("numpydoc.validate")

# The public modules; those that need an optional extra (or do not exist yet) are skipped when
# they cannot be imported.
MODULES = (
    "sklearn_moe",
    "sklearn_moe.nn",
    "sklearn_moe.diagnostics",
    "sklearn_moe.plotting",
    "sklearn_moe.callbacks",
    "sklearn_moe.persistence",
    "sklearn_moe.tuning",
    "sklearn_moe.distributed",
    "sklearn_moe.distributed.fit",
    "sklearn_moe.cli",
)

# The checks not required, each for a reason:
IGNORED = {
    # Examples live in the user guide, the gallery and the tests; an Examples section on every
    # small function and method would duplicate them and go stale untested.
    "EX01",
    # See Also is a cross-reference nicety, not a correctness property of a docstring.
    "SA01",
    # A one-line summary is enough for many small functions; an extended summary is required
    # only where there is more to say, and that is a judgement, not a rule.
    "ES01",
}


def _import(name):
    try:
        return importlib.import_module(name)
    except ImportError as error:
        # A public module that does not exist (yet), or whose optional extra is not installed
        # (sklearn_moe.tuning re-raises the missing Optuna as an ImportError with a hint); a
        # broken import of an existing module still fails.
        missing = error if isinstance(error, ModuleNotFoundError) else error.__cause__
        if isinstance(missing, ModuleNotFoundError) and missing.name and (
                name == missing.name or name.startswith(missing.name + ".")
                or not missing.name.startswith("sklearn_moe")):
            return None
        raise


def _is_documentable(obj):
    return inspect.isclass(obj) or inspect.isfunction(obj)


def _module_names(module):
    """The public classes and functions of ``module``, as ``(name, object)``."""
    if hasattr(module, "__all__"):
        candidates = [(name, getattr(module, name)) for name in module.__all__]
        return [(name, obj) for name, obj in candidates
                if _is_documentable(obj) and getattr(obj, "__module__", "").startswith("sklearn_moe")]
    return [(name, obj) for name, obj in vars(module).items()
            if not name.startswith("_") and _is_documentable(obj)
            and getattr(obj, "__module__", None) == module.__name__]


def _own_member(cls, name):
    """The attribute ``name`` resolves to on ``cls``, if a class of this package defines it."""
    for klass in cls.__mro__:
        if name in vars(klass):
            if not klass.__module__.startswith("sklearn_moe"):
                return None  # inherited from scikit-learn, skorch, torch, ...
            return vars(klass)[name]
    return None


def _is_method_or_property(attr):
    return isinstance(attr, (property, functools.cached_property, classmethod, staticmethod)) or (
        inspect.isfunction(attr))


def _class_members(cls):
    """The public methods and properties that ``cls`` gets from this package, sorted."""
    names = {name for klass in cls.__mro__ for name in vars(klass) if not name.startswith("_")}
    return sorted(name for name in names if _is_method_or_property(_own_member(cls, name)))


def public_names():
    """Every public name to validate, as qualified names, each object once."""
    found, seen = [], set()
    for module_name in MODULES:
        module = _import(module_name)
        if module is None:
            continue
        for name, obj in _module_names(module):
            if id(obj) in seen:  # re-exported by a second public module
                continue
            seen.add(id(obj))
            qualified = f"{module_name}.{name}"
            found.append(qualified)
            if inspect.isclass(obj):
                found.extend(f"{qualified}.{member}" for member in _class_members(obj))
    return found


PUBLIC_NAMES = public_names()


def test_the_enumeration_finds_the_public_names():
    # So that the parametrized test below cannot pass on an empty or truncated list.
    assert len(PUBLIC_NAMES) > 80, PUBLIC_NAMES
    assert len(set(PUBLIC_NAMES)) == len(PUBLIC_NAMES)
    for expected in ("sklearn_moe.MoERegressor", "sklearn_moe.MoERegressor.fit", "sklearn_moe.MoEClassifier.route",
                     "sklearn_moe.load", "sklearn_moe.nn.MixtureOfExperts.forward",
                     "sklearn_moe.diagnostics.routing_entropy", "sklearn_moe.callbacks.RoutingMetrics"):
        assert expected in PUBLIC_NAMES
    # Methods inherited unchanged from scikit-learn and torch are not ours to document.
    assert "sklearn_moe.MoERegressor.get_params" not in PUBLIC_NAMES
    assert "sklearn_moe.nn.MixtureOfExperts.parameters" not in PUBLIC_NAMES


@pytest.mark.parametrize("name", PUBLIC_NAMES)
def test_docstring_is_valid_numpydoc(name):
    result = numpydoc_validate.validate(name)
    findings = [f"{name}: {code} {message}" for code, message in result["errors"] if code not in IGNORED]
    assert not findings, "\n".join(findings)
