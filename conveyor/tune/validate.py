"""`conveyor tune --validate`: run the top candidates and the default for real and set predicted beside measured.

Each run starts a fresh `conveyor serve --config` on 127.0.0.1 (a cold prefix cache, as in the simulator),
warms it up with one short request, sends the workload with the `conveyor bench` clients at the given
load, and stops the server. Candidates take turns within each round (interleaved), so a machine whose
speed drifts during validation penalizes none of them in particular. The recommendation is the validated
candidate with the most measured goodput, and the default unless a candidate beats it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from conveyor.bench.chat import run_chat_benchmark
from conveyor.bench.cli import conversations_from_args, workload_from_args
from conveyor.bench.serve import ServeSettings, run_serve_benchmark
from conveyor.config import EngineConfig
from conveyor.tune.report import config_file_values
from conveyor.tune.search import Candidate, Tuner
from conveyor.tune.workloads import SimWorkload

SERVER_START_TIMEOUT = 600.0  # seconds; loading the default model on a busy 2-core machine can take minutes
METRICS = (("TTFT p50", "ttft_s", "p50"), ("TTFT p99", "ttft_s", "p99"), ("TPOT p50", "tpot_s", "p50"),
           ("TPOT p99", "tpot_s", "p99"), ("ITL p99", "itl_s", "p99"), ("out tok/s", "output_throughput", None),
           ("goodput", "goodput", None))


def _value(summary: dict, key: str, percentile: str | None) -> float:
    return float(summary[key][percentile] if percentile else summary[key])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(args: argparse.Namespace, base: EngineConfig, candidate: Candidate, rate: float,
            settings: ServeSettings, work_dir: Path) -> dict:
    """One real run of the workload at `rate` against a fresh server configured as `candidate`."""
    config_path = work_dir / "candidate.json"
    config_path.write_text(json.dumps(config_file_values(base, candidate)))
    port = _free_port()
    log_path = work_dir / "server.log"
    command = [sys.executable, "-m", "conveyor.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--config", str(config_path)]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(server, base_url, log_path)
        httpx.post(f"{base_url}/v1/completions", timeout=120.0,  # first calls pay one-off costs: not measured
                   json={"prompt": [1, 5, 6, 7], "max_tokens": 4, "ignore_eos": True})
        run_settings = ServeSettings(base_url=base_url, request_rate=rate, burstiness=getattr(args, "burstiness", 1.0),
                                     seed=args.seed, slo_ttft=settings.slo_ttft, slo_tpot=settings.slo_tpot)
        if args.workload == "w2":
            return asyncio.run(run_serve_benchmark(workload_from_args(args), run_settings))
        return asyncio.run(run_chat_benchmark(conversations_from_args(args, rate), run_settings))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_until_healthy(server: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"conveyor serve exited with {server.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"conveyor serve did not start in {SERVER_START_TIMEOUT:.0f} s")


def validate(args: argparse.Namespace, base: EngineConfig, workload: SimWorkload, tuner: Tuner,
             top: list[Candidate], default: Candidate, rate: float) -> dict:
    """Predicted and measured figures of the top candidates and the default, and the recommendation."""
    if args.workload == "trace":
        raise SystemExit("conveyor tune trace --validate: replaying a trace against a server is not supported yet; "
                         "validate with the w2 or w3 workload closest to it")
    candidates = list(dict.fromkeys([*top, default]))
    rates = args.validate_rates or [rate]
    rows = []
    with tempfile.TemporaryDirectory(prefix="conveyor-tune-") as work_dir:
        for round_index in range(args.validate_repeats):
            for load in rates:
                for candidate in candidates:
                    print(f"validating {candidate.label()} at {load:.3g} {workload.rate_unit} "
                          f"(round {round_index + 1})", flush=True)
                    _, predicted = tuner.run(candidate, load)
                    measured = measure(args, base, candidate, load, tuner.settings, Path(work_dir))
                    rows.append({"candidate": candidate.settings(), "rate": load, "round": round_index,
                                 "predicted": predicted, "measured": measured})
                    print(format_comparison(rows[-1]), flush=True)
    measured_goodput = {c: float(np.mean([r["measured"]["goodput"] for r in rows if r["candidate"] == c.settings()]))
                        for c in candidates}
    best = max(top, key=lambda c: measured_goodput[c], default=default)
    if measured_goodput[best] > measured_goodput[default]:
        recommended, reason = best, (f"validated: measured goodput {measured_goodput[best]:.2f} against the "
                                     f"default's {measured_goodput[default]:.2f}")
    else:
        recommended, reason = default, (f"no validated candidate measured more goodput than the default "
                                        f"({measured_goodput[default]:.2f}); keeping the default")
    print(ranking_report(rows, candidates))
    return {"rows": rows, "rates": rates, "recommended": recommended.settings(), "reason": reason}


def format_comparison(row: dict) -> str:
    lines = [f"  {'':<10} {'predicted':>10} {'measured':>10} {'error':>7}"]
    for name, key, percentile in METRICS:
        predicted = _value(row["predicted"], key, percentile)
        measured = _value(row["measured"], key, percentile)
        error = (predicted - measured) / measured if measured else math.nan
        scale = 1000 if key.endswith("_s") else 1
        lines.append(f"  {name:<10} {predicted * scale:10.1f} {measured * scale:10.1f} {100 * error:6.1f}%")
    if "cached_ratio" in row["measured"]:  # chats: how much of the prompts the prefix cache supplied
        lines.append(f"  {'cached %':<10} {100 * row['predicted']['cached_ratio']:10.1f} "
                     f"{100 * row['measured']['cached_ratio']:10.1f}")
    return "\n".join(lines)


def ranking_report(rows: list[dict], candidates: list[Candidate]) -> str:
    """Per load: the candidates ranked by predicted and by measured goodput, and whether the orders agree."""
    lines = []
    for load in sorted({row["rate"] for row in rows}):
        def mean_goodput(candidate: Candidate, side: str, load: float = load) -> float:
            return float(np.mean([r[side]["goodput"] for r in rows
                                  if r["rate"] == load and r["candidate"] == candidate.settings()]))

        predicted = sorted(candidates, key=lambda c: -mean_goodput(c, "predicted"))
        measured = sorted(candidates, key=lambda c: -mean_goodput(c, "measured"))
        # NOTE: candidates whose predictions are within 1% are a predicted tie, which any order matches.
        agrees = all(mean_goodput(better, "predicted") >= 0.99 * mean_goodput(worse, "predicted")
                     for better, worse in zip(measured, measured[1:]))
        lines.append(f"at {load:.3g}: ranking by goodput {'matches' if agrees else 'DIFFERS'} (predicted ties "
                     "match any order)")
        for place, candidate in enumerate(measured, 1):
            lines.append(f"  {place}. {candidate.label()}  measured {mean_goodput(candidate, 'measured'):.2f}, "
                         f"predicted {mean_goodput(candidate, 'predicted'):.2f} (predicted place "
                         f"{predicted.index(candidate) + 1})")
    return "\n".join(lines)
