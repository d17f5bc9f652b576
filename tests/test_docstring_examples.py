"""Every ``Examples`` section of the package's docstrings runs and prints what it shows."""

import doctest
import importlib
from pathlib import Path

import pytest

import sklearn_moe

PACKAGE = Path(sklearn_moe.__file__).parent
# The modules whose docstrings hold examples (``__main__`` modules would run on import).
MODULES = sorted(
    ".".join(("sklearn_moe", *path.relative_to(PACKAGE).with_suffix("").parts))
    for path in PACKAGE.rglob("*.py")
    if path.name != "__main__.py" and ">>> " in path.read_text()
)


def test_the_examples_are_found():
    assert {"sklearn_moe._regressor", "sklearn_moe._classifier", "sklearn_moe.persistence",
            "sklearn_moe.nn.moe"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = [test for test in doctest.DocTestFinder().find(module, module.__name__) if test.examples]
    assert tests, f"{name} has '>>> ' but no doctest was found"
    for test in tests:
        runner.run(test)
    assert runner.tries > 0 and runner.failures == 0, (
        f"{runner.failures} of {runner.tries} example(s) failed in {name} (see the captured output)")
