"""The fused cross-entropy's CuPy ops: the engine's chunks (:mod:`._loss_engine`) with cuBLAS
GEMMs and this project's kernels for the chunk's softmax, targets and gradient
(kernels/lsoftmax.cu, "fused cross-entropy").

:class:`CupyLossOps` is written against an array library ``xp``, a GEMM and a kernel runner,
so the CPU tests run it unchanged with NumPy and the host emulator
(tests/support/kernel_host.py, through :func:`engine_over`); :func:`engine` binds it to
CuPy, cuBLAS and the current device's state (:mod:`._cupy_state`), imported on first use.

Per call: ``lsm_loss_targets`` writes the N float64 target logits once (forward's values;
margin 1: only the label check).  ``lsm_loss_chunk_lse`` writes the targets into a chunk of
logits and combines its (max, sum of exponentials) into the rows' running log-sum-exp;
``lsm_loss_chunk_grad`` turns the chunk into G (weight_i * softmax - weight_i at the
target) from the rows' lse (their own, or a given one: then a row chunk skips
``lsm_loss_chunk_lse``).  The sums over chunks (grad_w over row chunks, grad_x over class
chunks) go through a temporary and ``lsm_accumulate``; the margin's own terms are added once
at the end from the collected target entries g_i of G (``lsm_loss_margin_rows`` +
``lsm_backward_classes``, as in ``backward``).

On a class shard (``class_start``, ``num_classes``; docs/derivatives.md, "Class shards") the
labels are checked against num_classes, and the chunk kernels read shard-local labels in
which a row whose class lives elsewhere has no target column.

Deterministic (no float atomics; fixed reduction orders), and no host synchronisation:
the number of non-ignored rows, the mean's scale and the reduced loss stay on the device,
and a given ``lse`` is checked for its shape and dtype only (its values would need one).
Labels are checked on the device like ``forward``'s: a label outside [0, C) that is not
``ignore_index`` is never used as an index, its row gets no target (its loss is the
log-sum-exp), and it is reported by the next call or ``lsoftmax_core.check_labels()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from . import _cupy_loss_plan as loss_plan
from . import _cupy_plan as plan
from . import _family
from ._loss_engine import LossEngine
from .checks import Problem

__all__ = ["CupyLossOps", "engine", "engine_over"]

Gemm = Callable[[Any, Any, Any], Any]  # gemm(a, b, out): out = a @ b


class _State:
    """One call's bound launches (``call.values`` holds its device arrays)."""

    __slots__ = ("call", "colscale", "given", "lab", "n_valid", "owned", "safe_label", "sub", "subidx", "tmp",
                 "valid")  # fmt: skip

    def __init__(self, call: loss_plan.LossCall, valid: Any, n_valid: Any, safe_label: Any, owned: Any) -> None:
        self.call, self.valid, self.n_valid = call, valid, n_valid
        # The labels the margin kernels read: ``call.values["label"]`` itself, or on a class
        # shard a copy whose rows without a target here point at class 0 (their g_i is 0).
        self.safe_label = safe_label
        # The rows whose target class is w's (``lab``, 0 elsewhere), for a kind that normalises.
        self.owned, self.lab = owned, safe_label
        self.given = False
        self.tmp: dict[tuple[int, ...], Any] = {}
        self.colscale: Any = None  # a kind that normalises: see set_family
        self.sub = 1
        self.subidx: Any = None

    @property
    def g(self) -> Any:
        """The target entries of G (float64, (N,)), from the gradient chunks."""
        return self.call.values["gvec"]

    @property
    def tgt(self) -> Any:
        return self.call.values["tgt"]

    @property
    def lse(self) -> Any:
        return self.call.values["lse"]


class CupyLossOps:
    """:class:`._loss_engine.LossOps` over ``xp`` (numpy or cupy), ``gemm`` (the chunk
    GEMMs), ``run(call)`` (executes a ``_cupy_plan.Call``), the device buffers, a serial-number
    source, ``workspace(ncoef, nclasses)`` as for ``bind_backward``, the dtypes, and
    ``contiguous`` (x and w as the kernels read them) and ``done`` (after a call)."""

    def __init__(
        self, xp: Any, gemm: Gemm, run: Callable[[plan.Call], object], bufs: plan.DeviceBuffers,
        serial: Callable[[], int], workspace: Callable[[int, int], tuple[Any, Any]], dtypes: Any,
        contiguous: Callable[[Any], Any], done: Callable[[], None] = lambda: None,
    ) -> None:  # fmt: skip
        self.xp, self._gemm, self.run, self.bufs = xp, gemm, run, bufs
        self.serial, self.workspace, self.dtypes = serial, workspace, dtypes
        self.contiguous, self.done = contiguous, done

    def arrays(self, x: Any, w: Any) -> tuple[Any, Any]:
        return self.contiguous(x), self.contiguous(w)

    def bind(self, x: Any, w: Any, label: Any, p: Problem, ignore: int, start: int, total: int, op: int) -> _State:
        xp = self.xp
        info = np.iinfo(label.dtype)
        if info.min <= ignore <= info.max:
            valid = label != ignore
            lab = xp.where(valid, label, 0).astype(label.dtype, copy=False)
        else:  # no label can equal it
            valid = xp.ones(label.shape, dtype=bool)
            lab = label
        n_valid = xp.count_nonzero(valid)
        if total != p.c:
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
            call = loss_plan.bind_loss(p, xp, self.bufs, x=x, w=w, label=glab, serial=self.serial(), op=op)
        else:
            call = loss_plan.bind_loss(p, xp, self.bufs, x=x, w=w, label=lab, serial=self.serial(), op=op)
        v = call.values
        v["tgt"] = xp.zeros(p.n, dtype=np.float64)
        v["target"] = xp.empty(p.n, dtype=np.float64) if p.margin > 1 else v["tgt"]
        for name in ("run_m", "run_s", "lse"):
            v[name] = xp.empty(p.n, dtype=np.float64)
        if total == p.c:
            if p.n:
                self.run(call.targets())
            safe = v["label"]
            if lab is not label:
                # Ignored rows have no target (their lse is the plain one, as NumPy's): the
                # chunk kernels read them as label -1, i.e. no target column (kernel labels
                # are int32/int64); the target and margin kernels keep class 0 (a valid
                # index; g_i = 0 there).
                v["label"] = xp.where(valid, safe, -1).astype(safe.dtype, copy=False)
            return _State(call, valid, n_valid, safe, valid)
        if p.n:
            self.run(call.check_labels(total))  # v["label"] holds the global labels here
            v["label"] = safe
            if p.margin > 1:
                self.run(call.targets())
        v["label"] = local
        return _State(call, valid, n_valid, safe, owned)

    def set_family(self, k: _State, target: Any, colscale: Any, sub: int = 1, subidx: Any = None) -> None:
        """A kind that normalises (as the NumPy ops' ``set_family``): the chunks write its
        target logits; each chunk's columns are scaled by ``colscale`` and its sub-centres
        reduced around the kernels (:func:`._family.chunk_logits`)."""
        k.call.values["target"] = self.xp.ascontiguousarray(target, dtype=np.float64)
        k.call.has_target = True
        k.colscale, k.sub, k.subidx = colscale, sub, subidx

    @staticmethod
    def check_lse(k: _State, lse: Any) -> None:
        """Nothing beyond the engine's shape and dtype checks: reading the values would
        synchronise the device."""

    def gemm(self, a: Any, b: Any, out: Any) -> None:
        self._gemm(a, b, out)

    def gemm_add(self, k: _State, a: Any, b: Any, out: Any) -> None:
        tmp = k.tmp.get(out.shape)
        if tmp is None:
            tmp = k.tmp[out.shape] = self.xp.empty(out.shape, dtype=out.dtype)
        self._gemm(a, b, tmp)
        self.run(loss_plan.bind_accumulate(out, tmp))

    @staticmethod
    def class_block(p: Problem) -> int:
        return p.c  # whole GEMMs: cuBLAS keeps w in its caches itself, small ones cost launches

    def begin_grad(self, k: _State, weights: Any, lse: Any, grad_x: Any, grad_w: Any) -> None:
        v = k.call.values
        v.update(weight=weights, gvec=self.xp.zeros(grad_x.shape[0], np.float64), grad_x=grad_x, grad_w=grad_w)
        k.given = lse is not None
        if k.given:
            v["lse"] = lse  # the gradient kernel reads it instead of the chunks' own

    def rows_chunk(self, k: _State, z: Any, r0: int, *, grad: bool) -> None:
        zr, idx = _family.chunk_logits(k, z, r0, 0)
        if not (grad and k.given):
            self.run(k.call.chunk_lse(zr, r0, 0, first=True))
        if grad:
            self.run(k.call.chunk_grad(zr, r0, 0))
            _family.chunk_grads(k, z, zr, idx, 0)

    def classes_lse(self, k: _State, z: Any, k0: int, *, first: bool) -> None:
        zr, _ = _family.chunk_logits(k, z, 0, k0)
        self.run(k.call.chunk_lse(zr, 0, k0 // k.sub, first=first))

    def classes_grad(self, k: _State, z: Any, k0: int) -> None:
        zr, idx = _family.chunk_logits(k, z, 0, k0)
        self.run(k.call.chunk_grad(zr, 0, k0 // k.sub))
        _family.chunk_grads(k, z, zr, idx, k0)

    def margin(self, k: _State) -> None:
        """The margin's own gradient terms, after the chunks (which read the shard-local labels)."""
        k.call.values["label"] = k.safe_label
        self.run(k.call.margin(self.workspace))

    def to_dtype(self, a: Any, dtype: Any) -> Any:
        # A kernel rather than astype: CuPy's own float16/bfloat16 casts need CUDA's headers.
        out = self.xp.empty(a.shape, dtype=dtype)
        self.run(loss_plan.bind_from_f64(self.xp.ascontiguousarray(a), out))  # (ascontiguousarray: ndim >= 1)
        return out


def engine_over(
    xp: Any, gemm: Gemm, run: Callable[[plan.Call], object], bufs: plan.DeviceBuffers, serial: Callable[[], int],
    workspace: Callable[[int, int], tuple[Any, Any]], dtypes: Any,
) -> LossEngine:  # fmt: skip
    """The engine over fixed ops (the host emulator's: ``xp`` numpy, x and w made C-contiguous)."""
    ops = CupyLossOps(xp, gemm, run, bufs, serial, workspace, dtypes, xp.ascontiguousarray)
    return LossEngine(lambda x, w, label: ops)


def _device_ops(x: Any, w: Any, label: Any) -> CupyLossOps:
    """The ops on the current device (after raising any pending bad-label error)."""
    import cupy

    from . import _cupy_state as cs
    from ._cublas import matmul

    st = cs.state(x=x, w=w, label=label)
    dtype_name = x.dtype.name

    def run(call: plan.Call) -> None:
        st.run(call, dtype_name)

    return CupyLossOps(
        cupy, matmul, run, st.bufs, cs.next_serial, lambda ncoef, nclasses: st.workspace().get(ncoef, nclasses),
        cs.DTYPES, cs.contiguous, lambda: cs.finish(st),
    )  # fmt: skip


_ENGINE = LossEngine(_device_ops)


def engine() -> LossEngine:
    """The CuPy backend's fused cross-entropy (:class:`._loss_engine.LossEngine`)."""
    return _ENGINE
