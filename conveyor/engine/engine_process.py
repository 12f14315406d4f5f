"""EngineProcess: the engine loop in a process of its own, on that process's main thread, behind the
interface the serving layer uses of an AsyncLLM (add_request, abort, call, is_alive, error, shutdown).

Why a process: torch's OpenMP parallel regions cost ~40 µs more to start from any thread but the main one
(docs/benchmarks.md, "W1 through the servers"), and a host that owns its main thread (a Ray Serve replica)
can only offer the engine a thread; a second process also keeps the host's own Python work (streaming,
health checks, routing reports) off the engine's GIL. `conveyor serve` does not need it: it gives the
engine loop its main thread already.

Only plain values cross the pipe: commands in (add, abort, call, stop), and back one message per step
with every output of that step, each trimmed to what changed since the request's previous output
(`outputs.OutputTrimmer`: the new tokens and text, not the prompt and everything so far again). `call`
ships a function to run on the engine between two steps; the host picks how functions are pickled
(`function_pickler`: Ray's cloudpickle for lambdas). The child exits when the pipe closes, so it never
outlives its host; if it dies, every request in flight fails with `EngineDeadError` and `is_alive` turns
false, for the host's health check.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.config import EngineConfig
from conveyor.engine.async_engine import (
    EngineDeadError,
    OutputStreams,
    QueueObserver,
    StepFailedError,
    StepObserver,
)
from conveyor.outputs import OutputRebuilder, OutputTrimmer, RequestOutput
from conveyor.sampling_params import SamplingParams

if TYPE_CHECKING:
    from conveyor.engine.engine import LLMEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Run in the child once the engine is built: the step and queue observers it should call (metrics...).
EngineSetup = Callable[["LLMEngine"], tuple[StepObserver | None, QueueObserver | None]]
# Takes one step's outputs of the requests added with it, in one call on the caller's event loop; they
# come trimmed (`OutputTrimmer`): what a sink passes on, a reader makes whole with an `OutputRebuilder`.
OutputSink = Callable[[list[RequestOutput]], None]


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]
    added: asyncio.Future[None]
    sink: OutputSink | None = None
    rebuilder: OutputRebuilder | None = None  # without a sink: whole outputs, as AsyncLLM gives them


class EngineProcess(OutputStreams):
    """The host's side. Starting it builds the engine in the child and waits until it is ready (raising
    the child's error if it failed); `start_timeout` bounds the wait. `on_exit` is called after the
    child died unasked and every request in flight was failed."""

    def __init__(self, config: EngineConfig, setup: EngineSetup | None = None, log_interval: float = 5.0,
                 function_pickler: Callable[[Any], bytes] = pickle.dumps, start_timeout: float = 600.0,
                 on_exit: Callable[[], None] | None = None) -> None:
        self.function_pickler = function_pickler
        self.on_exit = on_exit  # called (in the reader thread) when the child exits without being asked
        ours, theirs = socket.socketpair()
        # The child imports this very conveyor, wherever the host found it.
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        if config.num_threads:  # OpenMP sizes its pool from this before torch.set_num_threads runs
            env["OMP_NUM_THREADS"] = str(config.num_threads)
        self.process = subprocess.Popen([sys.executable, "-m", "conveyor.engine.engine_process", str(theirs.fileno())],
                                        pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._conn = Connection(ours.detach())
        self._send_lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]] = {}
        self._call_ids = itertools.count()
        self.error: BaseException | None = None
        self._closed = False
        try:
            self._conn.send(("setup", config, setup, log_interval))
            if not self._conn.poll(start_timeout):
                raise TimeoutError(f"the engine process was not ready after {start_timeout:.0f} s")
            kind, error = self._conn.recv()
        except BaseException as exc:
            self._kill()
            if isinstance(exc, EOFError):
                raise EngineDeadError(f"the engine process exited while starting ({self._exit()})") from None
            raise
        if kind != "ready":
            self._kill()
            raise error
        self._reader = threading.Thread(target=self._read, name="conveyor-engine-pipe", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def is_alive(self) -> bool:
        return self.error is None and self.process.poll() is None

    # ---- the caller's side (event loop) ---------------------------------------------------------

    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                          sink: OutputSink | None = None) -> AsyncIterator[RequestOutput]:
        """As AsyncLLM.add_request: ValueError here for impossible requests; closing the stream early aborts.
        With a `sink`, every output goes to it, trimmed, a step's outputs of all the requests sharing the
        sink in one call, and the request's own stream yields only the last one, trimmed too (or raises
        its error)."""
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue(), loop.create_future(), sink,
                         None if sink is not None else OutputRebuilder())
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        self._streams[request_id] = stream
        try:
            # stamped here: the wait for the engine's step under way counts in the request's TTFT
            # (CLOCK_MONOTONIC is one clock for both processes)
            self._send(("add", request_id, prompt, params, time.monotonic()))
            await stream.added
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return self._iterate(request_id, stream.queue)

    async def call(self, function: Callable[[LLMEngine], T]) -> T:
        """Run `function(engine)` in the engine process between two steps and return its result."""
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        self._calls[call_id] = (loop, done)
        try:
            self._send(("call", call_id, self.function_pickler(function)))
            return await done
        finally:
            self._calls.pop(call_id, None)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        if self.is_alive:
            try:
                self._send(("abort", request_id))
            except EngineDeadError:
                pass

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the engine process (after its current step); safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            self._send(("stop",))
            self.process.wait(timeout)
        except (EngineDeadError, subprocess.TimeoutExpired):
            pass
        self._kill()

    def _send(self, message: tuple[Any, ...]) -> None:
        if not self.is_alive:
            raise EngineDeadError(f"the engine process is not running ({self._exit()})")
        try:
            with self._send_lock:
                self._conn.send(message)
        except OSError as error:
            raise EngineDeadError(f"the engine process is not running ({error!r})") from None

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._conn.close()

    def _exit(self) -> str:
        code = self.process.poll()
        return "still running" if code is None else f"exit code {code}"

    # ---- the reader thread ----------------------------------------------------------------------

    def _read(self) -> None:
        """Hand each message from the child to the event loop that waits for it, until the pipe closes."""
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "outputs":
                    self._deliver_step(message[1])
                elif kind == "added":
                    _, request_id, error = message
                    stream = self._streams.get(request_id)
                    if stream is not None:
                        _resolve(stream.loop, stream.added, None, error)
                elif kind == "failed":  # a step raised: these requests shared it
                    _, request_ids, text = message
                    for request_id in request_ids:
                        self._deliver(request_id, StepFailedError(text))
                elif kind == "result":
                    _, call_id, value, error = message
                    if call_id in self._calls:
                        _resolve(*self._calls[call_id], value, error)
        except (EOFError, OSError):
            pass
        except BaseException as error:  # a message we could not read: the pipe can no longer be trusted
            logger.exception("reading from the engine process failed")
            self.error = error
        self.process.wait()
        if self.error is None:
            self.error = EngineDeadError(f"the engine process exited ({self._exit()})")
        if not self._closed:
            logger.error("the engine process %d exited (%s)", self.pid, self._exit())
        dead = EngineDeadError(f"the engine process died ({self._exit()})")
        for request_id, stream in list(self._streams.items()):
            if not stream.added.done():
                _resolve(stream.loop, stream.added, None, dead)
            self._deliver(request_id, dead)
        for loop, done in list(self._calls.values()):
            _resolve(loop, done, None, dead)
        if not self._closed and self.on_exit is not None:
            self.on_exit()

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs: each to its request's stream, or, for requests added with a sink, all of them
        to their sink at once (and the last output of each to its stream, which ends there)."""
        batches: dict[OutputSink, tuple[asyncio.AbstractEventLoop, list[RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None and stream.sink is not None:
                batches.setdefault(stream.sink, (stream.loop, []))[1].append(output)
        for sink, (loop, batch) in batches.items():  # first: a stream's end comes after its last output
            try:
                loop.call_soon_threadsafe(sink, batch)
            except RuntimeError:  # the caller's event loop is gone
                pass
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if stream.rebuilder is not None:
                self._deliver(output.request_id, stream.rebuilder.rebuild(output))
            elif output.finished:
                self._deliver(output.request_id, output)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(request_id, None)
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is gone
            self._streams.pop(request_id, None)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], value: Any,
             error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass


# ---- the child: python -m conveyor.engine.engine_process FD --------------------------------------------


def _engine_main(conn: Connection) -> None:
    """Build the engine, say ready, then step it on this (the main) thread, reading commands between steps."""
    from conveyor.engine.async_engine import _StatsLog
    from conveyor.engine.engine import LLMEngine

    _, config, setup, log_interval = conn.recv()
    try:
        engine = LLMEngine(config)
        observer, queue_observer = setup(engine) if setup is not None else (None, None)
    except BaseException as error:
        conn.send(("failed_to_start", _picklable(error)))
        raise
    conn.send(("ready", None))
    log = _StatsLog(log_interval)
    in_flight: set[str] = set()
    trimmers: dict[str, OutputTrimmer] = {}  # a request's, from its first output to its last

    def observe(function: Callable[..., None] | None, *args: Any) -> None:
        if function is None:
            return
        try:
            function(*args)
        except Exception:  # metrics are not worth the engine
            logger.exception("an engine observer failed")

    while True:
        idle = not engine.has_unfinished_requests()
        if conn.poll(1.0 if idle else 0):  # also true at EOF: recv raises it and the process ends
            while conn.poll(0):
                message = conn.recv()
                if message[0] == "stop":
                    return
                _handle(engine, conn, message, in_flight, trimmers)
            observe(queue_observer, engine.queue_stats())
            continue
        if idle:
            continue
        try:
            outputs, stats = engine.step()
        except Exception as error:
            logger.exception("an engine step failed; failing the %d requests in flight", len(in_flight))
            for request_id in in_flight:
                engine.abort_request(request_id)
            conn.send(("failed", sorted(in_flight), f"the engine step failed: {error!r}"))
            in_flight.clear()
            trimmers.clear()
            observe(queue_observer, engine.queue_stats())
            continue
        for output in outputs:
            if output.finished:
                in_flight.discard(output.request_id)
        if outputs:
            conn.send(("outputs", [_trim(output, trimmers) for output in outputs]))
        if stats is not None:
            observe(observer, stats, outputs)
            log.add(stats)


def _trim(output: RequestOutput, trimmers: dict[str, OutputTrimmer]) -> RequestOutput:
    """The output as it crosses the pipe; a finished request's trimmer goes with its last output."""
    if output.finished:
        trimmer = trimmers.pop(output.request_id, None) or OutputTrimmer()
    else:
        trimmer = trimmers.get(output.request_id) or trimmers.setdefault(output.request_id, OutputTrimmer())
    return trimmer.trim(output)


def _handle(engine: LLMEngine, conn: Connection, message: tuple[Any, ...], in_flight: set[str],
            trimmers: dict[str, OutputTrimmer]) -> None:
    kind = message[0]
    if kind == "add":
        _, request_id, prompt, params, arrival_time = message
        try:
            engine.add_request(prompt, params, request_id=request_id, arrival_time=arrival_time)
        except ValueError as error:  # the engine's word for a request that can never run: nothing was added
            conn.send(("added", request_id, error))
            return
        except Exception as error:
            logger.exception("adding request %s failed", request_id)
            engine.abort_request(request_id)
            conn.send(("added", request_id, _picklable(error)))
            return
        in_flight.add(request_id)
        conn.send(("added", request_id, None))
    elif kind == "abort":
        engine.abort_request(message[1])  # frees its KV blocks now
        in_flight.discard(message[1])
        trimmers.pop(message[1], None)
    elif kind == "call":
        _, call_id, function = message
        try:
            value = pickle.loads(function)(engine)
        except Exception as error:
            conn.send(("result", call_id, None, _picklable(error)))
            return
        try:  # pickling fails before anything is written
            conn.send(("result", call_id, value, None))
        except (pickle.PicklingError, TypeError, AttributeError) as error:
            conn.send(("result", call_id, None, RuntimeError(f"the call's result cannot be sent: {error!r}")))


def _picklable(error: BaseException) -> BaseException:
    """The error itself if it crosses the pipe, else a RuntimeError carrying its repr."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(repr(error))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-process: %(message)s")
    try:
        _engine_main(Connection(int(sys.argv[1])))
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the host is gone: so is its engine
        pass
