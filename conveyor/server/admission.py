"""Admission (the queue limit), and the engine requests of one HTTP request, aborted together when its
client is gone.

All of it lives on the event loop: it is one thread, so admitting (check, then count) cannot interleave
with another request's admission, however large the burst.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from conveyor.engine.async_engine import AsyncLLM
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams


class QueueFullError(Exception):
    pass


class Admission:
    """Counts engine requests admitted and not yet released; refuses what would exceed `limit`."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.in_flight = 0

    def admit(self, count: int) -> Callable[[], None]:
        """Count `count` engine requests in, or raise QueueFullError; returns their (idempotent) release."""
        if self.limit is not None and self.in_flight + count > self.limit:
            raise QueueFullError(f"{self.in_flight} sequences are in flight, {count} more would exceed "
                                 f"the limit of {self.limit}")
        self.in_flight += count
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= count

        return release


class RequestGroup:
    """The engine requests behind one HTTP request: `close()` aborts every one that has not finished
    (streams never iterated included, which cannot abort themselves) and releases their admission."""

    def __init__(self, llm: AsyncLLM, release: Callable[[], None]) -> None:
        self.llm = llm
        self.release = release
        self.streams: list[AsyncIterator[RequestOutput]] = []
        self._request_ids: list[str] = []
        self._finished: set[str] = set()

    async def add(self, requests: list[tuple[str | list[int], SamplingParams, str]]) -> None:
        """Queue (prompt, params, request id)s at once, so they reach the engine in one drain, not one step
        each. If any is refused, its exception is raised (a ValueError for the client's input) and the rest,
        having been added, are left for `close()` to abort."""
        added = await asyncio.gather(*(self.llm.add_request(*request) for request in requests),
                                     return_exceptions=True)
        self._request_ids += [request_id for _, _, request_id in requests]
        self.streams += [self._track(stream) for stream in added if not isinstance(stream, BaseException)]
        failure = next((error for error in added if isinstance(error, BaseException)), None)
        if failure is not None:
            raise failure

    async def _track(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
        async for output in stream:
            if output.finished:
                self._finished.add(output.request_id)
            yield output

    async def finals(self) -> list[RequestOutput]:
        """Each request's last output, in order."""
        async def last(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
            final = None
            async for output in stream:
                final = output
            assert final is not None
            return final

        tasks = [asyncio.ensure_future(last(s)) for s in self.streams]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one failed or the caller gave up: the others must not wait on forever
                task.cancel()

    def close(self) -> None:
        for request_id in self._request_ids:
            if request_id not in self._finished:
                self.llm.abort(request_id)
        self.release()


async def wait_for_disconnect(request: Request) -> None:
    """Return when the client hangs up: after the body, the receive channel carries only that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class GroupStreamingResponse(StreamingResponse):
    """Server-sent events that close their request group however the response ends: finished, client gone
    (Starlette cancels the stream), or gone before the first byte (the stream never started)."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup) -> None:
        super().__init__(content, media_type="text/event-stream")
        self.group = group

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.close()
