"""``subcenters=k`` in the PyTorch adapter's fused losses (issue 25): ``lsoftmax_cross_entropy``,
``LSoftmaxLoss`` and ``ClassParallelLSoftmaxLoss`` with a weight of C·k rows, class j's
centres rows j·k ... j·k + k - 1, for the margin kinds that normalise the weights.

In float64 the eager loss and its autograd gradients are the core's own
``cross_entropy_with_grad`` bits (the adapter calls it on views of the same memory); the
compiled function (``fullgraph=True``) and the operators (``opcheck``) carry k; the
modules' ``logits`` take each class's largest centre; checkpoints keep k and refuse
another; the class-parallel head at 1-3 gloo ranks equals the single-process
``LSoftmaxLoss`` (whole classes of k rows per rank), and ranks with different k raise on
every rank naming each value; pytorch-metric-learning's ``SubCenterArcFaceLoss`` is
``LSoftmaxLoss(margin=ArcFace, subcenters=k)`` at beta = 0.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import LSoftmaxLoss, lsoftmax_cross_entropy

from support.class_parallel import error_of

OPS = torch.ops.lsoftmax_core
IGNORE = -100
# The kinds that normalise the weights, the ones sub-centres are defined for.
KINDS = {
    "sphereface": lsm.SphereFace(m=3),
    "cosface": lsm.CosFace(m=0.35, s=8.0),
    "arcface": lsm.ArcFace(m=0.5, s=8.0),
    "combined": lsm.CombinedMargin(m1=1.2, m2=0.3, m3=0.1, s=8.0),
}


def _problem(n=11, c=5, k=2, d=4, *, seed=0, ignored=0.2):
    """x (n, d), w (c·k, d), target (n,) in [0, c) with some rows ignored; float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignored] = IGNORE
    return x, w, target


def _grads(fn, x, w, upstream=None):
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(xr, wr)
    gx, gw = torch.autograd.grad(out, (xr, wr), torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), gx, gw


def _close(actual, expected, what: str, tol: float = 1e-11) -> None:
    a = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected)
    scale = float(np.max(np.abs(e), initial=0.0)) + 1.0
    np.testing.assert_allclose(a, e, rtol=0, atol=tol * scale, err_msg=what)


def _equal(actual, expected, what: str) -> None:
    np.testing.assert_array_equal(actual.detach().numpy(), np.asarray(expected), err_msg=what)


def _schema(kind) -> tuple[int, str, Any]:
    if isinstance(kind, lsm.SphereFace):
        return kind.m, "sphereface", None
    return 1, kind.kind, [v for key, v in kind.to_dict().items() if key != "kind"]


def _plain_class_logits(x: np.ndarray, w: np.ndarray, kind, k: int) -> np.ndarray:
    """The kind's plain logits of the centres (the core's normalised rows), then each
    class's largest centre: (N, C)."""
    xn, wn = lsm.normalized(x, w, margin=kind)
    return (xn @ wn.T).reshape(x.shape[0], -1, k).max(axis=2)


# --------------------------------------------------------------------------- the core's bits


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", list(KINDS))
def test_fused_loss_equals_the_core(name, k) -> None:
    kind = KINDS[name]
    x, w, target = _problem(k=k, seed=k + len(name))
    xa, wa, ta = x.numpy(), w.numpy(), target.numpy()
    for reduction in ("mean", "sum"):
        # Upstream 1: the forward's gradients as they are, so the core's very bits.
        got = _grads(lambda a, b, r=reduction: lsoftmax_cross_entropy(
            a, b, target, margin=kind, beta=1.5, reduction=r, subcenters=k), x, w)  # fmt: skip
        want = lsm.cross_entropy_with_grad(xa, wa, ta, margin=kind, beta=1.5, reduction=reduction, subcenters=k)
        for g, e, what in zip(got, want, ("loss", "grad_x", "grad_w")):
            _equal(g, e, f"{name} k={k} {reduction} {what}")
    # "none" with an upstream gradient: the backward walks the chunks again (with the lse).
    up = torch.randn(11, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = _grads(lambda a, b: lsoftmax_cross_entropy(a, b, target, margin=kind, beta=1.5, reduction="none",
                                                     subcenters=k), x, w, up)  # fmt: skip
    _close(got[0], lsm.cross_entropy(xa, wa, ta, margin=kind, beta=1.5, reduction="none", subcenters=k), "none")
    want_x, want_w = lsm.cross_entropy_backward(up.numpy(), xa, wa, ta, margin=kind, beta=1.5, reduction="none",
                                                subcenters=k)  # fmt: skip
    _close(got[1], want_x, f"{name} k={k} none grad_x")
    _close(got[2], want_w, f"{name} k={k} none grad_w")
    # The centres matter: the same loss with k = 1 on the class-0 centres differs.
    assert lsoftmax_cross_entropy(x, w[::k].contiguous(), target, margin=kind).item() != got[0].sum().item()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("name", list(KINDS))
def test_lsoftmax_loss_equals_the_core_and_logits_take_the_best_centre(name, k) -> None:
    kind = KINDS[name]
    x, _, target = _problem(k=k, seed=20 + k)
    torch.manual_seed(k)
    criterion = LSoftmaxLoss(4, 5, margin=kind, schedule=lsm.ConstantSchedule(2.0), subcenters=k,
                             dtype=torch.float64)  # fmt: skip
    assert criterion.weight.shape == (5 * k, 4) and criterion.num_classes == 5 and criterion.subcenters == k
    xr = x.clone().requires_grad_()
    loss = criterion(xr, target)
    loss.backward()
    wa = criterion.weight.detach().numpy()
    want = lsm.cross_entropy_with_grad(x.numpy(), wa, target.numpy(), margin=kind, beta=2.0, subcenters=k)
    for g, e, what in zip((loss, xr.grad, criterion.weight.grad), want, ("loss", "grad_x", "grad_w")):
        _equal(g, e, f"{name} k={k} LSoftmaxLoss {what}")
    logits = criterion.logits(x)
    assert logits.shape == (11, 5)
    _close(logits, _plain_class_logits(x.numpy(), wa, kind, k), f"{name} k={k} logits")
    assert f"subcenters={k}" in repr(criterion)


def test_an_arg_max_tie_sends_the_gradient_to_the_lowest_centre() -> None:
    """Two equal centres of a class: the gradient goes to the first, the other gets none."""
    kind = KINDS["arcface"]
    x, w, target = _problem(n=6, c=3, k=2, seed=5, ignored=0.0)
    w[1::2] = w[0::2]  # each class's two centres are one vector
    _, _, gw = _grads(lambda a, b: lsoftmax_cross_entropy(a, b, target, margin=kind, subcenters=2), x, w)
    assert torch.count_nonzero(gw[1::2]) == 0 and torch.count_nonzero(gw[0::2]) > 0
    # ... and the loss is that of one centre per class.
    one = lsoftmax_cross_entropy(x, w[0::2].contiguous(), target, margin=kind)
    _close(lsoftmax_cross_entropy(x, w, target, margin=kind, subcenters=2), one.item(), "tie", 1e-13)


# --------------------------------------------------------------------------- torch.library and compile


def test_compiled_loss_carries_subcenters_without_recompiling_as_beta_anneals() -> None:
    kind, k = KINDS["combined"], 3
    x, w, target = _problem(k=k, seed=31)
    beta = torch.tensor(2.0, dtype=torch.float64)
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm

    fn = torch.compile(lambda a, b, t, beta: lsoftmax_cross_entropy(a, b, t, margin=kind, beta=beta, subcenters=k),
                       fullgraph=True, backend=backend)  # fmt: skip
    for value in (2.0, 0.5):
        beta.fill_(value)
        got = _grads(lambda a, b: fn(a, b, target, beta), x, w)
        want = lsm.cross_entropy_with_grad(x.numpy(), w.numpy(), target.numpy(), margin=kind, beta=value,
                                           subcenters=k)  # fmt: skip
        for g, e, what in zip(got, want, ("loss", "grad_x", "grad_w")):
            _close(g, e, f"compiled {what} at beta={value}")
    assert counts["frames"] == 1


def test_opcheck_and_the_call_forms_without_subcenters() -> None:
    kind, k = KINDS["arcface"], 2
    m, name, params = _schema(kind)
    x, w, target = _problem(n=5, c=3, k=k, d=3, seed=9)
    x.requires_grad_()
    w.requires_grad_()
    b = torch.tensor(0.5, dtype=torch.float64)
    hyper = (m, b, "mean", IGNORE, name, params, k)
    torch.library.opcheck(OPS.lsoftmax_cross_entropy, (x, w, target, *hyper))
    torch.library.opcheck(OPS.lsoftmax_cross_entropy_with_grad, (x, w, target, *hyper))
    _, lse = OPS.lsoftmax_cross_entropy(x.detach(), w.detach(), target, *hyper)
    up = torch.tensor(0.7, dtype=torch.float64)
    args = (up, x.detach(), w.detach(), target, m, b, "mean", IGNORE, lse, name, params, k)
    torch.library.opcheck(OPS.lsoftmax_cross_entropy_backward, args)
    xa, wa, ta = x.detach().numpy(), w.detach().numpy(), target.numpy()
    _equal(OPS.lsoftmax_cross_entropy(x.detach(), w.detach(), target, m, b, "mean", IGNORE, name, params,
                                      subcenters=k)[0],
           lsm.cross_entropy(xa, wa, ta, margin=kind, beta=0.5, subcenters=k), "subcenters by keyword")  # fmt: skip
    # The call forms of before (no subcenters; no kind either) keep their meaning: k = 1.
    plain = w.detach()[:3].contiguous()
    _equal(OPS.lsoftmax_cross_entropy(x.detach(), plain, target, m, b, "mean", IGNORE, name, params)[0],
           lsm.cross_entropy(xa, plain.numpy(), ta, margin=kind, beta=0.5), "no subcenters")  # fmt: skip
    _equal(OPS.lsoftmax_cross_entropy_with_grad(x.detach(), plain, target, 3, b, "sum", IGNORE)[1],
           lsm.cross_entropy_with_grad(xa, plain.numpy(), ta, margin=3, beta=0.5, reduction="sum")[1],
           "L-Softmax, no kind")  # fmt: skip


# --------------------------------------------------------------------------- checkpoints and errors


def test_state_dict_keeps_subcenters_and_refuses_another() -> None:
    kind = KINDS["arcface"]
    sched = lsm.ExponentialSchedule(beta0=8.0, scale=0.5)
    saved = LSoftmaxLoss(4, 5, margin=kind, subcenters=3, schedule=sched, dtype=torch.float64)
    saved.step()
    buf = io.BytesIO()
    torch.save(saved.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf)
    assert state["_extra_state"]["subcenters"] == 3 and state["weight"].shape == (15, 4)
    again = LSoftmaxLoss(4, 5, margin=kind, subcenters=3, schedule=sched, dtype=torch.float64)
    again.load_state_dict(state)
    assert torch.equal(again.weight, saved.weight) and again.iteration == 1 and again.subcenters == 3
    x, _, target = _problem(k=3, seed=4)
    assert again(x, target).item() == saved(x, target).item()
    # Another k: refused before anything changes, naming both.
    other = LSoftmaxLoss(4, 5, margin=kind, subcenters=2, dtype=torch.float64)
    before = (other.weight.detach().clone(), other.get_extra_state())
    with pytest.raises(ValueError, match=r"checkpoint has subcenters=3 but this loss has subcenters=2"):
        other.load_state_dict(state)
    assert torch.equal(before[0], other.weight) and before[1] == other.get_extra_state()
    # A checkpoint saved before subcenters existed has one centre per class.
    old = LSoftmaxLoss(4, 5, margin=kind, dtype=torch.float64).state_dict()
    del old["_extra_state"]["subcenters"]
    LSoftmaxLoss(4, 5, margin=kind, dtype=torch.float64).load_state_dict(old)
    with pytest.raises(ValueError, match=r"checkpoint has subcenters=1 but this loss has subcenters=2"):
        other.load_state_dict(old)


def test_errors_name_subcenters() -> None:
    kind = KINDS["cosface"]
    x, w, target = _problem(k=2, seed=6)
    words = r"subcenters=2 needs a margin kind that normalises the weights .* got margin=3 \(L-Softmax\)"
    for margin in (3, lsm.LSoftmax(m=3)):
        with pytest.raises(ValueError, match=words):
            lsoftmax_cross_entropy(x, w, target, margin=margin, subcenters=2)
        with pytest.raises(ValueError, match=words):
            LSoftmaxLoss(4, 5, margin=margin, subcenters=2)
    with pytest.raises(ValueError, match=r"subcenters=2 must divide weight's rows: weight.shape=\(9, 4\)"):
        lsoftmax_cross_entropy(x, w[:9], target, margin=kind, subcenters=2)
    for bad, error, message in [
        (0, ValueError, r"subcenters=0 must be an integer in \[1, 1024\]"),
        (1025, ValueError, r"subcenters=1025 must be an integer in \[1, 1024\]"),
        (2.0, TypeError, r"subcenters=2.0 must be an integer"),
        (True, TypeError, r"subcenters=True must be an integer"),
    ]:
        with pytest.raises(error, match=message):
            lsoftmax_cross_entropy(x, w, target, margin=kind, subcenters=bad)
        with pytest.raises(error, match=message):
            LSoftmaxLoss(4, 5, margin=kind, subcenters=bad)
    # Labels count classes: 5 classes of 2 rows, so 5 is out of range.
    bad_target = target.clone()
    bad_target[0] = 5
    with pytest.raises(ValueError, match=r"target must lie in \[0, C\) = \[0, 5\)"):
        lsoftmax_cross_entropy(x, w, bad_target, margin=kind, subcenters=2)


# --------------------------------------------------------------------------- class-parallel head

# One spawned world of 3 processes runs every group.
GROUPS = {3: (0, 1, 2), 2: (1, 2), 1: (0,)}
PARALLEL_TIMEOUT_S = 150.0  # the spawned world is killed at this deadline and the tests fail
C, D = 13, 5  # 13 classes: uneven shards at 2 and 3 ranks


def _cases(world_size: int) -> list[dict[str, Any]]:
    """(name, kind, k, the ranks' batch sizes, labels): every kind, k = 2 or 3; then a batch
    whose targets all lie in rank 0's classes and a rank with an empty batch."""
    sizes = tuple(4 + r for r in range(world_size))
    out = [
        {"name": name, "kind": name, "k": 2 + i % 2, "sizes": sizes, "seed": 40 + i, "first": False}
        for i, name in enumerate(KINDS)
    ]
    out.append({"name": "first-only", "kind": "arcface", "k": 3, "seed": 50, "first": True,
                "sizes": tuple(0 if r == world_size - 1 and world_size > 1 else 5 for r in range(world_size))})
    return out


def _case_problem(case: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole batch, the full (C·k, D) weight and the labels, float64 (the same everywhere)."""
    rng = np.random.default_rng(case["seed"])
    n = sum(case["sizes"])
    x = rng.standard_normal((n, D)) * 2.0
    w = rng.standard_normal((C * case["k"], D))
    label = rng.integers(0, 2 if case["first"] else C, n)
    label[rng.random(n) < 0.2] = IGNORE
    return x, w, label


def _head(group: Any, kind: Any, k: int, **kw: Any) -> Any:
    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    return ClassParallelLSoftmaxLoss(D, C, margin=kind, subcenters=k, dtype=torch.float64, process_group=group, **kw)


def _run_group(group: Any) -> dict[str, Any]:
    import torch.distributed as dist

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    last = rank == world_size - 1
    out: dict[str, Any] = {"cases": {}}
    for case in _cases(world_size):
        x, w, label = _case_problem(case)
        head = _head(group, KINDS[case["kind"]], case["k"], schedule=lsm.ConstantSchedule(1.5))
        head.load_full_state_dict({"weight": torch.from_numpy(w)})
        start = sum(case["sizes"][:rank])
        rows = slice(start, start + case["sizes"][rank])
        xl = torch.from_numpy(x[rows]).requires_grad_()
        loss = head(xl, torch.from_numpy(label[rows]))
        loss.backward()
        out["cases"][case["name"]] = {
            "loss": loss.item(), "grad_x": xl.grad.numpy(), "grad_w": head.weight.grad.numpy(),
            "bounds": (head.class_start, head.class_stop), "shape": tuple(head.weight.shape),
            "logits": head.logits(torch.from_numpy(x)).detach().numpy(),
        }  # fmt: skip
    # Checkpoints: the shard, the full weight on rank 0, another k refused (shard and full).
    kind = KINDS["arcface"]
    head = _head(group, kind, 3, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5))
    head.step()
    shard = {key: (v.clone() if isinstance(v, torch.Tensor) else v) for key, v in head.state_dict().items()}
    out["shard"] = shard
    out["full"] = head.full_state_dict()
    again = _head(group, kind, 3, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5))
    again.load_state_dict(shard)
    out["reloaded"] = bool(torch.equal(again.weight, head.weight)) and again.iteration == 1
    other = _head(group, kind, 2)
    out["shard_refused"] = error_of(lambda: other.load_state_dict(shard))
    out["full_refused"] = error_of(lambda: other.load_full_state_dict(
        {"weight": torch.zeros(C * 3, D, dtype=torch.float64), "_extra_state": {"subcenters": 3}}))  # fmt: skip
    out["full_extra_refused"] = error_of(lambda: other.load_full_state_dict(
        {"weight": torch.zeros(C * 2, D, dtype=torch.float64), "_extra_state": {"subcenters": 3}}))  # fmt: skip
    # Ranks with different k: every rank raises, in the forward and in full_state_dict.
    mixed = _head(group, kind, 3 if last and world_size > 1 else 2)
    x, target = torch.randn(3, D, dtype=torch.float64), torch.tensor([0, 7, 12])
    out["mismatch"] = error_of(lambda: mixed(x, target))
    out["full_mismatch"] = error_of(lambda: mixed.full_state_dict())
    out["int_margin"] = error_of(lambda: _head(group, 3, 2))
    out["after"] = _head(group, kind, 2)(x, target).item()  # the group still works
    return out


_WORLD: list[Any] = []


@pytest.fixture
def world(monkeypatch) -> dict[int, list[dict[str, Any]]]:
    """Every group's results, rank by rank (one spawned world; support.dist.group_results)."""
    from support.dist import group_results

    return group_results(monkeypatch, __file__, "_run_group", GROUPS, _WORLD, timeout=PARALLEL_TIMEOUT_S, collective_timeout=60)


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_class_parallel_head_equals_the_single_process_loss(world, world_size) -> None:
    ranks = world[world_size]
    for case in _cases(world_size):
        x, w, label = _case_problem(case)
        k = case["k"]
        criterion = LSoftmaxLoss(D, C, margin=KINDS[case["kind"]], schedule=lsm.ConstantSchedule(1.5), subcenters=k,
                                 dtype=torch.float64)  # fmt: skip
        with torch.no_grad():
            criterion.weight.copy_(torch.from_numpy(w))
        xr = torch.from_numpy(x).requires_grad_()
        loss = criterion(xr, torch.from_numpy(label))
        loss.backward()
        logits = criterion.logits(torch.from_numpy(x)).detach().numpy()
        start, stop = 0, 0
        for r, got in enumerate(ranks):
            res = got["cases"][case["name"]]
            a, b = res["bounds"]
            assert a == stop and res["shape"] == ((b - a) * k, D), (case["name"], r)
            stop = b
            rows = slice(start, start + case["sizes"][r])
            start += case["sizes"][r]
            what = f"{case['name']} k={k} at P={world_size} rank {r}"
            _close(res["loss"], loss.item(), f"{what} loss", 1e-10)
            _close(res["grad_x"], world_size * xr.grad[rows].numpy(), f"{what} grad_x", 1e-10)
            _close(res["grad_w"], criterion.weight.grad[a * k : b * k].numpy(), f"{what} grad_w", 1e-10)
            _close(res["logits"], logits[:, a:b], f"{what} logits", 1e-12)
        assert stop == C


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_class_parallel_checkpoints_and_mismatches(world, world_size) -> None:
    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    ranks = world[world_size]
    full = ranks[0]["full"]
    assert all(r["full"] is None for r in ranks[1:])
    assert full["weight"].shape == (C * 3, D) and full["_extra_state"]["subcenters"] == 3
    for r, got in enumerate(ranks):
        a, b = got["shard"]["_extra_state"]["class_start"], got["shard"]["_extra_state"]["class_stop"]
        assert got["shard"]["_extra_state"]["subcenters"] == 3 and got["shard"]["weight"].shape == ((b - a) * 3, D)
        assert torch.equal(full["weight"][a * 3 : b * 3], got["shard"]["weight"]), f"rank {r}'s rows"
        assert got["reloaded"]
        assert got["shard_refused"] is not None and "checkpoint has subcenters=3" in got["shard_refused"][1]
        assert got["full_refused"] == ("ValueError", f"state['weight'] must be the full (num_classes * subcenters=2, "
                                                     f"in_features) = ({C * 2}, {D}) weight, got ({C * 3}, {D})")
        assert got["full_extra_refused"] is not None and "checkpoint has subcenters=3" in got["full_extra_refused"][1]
        assert got["int_margin"] is not None and "subcenters=2 needs a margin kind" in got["int_margin"][1]
        assert got["after"] == ranks[0]["after"]
        if world_size == 1:
            assert got["mismatch"] is None and got["full_mismatch"] is None
        else:
            kind, message = got["mismatch"]
            assert kind == "ValueError" and "must have the same subcenters" in message, message
            assert "subcenters=2" in message and "subcenters=3" in message, message
            expected = [2] * (world_size - 1) + [3]
            assert got["full_mismatch"] == (
                "ValueError", f"every rank's ClassParallelLSoftmaxLoss must have the same subcenters, got "
                f"subcenters={expected} in rank order")  # fmt: skip
    # The full checkpoint loads into LSoftmaxLoss (and back), and the shards merge into it offline.
    single = LSoftmaxLoss(D, C, margin=KINDS["arcface"], subcenters=3, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5),
                          dtype=torch.float64)  # fmt: skip
    single.load_state_dict(full)
    assert torch.equal(single.weight, full["weight"]) and single.iteration == 1
    merged = ClassParallelLSoftmaxLoss.merge_state_dicts([r["shard"] for r in reversed(ranks)])
    assert torch.equal(merged["weight"], full["weight"]) and merged["_extra_state"] == full["_extra_state"]
    with pytest.raises(ValueError, match="checkpoint has subcenters=3 but this loss has subcenters=2"):
        LSoftmaxLoss(D, C, margin=KINDS["arcface"], subcenters=2, dtype=torch.float64).load_state_dict(full)


def test_merging_shards_checks_their_rows_and_subcenters() -> None:
    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    def shard(a: int, b: int, rows: int, **extra: Any) -> dict[str, Any]:
        state = {"margin": KINDS["arcface"].to_dict(), "normalize_weight": False, "iteration": 0,
                 "schedule": {"kind": "constant", "beta_value": 0.0}, "num_classes": 10, "class_start": a,
                 "class_stop": b, "subcenters": 2, **extra}  # fmt: skip
        return {"weight": torch.zeros(rows, 3), "_extra_state": state}

    full = ClassParallelLSoftmaxLoss.merge_state_dicts([shard(5, 10, 10), shard(0, 5, 10)])
    assert full["weight"].shape == (20, 3) and full["_extra_state"]["subcenters"] == 2
    with pytest.raises(ValueError, match=r"shards disagree on subcenters: 2 and 3"):
        ClassParallelLSoftmaxLoss.merge_state_dicts([shard(0, 5, 10), shard(5, 10, 15, subcenters=3)])
    with pytest.raises(ValueError, match=r"shards\[1\]'s weight has 5 rows, but classes \[5, 10\) of subcenters=2"):
        ClassParallelLSoftmaxLoss.merge_state_dicts([shard(0, 5, 10), shard(5, 10, 5)])


# --------------------------------------------------------------------------- pytorch-metric-learning


@pytest.mark.parametrize("k", [2, 3])
def test_lsoftmax_loss_equals_pytorch_metric_learnings_subcenter_arcface(k) -> None:
    """PML's W is (D, C·k), class j's centres columns j·k ... j·k + k - 1: our weight's
    transpose; its margin is in degrees; it has no beta (so beta = 0)."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, _, target = _problem(n=12, c=6, k=k, d=5, seed=13, ignored=0.0)
    peer = losses.SubCenterArcFaceLoss(num_classes=6, embedding_size=5, margin=math.degrees(0.5), scale=64,
                                       sub_centers=k).double()  # fmt: skip
    criterion = LSoftmaxLoss(5, 6, margin=lsm.ArcFace(m=0.5, s=64.0), subcenters=k, dtype=torch.float64)
    with torch.no_grad():
        criterion.weight.copy_(peer.W.T)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = peer(xp, target)
    their_gx, their_gw = torch.autograd.grad(theirs, (xp, peer.W))
    mine = criterion(xo, target)
    mine.backward()
    _close(mine, theirs.item(), f"k={k} loss", 1e-9)
    _close(xo.grad, their_gx.numpy(), f"k={k} grad_x", 1e-9)
    _close(criterion.weight.grad, their_gw.T.numpy(), f"k={k} grad_w", 1e-9)
