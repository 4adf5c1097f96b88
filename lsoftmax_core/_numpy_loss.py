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
from ._numpy_backend import _from_record, add_margin_terms, stats, target_logits
from .checks import (
    Problem,
    check_arrays,
    check_integer,
    check_label_values,
    check_reduction,
    check_shard,
    supported_dtypes,
)

__all__ = ["cross_entropy", "cross_entropy_backward", "cross_entropy_shard_stats", "cross_entropy_with_grad"]

F64 = npt.NDArray[np.float64]
#: The row chunks' grad_w accumulator: a block of classes of about this many bytes (a
#: core's L2 cache), so the running sum is read and written once per chunk.
_ACC_BYTES = 1 << 20
_DTYPES = supported_dtypes("numpy")


class _Loss(NamedTuple):
    """One call's checked problem and what every pass needs."""

    p: Problem
    reduction: str
    valid: npt.NDArray[np.bool_]
    # Rows whose target class is one of w's rows: all valid rows, or on a class shard the
    # valid rows whose label lies in [class_start, class_start + C).
    owned: npt.NDArray[np.bool_]
    lab: npt.NDArray[np.intp]  # labels as rows of w where owned, else 0 (a safe index, never a target)
    n_valid: int
    sharded: bool  # w is a shard of the classes (a softmax's denominator comes from outside)
    target: F64 | None  # margin > 1: the target logits of forward (float64), else None
    plan: ChunkPlan
    record: F64 | None  # margin > 1: the per-sample statistics (_numpy_backend.stats), reused by _finish


def _prepare(
    x: Any, w: Any, label: Any, margin: object, beta: object, reduction: object, ignore_index: object,
    chunk_size: object, chunking: object, memory_budget: object, class_start: object = 0,
    num_classes: object = None,
) -> _Loss:  # fmt: skip
    reduction = check_reduction(reduction)
    ignore = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
    p = check_arrays(x, w, label, margin, beta, dtypes=_DTYPES)
    start, total = check_shard(class_start, num_classes, p.c)
    plan = plan_chunks(
        p.n, p.c, p.dtype.itemsize, chunk_size=chunk_size, chunking=chunking, memory_budget=memory_budget
    )
    check_label_values(label, total, ignore)
    valid = label != ignore
    owned = valid if p.c == total else valid & (label >= start) & (label < start + p.c)
    # intp before the shift: a narrow label dtype cannot hold class_start (uint8 - 300)
    lab = np.where(owned, label.astype(np.intp, copy=False) - start, 0)
    target = record = None
    if p.margin > 1 and p.n:
        st = stats(x, w, lab, p)  # once per call: the gradient's margin terms reuse them
        target, record = target_logits(st, p), st.record
    return _Loss(p, reduction, valid, owned, lab, int(valid.sum()), p.c != total, target, plan, record)


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


def _chunk_logits(
    s: _Loss, x: Any, w: Any, rows: slice, classes: slice
) -> tuple[Any, npt.NDArray[np.intp], Any]:
    """The chunk's logits (forward's values) and where the chunk's rows find their target:
    (logits, row indices in the chunk, column indices in the chunk) of the targets it holds."""
    z = x[rows] @ w[classes].T
    lab = s.lab[rows]
    hit = np.flatnonzero(s.owned[rows] & (lab >= classes.start) & (lab < classes.stop))
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


def _rows(
    s: _Loss, x: Any, w: Any, weights: F64 | None, lse_all: F64 | None = None
) -> tuple[F64, F64, Any, Any]:
    """Row chunks: per-row target logit (0 where not owned) and log-sum-exp, and with
    ``weights`` the gradients (3 GEMMs).
    ``lse_all``: the rows' log-sum-exp over all classes when w is one shard of them (the
    softmax's denominator then comes from outside the chunk)."""
    p, n = s.p, s.p.n
    tgt, lse = np.zeros(n), np.zeros(n)
    grad_x: Any = None
    grad_w: Any = None
    tmp: Any = None
    g = np.zeros(n)
    if weights is not None:
        grad_x, grad_w = np.empty((n, p.d), p.dtype), np.zeros((p.c, p.d), p.dtype)
    for r0 in range(0, n, s.plan.size):
        rows = slice(r0, min(n, r0 + s.plan.size))
        z, hit, cols = _chunk_logits(s, x, w, rows, slice(0, p.c))
        tgt[r0 + hit] = z[hit, cols]
        m, se = _exp_shifted(z)
        lse[rows] = m + np.log(se)
        if weights is None:
            continue
        wr = weights[rows]
        # softmax times the row's weight: exp(z - m) / se, or exp(z - m) * exp(m - lse_all)
        scale = wr / se if lse_all is None else wr * np.exp(m - lse_all[rows])
        z *= scale.astype(p.dtype)[:, None]
        z[hit, cols] -= wr[hit].astype(p.dtype)
        g[r0 + hit] = z[hit, cols]
        np.matmul(z, w, out=grad_x[rows])
        if r0 == 0:
            np.matmul(z.T, x[rows], out=grad_w)
            continue
        # grad_w += G_R^T X_R, one cache-sized block of classes at a time: NumPy's GEMM
        # cannot accumulate into its output, and a whole (C, D) temporary would cost a
        # second gradient's memory and stream it through memory twice per chunk.
        if tmp is None:
            tmp = np.empty((max(1, _ACC_BYTES // max(1, p.d * p.dtype.itemsize)), p.d), p.dtype)
        for k0 in range(0, p.c, tmp.shape[0]):
            k1 = min(p.c, k0 + tmp.shape[0])
            part = np.matmul(z[:, k0:k1].T, x[rows], out=tmp[: k1 - k0])
            grad_w[k0:k1] += part
    return tgt, lse, grad_x, _finish(s, x, w, g, grad_x, grad_w)


def _classes_lse(s: _Loss, x: Any, w: Any) -> tuple[F64, F64]:
    """Class chunks, first pass: per-row target logit (0 where not owned) and log-sum-exp,
    combined online (1 GEMM)."""
    p, n = s.p, s.p.n
    m, se, t = np.full(n, -np.inf), np.zeros(n), np.zeros(n)
    for k0 in range(0, p.c, s.plan.size):
        z, hit, cols = _chunk_logits(s, x, w, slice(0, n), slice(k0, min(p.c, k0 + s.plan.size)))
        t[hit] = z[hit, cols]
        mk, sk = _exp_shifted(z)
        m_new = np.maximum(m, mk)
        se = se * np.exp(m - m_new) + sk * np.exp(mk - m_new)
        m = m_new
    return t, m + np.log(se)


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
    if grad_x is not None and s.record is not None:
        add_margin_terms(grad_x, grad_w, g, _from_record(s.record, w, s.lab), x, s.lab, s.p)
    return grad_w


def _lse_pass(s: _Loss, x: Any, w: Any) -> tuple[F64, F64]:
    """Each row's target logit (float64, 0 where not owned) and log-sum-exp over w's classes."""
    if s.p.n == 0:
        return np.zeros(0), np.zeros(0)
    if s.plan.mode == "rows":
        tgt, lse, _, _ = _rows(s, x, w, None)
        return tgt, lse
    return _classes_lse(s, x, w)


def _empty_grads(s: _Loss) -> tuple[Any, Any]:
    return np.zeros((s.p.n, s.p.d), s.p.dtype), np.zeros((s.p.c, s.p.d), s.p.dtype)


def cross_entropy(
    x: Any, w: Any, label: Any, *, margin: object, beta: object, reduction: object = "mean",
    ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
    memory_budget: object = None, return_lse: bool = False,
) -> Any:  # fmt: skip
    s = _prepare(x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget)
    tgt, lse = _lse_pass(s, x, w)
    out = _reduce(s, lse - tgt)
    return (out, lse) if return_lse else out


def cross_entropy_backward(
    grad_loss: Any, x: Any, w: Any, label: Any, *, margin: object, beta: object, reduction: object = "mean",
    ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
    memory_budget: object = None, lse: Any = None, class_start: object = 0, num_classes: object = None,
) -> tuple[Any, Any]:  # fmt: skip
    s = _prepare(
        x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget, class_start,
        num_classes,
    )  # fmt: skip
    if s.sharded and lse is None:
        raise ValueError(
            "lse (the rows' log-sum-exp over all num_classes classes) is required for a class shard"
        )
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
        lse_all = np.asarray(lse, dtype=np.float64) if s.sharded else None
        _, _, grad_x, grad_w = _rows(s, x, w, weights, lse_all)
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
        tgt, lse, grad_x, grad_w = _rows(s, x, w, weights)
    else:
        tgt, lse = _classes_lse(s, x, w)
        grad_x, grad_w = _classes_grad(s, x, w, weights, lse)
    return _reduce(s, lse - tgt), grad_x, grad_w


def cross_entropy_shard_stats(
    x: Any, w: Any, label: Any, *, class_start: object, num_classes: object, margin: object, beta: object,
    ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
    memory_budget: object = None,
) -> tuple[F64, F64]:  # fmt: skip
    s = _prepare(
        x, w, label, margin, beta, "none", ignore_index, chunk_size, chunking, memory_budget, class_start,
        num_classes,
    )  # fmt: skip
    tgt, lse = _lse_pass(s, x, w)
    return lse, tgt
