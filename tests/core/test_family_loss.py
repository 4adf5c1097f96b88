"""The fused cross-entropy with the margin family (cross_entropy, _with_grad, _backward,
_shard_stats) against the dense float64 reference of tests/support/family_reference.py:
every kind, the reductions, ignore_index, both chunkings in several chunks, class shards
combined as the class-parallel head combines them, sub-centres (ties included), and the
fused loss against the unfused one built from lsm.forward / lsm.backward."""

from __future__ import annotations

import numpy as np
import pytest

import lsoftmax_core as lsm
from lsoftmax_core.margins import ArcFace, CombinedMargin, CosFace, LSoftmax, SphereFace

from support import family_reference as fr
from support.tolerances import FAMILY_DELICATE_WIDTH, TOLERANCES, assert_close

IGNORE = -100
KINDS = [
    SphereFace(4), SphereFace(2), CosFace(0.35, 64.0), CosFace(0.35, 3.0), ArcFace(0.5, 64.0), ArcFace(0.5, 3.0),
    ArcFace(1.2, 2.0), CombinedMargin(1.0, 0.3, 0.2, 64.0), CombinedMargin(1.35, 0.3, 0.2, 3.0),
    CombinedMargin(3.0, 0.0, 0.1, 1.5), LSoftmax(3),
]  # fmt: skip
SUB_KINDS = [k for k in KINDS if k.kind != "lsoftmax"]
#: (chunking, chunk_size): the plan's choice, then several small chunks of each kind.
CHUNKINGS = [(None, None), ("rows", 1), ("rows", 4), ("classes", 1), ("classes", 3)]
DTYPES = ["float64", "float32"]


def _ids(mg) -> str:
    return repr(mg).replace(" ", "")


def _problem(mg, dtype="float64", *, n=13, c=7, d=5, k=1, seed=0, ignored=0.2):
    rng = np.random.default_rng(seed)
    x, w, label = fr.problem(rng, n, c, d, mg.to_dict(), subcenters=k, width=FAMILY_DELICATE_WIDTH[dtype])
    label[rng.random(n) < ignored] = IGNORE
    label[0] = label[0] if label[0] != IGNORE else 0  # at least one row counts
    return x.astype(dtype), w.astype(dtype), label


def _loss_scale(x, w, label, p, reduction, k=1):
    """Each row's loss is a log-sum-exp minus a logit: at most twice the largest logit scale."""
    per_row = 2 * fr.logit_scale(x, w, p, k).max(axis=1)
    valid = label != IGNORE
    per_row = np.where(valid, per_row, 0.0)
    if reduction == "none":
        return per_row + 1e-300
    return per_row.sum() / (max(valid.sum(), 1) if reduction == "mean" else 1) + 1e-300


def _check_loss(loss, x, w, label, p, beta, reduction, dtype, k=1, what=""):
    ref = fr.loss(x, w, label, p, beta, reduction, IGNORE, k)
    assert np.shape(loss) == np.shape(ref), what
    assert_close(np.atleast_1d(loss), np.atleast_1d(ref), np.atleast_1d(_loss_scale(x, w, label, p, reduction, k)),
                 TOLERANCES[dtype].forward, f"loss {what}", dtype=dtype)  # fmt: skip


def _sub(k: int) -> dict:
    """The sub-centre argument: left at its default for k = 1 (subcenters=1 giving the same
    bits is a test of its own)."""
    return {} if k == 1 else {"subcenters": k}


def _bound(G, label, grad_loss, reduction):
    """|dloss/dlogits| with each row's upstream weight added to every entry: softmax minus
    one-hot cancels to far below the weight where a row is well classified (at s = 64 the
    target's probability rounds to 1), so its rounding is measured against the weight."""
    valid = label != IGNORE
    weight = np.abs(valid * np.asarray(grad_loss, dtype=np.float64))
    if reduction == "mean":
        weight = weight / max(int(valid.sum()), 1)
    return np.abs(G) + weight[:, None]


def _check_grads(gx, gw, grad_loss, x, w, label, p, beta, reduction, dtype, k=1, what=""):
    assert gx.dtype == gw.dtype == x.dtype and gx.shape == x.shape and gw.shape == w.shape
    _, G, lab = fr.loss_and_grad_logits(x, w, label, p, beta, reduction, IGNORE, k, grad_loss)
    ex, ew = fr.backward(G, x, w, lab, p, beta, k)
    sx, sw = fr.grad_scales(_bound(G, label, grad_loss, reduction), x, w, p, k)
    tol = TOLERANCES[dtype].grad
    assert_close(gx, ex, sx, tol, f"grad_x {what}", dtype=dtype)
    assert_close(gw, ew, sw, tol, f"grad_w {what}", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_loss_and_backward_match_the_reference_for_every_chunking(mg, reduction, dtype) -> None:
    x, w, label = _problem(mg, dtype, seed=len(repr(mg)))
    p, beta = mg.to_dict(), 0.5
    rng = np.random.default_rng(1)
    grad_loss = rng.standard_normal(len(x)) if reduction == "none" else float(rng.standard_normal())
    for chunking, size in CHUNKINGS:
        kw = dict(margin=mg, beta=beta, reduction=reduction, ignore_index=IGNORE, chunking=chunking, chunk_size=size)
        what = f"{mg} {reduction} {chunking} {size}"
        loss = lsm.cross_entropy(x, w, label, **kw)
        _check_loss(loss, x, w, label, p, beta, reduction, dtype, what=what)
        gx, gw = lsm.cross_entropy_backward(grad_loss, x, w, label, **kw)
        _check_grads(gx, gw, grad_loss, x, w, label, p, beta, reduction, dtype, what=what)
        loss2, lse = lsm.cross_entropy(x, w, label, return_lse=True, **kw)
        np.testing.assert_array_equal(loss2, loss)
        gx2, gw2 = lsm.cross_entropy_backward(grad_loss, x, w, label, lse=lse, **kw)
        _check_grads(gx2, gw2, grad_loss, x, w, label, p, beta, reduction, dtype, what=f"{what} given lse")
        if reduction != "none":
            l3, gx3, gw3 = lsm.cross_entropy_with_grad(x, w, label, **kw)
            _check_loss(l3, x, w, label, p, beta, reduction, dtype, what=f"with_grad {what}")
            _check_grads(gx3, gw3, 1.0, x, w, label, p, beta, reduction, dtype, what=f"with_grad {what}")


@pytest.mark.parametrize("beta", [0.0, 1.0, 100.0])
@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_the_fused_loss_equals_the_unfused_one_built_from_forward_and_backward(mg, beta) -> None:
    x, w, label = _problem(mg, seed=3)
    valid = label != IGNORE
    lab = np.where(valid, label, 0)
    f = lsm.forward(x, w, lab, margin=mg, beta=beta)
    m = f.max(axis=1, keepdims=True)
    e = np.exp(f - m)
    lse = m[:, 0] + np.log(e.sum(axis=1))
    rows = np.arange(len(x))
    per_row = np.where(valid, lse - f[rows, lab], 0.0)
    G = e / e.sum(axis=1, keepdims=True)
    G[rows, lab] -= 1.0
    G *= valid[:, None] / valid.sum()
    ux, uw = lsm.backward(G, x, w, lab, margin=mg, beta=beta)
    p = mg.to_dict()
    scale = _loss_scale(x, w, label, p, "none")
    for chunking, size in CHUNKINGS:
        kw = dict(margin=mg, beta=beta, chunking=chunking, chunk_size=size)
        none = lsm.cross_entropy(x, w, label, reduction="none", **kw)
        assert_close(none, per_row, scale, 1e-13, f"per-row loss {chunking} {size}")
        loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label, **kw)
        assert loss == pytest.approx(per_row.sum() / valid.sum(), rel=1e-13, abs=1e-13 * scale.max())
        sx, sw = fr.grad_scales(_bound(G, label, 1.0, "mean"), x, w, p)
        assert_close(gx, ux, sx, 1e-13, f"grad_x {chunking} {size}")
        assert_close(gw, uw, sw, 1e-13, f"grad_w {chunking} {size}")


def test_every_row_ignored_gives_zero_loss_and_zero_gradients() -> None:
    mg = ArcFace(0.5, 64.0)
    x, w, _ = _problem(mg)
    label = np.full(len(x), IGNORE)
    for chunking, size in CHUNKINGS:
        loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label, margin=mg, chunking=chunking, chunk_size=size)
        assert loss == 0.0 and not gx.any() and not gw.any()
        assert not lsm.cross_entropy(x, w, label, margin=mg, reduction="none").any()


def _bounds(c: int, parts: int) -> list[tuple[int, int]]:
    """Shard r holds C // P + (r < C % P) classes (the class-parallel head's tiling)."""
    sizes = [c // parts + (r < c % parts) for r in range(parts)]
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]) if b > a]


def _sharded(x, w, label, parts, grad_loss, k, reduction, **kw):
    """Loss and gradients assembled from class shards: lse combined by logaddexp, targets
    summed, each shard's backward given the combined lse."""
    c = w.shape[0] // k
    bounds = _bounds(c, parts)
    stats = [
        lsm.cross_entropy_shard_stats(x, w[a * k:b * k], label, class_start=a, num_classes=c, **_sub(k), **kw)
        for a, b in bounds
    ]
    lse = np.logaddexp.reduce([s[0] for s in stats], axis=0)
    per_row = np.where(label != IGNORE, lse - sum(s[1] for s in stats), 0.0)
    nv = max(int(np.sum(label != IGNORE)), 1)
    loss = {"none": per_row, "sum": per_row.sum(), "mean": per_row.sum() / nv}[reduction]
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for a, b in bounds:
        gxs, gws = lsm.cross_entropy_backward(grad_loss, x, w[a * k:b * k], label, reduction=reduction, lse=lse,
                                              class_start=a, num_classes=c, **_sub(k), **kw)  # fmt: skip
        gx += gxs
        gw[a * k:b * k] = gws
    return loss, gx, gw


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mg", SUB_KINDS, ids=_ids)
def test_three_class_shards_combine_to_the_reference_loss_and_gradients(mg, reduction, k) -> None:
    x, w, label = _problem(mg, k=k, seed=7)
    label[1], label[2] = 2, 3  # both sides of the 3-way tiling's first boundary (3, 2, 2)
    p, beta = mg.to_dict(), 2.0
    grad_loss = np.linspace(-1.0, 2.0, len(x)) if reduction == "none" else 0.7
    for chunking, size in CHUNKINGS[::2]:
        kw = dict(margin=mg, beta=beta, chunking=chunking, chunk_size=size)
        loss, gx, gw = _sharded(x, w, label, 3, grad_loss, k, reduction, **kw)
        what = f"3 shards k={k} {chunking} {size}"
        _check_loss(loss, x, w, label, p, beta, reduction, "float64", k, what)
        _check_grads(gx, gw, grad_loss, x, w, label, p, beta, reduction, "float64", k, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mg", SUB_KINDS, ids=_ids)
def test_subcenters_take_each_class_s_best_centre_and_match_the_reference(mg, k, dtype) -> None:
    x, w, label = _problem(mg, dtype, k=k, seed=11)
    p, beta = mg.to_dict(), 0.5
    for reduction in ("mean", "none"):
        grad_loss = np.ones(len(x)) if reduction == "none" else 1.0
        for chunking, size in CHUNKINGS:
            kw = dict(margin=mg, beta=beta, reduction=reduction, chunking=chunking, chunk_size=size, **_sub(k))
            what = f"k={k} {reduction} {chunking} {size}"
            loss = lsm.cross_entropy(x, w, label, **kw)
            _check_loss(loss, x, w, label, p, beta, reduction, dtype, k, what)
            gx, gw = lsm.cross_entropy_backward(grad_loss, x, w, label, **kw)
            _check_grads(gx, gw, grad_loss, x, w, label, p, beta, reduction, dtype, k, what)
            if reduction == "mean":
                l2, gx2, gw2 = lsm.cross_entropy_with_grad(x, w, label, **kw)
                _check_loss(l2, x, w, label, p, beta, reduction, dtype, k, f"with_grad {what}")
                _check_grads(gx2, gw2, 1.0, x, w, label, p, beta, reduction, dtype, k, f"with_grad {what}")


@pytest.mark.parametrize("mg", SUB_KINDS, ids=_ids)
def test_one_subcenter_gives_the_bits_of_the_plain_loss(mg) -> None:
    x, w, label = _problem(mg, seed=13)
    for chunking, size in CHUNKINGS:
        kw = dict(margin=mg, beta=0.5, chunking=chunking, chunk_size=size)
        one = lsm.cross_entropy_with_grad(x, w, label, subcenters=1, **kw)
        plain = lsm.cross_entropy_with_grad(x, w, label, **kw)
        for a, b in zip(one, plain):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scaled", [1.0, 2.0, 0.25])
@pytest.mark.parametrize("mg", SUB_KINDS, ids=_ids)
def test_a_tie_between_two_centres_sends_the_gradient_to_the_lower_index(mg, scaled) -> None:
    """Centres 0 and 1 of every class are the same direction (a power-of-two multiple: the
    same unit row to the bit); the class's gradient must go to centre 0 only."""
    k = 3
    x, w, label = _problem(mg, k=k, seed=17, ignored=0.0)
    w[1::k] = w[0::k] * scaled
    p, beta = mg.to_dict(), 1.0
    for chunking, size in CHUNKINGS:
        kw = dict(margin=mg, beta=beta, chunking=chunking, chunk_size=size, subcenters=k)
        loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label, **kw)
        _check_loss(loss, x, w, label, p, beta, "mean", "float64", k, f"tie {chunking} {size}")
        _check_grads(gx, gw, 1.0, x, w, label, p, beta, "mean", "float64", k, f"tie {chunking} {size}")
        _, G, _ = fr.loss_and_grad_logits(x, w, label, p, beta, "mean", IGNORE, k)
        L = fr._Layer(x, w, label, p, beta, k)
        chosen = np.zeros(w.shape[0], dtype=bool)
        chosen[L.row.ravel()] = True
        assert not (L.row % k == 1).any(), "the reference takes the lower index of a tie"
        assert not gw[1::k].any(), "the tied higher centre must get no gradient"
        gx2, gw2 = lsm.cross_entropy_backward(1.0, x, w, label, **kw)
        assert not gw2[1::k].any()
        assert not gw2[~chosen].any(), "a centre no class chose gets no gradient"


@pytest.mark.parametrize("mg", SUB_KINDS[:4], ids=_ids)
def test_subcenter_loss_does_not_modify_its_inputs(mg) -> None:
    x, w, label = _problem(mg, k=2, seed=19)
    arrays = (x, w, label)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False
    lsm.cross_entropy_with_grad(x, w, label, margin=mg, subcenters=2, chunking="classes", chunk_size=2)
    lsm.cross_entropy_backward(np.ones(len(x)), x, w, label, margin=mg, subcenters=2, reduction="none")
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("sub", [1, 2])
def test_a_shard_or_batch_holding_no_target_gives_the_plain_terms_with_sub_centres(sub) -> None:
    """No row's target on this w (a class shard without the batch's labels, or every row
    ignored): no statistics rows at all, and nothing fails on their empty arrays."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((3 * sub, 4))
    kind = lsm.CosFace(0.35, 4.0)
    assert lsm.cross_entropy(x, w, np.full(3, -100), margin=kind, subcenters=sub) == 0.0
    lse, tgt = lsm.cross_entropy_shard_stats(x, w, np.array([5, 4, 3]), class_start=0, num_classes=6,
                                             margin=kind, subcenters=sub)  # fmt: skip
    assert np.all(tgt == 0.0) and np.all(np.isfinite(lse))
    gx, gw = lsm.cross_entropy_backward(1.0, x, w, np.array([5, 4, 3]), class_start=0, num_classes=6,
                                        margin=kind, subcenters=sub, lse=lse + 1.0)  # fmt: skip
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))
