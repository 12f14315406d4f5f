"""`conveyor serve`: load the engine, serve the API with uvicorn until SIGTERM/SIGINT.

The engine loop runs in the main thread (see `conveyor.engine.async_engine` for why) and uvicorn in a
second thread. On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish
(bounded by --graceful-timeout) while the engine keeps stepping; then the loop stops and the process
exits 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import uvicorn

from conveyor.config import EngineConfig
from conveyor.engine.stats import StepStats
from conveyor.outputs import RequestOutput
from conveyor.workload_trace import TraceRecorder

logger = logging.getLogger(__name__)


def _serve(args: argparse.Namespace) -> int:
    from conveyor.engine.async_engine import AsyncLLM
    from conveyor.engine.engine import LLMEngine
    from conveyor.server.app import ServerSettings, build_app
    from conveyor.server.metrics import ServerMetrics

    try:
        config = EngineConfig.from_cli_args(args, enable_step_trace=args.step_trace)
    except ValueError as error:  # a bad --config file: its key, not a traceback
        raise SystemExit(f"conveyor serve: {error}") from None
    engine = LLMEngine(config)
    model_name = args.served_model_name or Path(engine.model_path).stem
    metrics = ServerMetrics(model_name)
    observer = metrics.observe_step
    if args.record_trace:
        recorder = TraceRecorder(args.record_trace)

        def observer(stats: StepStats, outputs: list[RequestOutput]) -> None:
            metrics.observe_step(stats, outputs)
            recorder.observe(stats, outputs)

    llm = AsyncLLM(engine, log_interval=args.log_interval, observer=observer, start_thread=False)
    settings = ServerSettings(model_name=model_name, api_key=args.api_key, max_queue_len=args.max_queue_len,
                              max_body_bytes=args.max_body_bytes)
    app = build_app(llm, settings, metrics)
    logger.info("serving %s on http://%s:%d", model_name, args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                           timeout_graceful_shutdown=args.graceful_timeout))

    def serve_http() -> None:
        try:
            server.run()  # outside the main thread uvicorn installs no signal handlers: ours forward below
        finally:
            llm.shutdown()

    def on_signal(sig: int, frame: FrameType | None) -> None:
        server.handle_exit(sig, frame)  # the first drains gracefully; a second SIGINT forces the exit

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    http_thread = threading.Thread(target=serve_http, name="conveyor-http")
    http_thread.start()
    try:
        llm.run()
        http_thread.join()  # after an engine failure the server stays up to report it, until a signal
    finally:
        server.should_exit = True
        http_thread.join()
    return 0 if server.started and llm.error is None else 1


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    serve.add_argument("--record-trace", default=None, metavar="FILE",
                       help="append each finished request's arrival time, prompt and output lengths and shared "
                            "prefix (no text) to FILE as JSON lines, for `conveyor tune --trace`")
    EngineConfig.add_cli_args(serve)
    serve.set_defaults(handler=_serve)
