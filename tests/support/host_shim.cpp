// ctypes entry points over kernels/lsoftmax_math.cuh, built with g++ by tests/support/kernel_host.py.
// Loops over arrays only; every number is computed by the header's own functions.
#include "lsoftmax_math.cuh"

namespace {

template <int E1, int M1, int E2, int M2>
void convert_array(const unsigned long long* in, unsigned long long* out, long long n) {
  for (long long i = 0; i < n; ++i) out[i] = lsm::convert_bits<E1, M1, E2, M2>(in[i]);
}

template <typename S>
void psi_array(const S* c, long long n, int m, const double* thr, S* psi, S* dpsi) {
  for (long long i = 0; i < n; ++i) lsm::psi_and_derivative(c[i], m, thr, &psi[i], &dpsi[i]);
}

}  // namespace

extern "C" {

// Conversions between the formats the kernels use: (E, M) of float64 (11, 52), float32
// (8, 23), float16 (5, 10), bfloat16 (8, 7).  Returns 0, or 1 for a pair not instantiated.
int lsm_convert(int e1, int m1, int e2, int m2, const unsigned long long* in, unsigned long long* out,
                long long n) {
#define LSM_PAIR(A, B, C, D)                  \
  if (e1 == A && m1 == B && e2 == C && m2 == D) { \
    convert_array<A, B, C, D>(in, out, n);    \
    return 0;                                 \
  }
  LSM_PAIR(11, 52, 8, 23)
  LSM_PAIR(11, 52, 5, 10)
  LSM_PAIR(11, 52, 8, 7)
  LSM_PAIR(8, 23, 11, 52)
  LSM_PAIR(5, 10, 11, 52)
  LSM_PAIR(8, 7, 11, 52)
  LSM_PAIR(5, 10, 8, 23)
  LSM_PAIR(8, 7, 8, 23)
  LSM_PAIR(8, 23, 5, 10)
  LSM_PAIR(8, 23, 8, 7)
  LSM_PAIR(11, 52, 11, 52)
#undef LSM_PAIR
  return 1;
}

void lsm_psi_f64(const double* c, long long n, int m, const double* thr, double* psi, double* dpsi) {
  psi_array(c, n, m, thr, psi, dpsi);
}

void lsm_psi_f32(const float* c, long long n, int m, const double* thr, float* psi, float* dpsi) {
  psi_array(c, n, m, thr, psi, dpsi);
}

int lsm_scale_exponent_f64(double amax) { return lsm::scale_exponent(amax); }
int lsm_scale_exponent_f32(float amax) { return lsm::scale_exponent(amax); }

// out = {rel_a, rel_b, c, psi, dpsi, ok, target_logit, gx_scale, kw, kx, alpha, eps}
void lsm_sample_f64(double sxx, double sww, double sxw, int ex, int ew, int m, const double* thr, double g,
                    double beta, double* out) {
  const lsm::RowStats<double> st = lsm::finish_stats(sxx, sww, sxw, ex, ew, m, thr);
  const lsm::Coefficients k = lsm::backward_coefficients(st, g, beta);
  const double v[12] = {st.rel_a, st.rel_b, st.c,        st.psi, st.dpsi, st.ok ? 1.0 : 0.0,
                        lsm::target_logit(st, beta), k.gx_scale, k.kw, k.kx, k.alpha, k.eps};
  for (int i = 0; i < 12; ++i) out[i] = v[i];
}

}  // extern "C"
