"""The engine's per-step shortcuts against the paths they skip: the C++ argmax against torch's, the sampler on
logits in the lm_head's dtype against the same logits cast to fp32 first (what it used to get), and the
decode metadata's shortcuts (a sliding view shared with the full one, the lazy mask, consecutive rows taken
as a slice) against building and gathering everything."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from conveyor.engine.sampler import Sampler, SamplingMetadata, SamplingRow
from conveyor.model.argmax import ArgmaxRows, argmax_for, load_argmax_kernel, torch_argmax
from conveyor.model.attention import (
    PagedAttention,
    SequenceSpan,
    _decode_group,
    _group_by_length,
    build_attention_metadata,
)
from conveyor.sampling_params import SamplingParams

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(load_argmax_kernel()[0] is None, reason="the C++ kernel cannot be built here")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("vocab", [5, 16, 1007, 70001])  # under one vector, one vector, a tail, rows split
def test_the_argmax_kernel_returns_torchs_index(dtype: torch.dtype, rows: int, vocab: int) -> None:
    kernel = load_argmax_kernel()[0]
    generator = torch.Generator().manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, generator=generator).to(dtype)
    assert torch.equal(kernel(logits), logits.argmax(-1))
    tied = logits.clone()
    tied[:, ::3] = tied.max()  # many maxima: the first one wins
    tied[-1, vocab // 2:] = float("inf")
    assert torch.equal(kernel(tied), tied.argmax(-1))
    with_nan = logits.clone()
    with_nan[0, vocab - 1] = float("nan")  # torch takes a NaN as the maximum: the first NaN
    with_nan[-1, vocab // 3] = with_nan[-1, vocab // 2] = float("nan")
    assert torch.equal(kernel(with_nan), with_nan.argmax(-1))
    assert torch.equal(kernel(torch.full_like(logits, float("-inf"))), torch.zeros(rows, dtype=torch.long))
    wide = torch.randn(rows, vocab + 9, generator=generator).to(dtype)
    assert torch.equal(kernel(wide[:, 9:]), wide[:, 9:].argmax(-1))  # rows apart in memory
    argmax = argmax_for(CPU)
    assert torch.equal(argmax(logits.t().contiguous().t()), logits.argmax(-1))  # columns apart: copied
    assert torch.equal(argmax(logits.half()), logits.half().argmax(-1))  # a dtype it does not cover: torch's


def test_argmax_for_a_device_without_the_kernel_is_torchs() -> None:
    assert argmax_for(CPU, use_kernel=False) is torch_argmax
    assert argmax_for(torch.device("meta")) is torch_argmax


def _mixed_batch(vocab: int) -> list[SamplingRow]:
    """Every kind of row at once; fresh generators each call, so two calls draw the same."""
    history = [3, 4, 5, 9, 9, 17, 40]
    bitmask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    bitmask[1] = 0b1011  # the grammar allows tokens 32, 33 and 35
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.7, logprobs=0),
        SamplingParams(temperature=0.0, logit_bias={11: 3.0, 12: -2.5}),
        SamplingParams(temperature=0.0),  # the grammar row
        SamplingParams(temperature=0.0, min_tokens=10),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, logprobs=2),
        SamplingParams(temperature=1.1, top_k=20, min_p=0.05, seed=8, repetition_penalty=1.1),
    ]
    rows = []
    for index, p in enumerate(params):
        generator = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
        rows.append(SamplingRow(p, history, 3, [1] if p.min_tokens else [], generator,
                                bitmask if index == 5 else None))
    return rows


def _logits(rows: int, vocab: int, dtype: torch.dtype) -> torch.Tensor:
    # Rounded to the model's dtype, as an lm_head makes them; bf16 has ties a 262k vocabulary does meet.
    return (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(5)) * 4).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("subset", ["all", "greedy only", "greedy with logprobs", "penalties", "grammar"])
def test_the_sampler_on_logits_as_they_come_equals_it_on_fp32_logits(dtype: torch.dtype, subset: str) -> None:
    vocab = 70001
    chosen = {"all": range(9), "greedy only": [0, 0], "greedy with logprobs": [0, 1, 3],
              "penalties": [2, 4, 0], "grammar": [5, 6, 0]}[subset]
    logits = _logits(len(list(chosen)), vocab, dtype)
    fp32 = logits.float()
    for argmax in [torch_argmax, argmax_for(CPU)]:
        ours = Sampler(argmax)(logits.clone(), SamplingMetadata([_mixed_batch(vocab)[i] for i in chosen]))
        reference = Sampler()(fp32.clone(), SamplingMetadata([_mixed_batch(vocab)[i] for i in chosen]))
        assert ours.token_ids == reference.token_ids
        assert ours.logprobs == reference.logprobs
    if subset == "all":
        token_ids = reference.token_ids
        assert token_ids[5] in (32, 33, 35) and token_ids[6] != 1
        assert token_ids[0] == int(fp32[0].argmax())


def test_greedy_rows_never_copy_their_logits() -> None:
    logits = _logits(2, 5000, torch.bfloat16)
    seen: list[torch.Tensor] = []

    def argmax(values: torch.Tensor) -> torch.Tensor:
        seen.append(values)
        return torch_argmax(values)

    Sampler(argmax)(logits, SamplingMetadata([_mixed_batch(5000)[0], _mixed_batch(5000)[1]]))
    assert seen[0] is logits  # bf16 as the lm_head made them: no 32 MiB fp32 copy at 32 rows
    Sampler(argmax)(logits, SamplingMetadata([_mixed_batch(5000)[0], _mixed_batch(5000)[2]]))
    assert seen[1].dtype == torch.float32  # a penalty computes in fp32, as it always did


def _spans(lengths: list[int], block_size: int, seed: int) -> list[SequenceSpan]:
    rng = random.Random(seed)
    free = list(range(1, 400))
    rng.shuffle(free)
    return [SequenceSpan(row, n - 1, n, [free.pop() for _ in range(-(-n // block_size))])
            for row, n in enumerate(lengths)]


@pytest.mark.parametrize("lengths", [[7], [30, 31, 29], [5, 60, 6, 61], [100, 3]])
def test_a_window_no_row_reaches_past_shares_the_full_view_and_equals_the_window_view(lengths: list[int]) -> None:
    block_size, window = 4, 64
    spans = _spans(lengths, block_size, seed=len(lengths))
    meta = build_attention_metadata(spans, block_size, window, CPU)
    assert (meta.sliding is meta.full) == (max(lengths) <= window)
    built = [_decode_group(group, block_size, window, CPU) for group in _group_by_length(spans, block_size, window)]
    assert len(built) == len(meta.sliding.decode_groups)
    for ours, reference in zip(meta.sliding.decode_groups, built):
        for name in ("token_indices", "blocks", "key_bounds", "mask"):
            assert torch.equal(getattr(ours, name), getattr(reference, name)), name


def test_the_lazy_mask_marks_exactly_each_rows_visible_keys() -> None:
    block_size, window = 4, 10
    spans = _spans([3, 9, 10, 11, 25, 26], block_size, seed=1)
    for view_window, view in [(None, "full"), (window, "sliding")]:
        meta = build_attention_metadata(spans, block_size, window, CPU)
        for group in getattr(meta, view).decode_groups:
            for row, token in enumerate(group.token_indices.tolist()):
                end = spans[token].end
                first = 0 if view_window is None else max(0, end - view_window)
                first_block = first // block_size
                positions = [first_block * block_size + i for i in group.mask[row, 0, 0].nonzero().flatten().tolist()]
                assert positions == list(range(first, end))
                assert group.blocks[row, :-(-end // block_size) - first_block].tolist() == \
                    spans[token].block_ids[first_block:-(-end // block_size)]


@pytest.mark.parametrize("kernel", [False, True])
def test_consecutive_decode_rows_taken_as_a_slice_equal_the_gathered_rows(kernel: bool) -> None:
    from conveyor.model.paged_decode import load_decode_kernel

    decode_kernel = load_decode_kernel()[0] if kernel else None
    if kernel and decode_kernel is None:
        pytest.skip("the C++ kernel cannot be built here")
    block_size, num_heads, num_kv_heads, head_dim = 4, 4, 1, 32
    spans = _spans([20, 21, 19, 22], block_size, seed=3)
    meta = build_attention_metadata(spans, block_size, None, CPU)
    [group] = meta.full.decode_groups
    assert group.rows == slice(0, 4)
    gathered = dataclasses.replace(meta, full=dataclasses.replace(
        meta.full, decode_groups=[dataclasses.replace(group, rows=None)]))
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(4, num_heads, head_dim, generator=generator)
    k, v = (torch.randn(4, num_kv_heads, head_dim, generator=generator) for _ in range(2))
    k_cache, v_cache = (torch.randn(400, block_size, num_kv_heads, head_dim, generator=generator) for _ in range(2))
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5)
    attention.decode_kernel = decode_kernel
    sliced = attention(q, k, v, k_cache.clone(), v_cache.clone(), meta)
    reference = attention(q, k, v, k_cache.clone(), v_cache.clone(), gathered)
    assert torch.equal(sliced, reference)
    apart = build_attention_metadata(  # a prefill chunk (rows 1-6) between two decode rows
        [spans[0], SequenceSpan(1, 3, 9, spans[1].block_ids), SequenceSpan(7, 18, 19, spans[2].block_ids)],
        block_size, None, CPU)
    assert [g.token_indices.tolist() for g in apart.full.decode_groups] == [[0, 7]]
    assert apart.full.decode_groups[0].rows is None


@pytest.mark.parametrize("argmax", [torch_argmax, argmax_for(CPU)])
def test_penalties_and_biases_on_bf16_logits_compute_in_fp32(argmax: ArgmaxRows) -> None:
    """Logits a bf16 step hands over unrounded to fp32: a penalty or bias computed in bf16 would round
    5.1875 / 1.3 up to 4.0 (tying token 50, so the earlier token 9 won) and 3.0 + 0.01 down to 3.0."""
    logits = torch.full((2, 300), -1.0, dtype=torch.bfloat16)
    logits[0, 9], logits[0, 50] = 5.1875, 4.0  # token 9 was seen: 5.1875 / 1.3 = 3.99 in fp32
    logits[1, 7], logits[1, 11] = 3.0, 3.0
    history = [3, 4, 9]
    rows = [SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=1.3), history, 3),
            SamplingRow(SamplingParams(temperature=0.0, logit_bias={11: 0.01}), history, 3)]
    assert Sampler(argmax)(logits.clone(), SamplingMetadata(rows)).token_ids == [50, 11]
    assert Sampler()(logits.float(), SamplingMetadata(rows)).token_ids == [50, 11]
