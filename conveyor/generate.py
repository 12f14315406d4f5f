"""`conveyor generate`: text for one prompt (streamed to stdout) or for a JSONL file of prompts."""

from __future__ import annotations

import argparse
import json
import sys
import time

from conveyor.config import EngineConfig


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
    engine = LLMEngine(EngineConfig.from_cli_args(args))
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


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    generate = subparsers.add_parser("generate", help="generate text for a prompt, or a JSONL file of prompts")
    generate.add_argument("prompt", nargs="?", default=None)
    generate.add_argument("--input", default=None, help="JSONL: one {\"prompt\": ..., sampling fields...} a line")
    generate.add_argument("--output", default="results.jsonl")
    EngineConfig.add_cli_args(generate)
    _add_sampling_args(generate)
    generate.set_defaults(handler=_generate)
