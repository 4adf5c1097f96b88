// CUDA kernels of the CuPy backend (lsoftmax_core/_cupy_backend.py).  The GEMMs run in
// cuBLAS; these kernels add the L-Softmax terms to their outputs (docs/derivatives.md), O(N*D)
// work in total.  Small problems run whole in one kernel each way, GEMMs included.
//
//   lsm_forward           one block per sample: the target logit of the GEMM output x @ w.T.
//   lsm_backward_rows     one block per sample: grad_x[i] += q_i, and the per-sample grad_w
//                         coefficients (alpha_i, eps_i, ex_i, ew_i) into the workspace `coef`.
//   lsm_backward_classes  one block per (sample, column tile); only the block of each class's
//                         FIRST sample works: it adds sum_{j in class} r_j to grad_w[class].
//   lsm_check_labels      margin 1 (a plain GEMM): only the label range check.
//   lsm_small_forward, lsm_small_backward   small problems: a whole forward or backward,
//                         GEMM included, in one launch (see "small problems" below).
//
// Determinism.  Every floating-point sum has a fixed order: per-thread loops in a fixed
// element order, block reductions by a fixed tree in shared memory, and the per-class sum
// of r_j by one block per class, over the class's samples in index order, split into lanes
// by member ordinal and combined by a fixed tree.  No floating-point atomics anywhere, so
// the same inputs give bitwise the same outputs on every run; the order depends only on
// N, C, D and the dtype, never on pointer alignment (vector and scalar loads feed the same
// per-element arithmetic).
//
// Per-class grouping without a sort.  The host zeroes classes[0..3C) (one cudaMemsetAsync,
// capturable in a CUDA graph); lsm_backward_rows then records, per class y, the first and
// the last sample index of y and the largest row scale exponent ex_i among its samples, with
// integer atomicMax on N - i, i + 1 and ex_i + lsm::EXP_BIAS (integer atomics: the result does
// not depend on their order).  The owner block scans labels[first..last]
// in chunks of LSM_BLOCK, compacts the matches in order (prefix sum in shared memory) and
// accumulates.  Cost: O(N*D) data plus the sum over classes of (last - first) label reads,
// small unless many classes each have several samples spread over a huge batch.
//
// Bad labels.  A sample whose label is outside [0, C) is skipped (its row stays the plain
// GEMM's) and reported through record_bad_label(): the first bad index wins an atomicMin
// on a device word and the call's serial number is stored into pinned, mapped host memory,
// which the host reads without synchronising.  No label is used as an index before the
// range check.
//
// Launch contract.  lsoftmax_core/_cupy_plan.py holds it: kernel names, grids, argument
// order, and the constants below, which reach this file only as compiler definitions
// (_cupy_plan.DEFINES, given to NVRTC and to the tests' g++ build alike): LSM_BLOCK, the
// threads per block of every launch (blockDim.x == LSM_BLOCK always), the bad-label op
// codes LSM_OP_FORWARD / LSM_OP_BACKWARD, and LSM_SMALL_MAX_N, the largest N the plan gives
// lsm_small_backward.  Every early return before a barrier is block-uniform (it depends
// only on blockIdx and on values all threads read the same), so no thread skips a
// __syncthreads another thread waits at.
#include "lsoftmax_math.cuh"

#if !defined(LSM_BLOCK) || !defined(LSM_OP_FORWARD) || !defined(LSM_OP_BACKWARD) || !defined(LSM_SMALL_MAX_N)
#error "compile with lsoftmax_core._cupy_plan.DEFINES (-DLSM_BLOCK=... -DLSM_OP_FORWARD=... -DLSM_OP_BACKWARD=... -DLSM_SMALL_MAX_N=...)"
#endif
static_assert(LSM_BLOCK >= 32 && LSM_BLOCK <= 1024 && (LSM_BLOCK & (LSM_BLOCK - 1)) == 0,
              "LSM_BLOCK must be a power of two in [32, 1024] (the reduction trees halve it)");
static_assert(LSM_OP_FORWARD != LSM_OP_BACKWARD, "the bad-label op codes must differ");

// Turing (sm_75) holds at most 1024 threads per SM, and there ptxas keeps a kernel to 64
// registers for full occupancy even when 128 are allowed, spilling one register in the
// float16/bfloat16 backward.  The minimum-blocks hint (4 blocks of LSM_BLOCK threads per
// SM) lets it use up to 128, which removes the spill.  Other targets keep the plain bound:
// the hint would raise their register counts (sm_80: 56 -> 69-82) and lower occupancy.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
#define LSM_BOUNDS __launch_bounds__(LSM_BLOCK, 4)
#else
#define LSM_BOUNDS __launch_bounds__(LSM_BLOCK)
#endif

namespace lsm {

// What a bad-label record says the reporting call was (_cupy_plan.OP_FORWARD / OP_BACKWARD).
enum Op : long long { OP_FORWARD = LSM_OP_FORWARD, OP_BACKWARD = LSM_OP_BACKWARD };

// 16-byte groups: each thread loads N consecutive elements with one 128-bit load when the
// row is 16-byte aligned, element by element otherwise (same values, same arithmetic).
template <typename F>
struct Group {
  typedef typename F::Storage S;
  enum { N = 16 / sizeof(S) };
  struct alignas(16) Pack {
    S v[N];
  };
};

__device__ __forceinline__ bool aligned16(const void* p) { return (((u64)p) & 15ull) == 0; }

template <typename F>
__device__ __forceinline__ int load_group(const typename F::Storage* row, bool aligned, long long d,
                                          long long g, typename F::Storage (&out)[Group<F>::N]) {
  typedef Group<F> G;
  const long long start = g * G::N;
  const long long left = d - start;
  const int cnt = left < G::N ? (int)left : (int)G::N;
  if (aligned && cnt == G::N) {
    const typename G::Pack pk = *reinterpret_cast<const typename G::Pack*>(row + start);
#pragma unroll
    for (int k = 0; k < G::N; ++k) out[k] = pk.v[k];
  } else {
#pragma unroll
    for (int k = 0; k < G::N; ++k) out[k] = k < cnt ? row[start + k] : (typename F::Storage)0;
  }
  return cnt;
}

template <typename F>
__device__ __forceinline__ void store_group(typename F::Storage* row, bool aligned, long long g, int cnt,
                                            const typename F::Storage (&in)[Group<F>::N]) {
  typedef Group<F> G;
  const long long start = g * G::N;
  if (aligned && cnt == G::N) {
    typename G::Pack pk;
#pragma unroll
    for (int k = 0; k < G::N; ++k) pk.v[k] = in[k];
    *reinterpret_cast<typename G::Pack*>(row + start) = pk;
  } else {
#pragma unroll
    for (int k = 0; k < G::N; ++k)
      if (k < cnt) row[start + k] = in[k];
  }
}

// Fixed-tree block reductions of K values per thread; the result is in every thread.
// The tree's shape depends only on LSM_BLOCK, so a sum is the same bits on every run.
struct SumOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return b > a ? b : a; }
};

template <typename Op, typename V, int K>
__device__ __forceinline__ void block_reduce(V (&v)[K], V* sh, Op op) {
  const int t = threadIdx.x;
#pragma unroll
  for (int q = 0; q < K; ++q) sh[q * LSM_BLOCK + t] = v[q];
  __syncthreads();
  for (int s = LSM_BLOCK / 2; s > 0; s >>= 1) {
    if (t < s) {
#pragma unroll
      for (int q = 0; q < K; ++q) sh[q * LSM_BLOCK + t] = op(sh[q * LSM_BLOCK + t], sh[q * LSM_BLOCK + t + s]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < K; ++q) v[q] = sh[q * LSM_BLOCK];
  __syncthreads();  // sh is reused by the next reduction
}

// Row scale exponents (scale_exponent: [-1023, 1022]) are stored in classes[] as unsigned
// ex + EXP_BIAS, so that 0, the cleared value, is below every stored one.
enum { EXP_BIAS = 2048 };

template <typename A>
struct RowSums {
  A xx, ww, xw;
  int ex, ew;
};

// Calls f(x_k, w_k) (as Acc values) for this thread's elements of the rows xr and wr: the
// 16-byte groups g = threadIdx.x, threadIdx.x + LSM_BLOCK, ..., in order within a thread.
template <typename F, typename Fn>
__device__ __forceinline__ void for_each_pair(const typename F::Storage* xr, bool xa,
                                              const typename F::Storage* wr, bool wa, long long d, Fn f) {
  typedef typename F::Storage S;
  const int N = Group<F>::N;
  const long long ngroups = (d + N - 1) / N;
  for (long long g = threadIdx.x; g < ngroups; g += LSM_BLOCK) {
    S bx[Group<F>::N], bw[Group<F>::N];
    const int cnt = load_group<F>(xr, xa, d, g, bx);
    load_group<F>(wr, wa, d, g, bw);
#pragma unroll
    for (int k = 0; k < Group<F>::N; ++k) {
      if (k < cnt) f(to_acc<F>(bx[k]), to_acc<F>(bw[k]));
    }
  }
}

// Scaled sums of one sample row x_i and its class row w_y, in every thread of the block.
// Pass 1 finds max|x| and max|w| (for the power-of-two scales), pass 2 sums the scaled
// squares and products with fma; both passes read the rows (the second from L1/L2).
template <typename F>
__device__ RowSums<typename F::Acc> row_sums(const typename F::Storage* xr, const typename F::Storage* wr,
                                             long long d, typename F::Acc* red) {
  typedef typename F::Acc A;
  const bool xa = aligned16(xr), wa = aligned16(wr);
  A amax[2] = {A(0), A(0)};
  for_each_pair<F>(xr, xa, wr, wa, d, [&](A vx, A vw) {
    vx = abs_(vx);
    vw = abs_(vw);
    if (vx > amax[0]) amax[0] = vx;
    if (vw > amax[1]) amax[1] = vw;
  });
  block_reduce(amax, red, MaxOp());
  RowSums<A> r;
  r.ex = scale_exponent(amax[0]);
  r.ew = scale_exponent(amax[1]);
  const A sx = ldexp_(A(1), -r.ex), sw = ldexp_(A(1), -r.ew);
  A s[3] = {A(0), A(0), A(0)};
  for_each_pair<F>(xr, xa, wr, wa, d, [&](A vx, A vw) {
    const A ux = vx * sx, uw = vw * sw;
    s[0] = fma_(ux, ux, s[0]);
    s[1] = fma_(uw, uw, s[1]);
    s[2] = fma_(ux, uw, s[2]);
  });
  block_reduce(s, red, SumOp());
  r.xx = s[0];
  r.ww = s[1];
  r.xw = s[2];
  return r;
}

// Report a label outside [0, C).  err_rec is pinned host memory mapped into the device
// address space: {serial of the bad call, C, op (an lsm::Op), unused}.  Only the
// first bad call since the host last read the record writes it; err_key keeps the smallest
// bad index (high 32 bits) with its label saturated to int32 (low 32 bits).
__device__ __forceinline__ void record_bad_label(long long i, long long y, long long c, u64* err_key,
                                                 u64 err_rec, long long serial, long long op) {
  volatile long long* rec = reinterpret_cast<volatile long long*>(err_rec);
  const long long pending = rec[0];
  if (pending != 0 && pending != serial) return;
  const long long v = y < -2147483647LL - 1 ? -2147483647LL - 1 : (y > 2147483647LL ? 2147483647LL : y);
  atomicMin(err_key, ((u64)i << 32) | (u64)(u32)(int)v);
  rec[1] = c;
  rec[2] = op;
  __threadfence_system();
  rec[0] = serial;
}

__device__ __forceinline__ const double* thresholds_for(const double* table, long long margin) {
  return table + (margin - 1) * (margin - 2) / 2;  // table = thresholds(1) + ... + thresholds(64)
}

}  // namespace lsm

template <typename L>
__global__ void LSM_BOUNDS
    lsm_check_labels(const L* __restrict__ label, long long n, long long c, lsm::u64* err_key,
                     lsm::u64 err_rec, long long serial, long long op) {
  const long long i = (long long)blockIdx.x * LSM_BLOCK + threadIdx.x;
  if (i < n) {
    const long long y = (long long)label[i];
    if (y < 0 || y >= c) lsm::record_bad_label(i, y, c, err_key, err_rec, serial, op);
  }
}

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_forward(const typename F::Storage* __restrict__ x, const typename F::Storage* __restrict__ w,
                const L* __restrict__ label, typename F::Storage* __restrict__ logits, long long n,
                long long c, long long d, long long margin, double beta,
                const double* __restrict__ thresholds, lsm::u64* err_key, lsm::u64 err_rec,
                long long serial) {
  typedef typename F::Acc A;
  __shared__ A red[3 * LSM_BLOCK];
  const long long i = blockIdx.x;
  const long long y = (long long)label[i];
  if (y < 0 || y >= c) {
    if (threadIdx.x == 0) lsm::record_bad_label(i, y, c, err_key, err_rec, serial, lsm::OP_FORWARD);
    return;
  }
  const lsm::RowSums<A> s = lsm::row_sums<F>(x + i * d, w + y * d, d, red);
  if (threadIdx.x == 0) {
    const lsm::RowStats<A> st =
        lsm::finish_stats(s.xx, s.ww, s.xw, s.ex, s.ew, (int)margin, lsm::thresholds_for(thresholds, margin));
    logits[i * c + y] = lsm::from_double<F>(lsm::target_logit(st, beta));
  }
}

namespace lsm {

// The body of lsm_backward_rows, shared with lsm_loss_margin_rows: g_i, the target entry of
// G, is read from grad_logits[i*C + y] (VEC false) or from the float64 N-vector gvec (VEC true).
template <typename F, typename L, bool VEC>
__device__ __forceinline__ void backward_rows(const typename F::Storage* __restrict__ grad_logits,
                      const double* __restrict__ gvec,
                      const typename F::Storage* __restrict__ x, const typename F::Storage* __restrict__ w,
                      const L* __restrict__ label, typename F::Storage* __restrict__ grad_x,
                      double* __restrict__ coef, lsm::u32* __restrict__ classes, long long n,
                      long long c, long long d, long long margin, double beta,
                      const double* __restrict__ thresholds, lsm::u64* err_key, lsm::u64 err_rec,
                      long long serial, long long op) {
  typedef typename F::Acc A;
  typedef typename F::Storage S;
  typedef lsm::Group<F> G;
  __shared__ A red[3 * LSM_BLOCK];
  __shared__ double k_sh[3];
  const long long i = blockIdx.x;
  const long long y = (long long)label[i];
  if (y < 0 || y >= c) {
    if (threadIdx.x == 0) lsm::record_bad_label(i, y, c, err_key, err_rec, serial, op);
    return;
  }
  const S* xr = x + i * d;
  const S* wr = w + y * d;
  const lsm::RowSums<A> s = lsm::row_sums<F>(xr, wr, d, red);
  if (threadIdx.x == 0) {
    const lsm::RowStats<A> st =
        lsm::finish_stats(s.xx, s.ww, s.xw, s.ex, s.ew, (int)margin, lsm::thresholds_for(thresholds, margin));
    const double g = VEC ? gvec[i] : lsm::to_double<F>(grad_logits[i * c + y]);
    const lsm::Coefficients k = lsm::backward_coefficients(st, g, beta);
    coef[4 * i] = k.alpha;
    coef[4 * i + 1] = k.eps;  // of uw * 2^ex
    coef[4 * i + 2] = (double)s.ex;
    coef[4 * i + 3] = (double)s.ew;
    atomicMax(&classes[3 * y], (lsm::u32)(n - i));                      // first sample of class y
    atomicMax(&classes[3 * y + 1], (lsm::u32)(i + 1));                  // last sample of class y
    atomicMax(&classes[3 * y + 2], (lsm::u32)(s.ex + lsm::EXP_BIAS));  // largest ex of class y
    k_sh[0] = k.gx_scale;
    k_sh[1] = k.kw;
    k_sh[2] = k.kx;
  }
  __syncthreads();
  // grad_x[i] += gx_scale * (kw * w_y*2^-ew + kx * x_i*2^-ex), in double, rounded once.
  const double gx_scale = k_sh[0], kw = k_sh[1], kx = k_sh[2];
  const double sx = lsm::ldexp_(1.0, -s.ex), sw = lsm::ldexp_(1.0, -s.ew);
  S* gr = grad_x + i * d;
  const bool xa = lsm::aligned16(xr), wa = lsm::aligned16(wr), ga = lsm::aligned16(gr);
  const long long ngroups = (d + G::N - 1) / G::N;
  for (long long g = threadIdx.x; g < ngroups; g += LSM_BLOCK) {
    S bx[G::N], bw[G::N], bg[G::N];
    const int cnt = lsm::load_group<F>(xr, xa, d, g, bx);
    lsm::load_group<F>(wr, wa, d, g, bw);
    lsm::load_group<F>(gr, ga, d, g, bg);
#pragma unroll
    for (int k = 0; k < G::N; ++k) {
      if (k < cnt) {
        const double ux = lsm::to_double<F>(bx[k]) * sx, uw = lsm::to_double<F>(bw[k]) * sw;
        const double inner = lsm::fma_(kw, uw, kx * ux);
        bg[k] = lsm::from_double<F>(lsm::fma_(gx_scale, inner, lsm::to_double<F>(bg[k])));
      }
    }
    lsm::store_group<F>(gr, ga, g, cnt, bg);
  }
}

}  // namespace lsm

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_backward_rows(const typename F::Storage* __restrict__ grad_logits,
                      const typename F::Storage* __restrict__ x, const typename F::Storage* __restrict__ w,
                      const L* __restrict__ label, typename F::Storage* __restrict__ grad_x,
                      double* __restrict__ coef, lsm::u32* __restrict__ classes, long long n,
                      long long c, long long d, long long margin, double beta,
                      const double* __restrict__ thresholds, lsm::u64* err_key, lsm::u64 err_rec,
                      long long serial) {
  lsm::backward_rows<F, L, false>(grad_logits, nullptr, x, w, label, grad_x, coef, classes, n, c, d, margin,
                                  beta, thresholds, err_key, err_rec, serial, lsm::OP_BACKWARD);
}

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_backward_classes(const typename F::Storage* __restrict__ x, const typename F::Storage* __restrict__ w,
                         const L* __restrict__ label, typename F::Storage* __restrict__ grad_w,
                         const double* __restrict__ coef, const lsm::u32* __restrict__ classes, long long n,
                         long long c, long long d, long long kcols) {
  typedef typename F::Storage S;
  typedef lsm::Group<F> G;
  __shared__ int scan[LSM_BLOCK];
  __shared__ long long members[LSM_BLOCK];
  __shared__ double red[G::N * LSM_BLOCK];
  __shared__ double eps_sh;
  const long long i = blockIdx.x;
  const long long y = (long long)label[i];
  if (y < 0 || y >= c) return;  // reported by lsm_backward_rows
  if (classes[3 * y] != (lsm::u32)(n - i)) return;  // i is not the first sample of y
  const long long last = (long long)classes[3 * y + 1] - 1;
  // float64 rows: the class's sum is formed scaled by 2^-E, E the largest ex_j of its
  // samples, so that neither alpha_j x_j nor eps_j 2^ex_j overflows when the sum does not;
  // 2^E is applied once, in the final fma.  Narrower inputs (|x| < 2^128) cannot overflow
  // the float64 sums: E = 0, and the scaling folds away (no extra registers, which the
  // 16-bit instantiations on sm_70 have none to spare).
  const bool wide = sizeof(S) == 8;
  const int E = wide ? (int)classes[3 * y + 2] - lsm::EXP_BIAS : 0;
  const double se = wide ? lsm::ldexp_(1.0, -E) : 1.0;
  // Thread layout: K column groups x R member lanes (K * R == LSM_BLOCK, both powers of two;
  // K depends only on D and the dtype).  Member number o (in index order) goes to lane o % R.
  const int t = threadIdx.x;
  const int K = (int)kcols, R = LSM_BLOCK / K;
  const int col = t % K, lane = t / K;
  const long long g = (long long)blockIdx.y * K + col;
  const long long ngroups = (d + G::N - 1) / G::N;
  const bool active = g < ngroups;
  double acc[G::N];
#pragma unroll
  for (int k = 0; k < G::N; ++k) acc[k] = 0.0;
  double eps_total = 0.0;  // thread 0: sum of eps_j in index order
  long long ordinal = 0;   // members found in earlier chunks
  for (long long j0 = i; j0 <= last; j0 += LSM_BLOCK) {
    const long long j = j0 + t;
    const int match = (j <= last && (long long)label[j] == y) ? 1 : 0;
    scan[t] = match;
    __syncthreads();
    for (int off = 1; off < LSM_BLOCK; off <<= 1) {  // inclusive prefix sum (Hillis-Steele)
      const int v = t >= off ? scan[t - off] : 0;
      __syncthreads();
      scan[t] += v;
      __syncthreads();
    }
    const int count = scan[LSM_BLOCK - 1];
    if (match) members[scan[t] - 1] = j;
    __syncthreads();
    if (active) {
      const int p0 = (int)(((lane - ordinal) % R + R) % R);
      for (int p = p0; p < count; p += R) {
        const long long jj = members[p];
        const S* xr = x + jj * d;
        const double alpha = coef[4 * jj];
        S bx[G::N];
        const int cnt = lsm::load_group<F>(xr, lsm::aligned16(xr), d, g, bx);
#pragma unroll
        for (int k = 0; k < G::N; ++k)
          if (k < cnt) acc[k] = lsm::fma_(alpha, lsm::to_double<F>(bx[k]) * se, acc[k]);
      }
    }
    if (t == 0) {
      for (int p = 0; p < count; ++p) {
        const long long jj = members[p];
        eps_total += lsm::ldexp_(coef[4 * jj + 1], (int)coef[4 * jj + 2] - E);
      }
    }
    ordinal += count;
    __syncthreads();  // scan and members are rewritten by the next chunk
  }
#pragma unroll
  for (int k = 0; k < G::N; ++k) red[k * LSM_BLOCK + t] = acc[k];
  if (t == 0) eps_sh = eps_total;
  __syncthreads();
  for (int sft = R / 2; sft > 0; sft >>= 1) {  // fixed tree over the lanes
    if (lane < sft) {
#pragma unroll
      for (int k = 0; k < G::N; ++k) red[k * LSM_BLOCK + t] += red[k * LSM_BLOCK + t + sft * K];
    }
    __syncthreads();
  }
  if (lane == 0 && active) {
    // grad_w[y] += 2^E * (sum_j alpha_j x_j 2^-E + (sum_j eps_j 2^(ex_j-E)) * w_y 2^-ew), rounded once.
    const double sw = lsm::ldexp_(1.0, -(int)coef[4 * i + 3]), scale = wide ? lsm::ldexp_(1.0, E) : 1.0;
    const double eps = eps_sh;
    const S* wr = w + y * d;
    S* gr = grad_w + y * d;
    const bool wa = lsm::aligned16(wr), ga = lsm::aligned16(gr);
    S bw[G::N], bg[G::N];
    const int cnt = lsm::load_group<F>(wr, wa, d, g, bw);
    lsm::load_group<F>(gr, ga, d, g, bg);
#pragma unroll
    for (int k = 0; k < G::N; ++k) {
      if (k < cnt) {
        const double total = lsm::fma_(eps, lsm::to_double<F>(bw[k]) * sw, red[k * LSM_BLOCK + t]);
        bg[k] = lsm::from_double<F>(lsm::fma_(scale, total, lsm::to_double<F>(bg[k])));
      }
    }
    lsm::store_group<F>(gr, ga, g, cnt, bg);
  }
}

// ---------------------------------------------------------------- small problems
// At sizes where the GEMMs are a few thousand multiply-adds (the seed's 256x2x10), a call's
// cost is its host-side CUDA calls, and cuBLAS's three GEMMs are most of it.  These two
// kernels do a whole forward or backward each, GEMM included, in one launch and without a
// workspace (_cupy_plan.small says when: D <= LSM_BLOCK, so a thread owns at most one
// feature column, and N <= LSM_SMALL_MAX_N, so a class block keeps per-sample values in
// shared memory).
//
//   lsm_small_forward   one block per sample: logits[i, j] = x_i . w_j for every class (in
//                       float64, k in order, rounded once), and the target logit.
//   lsm_small_backward  blocks [0, N), one per sample: grad_x[i] = sum_j G[i,j] w_j (float64,
//                       j in order) + q_i, rounded once; blocks [N, N+C), one per class:
//                       grad_w[j] = sum_i G[i,j] x_i (float64, i in order) + the sum of r_i
//                       over the class's samples in index order, rounded once.
//
// Per-sample statistics come from row_sums_serial: one thread, the same two scaled passes
// as row_sums but k in order (D is small here), so a class block computes its samples'
// statistics in parallel, a thread per sample, with no barrier per sample, and the sample
// blocks and the forward get the same bits for the same row.  The r_i sum is formed as
// lsm_backward_classes forms it (scaled by 2^-E for float64 rows).  Bad labels: the
// sample's row stays the plain layer's and is reported (forward and backward); a class
// block only ever matches labels in [0, C).  Deterministic: every sum has a fixed order.

namespace lsm {

// x_i . w_j in float64, k = 0..d-1 in order.
template <typename F>
__device__ __forceinline__ double dot_f64(const typename F::Storage* a, const typename F::Storage* b, long long d) {
  double acc = 0.0;
  for (long long k = 0; k < d; ++k) acc = fma_(to_double<F>(a[k]), to_double<F>(b[k]), acc);
  return acc;
}

// row_sums' scaled sums by one thread, k in order.
template <typename F>
__device__ RowSums<typename F::Acc> row_sums_serial(const typename F::Storage* xr, const typename F::Storage* wr,
                                                    long long d) {
  typedef typename F::Acc A;
  A mx = A(0), mw = A(0);
  for (long long k = 0; k < d; ++k) {
    const A vx = abs_(to_acc<F>(xr[k])), vw = abs_(to_acc<F>(wr[k]));
    if (vx > mx) mx = vx;
    if (vw > mw) mw = vw;
  }
  RowSums<A> r;
  r.ex = scale_exponent(mx);
  r.ew = scale_exponent(mw);
  const A sx = ldexp_(A(1), -r.ex), sw = ldexp_(A(1), -r.ew);
  r.xx = A(0);
  r.ww = A(0);
  r.xw = A(0);
  for (long long k = 0; k < d; ++k) {
    const A ux = to_acc<F>(xr[k]) * sx, uw = to_acc<F>(wr[k]) * sw;
    r.xx = fma_(ux, ux, r.xx);
    r.ww = fma_(uw, uw, r.ww);
    r.xw = fma_(ux, uw, r.xw);
  }
  return r;
}

// The backward coefficients of sample i against class row wr (statistics by row_sums_serial).
template <typename F>
__device__ __forceinline__ Coefficients small_coefficients(const typename F::Storage* xr,
                                                           const typename F::Storage* wr, long long d,
                                                           double g, long long margin, double beta,
                                                           const double* thr, int* ex, int* ew) {
  typedef typename F::Acc A;
  const RowSums<A> s = row_sums_serial<F>(xr, wr, d);
  *ex = s.ex;
  *ew = s.ew;
  return backward_coefficients(finish_stats(s.xx, s.ww, s.xw, s.ex, s.ew, (int)margin, thr), g, beta);
}

}  // namespace lsm

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_small_forward(const typename F::Storage* __restrict__ x, const typename F::Storage* __restrict__ w,
                      const L* __restrict__ label, typename F::Storage* __restrict__ logits, long long n,
                      long long c, long long d, long long margin, double beta,
                      const double* __restrict__ thresholds, lsm::u64* err_key, lsm::u64 err_rec,
                      long long serial) {
  typedef typename F::Acc A;
  const long long i = blockIdx.x;
  const long long y = (long long)label[i];
  const bool valid = y >= 0 && y < c;
  const typename F::Storage* xr = x + i * d;
  for (long long j = threadIdx.x; j < c; j += LSM_BLOCK) {
    if (j != y) logits[i * c + j] = lsm::from_double<F>(lsm::dot_f64<F>(xr, w + j * d, d));
  }
  if (threadIdx.x != 0) return;
  if (!valid) {
    lsm::record_bad_label(i, y, c, err_key, err_rec, serial, lsm::OP_FORWARD);
    return;
  }
  const lsm::RowSums<A> s = lsm::row_sums_serial<F>(xr, w + y * d, d);
  const lsm::RowStats<A> st =
      lsm::finish_stats(s.xx, s.ww, s.xw, s.ex, s.ew, (int)margin, lsm::thresholds_for(thresholds, margin));
  logits[i * c + y] = lsm::from_double<F>(lsm::target_logit(st, beta));
}

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_small_backward(const typename F::Storage* __restrict__ grad_logits,
                       const typename F::Storage* __restrict__ x, const typename F::Storage* __restrict__ w,
                       const L* __restrict__ label, typename F::Storage* __restrict__ grad_x,
                       typename F::Storage* __restrict__ grad_w, long long n, long long c, long long d,
                       long long margin, double beta, const double* __restrict__ thresholds,
                       lsm::u64* err_key, lsm::u64 err_rec, long long serial) {
  typedef typename F::Storage S;
  // Per sample of the class (class blocks): alpha_i, eps_i, ex_i, and whether i is one.
  __shared__ double alpha_sh[LSM_SMALL_MAX_N], eps_sh[LSM_SMALL_MAX_N];
  __shared__ int ex_sh[LSM_SMALL_MAX_N];
  __shared__ bool member_sh[LSM_SMALL_MAX_N];
  __shared__ double k_sh[3];
  __shared__ int e_sh[2];
  const int t = threadIdx.x;
  const long long col = t;  // this thread's feature column (D <= LSM_BLOCK)
  const double* thr = lsm::thresholds_for(thresholds, margin);
  if ((long long)blockIdx.x < n) {
    const long long i = blockIdx.x;
    const long long y = (long long)label[i];
    const bool valid = y >= 0 && y < c;  // block-uniform
    const S* xr = x + i * d;
    if (t == 0) {
      if (valid) {
        const lsm::Coefficients k = lsm::small_coefficients<F>(
            xr, w + y * d, d, lsm::to_double<F>(grad_logits[i * c + y]), margin, beta, thr, &e_sh[0], &e_sh[1]);
        k_sh[0] = k.gx_scale;
        k_sh[1] = k.kw;
        k_sh[2] = k.kx;
      } else {
        lsm::record_bad_label(i, y, c, err_key, err_rec, serial, lsm::OP_BACKWARD);
      }
    }
    __syncthreads();
    if (col < d) {
      const S* gr = grad_logits + i * c;
      double acc = 0.0;
      for (long long j = 0; j < c; ++j) acc = lsm::fma_(lsm::to_double<F>(gr[j]), lsm::to_double<F>(w[j * d + col]), acc);
      if (valid) {  // + q_i = gx_scale * (kw * w_y*2^-ew + kx * x_i*2^-ex), as lsm_backward_rows
        const double ux = lsm::to_double<F>(xr[col]) * lsm::ldexp_(1.0, -e_sh[0]);
        const double uw = lsm::to_double<F>(w[y * d + col]) * lsm::ldexp_(1.0, -e_sh[1]);
        acc = lsm::fma_(k_sh[0], lsm::fma_(k_sh[1], uw, k_sh[2] * ux), acc);
      }
      grad_x[i * d + col] = lsm::from_double<F>(acc);
    }
    return;
  }
  const long long j = (long long)blockIdx.x - n;  // this block's class, in [0, C)
  const S* wr = w + j * d;
  // The class's samples' coefficients, a thread per sample.
  for (long long i = t; i < n; i += LSM_BLOCK) {
    const bool member = (long long)label[i] == j;
    member_sh[i] = member;
    if (member) {
      int ew;
      const lsm::Coefficients k = lsm::small_coefficients<F>(
          x + i * d, wr, d, lsm::to_double<F>(grad_logits[i * c + j]), margin, beta, thr, &ex_sh[i], &ew);
      alpha_sh[i] = k.alpha;
      eps_sh[i] = k.eps;
      e_sh[1] = ew;  // the same row w_j, so the same ew, for every sample of the class
    }
  }
  __syncthreads();
  // float64 rows: the class's r sum is scaled by 2^-E, E the largest ex_i of its samples
  // (lsm_backward_classes explains why); thread 0 also sums eps_i 2^(ex_i - E) in index order.
  const bool wide = sizeof(S) == 8;
  if (t == 0) {
    int e = 0;
    bool any = false;
    for (long long i = 0; i < n; ++i) {
      if (member_sh[i]) {
        if (wide) e = (!any || ex_sh[i] > e) ? ex_sh[i] : e;
        any = true;
      }
    }
    double eps_total = 0.0;
    for (long long i = 0; i < n; ++i)
      if (member_sh[i]) eps_total += lsm::ldexp_(eps_sh[i], ex_sh[i] - e);
    e_sh[0] = e;
    k_sh[0] = eps_total;
    k_sh[1] = any ? lsm::ldexp_(1.0, -e_sh[1]) : 1.0;  // 2^-ew (e_sh[1] is set only by a sample)
  }
  __syncthreads();
  if (col < d) {
    // r_i = alpha_i x_i + eps_i 2^ex_i (w_j 2^-ew), summed as
    // 2^E (sum alpha_i x_i 2^-E + (sum eps_i 2^(ex_i - E)) w_j 2^-ew).
    const int E = e_sh[0];
    const double se = lsm::ldexp_(1.0, -E);
    double acc = 0.0, corr = 0.0;
    for (long long i = 0; i < n; ++i) {
      const double xv = lsm::to_double<F>(x[i * d + col]);
      acc = lsm::fma_(lsm::to_double<F>(grad_logits[i * c + j]), xv, acc);
      if (member_sh[i]) corr = lsm::fma_(alpha_sh[i], xv * se, corr);
    }
    const double total = lsm::fma_(k_sh[0], lsm::to_double<F>(wr[col]) * k_sh[1], corr);
    grad_w[j * d + col] = lsm::from_double<F>(lsm::fma_(wide ? lsm::ldexp_(1.0, E) : 1.0, total, acc));
  }
}

// ---------------------------------------------------------------- fused cross-entropy
// lsoftmax_core/_cupy_loss.py walks the N x C logits in row or class chunks
// (_loss_plan.py); each chunk's logits z (R x K, input dtype, row-major) are one cuBLAS GEMM.
// Ignored rows reach these kernels with label 0 (the host's where(label == ignore, 0, label))
// and weight 0; a label outside [0, C) is never used as an index: lsm_loss_targets (or the
// label check, margin 1) reports it and the chunk kernels treat the row as having no target.
//
//   lsm_loss_targets      one block per sample: the float64 target logit t_i (forward's value).
//   lsm_loss_chunk_lse    one block per chunk row: writes the target into z when the chunk holds
//                         it (and its rounded value into tgt), then combines the chunk's max and
//                         float64 sum of exp(z - max) online into the row's (m, S) and lse.
//   lsm_loss_chunk_grad   one block per chunk row: z := weight_i * exp(z - lse_i), minus weight_i
//                         at the target, rounded to the dtype; the rounded target entry g_i
//                         goes to gvec[i] for the margin terms.
//   lsm_loss_margin_rows  lsm_backward_rows reading g_i from gvec (then lsm_backward_classes).

namespace lsm {

// The chunk row's target column (or -1): the label is range-checked before any use.
template <typename L>
__device__ __forceinline__ long long chunk_target(const L* label, long long i, long long c, long long k0,
                                                  long long kc) {
  const long long y = (long long)label[i];
  if (y < 0 || y >= c || y < k0 || y >= k0 + kc) return -1;
  return y - k0;
}

}  // namespace lsm

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_loss_targets(const typename F::Storage* __restrict__ x, const typename F::Storage* __restrict__ w,
                     const L* __restrict__ label, double* __restrict__ target, long long n, long long c,
                     long long d, long long margin, double beta, const double* __restrict__ thresholds,
                     lsm::u64* err_key, lsm::u64 err_rec, long long serial, long long op) {
  typedef typename F::Acc A;
  __shared__ A red[3 * LSM_BLOCK];
  const long long i = blockIdx.x;
  const long long y = (long long)label[i];
  if (y < 0 || y >= c) {
    if (threadIdx.x == 0) {
      target[i] = 0.0;
      lsm::record_bad_label(i, y, c, err_key, err_rec, serial, op);
    }
    return;
  }
  const lsm::RowSums<A> s = lsm::row_sums<F>(x + i * d, w + y * d, d, red);
  if (threadIdx.x == 0) {
    const lsm::RowStats<A> st =
        lsm::finish_stats(s.xx, s.ww, s.xw, s.ex, s.ew, (int)margin, lsm::thresholds_for(thresholds, margin));
    target[i] = lsm::target_logit(st, beta);
  }
}

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_loss_chunk_lse(typename F::Storage* __restrict__ z, const L* __restrict__ label,
                       const double* __restrict__ target, double* __restrict__ tgt, double* __restrict__ run_m,
                       double* __restrict__ run_s, double* __restrict__ lse, long long r0, long long k0,
                       long long kc, long long c, long long has_target, long long first) {
  __shared__ double red[LSM_BLOCK];
  const long long i = r0 + blockIdx.x;
  typename F::Storage* zr = z + (long long)blockIdx.x * kc;
  const long long col = lsm::chunk_target(label, i, c, k0, kc);
  if (col >= 0 && threadIdx.x == 0) {
    if (has_target) zr[col] = lsm::from_double<F>(target[i]);
    tgt[i] = lsm::to_double<F>(zr[col]);
  }
  __syncthreads();
  double v[1] = {lsm::double_of(0xFFF0000000000000ull)};  // -inf
  for (long long j = threadIdx.x; j < kc; j += LSM_BLOCK) {
    const double e = lsm::to_double<F>(zr[j]);
    if (e > v[0]) v[0] = e;
  }
  lsm::block_reduce(v, red, lsm::MaxOp());
  const double mk = v[0];
  double sk[1] = {0.0};
  for (long long j = threadIdx.x; j < kc; j += LSM_BLOCK) sk[0] += exp(lsm::to_double<F>(zr[j]) - mk);
  lsm::block_reduce(sk, red, lsm::SumOp());
  if (threadIdx.x == 0) {
    double m = mk, s = sk[0];
    if (!first) {
      const double m0 = run_m[i], s0 = run_s[i];
      m = m0 > mk ? m0 : mk;
      s = s0 * exp(m0 - m) + s * exp(mk - m);
    }
    run_m[i] = m;
    run_s[i] = s;
    lse[i] = m + log(s);
  }
}

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_loss_chunk_grad(typename F::Storage* __restrict__ z, const L* __restrict__ label,
                        const double* __restrict__ target, const double* __restrict__ lse,
                        const double* __restrict__ weight, double* __restrict__ gvec, long long r0, long long k0,
                        long long kc, long long c, long long has_target) {
  const long long i = r0 + blockIdx.x;
  typename F::Storage* zr = z + (long long)blockIdx.x * kc;
  const long long col = lsm::chunk_target(label, i, c, k0, kc);
  const double wi = weight[i], li = lse[i];
  for (long long j = threadIdx.x; j < kc; j += LSM_BLOCK) {
    // the target as lsm_loss_chunk_lse saw it: rounded to the dtype
    const double zj = (j == col && has_target) ? lsm::to_double<F>(lsm::from_double<F>(target[i]))
                                               : lsm::to_double<F>(zr[j]);
    double gj = wi * exp(zj - li);
    if (j == col) gj -= wi;
    const typename F::Storage q = lsm::from_double<F>(gj);
    zr[j] = q;
    if (j == col) gvec[i] = lsm::to_double<F>(q);
  }
}

template <typename F, typename L>
__global__ void LSM_BOUNDS
    lsm_loss_margin_rows(const double* __restrict__ gvec, const typename F::Storage* __restrict__ x,
                         const typename F::Storage* __restrict__ w, const L* __restrict__ label,
                         typename F::Storage* __restrict__ grad_x, double* __restrict__ coef,
                         lsm::u32* __restrict__ classes, long long n, long long c, long long d, long long margin,
                         double beta, const double* __restrict__ thresholds, lsm::u64* err_key,
                         lsm::u64 err_rec, long long serial) {
  lsm::backward_rows<F, L, true>(nullptr, gvec, x, w, label, grad_x, coef, classes, n, c, d, margin, beta,
                                 thresholds, err_key, err_rec, serial, lsm::OP_BACKWARD);
}

// Element-wise helpers of the fused cross-entropy, so that CuPy never runs its own
// float16/bfloat16 kernels (they would need CUDA's fp16/bf16 headers): dst += src (the
// chunks' GEMM results, added in float64 and rounded once) and float64 -> the dtype (the loss).
template <typename F>
__global__ void LSM_BOUNDS
    lsm_accumulate(typename F::Storage* __restrict__ dst, const typename F::Storage* __restrict__ src,
                   long long count) {
  const long long k = (long long)blockIdx.x * LSM_BLOCK + threadIdx.x;
  if (k < count) dst[k] = lsm::from_double<F>(lsm::to_double<F>(dst[k]) + lsm::to_double<F>(src[k]));
}

template <typename F>
__global__ void LSM_BOUNDS
    lsm_from_f64(const double* __restrict__ src, typename F::Storage* __restrict__ dst, long long count) {
  const long long k = (long long)blockIdx.x * LSM_BLOCK + threadIdx.x;
  if (k < count) dst[k] = lsm::from_double<F>(src[k]);
}
