"""The fused cross-entropy: equal to log-softmax cross-entropy over forward's logits, in
every chunking, without NaN, deterministic, with torch's ignore_index semantics."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lsoftmax_core as lsm

from support.loss_reference import CHUNKINGS, IGNORE, assert_rel, problem, ref_grads, ref_loss
from support.strategies import problems
from support.tolerances import TOLERANCES, logit_scale


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("beta", [0.0, 3.0, 1000.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_equals_the_unfused_loss_and_gradients_in_float64(margin, beta, reduction) -> None:
    rng = np.random.default_rng(margin * 100 + int(beta))
    x, w, label = problem(rng, 13, 9, 5, scale=3.0)
    label[:3] = label[3]  # duplicate labels
    grad_loss = rng.standard_normal(13) if reduction == "none" else np.float64(rng.standard_normal())
    expected = ref_loss(x, w, label, margin=margin, beta=beta, reduction=reduction)
    ex, ew = ref_grads(grad_loss, x, w, label, margin=margin, beta=beta, reduction=reduction)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=margin, beta=beta, reduction=reduction, chunking=chunking, chunk_size=size)
        assert_rel(lsm.cross_entropy(x, w, label, **kw), expected, 1e-10, f"loss {chunking} {size}")
        gx, gw = lsm.cross_entropy_backward(grad_loss, x, w, label, **kw)
        assert_rel(gx, ex, 1e-10, f"grad_x {chunking} {size}")
        assert_rel(gw, ew, 1e-10, f"grad_w {chunking} {size}")
        if reduction != "none":
            loss, gx1, gw1 = lsm.cross_entropy_with_grad(x, w, label, **kw)
            assert_rel(loss, expected, 1e-10, "with_grad loss")
            assert_rel(gx1 * grad_loss, ex, 1e-10, "with_grad grad_x")
            assert_rel(gw1 * grad_loss, ew, 1e-10, "with_grad grad_w")


def test_chunk_sizes_agree_to_1e12_in_float64() -> None:
    rng = np.random.default_rng(7)
    x, w, label = problem(rng, 23, 17, 6)
    results = [
        lsm.cross_entropy_with_grad(x, w, label, margin=4, beta=1.0, chunking=ch, chunk_size=size)
        for ch, size in CHUNKINGS
    ]
    for loss, gx, gw in results[1:]:
        assert_rel(loss, results[0][0], 1e-12)
        assert_rel(gx, results[0][1], 1e-12)
        assert_rel(gw, results[0][2], 1e-12)


def test_matches_forward_plus_log_softmax_of_the_same_backend() -> None:
    rng = np.random.default_rng(3)
    x, w, label = problem(rng, 8, 5, 4, ignored=0.0)
    f = lsm.forward(x, w, label, margin=3, beta=2.0)
    lse = np.log(np.exp(f - f.max(1, keepdims=True)).sum(1)) + f.max(1)
    per_row = lse - f[np.arange(8), label]
    got = lsm.cross_entropy(x, w, label, margin=3, beta=2.0, reduction="none")
    np.testing.assert_allclose(got, per_row, rtol=1e-13, atol=1e-13)
    loss, lse_out = lsm.cross_entropy(x, w, label, margin=3, beta=2.0, reduction="none", return_lse=True)
    np.testing.assert_allclose(lse_out, lse, rtol=1e-13)


@pytest.mark.parametrize(("n", "c"), [(1, 1), (1, 6), (6, 1), (0, 3)])
def test_one_sample_one_class_and_an_empty_batch(n, c) -> None:
    rng = np.random.default_rng(n * 10 + c)
    x, w, label = problem(rng, n, c, 3, ignored=0.0)
    for reduction in ("mean", "sum", "none"):
        loss = lsm.cross_entropy(x, w, label, margin=3, beta=0.5, reduction=reduction)
        np.testing.assert_allclose(loss, ref_loss(x, w, label, margin=3, beta=0.5, reduction=reduction), atol=1e-12)
    gx, gw = lsm.cross_entropy_backward(np.float64(1.0), x, w, label, margin=3, beta=0.5)
    ex, ew = ref_grads(1.0, x, w, label, margin=3, beta=0.5)
    np.testing.assert_allclose(gx, ex, atol=1e-12)
    np.testing.assert_allclose(gw, ew, atol=1e-12)
    if c == 1 and n:
        assert float(lsm.cross_entropy(x, w, label, margin=1)) == 0.0  # one class: probability 1


def test_angles_on_the_branch_points_of_psi() -> None:
    m = 4
    thetas = [0.0, math.pi, math.pi / 2] + [k * math.pi / m for k in range(1, m)]
    x = np.array([[math.cos(t), math.sin(t)] for t in thetas]) * 2.0
    w = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    label = np.zeros(len(thetas), dtype=np.int64)
    expected = ref_loss(x, w, label, margin=m, beta=0.0, reduction="sum")
    ex, ew = ref_grads(1.0, x, w, label, margin=m, beta=0.0, reduction="sum")
    for chunking, size in CHUNKINGS:
        kw = dict(margin=m, beta=0.0, reduction="sum", chunking=chunking, chunk_size=size)
        assert_rel(lsm.cross_entropy(x, w, label, **kw), expected, 1e-10)
        gx, gw = lsm.cross_entropy_backward(np.float64(1.0), x, w, label, **kw)
        assert_rel(gx, ex, 1e-9)
        assert_rel(gw, ew, 1e-9)


def test_ignored_rows_get_no_margin_and_no_gradient_and_mean_counts_the_others() -> None:
    rng = np.random.default_rng(11)
    x, w, label = problem(rng, 6, 4, 3, ignored=0.0)
    label[[1, 4]] = IGNORE
    keep = label != IGNORE
    loss = lsm.cross_entropy(x, w, label, margin=2, beta=1.0)
    alone = lsm.cross_entropy(x[keep], w, label[keep], margin=2, beta=1.0)
    assert float(loss) == pytest.approx(float(alone), rel=1e-14)
    gx, gw = lsm.cross_entropy_backward(np.float64(1.0), x, w, label, margin=2, beta=1.0)
    assert np.all(gx[~keep] == 0.0)
    gx_alone, gw_alone = lsm.cross_entropy_backward(np.float64(1.0), x[keep], w, label[keep], margin=2, beta=1.0)
    np.testing.assert_allclose(gx[keep], gx_alone, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(gw, gw_alone, rtol=1e-13, atol=1e-15)
    # A class index may be the ignore_index, as in torch: those rows are ignored.
    np.testing.assert_allclose(
        lsm.cross_entropy(x, w, np.where(keep, label, 3), margin=2, beta=1.0, ignore_index=3),
        lsm.cross_entropy(x, w, np.where(keep & (label != 3), label, IGNORE), margin=2, beta=1.0),
    )


def test_an_all_ignored_batch_gives_zero_not_nan() -> None:
    x, w = np.ones((3, 2)), np.ones((4, 2))
    label = np.full(3, IGNORE)
    assert float(lsm.cross_entropy(x, w, label)) == 0.0
    loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label)
    assert float(loss) == 0.0 and not gx.any() and not gw.any()
    assert not lsm.cross_entropy(x, w, label, reduction="none").any()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [1e4, 1e8])
def test_huge_logits_give_finite_losses_and_gradients(dtype, scale) -> None:
    rng = np.random.default_rng(5)
    x, w, label = problem(rng, 9, 6, 4, ignored=0.0)
    x, w = (x * scale).astype(dtype), w.astype(dtype)  # logits of about +-scale
    for chunking, size in CHUNKINGS:
        kw = dict(margin=4, beta=0.0, chunking=chunking, chunk_size=size)
        loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label, **kw)
        assert np.isfinite(loss) and np.isfinite(gx).all() and np.isfinite(gw).all()
    expected = ref_loss(x.astype(float), w.astype(float), label, margin=4, beta=0.0)
    assert float(loss) == pytest.approx(expected, rel=1e-5 if dtype == "float32" else 1e-10)


def test_zero_rows_and_extreme_norms_stay_finite() -> None:
    x = np.array([[0.0, 0.0], [1e-10, 0.0], [1e150, -1e150], [3.0, 4.0]])
    w = np.array([[1.5e150, 1e150], [0.0, 0.0], [1.0, 2.0]])
    label = np.array([0, 0, 2, 1])
    for chunking, size in CHUNKINGS:
        loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label, margin=3, beta=0.0, reduction="sum",
                                                   chunking=chunking, chunk_size=size)
        assert not np.isnan(loss) and not np.isnan(gx).any() and not np.isnan(gw).any()


@pytest.mark.parametrize("dtype", ["float32"])
def test_float32_within_the_tolerance_table(dtype) -> None:
    rng = np.random.default_rng(2)
    x, w, label = problem(rng, 64, 50, 16)
    x32, w32 = x.astype(dtype), w.astype(dtype)
    tol = TOLERANCES[dtype]
    for chunking, size in [("rows", 16), ("classes", 16)]:
        per_row = lsm.cross_entropy(x32, w32, label, margin=4, beta=1.0, reduction="none",
                                    chunking=chunking, chunk_size=size)
        assert per_row.dtype == np.float32
        expected = ref_loss(x32.astype(float), w32.astype(float), label, margin=4, beta=1.0, reduction="none")
        # A row's loss moves by at most its largest logit error: the forward tolerance.
        scale = logit_scale(x32, w32, 4).max(axis=1)
        assert np.all(np.abs(per_row - expected) <= 2 * tol.forward * scale)


def test_deterministic_bit_for_bit() -> None:
    rng = np.random.default_rng(9)
    x, w, label = problem(rng, 40, 30, 8)
    label[:10] = 2
    x, w = x.astype(np.float32), w.astype(np.float32)
    for chunking, size in [("rows", 6), ("classes", 6)]:
        a = lsm.cross_entropy_with_grad(x, w, label, margin=3, chunking=chunking, chunk_size=size)
        b = lsm.cross_entropy_with_grad(x, w, label, margin=3, chunking=chunking, chunk_size=size)
        for u, v in zip(a, b):
            assert np.array_equal(u, v)


@given(problems(), st.sampled_from(["mean", "sum", "none"]), st.sampled_from(CHUNKINGS))
def test_property_equals_the_reference(p, reduction, chunk) -> None:
    x, w, label, margin, beta = p
    chunking, size = chunk
    loss = lsm.cross_entropy(x, w, label, margin=margin, beta=beta, reduction=reduction,
                             chunking=chunking, chunk_size=size)
    expected = ref_loss(x, w, label, margin=margin, beta=beta, reduction=reduction)
    scale = logit_scale(x, w, margin).max(initial=0.0) + 1.0
    assert np.all(np.abs(np.asarray(loss) - expected) <= 1e-11 * scale)
    assert not np.isnan(np.asarray(loss)).any()


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(4)
    x, w, label = problem(rng, 7, 5, 3)
    copies = [a.copy() for a in (x, w, label)]
    for a in (x, w, label):
        a.flags.writeable = False
    lsm.cross_entropy_with_grad(x, w, label, margin=3, chunking="classes", chunk_size=2)
    lsm.cross_entropy_backward(np.ones(7), x, w, label, margin=3, reduction="none", chunking="rows", chunk_size=3)
    for a, b in zip((x, w, label), copies):
        assert np.array_equal(a, b)


def test_the_default_plan_follows_the_memory_budget() -> None:
    budget = lsm.DEFAULT_MEMORY_BUDGET
    assert lsm.plan_chunks(2048, 100_000, 4) == lsm.ChunkPlan("rows", 82)  # 83 rows fit: 25 even chunks
    assert lsm.plan_chunks(2048, 10_000, 4) == lsm.ChunkPlan("rows", 683)  # 838 fit: 3 chunks
    assert lsm.plan_chunks(2048, 100_000, 8).mode == "classes"  # float64: 41 rows would fit
    assert lsm.plan_chunks(2048, 100_000, 8, memory_budget=2 * budget).mode == "rows"
    assert lsm.plan_chunks(2048, 1_000_000, 4) == lsm.ChunkPlan("classes", 4082)  # 245 chunks of <= 4096
    assert lsm.plan_chunks(8, 1_000_000, 4).mode == "rows"  # every row fits: one chunk
    assert lsm.plan_chunks(9, 1_000_000, 4).mode == "classes"
    assert lsm.plan_chunks(10, 5, 8, chunking="classes", chunk_size=2) == lsm.ChunkPlan("classes", 2)
    assert lsm.plan_chunks(10, 5, 8, chunking="rows") == lsm.ChunkPlan("rows", 10)
    assert lsm.plan_chunks(0, 5, 8) == lsm.ChunkPlan("rows", 1)


@given(st.integers(0, 10**5), st.integers(1, 10**7), st.sampled_from([2, 4, 8]), st.integers(1, 2**32),
       st.sampled_from([None, "rows", "classes"]))  # fmt: skip
def test_property_a_default_chunk_never_exceeds_the_budget(n, c, itemsize, budget, chunking) -> None:
    plan = lsm.plan_chunks(n, c, itemsize, memory_budget=budget, chunking=chunking)
    other = c if plan.mode == "rows" else n
    length = n if plan.mode == "rows" else c
    assert 1 <= plan.size <= max(1, length)
    if max(1, other) * itemsize <= budget:  # at least one row (class) fits
        assert plan.size * other * itemsize <= budget
    chunks = -(-max(length, 1) // plan.size)
    assert chunks * plan.size - max(length, 1) < chunks  # even chunks: no short last one


def test_the_budget_comes_from_the_environment_when_not_given(monkeypatch) -> None:
    monkeypatch.setenv("LSOFTMAX_CE_BUDGET", str(2**28))
    assert lsm.plan_chunks(2048, 100_000, 4) == lsm.ChunkPlan("rows", 512)  # 256 MiB: 671 rows fit
    assert lsm.plan_chunks(2048, 1_000_000, 4, memory_budget=2**25).mode == "classes"  # the argument wins
    monkeypatch.setenv("LSOFTMAX_CE_BUDGET", " 1048576\n")
    assert lsm.plan_chunks(2048, 1000, 4) == lsm.ChunkPlan("rows", 256)  # 262 rows fit: 8 chunks
    monkeypatch.setenv("LSOFTMAX_CE_BUDGET", "")
    assert lsm.plan_chunks(2048, 100_000, 4) == lsm.plan_chunks(2048, 100_000, 4, memory_budget=lsm.DEFAULT_MEMORY_BUDGET)


@pytest.mark.parametrize("value", ["64MB", "\u00b2", "\u0661\u0662", "0", "-5", "1e6", "0x100"])
def test_a_malformed_budget_variable_is_named_with_its_value(monkeypatch, value) -> None:
    """Only ASCII digits: "²" and "١٢" pass str.isdigit() but are not a number of bytes."""
    monkeypatch.setenv("LSOFTMAX_CE_BUDGET", value)
    message = re.escape(f"LSOFTMAX_CE_BUDGET={value!r} must be a whole number of bytes")
    with pytest.raises(ValueError, match=message):
        lsm.plan_chunks(10, 5, 8)
    x, w = np.ones((3, 2)), np.ones((4, 2))
    with pytest.raises(ValueError, match="LSOFTMAX_CE_BUDGET"):
        lsm.cross_entropy(x, w, np.array([0, 1, 2]))
    lsm.cross_entropy(x, w, np.array([0, 1, 2]), memory_budget=2**20)  # an explicit budget needs no variable


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (dict(reduction="avg"), ValueError, r"reduction='avg' must be one of \('mean', 'sum', 'none'\)"),
        (dict(ignore_index=1.5), TypeError, r"ignore_index=1.5 must be an integer"),
        (dict(chunk_size=0), ValueError, r"chunk_size=0 must be an integer"),
        (dict(chunking="tiles"), ValueError, r"chunking='tiles' must be one of \('rows', 'classes'\)"),
        (dict(memory_budget=-1), ValueError, r"memory_budget=-1 must be an integer"),
        (dict(margin=0), ValueError, r"margin=0 must be an integer"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, error, pattern) -> None:
    x, w, label = np.ones((3, 2)), np.ones((4, 2)), np.array([0, 1, 3])
    with pytest.raises(error, match=pattern):
        lsm.cross_entropy(x, w, label, **kwargs)


def test_bad_labels_and_gradients_name_themselves() -> None:
    x, w = np.ones((3, 2)), np.ones((4, 2))
    with pytest.raises(ValueError, match=r"label must lie in \[0, C\) = \[0, 4\) or equal ignore_index=-100: label\[1\]=4"):
        lsm.cross_entropy(x, w, np.array([0, 4, IGNORE]))
    with pytest.raises(ValueError, match=r"label must lie .*: label\[0\]=-1"):
        lsm.cross_entropy_backward(np.float64(1.0), x, w, np.array([-1, 0, 0]))
    with pytest.raises(ValueError, match=r"grad_loss must have the loss's shape \(3,\) \(reduction='none'\), got \(\)"):
        lsm.cross_entropy_backward(np.float64(1.0), x, w, np.array([0, 1, 2]), reduction="none")
    with pytest.raises(ValueError, match=r"reduction='none' has a per-row upstream gradient"):
        lsm.cross_entropy_with_grad(x, w, np.array([0, 1, 2]), reduction="none")


@pytest.mark.parametrize("blas", [True, False])
@pytest.mark.parametrize("block_bytes", [1, 40, 1 << 20])
def test_row_chunks_accumulate_in_blocks_of_any_size(monkeypatch, blas, block_bytes) -> None:
    """Row chunks add into grad_w (and, by class blocks, grad_x) through the BLAS or through a
    temporary block: blocks of one class or row, odd sizes and one block all give the result."""
    from lsoftmax_core import _cblas, _numpy_loss

    if not blas:
        monkeypatch.setattr(_cblas, "_GEMM", {})
        monkeypatch.setattr(_cblas, "_LOADED", [True])
    monkeypatch.setattr(_numpy_loss, "_ACC_BYTES", block_bytes)  # 1 byte: one row per block
    monkeypatch.setattr(_numpy_loss, "_CLASS_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(_numpy_loss, "_SOFTMAX_BYTES", block_bytes)
    rng = np.random.default_rng(12)
    x, w, label = problem(rng, 19, 11, 5, scale=2.0)
    ex, ew = ref_grads(np.float64(1.0), x, w, label, margin=3, beta=1.0)
    for chunking, size in [("rows", 4), ("rows", 19), ("classes", 3)]:
        _, gx, gw = lsm.cross_entropy_with_grad(x, w, label, margin=3, beta=1.0, chunking=chunking, chunk_size=size)
        assert_rel(gx, ex, 1e-10, f"grad_x {chunking} {size}")
        assert_rel(gw, ew, 1e-10, f"grad_w {chunking} {size}")
