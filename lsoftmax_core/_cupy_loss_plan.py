"""What the CuPy backend's fused cross-entropy launches, as plain data (the layer's plan is
lsoftmax_core/_cupy_plan.py, whose steps, calls and argument conventions these share).

Per call, ``bind_loss`` binds a ``LossCall`` to x, w and the labels; it hands out the steps
in order: ``targets()`` (the float64 target logits of ``forward``, or the label check at
margin 1), then per chunk ``chunk_lse`` / ``chunk_grad`` (kernels/lsoftmax.cu, "fused
cross-entropy"), and after the gradient GEMMs ``margin(workspace)``, the backward's margin
steps reading g_i from a float64 vector.  ``bind_accumulate`` and ``bind_from_f64`` are the
elementwise helpers (an in-place sum, a rounding to the output dtype) that need no CUDA
headers.  Like the layer's plan this imports only NumPy: the CPU tests run it through the
host emulation of the kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from ._cupy_plan import (
    BLOCK,
    Arg,
    Call,
    DeviceBuffers,
    Launch,
    Step,
    backward_steps,
    bound_values,
    check_launch,
    check_limits,
    kernel_labels,
    kernel_name,
    workspace_sizes,
)
from .checks import Problem

__all__ = ["LossCall", "bind_accumulate", "bind_from_f64", "bind_loss"]

@lru_cache(maxsize=256)
def _loss_targets(
    n: int, c: int, d: int, dtype: np.dtype[Any], margin: int, label_dtype: np.dtype[Any], op: int
) -> tuple[Step, ...]:
    check_limits(n, d, dtype)
    if n == 0:
        return ()
    if margin == 1:  # the chunk's GEMM holds the target logits; labels are still checked
        return (check_launch(n, c, label_dtype, op),)
    i64 = np.int64
    args: tuple[Arg, ...] = (
        "x", "w", "label", "target", i64(n), i64(c), i64(d), i64(margin), "beta",
        "thresholds", "err_key", "err_rec", "serial", i64(op),
    )  # fmt: skip
    return (Launch(kernel_name("lsm_loss_targets", dtype, label_dtype), (n, 1), args),)


@lru_cache(maxsize=256)
def _loss_margin(
    n: int, c: int, d: int, dtype: np.dtype[Any], margin: int, label_dtype: np.dtype[Any]
) -> tuple[Step, ...]:
    # The backward's margin steps with g_i read from the float64 vector gvec.
    steps = list(backward_steps(n, c, d, dtype, margin, label_dtype))
    if margin == 1 or not steps:
        return ()
    rows = steps[1]
    assert isinstance(rows, Launch)
    steps[1] = Launch(
        kernel_name("lsm_loss_margin_rows", dtype, label_dtype), rows.grid, ("gvec", *rows.args[1:])
    )
    return tuple(steps)


class LossCall:
    """One fused cross-entropy call's launches, bound to its arrays (``values``, a dict the
    driver extends as it allocates: ``target``, ``tgt``, ``run_m``, ``run_s``, ``lse``,
    ``weight``, ``gvec``, ``grad_x``, ``grad_w``, and per chunk ``z``).

    ``targets()`` first (the float64 target logits, or the label check at margin 1); per
    chunk of rows [r0, r0 + rows) and classes [k0, k0 + classes), after ``z = x[rows] @
    w[classes].T``: ``chunk_lse`` (online log-sum-exp) and/or ``chunk_grad`` (z becomes the
    chunk of G); after the gradient GEMMs, ``margin(workspace)``."""

    __slots__ = ("has_target", "label_dtype", "op", "p", "values")

    def __init__(self, p: Problem, values: dict[str, Any], label_dtype: np.dtype[Any], op: int) -> None:
        self.p = p
        self.values = values
        # The chunks write ``target`` into their target entries: L-Softmax's margin > 1, and
        # a kind that normalises (its targets set by the loss after the label check).
        self.has_target = p.margin > 1
        self.label_dtype = label_dtype
        self.op = op

    def targets(self) -> Call:
        p = self.p
        return Call(_loss_targets(p.n, p.c, p.d, p.dtype, p.margin, self.label_dtype, self.op), self.values)

    def check_labels(self, num_classes: int) -> Call:
        """The label check alone, against ``num_classes`` (a class shard's labels index all
        the classes, not w's rows)."""
        return Call((check_launch(self.p.n, num_classes, self.label_dtype, self.op),), self.values)

    def _chunk(self, kind: str, r0: int, rows: int, k0: int, classes: int, *extra: Arg) -> Launch:
        if rows == 0 or classes == 0:
            raise ValueError("empty chunk")
        i64 = np.int64
        head: tuple[Arg, ...] = ("z", "label", "target")
        if kind == "lsm_loss_chunk_lse":
            head += ("tgt", "run_m", "run_s", "lse")
        else:
            head += ("lse", "weight", "gvec")
        tail = (i64(r0), i64(k0), i64(classes), i64(self.p.c), i64(self.has_target), *extra)
        return Launch(kernel_name(kind, self.p.dtype, self.label_dtype), (rows, 1), head + tail)

    def chunk_lse(self, z: Any, r0: int, k0: int, *, first: bool) -> Call:
        """The chunk ``z`` (rows r0.., classes k0..): targets written into it, and its max and
        sum of exponentials combined into the rows' running (m, S) (``first``: start them)."""
        self.values["z"] = z
        rows, classes = z.shape
        return Call((self._chunk("lsm_loss_chunk_lse", r0, rows, k0, classes, np.int64(first)),), self.values)

    def chunk_grad(self, z: Any, r0: int, k0: int) -> Call:
        """``z`` := the chunk of G = weight * softmax - weight * onehot; g_i to gvec."""
        self.values["z"] = z
        rows, classes = z.shape
        return Call((self._chunk("lsm_loss_chunk_grad", r0, rows, k0, classes),), self.values)

    def margin(self, workspace: Callable[[int, int], tuple[Any, Any]]) -> Call:
        """The margin's own gradient terms from gvec, added to ``grad_x`` and ``grad_w``."""
        p = self.p
        steps = _loss_margin(p.n, p.c, p.d, p.dtype, p.margin, self.label_dtype)
        if steps:
            self.values["coef"], self.values["classes"] = workspace(*workspace_sizes(p))
        return Call(steps, self.values)


def bind_loss(p: Problem, xp: Any, dev: DeviceBuffers, *, x: Any, w: Any, label: Any, serial: int, op: int) -> LossCall:
    """A fused cross-entropy call bound to ``x``, ``w`` (C-contiguous) and ``label`` (ignored
    rows already replaced by 0; any integer dtype, ``kernel_labels``); ``op`` is the code a
    bad label is reported with (OP_FORWARD for the loss, OP_BACKWARD for its gradient)."""
    lab = kernel_labels(label, xp)
    values = bound_values(p, dev, serial, lab)
    values.update(x=x, w=w)
    return LossCall(p, values, lab.dtype, op)


def _elementwise(kind: str, dtype: np.dtype[Any], count: int, args: tuple[str, str]) -> tuple[Step, ...]:
    if count == 0:
        return ()
    return (Launch(kernel_name(kind, dtype, None), (-(-count // BLOCK), 1), (*args, np.int64(count))),)


def bind_accumulate(dst: Any, src: Any) -> Call:
    """``dst += src`` (same shape and dtype, C-contiguous), in float64 rounded once."""
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError("accumulate: dst and src must have the same shape and dtype")
    return Call(_elementwise("lsm_accumulate", dst.dtype, dst.size, ("dst", "src")), {"dst": dst, "src": src})


def bind_from_f64(src: Any, dst: Any) -> Call:
    """``dst[...] = src`` rounded to dst's dtype (src float64, same size, C-contiguous)."""
    if dst.size != src.size or src.dtype != np.float64:
        raise ValueError("from_f64: src must be float64 of dst's size")
    return Call(_elementwise("lsm_from_f64", dst.dtype, dst.size, ("src", "dst")), {"src": src, "dst": dst})
