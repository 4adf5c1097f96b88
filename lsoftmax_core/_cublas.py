"""Row-major GEMMs of CuPy arrays through one call of cuBLAS's gemmEx.

``cupy.matmul`` spends about 29 us of host time on a small product (measured on an H200;
docs/BENCHMARKS.md), most of it in generic promotion, reshaping and layout logic that
the backend's calls never need: their
operands are C-contiguous matrices or transposes of them, of one dtype, and the output is
a fresh or checked C-contiguous matrix.  ``matmul`` issues the same gemmEx that CuPy's
matmul issues for them (same operation, data and compute types and algorithm, so the same
bits), and hands every other case (an empty dimension, a strided operand, mixed dtypes,
sizes beyond cuBLAS's int, ROCm) to ``cupy.matmul``.

cuBLAS is column-major: a C-contiguous (r, c) matrix is, read column-major with leading
dimension c, its transpose; a transposed view (F-contiguous) is, with leading dimension r,
itself.  So out = a @ b is computed as out^T = b^T a^T with each operand's "op" chosen
from its layout (``gemm_args``, pure and tested on the host).  The compute type is
cuBLAS's plain float32 (float64 for float64) with host alpha = 1, beta = 0: CUPY_TF32 is
not consulted (this library keeps float32 products exact to float32).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["gemm_args", "matmul"]

# cuBLAS / CUDA enum values (fixed by the CUDA ABI): cublasOperation_t, cudaDataType_t,
# cublasComputeType_t, cublasGemmAlgo_t.
OP_N, OP_T = 0, 1
_DATA_TYPE = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}  # CUDA_R_*
_COMPUTE_32F, _COMPUTE_64F = 68, 70
_GEMM_DEFAULT, _GEMM_DEFAULT_TENSOR_OP = -1, 99
_INT_MAX = 2**31 - 1

# alpha = 1, beta = 0 in the compute type, alive for the module's lifetime (host pointers).
_SCALARS = {np.dtype(np.float32): np.array([1.0, 0.0], np.float32), np.dtype(np.float64): np.array([1.0, 0.0])}


def _operand(shape: tuple[int, ...], c_contiguous: bool, f_contiguous: bool) -> tuple[int, int] | None:
    """(op, leading dimension) that makes cuBLAS read this row-major matrix's transpose."""
    if c_contiguous:
        return OP_N, shape[1]
    if f_contiguous:
        return OP_T, shape[0]
    return None


def gemm_args(a: Any, b: Any, out: Any) -> tuple[int, int, int, int, int, int, int, int] | None:
    """(transa, transb, m, n, k, lda, ldb, ldc) of the column-major gemm that writes
    out = a @ b into C-contiguous ``out``, with cuBLAS's A = b and B = a; None when the
    operands do not fit one such call (then ``cupy.matmul`` does the product)."""
    if a.ndim != 2 or b.ndim != 2 or out.ndim != 2 or not out.flags.c_contiguous:
        return None
    (n, k), (k2, m) = a.shape, b.shape
    if k != k2 or out.shape != (n, m) or 0 in (n, k, m):
        return None
    first = _operand(b.shape, b.flags.c_contiguous, b.flags.f_contiguous)
    second = _operand(a.shape, a.flags.c_contiguous, a.flags.f_contiguous)
    if first is None or second is None:
        return None
    args = (first[0], second[0], m, n, k, first[1], second[1], m)
    if max(args[2:]) > _INT_MAX:
        return None
    return args


_STATE: dict[str, Any] = {}


def _setup() -> dict[str, Any]:
    # Imported on first use: cuBLAS's library loads only when a GEMM runs.
    import cupy
    from cupy.cuda import device, runtime
    from cupy_backends.cuda.libs import cublas

    _STATE.update(cupy=cupy, device=device, gemm=cublas.gemmEx, hip=bool(runtime.is_hip), cc={})
    return _STATE


def matmul(a: Any, b: Any, out: Any = None) -> Any:
    """``a @ b`` into ``out`` (a new C-contiguous array when None), as ``cupy.matmul``."""
    st = _STATE or _setup()
    cupy = st["cupy"]
    dtype = a.dtype
    if out is None:
        out = cupy.empty((a.shape[0], b.shape[-1]), dtype=dtype)
    kind = _DATA_TYPE.get(dtype.name)
    args = gemm_args(a, b, out) if kind is not None and b.dtype == dtype == out.dtype and not st["hip"] else None
    if args is None:
        return cupy.matmul(a, b, out=out)
    transa, transb, m, n, k, lda, ldb, ldc = args
    scalars = _SCALARS[np.dtype(np.float64) if kind == 1 else np.dtype(np.float32)]
    one = scalars.ctypes.data
    dev = st["device"]
    cc = st["cc"].get(out.data.device_id)
    if cc is None:
        cc = st["cc"][out.data.device_id] = int(dev.get_compute_capability())
    # CuPy's choice for its own gemmEx (tensordot_core_v11): the tensor-op algorithm from
    # compute capability 8.0, or 7.0 for float16.
    algo = _GEMM_DEFAULT_TENSOR_OP if cc >= 80 or (cc >= 70 and kind == 2) else _GEMM_DEFAULT
    st["gemm"](
        dev.get_cublas_handle(), transa, transb, m, n, k, one, b.data.ptr, kind, lda, a.data.ptr, kind, ldb,
        one + scalars.itemsize, out.data.ptr, kind, ldc, _COMPUTE_64F if kind == 1 else _COMPUTE_32F, algo,
    )  # fmt: skip
    return out
