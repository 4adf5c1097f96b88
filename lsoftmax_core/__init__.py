"""lsoftmax-core: the Large-Margin Softmax layer (Liu et al., ICML 2016), framework-agnostic.

``forward(x, w, label, margin=, beta=)`` returns the (N, C) logits of a linear layer whose
target logits carry the angular margin; ``backward`` returns ``(grad_x, grad_w)``.  NumPy
arrays run the CPU backend, CuPy arrays the CUDA kernels; the result has the inputs'
array library and dtype (or is the caller's ``out=``).  This module imports neither CuPy
nor any framework.  The maths: docs/derivatives.md.

``add_margin`` and ``add_margin_grad`` are the same maths without the GEMMs: they turn
the plain layer's results, computed by any GEMM (a framework's own BLAS and thread pool,
or into buffers the caller owns), into L-Softmax results in place, at O(N·D) cost.

Each call runs on the :class:`Backend` of its arrays' library (:mod:`lsoftmax_core.backends`).
The contract with framework adapters is public: :func:`check_arguments` (every check,
nothing computed) with ``checked=``, :func:`check_labels`, :func:`supported_dtypes`, and
the scalar and array checks of :mod:`lsoftmax_core.checks`.
"""

from __future__ import annotations

import sys
from typing import Any

from . import _family, _numpy_backend
from ._chebyshev import MAX_MARGIN
from ._loss_plan import DEFAULT_MEMORY_BUDGET, ChunkPlan, LossOptions, plan_chunks
from ._numpy_backend import STATS_ROWS
from .backends import Backend, backend_for
from .checks import Problem, split_margin, supported_dtypes
from .margins import ArcFace, CombinedMargin, CosFace, LSoftmax, Margin, SphereFace, margin_from_dict
from .schedule import (
    ConstantSchedule,
    ExponentialSchedule,
    InverseSchedule,
    Schedule,
    schedule_from_dict,
)

__all__ = [
    "ArcFace",
    "Backend",
    "ChunkPlan",
    "CombinedMargin",
    "ConstantSchedule",
    "CosFace",
    "DEFAULT_MEMORY_BUDGET",
    "ExponentialSchedule",
    "InverseSchedule",
    "LSoftmax",
    "LossOptions",
    "MAX_MARGIN",
    "Margin",
    "Problem",
    "STATS_ROWS",
    "Schedule",
    "SphereFace",
    "__version__",
    "add_margin",
    "add_margin_grad",
    "backward",
    "check_arguments",
    "check_labels",
    "cpu_kernels",
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_shard_stats",
    "cross_entropy_with_grad",
    "forward",
    "gpu_small_kernels",
    "margin_from_dict",
    "normalized",
    "plan_chunks",
    "schedule_from_dict",
    "set_cpu_kernels",
    "set_gpu_small_kernels",
    "supported_dtypes",
]

__version__ = "0.1.0"


#: The dispatch of every public function: the backend of its arrays' library (backends.py).
_backend = backend_for


def normalized(x: Any, w: Any, *, margin: int | Margin) -> tuple[Any, Any]:
    """The rows the kind's plain layer multiplies, ``(x', w')``: ``x' = s·x/|x|`` for the cosine
    kinds (CosFace, ArcFace, CombinedMargin), else x itself; w' = each row of w divided by
    its norm for SphereFace and the cosine kinds, else w itself (L-Softmax: ``(x, w)``).  A
    zero row stays 0.  New arrays where a row changes; inputs are never modified.

    With them a caller's own GEMMs do what :func:`forward` and :func:`backward` do:
    ``add_margin(x' @ w'.T, x, w, label, margin=kind)`` equals ``forward(x, w, label,
    margin=kind)``, and ``add_margin_grad(G @ w', G.T @ x', G, x, w, label, margin=kind)``
    equals ``backward(G, x, w, label, margin=kind)`` (the gradients with respect to x' and w'
    become those with respect to x and w: docs/derivatives.md, "The margin family"), up to
    rounding: ``forward`` and ``backward`` scale the columns of x'·wᵀ (and of G) by ``1/|w_j|``
    instead of holding a normalised copy of w.

    >>> import numpy as np, lsoftmax_core as lsm
    >>> xn, wn = lsm.normalized(np.array([[3.0, 4.0]]), np.array([[0.0, 2.0]]), margin=lsm.CosFace(m=0.35, s=10.0))
    >>> xn.tolist(), wn.tolist()
    ([[6.0, 8.0]], [[0.0, 1.0]])
    """
    _backend(("x", "w"), x, w)
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"x and w must be 2-D, got x.shape={tuple(x.shape)}, w.shape={tuple(w.shape)}")
    _, family = split_margin(margin)
    if family is None:
        return x, w
    return _family.normalized(x, w, family)


def forward(
    x: Any, w: Any, label: Any, *, margin: int | Margin = 2, beta: float = 0.0, out: Any = None, return_stats: bool = False
) -> Any:
    """L-Softmax logits, shape (N, C).

    x: (N, D) features; w: (C, D) class weights (a Linear layer's weight); label: (N,)
    integers in [0, C).  Each sample's target logit ``logits[i, label[i]]`` carries the
    angular margin (the formula: docs/derivatives.md, "Forward"); the other logits are
    ``x·w_j``.  margin = 1 gives a plain linear layer for any beta.  Inputs are never
    modified.

    ``margin``: an int m is L-Softmax's (``LSoftmax(m)`` is the same); a margin object
    (:class:`SphereFace`, :class:`CosFace`, :class:`ArcFace`, :class:`CombinedMargin`)
    gives that kind's logits, the others then being the plain logits of normalised rows
    (``|x|·cos θ_j``, or ``s·cos θ_j``: docs/derivatives.md, "The margin family"; beta blends every
    kind's target the same way).

    >>> import numpy as np, lsoftmax_core as lsm
    >>> x, w, y = np.array([[1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([0])
    >>> lsm.forward(x, w, y, margin=1).tolist()   # margin 1: x @ w.T
    [[1.0, 2.0]]
    >>> lsm.forward(x, w, y, margin=3).round(6).tolist()   # theta = 45 deg: |x||w|cos(3 theta) = -1
    [[-1.0, 2.0]]

    ``out``: an (N, C) array of x's dtype and library to write the logits into (and
    return) instead of a new one: writeable, sharing no memory with the inputs (CuPy:
    C-contiguous).  Every argument is checked before ``out`` is written, except CuPy labels,
    which the GPU checks without a host synchronisation (a bad one is reported by the next
    call, see the CuPy backend).

    ``return_stats=True`` returns ``(logits, stats)``: ``stats`` are the per-sample
    statistics the margin was computed from (norms, cosine, psi, psi'; O(N)), which
    :func:`backward` takes as ``stats=`` instead of computing them again.  NumPy arrays: a
    (:data:`STATS_ROWS`, N) float64 array, valid for these very x, w, label and margin (any
    beta), to be treated as opaque (it carries fingerprints of the rows of x and w[label] it
    came from, which the backward checks); CuPy arrays: None (the kernels recompute them;
    see :func:`backward`).
    """
    backend = _backend(("x", "w", "label", "out"), x, w, label, *(() if out is None else (out,)))
    return backend.forward(x, w, label, margin=margin, beta=beta, out=out, return_stats=return_stats)


def backward(
    grad_logits: Any,
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int | Margin = 2,
    beta: float = 0.0,
    out: tuple[Any, Any] | None = None,
    stats: Any = None,
) -> tuple[Any, Any]:
    """Gradients ``(grad_x, grad_w)`` of ``sum(grad_logits * forward(x, w, label))``.

    ``out``: a pair of arrays, (N, D) and (C, D), to write the gradients into (and return),
    with the rules of :func:`forward`'s ``out``.  ``stats``: what ``forward(...,
    return_stats=True)`` returned for the same x, w, label and margin; the result is then
    the same, bit for bit, without the statistics' psi evaluations.  It is checked for
    shape, dtype and margin, and against the data: the fingerprints of x's rows and of
    w[label]'s rows (exact integer sums of their bits, O(N·D)) must be the forward's, so
    statistics of another batch, or of arrays changed in place since the forward (an
    optimizer step), raise a ValueError naming stats instead of giving a wrong gradient.
    None: computed here.
    """
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise TypeError(f"out must be a pair (grad_x, grad_w) of arrays, got {type(out).__name__}")
    names = ("grad_logits", "x", "w", "label", "out[0]", "out[1]")
    backend = _backend(names, grad_logits, x, w, label, *(() if out is None else out))
    return backend.backward(  # type: ignore[no-any-return]
        grad_logits, x, w, label, margin=margin, beta=beta, out=out, stats=stats
    )


def check_arguments(
    x: Any, w: Any, label: Any, *, margin: int | Margin = 2, beta: float = 0.0, grad_logits: Any = None,
    label_values: bool = True,
) -> Problem:  # fmt: skip
    """Every check :func:`forward` (or, with ``grad_logits``, :func:`backward`) makes, without
    computing anything; returns the :class:`Problem` (sizes, dtype, margin, beta).

    NumPy labels are range-checked here (host data); CuPy labels are checked by the GPU
    (see :func:`check_labels`).  Pass the result as ``checked=`` to :func:`add_margin` /
    :func:`add_margin_grad` with the same array objects to skip their own checks: an
    adapter that runs the GEMMs itself checks once, before them.  ``label_values=False``
    skips the O(N) scan of NumPy labels here (shapes and dtypes are still checked); the
    result records that, and :func:`add_margin` / :func:`add_margin_grad` then scan the
    labels themselves before they index with them (a label outside [0, C) is never used).
    """
    backend = _backend(("x", "w", "label", "grad_logits"), x, w, label, *(() if grad_logits is None else (grad_logits,)))
    if label_values:
        return backend.prepare(x, w, label, margin, beta, grad_logits)  # type: ignore[no-any-return]
    from .checks import check_arrays

    return check_arrays(  # the backend's checks without the label scan
        x, w, label, margin, beta, dtypes=backend.dtypes, grad_logits=grad_logits
    )


def set_cpu_kernels(name: str) -> None:
    """Choose how the NumPy backend does its per-sample work: ``"numpy"`` (the default and
    the reference) or ``"numba"``, compiled loops (Numba, ``pip install numba``) that
    replace its ~75 small NumPy calls per forward+backward by one compiled call each way, for small
    problems where those calls cost more than the GEMMs (docs/BENCHMARKS.md, per-call
    overhead).  Same maths within the tolerance table; calls with rows the loops decline
    (zero or extreme norms, non-finite values) still run the NumPy code.  The first call
    of each dtype compiles the loops (seconds; cached on disk).  Also set by the
    environment variable ``LSOFTMAX_CPU_KERNELS`` before the first call.  Numba is
    imported only once "numba" is chosen; without it this raises ImportError.
    """
    _numpy_backend.set_cpu_kernels(name)


def set_gpu_small_kernels(enabled: bool) -> None:
    """Allow (True, the default) or forbid the CuPy backend's one-kernel path for small
    problems (margin > 1, D <= 128, N and C <= 512, N·C·D <= 2^18), where forward and
    backward each run as one kernel, GEMMs included, because a call's cost there is its
    host-side CUDA calls.  Forbidden, every call takes cuBLAS GEMMs plus the margin kernels
    (for comparisons, or to get cuBLAS's bits at every size).  Process-wide; imports no CuPy."""
    from . import _cupy_plan

    _cupy_plan.set_small_kernels(enabled)


def gpu_small_kernels() -> bool:
    """Whether the CuPy backend may take its one-kernel small-problem path (see
    :func:`set_gpu_small_kernels`)."""
    from . import _cupy_plan

    return _cupy_plan.small_kernels()


def cpu_kernels() -> str:
    """The NumPy backend's per-sample kernels in use: "numpy" or "numba" (see
    :func:`set_cpu_kernels`)."""
    return _numpy_backend.cpu_kernels()


def check_labels(device: int | None = None) -> None:
    """Raise the ValueError of any label outside [0, C) that the GPU met since the last report.

    The CuPy backend checks labels on the device without synchronising the host: a bad
    label is reported by the next ``forward``/``backward`` on that CUDA device, or here at
    once (this synchronises ``device``, default the current one).  Without CuPy in use
    there is nothing to report and this returns immediately.
    """
    cupy_state = sys.modules.get(f"{__name__}._cupy_state")
    if cupy_state is not None:
        cupy_state.check_labels(device)


def add_margin(
    logits: Any,
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int | Margin = 2,
    beta: float = 0.0,
    checked: Problem | None = None,
    return_stats: bool = False,
) -> Any:
    """Turn plain logits ``x @ w.T`` into L-Softmax logits in place; returns ``logits``
    (``(logits, stats)`` with ``return_stats=True``, as :func:`forward`).

    Only the N target entries ``logits[i, label[i]]`` are rewritten, so
    ``add_margin(x @ w.T, x, w, label, ...)`` equals ``forward(x, w, label, ...)``.
    ``logits`` must be writeable, of x's dtype and array library, and share no memory with
    the inputs (CuPy: also C-contiguous).  ``checked``: :func:`check_arguments`'s result
    for these x, w, label (the argument checks then are not repeated).
    """
    backend = _backend(("logits", "x", "w", "label"), logits, x, w, label)
    return backend.add_margin(
        logits, x, w, label, margin=margin, beta=beta, checked=checked, return_stats=return_stats
    )


def add_margin_grad(
    grad_x: Any,
    grad_w: Any,
    grad_logits: Any,
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int | Margin = 2,
    beta: float = 0.0,
    checked: Problem | None = None,
    stats: Any = None,
) -> tuple[Any, Any]:
    """Turn the plain gradients ``grad_logits @ w`` and ``grad_logits.T @ x`` into the
    L-Softmax gradients in place; returns ``(grad_x, grad_w)``.

    ``add_margin_grad(G @ w, G.T @ x, G, x, w, label, ...)`` equals
    ``backward(G, x, w, label, ...)``.  The same rules as for :func:`add_margin` apply to
    ``grad_x`` and ``grad_w``; ``checked`` comes from ``check_arguments(..., grad_logits=G)``;
    ``stats`` from ``add_margin``/``forward`` with ``return_stats=True`` (see :func:`backward`).
    """
    backend = _backend(("grad_x", "grad_w", "grad_logits", "x", "w", "label"), grad_x, grad_w, grad_logits, x, w, label)
    return backend.add_margin_grad(  # type: ignore[no-any-return]
        grad_x, grad_w, grad_logits, x, w, label, margin=margin, beta=beta, checked=checked, stats=stats
    )


def _loss_engine_for(x: Any, w: Any, label: Any) -> Any:
    """The fused loss of the arrays' backend (:class:`lsoftmax_core.backends.LossOps`)."""
    return _backend(("x", "w", "label"), x, w, label).loss


def cross_entropy(
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int | Margin = 2,
    beta: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    chunking: str | None = None,
    memory_budget: int | None = None,
    subcenters: int = 1,
    return_lse: bool = False,
) -> Any:
    """The L-Softmax cross-entropy ``logsumexp_j f_ij - f_{i,y_i}`` of :func:`forward`'s
    logits f, computed in chunks without ever holding the N×C logits.

    ``reduction``: "mean" (over the rows whose label is not ``ignore_index``, as
    ``torch.nn.functional.cross_entropy``; a batch with every row ignored gives 0, not
    NaN), "sum" (0-d results) or "none" (shape (N,), 0 on ignored rows).  Labels must lie
    in [0, C) or equal ``ignore_index``; ignored rows get no margin and no gradient.
    ``chunking`` "rows" or "classes" and ``chunk_size`` (rows or classes per chunk) are
    chosen by :func:`plan_chunks` from ``memory_budget``, the bytes the chunk of logits may
    take, when not given (default :data:`DEFAULT_MEMORY_BUDGET`, 32 MiB, or the environment
    variable LSOFTMAX_CE_BUDGET); they change the result only by rounding.  The options are
    checked as one :class:`LossOptions` before anything is computed.  x and w may be
    ``numpy.matrix`` objects, as for :func:`forward`; the results are plain arrays.
    ``return_lse=True`` also returns each row's float64 log-sum-exp, which
    :func:`cross_entropy_backward` takes to skip a pass.  NumPy arrays run the CPU
    backend, CuPy arrays cuBLAS GEMMs per chunk plus this project's kernels.

    ``margin`` takes every kind, as :func:`forward` does (on CuPy arrays, so far, an int or
    :class:`LSoftmax` only).  ``subcenters=k`` (a kind that normalises the weights): w has
    C·k rows, class j's centres being rows j·k ... j·k + k - 1, and a class's cosine is the
    largest of its centres' (SubCenter-ArcFace); the gradient goes to that centre.  Labels,
    ``class_start`` and ``num_classes`` count classes.  Without a normalised copy of w: each
    chunk's columns are scaled by ``1/|w_j|`` (docs/derivatives.md, "The margin family").

    >>> import numpy as np, lsoftmax_core as lsm
    >>> x, w, y = np.array([[1.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([0])
    >>> f = lsm.forward(x, w, y, margin=3)
    >>> bool(np.isclose(lsm.cross_entropy(x, w, y, margin=3), np.log(np.exp(f).sum()) - f[0, 0]))
    True
    """
    opts = LossOptions(margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget, subcenters)
    return _loss_engine_for(x, w, label).cross_entropy(x, w, label, opts, return_lse=return_lse)


def cross_entropy_backward(
    grad_loss: Any,
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int | Margin = 2,
    beta: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    chunking: str | None = None,
    memory_budget: int | None = None,
    subcenters: int = 1,
    lse: Any = None,
    class_start: int = 0,
    num_classes: int | None = None,
) -> tuple[Any, Any]:
    """Gradients ``(grad_x, grad_w)`` of ``sum(grad_loss * cross_entropy(...))``: grad_loss
    is a real scalar or a real array of the loss's shape (0-d, or (N,) for reduction
    "none"); anything else (None, a complex number, a string, a list) is a TypeError naming
    it.  Ignored rows take no part, whatever their upstream gradient (an inf or NaN there
    changes nothing).

    ``lse``: the forward's ``return_lse`` output (float64 of shape (N,)) for the same x, w,
    label and options.  Both chunkings then use it as each row's softmax denominator
    (``softmax = exp(logit - lse)``), which saves the class chunks their log-sum-exp pass.
    It is checked for its type, shape and a real floating dtype; NumPy arrays also for
    finite values on the rows that are not ignored and, as the chunks are computed, against
    each row's largest logit (a log-sum-exp is never below it, up to the GEMMs' rounding),
    so an lse of another batch or of weights changed since raises a ValueError naming lse
    before any result is returned (CuPy arrays: not their values, which would synchronise
    the device).

    On a class shard (``num_classes`` given, see :func:`cross_entropy_shard_stats`) w holds
    the classes ``[class_start, class_start + C)``, ``lse`` (required) is each row's
    log-sum-exp over all ``num_classes`` classes, and the results are this shard's part:
    grad_w exactly, grad_x the shard's term of a sum over the shards ("mean" divides by the
    rows of the whole batch that are not ignored)."""
    opts = LossOptions(margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget, subcenters)
    return _loss_engine_for(x, w, label).cross_entropy_backward(  # type: ignore[no-any-return]
        grad_loss, x, w, label, opts, lse=lse, class_start=class_start, num_classes=num_classes
    )


def cross_entropy_shard_stats(
    x: Any,
    w: Any,
    label: Any,
    *,
    class_start: int,
    num_classes: int,
    margin: int | Margin = 2,
    beta: float = 0.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    chunking: str | None = None,
    memory_budget: int | None = None,
    subcenters: int = 1,
) -> tuple[Any, Any]:
    """One class shard's part of the cross-entropy: ``(lse, target)``, float64 of shape (N,).

    w (C, D) holds the classes ``[class_start, class_start + C)`` of ``num_classes``; labels
    are indices into all of them (or ``ignore_index``) and the margin is applied where this
    shard holds the row's label.  ``lse``: each row's log-sum-exp over the shard's logits;
    ``target``: the row's target logit where the shard holds it, else 0.  Over shards
    tiling the classes, the loss of row i is ``logsumexp_shards(lse_i) - sum_shards(target_i)``
    (docs/derivatives.md, "Cross-entropy"); :func:`cross_entropy_backward` with the same
    shard arguments and the combined lse gives the shard's gradients.  Chunked as
    :func:`cross_entropy`; never holds the N×C logits.

    >>> import numpy as np, lsoftmax_core as lsm
    >>> rng = np.random.default_rng(0)
    >>> x, w, y = rng.normal(size=(4, 3)), rng.normal(size=(5, 3)), np.array([0, 4, 2, 3])
    >>> parts = [lsm.cross_entropy_shard_stats(x, w[a:b], y, class_start=a, num_classes=5, margin=3)
    ...          for a, b in ((0, 2), (2, 5))]
    >>> lse = np.logaddexp(parts[0][0], parts[1][0])
    >>> loss = lse - (parts[0][1] + parts[1][1])
    >>> bool(np.allclose(loss, lsm.cross_entropy(x, w, y, margin=3, reduction="none")))
    True
    """
    opts = LossOptions(margin, beta, "none", ignore_index, chunk_size, chunking, memory_budget, subcenters)
    return _loss_engine_for(x, w, label).cross_entropy_shard_stats(  # type: ignore[no-any-return]
        x, w, label, opts, class_start=class_start, num_classes=num_classes
    )


def cross_entropy_with_grad(
    x: Any,
    w: Any,
    label: Any,
    *,
    margin: int | Margin = 2,
    beta: float = 0.0,
    reduction: str = "mean",
    ignore_index: int = -100,
    chunk_size: int | None = None,
    chunking: str | None = None,
    memory_budget: int | None = None,
    subcenters: int = 1,
) -> tuple[Any, Any, Any]:
    """``(loss, grad_x, grad_w)`` in one pass for reduction "mean" or "sum": row chunks
    form the gradients as they go (three GEMMs in all, no recomputation); class chunks
    take a log-sum-exp pass first (four).  Scale the gradients by the upstream gradient."""
    opts = LossOptions(margin, beta, reduction, ignore_index, chunk_size, chunking, memory_budget, subcenters)
    return _loss_engine_for(x, w, label).cross_entropy_with_grad(x, w, label, opts)  # type: ignore[no-any-return]
