"""The CuPy backend's per-device state, shared by the layer (:mod:`._cupy_backend`) and the
fused loss (:mod:`._cupy_loss`): the compiled kernels (one RawModule per element dtype), the
bad-label record in pinned mapped host memory, the backward's workspaces and the calls'
serial numbers.

Labels are checked on the device without a host synchronisation: a kernel that meets a label
outside [0, C) records the smallest bad index and writes the call's serial number to the
pinned record, which the host reads (no CUDA call) at the start of the next call on the same
device (:func:`state`) or at :func:`check_labels`.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import threading
from collections import OrderedDict
from typing import Any

import cupy
import numpy as np
from cupy.cuda import runtime

from . import _cupy_plan as plan
from .checks import supported_dtypes

__all__ = ["DTYPES", "DeviceState", "Workspace", "check_labels", "contiguous", "finish", "next_serial", "state"]

#: The floating dtypes the CUDA kernels compute in.
DTYPES = supported_dtypes("cupy")

_BLOCK = (plan.BLOCK,)
_SERIAL = itertools.count(1)
_LOCK = threading.Lock()
_MODULES: dict[str, cupy.RawModule] = {}
_MAX_WORKSPACES = 8  # (stream, thread) pairs remembered per device
_SYNC_CHECK = os.environ.get("LSOFTMAX_CUPY_SYNC_LABEL_CHECK", "") not in ("", "0")
_OPS = {plan.OP_FORWARD: "forward", plan.OP_BACKWARD: "backward"}


def _module(dtype_name: str) -> cupy.RawModule:
    """One RawModule per element dtype; CuPy compiles it once per device (and caches the
    binary on disk) when a kernel is first fetched."""
    mod = _MODULES.get(dtype_name)
    if mod is None:
        with _LOCK:
            mod = _MODULES.get(dtype_name)
            if mod is None:
                mod = cupy.RawModule(
                    code=plan.kernel_source(),
                    options=plan.NVRTC_OPTIONS,
                    name_expressions=plan.name_expressions(dtype_name),
                )
                _MODULES[dtype_name] = mod
    return mod


class Workspace:
    __slots__ = ("classes", "coef")

    def __init__(self) -> None:
        self.coef = cupy.empty(0, dtype=cupy.float64)
        self.classes = cupy.empty(0, dtype=cupy.uint32)

    def get(self, ncoef: int, nclasses: int) -> tuple[cupy.ndarray, cupy.ndarray]:
        """(coef, classes), grown (never shrunk) to at least these sizes."""
        if self.coef.size < ncoef:
            self.coef = cupy.empty(ncoef, dtype=cupy.float64)
        if self.classes.size < nclasses:
            self.classes = cupy.empty(nclasses, dtype=cupy.uint32)
        return self.coef, self.classes


class DeviceState:
    """Per-device constants, kernels, bad-label record and workspaces."""

    def __init__(self, dev: int) -> None:
        self.dev = dev
        self.functions: dict[str, Any] = {}
        # {serial, C, op, unused}: written by kernels, read by the host without a CUDA call.
        words = plan.RECORD_WORDS
        ptr = runtime.hostAlloc(8 * words, runtime.hostAllocMapped | runtime.hostAllocPortable)
        self.rec = np.ctypeslib.as_array((ctypes.c_int64 * words).from_address(ptr))
        self.rec[:] = 0
        # One upload of the threshold table per device.
        self.bufs = plan.DeviceBuffers.create(cupy, runtime.pointerGetAttributes(ptr).devicePointer)
        self.err_key = self.bufs.err_key
        self.workspaces: OrderedDict[tuple[int, int], Workspace] = OrderedDict()

    def function(self, name: str, dtype_name: str) -> Any:
        fn = self.functions.get(name)
        if fn is None:
            fn = _module(dtype_name).get_function(name).kernel  # this device's Function
            self.functions[name] = fn
        return fn

    def workspace(self) -> Workspace:
        # Per stream, and per thread: two threads on the legacy default stream would otherwise
        # interleave one workspace's launches (B2 of one call reading B1 of another).
        key = (cupy.cuda.get_current_stream().ptr, threading.get_ident())
        ws = self.workspaces.get(key)
        if ws is None:
            ws = self.workspaces[key] = Workspace()
            while len(self.workspaces) > _MAX_WORKSPACES:
                # Freed memory returns to CuPy's pool for its own stream only, so work
                # still queued on that stream is unaffected.
                self.workspaces.popitem(last=False)
        else:
            self.workspaces.move_to_end(key)
        return ws

    def launch(self, dtype_name: str, name: str, grid: tuple[int, int], args: tuple[Any, ...]) -> None:
        self.function(name, dtype_name)(grid, _BLOCK, args)

    def run(self, call: plan.Call, dtype_name: str) -> None:
        call.run(functools.partial(self.launch, dtype_name), _zero)

    def raise_pending(self) -> None:
        """Synchronise, then raise the recorded bad-label error and clear the record."""
        with cupy.cuda.Device(self.dev):
            runtime.deviceSynchronize()
            serial, c, op = (int(v) for v in self.rec[:3])
            if serial == 0:
                return
            key = int(self.err_key.get()[0])
            self.err_key.fill(plan.ERR_KEY_NONE)
            runtime.deviceSynchronize()
        self.rec[:] = 0
        where = f"found by the GPU in {_OPS.get(op, '?')} call #{serial} on CUDA device {self.dev}"
        note = (
            "labels are checked on the device without synchronising: the error surfaces at the next "
            "forward/backward on that device or at lsoftmax_core.check_labels(); "
            "rows with bad labels were left uncorrected"
        )
        if key == int(plan.ERR_KEY_NONE):
            raise ValueError(f"label must lie in [0, C) = [0, {c}) ({where}; {note})")
        index, value = key >> 32, int(np.uint32(key & 0xFFFFFFFF).view(np.int32))
        shown = f"label[{index}]={value}"
        if value in (2**31 - 1, -(2**31)):
            shown = f"label[{index}]{'>=' if value > 0 else '<='}{value}"
        raise ValueError(f"label must lie in [0, C) = [0, {c}): {shown} ({where}; {note})")


def _zero(buf: cupy.ndarray, count: int) -> None:
    """Clear buf[:count] on the current stream (a memset node: CUDA graphs replay it too)."""
    stream = cupy.cuda.get_current_stream().ptr
    runtime.memsetAsync(buf.data.ptr, 0, count * buf.itemsize, stream)


_STATES: dict[int, DeviceState] = {}


def state(**arrays: Any) -> DeviceState:
    """The current device's state, after checking every array lives there and raising any
    bad-label error recorded by an earlier call."""
    dev = runtime.getDevice()
    for name, a in arrays.items():
        if a.data.device_id != dev:
            raise ValueError(
                f"{name} is on CUDA device {a.data.device_id} but the current device is {dev}; "
                f"call inside `with cupy.cuda.Device({a.data.device_id}):`"
            )
    st = _STATES.get(dev)
    if st is None:
        with _LOCK:
            st = _STATES.get(dev)
            if st is None:
                st = _STATES[dev] = DeviceState(dev)
    if st.rec[0] != 0:
        st.raise_pending()
    return st


_UINT_OF_SIZE = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def contiguous(a: cupy.ndarray) -> cupy.ndarray:
    """A C-contiguous array (a copy only if needed), copied as unsigned integers of the same
    width: CuPy's own float16/bfloat16 kernels would need cuda_fp16.h / cuda_bf16.h."""
    if a.flags.c_contiguous:
        return a
    return cupy.ascontiguousarray(a.view(_UINT_OF_SIZE[a.dtype.itemsize])).view(a.dtype)


def finish(st: DeviceState) -> None:
    if _SYNC_CHECK:
        runtime.deviceSynchronize()
        if st.rec[0] != 0:
            st.raise_pending()


def next_serial() -> int:
    """A new call's serial number (named in a later bad-label report)."""
    return next(_SERIAL)


def check_labels(device: int | None = None) -> None:
    """Synchronise ``device`` (default: the current one) and raise the ValueError of any
    out-of-range label met by its kernels since the last report."""
    dev = runtime.getDevice() if device is None else int(device)
    st = _STATES.get(dev)
    if st is None:
        return
    with cupy.cuda.Device(dev):
        runtime.deviceSynchronize()
    if st.rec[0] != 0:
        st.raise_pending()
