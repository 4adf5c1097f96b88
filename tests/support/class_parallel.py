"""What the ranks of the class-parallel head's tests run (``tests/adapters/
test_torch_class_parallel.py``), importable in the spawned processes of
:func:`support.dist.run_ranks`: the problems (the same on every rank, from a seed), the
cases, and the rank functions, which return NumPy arrays for the test to compare.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IGNORE = -100
_REDUCTIONS_OF_THE_HEAD = ("mean", "sum")


@dataclass(frozen=True)
class Case:
    """One problem: the ranks' batch sizes (their number is the world size), the classes
    and how the labels fall."""

    name: str
    sizes: tuple[int, ...]
    num_classes: int = 1003
    d: int = 6
    margin: int = 2
    beta: float = 1.0
    dtype: str = "float64"
    ignored: float = 0.2
    normalize_weight: bool = False
    reduction: str = "mean"
    ignore_index: int = IGNORE
    # "random"; "boundaries": every label the first or last class of a shard; "first":
    # every label in rank 0's shard (the other ranks own no target in the batch)
    labels: str = "random"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def bounds(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """The tiling the head promises: rank r holds C // P + (r < C % P) classes, in order."""
    sizes = [num_classes // world_size + (r < num_classes % world_size) for r in range(world_size)]
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def problem(case: Case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole batch (the ranks' batches in rank order), the full weight and the labels,
    float64."""
    rng = np.random.default_rng(case.seed)
    n, c, p = sum(case.sizes), case.num_classes, len(case.sizes)
    x = rng.standard_normal((n, case.d)) * 2.0
    w = rng.standard_normal((c, case.d))
    if case.labels == "boundaries":
        edges = [e for a, b in bounds(c, p) for e in (a, b - 1)]
        label = np.array(edges, dtype=np.int64)[rng.integers(0, len(edges), n)]
    elif case.labels == "first":
        label = rng.integers(0, bounds(c, p)[0][1], n)
    else:
        label = rng.integers(0, c, n)
    label[rng.random(n) < case.ignored] = case.ignore_index
    return x, w, label


def cases_for(world_size: int) -> list[Case]:
    """Every case a group of ``world_size`` ranks runs: margins 1-4 and beta 0, 2, 1000 on
    C=1003 (uneven shards), labels on the shards' boundaries, a rank owning no target,
    unequal and empty batches, all rows ignored, normalised weights, "sum", float32, and a
    larger C for the bytes."""
    p = world_size
    even = (7,) * p
    out = [
        Case(f"m{m}-beta{b:g}", even, margin=m, beta=b, seed=10 * m + int(b) % 7)
        for m in (1, 2, 3, 4)
        for b in (0.0, 2.0, 1000.0)
    ]
    out += [
        Case("boundaries", even, margin=4, beta=0.0, labels="boundaries", ignored=0.0, seed=1),
        Case("first-shard-only", even, margin=3, beta=2.0, labels="first", seed=2),
        Case("unequal", tuple(3 + 4 * (r % 2) + r for r in range(p)), margin=2, beta=0.0, seed=3),
        Case("one-rank-empty", tuple(0 if r == p - 1 else 5 + r for r in range(p)), margin=4, beta=2.0, seed=4),
        Case("all-ignored", even, margin=2, beta=0.0, ignored=1.0, seed=5),
        Case("all-empty", (0,) * p, margin=2, beta=0.0, seed=6),
        Case("normalized", even, margin=4, beta=2.0, normalize_weight=True, seed=7),
        Case("sum", even, margin=3, beta=0.0, reduction="sum", seed=8),
        Case("ignore-a-real-class", even, margin=2, beta=2.0, ignore_index=500, ignored=0.3, seed=12),
        Case("float32", (9,) * p, margin=4, beta=2.0, dtype="float32", seed=9),
        Case("float32-m1", (9,) * p, margin=1, beta=0.0, dtype="float32", seed=10),
        Case("more-classes", even, num_classes=5000, margin=2, beta=0.0, seed=11),
    ]
    return out


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float64": torch.float64, "float32": torch.float32}[name]


def _head(case: Case, w: np.ndarray, group: Any) -> Any:
    import torch

    from lsoftmax_core import ConstantSchedule
    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    head = ClassParallelLSoftmaxLoss(
        case.d, case.num_classes, margin=case.margin, schedule=ConstantSchedule(case.beta),
        normalize_weight=case.normalize_weight, reduction=case.reduction, dtype=_torch_dtype(case.dtype),
        ignore_index=case.ignore_index, process_group=group,
    )  # fmt: skip
    head.load_full_state_dict({"weight": torch.from_numpy(w)})
    return head


def _rank(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def run_case(group: Any, case: Case) -> dict[str, Any]:
    """The loss and gradients this rank gets for ``case``."""
    import torch

    rank, _ = _rank(group)
    x, w, label = problem(case)
    start = sum(case.sizes[:rank])
    rows = slice(start, start + case.sizes[rank])
    head = _head(case, w, group)
    dtype = _torch_dtype(case.dtype)
    x_local = torch.from_numpy(x[rows]).to(dtype).requires_grad_()
    x_before = x_local.detach().clone()
    target = torch.from_numpy(label[rows])
    loss = head(x_local, target)
    loss.backward()
    assert torch.equal(x_local.detach(), x_before), "the input was modified"
    return {
        "loss": loss.item(), "loss_dtype": str(loss.dtype), "grad_x": x_local.grad.numpy(),
        "grad_w": head.weight.grad.numpy(), "bounds": (head.class_start, head.class_stop),
        "collectives": list(head.last_collectives), "bytes": head.last_comm_bytes,
    }  # fmt: skip


def error_of(fn: Any) -> tuple[str, str] | None:
    """(error type, message) of the TypeError/ValueError ``fn()`` raises, or None."""
    try:
        fn()
    except (TypeError, ValueError) as e:
        return type(e).__name__, str(e)
    return None


def run_errors(group: Any) -> dict[str, Any]:
    """Bad input on one rank (the last): every rank must raise, and the group must still
    work afterwards (the errors leave no collective half done)."""
    import torch

    from lsoftmax_core import ConstantSchedule

    rank, world_size = _rank(group)
    case = Case("errors", (5,) * world_size, num_classes=11)
    x, w, label = problem(case)
    head = _head(case, w, group)
    bad = rank == world_size - 1
    rows = slice(5 * rank, 5 * rank + 5)
    xl, tl = torch.from_numpy(x[rows]).requires_grad_(), torch.from_numpy(label[rows])
    out: dict[str, Any] = {}
    bad_label = tl.clone()
    if bad:
        bad_label[2] = 11
    out["label"] = error_of(lambda: head(xl, bad_label))
    bad_neg = tl.clone()
    if bad:
        bad_neg[0] = -1
    out["negative"] = error_of(lambda: head(xl, bad_neg))
    out["shape"] = error_of(lambda: head(xl[:, :3] if bad else xl, tl))
    out["dtype"] = error_of(lambda: head(xl.float() if bad else xl, tl))
    out["target-dtype"] = error_of(lambda: head(xl, tl.double() if bad else tl))
    out["not-a-tensor"] = error_of(lambda: head(xl.detach().numpy() if bad else xl, tl))
    if bad:
        head.schedule = ConstantSchedule(3.0)  # as if this rank had missed a step()
    out["beta"] = error_of(lambda: head(xl, tl))
    head.schedule = ConstantSchedule(case.beta)
    # Every setting that changes the loss is compared: normalize_weight on the last rank only.
    other = _head(Case("errors", (5,) * world_size, num_classes=11, normalize_weight=bad), w, group)
    out["normalize_weight"] = error_of(lambda: other(xl, tl))
    # A setting made invalid on one rank after construction raises there and on every rank.
    if bad:
        head.reduction = "none"
    out["bad-setting"] = error_of(lambda: head(xl, tl))
    head.reduction = case.reduction
    # A loss that needs a backward on some ranks only (the last computes it under no_grad).

    def no_grad_on_the_last_rank() -> Any:
        with torch.no_grad() if bad else contextlib.nullcontext():
            return head(xl, tl)

    out["needs_grad"] = error_of(no_grad_on_the_last_rank)
    before = head.weight.detach().clone()
    out["weight-unchanged"] = bool(torch.equal(before, head.weight.detach())) and head.weight.grad is None
    # The group still works: a good call gives the same loss on every rank.
    out["after"] = head(xl, tl).item()
    return out


def run_extras(group: Any) -> dict[str, Any]:
    """Autocast (bfloat16 features computed in float32) and the plain logits' chunk."""
    import torch

    rank, world_size = _rank(group)
    case = Case("extras", (4,) * world_size, num_classes=13, dtype="float32")
    x, w, label = problem(case)
    head = _head(case, w, group)
    rows = slice(4 * rank, 4 * rank + 4)
    xl, tl = torch.from_numpy(x[rows]).float(), torch.from_numpy(label[rows])
    xb = xl.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head(xb, tl)
    loss.backward()
    xf = xl.bfloat16().float().requires_grad_()
    want = head(xf, tl)
    want.backward()
    # Every row ignored: the loss is 0, so sqrt's upstream gradient is inf; ignored rows take
    # no part in the backward whatever it is (torch's cross_entropy gives 0 gradients).
    all_ignored = {}
    for reduction in _REDUCTIONS_OF_THE_HEAD:
        ignoring = _head(Case("ignored", case.sizes, num_classes=13, reduction=reduction), w, group)
        xi = xl.double().requires_grad_()
        ignoring(xi, torch.full_like(tl, IGNORE)).sqrt().backward()
        all_ignored[reduction] = (xi.grad.numpy(), ignoring.weight.grad.numpy())
    return {
        "all_ignored_sqrt": all_ignored,
        "autocast": (str(loss.dtype), loss.item(), want.item(), str(xb.grad.dtype)),
        "autocast_grad": (xb.grad.float().numpy(), xf.grad.bfloat16().float().numpy()),
        "logits": (head.logits(xl).detach().numpy(), xl.numpy() @ w[head.class_start : head.class_stop].T),
    }


def run_checkpoints(group: Any) -> dict[str, Any]:
    """The shard's state_dict, the full checkpoint gathered to a rank, and loading a full
    checkpoint at this world size."""
    import torch

    rank, world_size = _rank(group)
    import lsoftmax_core as lsm
    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss, LSoftmaxLoss

    c, d = 1003, 4
    sched = lsm.ExponentialSchedule(beta0=50.0, scale=0.5)
    head = ClassParallelLSoftmaxLoss(d, c, margin=3, schedule=sched, dtype=torch.float64, process_group=group)
    head.step()
    head.step()
    shard = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in head.state_dict().items()}
    out: dict[str, Any] = {"shard": shard, "bounds": (head.class_start, head.class_stop)}
    # The rank's own checkpoint loads back into a fresh module of the same layout.
    again = ClassParallelLSoftmaxLoss(d, c, margin=3, schedule=sched, dtype=torch.float64, process_group=group)
    again.load_state_dict(shard)
    out["reloaded"] = (bool(torch.equal(again.weight, shard["weight"])), again.iteration, again.beta)
    out["full_last"] = head.full_state_dict(dst=world_size - 1)
    # A dst that differs between the ranks, or is invalid on one of them: every rank raises.
    out["dst_differs"] = error_of(lambda: head.full_state_dict(dst=rank))
    out["dst_invalid"] = error_of(lambda: head.full_state_dict(dst=world_size if rank == world_size - 1 else 0))
    out["full_0"] = head.full_state_dict()
    # A full weight made elsewhere (any world size) loads as this rank's rows.
    full = torch.arange(c * d, dtype=torch.float64).reshape(c, d)
    fresh = ClassParallelLSoftmaxLoss(d, c, margin=3, schedule=sched, dtype=torch.float64, process_group=group)
    fresh.load_full_state_dict({"weight": full, "_extra_state": {"margin": 3, "normalize_weight": False,
                                                                 "iteration": 2, "schedule": sched.to_dict()}})
    out["loaded"] = fresh.weight.detach().clone()
    out["loaded_iteration"] = fresh.iteration
    # LSoftmaxLoss's own state_dict is a full checkpoint too.
    single = LSoftmaxLoss(d, c, margin=3, schedule=sched, dtype=torch.float64)
    for _ in range(3):
        single.step()
    from_single = ClassParallelLSoftmaxLoss(d, c, margin=3, schedule=sched, dtype=torch.float64, process_group=group)
    from_single.load_full_state_dict(single.state_dict())
    out["from_single"] = (
        bool(torch.equal(from_single.weight, single.weight[from_single.class_start : from_single.class_stop])),
        from_single.iteration,
    )
    # Another rank's shard must not load here, and nothing changes when it is refused.
    if world_size > 1:
        other = ClassParallelLSoftmaxLoss.shard_bounds(c, world_size, (rank + 1) % world_size)
        foreign = {"weight": torch.zeros(other[1] - other[0], d, dtype=torch.float64),
                   "_extra_state": {**shard["_extra_state"], "class_start": other[0], "class_stop": other[1]}}
        before = fresh.weight.detach().clone()
        out["foreign"] = error_of(lambda: fresh.load_state_dict(foreign))
        out["foreign_unchanged"] = bool(torch.equal(before, fresh.weight.detach()))
    # A refused checkpoint (another margin, a bad iteration) leaves the shard and the
    # settings as they were, through either load.
    before = (fresh.weight.detach().clone(), fresh.get_extra_state())
    other_full = {"weight": full + 1.0, "_extra_state": {"margin": 2}}
    out["margin_mismatch"] = error_of(lambda: fresh.load_full_state_dict(other_full))
    other_shard = {"weight": shard["weight"] + 1.0, "_extra_state": {**shard["_extra_state"], "margin": 2}}
    out["shard_margin_mismatch"] = error_of(lambda: fresh.load_state_dict(other_shard))
    negative = {"weight": full + 1.0, "_extra_state": {"iteration": -1}}
    out["negative_iteration"] = error_of(lambda: fresh.load_full_state_dict(negative))
    out["refused_unchanged"] = bool(torch.equal(before[0], fresh.weight.detach())) and (
        before[1] == fresh.get_extra_state()
    )
    out["wrong_shape"] = error_of(lambda: fresh.load_full_state_dict({"weight": full[:-1]}))
    out["too_many_ranks"] = error_of(
        lambda: ClassParallelLSoftmaxLoss(d, world_size - 1 or 0, margin=2, process_group=group)
    )
    return out


@dataclass(frozen=True)
class Training:
    """A few SGD steps of a small backbone with the head: the global batch of each step
    is split over the ranks (unequal parts when ``sizes`` differ)."""

    sizes: tuple[int, ...]
    steps: int = 4
    d_in: int = 5
    d: int = 4
    num_classes: int = 1003
    margin: int = 3
    lr: float = 0.5
    seed: int = 0


def training_data(t: Training) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The initial parameters (backbone, full head weight) and each step's global batch."""
    rng = np.random.default_rng(t.seed)
    init = {
        "body.weight": rng.standard_normal((t.d, t.d_in)) * 0.5, "body.bias": rng.standard_normal(t.d) * 0.1,
        "head.weight": rng.standard_normal((t.num_classes, t.d)),
    }  # fmt: skip
    n = sum(t.sizes)
    batches = [(rng.standard_normal((n, t.d_in)), rng.integers(0, t.num_classes, n)) for _ in range(t.steps)]
    for _, y in batches:
        y[rng.random(n) < 0.15] = IGNORE
    return init, batches


def run_training(group: Any, t: Training) -> dict[str, Any]:
    """The backbone under DistributedDataParallel, the head class-parallel, one SGD over
    both; returns the losses and the final parameters (the full head weight on rank 0)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    import lsoftmax_core as lsm
    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    rank, _ = _rank(group)
    init, batches = training_data(t)
    body = torch.nn.Linear(t.d_in, t.d).double()
    with torch.no_grad():
        body.weight.copy_(torch.from_numpy(init["body.weight"]))
        body.bias.copy_(torch.from_numpy(init["body.bias"]))
    ddp = DDP(body, process_group=group)
    head = ClassParallelLSoftmaxLoss(
        t.d, t.num_classes, margin=t.margin, schedule=lsm.ExponentialSchedule(beta0=10.0, scale=0.5),
        dtype=torch.float64, process_group=group,
    )  # fmt: skip
    head.load_full_state_dict({"weight": torch.from_numpy(init["head.weight"])})
    opt = torch.optim.SGD([*ddp.parameters(), *head.parameters()], lr=t.lr)
    start = sum(t.sizes[:rank])
    rows = slice(start, start + t.sizes[rank])
    losses = []
    for xb, yb in batches:
        loss = head(torch.tanh(ddp(torch.from_numpy(xb[rows]))), torch.from_numpy(yb[rows]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        head.step()
        losses.append(loss.item())
    full = head.full_state_dict()
    return {
        "losses": losses, "body.weight": body.weight.detach().numpy().copy(),
        "body.bias": body.bias.detach().numpy().copy(),
        "head.weight": None if full is None else full["weight"].numpy(),
    }  # fmt: skip


def run_all(group: Any, with_training: Training | None) -> dict[str, Any]:
    """Everything one group runs: the cases, the errors, the checkpoints, and (when
    given) the DDP training."""
    _, world_size = _rank(group)
    out: dict[str, Any] = {"cases": {case.name: run_case(group, case) for case in cases_for(world_size)}}
    out["errors"] = run_errors(group)
    out["checkpoints"] = run_checkpoints(group)
    out["extras"] = run_extras(group)
    if with_training is not None:
        out["training"] = run_training(group, with_training)
    return out


# The groups the tests run, as subgroups of one spawned world of 4 processes (one start of
# 4 interpreters instead of 10): the group of P ranks, its members in group-rank order.  The
# subgroups do not start at global rank 0, so group ranks differ from global ranks.
GROUPS = {4: (0, 1, 2, 3), 3: (1, 2, 3), 2: (2, 3), 1: (0,)}


def run_world(rank: int, world_size: int, training: Training) -> dict[int, Any]:
    """Every group of :data:`GROUPS` this process belongs to: {P: run_all's result}."""
    import torch.distributed as dist

    assert world_size == 4
    groups = {p: dist.new_group(list(members)) for p, members in GROUPS.items()}  # every rank, same order
    return {
        p: run_all(groups[p], training if p == len(training.sizes) else None)
        for p, members in GROUPS.items()
        if rank in members
    }


def run_skipped_backward(rank: int, world_size: int, flag: str) -> dict[str, Any]:
    """Rank 1 computes the loss and never calls backward (it waits, alive, until rank 0 has
    finished or 60 s have passed); rank 0's backward waits in the reduce-scatter until the
    group's timeout, then raises: what it raised, and how long it waited."""
    import time
    from pathlib import Path

    import torch

    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    head = ClassParallelLSoftmaxLoss(4, 6, margin=2, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = head(x, torch.tensor([0, 3, 5]))
    if rank != 0:
        deadline = time.monotonic() + 60.0
        while not Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"skipped": True}
    t0 = time.monotonic()
    try:
        loss.backward()
        return {"error": None, "waited": time.monotonic() - t0}
    except RuntimeError as e:
        return {"error": (type(e).__name__, str(e)), "waited": time.monotonic() - t0}
    finally:
        Path(flag).touch()


def run_cuda(rank: int, world_size: int) -> dict[str, Any]:
    """On an NCCL group, one GPU per rank: the checks and collectives before the core
    (a bad label raises), the full checkpoint, and the loss and gradients (the CuPy
    backend's class shards) against the single-process fused loss on the CPU."""
    import torch

    case = Case("cuda", (6,) * world_size, num_classes=1003, margin=4, beta=2.0, dtype="float32")
    x, w, label = problem(case)
    head = _head(case, w, None).cuda()
    rows = slice(6 * rank, 6 * rank + 6)
    x_local = torch.from_numpy(x[rows]).float()
    target = torch.from_numpy(label[rows])
    bad = target.clone()
    bad[0] = 1003
    out: dict[str, Any] = {"bad_label": error_of(lambda: head(x_local.cuda(), bad.cuda()))}
    full = head.full_state_dict()
    out["full_ok"] = full is None or bool(torch.equal(full["weight"], torch.from_numpy(w).float()))
    xc = x_local.cuda().requires_grad_()
    loss = head(xc, target.cuda())
    loss.backward()
    # The single-process fused loss on the CPU over the whole batch.
    from lsoftmax_core.adapters.torch import lsoftmax_cross_entropy

    xr = torch.from_numpy(x).float().requires_grad_()
    wr = torch.from_numpy(w).float().requires_grad_()
    want = lsoftmax_cross_entropy(xr, wr, torch.from_numpy(label), margin=case.margin, beta=case.beta)
    want.backward()
    out["loss"] = (loss.item(), want.item())
    out["grad_x"] = (xc.grad.cpu().numpy(), world_size * xr.grad[rows].numpy())
    out["grad_w"] = (head.weight.grad.cpu().numpy(), wr.grad[head.class_start : head.class_stop].numpy())
    return out
