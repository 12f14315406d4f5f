"""The ingress: conveyor's own FastAPI app (`server.app.build_app`: same routes, errors and streaming) over
`ReplicaPool`, which stands in for the AsyncLLM and sends each engine request to a replica through a
Serve handle (and so through the deployment's request router).

Outputs do not come back on each request's own call: every replica keeps one stream to this pool
(`EngineReplica.outputs`) carrying, one item an engine step, that step's outputs of all the pool's
requests there, which the pool hands to each request's queue. Those outputs come trimmed to what each
request got in that step (`outputs.OutputTrimmer`, in the engine process); each request makes its own
whole again (`OutputRebuilder`) for the HTTP layer, which reads them as a local engine's. A request's own
call yields once (the replica's id, when its engine accepted it) and then only ends or fails. Serve's
streaming is paid per step, not per request and token, and the call still counts as the request's load
on its replica for the routers, and cancelling it still aborts the request.

Faults: a replica that dies while a request waits for its first output is not the client's problem: the
request is sent again (the router has dropped the dead replica, or learns it now). Once an output has
been handed on, the request cannot be resumed elsewhere: it fails with `ReplicaDiedError` (a 503 before
the response started; an error event in a stream that had). Serve replaces the dead replica meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Header
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.context import _RequestContext, _serve_request_context
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from conveyor.config import EngineConfig, ModelConfig
from conveyor.distributed.router import ROUTERS
from conveyor.engine.async_engine import EngineDeadError
from conveyor.engine.engine import LLMEngine
from conveyor.engine.structured_output import GrammarCompiler
from conveyor.outputs import OutputRebuilder, RequestOutput
from conveyor.sampling_params import SamplingParams
from conveyor.server.app import build_app
from conveyor.server.dashboard import (
    dashboard_page_router,
    engine_description,
    parse_last_event_id,
    step_response,
)
from conveyor.server.errors import APIError
from conveyor.server.serving import ServerSettings
from conveyor.server.step_stream import StepStream
from conveyor.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")
_REPLICA_GONE = (RayActorError, ActorUnavailableError)
_HEALTH_KEYS = ("pid", "engine_pid", "num_running", "num_waiting", "kv_cache_usage", "reported_at")


class ReplicaDiedError(EngineDeadError):
    """The replica running a request died after part of its output was sent: it cannot be resumed."""


@dataclasses.dataclass
class EngineFacts:
    """What the HTTP layer reads of an engine (`llm.engine`), known in the ingress without a model."""

    config: EngineConfig  # max_num_seqs is the seats of every replica together: admission's limit
    replica_config: EngineConfig  # one replica's, as it reported it
    model_path: str
    model_config: ModelConfig
    max_model_len: int
    tokenizer: Tokenizer
    sampling_defaults: dict[str, Any]  # the model's generation_config, as the replicas apply it
    grammar: GrammarCompiler  # compiles constraints here too: a bad one is a 400 before any replica sees it


class ReplicaPool:
    """The AsyncLLM interface the serving layer uses (add_request, abort, call, is_alive, engine), over
    the engine deployment's replicas."""

    def __init__(self, handle: DeploymentHandle, facts: EngineFacts, num_replicas: int,
                 max_attempts: int = 4, retry_backoff_s: float = 0.5) -> None:
        self.handle = handle
        self.engine = facts
        self.num_replicas = num_replicas  # the target; Serve keeps it so
        self.max_attempts = max_attempts
        self.retry_backoff_s = retry_backoff_s
        self.client_id = uuid.uuid4().hex  # names this pool's output stream on each replica
        self._queues: dict[str, asyncio.Queue[RequestOutput | _Failure]] = {}  # request id -> its outputs
        self._placed: dict[str, _Placement] = {}  # request id -> where it runs now
        self._streams: dict[str, asyncio.Task[None]] = {}  # replica -> the task reading its outputs to us

    @property
    def replicas(self) -> dict[str, dict[str, Any]]:
        """The live replicas this process routes to, with what each last reported."""
        router = ROUTERS.get(self.handle.deployment_name)
        if router is None:
            return {}
        return {r.replica_id.unique_id: r.routing_stats for r in router.curr_replicas.values()}

    @property
    def is_alive(self) -> bool:
        return bool(self.replicas)

    def health(self) -> tuple[bool, dict[str, Any]]:
        replicas = self.replicas
        status = "ok" if len(replicas) >= self.num_replicas else ("degraded" if replicas else "no replicas")
        details = {replica: {key: stats.get(key) for key in _HEALTH_KEYS} | {
                       "cached_blocks": len(stats.get("cached_block_hashes", ()))}
                   for replica, stats in sorted(replicas.items())}
        return bool(replicas), {"status": status, "replicas": len(replicas), "target_replicas": self.num_replicas,
                                "replica": details}

    async def add_request(self, prompt: str | list[int], params: SamplingParams,
                          request_id: str) -> AsyncIterator[RequestOutput]:
        # Token ids, so that the router can match the prompt's blocks (as LLMEngine.add_request encodes).
        prompt_ids = self.engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._queues[request_id] = asyncio.Queue()  # before sending: outputs may come before the acceptance
        try:
            await self._open(prompt_ids, params, request_id)
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        return self._iterate(prompt_ids, params, request_id)

    async def _open(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> None:
        """Send the request until a replica accepts it; raise ValueError for what no engine can run. Its
        outputs then come on that replica's stream to this pool (`_subscribe`); its own call only ends, or
        fails (`_watch`)."""
        for attempt in range(self.max_attempts):
            with _own_request_context():
                generator = self.handle.options(stream=True).generate.remote(prompt_ids, params, request_id,
                                                                           self.client_id)
            try:
                replica = await generator.__anext__()  # the replica's id, once its engine accepted the request
            except RayTaskError as error:
                if isinstance(error.cause, ValueError):
                    raise ValueError(str(error.cause)) from None
                if not _engine_died(error):
                    raise
                logger.warning("request %s: its replica's engine died before accepting it (%s); sending it again",
                               request_id, error.cause)
                await asyncio.sleep(self.retry_backoff_s * (attempt + 1))
                continue
            except _REPLICA_GONE as error:
                logger.warning("request %s: its replica died before accepting it (%r); sending it again",
                               request_id, error)
                await asyncio.sleep(self.retry_backoff_s * (attempt + 1))
                continue
            self._subscribe(replica)
            self._placed[request_id] = _Placement(request_id, replica, generator, asyncio.create_task(
                self._watch(generator, replica, self._queues[request_id])))
            return
        raise EngineDeadError(f"no engine replica accepted request {request_id} in {self.max_attempts} attempts")

    @staticmethod
    async def _watch(generator: DeploymentResponseGenerator, replica: str, queue: asyncio.Queue[Any]) -> None:
        """A request's own call ends when the request does; if it fails instead, the request learns why."""
        try:
            async for _ in generator:
                pass
        except (*_REPLICA_GONE, RayTaskError) as error:
            queue.put_nowait(_Failure(replica, error))

    def _subscribe(self, replica: str) -> None:
        """Read `replica`'s stream of outputs to this pool, unless that is being done already."""
        task = self._streams.get(replica)
        if task is None or task.done():
            for gone in [r for r, t in self._streams.items() if t.done()]:  # replicas that died
                del self._streams[gone]
            self._streams[replica] = asyncio.create_task(self._read_outputs(replica))

    async def _read_outputs(self, replica: str) -> None:
        """Hand each output on `replica`'s stream to its request; if the stream fails (the replica died),
        fail the requests placed there."""
        _serve_request_context.set(_RequestContext(_internal_request_id=uuid.uuid4().hex))  # no HTTP request's
        generator = None
        try:
            for _ in range(self.max_attempts):
                generator = self.handle.options(stream=True).outputs.remote(self.client_id, target_replica=replica)
                if await generator.__anext__() == replica:
                    break
                generator.cancel()  # it reached another replica: ask again
            else:
                raise RuntimeError(f"could not open the output stream of replica {replica}")
            async for outputs in generator:
                for output in outputs:
                    queue = self._queues.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
            raise RuntimeError(f"the output stream of replica {replica} ended")
        except Exception as error:
            for placement in list(self._placed.values()):
                if placement.replica == replica:
                    queue = self._queues.get(placement.request_id)
                    if queue is not None:
                        queue.put_nowait(_Failure(replica, error))
        finally:
            if generator is not None:
                generator.cancel()

    async def _iterate(self, prompt_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        queue = self._queues[request_id]
        rebuilder = OutputRebuilder()
        handed_on = finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Failure):
                    placement = self._placed.get(request_id)
                    if placement is None or item.replica != placement.replica:
                        continue  # news of an earlier attempt's replica
                    error = item.error
                    if isinstance(error, RayTaskError) and not _engine_died(error):
                        raise error
                    if handed_on:
                        raise ReplicaDiedError(
                            f"the engine replica running request {request_id} died after part of the output "
                            f"was sent; it cannot be resumed, send it again ({type(error).__name__})") from None
                    logger.warning("request %s: its replica died before the first output; sending it again",
                                   request_id)
                    self._forget(request_id, cancel=True)
                    await self._open(prompt_ids, params, request_id)
                    continue
                handed_on = True
                yield rebuilder.rebuild(item)
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(request_id, None)
            self._forget(request_id, cancel=not finished)  # Serve cancels the replica's call: the request aborts

    def _forget(self, request_id: str, cancel: bool) -> None:
        placement = self._placed.pop(request_id, None)
        if placement is not None and cancel:
            placement.watcher.cancel()
            placement.generator.cancel()

    def abort(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._forget(request_id, cancel=True)

    async def call(self, function: Callable[[LLMEngine], T]) -> list[T]:
        """`function(engine)` on every live replica; their results, one a replica."""
        results = []
        for target in list(self.replicas_full_ids()):
            for _ in range(self.max_attempts):
                reached, result = await self.handle.call.remote(function, target_replica=target)
                if reached == target:
                    results.append(result)
                    break
        return results

    def replica_ids(self) -> dict[str, str]:
        """The live replicas: the id `/health` shows -> the full id a call targets."""
        router = ROUTERS.get(self.handle.deployment_name)
        return {} if router is None else {r.unique_id: r.to_full_id_str() for r in router.curr_replicas}

    async def step_events(self, target: str, last_id: int | None) -> AsyncIterator[str]:
        """One replica's dashboard step events, for as long as the client reads."""
        for _ in range(self.max_attempts):
            generator = self.handle.options(stream=True).steps.remote(last_id, target_replica=target)
            try:
                if await generator.__anext__() != target:  # it reached another replica: ask again
                    continue
                async for text in generator:
                    yield text
                return
            except _REPLICA_GONE:
                return  # the page reconnects and learns the live replicas again
            finally:
                generator.cancel()

    def replicas_full_ids(self) -> Iterator[str]:
        router = ROUTERS.get(self.handle.deployment_name)
        if router is not None:
            yield from (replica_id.to_full_id_str() for replica_id in router.curr_replicas)


@dataclasses.dataclass
class _Placement:
    request_id: str
    replica: str
    generator: DeploymentResponseGenerator  # the request's own call: cancelling it aborts the request
    watcher: asyncio.Task[None]


@dataclasses.dataclass
class _Failure:
    replica: str  # where the request ran: a failure reported for another attempt's replica is old news
    error: BaseException


@contextlib.contextmanager
def _own_request_context() -> Iterator[None]:
    """Handle calls made meanwhile get an internal request id of their own.

    NOTE: Serve tags every handle call made while serving one HTTP request with that request's internal
    id, and its router indexes the calls it is placing by that id: the n engine requests of an n > 1
    request, placed at once, overwrite each other there and one can wait forever (seen with Ray 2.60)."""
    context = _serve_request_context.get() or _RequestContext()
    token = _serve_request_context.set(dataclasses.replace(context, _internal_request_id=uuid.uuid4().hex))
    try:
        yield
    finally:
        _serve_request_context.reset(token)


def _engine_died(error: RayTaskError) -> bool:
    """The replica is up but its engine process died (the replica ends itself and Serve replaces it)."""
    return isinstance(error.cause, EngineDeadError)


class ReplicaMetrics:
    """`/metrics` across replicas: each replica's own families (from its last report), labelled `replica`,
    and the number of live replicas. Serve polls the reports every `request_routing_stats_period_s`."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self.registry = CollectorRegistry()
        self.registry.register(self)  # type: ignore[arg-type]

    def collect(self) -> Iterator[Metric]:
        replicas = self.pool.replicas
        live = GaugeMetricFamily("conveyor:replicas", "Engine replicas the ingress routes to")
        live.add_metric([], len(replicas))
        yield live
        families: dict[str, Metric] = {}
        for replica, stats in sorted(replicas.items()):
            for family in text_string_to_metric_families(stats.get("metrics", "")):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": replica}, sample.value,
                                      sample.timestamp)
        yield from families.values()


async def build_ingress_app(handle: DeploymentHandle, settings: ServerSettings, num_replicas: int) -> Any:
    """The FastAPI app of the ingress, once a replica has said how its engine is configured."""
    info = await handle.info.remote()
    config: EngineConfig = info["config"]
    assert config.tokenizer is not None
    tokenizer = load_tokenizer(config.tokenizer, chat_template=config.chat_template)
    if not settings.model_name:  # as `conveyor serve` names it
        settings = dataclasses.replace(settings, model_name=Path(info["model_path"]).stem)
    seats = dataclasses.replace(config, max_num_seqs=config.max_num_seqs * num_replicas)
    grammar = GrammarCompiler(tokenizer, info["model_config"].vocab_size, info["eos_token_ids"])
    facts = EngineFacts(seats, config, info["model_path"], info["model_config"], info["max_model_len"], tokenizer,
                        info["sampling_defaults"], grammar)
    pool = ReplicaPool(handle, facts, num_replicas)
    app = build_app(pool, settings, ReplicaMetrics(pool), health=pool.health)  # type: ignore[arg-type]
    app.include_router(replica_dashboard_router(pool, settings.model_name, bool(settings.guard.api_key)))
    return app


def replica_dashboard_router(pool: ReplicaPool, model_name: str, requires_key: bool) -> APIRouter:
    """`conveyor serve`'s dashboard, one replica at a time: `/v1/engine/config` lists the live replicas
    (`replicas`, by the ids `/health` uses) and `/v1/engine/steps?replica=ID` streams that replica's steps
    (the first replica's without it)."""
    router = dashboard_page_router(requires_key)
    one_replica = dataclasses.replace(pool.engine, config=pool.engine.replica_config)
    description = engine_description(one_replica, model_name, StepStream().backlog)  # type: ignore[arg-type]

    @router.get("/v1/engine/config")
    async def engine_config() -> dict[str, Any]:
        return description | {"replicas": sorted(pool.replica_ids())}

    @router.get("/v1/engine/steps")
    async def engine_steps(replica: str | None = None, last_event_id: str | None = Header(None)) -> Response:
        replicas = pool.replica_ids()
        if replica is None and replicas:
            replica = min(replicas)
        if replica not in replicas:
            raise APIError(404, f"no live replica {replica!r}; the live ones: {sorted(replicas)}", "not_found_error",
                           param="replica")
        return step_response(pool.step_events(replicas[replica], parse_last_event_id(last_event_id)))

    return router
