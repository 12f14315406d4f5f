"""The engine on a virtual clock: the real `Scheduler` and KV-cache manager, a cost model instead of the model.

Each simulated step asks the real scheduler for its `SchedulerOutput`, advances the clock by the cost
model's price for that step's shape, then feeds back sampled tokens exactly as `LLMEngine.step` does
(`update_from_output`, then `finish_request` once a request has its `output_len` tokens: the workloads
ignore EOS). So chunking, the chunk cap, admission, preemption and prefix-cache hits are the engine's own.
Requests that arrive while a step runs join at the next one, as in the server's engine loop.

Token ids matter only to the prefix cache: a request's sampled tokens are its `output_token_ids` when the
workload gives them (a chat turn's answer, which the next turn's prompt repeats), else a filler id.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from conveyor.config import EngineConfig
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.scheduler import Scheduler
from conveyor.sampling_params import SamplingParams
from conveyor.tune.cost_model import RowShape, rows_of

FILLER_TOKEN_ID = 1000


@dataclass
class SimRequest:
    """A request of the workload: when it arrives (virtual seconds), its prompt and how many tokens it gets."""

    request_id: str
    arrival_time: float
    prompt_token_ids: list[int]
    output_len: int
    output_token_ids: list[int] | None = None  # the tokens it "samples", when later prompts repeat them
    turn: int | None = None  # a chat's turn (1 = the first user message), to report TTFT per turn


@dataclass
class SimResult:
    request: SimRequest
    token_times: list[float] = field(default_factory=list)  # when each output token was sampled

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.request.arrival_time

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.request.arrival_time

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


@dataclass
class SimRun:
    results: list[SimResult]
    duration: float  # from the first arrival to the last token
    num_steps: int
    num_preemptions: int
    prefix_cache_queries: int = 0  # prompt tokens of admitted requests
    prefix_cache_hits: int = 0  # of those, found in the prefix cache

    @property
    def cached_ratio(self) -> float:
        """The share of prompt tokens the prefix cache supplied (as `conveyor bench chat` reports it)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


# Called when a request finishes, with its result and the clock: returns follow-up requests (a chat's next
# turn) to submit, each with its own arrival time.
FollowUp = Callable[[SimResult, float], list[SimRequest]]


@contextmanager
def _quiet_scheduler() -> Iterator[None]:
    """Simulated preemptions are counted in `SimRun`; the scheduler's warning for each would flood the log."""
    scheduler_logger = logging.getLogger("conveyor.engine.scheduler")
    level = scheduler_logger.level
    scheduler_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        scheduler_logger.setLevel(level)


def simulate(config: EngineConfig, step_seconds: Callable[[Sequence[RowShape]], float],
             requests: Sequence[SimRequest], follow_up: FollowUp | None = None,
             max_steps: int = 2_000_000, admission_delay: float = 0.0) -> SimRun:
    """Run `requests` (plus any follow-ups) to completion. `config` must say num_kv_blocks and max_model_len
    (`EngineConfig.resolved`). Raises ValueError, as the engine does, for a request that could never run.
    A request reaches the scheduler `admission_delay` seconds after it arrives (a server's own time per
    request, `ServerOverhead.request_seconds`); its TTFT and E2E still count from its arrival."""
    with _quiet_scheduler():
        return _simulate(config, step_seconds, requests, follow_up, max_steps, admission_delay)


def _simulate(config: EngineConfig, step_seconds: Callable[[Sequence[RowShape]], float],
              requests: Sequence[SimRequest], follow_up: FollowUp | None, max_steps: int,
              admission_delay: float) -> SimRun:
    assert config.num_kv_blocks and config.max_model_len, "the config is not resolved"
    scheduler = Scheduler(config, config.num_kv_blocks, config.max_model_len)
    arrivals: list[tuple[float, int, SimRequest]] = []
    order = 0

    def submit(request: SimRequest) -> None:
        nonlocal order
        heapq.heappush(arrivals, (request.arrival_time + admission_delay, order, request))
        order += 1

    for request in requests:
        submit(request)
    results: dict[str, SimResult] = {}
    done: list[SimResult] = []
    clock = arrivals[0][0] if arrivals else 0.0
    start, num_steps = clock - admission_delay, 0  # the run starts when the first request is sent
    queries = hits = 0
    while arrivals or scheduler.has_unfinished_requests():
        while arrivals and arrivals[0][0] <= clock:
            request = heapq.heappop(arrivals)[2]
            params = SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0)
            scheduler.add_request(Request(request.request_id, request.prompt_token_ids, params))
            results[request.request_id] = SimResult(request)
        if not scheduler.has_unfinished_requests():
            clock = arrivals[0][0]  # idle until the next arrival
            continue
        output = scheduler.schedule()
        if output.is_empty:
            raise RuntimeError(f"the scheduler ran nothing with {scheduler.num_waiting} requests waiting")
        clock += step_seconds(rows_of(output))
        num_steps += 1
        queries, hits = queries + output.num_prefix_cache_queries, hits + output.num_prefix_cache_hits
        if num_steps > max_steps:
            raise RuntimeError(f"simulation did not finish in {max_steps} steps")
        sampled = {s.request_id: _next_token(results[s.request_id]) for s in output.scheduled if s.samples}
        for request in scheduler.update_from_output(output, sampled):
            result = results[request.request_id]
            result.token_times.append(clock)
            if request.num_output_tokens >= result.request.output_len:
                scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                done.append(result)
                for follower in follow_up(result, clock) if follow_up else []:
                    submit(follower)
    return SimRun(done, clock - start, num_steps, scheduler.num_preemptions, queries, hits)


def _next_token(result: SimResult) -> int:
    given = result.request.output_token_ids
    index = len(result.token_times)
    return given[index] if given is not None and index < len(given) else FILLER_TOKEN_ID
