"""The L-Softmax logits as two custom operators (forward, backward) with autograd, and
:func:`lsoftmax`, the public function on top (see the package docstring for the rules).

Eager calls run the operators' implementations through a plain ``autograd.Function``
(:class:`_Eager`): the custom-op dispatch cost more than the layer itself at small sizes.
It keeps the core's per-sample statistics and the NumPy views of the inputs on the
autograd context (CPU), so the backward neither recomputes the statistics nor scans the
labels again.  Under ``torch.compile`` the operators run; both give the same bits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import lsoftmax_core as _core
from lsoftmax_core.checks import check_margin

from ._bridge import (
    _autocast_cast,
    _beta_float,
    _beta_tensor,
    _check_same_dtype,
    _check_tensors,
    _cpu_views,
    _dispatch_mode,
    _DtypeErrorsNameWeight,
    _no_autocast,
    _run,
)

__all__ = ["lsoftmax"]


def _forward_impl(x: Tensor, weight: Tensor, label: Tensor, margin: int, b: float) -> tuple[Tensor, Any]:
    """The logits, and on the CPU what the backward can reuse (None on CUDA): the core's
    checked problem (which holds the NumPy views of x, weight and label) and its per-sample
    statistics."""
    if x.is_cpu:
        # The plain GEMM on torch's own BLAS and thread pool (NumPy's OpenBLAS workers
        # and torch's OpenMP workers fight over the cores when they alternate; and margin 1
        # is then bit for bit torch's linear layer, at every size), then the core rewrites
        # the N target logits in place.  No autograd graph is recorded here (an
        # autograd.Function's forward and a custom op's implementation both run below
        # autograd); the detached aliases are for Tensor.numpy, which refuses the others.
        xd, wd = x.detach(), weight.detach()
        with _DtypeErrorsNameWeight(x, weight):
            xa, wa, la = _cpu_views(x=xd, weight=wd, label=label)
            checked = _core.check_arguments(xa, wa, la, margin=margin, beta=b)  # once, before any GEMM
        with _no_autocast("cpu"):
            logits = torch.mm(xd, wd.t())
        _, stats = _core.add_margin(logits.numpy(), xa, wa, la, margin=margin, beta=b, checked=checked,
                                    return_stats=True)  # fmt: skip
        return logits, (checked, stats)

    def call(xa: Any, wa: Any, la: Any) -> Any:
        return _core.forward(xa, wa, la, margin=margin, beta=b)  # checks once, then computes

    with _DtypeErrorsNameWeight(x, weight):
        return _run(call, x=x, weight=weight, label=label)[0], None


def _backward_impl(
    grad_logits: Tensor, x: Tensor, weight: Tensor, label: Tensor, margin: int, b: float, saved: Any = None
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
        else:
            forward_checked, stats = saved
            xa, wa, la, _ = forward_checked.inputs
            (ga,) = _cpu_views(grad_logits=grad_logits)
            checked = forward_checked.with_grad_logits(ga)  # grad_logits' shape and dtype only
        # Not autocast: a backward run inside an autocast region (loss.backward() under
        # torch.autocast) computes in the forward's dtype too.
        with _no_autocast("cpu"):
            grad_x = torch.mm(grad_logits, weight)
            grad_w = torch.mm(grad_logits.t(), x)
        _core.add_margin_grad(
            grad_x.numpy(), grad_w.numpy(), ga, xa, wa, la, margin=margin, beta=b, checked=checked, stats=stats
        )
        return grad_x, grad_w

    def call(ga: Any, xa: Any, wa: Any, la: Any) -> Any:
        return _core.backward(ga, xa, wa, la, margin=margin, beta=b)

    with _DtypeErrorsNameWeight(x, weight):
        grad_x, grad_w = _run(call, grad_logits=grad_logits, x=x, weight=weight, label=label)
    return grad_x, grad_w


@torch.library.custom_op("lsoftmax_core::lsoftmax_forward", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor) -> Tensor:
    return _forward_impl(x, weight, label, margin, float(beta))[0]  # beta: a CPU scalar, no device sync


@_forward_op.register_fake
def _forward_fake(x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor) -> Tensor:
    _check_same_dtype(x, weight)
    return x.new_empty((x.shape[0], weight.shape[0]))


# On autocast's float32 list (see the module docstring): float16/bfloat16 operands are cast
# to float32 (float64 is left alone), then the operator runs with autocast off.
_forward_op.register_autocast("cpu", torch.float32)
_forward_op.register_autocast("cuda", torch.float32)


@torch.library.custom_op("lsoftmax_core::lsoftmax_backward", mutates_args=())
def _backward_op(
    grad_logits: Tensor, x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor
) -> tuple[Tensor, Tensor]:
    return _backward_impl(grad_logits, x, weight, label, margin, float(beta))


@_backward_op.register_fake
def _backward_fake(
    grad_logits: Tensor, x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor
) -> tuple[Tensor, Tensor]:
    _check_same_dtype(x, weight)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, weight, label, margin, beta = inputs
    ctx.save_for_backward(x, weight, label, beta)
    ctx.margin = margin


def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
    x, weight, label, beta = ctx.saved_tensors
    grad_x, grad_w = _backward_op(grad, x, weight, label, ctx.margin, beta)
    return (
        grad_x if ctx.needs_input_grad[0] else None,
        grad_w if ctx.needs_input_grad[1] else None,
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
    def forward(ctx: Any, x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: float) -> Tensor:
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
            grad_x, grad_w = _backward_op(grad, x, weight, label, ctx.margin, beta)
        else:
            grad_x, grad_w = _backward_impl(grad, x, weight, label, ctx.margin, ctx.beta, ctx.kept)
        ctx.kept = None
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, grad_w if needs[1] else None, None, None, None)


def lsoftmax(
    x: Tensor, weight: Tensor, label: Tensor, *, margin: int = 2, beta: float | Tensor = 0.0
) -> Tensor:
    """L-Softmax logits (N, C) with autograd, see ``docs/derivatives.md``.

    x: (N, D) float features; weight: (C, D) class weights (an ``nn.Linear`` weight), of
    x's dtype; label: (N,) integer class indices, all three on one device (CPU or CUDA).
    Feed the result to ``F.cross_entropy(logits, label)`` for the L-Softmax loss.  beta
    is a number >= 0 or a 0-d tensor (best on the CPU: it is read on the host).  Under
    ``torch.autocast`` float16/bfloat16 inputs are computed in float32 (see the module
    docstring).  No input is modified.  Errors are ValueError/TypeError naming the
    argument.
    """
    _check_tensors(x=x, weight=weight, label=label)
    m = check_margin(margin)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _dispatch_mode() is not None:
        # Graph capture records the operator: torch.jit.trace would record the eager Function
        # as a Python op (which a saved TorchScript module cannot hold), and a dispatch mode
        # (make_fx, fake tensors) would see its GEMM but not the NumPy work on the result.
        return _forward_op(x, weight, label, m, _beta_tensor(beta))  # type: ignore[no-any-return]
    x, weight = _autocast_cast(x, weight)
    return _Eager.apply(x, weight, label, m, _beta_float(beta))  # type: ignore[no-any-return]
