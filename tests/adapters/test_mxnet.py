"""The MXNet 1.9.1 adapter against the float64 reference, through MXNet's own executors.

Runs only where mxnet imports (the nox session ``mxnet``: mxnet==1.9.1, numpy<1.24).
CustomOps on CPU want MXNET_CPU_WORKER_NTHREADS >= 2 set before mxnet is imported (the
seed's requirement), hence the environment line before the import.
"""

from __future__ import annotations

import atexit
import gc
import math
import os
import subprocess
import sys

os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", "2")

import numpy as np
import pytest

mx = pytest.importorskip("mxnet")

from hypothesis import given  # noqa: E402 (mxnet must be importable first)
from hypothesis import strategies as st  # noqa: E402 (mxnet must be importable first)

import lsoftmax_core as lsm  # noqa: E402 (mxnet must be importable first)
from lsoftmax_core.adapters import mxnet as lmx  # noqa: E402 (mxnet must be importable first)

from support.strategies import problems  # noqa: E402 (mxnet must be importable first)
from support.tolerances import TOLERANCES, check_backward, check_forward  # noqa: E402 (mxnet must be importable first)

MXNetError = mx.base.MXNetError
DTYPES = ["float64", "float32"]


# ------------------------------------------------------------------ helpers

# Executors (and Modules, Gluon blocks) that ran the CustomOp, kept alive until the process
# exits: never freed while the engine runs (see ``_keep``).
_KEEP_ALIVE: list = []


def _keep(obj):
    """Keep ``obj`` alive for the rest of the test process, and return it.

    MXNet 1.9.1 has a use-after-free in its engine when an executor that ran a CustomOp is
    freed: on a loaded machine an engine worker sometimes runs an already freed block of the
    deleted executor's ``_backward_Custom`` operator and segfaults reading its variables,
    while the main thread is in a later ``simple_bind`` (seen in gdb on the core dumps).
    Draining the engine (``mx.nd.waitall()``) before every bind and before freeing each
    test's executors did not help: 1 crash in 40 runs with the test process pinned to one
    core beside two busy loops (2 in 20 without the drains).  Never freeing them avoids the
    deletion: 0 crashes in 48 such runs.  The suite keeps 176 objects (165 executors), and
    its peak RSS stayed at about 300 MB (301.5 MB when freed per test, 300.0 MB kept).
    """
    _KEEP_ALIVE.append(obj)
    return obj


@atexit.register
def _release_kept_at_exit():
    """Free the kept objects at exit on an idle engine, while Python's modules are intact
    (freed later in interpreter teardown, MXNet's CustomOp delete callbacks print
    "'NoneType' object has no attribute 'format_exc'").  Registered after the adapter's
    drain, so it runs before it (atexit is last-in first-out) and before MXNet's shutdown."""
    mx.nd.waitall()
    _KEEP_ALIVE.clear()
    gc.collect()
    mx.nd.waitall()


@pytest.fixture(autouse=True)
def _leave_engine_idle():
    """Each test leaves MXNet's engine idle."""
    yield
    mx.nd.waitall()


def _simple_bind(sym, **kwargs):
    """``sym.simple_bind(mx.cpu(), **kwargs)`` on an idle engine; the executor is never freed
    (see ``_keep``)."""
    mx.nd.waitall()
    return _keep(sym.simple_bind(mx.cpu(), **kwargs))


def _bind(n: int, d: int, c: int, dtype: str, label_grad: str = "null", **kwargs: object):
    """The seed's symbolic call, bound with simple_bind."""
    sym = mx.sym.Custom(
        data=mx.sym.var("data"),
        label=mx.sym.var("label"),
        weight=mx.sym.var("weight"),
        num_hidden=c,
        op_type="LSoftmax",
        name="lsoftmax",
        **kwargs,
    )
    return _simple_bind(
        sym,
        data=(n, d),
        label=(n,),
        weight=(c, d),
        type_dict={"data": dtype, "weight": dtype, "label": dtype},
        grad_req={"data": "write", "weight": "write", "label": label_grad},
    )


def _run(ex, x, w, label, grad, *, is_train: bool = True):
    """One forward (and backward when training); returns numpy copies, synchronised."""
    ex.forward(is_train=is_train, data=x, label=label, weight=w)
    out = ex.outputs[0].asnumpy()
    if not is_train:
        return out, None, None
    ex.backward([mx.nd.array(grad, dtype=grad.dtype)])
    return out, ex.grad_dict["data"].asnumpy(), ex.grad_dict["weight"].asnumpy()


def _problem(seed: int, n: int, d: int, c: int, dtype: str):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    w = rng.normal(size=(c, d)).astype(dtype)
    label = rng.integers(0, c, size=n)
    grad = rng.normal(size=(n, c)).astype(dtype)
    return x, w, label, grad


def _check(ex, x, w, label, grad, *, margin: int, beta: float, dtype: str) -> None:
    x0, w0 = x.copy(), w.copy()
    out, gx, gw = _run(ex, x, w, label.astype(dtype), grad)
    assert out.dtype == np.dtype(dtype) and gx.dtype == np.dtype(dtype)
    check_forward(out, x, w, label, margin=margin, beta=beta, dtype=dtype)
    check_backward((gx, gw), grad, x, w, label, margin=margin, beta=beta, dtype=dtype)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)


def _angle_problem(thetas, d: int, dtype: str, norm_x: float = 1.0, norm_w: float = 1.0, seed: int = 0):
    """Samples at given angles theta_i to w_{y_i} (needs d >= 2); labels cycle over classes."""
    rng = np.random.default_rng(seed)
    c = 3
    w = rng.normal(size=(c, d))
    w *= norm_w / np.linalg.norm(w, axis=1, keepdims=True)
    n = len(thetas)
    label = np.arange(n) % c
    what = w[label] / norm_w
    u = rng.normal(size=(n, d))
    u -= np.sum(u * what, axis=1, keepdims=True) * what
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    th = np.asarray(thetas, dtype=np.float64)[:, None]
    x = norm_x * (np.cos(th) * what + np.sin(th) * u)
    grad = rng.normal(size=(n, c))
    return x.astype(dtype), w.astype(dtype), label, grad.astype(dtype)


# ------------------------------------------------------------------ zero copy and conversion


@pytest.mark.parametrize("dtype", DTYPES + ["int32"])
def test_as_numpy_is_a_zero_copy_view(dtype):
    a = mx.nd.array(np.arange(12).reshape(3, 4), dtype=dtype)
    v = lmx.as_numpy(a)
    assert v.dtype == np.dtype(dtype) and v.shape == (3, 4)
    assert not v.flags.writeable and not v.flags.owndata
    a[:] = 7  # written by MXNet, seen through the view: the memory is shared
    a.wait_to_read()
    assert np.all(v == 7)
    del a  # the view keeps MXNet's buffer alive
    gc.collect()
    junk = [mx.nd.full((3, 4), 123, dtype=dtype) for _ in range(8)]
    mx.nd.waitall()
    assert np.all(v == 7) and len(junk) == 8


@pytest.mark.parametrize("dtype", DTYPES)
def test_output_view_is_writeable_and_shared(dtype):
    a = mx.nd.zeros((3, 4), dtype=dtype)
    pending = a + 1  # queued work on another array must not matter
    v = lmx.output_view(a)
    assert v.dtype == np.dtype(dtype) and v.shape == (3, 4) and v.flags.writeable
    v[:] = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(a.asnumpy(), np.arange(12).reshape(3, 4))
    assert v.ctypes.data == lmx.as_numpy(a).ctypes.data
    assert pending.asnumpy().sum() == 12
    with mx.util.np_shape(True):  # zero-size arrays exist only with NumPy shape semantics
        assert lmx.output_view(mx.nd.zeros((0, 4), dtype=dtype)).shape == (0, 4)


def test_results_are_computed_in_mxnets_buffers(monkeypatch):
    """With req 'write' the core works in the executor's own output and gradient buffers,
    and gets the arguments' checks as ``checked=``: validation runs once per call."""
    x, w, label, grad = _problem(7, 5, 4, 3, "float32")
    ex = _bind(5, 4, 3, "float32", margin=3, beta=0.5)
    seen = {}
    for name, n_out in (("add_margin", 1), ("add_margin_grad", 2)):
        real = getattr(lsm, name)

        def spy(*arrays, _real=real, _name=name, _n_out=n_out, checked=None, **kw):
            # (logits, x, w, label) or (grad_x, grad_w, grad_logits, x, w, label)
            grad_logits = arrays[2] if _n_out == 2 else None
            assert isinstance(checked, lsm.Problem), "the adapter's checks were not passed on"
            expected = (*arrays[-3:], grad_logits)  # Problem.inputs: x, w, label, grad_logits
            assert len(checked.inputs) == 4 and all(a is b for a, b in zip(checked.inputs, expected))
            seen[_name] = [a.ctypes.data for a in arrays[:_n_out]]
            return _real(*arrays, checked=checked, **kw)

        monkeypatch.setattr(lsm, name, spy)
    out, gx, gw = _run(ex, x, w, label.astype(np.float32), grad)
    assert seen["add_margin"] == [lmx.as_numpy(ex.outputs[0]).ctypes.data]
    assert seen["add_margin_grad"] == [
        lmx.as_numpy(ex.grad_dict["data"]).ctypes.data,
        lmx.as_numpy(ex.grad_dict["weight"]).ctypes.data,
    ]
    check_forward(out, x, w, label, margin=3, beta=0.5, dtype="float32")
    check_backward([gx, gw], grad, x, w, label, margin=3, beta=0.5, dtype="float32")


def test_gradient_accumulation_adds(monkeypatch):
    """grad_req 'add' takes the copy path: the core's gradients are added to the buffers."""
    x, w, label, grad = _problem(8, 5, 4, 3, "float64")
    sym = mx.sym.Custom(data=mx.sym.var("data"), label=mx.sym.var("label"), weight=mx.sym.var("weight"),
                        num_hidden=3, margin=2, beta=1.0, op_type="LSoftmax")
    ex = _simple_bind(sym, data=(5, 4), label=(5,), weight=(3, 4),
                         type_dict={"data": "float64", "weight": "float64", "label": "float64"},
                         grad_req={"data": "add", "weight": "add", "label": "null"})
    ex.grad_dict["data"][:] = 1.0
    ex.grad_dict["weight"][:] = 2.0
    _, gx, gw = _run(ex, x, w, label.astype(np.float64), grad)
    ex_gx, ex_gw = lsm.backward(grad, x, w, label, margin=2, beta=1.0)
    np.testing.assert_allclose(gx, ex_gx + 1.0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, ex_gw + 2.0, rtol=1e-12, atol=1e-12)


def test_dtypes_are_the_cores():
    """The adapter has no dtype list of its own: it takes the NumPy backend's."""
    assert not hasattr(lmx, "FLOAT_DTYPES")
    supported = lsm.supported_dtypes("numpy")
    assert {np.dtype(d) for d in DTYPES} == set(supported)
    for dtype in supported:
        assert lmx.LSoftmaxDense(3, dtype=dtype).weight.dtype == dtype
    for bad in ("float16", "int32", "not-a-dtype"):
        with pytest.raises(TypeError, match=rf"dtype={bad!r} is not supported \(float32, float64\)"):
            lmx.LSoftmaxDense(3, dtype=bad)


@pytest.mark.parametrize(
    ("req_data", "req_weight"), [("null", "write"), ("write", "null"), ("add", "write"), ("null", "add")]
)
def test_mixed_gradient_requests(req_data, req_weight):
    """Gradients MXNet does not want overwritten are computed in MXNet-owned scratch arrays
    and assigned; 'null' leaves the buffer alone."""
    x, w, label, grad = _problem(9, 5, 4, 3, "float64")
    sym = mx.sym.Custom(data=mx.sym.var("data"), label=mx.sym.var("label"), weight=mx.sym.var("weight"),
                        num_hidden=3, margin=3, beta=0.5, op_type="LSoftmax")
    reqs = {"data": req_data, "weight": req_weight}
    ex = _simple_bind(sym, data=(5, 4), label=(5,), weight=(3, 4),
                      type_dict={"data": "float64", "weight": "float64", "label": "float64"},
                      grad_req={**reqs, "label": "null"})
    before = {}
    for name, req in reqs.items():
        if req != "null":
            ex.grad_dict[name][:] = 1.5
            before[name] = 1.5 if req == "add" else 0.0
    ex.forward(is_train=True, data=x, label=label.astype(np.float64), weight=w)
    ex.backward([mx.nd.array(grad, dtype=grad.dtype)])
    expected = dict(zip(("data", "weight"), lsm.backward(grad, x, w, label, margin=3, beta=0.5)))
    for name, base in before.items():
        np.testing.assert_allclose(ex.grad_dict[name].asnumpy(), expected[name] + base, rtol=1e-12, atol=1e-12)


def test_as_numpy_rejects_non_ndarrays():
    with pytest.raises(TypeError, match="weight must be an mxnet NDArray"):
        lmx.as_numpy(np.zeros(3), "weight")


def test_label_indices_accepts_integral_floats():
    out = lmx.label_indices(np.array([0.0, 2.0, 1.0], dtype=np.float32), 3)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, [0, 2, 1])
    np.testing.assert_array_equal(lmx.label_indices(np.array([4, 0], dtype=np.int32), 5), [4, 0])


@pytest.mark.parametrize("bad", [0.5, -1.0, 3.0, 1e30, -1e30, math.nan, math.inf, -math.inf, 2.0000002])
@pytest.mark.parametrize("dtype", DTYPES)
def test_label_indices_rejects_bad_float_labels(bad, dtype):
    lab = np.array([0.0, 1.0, bad], dtype=dtype)
    if dtype == "float32" and float(lab[2]).is_integer() and 0 <= lab[2] < 3:
        pytest.skip("rounds to a valid label in float32")
    with pytest.raises(ValueError, match=r"label.*label\[2\]"):
        lmx.label_indices(lab, 3)


def test_label_indices_rejects_bad_int_labels_and_dtypes():
    with pytest.raises(ValueError, match=r"label\[1\]=5"):
        lmx.label_indices(np.array([0, 5]), 5)
    with pytest.raises(TypeError, match="label.dtype=bool"):
        lmx.label_indices(np.array([True, False]), 2)
    with pytest.raises(ValueError, match="label must be 1-D"):
        lmx.label_indices(np.zeros((2, 1)), 2)


# ------------------------------------------------------------------ keyword arguments


BAD_KWARGS = [
    ({"margin": "0"}, "margin"),
    ({"margin": "2.5"}, "margin"),
    ({"margin": "abc"}, "margin"),
    ({"margin": str(lsm.MAX_MARGIN + 1)}, "margin"),
    ({"beta": "-1"}, "beta"),
    ({"beta": "nan"}, "beta"),
    ({"beta": "inf"}, "beta"),
    ({"scale": "-0.5"}, "scale"),
    ({"beta_min": "inf"}, "beta_min"),
    ({"num_hidden": "0"}, "num_hidden"),
    ({"num_hidden": "ten"}, "num_hidden"),
    ({"start_step": "-3"}, "start_step"),
    ({"lambda_": "1"}, "lambda_"),
]


def test_kwargs_are_parsed_from_mxnet_strings():
    p = lmx.LSoftmaxParams.from_kwargs(
        num_hidden="10", margin="4", beta="100.0", scale="0.99", beta_min="1e-3"
    )
    assert (p.num_hidden, p.margin, p.beta, p.scale, p.beta_min) == (10, 4, 100.0, 0.99, 1e-3)
    assert lmx.LSoftmaxParams.from_kwargs(**p.to_kwargs()) == p
    assert lmx.LSoftmaxParams.from_kwargs(num_hidden=3) == lmx.LSoftmaxParams(
        num_hidden=3, margin=2, beta=0.0
    )


@pytest.mark.parametrize(("kwargs", "name"), BAD_KWARGS)
def test_bad_kwargs_name_the_argument(kwargs, name):
    full = {"num_hidden": "3", **kwargs}
    with pytest.raises((ValueError, TypeError), match=name):
        lmx.LSoftmaxParams.from_kwargs(**full)
    with pytest.raises((ValueError, TypeError), match=name):
        lmx.lsoftmax_symbol(mx.sym.var("data"), mx.sym.var("label"), **full)


def test_missing_num_hidden_and_python_typed_kwargs():
    with pytest.raises(TypeError, match="num_hidden"):
        lmx.LSoftmaxParams.from_kwargs(margin=2)
    with pytest.raises(TypeError, match="margin"):
        lmx.LSoftmaxParams.from_kwargs(num_hidden=3, margin=2.0)
    with pytest.raises(TypeError, match="beta"):
        lmx.LSoftmaxParams.from_kwargs(num_hidden=3, beta=True)


@pytest.mark.parametrize(("kwargs", "name"), BAD_KWARGS[:4] + BAD_KWARGS[-2:])
def test_seed_call_with_bad_kwargs_fails_cleanly(kwargs, name, capsys):
    """The plain Custom call: MXNet 1.9.1 only raises a generic MXNetError, and prints ours."""
    full = {"num_hidden": 3, **kwargs}
    with pytest.raises(MXNetError):
        mx.sym.Custom(data=mx.sym.var("data"), label=mx.sym.var("label"), op_type="LSoftmax", **full)
    printed = capsys.readouterr().out
    assert "Error in LSoftmax.list_arguments" in printed and name in printed
    # the process and the registry still work afterwards
    ok = mx.sym.Custom(data=mx.sym.var("data"), label=mx.sym.var("label"), num_hidden=3, op_type="LSoftmax")
    assert ok.list_arguments()[:2] == ["data", "label"] and len(ok.list_arguments()) == 3


def test_seed_symbol_arguments_and_shapes():
    sym = mx.sym.Custom(
        data=mx.sym.var("data"),
        label=mx.sym.var("label"),
        num_hidden=7,
        beta=100,
        margin=4,
        scale=0.99,
        beta_min=0,
        op_type="LSoftmax",
        name="fc4",
    )
    assert sym.list_arguments() == ["data", "label", "fc4_weight"]
    args, outs, _ = sym.infer_shape(data=(5, 2))
    assert args == [(5, 2), (5,), (7, 2)] and outs == [(5, 7)]


def test_unsupported_dtype_fails_at_bind(capsys):
    sym = mx.sym.Custom(data=mx.sym.var("data"), label=mx.sym.var("label"), num_hidden=3, op_type="LSoftmax")
    with pytest.raises(RuntimeError):  # simple_bind re-raises MXNetError as RuntimeError
        sym.simple_bind(mx.cpu(), data=(2, 4), type_dict={"data": "float16"})
    assert "float16" in capsys.readouterr().out


# ------------------------------------------------------------------ forward and gradients


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_forward_backward_match_reference(dtype, data):
    x, w, label, margin, beta = data.draw(problems(dtype=np.dtype(dtype)))
    grad = (
        np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        .normal(size=(len(x), len(w)))
        .astype(dtype)
    )
    ex = _bind(x.shape[0], x.shape[1], w.shape[0], dtype, margin=margin, beta=beta)
    _check(ex, x, w, label, grad, margin=margin, beta=beta, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [1, 2, 3, 4, 6])
@pytest.mark.parametrize(("norm_x", "norm_w"), [(1.0, 1.0), (1e-15, 1e15), (1e12, 1e-3)])
def test_nasty_angles_and_norms(dtype, margin, norm_x, norm_w):
    """|cos| = 1, cos = 0 and theta on every boundary k*pi/m, at extreme norm ratios."""
    thetas = [0.0, math.pi, math.pi / 2] + [k * math.pi / margin for k in range(1, margin)]
    x, w, label, grad = _angle_problem(thetas, 4, dtype, norm_x, norm_w)
    ex = _bind(len(x), 4, 3, dtype, margin=margin, beta=0.1)
    _check(ex, x, w, label, grad, margin=margin, beta=0.1, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_rows_one_sample_one_class(dtype):
    x, w, label, grad = _problem(3, 4, 3, 2, dtype)
    x[1] = 0.0
    w[label[2]] = 0.0
    ex = _bind(4, 3, 2, dtype, margin=3, beta=2.0)
    _check(ex, x, w, label, grad, margin=3, beta=2.0, dtype=dtype)
    x1, w1, label1, grad1 = _problem(4, 1, 5, 1, dtype)
    _check(_bind(1, 5, 1, dtype, margin=4, beta=0.0), x1, w1, label1, grad1, margin=4, beta=0.0, dtype=dtype)


def test_label_gradient_is_zero_when_requested():
    x, w, label, grad = _problem(5, 6, 3, 4, "float64")
    ex = _bind(6, 3, 4, "float64", label_grad="write", margin=2, beta=1.0)
    ex.grad_dict["label"][:] = 99.0
    _run(ex, x, w, label.astype(np.float64), grad)
    assert np.all(ex.grad_dict["label"].asnumpy() == 0.0)


def test_eval_gives_plain_logits_and_does_not_advance_beta():
    x, w, label, grad = _problem(6, 7, 4, 3, "float64")
    lab = label.astype(np.float64)
    ex = _bind(7, 4, 3, "float64", margin=3, beta=10.0, scale=0.5, beta_min=0.0)
    out_eval, _, _ = _run(ex, x, w, lab, grad, is_train=False)
    check_forward(out_eval, x, w, label, margin=1, beta=0.0, dtype="float64")
    out_train, _, _ = _run(ex, x, w, lab, grad)
    check_forward(out_train, x, w, label, margin=3, beta=10.0, dtype="float64")
    assert not np.allclose(out_train, out_eval)  # the margin is really applied in training
    _run(ex, x, w, lab, grad, is_train=False)  # evaluation between iterations counts nothing
    out_train, _, _ = _run(ex, x, w, lab, grad)
    check_forward(out_train, x, w, label, margin=3, beta=5.0, dtype="float64")


@pytest.mark.parametrize("start_step", [0, 3])
def test_beta_annealed_once_per_training_iteration(start_step):
    beta, scale, beta_min = 100.0, 0.5, 2.0
    x, w, label, grad = _problem(7, 5, 3, 4, "float64")
    ex = _bind(5, 3, 4, "float64", margin=2, beta=beta, scale=scale, beta_min=beta_min, start_step=start_step)
    sched = lsm.ExponentialSchedule(beta, scale, beta_min)
    for t in range(start_step, start_step + 8):
        beta_t = max(beta * scale**t, beta_min)
        assert sched(t) == beta_t
        out, gx, gw = _run(ex, x, w, label.astype(np.float64), grad)
        check_forward(out, x, w, label, margin=2, beta=beta_t, dtype="float64")
        check_backward((gx, gw), grad, x, w, label, margin=2, beta=beta_t, dtype="float64")
    tol = TOLERANCES["float64"].forward
    assert np.max(np.abs(out - lsm.forward(x, w, label, margin=2, beta=beta))) > 1e3 * tol


def test_bad_labels_in_a_graph_fail_cleanly(capsys):
    x, w, _, grad = _problem(8, 3, 4, 3, "float64")
    ex = _bind(3, 4, 3, "float64", margin=2)
    for bad in (0.5, math.nan, 3.0, -1.0):
        with pytest.raises(MXNetError):
            _run(ex, x, w, np.array([0.0, bad, 1.0]), grad)
        printed = capsys.readouterr().out
        assert "ValueError: label must hold integer class indices in [0, 3): label[1]" in printed
    out, _, _ = _run(ex, x, w, np.array([0.0, 2.0, 1.0]), grad)  # the executor still works
    check_forward(out, x, w, np.array([0, 2, 1]), margin=2, beta=0.0, dtype="float64")


# ------------------------------------------------------------------ Module training (the seed's setup)


def test_module_training_with_softmax_output_decreases_loss():
    rng = np.random.default_rng(0)
    mx.random.seed(0)
    n_cls, dim, n = 4, 8, 256
    centres = rng.normal(size=(n_cls, dim)) * 3.0
    y = rng.integers(0, n_cls, size=n)
    data = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    it = mx.io.NDArrayIter(
        data, y.astype(np.float32), batch_size=32, shuffle=False, label_name="softmax_label"
    )
    label = mx.sym.var("softmax_label")
    emb = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=2, name="embedding")
    fc = mx.sym.Custom(
        data=emb, label=label, num_hidden=n_cls, beta=10, margin=2, scale=0.9, beta_min=1, op_type="LSoftmax"
    )
    mod = _keep(mx.mod.Module(
        mx.sym.SoftmaxOutput(data=fc, label=label),
        context=mx.cpu(),
        data_names=("data",),
        label_names=("softmax_label",),
    ))
    mod.bind(data_shapes=it.provide_data, label_shapes=it.provide_label)
    mod.init_params(initializer=mx.init.Xavier())
    mod.init_optimizer(optimizer="sgd", optimizer_params={"learning_rate": 0.05, "momentum": 0.9})

    def eval_loss() -> float:
        it.reset()
        losses = []
        for batch in it:
            mod.forward(batch, is_train=False)
            p = mod.get_outputs()[0].asnumpy()
            lab = batch.label[0].asnumpy().astype(int)
            losses.append(-np.mean(np.log(p[np.arange(len(lab)), lab] + 1e-12)))
        return float(np.mean(losses))

    before = eval_loss()
    for _ in range(6):
        it.reset()
        for batch in it:
            mod.forward(batch, is_train=True)
            mod.backward()
            mod.update()
    after = eval_loss()
    assert np.isfinite(after) and after < 0.5 * before, (before, after)
    args, _ = mod.get_params()
    assert all(np.all(np.isfinite(v.asnumpy())) for v in args.values())


# ------------------------------------------------------------------ Gluon


def _gluon_step(block, x, label, grad):
    with mx.autograd.record():
        out = block(x, label)
    out.backward(grad)
    mx.nd.waitall()  # the step counter advances on MXNet's engine thread
    return out.asnumpy(), x.grad.asnumpy(), block.weight.grad().asnumpy()


@pytest.mark.parametrize("mode", ["imperative", "hybrid", "hybrid_static"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gluon_block_matches_core_and_anneals(mode, dtype):
    n, d, c = 6, 5, 4
    x_np, w_np, label, grad_np = _problem(11, n, d, c, dtype)
    block = _keep(lmx.LSoftmaxDense(c, in_units=0, margin=3, beta=50.0, scale=0.5, beta_min=1.0, dtype=dtype))
    block.initialize()
    if mode != "imperative":
        block.hybridize(static_alloc=mode == "hybrid_static", static_shape=mode == "hybrid_static")
    x = mx.nd.array(x_np, dtype=dtype)
    x.attach_grad()
    lab = mx.nd.array(label, dtype=dtype)
    grad = mx.nd.array(grad_np, dtype=dtype)
    block(x, lab)  # deferred init infers in_units = 5 through the operator's infer_shape
    block.weight.set_data(mx.nd.array(w_np, dtype=dtype))
    assert block.step == 0
    for t in range(4):
        beta_t = max(50.0 * 0.5**t, 1.0)
        assert block.beta == beta_t
        out, gx, gw = _gluon_step(block, x, lab, grad)
        check_forward(out, x_np, w_np, label, margin=3, beta=beta_t, dtype=dtype)
        check_backward((gx, gw), grad_np, x_np, w_np, label, margin=3, beta=beta_t, dtype=dtype)
        assert block.step == t + 1
    plain = block(x, lab).asnumpy()  # outside record(): evaluation, plain logits
    check_forward(plain, x_np, w_np, label, margin=1, beta=0.0, dtype=dtype)
    block.step = 0  # resume/reset
    out, _, _ = _gluon_step(block, x, lab, grad)
    check_forward(out, x_np, w_np, label, margin=3, beta=50.0, dtype=dtype)


def test_gluon_hybridised_equals_imperative():
    x_np, w_np, label, grad_np = _problem(12, 5, 3, 3, "float32")
    outs = []
    for hybrid in (False, True):
        block = _keep(lmx.LSoftmaxDense(3, in_units=3, margin=4, beta=2.0))
        block.initialize()
        block.weight.set_data(mx.nd.array(w_np))
        if hybrid:
            block.hybridize()
        x = mx.nd.array(x_np)
        x.attach_grad()
        outs.append(_gluon_step(block, x, mx.nd.array(label), mx.nd.array(grad_np)))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_gluon_trainer_reduces_loss():
    rng = np.random.default_rng(1)
    n_cls, dim, n = 3, 4, 96
    centres = rng.normal(size=(n_cls, dim)) * 2.0
    y = rng.integers(0, n_cls, size=n)
    x = mx.nd.array(centres[y] + rng.normal(size=(n, dim)))
    lab = mx.nd.array(y)
    block = _keep(lmx.LSoftmaxDense(n_cls, margin=2, beta=5.0, scale=0.9, beta_min=0.5))
    block.initialize(mx.init.Xavier())
    block.hybridize()
    loss_fn = mx.gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = mx.gluon.Trainer(block.collect_params(), "sgd", {"learning_rate": 0.1})
    before = float(loss_fn(block(x, lab), lab).mean().asscalar())
    for _ in range(30):
        with mx.autograd.record():
            loss = loss_fn(block(x, lab), lab)
        loss.backward()
        trainer.step(n)
    after = float(loss_fn(block(x, lab), lab).mean().asscalar())
    assert after < 0.5 * before, (before, after)
    assert block.step == 30  # the property waits for backward passes still queued


def test_gluon_bad_labels_and_arguments(capsys):
    block = _keep(lmx.LSoftmaxDense(3, in_units=2))
    block.initialize()
    x = mx.nd.ones((2, 2))
    for bad in (0.5, math.nan, 3.0, -1.0):
        with pytest.raises(
            ValueError, match=r"label must hold integer class indices in \[0, 3\): label\[1\]"
        ):
            block(x, mx.nd.array([0.0, bad]))
    block.hybridize()
    with pytest.raises(MXNetError):
        block(x, mx.nd.array([0.0, 7.0])).wait_to_read()
    assert "label[1]=7.0" in capsys.readouterr().out
    np.testing.assert_array_equal(block(x, mx.nd.array([0.0, 2.0])).shape, (2, 3))
    for kwargs, name in [
        ({"margin": 0}, "margin"),
        ({"beta": -1.0}, "beta"),
        ({"scale": math.nan}, "scale"),
        ({"beta_min": -2}, "beta_min"),
        ({"in_units": -1}, "in_units"),
        ({"margin": 2.5}, "margin"),
    ]:
        with pytest.raises((ValueError, TypeError), match=name):
            lmx.LSoftmaxDense(3, **kwargs)
    with pytest.raises(ValueError, match="units"):
        lmx.LSoftmaxDense(0)
    with pytest.raises(TypeError, match="float16"):
        lmx.LSoftmaxDense(3, dtype="float16")


def test_pending_custom_op_work_is_drained_at_exit():
    """MXNet 1.9.1 can abort or hang at exit while CustomOp work is queued (apache/mxnet#15310;
    a small script here failed about 1 run in 3); the adapter registers mx.nd.waitall with
    atexit.  atexit runs last-in first-out, so ``report`` (registered after mxnet, before the
    adapter) runs after the drain and before MXNet's shutdown, and must see every backward
    pass counted, without waiting itself."""
    code = (
        "import atexit, mxnet as mx\n"
        "atexit.register(lambda: print('steps at exit', lmx.layer._SHARED_STEPS.get(b._lsm.step_key)))\n"
        "import lsoftmax_core.adapters.mxnet as lmx\n"
        "b = lmx.LSoftmaxDense(1000, margin=4, beta=100.0)\n"
        "b.initialize()\n"
        "x, y = mx.nd.random.normal(shape=(2048, 256)), mx.nd.array(range(2048)) % 1000\n"
        "for _ in range(4):\n"
        "    with mx.autograd.record():\n"
        "        out = b(x, y)\n"
        "    out.backward()\n"  # queued: nothing here waits for the engine
        "print('steps queued', lmx.layer._SHARED_STEPS.get(b._lsm.step_key))\n"
    )
    env = {**os.environ, "MXNET_CPU_WORKER_NTHREADS": "2"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung at exit")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "steps queued 4" not in done.stdout  # the work really was pending at the end
    assert "steps at exit 4" in done.stdout, done.stdout
