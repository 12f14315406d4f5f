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


# Ray Serve's own throughput mode, on unless RAY_SERVE_THROUGHPUT_OPTIMIZED=0: handles talk gRPC, user code
# and routers run on the replica's event loop, and the ingress replica serves HTTP itself ("direct
# ingress"), so a token no longer crosses Serve's proxy (0.91x bare on W1 against the proxy's 0.84x: docs/scaling.md).
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def _port_is_bindable_without_reuse(host: str, port: int) -> bool:
    """Whether a socket without SO_REUSEADDR can bind `port`, as Serve's ingress replica binds it: not while
    a connection of a server that just left the port is still in TIME_WAIT (about a minute)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _direct_ingress(host: str, port: int) -> int | None:
    """Put Serve in its throughput mode with the ingress replica on `port`, and return the port for Serve's
    proxy, which then carries nothing; or None, with Serve's defaults (its proxy on `port`), when the mode
    is turned off or `port` cannot be bound without SO_REUSEADDR (Serve's proxy can). Before Ray is
    imported: Serve reads these once, and the local instance's processes inherit them."""
    if os.environ.get(THROUGHPUT_ENV) == "0" or os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "0":
        return None
    if not _port_is_bindable_without_reuse(host, port):
        logger.warning("port %d is still held (connections in TIME_WAIT after a restart, or another server): Serve's "
                       "ingress replica cannot bind it, so Serve's proxy serves it and the throughput mode is off", port)
        os.environ[THROUGHPUT_ENV] = "0"
        return None
    os.environ[THROUGHPUT_ENV] = "1"
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(port)  # [min, max): this one port
    os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(port + 1)
    # The ingress replica stays open this long when stopped so that a load balancer in front can drop it
    # (30 s by default). Nothing is in front of `conveyor serve --ray`; requests in flight are still awaited.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Serve's controller polls every 0.1 s by default, ~4% of a core here, taken from the engine's threads on a
# small machine; a local instance of a few replicas needs no faster reaction than 0.5 s (health checks: 2 s).
CONTROL_LOOP_ENV = "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"


def serve_ray(args: argparse.Namespace) -> int:
    proxy_port = None
    if not args.ray_address:  # a cluster's settings are its own
        proxy_port = _direct_ingress(args.host, args.port)
        os.environ.setdefault(CONTROL_LOOP_ENV, "0.5")
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
    stop = _StopSignals()  # after ray.init, which installs handlers of its own that abort the process
    try:
        serve.start(http_options={"host": args.host, "port": proxy_port or args.port})
        serve.run(application, name="conveyor", route_prefix="/")
        logger.info("serving on http://%s:%d: %d engine replicas, %s routing", args.host, args.port,
                    args.num_replicas, args.router)
        stop.wait()
    finally:
        serve.shutdown()  # the application, then the local instance's processes: nothing is left running
        ray.shutdown()
    return 0


class _StopSignals:
    """SIGTERM/SIGINT stop the application. One that comes while `serve.run` still waits for the replicas
    (the ingress may already answer) stops it as soon as that returns: interrupting `serve.run` left
    `serve.shutdown` hanging."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._stop.set()

    def wait(self) -> None:
        self._stop.wait()
