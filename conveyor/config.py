"""Engine, scheduler and model configuration, validated, with defaults.

Two limits users confuse: `max_num_batched_tokens` is a per-step *compute budget* (how many tokens one
forward pass may process); the KV-cache pool (`kv_cache_memory` or `num_kv_blocks`) is *memory
capacity* (how many tokens of context all running requests may hold at once).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

QUANTIZATION_METHODS = ("int8",)  # what `EngineConfig.quantization` accepts (conveyor.model.quantization)

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_memory_size(value: str | int) -> int:
    """'2GiB' -> 2147483648; plain integers are bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse memory size {value!r}; use e.g. '512MiB' or '2GiB'")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


def available_cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, read from GGUF metadata or a Hugging Face config.json."""

    architecture: str  # "gemma3" or "llama" (Llama, Mistral, Qwen2, Qwen3 share it)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Llama family
    hidden_act: str = "silu"
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    qk_norm: bool = False  # Qwen3 and Gemma 3 normalise q and k per head
    rope_scaling: dict | None = None  # Llama 3.x "llama3" scaling
    # Gemma 3
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer
    rope_local_theta: float | None = None  # rope base for sliding layers
    query_pre_attn_scalar: float | None = None
    name: str = ""

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"


@dataclass
class EngineConfig:
    """Everything an engine needs to start. Knob names follow vLLM's."""

    model: str | None = None  # path to a .gguf file or a Hugging Face directory; None = default model
    tokenizer: str | None = None  # override: a tokenizer.json path or a directory holding one
    max_num_seqs: int = 64  # cap on running requests
    max_num_batched_tokens: int = 1024  # per-step compute budget, in tokens
    max_model_len: int | None = None  # per-request context limit; default min(model limit, 8192)
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory: str | int = "2GiB"  # KV pool capacity, in bytes (ignored if num_kv_blocks is set)
    num_kv_blocks: int | None = None
    num_threads: int | None = None  # torch intra-op threads; default = cores this process may use
    device: str = "cpu"
    dtype: str = "float32"
    quantization: str | None = None  # "int8": int8 weights and activations in every linear layer (opt-in)
    seed: int = 0
    enable_step_trace: bool = True
    chat_template: str | None = None  # path to a Jinja template overriding the model's

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {self.num_threads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} or unset, "
                             f"got {self.quantization!r}")
        parse_memory_size(self.kv_cache_memory)
