"""`POST /v1/completions`: prompts (text or token ids, one or a list) x n samples, streamed or not."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from conveyor.engine.parallel_sampling import ParentRequest, Prompt
from conveyor.outputs import RequestOutput
from conveyor.server.admission import GroupStreamingResponse
from conveyor.server.errors import APIError
from conveyor.server.protocol import CompletionRequest, new_id, now
from conveyor.server.responses import completion_logprobs
from conveyor.server.serving import (
    GenerationServing,
    finals_usage,
    finish_reason,
    requested_constraint,
    sse_events,
)


class CompletionServing(GenerationServing):
    async def create(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompts = normalize_prompts(body.prompt, self.engine.model_config.vocab_size)
        constraint, param = requested_constraint(body)
        await self.compile_constraint(constraint, param)
        params = self.sampling_params(body, body.max_tokens, body.logprobs, body.n, constraint)
        request_id = new_id("cmpl")
        prompt_texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        group = await self.start(ParentRequest(request_id, prompts, params))
        base = {"id": request_id, "object": "text_completion", "created": now(),
                "model": self.settings.model_name}

        def choice(index: int, output: RequestOutput, num_tokens: int, text: str) -> dict[str, Any]:
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(self.tokenizer, output, num_tokens, body.logprobs)
            if body.echo and num_tokens == len(output.outputs[0].token_ids):  # the first of this choice
                text = prompt_texts[index // body.n] + text
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(output),
                    "stop_reason": output.outputs[0].stop_reason}

        if body.stream:
            def render(index: int, output: RequestOutput) -> dict[str, Any] | None:
                rendered = choice(index, output, len(output.delta_token_ids), output.delta_text)
                return rendered if rendered["text"] or output.finished or rendered["logprobs"] else None

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return GroupStreamingResponse(sse_events(group, request, base, body.n, render, include_usage), group)

        finals = await self.collect(group, request)
        choices = [choice(index, final, len(final.outputs[0].token_ids), final.outputs[0].text)
                   for index, final in enumerate(finals)]
        return JSONResponse({**base, "choices": choices, "usage": finals_usage(finals, body.n)})


def normalize_prompts(prompt: str | list[str] | list[int] | list[list[int]], vocab_size: int) -> list[Prompt]:
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "the prompt is empty", param="prompt")
    bad = [t for p in prompts if not isinstance(p, str) for t in p if not 0 <= t < vocab_size]
    if bad:  # checked here too, before anything (echo's decoding) touches them
        raise APIError(400, f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:5]}",
                       param="prompt")
    return prompts
