"""The CuPy fused loss's ops for the kinds that normalise (column scaling and sub-centres
around this project's chunk kernels), run on the host emulator: equal to the NumPy fused
loss, itself tested against the float64 reference (tests/core/test_family_loss.py), in every
chunking, on class shards and with sub-centres, in float64 and float32."""

from __future__ import annotations

import numpy as np
import pytest

import lsoftmax_core as lsm

from support.kernel_host import EmuBackend, build_emulator
from support.loss_reference import CHUNKINGS, assert_rel

KINDS = [lsm.SphereFace(4), lsm.CosFace(0.35, 3.0), lsm.ArcFace(0.5, 4.0), lsm.CombinedMargin(1.2, 0.3, 0.1, 2.0)]
RTOL = {np.float64: 1e-11, np.float32: 2e-5}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulator(tmp_path_factory.mktemp("emu_family"))


def _problem(rng, n, c, d, dtype, ignored=True):
    x = rng.standard_normal((n, d)).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    w[1] = 0.0  # a zero weight row: no gradient, cosine 0
    label = rng.integers(0, c, n)
    if ignored:
        label[::5] = -100
    return x, w, label


@pytest.mark.parametrize("kind", KINDS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_every_kind_equals_the_numpy_fused_loss_in_every_chunking(emu, kind, dtype) -> None:
    be = EmuBackend(emu)
    x, w, label = _problem(np.random.default_rng(11), 17, 9, 5, dtype)
    want = lsm.cross_entropy_with_grad(x, w, label, margin=kind, beta=0.5)
    for chunking, size in CHUNKINGS:
        got = be.cross_entropy_with_grad(x, w, label, margin=kind, beta=0.5, chunking=chunking, chunk_size=size)
        for a, b, what in zip(got, want, ("loss", "grad_x", "grad_w")):
            assert a.dtype == b.dtype, what
            assert_rel(a, b, RTOL[dtype], f"{what} {chunking} {size}")
    assert be.err_rec[0] == 0


@pytest.mark.parametrize("kind", KINDS, ids=repr)
@pytest.mark.parametrize("sub", [2, 3])
def test_sub_centres_equal_the_numpy_fused_loss_in_every_chunking(emu, kind, sub) -> None:
    be = EmuBackend(emu)
    x, w, label = _problem(np.random.default_rng(sub), 13, 6 * sub, 4, np.float64)
    label = np.where(label < 0, label, label % 6)
    want = lsm.cross_entropy_with_grad(x, w, label, margin=kind, subcenters=sub)
    for chunking, size in CHUNKINGS:
        got = be.cross_entropy_with_grad(x, w, label, margin=kind, subcenters=sub, chunking=chunking, chunk_size=size)
        for a, b in zip(got, want):
            assert_rel(a, b, 1e-11, f"{chunking} {size}")


@pytest.mark.parametrize("kind", KINDS, ids=repr)
def test_class_shards_combine_into_the_whole_loss(emu, kind) -> None:
    be = EmuBackend(emu)
    x, w, label = _problem(np.random.default_rng(5), 11, 10, 4, np.float64)
    cuts = [(0, 3), (3, 7), (7, 10)]
    parts = [be.cross_entropy_shard_stats(x, w[a:b], label, class_start=a, num_classes=10, margin=kind)
             for a, b in cuts]  # fmt: skip
    lse = np.logaddexp.reduce([p[0] for p in parts], axis=0)
    tgt = sum(p[1] for p in parts)
    want_loss, want_x, want_w = lsm.cross_entropy_with_grad(x, w, label, margin=kind)
    valid = label != -100
    assert_rel(np.mean((lse - tgt)[valid]), want_loss, 1e-12)
    grads = [be.cross_entropy_backward(1.0, x, w[a:b], label, class_start=a, num_classes=10, margin=kind, lse=lse)
             for a, b in cuts]  # fmt: skip
    assert_rel(sum(g[0] for g in grads), want_x, 1e-11)
    assert_rel(np.concatenate([g[1] for g in grads]), want_w, 1e-11)
