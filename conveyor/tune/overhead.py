"""Measure what `conveyor serve` adds to the profiled engine steps: `ServerOverhead`.

The profile times steps of an in-process engine. Behind `conveyor serve` the same steps share the two
cores with the event loop (HTTP, JSON, detokenizing, one SSE chunk per token), and each request spends
time outside the engine before its first token reaches the client. Both are measured here once, on the
regime they matter in: a real server of the base configuration gets a short W2-like run (W1's lengths,
Poisson arrivals) at a moderate load, half of what the simulation says the configuration can carry, and
the same requests at the same arrival times are simulated. The step factor is the median, over the
requests, of measured over simulated time from first to last token; the per-request overhead is the
median of what is left of each request's measured TTFT after its simulated one. The two are refit together
(each changes the other's queueing) until they settle.

(A first version fit them on short bursts to an idle server: a lone request there pays an idle server's
wake-up and a slow moment of the machine in full, and the per-request figure came out ten times what a
loaded server pays; see docs/tuning.md.)
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from conveyor.bench.serve import (
    RequestResult,
    ServeSettings,
    arrival_delays,
    benchmark_client,
    stream_request,
)
from conveyor.config import EngineConfig, ModelConfig
from conveyor.tune.cost_model import CostModel, ServerOverhead
from conveyor.tune.report import config_file_values
from conveyor.tune.search import Candidate
from conveyor.tune.simulator import SimRequest, simulate

logger = logging.getLogger(__name__)

NUM_REQUESTS = 24
LOAD_SHARE = 0.5  # of the simulated capacity (all requests at once): a moderate load
FIT_ROUNDS = 4
# What a request is: (ttft, itls) in seconds, measured or simulated.
Timings = list[tuple[float, list[float]]]


def overhead_requests(model: ModelConfig, max_model_len: int, num_requests: int = NUM_REQUESTS,
                      seed: int = 0) -> list[SimRequest]:
    """W1's prompt lengths (32..512) with 16..128 output tokens (capped to fit the model), arriving at 0;
    ordinary ids from the upper half of the vocabulary."""
    rng = np.random.default_rng(seed)
    vocab = model.vocab_size
    requests = []
    for index in range(num_requests):
        output_len = int(rng.integers(16, min(128, max(16, max_model_len // 4)) + 1))
        prompt_len = int(rng.integers(min(32, max_model_len // 4), min(512, max_model_len - output_len - 1) + 1))
        prompt = [int(t) for t in rng.integers(vocab // 2, vocab, size=prompt_len)]
        requests.append(SimRequest(str(index), 0.0, prompt, output_len))
    return requests


def at_rate(requests: list[SimRequest], rate: float, seed: int = 0) -> list[SimRequest]:
    """The same requests arriving as a Poisson process of `rate` per second, the first at 0."""
    gaps = arrival_delays(len(requests), rate, 1.0, seed)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    return [SimRequest(r.request_id, float(t), r.prompt_token_ids, r.output_len) for r, t in zip(requests, arrivals)]


def measure_server_overhead(config: EngineConfig, model_path: str, model: ModelConfig, cost_model: CostModel,
                            num_requests: int = NUM_REQUESTS, seed: int = 0) -> ServerOverhead:
    """Serve `config` for real, send a short W2-like run at a moderate load, and fit against its simulation."""
    from conveyor.tune.validate import serving

    resolved = config.resolved(model_path, model)
    requests = overhead_requests(model, resolved.max_model_len or 2048, num_requests, seed)

    def simulated(timed: list[SimRequest], factor: float, delay: float) -> Timings:
        run = simulate(resolved, lambda rows: factor * cost_model.step_seconds(rows), timed, admission_delay=delay)
        by_id = {r.request.request_id: (r.ttft, r.itls) for r in run.results}
        return [by_id[r.request_id] for r in timed]

    capacity = len(requests) / simulate(resolved, cost_model.step_seconds, requests).duration
    rate = LOAD_SHARE * capacity
    timed = at_rate(requests, rate, seed)
    with tempfile.TemporaryDirectory(prefix="conveyor-overhead-") as work_dir:
        with serving(config_file_values(config, Candidate.of(config)), Path(work_dir)) as base_url:
            measured = asyncio.run(_send(base_url, timed))
    overhead = fit_overhead([(r.ttft, r.itls) for r in measured], lambda f, d: simulated(timed, f, d))
    details = dict(overhead.details or {}, rate=rate, prompt_lens=[len(r.prompt_token_ids) for r in timed],
                   output_lens=[r.output_len for r in timed], arrivals=[r.arrival_time for r in timed])
    return ServerOverhead(overhead.request_seconds, overhead.step_factor, details)


def fit_overhead(measured: Timings, simulate_with: Callable[[float, float], Timings],
                 rounds: int = FIT_ROUNDS) -> ServerOverhead:
    """Fit (step factor, per-request seconds) so that `simulate_with(factor, seconds)` matches `measured`
    request by request: the factor on the median, over requests, of measured over simulated time from
    first to last token (each request's streamed tokens, whatever the steps' rows; the median, because on
    a shared machine another process can slow a few seconds of the run, and the requests streaming then
    must not set the factor for all), the per-request seconds on the median TTFT residual (never below 0).
    Each round refits both against a simulation with the previous round's values."""
    factor, delay = 1.0, 0.0
    measured_itl = sum(sum(itls) for _, itls in measured)
    for _ in range(rounds):
        simulated = simulate_with(factor, delay)
        ratios = [sum(m[1]) / sum(s[1]) for m, s in zip(measured, simulated) if sum(m[1]) > 0 and sum(s[1]) > 0]
        if ratios:
            factor *= float(np.median(ratios))
        simulated = simulate_with(factor, delay)
        delay = max(0.0, delay + float(np.median([m[0] - s[0] for m, s in zip(measured, simulated)])))
    simulated = simulate_with(factor, delay)
    details = {"ttft_measured": [m[0] for m in measured], "ttft_simulated": [s[0] for s in simulated],
               "itl_measured_mean": measured_itl / max(1, sum(len(i) for _, i in measured)),
               "itl_simulated_mean": sum(sum(i) for _, i in simulated) / max(1, sum(len(i) for _, i in simulated))}
    logger.info("server overhead: steps x%.3f, %.1f ms per request", factor, 1000 * delay)
    return ServerOverhead(delay, float(factor), details)


async def _send(base_url: str, requests: list[SimRequest]) -> list[RequestResult]:
    """Each request at its arrival time (seconds after the first), streamed; a failure is an error."""
    async with benchmark_client(ServeSettings(base_url=base_url)) as client:
        started = time.perf_counter()

        async def one(request: SimRequest) -> RequestResult:
            await asyncio.sleep(max(0.0, started + request.arrival_time - time.perf_counter()))
            body = {"prompt": request.prompt_token_ids, "max_tokens": request.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            result = await stream_request(client, "/v1/completions", body,
                                          RequestResult(len(request.prompt_token_ids), request.output_len,
                                                        success=False))
            if not result.success:
                raise RuntimeError(f"measuring the server overhead: a request failed: {result.error}")
            return result

        return list(await asyncio.gather(*(one(request) for request in requests)))
