"""Weight loading: GGUF files written the way llama.cpp writes them, Hugging Face directories, errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from conveyor import LLM, SamplingParams
from conveyor.model.hf_loader import load_hf_dir
from conveyor.model.loader import load_model_weights, resolve_model_path

_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
               "self_attn.k_norm": "attn_k_norm", "input_layernorm": "attn_norm", "mlp.gate_proj": "ffn_gate",
               "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "post_feedforward_layernorm": "post_ffw_norm"}


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's rotary re-layout of Llama q/k rows (what the loader must undo)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def _gguf_name(hf: str, arch: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf.split(".", 3)
    part, suffix = rest.rsplit(".", 1)
    if part == "post_attention_layernorm":
        name = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
    elif part == "pre_feedforward_layernorm":
        name = "ffn_norm"
    else:
        name = _GGUF_NAMES[part]
    return f"blk.{layer}.{name}.{suffix}"


def write_gguf(hf_dir: Path, path: Path, arch: str,
               tokenizer: Callable[[gguf.GGUFWriter], None] | None = None) -> dict[str, torch.Tensor]:
    """Write the HF model in `hf_dir` as llama.cpp would: permuted q/k (llama), +1 norms (gemma), some
    Q8_0 tensors; `tokenizer` writes the tokenizer metadata (default: a placeholder vocabulary). Returns
    the original tensors."""
    config, tensors = load_hf_dir(str(hf_dir))
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    if tokenizer is not None:
        tokenizer(writer)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    for name, tensor in tensors.items():
        array = tensor.numpy().astype(np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        if arch == "llama" and "q_proj" in name:
            array = _permute(array, config.num_heads)
        if arch == "llama" and "k_proj" in name:
            array = _permute(array, config.num_kv_heads)
        if "mlp" in name and array.shape[-1] % 32 == 0:
            writer.add_tensor(_gguf_name(name, arch), gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_gguf_name(name, arch), array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_gguf_round_trip_and_same_generation_as_the_hf_directory(
        arch: str, tiny_model_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = tiny_model_dirs[arch]
    original = write_gguf(hf_dir, tmp_path / "tiny.gguf", arch)
    config, tensors = load_model_weights(str(tmp_path / "tiny.gguf"))
    hf_config, _ = load_hf_dir(str(hf_dir))
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "sliding_window"):
        assert getattr(config, field) == getattr(hf_config, field), field
    assert set(tensors) == set(original) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    for name, tensor in tensors.items():
        tolerance = 0.02 if "mlp" in name else 1e-6  # Q8_0 for the MLP, exact otherwise
        assert torch.allclose(tensor, original[name], atol=tolerance), name
    cached_config, cached = load_model_weights(str(tmp_path / "tiny.gguf"))  # from the weight cache now
    assert cached_config == config and all(torch.equal(cached[n], tensors[n]) for n in tensors)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    from_gguf = LLM(str(tmp_path / "tiny.gguf"), tokenizer=str(hf_dir), num_kv_blocks=64, dtype="float32").generate([1, 5, 6], params)
    from_hf = LLM(str(hf_dir), num_kv_blocks=64, dtype="float32").generate([1, 5, 6], params)
    agree = sum(a == b for a, b in zip(from_gguf[0].outputs[0].token_ids, from_hf[0].outputs[0].token_ids))
    assert agree >= 6  # Q8_0 MLP weights may flip a late near-tie, never the whole sequence


def test_bad_model_paths_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model_path(str(tmp_path / "weights.bin"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model_path(str(tmp_path / "empty_dir"))
