// CPU path of the fused SOAR loss: per (sample, chunk), z0 and z1 are read once for all 1 + M rows;
// aux targets (z' - z0)/sigma' are recomputed, never stored. Forward: per-chunk partial sums of
// (v - t)^2 (accumulated in double), reduced in a fixed order; backward: grad = c_row (v - t).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../ops.h"

namespace soar_native {

namespace {

constexpr int64_t kChunk = 4096;

struct Rows {
  at::Tensor v, z0, z1, za;
  int64_t sv, sz0, sz1, sza, B, M, N;
};

Rows prepare(const at::Tensor& v, const at::Tensor& z0, const at::Tensor& z1, const at::Tensor& za,
             const at::Tensor& sa) {
  TORCH_CHECK(z0.dim() >= 1 && sa.dim() == 2 && sa.size(1) == z0.size(0),
              "soar_fast_native.fused_mse: sigma_aux must be [M, B]");
  Rows r;
  r.B = z0.size(0);
  r.M = sa.size(0);
  r.N = r.B > 0 ? z0.numel() / r.B : 0;
  TORCH_CHECK(z1.sizes() == z0.sizes() && v.numel() == (1 + r.M) * r.B * r.N && za.numel() == r.M * r.B * r.N &&
                  v.dim() == z0.dim() && za.dim() == z0.dim() && v.size(0) == (1 + r.M) * r.B,
              "soar_fast_native.fused_mse: v [(1+M)B, ...], z0/z1 [B, ...], z_aux [MB, ...] expected");
  TORCH_CHECK(z1.scalar_type() == z0.scalar_type() && za.scalar_type() == z0.scalar_type() &&
                  v.scalar_type() == z0.scalar_type(),
              "soar_fast_native.fused_mse: v, z0, z1, z_aux must share one dtype");
  std::tie(r.v, r.sv) = as_rows(v, "v");
  std::tie(r.z0, r.sz0) = as_rows(z0, "z0");
  std::tie(r.z1, r.sz1) = as_rows(z1, "z1");
  std::tie(r.za, r.sza) = as_rows(za, "z_aux");
  return r;
}

// Visits the 1 + M rows of block (b, chunk): f(row, k, err) for each element k of the chunk.
template <typename T, typename A, typename F>
void for_rows(const Rows& r, const A* sa, int64_t b, int64_t lo, int64_t n, A* d, A* z, F&& f) {
  const T* v = r.v.const_data_ptr<T>();
  const T* z0 = r.z0.const_data_ptr<T>();
  const T* z1 = r.z1.const_data_ptr<T>();
  const T* za = r.M > 0 ? r.za.const_data_ptr<T>() : nullptr;
  for (int64_t k = 0; k < n; ++k) {
    z[k] = A(z0[b * r.sz0 + lo + k]);
    d[k] = A(z1[b * r.sz1 + lo + k]) - z[k];
    f(b, k, A(v[b * r.sv + lo + k]) - d[k]);
  }
  for (int64_t m = 0; m < r.M; ++m) {
    const A s = sa[m * r.B + b];
    const int64_t row = r.B + m * r.B + b, zrow = m * r.B + b;
    for (int64_t k = 0; k < n; ++k) {
      const A t = (A(za[zrow * r.sza + lo + k]) - z[k]) / s;
      f(row, k, A(v[row * r.sv + lo + k]) - t);
    }
  }
}

}  // namespace

namespace {

// One pass over (sample, chunk) blocks: partial sums of (v - t)^2 (want_loss) and/or grad_v =
// coef_row (v - t) (want_grad; coef = 2 w g / N, g = upstream grad or 1 when grad is undefined).
std::tuple<at::Tensor, at::Tensor> mse_cpu(const at::Tensor* grad, const at::Tensor& v, const at::Tensor& z0,
                                           const at::Tensor& z1, const at::Tensor& za, const at::Tensor& sa,
                                           const at::Tensor& w, bool want_loss, bool want_grad) {
  Rows r = prepare(v, z0, z1, za, sa);
  const int64_t R = (1 + r.M) * r.B, nch = std::max<int64_t>(1, (r.N + kChunk - 1) / kChunk);
  const bool f64 = z0.scalar_type() == at::kDouble;
  at::Tensor losses, gv;
  if (want_grad) gv = empty_output(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  if (R == 0 || r.N == 0) {
    if (want_loss) losses = at::zeros({R}, z0.options().dtype(f64 ? at::kDouble : at::kFloat));
    return {losses, gv};
  }
  at::Tensor partials = want_loss ? empty_output({R, nch}, z0.options().dtype(at::kDouble)) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z0.scalar_type(), "soar_fused_mse_cpu", [&] {
    using A = at::opmath_type<scalar_t>;
    const auto acc_t = c10::CppTypeToScalarType<A>::value;
    at::Tensor sac = sa.to(acc_t).contiguous();
    at::Tensor wc = w.to(acc_t);
    at::Tensor coef = ((grad != nullptr ? grad->to(acc_t) * wc : wc) * (2.0 / double(r.N))).contiguous();
    const A* sap = sac.const_data_ptr<A>();
    const A* cp = coef.const_data_ptr<A>();
    double* part = want_loss ? partials.mutable_data_ptr<double>() : nullptr;
    scalar_t* out = want_grad ? gv.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, r.B * nch, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> d(kChunk), z(kChunk);
      std::vector<double> acc(1 + r.M);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / nch, c = i % nch, lo = c * kChunk, n = std::min(kChunk, r.N - lo);
        std::fill(acc.begin(), acc.end(), 0.0);
        for_rows<scalar_t, A>(r, sap, b, lo, n, d.data(), z.data(), [&](int64_t row, int64_t k, A err) {
          if (part) acc[(row - b) / r.B] += double(err) * double(err);
          if (out) out[row * r.N + lo + k] = scalar_t(cp[row] * err);
        });
        if (part)
          for (int64_t j = 0; j <= r.M; ++j) part[(j * r.B + b) * nch + c] = acc[j];
      }
    });
  });
  if (want_loss) {
    losses = (partials.sum(1) * w.to(partials.device(), at::kDouble) / double(r.N)).to(f64 ? at::kDouble : at::kFloat);
  }
  return {losses, gv};
}

}  // namespace

at::Tensor fused_mse_cpu(const at::Tensor& v, const at::Tensor& z0, const at::Tensor& z1,
                         const at::Tensor& za, const at::Tensor& sa, const at::Tensor& w) {
  return std::get<0>(mse_cpu(nullptr, v, z0, z1, za, sa, w, true, false));
}

at::Tensor fused_mse_backward_cpu(const at::Tensor& grad, const at::Tensor& v, const at::Tensor& z0,
                                  const at::Tensor& z1, const at::Tensor& za, const at::Tensor& sa,
                                  const at::Tensor& w) {
  return std::get<1>(mse_cpu(&grad, v, z0, z1, za, sa, w, false, true));
}

std::tuple<at::Tensor, at::Tensor> fused_mse_and_grad_cpu(const at::Tensor& v, const at::Tensor& z0,
                                                          const at::Tensor& z1, const at::Tensor& za,
                                                          const at::Tensor& sa, const at::Tensor& w) {
  return mse_cpu(nullptr, v, z0, z1, za, sa, w, true, true);
}

}  // namespace soar_native
