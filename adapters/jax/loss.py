"""The fused L-Softmax cross-entropy as a JAX function: :func:`lsoftmax_cross_entropy`,
whose ``jax.custom_vjp`` runs the core's ``cross_entropy``, ``cross_entropy_with_grad`` and
``cross_entropy_backward`` in buffer callbacks (the rules: the package docstring); the
(N, C) logits are never formed.

The core's cross-entropy allocates its own results (a loss, O(N) values, and gradients the
size of x and w), which are copied once into XLA's buffers (on CUDA a device copy on XLA's
stream); a 0-d loss is written into XLA's 0-d buffer.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

import lsoftmax_core as core

from ._bridge import StaticMargin, _call, _check_loss_options, _copy_into, _platform, _prepare, _shape_dtype

if TYPE_CHECKING:
    from lsoftmax_core.margins import Margin

__all__ = ["lsoftmax_cross_entropy"]

#: Static keyword arguments of the core's loss calls beyond margin and beta, as (name, value)
#: pairs: reduction, ignore_index and, when k > 1, subcenters.
_Options = tuple[tuple[str, Any], ...]


def lsoftmax_cross_entropy(
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int | Margin = 2,
    beta: Any = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    subcenters: int = 1,
) -> jax.Array:
    """The L-Softmax cross-entropy of ``x`` (N, D) against class weights ``w`` (C, D): the
    log-softmax cross-entropy of :func:`lsoftmax`'s logits, computed by the core's fused
    ``lsoftmax_core.cross_entropy`` without forming the (N, C) logits (the maths:
    ``docs/derivatives.md``, "Cross-entropy").

    The arguments are :func:`lsoftmax`'s (``margin`` static: an int m for L-Softmax or a
    margin object, e.g. ``lsoftmax_core.ArcFace(0.5, s=64.0)``, whose logits' cross-entropy
    this then is; ``beta`` a Python number or a traced scalar: no recompile for a new value;
    no gradient to beta) and
    ``torch.nn.functional.cross_entropy``'s: ``reduction`` "mean" (over the rows whose label
    is not ``ignore_index``; 0 when every row is ignored), "sum" (both 0-d) or "none" (N,);
    labels lie in [0, C) or equal ``ignore_index`` (those rows get loss 0, no margin, no
    gradient).  Differentiable in x and w (``jax.grad``/``jax.vjp``, under ``jit`` and
    ``vmap``).  Without differentiation one pass computes the loss; under ``jax.grad`` with
    "mean"/"sum" that pass also forms the gradients, which the backward only scales (three
    GEMMs in all, no recomputation); with "none" the backward is a second pass that reuses
    the forward's per-row log-sum-exp.

    ``subcenters=k`` (static, a Python int; default 1), for a margin kind that normalises
    the weights (SphereFace, CosFace, ArcFace, CombinedMargin): ``w`` is (C·k, D), class
    j's centres being rows j·k ... j·k + k - 1; a class's cosine is the largest of its
    centres' (SubCenter-ArcFace) and its gradient goes to that centre (the core's
    ``cross_entropy(..., subcenters=k)``).  Labels count classes: [0, C).  An int margin
    (or ``LSoftmax``) with k > 1 is the core's ValueError naming subcenters, and so are rows
    that k does not divide (naming w's shape).  Errors otherwise as for :func:`lsoftmax`.  CPU and CUDA: on
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
    reduction, ignore = _check_loss_options(reduction, ignore_index)
    a = _prepare(x, w, label, margin, beta, _platform(x, w), ignore, subcenters)
    options: _Options = (("reduction", reduction), ("ignore_index", ignore))
    sub = int(subcenters)  # checked by _prepare
    if sub > 1:  # k = 1 keeps the options, callbacks and compiled calls it had without k
        options += (("subcenters", sub),)
    return _cross_entropy(a.x, a.w, a.label, a.beta, a.margin, a.bits, options)  # type: ignore[no-any-return]


def _loss_struct(x: jax.Array, options: _Options) -> jax.ShapeDtypeStruct:
    shape = (x.shape[0],) if dict(options)["reduction"] == "none" else ()
    return jax.ShapeDtypeStruct(shape, x.dtype)


# margin, bits and options (reduction, ignore_index, subcenters) are static.  Without differentiation
# JAX calls this primal, which computes the loss alone.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _cross_entropy(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: StaticMargin, bits: bool, options: _Options
) -> jax.Array:
    out = _loss_struct(x, options)
    return _call("loss", margin, bits, options, out, x, w, label, beta, core_call=_loss_call)  # type: ignore[no-any-return]


def _cross_entropy_fwd(
    x: jax.Array, w: jax.Array, label: jax.Array, beta: jax.Array, margin: StaticMargin, bits: bool, options: _Options
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    loss = _loss_struct(x, options)
    if loss.shape:
        # "none": a per-row cotangent comes back, so keep each row's log-sum-exp (float64,
        # as the two uint32 words of its bits: exact without x64) for the backward call.
        lse = jax.ShapeDtypeStruct((x.shape[0], 2), jnp.uint32)
        out, lse_bits = _call(
            "loss_lse", margin, bits, options, (loss, lse), x, w, label, beta, core_call=_loss_call
        )
        return out, (x, w, label, beta, lse_bits)
    # "mean"/"sum": the cotangent is a scalar, so the gradients of the loss itself are the
    # residuals, computed in the same pass as the loss.
    grads = (_shape_dtype(x), _shape_dtype(w))
    out, grad_x, grad_w = _call(
        "loss_with_grad", margin, bits, options, (loss, *grads), x, w, label, beta, core_call=_loss_call
    )
    return out, (grad_x, grad_w)


def _cross_entropy_bwd(
    margin: StaticMargin, bits: bool, options: _Options, res: tuple[jax.Array, ...], grad_loss: jax.Array
) -> tuple[Any, ...]:
    if len(res) == 2:
        grad_x, grad_w = (grad_loss * g for g in res)
    else:
        x, w, label, beta, lse_bits = res
        outs = (_shape_dtype(x), _shape_dtype(w))
        grad_x, grad_w = _call(
            "loss_backward", margin, bits, options, outs, grad_loss, x, w, label, lse_bits, beta,
            core_call=_loss_call,
        )  # fmt: skip
    return grad_x, grad_w, None, None


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _loss_call(
    kind: str, margin: StaticMargin, options: _Options, outs: tuple[Any, ...], arrays: list[Any], beta: float, xp: Any
) -> None:
    """The core's ``kind`` of loss call, its results copied into ``outs`` (XLA's result
    buffers, views of the array module ``xp``: NumPy or CuPy; the float64 lse as its uint32
    words)."""
    kw: dict[str, Any] = dict(options, margin=margin, beta=beta)
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
