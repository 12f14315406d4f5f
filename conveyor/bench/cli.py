"""`conveyor bench throughput | serve | sweep | quality | structured`: benchmarks that print figures and save
JSON and pictures."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from conveyor.config import EngineConfig

if TYPE_CHECKING:
    from conveyor.bench.serve import ServeSettings


def add_workload_args(parser: argparse.ArgumentParser, seed: int, num_requests: int) -> None:
    group = parser.add_argument_group("workload (W1 generator)")
    group.add_argument("--seed", type=int, default=seed)
    group.add_argument("--num-requests", type=int, default=num_requests)
    group.add_argument("--min-input", type=int, default=32)
    group.add_argument("--max-input", type=int, default=512)
    group.add_argument("--min-output", type=int, default=16)
    group.add_argument("--max-output", type=int, default=256)
    group.add_argument("--token-id-range", nargs=2, type=int, default=[1000, 200000], metavar=("LOW", "HIGH"),
                       help="prompt token ids are drawn from [LOW, HIGH)")
    group.add_argument("--bos-id", type=int, default=2)


def workload_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from conveyor.bench.workloads import w1_requests

    return w1_requests(seed=args.seed, num_requests=args.num_requests, min_input=args.min_input,
                       max_input=args.max_input, min_output=args.min_output, max_output=args.max_output,
                       bos_id=args.bos_id, token_ids=tuple(args.token_id_range))


def add_chat_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload (W3 generator)")
    group.add_argument("--seed", type=int, default=7)
    group.add_argument("--num-conversations", type=int, default=16)
    group.add_argument("--num-system-prompts", type=int, default=3)
    group.add_argument("--system-words", type=int, default=400, help="words in each shared system prompt")
    group.add_argument("--user-words", nargs=2, type=int, default=[30, 80], metavar=("MIN", "MAX"),
                       help="words in each new user message")
    group.add_argument("--answer-tokens", nargs=2, type=int, default=[30, 150], metavar=("MIN", "MAX"),
                       help="tokens generated for each answer (exactly: EOS ignored)")
    group.add_argument("--min-turns", type=int, default=3)
    group.add_argument("--max-turns", type=int, default=6)
    group.add_argument("--conversation-rate", type=float, default=0.5, help="new conversations per second")
    group.add_argument("--think-time", type=float, default=2.0, help="mean seconds between a conversation's turns")


def conversations_from_args(args: argparse.Namespace, conversation_rate: float | None = None):  # type: ignore[no-untyped-def]
    """The W3 conversations the flags describe (at `conversation_rate` instead of the flag's, if given)."""
    from conveyor.bench.workloads import w3_conversations

    return w3_conversations(
        seed=args.seed, num_conversations=args.num_conversations, num_system_prompts=args.num_system_prompts,
        system_words=args.system_words, min_turns=args.min_turns, max_turns=args.max_turns,
        user_words=tuple(args.user_words), answer_tokens=tuple(args.answer_tokens),
        conversation_rate=conversation_rate or args.conversation_rate, mean_think_time=args.think_time)


# `bench throughput` modes that run continuous batching in one precision each (engine knobs over the flags').
PRECISION_MODES: dict[str, dict[str, str | bool | None]] = {
    "continuous-fp32": {"dtype": "float32", "quantization": None},
    "continuous-bf16": {"dtype": "bfloat16", "quantization": None},
    "continuous-int8": {"dtype": "float32", "quantization": "int8"},
    "continuous-int8-bf16": {"dtype": "bfloat16", "quantization": "int8"},
    "continuous-int8-bf16-head8": {"dtype": "bfloat16", "quantization": "int8", "int8_lm_head": True},  # lm_head int8 too
    "continuous-int8-fast": {"dtype": "float32", "quantization": "int8-fast"},
}


def _write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))
    print(f"saved {path}")


# ---- throughput ----------------------------------------------------------------------------------

def _throughput(args: argparse.Namespace) -> int:
    from conveyor.bench import plots
    from conveyor.bench.throughput import peak_rss_bytes, run_continuous, run_static
    from conveyor.engine.engine import LLMEngine

    requests = workload_from_args(args)
    config = EngineConfig.from_cli_args(args)
    config = dataclasses.replace(config, max_num_seqs=max(config.max_num_seqs, *args.static_batch_sizes))

    def warmed_up(config: EngineConfig) -> LLMEngine:
        engine = LLMEngine(config)
        run_continuous(engine, requests[:2])  # first-call costs land on no measured mode
        return engine

    # The engine of the flags, built only if a mode runs on it (a precision mode builds its own).
    engine = warmed_up(config) if set(args.modes) - set(PRECISION_MODES) else None
    results = []
    pictures: list[tuple[str, Path]] = []
    out_dir = Path(args.plots_dir)
    for mode in args.modes:
        if mode in PRECISION_MODES:
            # NOTE: an engine of its own, one after another, so the precisions are measured in one run.
            precision_engine = warmed_up(dataclasses.replace(config, **PRECISION_MODES[mode]))
            results.append(run_continuous(precision_engine, requests))
            del precision_engine
        elif engine is None:
            raise AssertionError("unreachable: the flags' engine is built for every other mode")
        elif mode == "continuous":
            results.append(run_continuous(engine, requests))
        elif mode == "static":
            for batch_size in args.static_batch_sizes:
                results.append(run_static(engine, requests, batch_size, engine.tokenizer.pad_token_id or 0))
                print(_row(results[-1]), flush=True)
            continue
        elif mode in ("hf", "hf-continuous"):
            results += _hf_runs(engine, requests, args.hf_batch_sizes if mode == "hf" else [])
            continue
        print(_row(results[-1]), flush=True)
    for result in results:
        if result.steps:
            steps = result.steps
            useful = None
            if result.mode.startswith("static"):
                useful = {rid: r.output_len - 1 for rid, r in zip(result.request_ids, requests)}
            slug = "_".join(result.mode.split()[:2]) if result.mode.startswith("continuous ") else \
                result.mode.split()[0] + (f"_{result.settings['batch_size']}" if useful else "")
            pictures.append((f"batch composition: {result.mode}",
                             plots.plot_timeline(steps, out_dir / f"timeline_{slug}.png", result.mode, useful)))
            pictures.append((f"KV cache and queues: {result.mode}",
                             plots.plot_cache_and_queues(steps, out_dir / f"cache_{slug}.png", result.mode)))
    if pictures:
        plots.write_html(pictures, out_dir / "throughput.html", "conveyor: W1 throughput")
        print(f"pictures in {out_dir}/throughput.html")
    print(f"peak RSS: {peak_rss_bytes() / 2**30:.2f} GiB")
    continuous = [r for r in results if r.mode.startswith("continuous")]
    for ours in continuous:
        for baseline in (r for r in results if r not in continuous):
            ratio = ours.output_tokens_per_second / baseline.output_tokens_per_second
            print(f"{ours.mode} / {baseline.mode}: {ratio:.2f}x output tokens/s")
    _write_json(args.output, {"workload": "W1", "seed": args.seed, "num_requests": args.num_requests,
                              "time": time.time(), "peak_rss_bytes": peak_rss_bytes(),
                              "results": [r.to_dict() for r in results]})
    if args.trace_output and engine is not None and engine.trace is not None:
        engine.trace.to_jsonl(args.trace_output)
    return 0


def _hf_runs(engine, requests, batch_sizes: list[int]) -> list:  # type: ignore[no-untyped-def]
    """transformers' padded static generate at each batch size, or (no batch sizes) its continuous batching."""
    from conveyor.bench.hf_baseline import hf_model_from_tensors, run_hf_continuous, run_hf_static
    from conveyor.model.loader import load_model_weights

    config, tensors = load_model_weights(engine.model_path)
    model = hf_model_from_tensors(config, tensors)
    runs = [lambda b=b: run_hf_static(model, requests, b, engine.tokenizer.pad_token_id or 0) for b in batch_sizes]
    results = []
    for run in runs or [lambda: run_hf_continuous(model, requests)]:
        results.append(run())
        print(_row(results[-1]), flush=True)
    return results


def _row(result) -> str:  # type: ignore[no-untyped-def]
    return (f"{result.mode:>34}: {result.wall_seconds:8.1f} s  {result.output_tokens_per_second:7.1f} output tok/s"
            f"  {result.total_tokens_per_second:7.1f} total tok/s  {result.num_steps:5d} steps  "
            f"overhead {100 * result.overhead_fraction:4.1f}% (+ sampling {100 * result.sampling_fraction:.1f}%)  padding {result.padding_tokens} tokens"
            + ("" if result.median_decode_step_seconds is None
               else f"  decode step p50 {1000 * result.median_decode_step_seconds:.1f} ms"))


# ---- serve and sweep -----------------------------------------------------------------------------

def _serve_settings(args: argparse.Namespace, rate: float, concurrency: int | None):  # type: ignore[no-untyped-def]
    from conveyor.bench.serve import ServeSettings

    return ServeSettings(base_url=args.base_url.rstrip("/"), model=args.model_name, request_rate=rate,
                         burstiness=args.burstiness, max_concurrency=concurrency, seed=args.seed,
                         slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, api_key=args.api_key,
                         max_tokens=args.max_tokens, dashboard_viewers=args.dashboard_viewers)


def _run_serve_benchmark(args: argparse.Namespace, settings: ServeSettings, command: str) -> dict:
    """One serve benchmark; a server that cannot be benchmarked ends the command with its reason."""
    from conveyor.bench.serve import run_serve_benchmark

    try:
        return asyncio.run(run_serve_benchmark(workload_from_args(args), settings))
    except RuntimeError as error:
        raise SystemExit(f"conveyor bench {command}: {error}") from None


def _serve(args: argparse.Namespace) -> int:
    from conveyor.bench.serve import format_summary

    settings = _serve_settings(args, args.request_rate, args.max_concurrency)
    summary = _run_serve_benchmark(args, settings, "serve")
    print(format_summary(summary))
    _write_json(args.output, summary)
    return 0 if summary["failed"] == 0 else 1


def _sweep(args: argparse.Namespace) -> int:
    from conveyor.bench import plots
    from conveyor.bench.serve import format_summary

    if bool(args.request_rates) == bool(args.concurrencies):
        raise SystemExit("conveyor bench sweep: give --request-rates or --concurrencies")
    points = []
    for value in args.request_rates or args.concurrencies:
        settings = (_serve_settings(args, value, None) if args.request_rates
                    else _serve_settings(args, float("inf"), int(value)))
        summary = _run_serve_benchmark(args, settings, "sweep")
        print(format_summary(summary), flush=True)
        summary["x"] = value
        summary["x_label"] = "request rate (req/s)" if args.request_rates else "max concurrency"
        points.append(summary)
    out_dir = Path(args.plots_dir)
    picture = plots.plot_sweep(points, out_dir / "sweep.png", "throughput and p99 TTFT")
    plots.write_html([("throughput and p99 TTFT", picture)], out_dir / "sweep.html", "conveyor: serve sweep")
    _write_json(args.output, {"points": points})
    return 0


# ---- chat (W3) -------------------------------------------------------------------------------------

def _chat(args: argparse.Namespace) -> int:
    from conveyor.bench.chat import format_chat_summary, run_chat_benchmark
    from conveyor.bench.serve import ServeSettings

    conversations = conversations_from_args(args)
    settings = ServeSettings(base_url=args.base_url.rstrip("/"), model=args.model_name, seed=args.seed,
                             slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot, api_key=args.api_key)
    try:
        summary = asyncio.run(run_chat_benchmark(conversations, settings))
    except RuntimeError as error:
        raise SystemExit(f"conveyor bench chat: {error}") from None
    print(format_chat_summary(summary))
    _write_json(args.output, summary)
    return 0 if summary["failed"] == 0 else 1


# ---- quality -------------------------------------------------------------------------------------

def _quality(args: argparse.Namespace) -> int:
    from conveyor.bench.quality import DEFAULT_TEXT, measure_quality, read_text

    config = EngineConfig.from_cli_args(args)
    if args.llama_cpp_base:
        text_path = f"the windows of {args.llama_cpp_base}"
        results = measure_quality(config, args.modes, llama_cpp_base=args.llama_cpp_base)
        print(f"teacher-forced on {text_path} (second half of each scored); KL(reference || mode) in nats")
    else:
        text_path = args.text or DEFAULT_TEXT
        results = measure_quality(config, args.modes, read_text(text_path), args.window, args.max_tokens)
        print(f"teacher-forced on {text_path}, windows of {args.window} tokens; KL(reference || mode) in nats")
    print(f"{'mode':12s} {'tokens':>7s} {'perplexity':>11s} {'mean KL':>10s} {'p99 KL':>10s} {'top-1 agree':>12s}")
    for r in results:
        print(f"{r.mode:12s} {r.num_tokens:7d} {r.perplexity:11.4f} {r.mean_kl:10.2e} {r.p99_kl:10.2e} "
              f"{r.top1_agreement:12.4f}")
    _write_json(args.output, {"text": text_path, "window": args.window,
                              "results": [dataclasses.asdict(r) for r in results]})
    return 0


def _structured(args: argparse.Namespace) -> int:
    from conveyor.bench.structured import run
    from conveyor.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_cli_args(args))
    results = run(engine, args.batch_size, args.steps, args.warmup, args.constraints)
    _write_json(args.output, {"batch_size": args.batch_size, "steps": args.steps, "results": results})
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)

    throughput = bench.add_parser("throughput", help="W1 offline throughput: continuous vs static batching "
                                  "(conveyor's own static mode, and transformers' padded generate)")
    add_workload_args(throughput, seed=1234, num_requests=64)
    throughput.add_argument("--modes", nargs="+", default=["continuous", "static"],
                            choices=["continuous", *PRECISION_MODES, "static", "hf", "hf-continuous"],
                            help="continuous-PRECISION (fp32, bf16, int8, int8-fast): continuous batching on an "
                                 "engine of its own in that precision, the other flags kept; hf: transformers' "
                                 "padded static generate; hf-continuous: its continuous batching")
    throughput.add_argument("--static-batch-sizes", nargs="+", type=int, default=[16, 64])
    throughput.add_argument("--hf-batch-sizes", nargs="+", type=int, default=[16])
    throughput.add_argument("--output", default="bench_results/throughput.json")
    throughput.add_argument("--plots-dir", default="bench_results")
    throughput.add_argument("--trace-output", default=None, help="write the step trace as JSONL")
    EngineConfig.add_cli_args(throughput)
    throughput.set_defaults(handler=_throughput)

    for name, handler, help_text in (("serve", _serve, "W2 online benchmark against an OpenAI-compatible server"),
                                     ("sweep", _sweep, "the serve benchmark over request rates or concurrencies")):
        parser = bench.add_parser(name, help=help_text)
        add_workload_args(parser, seed=42, num_requests=64)
        parser.add_argument("--base-url", default="http://127.0.0.1:8000")
        parser.add_argument("--model-name", default=None, help="default: the server's first model")
        parser.add_argument("--api-key", default=None)
        parser.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
        parser.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT, seconds")
        parser.add_argument("--slo-tpot", type=float, default=0.2, help="goodput SLO on TPOT, seconds")
        parser.add_argument("--max-tokens", type=int, default=None,
                            help="ask every request for this many tokens (the prompts stay the workload's): "
                                 "a quick unloaded-TTFT run with --max-concurrency 1")
        parser.add_argument("--dashboard-viewers", type=int, default=0,
                            help="read a conveyor server's step stream this many times over during the run, as "
                                 "that many open dashboards would (to measure what watching costs)")
        if name == "serve":
            parser.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
            parser.add_argument("--max-concurrency", type=int, default=None)
            parser.add_argument("--output", default="bench_results/serve.json")
        else:
            parser.add_argument("--request-rates", nargs="+", type=float, default=None)
            parser.add_argument("--concurrencies", nargs="+", type=int, default=None)
            parser.add_argument("--output", default="bench_results/sweep.json")
            parser.add_argument("--plots-dir", default="bench_results")
        parser.set_defaults(handler=handler)

    chat = bench.add_parser("chat", help="W3 multi-turn chat conversations against an OpenAI-compatible server")
    chat.add_argument("--base-url", default="http://127.0.0.1:8000")
    chat.add_argument("--model-name", default=None, help="default: the server's first model")
    chat.add_argument("--api-key", default=None)
    add_chat_workload_args(chat)
    chat.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO on TTFT, seconds")
    chat.add_argument("--slo-tpot", type=float, default=0.2, help="goodput SLO on TPOT, seconds")
    chat.add_argument("--output", default="bench_results/chat.json")
    chat.set_defaults(handler=_chat)

    quality = bench.add_parser("quality", help="teacher-forced perplexity, KL and top-1 agreement of each "
                               "precision mode against the exact fp32 model, on a real English text")
    quality.add_argument("--modes", nargs="+", default=["fp32", "bf16", "int8"],
                         help="modes of conveyor.bench.quality.MODES, each against fp32-exact")
    quality.add_argument("--text", default=None, help="a UTF-8 text file (default: the GPL-3 the OS ships)")
    quality.add_argument("--window", type=int, default=256, help="tokens per teacher-forced window (BOS first)")
    quality.add_argument("--llama-cpp-base", default=None, metavar="FILE",
                         help="score the windows and positions of a `llama-perplexity --kl-divergence-base FILE` "
                              "run instead of --text, to set conveyor's modes beside llama.cpp's KL divergence")
    quality.add_argument("--max-tokens", type=int, default=2048, help="tokens of the text to score")
    quality.add_argument("--output", default="bench_results/quality.json")
    EngineConfig.add_cli_args(quality)
    quality.set_defaults(handler=_quality)

    structured = bench.add_parser("structured", help="decode steps with no, one and every request under a "
                                  "structured-output constraint (what the grammar masks cost a step)")
    structured.add_argument("--batch-size", type=int, default=16)
    structured.add_argument("--steps", type=int, default=40, help="decode steps measured (after the warm-up)")
    structured.add_argument("--warmup", type=int, default=5)
    structured.add_argument("--constraints", nargs="+", default=["json-string", "json-integers"],
                            choices=["json-string", "json-integers"])
    structured.add_argument("--output", default="bench_results/structured.json")
    EngineConfig.add_cli_args(structured)
    structured.set_defaults(handler=_structured)
