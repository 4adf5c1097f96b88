// The scalar maths of L-Softmax, shared by the CUDA kernels (NVRTC) and the host C++ tests (g++).
//
// Everything here is plain C++ on scalars: no CUDA headers, no libraries.  The kernels in
// lsoftmax.cu include this file; tests/support/host_shim.cpp compiles the same file with g++ so the
// CPU tests run exactly this code against lsoftmax_core/_chebyshev.py and tests/support/reference.py.
//
// Bitwise agreement with the NumPy backend (double): the Chebyshev recurrences below are
// written in the same operation order as _chebyshev.py, the interval thresholds cos(j*pi/m)
// are the very numbers _chebyshev.thresholds() computes (passed in as a table), and the
// kernels are compiled with --fmad=false (NVRTC) / -ffp-contract=off (g++) so that no
// multiply-add is fused behind our back.  Where a fused multiply-add is wanted it is written
// as lsm::fma_, which is the correctly rounded fma on both sides.
//
// Number formats.  Storage is handled as raw bits and converted with convert_bits() below,
// a correctly rounded (round-to-nearest-even) conversion between IEEE binary formats.  Two
// reasons: (1) float16/bfloat16 need no cuda_fp16.h / cuda_bf16.h, which NVRTC cannot find
// on its own in a pip-installed CuPy; (2) CuPy compiles every RawModule with -ftz=true,
// which turns the float<->double conversion instructions into their flush-to-zero forms
// (cvt.ftz.f64.f32, cvt.rn.ftz.f32.f64): float32 subnormal inputs would read as 0 and
// subnormal results would be written as 0.  Integer conversions are immune to -ftz.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define LSM_HD __host__ __device__ __forceinline__
#else
#include <math.h>
#define LSM_HD inline
#endif

namespace lsm {

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;

// ---------------------------------------------------------------- bit casts and helpers

LSM_HD u64 bits_of(double v) {
#ifdef __CUDA_ARCH__
  return (u64)__double_as_longlong(v);
#else
  u64 u;
  __builtin_memcpy(&u, &v, 8);
  return u;
#endif
}

LSM_HD double double_of(u64 u) {
#ifdef __CUDA_ARCH__
  return __longlong_as_double((long long)u);
#else
  double v;
  __builtin_memcpy(&v, &u, 8);
  return v;
#endif
}

LSM_HD u32 bits_of(float v) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(v);
#else
  u32 u;
  __builtin_memcpy(&u, &v, 4);
  return u;
#endif
}

LSM_HD float float_of(u32 u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float v;
  __builtin_memcpy(&v, &u, 4);
  return v;
#endif
}

// Index of the highest set bit of v != 0.
LSM_HD int msb_index(u64 v) {
#ifdef __CUDA_ARCH__
  return 63 - __clzll((long long)v);
#else
  return 63 - __builtin_clzll(v);
#endif
}

LSM_HD double fma_(double a, double b, double c) { return fma(a, b, c); }
LSM_HD float fma_(float a, float b, float c) { return fmaf(a, b, c); }
LSM_HD double sqrt_(double v) { return sqrt(v); }
LSM_HD float sqrt_(float v) { return sqrtf(v); }
LSM_HD double abs_(double v) { return fabs(v); }
LSM_HD float abs_(float v) { return fabsf(v); }
LSM_HD double ldexp_(double v, int e) { return ldexp(v, e); }
LSM_HD float ldexp_(float v, int e) { return ldexpf(v, e); }
LSM_HD double frexp_(double v, int* e) { return frexp(v, e); }
LSM_HD float frexp_(float v, int* e) { return frexpf(v, e); }

// ---------------------------------------------------------------- IEEE format conversion

// Shift a fraction field from M1 to M2 bits (left when widening); both are constants.
template <int M1, int M2>
LSM_HD u64 shift_fraction(u64 frac) {
  return M2 >= M1 ? (frac << ((M2 - M1) & 63)) : (frac >> ((M1 - M2) & 63));
}

// Convert the bits of an IEEE binary number with E1 exponent and M1 fraction bits into the
// format (E2, M2), rounding to nearest, ties to even, with gradual underflow, overflow to
// infinity and NaN kept NaN (quiet, sign kept, payload not preserved).  Exact whenever the
// value is representable in the target, which covers every widening used here.
template <int E1, int M1, int E2, int M2>
LSM_HD u64 convert_bits(u64 in) {
  if (E1 == E2 && M1 == M2) return in;
  const u64 exp_all1 = (1ull << E1) - 1;
  const u64 sign = (in >> (E1 + M1)) & 1ull;
  const u64 exp = (in >> M1) & exp_all1;
  const u64 frac = in & ((1ull << M1) - 1);
  const u64 out_sign = sign << (E2 + M2);
  const int bias1 = (1 << (E1 - 1)) - 1;
  const int bias2 = (1 << (E2 - 1)) - 1;
  const int emax2 = (1 << E2) - 1;
  if (exp == exp_all1) {  // infinity or NaN
    const u64 inf = out_sign | ((u64)emax2 << M2);
    return frac == 0 ? inf : (inf | (1ull << (M2 - 1)));
  }
  if (exp == 0 && frac == 0) return out_sign;  // signed zero
  // Widening fast path: a normal number stays normal and exact.
  if (E2 >= E1 && M2 >= M1 && exp != 0) {
    return out_sign | ((u64)((int)exp - bias1 + bias2) << M2) | shift_fraction<M1, M2>(frac);
  }
  // General path: value = sig * 2^e with an integer significand.
  u64 sig;
  int e;
  if (exp == 0) {
    sig = frac;
    e = 1 - bias1 - M1;
  } else {
    sig = frac | (1ull << M1);
    e = (int)exp - bias1 - M1;
  }
  const int p = msb_index(sig);  // value in [2^(p+e), 2^(p+e+1))
  int te = p + e + bias2;        // biased target exponent if the result is normal
  if (te >= emax2) return out_sign | ((u64)emax2 << M2);
  int shift = p - M2;  // low bits of sig that do not fit
  if (te < 1) {        // subnormal in the target: drop 1 - te more bits
    shift += 1 - te;
    te = 0;
  }
  u64 kept;
  if (shift <= 0) {
    kept = sig << (-shift);
  } else if (shift > 63) {
    kept = 0;  // below half the smallest subnormal (sig < 2^53 <= 2^(shift-1))
  } else {
    kept = sig >> shift;
    const u64 rem = sig & ((1ull << shift) - 1);
    const u64 half = 1ull << (shift - 1);
    if (rem > half || (rem == half && (kept & 1ull))) ++kept;
  }
  // kept carries the implicit bit 2^M2 for normal results, so adding it to (te-1)<<M2 gives
  // te<<M2 | fraction, and a rounding carry moves into the exponent (up to infinity).  For
  // subnormal results kept reaching 2^M2 is exactly the smallest normal number.
  const u64 mag = te >= 1 ? (((u64)(te - 1) << M2) + kept) : kept;
  return out_sign | mag;
}

// ---------------------------------------------------------------- storage formats

// Tags for the element formats of x, w and the outputs.  Storage is the raw bit type,
// Acc the type of the per-sample statistics: float64 for float32/float64 inputs (float32
// arithmetic would flush float32 subnormals under CuPy's -ftz=true, and float32
// recurrences at m = 64 use 40% of the float32 gradient tolerance), float32 for
// float16/bfloat16 inputs (every float16 value, and every bfloat16 value >= 2^-126, is a
// normal float32).
struct F64 {
  typedef u64 Storage;
  typedef double Acc;
  enum { E = 11, M = 52 };
};
struct F32 {
  typedef u32 Storage;
  typedef double Acc;
  enum { E = 8, M = 23 };
};
struct F16 {
  typedef u16 Storage;
  typedef float Acc;
  enum { E = 5, M = 10 };
};
struct BF16 {
  typedef u16 Storage;
  typedef float Acc;
  enum { E = 8, M = 7 };
};

template <typename A>
struct AccFormat;
template <>
struct AccFormat<double> {
  enum { E = 11, M = 52, MIN_SCALE_EXP = -1023, MAX_SCALE_EXP = 1022 };
  LSM_HD static double from_bits(u64 b) { return double_of(b); }
};
template <>
struct AccFormat<float> {
  enum { E = 8, M = 23, MIN_SCALE_EXP = -127, MAX_SCALE_EXP = 126 };
  LSM_HD static float from_bits(u64 b) { return float_of((u32)b); }
};

template <typename F>
LSM_HD typename F::Acc to_acc(typename F::Storage s) {
  typedef typename F::Acc A;
  return AccFormat<A>::from_bits(convert_bits<F::E, F::M, AccFormat<A>::E, AccFormat<A>::M>((u64)s));
}

template <typename F>
LSM_HD double to_double(typename F::Storage s) {
  return double_of(convert_bits<F::E, F::M, 11, 52>((u64)s));
}

template <typename F>
LSM_HD typename F::Storage from_double(double v) {
  return (typename F::Storage)convert_bits<11, 52, F::E, F::M>(bits_of(v));
}

// ---------------------------------------------------------------- psi (paper eq. 6)

// k = #{j in 1..m-1 : c <= cos(j*pi/m)} from the decreasing thresholds thr[0..m-2] (the
// values of _chebyshev.thresholds(m)), T_m(c) and U_{m-1}(c) by the three-term recurrences
// (stable on [-1, 1], no division by cos), psi = (-1)^k T_m - 2k, psi' = (-1)^k m U_{m-1}.
// Finite for every c in [-1, 1] and 1 <= m <= 64; psi' -> 0 at every threshold, so the
// choice of k exactly on a threshold does not matter.
template <typename S>
LSM_HD void psi_and_derivative(S c, int m, const double* thr, S* psi, S* dpsi) {
  int k = 0;
  for (int j = 0; j < m - 1; ++j) k += ((double)c <= thr[j]) ? 1 : 0;
  S t_prev = S(1), t = c;        // T_0, T_1
  S u_prev = S(0), u = S(1);     // U_{-1}, U_0
  for (int n = 1; n < m; ++n) {  // same operation order as _chebyshev.chebyshev_tu
    const S tn = S(2) * c * t - t_prev;
    const S un = S(2) * c * u - u_prev;
    t_prev = t;
    t = tn;
    u_prev = u;
    u = un;
  }
  const S sign = (k & 1) ? S(-1) : S(1);
  *psi = sign * t - S(2) * S(k);
  *dpsi = sign * S(m) * u;
}

// ---------------------------------------------------------------- per-sample statistics

// The kernels reduce each row scaled by a power of two, u = v * 2^-e with e from the row's
// largest |v| (exact scaling, so |x|^2 can neither overflow nor underflow), and pass the
// three sums here.  rel_* are the norms of the scaled rows: a = rel_a * 2^ex, b = rel_b * 2^ew.
template <typename S>
struct RowStats {
  S rel_a, rel_b, c, psi, dpsi;
  int ex, ew;
  bool ok;  // both norms nonzero; otherwise the zero-norm convention applies (plain linear)
};

// The exponent e with |v|max * 2^-e in [0.5, 1), clamped so that 2^-e is a normal number.
template <typename S>
LSM_HD int scale_exponent(S amax) {
  if (!(amax > S(0))) return 0;
  int e;
  frexp_(amax, &e);
  if (e < AccFormat<S>::MIN_SCALE_EXP) e = AccFormat<S>::MIN_SCALE_EXP;
  if (e > AccFormat<S>::MAX_SCALE_EXP) e = AccFormat<S>::MAX_SCALE_EXP;
  return e;
}

template <typename S>
LSM_HD RowStats<S> finish_stats(S sxx, S sww, S sxw, int ex, int ew, int m, const double* thr) {
  RowStats<S> st;
  st.rel_a = sqrt_(sxx);
  st.rel_b = sqrt_(sww);
  st.ex = ex;
  st.ew = ew;
  st.ok = sxx > S(0) && sww > S(0);
  S c = st.ok ? sxw / (st.rel_a * st.rel_b) : S(0);
  c = c > S(1) ? S(1) : (c < S(-1) ? S(-1) : c);  // rounding can push |c| just past 1
  st.c = c;
  psi_and_derivative(c, m, thr, &st.psi, &st.dpsi);
  if (!st.ok) {  // zero-norm row: no angle, no margin, as if m = 1 (c = psi = 0, psi' = 1)
    st.c = S(0);
    st.psi = S(0);
    st.dpsi = S(1);
  }
  return st;
}

// The target logit (docs/derivatives.md, "Forward" and "Numerics"), evaluated as
// ((rel_a*h)*rel_b) * 2^(ex+ew) in double so that neither a*b nor a*h over- or underflows on
// the way (the NumPy backend's (a*h)*b with the power-of-two factors kept apart).
template <typename S>
LSM_HD double target_logit(const RowStats<S>& st, double beta) {
  const double h = (beta * (double)st.c + (double)st.psi) / (1.0 + beta);
  return ldexp_(((double)st.rel_a * h) * (double)st.rel_b, st.ex + st.ew);
}

// Backward coefficients of one sample, for the terms q_i and r_i of docs/derivatives.md
// ("Backward at the cost of the plain layer"), with A = (psi' - 1)/(1+beta) and
// B = (psi - c psi')/(1+beta):
//   grad_x[i]  += q_i = gx_scale * (kw*uw + kx*ux)        (ux = x*2^-ex, uw = w_y*2^-ew)
//   grad_w[y]  += r_i = alpha * x + eps * 2^ex * uw
// Ratios of norms appear only as rel_b/rel_a or rel_a/rel_b (in [2^-1, 2*sqrt(D)] or so), g
// multiplies them, and the powers of two (gx_scale = 2^ew, and 2^ex) are applied once, last,
// so no intermediate over- or underflows (g*2^ew could overflow where q_i does not).  eps
// leaves out its 2^ex: lsm_backward_classes sums a class's r_i scaled by a common power of two.
struct Coefficients {
  double gx_scale, kw, kx;  // grad_x row correction
  double alpha, eps;        // grad_w class correction
};

template <typename S>
LSM_HD Coefficients backward_coefficients(const RowStats<S>& st, double g, double beta) {
  const double inv = 1.0 / (1.0 + beta);
  const double a_coef = ((double)st.dpsi - 1.0) * inv;
  const double b_coef = ((double)st.psi - (double)st.c * (double)st.dpsi) * inv;
  Coefficients k;
  k.gx_scale = ldexp_(1.0, st.ew);
  k.kw = g * a_coef;
  k.kx = st.ok ? g * b_coef * ((double)st.rel_b / (double)st.rel_a) : 0.0;
  k.alpha = g * a_coef;
  k.eps = st.ok ? g * b_coef * ((double)st.rel_a / (double)st.rel_b) : 0.0;
  return k;
}

}  // namespace lsm
