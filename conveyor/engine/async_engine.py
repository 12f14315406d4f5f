"""AsyncLLM: the engine loop in one thread, one output stream per request, for the server.

The loop runs in a background thread of its own, or (`start_thread=False`) in whichever thread calls
`run()`: the server gives it the main thread, because torch's OpenMP parallel regions cost more to start
from any other thread (measured in docs/benchmarks.md, "W1 through the servers").
The engine is single-threaded. Adds and aborts reach it through a command queue that the loop drains
before every step, so they never race with a step and a new request joins the batch at the next step.
Outputs go back to each request's asyncio queue with `call_soon_threadsafe`: the loop never waits on a
client, and the event loop never waits on a step (torch releases the GIL inside its kernels).

No request can stop the loop: an add that raises fails that request alone, and a step that raises fails
the requests in flight (they shared the batch, so the culprit is unknown) and the loop goes on. Only a
failure of the loop itself ends `run()`, with `error` set; the server then exits so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from conveyor.engine.engine import LLMEngine
from conveyor.engine.stats import QueueStats, StepStats
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

StepObserver = Callable[[StepStats, list[RequestOutput]], None]
QueueObserver = Callable[[QueueStats], None]
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop is not running: nothing can be queued any more."""


class StepFailedError(RuntimeError):
    """An engine step raised while this request was in flight; the request is dropped."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class OutputStreams:
    """What AsyncLLM and EngineProcess share: a request's outputs read from its queue, the request
    aborted when its reader stops before the end."""

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str) -> AsyncIterator[RequestOutput]:
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        raise NotImplementedError

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        outputs = await self.add_request(prompt, params, request_id)
        async for output in outputs:
            yield output

    async def _iterate(self, request_id: str,
                       queue: asyncio.Queue[RequestOutput | BaseException]) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)


class AsyncLLM(OutputStreams):
    def __init__(self, engine: LLMEngine, log_interval: float = 5.0, observer: StepObserver | None = None,
                 start_thread: bool = True, queue_observer: QueueObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self.queue_observer = queue_observer  # told after adds and aborts, so gauges need not wait for a step
        self.log_interval = log_interval
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wakeup = threading.Event()
        self._stopping = False
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(target=self.run, name="conveyor-engine", daemon=True)
            self._thread.start()

    @property
    def is_alive(self) -> bool:
        running = self._thread.is_alive() if self._thread is not None else not self._stopping
        return running and self.error is None

    # ---- the caller's side (event loop) ---------------------------------------------------------

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str) -> AsyncIterator[RequestOutput]:
        """Queue a request and return its output stream. Invalid requests raise ValueError here, before
        anything streams; any other exception the engine raised while adding it is re-raised as is.
        Closing the stream early (cancelled, disconnected) aborts the request; a stream that is never
        iterated must be aborted by the caller."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        added: concurrent.futures.Future[None] = concurrent.futures.Future()
        # NOTE: stamped here, not when the engine thread drains the queue at the next step boundary: the
        # wait for the step under way is part of the request's TTFT (metrics, the dashboard, `tune`).
        self._send("add", (request_id, prompt, params, stream, added, time.monotonic()))
        await asyncio.wrap_future(added)  # raises the engine's ValueError for impossible requests
        return self._iterate(request_id, stream.queue)

    async def call(self, function: Callable[[LLMEngine], T]) -> T:
        """Run `function(engine)` in the engine thread between two steps and return its result."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._send("call", (function, done))
        return await asyncio.wrap_future(done)

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (a no-op once it finished, or once the loop is gone)."""
        if self.is_alive:
            self._send("abort", request_id)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the loop (after its current step); safe to call from any thread."""
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _send(self, command: str, payload: Any) -> None:
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        self._commands.put((command, payload))
        self._wakeup.set()

    # ---- the engine thread --------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop, in the calling thread, until `shutdown()` (or until the loop itself fails)."""
        log = _StatsLog(self.log_interval)
        try:
            while not self._stopping:
                if self._drain_commands():
                    self._observe_queue()
                if not self.engine.has_unfinished_requests():
                    self._wakeup.wait(timeout=1.0)
                    self._wakeup.clear()
                    continue
                try:
                    outputs, stats = self.engine.step()
                except Exception as error:
                    logger.exception("an engine step failed; failing the %d requests in flight",
                                     len(self._streams))
                    self._fail_in_flight(StepFailedError(f"the engine step failed: {error!r}"))
                    self._observe_queue()
                    continue
                for output in outputs:
                    self._deliver(output)
                if stats is not None:
                    if self.observer is not None:
                        self._observe(self.observer, stats, outputs)
                    log.add(stats)
        except BaseException as error:
            logger.exception("the engine loop failed")
            self.error = error
            dead = EngineDeadError(f"the engine loop failed: {error!r}")
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)
            self._fail_queued_adds(dead)

    def _observe_queue(self) -> None:
        if self.queue_observer is not None:
            self._observe(self.queue_observer, self.engine.queue_stats())

    @staticmethod
    def _observe(observer: Callable[..., None], *args: Any) -> None:
        try:
            observer(*args)
        except Exception:  # metrics are not worth the engine
            logger.exception("a step observer failed")

    def _drain_commands(self) -> int:
        """Handle every queued add and abort; return how many there were."""
        handled = 0
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return handled
            handled += 1
            if command == "add":
                self._add(*payload)
            elif command == "abort":
                self.engine.abort_request(payload)  # frees its KV blocks now
                self._streams.pop(payload, None)  # its consumer is gone
            elif command == "call":
                function, done = payload
                try:
                    done.set_result(function(self.engine))
                except Exception as error:
                    done.set_exception(error)

    def _add(self, request_id: str, prompt: str | list[int], params: SamplingParams, stream: _Stream,
             added: concurrent.futures.Future[None], arrival_time: float) -> None:
        try:
            self.engine.add_request(prompt, params, request_id=request_id, arrival_time=arrival_time)
        except ValueError as error:  # the engine's word for a request that can never run: nothing was added
            added.set_exception(error)
            return
        except Exception as error:
            logger.exception("adding request %s failed", request_id)
            self.engine.abort_request(request_id)  # in case it got as far as the scheduler
            added.set_exception(error)
            return
        self._streams[request_id] = stream
        added.set_result(None)

    def _fail_in_flight(self, error: Exception) -> None:
        for request_id, stream in list(self._streams.items()):
            self.engine.abort_request(request_id)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
        self._streams.clear()

    def _fail_queued_adds(self, error: Exception) -> None:
        while True:
            try:
                command, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if command in ("add", "call"):  # their callers wait on a future: tell them
                payload[-1].set_exception(error)

    def _deliver(self, output: RequestOutput) -> None:
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)
        except RuntimeError:  # the caller's event loop is gone
            self._streams.pop(output.request_id, None)


class _StatsLog:
    """The periodic log line while busy, summed from the steps' `StepStats`."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.started = time.monotonic()
        self.prompt_tokens = self.generation_tokens = self.preemptions = 0

    def add(self, stats: StepStats) -> None:
        self.prompt_tokens += stats.num_prompt_tokens
        self.generation_tokens += stats.num_generation_tokens
        self.preemptions += len(stats.preempted)
        elapsed = time.monotonic() - self.started
        if elapsed < self.interval:
            return
        logger.info("running: %d, waiting: %d, KV cache: %.1f%%, prompt: %.1f tok/s, generation: %.1f tok/s, "
                    "preemptions: %d", stats.num_running, stats.num_waiting, 100 * stats.kv_cache_usage,
                    self.prompt_tokens / elapsed, self.generation_tokens / elapsed, self.preemptions)
        self.started = time.monotonic()
        self.prompt_tokens = self.generation_tokens = self.preemptions = 0
