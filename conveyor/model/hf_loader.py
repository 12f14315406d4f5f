"""Hugging Face directory (config.json + *.safetensors) -> (ModelConfig, fp32 tensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from conveyor.config import ModelConfig

_LLAMA_FAMILY = {"llama", "mistral", "qwen2", "qwen3"}


def _rope_settings(hf: dict[str, Any]) -> tuple[float, float | None, dict | None]:
    """(global rope base, sliding-layer rope base, scaling) from transformers 4.x or 5.x config keys."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params:  # 5.x, per layer kind
        full, sliding = params["full_attention"], params.get("sliding_attention", {})
        scaling = full if full.get("rope_type", "default") != "default" else None
        return full.get("rope_theta", 10000.0), sliding.get("rope_theta"), scaling
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    return theta, hf.get("rope_local_base_freq"), scaling


def read_config(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type == "gemma3":  # the multimodal wrapper: its text model is what we run
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    if model_type != "gemma3_text" and model_type not in _LLAMA_FAMILY:
        raise ValueError(f"unsupported model_type {model_type!r}; conveyor supports gemma3_text and "
                         f"{sorted(_LLAMA_FAMILY)}")
    theta, local_theta, scaling = _rope_settings(hf)
    eos = hf.get("eos_token_id")
    num_heads = hf["num_attention_heads"]
    config = ModelConfig(
        architecture="gemma3" if model_type == "gemma3_text" else "llama",
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"], num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        tie_word_embeddings=hf.get("tie_word_embeddings", model_type == "gemma3_text"),
        bos_token_id=hf.get("bos_token_id"), pad_token_id=hf.get("pad_token_id"),
        eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        hidden_act=hf.get("hidden_activation") or hf.get("hidden_act") or "silu",
        attention_bias=hf.get("attention_bias", model_type == "qwen2"),
        qk_norm=model_type in ("qwen3", "gemma3_text"),
        name=hf.get("_name_or_path", ""),
    )
    if model_type == "gemma3_text":
        config.sliding_window = hf.get("sliding_window")
        pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
        config.layer_types = hf.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(config.num_layers)]
        config.rope_local_theta = local_theta or 10000.0
        config.query_pre_attn_scalar = hf.get("query_pre_attn_scalar", config.head_dim)
        if hf.get("final_logit_softcapping") or hf.get("attn_logit_softcapping"):
            raise ValueError("logit soft-capping (Gemma 2) is not supported")
    elif model_type == "mistral" or (model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window")):
        config.sliding_window = hf.get("sliding_window")
    return config


def load_hf_dir(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    directory = Path(path)
    config = read_config(json.loads((directory / "config.json").read_text()))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has a config.json but no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_file(str(file)).items():
            name = name.removeprefix("language_model.")  # Gemma 3 multimodal checkpoints
            if name.startswith(("vision_tower.", "multi_modal_projector.")):
                continue
            tensors[name] = tensor.float()
    return config, tensors
