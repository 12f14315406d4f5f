"""Tool calls in generated text, one parser per model family's format, chosen by `--tool-call-parser` or
guessed from the chat template:

- `gemma`: Gemma 3 has no tool tokens. Google's documented JSON convention: the prompt lists the
  functions and asks for `{"name": ..., "parameters": {...}}` and nothing else when calling (a list of
  them for several calls); tool results go back in a ```` ```tool_output ```` block. Since Gemma's
  template knows neither tools nor the `tool` role, `adapt_messages` writes that convention into the
  conversation itself. It is also the fallback for any template that does not mention tools.
- `llama3_json`: Llama 3.1-3.3, `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`,
  several separated by `;`).
- `hermes`: Qwen 2.5 / 3 (and Hermes), `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`, or the newer `[TOOL_CALLS]name[ARGS]{...}`.

A parser only reads text; what to do with the calls (OpenAI shapes, streaming) is `chat.py`'s business.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text


def _call_from(value: Any) -> ParsedToolCall | None:
    """A call from a decoded `{"name": ..., "parameters"|"arguments": {...}}`, or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("parameters", value.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _calls_from(value: Any) -> list[ParsedToolCall] | None:
    """Calls from one decoded call or a list of them; None unless every item is a call."""
    items = value if isinstance(value, list) else [value]
    calls = [_call_from(item) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


def _decode_all(text: str, separator: str = "") -> list[Any] | None:
    """Every JSON value in `text`, one after another (whitespace and `separator` between them); None if
    anything else is there."""
    values, position = [], 0
    while True:
        while position < len(text) and (text[position].isspace() or (separator and text[position] == separator)):
            position += 1
        if position == len(text):
            return values or None
        try:
            value, position = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError:
            return None
        values.append(value)


class ToolParser:
    name = ""
    # Text that opens a tool call anywhere in the output: content before it streams, after it is held.
    start_markers: tuple[str, ...] = ()
    # The output is a tool call when it starts (after whitespace) with one of these.
    leading_markers: tuple[str, ...] = ()
    # The model's template renders `tools` and tool messages itself (Gemma's does not).
    template_renders_tools = True

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """The content (None if there is none) and the tool calls in a finished output."""
        raise NotImplementedError

    def adapt_messages(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation for a template that renders tools itself: unchanged, but with each call's
        arguments as an object, as templates expect (OpenAI sends JSON text)."""
        adapted = []
        for message in messages:
            if message.get("tool_calls"):
                calls = [{**call, "function": {**call["function"], "arguments": _loads_or_text(
                    call["function"]["arguments"])}} for call in message["tool_calls"]]
                message = {**message, "tool_calls": calls}
            adapted.append(message)
        return adapted


def _loads_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


GEMMA_TOOLS_PROMPT = (
    "You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the "
    'format of {{"name": function name, "parameters": dictionary of argument name and its value}}. To call '
    "several functions, write a JSON list of these. You SHOULD NOT include any other text in the response "
    "if you call a function. The results come back in a ```tool_output``` block.\n{tools}"
)


class GemmaJsonParser(ToolParser):
    name = "gemma"
    leading_markers = ("{", "[", "```")
    template_renders_tools = False
    _FENCE = re.compile(r"^\s*```(?:json|tool_code)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        fenced = self._FENCE.match(text)
        body = fenced.group(1) if fenced else text
        values = _decode_all(body)
        calls = _calls_from(values[0] if len(values) == 1 else values) if values else None
        return (None, calls) if calls else (text, [])

    def adapt_messages(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The convention written into the conversation: tools in the system text, earlier calls as the
        JSON the model would have written, tool results as user turns (consecutive ones merged, since
        Gemma's template wants turns to alternate)."""
        adapted: list[dict[str, Any]] = []
        if tools:
            listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
            preamble = GEMMA_TOOLS_PROMPT.format(tools=listing)
            if messages and messages[0]["role"] in ("system", "developer"):
                preamble = f"{_text(messages[0])}\n\n{preamble}"
                messages = messages[1:]
            adapted.append({"role": "system", "content": preamble})
        for message in messages:
            role = message["role"]
            if role == "assistant" and message.get("tool_calls"):
                calls = [{"name": call["function"]["name"],
                          "parameters": _loads_or_text(call["function"]["arguments"])}
                         for call in message["tool_calls"]]
                message = {"role": "assistant", "content": json.dumps(calls[0] if len(calls) == 1 else calls,
                                                                      ensure_ascii=False)}
            elif role == "tool":
                message = {"role": "user", "content": f"```tool_output\n{_text(message)}\n```"}
            if adapted and adapted[-1]["role"] == message["role"] == "user":
                adapted[-1] = {"role": "user", "content": f"{_text(adapted[-1])}\n{_text(message)}"}
            else:
                adapted.append(message)
        return adapted


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    start_markers = ("<|python_tag|>",)
    leading_markers = ("{",)

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.split("<|python_tag|>", 1)[1] if "<|python_tag|>" in text else text
        values = _decode_all(body, separator=";")
        calls = _calls_from(values) if values else None
        return (None, calls) if calls else (text, [])


class HermesParser(ToolParser):
    name = "hermes"
    start_markers = ("<tool_call>",)
    _CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find("<tool_call>")
        if start < 0:
            return text, []
        calls = []
        for body in self._CALL.findall(text[start:]):
            values = _decode_all(body)
            found = _calls_from(values[0]) if values and len(values) == 1 else None
            if not found:
                return text, []  # a malformed call: the text is all the client gets, as it was written
            calls.extend(found)
        content = text[:start].strip()
        return content or None, calls


class MistralParser(ToolParser):
    name = "mistral"
    start_markers = ("[TOOL_CALLS]",)

    def extract(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find("[TOOL_CALLS]")
        if start < 0:
            return text, []
        content = text[:start].strip() or None
        calls: list[ParsedToolCall] = []
        for part in text[start:].split("[TOOL_CALLS]")[1:]:
            if "[ARGS]" in part:  # the newer format: name[ARGS]{arguments}
                name, _, arguments = part.partition("[ARGS]")
                values = _decode_all(arguments)
                found = _calls_from({"name": name.strip(), "arguments": values[0]}) if values else None
            else:
                values = _decode_all(part)
                found = _calls_from(values[0]) if values and len(values) == 1 else None
            if not found:
                return text, []
            calls.extend(found)
        return content, calls


PARSERS: dict[str, type[ToolParser]] = {parser.name: parser for parser in
                                        (GemmaJsonParser, Llama3JsonParser, HermesParser, MistralParser)}


def choose_tool_parser(name: str, chat_template: str | None) -> ToolParser:
    """`name` from --tool-call-parser; "auto" reads the chat template for its family's markers. A template
    that does not render tools gets Gemma's JSON convention, written into the messages."""
    if name != "auto":
        return PARSERS[name]()
    template = chat_template or ""
    if "tools" not in template:
        return GemmaJsonParser()
    if "<tool_call>" in template:
        return HermesParser()
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JsonParser()
    return GemmaJsonParser()



class ToolCallStream:
    """A streamed output split into content that can go out now and text held back because it is (or may
    become) a tool call; `finish` parses the whole output."""

    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.num_sent = 0  # chars of `text` sent as content
        self.holding = False  # a call has begun: nothing more goes out as content

    def feed(self, delta: str) -> str:
        """Add generated text; returns the content that can be sent now."""
        self.text += delta
        if self.holding:
            return ""
        if self.num_sent == 0 and self.parser.leading_markers:
            stripped = self.text.lstrip()
            if any(stripped.startswith(marker) for marker in self.parser.leading_markers):
                self.holding = True
                return ""
            if not stripped or any(marker.startswith(stripped) for marker in self.parser.leading_markers):
                return ""  # undecided: whitespace, or the start of a marker
        for marker in self.parser.start_markers:
            found = self.text.find(marker, max(0, self.num_sent - len(marker)))
            if found >= 0:
                self.holding = True
                return self._send(found)
        # Keep back a tail that may be the start of a marker.
        keep = max((size for marker in self.parser.start_markers for size in range(1, len(marker))
                    if self.text.endswith(marker[:size])), default=0)
        return self._send(len(self.text) - keep)

    def _send(self, end: int) -> str:
        content = self.text[self.num_sent:end] if end > self.num_sent else ""
        self.num_sent = max(self.num_sent, end)
        return content

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """At the end of the output: the content not sent yet, and the calls."""
        _, calls = self.parser.extract(self.text)
        return ("", calls) if calls else (self.finish_as_text(), [])

    def finish_as_text(self) -> str:
        """At the end of an output that is not to be parsed (cut short): all that is left is content."""
        return self._send(len(self.text))
