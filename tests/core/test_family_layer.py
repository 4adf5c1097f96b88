"""The margin family's layer (forward, backward, normalized, add_margin, add_margin_grad)
against the independent float64 reference of tests/support/family_reference.py, central
finite differences, and the conventions of docs/derivatives.md ("The margin family"):
beta blending, the ends c = +-1, ArcFace's step at theta = pi - m, zero norms, extreme norms.

Errors are scale-based (support.family_reference.logit_scale / grad_scales): a logit
relative to s (cosine kinds) or |x| (SphereFace) times 1 + the bound of dh/dtheta, a
gradient row relative to sum |G| times the same over the row's norm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lsoftmax_core as lsm
from lsoftmax_core.margins import ArcFace, CombinedMargin, CosFace, LSoftmax, SphereFace

from support import family_reference as fr
from support.strategies import problems
from support.tolerances import FAMILY_DELICATE_WIDTH, FAMILY_FD_TOL, TOLERANCES, assert_close

DTYPES = ["float64", "float32"]

#: The peers' defaults, then small scales and other parameters so that differences show.
PEERS = [SphereFace(4), CosFace(0.35, 64.0), ArcFace(0.5, 64.0), CombinedMargin(1.0, 0.3, 0.2, 64.0)]
KINDS = [
    *PEERS,
    SphereFace(1), SphereFace(3),
    CosFace(0.35, 1.0), CosFace(1.5, 3.0),
    ArcFace(0.5, 2.0), ArcFace(1.2, 1.0), ArcFace(math.pi / 2, 4.0),
    CombinedMargin(1.0, 0.5, 0.0, 2.0), CombinedMargin(1.35, 0.3, 0.2, 2.0), CombinedMargin(4.0, 0.0, 0.0, 1.0),
    CombinedMargin(2.5, 3.0, 1.9, 1.5),
]  # fmt: skip
BETAS = [0.0, 1.0, 100.0]


def _ids(mg) -> str:
    return repr(mg).replace(" ", "")


def _check(x, w, label, G, mg, beta, dtype, *, k=1, what="", rows=None):
    """forward and backward (and their dtypes) against the reference; ``rows`` limits the
    forward's comparison (the upstream gradient of the other rows is then zeroed)."""
    p = mg.to_dict()
    f = lsm.forward(x, w, label, margin=mg, beta=beta)
    assert f.dtype == x.dtype and f.shape == (len(x), len(w) // k)
    tol = TOLERANCES[dtype]
    sel = slice(None) if rows is None else rows
    ref = fr.logits(x, w, label, p, beta, k)
    assert_close(f[sel], ref[sel], fr.logit_scale(x, w, p, k)[sel], tol.forward, f"forward {what}", dtype=dtype)
    if rows is not None:
        G = np.where(rows[:, None], G, 0).astype(G.dtype)
    gx, gw = lsm.backward(G, x, w, label, margin=mg, beta=beta)
    assert gx.dtype == gw.dtype == x.dtype
    ex, ew = fr.backward(G, x, w, label, p, beta, k)
    sx, sw = fr.grad_scales(G, x, w, p, k)
    assert_close(gx, ex, sx, tol.grad, f"grad_x {what}", dtype=dtype)
    assert_close(gw, ew, sw, tol.grad, f"grad_w {what}", dtype=dtype)
    return f, gx, gw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_forward_and_backward_match_the_reference_at_every_target_angle(mg, beta, dtype) -> None:
    rng = np.random.default_rng(abs(hash((repr(mg), beta))) % 2**32)
    x, w, label = fr.problem(rng, 24, 6, 7, mg.to_dict(), width=FAMILY_DELICATE_WIDTH[dtype])
    x, w = x.astype(dtype), w.astype(dtype)
    G = rng.standard_normal((24, 6)).astype(dtype)
    _check(x, w, label, G, mg, beta, dtype, what=f"{mg} beta={beta}")


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_the_reference_itself_matches_its_finite_differences(mg, k) -> None:
    rng = np.random.default_rng(5)
    p = mg.to_dict()
    x, w, label = fr.problem(rng, 4, 3, 3, p, width=0.05, subcenters=k)
    G = rng.standard_normal((4, 3))
    fx, fw = _fd(lambda a, b: fr.logits(a, b, label, p, 0.5, k), G, x, w)
    ex, ew = fr.backward(G, x, w, label, p, 0.5, k)
    sx, sw = fr.grad_scales(G, x, w, p, k)
    assert_close(ex, fx, sx, FAMILY_FD_TOL, f"reference grad_x {mg}")
    assert_close(ew, fw, sw, FAMILY_FD_TOL, f"reference grad_w {mg}")


def _fd(f, G, x, w, rel_h=1e-6):
    """Central differences of sum(G * f(x, w)), step relative to each row's norm."""

    def one(a, on_x):
        out = np.zeros_like(a)
        for idx in np.ndindex(*a.shape):
            h = rel_h * max(1e-3, float(np.linalg.norm(a[idx[0]])))
            vals = []
            for step in (h, -h):
                b = a.copy()
                b[idx] += step
                vals.append(float(np.sum(G * (f(b, w) if on_x else f(x, b)))))
            out[idx] = (vals[0] - vals[1]) / (2 * h)
        return out

    return one(x, True), one(w, False)


@pytest.mark.parametrize("mg", KINDS, ids=_ids)
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_backward_matches_central_finite_differences_of_forward_in_float64(mg, beta) -> None:
    rng = np.random.default_rng(11)
    x, w, label = fr.problem(rng, 5, 4, 3, mg.to_dict(), width=0.05)
    G = rng.standard_normal((5, 4))
    gx, gw = lsm.backward(G, x, w, label, margin=mg, beta=beta)
    fx, fw = _fd(lambda a, b: lsm.forward(a, b, label, margin=mg, beta=beta), G, x, w)
    sx, sw = fr.grad_scales(G, x, w, mg.to_dict())
    assert_close(gx, fx, sx, FAMILY_FD_TOL, "grad_x vs FD")
    assert_close(gw, fw, sw, FAMILY_FD_TOL, "grad_w vs FD")


@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_beta_blends_the_target_between_the_margin_and_the_plain_logit(mg) -> None:
    rng = np.random.default_rng(2)
    x, w, label = fr.problem(rng, 9, 5, 4, mg.to_dict())
    xn, wn = lsm.normalized(x, w, margin=mg)
    plain = xn @ wn.T
    f0 = lsm.forward(x, w, label, margin=mg, beta=0.0)
    scale = fr.logit_scale(x, w, mg.to_dict())
    for beta in (1.0, 100.0, 1e8):
        f = lsm.forward(x, w, label, margin=mg, beta=beta)
        assert_close(f, (beta * plain + f0) / (1 + beta), scale, 1e-12, f"beta={beta}")
    # Off the target nothing depends on beta.
    off = np.ones_like(f0, dtype=bool)
    off[np.arange(9), label] = False
    np.testing.assert_array_equal(lsm.forward(x, w, label, margin=mg, beta=100.0)[off], f0[off])


def _cones(mg, x, w, label, *, k=1):
    """Rows whose target sits exactly at an end where the margin is a cone (no gradient there)."""
    t = fr.target_angles(x, w, label, k)
    out = np.zeros(len(t), dtype=bool)
    for d in fr.delicate_angles(mg.to_dict()):
        if d in (0.0, math.pi):
            out |= np.abs(t - d) < 1e-3
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_nasty_rows_parallel_antiparallel_orthogonal_and_zero_norms(mg, dtype) -> None:
    f = np.dtype(dtype)
    w = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, -2.0, 2.0], [0.5, 0.0, -1.0]], dtype=f)
    x = np.array(
        [[6.0, 8.0, 0.0],  # cos = 1 with w_0
         [-1.5, -2.0, 0.0],  # cos = -1 with w_0
         [4.0, -3.0, 5.0],  # cos = 0 with w_0
         [0.0, 0.0, 0.0],  # zero x
         [1.0, 2.0, 3.0],  # zero w_y (class 1)
         [2.0, 1.0, -1.0]],  # an ordinary row
        dtype=f,
    )
    label = np.array([0, 0, 0, 2, 1, 3])
    beta = 0.5
    p = mg.to_dict()
    G = np.random.default_rng(3).standard_normal((6, 4)).astype(f)
    cone = _cones(mg, x, w, label)
    out, gx, gw = _check(x, w, label, G, mg, beta, dtype, what="nasty", rows=~cone)
    assert np.isfinite(out).all()
    h0 = fr.bracket(p, 0.0, beta)[0]  # h(0), blended
    if mg.kind == "sphereface":
        assert out[3, 2] == 0.0 and np.all(out[3] == 0.0)  # a = 0: every logit |x| c = 0
        a4 = np.linalg.norm(x[4].astype(float))
        np.testing.assert_allclose(out[4, 1], a4 * h0, rtol=1e-6, atol=1e-6 * a4)
        assert np.all(out[:, 1][label != 1] == 0.0)
    else:
        s = mg.s
        np.testing.assert_allclose(out[3, 2], s * h0, rtol=1e-6, atol=1e-6 * s)  # a = 0: s h(0) on the target
        assert np.all(np.delete(out[3], 2) == 0.0)
        np.testing.assert_allclose(out[4, 1], s * h0, rtol=1e-6, atol=1e-6 * s)  # b_y = 0: c = 0
        assert np.all(out[:, 1][label != 1] == 0.0)
    # The whole problem with every row's gradient, cones included: finite, and bounded.
    gx, gw = lsm.backward(G, x, w, label, margin=mg, beta=beta)
    assert np.isfinite(gx).all() and np.isfinite(gw).all()
    sx, sw = fr.grad_scales(G, x, w, p)
    assert np.all(np.linalg.norm(gx.astype(float), axis=1) <= 1.01 * sx[:, 0])
    assert np.all(np.linalg.norm(gw.astype(float), axis=1) <= 1.01 * sw[:, 0])
    assert np.all(gw[1] == 0.0)  # a zero weight row gets no gradient
    if mg.kind != "sphereface":
        assert np.all(gx[3] == 0.0)  # a zero feature row gets none either
    else:
        wn = lsm.normalized(x, w, margin=mg)[1]
        np.testing.assert_allclose(gx[3], G[3] @ wn, rtol=1e-5, atol=1e-6)  # no margin: as m = 1
    # One sample, one class.
    one = lsm.forward(x[5:], w[3:], np.array([0]), margin=mg, beta=beta)
    assert one.shape == (1, 1)
    assert_close(one, fr.logits(x[5:], w[3:], [0], p, beta), fr.logit_scale(x[5:], w[3:], p), TOLERANCES[dtype].forward)
    g1 = lsm.backward(np.ones((1, 1), f), x[5:], w[3:], np.array([0]), margin=mg, beta=beta)
    assert g1[0].shape == (1, 3) and g1[1].shape == (1, 3)


def _at_angle(t: float, d: int = 3, dtype=np.float64):
    """x at angle t from w = e_0, in the (e_0, e_1) plane."""
    w = np.zeros((2, d))
    w[0, 0], w[1, 2] = 1.0, 1.0
    x = np.zeros((1, d))
    x[0, 0], x[0, 1] = 2.0 * math.cos(t), 2.0 * math.sin(t)
    return x.astype(dtype), w.astype(dtype), np.array([0])


@pytest.mark.parametrize("mg", [SphereFace(1), SphereFace(4), CosFace(0.35, 2.0), CombinedMargin(4.0, 0.0, 0.0, 1.0),
                                CombinedMargin(1.0, 0.0, 0.3, 1.0), ArcFace(0.5, 2.0)], ids=_ids)
def test_gradients_at_parallel_and_antiparallel_rows_keep_full_precision_where_there_is_no_cone(mg) -> None:
    """At c = +-1 (or within rounding of it) the target's gradient along the tangent is
    h'(c) (w^ - c x^) ~ 0 wherever h' is finite: exact parallel rows must give the
    float64 reference to rounding, as an angle 1e-3 away does.  (acos(c) there is off by
    sqrt(eps) ~ 1e-8, so a gradient formed from sin(theta) of the cosine loses half the
    digits; ArcFace's parallel row is a cone and is left out.)"""
    rng = np.random.default_rng(9)
    p = mg.to_dict()
    w = rng.standard_normal((40, 4)) * rng.uniform(0.1, 3.0, (40, 1))
    x = w * rng.uniform(0.1, 3.0, (40, 1)) * np.where(np.arange(40) % 2, 1.0, -1.0)[:, None]
    label = np.arange(40)
    keep = ~_cones(mg, x, w, label)
    G = np.where(keep[:, None], rng.standard_normal((40, 40)), 0.0)
    gx, gw = lsm.backward(G, x, w, label, margin=mg, beta=0.0)
    ex, ew = fr.backward(G, x, w, label, p, 0.0)
    sx, sw = fr.grad_scales(G, x, w, p)
    assert_close(gx, ex, sx, TOLERANCES["float64"].grad, f"grad_x {mg} at c = +-1")
    assert_close(gw, ew, sw, TOLERANCES["float64"].grad, f"grad_w {mg} at c = +-1")


@pytest.mark.parametrize("dtype,delta", [("float64", 1e-7), ("float32", 3e-3)])
@pytest.mark.parametrize("m", [0.5, 1.2, math.pi / 2])
def test_arcface_steps_down_just_past_pi_minus_m_and_follows_the_reference_on_each_side(m, dtype, delta) -> None:
    mg = ArcFace(m, 2.0)
    p = mg.to_dict()
    for t in (math.pi - m - delta, math.pi - m + delta):
        x, w, label = _at_angle(t, dtype=dtype)
        _check(x, w, label, np.ones((1, 2), dtype=dtype), mg, 0.0, dtype, what=f"t={t}")
    below = lsm.forward(*_at_angle(math.pi - m - delta, dtype=dtype), margin=mg)[0, 0]
    above = lsm.forward(*_at_angle(math.pi - m + delta, dtype=dtype), margin=mg)[0, 0]
    step = 2.0 * (math.cos(m) + m * math.sin(m) - 1.0)  # s (cos m + m sin m - 1) (docs)
    assert below - above == pytest.approx(step, abs=4 * 2.0 * delta + 1e-5)  # the slope moves it by 2 delta s
    # Exactly at the threshold (as near as the dtype goes): one of the two pieces, finite gradients.
    x, w, label = _at_angle(math.pi - m, dtype=dtype)
    f = lsm.forward(x, w, label, margin=mg)[0, 0]
    assert min(abs(f + 2.0), abs(f - 2.0 * (-math.cos(m) - m * math.sin(m)))) <= 1e-5 + (1e-3 if dtype == "float32" else 0)
    gx, gw = lsm.backward(np.ones((1, 2), dtype=dtype), x, w, label, margin=mg)
    assert np.isfinite(gx).all() and np.isfinite(gw).all()
    assert p["m"] == m


@pytest.mark.parametrize("delta", [0.0, 1e-7, -1e-7])
@pytest.mark.parametrize("mg", [CombinedMargin(1.35, 0.3, 0.2, 2.0), CombinedMargin(2.5, 0.0, 0.1, 1.0)], ids=_ids)
def test_combined_margin_is_continuous_and_c1_across_u_equal_pi(mg, delta) -> None:
    t = (math.pi - mg.m2) / mg.m1 + delta
    x, w, label = _at_angle(t)
    _check(x, w, label, np.array([[1.0, -0.5]]), mg, 0.0, "float64", what=f"u=pi{delta:+g}")
    f = lsm.forward(x, w, label, margin=mg)[0, 0]
    assert f == pytest.approx(mg.s * (-1.0 - mg.m3), abs=1e-6)


@pytest.mark.parametrize("dtype,big,small", [("float64", 1e30, 1e-30), ("float32", 1e18, None)])
@pytest.mark.parametrize("mg", PEERS + [ArcFace(0.5, 2.0), CosFace(0.35, 1.0)], ids=_ids)
def test_huge_and_tiny_norms_follow_the_reference(mg, dtype, big, small) -> None:
    f = np.dtype(dtype)
    rng = np.random.default_rng(4)
    x, w, label = fr.problem(rng, 6, 4, 5, mg.to_dict(), width=FAMILY_DELICATE_WIDTH[dtype])
    x[:3] *= big
    w[:2] *= big
    if small is not None:
        x[3:5] *= small
        w[3:] *= small
    x, w = x.astype(f), w.astype(f)
    G = rng.standard_normal((6, 4)).astype(f)
    out, gx, gw = _check(x, w, label, G, mg, 1.0, dtype, what=f"norms {big:g}")
    assert np.isfinite(out).all() and np.isfinite(gx).all() and np.isfinite(gw).all()


@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_add_margin_on_the_normalized_plain_layer_equals_forward_and_backward(mg) -> None:
    """Equal up to rounding: forward scales the columns of x'·wᵀ by 1/|w_j| rather than
    multiplying by a normalised copy of w (no C×D copy), so the last bits may differ."""
    rng = np.random.default_rng(6)
    x, w, label = fr.problem(rng, 8, 5, 4, mg.to_dict())
    x[1], w[2] = 0.0, 0.0
    G = rng.standard_normal((8, 5))
    xn, wn = lsm.normalized(x, w, margin=mg)
    ex, ew = fr._unit(x)[1], fr._unit(w)[1]  # the reference's unit rows (0 for a zero row)
    np.testing.assert_allclose(wn, ew, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(xn, ex * mg.s if mg.kind != "sphereface" else x, rtol=1e-14, atol=1e-13)
    logits = xn @ wn.T
    assert lsm.add_margin(logits, x, w, label, margin=mg, beta=0.5) is logits
    np.testing.assert_allclose(logits, lsm.forward(x, w, label, margin=mg, beta=0.5), rtol=1e-13, atol=1e-13)
    gx, gw = G @ wn, G.T @ xn
    out = lsm.add_margin_grad(gx, gw, G, x, w, label, margin=mg, beta=0.5)
    assert out[0] is gx and out[1] is gw
    want = lsm.backward(G, x, w, label, margin=mg, beta=0.5)
    np.testing.assert_allclose(gx, want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mg", KINDS, ids=_ids)
def test_return_stats_gives_no_stats_for_the_kinds_that_normalise(mg) -> None:
    x, w, label = fr.problem(np.random.default_rng(7), 3, 2, 3, mg.to_dict())
    f, stats = lsm.forward(x, w, label, margin=mg, return_stats=True)
    assert stats is None
    np.testing.assert_array_equal(f, lsm.forward(x, w, label, margin=mg))


@pytest.mark.parametrize("mg", KINDS[:4], ids=_ids)
def test_inputs_are_never_modified(mg) -> None:
    rng = np.random.default_rng(8)
    x, w, label = fr.problem(rng, 6, 4, 3, mg.to_dict())
    G = rng.standard_normal((6, 4))
    arrays = (x, w, label, G)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False
    lsm.forward(x, w, label, margin=mg, beta=1.0)
    lsm.backward(G, x, w, label, margin=mg, beta=1.0)
    lsm.normalized(x, w, margin=mg)
    lsm.cross_entropy_with_grad(x, w, label, margin=mg, beta=1.0)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_an_lsoftmax_object_gives_the_bits_of_its_int_margin(m) -> None:
    rng = np.random.default_rng(m)
    x, w = rng.standard_normal((7, 5)), rng.standard_normal((6, 5))
    label = rng.integers(0, 6, 7)
    G = rng.standard_normal((7, 6))
    for dt in (np.float64, np.float32):
        xa, wa, Ga = x.astype(dt), w.astype(dt), G.astype(dt)
        np.testing.assert_array_equal(lsm.forward(xa, wa, label, margin=LSoftmax(m), beta=2.0),
                                      lsm.forward(xa, wa, label, margin=m, beta=2.0))
        for a, b in zip(lsm.backward(Ga, xa, wa, label, margin=LSoftmax(m), beta=2.0),
                        lsm.backward(Ga, xa, wa, label, margin=m, beta=2.0)):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(lsm.cross_entropy_with_grad(xa, wa, label, margin=LSoftmax(m), beta=2.0, chunk_size=3),
                        lsm.cross_entropy_with_grad(xa, wa, label, margin=m, beta=2.0, chunk_size=3)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lsm.normalized(x, w, margin=LSoftmax(m))[0], x)


def test_the_margin_kinds_are_exported_from_the_package() -> None:
    from lsoftmax_core import margins

    for name in ("LSoftmax", "SphereFace", "CosFace", "ArcFace", "CombinedMargin", "Margin", "margin_from_dict"):
        assert getattr(lsm, name) is getattr(margins, name)


@pytest.mark.parametrize("dtype", DTYPES)
@given(p=problems(max_n=6, max_c=5, max_d=5, min_norm=1e-3), mg=st.sampled_from(KINDS), data=st.data())
def test_forward_and_backward_match_the_reference_on_random_problems(dtype, p, mg, data) -> None:
    x, w, label, _, beta = p
    x, w = x.astype(dtype), w.astype(dtype)
    G = data.draw(st.sampled_from([1.0, -1.0, 0.25])) * np.random.default_rng(len(x)).standard_normal(
        (len(x), len(w))).astype(dtype)  # fmt: skip
    # Rows near a cone, ArcFace's step or an end are left out (tested above, where they are built).
    ok = ~fr.delicate_rows(x, w, label, mg.to_dict(), width=FAMILY_DELICATE_WIDTH[dtype], ends=True)
    _check(x, w, label, G, mg, beta, dtype, what=f"{mg} beta={beta}", rows=ok)


@pytest.mark.parametrize("mg", PEERS, ids=_ids)
def test_the_compiled_cpu_kernels_give_the_same_bits(mg) -> None:
    pytest.importorskip("numba")
    rng = np.random.default_rng(10)
    x, w, label = fr.problem(rng, 9, 5, 4, mg.to_dict())
    G = rng.standard_normal((9, 5))
    before = lsm.cpu_kernels()
    try:
        got = []
        for kernels in ("numpy", "numba"):
            lsm.set_cpu_kernels(kernels)
            got.append((lsm.forward(x, w, label, margin=mg, beta=1.0), *lsm.backward(G, x, w, label, margin=mg, beta=1.0)))
    finally:
        lsm.set_cpu_kernels(before)
    for a, b in zip(*got):
        np.testing.assert_array_equal(a, b)


def test_a_checked_problem_keeps_its_kind_into_the_backward() -> None:
    """check_arguments(...).with_grad_logits(G) is the backward's problem of the same kind:
    add_margin_grad takes it as checked= and gives backward's gradients (to rounding: see
    the test above)."""
    rng = np.random.default_rng(2)
    x, w, y = rng.standard_normal((5, 3)), rng.standard_normal((4, 3)), rng.integers(0, 4, 5)
    g = rng.standard_normal((5, 4))
    kind = lsm.ArcFace(0.5, 4.0)
    p = lsm.check_arguments(x, w, y, margin=kind, beta=0.5).with_grad_logits(g)
    assert p.family == kind
    xn, wn = lsm.normalized(x, w, margin=kind)
    gx, gw = lsm.add_margin_grad(g @ wn, g.T @ xn, g, x, w, y, margin=kind, beta=0.5, checked=p)
    want = lsm.backward(g, x, w, y, margin=kind, beta=0.5)
    np.testing.assert_allclose(gx, want[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gw, want[1], rtol=1e-12, atol=1e-12)
