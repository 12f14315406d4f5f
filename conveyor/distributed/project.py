"""`python -m conveyor.distributed.project w2|w3`: project throughput across N replicas by simulation.

Weak scaling: N replicas get N times the workload (requests or conversations) at N times the load of one
(`--rate-per-replica`), so each replica sees what one replica alone would if routing spread the work
evenly; how far each policy stays from that is the projection. Each replica is a machine like the
profiled one (`conveyor tune`'s cached profile of this model, thread count and machine; measured first
if there is none), running the base configuration.

    python -m conveyor.distributed.project w3 --rate-per-replica 0.5 --replicas 1 2 4 8 --output fleet_w3.json
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
from conveyor.distributed.fleet import FLEET_POLICIES, simulate_fleet
from conveyor.tune.cost_model import CostModel
from conveyor.tune.search import Slo, summarize_run
from conveyor.tune.workloads import SimWorkload, w2_workload, w3_workload


def project(config: EngineConfig, cost_model: CostModel, workload_for: Callable[[int], SimWorkload], slo: Slo,
            replica_counts: list[int], policies: list[str], rate_per_replica: float) -> list[dict[str, Any]]:
    """One row per (replica count, policy): the simulated run's summary at N x `rate_per_replica`."""
    settings = ServeSettings(base_url="simulated", slo_ttft=slo.ttft or math.inf, slo_tpot=slo.tpot or math.inf)
    rows: list[dict[str, Any]] = []
    for count in replica_counts:
        workload = workload_for(count)
        for policy in policies:
            started = time.perf_counter()
            requests, follow_up = workload.build(rate_per_replica * count)
            fleet = simulate_fleet(config, cost_model.step_seconds, requests, count, policy, follow_up)
            rows.append({"replicas": count, "policy": policy, "rate": rate_per_replica * count,
                         "rate_unit": workload.rate_unit, "meets_slo": slo.met_by(fleet.run),
                         "requests_per_replica": fleet.requests_per_replica, "decisions": dict(fleet.decisions),
                         "seconds": time.perf_counter() - started,
                         "summary": summarize_run(fleet.run, settings, workload.name)})
            print(format_row(rows[-1], rows), flush=True)
    return rows


def format_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    first = next(r for r in rows if r["policy"] == row["policy"])
    summary, base = row["summary"], first["summary"]["output_throughput"]
    scaling = summary["output_throughput"] / base if base else float("nan")
    return (f"| {row['replicas']} | {row['policy']} | {row['rate']:.2f} {row['rate_unit']} | "
            f"{summary['output_throughput']:.0f} | {scaling:.2f}x | {100 * summary['cached_ratio']:.1f}% | "
            f"{1000 * summary['ttft_s']['p50']:.0f} / {1000 * summary['ttft_s']['p99']:.0f} | "
            f"{1000 * summary['itl_s']['p99']:.0f} | {'yes' if row['meets_slo'] else 'no'} | "
            f"{min(row['requests_per_replica'])}-{max(row['requests_per_replica'])} |")


HEADER = ("| replicas | policy | load | output tok/s | vs 1 replica | prompt tokens cached | TTFT p50 / p99 ms | "
          "ITL p99 ms | SLOs met | requests a replica |\n|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")


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
                   args.rate_per_replica)
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
        sub.add_argument("--rate-per-replica", type=float, required=True,
                         help="the load of one replica (req/s for W2, new conversations/s for W3)")
        sub.add_argument("--profile-dir", default=None)
        sub.add_argument("--output", default=None, help="every row as JSON")
        EngineConfig.add_cli_args(sub)
    return parser


if __name__ == "__main__":
    raise SystemExit(main())
