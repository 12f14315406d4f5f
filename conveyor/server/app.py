"""The OpenAI-compatible HTTP API on top of AsyncLLM (FastAPI, the ecosystem's usual choice).

Routes only parse, call a serving object (`completions.py`, `chat.py`; what they share is in
`serving.py`) and return; errors anywhere become OpenAI error objects here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor.engine.async_engine import AsyncLLM, EngineDeadError
from conveyor.server.admission import Admission
from conveyor.server.chat import ChatServing, chat_prompt_ids
from conveyor.server.completions import CompletionServing
from conveyor.server.dashboard import dashboard_router
from conveyor.server.errors import APIError
from conveyor.server.metrics import ServerMetrics
from conveyor.server.middleware import REQUEST_ID_KEY, RequestGuard
from conveyor.server.openapi import error_responses, install_openapi
from conveyor.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    now,
)
from conveyor.server.serving import ServerSettings
from conveyor.server.step_stream import StepStream

logger = logging.getLogger(__name__)

__all__ = ["ServerSettings", "build_app"]

_GENERATION_ERRORS = (400, 401, 404, 408, 413, 429, 500, 503)
_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


def build_app(llm: AsyncLLM, settings: ServerSettings, metrics: ServerMetrics,
              step_stream: StepStream | None = None,
              health: Callable[[], tuple[bool, dict[str, Any]]] | None = None) -> FastAPI:
    """`step_stream` (fed by the engine loop's observer) adds the dashboard and its step stream. `health`
    replaces `/health`'s check (alive, body): conveyor.distributed's ingress reports its replicas there."""
    app = FastAPI(title="conveyor", version="0.1.0")
    app.add_middleware(RequestGuard, settings=settings.guard)
    if settings.allowed_origins:
        # NOTE: added last, so outermost: a browser's preflight is answered before the guard asks for a key.
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"], expose_headers=["X-Request-Id"])
    install_openapi(app)
    engine = llm.engine
    if step_stream is not None:
        app.include_router(dashboard_router(engine, settings.model_name, step_stream, bool(settings.guard.api_key)))
    tokenizer = engine.tokenizer
    seats = engine.config.max_num_seqs
    admission = Admission(None if settings.max_queue_len is None else seats + settings.max_queue_len)
    completion_serving = CompletionServing(llm, settings, admission)
    chat_serving = ChatServing(llm, settings, admission)  # one queue limit for both endpoints
    check_model = completion_serving.check_model

    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        location = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{location}: {first.get('msg', 'invalid request')}" if location else first.get("msg", "invalid")
        if first.get("type") == "extra_forbidden":
            message = f"{location}: unknown field; this server does not support it"
        param = first.get("ctx", {}).get("field") or location or None  # the field of a whole-body check
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        # Starlette's own: unknown paths, wrong methods, bodies that are not JSON (or not UTF-8, or too deep)
        error_type = _HTTP_ERROR_TYPES.get(error.status_code, "invalid_request_error")
        return APIError(error.status_code, str(error.detail), error_type, headers=error.headers).response()

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(_: Request, error: EngineDeadError) -> JSONResponse:
        return APIError(503, str(error), "service_unavailable_error").response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, error: Exception) -> JSONResponse:
        request_id = request.scope.get(REQUEST_ID_KEY, "unknown")
        logger.error("request %s failed: %r", request_id, error)
        return APIError(500, f"internal error (request id {request_id})", "internal_server_error").response()

    @app.post("/v1/completions", responses=error_responses(*_GENERATION_ERRORS))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await completion_serving.create(body, request)

    @app.post("/v1/chat/completions", responses=error_responses(*_GENERATION_ERRORS))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await chat_serving.create(body, request)

    # ---- the rest -----------------------------------------------------------------------------

    @app.get("/v1/models", responses=error_responses(401, 408, 500))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": now(),
                                            "owned_by": "conveyor", "max_model_len": engine.max_model_len}]}

    @app.get("/health", responses=error_responses(503))
    async def health_check() -> Response:
        if health is not None:
            alive, body = health()
            return JSONResponse(body, status_code=200 if alive else 503)
        if not llm.is_alive:
            return JSONResponse({"status": "engine loop stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", responses=error_responses(401, 408, 500))
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reset_prefix_cache", responses=error_responses(401, 408, 500, 503))
    async def reset_prefix_cache() -> dict[str, Any]:
        """Forget every cached prefix (as vLLM's admin endpoint); running requests keep their blocks."""
        forgotten = await llm.call(lambda engine: engine.reset_prefix_cache())
        if isinstance(forgotten, list):  # conveyor.distributed: one count a replica
            return {"reset": True, "num_blocks_forgotten": sum(forgotten), "num_replicas": len(forgotten)}
        return {"reset": True, "num_blocks_forgotten": forgotten}

    @app.post("/tokenize", responses=error_responses(400, 401, 404, 408, 413, 500))
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages")
        if body.messages is not None:
            tokens = chat_prompt_ids(tokenizer, [m.model_dump(exclude_none=True) for m in body.messages],
                                     body.add_generation_prompt, continue_final_message=body.continue_final_message,
                                     chat_template_kwargs=body.chat_template_kwargs)
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

