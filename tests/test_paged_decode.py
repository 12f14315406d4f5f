"""Decode attention read in place by the C++ kernel, against the torch reference path, and the fallback."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch

from conveyor import LLM, SamplingParams
from conveyor.config import EngineConfig
from conveyor.model import paged_decode
from conveyor.model.attention import DecodeKernel, PagedAttention, SequenceSpan, build_attention_metadata
from conveyor.model.paged_decode import apply_attention_kernel, choose_attention_kernel, load_decode_kernel
from tests.conftest import TINY_ARCHITECTURES
from tests.reference import assert_same_tokens_and_logprobs

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(load_decode_kernel()[0] is None, reason="the C++ kernel cannot be built here")


def _step(lengths: list[int], block_size: int, num_blocks: int, shared_prefix_blocks: int,
          seed: int) -> list[SequenceSpan]:
    """One decode row per length (plus a prefill chunk), blocks scattered through the pool; every row's
    first `shared_prefix_blocks` blocks are the same ones, as after prefix-cache hits."""
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    shared = [free.pop() for _ in range(shared_prefix_blocks)]
    spans = []
    for row, length in enumerate(lengths):
        own = -(-length // block_size) - shared_prefix_blocks
        spans.append(SequenceSpan(row, length - 1, length, shared + [free.pop() for _ in range(own)]))
    prompt = [free.pop() for _ in range(3)]
    spans.append(SequenceSpan(len(lengths), 5, 5 + 7, prompt))  # a prefill chunk in the same step
    return spans


def _attend(attention: PagedAttention, kernel: DecodeKernel | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            k_cache: torch.Tensor, v_cache: torch.Tensor, spans: list[SequenceSpan], block_size: int,
            window: int | None) -> torch.Tensor:
    attention.decode_kernel = kernel
    meta = build_attention_metadata(spans, block_size, window, CPU)
    return attention(q, k, v, k_cache.clone(), v_cache.clone(), meta)


@needs_kernel
@pytest.mark.parametrize("window", [None, 24])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 1), (4, 2), (2, 2)])
@pytest.mark.parametrize("shared_prefix_blocks", [0, 2])
def test_the_kernel_equals_the_torch_path_in_fp32(window: int | None, num_heads: int, num_kv_heads: int,
                                                   shared_prefix_blocks: int) -> None:
    block_size, head_dim, num_blocks = 4, 32, 200
    lengths = [9, 1 + 4 * shared_prefix_blocks, 23, 40, 41, 64, 12, 17, 30]  # many groups, partial blocks
    spans = _step(lengths, block_size, num_blocks, shared_prefix_blocks, seed=num_heads + num_kv_heads)
    generator = torch.Generator().manual_seed(0)
    num_tokens = len(lengths) + 7
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator) for _ in range(2))
    k_cache, v_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator)
                        for _ in range(2))
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, window)
    args = (q, k, v, k_cache, v_cache, spans, block_size, window)
    reference = _attend(attention, None, *args)
    ours = _attend(attention, load_decode_kernel()[0], *args)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 24])
def test_the_kernel_in_half_precision_is_as_close_to_exact_as_the_torch_path(dtype: torch.dtype,
                                                                               window: int | None) -> None:
    block_size, head_dim, num_blocks, num_heads, num_kv_heads = 16, 256, 120, 4, 1  # Gemma 3 270M's heads
    lengths = [17, 33, 100, 180, 301, 302, 64]
    spans = _step(lengths, block_size, num_blocks, 1, seed=3)
    generator = torch.Generator().manual_seed(1)
    num_tokens = len(lengths) + 7
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
                        for _ in range(2))
    attention = PagedAttention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5, window)
    rows = slice(0, len(lengths))
    exact = _attend(attention, None, q.double(), k.double(), v.double(), k_cache.double(), v_cache.double(),
                    spans, block_size, window)[rows]
    reference = _attend(attention, None, q, k, v, k_cache, v_cache, spans, block_size, window)[rows]
    ours = _attend(attention, load_decode_kernel()[0], q, k, v, k_cache, v_cache, spans, block_size, window)[rows]
    assert ours.dtype == dtype
    reference_error = (reference.double() - exact).abs().max()
    our_error = (ours.double() - exact).abs().max()
    assert our_error <= reference_error * 1.01 + 1e-6  # fp32 inside: at most the final rounding


def test_the_choice_falls_back_to_torch_where_the_kernel_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_attention_kernel("torch", CPU, torch.float32) == ("torch", "requested")
    assert choose_attention_kernel("auto", torch.device("meta"), torch.float32) == ("torch", "device meta is not a CPU")
    assert choose_attention_kernel("auto", CPU, torch.float64) == ("torch", "torch.float64 is not covered")
    with pytest.raises(ValueError, match="unknown attention kernel"):
        choose_attention_kernel("flash", CPU, torch.float32)
    monkeypatch.setattr(paged_decode, "load_decode_kernel", lambda: (None, "no compiler"))
    assert choose_attention_kernel("auto", CPU, torch.float32) == ("torch", "no compiler")
    with pytest.raises(ValueError, match="attention kernel cpp cannot run: no compiler"):
        choose_attention_kernel("cpp", CPU, torch.float32)


def test_a_failed_build_leaves_the_torch_path_and_says_which_runs(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    load_decode_kernel.cache_clear()
    try:
        model = torch.nn.Sequential(PagedAttention(4, 1, 8, 0.3))
        with caplog.at_level(logging.INFO, logger="conveyor.model.paged_decode"):
            assert apply_attention_kernel(model, "auto", CPU, torch.float32) == "torch"
        assert "decode attention: torch (the C++ kernel could not be built (RuntimeError: g++: not found))" in caplog.text
        assert model[0].decode_kernel is None
    finally:
        load_decode_kernel.cache_clear()


def test_an_unknown_attention_kernel_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="attention_kernel must be one of auto, cpp, torch"):
        EngineConfig(attention_kernel="flash")


@needs_kernel
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_engine_on_the_kernel_matches_the_torch_path(tiny_model_dirs: dict[str, Path], architecture: str) -> None:
    """Same ids, logprobs within fp32 noise, with prefill chunks sharing steps with decodes."""
    prompts = [[1, 40, 41, 42], [1] + [(7 * i) % 300 + 5 for i in range(45)], [1, 40, 41, 42, 43, 44]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    results = {}
    for kernel in ("torch", "cpp"):
        llm = LLM(str(tiny_model_dirs[architecture]), block_size=4, max_num_batched_tokens=7, num_kv_blocks=128,
                  dtype="float32", attention_kernel=kernel)
        attentions = [m for m in llm.engine.runner.model.modules() if isinstance(m, PagedAttention)]
        assert attentions and all((m.decode_kernel is not None) == (kernel == "cpp") for m in attentions)
        results[kernel] = llm.generate(prompts, params)
    assert_same_tokens_and_logprobs(results["torch"], results["cpp"])


# Not the int8 mode: it re-quantizes the activations at every linear, so the paths' last-bit difference
# moves rounding steps and its logprobs part by up to ~0.25 on real text (docs/benchmarks.md).
_PRECISIONS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}}


@needs_kernel
@pytest.mark.slow
@pytest.mark.parametrize("precision", list(_PRECISIONS))
def test_the_default_model_decodes_the_same_on_the_kernel(precision: str) -> None:
    """Real text, 16 rows decoding at once: the same ids in fp32, logprobs within each precision's noise."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village",
               "List three prime numbers:"] * 4
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    # The elementwise ops pinned to torch's: this compares the attention paths alone (test_fused_ops the others).
    results = {kernel: LLM(attention_kernel=kernel, elementwise_kernel="torch", **_PRECISIONS[precision]
                           ).generate(prompts, params)
               for kernel in ("torch", "cpp")}
    tolerance = {"fp32": 1e-3, "bf16": 0.1}[precision]  # fp32: summation order only; bf16 rounds every activation
    for reference, ours in zip(results["torch"], results["cpp"]):
        ref, got = reference.outputs[0], ours.outputs[0]
        assert ref.logprobs is not None and got.logprobs is not None
        for ref_token, our_token, ref_top, our_top in zip(ref.token_ids, got.token_ids, ref.logprobs, got.logprobs):
            assert abs(our_top[our_token].logprob - ref_top[ref_token].logprob) < tolerance
            if our_token != ref_token:  # a near-tie flipped: the texts part from here, as in any precision change
                assert precision != "fp32"
                break
