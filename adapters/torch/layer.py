"""The L-Softmax logits as two custom operators (forward, backward) with autograd, and
:func:`lsoftmax`, the public function on top (see the package docstring for the rules).

Eager calls run the operators' implementations through a plain ``autograd.Function``
(:class:`_Eager`): the custom-op dispatch cost more than the layer itself at small sizes.
It keeps the core's per-sample statistics and the NumPy views of the inputs on the
autograd context (CPU), so the backward neither recomputes the statistics nor scans the
labels again.  Under ``torch.compile`` the operators run; both give the same bits.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

import lsoftmax_core as _core
from lsoftmax_core.margins import Margin

from ._bridge import (
    Resolved,
    _autocast_cast,
    _beta_float,
    _beta_tensor,
    _check_same_dtype,
    _check_tensors,
    _cpu_views,
    _dispatch_mode,
    _DtypeErrorsNameWeight,
    _margin_args,
    _margin_of_schema,
    _margin_schema,
    _no_autocast,
    _resolve_margin,
    _run,
)

__all__ = ["lsoftmax"]


def _operand(a: np.ndarray, view: np.ndarray, t: Tensor) -> Tensor:
    """The tensor of a GEMM operand: ``t`` itself when the core's ``normalized`` returned its
    view unchanged, else the new (normalised) array as a tensor, sharing its memory."""
    if a is view:
        return t
    return torch.from_numpy(a if a.flags.writeable else a.copy())  # torch warns on read-only arrays


def _operands(xa: np.ndarray, wa: np.ndarray, x: Tensor, weight: Tensor, margin: Resolved) -> tuple[Tensor, Tensor]:
    """The rows the plain layer multiplies (the core's ``normalized``: x' = s x/|x| for the
    cosine kinds, w' = w/|w| for SphereFace and the cosine kinds; L-Softmax: x and weight)."""
    if not isinstance(margin, Margin):
        return x, weight
    xn, wn = _core.normalized(xa, wa, margin=margin)
    return _operand(xn, xa, x), _operand(wn, wa, weight)


def _forward_impl(x: Tensor, weight: Tensor, label: Tensor, margin: Resolved, b: float) -> tuple[Tensor, Any]:
    """The logits, and on the CPU what the backward can reuse (None on CUDA): the core's
    checked problem (which holds the NumPy views of x, weight and label), its per-sample
    statistics (None for the kinds other than L-Softmax) and the GEMM's two operands."""
    if x.is_cpu:
        # The plain GEMM on torch's own BLAS and thread pool (NumPy's OpenBLAS workers
        # and torch's OpenMP workers fight over the cores when they alternate; and margin 1
        # is then bit for bit torch's linear layer, at every size), then the core rewrites
        # the N target logits in place.  No autograd graph is recorded here (an
        # autograd.Function's forward and a custom op's implementation both run below
        # autograd); the detached aliases are for Tensor.numpy, which refuses the others.
        # A kind that normalises multiplies the normalised rows (the core's ``normalized``).
        xd, wd = x.detach(), weight.detach()
        with _DtypeErrorsNameWeight(x, weight):
            xa, wa, la = _cpu_views(x=xd, weight=wd, label=label)
            checked = _core.check_arguments(xa, wa, la, margin=margin, beta=b)  # once, before any GEMM
        xt, wt = _operands(xa, wa, xd, wd, margin)
        with _no_autocast("cpu"):
            logits = torch.mm(xt, wt.t())
        _, stats = _core.add_margin(logits.numpy(), xa, wa, la, margin=margin, beta=b, checked=checked,
                                    return_stats=True)  # fmt: skip
        return logits, (checked, stats, xt, wt)

    def call(xa: Any, wa: Any, la: Any) -> Any:
        return _core.forward(xa, wa, la, margin=margin, beta=b)  # checks once, then computes

    with _DtypeErrorsNameWeight(x, weight):
        return _run(call, x=x, weight=weight, label=label)[0], None


def _backward_impl(
    grad_logits: Tensor, x: Tensor, weight: Tensor, label: Tensor, margin: Resolved, b: float, saved: Any = None
) -> tuple[Tensor, Tensor]:
    """``saved``: what the forward of this call kept (CPU; its arguments and labels were
    checked there, and autograd refuses a backward after its saved tensors changed in
    place), or None: every check again."""
    if x.is_cpu:  # as in forward: the plain GEMMs (no graph recorded here), the core's corrections
        stats = None
        if saved is None:
            with _DtypeErrorsNameWeight(x, weight):
                ga, xa, wa, la = _cpu_views(grad_logits=grad_logits, x=x, weight=weight, label=label)
                checked = _core.check_arguments(xa, wa, la, margin=margin, beta=b, grad_logits=ga)
            xt, wt = _operands(xa, wa, x.detach(), weight.detach(), margin)
        else:
            forward_checked, stats, xt, wt = saved
            xa, wa, la, _ = forward_checked.inputs
            (ga,) = _cpu_views(grad_logits=grad_logits)
            checked = forward_checked.with_grad_logits(ga)  # grad_logits' shape and dtype only; keeps the kind
        # Not autocast: a backward run inside an autocast region (loss.backward() under
        # torch.autocast) computes in the forward's dtype too.  A kind that normalises: the
        # gradients of the normalised rows, which add_margin_grad turns into those of x, weight.
        with _no_autocast("cpu"):
            grad_x = torch.mm(grad_logits, wt)
            grad_w = torch.mm(grad_logits.t(), xt)
        _core.add_margin_grad(
            grad_x.numpy(), grad_w.numpy(), ga, xa, wa, la, margin=margin, beta=b, checked=checked, stats=stats
        )
        return grad_x, grad_w

    def call(ga: Any, xa: Any, wa: Any, la: Any) -> Any:
        return _core.backward(ga, xa, wa, la, margin=margin, beta=b)

    with _DtypeErrorsNameWeight(x, weight):
        grad_x, grad_w = _run(call, grad_logits=grad_logits, x=x, weight=weight, label=label)
    return grad_x, grad_w


# ``margin``, ``kind``, ``params``: L-Softmax as (m, "", None), SphereFace as (m, "sphereface",
# None), the cosine kinds as (1, kind, [their real parameters]) (_bridge._margin_schema); the
# defaults make (x, weight, label, m, beta) a call of the L-Softmax operator, as before.


@torch.library.custom_op("lsoftmax_core::lsoftmax_forward", mutates_args=())
def _forward_op(
    x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor, kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045 (torch.library's schema inference reads Optional)
) -> Tensor:  # fmt: skip
    # beta: a CPU scalar, no device sync
    return _forward_impl(x, weight, label, _margin_of_schema(margin, kind, params), float(beta))[0]


@_forward_op.register_fake
def _forward_fake(
    x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor, kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
) -> Tensor:  # fmt: skip
    _check_same_dtype(x, weight)
    return x.new_empty((x.shape[0], weight.shape[0]))


# On autocast's float32 list (see the module docstring): float16/bfloat16 operands are cast
# to float32 (float64 is left alone), then the operator runs with autocast off.
_forward_op.register_autocast("cpu", torch.float32)
_forward_op.register_autocast("cuda", torch.float32)


@torch.library.custom_op("lsoftmax_core::lsoftmax_backward", mutates_args=())
def _backward_op(
    grad_logits: Tensor, x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor, kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _backward_impl(grad_logits, x, weight, label, _margin_of_schema(margin, kind, params), float(beta))


@_backward_op.register_fake
def _backward_fake(
    grad_logits: Tensor, x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor, kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
) -> tuple[Tensor, Tensor]:  # fmt: skip
    _check_same_dtype(x, weight)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, label, margin, beta, kind, params = inputs
    ctx.save_for_backward(x, weight, label, beta)
    ctx.margin = (margin, kind, params)


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, label, beta = ctx.saved_tensors
    margin, kind, params = ctx.margin
    grad_x, grad_w = _backward_op(grad, x, weight, label, margin, beta, kind, params)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_w if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
        None,
        None,
    )


_forward_op.register_autograd(_backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The eager path: the operators' implementations without the custom-op dispatch, which
    cost more than the layer's own work at small sizes (scripts/profile_overhead.py shows it),
    and the forward's per-sample statistics handed to the backward (CPU).  Under
    ``torch.compile`` the operators run instead (see :func:`lsoftmax`)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, label: Tensor, margin: Resolved, beta: float) -> Tensor:
        logits, ctx.kept = _forward_impl(x, weight, label, margin, beta)
        ctx.save_for_backward(x, weight, label)  # autograd refuses a backward after in-place changes
        ctx.margin, ctx.beta = margin, beta
        return logits

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        x, weight, label = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the backward operator, which has no derivative of its own, so
            # a second derivative fails loudly instead of silently missing the margin's terms.
            beta = torch.tensor(ctx.beta, dtype=torch.float64)
            m, kind, params = _margin_schema(ctx.margin)
            grad_x, grad_w = _backward_op(grad, x, weight, label, m, beta, kind, params)
        else:
            grad_x, grad_w = _backward_impl(grad, x, weight, label, ctx.margin, ctx.beta, ctx.kept)
        ctx.kept = None
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, grad_w if needs[1] else None, None, None, None)


def lsoftmax(
    x: Tensor, weight: Tensor, label: Tensor, *, margin: int | Margin = 2, beta: float | Tensor = 0.0
) -> Tensor:
    """L-Softmax logits (N, C) with autograd, see ``docs/derivatives.md``.

    x: (N, D) float features; weight: (C, D) class weights (an ``nn.Linear`` weight), of
    x's dtype; label: (N,) integer class indices, all three on one device (CPU or CUDA).
    Feed the result to ``F.cross_entropy(logits, label)`` for the L-Softmax loss.
    ``margin``: an int m is L-Softmax's (``lsoftmax_core.LSoftmax(m)`` is the same, bit for
    bit); a margin object (``lsoftmax_core.SphereFace``, ``CosFace``, ``ArcFace``,
    ``CombinedMargin``) gives that kind's logits, the core's
    :func:`lsoftmax_core.forward` (docs/derivatives.md, "The margin family").  beta
    is a number >= 0 or a 0-d tensor (best on the CPU: it is read on the host).  Under
    ``torch.autocast`` float16/bfloat16 inputs are computed in float32 (see the module
    docstring).  No input is modified.  Errors are ValueError/TypeError naming the
    argument.
    """
    _check_tensors(x=x, weight=weight, label=label)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _dispatch_mode() is not None:
        # Graph capture records the operator: torch.jit.trace would record the eager Function
        # as a Python op (which a saved TorchScript module cannot hold), and a dispatch mode
        # (make_fx, fake tensors) would see its GEMM but not the NumPy work on the result.
        m, kind, params = _margin_args(margin)
        return _forward_op(x, weight, label, m, _beta_tensor(beta), kind, params)  # type: ignore[no-any-return]
    resolved = _resolve_margin(margin)
    x, weight = _autocast_cast(x, weight)
    return _Eager.apply(x, weight, label, resolved, _beta_float(beta))  # type: ignore[no-any-return]
