"""`conveyor tune w2 | w3 | trace`: profile the step cost, search configurations by simulation, write the best.

Steps: (1) load this machine's profile for the model, or measure it; (2) simulate every candidate on the
workload, finding the highest rate at which it meets the SLOs (or, with --rate, its goodput at that rate);
(3) print the best candidates beside the default, write the winner as a `--config` file and its flags,
and draw the pictures; (4) with --validate, run the top candidates and the default for real against
`conveyor serve`, interleaved, and print predicted against measured. A winner that does not beat the
default (predicted, or measured when validated) is not recommended: the default is written instead.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from conveyor.bench.cli import (
    add_chat_workload_args,
    add_workload_args,
    conversations_from_args,
    workload_from_args,
)
from conveyor.config import EngineConfig

if TYPE_CHECKING:
    from conveyor.tune.cost_model import ServerOverhead


def _tune(args: argparse.Namespace) -> int:
    from conveyor.model.loader import resolve_model_path
    from conveyor.tune.overhead import measure_server_overhead
    from conveyor.tune.profile import CalibrationPlan, load_or_profile, save_profile
    from conveyor.tune.report import format_table, write_outputs
    from conveyor.tune.search import Candidate, Slo, Tuner, grid, rank, refinements

    started = time.perf_counter()
    try:
        base = EngineConfig.from_cli_args(args, enable_step_trace=False)
    except ValueError as error:
        raise SystemExit(f"conveyor tune: {error}") from None
    slo = Slo(ttft=args.slo_ttft, tpot=args.slo_tpot, itl=args.slo_itl, percentile=args.slo_percentile)
    if not 0.0 <= args.slo_margin < 1.0:
        raise SystemExit(f"conveyor tune: --slo-margin must be in [0, 1), got {args.slo_margin}")
    plan = CalibrationPlan().quick() if args.quick_profile else CalibrationPlan()
    profile_dir = Path(args.profile_dir) if args.profile_dir else None
    profile, profile_path, measured = load_or_profile(base, plan, profile_dir, refresh=args.reprofile)
    error = profile.held_out_error
    print(f"profile {profile_path} ({'measured now' if measured else 'cached'}: {profile.num_steps} steps in "
          f"{profile.seconds:.0f} s); step-time error on {error['steps']} held-out steps: mean "
          f"{100 * error['mean']:.1f}%, p50 {100 * error['p50']:.1f}%, p90 {100 * error['p90']:.1f}%; identical steps "
          f"differ by {100 * error.get('repeat_noise', 0.0):.1f}% on average", flush=True)
    if profile.server_overhead:
        print(f"server overhead (measured against conveyor serve): {describe_overhead(profile.server_overhead)}",
              flush=True)

    now = None
    if args.validate and not measured and not args.no_speed_check:
        # The predictions to be checked should be today's: the server's share of the cores moves with the
        # machine's speed, so it is measured again, on a served run, and joins the history of measurements.
        now = measure_server_overhead(base, resolve_model_path(base.model), profile.model_config,
                                      profile.cost_model)[0]
        print(f"server overhead now (measured again against conveyor serve): {describe_overhead(now)}", flush=True)
        profile.remember([now])
        save_profile(profile, profile_path)
    # The median of the measurements so far: one taken in a slow minute (this machine's speed drifts by 10-30%
    # between minutes) must not set every prediction of a command.
    overhead = profile.typical_overhead()
    if overhead and len(profile.current_overheads()) > 1:
        print(f"server overhead predicted with (the median of {len(profile.current_overheads())} measurements): "
              f"{describe_overhead(overhead)}", flush=True)
    workload = _workload(args, base)
    tuner = Tuner(base, resolve_model_path(base.model), profile.model_config, profile.cost_model, workload, slo,
                  overhead, args.slo_margin)
    default = Candidate.of(base)
    fixed_rate = args.rate

    def evaluate_all(candidates: list[Candidate], hint: float) -> list:
        if fixed_rate is not None:
            return [tuner.evaluate_at(candidate, fixed_rate) for candidate in candidates]
        return tuner.search(candidates, hint)

    print(f"workload {workload.name}; SLO {slo.describe()} (simulated runs must keep {100 * args.slo_margin:.0f}% "
          f"under it); "
          f"{'goodput at ' + str(fixed_rate) + ' ' + workload.rate_unit if fixed_rate else 'highest sustainable rate'}",
          flush=True)
    searching = time.perf_counter()
    default_evaluation = evaluate_all([default], args.rate_hint)[0]
    hint = default_evaluation.max_rate or args.rate_hint
    knob_grid = grid(args.seqs_grid, args.tokens_grid, default)
    evaluations = evaluate_all([c for c in knob_grid if c != default], hint) + [default_evaluation]
    grid_evaluations = list(evaluations)
    best = [e.candidate for e in rank(evaluations)[:args.refine_top]]
    prefix_options = {"both": [True, False], "on": [True], "off": [False]}[args.prefix_caching]
    tried = {e.candidate for e in evaluations}
    extra = [c for c in refinements(best, args.chunk_shares, args.kv_sizes, prefix_options) if c not in tried]
    evaluations = rank(evaluations + evaluate_all(extra, hint))
    if all(e.shown is None for e in evaluations):
        raise SystemExit(f"conveyor tune: no configuration can run this workload: {default_evaluation.error}")
    print(f"{len(evaluations)} candidates, {tuner.num_simulations} simulated runs in "
          f"{time.perf_counter() - searching:.0f} s", flush=True)
    print(format_table(evaluations[:args.show], default_evaluation, workload.rate_unit, fixed_rate is not None))

    validation = None
    if args.validate:
        from conveyor.tune.validate import validate

        def remember(overhead: ServerOverhead) -> None:  # a validated run's overhead, for later commands
            profile.remember([overhead])
            save_profile(profile, profile_path)

        validation = validate(args, base, workload, tuner, evaluations[:args.validate_top], default_evaluation,
                              fixed_rate, remember)
    write_outputs(Path(args.output_dir), base, evaluations, grid_evaluations, default_evaluation, validation,
                  {**profile.to_dict(), "steps": None, "server_overhead_now": asdict(now) if now else None,
                   "server_overhead_predicted_with": asdict(overhead) if overhead else None}, slo, workload.rate_unit, fixed_rate is not None)
    print(f"conveyor tune took {time.perf_counter() - started:.0f} s")
    return 0


def _workload(args: argparse.Namespace, base: EngineConfig):  # type: ignore[no-untyped-def]
    from conveyor.tune.workloads import trace_workload, w2_workload, w3_workload
    from conveyor.workload_trace import read_trace

    if args.workload == "w2":
        return w2_workload(workload_from_args(args), args.burstiness, args.seed)
    if args.workload == "w3":
        from conveyor.model.loader import resolve_model_path
        from conveyor.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(base.tokenizer or resolve_model_path(base.model), chat_template=base.chat_template)
        return w3_workload(lambda rate: conversations_from_args(args, rate),
                           lambda text: tokenizer.encode(text, add_special_tokens=False), seed=args.seed)
    try:
        return trace_workload(read_trace(args.trace_file))
    except (OSError, ValueError) as error:
        raise SystemExit(f"conveyor tune trace: {error}") from None


def _add_common_args(parser: argparse.ArgumentParser) -> None:
    slo = parser.add_argument_group("SLOs (on a percentile of every request's value in the run)")
    slo.add_argument("--slo-ttft", type=float, default=2.0, help="seconds (default 2.0)")
    slo.add_argument("--slo-tpot", type=float, default=None, help="seconds per output token after the first")
    slo.add_argument("--slo-itl", type=float, default=0.3, help="seconds between tokens (default 0.3)")
    slo.add_argument("--slo-percentile", type=float, default=99.0)
    slo.add_argument("--slo-margin", type=float, default=0.1,
                     help="the share of each SLO a simulated run must keep free (default 0.1: the simulator's p99s "
                          "have been up to ~20%% optimistic on real runs); measured runs are held to the SLO itself")
    search = parser.add_argument_group("search")
    search.add_argument("--rate", type=float, default=None,
                        help="rank by goodput at this load instead of by the highest load meeting the SLOs")
    search.add_argument("--rate-hint", type=float, default=1.0, help="where the rate search starts")
    search.add_argument("--seqs-grid", type=int, nargs="+", default=[8, 16, 32, 64, 128], help="max_num_seqs values")
    search.add_argument("--tokens-grid", type=int, nargs="+", default=[128, 256, 512, 1024, 2048],
                        help="max_num_batched_tokens values")
    search.add_argument("--chunk-shares", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="prefill_chunk_share values tried around the best grid points")
    search.add_argument("--kv-sizes", nargs="+", default=["2GiB", "512MiB", "256MiB"],
                        help="KV pool sizes tried around the best grid points")
    search.add_argument("--prefix-caching", choices=["both", "on", "off"], default="both")
    search.add_argument("--refine-top", type=int, default=3, help="grid points whose other knobs are varied")
    search.add_argument("--show", type=int, default=5, help="candidates in the table")
    profile = parser.add_argument_group("profile")
    profile.add_argument("--profile-dir", default=None, help="where profiles are kept (default: the conveyor cache)")
    profile.add_argument("--reprofile", action="store_true", help="measure the profile again even if cached")
    profile.add_argument("--quick-profile", action="store_true", help="fewer calibration points (about 3x faster)")
    profile.add_argument("--no-speed-check", action="store_true",
                         help="with --validate and a cached profile, do not measure the server overhead (the "
                              "machine's speed with the server) again first")
    validate = parser.add_argument_group("validation (real runs against conveyor serve)")
    validate.add_argument("--validate", action="store_true")
    validate.add_argument("--validate-top", type=int, default=2, help="top candidates run beside the default")
    validate.add_argument("--validate-rates", type=float, nargs="+", default=None,
                          help="loads to validate at (default: --rate, or 0.85x the winner's predicted highest "
                          "sustainable rate, where it should meet the SLOs and a weaker default should not)")
    validate.add_argument("--validate-repeats", type=int, default=1, help="interleaved rounds")
    parser.add_argument("--output-dir", default="tune_results",
                        help="tuned.json (the winner as a --config file), tune.json and tune.html")
    EngineConfig.add_cli_args(parser)
    parser.set_defaults(handler=_tune)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tune = subparsers.add_parser("tune", help="fit max_num_seqs, max_num_batched_tokens and the KV pool to a "
                                 "workload under latency SLOs").add_subparsers(dest="workload", required=True)
    w2 = tune.add_parser("w2", help="W2: the W1 requests arriving at a request rate")
    add_workload_args(w2, seed=42, num_requests=64)
    w2.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    _add_common_args(w2)
    w3 = tune.add_parser("w3", help="W3: multi-turn chats over shared system prompts (the rate: conversations/s)")
    add_chat_workload_args(w3)
    _add_common_args(w3)
    trace = tune.add_parser("trace", help="a trace recorded by `conveyor serve --record-trace`")
    trace.add_argument("trace_file")
    _add_common_args(trace)


def describe_overhead(overhead: ServerOverhead) -> str:
    from conveyor.tune.cost_model import FEW_ROWS, describe_few_row_factors

    text = f"steps x{overhead.step_factor:.3f}, {1000 * overhead.request_seconds:.1f} ms per request"
    if overhead.few_row_factors is not None:
        text += f", decode steps of 1-{FEW_ROWS} rows {describe_few_row_factors(overhead.few_row_factors)}"
    details = overhead.details or {}
    if "step_miss" in details:  # NOTE: a profile cached before 2026-11-26 14:00 has other details
        text += (f" (from {details['served_steps']} served steps, median miss {100 * details['step_miss']:.1f}%; "
                 f"by request timings x{details['factor_by_requests']:.3f}"
                 + (f"; per request as a TTFT residual {1000 * details['request_seconds_by_residual']:.1f} ms"
                    if "request_seconds_by_residual" in details else "") + ")")
    return text
