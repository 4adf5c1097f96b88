"""The contract between the public functions of :mod:`lsoftmax_core` and the array libraries
that run them: one :class:`Backend` per library (NumPy on the CPU, CuPy on CUDA devices).

``lsoftmax_core.forward`` and the other public functions check nothing about the library
themselves: they find the backend of their arrays (:func:`backend_for`) and call it.  A
backend holds

* ``name`` and ``dtypes``: the library and the floating dtypes of x and w it computes in;
* the layer ops: ``prepare`` (every argument check of the library, labels included where
  they are host data), ``forward``, ``backward``, ``add_margin``, ``add_margin_grad``, with
  the keyword signatures of the public functions (margin and beta already given);
* ``loss``: the fused cross-entropy engine for the library (:class:`LossOps`), loaded on
  first use, so that importing the layer does not import the loss.

CuPy's backend module is imported only when a CuPy array is met (a CuPy array implies that
CuPy is already imported), so this module imports neither CuPy nor any framework.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Protocol

import numpy as np

from .checks import Problem

__all__ = ["Backend", "LossOps", "backend_for", "get_backend"]


class LossOps(Protocol):
    """The fused cross-entropy of one array library (see ``lsoftmax_core.cross_entropy``);
    ``opts`` is the resolved :class:`lsoftmax_core.LossOptions`."""

    def cross_entropy(self, x: Any, w: Any, label: Any, opts: Any, *, return_lse: bool = False) -> Any: ...

    def cross_entropy_backward(
        self, grad_loss: Any, x: Any, w: Any, label: Any, opts: Any, *, lse: Any = None, class_start: int = 0,
        num_classes: int | None = None,
    ) -> tuple[Any, Any]: ...  # fmt: skip

    def cross_entropy_with_grad(self, x: Any, w: Any, label: Any, opts: Any) -> tuple[Any, Any, Any]: ...

    def cross_entropy_shard_stats(
        self, x: Any, w: Any, label: Any, opts: Any, *, class_start: int, num_classes: int
    ) -> tuple[Any, Any]: ...


class Backend(Protocol):
    """What the public functions need of an array library's implementation."""

    name: str
    dtypes: tuple[np.dtype[Any], ...]

    def prepare(self, x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None) -> Problem:
        ...

    def forward(self, x: Any, w: Any, label: Any, *, margin: object, beta: object, out: Any = None,
                return_stats: bool = False) -> Any: ...  # fmt: skip

    def backward(self, grad_logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object,
                 out: Any = None, stats: Any = None) -> tuple[Any, Any]: ...  # fmt: skip

    def add_margin(self, logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object,
                   checked: Problem | None = None, return_stats: bool = False) -> Any: ...  # fmt: skip

    def add_margin_grad(self, grad_x: Any, grad_w: Any, grad_logits: Any, x: Any, w: Any, label: Any, *,
                        margin: object, beta: object, checked: Problem | None = None,
                        stats: Any = None) -> tuple[Any, Any]: ...  # fmt: skip

    @property
    def loss(self) -> LossOps: ...


class _ModuleBackend:
    """A :class:`Backend` whose layer ops are one module's functions and whose loss engine is
    ``engine()`` of another module, imported on first use."""

    __slots__ = ("_loss", "_loss_module", "add_margin", "add_margin_grad", "backward", "dtypes", "forward",
                 "name", "prepare")  # fmt: skip

    def __init__(self, name: str, module: str, loss_module: str) -> None:
        mod = importlib.import_module(module)
        self.name = name
        self.dtypes: tuple[np.dtype[Any], ...] = mod.DTYPES
        # Bound once: a call costs one attribute lookup, as a module function's would.
        self.prepare = mod.prepare
        self.forward = mod.forward
        self.backward = mod.backward
        self.add_margin = mod.add_margin
        self.add_margin_grad = mod.add_margin_grad
        self._loss_module = loss_module
        self._loss: LossOps | None = None

    @property
    def loss(self) -> LossOps:
        if self._loss is None:
            self._loss = importlib.import_module(self._loss_module).engine()
        return self._loss

    def __repr__(self) -> str:
        return f"<lsoftmax_core backend {self.name!r}>"


_MODULES = {
    "numpy": (f"{__package__}._numpy_backend", f"{__package__}._numpy_loss"),
    "cupy": (f"{__package__}._cupy_backend", f"{__package__}._cupy_loss"),
}
_BACKENDS: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    """The backend of array library ``name`` ("numpy" or "cupy"; "cupy" imports CuPy)."""
    backend = _BACKENDS.get(name)
    if backend is None:
        if name not in _MODULES:
            raise ValueError(f"name={name!r} must be one of {sorted(_MODULES)}")
        backend = _BACKENDS[name] = _ModuleBackend(name, *_MODULES[name])
    return backend


NUMPY: Backend = get_backend("numpy")


def _library(a: Any) -> str | None:
    if isinstance(a, np.ndarray):
        return "numpy"
    cupy = sys.modules.get("cupy")  # a CuPy array implies CuPy is already imported
    if cupy is not None and isinstance(a, cupy.ndarray):
        return "cupy"
    return None


def backend_for(names: tuple[str, ...], *arrays: Any) -> Backend:
    """The backend of the arrays' library; all must come from the same one (a TypeError naming
    the first array that does not).  ``names`` name the arrays in the errors (the first
    ``len(arrays)`` of them): plain NumPy arrays, every call's common case, are decided before
    any naming work."""
    for a in arrays:
        if type(a) is not np.ndarray:
            break
    else:
        return NUMPY
    (first_name, first), *rest = zip(names, arrays)
    lib = _library(first)
    if lib is None:
        raise TypeError(
            f"{first_name} must be a numpy.ndarray or cupy.ndarray, got {type(first).__module__}."
            f"{type(first).__qualname__} (use lsoftmax_core.adapters for framework tensors)"
        )
    for name, a in rest:
        if _library(a) != lib:
            raise TypeError(
                f"{name} must be a {lib}.ndarray like {first_name}, got "
                f"{type(a).__module__}.{type(a).__qualname__}"
            )
    return get_backend(lib)
