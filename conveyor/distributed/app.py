"""The Serve application: an ingress deployment (the OpenAI-compatible API) in front of N engine replicas.

    from ray import serve
    from conveyor.config import EngineConfig
    from conveyor.distributed.app import build_app
    serve.run(build_app(EngineConfig(), num_replicas=2), route_prefix="/")

or, from a Serve config file, `import_path: conveyor.distributed.app:app_builder` with `args`
(`docs/examples/serve_config.yaml`). `conveyor serve --ray` does the former on a local Ray instance.

Sizing: each replica asks Ray for `num_threads` CPUs and runs that many torch threads, so replicas never
share a core. Serve caps the requests a replica holds at once (`max_ongoing_requests`; its default, 5,
would starve a 64-seat batch): here it is the engine's seats plus the queue a replica may hold
(`max_queue_len`, or as many again as its seats when the server sets no limit), and requests beyond it
wait in the ingress's router, where they can still go to whichever replica frees up first.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application
from ray.serve.handle import DeploymentHandle

from conveyor.config import EngineConfig, available_cpu_count
from conveyor.distributed.ingress import build_ingress_app
from conveyor.distributed.replica import EngineReplica
from conveyor.distributed.router import POLICIES
from conveyor.server.serving import ServerSettings

ENGINE_DEPLOYMENT = "ConveyorEngine"
# Serve counts long-lived streams among a replica's requests: the ingress's output stream, dashboard viewers.
STREAM_SEATS = 4


@serve.ingress()
class OpenAIIngress:
    """Serves `conveyor.server.app`'s routes; engine requests go to the engine deployment's replicas."""

    async def __init__(self, engines: DeploymentHandle, settings: ServerSettings, num_replicas: int) -> None:
        self._asgi = await build_ingress_app(engines, settings, num_replicas)

    def __serve_build_asgi_app__(self) -> Any:
        return self._asgi


def build_app(config: EngineConfig, num_replicas: int = 1, settings: ServerSettings | None = None,
              router: str = "prefix", router_kwargs: dict[str, Any] | None = None,
              routing_stats_period_s: float = 1.0, health_check_period_s: float = 2.0) -> Application:
    """The application to `serve.run`: `num_replicas` engines of `config` (its `num_threads` each,
    default: this machine's cores shared out) behind the API, routed by `router` (prefix, pow2, random)."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if router not in POLICIES:
        raise ValueError(f"router must be one of {sorted(POLICIES)}, got {router!r}")
    threads = config.num_threads or max(1, available_cpu_count() // num_replicas)
    config = replace(config, num_threads=threads)
    settings = settings or ServerSettings(model_name="")  # "": the model file's stem, as conveyor serve
    queue = settings.max_queue_len if settings.max_queue_len is not None else config.max_num_seqs
    per_replica = config.max_num_seqs + queue
    engines = serve.deployment(EngineReplica, name=ENGINE_DEPLOYMENT).options(
        num_replicas=num_replicas,
        ray_actor_options={"num_cpus": threads, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(threads)}}},
        max_ongoing_requests=per_replica + STREAM_SEATS,
        health_check_period_s=health_check_period_s,
        health_check_timeout_s=60.0,
        graceful_shutdown_timeout_s=5.0,
        request_router_config=RequestRouterConfig(
            request_router_class=POLICIES[router], request_router_kwargs=router_kwargs or {},
            request_routing_stats_period_s=routing_stats_period_s, request_routing_stats_timeout_s=30.0),
    ).bind(config, settings.model_name or None)
    ingress = serve.deployment(OpenAIIngress, name="ConveyorIngress").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=per_replica * num_replicas + 64)  # the ingress's admission decides, not Serve
    return ingress.bind(engines, settings, num_replicas)


def app_builder(args: dict[str, Any]) -> Application:
    """For a Serve config file's `import_path`: `args` holds `num_replicas`, `router`, `router_kwargs`,
    `served_model_name`, `max_queue_len` and any EngineConfig field (model, num_threads, max_num_seqs...)."""
    args = dict(args)
    app_keys = ("num_replicas", "router", "router_kwargs", "routing_stats_period_s")
    app_args = {key: args.pop(key) for key in app_keys if key in args}
    model_name = args.pop("served_model_name", None)
    max_queue_len = args.pop("max_queue_len", None)
    config = EngineConfig(**args)
    settings = ServerSettings(model_name=model_name or "", max_queue_len=max_queue_len)
    return build_app(config, settings=settings, **app_args)
