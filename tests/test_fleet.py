"""The fleet projection: N simulated replicas behind a routing policy, on a synthetic step cost."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from conveyor.config import EngineConfig
from conveyor.distributed.fleet import simulate_fleet
from conveyor.distributed.policy import PrefixPolicy, ReplicaView
from conveyor.tune.cost_model import RowShape
from conveyor.tune.simulator import SimRequest, SimResult, simulate


def _five_ms_plus_half_per_token(rows: Sequence[RowShape]) -> float:
    return 0.005 + 0.0005 * sum(row.num_new for row in rows)


def _config(**overrides: object) -> EngineConfig:
    values = dict(max_num_seqs=4, max_num_batched_tokens=64, block_size=4, num_kv_blocks=256, max_model_len=256,
                  enable_prefix_caching=True)
    return EngineConfig(**{**values, **overrides})  # type: ignore[arg-type]


def _burst(count: int, prompt_len: int = 24, output_len: int = 16) -> list[SimRequest]:
    return [SimRequest(str(i), 0.001 * i, [1000 + 50 * i + j for j in range(prompt_len)], output_len)
            for i in range(count)]


def _chats(conversations: int, turns: int) -> tuple[list[SimRequest], object, dict[str, int]]:
    """Each conversation's turn repeats its history (prompt and answer) plus a new message."""
    conversation_of: dict[str, int] = {}

    def request(index: int, turn: int, prompt: list[int], arrival: float) -> SimRequest:
        request_id = f"c{index}t{turn}"
        conversation_of[request_id] = index
        answer = [5000 + 100 * index + 10 * turn + k for k in range(8)]
        return SimRequest(request_id, arrival, prompt, 8, answer)

    def follow_up(result: SimResult, clock: float) -> list[SimRequest]:
        index, turn = conversation_of[result.request.request_id], int(result.request.request_id.split("t")[1])
        if turn + 1 >= turns:
            return []
        history = result.request.prompt_token_ids + (result.request.output_token_ids or [])
        return [request(index, turn + 1, history + [7000 + index] * 12, clock + 0.5)]

    first = [request(i, 0, [2000 + 40 * i + j for j in range(40)], 0.05 * i) for i in range(conversations)]
    return first, follow_up, conversation_of


@pytest.mark.parametrize("policy", ["prefix", "pow2", "random"])
def test_one_replica_is_the_tuners_simulation(policy: str) -> None:
    requests = _burst(10)
    alone = simulate(_config(), _five_ms_plus_half_per_token, requests)
    fleet = simulate_fleet(_config(), _five_ms_plus_half_per_token, requests, 1, policy)
    times = {r.request.request_id: r.token_times for r in alone.results}
    assert {r.request.request_id: r.token_times for r in fleet.run.results} == times
    assert (fleet.run.duration, fleet.run.num_steps) == (pytest.approx(alone.duration), alone.num_steps)


@pytest.mark.parametrize("policy", ["prefix", "pow2", "random"])
def test_a_burst_finishes_faster_on_more_replicas(policy: str) -> None:
    requests = _burst(64)
    durations = {n: simulate_fleet(_config(), _five_ms_plus_half_per_token, requests, n, policy).run.duration
                 for n in (1, 4)}
    speedup = durations[1] / durations[4]
    assert (2.0 if policy == "random" else 2.8) < speedup <= 4.2, durations  # random spreads unevenly
    fleet = simulate_fleet(_config(), _five_ms_plus_half_per_token, requests, 4, policy)
    assert sum(fleet.requests_per_replica) == 64 and min(fleet.requests_per_replica) > 0


def test_prefix_routing_keeps_conversations_on_their_cache() -> None:
    runs = {}
    for policy in ("prefix", "random"):
        first, follow_up, conversation_of = _chats(conversations=12, turns=4)
        runs[policy] = simulate_fleet(_config(), _five_ms_plus_half_per_token, first, 4, policy,
                                      follow_up=follow_up, seed=3)  # type: ignore[arg-type]
        homes: dict[int, set[int]] = {}
        for replica, run in enumerate(runs[policy].replica_runs):
            for result in run.results:
                homes.setdefault(conversation_of[result.request.request_id], set()).add(replica)
        if policy == "prefix":
            assert all(len(replicas) == 1 for replicas in homes.values()), homes
    assert len(runs["prefix"].run.results) == len(runs["random"].run.results) == 48
    assert runs["prefix"].run.cached_ratio > runs["random"].run.cached_ratio + 0.2
    assert runs["prefix"].decisions["prefix"] == 36  # every later turn; first turns match nothing
    assert runs["prefix"].decisions["fallback_no_match"] == 12


def test_an_overloaded_holder_is_passed_over() -> None:
    shared = list(range(100, 140))  # every request starts with the same 10 blocks
    requests = [SimRequest(str(i), 0.0001 * i, shared + [900 + i] * 4, 32) for i in range(40)]
    fleet = simulate_fleet(_config(), _five_ms_plus_half_per_token, requests, 4, "prefix",
                           prefix_policy=PrefixPolicy(max_waiting=2, max_load_gap=None))
    assert min(fleet.requests_per_replica) > 0 and fleet.decisions["fallback_overloaded"] > 0
    piled = simulate_fleet(_config(), _five_ms_plus_half_per_token, requests, 4, "prefix",
                           prefix_policy=PrefixPolicy(max_waiting=1000, max_load_gap=None))
    assert piled.requests_per_replica.count(0) == 3  # all follow the first replica that ran the shared prefix
    gap = simulate_fleet(_config(), _five_ms_plus_half_per_token, requests, 4, "prefix",
                         prefix_policy=PrefixPolicy(max_waiting=1000, max_load_gap=3))
    assert min(gap.requests_per_replica) > 0 and gap.decisions["fallback_busier"] > 0


def test_the_policy_alone() -> None:
    policy, rng = PrefixPolicy(max_waiting=2), random.Random(0)
    views = [ReplicaView(load=1, seats=4, matched_blocks=3), ReplicaView(load=0, seats=4, matched_blocks=5),
             ReplicaView(load=0, seats=4, matched_blocks=5, kv_usage=0.5)]
    assert policy.choose(views, rng) == (1, "prefix")  # the longest match; of the tied, the first less loaded
    views[1] = ReplicaView(load=7, seats=4, matched_blocks=5)  # 3 beyond its seats: overloaded
    views[2] = ReplicaView(load=0, seats=4, matched_blocks=5, kv_usage=0.99)
    assert policy.choose(views, rng)[1] == "fallback_overloaded"  # the less loaded holder: its KV pool is full
    assert policy.choose([ReplicaView(0, 4), ReplicaView(3, 4)], rng) == (0, "fallback_no_match")
    busier = [ReplicaView(load=12, seats=64, matched_blocks=5), ReplicaView(load=2, seats=64)]
    assert PrefixPolicy(max_load_gap=8).choose(busier, rng) == (1, "fallback_busier")  # 10 more than the least
    assert PrefixPolicy(max_load_gap=None).choose(busier, rng) == (0, "prefix")


def test_bad_fleets_are_refused() -> None:
    with pytest.raises(ValueError, match="num_replicas"):
        simulate_fleet(_config(), _five_ms_plus_half_per_token, _burst(2), 0)
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate_fleet(_config(), _five_ms_plus_half_per_token, _burst(2), 2, "round-robin")


def test_the_projection_scales_with_replicas_on_a_synthetic_cost_model() -> None:
    from conveyor.distributed.project import project
    from conveyor.tune.cost_model import AttentionShape, CostModel
    from conveyor.tune.search import Slo
    from conveyor.tune.workloads import SimWorkload

    cost = CostModel(AttentionShape(block_size=4, num_full_layers=1), (0.005, 0.0005, 0, 0, 0, 0, 0, 0))

    def workload_for(count: int) -> SimWorkload:
        def build(rate: float) -> tuple[list[SimRequest], None]:
            return [SimRequest(str(i), i / rate, [1000 + 50 * i + j for j in range(24)], 16)
                    for i in range(48 * count)], None
        return SimWorkload("synthetic", build, "req/s")

    # 100 req/s saturates one replica (4 seats; a request takes ~16 steps of ~15 ms)
    rows = project(_config(), cost, workload_for, Slo(ttft=1.0, itl=None), [1, 2], ["pow2", "random"], 100.0)
    throughput = {(row["replicas"], row["policy"]): row["summary"]["output_throughput"] for row in rows}
    for policy in ("pow2", "random"):
        assert 1.6 < throughput[2, policy] / throughput[1, policy] < 2.2, throughput
