"""JAX adapter: ``lsoftmax(x, w, label, margin=, beta=)`` and the fused loss
``lsoftmax_cross_entropy(x, w, label, margin=, beta=, reduction=, ignore_index=)``, both
differentiable with ``jax.grad``.

L-Softmax logits and their cross-entropy (the maths: ``docs/derivatives.md``) as JAX
functions: the core's ``forward``/``backward`` (and ``cross_entropy``,
``cross_entropy_with_grad``, ``cross_entropy_backward``) run inside an XLA callback and
``jax.custom_vjp`` wires the backward into JAX's reverse mode.  This module adds no maths
of its own: it checks the arguments, hands XLA's buffers to the core and says which
backend runs them.  Both functions run on the CPU and on CUDA (the fused loss's CUDA path
is the core's CuPy cross-entropy, through the same callback as the logits; not yet
measured on a GPU).

Execution.  Both devices go through ``jax.experimental.buffer_callback``, which hands
the callback XLA's own buffers:

* CPU: the operands are wrapped as NumPy arrays without a copy (``Buffer.__array__``;
  the views are marked read-only, since XLA owns them) and the NumPy backend runs on
  them.  ``jax.pure_callback`` is not used because in JAX 0.10 it copies every operand
  before the callback sees it (the copy is measurable: the callback's pointer differs
  from ``Array.unsafe_buffer_pointer()``), whereas buffer_callback's views alias the
  operands (tested).
* CUDA: the operands are wrapped as CuPy arrays without a copy
  (``__cuda_array_interface__``) and the CuPy backend runs on XLA's compute stream,
  under ``jit`` and eagerly; nothing goes through the host.

The logits and their gradients are written straight into XLA's output buffers, never
copied: the core's ``forward``/``backward`` take them as ``out=``.  The fused loss's
results (a loss, O(N) values, and gradients the size of x and w) are copied into them
once (on CUDA a device copy on XLA's stream), since the core's cross-entropy allocates its
own; a 0-d loss is written into XLA's 0-d buffer.  Under differentiation the logits'
forward callback also returns the core's per-sample statistics (the uint32 words of a
(6, N) float64 array) as a residual, which the backward callback hands to
``core.backward(stats=)`` instead of computing them again (NumPy backend).  Other platforms (TPU, ROCm) are not
supported: buffer_callback does not lower on TPU, and the CUDA kernels are CUDA-only.
On CUDA, CuPy allocates the backend's temporaries and results from its own memory pool,
next to XLA's: if XLA preallocates most of the GPU (its default), set
``XLA_PYTHON_CLIENT_MEM_FRACTION`` lower or ``XLA_PYTHON_CLIENT_PREALLOCATE=false``.

Dtypes.  x and w are accepted in the dtypes of the backend that will run them
(``lsoftmax_core.checks.supported_dtypes``): float32 and float64 on the CPU; on CUDA also
float16, and bfloat16 where the installed CuPy computes in it.  The device is x's (or
w's) device when it is a concrete array, else (under ``jit``, or for NumPy inputs)
``jax.default_backend()``.  float64 needs ``jax_enable_x64``.

Errors.  Shapes, dtypes, margin and a Python beta are checked at the call (under ``jit``:
while tracing), with the core's messages.  Label values (and a traced beta) can only be
checked when the callback runs; JAX re-raises the core's error as
``jax.errors.JaxRuntimeError`` whose message ends with the core's
``ValueError: label must lie in [0, C) ...``; on CUDA the core checks them on the device
without synchronising, so the error comes from the next call on that device (of this
adapter or the core) or from ``lsoftmax_core.check_labels()``, and the computation with
the bad label completes (such a row gets no margin).  The core's call inside the callback repeats
its O(1) shape and dtype checks (they also catch a computation compiled for another
platform than the one checked at the call); the label values are scanned there once
(NumPy labels given to :func:`lsoftmax` are also scanned at the call, before JAX may
narrow int64 to int32).

beta is an operand, not a static argument: a new value (a schedule changing every step)
re-uses the compiled computation.  A Python number is checked at the call and reaches
the core exactly, as the float64 the core computes with (its 64 bits travel as two
uint32 words, so this holds without ``jax_enable_x64`` and for values beyond float32's
range).  A jax scalar (e.g. a traced argument of your jitted function) reaches the core
in its own dtype, unrounded, and is checked when the callback runs (ValueError naming
beta); note that without x64 JAX itself turns a Python float passed to a jitted function
into float32 (1e39 becomes inf), so pass such a beta with x64 enabled or directly to
:func:`lsoftmax`.  beta is treated as a constant: the gradient with respect to it is zero
(``stop_gradient``), as for a hyper-parameter.  On CUDA the callback reads beta from the
device, which waits for XLA's stream (an 8-byte copy) because the CuPy backend takes
beta as a host number.

vmap: each slice of the mapped axis is an independent L-Softmax problem (its own x, w,
label and beta), computed by one call of the core after the other (buffer_callback's
``vmap_method="sequential"``).  Samples that share w need no vmap: fold them into N
(``x.reshape(-1, D)``, ``label.reshape(-1)``), which is one call with the same result.

Not supported: forward-mode autodiff (``jax.jvp``) and second derivatives, since the
backward pass is itself a callback without a derivative rule.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

import lsoftmax_core as core
from lsoftmax_core.checks import (
    check_arrays,
    check_beta,
    check_integer,
    check_label_values,
    check_margin,
    supported_dtypes,
)

__all__ = ["class_parallel_cross_entropy", "lsoftmax", "lsoftmax_cross_entropy"]

# DLPack device types (dlpack.h), as reported by Buffer.__dlpack_device__().
_DL_CPU = 1
_DL_CUDA = 2

_Callback = Callable[..., None]
#: Static keyword arguments of a core call beyond margin and beta, as (name, value) pairs.
_Options = tuple[tuple[str, Any], ...]

_REDUCTIONS = ("mean", "sum", "none")


def lsoftmax(x: Any, w: Any, label: Any, *, margin: int = 2, beta: Any = 0.0) -> jax.Array:
    """L-Softmax logits (N, C) of ``x`` (N, D) against class weights ``w`` (C, D), see
    ``docs/derivatives.md``.

    ``label`` (N,) holds integers in [0, C).  x and w are jax or NumPy arrays of the same
    dtype, one the backend for their device computes in (see the module docstring).
    ``margin`` is a static Python int; ``beta`` a Python number (exact, checked now) or a
    scalar jax array (traced: no recompile for a new value).  Differentiable in x and w
    with ``jax.grad``/``jax.vjp``; works under ``jit`` and ``vmap``.  Labels outside
    [0, C) are an error naming label: a ValueError at the call for NumPy labels; for jax
    labels a ``jax.errors.JaxRuntimeError`` carrying the core's ValueError when the
    computation runs (JAX dispatches asynchronously: at the latest when the result is
    used); on CUDA, from the next call on that device or ``lsoftmax_core.check_labels()``
    (see the module docstring).

    >>> import numpy as np
    >>> from lsoftmax_core.adapters.jax import lsoftmax
    >>> x = np.array([[1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    >>> w = np.array([[1.0, 1.0], [1.0, -1.0]], dtype=np.float32)
    >>> np.asarray(lsoftmax(x, w, np.array([0, 1]), margin=1)).tolist()  # margin 1: x @ w.T
    [[1.0, 1.0], [2.0, -2.0]]
    >>> logits = np.asarray(lsoftmax(x, w, np.array([0, 1]), margin=2))
    >>> bool(logits[0, 0] < 1.0), bool(logits[1, 1] < -2.0), logits[0, 1].item()  # targets only
    (True, True, 1.0)
    """
    a = _prepare(x, w, label, margin, beta, _platform(x, w))
    return _lsoftmax(a.x, a.w, a.label, a.beta, a.margin, a.bits)  # type: ignore[no-any-return]


def lsoftmax_cross_entropy(
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int = 2,
    beta: Any = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
) -> jax.Array:
    """The L-Softmax cross-entropy of ``x`` (N, D) against class weights ``w`` (C, D): the
    log-softmax cross-entropy of :func:`lsoftmax`'s logits, computed by the core's fused
    ``lsoftmax_core.cross_entropy`` without forming the (N, C) logits (the maths:
    ``docs/derivatives.md``, "Cross-entropy").

    The arguments are :func:`lsoftmax`'s (``margin`` static, ``beta`` a Python number or a
    traced scalar: no recompile for a new value; no gradient to beta) and
    ``torch.nn.functional.cross_entropy``'s: ``reduction`` "mean" (over the rows whose label
    is not ``ignore_index``; 0 when every row is ignored), "sum" (both 0-d) or "none" (N,);
    labels lie in [0, C) or equal ``ignore_index`` (those rows get loss 0, no margin, no
    gradient).  Differentiable in x and w (``jax.grad``/``jax.vjp``, under ``jit`` and
    ``vmap``).  Without differentiation one pass computes the loss; under ``jax.grad`` with
    "mean"/"sum" that pass also forms the gradients, which the backward only scales (three
    GEMMs in all, no recomputation); with "none" the backward is a second pass that reuses
    the forward's per-row log-sum-exp.  Errors as for :func:`lsoftmax`.  CPU and CUDA: on
    CUDA the core's CuPy cross-entropy runs on XLA's stream, as :func:`lsoftmax` does (not
    yet measured on a GPU).

    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from lsoftmax_core.adapters.jax import lsoftmax, lsoftmax_cross_entropy
    >>> x = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=np.float32)
    >>> w = np.array([[1.0, 1.0], [1.0, -1.0]], dtype=np.float32)
    >>> y = np.array([0, 1, -100])  # the last row is ignored
    >>> loss = lsoftmax_cross_entropy(x, w, y, margin=3, beta=1.0)
    >>> logits = lsoftmax(x[:2], w, y[:2], margin=3, beta=1.0)
    >>> unfused = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y[:2]])
    >>> bool(jnp.allclose(loss, unfused))
    True
    >>> grad_w = jax.grad(lambda w: lsoftmax_cross_entropy(x, w, y, margin=3, beta=1.0))(jnp.asarray(w))
    >>> grad_w.shape
    (2, 2)
    """
    if not (isinstance(reduction, str) and reduction in _REDUCTIONS):
        raise ValueError(f"reduction={reduction!r} must be one of {_REDUCTIONS}")
    ignore = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
    a = _prepare(x, w, label, margin, beta, _platform(x, w), ignore)
    options = (("reduction", reduction), ("ignore_index", ignore))
    return _cross_entropy(a.x, a.w, a.label, a.beta, a.margin, a.bits, options)  # type: ignore[no-any-return]


class _Args(NamedTuple):
    """A checked call's operands as jax arrays, and its static margin and beta encoding."""

    x: jax.Array
    w: jax.Array
    label: jax.Array
    beta: jax.Array  # _beta_bits' words (bits=True) or the caller's jax scalar (bits=False)
    margin: int
    bits: bool


def _prepare(
    x: Any, w: Any, label: Any, margin: object, beta: Any, platform: str, ignore_index: int | None = None
) -> _Args:
    """Every check that needs no data from the device, then the operands as jax arrays.

    ``ignore_index`` (the loss's): label values equal to it are allowed."""
    m = check_margin(margin)
    beta_now = _check_concrete_beta(beta)
    for name, a in (("x", x), ("w", w), ("label", label)):
        if not isinstance(a, (jax.Array, np.ndarray)):
            raise TypeError(
                f"{name} must be a jax.Array or numpy.ndarray, got "
                f"{type(a).__module__}.{type(a).__qualname__}"
            )
    # Shapes and dtypes are known at trace time: the core's checks run here, so a bad
    # call fails at the call site (under jit: when tracing), before any callback runs.
    p = check_arrays(x, w, label, m, 0.0 if beta_now is None else beta_now, dtypes=_dtypes(platform))
    if isinstance(label, np.ndarray):
        # Host data: check now, before any narrowing to int32.
        if ignore_index is None:
            check_label_values(label, p.c)
        else:
            _check_labels_or_ignored(label, p.c, ignore_index)
    xj = _to_jax("x", x)
    wj = _to_jax("w", w)
    lj = _to_jax("label", label)
    if ignore_index is not None and lj.dtype != label.dtype and not _fits(ignore_index, lj.dtype):
        if np.any(label == ignore_index):  # narrowing would turn an ignored row into a class
            raise TypeError(
                f"label.dtype={label.dtype} with ignore_index={ignore_index} needs jax_enable_x64 "
                f"(JAX would convert label to {lj.dtype}, which cannot hold ignore_index)"
            )
    if beta_now is None:
        # A jax scalar in its own dtype, unrounded.  A hyper-parameter: no gradient flows to
        # it (the custom VJPs return none for it).
        return _Args(xj, wj, lj, jax.lax.stop_gradient(beta), m, False)
    return _Args(xj, wj, lj, _beta_bits(beta_now), m, True)


def _check_labels_or_ignored(label: np.ndarray[Any, Any], c: int, ignore_index: int) -> None:
    """Host labels must lie in [0, C) or equal ignore_index (the core's loss message)."""
    bad = (label != ignore_index) & ((label < 0) | (label >= c))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"label must lie in [0, C) = [0, {c}) or equal ignore_index={ignore_index}: label[{i}]={int(label[i])}"
        )


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
    kind: str, margin: int, bits: bool, options: Any, outs: Any, *operands: jax.Array,
    core_call: Callable[..., None] | None = None,
) -> Any:  # fmt: skip
    """The core's ``kind`` of call on ``operands`` (beta last) as one buffer callback whose
    results are ``outs`` (ShapeDtypeStructs); ``core_call`` as for :func:`_callback`."""
    call = buffer_callback(_callback(kind, margin, bits, options, core_call), outs, vmap_method="sequential")
    return call(*operands)


# margin and bits (whether beta is _beta_bits' words) are static.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lsoftmax(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: int, bits: bool
) -> jax.Array:
    return _forward_call(x, w, label, beta, margin, bits)


def _forward_call(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: int, bits: bool
) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype)
    return _call("forward", margin, bits, (), out, x, w, label, beta)  # type: ignore[no-any-return]


def _stats_struct(x: jax.Array) -> jax.ShapeDtypeStruct:
    """The core's (6, N) float64 per-sample statistics as the uint32 words of their bits
    (exact without x64), the residual the forward hands to the backward."""
    return jax.ShapeDtypeStruct((6, x.shape[0], 2), jnp.uint32)


def _lsoftmax_fwd(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: int, bits: bool
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    # Under differentiation the forward also returns the per-sample statistics (norms,
    # cosine, psi, psi'), which the backward then does not compute again.
    outs = (jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype), _stats_struct(x))
    logits, stats_bits = _call("forward_stats", margin, bits, (), outs, x, w, label, beta)
    return logits, (x, w, label, beta, stats_bits)


def _lsoftmax_bwd(
    margin: int, bits: bool, res: tuple[jax.Array, ...], grad_logits: jax.Array
) -> tuple[Any, ...]:
    x, w, label, beta, stats_bits = res
    outs = (_shape_dtype(x), _shape_dtype(w))
    grad_x, grad_w = _call("backward_stats", margin, bits, (), outs, grad_logits, x, w, label, stats_bits, beta)
    # No cotangent for the integer labels nor for beta (a constant, see lsoftmax).
    return grad_x, grad_w, None, None


_lsoftmax.defvjp(_lsoftmax_fwd, _lsoftmax_bwd)


def _loss_struct(x: jax.Array, options: _Options) -> jax.ShapeDtypeStruct:
    shape = (x.shape[0],) if dict(options)["reduction"] == "none" else ()
    return jax.ShapeDtypeStruct(shape, x.dtype)


# margin, bits and options (reduction, ignore_index) are static.  Without differentiation
# JAX calls this primal, which computes the loss alone.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _cross_entropy(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: int, bits: bool, options: _Options
) -> jax.Array:
    return _call("loss", margin, bits, options, _loss_struct(x, options), x, w, label, beta)  # type: ignore[no-any-return]


def _cross_entropy_fwd(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: int, bits: bool, options: _Options
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    loss = _loss_struct(x, options)
    if loss.shape:
        # "none": a per-row cotangent comes back, so keep each row's log-sum-exp (float64,
        # as the two uint32 words of its bits: exact without x64) for the backward call.
        lse = jax.ShapeDtypeStruct((x.shape[0], 2), jnp.uint32)
        out, lse_bits = _call("loss_lse", margin, bits, options, (loss, lse), x, w, label, beta)
        return out, (x, w, label, beta, lse_bits)
    # "mean"/"sum": the cotangent is a scalar, so the gradients of the loss itself are the
    # residuals, computed in the same pass as the loss.
    grads = (_shape_dtype(x), _shape_dtype(w))
    out, grad_x, grad_w = _call("loss_with_grad", margin, bits, options, (loss, *grads), x, w, label, beta)
    return out, (grad_x, grad_w)


def _cross_entropy_bwd(
    margin: int, bits: bool, options: _Options, res: tuple[jax.Array, ...], grad_loss: jax.Array
) -> tuple[Any, ...]:
    if len(res) == 2:
        grad_x, grad_w = (grad_loss * g for g in res)
    else:
        x, w, label, beta, lse_bits = res
        outs = (_shape_dtype(x), _shape_dtype(w))
        grad_x, grad_w = _call(
            "loss_backward", margin, bits, options, outs, grad_loss, x, w, label, lse_bits, beta
        )
    return grad_x, grad_w, None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@functools.cache
def _callback(
    kind: str, margin: int, bits: bool, options: Any, core_call: Callable[..., None] | None = None
) -> _Callback:
    """One callback object per (kind, margin, bits, options, core_call): JAX caches compiled
    calls by its identity.  ``options``: further static keywords of the core's call;
    ``core_call``: what runs on the device's views (default :func:`_core_call`; the
    class-parallel loss passes its own, with its own ``options``)."""

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


def _core_call(
    kind: str, margin: int, options: _Options, outs: tuple[Any, ...], arrays: list[Any], beta: float, xp: Any
) -> None:
    """The core's ``kind`` of call, its results in ``outs`` (XLA's result buffers, views of
    the array module ``xp``: NumPy or CuPy): written there by forward/backward (``out=``),
    copied there from the fused loss's own arrays (the float64 lse as its uint32 words)."""
    kw: dict[str, Any] = dict(options, margin=margin, beta=beta)
    if kind == "forward":
        core.forward(*arrays, out=outs[0], **kw)
        return
    if kind == "backward":
        core.backward(*arrays, out=(outs[0], outs[1]), **kw)
        return
    if kind == "forward_stats":
        _, stats = core.forward(*arrays, out=outs[0], return_stats=True, **kw)
        if stats is not None:  # NumPy: the (6, N) float64 statistics as their uint32 words
            outs[1].view(np.float64).reshape(stats.shape)[...] = stats
        return  # CuPy computes none: the buffer is left unread (backward_stats ignores it there)
    if kind == "backward_stats":
        *args, stats_bits = arrays
        stats = stats_bits.view(np.float64).reshape(stats_bits.shape[:2]) if xp is np else None
        core.backward(*args, out=(outs[0], outs[1]), stats=stats, **kw)
        return
    results: tuple[Any, ...]
    if kind == "loss":
        results = (core.cross_entropy(*arrays, **kw),)
    elif kind == "loss_with_grad":
        results = core.cross_entropy_with_grad(*arrays, **kw)
    elif kind == "loss_lse":
        loss, lse = core.cross_entropy(*arrays, return_lse=True, **kw)
        results = (loss, xp.ascontiguousarray(lse, dtype=np.float64).view(np.uint32).reshape(-1, 2))
    else:  # "loss_backward"
        *args, lse_bits = arrays
        results = core.cross_entropy_backward(*args, lse=lse_bits.view(np.float64).reshape(-1), **kw)
    for o, r in zip(outs, results):
        _copy_into(o, r, xp)


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
    kind: str, margin: int, bits: bool, options: Any, outs: tuple[Any, ...], operands: tuple[Any, ...],
    core_call: Callable[..., None] | None = None,
) -> None:  # fmt: skip
    core_call = _core_call if core_call is None else core_call
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
    margin: int,
    bits: bool,
    options: Any,
    ctx: Any,
    device_id: int,
    outs: tuple[Any, ...],
    operands: tuple[Any, ...],
    core_call: Callable[..., None] | None = None,
) -> None:
    """The CUDA route: CuPy views of XLA's buffers, ``core_call`` (as for :func:`_callback`)
    on XLA's stream."""
    import cupy

    core_call = _core_call if core_call is None else core_call
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


# The class-parallel loss for jax.shard_map lives in its own module, which reads this
# module's helpers at call time; re-exported here as part of the JAX adapter's API.
from lsoftmax_core.adapters.jax_parallel import class_parallel_cross_entropy  # noqa: E402
