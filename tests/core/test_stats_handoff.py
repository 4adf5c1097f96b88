"""The forward's per-sample statistics handed to the backward (``return_stats`` / ``stats``),
and the NumPy backend's faster per-sample maths against the reference it replaces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lsoftmax_core as lsm
from lsoftmax_core import _numpy_backend as nb
from lsoftmax_core._chebyshev import MAX_MARGIN, psi_and_derivative, thresholds
from lsoftmax_core._class_sums import add_per_class

from support.strategies import problems
from support.tolerances import check_backward

DTYPES = ["float64", "float32"]


def _same_bits(a, b) -> None:
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert np.array_equal(u.view(np.uint8), v.view(np.uint8))


def _nasty(dtype):
    """Zero rows of x and of w_y, |cos| = 1, cos = 0, huge and tiny norms: the careful path."""
    f = np.dtype(dtype)
    big, small = (1e150, 1e-150) if f == np.float64 else (1e18, 1e-18)
    w = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 2.0], [2.0, 1.0, 1.0]], dtype=f)
    x = np.array([[6.0, 8.0, 0.0], [-1.5, -2.0, 0.0], [4.0, -3.0, 5.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0],
                  [1.0, 1.0, 1.0], [1.0, -1.0, 2.0]], dtype=f)
    x[5] *= f.type(big)
    x[6] *= f.type(small)
    label = np.array([0, 0, 0, 2, 1, 3, 2])
    return x, w, label


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_backward_with_the_forwards_stats_gives_the_same_bits(dtype, data) -> None:
    x, w, label, m, beta = data.draw(problems(dtype=np.dtype(dtype)))
    g = np.random.default_rng(0).standard_normal((len(x), len(w))).astype(dtype)
    logits, stats = lsm.forward(x, w, label, margin=m, beta=beta, return_stats=True)
    _same_bits([logits], [lsm.forward(x, w, label, margin=m, beta=beta)])
    assert stats.shape == (lsm.STATS_ROWS, len(x)) and stats.dtype == np.float64
    want = lsm.backward(g, x, w, label, margin=m, beta=beta)
    _same_bits(lsm.backward(g, x, w, label, margin=m, beta=beta, stats=stats), want)
    # Statistics do not depend on beta: one forward serves a backward at another beta.
    _same_bits(lsm.backward(g, x, w, label, margin=m, beta=beta + 1.0, stats=stats),
               lsm.backward(g, x, w, label, margin=m, beta=beta + 1.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 4, 6])
def test_stats_of_zero_norm_and_extreme_rows_give_the_same_bits(dtype, m) -> None:
    x, w, label = _nasty(dtype)
    g = np.random.default_rng(1).standard_normal((len(x), len(w))).astype(dtype)
    _, stats = lsm.forward(x, w, label, margin=m, beta=0.5, return_stats=True)
    got = lsm.backward(g, x, w, label, margin=m, beta=0.5, stats=stats)
    _same_bits(got, lsm.backward(g, x, w, label, margin=m, beta=0.5))
    assert not any(np.isnan(a).any() for a in got)


@given(problems())
def test_add_margin_hands_its_stats_to_add_margin_grad(p) -> None:
    x, w, label, m, beta = p
    g = np.random.default_rng(2).standard_normal((len(x), len(w)))
    logits, stats = lsm.add_margin(x @ w.T, x, w, label, margin=m, beta=beta, return_stats=True)
    _same_bits([logits], [lsm.forward(x, w, label, margin=m, beta=beta)])
    gx, gw = lsm.add_margin_grad(g @ w, g.T @ x, g, x, w, label, margin=m, beta=beta, stats=stats)
    _same_bits([gx, gw], lsm.backward(g, x, w, label, margin=m, beta=beta))


def test_stats_and_inputs_are_not_modified_by_the_backward() -> None:
    rng = np.random.default_rng(3)
    x, w, label = rng.standard_normal((40, 5)), rng.standard_normal((6, 5)), rng.integers(0, 6, 40)
    g = rng.standard_normal((40, 6))
    _, stats = lsm.forward(x, w, label, margin=4, beta=1.0, return_stats=True)
    arrays = (x, w, label, g, stats)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False  # a write would raise
    grads = lsm.backward(g, x, w, label, margin=4, beta=1.0, stats=stats)
    check_backward(grads, g, x, w, label, margin=4, beta=1.0, dtype="float64")
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize(
    "bad,exc,pattern",
    [
        ([[0.0] * 3] * 6, TypeError, r"stats must be the numpy\.ndarray .* got builtins\.list"),
        (np.zeros((8, 2)), ValueError, r"stats must be forward's \(STATS_ROWS, N\) = \(8, 3\) float64 .*shape=\(8, 2\)"),
        (np.zeros((8, 3), np.float32), ValueError, r"stats\.dtype=float32"),
        (np.zeros((6, 3)), ValueError, r"stats\.shape=\(6, 3\)"),
        (np.zeros((3, 6)), ValueError, r"stats\.shape=\(3, 6\)"),
    ],
)
def test_bad_stats_are_named_and_refused_before_anything_is_written(bad, exc, pattern) -> None:
    x, w, label = np.ones((3, 2)), np.ones((4, 2)), np.array([0, 1, 3])
    g = np.ones((3, 4))
    out = (np.full((3, 2), 7.0), np.full((4, 2), 7.0))
    with pytest.raises(exc, match=pattern):
        lsm.backward(g, x, w, label, margin=2, out=out, stats=bad)
    assert (out[0] == 7.0).all() and (out[1] == 7.0).all()
    gx, gw = g @ w, g.T @ x
    with pytest.raises(exc, match=pattern):
        lsm.add_margin_grad(gx, gw, g, x, w, label, margin=2, stats=bad)
    np.testing.assert_array_equal(gx, g @ w)


def test_stats_of_another_margin_are_refused() -> None:
    x, w, label = np.ones((3, 2)), np.eye(2), np.array([0, 1, 1])
    _, stats = lsm.forward(x, w, label, margin=3, return_stats=True)
    with pytest.raises(ValueError, match=r"stats were computed for margin=3, not margin=4"):
        lsm.backward(np.ones((3, 2)), x, w, label, margin=4, stats=stats)


def _stale_case(dtype=np.float64):
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((9, 4)).astype(dtype), rng.standard_normal((6, 4)).astype(dtype)
    label = rng.integers(0, 6, 9)
    return x, w, label, rng.standard_normal((9, 6)).astype(dtype)


@pytest.mark.parametrize("kernels", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "change",
    ["w_step_in_place", "x_in_place", "another_batch", "one_bit_of_w", "swapped_features", "label_in_place"],
)
def test_stale_stats_are_refused_before_anything_is_written(change, dtype, kernels, monkeypatch) -> None:
    """Statistics of other data (another batch, or x or w changed in place since the forward)
    are a ValueError naming stats, not a wrong gradient; out and grad_x/grad_w are untouched."""
    if kernels == "numba":
        pytest.importorskip("numba")
    prev = lsm.cpu_kernels()
    lsm.set_cpu_kernels(kernels)
    dtype = np.dtype(dtype).type
    try:
        x, w, label, g = _stale_case(dtype)
        _, stats = lsm.forward(x, w, label, margin=4, return_stats=True)
        if change == "w_step_in_place":
            w -= dtype(0.1) * (g.T @ x)
        elif change == "x_in_place":
            x *= dtype(1.5)
        elif change == "another_batch":
            x, w, label, g = _stale_case(dtype)
            x = x[::-1].copy()
        elif change == "one_bit_of_w":
            bits = np.uint32 if dtype == np.float32 else np.uint64
            w.view(bits)[label[3], 2] ^= bits(1)
        elif change == "swapped_features":
            x[:, [0, 1]] = x[:, [1, 0]]
        else:
            label[[0, 1]] = (label[0] + 1) % 6, (label[1] + 2) % 6
        out = (np.full((9, 4), 7, dtype), np.full((6, 4), 7, dtype))
        with pytest.raises(ValueError, match=r"stats were computed from other values of (x|w\[label\]) than these"):
            lsm.backward(g, x, w, label, margin=4, out=out, stats=stats)
        assert (out[0] == 7).all() and (out[1] == 7).all()
        gx, gw = g @ w, g.T @ x
        with pytest.raises(ValueError, match=r"stats were computed from other values"):
            lsm.add_margin_grad(gx, gw, g, x, w, label, margin=4, stats=stats)
        np.testing.assert_array_equal(gx, g @ w)
        np.testing.assert_array_equal(gw, g.T @ x)
    finally:
        lsm.set_cpu_kernels(prev)


def test_stats_are_accepted_for_a_copy_of_the_same_values() -> None:
    """The fingerprints are exact integer sums of the bits: a copy of the same values, in
    another memory layout, is the same data."""
    x, w, label, g = _stale_case()
    _, stats = lsm.forward(x, w, label, margin=3, return_stats=True)
    want = lsm.backward(g, x, w, label, margin=3)
    xf, wf = np.asfortranarray(x), np.asfortranarray(w)
    _same_bits(lsm.backward(g, xf, wf, label.copy(), margin=3, stats=stats.copy()), want)


def test_empty_batch_and_margin_one_have_stats_too() -> None:
    x, w, label = np.zeros((0, 3)), np.ones((4, 3)), np.zeros(0, np.int64)
    logits, stats = lsm.forward(x, w, label, margin=2, return_stats=True)
    assert logits.shape == (0, 4) and stats.shape == (lsm.STATS_ROWS, 0)
    gx, gw = lsm.backward(np.zeros((0, 4)), x, w, label, margin=2, stats=stats)
    assert gx.shape == (0, 3) and not gw.any()
    x1 = np.arange(6.0).reshape(2, 3)
    logits, stats = lsm.forward(x1, w, np.array([0, 3]), margin=1, return_stats=True)
    np.testing.assert_array_equal(logits, x1 @ w.T)
    _same_bits(lsm.backward(np.ones((2, 4)), x1, w, np.array([0, 3]), margin=1, stats=stats),
               [np.ones((2, 4)) @ w, np.ones((2, 4)).T @ x1])


@pytest.mark.parametrize("m", range(1, MAX_MARGIN + 1))
def test_fast_psi_has_the_bits_of_the_reference_recurrences(m) -> None:
    """The backend's psi (binary search for k, stacked recurrences) against _chebyshev's,
    at every interval boundary, its neighbours, ±1, 0, NaN and a dense grid."""
    t = np.array(thresholds(m))
    c = np.concatenate([np.linspace(-1.0, 1.0, 20001), t, np.nextafter(t, 2.0), np.nextafter(t, -2.0),
                        [-1.0, 0.0, 1.0, -0.0, np.nan]])
    want_psi, want_dpsi = psi_and_derivative(c, m)
    got = np.empty((2, c.size))
    nb._psi_and_derivative(c, m, got)
    assert np.array_equal(got[0], want_psi, equal_nan=True)
    assert np.array_equal(got[1], want_dpsi, equal_nan=True)


@pytest.mark.parametrize("n,d,c", [(256, 2, 10), (50, 8, 3), (300, 9, 5), (40, 16, 100), (7, 3, 1), (16, 12, 5000)])
def test_per_class_sums_are_the_float64_sums_and_repeatable(n, d, c) -> None:
    """Both ways of summing the r_i per class (one bincount for small heads, a stable sort
    otherwise: every class repeated, some, or none as at 16x12x5000) give each class's sum of
    its rows, the same bits on every run."""
    rng = np.random.default_rng(n + d + c)
    label = rng.integers(0, c, n)
    rows = rng.standard_normal((n, d)).astype(np.float32)
    start = rng.standard_normal((c, d)).astype(np.float32)
    want = start.astype(np.float64)
    np.add.at(want, label, rows.astype(np.float64))
    got = [start.copy() for _ in range(2)]
    for gw in got:
        add_per_class(gw, label, rows.copy())  # rows is its scratch
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5 * np.abs(rows).sum())
    _same_bits([got[0]], [got[1]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "n,d,c,crowd",
    [(256, 256, 100, 0), (300, 16, 3, 0), (60, 12, 40, 50), (40, 1, 500, 30), (40, 2, 500, 3), (9, 9, 2, 0)],
)
def test_per_class_sums_of_the_sort_path_run_exactly_in_sample_order(n, d, c, crowd, dtype) -> None:
    """Where the sums are formed in the input dtype (the sort path: more than 8 features,
    or C > 4N), each class's rows are added strictly in sample order, ((r_0 + r_1) + r_2)
    + ..., and the total once to grad_w: the same bits as that loop, whether the sums run
    rank by rank (many short classes) or class by class (few long ones, ``crowd`` samples of
    class 0), -0.0 rows included."""
    rng = np.random.default_rng(n * d + c)
    label = rng.integers(0, c, n)
    label[rng.permutation(n)[:crowd]] = 0
    rows = (rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-3, 3, (n, 1))).astype(dtype)
    rows[::7] = -0.0
    start = rng.standard_normal((c, d)).astype(dtype)
    start[0] = -0.0
    want = start.copy()
    for j in np.unique(label):
        mine = np.flatnonzero(label == j)
        total = rows[mine[0]].copy()
        for i in mine[1:]:
            total += rows[i]
        want[j] += total
    got = start.copy()
    add_per_class(got, label, rows.copy())
    assert got.tobytes() == want.tobytes()


@pytest.mark.parametrize("chunking", ["rows", "classes"])
def test_fused_loss_computes_the_statistics_once_per_call(monkeypatch, chunking) -> None:
    """The target logits and the gradient's margin terms come from one statistics pass."""
    from lsoftmax_core import _numpy_loss

    calls = []
    real = _numpy_loss.stats

    def spy(*args):
        calls.append(len(args[0]))
        return real(*args)

    monkeypatch.setattr(_numpy_loss, "stats", spy)
    rng = np.random.default_rng(5)
    x, w, label = rng.standard_normal((30, 4)), rng.standard_normal((7, 4)), rng.integers(0, 7, 30)
    loss, gx, gw = lsm.cross_entropy_with_grad(x, w, label, margin=3, beta=1.0, chunking=chunking, chunk_size=3)
    assert calls == [30]
    logits = lsm.forward(x, w, label, margin=3, beta=1.0)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(30), label] -= 1.0
    want = lsm.backward(p / 30, x, w, label, margin=3, beta=1.0)
    np.testing.assert_allclose(gx, want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gw, want[1], rtol=1e-10, atol=1e-12)
    calls.clear()
    lsm.cross_entropy_backward(np.float64(1.0), x, w, label, margin=3, beta=1.0, chunking=chunking, chunk_size=3)
    assert calls == [30]
