"""Tiny random-weight models of each architecture against Hugging Face transformers on the same files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conveyor import LLM, SamplingParams
from conveyor.model.layers import linear
from tests.conftest import TINY_ARCHITECTURES
from tests.reference import check_logprobs_close, conveyor_top, hf_greedy
from tests.tiny_models import load_hf_model

PROMPTS = [[1, 40, 41, 42], [1] + list(range(60, 77)), [1] + [(7 * i) % 300 + 5 for i in range(45)]]
MAX_TOKENS = 12


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("budget", [512, 7])  # 7: every prompt is chunked, chunks share steps with decodes
def test_greedy_matches_transformers(tiny_model_dirs: dict[str, Path], architecture: str, budget: int) -> None:
    path = tiny_model_dirs[architecture]
    reference_model = load_hf_model(path)
    llm = LLM(str(path), block_size=4, max_num_batched_tokens=budget, num_kv_blocks=256, dtype="float32")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        assert len(output.outputs[0].token_ids) == MAX_TOKENS
        reference = hf_greedy(reference_model, prompt, MAX_TOKENS)
        matched = check_logprobs_close(reference, conveyor_top(output), f"{architecture} prompt of {len(prompt)}")
        assert matched >= MAX_TOKENS // 2, f"diverged at {matched} (a near tie, but suspiciously early)"


@pytest.mark.parametrize("num_rows", [0, 1, 2, 9, 32, 33])
@pytest.mark.parametrize("with_bias", [False, True])
def test_few_rows_linear_equals_a_plain_linear(num_rows: int, with_bias: bool) -> None:
    """The few-rows path (weight @ x.T) gives what F.linear gives, in [S, out] order."""
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(3000, 64, generator=generator)
    bias = torch.randn(3000, generator=generator) if with_bias else None
    x = torch.randn(num_rows, 64, generator=generator)
    out = linear(x, weight, bias)
    assert out.shape == (num_rows, 3000) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
