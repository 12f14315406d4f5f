"""Prefix caching: exact hits, reference counts, LRU eviction, collisions that miss, shared prefixes
computed once, and the engine's outputs equal with caching on and off."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conveyor.config import EngineConfig
from conveyor.engine import kv_cache as kv_cache_module
from conveyor.engine.engine import LLMEngine
from conveyor.engine.kv_cache import KVCacheManager
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.scheduler import Scheduler
from conveyor.sampling_params import SamplingParams

BLOCK = 4


def _request(request_id: str, tokens: list[int], max_tokens: int = 4) -> Request:
    return Request(request_id, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _compute(manager: KVCacheManager, request: Request, cached: list[int] | None = None) -> None:
    """Admit the request with its cached prefix and compute all its tokens, as a step would."""
    num_cached = len(cached or []) * BLOCK
    assert manager.allocate_slots(request, request.num_tokens - num_cached, cached)
    request.num_computed_tokens = request.num_tokens
    manager.register_full_blocks(request)


def test_a_repeated_prompt_takes_the_cached_blocks_up_to_one_token_short() -> None:
    manager = KVCacheManager(16, BLOCK, enable_prefix_caching=True)
    first = _request("a", list(range(10, 22)))  # 12 tokens: three full blocks
    assert manager.find_cached_prefix(first) == []
    _compute(manager, first)
    same = _request("b", list(range(10, 22)))
    hit = manager.find_cached_prefix(same)
    # At most num_tokens - 1 tokens come from the cache: the last block is computed again to sample.
    assert hit == manager.get_block_ids("a")[:2]
    longer = _request("c", list(range(10, 22)) + [99, 98])
    assert manager.find_cached_prefix(longer) == manager.get_block_ids("a")[:3]
    _compute(manager, same, hit)
    assert manager.get_block_ids("b")[:2] == hit and manager.pool.ref_counts[hit[0]] == 2
    manager.check_invariants()
    manager.free(first)
    assert manager.pool.ref_counts[hit[0]] == 1 and manager.num_cached_blocks == 1  # a's third block
    manager.free(same)
    manager.check_invariants()
    # a's three blocks; b's own third block holds the same tokens as a's (a duplicate, never findable).
    assert manager.num_used_blocks == 0 and manager.num_cached_blocks == 3
    other = _request("d", [5] + list(range(11, 22)))  # differs in the first token: no hit at all
    assert manager.find_cached_prefix(other) == []


def test_cached_blocks_are_evicted_least_recently_freed_first_and_stay_exact() -> None:
    manager = KVCacheManager(4, BLOCK, enable_prefix_caching=True)
    old, new = _request("old", list(range(8))), _request("new", list(range(100, 108)))
    _compute(manager, old)
    manager.free(old)
    _compute(manager, new)
    manager.free(new)
    assert manager.num_cached_blocks == 4 and manager.num_free_blocks == 4
    big = _request("big", list(range(200, 208)))
    _compute(manager, big)  # needs two blocks: the old request's, freed first, go first
    assert manager.find_cached_prefix(_request("x", list(range(9)))) == []
    assert len(manager.find_cached_prefix(_request("y", list(range(100, 109))))) == 2
    manager.check_invariants()


def test_forced_hash_collisions_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = KVCacheManager(16, BLOCK, enable_prefix_caching=True)
    monkeypatch.setattr(kv_cache_module, "hash_block", lambda parent, tokens: 7)  # every block collides
    _compute(manager, _request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert manager.find_cached_prefix(_request("b", [1, 2, 3, 5, 5, 6, 7, 8, 9])) == []  # other tokens
    manager = KVCacheManager(16, BLOCK, enable_prefix_caching=True)
    # A hash blind to the parent: "c"'s second block collides with "a"'s, tokens and all.
    monkeypatch.setattr(kv_cache_module, "hash_block", lambda parent, tokens: hash(tokens))
    _compute(manager, _request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    _compute(manager, _request("c", [4, 4, 4, 4, 5, 6, 7, 8, 0]))
    hit = manager.find_cached_prefix(_request("d", [4, 4, 4, 4, 5, 6, 7, 8, 1]))
    # "c"'s first block is found; "a"'s second block was computed after another first block: a miss.
    assert hit == manager.get_block_ids("c")[:1]
    assert manager.find_cached_prefix(_request("e", [1, 2, 3, 4, 5, 6, 7, 8, 1])) == manager.get_block_ids("a")[:2]


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_every_hit_holds_exactly_the_request_s_prefix(seed: int) -> None:
    """A reference model: each block remembers the whole token prefix computed into it; every hit must
    hand out blocks whose remembered prefix is the request's own."""
    rng = random.Random(seed)
    manager = KVCacheManager(24, BLOCK, enable_prefix_caching=True)
    held_prefix: dict[int, tuple[int, ...]] = {}
    live: list[Request] = []
    system_prompts = [[rng.randrange(3) for _ in range(rng.randrange(4, 12))] for _ in range(3)]
    for step in range(300):
        if live and rng.random() < 0.4:
            manager.free(live.pop(rng.randrange(len(live))))
        tokens = rng.choice(system_prompts) + [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
        request = _request(f"r{step}", tokens)
        hit = manager.find_cached_prefix(request)
        for index, block in enumerate(hit):
            assert held_prefix[block] == tuple(tokens[:(index + 1) * BLOCK])
        if not manager.allocate_slots(request, request.num_tokens - len(hit) * BLOCK, hit):
            continue
        request.num_computed_tokens = request.num_tokens
        manager.register_full_blocks(request)
        for index, block in enumerate(manager.get_block_ids(request.request_id)):
            if index >= len(hit):  # blocks this request computed (its partial last block included)
                held_prefix[block] = tuple(tokens[:(index + 1) * BLOCK])
        live.append(request)
        manager.check_invariants()
        used, cached, free = manager.num_used_blocks, manager.num_cached_blocks, manager.num_free_blocks
        assert used + free == 24 and cached <= free


def test_requests_sharing_an_uncached_prefix_compute_it_once() -> None:
    config = EngineConfig(max_num_batched_tokens=64, max_num_seqs=8, block_size=BLOCK, dtype="float32")
    scheduler = Scheduler(config, 64, 4096)
    shared = list(range(10, 30))  # five blocks
    for name in "abc":
        scheduler.add_request(_request(name, shared + [ord(name)], max_tokens=1))
    computed = 0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        computed += output.total_num_scheduled_tokens
        for request in scheduler.update_from_output(output, {s.request_id: 0 for s in output.scheduled
                                                              if s.samples}):
            scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
    # "a" computes 21 tokens; "b" and "c" wait a step, then take the 20 shared ones from the cache.
    assert computed == 21 + 1 + 1
    assert scheduler.kv_cache.num_used_blocks == 0


def _turns(engine: LLMEngine, conversations: list[list[int]], turns: int) -> list[tuple[list[int], list[float]]]:
    """Multi-turn chats: each turn's prompt is the previous prompt, its answer and a new message.
    Returns each answer's token ids and their logprobs."""
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=2)
    answers: list[tuple[list[int], list[float]]] = []
    prompts = [list(c) for c in conversations]
    for turn in range(turns):
        for index, prompt in enumerate(prompts):
            engine.add_request(prompt, params, request_id=f"{turn}-{index}")
        finals = {}
        while engine.has_unfinished_requests():
            for output in engine.step()[0]:
                if output.finished:
                    finals[output.request_id] = output
        for index in range(len(prompts)):
            completion = finals[f"{turn}-{index}"].outputs[0]
            assert completion.logprobs is not None
            chosen = [position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs)]
            answers.append((completion.token_ids, chosen))
            prompts[index] = prompts[index] + completion.token_ids + [17 + turn, 23 + index]
    return answers


def test_greedy_outputs_and_logprobs_are_the_same_with_caching_on_and_off(tiny_model_dirs: dict[str, Path]
                                                                          ) -> None:
    system = [2] + [(7 * i) % 200 + 5 for i in range(30)]
    conversations = [system + [40 + i, 41 + i] for i in range(3)]
    results = {}
    for caching in (False, True):
        engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["gemma3"]), block_size=BLOCK, num_kv_blocks=256,
                                        enable_prefix_caching=caching, dtype="float32"))
        results[caching] = _turns(engine, conversations, turns=3)
        hits = sum(s.prefix_cache_hits for s in engine.trace or [])
        assert (hits > 0) == caching
    _assert_same_answers(results[True], results[False])


@pytest.mark.slow
def test_default_model_multi_turn_chats_are_the_same_with_caching_on_and_off() -> None:
    results, hits = {}, {}
    for caching in (False, True):
        engine = LLMEngine(EngineConfig(max_num_batched_tokens=128, enable_prefix_caching=caching, dtype="float32"))
        system = engine.tokenizer.encode("You are a helpful assistant who answers in short sentences. " * 6)
        conversations = [system + engine.tokenizer.encode(f" Question {i}: what is {i} plus {i}?",
                                                          add_special_tokens=False) for i in range(3)]
        results[caching] = _turns(engine, conversations, turns=3)
        hits[caching] = sum(s.prefix_cache_hits for s in engine.trace or [])
    assert hits[False] == 0 and hits[True] > 0
    _assert_same_answers(results[True], results[False])


def _assert_same_answers(cached: list[tuple[list[int], list[float]]],
                         uncached: list[tuple[list[int], list[float]]]) -> None:
    """The same tokens; logprobs equal up to fp32 summation order (cached K/V were computed in other
    steps, with other batch shapes)."""
    assert [ids for ids, _ in cached] == [ids for ids, _ in uncached]
    for (_, with_cache), (_, without) in zip(cached, uncached):
        assert max(abs(a - b) for a, b in zip(with_cache, without)) < 1e-3
