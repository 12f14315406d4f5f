"""The flat batch: no padding, slots from block tables, masks that keep requests and windows apart."""

from __future__ import annotations

import torch

from conveyor.engine.batch import CachedRequestState, ModelInput, build_model_input
from conveyor.engine.scheduler_output import ScheduledRequest, SchedulerOutput
from conveyor.sampling_params import SamplingParams

BLOCK = 4

Scheduled = tuple[ScheduledRequest, CachedRequestState]


def _scheduled(request_id: str, num_tokens: int, computed: int, new: int, blocks: list[int]) -> Scheduled:
    """A request of `num_tokens` known tokens (ids 100, 101, ...), `computed` of them cached, `new` to run."""
    state = CachedRequestState(request_id, list(range(100, 100 + num_tokens)), num_tokens, SamplingParams(),
                               [], blocks, None)
    scheduled = ScheduledRequest(request_id, computed, new, [], samples=computed + new == num_tokens,
                                 is_decode=new == 1)
    return scheduled, state


def _build(rows: list[Scheduled], window: int | None) -> ModelInput:
    output = SchedulerOutput(0, [scheduled for scheduled, _ in rows])
    states = {state.request_id: state for _, state in rows}
    return build_model_input(output, states, BLOCK, window, torch.device("cpu"))


def test_flat_batch_has_no_padding_and_maps_slots_through_block_tables() -> None:
    decode = _scheduled("d", 10, 9, 1, [7, 3, 5])  # token 9 lives in block 5, offset 1
    chunk = _scheduled("p", 12, 4, 6, [2, 8, 6])  # tokens 4..9 of 12: a middle chunk, no sampling
    model_input = _build([decode, chunk], None)
    assert model_input.input_ids.tolist() == [109] + list(range(104, 110))
    assert model_input.positions.tolist() == [9, 4, 5, 6, 7, 8, 9]
    assert model_input.attention.slot_mapping.tolist() == [5 * 4 + 1, 8 * 4, 8 * 4 + 1, 8 * 4 + 2, 8 * 4 + 3,
                                                          6 * 4, 6 * 4 + 1]
    assert model_input.logits_indices.tolist() == [0]  # only the decode samples
    assert model_input.sampling_request_ids == ["d"]
    [prefill] = model_input.attention.full.prefills
    assert (prefill.query_start, prefill.query_end) == (1, 7)
    assert prefill.key_slots.tolist() == [8, 9, 10, 11, 32, 33, 34, 35, 24, 25]  # keys 0..9
    assert prefill.mask.tolist()[0] == [True] * 5 + [False] * 5  # query 4 sees keys 0..4


def test_decode_mask_covers_exactly_the_context_and_the_window() -> None:
    short = _scheduled("a", 3, 2, 1, [1])
    long = _scheduled("b", 11, 10, 1, [4, 2, 9])
    full = _build([short, long], None).attention.full
    # Lengths 3 and 11 are too different to share a padded call: two groups, longest first.
    assert [g.token_indices.tolist() for g in full.decode_groups] == [[1], [0]]
    assert [g.blocks.tolist() for g in full.decode_groups] == [[[4, 2, 9]], [[1]]]
    assert [int(g.mask.sum()) for g in full.decode_groups] == [11, 3]
    sliding = _build([short, long], 5).attention.sliding
    # Request b's query at position 10 sees keys 6..10: blocks 1 and 2 of its table, i.e. 2 and 9.
    [group] = sliding.decode_groups  # within the window both rows see at most 2 blocks: one call
    assert group.token_indices.tolist() == [0, 1] and group.blocks[1].tolist() == [2, 9]
    assert group.rows == slice(0, 2)  # consecutive rows: attention takes them as a view
    visible = group.mask[1, 0, 0].nonzero().flatten().tolist()
    assert [4 + i for i in visible] == [6, 7, 8, 9, 10]


def test_decode_rows_of_similar_length_share_a_group_with_little_padding() -> None:
    rows = [_scheduled(str(i), n, n - 1, 1, list(range(100 * i, 100 * i + 40))) for i, n in
            enumerate([150, 40, 148, 10, 41, 160])]
    groups = _build(rows, None).attention.full.decode_groups
    assert sorted(i for g in groups for i in g.token_indices.tolist()) == list(range(6))
    for group in groups:
        real = int(group.mask.sum())
        assert real / (group.mask.shape[-1] * len(group.token_indices)) > 0.6  # padding stays bounded
    assert len(groups) == 3  # {160, 150, 148}, {41, 40}, {10}


def test_sliding_prefill_chunk_sees_only_its_window() -> None:
    chunk = _scheduled("p", 12, 8, 4, [0, 1, 2])  # queries 8..11, window 3: keys 6..11
    view = _build([chunk], 3).attention.sliding
    [prefill] = view.prefills
    assert prefill.key_slots.tolist() == [6, 7, 8, 9, 10, 11]
    assert prefill.mask.int().tolist() == [[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0],
                                           [0, 0, 0, 1, 1, 1]]
