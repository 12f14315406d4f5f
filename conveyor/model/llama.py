"""The Llama family: Llama 2/3.x, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norm)."""

from __future__ import annotations

import torch
from torch import nn

from conveyor.config import ModelConfig
from conveyor.model.attention import AttentionMetadata
from conveyor.model.base import CausalLM
from conveyor.model.layers import GatedMLP, RMSNorm, RotaryEmbedding, SelfAttention


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = SelfAttention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.head_dim**-0.5,
            rotary, bias=config.attention_bias, qk_norm_eps=eps if config.qk_norm else None,
            sliding_window=config.sliding_window)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), positions, k_cache, v_cache, meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(CausalLM):
    def __init__(self, config: ModelConfig, max_positions: int) -> None:
        super().__init__(config)
        rotary = RotaryEmbedding(config.head_dim, max_positions, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary) for _ in range(config.num_layers))
