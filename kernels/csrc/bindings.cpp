// Registers torch.ops.soar_fast_native.* (schemas + CPU kernels). CUDA kernels are registered by
// bindings_cuda.cpp when the library is built against a CUDA torch with nvcc.
#include <torch/library.h>

#include <cstdlib>
#include <limits>

#include "ops.h"

namespace soar_native {

std::tuple<at::Tensor, int64_t> as_rows(const at::Tensor& t, const char* name) {
  at::Tensor r = t.dim() == 1 ? t.unsqueeze(1) : t;
  if (r.size(0) > 0 && r.numel() > 0 && !r[0].is_contiguous()) {
    TORCH_WARN_ONCE("soar_fast_native: ", name, " has non-contiguous rows; copying it to a contiguous tensor");
    r = r.contiguous();
  }
  const int64_t n = r.size(0) > 0 ? r.numel() / r.size(0) : 0;
  return {r, r.size(0) > 1 ? r.stride(0) : n};
}

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts) {
  const char* poison = std::getenv("SOAR_FAST_POISON_OUTPUTS");
  if (poison != nullptr && poison[0] != '\0' && poison[0] != '0') {
    return at::full(shape, std::numeric_limits<double>::quiet_NaN(), opts);
  }
  return at::empty(shape, opts);
}

namespace {

std::tuple<at::Tensor, at::Tensor> aux_states(const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& vu,
                                              const at::Tensor& vc, const at::Tensor& s0, const at::Tensor& s1,
                                              const at::Tensor& sa, double g) {
  return aux_states_cpu(z0, z1, vu, vc, s0, s1, sa, g, true);
}

at::Tensor aux_states_z(const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& vu, const at::Tensor& vc,
                        const at::Tensor& s0, const at::Tensor& s1, const at::Tensor& sa, double g) {
  return std::get<0>(aux_states_cpu(z0, z1, vu, vc, s0, s1, sa, g, false));
}

}  // namespace

}  // namespace soar_native

TORCH_LIBRARY(soar_fast_native, m) {
  m.def(
      "aux_states(Tensor z0, Tensor z1, Tensor v_uncond, Tensor v_cond, Tensor sigma0, Tensor sigma1, "
      "Tensor sigma_aux, float guidance_scale) -> (Tensor, Tensor)");
  m.def(
      "aux_states_z(Tensor z0, Tensor z1, Tensor v_uncond, Tensor v_cond, Tensor sigma0, Tensor sigma1, "
      "Tensor sigma_aux, float guidance_scale) -> Tensor");
  m.def("fused_mse(Tensor v, Tensor z0, Tensor z1, Tensor z_aux, Tensor sigma_aux, Tensor weights) -> Tensor");
  m.def(
      "fused_mse_backward(Tensor grad, Tensor v, Tensor z0, Tensor z1, Tensor z_aux, Tensor sigma_aux, "
      "Tensor weights) -> Tensor");
  m.def(
      "fused_mse_and_grad(Tensor v, Tensor z0, Tensor z1, Tensor z_aux, Tensor sigma_aux, Tensor weights) "
      "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(soar_fast_native, CPU, m) {
  m.impl("aux_states", &soar_native::aux_states);
  m.impl("aux_states_z", &soar_native::aux_states_z);
  m.impl("fused_mse", &soar_native::fused_mse_cpu);
  m.impl("fused_mse_backward", &soar_native::fused_mse_backward_cpu);
  m.impl("fused_mse_and_grad", &soar_native::fused_mse_and_grad_cpu);
}
