"""The NumPy (CPU) backend: two BLAS GEMMs plus O((N + C)·D) work.

``forward`` is ``x @ w.T`` and then the N target logits are rewritten; ``backward`` is the
plain layer's ``G @ w`` and ``G.T @ x`` plus, per sample, the correction rows q_i (added to
grad_x[i]) and r_i (added to grad_w[y_i], summed per class in a fixed order by
:mod:`._class_sums`).  The maths, the zero-norm convention and the numerics are in
docs/derivatives.md ("Backward at the cost of the plain layer", "Zero-norm rows",
"Numerics"); this module follows it line by line.  Implementation choices:

* the per-sample sums x·x, w_y·w_y, x·w_y accumulate in the input dtype (einsum's SIMD
  loops: as accurate as the GEMM's own logits), everything after them in float64, and the
  row updates in the input dtype with float64 coefficients;
* rows whose norms or coefficients leave the safe range take a careful float64 path with
  per-row scaling, unit vectors and norms kept as mantissa and exponent;
* large N×D temporaries are few and reused in place (each costs page faults that show
  against the GEMMs);
* at small sizes the cost is the number of NumPy calls, not their work: the statistics are
  rows of one (8, N) record (which ``forward`` can hand to ``backward``, ``stats=``), psi
  is a binary search plus recurrences on stacked rows, and range checks are reductions
  that decide the common case before any per-row mask is built.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from . import _family
from ._chebyshev import thresholds
from ._class_sums import add_per_class, arange
from .checks import Problem, check_arrays, check_label_values, check_out, supported_dtypes

__all__ = [
    "DTYPES", "LIMITS", "STATS_ROWS", "add_margin", "add_margin_grad", "backward", "check_stats", "cpu_kernels", "forward", "prepare",
    "set_cpu_kernels",
]  # fmt: skip

#: The floating dtypes of x and w this backend computes in.
DTYPES = supported_dtypes("numpy")

F64 = npt.NDArray[np.float64]

def _c_einsum() -> Any:
    """einsum without its Python wrapper (the same C function, the same results): ~1 us a
    call less; np.einsum where a NumPy does not expose it."""
    for name in ("numpy._core.multiarray", "numpy.core.multiarray"):  # NumPy 2, NumPy 1
        try:
            return importlib.import_module(name).c_einsum
        except (ImportError, AttributeError):
            continue
    return np.einsum


_einsum = _c_einsum()


# Squared norms inside these ranges were summed free of under- and overflow in the input
# dtype (no entry's square above the dtype's max, the largest one normal), and keep a·b
# and the ratios a/b, b/a finite and normal in float64.  Zero rows fall outside too.
_SAFE_SQ = {np.dtype(np.float32): (1e-30, 1e36), np.dtype(np.float64): (1e-280, 1e280)}


class _Stats(NamedTuple):
    a: F64  # |x_i| (inf on careful rows whose norm itself overflows float64)
    b: F64  # |w_{y_i}|
    c: F64  # cos(theta_i), clamped
    psi: F64
    dpsi: F64
    wy: npt.NDArray[Any]  # w[label]: a fresh gather, owned here (backward reuses it in place)
    careful: npt.NDArray[np.intp]  # rows whose statistics needed per-row scaling
    a_parts: tuple[F64, npt.NDArray[np.int64]]  # careful rows: |x| = ldexp(mantissa, exponent)
    b_parts: tuple[F64, npt.NDArray[np.int64]]
    ab: F64  # (2, N): a and b as one array (a and b are its rows)
    record: F64  # (STATS_ROWS, N): a, b, c, psi, psi', the margin tag, fingerprints (see stats)


def _rowdot(u: npt.NDArray[Any], v: npt.NDArray[Any]) -> F64:
    """Row-wise dot products (accumulated in the input dtype), as float64."""
    return np.einsum("ij,ij->i", u, v).astype(np.float64)


def _norm_and_unit(rows: npt.NDArray[Any]) -> tuple[F64, npt.NDArray[np.int64], F64]:
    """Row norms as ``ldexp(mantissa, exponent)`` and unit rows, in float64.

    Each row is divided by its largest magnitude first, so nothing over- or underflows;
    the norm stays split in two because it may exceed float64 although every entry, and
    the quantities built from it (a target logit, a gradient), do not.
    """
    r = np.asarray(rows, dtype=np.float64)
    amax = np.max(np.abs(r), axis=1, initial=0.0)
    scale = np.where(amax > 0.0, amax, 1.0)
    s = r / scale[:, None]
    rel = np.sqrt(np.einsum("ij,ij->i", s, s))
    unit = s / np.where(rel > 0.0, rel, 1.0)[:, None]
    mant, exp = np.frexp(amax)
    return mant * rel, exp.astype(np.int64), unit


def _psi_and_derivative(c: F64, margin: int, out: F64) -> None:
    """psi(c) and psi'(c) into ``out`` (2, N): :func:`._chebyshev.psi_and_derivative` with the
    same arithmetic, so the same bits (tested), in a third of its NumPy calls: k by one
    binary search over the interval boundaries, (-1)^k, (-1)^k·m and 2k looked up by it,
    T_m and U_{m-1} advanced together as one (2, N) array.  Every operand of the loop is a
    whole contiguous (2, N) array: a broadcast (N,) or a strided view takes NumPy's general
    iterator, about twice the cost at N = 256."""
    n = c.shape[0]
    # s = #{boundaries cos(j*pi/m) < c}, so k = #{j : c <= cos(j*pi/m)} = (m - 1) - s; a NaN
    # cosine gets s = m - 1, k = 0, as there.
    s = _ascending_thresholds(margin).searchsorted(c, side="left")  # the methods: no dispatch wrapper
    by_k = _tables(margin).take(s, axis=1)  # rows: (-1)^k, (-1)^k·m, 2k
    both = np.empty((4, n))  # rows: T_1 = c, U_0 = 1, then 2c twice
    both[0] = c
    both[1] = 1.0
    np.multiply(c, 2.0, out=both[2])  # (2c)·T_n, exactly as 2.0 * c * t_n evaluates
    both[3] = both[2]
    cur, c2 = both[:2], both[2:]
    prev = _t0_u_minus1(n)  # T_0 = 1, U_{-1} = 0
    for _ in range(1, margin):
        nxt = c2 * cur
        nxt -= prev
        prev, cur = cur, nxt
    np.multiply(by_k[:2], cur, out=out)  # (-1)^k·T_m, (-1)^k·m·U_{m-1}
    out[0] -= by_k[2]  # psi = (-1)^k·T_m - 2k


@functools.cache
def _tables(margin: int) -> F64:
    """(-1)^k, (-1)^k·m and 2k as functions of s = (m - 1) - k, for s = 0..m-1."""
    k = (margin - 1) - np.arange(margin)
    sign = 1.0 - 2.0 * (k & 1)
    t = np.stack([sign, sign * margin, 2.0 * k])
    t.flags.writeable = False
    return t


@functools.lru_cache(maxsize=16)
def _t0_u_minus1(n: int) -> F64:
    """Rows T_0 = 1 and U_{-1} = 0 for n samples (read-only, cached per batch size)."""
    t = np.zeros((2, n))
    t[0] = 1.0
    t.flags.writeable = False
    return t


@functools.cache
def _ascending_thresholds(margin: int) -> F64:
    t = np.array(thresholds(margin)[::-1], dtype=np.float64)
    t.flags.writeable = False
    return t


#: The largest finite and the smallest normal value of each input dtype (np.finfo, looked up once).
LIMITS = {t: (float(np.finfo(t).max), float(np.finfo(t).tiny)) for t in DTYPES}

_NO_ROWS = np.zeros(0, dtype=np.intp)
_NO_ROWS.flags.writeable = False


#: Rows of the statistics record (see :func:`stats`): a, b, c, psi, psi', margin tag, and
#: the fingerprints of the rows of x and of w[label] they came from (:func:`_fingerprint`).
STATS_ROWS = 8

_UINT: dict[int, np.dtype[Any]] = {4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}


@functools.lru_cache(maxsize=64)
def _odd_weights(d: int) -> npt.NDArray[np.uint64]:
    w = 2 * np.arange(d, dtype=np.uint64) + 1
    w.flags.writeable = False
    return w


def _fingerprint(rows: npt.NDArray[Any]) -> F64:
    """Per row, sum_j (2j + 1)·bits(rows[i, j]) mod 2^64 (the bits as float64 words to store
    in a record).  Exact integer arithmetic, so the same values give the same fingerprint
    whatever the memory layout; any change of one element changes it (an odd weight is
    invertible mod 2^64), and so do swapped elements.  O(N·D), one pass."""
    rows = np.ascontiguousarray(rows)  # a view of the bits needs a contiguous last axis
    bits = rows.view(_UINT[rows.dtype.itemsize])
    weights = _odd_weights(rows.shape[1])
    if rows.shape[1] <= 16:  # (measured: the matmul's loop is faster for short rows, einsum for long)
        fp = (bits if bits.dtype == np.uint64 else bits.astype(np.uint64)) @ weights
    else:
        fp = np.einsum("ij,j->i", bits, weights)
    return fp.view(np.float64)  # type: ignore[no-any-return]


def _seal(rec: F64, x: npt.NDArray[Any], wy: npt.NDArray[Any]) -> F64:
    """Write the fingerprints of x and of w[label] (``wy``) into a record handed to the caller."""
    rec[6] = _fingerprint(x)
    rec[7] = _fingerprint(wy)
    return rec


def stats(x: npt.NDArray[Any], w: npt.NDArray[Any], label: npt.NDArray[Any], p: Problem) -> _Stats:
    """Per-sample norms, cosine, psi and psi' (float64), for labels already checked.

    They are the rows of one (STATS_ROWS, N) float64 array, ``record``, which ``forward`` can
    hand to ``backward`` (``return_stats`` / ``stats``): a, b, c, psi, psi', and a tag, +m on
    rows of the fast path and -m on the careful rows (their statistics needed per-row
    scaling); rows 6 and 7 are left for the fingerprints of a record handed out (:func:`_seal`).
    """
    wy = w.take(label, axis=0)  # w[label], a fresh array (faster than fancy indexing)
    n = p.n
    sums = np.empty((3, n), dtype=p.dtype)  # x·x, w_y·w_y, x·w_y in the input dtype
    _einsum("ij,ij->i", x, x, out=sums[0])
    _einsum("ij,ij->i", wy, wy, out=sums[1])
    _einsum("ij,ij->i", x, wy, out=sums[2])
    sq = sums.astype(np.float64)
    rec = np.empty((STATS_ROWS, n))
    ab, c = rec[0:2], rec[2]
    lo, hi = _SAFE_SQ[p.dtype]
    squares = sq[:2]
    np.sqrt(squares, out=ab)
    if n and np.minimum.reduce(squares, axis=None) >= lo and np.maximum.reduce(squares, axis=None) <= hi:
        # the common case (a NaN fails it)
        careful = _NO_ROWS
        np.divide(sq[2], ab[0] * ab[1], out=c)
    else:
        careful = np.flatnonzero(~((squares >= lo) & (squares <= hi)).all(axis=0))
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(sq[2], ab[0] * ab[1], out=c)
    a, b = ab[0], ab[1]
    if careful.size:  # zero rows, and float64 rows with extreme norms
        am, ae, xhat = _norm_and_unit(x[careful])
        bm, be, what = _norm_and_unit(wy[careful])
        with np.errstate(over="ignore"):  # a norm beyond float64: inf here, split in a_parts
            a[careful], b[careful] = np.ldexp(am, ae), np.ldexp(bm, be)
        c[careful] = np.einsum("ij,ij->i", xhat, what)
    else:
        am = bm = _NO_F64
        ae = be = _NO_I64
    np.maximum(c, -1.0, out=c)  # clamp to [-1, 1] (as np.clip, in two plain ufunc calls)
    np.minimum(c, 1.0, out=c)
    _psi_and_derivative(c, p.margin, rec[3:5])
    rec[5] = p.margin
    if careful.size:
        rec[5, careful] = -p.margin
        # No angle: plain linear (docs/derivatives.md).  Only careful rows can have a zero
        # norm: every other row's squared norms lie in [lo, hi].
        degenerate = careful[(a[careful] == 0.0) | (b[careful] == 0.0)]
        rec[2:4, degenerate] = 0.0  # c, psi
        rec[4, degenerate] = 1.0  # psi'
    return _Stats(a, b, c, rec[3], rec[4], wy, careful, (am, ae), (bm, be), ab, rec)


def _from_record(rec: F64, w: npt.NDArray[Any], label: npt.NDArray[Any], wy: Any = None) -> _Stats:
    """The statistics of a record made by :func:`stats` (checked by :func:`check_stats`, which
    gathered ``wy`` = w[label]); the careful rows' split norms are not kept there: the
    backward's careful path recomputes them."""
    careful = np.flatnonzero(rec[5] < 0.0) if np.minimum.reduce(rec[5], initial=0.0) < 0.0 else _NO_ROWS
    wy = w.take(label, axis=0) if wy is None else wy
    return _Stats(rec[0], rec[1], rec[2], rec[3], rec[4], wy, careful, (_NO_F64, _NO_I64),
                  (_NO_F64, _NO_I64), rec[0:2], rec)


def check_stats(stats: Any, p: Problem, x: Any, w: Any, label: Any) -> npt.NDArray[Any] | None:
    """``stats`` must be a record of :func:`stats` for this problem's N and margin and for
    these very values of x and w[label] (their fingerprints, O(N·D)); returns w[label] (the
    rows gathered for the check, which the backward reuses), or None where the record is not
    read (margin 1, no rows)."""
    if p.family is not None:
        raise ValueError(
            f"stats are L-Softmax's statistics record; margin={p.family!r} keeps none (forward returns "
            "stats None for it): pass stats=None"
        )
    if not isinstance(stats, np.ndarray):
        raise TypeError(
            f"stats must be the numpy.ndarray that forward(..., return_stats=True) returned, got "
            f"{type(stats).__module__}.{type(stats).__qualname__}"
        )
    if stats.dtype != np.float64 or stats.shape != (STATS_ROWS, p.n):
        raise ValueError(
            f"stats must be forward's (STATS_ROWS, N) = ({STATS_ROWS}, {p.n}) float64 statistics, got stats.shape="
            f"{tuple(stats.shape)}, stats.dtype={stats.dtype}"
        )
    if p.n and abs(float(stats[5, 0])) != p.margin:
        raise ValueError(
            f"stats were computed for margin={abs(float(stats[5, 0])):g}, not margin={p.margin}"
        )
    if p.margin == 1 or p.n == 0:
        return None  # nothing of the record is read
    wy = w.take(label, axis=0)
    which = None
    if not np.array_equal(stats[6].view(np.uint64), _fingerprint(x).view(np.uint64)):
        which = "x"
    elif not np.array_equal(stats[7].view(np.uint64), _fingerprint(wy).view(np.uint64)):
        which = "w[label]"
    if which is not None:
        raise ValueError(
            f"stats were computed from other values of {which} than these (another batch, or an array "
            "changed in place since the forward, e.g. by an optimizer step): run the forward again, or "
            "pass stats=None"
        )
    return wy


def _no_stats(p: Problem) -> F64:
    """The record where nothing was computed (margin 1, or no rows): only the margin tag
    (the backward reads nothing else of it)."""
    rec = np.zeros((STATS_ROWS, p.n))
    rec[5] = p.margin
    return rec


_NO_F64 = np.zeros(0)
_NO_I64 = np.zeros(0, dtype=np.int64)


def prepare(
    x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    """All argument checks of this backend, labels included (host data); the problem's sizes."""
    p = check_arrays(x, w, label, margin, beta, dtypes=DTYPES, grad_logits=grad_logits, labels_checked=True)
    check_label_values(label, p.c)
    return p


def _checked(
    checked: Problem | None, x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    if checked is None:
        return prepare(x, w, label, margin, beta, grad_logits)
    p = checked.same_call(x, w, label, margin, beta, grad_logits)
    if not p.labels_checked:  # check_arguments(label_values=False): never index with an unscanned label
        check_label_values(label, p.c)
    return p


def forward(
    x: Any, w: Any, label: Any, *, margin: object, beta: object, out: Any = None, return_stats: bool = False
) -> Any:
    p = prepare(x, w, label, margin, beta)
    if out is not None:
        check_out("out", out, (p.n, p.c), p.dtype, x, w, label)
    if p.family is not None:  # a kind that normalises: no statistics record to hand on
        logits = _family.layer_forward(x, w, label, p, out)
        return (logits, None) if return_stats else logits
    logits = x @ w.T if out is None else np.matmul(x, w.T, out=out)
    rec = _margin_forward(logits, x, w, label, p, return_stats)
    return (logits, rec) if return_stats else logits


def add_margin(
    logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, checked: Problem | None = None,
    return_stats: bool = False,
) -> Any:  # fmt: skip
    p = _checked(checked, x, w, label, margin, beta)
    check_out("logits", logits, (p.n, p.c), p.dtype, x, w, label)
    if p.family is not None:
        _family.layer_add_margin(logits, x, w, label, p)
        return (logits, None) if return_stats else logits
    rec = _margin_forward(logits, x, w, label, p, return_stats)
    return (logits, rec) if return_stats else logits


# ---------------------------------------------------------------- compiled kernels (opt-in)

_KERNELS: dict[str, Any] = {"name": None, "module": None}  # name None: not chosen yet
_CPU_KERNELS_ENV = "LSOFTMAX_CPU_KERNELS"


def set_cpu_kernels(name: str, *, _source: str = "name") -> None:
    """Choose the NumPy backend's per-sample kernels: "numpy" (the reference) or "numba"."""
    if name not in ("numpy", "numba"):
        raise ValueError(f"{_source} must be 'numpy' or 'numba', got {name!r}")
    module: Any = None
    if name == "numba":
        try:
            module = importlib.import_module(f"{__package__}._numba_kernels")  # imports Numba: only now
        except ImportError as e:
            raise ImportError(f"{_source}={name!r} needs Numba (pip install numba): {e}") from None
    _KERNELS.update(name=name, module=module)


def cpu_kernels() -> str:
    """The kernels chosen (at first use from the environment variable, default "numpy")."""
    if _KERNELS["name"] is None:
        set_cpu_kernels(os.environ.get(_CPU_KERNELS_ENV) or "numpy", _source=_CPU_KERNELS_ENV)
    return str(_KERNELS["name"])


def _compiled() -> Any:
    """The compiled kernels' module, or None for the NumPy code."""
    if _KERNELS["name"] is None:
        cpu_kernels()
    return _KERNELS["module"]


def _margin_forward(logits: Any, x: Any, w: Any, label: Any, p: Problem, seal: bool = False) -> F64:
    """Rewrite the target logits; returns the statistics record (with ``seal``, the
    fingerprints of the data it came from written in: a record handed to the caller)."""
    if p.margin == 1 or p.n == 0:
        return _no_stats(p)  # psi(c) = c: the target logit is already x·w_y.
    kernels = _compiled()
    if kernels is not None:  # None back: a row needs the careful path below, nothing written
        rec = kernels.forward_rows(
            logits, x, w, label, p.margin, p.beta, _ascending_thresholds(p.margin), _SAFE_SQ[p.dtype]
        )
        if rec is not None:
            return _seal(rec, x, w.take(label, axis=0)) if seal else rec  # type: ignore[no-any-return]
    s = stats(x, w, label, p)
    logits[arange(p.n), label] = target_logits(s, p)
    return _seal(s.record, x, s.wy) if seal else s.record


def target_logits(s: _Stats, p: Problem) -> F64:
    """The N target logits in float64, from the per-sample statistics."""
    # beta = 0: h = (0·c + psi)/1 is psi, bit for bit.
    h = s.psi if p.beta == 0.0 else (p.beta * s.c + s.psi) / (1.0 + p.beta)
    # (a·h)·b rather than a·b·h: a·b may overflow where the true product does not.
    if s.careful.size:
        with np.errstate(invalid="ignore", over="ignore"):  # careful rows are redone below
            target = (s.a * h) * s.b
    else:
        target = s.a * h
        target *= s.b
    if s.careful.size:  # mantissas times h, then the exponents: inf only if the value overflows
        (am, ae), (bm, be) = s.a_parts, s.b_parts
        target[s.careful] = np.ldexp(h[s.careful] * am * bm, ae + be)
    return target


def _careful_rows(s: _Stats, x: npt.NDArray[Any], rows: npt.NDArray[np.intp], k: F64, ell: F64) -> tuple[F64, F64]:
    """q and r for ``rows`` with unit vectors: no ratio b/a or a/b, and no norm that may
    exceed float64, is ever formed."""
    am, ae, xhat = _norm_and_unit(x[rows])
    bm, be, what = _norm_and_unit(s.wy[rows])
    k, ell = k[rows, None], ell[rows, None]
    # q = k·w_y + ell·(b/a)·x = b·(k·w^ + ell·x^) and r = a·(k·x^ + ell·w^): the brackets are
    # O(m^2·|g|); the norms' mantissas multiply them and the exponents come last, so an
    # entry is inf only where its true value overflows (and never 0·inf = NaN).
    with np.errstate(over="ignore"):
        q = np.ldexp(bm[:, None] * (k * what + ell * xhat), be[:, None])
        r = np.ldexp(am[:, None] * (k * xhat + ell * what), ae[:, None])
    return q, r


def backward(
    grad_logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, out: Any = None,
    stats: Any = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:  # fmt: skip
    p = prepare(x, w, label, margin, beta, grad_logits)
    wy = None if stats is None else check_stats(stats, p, x, w, label)
    if p.family is not None:
        if out is not None:
            check_out("out[0]", out[0], (p.n, p.d), p.dtype, x, w, grad_logits, label)
            check_out("out[1]", out[1], (p.c, p.d), p.dtype, x, w, grad_logits, label, out[0])
        return _family.layer_backward(grad_logits, x, w, label, p, out)  # type: ignore[no-any-return]
    if out is None:
        grad_x = grad_logits @ w
        grad_w = grad_logits.T @ x
    else:
        grad_x, grad_w = out
        check_out("out[0]", grad_x, (p.n, p.d), p.dtype, x, w, grad_logits, label)
        check_out("out[1]", grad_w, (p.c, p.d), p.dtype, x, w, grad_logits, label, grad_x)
        np.matmul(grad_logits, w, out=grad_x)
        np.matmul(grad_logits.T, x, out=grad_w)
    _margin_backward(grad_x, grad_w, grad_logits, x, w, label, p, stats, wy)
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
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    p = _checked(checked, x, w, label, margin, beta, grad_logits)
    wy = None if stats is None else check_stats(stats, p, x, w, label)
    check_out("grad_x", grad_x, (p.n, p.d), p.dtype, x, w, grad_logits, label)
    check_out("grad_w", grad_w, (p.c, p.d), p.dtype, x, w, grad_logits, label, grad_x)
    if p.family is not None:
        return _family.layer_add_margin_grad(grad_x, grad_w, grad_logits, x, w, label, p)  # type: ignore[no-any-return]
    _margin_backward(grad_x, grad_w, grad_logits, x, w, label, p, stats, wy)
    return grad_x, grad_w


def _margin_backward(
    grad_x: Any, grad_w: Any, grad_logits: Any, x: Any, w: Any, label: Any, p: Problem, record: Any = None,
    wy: Any = None,
) -> None:  # fmt: skip
    if p.margin == 1 or p.n == 0:
        return
    kernels = _compiled()
    if kernels is not None:
        rec = record
        if rec is None:
            rec = kernels.stats_rows(x, w, label, p.margin, _ascending_thresholds(p.margin), _SAFE_SQ[p.dtype])
        elif np.minimum.reduce(rec[5]) < 0.0:  # a forward's careful rows: the NumPy code
            rec = None
        if rec is not None and kernels.backward_rows(grad_x, grad_w, grad_logits, x, w, label, rec, p.beta):
            return
    g = np.asarray(grad_logits[arange(p.n), label], dtype=np.float64)
    s = stats(x, w, label, p) if record is None else _from_record(record, w, label, wy)
    add_margin_terms(grad_x, grad_w, g, s, x, label, p)


def add_margin_terms(
    grad_x: Any, grad_w: Any, g: F64, s: _Stats, x: Any, label: Any, p: Problem
) -> None:
    """Add q_i to grad_x[i] and r_i to grad_w[label[i]] (docs/derivatives.md), given the
    target entries g of the upstream gradient; consumes ``s.wy``."""
    n = g.shape[0]
    # coef rows: ell·b/a (the coefficient of x in q), k = g·(psi' - 1)/(1 + beta) (of w_y in
    # q and of x in r), ell·a/b (of w_y in r), and ell = g·(psi - c·psi')/(1 + beta); the
    # first three in the order the stacked products below read them.
    coef = np.empty((4, n))
    k, ell = coef[1], coef[3]
    np.subtract(s.dpsi, 1.0, out=k)
    np.multiply(s.c, s.dpsi, out=ell)
    np.subtract(s.psi, ell, out=ell)
    k *= g
    ell *= g
    if p.beta != 0.0:  # dividing by 1 changes nothing
        k /= 1.0 + p.beta
        ell /= 1.0 + p.beta
    fmax, ftiny = LIMITS[p.dtype]
    if s.careful.size == 0:
        # Every norm is in the safe range: the ratios b/a and a/b are finite and normal.
        np.multiply(ell, s.ab[::-1] / s.ab, out=coef[:3:2])  # ell·(b/a), ell·(a/b)
        mag = np.abs(coef[:3])
        # Finite and not flushed to zero; a zero coefficient is exact (the common case has
        # none, and then the smallest magnitude alone decides).
        fits_all = bool(np.maximum.reduce(mag, axis=None) <= fmax)
        if fits_all and not np.minimum.reduce(mag, axis=None) >= ftiny:
            tiny = mag < ftiny
            tiny &= mag != 0.0
            fits_all = not tiny.any()
    else:
        fits_all = False
    if fits_all:
        careful = _NO_ROWS
        rows3 = coef[:3]
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            lx = ell * (s.b / s.a)  # coefficient of x in q
            lw = ell * (s.a / s.b)  # coefficient of w_y in r
        lx[ell == 0.0] = 0.0  # zero-norm rows: 0·inf
        lw[ell == 0.0] = 0.0
        # Coefficients must be exact enough in the input dtype: finite, and not flushed to
        # zero; rows where they are not take the careful path (float32 with norm ratios beyond
        # ~1e38, float64 with extreme norms).
        rows3 = np.stack([lx, k, lw])
        mags = np.abs(rows3)
        fits = np.all(((mags >= ftiny) & (mags <= fmax)) | (mags == 0.0), axis=0)
        fits[s.careful] = False
        careful = np.flatnonzero(~fits)
        if careful.size:  # before s.wy is overwritten below
            q_c, r_c = _careful_rows(s, x, careful, k, ell)
        rows3 = np.where(fits, rows3, 0.0)
    if x.shape[1] <= _STACKED_D:
        r = _stacked_terms(grad_x, rows3.astype(p.dtype), x, s.wy)
    else:
        lxd, kd, lwd = rows3.astype(p.dtype)[:, :, None]
        r = np.multiply(x, lxd)  # q = lx·x + k·w_y, accumulated into grad_x one term at a time
        grad_x += r
        np.multiply(s.wy, kd, out=r)
        grad_x += r
        np.multiply(x, kd, out=r)  # r = k·x + lw·w_y, built in r (s.wy is ours to overwrite)
        np.multiply(s.wy, lwd, out=s.wy)
        r += s.wy
    if careful.size:
        grad_x[careful] += q_c
        r[careful] = r_c
    add_per_class(grad_w, label, r)


#: Up to this many features, the row updates multiply whole (sample, feature) blocks: a
#: row scaled by a per-row coefficient is a broadcast, NumPy's general iterator, which
#: costs twice a plain loop there (measured at N = 256, D = 2 to 32).
_STACKED_D = 16


def _stacked_terms(grad_x: Any, rows3: npt.NDArray[Any], x: Any, wy: Any) -> npt.NDArray[Any]:
    """grad_x += lx·x + k·w_y (in that order) and returns r = k·x + lw·w_y, for the
    coefficient rows ``rows3`` = (lx, k, lw) in the input dtype: the products and sums of
    :func:`add_margin_terms`' row updates, the same bits, in contiguous (2, N, D) blocks."""
    n, d = x.shape
    xw = np.empty((2, n, d), dtype=x.dtype)
    xw[0] = x
    xw[1] = wy
    per_entry = rows3.repeat(d, axis=1).reshape(3, n, d)  # each coefficient over its row's D entries
    prod = np.empty((2, 2, n, d), dtype=x.dtype)
    np.multiply(per_entry[0:2], xw, out=prod[0])  # lx·x, k·w_y
    np.multiply(per_entry[1:3], xw, out=prod[1])  # k·x, lw·w_y
    grad_x += prod[0, 0]
    grad_x += prod[0, 1]
    r = prod[1, 0]
    r += prod[1, 1]
    return r
