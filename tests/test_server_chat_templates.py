"""The chat template request fields (`add_generation_prompt`, `continue_final_message`,
`chat_template_kwargs`, `documents`) and `--reasoning-parser`, through the official openai client against
a real server on a tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server_utils import RunningServer, running_server

TEMPLATE = ("{% if greeting is defined %}[{{ greeting }}]{% endif %}"
            "{% for d in documents or [] %}<doc>{{ d.text }}</doc>{% endfor %}"
            "{% for m in messages %}{{ m.role }}: {{ m.content }}{% for c in m.tool_calls or [] %}"
            "{{ c.function.arguments | tojson }}{% endfor %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
MODEL = "gemma3"  # the served name: the tiny model directory's stem
USER = {"role": "user", "content": "hi"}


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("chat_template_server")
    (directory / "template.jinja").write_text(TEMPLATE)
    with running_server("--model", str(tiny_model_dirs["gemma3"]), "--chat-template", str(directory / "template.jinja"),
                        "--max-model-len", "256", "--reasoning-parser", "deepseek_r1",
                        log_path=str(directory / "server.log")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


def _prompt_tokens(client: openai.OpenAI, messages: list[dict[str, Any]], **extra: Any) -> int:
    result = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, extra_body=extra)
    return result.usage.prompt_tokens


def _tokenize(server: RunningServer, messages: list[dict[str, Any]], **extra: Any) -> list[int]:
    return httpx.post(f"{server.base_url}/tokenize", json={"messages": messages, **extra}).json()["tokens"]


def _text(server: RunningServer, ids: list[int]) -> str:
    return httpx.post(f"{server.base_url}/detokenize", json={"tokens": ids}).json()["prompt"]


def test_generation_prompt_and_continuing_the_final_message(client: openai.OpenAI, server: RunningServer) -> None:
    partial = [USER, {"role": "assistant", "content": "The answer is"}]
    cases = {
        "user: hi\nassistant:": ([USER], {}),
        "user: hi\n": ([USER], {"add_generation_prompt": False}),
        "user: hi\nassistant: The answer is": (partial, {"add_generation_prompt": False,
                                                          "continue_final_message": True}),
        "[hello]user: hi\nassistant:": ([USER], {"chat_template_kwargs": {"greeting": "hello"}}),
    }
    for expected, (messages, extra) in cases.items():
        ids = _tokenize(server, messages, **extra)
        assert _text(server, ids) == expected
        assert _prompt_tokens(client, messages, **extra) == len(ids), expected  # the chat completion runs them
    documents = client.chat.completions.create(model=MODEL, messages=[USER], max_tokens=1,
                                               extra_body={"documents": [{"title": "t", "text": "fact"}]})
    assert documents.usage.prompt_tokens == len(_tokenize(server, [USER])) + len("<doc>fact</doc>")


def test_history_as_vllm_hands_it_to_the_template(server: RunningServer) -> None:
    """An assistant turn of tool calls has no content, and its arguments arrive as a JSON string: the
    template sees empty content and the arguments as an object."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]
    assert _text(server, _tokenize(server, messages, add_generation_prompt=False)) == (
        'user: hi\nassistant: {"x": 1}\n')


@pytest.mark.parametrize(("extra", "message"), [
    ({"continue_final_message": True}, "continue_final_message needs add_generation_prompt set to false"),
    ({"chat_template_kwargs": {"messages": []}}, "have their own request fields"),
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
])
def test_bad_template_fields_get_400(client: openai.OpenAI, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=MODEL, messages=[USER, {"role": "assistant", "content": "a"}],
                                       max_tokens=1, extra_body=extra)


def test_reasoning_split_streamed_and_not(client: openai.OpenAI) -> None:
    """deepseek_r1 counts everything before </think> as reasoning; the random model never writes the tag,
    so the whole (seeded, so repeatable) answer is reasoning, streamed or not, and content stays empty."""
    args: dict[str, Any] = dict(model=MODEL, messages=[USER], max_tokens=24, temperature=1.0, seed=7,
                                extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**args).choices[0].message
    reasoning = whole.model_extra["reasoning_content"]
    assert whole.content is None and isinstance(reasoning, str) and len(reasoning) > 0
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = "".join((c.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for c in chunks)
    assert streamed == reasoning
    assert all(not c.choices[0].delta.content for c in chunks)
