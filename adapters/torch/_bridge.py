"""The bridge between torch tensors and the core's arrays, and the argument checks that
only a framework can make (tensors, devices, autograd, beta as a tensor).

CPU tensors reach the NumPy backend as read-only NumPy views (no copy); CUDA
tensors reach the CuPy backend as CuPy views on PyTorch's current stream, with every
array the backend allocates drawn from PyTorch's caching allocator.
"""

from __future__ import annotations

import dataclasses
import functools
from contextlib import ExitStack, nullcontext
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from torch import Tensor

from lsoftmax_core.checks import check_beta, check_integer, check_margin, split_margin
from lsoftmax_core.margins import ArcFace, CombinedMargin, CosFace, Margin, SphereFace, margin_from_dict

#: A resolved ``margin=``: L-Softmax's m as an int, or the object of a kind that normalises.
Resolved = Union[int, Margin]


def _resolve_margin(margin: object) -> Resolved:
    """``margin=`` as the adapter passes it to the core: an int (or ``LSoftmax(m)``, the same
    path bit for bit) becomes L-Softmax's checked int m; SphereFace, CosFace, ArcFace and
    CombinedMargin stay the (already checked) objects; anything else is the core's
    TypeError/ValueError naming margin."""
    if type(margin) is int:  # the common case, as cheap as before
        return check_margin(margin)
    m, family = split_margin(margin)
    return check_margin(m) if family is None else family  # type: ignore[no-any-return]


def _check_subcenters(subcenters: object, margin: Resolved) -> int:
    """The fused losses' ``subcenters`` k, checked as the core's ``LossOptions`` checks it
    (its errors name subcenters): an integer in [1, 1024], and k > 1 only for a margin kind
    that normalises the weights (an int margin, L-Softmax, with k > 1 is a ValueError).
    Plain code that Dynamo traces (a compiled graph specialises on k, a Python int)."""
    if type(subcenters) is int and subcenters == 1:
        return 1  # the common case, as cheap as before
    k = check_integer("subcenters", subcenters, 1, 1024)
    if k > 1 and not isinstance(margin, Margin):
        raise ValueError(
            f"subcenters={k} needs a margin kind that normalises the weights (SphereFace, CosFace, ArcFace, "
            f"CombinedMargin), whose class cosine is the largest of its centres'; got margin={margin!r} (L-Softmax)"
        )
    return k


#: How the custom operators carry a margin: ``(margin, kind, params)``, see :func:`_margin_schema`.
Schema = tuple[int, str, Optional[list[float]]]

# The parameters the operators carry as ``params`` for each kind that normalises, in order
# (SphereFace's integer m travels as ``margin``, as L-Softmax's does).
_REAL_PARAMS: dict[str, tuple[str, ...]] = {
    "sphereface": (),
    **{cls.kind: tuple(f.name for f in dataclasses.fields(cls)) for cls in (CosFace, ArcFace, CombinedMargin)},
}


def _margin_schema(margin: Resolved) -> Schema:
    """The operators' arguments for a resolved margin: ``(m, "", None)`` for L-Softmax,
    ``(m, "sphereface", None)`` for SphereFace, ``(1, kind, [its real parameters])`` for the
    cosine kinds (``[m, s]``, or ``[m1, m2, m3, s]``).  Plain attribute reads that Dynamo
    traces, so that a margin made inside a compiled function is read as it is; a compiled
    graph specialises on them (the margin does not anneal; beta, a tensor, does)."""
    if not isinstance(margin, Margin):
        return margin, "", None
    if isinstance(margin, SphereFace):
        return margin.m, margin.kind, None
    return 1, margin.kind, [float(getattr(margin, name)) for name in _REAL_PARAMS[margin.kind]]


def _margin_args(margin: object) -> Schema:
    """The operators' ``(margin, kind, params)`` for a user's ``margin=`` (checked)."""
    return _margin_schema(_resolve_margin(margin))


def _margin_of_schema(margin: int, kind: str, params: Optional[list[float]]) -> Resolved:  # noqa: UP045
    """The inverse of :func:`_margin_schema`, in the operators' implementations (the core
    checks an int margin; a kind is rebuilt and checked by ``margin_from_dict``)."""
    if not kind and params is None:
        return margin
    return _rebuilt(margin, kind, None if params is None else tuple(params))


@functools.lru_cache(maxsize=64)
def _rebuilt(margin: int, kind: str, params: Optional[tuple[float, ...]]) -> Resolved:  # noqa: UP045
    names = _REAL_PARAMS.get(kind)
    multiplicative = kind == "sphereface"
    if names is None or len(params or ()) != len(names) or (margin != 1 and not multiplicative):
        raise ValueError(
            f"margin={margin!r}, kind={kind!r}, params={None if params is None else list(params)!r}: the operators "
            "take L-Softmax as (m, '', None), SphereFace as (m, 'sphereface', None) and the cosine kinds as "
            "(1, kind, their real parameters)"
        )
    data = {"kind": kind, **({"m": margin} if multiplicative else dict(zip(names, params or ())))}
    return margin_from_dict(data)  # checked; a resolved margin of a kind that normalises


def _as_numpy(name: str, t: Tensor) -> np.ndarray:
    """A read-only NumPy view of a CPU tensor's memory (no copy).  ``Tensor.numpy`` rather
    than DLPack: a third of the cost per call (the Python side of ``__dlpack__``), and the
    view is marked read-only here (NumPy's DLPack import leaves it writeable)."""
    try:
        a = (t.detach() if t.requires_grad else t).numpy()  # detach only where numpy() needs it
    except (TypeError, RuntimeError) as e:  # e.g. bfloat16, which NumPy lacks
        raise TypeError(f"{name}.dtype={t.dtype} cannot be passed to the CPU backend: {e}") from None
    a.flags.writeable = False
    return a


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


def _cpu_views(**named: Tensor) -> list[np.ndarray]:
    """Read-only NumPy views of CPU tensors (no copy)."""
    return [_as_numpy(name, t) for name, t in named.items()]


def _check_same_dtype(x: Tensor, weight: Tensor) -> None:
    """x and weight in one dtype, named as the user knows them (the core says x and w)."""
    if x.dtype != weight.dtype:
        raise TypeError(
            f"x and weight must have the same dtype: x.dtype={x.dtype}, weight.dtype={weight.dtype} "
            "(no silent promotion; under torch.autocast float16/bfloat16 inputs are computed in float32)"
        ) from None


class _DtypeErrorsNameWeight:
    """A context in which the core's checks keep their order (shapes first), and a dtype
    error caused by x and weight differing is reported with the adapter's names.  A class
    rather than a generator context manager: this one is entered on every call."""

    __slots__ = ("_x", "_weight")

    def __init__(self, x: Tensor, weight: Tensor) -> None:
        self._x, self._weight = x, weight

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: Any) -> None:
        # Raises the adapter's error if x and weight differ; the exception propagates otherwise.
        if kind is not None and issubclass(kind, TypeError):
            _check_same_dtype(self._x, self._weight)


def _no_autocast(device_type: str) -> Any:
    """The operators' own GEMMs run in the inputs' dtype, whatever autocast is doing."""
    if not torch.is_autocast_enabled(device_type):
        return nullcontext()  # nothing to turn off (and cheaper than a disabled autocast)
    return torch.autocast(device_type, enabled=False)


def _check_tensors(**named: Any) -> None:
    """Framework-level problems the core cannot see: non-tensors, devices, autograd.
    ``named``: x, weight, then the labels (label or target)."""
    x, weight, labels = named.values()
    if (
        isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(labels, Tensor)
        and x.layout is weight.layout is labels.layout is torch.strided
        and not labels.requires_grad
        and ((x.is_cpu and weight.is_cpu and labels.is_cpu)
             or (x.is_cuda and weight.is_cuda and labels.is_cuda and x.get_device() == weight.get_device()
                 == labels.get_device()))
    ):  # fmt: skip
        return  # the common case, decided at once; the checks below name any problem
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


def _autocast_cast(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """What the operators' autocast rule does, for the eager paths: under autocast on the
    inputs' device, floating inputs other than float64 become float32 (differentiably)."""
    device = "cpu" if x.is_cpu else x.device.type
    if not torch.is_autocast_enabled(device):
        return x, weight
    return tuple(  # type: ignore[return-value]
        t.to(torch.float32) if t.device.type == device and t.dtype in (torch.float16, torch.bfloat16) else t
        for t in (x, weight)
    )


def _dispatch_mode() -> Any:
    """The active torch dispatch mode (make_fx's proxy mode, a fake-tensor mode), else None."""
    if _dispatch_stack_len is not None and not _dispatch_stack_len():
        return None  # no mode: the common case, without the Python lookup below
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode()


# The depth of torch's dispatch-mode stack (what _get_current_dispatch_mode reads first).
_dispatch_stack_len: Callable[[], int] | None = getattr(torch._C, "_len_torch_dispatch_stack", None)


def _beta_float(beta: object) -> float:
    """beta as a Python float for the eager paths: a number is checked now; a tensor is read
    (the core checks its value before anything is computed)."""
    if isinstance(beta, Tensor):
        return float(_beta_tensor(beta))
    return check_beta(beta)
