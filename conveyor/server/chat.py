"""`POST /v1/chat/completions` and the conversation -> prompt ids step `/tokenize` shares with it."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from conveyor.engine.parallel_sampling import ParentRequest
from conveyor.outputs import RequestOutput
from conveyor.server.admission import GroupStreamingResponse
from conveyor.server.errors import APIError
from conveyor.server.protocol import ChatCompletionRequest, new_id, now
from conveyor.server.responses import chat_logprobs
from conveyor.server.serving import GenerationServing, finals_usage, finish_reason, usage_block
from conveyor.tokenizer import Tokenizer


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True
                    ) -> list[int]:
    """The prompt ids of a conversation: what a chat completion runs and /tokenize reports."""
    try:
        return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # a template's raise_exception, messages it cannot render, or no template
        raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from None


class ChatServing(GenerationServing):
    async def create(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt_ids = chat_prompt_ids(self.tokenizer, messages, body.add_generation_prompt)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, body.max_completion_tokens or body.max_tokens, top, body.n)
        request_id = new_id("chatcmpl")
        group = await self.start(ParentRequest(request_id, [prompt_ids], params))
        base = {"id": request_id, "created": now(), "model": self.settings.model_name,
                "system_fingerprint": self.system_fingerprint}

        def logprobs(output: RequestOutput, num_tokens: int) -> dict[str, Any] | None:
            return chat_logprobs(self.tokenizer, output, num_tokens, top or 0) if body.logprobs else None

        if body.stream:
            chunk = {**base, "object": "chat.completion.chunk"}
            options = body.stream_options
            opening_usage = {"usage": usage_block(len(prompt_ids), 0, 0)} \
                if options and options.continuous_usage_stats else {}
            opening = [{**chunk, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}], **opening_usage} for index in range(body.n)]
            # Tokens whose text is held back (a possible stop string, half a UTF-8 character) send no chunk
            # yet: their logprobs wait here and go out with the next chunk of that choice, so each token's
            # logprob reaches the client exactly once.
            unsent_tokens = [0] * body.n

            def render(index: int, output: RequestOutput) -> dict[str, Any] | None:
                unsent_tokens[index] += len(output.delta_token_ids)
                if not (output.delta_text or output.finished):
                    return None
                choice: dict[str, Any] = {"index": index, "finish_reason": finish_reason(output),
                                          "delta": {"content": output.delta_text} if output.delta_text else {}}
                if body.logprobs:
                    choice["logprobs"] = logprobs(output, unsent_tokens[index])
                unsent_tokens[index] = 0
                if output.finished:
                    choice["stop_reason"] = output.outputs[0].stop_reason
                return choice

            return GroupStreamingResponse(self.events(group, request, chunk, body.n, render, body, opening), group)

        finals = await self.collect(group, request)
        choices = [{"index": index, "message": {"role": "assistant", "content": final.outputs[0].text},
                    "finish_reason": finish_reason(final), "stop_reason": final.outputs[0].stop_reason,
                    "logprobs": logprobs(final, len(final.outputs[0].token_ids))}
                   for index, final in enumerate(finals)]
        return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                             "usage": finals_usage(finals, body.n)})
