"""The PyTorch adapter with every margin kind (issue 25): ``lsoftmax``,
``lsoftmax_cross_entropy`` and the modules equal the core's NumPy results in float64
(forward, loss, gradients through autograd), pass gradcheck and ``torch.library.opcheck``,
compile with ``fullgraph=True`` without recompiling as beta anneals, run under CPU
autocast, keep the margin in ``state_dict``; the class-parallel head equals the
single-process loss at 1-4 gloo ranks; and pytorch-metric-learning's ArcFace, CosFace,
SphereFace and LargeMarginSoftmax losses are the modules at beta = 0.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import LSoftmaxLinear, LSoftmaxLoss, lsoftmax, lsoftmax_cross_entropy

from support import class_parallel as cp

OPS = torch.ops.lsoftmax_core
IGNORE = -100
# The kinds that normalise, and L-Softmax as an object (the int path, bit for bit).
KINDS = {
    "sphereface": lsm.SphereFace(m=3),
    "cosface": lsm.CosFace(m=0.35, s=8.0),
    "arcface": lsm.ArcFace(m=0.5, s=8.0),
    "combined": lsm.CombinedMargin(m1=1.2, m2=0.3, m3=0.1, s=8.0),
    "lsoftmax": lsm.LSoftmax(m=3),
}
FAMILY = [k for k in KINDS if k != "lsoftmax"]
needs_set_stance = pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6")


def _problem(n=9, c=5, d=4, *, dtype=torch.float64, seed=0, ignored=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * 2.0).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    label = torch.randint(0, c, (n,), generator=g)
    label[torch.rand(n, generator=g) < ignored] = IGNORE
    return x, w, label


def _close(actual, expected, what: str, rtol: float = 1e-11) -> None:
    """Equal up to rounding: the GEMMs are torch's here and NumPy's in the core."""
    a = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    e = np.asarray(expected)
    scale = float(np.max(np.abs(e), initial=0.0)) + 1.0
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale, err_msg=what)


def _grads(fn, x, w, upstream=None):
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(xr, wr)
    gx, gw = torch.autograd.grad(out, (xr, wr), torch.ones_like(out) if upstream is None else upstream)
    return out.detach(), gx, gw


def _schema(kind) -> tuple[int, str, Any]:
    """The operators' (margin, kind, params): (m, "", None) for L-Softmax, (m, "sphereface",
    None), and (1, kind, [its real parameters]) for the cosine kinds."""
    if isinstance(kind, (lsm.LSoftmax, lsm.SphereFace)):
        return kind.m, "" if isinstance(kind, lsm.LSoftmax) else "sphereface", None
    return 1, kind.kind, [v for k, v in kind.to_dict().items() if k != "kind"]


# --------------------------------------------------------------------------- the core's results


@pytest.mark.parametrize("beta", [0.0, 2.5])
@pytest.mark.parametrize("name", list(KINDS))
def test_lsoftmax_equals_the_core(name, beta) -> None:
    kind = KINDS[name]
    x, w, label = _problem(seed=len(name))
    g = torch.randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out, gx, gw = _grads(lambda a, b: lsoftmax(a, b, label, margin=kind, beta=beta), x, w, g)
    xa, wa, la = x.numpy(), w.numpy(), label.numpy()
    _close(out, lsm.forward(xa, wa, la, margin=kind, beta=beta), f"{name} logits")
    want_x, want_w = lsm.backward(g.numpy(), xa, wa, la, margin=kind, beta=beta)
    _close(gx, want_x, f"{name} grad_x")
    _close(gw, want_w, f"{name} grad_w")
    if name == "lsoftmax":  # LSoftmax(m) is margin=m, bit for bit
        same = _grads(lambda a, b: lsoftmax(a, b, label, margin=kind.m, beta=beta), x, w, g)
        assert all(torch.equal(p, q) for p, q in zip((out, gx, gw), same))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(KINDS))
def test_fused_loss_equals_the_core_and_the_unfused_loss(name, reduction) -> None:
    kind = KINDS[name]
    x, w, target = _problem(n=11, seed=3, ignored=0.2)
    up = torch.randn(11 if reduction == "none" else (), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fused = _grads(lambda a, b: lsoftmax_cross_entropy(a, b, target, margin=kind, beta=1.5, reduction=reduction),
                   x, w, up)  # fmt: skip
    xa, wa, ta = x.numpy(), w.numpy(), target.numpy()
    _close(fused[0], lsm.cross_entropy(xa, wa, ta, margin=kind, beta=1.5, reduction=reduction), f"{name} loss")
    want = lsm.cross_entropy_backward(up.numpy(), xa, wa, ta, margin=kind, beta=1.5, reduction=reduction)
    _close(fused[1], want[0], f"{name} grad_x")
    _close(fused[2], want[1], f"{name} grad_w")

    def unfused(a, b):
        logits = lsoftmax(a, b, torch.where(target == IGNORE, 0, target), margin=kind, beta=1.5)
        return F.cross_entropy(logits, target, reduction=reduction, ignore_index=IGNORE)

    for got, expected, what in zip(fused, _grads(unfused, x, w, up), ("loss", "grad_x", "grad_w")):
        _close(got, expected.numpy(), f"{name} {what} against F.cross_entropy(lsoftmax(...))")


@pytest.mark.parametrize("name", FAMILY)
def test_gradcheck_float64(name) -> None:
    kind = KINDS[name]
    x, w, label = _problem(n=5, c=4, d=3, seed=7)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lsoftmax(a, b, label, margin=kind, beta=0.5), (x, w))
    target = label.clone()
    target[1] = IGNORE
    assert torch.autograd.gradcheck(
        lambda a, b: lsoftmax_cross_entropy(a, b, target, margin=kind, beta=0.5, reduction="none"), (x, w)
    )


@pytest.mark.parametrize("name", list(KINDS))
def test_modules_equal_the_core_and_eval_gives_the_plain_logits(name) -> None:
    kind = KINDS[name]
    x, _, label = _problem(seed=11)
    torch.manual_seed(0)
    layer = LSoftmaxLinear(4, 5, margin=kind, schedule=lsm.ConstantSchedule(2.0), dtype=torch.float64)
    criterion = LSoftmaxLoss(4, 5, margin=kind, schedule=lsm.ConstantSchedule(2.0), dtype=torch.float64)
    assert layer.margin is kind and criterion.margin is kind
    xa, wa, la = x.numpy(), layer.weight.detach().numpy(), label.numpy()
    xr = x.clone().requires_grad_()
    logits = layer(xr, label)
    g = torch.randn(9, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    logits.backward(g)
    _close(logits, lsm.forward(xa, wa, la, margin=kind, beta=2.0), f"{name} layer logits")
    want = lsm.backward(g.numpy(), xa, wa, la, margin=kind, beta=2.0)
    _close(xr.grad, want[0], f"{name} layer grad_x")
    _close(layer.weight.grad, want[1], f"{name} layer grad_w")
    # Eval: the kind's plain logits, i.e. the training logits off the target.
    layer.eval()
    plain = layer(x).detach()
    off = torch.ones_like(plain, dtype=torch.bool)
    off[torch.arange(9), label] = False
    _close(plain[off], logits.detach()[off].numpy(), f"{name} eval logits")
    with torch.no_grad():
        criterion.weight.copy_(layer.weight)
    xr = x.clone().requires_grad_()
    loss = criterion(xr, label)
    loss.backward()
    want_loss, want_x, want_w = lsm.cross_entropy_with_grad(xa, wa, la, margin=kind, beta=2.0)
    _close(loss, want_loss, f"{name} loss")
    _close(xr.grad, want_x, f"{name} loss grad_x")
    _close(criterion.weight.grad, want_w, f"{name} loss grad_w")
    _close(criterion.logits(x), plain.numpy(), f"{name} LSoftmaxLoss.logits")
    assert repr(kind) in repr(layer) and repr(kind) in repr(criterion)


def test_margin_errors_name_margin() -> None:
    x, w, label = _problem()
    for bad, error, words in [
        ("arcface", TypeError, "margin='arcface' must be an int in"),
        (2.0, TypeError, "margin=2.0 must be an integer"),
        (0, ValueError, "margin=0 must be an integer in"),
        (lsm.Margin(), TypeError, "or a margin object"),
    ]:
        for call in (
            lambda bad=bad: lsoftmax(x, w, label, margin=bad),
            lambda bad=bad: lsoftmax_cross_entropy(x, w, label, margin=bad),
            lambda bad=bad: LSoftmaxLinear(4, 5, margin=bad),
            lambda bad=bad: LSoftmaxLoss(4, 5, margin=bad),
        ):
            with pytest.raises(error, match=words):
                call()
    with pytest.raises(ValueError, match="CosFace: m=3"):
        lsm.CosFace(m=3.0)  # a kind checks its own parameters when it is made


# --------------------------------------------------------------------------- torch.library and compile


@pytest.mark.parametrize("name", FAMILY)
def test_opcheck(name) -> None:
    m, kind, params = _schema(KINDS[name])
    x, w, label = _problem(n=5, c=4, d=3, seed=5)
    x.requires_grad_()
    w.requires_grad_()
    b = torch.tensor(0.5, dtype=torch.float64)
    torch.library.opcheck(OPS.lsoftmax_forward, (x, w, label, m, b, kind, params))
    g = torch.randn(5, 4, dtype=torch.float64)
    torch.library.opcheck(OPS.lsoftmax_backward, (g, x.detach(), w.detach(), label, m, b, kind, params))
    label[0] = IGNORE
    for reduction in ("mean", "none"):
        hyper = (m, b, reduction, IGNORE, kind, params)
        torch.library.opcheck(OPS.lsoftmax_cross_entropy, (x, w, label, *hyper))
        if reduction == "mean":
            torch.library.opcheck(OPS.lsoftmax_cross_entropy_with_grad, (x, w, label, *hyper))
        up = torch.randn((5,) if reduction == "none" else (), dtype=torch.float64)
        _, lse = OPS.lsoftmax_cross_entropy(x.detach(), w.detach(), label, *hyper)
        args = (up, x.detach(), w.detach(), label, m, b, reduction, IGNORE, lse, kind, params)
        torch.library.opcheck(OPS.lsoftmax_cross_entropy_backward, args)


def test_an_operator_refuses_a_margin_it_cannot_read() -> None:
    x, w, label = _problem()
    b = torch.zeros((), dtype=torch.float64)
    for args, error, words in [
        ((1, "arcface", [0.5]), ValueError, "the operators take L-Softmax as"),
        ((3, "arcface", [0.5, 8.0]), ValueError, "the operators take L-Softmax as"),
        ((1, "lsoftmax", None), ValueError, "the operators take L-Softmax as"),
        ((3, "", [0.5]), ValueError, "the operators take L-Softmax as"),
        ((1, "arcface", [0.5, -8.0]), ValueError, "ArcFace: s=-8.0"),
    ]:
        with pytest.raises(error, match=words):
            OPS.lsoftmax_forward(x, w, label, *args[:1], b, *args[1:])


@needs_set_stance
@pytest.mark.parametrize("name", list(KINDS))
def test_compiled_modules_follow_the_schedule_without_recompiling(name) -> None:
    kind = KINDS[name]
    x, _, label = _problem(n=6, dtype=torch.float32, seed=8)
    sched = lsm.ExponentialSchedule(beta0=8.0, scale=0.5)
    torch.manual_seed(2)
    layer = LSoftmaxLinear(4, 5, margin=kind, schedule=sched)
    criterion = LSoftmaxLoss(4, 5, margin=kind, schedule=sched)
    layer_loss = torch.compile(lambda a: F.cross_entropy(layer(a, label), label), fullgraph=True)
    fused_loss = torch.compile(lambda a: criterion(a, label), fullgraph=True)
    def run(f, weight):
        xr = x.clone().requires_grad_()
        loss = f(xr)
        return (loss.detach(), *torch.autograd.grad(loss, (xr, weight)))

    for t in range(3):
        if t == 1:
            torch.compiler.set_stance("fail_on_recompile")  # beta changes: a graph input, no recompile
        try:
            got = [run(layer_loss, layer.weight), run(fused_loss, criterion.weight)]
        finally:
            torch.compiler.set_stance("default")
        beta = 8.0 * 0.5**t
        want = [
            run(lambda a, beta=beta: F.cross_entropy(lsoftmax(a, layer.weight, label, margin=kind, beta=beta), label),
                layer.weight),
            run(lambda a, beta=beta: lsoftmax_cross_entropy(a, criterion.weight, label, margin=kind, beta=beta),
                criterion.weight),
        ]  # fmt: skip
        for got_values, want_values in zip(got, want):
            for a, b in zip(got_values, want_values):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        layer.step()
        criterion.step()


@pytest.mark.parametrize("name", ["arcface", "sphereface"])
def test_compiled_function_with_a_tensor_beta_and_weight_grads(name) -> None:
    kind = KINDS[name]
    x, w, label = _problem(n=7, seed=9)

    def loss_fn(a, b, beta):
        return F.cross_entropy(lsoftmax(a, b, label, margin=kind, beta=beta), label) + lsoftmax_cross_entropy(
            a, b, label, margin=kind, beta=beta
        )

    compiled = torch.compile(loss_fn, fullgraph=True)
    for beta in (3.0, 1.0):
        b = torch.tensor(beta, dtype=torch.float64)
        got = _grads(lambda p, q, b=b: compiled(p, q, b), x, w)
        for a, e in zip(got, _grads(lambda p, q, b=b: loss_fn(p, q, b), x, w)):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_a_margin_made_inside_or_passed_to_a_compiled_function_is_read_as_it_is() -> None:
    x, w, label = _problem(n=6, seed=12)
    inside = torch.compile(lambda a, b: lsoftmax(a, b, label, margin=lsm.ArcFace(m=0.3, s=5.0)), fullgraph=True)
    torch.testing.assert_close(inside(x, w), lsoftmax(x, w, label, margin=lsm.ArcFace(m=0.3, s=5.0)), rtol=0, atol=0)
    passed = torch.compile(lambda a, b, k: lsoftmax_cross_entropy(a, b, label, margin=k), fullgraph=True)
    for kind in (lsm.ArcFace(m=0.5, s=8.0), lsm.ArcFace(m=0.2, s=3.0), lsm.CosFace(m=0.2, s=3.0), 3, KINDS["sphereface"]):
        torch.testing.assert_close(passed(x, w, kind), lsoftmax_cross_entropy(x, w, label, margin=kind), rtol=0, atol=0)


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("name", FAMILY)
def test_bfloat16_autocast_computes_in_float32(name) -> None:
    kind = KINDS[name]
    x, w, label = _problem(n=8, dtype=torch.float32, seed=6)
    h = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = lsoftmax(h, w, label, margin=kind, beta=1.0)
        fused = lsoftmax_cross_entropy(h, w, label, margin=kind, beta=1.0)
        plain = lsoftmax(x, w, label, margin=kind, beta=1.0)  # float32 runs as without autocast
    assert logits.dtype == fused.dtype == plain.dtype == torch.float32
    want = lsoftmax(h.detach().float(), w, label, margin=kind, beta=1.0)
    torch.testing.assert_close(logits.detach(), want, rtol=0, atol=0)
    torch.testing.assert_close(plain, lsoftmax(x, w, label, margin=kind, beta=1.0), rtol=0, atol=0)
    want_loss = lsoftmax_cross_entropy(h.detach().float(), w, label, margin=kind, beta=1.0)
    torch.testing.assert_close(fused.detach(), want_loss, rtol=1e-6, atol=1e-6)
    (F.cross_entropy(logits, label) + fused).backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name", FAMILY)
def test_state_dict_keeps_the_margin_and_refuses_another(name) -> None:
    kind = KINDS[name]
    for module_type in (LSoftmaxLinear, LSoftmaxLoss):
        saved = module_type(4, 5, margin=kind, schedule=lsm.ExponentialSchedule(beta0=8.0, scale=0.5))
        saved.step()
        state = saved.state_dict()
        assert state["_extra_state"]["margin"] == kind.to_dict()
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=True)
        again = module_type(4, 5, margin=lsm.margin_from_dict(kind.to_dict()))
        again.load_state_dict(loaded)
        assert again.margin == kind and again.iteration == 1 and again.beta == 4.0
        assert torch.equal(again.weight, saved.weight)
        noun = "layer" if module_type is LSoftmaxLinear else "loss"
        for other in (lsm.CosFace(m=0.2, s=3.0), 3):
            refusing = module_type(4, 5, margin=other)
            before = refusing.weight.detach().clone()
            words = f"checkpoint has margin={kind!r} but this {noun} has margin={other!r}"
            with pytest.raises(ValueError, match=re.escape(words)):
                refusing.load_state_dict(loaded)
            assert torch.equal(refusing.weight, before) and refusing.iteration == 0
    # An int m and LSoftmax(m) are the same margin, both ways.
    LSoftmaxLoss(4, 5, margin=lsm.LSoftmax(m=3)).load_state_dict(LSoftmaxLoss(4, 5, margin=3).state_dict())
    LSoftmaxLoss(4, 5, margin=3).load_state_dict(LSoftmaxLoss(4, 5, margin=lsm.LSoftmax(m=3)).state_dict())
    broken = LSoftmaxLoss(4, 5, margin=3).state_dict()
    broken["_extra_state"] = {**broken["_extra_state"], "margin": {"kind": "arcface", "m": 9.0}}
    with pytest.raises(ValueError, match="which is not a margin"):
        LSoftmaxLoss(4, 5, margin=3).load_state_dict(broken)


# --------------------------------------------------------------------------- class-parallel head

# One spawned world of 4 processes runs every group (as support.class_parallel does).
GROUPS = {4: (0, 1, 2, 3), 3: (0, 1, 2), 2: (1, 2), 1: (0,)}
PARALLEL_TIMEOUT_S = 180.0  # the spawned world is killed at this deadline and the tests fail


def _cases(world_size: int) -> list[cp.Case]:
    sizes = tuple(4 + r for r in range(world_size))
    return [
        cp.Case(name, sizes, num_classes=31, d=5, margin=kind, beta=1.5, seed=20 + i)  # type: ignore[arg-type]
        for i, (name, kind) in enumerate(KINDS.items())
    ]


def _run_group(group: Any) -> dict[str, Any]:
    """This rank's results in one group: every kind's case, the full checkpoint, and the
    margin compared across ranks (another on the last rank; an int and LSoftmax(m))."""
    import torch.distributed as dist

    from lsoftmax_core.adapters.torch import ClassParallelLSoftmaxLoss

    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    out: dict[str, Any] = {"cases": {case.name: cp.run_case(group, case) for case in _cases(world_size)}}
    head = ClassParallelLSoftmaxLoss(5, 31, margin=KINDS["arcface"], dtype=torch.float64, process_group=group)
    out["full"] = head.full_state_dict()
    last = rank == world_size - 1
    x, target = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 7, 30])
    other = ClassParallelLSoftmaxLoss(
        5, 31, margin=lsm.ArcFace(m=0.4, s=8.0) if last and world_size > 1 else KINDS["arcface"],
        dtype=torch.float64, process_group=group,
    )  # fmt: skip
    try:
        out["mismatch"] = other(x, target).item()
    except ValueError as e:
        out["mismatch"] = str(e)
    mixed = ClassParallelLSoftmaxLoss(5, 31, margin=lsm.LSoftmax(m=3) if last else 3, process_group=group,
                                      dtype=torch.float64)  # fmt: skip
    out["mixed"] = mixed(x, target).item()
    return out


_WORLD: list[Any] = []


@pytest.fixture
def world(monkeypatch) -> dict[int, list[dict[str, Any]]]:
    """Every group's results, rank by rank (one spawned world; support.dist.group_results)."""
    from support.dist import group_results

    return group_results(monkeypatch, __file__, "_run_group", GROUPS, _WORLD, timeout=PARALLEL_TIMEOUT_S)


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_class_parallel_head_equals_the_single_process_loss(world, world_size) -> None:
    ranks = world[world_size]
    for case in _cases(world_size):
        x, w, label = cp.problem(case)
        criterion = LSoftmaxLoss(case.d, case.num_classes, margin=case.margin,
                                 schedule=lsm.ConstantSchedule(case.beta), dtype=torch.float64)  # fmt: skip
        with torch.no_grad():
            criterion.weight.copy_(torch.from_numpy(w))
        xr = torch.from_numpy(x).requires_grad_()
        loss = criterion(xr, torch.from_numpy(label))
        loss.backward()
        start = 0
        for r, got in enumerate(ranks):
            res = got["cases"][case.name]
            a, b = res["bounds"]
            rows = slice(start, start + case.sizes[r])
            start += case.sizes[r]
            _close(res["loss"], loss.item(), f"{case.name} loss at P={world_size}", 1e-10)
            _close(res["grad_x"], world_size * xr.grad[rows].numpy(), f"{case.name} grad_x rank {r}", 1e-10)
            _close(res["grad_w"], criterion.weight.grad[a:b].numpy(), f"{case.name} grad_w rank {r}", 1e-10)


@pytest.mark.parametrize("world_size", sorted(GROUPS))
def test_class_parallel_margins_compare_by_value_and_checkpoint(world, world_size) -> None:
    ranks = world[world_size]
    full = ranks[0]["full"]
    assert full["_extra_state"]["margin"] == KINDS["arcface"].to_dict()
    LSoftmaxLoss(5, 31, margin=KINDS["arcface"], dtype=torch.float64).load_state_dict(full)
    for r, got in enumerate(ranks):
        if world_size == 1:
            assert isinstance(got["mismatch"], float)
        else:
            assert isinstance(got["mismatch"], str), f"rank {r} did not raise"
            assert "must have the same margin" in got["mismatch"]
            assert "margin=ArcFace(m=0.5, s=8.0)" in got["mismatch"] and "margin=ArcFace(m=0.4, s=8.0)" in got["mismatch"]
        assert got["mixed"] == ranks[0]["mixed"]  # 3 and LSoftmax(3): the same margin, no error


# --------------------------------------------------------------------------- pytorch-metric-learning


def _pml(name: str, **kw: Any) -> Any:
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    return getattr(losses, name)(**kw).double()


@pytest.mark.parametrize(
    "peer, kw, ours",
    [
        ("ArcFaceLoss", {"margin": math.degrees(0.5), "scale": 64}, lsm.ArcFace(m=0.5, s=64.0)),
        ("CosFaceLoss", {"margin": 0.35, "scale": 64}, lsm.CosFace(m=0.35, s=64.0)),
        ("SphereFaceLoss", {"margin": 4, "scale": 1}, lsm.SphereFace(m=4)),
        ("LargeMarginSoftmaxLoss", {"margin": 3, "scale": 1}, 3),
    ],
)
def test_modules_equal_pytorch_metric_learning(peer, kw, ours) -> None:
    """PML's W is (D, C), our weight's transpose; it has no beta (so beta = 0); ArcFace's
    margin is in degrees there (the same continuation past theta = pi - m)."""
    x, _, label = _problem(n=12, c=6, d=5, seed=13)
    loss_fn = _pml(peer, num_classes=6, embedding_size=5, **kw)
    criterion = LSoftmaxLoss(5, 6, margin=ours, dtype=torch.float64)
    with torch.no_grad():
        criterion.weight.copy_(loss_fn.W.T)
    xp, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = loss_fn(xp, label)
    their_gx, their_gw = torch.autograd.grad(theirs, (xp, loss_fn.W))
    mine = criterion(xo, label)
    mine.backward()
    _close(mine, theirs.item(), f"{peer} loss", 1e-9)
    _close(xo.grad, their_gx.numpy(), f"{peer} grad_x", 1e-9)
    _close(criterion.weight.grad, their_gw.T.numpy(), f"{peer} grad_w", 1e-9)
