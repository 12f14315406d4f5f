"""Build Hugging Face transformers' model from conveyor's ModelConfig and tensors (the reference)."""

from __future__ import annotations

import torch

from conveyor.config import ModelConfig


def hf_config_from_model_config(config: ModelConfig):  # type: ignore[no-untyped-def]
    import transformers

    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
                  max_position_embeddings=config.max_position_embeddings,
                  bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_ids,
                  pad_token_id=config.pad_token_id, tie_word_embeddings=config.tie_word_embeddings)
    if config.architecture == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, sliding_window=config.sliding_window, layer_types=config.layer_types,
            query_pre_attn_scalar=int(config.query_pre_attn_scalar or config.head_dim), hidden_activation=config.hidden_act,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
                             "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}})
    return transformers.LlamaConfig(**common, hidden_act=config.hidden_act, rope_theta=config.rope_theta,
                                    attention_bias=config.attention_bias)


def hf_model_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    import transformers

    hf_config = hf_config_from_model_config(config)
    model_class = transformers.Gemma3ForCausalLM if config.architecture == "gemma3" else transformers.LlamaForCausalLM
    model = model_class(hf_config)
    state = dict(tensors)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()
