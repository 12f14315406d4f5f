"""The streaming detokenizer survives DecodeStream's "Invalid prefix" error instead of killing the engine loop."""

from __future__ import annotations

import pytest

from conveyor.tokenizer.detokenize import IncrementalDetokenizer


class _BrokenOnce:
    """A DecodeStream stand-in that raises tokenizers' error on its second token."""

    def __init__(self) -> None:
        self.calls = 0

    def step(self, backend: object, token_id: int) -> str:
        self.calls += 1
        if self.calls == 2:
            raise Exception("Invalid prefix encountered while decoding stream. Token ID: 7")
        return f"<{token_id}>"


class _Tokenizer:
    backend = None


def test_an_invalid_prefix_restarts_the_stream_at_that_token(monkeypatch: pytest.MonkeyPatch) -> None:
    restarted = []

    class FreshStream:
        def __init__(self, skip_special_tokens: bool) -> None:
            restarted.append(skip_special_tokens)

        def step(self, backend: object, token_id: int) -> str:
            return f"[{token_id}]"

    detokenizer = IncrementalDetokenizer(_Tokenizer(), skip_special_tokens=False)  # type: ignore[arg-type]
    detokenizer._stream = _BrokenOnce()  # type: ignore[assignment]
    monkeypatch.setattr("conveyor.tokenizer.detokenize.DecodeStream", FreshStream)
    assert detokenizer.add(5) == "<5>"
    assert detokenizer.add(7) == "[7]"  # the failing token is decoded by the fresh stream
    assert detokenizer.add(8) == "[8]" and detokenizer.text == "<5>[7][8]" and restarted == [False]


def test_other_errors_still_raise() -> None:
    class Broken:
        def step(self, backend: object, token_id: int) -> str:
            raise Exception("something else")

    detokenizer = IncrementalDetokenizer(_Tokenizer())  # type: ignore[arg-type]
    detokenizer._stream = Broken()  # type: ignore[assignment]
    with pytest.raises(Exception, match="something else"):
        detokenizer.add(1)
