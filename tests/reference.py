"""Greedy references from Hugging Face transformers and vLLM-style `check_logprobs_close`."""

from __future__ import annotations

import torch

from conveyor.outputs import RequestOutput


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, top_n: int = 5  # type: ignore[no-untyped-def]
              ) -> tuple[list[int], list[dict[int, float]]]:
    """Plain greedy decoding (full forward each step, no cache tricks); top-N logprobs per position."""
    ids = list(prompt_ids)
    tokens: list[int] = []
    top: list[dict[int, float]] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            values, indices = logprobs.topk(top_n)
            top.append({int(i): float(v) for i, v in zip(indices, values)})
            token = int(logits.argmax())
            tokens.append(token)
            ids.append(token)
    return tokens, top


def conveyor_top(output: RequestOutput) -> tuple[list[int], list[dict[int, float]]]:
    completion = output.outputs[0]
    assert completion.logprobs is not None, "request logprobs to compare against a reference"
    return list(completion.token_ids), [{t: lp.logprob for t, lp in pos.items()} for pos in completion.logprobs]


def check_logprobs_close(reference: tuple[list[int], list[dict[int, float]]],
                         ours: tuple[list[int], list[dict[int, float]]], name: str = "",
                         atol: float = 1e-3) -> int:
    """Token ids must match until a position where each side's choice is in the other's top-N (a near
    tie); matching positions must agree on the chosen token's logprob. Returns the matched length."""
    ref_ids, ref_top = reference
    our_ids, our_top = ours
    for position, (ref_token, our_token) in enumerate(zip(ref_ids, our_ids)):
        if ref_token != our_token:
            assert our_token in ref_top[position] and ref_token in our_top[position], (
                f"{name}: position {position}: reference {ref_token} vs ours {our_token} is not a near tie "
                f"(reference top {ref_top[position]}, ours {our_top[position]})")
            return position
        assert abs(ref_top[position][ref_token] - our_top[position][our_token]) < atol, (
            f"{name}: position {position}: logprob {our_top[position][our_token]} vs reference "
            f"{ref_top[position][ref_token]}")
    return len(ref_ids)


def assert_same_tokens_and_logprobs(references: list[RequestOutput], outputs: list[RequestOutput],
                                    tolerance: float = 1e-4) -> None:
    """Two paths' outputs for the same prompts: the same ids, and each reference top logprob within `tolerance`."""
    for reference, ours in zip(references, outputs, strict=True):
        ref, got = reference.outputs[0], ours.outputs[0]
        assert got.token_ids == ref.token_ids
        assert ref.logprobs is not None and got.logprobs is not None
        for ref_top, our_top in zip(ref.logprobs, got.logprobs):
            for token, logprob in ref_top.items():
                assert abs(our_top[token].logprob - logprob.logprob) < tolerance
