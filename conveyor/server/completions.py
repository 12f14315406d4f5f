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
from conveyor.server.responses import completion_logprobs, echoed_prompt_logprobs, joined_logprobs
from conveyor.server.serving import GenerationServing, finals_usage, finish_reason, requested_constraint


class CompletionServing(GenerationServing):
    async def create(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        prompts = normalize_prompts(body.prompt, self.engine.model_config.vocab_size)
        constraint, param = requested_constraint(body)
        await self.compile_constraint(constraint, param)
        max_tokens = body.max_tokens if "max_tokens" in body.model_fields_set else \
            self.engine.sampling_defaults.get("max_tokens", body.max_tokens)
        # echo with logprobs scores the prompt tokens too
        prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        params = self.sampling_params(body, max_tokens, body.logprobs, body.n, best_of=body.best_of,
                                      prompt_logprobs=prompt_logprobs,
                                      structured_outputs=constraint)
        request_id = new_id("cmpl")
        prompt_texts = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts]
        parent = ParentRequest(request_id, prompts, params)
        group = await self.start(parent)
        base = {"id": request_id, "object": "text_completion", "created": now(),
                "model": self.settings.model_name, "system_fingerprint": self.system_fingerprint}

        def choice(index: int, output: RequestOutput, num_tokens: int, text: str) -> dict[str, Any]:
            logprobs = None
            echoed = body.echo and num_tokens == len(output.outputs[0].token_ids)  # the first of this choice
            prompt_text = prompt_texts[index // body.n] if echoed else ""
            if body.logprobs is not None:
                logprobs = completion_logprobs(self.tokenizer, output, num_tokens, body.logprobs, len(prompt_text))
                if echoed:
                    logprobs = joined_logprobs(echoed_prompt_logprobs(self.tokenizer, output, body.logprobs),
                                               logprobs)
            return {"index": index, "text": prompt_text + text, "logprobs": logprobs,
                    "finish_reason": finish_reason(output), "stop_reason": output.outputs[0].stop_reason}

        if body.stream:  # best_of > n was refused with stream: every child is a choice
            def render(index: int, output: RequestOutput) -> dict[str, Any] | None:
                rendered = choice(index, output, len(output.delta_token_ids), output.delta_text)
                return rendered if rendered["text"] or output.finished or rendered["logprobs"] else None

            return GroupStreamingResponse(self.events(group, request, base, body.n, render, body), group)

        finals = await self.collect(group, request)
        usage = finals_usage(finals, parent.samples_per_prompt)  # best_of: every sample generated counts
        choices = [choice(index, final, len(final.outputs[0].token_ids), final.outputs[0].text)
                   for index, final in enumerate(parent.best(finals))]
        return JSONResponse({**base, "choices": choices, "usage": usage})


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
