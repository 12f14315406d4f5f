// Decode attention read straight from the paged KV cache (conveyor.model.paged_decode).
//
// One query token per row attends over that row's keys, which live in fixed-size blocks scattered
// through the cache pool; the row's block table says where. The torch reference path first copies
// every row's blocks into one contiguous tensor (`index_select`) and then runs SDPA over it: the K/V
// are read, written and read again. Here each (row, KV head) reads its keys and values once, in
// place, as vLLM's CPU backend and llama.cpp do.
//
// Per (row, KV head), in fp32 whatever the cache dtype:
//   1. scores[g][j] = (scale * q[g]) . k[j] for the G query heads sharing the KV head (GQA) and each
//      visible key j (the whole context, or only the sliding window);
//   2. an exact softmax per query head over the row's scores (a two-pass softmax: the scores of one
//      row fit in a few KiB, so there is no need for an online one);
//   3. out[g] = sum_j p[g][j] * v[j].
// With AVX-512, a bf16 or fp16 cache and head dims a multiple of 64, the loops are register-blocked:
// two keys at a time against every query head for the scores (each key converted to fp32 once for all
// G heads), up to 4 heads x 64 dims of accumulators held in registers while the values stream by, exp
// vectorized. Then reading the scattered blocks bounds it (~10 GB/s here, where a streaming read makes
// ~28: docs/benchmarks.md, "W1 bf16 by step kind").
// The (row, KV head) tasks are split over torch's intra-op threads in contiguous runs of equal key
// counts (rows of a step differ in length by up to the model's context).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>
#include "exp_approx.h"

namespace {

// The slot of key `key` (counted from the first slot of the row's first block) in the flat pool.
inline int64_t key_slot(const int64_t* blocks, int64_t key, int64_t block_size) {
  return blocks[key / block_size] * block_size + key % block_size;
}

// Steps 2 and the final scale: exp of each score minus its head's max, in place; returns 1 / sum per head.
void softmax_rows(float* scores, int64_t group, int64_t num_keys, float* inv_sum) {
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores + g * num_keys;
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < num_keys; ++j) max = std::max(max, s[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < num_keys; ++j) {
      s[j] = exp_approx(s[j] - max);
      sum += s[j];
    }
    inv_sum[g] = 1.0f / sum;
  }
}

// The plain loops: any dtype, any head dim.
template <typename scalar_t>
void decode_one_plain(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* blocks,
                      int64_t first_key, int64_t end_key, scalar_t* out, int64_t group, int64_t head_dim,
                      int64_t block_size, int64_t token_stride, float scale, std::vector<float>& buffer) {
  const int64_t num_keys = end_key - first_key;
  buffer.resize(group * (num_keys + 2 * head_dim + 1));
  float* queries = buffer.data();
  float* acc = queries + group * head_dim;
  float* inv_sum = acc + group * head_dim;
  float* scores = inv_sum + group;
  for (int64_t i = 0; i < group * head_dim; ++i) {
    queries[i] = static_cast<float>(q[i]) * scale;
    acc[i] = 0.0f;
  }
  for (int64_t j = 0; j < num_keys; ++j) {
    const scalar_t* k = k_cache + key_slot(blocks, first_key + j, block_size) * token_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = queries + g * head_dim;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(k[d]);
      scores[g * num_keys + j] = dot;
    }
  }
  softmax_rows(scores, group, num_keys, inv_sum);
  for (int64_t j = 0; j < num_keys; ++j) {
    const scalar_t* v = v_cache + key_slot(blocks, first_key + j, block_size) * token_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * num_keys + j];
      float* a = acc + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v[d]);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      out[g * head_dim + d] = static_cast<scalar_t>(acc[g * head_dim + d] * inv_sum[g]);
}

#if defined(__AVX512F__)

// 16 cache values as fp32.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(at::BFloat16* p, __m512 x) {
#if defined(__AVX512BF16__)
  // Round to nearest even, as torch's conversion does.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
  return;
#endif
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, x);
  for (int i = 0; i < 16; ++i) p[i] = static_cast<at::BFloat16>(tmp[i]);  // round to nearest even, as torch
}
inline void store16(at::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

// scores[g][j] for keys j, j+1 and NG heads: each key's 16-value chunks converted once, FMAs into
// 2 * NG independent accumulators.
template <typename scalar_t, int NG>
void scores_two_keys(const float* queries, const scalar_t* k0, const scalar_t* k1, int64_t head_dim, float* s0,
                     float* s1, int64_t num_keys) {
  __m512 a0[NG], a1[NG];
  for (int g = 0; g < NG; ++g) a0[g] = a1[g] = _mm512_setzero_ps();
  for (int64_t d = 0; d < head_dim; d += 16) {
    const __m512 x0 = load16(k0 + d), x1 = load16(k1 + d);
    for (int g = 0; g < NG; ++g) {
      const __m512 qg = _mm512_loadu_ps(queries + g * head_dim + d);
      a0[g] = _mm512_fmadd_ps(qg, x0, a0[g]);
      a1[g] = _mm512_fmadd_ps(qg, x1, a1[g]);
    }
  }
  for (int g = 0; g < NG; ++g) {
    s0[g * num_keys] = _mm512_reduce_add_ps(a0[g]);
    s1[g * num_keys] = _mm512_reduce_add_ps(a1[g]);
  }
}

// out[g][d0..d0+64) for NG heads: sum_j p[g][j] * v[j][d0..d0+64) with the 4 x NG accumulators in registers.
template <typename scalar_t, int NG>
void values_chunk(const float* probs, int64_t num_keys, const scalar_t* v_cache, const int64_t* blocks,
                  int64_t first_key, int64_t block_size, int64_t token_stride, int64_t d0, const float* inv_sum,
                  scalar_t* out, int64_t head_dim) {
  __m512 acc[NG][4];
  for (int g = 0; g < NG; ++g)
    for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < num_keys; ++j) {
    const scalar_t* v = v_cache + key_slot(blocks, first_key + j, block_size) * token_stride + d0;
    __m512 x[4];
    for (int c = 0; c < 4; ++c) x[c] = load16(v + 16 * c);
    for (int g = 0; g < NG; ++g) {
      const __m512 p = _mm512_set1_ps(probs[g * num_keys + j]);
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(p, x[c], acc[g][c]);
    }
  }
  for (int g = 0; g < NG; ++g) {
    const __m512 scale = _mm512_set1_ps(inv_sum[g]);
    for (int c = 0; c < 4; ++c) store16(out + g * head_dim + d0 + 16 * c, _mm512_mul_ps(acc[g][c], scale));
  }
}

template <typename scalar_t, int NG>
void heads_block(const float* queries, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* blocks,
                 int64_t first_key, int64_t num_keys, float* scores, float* inv_sum, scalar_t* out,
                 int64_t head_dim, int64_t block_size, int64_t token_stride) {
  int64_t j = 0;
  for (; j + 1 < num_keys; j += 2) {
    const scalar_t* k0 = k_cache + key_slot(blocks, first_key + j, block_size) * token_stride;
    const scalar_t* k1 = k_cache + key_slot(blocks, first_key + j + 1, block_size) * token_stride;
    scores_two_keys<scalar_t, NG>(queries, k0, k1, head_dim, scores + j, scores + j + 1, num_keys);
  }
  if (j < num_keys) {  // an odd last key: paired with itself
    const scalar_t* k0 = k_cache + key_slot(blocks, first_key + j, block_size) * token_stride;
    scores_two_keys<scalar_t, NG>(queries, k0, k0, head_dim, scores + j, scores + j, num_keys);
  }
  softmax_rows(scores, NG, num_keys, inv_sum);
  for (int64_t d0 = 0; d0 < head_dim; d0 += 64)
    values_chunk<scalar_t, NG>(scores, num_keys, v_cache, blocks, first_key, block_size, token_stride, d0, inv_sum,
                               out, head_dim);
}

// The register-blocked loops: head dims a multiple of 64, query heads 4 at a time.
template <typename scalar_t>
void decode_one_avx512(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* blocks,
                       int64_t first_key, int64_t end_key, scalar_t* out, int64_t group, int64_t head_dim,
                       int64_t block_size, int64_t token_stride, float scale, std::vector<float>& buffer) {
  const int64_t num_keys = end_key - first_key;
  buffer.resize(group * (head_dim + num_keys + 1));
  float* queries = buffer.data();
  float* inv_sum = queries + group * head_dim;
  float* scores = inv_sum + group;
  for (int64_t i = 0; i < group * head_dim; ++i) queries[i] = static_cast<float>(q[i]) * scale;
  for (int64_t g = 0; g < group; g += 4) {
    const float* qg = queries + g * head_dim;
    float* sg = scores + g * num_keys;
    scalar_t* og = out + g * head_dim;
    const auto args = std::make_tuple(qg, k_cache, v_cache, blocks, first_key, num_keys, sg, inv_sum + g, og,
                                      head_dim, block_size, token_stride);
    switch (std::min<int64_t>(4, group - g)) {
      case 4: std::apply(heads_block<scalar_t, 4>, args); break;
      case 3: std::apply(heads_block<scalar_t, 3>, args); break;
      case 2: std::apply(heads_block<scalar_t, 2>, args); break;
      default: std::apply(heads_block<scalar_t, 1>, args); break;
    }
  }
}

#endif  // __AVX512F__

template <typename scalar_t>
void decode_one(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* blocks,
                int64_t first_key, int64_t end_key, scalar_t* out, int64_t group, int64_t head_dim,
                int64_t block_size, int64_t token_stride, float scale, std::vector<float>& buffer) {
#if defined(__AVX512F__)
  // 16-bit caches only: in fp32 (2 KiB of K/V per key and layer) these loops measured slower on W1 than
  // the plain ones (docs/benchmarks.md, "Decode attention, register-blocked").
  constexpr bool vectorized = std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>;
  if constexpr (vectorized) if (head_dim % 64 == 0 && end_key > first_key) {
    decode_one_avx512(q, k_cache, v_cache, blocks, first_key, end_key, out, group, head_dim, block_size,
                      token_stride, scale, buffer);
    return;
  }
#endif
  decode_one_plain(q, k_cache, v_cache, blocks, first_key, end_key, out, group, head_dim, block_size, token_stride,
                   scale, buffer);
}

}  // namespace

// q: [R, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hk, D]; blocks: [R, B] int64 block ids,
// row r's key i (counted from the first slot of blocks[r][0]) in slot blocks[r][i / block_size] *
// block_size + i % block_size; key_bounds: [R, 2] int64, row r attends keys [key_bounds[r][0],
// key_bounds[r][1]). Returns [R, Hq, D] in q's dtype.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& k_cache,
                                     const torch::Tensor& v_cache, const torch::Tensor& blocks,
                                     const torch::Tensor& key_bounds, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(), "not contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && k_cache.scalar_type() == v_cache.scalar_type(),
              "q and the caches must share a dtype");
  TORCH_CHECK(blocks.scalar_type() == torch::kLong && key_bounds.scalar_type() == torch::kLong, "need int64");
  const auto blocks_c = blocks.contiguous();
  const auto bounds_c = key_bounds.contiguous();
  const int64_t rows = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && num_heads % num_kv_heads == 0, "head mismatch");
  const int64_t group = num_heads / num_kv_heads, table_width = blocks_c.size(1);
  auto out = torch::empty_like(q);
  const int64_t* bound_ptr = bounds_c.data_ptr<int64_t>();

  // Contiguous runs of tasks with about equal key counts, one per thread (a fixed cost per task too).
  const int64_t tasks = rows * num_kv_heads;
  std::vector<int64_t> cost(tasks + 1, 0);
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t r = t / num_kv_heads;
    cost[t + 1] = cost[t] + (bound_ptr[2 * r + 1] - bound_ptr[2 * r]) + 16;
  }
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  std::vector<int64_t> first_task(parts + 1, tasks);
  first_task[0] = 0;
  for (int64_t p = 1; p < parts; ++p)
    first_task[p] = std::lower_bound(cost.begin(), cost.end(), cost[tasks] * p / parts) - cost.begin();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    const int64_t* block_ptr = blocks_c.data_ptr<int64_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer;
      for (int64_t task = first_task[begin]; task < first_task[end]; ++task) {
        const int64_t r = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t offset = (r * num_heads + h * group) * head_dim;
        decode_one(q_ptr + offset, k_ptr + h * head_dim, v_ptr + h * head_dim, block_ptr + r * table_width,
                   bound_ptr[2 * r], bound_ptr[2 * r + 1], out_ptr + offset, group, head_dim, block_size,
                   num_kv_heads * head_dim, static_cast<float>(scale), buffer);
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache");
}
