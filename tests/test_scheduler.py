"""The scheduler driven by a fake model that always samples token 7: the rule and its invariants."""

from __future__ import annotations

import logging
import random
import weakref

import pytest

from conveyor.config import EngineConfig
from conveyor.engine.batch import CachedRequestState, apply_scheduler_output
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.scheduler_output import SchedulerOutput
from conveyor.sampling_params import SamplingParams

FAKE_TOKEN = 7


def _request(request_id: str, prompt_len: int, max_tokens: int | None) -> Request:
    return Request(request_id, [1] * prompt_len, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _scheduler(budget: int = 64, max_seqs: int = 8, blocks: int = 64, block_size: int = 4,
               max_model_len: int = 4096, prefix_caching: bool = False) -> Scheduler:
    # NOTE: off by default here: these tests' prompts repeat one token, so with caching every request
    # would share its prefix and the schedules asserted below would be different ones.
    config = EngineConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, block_size=block_size,
                          enable_prefix_caching=prefix_caching)
    return Scheduler(config, blocks, max_model_len)


def _remaining(request: Request) -> int:
    return request.num_tokens - request.num_computed_tokens


# What a model runner would know of each scheduler's requests, kept only from the plain step data.
_RUNNER_VIEWS: weakref.WeakKeyDictionary[Scheduler, dict[str, CachedRequestState]] = weakref.WeakKeyDictionary()


def _check_step(scheduler: Scheduler, output: SchedulerOutput, waiting_before: set[str]) -> None:
    """The invariants of one planned step, checked before the fake forward runs."""
    kv_cache, budget = scheduler.kv_cache, scheduler.max_num_batched_tokens
    runner_view = _RUNNER_VIEWS.setdefault(scheduler, {})
    apply_scheduler_output(runner_view, output)
    assert output.total_num_scheduled_tokens <= budget
    assert len(scheduler.running) <= scheduler.max_num_seqs
    ids = [s.request_id for s in output.scheduled]
    assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
    # Running requests first, then the newly admitted: the order of the running list.
    assert ids == [r.request_id for r in scheduler.running if r.request_id in set(ids)]
    for s in output.scheduled:
        request = scheduler.requests[s.request_id]
        assert request.status == RequestStatus.RUNNING and not request.is_finished
        # No padding: every scheduled token is one the request still needed.
        assert 1 <= s.num_new_tokens <= _remaining(request)
        assert s.samples == (s.num_new_tokens == _remaining(request))
        # The runner, told only deltas, knows the same block table and tokens as the scheduler.
        known = runner_view[s.request_id]
        assert known.block_ids == kv_cache.get_block_ids(s.request_id)
        assert known.token_ids == request.all_token_ids
        assert len(known.block_ids) * kv_cache.block_size >= s.end
    # The runner keeps state only for requests that are still unfinished.
    assert set(runner_view) <= set(scheduler.requests)
    if output.preempted_request_ids:
        assert not waiting_before & set(ids), "admitted a request in a step that preempted (thrashing)"
    if output.total_num_scheduled_tokens < budget:
        # Work-conserving: budget is left over only when nothing more could run. Every running request got
        # a turn, and each got everything it needed unless the KV pool ran dry.
        assert {r.request_id for r in scheduler.running} <= set(ids)
        assert all(s.num_new_tokens == _remaining(scheduler.requests[s.request_id]) for s in output.scheduled) or (
            kv_cache.num_free_blocks == 0)
    assert (output.num_running, output.num_waiting) == (scheduler.num_running, scheduler.num_waiting)
    assert output.num_used_blocks == kv_cache.num_used_blocks
    kv_cache.check_invariants()


def _is_done(scheduler: Scheduler, request: Request) -> bool:
    max_tokens = request.sampling_params.max_tokens
    return (max_tokens is not None and request.num_output_tokens >= max_tokens) or (
        request.num_tokens >= scheduler.max_model_len)


def _step(scheduler: Scheduler) -> SchedulerOutput:
    """One step of a fake engine: sample FAKE_TOKEN, finish at max_tokens (or max_model_len)."""
    waiting_before = {r.request_id for r in scheduler.waiting}
    output = scheduler.schedule()
    _check_step(scheduler, output, waiting_before)
    sampled = {s.request_id: FAKE_TOKEN for s in output.scheduled if s.samples}
    for request_id in sampled:  # the runner appends what it samples
        _RUNNER_VIEWS[scheduler][request_id].token_ids.append(FAKE_TOKEN)
    for request in scheduler.update_from_output(output, sampled):
        if _is_done(scheduler, request):
            scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
            # Freed in the same step it finished, not at the next schedule().
            assert scheduler.kv_cache.get_block_ids(request.request_id) == []
    scheduler.kv_cache.check_invariants()
    return output


def _run_until_idle(scheduler: Scheduler, max_steps: int = 10_000) -> list[SchedulerOutput]:
    outputs = []
    while scheduler.has_unfinished_requests():
        assert len(outputs) < max_steps, "the scheduler hung"
        outputs.append(_step(scheduler))
    assert scheduler.kv_cache.num_used_blocks == 0, "blocks still owned when idle"
    idle = scheduler.schedule()
    assert idle.is_empty
    runner_view = _RUNNER_VIEWS.setdefault(scheduler, {})
    apply_scheduler_output(runner_view, idle)
    assert runner_view == {}, "the runner would keep state for finished requests"
    return outputs


def _scheduled_tokens(output: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: s.num_new_tokens for s in output.scheduled}


def test_chunked_prefill_takes_four_steps_and_samples_only_on_the_last() -> None:
    scheduler = _scheduler(budget=32, blocks=64)
    scheduler.add_request(_request("a", 100, 2))
    chunks = []
    for _ in range(4):
        [s] = _step(scheduler).scheduled
        chunks.append((s.start, s.num_new_tokens, s.samples))
    assert chunks == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]
    request = scheduler.get_request("a")
    assert request is not None and request.num_output_tokens == 1 and request.first_token_time is not None


def test_decodes_and_a_new_prompt_chunk_share_a_step() -> None:
    scheduler = _scheduler(budget=20)
    scheduler.add_request(_request("a", 5, 3))
    scheduler.add_request(_request("b", 6, 1))
    first = _step(scheduler)
    assert _scheduled_tokens(first) == {"a": 5, "b": 6}
    assert scheduler.get_request("b") is None  # done after one token: left at once
    scheduler.add_request(_request("c", 40, 2))
    second = _step(scheduler)
    assert [(s.request_id, s.num_new_tokens, s.is_decode) for s in second.scheduled] == [
        ("a", 1, True), ("c", 19, False)]  # a's decode and a chunk of c's prompt, in one step
    _run_until_idle(scheduler)


def test_a_new_request_joins_at_the_next_step_and_a_finished_one_leaves_at_once() -> None:
    scheduler = _scheduler(budget=64)
    scheduler.add_request(_request("long", 8, 20))
    scheduler.add_request(_request("brief", 8, 3))
    for _ in range(3):
        _step(scheduler)  # both mid-generation; "brief" finishes in the third step
    assert scheduler.get_request("brief") is None and scheduler.get_request("long") is not None
    scheduler.add_request(_request("late", 12, 2))
    late = scheduler.get_request("late")
    output = _step(scheduler)
    assert _scheduled_tokens(output) == {"long": 1, "late": 12}  # "brief" is absent, "late" is in
    assert late is not None and late.first_scheduled_time is not None and late.num_output_tokens == 1
    _run_until_idle(scheduler)


@pytest.mark.parametrize("long_prompt", [2000, 8000])
def test_a_short_request_behind_a_long_prompt_samples_at_the_next_step(long_prompt: int) -> None:
    # Bound: one step, whatever the long prompt's length. While "short" waits with a seat free, the long
    # prompt's chunk is capped at budget // 4 = 64 tokens, leaving 192 >= 10 for "short", which is
    # admitted and computes its whole prompt, so it samples in that same step. Without the cap the long
    # prompt would take all 256 tokens of every step until its prefill ended: 8 steps for 2000 tokens,
    # 32 for 8000.
    scheduler = _scheduler(budget=256, blocks=2100, block_size=4, max_model_len=10_000)
    scheduler.add_request(_request("long", long_prompt, 4))
    assert _scheduled_tokens(_step(scheduler)) == {"long": 256}  # alone: uncapped
    scheduler.add_request(_request("short", 10, 4))
    short = scheduler.get_request("short")
    output = _step(scheduler)
    assert short is not None and short.num_output_tokens == 1
    # The cap costs no throughput: the budget "short" did not use went back to the long prompt.
    assert _scheduled_tokens(output) == {"long": 246, "short": 10}
    _run_until_idle(scheduler)


def test_a_short_request_behind_a_blocked_head_waits_its_turn() -> None:
    # FIFO admission: "big" cannot get blocks while "hog" holds most of the pool, and "small" (which
    # would fit) does not overtake it, so "big" is not starved by a stream of small requests.
    scheduler = _scheduler(budget=64, blocks=10, block_size=4)  # 40 tokens
    scheduler.add_request(_request("hog", 28, 4))
    _step(scheduler)
    scheduler.add_request(_request("big", 30, 2))
    scheduler.add_request(_request("small", 2, 2))
    output = _step(scheduler)
    assert _scheduled_tokens(output) == {"hog": 1}
    assert [r.request_id for r in scheduler.waiting] == ["big", "small"]
    big, small = scheduler.waiting
    while scheduler.has_unfinished_requests():
        _step(scheduler)
        assert big.first_scheduled_time is not None or small.first_scheduled_time is None
    assert big.first_scheduled_time is not None and small.first_scheduled_time is not None
    assert big.first_scheduled_time <= small.first_scheduled_time
    assert big.num_output_tokens == small.num_output_tokens == 2


def test_the_chunk_cap_applies_only_when_someone_else_could_be_admitted() -> None:
    scheduler = _scheduler(budget=64, max_seqs=2, blocks=400)
    scheduler.add_request(_request("first", 300, 2))
    scheduler.add_request(_request("second", 300, 2))
    # Both admitted with capped chunks (16 each), then the leftover 32 goes to the oldest.
    assert _scheduled_tokens(_step(scheduler)) == {"first": 48, "second": 16}
    scheduler.add_request(_request("third", 10, 2))
    # "third" waits, but no seat is free (max_num_seqs=2): capping would only spread the budget over both
    # prompts and delay the first one's first token, so the oldest takes it all.
    for _ in range(3):
        assert _scheduled_tokens(_step(scheduler)) == {"first": 64}
    assert _scheduled_tokens(_step(scheduler)) == {"first": 60, "second": 4}  # its prompt's last 60
    _run_until_idle(scheduler)


def test_preemption_takes_the_newest_frees_its_blocks_and_it_completes_after_recompute(
        caplog: pytest.LogCaptureFixture) -> None:
    # 48 tokens of KV; each request needs up to 19, so three cannot all finish together. max_num_seqs=3
    # keeps r3 waiting, so a victim has to jump ahead of it to the front of the queue.
    scheduler = _scheduler(budget=64, max_seqs=3, blocks=12, block_size=4)
    requests = [_request(f"r{i}", 10, 10) for i in range(4)]
    for request in requests:
        scheduler.add_request(request)
    preempted_seen: list[str] = []
    first_seen: dict[str, float | None] = {}
    with caplog.at_level(logging.WARNING, logger="conveyor.engine.scheduler"):
        while scheduler.has_unfinished_requests():
            running_before = [r.request_id for r in scheduler.running]
            output = _step(scheduler)
            for s in output.scheduled:
                request = next(r for r in requests if r.request_id == s.request_id)
                first_seen.setdefault(s.request_id, request.first_scheduled_time)
            victims = output.preempted_request_ids
            # Victims are the newest running requests, newest first.
            assert victims == running_before[::-1][:len(victims)]
            for position, request_id in enumerate(reversed(victims)):
                victim = next(r for r in requests if r.request_id == request_id)
                assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
                assert scheduler.kv_cache.get_block_ids(request_id) == []  # freed in the step itself
                assert scheduler.waiting[position] is victim  # at the front of the queue
            preempted_seen += victims
    assert preempted_seen[0] == "r2"
    assert scheduler.num_preemptions == len(preempted_seen) == sum(r.num_preemptions for r in requests)
    assert [r.num_output_tokens for r in requests] == [10, 10, 10, 10]
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in requests)
    # Re-admission after a preemption keeps the time the request was first scheduled.
    assert first_seen == {r.request_id: r.first_scheduled_time for r in requests}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == len(preempted_seen) and "preempted request r2" in warnings[0]
    assert "dropping" in warnings[0] and "computed tokens" in warnings[0]
    assert scheduler.kv_cache.num_used_blocks == 0


def test_recompute_covers_the_prompt_and_the_generated_tokens() -> None:
    scheduler = _scheduler(budget=64, blocks=6, block_size=4)  # 24 tokens: one request fits, two do not
    scheduler.add_request(_request("old", 8, 12))
    scheduler.add_request(_request("new", 8, 12))
    new = scheduler.get_request("new")
    assert new is not None
    while not (output := _step(scheduler)).preempted_request_ids:
        pass
    assert output.preempted_request_ids == ["new"] and "new" not in _scheduled_tokens(output)
    generated = new.num_output_tokens
    assert generated > 0 and new.num_tokens == 8 + generated
    while "new" not in _scheduled_tokens(output := _step(scheduler)):
        pass
    [chunk] = [s for s in output.scheduled if s.request_id == "new"]
    # One prefill from position 0 over prompt + generated tokens, sampling the next token at its end.
    assert (chunk.start, chunk.num_new_tokens, chunk.samples) == (0, 8 + generated, True)
    assert new.num_output_tokens == generated + 1
    _run_until_idle(scheduler)
    assert new.num_output_tokens == 12 and new.num_preemptions == 1


@pytest.mark.parametrize(("prompt", "max_tokens", "message"), [
    (100, 1, "the prompt has 100 tokens but max_model_len is 100"),
    (120, None, "the prompt has 120 tokens but max_model_len is 100"),
    (90, 20, r"the prompt \(90 tokens\) plus max_tokens \(20\) is 110 tokens, over max_model_len \(100\)"),
    (30, 60, r"89 tokens of KV cache \(23 blocks\) but the whole KV pool holds 64 tokens \(16 blocks\)"),
    # No max_tokens means "up to max_model_len": 99 tokens of KV, more than this pool holds.
    (10, None, r"99 tokens of KV cache \(25 blocks\) but the whole KV pool holds 64 tokens"),
])
def test_impossible_requests_are_refused_and_nothing_changes(
        prompt: int, max_tokens: int | None, message: str) -> None:
    scheduler = _scheduler(blocks=16, block_size=4, max_model_len=100)
    scheduler.add_request(_request("fine", 5, 2))
    _step(scheduler)
    scheduler.add_request(_request("queued", 5, 2))
    before = ([r.request_id for r in scheduler.waiting], [r.request_id for r in scheduler.running],
              sorted(scheduler.requests), scheduler.kv_cache.num_used_blocks, scheduler.step_index)
    with pytest.raises(ValueError, match=message):
        scheduler.add_request(_request("bad", prompt, max_tokens))
    after = ([r.request_id for r in scheduler.waiting], [r.request_id for r in scheduler.running],
             sorted(scheduler.requests), scheduler.kv_cache.num_used_blocks, scheduler.step_index)
    assert after == before and scheduler.get_request("bad") is None
    _run_until_idle(scheduler)


def test_a_request_that_exactly_fits_the_pool_is_accepted_and_finishes() -> None:
    scheduler = _scheduler(budget=16, blocks=16, block_size=4, max_model_len=100)
    scheduler.add_request(_request("whole-pool", 30, 35))  # 64 tokens of KV: the whole pool
    request = scheduler.get_request("whole-pool")
    assert request is not None
    _run_until_idle(scheduler)
    assert request.num_output_tokens == 35


def test_duplicate_ids_and_unfinished_statuses_are_refused() -> None:
    scheduler = _scheduler()
    scheduler.add_request(_request("a", 5, 2))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(_request("a", 5, 2))
    with pytest.raises(ValueError, match="finished status"):
        scheduler.finish_request("a", RequestStatus.RUNNING)
    assert scheduler.num_waiting == 1


def test_no_max_tokens_runs_until_max_model_len() -> None:
    scheduler = _scheduler(budget=32, blocks=32, block_size=4, max_model_len=50)
    request = _request("open", 20, None)
    scheduler.add_request(request)
    _run_until_idle(scheduler)
    assert request.num_output_tokens == 30


def test_abort_frees_blocks_at_once_wherever_the_request_is_and_is_idempotent() -> None:
    scheduler = _scheduler(budget=64, max_seqs=2)
    for request_id in ("a", "b", "c"):
        scheduler.add_request(_request(request_id, 20, 5))
    _step(scheduler)  # a and b run; c waits for a seat
    used, owned_by_a = scheduler.kv_cache.num_used_blocks, len(scheduler.kv_cache.get_block_ids("a"))
    assert owned_by_a > 0 and scheduler.num_waiting == 1
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler.kv_cache.num_used_blocks == used - owned_by_a
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("unknown", RequestStatus.FINISHED_ABORTED)
    scheduler.finish_request("c", RequestStatus.FINISHED_ABORTED)  # aborted while waiting
    assert scheduler.num_waiting == 0 and scheduler.num_running == 1
    assert [s.request_id for s in _step(scheduler).scheduled] == ["b"]
    b = scheduler.get_request("b")
    _run_until_idle(scheduler)
    assert b is not None and b.status == RequestStatus.FINISHED_LENGTH
    scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED)  # aborting a finished request: no-op
    assert b.status == RequestStatus.FINISHED_LENGTH


def test_a_request_aborted_while_its_step_runs_gets_no_token() -> None:
    scheduler = _scheduler()
    scheduler.add_request(_request("a", 5, 3))
    scheduler.add_request(_request("b", 5, 3))
    a = scheduler.get_request("a")
    output = scheduler.schedule()
    runner_view = _RUNNER_VIEWS.setdefault(scheduler, {})
    apply_scheduler_output(runner_view, output)
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    updated = scheduler.update_from_output(output, {"a": FAKE_TOKEN, "b": FAKE_TOKEN})
    runner_view["b"].token_ids.append(FAKE_TOKEN)
    assert [r.request_id for r in updated] == ["b"]
    assert a is not None and a.num_output_tokens == 0
    scheduler.kv_cache.check_invariants()
    _run_until_idle(scheduler)  # and the runner is told both finished


@pytest.mark.parametrize("prefix_caching", [False, True])
@pytest.mark.parametrize("seed", range(10))
def test_random_traffic_keeps_every_invariant(seed: int, prefix_caching: bool) -> None:
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 8])
    scheduler = _scheduler(budget=rng.choice([1, 3, 8, 16, 48]), max_seqs=rng.choice([1, 2, 4, 16]),
                           blocks=rng.choice([6, 12, 40, 200]) * 8 // block_size, block_size=block_size,
                           max_model_len=rng.choice([48, 96]), prefix_caching=prefix_caching)
    arrivals: dict[int, list[Request]] = {}
    for n in range(40):
        max_tokens = None if rng.random() < 0.1 else rng.randint(1, 30)
        arrivals.setdefault(rng.randrange(80), []).append(_request(f"r{n}", rng.randint(1, 47), max_tokens))
    accepted: list[Request] = []
    aborted: set[str] = set()
    step = hits = 0
    while arrivals or scheduler.has_unfinished_requests():
        assert step < 20_000, "the scheduler hung"
        for request in arrivals.pop(step, []):
            try:
                scheduler.add_request(request)
            except ValueError:
                continue  # could never fit in this tiny configuration: refused up front, never hangs
            accepted.append(request)
        if scheduler.has_unfinished_requests() and rng.random() < 0.03:
            victim = rng.choice(sorted(scheduler.requests))  # running, waiting or preempted
            kv_cache = scheduler.kv_cache
            # Its blocks that no other request shares go back to the pool at once.
            owned = sum(1 for b in kv_cache.get_block_ids(victim) if kv_cache.pool.ref_counts[b] == 1)
            used = kv_cache.num_used_blocks
            scheduler.finish_request(victim, RequestStatus.FINISHED_ABORTED)
            assert kv_cache.num_used_blocks == used - owned
            aborted.add(victim)
        hits += _step(scheduler).num_prefix_cache_hits
        step += 1
    assert scheduler.kv_cache.num_used_blocks == 0 and scheduler.schedule().is_empty
    assert accepted, "the configuration refused everything: the test would prove nothing"
    # Every prompt repeats one token, so with caching on later requests share earlier ones' blocks.
    assert (hits > 0) == prefix_caching
    for request in accepted:
        if request.request_id in aborted:
            assert request.status == RequestStatus.FINISHED_ABORTED
            continue
        max_tokens = request.sampling_params.max_tokens
        expected = scheduler.max_model_len - request.num_prompt_tokens if max_tokens is None else max_tokens
        assert request.num_output_tokens == expected and request.status == RequestStatus.FINISHED_LENGTH
        assert request.output_token_ids == [FAKE_TOKEN] * expected
