"""Argument checks without computing: the contract between the core, its backends and
the framework adapters.

Every check raises a ``ValueError``/``TypeError`` naming the argument and the bad value.
Everything here except :func:`check_label_values` looks only at shapes, dtypes and Python
scalars, so it never touches array data and never synchronises a device; it works on any
array object with ``shape``, ``ndim`` and a NumPy ``dtype`` (NumPy, CuPy, JAX).  The one
data-dependent check, labels in [0, C), is :func:`check_label_values` for host memory; the
CuPy backend checks device labels on the GPU (:func:`lsoftmax_core.check_labels`).
"""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ._chebyshev import MAX_MARGIN

__all__ = [
    "Problem",
    "REDUCTIONS",
    "check_arrays",
    "check_beta",
    "check_integer",
    "check_label_values",
    "check_lse_values",
    "check_margin",
    "check_nonnegative",
    "check_out",
    "check_reduction",
    "check_shard",
    "split_margin",
    "supported_dtypes",
]

#: The reductions of the cross-entropy, as in torch.nn.functional.cross_entropy.
REDUCTIONS = ("mean", "sum", "none")

#: The floating dtypes of x and w per array library (bfloat16 is added for CuPy at run
#: time, see :func:`supported_dtypes`).
_DTYPES: dict[str, tuple[np.dtype[Any], ...]] = {
    "numpy": (np.dtype(np.float32), np.dtype(np.float64)),
    "cupy": (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16)),
}


@functools.cache
def _cupy_bfloat16() -> tuple[np.dtype[Any], ...]:
    """(bfloat16,) when ml_dtypes is installed and CuPy's matmul accepts it, else ()."""
    try:
        import ml_dtypes
        from cupy._core._routines_linalg import to_compute_type_index

        dt = np.dtype(ml_dtypes.bfloat16)
        to_compute_type_index(dt)
    except Exception:  # ImportError, or a CuPy without bfloat16 GEMMs
        return ()
    return (dt,)


def supported_dtypes(library: str = "numpy") -> tuple[np.dtype[Any], ...]:
    """The floating dtypes of x and w the backend for ``library`` computes in.

    ``"numpy"`` (the CPU backend): float32, float64.  ``"cupy"`` (the CUDA kernels):
    float32, float64, float16, and bfloat16 where ml_dtypes is installed and the installed
    CuPy's matmul takes it (asking for ``"cupy"`` imports CuPy).  Adapters accept what the
    backend that will run their device's arrays accepts.
    """
    if library not in _DTYPES:
        raise ValueError(f"library={library!r} must be one of {sorted(_DTYPES)}")
    if library == "cupy":
        return _DTYPES["cupy"] + _cupy_bfloat16()
    return _DTYPES[library]


@dataclass(frozen=True)
class Problem:
    """The checked sizes and hyper-parameters of one call, and the arrays they were checked
    for (``inputs``: x, w, label, grad_logits or None).  ``labels_checked``: the label values
    were found in [0, C) (host labels; a problem made without that scan makes the NumPy
    backend scan them before it indexes with them)."""

    n: int
    c: int
    d: int
    dtype: np.dtype[Any]
    margin: int
    beta: float
    inputs: tuple[Any, ...] = field(default=(), repr=False, compare=False)
    labels_checked: bool = field(default=False, compare=False)
    #: The margin object of a kind that normalises (SphereFace, CosFace, ArcFace,
    #: CombinedMargin; then ``margin`` is 1: the L-Softmax machinery sees a plain layer of the
    #: normalised rows), or None for L-Softmax (``margin`` its m).
    family: Any = None

    def same_call(
        self, x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
    ) -> Problem:
        """This problem, if it was checked for these very arrays (identity: O(1), no data
        read) and hyper-parameters; a ValueError naming ``checked`` otherwise."""
        kept = self.inputs
        if len(kept) != 4 or not (kept[0] is x and kept[1] is w and kept[2] is label and kept[3] is grad_logits):
            raise ValueError(
                "checked= must be lsoftmax_core.check_arguments()'s result for the same x, w, label "
                "(and grad_logits) objects"
            )
        m, family = split_margin(margin)
        if check_margin(m) != self.margin or family != self.family or check_beta(beta) != self.beta:
            made = self.margin if self.family is None else self.family
            raise ValueError(
                f"checked= was made for margin={made!r}, beta={self.beta}, not margin={margin!r}, beta={beta!r}"
            )
        return self

    def with_grad_logits(self, grad_logits: Any) -> Problem:
        """The backward's problem for the call this one was checked for: ``grad_logits``
        checked for shape (N, C) and dtype, every other check (labels included) taken from
        this one; for an adapter that keeps the forward's checked problem until the backward
        of the same arrays (which a framework's saved tensors guarantee unchanged).  Pass the
        result as ``checked=`` to :func:`lsoftmax_core.add_margin_grad` with the same arrays."""
        if len(self.inputs) != 4 or self.inputs[3] is not None:
            raise ValueError("with_grad_logits needs the problem check_arguments() returned without grad_logits")
        _check_grad_logits(grad_logits, self.n, self.c, self.dtype)
        x, w, label, _ = self.inputs
        return Problem(
            self.n, self.c, self.d, self.dtype, self.margin, self.beta, (x, w, label, grad_logits), self.labels_checked,
            self.family,
        )


def check_integer(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a Python int in [minimum, maximum], or an error naming ``name``."""
    if type(value) is int and value >= minimum and (maximum is None or value <= maximum):
        return value  # the common case, without the ABC checks below
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer >= {minimum}, not {type(value).__name__}")
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name}={value!r} must be an integer {bound}")
    return v


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a finite Python float >= 0, or an error naming ``name``."""
    if type(value) is float and 0.0 <= value < math.inf:
        return value  # the common case, without the ABC checks below
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number >= 0, not {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return v


def check_margin(margin: object) -> int:
    """The margin as a Python int in [1, MAX_MARGIN]."""
    return check_integer("margin", margin, 1, MAX_MARGIN)


def split_margin(margin: object) -> tuple[object, Any]:
    """``(m, None)`` for L-Softmax (an int, unchecked here, or ``LSoftmax(m)``: the same path,
    bit for bit) and ``(1, margin)`` for a kind that normalises; anything else that is not an
    integer is a TypeError naming ``margin`` (``lsoftmax_core.margins.margin_of``)."""
    if type(margin) is int:  # the common case, before any import or isinstance chain
        return margin, None
    from .margins import LSoftmax, Margin, margin_of

    if isinstance(margin, Margin):
        kind = margin_of(margin)  # one of the five known kinds, or a TypeError
        return (kind.m, None) if isinstance(kind, LSoftmax) else (1, kind)  # type: ignore[attr-defined]
    if isinstance(margin, numbers.Integral) or isinstance(margin, (float, np.floating)):
        return margin, None  # check_margin names a bad value
    margin_of(margin)  # raises the TypeError that lists the margin kinds
    return margin, None


def check_beta(beta: object) -> float:
    """beta (lambda in the paper) as a Python float, finite and >= 0."""
    return check_nonnegative("beta", beta)


def _check_ndim(name: str, a: Any, ndim: int) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)} ({a.ndim}-D)")


def check_arrays(
    x: Any,
    w: Any,
    label: Any,
    margin: object,
    beta: object,
    *,
    dtypes: tuple[np.dtype[Any], ...],
    grad_logits: Any = None,
    labels_checked: bool = False,
) -> Problem:
    """Check shapes, dtypes and hyper-parameters (not label values); the problem's sizes.

    ``dtypes`` are the floating dtypes the backend that will run supports
    (:func:`supported_dtypes`).  ``labels_checked`` is recorded in the result: True only
    where the caller scans the label values (:func:`check_label_values`) before using it.
    """
    margin, family = split_margin(margin)
    m = check_margin(margin)
    b = check_beta(beta)
    if x.ndim != 2 or w.ndim != 2 or label.ndim != 1:  # one test for the common case
        _check_ndim("x", x, 2)
        _check_ndim("w", w, 2)
        _check_ndim("label", label, 1)
    n, d = int(x.shape[0]), int(x.shape[1])
    c, dw = int(w.shape[0]), int(w.shape[1])
    if dw != d:
        raise ValueError(
            f"x and w must have the same feature size D: x.shape={tuple(x.shape)}, "
            f"w.shape={tuple(w.shape)} (w is (C, D), like a Linear layer's weight)"
        )
    if c == 0:
        raise ValueError(f"w must have at least one class (row): w.shape={tuple(w.shape)}")
    if tuple(label.shape) != (n,):
        raise ValueError(f"label must have shape (N,) = ({n},), got label.shape={tuple(label.shape)}")
    if x.dtype != w.dtype:
        raise TypeError(
            f"x and w must have the same dtype (no silent promotion): x.dtype={x.dtype}, w.dtype={w.dtype}"
        )
    if x.dtype not in dtypes:
        names = ", ".join(str(t) for t in dtypes)
        raise TypeError(f"x.dtype={x.dtype} is not supported by this backend (supported: {names})")
    if label.dtype.kind not in "iu":
        raise TypeError(f"label must have an integer dtype, got label.dtype={label.dtype}")
    if grad_logits is not None:
        _check_grad_logits(grad_logits, n, c, x.dtype)
    return Problem(n, c, d, np.dtype(x.dtype), m, b, (x, w, label, grad_logits), labels_checked, family)  # positional: cheaper


def _check_grad_logits(grad_logits: Any, n: int, c: int, dtype: Any) -> None:
    if not (hasattr(grad_logits, "shape") and hasattr(grad_logits, "dtype")):
        raise TypeError(
            f"grad_logits must be an (N, C) = ({n}, {c}) array of dtype {dtype}, got "
            f"{type(grad_logits).__module__}.{type(grad_logits).__qualname__}"
        )
    if tuple(grad_logits.shape) != (n, c):
        raise ValueError(
            f"grad_logits must have shape (N, C) = ({n}, {c}), got grad_logits.shape={tuple(grad_logits.shape)}"
        )
    if grad_logits.dtype != dtype:
        raise TypeError(f"grad_logits.dtype={grad_logits.dtype} must equal x.dtype={dtype}")


def check_shard(class_start: object, num_classes: object, c: int) -> tuple[int, int]:
    """``(class_start, num_classes)`` of a class shard: w's ``c`` rows are the classes
    ``[class_start, class_start + c)`` of ``num_classes`` (labels are indices into all of
    them).  ``num_classes=None`` means w holds every class: ``(0, c)``."""
    if num_classes is None:
        if check_integer("class_start", class_start, 0) != 0:
            raise ValueError(f"class_start={class_start!r} needs num_classes (the total number of classes)")
        return 0, c
    total = check_integer("num_classes", num_classes, 1)
    if total < c:
        raise ValueError(f"num_classes={num_classes!r} is smaller than w's C={c} rows")
    start = check_integer("class_start", class_start, 0)
    if start + c > total:
        raise ValueError(
            f"class_start={class_start!r} puts w's C={c} rows past num_classes={total}: "
            f"class_start must lie in [0, {total - c}]"
        )
    return start, total


_UNSIGNED = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16), 4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


def check_label_values(label: Any, c: int, ignore_index: int | None = None) -> None:
    """Labels held in host memory (a NumPy array) must lie in [0, C), or equal
    ``ignore_index`` where one is given (the cross-entropy's ignored rows); O(N)."""
    if label.size == 0:
        return
    kind, size = label.dtype.kind, label.dtype.itemsize
    if kind == "u" or (kind == "i" and c <= 1 << (8 * size - 1)):
        # One reduction decides the common case: read as unsigned, a negative label is at
        # least 2^(bits-1) >= C, so max < C means every label lies in [0, C).
        unsigned = label if kind == "u" else label.view(_UNSIGNED[size])
        if np.maximum.reduce(unsigned) < c:
            return
    elif np.minimum.reduce(label) >= 0 and np.maximum.reduce(label) < c:
        return
    bad = (label < 0) | (label >= c)
    if ignore_index is not None:
        bad &= label != ignore_index
    if bad.any():
        i = int(np.argmax(bad))
        also = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
        raise ValueError(f"label must lie in [0, C) = [0, {c}){also}: label[{i}]={int(label[i])}")


def check_lse_values(lse: Any, valid: Any) -> None:
    """A log-sum-exp handed to a backward (host memory) must be finite on the rows that are
    not ignored (``valid``); O(N).  A class-parallel caller whose device holds no class makes
    this check itself, so that every device reaches the core's verdict."""
    bad = valid & ~np.isfinite(lse)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"lse must be finite on the rows that are not ignored: lse[{i}]={float(lse[i])!r}")


def check_reduction(reduction: object) -> str:
    """One of :data:`REDUCTIONS`."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    return str(reduction)


def check_out(
    name: str,
    out: Any,
    shape: tuple[int, ...],
    dtype: np.dtype[Any],
    *inputs: Any,
    overlaps: Callable[[Any, Any], bool] = np.may_share_memory,
) -> None:
    """An array the caller hands in to be updated in place: right shape and dtype,
    writeable, and not overlapping any input (an in-place update would corrupt it).

    ``overlaps`` is the array library's own bounds test (NumPy's by default); it must look
    at pointers and strides only, never at the data.
    """
    if tuple(out.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {name}.shape={tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name}.dtype={out.dtype} must equal x.dtype={dtype}")
    if not getattr(out.flags, "writeable", True):
        raise ValueError(f"{name} must be writeable (it is updated in place); got a read-only array")
    for a in inputs:
        if overlaps(out, a):
            raise ValueError(f"{name} must not share memory with the inputs (it is updated in place)")
