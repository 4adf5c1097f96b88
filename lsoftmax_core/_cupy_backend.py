"""The CuPy (CUDA) backend: cuBLAS GEMMs plus O(N·D) kernels from kernels/lsoftmax.cu.

Same maths (docs/derivatives.md, where q_i and r_i are defined), signature, validation
and errors as the NumPy backend; CuPy arrays in, CuPy arrays out, on CuPy's current device
and stream.  What is launched, and how a call's arrays become kernel arguments, is
lsoftmax_core/_cupy_plan.py; the per-device state (compiled kernels, bad-label record,
workspaces, serial numbers) is lsoftmax_core/_cupy_state.py; this module adds the GEMMs and
the launches.

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
is lsoftmax_core/_cupy_loss.py: cuBLAS GEMMs per chunk and the loss kernels, sharing the
same device state.

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

from typing import Any

import cupy

from . import _cupy_plan as plan
from . import _family
from ._cublas import matmul
from ._cupy_state import DTYPES, DeviceState, contiguous, finish, next_serial, state
from ._cupy_state import check_labels as check_labels
from .checks import Problem, check_arrays, check_label_values, check_out

__all__ = ["add_margin", "add_margin_grad", "backward", "check_labels", "forward", "prepare"]

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
    return check_arrays(x, w, label, margin, beta, dtypes=DTYPES, grad_logits=grad_logits)


def _checked(
    checked: Problem | None, x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    if checked is None:
        return prepare(x, w, label, margin, beta, grad_logits)
    return checked.same_call(x, w, label, margin, beta, grad_logits)


def _family_labels(p: Problem, label: Any) -> None:
    """The kinds that normalise run CuPy's own array operations (lsoftmax_core._family), not
    this backend's kernels: their labels are checked on the host (one synchronisation)."""
    check_label_values(cupy.asnumpy(label), p.c)


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
    if p.family is not None:
        _family_labels(p, label)
        logits = _family.layer_forward(x, w, label, p, out)
        return (logits, None) if return_stats else logits
    st = state(x=x, w=w, label=label, **({} if out is None else {"out": out}))
    x, w = contiguous(x), contiguous(w)
    if plan.small(p):  # one kernel, GEMM included
        logits = cupy.empty((p.n, p.c), dtype=p.dtype) if out is None else out
        call = plan.bind_small_forward(p, cupy, st.bufs, x=x, w=w, label=label, logits=logits, serial=next_serial())
        st.run(call, p.dtype.name)
        finish(st)
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
    if p.family is not None:
        _family_labels(p, label)
        _family.layer_add_margin(logits, x, w, label, p)
        return (logits, None) if return_stats else logits
    st = state(logits=logits, x=x, w=w, label=label)
    _margin_forward(st, p, logits, contiguous(x), contiguous(w), label)
    return (logits, None) if return_stats else logits


def _margin_forward(st: DeviceState, p: Problem, logits: Any, x: Any, w: Any, label: Any) -> None:
    call = plan.bind_forward(p, cupy, st.bufs, x=x, w=w, label=label, logits=logits, serial=next_serial())
    st.run(call, p.dtype.name)
    finish(st)


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
    if p.family is not None:
        _family_labels(p, label)
        return _family.layer_backward(grad_logits, x, w, label, p, out)  # type: ignore[no-any-return]
    st = state(grad_logits=grad_logits, x=x, w=w, label=label, **outs)
    g, x, w = contiguous(grad_logits), contiguous(x), contiguous(w)
    if plan.small(p):  # one kernel, GEMMs included
        grad_x = cupy.empty((p.n, p.d), dtype=p.dtype) if out is None else out[0]
        grad_w = cupy.empty((p.c, p.d), dtype=p.dtype) if out is None else out[1]
        call = plan.bind_small_backward(
            p, cupy, st.bufs, grad_logits=g, x=x, w=w, label=label, grad_x=grad_x, grad_w=grad_w,
            serial=next_serial(),
        )  # fmt: skip
        st.run(call, p.dtype.name)
        finish(st)
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
    if p.family is not None:
        _family_labels(p, label)
        return _family.layer_add_margin_grad(grad_x, grad_w, grad_logits, x, w, label, p)  # type: ignore[no-any-return]
    st = state(grad_x=grad_x, grad_w=grad_w, grad_logits=grad_logits, x=x, w=w, label=label)
    g, x, w = contiguous(grad_logits), contiguous(x), contiguous(w)
    _margin_backward(st, p, grad_x, grad_w, g, x, w, label)
    return grad_x, grad_w


def _margin_backward(
    st: DeviceState, p: Problem, grad_x: Any, grad_w: Any, g: Any, x: Any, w: Any, label: Any
) -> None:
    call = plan.bind_backward(
        p, cupy, st.bufs, grad_logits=g, x=x, w=w, label=label, grad_x=grad_x, grad_w=grad_w,
        serial=next_serial(), workspace=lambda ncoef, nclasses: st.workspace().get(ncoef, nclasses),
    )  # fmt: skip
    st.run(call, p.dtype.name)
    finish(st)
