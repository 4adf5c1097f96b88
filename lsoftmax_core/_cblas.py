"""C += A·B through the BLAS NumPy itself links, for the fused loss's accumulating GEMMs.

NumPy's ``matmul`` always overwrites its output (beta = 0), so a sum of products needs a
temporary and a second pass over the output; CBLAS's ``?gemm`` with beta = 1 accumulates in
the GEMM's own kernel.  NumPy 2's wheels ship OpenBLAS as ``scipy-openblas`` (symbols
``scipy_cblas_sgemm64_`` with 64-bit integers, or ``scipy_cblas_sgemm`` with 32-bit ones in
the ``openblas32`` build; NumPy 1.x wheels: ``cblas_sgemm64_`` of ``openblas64_``) in
``numpy.libs/`` (Linux, Windows) or ``numpy/.dylibs/`` (macOS);
NumPy has already loaded that very file, so ``ctypes`` gets the same library and the same
thread pool, not a second copy.  Found once on first use and checked against ``np.matmul`` on a
small product; anything else (another BLAS, no such file, a failed check, or
``LSOFTMAX_CE_BLAS=0``) leaves :func:`gemm_add` returning False, and the caller adds a
temporary instead.  Only float32 and float64 arrays with a unit stride in one dimension.
"""

from __future__ import annotations

import ctypes
import glob
import os
from typing import Any

import numpy as np

__all__ = ["ENV", "available", "gemm_add"]

#: "0" turns the BLAS accumulation off (the pure-NumPy path); read once, on first use.
ENV = "LSOFTMAX_CE_BLAS"

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# NumPy 2 wheels' scipy-openblas (64- or 32-bit integers); NumPy 1.x wheels' openblas64_.
_SYMBOLS = (
    ("scipy_cblas_{}gemm64_", ctypes.c_int64),
    ("scipy_cblas_{}gemm", ctypes.c_int),
    ("cblas_{}gemm64_", ctypes.c_int64),
)
_GEMM: dict[np.dtype[Any], Any] = {}
_LOADED: list[bool] = []


def _library_files() -> list[str]:
    root = os.path.dirname(np.__file__)
    patterns = (os.path.join(root, os.pardir, "numpy.libs", "*openblas*"), os.path.join(root, ".dylibs", "*openblas*"))
    return sorted(f for pattern in patterns for f in glob.glob(pattern))


def _bind(lib: Any, name: str, int_t: Any, real: Any) -> Any:
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, int_t, int_t, int_t, real, ctypes.c_void_p, int_t,
                   ctypes.c_void_p, int_t, real, ctypes.c_void_p, int_t]  # fmt: skip
    fn.restype = None
    return fn


def _load() -> None:
    _LOADED.append(True)
    if os.environ.get(ENV, "").strip() == "0":
        return
    for path in _library_files():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for pattern, int_t in _SYMBOLS:
            try:
                found: dict[np.dtype[Any], Any] = {
                    np.dtype(np.float32): _bind(lib, pattern.format("s"), int_t, ctypes.c_float),
                    np.dtype(np.float64): _bind(lib, pattern.format("d"), int_t, ctypes.c_double),
                }
            except AttributeError:
                continue
            limit = 2 ** (8 * ctypes.sizeof(int_t) - 1) - 1
            _GEMM.update({dt: (fn, limit) for dt, fn in found.items()})
            if all(_works(dt) for dt in found):
                return
            _GEMM.clear()


def _works(dtype: np.dtype[Any]) -> bool:
    """One small product with every layout the loss uses, against np.matmul."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 12)).astype(dtype)
    b = rng.standard_normal((12, 9)).astype(dtype)
    out = np.ones((9, 7), dtype)
    want = out + np.matmul(a[:, 1:10].T, b[1:8, 2:9].T)
    ok = gemm_add(a[:, 1:10].T, b[1:8, 2:9].T, out)
    return ok and bool(np.allclose(out, want, rtol=1e-5, atol=1e-5))


def available(dtype: Any) -> bool:
    """Whether :func:`gemm_add` runs the BLAS for this dtype."""
    if not _LOADED:
        _load()
    return np.dtype(dtype) in _GEMM


def _operand(a: Any) -> tuple[int, int] | None:
    """(transpose flag, leading dimension) of a row-major 2-D operand, or None."""
    it = a.itemsize
    s0, s1 = a.strides
    if s1 == it and s0 % it == 0 and s0 >= it * max(1, a.shape[1]):
        return _NO_TRANS, s0 // it
    if s0 == it and s1 % it == 0 and s1 >= it * max(1, a.shape[0]):
        return _TRANS, s1 // it
    return None


def gemm_add(a: Any, b: Any, out: Any) -> bool:
    """``out += a @ b`` by the BLAS (True), or nothing done (False: the caller adds itself)."""
    if not _LOADED:
        _load()
    found = _GEMM.get(out.dtype)
    if found is None or a.dtype != out.dtype or b.dtype != out.dtype:
        return False
    fn, limit = found
    if not (a.flags.aligned and b.flags.aligned and out.flags.aligned and out.flags.writeable):
        return False
    (m, k), n = a.shape, b.shape[1]
    if 0 in (m, n, k):
        return True  # nothing to add
    fa, fb, fo = _operand(a), _operand(b), _operand(out)
    if fa is None or fb is None or fo is None or fo[0] != _NO_TRANS:
        return False
    if max(m, n, k, fa[1], fb[1], fo[1]) > limit:
        return False
    fn(_ROW_MAJOR, fa[0], fb[0], m, n, k, 1.0, a.ctypes.data, fa[1], b.ctypes.data, fb[1], 1.0,
       out.ctypes.data, fo[1])  # fmt: skip
    return True
