"""The guard in front of the API: a request id on every response, the API key, and the body limits.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: the app must keep seeing the client's own
`http.disconnect` on the receive channel, which is how an abandoned request gets aborted.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.server.protocol import error_body, new_id

REQUEST_ID_KEY = "conveyor.request_id"  # where the app finds the request id in the ASGI scope
_CLOSE = {"connection": "close"}  # a refused request's body is not read: drop the connection, not drain it


@dataclass
class GuardSettings:
    api_key: str | None = None
    public_metrics: bool = False  # let a Prometheus scraper in without the key
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout: float = 30.0  # seconds to receive a whole body, however it is sent


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: GuardSettings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id("req")
        scope[REQUEST_ID_KEY] = request_id
        send = _with_request_id(send, request_id)
        if not self._authorized(scope):
            await _send_error(send, 401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                              "authentication_error", {"www-authenticate": "Bearer", **_CLOSE})
            return
        limit = self.settings.max_body_bytes
        try:
            body = await asyncio.wait_for(_read_body(scope, receive, limit), self.settings.body_timeout)
        except _BodyTooLarge:
            await _send_error(send, 413, f"the request body exceeds the limit of {limit} bytes",
                              "request_too_large", _CLOSE)
            return
        except asyncio.TimeoutError:
            seconds = self.settings.body_timeout
            await _send_error(send, 408, f"the request body took longer than {seconds:g} s to arrive",
                              "timeout_error", _CLOSE)
            return
        except _ClientGone:
            return  # nobody to answer
        await self.app(scope, _replay(body, receive), send)

    def _authorized(self, scope: Scope) -> bool:
        key = self.settings.api_key
        path = scope["path"]
        if key is None or path == "/health" or (path == "/metrics" and self.settings.public_metrics):
            return True
        if path == "/dashboard" or path.startswith("/dashboard/"):
            return True  # the page and its assets hold no data; it asks for the key and sends it with its reads
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        # NOTE: constant-time comparison, so the key cannot be guessed byte by byte from response times.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole body, refused as soon as it is known to be over `limit`: at once from Content-Length,
    else (chunked uploads) as the bytes arrive."""
    length = dict(scope["headers"]).get(b"content-length", b"")
    if length.isdigit() and int(length) > limit:
        raise _BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body in one message, then the client's own channel (for its `http.disconnect`)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if delivered:
            return await receive()
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _with_request_id(send: Send, request_id: str) -> Send:
    async def send_with_id(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
        await send(message)

    return send_with_id


async def _send_error(send: Send, status: int, message: str, error_type: str,
                     headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(message, error_type, status)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
