"""N replicas on a virtual clock: the tuner's simulation of one engine (the real Scheduler and KV cache, a
profiled step-cost model) run per replica, and a routing policy choosing the replica of each request.

Throughput scaling cannot be measured on one 2-core machine, so it is projected here: each replica is a
machine like the profiled one, replicas step independently (each on its own clock), and a request goes,
when it arrives, to the replica the policy picks from what a router would know then:

- prefix: `policy.PrefixPolicy` on each replica's block hashes as last reported (every
  `report_period_s`, as Serve polls `record_routing_stats`) plus the prompts sent to it in the last
  `routed_ttl_s`, and its load (requests on it) and KV usage now;
- pow2: the less loaded of two random replicas (Serve's default policy);
- random.

A replica's step is priced and fed back exactly as `tune.simulator.simulate` does it; the request, result
and run types are the simulator's, so the tuner's SLO checks and summaries apply unchanged. Not modelled:
the ingress (tokenizing, streaming) and the network, which add the same small delay to every policy.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from conveyor.config import EngineConfig
from conveyor.distributed.policy import PrefixPolicy, ReplicaView, least_loaded_of_two, matched_blocks
from conveyor.engine.kv_cache import prefix_block_hashes
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.scheduler import Scheduler
from conveyor.sampling_params import SamplingParams
from conveyor.tune.cost_model import RowShape, rows_of
from conveyor.tune.simulator import FILLER_TOKEN_ID, FollowUp, SimRequest, SimResult, SimRun

FLEET_POLICIES = ("prefix", "pow2", "random")


@dataclass
class FleetRun:
    run: SimRun  # every replica's results together; its duration spans the whole fleet's run
    replica_runs: list[SimRun]
    decisions: Counter[str]  # the prefix policy's reasons (empty for the others)

    @property
    def requests_per_replica(self) -> list[int]:
        return [len(run.results) for run in self.replica_runs]


class _Replica:
    """One engine on its own clock: `clock` is when its next step can start."""

    def __init__(self, config: EngineConfig) -> None:
        assert config.num_kv_blocks and config.max_model_len, "the config is not resolved"
        self.scheduler = Scheduler(config, config.num_kv_blocks, config.max_model_len)
        self.seats = config.max_num_seqs
        self.clock = 0.0
        self.results: list[SimResult] = []
        self.num_steps = self.queries = self.hits = 0
        self.reported: frozenset[int] = frozenset()
        self.reported_at = -float("inf")
        self.routed: dict[int, float] = {}  # block hash -> when the router last sent it here

    @property
    def busy(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    @property
    def load(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting

    def view(self, hashes: list[int], now: float, report_period_s: float, routed_ttl_s: float) -> ReplicaView:
        if now - self.reported_at >= report_period_s:  # the router has this replica's next report by now
            self.reported, self.reported_at = frozenset(self.scheduler.kv_cache.pool.cached_hashes()), now

        def holds(block_hash: int) -> bool:
            return block_hash in self.reported or now - self.routed.get(block_hash, -float("inf")) <= routed_ttl_s

        kv_cache = self.scheduler.kv_cache
        usage = kv_cache.num_used_blocks / max(1, kv_cache.num_total_blocks)
        return ReplicaView(self.load, self.seats, usage, matched_blocks(hashes, holds) if hashes else 0)

    def step(self, step_seconds: Callable[[Sequence[RowShape]], float], results: dict[str, SimResult],
             follow_up: FollowUp | None) -> list[SimRequest]:
        """One step at `clock`, as `tune.simulator` runs it; returns the follow-ups of finished requests."""
        output = self.scheduler.schedule()
        if output.is_empty:
            raise RuntimeError(f"the scheduler ran nothing with {self.scheduler.num_waiting} requests waiting")
        self.clock += step_seconds(rows_of(output))
        self.num_steps += 1
        self.queries += output.num_prefix_cache_queries
        self.hits += output.num_prefix_cache_hits
        sampled = {s.request_id: _next_token(results[s.request_id]) for s in output.scheduled if s.samples}
        followers = []
        for request in self.scheduler.update_from_output(output, sampled):
            result = results[request.request_id]
            result.token_times.append(self.clock)
            if request.num_output_tokens >= result.request.output_len:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
                self.results.append(result)
                followers += follow_up(result, self.clock) if follow_up else []
        return followers


def simulate_fleet(config: EngineConfig, step_seconds: Callable[[Sequence[RowShape]], float],
                   requests: Sequence[SimRequest], num_replicas: int, policy: str = "prefix",
                   follow_up: FollowUp | None = None, prefix_policy: PrefixPolicy | None = None,
                   report_period_s: float = 1.0, routed_ttl_s: float = 10.0, seed: int = 0,
                   max_steps: int = 2_000_000) -> FleetRun:
    """Run `requests` (plus follow-ups) on `num_replicas` engines of `config` (resolved), routed by `policy`."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
    if policy not in FLEET_POLICIES:
        raise ValueError(f"policy must be one of {FLEET_POLICIES}, got {policy!r}")
    scheduler_logger = logging.getLogger("conveyor.engine.scheduler")  # a warning per simulated preemption
    level = scheduler_logger.level
    scheduler_logger.setLevel(logging.ERROR)
    try:
        return _simulate_fleet(config, step_seconds, requests, num_replicas, policy, follow_up,
                               prefix_policy or PrefixPolicy(), report_period_s, routed_ttl_s,
                               random.Random(seed), max_steps)
    finally:
        scheduler_logger.setLevel(level)


def _simulate_fleet(config: EngineConfig, step_seconds: Callable[[Sequence[RowShape]], float],
                    requests: Sequence[SimRequest], num_replicas: int, policy: str, follow_up: FollowUp | None,
                    prefix_policy: PrefixPolicy, report_period_s: float, routed_ttl_s: float, rng: random.Random,
                    max_steps: int) -> FleetRun:
    replicas = [_Replica(config) for _ in range(num_replicas)]
    order = itertools.count()
    arrivals = [(r.arrival_time, next(order), r) for r in requests]
    heapq.heapify(arrivals)
    results: dict[str, SimResult] = {}
    decisions: Counter[str] = Counter()
    start = arrivals[0][0] if arrivals else 0.0
    total_steps = 0

    def route(request: SimRequest) -> _Replica:
        now = request.arrival_time
        if policy == "random":
            return replicas[rng.randrange(num_replicas)]
        if policy == "pow2":
            return replicas[least_loaded_of_two([r.load for r in replicas], rng)]
        hashes = prefix_block_hashes(request.prompt_token_ids, config.block_size)
        views = [r.view(hashes, now, report_period_s, routed_ttl_s) for r in replicas]
        index, reason = prefix_policy.choose(views, rng)
        decisions[reason] += 1
        for block_hash in hashes:
            replicas[index].routed[block_hash] = now
        return replicas[index]

    while arrivals or any(r.busy for r in replicas):
        # The next event: an arrival, or the step of the busy replica that is free soonest. An arrival at
        # the very moment a step starts joins that step, as in the engine loop.
        stepping = min((r for r in replicas if r.busy), key=lambda r: r.clock, default=None)
        if arrivals and (stepping is None or arrivals[0][0] <= stepping.clock):
            request = heapq.heappop(arrivals)[2]
            replica = route(request)
            if not replica.busy:
                replica.clock = max(replica.clock, request.arrival_time)
            params = SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0)
            replica.scheduler.add_request(Request(request.request_id, request.prompt_token_ids, params))
            results[request.request_id] = SimResult(request)
            continue
        assert stepping is not None
        for follower in stepping.step(step_seconds, results, follow_up):
            heapq.heappush(arrivals, (follower.arrival_time, next(order), follower))
        total_steps += 1
        if total_steps > max_steps:
            raise RuntimeError(f"the fleet simulation did not finish in {max_steps} steps")
    replica_runs = [SimRun(r.results, r.clock - start, r.num_steps, r.scheduler.num_preemptions, r.queries, r.hits)
                    for r in replicas]
    end = max((t for result in results.values() for t in result.token_times[-1:]), default=start)
    done = [result for r in replicas for result in r.results]
    merged = SimRun(done, end - start, sum(r.num_steps for r in replica_runs),
                    sum(r.num_preemptions for r in replica_runs), sum(r.queries for r in replicas),
                    sum(r.hits for r in replicas))
    return FleetRun(merged, replica_runs, decisions)


def _next_token(result: SimResult) -> int:
    # as tune.simulator's: the workload's answer tokens (a later turn's prompt repeats them), else filler
    given = result.request.output_token_ids
    index = len(result.token_times)
    return given[index] if given is not None and index < len(given) else FILLER_TOKEN_ID
