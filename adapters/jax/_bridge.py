"""The JAX adapter's plumbing, shared by its layer, its fused loss and its class-parallel
loss (no maths here): the checks that need no data from the device, the operands as jax
arrays, beta's encoding, and the buffer callback that hands XLA's buffers to the core.

A call of the core is one ``jax.experimental.buffer_callback``: :func:`_call` names the
kind of call and the function that runs it (a ``CoreCall`` of ``layer``, ``loss`` or
``parallel``), and :func:`_callback` builds the callback that wraps XLA's operands and
results as NumPy views (CPU, zero copy) or CuPy views on XLA's stream (CUDA) and runs it;
the package docstring says how.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

from lsoftmax_core import LossOptions
from lsoftmax_core.checks import (
    REDUCTIONS,
    check_arrays,
    check_beta,
    check_integer,
    check_label_values,
    check_margin,
    split_margin,
    supported_dtypes,
)

if TYPE_CHECKING:
    from lsoftmax_core.margins import Margin

# DLPack device types (dlpack.h), as reported by Buffer.__dlpack_device__().
_DL_CPU = 1
_DL_CUDA = 2

_Callback = Callable[..., None]
#: A resolved margin (:func:`_resolve_margin`): L-Softmax's int m, or the margin object of a
#: kind that normalises.  Static under ``jit``: both are hashable and compare by value.
StaticMargin = Union[int, "Margin"]
#: ``core_call(kind, margin, options, outs, arrays, beta, xp)``: runs the core inside a callback.
CoreCall = Callable[[str, StaticMargin, Any, tuple[Any, ...], list[Any], float, Any], None]


def _resolve_margin(margin: object) -> StaticMargin:
    """``margin`` as the static argument of the adapter's calls: an int m for L-Softmax (an
    int, or ``LSoftmax(m)``: the same path, bits and compiled computation), else the margin
    object (SphereFace, CosFace, ArcFace, CombinedMargin), which the core takes as it is.  A
    bad value is the core's TypeError or ValueError naming margin."""
    m, family = split_margin(margin)
    return check_margin(m) if family is None else family


def _has_stats(margin: StaticMargin) -> bool:
    """Whether the core's forward returns per-sample statistics for ``margin`` (L-Softmax's
    int m, NumPy backend); the kinds that normalise return None."""
    return isinstance(margin, int)


def _check_subcenters(subcenters: object, margin: StaticMargin) -> int:
    """The fused losses' ``subcenters`` k, checked as the core checks it (its errors name
    subcenters): an integer in [1, 1024], and k > 1 only for a margin kind that normalises
    the weights (an int margin with k > 1 is the core's ValueError)."""
    return LossOptions(margin=margin, subcenters=subcenters).subcenters  # type: ignore[arg-type]


def _check_subcenter_rows(subcenters: int, name: str, w: Any) -> int:
    """The classes of ``w``'s rows: k centres per class (``subcenters``), class j's being
    rows j·k ... j·k + k - 1; rows that k does not divide are a ValueError naming
    subcenters and the shape."""
    rows = int(w.shape[0])
    if rows % subcenters:
        raise ValueError(
            f"subcenters={subcenters} must divide {name}'s rows: {name}.shape={tuple(w.shape)} "
            "(C·subcenters rows, class j's centres rows j·subcenters ... j·subcenters + subcenters - 1)"
        )
    return rows // subcenters


def _check_loss_options(reduction: object, ignore_index: object) -> tuple[str, int]:
    """The fused losses' ``reduction`` and ``ignore_index``, checked (errors name them)."""
    if not (isinstance(reduction, str) and reduction in REDUCTIONS):
        raise ValueError(f"reduction={reduction!r} must be one of {REDUCTIONS}")
    return reduction, check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)


class _Args(NamedTuple):
    """A checked call's operands as jax arrays, and its static margin and beta encoding."""

    x: jax.Array
    w: jax.Array
    label: jax.Array
    beta: jax.Array  # _beta_bits' words (bits=True) or the caller's jax scalar (bits=False)
    bits: bool
    margin: StaticMargin


def _prepare(
    x: Any, w: Any, label: Any, margin: object, beta: Any, platform: str, ignore_index: int | None = None,
    subcenters: object = 1,
) -> _Args:  # fmt: skip
    """Every check that needs no data from the device, then the operands as jax arrays.

    ``ignore_index`` (the loss's): label values equal to it are allowed.  ``subcenters``
    (the loss's k): w holds k rows per class, and labels count classes."""
    m = _resolve_margin(margin)
    sub = 1 if subcenters == 1 and type(subcenters) is int else _check_subcenters(subcenters, m)
    beta_now = _check_concrete_beta(beta)
    for name, a in (("x", x), ("w", w), ("label", label)):
        if not isinstance(a, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name} must be a jax.Array or numpy.ndarray, got "
                f"{type(a).__module__}.{type(a).__qualname__}"
            )
    # Shapes and dtypes are known at trace time: the core's checks run here, so a bad
    # call fails at the call site (under jit: when tracing), before any callback runs.
    check_arrays(x, w, label, m, 0.0 if beta_now is None else beta_now, dtypes=_dtypes(platform))
    classes = _check_subcenter_rows(sub, "w", w)
    if isinstance(label, np.ndarray):
        # Host data: check now, before any narrowing to int32 (the core's message).
        check_label_values(label, classes, ignore_index)
    xj = _to_jax("x", x)
    wj = _to_jax("w", w)
    lj = _to_jax("label", label)
    if ignore_index is not None and lj.dtype != label.dtype and not _fits(ignore_index, lj.dtype):
        if np.any(label == ignore_index):  # narrowing would turn an ignored row into a class
            raise TypeError(
                f"label.dtype={label.dtype} with ignore_index={ignore_index} needs jax_enable_x64 "
                f"(JAX would convert label to {lj.dtype}, which cannot hold ignore_index)"
            )
    return _Args(xj, wj, lj, *_beta_operand(beta, beta_now), m)


def _fits(value: int, dtype: Any) -> bool:
    info = np.iinfo(dtype)
    return int(info.min) <= value <= int(info.max)


def _platform(x: Any, w: Any) -> str:
    """The platform that will run: the device of x or w when concrete, else JAX's default
    backend (under ``jit``, or for NumPy inputs)."""
    for a in (x, w):
        if isinstance(a, jax.Array) and not isinstance(a, jax.core.Tracer):
            return str(next(iter(a.devices())).platform)
    return jax.default_backend()


def _dtypes(platform: str) -> tuple[np.dtype[Any], ...]:
    """The dtypes of the backend that will run: the CuPy backend's on a CUDA device, else
    the NumPy backend's."""
    if platform not in ("gpu", "cuda"):
        return supported_dtypes("numpy")
    try:
        return supported_dtypes("cupy")
    except ImportError as e:
        raise ImportError(
            f"lsoftmax_core.adapters.jax runs CUDA arrays with the CuPy backend, which needs CuPy: {e}"
        ) from e


def _check_concrete_beta(beta: Any) -> float | None:
    """beta as a float if it is a Python/NumPy number (checked now), else None (a jax
    scalar, checked by the core when the callback runs)."""
    if isinstance(beta, jax.Array):
        if beta.ndim != 0 or beta.dtype.kind not in "fiu":
            raise TypeError(
                f"beta must be a real scalar, got a jax array of shape {tuple(beta.shape)} "
                f"and dtype {beta.dtype}"
            )
        return None
    return check_beta(beta)


def _beta_operand(beta: Any, beta_now: float | None) -> tuple[jax.Array, bool]:
    """beta as the callbacks' operand and whether it is :func:`_beta_bits`' words:
    ``beta_now`` (:func:`_check_concrete_beta`'s float) exactly, else the caller's jax scalar
    in its own dtype, unrounded.  beta is a hyper-parameter: no gradient flows to it (the
    custom VJPs return none for it)."""
    if beta_now is None:
        return jax.lax.stop_gradient(beta), False
    return _beta_bits(beta_now), True


def _beta_bits(beta: float) -> jax.Array:
    """The 64 bits of the float64 ``beta`` as two uint32 words (any value, without x64)."""
    return jnp.asarray(np.array([beta], dtype=np.float64).view(np.uint32))


def _beta_value(a: np.ndarray[Any, Any], bits: bool) -> float:
    """beta on the host, from :func:`_beta_bits`' words or from a scalar array."""
    return float(a.view(np.float64)[0]) if bits else float(a)


def _to_jax(name: str, a: Any) -> jax.Array:
    if isinstance(a, jax.Array):
        return a
    out = jnp.asarray(a)
    if out.dtype != a.dtype and a.dtype.kind == "f":
        # Without x64 JAX would silently round a float64 array to float32.
        raise TypeError(
            f"{name}.dtype={a.dtype} needs jax_enable_x64 (JAX would silently convert it to "
            f"{out.dtype}); enable x64 or pass {name}.astype(numpy.float32)"
        )
    # Integer labels may be narrowed (int64 -> int32 without x64): they were range-checked
    # against [0, C) first, so the values survive.
    return out


def _shape_dtype(a: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _call(
    kind: str, margin: StaticMargin, bits: bool, options: Any, outs: Any, *operands: jax.Array, core_call: CoreCall
) -> Any:
    """The ``kind`` of call of ``core_call`` on ``operands`` (beta last) as one buffer callback
    whose results are ``outs`` (ShapeDtypeStructs); see :func:`_callback`."""
    call = buffer_callback(_callback(kind, margin, bits, options, core_call), outs, vmap_method="sequential")
    return call(*operands)


@functools.cache
def _callback(kind: str, margin: StaticMargin, bits: bool, options: Any, core_call: CoreCall) -> _Callback:
    """One callback object per (kind, margin, bits, options, core_call): JAX caches compiled
    calls by its identity.  ``core_call(kind, margin, options, outs, arrays, beta, xp)`` runs
    the core on the device's views: ``outs`` XLA's result buffers to fill, ``arrays`` the
    operands but beta, ``beta`` a host float, ``xp`` the array module (NumPy or CuPy).
    ``options``: further static arguments, which only ``core_call`` reads."""

    def callback(ctx: Any, out: Any, *operands: Any) -> None:
        outs = out if isinstance(out, tuple) else (out,)
        device_type, device_id = operands[0].__dlpack_device__()
        if device_type == _DL_CPU:
            _run_numpy(kind, margin, bits, options, outs, operands, core_call)
        elif device_type == _DL_CUDA:
            _run_cupy(kind, margin, bits, options, ctx, int(device_id), outs, operands, core_call)
        else:
            raise NotImplementedError(
                f"lsoftmax_core.adapters.jax runs on CPU and CUDA devices only, not on DLPack "
                f"device type {device_type}"
            )

    return callback


def _copy_into(out: Any, result: Any, xp: Any) -> None:
    """``out[...] = result``; on CUDA, when both are C-contiguous of one shape and dtype (the
    core's results are), a device-to-device copy on the current stream (XLA's), which also
    serves dtypes whose CuPy copy kernels need CUDA's headers (bfloat16)."""
    same = xp is not np and out.dtype == result.dtype and out.shape == result.shape
    if same and out.flags.c_contiguous and result.flags.c_contiguous:
        if result.nbytes:
            out.data.copy_from_device_async(result.data, result.nbytes)
        return
    out[...] = result


def _host_view(buf: Any) -> np.ndarray[Any, Any]:
    a = np.asarray(buf)  # aliases XLA's buffer (no copy)
    a.flags.writeable = False  # XLA owns operands: any write would corrupt its values
    return a


def _run_numpy(
    kind: str, margin: StaticMargin, bits: bool, options: Any, outs: tuple[Any, ...], operands: tuple[Any, ...],
    core_call: CoreCall,
) -> None:  # fmt: skip
    *arrays, beta = (_host_view(b) for b in operands)
    # The result buffers are XLA's, handed to us to fill: writeable views, no copy.
    core_call(kind, margin, options, tuple(np.asarray(b) for b in outs), arrays, _beta_value(beta, bits), np)


class _XlaStream:
    """XLA's stream handle, exposed through the CUDA stream protocol for CuPy."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.ptr)


def _stream_ptr(ctx: Any) -> int:
    s = ctx.stream  # a property in jax 0.10, a method in earlier releases
    return int(s() if callable(s) else s)


def _device_view(cupy: Any, buf: Any) -> Any:
    if 0 in tuple(buf.shape):
        # An empty buffer may have a null pointer, which CuPy cannot look up.
        return cupy.empty(tuple(buf.shape), dtype=buf.dtype)
    # __cuda_array_interface__ v2 (no stream field): a view, no copy and no synchronisation.
    a = cupy.asarray(buf)
    if a.dtype != buf.dtype:
        # bfloat16 has no array-interface type string of its own (it travels as 2-byte
        # void): reinterpret the same memory in the buffer's dtype.
        a = a.view(buf.dtype)
    return a


def _run_cupy(
    kind: str,
    margin: StaticMargin,
    bits: bool,
    options: Any,
    ctx: Any,
    device_id: int,
    outs: tuple[Any, ...],
    operands: tuple[Any, ...],
    core_call: CoreCall,
) -> None:
    """The CUDA route: CuPy views of XLA's buffers, ``core_call`` (as for :func:`_callback`)
    on XLA's stream."""
    import cupy

    with cupy.cuda.Device(device_id):
        ptr = _stream_ptr(ctx)
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14
            stream = cupy.cuda.Stream.from_external(_XlaStream(ptr))
        else:
            stream = cupy.cuda.ExternalStream(ptr, device_id)
        # Every kernel, copy and cuBLAS call of the CuPy backend goes on XLA's stream, so it
        # is ordered after the producers of the operands and before their consumers.
        with stream:
            *arrays, beta_dev = (_device_view(cupy, b) for b in operands)
            beta = _beta_value(beta_dev.get(), bits)  # waits for the stream: the backend wants a host float
            core_call(kind, margin, options, tuple(_device_view(cupy, b) for b in outs), arrays, beta, cupy)
