"""Sphinx configuration of the sklearn-moe documentation.

Build it with ``make docs`` (``sphinx-build -W --keep-going -b html docs docs/_build/html``:
warnings are errors). Everything is offline: no intersphinx, no downloads at build time.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
# The package and the ``examples`` package (the gallery's scripts import it) from this
# checkout; this folder for the gallery hooks.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import sklearn_moe  # noqa: E402

project = "sklearn-moe"
author = "the sklearn-moe developers"
copyright = "the sklearn-moe developers"
version = release = sklearn_moe.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
templates_path = ["_templates"]

# --- Markdown (MyST) ---------------------------------------------------------------------
# Headings up to ### get anchors, so links such as ``experts_and_routers.md#routing`` resolve.
myst_heading_anchors = 3

# --- API reference: autodoc, autosummary, numpydoc -------------------------------------
autosummary_generate = True
autosummary_ignore_module_all = False  # a module's __all__ lists what it documents
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"  # the numpydoc sections say the types
numpydoc_show_class_members = False  # the autosummary templates list the members
numpydoc_class_members_toctree = False
numpydoc_validation_checks: set[str] = set()  # render the docstrings; no style validation here


def _skip_metadata_routing(app, what, name, obj, skip, options):
    """Leave out scikit-learn's metadata-routing methods (``set_fit_request``, ...): generated
    by scikit-learn on every estimator, documented there, and full of references to its docs."""
    if re.fullmatch(r"set_\w+_request|get_metadata_routing", name):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_metadata_routing)


# --- Gallery: sphinx-gallery over examples/ ---------------------------------------------
# Policy. Every example with a ``--quick`` flag is executed with it (and its figures sent to
# a temporary folder by ``gallery_hooks.reset_argv``; ``gallery_hooks.scrape_figures`` puts
# them on the page): a tiny configuration that runs in seconds, so the gallery shows real
# output and real figures, of the quick configuration, not the numbers of the full runs
# quoted in the guide. ``examples/demo.py`` has no quick mode (it runs the demo benchmark
# suite, about 90 s on 2 cores), so it is shown with its code but not executed
# (``filename_pattern``). The six quick runs take about 10 s together and the whole build
# about 30 s on 2 CPU cores; sphinx-gallery re-runs an example only when its file changed.
# ``-D plot_gallery=0`` builds the gallery without executing anything.
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/(?!demo\.py$)[^/]+\.py$",
    "ignore_pattern": r"__init__\.py",
    "reset_argv": "gallery_hooks.reset_argv",
    "image_scrapers": ("gallery_hooks.scrape_figures",),
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "show_signature": False,
    "remove_config_comments": True,
    "min_reported_time": 1,
}

# --- HTML --------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"sklearn-moe {release}"
html_static_path: list[str] = []
