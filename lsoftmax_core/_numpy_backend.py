"""The NumPy (CPU) backend: two BLAS GEMMs plus O((N + C)·D) work.

``forward`` is ``x @ w.T`` and then the N target logits are rewritten; ``backward`` is the
plain layer's ``G @ w`` and ``G.T @ x`` plus, per sample, the correction rows q_i (added to
grad_x[i]) and r_i (added to grad_w[y_i], summed per class in a fixed order).  The maths,
the zero-norm convention and the numerics are in docs/derivatives.md ("Backward at the
cost of the plain layer", "Zero-norm rows", "Numerics"); this module follows it line by
line.  Implementation choices:

* the per-sample sums x·x, w_y·w_y, x·w_y accumulate in the input dtype (einsum's SIMD
  loops: as accurate as the GEMM's own logits), everything after them in float64, and the
  row updates in the input dtype with float64 coefficients;
* rows whose norms or coefficients leave the safe range take a careful float64 path with
  per-row scaling, unit vectors and norms kept as mantissa and exponent;
* large N×D temporaries are few and reused in place (each costs page faults that show
  against the GEMMs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ._chebyshev import psi_and_derivative
from .checks import Problem, check_arrays, check_label_values, check_out, supported_dtypes

__all__ = ["add_margin", "add_margin_grad", "backward", "forward", "prepare"]

_DTYPES = supported_dtypes("numpy")

F64 = npt.NDArray[np.float64]


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


def stats(x: npt.NDArray[Any], w: npt.NDArray[Any], label: npt.NDArray[Any], p: Problem) -> _Stats:
    """Per-sample norms, cosine, psi and psi' (float64), for labels already checked."""
    wy = w[label]
    sx, sw, dot = _rowdot(x, x), _rowdot(wy, wy), _rowdot(x, wy)
    lo, hi = _SAFE_SQ[p.dtype]
    careful = np.flatnonzero(~((sx >= lo) & (sx <= hi) & (sw >= lo) & (sw <= hi)))
    a, b = np.sqrt(sx), np.sqrt(sw)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = dot / (a * b)
    am, ae, xhat = _norm_and_unit(x[careful])  # zero rows, and float64 rows with extreme norms
    bm, be, what = _norm_and_unit(wy[careful])
    if careful.size:
        with np.errstate(over="ignore"):  # a norm beyond float64: inf here, split in a_parts
            a[careful], b[careful] = np.ldexp(am, ae), np.ldexp(bm, be)
        c[careful] = np.einsum("ij,ij->i", xhat, what)
    np.clip(c, -1.0, 1.0, out=c)
    psi, dpsi = psi_and_derivative(c, p.margin)
    degenerate = (a == 0.0) | (b == 0.0)  # no angle: plain linear (docs/derivatives.md)
    c[degenerate] = 0.0
    psi[degenerate] = 0.0
    dpsi[degenerate] = 1.0
    return _Stats(a, b, c, psi, dpsi, wy, careful, (am, ae), (bm, be))


def prepare(
    x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    """All argument checks of this backend, labels included (host data); the problem's sizes."""
    p = check_arrays(x, w, label, margin, beta, dtypes=_DTYPES, grad_logits=grad_logits)
    check_label_values(label, p.c)
    return p


def _checked(
    checked: Problem | None, x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    if checked is None:
        return prepare(x, w, label, margin, beta, grad_logits)
    return checked.same_call(x, w, label, margin, beta, grad_logits)


def forward(x: Any, w: Any, label: Any, *, margin: object, beta: object, out: Any = None) -> npt.NDArray[Any]:
    p = prepare(x, w, label, margin, beta)
    if out is None:
        logits = x @ w.T
    else:
        check_out("out", out, (p.n, p.c), p.dtype, x, w, label)
        logits = np.matmul(x, w.T, out=out)
    _margin_forward(logits, x, w, label, p)
    return logits


def add_margin(
    logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, checked: Problem | None = None
) -> npt.NDArray[Any]:
    p = _checked(checked, x, w, label, margin, beta)
    check_out("logits", logits, (p.n, p.c), p.dtype, x, w, label)
    _margin_forward(logits, x, w, label, p)
    return logits  # type: ignore[no-any-return]


def _margin_forward(logits: Any, x: Any, w: Any, label: Any, p: Problem) -> None:
    if p.margin == 1 or p.n == 0:
        return  # psi(c) = c: the target logit is already x·w_y.
    logits[np.arange(p.n), label] = target_logits(stats(x, w, label, p), p)


def target_logits(s: _Stats, p: Problem) -> F64:
    """The N target logits in float64, from the per-sample statistics."""
    h = (p.beta * s.c + s.psi) / (1.0 + p.beta)
    # (a·h)·b rather than a·b·h: a·b may overflow where the true product does not.
    with np.errstate(invalid="ignore", over="ignore"):  # careful rows are redone below
        target = (s.a * h) * s.b
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
    grad_logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, out: Any = None
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    p = prepare(x, w, label, margin, beta, grad_logits)
    if out is None:
        grad_x = grad_logits @ w
        grad_w = grad_logits.T @ x
    else:
        grad_x, grad_w = out
        check_out("out[0]", grad_x, (p.n, p.d), p.dtype, x, w, grad_logits, label)
        check_out("out[1]", grad_w, (p.c, p.d), p.dtype, x, w, grad_logits, label, grad_x)
        np.matmul(grad_logits, w, out=grad_x)
        np.matmul(grad_logits.T, x, out=grad_w)
    _margin_backward(grad_x, grad_w, grad_logits, x, w, label, p)
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
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    p = _checked(checked, x, w, label, margin, beta, grad_logits)
    check_out("grad_x", grad_x, (p.n, p.d), p.dtype, x, w, grad_logits, label)
    check_out("grad_w", grad_w, (p.c, p.d), p.dtype, x, w, grad_logits, label, grad_x)
    _margin_backward(grad_x, grad_w, grad_logits, x, w, label, p)
    return grad_x, grad_w


def _margin_backward(
    grad_x: Any, grad_w: Any, grad_logits: Any, x: Any, w: Any, label: Any, p: Problem
) -> None:
    if p.margin == 1 or p.n == 0:
        return
    g = np.asarray(grad_logits[np.arange(p.n), label], dtype=np.float64)
    add_margin_terms(grad_x, grad_w, g, stats(x, w, label, p), x, label, p)


def add_margin_terms(
    grad_x: Any, grad_w: Any, g: F64, s: _Stats, x: Any, label: Any, p: Problem
) -> None:
    """Add q_i to grad_x[i] and r_i to grad_w[label[i]] (docs/derivatives.md), given the
    target entries g of the upstream gradient; consumes ``s.wy``."""
    k = g * (s.dpsi - 1.0) / (1.0 + p.beta)
    ell = g * (s.psi - s.c * s.dpsi) / (1.0 + p.beta)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lx = ell * (s.b / s.a)  # coefficient of x in q
        lw = ell * (s.a / s.b)  # coefficient of w_y in r
    lx[ell == 0.0] = 0.0  # zero-norm rows: 0·inf
    lw[ell == 0.0] = 0.0
    # Coefficients must be exact enough in the input dtype: finite, and not flushed to
    # zero; rows where they are not take the careful path (float32 with norm ratios beyond
    # ~1e38, float64 with extreme norms).
    fi = np.finfo(p.dtype)
    coef = np.abs(np.stack([k, lx, lw]))
    fits = np.all(((coef >= fi.tiny) & (coef <= fi.max)) | (coef == 0.0), axis=0)
    fits[s.careful] = False
    careful = np.flatnonzero(~fits)
    if careful.size:  # before s.wy is overwritten below
        q_c, r_c = _careful_rows(s, x, careful, k, ell)
    kd, lxd, lwd = (np.where(fits, v, 0.0).astype(p.dtype)[:, None] for v in (k, lx, lw))
    buf = np.multiply(x, lxd)  # q = k·w_y + lx·x, accumulated into grad_x one term at a time
    grad_x += buf
    np.multiply(s.wy, kd, out=buf)
    grad_x += buf
    np.multiply(x, kd, out=buf)  # r = k·x + lw·w_y, built in buf (s.wy is ours to overwrite)
    np.multiply(s.wy, lwd, out=s.wy)
    buf += s.wy
    if careful.size:
        grad_x[careful] += q_c
        buf[careful] = r_c
    _add_per_class(grad_w, label, buf)


def _add_per_class(grad_w: npt.NDArray[Any], label: npt.NDArray[Any], rows: npt.NDArray[Any]) -> None:
    """grad_w[j] += sum of rows[i] over the samples i with label j, in sample order.

    Deterministic (a stable sort fixes the order of each class's sum); classes hit once go
    through one fancy-indexed add, and only repeated classes through reduceat, whose cost
    per segment would dominate when most labels in a batch are distinct.
    """
    order = np.argsort(label, kind="stable")
    sorted_label = label[order]
    first = np.r_[True, sorted_label[1:] != sorted_label[:-1]]
    starts = np.flatnonzero(first)
    if starts.size == label.size:
        grad_w[label] += rows
        return
    counts = np.diff(np.r_[starts, label.size])
    alone = np.repeat(counts == 1, counts)  # per sorted position
    single = order[alone]
    grad_w[label[single]] += rows[single]
    shared = ~alone
    seg = np.flatnonzero(first[shared])
    grad_w[sorted_label[shared][seg]] += np.add.reduceat(rows[order[shared]], seg, axis=0)
