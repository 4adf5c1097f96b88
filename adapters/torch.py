"""PyTorch adapter: ``lsoftmax`` (a differentiable function), ``LSoftmaxLinear`` (a layer),
and the fused loss ``lsoftmax_cross_entropy`` with its module ``LSoftmaxLoss``.

L-Softmax logits (the maths: ``docs/derivatives.md``) for torch tensors on the CPU and
on CUDA.  A thin DLPack bridge with no maths of its own.  Both directions are
``torch.library.custom_op`` operators with a fake (meta) implementation and an autograd
formula, so the function works in eager autograd, under ``torch.compile(fullgraph=True)``
and passes ``torch.library.opcheck``.

CPU: the plain layer's GEMMs run in torch (its BLAS and its thread pool: NumPy's OpenBLAS
workers and torch's OpenMP workers slow each other down badly when they alternate on the
same cores), and the core's :func:`lsoftmax_core.add_margin` /
:func:`lsoftmax_core.add_margin_grad` then apply the margin in place on those results,
reading the inputs through read-only NumPy views of the tensors' memory (no copy).  The
arguments are checked once per call, by :func:`lsoftmax_core.check_arguments` before the
GEMMs (labels included), whose result lets ``add_margin*`` skip their checks.

CUDA: the CuPy backend runs on PyTorch's current stream, and every array it allocates
(outputs and temporaries) comes from PyTorch's caching allocator, so the returned tensors
belong to PyTorch like any other (they show in ``torch.cuda.memory_allocated``) and no
memory is held in CuPy's pool.  The core's ``forward``/``backward`` check the arguments
once; labels are checked on the GPU (see :func:`lsoftmax_core.check_labels`).

Autocast: the forward operator is on autocast's float32 list (a registered autocast rule
for CPU and CUDA, like torch's own numerically sensitive ops): under
``torch.autocast`` float16 and bfloat16 inputs are computed in float32 and the logits are
float32; float32 and float64 inputs run in their own dtype, unchanged.  So features that
an autocast layer produced in bfloat16 meet a float32 weight in float32.  Outside
autocast x and weight must have the same dtype (a TypeError naming both otherwise), and
float16/bfloat16 run on CUDA only.  The backward operator is never autocast (also when
``backward()`` is called inside the autocast region): it runs in the dtype the forward
computed in.

beta travels to the operators as a 0-d float64 CPU tensor rather than a Python float:
custom operators specialise on float arguments, so a float beta that changes every step
(an annealing schedule) would recompile a compiled model every step; a tensor is a graph
input instead.  Reading it on the host is free because it lives on the CPU.

Gradients are first order (the backward operator has no derivative of its own).

The fused loss (:func:`lsoftmax_cross_entropy`, :class:`LSoftmaxLoss`) is the core's
:func:`lsoftmax_core.cross_entropy` behind three more custom operators, with the same
beta, autocast and checking rules; it never holds the (N, C) logits.  On the CPU its GEMMs
run in NumPy (the core walks the logits in chunks); on CUDA it goes through the same bridge
as the logits (the CuPy backend's cuBLAS GEMMs per chunk and kernels, on PyTorch's current
stream, allocating from PyTorch's caching allocator; the loss, the float64 per-row
log-sum-exp kept for the backward and the gradients come back as CUDA tensors through
DLPack, a 0-d loss as a 0-d tensor, without a host synchronisation).  The CUDA path has
not yet been run on a GPU.

>>> import torch
>>> from lsoftmax_core.adapters.torch import lsoftmax
>>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
>>> weight = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
>>> label = torch.tensor([0, 1])
>>> lsoftmax(x, weight, label, margin=1).tolist()  # margin 1: the plain x @ weight.T
[[1.0, 1.0], [2.0, -2.0]]
>>> logits = lsoftmax(x, weight, label, margin=2)
>>> bool(logits[0, 0] < 1.0), bool(logits[1, 1] < -2.0), logits[0, 1].item()  # targets only
(True, True, 1.0)
>>> torch.nn.functional.cross_entropy(logits, label).backward()
>>> x.grad.shape
torch.Size([2, 2])
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lsoftmax_core as _core
from lsoftmax_core.checks import check_beta, check_integer, check_margin
from lsoftmax_core.schedule import ConstantSchedule, Schedule, check_schedule, schedule_from_dict

__all__ = ["LSoftmaxLinear", "LSoftmaxLoss", "lsoftmax", "lsoftmax_cross_entropy"]


# --------------------------------------------------------------------------- conversions


def _as_numpy(name: str, t: Tensor) -> np.ndarray:
    """A read-only NumPy view of a CPU tensor's memory (DLPack, no copy)."""
    try:
        return np.from_dlpack(t.detach())
    except (BufferError, TypeError, RuntimeError) as e:  # e.g. bfloat16, which NumPy lacks
        raise TypeError(f"{name}.dtype={t.dtype} cannot be passed to the CPU backend: {e}") from None


def _run_cpu(fn: Callable[..., Any], named: dict[str, Tensor]) -> list[Tensor]:
    arrays = [_as_numpy(name, t) for name, t in named.items()]
    out = fn(*arrays)
    # torch.from_numpy shares the result's memory; the tensor keeps the array alive.
    return [torch.from_numpy(a) for a in (out if isinstance(out, tuple) else (out,))]


class _TorchBlock:
    """Owns one block of PyTorch's caching allocator; gives it back when collected.

    CuPy keeps this object alive (through ``UnownedMemory``) exactly as long as any
    array, or any tensor imported from one via DLPack, still uses the block.
    """

    __slots__ = ("_delete", "ptr")

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr
        # Bound now so that the block can still be freed while the interpreter shuts down.
        self._delete = torch.cuda.caching_allocator_delete

    def __del__(self) -> None:
        if self.ptr:
            self._delete(self.ptr)


def _torch_allocator(stream: Any) -> Callable[[int], Any]:
    """A CuPy allocator drawing from PyTorch's caching allocator on ``stream``.

    Blocks are tied to the stream the kernels run on, so PyTorch reuses a freed block
    only after the work queued on that stream, the same rule as for its own tensors.
    """
    import cupy

    def allocate(size: int) -> Any:
        device = cupy.cuda.runtime.getDevice()
        ptr = torch.cuda.caching_allocator_alloc(size, device, stream) if size else 0
        mem = cupy.cuda.UnownedMemory(ptr, size, _TorchBlock(ptr), device)
        return cupy.cuda.MemoryPointer(mem, 0)

    return allocate


def _cupy_stream(torch_stream: torch.cuda.Stream) -> Any:
    import cupy

    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None and hasattr(torch_stream, "__cuda_stream__"):
        return from_external(torch_stream)  # the CUDA stream protocol (CuPy >= 14)
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, torch_stream.device_index)


def _run_cuda(fn: Callable[..., Any], named: dict[str, Tensor], device: torch.device) -> list[Tensor]:
    import cupy

    torch_stream = torch.cuda.current_stream(device)
    with ExitStack() as stack:
        stack.enter_context(torch.cuda.device(device))
        stack.enter_context(cupy.cuda.Device(device.index))
        stack.enter_context(_cupy_stream(torch_stream))
        stack.enter_context(cupy.cuda.using_allocator(_torch_allocator(torch_stream)))
        # Producer and consumer share one stream, so the DLPack stream handshake in both
        # directions needs no synchronisation.
        arrays = []
        for name, t in named.items():
            try:
                arrays.append(cupy.from_dlpack(t.detach()))
            except (BufferError, TypeError, RuntimeError, ValueError) as e:
                raise TypeError(f"{name}.dtype={t.dtype} cannot be passed to the CUDA backend: {e}") from None
        out = fn(*arrays)
        return [torch.from_dlpack(a) for a in (out if isinstance(out, tuple) else (out,))]


def _run(fn: Callable[..., Any], **named: Tensor) -> list[Tensor]:
    """Call ``fn`` on array views of ``named`` and return its result(s) as tensors."""
    device = next(iter(named.values())).device
    if device.type == "cuda":
        outs = _run_cuda(fn, named, device)
    else:
        outs = _run_cpu(fn, named)
    # The backends return C-contiguous arrays, which the fake implementations promise;
    # .contiguous() is then a no-op and only guards that promise.
    return [o.contiguous() for o in outs]


# --------------------------------------------------------------------------- operators


def _cpu_views(**named: Tensor) -> list[np.ndarray]:
    """Read-only NumPy views of CPU tensors (DLPack, no copy)."""
    return [_as_numpy(name, t) for name, t in named.items()]


def _check_same_dtype(x: Tensor, weight: Tensor) -> None:
    """x and weight in one dtype, named as the user knows them (the core says x and w)."""
    if x.dtype != weight.dtype:
        raise TypeError(
            f"x and weight must have the same dtype: x.dtype={x.dtype}, weight.dtype={weight.dtype} "
            "(no silent promotion; under torch.autocast float16/bfloat16 inputs are computed in float32)"
        ) from None


@contextmanager
def _dtype_errors_name_weight(x: Tensor, weight: Tensor) -> Iterator[None]:
    """The core's checks keep their order (shapes first); a dtype error caused by x and
    weight differing is reported with the adapter's names."""
    try:
        yield
    except TypeError:
        _check_same_dtype(x, weight)
        raise


def _no_autocast(device: torch.device) -> Any:
    """The operators' own GEMMs run in the inputs' dtype, whatever autocast is doing."""
    return torch.autocast(device.type, enabled=False)


@torch.library.custom_op("lsoftmax_core::lsoftmax_forward", mutates_args=())
def _forward_op(x: Tensor, weight: Tensor, label: Tensor, margin: int, beta: Tensor) -> Tensor:
    b = float(beta)  # a CPU scalar: no device synchronisation
    if x.device.type == "cpu":
        # The plain GEMM on torch's own BLAS and thread pool (NumPy's OpenBLAS workers
        # and torch's OpenMP workers fight over the cores when they alternate), then the
        # core rewrites the N target logits in place.
        with _dtype_errors_name_weight(x, weight):
            xa, wa, la = _cpu_views(x=x, weight=weight, label=label)
            checked = _core.check_arguments(xa, wa, la, margin=margin, beta=b)  # once, before any GEMM
        with _no_autocast(x.device):
            logits = torch.mm(x.detach(), weight.detach().t())
        _core.add_margin(logits.numpy(), xa, wa, la, margin=margin, beta=b, checked=checked)
        return logits

    def call(xa: Any, wa: Any, la: Any) -> Any:
        return _core.forward(xa, wa, la, margin=margin, beta=b)  # checks once, then computes

    with _dtype_errors_name_weight(x, weight):
        return _run(call, x=x, weight=weight, label=label)[0]


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
    b = float(beta)
    if x.device.type == "cpu":  # as in forward: torch's GEMMs, the core's corrections
        with _dtype_errors_name_weight(x, weight):
            ga, xa, wa, la = _cpu_views(grad_logits=grad_logits, x=x, weight=weight, label=label)
            checked = _core.check_arguments(xa, wa, la, margin=margin, beta=b, grad_logits=ga)
        g = grad_logits.detach()
        # Not autocast: a backward run inside an autocast region (loss.backward() under
        # torch.autocast) computes in the forward's dtype too.
        with _no_autocast(x.device):
            grad_x = torch.mm(g, weight.detach())
            grad_w = torch.mm(g.t(), x.detach())
        _core.add_margin_grad(grad_x.numpy(), grad_w.numpy(), ga, xa, wa, la, margin=margin, beta=b, checked=checked)
        return grad_x, grad_w

    def call(ga: Any, xa: Any, wa: Any, la: Any) -> Any:
        return _core.backward(ga, xa, wa, la, margin=margin, beta=b)

    with _dtype_errors_name_weight(x, weight):
        grad_x, grad_w = _run(call, grad_logits=grad_logits, x=x, weight=weight, label=label)
    return grad_x, grad_w


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


# --------------------------------------------------------------------------- public function


def _check_tensors(**named: Any) -> None:
    """Framework-level problems the core cannot see: non-tensors, devices, autograd."""
    for name, t in named.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__module__}.{type(t).__qualname__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got {name}.layout={t.layout}")
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"{name}.device={t.device} is not supported (CPU and CUDA tensors only)")
    names = list(named)  # x, weight, then the labels (label or target)
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name}.device={d}" for name, d in devices.items())
        raise ValueError(f"{', '.join(names[:-1])} and {names[-1]} must be on the same device: {listed}")
    if named[names[-1]].requires_grad:
        raise ValueError(f"{names[-1]} must not require grad (it holds class indices)")


def _beta_tensor(beta: object) -> Tensor:
    """beta as a fresh 0-d float64 CPU tensor (see the module docstring for why)."""
    if isinstance(beta, Tensor):
        if beta.numel() != 1 or beta.dim() != 0:
            raise ValueError(f"beta must be a number or a 0-d tensor, got beta.shape={tuple(beta.shape)}")
        if not (beta.dtype.is_floating_point or beta.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"beta must be a real number >= 0, got a tensor of dtype {beta.dtype}")
        # A copy, so that a caller updating its tensor in place (LSoftmaxLinear.step)
        # between forward and backward cannot change the beta saved for backward.
        return beta.detach().to(device="cpu", dtype=torch.float64, copy=True)
    value: float
    if torch.compiler.is_compiling():
        # beta is a symbolic float here: checking its value would specialise the graph on
        # it, so only its type is checked; the core checks the value at run time, still
        # before any kernel.
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise TypeError(f"beta={beta!r} must be a real number >= 0")
        value = beta
    else:
        value = check_beta(beta)  # the core's own check, before anything runs
    return torch.zeros((), dtype=torch.float64).add(value)


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
    return _forward_op(x, weight, label, m, _beta_tensor(beta))


# --------------------------------------------------------------------------- fused loss

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


def _loss_kwargs(margin: int, beta: Tensor, reduction: str, ignore_index: int) -> dict[str, Any]:
    return {"margin": margin, "beta": float(beta), "reduction": reduction, "ignore_index": ignore_index}


def _loss_fake(x: Tensor, weight: Tensor, reduction: str) -> Tensor:
    _check_same_dtype(x, weight)
    return x.new_empty((x.shape[0],) if reduction == "none" else ())


@torch.library.custom_op("lsoftmax_core::lsoftmax_cross_entropy", mutates_args=())
def _loss_op(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """(loss, lse): the loss and each row's float64 log-sum-exp, which the backward reuses."""
    kw = _loss_kwargs(margin, beta, reduction, ignore_index)

    def call(xa: Any, wa: Any, ta: Any) -> Any:
        return _core.cross_entropy(xa, wa, ta, return_lse=True, **kw)

    loss, lse = _run_loss(call, x, weight, target)
    return loss, lse


@_loss_op.register_fake
def _loss_op_fake(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int
) -> tuple[Tensor, Tensor]:
    return _loss_fake(x, weight, reduction), x.new_empty((x.shape[0],), dtype=torch.float64)


@torch.library.custom_op("lsoftmax_core::lsoftmax_cross_entropy_with_grad", mutates_args=())
def _loss_with_grad_op(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, grad_x, grad_w) in one pass, "mean"/"sum": the gradients for an upstream 1."""
    kw = _loss_kwargs(margin, beta, reduction, ignore_index)

    def call(xa: Any, wa: Any, ta: Any) -> Any:
        return _core.cross_entropy_with_grad(xa, wa, ta, **kw)

    loss, grad_x, grad_w = _run_loss(call, x, weight, target)
    return loss, grad_x, grad_w


@_loss_with_grad_op.register_fake
def _loss_with_grad_op_fake(
    x: Tensor, weight: Tensor, target: Tensor, margin: int, beta: Tensor, reduction: str, ignore_index: int
) -> tuple[Tensor, Tensor, Tensor]:
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
) -> tuple[Tensor, Tensor]:
    kw = _loss_kwargs(margin, beta, reduction, ignore_index)

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
) -> tuple[Tensor, Tensor]:
    _check_same_dtype(x, weight)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


# Both forward operators are on autocast's float32 list, like lsoftmax_forward.
for _op in (_loss_op, _loss_with_grad_op):
    _op.register_autocast("cpu", torch.float32)
    _op.register_autocast("cuda", torch.float32)


def _input_grads(ctx: Any, grad_x: Tensor, grad_w: Tensor) -> tuple[Tensor | None, ...]:
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_w if needs[1] else None, None, None, None, None, None)


def _loss_setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    """Both forward operators: keep the inputs, and the (non-differentiable) extra outputs."""
    x, weight, target, margin, beta, reduction, ignore_index = inputs
    extra = output[1:]  # lse, or the gradients for an upstream 1
    ctx.mark_non_differentiable(*extra)
    ctx.save_for_backward(x, weight, target, beta, *extra)
    ctx.hyper = (margin, reduction, ignore_index)


def _loss_backward(ctx: Any, grad_loss: Tensor, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
    x, weight, target, beta, lse = ctx.saved_tensors
    margin, reduction, ignore_index = ctx.hyper
    grad_x, grad_w = _loss_backward_op(grad_loss, x, weight, target, margin, beta, reduction, ignore_index, lse)
    return _input_grads(ctx, grad_x, grad_w)


def _loss_with_grad_backward(
    ctx: Any, grad_loss: Tensor, grad_grad_x: Tensor, grad_grad_w: Tensor
) -> tuple[Tensor | None, ...]:
    x, weight, target, beta, grad_x, grad_w = ctx.saved_tensors
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the saved gradients are constants to autograd, so scaling them
        # would give silently wrong second derivatives.  The backward operator has no
        # derivative of its own: a double backward through it fails loudly instead.
        margin, reduction, ignore_index = ctx.hyper
        grad_x, grad_w = _loss_backward_op(
            grad_loss, x, weight, target, margin, beta, reduction, ignore_index, None
        )
        return _input_grads(ctx, grad_x, grad_w)
    return _input_grads(ctx, grad_x * grad_loss, grad_w * grad_loss)


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)
_loss_with_grad_op.register_autograd(_loss_with_grad_backward, setup_context=_loss_setup_context)


def lsoftmax_cross_entropy(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    margin: int = 2,
    beta: float | Tensor = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> Tensor:
    """The L-Softmax cross-entropy, fused: ``F.cross_entropy(lsoftmax(x, weight, target, ...),
    target, reduction=reduction, ignore_index=ignore_index)`` without ever holding the (N, C)
    logits (the core's :func:`lsoftmax_core.cross_entropy`; the maths:
    ``docs/derivatives.md``, "Cross-entropy").

    x: (N, D) float features; weight: (C, D) class weights, of x's dtype; target: (N,)
    integer class indices in [0, C), or ``ignore_index`` for a row that takes no part
    (no margin, no gradient; "mean" divides by the rows that are not ignored, and a batch
    with every row ignored gives 0 where torch gives NaN).  ``reduction``: "mean", "sum"
    (0-d results) or "none" ((N,)).  ``margin``, ``beta`` and autocast as for
    :func:`lsoftmax`.  The chunks' temporaries are sized from the core's memory budget
    (the environment variable ``LSOFTMAX_CE_BUDGET``, default 64 MiB).

    For "mean"/"sum", when a gradient will be needed (grad mode on and x or weight
    requiring grad) the forward computes the loss and both gradients in one pass
    (:func:`lsoftmax_core.cross_entropy_with_grad`) and keeps the gradients, which the
    backward only scales; otherwise, and for "none", the forward computes the loss only
    and the backward walks the chunks again.  CPU and CUDA tensors: on CUDA the core's
    CuPy backend runs on PyTorch's current stream with PyTorch's allocator, as for
    :func:`lsoftmax` (not yet measured on a GPU).  Arguments are checked once, before
    anything is computed; errors are ValueError/TypeError naming the argument.

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
    m = check_margin(margin)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} must be one of {_REDUCTIONS}")
    ignore = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
    b = _beta_tensor(beta)
    if reduction != "none" and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _loss_with_grad_op(x, weight, target, m, b, reduction, ignore)[0]
    return _loss_op(x, weight, target, m, b, reduction, ignore)[0]


# --------------------------------------------------------------------------- modules


class _AnnealedHead(nn.Module):
    """What LSoftmaxLinear and LSoftmaxLoss share: a (C, D) ``weight`` initialised like
    nn.Linear's, the margin, and beta following a schedule of the iteration, saved in
    ``state_dict`` (see :class:`LSoftmaxLinear` for the rules)."""

    _noun = "layer"  # how error messages call the module

    def __init__(
        self,
        sizes: dict[str, int],
        *,
        margin: int,
        schedule: Schedule | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        for name, v in sizes.items():
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        in_features, out_features = (int(v) for v in sizes.values())
        self.margin = check_margin(margin)
        self.weight = nn.Parameter(torch.empty((out_features, in_features), device=device, dtype=dtype))
        # The iteration is a Python int, not a buffer: reading a device buffer to compute
        # beta would synchronise the GPU every step.  The current beta is mirrored in a
        # CPU tensor that step() updates in place, so a compiled forward reads it as a
        # graph input and does not recompile when beta changes.
        self._iteration = 0
        self._beta_tensor = torch.zeros((), dtype=torch.float64)
        self.schedule = ConstantSchedule(0.0) if schedule is None else schedule
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: uniform in ±1/sqrt(in_features)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    @property
    def schedule(self) -> Schedule:
        """The lsoftmax_core schedule giving beta as a function of the iteration."""
        return self._schedule

    @schedule.setter
    def schedule(self, schedule: Schedule) -> None:
        schedule = check_schedule(schedule)
        self._check_beta_at(schedule, self._iteration)  # before the module changes
        self._schedule = schedule
        self._sync_beta()

    @property
    def iteration(self) -> int:
        """The number of :meth:`step` calls so far."""
        return self._iteration

    @iteration.setter
    def iteration(self, value: int) -> None:
        iteration = check_integer("iteration", value, 0)
        self._check_beta_at(self._schedule, iteration)
        self._iteration = iteration
        self._sync_beta()

    @property
    def beta(self) -> float:
        """The current beta, ``schedule(iteration)``."""
        return self._check_beta_at(self._schedule, self._iteration)

    def step(self) -> None:
        """Advance the schedule by one iteration; call once per optimizer step."""
        self._check_beta_at(self._schedule, self._iteration + 1)
        self._iteration += 1
        self._sync_beta()

    @staticmethod
    def _check_beta_at(schedule: Schedule, iteration: int) -> float:
        """``schedule(iteration)``, which must be a valid beta (a user's schedule may not be)."""
        value = schedule(iteration)
        try:
            return check_beta(value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"schedule={schedule!r} gave an invalid beta at iteration {iteration}: {e}") from None

    def _sync_beta(self) -> None:
        with torch.no_grad():
            self._beta_tensor.fill_(self.beta)

    def _config(self) -> dict[str, Any]:
        """Settings a checkpoint must agree with (saved in the extra state)."""
        return {"margin": self.margin}

    def get_extra_state(self) -> dict[str, Any]:
        return {**self._config(), "iteration": self._iteration, "schedule": self._schedule.to_dict()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not {"iteration", "schedule"} <= set(state):
            raise ValueError(
                f"{type(self).__name__} extra state must be a dict with 'iteration' and 'schedule', got {state!r}"
            )
        for key, own in self._config().items():
            saved = state.get(key, own)
            if saved != own:
                raise ValueError(f"checkpoint has {key}={saved!r} but this {self._noun} has {key}={own!r}")
        saved = state["schedule"]
        own = self._schedule.to_dict()
        if saved == own:
            schedule = self._schedule  # also the one way to restore a schedule of the user's own
        else:
            try:
                schedule = schedule_from_dict(dict(saved))
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"checkpoint has schedule {saved!r}, which cannot be rebuilt ({e}), and this {self._noun}'s "
                    f"schedule.to_dict() is {own!r}: construct the {self._noun} with the schedule the checkpoint "
                    "was saved with, then load_state_dict"
                ) from None
        iteration = check_integer("iteration", state["iteration"], 0)
        self._check_beta_at(schedule, iteration)  # nothing changes on an error
        self._iteration = iteration
        self.schedule = schedule


class LSoftmaxLinear(_AnnealedHead):
    """A bias-free linear layer whose target logit carries the L-Softmax angular margin.

    ``layer(x, target)`` in training mode returns ``lsoftmax(x, weight, target,
    margin=margin, beta=layer.beta)``; in eval mode it returns the plain logits
    ``x @ weight.T`` and ignores ``target`` (the margin only shapes training; the paper
    classifies with the plain inner products).

    beta (lambda in the paper) follows ``schedule`` (default ``ConstantSchedule(0.0)``) as a
    function of ``layer.iteration``, the number of :meth:`step` calls: call ``layer.step()``
    once per optimizer step.  ``schedule`` is any :class:`lsoftmax_core.Schedule` (an
    object with ``beta(step)``, ``__call__(step)`` and ``to_dict()``), a built-in or your
    own.  The iteration and ``schedule.to_dict()`` are saved in ``state_dict``;
    ``load_state_dict`` restores the iteration and rebuilds a built-in schedule from its
    dict.  A schedule of your own cannot be rebuilt from a dict: the layer keeps its own
    schedule when its ``to_dict()`` equals the saved one, and refuses the checkpoint
    otherwise (construct the layer with the schedule the checkpoint was saved with).

    >>> import torch
    >>> import lsoftmax_core as lsm
    >>> from lsoftmax_core.adapters.torch import LSoftmaxLinear
    >>> layer = LSoftmaxLinear(4, 3, margin=2, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5))
    >>> logits = layer(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))  # training mode
    >>> layer.step(); layer.beta
    4.0
    >>> resumed = LSoftmaxLinear(4, 3, margin=2)
    >>> resumed.load_state_dict(layer.state_dict())
    <All keys matched successfully>
    >>> resumed.iteration, resumed.beta
    (1, 4.0)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        margin: int = 2,
        schedule: Schedule | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        sizes = {"in_features": in_features, "out_features": out_features}
        super().__init__(sizes, margin=margin, schedule=schedule, device=device, dtype=dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        if not self.training:
            return F.linear(x, self.weight)
        if target is None:
            raise ValueError(
                "target is required in training mode: call layer(x, target) with (N,) int64 class "
                "indices, or layer.eval() for plain logits"
            )
        return lsoftmax(x, self.weight, target, margin=self.margin, beta=self._beta_tensor)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"margin={self.margin}, schedule={self._schedule!r}"
        )


class LSoftmaxLoss(_AnnealedHead):
    """The L-Softmax loss with its class weights: ``loss(x, target)`` returns
    :func:`lsoftmax_cross_entropy` of the features ``x`` (N, in_features) against the
    module's ``weight`` (num_classes, in_features) at the current beta, never holding the
    (N, C) logits.  The same in training and eval mode (a loss; for predictions use
    :meth:`logits`).  CPU and CUDA, as :func:`lsoftmax_cross_entropy`.

    beta follows ``schedule`` exactly as in :class:`LSoftmaxLinear`: :meth:`step` once per
    optimizer step, ``iteration`` and ``beta``, both saved in ``state_dict`` with the
    schedule (and ``margin`` and ``normalize_weight``, which a checkpoint must match).

    ``normalize_weight=True`` is A-Softmax (SphereFace): the weight's rows are normalised
    (``F.normalize(weight, dim=1)``, differentiated by autograd) before the loss, so every
    class's logit is ``x·ŵ_j`` and only the angle separates the classes.  SphereFace anneals
    beta (its lambda) with ``lsoftmax_core.InverseSchedule(base=1000, gamma=0.12, power=1,
    beta_min=5)``.  ``reduction`` and ``ignore_index`` as for :func:`lsoftmax_cross_entropy`.

    >>> import torch
    >>> import lsoftmax_core as lsm
    >>> from lsoftmax_core.adapters.torch import LSoftmaxLoss
    >>> criterion = LSoftmaxLoss(4, 3, margin=4, normalize_weight=True,
    ...                          schedule=lsm.InverseSchedule(base=1000, gamma=0.12, power=1, beta_min=5))
    >>> loss = criterion(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]))
    >>> loss.backward(); criterion.weight.grad.shape
    torch.Size([3, 4])
    >>> criterion.step(); round(criterion.beta, 3)  # 1000 / (1 + 0.12)
    892.857
    """

    _noun = "loss"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        margin: int = 2,
        schedule: Schedule | None = None,
        normalize_weight: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(normalize_weight, bool):
            raise TypeError(f"normalize_weight={normalize_weight!r} must be a bool")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} must be one of {_REDUCTIONS}")
        sizes = {"in_features": in_features, "num_classes": num_classes}
        super().__init__(sizes, margin=margin, schedule=schedule, device=device, dtype=dtype)
        self.in_features, self.num_classes = int(in_features), int(num_classes)
        self.normalize_weight = normalize_weight
        self.reduction = reduction
        self.ignore_index = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)

    def _weight(self) -> Tensor:
        return F.normalize(self.weight, dim=1) if self.normalize_weight else self.weight

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return lsoftmax_cross_entropy(
            x, self._weight(), target, margin=self.margin, beta=self._beta_tensor,
            reduction=self.reduction, ignore_index=self.ignore_index,
        )  # fmt: skip

    def logits(self, x: Tensor) -> Tensor:
        """The plain logits ``x @ weight.T`` (normalised rows with ``normalize_weight``), for
        predictions: the margin only shapes training."""
        return F.linear(x, self._weight())

    def _config(self) -> dict[str, Any]:
        return {"margin": self.margin, "normalize_weight": self.normalize_weight}

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, margin={self.margin}, "
            f"normalize_weight={self.normalize_weight}, reduction={self.reduction!r}, "
            f"schedule={self._schedule!r}"
        )
