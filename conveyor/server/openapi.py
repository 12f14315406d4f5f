"""The OpenAPI document as the server really answers: its error statuses, each with the error schema.

FastAPI documents a 422 for every route with a body; conveyor answers 400 for those (as OpenAI does), so
the 422s and their schemas are dropped from the generated document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from conveyor.server.protocol import ErrorResponse

_DESCRIPTIONS = {
    400: "Invalid request: a parameter out of range, a wrong type, malformed JSON or text, a prompt too long",
    401: "Missing or wrong API key (when the server has one)",
    404: "Unknown model",
    408: "The request body did not arrive in time",
    413: "The request body is over the server's limit",
    429: "Queue full: retry after the Retry-After header's seconds",
    500: "Internal error; the message gives the request id (also in the X-Request-Id header)",
    503: "The engine is not running",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that can answer these error statuses."""
    return {status: {"model": ErrorResponse, "description": _DESCRIPTIONS[status]} for status in statuses}


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in document.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = document.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
