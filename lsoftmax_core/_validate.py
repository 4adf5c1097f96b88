"""Argument checks shared by every backend.

Everything here looks only at shapes, dtypes and Python scalars, so it never touches
array data and never synchronises a device.  The one data-dependent check, labels in
[0, C), belongs to each backend (a host min/max for NumPy, a device-side flag for CuPy).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ._chebyshev import MAX_MARGIN

__all__ = [
    "Problem",
    "check_beta",
    "check_integer",
    "check_labels_host",
    "check_margin",
    "check_nonnegative",
    "check_out",
    "validate",
]


@dataclass(frozen=True)
class Problem:
    """The validated sizes and hyper-parameters of one call."""

    n: int
    c: int
    d: int
    dtype: np.dtype[Any]
    margin: int
    beta: float


def check_integer(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` as a Python int in [minimum, maximum], or an error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer >= {minimum}, not {type(value).__name__}")
    v = int(value)
    if v < minimum or (maximum is not None and v > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name}={value!r} must be an integer {bound}")
    return v


def check_nonnegative(name: str, value: object) -> float:
    """``value`` as a finite Python float >= 0, or an error naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a real number >= 0, not {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name}={value!r} must be a finite number >= 0")
    return v


def check_margin(margin: object) -> int:
    """The margin as a Python int in [1, MAX_MARGIN]."""
    return check_integer("margin", margin, 1, MAX_MARGIN)


def check_beta(beta: object) -> float:
    """beta (lambda in the paper) as a Python float, finite and >= 0."""
    return check_nonnegative("beta", beta)


def _check_ndim(name: str, a: Any, ndim: int) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(a.shape)} ({a.ndim}-D)")


def validate(
    x: Any,
    w: Any,
    label: Any,
    margin: object,
    beta: object,
    *,
    float_dtypes: tuple[np.dtype[Any], ...],
    grad_logits: Any = None,
) -> Problem:
    """Check shapes, dtypes and hyper-parameters; return the problem's sizes.

    ``float_dtypes`` are the floating dtypes the calling backend supports.
    """
    m = check_margin(margin)
    b = check_beta(beta)
    _check_ndim("x", x, 2)
    _check_ndim("w", w, 2)
    _check_ndim("label", label, 1)
    n, d = (int(s) for s in x.shape)
    c, dw = (int(s) for s in w.shape)
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
    if x.dtype not in float_dtypes:
        names = ", ".join(str(t) for t in float_dtypes)
        raise TypeError(f"x.dtype={x.dtype} is not supported by this backend (supported: {names})")
    if label.dtype.kind not in "iu":
        raise TypeError(f"label must have an integer dtype, got label.dtype={label.dtype}")
    if grad_logits is not None:
        if tuple(grad_logits.shape) != (n, c):
            raise ValueError(
                f"grad_logits must have shape (N, C) = ({n}, {c}), got grad_logits.shape={tuple(grad_logits.shape)}"
            )
        if grad_logits.dtype != x.dtype:
            raise TypeError(f"grad_logits.dtype={grad_logits.dtype} must equal x.dtype={x.dtype}")
    return Problem(n=n, c=c, d=d, dtype=np.dtype(x.dtype), margin=m, beta=b)


def check_labels_host(label: Any, c: int) -> None:
    """Labels held in host memory (a NumPy array) must lie in [0, C); O(N), no copy."""
    if label.size == 0:
        return
    bad = (label < 0) | (label >= c)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"label must lie in [0, C) = [0, {c}): label[{i}]={int(label[i])}")


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
    if any(overlaps(out, a) for a in inputs):
        raise ValueError(f"{name} must not share memory with the inputs (it is updated in place)")
