"""The fused L-Softmax cross-entropy on the NumPy backend: the loss and its gradients
without ever holding the N×C logits, by row or class chunks (:mod:`._loss_plan`).

The target logits come from the same per-sample statistics as ``forward`` (computed once
for all N rows, O(N·D)); each chunk's logits are one GEMM with the target entries
overwritten, so a chunk holds exactly the logits ``forward`` would.  The log-sum-exp
subtracts the row maximum (exact in the input dtype) and sums the exponentials in float64;
class chunks combine their partial sums online.  The margin's own gradient terms are
added once at the end from the collected target entries of G, as in ``backward``.  The
maths: docs/derivatives.md, "Cross-entropy".
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ._loss_plan import ChunkPlan, plan_chunks
from ._numpy_backend import add_margin_terms, stats, target_logits
from .checks import (
    Problem,
    check_arrays,
    check_integer,
    check_label_values,
    check_reduction,
    supported_dtypes,
)

__all__ = ["cross_entropy", "cross_entropy_backward", "cross_entropy_with_grad"]

F64 = npt.NDArray[np.float64]
_DTYPES = supported_dtypes("numpy")


class _Loss(NamedTuple):
    """One call's checked problem and what every pass needs."""

    p: Problem
    reduction: str
    valid: npt.NDArray[np.bool_]
    lab: npt.NDArray[np.intp]  # labels, 0 on ignored rows (a safe index; their weight is 0)
    n_valid: int
    target: F64 | None  # margin > 1: the target logits of forward (float64), else None
    plan: ChunkPlan


def _prepare(
    x: Any, w: Any, label: Any, margin: object, beta: object, reduction: object, ignore_index: object,
    chunk_size: object, chunking: object, memory_budget: object,
) -> _Loss:  # fmt: skip
    reduction = check_reduction(reduction)
    ignore = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
    p = check_arrays(x, w, label, margin, beta, dtypes=_DTYPES)
    plan = plan_chunks(
        p.n, p.c, p.dtype.itemsize, chunk_size=chunk_size, chunking=chunking, memory_budget=memory_budget
    )
    check_label_values(label, p.c, ignore)
    valid = label != ignore
    lab = np.where(valid, label, 0).astype(np.intp, copy=False)
    target = None
    if p.margin > 1 and p.n:
        target = target_logits(stats(x, w, lab, p), p)
    return _Loss(p, reduction, valid, lab, int(valid.sum()), target, plan)


def _row_weights(s: _Loss, grad_loss: Any) -> F64:
    """d(reduced loss)/d(loss_i) times the upstream gradient: 0 on ignored rows."""
    v = s.valid.astype(np.float64)
    if s.reduction == "none":
        return v * np.asarray(grad_loss, dtype=np.float64)
    g = float(np.asarray(grad_loss, dtype=np.float64))
    if s.reduction == "mean":
        # An all-ignored batch has loss 0 and gradient 0 (not 0/0): nothing to learn from.
        return v * (g / s.n_valid) if s.n_valid else v
    return v * g


def _reduce(s: _Loss, per_row: F64) -> npt.NDArray[Any]:
    per_row = np.where(s.valid, per_row, 0.0)
    if s.reduction == "none":
        return per_row.astype(s.p.dtype)
    total = float(np.sum(per_row))
    if s.reduction == "mean":
        total = total / s.n_valid if s.n_valid else 0.0
    return np.asarray(total, dtype=s.p.dtype)


def _chunk_logits(s: _Loss, x: Any, w: Any, rows: slice, classes: slice) -> tuple[Any, npt.NDArray[np.intp], Any]:
    """The chunk's logits (forward's values) and where the chunk's rows find their target:
    (logits, row indices in the chunk, column indices in the chunk) of the targets it holds."""
    z = x[rows] @ w[classes].T
    lab = s.lab[rows]
    hit = np.flatnonzero((lab >= classes.start) & (lab < classes.stop))
    cols = lab[hit] - classes.start
    if s.target is not None:
        z[hit, cols] = s.target[rows][hit]
    return z, hit, cols


def _exp_shifted(z: Any) -> tuple[F64, F64]:
    """z -> exp(z - rowmax) in place; returns (rowmax, sum of exponentials), float64."""
    m = z.max(axis=1)
    z -= m[:, None]  # exact: m is one of the row's values
    np.exp(z, out=z)
    return m.astype(np.float64), z.sum(axis=1, dtype=np.float64)


def _rows(s: _Loss, x: Any, w: Any, weights: F64 | None) -> tuple[F64, F64, Any, Any]:
    """Row chunks: per-row loss and log-sum-exp, and with ``weights`` the gradients (3 GEMMs)."""
    p, n = s.p, s.p.n
    loss, lse = np.zeros(n), np.zeros(n)
    grad_x: Any = None
    grad_w: Any = None
    tmp: Any = None
    g = np.zeros(n)
    if weights is not None:
        grad_x, grad_w = np.empty((n, p.d), p.dtype), np.zeros((p.c, p.d), p.dtype)
    for r0 in range(0, n, s.plan.size):
        rows = slice(r0, min(n, r0 + s.plan.size))
        z, hit, cols = _chunk_logits(s, x, w, rows, slice(0, p.c))
        t = z[hit, cols].astype(np.float64)
        m, se = _exp_shifted(z)
        lse[rows] = m + np.log(se)
        loss[rows] = lse[rows] - t
        if weights is None:
            continue
        wr = weights[rows]
        z *= (wr / se).astype(p.dtype)[:, None]  # softmax times the row's weight
        z[hit, cols] -= wr[hit].astype(p.dtype)
        g[rows] = z[hit, cols]
        np.matmul(z, w, out=grad_x[rows])
        if r0 == 0:
            np.matmul(z.T, x[rows], out=grad_w)
        else:
            tmp = np.empty_like(grad_w) if tmp is None else tmp
            np.matmul(z.T, x[rows], out=tmp)
            grad_w += tmp
    return loss, lse, grad_x, _finish(s, x, w, g, grad_x, grad_w)


def _classes_lse(s: _Loss, x: Any, w: Any) -> tuple[F64, F64]:
    """Class chunks, first pass: per-row loss and log-sum-exp, combined online (1 GEMM)."""
    p, n = s.p, s.p.n
    m, se, t = np.full(n, -np.inf), np.zeros(n), np.zeros(n)
    for k0 in range(0, p.c, s.plan.size):
        z, hit, cols = _chunk_logits(s, x, w, slice(0, n), slice(k0, min(p.c, k0 + s.plan.size)))
        t[hit] = z[hit, cols]
        mk, sk = _exp_shifted(z)
        m_new = np.maximum(m, mk)
        se = se * np.exp(m - m_new) + sk * np.exp(mk - m_new)
        m = m_new
    lse = m + np.log(se)
    return lse - t, lse


def _classes_grad(s: _Loss, x: Any, w: Any, weights: F64, lse: F64) -> tuple[Any, Any]:
    """Class chunks, gradient pass: recompute each chunk's logits (3 more GEMMs)."""
    p, n = s.p, s.p.n
    grad_x, grad_w = np.empty((n, p.d), p.dtype), np.empty((p.c, p.d), p.dtype)
    g = np.zeros(n)
    tmp: Any = None
    for k0 in range(0, p.c, s.plan.size):
        classes = slice(k0, min(p.c, k0 + s.plan.size))
        z, hit, cols = _chunk_logits(s, x, w, slice(0, n), classes)
        m, _ = _exp_shifted(z)
        z *= (weights * np.exp(m - lse)).astype(p.dtype)[:, None]  # softmax times the weight
        z[hit, cols] -= weights[hit].astype(p.dtype)
        g[hit] = z[hit, cols]
        if k0 == 0:
            np.matmul(z, w[classes], out=grad_x)
        else:
            tmp = np.empty_like(grad_x) if tmp is None else tmp
            np.matmul(z, w[classes], out=tmp)
            grad_x += tmp
        np.matmul(z.T, x, out=grad_w[classes])
    return grad_x, _finish(s, x, w, g, grad_x, grad_w)


def _finish(s: _Loss, x: Any, w: Any, g: F64, grad_x: Any, grad_w: Any) -> Any:
    """Add the margin's own gradient terms (from the target entries g of G) to the plain
    GEMM results; returns grad_w."""
    if grad_x is not None and s.target is not None:
        add_margin_terms(grad_x, grad_w, g, stats(x, w, s.lab, s.p), x, s.lab, s.p)
    return grad_w


def _empty_grads(s: _Loss) -> tuple[Any, Any]:
    return np.zeros((s.p.n, s.p.d), s.p.dtype), np.zeros((s.p.c, s.p.d), s.p.dtype)


def cross_entropy(
    x: Any, w: Any, label: Any, *, margin: object, beta: object, reduction: object = "mean",
    ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
    memory_budget: object = None, return_lse: bool = False,
) -> Any:  # fmt: skip
    s = _prepare(x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget)
    if s.p.n == 0:
        loss, lse = np.zeros(0), np.zeros(0)
    elif s.plan.mode == "rows":
        loss, lse, _, _ = _rows(s, x, w, None)
    else:
        loss, lse = _classes_lse(s, x, w)
    out = _reduce(s, loss)
    return (out, lse) if return_lse else out


def cross_entropy_backward(
    grad_loss: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, reduction: object = "mean",
    ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
    memory_budget: object = None, lse: Any = None,
) -> tuple[Any, Any]:  # fmt: skip
    s = _prepare(x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget)
    shape = (s.p.n,) if s.reduction == "none" else ()
    if tuple(np.shape(grad_loss)) != shape:
        raise ValueError(
            f"grad_loss must have the loss's shape {shape} (reduction={s.reduction!r}), got {tuple(np.shape(grad_loss))}"
        )
    if lse is not None and tuple(np.shape(lse)) != (s.p.n,):
        raise ValueError(f"lse must have shape (N,) = ({s.p.n},), got {tuple(np.shape(lse))}")
    if s.p.n == 0:
        return _empty_grads(s)
    weights = _row_weights(s, grad_loss)
    if s.plan.mode == "rows":
        _, _, grad_x, grad_w = _rows(s, x, w, weights)
        return grad_x, grad_w
    if lse is None:
        _, lse = _classes_lse(s, x, w)
    return _classes_grad(s, x, w, weights, np.asarray(lse, dtype=np.float64))


def cross_entropy_with_grad(
    x: Any, w: Any, label: Any, *, margin: object, beta: object, reduction: object = "mean",
    ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
    memory_budget: object = None,
) -> tuple[Any, Any, Any]:  # fmt: skip
    if reduction == "none":
        raise ValueError("reduction='none' has a per-row upstream gradient: use cross_entropy_backward")
    s = _prepare(x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget)
    if s.p.n == 0:
        return (_reduce(s, np.zeros(0)), *_empty_grads(s))
    weights = _row_weights(s, 1.0)
    if s.plan.mode == "rows":
        loss, _, grad_x, grad_w = _rows(s, x, w, weights)
    else:
        loss, lse = _classes_lse(s, x, w)
        grad_x, grad_w = _classes_grad(s, x, w, weights, lse)
    return _reduce(s, loss), grad_x, grad_w
