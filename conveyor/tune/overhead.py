"""Measure what `conveyor serve` adds to the profiled engine steps: `ServerOverhead`.

The profile times steps of an in-process engine. Behind `conveyor serve` the same steps share the two
cores with the event loop (HTTP, JSON, detokenizing, one SSE chunk per token), and each request spends
time outside the engine before its first token reaches the client. Both are measured here once, on the
regime they matter in: a real server of the base configuration gets a short W2-like run (W1's lengths,
Poisson arrivals) at a moderate load, half of what the simulation says the configuration can carry.
While it runs, the server's own step stream (`GET /v1/engine/steps`, what the dashboard reads) gives
every served step's shape and duration, and the step cost is fit on those directly: a factor on the cost
model's price of the same shape, the median of served over priced time (a few steps slowed by another
process do not set it). The per-request overhead is then the median of what is left of each request's measured TTFT
after its simulated one (the same requests at the same arrival times, with the fitted step cost).

(A first version fit them on short bursts to an idle server: a lone request there pays an idle server's
wake-up and a slow moment of the machine in full. A second fit the step factor on the requests' measured
over simulated streaming times, one factor from the decode-heavy steps that also priced the prompt-heavy
ones; see docs/tuning.md.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import httpx
import numpy as np

from conveyor.bench.serve import (
    RequestResult,
    ServeSettings,
    arrival_delays,
    benchmark_client,
    stream_request,
)
from conveyor.config import EngineConfig, ModelConfig
from conveyor.tune.cost_model import (
    FEW_ROWS,
    CostModel,
    RowShape,
    ServerOverhead,
    describe_few_row_factors,
    is_few_row_step,
)
from conveyor.tune.report import config_file_values
from conveyor.tune.search import Candidate
from conveyor.tune.simulator import SimRequest, simulate

logger = logging.getLogger(__name__)

NUM_REQUESTS = 24
MIN_STEPS = 20  # served steps of a kind needed to give it a factor of its own
LOAD_SHARE = 0.5  # of the simulated capacity (all requests at once): a moderate load
FIT_ROUNDS = 4
STEP_FLUSH_SECONDS = 0.5  # the step stream flushes every 0.1 s
# What a request is: (ttft, itls) in seconds, measured or simulated.
Timings = list[tuple[float, list[float]]]
# A served step: its rows and its duration in seconds.
Step = tuple[list[RowShape], float]


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
                            num_requests: int = NUM_REQUESTS, seed: int = 0, runs: int = 1) -> list[ServerOverhead]:
    """Serve `config` for real and send `runs` short W2-like runs at a moderate load, one after another,
    each with prompts of its own (the prefix cache gives a run nothing of an earlier one), while reading the
    server's steps. Each run gives one `ServerOverhead`: the step cost fit on its served steps, and the time
    each request spends outside the engine (the client's TTFT minus the engine's, per request)."""
    from conveyor.tune.validate import serving

    resolved = config.resolved(model_path, model)
    max_model_len = resolved.max_model_len or 2048
    batches = [overhead_requests(model, max_model_len, num_requests, seed + run) for run in range(runs)]
    capacity = num_requests / simulate(resolved, cost_model.step_seconds, batches[0]).duration
    timed = [at_rate(requests, LOAD_SHARE * capacity, seed + run) for run, requests in enumerate(batches)]
    with tempfile.TemporaryDirectory(prefix="conveyor-overhead-") as work_dir:
        with serving(config_file_values(config, Candidate.of(config)), Path(work_dir)) as base_url:
            served = asyncio.run(_send(base_url, timed))
    return [_fit_run(resolved, cost_model, LOAD_SHARE * capacity, requests, *run) for requests, run in zip(timed, served)]


def _fit_run(resolved: EngineConfig, cost_model: CostModel, rate: float, timed: list[SimRequest],
             measured: list[RequestResult], steps: list[Step], engine_ttfts: dict[str, float],
             gaps: list[float]) -> ServerOverhead:
    """One overhead run's `ServerOverhead`: the step factors from its served steps, the per-request seconds
    measured directly (client TTFT minus engine TTFT); the earlier fits are kept in the details to compare."""
    if not steps:
        raise RuntimeError("measuring the server overhead: the server's step stream (/v1/engine/steps) sent no step")

    def simulated(step_seconds: Callable[[Sequence[RowShape]], float], delay: float) -> Timings:
        run = simulate(resolved, step_seconds, timed, admission_delay=delay)
        by_id = {r.request.request_id: (r.ttft, r.itls) for r in run.results}
        return [by_id[r.request_id] for r in timed]

    factor, few_factor, step_details = fit_step_cost(steps, cost_model.step_seconds)
    step_cost = ServerOverhead(0.0, factor, few_row_factors=few_factor).scale(cost_model.step_seconds)
    timings = [(r.ttft, r.itls) for r in measured]
    # (Until 2026-11-27 the per-request seconds were fit as the median TTFT residual against the simulation:
    # that absorbs the step factor's error and swung 0-47 ms between measurements; kept in the details.)
    by_residual = fit_request_seconds([t for t, _ in timings], lambda d: [t for t, _ in simulated(step_cost, d)])
    delay = outside_engine_seconds(measured, engine_ttfts)
    if delay is None:
        delay = by_residual
    # The request-timing fit (the factor before 2026-11-26 09:30), kept in the details to compare with.
    by_requests = fit_overhead(timings, lambda f, d: simulated(lambda rows: f * cost_model.step_seconds(rows), d))
    simulated_now = simulated(step_cost, delay)
    details = dict(step_details, rate=rate, prompt_lens=[len(r.prompt_token_ids) for r in timed],
                   output_lens=[r.output_len for r in timed], arrivals=[r.arrival_time for r in timed],
                   ttft_measured=[t for t, _ in timings], ttft_simulated=[t for t, _ in simulated_now],
                   itl_measured_mean=_mean_itl(timings), itl_simulated_mean=_mean_itl(simulated_now),
                   request_seconds_by_residual=by_residual, step_gap_p50=float(np.median(gaps)) if gaps else None,
                   factor_by_requests=by_requests.step_factor, request_seconds_by_requests=by_requests.request_seconds)
    logger.info("server overhead from %d served steps: x%.3f (decode steps of 1-%d rows %s), %.1f ms per request "
                "outside the engine (as a TTFT residual: %.1f ms)", len(steps), factor, FEW_ROWS,
                describe_few_row_factors(few_factor), 1000 * delay, 1000 * by_residual)
    return ServerOverhead(delay, factor, details, few_factor)


def outside_engine_seconds(results: Sequence[RequestResult], engine_ttfts: dict[str, float]) -> float | None:
    """The median, over requests, of the client's TTFT minus the engine's (from reaching the engine to its
    first token): what a request spends outside the engine (HTTP, tokenizing, the hand-off to the engine
    thread, the first chunk's way back). An engine request is its completion's id plus "-<prompt>-<sample>".
    None when no request could be paired."""
    engine_by_response = {request_id.rsplit("-", 2)[0]: ttft for request_id, ttft in engine_ttfts.items()}
    gaps = [r.ttft - engine_by_response[r.response_id] for r in results
            if r.success and r.response_id in engine_by_response]
    return max(0.0, float(np.median(gaps))) if gaps else None


def fit_step_cost(steps: Sequence[Step], price: Callable[[Sequence[RowShape]], float]
                  ) -> tuple[float, tuple[float, ...] | None, dict]:
    """(step factor, few-row factors, details): a served step takes `factor x price(rows)`, the factor being
    the median of served over priced time (a few steps slowed by another process do not set it); decode
    steps of n <= FEW_ROWS rows get the median of their own (`few_row_factors[n - 1]`; the few-row steps'
    median for a row count with fewer than MIN_STEPS steps), or None when there are fewer than MIN_STEPS
    few-row steps or other steps (then they take the step factor too).

    (Until 2026-11-26 14:00 a second term, seconds per sampled row, was fit beside it by least absolute
    relative error when it lowered the median miss. On the overhead run's steps it is confounded with the
    machine's drift during the run: seven fits gave -1.0 to +2.3 ms, and +2.3 ms, extrapolated from the
    run's 24 rows to a chat server's 64, priced W3's steps 45% too high; docs/tuning.md.)"""
    priced = [(rows, seconds / cost) for rows, seconds in steps if (cost := price(rows)) > 0 and seconds > 0]
    few = [(len(rows), ratio) for rows, ratio in priced if is_few_row_step(rows)]
    other = np.array([ratio for rows, ratio in priced if not is_few_row_step(rows)])
    every = np.array([ratio for _, ratio in priced])
    few_factors = None
    if len(few) >= MIN_STEPS and len(other) >= MIN_STEPS:
        factor = float(np.median(other))
        overall = float(np.median([ratio for _, ratio in few]))
        by_count = [[ratio for count, ratio in few if count == n] for n in range(1, FEW_ROWS + 1)]
        few_factors = tuple(float(np.median(r)) if len(r) >= MIN_STEPS else overall for r in by_count)
    else:
        factor = float(np.median(every))
    overhead = ServerOverhead(0.0, factor, few_row_factors=few_factors)
    expected = np.array([overhead.factor_of(rows) for rows, _ in priced])
    details = {"served_steps": int(len(every)), "few_row_steps": int(len(few)),
               "few_row_counts": [sum(1 for count, _ in few if count == n) for n in range(1, FEW_ROWS + 1)],
               "step_miss": float(np.median(np.abs(expected / every - 1.0)))}
    return factor, few_factors, details


STEP_KINDS = ("decode", "mixed", "prompt")  # decode rows only; prompt chunks beside decodes; prompt chunks only


def step_kind(rows: Sequence[RowShape]) -> str:
    decodes = sum(1 for row in rows if row.num_new == 1)
    return "decode" if decodes == len(rows) else "mixed" if decodes else "prompt"


def step_factor_by_kind(steps: Sequence[Step], price: Callable[[Sequence[RowShape]], float]) -> dict[str, dict]:
    """Per kind of step: how many served steps, and the median of served over priced time. One factor for
    all steps hides a cost model that prices one kind well and another badly (a chat's turns beside many
    decodes); this says which kind the misses come from."""
    ratios: dict[str, list[float]] = {kind: [] for kind in STEP_KINDS}
    for rows, seconds in steps:
        priced = price(rows)
        if rows and priced > 0 and seconds > 0:
            ratios[step_kind(rows)].append(seconds / priced)
    return {kind: {"steps": len(values), "factor": float(np.median(values))}
            for kind, values in ratios.items() if values}


def fit_request_seconds(measured_ttfts: Sequence[float], simulate_ttfts: Callable[[float], list[float]],
                        rounds: int = FIT_ROUNDS) -> float:
    """The per-request seconds: the median of measured minus simulated TTFT (never below 0), refit a few
    rounds (a later admission moves the queueing the next request sees)."""
    delay = 0.0
    for _ in range(rounds):
        residuals = [m - s for m, s in zip(measured_ttfts, simulate_ttfts(delay))]
        delay = max(0.0, delay + float(np.median(residuals)))
    return delay


def _mean_itl(timings: Timings) -> float:
    return sum(sum(itls) for _, itls in timings) / max(1, sum(len(itls) for _, itls in timings))


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


async def _send(base_url: str, runs: list[list[SimRequest]]
                ) -> list[tuple[list[RequestResult], list[Step], dict[str, float], list[float]]]:
    """The runs one after another, each request at its arrival time (seconds after its run's first),
    streamed, under one reader of the server's step stream (a second reader would first get the ring's
    backlog: the earlier runs' steps); a failure is an error. Per run: the requests' results, the served
    steps, each request's TTFT inside the engine and the engine loop's time between busy steps."""
    engine_ttfts: dict[str, float] = {}
    gaps: list[float] = []
    done = []
    async with benchmark_client(ServeSettings(base_url=base_url)) as client, \
            served_steps(base_url, engine_ttfts, gaps) as steps:
        for requests in runs:
            first_step = len(steps)

            async def one(request: SimRequest, started: float) -> RequestResult:
                await asyncio.sleep(max(0.0, started + request.arrival_time - time.perf_counter()))
                body = {"prompt": request.prompt_token_ids, "max_tokens": request.output_len, "temperature": 0.0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                result = await stream_request(client, "/v1/completions", body,
                                              RequestResult(len(request.prompt_token_ids), request.output_len,
                                                            success=False))
                if not result.success:
                    raise RuntimeError(f"measuring the server overhead: a request failed: {result.error}")
                return result

            started = time.perf_counter()
            results = list(await asyncio.gather(*(one(request, started) for request in requests)))
            await asyncio.sleep(STEP_FLUSH_SECONDS)  # the run's last steps reach the reader
            done.append((results, steps[first_step:], dict(engine_ttfts), list(gaps)))
            engine_ttfts.clear()
            gaps.clear()
    return done


@contextlib.asynccontextmanager
async def served_steps(base_url: str, engine_ttfts: dict[str, float] | None = None,
                       gaps: list[float] | None = None) -> AsyncIterator[list[Step]]:
    """The steps a server runs while the block runs (rows and served seconds each), read from its step
    stream; with `engine_ttfts`, also each request's TTFT inside the engine (from reaching it to its first
    token); with `gaps`, the engine loop's time between consecutive busy steps."""
    async with httpx.AsyncClient(base_url=base_url, timeout=None) as client:
        steps: list[Step] = []
        watcher = asyncio.ensure_future(_read_steps(client, steps, engine_ttfts, gaps))
        await asyncio.sleep(0.2)  # the stream is open before the first request (it records only while watched)
        try:
            yield steps
            await asyncio.sleep(STEP_FLUSH_SECONDS)  # the last steps arrive
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _read_steps(client: httpx.AsyncClient, steps: list[Step], engine_ttfts: dict[str, float] | None,
                      gaps: list[float] | None) -> None:
    """Append every step of the server's step stream until cancelled: its rows, and its served seconds.
    A step after which requests remain is served from its start to the next step's start: between the two
    the engine loop hands the outputs to the server, feeds the step stream and takes new requests, time
    the profile's back-to-back in-process steps do not pay (0.3 ms at the median here, 2026-11-27). A step that leaves the
    engine idle is served for its own duration (the wait for the next request is not its cost)."""
    pending: tuple[list[RowShape], float, float, bool] | None = None  # rows, start, duration, busy after
    try:
        async with client.stream("GET", "/v1/engine/steps") as response:
            if response.status_code != 200:
                raise RuntimeError(f"reading the served steps: /v1/engine/steps answered HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                step = json.loads(line[len("data: "):])
                start = float(step["time"]) - float(step["duration"])
                if pending is not None:
                    rows, started, duration, busy = pending
                    served = start - started if busy and start - started >= duration else duration
                    steps.append((rows, served))
                    if busy and gaps is not None:
                        gaps.append(served - duration)
                pending = ([RowShape(first, num_new, bool(samples)) for first, num_new, samples in step["rows"]],
                           start, float(step["duration"]), step["running"] + step["waiting"] > 0)
                for update in step["updates"] if engine_ttfts is not None else []:
                    if update["first_token"] is not None and update["arrival"] is not None:
                        engine_ttfts[update["id"]] = update["first_token"] - update["arrival"]
    finally:
        if pending is not None:  # the last step: nothing follows it to measure against
            steps.append((pending[0], pending[2]))
