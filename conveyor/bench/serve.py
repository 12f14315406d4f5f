"""Online serving benchmark (W2) against any OpenAI-compatible `/v1/completions` server.

Token-id prompts from the W1 generator, `max_tokens = output_len`, `ignore_eos`, greedy, streamed.
Arrivals follow a gamma process (burstiness 1.0 = Poisson; lower = burstier) at `request_rate`
requests/s, or requests are sent as fast as `max_concurrency` allows. Per request: TTFT, TPOT (time per
output token after the first), inter-token latencies and end-to-end latency. `dashboard_viewers` readers
of the server's step stream (conveyor's `/v1/engine/steps`, what each open dashboard reads) can run
alongside, to measure what watching costs. `stream_request` (one streamed completion or chat request,
timed) is shared with the chat benchmark (W3, `chat.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

from conveyor.bench.workloads import BenchRequest


@dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # asked for
    success: bool
    generated: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""
    text: str = ""  # the streamed text, for a chat's next turn
    prompt_tokens: int = 0  # as the server counted them (usage)
    cached_tokens: int = 0  # of those, found in its prefix cache (usage.prompt_tokens_details), if it says
    response_id: str = ""  # the server's id of the completion (its first chunk's "id")

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.generated - 1) if self.generated > 1 else 0.0


@dataclass
class ServeSettings:
    base_url: str
    model: str | None = None
    request_rate: float = float("inf")  # requests/s; inf = all at once
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    slo_ttft: float = 2.0  # seconds, for goodput
    slo_tpot: float = 0.2
    max_tokens: int | None = None  # ask every request for this many tokens instead (same prompts): unloaded TTFT
    api_key: str | None = None
    dashboard_viewers: int = 0  # step-stream readers open during the run


def arrival_delays(count: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Gaps between arrivals: gamma with mean 1/rate; shape = burstiness (1.0 is Poisson)."""
    if rate == float("inf"):
        return [0.0] * count
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=count).tolist()


async def stream_request(client: httpx.AsyncClient, path: str, body: dict, result: RequestResult) -> RequestResult:
    """Send one streamed completions or chat request; fill `result` with its timings, text and usage."""
    started = time.perf_counter()
    last = started
    pieces: list[str] = []
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                result.response_id = result.response_id or chunk.get("id", "")
                if chunk.get("usage"):
                    _read_usage(chunk["usage"], result)
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if not text:
                    continue
                pieces.append(text)
                now = time.perf_counter()
                if result.ttft == 0.0:
                    result.ttft = now - started
                else:
                    result.itls.append(now - last)
                last = now
        result.e2e = time.perf_counter() - started
        result.text = "".join(pieces)
        result.success = result.generated == result.output_len
        if not result.success:
            result.error = f"generated {result.generated} of {result.output_len} tokens"
    except httpx.HTTPError as error:
        result.error = repr(error)
    return result


def _read_usage(usage: dict, result: RequestResult) -> None:
    result.generated = usage.get("completion_tokens", 0)
    result.prompt_tokens = usage.get("prompt_tokens", 0)
    details = usage.get("prompt_tokens_details") or {}
    result.cached_tokens = details.get("cached_tokens") or 0


async def _one(client: httpx.AsyncClient, settings: ServeSettings, model: str, request: BenchRequest) -> RequestResult:
    output_len = settings.max_tokens or request.output_len
    result = RequestResult(len(request.prompt_token_ids), output_len, success=False)
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": output_len,
            "temperature": 0.0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    return await stream_request(client, "/v1/completions", body, result)


async def first_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    try:
        return response.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise RuntimeError(f"{client.base_url}/v1/models lists no model (HTTP {response.status_code}: "
                           f"{response.text[:200]!r}); is the server still loading? Pass --model-name to skip "
                           "this lookup") from None


async def _watch_steps(client: httpx.AsyncClient, received: list[int], viewer: int) -> None:
    """One dashboard's worth of watching: read the step stream until cancelled, counting its bytes."""
    async with client.stream("GET", "/v1/engine/steps") as response:
        if response.status_code != 200:
            raise RuntimeError(f"{client.base_url}/v1/engine/steps answered HTTP {response.status_code}; "
                               "--dashboard-viewers needs a conveyor server with its dashboard on")
        async for chunk in response.aiter_bytes():
            received[viewer] += len(chunk)


def benchmark_client(settings: ServeSettings) -> httpx.AsyncClient:
    """An HTTP client for a benchmark run: the server's key, no connection cap, long timeouts."""
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(base_url=settings.base_url, timeout=httpx.Timeout(3600.0), headers=headers,
                             limits=limits)


async def run_serve_benchmark(requests: list[BenchRequest], settings: ServeSettings) -> dict:
    async with benchmark_client(settings) as client:
        model = settings.model or await first_model(client)
        gate = asyncio.Semaphore(settings.max_concurrency or len(requests))
        viewer_bytes = [0] * settings.dashboard_viewers
        viewers = [asyncio.ensure_future(_watch_steps(client, viewer_bytes, i)) for i in range(len(viewer_bytes))]

        async def limited(request: BenchRequest) -> RequestResult:
            async with gate:
                return await _one(client, settings, model, request)

        started = time.perf_counter()
        tasks = []
        for request, delay in zip(requests, arrival_delays(len(requests), settings.request_rate,
                                                           settings.burstiness, settings.seed)):
            tasks.append(asyncio.ensure_future(limited(request)))
            await asyncio.sleep(delay)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        for viewer in viewers:
            viewer.cancel()
        for outcome in await asyncio.gather(*viewers, return_exceptions=True):
            if isinstance(outcome, Exception):  # a cancelled viewer ends with CancelledError, not an Exception
                raise RuntimeError(str(outcome))
    return {**summarize(results, duration, settings, model), "dashboard_viewer_bytes": viewer_bytes}


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0}
    array = np.asarray(values)
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99))}


def summarize(results: list[RequestResult], duration: float, settings: ServeSettings, model: str) -> dict:
    ok = [r for r in results if r.success]
    good = [r for r in ok if r.ttft <= settings.slo_ttft and r.tpot <= settings.slo_tpot]
    output_tokens = sum(r.generated for r in ok)
    return {
        "settings": {**asdict(settings), "request_rate": str(settings.request_rate), "model": model},
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (output_tokens + sum(r.prompt_len for r in ok)) / duration,
        "goodput": len(good) / duration,
        "ttft_s": percentiles([r.ttft for r in ok]),
        "tpot_s": percentiles([r.tpot for r in ok if r.generated > 1]),
        "itl_s": percentiles([itl for r in ok for itl in r.itls]),
        "e2e_s": percentiles([r.e2e for r in ok]),
    }


def format_summary(summary: dict) -> str:
    def row(name: str, values: dict[str, float]) -> str:
        return (f"  {name:<5} mean {values['mean'] * 1000:8.1f}  p50 {values['p50'] * 1000:8.1f}  "
                f"p90 {values['p90'] * 1000:8.1f}  p99 {values['p99'] * 1000:8.1f} ms")

    viewer_bytes = summary.get("dashboard_viewer_bytes") or []
    watched = [f"  {len(viewer_bytes)} dashboard viewers read {sum(viewer_bytes) / len(viewer_bytes) / 1e3:.0f} kB "
               "of step stream each"] if viewer_bytes else []
    return "\n".join([
        f"rate {summary['settings']['request_rate']} req/s, burstiness {summary['settings']['burstiness']}: "
        f"{summary['completed']}/{summary['num_requests']} completed in {summary['duration_s']:.1f} s",
        f"  request throughput {summary['request_throughput']:.2f} req/s, output {summary['output_throughput']:.1f} "
        f"tok/s, goodput {summary['goodput']:.2f} req/s",
        row("TTFT", summary["ttft_s"]), row("TPOT", summary["tpot_s"]), row("ITL", summary["itl_s"]),
        row("E2E", summary["e2e_s"]), *watched,
    ])
