// CUDA kernels of the fused SOAR loss (forward partial sums, backward grad_v, or both in one pass). ATen-free (see
// aux_states.cu). Block (j, b) covers kMseBlock elements of sample b for all 1 + M rows, reading z0
// and z1 once; aux targets (z' - z0)/sigma' are recomputed in registers.
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

__device__ __forceinline__ float block_sum(float x, float* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem reuse across rows
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  x = threadIdx.x < kMseThreads / 32 ? smem[threadIdx.x] : 0.f;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  }
  return x;
}

template <typename T, bool kLoss, bool kGrad>
__global__ void __launch_bounds__(kMseThreads) fused_mse_kernel(
    const T* __restrict__ v, int64_t sv, const T* __restrict__ z0, int64_t sz0, const T* __restrict__ z1,
    int64_t sz1, const T* __restrict__ za, int64_t sza, const float* __restrict__ sa,
    const float* __restrict__ coef, float* __restrict__ partials, T* __restrict__ grad, int64_t B, int64_t N,
    int64_t M, int64_t nblk) {
  __shared__ float smem[kMseThreads / 32];
  const int64_t b = blockIdx.y, j = blockIdx.x;
  const int64_t base = j * kMseBlock + threadIdx.x;
  float z[kMseElemsPerThread], d[kMseElemsPerThread];
  float acc = 0.f;
  const float cb = kGrad ? coef[b] : 0.f;
#pragma unroll
  for (int i = 0; i < kMseElemsPerThread; ++i) {
    const int64_t n = base + int64_t(i) * kMseThreads;  // strided by the block: coalesced per warp
    z[i] = 0.f;
    d[i] = 0.f;
    if (n < N) {
      z[i] = to_f(z0[b * sz0 + n]);
      d[i] = to_f(z1[b * sz1 + n]) - z[i];
      const float err = to_f(v[b * sv + n]) - d[i];
      if (kGrad) grad[b * N + n] = from_f<T>(cb * err);
      if (kLoss) acc += err * err;
    }
  }
  if (kLoss) {
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) partials[b * nblk + j] = acc;
  }
  for (int64_t m = 0; m < M; ++m) {
    const float s = sa[m * B + b];
    const int64_t row = B + m * B + b, zrow = m * B + b;
    const float cr = kGrad ? coef[row] : 0.f;
    acc = 0.f;
#pragma unroll
    for (int i = 0; i < kMseElemsPerThread; ++i) {
      const int64_t n = base + int64_t(i) * kMseThreads;
      if (n < N) {
        const float t = __fdiv_rn(to_f(za[zrow * sza + n]) - z[i], s);
        const float err = to_f(v[row * sv + n]) - t;
        if (kGrad) grad[row * N + n] = from_f<T>(cr * err);
        if (kLoss) acc += err * err;
      }
    }
    if (kLoss) {
      acc = block_sum(acc, smem);
      if (threadIdx.x == 0) partials[row * nblk + j] = acc;
    }
  }
}

template <typename T>
int launch(const void* v, int64_t sv, const void* z0, int64_t sz0, const void* z1, int64_t sz1, const void* za,
           int64_t sza, const float* sa, const float* coef, float* partials, void* grad, int64_t B, int64_t N,
           int64_t M, int64_t nblk, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(nblk), static_cast<unsigned>(B));
  auto go = [&](auto kernel) {
    kernel<<<grid, kMseThreads, 0, stream>>>(static_cast<const T*>(v), sv, static_cast<const T*>(z0), sz0,
                                            static_cast<const T*>(z1), sz1, static_cast<const T*>(za), sza, sa, coef,
                                            partials, static_cast<T*>(grad), B, N, M, nblk);
  };
  if (partials && grad) go(fused_mse_kernel<T, true, true>);
  else if (partials) go(fused_mse_kernel<T, true, false>);
  else if (grad) go(fused_mse_kernel<T, false, true>);
  return int(cudaGetLastError());
}

}  // namespace

int fused_mse_cuda(DType dt, const void* v, int64_t sv, const void* z0, int64_t sz0, const void* z1, int64_t sz1,
                   const void* za, int64_t sza, const float* sa, const float* coef, float* partials, void* grad,
                   int64_t B, int64_t N, int64_t M, int64_t nblk, void* stream) {
  if (B == 0 || N == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dt) {
    case DType::kFloat32:
      return launch<float>(v, sv, z0, sz0, z1, sz1, za, sza, sa, coef, partials, grad, B, N, M, nblk, s);
    case DType::kFloat16:
      return launch<__half>(v, sv, z0, sz0, z1, sz1, za, sza, sa, coef, partials, grad, B, N, M, nblk, s);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(v, sv, z0, sz0, z1, sz1, za, sza, sa, coef, partials, grad, B, N, M, nblk, s);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace soar_native
