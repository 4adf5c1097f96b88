"""The fused L-Softmax cross-entropy as three custom operators (loss, loss with
gradients, backward) with autograd, and :func:`lsoftmax_cross_entropy` on top.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional

import torch
from torch import Tensor

import lsoftmax_core as _core
from lsoftmax_core.checks import check_integer
from lsoftmax_core.margins import Margin

from ._bridge import (
    Resolved,
    _autocast_cast,
    _beta_float,
    _beta_tensor,
    _check_same_dtype,
    _check_subcenters,
    _check_tensors,
    _dispatch_mode,
    _margin_of_schema,
    _margin_schema,
    _resolve_margin,
    _run,
)

__all__ = ["lsoftmax_cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")

# The core names the arrays w and label; the fused loss's arguments are weight and target.
_CORE_NAMES = ((re.compile(r"\blabel\b"), "target"), (re.compile(r"\bw\b"), "weight"))


@contextmanager
def _loss_errors_name_arguments(x: Tensor, weight: Tensor) -> Iterator[None]:
    """The core's argument errors with the loss's argument names (target, weight)."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if type(e) not in (TypeError, ValueError):
            raise
        if isinstance(e, TypeError):
            _check_same_dtype(x, weight)
        message = str(e)
        for pattern, name in _CORE_NAMES:
            message = pattern.sub(name, message)
        raise type(e)(message) from None


def _run_loss(
    fn: Callable[..., Any], x: Tensor, weight: Tensor, target: Tensor, *, first: Tensor | None = None,
    last: Tensor | None = None,
) -> list[Tensor]:  # fmt: skip
    """``fn(first, x, weight, target, last)`` (``first``/``last`` when given: grad_loss and
    lse) through :func:`_run`, as the logits do: NumPy views on the CPU, CuPy views on
    torch's stream with torch's allocator on CUDA, results back as tensors (a 0-d loss as
    a 0-d tensor).  The core checks the arguments once."""
    named = {"x": x, "weight": weight, "target": target}
    if first is not None:
        named = {"grad_loss": first, **named}
    if last is not None:
        named["lse"] = last
    with _loss_errors_name_arguments(x, weight):
        return _run(fn, **named)


def _loss_kwargs(
    margin: Resolved, beta: Tensor | float, reduction: str, ignore_index: int, subcenters: int = 1
) -> dict[str, Any]:
    return {
        "margin": margin, "beta": float(beta), "reduction": reduction, "ignore_index": ignore_index,
        "subcenters": subcenters,
    }  # fmt: skip


# The operators carry the margin as lsoftmax_forward does: ``margin``, ``kind``, ``params``
# (_bridge._margin_schema), defaulting to L-Softmax's "" and None, then ``subcenters`` (the
# core's k, default 1), so that the call forms without them keep their meaning.


def _loss_fake(x: Tensor, weight: Tensor, reduction: str) -> Tensor:
    _check_same_dtype(x, weight)
    return x.new_empty((x.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("lsoftmax_core::lsoftmax_cross_entropy", mutates_args=())
def _loss_op(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int,
    kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
    subcenters: int = 1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(loss, lse): the loss and each row's float64 log-sum-exp, which the backward reuses."""
    kw = _loss_kwargs(_margin_of_schema(margin, kind, params), beta, reduction, ignore_index, subcenters)

    def call(xa: Any, wa: Any, ta: Any) -> Any:
        return _core.cross_entropy(xa, wa, ta, return_lse=True, **kw)

    loss, lse = _run_loss(call, x, weight, target)
    return loss, lse


@_loss_op.register_fake
def _loss_op_fake(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int,
    kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
    subcenters: int = 1,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _loss_fake(x, weight, reduction), x.new_empty((x.shape[0],), dtype=torch.float64)


@torch.library.custom_op("lsoftmax_core::lsoftmax_cross_entropy_with_grad", mutates_args=())
def _loss_with_grad_op(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int,
    kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
    subcenters: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(loss, grad_x, grad_w) in one pass, "mean"/"sum": the gradients for an upstream 1."""
    kw = _loss_kwargs(_margin_of_schema(margin, kind, params), beta, reduction, ignore_index, subcenters)

    def call(xa: Any, wa: Any, ta: Any) -> Any:
        return _core.cross_entropy_with_grad(xa, wa, ta, **kw)

    loss, grad_x, grad_w = _run_loss(call, x, weight, target)
    return loss, grad_x, grad_w


@_loss_with_grad_op.register_fake
def _loss_with_grad_op_fake(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int,
    kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
    subcenters: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    return _loss_fake(x, weight, reduction), x.new_empty(x.shape), weight.new_empty(weight.shape)


@torch.library.custom_op("lsoftmax_core::lsoftmax_cross_entropy_backward", mutates_args=())
def _loss_backward_op(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    margin: int,
    beta: Tensor,
    reduction: str,
    ignore_index: int,
    lse: Optional[Tensor],  # noqa: UP045 (torch.library's schema inference reads Optional)
    kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
    subcenters: int = 1,
) -> tuple[Tensor, Tensor]:
    kw = _loss_kwargs(_margin_of_schema(margin, kind, params), beta, reduction, ignore_index, subcenters)
    return _backward_impl(grad_loss, x, weight, target, kw, lse)


def _backward_impl(
    grad_loss: Tensor, x: Tensor, weight: Tensor, target: Tensor, kw: dict[str, Any], lse: Tensor | None
) -> tuple[Tensor, Tensor]:
    def call(ga: Any, xa: Any, wa: Any, ta: Any, lse_view: Any = None) -> Any:
        return _core.cross_entropy_backward(ga, xa, wa, ta, lse=lse_view, **kw)

    # grad_loss may be an expanded (stride-0) cotangent: N values, made dense for the views.
    grad_x, grad_w = _run_loss(call, x, weight, target, first=grad_loss.contiguous(), last=lse)
    return grad_x, grad_w


@_loss_backward_op.register_fake
def _loss_backward_op_fake(
    grad_loss: Tensor,
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    margin: int,
    beta: Tensor,
    reduction: str,
    ignore_index: int,
    lse: Optional[Tensor],  # noqa: UP045
    kind: str = "",
    params: Optional[list[float]] = None,  # noqa: UP045
    subcenters: int = 1,
) -> tuple[Tensor, Tensor]:
    _check_same_dtype(x, weight)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


# Both forward operators are on autocast's float32 list, like lsoftmax_forward.
for _op in (_loss_op, _loss_with_grad_op):
    _op.register_autocast("cpu", torch.float32)
    _op.register_autocast("cuda", torch.float32)


def _input_grads(ctx: Any, grad_x: Tensor, grad_w: Tensor) -> tuple[Tensor | None, ...]:
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_w if needs[1] else None, *[None] * (len(needs) - 2))


def _scaled(
    grads: tuple[Tensor, Tensor], grad_loss: Tensor, target: Tensor, ignore_index: int, *, in_place: bool
) -> tuple[Tensor, Tensor]:
    """The forward's gradients (for an upstream 1) times the upstream gradient ``grad_loss``.

    Ignored rows take no part whatever the upstream gradient, as in torch's cross_entropy:
    their rows of grad_x are exact zeros, and so is grad_w when every row is ignored, and a
    non-finite ``grad_loss`` (``loss.sqrt()`` of a loss of 0) must not make them 0 * inf =
    NaN.  A finite CPU ``grad_loss`` (the usual case; reading it costs no synchronisation)
    scales both as they are; otherwise the factor is 0 on the ignored rows, without reading it.
    """
    grad_x, grad_w = grads
    if not in_place or grad_loss.device.type != "cpu" or not math.isfinite(grad_loss.item()):
        ignored = target == ignore_index
        zero = grad_loss.new_zeros(())
        row_factor = torch.where(ignored, zero, grad_loss).to(grad_x.dtype)[:, None]
        w_factor = torch.where(ignored.all(), zero, grad_loss).to(grad_w.dtype)
        if not in_place:  # traced: no in-place update of an output
            return grad_x * row_factor, grad_w * w_factor
        return grad_x.mul_(row_factor), grad_w.mul_(w_factor)
    return grad_x.mul_(grad_loss), grad_w.mul_(grad_loss)


def _loss_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    """Both forward operators: keep the inputs, and the (non-differentiable) extra outputs."""
    x, weight, target, margin, beta, reduction, ignore_index, kind, params, subcenters = inputs
    extra = output[1:]  # lse, or the gradients for an upstream 1
    ctx.mark_non_differentiable(*extra)
    if len(extra) == 2:
        # The gradients: kept on ctx rather than saved, so that the backward may scale them in
        # place (no copy of grad_w) and then let go of them.  Non-differentiable outputs have
        # no grad_fn, so this makes no reference cycle.
        ctx.save_for_backward(x, weight, target, beta)
        ctx.grads = extra
    else:
        ctx.save_for_backward(x, weight, target, beta, *extra)
    ctx.hyper = (margin, reduction, ignore_index, kind, params, subcenters)


def _loss_backward(ctx: Any, grad_loss: Tensor, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, target, beta, lse = ctx.saved_tensors
    margin, reduction, ignore_index, kind, params, subcenters = ctx.hyper
    grad_x, grad_w = _loss_backward_op(
        grad_loss, x, weight, target, margin, beta, reduction, ignore_index, lse, kind, params, subcenters
    )
    return _input_grads(ctx, grad_x, grad_w)


def _loss_with_grad_backward(
    ctx: Any, grad_loss: Tensor, grad_grad_x: Tensor, grad_grad_w: Tensor
) -> tuple[Tensor | None, ...]:
    x, weight, target, beta = ctx.saved_tensors
    grads, ctx.grads = ctx.grads, None
    if grads is None or (torch.is_grad_enabled() and not torch.compiler.is_compiling()):
        # A second backward (retain_graph=True: the first one consumed the gradients), or
        # create_graph=True: the saved gradients are constants to autograd, so scaling them
        # would give silently wrong second derivatives.  The backward operator has no
        # derivative of its own: a double backward through it fails loudly instead.
        margin, reduction, ignore_index, kind, params, subcenters = ctx.hyper
        grad_x, grad_w = _loss_backward_op(
            grad_loss, x, weight, target, margin, beta, reduction, ignore_index, None, kind, params, subcenters
        )
        return _input_grads(ctx, grad_x, grad_w)
    # Traced (compile, AOT, fake or functional tensors): no in-place update of an output.
    # Otherwise scaled in place: the forward's gradients are ours alone (the op's extra
    # outputs, not returned by lsoftmax_cross_entropy), so no (C, D) copy is made; for the
    # usual upstream 1 the values are unchanged.
    traced = torch.compiler.is_compiling() or not all(type(t) is Tensor for t in (*grads, grad_loss))
    ignore_index = ctx.hyper[2]
    return _input_grads(ctx, *_scaled(grads, grad_loss, target, ignore_index, in_place=not traced))


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)
_loss_with_grad_op.register_autograd(_loss_with_grad_backward, setup_context=_loss_setup_context)


class _EagerWithGrad(torch.autograd.Function):
    """Eager "mean"/"sum" with a gradient to come: the loss and both gradients in one pass,
    as ``_loss_with_grad_op`` (same implementation, same bits), without the custom-op
    dispatch; the backward scales the gradients in place and hands them out once."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, target: Tensor, kw: dict[str, Any]) -> Tensor:
        def call(xa: Any, wa: Any, ta: Any) -> Any:
            return _core.cross_entropy_with_grad(xa, wa, ta, **kw)

        loss, grad_x, grad_w = _run_loss(call, x, weight, target)
        ctx.save_for_backward(x, weight, target)
        ctx.grads, ctx.kw = (grad_x, grad_w), kw
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, target = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if grads is None or torch.is_grad_enabled():
            # A second backward of a retained graph, or create_graph=True: the backward
            # operator (no derivative of its own: a double backward fails loudly).
            grad_x, grad_w = _backward_via_op(grad_loss, x, weight, target, ctx.kw, None)
        else:
            # Ours alone: scaled in place, no copy.
            grad_x, grad_w = _scaled(grads, grad_loss, target, ctx.kw["ignore_index"], in_place=True)
        return _eager_grads(ctx, grad_x, grad_w)


class _EagerLoss(torch.autograd.Function):
    """Eager loss alone ("none", or no gradient needed), keeping each row's log-sum-exp for
    a backward, as ``_loss_op`` and ``_loss_backward_op`` (same implementations)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, target: Tensor, kw: dict[str, Any]) -> Tensor:
        def call(xa: Any, wa: Any, ta: Any) -> Any:
            return _core.cross_entropy(xa, wa, ta, return_lse=True, **kw)

        loss, lse = _run_loss(call, x, weight, target)
        ctx.save_for_backward(x, weight, target, lse)
        ctx.kw = kw
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, target, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: through the operator (see above)
            grad_x, grad_w = _backward_via_op(grad_loss, x, weight, target, ctx.kw, lse)
        else:
            grad_x, grad_w = _backward_impl(grad_loss, x, weight, target, ctx.kw, lse)
        return _eager_grads(ctx, grad_x, grad_w)


def _backward_via_op(
    grad_loss: Tensor, x: Tensor, weight: Tensor, target: Tensor, kw: dict[str, Any], lse: Tensor | None
) -> tuple[Tensor, Tensor]:
    beta = torch.tensor(kw["beta"], dtype=torch.float64)
    margin, kind, params = _margin_schema(kw["margin"])
    return _loss_backward_op(  # type: ignore[no-any-return]
        grad_loss, x, weight, target, margin, beta, kw["reduction"], kw["ignore_index"], lse, kind, params,
        kw["subcenters"],
    )


def _eager_grads(ctx: Any, grad_x: Tensor, grad_w: Tensor) -> tuple[Tensor | None, ...]:
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_w if needs[1] else None, None, None)


def lsoftmax_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    margin: int | Margin = 2,
    beta: float | Tensor = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    subcenters: int = 1,
) -> Tensor:
    """The L-Softmax cross-entropy, fused: ``F.cross_entropy(lsoftmax(x, weight, target, ...),
    target, reduction=reduction, ignore_index=ignore_index)`` without ever holding the (N, C)
    logits (the core's :func:`lsoftmax_core.cross_entropy`; the maths:
    ``docs/derivatives.md``, "Cross-entropy").

    x: (N, D) float features; weight: (C, D) class weights, of x's dtype; target: (N,)
    integer class indices in [0, C), or ``ignore_index`` for a row that takes no part
    (no margin, no gradient; "mean" divides by the rows that are not ignored, and a batch
    with every row ignored gives 0 where torch gives NaN).  ``reduction``: "mean", "sum"
    (0-d results) or "none" ((N,)).  ``margin`` (an int or a margin object), ``beta`` and
    autocast as for :func:`lsoftmax`.  The chunks' temporaries are sized from the core's
    memory budget (the environment variable ``LSOFTMAX_CE_BUDGET``, default 64 MiB).

    For "mean"/"sum", when a gradient will be needed (grad mode on and x or weight
    requiring grad) the forward computes the loss and both gradients in one pass
    (:func:`lsoftmax_core.cross_entropy_with_grad`) and keeps the gradients, which the
    backward only scales; otherwise, and for "none", the forward computes the loss only
    and the backward walks the chunks again.  CPU and CUDA tensors: on CUDA the core's
    CuPy backend runs on PyTorch's current stream with PyTorch's allocator, as for
    :func:`lsoftmax` (not yet measured on a GPU).  Arguments are checked once, before
    anything is computed; errors are ValueError/TypeError naming the argument.

    ``subcenters=k`` (default 1) is the core's sub-centre loss (SubCenter-ArcFace), for a
    margin kind that normalises the weights (``SphereFace``, ``CosFace``, ``ArcFace``,
    ``CombinedMargin``): weight is (C·k, D), class j's centres being rows j·k ... j·k + k - 1;
    a class's cosine is the largest of its centres' and its gradient goes to that centre
    (the lowest on a tie).  target counts classes, [0, C).  An int margin (or ``LSoftmax``)
    with k > 1 is a ValueError naming subcenters, and so are weight rows that k does not
    divide (naming weight's shape).  Under ``torch.compile`` k is a constant of the graph.

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from lsoftmax_core.adapters.torch import lsoftmax, lsoftmax_cross_entropy
    >>> x = torch.tensor([[1.0, 0.5], [0.0, 2.0], [-1.0, 1.0]], requires_grad=True)
    >>> weight = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    >>> target = torch.tensor([0, 1, -100])  # the last row is ignored
    >>> loss = lsoftmax_cross_entropy(x, weight, target, margin=3, beta=1.0)
    >>> unfused = F.cross_entropy(lsoftmax(x, weight, target.clamp(min=0), margin=3, beta=1.0), target)
    >>> torch.allclose(loss, unfused)
    True
    >>> loss.backward(); x.grad[2].tolist()  # no gradient for the ignored row
    [0.0, 0.0]
    """
    _check_tensors(x=x, weight=weight, target=target)
    capture = torch.compiler.is_compiling() or torch.jit.is_tracing() or _dispatch_mode() is not None
    resolved = _resolve_margin(margin)
    m, kind, params = _margin_schema(resolved) if capture else (resolved, "", None)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {_REDUCTIONS}")
    ignore = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
    k = _check_subcenters(subcenters, resolved)
    with_grad = reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if capture:
        # Graph capture records the operators (see lsoftmax_core.adapters.torch.layer).
        b = _beta_tensor(beta)
        if with_grad:
            return _loss_with_grad_op(x, weight, target, m, b, reduction, ignore, kind, params, k)[0]
        return _loss_op(x, weight, target, m, b, reduction, ignore, kind, params, k)[0]
    # Eager: the operators' implementations without the custom-op dispatch (autocast as
    # their registered rule does it).
    x, weight = _autocast_cast(x, weight)
    kw = _loss_kwargs(m, _beta_float(beta), reduction, ignore, k)
    return (_EagerWithGrad if with_grad else _EagerLoss).apply(x, weight, target, kw)  # type: ignore[no-any-return]
