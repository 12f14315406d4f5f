// A decoder layer's small elementwise ops, fused (conveyor.model.fused_ops).
//
// Between its matmuls a layer runs a dozen small torch ops per step: each RMS norm is an fp32 copy, a
// square, a mean, two products and a cast back; rotary is a gather, casts, a negation, a concatenation,
// two products and a sum; the MLP's activation and product are two more passes. Each op is a dispatch
// and a full pass over memory. Here each group is one pass per row:
//   rms_norm        out = norm(x) * scale                    (scale = 1 + weight for Gemma)
//   add_rms_norm    residual' = residual + norm(y) * scale1, then out = norm(residual') * scale2 (optional)
//   qk_norm_rope    q, k out of the fused QKV projection, each head RMS-normed (optional), then rotated
//   act_mul         act(gate) * up out of the fused gate/up projection (GELU-tanh or SiLU)
// The arithmetic follows the torch reference path (conveyor.model.layers) step by step, rounding to
// the model's dtype exactly where the reference does, so the results match it up to the order of the
// sum of squares inside a norm (fp32). Rows are spread over torch's intra-op threads.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include "exp_approx.h"

namespace {

// The reference rounds to the model's dtype after each op: so do we (a no-op in fp32).
template <typename scalar_t>
inline float round_to(float x) {
  return static_cast<float>(static_cast<scalar_t>(x));
}

// Rows per thread task: at least ~16k elements, so small decode steps do not pay a thread fork per op.
inline int64_t grain(int64_t row_elements) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elements));
}

// 1 / sqrt(mean(x^2) + eps) over n fp32 values.
inline float inv_rms(const float* x, int64_t n, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  return 1.0f / std::sqrt(sum / static_cast<float>(n) + eps);
}

// A norm's scale: an fp32 [n] tensor, `1 + weight` for Gemma (`RMSNorm.scale()`, computed once).
const float* scale_ptr(const torch::Tensor& scale, int64_t n) {
  TORCH_CHECK(scale.scalar_type() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == n,
              "a norm's scale must be a contiguous fp32 tensor of the row's size");
  return scale.data_ptr<float>();
}

// out[i] = dtype((x[i] * inv_rms) * scale[i]) for one row already in fp32.
template <typename scalar_t>
inline void norm_row(const float* x, const float* scale, int64_t n, float eps, scalar_t* out) {
  const float r = inv_rms(x, n, eps);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>((x[i] * r) * scale[i]);
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& scale_tensor, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rms_norm: x must be a contiguous [T, H] tensor");
  auto out = torch::empty_like(x);
  const int64_t rows = x.size(0), n = x.size(1);
  const float* scale = scale_ptr(scale_tensor, n);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> row(n);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < n; ++i) row[i] = static_cast<float>(src[t * n + i]);
        norm_row<scalar_t>(row.data(), scale, n, static_cast<float>(eps), dst + t * n);
      }
    });
  });
  return out;
}

// residual + dtype(norm(y) * scale1), rounded to dtype as the reference's add; then, if scale2 is given, that
// sum normed with scale2. Returns (the new residual, its norm or an empty tensor).
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(const torch::Tensor& residual, const torch::Tensor& y,
                                                      const torch::Tensor& scale1_tensor,
                                                      const c10::optional<torch::Tensor>& scale2_tensor, double eps) {
  TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous() && y.is_contiguous() &&
                  residual.sizes() == y.sizes() && residual.scalar_type() == y.scalar_type(),
              "add_rms_norm: residual and y must be contiguous [T, H] tensors of one dtype");
  auto summed = torch::empty_like(residual);
  const bool second = scale2_tensor.has_value();
  auto normed = second ? torch::empty_like(residual) : torch::empty({0}, residual.options());
  const int64_t rows = residual.size(0), n = residual.size(1);
  const float* scale1 = scale_ptr(scale1_tensor, n);
  const float* scale2 = second ? scale_ptr(*scale2_tensor, n) : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, residual.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* res = residual.data_ptr<scalar_t>();
    const scalar_t* src = y.data_ptr<scalar_t>();
    scalar_t* sum_out = summed.data_ptr<scalar_t>();
    scalar_t* norm_out = second ? normed.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
      std::vector<float> row(n);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t i = 0; i < n; ++i) row[i] = static_cast<float>(src[t * n + i]);
        const float r = inv_rms(row.data(), n, static_cast<float>(eps));
        for (int64_t i = 0; i < n; ++i) {
          const float added = round_to<scalar_t>((row[i] * r) * scale1[i]);
          row[i] = round_to<scalar_t>(static_cast<float>(res[t * n + i]) + added);
          sum_out[t * n + i] = static_cast<scalar_t>(row[i]);
        }
        if (norm_out != nullptr) norm_row<scalar_t>(row.data(), scale2, n, static_cast<float>(eps), norm_out + t * n);
      }
    });
  });
  return {summed, normed};
}

// q [T, Hq, D] and k [T, Hk, D] from qkv [T, (Hq + 2 Hk) * D]: each head RMS-normed (when the norm scales
// are given) and rotated (rotate-half layout) by the fp32 cos/sin tables' rows at `positions`.
std::tuple<torch::Tensor, torch::Tensor> qk_norm_rope(const torch::Tensor& qkv, const torch::Tensor& positions,
                                                      const torch::Tensor& cos, const torch::Tensor& sin,
                                                      const c10::optional<torch::Tensor>& q_scale_tensor,
                                                      const c10::optional<torch::Tensor>& k_scale_tensor, double eps,
                                                      int64_t num_heads, int64_t num_kv_heads,
                                                      int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1 && qkv.size(1) == (num_heads + 2 * num_kv_heads) * head_dim,
              "qk_norm_rope: qkv must be [T, (Hq + 2 Hk) * D] with contiguous rows");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(1) == head_dim && head_dim % 2 == 0,
              "qk_norm_rope: cos and sin must be contiguous fp32 [positions, D] tables");
  TORCH_CHECK(q_scale_tensor.has_value() == k_scale_tensor.has_value(), "qk_norm_rope: give both norm scales or neither");
  const int64_t tokens = qkv.size(0), row_stride = qkv.stride(0), half = head_dim / 2;
  auto q = torch::empty({tokens, num_heads, head_dim}, qkv.options());
  auto k = torch::empty({tokens, num_kv_heads, head_dim}, qkv.options());
  const bool norm = q_scale_tensor.has_value();
  const float* q_scale = norm ? scale_ptr(*q_scale_tensor, head_dim) : nullptr;
  const float* k_scale = norm ? scale_ptr(*k_scale_tensor, head_dim) : nullptr;
  auto pos = positions.to(torch::kInt64).contiguous();
  const int64_t* pos_ptr = pos.data_ptr<int64_t>();
  const float* cos_ptr = cos.data_ptr<float>();
  const float* sin_ptr = sin.data_ptr<float>();
  const int64_t heads = num_heads + num_kv_heads;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "qk_norm_rope", [&] {
    const scalar_t* src = qkv.data_ptr<scalar_t>();
    scalar_t* q_out = q.data_ptr<scalar_t>();
    scalar_t* k_out = k.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain(heads * head_dim), [&](int64_t begin, int64_t end) {
      std::vector<float> x(head_dim), c(head_dim), s(head_dim);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t p = pos_ptr[t];
        for (int64_t d = 0; d < head_dim; ++d) {  // the reference casts the table rows to the dtype
          c[d] = round_to<scalar_t>(cos_ptr[p * head_dim + d]);
          s[d] = round_to<scalar_t>(sin_ptr[p * head_dim + d]);
        }
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* in = src + t * row_stride + h * head_dim;
          const bool is_q = h < num_heads;
          scalar_t* out = is_q ? q_out + (t * num_heads + h) * head_dim
                               : k_out + (t * num_kv_heads + h - num_heads) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) x[d] = static_cast<float>(in[d]);
          if (norm) {
            const float* scale = is_q ? q_scale : k_scale;
            const float r = inv_rms(x.data(), head_dim, static_cast<float>(eps));
            for (int64_t d = 0; d < head_dim; ++d) x[d] = round_to<scalar_t>((x[d] * r) * scale[d]);
          }
          for (int64_t d = 0; d < head_dim; ++d) {
            const float rotated = d < half ? -x[d + half] : x[d - half];
            const float a = round_to<scalar_t>(x[d] * c[d]);
            const float b = round_to<scalar_t>(rotated * s[d]);
            out[d] = static_cast<scalar_t>(a + b);
          }
        }
      }
    });
  });
  return {q, k};
}


// 1 + tanh(y), as GELU needs it, from e = exp(-2 |y|) <= 1 (no overflow): 2 / (1 + e) for y >= 0 and
// 2 e / (1 + e) below, which keeps its precision where tanh(y) nears -1 (no 1 - 0.99... cancellation).
inline float one_plus_tanh(float y) {
  const float e = exp_approx(-2.0f * std::fabs(y));
  return (y >= 0.0f ? 2.0f : 2.0f * e) / (1.0f + e);
}

// The activations over n fp32 values, in place: plain loops over a buffer, so g++ vectorizes them.
void gelu_tanh_inplace(float* __restrict x, int64_t n) {
  const float beta = static_cast<float>(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = 0.044715f;
  for (int64_t i = 0; i < n; ++i) {
    const float g = x[i];
    x[i] = 0.5f * g * one_plus_tanh(beta * (g + kappa * g * g * g));
  }
}

void silu_inplace(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + exp_approx(-x[i]));
}

// act(gate) * up from gate_up [T, 2 I] (gate first): act is "gelu_tanh" or "silu"; each rounded to the
// dtype as the reference's two ops.
torch::Tensor act_mul(const torch::Tensor& gate_up, const std::string& activation) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "act_mul: gate_up must be a contiguous [T, 2 I] tensor");
  TORCH_CHECK(activation == "gelu_tanh" || activation == "silu", "act_mul: unknown activation ", activation);
  const auto act = activation == "gelu_tanh" ? gelu_tanh_inplace : silu_inplace;
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({rows, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "act_mul", [&] {
    const scalar_t* src = gate_up.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(2 * inter), [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(inter);
      float* values = buffer.data();
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* gate = src + t * 2 * inter;
        const scalar_t* up = gate + inter;
        for (int64_t i = 0; i < inter; ++i) values[i] = static_cast<float>(gate[i]);
        act(values, inter);
        for (int64_t i = 0; i < inter; ++i)
          dst[t * inter + i] = static_cast<scalar_t>(round_to<scalar_t>(values[i]) * static_cast<float>(up[i]));
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMS norm of each row");
  m.def("add_rms_norm", &add_rms_norm, "residual + norm(y), then optionally that sum normed");
  m.def("qk_norm_rope", &qk_norm_rope, "q and k out of the fused QKV projection, normed and rotated");
  m.def("act_mul", &act_mul, "act(gate) * up out of the fused gate/up projection");
}
