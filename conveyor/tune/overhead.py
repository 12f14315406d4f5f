"""Measure what `conveyor serve` adds to the profiled engine steps: `ServerOverhead`.

The profile times steps of an in-process engine. Behind `conveyor serve` the same steps share the two
cores with the event loop (HTTP, JSON, detokenizing, one SSE chunk per token), and each request spends
time outside the engine before its first token reaches the client. Both are measured here once, against a
real server running the base configuration: small bursts of concurrent requests (random-id prompts, EOS
ignored) are sent with the benchmark's client, and the same bursts are simulated with the profiled cost
model. The ratio of measured to simulated inter-token latency is the step factor; what remains of the
measured TTFT of lone requests after the (scaled) simulated one is the per-request overhead.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from conveyor.bench.serve import RequestResult, ServeSettings, benchmark_client, stream_request
from conveyor.config import EngineConfig, ModelConfig
from conveyor.tune.cost_model import CostModel, ServerOverhead
from conveyor.tune.report import config_file_values
from conveyor.tune.search import Candidate
from conveyor.tune.simulator import SimRequest, simulate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Burst:
    """`requests` requests sent at once, each a fresh `prompt_len`-token prompt and `max_tokens` tokens."""

    requests: int
    prompt_len: int
    max_tokens: int


# Lone requests (short and long prompts) give the per-request overhead; the bursts, how the step factor
# grows with the rows streaming at once.
BURSTS = (Burst(1, 32, 16), Burst(1, 256, 16), Burst(1, 32, 16), Burst(1, 256, 16), Burst(4, 64, 24),
          Burst(16, 64, 24))


def measure_server_overhead(config: EngineConfig, model_path: str, model: ModelConfig, cost_model: CostModel,
                            bursts: tuple[Burst, ...] = BURSTS, seed: int = 0) -> ServerOverhead:
    """Serve `config` for real, send `bursts` one after another, and compare with their simulation."""
    from conveyor.tune.validate import serving

    rng = np.random.default_rng(seed)
    vocab_size = model.vocab_size
    prompts = [[[int(t) for t in rng.integers(vocab_size // 2, vocab_size, size=burst.prompt_len)]
                for _ in range(burst.requests)] for burst in bursts]
    with tempfile.TemporaryDirectory(prefix="conveyor-overhead-") as work_dir:
        with serving(config_file_values(config, Candidate.of(config)), Path(work_dir)) as base_url:
            measured = [asyncio.run(_send(base_url, burst_prompts, burst.max_tokens))
                        for burst, burst_prompts in zip(bursts, prompts)]
    resolved = config.resolved(model_path, model)
    rows = []
    for burst, burst_prompts, real in zip(bursts, prompts, measured):
        run = simulate(resolved, cost_model.step_seconds, [SimRequest(str(i), 0.0, prompt, burst.max_tokens)
                                                            for i, prompt in enumerate(burst_prompts)])
        rows.append(burst_row(burst, real, [(r.ttft, r.itls) for r in run.results]))
    return fit_overhead(rows)


def burst_row(burst: Burst, measured: list[RequestResult], simulated: list[tuple[float, list[float]]]) -> dict:
    """One burst's medians, measured and simulated (TTFT per request; ITL over every token)."""
    return {"requests": burst.requests, "prompt_len": burst.prompt_len, "max_tokens": burst.max_tokens,
            "itl_measured": float(np.median([itl for r in measured for itl in r.itls])),
            "itl_simulated": float(np.median([itl for _, itls in simulated for itl in itls])),
            "ttft_measured": float(np.median([r.ttft for r in measured])),
            "ttft_simulated": float(np.median([ttft for ttft, _ in simulated]))}


def fit_overhead(rows: list[dict]) -> ServerOverhead:
    """The step factor: measured over simulated inter-token time, summed over every token of every burst
    (so the bursts of many rows, a loaded server's regime, weigh most; a lone request's steps are also
    slowed by an idle server waking up, which a loaded one does not pay). The per-request overhead: the
    median over lone requests of measured TTFT minus the scaled simulated one (never below 0)."""
    tokens = [row["requests"] * (row["max_tokens"] - 1) for row in rows]
    factor = (sum(n * row["itl_measured"] for n, row in zip(tokens, rows))
              / sum(n * row["itl_simulated"] for n, row in zip(tokens, rows)))
    lone = [row["ttft_measured"] - factor * row["ttft_simulated"] for row in rows if row["requests"] == 1]
    request_seconds = max(0.0, float(np.median(lone))) if lone else 0.0
    logger.info("server overhead: steps x%.3f, %.1f ms per request", factor, 1000 * request_seconds)
    return ServerOverhead(request_seconds, float(factor), {"bursts": rows})


async def _send(base_url: str, prompts: list[list[int]], max_tokens: int) -> list[RequestResult]:
    async with benchmark_client(ServeSettings(base_url=base_url)) as client:
        async def one(prompt: list[int]) -> RequestResult:
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}}
            result = await stream_request(client, "/v1/completions", body,
                                          RequestResult(len(prompt), max_tokens, success=False))
            if not result.success:
                raise RuntimeError(f"measuring the server overhead: a request failed: {result.error}")
            return result

        return list(await asyncio.gather(*(one(prompt) for prompt in prompts)))
