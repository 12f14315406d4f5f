"""One engine replica: a conveyor engine with its own KV cache and prefix cache inside a Ray Serve replica.

The engine loop runs in a thread of its own (a Serve replica's main thread belongs to Ray's task loop
and its event loop to Serve), and the engine is built in that same thread, so that one thread of the
process starts torch's OpenMP teams, as in `conveyor serve`. Off the main thread, small parallel ops
were measured slower there (docs/scaling.md); with one torch thread per replica (how replicas share a
machine) no team is started at all.

What the router needs (`record_routing_stats`, polled by Serve): the prefix cache's block hashes, the
queues and the KV usage, and the replica's Prometheus text for the ingress's `/metrics`.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import generate_latest

from conveyor.config import EngineConfig
from conveyor.engine.async_engine import AsyncLLM
from conveyor.engine.engine import LLMEngine
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams
from conveyor.server.metrics import ServerMetrics

T = TypeVar("T")


class EngineReplica:
    """The body of the engine deployment (`app.build_app` wraps it with `serve.deployment`)."""

    def __init__(self, config: EngineConfig, model_name: str | None, log_interval: float = 5.0) -> None:
        ready: concurrent.futures.Future[tuple[AsyncLLM, ServerMetrics]] = concurrent.futures.Future()

        def engine_thread() -> None:
            # The engine is built in the thread that steps it: see the module's docstring.
            try:
                engine = LLMEngine(config)
                metrics = ServerMetrics(model_name or Path(engine.model_path).stem)
                llm = AsyncLLM(engine, log_interval=log_interval, observer=metrics.observe_step,
                               queue_observer=metrics.observe_queue, start_thread=False)
            except BaseException as error:
                ready.set_exception(error)
                return
            ready.set_result((llm, metrics))
            llm.run()

        threading.Thread(target=engine_thread, name="conveyor-engine", daemon=True).start()
        self.llm, self.metrics = ready.result()
        self.engine = self.llm.engine

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str
                       ) -> AsyncIterator[RequestOutput | None]:
        """Stream a request's outputs, after a first `None` that says it was accepted: the caller learns
        of a ValueError (an impossible request) before anything streams, as with a local AsyncLLM.
        Serve cancels this generator when the caller goes, which aborts the request."""
        outputs = await self.llm.add_request(prompt, params, request_id)
        yield None
        async for output in outputs:
            yield output

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
        return {"config": self.engine.config, "model_config": self.engine.model_config,
                "max_model_len": self.engine.max_model_len, "model_path": self.engine.model_path,
                "sampling_defaults": self.engine.sampling_defaults, "eos_token_ids": self.engine.eos_token_ids,
                "pid": os.getpid(), "replica_id": replica_id()}

    async def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve every `request_routing_stats_period_s`; what the routers and `/metrics` read."""
        queue, hashes = await self.llm.call(lambda engine: (engine.queue_stats(), engine.cached_block_hashes()))
        return {"reported_at": time.time(), "pid": os.getpid(), "block_size": self.engine.config.block_size,
                "max_num_seqs": self.engine.config.max_num_seqs, **asdict(queue),
                "kv_cache_usage": queue.kv_cache_usage, "cached_block_hashes": hashes,
                "metrics": generate_latest(self.metrics.registry).decode()}

    def check_health(self) -> None:
        """Serve replaces a replica whose check raises: here, one whose engine loop has stopped."""
        if not self.llm.is_alive:
            raise RuntimeError(f"the engine loop stopped: {self.llm.error!r}")

    def __del__(self) -> None:
        self.llm.shutdown(timeout=1.0)


def replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.to_full_id_str()
