"""Gemma 3 (text): sliding-window and global layers, q/k norm, sandwich norms, scaled embeddings."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conveyor.config import ModelConfig
from conveyor.model.attention import AttentionMetadata
from conveyor.model.base import CausalLM
from conveyor.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        sliding = config.is_sliding(layer_index)
        eps = config.rms_norm_eps
        scale = (config.query_pre_attn_scalar or config.head_dim) ** -0.5
        self.self_attn = SelfAttention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, scale, rotary,
            qk_norm_eps=eps, gemma_norms=True, sliding_window=config.sliding_window if sliding else None)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, gemma_style=True)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, gemma_style=True)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, gemma_style=True)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, gemma_style=True)
        self.fused_ops: Any = None  # the fused C++ ops (conveyor.model.fused_ops), or None for torch's

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.fused_ops is not None and hidden.dim() == 2 and hidden.is_contiguous():
            return self._fused_forward(hidden, positions, k_cache, v_cache, meta)
        attn_out = self.self_attn(self.input_layernorm(hidden), positions, k_cache, v_cache, meta)
        hidden = hidden + self.post_attention_layernorm(attn_out)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp_out)

    def _fused_forward(self, hidden: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """`forward` with each sandwich norm, its residual add and the next norm in one pass."""
        ops, eps = self.fused_ops, self.input_layernorm.eps
        attn_out = self.self_attn(self.input_layernorm(hidden), positions, k_cache, v_cache, meta)
        hidden, normed = ops.add_rms_norm(hidden, attn_out.contiguous(), self.post_attention_layernorm.fused_scale,
                                          self.pre_feedforward_layernorm.fused_scale, eps)
        mlp_out = self.mlp(normed)
        return ops.add_rms_norm(hidden, mlp_out.contiguous(), self.post_feedforward_layernorm.fused_scale, None, eps)[0]


class Gemma3ForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__(config, gemma_norms=True)
        self.embedding_scale = config.hidden_size**0.5
        global_rope = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        local_rope = RotaryEmbedding(config.head_dim, max_positions, config.rope_local_theta or 10000.0)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, local_rope if config.is_sliding(i) else global_rope)
            for i in range(config.num_layers))
