"""One engine replica: a conveyor engine with its own KV cache and prefix cache inside a Ray Serve replica.

The engine runs in a process of its own (`engine.engine_process.EngineProcess`), stepped on that
process's main thread: a Serve replica's main thread belongs to Ray's task loop and its event loop to
Serve, and off the main thread each of torch's OpenMP parallel regions costs more to start (measured in
docs/scaling.md, with the W1 comparison against `conveyor serve`). The replica's own work (streaming
outputs to the ingress, health checks, routing reports) stays in the actor, off the engine's GIL.

What the router needs (`record_routing_stats`, polled by Serve): the prefix cache's block hashes, the
queues and the KV usage, and the replica's Prometheus text for the ingress's `/metrics`. The metrics
live in the engine process, where the steps are observed; `_engine_setup` puts them there.

Faults: if the engine process dies, the requests in flight fail with EngineDeadError (the ingress sends
again those that had streamed nothing) and the replica ends itself, so Serve replaces it at once
(`check_health` also fails meanwhile). If the replica dies, its engine process sees the pipe close and exits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import generate_latest

from conveyor.config import EngineConfig
from conveyor.engine.async_engine import QueueObserver, StepObserver
from conveyor.engine.engine_process import EngineProcess
from conveyor.engine.stats import StepStats
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams
from conveyor.server.metrics import ServerMetrics
from conveyor.server.step_stream import StepStream

if TYPE_CHECKING:
    from conveyor.engine.engine import LLMEngine

T = TypeVar("T")
STEP_POLL_S = 0.25  # how often a dashboard viewer's stream asks the engine process for new steps
# While idle, a comment line this often: a stream whose viewer left ends at the next write, and until then
# Serve counts it among the replica's requests (the routers' load).
STEP_IDLE_PING_S = 1.0
logger = logging.getLogger(__name__)


class EngineReplica:
    """The body of the engine deployment (`app.build_app` wraps it with `serve.deployment`)."""

    def __init__(self, config: EngineConfig, model_name: str | None, log_interval: float = 5.0) -> None:
        from ray import cloudpickle  # the ingress's calls are lambdas: they reach the engine process so

        self.llm = EngineProcess(config, functools.partial(_engine_setup, model_name), log_interval,
                                 function_pickler=cloudpickle.dumps, on_exit=_end_replica)
        self._outboxes: dict[str, _Outbox] = {}  # a client's outputs not yet streamed to it

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str, client: str
                       ) -> AsyncIterator[str]:
        """Run a request whose outputs go to `client`'s stream (`outputs`): this call yields only this
        replica's id once the engine accepted it (the caller learns of a ValueError, an impossible
        request, before anything streams, as with a local AsyncLLM), and ends when the request does or
        raises its error. Serve cancels it when the caller goes, which aborts the request."""
        outputs = await self.llm.add_request(prompt, params, request_id, sink=self._outbox(client).push)
        yield replica_id()
        async for _ in outputs:  # only the last output comes this way; the rest go to the outbox
            pass

    async def outputs(self, client: str, target_replica: str | None = None) -> AsyncIterator[str | list[RequestOutput]]:
        """Every output of `client`'s requests on this replica, one item an engine step (all that step's
        outputs, trimmed: the client rebuilds them, see `outputs.OutputTrimmer`): per request and token,
        Serve's streaming costs the ingress and this replica ~2 ms of CPU (docs/scaling.md); per step it
        costs that once. The first item is this replica's id, as in
        `steps`. One stream a client (the ingress replica), open for as long as the client lives."""
        own = replica_id()
        yield own
        if target_replica is not None and target_replica != own:
            return
        outbox = self._outbox(client)
        try:
            while True:
                yield await outbox.take()
        finally:
            if self._outboxes.get(client) is outbox:
                del self._outboxes[client]

    def _outbox(self, client: str) -> _Outbox:
        outbox = self._outboxes.get(client)
        if outbox is None:
            outbox = self._outboxes[client] = _Outbox()
        return outbox

    async def call(self, function: Callable[[LLMEngine], T], target_replica: str | None = None
                   ) -> tuple[str, T | None]:
        """`(this replica's id, function(engine))`, run between two steps. `target_replica` is for the
        router (a broadcast); a call that reached another replica (a FIFO router may hand the replica it
        chose to an older request) runs nothing, and the caller sends it again."""
        own = replica_id()
        if target_replica is not None and target_replica != own:
            return own, None
        return own, await self.llm.call(function)

    async def info(self, target_replica: str | None = None) -> dict[str, Any]:
        """What the ingress needs to parse requests as this engine would: its resolved configuration."""
        return await self.llm.call(_describe) | {"pid": os.getpid(), "engine_pid": self.llm.pid,
                                                 "replica_id": replica_id()}

    async def steps(self, last_id: int | None, target_replica: str | None = None) -> AsyncIterator[str]:
        """The dashboard's step events of this replica (server-sent event text), polled from the engine
        process every `STEP_POLL_S` while the caller reads. The first item is this replica's id: a stream
        that reached another replica than `target_replica` ends there, and the caller asks again."""
        own = replica_id()
        yield own
        if target_replica is not None and target_replica != own:
            return
        quiet_since = time.monotonic()
        while True:
            text, last_id = await self.llm.call(functools.partial(_step_events, last_id))
            if text or time.monotonic() - quiet_since > STEP_IDLE_PING_S:
                quiet_since = time.monotonic()
                yield text or ": idle\n\n"  # a comment line: writing it is how the ingress learns the viewer left
            await asyncio.sleep(STEP_POLL_S)

    async def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve every `request_routing_stats_period_s`; what the routers and `/metrics` read."""
        return await self.llm.call(_routing_report) | {"reported_at": time.time(), "pid": os.getpid(),
                                                        "engine_pid": self.llm.pid}

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: here, one whose engine process has stopped."""
        if not self.llm.is_alive:
            raise RuntimeError(f"the engine process stopped: {self.llm.error!r}")

    def __del__(self) -> None:
        if hasattr(self, "llm"):
            self.llm.shutdown(timeout=1.0)


class _Outbox:
    """Outputs waiting for their client's stream, pushed a step at a time by the engine process's reader."""

    def __init__(self) -> None:
        self.pending: list[RequestOutput] = []
        self.ready = asyncio.Event()

    def push(self, outputs: list[RequestOutput]) -> None:
        self.pending += outputs
        self.ready.set()

    async def take(self) -> list[RequestOutput]:
        """Everything pushed since the last take, once there is something."""
        await self.ready.wait()
        self.ready.clear()
        taken, self.pending = self.pending, []
        return taken


def _end_replica(grace_s: float = 0.5) -> None:
    """The engine process died: end this replica too, once the failed requests' errors are on their way,
    so that Serve replaces it now (a dead actor) rather than after three failed health checks, and the
    routers stop sending it requests it can no longer run."""
    logger.error("the engine process died; ending replica %s in %.1f s", os.getpid(), grace_s)
    time.sleep(grace_s)
    os._exit(1)


def replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.to_full_id_str()


# ---- run in the engine process ------------------------------------------------------------------------

# The engine process's own (one engine a process), set up by `_engine_setup`.
_metrics: ServerMetrics | None = None
_steps = StepStream()  # records only while a dashboard polls (and `linger` s after)


def _engine_setup(model_name: str | None, engine: LLMEngine) -> tuple[StepObserver, QueueObserver]:
    global _metrics
    metrics = _metrics = ServerMetrics(model_name or Path(engine.model_path).stem)

    def observe_step(stats: StepStats, outputs: list[RequestOutput]) -> None:
        metrics.observe_step(stats, outputs)
        _steps.observe(stats, outputs)

    return observe_step, metrics.observe_queue


def _step_events(last_id: int | None, engine: LLMEngine) -> tuple[str, int | None]:
    from conveyor.distributed import replica  # the module's one ring (see _routing_report)

    return replica._steps.poll(last_id)


def _describe(engine: LLMEngine) -> dict[str, Any]:
    return {"config": engine.config, "model_config": engine.model_config, "max_model_len": engine.max_model_len,
            "model_path": engine.model_path, "sampling_defaults": engine.sampling_defaults,
            "eos_token_ids": engine.eos_token_ids}


def _routing_report(engine: LLMEngine) -> dict[str, Any]:
    # NOTE: the module's one `_metrics`, looked up by import: were this function shipped by value, its
    # globals would be a copy.
    from conveyor.distributed import replica

    metrics = replica._metrics
    queue = engine.queue_stats()
    return {"block_size": engine.config.block_size, "max_num_seqs": engine.config.max_num_seqs, **asdict(queue),
            "kv_cache_usage": queue.kv_cache_usage, "cached_block_hashes": engine.cached_block_hashes(),
            "metrics": generate_latest(metrics.registry).decode() if metrics is not None else ""}
