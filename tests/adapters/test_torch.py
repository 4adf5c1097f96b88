"""The PyTorch adapter: autograd, custom-op checks, torch.compile, zero copy, errors, the layer,
and equality with pytorch-metric-learning's LargeMarginSoftmaxLoss where the definitions agree."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import lsoftmax_core as lsm
from lsoftmax_core.adapters.torch import LSoftmaxLinear, lsoftmax

from support.strategies import problems
from support.tolerances import (
    TOLERANCES,
    assert_close,
    check_backward,
    check_forward,
    grad_scales,
    logit_scale,
)

DTYPES = {"float64": torch.float64, "float32": torch.float32}
OPS = torch.ops.lsoftmax_core


def _problem(n=7, c=5, d=4, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    w = torch.randn(c, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    label = torch.randint(0, c, (n,), generator=g).to(device)
    return x, w, label


def _forward_and_grads(x, w, label, g, **kw):
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    out = lsoftmax(xr, wr, label, **kw)
    gx, gw = torch.autograd.grad(out, (xr, wr), g)
    return out.detach(), gx, gw


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", list(DTYPES))
@given(data=st.data())
def test_forward_and_autograd_match_reference(dtype, data) -> None:
    xn, wn, ln, m, beta = data.draw(problems(dtype=np.dtype(dtype)))
    x, w, label = torch.from_numpy(xn), torch.from_numpy(wn), torch.from_numpy(ln)
    g = torch.from_numpy(np.random.default_rng(0).standard_normal((len(xn), len(wn)))).to(DTYPES[dtype])
    out, gx, gw = _forward_and_grads(x, w, label, g, margin=m, beta=beta)
    assert out.dtype == gx.dtype == gw.dtype == DTYPES[dtype]
    check_forward(out.numpy(), xn, wn, ln, margin=m, beta=beta, dtype=dtype)
    check_backward((gx.numpy(), gw.numpy()), g.numpy(), xn, wn, ln, margin=m, beta=beta, dtype=dtype)


@pytest.mark.parametrize(
    "margin,beta", [(1, 0.0), (2, 0.0), (2, 1.0), (3, 0.5), (4, 0.0), (4, 100.0), (6, 2.0)]
)
def test_gradcheck_float64(margin, beta) -> None:
    x, w, label = _problem(n=6, c=4, d=3, seed=margin)
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lsoftmax(a, b, label, margin=margin, beta=beta), (x, w))


@given(problems(), st.floats(0.0, 1e3))
@settings(max_examples=20)
def test_margin_one_is_exactly_the_linear_layer(p, beta) -> None:
    xn, wn, ln, _, _ = p
    x, w = torch.from_numpy(xn), torch.from_numpy(wn)
    g = torch.ones(len(xn), len(wn), dtype=torch.float64)
    out, gx, gw = _forward_and_grads(x, w, torch.from_numpy(ln), g, margin=1, beta=beta)
    # Bit-equal to torch's own GEMMs, which the adapter runs on the CPU.
    torch.testing.assert_close(out, x @ w.T, rtol=0, atol=0)
    torch.testing.assert_close(gx, g @ w, rtol=0, atol=0)
    torch.testing.assert_close(gw, g.T @ x, rtol=0, atol=0)


def test_non_contiguous_inputs_empty_batch_and_int32_labels() -> None:
    x, w, label = _problem(n=9, c=6, d=8)
    xs, ws = x[:, ::2], w.T.contiguous().T[1:, :4]  # column-strided x, column-major w
    assert not xs.is_contiguous() and not ws.is_contiguous()
    lab = label.clamp(max=4).to(torch.int32)
    out, gx, gw = _forward_and_grads(xs, ws, lab, torch.ones(9, 5, dtype=torch.float64), margin=3, beta=0.5)
    check_forward(out.numpy(), xs.numpy(), ws.numpy(), lab.numpy(), margin=3, beta=0.5, dtype="float64")
    check_backward(
        (gx, gw), np.ones((9, 5)), xs.numpy(), ws.numpy(), lab.numpy(), margin=3, beta=0.5, dtype="float64"
    )
    empty, ex, ew = _forward_and_grads(x[:0], w, label[:0], torch.zeros(0, 6, dtype=torch.float64), margin=2)
    assert empty.shape == (0, 6) and ex.shape == (0, 8) and torch.equal(ew, torch.zeros_like(w))


@given(problems())
@settings(max_examples=20)
def test_inputs_are_not_modified(p) -> None:
    x, w, label = (torch.from_numpy(a) for a in p[:3])
    copies = [t.clone() for t in (x, w, label)]
    g = torch.randn(len(x), len(w), dtype=torch.float64)
    g_copy = g.clone()
    _forward_and_grads(x, w, label, g, margin=p[3], beta=p[4])
    for t, c in zip((x, w, label, g), (*copies, g_copy)):
        assert torch.equal(t, c)


def test_second_derivatives_fail_loudly() -> None:
    """Gradients are first order: a double backward raises instead of returning zeros."""
    x, w, label = _problem()
    x.requires_grad_()
    (gx,) = torch.autograd.grad(lsoftmax(x, w, label, margin=2).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="lsoftmax_backward"):
        gx.sum().backward()


# --------------------------------------------------------------------------- zero copy


def test_cpu_backend_sees_the_tensors_own_memory(monkeypatch) -> None:
    """The core receives views of the tensors' storage, and its results become the tensors."""
    seen: dict[str, int] = {}

    def ptr(a) -> int:
        return a.__array_interface__["data"][0]

    real_margin, real_margin_grad = lsm.add_margin, lsm.add_margin_grad

    def spy_margin(out, x, w, label, **kw):
        seen.update(x=ptr(x), w=ptr(w), label=ptr(label), out=ptr(out))
        return real_margin(out, x, w, label, **kw)

    def spy_margin_grad(gx, gw, g, x, w, label, **kw):
        seen.update(g=ptr(g), bx=ptr(x), gx=ptr(gx), gw=ptr(gw))
        return real_margin_grad(gx, gw, g, x, w, label, **kw)

    # On the CPU the adapter runs the GEMMs in torch and the core's margin maths in place
    # on the results: the core must see the inputs' storage and write the outputs' storage.
    monkeypatch.setattr(lsm, "add_margin", spy_margin)
    monkeypatch.setattr(lsm, "add_margin_grad", spy_margin_grad)
    base = torch.randn(5, 8, dtype=torch.float32)
    x = base[:, 2:6].requires_grad_()  # a strided view into a larger storage: still no copy
    w = torch.randn(3, 4, requires_grad=True)
    label = torch.tensor([0, 2, 1, 1, 0])
    out = lsoftmax(x, w, label, margin=2, beta=1.0)
    g = torch.randn(5, 3)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    assert seen["x"] == x.data_ptr() == base.data_ptr() + 2 * 4
    assert (seen["w"], seen["label"], seen["out"]) == (w.data_ptr(), label.data_ptr(), out.data_ptr())
    assert (seen["g"], seen["bx"]) == (g.data_ptr(), x.data_ptr())
    assert (seen["gx"], seen["gw"]) == (gx.data_ptr(), gw.data_ptr())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"x": np.zeros((2, 3))}, TypeError, "x must be a torch.Tensor"),
        ({"weight": [[1.0, 2.0, 3.0]]}, TypeError, "weight must be a torch.Tensor"),
        ({"label": torch.tensor([0.0, 1.0], requires_grad=True)}, ValueError, "label must not require grad"),
        ({"label": torch.tensor([0, 1], device="meta")}, ValueError, "label.device=meta"),
        ({"x": torch.zeros(2, 3).to_sparse()}, TypeError, "x must be a dense"),
        ({"x": torch.zeros(2, 4)}, ValueError, "same feature size D"),
        ({"x": torch.zeros(2, 3, dtype=torch.float32)}, TypeError, "same dtype"),
        (
            {"x": torch.zeros(2, 3, dtype=torch.float16), "weight": torch.ones(2, 3, dtype=torch.float16)},
            TypeError,
            "float16",
        ),
        (
            {"x": torch.zeros(2, 3, dtype=torch.bfloat16), "weight": torch.ones(2, 3, dtype=torch.bfloat16)},
            TypeError,
            "bfloat16",
        ),
        ({"label": torch.tensor([0, 2])}, ValueError, "label[1]=2"),
        ({"label": torch.tensor([0, -1])}, ValueError, "label[1]=-1"),
        ({"label": torch.tensor([0.0, 1.0])}, TypeError, "label must have an integer dtype"),
        ({"label": torch.tensor([0, 1, 1])}, ValueError, "label must have shape"),
        ({"margin": 0}, ValueError, "margin=0"),
        ({"margin": 2.5}, TypeError, "margin=2.5"),
        ({"beta": -1.0}, ValueError, "beta=-1.0"),
        ({"beta": float("nan")}, ValueError, "beta=nan"),
        ({"beta": "1"}, TypeError, "beta='1'"),
        ({"beta": torch.ones(2)}, ValueError, "beta.shape=(2,)"),
        ({"beta": torch.tensor(-2.0)}, ValueError, "beta=-2.0"),
    ],
)
def test_errors_name_the_argument(change, exc, words) -> None:
    args = {
        "x": torch.zeros(2, 3, dtype=torch.float64),
        "weight": torch.ones(2, 3, dtype=torch.float64),
        "label": torch.tensor([0, 1]),
        "margin": 2,
        "beta": 0.0,
    }
    args.update(change)
    with pytest.raises(exc) as info:
        lsoftmax(args.pop("x"), args.pop("weight"), args.pop("label"), **args)
    assert words in str(info.value)


def test_mixed_dtypes_name_x_and_weight() -> None:
    """Outside autocast no silent promotion: the error names the adapter's arguments."""
    x, w, label = _problem(dtype=torch.float32)
    for xd, wd in [(torch.bfloat16, torch.float32), (torch.float32, torch.float64)]:
        with pytest.raises(TypeError) as info:
            lsoftmax(x.to(xd), w.to(wd), label)
        assert str(info.value).startswith(
            f"x and weight must have the same dtype: x.dtype={xd}, weight.dtype={wd}"
        ), info.value


def test_arguments_are_checked_once_per_call_on_the_cpu(monkeypatch) -> None:
    """One check_arguments per call, in the forward before torch's GEMM; add_margin reuses
    it, and the backward extends it to grad_logits (Problem.with_grad_logits) for
    add_margin_grad instead of checking everything again."""
    calls: list[tuple[str, object]] = []
    real = {name: getattr(lsm, name) for name in ("check_arguments", "add_margin", "add_margin_grad")}

    def spy(name):
        def wrapped(*args, **kw):
            result = real[name](*args, **kw)
            calls.append((name, result if name == "check_arguments" else kw.get("checked")))
            return result

        return wrapped

    for name in real:
        monkeypatch.setattr(lsm, name, spy(name))
    x, w, label = _problem(dtype=torch.float32)
    x.requires_grad_()
    out = lsoftmax(x, w, label, margin=3, beta=0.5)
    assert [c[0] for c in calls] == ["check_arguments", "add_margin"]
    assert isinstance(calls[0][1], lsm.Problem) and calls[1][1] is calls[0][1]
    forward_problem = calls[0][1]
    calls.clear()
    out.sum().backward()
    assert [c[0] for c in calls] == ["add_margin_grad"]
    backward_problem = calls[0][1]
    assert isinstance(backward_problem, lsm.Problem) and backward_problem == forward_problem
    assert all(a is b for a, b in zip(backward_problem.inputs[:3], forward_problem.inputs[:3]))
    assert backward_problem.inputs[3] is not None  # the view of the upstream gradient


def test_labels_are_scanned_once_per_forward_and_backward_on_the_cpu(monkeypatch) -> None:
    """The forward scans the labels (O(N)); its backward reuses that check and the forward's
    per-sample statistics (the saved tensors cannot change in between: autograd refuses)."""
    from lsoftmax_core import _numpy_backend

    scans: list[int] = []
    real = _numpy_backend.check_label_values

    def spy(label, c, *args):
        scans.append(len(label))
        return real(label, c, *args)

    monkeypatch.setattr(_numpy_backend, "check_label_values", spy)
    x, w, label = _problem(n=6, dtype=torch.float32)
    x.requires_grad_()
    lsoftmax(x, w, label, margin=3, beta=0.5).sum().backward()
    assert scans == [6]


@pytest.mark.parametrize("margin,beta", [(1, 0.0), (3, 0.5), (4, 0.0)])
def test_eager_path_gives_the_operators_bits(margin, beta) -> None:
    """Eager calls skip the custom-op dispatch (and hand the statistics to the backward);
    the operators, which torch.compile runs, give the very same bits."""
    x, w, label = _problem(n=9, c=5, d=4, dtype=torch.float32, seed=margin)
    g = torch.randn(9, 5, generator=torch.Generator().manual_seed(7))
    out, gx, gw = _forward_and_grads(x, w, label, g, margin=margin, beta=beta)
    b = torch.tensor(beta, dtype=torch.float64)
    assert torch.equal(out, OPS.lsoftmax_forward(x, w, label, margin, b))
    ox, ow = OPS.lsoftmax_backward(g, x, w, label, margin, b)
    assert torch.equal(gx, ox) and torch.equal(gw, ow)


def test_jit_trace_records_the_operator_and_the_module_saves(tmp_path) -> None:
    """Tracing records the custom operator, not the eager path's autograd.Function (a
    Python op, which a saved TorchScript module cannot hold); the saved module replays it."""
    x, w, label = _problem(dtype=torch.float32)
    traced = torch.jit.trace(lambda x, w: lsoftmax(x, w, label, margin=3, beta=0.5), (x, w), check_trace=False)
    assert "lsoftmax_forward" in str(traced.graph)
    torch.jit.save(traced, str(tmp_path / "traced.pt"))
    loaded = torch.jit.load(str(tmp_path / "traced.pt"))
    x2 = torch.randn_like(x)
    assert torch.equal(loaded(x2, w), lsoftmax(x2, w, label, margin=3, beta=0.5))


def test_make_fx_records_the_operator() -> None:
    """Under a dispatch mode (make_fx) the operator is recorded, so the graph replays the
    margin (the eager Function's NumPy work is invisible to a dispatch mode)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, w, label = _problem(dtype=torch.float32)
    graph = make_fx(lambda x, w: lsoftmax(x, w, label, margin=3, beta=0.5))(x, w)
    assert "lsoftmax_forward" in str(graph.graph)
    x2 = torch.randn_like(x)
    assert torch.equal(graph(x2, w), lsoftmax(x2, w, label, margin=3, beta=0.5))


def test_an_in_place_change_between_forward_and_backward_is_refused() -> None:
    """The backward uses the forward's statistics of x and weight: autograd's version check
    refuses a backward after either changed in place (an optimizer step in between)."""
    x, w, label = _problem(dtype=torch.float32)
    w.requires_grad_()
    out = lsoftmax(x, w, label, margin=2)
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


# --------------------------------------------------------------------------- autocast


def _autocast_case(device, autocast_dtype, backward_inside):
    """lsoftmax and a cross-entropy under autocast, against the same calls without it."""
    x, w, label = _problem(n=9, c=5, d=6, dtype=torch.float32, seed=3, device=device)
    g = torch.randn(9, 5, generator=torch.Generator().manual_seed(4)).to(device)
    results = []
    for enabled in (False, True):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(device, dtype=autocast_dtype, enabled=enabled):
            logits = lsoftmax(xr, wr, label, margin=4, beta=0.5)
            loss = F.cross_entropy(logits, label)
            if backward_inside:
                grads = torch.autograd.grad(logits, (xr, wr), g, retain_graph=True)
                loss_grads = torch.autograd.grad(loss, (xr, wr))
        if not backward_inside:
            grads = torch.autograd.grad(logits, (xr, wr), g, retain_graph=True)
            loss_grads = torch.autograd.grad(loss, (xr, wr))
        results.append((logits.detach(), *grads, loss.detach(), *loss_grads))
    plain, autocast = results
    # The operator is on the float32 list: float32 inputs run exactly as without autocast.
    assert autocast[0].dtype == torch.float32 and autocast[1].dtype == autocast[2].dtype == torch.float32
    for a, b in zip(autocast, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    check_forward(autocast[0].cpu(), x.cpu(), w.cpu(), label.cpu(), margin=4, beta=0.5, dtype="float32")
    check_backward(
        (autocast[1].cpu(), autocast[2].cpu()), g.cpu(), x.cpu(), w.cpu(), label.cpu(), margin=4, beta=0.5, dtype="float32"
    )


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_autocast_cpu_runs_in_the_inputs_dtype(autocast_dtype, backward_inside) -> None:
    _autocast_case("cpu", autocast_dtype, backward_inside)


def _autocast_features_case(device, autocast_dtype):
    """Features an autocast layer produced in low precision meet a float32 weight in float32."""
    torch.manual_seed(5)
    body = torch.nn.Linear(6, 6).to(device)
    x, w, label = _problem(n=9, c=5, d=6, dtype=torch.float32, seed=6, device=device)
    w.requires_grad_()
    with torch.autocast(device, dtype=autocast_dtype):
        h = body(x)
        assert h.dtype == autocast_dtype
        logits = lsoftmax(h, w, label, margin=3, beta=1.0)
        loss = F.cross_entropy(logits, label)
    assert logits.dtype == torch.float32
    want = lsoftmax(h.detach().float(), w.detach(), label, margin=3, beta=1.0)
    torch.testing.assert_close(logits.detach(), want, rtol=0, atol=0)
    loss.backward()
    assert body.weight.grad is not None and torch.isfinite(body.weight.grad).all()
    assert w.grad is not None and w.grad.dtype == torch.float32
    # float64 is never cast by autocast: it stays float64.
    x64, w64 = x.double(), w.detach().double()
    with torch.autocast(device, dtype=autocast_dtype):
        assert lsoftmax(x64, w64, label, margin=3).dtype == torch.float64


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_autocast_cpu_promotes_low_precision_features(autocast_dtype) -> None:
    _autocast_features_case("cpu", autocast_dtype)


def test_autocast_under_torch_compile() -> None:
    x, w, label = _problem(n=8, c=5, d=4, dtype=torch.float32)

    def loss_fn(x, w):
        return F.cross_entropy(lsoftmax(x, w, label, margin=3, beta=1.5), label)

    compiled = torch.compile(loss_fn, fullgraph=True)
    results = []
    for f in (loss_fn, compiled):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = f(xr, wr)
        results.append((loss.detach(), *torch.autograd.grad(loss, (xr, wr))))
    assert results[1][0].dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- torch.library checks


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad) -> None:
    for margin, beta, n in [(2, 0.0, 5), (4, 3.0, 1), (1, 0.5, 3)]:
        x, w, label = _problem(n=n, c=4, d=3, seed=margin)
        x.requires_grad_(requires_grad)
        w.requires_grad_(requires_grad)
        b = torch.tensor(beta, dtype=torch.float64)
        torch.library.opcheck(OPS.lsoftmax_forward, (x, w, label, margin, b))
        g = torch.randn(n, 4, dtype=torch.float64)
        torch.library.opcheck(OPS.lsoftmax_backward, (g, x.detach(), w.detach(), label, margin, b))


def test_torch_compile_fullgraph_matches_eager() -> None:
    def loss_fn(x, w, label, beta):
        return F.cross_entropy(lsoftmax(x, w, label, margin=3, beta=beta), label)

    compiled = torch.compile(loss_fn, fullgraph=True)
    x, w, label = _problem(n=8, c=5, d=4, dtype=torch.float32)
    for beta in (0.0, 2.5):
        results = []
        for f in (loss_fn, compiled):
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            loss = f(xr, wr, label, beta)
            results.append((loss.detach(), *torch.autograd.grad(loss, (xr, wr))))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- LSoftmaxLinear


def test_layer_train_and_eval() -> None:
    torch.manual_seed(0)
    layer = LSoftmaxLinear(
        4, 5, margin=3, schedule=lsm.ExponentialSchedule(10.0, 0.5, 0.1), dtype=torch.float64
    )
    assert layer.weight.shape == (5, 4) and layer.weight.dtype == torch.float64
    assert layer.weight.abs().max() <= 1 / math.sqrt(4)  # nn.Linear's bound
    assert not list(layer.buffers())
    x, _, label = _problem(n=6, c=5, d=4)
    out = layer(x, label)
    torch.testing.assert_close(out, lsoftmax(x, layer.weight, label, margin=3, beta=10.0), rtol=0, atol=0)
    out.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (5, 4)
    with pytest.raises(ValueError, match="target is required in training mode"):
        layer(x)
    layer.eval()
    plain = x @ layer.weight.detach().T
    torch.testing.assert_close(layer(x), plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer(x, label), plain, rtol=1e-12, atol=0)  # target ignored
    assert "margin=3" in repr(layer) and "ExponentialSchedule(beta0=10.0" in repr(layer)


def test_layer_step_beta_and_state_dict_round_trip() -> None:
    sched = lsm.ExponentialSchedule(beta0=100.0, scale=0.5, beta_min=1.0)
    layer = LSoftmaxLinear(3, 4, margin=4, schedule=sched)
    assert (layer.iteration, layer.beta, layer.schedule) == (0, 100.0, sched)
    x, _, label = _problem(n=5, c=4, d=3, dtype=torch.float32)
    for t in range(1, 4):
        layer.step()
        assert layer.iteration == t and layer.beta == sched(t)
        expect = lsoftmax(x, layer.weight, label, margin=4, beta=sched(t))
        torch.testing.assert_close(layer(x, label), expect, rtol=0, atol=0)
    state = layer.state_dict()
    fresh = LSoftmaxLinear(3, 4, margin=4)
    assert fresh.beta == 0.0
    fresh.load_state_dict(state)
    assert fresh.iteration == 3 and fresh.schedule == sched and fresh.beta == sched(3)
    assert torch.equal(fresh.weight, layer.weight)
    torch.testing.assert_close(fresh(x, label), layer(x, label), rtol=0, atol=0)
    with pytest.raises(ValueError, match="margin=4 but this layer has margin=2"):
        LSoftmaxLinear(3, 4, margin=2).load_state_dict(state)


def test_layer_step_between_forward_and_backward_keeps_the_forward_beta() -> None:
    layer = LSoftmaxLinear(
        3, 4, margin=2, schedule=lsm.ExponentialSchedule(5.0, 0.1, 0.0), dtype=torch.float64
    )
    x, _, label = _problem(n=5, c=4, d=3)
    out = layer(x, label)
    layer.step()  # changes beta from 5.0 to 0.5 in place
    (grad,) = torch.autograd.grad(out.sum(), layer.weight)
    _, _, want = _forward_and_grads(
        x, layer.weight, label, torch.ones(5, 4, dtype=torch.float64), margin=2, beta=5.0
    )
    torch.testing.assert_close(grad, want, rtol=0, atol=0)


def test_layer_argument_errors() -> None:
    with pytest.raises(TypeError, match=r"schedule=.* must have beta\(step\), __call__\(step\) and to_dict\(\)"):
        LSoftmaxLinear(3, 4, schedule=lambda t: 0.0)
    with pytest.raises(ValueError, match="out_features=0"):
        LSoftmaxLinear(3, 0)
    with pytest.raises(ValueError, match="margin=0"):
        LSoftmaxLinear(3, 4, margin=0)
    with pytest.raises(ValueError, match="iteration=-1"):
        LSoftmaxLinear(3, 4).iteration = -1


class _StepSchedule:
    """A user's own schedule (no lsoftmax_core base class): beta drops by ``drop`` every step."""

    def __init__(self, start: float, drop: float) -> None:
        self.start, self.drop = start, drop

    def beta(self, step: int) -> float:
        return max(self.start - self.drop * step, 0.0)

    def __call__(self, step: int) -> float:
        return self.beta(step)

    def to_dict(self) -> dict:
        return {"kind": "step", "start": self.start, "drop": self.drop}

    def __repr__(self) -> str:
        return f"_StepSchedule({self.start}, {self.drop})"


def test_layer_takes_a_users_own_schedule() -> None:
    sched = _StepSchedule(3.0, 1.0)
    assert isinstance(sched, lsm.Schedule)
    layer = LSoftmaxLinear(3, 4, margin=2, schedule=sched, dtype=torch.float64)
    x, _, label = _problem(n=5, c=4, d=3)
    for t in range(5):
        assert layer.iteration == t and layer.beta == sched(t)
        want = lsoftmax(x, layer.weight, label, margin=2, beta=sched(t))
        torch.testing.assert_close(layer(x, label), want, rtol=0, atol=0)
        layer.step()
    assert "_StepSchedule(3.0, 1.0)" in repr(layer)

    # A checkpoint of the same schedule: the layer keeps its own object (it cannot rebuild one).
    state = layer.state_dict()
    same = LSoftmaxLinear(3, 4, margin=2, schedule=_StepSchedule(3.0, 1.0), dtype=torch.float64)
    own = same.schedule
    same.load_state_dict(state)
    assert same.schedule is own and same.iteration == 5 and same.beta == 0.0
    torch.testing.assert_close(same(x, label), layer(x, label), rtol=0, atol=0)

    # A different schedule of the user's kind, or a built-in layer: a clear error, nothing changed.
    for other in (LSoftmaxLinear(3, 4, margin=2, schedule=_StepSchedule(9.0, 1.0)), LSoftmaxLinear(3, 4, margin=2)):
        before = (other.schedule, other.iteration, other.beta)
        with pytest.raises(ValueError, match=r"checkpoint has schedule \{'kind': 'step'.*cannot be rebuilt") as info:
            other.load_state_dict(state)
        assert "construct the layer with the schedule the checkpoint was saved with" in str(info.value)
        assert (other.schedule, other.iteration, other.beta) == before

    # A built-in checkpoint loads into a layer that has a user schedule: it is rebuilt.
    builtin = LSoftmaxLinear(3, 4, margin=2, schedule=lsm.ExponentialSchedule(8.0, 0.5, 0.0))
    builtin.step()
    layer.load_state_dict(builtin.state_dict())
    assert layer.schedule == lsm.ExponentialSchedule(8.0, 0.5, 0.0) and layer.iteration == 1 and layer.beta == 4.0


def test_layer_refuses_a_schedule_giving_a_bad_beta() -> None:
    class Rising(_StepSchedule):
        def beta(self, step: int) -> float:
            return self.start - self.drop * step  # goes negative

    layer = LSoftmaxLinear(3, 4, schedule=Rising(1.0, 1.0))
    layer.step()
    assert layer.beta == 0.0
    with pytest.raises(ValueError, match=r"gave an invalid beta at iteration 2: beta=-1.0 must be"):
        layer.step()
    assert layer.iteration == 1 and layer.beta == 0.0
    with pytest.raises(ValueError, match="beta=-1.0"):
        LSoftmaxLinear(3, 4, schedule=Rising(-1.0, 0.0))


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="needs torch >= 2.6")
def test_compiled_layer_follows_the_schedule_without_recompiling() -> None:
    torch.manual_seed(1)
    layer = LSoftmaxLinear(4, 3, margin=2, schedule=lsm.ExponentialSchedule(8.0, 0.5, 0.0))
    compiled = torch.compile(layer, fullgraph=True)
    x, _, label = _problem(n=6, c=3, d=4, dtype=torch.float32)
    for t in range(4):
        if t == 1:
            torch.compiler.set_stance("fail_on_recompile")
        try:
            got = compiled(x, label)
        finally:
            torch.compiler.set_stance("default")
        want = lsoftmax(x, layer.weight, label, margin=2, beta=8.0 * 0.5**t)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        layer.step()


# --------------------------------------------------------------------------- a real peer


def _pml_loss(num_classes, dim, margin):
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    return losses.LargeMarginSoftmaxLoss(num_classes=num_classes, embedding_size=dim, margin=margin, scale=1)


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 6])
def test_equal_to_pytorch_metric_learning_at_beta_zero(margin) -> None:
    """pytorch-metric-learning's LargeMarginSoftmaxLoss is the paper's loss without lambda.

    Where they differ: its W is (D, C), the transpose of our (C, D) weight; it has no beta
    (lambda) at all, so only beta = 0 is comparable; its ``scale`` multiplies every logit
    (1 here); it expands cos(m·theta) in powers of cos and sin (paper eq. 7) instead of a
    Chebyshev recurrence; and a zero-norm row gets cosine 0 from F.normalize rather than
    no angle (its logit is 0 either way, so those rows are left out).  With these mapped,
    the logits (captured at its cross-entropy), the mean loss and both gradients agree.
    """
    x, w, label = _problem(n=12, c=5, d=4, seed=10 + margin)
    peer = _pml_loss(5, 4, margin).double()
    with torch.no_grad():
        peer.W.copy_(w.T)
    captured = []
    peer.cross_entropy.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    xp = x.clone().requires_grad_()
    peer_loss = peer(xp, label)
    peer_gx, peer_gw = torch.autograd.grad(peer_loss, (xp, peer.W))

    xo, wo = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours_logits = lsoftmax(xo, wo, label, margin=margin, beta=0.0)
    ours_loss = F.cross_entropy(ours_logits, label)
    gx, gw = torch.autograd.grad(ours_loss, (xo, wo))

    tol = TOLERANCES["float64"]
    scale = logit_scale(x, w, margin)
    assert_close(ours_logits.detach(), captured[0].detach(), scale, tol.forward, "logits")
    # |d loss / d logit| <= 2/N summed over a row's logits: the loss moves by at most 2x a logit error.
    assert abs(ours_loss.item() - peer_loss.item()) <= 2 * tol.forward * float(scale.max())
    # d loss / d logits = (softmax - onehot) / N, bounded elementwise by (softmax + onehot) / N.
    bound = (torch.softmax(ours_logits.detach(), 1) + F.one_hot(label, 5)) / len(x)
    sx, sw = grad_scales(bound, x, w, margin)
    assert_close(gx, peer_gx, sx, tol.grad, "grad_x")
    assert_close(gw, peer_gw.T, sw, tol.grad, "grad_w")
    # And ours against the reference, so the agreement is not a shared mistake.
    check_forward(ours_logits.detach(), x, w, label, margin=margin, beta=0.0, dtype="float64")


# --------------------------------------------------------------------------- CUDA


def _cuda_cases():
    return [(dtype, m, beta) for dtype in DTYPES for m, beta in [(1, 0.0), (2, 0.0), (4, 3.0), (6, 100.0)]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,margin,beta", _cuda_cases())
def test_cuda_forward_and_autograd_match_reference(dtype, margin, beta) -> None:
    x, w, label = _problem(n=33, c=17, d=9, seed=margin)
    g = torch.randn(33, 17, dtype=torch.float64)
    out, gx, gw = _forward_and_grads(
        x.to("cuda", DTYPES[dtype]),
        w.to("cuda", DTYPES[dtype]),
        label.cuda(),
        g.to("cuda", DTYPES[dtype]),
        margin=margin,
        beta=beta,
    )
    assert out.is_cuda and gx.is_cuda and gw.is_cuda and out.dtype == DTYPES[dtype]
    xn, wn, gn = (t.to(DTYPES[dtype]).double().numpy() for t in (x, w, g))
    check_forward(out.cpu().numpy(), xn, wn, label.numpy(), margin=margin, beta=beta, dtype=dtype)
    check_backward(
        (gx.cpu().numpy(), gw.cpu().numpy()), gn, xn, wn, label.numpy(), margin=margin, beta=beta, dtype=dtype
    )


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backward_inside", [False, True])
def test_cuda_autocast_runs_in_the_inputs_dtype(autocast_dtype, backward_inside) -> None:
    _autocast_case("cuda", autocast_dtype, backward_inside)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_promotes_low_precision_features(autocast_dtype) -> None:
    _autocast_features_case("cuda", autocast_dtype)


@pytest.mark.gpu
def test_cuda_arguments_are_checked_once_per_call(monkeypatch) -> None:
    """On CUDA the core's forward/backward check once; the CPU path's functions are not used."""
    calls: list[str] = []
    for name in ("check_arguments", "add_margin", "add_margin_grad", "forward", "backward"):
        real = getattr(lsm, name)
        monkeypatch.setattr(lsm, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    x, w, label = _problem(dtype=torch.float32, device="cuda")
    x.requires_grad_()
    lsoftmax(x, w, label, margin=3, beta=0.5).sum().backward()
    assert calls == ["forward", "backward"]


@pytest.mark.gpu
def test_cuda_gradcheck_and_side_stream() -> None:
    x, w, label = _problem(n=6, c=4, d=3, device="cuda")
    x.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: lsoftmax(a, b, label, margin=3, beta=0.5), (x, w))
    want = lsoftmax(x, w, label, margin=3, beta=0.5).detach()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = lsoftmax(x, w, label, margin=3, beta=0.5).detach()
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_backend_sees_the_tensors_own_memory_and_outputs_belong_to_torch(monkeypatch) -> None:
    cupy = pytest.importorskip("cupy")
    seen: dict[str, int] = {}
    real_forward = lsm.forward

    def spy_forward(x, w, label, **kw):
        out = real_forward(x, w, label, **kw)
        seen.update(x=x.data.ptr, w=w.data.ptr, label=label.data.ptr, out=out.data.ptr)
        return out

    monkeypatch.setattr(lsm, "forward", spy_forward)
    x, w, label = _problem(n=64, c=32, d=16, dtype=torch.float32, device="cuda")
    pool_before = cupy.get_default_memory_pool().used_bytes()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = lsoftmax(x, w, label, margin=2, beta=0.0)
    torch.cuda.synchronize()
    assert (seen["x"], seen["w"], seen["label"], seen["out"]) == (
        x.data_ptr(),
        w.data_ptr(),
        label.data_ptr(),
        out.data_ptr(),
    )
    assert torch.cuda.memory_allocated() - before >= out.numel() * out.element_size()
    assert cupy.get_default_memory_pool().used_bytes() == pool_before
    del out
    assert torch.cuda.memory_allocated() == before


@pytest.mark.gpu
def test_cuda_device_mix_and_half_precision() -> None:
    x, w, label = _problem(n=4, c=3, d=2, dtype=torch.float32, device="cuda")
    with pytest.raises(ValueError, match=r"same device: x.device=cuda:0, weight.device=cpu"):
        lsoftmax(x, w.cpu(), label)
    for dtype, name in [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")]:
        try:
            out = lsoftmax(x.to(dtype), w.to(dtype), label, margin=2, beta=1.0)
        except TypeError as e:  # unsupported by the CuPy backend: must say which dtype
            assert name in str(e)
            continue
        assert out.dtype == dtype
        xn, wn = x.to(dtype).double().cpu().numpy(), w.to(dtype).double().cpu().numpy()
        check_forward(out.double().cpu().numpy(), xn, wn, label.cpu().numpy(), margin=2, beta=1.0, dtype=name)


def test_cpu_tensors_reach_the_core_as_read_only_views_of_their_memory() -> None:
    from lsoftmax_core.adapters.torch._bridge import _cpu_views

    x = torch.randn(4, 3, requires_grad=True)
    label = torch.tensor([0, 2, 1, 2])
    xa, la = _cpu_views(x=x, label=label)
    assert not xa.flags.writeable and not la.flags.writeable
    assert xa.ctypes.data == x.data_ptr() and la.ctypes.data == label.data_ptr()  # no copy
    with pytest.raises(ValueError, match="read-only"):
        xa[0, 0] = 1.0
    t = x.detach()[:, ::2]  # a strided view stays one
    (ta,) = _cpu_views(x=t)
    assert ta.strides == (12, 8) and np.array_equal(ta, t.numpy())
    with pytest.raises(TypeError, match=r"x\.dtype=torch\.bfloat16 cannot be passed to the CPU backend"):
        _cpu_views(x=x.detach().to(torch.bfloat16))
