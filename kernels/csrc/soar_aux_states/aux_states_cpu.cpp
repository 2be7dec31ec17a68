// CPU path of the fused aux-state op: one pass over z0, z1, v_uncond, v_cond per (sample, chunk),
// all M points written from registers/L1; arithmetic in fp32 (fp64 for fp64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <vector>

#include "../ops.h"
#include "../soar_math.h"

namespace soar_native {

namespace {

constexpr int64_t kChunk = 4096;

template <typename T, typename A>
void aux_kernel(const T* z0, int64_t sz0, const T* z1, int64_t sz1, const T* vu, int64_t svu,
                const T* vc, int64_t svc, const A* s0, const A* s1, const A* sa, T* zaux, T* vcorr,
                int64_t B, int64_t N, int64_t M, A g) {
  const int64_t nch = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, B * nch, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> d(kChunk), e(kChunk), z(kChunk);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / nch, lo = (i % nch) * kChunk, n = std::min(kChunk, N - lo);
      const A s0b = s0[b], s1b = s1[b];
      for (int64_t k = 0; k < n; ++k) {
        const A a0 = A(z0[b * sz0 + lo + k]);
        z[k] = a0;
        d[k] = A(z1[b * sz1 + lo + k]) - a0;
        e[k] = rollout_offset<A>(d[k], A(vu[b * svu + lo + k]), A(vc[b * svc + lo + k]), g, s0b, s1b);
      }
      for (int64_t m = 0; m < M; ++m) {
        const A sab = sa[m * B + b], alpha = renoise_alpha<A>(sab, s1b);
        T* zo = zaux + (m * B + b) * N + lo;
        T* vo = vcorr ? vcorr + (m * B + b) * N + lo : nullptr;
        for (int64_t k = 0; k < n; ++k) {
          const A delta = renoise_delta<A>(e[k], d[k], alpha);
          zo[k] = T(z[k] + delta);
          if (vo) vo[k] = T(delta / sab);
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> aux_states_cpu(const at::Tensor& z0, const at::Tensor& z1,
                                                  const at::Tensor& vu, const at::Tensor& vc,
                                                  const at::Tensor& s0, const at::Tensor& s1,
                                                  const at::Tensor& sa, double guidance,
                                                  bool write_v_corr) {
  TORCH_CHECK(z0.dim() >= 1 && z1.sizes() == z0.sizes() && vu.sizes() == z0.sizes() &&
                  vc.sizes() == z0.sizes(),
              "soar_fast_native.aux_states: z0, z1, v_uncond, v_cond must share one shape [B, ...]");
  TORCH_CHECK(z1.scalar_type() == z0.scalar_type() && vu.scalar_type() == z0.scalar_type() &&
                  vc.scalar_type() == z0.scalar_type(),
              "soar_fast_native.aux_states: inputs must share one dtype");
  const int64_t B = z0.size(0), M = sa.size(0), N = B > 0 ? z0.numel() / B : 0;
  TORCH_CHECK(sa.dim() == 2 && sa.size(1) == B && s0.numel() == B && s1.numel() == B,
              "soar_fast_native.aux_states: sigma0, sigma1 must be [B] and sigma_aux [M, B]");
  std::vector<int64_t> shape(z0.sizes().begin(), z0.sizes().end());
  shape[0] = M * B;
  at::Tensor zaux = empty_output(shape, z0.options());
  at::Tensor vcorr = write_v_corr ? empty_output(shape, z0.options()) : at::Tensor();
  if (zaux.numel() == 0) return {zaux, write_v_corr ? vcorr : zaux.new_empty({0})};
  auto [z0r, sz0] = as_rows(z0, "z0");
  auto [z1r, sz1] = as_rows(z1, "z1");
  auto [vur, svu] = as_rows(vu, "v_uncond");
  auto [vcr, svc] = as_rows(vc, "v_cond");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "soar_aux_states_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<A>::value;
    at::Tensor s0c = s0.to(acc).contiguous(), s1c = s1.to(acc).contiguous(), sac = sa.to(acc).contiguous();
    aux_kernel<scalar_t, A>(z0r.const_data_ptr<scalar_t>(), sz0, z1r.const_data_ptr<scalar_t>(), sz1,
                            vur.const_data_ptr<scalar_t>(), svu, vcr.const_data_ptr<scalar_t>(), svc,
                            s0c.const_data_ptr<A>(), s1c.const_data_ptr<A>(), sac.const_data_ptr<A>(),
                            zaux.mutable_data_ptr<scalar_t>(),
                            write_v_corr ? vcorr.mutable_data_ptr<scalar_t>() : nullptr, B, N, M,
                            A(guidance));
  });
  return {zaux, write_v_corr ? vcorr : zaux.new_empty({0})};
}

}  // namespace soar_native
