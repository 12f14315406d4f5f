"""Structured output and tool calls through a real server on a tiny random-weight model, with the official
openai client: random weights say nothing sensible, so whatever parses did so because of the constraint."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server_utils import RunningServer, running_server

# A short template that renders tools and tool calls itself (Hermes' markers, so the hermes parser is
# guessed): the tiny model's byte-level tokenizer makes Gemma's long tool preamble too long for it.
TOOLS_TEMPLATE = (
    "{% if tools %}tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m['role'] }}: {% if m['tool_calls'] is defined %}{% for c in m['tool_calls'] %}"
    "<tool_call>{{ c['function']['name'] }} {{ c['function']['arguments']['city'] }}</tool_call>{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
          "required": ["city", "days"], "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"],
        "additionalProperties": False}}},
]
MESSAGES: list[Any] = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("server_structured")
    (path / "template.jinja").write_text(TOOLS_TEMPLATE)
    with running_server("--model", str(tiny_model_dirs["gemma3"]), "--block-size", "4", "--num-kv-blocks", "2048",
                        "--chat-template", str(path / "template.jinja"), "--max-model-len", "512",
                        log_path=str(path / "server.log")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


def _args(**extra: Any) -> dict[str, Any]:
    return {"model": "gemma3", "messages": MESSAGES, "max_tokens": 120, "temperature": 1.0, "seed": 1, **extra}


def test_response_format_json_schema_streamed_and_not(client: openai.OpenAI) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}
    for seed in range(4):
        whole = client.chat.completions.create(**_args(seed=seed, response_format=response_format, n=2))
        for choice in whole.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
        chunks = list(client.chat.completions.create(**_args(seed=seed, response_format=response_format, n=2,
                                                             stream=True)))
        for index, choice in enumerate(whole.choices):
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == index)
            assert text == choice.message.content


def test_json_object_and_completions(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(**_args(response_format={"type": "json_object"}, max_tokens=200))
    if whole.choices[0].finish_reason == "stop":  # an unbounded object may outlast max_tokens
        assert isinstance(json.loads(whole.choices[0].message.content), dict)
    completion = client.completions.create(model="gemma3", prompt="x", max_tokens=50, seed=2,
                                           extra_body={"structured_outputs": {"regex": "[a-f]{4}@[0-9]{1,3}\\.com"}})
    assert re.fullmatch(r"[a-f]{4}@[0-9]{1,3}\.com", completion.choices[0].text)


def test_vllm_structured_outputs_choice(client: openai.OpenAI) -> None:
    for seed in range(3):
        whole = client.chat.completions.create(**_args(seed=seed, extra_body={
            "structured_outputs": {"choice": ["sunny", "rainy", "cloudy with rain"]}}))
        assert whole.choices[0].message.content in ("sunny", "rainy", "cloudy with rain")


def test_tool_choice_required_gives_calls_that_validate(client: openai.OpenAI) -> None:
    schemas = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
    finished_parallel = 0
    for seed, parallel in [(0, True), (1, False), (2, True), (3, True)]:
        whole = client.chat.completions.create(**_args(seed=seed, tools=TOOLS, tool_choice="required",
                                                       parallel_tool_calls=parallel, max_tokens=300))
        choice = whole.choices[0]
        if parallel and choice.finish_reason == "length":
            # A random model may keep adding calls to an unbounded list: cut short, it is text, not calls.
            assert choice.message.tool_calls is None and choice.message.content.startswith("[{")
            continue
        finished_parallel += parallel
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        streamed = list(client.chat.completions.create(**_args(seed=seed, tools=TOOLS, tool_choice="required",
                                                               parallel_tool_calls=parallel, max_tokens=300,
                                                               stream=True)))
        assert _streamed_calls(streamed) == [(c.function.name, c.function.arguments) for c in calls]
        assert streamed[-1].choices[0].finish_reason == "tool_calls"
    assert finished_parallel >= 1


def _streamed_calls(chunks: list[Any]) -> list[tuple[str, str]]:
    """Tool calls put together from deltas as a client does: the first delta of an index has the id, type
    and name; the rest append to the arguments."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index not in calls and delta.type == "function" and delta.function.name
                calls[delta.index] = [delta.function.name, delta.function.arguments or ""]
            else:
                calls[delta.index][1] += delta.function.arguments or ""
    return [(name, arguments) for name, arguments in (calls[i] for i in sorted(calls))]


def test_named_tool_choice_streams_its_arguments(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    whole = client.chat.completions.create(**_args(tools=TOOLS, tool_choice=choice))
    calls = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and len(calls) == 1 and calls[0].function.name == "get_time"
    assert json.loads(calls[0].function.arguments)["zone"] in ("CET", "UTC")
    chunks = list(client.chat.completions.create(**_args(tools=TOOLS, tool_choice=choice, stream=True)))
    assert _streamed_calls(chunks) == [("get_time", calls[0].function.arguments)]
    assert sum(1 for c in chunks if c.choices[0].delta.tool_calls) >= 3  # name, then argument fragments


def test_tool_history_renders_and_auto_answers(client: openai.OpenAI) -> None:
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 18 C"},
    ]
    without = client.chat.completions.create(**_args(messages=history, max_tokens=1)).usage.prompt_tokens
    for tool_choice in ("auto", "none"):
        whole = client.chat.completions.create(**_args(messages=history, tools=TOOLS, tool_choice=tool_choice,
                                                       max_tokens=10))
        assert whole.choices[0].finish_reason in ("stop", "length", "tool_calls")
        # The template saw the tools (their names make the prompt longer) unless tool_choice is "none".
        expected = without + (0 if tool_choice == "none" else len("tools: get_weather get_time"))  # trim_blocks ate "\n"
        assert whole.usage.prompt_tokens == expected
        if tool_choice == "none":
            assert whole.choices[0].message.tool_calls is None


@pytest.mark.parametrize(("body", "param", "message"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format", "invalid json"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "Input should be"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "invalid regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"pattern": "a"}}, "structured_outputs.pattern", "unknown field"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "bogus"}}}}}], "tool_choice": "required"}, "tools", "invalid json"),
])
def test_bad_requests_are_400_naming_the_field(server: RunningServer, body: dict[str, Any], param: str,
                                               message: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json={**_args(), **body}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert httpx.get(f"{server.base_url}/health").status_code == 200
