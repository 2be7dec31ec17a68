// CUDA kernel of the fused aux-state op. ATen-free: plain pointers in, cudaError_t out, so it
// compiles with nvcc alone (CI does `nvcc -c`). Each thread owns kVec elements of one sample, loads
// z0, z1, v_uncond, v_cond once and writes all M points (z', and v_corr unless vcorr == nullptr).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../soar_math.h"

namespace soar_native {
namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr int kThreads = 256;
constexpr int kVec = 4;

template <typename T>
__global__ void __launch_bounds__(kThreads) aux_states_kernel(
    const T* __restrict__ z0, int64_t sz0, const T* __restrict__ z1, int64_t sz1, const T* __restrict__ vu,
    int64_t svu, const T* __restrict__ vc, int64_t svc, const float* __restrict__ s0, const float* __restrict__ s1,
    const float* __restrict__ sa, T* __restrict__ zaux, T* __restrict__ vcorr, int64_t B, int64_t N, int64_t M,
    float g) {
  const int64_t b = blockIdx.y;
  const int64_t base = int64_t(blockIdx.x) * kThreads * kVec + threadIdx.x;
  const float s0b = s0[b], s1b = s1[b];
  float z[kVec], d[kVec], e[kVec];
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    const int64_t n = base + int64_t(i) * kThreads;  // strided by the block: coalesced per warp
    if (n < N) {
      z[i] = to_f(z0[b * sz0 + n]);
      d[i] = to_f(z1[b * sz1 + n]) - z[i];
      e[i] = rollout_offset<float>(d[i], to_f(vu[b * svu + n]), to_f(vc[b * svc + n]), g, s0b, s1b);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float sab = sa[m * B + b], alpha = renoise_alpha<float>(sab, s1b);
    T* zo = zaux + (m * B + b) * N;
    T* vo = vcorr ? vcorr + (m * B + b) * N : nullptr;
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      const int64_t n = base + int64_t(i) * kThreads;
      if (n < N) {
        const float delta = renoise_delta<float>(e[i], d[i], alpha);
        zo[n] = from_f<T>(z[i] + delta);
        if (vo) vo[n] = from_f<T>(__fdiv_rn(delta, sab));
      }
    }
  }
}

template <typename T>
int launch(const void* z0, int64_t sz0, const void* z1, int64_t sz1, const void* vu, int64_t svu, const void* vc,
           int64_t svc, const float* s0, const float* s1, const float* sa, void* zaux, void* vcorr, int64_t B,
           int64_t N, int64_t M, float g, cudaStream_t stream) {
  const dim3 grid(unsigned((N + kThreads * kVec - 1) / (kThreads * kVec)), unsigned(B));
  aux_states_kernel<T><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(z0), sz0, static_cast<const T*>(z1), sz1, static_cast<const T*>(vu), svu,
      static_cast<const T*>(vc), svc, s0, s1, sa, static_cast<T*>(zaux), static_cast<T*>(vcorr), B, N, M, g);
  return int(cudaGetLastError());
}

}  // namespace

int aux_states_cuda(DType dt, const void* z0, int64_t sz0, const void* z1, int64_t sz1, const void* vu, int64_t svu,
                    const void* vc, int64_t svc, const float* s0, const float* s1, const float* sa, void* zaux,
                    void* vcorr, int64_t B, int64_t N, int64_t M, float g, void* stream) {
  if (B == 0 || N == 0 || M == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32: return launch<float>(z0, sz0, z1, sz1, vu, svu, vc, svc, s0, s1, sa, zaux, vcorr, B, N, M, g, s);
    case DType::kFloat16: return launch<__half>(z0, sz0, z1, sz1, vu, svu, vc, svc, s0, s1, sa, zaux, vcorr, B, N, M, g, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(z0, sz0, z1, sz1, vu, svu, vc, svc, s0, s1, sa, zaux, vcorr, B, N, M, g, s);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace soar_native
