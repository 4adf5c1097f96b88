"""The margin layer's logits as a JAX function: :func:`lsoftmax`, whose ``jax.custom_vjp``
runs the core's ``forward`` and ``backward`` in buffer callbacks (the rules: the package
docstring).

The logits and their gradients are written straight into XLA's output buffers (the core's
``out=``).  For L-Softmax (an int margin) under differentiation the forward callback also
returns the core's per-sample statistics (the uint32 words of a (STATS_ROWS, N) float64
array) as a residual, which the backward callback hands to ``core.backward(stats=)``
instead of computing them again (NumPy backend; the CuPy backend computes none and the
residual goes unread).  The kinds that normalise (SphereFace, CosFace, ArcFace,
CombinedMargin) have no such statistics (the core's forward returns None): their forward
under differentiation is the plain forward call, no residual is kept for them, and the
backward calls the core with ``stats=None``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

import lsoftmax_core as core

from ._bridge import StaticMargin, _call, _has_stats, _platform, _prepare, _shape_dtype

if TYPE_CHECKING:
    from lsoftmax_core.margins import Margin

__all__ = ["lsoftmax"]


def lsoftmax(x: Any, w: Any, label: Any, *, margin: int | Margin = 2, beta: Any = 0.0) -> jax.Array:
    """L-Softmax logits (N, C) of ``x`` (N, D) against class weights ``w`` (C, D), see
    ``docs/derivatives.md``, or those of another margin kind.

    ``label`` (N,) holds integers in [0, C).  x and w are jax or NumPy arrays of the same
    dtype, one the backend for their device computes in (see the package docstring).
    ``margin`` is static: a Python int m (L-Softmax's; ``LSoftmax(m)`` is the same) or a
    margin object (``lsoftmax_core.SphereFace``, ``CosFace``, ``ArcFace``,
    ``CombinedMargin``: that kind's logits, as the core's ``forward``; docs/derivatives.md,
    "The margin family"); ``beta`` a Python number (exact, checked now) or a
    scalar jax array (traced: no recompile for a new value).  Differentiable in x and w
    with ``jax.grad``/``jax.vjp``; works under ``jit`` and ``vmap``.  Labels outside
    [0, C) are an error naming label: a ValueError at the call for NumPy labels; for jax
    labels a ``jax.errors.JaxRuntimeError`` carrying the core's ValueError when the
    computation runs (JAX dispatches asynchronously: at the latest when the result is
    used); on CUDA, from the next call on that device or ``lsoftmax_core.check_labels()``
    (see the package docstring).

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



# margin and bits (whether beta is _beta_bits' words) are static.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lsoftmax(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: StaticMargin, bits: bool
) -> jax.Array:
    return _forward_call(x, w, label, beta, margin, bits)


def _forward_call(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: StaticMargin, bits: bool
) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype)
    return _call("forward", margin, bits, (), out, x, w, label, beta, core_call=_layer_call)  # type: ignore[no-any-return]


def _stats_struct(x: jax.Array) -> jax.ShapeDtypeStruct:
    """The core's (STATS_ROWS, N) float64 per-sample statistics as the uint32 words of their
    bits (exact without x64), the residual the forward hands to the backward."""
    return jax.ShapeDtypeStruct((core.STATS_ROWS, x.shape[0], 2), jnp.uint32)


def _lsoftmax_fwd(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: StaticMargin, bits: bool
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    if not _has_stats(margin):  # a kind that normalises: no statistics to keep
        return _forward_call(x, w, label, beta, margin, bits), (x, w, label, beta, None)
    # Under differentiation the forward also returns the per-sample statistics (norms,
    # cosine, psi, psi'), which the backward then does not compute again.
    outs = (jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), x.dtype), _stats_struct(x))
    logits, stats_bits = _call(
        "forward_stats", margin, bits, (), outs, x, w, label, beta, core_call=_layer_call
    )
    return logits, (x, w, label, beta, stats_bits)


def _lsoftmax_bwd(
    margin: StaticMargin, bits: bool, res: tuple[Any, ...], grad_logits: jax.Array
) -> tuple[Any, ...]:
    x, w, label, beta, stats_bits = res
    outs = (_shape_dtype(x), _shape_dtype(w))
    if stats_bits is None:  # a kind that normalises: the core's backward with stats=None
        grad_x, grad_w = _call(
            "backward", margin, bits, (), outs, grad_logits, x, w, label, beta, core_call=_layer_call
        )
    else:
        grad_x, grad_w = _call(
            "backward_stats", margin, bits, (), outs, grad_logits, x, w, label, stats_bits, beta,
            core_call=_layer_call,
        )  # fmt: skip
    # No cotangent for the integer labels nor for beta (a constant, see lsoftmax).
    return grad_x, grad_w, None, None


_lsoftmax.defvjp(_lsoftmax_fwd, _lsoftmax_bwd)


def _layer_call(
    kind: str, margin: StaticMargin, options: Any, outs: tuple[Any, ...], arrays: list[Any], beta: float, xp: Any
) -> None:
    """The core's ``kind`` of call, its results written into ``outs`` (XLA's result buffers,
    views of the array module ``xp``: NumPy or CuPy) by forward/backward (``out=``)."""
    kw: dict[str, Any] = dict(margin=margin, beta=beta)
    if kind == "forward":
        core.forward(*arrays, out=outs[0], **kw)
    elif kind == "forward_stats":
        _, stats = core.forward(*arrays, out=outs[0], return_stats=True, **kw)
        if stats is not None:  # NumPy: the (STATS_ROWS, N) float64 statistics as their uint32 words
            outs[1].view(np.float64).reshape(stats.shape)[...] = stats
        # CuPy computes none: the buffer is left unread (backward_stats ignores it there)
    elif kind == "backward":  # no statistics (the kinds that normalise)
        core.backward(*arrays, out=(outs[0], outs[1]), **kw)
    else:  # "backward_stats"
        *args, stats_bits = arrays
        stats = stats_bits.view(np.float64).reshape(stats_bits.shape[:2]) if xp is np else None
        core.backward(*args, out=(outs[0], outs[1]), stats=stats, **kw)
