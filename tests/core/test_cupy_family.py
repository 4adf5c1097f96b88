"""The kinds that normalise on CuPy arrays (the layer in CuPy array operations, the fused loss
around the chunk kernels) on a CUDA device, against the NumPy backend; every test is marked
``gpu`` and skipped without one (scripts/gpu_check.sh runs them)."""

from __future__ import annotations

import numpy as np
import pytest

import lsoftmax_core as lsm

from support.loss_reference import CHUNKINGS, assert_rel

cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu

KINDS = [lsm.SphereFace(4), lsm.CosFace(0.35, 3.0), lsm.ArcFace(0.5, 4.0), lsm.CombinedMargin(1.2, 0.3, 0.1, 2.0)]
RTOL = {np.float64: 1e-11, np.float32: 2e-5}


def _problem(seed, n, c, d, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    w = rng.standard_normal((c, d)).astype(dtype)
    w[1] = 0.0
    return x, w, rng.integers(0, c, n)


@pytest.mark.parametrize("kind", KINDS, ids=repr)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_layer_equals_the_numpy_backend(kind, dtype) -> None:
    x, w, label = _problem(3, 19, 11, 6, dtype)
    g = np.random.default_rng(4).standard_normal((19, 11)).astype(dtype)
    xs, ws, ls, gs = (cupy.asarray(a) for a in (x, w, label, g))
    assert_rel(cupy.asnumpy(lsm.forward(xs, ws, ls, margin=kind, beta=0.5)),
               lsm.forward(x, w, label, margin=kind, beta=0.5), RTOL[dtype], "forward")  # fmt: skip
    got = lsm.backward(gs, xs, ws, ls, margin=kind, beta=0.5)
    want = lsm.backward(g, x, w, label, margin=kind, beta=0.5)
    for a, b in zip(got, want):
        assert isinstance(a, cupy.ndarray)
        assert_rel(cupy.asnumpy(a), b, RTOL[dtype], "backward")


@pytest.mark.parametrize("kind", KINDS, ids=repr)
@pytest.mark.parametrize("sub", [1, 3])
def test_the_fused_loss_equals_the_numpy_loss_in_every_chunking(kind, sub) -> None:
    x, w, label = _problem(5, 23, 7 * sub, 5, np.float64)
    label = label % 7
    label[::6] = -100
    want = lsm.cross_entropy_with_grad(x, w, label, margin=kind, subcenters=sub)
    xs, ws, ls = (cupy.asarray(a) for a in (x, w, label))
    for chunking, size in CHUNKINGS:
        got = lsm.cross_entropy_with_grad(xs, ws, ls, margin=kind, subcenters=sub, chunking=chunking,
                                          chunk_size=size)  # fmt: skip
        for a, b in zip(got, want):
            assert_rel(cupy.asnumpy(a), b, 1e-11, f"{chunking} {size}")
