"""`python -m conveyor.distributed.project w2|w3`: project throughput across N replicas by simulation.

For each replica count and routing policy, the highest load (the whole fleet's request or conversation
rate) at which the fleet still meets the SLOs at the chosen percentile, found as `conveyor tune` finds a
candidate's (doubling, then bisecting the rate), with the simulated run's figures at that load. Each
replica is a machine like the profiled one (`conveyor tune`'s cached profile of this model, thread count
and machine; measured first if there is none), running the base configuration. The workload grows with
the fleet: N replicas get N times the requests (W2) or conversations (W3), so a larger fleet is not
simply handed a shorter queue.

    python -m conveyor.distributed.project w3 --replicas 1 2 4 8 --output fleet_w3.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conveyor.bench.cli import (
    add_chat_workload_args,
    add_workload_args,
    conversations_from_args,
    workload_from_args,
)
from conveyor.bench.serve import ServeSettings
from conveyor.config import EngineConfig
from conveyor.distributed.fleet import FLEET_POLICIES, FleetRun, simulate_fleet
from conveyor.tune.cost_model import CostModel
from conveyor.tune.search import Slo, summarize_run
from conveyor.tune.workloads import SimWorkload, w2_workload, w3_workload

BISECTIONS = 4  # the bracket narrows to 2 ** (1 / 16): about 4%
MAX_DOUBLINGS = 12


def highest_rate(meets: Callable[[float], bool], hint: float) -> float:
    """The highest rate for which `meets` holds, to ~4%: doubling or halving from `hint` to a bracket, then
    geometric bisection (0 if it fails even at hint / 2 ** 6)."""
    passing, failing, rate = None, None, hint
    for _ in range(MAX_DOUBLINGS):
        if meets(rate):
            passing = rate
            if failing is not None:
                break
            rate *= 2
        else:
            failing = rate
            if passing is not None or rate < hint / 2 ** 6:
                break
            rate /= 2
    if passing is None or failing is None:
        return passing or 0.0
    for _ in range(BISECTIONS):
        middle = math.sqrt(passing * failing)
        passing, failing = (middle, failing) if meets(middle) else (passing, middle)
    return passing


def project(config: EngineConfig, cost_model: CostModel, workload_for: Callable[[int], SimWorkload], slo: Slo,
            replica_counts: list[int], policies: list[str], rate_hint: float) -> list[dict[str, Any]]:
    """One row per (replica count, policy): the highest rate meeting `slo` and the run's summary there."""
    settings = ServeSettings(base_url="simulated", slo_ttft=slo.ttft or math.inf, slo_tpot=slo.tpot or math.inf)
    rows: list[dict[str, Any]] = []
    single: dict[str, float] = {}
    for count in replica_counts:
        workload = workload_for(count)
        for policy in policies:
            started = time.perf_counter()
            rate, runs = _search(config, cost_model, workload, count, policy, slo, single.get(policy, rate_hint) * count)
            if count == replica_counts[0]:
                single[policy] = (rate or rate_hint) / count
            shown = runs[rate] if rate else runs[min(runs)]
            summary = summarize_run(shown.run, settings, workload.name)
            rows.append({"replicas": count, "policy": policy, "max_rate": rate, "rate_unit": workload.rate_unit,
                         "requests_per_replica": shown.requests_per_replica, "decisions": dict(shown.decisions),
                         "simulated_runs": len(runs), "seconds": time.perf_counter() - started, "summary": summary})
            print(format_row(rows[-1], rows), flush=True)
    return rows


def _search(config: EngineConfig, cost_model: CostModel, workload: SimWorkload, count: int, policy: str, slo: Slo,
            hint: float) -> tuple[float, dict[float, FleetRun]]:
    runs: dict[float, FleetRun] = {}

    def meets(rate: float) -> bool:
        requests, follow_up = workload.build(rate)
        runs[rate] = simulate_fleet(config, cost_model.step_seconds, requests, count, policy, follow_up)
        return slo.met_by(runs[rate].run)

    return highest_rate(meets, hint), runs


def format_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    first = next(r for r in rows if r["policy"] == row["policy"])
    scaling = row["max_rate"] / first["max_rate"] * first["replicas"] if first["max_rate"] else float("nan")
    summary = row["summary"]
    return (f"| {row['replicas']} | {row['policy']} | {row['max_rate']:.2f} {row['rate_unit']} | {scaling:.2f}x | "
            f"{summary['output_throughput']:.0f} | {100 * summary['cached_ratio']:.1f}% | "
            f"{1000 * summary['ttft_s']['p50']:.0f} / {1000 * summary['ttft_s']['p99']:.0f} | "
            f"{min(row['requests_per_replica'])}-{max(row['requests_per_replica'])} |")


HEADER = ("| replicas | policy | highest rate meeting the SLOs | vs 1 replica (x N) | output tok/s | prompt tokens "
          "cached | TTFT p50 / p99 ms | requests a replica |\n|---:|---|---:|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> int:
    from conveyor.model.loader import resolve_model_path
    from conveyor.tune.profile import CalibrationPlan, load_or_profile

    args = _parser().parse_args(argv)
    base = EngineConfig.from_cli_args(args, enable_step_trace=False)
    profile, path, _ = load_or_profile(base, CalibrationPlan(), Path(args.profile_dir) if args.profile_dir else None)
    model_path = resolve_model_path(base.model)
    config = base.resolved(model_path, profile.model_config)
    slo = Slo(ttft=args.slo_ttft, tpot=args.slo_tpot, itl=args.slo_itl, percentile=args.slo_percentile)
    print(f"profile {path}; workload {args.workload}; SLO {slo.describe()}; each replica: {config.num_threads} "
          f"threads, max_num_seqs {config.max_num_seqs}, {config.num_kv_blocks} KV blocks", flush=True)
    print(HEADER)
    rows = project(config, profile.cost_model, _workloads(args, config), slo, args.replicas, args.policies,
                   args.rate_hint)
    if args.output:
        Path(args.output).write_text(json.dumps({"profile": str(path), "slo": slo.describe(), "workload": args.workload,
                                                 "args": vars(args), "rows": rows}, indent=1, default=str))
    return 0


def _workloads(args: argparse.Namespace, config: EngineConfig) -> Callable[[int], SimWorkload]:
    if args.workload == "w2":
        return lambda count: w2_workload(workload_from_args(replace_args(args, num_requests=args.num_requests * count)),
                                         args.burstiness, args.seed)
    from conveyor.tokenizer import load_tokenizer

    assert config.tokenizer is not None
    tokenizer = load_tokenizer(config.tokenizer, chat_template=config.chat_template)

    def w3(count: int) -> SimWorkload:
        scaled = replace_args(args, num_conversations=args.num_conversations * count)
        return w3_workload(lambda rate: conversations_from_args(scaled, rate),
                           lambda text: tokenizer.encode(text, add_special_tokens=False), seed=args.seed)

    return w3


def replace_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m conveyor.distributed.project", description=__doc__.split("\n")[0])
    workloads = parser.add_subparsers(dest="workload", required=True)
    w2 = workloads.add_parser("w2", help="W2: the W1 requests at a request rate (N x --num-requests for N replicas)")
    add_workload_args(w2, seed=42, num_requests=32)
    w2.add_argument("--burstiness", type=float, default=1.0)
    w3 = workloads.add_parser("w3", help="W3: multi-turn chats (N x --num-conversations for N replicas)")
    add_chat_workload_args(w3)
    for sub in (w2, w3):
        sub.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8])
        sub.add_argument("--policies", nargs="+", choices=FLEET_POLICIES, default=list(FLEET_POLICIES))
        sub.add_argument("--slo-ttft", type=float, default=2.0)
        sub.add_argument("--slo-tpot", type=float, default=None)
        sub.add_argument("--slo-itl", type=float, default=0.3)
        sub.add_argument("--slo-percentile", type=float, default=99.0)
        sub.add_argument("--rate-hint", type=float, default=0.5, help="one replica's rate to start the search at")
        sub.add_argument("--profile-dir", default=None)
        sub.add_argument("--output", default=None, help="every row as JSON")
        EngineConfig.add_cli_args(sub)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
