"""The CuPy backend on a CUDA device (every test is marked ``gpu`` and skipped without one).

Against the float64 reference per dtype (tests/support/tolerances.py), bitwise determinism,
bitwise agreement with the host build of the same kernels (tests/support/kernel_host.py) given
the same cuBLAS outputs, bad labels, untouched inputs, nasty cases, norms beyond the
float64 range, odd shapes, streams, and memory that stays flat over 10,000 calls.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import lsoftmax_core as lsm
from lsoftmax_core.checks import check_arrays

from support.kernel_host import DTYPES as HOST_DTYPES
from support.kernel_host import (
    EXTREME_NORMS,
    EmuBackend,
    build_emulator,
    check_extreme_norms,
    compiler,
    mixed_scale_class,
    nasty_rows,
    representable,
)
from support.reference import forward as ref_forward
from support.strategies import problems
from support.tolerances import check_backward, check_forward

cupy = pytest.importorskip("cupy")
cb = pytest.importorskip("lsoftmax_core._cupy_backend")
plan = pytest.importorskip("lsoftmax_core._cupy_plan")

pytestmark = pytest.mark.gpu

DTYPES = list(lsm.supported_dtypes("cupy"))
DTYPE_IDS = [d.name for d in DTYPES]


def _rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _case(seed, n, c, d, dtype):
    rng = np.random.default_rng(seed)
    return (
        _rand(rng, (n, d), dtype),
        _rand(rng, (c, d), dtype),
        rng.integers(0, c, n),
        _rand(rng, (n, c), dtype),
    )


def _gpu(*arrays):
    return tuple(cupy.asarray(a) for a in arrays)


def _as_uint(a):
    """The same bytes as unsigned integers: CuPy's own float16/bfloat16 kernels (copies,
    casts, fills) need CUDA's fp16/bf16 headers, which the backend itself never needs."""
    return a.view({2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}[a.dtype.itemsize])


def _misaligned(a):
    """A C-contiguous copy whose data pointer is one element past a 256-byte boundary."""
    buf = cupy.empty(a.size + 1, dtype=a.dtype)
    out = buf[1:].reshape(a.shape)
    _as_uint(out)[...] = _as_uint(a)
    return out


def _finite(a) -> bool:
    return bool(np.all(np.isfinite(cupy.asnumpy(a).astype(np.float64))))


def _bits(a) -> np.ndarray:
    a = cupy.asnumpy(a) if isinstance(a, cupy.ndarray) else a
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _assert_bitwise(a, b) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(_bits(a), _bits(b))


def _run(x, w, label, g, m, beta):
    out = lsm.forward(x, w, label, margin=m, beta=beta)
    gx, gw = lsm.backward(g, x, w, label, margin=m, beta=beta)
    return out, gx, gw


@pytest.fixture(autouse=True)
def _no_label_error_left_behind():
    yield
    lsm.check_labels()  # fails the test that left an unreported bad label, not the next one


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@given(data=st.data())
def test_matches_reference(dtype, data) -> None:
    x, w, label, m, beta = data.draw(problems(dtype=dtype, max_n=12, max_c=9, max_d=48))
    g = _rand(np.random.default_rng(len(label)), (len(x), len(w)), dtype)
    assume(representable(dtype, x, w, label, g, m, beta))
    dx, dw, dl, dg = _gpu(x, w, label, g)
    out, gx, gw = _run(dx, dw, dl, dg, m, beta)
    for a in (out, gx, gw):
        assert isinstance(a, cupy.ndarray) and a.dtype == dtype
    check_forward(out, x, w, label, margin=m, beta=beta, dtype=dtype.name)
    check_backward((gx, gw), g, x, w, label, margin=m, beta=beta, dtype=dtype.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape",
    [(252, 507, 123), (252, 123, 507), (1, 1, 1), (4096, 10, 64), (600, 3, 2), (130, 5000, 33), (7, 3, 4099)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("m", [2, 4, 64])
def test_shapes_against_reference(dtype, shape, m) -> None:
    x, w, label, g = _case(sum(shape) + m, *shape, dtype)
    while dtype.itemsize == 2 and not representable(dtype, x, w, label, g, m, 0.5):
        # |x||w| psi reaches -1.7e5 at D = 4099, m = 64: beyond float16, where -inf is the
        # right answer and no tolerance applies.  Smaller x keeps the shape under test.
        x = (x.astype(np.float64) / 16).astype(dtype)
    out, gx, gw = _run(*_gpu(x, w, label, g), m, 0.5)
    check_forward(out, x, w, label, margin=m, beta=0.5, dtype=dtype.name)
    check_backward((gx, gw), g, x, w, label, margin=m, beta=0.5, dtype=dtype.name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 64])
def test_nasty_cases(dtype, m) -> None:
    x, w, label = nasty_rows(dtype, m)
    g = _rand(np.random.default_rng(m), (len(x), len(w)), dtype)
    for beta in (0.0, 7.0):
        out, gx, gw = _run(*_gpu(x, w, label, g), m, beta)
        assert _finite(out)
        check_forward(out, x, w, label, margin=m, beta=beta, dtype=dtype.name)
        check_backward((gx, gw), g, x, w, label, margin=m, beta=beta, dtype=dtype.name)


@pytest.mark.parametrize("case", list(EXTREME_NORMS))
@pytest.mark.parametrize("m, beta", [(2, 0.0), (3, 0.0), (2, 7.0), (64, 0.5)])
def test_norms_beyond_float64_range(case, m, beta) -> None:
    """Finite logits and gradients when a norm overflows float64 (only a gradient whose exact
    value overflows is inf), as tests/kernels/test_host_emulator.py checks on the CPU."""
    x, w, s = EXTREME_NORMS[case]
    label = np.array([0])
    dx, dw, dl = _gpu(x, w, label)
    out = lsm.forward(dx, dw, dl, margin=m, beta=beta)
    want = ref_forward(x * s, w / s, label, margin=m, beta=beta)[0, 0]
    assert float(out[0, 0]) == pytest.approx(want, rel=1e-12)
    for gv in (2.0**-8, -0.25, 1.0):
        g = np.array([[gv]])
        grads = lsm.backward(cupy.asarray(g), dx, dw, dl, margin=m, beta=beta)
        check_extreme_norms(out, grads, g, x, w, label, s, margin=m, beta=beta)
        if gv == 2.0**-8:
            assert all(_finite(a) for a in grads)


@pytest.mark.parametrize("case", ["huge_w_orthogonal", "huge_x_orthogonal"])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_large_upstream_gradient_at_the_float64_limit(case, beta) -> None:
    x, w, s = EXTREME_NORMS[case]
    label = np.array([0])
    dx, dw, dl = _gpu(x, w, label)
    out = lsm.forward(dx, dw, dl, margin=2, beta=beta)
    for gv in (4.0, -4.0):
        g = np.array([[gv]])
        grads = lsm.backward(cupy.asarray(g), dx, dw, dl, margin=2, beta=beta)
        assert all(_finite(a) for a in grads)
        check_extreme_norms(out, grads, g, x, w, label, s, margin=2, beta=beta)


@pytest.mark.parametrize("huge_g", [0.0, 0.25, -0.25])
@pytest.mark.parametrize("m, beta", [(2, 0.0), (3, 0.0), (5, 0.5)])
def test_norms_beyond_float64_range_in_a_class_of_mixed_scales(huge_g, m, beta) -> None:
    x, w, label, s = mixed_scale_class()
    g = _rand(np.random.default_rng(m), (len(x), len(w)), np.float64) * 2.0**-8
    g[0, 0] = huge_g
    out, gx, gw = _run(*_gpu(x, w, label, g), m, beta)
    assert all(_finite(a) for a in (out, gx, gw))
    check_extreme_norms(out, (gx, gw), g, x, w, label, s, margin=m, beta=beta)


def test_float32_subnormal_target_survives() -> None:
    x = np.array([[3e-41, -1e-40], [1e-39, 2e-39]], dtype=np.float32)
    w = np.array([[1e-3, 2e-3], [-5e-41, 4e-41]], dtype=np.float32)
    out = lsm.forward(*_gpu(x, w, np.array([0, 1])), margin=2, beta=0.0)
    ref = lsm.forward(x.astype(np.float64), w.astype(np.float64), np.array([0, 1]), margin=2, beta=0.0)
    assert float(out[0, 0]) == pytest.approx(float(ref[0, 0]), rel=1e-2) and float(out[0, 0]) != 0.0


def test_margin_one_is_the_plain_gemm() -> None:
    x, w, label, g = _gpu(*_case(9, 33, 8, 17, np.float32))
    out, gx, gw = _run(x, w, label, g, 1, 3.0)
    _assert_bitwise(out, x @ w.T)
    _assert_bitwise(gx, g @ w)
    _assert_bitwise(gw, g.T @ x)


def test_float64_agrees_with_numpy_backend() -> None:
    x, w, label, g = _case(10, 64, 12, 40, np.float64)
    got = _run(*_gpu(x, w, label, g), 4, 0.3)
    want = _run(x, w, label, g, 4, 0.3)
    for a, b in zip(got, want):
        np.testing.assert_allclose(cupy.asnumpy(a), b, rtol=1e-11, atol=1e-11 * float(np.max(np.abs(b))))


@pytest.fixture
def gemm_path(monkeypatch):
    """The cuBLAS GEMMs + margin kernels at every size (the small-problem path off)."""
    monkeypatch.setattr(plan, "SMALL_MAX_MACS", 0)


@pytest.mark.parametrize("m", [1, 4])
def test_add_margin_on_plain_results_equals_forward_and_backward(m, gemm_path) -> None:
    """(On the GEMM path: the small-problem kernels compute their own products.)"""
    x, w, label, g = _gpu(*_case(11, 50, 9, 33, np.float32))
    out, gx, gw = _run(x, w, label, g, m, 2.0)
    logits = x @ w.T
    assert lsm.add_margin(logits, x, w, label, margin=m, beta=2.0) is logits
    _assert_bitwise(logits, out)
    px, pw = g @ w, g.T @ x
    lsm.add_margin_grad(px, pw, g, x, w, label, margin=m, beta=2.0)
    _assert_bitwise(px, gx)
    _assert_bitwise(pw, gw)
    with pytest.raises(ValueError, match=r"logits must be C-contiguous"):
        lsm.add_margin(cupy.asfortranarray(x @ w.T), x, w, label, margin=m)
    with pytest.raises(TypeError, match=r"x must be a numpy.ndarray like logits"):
        lsm.add_margin(cupy.asnumpy(x @ w.T), x, w, label, margin=m)  # mixed libraries


def test_out_arguments_give_the_same_bits() -> None:
    x, w, label, g = _gpu(*_case(12, 50, 9, 33, np.float32))
    out, gx, gw = _run(x, w, label, g, 3, 1.0)
    logits = cupy.full((50, 9), cupy.nan, dtype=cupy.float32)
    assert lsm.forward(x, w, label, margin=3, beta=1.0, out=logits) is logits
    _assert_bitwise(logits, out)
    px, pw = cupy.full_like(gx, cupy.nan), cupy.full_like(gw, cupy.nan)
    got = lsm.backward(g, x, w, label, margin=3, beta=1.0, out=(px, pw))
    assert got[0] is px and got[1] is pw
    _assert_bitwise(px, gx)
    _assert_bitwise(pw, gw)
    with pytest.raises(ValueError, match=r"out must be C-contiguous"):
        lsm.forward(x, w, label, out=cupy.asfortranarray(logits))
    with pytest.raises(ValueError, match=r"out\[1\] must not share memory with the inputs"):
        lsm.backward(g, x, w, label, out=(px, px.ravel()[: 9 * 33].reshape(9, 33)))  # a view of out[0]


def _plain(x, w, g):
    return x @ w.T, g @ w, g.T @ x


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "shape", [(4096, 10, 64), (2048, 3, 2), (512, 1000, 300), (256, 10, 2)], ids=lambda s: "x".join(map(str, s))
)
def test_deterministic(dtype, shape) -> None:
    """Same inputs, bitwise same outputs: repeated runs; and on another stream or from
    misaligned copies whenever cuBLAS itself gives the same bits there (it may pick another
    GEMM kernel for another stream's workspace or for unaligned pointers; our kernels'
    independence of alignment is proven on the CPU by tests/kernels/test_host_emulator.py)."""
    x, w, label, g = _gpu(*_case(11, *shape, dtype))
    first = _run(x, w, label, g, 3, 0.25)
    for _ in range(3):
        for a, b in zip(first, _run(x, w, label, g, 3, 0.25)):
            _assert_bitwise(a, b)
    plain = _plain(x, w, g)

    def same_gemms(other) -> bool:
        return all(np.array_equal(_bits(a), _bits(b)) for a, b in zip(plain, other))

    cupy.cuda.runtime.deviceSynchronize()  # a non-blocking stream does not wait for the null stream
    with cupy.cuda.Stream(non_blocking=True) as stream:
        other, other_plain = _run(x, w, label, g, 3, 0.25), _plain(x, w, g)
        stream.synchronize()
    if same_gemms(other_plain):
        for a, b in zip(first, other):
            _assert_bitwise(a, b)

    mx, mw, mg = _misaligned(x), _misaligned(w), _misaligned(g)
    got = _run(mx, mw, label, mg, 3, 0.25)
    if same_gemms(_plain(mx, mw, mg)):
        for a, b in zip(first, got):
            _assert_bitwise(a, b)
    else:
        check_forward(
            got[0], *(cupy.asnumpy(a) for a in (x, w, label)), margin=3, beta=0.25, dtype=dtype.name
        )


@pytest.mark.skipif(compiler() is None, reason="needs g++ for the host build of the kernels")
@pytest.mark.parametrize("path", ["small", "gemm"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_bitwise_equal_to_host_build_of_the_same_kernels(tmp_path_factory, dtype, path, monkeypatch) -> None:
    """Given cuBLAS's GEMM outputs, the GPU kernels and their g++ build (the code the CPU
    tests run) produce the same bits: same source, no FMA contraction on either side.  The
    small-problem kernels compute their products themselves: the same bits without cuBLAS."""
    emu = _EMU.get("emu") or _EMU.setdefault("emu", build_emulator(tmp_path_factory.mktemp("emu")))
    if path == "gemm":
        monkeypatch.setattr(plan, "SMALL_MAX_MACS", 0)
    x, w, label, g = _case(12, 300, 7, 45, dtype)
    assert plan.small(check_arrays(x, w, label, 4, 0.75, dtypes=HOST_DTYPES)) == (path == "small")
    dx, dw, dl, dg = _gpu(x, w, label, g)
    out, gx, gw = _run(dx, dw, dl, dg, 4, 0.75)
    gemms = {"fwd": cupy.asnumpy(dx @ dw.T), "gx": cupy.asnumpy(dg @ dw), "gw": cupy.asnumpy(dg.T @ dx)}
    host = EmuBackend(emu)
    # The host run gets cuBLAS's GEMM results instead of NumPy's.
    queue = [gemms["fwd"], gemms["gx"], gemms["gw"]]
    monkeypatch.setattr("support.kernel_host.gemm", lambda a, b, dt: queue.pop(0).copy())
    h_out = host.forward(x, w, label, margin=4, beta=0.75)
    h_gx, h_gw = host.backward(g, x, w, label, margin=4, beta=0.75)
    for a, b in zip((out, gx, gw), (h_out, h_gx, h_gw)):
        _assert_bitwise(a, b)


_EMU: dict[str, object] = {}


@pytest.mark.parametrize("margin", [1, 3])
def test_bad_labels(margin) -> None:
    x, w, label, g = _gpu(*_case(13, 40, 6, 9, np.float32))
    bad = label.copy()
    bad[[5, 17]] = cupy.asarray([6, -2])
    out = lsm.forward(x, w, bad, margin=margin, beta=0.0)  # returns: the check is asynchronous
    with pytest.raises(
        ValueError, match=r"label must lie in \[0, C\) = \[0, 6\): label\[5\]=6 .*forward call"
    ):
        lsm.check_labels()
    lsm.check_labels()  # reported once
    good = np.setdiff1d(np.arange(40), [5, 17])
    hx, hw, hl = (cupy.asnumpy(a) for a in (x, w, label))
    # Good rows: correct (a GEMM over fewer rows may round differently, so no bitwise check);
    # bad rows: exactly the plain GEMM's (same cuBLAS call), or on the small-problem plan
    # exactly the products its kernel forms for rows it corrects (the bad rows relabeled).
    check_forward(out[cupy.asarray(good)], hx[good], hw, hl[good], margin=margin, beta=0.0, dtype="float32")
    rows = cupy.asarray([5, 17])
    if plan.small(check_arrays(hx, hw, hl, margin, 0.0, dtypes=HOST_DTYPES)):
        for cls in (0, 1):
            relabeled = lsm.forward(x, w, cupy.where(bad == label, bad, cls), margin=margin, beta=0.0)
            keep = cupy.arange(6) != cls
            _assert_bitwise(out[rows][:, keep], relabeled[rows][:, keep])
    else:
        _assert_bitwise(out[rows], (x @ w.T)[rows])
    # The next call on the device raises for an earlier bad call, without a sync of ours.
    lsm.backward(g, x, w, bad, margin=margin, beta=0.0)
    cupy.cuda.runtime.deviceSynchronize()
    with pytest.raises(ValueError, match=r"label\[5\]=6 .*backward call"):
        lsm.forward(x, w, label, margin=margin, beta=0.0)
    lsm.forward(x, w, label, margin=margin, beta=0.0)  # and it is cleared
    lsm.check_labels()


def test_bad_label_synchronous_mode(monkeypatch) -> None:
    x, w, label, _ = _gpu(*_case(14, 8, 3, 4, np.float64))
    import lsoftmax_core._cupy_state as cs

    monkeypatch.setattr(cs, "_SYNC_CHECK", True)
    with pytest.raises(ValueError, match=r"label\[0\]>=2147483647"):
        lsm.forward(x, w, cupy.asarray([2**40] + [0] * 7), margin=2, beta=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inputs_unchanged_and_layouts(dtype) -> None:
    x, w, label, g = _gpu(*_case(15, 30, 5, 12, dtype))
    copies = [cupy.asnumpy(a) for a in (x, w, label, g)]
    want = _run(x, w, label, g, 3, 0.5)
    for a, c in zip((x, w, label, g), copies):
        _assert_bitwise(a, c)
    # Non-contiguous inputs and other label dtypes give the same bits.
    xt, wt, gt = (cupy.asfortranarray(_as_uint(a)).view(a.dtype) for a in (x, w, g))
    assert not xt.flags.c_contiguous
    for lab in (label.astype(cupy.int32), label.astype(cupy.uint8), label[::-1][::-1]):
        for a, b in zip(want, _run(xt, wt, lab, gt, 3, 0.5)):
            _assert_bitwise(a, b)


def test_errors_match_numpy_backend() -> None:
    x, w, label, g = _case(16, 4, 3, 2, np.float32)
    cases = [
        dict(x=x.astype(np.int32)),
        dict(w=w[:, :1]),
        dict(label=label[:2]),
        dict(label=label.astype(np.float32)),
        dict(margin=0),
        dict(margin=65),
        dict(beta=-1.0),
        dict(x=x.astype(np.float64)),
    ]
    for case in cases:
        args = dict(x=x, w=w, label=label, margin=2, beta=0.0) | case
        with pytest.raises((TypeError, ValueError)) as np_err:
            lsm.forward(args["x"], args["w"], args["label"], margin=args["margin"], beta=args["beta"])
        with pytest.raises(np_err.type) as cp_err:
            lsm.forward(*_gpu(args["x"], args["w"], args["label"]), margin=args["margin"], beta=args["beta"])
        # Same text, except the list of supported dtypes (CuPy also takes float16/bfloat16).
        assert str(cp_err.value).split(" (supported")[0] == str(np_err.value).split(" (supported")[0]
    with pytest.raises(TypeError, match="cupy.ndarray"):
        lsm.forward(cupy.asarray(x), w, cupy.asarray(label), margin=2, beta=0.0)


def test_empty_and_featureless() -> None:
    for dtype in DTYPES:
        x, w = _gpu(np.zeros((0, 3), dtype), np.ones((4, 3), dtype))
        assert lsm.forward(x, w, cupy.zeros(0, cupy.int64), margin=3, beta=0.0).shape == (0, 4)
        x, w, label, g = _gpu(
            np.zeros((3, 0), dtype), np.zeros((4, 0), dtype), np.array([0, 3, 3]), np.ones((3, 4), dtype)
        )
        # D = 0: cuBLAS is not called; CuPy fills the products with zeros itself.
        out, gx, gw = _run(x, w, label, g, 3, 0.0)
        assert not cupy.asnumpy(out).astype(np.float64).any() and gx.shape == (3, 0) and gw.shape == (4, 0)


def test_memory_stable_over_10000_calls() -> None:
    pool = cupy.get_default_memory_pool()
    x, w, label, g = _gpu(*_case(17, 64, 10, 16, np.float32))
    for i in range(12):  # every margin of the loop: their workspaces grow to size here
        _run(x, w, label, g, 2 + i % 3, 0.0)
    # Earlier tests' cyclic garbage holds pool memory until a collection, which would
    # otherwise happen inside the loop (the first GPU run saw used_bytes fall by 83 KiB).
    gc.collect()
    cupy.cuda.runtime.deviceSynchronize()
    used, total = pool.used_bytes(), pool.total_bytes()
    for i in range(10_000):
        out, gx, gw = _run(x, w, label, g, 2 + i % 3, 0.0)
        del out, gx, gw
    gc.collect()
    cupy.cuda.runtime.deviceSynchronize()
    assert pool.used_bytes() == used
    assert pool.total_bytes() <= total
