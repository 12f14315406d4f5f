"""`GET /dashboard`: a live view of the batch, and the engine description and step stream behind it.

The page (static/dashboard.html, .js, .css: no build step, nothing from elsewhere) carries no data, so it
is served without a key. Everything it shows comes from `GET /v1/engine/config` and `GET /v1/engine/steps`,
which sit behind `--api-key` like every `/v1` route: the page asks for the key once, keeps it in the tab's
sessionStorage and sends it as `Authorization: Bearer`. It reads the stream with fetch() because
EventSource cannot send headers, and resumes after a drop with `Last-Event-ID`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict
from importlib import resources
from typing import Any

from fastapi import APIRouter, Header, HTTPException
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from conveyor.engine.engine import LLMEngine
from conveyor.engine.timeline import CELL_KINDS, EMPTY, IDLE
from conveyor.server.step_stream import StepStream

_ASSET_TYPES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_MODEL_FIELDS = ("architecture", "num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size", "max_position_embeddings", "sliding_window")


def dashboard_router(engine: LLMEngine, model_name: str, steps: StepStream, requires_key: bool) -> APIRouter:
    router = dashboard_page_router(requires_key)
    description = engine_description(engine, model_name, timeline_steps=steps.backlog)

    @router.get("/v1/engine/config")
    async def engine_config() -> dict[str, Any]:
        return description

    @router.get("/v1/engine/steps")
    async def engine_steps(last_event_id: str | None = Header(None)) -> StreamingResponse:
        return step_response(steps.stream(parse_last_event_id(last_event_id)))

    return router


def dashboard_page_router(requires_key: bool) -> APIRouter:
    """The page and its assets (no data): `/dashboard` and `/dashboard/{name}`."""
    router = APIRouter()
    static = resources.files("conveyor.server") / "static"
    # The page learns whether to ask for the key up front, rather than from a refused request.
    page = (static / "dashboard.html").read_text().replace("{requires_key}", str(requires_key).lower())
    assets = {name: (static / name).read_text() for name in _ASSET_TYPES}

    @router.get("/dashboard", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def dashboard_asset(name: str) -> Response:
        if name not in assets:
            raise HTTPException(404)
        return Response(assets[name], media_type=_ASSET_TYPES[name])

    return router


def parse_last_event_id(header: str | None) -> int | None:
    """Our ids are step indices; anything else (a stranger's id) starts from what the ring holds."""
    return int(header) if header is not None and header.isdigit() else None


def step_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def engine_description(engine: LLMEngine, model_name: str, timeline_steps: int) -> dict[str, Any]:
    """The served model, the engine's resolved configuration and the timeline's legend, for the page."""
    model = engine.model_config
    return {
        "model": model_name, "model_path": engine.model_path,
        "model_config": {name: getattr(model, name) for name in _MODEL_FIELDS},
        "engine": asdict(engine.config),
        # a live engine batches continuously: no idle slots
        "timeline": {"steps": timeline_steps,
                     "kinds": [asdict(kind) for kind in CELL_KINDS if kind not in (EMPTY, IDLE)]},
    }
