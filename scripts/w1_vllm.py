"""W1 offline through vLLM's CPU build: the same requests as `conveyor bench throughput` (seed 1234).

A peer figure, never a dependency: run it in vLLM's own venv (`../shared/peers/setup.sh vllm`) on the HF copy
of the default model that `../shared/peers/setup.sh hf` writes, e.g.
    VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 OMP_NUM_THREADS=2 \\
        vllm-venv/bin/python scripts/w1_vllm.py --dtype bfloat16 --model gemma-3-270m-hf
The requests are generated here as ../shared/workloads.md writes them (vLLM's venv has no conveyor).
"""

import argparse
import json
import resource
import time

import numpy as np


def w1_requests(seed: int, num_requests: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(num_requests):
        in_len = int(rng.integers(32, 513))
        out_len = int(rng.integers(16, 257))
        requests.append(([2] + [int(t) for t in rng.integers(1000, 200000, size=in_len - 1)], out_len))
    return requests


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--model", required=True, help="the HF directory of the default model")
    args = parser.parse_args()
    requests = w1_requests(args.seed, args.num_requests)

    from vllm import LLM, SamplingParams  # vLLM's venv only
    from vllm.inputs import TokensPrompt

    # conveyor's defaults: 64 running sequences, a 2 GiB KV pool
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=64, kv_cache_memory_bytes=2 << 30, seed=0)
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=requests[0][0])], warm, use_tqdm=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids, _ in requests]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert output_tokens == sum(n for _, n in requests), "vLLM stopped a request early"
    prompt_tokens = sum(len(ids) for ids, _ in requests)
    print(json.dumps({
        "engine": "vllm-cpu", "dtype": args.dtype, "requests": args.num_requests, "wall_s": round(wall, 2),
        "output_tok_s": round(output_tokens / wall, 1),
        "total_tok_s": round((prompt_tokens + output_tokens) / wall, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == "__main__":  # vLLM starts its engine core with spawn, which re-imports this file
    main()
