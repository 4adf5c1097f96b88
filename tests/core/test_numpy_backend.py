"""The NumPy backend against the float64 reference, finite differences and the maths'
properties, with each of its per-sample kernels: the NumPy code and, where Numba is
installed, the compiled loops (``lsoftmax_core.set_cpu_kernels``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lsoftmax_core as lsm

from support.reference import forward as ref_forward
from support.strategies import BETAS, MARGINS, problems
from support.tolerances import FD_TOL, assert_close, check_backward, check_forward, grad_scales

DTYPES = ["float64", "float32"]


@pytest.fixture(autouse=True, scope="module", params=["numpy", "numba"])
def cpu_kernels(request):
    """Every test of this module once per kernel choice (numba: skipped without Numba)."""
    if request.param == "numba":
        pytest.importorskip("numba")
    before = lsm.cpu_kernels()
    lsm.set_cpu_kernels(request.param)
    yield request.param
    lsm.set_cpu_kernels(before)


def _grad(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_forward_and_backward_match_reference(dtype, data) -> None:
    x, w, label, m, beta = data.draw(problems(dtype=np.dtype(dtype)))
    out = lsm.forward(x, w, label, margin=m, beta=beta)
    assert out.dtype == x.dtype and isinstance(out, np.ndarray)
    check_forward(out, x, w, label, margin=m, beta=beta, dtype=dtype)
    g = _grad(out.shape, dtype=x.dtype)
    grads = lsm.backward(g, x, w, label, margin=m, beta=beta)
    assert grads[0].dtype == grads[1].dtype == x.dtype
    check_backward(grads, g, x, w, label, margin=m, beta=beta, dtype=dtype)


def _finite_differences(x, w, label, g, m, beta, rel_h=1e-7):
    """Central differences of sum(g * forward), step relative to each row's norm.

    Perturbing x_i only changes logits row i, and w_j only column j: differencing just
    that part keeps the other rows' large terms out of the cancellation.
    """

    def fd(a, wrt_x):
        out = np.zeros_like(a)
        for idx in np.ndindex(*a.shape):
            r = idx[0]
            h = rel_h * max(1e-3, float(np.linalg.norm(a[r])))
            vals = []
            for step in (h, -h):
                b = a.copy()
                b[idx] += step
                f = lsm.forward(b, w, label, margin=m, beta=beta) if wrt_x else lsm.forward(x, b, label, margin=m, beta=beta)
                vals.append(float(g[r] @ f[r]) if wrt_x else float(g[:, r] @ f[:, r]))
            out[idx] = (vals[0] - vals[1]) / (2 * h)
        return out

    return fd(x, True), fd(w, False)


@given(problems(max_n=5, max_c=4, max_d=4, min_norm=0.5))
def test_gradients_match_central_finite_differences_float64(p) -> None:
    x, w, label, m, beta = p
    g = _grad((len(x), len(w)))
    gx, gw = lsm.backward(g, x, w, label, margin=m, beta=beta)
    fx, fw = _finite_differences(x, w, label, g, m, beta)
    sx, sw = grad_scales(g, x, w, m)
    # FD error is O(h^2 f''') + O(eps/h), but O(h) where theta sits on a boundary j*pi/m
    # (psi is C^1, not C^2 there): h ~ 1e-7 keeps both under the tight FD_TOL.
    assert_close(gx, fx, sx, FD_TOL, "grad_x vs FD")
    assert_close(gw, fw, sw, FD_TOL, "grad_w vs FD")


@given(problems(max_n=5, max_c=4, max_d=4, min_norm=0.5, dtype=np.float32))
def test_float32_gradients_close_to_float64(p) -> None:
    x32, w32, label, m, beta = p
    g32 = _grad((len(x32), len(w32)), dtype=np.float32)
    got = lsm.backward(g32, x32, w32, label, margin=m, beta=beta)
    want = lsm.backward(g32.astype(np.float64), x32.astype(np.float64), w32.astype(np.float64), label, margin=m, beta=beta)
    sx, sw = grad_scales(g32, x32, w32, m)
    assert_close(got[0], want[0], sx, 1e-5, "float32 grad_x")
    assert_close(got[1], want[1], sw, 1e-5, "float32 grad_w")


@given(problems(), BETAS)
def test_margin_one_is_exactly_the_linear_layer(p, beta) -> None:
    x, w, label, _, _ = p
    np.testing.assert_array_equal(lsm.forward(x, w, label, margin=1, beta=beta), x @ w.T)
    g = _grad((len(x), len(w)))
    gx, gw = lsm.backward(g, x, w, label, margin=1, beta=beta)
    np.testing.assert_array_equal(gx, g @ w)
    np.testing.assert_array_equal(gw, g.T @ x)


@given(problems(min_norm=0.1), st.floats(1e-3, 1e3))
def test_target_logit_is_positively_homogeneous_in_x(p, s) -> None:
    x, w, label, m, beta = p
    n = np.arange(len(x))
    f1 = lsm.forward(x, w, label, margin=m, beta=beta)[n, label]
    fs = lsm.forward(s * x, w, label, margin=m, beta=beta)[n, label]
    scale = np.linalg.norm(x, axis=1) * np.linalg.norm(w[label], axis=1) * (2 * m + 1)
    np.testing.assert_array_less(np.abs(fs - s * f1), 1e-12 * s * scale + 1e-300)


@given(MARGINS, BETAS, st.floats(0.5, 100.0), st.floats(0.5, 100.0))
def test_target_logit_continuous_across_interval_boundaries(m, beta, a, b) -> None:
    """theta exactly on, and a hair either side of, j*pi/m for every j (eq. 6's pieces meet)."""
    w = np.array([[b, 0.0]])
    for j in range(m + 1):
        t = j * math.pi / m
        thetas = np.array([t - 1e-7, t, t + 1e-7]).clip(0, math.pi)
        x = a * np.stack([np.cos(thetas), np.sin(thetas)], axis=1)
        f = lsm.forward(x, w, np.zeros(3, dtype=np.int64), margin=m, beta=beta)[:, 0]
        assert np.all(np.isfinite(f))
        # |df/dtheta| <= a*b*m^2*1e-7-ish around a boundary, where psi' = 0 anyway.
        assert np.ptp(f) <= a * b * (m * m + beta) * 2e-7 / (1 + beta) + 1e-12 * a * b
        check_forward(f[:, None], x, w, np.zeros(3, dtype=np.int64), margin=m, beta=beta, dtype="float64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 16])
def test_nasty_cases(dtype, m) -> None:
    """|cos| = 1, cos = 0, zero-norm rows of x and of w_y, one sample, one class."""
    f = np.dtype(dtype)
    w = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 2.0]], dtype=f)
    x = np.array(
        [[6.0, 8.0, 0.0],  # cos = 1 with w_0
         [-1.5, -2.0, 0.0],  # cos = -1 with w_0
         [4.0, -3.0, 5.0],  # cos = 0 with w_0
         [0.0, 0.0, 0.0],  # zero x
         [1.0, 2.0, 3.0]],  # zero w_y (class 1)
        dtype=f,
    )
    label = np.array([0, 0, 0, 2, 1])
    beta = 0.5
    out = lsm.forward(x, w, label, margin=m, beta=beta)
    check_forward(out, x, w, label, margin=m, beta=beta, dtype=dtype)
    assert out[0, 0] == pytest.approx(50.0, rel=1e-6)  # theta = 0: psi = 1
    assert out[3, 2] == 0.0 and out[4, 1] == 0.0  # zero-norm convention: target 0
    g = np.ones_like(out)
    gx, gw = lsm.backward(g, x, w, label, margin=m, beta=beta)
    check_backward((gx, gw), g, x, w, label, margin=m, beta=beta, dtype=dtype)
    # Zero-norm convention: no angle, so the plain linear gradients (as for margin 1).
    np.testing.assert_allclose(gx[3], g[3] @ w, rtol=1e-6)
    np.testing.assert_allclose(gx[4], g[4] @ w, rtol=1e-6)
    # One sample, one class.
    one = lsm.forward(x[:1], w[:1], label[:1], margin=m, beta=beta)
    assert one.shape == (1, 1) and one[0, 0] == pytest.approx(50.0, rel=1e-6)
    gx1, gw1 = lsm.backward(np.ones((1, 1), f), x[:1], w[:1], label[:1], margin=m, beta=beta)
    assert gx1.shape == (1, 3) and gw1.shape == (1, 3)


@pytest.mark.parametrize("dtype,big,small", [("float64", 1e150, 1e-150), ("float32", 1e18, 1e-18)])
@pytest.mark.parametrize("m", [2, 4])
def test_huge_and_tiny_norms(dtype, big, small, m) -> None:
    f = np.dtype(dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5)).astype(f)
    w = rng.standard_normal((4, 5)).astype(f)
    x[:3] *= f.type(big)
    w[:2] *= f.type(small)  # big * small ~ 1: logits representable
    x[3:] *= f.type(small)
    w[2:] *= f.type(big)
    label = np.array([0, 1, 3, 2, 3, 0])
    out = lsm.forward(x, w, label, margin=m, beta=1.0)
    n = np.arange(6)
    ref = ref_forward(x, w, label, margin=m, beta=1.0)
    # Only the target logits have representable magnitude for every pair here.
    scale = np.linalg.norm(x.astype(float), axis=1) * np.linalg.norm(w[label].astype(float), axis=1) * (1 + m * m)
    assert np.all(np.abs(out[n, label] - ref[n, label]) <= 1e-6 * scale)
    g = np.ones_like(out)
    gx, gw = lsm.backward(g, x, w, label, margin=m, beta=1.0)
    assert not np.isnan(gx).any() and not np.isnan(gw).any()


@pytest.mark.parametrize("m", [2, 3, 4])
def test_overflowing_logits_give_inf_never_nan(m) -> None:
    f = np.float32
    x = np.array([[3e19, 1e19], [-3e19, 2e19]], dtype=f)
    w = np.array([[3e19, -1e19], [1e19, 1e19]], dtype=f)
    label = np.array([0, 1])
    with np.errstate(over="ignore"):
        out = lsm.forward(x, w, label, margin=m, beta=0.0)
        gx, gw = lsm.backward(np.ones_like(out), x, w, label, margin=m, beta=0.0)
    assert not np.isnan(out).any() and not np.isnan(gx).any() and not np.isnan(gw).any()


@given(problems())
def test_inputs_are_not_modified_and_read_only_inputs_work(p) -> None:
    x, w, label, m, beta = p
    g = _grad((len(x), len(w)))
    copies = [a.copy() for a in (x, w, label, g)]
    for a in (x, w, label, g):
        a.flags.writeable = False
    lsm.forward(x, w, label, margin=m, beta=beta)
    lsm.backward(g, x, w, label, margin=m, beta=beta)
    for a, c in zip((x, w, label, g), copies):
        np.testing.assert_array_equal(a, c)


def test_non_contiguous_inputs_and_label_dtypes() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((11, 10))[:, ::2]  # (11, 5), column stride 2
    w = rng.standard_normal((5, 8)).T[::2, :5]  # (4, 5), transposed and row-strided
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    label = np.array([0, 3, 1, 2, 2, 0, 1, 3, 3, 0, 1], dtype=np.uint8)
    expect = lsm.forward(np.ascontiguousarray(x), np.ascontiguousarray(w), label.astype(np.int64), margin=3, beta=2.0)
    for lab in (label, label.astype(np.int32), label.astype(np.int16)[::-1][::-1]):
        # Strided rows may be summed in another SIMD order than contiguous ones: a few ulp.
        np.testing.assert_allclose(lsm.forward(x, w, lab, margin=3, beta=2.0), expect, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batch_returns_empty_results(dtype) -> None:
    f = np.dtype(dtype)
    x, w, label = np.zeros((0, 3), f), np.ones((4, 3), f), np.zeros(0, np.int64)
    out = lsm.forward(x, w, label, margin=2, beta=0.0)
    assert out.shape == (0, 4) and out.dtype == f
    gx, gw = lsm.backward(np.zeros((0, 4), f), x, w, label, margin=2, beta=0.0)
    assert gx.shape == (0, 3) and gw.shape == (4, 3)
    np.testing.assert_array_equal(gw, 0.0)


def test_odd_shape_252x507x123() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((252, 123)).astype(np.float32)
    w = rng.standard_normal((507, 123)).astype(np.float32)
    label = rng.integers(0, 507, 252)
    out = lsm.forward(x, w, label, margin=4, beta=3.0)
    check_forward(out, x, w, label, margin=4, beta=3.0, dtype="float32")
    g = rng.standard_normal(out.shape).astype(np.float32)
    check_backward(lsm.backward(g, x, w, label, margin=4, beta=3.0), g, x, w, label, margin=4, beta=3.0, dtype="float32")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [1, 2, 16, 17, 40])
def test_row_updates_give_the_same_bits_in_blocks_and_in_scaled_rows(cpu_kernels, monkeypatch, dtype, d) -> None:
    """The NumPy code adds q_i and r_i either as (2, N, D) blocks (few features) or as rows
    scaled by per-row coefficients: both forms, forced in turn, give the same bits (careful
    rows included: a zero row, a norm whose square overflows float32), and the result is
    the reference's."""
    if cpu_kernels == "numba":
        pytest.skip("the two forms of the NumPy code's row updates")
    from lsoftmax_core import _numpy_backend as nb

    rng = np.random.default_rng(d)
    x = rng.standard_normal((40, d)) * 10.0 ** rng.uniform(-2, 2, (40, 1))
    w = rng.standard_normal((7, d)) * 10.0 ** rng.uniform(-2, 2, (7, 1))
    x[3] = 0.0
    w[5] *= 1e25 if dtype == "float32" else 1.0
    x, w = x.astype(dtype), w.astype(dtype)
    label = rng.integers(0, 7, 40)
    label[:3] = 5
    g = _grad((40, 7), seed=d, dtype=x.dtype)
    got = []
    for limit in (0, 1 << 30):
        monkeypatch.setattr(nb, "_STACKED_D", limit)
        got.append(lsm.backward(g, x, w, label, margin=3, beta=1.5))
    for a, b in zip(*got):
        assert a.tobytes() == b.tobytes()
    check_backward(got[0], g, x, w, label, margin=3, beta=1.5, dtype=dtype)


def test_backward_is_deterministic_with_repeated_labels() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 16))
    w = rng.standard_normal((3, 16))
    label = rng.integers(0, 3, 300)
    g = rng.standard_normal((300, 3))
    a = lsm.backward(g, x, w, label, margin=4, beta=0.0)
    b = lsm.backward(g, x, w, label, margin=4, beta=0.0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@given(problems())
def test_add_margin_on_plain_results_equals_forward_and_backward(p) -> None:
    x, w, label, m, beta = p
    g = _grad((len(x), len(w)))
    logits = x @ w.T
    assert lsm.add_margin(logits, x, w, label, margin=m, beta=beta) is logits
    np.testing.assert_array_equal(logits, lsm.forward(x, w, label, margin=m, beta=beta))
    gx, gw = g @ w, g.T @ x
    out = lsm.add_margin_grad(gx, gw, g, x, w, label, margin=m, beta=beta)
    assert out[0] is gx and out[1] is gw
    want = lsm.backward(g, x, w, label, margin=m, beta=beta)
    np.testing.assert_array_equal(gx, want[0])
    np.testing.assert_array_equal(gw, want[1])


@given(problems())
def test_out_arguments_give_the_same_bits(p) -> None:
    x, w, label, m, beta = p
    g = _grad((len(x), len(w)), dtype=x.dtype)
    logits = np.full((len(x), len(w)), np.nan, dtype=x.dtype)
    assert lsm.forward(x, w, label, margin=m, beta=beta, out=logits) is logits
    np.testing.assert_array_equal(logits, lsm.forward(x, w, label, margin=m, beta=beta))
    # Outputs with other layouts (Fortran order, a strided view) work too.
    gx = np.full((x.shape[1], len(x)), np.nan, dtype=x.dtype).T
    gw = np.full((len(w), 2 * x.shape[1]), np.nan, dtype=x.dtype)[:, ::2]
    got = lsm.backward(g, x, w, label, margin=m, beta=beta, out=(gx, gw))
    assert got[0] is gx and got[1] is gw
    want = lsm.backward(g, x, w, label, margin=m, beta=beta)
    np.testing.assert_allclose(gx, want[0], rtol=1e-12 if x.dtype == np.float64 else 1e-5, atol=0)
    np.testing.assert_allclose(gw, want[1], rtol=1e-12 if x.dtype == np.float64 else 1e-5, atol=0)
    check_backward([gx, gw], g, x, w, label, margin=m, beta=beta, dtype=x.dtype.name)


def test_out_arguments_are_checked_before_they_are_written() -> None:
    x, w, label = np.ones((3, 4)), np.ones((5, 4)), np.array([0, 1, 4])
    g = np.ones((3, 5))
    out = np.full((3, 5), 7.0)
    with pytest.raises(ValueError, match=r"label must lie in \[0, C\) = \[0, 5\): label\[1\]=9"):
        lsm.forward(x, w, np.array([0, 9, 4]), out=out)
    with pytest.raises(ValueError, match=r"margin=0 must be an integer"):
        lsm.forward(x, w, label, margin=0, out=out)
    assert np.all(out == 7.0)  # untouched
    with pytest.raises(ValueError, match=r"out must have shape \(3, 5\), got out.shape=\(5, 3\)"):
        lsm.forward(x, w, label, out=np.empty((5, 3)))
    with pytest.raises(TypeError, match=r"out.dtype=float32 must equal x.dtype=float64"):
        lsm.forward(x, w, label, out=np.empty((3, 5), np.float32))
    ro = np.empty((3, 5))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"out must be writeable"):
        lsm.forward(x, w, label, out=ro)
    sq = np.ones((3, 3))
    with pytest.raises(ValueError, match=r"out must not share memory with the inputs"):
        lsm.forward(sq, np.ones((3, 3)), np.array([0, 1, 2]), out=sq)
    with pytest.raises(TypeError, match=r"out must be a numpy.ndarray like x, got builtins.list"):
        lsm.forward(x, w, label, out=[[0.0] * 5] * 3)
    with pytest.raises(TypeError, match=r"out must be a pair \(grad_x, grad_w\) of arrays, got ndarray"):
        lsm.backward(g, x, w, label, out=np.empty((3, 4)))
    gx, gw = np.full((3, 4), 7.0), np.full((5, 4), 7.0)
    with pytest.raises(ValueError, match=r"label must lie in"):
        lsm.backward(g, x, w, np.array([0, -1, 4]), out=(gx, gw))
    assert np.all(gx == 7.0) and np.all(gw == 7.0)
    with pytest.raises(ValueError, match=r"out\[1\] must have shape \(5, 4\)"):
        lsm.backward(g, x, w, label, out=(gx, np.empty((4, 5))))
    with pytest.raises(ValueError, match=r"out\[1\] must not share memory with the inputs"):
        lsm.backward(g, x, w, label, out=(gx, np.lib.stride_tricks.as_strided(gx, (5, 4), (0, 8))))


def test_add_margin_rejects_bad_outputs() -> None:
    x, w, label = np.ones((3, 4)), np.ones((5, 4)), np.array([0, 1, 4])
    ro = x @ w.T
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"logits must be writeable"):
        lsm.add_margin(ro, x, w, label)
    with pytest.raises(ValueError, match=r"logits must have shape \(3, 5\), got logits.shape=\(5, 3\)"):
        lsm.add_margin(w @ x.T, x, w, label)
    with pytest.raises(TypeError, match=r"logits.dtype=float32 must equal x.dtype=float64"):
        lsm.add_margin((x @ w.T).astype(np.float32), x, w, label)
    square_x = np.ones((3, 3))
    with pytest.raises(ValueError, match=r"logits must not share memory with the inputs"):
        lsm.add_margin(square_x, square_x, np.ones((3, 3)), np.array([0, 1, 2]))
    g = np.ones((3, 5))
    with pytest.raises(ValueError, match=r"grad_w must have shape \(5, 4\)"):
        lsm.add_margin_grad(g @ w, np.ones((4, 5)), g, x, w, label)
    with pytest.raises(TypeError, match=r"grad_x must be a numpy.ndarray"):
        lsm.add_margin_grad([[0.0]], g.T @ x, g, x, w, label)


# --------------------------------------------------------------------------- hostile inputs


@pytest.mark.parametrize("m", [1, 2, 3, 4, 6])
def test_a_norm_beyond_float64_still_gives_the_finite_target_logit(m) -> None:
    # |w| = 1.8e308 overflows float64, |x||w|psi does not: the target logit is finite.
    x, w, label = np.array([[1e-10, 0.0]]), np.array([[1.5e308, 1e308]]), np.array([0])
    out = lsm.forward(x, w, label, margin=m, beta=0.5)
    # The target logit is invariant under x -> 2^529 x, w -> 2^-529 w (exact in binary; the
    # reference can then square both norms).
    expected = ref_forward(x * 2.0**529, w * 2.0**-529, label, margin=m, beta=0.5)
    assert np.isfinite(out).all()
    assert out[0, 0] == pytest.approx(expected[0, 0], rel=1e-13)
    if m == 2:  # the figure the issue gave: beta 0, about 6.9e297
        assert lsm.forward(x, w, label, margin=2)[0, 0] == pytest.approx(6.9337524528e297, rel=1e-10)


def test_a_norm_beyond_float64_gives_no_nan_in_the_gradients() -> None:
    x, w, label = np.array([[1e-10, 0.0]]), np.array([[1.5e308, 1e308]]), np.array([0])
    with np.errstate(over="ignore"):
        gx, gw = lsm.backward(np.ones((1, 1)), x, w, label, margin=2, beta=0.0)
    # Scaled copy: grad_x scales by 2^529, grad_w by 2^-529 (the plain terms too).
    sx, sw = lsm.backward(np.ones((1, 1)), x * 2.0**529, w * 2.0**-529, label, margin=2, beta=0.0)
    assert not np.isnan(gx).any() and not np.isnan(gw).any()
    assert gx[0, 0] == pytest.approx(sx[0, 0] * 2.0**529, rel=1e-13)  # 6.9e307: finite
    assert gx[0, 1] == np.inf  # the true value, about -(psi - c psi')... beyond float64
    np.testing.assert_allclose(gw, sw * 2.0**-529, rtol=1e-13)


@pytest.mark.parametrize("call", ["forward", "backward", "add_margin", "add_margin_grad"])
def test_an_output_sharing_memory_with_label_is_refused_before_writing(call) -> None:
    x, w = np.ones((2, 2)), np.eye(2)
    out = np.zeros((2, 2))
    label = out.view(np.int64)[0]  # the labels live in out's first row
    before = out.copy()
    g = np.ones((2, 2))
    calls = {
        "forward": lambda: lsm.forward(x, w, label, margin=2, out=out),
        "backward": lambda: lsm.backward(g, x, w, label, margin=2, out=(out, np.zeros((2, 2)))),
        "add_margin": lambda: lsm.add_margin(out, x, w, label, margin=2),
        "add_margin_grad": lambda: lsm.add_margin_grad(out, np.zeros((2, 2)), g, x, w, label, margin=2),
    }
    with pytest.raises(ValueError, match=r"must not share memory with the inputs"):
        calls[call]()
    assert np.array_equal(out, before, equal_nan=True)


def test_check_arguments_reports_what_forward_would_and_computes_nothing() -> None:
    x, w, label = np.ones((3, 4)), np.ones((5, 4)), np.array([0, 1, 4])
    p = lsm.check_arguments(x, w, label, margin=3, beta=0.5)
    assert (p.n, p.c, p.d, p.dtype, p.margin, p.beta) == (3, 5, 4, np.dtype(np.float64), 3, 0.5)
    with pytest.raises(ValueError, match=r"label must lie in \[0, C\) = \[0, 5\): label\[2\]=5"):
        lsm.check_arguments(x, w, np.array([0, 1, 5]))
    with pytest.raises(ValueError, match=r"grad_logits must have shape \(N, C\) = \(3, 5\)"):
        lsm.check_arguments(x, w, label, grad_logits=np.ones((5, 3)))


def test_checked_skips_the_checks_only_for_the_arrays_it_was_made_for() -> None:
    rng = np.random.default_rng(0)
    x, w, label = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), np.array([0, 4, 2, 2])
    g = rng.standard_normal((4, 5))
    p = lsm.check_arguments(x, w, label, margin=3, beta=1.0)
    logits = lsm.add_margin(x @ w.T, x, w, label, margin=3, beta=1.0, checked=p)
    assert np.array_equal(logits, lsm.forward(x, w, label, margin=3, beta=1.0))
    pg = lsm.check_arguments(x, w, label, margin=3, beta=1.0, grad_logits=g)
    gx, gw = lsm.add_margin_grad(g @ w, g.T @ x, g, x, w, label, margin=3, beta=1.0, checked=pg)
    ex, ew = lsm.backward(g, x, w, label, margin=3, beta=1.0)
    assert np.array_equal(gx, ex) and np.array_equal(gw, ew)
    with pytest.raises(ValueError, match=r"checked= must be lsoftmax_core.check_arguments\(\)'s result"):
        lsm.add_margin(x @ w.T, x, w, label.copy(), margin=3, beta=1.0, checked=p)
    with pytest.raises(ValueError, match=r"checked= was made for margin=3, beta=1.0, not margin=2"):
        lsm.add_margin(x @ w.T, x, w, label, margin=2, beta=1.0, checked=p)
    with pytest.raises(ValueError, match=r"checked= must be"):
        lsm.add_margin_grad(g @ w, g.T @ x, g, x, w, label, margin=3, beta=1.0, checked=p)  # no grad_logits


def test_with_grad_logits_extends_a_forward_check_to_the_backward_of_the_same_arrays() -> None:
    """Problem.with_grad_logits checks only grad_logits (shape, dtype), names it when it is
    wrong, and gives add_margin_grad a problem for exactly these arrays."""
    rng = np.random.default_rng(1)
    x, w, label = rng.standard_normal((4, 3)), rng.standard_normal((5, 3)), np.array([0, 4, 2, 2])
    g = rng.standard_normal((4, 5))
    p = lsm.check_arguments(x, w, label, margin=3, beta=1.0)
    pg = p.with_grad_logits(g)
    assert pg == lsm.check_arguments(x, w, label, margin=3, beta=1.0, grad_logits=g)
    gx, gw = lsm.add_margin_grad(g @ w, g.T @ x, g, x, w, label, margin=3, beta=1.0, checked=pg)
    ex, ew = lsm.backward(g, x, w, label, margin=3, beta=1.0)
    assert np.array_equal(gx, ex) and np.array_equal(gw, ew)
    with pytest.raises(ValueError, match=r"grad_logits must have shape \(N, C\) = \(4, 5\), got grad_logits.shape=\(5, 4\)"):
        p.with_grad_logits(g.T)
    with pytest.raises(TypeError, match=r"grad_logits.dtype=float32 must equal x.dtype=float64"):
        p.with_grad_logits(g.astype(np.float32))
    with pytest.raises(ValueError, match=r"with_grad_logits needs the problem check_arguments\(\) returned without"):
        pg.with_grad_logits(g)
    with pytest.raises(ValueError, match=r"checked= must be"):  # made for g, not for a copy of it
        lsm.add_margin_grad(g @ w, g.T @ x, g.copy(), x, w, label, margin=3, beta=1.0, checked=pg)


def test_label_values_false_checks_shapes_and_dtypes_but_does_not_scan_the_labels() -> None:
    """check_arguments(label_values=False): for a caller that scanned these labels already
    (no adapter of this package needs it since Problem.with_grad_logits)."""
    x, w = np.ones((3, 4)), np.ones((5, 4))
    p = lsm.check_arguments(x, w, np.array([0, 9, 4]), margin=3, beta=0.5, label_values=False)  # 9: not scanned
    assert (p.n, p.c, p.d, p.margin, p.beta) == (3, 5, 4, 3, 0.5)
    with pytest.raises(ValueError, match=r"label must lie in \[0, C\) = \[0, 5\): label\[1\]=9"):
        lsm.check_arguments(x, w, np.array([0, 9, 4]), margin=3, beta=0.5)
    with pytest.raises(ValueError, match=r"label must have shape \(N,\) = \(3,\)"):
        lsm.check_arguments(x, w, np.array([0, 1]), label_values=False)
    with pytest.raises(TypeError, match=r"label must have an integer dtype"):
        lsm.check_arguments(x, w, np.array([0.0, 1.0, 2.0]), label_values=False)


@pytest.mark.parametrize("bad", [-1, 5, 2**40])
def test_an_unscanned_problem_never_lets_a_bad_label_index_the_margin_step(bad) -> None:
    """check_arguments(label_values=False) skips the scan, but add_margin / add_margin_grad
    then scan the labels before indexing: label -1 is not class C-1, and label C is a named
    ValueError, not an internal IndexError; nothing is written."""
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    label = np.array([0, bad, 4])
    g = rng.standard_normal((3, 5))
    p = lsm.check_arguments(x, w, label, margin=3, label_values=False)
    logits = x @ w.T
    before = logits.copy()
    with pytest.raises(ValueError, match=rf"label must lie in \[0, C\) = \[0, 5\): label\[1\]={bad}"):
        lsm.add_margin(logits, x, w, label, margin=3, checked=p)
    assert np.array_equal(logits, before)
    gx, gw = g @ w, g.T @ x
    gx0, gw0 = gx.copy(), gw.copy()
    pg = p.with_grad_logits(g)
    with pytest.raises(ValueError, match=rf"label\[1\]={bad}"):
        lsm.add_margin_grad(gx, gw, g, x, w, label, margin=3, checked=pg)
    assert np.array_equal(gx, gx0) and np.array_equal(gw, gw0)


@pytest.mark.parametrize("bad", [None, [[1.0] * 5] * 4, "abc", 3.0])
def test_with_grad_logits_names_grad_logits_when_it_is_not_an_array(bad) -> None:
    x, w, label = np.ones((4, 3)), np.ones((5, 3)), np.array([0, 4, 2, 2])
    p = lsm.check_arguments(x, w, label, margin=3)
    with pytest.raises(TypeError, match=r"grad_logits must be an \(N, C\) = \(4, 5\) array of dtype float64, got"):
        p.with_grad_logits(bad)
