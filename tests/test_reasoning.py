"""`--reasoning-parser`: the think block split from the answer, whole and streamed in any cut of the text."""

from __future__ import annotations

import random

import pytest

from conveyor.server.reasoning import REASONING_PARSERS

# parser, output text, (reasoning_content, content)
CASES = [
    ("qwen3", "<think>\nLet me add.\n</think>\n\n2 + 2 = 4.", ("\nLet me add.\n", "\n\n2 + 2 = 4.")),
    ("qwen3", "2 + 2 = 4.", (None, "2 + 2 = 4.")),  # enable_thinking=False: no block in the output
    ("qwen3", "<think>\n\n</think>\n\nHi", ("\n\n", "\n\nHi")),
    ("qwen3", "<think>cut off by max_tokens", ("cut off by max_tokens", None)),
    ("qwen3", "<thin", (None, "<thin")),  # the start of a tag, never finished, is text
    ("qwen3", "x <think>y</think>", (None, "x <think>y</think>")),  # a block not at the start is text
    ("deepseek_r1", "Let me add.\n</think>\n\n4", ("Let me add.\n", "\n\n4")),  # <think> was in the prompt
    ("deepseek_r1", "<think>Let me add.</think>4", ("Let me add.", "4")),
    ("deepseek_r1", "still thinking </thi", ("still thinking </thi", None)),
    ("deepseek_r1", "a</think>", ("a", None)),
    ("deepseek_r1", "", (None, None)),
]


@pytest.mark.parametrize(("name", "text", "expected"), CASES)
def test_whole_output_split(name: str, text: str, expected: tuple[str | None, str | None]) -> None:
    assert REASONING_PARSERS[name].split(text) == expected


@pytest.mark.parametrize(("name", "text", "expected"), CASES)
def test_streamed_split_equals_the_whole_in_every_cut(name: str, text: str,
                                                      expected: tuple[str | None, str | None]) -> None:
    """Deltas cut anywhere (a tag split across tokens, a delta holding a whole tag and more) add up to the
    whole split, and held-back text never leaks into the wrong field."""
    rng = random.Random(len(text))
    cuts = [[i] for i in range(len(text) + 1)] + [sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
                                                   for _ in range(20)] + [list(range(len(text) + 1))]
    for points in cuts:
        bounds = [0, *points, len(text)]
        deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
        stream = REASONING_PARSERS[name].stream()
        pieces = [stream.feed(delta, final=i == len(deltas) - 1) for i, delta in enumerate(deltas)]
        reasoning = "".join(r for r, _ in pieces) or None
        content = "".join(c for _, c in pieces) or None
        assert (reasoning, content) == expected, deltas


def test_reasoning_is_released_as_it_comes() -> None:
    """Streaming holds back only what could be the start of a tag, not the whole block."""
    stream = REASONING_PARSERS["qwen3"].stream()
    assert stream.feed("<th") == ("", "")
    assert stream.feed("ink>step one, ") == ("step one, ", "")
    assert stream.feed("step two</") == ("step two", "")
    assert stream.feed("think>The answer") == ("", "The answer")
    assert stream.feed(" is 4.", final=True) == ("", " is 4.")
