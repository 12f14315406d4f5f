"""Streaming detokenization: `tokenizers`' DecodeStream behind the engine's small interface."""

from __future__ import annotations

import logging

from tokenizers.decoders import DecodeStream

from conveyor.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
INVALID_PREFIX = "Invalid prefix encountered"  # DecodeStream's error when its held-back text stops matching


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas, never cutting a UTF-8 character in half (DecodeStream
    holds back byte-fallback pieces until the character is complete)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = tokenizer.backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""

    def add(self, token_id: int) -> str:
        try:
            delta = self._stream.step(self._backend, token_id) or ""
        except Exception as error:  # tokenizers raises a bare Exception
            if INVALID_PREFIX not in str(error):
                raise
            # Byte-fallback pieces that decode to invalid UTF-8 can make the held-back text and the decoded
            # prefix disagree (seen on Gemma's GGUF vocabulary with random-id prompts); that breaks the
            # stream's state for good, and raising would kill the engine loop. Start a fresh stream at this
            # token: the text already sent stays, at worst a replacement character is lost.
            logger.warning("detokenizer: %s; restarting the decode stream at token %d", error, token_id)
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            delta = self._stream.step(self._backend, token_id) or ""
        self.text += delta
        return delta
