"""The scheduler and block pool driven by fake model outputs: no model, just the rule and its invariants."""

from __future__ import annotations

import random

import pytest

from conveyor.config import EngineConfig
from conveyor.engine.kv_cache import KVCacheManager
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.scheduler_output import SchedulerOutput
from conveyor.sampling_params import SamplingParams

FAKE_TOKEN = 7


def _request(request_id: str, prompt_len: int, max_tokens: int) -> Request:
    return Request(request_id, [1] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _scheduler(budget: int = 64, max_seqs: int = 8, blocks: int = 64, block_size: int = 4,
               max_model_len: int = 4096) -> Scheduler:
    config = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, block_size=block_size)
    return Scheduler(config, blocks, max_model_len)


def _check_step(scheduler: Scheduler, output: SchedulerOutput) -> None:
    assert output.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    ids = [s.request.request_id for s in output.scheduled]
    assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
    for s in output.scheduled:
        # No padding: every scheduled token is one the request still needed.
        assert 1 <= s.num_new_tokens <= s.request.num_tokens - s.request.num_computed_tokens
        assert not s.request.is_finished
        assert len(s.block_ids) * scheduler.kv_cache.block_size >= s.end
    scheduler.kv_cache.check_invariants()


def _step(scheduler: Scheduler) -> SchedulerOutput:
    """One step with a fake model: every sampling request gets FAKE_TOKEN; finish at max_tokens."""
    output = scheduler.schedule()
    _check_step(scheduler, output)
    sampled = {s.request.request_id: FAKE_TOKEN for s in output.scheduled if s.samples}
    for request in scheduler.update_from_output(output, sampled):
        if request.num_output_tokens >= request.sampling_params.max_tokens:  # type: ignore[operator]
            scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
    scheduler.kv_cache.check_invariants()
    return output


def test_chunked_prefill_samples_only_on_the_last_chunk() -> None:
    scheduler = _scheduler(budget=32)
    scheduler.add_request(_request("a", 100, 2))
    chunks = []
    for _ in range(4):
        output = _step(scheduler)
        [s] = output.scheduled
        chunks.append((s.num_new_tokens, s.samples))
    assert chunks == [(32, False), (32, False), (32, False), (4, True)]
    assert scheduler.get_request("a").num_output_tokens == 1  # type: ignore[union-attr]


def test_decodes_and_a_new_prompt_chunk_share_a_step_and_finished_requests_leave_at_once() -> None:
    scheduler = _scheduler(budget=20)
    scheduler.add_request(_request("a", 5, 3))
    scheduler.add_request(_request("b", 6, 1))
    first = _step(scheduler)
    assert [s.num_new_tokens for s in first.scheduled] == [5, 6]
    assert scheduler.get_request("b") is None  # done after one token: left the batch and freed its blocks
    scheduler.add_request(_request("c", 40, 2))
    second = _step(scheduler)  # "c" joins at the very next step, next to a's decode
    assert [(s.request.request_id, s.num_new_tokens) for s in second.scheduled] == [("a", 1), ("c", 19)]
    while scheduler.has_unfinished_requests():
        _step(scheduler)
    assert scheduler.kv_cache.num_used_blocks == 0


def test_short_request_behind_a_long_prompt_is_not_starved() -> None:
    scheduler = _scheduler(budget=256, blocks=1024)
    scheduler.add_request(_request("long", 2000, 4))
    _step(scheduler)
    scheduler.add_request(_request("short", 10, 4))
    # While anyone waits, a prompt chunk takes at most a quarter of the budget, so "short" is admitted
    # at the next step and, needing only 10 tokens, samples its first token in that same step.
    short = scheduler.get_request("short")
    _step(scheduler)
    assert short is not None and short.num_output_tokens == 1
    assert scheduler.get_request("long").num_computed_tokens < 2000  # type: ignore[union-attr]


def test_preemption_frees_the_newest_and_it_completes_after_recompute() -> None:
    scheduler = _scheduler(budget=64, blocks=12, block_size=4)  # 48 tokens of KV for everyone
    for i in range(3):
        scheduler.add_request(_request(f"r{i}", 10, 10))
    preempted_seen = []
    finished_tokens = {}
    while scheduler.has_unfinished_requests():
        live = {r.request_id: r for r in scheduler.running}
        output = _step(scheduler)
        preempted_seen += output.preempted_request_ids
        for request_id in output.preempted_request_ids:
            victim = live[request_id]
            assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
            assert scheduler.kv_cache.get_block_ids(request_id) == []
            assert scheduler.waiting[0] is victim
        for request in live.values():
            if request.is_finished:
                finished_tokens[request.request_id] = request.num_output_tokens
    assert preempted_seen and preempted_seen[0] == "r2"  # the newest goes first
    assert scheduler.num_preemptions == len(preempted_seen)
    assert finished_tokens == {"r0": 10, "r1": 10, "r2": 10}
    assert scheduler.kv_cache.num_used_blocks == 0


def test_recompute_covers_prompt_and_generated_tokens() -> None:
    scheduler = _scheduler(budget=64, blocks=6, block_size=4)  # 24 tokens
    scheduler.add_request(_request("old", 8, 12))
    scheduler.add_request(_request("new", 8, 12))
    victim_total = None
    for _ in range(30):
        output = _step(scheduler)
        if output.preempted_request_ids:
            victim_total = scheduler.waiting[0].num_tokens
            break
    assert victim_total is not None and victim_total > 8
    recompute = _step(scheduler)
    while not any(s.request.request_id == "new" for s in recompute.scheduled):
        recompute = _step(scheduler)
    [chunk] = [s for s in recompute.scheduled if s.request.request_id == "new"]
    assert chunk.start == 0 and chunk.num_new_tokens == victim_total  # prompt + generated, as one prefill


@pytest.mark.parametrize(("prompt", "max_tokens", "message"), [
    (100, 1, "max_model_len is 100"),
    (90, 20, "over max_model_len"),
    (30, 60, "whole pool holds 64"),
])
def test_impossible_requests_are_refused_and_nothing_changes(prompt: int, max_tokens: int, message: str) -> None:
    scheduler = _scheduler(blocks=16, block_size=4, max_model_len=100)
    scheduler.add_request(_request("fine", 5, 2))
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(_request("bad", prompt, max_tokens))
    assert [r.request_id for r in scheduler.waiting] == ["fine"] and scheduler.get_request("bad") is None
    while scheduler.has_unfinished_requests():
        _step(scheduler)


def test_abort_frees_blocks_in_the_same_step_and_is_idempotent() -> None:
    scheduler = _scheduler()
    scheduler.add_request(_request("a", 20, 5))
    scheduler.add_request(_request("b", 20, 5))
    _step(scheduler)
    used, owned_by_a = scheduler.kv_cache.num_used_blocks, len(scheduler.kv_cache.get_block_ids("a"))
    assert owned_by_a > 0
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache.num_used_blocks == used - owned_by_a
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("unknown", RequestStatus.FINISHED_ABORTED)
    assert [s.request.request_id for s in _step(scheduler).scheduled] == ["b"]


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_keeps_every_invariant(seed: int) -> None:
    rng = random.Random(seed)
    scheduler = _scheduler(budget=rng.choice([8, 16, 48]), max_seqs=rng.choice([2, 4, 16]),
                           blocks=rng.choice([24, 40, 200]), block_size=rng.choice([1, 4, 8]), max_model_len=96)
    arrivals = {rng.randrange(60): [] for _ in range(30)}
    expected: dict[str, int] = {}
    aborted: set[str] = set()
    requests: dict[str, Request] = {}
    for n, step in enumerate(sorted(arrivals)):
        arrivals[step].append(_request(f"r{n}", rng.randint(1, 40), rng.randint(1, 30)))
    step = 0
    while step < 2000 and (arrivals or scheduler.has_unfinished_requests()):
        for request in arrivals.pop(step, []):
            try:
                scheduler.add_request(request)
            except ValueError:
                continue  # larger than this tiny pool: refused up front, never hangs
            expected[request.request_id] = request.sampling_params.max_tokens  # type: ignore[assignment]
            requests[request.request_id] = request
        if scheduler.running and rng.random() < 0.05:
            victim = rng.choice(scheduler.running).request_id
            scheduler.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            aborted.add(victim)
        _step(scheduler)
        step += 1
    assert not scheduler.has_unfinished_requests(), "the scheduler hung"
    assert scheduler.kv_cache.num_used_blocks == 0
    for request_id, max_tokens in expected.items():
        if request_id not in aborted:
            assert requests[request_id].num_output_tokens == max_tokens


def test_block_pool_hands_out_low_ids_and_refuses_overdraw() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    request = _request("a", 5, 1)
    assert manager.allocate_slots(request, 5) and manager.get_block_ids("a") == [0, 1, 2]
    other = _request("b", 4, 1)
    assert not manager.allocate_slots(other, 4)  # all or nothing: 2 blocks needed, 1 free
    assert manager.get_block_ids("b") == [] and manager.num_used_blocks == 3
    manager.free(request)
    manager.free(request)
    assert manager.num_used_blocks == 0
    manager.check_invariants()
