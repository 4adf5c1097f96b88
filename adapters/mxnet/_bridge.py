"""The MXNet adapter's bridge to the core (no maths here): CPU NDArrays as NumPy views, the
labels as class indices, and where a result is computed.

Data exchange.  MXNet 1.9.1 hands out DLPack *capsules* (``to_dlpack_for_read``), while
NumPy 1.23's ``np.from_dlpack`` wants an object with ``__dlpack__``/``__dlpack_device__``;
:func:`as_numpy` wraps the capsule, so data, weight and the incoming gradient reach the core
as read-only zero-copy views of MXNet's memory.  Labels are converted to an int64 copy
(:func:`label_indices`).  The plain GEMMs run on those views and the core's
``add_margin``/``add_margin_grad`` finish them in place.  When MXNet asks for a result to
be overwritten (``req == 'write'``, the default of ``simple_bind``, Module and Gluon) this
happens in MXNet's own buffer (:func:`output_view`, a writeable view); for ``'add'``
(gradient accumulation) and ``'inplace'`` the result goes through ``self.assign``, one
engine copy or add.
"""

from __future__ import annotations

import atexit
import ctypes
from typing import Any

import mxnet as mx
import numpy as np
import numpy.typing as npt
from mxnet.base import _LIB, check_call

import lsoftmax_core as lsm

__all__ = ["as_numpy", "label_indices", "output_view"]

# The dtypes of data and weight: the NumPy backend's (this adapter runs on CPU only).
_DTYPES = lsm.supported_dtypes("numpy")

_DL_CPU = 1  # DLPack's kDLCPU device type

# MXNet 1.9.1 aborts or hangs at interpreter exit while CustomOp work is still queued
# (apache/mxnet#15310): drain the engine first.  atexit runs handlers last-in first-out,
# so this runs before MXNet's own shutdown hook, registered when mxnet was imported.
atexit.register(mx.nd.waitall)


class _DLPackCapsule:
    """Presents one MXNet DLPack capsule through the ``__dlpack__`` protocol.

    ``np.from_dlpack`` in NumPy 1.23 accepts only such objects; it consumes the capsule
    (renaming it ``used_dltensor``) and calls MXNet's deleter when the view dies, so the
    NDArray's memory stays alive as long as the NumPy view does.
    """

    __slots__ = ("_capsule",)

    def __init__(self, capsule: Any) -> None:
        self._capsule = capsule

    def __dlpack__(self, stream: Any = None) -> Any:
        return self._capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return (_DL_CPU, 0)


def as_numpy(array: Any, name: str = "array") -> npt.NDArray[Any]:
    """A read-only NumPy view sharing memory with the CPU NDArray ``array`` (no copy).

    ``to_dlpack_for_read`` first waits for pending writes to ``array``.
    """
    _check_cpu_dense(array, name)
    return np.from_dlpack(_DLPackCapsule(mx.nd.to_dlpack_for_read(array)))


def _check_cpu_dense(array: Any, name: str) -> None:
    if not isinstance(array, mx.nd.NDArray):
        raise TypeError(
            f"{name} must be an mxnet NDArray, got {type(array).__module__}.{type(array).__qualname__}"
        )
    if array.context.device_type != "cpu":
        raise ValueError(f"{name} is on {array.context}: the MXNet adapter runs on CPU only (NumPy backend)")
    if array.stype != "default":
        raise TypeError(f"{name} must be a dense NDArray, got storage type {array.stype!r}")


def output_view(array: Any) -> npt.NDArray[Any]:
    """A writeable NumPy view of the dense CPU NDArray ``array`` that an operator is about to
    overwrite (its output, or an input gradient with ``req == 'write'``); no copy.

    NumPy's DLPack import is read-only, so the view is made from the buffer's address
    (``MXNDArrayGetData``), after ``MXNDArrayWaitToWrite`` has waited for every pending
    reader and writer of the array.  Valid while ``array`` lives: use it inside the call.
    """
    _check_cpu_dense(array, "output")
    check_call(_LIB.MXNDArrayWaitToWrite(array.handle))
    ptr = ctypes.c_void_p()
    check_call(_LIB.MXNDArrayGetData(array.handle, ctypes.byref(ptr)))
    shape = tuple(int(s) for s in array.shape)
    size = int(np.prod(shape))
    dtype = np.dtype(array.dtype)
    if size == 0:
        return np.empty(shape, dtype)
    buf = (ctypes.c_char * (size * dtype.itemsize)).from_address(ptr.value)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _dtype_names() -> str:
    return ", ".join(str(t) for t in _DTYPES)


def _result_buffer(dst: Any, req: str) -> Any:
    """Where to compute a result that MXNet wants in ``dst`` with ``req``: ``dst`` itself for
    'write', otherwise a new MXNet-owned array of the same shape and dtype (then assigned).

    Results never reach MXNet as NumPy-owned memory (``mx.nd.from_numpy(zero_copy=True)``):
    MXNet frees such an array through a Python callback, on the engine thread that drops it
    last, which can be after ``mx.nd.waitall()`` has returned; at interpreter exit Python
    ends that thread when it asks for the GIL, inside a C++ destructor, and the process
    aborts ("terminate called without an active exception").
    """
    if req == "write":
        return dst
    return mx.nd.empty(dst.shape, ctx=dst.context, dtype=dst.dtype)


def label_indices(label: npt.NDArray[Any], num_classes: int) -> npt.NDArray[np.int64]:
    """Class indices as int64 from MXNet's (usually floating) labels, or a ValueError naming label.

    A label must be finite, integer-valued and in [0, num_classes).  The checks happen in
    float64 before the cast, because casting NaN, inf or out-of-range floats to int is
    undefined and could turn a bad label into a valid-looking index.
    """
    lab = np.asarray(label)
    if lab.ndim != 1:
        raise ValueError(f"label must be 1-D (N,), got shape {lab.shape}")
    if lab.dtype.kind in "iu":
        bad = (lab < 0) | (lab >= num_classes)
    elif lab.dtype.kind == "f":
        f = lab.astype(np.float64)
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(f) | (f != np.floor(f)) | (f < 0) | (f >= num_classes)
    else:
        raise TypeError(f"label must have an integer or floating dtype, got label.dtype={lab.dtype}")
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"label must hold integer class indices in [0, {num_classes}): label[{i}]={lab[i].item()!r}"
        )
    return lab.astype(np.int64)

