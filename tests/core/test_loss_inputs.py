"""What the fused loss accepts and refuses (issue 23, items 4, 5, 6 and 9): the upstream
gradient, a given lse, np.matrix inputs, and the options object every call is checked as."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lsoftmax_core as lsm
from lsoftmax_core._numpy_loss import engine

from support.loss_reference import IGNORE, assert_rel, problem, ref_grad_logits, ref_grads
from support.reference import backward as ref_backward

CHUNKS = [("rows", 3), ("classes", 2)]


# ---------------------------------------------------------------- grad_loss (item 4)


@pytest.mark.parametrize(
    "bad", [None, "abc", 1 + 2j, np.complex128(1.0), np.array(1.0 + 0j), [1.0], True, np.bool_(True), object()]
)
def test_a_grad_loss_that_is_not_real_is_a_type_error_naming_it(bad) -> None:
    x, w, label = problem(np.random.default_rng(0), 5, 4, 3)
    with pytest.raises(TypeError, match="grad_loss"):
        lsm.cross_entropy_backward(bad, x, w, label, margin=2)


def test_a_complex_or_list_grad_loss_of_the_right_shape_is_refused_too() -> None:
    x, w, label = problem(np.random.default_rng(0), 5, 4, 3)
    for bad in (np.ones(5, complex), [1.0] * 5, np.array(["a"] * 5), np.ones(5, bool)):
        with pytest.raises(TypeError, match="grad_loss"):
            lsm.cross_entropy_backward(bad, x, w, label, margin=2, reduction="none")


@pytest.mark.parametrize("good", [1, 1.0, np.float32(1.0), np.int64(1), np.array(1.0), np.array(1, np.int8)])
def test_real_scalars_of_any_kind_give_the_same_gradients(good) -> None:
    x, w, label = problem(np.random.default_rng(1), 6, 4, 3)
    want = lsm.cross_entropy_backward(np.float64(1.0), x, w, label, margin=3)
    got = lsm.cross_entropy_backward(good, x, w, label, margin=3)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


def test_an_integer_array_is_a_real_grad_loss() -> None:
    x, w, label = problem(np.random.default_rng(2), 6, 4, 3)
    g = np.arange(6)
    got = lsm.cross_entropy_backward(g, x, w, label, margin=3, reduction="none")
    want = lsm.cross_entropy_backward(g.astype(float), x, w, label, margin=3, reduction="none")
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- ignored rows (item 5)


@pytest.mark.parametrize(("chunking", "size"), CHUNKS)
@pytest.mark.parametrize("poison", [np.inf, -np.inf, np.nan])
def test_an_ignored_row_takes_no_part_whatever_its_upstream_gradient(chunking, size, poison) -> None:
    x, w, label = problem(np.random.default_rng(3), 7, 5, 3, ignored=0.0)
    label[2] = IGNORE
    g = np.linspace(0.5, 2.0, 7)
    kw = dict(margin=3, reduction="none", chunking=chunking, chunk_size=size)
    want = lsm.cross_entropy_backward(g, x, w, label, **kw)
    g[2] = poison
    got = lsm.cross_entropy_backward(g, x, w, label, **kw)
    for a, b in zip(got, want):
        assert np.isfinite(a).all()
        assert np.array_equal(a, b)


def test_an_ignored_row_takes_no_part_on_a_class_shard_either() -> None:
    x, w, label = problem(np.random.default_rng(4), 7, 6, 3, ignored=0.0)
    label[[1, 5]] = IGNORE
    _, lse = lsm.cross_entropy(x, w, label, margin=2, reduction="none", return_lse=True)
    g = np.ones(7)
    shard = dict(margin=2, reduction="none", lse=lse, class_start=2, num_classes=6)
    want = lsm.cross_entropy_backward(g, x, w[2:5], label, **shard)
    g[[1, 5]] = np.inf
    got = lsm.cross_entropy_backward(g, x, w[2:5], label, **shard)
    for a, b in zip(got, want):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------- lse (item 6)


def test_a_given_lse_is_used_by_both_chunkings_as_the_softmax_denominator() -> None:
    """With lse + delta, G = softmax·e^-delta - onehot in rows and classes alike."""
    x, w, label = problem(np.random.default_rng(5), 9, 4, 6, scale=2.0)
    _, lse = lsm.cross_entropy(x, w, label, margin=3, reduction="none", return_lse=True)
    delta = np.linspace(0.0, 1.0, 9)
    g = np.linspace(-1.0, 1.0, 9)
    p, lab = ref_grad_logits(np.ones(9), x, w, label, margin=3, beta=0.0, reduction="none")
    p[np.arange(9), lab] += (label != IGNORE)  # softmax alone (0 on ignored rows)
    p *= np.exp(-delta)[:, None]
    p[np.arange(9), lab] -= (label != IGNORE)
    want = ref_backward(p * g[:, None], x, w, lab, margin=3, beta=0.0)
    for chunking, size in [("rows", 2), ("rows", 9), ("classes", 1), ("classes", 3)]:
        got = lsm.cross_entropy_backward(g, x, w, label, margin=3, reduction="none", lse=lse + delta,
                                         chunking=chunking, chunk_size=size)  # fmt: skip
        assert_rel(got[0], want[0], 1e-10, f"grad_x {chunking}")
        assert_rel(got[1], want[1], 1e-10, f"grad_w {chunking}")


@pytest.mark.parametrize(("chunking", "size"), CHUNKS)
def test_an_lse_of_another_batch_or_of_changed_weights_raises_naming_lse(chunking, size) -> None:
    rng = np.random.default_rng(6)
    x, w, label = problem(rng, 9, 4, 6, ignored=0.0)
    kw = dict(margin=2, chunking=chunking, chunk_size=size)
    _, other = lsm.cross_entropy(x * 0.1, w, label, return_lse=True, **kw)  # another batch
    with pytest.raises(ValueError, match=r"lse\[\d+\]=.* is below that row's logit"):
        lsm.cross_entropy_backward(np.float64(1.0), x, w, label, lse=other, **kw)
    _, before = lsm.cross_entropy(x, w, label, return_lse=True, **kw)
    with pytest.raises(ValueError, match=r"lse\[\d+\]=.* is below that row's logit"):
        lsm.cross_entropy_backward(np.float64(1.0), x, w * 3.0, label, lse=before, **kw)  # w changed since


def test_an_lse_from_another_chunking_or_dtype_of_the_same_call_is_accepted() -> None:
    x, w, label = problem(np.random.default_rng(7), 40, 30, 8)
    x, w = x.astype(np.float32), w.astype(np.float32)
    ex, ew = ref_grads(np.float64(1.0), x.astype(float), w.astype(float), label, margin=4, beta=0.0)
    for fwd in CHUNKS + [("rows", 40), ("classes", 30)]:
        _, lse = lsm.cross_entropy(x, w, label, margin=4, return_lse=True, chunking=fwd[0], chunk_size=fwd[1])
        for given in (lse, lse.astype(np.float32)):
            for chunking, size in CHUNKS:
                gx, gw = lsm.cross_entropy_backward(np.float32(1.0), x, w, label, margin=4, lse=given,
                                                    chunking=chunking, chunk_size=size)  # fmt: skip
                assert_rel(gx, ex, 1e-4, f"{fwd} -> {chunking}")
                assert_rel(gw, ew, 1e-4, f"{fwd} -> {chunking}")


@pytest.mark.parametrize(
    ("lse", "error", "pattern"),
    [
        (np.zeros(4), ValueError, r"lse must have shape \(N,\) = \(5,\), got \(4,\)"),
        (np.zeros((5, 1)), ValueError, r"lse must have shape \(N,\) = \(5,\), got \(5, 1\)"),
        (np.zeros(5, np.int64), TypeError, r"lse must have a real floating dtype, got lse.dtype=int64"),
        (np.zeros(5, complex), TypeError, r"lse must have a real floating dtype"),
        ([0.0] * 5, TypeError, r"lse must be a numpy.ndarray"),
        (np.array([0.0, np.nan, 0.0, 0.0, 0.0]), ValueError, r"lse must be finite .*: lse\[1\]=nan"),
        (np.array([0.0, 0.0, np.inf, 0.0, 0.0]), ValueError, r"lse must be finite .*: lse\[2\]=inf"),
    ],
)
def test_a_malformed_lse_is_refused_before_anything_is_computed(lse, error, pattern) -> None:
    x, w, label = problem(np.random.default_rng(8), 5, 4, 3, ignored=0.0)
    for chunking, size in CHUNKS:
        with pytest.raises(error, match=pattern):
            lsm.cross_entropy_backward(np.float64(1.0), x, w, label, margin=2, lse=lse, chunking=chunking,
                                       chunk_size=size)  # fmt: skip


def test_an_ignored_rows_lse_is_not_read() -> None:
    x, w, label = problem(np.random.default_rng(9), 6, 4, 3, ignored=0.0)
    label[3] = IGNORE
    _, lse = lsm.cross_entropy(x, w, label, margin=2, return_lse=True)
    want = lsm.cross_entropy_backward(np.float64(1.0), x, w, label, margin=2, lse=lse)
    for junk in (np.nan, -np.inf, -1e300):
        lse[3] = junk
        for chunking, size in CHUNKS:
            got = lsm.cross_entropy_backward(np.float64(1.0), x, w, label, margin=2, lse=lse, chunking=chunking,
                                             chunk_size=size)  # fmt: skip
            assert_rel(got[0], want[0], 1e-13)
            assert_rel(got[1], want[1], 1e-13)


# ---------------------------------------------------------------- np.matrix (item 9)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_matrix_inputs_are_read_as_forward_reads_them_and_give_plain_arrays() -> None:
    x, w, label = problem(np.random.default_rng(10), 6, 5, 3)
    xm, wm = np.asmatrix(x), np.asmatrix(w)
    lsm.forward(xm, wm, np.where(label == IGNORE, 0, label), margin=3)  # forward accepts them
    for chunking, size in CHUNKS:
        kw = dict(margin=3, chunking=chunking, chunk_size=size)
        for got, want in [
            (lsm.cross_entropy(xm, wm, label, reduction="none", **kw), lsm.cross_entropy(x, w, label, reduction="none", **kw)),
            (lsm.cross_entropy_with_grad(xm, wm, label, **kw), lsm.cross_entropy_with_grad(x, w, label, **kw)),
            (lsm.cross_entropy_backward(1.0, xm, wm, label, **kw), lsm.cross_entropy_backward(1.0, x, w, label, **kw)),
            (lsm.cross_entropy_shard_stats(xm, wm[1:], label, class_start=1, num_classes=5, **kw),
             lsm.cross_entropy_shard_stats(x, w[1:], label, class_start=1, num_classes=5, **kw)),
        ]:  # fmt: skip
            for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
                assert type(a) is np.ndarray
                assert np.array_equal(a, b)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_a_matrix_label_is_refused_as_forward_refuses_it() -> None:
    x, w, label = problem(np.random.default_rng(11), 4, 3, 2, ignored=0.0)
    with pytest.raises(ValueError, match=r"label must be 1-D"):
        lsm.forward(x, w, np.asmatrix(label), margin=2)
    with pytest.raises(ValueError, match=r"label must be 1-D"):
        lsm.cross_entropy(x, w, np.asmatrix(label), margin=2)


# ---------------------------------------------------------------- LossOptions


def test_loss_options_are_checked_once_and_frozen() -> None:
    opts = lsm.LossOptions(margin=np.int64(3), beta=1, reduction="sum", chunk_size=np.int32(5))
    assert (type(opts.margin), type(opts.beta), type(opts.chunk_size)) == (int, float, int)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.margin = 2  # type: ignore[misc]
    assert opts == lsm.LossOptions(3, 1.0, "sum", -100, 5)
    for kw, pattern in [
        (dict(margin=0), r"margin=0"), (dict(beta=-1.0), r"beta=-1.0"), (dict(reduction="avg"), r"reduction='avg'"),
        (dict(ignore_index=2**63), r"ignore_index="), (dict(chunk_size=0), r"chunk_size=0"),
        (dict(chunking="tiles"), r"chunking='tiles'"), (dict(memory_budget=0), r"memory_budget=0"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=pattern):
            lsm.LossOptions(**kw)  # type: ignore[arg-type]


def test_the_engine_takes_loss_options_only() -> None:
    x, w, label = problem(np.random.default_rng(12), 4, 3, 2)
    with pytest.raises(TypeError, match=r"opts must be a lsoftmax_core.LossOptions"):
        engine().cross_entropy(x, w, label, {"margin": 2})
    opts = lsm.LossOptions(margin=3, reduction="sum", chunking="classes", chunk_size=2)
    assert np.array_equal(engine().cross_entropy(x, w, label, opts),
                          lsm.cross_entropy(x, w, label, margin=3, reduction="sum", chunking="classes", chunk_size=2))
