"""The simulator drives the real scheduler on a virtual clock: small scenarios computed by hand."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from conveyor.config import EngineConfig
from conveyor.tune.cost_model import RowShape
from conveyor.tune.simulator import SimRequest, simulate


def _ten_ms_plus_one_per_token(rows: Sequence[RowShape]) -> float:
    return 0.010 + 0.001 * sum(row.num_new for row in rows)


def _config(**overrides: object) -> EngineConfig:
    values = dict(max_num_seqs=2, max_num_batched_tokens=8, prefill_chunk_share=2, block_size=4,
                  num_kv_blocks=64, max_model_len=64, enable_prefix_caching=False)
    return EngineConfig(**{**values, **overrides})  # type: ignore[arg-type]


def test_a_small_schedule_matches_the_hand_computed_one() -> None:
    requests = [SimRequest("a", 0.0, list(range(10, 16)), 2), SimRequest("b", 0.0, list(range(20, 23)), 2),
                SimRequest("c", 0.020, [30, 31], 1)]
    run = simulate(_config(), _ten_ms_plus_one_per_token, requests)
    # Step 1 (t=0): a gets a capped chunk of 4 (8 // 2), b its 3 tokens, then pass 3 gives a one more: 8
    # tokens, 18 ms; b samples. Step 2 (t=18 ms, c not arrived yet, no cap): a's last prompt token and b's
    # decode, 12 ms; a samples, b is done. Step 3 (t=30 ms): c joins; a decodes, c's 2 tokens: 13 ms.
    by_id = {r.request.request_id: r for r in run.results}
    assert by_id["a"].token_times == pytest.approx([0.030, 0.043])
    assert by_id["b"].token_times == pytest.approx([0.018, 0.030])
    assert by_id["c"].ttft == pytest.approx(0.023)
    assert by_id["a"].itls == pytest.approx([0.013]) and by_id["b"].e2e == pytest.approx(0.030)
    assert (run.num_steps, run.duration, run.num_preemptions) == (3, pytest.approx(0.043), 0)
    assert [r.request.request_id for r in run.results] == ["b", "a", "c"]


@pytest.mark.parametrize("prefix_caching, second_ttft", [(True, 0.011), (False, 0.019)])
def test_a_shared_prefix_is_a_real_cache_hit(prefix_caching: bool, second_ttft: float) -> None:
    shared = list(range(100, 108))  # two full blocks of 4
    requests = [SimRequest("first", 0.0, shared + [1], 1), SimRequest("second", 1.0, shared + [2], 1)]
    run = simulate(_config(max_num_batched_tokens=16, prefill_chunk_share=1, enable_prefix_caching=prefix_caching),
                   _ten_ms_plus_one_per_token, requests)
    ttfts = [r.ttft for r in run.results]
    # The first computes its 9 tokens (19 ms); the second finds 8 cached and computes 1 (11 ms), or all 9.
    assert ttfts == pytest.approx([0.019, second_ttft])


def test_a_small_kv_pool_preempts_and_the_victim_recomputes() -> None:
    # 4 blocks of 4 = 16 tokens; two requests of 6 prompt + 4 output need 9 KV tokens each: one is preempted.
    requests = [SimRequest("a", 0.0, list(range(10, 16)), 4), SimRequest("b", 0.0, list(range(20, 26)), 4)]
    run = simulate(_config(num_kv_blocks=4, max_num_batched_tokens=16, prefill_chunk_share=1),
                   _ten_ms_plus_one_per_token, requests)
    assert run.num_preemptions >= 1
    assert sorted(len(r.token_times) for r in run.results) == [4, 4]


def test_follow_ups_arrive_after_their_parent_finishes() -> None:
    def next_turn(result, clock):  # type: ignore[no-untyped-def]
        if result.request.request_id != "turn1":
            return []
        return [SimRequest("turn2", clock + 0.5, result.request.prompt_token_ids + [7, 8], 1)]

    run = simulate(_config(), _ten_ms_plus_one_per_token, [SimRequest("turn1", 0.0, [1, 2, 3], 1)], next_turn)
    assert [r.request.request_id for r in run.results] == ["turn1", "turn2"]
    assert run.results[1].request.arrival_time == pytest.approx(0.013 + 0.5)
    assert run.results[1].token_times == pytest.approx([0.513 + 0.015])
