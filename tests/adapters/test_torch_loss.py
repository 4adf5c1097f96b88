"""The fused L-Softmax cross-entropy in PyTorch: ``lsoftmax_cross_entropy`` equals the
unfused ``F.cross_entropy(lsoftmax(...))`` with its gradients, passes torch.library's
checks, compiles without recompiling as beta anneals, and ``LSoftmaxLoss`` trains, anneals
and checkpoints like ``LSoftmaxLinear``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F
from hypothesis import given, settings

import lsoftmax_core as lsm
import lsoftmax_core._loss_engine as loss_engine
from lsoftmax_core.adapters.torch import LSoftmaxLinear, LSoftmaxLoss, lsoftmax, lsoftmax_cross_entropy

from support import reference
from support.strategies import problems
from support.tolerances import TOLERANCES, assert_close, check_backward, grad_scales, logit_scale

OPS = torch.ops.lsoftmax_core
IGNORE = -100
REDUCTIONS = ["mean", "sum", "none"]


def _problem(n=13, c=9, d=5, *, dtype=torch.float64, seed=0, scale=1.0, ignored=0.2, ignore_index=IGNORE):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignored] = ignore_index
    return x, w, target


def _upstream(reduction, n, dtype=torch.float64, seed=1):
    shape = (n,) if reduction == "none" else ()
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _with_grads(fn, x, w, g):
    """fn(x, w) and its gradients for the upstream gradient g."""
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(xr, wr)
    gx, gw = torch.autograd.grad(loss, (xr, wr), g)
    return loss.detach(), gx, gw


def _unfused(x, w, target, *, margin, beta, reduction="mean", ignore_index=IGNORE):
    """The composition the fused loss replaces (lsoftmax needs every label in [0, C): the
    ignored rows get class 0 there, and F.cross_entropy then ignores them)."""
    label = torch.where(target == ignore_index, 0, target)
    logits = lsoftmax(x, w, label, margin=margin, beta=beta)
    return F.cross_entropy(logits, target.long(), reduction=reduction, ignore_index=ignore_index)


def _fused(target, **kw):
    """(x, w) -> the fused loss against ``target``."""
    return lambda x, w: lsoftmax_cross_entropy(x, w, target, **kw)


def _host(a):
    return a.detach().cpu() if isinstance(a, torch.Tensor) else a


def _assert_rel(actual, expected, rtol, what=""):
    actual, expected = np.asarray(_host(actual), dtype=float), np.asarray(_host(expected), dtype=float)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    err = float(np.abs(actual - expected).max(initial=0.0)) / scale
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:.3g}"


def _compare_to_unfused(x, w, target, g, rtol, **kw):
    fused = _with_grads(_fused(target, **kw), x, w, g)
    unfused = _with_grads(lambda a, b: _unfused(a, b, target, **kw), x, w, g)
    for what, a, b in zip(("loss", "grad_x", "grad_w"), fused, unfused):
        assert a.dtype == x.dtype, what
        _assert_rel(a, b, rtol, f"{what} {kw}")
    return fused


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("beta", [0.0, 3.0, 1000.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_equals_the_unfused_loss_and_gradients_in_float64(margin, beta, reduction) -> None:
    x, w, target = _problem(seed=margin * 10 + int(beta), scale=3.0)
    target[:3] = 4  # duplicate labels, next to ignored rows
    g = _upstream(reduction, len(x), seed=margin)
    _compare_to_unfused(x, w, target, g, 1e-10, margin=margin, beta=beta, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n,c", [(1, 1), (1, 6), (8, 1), (9, 2)])
def test_one_sample_one_class_and_a_valid_class_as_ignore_index(n, c, reduction) -> None:
    for ignore_index in (IGNORE, c - 1):  # ignoring a real class, as torch allows
        x, w, target = _problem(n, c, 4, seed=n + c, ignored=0.0)
        target[0] = 0
        for margin, beta in [(2, 0.0), (4, 3.0)]:
            g = _upstream(reduction, n, seed=c)
            kw = dict(margin=margin, beta=beta, reduction=reduction, ignore_index=ignore_index)
            if (target == ignore_index).all():
                continue  # torch's mean is NaN there; see the all-ignored test
            _compare_to_unfused(x, w, target, g, 1e-10, **kw)


@given(problems(max_n=7, max_c=6))
@settings(max_examples=30)
def test_equals_the_unfused_loss_over_norms_of_every_size(p) -> None:
    """Rows scaled from 1e-3 to 1e3 and margins up to 16: the errors are measured against
    the logits' scale (support.tolerances), not the values, which can cancel."""
    xn, wn, ln, margin, beta = p
    x, w, target = torch.from_numpy(xn), torch.from_numpy(wn), torch.from_numpy(ln)
    tol = TOLERANCES["float64"]
    scale = logit_scale(xn, wn, margin)
    loss = lsoftmax_cross_entropy(x, w, target, margin=margin, beta=beta, reduction="none")
    want = _unfused(x, w, target, margin=margin, beta=beta, reduction="none")
    # The loss is a log-sum-exp: besides the logits it holds log(C) (log 2 for two tiny
    # logits), whose own rounding is measured against its size, not the logits'.
    assert_close(loss, want, scale.max(axis=1) + np.log(len(wn)), 4 * tol.forward, "loss")
    # Gradients for an upstream 1 ("sum"): the logits' gradient G of the unfused loss sets the scale.
    logits = lsoftmax(x, w, target, margin=margin, beta=beta).requires_grad_()
    (grad_logits,) = torch.autograd.grad(F.cross_entropy(logits, target, reduction="sum"), logits)
    _, gx, gw = _with_grads(_fused(target, margin=margin, beta=beta, reduction="sum"), x, w, torch.tensor(1.0).double())
    sx, sw = grad_scales(grad_logits, xn, wn, margin)
    ex, ew = reference.backward(grad_logits.numpy(), xn, wn, ln, margin=margin, beta=beta)
    assert_close(gx, ex, sx, 4 * tol.grad, "grad_x")
    assert_close(gw, ew, sw, 4 * tol.grad, "grad_w")


def _reference(x, w, target, g, *, margin, beta, reduction, ignore_index=IGNORE):
    """float64 loss, logits' gradient and input gradients from support.reference's logits."""
    x64, w64 = x.detach().double().numpy(), w.detach().double().numpy()
    label = torch.where(target == ignore_index, 0, target).numpy()
    f = torch.from_numpy(reference.forward(x64, w64, label, margin=margin, beta=beta)).requires_grad_()
    loss = F.cross_entropy(f, target, reduction=reduction, ignore_index=ignore_index)
    (grad_logits,) = torch.autograd.grad(loss, f, g.double())
    return loss.detach(), grad_logits, x64, w64, label


@pytest.mark.parametrize("margin,beta", [(1, 0.0), (2, 0.0), (3, 1.0), (4, 3.0), (6, 1000.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_within_the_tolerances(margin, beta, reduction) -> None:
    x, w, target = _problem(dtype=torch.float32, seed=margin, scale=2.0)
    g = _upstream(reduction, len(x), torch.float32, seed=margin)
    loss, gx, gw = _with_grads(_fused(target, margin=margin, beta=beta, reduction=reduction), x, w, g)
    assert loss.dtype == gx.dtype == gw.dtype == torch.float32
    want, grad_logits, x64, w64, label = _reference(x, w, target, g, margin=margin, beta=beta, reduction=reduction)
    scale = logit_scale(x64, w64, margin).max(axis=1)  # a row's loss is on its logits' scale
    if reduction != "none":
        scale = scale.max() * (1 if reduction == "mean" else len(x))
    assert_close(loss, want, scale, TOLERANCES["float32"].forward, "loss float32", dtype="float32")
    check_backward((gx, gw), grad_logits, x64, w64, label, margin=margin, beta=beta, dtype="float32")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_ignored_and_empty_batches_give_zero(reduction) -> None:
    """torch's mean is 0/0 = NaN there; the fused loss gives 0 and zero gradients."""
    x, w, _ = _problem(5, 3, 4)
    for n in (5, 0):
        fused = _fused(torch.full((n,), IGNORE), margin=3, beta=1.0, reduction=reduction)
        g = _upstream(reduction, n)
        loss, gx, gw = _with_grads(fused, x[:n], w, g)
        assert loss.shape == g.shape and not loss.any() and loss.dtype == torch.float64
        assert gx.shape == (n, 4) and gw.shape == (3, 4) and not gx.any() and not gw.any()


def test_non_contiguous_inputs_int32_targets_and_inputs_unchanged() -> None:
    x, w, target = _problem(9, 6, 8)
    xs, ws = x[:, ::2], w.T.contiguous().T[:, 1:5]  # column-strided x, column-major w
    assert not xs.is_contiguous() and not ws.is_contiguous()
    t32 = target.to(torch.int32)
    copies = [t.clone() for t in (xs, ws, t32)]
    for reduction in REDUCTIONS:
        g = _upstream(reduction, 9)
        _compare_to_unfused(xs, ws, t32, g, 1e-10, margin=3, beta=0.5, reduction=reduction)
    for t, c in zip((xs, ws, t32), copies):
        assert torch.equal(t, c)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("margin,beta", [(1, 0.0), (2, 0.0), (2, 1.0), (3, 0.5), (4, 2.0), (6, 10.0)])
def test_gradcheck_float64(margin, beta, reduction) -> None:
    """Random normal data lies almost surely away from psi's kinks (cos = cos(k*pi/m))."""
    x, w, target = _problem(6, 4, 3, seed=margin, ignored=0.2)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(_fused(target, margin=margin, beta=beta, reduction=reduction), (x, w))


def test_only_the_gradient_that_is_asked_for_is_returned() -> None:
    x, w, target = _problem(6, 4, 3)
    for reduction in REDUCTIONS:
        xr = x.clone().requires_grad_()
        loss = lsoftmax_cross_entropy(xr, w, target, margin=2, reduction=reduction)
        loss.sum().backward()
        want = _with_grads(_fused(target, margin=2, reduction=reduction), x, w, torch.ones_like(loss))[1]
        torch.testing.assert_close(xr.grad, want, rtol=0, atol=0)
        assert w.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_backward_hands_out_the_forwards_gradients_without_a_copy(monkeypatch, reduction) -> None:
    """Mean/sum: the forward's (C, D) gradient is scaled in place and returned, not copied;
    a second backward of a retained graph recomputes it, any upstream gradient is honoured."""
    made = []
    real = lsm.cross_entropy_with_grad

    def spy(*args, **kw):
        out = real(*args, **kw)
        made.append(out[2].ctypes.data)  # the core's grad_w, which the tensor shares
        return out

    monkeypatch.setattr(lsm, "cross_entropy_with_grad", spy)
    x, w, target = _problem(7, 5, 3)
    wr = w.clone().requires_grad_()
    loss = lsoftmax_cross_entropy(x, wr, target, margin=3, beta=0.5, reduction=reduction)
    (gw,) = torch.autograd.grad(loss, wr, retain_graph=True)
    assert gw.data_ptr() == made[0]
    want = _with_grads(_fused(target, margin=3, beta=0.5, reduction=reduction), x, w, torch.ones(()))[2]
    torch.testing.assert_close(gw, want, rtol=1e-12, atol=1e-14)
    (again,) = torch.autograd.grad(loss * 3.0, wr)  # the retained graph, another upstream gradient
    torch.testing.assert_close(again, 3.0 * want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gw, want, rtol=1e-12, atol=1e-14)  # the first result is untouched


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_eager_calls_give_the_operators_bits(reduction) -> None:
    """Eager calls skip the custom-op dispatch; the operators, which torch.compile, tracing
    and dispatch modes run, give the very same loss and gradients."""
    x, w, target = _problem(9, 6, 4, dtype=torch.float32)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = lsoftmax_cross_entropy(xr, wr, target, margin=3, beta=0.5, reduction=reduction)
    g = torch.ones_like(loss) if reduction != "none" else torch.linspace(0.5, 1.5, 9)
    gx, gw = torch.autograd.grad(loss, (xr, wr), g)
    b = torch.tensor(0.5, dtype=torch.float64)
    ops = torch.ops.lsoftmax_core
    if reduction == "none":
        want, lse = ops.lsoftmax_cross_entropy(x, w, target, 3, b, reduction, IGNORE)
        want_x, want_w = ops.lsoftmax_cross_entropy_backward(g, x, w, target, 3, b, reduction, IGNORE, lse)
    else:
        want, want_x, want_w = ops.lsoftmax_cross_entropy_with_grad(x, w, target, 3, b, reduction, IGNORE)
    assert torch.equal(loss.detach(), want) and torch.equal(gx, want_x) and torch.equal(gw, want_w)


def test_make_fx_and_jit_trace_record_the_operators() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, target = _problem(7, 5, 3, dtype=torch.float32)

    def f(x, w):
        return lsoftmax_cross_entropy(x, w, target, margin=3, beta=0.5, reduction="none")

    assert "lsoftmax_cross_entropy" in str(make_fx(f)(x, w).graph)
    traced = torch.jit.trace(f, (x, w), check_trace=False)
    assert "lsoftmax_cross_entropy" in str(traced.graph)
    x2 = torch.randn_like(x)
    assert torch.equal(traced(x2, w), f(x2, w))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_derivatives_fail_loudly(reduction) -> None:
    """Gradients are first order: a double backward raises instead of treating the saved
    gradients as constants (which would give silently wrong second derivatives)."""
    x, w, target = _problem(6, 4, 3)
    x.requires_grad_()
    w.requires_grad_()
    loss = lsoftmax_cross_entropy(x, w, target, margin=2, reduction=reduction).sum()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="lsoftmax_cross_entropy_backward"):
        (gx.sum() + w.sum()).backward()


# --------------------------------------------------------------------------- one pass, one check


def _spy_on_the_core(monkeypatch):
    """Record the core's loss calls (and their lse argument) and its array checks; all still run."""
    calls: list[tuple[str, object]] = []

    def spy(module, name, record):
        real = getattr(module, name)

        def wrapped(*args, **kw):
            calls.append((name, record(kw)))
            return real(*args, **kw)

        monkeypatch.setattr(module, name, wrapped)

    for name in ("cross_entropy", "cross_entropy_backward", "cross_entropy_with_grad"):
        spy(lsm, name, lambda kw: kw.get("lse") is not None)
    spy(loss_engine, "check_arrays", lambda kw: None)
    return calls


def test_mean_and_sum_take_one_pass_and_each_call_checks_once(monkeypatch) -> None:
    calls = _spy_on_the_core(monkeypatch)
    x, w, target = _problem(6, 4, 3)
    w.requires_grad_()
    for reduction in ("mean", "sum"):
        loss = lsoftmax_cross_entropy(x, w, target, margin=3, beta=1.0, reduction=reduction)
        assert [c[0] for c in calls] == ["cross_entropy_with_grad", "check_arrays"]
        calls.clear()
        loss.backward()  # scales the saved gradients: nothing left for the core
        assert calls == []
        with torch.no_grad():  # no gradient needed: the loss alone
            lsoftmax_cross_entropy(x, w, target, margin=3, beta=1.0, reduction=reduction)
        lsoftmax_cross_entropy(x, w.detach(), target, margin=3, beta=1.0, reduction=reduction)
        assert [c[0] for c in calls] == ["cross_entropy", "check_arrays"] * 2
        calls.clear()
    # "none": the loss with each row's log-sum-exp, which the backward reuses.
    loss = lsoftmax_cross_entropy(x, w, target, margin=3, beta=1.0, reduction="none")
    loss.backward(torch.ones(6, dtype=torch.float64))
    assert calls == [
        ("cross_entropy", False), ("check_arrays", None), ("cross_entropy_backward", True), ("check_arrays", None)
    ]  # fmt: skip


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"target": torch.tensor([0, 3])}, ValueError, "target[1]=3"),
        ({"target": torch.tensor([0, -1])}, ValueError, "or equal ignore_index=-100: target[1]=-1"),
        ({"target": torch.tensor([0, 5]), "ignore_index": 5}, None, None),
        ({"target": torch.tensor([0.0, 1.0])}, TypeError, "target must have an integer dtype"),
        ({"target": torch.tensor([0, 1, 1])}, ValueError, "target must have shape (N,) = (2,)"),
        ({"target": [0, 1]}, TypeError, "target must be a torch.Tensor"),
        ({"weight": torch.ones(3, 4, dtype=torch.float64)}, ValueError, "x and weight must have the same feature size"),
        ({"weight": torch.ones(0, 3, dtype=torch.float64)}, ValueError, "weight must have at least one class"),
        ({"weight": torch.ones(3, 3)}, TypeError, "x and weight must have the same dtype"),
        ({"x": torch.zeros(2, 3, device="meta")}, ValueError, "x.device=meta is not supported"),
        ({"x": torch.zeros(2, 3), "weight": torch.ones(3, 3)}, None, None),
        ({"x": torch.zeros(2, 3).half(), "weight": torch.ones(3, 3).half()}, TypeError, "x.dtype=float16 is not supported"),
        ({"x": torch.zeros(2, 3).bfloat16(), "weight": torch.ones(3, 3).bfloat16()}, TypeError, "bfloat16"),
        ({"reduction": "avg"}, ValueError, "reduction='avg' must be one of"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index=1.5"),
        ({"margin": 0}, ValueError, "margin=0"),
        ({"beta": -1.0}, ValueError, "beta=-1.0"),
        ({"beta": torch.ones(2)}, ValueError, "beta.shape=(2,)"),
    ],
)
def test_errors_name_the_argument(change, exc, words) -> None:
    args = {
        "x": torch.zeros(2, 3, dtype=torch.float64),
        "weight": torch.ones(3, 3, dtype=torch.float64),
        "target": torch.tensor([0, 1]),
        "margin": 2,
        "beta": 0.0,
    }
    args.update(change)
    call = lambda: lsoftmax_cross_entropy(args.pop("x"), args.pop("weight"), args.pop("target"), **args)  # noqa: E731
    if exc is None:  # a control: this change alone is fine
        assert torch.isfinite(call())
        return
    with pytest.raises(exc) as info:
        call()
    assert words in str(info.value)


def test_a_bad_target_is_refused_before_anything_runs(monkeypatch) -> None:
    calls = _spy_on_the_core(monkeypatch)
    matmuls: list[int] = []
    real_matmul = np.matmul
    monkeypatch.setattr(loss_engine.np, "matmul", lambda *a, **k: matmuls.append(1) or real_matmul(*a, **k))
    x, w, target = _problem(6, 4, 3, ignored=0.0)
    w.requires_grad_()
    target[4] = 4
    for reduction in REDUCTIONS:
        with pytest.raises(ValueError, match=r"target must lie in \[0, C\) = \[0, 4\).*target\[4\]=4"):
            lsoftmax_cross_entropy(x, w, target, reduction=reduction)
    assert [c[0] for c in calls].count("check_arrays") == 3 and not matmuls


# --------------------------------------------------------------------------- CUDA
# The CuPy backend through the logits' bridge (_run/_run_cuda).  Never run here (no GPU).

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("margin,beta", [(1, 0.0), (2, 0.0), (4, 3.0), (6, 1000.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_equals_the_unfused_loss_and_gradients_in_float64(margin, beta, reduction) -> None:
    x, w, target = _problem(33, 17, 9, seed=margin, scale=3.0)
    target[:3] = 4  # duplicate labels, next to ignored rows
    assert (target == IGNORE).any()
    x, w, target = x.cuda(), w.cuda(), target.cuda()
    g = _upstream(reduction, len(x), seed=margin).cuda()
    fused = _compare_to_unfused(x, w, target, g, 1e-10, margin=margin, beta=beta, reduction=reduction)
    assert all(t.is_cuda for t in fused)
    assert fused[0].shape == ((len(x),) if reduction == "none" else ())
    assert not fused[1][target == IGNORE].any()  # no gradient for an ignored row
    with torch.no_grad():  # the loss-only operator (the forward above formed the gradients too)
        alone = lsoftmax_cross_entropy(x, w, target, margin=margin, beta=beta, reduction=reduction)
    assert alone.is_cuda and alone.shape == fused[0].shape
    _assert_rel(alone, fused[0], 1e-12, "loss alone")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_operators_round_trip_the_float64_lse_and_0d_results(reduction) -> None:
    x, w, target = _problem(9, 5, 4, dtype=torch.float32, seed=3)
    x, w, target = x.cuda(), w.cuda(), target.cuda()
    hyper = (3, torch.tensor(1.0, dtype=torch.float64), reduction, IGNORE)
    loss, lse = OPS.lsoftmax_cross_entropy(x, w, target, *hyper)
    assert loss.is_cuda and loss.dtype == torch.float32 and loss.shape == ((9,) if reduction == "none" else ())
    assert lse.is_cuda and lse.dtype == torch.float64 and lse.shape == (9,)
    cpu_loss, cpu_lse = OPS.lsoftmax_cross_entropy(x.cpu(), w.cpu(), target.cpu(), *hyper)
    _assert_rel(lse, cpu_lse, 1e-5, "lse")
    _assert_rel(loss, cpu_loss, 1e-4, "loss")
    g = _upstream(reduction, 9, torch.float32).cuda()
    with_lse = OPS.lsoftmax_cross_entropy_backward(g, x, w, target, *hyper, lse)
    without = OPS.lsoftmax_cross_entropy_backward(g, x, w, target, *hyper, None)
    for a, b in zip(with_lse, without):
        assert a.is_cuda and a.dtype == torch.float32
        _assert_rel(a, b, 1e-5, "backward with and without lse")
    if reduction != "none":
        loss1, gx, gw = OPS.lsoftmax_cross_entropy_with_grad(x, w, target, *hyper)
        assert loss1.is_cuda and loss1.shape == () and gx.is_cuda and gw.is_cuda
        _assert_rel(loss1, loss, 1e-5, "with_grad loss")
        _assert_rel(gx * g, with_lse[0], 1e-5, "with_grad grad_x")
        _assert_rel(gw * g, with_lse[1], 1e-5, "with_grad grad_w")
    for op in (OPS.lsoftmax_cross_entropy, OPS.lsoftmax_cross_entropy_with_grad):
        if op is OPS.lsoftmax_cross_entropy or reduction != "none":
            torch.library.opcheck(op, (x, w, target, *hyper))
    torch.library.opcheck(OPS.lsoftmax_cross_entropy_backward, (g, x, w, target, *hyper, lse))


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("margin,beta", [(1, 0.0), (2, 0.0), (4, 3.0), (6, 1000.0)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cuda_float32_within_the_tolerances(margin, beta, reduction) -> None:
    x, w, target = _problem(dtype=torch.float32, seed=margin, scale=2.0)
    g = _upstream(reduction, len(x), torch.float32, seed=margin)
    fused = _fused(target.cuda(), margin=margin, beta=beta, reduction=reduction)
    loss, gx, gw = _with_grads(fused, x.cuda(), w.cuda(), g.cuda())
    assert loss.is_cuda and gx.is_cuda and gw.is_cuda
    assert loss.dtype == gx.dtype == gw.dtype == torch.float32
    loss, gx, gw = loss.cpu(), gx.cpu(), gw.cpu()
    want, grad_logits, x64, w64, label = _reference(x, w, target, g, margin=margin, beta=beta, reduction=reduction)
    scale = logit_scale(x64, w64, margin).max(axis=1)
    if reduction != "none":
        scale = scale.max() * (1 if reduction == "mean" else len(x))
    assert_close(loss, want, scale, TOLERANCES["float32"].forward, "loss float32 cuda", dtype="float32")
    check_backward((gx, gw), grad_logits, x64, w64, label, margin=margin, beta=beta, dtype="float32")


@pytest.mark.gpu
@cuda
def test_cuda_side_stream_and_outputs_belong_to_torch() -> None:
    x, w, target = _problem(64, 32, 16, dtype=torch.float32, seed=5)
    x, w, target = x.cuda(), w.cuda(), target.cuda()
    want = lsoftmax_cross_entropy(x, w, target, margin=3, reduction="none")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = lsoftmax_cross_entropy(x, w, target, margin=3, reduction="none")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before >= got.numel() * got.element_size()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.gpu
@cuda
def test_cuda_a_bad_target_is_an_error_naming_target() -> None:
    x, w, target = _problem(6, 4, 3, dtype=torch.float32)
    target[4] = 4
    # Checked on the device: reported by the next call on it, or by check_labels at once.
    with pytest.raises(ValueError, match=r"(label|target).*4"):
        lsoftmax_cross_entropy(x.cuda(), w.cuda(), target.cuda())
        lsm.check_labels()


# --------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_runs_float32_and_float64_in_their_own_dtype(autocast_dtype, reduction) -> None:
    for dtype in (torch.float32, torch.float64):
        x, w, target = _problem(dtype=dtype, seed=3)
        g = _upstream(reduction, len(x), dtype)
        fused = _fused(target, margin=4, beta=0.5, reduction=reduction)
        plain = _with_grads(fused, x, w, g)
        with torch.autocast("cpu", dtype=autocast_dtype):
            inside = _with_grads(fused, x, w, g)
        for a, b in zip(inside, plain):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_computes_low_precision_features_in_float32(autocast_dtype) -> None:
    torch.manual_seed(5)
    body = torch.nn.Linear(5, 5)
    x, w, target = _problem(dtype=torch.float32, seed=6)
    w.requires_grad_()
    with torch.autocast("cpu", dtype=autocast_dtype):
        h = body(x)
        assert h.dtype == autocast_dtype
        loss = lsoftmax_cross_entropy(h, w, target, margin=3, beta=1.0)
    assert loss.dtype == torch.float32
    want = lsoftmax_cross_entropy(h.detach().float(), w.detach(), target, margin=3, beta=1.0)
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=0)
    loss.backward()
    assert body.weight.grad is not None and torch.isfinite(body.weight.grad).all()
    assert w.grad is not None and w.grad.dtype == torch.float32


# --------------------------------------------------------------------------- torch.library and torch.compile


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_opcheck(requires_grad, reduction) -> None:
    for margin, beta, n in [(2, 0.0, 5), (4, 3.0, 1), (1, 0.5, 3)]:
        x, w, target = _problem(n, 4, 3, seed=margin)
        b = torch.tensor(beta, dtype=torch.float64)
        hyper = (margin, b, reduction, IGNORE)
        _, lse = OPS.lsoftmax_cross_entropy(x, w, target, *hyper)
        g = _upstream(reduction, n)
        for lse_arg in (lse, None):
            torch.library.opcheck(OPS.lsoftmax_cross_entropy_backward, (g, x, w, target, *hyper, lse_arg))
        x.requires_grad_(requires_grad)
        w.requires_grad_(requires_grad)
        torch.library.opcheck(OPS.lsoftmax_cross_entropy, (x, w, target, *hyper))
        if reduction != "none":
            torch.library.opcheck(OPS.lsoftmax_cross_entropy_with_grad, (x, w, target, *hyper))


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph_matches_eager_without_recompiling_as_beta_changes(reduction) -> None:
    def loss_fn(x, w, target, beta):
        return lsoftmax_cross_entropy(x, w, target, margin=3, beta=beta, reduction=reduction)

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    x, w, target = _problem(8, 5, 4, dtype=torch.float32)
    g = _upstream(reduction, 8, torch.float32)
    for t, beta in enumerate((8.0, 4.0, 2.0, 0.0)):
        b = torch.tensor(beta, dtype=torch.float64)
        results = []
        for f in (loss_fn, compiled):
            if f is compiled and t > 0:
                torch.compiler.set_stance("fail_on_recompile")
            try:
                results.append(_with_grads(lambda a, c, f=f, b=b: f(a, c, target, b), x, w, g))
            finally:
                torch.compiler.set_stance("default")
        for a, c in zip(*results):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- LSoftmaxLoss


def test_loss_module_equals_the_function_and_trains_with_a_schedule() -> None:
    torch.manual_seed(0)
    sched = lsm.ExponentialSchedule(beta0=16.0, scale=0.5, beta_min=1.0)
    criterion = LSoftmaxLoss(4, 3, margin=2, schedule=sched, dtype=torch.float64)
    assert criterion.weight.shape == (3, 4) and criterion.weight.abs().max() <= 0.5  # nn.Linear's bound
    assert not list(criterion.buffers()) and [n for n, _ in criterion.named_parameters()] == ["weight"]
    centres = torch.eye(3, 4, dtype=torch.float64) * 3
    target = torch.arange(3).repeat(10)
    x = centres[target] + 0.3 * torch.randn(30, 4, dtype=torch.float64)
    body = torch.nn.Linear(4, 4, dtype=torch.float64)
    opt = torch.optim.SGD([*body.parameters(), *criterion.parameters()], lr=0.1)

    def at_beta_one():
        with torch.no_grad():
            return lsoftmax_cross_entropy(body(x), criterion.weight, target, margin=2, beta=1.0)

    before = at_beta_one()
    for t in range(8):
        assert criterion.iteration == t and criterion.beta == sched(t)
        h = body(x)
        loss = criterion(h, target)
        fused = _fused(target, margin=2, beta=sched(t))
        want = _with_grads(fused, h, criterion.weight, torch.tensor(1.0, dtype=torch.float64))
        opt.zero_grad()
        loss.backward()
        torch.testing.assert_close(loss.detach(), want[0], rtol=0, atol=0)
        torch.testing.assert_close(criterion.weight.grad, want[2], rtol=0, atol=0)
        opt.step()
        criterion.step()
    assert at_beta_one() < 0.7 * before
    criterion.eval()  # a loss: the same in eval mode
    torch.testing.assert_close(criterion(x, target), lsoftmax_cross_entropy(x, criterion.weight, target, beta=sched(8)))
    torch.testing.assert_close(criterion.logits(x), x @ criterion.weight.T, rtol=1e-12, atol=0)
    assert "num_classes=3" in repr(criterion) and "ExponentialSchedule(beta0=16.0" in repr(criterion)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("normalize_weight", [False, True])
def test_cuda_loss_module_trains_and_equals_the_function(normalize_weight) -> None:
    torch.manual_seed(0)
    sched = lsm.ExponentialSchedule(beta0=16.0, scale=0.5, beta_min=1.0)
    kw = {"margin": 2, "schedule": sched, "normalize_weight": normalize_weight, "device": "cuda"}
    criterion = LSoftmaxLoss(4, 3, dtype=torch.float64, **kw)
    centres = torch.eye(3, 4, dtype=torch.float64, device="cuda") * 3
    target = torch.arange(3, device="cuda").repeat(10)
    target[::7] = IGNORE
    x = centres[target.clamp(min=0)] + 0.3 * torch.randn(30, 4, dtype=torch.float64, device="cuda")
    body = torch.nn.Linear(4, 4, dtype=torch.float64, device="cuda")
    opt = torch.optim.SGD([*body.parameters(), *criterion.parameters()], lr=0.1)

    def at_beta_one():
        with torch.no_grad():
            weight = F.normalize(criterion.weight, dim=1) if normalize_weight else criterion.weight
            return float(lsoftmax_cross_entropy(body(x), weight, target, margin=2, beta=1.0))

    before = at_beta_one()
    for t in range(8):
        h = body(x)
        loss = criterion(h, target)
        assert loss.is_cuda and loss.shape == ()
        weight = F.normalize(criterion.weight, dim=1) if normalize_weight else criterion.weight
        fused = _fused(target, margin=2, beta=sched(t))
        want = _with_grads(fused, h, weight, torch.tensor(1.0, dtype=torch.float64, device="cuda"))
        unfused = _unfused(h.detach(), weight.detach(), target, margin=2, beta=sched(t))
        opt.zero_grad()
        loss.backward()
        torch.testing.assert_close(loss.detach(), want[0], rtol=1e-12, atol=0)
        _assert_rel(loss, unfused, 1e-10, f"module loss step {t}")
        assert criterion.weight.grad.is_cuda and torch.isfinite(criterion.weight.grad).all()
        opt.step()
        criterion.step()
    assert criterion.iteration == 8 and at_beta_one() < before
    # float32 too, a few steps
    criterion32 = LSoftmaxLoss(4, 3, dtype=torch.float32, **kw)
    opt32 = torch.optim.SGD(criterion32.parameters(), lr=0.1)
    for _ in range(3):
        loss32 = criterion32(x.float(), target)
        opt32.zero_grad()
        loss32.backward()
        assert loss32.is_cuda and loss32.dtype == torch.float32 and torch.isfinite(criterion32.weight.grad).all()
        opt32.step()
        criterion32.step()


def test_loss_module_state_dict_round_trip() -> None:
    sched = lsm.InverseSchedule(base=1000.0, gamma=0.12, power=1.0, beta_min=5.0)
    criterion = LSoftmaxLoss(3, 4, margin=4, schedule=sched, normalize_weight=True)
    for _ in range(3):
        criterion.step()
    state = criterion.state_dict()
    fresh = LSoftmaxLoss(3, 4, margin=4, normalize_weight=True)
    assert fresh.beta == 0.0
    fresh.load_state_dict(state)
    assert fresh.iteration == 3 and fresh.schedule == sched and fresh.beta == sched(3)
    assert torch.equal(fresh.weight, criterion.weight)
    x, _, target = _problem(5, 4, 3, dtype=torch.float32, ignored=0.0)
    torch.testing.assert_close(fresh(x, target), criterion(x, target), rtol=0, atol=0)
    with pytest.raises(ValueError, match="checkpoint has normalize_weight=True but this loss has normalize_weight=False"):
        LSoftmaxLoss(3, 4, margin=4).load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint has margin=4 but this loss has margin=2"):
        LSoftmaxLoss(3, 4, margin=2, normalize_weight=True).load_state_dict(state)
    # An LSoftmaxLinear head's checkpoint (weight, margin, schedule) loads into the loss.
    head = LSoftmaxLinear(3, 4, margin=4, schedule=sched)
    head.step()
    plain = LSoftmaxLoss(3, 4, margin=4)
    plain.load_state_dict(head.state_dict())
    assert plain.iteration == 1 and plain.beta == sched(1) and torch.equal(plain.weight, head.weight)


def test_loss_module_step_between_forward_and_backward_keeps_the_forward_beta() -> None:
    for reduction in REDUCTIONS:
        criterion = LSoftmaxLoss(3, 4, schedule=lsm.ExponentialSchedule(5.0, 0.1, 0.0), reduction=reduction, dtype=torch.float64)
        x, _, target = _problem(5, 4, 3)
        loss = criterion(x, target).sum()
        criterion.step()  # changes beta from 5.0 to 0.5 in place
        (grad,) = torch.autograd.grad(loss, criterion.weight)
        g = torch.ones(5 if reduction == "none" else (), dtype=torch.float64)
        _, _, want = _with_grads(_fused(target, beta=5.0, reduction=reduction), x, criterion.weight, g)
        torch.testing.assert_close(grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_normalize_weight_is_a_softmax_with_its_weight_gradient(reduction) -> None:
    """A-Softmax (SphereFace): the unit weight rows go into the loss, autograd differentiates
    through the normalisation."""
    torch.manual_seed(2)
    criterion = LSoftmaxLoss(5, 9, margin=4, normalize_weight=True, reduction=reduction, dtype=torch.float64)
    criterion.iteration = 0
    criterion.schedule = lsm.ConstantSchedule(2.0)
    with torch.no_grad():
        criterion.weight.mul_(torch.rand(9, 1, dtype=torch.float64) * 10)  # rows of many norms
    x, _, target = _problem(seed=4, scale=3.0)
    x.requires_grad_()
    g = _upstream(reduction, len(x))
    loss = criterion(x, target)
    gx, gw = torch.autograd.grad(loss, (x, criterion.weight), g)
    xr, wr = x.detach().clone().requires_grad_(), criterion.weight.detach().clone().requires_grad_()
    want = _unfused(xr, F.normalize(wr, dim=1), target, margin=4, beta=2.0, reduction=reduction)
    ex, ew = torch.autograd.grad(want, (xr, wr), g)
    for a, b, what in ((loss, want, "loss"), (gx, ex, "grad_x"), (gw, ew, "grad_w")):
        _assert_rel(a.detach(), b.detach(), 1e-10, what)
    torch.testing.assert_close(criterion.logits(x), x @ F.normalize(criterion.weight, dim=1).T)
    # The logits' norms are |x| (unit rows): scaling a weight row changes nothing.
    with torch.no_grad():
        criterion.weight[0].mul_(7.0)
    torch.testing.assert_close(criterion(x, target), loss, rtol=1e-12, atol=0)


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6")
def test_compiled_loss_module_follows_the_schedule_without_recompiling() -> None:
    torch.manual_seed(1)
    criterion = LSoftmaxLoss(4, 3, margin=2, normalize_weight=True, schedule=lsm.ExponentialSchedule(8.0, 0.5, 0.0))
    torch._dynamo.reset()
    compiled = torch.compile(criterion, fullgraph=True)
    x, _, target = _problem(6, 3, 4, dtype=torch.float32)
    for t in range(4):
        if t == 1:
            torch.compiler.set_stance("fail_on_recompile")
        try:
            loss = compiled(x, target)
            (got,) = torch.autograd.grad(loss, criterion.weight)
        finally:
            torch.compiler.set_stance("default")
        wr = criterion.weight.detach().clone().requires_grad_()
        want = _unfused(x, F.normalize(wr, dim=1), target, margin=2, beta=8.0 * 0.5**t)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, torch.autograd.grad(want, wr)[0], rtol=1e-5, atol=1e-6)
        criterion.step()


def test_loss_module_argument_errors() -> None:
    with pytest.raises(ValueError, match="num_classes=0"):
        LSoftmaxLoss(3, 0)
    with pytest.raises(ValueError, match="in_features=0"):
        LSoftmaxLoss(0, 3)
    with pytest.raises(ValueError, match="margin=0"):
        LSoftmaxLoss(3, 4, margin=0)
    with pytest.raises(TypeError, match="normalize_weight=1 must be a bool"):
        LSoftmaxLoss(3, 4, normalize_weight=1)
    with pytest.raises(ValueError, match="reduction='avg'"):
        LSoftmaxLoss(3, 4, reduction="avg")
    with pytest.raises(TypeError, match=r"schedule=.* must have beta\(step\)"):
        LSoftmaxLoss(3, 4, schedule=lambda t: 0.0)
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        LSoftmaxLoss(3, 4)(torch.zeros(2, 3), None)
