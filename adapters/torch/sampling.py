"""Partial-FC class sampling (``sample_rate``) for :class:`LSoftmaxLoss` and
:class:`ClassParallelLSoftmaxLoss`: each training step's loss runs over every class that is
a target in the (global) batch plus uniformly drawn negatives, as InsightFace's Partial FC.

The rule, per rank (a single process is rank 0 of 1), at sampling step t (the module's
``sample_step``, saved in its ``state_dict``), for the rank's C_local classes:

* positives: the rank's classes that are a target anywhere in the global batch (rows
  labelled ``ignore_index`` excluded);
* budget: ``max(1, ceil(sample_rate * C_local))`` classes in all (the product rounded to 6
  decimals first, so that 0.3 * 10 is 3 and not 4); every positive is kept when they alone
  exceed it;
* negatives: ``perm = torch.randperm(C_local, generator=g)`` with ``g`` seeded by
  :func:`generator_seed` ``(seed, rank, t)`` on the weight's device, the classes of
  ``perm`` that are not positives, in ``perm``'s order, the first ``budget - #positives``;
* the sampled classes sorted (so the sub-weight's rows, and the result, follow class order);
  with ``subcenters=k`` a class's k rows go together.

The loss is the margin softmax cross-entropy over the sampled classes of all ranks (their
union, the same on every rank): the sub-weight ``weight.index_select(0, rows)`` runs through
the unsampled head's machinery with ``num_classes`` the number of sampled classes, this
rank's ``class_start`` the sampled classes of the ranks before it, and the labels renumbered
into the sampled classes.  Autograd's ``index_select`` backward then gives the unsampled
rows exactly zero gradient.

Every rank can count every rank's sampled classes from the gathered labels (the positives
per shard, and the budgets, which depend on C_local only), so sampling adds no collective:
the collectives and their bytes are those of the unsampled head.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lsoftmax_core.checks import check_integer

__all__ = ["check_sample_rate", "generator_seed", "sample_budget", "sample_classes"]

# What an ignored row's label becomes in the sampled problem: the renumbered labels fill
# [0, S), which may contain the user's ignore_index (any integer, a real class index too).
_SAMPLED_IGNORE = -1


def check_sample_rate(value: object) -> float:
    """``value`` as a float in (0, 1], or an error naming ``sample_rate``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"sample_rate={value!r} must be a real number in (0, 1], not {type(value).__name__}")
    v = float(value)
    if not (0.0 < v <= 1.0):
        raise ValueError(f"sample_rate={value!r} must be in (0, 1] (1.0: every class, no sampling)")
    return v


def check_seed(value: object) -> int:
    return check_integer("seed", value, 0, 2**63 - 1)


def generator_seed(seed: int, rank: int, step: int) -> int:
    """The seed of the generator drawing rank ``rank``'s negatives at sampling step
    ``step``: a 63-bit hash of the three (neighbouring steps and ranks get unrelated
    streams)."""
    digest = hashlib.blake2b(np.array([seed, rank, step], dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_budget(sample_rate: float, num_local: int) -> int:
    """``max(1, ceil(sample_rate * num_local))``, the product rounded to 6 decimals first
    (float64 makes 0.3 * 10 3.0000000000000004); at most ``num_local``."""
    return min(num_local, max(1, math.ceil(round(sample_rate * num_local, 6))))


def sample_classes(
    positives: Tensor, num_local: int, sample_rate: float, seed: int, rank: int, step: int
) -> Tensor:
    """The rank's sampled classes (sorted local indices, int64), from its ``positives``
    (sorted unique local indices) by the rule of this module's docstring."""
    budget = sample_budget(sample_rate, num_local)
    need = budget - positives.numel()
    if need <= 0:
        return positives
    g = torch.Generator(device=positives.device)
    g.manual_seed(generator_seed(seed, rank, step))
    perm = torch.randperm(num_local, generator=g, device=positives.device)
    is_pos = torch.zeros(num_local, dtype=torch.bool, device=positives.device)
    is_pos[positives] = True
    negatives = perm[~is_pos[perm]][:need]
    return torch.sort(torch.cat([positives, negatives])).values


def _rows(classes: Tensor, subcenters: int) -> Tensor:
    """The weight rows of local classes: class j's centres are rows j·k ... j·k + k - 1."""
    if subcenters == 1:
        return classes
    return (classes[:, None] * subcenters + torch.arange(subcenters, device=classes.device)).reshape(-1)


class SampledHead:
    """What the two sampling heads add to :class:`_AnnealedHead`: ``sample_rate``,
    ``seed``, the sampling step (saved in ``state_dict``), ``last_sampled`` and
    :meth:`sampled_step` (Partial FC v1's optimizer convention)."""

    sample_rate: float
    seed: int
    sample_step: int
    last_sampled: Tensor | None
    weight: torch.nn.Parameter
    subcenters: int
    training: bool

    def _init_sampling(self, sample_rate: object, seed: object) -> None:
        self.sample_rate = check_sample_rate(sample_rate)
        self.seed = check_seed(seed)
        #: The number of sampled forwards so far: the step of the generator's seed.
        self.sample_step = 0
        #: The classes (global indices, sorted, int64) this rank sampled in the last
        #: forward; None when it sampled none (sample_rate 1.0, eval mode).
        self.last_sampled = None

    def _samples(self) -> bool:
        """Whether this forward samples: training mode and a sample_rate below 1 (eval
        mode and ``logits()`` take every class)."""
        return self.training and check_sample_rate(self.sample_rate) < 1.0

    # Checkpoints: the sampling step travels with the iteration ------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "sample_step": self.sample_step}  # type: ignore[misc]

    def _restored(self, state: Any) -> tuple[int, Any]:
        restored = super()._restored(state)  # type: ignore[misc]
        check_integer("sample_step", state.get("sample_step", 0), 0)  # a checkpoint before sampling: 0
        return restored  # type: ignore[no-any-return]

    def set_extra_state(self, state: Any) -> None:
        super().set_extra_state(state)  # type: ignore[misc]
        self.sample_step = int(state.get("sample_step", 0))

    # Partial FC v1 ----------------------------------------------------------------------

    def sampled_step(self, optimizer: torch.optim.Optimizer) -> Any:
        """``optimizer.step()`` with the head's weight restricted to the rows sampled by
        the last forward (Partial FC v1): the unsampled rows of the weight and of every
        optimizer state shaped like it (SGD's ``momentum_buffer``, Adam's ``exp_avg``,
        ``exp_avg_sq``, ``max_exp_avg_sq``) are left bit for bit as they were, so momentum
        and weight decay do not move them; the sampled rows get exactly the update the
        optimizer gives them.  Scalar state (Adam's ``step``) is the weight's, advanced once
        per call for all rows.  A state the step creates (the first step) starts at zero on
        the unsampled rows.  Other parameters of ``optimizer`` (the backbone) step as usual.
        Without a sampled forward (sample_rate 1.0, eval mode) it is ``optimizer.step()``.
        Call it instead of ``optimizer.step()``, after ``backward()``."""
        p = self.weight
        state = optimizer.state
        if not any(q is p for group in optimizer.param_groups for q in group["params"]):
            raise ValueError(
                f"optimizer={type(optimizer).__name__} does not hold this head's weight: give the optimizer "
                "head.parameters() (with the backbone's)"
            )
        classes = self.last_sampled
        if classes is None:
            return optimizer.step()
        start = int(getattr(self, "class_start", 0))
        rows = _rows(classes.to(p.device) - start, self.subcenters)
        own = state[p] if p in state else None
        full_state = {k: v for k, v in (own or {}).items() if isinstance(v, Tensor) and v.shape == p.shape}
        full, grad = p.data, p.grad
        with torch.no_grad():
            p.grad = None
            p.data = full.index_select(0, rows)
            p.grad = None if grad is None else grad.index_select(0, rows)
            for k, v in full_state.items():
                state[p][k] = v.index_select(0, rows)
        try:
            result = optimizer.step()
        finally:
            with torch.no_grad():
                full.index_copy_(0, rows, p.data)
                sub_state = state[p] if p in state else {}
                for k, v in list(sub_state.items()):
                    if k in full_state:
                        full_state[k].index_copy_(0, rows, v)
                        sub_state[k] = full_state[k]
                    elif isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == rows.numel():
                        # Made by this step (the first): zero on the rows it did not see.
                        whole = v.new_zeros((full.shape[0], *v.shape[1:]))
                        sub_state[k] = whole.index_copy_(0, rows, v)
                p.grad = None
                p.data = full
                p.grad = grad
        return result


def single_sampled_loss(head: Any, x: Tensor, target: Tensor) -> Tensor:
    """:class:`LSoftmaxLoss`'s loss over its sampled classes (rank 0 of 1)."""
    from .loss import lsoftmax_cross_entropy

    c, k, ignore = head.num_classes, head.subcenters, head.ignore_index
    ok = isinstance(target, Tensor) and not (
        target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool
    )
    if ok:
        t = target.to(torch.int64)
        ignored = t == ignore
        ok = t.dim() == 1 and bool((((t >= 0) & (t < c)) | ignored).all())
    if not ok:
        # A bad target: the unsampled loss raises the core's error naming it, and nothing changed.
        return head._dense(x, target)  # type: ignore[no-any-return]
    positives = torch.unique(t[~ignored].to(head.weight.device))
    classes = sample_classes(positives, c, head.sample_rate, head.seed, 0, head.sample_step)
    weight = head.weight.index_select(0, _rows(classes, k))
    if head.normalize_weight:
        weight = F.normalize(weight, dim=1)
    local = torch.searchsorted(classes, t.to(classes.device))
    label = torch.where(ignored.to(classes.device), _SAMPLED_IGNORE, local).to(target.device)
    loss = lsoftmax_cross_entropy(
        x, weight, label, margin=head.margin, beta=head._beta_tensor, reduction=head.reduction,
        ignore_index=_SAMPLED_IGNORE, subcenters=k,
    )  # fmt: skip
    head.last_sampled, head.sample_step = classes, head.sample_step + 1
    return loss


def class_parallel_sampled_loss(
    head: Any, call: Any, x: Tensor, target: Tensor, sizes: list[int], autocast: bool
) -> Tensor:
    """:class:`ClassParallelLSoftmaxLoss`'s loss over the sampled classes of every rank,
    after the ranks have compared their settings (``call``: the same sample_rate and mode
    on every rank, so every rank comes here)."""
    from . import parallel as par

    n_max = max(sizes)
    label = par._unpad(par._gather(call, target.to(torch.int64), n_max, call.ignore_index), sizes, n_max)
    par._check_labels(call, label, sizes)  # the same on every rank: a bad label raises everywhere
    ignored = label == call.ignore_index
    # Every rank's sampled count from the gathered labels: its positives and its budget.
    # The shards' starts, then num_classes (rank P's start).
    starts = torch.tensor(
        [par._shard_bounds(call.num_classes, call.world_size, r)[0] for r in range(call.world_size + 1)],
        device=label.device,
    )  # fmt: skip
    unique = torch.unique(label[~ignored])
    owner = torch.searchsorted(starts, unique, right=True) - 1
    positives_per_rank = torch.bincount(owner, minlength=call.world_size).tolist()
    num_locals = (starts[1:] - starts[:-1]).tolist()
    counts = [
        max(sample_budget(head.sample_rate, c), n) for c, n in zip(num_locals, positives_per_rank)
    ]  # fmt: skip
    prefix = [0, *np.cumsum(counts).tolist()]
    mine = unique[owner == call.rank] - call.class_start
    classes = sample_classes(
        mine.to(head.weight.device), num_locals[call.rank], head.sample_rate, head.seed, call.rank, head.sample_step
    )  # fmt: skip
    assert classes.numel() == counts[call.rank]
    # Labels renumbered: a label of this rank's is its place among the sampled classes; a
    # label of rank r's only has to lie in r's sampled range (the core reads only whether a
    # label is its own), so it becomes r's first sampled index.
    lab_owner = torch.searchsorted(starts, label.clamp(min=0), right=True) - 1
    first = torch.tensor(prefix[:-1], device=label.device)[lab_owner.clamp(max=call.world_size - 1)]
    own = (lab_owner == call.rank) & ~ignored
    place = torch.searchsorted(classes.to(label.device), (label - call.class_start).clamp(min=0))
    renumbered = torch.where(own, prefix[call.rank] + place, first)
    renumbered = torch.where(ignored, _SAMPLED_IGNORE, renumbered)
    weight = head.weight.index_select(0, _rows(classes, call.subcenters))
    if head.normalize_weight:
        weight = F.normalize(weight, dim=1)
    if autocast and weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()
    sampled = replace(
        call, num_classes=prefix[-1], class_start=prefix[call.rank], ignore_index=_SAMPLED_IGNORE
    )  # fmt: skip
    with torch.autocast(head.weight.device.type, enabled=False):
        loss: Tensor = par._ClassParallelLoss.apply(x, weight, target, sampled, sizes, renumbered)
    head.last_sampled, head.sample_step = classes + call.class_start, head.sample_step + 1
    return loss
