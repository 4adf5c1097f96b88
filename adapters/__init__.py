"""Thin DLPack bridges from PyTorch, JAX and MXNet to lsoftmax_core (no maths here).

Import one explicitly, e.g. ``import lsoftmax_core.adapters.torch``; this package
imports no framework by itself.
"""

# One file, one module name: this folder is installed as lsoftmax_core.adapters and nothing else.
if __name__ != "lsoftmax_core.adapters":
    raise ImportError(f"import lsoftmax_core.adapters, not {__name__} (install the project: pip install -e .)")

__all__: list[str] = []
