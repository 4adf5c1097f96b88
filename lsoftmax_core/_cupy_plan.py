"""What the CuPy backend launches, as plain data, and how a call's arrays bind to it.

This module imports only NumPy, so the CPU tests run the very launch sequence and the very
argument binding the GPU runs, through a host emulation of the kernels
(tests/kernels/test_host_emulator.py), and compile every kernel instantiation with NVRTC
(tests/kernels/test_compile.py), without a GPU.

The launch contract has its one home here: kernel names, grids, argument order, the block
size and the bad-label op codes (passed to the compilers as ``DEFINES``), and the
conversion of a call's arrays and scalars into kernel arguments (``bind_forward``,
``bind_backward``).  An executor differs only in its array library, its GEMMs and how it
launches a kernel or zeroes a buffer (``Call.run``).

A plan is a tuple of steps: ``Zero`` (clear the start of a buffer with cudaMemsetAsync) and
``Launch``.  Arguments are either names (``str``), which a ``Call`` maps to that call's
arrays, the per-device buffers and the per-call scalars ``beta`` and ``serial``, or NumPy
scalars whose itemsize is exactly the C type of the kernel parameter (CuPy passes a NumPy
scalar by its own size).  Nothing per call is baked into a step, so a captured CUDA graph
replays correctly.  Plans are cached per (N, C, D, dtype, margin, label dtype): a call pays
a dictionary lookup, not the construction (beta, which a schedule changes every step, is
per call).  The maths the kernels compute is in docs/derivatives.md.

Small problems (``small``) take another plan: one kernel for the whole forward and one for
the whole backward, GEMMs included (``bind_small_forward`` / ``bind_small_backward``), so
a call makes one launch each way instead of cuBLAS calls plus launches.

The fused cross-entropy's launches are lsoftmax_core/_cupy_loss_plan.py, built from this
module's pieces (``check_launch``, ``backward_steps``, ``bound_values``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Union

import numpy as np

from ._chebyshev import MAX_MARGIN, thresholds
from .checks import Problem

__all__ = [
    "BLOCK",
    "DEFINES",
    "ERR_KEY_NONE",
    "FORMATS",
    "LABEL_TYPES",
    "NVRTC_OPTIONS",
    "OP_BACKWARD",
    "OP_FORWARD",
    "RECORD_WORDS",
    "SMALL_MAX_C",
    "SMALL_MAX_MACS",
    "SMALL_MAX_N",
    "Call",
    "DeviceBuffers",
    "Launch",
    "Zero",
    "backward_launches",
    "backward_steps",
    "bind_backward",
    "bind_forward",
    "bind_small_backward",
    "bind_small_forward",
    "bound_values",
    "check_launch",
    "check_limits",
    "class_layout",
    "define_options",
    "forward_launches",
    "group_size",
    "kernel_label_dtype",
    "kernel_labels",
    "kernel_name",
    "kernel_source",
    "name_expressions",
    "small",
    "threshold_table",
    "workspace_sizes",
]

#: Threads per block of every kernel (a power of two); the kernels get it as LSM_BLOCK.
BLOCK = 128

#: Operation codes a kernel stores with a bad label (the record's third word); the kernels
#: get them as LSM_OP_FORWARD / LSM_OP_BACKWARD (lsm::Op in kernels/lsoftmax.cu).
OP_FORWARD = 0
OP_BACKWARD = 1

#: Limits of the small-problem path (``small``).  Its kernels give a thread at most one
#: feature column (D <= BLOCK), keep four values per sample of a class in shared memory (N <=
#: SMALL_MAX_N, which they get as LSM_SMALL_MAX_N) and sum over all classes (a sample block)
#: or all samples (a class block) one after another; the bounds keep those serial sums short.
SMALL_MAX_N = 512
SMALL_MAX_C = 512
SMALL_MAX_MACS = 2**18
#: Whether ``small`` may choose the one-kernel path (``lsoftmax_core.set_gpu_small_kernels``).
_SMALL_KERNELS = {"enabled": True}


def set_small_kernels(enabled: bool) -> None:
    """Allow (True, the default) or forbid the one-kernel small-problem path."""
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"enabled={enabled!r} must be True or False, not {type(enabled).__name__}")
    _SMALL_KERNELS["enabled"] = bool(enabled)


def small_kernels() -> bool:
    """Whether the one-kernel small-problem path may be chosen (see :func:`set_small_kernels`)."""
    return _SMALL_KERNELS["enabled"]

#: The preprocessor definitions kernels/lsoftmax.cu requires (it refuses to compile without
#: them): NVRTC gets them in ``NVRTC_OPTIONS``, the host build of the tests the same list.
DEFINES: dict[str, int] = {
    "LSM_BLOCK": BLOCK,
    "LSM_OP_FORWARD": OP_FORWARD,
    "LSM_OP_BACKWARD": OP_BACKWARD,
    "LSM_SMALL_MAX_N": SMALL_MAX_N,
}


def define_options() -> tuple[str, ...]:
    """``DEFINES`` as compiler options (``-DNAME=value``), for NVRTC and g++ alike."""
    return tuple(f"-D{name}={value}" for name, value in DEFINES.items())


#: err_key when no bad label is recorded; a kernel keeps the smallest (index << 32 | label).
ERR_KEY_NONE = np.uint64(2**64 - 1)

#: int64 words of the bad-label record {serial of the bad call, C, op, unused}, which the
#: kernels write through the device address of pinned, mapped host memory.
RECORD_WORDS = 4

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
#: for sm_70 targets 64 registers and spills in the float16 backward.  CuPy adds -ftz=true
#: itself, which the kernels tolerate by converting formats with integer code (see
#: lsoftmax_math.cuh).  Then ``DEFINES``.
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17", "--fmad=false", "--maxrregcount=128", *define_options())

KERNELS = (
    "lsm_forward", "lsm_backward_rows", "lsm_backward_classes",
    # small problems: a whole forward or backward, GEMMs included, in one launch
    "lsm_small_forward", "lsm_small_backward",
    # the fused cross-entropy (lsoftmax_core/_cupy_loss.py)
    "lsm_loss_targets", "lsm_loss_chunk_lse", "lsm_loss_chunk_grad", "lsm_loss_margin_rows",
)  # fmt: skip

#: Kernels templated on the element format only (no labels).
ELEMENTWISE = ("lsm_accumulate", "lsm_from_f64")

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
    if kind in ELEMENTWISE:  # no label type
        return f"{kind}<{FORMATS[np.dtype(dtype).name]}>"
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
        names += [f"{kind}<{fmt}>" for kind in ELEMENTWISE]
    return names


_KERNEL_LABEL_DTYPES: dict[np.dtype[Any], np.dtype[Any]] = {
    np.dtype(t): np.dtype(t) for t in (np.int32, np.int64)
}


def kernel_label_dtype(label_dtype: Any) -> np.dtype[Any]:
    """The dtype the kernels read labels as: int32/int64 in place, any other integer as int64."""
    return _KERNEL_LABEL_DTYPES.get(label_dtype, _KERNEL_LABEL_DTYPES[np.dtype(np.int64)])


def kernel_labels(label: Any, xp: Any) -> Any:
    """``label`` as the kernels read it: itself when C-contiguous int32/int64, otherwise a
    C-contiguous int64 copy made by the array library ``xp`` (numpy or cupy)."""
    dt = kernel_label_dtype(label.dtype)
    if label.dtype == dt and label.flags.c_contiguous:
        return label
    return xp.ascontiguousarray(label, dtype=dt)


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
    """(float64 ``coef``, uint32 ``classes``) elements the backward needs: 4 per sample,
    3 per class (kernels/lsoftmax.cu)."""
    return 4 * p.n, 3 * p.c


def check_limits(n: int, d: int, dtype: np.dtype[Any]) -> None:
    if n > 2**31 - 1:
        raise ValueError(f"x has N={n} rows; the CUDA backend supports N < 2**31")
    if class_layout(d, dtype)[1] > 65535:
        raise ValueError(f"x has D={d} features; too many for the CUDA backend's grid")


def check_launch(n: int, c: int, label_dtype: np.dtype[Any], op: int) -> Launch:
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
    check_limits(n, d, dtype)
    if n == 0:
        return ()
    if margin == 1:  # psi(c) = c: the GEMM is the answer; labels are still checked
        return (check_launch(n, c, label_dtype, OP_FORWARD),)
    i64 = np.int64
    args: tuple[Arg, ...] = (
        "x", "w", "label", "logits", i64(n), i64(c), i64(d), i64(margin), "beta",
        "thresholds", "err_key", "err_rec", "serial",
    )  # fmt: skip
    return (Launch(kernel_name("lsm_forward", dtype, label_dtype), (n, 1), args),)


@lru_cache(maxsize=256)
def backward_steps(
    n: int, c: int, d: int, dtype: np.dtype[Any], margin: int, label_dtype: np.dtype[Any]
) -> tuple[Step, ...]:
    check_limits(n, d, dtype)
    if n == 0:
        return ()
    if margin == 1:
        return (check_launch(n, c, label_dtype, OP_BACKWARD),)
    i64 = np.int64
    rows = Launch(
        kernel_name("lsm_backward_rows", dtype, label_dtype),
        (n, 1),
        (
            "grad_logits", "x", "w", "label", "grad_x", "coef", "classes",
            i64(n), i64(c), i64(d), i64(margin), "beta", "thresholds", "err_key", "err_rec", "serial",
        ),
    )  # fmt: skip
    clear = Zero("classes", 3 * c)  # first/last sample and largest ex per class: rows' atomicMax
    if d == 0:
        return (clear, rows)
    k, tiles = class_layout(d, dtype)
    classes = Launch(
        kernel_name("lsm_backward_classes", dtype, label_dtype),
        (n, tiles),
        ("x", "w", "label", "grad_w", "coef", "classes", i64(n), i64(c), i64(d), i64(k)),
    )
    return (clear, rows, classes)


def small(p: Problem) -> bool:
    """Whether forward and backward run as one kernel each, GEMMs included, instead of
    cuBLAS GEMMs plus the margin kernels.  At these sizes a call's cost is its host-side CUDA
    calls, three GEMMs of them (docs/BENCHMARKS.md, GPU per-call overhead).  Margin 1 keeps
    the GEMMs: its result is then exactly the plain layer's.  (N is also held to the
    LSM_SMALL_MAX_N the kernels were compiled with, should SMALL_MAX_N be raised later.)"""
    return (
        _SMALL_KERNELS["enabled"] and p.margin > 1 and 0 < p.n <= min(SMALL_MAX_N, DEFINES["LSM_SMALL_MAX_N"]) and 0 < p.d <= BLOCK
        and p.c <= SMALL_MAX_C
        and p.n * p.c * p.d <= SMALL_MAX_MACS
    )  # fmt: skip


@lru_cache(maxsize=256)
def _small(
    n: int, c: int, d: int, dtype: np.dtype[Any], margin: int, label_dtype: np.dtype[Any]
) -> tuple[tuple[Step, ...], tuple[Step, ...]]:
    """(forward, backward) steps of the small-problem path."""
    i64 = np.int64
    sizes = (i64(n), i64(c), i64(d), i64(margin), "beta", "thresholds", "err_key", "err_rec", "serial")
    fwd = Launch(kernel_name("lsm_small_forward", dtype, label_dtype), (n, 1), ("x", "w", "label", "logits", *sizes))
    bwd = Launch(
        kernel_name("lsm_small_backward", dtype, label_dtype),
        (n + c, 1),
        ("grad_logits", "x", "w", "label", "grad_x", "grad_w", *sizes),
    )
    return (fwd,), (bwd,)


def forward_launches(p: Problem, label_dtype: Any) -> tuple[Step, ...]:
    """Steps after ``logits = x @ w.T``: the target fix-up (or only the label check)."""
    return _forward(p.n, p.c, p.d, p.dtype, p.margin, np.dtype(label_dtype))


def backward_launches(p: Problem, label_dtype: Any) -> tuple[Step, ...]:
    """Steps after ``grad_x = G @ w`` and ``grad_w = G.T @ x``."""
    return backward_steps(p.n, p.c, p.d, p.dtype, p.margin, np.dtype(label_dtype))


# ---------------------------------------------------------------- binding a call


@dataclass(frozen=True)
class DeviceBuffers:
    """What every call on one device shares: the threshold table, the bad-label key and the
    device address of the pinned bad-label record (``RECORD_WORDS`` int64)."""

    thresholds: Any
    err_key: Any
    err_rec: np.uint64

    @classmethod
    def create(cls, xp: Any, record_address: int) -> DeviceBuffers:
        """Upload the threshold table and a cleared key with the array library ``xp``."""
        return cls(
            thresholds=xp.asarray(threshold_table()),
            err_key=xp.full(1, ERR_KEY_NONE, dtype=xp.uint64),
            err_rec=np.uint64(record_address),
        )


#: launch(kernel_name, grid, args) and zero(buffer, count) of an executor.
Launcher = Callable[[str, tuple[int, int], tuple[Any, ...]], object]
Zeroer = Callable[[Any, int], object]


class Call:
    """One call's steps with the values their argument names stand for.

    Built by ``bind_forward`` / ``bind_backward`` for every call (a cached plan holds only
    names, so a CUDA graph captured from ``run`` replays with its own call's buffers)."""

    __slots__ = ("steps", "values")

    def __init__(self, steps: tuple[Step, ...], values: dict[str, Any]) -> None:
        self.steps = steps
        self.values = values

    def args(self, launch: Launch) -> tuple[Any, ...]:
        """The launch's arguments in kernel order: arrays, NumPy scalars."""
        v = self.values
        return tuple(v[a] if a.__class__ is str else a for a in launch.args)

    def run(self, launch: Launcher, zero: Zeroer) -> None:
        """Execute the steps in order: ``launch(kernel_name, grid, args)`` launches one
        kernel with ``BLOCK`` threads per block; ``zero(buffer, count)`` clears the first
        ``count`` elements of a buffer.  Both are issued in stream order."""
        for step in self.steps:
            if isinstance(step, Zero):
                zero(self.values[step.name], step.count)
            else:
                launch(step.name, step.grid, self.args(step))


def bound_values(p: Problem, dev: DeviceBuffers, serial: int, label: Any) -> dict[str, Any]:
    # The per-call scalars as the kernels take them: double beta, long long serial.
    return {
        "label": label,
        "thresholds": dev.thresholds,
        "err_key": dev.err_key,
        "err_rec": dev.err_rec,
        "beta": np.float64(p.beta),
        "serial": np.int64(serial),
    }


def bind_forward(
    p: Problem, xp: Any, dev: DeviceBuffers, *, x: Any, w: Any, label: Any, logits: Any, serial: int
) -> Call:
    """The forward's steps after ``logits = x @ w.T``, bound to this call.  ``x``, ``w`` and
    ``logits`` are C-contiguous arrays of ``xp``; ``label`` may be any integer dtype and
    layout (``kernel_labels``); ``serial`` numbers the call in bad-label reports."""
    lab = kernel_labels(label, xp)
    values = bound_values(p, dev, serial, lab)
    values.update(x=x, w=w, logits=logits)
    return Call(forward_launches(p, lab.dtype), values)


def bind_backward(
    p: Problem,
    xp: Any,
    dev: DeviceBuffers,
    *,
    grad_logits: Any,
    x: Any,
    w: Any,
    label: Any,
    grad_x: Any,
    grad_w: Any,
    serial: int,
    workspace: Callable[[int, int], tuple[Any, Any]],
) -> Call:
    """The backward's steps after ``grad_x = G @ w`` and ``grad_w = G.T @ x``, bound to this
    call (arrays as for ``bind_forward``).  ``workspace(ncoef, nclasses)`` returns a float64
    ``coef`` and a uint32 ``classes`` buffer of at least those sizes (contents need not be
    cleared); it is called only when the steps use them."""
    lab = kernel_labels(label, xp)
    steps = backward_launches(p, lab.dtype)
    values = bound_values(p, dev, serial, lab)
    values.update(grad_logits=grad_logits, x=x, w=w, grad_x=grad_x, grad_w=grad_w)
    if steps and p.margin > 1:  # margin 1 only checks labels
        values["coef"], values["classes"] = workspace(*workspace_sizes(p))
    return Call(steps, values)


def bind_small_forward(
    p: Problem, xp: Any, dev: DeviceBuffers, *, x: Any, w: Any, label: Any, logits: Any, serial: int
) -> Call:
    """The whole forward of a problem where ``small(p)``: ``logits`` (C-contiguous, N x C) is
    written entirely by the kernel, no GEMM before it (arrays as for ``bind_forward``)."""
    lab = kernel_labels(label, xp)
    values = bound_values(p, dev, serial, lab)
    values.update(x=x, w=w, logits=logits)
    return Call(_small(p.n, p.c, p.d, p.dtype, p.margin, lab.dtype)[0], values)


def bind_small_backward(
    p: Problem, xp: Any, dev: DeviceBuffers, *, grad_logits: Any, x: Any, w: Any, label: Any, grad_x: Any,
    grad_w: Any, serial: int,
) -> Call:  # fmt: skip
    """The whole backward of a problem where ``small(p)``: ``grad_x`` and ``grad_w`` are
    written entirely by the kernel, no GEMMs before it and no workspace."""
    lab = kernel_labels(label, xp)
    values = bound_values(p, dev, serial, lab)
    values.update(grad_logits=grad_logits, x=x, w=w, grad_x=grad_x, grad_w=grad_w)
    return Call(_small(p.n, p.c, p.d, p.dtype, p.margin, lab.dtype)[1], values)
