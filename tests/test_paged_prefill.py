"""Prefill attention read in place by the C++ kernel, against the torch reference path, and the fallback."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from conveyor import LLM, SamplingParams
from conveyor.model.attention import PagedAttention, PrefillKernel, SequenceSpan, build_attention_metadata
from conveyor.model.paged_decode import apply_attention_kernel
from conveyor.model.paged_prefill import apply_prefill_kernel, load_prefill_kernel, prefill_unavailable_reason
from tests.conftest import TINY_ARCHITECTURES
from tests.reference import assert_same_tokens_and_logprobs

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(load_prefill_kernel()[0] is None, reason="the C++ kernel cannot be built here")


def _step(chunks: list[tuple[int, int]], decodes: list[int], block_size: int, num_blocks: int,
          seed: int) -> list[SequenceSpan]:
    """Prefill chunks (start, end) and decode rows (context lengths) in one step, blocks scattered
    through the pool."""
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    spans, row = [], 0
    for length in decodes:
        spans.append(SequenceSpan(row, length - 1, length, [free.pop() for _ in range(-(-length // block_size))]))
        row += 1
    for start, end in chunks:
        spans.append(SequenceSpan(row, start, end, [free.pop() for _ in range(-(-end // block_size) + 1)]))
        row += end - start
    return spans


def _attend(attention: PagedAttention, kernel: PrefillKernel | None, spans: list[SequenceSpan], block_size: int,
            tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    q, k, v, k_cache, v_cache = tensors
    attention.prefill_kernel = kernel
    meta = build_attention_metadata(spans, block_size, attention.sliding_window, CPU)
    return attention(q, k, v, k_cache.clone(), v_cache.clone(), meta)


def _tensors(spans: list[SequenceSpan], num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
             num_blocks: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    num_tokens = sum(span.num_tokens for span in spans)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator) for _ in range(2))
    caches = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator) for _ in range(2))
    return tuple(t.to(dtype) for t in (q, k, v, *caches))


# Chunks with and without a cached prefix, ends on and off block boundaries, one longer than the window,
# one of a single token beside a decode row.
_CHUNKS = [(0, 37), (12, 13), (40, 100), (64, 160), (3, 130)]


@needs_kernel
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(4, 1, 64), (4, 2, 16), (2, 2, 32), (8, 1, 256)])
def test_the_kernel_equals_the_torch_path_in_fp32(window: int | None, num_heads: int, num_kv_heads: int,
                                                   head_dim: int) -> None:
    block_size, num_blocks = 4, 300
    spans = _step(_CHUNKS, [9, 30], block_size, num_blocks, seed=num_heads + head_dim)
    tensors = _tensors(spans, num_heads, num_kv_heads, head_dim, block_size, num_blocks, torch.float32, seed=0)
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, window)
    reference = _attend(attention, None, spans, block_size, tensors)
    ours = _attend(attention, load_prefill_kernel()[0], spans, block_size, tensors)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("window", [None, 512])
@pytest.mark.parametrize("chunk", [(0, 512), (512, 1024), (300, 1100), (0, 129)])
def test_the_kernel_in_bf16_is_as_close_to_exact_as_the_torch_path(window: int | None, chunk: tuple[int, int]) -> None:
    """Gemma 3 270M's heads and window, a W1-sized chunk: the error from the exact (fp64) result is the
    torch path's (bf16 inputs, probabilities rounded to bf16 before the product with V, in both)."""
    block_size, num_blocks, num_heads, num_kv_heads, head_dim = 16, 120, 4, 1, 256
    spans = _step([chunk], [100], block_size, num_blocks, seed=3)
    tensors = _tensors(spans, num_heads, num_kv_heads, head_dim, block_size, num_blocks, torch.bfloat16, seed=1)
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, window)
    exact = _attend(attention, None, spans, block_size, tuple(t.double() for t in tensors))[1:]
    reference = _attend(attention, None, spans, block_size, tensors)[1:]
    ours = _attend(attention, load_prefill_kernel()[0], spans, block_size, tensors)[1:]
    assert ours.dtype == torch.bfloat16
    reference_error = (reference.double() - exact).abs()
    our_error = (ours.double() - exact).abs()
    assert our_error.max() <= reference_error.max() * 1.1
    assert our_error.mean() <= reference_error.mean() * 1.05


def test_the_prefill_kernel_runs_only_where_it_can(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    assert prefill_unavailable_reason(torch.device("meta"), torch.float32, 64) == "device meta is not a CPU"
    assert prefill_unavailable_reason(CPU, torch.float16, 64) == "torch.float16 is not covered (float32 and bfloat16 are)"
    assert prefill_unavailable_reason(CPU, torch.float32, 40) == "head_dim 40 is not a multiple of 16"
    model = torch.nn.Sequential(PagedAttention(4, 1, 64, 0.3))
    with caplog.at_level(logging.INFO, logger="conveyor.model.paged_prefill"):
        assert apply_prefill_kernel(model, False, CPU, torch.float32) == "torch"
    assert "prefill attention: torch (the attention path chosen is torch's)" in caplog.text
    assert model[0].prefill_kernel is None
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    load_prefill_kernel.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="conveyor.model.paged_prefill"):
            assert apply_prefill_kernel(model, True, CPU, torch.float32) == "torch"
        assert "prefill attention: torch (the C++ kernel could not be built (RuntimeError: g++: not found))" in caplog.text
        assert model[0].prefill_kernel is None
    finally:
        load_prefill_kernel.cache_clear()


@needs_kernel
def test_the_attention_choice_gives_both_kernels() -> None:
    model = torch.nn.Sequential(PagedAttention(4, 1, 64, 0.3), PagedAttention(4, 1, 64, 0.3, sliding_window=8))
    apply_attention_kernel(model, "cpp", CPU, torch.bfloat16)
    assert all(m.prefill_kernel is not None and m.decode_kernel is not None for m in model)
    apply_attention_kernel(model, "torch", CPU, torch.bfloat16)
    assert all(m.prefill_kernel is None and m.decode_kernel is None for m in model)


@needs_kernel
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_engine_on_the_prefill_kernel_matches_the_torch_path(tiny_model_dirs: dict[str, Path],
                                                             architecture: str) -> None:
    """The prefill kernel alone (decode on torch's path): same ids, logprobs within fp32 noise, with prompts
    split over several chunks (a cached prefix) that share steps with decode rows."""
    prompts = [[1, 40, 41, 42], [1] + [(7 * i) % 300 + 5 for i in range(45)], [1] + [(3 * i) % 200 + 9 for i in range(30)]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    results = {}
    for use_kernel in (False, True):
        llm = LLM(str(tiny_model_dirs[architecture]), block_size=4, max_num_batched_tokens=13, num_kv_blocks=128,
                  dtype="float32", attention_kernel="torch")
        assert apply_prefill_kernel(llm.engine.runner.model, use_kernel, CPU, torch.float32) == (
            "cpp" if use_kernel else "torch")
        results[use_kernel] = llm.generate(prompts, params)
    assert_same_tokens_and_logprobs(results[False], results[True])
