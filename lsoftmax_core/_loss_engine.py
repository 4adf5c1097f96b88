"""The fused L-Softmax cross-entropy, once for every array library: the checks, the chunk
plan (:mod:`._loss_plan`), the row and class passes, the row weights and the reduction.

:class:`LossEngine` runs the four public loss functions over a backend's *ops*
(:class:`LossOps`): the array library ``xp``, the GEMMs, and what a chunk of logits needs
beyond them (its target entries, its softmax and gradient, the margin's own terms), which
the NumPy backend does with NumPy (:mod:`._numpy_loss`) and the CuPy backend with this
project's kernels (:mod:`._cupy_loss`; its tests run it on NumPy with the host emulator).

Per call, after every check: ``ops.bind`` checks the labels (NumPy: on the host; CuPy: on the
device, reported by a later call) and computes the N float64 target logits of ``forward``
once (margin > 1).  Then

* rows: z = x[R] @ w.T into one buffer; ``rows_chunk`` turns it into G (softmax times the
  row's weight, minus the weight at the target), recording each row's target logit and
  log-sum-exp; then grad_w (+)= Gᵀ·x[R] and grad_x[R] = G·w, and the next chunk's logits
  are written into the same buffer, all class block by class block (``ops.class_block``:
  one block on a GPU, a cache-sized one on a CPU, so each block of w and grad_w is read
  from memory once per chunk): three GEMMs in all;
* classes: a first pass combines each chunk's (max, sum of exponentials) online into the
  rows' log-sum-exp; the gradient pass recomputes each chunk's logits, forms G and adds
  G·w[K] to grad_x and writes grad_w[K] = Gᵀ·x: four GEMMs.

The margin's own gradient terms are added once at the end from the target entries g_i of
G (``ops.margin``).  A given ``lse`` is the softmax's denominator in both chunkings.
The maths: docs/derivatives.md, "Cross-entropy" and "Class shards".
"""

from __future__ import annotations

import numbers
from dataclasses import replace
from typing import Any, Callable, NamedTuple, Protocol

import numpy as np

from . import _family
from ._loss_plan import ChunkPlan, LossOptions, plan_chunks
from .checks import Problem, check_arrays, check_shard

__all__ = ["OP_BACKWARD", "OP_FORWARD", "LossEngine", "LossOps"]

#: What a bad label is reported as having been found by (the CuPy kernels' codes).
OP_FORWARD, OP_BACKWARD = 0, 1


class LossOps(Protocol):
    """A backend's part of the fused loss.  ``bind`` returns the call's state ``k``, which
    the other methods take first; ``k.valid`` (bool (N,)), ``k.n_valid`` (the count, a host
    or device scalar), ``k.tgt`` and ``k.lse`` (float64 (N,): each row's target logit, 0
    where w has none, and its log-sum-exp over w's classes, filled by the passes); for a kind
    that normalises (``set_family``), ``k.owned`` and ``k.lab`` (the rows whose target class
    is w's, and that class) and ``k.g`` (the target entries of G)."""

    @property
    def xp(self) -> Any: ...

    @property
    def dtypes(self) -> tuple[np.dtype[Any], ...]: ...

    def arrays(self, x: Any, w: Any) -> tuple[Any, Any]: ...

    def bind(self, x: Any, w: Any, label: Any, p: Problem, ignore: int, start: int, total: int, op: int) -> Any: ...

    def check_lse(self, k: Any, lse: Any) -> None: ...

    def gemm(self, a: Any, b: Any, out: Any) -> None: ...

    def gemm_add(self, k: Any, a: Any, b: Any, out: Any) -> None: ...

    def class_block(self, p: Problem) -> int: ...

    def begin_grad(self, k: Any, weights: Any, lse: Any, grad_x: Any, grad_w: Any) -> None: ...

    def rows_chunk(self, k: Any, z: Any, r0: int, *, grad: bool) -> None: ...

    def classes_lse(self, k: Any, z: Any, k0: int, *, first: bool) -> None: ...

    def classes_grad(self, k: Any, z: Any, k0: int) -> None: ...

    def margin(self, k: Any) -> None: ...

    def to_dtype(self, a: Any, dtype: Any) -> Any: ...

    def set_family(self, k: Any, target: Any, colscale: Any, sub: int = 1, subidx: Any = None) -> None: ...

    def done(self) -> None: ...


class _Call(NamedTuple):
    """One call's checked problem, options, plan and backend state."""

    p: Problem
    opts: LossOptions
    plan: ChunkPlan
    x: Any
    w: Any
    k: Any
    sharded: bool
    fam: Any = None  # a kind that normalises: its _Family


class _Family(NamedTuple):
    """A kind that normalises (:mod:`._family`): the caller's x and w, the rows that own
    their target (``rows``, ``lab`` their rows of w), beta, whether the chunks' columns were
    scaled by 1/|w_j| (else the GEMMs took a normalised copy of w), and |w_j|."""

    kind: Any
    x: Any
    w: Any
    rows: Any
    lab: Any
    beta: float
    scaled: bool
    norms: Any  # |w_j|, float64


def _real_kind(a: Any) -> bool:
    return np.dtype(a.dtype).kind in "fiu"


class LossEngine:
    """The four loss entry points over the ops that ``ops_for(x, w, label)`` returns (once
    per call: CuPy binds them to the arrays' device)."""

    def __init__(self, ops_for: Callable[[Any, Any, Any], LossOps]) -> None:
        self.ops_for = ops_for

    # ------------------------------------------------------------ checks

    def _check(
        self, ops: LossOps, x: Any, w: Any, label: Any, opts: LossOptions, class_start: object = 0,
        num_classes: object = None,
    ) -> tuple[Any, Any, Problem, ChunkPlan, int, int]:  # fmt: skip
        if not isinstance(opts, LossOptions):
            raise TypeError(f"opts must be a lsoftmax_core.LossOptions, got {type(opts).__name__}")
        x, w = ops.arrays(x, w)
        p = check_arrays(x, w, label, opts.margin, opts.beta, dtypes=ops.dtypes)
        sub = opts.subcenters
        if p.c % sub:
            raise ValueError(
                f"subcenters={sub} must divide w's rows: w.shape={tuple(w.shape)} (C·subcenters rows, class j's "
                "centres rows j·subcenters ... j·subcenters + subcenters - 1)"
            )
        start, total = check_shard(class_start, num_classes, p.c // sub)
        plan = plan_chunks(
            p.n, p.c, p.dtype.itemsize, chunk_size=opts.chunk_size, chunking=opts.chunking,
            memory_budget=opts.memory_budget,
        )  # fmt: skip
        if sub > 1 and plan.mode == "classes":  # a class's centres in one chunk
            plan = ChunkPlan("classes", max(sub, plan.size - plan.size % sub))
        return x, w, p, plan, start, total

    @staticmethod
    def _check_grad_loss(ops: LossOps, grad_loss: Any, p: Problem, reduction: str) -> None:
        """A real scalar, or a real array of the loss's shape (NaN/inf allowed: the caller's)."""
        shape = (p.n,) if reduction == "none" else ()
        if isinstance(grad_loss, (np.ndarray, np.generic, ops.xp.ndarray)):
            if not _real_kind(grad_loss):
                raise TypeError(f"grad_loss must be real (an integer or floating dtype), got dtype {grad_loss.dtype}")
        elif isinstance(grad_loss, (bool, np.bool_)) or not isinstance(grad_loss, numbers.Real):
            raise TypeError(
                f"grad_loss must be a real scalar or array of the loss's shape {shape}, got "
                f"{type(grad_loss).__module__}.{type(grad_loss).__qualname__}"
            )
        if tuple(np.shape(grad_loss)) != shape:
            raise ValueError(
                f"grad_loss must have the loss's shape {shape} (reduction={reduction!r}), "
                f"got {tuple(np.shape(grad_loss))}"
            )

    @staticmethod
    def _check_lse_form(ops: LossOps, lse: Any, n: int) -> None:
        if not isinstance(lse, ops.xp.ndarray):
            raise TypeError(
                f"lse must be a {ops.xp.__name__}.ndarray like x (cross_entropy(..., return_lse=True)), got "
                f"{type(lse).__module__}.{type(lse).__qualname__}"
            )
        if np.dtype(lse.dtype).kind != "f":
            raise TypeError(f"lse must have a real floating dtype, got lse.dtype={lse.dtype}")
        if tuple(lse.shape) != (n,):
            raise ValueError(f"lse must have shape (N,) = ({n},), got {tuple(lse.shape)}")

    @staticmethod
    def _bind(
        ops: LossOps, x: Any, w: Any, label: Any, p: Problem, opts: LossOptions, start: int, total: int, op: int
    ) -> tuple[Any, Any, Any, Any]:  # fmt: skip
        """``ops.bind`` for the call, and for a kind that normalises its :class:`_Family`; and
        the x and w the chunks' GEMMs take: for such a kind x' and w (columns then scaled by
        1/|w_j|) or w^."""
        if p.family is None:
            return ops.bind(x, w, label, p, opts.ignore_index, start, total, op), None, x, w
        kind, sub = p.family, opts.subcenters
        xn = _family.features(x, kind)
        scale, norms = _family.column_scale(xn, w)
        wn = w if scale is not None else _family.unit_weight(w, ops.xp)[0]
        # bind sees classes (labels, shard), not w's rows
        k = ops.bind(xn, wn, label, replace(p, c=p.c // sub), opts.ignore_index, start, total, op)
        rows = ops.xp.flatnonzero(k.owned)
        lab, subidx = k.lab[rows], None
        if sub > 1:  # the target class's centre: the largest cosine (the lowest on a tie)
            lab, centre = _family.nearest_centre(x[rows], w, lab, sub)
            subidx = ops.xp.zeros(p.n, dtype=lab.dtype)
            subidx[rows] = centre
        t = _family.target_rows(x[rows], w.take(lab, axis=0), kind, p.beta)
        target = ops.xp.zeros(p.n)
        target[rows] = _family.target_logits(t, kind)
        ops.set_family(k, target, scale, sub, subidx)
        # Not the statistics' unit rows (2·N·D float64) through the passes: the gradient
        # computes them again, after the chunk's buffer is gone.
        return k, _Family(kind, x, w, rows, lab, p.beta, scale is not None, norms), xn, wn

    # ------------------------------------------------------------ weights and reduction

    @staticmethod
    def _weights(ops: LossOps, c: _Call, grad_loss: Any) -> Any:
        """d(reduced loss)/d(loss_i) times the upstream gradient; exactly 0 on ignored rows,
        whatever their upstream gradient (inf or NaN there take no part, as in torch)."""
        xp = ops.xp
        g = xp.asarray(grad_loss, dtype=np.float64)
        if c.opts.reduction == "mean":  # an all-ignored batch: every weight is 0 anyway
            g = g / xp.maximum(c.k.n_valid, 1)
        return xp.ascontiguousarray(xp.where(c.k.valid, g, 0.0))

    @staticmethod
    def _reduce(ops: LossOps, c: _Call, per_row: Any) -> Any:
        xp = ops.xp
        per_row = xp.where(c.k.valid, per_row, 0.0)
        if c.opts.reduction == "none":
            return ops.to_dtype(per_row, c.p.dtype)
        total = xp.sum(per_row)
        if c.opts.reduction == "mean":  # an all-ignored batch has loss 0, not 0/0
            total = total / xp.maximum(c.k.n_valid, 1)
        return ops.to_dtype(xp.asarray(total, dtype=np.float64), c.p.dtype)

    # ------------------------------------------------------------ passes

    @staticmethod
    def _buffer(ops: LossOps, c: _Call, rows: int, cols: int) -> Any:
        """One flat buffer for every chunk of the call; (rows, cols) views are C-contiguous."""
        return ops.xp.empty(rows * cols, dtype=c.p.dtype)

    def _rows(self, ops: LossOps, c: _Call, grads: tuple[Any, Any] | None = None) -> None:
        """Row chunks: each row's target logit and log-sum-exp (unless a given lse replaces
        them), and with ``grads`` (grad_x, grad_w) the gradients written into them."""
        p, x, w, k, size = c.p, c.x, c.w, c.k, c.plan.size
        grad = grads is not None
        grad_x: Any = None
        grad_w: Any = None
        if grads is not None:
            grad_x, grad_w = grads
        flat = self._buffer(ops, c, min(p.n, size), p.c)
        starts = list(range(0, p.n, size))
        block = max(1, ops.class_block(p)) if grad else p.c
        z = flat[: min(p.n, size) * p.c].reshape(-1, p.c)
        ops.gemm(x[0 : z.shape[0]], w.T, z)
        for i, r0 in enumerate(starts):
            rows = slice(r0, min(p.n, r0 + size))
            z = flat[: (rows.stop - r0) * p.c].reshape(-1, p.c)
            ops.rows_chunk(k, z, r0, grad=grad)
            nxt = slice(starts[i + 1], min(p.n, starts[i + 1] + size)) if i + 1 < len(starts) else None
            zn = None if nxt is None else flat[: (nxt.stop - nxt.start) * p.c].reshape(-1, p.c)
            if not grad:
                if zn is not None:
                    ops.gemm(x[nxt], w.T, zn)
                continue
            # G's class block [k0, k1) is consumed (grad_w, grad_x) before the next chunk's
            # logits overwrite it: w[k0:k1] and grad_w[k0:k1] are read once per chunk.
            for k0 in range(0, p.c, block):
                cls = slice(k0, min(p.c, k0 + block))
                g = z[:, cls]
                if r0 == 0:
                    ops.gemm(g.T, x[rows], grad_w[cls])
                else:
                    ops.gemm_add(k, g.T, x[rows], grad_w[cls])
                if k0 == 0:
                    ops.gemm(g, w[cls], grad_x[rows])
                else:
                    ops.gemm_add(k, g, w[cls], grad_x[rows])
                if zn is not None:
                    ops.gemm(x[nxt], w[cls].T, zn[:, cls])

    def _classes_lse(self, ops: LossOps, c: _Call) -> None:
        """Class chunks, first pass: each row's target logit and log-sum-exp (1 GEMM)."""
        p, x, w, size = c.p, c.x, c.w, c.plan.size
        flat = self._buffer(ops, c, p.n, min(p.c, size))
        for k0 in range(0, p.c, size):
            k1 = min(p.c, k0 + size)
            z = flat[: p.n * (k1 - k0)].reshape(p.n, k1 - k0)
            ops.gemm(x, w[k0:k1].T, z)
            ops.classes_lse(c.k, z, k0, first=k0 == 0)

    def _classes_grad(self, ops: LossOps, c: _Call, grad_x: Any, grad_w: Any) -> None:
        """Class chunks, gradient pass: recompute each chunk's logits (3 more GEMMs)."""
        p, x, w, k, size = c.p, c.x, c.w, c.k, c.plan.size
        flat = self._buffer(ops, c, p.n, min(p.c, size))
        for k0 in range(0, p.c, size):
            k1 = min(p.c, k0 + size)
            z = flat[: p.n * (k1 - k0)].reshape(p.n, k1 - k0)
            ops.gemm(x, w[k0:k1].T, z)
            ops.classes_grad(k, z, k0)
            if k0 == 0:
                ops.gemm(z, w[k0:k1], grad_x)
            else:
                ops.gemm_add(k, z, w[k0:k1], grad_x)
            ops.gemm(z.T, x, grad_w[k0:k1])

    def _lse_pass(self, ops: LossOps, c: _Call) -> None:
        if c.p.n == 0:
            return
        if c.plan.mode == "rows":
            self._rows(ops, c)
        else:
            self._classes_lse(ops, c)

    def _grad_pass(self, ops: LossOps, c: _Call, weights: Any, lse: Any) -> tuple[Any, Any]:
        """The gradients; ``lse`` None: the rows' own (rows: formed in the same pass;
        classes: a first pass)."""
        xp, p = ops.xp, c.p
        grad_x, grad_w = xp.empty((p.n, p.d), p.dtype), xp.empty((p.c, p.d), p.dtype)
        if c.plan.mode == "classes" and lse is None:
            self._classes_lse(ops, c)  # the rows' own lse, in k.lse
        ops.begin_grad(c.k, weights, lse, grad_x, grad_w)
        if c.plan.mode == "rows":
            self._rows(ops, c, (grad_x, grad_w))
        else:
            self._classes_grad(ops, c, grad_x, grad_w)
        ops.margin(c.k)
        f = c.fam
        if f is not None:
            _family.finish_grads(
                grad_x, grad_w, c.k.g[f.rows], f.x, f.w, f.lab, f.kind, f.beta, divided=f.scaled, rows=f.rows,
                norms=f.norms,
            )  # fmt: skip
        return grad_x, grad_w

    def _empty_grads(self, ops: LossOps, p: Problem) -> tuple[Any, Any]:
        return ops.xp.zeros((p.n, p.d), p.dtype), ops.xp.zeros((p.c, p.d), p.dtype)

    # ------------------------------------------------------------ the four entry points

    def cross_entropy(self, x: Any, w: Any, label: Any, opts: LossOptions, *, return_lse: bool = False) -> Any:
        ops = self.ops_for(x, w, label)
        x, w, p, plan, start, total = self._check(ops, x, w, label, opts)
        k, fam, xs, ws = self._bind(ops, x, w, label, p, opts, start, total, OP_FORWARD)
        c = _Call(p, opts, plan, xs, ws, k, False, fam)
        self._lse_pass(ops, c)
        out = self._reduce(ops, c, c.k.lse - c.k.tgt)
        lse = c.k.lse
        ops.done()
        return (out, lse) if return_lse else out

    def cross_entropy_backward(
        self, grad_loss: Any, x: Any, w: Any, label: Any, opts: LossOptions, *, lse: Any = None,
        class_start: object = 0, num_classes: object = None,
    ) -> tuple[Any, Any]:  # fmt: skip
        ops = self.ops_for(x, w, label)
        x, w, p, plan, start, total = self._check(ops, x, w, label, opts, class_start, num_classes)
        sharded = total != p.c // opts.subcenters
        self._check_grad_loss(ops, grad_loss, p, opts.reduction)
        if lse is None and sharded:
            raise ValueError("lse (the rows' log-sum-exp over all num_classes classes) is required for a class shard")
        if lse is not None:
            self._check_lse_form(ops, lse, p.n)
        k, fam, xs, ws = self._bind(ops, x, w, label, p, opts, start, total, OP_BACKWARD)
        c = _Call(p, opts, plan, xs, ws, k, sharded, fam)
        if p.n == 0:
            ops.done()
            return self._empty_grads(ops, p)
        given = None
        if lse is not None:
            xp = ops.xp
            given = xp.ascontiguousarray(xp.asarray(lse, dtype=np.float64))
            ops.check_lse(k, given)
            # Ignored rows take no part: +inf makes their softmax exactly 0 whatever lse holds there.
            given = xp.where(k.valid, given, np.inf)
        out = self._grad_pass(ops, c, self._weights(ops, c, grad_loss), given)
        ops.done()
        return out

    def cross_entropy_with_grad(self, x: Any, w: Any, label: Any, opts: LossOptions) -> tuple[Any, Any, Any]:
        if isinstance(opts, LossOptions) and opts.reduction == "none":
            raise ValueError("reduction='none' has a per-row upstream gradient: use cross_entropy_backward")
        ops = self.ops_for(x, w, label)
        x, w, p, plan, start, total = self._check(ops, x, w, label, opts)
        k, fam, xs, ws = self._bind(ops, x, w, label, p, opts, start, total, OP_BACKWARD)
        c = _Call(p, opts, plan, xs, ws, k, False, fam)
        if p.n == 0:
            out = (self._reduce(ops, c, ops.xp.zeros(0)), *self._empty_grads(ops, p))
        else:
            grad_x, grad_w = self._grad_pass(ops, c, self._weights(ops, c, 1.0), None)
            out = (self._reduce(ops, c, c.k.lse - c.k.tgt), grad_x, grad_w)
        ops.done()
        return out

    def cross_entropy_shard_stats(
        self, x: Any, w: Any, label: Any, opts: LossOptions, *, class_start: object, num_classes: object
    ) -> tuple[Any, Any]:
        """(lse over the shard's classes, target logit where the shard holds it else 0)."""
        ops = self.ops_for(x, w, label)
        x, w, p, plan, start, total = self._check(ops, x, w, label, opts, class_start, num_classes)
        k, fam, xs, ws = self._bind(ops, x, w, label, p, opts, start, total, OP_FORWARD)
        self._lse_pass(ops, _Call(p, opts, plan, xs, ws, k, total != p.c // opts.subcenters, fam))
        ops.done()
        return k.lse, k.tgt
