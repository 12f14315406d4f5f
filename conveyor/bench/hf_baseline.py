"""Hugging Face transformers on the same weights: the reference model for tests and the padded
static-batching `generate` baseline for the throughput benchmark. transformers is only needed here."""

from __future__ import annotations

import time

import torch

from conveyor.bench.throughput import ThroughputResult
from conveyor.bench.workloads import BenchRequest
from conveyor.config import ModelConfig


def hf_config_from_model_config(config: ModelConfig):  # type: ignore[no-untyped-def]
    import transformers

    common = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                  intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
                  num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
                  head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
                  max_position_embeddings=config.max_position_embeddings,
                  bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_ids,
                  pad_token_id=config.pad_token_id, tie_word_embeddings=config.tie_word_embeddings)
    if config.architecture == "gemma3":
        return transformers.Gemma3TextConfig(
            **common, sliding_window=config.sliding_window, layer_types=config.layer_types,
            query_pre_attn_scalar=int(config.query_pre_attn_scalar or config.head_dim),
            hidden_activation=config.hidden_act,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
                             "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta}})
    return transformers.LlamaConfig(**common, hidden_act=config.hidden_act, rope_theta=config.rope_theta,
                                    attention_bias=config.attention_bias)


def hf_model_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    """transformers' own model class, holding conveyor's (dequantized) tensors."""
    import transformers

    model_class = transformers.Gemma3ForCausalLM if config.architecture == "gemma3" else transformers.LlamaForCausalLM
    model = model_class(hf_config_from_model_config(config))
    state = dict(tensors)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def run_hf_static(model, requests: list[BenchRequest], batch_size: int, pad_token_id: int  # type: ignore[no-untyped-def]
                  ) -> ThroughputResult:
    """transformers' `generate` on fixed, left-padded batches in arrival order; EOS ignored."""
    model.generation_config.eos_token_id = None
    started = time.perf_counter()
    padding = 0
    with torch.inference_mode():
        for batch_start in range(0, len(requests), batch_size):
            batch = requests[batch_start:batch_start + batch_size]
            width = max(len(r.prompt_token_ids) for r in batch)
            new_tokens = max(r.output_len for r in batch)
            input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, request in enumerate(batch):
                input_ids[row, width - len(request.prompt_token_ids):] = torch.tensor(request.prompt_token_ids)
                attention_mask[row, width - len(request.prompt_token_ids):] = 1
                padding += width - len(request.prompt_token_ids) + new_tokens - request.output_len
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_token_id)
    return ThroughputResult(
        mode=f"transformers static (batch {batch_size})", num_requests=len(requests),
        wall_seconds=time.perf_counter() - started, prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        output_tokens=sum(r.output_len for r in requests), num_steps=0, overhead_fraction=0.0,
        padding_tokens=padding, settings={"batch_size": batch_size, "num_threads": torch.get_num_threads()})


def run_hf_continuous(model, requests: list[BenchRequest]) -> ThroughputResult:  # type: ignore[no-untyped-def]
    """transformers' own continuous batching (`init_continuous_batching`), each request with its own
    max_new_tokens and no EOS, all submitted at once."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=max(r.output_len for r in requests), do_sample=False)
    # NOTE: left to itself its KV cache takes most of the free memory (meant for a GPU of its own); here it
    # gets what the whole workload can hold, as conveyor's pool does.
    page_size = 256
    total_tokens = sum(len(r.prompt_token_ids) + r.output_len for r in requests)
    cache = ContinuousBatchingConfig(page_size=page_size, num_blocks=-(-total_tokens // page_size) + len(requests))
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cache)
    manager.start()
    started = time.perf_counter()
    output_tokens = 0
    try:
        for i, request in enumerate(requests):
            manager.add_request(request.prompt_token_ids, request_id=f"hf{i}", max_new_tokens=request.output_len,
                                eos_token_id=-1)
        finished = 0
        while finished < len(requests):
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("transformers' continuous batching stopped before finishing the workload")
            if result.is_finished():
                if result.error:
                    raise RuntimeError(f"transformers' continuous batching failed: {result.error}")
                finished += 1
                output_tokens += len(result.generated_tokens)
    finally:
        manager.stop(block=True)
    return ThroughputResult(
        mode="transformers continuous", num_requests=len(requests), wall_seconds=time.perf_counter() - started,
        prompt_tokens=sum(len(r.prompt_token_ids) for r in requests), output_tokens=output_tokens, num_steps=0,
        overhead_fraction=0.0, settings={"num_threads": torch.get_num_threads()})
