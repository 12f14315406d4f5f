"""Text <-> token ids, as transformers' `AutoTokenizer` gives them for the same model source: a Hugging Face
directory (`hf`) or a GGUF file (`gguf`); chat templates (`chat`); streaming detokenization (`detokenize`)."""

from __future__ import annotations

from conveyor.tokenizer.chat import GEMMA_CHAT_TEMPLATE
from conveyor.tokenizer.detokenize import IncrementalDetokenizer
from conveyor.tokenizer.gguf import load_gguf_tokenizer
from conveyor.tokenizer.hf import load_hf_tokenizer
from conveyor.tokenizer.tokenizer import Tokenizer


def load_tokenizer(path: str, chat_template: str | None = None) -> Tokenizer:
    """From a .gguf file, a tokenizer.json, or a directory holding one; `chat_template` is a file
    overriding the model's template."""
    if path.endswith(".gguf"):
        return load_gguf_tokenizer(path, chat_template)
    return load_hf_tokenizer(path, chat_template)


__all__ = ["GEMMA_CHAT_TEMPLATE", "IncrementalDetokenizer", "Tokenizer", "load_tokenizer"]
