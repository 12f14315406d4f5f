"""`conveyor serve`: load the engine, serve the API with uvicorn until SIGTERM/SIGINT.

The engine loop runs in the main thread (see `conveyor.engine.async_engine` for why) and uvicorn in a
second thread. On SIGTERM uvicorn stops accepting connections and lets in-flight requests finish
(bounded by --graceful-timeout) while the engine keeps stepping; then the loop stops and the process
exits 0. If the engine loop itself ever fails, the process exits 1 at once (after telling the clients in
flight) instead of serving errors: a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from conveyor.config import EngineConfig
from conveyor.server.reasoning import REASONING_PARSERS
from conveyor.server.tool_parsers import PARSERS
from conveyor.workload_trace import TraceRecorder

if TYPE_CHECKING:
    from conveyor.engine.async_engine import StepObserver
    from conveyor.engine.stats import StepStats
    from conveyor.outputs import RequestOutput

logger = logging.getLogger(__name__)


def _serve(args: argparse.Namespace) -> int:
    from conveyor.engine.async_engine import AsyncLLM
    from conveyor.engine.engine import LLMEngine
    from conveyor.server.app import ServerSettings, build_app
    from conveyor.server.connection import protocol_with_header_timeout
    from conveyor.server.metrics import ServerMetrics
    from conveyor.server.middleware import GuardSettings
    from conveyor.server.step_stream import StepStream

    try:
        config = EngineConfig.from_cli_args(args, enable_step_trace=args.step_trace)
    except ValueError as error:  # a bad --config file: its key, not a traceback
        raise SystemExit(f"conveyor serve: {error}") from None
    engine = LLMEngine(config)
    model_name = args.served_model_name or Path(engine.model_path).stem
    metrics = ServerMetrics(model_name)
    step_stream = None if args.no_dashboard else StepStream()
    observers = [metrics.observe_step] + ([step_stream.observe] if step_stream else [])
    if args.record_trace:
        observers.append(TraceRecorder(args.record_trace).observe)
    llm = AsyncLLM(engine, log_interval=args.log_interval, observer=_each(observers), start_thread=False,
                   queue_observer=metrics.observe_queue)
    guard = GuardSettings(api_key=args.api_key, public_metrics=args.public_metrics,
                          max_body_bytes=args.max_body_bytes, body_timeout=args.body_timeout)
    settings = ServerSettings(model_name=model_name, guard=guard, max_queue_len=args.max_queue_len,
                              max_choices_per_request=args.max_choices_per_request,
                              reasoning_parser=args.reasoning_parser,
                              tool_call_parser=args.tool_call_parser,
                              sse_keepalive=args.sse_keepalive, allowed_origins=args.allowed_origins or [])
    app = build_app(llm, settings, metrics, step_stream)
    logger.info("serving %s on http://%s:%d", model_name, args.host, args.port)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                           timeout_graceful_shutdown=args.graceful_timeout,
                                           http=protocol_with_header_timeout(args.header_timeout)))

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
        if llm.error is not None:
            logger.critical("the engine loop failed; exiting so that a supervisor restarts the server")
            server.force_exit = True  # no graceful drain: nothing in flight can finish any more
    finally:
        server.should_exit = True
        http_thread.join()
    return 0 if server.started and llm.error is None else 1


def _each(observers: list[StepObserver]) -> StepObserver:
    """One step observer that calls several, in order (AsyncLLM takes one)."""
    def observe(stats: StepStats, outputs: list[RequestOutput]) -> None:
        for observer in observers:
            observer(stats, outputs)
    return observe


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    serve = subparsers.add_parser("serve", help="serve the OpenAI-compatible API")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", default=None, help="the model id clients use (default: file stem)")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health")
    serve.add_argument("--public-metrics", action="store_true",
                       help="serve /metrics without the API key (for a scraper)")
    serve.add_argument("--max-queue-len", type=int, default=None,
                       help="answer 429 (with Retry-After) to a request whose sequences (prompts x n) would "
                            "take those in flight beyond --max-num-seqs plus this many (default: no limit)")
    serve.add_argument("--max-choices-per-request", type=int, default=64,
                       help="cap on prompts x n in one request; more gets 400 (default %(default)s)")
    serve.add_argument("--tool-call-parser", default="auto", choices=["auto", *PARSERS],
                       help="the tool-call format to read from the model's output (default: guessed from the "
                            "chat template; gemma's JSON convention for a template without tools)")
    serve.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                       help="larger bodies, chunked or not, get 413")
    serve.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds a connection gets to send each request's headers before it is closed")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a request gets to send its whole body; slower ones get 408")
    serve.add_argument("--graceful-timeout", type=int, default=30,
                       help="seconds in-flight requests get to finish after SIGTERM")
    serve.add_argument("--reasoning-parser", default=None, choices=sorted(REASONING_PARSERS),
                       help="split a thinking model's <think>...</think> text into the chat response's "
                            "reasoning_content (see docs/serving.md)")
    serve.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                       help="answer CORS requests from these browser origins (e.g. http://localhost:3000, or * for "
                            "any); default: no CORS headers, so browsers on other origins are refused")
    serve.add_argument("--sse-keepalive", type=float, default=10.0, metavar="SECONDS",
                       help="send a ': keep-alive' comment on a stream silent this long (a long prefill, a queue); "
                            "0 never (default %(default)s)")
    serve.add_argument("--log-interval", type=float, default=5.0, help="seconds between stats lines while busy")
    serve.add_argument("--no-dashboard", action="store_true",
                       help="serve neither /dashboard nor its step stream /v1/engine/steps")
    serve.add_argument("--step-trace", action="store_true", help="record the step trace (memory grows with load)")
    serve.add_argument("--record-trace", default=None, metavar="FILE",
                       help="append each finished request's arrival time, prompt and output lengths and shared "
                            "prefix (no text) to FILE as JSON lines, for `conveyor tune --trace`")
    ray = serve.add_argument_group("Ray Serve (conveyor.distributed; needs the `ray` extra)")
    ray.add_argument("--ray", action="store_true",
                     help="serve from a Ray Serve application: an ingress and --num-replicas engine replicas")
    ray.add_argument("--num-replicas", type=int, default=1,
                     help="engine replicas, each with its own KV cache and --num-threads (default: the cores "
                          "shared out) torch threads (default %(default)s)")
    ray.add_argument("--router", choices=("prefix", "pow2", "random"), default="prefix",
                     help="how requests pick a replica: the longest cached prefix, Serve's power of two "
                          "choices, or at random (default %(default)s)")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    EngineConfig.add_cli_args(serve)
    serve.set_defaults(handler=_serve)
