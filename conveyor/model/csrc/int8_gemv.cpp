// Int8 or bf16 weights times a few rows of activations (conveyor.model.int8_gemv).
//
// A decode step of one request multiplies one activation row by every weight, so its time is the time to
// read the weights. oneDNN's linears pay a fixed cost per call (and the int8 mode a chain of small torch
// ops to round the activations), and a plain row-major int8 GEMV reads four short rows at once, which the
// hardware prefetcher follows poorly (measured 2.8x slower than the layout below). Here each layer is one
// sequential pass over its weight, packed once at load in blocks of 4 output channels:
//   packed[n / 4][k / S][n % 4][k % S]      S = 16 (weight_only), 64 (w8a8) or 32 (bf16)
// so one step reads one contiguous run of 4 * S values holding the next S inputs of 4 channels. Output
// channel blocks are spread over torch's threads. Three products:
//   weight_only  out[m, n] = sum over groups g of scale[n, g] * sum_{k in g} w[n, k] * x[m, k]
//                x fp32 or bf16 (made fp32: exact), fp32 sums; one group (per-channel scales) or several
//   w8a8         the int8 mode's product (Int8Linear): each row of x (times inv_smooth) rounded to int8
//                with its own scale, integer sums (exact), then * scale[n] * row_scale[m], each step
//                rounded as the torch reference rounds, so the two agree to the bit.
//   bf16         a bf16 linear as oneDNN's computes it: x rounded to bf16, products summed in fp32 (+ bias),
//                the result rounded to bf16; only the summation order differs.
// Built with -march=native: AVX-512 loops where the CPU has them (VNNI for w8a8, AVX512-BF16 dot products
// for bf16), plain loops that the compiler vectorizes for whatever the CPU has otherwise. The layout is
// the same for all.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define CONVEYOR_AVX512 1
#endif

namespace {

constexpr int64_t kMaxRows = 4;   // rows a call takes: decode-sized steps only
constexpr int64_t kBlock = 4;     // output channels per packed block
constexpr int64_t kWeightOnlyStep = 16;
constexpr int64_t kW8A8Step = 64;
constexpr int64_t kBf16Step = 32;
constexpr int64_t kGrain = 16;    // blocks per thread task, at least

void check_common(const torch::Tensor& x, const torch::Tensor& packed, int64_t N, int64_t step,
                  torch::ScalarType weight_type = torch::kInt8) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, "x must have 1 to 4 rows");
  const int64_t K = x.size(1);
  TORCH_CHECK(K % step == 0, "K must be a multiple of ", step);
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  TORCH_CHECK(packed.scalar_type() == weight_type && packed.is_contiguous() && packed.numel() == blocks * kBlock * K,
              "packed must be a contiguous ", c10::toString(weight_type),
              " tensor of the packed layout for N outputs of K inputs");
}

#ifdef CONVEYOR_AVX512
template <int M>
inline void weight_only_block(const float* x, const int8_t* block, int64_t K, int64_t group, const float* scale,
                              int64_t n, int64_t valid, int64_t N, float* out) {
  const int64_t groups = K / group;
  __m512 acc[M][kBlock];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[M][kBlock];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < kBlock; ++c) part[m][c] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += kWeightOnlyStep) {
      const __m512i bytes = _mm512_loadu_si512(block + k * kBlock);  // 16 inputs of the 4 channels
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
      for (int c = 0; c < kBlock; ++c) {
        const __m128i lane = c == 0 ? _mm512_castsi512_si128(bytes) : _mm512_extracti32x4_epi32(bytes, c);
        const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lane));
        for (int m = 0; m < M; ++m) part[m][c] = _mm512_fmadd_ps(wv, xv[m], part[m][c]);
      }
    }
    if (groups == 1) {  // per-channel scales: applied once to the sum, below
      for (int m = 0; m < M; ++m)
        for (int c = 0; c < kBlock; ++c) acc[m][c] = part[m][c];
    } else {
      for (int c = 0; c < kBlock; ++c) {
        const __m512 s = _mm512_set1_ps(scale[std::min(n + c, N - 1) * groups + g]);
        for (int m = 0; m < M; ++m) acc[m][c] = _mm512_fmadd_ps(part[m][c], s, acc[m][c]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int64_t c = 0; c < valid; ++c) {
      const float sum = _mm512_reduce_add_ps(acc[m][c]);
      out[m * N + n + c] = groups == 1 ? sum * scale[n + c] : sum;
    }
}
#else
template <int M>
inline void weight_only_block(const float* x, const int8_t* block, int64_t K, int64_t group, const float* scale,
                              int64_t n, int64_t valid, int64_t N, float* out) {
  const int64_t groups = K / group;
  for (int64_t c = 0; c < valid; ++c)
    for (int m = 0; m < M; ++m) {
      float total = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float sum = 0.0f;
        for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += kWeightOnlyStep) {
          const int8_t* w = block + k0 * kBlock + c * kWeightOnlyStep;
          const float* xm = x + m * K + k0;
#pragma omp simd reduction(+ : sum)
          for (int64_t i = 0; i < kWeightOnlyStep; ++i) sum += static_cast<float>(w[i]) * xm[i];
        }
        total = groups == 1 ? sum * scale[n + c] : total + sum * scale[(n + c) * groups + g];
      }
      out[m * N + n + c] = total;
    }
}
#endif

// fp32 [M, N]: the weight-only product of 1 <= M <= 4 rows x (fp32 or bf16) and the packed int8 weight
// (S = 16) of N outputs, with fp32 scales [N, K / group] (group = K: one scale per output channel).
torch::Tensor weight_only(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                          int64_t N, int64_t group) {
  check_common(x, packed, N, kWeightOnlyStep);
  const int64_t K = x.size(1);
  TORCH_CHECK(group > 0 && K % group == 0 && group % kWeightOnlyStep == 0,
              "the group size must divide K and be a multiple of 16");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * (K / group),
              "scale must be contiguous fp32, one per output and group");
  const auto rows = x.contiguous().to(torch::kFloat32);
  const int64_t M = rows.size(0);
  auto out = torch::empty({M, N}, rows.options());
  const float* xp = rows.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (N + kBlock - 1) / kBlock, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kBlock, valid = std::min(kBlock, N - n);
      const int8_t* block = wp + b * kBlock * K;
      switch (M) {
        case 1: weight_only_block<1>(xp, block, K, group, sp, n, valid, N, op); break;
        case 2: weight_only_block<2>(xp, block, K, group, sp, n, valid, N, op); break;
        case 3: weight_only_block<3>(xp, block, K, group, sp, n, valid, N, op); break;
        default: weight_only_block<4>(xp, block, K, group, sp, n, valid, N, op); break;
      }
    }
  });
  return out;
}

#if defined(CONVEYOR_AVX512) && defined(__AVX512VNNI__)
// Integer sums of M rows of (activation + 128) bytes with the 4 channels of a block (S = 64); the + 128
// is taken back out by the caller with each channel's weight sum.
template <int M>
inline void w8a8_block(const uint8_t* qx, const int8_t* block, int64_t K, int32_t* sums) {
  __m512i acc[M][kBlock];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) acc[m][c] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += kW8A8Step) {
    __m512i xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(qx + m * K + k);
    for (int c = 0; c < kBlock; ++c) {
      const __m512i wv = _mm512_loadu_si512(block + k * kBlock + c * kW8A8Step);
      for (int m = 0; m < M; ++m) acc[m][c] = _mm512_dpbusd_epi32(acc[m][c], xv[m], wv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) sums[m * kBlock + c] = _mm512_reduce_add_epi32(acc[m][c]);
}
#endif

// Row m of x (fp32 or bf16) as fp32: widening bf16 is exact, so a bf16 row needs no fp32 copy first.
inline float row_value(const float* xf, const c10::BFloat16* xb, int64_t i) {
  return xf != nullptr ? xf[i] : static_cast<float>(xb[i]);
}

// fp32 [M, N]: the int8 mode's product (Int8Linear: quantize_rows, integer matmul, * weight scale, * row
// scale) of 1 <= M <= 4 fp32 or bf16 rows (bf16 read as their exact fp32 values) and the packed int8
// weight (S = 64). `inv_smooth`: fp32 [K] or empty;
// `weight_sums`: int32 [N], each output's weight sum (the VNNI loop's unsigned-activation correction).
torch::Tensor w8a8(const torch::Tensor& x, const torch::Tensor& inv_smooth, const torch::Tensor& packed,
                   const torch::Tensor& scale, const torch::Tensor& weight_sums, int64_t N) {
  check_common(x, packed, N, kW8A8Step);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "w8a8 takes fp32 or bf16 rows");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N,
              "scale must be a contiguous fp32 [N] tensor");
  TORCH_CHECK(weight_sums.scalar_type() == torch::kInt32 && weight_sums.numel() == N, "weight_sums must be int32 [N]");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const bool smooth = inv_smooth.numel() > 0;
  TORCH_CHECK(!smooth || (inv_smooth.scalar_type() == torch::kFloat32 && inv_smooth.is_contiguous() &&
                          inv_smooth.numel() == K), "inv_smooth must be a contiguous fp32 [K] tensor");
  // Each row rounded to int8 as quantize_rows rounds it: x * inv_smooth, amax, / 127, x / scale rounded
  // half to even (the default rounding mode, as torch.round).
  std::vector<float> smoothed(M * K), row_scale(M);
  std::vector<int8_t> q(M * K);
  const bool is_bf16 = xc.scalar_type() == torch::kBFloat16;
  const float* xf = is_bf16 ? nullptr : xc.data_ptr<float>();
  const c10::BFloat16* xb = is_bf16 ? xc.data_ptr<c10::BFloat16>() : nullptr;
  const float* inv = smooth ? inv_smooth.data_ptr<float>() : nullptr;
  for (int64_t m = 0; m < M; ++m) {
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      const float x_mk = row_value(xf, xb, m * K + k);
      const float v = smooth ? x_mk * inv[k] : x_mk;
      smoothed[m * K + k] = v;
      amax = std::max(amax, std::fabs(v));
    }
    row_scale[m] = std::max(amax, 1e-12f) / 127.0f;
    for (int64_t k = 0; k < K; ++k) q[m * K + k] = static_cast<int8_t>(std::nearbyint(smoothed[m * K + k] / row_scale[m]));
  }
  auto out = torch::empty({M, N}, xc.options().dtype(torch::kFloat32));
  const int8_t* wp = packed.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const int32_t* wsum = weight_sums.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
#if defined(CONVEYOR_AVX512) && defined(__AVX512VNNI__)
  std::vector<uint8_t> shifted(M * K);
  for (int64_t i = 0; i < M * K; ++i) shifted[i] = static_cast<uint8_t>(static_cast<int32_t>(q[i]) + 128);
#endif
  at::parallel_for(0, (N + kBlock - 1) / kBlock, kGrain, [&](int64_t begin, int64_t end) {
    int32_t sums[kMaxRows * kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kBlock, valid = std::min(kBlock, N - n);
      const int8_t* block = wp + b * kBlock * K;
#if defined(CONVEYOR_AVX512) && defined(__AVX512VNNI__)
      switch (M) {
        case 1: w8a8_block<1>(shifted.data(), block, K, sums); break;
        case 2: w8a8_block<2>(shifted.data(), block, K, sums); break;
        case 3: w8a8_block<3>(shifted.data(), block, K, sums); break;
        default: w8a8_block<4>(shifted.data(), block, K, sums); break;
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < valid; ++c) sums[m * kBlock + c] -= 128 * wsum[n + c];
#else
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < valid; ++c) {
          int32_t dot = 0;
          for (int64_t k0 = 0; k0 < K; k0 += kW8A8Step) {
            const int8_t* w = block + k0 * kBlock + c * kW8A8Step;
            const int8_t* qm = q.data() + m * K + k0;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < kW8A8Step; ++i) dot += static_cast<int32_t>(w[i]) * static_cast<int32_t>(qm[i]);
          }
          sums[m * kBlock + c] = dot;
        }
#endif
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < valid; ++c)
          op[m * N + n + c] = (static_cast<float>(sums[m * kBlock + c]) * sp[n + c]) * row_scale[m];
    }
  });
  return out;
}

#if defined(CONVEYOR_AVX512) && defined(__AVX512BF16__)
// fp32 sums of M bf16 rows with the 4 channels of a block (S = 32): one dot product of 32 pairs per
// channel and row and step, exact products accumulated in fp32.
template <int M>
inline void bf16_block(const c10::BFloat16* xb, const float*, const c10::BFloat16* block, int64_t K, float* sums) {
  __m512 acc[M][kBlock];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBf16Step) {
    __m512bh xv[M];
    for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xb + m * K + k);
    for (int c = 0; c < kBlock; ++c) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(block + k * kBlock + c * kBf16Step);
      for (int m = 0; m < M; ++m) acc[m][c] = _mm512_dpbf16_ps(acc[m][c], xv[m], wv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) sums[m * kBlock + c] = _mm512_reduce_add_ps(acc[m][c]);
}
#elif defined(CONVEYOR_AVX512)
// The same without AVX512-BF16: each weight widened to fp32 (a 16-bit shift, exact) and multiplied with
// the rows' bf16 values widened once by the caller.
inline __m512 widen_bf16(__m256i half) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)); }

template <int M>
inline void bf16_block(const c10::BFloat16*, const float* xf, const c10::BFloat16* block, int64_t K, float* sums) {
  __m512 acc[M][kBlock];
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) acc[m][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kBf16Step) {
    for (int c = 0; c < kBlock; ++c) {
      const __m512i raw = _mm512_loadu_si512(block + k * kBlock + c * kBf16Step);
      const __m512 low = widen_bf16(_mm512_castsi512_si256(raw)), high = widen_bf16(_mm512_extracti64x4_epi64(raw, 1));
      for (int m = 0; m < M; ++m) {
        acc[m][c] = _mm512_fmadd_ps(low, _mm512_loadu_ps(xf + m * K + k), acc[m][c]);
        acc[m][c] = _mm512_fmadd_ps(high, _mm512_loadu_ps(xf + m * K + k + 16), acc[m][c]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) sums[m * kBlock + c] = _mm512_reduce_add_ps(acc[m][c]);
}
#else
template <int M>
inline void bf16_block(const c10::BFloat16*, const float* xf, const c10::BFloat16* block, int64_t K, float* sums) {
  for (int m = 0; m < M; ++m)
    for (int c = 0; c < kBlock; ++c) {
      float sum = 0.0f;
      for (int64_t k0 = 0; k0 < K; k0 += kBf16Step) {
        const c10::BFloat16* w = block + k0 * kBlock + c * kBf16Step;
        const float* xm = xf + m * K + k0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < kBf16Step; ++i) sum += static_cast<float>(w[i]) * xm[i];
      }
      sums[m * kBlock + c] = sum;
    }
}
#endif

// [M, N] in x's dtype: a bf16 linear of 1 <= M <= 4 rows x (fp32 or bf16; fp32 rows are rounded to bf16
// first, as `.to(torch.bfloat16)` rounds them) and the packed bf16 weight (S = 32) of N outputs, with an
// optional bias (bf16 or fp32 [N], or empty). Sums in fp32, each result rounded to bf16 (and widened back
// for fp32 rows), as a bf16 linear whose input was cast to bf16 and whose output is cast back.
torch::Tensor bf16(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& bias, int64_t N) {
  check_common(x, packed, N, kBf16Step, torch::kBFloat16);
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16, "bf16 takes fp32 or bf16 rows");
  TORCH_CHECK(bias.numel() == 0 || bias.numel() == N, "bias must be empty or have N values");
  const auto rows = x.contiguous().to(torch::kBFloat16);
  const auto bias_f = bias.numel() ? bias.contiguous().to(torch::kFloat32) : bias;
  const int64_t M = rows.size(0), K = rows.size(1);
  const c10::BFloat16* xb = rows.data_ptr<c10::BFloat16>();
  std::vector<float> widened;  // the rows' bf16 values in fp32, for the loops without bf16 dot products
#if !(defined(CONVEYOR_AVX512) && defined(__AVX512BF16__))
  widened.resize(M * K);
  for (int64_t i = 0; i < M * K; ++i) widened[i] = static_cast<float>(xb[i]);
#endif
  const float* xf = widened.data();
  const float* bp = bias.numel() ? bias_f.data_ptr<float>() : nullptr;
  const bool wide = x.scalar_type() == torch::kFloat32;
  auto out = torch::empty({M, N}, x.options());
  float* out_wide = wide ? out.data_ptr<float>() : nullptr;
  c10::BFloat16* out_bf16 = wide ? nullptr : out.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, (N + kBlock - 1) / kBlock, kGrain, [&](int64_t begin, int64_t end) {
    float sums[kMaxRows * kBlock];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n = b * kBlock, valid = std::min(kBlock, N - n);
      const c10::BFloat16* block = wp + b * kBlock * K;
      switch (M) {
        case 1: bf16_block<1>(xb, xf, block, K, sums); break;
        case 2: bf16_block<2>(xb, xf, block, K, sums); break;
        case 3: bf16_block<3>(xb, xf, block, K, sums); break;
        default: bf16_block<4>(xb, xf, block, K, sums); break;
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t c = 0; c < valid; ++c) {
          const c10::BFloat16 rounded(sums[m * kBlock + c] + (bp ? bp[n + c] : 0.0f));
          if (wide) out_wide[m * N + n + c] = static_cast<float>(rounded);
          else out_bf16[m * N + n + c] = rounded;
        }
    }
  });
  return out;
}

// The int8 mode's activation rounding for any number of rows, ahead of oneDNN's int8 linear
// (OneDNNInt8Linear): each row of x (fp32 or bf16, made fp32: exact) times inv_smooth (fp32 [K] or empty)
// rounded to int8 with its own scale as quantize_rows rounds it (amax / 127, then x / scale rounded half to
// even), stored as unsigned bytes q + 128 (oneDNN's activations are unsigned; its zero point takes the 128
// back out). Returns (uint8 [M, K], fp32 row scales [M, 1]). One pass instead of torch's chain of six ops.
std::vector<torch::Tensor> quantize_rows(const torch::Tensor& x, const torch::Tensor& inv_smooth) {
  TORCH_CHECK(x.dim() == 2, "x must be [M, K]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16,
              "quantize_rows takes fp32 or bf16 rows");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  const bool smooth = inv_smooth.numel() > 0;
  TORCH_CHECK(!smooth || (inv_smooth.scalar_type() == torch::kFloat32 && inv_smooth.is_contiguous() &&
                          inv_smooth.numel() == K), "inv_smooth must be a contiguous fp32 [K] tensor");
  auto q = torch::empty({M, K}, xc.options().dtype(torch::kUInt8));
  auto scales = torch::empty({M, 1}, xc.options().dtype(torch::kFloat32));
  const bool is_bf16 = xc.scalar_type() == torch::kBFloat16;
  const float* xf = is_bf16 ? nullptr : xc.data_ptr<float>();
  const c10::BFloat16* xb = is_bf16 ? xc.data_ptr<c10::BFloat16>() : nullptr;
  const float* inv = smooth ? inv_smooth.data_ptr<float>() : nullptr;
  uint8_t* qp = q.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  const auto value = [&](int64_t m, int64_t k) {
    const float v = is_bf16 ? static_cast<float>(xb[m * K + k]) : xf[m * K + k];
    return smooth ? v * inv[k] : v;
  };
#ifdef CONVEYOR_AVX512
  const auto widen = [](__m256i half) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)); };
  const __m512 sign_off = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const auto load = [&](int64_t m, int64_t k) {
    __m512 v = is_bf16 ? widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + m * K + k)))
                       : _mm512_loadu_ps(xf + m * K + k);
    return smooth ? _mm512_mul_ps(v, _mm512_loadu_ps(inv + k)) : v;
  };
#endif
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int64_t k = 0;
      float amax = 0.0f;
#ifdef CONVEYOR_AVX512
      __m512 vmax = _mm512_setzero_ps();
      for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_and_ps(load(m, k), sign_off));
      amax = _mm512_reduce_max_ps(vmax);
#endif
      for (; k < K; ++k) amax = std::max(amax, std::fabs(value(m, k)));
      const float scale = std::max(amax, 1e-12f) / 127.0f;
      sp[m] = scale;
      k = 0;
#ifdef CONVEYOR_AVX512
      const __m512 vscale = _mm512_set1_ps(scale);
      const __m512i shift = _mm512_set1_epi32(128);
      for (; k + 16 <= K; k += 16) {
        const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load(m, k), vscale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i u = _mm512_add_epi32(_mm512_cvtps_epi32(r), shift);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qp + m * K + k), _mm512_cvtepi32_epi8(u));
      }
#endif
      for (; k < K; ++k) qp[m * K + k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(value(m, k) / scale)) + 128);
    }
  });
  return {q, scales};
}

// fp32 c10::BFloat16 rounding (half to even; NaN to the quiet NaN), 16 values at a time.
#ifdef CONVEYOR_AVX512
inline __m256i round_bf16(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
  return _mm512_cvtepi32_epi16(rounded);
}
#endif

// The int8 mode's epilogue after oneDNN's int8 linear: acc (fp32 [M, N], the integer sums times the weight
// scales) * row_scale (fp32 [M, 1]) + bias (fp32 [N] or empty), in fp32 or rounded to bf16 (`as_bf16`):
// what the torch reference computes with mul_, add_ and .to, in one pass.
torch::Tensor scale_rows(const torch::Tensor& acc, const torch::Tensor& row_scale, const torch::Tensor& bias,
                         bool as_bf16) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == torch::kFloat32 && acc.is_contiguous(),
              "acc must be a contiguous fp32 [M, N] tensor");
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(row_scale.scalar_type() == torch::kFloat32 && row_scale.is_contiguous() && row_scale.numel() == M,
              "row_scale must be a contiguous fp32 [M, 1] tensor");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == torch::kFloat32 && bias.is_contiguous() && bias.numel() == N),
              "bias must be empty or a contiguous fp32 [N] tensor");
  if (!as_bf16 && bias.numel() == 0) return acc.mul_(row_scale);  // in place, as the reference's mul_
  auto out = as_bf16 ? torch::empty({M, N}, acc.options().dtype(torch::kBFloat16)) : acc;
  const float* ap = acc.data_ptr<float>();
  const float* rp = row_scale.data_ptr<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  c10::BFloat16* ob = as_bf16 ? out.data_ptr<c10::BFloat16>() : nullptr;
  float* of = as_bf16 ? nullptr : out.data_ptr<float>();
  at::parallel_for(0, M, std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float r = rp[m];
      const float* a = ap + m * N;
      int64_t n = 0;
#ifdef CONVEYOR_AVX512
      if (as_bf16) {
        auto* o = reinterpret_cast<__m256i*>(ob + m * N);
        const __m512 vr = _mm512_set1_ps(r);
        for (; n + 16 <= N; n += 16) {
          __m512 v = _mm512_mul_ps(_mm512_loadu_ps(a + n), vr);
          if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + n));
          _mm256_storeu_si256(o + n / 16, round_bf16(v));
        }
      }
#endif
      for (; n < N; ++n) {
        const float v = bp ? a[n] * r + bp[n] : a[n] * r;  // two roundings: -ffp-contract=off
        if (as_bf16) ob[m * N + n] = c10::BFloat16(v);
        else of[m * N + n] = v;
      }
    }
  });
  return out;
}

// Which loops this build has: in the log line and the tests.
std::string isa() {
#if defined(CONVEYOR_AVX512) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  return "avx512+vnni+bf16";
#elif defined(CONVEYOR_AVX512) && defined(__AVX512VNNI__)
  return "avx512+vnni";
#elif defined(CONVEYOR_AVX512)
  return "avx512";
#else
  return "generic";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("weight_only", &weight_only, "fp32 x @ (packed int8 weight * group scales).T for 1-4 rows");
  m.def("w8a8", &w8a8, "the int8 mode's product (rows rounded to int8) for 1-4 rows");
  m.def("bf16", &bf16, "a bf16 linear (fp32 sums, bf16 result) for 1-4 rows");
  m.def("quantize_rows", &quantize_rows, "rows rounded to int8 per row (+ 128, unsigned), with their scales");
  m.def("scale_rows", &scale_rows, "the int8 linear's epilogue: * row scale + bias, fp32 or bf16");
  m.def("isa", &isa, "the vector loops this build has");
  m.attr("MAX_ROWS") = kMaxRows;
  m.attr("WEIGHT_ONLY_STEP") = kWeightOnlyStep;
  m.attr("W8A8_STEP") = kW8A8Step;
  m.attr("BF16_STEP") = kBf16Step;
}
