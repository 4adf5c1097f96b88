"""Class-parallel L-Softmax cross-entropy for ``jax.shard_map``:
``class_parallel_cross_entropy(x, w_local, label, axis_name=, num_classes=, ...)``.

At a million classes and more the class weights W (C, D) no longer fit one device.  Here
W is split by rows (classes) over a named mesh axis, the features x and the labels are
replicated over it, and every device computes the part of the loss its classes own, as
InsightFace's Partial FC and Megatron's vocabulary-parallel cross-entropy do: the margin
only where the device holds the label, the softmax through all-reduces of O(N) values.
The maths is ``docs/derivatives.md``, "Class shards": per device p and row i the core's
``cross_entropy_shard_stats`` gives the log-sum-exp over the device's classes and the
target logit where it holds y_i (else 0), and

    M_i = pmax_p lse_i^p,   lse_i = M_i + log psum_p exp(lse_i^p - M_i),
    loss_i = lse_i - psum_p t_i^p.

The backward hands the combined lse back to the core (``cross_entropy_backward`` with
``class_start``/``num_classes``), which returns this device's rows of grad_W exactly and
its term of grad_x; grad_x is their sum over the axis.  Per step the axis carries one
pmax and one psum of (2, N) in the forward and one psum of (N, D) in the backward:
O(N·D·P + N·P) values in all, nothing of size N×C or C×D.  The forward runs one pass of
the core over the device's classes, the backward one more with the gradients (the
single-device loss needs no second pass under ``jax.grad`` because it knows the lse
before it forms the gradients; here the lse is known only after the all-reduce).

Everything else is the rest of :mod:`lsoftmax_core.adapters.jax`'s: the core runs inside
``jax.experimental.buffer_callback`` on zero-copy views of XLA's buffers, margin is
static, beta an operand (a Python number exact as float64, or a traced scalar: no
recompile for a new value, no gradient to it), the same dtypes, the same errors (label
values are checked when the callback runs and surface as ``jax.errors.JaxRuntimeError``
carrying the core's ``ValueError: label must lie in [0, C) = [0, num_classes) ...``).
On CUDA the callback takes the adapter's route: the core's CuPy class shards on XLA's
stream (tested by a ``gpu`` test on one device, not yet run on a GPU).

Uneven class counts.  ``shard_map`` splits W's rows evenly, so pad W to a multiple of
the axis size P: device p holds the global rows ``[p·C_local, (p + 1)·C_local)`` and the
rows at or beyond ``num_classes`` are padding.  Padding rows enter no softmax, get a zero
gradient and may hold anything; a device may hold only padding.  Such a device calls no
core function, but it checks the labels and a traced beta as the core does on the others,
so that bad data is the same error on every device rather than a device waiting alone in
the all-reduce until XLA aborts the process.  With ``subcenters=k`` the same holds in
whole classes: a class's k centres are k consecutive rows, so W has a multiple of k rows
per device (C_local·k), device p holds classes ``[p·C_local, (p + 1)·C_local)`` (rows
``[p·C_local·k, (p + 1)·C_local·k)``), and the rows at or beyond ``num_classes·k`` are
padding; pad W with whole classes of k rows.

``jax.shard_map``'s ``check_vma``.  With ``check_vma=True`` (JAX's default) the values'
types say what varies over the axis: x and label must not vary over ``axis_name``, w_local
must; the cotangent of the loss arrives whole on every device and grad_x is summed over
the axis here.  With ``check_vma=False`` JAX transposes a psum into a psum and splits the
cotangent of a replicated value into per-device shares (``shard_map``'s transpose divides
the cotangent of a replicated output by P and sums those of replicated inputs); this
function then follows the same convention: the whole cotangent is the psum of the shares
(1 or N more values through the axis) and grad_x is returned as this device's term, which
``shard_map`` sums.  Either way ``jax.grad`` of a function that calls ``shard_map`` gives
the single-device loss's gradients (tested in both modes); ``jax.grad`` taken inside
``shard_map`` gives them under ``check_vma=True``, whereas under ``check_vma=False`` it
counts the cotangent once per device (grad_w P times too large), as it does for JAX's own
``psum`` in that mode.  The mode is read from the type of ``lax.axis_index``.

Rows split over the class axis itself (Partial FC: each device brings its own batch) are
gathered before the call.  Under ``check_vma=True``:
``jax.lax.all_gather(x, axis_name, tiled=True, to="invarying")`` (x must not vary), whose
transpose takes each device's rows of the all-reduced grad_x; under ``check_vma=False`` a
plain ``all_gather``, whose transpose is a reduce-scatter of the devices' terms (half the
all-reduce's traffic on a ring).  Other mesh axes may split the rows of x and label (data
parallelism, e.g. a ("data", "classes") mesh): reducing the loss over them is the
caller's; grad_w is summed over the axes that x and label vary over but W does not, as
JAX's own transpose would (tested on a 2x2 mesh).

Precision.  The per-device log-sum-exps and targets (float64 in the core) are combined
in float64 when ``jax_enable_x64`` is on and in float32 otherwise; the loss has x's dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lsoftmax_core as core
from lsoftmax_core.checks import (
    check_arrays,
    check_beta,
    check_integer,
    check_label_values,
    check_lse_values,
)

from ._bridge import (
    StaticMargin,
    _beta_operand,
    _call,
    _check_concrete_beta,
    _check_loss_options,
    _check_subcenter_rows,
    _check_subcenters,
    _copy_into,
    _dtypes,
    _platform,
    _resolve_margin,
)

if TYPE_CHECKING:
    from lsoftmax_core.margins import Margin

__all__ = ["class_parallel_cross_entropy"]

#: Static parts of a call: (reduction, ignore_index, num_classes, subcenters).
_Options = tuple[str, int, int, int]


def class_parallel_cross_entropy(
    x: Any,
    w_local: Any,
    label: Any,
    *,
    axis_name: Hashable,
    num_classes: int,
    margin: int | Margin = 2,
    beta: Any = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    subcenters: int = 1,
) -> jax.Array:
    """The L-Softmax cross-entropy of ``x`` (N, D) against class weights sharded by rows over
    the mesh axis ``axis_name``; call it inside ``jax.shard_map``.

    ``w_local`` (C_local, D) is this device's block of the (P·C_local, D) weights: device p
    (``lax.axis_index(axis_name)``) holds classes ``[p·C_local, (p + 1)·C_local)``, and rows
    at or beyond ``num_classes`` are padding (ignored; pad W when P does not divide C).
    ``x`` and ``label`` (N,) are the same on every device of the axis (not in its
    ``in_specs``, or each device's rows gathered with ``jax.lax.all_gather(..., tiled=True,
    to="invarying")`` as Partial FC does); labels are global class indices in
    [0, num_classes) or ``ignore_index``.  The rest is
    :func:`lsoftmax_core.adapters.jax.lsoftmax_cross_entropy`'s: ``margin`` (static: an int
    for L-Softmax or a margin object such as ``lsoftmax_core.CosFace(0.35, s=64.0)``; the
    kinds that normalise do so per shard, each row of W by its own norm, so the result is
    the single-device loss's),
    ``beta`` (Python number or traced scalar), ``reduction`` ("mean" over the rows not
    ignored, "sum", or "none": (N,)), ``ignore_index``, ``subcenters`` (static; a kind that
    normalises: k rows per class, class j's centres rows j·k ... j·k + k - 1 of the whole
    W).  With k > 1 a device's block holds whole classes: ``w_local`` is (C_local·k, D)
    (rows that k does not divide are a ValueError naming subcenters and w_local's shape),
    device p holds classes ``[p·C_local, (p + 1)·C_local)``, and ``num_classes``, the
    labels and the padding count classes (pad W by whole classes of k rows).  The loss is
    the same on every device of the axis and equals the single-device loss of the whole W; ``jax.grad``
    through ``shard_map`` gives its gradients (grad_x whole, grad_w in the same blocks).
    See the module docstring for ``check_vma`` and the maths.

    >>> import numpy as np, jax, jax.numpy as jnp
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> from lsoftmax_core.adapters.jax import class_parallel_cross_entropy, lsoftmax_cross_entropy
    >>> mesh = Mesh(np.array(jax.devices()), ("classes",))   # all devices hold classes
    >>> parts = mesh.shape["classes"]
    >>> rng = np.random.default_rng(0)
    >>> x = rng.standard_normal((8, 5), dtype=np.float32)
    >>> w = rng.standard_normal((10, 5), dtype=np.float32)  # C = 10 classes
    >>> y = rng.integers(0, 10, 8).astype(np.int32)
    >>> rows = -(-10 // parts) * parts                        # pad C to a multiple of P
    >>> w_padded = np.concatenate([w, np.zeros((rows - 10, 5), np.float32)])
    >>> def loss_fn(x, w_local, y):
    ...     return class_parallel_cross_entropy(x, w_local, y, axis_name="classes",
    ...                                         num_classes=10, margin=3, beta=1.0)
    >>> sharded = jax.shard_map(loss_fn, mesh=mesh, in_specs=(P(), P("classes"), P()), out_specs=P())
    >>> loss, (gx, gw) = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, w_padded, y)
    >>> whole = lsoftmax_cross_entropy(x, w, y, margin=3, beta=1.0)
    >>> bool(jnp.allclose(loss, whole, rtol=1e-5)), gw.shape == w_padded.shape
    (True, True)
    >>> bool(jnp.all(gw[10:] == 0))                          # padding gets no gradient
    True
    """
    reduction, ignore = _check_loss_options(reduction, ignore_index)
    total = check_integer("num_classes", num_classes, 1)
    m = _resolve_margin(margin)
    sub = _check_subcenters(subcenters, m)
    beta_now = _check_concrete_beta(beta)
    for name, a in (("x", x), ("w_local", w_local), ("label", label)):
        if not isinstance(a, jax.Array):
            raise TypeError(
                f"{name} must be a jax.Array (a value inside jax.shard_map), got "
                f"{type(a).__module__}.{type(a).__qualname__}"
            )
    dtypes = _dtypes(_platform(x, w_local))
    check_arrays(x, w_local, label, m, 0.0 if beta_now is None else beta_now, dtypes=dtypes)
    local = _check_subcenter_rows(sub, "w_local", w_local)  # this device's classes
    parts = _axis_size(axis_name)
    if parts * local < total:
        what = "rows" if sub == 1 else f"classes of subcenters={sub} rows"
        raise ValueError(
            f"num_classes={total} exceeds the {parts} x {local} {what} that the {parts} devices of "
            f"axis_name={axis_name!r} hold (w_local.shape={tuple(w_local.shape)}): shard all of W"
        )
    beta_op, bits = _beta_operand(beta, beta_now)
    index = lax.axis_index(axis_name)
    vma = _check_varying(axis_name, index, x, w_local, label, beta)
    start = index * local  # this device's first global class (classes, not rows)
    return _loss(x, w_local, label, beta_op, start, axis_name, m, bits, (reduction, ignore, total, sub), vma)  # type: ignore[no-any-return]


def _axis_size(axis_name: Hashable) -> int:
    if isinstance(axis_name, (tuple, list)):
        raise TypeError(f"axis_name must name one mesh axis, got {axis_name!r}")
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise ValueError(
            f"axis_name={axis_name!r} is not a mesh axis here: call class_parallel_cross_entropy "
            f"inside jax.shard_map over a mesh with that axis ({e})"
        ) from e


def _varying(a: Any) -> frozenset[Any]:
    """The mesh axes ``a``'s type says it varies over (empty under ``check_vma=False``)."""
    t = jax.typeof(a)
    mat = getattr(t, "mat", None)  # jax 0.10: ShapedArray.mat.varying; earlier: .vma
    return frozenset(mat.varying if mat is not None else getattr(t, "vma", ()))


def _check_varying(axis_name: Hashable, index: jax.Array, x: Any, w: Any, label: Any, beta: Any) -> bool:
    """Whether ``check_vma`` is on: then the types track what varies over the axis (the
    device's index does), and w_local must vary while x, label and a traced beta must not.
    With ``check_vma=False`` the types say nothing and nothing can be checked."""
    if axis_name not in _varying(index):
        return False
    if axis_name not in _varying(w):
        raise ValueError(
            f"w_local must be sharded over axis_name={axis_name!r} (shard_map in_specs "
            f"P({axis_name!r}) for W), but it is the same on every device of the axis"
        )
    named = [("x", x), ("label", label)] + ([("beta", beta)] if isinstance(beta, jax.Array) else [])
    for name, a in named:
        if axis_name in _varying(a):
            raise ValueError(
                f"{name} must be replicated over axis_name={axis_name!r}: every device of the axis "
                f"needs all of it (no {axis_name!r} in its shard_map in_specs, or rows gathered with "
                f"jax.lax.all_gather({name}, {axis_name!r}, tiled=True, to='invarying'))"
            )
    return True


def _vary(a: jax.Array, axes: frozenset[Any]) -> jax.Array:
    """``a`` typed as varying over ``axes``.  A buffer callback's results are typed as
    varying over nothing whatever its operands; their values differ across the devices
    whenever the operands do, so the type is corrected (no data moves)."""
    missing = tuple(sorted(axes - _varying(a), key=str))
    return lax.pcast(a, missing, to="varying") if missing else a


def _stats_dtype() -> np.dtype[Any]:
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))  # float64 with x64, else float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _loss(
    x: jax.Array,
    w: jax.Array,
    label: jax.Array,
    beta: jax.Array,
    start: jax.Array,
    axis_name: Hashable,
    margin: StaticMargin,
    bits: bool,
    options: _Options,
    vma: bool,
) -> jax.Array:
    return _loss_fwd(x, w, label, beta, start, axis_name, margin, bits, options, vma)[0]


def _loss_fwd(
    x: jax.Array,
    w: jax.Array,
    label: jax.Array,
    beta: jax.Array,
    start: jax.Array,
    axis_name: Hashable,
    margin: StaticMargin,
    bits: bool,
    options: _Options,
    vma: bool,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    reduction, ignore = options[:2]
    n = x.shape[0]
    stats = jax.ShapeDtypeStruct((n,), _stats_dtype())
    lse_local, target_local = _call(
        "stats", margin, bits, options, (stats, stats), x, w, label, start, beta, core_call=_shard_call
    )
    if vma:
        axes = _varying(x) | _varying(w) | _varying(label) | _varying(beta) | {axis_name}
        lse_local, target_local = _vary(lse_local, axes), _vary(target_local, axes)
    # docs/derivatives.md "Class shards": the max is a shift for exp's range only (a device
    # holding only padding reports -inf, which adds exp(-inf) = 0); one psum carries both
    # the sums of exponentials and the targets (0 on the devices not holding y_i).
    top = lax.pmax(lse_local, axis_name)
    sums = lax.psum(jnp.stack([jnp.exp(lse_local - top), target_local]), axis_name)
    lse = top + jnp.log(sums[0])
    kept = label != ignore
    per_row = jnp.where(kept, lse - sums[1], 0.0)
    if reduction == "none":
        loss = per_row
    elif reduction == "sum":
        loss = jnp.sum(per_row)
    else:  # an all-ignored batch gives 0, not 0/0
        loss = jnp.sum(per_row) / jnp.maximum(jnp.sum(kept), 1).astype(per_row.dtype)
    return loss.astype(x.dtype), (x, w, label, beta, start, lse)


def _loss_bwd(
    axis_name: Hashable,
    margin: StaticMargin,
    bits: bool,
    options: _Options,
    vma: bool,
    res: tuple[jax.Array, ...],
    grad_loss: jax.Array,
) -> tuple[Any, ...]:
    x, w, label, beta, start, lse = res
    if not vma:
        # check_vma=False: each device holds a share of the cotangent of the (replicated)
        # loss; the core needs the whole of it.
        grad_loss = lax.psum(grad_loss, axis_name)
    outs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(w.shape, w.dtype))
    grad_x, grad_w = _call(
        "backward", margin, bits, options, outs, grad_loss, x, w, label, lse, start, beta,
        core_call=_shard_call,
    )  # fmt: skip
    if vma:
        # grad_x = sum over the devices of their terms; any axis that the inputs vary over
        # but x (or w) does not is summed too, as JAX's transpose of a broadcast would.
        axes = _varying(grad_loss) | _varying(x) | _varying(w) | _varying(label) | {axis_name}
        grad_x = lax.psum(_vary(grad_x, axes), tuple(sorted(axes - _varying(x), key=str)))
        extra = tuple(sorted(axes - _varying(w), key=str))
        grad_w = _vary(grad_w, axes)
        if extra:
            grad_w = lax.psum(grad_w, extra)
    # else: grad_x is this device's term, which shard_map's transpose sums over the axis.
    return grad_x, grad_w, None, None, None


_loss.defvjp(_loss_fwd, _loss_bwd)


def _shard_call(
    kind: str, margin: StaticMargin, options: _Options, outs: tuple[Any, ...], arrays: list[Any], beta: float, xp: Any
) -> None:
    """The core's shard call on this device's rows of W that are classes (the rest is
    padding, in whole classes of ``subcenters`` rows), its results copied into XLA's
    buffers ``outs``."""
    reduction, ignore, total, sub = options
    start_view = arrays[-1]
    start = int(start_view.get() if xp is not np else start_view)  # on CUDA a 4-byte copy; in classes
    w = arrays[1 if kind == "stats" else 2]  # (x, w, label, start) or (grad_loss, x, w, label, lse, start)
    rows = max(0, min(int(w.shape[0]) // sub, total - start)) * sub  # the rows of classes (not padding) here
    kw: dict[str, Any] = dict(margin=margin, beta=beta, ignore_index=ignore, class_start=start, num_classes=total)
    if sub > 1:
        kw["subcenters"] = sub
    if kind == "stats":
        x, w, label, _ = arrays
        if rows == 0:  # only padding: no class, so exp(lse) = 0 and no target
            _check_without_classes(label, beta, total, ignore, xp)
            outs[0][...] = -np.inf
            outs[1][...] = 0
            return
        lse, target = core.cross_entropy_shard_stats(x, w[:rows], label, **kw)
        _copy_into(outs[0], lse, xp)
        _copy_into(outs[1], target, xp)
        return
    grad_loss, x, w, label, lse, _ = arrays
    if rows == 0:
        _check_without_classes(label, beta, total, ignore, xp, lse)
        outs[0][...] = 0
        outs[1][...] = 0
        return
    grad_x, grad_w = core.cross_entropy_backward(grad_loss, x, w[:rows], label, reduction=reduction, lse=lse, **kw)
    _copy_into(outs[0], grad_x, xp)
    _copy_into(outs[1][:rows], grad_w, xp)
    outs[1][rows:] = 0  # padding rows: no gradient


def _check_without_classes(label: Any, beta: float, total: int, ignore: int, xp: Any, lse: Any = None) -> None:
    """The checks of the data that the core makes in a shard call, made on a device that
    holds only padding and so calls no core function: beta, and on the CPU the labels
    against all ``total`` classes and, in the backward, the combined ``lse`` (finite on the
    rows that are not ignored: non-finite features make it NaN on every device) with the
    core's own checks and messages.

    Every device of the axis must reach the same verdict before the collectives that follow
    the callback: a device whose callback raises never enters the all-reduce, and one that
    does not raise would wait there alone until XLA aborts the process.  On CUDA the core
    checks labels on the device without synchronising and raises from a later call (see
    the package docstring), so no device raises here for a label and none waits alone."""
    check_beta(beta)
    if xp is np:
        check_label_values(label, total, ignore)
        if lse is not None:
            check_lse_values(np.asarray(lse, dtype=np.float64), label != ignore)
