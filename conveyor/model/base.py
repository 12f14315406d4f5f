"""What every architecture shares: embedding, a stack of decoder layers, final norm, lm_head on the
rows that sample, and the paged KV cache tensors the layers write to."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conveyor.config import ModelConfig
from conveyor.model.attention import AttentionMetadata
from conveyor.model.int8_gemv import MAX_ROWS as SMALL_ROWS
from conveyor.model.layers import Linear, RMSNorm, linear, load_hf_state_dict


class CausalLM(nn.Module):
    """Subclasses build `self.layers` (each `layer(h, positions, k_cache, v_cache, meta) -> h`)."""

    embedding_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden_size)

    def __init__(self, config: ModelConfig, gemma_norms: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, gemma_norms)
        self.lm_head: nn.Module | None = None  # None: tied to the embedding (int8 mode gives it its own)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        # Steps of 1-4 rows: the lm_head as lossless int8 in C++ (conveyor.model.int8_gemv), or None.
        self.small_row_head: Any = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata, logits_indices: torch.Tensor, upcast_logits: bool = True) -> torch.Tensor:
        """Flat batch in ([T] ids and positions), logits out only for `logits_indices` rows: [S, vocab]
        (see `compute_logits` for `upcast_logits`)."""
        # NOTE: the final norm and lm_head run only on rows that sample; the lm_head is the largest matmul.
        hidden = self.hidden_states(input_ids, positions, kv_caches, meta)[logits_indices]
        return self.compute_logits(hidden, upcast_logits)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """The last layer's output for every row of the flat batch: [T, hidden] (before the final norm)."""
        hidden = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:
            hidden = hidden * torch.tensor(self.embedding_scale, dtype=hidden.dtype)
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden = layer(hidden, positions, k_cache, v_cache, meta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """Final norm and lm_head over some rows of `hidden_states`: [rows, vocab] in fp32, or with `upcast`
        False in the lm_head's own dtype (the engine's sampler casts only what needs it: a bf16 step's fp32
        copy of 32 rows is a fresh 32 MiB buffer, ~7 ms)."""
        hidden = self.norm(hidden)
        if self.small_row_head is not None and 1 <= hidden.shape[0] <= SMALL_ROWS:
            logits = self.small_row_head(hidden)
        elif self.lm_head is None:
            logits = linear(hidden, self.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        return logits.float() if upcast else logits

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors named as Hugging Face names them (`model.layers.0.self_attn.q_proj.weight`, ...)."""
        renamed = {}
        for name, tensor in tensors.items():
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as lm_head
            renamed[name.removeprefix("model.")] = tensor
        load_hf_state_dict(self, renamed)

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                          device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        c = self.config
        shape = (num_blocks, block_size, c.num_kv_heads, c.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(c.num_layers)]
