"""The OpenAI-compatible HTTP API on top of AsyncLLM (FastAPI, the ecosystem's usual choice)."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from conveyor.engine.async_engine import AsyncLLM
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams
from conveyor.server.dashboard import dashboard_router
from conveyor.server.metrics import ServerMetrics
from conveyor.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    error_body,
    new_id,
    now,
)
from conveyor.server.responses import chat_logprobs, completion_logprobs
from conveyor.server.step_stream import StepStream


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue_len: int | None = None  # waiting requests beyond this get 429
    max_body_bytes: int = 4 * 1024 * 1024


class APIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.headers = status, message, error_type, param, headers


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.error_type, error.status, error.param),
                        status_code=error.status, headers=error.headers)


def build_app(llm: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics,
              step_stream: StepStream | None = None) -> FastAPI:
    """`step_stream` (fed by the engine loop's observer) adds the dashboard and its step stream."""
    app = FastAPI(title="conveyor", version="0.1.0")
    engine = llm.engine
    if step_stream is not None:
        app.include_router(dashboard_router(engine, settings.model_name, step_stream, bool(settings.api_key)))
    tokenizer = engine.tokenizer

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{location}: {first.get('msg', 'invalid request')}" if location else first.get("msg", "invalid")
        return _error_response(APIError(400, message, param=location or None))

    @app.middleware("http")
    async def _guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if settings.api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return _error_response(APIError(401, "invalid or missing API key", "authentication_error"))
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return _error_response(APIError(413, f"request body of {length} bytes exceeds the limit of "
                                                 f"{settings.max_body_bytes}", "request_too_large"))
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                           "not_found_error", "model")

    def check_queue() -> None:
        limit = settings.max_queue_len
        if limit is not None and engine.scheduler.num_waiting >= limit:
            raise APIError(429, f"the server is busy: {engine.scheduler.num_waiting} requests are waiting",
                           "rate_limit_error", headers={"Retry-After": "1"})

    def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                n=1, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, seed=body.seed, max_tokens=max_tokens,
                min_tokens=body.min_tokens, stop=body.stop or [], stop_token_ids=body.stop_token_ids or [],
                ignore_eos=body.ignore_eos, logprobs=logprobs)
        except ValueError as error:
            raise APIError(400, str(error)) from None

    async def start_streams(prompts: list[str | list[int]], params: SamplingParams, n: int, request_id: str
                            ) -> list[AsyncIterator[RequestOutput]]:
        """One engine request per (prompt, sample); all validated before any output is produced."""
        check_queue()
        streams: list[AsyncIterator[RequestOutput]] = []
        added: list[str] = []
        try:
            for p_index, prompt in enumerate(prompts):
                for sample in range(n):
                    child = dataclasses.replace(params, seed=None if params.seed is None else params.seed + sample)
                    child_id = f"{request_id}-{p_index}-{sample}"
                    streams.append(await llm.add_request(prompt, child, child_id))
                    added.append(child_id)
        except ValueError as error:
            for child_id in added:  # their streams never started, so they cannot abort themselves
                llm.abort(child_id)
            raise APIError(400, str(error)) from None
        return streams

    async def collect(streams: list[AsyncIterator[RequestOutput]], request: Request) -> list[RequestOutput]:
        async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
            final = None
            async for output in stream:
                final = output
            assert final is not None
            return final

        task = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
        while not task.done():  # a client that hangs up aborts its requests
            await asyncio.wait([task], timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()  # each stream's cleanup aborts its request
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "client disconnected")
        return task.result()

    def usage(finals: list[RequestOutput], prompt_counts: list[int]) -> dict[str, int]:
        completion = sum(len(f.outputs[0].token_ids) for f in finals)
        prompt = sum(prompt_counts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- completions --------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        prompts = _normalize_prompts(body.prompt)
        params = sampling_params(body, body.max_tokens, body.logprobs)
        request_id = new_id("cmpl")
        streams = await start_streams(prompts, params, body.n, request_id)
        prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        base = {"id": request_id, "object": "text_completion", "created": now(), "model": settings.model_name}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                prompt_counts: dict[int, int] = {}
                completion_tokens = 0
                async for index, output in _merge(streams):
                    prompt_counts[index // body.n] = len(output.prompt_token_ids)
                    completion_tokens += len(output.delta_token_ids)
                    text = output.delta_text
                    if body.echo and len(output.outputs[0].token_ids) == len(output.delta_token_ids):
                        text = prompt_texts[index // body.n] + text
                    logprobs = None
                    if body.logprobs is not None:
                        logprobs = completion_logprobs(tokenizer, output, len(output.delta_token_ids), body.logprobs)
                    if text or output.finished or logprobs:
                        choice = {"index": index, "text": text, "logprobs": logprobs,
                                  "finish_reason": _finish_reason(output), "stop_reason": _stop_reason(output)}
                        yield _sse({**base, "choices": [choice]})
                if body.stream_options and body.stream_options.include_usage:
                    prompt_total = sum(prompt_counts.values())
                    yield _sse({**base, "choices": [], "usage": {
                        "prompt_tokens": prompt_total, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_total + completion_tokens}})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        finals = await collect(streams, request)
        choices = []
        for index, final in enumerate(finals):
            completion = final.outputs[0]
            text = (prompt_texts[index // body.n] + completion.text) if body.echo else completion.text
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(tokenizer, final, len(completion.token_ids), body.logprobs)
            choices.append({"index": index, "text": text, "logprobs": logprobs,
                            "finish_reason": _finish_reason(final), "stop_reason": _stop_reason(final)})
        prompt_counts = [len(finals[i * body.n].prompt_token_ids) for i in range(len(prompts))]
        return JSONResponse({**base, "choices": choices, "usage": usage(finals, prompt_counts)})

    # ---- chat ---------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=body.add_generation_prompt)
        except Exception as error:  # a template's raise_exception, or no template at all
            raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from None
        prompt_ids = tokenizer.encode(prompt_text)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, body.max_completion_tokens or body.max_tokens, top)
        request_id = new_id("chatcmpl")
        streams = await start_streams([prompt_ids], params, body.n, request_id)
        base = {"id": request_id, "created": now(), "model": settings.model_name}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                chunk = {**base, "object": "chat.completion.chunk"}
                for index in range(body.n):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse({**chunk, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
                completion_tokens = 0
                async for index, output in _merge(streams):
                    completion_tokens += len(output.delta_token_ids)
                    choice: dict[str, Any] = {"index": index, "delta": {}, "finish_reason": _finish_reason(output)}
                    if output.delta_text:
                        choice["delta"] = {"content": output.delta_text}
                    if body.logprobs:
                        choice["logprobs"] = chat_logprobs(tokenizer, output, len(output.delta_token_ids), top or 0)
                    if output.delta_text or output.finished:
                        yield _sse({**chunk, "choices": [choice]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**chunk, "choices": [], "usage": {
                        "prompt_tokens": len(prompt_ids), "completion_tokens": completion_tokens,
                        "total_tokens": len(prompt_ids) + completion_tokens}})
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        finals = await collect(streams, request)
        choices = []
        for index, final in enumerate(finals):
            choice = {"index": index, "message": {"role": "assistant", "content": final.outputs[0].text},
                      "finish_reason": _finish_reason(final), "logprobs": None}
            if body.logprobs:
                choice["logprobs"] = chat_logprobs(tokenizer, final, len(final.outputs[0].token_ids), top or 0)
            choices.append(choice)
        return JSONResponse({**base, "object": "chat.completion", "choices": choices,
                             "usage": usage(finals, [len(prompt_ids)])})

    # ---- the rest -----------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": now(),
                                            "owned_by": "conveyor", "max_model_len": engine.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        if not llm.is_alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if body.messages is not None:
            text = tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages])
        else:
            text = body.prompt or ""
        tokens = tokenizer.encode(text, add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        vocab = engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


def _normalize_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise APIError(400, "the prompt is empty", param="prompt")
    return prompts


def _finish_reason(output: RequestOutput) -> str | None:
    reason = output.outputs[0].finish_reason
    return None if reason is None else ("stop" if reason == "abort" else reason)


def _stop_reason(output: RequestOutput) -> int | str | None:
    return output.outputs[0].stop_reason


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with their choice index."""
    queue: asyncio.Queue[tuple[int, RequestOutput | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, output = await queue.get()
            if output is None:
                remaining -= 1
            else:
                yield index, output
    finally:
        for task in tasks:
            task.cancel()  # a stream cancelled mid-way aborts its request
        await asyncio.gather(*tasks, return_exceptions=True)
