"""Logprobs in the two shapes OpenAI uses: the legacy completions one and the chat one."""

from __future__ import annotations

from typing import Any

from conveyor.outputs import Logprob, RequestOutput
from conveyor.tokenizer import Tokenizer


def _text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _last_positions(output: RequestOutput, count: int) -> list[tuple[int, dict[int, Logprob]]]:
    """(chosen token, its position's logprobs) for the last `count` generated tokens."""
    completion = output.outputs[0]
    if not count or not completion.logprobs:
        return []
    return list(zip(completion.token_ids[-count:], completion.logprobs[-count:]))


def _top(position: dict[int, Logprob], top_n: int) -> list[tuple[int, Logprob]]:
    # The chosen token is always in `position`; the alternatives are the ones ranked 1..top_n.
    return sorted(((t, lp) for t, lp in position.items() if lp.rank <= top_n), key=lambda item: item[1].rank)


def completion_logprobs(tokenizer: Tokenizer, output: RequestOutput, count: int, top_n: int,
                        text_start: int = 0) -> dict[str, Any]:
    """`{tokens, token_logprobs, top_logprobs, text_offset}` for the last `count` generated tokens; offsets
    count from `text_start` (the echoed prompt's length, when it precedes the completion)."""
    positions = _last_positions(output, count)
    texts = [_text(tokenizer, token) for token, _ in positions]
    offset = text_start + max(0, len(output.outputs[0].text) - sum(len(t) for t in texts))
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [position[token].logprob for token, position in positions],
        "top_logprobs": [{_text(tokenizer, t): lp.logprob for t, lp in _top(position, top_n)}
                         for _, position in positions],
        "text_offset": offsets,
    }


def echoed_prompt_logprobs(tokenizer: Tokenizer, output: RequestOutput, top_n: int) -> dict[str, Any]:
    """The completions logprobs of the prompt tokens (for `echo`): the first token has none, as in OpenAI's."""
    texts = [_text(tokenizer, token) for token in output.prompt_token_ids]
    positions = output.prompt_logprobs or [None] * len(texts)
    offsets, offset = [], 0
    for token in output.prompt_token_ids:  # into the echoed text, which leaves special tokens out
        offsets.append(offset)
        offset += len(tokenizer.decode([token]))
    return {
        "tokens": texts,
        "token_logprobs": [None if p is None else p[token].logprob
                           for token, p in zip(output.prompt_token_ids, positions)],
        "top_logprobs": [None if p is None else {_text(tokenizer, t): lp.logprob for t, lp in _top(p, top_n)}
                         for p in positions],
        "text_offset": offsets,
    }


def joined_logprobs(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    return {key: first[key] + second[key] for key in first}


def chat_logprobs(tokenizer: Tokenizer, output: RequestOutput, count: int, top_n: int) -> dict[str, Any]:
    """`{content: [{token, logprob, bytes, top_logprobs: [...]}]}` for the last `count` generated tokens."""
    content = []
    for token, position in _last_positions(output, count):
        text = _text(tokenizer, token)
        content.append({"token": text, "logprob": position[token].logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": _text(tokenizer, t), "logprob": lp.logprob,
                                          "bytes": list(_text(tokenizer, t).encode())}
                                         for t, lp in _top(position, top_n)]})
    return {"content": content}
