"""The hub behind `GET /v1/engine/steps`: the engine thread publishes every step, viewers read from the event loop.

The engine must never wait for a viewer. Each step becomes one server-sent event (its id is the step index),
written once into a ring of the last `capacity` steps under a lock held for an append; each viewer keeps
its own cursor, the id of the last event it sent. A viewer's backlog is therefore bounded by the ring: one
that stalls or falls behind loses its oldest unsent steps, and the engine's cost per step is one event
whatever the number of viewers. Viewers poll the ring every `flush_interval` seconds, so fast steps reach
them in batches and the engine thread never wakes the event loop.

While nobody watches, `observe` returns at once. It goes on recording for `linger` seconds after the last
viewer leaves, so a viewer that reconnects with `Last-Event-ID` resumes without a gap.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from conveyor.engine.stats import StepStats
from conveyor.engine.timeline import step_cells
from conveyor.outputs import RequestOutput

KEEP_ALIVE_SECONDS = 15.0  # a comment line while idle, so proxies keep the connection


@dataclass(frozen=True)
class StepEvent:
    step_index: int
    text: str  # the whole server-sent event, ready to write


class StepStream:
    def __init__(self, capacity: int = 1000, backlog: int = 200, flush_interval: float = 0.1,
                 linger: float = 30.0) -> None:
        self.backlog = backlog  # what a new viewer (no Last-Event-ID) gets first: the dashboard's window
        self.flush_interval = flush_interval
        self.linger = linger
        self._ring: deque[StepEvent] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._num_viewers = 0
        self._newest_step = -1
        self._recording_until = 0.0  # monotonic; while viewers are connected it does not matter

    # ---- the engine thread --------------------------------------------------------------------

    def observe(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
        """The engine's step observer: cheap, never blocks beyond an append."""
        self._newest_step = stats.step_index
        if self._num_viewers == 0 and time.monotonic() > self._recording_until:
            return
        text = f"id: {stats.step_index}\ndata: {json.dumps(step_payload(stats, outputs))}\n\n"
        with self._lock:
            self._ring.append(StepEvent(stats.step_index, text))

    # ---- the event loop -----------------------------------------------------------------------

    def events_after(self, last_id: int | None) -> list[StepEvent]:
        """The recorded events newer than `last_id` (all of them for None), oldest first."""
        newer = []
        with self._lock:  # from the newest back: the lock is held for the few new events only
            for event in reversed(self._ring):
                if last_id is not None and event.step_index <= last_id:
                    break
                newer.append(event)
        newer.reverse()
        return newer

    def poll(self, last_id: int | None) -> tuple[str, int | None]:
        """One visit of a viewer that polls from elsewhere (a Serve replica's dashboard, through the ingress):
        the events after `last_id` (the last `backlog` for None, or for an id this engine never reached)
        as one text, and the id to ask after next time. Recording goes on for `linger` s after each visit."""
        with self.viewer():
            if last_id is not None and last_id > self._newest_step:
                last_id = None
            events = self.events_after(last_id)
        if last_id is None:
            events = events[-self.backlog:]
        return "".join(event.text for event in events), events[-1].step_index if events else last_id

    @contextmanager
    def viewer(self) -> Iterator[None]:
        with self._lock:
            self._num_viewers += 1
        try:
            yield
        finally:
            with self._lock:
                self._num_viewers -= 1
                self._recording_until = time.monotonic() + self.linger

    async def stream(self, last_id: int | None) -> AsyncIterator[str]:
        """One viewer's server-sent events, from the step after `last_id` (or the last `backlog` steps), until
        the client goes away."""
        with self.viewer():
            if last_id is not None and last_id > self._newest_step:
                last_id = None  # an id from before this server started: it counts steps from 0 again
            if last_id is None:
                recorded = self.events_after(None)
                if len(recorded) > self.backlog:
                    last_id = recorded[-self.backlog - 1].step_index
            quiet_since = time.monotonic()
            while True:
                events = self.events_after(last_id)
                if events:
                    last_id = events[-1].step_index
                    quiet_since = time.monotonic()
                    yield "".join(event.text for event in events)
                elif time.monotonic() - quiet_since > KEEP_ALIVE_SECONDS:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(self.flush_interval)


def step_payload(stats: StepStats, outputs: list[RequestOutput]) -> dict[str, Any]:
    """One step as the dashboard reads it. Times are the engine's monotonic seconds: the page subtracts
    them from `time` (the step's end), never from its own clock."""
    return {
        "step": stats.step_index, "time": stats.start_time + stats.duration, "duration": stats.duration,
        "forward": stats.forward_seconds, "sample": stats.sample_seconds, "overhead": stats.overhead_seconds,
        "tokens": stats.num_tokens, "prompt_tokens": stats.num_prompt_tokens,
        "generation_tokens": stats.num_generation_tokens, "requests": len(stats.scheduled),
        "running": stats.num_running, "waiting": stats.num_waiting,
        "kv": {"used": stats.kv_blocks_used, "cached": stats.kv_blocks_cached, "free": stats.kv_blocks_free,
               "total": stats.kv_blocks_total},
        "cells": step_cells(stats), "finished": stats.finished,
        # each scheduled row's shape, [start, new tokens, samples], in batch order: what `conveyor tune` prices
        "rows": [[e.start, e.num_tokens, e.samples] for e in stats.scheduled],
        "updates": [_request_update(output) for output in outputs],
    }


def _request_update(output: RequestOutput) -> dict[str, Any]:
    """What the request tables show, taken from an output now: its token lists grow after this step."""
    completion = output.outputs[0]
    metrics = output.metrics
    return {
        "id": output.request_id, "prompt_tokens": len(output.prompt_token_ids),
        "generated_tokens": len(completion.token_ids),
        # per-request prefix-cache hits, once prefix caching reports them on the output
        "cached_tokens": getattr(output, "num_cached_tokens", 0),
        "arrival": metrics.arrival_time if metrics else None,
        "first_token": metrics.first_token_time if metrics else None,
        "finished": metrics.finished_time if metrics else None,
        "preemptions": metrics.num_preemptions if metrics else 0,
        "finish_reason": completion.finish_reason,
    }
