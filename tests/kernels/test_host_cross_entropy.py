"""The CuPy fused cross-entropy (lsoftmax_core/_cupy_loss.py's ops under the loss engine, its launch
plan and its kernels) on the host emulator, with NumPy GEMMs for cuBLAS: against the
float64 reference of tests/support/loss_reference.py and the NumPy loss, in every chunking,
reduction and dtype; deterministic; bad labels skipped and recorded, ignore_index allowed."""

from __future__ import annotations

import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lsoftmax_core as lsm
from lsoftmax_core import _cupy_loss_plan as loss_plan
from lsoftmax_core import _cupy_plan as plan

from support.kernel_host import BFLOAT16, EmuBackend, build_emulator
from support.loss_reference import CHUNKINGS, IGNORE, assert_rel, problem, ref_grads, ref_loss
from support.strategies import problems
from support.tolerances import TOLERANCES, logit_scale


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("emu_ce"))


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("beta", [0.0, 1000.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_the_reference_in_float64(emu, margin, beta, reduction) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(margin * 100 + int(beta))
    x, w, label = problem(rng, 13, 9, 5, scale=3.0)
    label[:3] = label[3]  # duplicate labels
    grad_loss = rng.standard_normal(13) if reduction == "none" else np.float64(rng.standard_normal())
    expected = ref_loss(x, w, label, margin=margin, beta=beta, reduction=reduction)
    ex, ew = ref_grads(grad_loss, x, w, label, margin=margin, beta=beta, reduction=reduction)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=margin, beta=beta, reduction=reduction, chunking=chunking, chunk_size=size)
        loss = be.cross_entropy(x, w, label, **kw)
        assert loss.dtype == np.float64 and loss.shape == np.shape(expected)
        assert_rel(loss, expected, 1e-10, f"loss {chunking} {size}")
        gx, gw = be.cross_entropy_backward(grad_loss, x, w, label, **kw)
        assert_rel(gx, ex, 1e-10, f"grad_x {chunking} {size}")
        assert_rel(gw, ew, 1e-10, f"grad_w {chunking} {size}")
        if reduction != "none":
            loss1, gx1, gw1 = be.cross_entropy_with_grad(x, w, label, **kw)
            assert_rel(loss1, expected, 1e-10, "with_grad loss")
            assert_rel(gx1 * grad_loss, ex, 1e-10, "with_grad grad_x")
            assert_rel(gw1 * grad_loss, ew, 1e-10, "with_grad grad_w")
    assert be.err_rec[0] == 0


def test_agrees_with_the_numpy_loss_and_chunkings_with_each_other(emu) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(7)
    x, w, label = problem(rng, 23, 17, 6)
    want = lsm.cross_entropy_with_grad(x, w, label, margin=4, beta=1.0)
    for chunking, size in CHUNKINGS:
        got = be.cross_entropy_with_grad(x, w, label, margin=4, beta=1.0, chunking=chunking, chunk_size=size)
        for a, b in zip(got, want):
            assert_rel(a, b, 1e-12)


def test_return_lse_and_lse_argument(emu) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(3)
    x, w, label = problem(rng, 8, 5, 4, ignored=0.0)
    f = lsm.forward(x, w, label, margin=3, beta=2.0)
    lse = np.log(np.exp(f - f.max(1, keepdims=True)).sum(1)) + f.max(1)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=3, beta=2.0, reduction="none", chunking=chunking, chunk_size=size)
        loss, lse_out = be.cross_entropy(x, w, label, return_lse=True, **kw)
        np.testing.assert_allclose(loss, lse - f[np.arange(8), label], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(lse_out, lse, rtol=1e-13)
        g = np.linspace(-1, 1, 8)
        a = be.cross_entropy_backward(g, x, w, label, lse=lse_out, **kw)
        b = be.cross_entropy_backward(g, x, w, label, **kw)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize(("n", "c"), [(1, 1), (1, 6), (6, 1), (0, 3)])
def test_one_sample_one_class_and_an_empty_batch(emu, n, c) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(n * 10 + c)
    x, w, label = problem(rng, n, c, 3, ignored=0.0)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=3, beta=0.5, chunking=chunking, chunk_size=size)
        for reduction in ("mean", "sum", "none"):
            loss = be.cross_entropy(x, w, label, reduction=reduction, **kw)
            want = ref_loss(x, w, label, margin=3, beta=0.5, reduction=reduction)
            np.testing.assert_allclose(loss, want, atol=1e-12)
        gx, gw = be.cross_entropy_backward(np.float64(1.0), x, w, label, **kw)
        ex, ew = ref_grads(1.0, x, w, label, margin=3, beta=0.5)
        np.testing.assert_allclose(gx, ex, atol=1e-12)
        np.testing.assert_allclose(gw, ew, atol=1e-12)
    if c == 1 and n:
        assert float(be.cross_entropy(x, w, label, margin=1)) == 0.0


def test_ignored_rows_and_an_all_ignored_batch(emu) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(11)
    x, w, label = problem(rng, 6, 4, 3, ignored=0.0)
    label[[1, 4]] = IGNORE
    keep = label != IGNORE
    for chunking, size in CHUNKINGS:
        kw = dict(margin=2, beta=1.0, chunking=chunking, chunk_size=size)
        loss = be.cross_entropy(x, w, label, **kw)
        assert float(loss) == pytest.approx(float(lsm.cross_entropy(x[keep], w, label[keep], margin=2, beta=1.0)))
        # An ignored row has no target and no margin: its lse is the plain logits' one.
        _, lse = be.cross_entropy(x, w, label, return_lse=True, **kw)
        _, lse_numpy = lsm.cross_entropy(x, w, label, margin=2, beta=1.0, return_lse=True)
        plain = x[~keep] @ w.T
        np.testing.assert_allclose(lse[~keep], np.log(np.exp(plain).sum(1)), rtol=1e-13)
        np.testing.assert_allclose(lse, lse_numpy, rtol=1e-13)
        gx, gw = be.cross_entropy_backward(np.float64(1.0), x, w, label, **kw)
        assert np.all(gx[~keep] == 0.0)
        gxa, gwa = lsm.cross_entropy_backward(np.float64(1.0), x[keep], w, label[keep], margin=2, beta=1.0)
        np.testing.assert_allclose(gx[keep], gxa, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(gw, gwa, rtol=1e-12, atol=1e-15)
        # ignore_index may be a class index: those rows are ignored, not reported.
        np.testing.assert_allclose(
            be.cross_entropy(x, w, np.where(keep, label, 3), ignore_index=3, **kw),
            lsm.cross_entropy(x, w, np.where(keep & (label != 3), label, IGNORE), margin=2, beta=1.0),
        )
        every = np.full(6, IGNORE)
        assert float(be.cross_entropy(x, w, every, **kw)) == 0.0
        loss0, gx0, gw0 = be.cross_entropy_with_grad(x, w, every, **kw)
        assert float(loss0) == 0.0 and not gx0.any() and not gw0.any()
    assert be.err_rec[0] == 0
    # An ignore_index outside the label dtype's range matches nothing.
    lab8 = np.array([0, 1, 2, 3, 0, 1], dtype=np.uint8)
    np.testing.assert_allclose(
        be.cross_entropy(x, w, lab8, margin=2, beta=1.0), lsm.cross_entropy(x, w, lab8, margin=2, beta=1.0)
    )


DTYPES = [np.dtype(np.float32), np.dtype(np.float16)] + ([BFLOAT16] if BFLOAT16 is not None else [])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [("rows", 16), ("classes", 16), ("rows", 1000)])
def test_narrow_dtypes_within_the_tolerance_table(emu, dtype, chunk) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(2)
    x, w, label = problem(rng, 40, 30, 16)
    xd, wd = x.astype(dtype), w.astype(dtype)
    xf, wf = xd.astype(float), wd.astype(float)
    chunking, size = chunk
    kw = dict(margin=4, beta=1.0, chunking=chunking, chunk_size=size)
    per_row = be.cross_entropy(xd, wd, label, reduction="none", **kw)
    assert per_row.dtype == dtype
    expected = ref_loss(xf, wf, label, margin=4, beta=1.0, reduction="none")
    tol = TOLERANCES[dtype.name]
    scale = logit_scale(xf, wf, 4).max(axis=1)
    # A row's loss moves by at most its largest logit error (plus its own rounding).
    assert np.all(np.abs(per_row.astype(float) - expected) <= 2 * tol.forward * (scale + np.abs(expected)))
    gx, gw = be.cross_entropy_backward(np.float64(1.0), xd, wd, label, **kw)
    assert gx.dtype == gw.dtype == dtype
    ex, ew = ref_grads(1.0, xf, wf, label, margin=4, beta=1.0)
    rtol = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1e-1}[dtype.name]
    assert_rel(gx, ex, rtol, "grad_x")
    assert_rel(gw, ew, rtol, "grad_w")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [1e4, 1e8])
def test_huge_logits_give_finite_losses_and_gradients(emu, dtype, scale) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(5)
    x, w, label = problem(rng, 9, 6, 4, ignored=0.0)
    x, w = (x * scale).astype(dtype), w.astype(dtype)
    for chunking, size in CHUNKINGS:
        loss, gx, gw = be.cross_entropy_with_grad(x, w, label, margin=4, beta=0.0, chunking=chunking, chunk_size=size)
        assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gw).all()
    expected = ref_loss(x.astype(float), w.astype(float), label, margin=4, beta=0.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5 if dtype == "float32" else 1e-10)


def test_zero_rows_and_extreme_norms_stay_finite(emu) -> None:
    be = EmuBackend(emu)
    x = np.array([[0.0, 0.0], [1e-10, 0.0], [1e150, -1e150], [3.0, 4.0]])
    w = np.array([[1.5e150, 1e150], [0.0, 0.0], [1.0, 2.0]])
    label = np.array([0, 0, 2, 1])
    want = lsm.cross_entropy_with_grad(x, w, label, margin=3, beta=0.0, reduction="sum")
    for chunking, size in CHUNKINGS:
        got = be.cross_entropy_with_grad(x, w, label, margin=3, beta=0.0, reduction="sum", chunking=chunking,
                                         chunk_size=size)  # fmt: skip
        for a, b in zip(got, want):
            assert not np.isnan(a).any()
            np.testing.assert_array_equal(np.isinf(a), np.isinf(b))


@pytest.mark.parametrize("chunk", [("rows", 6), ("classes", 6)])
def test_deterministic_bit_for_bit_whatever_the_thread_order(emu, chunk) -> None:
    rng = np.random.default_rng(9)
    x, w, label = problem(rng, 40, 30, 8)
    label[:10] = 2
    x, w = x.astype(np.float32), w.astype(np.float32)
    chunking, size = chunk
    runs = [
        EmuBackend(emu, order).cross_entropy_with_grad(x, w, label, margin=3, chunking=chunking, chunk_size=size)
        for order in (0, 1, 2, 0)
    ]
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert np.array_equal(u, v)


@pytest.mark.parametrize("margin", [1, 3])
@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_bad_labels_are_skipped_and_recorded(emu, margin, chunking) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(1)
    x, w, label = problem(rng, 6, 4, 3, ignored=0.0)
    label[2], label[4], label[5] = 4, -7, IGNORE  # 4 and -7 bad, IGNORE allowed
    kw = dict(margin=margin, beta=0.0, chunking=chunking, chunk_size=2)
    loss = be.cross_entropy(x, w, label, reduction="none", **kw)
    assert np.isfinite(loss).all()
    assert be.err_rec[0] == be.serial and be.err_rec[1] == 4 and be.err_rec[2] == plan.OP_FORWARD
    key = int(be.err_key[0])
    assert (key >> 32, int(np.uint32(key & 0xFFFFFFFF).view(np.int32))) == (2, 4)
    # The good rows are exact.
    good = np.array([0, 1, 3])
    np.testing.assert_allclose(
        loss[good], ref_loss(x[good], w, label[good], margin=margin, beta=0.0, reduction="none"), rtol=1e-12
    )
    be.err_rec[:] = 0
    be.err_key[0] = plan.ERR_KEY_NONE
    gx, gw = be.cross_entropy_backward(np.float64(1.0), x, w, label, **kw)
    assert np.isfinite(gx).all() and np.isfinite(gw).all()
    assert be.err_rec[0] == be.serial and be.err_rec[2] == plan.OP_BACKWARD


def test_inputs_are_not_modified(emu) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(4)
    x, w, label = problem(rng, 7, 5, 3)
    copies = [a.copy() for a in (x, w, label)]
    for a in (x, w, label):
        a.flags.writeable = False
    be.cross_entropy_with_grad(x, w, label, margin=3, chunking="classes", chunk_size=2)
    be.cross_entropy_backward(np.ones(7), x, w, label, margin=3, reduction="none", chunking="rows", chunk_size=3)
    for a, b in zip((x, w, label), copies):
        assert np.array_equal(a, b)


def test_loss_plan_steps() -> None:
    from lsoftmax_core.checks import check_arrays

    x, w, label = np.ones((5, 3)), np.ones((4, 3)), np.zeros(5, dtype=np.int64)
    bufs = plan.DeviceBuffers.create(np, 0)
    for margin, kinds in ((1, ["lsm_check_labels"]), (2, ["lsm_loss_targets"])):
        p = check_arrays(x, w, label, margin, 0.0, dtypes=(np.dtype(np.float64),))
        call = loss_plan.bind_loss(p, np, bufs, x=x, w=w, label=label, serial=1, op=plan.OP_FORWARD)
        assert [s.name.split("<")[0] for s in call.targets().steps] == kinds
        lse = call.chunk_lse(np.zeros((5, 2)), 0, 2, first=False).steps[0]
        assert lse.grid == (5, 1) and lse.args[-6:] == (0, 2, 2, 4, int(margin > 1), 0)
        margin_steps = call.margin(lambda a, b: (np.zeros(a), np.zeros(b, np.uint32))).steps
        names = [s.name.split("<")[0] if isinstance(s, plan.Launch) else "zero" for s in margin_steps]
        assert names == ([] if margin == 1 else ["zero", "lsm_loss_margin_rows", "lsm_backward_classes"])


@settings(max_examples=30)
@given(problems(), st.sampled_from(["mean", "sum", "none"]), st.sampled_from(CHUNKINGS))
def test_property_equals_the_reference(emu, p, reduction, chunk) -> None:
    x, w, label, margin, beta = p
    chunking, size = chunk
    kw = dict(margin=margin, beta=beta, reduction=reduction, chunking=chunking, chunk_size=size)
    be = EmuBackend(emu)
    loss = be.cross_entropy(x, w, label, **kw)
    expected = ref_loss(x, w, label, margin=margin, beta=beta, reduction=reduction)
    scale = logit_scale(x, w, margin).max(initial=0.0) + 1.0
    assert np.all(np.abs(np.asarray(loss) - expected) <= 1e-11 * scale)
    np.testing.assert_allclose(loss, lsm.cross_entropy(x, w, label, **kw), rtol=1e-12, atol=1e-12 * scale)
    grads = be.cross_entropy_backward(np.ones(len(label)) if reduction == "none" else 1.0, x, w, label, **kw)
    want = lsm.cross_entropy_backward(np.ones(len(label)) if reduction == "none" else 1.0, x, w, label, **kw)
    # Scales that follow the maths (a relative error means nothing where the gradient
    # cancels to rounding level): |G_ij| <= 1 per row, |d logit / d x| <= (1 + m^2)|w_j|.
    k = 2.0 * (1 + margin**2)
    scale_x = k * float(np.linalg.norm(w, axis=1).max(initial=0.0)) + 1e-300
    scale_w = k * float(np.linalg.norm(x, axis=1).sum()) + 1e-300
    for a, b, sc in zip(grads, want, (scale_x, scale_w)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max(initial=0.0) <= 1e-10 * sc


def test_the_public_functions_run_the_loss_engine_of_the_arrays_backend(monkeypatch) -> None:
    import lsoftmax_core._cupy_loss as cupy_loss
    import lsoftmax_core._numpy_loss as numpy_loss
    from lsoftmax_core._loss_engine import LossEngine

    assert lsm._loss_engine_for(np.ones((2, 2)), np.ones((3, 2)), np.zeros(2, int)) is numpy_loss.engine()
    assert isinstance(cupy_loss.engine(), LossEngine)  # importable without CuPy; binds a device per call
    stub = types.SimpleNamespace(loss=object())
    monkeypatch.setattr(lsm, "_backend", lambda names, *arrays: stub)
    assert lsm._loss_engine_for(None, None, None) is stub.loss


def test_ignored_rows_and_a_given_lse_as_in_the_numpy_loss(emu) -> None:
    """Both chunkings use a given lse as the softmax's denominator, and an ignored row's
    upstream gradient (inf here) and lse take no part, as the NumPy loss does."""
    be = EmuBackend(emu)
    rng = np.random.default_rng(13)
    x, w, label = problem(rng, 9, 5, 4, ignored=0.0)
    label[[2, 6]] = IGNORE
    _, lse = be.cross_entropy(x, w, label, margin=3, reduction="none", return_lse=True)
    given = lse + np.linspace(0.0, 1.0, 9)
    g = np.linspace(0.5, 1.5, 9)
    g[2] = np.inf
    given[6] = np.nan
    want = lsm.cross_entropy_backward(g, x, w, label, margin=3, reduction="none", lse=given)
    for chunking, size in CHUNKINGS:
        got = be.cross_entropy_backward(g, x, w, label, margin=3, reduction="none", lse=given, chunking=chunking,
                                        chunk_size=size)  # fmt: skip
        for a, b in zip(got, want):
            assert np.isfinite(a).all()
            assert_rel(a, b, 1e-12, f"{chunking} {size}")
