// CUDA kernels of torch.ops.soar_fast_native.*: ATen argument handling here, the kernels behind
// plain launchers in the .cu files (which include no ATen, so CI can compile them with nvcc alone).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"
#include "soar_math.h"

namespace soar_native {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "soar_fast_native (CUDA): dtype ", t.scalar_type(), " not supported (fp32, fp16, bf16)");
  }
}

void check(int err, const char* what) {
  TORCH_CHECK(err == 0, "soar_fast_native: ", what, " failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

std::tuple<at::Tensor, at::Tensor> aux_cuda(const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& vu,
                                            const at::Tensor& vc, const at::Tensor& s0, const at::Tensor& s1,
                                            const at::Tensor& sa, double g, bool write_v_corr) {
  c10::cuda::CUDAGuard guard(z0.device());
  const int64_t B = z0.size(0), M = sa.size(0), N = B > 0 ? z0.numel() / B : 0;
  TORCH_CHECK(z1.sizes() == z0.sizes() && vu.sizes() == z0.sizes() && vc.sizes() == z0.sizes() &&
                  sa.dim() == 2 && sa.size(1) == B, "soar_fast_native.aux_states: bad shapes");
  std::vector<int64_t> shape(z0.sizes().begin(), z0.sizes().end());
  shape[0] = M * B;
  at::Tensor zaux = empty_output(shape, z0.options());
  at::Tensor vcorr = write_v_corr ? empty_output(shape, z0.options()) : zaux.new_empty({0});
  if (zaux.numel() == 0) return {zaux, vcorr};
  auto [z0r, sz0] = as_rows(z0, "z0");
  auto [z1r, sz1] = as_rows(z1, "z1");
  auto [vur, svu] = as_rows(vu, "v_uncond");
  auto [vcr, svc] = as_rows(vc, "v_cond");
  at::Tensor s0c = s0.to(at::kFloat).contiguous(), s1c = s1.to(at::kFloat).contiguous(), sac = sa.to(at::kFloat).contiguous();
  check(aux_states_cuda(dtype_of(z0), z0r.const_data_ptr(), sz0, z1r.const_data_ptr(), sz1, vur.const_data_ptr(), svu,
                        vcr.const_data_ptr(), svc, s0c.const_data_ptr<float>(), s1c.const_data_ptr<float>(),
                        sac.const_data_ptr<float>(), zaux.mutable_data_ptr(),
                        write_v_corr ? vcorr.mutable_data_ptr() : nullptr, B, N, M, float(g),
                        c10::cuda::getCurrentCUDAStream().stream()),
        "aux_states_cuda");
  return {zaux, vcorr};
}

std::tuple<at::Tensor, at::Tensor> aux_states(const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& vu,
                                              const at::Tensor& vc, const at::Tensor& s0, const at::Tensor& s1,
                                              const at::Tensor& sa, double g) {
  return aux_cuda(z0, z1, vu, vc, s0, s1, sa, g, true);
}

at::Tensor aux_states_z(const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& vu, const at::Tensor& vc,
                        const at::Tensor& s0, const at::Tensor& s1, const at::Tensor& sa, double g) {
  return std::get<0>(aux_cuda(z0, z1, vu, vc, s0, s1, sa, g, false));
}

std::tuple<at::Tensor, at::Tensor> mse_launch(const at::Tensor* grad, const at::Tensor& v, const at::Tensor& z0,
                                              const at::Tensor& z1, const at::Tensor& za, const at::Tensor& sa,
                                              const at::Tensor& w, bool want_loss, bool want_grad) {
  c10::cuda::CUDAGuard guard(v.device());
  const int64_t B = z0.size(0), M = sa.size(0), N = B > 0 ? z0.numel() / B : 0, R = (1 + M) * B;
  TORCH_CHECK(v.size(0) == R && v.numel() == R * N && za.numel() == M * B * N && z1.sizes() == z0.sizes(),
              "soar_fast_native.fused_mse: bad shapes");
  auto [vr, sv] = as_rows(v, "v");
  auto [z0r, sz0] = as_rows(z0, "z0");
  auto [z1r, sz1] = as_rows(z1, "z1");
  auto [zar, sza] = M > 0 ? as_rows(za, "z_aux") : std::make_tuple(z0r, int64_t(0));
  at::Tensor sac = sa.to(at::kFloat).contiguous();
  at::Tensor wf = w.to(at::kFloat);
  const int64_t nblk = (N + kMseBlock - 1) / kMseBlock;
  at::Tensor losses, gv;
  if (want_grad) gv = empty_output(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (R == 0 || N == 0) {
    if (want_loss) losses = at::zeros({R}, v.options().dtype(at::kFloat));
    return {losses, gv};
  }
  at::Tensor part = want_loss ? empty_output({R, nblk}, v.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor coef = ((grad != nullptr ? grad->to(at::kFloat) * wf : wf) * (2.0 / double(N))).contiguous();
  check(fused_mse_cuda(dtype_of(v), vr.const_data_ptr(), sv, z0r.const_data_ptr(), sz0, z1r.const_data_ptr(), sz1,
                       zar.const_data_ptr(), sza, sac.const_data_ptr<float>(), coef.const_data_ptr<float>(),
                       want_loss ? part.mutable_data_ptr<float>() : nullptr, want_grad ? gv.mutable_data_ptr() : nullptr,
                       B, N, M, nblk, c10::cuda::getCurrentCUDAStream().stream()),
        "fused_mse_cuda");
  if (want_loss) losses = part.sum(1) * wf / double(N);
  return {losses, gv};
}

at::Tensor fused_mse(const at::Tensor& v, const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& za,
                     const at::Tensor& sa, const at::Tensor& w) {
  return std::get<0>(mse_launch(nullptr, v, z0, z1, za, sa, w, true, false));
}

at::Tensor fused_mse_backward(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& z0, const at::Tensor& z1,
                              const at::Tensor& za, const at::Tensor& sa, const at::Tensor& w) {
  return std::get<1>(mse_launch(&grad, v, z0, z1, za, sa, w, false, true));
}

std::tuple<at::Tensor, at::Tensor> fused_mse_and_grad(const at::Tensor& v, const at::Tensor& z0, const at::Tensor& z1,
                                                      const at::Tensor& za, const at::Tensor& sa, const at::Tensor& w) {
  return mse_launch(nullptr, v, z0, z1, za, sa, w, true, true);
}

}  // namespace
}  // namespace soar_native

TORCH_LIBRARY_IMPL(soar_fast_native, CUDA, m) {
  m.impl("aux_states", &soar_native::aux_states);
  m.impl("aux_states_z", &soar_native::aux_states_z);
  m.impl("fused_mse", &soar_native::fused_mse);
  m.impl("fused_mse_backward", &soar_native::fused_mse_backward);
  m.impl("fused_mse_and_grad", &soar_native::fused_mse_and_grad);
}
