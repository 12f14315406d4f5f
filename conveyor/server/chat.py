"""`POST /v1/chat/completions` and the conversation -> prompt ids step `/tokenize` shares with it."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from conveyor.engine.parallel_sampling import ParentRequest
from conveyor.outputs import RequestOutput
from conveyor.server.admission import GroupStreamingResponse
from conveyor.server.errors import APIError
from conveyor.server.protocol import ChatCompletionRequest, new_id, now
from conveyor.server.reasoning import REASONING_PARSERS
from conveyor.server.responses import chat_logprobs
from conveyor.server.serving import GenerationServing, finals_usage, finish_reason, sse_events
from conveyor.tokenizer import Tokenizer


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


class ChatServing(GenerationServing):
    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt_ids = chat_prompt_ids(self.tokenizer, messages, body.add_generation_prompt,
                                     continue_final_message=body.continue_final_message, documents=body.documents,
                                     chat_template_kwargs=body.chat_template_kwargs)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, body.max_completion_tokens or body.max_tokens, top, body.n)
        request_id = new_id("chatcmpl")
        group = await self.start(ParentRequest(request_id, [prompt_ids], params))
        base = {"id": request_id, "created": now(), "model": self.settings.model_name}
        parser = REASONING_PARSERS.get(self.settings.reasoning_parser or "")

        def logprobs(output: RequestOutput, num_tokens: int) -> dict[str, Any] | None:
            return chat_logprobs(self.tokenizer, output, num_tokens, top or 0) if body.logprobs else None

        if body.stream:
            chunk = {**base, "object": "chat.completion.chunk"}
            opening = [{**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]} for index in range(body.n)]
            splits = [parser.stream() for _ in range(body.n)] if parser else None

            def render(index: int, output: RequestOutput) -> dict[str, Any] | None:
                if not (output.delta_text or output.finished):
                    return None
                delta: dict[str, Any] = {"content": output.delta_text} if output.delta_text else {}
                if splits is not None:
                    reasoning, content = splits[index].feed(output.delta_text, final=output.finished)
                    delta = {key: text for key, text in (("reasoning_content", reasoning), ("content", content))
                             if text}
                    if not (delta or output.finished or body.logprobs):
                        return None  # all held back (maybe the start of a tag): nothing to say yet
                choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason(output), "delta": delta}
                if body.logprobs:
                    choice["logprobs"] = logprobs(output, len(output.delta_token_ids))
                return choice

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GroupStreamingResponse(
                sse_events(group, request, chunk, body.n, render, include_usage, opening), group)

        finals = await self.collect(group, request)

        def message(text: str) -> dict[str, Any]:
            if parser is None:
                return {"role": "assistant", "content": text}
            reasoning, content = parser.split(text)
            return {"role": "assistant", "content": content, "reasoning_content": reasoning}

        choices = [{"index": index, "message": message(final.outputs[0].text),
                    "finish_reason": finish_reason(final),
                    "logprobs": logprobs(final, len(final.outputs[0].token_ids))}
                   for index, final in enumerate(finals)]
        return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                             "usage": finals_usage(finals, body.n)})
