"""`POST /v1/chat/completions` and the conversation -> prompt ids step `/tokenize` shares with it.

Tool calls: the tools go to the chat template (or, for a template that knows no tools, into the messages
by the parser's convention, see `tool_parsers.py`). `tool_choice="auto"` parses the model's own format out
of its text; `"required"` and a named function constrain the output with a JSON schema built from the
tools' parameters, so the arguments always parse; `"none"` offers no tools at all.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from conveyor.engine.parallel_sampling import ParentRequest
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import StructuredOutputsParams
from conveyor.server.admission import GroupStreamingResponse
from conveyor.server.errors import APIError
from conveyor.server.protocol import ChatCompletionRequest, new_id, now
from conveyor.server.reasoning import REASONING_PARSERS
from conveyor.server.responses import chat_logprobs
from conveyor.server.serving import (
    GenerationServing,
    finals_usage,
    finish_reason,
    requested_constraint,
    usage_block,
)
from conveyor.server.tool_parsers import ParsedToolCall, ToolCallStream, ToolParser, choose_tool_parser
from conveyor.tokenizer import Tokenizer

ToolMode = Literal["none", "auto", "required", "named"]
_DECODER = json.JSONDecoder()


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    *, continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                    documents: list[dict[str, Any]] | None = None,
                    chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
    """The prompt ids of a conversation: what a chat completion runs and /tokenize reports."""
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message needs add_generation_prompt set to false: the first "
                            "continues the final message, the second opens a new one", param="continue_final_message")
    try:
        return tokenizer.encode_chat(
            [_as_template_message(m) for m in messages], add_generation_prompt,
            continue_final_message=continue_final_message, tools=tools, documents=documents,
            chat_template_kwargs=chat_template_kwargs)
    except Exception as error:  # a template's raise_exception, messages it cannot render, or no template
        raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from None


def _as_template_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as vLLM hands it to a template: content always there (an assistant turn of tool calls has
    none), and tool-call arguments as the JSON object templates print, not OpenAI's JSON string."""
    message = {**message, "content": message.get("content") or ""}
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        message["tool_calls"] = [_arguments_as_object(call) for call in calls]
    return message


def _arguments_as_object(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    if not isinstance(arguments, str):
        return call
    try:
        parsed = json.loads(arguments)
    except json.JSONDecodeError:
        return call  # left as the client sent it; the template decides
    return {**call, "function": {**function, "arguments": parsed}}


def _check_tool_results(messages: list[dict[str, Any]]) -> None:
    """OpenAI's rule: a `tool` message answers a call an earlier assistant message made (parsers that
    rewrite tool results for templates without a tool role would otherwise accept any stray one)."""
    calls_made = False
    for index, message in enumerate(messages):
        calls_made = calls_made or bool(message["role"] == "assistant" and message.get("tool_calls"))
        if message["role"] == "tool" and not calls_made:
            raise APIError(400, f"messages.{index}: a message with role 'tool' must answer the tool_calls of an "
                                "earlier assistant message", param=f"messages.{index}")


def tool_mode(body: ChatCompletionRequest) -> tuple[ToolMode, str | None]:
    """What the request's tool_choice asks for (OpenAI's default: "auto" with tools, "none" without),
    and the named function if one is."""
    names = [tool.function.name for tool in body.tools or []]
    choice = body.tool_choice
    if choice is None:
        return ("auto" if names else "none"), None
    if choice == "none":
        return "none", None
    if not names:
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, str):
        return choice, None  # type: ignore[return-value]
    if choice.function.name not in names:
        raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                       param="tool_choice")
    return "named", choice.function.name


def tool_call_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """`tool_choice="required"`: a JSON list of calls, each a tool's name and arguments valid for it."""
    calls = [{"type": "object", "properties": {"name": {"const": tool["function"]["name"]},
                                               "parameters": _parameters(tool)},
              "required": ["name", "parameters"], "additionalProperties": False} for tool in tools]
    return {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
            **({} if parallel else {"maxItems": 1})}


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_call_objects(calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    return [{"id": new_tool_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


@dataclass
class ToolReader:
    """Reads one choice's output as content and tool calls, whole or as it streams."""

    mode: ToolMode
    parser: ToolParser
    named: str | None = None
    stream: ToolCallStream | None = None
    num_calls_sent: int = 0
    text: str = ""
    scanned: int = 0  # chars of `text` holding calls already sent

    def read(self, text: str, reason: str | None) -> tuple[str | None, list[ParsedToolCall]]:
        """A finished output: its content and calls. A truncated one ("length") is content only."""
        if self.mode == "none" or reason == "length":
            return text, []
        if self.mode == "named":
            return None, [ParsedToolCall(str(self.named), text)]
        if self.mode == "required":
            return None, [ParsedToolCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                          for c in json.loads(text)]
        return self.parser.extract(text)

    def feed(self, output: RequestOutput) -> list[dict[str, Any]]:
        """The deltas (OpenAI's chunk `delta` objects) for a streamed output's new text."""
        delta_text, reason = output.delta_text, output.outputs[0].finish_reason
        deltas: list[dict[str, Any]] = []
        if self.mode == "named":
            if self.num_calls_sent == 0 and (delta_text or output.finished):
                deltas.append(self._call_opening(0, str(self.named)))
            if delta_text:  # the output is the arguments: each piece goes out as it comes
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": delta_text}}]})
            return deltas
        if self.mode == "auto":
            self.stream = self.stream or ToolCallStream(self.parser)
            content = self.stream.feed(delta_text)
            if content:
                deltas.append({"content": content})
            if output.finished:
                rest, calls = self.stream.finish() if reason != "length" else (self.stream.finish_as_text(), [])
                if rest:
                    deltas.append({"content": rest})
                deltas.extend(self._call_deltas(calls))
            return deltas
        if self.mode == "required" and reason != "length":
            self.text += delta_text  # the grammar's list of calls: each goes out once it is complete
            for call in self._complete_calls():
                deltas.extend(self._call_deltas([call], first_index=self.num_calls_sent))
            return deltas
        # "none", or a constrained output cut short: what was not sent as calls is content.
        text = self.text[self.scanned:] + delta_text
        self.text, self.scanned = "", 0
        return [{"content": text}] if text else []

    def _call_opening(self, index: int, name: str) -> dict[str, Any]:
        self.num_calls_sent = max(self.num_calls_sent, index + 1)
        return {"tool_calls": [{"index": index, "id": new_tool_call_id(), "type": "function",
                                "function": {"name": name, "arguments": ""}}]}

    def _complete_calls(self) -> list[ParsedToolCall]:
        """The calls of `tool_call_schema`'s list completed since the last look (its text is `self.text`)."""
        calls = []
        while True:
            position = self.scanned
            while position < len(self.text) and self.text[position] in "[, \n":
                position += 1
            try:
                item, end = _DECODER.raw_decode(self.text, position)
            except json.JSONDecodeError:
                return calls  # not complete yet (the grammar guarantees it will be)
            calls.append(ParsedToolCall(item["name"], json.dumps(item["parameters"], ensure_ascii=False)))
            self.scanned = end

    def _call_deltas(self, calls: list[ParsedToolCall], first_index: int = 0) -> list[dict[str, Any]]:
        """Each call as OpenAI streams it: its id, type and name, then its arguments."""
        deltas = []
        for index, call in enumerate(calls, first_index):
            deltas.append(self._call_opening(index, call.name))
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})
        return deltas


class ChatServing(GenerationServing):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tool_parser = choose_tool_parser(self.settings.tool_call_parser, self.tokenizer.chat_template)

    def prompt_ids(self, body: ChatCompletionRequest, mode: ToolMode) -> list[int]:
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        _check_tool_results(messages)
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []] if mode != "none" else []
        if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = self.tool_parser.adapt_messages(messages, tools)
        template_tools = tools if tools and self.tool_parser.template_renders_tools else None
        return chat_prompt_ids(self.tokenizer, messages, body.add_generation_prompt, tools=template_tools,
                               continue_final_message=body.continue_final_message, documents=body.documents,
                               chat_template_kwargs=body.chat_template_kwargs)

    def constraint(self, body: ChatCompletionRequest, mode: ToolMode,
                   named: str | None) -> tuple[StructuredOutputsParams | None, str]:
        constraint, param = requested_constraint(body)
        if mode not in ("required", "named"):
            return constraint, param
        if constraint is not None:
            raise APIError(400, f"tool_choice {body.tool_choice!r} constrains the output already; it cannot be "
                                f"combined with {param}", param=param)
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
        if mode == "named":
            schema = next(_parameters(t) for t in tools if t["function"]["name"] == named)
        else:
            schema = tool_call_schema(tools, body.parallel_tool_calls)
        return StructuredOutputsParams(json=schema), "tools"

    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        mode, named = tool_mode(body)
        prompt_ids = self.prompt_ids(body, mode)
        constraint, param = self.constraint(body, mode, named)
        await self.compile_constraint(constraint, param)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, body.max_completion_tokens or body.max_tokens, top, body.n,
                                      structured_outputs=constraint)
        request_id = new_id("chatcmpl")
        group = await self.start(ParentRequest(request_id, [prompt_ids], params))
        base = {"id": request_id, "created": now(), "model": self.settings.model_name,
                "system_fingerprint": self.system_fingerprint}
        parser = REASONING_PARSERS.get(self.settings.reasoning_parser or "")

        def logprobs(output: RequestOutput, num_tokens: int) -> dict[str, Any] | None:
            return chat_logprobs(self.tokenizer, output, num_tokens, top or 0) if body.logprobs else None

        if body.stream:
            chunk = {**base, "object": "chat.completion.chunk"}
            options = body.stream_options
            opening_usage = {"usage": usage_block(len(prompt_ids), 0, 0)} \
                if options and options.continuous_usage_stats else {}
            opening = [{**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}], **opening_usage} for index in range(body.n)]
            readers = [ToolReader(mode, self.tool_parser, named) for _ in range(body.n)]
            splits = [parser.stream() for _ in range(body.n)] if parser else None
            # Tokens whose text is held back (a possible stop string, half a UTF-8 character, a possible tag
            # or tool-call marker) send no chunk yet: their logprobs wait here and go out with the next chunk
            # of that choice, so each token's logprob reaches the client exactly once.
            unsent_tokens = [0] * body.n

            def render(index: int, output: RequestOutput) -> list[dict[str, Any]]:
                reader = readers[index]
                unsent_tokens[index] += len(output.delta_token_ids)
                reasoning = ""
                if splits is not None:  # the thinking text first; tool calls are read from the rest
                    reasoning, content = splits[index].feed(output.delta_text, final=output.finished)
                    output = dataclasses.replace(output, delta_text=content)
                deltas = reader.feed(output)
                if reasoning:
                    deltas = [{"reasoning_content": reasoning}, *deltas]
                if output.finished:
                    deltas = deltas or [{}]  # a chunk for the finish reason
                choices: list[dict[str, Any]] = [{"index": index, "delta": d, "finish_reason": None} for d in deltas]
                if choices and output.finished:
                    reason = finish_reason(output)
                    calls = reader.num_calls_sent and reason != "length"
                    choices[-1]["finish_reason"] = "tool_calls" if calls else reason
                    choices[-1]["stop_reason"] = output.outputs[0].stop_reason
                if choices and body.logprobs:
                    choices[0]["logprobs"] = logprobs(output, unsent_tokens[index])
                    unsent_tokens[index] = 0
                return choices

            return GroupStreamingResponse(self.events(group, request, chunk, body.n, render, body, opening), group)

        finals = await self.collect(group, request)
        choices = []
        for index, final in enumerate(finals):
            reason = finish_reason(final)
            text, reasoning = final.outputs[0].text, None
            if parser is not None:
                reasoning, text = parser.split(text)
            content, calls = ToolReader(mode, self.tool_parser, named).read(text or "", final.outputs[0].finish_reason)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if parser is not None:  # as vLLM: null, not "", for a part that is empty
                message["content"], message["reasoning_content"] = content or None, reasoning
            if calls:
                message["tool_calls"] = tool_call_objects(calls)
                reason = "tool_calls"
            choices.append({"index": index, "message": message, "finish_reason": reason,
                            "stop_reason": final.outputs[0].stop_reason,
                            "logprobs": logprobs(final, len(final.outputs[0].token_ids))})
        return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                             "usage": finals_usage(finals, body.n)})
