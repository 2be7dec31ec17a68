// ATen-side entry points of the native ops (CPU implementations and shared argument handling).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace soar_native {

// [R, ...] -> (tensor whose rows are contiguous, row stride in elements). Copies (with a one-time
// warning) when a row's elements are not contiguous.
std::tuple<at::Tensor, int64_t> as_rows(const at::Tensor& t, const char* name);
// at::empty, or NaN-filled when $SOAR_FAST_POISON_OUTPUTS=1 (tests catch unwritten elements).
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& opts);

std::tuple<at::Tensor, at::Tensor> aux_states_cpu(const at::Tensor& z0, const at::Tensor& z1,
                                                  const at::Tensor& vu, const at::Tensor& vc,
                                                  const at::Tensor& s0, const at::Tensor& s1,
                                                  const at::Tensor& sa, double guidance,
                                                  bool write_v_corr);
at::Tensor fused_mse_cpu(const at::Tensor& v, const at::Tensor& z0, const at::Tensor& z1,
                         const at::Tensor& za, const at::Tensor& sa, const at::Tensor& w);
at::Tensor fused_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& z0,
                                  const at::Tensor& z1, const at::Tensor& za, const at::Tensor& sa,
                                  const at::Tensor& w);
std::tuple<at::Tensor, at::Tensor> fused_mse_and_grad_cpu(const at::Tensor& v, const at::Tensor& z0,
                                                          const at::Tensor& z1, const at::Tensor& za,
                                                          const at::Tensor& sa, const at::Tensor& w);

}  // namespace soar_native
