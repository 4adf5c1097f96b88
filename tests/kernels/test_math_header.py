"""kernels/lsoftmax_math.cuh built for the host with g++: the scalar code the GPU runs.

psi/psi' must equal _chebyshev.py bit for bit in float64 (same recurrences, same
thresholds, no fused multiply-add on either side), agree with the acos-based reference,
and stay finite and continuous for every c in [-1, 1] and margin 1..64.  The IEEE format
conversions must round exactly like NumPy / ml_dtypes (round to nearest, ties to even,
gradual underflow).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from lsoftmax_core import _cupy_plan as plan
from lsoftmax_core._chebyshev import MAX_MARGIN, psi_and_derivative, thresholds

from support import reference
from support.kernel_host import BFLOAT16, build_math, compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="needs a host C++ compiler (g++)")

F64, F32, F16, BF16 = (11, 52), (8, 23), (5, 10), (8, 7)
MARGINS = list(range(1, MAX_MARGIN + 1))


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_math(tmp_path_factory.mktemp("hostmath"))


def _thr(m: int) -> np.ndarray:
    table = plan.threshold_table()
    start = (m - 1) * (m - 2) // 2
    return np.ascontiguousarray(table[start : start + m - 1]) if m > 1 else np.zeros(1)


def _psi(lib, c: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.ascontiguousarray(c)
    psi, dpsi = np.empty_like(c), np.empty_like(c)
    fn = lib.lsm_psi_f64 if c.dtype == np.float64 else lib.lsm_psi_f32
    fn(c, c.size, m, _thr(m), psi, dpsi)
    return psi, dpsi


def _nasty_c(m: int, seed: int = 0) -> np.ndarray:
    """+-1, 0, every threshold cos(j*pi/m) and its neighbours, cos(j*pi/m) computed
    another way, a dense grid and random values."""
    t = np.array(thresholds(m) if m > 1 else [], dtype=np.float64)
    other = np.cos(np.arange(1, m) * (np.pi / m))
    near = np.concatenate([np.nextafter(t, 2.0), np.nextafter(t, -2.0)])
    rng = np.random.default_rng(seed)
    c = np.concatenate(
        [
            [-1.0, 1.0, 0.0, -0.0, 1e-300, -1e-300],
            t,
            other,
            near,
            np.linspace(-1, 1, 2001),
            rng.uniform(-1, 1, 500),
        ]
    )
    return np.clip(c, -1.0, 1.0)


def test_threshold_table_layout() -> None:
    for m in MARGINS:
        assert list(_thr(m)[: m - 1]) == thresholds(m)


@pytest.mark.parametrize("m", MARGINS)
def test_psi_float64_bitwise_equals_chebyshev(lib, m) -> None:
    c = _nasty_c(m)
    psi, dpsi = _psi(lib, c, m)
    want_psi, want_dpsi = psi_and_derivative(c, m)
    assert np.array_equal(psi, want_psi)
    assert np.array_equal(dpsi, want_dpsi)


@pytest.mark.parametrize("m", MARGINS)
def test_psi_matches_acos_reference(lib, m) -> None:
    # 2-D rows with cos = c; the reference recomputes c from them with acos, sin and cos.
    c = _nasty_c(m, seed=m)
    x = np.stack([c, np.sqrt(np.maximum(0.0, 1.0 - c * c))], axis=1)
    w = np.tile([1.0, 0.0], (c.size, 1))
    _, _, _, _, _, c_ref, psi_ref, dpsi_ref, _ = reference._stats(x, w, np.arange(c.size), m)
    psi, dpsi = _psi(lib, np.clip(c_ref, -1.0, 1.0), m)
    scale = 1.0 + m * m
    assert np.max(np.abs(psi - psi_ref)) <= 1e-12 * scale
    # psi' = m sin(m theta)/sin(theta) in the reference loses digits near theta = 0, pi.
    assert np.max(np.abs(dpsi - dpsi_ref)) <= 2e-8 * scale


@pytest.mark.parametrize("m", MARGINS)
def test_psi_finite_monotone_and_continuous(lib, m) -> None:
    c = np.unique(_nasty_c(m))
    psi, dpsi = _psi(lib, c, m)
    assert np.all(np.isfinite(psi)) and np.all(np.isfinite(dpsi))
    scale = 1.0 + m * m
    # psi decreases with theta, i.e. increases with c, and has no jumps (2 per k step).
    assert np.min(np.diff(psi)) >= -1e-12 * scale
    t = np.array(thresholds(m) if m > 1 else [0.0])
    p_lo, _ = _psi(lib, np.nextafter(t, -2.0), m)
    p_hi, _ = _psi(lib, np.nextafter(t, 2.0), m)
    assert np.max(np.abs(p_hi - p_lo)) <= 1e-9 * scale
    assert psi[0] == pytest.approx(-(2 * m - 1), abs=1e-9 * scale) and psi[-1] == 1.0  # theta = pi, 0


@pytest.mark.parametrize("m", MARGINS)
def test_psi_float32_close_to_float64(lib, m) -> None:
    # The float16/bfloat16 kernels keep statistics in float32: far inside their tolerances
    # (4e-3 forward, 1e-2 gradient).  Measured: psi 2e-8 and psi' 4e-6 (m = 64) of 1 + m^2,
    # too close to float32's own gradient tolerance (1e-5), one reason float32 inputs get
    # float64 statistics.
    c = _nasty_c(m).astype(np.float32)
    psi32, dpsi32 = _psi(lib, c, m)
    psi64, dpsi64 = _psi(lib, c.astype(np.float64), m)
    scale = 1.0 + m * m
    assert np.max(np.abs(psi32 - psi64)) <= 1e-7 * scale
    assert np.max(np.abs(dpsi32 - dpsi64)) <= 1e-5 * scale


# ------------------------------------------------------------------ format conversions


@pytest.fixture(autouse=True)
def _quiet_nan_casts():
    # The inputs include signalling NaNs and values that overflow the target format, whose
    # NumPy casts warn ("invalid", "overflow"); the project turns warnings into errors.
    with np.errstate(invalid="ignore", over="ignore"):
        yield


def _convert(lib, src, dst, bits: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(bits, dtype=np.uint64)
    out = np.empty_like(bits)
    assert lib.lsm_convert(*src, *dst, bits, out, bits.size) == 0
    return out


def _same(got_bits: np.ndarray, want: np.ndarray) -> None:
    """Bitwise equality, except that any NaN matches any NaN."""
    want_bits = want.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]).astype(np.uint64)
    got = got_bits.astype({2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]).view(want.dtype)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    bad = np.flatnonzero((got_bits != want_bits) & ~nan)
    assert bad.size == 0, (
        f"{bad.size} mismatches, first input #{bad[0]}: got {got_bits[bad[0]]:#x}, want {want_bits[bad[0]]:#x}"
    )


def _boundary_bits(e: int, m: int, keep: int, seed: int = 0) -> np.ndarray:
    """Bit patterns of an (e, m) format around every rounding boundary when dropping m - keep
    fraction bits: every exponent, low bits 0, 1, half-1, half, half+1, all ones, kept LSB
    odd and even, both signs, plus random patterns and the special values."""
    drop = m - keep
    half = 1 << (drop - 1)
    lows = [0, 1, half - 1, half, half + 1, (1 << drop) - 1, (1 << drop) - 2]
    rng = np.random.default_rng(seed)
    highs = [0, 1, 2, 3, (1 << keep) - 1, (1 << keep) - 2] + list(rng.integers(0, 1 << keep, 6))
    pats = []
    for exp in range(1 << e):
        for hi in highs:
            for lo in lows:
                pats.append((exp << m) | (int(hi) << drop) | lo)
    pats = np.array(pats, dtype=np.uint64)
    rand = rng.integers(0, 1 << (e + m), 200_000, dtype=np.uint64)
    both = np.concatenate([pats, rand])
    return np.concatenate([both, both | np.uint64(1 << (e + m))])


def test_float16_widening_exhaustive(lib) -> None:
    h = np.arange(1 << 16, dtype=np.uint64)
    vals = h.astype(np.uint16).view(np.float16)
    _same(_convert(lib, F16, F32, h), vals.astype(np.float32))
    _same(_convert(lib, F16, F64, h), vals.astype(np.float64))


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
def test_bfloat16_widening_exhaustive(lib) -> None:
    h = np.arange(1 << 16, dtype=np.uint64)
    vals = h.astype(np.uint16).view(BFLOAT16)
    _same(_convert(lib, BF16, F32, h), vals.astype(np.float32))
    _same(_convert(lib, BF16, F64, h), vals.astype(np.float32).astype(np.float64))


def test_float32_to_float64(lib) -> None:
    bits = _boundary_bits(8, 23, 23 - 1)
    _same(_convert(lib, F32, F64, bits), bits.astype(np.uint32).view(np.float32).astype(np.float64))


def test_float32_to_float16(lib) -> None:
    bits = _boundary_bits(8, 23, 10)
    _same(_convert(lib, F32, F16, bits), bits.astype(np.uint32).view(np.float32).astype(np.float16))


@pytest.mark.skipif(BFLOAT16 is None, reason="needs ml_dtypes")
def test_float32_to_bfloat16(lib) -> None:
    bits = _boundary_bits(8, 23, 7)
    _same(_convert(lib, F32, BF16, bits), bits.astype(np.uint32).view(np.float32).astype(BFLOAT16))


def test_float64_to_float32(lib) -> None:
    bits = _boundary_bits(11, 52, 23)
    _same(_convert(lib, F64, F32, bits), bits.view(np.float64).astype(np.float32))


def test_float64_to_float16(lib) -> None:
    bits = _boundary_bits(11, 52, 10)
    _same(_convert(lib, F64, F16, bits), bits.view(np.float64).astype(np.float16))


def _exact_round(v: float, e: int, m: int) -> int:
    """Round-to-nearest-even of a double into the (e, m) format, in exact rational arithmetic."""
    sign = (1 << (e + m)) if math.copysign(1.0, v) < 0 else 0
    bias = (1 << (e - 1)) - 1
    if math.isinf(v):
        return sign | (((1 << e) - 1) << m)
    a = Fraction(abs(v))
    if a == 0:
        return sign
    ex = max(a.numerator.bit_length() - a.denominator.bit_length() - 1, 1 - bias)
    while Fraction(2) ** (ex + 1) <= a:
        ex += 1
    q = a / Fraction(2) ** (ex - m)  # significand in units of the last kept bit
    n, r = divmod(q.numerator, q.denominator)
    r2 = 2 * r
    if r2 > q.denominator or (r2 == q.denominator and n % 2 == 1):
        n += 1
    if n == 1 << (m + 1):
        n, ex = 1 << m, ex + 1
    if ex + bias >= (1 << e) - 1:
        return sign | (((1 << e) - 1) << m)
    if n < (1 << m):  # subnormal (ex is at its minimum)
        return sign | n
    return sign | ((ex + bias) << m) | (n - (1 << m))


def test_float64_to_bfloat16(lib) -> None:
    rng = np.random.default_rng(3)
    bits = _boundary_bits(11, 52, 7, seed=3)
    bits = bits[(bits >> np.uint64(52) & np.uint64(0x7FF)) != 0x7FF]  # finite values
    bits = np.concatenate([bits[rng.choice(bits.size, 20_000, replace=False)], bits[:3000]])
    got = _convert(lib, F64, BF16, bits)
    want = np.array([_exact_round(float(v), 8, 7) for v in bits.view(np.float64)], dtype=np.uint64)
    assert np.array_equal(got, want)
    assert _exact_round(1.0 + 2.0**-8, 8, 7) == 0x3F80  # a tie rounds to even


def test_identity_and_specials(lib) -> None:
    bits = _boundary_bits(11, 52, 23)
    assert np.array_equal(_convert(lib, F64, F64, bits), bits)
    specials = np.array([np.inf, -np.inf, np.nan, -0.0, 0.0, 1e300, -1e-300], dtype=np.float64)
    out = _convert(lib, F64, F16, specials.view(np.uint64)).astype(np.uint16).view(np.float16)
    assert np.isposinf(out[0]) and np.isneginf(out[1]) and np.isnan(out[2])
    assert (
        np.signbit(out[3])
        and not np.signbit(out[4])
        and np.isposinf(out[5])
        and out[6] == 0
        and np.signbit(out[6])
    )


# ------------------------------------------------------------------ per-sample statistics


def test_scale_exponent(lib) -> None:
    f64, f32 = lib.lsm_scale_exponent_f64, lib.lsm_scale_exponent_f32
    assert f64(0.0) == 0 and f64(1.0) == 1 and f64(0.75) == 0 and f64(3.0) == 2
    assert f64(5e-324) == -1023 and f64(1.7e308) == 1022  # clamped: 2^-e stays a normal double
    assert f32(0.0) == 0 and f32(1.0) == 1 and f32(1e-45) == -127 and f32(3e38) == 126


def _sample(lib, sxx, sww, sxw, ex, ew, m, g, beta) -> dict[str, float]:
    out = np.empty(12)
    lib.lsm_sample_f64(sxx, sww, sxw, ex, ew, m, _thr(m), g, beta, out)
    keys = ["rel_a", "rel_b", "c", "psi", "dpsi", "ok", "target", "gx_scale", "kw", "kx", "alpha", "eps"]
    return dict(zip(keys, out))


@pytest.mark.parametrize("beta", [0.0, 0.5, 100.0])
def test_zero_norm_convention(lib, beta) -> None:
    for sxx, sww in [(0.0, 2.0), (3.0, 0.0), (0.0, 0.0)]:
        s = _sample(lib, sxx, sww, 0.0, 0, 3, 4, g=2.0, beta=beta)
        # No angle: plain linear, as for margin 1 (psi = c = 0, psi' = 1), so q_i = r_i = 0.
        assert s["ok"] == 0 and s["psi"] == 0 and s["dpsi"] == 1 and s["c"] == 0 and s["target"] == 0
        assert s["kw"] == 0 and s["kx"] == 0 and s["alpha"] == 0 and s["eps"] == 0


def _scaled_sums(x: np.ndarray, w: np.ndarray) -> tuple[float, float, float, int, int]:
    ex, ew = (math.frexp(float(np.max(np.abs(v))))[1] for v in (x, w))
    ux, uw = np.ldexp(x, -ex), np.ldexp(w, -ew)
    return float(ux @ ux), float(uw @ uw), float(ux @ uw), ex, ew


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 64])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (1e140, 1e-140), (1e-140, 1e-140), (1e150, 1e150)])
def test_target_and_coefficients(lib, m, scales) -> None:
    """Against reference.py's target and the NumPy backend's q_i, r_i formulas."""
    rng = np.random.default_rng(m)
    x, w = rng.standard_normal(5) * scales[0], rng.standard_normal(5) * scales[1]
    beta, g = 0.7, -1.3
    sums = _scaled_sums(x, w)
    s = _sample(lib, *sums, m, g, beta)
    want = reference.forward(x[None], w[None], np.array([0]), margin=m, beta=beta)[0, 0]
    assert s["target"] == pytest.approx(
        want, rel=1e-12, abs=1e-13 * (1 + m * m) * np.linalg.norm(x) * np.linalg.norm(w)
    )
    _, _, _, a, b, c, psi, dpsi, _ = reference._stats(x[None], w[None], np.array([0]), m)
    a, b, c, psi, dpsi = (float(v[0]) for v in (a, b, c, psi, dpsi))
    xh, wh = x / a, w / b
    inv = 1 / (1 + beta)
    q = g * b * ((dpsi - 1) * inv * wh + (psi - c * dpsi) * inv * xh)
    r = g * a * ((dpsi - 1) * inv * xh + (psi - c * dpsi) * inv * wh)
    ux, uw = np.ldexp(x, -sums[3]), np.ldexp(w, -sums[4])
    q_got = s["gx_scale"] * (s["kw"] * uw + s["kx"] * ux)
    r_got = s["alpha"] * x + np.ldexp(s["eps"], sums[3]) * uw
    k = 1 + m * m
    np.testing.assert_allclose(q_got, q, rtol=0, atol=1e-11 * abs(g) * b * k)
    np.testing.assert_allclose(r_got, r, rtol=0, atol=1e-11 * abs(g) * a * k)


@pytest.mark.parametrize("m", [2, 5, 64])
@pytest.mark.parametrize("shift", [(1000, -1000), (-1000, 1015), (-1000, -20), (1015, 0)])
def test_extreme_norms_are_exact_rescalings(lib, m, shift) -> None:
    """Rows scaled by 2^sx and 2^sw (norms from ~1e-301 to ~1e306, inputs still normal) give the
    results for unscaled rows rescaled exactly, where products a*b or ratios a/b alone
    would overflow or underflow: the power-of-two factors never meet in one operation."""
    rng = np.random.default_rng(m)
    x, w = rng.standard_normal(5), rng.standard_normal(5)
    sx, sw = shift
    base = _sample(lib, *_scaled_sums(x, w), m, -1.3, 0.7)
    big = _sample(lib, *_scaled_sums(np.ldexp(x, sx), np.ldexp(w, sw)), m, -1.3, 0.7)
    for key in ("rel_a", "rel_b", "c", "psi", "dpsi", "kw", "kx", "alpha"):
        assert big[key] == base[key], key
    assert big["target"] == np.ldexp(base["target"], sx + sw)
    assert big["gx_scale"] == np.ldexp(base["gx_scale"], sw)
    assert big["eps"] == base["eps"]  # the kernel applies 2^ex itself
