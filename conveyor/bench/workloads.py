"""The reference workloads of ../shared/workloads.md, generated from a seed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOS_ID = 2  # the default model's BOS


@dataclass
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int  # generated exactly (greedy, EOS ignored)


def w1_requests(seed: int = 1234, num_requests: int = 64, min_input: int = 32, max_input: int = 512,
                min_output: int = 16, max_output: int = 256, bos_id: int = BOS_ID,
                token_ids: tuple[int, int] = (1000, 200000)) -> list[BenchRequest]:
    """W1: random token-id prompts of 32..512 tokens (BOS included) and 16..256 output tokens."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_requests):
        input_len = int(rng.integers(min_input, max_input + 1))
        output_len = int(rng.integers(min_output, max_output + 1))
        prompt = [bos_id] + [int(t) for t in rng.integers(*token_ids, size=input_len - 1)]
        requests.append(BenchRequest(prompt, output_len))
    return requests
