"""The class-parallel L-Softmax head: the class weights sharded by class across the
processes of a ``torch.distributed`` group (NCCL on GPUs, gloo on CPUs), with the exact
loss and gradients of the whole batch over all the classes.

Rank r of P holds the rows ``[class_start, class_stop)`` of the (C, D) weight,
``C // P + (r < C % P)`` of them, shards in rank order.  One step (the maths:
``docs/derivatives.md``, "Class shards"; the bytes and the memory: ``docs/distributed.md``):

forward
    all-gather the batch sizes and a few checks' results (O(P)); all-gather the features
    and labels (N x D and N values, the global batch of N rows); each rank runs the core's
    fused :func:`lsoftmax_core.cross_entropy_shard_stats` on its shard (its own chunk of
    logits, the margin where it owns the label); all-reduce the row maximum of the shards'
    log-sum-exps, then the sums ``exp(lse_r - max)`` and the target logits (3N float64): the
    global log-sum-exp ``lse`` and the loss, the same on every rank.
backward
    each rank's :func:`lsoftmax_core.cross_entropy_backward` on its shard with the global
    lse gives its ``grad_w`` exactly and its term of ``grad_x`` (N x D); a reduce-scatter
    sums the terms and hands each rank its own rows.

Nothing of size N x C or C x D crosses the network, and the bytes per step do not depend
on C.  The collectives are this module's own (``torch.distributed.nn`` is not used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

import lsoftmax_core as _core
from lsoftmax_core.checks import check_integer
from lsoftmax_core.margins import Margin
from lsoftmax_core.schedule import Schedule

from . import _checks, resharding, sampling
from ._bridge import Resolved, _check_subcenters, _resolve_margin, _run
from .modules import _AnnealedHead, _class_logits, _margin_state, _plain_operands

__all__ = ["ClassParallelLSoftmaxLoss"]

_REDUCTIONS = ("mean", "sum")
_ERRORS = {1: TypeError, 2: ValueError}


# Every setting that changes the loss, which all ranks must share (a rank that missed a
# step() has another beta), with its int64 code for the all-gather and the way back to the
# value an error shows (beta by its float64 bits: compared exactly).  This is the one list:
# a setting added here (and to _Call) is checked, gathered, compared and named in the error.
# The margin's code is L-Softmax's m, or a 63-bit hash of another kind's parameters (the
# ranks then gather the parameters themselves to name the values: see _checks._margin_code).
_SETTINGS: tuple[tuple[str, Callable[[Any], int], Callable[[int], Any]], ...] = (
    ("num_classes", int, int),
    # The weight's dtype as computed in (float32 under autocast), sent with in_features in
    # one int64: see _pack.
    ("dtype", _checks._dtype_code, _checks._code_dtype),
    ("in_features", int, int),
    ("margin", _checks._margin_code, int),
    ("normalize_weight", int, bool),
    ("subcenters", int, int),  # sent with normalize_weight in one int64: see _pack
    ("ignore_index", int, int),
    ("beta", _checks._float_bits, _checks._bits_float),
    ("reduction", _REDUCTIONS.index, _REDUCTIONS.__getitem__),
    # The rate this call samples at: 1.0 in eval mode, so that a rank in eval mode while the
    # others train is named here rather than computing another loss (adapters/torch/sampling.py).
    ("sample_rate", _checks._float_bits, _checks._bits_float),
    # Not a setting of the loss, but a loss that needs a backward on some ranks only leaves
    # them waiting in its reduce-scatter (grad mode on, and x or the weight requiring grad).
    ("needs_grad", int, bool),
)
_NAMES = [name for name, _, _ in _SETTINGS]
_MARGIN = _NAMES.index("margin")
# Pairs of settings sent as one int64, ``base * codes[i + 1] + codes[i]`` (0 <= codes[i] <
# base), so that a rank's report keeps its 11 int64 (the documented 88 bytes per rank):
# the dtype's code with in_features, normalize_weight (0 or 1) with subcenters k.
_PAIRS = ((_NAMES.index("dtype"), 8), (_NAMES.index("normalize_weight"), 2))
assert [_NAMES[i + 1] for i, _ in _PAIRS] == ["in_features", "subcenters"] and len(_checks._DTYPES) < 8


def _pack(codes: list[int]) -> list[int]:
    """The settings' codes as sent (see :data:`_PAIRS`)."""
    out = list(codes)
    for i, base in reversed(_PAIRS):
        out[i : i + 2] = [base * out[i + 1] + out[i]]
    return out


def _unpack(packed: list[int]) -> list[int]:
    """The inverse of :func:`_pack`."""
    out = list(packed)
    for i, base in _PAIRS:
        high, low = divmod(out[i], base)
        out[i : i + 1] = [low, high]
    return out


# What each rank reports before any data moves: a problem found on its own input (1:
# TypeError, 2: ValueError) or settings (3, 4: the same, its settings not sent), or 0, its
# batch size, then the codes of the settings (packed).
_META = 2 + len(_SETTINGS) - len(_PAIRS)

# A shard saved before subcenters existed has one row per class, before sampling no step.
_SAVED_DEFAULTS = {"subcenters": 1, "sample_step": 0}

# torch >= 2.13 names the tensor collectives *_single; the older names warn there.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[class_start, class_stop)`` of rank ``rank``: ``C // P + (r < C % P)`` classes each."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass
class _Call:
    """One forward's settings, and the log of the bytes it (and its backward) passed to
    collectives, which the module exposes as ``last_collectives``."""

    group: Any
    world_size: int
    rank: int
    num_classes: int
    dtype: torch.dtype
    in_features: int
    class_start: int
    subcenters: int  # centres per class: the shard has num_local * subcenters rows
    margin: Resolved  # the module's margin, resolved by _setting_codes
    normalize_weight: bool
    beta: float
    reduction: str
    ignore_index: int
    sample_rate: float  # 1.0 when the call does not sample (eval mode)
    needs_grad: bool
    log: list[tuple[str, int]] = field(default_factory=list)

    def note(self, name: str, t: Tensor) -> None:
        self.log.append((name, t.numel() * t.element_size()))

    def run(self, name: str, t: Tensor, collective: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """``collective(*args, group=self.group, **kwargs)``, logged under ``name`` with ``t``'s
        bytes.  A failure there means another rank raised, ended, or did not arrive within the
        process group's timeout: the backend's error is raised again naming the collective and
        this rank (docs/distributed.md, "Faults and timeouts")."""
        self.note(name, t)
        try:
            collective(*args, group=self.group, **kwargs)
        except RuntimeError as e:  # gloo and NCCL errors (DistBackendError is a RuntimeError)
            raise RuntimeError(
                f"ClassParallelLSoftmaxLoss: the {name} collective failed on rank {self.rank}: another rank "
                f"raised, ended or did not reach it within the process group's timeout ({e})"
            ) from e


def _setting_codes(call: _Call) -> list[int]:
    """The int64 codes of :data:`_SETTINGS`; a ValueError/TypeError naming the setting if
    one of them is invalid (set on the module after it was built)."""
    if call.reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={call.reduction!r} must be one of {_REDUCTIONS}")
    if not isinstance(call.normalize_weight, bool):
        raise TypeError(f"normalize_weight={call.normalize_weight!r} must be a bool")
    call.margin = _resolve_margin(call.margin)  # the int or the kind the core is given
    call.subcenters = _check_subcenters(call.subcenters, call.margin)
    check_integer("ignore_index", call.ignore_index, -(2**63), 2**63 - 1)
    call.sample_rate = sampling.check_sample_rate(call.sample_rate)
    return [encode(getattr(call, name)) for name, encode, _ in _SETTINGS]


def _compare_ranks(
    call: _Call, problem: Exception | None, x: Any, weight: Tensor, setting_problem: Exception | None = None
) -> list[int]:
    """All-gather every rank's report (:data:`_META`) and raise on every rank if one of
    them has a problem or the ranks disagree; the batch sizes of the ranks otherwise.  The
    order, the same on every rank: a rank's invalid setting, then settings that differ
    (a rank built with another in_features or dtype also has an input problem: the
    difference is what the error names), then a rank's invalid input."""
    try:
        if setting_problem is not None:
            raise setting_problem
        own_settings = _setting_codes(call)
    except (TypeError, ValueError) as e:
        own_settings, setting_problem = [0] * len(_SETTINGS), e
    bad = setting_problem or problem
    mine = [
        0 if bad is None else (1 if isinstance(bad, TypeError) else 2) + 2 * (setting_problem is not None),
        x.shape[0] if bad is None else 0,
        *_pack(own_settings),
    ]
    local = torch.tensor(mine, dtype=torch.int64, device=weight.device)
    every = torch.empty(call.world_size * _META, dtype=torch.int64, device=weight.device)
    call.run("all_gather sizes", every, _all_gather, every, local)
    table = [(row[0], row[1], _unpack(row[2:])) for row in every.view(call.world_size, _META).tolist()]
    margins = None
    if len({settings[_MARGIN] for code, _, settings in table if code < 3}) > 1:
        # The ranks disagree on the margin (every rank sees it in the same table): gather the
        # margins in full, so that the error can name them (an error path only).
        full = _checks._margin_codes(call.margin) if setting_problem is None else [0] * _checks._MARGIN_WIDTH
        local = torch.tensor(full, dtype=torch.int64, device=weight.device)
        gathered = torch.empty(call.world_size * _checks._MARGIN_WIDTH, dtype=torch.int64, device=weight.device)
        call.run("all_gather margins", gathered, _all_gather, gathered, local)
        margins = gathered.view(call.world_size, _checks._MARGIN_WIDTH).tolist()

    def another(r: int) -> Exception:
        return _ERRORS[table[r][0] - 2 * (table[r][0] >= 3)](
            f"rank {r} of the process group passed an invalid x or target, or has an invalid setting, to "
            "ClassParallelLSoftmaxLoss (its own error says what); every rank raises so that none waits for it"
        )

    if setting_problem is not None:
        raise setting_problem
    for r, (code, _, _) in enumerate(table):
        if code >= 3:
            raise another(r)
    for r, (_, _, settings) in enumerate(table):
        for (name, _, decode), own, theirs in zip(_SETTINGS, own_settings, settings):
            if own != theirs:
                own_value, their_value = decode(own), decode(theirs)
                if name == "margin" and margins is not None:
                    own_value, their_value = call.margin, _checks._margin_of_codes(margins[r])
                hint = " (in eval mode a head samples no classes: sample_rate 1.0)" if name == "sample_rate" else ""
                raise ValueError(
                    f"every rank's ClassParallelLSoftmaxLoss must have the same {name}: rank {call.rank} has "
                    f"{name}={own_value!r}, rank {r} has {name}={their_value!r}{hint} (same arguments on every rank, "
                    "step() on every rank once per optimizer step, and a loss needing a backward on every rank or on "
                    "none)"
                )
    if problem is not None:
        raise problem
    for r, (code, _, _) in enumerate(table):
        if code:
            raise another(r)
    return [n for _, n, _ in table]


def _check_labels(call: _Call, label: Tensor, sizes: list[int]) -> None:
    """The gathered labels, checked identically on every rank: a bad label raises everywhere."""
    bad = ((label < 0) | (label >= call.num_classes)) & (label != call.ignore_index)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0, 0])
        starts = np.cumsum([0, *sizes])
        r = int(np.searchsorted(starts, i, side="right")) - 1
        raise ValueError(
            f"target must lie in [0, num_classes) = [0, {call.num_classes}) or equal "
            f"ignore_index={call.ignore_index}: rank {r}'s target[{i - starts[r]}]={int(label[i])}"
        )


def _gather(call: _Call, t: Tensor, n_max: int, fill: float) -> Tensor:
    """All-gather the ranks' rows, each padded to ``n_max`` rows with ``fill``."""
    if t.shape[0] < n_max:
        t = torch.cat([t, t.new_full((n_max - t.shape[0], *t.shape[1:]), fill)])
    out = t.new_empty((call.world_size * n_max, *t.shape[1:]))
    call.run(f"all_gather {'x' if t.dim() == 2 else 'target'}", out, _all_gather, out, t.contiguous())
    return out


def _unpad(t: Tensor, sizes: list[int], n_max: int) -> Tensor:
    """The real rows of a gathered padded tensor (a view when no rank was padded)."""
    if all(n == n_max for n in sizes):
        return t
    return torch.cat([t[r * n_max : r * n_max + n] for r, n in enumerate(sizes)])


def _pad(t: Tensor, sizes: list[int], n_max: int) -> Tensor:
    """The inverse of :func:`_unpad`: rows back into ``n_max``-row blocks per rank."""
    if all(n == n_max for n in sizes):
        return t
    out = t.new_zeros((len(sizes) * n_max, *t.shape[1:]))
    starts = np.cumsum([0, *sizes])
    for r, n in enumerate(sizes):
        out[r * n_max : r * n_max + n] = t[starts[r] : starts[r] + n]
    return out


class _ClassParallelLoss(torch.autograd.Function):
    """The loss of the global batch against all classes, from this rank's rows and shard."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, target: Tensor, call: _Call, sizes: list[int], label: Tensor | None = None
    ) -> Tensor:
        """``label``: the global labels, gathered and checked already (the sampled loss
        gathers them first to draw its classes, and renumbers them)."""
        n_max = max(sizes)
        n_total = sum(sizes)
        ctx.call, ctx.sizes = call, sizes
        ctx.empty = (x.shape, weight.shape) if n_total == 0 else None
        if n_total == 0:  # every rank knows: no further collective, a loss of 0
            return x.new_zeros(())
        xs = _unpad(_gather(call, x.detach(), n_max, 0.0), sizes, n_max)
        if label is None:
            label = _unpad(_gather(call, target.to(torch.int64), n_max, call.ignore_index), sizes, n_max)
            _check_labels(call, label, sizes)

        def stats(xa: Any, wa: Any, la: Any) -> Any:
            return _core.cross_entropy_shard_stats(
                xa, wa, la, class_start=call.class_start, num_classes=call.num_classes, margin=call.margin,
                beta=call.beta, ignore_index=call.ignore_index, subcenters=call.subcenters,
            )  # fmt: skip

        lse_local, tgt_local = _run(stats, x=xs, weight=weight.detach(), target=label)
        # lse_i = M_i + log sum_r exp(lse_i^r - M_i), M_i = max_r lse_i^r; loss_i = lse_i - sum_r t_i^r
        # (docs/derivatives.md, "Class shards").  Every shard has a class, so lse_i^r is finite.
        row_max = lse_local.clone()
        call.run("all_reduce max", row_max, dist.all_reduce, row_max, op=dist.ReduceOp.MAX)
        sums = torch.stack([torch.exp(lse_local - row_max), tgt_local])
        call.run("all_reduce sum", sums, dist.all_reduce, sums)
        lse = row_max + torch.log(sums[0])
        valid = label != call.ignore_index
        total = torch.where(valid, lse - sums[1], torch.zeros_like(lse)).sum()
        n_valid = int(valid.sum())
        if call.reduction == "mean":
            total = total / n_valid if n_valid else total * 0.0  # all ignored: 0, not 0/0
        ctx.save_for_backward(xs, weight.detach(), label, lse)
        return total.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        call, sizes = ctx.call, ctx.sizes
        if ctx.empty is not None:
            x_shape, w_shape = ctx.empty
            return grad_loss.new_zeros(x_shape), grad_loss.new_zeros(w_shape), None, None, None, None
        xs, weight, label, lse = ctx.saved_tensors

        # Class chunks: given the global lse, both chunkings take 3 GEMMs, but row chunks
        # re-read and re-write all of grad_w once per chunk; class chunks write each
        # chunk's rows of grad_w once.
        def backward(ga: Any, xa: Any, wa: Any, la: Any, lse_a: Any) -> Any:
            return _core.cross_entropy_backward(
                ga, xa, wa, la, margin=call.margin, beta=call.beta, reduction=call.reduction,
                ignore_index=call.ignore_index, lse=lse_a, class_start=call.class_start,
                num_classes=call.num_classes, chunking="classes", subcenters=call.subcenters,
            )  # fmt: skip

        g = grad_loss.detach().to(xs.dtype).contiguous()
        gx_term, grad_w = _run(backward, grad_loss=g, x=xs, weight=weight, target=label, lse=lse)
        # grad_x of the whole batch is the sum of the shards' terms; each rank keeps its own
        # rows, times the world size (see the class docstring: DDP then averages to exactly
        # the single-process gradient of the backbone).
        n_max = max(sizes)
        padded = _pad(gx_term, sizes, n_max)
        mine = padded.new_empty((n_max, padded.shape[1]))
        call.run("reduce_scatter grad_x", padded, _reduce_scatter, mine, padded.contiguous())
        grad_x = mine[: sizes[call.rank]] * call.world_size
        needs = ctx.needs_input_grad
        return (grad_x if needs[0] else None, grad_w if needs[1] else None, None, None, None, None)


class ClassParallelLSoftmaxLoss(sampling.SampledHead, _AnnealedHead):
    """The L-Softmax loss with its class weights sharded by class across a process group.

    Every rank of ``process_group`` (default: the default group; initialise it first,
    e.g. ``torch.distributed.init_process_group("nccl")`` under torchrun) builds the module
    with the same arguments.  Rank r of P holds ``weight`` (num_local, in_features) for the
    classes ``[class_start, class_stop)``, ``num_local = num_classes // P + (r <
    num_classes % P)``, the shards tiling ``[0, num_classes)`` in rank order; every rank must
    own a class (``num_classes >= P``).  The shard is initialised like nn.Linear's weight,
    each rank from its own random stream; to start from a given full weight, use
    :meth:`load_full_state_dict`.

    ``loss(x, target)`` takes this rank's batch, x (N_r, in_features) and target (N_r,)
    integer class indices in [0, num_classes) or ``ignore_index``; the ranks' batches may
    differ in size (an empty one too).  It gathers the features and labels of all ranks
    and returns the exact L-Softmax cross-entropy of the global batch (their concatenation
    in rank order) against all classes, the global mean over the rows not ignored
    (``reduction="mean"``; "sum": the sum), the same value on every rank: the value of
    :class:`LSoftmaxLoss` with the full weight on the concatenated batch.  Each rank holds
    only its chunk of logits, in the core's memory budget (``LSOFTMAX_CE_BUDGET``).

    Gradients, when every rank calls ``backward()`` on the loss (the collectives of the
    backward need all ranks): ``weight.grad`` is exactly the gradient of the global loss
    for this rank's classes.  ``x.grad`` is this rank's rows of the gradient of the global
    loss **times the world size P**: DistributedDataParallel averages the backbone's
    gradients over the P ranks, which then gives exactly the single-process gradient of
    the backbone (the convention of InsightFace's Partial FC).  This holds when DDP and
    this module use the same process group.  Keep ``weight`` out of DDP (each rank's shard
    is its own): wrap the backbone alone in DDP and give the optimizer both the backbone's
    and this module's parameters; if one module holds both, exclude the weight with
    ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model,
    ["<path>.weight"])`` before wrapping.

    ``margin``: an int (L-Softmax) or a margin object (``lsoftmax_core.SphereFace``,
    ``CosFace``, ``ArcFace``, ``CombinedMargin``), as in :class:`LSoftmaxLoss`; the ranks
    compare their margins by value.  beta follows ``schedule`` as in :class:`LSoftmaxLinear`
    (:meth:`step` once per optimizer step, on every rank).  ``normalize_weight=True`` normalises the shard's rows
    (exact: a row's norm is local to its shard), as in :class:`LSoftmaxLoss`.  Under
    ``torch.autocast`` float16/bfloat16 features are computed in float32.

    ``subcenters=k`` (default 1; a margin kind that normalises the weights), as in
    :class:`LSoftmaxLoss`: k centres per class, and each rank holds whole classes, so its
    ``weight`` is (num_local·k, in_features), rows ``[class_start·k, class_stop·k)`` of the
    full (num_classes·k, in_features) weight.  The class bounds, ``num_classes``, the
    labels and the checkpoints' shards count classes; :meth:`full_state_dict`,
    :meth:`merge_state_dicts` and :meth:`load_full_state_dict` move whole classes of k
    rows, and :meth:`logits` gives each of the rank's classes its largest centre.  The
    ranks compare their k with the other settings.

    ``sample_rate`` in (0, 1] (default 1.0: every class) and ``seed``: Partial FC's class
    sampling, as in :class:`LSoftmaxLoss`, per rank: in training mode the loss runs over the
    union of the ranks' sampled classes (each rank: its classes that are a target in the
    global batch, plus negatives drawn from a generator seeded by ``(seed, rank,
    sample_step)``, ``ceil(sample_rate * num_local)`` classes in all); unsampled rows get
    exactly zero gradient, ``last_sampled`` holds the rank's classes, :meth:`sampled_step`
    is Partial FC v1's optimizer step.  No collective is added (``adapters/torch/sampling.py``).

    Bad input raises a ValueError/TypeError on every rank instead of leaving the others
    waiting in a collective: each rank's own problem (shape, dtype, device, an invalid
    setting), its settings (num_classes, in_features, the weight's dtype, margin,
    normalize_weight, subcenters, ignore_index, beta, reduction, sample_rate (1.0 in eval
    mode): a rank that missed a ``step()`` has another beta), whether its loss needs a
    backward, and the gathered labels are compared on all ranks before anything is computed.  A rank that stops calling
    the head (or never calls ``backward()``) cannot be detected by the others: they wait
    in the next collective until the process group's timeout, then raise a RuntimeError
    (gloo) or are taken down by the watchdog (NCCL).  The default timeout is 30 minutes
    (gloo; 10 for NCCL): set a shorter one with ``torch.distributed.init_process_group(...,
    timeout=datetime.timedelta(seconds=...))`` (``new_group`` takes ``timeout`` too).

    Checkpoints: ``state_dict()`` is this rank's shard, with the iteration, the schedule,
    ``num_classes``, ``subcenters`` and the shard's bounds (a checkpoint must match them).  To change the
    world size, :meth:`full_state_dict` gathers the (num_classes·k, in_features) weight onto
    one rank (or :meth:`merge_state_dicts` joins the ranks' saved state dicts offline),
    and :meth:`load_full_state_dict` takes this rank's rows of a full one, at any world
    size.  A full state dict also loads into :class:`LSoftmaxLoss`, and the reverse.

    ``last_collectives``: (name, bytes) of each collective of the last forward and its
    backward, the bytes of the tensor each passes (all-gather: the gathered output;
    reduce-scatter: the summed input); ``last_comm_bytes`` their sum.  With N_max the
    largest batch of a rank, N the global batch, D features of s bytes:
    ``88*P + P*N_max*(8 + 2*D*s) + 24*N``, independent of num_classes
    (``docs/distributed.md``).
    """

    _noun = "loss"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        margin: int | Margin = 2,
        schedule: Schedule | None = None,
        normalize_weight: bool = False,
        reduction: str = "mean",
        ignore_index: int = -100,
        subcenters: int = 1,
        sample_rate: float = 1.0,
        seed: int = 0,
        process_group: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not isinstance(normalize_weight, bool):
            raise TypeError(f"normalize_weight={normalize_weight!r} must be a bool")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction={reduction!r} must be one of {_REDUCTIONS}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ClassParallelLSoftmaxLoss needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group first (torchrun sets its environment)"
            )
        world_size, rank = dist.get_world_size(process_group), dist.get_rank(process_group)
        if rank < 0:
            raise ValueError("process_group does not contain this process")
        total = check_integer("num_classes", num_classes, 1)
        if total < world_size:
            raise ValueError(
                f"num_classes={num_classes!r} must be at least the world size {world_size} (every rank holds a class)"
            )
        start, stop = _shard_bounds(total, world_size, rank)
        sizes = {"in_features": in_features, "num_local": stop - start}
        super().__init__(
            sizes, margin=margin, schedule=schedule, device=device, dtype=dtype, subcenters=subcenters
        )  # fmt: skip
        self.in_features, self.num_classes = int(in_features), total
        self.class_start, self.class_stop, self.num_local = start, stop, stop - start
        self.world_size, self.rank = world_size, rank
        self.process_group = process_group
        self.normalize_weight = normalize_weight
        self.reduction = reduction
        self.ignore_index = check_integer("ignore_index", ignore_index, -(2**63), 2**63 - 1)
        self._init_sampling(sample_rate, seed)
        self.last_collectives: list[tuple[str, int]] = []

    @staticmethod
    def shard_bounds(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
        """``(class_start, class_stop)`` of rank ``rank`` of ``world_size``."""
        total = check_integer("num_classes", num_classes, 1)
        p = check_integer("world_size", world_size, 1, total)
        return _shard_bounds(total, p, check_integer("rank", rank, 0, p - 1))

    @property
    def last_comm_bytes(self) -> int:
        """Bytes passed to the collectives by the last forward and its backward."""
        return sum(b for _, b in self.last_collectives)

    def _weight(self) -> Tensor:
        return F.normalize(self.weight, dim=1) if self.normalize_weight else self.weight

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        try:
            samples = self._samples()
        except (TypeError, ValueError):
            samples = False  # raised below, on every rank
        # Sampling normalises the sampled rows only (adapters/torch/sampling.py).
        weight = self.weight if samples else self._weight()
        device_type = self.weight.device.type
        autocast = isinstance(x, Tensor) and torch.is_autocast_enabled(device_type)
        if autocast and x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        if autocast and weight.dtype in (torch.float16, torch.bfloat16):
            weight = weight.float()
        problem = _checks._local_problem(x, target, weight, self.in_features)
        setting_problem = None
        try:
            beta = self.beta  # a schedule of the user's own may fail: on every rank, not this one alone
            rate = self.sample_rate if self.training else 1.0
            samples = self._samples()
        except (TypeError, ValueError) as e:
            beta, rate, samples, setting_problem = float("nan"), 1.0, False, e
        call = _Call(
            self.process_group, self.world_size, self.rank, self.num_classes, weight.dtype, self.in_features,
            self.class_start, self.subcenters, self.margin, self.normalize_weight, beta, self.reduction,
            self.ignore_index, rate,
            torch.is_grad_enabled() and (weight.requires_grad or (isinstance(x, Tensor) and x.requires_grad)),
        )  # fmt: skip
        self.last_collectives = call.log
        self.last_sampled = None
        sizes = _compare_ranks(call, problem, x, weight, setting_problem)
        if samples and sum(sizes) > 0:  # the same on every rank: the ranks compared their rates
            return sampling.class_parallel_sampled_loss(self, call, x, target, sizes, autocast)
        with torch.autocast(device_type, enabled=False):
            loss: Tensor = _ClassParallelLoss.apply(x, weight, target, call, sizes)
        return loss

    def logits(self, x: Tensor) -> Tensor:
        """This rank's chunk of the plain logits, ``x @ weight.T`` (N, num_local), for
        classes ``[class_start, class_stop)`` (a kind that normalises: its own plain logits,
        as :meth:`LSoftmaxLoss.logits`; with ``subcenters=k`` each class's largest centre);
        no collective."""
        return _class_logits(F.linear(*_plain_operands(x, self._weight(), self.margin)), self.subcenters)

    # Checkpoints ---------------------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        return {
            "margin": _margin_state(self.margin), "normalize_weight": self.normalize_weight,
            "subcenters": self.subcenters,
            "num_classes": self.num_classes, "class_start": self.class_start, "class_stop": self.class_stop,
        }  # fmt: skip

    def _mismatch(self, key: str, saved: Any, own: Any) -> str:
        if key not in ("num_classes", "class_start", "class_stop"):
            return super()._mismatch(key, saved, own)
        return (
            f"checkpoint has {key}={saved!r} but this rank's shard has {key}={own!r} (classes "
            f"[{self.class_start}, {self.class_stop}) of {self.num_classes}): a checkpoint of another world size "
            "or rank loads through load_full_state_dict"
        )

    def _full_extra_state(self) -> dict[str, Any]:
        """The extra state of a full checkpoint: what :class:`LSoftmaxLoss` saves."""
        return {
            "margin": _margin_state(self.margin), "normalize_weight": self.normalize_weight,
            "subcenters": self.subcenters, "iteration": self.iteration, "schedule": self.schedule.to_dict(),
            "sample_step": self.sample_step,
        }  # fmt: skip

    def full_state_dict(self, dst: int = 0) -> dict[str, Any] | None:
        """A collective (every rank calls it): the full checkpoint on rank ``dst`` of the
        group, ``{"weight": (num_classes·subcenters, in_features) CPU tensor, "_extra_state":
        {...}}``, the format of :class:`LSoftmaxLoss`; None on the other ranks.  The shards travel one
        at a time (point to point), so no device holds more than one shard of them."""
        # The ranks compare their dst (and their shards' rows per class) first: ranks waiting to
        # receive from one another would otherwise wait until the group's timeout.
        try:
            problem, dst = None, check_integer("dst", dst, 0, self.world_size - 1)
        except (TypeError, ValueError) as e:
            problem, dst = e, -1
        every = self.weight.new_empty(2 * self.world_size, dtype=torch.int64)
        mine = torch.tensor([dst, self.subcenters], device=self.weight.device)
        _all_gather(every, mine, group=self.process_group)
        if problem is not None:
            raise problem
        dsts, centres = every.view(self.world_size, 2).t().tolist()
        if len(set(dsts)) > 1:
            raise ValueError(f"every rank must pass the same dst to full_state_dict, got dst={dsts} in rank order")
        if len(set(centres)) > 1:
            raise ValueError(
                f"every rank's ClassParallelLSoftmaxLoss must have the same subcenters, got subcenters={centres} "
                "in rank order"
            )
        glob = (lambda r: r) if self.process_group is None else (
            lambda r: dist.get_global_rank(self.process_group, r)
        )  # fmt: skip
        weight = self.weight.detach()
        k = self.subcenters  # rows per class: class j is rows j*k ... j*k + k - 1
        full = None
        if self.rank == dst:
            full = torch.empty((self.num_classes * k, self.in_features), dtype=weight.dtype)
            full[self.class_start * k : self.class_stop * k] = weight.cpu()
        for r in range(self.world_size):
            if r == dst:
                continue
            start, stop = _shard_bounds(self.num_classes, self.world_size, r)
            if self.rank == r:
                dist.send(weight.contiguous(), dst=glob(dst), group=self.process_group)
            elif self.rank == dst:
                buf = weight.new_empty(((stop - start) * k, self.in_features))
                dist.recv(buf, src=glob(r), group=self.process_group)
                assert full is not None
                full[start * k : stop * k] = buf.cpu()
        if full is None:
            return None
        return {"weight": full, "_extra_state": self._full_extra_state()}

    @staticmethod
    def merge_state_dicts(shards: list[dict[str, Any]]) -> dict[str, Any]:
        """The full checkpoint from every rank's ``state_dict()`` (any order), offline: no
        process group needed.  Checks that the shards tile the classes and agree."""
        if not shards:
            raise ValueError("shards must hold every rank's state_dict, got none")
        needed = {"num_classes", "class_start", "class_stop", "margin", "normalize_weight", "iteration", "schedule"}
        kept = ("margin", "normalize_weight", "subcenters", "iteration", "schedule", "sample_step")
        for i, sd in enumerate(shards):
            extra = sd.get("_extra_state") if isinstance(sd, dict) else None
            if not (isinstance(extra, dict) and needed <= set(extra) and isinstance(sd.get("weight"), Tensor)):
                raise ValueError(
                    f"shards[{i}] must be a rank's state_dict(), with 'weight' and an '_extra_state' holding "
                    f"{sorted(needed)}, got {type(sd).__name__} with keys {sorted(sd) if isinstance(sd, dict) else []}"
                )
        states = sorted(
            ({**_SAVED_DEFAULTS, **s["_extra_state"]} for s in shards), key=lambda e: int(e["class_start"])
        )  # fmt: skip
        order = sorted(range(len(shards)), key=lambda i: int(shards[i]["_extra_state"]["class_start"]))
        total = states[0]["num_classes"]
        stop = 0
        for e in states:
            if e["num_classes"] != total or e["class_start"] != stop:
                raise ValueError(
                    f"shards must tile [0, num_classes) without gaps or overlaps: after class {stop} comes a shard "
                    f"[{e['class_start']}, {e['class_stop']}) of num_classes={e['num_classes']}"
                )
            stop = e["class_stop"]
            for key in kept:
                if e[key] != states[0][key]:
                    raise ValueError(f"shards disagree on {key}: {states[0][key]!r} and {e[key]!r}")
        if stop != total:
            raise ValueError(f"shards must tile [0, num_classes={total}): they end at class {stop}")
        k = states[0]["subcenters"]
        for i, e in zip(order, states):
            rows = int(shards[i]["weight"].shape[0])
            if rows != (e["class_stop"] - e["class_start"]) * k:
                raise ValueError(
                    f"shards[{i}]'s weight has {rows} rows, but classes [{e['class_start']}, {e['class_stop']}) of "
                    f"subcenters={k} rows each need {(e['class_stop'] - e['class_start']) * k}"
                )
        weight = torch.cat([shards[i]["weight"].detach().cpu() for i in order])
        extra = {key: states[0][key] for key in kept}
        return {"weight": weight, "_extra_state": extra}

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        """Load this rank's rows of a full checkpoint (:meth:`full_state_dict`,
        :meth:`merge_state_dicts`, or an :class:`LSoftmaxLoss`'s ``state_dict()``), at any
        world size; no collective (each rank calls it, e.g. on a memory-mapped
        ``torch.load(path, mmap=True)``).  Everything is checked before anything changes."""
        weight = state.get("weight") if isinstance(state, dict) else None
        k = self.subcenters
        if not isinstance(weight, Tensor) or tuple(weight.shape) != (self.num_classes * k, self.in_features):
            shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
            what = "num_classes" if k == 1 else f"num_classes * subcenters={k}"
            raise ValueError(
                f"state['weight'] must be the full ({what}, in_features) = ({self.num_classes * k}, "
                f"{self.in_features}) weight, got {shape}"
            )
        extra = state.get("_extra_state") or {}
        if not isinstance(extra, dict):
            raise ValueError(f"state['_extra_state'] must be a dict, got {type(extra).__name__}")
        extra = dict(extra)
        for key in ("num_classes", "class_start", "class_stop"):
            extra.pop(key, None)  # a shard's own bounds are this rank's, not the saved ones
        # A bare {"weight": W} keeps this module's iteration and schedule.
        own = {
            **self._config(), "iteration": self.iteration, "schedule": self.schedule.to_dict(),
            "sample_step": self.sample_step,
        }  # fmt: skip
        rows = weight[self.class_start * k : self.class_stop * k]  # whole classes of k rows
        shard = {"weight": rows, "_extra_state": {**own, **extra}}
        self.load_state_dict(shard)

    def full_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, dst: int = 0) -> dict[str, Any] | None:
        """Collective: ``optimizer``'s state for this head's weight in the full layout on
        ``dst`` (None elsewhere), as :meth:`full_state_dict` gathers the weight
        (``resharding.full_optimizer_state_dict``)."""
        return resharding.full_optimizer_state_dict(self, optimizer, dst)

    def load_full_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load this rank's rows of a full optimizer state (:meth:`full_optimizer_state_dict`)
        into ``optimizer``, at any world size (``resharding.load_full_optimizer_state_dict``)."""
        resharding.load_full_optimizer_state_dict(self, optimizer, state)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, classes=[{self.class_start}, "
            f"{self.class_stop}) of rank {self.rank}/{self.world_size}"
            f"{f', subcenters={self.subcenters}' if self.subcenters > 1 else ''}, margin={self.margin!r}, "
            f"normalize_weight={self.normalize_weight}, reduction={self.reduction!r}, schedule={self._schedule!r}"
        )

