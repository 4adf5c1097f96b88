"""The CuPy fused cross-entropy on class shards (its ops under the loss engine, with ``class_start`` and
``num_classes``) on the host emulator: the same results as the NumPy shards and the float64
reference; labels checked against num_classes, a label on another shard never reported."""

from __future__ import annotations

import numpy as np
import pytest

import lsoftmax_core as lsm
from lsoftmax_core import _cupy_plan as plan

from support.kernel_host import EmuBackend, build_emulator
from support.loss_reference import CHUNKINGS, IGNORE, assert_rel, problem, ref_grads, ref_loss


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("emu_ce_shard"))


def _bounds(c: int, parts: int) -> list[tuple[int, int]]:
    sizes = [c // parts + (r < c % parts) for r in range(parts)]
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:]) if b > a]


@pytest.mark.parametrize("margin", [1, 2, 4])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(("chunking", "size"), CHUNKINGS[1::2])
def test_emulated_shards_combine_to_the_reference_and_match_the_numpy_shards(
    emu, margin, reduction, chunking, size
) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(margin)
    x, w, label = problem(rng, 11, 10, 4, scale=3.0)
    label[4], label[5] = 3, 4  # both sides of a boundary of the 3-way tiling
    grad_loss = rng.standard_normal(11) if reduction == "none" else np.float64(0.7)
    kw = dict(margin=margin, beta=2.0, chunking=chunking, chunk_size=size)
    bounds = _bounds(10, 3)
    stats = []
    for a, b in bounds:
        wa = np.ascontiguousarray(w[a:b])
        got = be.cross_entropy_shard_stats(x, wa, label, class_start=a, num_classes=10, **kw)
        want = lsm.cross_entropy_shard_stats(x, wa, label, class_start=a, num_classes=10, **kw)
        for u, v in zip(got, want):
            assert_rel(u, v, 1e-12, f"shard [{a}, {b})")
        stats.append(got)
    lse = np.logaddexp.reduce([s[0] for s in stats], axis=0)
    per_row = np.where(label != IGNORE, lse - sum(s[1] for s in stats), 0.0)
    expected = ref_loss(x, w, label, margin=margin, beta=2.0, reduction="none")
    assert_rel(per_row, expected, 1e-10, "loss")
    ex, ew = ref_grads(grad_loss, x, w, label, margin=margin, beta=2.0, reduction=reduction)
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for a, b in bounds:
        gxs, gws = be.cross_entropy_backward(
            grad_loss, x, w[a:b], label, reduction=reduction, lse=lse, class_start=a, num_classes=10, **kw
        )
        gx += gxs
        gw[a:b] = gws
    assert_rel(gx, ex, 1e-10, "grad_x")
    assert_rel(gw, ew, 1e-10, "grad_w")
    assert be.err_rec[0] == 0  # labels on other shards are not bad labels


@pytest.mark.parametrize("margin", [1, 3])
def test_labels_are_checked_against_num_classes_on_the_device(emu, margin) -> None:
    be = EmuBackend(emu)
    rng = np.random.default_rng(2)
    x, w, label = problem(rng, 5, 4, 3, ignored=0.0)
    label[:] = [0, 7, 9, IGNORE, 3]  # 9 is past num_classes=8; 7 lives on another shard
    lse, tgt = be.cross_entropy_shard_stats(
        x, w, label, class_start=0, num_classes=8, margin=margin, chunk_size=2
    )
    assert np.isfinite(lse).all() and np.isfinite(tgt).all()
    assert tgt[1] == tgt[2] == tgt[3] == 0.0
    assert be.err_rec[0] == be.serial and be.err_rec[1] == 8 and be.err_rec[2] == plan.OP_FORWARD
    key = int(be.err_key[0])
    assert (key >> 32, int(np.uint32(key & 0xFFFFFFFF).view(np.int32))) == (2, 9)


def test_a_shard_backward_needs_the_combined_lse(emu) -> None:
    be = EmuBackend(emu)
    x, w, label = problem(np.random.default_rng(0), 3, 4, 2)
    with pytest.raises(ValueError, match=r"lse .* is required for a class shard"):
        be.cross_entropy_backward(np.ones(3), x, w, label, reduction="none", class_start=0, num_classes=8)
