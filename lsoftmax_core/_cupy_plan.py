"""What the CuPy backend launches, as plain data: kernel names, grids and arguments.

This module imports only NumPy, so the CPU tests can run the very launch sequence the GPU
runs through a host emulation of the kernels (tests/kernels/test_host_emulator.py), and compile
every kernel instantiation with NVRTC (tests/kernels/test_compile.py), without a GPU.

A plan is a tuple of steps: ``Zero`` (clear the start of a buffer with cudaMemsetAsync) and
``Launch``.  Arguments are either names (``str``), which the executor maps to arrays or to
the per-call scalars ``beta`` and ``serial``, or NumPy scalars whose itemsize is exactly
the C type of the kernel parameter (CuPy passes a NumPy scalar by its own size).  Nothing
per call is baked into a step, so a captured CUDA graph replays correctly.
Plans are cached per (N, C, D, dtype, margin, label dtype): a call pays a dictionary
lookup, not the construction (beta, which a schedule changes every step, is per call).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Union

import numpy as np

from ._chebyshev import MAX_MARGIN, thresholds
from .checks import Problem

__all__ = [
    "BLOCK",
    "FORMATS",
    "LABEL_TYPES",
    "Launch",
    "NVRTC_OPTIONS",
    "Zero",
    "backward_launches",
    "class_layout",
    "forward_launches",
    "group_size",
    "kernel_label_dtype",
    "kernel_name",
    "kernel_source",
    "name_expressions",
    "threshold_table",
    "workspace_sizes",
]

#: Threads per block of every kernel; must equal LSM_BLOCK in kernels/lsoftmax.cu.
BLOCK = 128

#: Element dtype name -> format tag of kernels/lsoftmax_math.cuh.
FORMATS: dict[str, str] = {
    "float64": "lsm::F64",
    "float32": "lsm::F32",
    "float16": "lsm::F16",
    "bfloat16": "lsm::BF16",
}

#: Label dtype name -> C type of the label pointer.  Other integer dtypes are converted to
#: int64 by the backend (one extra copy) before any kernel sees them.
LABEL_TYPES: dict[str, str] = {"int32": "int", "int64": "long long"}

#: Options for NVRTC.  --fmad=false: no silent multiply-add contraction, so the kernels
#: round exactly like the host build of the same code (and like _chebyshev.py); the fused
#: operations that are wanted are written as fma().  --maxrregcount=128: without it ptxas
#: for sm_70 targets 64 registers and spills in the float16 backward (sm_80/sm_90 use ~56
#: either way).  CuPy adds -ftz=true itself, which the kernels tolerate by converting
#: formats with integer code (see lsoftmax_math.cuh).
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17", "--fmad=false", "--maxrregcount=128")

KERNELS = ("lsm_forward", "lsm_backward_rows", "lsm_backward_classes")

#: Operation codes recorded with a bad label.
OP_FORWARD = 0
OP_BACKWARD = 1

Arg = Union[str, np.generic]


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel(grid, (BLOCK,), args)`` on the current stream."""

    name: str
    grid: tuple[int, int]
    args: tuple[Arg, ...]


@dataclass(frozen=True)
class Zero:
    """Set the first ``count`` elements of buffer ``name`` to zero, on the current stream."""

    name: str
    count: int


Step = Union[Launch, Zero]


def kernel_name(kind: str, dtype: Any, label_dtype: Any) -> str:
    """The name expression of a kernel instantiation: the one place a dtype becomes a name."""
    lab = LABEL_TYPES[np.dtype(label_dtype).name]
    if kind == "lsm_check_labels":
        return f"lsm_check_labels<{lab}>"
    if kind not in KERNELS:
        raise ValueError(f"unknown kernel {kind!r}")
    return f"{kind}<{FORMATS[np.dtype(dtype).name]}, {lab}>"


def name_expressions(dtype_name: str | None = None) -> list[str]:
    """Every instantiation (of one element dtype, plus the label checks), in a fixed order."""
    names = [f"lsm_check_labels<{lab}>" for lab in LABEL_TYPES.values()]
    for dname, fmt in FORMATS.items():
        if dtype_name is not None and dname != dtype_name:
            continue
        names += [f"{kind}<{fmt}, {lab}>" for kind in KERNELS for lab in LABEL_TYPES.values()]
    return names


_KERNEL_LABEL_DTYPES: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(t): np.dtype(t) for t in (np.int32, np.int64)
}


def kernel_label_dtype(label_dtype: Any) -> np.dtype[Any]:
    """The dtype the kernels read labels as: int32/int64 in place, any other integer as int64."""
    return _KERNEL_LABEL_DTYPES.get(label_dtype, _KERNEL_LABEL_DTYPES[np.dtype(np.int64)])


def kernel_source() -> str:
    """kernels/lsoftmax.cu with kernels/lsoftmax_math.cuh inlined (NVRTC compiles a string
    from a temporary directory, where a relative #include would not be found)."""
    pkg = resources.files("lsoftmax_core.kernels")
    header = pkg.joinpath("lsoftmax_math.cuh").read_text(encoding="utf-8")
    body = pkg.joinpath("lsoftmax.cu").read_text(encoding="utf-8")
    include = '#include "lsoftmax_math.cuh"'
    if body.count(include) != 1:
        raise RuntimeError("kernels/lsoftmax.cu must include lsoftmax_math.cuh exactly once")
    return body.replace(include, header)


def threshold_table() -> np.ndarray:
    """thresholds(1) + thresholds(2) + ... + thresholds(MAX_MARGIN) as one float64 array;
    margin m starts at (m-1)(m-2)/2 (lsm::thresholds_for)."""
    return np.array([t for m in range(1, MAX_MARGIN + 1) for t in thresholds(m)], dtype=np.float64)


def group_size(dtype: Any) -> int:
    """Elements per 16-byte load (lsm::Group<F>::N)."""
    return 16 // np.dtype(dtype).itemsize


def class_layout(d: int, dtype: Any) -> tuple[int, int]:
    """(K, tiles) of lsm_backward_classes: K column groups per block (a power of two, the
    rest of the block's threads are member lanes) and the number of column tiles.  Depends
    only on D and the dtype, so the summation order does too."""
    groups = -(-d // group_size(dtype))
    k = min(BLOCK, 1 << (max(groups, 1) - 1).bit_length())  # next power of two >= groups
    return k, -(-groups // k)


def workspace_sizes(p: Problem) -> tuple[int, int]:
    """(float64 ``coef``, uint32 ``classes``) elements the backward needs."""
    return 3 * p.n, 2 * p.c


def _check_limits(n: int, d: int, dtype: np.dtype[Any]) -> None:
    if n > 2**31 - 1:
        raise ValueError(f"x has N={n} rows; the CUDA backend supports N < 2**31")
    if class_layout(d, dtype)[1] > 65535:
        raise ValueError(f"x has D={d} features; too many for the CUDA backend's grid")


def _check_launch(n: int, c: int, label_dtype: np.dtype[Any], op: int) -> Launch:
    i64 = np.int64
    return Launch(
        kernel_name("lsm_check_labels", None, label_dtype),
        (-(-n // BLOCK), 1),
        ("label", i64(n), i64(c), "err_key", "err_rec", "serial", i64(op)),
    )


@lru_cache(maxsize=256)
def _forward(
    n: int, c: int, d: int, dtype: np.dtype[Any], margin: int, label_dtype: np.dtype[Any]
) -> tuple[Step, ...]:
    _check_limits(n, d, dtype)
    if n == 0:
        return ()
    if margin == 1:  # psi(c) = c: the GEMM is the answer; labels are still checked
        return (_check_launch(n, c, label_dtype, OP_FORWARD),)
    i64 = np.int64
    args: tuple[Arg, ...] = (
        "x", "w", "label", "logits", i64(n), i64(c), i64(d), i64(margin), "beta",
        "thresholds", "err_key", "err_rec", "serial",
    )  # fmt: skip
    return (Launch(kernel_name("lsm_forward", dtype, label_dtype), (n, 1), args),)


@lru_cache(maxsize=256)
def _backward(
    n: int, c: int, d: int, dtype: np.dtype[Any], margin: int, label_dtype: np.dtype[Any]
) -> tuple[Step, ...]:
    _check_limits(n, d, dtype)
    if n == 0:
        return ()
    if margin == 1:
        return (_check_launch(n, c, label_dtype, OP_BACKWARD),)
    i64 = np.int64
    rows = Launch(
        kernel_name("lsm_backward_rows", dtype, label_dtype),
        (n, 1),
        (
            "grad_logits", "x", "w", "label", "grad_x", "coef", "classes",
            i64(n), i64(c), i64(d), i64(margin), "beta", "thresholds", "err_key", "err_rec", "serial",
        ),
    )  # fmt: skip
    clear = Zero("classes", 2 * c)  # first/last sample per class, filled by rows' atomicMax
    if d == 0:
        return (clear, rows)
    k, tiles = class_layout(d, dtype)
    classes = Launch(
        kernel_name("lsm_backward_classes", dtype, label_dtype),
        (n, tiles),
        ("x", "w", "label", "grad_w", "coef", "classes", i64(n), i64(c), i64(d), i64(k)),
    )
    return (clear, rows, classes)


def forward_launches(p: Problem, label_dtype: Any) -> tuple[Step, ...]:
    """Kernels after ``logits = x @ w.T``: the target fix-up (or only the label check).
    Per-call names: beta (float64), serial (int64)."""
    return _forward(p.n, p.c, p.d, p.dtype, p.margin, np.dtype(label_dtype))


def backward_launches(p: Problem, label_dtype: Any) -> tuple[Step, ...]:
    """Steps after ``grad_x = G @ w`` and ``grad_w = G.T @ x``.  Per-call names: beta
    (float64), serial (int64); workspace buffers coef and classes (``workspace_sizes``)."""
    return _backward(p.n, p.c, p.d, p.dtype, p.margin, np.dtype(label_dtype))
