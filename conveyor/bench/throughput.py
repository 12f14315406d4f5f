"""Offline throughput (W1): conveyor's continuous batching against static batching, same engine, same run.

Static batching is what a server without continuous batching does: take the next `batch_size` requests
in arrival order, left-pad their prompts to the longest, and decode until the batch's longest output is
done. conveyor's static mode does exactly that compute with the same model and kernels: pad tokens are
real tokens of the sequence, and a request whose own output is complete keeps decoding (an idle slot)
until its batch ends. Only each request's own `output_len` tokens count as output.
"""

from __future__ import annotations

import itertools
import resource
import time
from dataclasses import asdict, dataclass, field

from conveyor.bench.workloads import BenchRequest
from conveyor.engine.engine import LLMEngine
from conveyor.engine.stats import StepStats
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams

_run_ids = itertools.count()  # request ids stay unique across runs on one engine


@dataclass
class ThroughputResult:
    mode: str
    num_requests: int
    wall_seconds: float
    prompt_tokens: int
    output_tokens: int
    num_steps: int
    overhead_fraction: float  # step time outside forward + sampling, over steps with a full batch
    sampling_fraction: float = 0.0  # step time sampling, over the same steps (the engine's other own work)
    padding_tokens: int = 0  # static mode: pad and idle-slot tokens computed for nothing
    settings: dict = field(default_factory=dict)
    request_ids: list[str] = field(default_factory=list)  # engine ids, in workload order
    steps: list[StepStats] = field(default_factory=list)  # every step of this run, for the pictures

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.wall_seconds

    @property
    def total_tokens_per_second(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_seconds

    @property
    def median_decode_step_seconds(self) -> float | None:
        """The median step with no prompt work (with one request: its time per output token, TPOT)."""
        decode = sorted(s.duration for s in self.steps if s.num_prompt_tokens == 0 and s.num_tokens)
        return decode[len(decode) // 2] if decode else None

    def to_dict(self) -> dict:
        fields = {k: v for k, v in asdict(self).items() if k not in ("request_ids", "steps")}
        return {**fields, "output_tokens_per_second": self.output_tokens_per_second,
                "total_tokens_per_second": self.total_tokens_per_second,
                "median_decode_step_seconds": self.median_decode_step_seconds}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _greedy(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def _step(engine: LLMEngine, steps: list[StepStats]) -> list[RequestOutput]:
    outputs, stats = engine.step()
    if stats is not None:
        steps.append(stats)
    return outputs


def _overhead_fraction(steps: list[StepStats], min_running: int, sampling: bool = False) -> float:
    """Of the steps with a full batch, the share of their time outside forward and sampling (or, with
    `sampling`, in sampling)."""
    busy = [s for s in steps if len(s.scheduled) >= min_running] or steps
    total = sum(s.duration for s in busy)
    part = sum(s.sample_seconds if sampling else s.overhead_seconds for s in busy)
    return part / total if total else 0.0


def run_continuous(engine: LLMEngine, requests: list[BenchRequest]) -> ThroughputResult:
    """Submit everything at once and let the scheduler batch continuously."""
    run_id = next(_run_ids)
    started = time.perf_counter()
    request_ids = [f"c{run_id}-{i}" for i in range(len(requests))]
    for request_id, request in zip(request_ids, requests):
        engine.add_request(request.prompt_token_ids, _greedy(request.output_len), request_id=request_id)
    output_tokens = 0
    steps: list[StepStats] = []
    while engine.has_unfinished_requests():
        for output in _step(engine, steps):
            if output.finished:
                output_tokens += len(output.outputs[0].token_ids)
    wall = time.perf_counter() - started
    return ThroughputResult(
        mode=_label(engine, "continuous"), num_requests=len(requests), wall_seconds=wall,
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests), output_tokens=output_tokens,
        num_steps=len(steps), overhead_fraction=_overhead_fraction(steps, engine.config.max_num_seqs),
        sampling_fraction=_overhead_fraction(steps, engine.config.max_num_seqs, sampling=True),
        settings=_settings(engine), request_ids=request_ids, steps=steps)


def run_static(engine: LLMEngine, requests: list[BenchRequest], batch_size: int,
               pad_token_id: int = 0) -> ThroughputResult:
    """Fixed batches in arrival order, left-padded, each running until its longest member is done."""
    if engine.config.max_num_seqs < batch_size:
        raise ValueError(f"static batch size {batch_size} exceeds the engine's max_num_seqs "
                         f"{engine.config.max_num_seqs}")
    run_id = next(_run_ids)
    started = time.perf_counter()
    padding = 0
    steps: list[StepStats] = []
    request_ids = [f"s{run_id}-{i}" for i in range(len(requests))]
    for batch_start in range(0, len(requests), batch_size):
        batch = requests[batch_start:batch_start + batch_size]
        prompt_len = max(len(r.prompt_token_ids) for r in batch)
        output_len = max(r.output_len for r in batch)
        for i, request in enumerate(batch):
            pads = prompt_len - len(request.prompt_token_ids)
            padding += pads + (output_len - request.output_len)
            engine.add_request([pad_token_id] * pads + request.prompt_token_ids, _greedy(output_len),
                               request_id=request_ids[batch_start + i])
        while engine.has_unfinished_requests():
            _step(engine, steps)
    wall = time.perf_counter() - started
    return ThroughputResult(
        mode=_label(engine, f"static (batch {batch_size})"), num_requests=len(requests), wall_seconds=wall,
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        output_tokens=sum(r.output_len for r in requests), num_steps=len(steps),
        overhead_fraction=_overhead_fraction(steps, batch_size), padding_tokens=padding,
        sampling_fraction=_overhead_fraction(steps, batch_size, sampling=True),
        settings={**_settings(engine), "batch_size": batch_size}, request_ids=request_ids, steps=steps)


def _settings(engine: LLMEngine) -> dict:
    c = engine.config
    return {"model": engine.model_path, "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens, "block_size": c.block_size,
            "num_kv_blocks": engine.runner.num_kv_blocks, "num_threads": engine.runner.num_threads,
            "dtype": c.dtype, "quantization": c.quantization}


def _label(engine: LLMEngine, mode: str) -> str:
    """The mode's name, with the precision unless it is fp32 ("continuous int8", "continuous bfloat16",
    "continuous int8 bfloat16")."""
    c = engine.config
    parts = [p for p in (c.quantization, None if c.dtype == "float32" else c.dtype) if p is not None]
    return " ".join([mode, *parts])
