"""PyTorch adapter: ``lsoftmax`` (a differentiable function) and ``LSoftmaxLinear`` (a layer).

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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lsoftmax_core as _core
from lsoftmax_core.checks import check_beta, check_integer, check_margin
from lsoftmax_core.schedule import ConstantSchedule, Schedule, check_schedule, schedule_from_dict

__all__ = ["LSoftmaxLinear", "lsoftmax"]


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
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name}.device={d}" for name, d in devices.items())
        raise ValueError(f"x, weight and label must be on the same device: {listed}")
    label = named["label"]
    if label.requires_grad:
        raise ValueError("label must not require grad (it holds class indices)")


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


# --------------------------------------------------------------------------- layer


class LSoftmaxLinear(nn.Module):
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
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.margin = check_margin(margin)
        self.weight = nn.Parameter(
            torch.empty((self.out_features, self.in_features), device=device, dtype=dtype)
        )
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
        self._check_beta_at(schedule, self._iteration)  # before the layer changes
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

    def forward(self, x: Tensor, target: Tensor | None = None) -> Tensor:
        if not self.training:
            return F.linear(x, self.weight)
        if target is None:
            raise ValueError(
                "target is required in training mode: call layer(x, target) with (N,) int64 class "
                "indices, or layer.eval() for plain logits"
            )
        return lsoftmax(x, self.weight, target, margin=self.margin, beta=self._beta_tensor)

    def get_extra_state(self) -> dict[str, Any]:
        return {"margin": self.margin, "iteration": self._iteration, "schedule": self._schedule.to_dict()}

    def set_extra_state(self, state: Any) -> None:
        if not isinstance(state, dict) or not {"iteration", "schedule"} <= set(state):
            raise ValueError(
                f"LSoftmaxLinear extra state must be a dict with 'iteration' and 'schedule', got {state!r}"
            )
        margin = state.get("margin", self.margin)
        if margin != self.margin:
            raise ValueError(f"checkpoint has margin={margin!r} but this layer has margin={self.margin}")
        saved = state["schedule"]
        own = self._schedule.to_dict()
        if saved == own:
            schedule = self._schedule  # also the one way to restore a schedule of the user's own
        else:
            try:
                schedule = schedule_from_dict(dict(saved))
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"checkpoint has schedule {saved!r}, which cannot be rebuilt ({e}), and this layer's "
                    f"schedule.to_dict() is {own!r}: construct the layer with the schedule the checkpoint "
                    "was saved with, then load_state_dict"
                ) from None
        iteration = check_integer("iteration", state["iteration"], 0)
        self._check_beta_at(schedule, iteration)  # nothing changes on an error
        self._iteration = iteration
        self.schedule = schedule

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"margin={self.margin}, schedule={self._schedule!r}"
        )
