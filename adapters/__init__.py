"""Thin DLPack bridges from PyTorch, JAX and MXNet to lsoftmax_core (no maths here).

Import one explicitly, e.g. ``import lsoftmax_core.adapters.torch``; this package
imports no framework by itself.
"""

__all__: list[str] = []
