"""Sphinx configuration of the API reference (``nox -s docs``; strict: a warning fails it).

The pages are built from the docstrings of the installed package by autodoc; napoleon
reads the NumPy- and Google-style sections some docstrings use.  Every public name is
listed by hand in the pages, grouped as a reader looks for it; tests/test_docs.py fails
when a name of an ``__all__`` has no entry.
"""

from __future__ import annotations

import inspect
from typing import Any

from sphinx.util.inspect import stringify_signature

import lsoftmax_core

project = "lsoftmax-core"
author = "the lsoftmax-core developers"
copyright = "the lsoftmax-core developers, Apache-2.0"
release = version = lsoftmax_core.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]

# MXNet 1.9.1 needs numpy < 1.24 and cannot be installed beside the numpy 2 that the other
# adapters' frameworks need, so its adapter is documented against a stand-in module: autodoc
# mocks mxnet (only it).  PyTorch and JAX are installed in the docs session and imported for
# real, so their adapters' signatures are the ones users get.  CuPy is never imported by the
# pages (lsoftmax_core imports it only when CuPy arrays are passed).
autodoc_mock_imports = ["mxnet"]

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# A method without a docstring of its own (forward of an nn.Module) is left out rather than
# shown with the framework's base-class text.
autodoc_inherit_docstrings = False
add_module_names = False
napoleon_google_docstring = True
napoleon_numpy_docstring = True

# Nitpicky mode (-n): every cross-reference must resolve.  The frameworks' and the standard
# library's own types are documented elsewhere (no network for intersphinx in CI), so
# references to them are left as plain text instead of being reported.
nitpicky = True
nitpick_ignore_regex = [
    ("py:.*", r"(np|numpy|npt|numpy\.typing|torch|jax|jaxlib|mx|mxnet|cupy)(\..*)?"),
    ("py:.*", r"(collections\.abc|typing|types|os|pathlib)\..*"),
]

html_theme = "alabaster"
html_title = f"lsoftmax-core {release}: API reference"
html_static_path: list[str] = []
exclude_patterns = ["_build"]


def _own_signature_over_a_mocked_base(
    app: Any, what: str, name: str, obj: Any, options: Any, signature: str | None, return_annotation: str | None
) -> tuple[str, str | None] | None:
    """A class deriving from a mocked MXNet class would show the mock's ``(*args, **kwargs)``
    (autodoc reads the mock's ``__new__`` first): show the class's own ``__init__`` instead."""
    if what != "class" or "__init__" not in vars(obj):
        return None
    if not any(getattr(base, "__sphinx_mock__", False) for base in obj.__mro__[1:]):
        return None
    sig = inspect.signature(obj.__init__)
    params = list(sig.parameters.values())[1:]  # without self
    own = sig.replace(parameters=params, return_annotation=inspect.Signature.empty)
    return stringify_signature(own), return_annotation


def setup(app: Any) -> None:
    app.connect("autodoc-process-signature", _own_signature_over_a_mocked_base)
