"""GGUF -> (ModelConfig, Hugging Face-named fp32 tensors), undoing llama.cpp's conversion quirks."""

from __future__ import annotations

import logging

import gguf
import numpy as np
import torch

from conveyor.config import ModelConfig
from conveyor.model.gguf_file import GGUFFile

logger = logging.getLogger(__name__)

LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}


# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read_config(reader: GGUFFile) -> ModelConfig:
    _field = reader.get
    arch = _field("general.architecture")
    if arch != "gemma3" and arch not in LLAMA_FAMILY:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; conveyor supports gemma3 and "
                         f"{sorted(LLAMA_FAMILY)}")
    tensor_names = {t.name for t in reader.tensors}
    tokens = _field("tokenizer.ggml.tokens", [])
    hidden = _field(f"{arch}.embedding_length")
    num_heads = _field(f"{arch}.attention.head_count")
    eos_ids = [_field("tokenizer.ggml.eos_token_id")]
    if "<end_of_turn>" in tokens:  # Gemma's chat turns end with it
        eos_ids.append(tokens.index("<end_of_turn>"))
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")  # [vocab, hidden]
    config = ModelConfig(
        architecture="gemma3" if arch == "gemma3" else "llama",
        vocab_size=int(embedding.shape[0]),
        hidden_size=hidden,
        intermediate_size=_field(f"{arch}.feed_forward_length"),
        num_layers=_field(f"{arch}.block_count"),
        num_heads=num_heads,
        num_kv_heads=_field(f"{arch}.attention.head_count_kv", num_heads),
        head_dim=_field(f"{arch}.attention.key_length", hidden // num_heads),
        rms_norm_eps=_field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=_field(f"{arch}.rope.freq_base", 10000.0),
        max_position_embeddings=_field(f"{arch}.context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[i for i in eos_ids if i is not None],
        pad_token_id=_field("tokenizer.ggml.padding_token_id"),
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        sliding_window=_field(f"{arch}.attention.sliding_window"),
        name=_field("general.name", ""),
    )
    if arch == "gemma3":
        # Not in the GGUF: Gemma 3 puts a global layer after every five sliding ones, whose rope base is 10k.
        config.hidden_act = "gelu_pytorch_tanh"
        config.layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                              for i in range(config.num_layers)]
        config.rope_local_theta = 10000.0
        config.query_pre_attn_scalar = float(config.head_dim)
    if "rope_freqs.weight" in tensor_names:
        logger.warning("this GGUF carries rope_freqs (Llama 3.1-style scaling), which conveyor ignores: "
                       "contexts beyond the original training length will be off")
    return config


def _unpermute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp interleaves each head's rotary halves for Llama/Mistral q/k; put them back."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def hf_name(gguf_name: str, arch: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk":
        return None
    if parts[2] == "ffn_norm":  # the norm before the MLP: Gemma has a pair around it, Llama just this one
        target = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    elif parts[2] in _LAYER_NAMES:
        target = _LAYER_NAMES[parts[2]]
    else:
        return None
    return f"model.layers.{parts[1]}.{target}.{suffix}"


def load_gguf(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    reader = GGUFFile(path)
    config = read_config(reader)
    arch = reader.get("general.architecture")
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, arch)
        if name is None:
            continue  # e.g. rope_freqs
        array = gguf.quants.dequantize(reader.tensor_bytes(tensor), tensor.qtype)
        # NOTE: copy when the result still points into the read-only file mapping (F32 tensors).
        array = np.array(array, dtype=np.float32, copy=not array.flags.writeable).reshape(tensor.shape)
        weight = torch.from_numpy(array)
        if arch == "gemma3" and name.endswith("norm.weight"):
            weight = weight - 1.0  # llama.cpp stores Gemma's (1 + w) norm scales
        if arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = _unpermute(weight, config.num_heads)
        if arch in ("llama", "mistral") and name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = _unpermute(weight, config.num_kv_heads)
        tensors[name] = weight
    return config, tensors
