"""lsoftmax-demo: an application on top of the library (the PyTorch adapter), not part of
the framework-agnostic core; ``lsoftmax_core`` never imports it.

    pip install -e '.[demo]' && lsoftmax-demo      # or: python -m lsoftmax_core.demo

See :mod:`lsoftmax_core.demo.app` and docs/demo.md.
"""

# One file, one module name: this folder is installed as lsoftmax_core.demo and nothing else.
if __name__ != "lsoftmax_core.demo":
    raise ImportError(f"import lsoftmax_core.demo, not {__name__} (install the project: pip install -e .)")

from .app import main  # noqa: E402

__all__ = ["main"]
