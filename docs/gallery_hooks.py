"""sphinx-gallery hooks of the documentation build (referenced by name from ``conf.py``).

- :func:`reset_argv`: the command line each example runs with in the gallery: ``--quick``
  (a tiny configuration, seconds), and ``--out`` a temporary folder for the examples that
  write figures, so that the build never overwrites the committed ``examples/figures/``.
- :func:`scrape_figures`: the examples save their figures as PNG files rather than leaving
  them open in pyplot, so this scraper collects the new files in that folder and hands them
  to the gallery page.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from sphinx_gallery.scrapers import figure_rst

# The examples that take --quick, and whether they also take --out (they write figures).
QUICK_EXAMPLES = {
    "grid_search_pipeline": False,
    "predictive_distributions": True,
    "regime_switching": True,
    "select_n_experts": True,
    "training_dynamics": True,
    "tune_optuna": True,
}

_FIGURES = Path(tempfile.mkdtemp(prefix="sklearn-moe-gallery-"))
atexit.register(shutil.rmtree, _FIGURES, ignore_errors=True)


def _figure_dir(src_file) -> Path:
    return _FIGURES / Path(src_file).stem


def reset_argv(gallery_conf, script_vars) -> list[str]:
    """Command-line arguments of the example ``script_vars["src_file"]`` in the gallery."""
    name = Path(script_vars["src_file"]).stem
    if name not in QUICK_EXAMPLES:
        return []
    if not QUICK_EXAMPLES[name]:
        return ["--quick"]
    return ["--quick", "--out", str(_figure_dir(script_vars["src_file"]))]


def scrape_figures(block, block_vars, gallery_conf) -> str:
    """Copy the PNG files the example block wrote into the gallery's image paths."""
    folder = _figure_dir(block_vars["src_file"])
    seen = block_vars.setdefault("moe_figures_seen", set())
    new = sorted(path for path in folder.glob("*.png") if path.name not in seen) if folder.is_dir() else []
    image_paths = []
    for path, image_path in zip(new, block_vars["image_path_iterator"]):
        shutil.copyfile(path, image_path)
        seen.add(path.name)
        image_paths.append(image_path)
    return figure_rst(image_paths, gallery_conf["src_dir"])
