"""Streaming detokenization: `tokenizers`' DecodeStream behind the engine's small interface."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from conveyor.tokenizer.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never cutting a UTF-8 character in half (DecodeStream
    holds back byte-fallback pieces until the character is complete)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""

    def add(self, token_id: int) -> str:
        delta = self._stream.step(self._backend, token_id) or ""
        self.text += delta
        return delta
