"""The fused cross-entropy's NumPy ops: what :class:`._loss_engine.LossEngine` needs on the
CPU beyond its control flow (:func:`engine` is the NumPy backend's loss).

The target logits come from the same per-sample statistics as ``forward`` (once per call,
O(N·D)); a chunk's logits are one GEMM with the target entries overwritten, so a chunk
holds exactly the logits ``forward`` would.  The log-sum-exp subtracts the row maximum
(exact in the input dtype) and sums the exponentials in float64; class chunks combine their
partial sums online.  A chunk's max, exponentials, sums and scaling run a few rows at a
time, while those rows are in the core's cache.  The margin's own gradient terms are added
once at the end from the collected target entries of G (``_numpy_backend.add_margin_terms``).

The GEMMs that accumulate (grad_w over row chunks, grad_x over class chunks and blocks) call the BLAS
NumPy links with beta = 1 (C += A·B in the GEMM's own kernel: no temporary, one pass over
C) where its CBLAS symbols are found (:mod:`._cblas`); elsewhere, or with
``LSOFTMAX_CE_BLAS=0``, a temporary of ``_ACC_BYTES`` per block is added instead, and a row
chunk's gradient GEMMs take all classes at once (the order of operations, and so the bits,
of the plain NumPy code).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import numpy.typing as npt

from . import _cblas, _family
from ._loss_engine import LossEngine
from ._numpy_backend import DTYPES, add_margin_terms, stats, target_logits
from .checks import Problem, check_label_values, check_lse_values

__all__ = ["ENGINE", "NumpyLossOps", "engine"]

F64 = npt.NDArray[np.float64]

#: The accumulating GEMMs without BLAS: a block of output rows of about this many bytes
#: (a core's L2 cache) at a time, so the running sum is read and written once per block.
_ACC_BYTES = 1 << 20
#: A chunk's max/exp/sum/scale passes run on this many bytes of rows at a time (a
#: core's L2 cache holds them between passes).
_SOFTMAX_BYTES = 1 << 18
#: A row chunk's gradient GEMMs and the next chunk's logits take w and grad_w in blocks of
#: about this many bytes (L2-L3 sized), each read from memory once per chunk.
_CLASS_BLOCK_BYTES = 1 << 21


def _by_rows(n: int, width: int, fn: Callable[[int, int], None]) -> None:
    """``fn(i0, i1)`` over row blocks of [0, n) of about _SOFTMAX_BYTES (``width`` bytes a
    row), so that a block's passes (max, exp, sum, scale) find it in the core's cache.
    Row-wise work only: the results do not depend on the blocks."""
    step = max(1, _SOFTMAX_BYTES // max(1, width))
    for i0 in range(0, n, step):
        fn(i0, min(n, i0 + step))


class _State:
    """One call's labels, targets and running results (the engine's ``k``)."""

    __slots__ = ("colscale", "g", "given", "grad_w", "grad_x", "lab", "lse", "m", "n_valid", "owned", "p", "se",
                 "st", "sub", "subidx", "target", "tgt", "tol", "valid", "w", "weights", "x")  # fmt: skip

    def __init__(self, p: Problem, x: Any, w: Any, valid: Any, owned: Any, lab: Any, st: Any) -> None:
        self.p, self.x, self.w, self.valid, self.owned, self.lab, self.st = p, x, w, valid, owned, lab, st
        self.n_valid = int(np.count_nonzero(valid))
        # margin > 1: forward's target logits (float64); the statistics stay for the margin
        # terms, without w[label] (N·D, gathered again by margin()).
        self.target = None if st is None else target_logits(st, p)
        self.st = None if st is None else st._replace(wy=None)
        self.tgt, self.lse = np.zeros(p.n), np.zeros(p.n)
        self.m: Any = None  # class chunks: the rows' running max and sum of exponentials
        self.se: Any = None
        self.weights: Any = None  # from begin_grad on
        self.given: Any = None
        self.grad_x: Any = None
        self.grad_w: Any = None
        self.tol: Any = None  # with a given lse: how far a row's logit may exceed it (rounding)
        self.g = np.zeros(p.n)
        self.colscale: Any = None  # a kind that normalises w: 1/|w_j| per class (set_family)
        self.sub = 1  # sub-centres per class, and each row's target centre (set_family)
        self.subidx: Any = None


def _exp_shifted(z: Any, want_sum: bool = True) -> tuple[F64, Any]:
    """z -> exp(z - rowmax) in place; returns (rowmax, sum of exponentials), float64."""
    m = z.max(axis=1)
    z -= m[:, None]  # exact: m is one of the row's values
    np.exp(z, out=z)
    return m.astype(np.float64), z.sum(axis=1, dtype=np.float64) if want_sum else None


class NumpyLossOps:
    """The NumPy backend's :class:`._loss_engine.LossOps` (stateless: one serves every call)."""

    xp = np
    dtypes = DTYPES

    @staticmethod
    def arrays(x: Any, w: Any) -> tuple[Any, Any]:
        # np.matrix (and other subclasses) as plain ndarray views, as forward's GEMM reads them.
        return np.asarray(x), np.asarray(w)

    @staticmethod
    def bind(x: Any, w: Any, label: Any, p: Problem, ignore: int, start: int, total: int, op: int) -> _State:
        check_label_values(label, total, ignore)
        valid = label != ignore
        owned = valid if p.c == total else valid & (label >= start) & (label < start + p.c)
        # intp before the shift: a narrow label dtype cannot hold class_start (uint8 - 300)
        lab = np.where(owned, label.astype(np.intp, copy=False) - start, 0)
        st = stats(x, w, lab, p) if p.margin > 1 and p.n else None
        return _State(p, x, w, valid, owned, lab, st)

    @staticmethod
    def set_family(k: _State, target: F64, colscale: Any, sub: int = 1, subidx: Any = None) -> None:
        """A kind that normalises: its target logits (float64, (N,)), and 1/|w_j| (w's dtype)
        to scale each chunk's columns by (logits x'·w_j/|w_j|; then G's columns, so that the
        GEMMs with w give G·w^ and Gᵀ·x'/|w_j|), or None where w is already w^; ``sub``
        centres per class and each row's target centre ``subidx`` (intp, (N,))."""
        k.target, k.colscale, k.sub, k.subidx = target, colscale, sub, subidx

    @staticmethod
    def check_lse(k: _State, lse: F64) -> None:
        """A given lse must be finite on the rows that are not ignored; the chunks then check
        it against each row's largest logit (:meth:`_check_max`)."""
        check_lse_values(lse, k.valid)
        # How far two computations of one logit may differ: |x_i|·|w_j|·D·eps twice (the
        # GEMMs' rounding, whatever their blocking), plus lse's own rounding.
        p, eps = k.p, float(np.finfo(k.p.dtype).eps)
        with np.errstate(over="ignore"):  # an overflowing norm makes the bound inf: no check
            # Squared norms in the input dtype: no float64 copy of w (C·D) for a bound.
            a = np.sqrt(np.einsum("ij,ij->i", k.x, k.x).astype(np.float64))
            b = float(np.sqrt(np.max(np.einsum("ij,ij->i", k.w, k.w), initial=0.0)))
            if k.colscale is not None:
                b = 1.0  # the logits are x'·w^_j
            k.tol = 2.0 * (p.d + 2) * eps * a * b + 4 * np.finfo(np.float64).eps * (1.0 + np.abs(lse))

    @staticmethod
    def _check_max(k: _State, m: F64, rows: slice) -> None:
        """lse_i >= every logit of row i, up to rounding: else it is not this call's."""
        bad = m > k.given[rows] + k.tol[rows]
        if bad.any():
            i = int(np.argmax(bad))
            r = rows.start + i
            raise ValueError(
                f"lse[{r}]={float(k.given[r])!r} is below that row's logit {float(m[i])!r}: lse must be the "
                "log-sum-exp of these x, w and label (cross_entropy(..., return_lse=True) with the same options)"
            )

    @staticmethod
    def gemm(a: Any, b: Any, out: Any) -> None:
        np.matmul(a, b, out=out)

    @staticmethod
    def gemm_add(k: _State, a: Any, b: Any, out: Any) -> None:
        """out += a @ b: the BLAS's own accumulation, else a blocked temporary."""
        if _cblas.gemm_add(a, b, out):
            return
        # NumPy's GEMM cannot accumulate into its output, and a whole temporary of out's
        # size would cost a second gradient's memory and stream it through memory twice.
        step = max(1, _ACC_BYTES // max(1, out.shape[1] * out.itemsize))
        tmp = np.empty((min(step, out.shape[0]), out.shape[1]), out.dtype)
        for i0 in range(0, out.shape[0], step):
            i1 = min(out.shape[0], i0 + step)
            out[i0:i1] += np.matmul(a[i0:i1], b, out=tmp[: i1 - i0])

    @staticmethod
    def class_block(p: Problem) -> int:
        if not _cblas.available(p.dtype):
            return p.c  # one block: the plain GEMMs, in the order (and bits) of the NumPy code
        return max(1, _CLASS_BLOCK_BYTES // (p.d * p.dtype.itemsize))

    @staticmethod
    def begin_grad(k: _State, weights: F64, lse: F64 | None, grad_x: Any, grad_w: Any) -> None:
        k.weights, k.given, k.grad_x, k.grad_w = weights, lse, grad_x, grad_w

    @staticmethod
    def _targets(k: _State, z: Any, rows: slice, k0: int) -> tuple[npt.NDArray[np.intp], Any]:
        """Write forward's target logits into the chunk (rows, classes k0..); returns where the
        chunk's rows find their target: (row indices in the chunk, column indices)."""
        lab = k.lab[rows]
        hit = np.flatnonzero(k.owned[rows] & (lab >= k0) & (lab < k0 + z.shape[1]))
        cols = lab[hit] - k0
        if k.target is not None:
            z[hit, cols] = k.target[rows][hit]
        return hit, cols

    def rows_chunk(self, k: _State, z: Any, r0: int, *, grad: bool) -> None:
        """Rows [r0, r0 + R) with all classes: target logit and lse (unless given), and with
        ``grad`` z becomes G = weight·softmax - weight at the target."""
        if k.sub == 1:  # column scaling (if any) inside the row blocks, while they are in cache
            self._rows_chunk(k, z, r0, grad=grad, cs=k.colscale)
            return
        zr, idx = _family.chunk_logits(k, z, r0, 0)
        self._rows_chunk(k, zr, r0, grad=grad)
        if grad:
            _family.chunk_grads(k, z, zr, idx, 0)

    def _rows_chunk(self, k: _State, z: Any, r0: int, *, grad: bool, cs: Any = None) -> None:
        """``cs``: 1/|w_j| to scale the columns by, block by block (before the targets are
        written; and G again after its targets' weights are subtracted)."""
        rows = slice(r0, r0 + z.shape[0])
        if cs is None:
            hit, cols = self._targets(k, z, rows, 0)
            k.tgt[r0 + hit] = z[hit, cols]
        else:
            lab = k.lab[rows]
            hit = np.flatnonzero(k.owned[rows])
            cols = lab[hit]
        given = k.given if grad else None
        target: Any = k.target  # set with cs (a kind that normalises: set_family)

        def part(i0: int, i1: int) -> None:
            if cs is not None:
                z[i0:i1] *= cs
                j0, j1 = np.searchsorted(hit, (i0, i1))
                h, c = hit[j0:j1], cols[j0:j1]
                z[h, c] = target[r0 + h]
                k.tgt[r0 + h] = z[h, c]
            m, se = _exp_shifted(z[i0:i1])
            span = slice(r0 + i0, r0 + i1)
            k.lse[span] = m + np.log(se)
            if not grad:
                return
            wr = k.weights[span]
            if given is None:
                scale = wr / se  # softmax times the row's weight: exp(z - m) / se
            else:
                self._check_max(k, m, span)
                scale = wr * np.exp(m - given[span])
            z[i0:i1] *= scale.astype(z.dtype)[:, None]
            if cs is not None:
                z[h, c] -= k.weights[r0 + h].astype(z.dtype)
                k.g[r0 + h] = z[h, c]
                z[i0:i1] *= cs

        _by_rows(z.shape[0], z.shape[1] * z.itemsize, part)
        if grad and cs is None:
            wr = k.weights[rows]
            z[hit, cols] -= wr[hit].astype(z.dtype)
            k.g[r0 + hit] = z[hit, cols]

    def classes_lse(self, k: _State, z: Any, k0: int, *, first: bool) -> None:
        """Classes from w's row k0 on, for all rows: their (max, sum of exponentials)
        combined online."""
        n = k.p.n
        z, _ = _family.chunk_logits(k, z, 0, k0)
        k0 //= k.sub
        hit, cols = self._targets(k, z, slice(0, n), k0)
        k.tgt[hit] = z[hit, cols]
        mk, sk = np.empty(n), np.empty(n)

        def part(i0: int, i1: int) -> None:
            mk[i0:i1], sk[i0:i1] = _exp_shifted(z[i0:i1])

        _by_rows(n, z.shape[1] * z.itemsize, part)
        if first:
            k.m, k.se = np.full(n, -np.inf), np.zeros(n)
        m_new = np.maximum(k.m, mk)
        k.se = k.se * np.exp(k.m - m_new) + sk * np.exp(mk - m_new)
        k.m = m_new
        k.lse = k.m + np.log(k.se)

    def classes_grad(self, k: _State, z: Any, k0: int) -> None:
        """Classes from w's row k0 on, for all rows: z becomes G from the rows' lse."""
        n = k.p.n
        zr, idx = _family.chunk_logits(k, z, 0, k0)
        hit, cols = self._targets(k, zr, slice(0, n), k0 // k.sub)
        lse = k.lse if k.given is None else k.given

        def part(i0: int, i1: int) -> None:
            m, _ = _exp_shifted(zr[i0:i1], want_sum=False)
            if k.given is not None:
                self._check_max(k, m, slice(i0, i1))
            zr[i0:i1] *= (k.weights[i0:i1] * np.exp(m - lse[i0:i1])).astype(zr.dtype)[:, None]  # softmax times the weight

        _by_rows(n, zr.shape[1] * zr.itemsize, part)
        zr[hit, cols] -= k.weights[hit].astype(zr.dtype)
        k.g[hit] = zr[hit, cols]
        _family.chunk_grads(k, z, zr, idx, k0)

    @staticmethod
    def margin(k: _State) -> None:
        """The margin's own gradient terms from the target entries g of G."""
        if k.st is not None:
            st = k.st._replace(wy=k.w.take(k.lab, axis=0))  # add_margin_terms overwrites it
            add_margin_terms(k.grad_x, k.grad_w, k.g, st, k.x, k.lab, k.p)

    @staticmethod
    def to_dtype(a: Any, dtype: Any) -> Any:
        return np.asarray(a, dtype=dtype)

    @staticmethod
    def done() -> None:
        pass


_OPS = NumpyLossOps()

#: The NumPy backend's fused cross-entropy.
ENGINE = LossEngine(lambda x, w, label: _OPS)


def engine() -> LossEngine:
    """The NumPy backend's fused cross-entropy (:class:`._loss_engine.LossEngine`)."""
    return ENGINE
