// One-call integer linear for the CPU: activation transform -> per-token int8 codes ->
// oneDNN int8 GEMM (at::_int_mm, VNNI / AMX where the CPU has them) -> dequantizing epilogue.
//
// Why C++: at the token counts of a robot policy (M = 17 action tokens, a few hundred prefix
// tokens) the integer GEMM takes 10-70 us while the dozen eager torch ops around it (absmax,
// scales, rounding, casts, scale multiplies, bias) cost more than the GEMM. Here they are two
// loops and one dispatch.
//
// Bit-exact contract: the same IEEE operations in the same order as the torch lean path in
// ops.py (cpu_quantize_codes + cpu_int_linear), so outputs are identical bit for bit:
//   v = x * inv_smooth; v = v[:, perm]; v = blocks(v) @ R        (ATen ops, as in torch)
//   amax = max|v| per row; scale = amax / qmax; inv = qmax / amax (fp32 divisions)
//   q = round_half_even(v * inv)                                   (fp32 multiply)
//   per channel: y = (float(acc) * xs[m]) * ws[n] (+ bias[n])
//   per group:   y = ((0 + p_0) + p_1 + ... ) * xs[m] (+ bias[n]),  p_g = float(acc_g) * ws[n, g]
// Built with -ffp-contract=off so no multiply-add is fused into an FMA.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <vector>

namespace {

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

// Rows per parallel chunk: enough work per thread to pay for the hand-off.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// Per-token codes (M, K) int8 and scales (M,) fp32 of float32 v (M, K), contiguous.
void quantize_rows(const float* v, int64_t m, int64_t k, float qmax, int8_t* q, float* scale) {
  at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = v + r * k;
      // 16 running maxima, then one: an elementwise select vectorizes where a scalar
      // reduction would not (max is exact in any order)
      float lane[16] = {0.0f};
      int64_t j = 0;
      for (; j + 16 <= k; j += 16)
        for (int l = 0; l < 16; ++l) {
          const float a = std::fabs(row[j + l]);
          lane[l] = a > lane[l] ? a : lane[l];
        }
      float amax = 0.0f;
      for (; j < k; ++j) {
        const float a = std::fabs(row[j]);
        amax = a > amax ? a : amax;
      }
      for (int l = 0; l < 16; ++l) amax = lane[l] > amax ? lane[l] : amax;
      int8_t* out = q + r * k;
      if (amax > 0.0f) {
        const float inv = qmax / amax;
        scale[r] = amax / qmax;
        // round half to even without a libm call: |row[j] * inv| <= qmax * (1 + 2^-23) < 2^22, so
        // adding and subtracting 1.5 * 2^23 rounds to an integer in the FPU's default mode
        // (round to nearest even), the same result as torch.round / nearbyint, and vectorizes.
        for (int64_t j = 0; j < k; ++j) {
          const float t = row[j] * inv;
          const float r = (t + kRoundMagic) - kRoundMagic;
          out[j] = static_cast<int8_t>(static_cast<int32_t>(r));
        }
      } else {  // all-zero row (or NaN-free zero): scale 1, codes 0, as every other backend
        scale[r] = 1.0f;
        for (int64_t j = 0; j < k; ++j) out[j] = 0;
      }
    }
  });
}

template <typename OutT>
void epilogue_channel(const int32_t* acc, const float* xs, const float* ws, const float* bias,
                      int64_t m, int64_t n, OutT* y) {
  at::parallel_for(0, m, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float s = xs[r];
      const int32_t* a = acc + r * n;
      OutT* out = y + r * n;
      if (bias) {
        for (int64_t c = 0; c < n; ++c) out[c] = static_cast<OutT>((static_cast<float>(a[c]) * s) * ws[c] + bias[c]);
      } else {
        for (int64_t c = 0; c < n; ++c) out[c] = static_cast<OutT>((static_cast<float>(a[c]) * s) * ws[c]);
      }
    }
  });
}

template <typename OutT>
void epilogue_groups(const int32_t* acc, int64_t groups, const float* xs, const float* ws_t,
                     const float* bias, int64_t m, int64_t n, OutT* y) {
  // acc: (G, M, N); ws_t: (G, N) (the group scales, transposed once by the caller)
  at::parallel_for(0, m, row_grain(n * groups), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(n);
    for (int64_t r = r0; r < r1; ++r) {
      const int32_t* a0 = acc + r * n;
      for (int64_t c = 0; c < n; ++c) row[c] = static_cast<float>(a0[c]) * ws_t[c] + 0.0f;
      for (int64_t g = 1; g < groups; ++g) {  // group order, as the torch path sums
        const int32_t* ag = acc + (g * m + r) * n;
        const float* wg = ws_t + g * n;
        for (int64_t c = 0; c < n; ++c) row[c] = row[c] + static_cast<float>(ag[c]) * wg[c];
      }
      const float s = xs[r];
      OutT* out = y + r * n;
      if (bias) {
        for (int64_t c = 0; c < n; ++c) out[c] = static_cast<OutT>(row[c] * s + bias[c]);
      } else {
        for (int64_t c = 0; c < n; ++c) out[c] = static_cast<OutT>(row[c] * s);
      }
    }
  });
}

}  // namespace

// x (M, K) float32 or bfloat16; inv_smooth (K,) fp32 or undefined; perm (K,) int64 or undefined;
// rotation (B, B) or (K/B, B, B) fp32 or undefined; w_groups: int8 (N, K) or G pieces (N, K/G);
// ws (N,) fp32 per channel, or ws_t (G, N) fp32 for groups; bias (N,) fp32 or undefined.
// Returns (M, N) in x's dtype.
torch::Tensor int_linear(const torch::Tensor& x, const c10::optional<torch::Tensor>& inv_smooth,
                         const c10::optional<torch::Tensor>& perm,
                         const c10::optional<torch::Tensor>& rotation,
                         const std::vector<torch::Tensor>& w_groups, const torch::Tensor& ws,
                         const c10::optional<torch::Tensor>& bias, int64_t qmax) {
  TORCH_CHECK(x.dim() == 2, "int_linear: x must be (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int_linear: x must be float32 or bfloat16");
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(!w_groups.empty(), "int_linear: no weight groups");
  const int64_t n = w_groups[0].size(0);
  const int64_t groups = static_cast<int64_t>(w_groups.size());
  at::Tensor v = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  bool transformed = false;
  if (inv_smooth.has_value() && inv_smooth->defined()) { v = v * inv_smooth->unsqueeze(0); transformed = true; }
  if (perm.has_value() && perm->defined()) { v = v.index_select(1, *perm); transformed = true; }
  if (rotation.has_value() && rotation->defined()) {
    const auto& rot = *rotation;
    const int64_t b = rot.size(-1);
    if (rot.dim() == 2) v = at::matmul(v.reshape({m, k / b, b}), rot).reshape({m, k});
    else v = at::einsum("mgb,gbc->mgc", {v.reshape({m, k / b, b}), rot}).reshape({m, k});
    transformed = true;
  }
  (void)transformed;
  v = v.contiguous();
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m}, x.options().dtype(at::kFloat));
  quantize_rows(v.data_ptr<float>(), m, k, static_cast<float>(qmax), q.data_ptr<int8_t>(), xs.data_ptr<float>());
  at::Tensor y = at::empty({m, n}, x.options());
  at::Tensor bias_c = (bias.has_value() && bias->defined()) ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  const at::Tensor ws_c = ws.to(at::kFloat).contiguous();
  if (groups == 1 && ws.dim() == 1) {
    at::Tensor acc = at::_int_mm(q, w_groups[0].t());
    if (y.scalar_type() == at::kFloat)
      epilogue_channel<float>(acc.data_ptr<int32_t>(), xs.data_ptr<float>(), ws_c.data_ptr<float>(), b, m, n, y.data_ptr<float>());
    else
      epilogue_channel<c10::BFloat16>(acc.data_ptr<int32_t>(), xs.data_ptr<float>(), ws_c.data_ptr<float>(), b, m, n,
                                      y.data_ptr<c10::BFloat16>());
    return y;
  }
  const int64_t gs = w_groups[0].size(1);
  TORCH_CHECK(ws_c.dim() == 2 && ws_c.size(0) == groups && ws.size(1) == n, "int_linear: group scales must be (G, N)");
  at::Tensor acc = at::empty({groups, m, n}, x.options().dtype(at::kInt));
  for (int64_t g = 0; g < groups; ++g) {
    at::Tensor out = acc.select(0, g);
    at::_int_mm_out(out, q.narrow(1, g * gs, gs), w_groups[g].t());
  }
  if (y.scalar_type() == at::kFloat)
    epilogue_groups<float>(acc.data_ptr<int32_t>(), groups, xs.data_ptr<float>(), ws_c.data_ptr<float>(), b, m, n,
                           y.data_ptr<float>());
  else
    epilogue_groups<c10::BFloat16>(acc.data_ptr<int32_t>(), groups, xs.data_ptr<float>(), ws_c.data_ptr<float>(), b, m,
                                   n, y.data_ptr<c10::BFloat16>());
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("int_linear", &int_linear, "fused per-token int8 quantization + int8 GEMM + epilogue (CPU)");
}
