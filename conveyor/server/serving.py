"""What completions and chat share: admission, fanning a request out into engine requests, collecting
their finals, the one server-sent-events writer and the one usage block.

A serving object (`completions.py`, `chat.py`) turns a parsed request into engine requests and their
outputs into OpenAI shapes; the routes in `app.py` only parse, call it and return.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from conveyor import __version__
from conveyor.config import KERNELS_REVISION, EngineConfig
from conveyor.engine.async_engine import AsyncLLM, EngineDeadError
from conveyor.engine.parallel_sampling import ParentRequest
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams, StructuredOutputsParams
from conveyor.server.admission import Admission, QueueFullError, RequestGroup, wait_for_disconnect
from conveyor.server.errors import APIError
from conveyor.server.middleware import REQUEST_ID_KEY, GuardSettings
from conveyor.server.protocol import SamplingFields, error_body

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    model_name: str
    guard: GuardSettings = field(default_factory=GuardSettings)
    # Engine requests (prompts x n) admitted and unfinished may exceed the batch's seats by at most this
    # many; beyond it, 429. None: no limit.
    max_queue_len: int | None = None
    max_choices_per_request: int = 64  # prompts x n in one HTTP request: its cap on work
    reasoning_parser: str | None = None  # a name in server.reasoning.REASONING_PARSERS
    tool_call_parser: str = "auto"  # a name in server.tool_parsers.PARSERS, or guessed from the chat template
    # Seconds of silence on a stream (a long prefill, a queue) after which a `: keep-alive` comment goes out,
    # so that proxies and clients with read timeouts keep the connection. 0: never.
    sse_keepalive: float = 10.0
    allowed_origins: list[str] = field(default_factory=list)  # CORS; empty: no CORS headers at all


def usage_block(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` counts prompt tokens from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class UsageCounter:
    """Usage summed over a request's choices as their outputs arrive; each prompt is counted once."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.completion_tokens = 0
        self._prompts: dict[int, tuple[int, int]] = {}  # prompt index -> (tokens, cached tokens)

    def add(self, choice_index: int, output: RequestOutput, new_tokens: int) -> None:
        self.completion_tokens += new_tokens
        self._prompts.setdefault(choice_index // self.n, (len(output.prompt_token_ids), output.num_cached_tokens))

    def block(self) -> dict[str, Any]:
        return usage_block(sum(p for p, _ in self._prompts.values()), self.completion_tokens,
                           sum(c for _, c in self._prompts.values()))


def finals_usage(finals: list[RequestOutput], n: int) -> dict[str, Any]:
    counter = UsageCounter(n)
    for index, final in enumerate(finals):
        counter.add(index, final, len(final.outputs[0].token_ids))
    return counter.block()


class GenerationServing:
    """The engine side of a generation request, shared by completions and chat."""

    def __init__(self, llm: AsyncLLM, settings: ServerSettings, admission: Admission) -> None:
        self.llm = llm
        self.settings = settings
        self.admission = admission  # shared by every endpoint: one queue limit
        self.engine = llm.engine
        self.tokenizer = llm.engine.tokenizer
        self.system_fingerprint = system_fingerprint(llm.engine.config)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", "not_found_error", "model")

    def sampling_params(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        n: int, **extra: Any) -> SamplingParams:
        """The request's sampling parameters; the model's defaults (`--generation-config`) fill the fields the
        request left unset. `max_tokens` is None when the request set no limit."""
        defaults = self.engine.sampling_defaults
        chosen = {name: getattr(body, name) for name in ("temperature", "top_p", "top_k", "min_p",
                                                         "repetition_penalty")
                  if name in body.model_fields_set or name not in defaults}
        chosen = {**{k: v for k, v in defaults.items() if k != "max_tokens"}, **chosen}
        # A top_k beyond the vocabulary filters nothing; as given, a huge one would overflow in the sampler.
        if chosen["top_k"] >= self.engine.model_config.vocab_size:
            chosen["top_k"] = -1
        logit_bias = {int(token): bias for token, bias in (body.logit_bias or {}).items()} or None
        vocab_size = self.engine.model_config.vocab_size
        bad = [token for token in logit_bias or {} if not 0 <= token < vocab_size]
        if bad:
            raise APIError(400, f"logit_bias: token ids must be in [0, {vocab_size}); got {bad[:5]}",
                           param="logit_bias")
        try:
            return SamplingParams(
                n=n, **chosen, presence_penalty=body.presence_penalty,
                frequency_penalty=body.frequency_penalty, seed=body.seed,
                max_tokens=max_tokens if max_tokens is not None else defaults.get("max_tokens"),
                min_tokens=body.min_tokens, stop=body.stop or [], stop_token_ids=body.stop_token_ids or [],
                ignore_eos=body.ignore_eos, logprobs=logprobs, logit_bias=logit_bias,
                include_stop_str_in_output=body.include_stop_str_in_output,
                skip_special_tokens=body.skip_special_tokens, **extra)
        except ValueError as error:
            raise APIError(400, str(error)) from None

    def events(self, group: RequestGroup, request: Request, base: dict[str, Any], n: int, render: ChunkRenderer,
               body: SamplingFields, opening: Iterable[dict[str, Any]] = ()) -> AsyncIterator[str]:
        """The request's server-sent events, as its `stream_options` ask, with keep-alive comments."""
        options = body.stream_options
        return sse_events(group, request, base, n, render, bool(options and options.include_usage), opening,
                          continuous_usage=bool(options and options.continuous_usage_stats),
                          keepalive=self.settings.sse_keepalive)

    async def compile_constraint(self, spec: StructuredOutputsParams | None, param: str) -> None:
        """Compile (and cache) a constraint in a worker thread, off the engine's step; a bad one is a 400."""
        if spec is None:
            return
        try:
            await asyncio.to_thread(self.engine.grammar.compile, spec)
        except ValueError as error:
            raise APIError(400, str(error), param=param) from None

    async def start(self, parent: ParentRequest) -> RequestGroup:
        """Admit and queue every engine request of `parent`; all validated before any output is produced.
        The caller must close the group (it aborts whatever has not finished)."""
        children = parent.children()
        count, limit = len(children), self.admission.limit
        if count > self.settings.max_choices_per_request:
            raise APIError(400, f"{len(parent.prompts)} prompts x n={parent.params.n} is {count} sequences; at "
                                f"most {self.settings.max_choices_per_request} are allowed per request", param="n")
        if limit is not None and count > limit:
            raise APIError(400, f"{count} sequences can never be admitted: the server takes at most {limit} "
                                "at once", param="n")
        try:
            release = self.admission.admit(count)
        except QueueFullError as error:
            raise APIError(429, f"the server is busy: {error}", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        group = RequestGroup(self.llm, release)
        try:
            await group.add([(child.prompt, child.params, child.request_id) for child in children])
        except ValueError as error:
            group.close()
            raise APIError(400, str(error)) from None
        except BaseException:
            group.close()
            raise
        return group

    async def collect(self, group: RequestGroup, request: Request) -> list[RequestOutput]:
        """Every request's final output, closing the group; if the client hangs up first, 499."""
        finals = asyncio.ensure_future(group.finals())
        hangup = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait([finals, hangup], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            if not finals.done():
                finals.cancel()
            await asyncio.gather(finals, hangup, return_exceptions=True)
            group.close()
        if finals.cancelled():
            raise APIError(499, "client disconnected")
        return finals.result()


def requested_constraint(body: SamplingFields) -> tuple[StructuredOutputsParams | None, str]:
    """The output constraint a request asks for (`response_format` or vLLM's `structured_outputs`) and
    the field that asked, for errors."""
    if body.response_format is not None and body.structured_outputs is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    response_format = body.response_format
    if response_format is not None and response_format.type != "text":
        if response_format.json_schema is not None and response_format.type == "json_schema":
            return StructuredOutputsParams(json=response_format.json_schema.schema_), "response_format"
        return StructuredOutputsParams(json_object=True), "response_format"
    requested = body.structured_outputs
    if requested is None:
        return None, ""
    try:
        return StructuredOutputsParams(json=requested.json_, json_object=bool(requested.json_object),
                                       regex=requested.regex, choice=requested.choice,
                                       grammar=requested.grammar), "structured_outputs"
    except ValueError as error:
        raise APIError(400, str(error), param="structured_outputs") from None


# A renderer gives the choice of one chunk, several (one chunk each), or None for nothing.
ChunkRenderer = Callable[[int, RequestOutput], "dict[str, Any] | list[dict[str, Any]] | None"]


async def sse_events(group: RequestGroup, request: Request, base: dict[str, Any], n: int,
                     render: ChunkRenderer, include_usage: bool,
                     opening: Iterable[dict[str, Any]] = (), continuous_usage: bool = False,
                     keepalive: float = 0.0) -> AsyncIterator[str]:
    """The one server-sent-events writer: `opening` chunks, then each output rendered as a chunk's choice
    (`render` returns None to send nothing for it), the usage chunk if asked for, and `[DONE]`. With
    `continuous_usage` every chunk after the opening ones carries the usage so far (vLLM's extension); a
    silence of `keepalive` seconds (0: never) gets a keep-alive comment. A failure after the 200 went out
    becomes an error event, as vLLM sends it."""
    for chunk in opening:
        yield _sse(chunk)
    usage = UsageCounter(n)
    async for index, output in merge_streams(group.streams, keepalive):
        if output is KEEPALIVE:
            yield KEEPALIVE_EVENT
            continue
        if isinstance(output, Exception):
            yield _sse_error(output, request)
            break
        usage.add(index, output, len(output.delta_token_ids))
        rendered = render(index, output)
        for choice in rendered if isinstance(rendered, list) else [] if rendered is None else [rendered]:
            yield _sse({**base, "choices": [choice], **({"usage": usage.block()} if continuous_usage else {})})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": usage.block()})
    yield "data: [DONE]\n\n"


class _KeepAlive:
    pass


KEEPALIVE = _KeepAlive()  # what merge_streams yields after a silence
KEEPALIVE_EVENT = ": keep-alive\n\n"  # an SSE comment: clients skip it


def system_fingerprint(config: EngineConfig) -> str:
    """What decides the outputs besides the request: conveyor's version, the model and its numerics."""
    key = (f"{__version__} {config.model} {config.dtype} {config.quantization} {config.linear_kernel} "
           f"{config.attention_kernel} {config.elementwise_kernel} {KERNELS_REVISION}")
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:10]


def finish_reason(output: RequestOutput) -> str | None:
    reason = output.outputs[0].finish_reason
    return None if reason is None else ("stop" if reason == "abort" else reason)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _sse_error(error: Exception, request: Request) -> str:
    request_id = request.scope.get(REQUEST_ID_KEY, "unknown")
    logger.error("request %s failed mid-stream: %r", request_id, error)
    if isinstance(error, EngineDeadError):  # the engine (or its replica) is gone: say so, as a 503 would
        return _sse(error_body(str(error), "service_unavailable_error", 503))
    return _sse(error_body(f"internal error (request id {request_id})", "internal_server_error", 500))


async def merge_streams(streams: list[AsyncIterator[RequestOutput]], keepalive: float = 0.0
                        ) -> AsyncIterator[tuple[int, RequestOutput | Exception | _KeepAlive]]:
    """Interleave several requests' outputs as they come, tagged with their choice index; a stream that
    fails yields its exception, and the caller stops there. After `keepalive` seconds without an output
    (0: never) it yields `(-1, KEEPALIVE)`."""
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | _KeepAlive | None]] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as error:
            await queue.put((index, error))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            if keepalive > 0:  # NOTE: a timer, not a task or a wait_for per output: this runs for every token
                if timer is not None:
                    timer.cancel()
                timer = loop.call_later(keepalive, queue.put_nowait, (-1, KEEPALIVE))
            index, output = await queue.get()
            if output is None:
                remaining -= 1
            else:
                yield index, output
    finally:
        if timer is not None:
            timer.cancel()
        for task in tasks:
            task.cancel()  # a stream cancelled mid-way aborts its request
        await asyncio.gather(*tasks, return_exceptions=True)

