"""The fused L-Softmax cross-entropy on the CuPy backend: the NumPy loss's chunking
(:mod:`._loss_plan`) with cuBLAS GEMMs per chunk and this project's kernels for the chunk's
softmax, targets and gradient (kernels/lsoftmax.cu, "fused cross-entropy").

``LossDriver`` is the whole algorithm, written against an array library ``xp``, a GEMM and
a kernel runner, so the CPU tests run it unchanged with NumPy and the host emulator
(tests/support/kernel_host.py); this module imports CuPy only in the public functions.

Per call: ``lsm_loss_targets`` writes the N float64 target logits once (forward's values;
margin 1: only the label check).  Row chunks: z = x[rows] @ w.T, ``lsm_loss_chunk_lse``
writes the targets into z and forms each row's log-sum-exp, ``lsm_loss_chunk_grad`` turns
z into G (weight_i * softmax - weight_i at the target), then grad_x[rows] = G @ w and
grad_w += G.T @ x[rows]: three GEMMs.  Class chunks: a first pass combines the chunks'
(max, sum of exponentials) online; the gradient pass recomputes each chunk's z, forms G
from the lse and adds G @ w[classes] to grad_x and writes grad_w[classes] = G.T @ x.  The
margin's own terms are added once at the end from the collected target entries g_i of G
(``lsm_loss_margin_rows`` + ``lsm_backward_classes``, as in ``backward``).

On a class shard (``class_start``, ``num_classes``; docs/derivatives.md, "Class shards") the
labels are checked against num_classes, the chunk kernels read shard-local labels in which a
row whose class lives elsewhere has no target column, and the backward's gradient kernel
reads the given log-sum-exp over all classes instead of the chunks' own.

Deterministic (no float atomics; fixed reduction orders), and no host synchronisation:
the number of non-ignored rows, the mean's scale and the reduced loss stay on the device.
Labels are checked on the device like ``forward``'s: a label outside [0, C) that is not
``ignore_index`` is never used as an index, its row gets no target (its loss is the
log-sum-exp), and it is reported by the next call or ``lsoftmax_core.check_labels()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from . import _cupy_plan as plan
from ._cublas import matmul
from ._loss_plan import ChunkPlan, plan_chunks
from .checks import Problem, check_arrays, check_integer, check_reduction, check_shard

__all__ = [
    "LossDriver",
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_shard_stats",
    "cross_entropy_with_grad",
]

Gemm = Callable[[Any, Any, Any], Any]  # gemm(a, b, out): out = a @ b, returns out


class _Loss(NamedTuple):
    p: Problem
    reduction: str
    valid: Any  # bool (N,) of xp
    n_valid: Any  # device scalar (never read on the host)
    call: plan.LossCall
    plan: ChunkPlan
    # The labels the margin kernels read: ``call.values["label"]`` itself, or on a class
    # shard a copy whose rows without a target here point at class 0 (their g_i is 0).
    safe_label: Any
    sharded: bool


class LossDriver:
    """The fused cross-entropy over an array library ``xp`` (numpy or cupy), ``gemm`` (the
    chunk GEMMs), ``run(call)`` (executes a ``_cupy_plan.Call``), the device buffers, a
    serial-number source and ``workspace(ncoef, nclasses)`` as for ``bind_backward``."""

    def __init__(
        self, xp: Any, gemm: Gemm, run: Callable[[plan.Call], object], bufs: plan.DeviceBuffers,
        serial: Callable[[], int], workspace: Callable[[int, int], tuple[Any, Any]], dtypes: Any,
    ) -> None:  # fmt: skip
        self.xp, self.gemm, self.run, self.bufs = xp, gemm, run, bufs
        self.serial, self.workspace, self.dtypes = serial, workspace, dtypes

    # ------------------------------------------------------------ setup

    def prepare(
        self, x: Any, w: Any, label: Any, margin: object, beta: object, reduction: object, ignore_index: object,
        chunk_size: object, chunking: object, memory_budget: object, op: int, class_start: object = 0,
        num_classes: object = None,
    ) -> _Loss:  # fmt: skip
        xp = self.xp
        reduction = check_reduction(reduction)
        ignore = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
        p = check_arrays(x, w, label, margin, beta, dtypes=self.dtypes)
        start, total = check_shard(class_start, num_classes, p.c)
        cp = plan_chunks(
            p.n, p.c, p.dtype.itemsize, chunk_size=chunk_size, chunking=chunking, memory_budget=memory_budget
        )
        info = np.iinfo(label.dtype)
        if info.min <= ignore <= info.max:
            valid = label != ignore
            lab = xp.where(valid, label, 0).astype(label.dtype, copy=False)
        else:  # no label can equal it
            valid = xp.ones(label.shape, dtype=bool)
            lab = label
        sharded = total != p.c
        if sharded:
            # Labels are indices into all num_classes classes.  They are checked against
            # num_classes on the device (bad ones recorded as usual); then the chunk kernels
            # read shard-local labels in which a row whose class is elsewhere (or ignored)
            # points one past the shard: chunk_target gives it no target column, so its
            # target logit is never read.  The target and margin kernels read a copy pointing
            # such rows at class 0 (a valid index); their g_i is 0, so they add nothing.
            glab = xp.ascontiguousarray(lab, dtype=np.int64)
            owned = valid & (glab >= start) & (glab < start + p.c)
            local = xp.where(owned, glab - start, p.c)
            safe = xp.where(owned, local, 0)
            call = plan.bind_loss(p, xp, self.bufs, x=x, w=w, label=glab, serial=self.serial(), op=op)
        else:
            call = plan.bind_loss(p, xp, self.bufs, x=x, w=w, label=lab, serial=self.serial(), op=op)
        n = p.n
        v = call.values
        v["tgt"] = xp.zeros(n, dtype=np.float64)
        v["target"] = xp.empty(n, dtype=np.float64) if p.margin > 1 else v["tgt"]
        for name in ("run_m", "run_s", "lse"):
            v[name] = xp.empty(n, dtype=np.float64)
        if not sharded:
            if n:
                self.run(call.targets())
            safe = v["label"]
            if lab is not label:
                # Ignored rows have no target (their lse is the plain one, as NumPy's): the
                # chunk kernels read them as label -1, i.e. no target column (kernel labels
                # are int32/int64); the target and margin kernels keep class 0 (a valid
                # index; g_i = 0 there).
                v["label"] = xp.where(valid, safe, -1).astype(safe.dtype, copy=False)
            return _Loss(p, reduction, valid, xp.count_nonzero(valid), call, cp, safe, False)
        if n:
            self.run(call.check_labels(total))  # v["label"] holds the global labels here
            v["label"] = safe
            if p.margin > 1:
                self.run(call.targets())
        v["label"] = local
        return _Loss(p, reduction, valid, xp.count_nonzero(valid), call, cp, safe, True)

    def weights(self, s: _Loss, grad_loss: Any) -> Any:
        """d(reduced loss)/d(loss_i) times the upstream gradient: 0 on ignored rows."""
        xp = self.xp
        v = s.valid.astype(np.float64)
        g = xp.asarray(grad_loss, dtype=np.float64)
        if s.reduction == "mean":  # all ignored: v is 0, whatever the scale
            g = g / xp.maximum(s.n_valid, 1)
        return xp.ascontiguousarray(v * g)

    def reduce(self, s: _Loss, per_row: Any) -> Any:
        xp = self.xp
        per_row = xp.where(s.valid, per_row, 0.0)
        if s.reduction == "none":
            return self._to_dtype(per_row, s.p.dtype)
        total = xp.sum(per_row)
        if s.reduction == "mean":
            total = total / xp.maximum(s.n_valid, 1)
        return self._to_dtype(xp.asarray(total, dtype=np.float64), s.p.dtype)

    def _to_dtype(self, a: Any, dtype: Any) -> Any:
        # A kernel rather than astype: CuPy's own float16/bfloat16 casts need CUDA's headers.
        out = self.xp.empty(a.shape, dtype=dtype)
        self.run(plan.bind_from_f64(self.xp.ascontiguousarray(a), out))  # (ascontiguousarray: ndim >= 1)
        return out

    def _add(self, dst: Any, src: Any) -> None:
        self.run(plan.bind_accumulate(dst, src))

    # ------------------------------------------------------------ passes

    def _buffer(self, shape: tuple[int, int], dtype: Any, held: list[Any]) -> Any:
        size = shape[0] * shape[1]
        if not held or held[0].size < size:
            held[:] = [self.xp.empty(size, dtype=dtype)]
        return held[0][:size].reshape(shape)

    def rows(self, s: _Loss, x: Any, w: Any, weights: Any, lse_all: Any = None) -> tuple[Any, Any, Any]:
        """Row chunks: per-row loss and lse, and with ``weights`` the gradients.  ``lse_all``:
        the rows' log-sum-exp over all classes on a class shard (the chunks' own lse is then
        not needed: the gradient kernel reads the given one)."""
        xp, p, n, call = self.xp, s.p, s.p.n, s.call
        grad_x: Any = None
        grad_w: Any = None
        tmp: Any = None
        if weights is not None:
            grad_x, grad_w = xp.empty((n, p.d), p.dtype), xp.zeros((p.c, p.d), p.dtype)
            call.values.update(weight=weights, gvec=xp.zeros(n, np.float64), grad_x=grad_x, grad_w=grad_w)
            if lse_all is not None:
                call.values["lse"] = lse_all
        zbuf: list[Any] = []
        for r0 in range(0, n, s.plan.size):
            rows = slice(r0, min(n, r0 + s.plan.size))
            z = self.gemm(x[rows], w.T, self._buffer((rows.stop - r0, p.c), p.dtype, zbuf))
            if lse_all is None:
                self.run(call.chunk_lse(z, r0, 0, first=True))
            if weights is None:
                continue
            self.run(call.chunk_grad(z, r0, 0))
            self.gemm(z, w, grad_x[rows])
            if r0 == 0:
                self.gemm(z.T, x[rows], grad_w)
            else:
                tmp = xp.empty_like(grad_w) if tmp is None else tmp
                self._add(grad_w, self.gemm(z.T, x[rows], tmp))
        v = call.values
        if weights is not None:
            self._margin(s)
        return v["lse"] - v["tgt"], grad_x, grad_w

    def classes_lse(self, s: _Loss, x: Any, w: Any) -> Any:
        """Class chunks, first pass: per-row loss (the lse is in call.values['lse'])."""
        p, n, call = s.p, s.p.n, s.call
        zbuf: list[Any] = []
        for k0 in range(0, p.c, s.plan.size):
            k1 = min(p.c, k0 + s.plan.size)
            z = self.gemm(x, w[k0:k1].T, self._buffer((n, k1 - k0), p.dtype, zbuf))
            self.run(call.chunk_lse(z, 0, k0, first=k0 == 0))
        return call.values["lse"] - call.values["tgt"]

    def classes_grad(self, s: _Loss, x: Any, w: Any, weights: Any, lse: Any) -> tuple[Any, Any]:
        """Class chunks, gradient pass: recompute each chunk's logits (3 more GEMMs)."""
        xp, p, n, call = self.xp, s.p, s.p.n, s.call
        grad_x, grad_w = xp.empty((n, p.d), p.dtype), xp.empty((p.c, p.d), p.dtype)
        call.values.update(weight=weights, gvec=xp.zeros(n, np.float64), grad_x=grad_x, grad_w=grad_w, lse=lse)
        zbuf: list[Any] = []
        tmp: Any = None
        for k0 in range(0, p.c, s.plan.size):
            k1 = min(p.c, k0 + s.plan.size)
            z = self.gemm(x, w[k0:k1].T, self._buffer((n, k1 - k0), p.dtype, zbuf))
            self.run(call.chunk_grad(z, 0, k0))
            if k0 == 0:
                self.gemm(z, w[k0:k1], grad_x)
            else:
                tmp = xp.empty_like(grad_x) if tmp is None else tmp
                self._add(grad_x, self.gemm(z, w[k0:k1], tmp))
            self.gemm(z.T, x, grad_w[k0:k1])
        self._margin(s)
        return grad_x, grad_w

    def _margin(self, s: _Loss) -> None:
        """The margin's own gradient terms, after the chunks (which read the shard-local labels)."""
        s.call.values["label"] = s.safe_label
        self.run(s.call.margin(self.workspace))

    def empty_grads(self, p: Problem) -> tuple[Any, Any]:
        return self.xp.zeros((p.n, p.d), p.dtype), self.xp.zeros((p.c, p.d), p.dtype)

    # ------------------------------------------------------------ the three entry points

    def cross_entropy(
        self, x: Any, w: Any, label: Any, *, margin: object = 2, beta: object = 0.0, reduction: object = "mean",
        ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
        memory_budget: object = None, return_lse: bool = False,
    ) -> Any:  # fmt: skip
        s = self.prepare(
            x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget, plan.OP_FORWARD
        )
        if s.p.n == 0:
            loss = self.xp.zeros(0)
        elif s.plan.mode == "rows":
            loss = self.rows(s, x, w, None)[0]
        else:
            loss = self.classes_lse(s, x, w)
        out = self.reduce(s, loss)
        return (out, s.call.values["lse"]) if return_lse else out

    def cross_entropy_backward(
        self, grad_loss: Any, x: Any, w: Any, label: Any, *, margin: object = 2, beta: object = 0.0,
        reduction: object = "mean", ignore_index: object = -100, chunk_size: object = None,
        chunking: object = None, memory_budget: object = None, lse: Any = None, class_start: object = 0,
        num_classes: object = None,
    ) -> tuple[Any, Any]:  # fmt: skip
        s = self.prepare(
            x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget, plan.OP_BACKWARD,
            class_start, num_classes,
        )  # fmt: skip
        if s.sharded and lse is None:
            raise ValueError(
                "lse (the rows' log-sum-exp over all num_classes classes) is required for a class shard"
            )
        shape = (s.p.n,) if s.reduction == "none" else ()
        if tuple(np.shape(grad_loss)) != shape:
            raise ValueError(
                f"grad_loss must have the loss's shape {shape} (reduction={s.reduction!r}), "
                f"got {tuple(np.shape(grad_loss))}"
            )
        if lse is not None and tuple(np.shape(lse)) != (s.p.n,):
            raise ValueError(f"lse must have shape (N,) = ({s.p.n},), got {tuple(np.shape(lse))}")
        if s.p.n == 0:
            return self.empty_grads(s.p)
        weights = self.weights(s, grad_loss)
        if s.plan.mode == "rows":
            lse_all = self.xp.ascontiguousarray(self.xp.asarray(lse, dtype=np.float64)) if s.sharded else None
            _, grad_x, grad_w = self.rows(s, x, w, weights, lse_all)
            return grad_x, grad_w
        if lse is None:
            self.classes_lse(s, x, w)
            lse = s.call.values["lse"]
        lse = self.xp.ascontiguousarray(self.xp.asarray(lse, dtype=np.float64))
        return self.classes_grad(s, x, w, weights, lse)

    def cross_entropy_with_grad(
        self, x: Any, w: Any, label: Any, *, margin: object = 2, beta: object = 0.0, reduction: object = "mean",
        ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
        memory_budget: object = None,
    ) -> tuple[Any, Any, Any]:  # fmt: skip
        if reduction == "none":
            raise ValueError("reduction='none' has a per-row upstream gradient: use cross_entropy_backward")
        s = self.prepare(
            x, w, label, margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget, plan.OP_BACKWARD
        )
        if s.p.n == 0:
            return (self.reduce(s, self.xp.zeros(0)), *self.empty_grads(s.p))
        weights = self.weights(s, 1.0)
        if s.plan.mode == "rows":
            loss, grad_x, grad_w = self.rows(s, x, w, weights)
        else:
            loss = self.classes_lse(s, x, w)
            grad_x, grad_w = self.classes_grad(s, x, w, weights, s.call.values["lse"])
        return self.reduce(s, loss), grad_x, grad_w

    def cross_entropy_shard_stats(
        self, x: Any, w: Any, label: Any, *, class_start: object, num_classes: object, margin: object = 2,
        beta: object = 0.0, ignore_index: object = -100, chunk_size: object = None, chunking: object = None,
        memory_budget: object = None,
    ) -> tuple[Any, Any]:  # fmt: skip
        """(lse over the shard's classes, target logit where the shard holds it else 0)."""
        s = self.prepare(
            x, w, label, margin, beta, "none", ignore_index, chunk_size, chunking, memory_budget, plan.OP_FORWARD,
            class_start, num_classes,
        )  # fmt: skip
        if s.p.n == 0:
            return self.xp.zeros(0), self.xp.zeros(0)
        if s.plan.mode == "rows":
            self.rows(s, x, w, None)
        else:
            self.classes_lse(s, x, w)
        return s.call.values["lse"], s.call.values["tgt"]


# ---------------------------------------------------------------- CuPy entry points


def _call(method: str, *args: Any, **kwargs: Any) -> Any:
    """Run ``LossDriver.<method>`` on the current device (after raising any pending
    bad-label error), with x and w made C-contiguous; args end with (x, w, label)."""
    import cupy

    from . import _cupy_backend as cb

    *head, x, w, label = args
    st = cb._state(x=x, w=w, label=label)
    dtype_name = x.dtype.name

    def run(call: plan.Call) -> None:
        st.run(call, dtype_name)

    driver = LossDriver(
        cupy, matmul, run, st.bufs, lambda: next(cb._SERIAL),
        lambda ncoef, nclasses: st.workspace().get(ncoef, nclasses), cb._DTYPES,
    )  # fmt: skip
    out = getattr(driver, method)(*head, cb._contiguous(x), cb._contiguous(w), label, **kwargs)
    cb._finish(st)
    return out


def cross_entropy(x: Any, w: Any, label: Any, **kwargs: Any) -> Any:
    return _call("cross_entropy", x, w, label, **kwargs)


def cross_entropy_backward(grad_loss: Any, x: Any, w: Any, label: Any, **kwargs: Any) -> tuple[Any, Any]:
    return _call("cross_entropy_backward", grad_loss, x, w, label, **kwargs)  # type: ignore[no-any-return]


def cross_entropy_with_grad(x: Any, w: Any, label: Any, **kwargs: Any) -> tuple[Any, Any, Any]:
    return _call("cross_entropy_with_grad", x, w, label, **kwargs)  # type: ignore[no-any-return]


def cross_entropy_shard_stats(x: Any, w: Any, label: Any, **kwargs: Any) -> tuple[Any, Any]:
    return _call("cross_entropy_shard_stats", x, w, label, **kwargs)  # type: ignore[no-any-return]
