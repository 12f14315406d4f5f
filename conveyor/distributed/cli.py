"""`conveyor serve --ray`: the same API from a Ray Serve application on a local Ray instance (or an
existing cluster with --ray-address), until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import threading
from types import FrameType

from conveyor.config import EngineConfig, available_cpu_count
from conveyor.server.middleware import GuardSettings
from conveyor.server.serving import ServerSettings

logger = logging.getLogger(__name__)


# Ray Serve's own throughput mode, opted into with RAY_SERVE_THROUGHPUT_OPTIMIZED=1: handles talk gRPC, user
# code and routers run on the replica's event loop, and the ingress replica serves HTTP itself ("direct
# ingress"), so a token no longer crosses Serve's proxy. Not the default (docs/scaling.md): not yet
# measured here, and Serve fails to start the ingress while `--port` still has connections in TIME_WAIT.
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def _direct_ingress(port: int) -> int | None:
    """With Serve's throughput mode asked for, put the ingress replica on `port`; return the port for
    Serve's proxy, which then carries nothing, or None if the mode is off. Before Ray is imported: Serve
    reads these once, and the local instance's processes inherit them."""
    if os.environ.get(THROUGHPUT_ENV) != "1" or os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "0":
        return None
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)  # [min, max): this one port
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve_ray(args: argparse.Namespace) -> int:
    proxy_port = None if args.ray_address else _direct_ingress(args.port)
    import ray
    from ray import serve

    from conveyor.distributed.app import build_app

    if args.record_trace:
        raise SystemExit("conveyor serve: --record-trace is not available with --ray (each replica sees a part)")
    if args.num_replicas < 1:
        raise SystemExit(f"conveyor serve: --num-replicas must be at least 1, got {args.num_replicas}")
    try:
        config = EngineConfig.from_cli_args(args, enable_step_trace=args.step_trace)
    except ValueError as error:
        raise SystemExit(f"conveyor serve: {error}") from None
    guard = GuardSettings(api_key=args.api_key, public_metrics=args.public_metrics,
                          max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout)
    settings = ServerSettings(model_name=args.served_model_name or "", guard=guard, max_queue_len=args.max_queue_len,
                              max_choices_per_request=args.max_choices_per_request)
    application = build_app(config, args.num_replicas, settings, router=args.router)
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(num_cpus=available_cpu_count(), include_dashboard=False)
    try:
        serve.start(http_options={"host": args.host, "port": proxy_port or args.port})
        serve.run(application, name="conveyor", route_prefix="/")
        logger.info("serving on http://%s:%d: %d engine replicas, %s routing", args.host, args.port,
                    args.num_replicas, args.router)
        stop = threading.Event()

        def on_signal(sig: int, frame: FrameType | None) -> None:
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
