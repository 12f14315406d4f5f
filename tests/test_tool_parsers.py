"""Each family's tool-call format read from text, whole and streamed; the Gemma convention's messages."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conveyor.outputs import CompletionOutput, RequestOutput
from conveyor.server.chat import ToolReader
from conveyor.server.tool_parsers import (
    GemmaJsonParser,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ParsedToolCall,
    ToolCallStream,
    ToolParser,
    choose_tool_parser,
)

WEATHER = ParsedToolCall("get_weather", json.dumps({"city": "Paris", "unit": "c"}))
TIME = ParsedToolCall("get_time", json.dumps({"zone": "CET"}))

CASES: list[tuple[ToolParser, str, str | None, list[ParsedToolCall]]] = [
    (GemmaJsonParser(), '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None, [WEATHER]),
    (GemmaJsonParser(), '```tool_code\n{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}\n```',
     None, [WEATHER]),
    (GemmaJsonParser(), '  [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                        '{"name": "get_time", "parameters": {"zone": "CET"}}]', None, [WEATHER, TIME]),
    (GemmaJsonParser(), "It is sunny in Paris.", "It is sunny in Paris.", []),
    (GemmaJsonParser(), '{"city": "Paris"}', '{"city": "Paris"}', []),  # JSON, but not a call
    (GemmaJsonParser(), '{"name": "get_weather", "parameters": {"city": ', '{"name": "get_weather", '
                                                                         '"parameters": {"city": ', []),
    (Llama3JsonParser(), '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}', None, [WEATHER]),
    (Llama3JsonParser(), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}}; '
                         '{"name": "get_time", "parameters": {"zone": "CET"}}', None, [WEATHER, TIME]),
    (Llama3JsonParser(), "Hello!", "Hello!", []),
    (HermesParser(), 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
                     '"unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}'
                     '\n</tool_call>', "Let me check.", [WEATHER, TIME]),
    (HermesParser(), '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}', None, [TIME]),  # unclosed
    (HermesParser(), "<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
    (MistralParser(), '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}, '
                      '{"name": "get_time", "arguments": {"zone": "CET"}}]', None, [WEATHER, TIME]),
    (MistralParser(), 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "c"}[TOOL_CALLS]get_time[ARGS]'
                      '{"zone": "CET"}', "Sure.", [WEATHER, TIME]),
    (MistralParser(), "No tools needed.", "No tools needed.", []),
]


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_extract(parser: ToolParser, text: str, content: str | None, calls: list[ParsedToolCall]) -> None:
    assert parser.extract(text) == (content, calls)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_streamed_in_small_pieces_gives_the_same(parser: ToolParser, text: str, content: str | None,
                                                 calls: list[ParsedToolCall]) -> None:
    for size in (1, 3, 7):
        stream = ToolCallStream(parser)
        sent = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
        rest, streamed_calls = stream.finish()
        assert streamed_calls == calls
        assert (sent + rest).strip() == (content or "").strip()


def test_content_streams_before_a_marker_and_marker_prefixes_are_held() -> None:
    stream = ToolCallStream(HermesParser())
    assert stream.feed("Let me look <tool") == "Let me look "
    assert stream.feed("_call>{") == ""
    stream = ToolCallStream(HermesParser())
    assert stream.feed("a <to") == "a "
    assert stream.feed("ast") == "<toast"  # not a marker after all
    stream = ToolCallStream(GemmaJsonParser())
    assert stream.feed("  ") == "" and stream.feed("``") == "" and stream.feed("`json") == ""
    stream = ToolCallStream(GemmaJsonParser())
    assert stream.feed(" Hi") == " Hi" and stream.feed(" {x}") == " {x}"  # text first: never a call


def test_gemma_convention_written_into_messages() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "a", "content": "18 C"},
        {"role": "tool", "tool_call_id": "b", "content": "25 C"},
    ]
    adapted = GemmaJsonParser().adapt_messages(messages, tools)
    assert [m["role"] for m in adapted] == ["system", "user", "assistant", "user"]
    assert adapted[0]["content"].startswith("Be brief.\n\nYou have access to functions.")
    assert '"name": "get_weather"' in adapted[0]["content"]
    assert json.loads(adapted[2]["content"]) == [{"name": "get_weather", "parameters": {"city": "Paris"}},
                                                 {"name": "get_weather", "parameters": {"city": "Rome"}}]
    assert adapted[3]["content"] == "```tool_output\n18 C\n```\n```tool_output\n25 C\n```"


def test_templates_that_render_tools_get_arguments_as_objects() -> None:
    messages = [{"role": "assistant", "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    adapted = HermesParser().adapt_messages(messages, [])
    assert adapted[0]["tool_calls"][0]["function"]["arguments"] == {"x": 1}
    assert messages[0]["tool_calls"][0]["function"]["arguments"] == '{"x": 1}'  # the caller's copy untouched


def test_parser_guessed_from_the_template() -> None:
    assert isinstance(choose_tool_parser("auto", None), GemmaJsonParser)
    assert isinstance(choose_tool_parser("auto", "{{ messages }}"), GemmaJsonParser)
    assert isinstance(choose_tool_parser("auto", "{% if tools %}<tool_call>{% endif %}"), HermesParser)
    assert isinstance(choose_tool_parser("auto", "{% if tools %}[TOOL_CALLS]{% endif %}"), MistralParser)
    assert isinstance(choose_tool_parser("auto", "{% if tools %}<|python_tag|>ipython{% endif %}"), Llama3JsonParser)
    assert isinstance(choose_tool_parser("mistral", None), MistralParser)


def _outputs(text: str, size: int, reason: str) -> list[RequestOutput]:
    pieces = [text[i:i + size] for i in range(0, len(text), size)]
    return [RequestOutput("r", None, [1], [CompletionOutput(0, "", [], reason if last else None)], last,
                          delta_text=piece)
            for last, piece in ((i == len(pieces) - 1, piece) for i, piece in enumerate(pieces))]


def _assembled(deltas: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str]]]:
    content, calls = "", {}
    for delta in deltas:
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert call["index"] not in calls and call["type"] == "function"
                calls[call["index"]] = [call["function"]["name"], call["function"]["arguments"]]
            else:
                calls[call["index"]][1] += call["function"]["arguments"]
    return content, [(name, arguments) for name, arguments in (calls[i] for i in sorted(calls))]


def test_reader_streams_required_calls_as_each_completes() -> None:
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "get_time", "parameters": {}}]'
    reader = ToolReader("required", GemmaJsonParser())
    first_call_done = text.index("}}") + 2
    outputs = _outputs(text, 5, "stop")
    sent: list[dict[str, Any]] = []
    for output in outputs:
        deltas = reader.feed(output)
        sent += deltas
        if deltas:  # the first call goes out as soon as its text is complete, before the list ends
            assert len("".join(o.delta_text for o in outputs[:outputs.index(output) + 1])) >= first_call_done
    assert _assembled(sent) == ("", [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")])
    assert reader.read(text, "stop") == (None, [ParsedToolCall("get_weather", '{"city": "Paris"}'),
                                                ParsedToolCall("get_time", "{}")])


def test_reader_named_streams_arguments_and_cut_short_is_content() -> None:
    reader = ToolReader("named", GemmaJsonParser(), named="f")
    sent = [d for output in _outputs('{"x": 12}', 2, "stop") for d in reader.feed(output)]
    assert _assembled(sent) == ("", [("f", '{"x": 12}')]) and len(sent) == 6  # name, then 5 fragments
    reader = ToolReader("required", GemmaJsonParser())
    sent = [d for output in _outputs('[{"name": "f", "parameters": {"x": 1', 4, "length") for d in reader.feed(output)]
    assert _assembled(sent) == ('[{"name": "f", "parameters": {"x": 1', [])
    assert reader.read('[{"name": "f"', "length") == ('[{"name": "f"', [])


def test_reader_auto_parses_at_the_end() -> None:
    text = 'Checking.<tool_call>{"name": "f", "arguments": {"a": [1, 2]}}</tool_call>'
    reader = ToolReader("auto", HermesParser())
    sent = [d for output in _outputs(text, 3, "stop") for d in reader.feed(output)]
    assert _assembled(sent) == ("Checking.", [("f", '{"a": [1, 2]}')])
