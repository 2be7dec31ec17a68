// Element math of the SOAR fused ops, shared by the CPU (C++) and CUDA paths. ATen-free, so the .cu
// files compile with nvcc alone. Formulas: SOAR.md steps 2-4, written to avoid cancellation:
//   d = z1 - z0,  v = vu + g (vc - vu),  e = zhat - z0 = s0 d + (s1 - s0) v
//   alpha = clamp((sa - s1) / max(1 - s1, 1e-8), 0, 1),  delta = z' - z0 = (1 - alpha) e + alpha d
//   z' = z0 + delta,  v_corr = delta / sa
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define SOAR_HD __host__ __device__ __forceinline__
#else
#define SOAR_HD inline
#endif

namespace soar_native {

template <typename A>
SOAR_HD A rollout_offset(A d, A vu, A vc, A g, A s0, A s1) {
  const A v = vu + g * (vc - vu);
  return s0 * d + (s1 - s0) * v;
}

template <typename A>
SOAR_HD A renoise_alpha(A sa, A s1) {
  A denom = A(1) - s1;
  denom = denom > A(1e-8) ? denom : A(1e-8);
  A alpha = (sa - s1) / denom;
  alpha = alpha < A(0) ? A(0) : alpha;
  return alpha > A(1) ? A(1) : alpha;
}

template <typename A>
SOAR_HD A renoise_delta(A e, A d, A alpha) {
  return (A(1) - alpha) * e + alpha * d;
}

// Storage dtypes the CUDA launchers accept (the .cu sees raw pointers, never at::Tensor).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// CUDA launchers (soar_aux_states/aux_states.cu, soar_mse/fused_mse.cu). Strides are row strides in
// elements; outputs are contiguous [rows, N]. `stream` is a cudaStream_t. Return a cudaError_t.
int aux_states_cuda(DType dt, const void* z0, int64_t sz0, const void* z1, int64_t sz1, const void* vu,
                    int64_t svu, const void* vc, int64_t svc, const float* s0, const float* s1,
                    const float* sa, void* zaux, void* vcorr, int64_t B, int64_t N, int64_t M,
                    float guidance, void* stream);

constexpr int kMseThreads = 256;
constexpr int kMseElemsPerThread = 8;
constexpr int64_t kMseBlock = kMseThreads * kMseElemsPerThread;  // elements per CUDA block

// partials != nullptr: fp32 partial sums [(1+M)B, nblk] of (v - t)^2; grad != nullptr: grad_v
// [(1+M)B, N] in dt, grad = coef[row] * (v - t). Both at once is the fused loss-and-grad.
int fused_mse_cuda(DType dt, const void* v, int64_t sv, const void* z0, int64_t sz0, const void* z1,
                   int64_t sz1, const void* za, int64_t sza, const float* sa, const float* coef,
                   float* partials, void* grad, int64_t B, int64_t N, int64_t M, int64_t nblk,
                   void* stream);

}  // namespace soar_native
