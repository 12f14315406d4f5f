"""`conveyor bench ...`: benchmark commands that print figures and save them as JSON."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from conveyor.cli import add_engine_args, engine_config_from_args


def _throughput(args: argparse.Namespace) -> int:
    from conveyor.bench.throughput import peak_rss_bytes, run_continuous, run_static
    from conveyor.bench.workloads import w1_requests
    from conveyor.engine.engine import LLMEngine

    requests = w1_requests(seed=args.seed, num_requests=args.num_requests, min_input=args.min_input,
                           max_input=args.max_input, min_output=args.min_output, max_output=args.max_output)
    engine = LLMEngine(engine_config_from_args(args))
    # Warm up kernels and allocator so neither mode pays first-call costs.
    run_continuous(engine, requests[:2])
    results = []
    for mode in args.modes:
        if mode == "continuous":
            results.append(run_continuous(engine, requests))
        elif mode == "static":
            results.append(run_static(engine, requests, args.static_batch_size, engine.tokenizer.pad_token_id or 0))
        print(_row(results[-1]), flush=True)
    print(f"peak RSS: {peak_rss_bytes() / 2**30:.2f} GiB")
    by_mode = {r.mode.split()[0]: r for r in results}
    if "continuous" in by_mode and "static" in by_mode:
        ratio = by_mode["continuous"].output_tokens_per_second / by_mode["static"].output_tokens_per_second
        print(f"continuous / static output tokens/s: {ratio:.2f}x")
    report = {"workload": "W1", "seed": args.seed, "num_requests": args.num_requests, "time": time.time(),
              "peak_rss_bytes": peak_rss_bytes(), "results": [r.to_dict() for r in results]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    if args.trace_output and engine.trace is not None:
        engine.trace.to_jsonl(args.trace_output)
    print(f"saved {args.output}")
    return 0


def _row(result) -> str:  # type: ignore[no-untyped-def]
    return (f"{result.mode:>20}: {result.wall_seconds:8.1f} s  {result.output_tokens_per_second:8.1f} output tok/s  "
            f"{result.total_tokens_per_second:8.1f} total tok/s  {result.num_steps:5d} steps  "
            f"overhead {100 * result.overhead_fraction:4.1f}%  padding {result.padding_tokens} tokens")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    throughput = bench.add_parser("throughput", help="W1 offline throughput: continuous vs static batching")
    throughput.add_argument("--seed", type=int, default=1234)
    throughput.add_argument("--num-requests", type=int, default=64)
    throughput.add_argument("--min-input", type=int, default=32)
    throughput.add_argument("--max-input", type=int, default=512)
    throughput.add_argument("--min-output", type=int, default=16)
    throughput.add_argument("--max-output", type=int, default=256)
    throughput.add_argument("--modes", nargs="+", default=["continuous", "static"], choices=["continuous", "static"])
    throughput.add_argument("--static-batch-size", type=int, default=16)
    throughput.add_argument("--output", default="bench_results/throughput.json")
    throughput.add_argument("--trace-output", default=None, help="write the step trace as JSONL")
    add_engine_args(throughput)
    throughput.set_defaults(handler=_throughput)
