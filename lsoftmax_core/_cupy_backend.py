"""The CuPy (CUDA) backend: cuBLAS GEMMs plus O(N·D) kernels from kernels/lsoftmax.cu.

Same maths (docs/derivatives.md, where q_i and r_i are defined), signature, validation
and errors as the NumPy backend; CuPy arrays in, CuPy arrays out, on CuPy's current device
and stream.  What is launched, and how a call's arrays become kernel arguments, is
lsoftmax_core/_cupy_plan.py; this module adds the GEMMs, the device state and the launches.

forward:  logits = x @ w.T (cuBLAS), then ``lsm_forward`` rewrites the N target logits.
backward: grad_x = G @ w and grad_w = G.T @ x (cuBLAS), then ``lsm_backward_rows`` adds
          q_i to grad_x[i] and stores per-sample coefficients, and ``lsm_backward_classes``
          adds the per-class sums of r_i to grad_w.  Two GEMMs + O(N·D) work, no O(N·C·D).
small problems (``_cupy_plan.small``: D <= 128, N and C <= 512, N·C·D <= 2^18, margin > 1):
          ``lsm_small_forward`` and ``lsm_small_backward`` do the whole call, GEMMs
          included (in float64, rounded once), one launch each way and no workspace; there a
          call's cost is its host-side CUDA calls, and cuBLAS's were most of them.
          ``add_margin``/``add_margin_grad`` always take the GEMM outputs they are given.
margin 1: the GEMMs alone (psi(c) = c), plus a label check.
The fused cross-entropy (``lsoftmax_core.cross_entropy`` and its gradients on CuPy arrays)
is lsoftmax_core/_cupy_loss.py: cuBLAS GEMMs per chunk and the loss kernels, sharing this
module's device state (bad-label record, workspaces, serial numbers).

Numerics.  Per-sample statistics (norms, cos, psi) use float64 for float32 and float64
inputs and float32 for float16/bfloat16 inputs; the corrections are combined with the
GEMM output in float64 and rounded once.  float64 for float32 inputs, because CuPy
compiles every kernel with -ftz=true, so float32 arithmetic would flush float32
subnormal inputs (a row of tiny norm would lose its angle), and because float32
Chebyshev recurrences at m = 64 already spend 4e-6 of the float32 gradient tolerance of
1e-5 on psi' (tests/kernels/test_math_header.py measures it).  These are O(N·D) operations against
the GEMMs' O(N·C·D) (float64 runs at full rate on an H100/H200).  Rows are scaled by
powers of two before squaring, so huge and tiny norms neither overflow nor underflow.
bfloat16 values below 2^-126 (float32 subnormals) are flushed to zero in the float32
statistics; float16 values never are.
Element formats are converted with integer code (lsoftmax_math.cuh): no cuda_fp16.h /
cuda_bf16.h is needed (NVRTC does not find them in a pip-installed CuPy), and CuPy's
-ftz=true cannot flush float32 subnormal inputs or results.  The GEMMs are cuBLAS's gemmEx
as CuPy's matmul calls it (float32 accumulation for float16/bfloat16), issued directly
(lsoftmax_core/_cublas.py: a fraction of matmul's host time).  bfloat16 (ml_dtypes) is
accepted when the installed CuPy's matmul knows it.

Determinism.  No floating-point atomics: the same inputs give bitwise the same outputs on
every run, whatever the pointer alignment (kernels/lsoftmax.cu explains the fixed orders;
cuBLAS itself is deterministic on one stream with its default settings).

Labels are checked on the device, without a host synchronisation.  A kernel that meets a
label outside [0, C) never indexes with it: the sample is left as the plain linear layer's
(its target logit and its gradient terms are not corrected), the smallest bad index is
recorded on the device and the call's serial number is written to pinned, mapped host
memory.  The host reads that memory (no CUDA call) at the start of the next
``forward``/``backward`` on the same device, which then raises
``ValueError("label must lie in [0, C) = [0, C): label[i]=v ...")`` naming the earlier
call.  ``lsoftmax_core.check_labels()`` synchronises and raises at once; with the environment variable
``LSOFTMAX_CUPY_SYNC_LABEL_CHECK=1`` every call does so before returning (a debugging aid).

Memory.  The outputs are the only per-call allocations, except a contiguous copy of a
non-contiguous input and an int64 copy of labels that are neither int32 nor int64.  The
backward's workspace (4 float64 per sample, 3 uint32 per class; none on the small path) is
cached per device, stream and thread, and only grows; its per-class part is cleared by one
cudaMemsetAsync per call.  Nothing per call is baked into a launch, so CUDA-graph replays compute
correctly (bad-label reports then surface only at the next eager call or check_labels()).
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
from ._cublas import matmul
from .checks import Problem, check_arrays, check_out, supported_dtypes

__all__ = ["add_margin", "add_margin_grad", "backward", "check_labels", "forward", "prepare"]

_DTYPES = supported_dtypes("cupy")

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


class _Workspace:
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


class _DeviceState:
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
        self.workspaces: OrderedDict[tuple[int, int], _Workspace] = OrderedDict()

    def function(self, name: str, dtype_name: str) -> Any:
        fn = self.functions.get(name)
        if fn is None:
            fn = _module(dtype_name).get_function(name).kernel  # this device's Function
            self.functions[name] = fn
        return fn

    def workspace(self) -> _Workspace:
        # Per stream, and per thread: two threads on the legacy default stream would otherwise
        # interleave one workspace's launches (B2 of one call reading B1 of another).
        key = (cupy.cuda.get_current_stream().ptr, threading.get_ident())
        ws = self.workspaces.get(key)
        if ws is None:
            ws = self.workspaces[key] = _Workspace()
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


_STATES: dict[int, _DeviceState] = {}


def _state(**arrays: Any) -> _DeviceState:
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
                st = _STATES[dev] = _DeviceState(dev)
    if st.rec[0] != 0:
        st.raise_pending()
    return st


_UINT_OF_SIZE = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _contiguous(a: cupy.ndarray) -> cupy.ndarray:
    """A C-contiguous array (a copy only if needed), copied as unsigned integers of the same
    width: CuPy's own float16/bfloat16 kernels would need cuda_fp16.h / cuda_bf16.h."""
    if a.flags.c_contiguous:
        return a
    return cupy.ascontiguousarray(a.view(_UINT_OF_SIZE[a.dtype.itemsize])).view(a.dtype)


def _finish(st: _DeviceState) -> None:
    if _SYNC_CHECK:
        runtime.deviceSynchronize()
        if st.rec[0] != 0:
            st.raise_pending()


def _check_out(name: str, out: Any, shape: tuple[int, ...], p: Problem, *inputs: Any) -> None:
    if not isinstance(out, cupy.ndarray):
        raise TypeError(f"{name} must be a cupy.ndarray like x, got {type(out).__module__}.{type(out).__qualname__}")
    # CuPy's may_share_memory compares bounds on the host: no device work, no synchronisation.
    check_out(name, out, shape, p.dtype, *inputs, overlaps=cupy.may_share_memory)
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (the kernels update it in place by rows)")


def prepare(
    x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    """The argument checks of this backend on the host: shapes, dtypes, hyper-parameters
    (label values are checked on the GPU by the kernels)."""
    return check_arrays(x, w, label, margin, beta, dtypes=_DTYPES, grad_logits=grad_logits)


def _checked(
    checked: Problem | None, x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    if checked is None:
        return prepare(x, w, label, margin, beta, grad_logits)
    return checked.same_call(x, w, label, margin, beta, grad_logits)


def _no_stats(stats: Any) -> None:
    if stats is not None:
        raise TypeError(
            "stats must be None for CuPy arrays (the kernels compute the statistics in the backward; "
            f"forward(..., return_stats=True) gives None for them), got {type(stats).__module__}."
            f"{type(stats).__qualname__}"
        )


def forward(
    x: Any, w: Any, label: Any, *, margin: object, beta: object, out: Any = None, return_stats: bool = False
) -> Any:
    p = prepare(x, w, label, margin, beta)
    if out is not None:
        _check_out("out", out, (p.n, p.c), p, x, w, label)
    st = _state(x=x, w=w, label=label, **({} if out is None else {"out": out}))
    x, w = _contiguous(x), _contiguous(w)
    if plan.small(p):  # one kernel, GEMM included
        logits = cupy.empty((p.n, p.c), dtype=p.dtype) if out is None else out
        call = plan.bind_small_forward(p, cupy, st.bufs, x=x, w=w, label=label, logits=logits, serial=next(_SERIAL))
        st.run(call, p.dtype.name)
        _finish(st)
    else:
        logits = matmul(x, w.T, out)
        _margin_forward(st, p, logits, x, w, label)
    return (logits, None) if return_stats else logits


def add_margin(
    logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, checked: Problem | None = None,
    return_stats: bool = False,
) -> Any:  # fmt: skip
    p = _checked(checked, x, w, label, margin, beta)
    _check_out("logits", logits, (p.n, p.c), p, x, w, label)
    st = _state(logits=logits, x=x, w=w, label=label)
    _margin_forward(st, p, logits, _contiguous(x), _contiguous(w), label)
    return (logits, None) if return_stats else logits


def _margin_forward(st: _DeviceState, p: Problem, logits: Any, x: Any, w: Any, label: Any) -> None:
    call = plan.bind_forward(p, cupy, st.bufs, x=x, w=w, label=label, logits=logits, serial=next(_SERIAL))
    st.run(call, p.dtype.name)
    _finish(st)


def backward(
    grad_logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, out: Any = None,
    stats: Any = None,
) -> tuple[cupy.ndarray, cupy.ndarray]:  # fmt: skip
    p = prepare(x, w, label, margin, beta, grad_logits)
    _no_stats(stats)
    outs: dict[str, Any] = {}
    if out is not None:
        outs = {"out[0]": out[0], "out[1]": out[1]}
        _check_out("out[0]", out[0], (p.n, p.d), p, grad_logits, x, w, label)
        _check_out("out[1]", out[1], (p.c, p.d), p, grad_logits, x, w, label, out[0])
    st = _state(grad_logits=grad_logits, x=x, w=w, label=label, **outs)
    g, x, w = _contiguous(grad_logits), _contiguous(x), _contiguous(w)
    if plan.small(p):  # one kernel, GEMMs included
        grad_x = cupy.empty((p.n, p.d), dtype=p.dtype) if out is None else out[0]
        grad_w = cupy.empty((p.c, p.d), dtype=p.dtype) if out is None else out[1]
        call = plan.bind_small_backward(
            p, cupy, st.bufs, grad_logits=g, x=x, w=w, label=label, grad_x=grad_x, grad_w=grad_w,
            serial=next(_SERIAL),
        )  # fmt: skip
        st.run(call, p.dtype.name)
        _finish(st)
        return grad_x, grad_w
    grad_x = matmul(g, w, outs.get("out[0]"))
    grad_w = matmul(g.T, x, outs.get("out[1]"))
    _margin_backward(st, p, grad_x, grad_w, g, x, w, label)
    return grad_x, grad_w


def add_margin_grad(
    grad_x: Any,
    grad_w: Any,
    grad_logits: Any,
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: object,
    beta: object,
    checked: Problem | None = None,
    stats: Any = None,
) -> tuple[cupy.ndarray, cupy.ndarray]:
    p = _checked(checked, x, w, label, margin, beta, grad_logits)
    _no_stats(stats)
    _check_out("grad_x", grad_x, (p.n, p.d), p, grad_logits, x, w, label)
    _check_out("grad_w", grad_w, (p.c, p.d), p, grad_logits, x, w, label, grad_x)
    st = _state(grad_x=grad_x, grad_w=grad_w, grad_logits=grad_logits, x=x, w=w, label=label)
    g, x, w = _contiguous(grad_logits), _contiguous(x), _contiguous(w)
    _margin_backward(st, p, grad_x, grad_w, g, x, w, label)
    return grad_x, grad_w


def _margin_backward(
    st: _DeviceState, p: Problem, grad_x: Any, grad_w: Any, g: Any, x: Any, w: Any, label: Any
) -> None:
    call = plan.bind_backward(
        p, cupy, st.bufs, grad_logits=g, x=x, w=w, label=label, grad_x=grad_x, grad_w=grad_w,
        serial=next(_SERIAL), workspace=lambda ncoef, nclasses: st.workspace().get(ncoef, nclasses),
    )  # fmt: skip
    st.run(call, p.dtype.name)
    _finish(st)


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
