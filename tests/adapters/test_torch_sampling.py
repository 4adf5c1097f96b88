"""Partial-FC class sampling (``sample_rate``) on LSoftmaxLoss and ClassParallelLSoftmaxLoss:
the sampled classes follow the documented rule (every target, a budget of
ceil(rate · C_local), negatives from a generator seeded by (seed, rank, step)); the loss is
the core's fused loss over the sampled classes for every kind, sub-centres included, with
exactly zero gradient on the unsampled rows; 1.0 is the unsampled loss bit for bit; eval
uses every class; the optimizer conventions (v2: a plain step; v1: ``sampled_step``) with
SGD + momentum + weight decay and Adam; the class-parallel head at 2 and 3 gloo ranks equals
the single-process loss over the same sampled classes; the ranks compare sample_rate,
in_features and dtype.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss, LSoftmaxLoss, sampling

from support.class_parallel import error_of

IGNORE = -100
KINDS = {
    "lsoftmax": (3, 1),
    "cosface": (lsm.CosFace(m=0.35, s=8.0), 1),
    "arcface-k2": (lsm.ArcFace(m=0.5, s=8.0), 2),
    "sphereface": (lsm.SphereFace(m=3), 1),
}
C, D = 41, 5
PARALLEL_TIMEOUT_S = 240.0
GROUPS = {3: (0, 1, 2), 2: (1, 2)}  # subgroups of one spawned world of 3 (group ranks != global ranks)


def _problem(n: int, c: int = C, k: int = 1, *, seed: int = 0, ignored: float = 0.2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64) * 2.0
    w = torch.randn(c * k, D, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignored] = IGNORE
    return x, w, target


def _rows(classes: torch.Tensor, k: int) -> torch.Tensor:
    return (classes[:, None] * k + torch.arange(k)).reshape(-1)


def _loss_head(kind: str, c: int = C, **kw: Any) -> LSoftmaxLoss:
    margin, k = KINDS[kind]
    return LSoftmaxLoss(D, c, margin=margin, subcenters=k, schedule=lsm.ConstantSchedule(1.5), dtype=torch.float64,
                        **kw)  # fmt: skip


def _budget(rate: float, c: int) -> int:
    return max(1, math.ceil(round(rate * c, 6)))


# Single process -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_the_sampled_loss_is_the_core_loss_over_the_sampled_classes_with_zero_gradient_elsewhere(kind) -> None:
    margin, k = KINDS[kind]
    x, w, target = _problem(12, k=k, seed=1)
    head = _loss_head(kind, sample_rate=0.5, seed=7)
    with torch.no_grad():
        head.weight.copy_(w)
    xr = x.clone().requires_grad_()
    loss = head(xr, target)
    loss.backward()
    classes = head.last_sampled
    positives = torch.unique(target[target != IGNORE])
    assert torch.equal(classes, torch.sort(classes).values) and bool(torch.isin(positives, classes).all())
    assert classes.numel() == max(_budget(0.5, C), positives.numel()) == 21
    # The core's fused loss (NumPy) on the sampled rows, the labels renumbered.
    label = torch.where(target == IGNORE, IGNORE, torch.searchsorted(classes, target))
    rows = _rows(classes, k)
    want, gx, gw = lsm.cross_entropy_with_grad(
        x.numpy(), w[rows].numpy(), label.numpy(), margin=margin, beta=1.5, subcenters=k
    )  # fmt: skip
    np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
    np.testing.assert_allclose(xr.grad.numpy(), gx, rtol=0, atol=1e-12)
    np.testing.assert_allclose(head.weight.grad[rows].numpy(), gw, rtol=0, atol=1e-12)
    unsampled = torch.ones(C * k, dtype=torch.bool)
    unsampled[rows] = False
    assert torch.count_nonzero(head.weight.grad[unsampled]) == 0 and unsampled.sum() == (C - 21) * k


def test_normalize_weight_normalises_the_sampled_rows_and_leaves_the_others_without_gradient() -> None:
    x, w, target = _problem(9, seed=2)
    head = LSoftmaxLoss(D, C, margin=2, normalize_weight=True, sample_rate=0.25, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    head(x, target).backward()
    rows = head.last_sampled
    label = torch.where(target == IGNORE, IGNORE, torch.searchsorted(rows, target))
    wr = w.clone().requires_grad_()
    want = lsm.adapters.torch.lsoftmax_cross_entropy(x, torch.nn.functional.normalize(wr[rows], dim=1), label,
                                                     margin=2)  # fmt: skip
    want.backward()
    torch.testing.assert_close(head.weight.grad, wr.grad, rtol=0, atol=1e-12)
    assert torch.count_nonzero(head.weight.grad.abs().sum(1)) == rows.numel()


def test_targets_beyond_the_budget_are_all_kept() -> None:
    target = torch.arange(30) % 25  # 25 distinct targets, budget ceil(0.1 * 41) = 5
    head = _loss_head("cosface", sample_rate=0.1)
    head(torch.randn(30, D, dtype=torch.float64), target)
    assert torch.equal(head.last_sampled, torch.arange(25))


def test_sampling_follows_the_documented_rule_and_is_reproducible() -> None:
    x, w, target = _problem(10, k=2, seed=3)
    runs = []
    for _ in range(2):
        head = _loss_head("arcface-k2", sample_rate=0.3, seed=11)
        with torch.no_grad():
            head.weight.copy_(w)
        runs.append([(head(x, target).item(), head.last_sampled.clone()) for _ in range(3)])
        assert head.sample_step == 3
    assert runs[0][0][0] == runs[1][0][0] and all(torch.equal(a[1], b[1]) for a, b in zip(*runs))
    assert not torch.equal(runs[0][0][1], runs[0][1][1])  # another step, other negatives
    positives = torch.unique(target[target != IGNORE])
    for step, (_, got) in enumerate(runs[0]):
        g = torch.Generator().manual_seed(sampling.generator_seed(11, 0, step))
        perm = torch.randperm(C, generator=g)
        negatives = perm[~torch.isin(perm, positives)][: _budget(0.3, C) - positives.numel()]
        assert torch.equal(got, torch.sort(torch.cat([positives, negatives])).values), step
    other_seed = _loss_head("arcface-k2", sample_rate=0.3, seed=12)
    other_seed(x, target)
    assert not torch.equal(other_seed.last_sampled, runs[0][0][1])


def test_sample_rate_one_is_the_unsampled_loss_bit_for_bit_and_eval_uses_every_class() -> None:
    x, w, target = _problem(10, k=2, seed=4)
    plain, one, half = (_loss_head("arcface-k2", **kw) for kw in ({}, {"sample_rate": 1.0}, {"sample_rate": 0.5}))
    results = []
    for head in (plain, one, half):
        with torch.no_grad():
            head.weight.copy_(w)
        head.eval() if head is half else head.train()
        xr = x.clone().requires_grad_()
        loss = head(xr, target)
        loss.backward()
        results.append((loss.detach(), xr.grad, head.weight.grad))
    for got in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, results[0]))
    assert one.last_sampled is None and half.last_sampled is None and half.sample_step == 0
    assert torch.equal(half.logits(x), plain.logits(x)) and half.logits(x).shape == (10, C)
    half.train()
    assert half(x, target).item() != results[0][0].item() and half.sample_step == 1


def test_the_sampling_step_is_saved_and_a_resumed_run_draws_the_same_classes() -> None:
    x, _, target = _problem(8, seed=5)
    head = _loss_head("cosface", sample_rate=0.2, seed=3)
    head(x, target)
    state = copy.deepcopy(head.state_dict())
    assert state["_extra_state"]["sample_step"] == 1
    head(x, target)
    resumed = _loss_head("cosface", sample_rate=0.2, seed=3)
    resumed.load_state_dict(state)
    assert resumed.sample_step == 1
    resumed(x, target)
    assert torch.equal(resumed.last_sampled, head.last_sampled)
    old = {**state, "_extra_state": {k: v for k, v in state["_extra_state"].items() if k != "sample_step"}}
    resumed.load_state_dict(old)  # a checkpoint from before sampling: step 0
    assert resumed.sample_step == 0
    bad = {**state, "_extra_state": {**state["_extra_state"], "sample_step": -1}}
    with pytest.raises(ValueError, match="sample_step=-1"):
        resumed.load_state_dict(bad)
    assert resumed.sample_step == 0


@pytest.mark.parametrize("value, error", [(0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                          ("0.5", TypeError), (True, TypeError)])  # fmt: skip
def test_an_invalid_sample_rate_raises_naming_it(value, error) -> None:
    with pytest.raises(error, match="sample_rate="):
        LSoftmaxLoss(D, C, sample_rate=value)
    head = LSoftmaxLoss(D, C, sample_rate=0.5)
    head.sample_rate = value
    with pytest.raises(error, match="sample_rate="):
        head(torch.randn(2, D), torch.tensor([0, 1]))
    assert head.sample_step == 0


def test_an_invalid_seed_or_target_raises_and_draws_nothing() -> None:
    with pytest.raises(ValueError, match="seed=-1"):
        LSoftmaxLoss(D, C, sample_rate=0.5, seed=-1)
    head = LSoftmaxLoss(D, C, sample_rate=0.5)
    with pytest.raises(ValueError, match=r"target\[1\]=41"):
        head(torch.randn(2, D), torch.tensor([0, C]))
    assert head.sample_step == 0 and head.last_sampled is None


# Optimizer conventions ------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=0.01, weight_decay=5e-4),
}


def _snapshot(opt: Any, p: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    return p.detach().clone(), {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}


def _reference_step(name: str, weight: torch.Tensor, state: dict[str, Any], grad: torch.Tensor):
    """The optimizer's own dense step from (weight, state) with ``grad``: what v2 does."""
    q = torch.nn.Parameter(weight.clone())
    opt = OPTIMIZERS[name]([q])
    if state:
        opt.state[q] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    q.grad = grad.clone()
    opt.step()
    return q.detach(), opt.state[q]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_partial_fc_v2_a_plain_step_moves_the_unsampled_rows_as_the_optimizer_says(name) -> None:
    head = _loss_head("arcface-k2", sample_rate=0.3)
    opt = OPTIMIZERS[name](head.parameters())
    for step in range(3):
        x, _, target = _problem(8, seed=20 + step)
        before, state = _snapshot(opt, head.weight)
        opt.zero_grad()
        head(x, target).backward()
        grad = head.weight.grad.clone()
        opt.step()
        want, want_state = _reference_step(name, before, state, grad)
        assert torch.equal(head.weight.detach(), want)
        for key, value in want_state.items():
            assert torch.equal(opt.state[head.weight][key], value), key
        unsampled = torch.ones(C * 2, dtype=torch.bool)
        unsampled[_rows(head.last_sampled, 2)] = False
        # Weight decay (and from the second step momentum) move rows the loss did not see.
        assert bool((head.weight.detach()[unsampled] != before[unsampled]).any(1).all())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_partial_fc_v1_sampled_step_leaves_unsampled_rows_and_their_state_bit_identical(name) -> None:
    body = torch.nn.Linear(D, D).double()
    head = _loss_head("cosface", sample_rate=0.3)
    opt = OPTIMIZERS[name]([*body.parameters(), *head.parameters()])
    for step in range(3):
        x, _, target = _problem(8, seed=30 + step)
        before, state = _snapshot(opt, head.weight)
        body_before = body.weight.detach().clone()
        opt.zero_grad()
        head(body(x), target).backward()
        grad = head.weight.grad.clone()
        head.sampled_step(opt)
        rows = head.last_sampled
        unsampled = torch.ones(C, dtype=torch.bool)
        unsampled[rows] = False
        want, want_state = _reference_step(name, before, state, grad)
        got = head.weight.detach()
        assert torch.equal(got[unsampled], before[unsampled]), "unsampled rows moved"
        assert torch.equal(got[rows], want[rows]), "sampled rows: not the optimizer's update"
        assert torch.equal(head.weight.grad, grad) and head.weight.shape == (C, D)
        for key, value in opt.state[head.weight].items():
            if isinstance(value, torch.Tensor) and value.shape == (C, D):
                old = state[key][unsampled] if key in state else torch.zeros_like(value[unsampled])
                assert torch.equal(value[unsampled], old), f"{key}: unsampled rows changed"
                assert torch.equal(value[rows], want_state[key][rows]), key
            else:  # Adam's step: the weight's, once per call
                assert key == "step" and float(value) == step + 1, (key, value)
        assert not torch.equal(body.weight.detach(), body_before)  # the backbone steps as usual


def test_sampled_step_needs_an_optimizer_holding_the_weight_and_is_a_plain_step_without_sampling() -> None:
    head = _loss_head("cosface", sample_rate=0.3)
    with pytest.raises(ValueError, match="optimizer=SGD does not hold this head's weight"):
        head.sampled_step(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
    head.eval()
    x, _, target = _problem(6, seed=40)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    head(x, target).backward()
    before = head.weight.detach().clone()
    head.sampled_step(opt)
    assert bool((head.weight.detach() != before).any(1).all())


# Class-parallel -------------------------------------------------------------------------------


def _cp_cases(world_size: int) -> list[dict[str, Any]]:
    sizes = tuple(4 + r for r in range(world_size))
    return [{"name": kind, "kind": kind, "sizes": sizes, "seed": 50 + i} for i, kind in enumerate(KINDS)] + [
        {"name": "one-rank-empty", "kind": "lsoftmax", "sizes": (0, *sizes[1:]), "seed": 60},
        {"name": "positives-beyond-budget", "kind": "cosface", "sizes": (14,) * world_size, "seed": 61},
    ]


def _cp_problem(case: dict[str, Any]):
    return _problem(sum(case["sizes"]), k=KINDS[case["kind"]][1], seed=case["seed"], ignored=0.1)


def _cp_head(group: Any, kind: str, **kw: Any) -> ClassParallelLSoftmaxLoss:
    margin, k = KINDS[kind]
    kw = {"dtype": torch.float64, **kw}
    return ClassParallelLSoftmaxLoss(D, C, margin=margin, subcenters=k, schedule=lsm.ConstantSchedule(1.5),
                                     process_group=group, **kw)  # fmt: skip


def _cp_run(group: Any, case: dict[str, Any], rate: float, seed: int = 5, train: bool = True) -> dict[str, Any]:
    import torch.distributed as dist

    rank = dist.get_rank(group)
    x, w, target = _cp_problem(case)
    head = _cp_head(group, case["kind"], sample_rate=rate, seed=seed)
    head.train(train)
    head.load_full_state_dict({"weight": w})
    start = sum(case["sizes"][:rank])
    rows = slice(start, start + case["sizes"][rank])
    xl = x[rows].clone().requires_grad_()
    loss = head(xl, target[rows])
    loss.backward()
    return {
        "loss": loss.detach(), "grad_x": xl.grad, "grad_w": head.weight.grad, "sampled": head.last_sampled,
        "bounds": (head.class_start, head.class_stop), "collectives": head.last_collectives,
        "sample_step": head.sample_step,
    }  # fmt: skip


def _cp_group(group: Any) -> dict[str, Any]:
    import torch.distributed as dist

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    last = rank == world_size - 1
    out: dict[str, Any] = {"cases": {}}
    for case in _cp_cases(world_size):
        out["cases"][case["name"]] = {
            "half": _cp_run(group, case, 0.5), "again": _cp_run(group, case, 0.5), "one": _cp_run(group, case, 1.0),
            "plain": _cp_run(group, case, 1.0, train=False), "eval": _cp_run(group, case, 0.5, train=False),
        }  # fmt: skip
    # The settings the ranks compare: every rank raises, naming the setting and both values.
    x, target = torch.randn(3, D, dtype=torch.float64), torch.tensor([0, 17, 40])
    mixed = {
        "sample_rate": lambda: _cp_head(group, "lsoftmax", sample_rate=0.3 if last else 0.5)(x, target),
        "eval": lambda: _cp_head(group, "lsoftmax", sample_rate=0.5).train(not last)(x, target),
        "in_features": lambda: ClassParallelLSoftmaxLoss(
            D + 1 if last else D, C, dtype=torch.float64, process_group=group)(x, target),  # fmt: skip
        "dtype": lambda: ClassParallelLSoftmaxLoss(D, C, dtype=torch.float32 if last else torch.float64,
                                                   process_group=group)(x.float() if last else x, target),
    }  # fmt: skip
    out["mismatch"] = {name: error_of(fn) for name, fn in mixed.items()}
    head = _cp_head(group, "cosface", sample_rate=0.5)
    head(x, target)
    out["full"] = head.full_state_dict()
    out["shard"] = head.state_dict()
    out["after"] = _cp_head(group, "lsoftmax", sample_rate=0.5)(x, target).item()  # the group still works
    return out


_WORLD: list[Any] = []


@pytest.fixture
def world(monkeypatch) -> dict[int, list[dict[str, Any]]]:
    """Every group's results, rank by rank (one spawned world; support.dist.group_results)."""
    from support.dist import group_results

    return group_results(monkeypatch, __file__, "_cp_group", GROUPS, _WORLD, timeout=PARALLEL_TIMEOUT_S, collective_timeout=60)


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_class_parallel_sampling_equals_the_single_process_loss_over_the_same_sampled_classes(world, world_size):
    for case in _cp_cases(world_size):
        margin, k = KINDS[case["kind"]]
        x, w, target = _cp_problem(case)
        ranks = [r["cases"][case["name"]]["half"] for r in world[world_size]]
        positives = torch.unique(target[target != IGNORE])
        for r, got in enumerate(ranks):
            a, b = got["bounds"]
            mine = positives[(positives >= a) & (positives < b)]
            assert got["sample_step"] == 1 and bool(torch.isin(mine, got["sampled"]).all())
            assert got["sampled"].numel() == max(_budget(0.5, b - a), mine.numel()), (case["name"], r)
            rule = sampling.sample_classes(mine - a, b - a, 0.5, 5, r, 0) + a
            assert torch.equal(got["sampled"], rule), (case["name"], r)
        union = torch.cat([got["sampled"] for got in ranks])  # sorted: shards in rank order
        single = LSoftmaxLoss(D, union.numel(), margin=margin, subcenters=k, schedule=lsm.ConstantSchedule(1.5),
                              dtype=torch.float64)  # fmt: skip
        with torch.no_grad():
            single.weight.copy_(w[_rows(union, k)])
        xr = x.clone().requires_grad_()
        label = torch.where(target == IGNORE, IGNORE, torch.searchsorted(union, target))
        want = single(xr, label)
        want.backward()
        start = 0
        for r, got in enumerate(ranks):
            what = f"{case['name']} P={world_size} rank {r}"
            rows = slice(start, start + case["sizes"][r])
            start += case["sizes"][r]
            torch.testing.assert_close(got["loss"], want.detach(), rtol=1e-10, atol=0, msg=what)
            torch.testing.assert_close(got["grad_x"], world_size * xr.grad[rows], rtol=0, atol=1e-10, msg=what)
            a, _ = got["bounds"]
            local = _rows(got["sampled"] - a, k)
            place = _rows(torch.searchsorted(union, got["sampled"]), k)
            torch.testing.assert_close(got["grad_w"][local], single.weight.grad[place], rtol=0, atol=1e-10, msg=what)
            unsampled = torch.ones(got["grad_w"].shape[0], dtype=torch.bool)
            unsampled[local] = False
            assert torch.count_nonzero(got["grad_w"][unsampled]) == 0, what


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_class_parallel_sampling_is_reproducible_one_is_bit_for_bit_and_eval_takes_every_class(world, world_size):
    for case in _cp_cases(world_size):
        for r, res in enumerate(r["cases"][case["name"]] for r in world[world_size]):
            half, again, one, plain, evaluated = (res[key] for key in ("half", "again", "one", "plain", "eval"))
            for key in ("loss", "grad_x", "grad_w", "sampled"):
                assert torch.equal(half[key], again[key]), (case["name"], r, key)
            # Sampling adds no collective: the same ones, byte for byte, as the unsampled head
            # (the labels are gathered before the features, to draw the classes).
            assert sorted(half["collectives"]) == sorted(plain["collectives"]), (case["name"], r)
            for other in (one, evaluated):
                assert other["sampled"] is None
                for key in ("loss", "grad_x", "grad_w"):
                    assert torch.equal(other[key], plain[key]), (case["name"], r, key)


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_class_parallel_ranks_compare_sample_rate_mode_in_features_and_dtype(world, world_size) -> None:
    ranks = world[world_size]
    last = world_size - 1
    values = {"sample_rate": (0.5, 0.3), "eval": (0.5, 1.0), "in_features": (D, D + 1),
              "dtype": (torch.float64, torch.float32)}  # fmt: skip
    for r, got in enumerate(ranks):
        for what, (value, other_value) in values.items():
            name = "sample_rate" if what == "eval" else what
            mine, theirs = (other_value, value) if r == last else (value, other_value)
            err = got["mismatch"][what]
            assert err is not None and err[0] == "ValueError", (what, r, err)
            assert f"must have the same {name}: rank {r} has {name}={mine!r}, rank " in err[1], err[1]
            assert f"has {name}={theirs!r}" in err[1], err[1]
        assert got["after"] == ranks[0]["after"]
    assert "in eval mode a head samples no classes" in ranks[0]["mismatch"]["eval"][1]
    full = ranks[0]["full"]
    assert full["_extra_state"]["sample_step"] == 1 and all(got["full"] is None for got in ranks[1:])
    merged = ClassParallelLSoftmaxLoss.merge_state_dicts([got["shard"] for got in ranks])
    assert merged["_extra_state"] == full["_extra_state"]
    resumed = LSoftmaxLoss(D, C, margin=KINDS["cosface"][0], dtype=torch.float64)
    resumed.load_state_dict(full)
    assert resumed.sample_step == 1
