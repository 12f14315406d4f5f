"""`--reasoning-parser`: a thinking model's `<think>...</think>` text goes to `reasoning_content`, as vLLM
serves it, and only the rest to `content`.

- `deepseek_r1`: the chat template opens the think block in the prompt, so the output is reasoning from
  its first character (a `<think>` the model writes anyway is dropped) until `</think>`; with no
  `</think>` at all, everything is reasoning.
- `qwen3`: Qwen 3's hybrid models write `<think>` themselves; an output that does not start with it
  (`enable_thinking=False` puts an empty block in the prompt) is all content. A model whose template
  opens the block in the prompt (Qwen3-*-Thinking-2507) wants `deepseek_r1`.

The split works on text, so a tag the tokenizer cuts into several tokens, or a tag split across two
streamed deltas, is still found: text that could be the start of a tag is held back until the next delta
tells. Streaming and the whole response run the same code, so both split alike.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    starts_in_reasoning: bool  # the prompt opened the think block (deepseek_r1)

    def split(self, text: str) -> tuple[str | None, str | None]:
        """A whole output's (reasoning, content); None where there is none."""
        reasoning, content = self.stream().feed(text, final=True)
        return reasoning or None, content or None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self.starts_in_reasoning)


REASONING_PARSERS = {
    "deepseek_r1": ReasoningParser("deepseek_r1", starts_in_reasoning=True),
    "qwen3": ReasoningParser("qwen3", starts_in_reasoning=False),
}


class ReasoningStream:
    """One choice's split, fed delta by delta: each call returns the (reasoning, content) text it can
    release so far."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._starts_in_reasoning = starts_in_reasoning
        self._state = "opening"  # "opening" (a <think> may still come), "reasoning", "content"
        self._pending = ""

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self._pending += delta
        reasoning = ""
        if self._state == "opening":
            if START.startswith(self._pending) and not final:
                return "", ""  # could still become <think>
            if self._pending.startswith(START):
                self._pending = self._pending[len(START):]
                self._state = "reasoning"
            else:
                self._state = "reasoning" if self._starts_in_reasoning else "content"
        if self._state == "reasoning":
            before, found, after = self._pending.partition(END)
            if found:
                reasoning, self._pending, self._state = before, after, "content"
            else:
                keep = 0 if final else _tag_prefix_length(self._pending, END)
                reasoning, self._pending = self._pending[:len(self._pending) - keep], self._pending[
                    len(self._pending) - keep:]
                return reasoning, ""
        content, self._pending = self._pending, ""
        return reasoning, content


def _tag_prefix_length(text: str, tag: str) -> int:
    """The length of the longest end of `text` that is the start of `tag` (text to hold back)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
