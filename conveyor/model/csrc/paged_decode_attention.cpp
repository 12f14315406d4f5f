// Decode attention read straight from the paged KV cache (conveyor.model.paged_decode).
//
// One query token per row attends over that row's keys, which live in fixed-size blocks scattered
// through the cache pool; the row's block table says where. The torch reference path first copies
// every row's blocks into one contiguous tensor (`index_select`) and then runs SDPA over it: the K/V
// are read, written and read again. Here each (row, KV head) reads its keys and values once, in
// place, as vLLM's CPU backend and llama.cpp do.
//
// Per (row, KV head), in fp32 whatever the cache dtype:
//   1. scores[g][j] = scale * q[g] . k[j] for the G query heads sharing the KV head (GQA) and each
//      visible key j (the whole context, or only the sliding window);
//   2. an exact softmax per query head over the row's scores (a two-pass softmax: the scores of one
//      row fit in a few KiB, so there is no need for an online one);
//   3. out[g] = sum_j p[g][j] * v[j].
// Rows and KV heads are spread over torch's intra-op threads (at::parallel_for).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename scalar_t>
void decode_one(const scalar_t* q, const scalar_t* k_cache, const scalar_t* v_cache, const int64_t* blocks,
                int64_t first_key, int64_t end_key, scalar_t* out, int64_t group, int64_t head_dim,
                int64_t block_size, int64_t token_stride, float scale) {
  // q and out point at this KV head's G query heads ([G, D], contiguous); k_cache and v_cache at this
  // KV head's element of slot 0; `token_stride` is the distance between two slots (Hk * D).
  const int64_t num_keys = end_key - first_key;
  std::vector<float> queries(group * head_dim), scores(group * num_keys), acc(group * head_dim, 0.0f);
  for (int64_t i = 0; i < group * head_dim; ++i) queries[i] = static_cast<float>(q[i]) * scale;

  for (int64_t j = 0; j < num_keys; ++j) {
    const int64_t key = first_key + j;
    const scalar_t* k = k_cache + (blocks[key / block_size] * block_size + key % block_size) * token_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = queries.data() + g * head_dim;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * static_cast<float>(k[d]);
      scores[g * num_keys + j] = dot;
    }
  }

  std::vector<float> inv_sum(group);
  for (int64_t g = 0; g < group; ++g) {
    float* s = scores.data() + g * num_keys;
    float max = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < num_keys; ++j) max = std::max(max, s[j]);
    float sum = 0.0f;
    for (int64_t j = 0; j < num_keys; ++j) {
      s[j] = std::exp(s[j] - max);
      sum += s[j];
    }
    inv_sum[g] = 1.0f / sum;
  }

  for (int64_t j = 0; j < num_keys; ++j) {
    const int64_t key = first_key + j;
    const scalar_t* v = v_cache + (blocks[key / block_size] * block_size + key % block_size) * token_stride;
    for (int64_t g = 0; g < group; ++g) {
      const float p = scores[g * num_keys + j];
      float* a = acc.data() + g * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += p * static_cast<float>(v[d]);
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t d = 0; d < head_dim; ++d)
      out[g * head_dim + d] = static_cast<scalar_t>(acc[g * head_dim + d] * inv_sum[g]);
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

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    const scalar_t* q_ptr = q.data_ptr<scalar_t>();
    const scalar_t* k_ptr = k_cache.data_ptr<scalar_t>();
    const scalar_t* v_ptr = v_cache.data_ptr<scalar_t>();
    const int64_t* block_ptr = blocks_c.data_ptr<int64_t>();
    const int64_t* bound_ptr = bounds_c.data_ptr<int64_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t offset = (r * num_heads + h * group) * head_dim;
        decode_one(q_ptr + offset, k_ptr + h * head_dim, v_ptr + h * head_dim, block_ptr + r * table_width,
                   bound_ptr[2 * r], bound_ptr[2 * r + 1], out_ptr + offset, group, head_dim, block_size,
                   num_kv_heads * head_dim, static_cast<float>(scale));
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache");
}
