"""The margin family's objects and their scalar maths, against an independent reference.

The reference (tests/support/margin_reference.py) works in the angle with math.acos and
math.cos from the papers' formulas; the library works in the cosine.  Derivatives are also
checked against central finite differences in float64.
"""

from __future__ import annotations

import copy
import json
import math
import pickle

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lsoftmax_core._chebyshev import MAX_MARGIN, psi_and_derivative
from lsoftmax_core.margins import (
    ArcFace,
    CombinedMargin,
    CosFace,
    LSoftmax,
    Margin,
    SphereFace,
    margin_from_dict,
    margin_of,
)

from support.margin_reference import reference
from support.tolerances import FD_TOL

EPS = float(np.finfo(np.float64).eps)

#: Parameter sets covering each kind's range: defaults, extremes, and the peers' usual ones.
KINDS: list[Margin] = [
    LSoftmax(1), LSoftmax(2), LSoftmax(4), LSoftmax(7), LSoftmax(MAX_MARGIN),
    SphereFace(1), SphereFace(4), SphereFace(5),
    CosFace(), CosFace(m=0.4, s=30.0), CosFace(m=1e-3), CosFace(m=1.99),
    ArcFace(), ArcFace(m=0.2), ArcFace(m=1e-3), ArcFace(m=1.2), ArcFace(m=math.pi / 2),
    CombinedMargin(), CombinedMargin(1.0, 0.0, 0.0), CombinedMargin(1.0, 0.3, 0.2),
    CombinedMargin(1.35, 0.0, 0.0), CombinedMargin(1.35, 0.5, 0.1), CombinedMargin(4.0, 0.0, 0.0),
    CombinedMargin(2.5, 3.0, 1.9), CombinedMargin(9.0, 0.0, 0.35),
]
BETAS = [0.0, 0.5, 5.0, 1e3]


def _id(mg: Margin) -> str:
    return repr(mg)


def _lipschitz(mg: Margin) -> float:
    """A bound on |dphi/dtheta|: m or m1 (1 for CosFace and ArcFace)."""
    return float(getattr(mg, "m1", getattr(mg, "m", 1)) if not isinstance(mg, (CosFace, ArcFace)) else 1.0)


def _ref(mg: Margin, c: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [reference(mg.to_dict(), float(ci), beta) for ci in np.ravel(c)]
    return tuple(np.array([r[i] for r in rows]).reshape(np.shape(c)) for i in range(3))  # type: ignore[return-value]


def _thresholds(mg: Margin) -> list[float]:
    """The cosines where a piecewise target changes piece."""
    if isinstance(mg, ArcFace):
        return [-math.cos(mg.m)]
    if isinstance(mg, (LSoftmax, SphereFace)):
        return [math.cos(j * math.pi / mg.m) for j in range(1, mg.m)]
    if isinstance(mg, CombinedMargin):
        # m1 theta + m2 = j pi
        top = mg.m1 * math.pi + mg.m2
        return [math.cos((j * math.pi - mg.m2) / mg.m1) for j in range(1, int(top / math.pi) + 1)
                if 0.0 < (j * math.pi - mg.m2) / mg.m1 < math.pi]
    return []


# --- the objects ---------------------------------------------------------------------------


def test_each_kind_says_what_it_normalises_and_how_it_scales() -> None:
    table = {
        LSoftmax(4): (False, False, None),
        SphereFace(4): (False, True, None),
        CosFace(0.35, 30.0): (True, True, 30.0),
        ArcFace(0.5, 64.0): (True, True, 64.0),
        CombinedMargin(1.0, 0.5, 0.0, 16.0): (True, True, 16.0),
    }
    for mg, (features, weights, scale) in table.items():
        assert (mg.normalizes_features, mg.normalizes_weights, mg.scale) == (features, weights, scale), mg


def test_defaults_are_the_papers_and_the_issues() -> None:
    assert LSoftmax() == LSoftmax(m=4) and SphereFace() == SphereFace(m=4)
    assert CosFace() == CosFace(m=0.35, s=64.0)
    assert ArcFace() == ArcFace(m=0.5, s=64.0)
    assert CombinedMargin() == CombinedMargin(m1=1.0, m2=0.5, m3=0.0, s=64.0)


def test_margins_compare_and_hash_by_value_across_number_types() -> None:
    assert ArcFace(m=0.5, s=64) == ArcFace(m=np.float64(0.5), s=np.int32(64))
    assert hash(ArcFace(m=0.5, s=64)) == hash(ArcFace(m=np.float64(0.5), s=np.int32(64)))
    assert LSoftmax(m=np.int64(3)) == LSoftmax(3) and type(LSoftmax(m=np.int64(3)).m) is int
    assert type(CosFace(m=1, s=2).m) is float
    assert len({LSoftmax(4), LSoftmax(4), SphereFace(4), CombinedMargin(4.0, 0.0, 0.0)}) == 3


def test_kinds_with_equal_parameters_are_different_margins() -> None:
    assert LSoftmax(4) != SphereFace(4)
    assert not isinstance(SphereFace(4), LSoftmax)  # a check for L-Softmax never takes SphereFace
    assert CombinedMargin(1.0, 0.5, 0.0, 64.0) != ArcFace(0.5, 64.0)


@pytest.mark.parametrize("mg", KINDS, ids=_id)
def test_margins_are_immutable_and_survive_copy_and_pickle(mg: Margin) -> None:
    name = next(iter(mg.to_dict().keys() - {"kind"}))
    with pytest.raises(AttributeError):
        setattr(mg, name, 2)
    assert copy.deepcopy(mg) == mg and pickle.loads(pickle.dumps(mg)) == mg


@pytest.mark.parametrize("mg", KINDS, ids=_id)
def test_to_dict_round_trips_through_json_and_margin_from_dict(mg: Margin) -> None:
    d = json.loads(json.dumps(mg.to_dict()))
    back = margin_from_dict(d)
    assert back == mg and type(back) is type(mg) and hash(back) == hash(mg)


def test_margin_from_dict_takes_defaults_for_missing_parameters() -> None:
    assert margin_from_dict({"kind": "arcface", "m": 0.3}) == ArcFace(m=0.3, s=64.0)


@pytest.mark.parametrize(
    "data, error, words",
    [
        ({"kind": "adacos"}, ValueError, ["'adacos'", "arcface"]),
        ({"kind": 3}, ValueError, ["kind=3"]),
        ({"m": 4}, ValueError, ["'kind'"]),
        ({"kind": "cosface", "m": 0.35, "margin": 2}, ValueError, ["margin", "cosface"]),
        ({"kind": "lsoftmax", "m": 4, "s": 1.0}, ValueError, ["'s'"]),
        ({"kind": "arcface", "m": -0.5}, ValueError, ["m=-0.5"]),
        ([("kind", "arcface")], TypeError, ["data="]),
        (None, TypeError, ["data=None"]),
    ],
)
def test_margin_from_dict_refuses_unknown_kinds_keys_and_values_by_name(data, error, words) -> None:
    with pytest.raises(error) as info:
        margin_from_dict(data)
    for w in words:
        assert w in str(info.value)


BAD = [
    (LSoftmax, {"m": 0}, ValueError, "m=0"),
    (LSoftmax, {"m": MAX_MARGIN + 1}, ValueError, f"m={MAX_MARGIN + 1}"),
    (LSoftmax, {"m": 4.0}, TypeError, "m=4.0"),
    (LSoftmax, {"m": True}, TypeError, "m=True"),
    (SphereFace, {"m": "4"}, TypeError, "m='4'"),
    (SphereFace, {"m": None}, TypeError, "m=None"),
    (CosFace, {"m": 0.0}, ValueError, "m=0.0"),
    (CosFace, {"m": -0.35}, ValueError, "m=-0.35"),
    (CosFace, {"m": 2.0}, ValueError, "m=2.0"),
    (CosFace, {"m": math.nan}, ValueError, "m=nan"),
    (CosFace, {"s": 0.0}, ValueError, "s=0.0"),
    (CosFace, {"s": -64.0}, ValueError, "s=-64.0"),
    (CosFace, {"s": math.inf}, ValueError, "s=inf"),
    (CosFace, {"s": "64"}, TypeError, "s='64'"),
    (ArcFace, {"m": 0.0}, ValueError, "m=0.0"),
    (ArcFace, {"m": 1.6}, ValueError, "m=1.6"),
    (ArcFace, {"m": math.pi}, ValueError, "m=3.14"),
    (ArcFace, {"m": np.bool_(True)}, TypeError, "m="),
    (ArcFace, {"s": None}, TypeError, "s=None"),
    (ArcFace, {"s": math.nan}, ValueError, "s=nan"),
    (CombinedMargin, {"m1": 0.9}, ValueError, "m1=0.9"),
    (CombinedMargin, {"m1": MAX_MARGIN + 0.5}, ValueError, "m1="),
    (CombinedMargin, {"m2": -0.1}, ValueError, "m2=-0.1"),
    (CombinedMargin, {"m2": math.pi}, ValueError, "m2=3.14"),
    (CombinedMargin, {"m3": -0.2}, ValueError, "m3=-0.2"),
    (CombinedMargin, {"m3": 2.0}, ValueError, "m3=2.0"),
    (CombinedMargin, {"m3": math.inf}, ValueError, "m3=inf"),
    (CombinedMargin, {"s": 0}, ValueError, "s=0"),
]


@pytest.mark.parametrize("cls, kwargs, error, words", BAD, ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_bad_parameters_are_refused_naming_the_parameter_and_value(cls, kwargs, error, words) -> None:
    with pytest.raises(error) as info:
        cls(**kwargs)
    assert words in str(info.value) and cls.__name__ in str(info.value)


def test_margin_of_turns_an_int_into_lsoftmax_and_passes_a_margin_through() -> None:
    assert margin_of(4) == LSoftmax(4) and margin_of(np.int64(2)) == LSoftmax(2)
    arc = ArcFace(0.4, 30.0)
    assert margin_of(arc) is arc


@pytest.mark.parametrize("value", [True, 4.0, "4", None, {"kind": "arcface"}, np.float64(2.0), ArcFace, Margin()])
def test_margin_of_refuses_other_types_naming_margin(value) -> None:
    with pytest.raises(TypeError, match=r"^margin="):
        margin_of(value)


@pytest.mark.parametrize("value", [0, -1, MAX_MARGIN + 1])
def test_margin_of_refuses_an_int_out_of_range_naming_margin(value) -> None:
    with pytest.raises(ValueError, match=rf"^margin={value} "):
        margin_of(value)


def test_a_margin_is_a_jax_static_argument_and_equal_margins_share_a_compilation() -> None:
    jax = pytest.importorskip("jax")
    traces: list[Margin] = []

    def f(x, margin):
        traces.append(margin)
        return x * margin.to_dict().get("s", 1.0)

    g = jax.jit(f, static_argnames="margin")
    assert float(g(1.0, margin=ArcFace(0.5, 2.0))) == 2.0
    assert float(g(1.0, margin=ArcFace(np.float64(0.5), 2))) == 2.0  # equal: no new trace
    assert float(g(1.0, margin=CosFace(0.5, 3.0))) == 3.0
    assert traces == [ArcFace(0.5, 2.0), CosFace(0.5, 3.0)]


# --- the maths against the reference -------------------------------------------------------

#: The cosines where something happens: ends, 0, next to the ends, the thresholds.
def _nasty(mg: Margin) -> np.ndarray:
    near = [1.0, -1.0, 0.0, 1 - EPS / 2, -1 + EPS, 1 - 1e-12, -1 + 1e-12, 5e-324, -5e-324]
    th = _thresholds(mg)
    return np.array(near + th + [t + 1e-9 for t in th] + [t - 1e-9 for t in th])


def _assert_matches_reference(mg: Margin, c: np.ndarray, beta: float) -> None:
    t, dc, dth = mg.target(c, beta), mg.dtarget_dc(c, beta), mg.dtarget_dtheta(c, beta)
    rt, rdc, rdth = _ref(mg, c, beta)
    for name, a in (("target", t), ("dtarget_dc", dc), ("dtarget_dtheta", dth)):
        assert a.shape == c.shape and a.dtype == np.float64 and np.all(np.isfinite(a)), (mg, name, c)
    big = 1.0 + _lipschitz(mg) ** 2
    # cos(m acos(c)) and the recurrences both have condition ~m^2 in c; the derivative in c
    # grows like 1/sin(theta) near the ends and is compared relative to its size.
    np.testing.assert_allclose(t, rt, rtol=0, atol=64 * big * EPS, err_msg=f"{mg} target")
    # Near theta = pi the reference's acos(c) carries an absolute error of an ulp of pi, a
    # relative error of ~eps pi / sin(theta) in the small angle pi - theta it then divides by.
    rtol = 1e-9 + 32 * math.pi * EPS / np.maximum(np.sqrt((1 - c) * (1 + c)), EPS)
    worst = np.max(np.abs(dc - rdc) / (rtol * np.abs(rdc) + 1e-9 * big))
    assert worst <= 1.0, f"{mg} dtarget_dc off by {worst:.3g} of its tolerance at c={c[np.argmax(np.abs(dc - rdc))]!r}"
    np.testing.assert_allclose(dth, rdth, rtol=0, atol=1e-9 * big, err_msg=f"{mg} dtarget_dtheta")


@pytest.mark.parametrize("mg", KINDS, ids=_id)
@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_target_and_derivatives_match_the_reference_on_a_grid_and_the_nasty_cosines(mg: Margin, beta: float) -> None:
    th = _thresholds(mg)
    grid = np.linspace(-1.0, 1.0, 401)
    # A cosine within 1e-12 of a threshold may fall on either piece by rounding (acos vs c).
    grid = grid[[all(abs(g - t) > 1e-12 for t in th) for g in grid]]
    c = np.concatenate([grid, [x for x in _nasty(mg) if all(abs(x - t) > 1e-12 for t in th)]])
    _assert_matches_reference(mg, c, beta)


MARGINS = st.one_of(
    st.builds(LSoftmax, st.integers(1, MAX_MARGIN)),
    st.builds(SphereFace, st.integers(1, 16)),
    st.builds(CosFace, st.floats(1e-4, 1.99), st.floats(1e-3, 1e3)),
    st.builds(ArcFace, st.floats(1e-4, math.pi / 2), st.floats(1e-3, 1e3)),
    st.builds(CombinedMargin, st.floats(1.0, 16.0), st.one_of(st.just(0.0), st.floats(1e-3, 3.14)),
              st.floats(0.0, 1.99), st.floats(1e-3, 1e3)),
)


@given(mg=MARGINS, c=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=8),
       beta=st.one_of(st.just(0.0), st.floats(0.0, 1e4)))
def test_random_margins_cosines_and_betas_match_the_reference(mg: Margin, c: list[float], beta: float) -> None:
    th = _thresholds(mg)
    c = [x for x in c if all(abs(x - t) > 1e-12 for t in th)] or [0.0]
    _assert_matches_reference(mg, np.array(c), beta)


# --- the maths on its own ------------------------------------------------------------------


@pytest.mark.parametrize("mg", KINDS, ids=_id)
@pytest.mark.parametrize("beta", BETAS)
def test_target_never_increases_as_theta_goes_from_0_to_pi(mg: Margin, beta: float) -> None:
    theta = np.linspace(0.0, math.pi, 20001)
    t = mg.target(np.cos(theta), beta)
    rise = np.diff(t).max()
    assert rise <= 16 * (1 + _lipschitz(mg) ** 2) * EPS * (1 + np.abs(t).max()), (mg, beta, rise)
    # On a piece boundary of L-Softmax psi' = m U_{m-1}(c) is 0 up to its rounding.
    slack = 64 * (1 + _lipschitz(mg) ** 2) * EPS
    assert mg.dtarget_dc(np.cos(theta), beta).min() >= -slack and mg.dtarget_dtheta(np.cos(theta), beta).max() <= slack


@pytest.mark.parametrize("mg", [k for k in KINDS if not isinstance(k, ArcFace)], ids=_id)
def test_target_is_continuous_in_theta_with_steps_bounded_by_its_slope(mg: Margin) -> None:
    theta = np.linspace(0.0, math.pi, 20001)
    steps = np.abs(np.diff(mg.target(np.cos(theta), 0.0)))
    assert steps.max() <= _lipschitz(mg) * (theta[1] - theta[0]) * (1 + 1e-6), mg


@pytest.mark.parametrize("mg", [k for k in KINDS if not isinstance(k, CosFace)], ids=_id)
def test_target_is_continuous_at_every_threshold_except_arcfaces_documented_step(mg: Margin) -> None:
    for t in _thresholds(mg):
        below, at, above = mg.target(np.array([t - 1e-10, t, t + 1e-10]))
        if isinstance(mg, ArcFace):
            # theta = pi - m: cos(pi) = -1 on the margin's side, cos(theta) - m sin(m) past it.
            assert at == pytest.approx(-1.0, abs=1e-14)
            assert above - below == pytest.approx(math.cos(mg.m) + mg.m * math.sin(mg.m) - 1.0, abs=1e-9)
        else:
            assert abs(above - below) <= 1e-9 and abs(at - below) <= 1e-9, (mg, t)


def test_arcface_follows_pytorch_metric_learnings_rule_past_pi_minus_m() -> None:
    m = 0.5
    theta = np.array([0.0, 1.0, math.pi - m - 1e-6, math.pi - m + 1e-6, 3.0, math.pi])
    expected = np.where(theta <= math.pi - m, np.cos(theta + m), np.cos(theta) - m * math.sin(m))
    np.testing.assert_allclose(ArcFace(m).target(np.cos(theta)), expected, rtol=0, atol=4 * EPS)


def _off_thresholds(mg: Margin, c: np.ndarray, gap: float) -> np.ndarray:
    """The points of c more than gap from every threshold: a central difference across one
    sees a jump of the second derivative (C^1 pieces) or of the value (ArcFace)."""
    return c[[all(abs(x - t) > gap for t in _thresholds(mg)) for x in c]]


@pytest.mark.parametrize("mg", [k for k in KINDS if _lipschitz(k) <= 9], ids=_id)
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_dtarget_dc_matches_central_finite_differences(mg: Margin, beta: float) -> None:
    h = 1e-6
    c = _off_thresholds(mg, np.linspace(-1 + 1e-3, 1 - 1e-3, 301), 10 * h)
    fd = (mg.target(c + h, beta) - mg.target(c - h, beta)) / (2 * h)
    d = mg.dtarget_dc(c, beta)
    # The scale: the derivative's own size, and m^2 for the truncation error near the ends.
    assert np.max(np.abs(d - fd) / (1 + np.abs(d) + _lipschitz(mg) ** 2)) <= FD_TOL, mg


@pytest.mark.parametrize("mg", [k for k in KINDS if _lipschitz(k) <= 9], ids=_id)
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_dtarget_dtheta_matches_finite_differences_including_one_sided_at_0_and_pi(mg: Margin, beta: float) -> None:
    h = 1e-5

    def f(theta):
        return mg.target(np.cos(theta), beta)

    theta = np.arccos(_off_thresholds(mg, np.cos(np.linspace(1e-3, math.pi - 1e-3, 301)), 10 * h))
    fd = (f(theta + h) - f(theta - h)) / (2 * h)
    ends = np.array([0.0, math.pi])
    one_sided = np.array([(-3 * f(0.0) + 4 * f(h) - f(2 * h)) / (2 * h),
                          (3 * f(math.pi) - 4 * f(math.pi - h) + f(math.pi - 2 * h)) / (2 * h)]).ravel()
    scale = 1 + _lipschitz(mg) ** 2
    assert np.max(np.abs(mg.dtarget_dtheta(np.cos(theta), beta) - fd)) <= FD_TOL * scale, mg
    assert np.max(np.abs(mg.dtarget_dtheta(np.cos(ends), beta) - one_sided)) <= FD_TOL * scale, mg


@pytest.mark.parametrize("mg", [k for k in KINDS if not isinstance(k, (CosFace, ArcFace))], ids=_id)
def test_derivatives_at_interior_thresholds_equal_both_one_sided_limits(mg: Margin) -> None:
    # L-Softmax and the combined form are C^1: the derivative at u = j pi is 0 from both sides.
    for t in _thresholds(mg):
        d = mg.dtarget_dc(np.array([t - 1e-9, t, t + 1e-9]))
        assert np.all(np.abs(d) <= 1e-6 * (1 + _lipschitz(mg) ** 3)), (mg, t, d)


def test_arcface_derivative_at_its_threshold_is_the_margin_sides() -> None:
    for m in (0.2, 0.5, 1.2):
        t = -math.cos(m)
        d_at, d_past = ArcFace(m).dtarget_dc(np.array([t, t - 1e-9]))
        # d/dc cos(theta + m) = cos m + sin m c / sin(theta) = cos m - cos m = 0 at theta = pi - m.
        assert abs(d_at) <= 1e-7 and d_past == 1.0


@pytest.mark.parametrize("beta", [0.0, 1.5])
def test_at_the_ends_the_derivative_is_the_limit_or_zero_at_a_cone(beta: float) -> None:
    ends = np.array([1.0, -1.0])

    def blend(v):
        return (beta + np.array(v)) / (1 + beta)

    np.testing.assert_allclose(LSoftmax(5).dtarget_dc(ends, beta), blend([25.0, 25.0]), rtol=1e-13)
    np.testing.assert_allclose(CosFace().dtarget_dc(ends, beta), blend([1.0, 1.0]), rtol=1e-15)
    # ArcFace: a cone at theta = 0 (the target falls like cos m - sin m theta); the cosine past pi - m.
    np.testing.assert_allclose(ArcFace(0.5).dtarget_dc(ends, beta), blend([0.0, 1.0]), rtol=1e-15)
    np.testing.assert_allclose(CombinedMargin(4.0, 0.0, 0.3).dtarget_dc(ends, beta), blend([16.0, 16.0]), rtol=1e-12)
    np.testing.assert_allclose(CombinedMargin(1.35, 0.0, 0.0).dtarget_dc(ends, beta), blend([1.35**2, 0.0]), rtol=1e-13)
    np.testing.assert_allclose(CombinedMargin(1.0, 0.5, 0.0).dtarget_dc(ends, beta), blend([0.0, 0.0]), rtol=1e-13)


@pytest.mark.parametrize("mg", KINDS, ids=_id)
def test_where_an_end_is_smooth_its_derivative_is_the_limit_from_inside(mg: Margin) -> None:
    for end, inside in ((1.0, 1 - 1e-10), (-1.0, -1 + 1e-10)):
        d_end, d_in = mg.dtarget_dc(np.array([end, inside]))
        if d_end != 0.0 and abs(d_in) < 1e3:  # a cone is 0 at the end and ~1/sin(theta) inside
            assert d_end == pytest.approx(d_in, rel=1e-4, abs=1e-4 * _lipschitz(mg) ** 2), (mg, end)


def test_lsoftmax_and_sphereface_use_the_kernels_own_psi_bit_for_bit() -> None:
    c = np.linspace(-1.0, 1.0, 1001)
    for m in (1, 2, 4, 9):
        psi, dpsi = psi_and_derivative(c, m)
        for mg in (LSoftmax(m), SphereFace(m)):
            assert np.array_equal(mg.target(c), psi) and np.array_equal(mg.dtarget_dc(c), dpsi)


def test_combined_margin_contains_cosface_arcface_and_the_lsoftmax_extension() -> None:
    c = np.linspace(-1.0, 1.0, 2001)
    tol = dict(rtol=0, atol=1e-12)
    np.testing.assert_allclose(CombinedMargin(1.0, 0.0, 0.35).target(c), CosFace(0.35).target(c), **tol)
    np.testing.assert_allclose(CombinedMargin(4.0, 0.0, 0.0).target(c), LSoftmax(4).target(c), atol=1e-11, rtol=0)
    arc = c >= -math.cos(0.5)  # equal on ArcFace's monotone range; their continuations differ
    np.testing.assert_allclose(CombinedMargin(1.0, 0.5, 0.0).target(c[arc]), ArcFace(0.5).target(c[arc]), **tol)
    np.testing.assert_allclose(CombinedMargin(1.0, 0.0, 0.0).target(c), c, **tol)


@pytest.mark.parametrize("mg", KINDS, ids=_id)
def test_beta_blends_the_margin_with_the_plain_cosine(mg: Margin) -> None:
    c = np.linspace(-1.0, 1.0, 101)
    phi = mg.target(c, 0.0)
    for beta in (0.5, 7.0, 1e12):
        np.testing.assert_allclose(mg.target(c, beta), (beta * c + phi) / (1 + beta), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(mg.target(c, 1e15), c, rtol=0, atol=1e-12)


def test_the_maths_clamps_cosines_and_never_writes_its_input() -> None:
    c = np.array([1.0 + 1e-12, -1.0 - 1e-12, 0.25])
    before = c.copy()
    mg = ArcFace()
    np.testing.assert_array_equal(mg.target(c), mg.target(np.clip(before, -1, 1)))
    np.testing.assert_array_equal(c, before)
    assert mg.target(0.5).shape == () and mg.target([[0.1, 0.2]]).shape == (1, 2)


@pytest.mark.parametrize("c", [math.nan, [0.5, math.inf], -math.inf])
def test_non_finite_cosines_are_refused_naming_c(c) -> None:
    with pytest.raises(ValueError, match=r"^c="):
        CosFace().target(c)


@pytest.mark.parametrize("beta, error", [(-1.0, ValueError), (math.nan, ValueError), ("1", TypeError)])
def test_bad_beta_is_refused_naming_beta(beta, error) -> None:
    for method in ("target", "dtarget_dc", "dtarget_dtheta"):
        with pytest.raises(error, match=r"beta="):
            getattr(ArcFace(), method)(0.5, beta)
