// Prefill attention read straight from the paged KV cache (conveyor.model.paged_prefill).
//
// One request's chunk of T new tokens (positions start..start+T-1) attends causally over its cached
// prefix and itself, within the sliding window on sliding layers. The torch reference path gathers the
// chunk's keys with `index_select` and runs SDPA with an explicit [T, L] mask, which computes every
// masked score too (the causal upper triangle, what lies outside the window) and runs each query head
// against its KV head separately. Here:
//   1. each KV head's visible keys and values are copied once out of the pool into tiles laid out for
//      the products below (K transposed per 32-key tile; in bf16 K and V as pairs, for AVX512-BF16's
//      pairwise dot product);
//   2. a work item is a KV head and a block of query positions; its rows are those positions times the
//      G query heads sharing the KV head (GQA folded into the rows, so each key tile is read once for
//      all of them), and it visits only the keys some row of the block can see;
//   3. scores, an online softmax (exact: running max and sum in fp32) and the weighted sum of values
//      run over 256 keys at a time, the products in register-blocked AVX-512 loops (FMA in fp32,
//      `vdpbf16ps` in bf16, fp32 accumulation in both), with plain loops where AVX-512 is missing.
// The arithmetic follows torch's CPU flash kernel that SDPA runs: fp32 scores times the scale, exp of
// the score minus the running max, probabilities rounded to bf16 before the product with V in bf16.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include "exp_approx.h"

namespace {

constexpr int64_t kKeyTile = 32;        // keys per packed K tile: two 16-lane vectors
constexpr int64_t kSoftmaxKeys = 256;   // keys per online-softmax step (a multiple of kKeyTile)
constexpr int64_t kRowsPerItem = 64;    // query rows (positions x heads of a group) per work item
constexpr int64_t kScoreRows = 8;       // rows per score micro-kernel call
constexpr int64_t kValueRows = 4;       // rows per value micro-kernel call
constexpr int64_t kValueDims = 64;      // head dims per value micro-kernel call (4 vectors)

using bf16 = at::BFloat16;


// Packed layouts, per KV head, for Lp keys (L rounded up to kKeyTile; the padding is zeros):
//   K fp32: [Lp / 32][D][32]          K bf16: [Lp / 32][D / 2][32][2]
//   V fp32: [Lp][D]                   V bf16: [Lp / 2][D][2]
inline int64_t k_index(int64_t key, int64_t d, int64_t head_dim, bool pairs) {
  const int64_t tile = key / kKeyTile, lane = key % kKeyTile;
  if (!pairs) return (tile * head_dim + d) * kKeyTile + lane;
  return ((tile * (head_dim / 2) + d / 2) * kKeyTile + lane) * 2 + d % 2;
}
inline int64_t v_index(int64_t key, int64_t d, int64_t head_dim, bool pairs) {
  return pairs ? ((key / 2) * head_dim + d) * 2 + key % 2 : key * head_dim + d;
}

// scores[r][0..32) = q[r] . k[j] for one packed 32-key tile and NR rows (unscaled).
template <int NR>
void scores_tile(const float* const* q, const float* kp, int64_t head_dim, float* s, int64_t lds) {
#if defined(__AVX512F__)
  __m512 acc[NR][2];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d = 0; d < head_dim; ++d) {
    const __m512 k0 = _mm512_loadu_ps(kp + d * kKeyTile), k1 = _mm512_loadu_ps(kp + d * kKeyTile + 16);
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(q[r][d]);
      acc[r][0] = _mm512_fmadd_ps(b, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < NR; ++r) {
    _mm512_storeu_ps(s + r * lds, acc[r][0]);
    _mm512_storeu_ps(s + r * lds + 16, acc[r][1]);
  }
#else
  for (int r = 0; r < NR; ++r) {
    float acc[kKeyTile] = {};
    for (int64_t d = 0; d < head_dim; ++d)
      for (int64_t j = 0; j < kKeyTile; ++j) acc[j] += q[r][d] * kp[d * kKeyTile + j];
    std::copy(acc, acc + kKeyTile, s + r * lds);
  }
#endif
}

template <int NR>
void scores_tile(const bf16* const* q, const bf16* kp, int64_t head_dim, float* s, int64_t lds) {
#if defined(__AVX512BF16__)
  __m512 acc[NR][2];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < head_dim / 2; ++d2) {
    const __m512i k0 = _mm512_loadu_si512(kp + d2 * 2 * kKeyTile);
    const __m512i k1 = _mm512_loadu_si512(kp + d2 * 2 * kKeyTile + kKeyTile);
    for (int r = 0; r < NR; ++r) {
      int32_t pair;
      std::memcpy(&pair, q[r] + 2 * d2, sizeof(pair));
      const __m512i b = _mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)b, (__m512bh)k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], (__m512bh)b, (__m512bh)k1);
    }
  }
  for (int r = 0; r < NR; ++r) {
    _mm512_storeu_ps(s + r * lds, acc[r][0]);
    _mm512_storeu_ps(s + r * lds + 16, acc[r][1]);
  }
#else
  for (int r = 0; r < NR; ++r) {
    float acc[kKeyTile] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const float qd = static_cast<float>(q[r][d]);
      for (int64_t j = 0; j < kKeyTile; ++j) acc[j] += qd * static_cast<float>(kp[k_index(j, d, head_dim, true)]);
    }
    std::copy(acc, acc + kKeyTile, s + r * lds);
  }
#endif
}

// out[r][0..NC*16) += sum_j p[r][j] * v[j][0..NC*16) over `num_keys` keys (even), NR rows; `vp` points at
// the first key's packed V, offset to the first of these dims.
template <int NR, int NC>
void values_tile(const float* p, int64_t ldp, int64_t num_keys, const float* vp, int64_t head_dim, float* o,
                 int64_t ldo) {
#if defined(__AVX512F__)
  __m512 acc[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_loadu_ps(o + r * ldo + c * 16);
  for (int64_t j = 0; j < num_keys; ++j) {
    __m512 v[NC];
    for (int c = 0; c < NC; ++c) v[c] = _mm512_loadu_ps(vp + j * head_dim + c * 16);
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(p[r * ldp + j]);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(b, v[c], acc[r][c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + r * ldo + c * 16, acc[r][c]);
#else
  for (int r = 0; r < NR; ++r)
    for (int64_t j = 0; j < num_keys; ++j)
      for (int64_t d = 0; d < NC * 16; ++d) o[r * ldo + d] += p[r * ldp + j] * vp[j * head_dim + d];
#endif
}

template <int NR, int NC>
void values_tile(const bf16* p, int64_t ldp, int64_t num_keys, const bf16* vp, int64_t head_dim, float* o,
                 int64_t ldo) {
#if defined(__AVX512BF16__)
  __m512 acc[NR][NC];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_loadu_ps(o + r * ldo + c * 16);
  for (int64_t j = 0; j < num_keys; j += 2) {
    __m512i v[NC];
    for (int c = 0; c < NC; ++c) v[c] = _mm512_loadu_si512(vp + (j / 2 * head_dim + c * 16) * 2);
    for (int r = 0; r < NR; ++r) {
      int32_t pair;
      std::memcpy(&pair, p + r * ldp + j, sizeof(pair));
      const __m512i b = _mm512_set1_epi32(pair);
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)b, (__m512bh)v[c]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NC; ++c) _mm512_storeu_ps(o + r * ldo + c * 16, acc[r][c]);
#else
  for (int r = 0; r < NR; ++r)
    for (int64_t j = 0; j < num_keys; ++j)
      for (int64_t d = 0; d < NC * 16; ++d)
        o[r * ldo + d] += static_cast<float>(p[r * ldp + j]) * static_cast<float>(vp[v_index(j, d, head_dim, true)]);
#endif
}

template <typename scalar_t>
void scores_rows(int64_t rows, const scalar_t* const* q, const scalar_t* kp, int64_t head_dim, float* s,
                 int64_t lds) {
  for (int64_t r = 0; r < rows; r += kScoreRows) {
    switch (std::min(kScoreRows, rows - r)) {
      case 8: scores_tile<8>(q + r, kp, head_dim, s + r * lds, lds); break;
      case 7: scores_tile<7>(q + r, kp, head_dim, s + r * lds, lds); break;
      case 6: scores_tile<6>(q + r, kp, head_dim, s + r * lds, lds); break;
      case 5: scores_tile<5>(q + r, kp, head_dim, s + r * lds, lds); break;
      case 4: scores_tile<4>(q + r, kp, head_dim, s + r * lds, lds); break;
      case 3: scores_tile<3>(q + r, kp, head_dim, s + r * lds, lds); break;
      case 2: scores_tile<2>(q + r, kp, head_dim, s + r * lds, lds); break;
      default: scores_tile<1>(q + r, kp, head_dim, s + r * lds, lds); break;
    }
  }
}

template <typename scalar_t, int NR>
void values_dims(const scalar_t* p, int64_t ldp, int64_t num_keys, const scalar_t* vp, int64_t head_dim, float* o,
                 int64_t ldo) {
  const bool pairs = std::is_same_v<scalar_t, bf16>;
  for (int64_t d = 0; d < head_dim; d += kValueDims) {
    const scalar_t* v = vp + (pairs ? 2 * d : d);
    switch (std::min(kValueDims, head_dim - d) / 16) {
      case 4: values_tile<NR, 4>(p, ldp, num_keys, v, head_dim, o + d, ldo); break;
      case 3: values_tile<NR, 3>(p, ldp, num_keys, v, head_dim, o + d, ldo); break;
      case 2: values_tile<NR, 2>(p, ldp, num_keys, v, head_dim, o + d, ldo); break;
      default: values_tile<NR, 1>(p, ldp, num_keys, v, head_dim, o + d, ldo); break;
    }
  }
}

template <typename scalar_t>
void values_rows(int64_t rows, const scalar_t* p, int64_t ldp, int64_t num_keys, const scalar_t* vp,
                 int64_t head_dim, float* o, int64_t ldo) {
  for (int64_t r = 0; r < rows; r += kValueRows) {
    switch (std::min(kValueRows, rows - r)) {
      case 4: values_dims<scalar_t, 4>(p + r * ldp, ldp, num_keys, vp, head_dim, o + r * ldo, ldo); break;
      case 3: values_dims<scalar_t, 3>(p + r * ldp, ldp, num_keys, vp, head_dim, o + r * ldo, ldo); break;
      case 2: values_dims<scalar_t, 2>(p + r * ldp, ldp, num_keys, vp, head_dim, o + r * ldo, ldo); break;
      default: values_dims<scalar_t, 1>(p + r * ldp, ldp, num_keys, vp, head_dim, o + r * ldo, ldo); break;
    }
  }
}

struct Chunk {
  int64_t tokens, num_heads, num_kv_heads, head_dim, start, window, first_key, padded_keys, block_size;
  float scale;
};

// One work item: KV head h, query positions [q0, q1) of the chunk.
template <typename scalar_t>
void attend_block(const Chunk& c, const scalar_t* q, const scalar_t* kp, const scalar_t* vp, scalar_t* out,
                  int64_t h, int64_t q0, int64_t q1) {
  const int64_t group = c.num_heads / c.num_kv_heads, rows = (q1 - q0) * group, d_model = c.head_dim;
  std::vector<const scalar_t*> queries(rows);
  std::vector<int64_t> first(rows), last(rows);  // each row's visible keys [first, last], packed indices
  for (int64_t i = 0; i < q1 - q0; ++i) {
    const int64_t position = c.start + q0 + i;
    const int64_t first_visible = c.window > 0 ? std::max<int64_t>(0, position - c.window + 1) : 0;
    for (int64_t g = 0; g < group; ++g) {
      const int64_t r = i * group + g;
      queries[r] = q + ((q0 + i) * c.num_heads + h * group + g) * d_model;
      first[r] = first_visible - c.first_key;
      last[r] = position - c.first_key;
    }
  }
  std::vector<float> scores(rows * kSoftmaxKeys), acc(rows * d_model, 0.0f), max(rows, -INFINITY), sum(rows, 0.0f);
  std::vector<scalar_t> probs(rows * kSoftmaxKeys);
  const scalar_t* k_head = kp + h * c.padded_keys * d_model;
  const scalar_t* v_head = vp + h * c.padded_keys * d_model;

  const int64_t key_end = (last[rows - 1] / kKeyTile + 1) * kKeyTile;
  for (int64_t k0 = first[0] / kKeyTile * kKeyTile; k0 < key_end; k0 += kSoftmaxKeys) {
    const int64_t num_keys = std::min(kSoftmaxKeys, key_end - k0);
    for (int64_t t = 0; t < num_keys; t += kKeyTile)
      scores_rows(rows, queries.data(), k_head + (k0 + t) * d_model, d_model, scores.data() + t, kSoftmaxKeys);
    for (int64_t r = 0; r < rows; ++r) {
      float* s = scores.data() + r * kSoftmaxKeys;
      scalar_t* p = probs.data() + r * kSoftmaxKeys;
      const int64_t a = std::clamp(first[r] - k0, int64_t{0}, num_keys);
      const int64_t b = std::clamp(last[r] + 1 - k0, int64_t{0}, num_keys);
      if (a >= b) {
        std::fill(p, p + num_keys, scalar_t(0.0f));
        continue;
      }
      float step_max = -INFINITY;
      for (int64_t j = a; j < b; ++j) {
        s[j] *= c.scale;
        step_max = std::max(step_max, s[j]);
      }
      const float new_max = std::max(max[r], step_max);
      if (new_max > max[r] && sum[r] > 0.0f) {  // rescale what was summed under the old max
        const float factor = exp_approx(max[r] - new_max);
        sum[r] *= factor;
        float* o = acc.data() + r * d_model;
#pragma omp simd
        for (int64_t d = 0; d < d_model; ++d) o[d] *= factor;
      }
      max[r] = new_max;
      float row_sum = 0.0f;
#pragma omp simd reduction(+ : row_sum)
      for (int64_t j = a; j < b; ++j) {
        s[j] = exp_approx(s[j] - new_max);
        row_sum += s[j];
      }
      sum[r] += row_sum;
      for (int64_t j = 0; j < a; ++j) p[j] = scalar_t(0.0f);
      for (int64_t j = a; j < b; ++j) p[j] = static_cast<scalar_t>(s[j]);
      for (int64_t j = b; j < num_keys; ++j) p[j] = scalar_t(0.0f);
    }
    values_rows(rows, probs.data(), kSoftmaxKeys, num_keys, v_head + k0 * d_model,  // both layouts: k0 is even
                d_model, acc.data(), d_model);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / group, g = r % group;
    scalar_t* o = out + ((q0 + i) * c.num_heads + h * group + g) * d_model;
    const float inv = 1.0f / sum[r];
    for (int64_t d = 0; d < d_model; ++d) o[d] = static_cast<scalar_t>(acc[r * d_model + d] * inv);
  }
}

template <typename scalar_t>
void pack_keys_values(const Chunk& c, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* table,
                      scalar_t* kp, scalar_t* vp) {
  constexpr bool pairs = std::is_same_v<scalar_t, bf16>;
  const int64_t num_keys = c.start + c.tokens - c.first_key, d_model = c.head_dim;
  const int64_t tiles = c.padded_keys / kKeyTile;
  at::parallel_for(0, c.num_kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / tiles, tile = task % tiles;
      scalar_t* k_head = kp + h * c.padded_keys * d_model;
      scalar_t* v_head = vp + h * c.padded_keys * d_model;
      for (int64_t key = tile * kKeyTile; key < (tile + 1) * kKeyTile; ++key) {
        if (key >= num_keys) {
          for (int64_t d = 0; d < d_model; ++d) {
            k_head[k_index(key, d, d_model, pairs)] = scalar_t(0.0f);
            v_head[v_index(key, d, d_model, pairs)] = scalar_t(0.0f);
          }
          continue;
        }
        const int64_t position = c.first_key + key;
        const int64_t slot = table[position / c.block_size] * c.block_size + position % c.block_size;
        const scalar_t* k = k_cache + (slot * c.num_kv_heads + h) * d_model;
        const scalar_t* v = v_cache + (slot * c.num_kv_heads + h) * d_model;
        for (int64_t d = 0; d < d_model; ++d) {
          k_head[k_index(key, d, d_model, pairs)] = k[d];
          v_head[v_index(key, d, d_model, pairs)] = v[d];
        }
      }
    }
  });
}

}  // namespace

// q: [T, Hq, D], the chunk's queries at positions start..start+T-1; k_cache, v_cache: [num_blocks,
// block_size, Hk, D], already holding the chunk's own keys; block_table: [n] int64, the request's blocks;
// window: the sliding window (0 for full attention). Returns [T, Hq, D] in q's dtype (fp32 or bf16).
torch::Tensor paged_prefill_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                      const torch::Tensor& v_cache, const torch::Tensor& block_table,
                                      int64_t start, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "not contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16, "fp32 or bf16 only");
  TORCH_CHECK(block_table.scalar_type() == torch::kLong && block_table.dim() == 1, "block_table: 1-d int64");
  Chunk c{};
  c.tokens = q.size(0);
  c.num_heads = q.size(1);
  c.head_dim = q.size(2);
  c.block_size = k_cache.size(1);
  c.num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == c.head_dim && c.num_heads % c.num_kv_heads == 0, "head mismatch");
  TORCH_CHECK(c.head_dim % 16 == 0, "head_dim must be a multiple of 16");
  c.start = start;
  c.window = window;
  c.scale = static_cast<float>(scale);
  c.first_key = window > 0 ? std::max<int64_t>(0, start - window + 1) : 0;
  const int64_t num_keys = start + c.tokens - c.first_key;
  TORCH_CHECK((start + c.tokens + c.block_size - 1) / c.block_size <= block_table.size(0), "block table too short");
  c.padded_keys = (num_keys + kKeyTile - 1) / kKeyTile * kKeyTile;
  auto out = torch::empty_like(q);
  if (c.tokens == 0) return out;
  const auto table = block_table.contiguous();
  auto kp = torch::empty({c.num_kv_heads * c.padded_keys * c.head_dim}, q.options());
  auto vp = torch::empty_like(kp);

  const int64_t group = c.num_heads / c.num_kv_heads;
  const int64_t block = std::max<int64_t>(1, kRowsPerItem / group);
  const int64_t num_blocks = (c.tokens + block - 1) / block, items = c.num_kv_heads * num_blocks;
  auto run = [&](auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    pack_keys_values(c, k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), table.data_ptr<int64_t>(),
                     kp.data_ptr<scalar_t>(), vp.data_ptr<scalar_t>());
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        // Interleave short (early) and long (late) query blocks so each thread's share holds both.
        const int64_t h = item % c.num_kv_heads, n = item / c.num_kv_heads;
        const int64_t b = n % 2 == 0 ? n / 2 : num_blocks - 1 - n / 2;
        attend_block(c, q_ptr, kp.data_ptr<scalar_t>(), vp.data_ptr<scalar_t>(), out_ptr, h, b * block,
                     std::min(c.tokens, (b + 1) * block));
      }
    });
  };
  if (q.scalar_type() == torch::kFloat) run(static_cast<float*>(nullptr));
  else run(static_cast<bf16*>(nullptr));
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_prefill_attention", &paged_prefill_attention, "prefill attention over the paged KV cache");
}
