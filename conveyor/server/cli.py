"""`conveyor serve`: load the engine, start the loop, serve the API with uvicorn until SIGTERM/SIGINT.

On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish (bounded by
--graceful-timeout); then the engine loop is stopped and the process exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn

logger = logging.getLogger(__name__)


def _serve(args: argparse.Namespace) -> int:
    from conveyor.cli import engine_config_from_args
    from conveyor.engine.async_engine import AsyncLLM
    from conveyor.engine.engine import LLMEngine
    from conveyor.server.app import ServerSettings, build_app
    from conveyor.server.metrics import ServerMetrics

    config = engine_config_from_args(args)
    config.enable_step_trace = args.step_trace
    engine = LLMEngine(config)
    model_name = args.served_model_name or Path(engine.model_path).stem
    metrics = ServerMetrics(model_name)
    llm = AsyncLLM(engine, log_interval=args.log_interval, observer=metrics.observe_step)
    settings = ServerSettings(model_name=model_name, api_key=args.api_key, max_queue_len=args.max_queue_len,
                              max_body_bytes=args.max_body_bytes)
    app = build_app(llm, settings, metrics)
    logger.info("serving %s on http://%s:%d", model_name, args.host, args.port)
    server = _GracefulServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                            timeout_graceful_shutdown=args.graceful_timeout))
    try:
        server.run()
    finally:
        llm.shutdown()
    return 0


class _GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT that led to a clean drain ends the process with
    status 0 (uvicorn re-raises the signal after shutting down, which would kill the process with it)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from conveyor.cli import add_engine_args

    serve = subparsers.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: file stem)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes")
    serve.add_argument("--max-queue-len", type=int, default=None,
                       help="answer 429 (with Retry-After) while this many requests are already waiting")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="larger bodies get 413")
    serve.add_argument("--graceful-timeout", type=int, default=30,
                       help="seconds in-flight requests get to finish after SIGTERM")
    serve.add_argument("--log-interval", type=float, default=5.0, help="seconds between stats lines while busy")
    serve.add_argument("--step-trace", action="store_true", help="record the step trace (memory grows with load)")
    add_engine_args(serve)
    serve.set_defaults(handler=_serve)
