// One-call integer linear for the CPU: activation transform -> per-token int8 codes ->
// oneDNN int8 GEMM (at::_int_mm, VNNI / AMX where the CPU has them) -> dequantizing epilogue.
//
// Why C++: at the token counts of a robot policy (M = 17 action tokens, a few hundred prefix
// tokens) the integer GEMM takes 10-70 us while the dozen eager torch ops around it (absmax,
// scales, rounding, casts, scale multiplies, bias) cost more than the GEMM. Here they are two
// loops and one dispatch.
//
// Bit-exact contract: the same IEEE operations in the same order as the torch lean path in
// cpu_path.py (cpu_quantize_codes + cpu_int_linear), so outputs are identical bit for bit,
// except for a Sylvester-Hadamard rotation, which runs as a fast transform (below):
//   v = x * inv_smooth; v = v[:, perm]; v = blocks(v) @ R        (ATen ops, as in torch)
//   amax = max|v| per row; scale = amax / qmax; inv = qmax / amax (fp32 divisions)
//   q = round_half_even(v * inv)                                   (fp32 multiply)
//   per channel: y = (float(acc) * xs[m]) * ws[n] (+ bias[n])
//   per group:   y = ((0 + p_0) + p_1 + ... ) * xs[m] (+ bias[n]),  p_g = float(acc_g) * ws[n, g]
// Built with -ffp-contract=off so no multiply-add is fused into an FMA. On x86-64 the hot loops
// are compiled for AVX-512, AVX2 and the baseline, and the loader picks what the CPU has
// (GCC target_clones), so one build serves every x86 machine; elsewhere (Jetson's ARM) they
// are compiled for the baseline.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QV_CLONES
#endif

namespace {

constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23

// Rows per parallel chunk: enough work per thread to pay for the hand-off.
int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// Per-token codes of one float32 row of k values: returns its scale.
QV_CLONES float quantize_row(const float* row, int64_t k, float qmax, int8_t* out) {
  // 16 running maxima, then one: an elementwise select vectorizes where a scalar reduction
  // would not (max is exact in any order)
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
  if (!(amax > 0.0f)) {  // all-zero row: scale 1, codes 0, as every other backend
    for (int64_t i = 0; i < k; ++i) out[i] = 0;
    return 1.0f;
  }
  const float inv = qmax / amax;
  // round half to even without a libm call: |row[i] * inv| <= qmax * (1 + 2^-23) < 2^22, so
  // adding and subtracting 1.5 * 2^23 rounds to an integer in the FPU's default mode (round to
  // nearest even), the same result as torch.round / nearbyint, and vectorizes.
  for (int64_t i = 0; i < k; ++i) {
    const float t = row[i] * inv;
    const float r = (t + kRoundMagic) - kRoundMagic;
    out[i] = static_cast<int8_t>(static_cast<int32_t>(r));
  }
  return amax / qmax;
}

// Per-token codes (M, K) int8 and scales (M,) fp32 of float32 v (M, K), contiguous.
void quantize_rows(const float* v, int64_t m, int64_t k, float qmax, int8_t* q, float* scale) {
  at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) scale[r] = quantize_row(v + r * k, k, qmax, q + r * k);
  });
}

// Fast Walsh-Hadamard transform of one row in place: every block of b contiguous floats
// (b a power of two, 16 <= b <= 64) -> H_b x_block * scale, H_b the Sylvester matrix (symmetric,
// so this is also x_block H_b). Why: log2(b) add/sub stages instead of the b multiply-adds per
// value of the (R, b) x (b, b) matmul. Butterfly stage h maps x[i] to x[i] + x[i + h] where bit h
// of i is clear and to x[i - h] - x[i] where it is set. With AVX-512 the four stages inside a
// 16-float vector are a lane permutation, a sign flip and an add each; the stages between
// 16-float halves are vector add/sub. The sums run in another order than a matmul's, so
// results can differ from it in the last bit (and a code at an exact rounding boundary by one).
void hadamard_row_scalar(float* x, int64_t k, int64_t b, float scale) {
  for (int64_t base = 0; base < k; base += b)
    for (int64_t h = 1; h < b; h *= 2)
      for (int64_t i = base; i < base + b; i += 2 * h)
        for (int64_t j = i; j < i + h; ++j) {
          const float a = x[j], d = x[j + h];
          x[j] = a + d;
          x[j + h] = a - d;
        }
  for (int64_t i = 0; i < k; ++i) x[i] = x[i] * scale;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
__attribute__((target("avx512f"))) void hadamard_row_avx512(float* x, int64_t k, int64_t b, float scale) {
  __m512i perm[4];
  __m512 sign[4];
  for (int s = 0; s < 4; ++s) {
    alignas(64) int32_t idx[16];
    alignas(64) float sg[16];
    for (int i = 0; i < 16; ++i) {
      idx[i] = i ^ (1 << s);
      sg[i] = (i & (1 << s)) ? -1.0f : 1.0f;
    }
    perm[s] = _mm512_load_si512(idx);
    sign[s] = _mm512_load_ps(sg);
  }
  for (int64_t c = 0; c < k; c += 16) {
    __m512 v = _mm512_loadu_ps(x + c);
    for (int s = 0; s < 4; ++s)  // partner + (+-1) * self: x[i] + x[i^h] or x[i^h] - x[i]
      v = _mm512_add_ps(_mm512_permutexvar_ps(perm[s], v), _mm512_mul_ps(v, sign[s]));
    _mm512_storeu_ps(x + c, v);
  }
  for (int64_t h = 16; h < b; h *= 2)
    for (int64_t base = 0; base < k; base += 2 * h)
      for (int64_t j = base; j < base + h; j += 16) {
        const __m512 a = _mm512_loadu_ps(x + j), d = _mm512_loadu_ps(x + j + h);
        _mm512_storeu_ps(x + j, _mm512_add_ps(a, d));
        _mm512_storeu_ps(x + j + h, _mm512_sub_ps(a, d));
      }
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < k; c += 16) _mm512_storeu_ps(x + c, _mm512_mul_ps(_mm512_loadu_ps(x + c), sc));
}
const bool kHasAvx512 = __builtin_cpu_supports("avx512f");
#endif

void hadamard_row(float* x, int64_t k, int64_t b, float scale) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHasAvx512 && b >= 16) return hadamard_row_avx512(x, k, b, scale);
#endif
  hadamard_row_scalar(x, k, b, scale);
}

// RMSNorm, smoothing, Hadamard and per-token quantization of float32 x (M, K), one pass per
// row through a small buffer (x is never written). The norm follows the kernels' contract:
// v = x * (offset + w) [* inv_smooth] [H], y = v * rstd, rstd = 1 / sqrt(sum(x^2) / K + eps),
// with sum(x^2) over 16 running partial sums (an order of its own: not bit-identical to a
// separate RMSNorm module, whose output the model would also round to its dtype first).
QV_CLONES float row_rstd(const float* x, int64_t k, float eps) {
  float lane[16] = {0.0f};
  int64_t j = 0;
  for (; j + 16 <= k; j += 16)
    for (int l = 0; l < 16; ++l) lane[l] = lane[l] + x[j + l] * x[j + l];
  float sum = 0.0f;
  for (; j < k; ++j) sum = sum + x[j] * x[j];
  for (int l = 0; l < 16; ++l) sum = sum + lane[l];
  return 1.0f / std::sqrt(sum / static_cast<float>(k) + eps);
}

QV_CLONES void scale_row(const float* x, const float* a, const float* b, int64_t k, float* out) {
  // out = x * a [* b]   (a: the norm's offset + w, or the smoothing; b: the smoothing or null)
  if (b) {
    for (int64_t i = 0; i < k; ++i) out[i] = (x[i] * a[i]) * b[i];
  } else {
    for (int64_t i = 0; i < k; ++i) out[i] = x[i] * a[i];
  }
}

QV_CLONES void mul_row(float* v, float s, int64_t k) {
  for (int64_t i = 0; i < k; ++i) v[i] = v[i] * s;
}

// An adaptive norm (norm_shift: pi0.5's adaRMS, norm_w = 1 + scale): v = ((x * rstd) * w + shift)
// [* inv_smooth] [H], rstd first since it no longer factors out of the absmax (the kernels' order).
QV_CLONES void shift_norm_row(const float* x, float rstd, const float* w, const float* shift, const float* s,
                              int64_t k, float* out) {
  if (s) {
    for (int64_t i = 0; i < k; ++i) out[i] = ((x[i] * rstd) * w[i] + shift[i]) * s[i];
  } else {
    for (int64_t i = 0; i < k; ++i) out[i] = (x[i] * rstd) * w[i] + shift[i];
  }
}

void transform_quantize_rows(const float* x, const float* norm_w, float eps, const float* inv_smooth, int64_t m,
                             int64_t k, int64_t had_b, float had_scale, float qmax, int8_t* q, float* xs,
                             const float* norm_shift) {
  at::parallel_for(0, m, row_grain(k), [&](int64_t r0, int64_t r1) {
    std::vector<float> row(k);
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * k;
      if (norm_shift) {
        shift_norm_row(xr, row_rstd(xr, k, eps), norm_w, norm_shift, inv_smooth, k, row.data());
        if (had_b > 1) hadamard_row(row.data(), k, had_b, had_scale);
        xs[r] = quantize_row(row.data(), k, qmax, q + r * k);
        continue;
      }
      if (norm_w)
        scale_row(xr, norm_w, inv_smooth, k, row.data());
      else if (inv_smooth)
        scale_row(xr, inv_smooth, nullptr, k, row.data());
      else
        std::copy(xr, xr + k, row.data());
      if (had_b > 1) hadamard_row(row.data(), k, had_b, had_scale);
      if (norm_w) mul_row(row.data(), row_rstd(xr, k, eps), k);
      xs[r] = quantize_row(row.data(), k, qmax, q + r * k);
    }
  });
}

// One output row, per-channel scales: (float(acc) * s) * ws (+ bias), as floats.
QV_CLONES void epilogue_channel_row(const int32_t* a, float s, const float* ws, const float* bias, int64_t n,
                                    float* out) {
  if (bias) {
    for (int64_t c = 0; c < n; ++c) out[c] = (static_cast<float>(a[c]) * s) * ws[c] + bias[c];
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = (static_cast<float>(a[c]) * s) * ws[c];
  }
}

// One output row, group scales: ((0 + p_0) + p_1 + ...) * s (+ bias), p_g = float(acc_g) * ws_g.
QV_CLONES void epilogue_group_row(const int32_t* acc, int64_t groups, int64_t group_stride, float s,
                                  const float* ws_t, const float* bias, int64_t n, float* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<float>(acc[c]) * ws_t[c] + 0.0f;
  for (int64_t g = 1; g < groups; ++g) {  // group order, as the torch path sums
    const int32_t* ag = acc + g * group_stride;
    const float* wg = ws_t + g * n;
    for (int64_t c = 0; c < n; ++c) out[c] = out[c] + static_cast<float>(ag[c]) * wg[c];
  }
  if (bias) {
    for (int64_t c = 0; c < n; ++c) out[c] = out[c] * s + bias[c];
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = out[c] * s;
  }
}

QV_CLONES void presum_row(const float* sum, float s, const float* bias, int64_t n, float* out) {
  if (bias) {
    for (int64_t c = 0; c < n; ++c) out[c] = sum[c] * s + bias[c];
  } else {
    for (int64_t c = 0; c < n; ++c) out[c] = sum[c] * s;
  }
}

inline void store_row(const float* row, int64_t n, c10::BFloat16* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<c10::BFloat16>(row[c]);  // round to nearest even
}

// The epilogue's activations. act 1: GELU, tanh approximation, as 0.5 y (2 - 2 / (exp(2u) + 1))
// with u = sqrt(2/pi) (y + 0.044715 y^3); act 2: SiLU, y / (1 + exp(-y)). Not bit-identical to
// torch's vectorized kernels (another exp): within a few float ulps (tested).
inline float act_scalar(float y, int64_t act) {
  if (act == 1) {
    const float u = 0.7978845608028654f * (y + 0.044715f * y * y * y);
    return 0.5f * y * (2.0f - 2.0f / (std::exp(std::min(2.0f * u, 88.0f)) + 1.0f));
  }
  return y / (1.0f + std::exp(std::min(-y, 88.0f)));
}

#if defined(__x86_64__) && defined(__GNUC__)
// exp on 16 floats: Cody-Waite reduction by ln 2 and a degree-6 polynomial (Cephes expf
// coefficients), 2^n applied with scalef; |x| clamped to 88 (exp(88) < FLT_MAX).
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f"))) inline __m512 act_avx512(__m512 y, int64_t act) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  if (act == 1) {
    const __m512 y3 = _mm512_mul_ps(_mm512_mul_ps(y, y), y);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_add_ps(y, _mm512_mul_ps(_mm512_set1_ps(0.044715f), y3)));
    const __m512 e = exp_avx512(_mm512_mul_ps(two, u));
    const __m512 t = _mm512_sub_ps(two, _mm512_div_ps(two, _mm512_add_ps(e, one)));
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), y), t);
  }
  const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), y));
  return _mm512_div_ps(y, _mm512_add_ps(one, e));
}

// out[c] = act(row[2c]) * row[2c + 1] (gated) or act(row[c]), 16 outputs at a time.
__attribute__((target("avx512f"))) int64_t activate_avx512(const float* row, int64_t n_out, int64_t act, bool gated,
                                                          float* out) {
  int64_t c = 0;
  if (gated) {
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    for (; c + 16 <= n_out; c += 16) {
      const __m512 lo = _mm512_loadu_ps(row + 2 * c), hi = _mm512_loadu_ps(row + 2 * c + 16);
      const __m512 g = _mm512_permutex2var_ps(lo, even, hi), u = _mm512_permutex2var_ps(lo, odd, hi);
      _mm512_storeu_ps(out + c, _mm512_mul_ps(act_avx512(g, act), u));
    }
  } else {
    for (; c + 16 <= n_out; c += 16) _mm512_storeu_ps(out + c, act_avx512(_mm512_loadu_ps(row + c), act));
  }
  return c;
}
#endif

// Activation (and gate pairs) of one row: row (n floats) -> out (n_out floats); may alias when
// not gated.
void activate_row(const float* row, int64_t n_out, int64_t act, bool gated, float* out) {
  int64_t c = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHasAvx512) c = activate_avx512(row, n_out, act, gated, out);
#endif
  for (; c < n_out; ++c) out[c] = gated ? act_scalar(row[2 * c], act) * row[2 * c + 1] : act_scalar(row[c], act);
}

template <typename T>
void add_residual_row(float* row, const T* res, int64_t n) {
  for (int64_t c = 0; c < n; ++c) row[c] = row[c] + to_f(res[c]);
}

// acc (M, N) or (G, M, N) int32 -> y (M, N_out) float32 or bfloat16; ws (N,) (per channel) or
// ws_t (G, N) (per group, also G = 1: its sum is formed as the torch path forms it); then the
// optional activation (act 0 none, 1 GELU-tanh, 2 SiLU; gated: on interleaved gate/up pairs,
// N_out = N / 2), the optional per-column residual gate (N_out,) fp32 and the optional residual
// (M, N_out) in y's dtype, summed in fp32: y = residual + gate * act(...).
void epilogue(const int32_t* acc, bool per_channel, int64_t groups, const float* xs, const float* ws,
              const float* bias, int64_t m, int64_t n, int64_t act, bool gated, const at::Tensor& res,
              at::Tensor& y, const float* presum = nullptr, const float* rgate = nullptr) {
  const bool f32 = y.scalar_type() == at::kFloat;
  const int64_t n_out = gated ? n / 2 : n;
  const bool direct = f32 && !gated;  // the full row can be formed in y itself
  at::parallel_for(0, m, row_grain(n * groups), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(direct ? 0 : n);
    for (int64_t r = r0; r < r1; ++r) {
      float* row = direct ? y.data_ptr<float>() + r * n : buf.data();
      if (presum)  // group sums formed by the VNNI kernel: the tail of epilogue_group_row
        presum_row(presum + r * n, xs[r], bias, n, row);
      else if (per_channel)
        epilogue_channel_row(acc + r * n, xs[r], ws, bias, n, row);
      else
        epilogue_group_row(acc + r * n, groups, m * n, xs[r], ws, bias, n, row);
      float* outr = f32 ? y.data_ptr<float>() + r * n_out : row;
      if (act) activate_row(row, n_out, act, gated, outr);
      if (rgate)
        for (int64_t c = 0; c < n_out; ++c) outr[c] = outr[c] * rgate[c];
      if (res.defined()) {
        if (res.scalar_type() == at::kFloat)
          add_residual_row(outr, res.data_ptr<float>() + r * n_out, n_out);
        else
          add_residual_row(outr, res.data_ptr<c10::BFloat16>() + r * n_out, n_out);
      }
      if (!f32) store_row(outr, n_out, y.data_ptr<c10::BFloat16>() + r * n_out);
    }
  });
}


// ---------------------------------------------------------------------------------------------
// VNNI integer GEMM on prepacked weights (x86 with AVX512-VNNI).
// Why: at robot token counts oneDNN's _int_mm spends much of its time outside the dot products
// (it repacks the weight on every call), and group-wise int4 scales need one _int_mm per
// 128-channel group. Here the weights are packed once (vnni_pack) and each (rows x 32 columns)
// tile runs every group in registers: int32 dot products with vpdpbusd, then, per group, the
// float product with the group scale added to a float accumulator in group order - the same
// IEEE operations as the epilogue's group sum, so results are bit-identical to _int_mm + the
// epilogue. vpdpbusd multiplies unsigned by signed bytes: the activation codes are offset by
// 128 (q ^ 0x80) and 128 * (sum of the group's weights) is subtracted from each group's sum.
// Packed layout: (N/16, K/4, 16, 4) int8, element [nb][k4][j][t] = w[16 nb + j][4 k4 + t].
#if defined(__x86_64__) && defined(__GNUC__)
const bool kHasVnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw");


// acc += a (unsigned bytes) . w (signed bytes) per 32-bit lane. Inline assembly with a tied
// accumulator: through the intrinsic GCC copied every accumulator between registers (and
// spilled one) on each iteration of the dot loop, a third of the kernel's speed.
__attribute__((target("avx512f,avx512vnni"), always_inline)) inline void dpbusd(__m512i& acc, __m512i a, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w));
}

template <int MR, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_tile(
    const int8_t* q, int64_t ldq, int64_t k, const int8_t* wp, int64_t nb_stride, int64_t gs, int64_t groups,
    const int32_t* colsum, int64_t n, const float* ws_t, int32_t* acc_out, float* sum_out, int64_t ldo) {
  for (int64_t g = 0; g < groups; ++g) {
    // the accumulators live within one group only (GCC keeps them in registers then; held
    // across the group loop they were shuffled through copies and a spill every iteration)
    __m512i acc[MR][NB];
    for (int r = 0; r < MR; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_si512();
    const int64_t k4_end = (g + 1) * gs / 4;
    for (int64_t k4 = g * gs / 4; k4 < k4_end; ++k4) {
      __m512i w[NB];
      for (int b = 0; b < NB; ++b) w[b] = _mm512_loadu_si512(wp + b * nb_stride + k4 * 64);
      for (int r = 0; r < MR; ++r) {  // 4 activation bytes broadcast straight from memory
        const __m512i a = _mm512_broadcastd_epi32(_mm_loadu_si32(q + r * ldq + k4 * 4));
        for (int b = 0; b < NB; ++b) dpbusd(acc[r][b], a, w[b]);
      }
    }
    for (int b = 0; b < NB; ++b) {
      const __m512i cs = _mm512_slli_epi32(_mm512_loadu_si512(colsum + g * n + b * 16), 7);
      for (int r = 0; r < MR; ++r) acc[r][b] = _mm512_sub_epi32(acc[r][b], cs);
    }
    if (!sum_out) {  // per channel: one group, the int32 sums are the result
      for (int r = 0; r < MR; ++r)
        for (int b = 0; b < NB; ++b) _mm512_storeu_si512(acc_out + r * ldo + b * 16, acc[r][b]);
      continue;
    }
    // group scales: (0 + p_0) + p_1 + ..., p_g = float(acc_g) * ws[g, n], summed in the output
    // rows (L1-resident; registers stay free for a wider tile)
    for (int b = 0; b < NB; ++b) {
      const __m512 wsg = _mm512_loadu_ps(ws_t + g * n + b * 16);
      for (int r = 0; r < MR; ++r) {
        float* dst = sum_out + r * ldo + b * 16;
        const __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][b]), wsg);
        _mm512_storeu_ps(dst, _mm512_add_ps(g == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(dst), p));
      }
    }
  }
}

template <int NB>
void vnni_rows(const int8_t* q, int64_t m, int64_t k, const int8_t* wp, int64_t nb_stride, int64_t gs, int64_t groups,
               const int32_t* colsum, int64_t n, const float* ws_t, int32_t* acc_out, float* sum_out) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4)
    vnni_tile<4, NB>(q + r * k, k, k, wp, nb_stride, gs, groups, colsum, n, ws_t, acc_out ? acc_out + r * n : nullptr,
                     sum_out ? sum_out + r * n : nullptr, n);
  const int64_t left = m - r;
  auto tail = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    vnni_tile<MR, NB>(q + r * k, k, k, wp, nb_stride, gs, groups, colsum, n, ws_t, acc_out ? acc_out + r * n : nullptr,
                      sum_out ? sum_out + r * n : nullptr, n);
  };
  if (left == 3) tail(std::integral_constant<int, 3>());
  if (left == 2) tail(std::integral_constant<int, 2>());
  if (left == 1) tail(std::integral_constant<int, 1>());
}

// q (M, K) int8 codes x packed weights -> int32 (M, N) (per channel, groups == 1) or the
// float group sums (M, N). Columns are split over threads in 32-wide strips.
void vnni_gemm(const int8_t* q_signed, int64_t m, int64_t k, const int8_t* wp, int64_t n, int64_t gs, int64_t groups,
               const int32_t* colsum, const float* ws_t, int32_t* acc_out, float* sum_out) {
  // the unsigned operand: codes + 128 (flipping the sign bit), once for all column strips
  std::vector<int8_t> flipped(m * k);
  for (int64_t i = 0; i < m * k; ++i) flipped[i] = static_cast<int8_t>(static_cast<uint8_t>(q_signed[i]) ^ 0x80u);
  const int8_t* q = flipped.data();
  const int64_t width = 64;  // (4 rows x 64 columns) tiles: 16 int32 accumulators
  const int64_t strips = (n + width - 1) / width;
  const int64_t nb_stride = (k / 4) * 64;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(m * k * width / 2048, 1));
  at::parallel_for(0, strips, grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t c0 = s * width;
      const int8_t* w = wp + (c0 / 16) * nb_stride;
      int32_t* a = acc_out ? acc_out + c0 : nullptr;
      float* f = sum_out ? sum_out + c0 : nullptr;
      const float* sc = ws_t ? ws_t + c0 : nullptr;
      switch (std::min<int64_t>(width, n - c0) / 16) {
        case 4: vnni_rows<4>(q, m, k, w, nb_stride, gs, groups, colsum + c0, n, sc, a, f); break;
        case 3: vnni_rows<3>(q, m, k, w, nb_stride, gs, groups, colsum + c0, n, sc, a, f); break;
        case 2: vnni_rows<2>(q, m, k, w, nb_stride, gs, groups, colsum + c0, n, sc, a, f); break;
        default: vnni_rows<1>(q, m, k, w, nb_stride, gs, groups, colsum + c0, n, sc, a, f); break;
      }
    }
  });
}
#endif

}  // namespace

// x (M, K) float32 or bfloat16; inv_smooth (K,) fp32 or undefined; perm (K,) int64 or undefined;
// rotation (B, B) or (K/B, B, B) fp32 or undefined (hadamard_block >= 16: it is the Sylvester H_B
// times hadamard_scale, applied by the fast transform); w_groups: int8 (N, K) or G pieces
// (N, K/G); ws (N,) fp32 per channel, or ws_t (G, N) fp32 for groups; bias (N,) fp32 or
// undefined; norm_weight (K,) or undefined: x is first RMS-normalised with it (x * rstd *
// (norm_offset + w), eps norm_eps) inside the same row pass; act / gated / residual: the
// epilogue's activation, gate/up pairs and residual (see epilogue()); norm_shift (K,) or
// undefined: an adaptive norm, (x * rstd) * (norm_offset + w) + shift (shift_norm_row);
// residual_gate (N_out,) or undefined: residual + gate * y (a gated residual). Returns
// (M, N_out) in x's dtype.
torch::Tensor int_linear(const torch::Tensor& x, const c10::optional<torch::Tensor>& inv_smooth,
                         const c10::optional<torch::Tensor>& perm,
                         const c10::optional<torch::Tensor>& rotation,
                         const std::vector<torch::Tensor>& w_groups, const torch::Tensor& ws,
                         const c10::optional<torch::Tensor>& bias, int64_t qmax, int64_t hadamard_block,
                         double hadamard_scale, const c10::optional<torch::Tensor>& norm_weight, double norm_eps,
                         double norm_offset, int64_t act, bool gated, const c10::optional<torch::Tensor>& residual,
                         const c10::optional<torch::Tensor>& vnni_weight, const c10::optional<torch::Tensor>& w_colsum,
                         const c10::optional<torch::Tensor>& norm_shift,
                         const c10::optional<torch::Tensor>& residual_gate) {
  TORCH_CHECK(x.dim() == 2, "int_linear: x must be (M, K)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "int_linear: x must be float32 or bfloat16");
  const int64_t m = x.size(0), k = x.size(1);
  const bool packed_only = w_groups.empty();
  TORCH_CHECK(!packed_only || (vnni_weight.has_value() && vnni_weight->defined()), "int_linear: no weights");
  const int64_t n = packed_only ? vnni_weight->size(0) * 16 : w_groups[0].size(0);
  const int64_t groups = static_cast<int64_t>(w_groups.size());
  at::Tensor v = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
  at::Tensor q = at::empty({m, k}, x.options().dtype(at::kChar));
  at::Tensor xs = at::empty({m}, x.options().dtype(at::kFloat));
  const bool has_smooth = inv_smooth.has_value() && inv_smooth->defined();
  const bool has_perm = perm.has_value() && perm->defined();
  const bool has_rot = rotation.has_value() && rotation->defined();
  const bool has_norm = norm_weight.has_value() && norm_weight->defined();
  const bool fast_rot = has_rot && hadamard_block >= 16;
  TORCH_CHECK(!has_norm || (!has_perm && (!has_rot || fast_rot)),
              "int_linear: a fused RMSNorm takes no permutation and only the fast Hadamard rotation");
  const bool has_shift = norm_shift.has_value() && norm_shift->defined();
  TORCH_CHECK(!has_shift || (has_norm && norm_shift->numel() == k),
              "int_linear: norm_shift (K,) needs norm_weight (an adaptive norm: x * rstd * w + shift)");
  if (!has_perm && (!has_rot || fast_rot)) {
    // one pass per row: [RMSNorm weight] [smoothing] [fast Hadamard] [* rstd] -> codes
    TORCH_CHECK(!fast_rot || (hadamard_block <= 64 && k % hadamard_block == 0), "int_linear: bad Hadamard block");
    v = v.contiguous();
    at::Tensor sm = has_smooth ? inv_smooth->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor nw = has_norm ? (norm_weight->to(at::kFloat) + static_cast<float>(norm_offset)).contiguous()
                             : at::Tensor();
    at::Tensor sh = has_shift ? norm_shift->to(at::kFloat).contiguous() : at::Tensor();
    transform_quantize_rows(v.data_ptr<float>(), has_norm ? nw.data_ptr<float>() : nullptr,
                            static_cast<float>(norm_eps), has_smooth ? sm.data_ptr<float>() : nullptr, m, k,
                            fast_rot ? hadamard_block : 0, static_cast<float>(hadamard_scale),
                            static_cast<float>(qmax), q.data_ptr<int8_t>(), xs.data_ptr<float>(),
                            has_shift ? sh.data_ptr<float>() : nullptr);
  } else {
    if (has_smooth) v = v * inv_smooth->unsqueeze(0);
    if (has_perm) v = v.index_select(1, *perm);
    if (rotation.has_value() && rotation->defined()) {
      const auto& rot = *rotation;
      const int64_t b = rot.size(-1);
      if (rot.dim() == 2) v = at::matmul(v.reshape({m, k / b, b}), rot).reshape({m, k});
      else v = at::einsum("mgb,gbc->mgc", {v.reshape({m, k / b, b}), rot}).reshape({m, k});
    }
    v = v.contiguous();
    quantize_rows(v.data_ptr<float>(), m, k, static_cast<float>(qmax), q.data_ptr<int8_t>(), xs.data_ptr<float>());
  }
  TORCH_CHECK(act >= 0 && act <= 2, "int_linear: act must be 0 (none), 1 (GELU-tanh) or 2 (SiLU)");
  TORCH_CHECK(!gated || (act != 0 && n % 2 == 0), "int_linear: gated needs an activation and an even N");
  const int64_t n_out = gated ? n / 2 : n;
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    res = residual->scalar_type() == x.scalar_type() ? residual->contiguous() : residual->to(x.scalar_type()).contiguous();
    TORCH_CHECK(res.dim() == 2 && res.size(0) == m && res.size(1) == n_out, "int_linear: residual must be (M, N_out)");
  }
  at::Tensor rg;
  if (residual_gate.has_value() && residual_gate->defined()) {
    TORCH_CHECK(res.defined() && residual_gate->numel() == n_out,
                "int_linear: residual_gate (N_out,) needs a residual (y = residual + gate * y)");
    rg = residual_gate->to(at::kFloat).contiguous();
  }
  const float* rgp = rg.defined() ? rg.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({m, n_out}, x.options());
  at::Tensor bias_c = (bias.has_value() && bias->defined()) ? bias->to(at::kFloat).contiguous() : at::Tensor();
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  const at::Tensor ws_c = ws.to(at::kFloat).contiguous();
  // VNNI-packed weights (vnni_pack) where the caller has them: faster than _int_mm at every
  // token count measured (docs/kernels-notes.md), and one pass for all int4 groups
  if (vnni_weight.has_value() && vnni_weight->defined()) {
#if defined(__x86_64__) && defined(__GNUC__)
    TORCH_CHECK(kHasVnni, "int_linear: VNNI-packed weights on a CPU without AVX512-VNNI");
    TORCH_CHECK(w_colsum.has_value() && w_colsum->defined(), "int_linear: VNNI weights need their column sums");
    const at::Tensor& wp = *vnni_weight;
    const int64_t np = wp.size(0) * 16, ng = w_colsum->size(0);
    TORCH_CHECK(wp.size(1) * 4 == k && k % (4 * ng) == 0, "int_linear: packed weights do not match K");
    const int64_t gsz = k / ng;
    const bool per_ch = ws_c.dim() == 1;
    TORCH_CHECK(per_ch ? ng == 1 : (ws_c.size(0) == ng && ws_c.size(1) == np), "int_linear: scales do not match");
    if (per_ch) {
      at::Tensor acc = at::empty({m, np}, x.options().dtype(at::kInt));
      vnni_gemm(q.data_ptr<int8_t>(), m, k, wp.data_ptr<int8_t>(), np, gsz, 1, w_colsum->data_ptr<int32_t>(), nullptr,
                acc.data_ptr<int32_t>(), nullptr);
      epilogue(acc.data_ptr<int32_t>(), true, 1, xs.data_ptr<float>(), ws_c.data_ptr<float>(), b, m, np, act, gated,
               res, y, nullptr, rgp);
    } else {
      at::Tensor sums = at::empty({m, np}, x.options().dtype(at::kFloat));
      vnni_gemm(q.data_ptr<int8_t>(), m, k, wp.data_ptr<int8_t>(), np, gsz, ng, w_colsum->data_ptr<int32_t>(),
                ws_c.data_ptr<float>(), nullptr, sums.data_ptr<float>());
      epilogue(nullptr, false, ng, xs.data_ptr<float>(), ws_c.data_ptr<float>(), b, m, np, act, gated, res, y,
               sums.data_ptr<float>(), rgp);
    }
    return y;
#else
    TORCH_CHECK(false, "int_linear: VNNI-packed weights need an x86-64 build");
#endif
  }
  at::Tensor acc;
  if (groups == 1 && ws_c.dim() == 1) {
    acc = at::_int_mm(q, w_groups[0].t());
  } else {
    const int64_t gs = w_groups[0].size(1);
    TORCH_CHECK(ws_c.dim() == 2 && ws_c.size(0) == groups && ws_c.size(1) == n,
                "int_linear: group scales must be (G, N)");
    acc = at::empty({groups, m, n}, x.options().dtype(at::kInt));
    for (int64_t g = 0; g < groups; ++g) {
      at::Tensor out = acc.select(0, g);
      at::_int_mm_out(out, q.narrow(1, g * gs, gs), w_groups[g].t());
    }
  }
  epilogue(acc.data_ptr<int32_t>(), groups == 1 && ws_c.dim() == 1, groups, xs.data_ptr<float>(), ws_c.data_ptr<float>(), b, m, n,
           act, gated, res, y, nullptr, rgp);
  return y;
}

// Weights (N, K) int8 -> (packed (N/16, K/4, 16, 4) int8, column sums (G, N) int32 over each of
// the G groups of K / G channels) for the VNNI GEMM; empty tensors where it does not apply
// (no AVX512-VNNI, N % 16, K % 4 or the group length % 4).
std::vector<torch::Tensor> vnni_pack(const torch::Tensor& w, int64_t groups) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar, "vnni_pack: w must be (N, K) int8");
  const int64_t n = w.size(0), k = w.size(1);
  bool ok = groups >= 1 && n % 16 == 0 && k % (4 * groups) == 0;
#if defined(__x86_64__) && defined(__GNUC__)
  ok = ok && kHasVnni;
#else
  ok = false;
#endif
  if (!ok) return {};
  at::Tensor packed = w.contiguous().view({n / 16, 16, k / 4, 4}).permute({0, 2, 1, 3}).contiguous();
  at::Tensor colsum = w.to(at::kInt).view({n, groups, k / groups}).sum(2).t().contiguous().to(at::kInt);
  return {packed, colsum};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  namespace py = pybind11;
  mod.def("int_linear", &int_linear, "fused per-token int8 quantization + int8 GEMM + epilogue (CPU)",
          py::arg("x"), py::arg("inv_smooth"), py::arg("perm"), py::arg("rotation"), py::arg("w_groups"),
          py::arg("ws"), py::arg("bias"), py::arg("qmax"), py::arg("hadamard_block"), py::arg("hadamard_scale"),
          py::arg("norm_weight"), py::arg("norm_eps"), py::arg("norm_offset"), py::arg("act") = 0,
          py::arg("gated") = false, py::arg("residual") = py::none(), py::arg("vnni_weight") = py::none(),
          py::arg("w_colsum") = py::none(), py::arg("norm_shift") = py::none(),
          py::arg("residual_gate") = py::none());
  mod.def("parallel_threads", [](int64_t items) {
    // how many distinct threads at::parallel_for uses here: 1 if this build lacks OpenMP
    std::vector<int> used(static_cast<size_t>(std::max<int64_t>(items, 1)), -1);
    at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) used[i] = at::get_thread_num();
    });
    std::sort(used.begin(), used.end());
    return static_cast<int64_t>(std::unique(used.begin(), used.end()) - used.begin());
  }, "distinct threads of one at::parallel_for over `items` (checks the OpenMP build)");
  mod.def("vnni_pack", &vnni_pack, "prepack int8 weights (N, K) for the VNNI GEMM: (packed, group column sums)");
  mod.def("has_vnni", []() {
#if defined(__x86_64__) && defined(__GNUC__)
    return kHasVnni;
#else
    return false;
#endif
  });
}
