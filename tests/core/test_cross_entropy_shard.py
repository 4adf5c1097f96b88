"""The fused cross-entropy on class shards: shards tiling the classes, combined by a
log-sum-exp of their ``lse`` and a sum of their targets, give the whole loss; each shard's
backward, given the combined lse, gives its own rows of grad_w and a term of grad_x."""

from __future__ import annotations

import numpy as np
import pytest

import lsoftmax_core as lsm

from support.loss_reference import CHUNKINGS, IGNORE, assert_rel, problem, ref_grads, ref_loss


def _bounds(c: int, parts: int) -> list[tuple[int, int]]:
    """The class-parallel head's tiling: shard r holds C // P + (r < C % P) classes."""
    sizes = [c // parts + (r < c % parts) for r in range(parts)]
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]) if b > a]


def _sharded(x, w, label, parts, grad_loss, **kw):
    """Loss and gradients assembled from the shards, as the class-parallel head does."""
    reduction = kw.pop("reduction")
    bounds = _bounds(w.shape[0], parts)
    stats = [
        lsm.cross_entropy_shard_stats(x, w[a:b], label, class_start=a, num_classes=w.shape[0], **kw)
        for a, b in bounds
    ]
    lse = np.logaddexp.reduce([s[0] for s in stats], axis=0)
    per_row = np.where(label != IGNORE, lse - sum(s[1] for s in stats), 0.0)
    n_valid = int(np.sum(label != IGNORE))
    loss = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / max(n_valid, 1)}[reduction]
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for a, b in bounds:
        gxs, gws = lsm.cross_entropy_backward(
            grad_loss, x, w[a:b], label, reduction=reduction, lse=lse, class_start=a, num_classes=w.shape[0], **kw
        )
        gx += gxs
        gw[a:b] = gws
    return loss, gx, gw


@pytest.mark.parametrize("margin", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("beta", [0.0, 3.0, 1000.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shards_combine_to_the_unfused_loss_and_gradients_in_float64(margin, beta, reduction) -> None:
    rng = np.random.default_rng(margin * 10 + int(beta))
    x, w, label = problem(rng, 11, 10, 4, scale=3.0)
    label[:3] = label[3]  # duplicate labels
    label[4], label[5] = 3, 4  # both sides of a boundary of the 3-way tiling (4, 3, 3)
    grad_loss = rng.standard_normal(11) if reduction == "none" else np.float64(rng.standard_normal())
    expected = ref_loss(x, w, label, margin=margin, beta=beta, reduction=reduction)
    ex, ew = ref_grads(grad_loss, x, w, label, margin=margin, beta=beta, reduction=reduction)
    for parts in (1, 2, 3, 4, 10):
        for chunking, size in CHUNKINGS[1::2]:
            kw = dict(margin=margin, beta=beta, reduction=reduction, chunking=chunking, chunk_size=size)
            loss, gx, gw = _sharded(x, w, label, parts, grad_loss, **kw)
            what = f"P={parts} {chunking} {size}"
            assert_rel(loss, expected, 1e-10, f"loss {what}")
            assert_rel(gx, ex, 1e-10, f"grad_x {what}")
            assert_rel(gw, ew, 1e-10, f"grad_w {what}")


def test_a_shard_holding_no_target_gives_targets_0_and_a_plain_softmax_gradient() -> None:
    rng = np.random.default_rng(5)
    x, w, label = problem(rng, 6, 8, 3, ignored=0.0)
    label[:] = rng.integers(0, 4, 6)  # every target on the first half
    lse_far, tgt_far = lsm.cross_entropy_shard_stats(x, w[4:], label, class_start=4, num_classes=8, margin=4)
    assert np.all(tgt_far == 0.0)
    plain = x @ w[4:].T
    assert_rel(lse_far, np.log(np.exp(plain).sum(1)), 1e-13)
    lse = np.log(np.exp(lsm.forward(x, w, label, margin=4)).sum(1))
    _, gw = lsm.cross_entropy_backward(
        np.ones(6), x, w[4:], label, reduction="none", lse=lse, class_start=4, num_classes=8, margin=4
    )
    assert_rel(gw, (np.exp(plain - lse[:, None])).T @ x, 1e-12)


def test_huge_logits_stay_finite_on_shards() -> None:
    rng = np.random.default_rng(2)
    x, w, label = problem(rng, 5, 6, 3, scale=1e3, ignored=0.0)
    loss, gx, gw = _sharded(x, w * 10, label, 3, np.float64(1.0), margin=3, beta=0.0, reduction="sum")
    assert np.isfinite(loss) and np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
    assert_rel(loss, ref_loss(x, w * 10, label, margin=3, beta=0.0, reduction="sum"), 1e-10)


def test_an_all_ignored_batch_gives_zero_gradients_on_every_shard() -> None:
    rng = np.random.default_rng(4)
    x, w, label = problem(rng, 4, 6, 3, ignored=1.0)
    loss, gx, gw = _sharded(x, w, label, 2, np.float64(1.0), margin=2, beta=0.0, reduction="mean")
    assert loss == 0.0 and not gx.any() and not gw.any()


def test_the_same_shard_call_is_bitwise_repeatable() -> None:
    rng = np.random.default_rng(9)
    x, w, label = problem(rng, 9, 7, 5)
    a = lsm.cross_entropy_shard_stats(x, w[2:5], label, class_start=2, num_classes=7, margin=3, chunk_size=2)
    b = lsm.cross_entropy_shard_stats(x, w[2:5], label, class_start=2, num_classes=7, margin=3, chunk_size=2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))


def test_float32_shards_agree_with_the_float64_reference() -> None:
    rng = np.random.default_rng(6)
    x, w, label = problem(rng, 16, 12, 8)
    loss, gx, gw = _sharded(
        x.astype(np.float32), w.astype(np.float32), label, 3, np.float32(1.0), margin=2, beta=1.0, reduction="mean"
    )
    assert gx.dtype == gw.dtype == np.float32
    assert_rel(loss, ref_loss(x, w, label, margin=2, beta=1.0), 1e-5)
    ex, ew = ref_grads(np.float64(1.0), x, w, label, margin=2, beta=1.0)
    assert_rel(gx, ex, 1e-4)
    assert_rel(gw, ew, 1e-4)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(class_start=2), r"class_start=2 needs num_classes"),
        (dict(class_start=5, num_classes=8), r"class_start=5 puts w's C=4 rows past num_classes=8"),
        (dict(class_start=-1, num_classes=8), r"class_start=-1 must be an integer >= 0"),
        (dict(class_start=0, num_classes=3), r"num_classes=3 is smaller than w's C=4 rows"),
    ],
)
def test_bad_shard_arguments_are_named(kw, message) -> None:
    rng = np.random.default_rng(0)
    x, w, label = problem(rng, 3, 4, 2, ignored=0.0)
    with pytest.raises(ValueError, match=message):
        lsm.cross_entropy_backward(np.ones(3), x, w, label, reduction="none", lse=np.zeros(3), **kw)
    if "num_classes" in kw:
        with pytest.raises(ValueError, match=message):
            lsm.cross_entropy_shard_stats(x, w, label, **kw)


def test_labels_are_checked_against_num_classes_not_the_shard() -> None:
    rng = np.random.default_rng(0)
    x, w, _ = problem(rng, 3, 4, 2)
    ok = np.array([0, 7, IGNORE])  # 7 is another shard's class
    lsm.cross_entropy_shard_stats(x, w, ok, class_start=0, num_classes=8)
    with pytest.raises(ValueError, match=r"label"):
        lsm.cross_entropy_shard_stats(x, w, np.array([0, 8, 1]), class_start=0, num_classes=8)


def test_a_shard_backward_needs_the_combined_lse() -> None:
    rng = np.random.default_rng(0)
    x, w, label = problem(rng, 3, 4, 2)
    with pytest.raises(ValueError, match=r"lse .* is required for a class shard"):
        lsm.cross_entropy_backward(np.ones(3), x, w, label, reduction="none", class_start=0, num_classes=8)


def test_narrow_label_dtypes_work_on_shards_past_their_range() -> None:
    rng = np.random.default_rng(1)
    x, w, _ = problem(rng, 4, 5, 3)
    label = np.array([0, 7, 250, 3], dtype=np.uint8)  # none of them on the shard [300, 305)
    lse, tgt = lsm.cross_entropy_shard_stats(x, w, label, class_start=300, num_classes=305, margin=2)
    assert not tgt.any()
    assert_rel(lse, np.log(np.exp(x @ w.T).sum(1)), 1e-13)
    label16 = np.array([301, 7, 304, 3], dtype=np.uint16)
    _, tgt16 = lsm.cross_entropy_shard_stats(x, w, label16, class_start=300, num_classes=305, margin=1)
    assert_rel(tgt16[[0, 2]], np.array([x[0] @ w[1], x[2] @ w[4]]), 1e-13)
