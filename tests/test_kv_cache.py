"""Block pool and block tables, on their own: no model, no scheduler."""

from __future__ import annotations

import random

import pytest

from conveyor.engine.kv_cache import BlockPool, KVCacheManager
from conveyor.engine.request import Request
from conveyor.model.attention import slot_mapping
from conveyor.sampling_params import SamplingParams


def _request(request_id: str, prompt_len: int) -> Request:
    return Request(request_id, [1] * prompt_len, SamplingParams(max_tokens=4))


def test_pool_hands_out_fifo_and_refuses_overdraw_without_taking_anything() -> None:
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) is None and pool.num_free_blocks == 1  # all or nothing
    pool.free([1, 0])
    # Freed blocks join the tail: the never-used block 3 goes first, then 1 and 0 in the order freed.
    assert pool.allocate(3) == [3, 1, 0]
    assert pool.allocate(0) == [] and pool.num_free_blocks == 0
    with pytest.raises(ValueError):
        pool.allocate(-1)
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_slots_grows_the_table_to_cover_computed_plus_new_tokens() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4)
    request = _request("a", 10)
    assert manager.num_blocks_needed(request, 5) == 2
    assert manager.allocate_slots(request, 5)  # tokens 0..4
    assert manager.get_block_ids("a") == [0, 1]
    request.num_computed_tokens = 5
    assert manager.num_blocks_needed(request, 3) == 0  # tokens 5..7 fit in block 1
    assert manager.allocate_slots(request, 3) and manager.get_block_ids("a") == [0, 1]
    request.num_computed_tokens = 8
    assert manager.num_blocks_needed(request, 2) == 1
    assert manager.allocate_slots(request, 2) and manager.get_block_ids("a") == [0, 1, 2]
    assert manager.num_used_blocks == 3 and manager.num_free_blocks == 5
    assert manager.num_allocatable_tokens(request) == (3 + 5) * 4 - 8
    manager.check_invariants()


def test_allocation_is_all_or_nothing_and_free_is_idempotent() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    first, second = _request("a", 5), _request("b", 4)
    assert manager.allocate_slots(first, 5) and manager.get_block_ids("a") == [0, 1, 2]
    assert not manager.allocate_slots(second, 4)  # needs 2 blocks, 1 free
    assert manager.get_block_ids("b") == [] and manager.num_used_blocks == 3
    manager.free(first)
    manager.free(first)
    manager.free(second)  # owns nothing: fine
    assert manager.num_used_blocks == 0 and manager.get_block_ids("a") == []
    manager.check_invariants()


def test_get_block_ids_is_a_copy() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    request = _request("a", 3)
    manager.allocate_slots(request, 3)
    manager.get_block_ids("a").append(99)
    assert manager.get_block_ids("a") == [0, 1]


def test_a_request_s_blocks_are_freed_tail_first() -> None:
    # The last blocks of a sequence are the least likely to be shared once prefix caching exists, so they
    # are queued to be reused before its first blocks.
    manager = KVCacheManager(num_blocks=3, block_size=1)
    request = _request("a", 3)
    manager.allocate_slots(request, 3)
    manager.free(request)
    assert manager.pool.free_block_ids() == [2, 1, 0]


def test_slot_mapping_follows_the_block_table() -> None:
    # Tokens 2..7 of a request owning blocks [5, 2] of size 4: slots 22, 23 in block 5, then 8..11 in block 2.
    assert slot_mapping([5, 2], 2, 8, 4) == [22, 23, 8, 9, 10, 11]
    assert slot_mapping([5, 2], 3, 3, 4) == []


def test_check_invariants_catches_a_block_owned_twice_or_leaked() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=2)
    request = _request("a", 2)
    manager.allocate_slots(request, 2)
    manager._block_tables["b"] = list(manager._block_tables["a"])  # corrupt: block 0 owned twice
    with pytest.raises(AssertionError, match="owned"):
        manager.check_invariants()
    del manager._block_tables["b"]
    manager.pool._free.popitem(last=False)  # corrupt: a block neither free nor owned
    with pytest.raises(AssertionError):
        manager.check_invariants()


@pytest.mark.parametrize("seed", range(4))
def test_random_allocate_and_free_keep_free_plus_owned_equal_total(seed: int) -> None:
    rng = random.Random(seed)
    manager = KVCacheManager(num_blocks=rng.choice([1, 7, 32]), block_size=rng.choice([1, 3, 16]))
    live: dict[str, Request] = {}
    for n in range(400):
        if live and rng.random() < 0.3:
            request = live.pop(rng.choice(sorted(live)))
            owned = len(manager.get_block_ids(request.request_id))
            before = manager.num_free_blocks
            manager.free(request)
            assert manager.num_free_blocks == before + owned
        else:
            request = live.get(rng.choice(sorted(live))) if live and rng.random() < 0.5 else None
            if request is None:
                request = live.setdefault(f"r{n}", _request(f"r{n}", 1))
            else:
                request.num_computed_tokens += rng.randint(0, 8)
            new = rng.randint(1, 20)
            needed, free = manager.num_blocks_needed(request, new), manager.num_free_blocks
            assert manager.allocate_slots(request, new) == (needed <= free)
            if needed <= free:
                assert len(manager.get_block_ids(request.request_id)) * manager.block_size >= (
                    request.num_computed_tokens + new)
        manager.check_invariants()
    for request in live.values():
        manager.free(request)
    assert manager.num_free_blocks == manager.num_total_blocks
    manager.check_invariants()
