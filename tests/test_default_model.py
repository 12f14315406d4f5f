"""The real default model (Gemma 3 270M, Q4_K_M GGUF) against Hugging Face transformers on the same
dequantized weights: greedy ids for several prompts, 32 tokens, in the check_logprobs_close sense."""

from __future__ import annotations

import pytest

from conveyor import LLM, SamplingParams
from conveyor.model.loader import default_model_path, load_model_weights
from tests.hf_reference import hf_model_from_tensors
from tests.reference import check_logprobs_close, conveyor_top, hf_greedy

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Les fleurs du jardin sont",
    "1, 1, 2, 3, 5, 8, 13,",
]
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_num_batched_tokens=16, dtype="float32")  # the exact model; a small budget: prompts chunked, sharing steps


@pytest.fixture(scope="module")
def hf_references(llm: LLM) -> dict[str, tuple[list[int], list[dict[int, float]]]]:
    """transformers' greedy tokens and top logprobs per prompt, computed once for every test here (~15 s
    a test: full forwards without a cache)."""
    config, tensors = load_model_weights(default_model_path())
    reference_model = hf_model_from_tensors(config, tensors)
    return {prompt: hf_greedy(reference_model, llm.tokenizer.encode(prompt), MAX_TOKENS) for prompt in PROMPTS}


def test_greedy_matches_transformers_on_the_default_model(llm: LLM, hf_references: dict) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    outputs = llm.generate(PROMPTS, params)
    for prompt, output in zip(PROMPTS, outputs):
        prompt_ids = llm.tokenizer.encode(prompt)
        assert output.prompt_token_ids == prompt_ids
        matched = check_logprobs_close(hf_references[prompt], conveyor_top(output), repr(prompt), atol=2e-3)
        assert matched >= 8, f"{prompt!r}: diverged at token {matched}"


@pytest.mark.parametrize("method", ["int8", "int8-fast"])
def test_int8_quantization_stays_near_transformers_on_the_default_model(method: str, hf_references: dict) -> None:
    """int8 weights and activations drift from the fp32 logits (docs/configuration.md has the figures);
    the drift must stay of the near-tie kind: every divergence is between tokens in each other's top 5,
    and matched positions agree on the chosen token's logprob within 0.6 (measured for int8-fast: up to
    0.45; fp32 agrees within 0.002). A broken scale or layout fails both at once."""
    int8 = LLM(quantization=method)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    matched = []
    for prompt, output in zip(PROMPTS, int8.generate(PROMPTS, params)):
        assert output.prompt_token_ids == int8.tokenizer.encode(prompt)  # the references' prompt ids
        matched.append(check_logprobs_close(hf_references[prompt], conveyor_top(output), repr(prompt), atol=0.6))
    assert max(matched) >= 8, f"int8 diverges at once on every prompt: matched {matched}"
