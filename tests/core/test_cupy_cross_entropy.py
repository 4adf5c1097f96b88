"""The fused cross-entropy on CuPy arrays (lsoftmax_core/_cupy_loss.py) on a CUDA device;
every test is marked ``gpu`` and skipped without one.  Mirrors the emulator's tests
(tests/kernels/test_host_cross_entropy.py): the float64 reference in every chunking and
reduction, the NumPy loss, ignore_index, N or C = 1, narrow dtypes, determinism, bad labels
reported by the next call, and agreement with the emulator given the same (exact) GEMMs
(to 1e-14: CUDA's exp/log and the host's differ in the last bits)."""

from __future__ import annotations

import numpy as np
import pytest

import lsoftmax_core as lsm

from support.loss_reference import CHUNKINGS, IGNORE, assert_rel, problem, ref_grads, ref_loss
from support.tolerances import TOLERANCES, logit_scale

cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu


def _gpu(*arrays):
    return tuple(cupy.asarray(a) for a in arrays)


def _host(a):
    return cupy.asnumpy(a).astype(np.float64)


@pytest.mark.parametrize("margin", [1, 2, 4, 6])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_the_reference_in_float64(margin, reduction) -> None:
    rng = np.random.default_rng(margin)
    x, w, label = problem(rng, 13, 9, 5, scale=3.0)
    label[:3] = label[3]
    grad_loss = rng.standard_normal(13) if reduction == "none" else np.float64(rng.standard_normal())
    expected = ref_loss(x, w, label, margin=margin, beta=3.0, reduction=reduction)
    ex, ew = ref_grads(grad_loss, x, w, label, margin=margin, beta=3.0, reduction=reduction)
    xg, wg, lg = _gpu(x, w, label)
    gl = cupy.asarray(grad_loss)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=margin, beta=3.0, reduction=reduction, chunking=chunking, chunk_size=size)
        loss = lsm.cross_entropy(xg, wg, lg, **kw)
        assert isinstance(loss, cupy.ndarray) and loss.dtype == np.float64
        assert_rel(_host(loss), expected, 1e-10, f"loss {chunking} {size}")
        gx, gw = lsm.cross_entropy_backward(gl, xg, wg, lg, **kw)
        assert_rel(_host(gx), ex, 1e-10, "grad_x")
        assert_rel(_host(gw), ew, 1e-10, "grad_w")
        if reduction != "none":
            loss1, gx1, gw1 = lsm.cross_entropy_with_grad(xg, wg, lg, **kw)
            assert_rel(_host(loss1), expected, 1e-10, "with_grad loss")
            assert_rel(_host(gx1) * grad_loss, ex, 1e-10, "with_grad grad_x")
            assert_rel(_host(gw1) * grad_loss, ew, 1e-10, "with_grad grad_w")
    lsm.check_labels()


def test_agrees_with_the_numpy_loss_and_returns_lse() -> None:
    rng = np.random.default_rng(7)
    x, w, label = problem(rng, 23, 17, 6)
    want = lsm.cross_entropy_with_grad(x, w, label, margin=4, beta=1.0)
    _, lse_want = lsm.cross_entropy(x, w, label, margin=4, beta=1.0, return_lse=True)
    xg, wg, lg = _gpu(x, w, label)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=4, beta=1.0, chunking=chunking, chunk_size=size)
        got = lsm.cross_entropy_with_grad(xg, wg, lg, **kw)
        for a, b in zip(got, want):
            assert_rel(_host(a), b, 1e-12)
        loss, lse = lsm.cross_entropy(xg, wg, lg, return_lse=True, **kw)
        np.testing.assert_allclose(_host(lse), lse_want, rtol=1e-13)
        a = lsm.cross_entropy_backward(cupy.float64(1.0), xg, wg, lg, lse=lse, **kw)
        for u, v in zip(a, got[1:]):
            assert cupy.array_equal(u, v)


@pytest.mark.parametrize(("n", "c"), [(1, 1), (1, 6), (6, 1), (0, 3)])
def test_one_sample_one_class_and_an_empty_batch(n, c) -> None:
    rng = np.random.default_rng(n * 10 + c)
    x, w, label = problem(rng, n, c, 3, ignored=0.0)
    xg, wg, lg = _gpu(x, w, label)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=3, beta=0.5, chunking=chunking, chunk_size=size)
        for reduction in ("mean", "sum", "none"):
            loss = lsm.cross_entropy(xg, wg, lg, reduction=reduction, **kw)
            np.testing.assert_allclose(_host(loss), ref_loss(x, w, label, margin=3, beta=0.5, reduction=reduction),
                                       atol=1e-12)  # fmt: skip
        gx, gw = lsm.cross_entropy_backward(cupy.float64(1.0), xg, wg, lg, **kw)
        ex, ew = ref_grads(1.0, x, w, label, margin=3, beta=0.5)
        np.testing.assert_allclose(_host(gx), ex, atol=1e-12)
        np.testing.assert_allclose(_host(gw), ew, atol=1e-12)


def test_ignored_rows_and_an_all_ignored_batch() -> None:
    rng = np.random.default_rng(11)
    x, w, label = problem(rng, 6, 4, 3, ignored=0.0)
    label[[1, 4]] = IGNORE
    xg, wg = _gpu(x, w)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=2, beta=1.0, chunking=chunking, chunk_size=size)
        want = lsm.cross_entropy_with_grad(x, w, label, **kw)
        got = lsm.cross_entropy_with_grad(xg, wg, cupy.asarray(label), **kw)
        for a, b in zip(got, want):
            assert_rel(_host(a), b, 1e-12)
        every = cupy.full(6, IGNORE)
        loss0, gx0, gw0 = lsm.cross_entropy_with_grad(xg, wg, every, **kw)
        assert float(loss0) == 0.0 and not gx0.any() and not gw0.any()
        got3 = lsm.cross_entropy(xg, wg, cupy.asarray(np.where(label == IGNORE, 3, label)), ignore_index=3, **kw)
        want3 = lsm.cross_entropy(x, w, np.where((label == IGNORE) | (label == 3), IGNORE, label), **kw)
        assert_rel(_host(got3), want3, 1e-12)
    lsm.check_labels()


@pytest.mark.parametrize("dtype", [d for d in lsm.supported_dtypes("cupy") if d != np.float64], ids=str)
@pytest.mark.parametrize("chunk", [("rows", 16), ("classes", 16), ("rows", 1000)])
def test_narrow_dtypes_within_the_tolerance_table(dtype, chunk) -> None:
    rng = np.random.default_rng(2)
    x, w, label = problem(rng, 40, 30, 16)
    xd, wd = x.astype(dtype), w.astype(dtype)
    xf, wf = xd.astype(float), wd.astype(float)
    chunking, size = chunk
    kw = dict(margin=4, beta=1.0, chunking=chunking, chunk_size=size)
    xg, wg, lg = cupy.asarray(xd), cupy.asarray(wd), cupy.asarray(label)
    per_row = lsm.cross_entropy(xg, wg, lg, reduction="none", **kw)
    assert per_row.dtype == dtype
    expected = ref_loss(xf, wf, label, margin=4, beta=1.0, reduction="none")
    tol = TOLERANCES[np.dtype(dtype).name]
    scale = logit_scale(xf, wf, 4).max(axis=1)
    got = cupy.asnumpy(per_row).astype(np.float64)
    assert np.all(np.abs(got - expected) <= 2 * tol.forward * (scale + np.abs(expected)))
    gx, gw = lsm.cross_entropy_backward(cupy.float64(1.0), xg, wg, lg, **kw)
    ex, ew = ref_grads(1.0, xf, wf, label, margin=4, beta=1.0)
    # cuBLAS accumulates 16-bit GEMMs in float32 (the emulator's stand-in in float64).
    rtol = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1e-1}[np.dtype(dtype).name]
    assert_rel(cupy.asnumpy(gx).astype(np.float64), ex, rtol, "grad_x")
    assert_rel(cupy.asnumpy(gw).astype(np.float64), ew, rtol, "grad_w")


@pytest.mark.parametrize("chunk", [("rows", 6), ("classes", 6)])
def test_deterministic_bit_for_bit(chunk) -> None:
    rng = np.random.default_rng(9)
    x, w, label = problem(rng, 400, 300, 80)
    label[:100] = 2
    xg, wg, lg = _gpu(x.astype(np.float32), w.astype(np.float32), label)
    chunking, size = chunk
    runs = [lsm.cross_entropy_with_grad(xg, wg, lg, margin=3, chunking=chunking, chunk_size=size) for _ in range(3)]
    for other in runs[1:]:
        for u, v in zip(runs[0], other):
            assert cupy.array_equal(u, v)


@pytest.mark.parametrize("margin", [1, 3])
def test_bad_labels_are_reported_by_the_next_call(margin) -> None:
    rng = np.random.default_rng(1)
    x, w, label = problem(rng, 6, 4, 3, ignored=0.0)
    label[2], label[5] = 4, IGNORE
    xg, wg, lg = _gpu(x, w, label)
    loss = lsm.cross_entropy(xg, wg, lg, margin=margin, reduction="none")
    assert np.isfinite(_host(loss)).all()
    with pytest.raises(ValueError, match=r"label must lie in \[0, C\) = \[0, 4\): label\[2\]=4"):
        lsm.check_labels()
    lsm.check_labels()  # reported once
    lsm.cross_entropy_backward(cupy.float64(1.0), xg, wg, lg, margin=margin)
    with pytest.raises(ValueError, match=r"label\[2\]=4 \(found by the GPU in backward call"):
        lsm.cross_entropy(xg, wg, cupy.zeros(6, dtype=cupy.int64), margin=margin)
    lsm.check_labels()


def test_close_to_the_emulator_given_the_same_gemms(tmp_path) -> None:
    from support.kernel_host import EmuBackend, build_emulator, compiler

    if compiler() is None:
        pytest.skip("no C++ compiler")
    be = EmuBackend(build_emulator(tmp_path))
    rng = np.random.default_rng(12)
    x, w, label = problem(rng, 20, 11, 7)
    lg = cupy.asarray(label)
    # Exactly representable GEMMs: integer-valued inputs, so cuBLAS and NumPy agree bitwise.
    x, w = np.round(x * 4), np.round(w * 4)
    xg, wg = _gpu(x, w)
    for chunking, size in [("rows", 3), ("classes", 4)]:
        kw = dict(margin=3, beta=0.5, chunking=chunking, chunk_size=size, reduction="none")
        got = lsm.cross_entropy(xg, wg, lg, **kw)
        want = be.cross_entropy(x, w, label, **kw)
        np.testing.assert_allclose(cupy.asnumpy(got), want, rtol=1e-14)


@pytest.mark.parametrize("margin", [1, 3])
@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_class_shards_match_the_numpy_shards_on_the_gpu(margin, chunking) -> None:
    rng = np.random.default_rng(11)
    x, w, label = problem(rng, 17, 10, 6, scale=3.0)
    label[4], label[5] = 3, 4
    kw = dict(margin=margin, beta=2.0, chunking=chunking, chunk_size=3)
    gl = rng.standard_normal(17)
    stats = []
    for a, b in ((0, 4), (4, 7), (7, 10)):
        xg, wg, lg = _gpu(x, np.ascontiguousarray(w[a:b]), label)
        got = lsm.cross_entropy_shard_stats(xg, wg, lg, class_start=a, num_classes=10, **kw)
        want = lsm.cross_entropy_shard_stats(x, w[a:b], label, class_start=a, num_classes=10, **kw)
        for u, v in zip(got, want):
            assert_rel(_host(u), v, 1e-12)
        stats.append(want)
    lse = np.logaddexp.reduce([s[0] for s in stats], axis=0)
    for a, b in ((0, 4), (4, 7), (7, 10)):
        xg, wg, lg = _gpu(x, np.ascontiguousarray(w[a:b]), label)
        shard = dict(reduction="none", class_start=a, num_classes=10, **kw)
        got = lsm.cross_entropy_backward(cupy.asarray(gl), xg, wg, lg, lse=cupy.asarray(lse), **shard)
        want = lsm.cross_entropy_backward(gl, x, w[a:b], label, lse=lse, **shard)
        for u, v in zip(got, want):
            assert_rel(_host(u), v, 1e-12)
    lsm.check_labels()
