"""Structured output and a tool-call round trip on the real default model (Gemma 3 270M, whose template
knows no tools: Gemma's JSON convention), through `conveyor serve` and the official openai client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.server_utils import RunningServer, running_server
from tests.test_server_structured import _streamed_calls

pytestmark = pytest.mark.slow

WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    log = tmp_path_factory.mktemp("default_server_tools") / "server.log"
    with running_server("--kv-cache-memory", "512MiB", log_path=str(log)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    # NOTE: no free number: the 270M model, greedy, writes digits until max_tokens.
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "capital": {"type": "string"},
        "continent": {"enum": ["Africa", "Americas", "Asia", "Europe", "Oceania"]}},
        "required": ["name", "capital", "continent"], "additionalProperties": False}
    response = client.chat.completions.create(
        model="gemma-3-270m-q4_k_m", max_tokens=80, temperature=0.0,
        messages=[{"role": "user", "content": "Describe France as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "country", "schema": schema}})
    assert response.choices[0].finish_reason == "stop"
    value = json.loads(response.choices[0].message.content)
    jsonschema.validate(value, schema)
    assert value == {"name": "France", "capital": "Paris", "continent": "Europe"}


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(client: openai.OpenAI, stream: bool) -> None:
    model = "gemma-3-270m-q4_k_m"
    messages: list[Any] = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    # NOTE: one call: offered a list, the 270M model repeats the same call until max_tokens.
    args = dict(model=model, tools=[WEATHER_TOOL], max_tokens=60, temperature=0.0, parallel_tool_calls=False)
    if stream:
        chunks = list(client.chat.completions.create(messages=messages, tool_choice="required", stream=True, **args))
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        ((name, arguments),) = _streamed_calls(chunks)
        call_id = next(d.id for c in chunks for d in c.choices[0].delta.tool_calls or [] if d.id)
    else:
        response = client.chat.completions.create(messages=messages, tool_choice="required", **args)
        assert response.choices[0].finish_reason == "tool_calls"
        (call,) = response.choices[0].message.tool_calls
        name, arguments, call_id = call.function.name, call.function.arguments, call.id
    assert name == "get_weather"
    assert "paris" in json.loads(arguments)["city"].lower()

    messages += [{"role": "assistant", "content": None, "tool_calls": [
                     {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
                 {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"sky": "sunny", "celsius": 21})}]
    answer = client.chat.completions.create(messages=messages, **args)
    message = answer.choices[0].message
    # The 270M model mostly repeats the tool's result rather than answering in words: what is checked is
    # that the round trip renders and comes back as text, not what the model makes of it.
    assert not message.tool_calls and message.content.strip()
    assert answer.choices[0].finish_reason in ("stop", "length")
