"""Text <-> token ids, with the ids transformers' `AutoTokenizer` gives for the same model source."""

from __future__ import annotations

from typing import Any

from tokenizers import Tokenizer as RustTokenizer

from conveyor.tokenizer.chat import render_chat


class Tokenizer:
    """A `tokenizers` backend whose pipeline and post-processor are already set up as transformers sets
    them (see `hf` and `gguf`), so encoding is the backend's own: nothing is added or checked here."""

    def __init__(self, backend: RustTokenizer, special_tokens: dict[str, str], stop_tokens: list[str],
                 chat_template: str | None) -> None:
        backend.no_truncation()  # transformers encodes a single text without the file's truncation/padding
        backend.no_padding()
        self.backend = backend
        self.special_tokens = special_tokens  # bos_token, eos_token, pad_token, ...: template variables too
        self.eos_token_ids = [i for i in map(backend.token_to_id, stop_tokens) if i is not None]
        pad_token = special_tokens.get("pad_token")
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token else None
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As transformers' `tokenizer(text)["input_ids"]`: a text starting with "<bos>" gets a second BOS."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """The prompt ids of a conversation. The template writes its own special tokens, so none are
        added (transformers' `apply_chat_template(tokenize=True)`): a template's BOS is never doubled."""
        prompt = self.apply_chat_template(messages, add_generation_prompt, tools)
        return self.encode(prompt, add_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass --chat-template FILE")
        return render_chat(self.chat_template, messages, add_generation_prompt, self.special_tokens, tools)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)
