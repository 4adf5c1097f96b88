"""The NumPy (CPU) backend: two BLAS GEMMs plus O((N + C)·D) float64 work.

Forward (paper eq. 4-7), with a = |x_i|, b = |w_y|, c = cos(theta):

    f_y = (beta·x·w_y + a·b·psi(c)) / (1 + beta) = a·b·(beta·c + psi(c)) / (1 + beta)

Backward.  With g_i = grad_logits[i, y_i], psi' = dpsi/dc and the unit vectors
x^ = x/a, w^ = w_y/b, the exact derivatives are

    df_y/dx   = ((beta + psi')/(1+beta))·w_y + (b/(1+beta))·(psi - c·psi')·x^
    df_y/dw_y = ((beta + psi')/(1+beta))·x   + (a/(1+beta))·(psi - c·psi')·w^

The plain GEMMs G @ w and G^T @ x already add g_i·w_y and g_i·x_i, so only the
difference is added afterwards, per sample:

    q_i = g_i·b/(1+beta) · ((psi' - 1)·w^ + (psi - c·psi')·x^)     added to grad_x[i]
    r_i = g_i·a/(1+beta) · ((psi' - 1)·x^ + (psi - c·psi')·w^)     added to grad_w[y_i]

r is reduced per class after a stable sort by label, so the result does not depend on
accumulation order.  Writing q and r with unit vectors avoids the ratios b/a and a/b,
which overflow for tiny or huge norms.

Zero-norm rows (a = 0 or b = 0) have no angle, and a·b·psi(c) has no derivative there
for m > 1.  Convention: such a sample gets no margin, as if m = 1: f_y = x·w_y (= 0) with
the plain gradients df_y/dx = w_y, df_y/dw_y = x.  This is the only choice that agrees
with m = 1 being exactly a linear layer; in the formulas above it is psi' = 1 and
psi - c·psi' = 0, so q_i = r_i = 0.

The per-sample statistics are computed in float64 whatever the input dtype (they cost
O(N·D), against the GEMMs' O(N·C·D)), and norms are computed with a per-row scale so that
neither float32 nor float64 inputs overflow or underflow in |x|^2.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ._chebyshev import psi_and_derivative
from ._validate import Problem, check_labels_host, validate

__all__ = ["FLOAT_DTYPES", "backward", "forward"]

FLOAT_DTYPES: tuple[np.dtype[Any], ...] = (np.dtype(np.float32), np.dtype(np.float64))

F64 = npt.NDArray[np.float64]


class _Stats(NamedTuple):
    a: F64  # |x_i|
    b: F64  # |w_{y_i}|
    c: F64  # cos(theta_i), clamped
    psi: F64
    dpsi: F64
    xhat: F64  # x_i / a (zero row where a == 0)
    what: F64  # w_{y_i} / b (zero row where b == 0)


def _norm_and_unit(rows: npt.NDArray[Any]) -> tuple[F64, F64]:
    """Row norms and unit rows in float64, scaled by max|row| to avoid over/underflow."""
    r = np.asarray(rows, dtype=np.float64)
    amax = np.max(np.abs(r), axis=1, initial=0.0)
    scale = np.where(amax > 0.0, amax, 1.0)
    s = r / scale[:, None]
    rel = np.sqrt(np.einsum("ij,ij->i", s, s))
    unit = s / np.where(rel > 0.0, rel, 1.0)[:, None]
    return amax * rel, unit


def _stats(x: npt.NDArray[Any], w: npt.NDArray[Any], label: npt.NDArray[Any], p: Problem) -> _Stats:
    a, xhat = _norm_and_unit(x)
    b, what = _norm_and_unit(w[label])
    c = np.clip(np.einsum("ij,ij->i", xhat, what), -1.0, 1.0)
    psi, dpsi = psi_and_derivative(c, p.margin)
    degenerate = (a == 0.0) | (b == 0.0)  # no angle: plain linear (see module docstring)
    c[degenerate] = 0.0
    psi[degenerate] = 0.0
    dpsi[degenerate] = 1.0
    return _Stats(a, b, c, psi, dpsi, xhat, what)


def _prepare(
    x: Any, w: Any, label: Any, margin: object, beta: object, grad_logits: Any = None
) -> Problem:
    p = validate(x, w, label, margin, beta, float_dtypes=FLOAT_DTYPES, grad_logits=grad_logits)
    check_labels_host(label, p.c)
    return p


def forward(x: Any, w: Any, label: Any, *, margin: object, beta: object) -> npt.NDArray[Any]:
    p = _prepare(x, w, label, margin, beta)
    logits = x @ w.T
    if p.margin == 1 or p.n == 0:
        return logits  # psi(c) = c: the target logit is already x·w_y.
    s = _stats(x, w, label, p)
    h = (p.beta * s.c + s.psi) / (1.0 + p.beta)
    # (a·h)·b rather than a·b·h: a·b may overflow where the true product does not.
    logits[np.arange(p.n), label] = (s.a * h) * s.b
    return logits


def backward(
    grad_logits: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    p = _prepare(x, w, label, margin, beta, grad_logits)
    grad_x = grad_logits @ w
    grad_w = grad_logits.T @ x
    if p.margin == 1 or p.n == 0:
        return grad_x, grad_w
    s = _stats(x, w, label, p)
    g = np.asarray(grad_logits[np.arange(p.n), label], dtype=np.float64)
    inv = 1.0 / (1.0 + p.beta)
    along_same = (s.dpsi - 1.0) * inv  # coefficient of the row's own-side unit vector
    along_other = (s.psi - s.c * s.dpsi) * inv
    q = (g * s.b)[:, None] * (along_same[:, None] * s.what + along_other[:, None] * s.xhat)
    r = (g * s.a)[:, None] * (along_same[:, None] * s.xhat + along_other[:, None] * s.what)
    grad_x += q  # summed in float64, rounded once to the output dtype
    # Deterministic per-class reduction: stable sort by label, then contiguous sums.
    order = np.argsort(label, kind="stable")
    sorted_label = label[order]
    starts = np.flatnonzero(np.r_[True, sorted_label[1:] != sorted_label[:-1]])
    per_class = np.add.reduceat(r[order], starts, axis=0)
    classes = sorted_label[starts]
    grad_w[classes] += per_class
    return grad_x, grad_w
