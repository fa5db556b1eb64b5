"""Sphinx configuration: the docs site (MyST Markdown pages, API from docstrings)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import clipjax  # noqa: E402

project = "clipjax"
author = "the clipjax authors"
release = clipjax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.intersphinx",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "_work", "book/_grids", "examples", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# Cross-references to optax/jax resolve when their inventories can be fetched;
# the build does not depend on it (offline builds just leave them as text).
intersphinx_mapping = {}
nitpicky = False

html_theme = "furo"
html_title = f"clipjax {release}"
