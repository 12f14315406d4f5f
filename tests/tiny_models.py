"""Tiny random-weight Hugging Face model directories (config.json, safetensors, tokenizer.json) for tests.

Built with transformers itself, so the reference model and conveyor read the very same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

VOCAB_SIZE = 384  # 256 byte-level symbols + a few merges' worth of room + specials
BOS_ID, EOS_ID, PAD_ID = 1, 2, 0


def _tiny_config(architecture: str):  # type: ignore[no-untyped-def]
    import transformers

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, rms_norm_eps=1e-6,
                  initializer_range=0.2)
    if architecture == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=16, tie_word_embeddings=True)
    if architecture == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0)
    if architecture == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if architecture == "qwen3":
        return transformers.Qwen3Config(**common, tie_word_embeddings=False)
    raise ValueError(architecture)


def tiny_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every byte is a token, shifted past the special ids; the rest of
    the model's vocabulary is filler words, so every id the model can produce decodes to text. Like a
    real Llama or Gemma tokenizer.json, its post-processor puts BOS before every text."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": PAD_ID, "<bos>": BOS_ID, "<eos>": EOS_ID}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    while len(vocab) < VOCAB_SIZE:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A",
                                                             special_tokens=[("<bos>", BOS_ID)])
    return tokenizer


def make_tiny_model_dir(architecture: str, path: Path, seed: int = 0) -> Path:
    import transformers

    config = _tiny_config(architecture)
    torch.manual_seed(seed)
    model_class = {"gemma3": transformers.Gemma3ForCausalLM, "llama": transformers.LlamaForCausalLM,
                   "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[architecture]
    model = model_class(config).eval()
    if architecture == "gemma3":
        with torch.no_grad():  # Gemma's norms start at zero (scale 1 + w); give them something to do
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(0.0, 0.3)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    # A generic class, as Llama 3 declares: transformers runs the file as written, except for model types
    # whose class it imposes (qwen2: Qwen2Tokenizer's own pipeline).
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
         "pad_token": "<pad>"}))
    return path


def load_hf_model(path: Path):  # type: ignore[no-untyped-def]
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
