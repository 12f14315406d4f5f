"""GGUF tokenizers: the same ids as transformers' AutoTokenizer(gguf_file=...), for each kind of vocabulary
llama.cpp writes (Gemma, other SentencePiece, byte-level BPE) and each special-token flag. The files hold
tokenizer metadata only, which is all either side reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import pytest

from conveyor.tokenizer import load_tokenizer
from conveyor.tokenizer.gguf_backends import _bytes_to_unicode
from tests.tokenizer_parity import assert_same_ids_as_transformers

CONTROL, NORMAL, UNKNOWN, USER_DEFINED, BYTE = 3, 1, 2, 4, 6  # GGUF token types
BYTE_TOKENS = [(f"<0x{b:02X}>", BYTE) for b in range(256)]


def _sentencepiece_tokens(specials: list[str], pieces: list[str]) -> list[tuple[str, int]]:
    return [(specials[0], CONTROL), (specials[1], CONTROL), (specials[2], CONTROL), ("<unk>", UNKNOWN),
            ("<mask>", USER_DEFINED), *BYTE_TOKENS, *((piece, NORMAL) for piece in pieces),
            ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL), ("<think>", USER_DEFINED)]


LETTERS = [*"abcdefghijklmnopqrstuvwxyzTFP.,\n", "\u2581", "\u2581t", "he", "\u2581the", "th"]
# Gemma stores runs of spaces as spaces; transformers respells them with U+2581.
GEMMA_TOKENS = _sentencepiece_tokens(["<pad>", "<eos>", "<bos>"], [*LETTERS, "  ", "   "])
LLAMA_TOKENS = _sentencepiece_tokens(["<pad>", "</s>", "<s>"], [*LETTERS, "\u2581\u2581"])
BYTE_LEVEL_TOKENS = [*((symbol, NORMAL) for _, symbol in sorted(_bytes_to_unicode().items())),
                     *((piece, NORMAL) for piece in ["Ġt", "he", "Ġthe", "ĠĠ", "in", "Ġin", "12", "34"]),
                     ("<|begin_of_text|>", CONTROL), ("<|endoftext|>", CONTROL), ("<|im_start|>", CONTROL),
                     ("<|im_end|>", CONTROL), ("<think>", USER_DEFINED),
                     ("control é", CONTROL)]  # outside the byte alphabet: a mislabel both sides skip
# "3 4" and "1 2" tell the pre-tokenization splits apart: digits alone (Qwen2), by three (Llama 3), or a run.
BYTE_LEVEL_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ Ġ", "i n", "Ġ in", "3 4", "1 2"]
LAST = len(BYTE_LEVEL_TOKENS) - 1

# name: (architecture, tokenizer model, tokens, other metadata); bos/eos are token ids.
FILES: dict[str, tuple[str, str, list[tuple[str, int]], dict[str, Any]]] = {
    "gemma": ("gemma3", "llama", GEMMA_TOKENS, {"bos": 2, "eos": 1, "add_bos": True, "add_eos": False}),
    "gemma-no-bos": ("gemma3", "llama", GEMMA_TOKENS, {"bos": 2, "eos": 1, "add_bos": False}),
    "gemma-bos-and-eos": ("gemma3", "llama", GEMMA_TOKENS, {"bos": 2, "eos": 1, "add_eos": True}),
    "gemma-space-prefix": ("gemma3", "llama", GEMMA_TOKENS, {"bos": 2, "eos": 1, "add_space_prefix": True}),
    "llama-merges-by-score": ("llama", "llama", LLAMA_TOKENS, {
        "bos": 2, "eos": 1, "scores": [-float(i) for i in range(len(LLAMA_TOKENS))]}),
    "llama-tied-scores": ("llama", "llama", LLAMA_TOKENS, {
        "bos": 2, "eos": 1, "scores": [0.0] * len(LLAMA_TOKENS), "add_bos": False}),
    "llama3-byte-level": ("llama", "gpt2", BYTE_LEVEL_TOKENS, {
        "merges": BYTE_LEVEL_MERGES, "pre": "llama-bpe", "bos": LAST - 5, "eos": LAST - 4, "add_bos": True}),
    "qwen2-byte-level": ("qwen2", "gpt2", BYTE_LEVEL_TOKENS, {
        "merges": BYTE_LEVEL_MERGES, "pre": "qwen2", "eos": LAST - 4}),
    "qwen3-byte-level": ("qwen3", "gpt2", BYTE_LEVEL_TOKENS, {
        "merges": BYTE_LEVEL_MERGES, "pre": "qwen2", "bos": LAST - 4, "eos": LAST - 2, "add_eos": True}),
}


def _write(path: Path, architecture: str, model: str, tokens: list[tuple[str, int]],
           metadata: dict[str, Any]) -> None:
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model(model)
    writer.add_token_list([token for token, _ in tokens])
    writer.add_token_types([kind for _, kind in tokens])
    setters = {"pre": writer.add_tokenizer_pre, "scores": writer.add_token_scores,
               "merges": writer.add_token_merges, "bos": writer.add_bos_token_id,
               "eos": writer.add_eos_token_id, "add_bos": writer.add_add_bos_token,
               "add_eos": writer.add_add_eos_token, "add_space_prefix": writer.add_add_space_prefix}
    for key, value in metadata.items():
        setters[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("name", list(FILES))
def test_gguf_ids_equal_transformers(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / f"{name}.gguf"
    _write(path, *FILES[name])
    ours = load_tokenizer(str(path))
    assert_same_ids_as_transformers(ours, tmp_path, gguf_file=path.name)
    assert load_tokenizer(str(path)).encode("the in") == ours.encode("the in")  # from the cache, the same


def test_named_chat_templates_as_llama_cpp_writes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tokenizer.chat_template` plus `tokenizer.chat_templates` / `tokenizer.chat_template.NAME`: tools pick
    "tool_use"; a Gemma file without any template gets Gemma's turn format."""
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "named.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in BYTE_LEVEL_TOKENS])
    writer.add_token_types([kind for _, kind in BYTE_LEVEL_TOKENS])
    writer.add_token_merges(BYTE_LEVEL_MERGES)
    writer.add_eot_token_id(LAST - 3)  # named end-of-turn: a stop token, whatever its text
    writer.add_eos_token_id(LAST - 4)
    writer.add_chat_template([{"name": "default", "template": "plain"},
                              {"name": "tool_use", "template": "{{ tools | length }} tools"}])
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    ours = load_tokenizer(str(path))
    assert ours.chat_template == {"default": "plain", "tool_use": "{{ tools | length }} tools"}
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "plain"
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function"}]) == "1 tools"
    assert set(ours.eos_token_ids) == {LAST - 4, LAST - 3, LAST - 2}  # EOS, EOT, and <|im_end|> by name
    gemma = tmp_path / "gemma.gguf"
    _write(gemma, *FILES["gemma"])
    assert load_tokenizer(str(gemma)).apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<bos><start_of_turn>user\nx<end_of_turn>\n<start_of_turn>model\n")
