"""The OpenAI-compatible HTTP API on top of AsyncLLM (FastAPI, the ecosystem's usual choice)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.engine.async_engine import AsyncLLM, EngineDeadError
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams
from conveyor.server.admission import (
    Admission,
    GroupStreamingResponse,
    QueueFullError,
    RequestGroup,
    wait_for_disconnect,
)
from conveyor.server.metrics import ServerMetrics
from conveyor.server.middleware import REQUEST_ID_KEY, GuardSettings, RequestGuard
from conveyor.server.openapi import error_responses, install_openapi
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

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str
    guard: GuardSettings = field(default_factory=GuardSettings)
    # Engine requests (prompts x n) admitted and unfinished may exceed the batch's seats by at most this
    # many; beyond it, 429. None: no limit.
    max_queue_len: int | None = None
    max_choices_per_request: int = 64  # prompts x n in one HTTP request: its cap on work


class APIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.param, self.headers = status, message, error_type, param, headers


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error_body(error.message, error.error_type, error.status, error.param),
                        status_code=error.status, headers=error.headers)


_GENERATION_ERRORS = (400, 401, 404, 408, 413, 429, 500, 503)
_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


def build_app(llm: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics) -> FastAPI:
    app = FastAPI(title="conveyor", version="0.1.0")
    app.add_middleware(RequestGuard, settings=settings.guard)
    install_openapi(app)
    engine = llm.engine
    tokenizer = engine.tokenizer
    seats = engine.config.max_num_seqs
    admission = Admission(None if settings.max_queue_len is None else seats + settings.max_queue_len)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{location}: {first.get('msg', 'invalid request')}" if location else first.get("msg", "invalid")
        param = first.get("ctx", {}).get("field") or location or None  # the field of a whole-body check
        return _error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        # Starlette's own: unknown paths, wrong methods, bodies that are not JSON (or not UTF-8, or too deep)
        error_type = _HTTP_ERROR_TYPES.get(error.status_code, "invalid_request_error")
        return _error_response(APIError(error.status_code, str(error.detail), error_type,
                                        headers=error.headers))

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, error: EngineDeadError) -> JSONResponse:
        return _error_response(APIError(503, str(error), "service_unavailable_error"))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        request_id = request.scope.get(REQUEST_ID_KEY, "unknown")
        logger.error("request %s failed: %r", request_id, error)
        return _error_response(APIError(500, f"internal error (request id {request_id})",
                                        "internal_server_error"))

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {settings.model_name!r}",
                           "not_found_error", "model")

    def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        # A top_k beyond the vocabulary filters nothing; as given, a huge one would overflow in the sampler.
        top_k = body.top_k if body.top_k < engine.model_config.vocab_size else -1
        try:
            return SamplingParams(
                n=1, temperature=body.temperature, top_p=body.top_p, top_k=top_k, min_p=body.min_p,
                repetition_penalty=body.repetition_penalty, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, seed=body.seed, max_tokens=max_tokens,
                min_tokens=body.min_tokens, stop=body.stop or [], stop_token_ids=body.stop_token_ids or [],
                ignore_eos=body.ignore_eos, logprobs=logprobs)
        except ValueError as error:
            raise APIError(400, str(error)) from None

    async def start_group(prompts: list[str | list[int]], params: SamplingParams, n: int, request_id: str
                          ) -> RequestGroup:
        """One engine request per (prompt, sample), admitted together; all validated before any output is
        produced. The caller must close the group (it aborts whatever has not finished)."""
        count = len(prompts) * n
        if count > settings.max_choices_per_request:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is {count} sequences; at most "
                                f"{settings.max_choices_per_request} are allowed per request", param="n")
        if admission.limit is not None and count > admission.limit:
            raise APIError(400, f"{count} sequences can never be admitted: the server takes at most "
                                f"{admission.limit} at once", param="n")
        try:
            release = admission.admit(count)
        except QueueFullError as error:
            raise APIError(429, f"the server is busy: {error}", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        group = RequestGroup(llm, release)
        def child(sample: int) -> SamplingParams:
            return dataclasses.replace(params, seed=None if params.seed is None else params.seed + sample)

        children = [(prompt, child(sample), f"{request_id}-{p_index}-{sample}")
                    for p_index, prompt in enumerate(prompts) for sample in range(n)]
        try:
            await group.add(children)
        except ValueError as error:
            group.close()
            raise APIError(400, str(error)) from None
        except BaseException:
            group.close()
            raise
        return group

    async def collect(group: RequestGroup, request: Request) -> list[RequestOutput]:
        """Every request's final output; if the client hangs up first, 499 (the group's close aborts)."""
        finals = asyncio.ensure_future(group.finals())
        hangup = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait([finals, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not finals.done():
                finals.cancel()
            await asyncio.gather(finals, hangup, return_exceptions=True)
        if finals.cancelled():
            raise APIError(499, "client disconnected")
        return finals.result()

    def usage(finals: list[RequestOutput], prompt_counts: list[int]) -> dict[str, int]:
        completion = sum(len(f.outputs[0].token_ids) for f in finals)
        prompt = sum(prompt_counts)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def chat_prompt_ids(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """The prompt ids of a conversation: what a chat completion runs and /tokenize reports."""
        try:
            return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # a template's raise_exception, messages it cannot render, or no template
            raise APIError(400, f"cannot apply the chat template: {error}", param="messages") from None

    # ---- completions --------------------------------------------------------------------------

    @app.post("/v1/completions", responses=error_responses(*_GENERATION_ERRORS))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_model(body.model)
        prompts = _normalize_prompts(body.prompt, engine.model_config.vocab_size)
        params = sampling_params(body, body.max_tokens, body.logprobs)
        request_id = new_id("cmpl")
        prompt_texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        group = await start_group(prompts, params, body.n, request_id)
        base = {"id": request_id, "object": "text_completion", "created": now(), "model": settings.model_name}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                prompt_counts: dict[int, int] = {}
                completion_tokens = 0
                async for index, output in _merge(group.streams):
                    if isinstance(output, Exception):
                        yield _sse_error(output, request)
                        break
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

            return GroupStreamingResponse(events(), group)

        try:
            finals = await collect(group, request)
        finally:
            group.close()
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

    @app.post("/v1/chat/completions", responses=error_responses(*_GENERATION_ERRORS))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_model(body.model)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        prompt_ids = chat_prompt_ids(messages, body.add_generation_prompt)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = sampling_params(body, body.max_completion_tokens or body.max_tokens, top)
        request_id = new_id("chatcmpl")
        group = await start_group([prompt_ids], params, body.n, request_id)
        base = {"id": request_id, "created": now(), "model": settings.model_name}

        if body.stream:
            async def events() -> AsyncIterator[str]:
                chunk = {**base, "object": "chat.completion.chunk"}
                for index in range(body.n):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse({**chunk, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
                completion_tokens = 0
                async for index, output in _merge(group.streams):
                    if isinstance(output, Exception):
                        yield _sse_error(output, request)
                        break
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

            return GroupStreamingResponse(events(), group)

        try:
            finals = await collect(group, request)
        finally:
            group.close()
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

    @app.get("/v1/models", responses=error_responses(401, 408, 500))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": now(),
                                            "owned_by": "conveyor", "max_model_len": engine.max_model_len}]}

    @app.get("/health", responses=error_responses(503))
    async def health() -> Response:
        if not llm.is_alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", responses=error_responses(401, 408, 500))
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", responses=error_responses(400, 401, 404, 408, 413, 500))
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if body.messages is not None:
            tokens = chat_prompt_ids([m.model_dump(exclude_none=True) for m in body.messages])
        else:
            tokens = tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_model_len}

    @app.post("/detokenize", responses=error_responses(400, 401, 404, 408, 413, 500))
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        vocab = engine.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return app


def _normalize_prompts(prompt: str | list[str] | list[int] | list[list[int]],
                       vocab_size: int) -> list[str | list[int]]:
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
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


def _finish_reason(output: RequestOutput) -> str | None:
    reason = output.outputs[0].finish_reason
    return None if reason is None else ("stop" if reason == "abort" else reason)


def _stop_reason(output: RequestOutput) -> int | str | None:
    return output.outputs[0].stop_reason


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _sse_error(error: Exception, request: Request) -> str:
    """A failure after the 200 went out: an error event in the stream, as vLLM sends it."""
    request_id = request.scope.get(REQUEST_ID_KEY, "unknown")
    logger.error("request %s failed mid-stream: %r", request_id, error)
    return _sse(error_body(f"internal error (request id {request_id})", "internal_server_error", 500))


async def _merge(streams: list[AsyncIterator[RequestOutput]]
                 ) -> AsyncIterator[tuple[int, RequestOutput | Exception]]:
    """Interleave several requests' outputs as they come, tagged with their choice index; a stream that
    fails yields its exception, and the caller stops there."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as error:
            await queue.put((index, error))
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
