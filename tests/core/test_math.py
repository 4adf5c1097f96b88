"""The scalar maths of lsoftmax_core._chebyshev against the acos/cos definition (eq. 6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsoftmax_core._chebyshev import MAX_MARGIN, chebyshev_tu, interval_index, psi_and_derivative

ALL_MARGINS = list(range(1, 17)) + [24, 32, 48, MAX_MARGIN]


def _psi_def(c: np.ndarray, m: int) -> np.ndarray:
    theta = np.arccos(c)
    k = np.minimum(np.floor(m * theta / np.pi), m - 1)
    return (-1.0) ** k * np.cos(m * theta) - 2.0 * k


@pytest.mark.parametrize("m", ALL_MARGINS)
def test_psi_matches_definition_on_a_dense_grid(m: int) -> None:
    c = np.concatenate([np.linspace(-1.0, 1.0, 20001), [-1.0, 0.0, 1.0]])
    psi, _ = psi_and_derivative(c, m)
    # cos(m*acos(c)) has condition number ~m^2 near |c| = 1, the recurrence ~m^2 ulp too.
    np.testing.assert_allclose(psi, _psi_def(c, m), rtol=0, atol=50 * m * m * np.finfo(float).eps)


@pytest.mark.parametrize("m", ALL_MARGINS)
def test_derivative_matches_finite_differences(m: int) -> None:
    c = np.linspace(-0.999, 0.999, 4001)
    h = 1e-7
    fd = (_psi_def(c + h, m) - _psi_def(c - h, m)) / (2 * h)
    _, dpsi = psi_and_derivative(c, m)
    np.testing.assert_allclose(dpsi, fd, rtol=1e-5, atol=1e-6 * m * m)


@pytest.mark.parametrize("m", ALL_MARGINS)
def test_endpoints_zero_and_boundaries(m: int) -> None:
    edge = np.array([1.0, -1.0, 0.0])
    psi, dpsi = psi_and_derivative(edge, m)
    assert psi[0] == pytest.approx(1.0, abs=1e-12)  # theta = 0
    assert psi[1] == pytest.approx(1.0 - 2.0 * m, abs=1e-9 * m * m)  # theta = pi: (-1)^(m-1)cos(m pi) - 2(m-1)
    assert np.all(np.isfinite(psi)) and np.all(np.isfinite(dpsi))  # c = 0 is no special case
    # dpsi/dc -> m^2 at both ends (psi is C^1 and monotone), and vanishes on every boundary.
    np.testing.assert_allclose(dpsi[:2], [m * m, m * m], rtol=1e-10)
    bounds = np.cos(np.arange(1, m) * np.pi / m)
    pb, db = psi_and_derivative(bounds, m)
    np.testing.assert_allclose(pb, 1.0 - 2.0 * np.arange(1, m), atol=1e-9 * m * m)
    np.testing.assert_allclose(db, 0.0, atol=1e-9 * m * m)


@pytest.mark.parametrize("m", range(2, 17))
def test_psi_is_continuous_and_decreasing_across_boundaries(m: int) -> None:
    for j in range(1, m):
        t = math.cos(j * math.pi / m)
        eps = 1e-9
        lo, hi = psi_and_derivative(np.array([t - eps, t + eps]), m)[0]
        assert abs(lo - hi) < 1e-6
        assert lo <= hi + 1e-12  # decreasing in theta = increasing in c (psi' = 0 here)
    c = np.linspace(-1, 1, 5001)
    psi, dpsi = psi_and_derivative(c, m)
    assert np.all(np.diff(psi) >= -1e-12)
    assert np.all(dpsi >= -1e-9)


def test_interval_index_matches_floor_of_theta() -> None:
    for m in range(1, 17):
        c = np.linspace(-1, 1, 3001)
        k = interval_index(c, m)
        theta = np.arccos(c)
        k_def = np.minimum(np.floor(m * theta / np.pi), m - 1)
        # They may differ only where theta sits on a boundary within rounding.
        off = k != k_def
        assert np.all(np.abs(np.cos(m * theta[off]) ** 2 - 1) < 1e-9)


def test_chebyshev_identities() -> None:
    theta = np.linspace(0.01, np.pi - 0.01, 1001)
    c = np.cos(theta)
    for m in (1, 2, 5, 16, MAX_MARGIN):
        t, u = chebyshev_tu(c, m)
        np.testing.assert_allclose(t, np.cos(m * theta), atol=1e-11 * m * m)
        np.testing.assert_allclose(u, np.sin(m * theta) / np.sin(theta), atol=1e-9 * m * m)
