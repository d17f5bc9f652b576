"""The Sphinx documentation builds with warnings as errors (what `make docs` runs).

The gallery is built without executing the examples (``-D plot_gallery=0``): the examples
have their own tests, and executing them is what `make docs` adds. The build runs on a copy
of the sources in a temporary folder, so that it writes nothing into the checkout (autosummary
and sphinx-gallery generate files next to the sources).
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("_build", "generated", "auto_examples", "sg_execution_times.rst", "__pycache__", "output")


@pytest.mark.slow
def test_docs_build_with_warnings_as_errors(tmp_path):
    for module in ("sphinx", "sphinx_gallery", "myst_parser", "numpydoc", "furo", "optuna", "matplotlib"):
        pytest.importorskip(module, reason=f"the docs build needs {module} (pip install -e '.[docs]')")
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns(*GENERATED)
    # What the pages use: the docs, the README they include, the examples of the gallery
    # (and their figures), and the benchmark results they link to.
    shutil.copytree(ROOT / "docs", source / "docs", ignore=ignore)
    shutil.copytree(ROOT / "examples", source / "examples", ignore=ignore)
    shutil.copytree(ROOT / "benchmarks" / "results", source / "benchmarks" / "results")
    shutil.copy(ROOT / "README.md", source / "README.md")

    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", "-D", "plot_gallery=0",
         str(source / "docs"), str(out)],
        cwd=source, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stdout[-5000:]}\n{result.stderr[-10000:]}"
    for page in ("index", "guide", "concepts", "experts_and_routers", "diagnostics", "tuning", "uncertainty",
                 "saving", "scaling", "benchmarks", "overview", "auto_examples/index", "api/index",
                 "api/generated/sklearn_moe.MoERegressor", "api/generated/sklearn_moe.tuning.tune"):
        assert (out / f"{page}.html").is_file(), page
