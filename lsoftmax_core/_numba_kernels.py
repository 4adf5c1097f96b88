"""Compiled CPU kernels for the NumPy backend's per-sample work (Numba), opt-in.

At small sizes the NumPy backend's cost is the number of NumPy calls it makes (about 45
each way at 256x2x10), not their work.  These kernels do a call's per-sample part in one
compiled call each way: ``forward_rows`` the statistics and the target logits,
``backward_rows`` the coefficients from the upstream gradient's target entries and the
correction rows q_i (into grad_x) and r_i (into grad_w, class by class in sample order).
The GEMMs stay NumPy's.  Selected with ``lsoftmax_core.set_cpu_kernels("numba")`` or
``LSOFTMAX_CPU_KERNELS=numba``; the NumPy code stays the reference and the default, and
handles every call these kernels decline.

They take only the common case: every row's squared norms inside the NumPy backend's safe
range and every backward coefficient finite and normal in the input dtype (the ranges of
``_numpy_backend``).  A call with any other row returns None before writing anything, and
the NumPy backend runs it whole, careful path included; zero-norm rows, extreme norms and
non-finite inputs therefore never reach these loops.

Maths as in docs/derivatives.md and kernels/lsoftmax_math.cuh; psi and psi' are
``_chebyshev.psi_and_derivative`` with the same float64 operations in the same order
(tests compare them bit for bit).  Differences from the NumPy code, within the tolerance
table: the sums x·x, w_y·w_y, x·w_y accumulate in float64 (NumPy's einsum: in the input
dtype).  q_i and r_i are formed with the NumPy code's operations in its order, and r_i is
summed per class in float64 in sample order and added once, as the NumPy code does at
D <= 8 (the same bits there, given the same record; tested).  Deterministic: fixed loop
orders, one thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

# The dtypes' finite and normal ranges and the record's row count, shared with the NumPy code.
from ._numpy_backend import LIMITS, STATS_ROWS

__all__ = ["backward_rows", "forward_rows", "stats_rows"]


@njit(cache=True, nogil=True)
def _psi(c: float, margin: int, thr: Any) -> tuple[float, float]:
    """psi(c) and psi'(c): k = #{j : c <= cos(j*pi/m)} counted over the thresholds ``thr``
    (in any order), T_m and U_{m-1} by their recurrences (docs/derivatives.md, "Forward")."""
    k = 0
    for t in thr:
        if c <= t:
            k += 1
    sign = 1.0 - 2.0 * (k & 1)
    c2 = 2.0 * c
    t_prev, t_cur = 1.0, c  # T_0, T_1
    u_prev, u_cur = 0.0, 1.0  # U_{-1}, U_0
    for _ in range(1, margin):
        t_next = c2 * t_cur
        t_next -= t_prev
        u_next = c2 * u_cur
        u_next -= u_prev
        t_prev, t_cur = t_cur, t_next
        u_prev, u_cur = u_cur, u_next
    psi = sign * t_cur - 2.0 * k
    dpsi = (sign * margin) * u_cur
    return psi, dpsi


@njit(cache=True, nogil=True)
def _stats_rows(x: Any, w: Any, label: Any, margin: int, thr: Any, lo: float, hi: float, rec: Any) -> bool:
    """Rows 0-5 of the statistics record (a, b, c, psi, psi', +m); False as soon as a
    row's squared norms leave [lo, hi] (then ``rec`` is incomplete and must be ignored)."""
    n, d = x.shape
    for i in range(n):
        y = label[i]
        xx = 0.0
        ww = 0.0
        xw = 0.0
        for j in range(d):
            xv = float(x[i, j])
            wv = float(w[y, j])
            xx += xv * xv
            ww += wv * wv
            xw += xv * wv
        if not (lo <= xx <= hi and lo <= ww <= hi):
            return False
        a = np.sqrt(xx)
        b = np.sqrt(ww)
        c = xw / (a * b)
        c = min(max(c, -1.0), 1.0)
        psi, dpsi = _psi(c, margin, thr)
        rec[0, i] = a
        rec[1, i] = b
        rec[2, i] = c
        rec[3, i] = psi
        rec[4, i] = dpsi
        rec[5, i] = margin
    return True


@njit(cache=True, nogil=True)
def _write_targets(logits: Any, label: Any, rec: Any, beta: float) -> None:
    for i in range(label.shape[0]):
        a, b, c, psi = rec[0, i], rec[1, i], rec[2, i], rec[3, i]
        h = psi if beta == 0.0 else (beta * c + psi) / (1.0 + beta)
        logits[i, label[i]] = (a * h) * b  # (a·h)·b: a·b may overflow where the product does not


@njit(cache=True, nogil=True)
def _coefficients(grad_logits: Any, label: Any, rec: Any, beta: float, fmax: float, ftiny: float, coef: Any) -> bool:
    """coef rows k, ell·b/a, ell·a/b (docs/derivatives.md, "Backward at the cost of the
    plain layer") from the target entries g_i = grad_logits[i, label[i]] (exact in float64),
    rounded to ``coef``'s dtype (the input dtype) as they are stored; False if one is not
    finite and normal (or zero) in that dtype."""
    for i in range(label.shape[0]):
        g = float(grad_logits[i, label[i]])
        a, b, c, psi, dpsi = rec[0, i], rec[1, i], rec[2, i], rec[3, i], rec[4, i]
        k = (dpsi - 1.0) * g
        ell = (psi - c * dpsi) * g
        if beta != 0.0:
            k /= 1.0 + beta
            ell /= 1.0 + beta
        lx = ell * (b / a)
        lw = ell * (a / b)
        for v in (k, lx, lw):
            m = abs(v)
            if not (m <= fmax and (m >= ftiny or m == 0.0)):
                return False
        coef[0, i] = k
        coef[1, i] = lx
        coef[2, i] = lw
    return True


@njit(cache=True, nogil=True)
def _apply(grad_x: Any, grad_w: Any, x: Any, w: Any, label: Any, coef: Any, order: Any) -> None:
    """grad_x[i] += q_i = lx·x_i + k·w_y, and grad_w[y] += the float64 sum of the rows
    r_i = k·x_i + lw·w_y of class y in sample order, rounded once.  ``coef`` is already
    rounded to the input dtype, and q_i and r_i are formed in it with the NumPy code's
    operations in its order.  ``order``: a stable sort of the samples by label, or empty:
    then the sums run in one (C, D) float64 block (C <= N), the same sums in the same order."""
    n, d = x.shape
    for i in range(n):
        y = label[i]
        k, lx = coef[0, i], coef[1, i]
        for j in range(d):
            grad_x[i, j] = (grad_x[i, j] + x[i, j] * lx) + w[y, j] * k
    if order.shape[0] == 0:
        c = grad_w.shape[0]
        block = np.zeros((c, d))
        hit = np.zeros(c, dtype=np.bool_)
        for i in range(n):
            y = label[i]
            k, lw = coef[0, i], coef[2, i]
            hit[y] = True
            for j in range(d):
                block[y, j] += x[i, j] * k + w[y, j] * lw
        for y in range(c):
            if hit[y]:  # classes without a sample are left untouched (not even + 0.0)
                for j in range(d):
                    grad_w[y, j] = grad_w[y, j] + block[y, j]
        return
    acc = np.zeros(d)
    start = 0
    while start < n:
        y = label[order[start]]
        stop = start
        acc[:] = 0.0
        while stop < n and label[order[stop]] == y:
            i = order[stop]
            k, lw = coef[0, i], coef[2, i]
            for j in range(d):
                acc[j] += x[i, j] * k + w[y, j] * lw
            stop += 1
        for j in range(d):
            grad_w[y, j] = grad_w[y, j] + acc[j]
        start = stop


@njit(cache=True, nogil=True)
def _forward(logits: Any, x: Any, w: Any, label: Any, margin: int, beta: float, thr: Any, lo: float, hi: float,
             rec: Any) -> bool:  # fmt: skip
    if not _stats_rows(x, w, label, margin, thr, lo, hi, rec):
        return False
    _write_targets(logits, label, rec, beta)
    return True


@njit(cache=True, nogil=True)
def _backward(grad_x: Any, grad_w: Any, grad_logits: Any, x: Any, w: Any, label: Any, rec: Any, beta: float,
              fmax: float, ftiny: float, order: Any) -> bool:  # fmt: skip
    coef = np.empty((3, label.shape[0]), dtype=x.dtype)
    if not _coefficients(grad_logits, label, rec, beta, fmax, ftiny, coef):
        return False
    _apply(grad_x, grad_w, x, w, label, coef, order)
    return True


def stats_rows(x: Any, w: Any, label: Any, margin: int, thr: Any, safe: tuple[float, float]) -> Any:
    """The (6, N) statistics record, or None if a row needs the careful path."""
    rec = np.empty((STATS_ROWS, x.shape[0]))
    return rec if _stats_rows(x, w, label, margin, thr, safe[0], safe[1], rec) else None


def forward_rows(
    logits: Any, x: Any, w: Any, label: Any, margin: int, beta: float, thr: Any, safe: tuple[float, float]
) -> Any:
    """Rewrite the target logits in place and return the statistics record; None (nothing
    written) if a row needs the careful path.  One compiled call (each costs microseconds)."""
    rec = np.empty((STATS_ROWS, x.shape[0]))
    return rec if _forward(logits, x, w, label, margin, beta, thr, safe[0], safe[1], rec) else None


_BY_BLOCK = np.zeros(0, dtype=np.intp)  # "order" when the per-class sums run in a (C, D) block


def backward_rows(grad_x: Any, grad_w: Any, grad_logits: Any, x: Any, w: Any, label: Any, rec: Any, beta: float) -> bool:
    """Add the margin's terms to grad_x and grad_w given the upstream gradient and the
    record; False (nothing written) if a coefficient needs the careful path.  One compiled
    call; a sort by label only where C > N (else the per-class block, no sort)."""
    fmax, ftiny = LIMITS[x.dtype]
    order = _BY_BLOCK if grad_w.shape[0] <= label.shape[0] else np.argsort(label, kind="stable")
    return bool(_backward(grad_x, grad_w, grad_logits, x, w, label, rec, beta, fmax, ftiny, order))
